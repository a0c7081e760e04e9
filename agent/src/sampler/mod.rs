//! The sampler: reads procfs under an injected root and turns it into the
//! customer's load per metric, normalised to 0..1.
//!
//! Counters (/proc/stat, /proc/net/dev, /proc/diskstats, /proc/pressure/*)
//! are turned into rates from the previous sample, so the first sample after
//! construction reports those metrics as unavailable. The grid's own usage
//! (read from the grid cgroup by the caller) is subtracted, so a grid VM's
//! own load never counts against it.

use std::time::Duration;

use sparegrid_proto::Metric;

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
}

impl RawSample {
    pub fn get(&self, m: Metric) -> Option<RawReading> {
        self.readings[m.index()]
    }

    pub fn set(&mut self, m: Metric, r: RawReading) {
        self.readings[m.index()] = Some(r);
    }
}
