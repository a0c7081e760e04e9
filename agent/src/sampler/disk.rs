//! Disk busy fraction from `/proc/diskstats`: the busiest watched device's
//! Δio_ticks (ms the device had I/O in flight) over the elapsed ms.
//!
//! Watched devices are the configured ones (exact names, partitions allowed),
//! or, when none are configured, every whole disk: not `loop*`, `ram*` or
//! `zram*` (memory, not disks) and not a partition of another listed device
//! (`sda1` of `sda`, `nvme0n1p1` of `nvme0n1`). Device-mapper and md devices
//! stay: they can be busier than any one disk below them.
//!
//! The grid's share is 0: the sampler has no per-cgroup I/O figure for the
//! grid yet, so grid VMs' own disk I/O counts as customer load here (the
//! IO pressure metric has the same limitation).
//!
//! Lines are matched by device name without allocating; only watched lines go
//! through `procfs::DiskStat::from_line`, so a host with dozens of loop
//! devices pays for the few disks it watches. The watched set is worked out
//! again only when the list of devices changes.

use std::path::Path;
use std::time::Instant;

use super::procfile::ProcFile;
use super::{elapsed_secs, RawReading, SampleError};

/// The device name: third field of a diskstats line.
fn device_name(line: &str) -> Option<&str> {
    line.split_ascii_whitespace().nth(2)
}

/// True when `name` is a partition of `parent`: `sda1` of `sda`, and, when
/// the parent's name ends in a digit, `nvme0n1p1` of `nvme0n1`. Never
/// `nvme0n10` of `nvme0n1` (another namespace).
pub(crate) fn is_partition_of(name: &str, parent: &str) -> bool {
    let Some(rest) = name.strip_prefix(parent) else {
        return false;
    };
    let digits = if parent.ends_with(|c: char| c.is_ascii_digit()) {
        rest.strip_prefix('p')
    } else {
        Some(rest)
    };
    digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Which of `names` are watched.
pub(crate) fn select(names: &[String], configured: &[String]) -> Vec<bool> {
    if !configured.is_empty() {
        return names.iter().map(|n| configured.contains(n)).collect();
    }
    names
        .iter()
        .map(|n| {
            !["loop", "ram", "zram"].iter().any(|p| n.starts_with(p))
                && !names.iter().any(|parent| is_partition_of(n, parent))
        })
        .collect()
}

#[derive(Debug)]
pub(crate) struct Disk {
    file: ProcFile,
    configured: Vec<String>,
    /// Every device in file order as of the last read, and whether it is watched.
    names: Vec<String>,
    watched: Vec<bool>,
    /// io_ticks per device (same index as `names`); None when not watched.
    prev: Vec<Option<u64>>,
    cur: Vec<Option<u64>>,
    prev_at: Option<Instant>,
}

impl Disk {
    pub(crate) fn open(root: &Path, configured: &[String]) -> Result<Disk, SampleError> {
        Ok(Disk {
            file: ProcFile::open(root, "diskstats")?,
            configured: configured.to_vec(),
            names: Vec::new(),
            watched: Vec::new(),
            prev: Vec::new(),
            cur: Vec::new(),
            prev_at: None,
        })
    }

    /// The devices watched as of the last sample.
    #[cfg(test)]
    pub(crate) fn watched(&self) -> Vec<&str> {
        self.names
            .iter()
            .zip(&self.watched)
            .filter(|(_, w)| **w)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Busiest watched device's busy fraction; None on the first sample (or
    /// when nothing is watched).
    pub(crate) fn sample(&mut self, now: Instant) -> Result<Option<RawReading>, SampleError> {
        let text = self.file.read_text()?;
        let same = text
            .lines()
            .filter_map(device_name)
            .eq(self.names.iter().map(String::as_str));
        if !same {
            // Devices came or went: work out the watched set again and carry
            // the counters of devices that are still there.
            let names: Vec<String> = text
                .lines()
                .filter_map(device_name)
                .map(str::to_owned)
                .collect();
            let prev = names
                .iter()
                .map(|n| {
                    let i = self.names.iter().position(|o| o == n)?;
                    self.prev.get(i).copied().flatten()
                })
                .collect();
            self.watched = select(&names, &self.configured);
            for c in &self.configured {
                if !names.contains(c) {
                    tracing::warn!("sampler.disks: no device {c} in diskstats; it is not watched");
                }
            }
            self.names = names;
            self.prev = prev;
        }
        self.cur.clear();
        let mut error = None;
        for (line, watched) in text
            .lines()
            .filter(|l| device_name(l).is_some())
            .zip(&self.watched)
        {
            let ticks = if *watched {
                match procfs::DiskStat::from_line(line) {
                    Ok(d) => Some(d.time_in_progress),
                    Err(e) => {
                        error = Some(format!("{}: {e}", device_name(line).unwrap_or_default()));
                        None
                    }
                }
            } else {
                None
            };
            self.cur.push(ticks);
        }
        drop(text);
        if let Some(m) = error {
            return Err(self.file.parse_error(m));
        }
        let reading = self
            .prev_at
            .and_then(|t| elapsed_secs(t, now))
            .and_then(|secs| {
                let ms = secs * 1000.0;
                let busiest = self
                    .prev
                    .iter()
                    .zip(&self.cur)
                    .filter_map(|(p, c)| Some(c.as_ref()?.saturating_sub((*p)?) as f64 / ms))
                    .max_by(f64::total_cmp)?;
                Some(RawReading {
                    raw: busiest,
                    grid: 0.0,
                    normalised: busiest.clamp(0.0, 1.0),
                })
            });
        std::mem::swap(&mut self.prev, &mut self.cur);
        self.prev_at = Some(now);
        Ok(reading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn watched(all: &[&str], configured: &[&str]) -> Vec<String> {
        let all = names(all);
        select(&all, &names(configured))
            .into_iter()
            .zip(all)
            .filter_map(|(w, n)| w.then_some(n))
            .collect()
    }

    #[test]
    fn partitions() {
        assert!(is_partition_of("sda1", "sda"));
        assert!(is_partition_of("sda15", "sda"));
        assert!(is_partition_of("nvme0n1p1", "nvme0n1"));
        assert!(is_partition_of("mmcblk0p2", "mmcblk0"));
        assert!(!is_partition_of("nvme0n10", "nvme0n1"));
        assert!(!is_partition_of("sdaa", "sda"));
        assert!(!is_partition_of("sda", "sda"));
        assert!(!is_partition_of("nvme0n1p", "nvme0n1"));
    }

    #[test]
    fn whole_disks_by_default() {
        let all = [
            "loop0",
            "loop0p1",
            "ram0",
            "zram0",
            "sda",
            "sda1",
            "sda2",
            "sdaa",
            "vda",
            "vda1",
            "nvme0n1",
            "nvme0n1p1",
            "nvme0n10",
            "dm-0",
            "md127",
        ];
        assert_eq!(
            watched(&all, &[]),
            ["sda", "sdaa", "vda", "nvme0n1", "nvme0n10", "dm-0", "md127"]
        );
    }

    #[test]
    fn configured_devices_exactly() {
        assert_eq!(
            watched(&["sda", "sda1", "loop0"], &["sda1", "loop0", "sdz"]),
            ["sda1", "loop0"]
        );
    }
}
