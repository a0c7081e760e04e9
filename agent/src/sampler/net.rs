//! Customer network throughput from `/proc/net/dev` byte counters.
//!
//! For each counted interface the rate is max(rx, tx) bytes/s (a link is
//! full when either direction is); rates are summed over interfaces and
//! normalised by the configured link capacity. Counted interfaces are the
//! configured ones, or every interface except `lo` when none are configured.
//! On a hypervisor, "every interface" includes the customers' tap devices and
//! bridges, so the same traffic can count two or three times (tap, bridge,
//! uplink); configure `sampler.interfaces` to the uplinks there.
//!
//! The grid's share is 0: grid VMs have no NIC yet (they get network only
//! through the overlay, which a later issue adds), so nothing of theirs shows
//! in these counters. Once they do, their tap/tunnel bytes must be
//! subtracted here.
//!
//! Parsed by hand, not with `procfs::InterfaceDeviceStatus`: that builds a
//! `HashMap` with two owned `String`s per interface on every call (2.4 µs for
//! 4 interfaces; a hypervisor has one tap per customer NIC, hundreds of
//! lines). Here counters live in a reused vector: no allocation once the
//! interface set is stable.

use std::path::Path;
use std::time::Instant;

use super::procfile::{parse_u64, ProcFile};
use super::{elapsed_secs, RawReading, SampleError};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct IfCounters {
    pub name: String,
    pub rx: u64,
    pub tx: u64,
}

/// Which interfaces count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfFilter(Vec<String>);

impl IfFilter {
    pub(crate) fn new(configured: &[String]) -> IfFilter {
        IfFilter(configured.to_vec())
    }

    pub(crate) fn counts(&self, name: &str) -> bool {
        if self.0.is_empty() {
            name != "lo"
        } else {
            self.0.iter().any(|n| n == name)
        }
    }
}

/// Fills `out` with the counted interfaces' counters, reusing its entries.
pub(crate) fn parse_net_dev(
    text: &str,
    filter: &IfFilter,
    out: &mut Vec<IfCounters>,
) -> Result<(), String> {
    let mut n = 0;
    // The two header lines have no ':'; every interface line does
    // ("  eth0: 123 …", or "eth0:123 …" on old kernels with wide counters).
    for line in text.lines() {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if !filter.counts(name) {
            continue;
        }
        let mut fields = counters.split_ascii_whitespace();
        let rx = fields
            .next()
            .ok_or_else(|| format!("{name}: no receive bytes"))?;
        // rx: bytes packets errs drop fifo frame compressed multicast; then tx bytes.
        let tx = fields
            .nth(7)
            .ok_or_else(|| format!("{name}: no transmit bytes"))?;
        let (rx, tx) = (parse_u64(rx, name)?, parse_u64(tx, name)?);
        if n == out.len() {
            out.push(IfCounters::default());
        }
        let e = &mut out[n];
        if e.name != name {
            e.name.clear();
            e.name.push_str(name);
        }
        (e.rx, e.tx) = (rx, tx);
        n += 1;
    }
    out.truncate(n);
    Ok(())
}

/// Sum over interfaces of max(rx, tx) bytes/s between two readings.
/// Interfaces new in `cur` add nothing; a counter that went backwards
/// (interface re-created) adds nothing.
pub(crate) fn rate(prev: &[IfCounters], cur: &[IfCounters], secs: f64) -> f64 {
    let mut sum = 0.0;
    for (i, c) in cur.iter().enumerate() {
        // Same order as last time in the common case.
        let p = match prev.get(i) {
            Some(p) if p.name == c.name => Some(p),
            _ => prev.iter().find(|p| p.name == c.name),
        };
        if let Some(p) = p {
            let rx = c.rx.saturating_sub(p.rx);
            let tx = c.tx.saturating_sub(p.tx);
            sum += rx.max(tx) as f64 / secs;
        }
    }
    sum
}

#[derive(Debug)]
pub(crate) struct Net {
    file: ProcFile,
    filter: IfFilter,
    link_bytes_per_sec: f64,
    prev: Vec<IfCounters>,
    cur: Vec<IfCounters>,
    prev_at: Option<Instant>,
}

impl Net {
    pub(crate) fn open(
        root: &Path,
        interfaces: &[String],
        link_bytes_per_sec: u64,
    ) -> Result<Net, SampleError> {
        Ok(Net {
            file: ProcFile::open(root, "net/dev")?,
            filter: IfFilter::new(interfaces),
            link_bytes_per_sec: link_bytes_per_sec.max(1) as f64,
            prev: Vec::new(),
            cur: Vec::new(),
            prev_at: None,
        })
    }

    /// Customer bytes/s; None on the first sample.
    pub(crate) fn sample(&mut self, now: Instant) -> Result<Option<RawReading>, SampleError> {
        let text = self.file.read_text()?;
        let parsed = parse_net_dev(&text, &self.filter, &mut self.cur);
        drop(text);
        parsed.map_err(|m| self.file.parse_error(m))?;
        let reading = self.prev_at.and_then(|t| elapsed_secs(t, now)).map(|secs| {
            let bytes = rate(&self.prev, &self.cur, secs);
            RawReading {
                raw: bytes,
                grid: 0.0,
                normalised: (bytes / self.link_bytes_per_sec).clamp(0.0, 1.0),
            }
        });
        std::mem::swap(&mut self.prev, &mut self.cur);
        self.prev_at = Some(now);
        Ok(reading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0
  eth0:1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0
 vnet3:  500 5 0 0 0 0 0 0 700 7 0 0 0 0 0 0
";

    fn parse(filter: &[&str]) -> Vec<IfCounters> {
        let f = IfFilter::new(&filter.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = Vec::new();
        parse_net_dev(DEV, &f, &mut out).unwrap();
        out
    }

    #[test]
    fn all_but_lo_by_default_and_old_format_without_space() {
        let got = parse(&[]);
        let names: Vec<_> = got.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["eth0", "vnet3"]);
        assert_eq!((got[0].rx, got[0].tx), (1000, 2000));
        assert_eq!((got[1].rx, got[1].tx), (500, 700));
    }

    #[test]
    fn configured_interfaces_only() {
        let got = parse(&["vnet3", "lo", "absent0"]);
        let names: Vec<_> = got.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["lo", "vnet3"]);
    }

    #[test]
    fn short_line_is_an_error() {
        let mut out = Vec::new();
        let err = parse_net_dev("eth0: 1 2 3\n", &IfFilter::new(&[]), &mut out).unwrap_err();
        assert!(err.contains("eth0"), "{err}");
    }

    #[test]
    fn rate_sums_max_direction_and_ignores_new_and_reset() {
        let c = |name: &str, rx, tx| IfCounters {
            name: name.into(),
            rx,
            tx,
        };
        let prev = [c("a", 0, 0), c("b", 100, 100), c("reset", 1000, 1000)];
        let cur = [
            c("new", 50, 50),
            c("b", 300, 150),
            c("a", 10, 40),
            c("reset", 5, 5),
        ];
        // a: max(10, 40) = 40; b: max(200, 50) = 200; over 2 s.
        assert_eq!(rate(&prev, &cur, 2.0), 120.0);
    }
}
