//! The sampler: reads procfs under an injected root and turns it into the
//! customer's load per metric, normalised to 0..1.
//!
//! Counters (/proc/stat, /proc/net/dev, /proc/diskstats, /proc/pressure/*)
//! are turned into rates from the previous sample, so the first sample after
//! construction reports those metrics as unavailable. The grid's own usage
//! (read from the grid cgroup by the caller) is subtracted, so a grid VM's
//! own load never counts against it.
//!
//! One private module per source: `cpu` (/proc/stat), `loadavg`, `memory`
//! (/proc/meminfo), `net` (/proc/net/dev), `disk` (/proc/diskstats), `psi`
//! (/proc/pressure/*), `rtt` (TCP connect time on a background thread);
//! `procfile` keeps each file open and re-reads it in place.
//!
//! Cost: a sample is eight `pread`s into reused buffers plus allocation-free
//! parsing of the few lines that matter. On the 2-CPU development VM the
//! median was 25–30 µs when quiet (about 45 µs while parallel builds loaded
//! both CPUs), over 80 % of it in the kernel formatting the files (perf);
//! `tests::sample_cost` prints the figure next to the bare reads. `procfs`
//! parsers are used where they are cheap (loadavg, one diskstats line per
//! watched disk); each hand-parsed module says why, with its measured cost.

mod cpu;
mod disk;
mod loadavg;
mod memory;
mod net;
mod procfile;
mod psi;
mod rtt;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sparegrid_proto::Metric;

use crate::config::SamplerSection;

/// The grid partition's own cumulative usage, read from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GridUsage {
    /// Cumulative CPU time of every grid VM/process, nanoseconds.
    pub cpu_ns: u64,
    /// Memory currently charged to the grid partition, bytes.
    pub memory_bytes: u64,
    /// Cumulative CPU "some" stall time of the grid partition, microseconds,
    /// when the kernel reports PSI per cgroup.
    pub cpu_stall_us: Option<u64>,
    /// Grid vCPUs/processes that are runnable now (subtracted from load average).
    pub runnable: f64,
}

/// One metric's value in a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawReading {
    /// Customer value in the metric's own unit (host value minus grid share).
    pub raw: f64,
    /// The grid's share that was subtracted, same unit.
    pub grid: f64,
    /// Customer value normalised to 0..1.
    pub normalised: f64,
}

/// One sample: a reading per metric (None when unavailable) plus memory facts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawSample {
    pub readings: [Option<RawReading>; Metric::ALL.len()],
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Wall time between this sample and the previous one.
    pub elapsed: Duration,
    /// Customer CPU over the short window before this sample, when the
    /// sample was marked (see [`Sampler::mark`]).
    pub cpu_window: Option<RawReading>,
}

impl RawSample {
    pub fn get(&self, m: Metric) -> Option<RawReading> {
        self.readings[m.index()]
    }

    pub fn set(&mut self, m: Metric, r: RawReading) {
        self.readings[m.index()] = Some(r);
    }
}

/// A sample that could not be taken. Each error names the file (or probe
/// target) it is about.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot start the RTT probe for {target}: {source}")]
    RttProbe {
        target: String,
        source: std::io::Error,
    },
}

impl SampleError {
    /// True when the file does not exist or the kernel refuses it as
    /// unsupported (EOPNOTSUPP, as PSI files do when booted with `psi=0`).
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            SampleError::Read { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || source.raw_os_error() == Some(libc::ENOTSUP)
            }
            _ => false,
        }
    }
}

/// Seconds from `from` to `to`; None unless time moved forward.
fn elapsed_secs(from: Instant, to: Instant) -> Option<f64> {
    let d = to.checked_duration_since(from)?;
    (!d.is_zero()).then_some(d.as_secs_f64())
}

/// Reads every metric's source under one procfs root and keeps the previous
/// counters for rates. Files are opened once, in [`Sampler::new`], and
/// re-read on every sample.
#[derive(Debug)]
pub struct Sampler {
    proc_root: PathBuf,
    cpu: cpu::Cpu,
    load_avg: loadavg::LoadAvg,
    memory: memory::Memory,
    net: net::Net,
    disk: disk::Disk,
    psi: psi::Psi,
    /// None when no RTT target is configured.
    rtt: Option<rtt::Rtt>,
    last: Option<Instant>,
}

impl Sampler {
    /// Opens the procfs files under `proc_root` (the pressure files only if
    /// present) and starts the RTT probe thread when a target is configured.
    /// Takes no sample: the first [`Sampler::sample`] sets the baselines.
    pub fn new(cfg: &SamplerSection, proc_root: &Path) -> Result<Sampler, SampleError> {
        let mut sampler = Sampler {
            proc_root: proc_root.to_path_buf(),
            cpu: cpu::Cpu::open(proc_root)?,
            load_avg: loadavg::LoadAvg::open(proc_root)?,
            memory: memory::Memory::open(proc_root)?,
            net: net::Net::open(proc_root, &cfg.interfaces, cfg.link_bytes_per_sec)?,
            disk: disk::Disk::open(proc_root, &cfg.disks)?,
            psi: psi::Psi::open(proc_root)?,
            rtt: None,
            last: None,
        };
        if !cfg.rtt_target.is_empty() {
            sampler.rtt = Some(rtt::Rtt::start(rtt::RttConfig {
                target: cfg.rtt_target.clone(),
                baseline: cfg.rtt_baseline,
                max: cfg.rtt_max,
                every: cfg.rtt_every,
            })?);
        }
        Ok(sampler)
    }

    /// The procfs root this sampler reads.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Online CPUs as of the last sample (1 before the first).
    pub fn ncpu(&self) -> usize {
        self.cpu.ncpu()
    }

    /// Marks the CPU counters shortly before the next sample, so that sample
    /// also sees a load step that began in the short window since the mark.
    /// The daemon marks `min(50 ms, interval / 4)` before each tick.
    pub fn mark(&mut self, grid: &GridUsage) -> Result<(), SampleError> {
        self.cpu.mark(grid.cpu_ns, Instant::now())
    }

    /// Takes a sample now.
    pub fn sample(&mut self, grid: &GridUsage) -> Result<RawSample, SampleError> {
        self.sample_at(grid, Instant::now())
    }

    /// Takes a sample as of `now`; rates are computed over the time since the
    /// previous sample's `now`. Tests pass made-up instants to get exact
    /// figures from fixture files; the daemon uses [`Sampler::sample`].
    pub fn sample_at(&mut self, grid: &GridUsage, now: Instant) -> Result<RawSample, SampleError> {
        let mut s = RawSample {
            elapsed: self
                .last
                .and_then(|t| now.checked_duration_since(t))
                .unwrap_or(Duration::ZERO),
            ..RawSample::default()
        };
        let r = &mut s.readings;
        // /proc/stat first: load average per CPU needs its CPU count.
        r[Metric::Cpu.index()] = self.cpu.sample(grid.cpu_ns, now)?;
        s.cpu_window = self.cpu.window();
        let ncpu = self.cpu.ncpu();
        r[Metric::LoadAvg.index()] = Some(self.load_avg.sample(ncpu, grid.runnable)?);
        let (memory, info) = self.memory.sample(grid.memory_bytes)?;
        r[Metric::Memory.index()] = Some(memory);
        r[Metric::Network.index()] = self.net.sample(now)?;
        r[Metric::Disk.index()] = self.disk.sample(now)?;
        let [psi_cpu, psi_memory, psi_io] = self.psi.sample(grid.cpu_stall_us, now)?;
        r[Metric::PsiCpu.index()] = psi_cpu;
        r[Metric::PsiMemory.index()] = psi_memory;
        r[Metric::PsiIo.index()] = psi_io;
        r[Metric::Rtt.index()] = self.rtt.as_ref().and_then(rtt::Rtt::reading);
        s.mem_total_bytes = info.total;
        s.mem_available_bytes = info.available;
        self.last = Some(now);
        Ok(s)
    }
}

#[cfg(test)]
mod tests;
