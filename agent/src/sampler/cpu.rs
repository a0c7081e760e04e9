//! Customer CPU busy fraction from `/proc/stat`, and the online CPU count.
//!
//! Host busy = Δ(total − idle − iowait) / Δtotal over the aggregate `cpu`
//! line, where total is the sum of user, nice, system, idle, iowait, irq,
//! softirq and steal. `guest` and `guest_nice` are left out of the total
//! because the kernel already counts them inside user and nice: grid VMs'
//! vCPU time is there once, not twice.
//!
//! The grid's share is Δ(grid CPU ns) / (elapsed ns × ncpu) and is subtracted
//! from the host fraction (clamped at 0), so grid VMs never count against
//! themselves.
//!
//! A sample may also be *marked* shortly before it is taken
//! ([`Cpu::mark`]): the busy fraction over the short window since the mark is
//! then reported beside the interval's ([`Cpu::window`]). A load step that
//! starts just before a sample shows in that window at once; the load model
//! uses it only for the suspend decision, so its noise never delays a
//! resume.
//!
//! Parsed by hand, not with `procfs::KernelStats`: that parser allocates a
//! `String` per line and a `CpuTime` per CPU and must read past the `intr`
//! line; measured at 1.2 µs on 2 CPUs but 34 µs for a 128-CPU `/proc/stat`,
//! most of the 50 µs sample budget on exactly the hosts sparegrid targets.
//! Here only the leading `cpu*` lines are looked at, with no allocation.

use std::time::Instant;

use super::procfile::{parse_u64, ProcFile};
use super::{elapsed_secs, RawReading, SampleError};

/// Cumulative ticks (USER_HZ) of the aggregate `cpu` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CpuTicks {
    pub busy: u64,
    pub total: u64,
}

/// Parses the aggregate line and counts `cpuN` lines (online CPUs). Works on
/// bytes and stops after the `cpu*` lines, so the long `intr` line of a big
/// host is neither validated as UTF-8 nor split.
pub(crate) fn parse_stat(bytes: &[u8]) -> Result<(CpuTicks, usize), String> {
    let mut ticks = None;
    let mut ncpu = 0;
    for line in bytes.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(b"cpu") else {
            if ticks.is_some() {
                // The cpu lines lead the file; nothing after them is needed.
                break;
            }
            continue;
        };
        if rest.starts_with(b" ") {
            let rest = std::str::from_utf8(rest).map_err(|_| "cpu line is not text")?;
            ticks = Some(parse_cpu_fields(rest)?);
        } else if rest.first().is_some_and(u8::is_ascii_digit) {
            ncpu += 1;
        }
    }
    let ticks = ticks.ok_or("no aggregate \"cpu \" line")?;
    if ncpu == 0 {
        return Err("no per-CPU \"cpuN\" lines".into());
    }
    Ok((ticks, ncpu))
}

fn parse_cpu_fields(rest: &str) -> Result<CpuTicks, String> {
    // user nice system idle [iowait irq softirq steal [guest guest_nice]]
    let mut f = [0u64; 8];
    let mut n = 0;
    for (slot, field) in f.iter_mut().zip(rest.split_ascii_whitespace()) {
        *slot = parse_u64(field, "cpu line")?;
        n += 1;
    }
    if n < 4 {
        return Err(format!("cpu line has {n} fields, expected at least 4"));
    }
    let total: u64 = f.iter().sum();
    let idle = f[3] + f[4];
    Ok(CpuTicks {
        busy: total - idle,
        total,
    })
}

#[derive(Debug, Clone, Copy)]
struct Baseline {
    ticks: CpuTicks,
    grid_ns: u64,
    at: Instant,
}

/// `/proc/stat` and the previous sample's counters.
#[derive(Debug)]
pub(crate) struct Cpu {
    file: ProcFile,
    prev: Option<Baseline>,
    /// Set by [`Cpu::mark`], consumed by the next [`Cpu::sample`].
    recent: Option<Baseline>,
    /// The last sample's reading over the window since the mark.
    window: Option<RawReading>,
    last: Option<RawReading>,
    ncpu: usize,
}

impl Cpu {
    pub(crate) fn open(root: &std::path::Path) -> Result<Cpu, SampleError> {
        Ok(Cpu {
            file: ProcFile::open(root, "stat")?,
            prev: None,
            recent: None,
            window: None,
            last: None,
            ncpu: 1,
        })
    }

    /// Online CPUs as of the last successful read.
    pub(crate) fn ncpu(&self) -> usize {
        self.ncpu
    }

    fn read(&mut self, grid_cpu_ns: u64, now: Instant) -> Result<Baseline, SampleError> {
        let parsed = parse_stat(self.file.read()?);
        let (ticks, ncpu) = parsed.map_err(|m| self.file.parse_error(m))?;
        self.ncpu = ncpu;
        Ok(Baseline {
            ticks,
            grid_ns: grid_cpu_ns,
            at: now,
        })
    }

    /// Records the counters now, so the next sample also measures the short
    /// window since this mark.
    pub(crate) fn mark(&mut self, grid_cpu_ns: u64, now: Instant) -> Result<(), SampleError> {
        self.recent = Some(self.read(grid_cpu_ns, now)?);
        Ok(())
    }

    /// The last sample's customer CPU over the short window since its mark
    /// (None when it was not marked).
    pub(crate) fn window(&self) -> Option<RawReading> {
        self.window
    }

    /// Reads `/proc/stat`; the customer CPU reading over the whole interval,
    /// None on the first sample. The short window's reading is kept for
    /// [`Cpu::window`].
    pub(crate) fn sample(
        &mut self,
        grid_cpu_ns: u64,
        now: Instant,
    ) -> Result<Option<RawReading>, SampleError> {
        let cur = self.read(grid_cpu_ns, now)?;
        let ncpu = self.ncpu;
        let recent = self.recent.take();
        let Some(prev) = self.prev else {
            self.prev = Some(cur);
            return Ok(None);
        };
        let window = recent
            .filter(|r| r.at > prev.at)
            .and_then(|r| reading(&r, &cur, ncpu));
        self.window = window;
        match reading(&prev, &cur, ncpu) {
            Some(r) => {
                self.prev = Some(cur);
                self.last = Some(r);
                Ok(Some(r))
            }
            // No tick has passed (a very short interval): keep the baseline so
            // the next delta spans a longer window, and repeat the last value.
            None => Ok(self.last),
        }
    }
}

/// Customer CPU between two baselines; None when no tick or no time passed.
fn reading(prev: &Baseline, cur: &Baseline, ncpu: usize) -> Option<RawReading> {
    let dtotal = cur.ticks.total.saturating_sub(prev.ticks.total);
    let secs = elapsed_secs(prev.at, cur.at)?;
    if dtotal == 0 {
        return None;
    }
    let dbusy = cur.ticks.busy.saturating_sub(prev.ticks.busy).min(dtotal);
    let host = dbusy as f64 / dtotal as f64;
    let dgrid = cur.grid_ns.saturating_sub(prev.grid_ns) as f64;
    let grid = dgrid / (secs * 1e9 * ncpu as f64);
    let customer = (host - grid).max(0.0);
    Some(RawReading {
        raw: customer,
        grid,
        normalised: customer.clamp(0.0, 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STAT: &str = "cpu  100 10 50 800 20 5 5 10 40 0\n\
cpu0 50 5 25 400 10 3 2 5 20 0\n\
cpu1 50 5 25 400 10 2 3 5 20 0\n\
intr 12345 1 2 3\n\
ctxt 999\n\
cpu_not_a_cpu_line 1\n";

    #[test]
    fn a_mark_catches_a_load_step_just_before_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        let stat = |busy: u64, idle: u64| {
            std::fs::write(
                dir.path().join("stat"),
                format!("cpu  {busy} 0 0 {idle} 0 0 0 0\ncpu0 0 0 0 0\ncpu1 0 0 0 0\n"),
            )
            .unwrap()
        };
        let t0 = Instant::now();
        stat(0, 0);
        let mut cpu = Cpu::open(dir.path()).unwrap();
        assert_eq!(cpu.sample(0, t0).unwrap(), None);
        // 200 ms idle, then both CPUs busy for the last 50 ms (10 ticks).
        stat(0, 40);
        cpu.mark(0, t0 + Duration::from_millis(200)).unwrap();
        stat(10, 40);
        let r = cpu
            .sample(0, t0 + Duration::from_millis(250))
            .unwrap()
            .unwrap();
        assert!(
            (r.normalised - 0.2).abs() < 1e-9,
            "interval: 10 of 50 ticks: {r:?}"
        );
        let w = cpu.window().unwrap();
        assert_eq!(w.normalised, 1.0, "the short window sees the step: {w:?}");
        // The next interval, idle and unmarked, reads idle.
        stat(10, 80);
        let r = cpu
            .sample(0, t0 + Duration::from_millis(450))
            .unwrap()
            .unwrap();
        assert!((r.normalised - 0.0).abs() < 1e-9, "{r:?}");
        assert_eq!(cpu.window(), None);
        // A burst that ended before the mark is not magnified.
        stat(20, 80);
        cpu.mark(0, t0 + Duration::from_millis(650)).unwrap();
        stat(20, 90);
        let r = cpu
            .sample(0, t0 + Duration::from_millis(700))
            .unwrap()
            .unwrap();
        assert!((r.normalised - 10.0 / 20.0).abs() < 1e-9, "{r:?}");
        assert_eq!(cpu.window().unwrap().normalised, 0.0);
    }

    #[test]
    fn parses_aggregate_and_counts_cpus() {
        let (t, n) = parse_stat(STAT.as_bytes()).unwrap();
        assert_eq!(n, 2);
        // guest (40) is inside user already and must not be added again.
        assert_eq!(t.total, 100 + 10 + 50 + 800 + 20 + 5 + 5 + 10);
        assert_eq!(t.busy, t.total - 820);
    }

    #[test]
    fn old_kernels_with_four_fields_parse() {
        let (t, n) = parse_stat(b"cpu  1 2 3 4\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!((t.busy, t.total, n), (6, 10, 1));
    }

    #[test]
    fn bad_stat_is_an_error() {
        assert!(parse_stat(b"intr 1\n").unwrap_err().contains("cpu"));
        assert!(parse_stat(b"cpu  1 2 3 4\n").unwrap_err().contains("cpuN"));
        assert!(parse_stat(b"cpu  1 x 3 4\ncpu0 1 2 3 4\n")
            .unwrap_err()
            .contains("\"x\""));
    }

    #[test]
    fn grid_share_is_subtracted_and_clamped() {
        let t0 = Instant::now();
        let b = |busy, total, grid_ns, ms| Baseline {
            ticks: CpuTicks { busy, total },
            grid_ns,
            at: t0 + Duration::from_millis(ms),
        };
        // 2 CPUs, 1 s: host 90 % busy, grid used 1.2 CPU-seconds = 60 %.
        let r = reading(&b(0, 0, 0, 0), &b(180, 200, 1_200_000_000, 1000), 2).unwrap();
        assert!((r.raw - 0.3).abs() < 1e-12, "{r:?}");
        assert!((r.grid - 0.6).abs() < 1e-12, "{r:?}");
        // Grid above host (measurement skew): customer 0, not negative.
        let r = reading(&b(0, 0, 0, 0), &b(20, 200, 1_200_000_000, 1000), 2).unwrap();
        assert_eq!(r.normalised, 0.0);
        // No tick passed: no reading.
        assert!(reading(&b(5, 10, 0, 0), &b(5, 10, 0, 10), 2).is_none());
    }
}
