//! Pressure stall information from `/proc/pressure/{cpu,memory,io}`: the
//! share of wall time in which some task was stalled on the resource, from
//! Δ(`some … total=` µs) over the elapsed µs. For CPU, the grid cgroup's own
//! "some" stall is subtracted when the caller has it.
//!
//! PSI is optional: kernels before 4.20, kernels without CONFIG_PSI and
//! kernels booted with `psi=0` (whose files answer reads with EOPNOTSUPP)
//! report these metrics as unavailable instead of failing the sample.
//!
//! Parsed by hand, not with `procfs`' `CpuPressure` / `MemoryPressure` /
//! `IoPressure` (which would work on the injected root): they build a
//! `HashMap` and a `Vec` per `key=value` and parse three averages that are
//! not used, measured at 1.2 µs per file against well under 0.1 µs for
//! finding `total=`, about an eighth of the whole sample for three files.
//! A test checks this parser agrees with procfs'.

use std::path::Path;
use std::time::Instant;

use super::procfile::{parse_u64, ProcFile};
use super::{elapsed_secs, RawReading, SampleError};

/// One of the three pressure files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Cpu,
    Memory,
    Io,
}

impl Resource {
    fn rel(self) -> &'static str {
        match self {
            Resource::Cpu => "pressure/cpu",
            Resource::Memory => "pressure/memory",
            Resource::Io => "pressure/io",
        }
    }
}

/// The cumulative "some" stall in µs: `total=` of the first line.
fn some_total(bytes: &[u8]) -> Result<u64, String> {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| "\"some\" line is not text")?;
    let rest = line
        .strip_prefix("some ")
        .ok_or_else(|| format!("expected a \"some\" line, got {line:?}"))?;
    let total = rest
        .split_ascii_whitespace()
        .find_map(|kv| kv.strip_prefix("total="))
        .ok_or("no total= in the \"some\" line")?;
    parse_u64(total, "some total")
}

#[derive(Debug, Clone, Copy)]
struct Baseline {
    total_us: u64,
    grid_us: Option<u64>,
    at: Instant,
}

#[derive(Debug)]
struct Source {
    resource: Resource,
    /// None when the kernel does not provide this file.
    file: Option<ProcFile>,
    prev: Option<Baseline>,
}

impl Source {
    fn sample(
        &mut self,
        grid_us: Option<u64>,
        now: Instant,
    ) -> Result<Option<RawReading>, SampleError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        let parsed = match file.read() {
            Ok(bytes) => some_total(bytes),
            Err(e) if e.is_unavailable() => {
                tracing::info!(
                    "pressure stall information unavailable ({e}); {} pressure is not sampled",
                    self.resource.rel()
                );
                self.file = None;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let total_us = parsed.map_err(|e| file.parse_error(e))?;
        let cur = Baseline {
            total_us,
            grid_us,
            at: now,
        };
        let reading = self.prev.and_then(|prev| reading(&prev, &cur));
        self.prev = Some(cur);
        Ok(reading)
    }
}

fn reading(prev: &Baseline, cur: &Baseline) -> Option<RawReading> {
    let us = elapsed_secs(prev.at, cur.at)? * 1e6;
    let host = cur.total_us.saturating_sub(prev.total_us) as f64 / us;
    let grid = match (prev.grid_us, cur.grid_us) {
        (Some(p), Some(c)) => c.saturating_sub(p) as f64 / us,
        _ => 0.0,
    };
    let customer = (host - grid).max(0.0);
    Some(RawReading {
        raw: customer,
        grid,
        normalised: customer.clamp(0.0, 1.0),
    })
}

/// The three pressure files.
#[derive(Debug)]
pub(crate) struct Psi {
    sources: [Source; 3],
}

impl Psi {
    pub(crate) fn open(root: &Path) -> Result<Psi, SampleError> {
        let open = |resource: Resource| -> Result<Source, SampleError> {
            Ok(Source {
                resource,
                file: ProcFile::open_optional(root, resource.rel())?,
                prev: None,
            })
        };
        Ok(Psi {
            sources: [
                open(Resource::Cpu)?,
                open(Resource::Memory)?,
                open(Resource::Io)?,
            ],
        })
    }

    /// CPU, memory and IO pressure; None when unavailable or on the first sample.
    pub(crate) fn sample(
        &mut self,
        grid_cpu_stall_us: Option<u64>,
        now: Instant,
    ) -> Result<[Option<RawReading>; 3], SampleError> {
        let [cpu, memory, io] = &mut self.sources;
        Ok([
            cpu.sample(grid_cpu_stall_us, now)?,
            memory.sample(None, now)?,
            io.sample(None, now)?,
        ])
    }

    /// True when at least one pressure file is being read.
    #[cfg(test)]
    pub(crate) fn present(&self) -> bool {
        self.sources.iter().any(|s| s.file.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn some_total_agrees_with_procfs() {
        use procfs::FromBufRead;
        let samples: [&[u8]; 3] = [
            b"some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            b"some avg10=12.50 avg60=3.01 avg300=0.99 total=18446744073709551615\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=42\n",
            b"some avg10=0.10 avg60=0.20 avg300=0.30 total=7\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1\n",
        ];
        for bytes in samples {
            let want = procfs::MemoryPressure::from_buf_read(bytes)
                .unwrap()
                .some
                .total;
            assert_eq!(some_total(bytes).unwrap(), want);
            let want = procfs::CpuPressure::from_buf_read(bytes)
                .unwrap()
                .some
                .total;
            assert_eq!(some_total(bytes).unwrap(), want);
        }
        // Kernels before 5.13 print no "full" line for cpu.
        assert_eq!(
            some_total(b"some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n").unwrap(),
            7
        );
    }

    #[test]
    fn bad_pressure_files_are_errors() {
        for bad in [
            &b""[..],
            b"garbage\n",
            b"some",
            b"some avg10=0.00\n",
            b"some total=x\n",
            b"full total=1\n",
        ] {
            assert!(
                some_total(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn grid_stall_is_subtracted() {
        let t0 = Instant::now();
        let b = |total_us, grid_us, s| Baseline {
            total_us,
            grid_us,
            at: t0 + Duration::from_secs(s),
        };
        let r = reading(&b(0, Some(0), 0), &b(500_000, Some(200_000), 1)).unwrap();
        assert!(
            (r.raw - 0.3).abs() < 1e-12 && (r.grid - 0.2).abs() < 1e-12,
            "{r:?}"
        );
        // Grid figure missing on one side: nothing subtracted.
        let r = reading(&b(0, None, 0), &b(500_000, Some(200_000), 1)).unwrap();
        assert_eq!((r.raw, r.grid), (0.5, 0.0));
    }
}
