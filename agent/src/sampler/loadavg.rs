//! Customer 1-minute load average per CPU from `/proc/loadavg`.
//!
//! Host load per CPU is the 1-minute value over the online CPU count (from
//! `/proc/stat`); the grid's runnable vCPUs/processes over the same count are
//! subtracted. 1.0 means every CPU has a runnable customer task on average.
//! Parsed with `procfs::LoadAverage` (one short line, one small allocation).

use std::path::Path;

use procfs::FromRead;

use super::procfile::ProcFile;
use super::{RawReading, SampleError};

#[derive(Debug)]
pub(crate) struct LoadAvg {
    file: ProcFile,
}

impl LoadAvg {
    pub(crate) fn open(root: &Path) -> Result<LoadAvg, SampleError> {
        Ok(LoadAvg {
            file: ProcFile::open(root, "loadavg")?,
        })
    }

    pub(crate) fn sample(
        &mut self,
        ncpu: usize,
        grid_runnable: f64,
    ) -> Result<RawReading, SampleError> {
        let parsed = procfs::LoadAverage::from_read(self.file.read()?);
        let one = parsed
            .map_err(|e| self.file.parse_error(e.to_string()))?
            .one;
        Ok(reading(f64::from(one), ncpu, grid_runnable))
    }
}

fn reading(one: f64, ncpu: usize, grid_runnable: f64) -> RawReading {
    let n = ncpu.max(1) as f64;
    let host = one / n;
    let grid = grid_runnable.max(0.0) / n;
    let customer = (host - grid).max(0.0);
    RawReading {
        raw: customer,
        grid,
        normalised: customer.clamp(0.0, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_minus_grid() {
        let r = reading(3.0, 4, 1.0);
        assert_eq!((r.raw, r.grid, r.normalised), (0.5, 0.25, 0.5));
        let r = reading(12.0, 4, 0.0);
        assert_eq!((r.raw, r.normalised), (3.0, 1.0));
        let r = reading(0.5, 4, 4.0);
        assert_eq!(r.normalised, 0.0);
    }
}
