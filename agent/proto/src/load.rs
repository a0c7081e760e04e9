//! The composite load factor as it is reported: every metric's raw reading,
//! its 0..1 normalised value and weight, the combined value and the metric
//! that dominates it.

use serde::{Deserialize, Serialize};

/// One input to the composite load factor. The names are stable: they appear
/// in config (`[load.weights]`), in status JSON and in metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Customer CPU busy fraction, from /proc/stat deltas minus the grid's CPU time.
    Cpu,
    /// 1-minute load average per CPU, minus the grid's share.
    LoadAvg,
    /// Memory used (MemTotal − MemAvailable − grid memory) over MemTotal.
    Memory,
    /// Network bytes per second over the configured link capacity.
    Network,
    /// Disk busy fraction from /proc/diskstats io_ticks (busiest device).
    Disk,
    /// CPU pressure stall ("some"), minus the grid cgroup's own stalls.
    PsiCpu,
    /// Memory pressure stall ("some").
    PsiMemory,
    /// IO pressure stall ("some").
    PsiIo,
    /// TCP-connect round-trip time to the configured target over its baseline.
    Rtt,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::Cpu,
        Metric::LoadAvg,
        Metric::Memory,
        Metric::Network,
        Metric::Disk,
        Metric::PsiCpu,
        Metric::PsiMemory,
        Metric::PsiIo,
        Metric::Rtt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::LoadAvg => "load_avg",
            Metric::Memory => "memory",
            Metric::Network => "network",
            Metric::Disk => "disk",
            Metric::PsiCpu => "psi_cpu",
            Metric::PsiMemory => "psi_memory",
            Metric::PsiIo => "psi_io",
            Metric::Rtt => "rtt",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One metric in a breakdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricReading {
    pub metric: Metric,
    /// The reading in its own unit (fraction, bytes/s, ms …), customer share only.
    pub raw: f64,
    /// The grid's own share that was subtracted from the host reading.
    pub grid: f64,
    /// Normalised to 0..1.
    pub normalised: f64,
    pub weight: f64,
    /// False when the host cannot provide the metric (no PSI, no RTT target).
    pub available: bool,
}

/// The whole composite load factor at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadBreakdown {
    /// Combined value before smoothing, 0..1.
    pub instant: f64,
    /// Smoothed value (fast attack, slow decay), 0..1. Resume and launch
    /// decisions use this.
    pub smoothed: f64,
    /// The instant value with the CPU's short pre-sample window in place of
    /// its interval reading, when larger. Suspend uses max(smoothed, peak),
    /// so a load step is acted on in the sample that first sees it.
    pub peak: f64,
    /// The metric with the largest weighted contribution, if any metric is available.
    pub dominant: Option<Metric>,
    /// `max` or `weighted_mean`.
    pub combine: String,
    pub metrics: Vec<MetricReading>,
    /// MemAvailable in bytes, which the memory reserve is checked against.
    pub mem_available_bytes: u64,
}
