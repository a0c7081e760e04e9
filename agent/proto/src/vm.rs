//! Grid VM lifecycle states and the typed reasons for every transition.

use serde::{Deserialize, Serialize};

/// Lifecycle of one grid VM: Absent → Launching → Running ⇄ Suspended →
/// Reclaimed, and with `reclaim_mode = "save"` Suspended → Saved →
/// Launching (restored) → Running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// No VM exists yet; the slot may be launched when capacity is spare.
    Absent,
    /// Asked the runtime to start it; waiting for it to come up.
    Launching,
    /// Running and using idle capacity.
    Running,
    /// Paused: holds its memory but no CPU. Resumed when the host is calm again.
    Suspended,
    /// Destroyed (or saved on shutdown); its subtask is handed back.
    Reclaimed,
    /// State saved to disk (libvirt managed save) instead of destroyed; it
    /// holds no CPU or memory, keeps its subtask and is restored later.
    Saved,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Absent => "absent",
            VmState::Launching => "launching",
            VmState::Running => "running",
            VmState::Suspended => "suspended",
            VmState::Reclaimed => "reclaimed",
            VmState::Saved => "saved",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transition happened. Logged, counted in metrics (`reason` label)
/// and kept in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Spare capacity lasted `launch_after`: a new VM is launched.
    SpareCapacity,
    /// The VM is up: its guest worker answered on the guest channel (or,
    /// for the process runtime, the runtime started it).
    Started,
    /// The host has been below `resume_below` for `resume_after`.
    Idle,
    /// Customer CPU (busy, load average or CPU pressure) went above `suspend_above`.
    CpuPressure,
    /// Customer memory use or memory pressure went above `suspend_above`.
    MemoryPressure,
    /// MemAvailable fell below `memory_reserve`: reclaim at once.
    MemoryReserve,
    /// Network throughput went above `suspend_above`.
    NetworkPressure,
    /// Disk busy time or IO pressure went above `suspend_above`.
    DiskPressure,
    /// Round-trip time to the probe target went above `suspend_above`.
    Latency,
    /// Suspended longer than `reclaim_after`.
    SuspendedTooLong,
    /// Launching longer than `boot_timeout`.
    BootTimeout,
    /// The runtime failed to launch, suspend or resume it.
    RuntimeError,
    /// The VM (or process) went away on its own.
    Exited,
    /// An operator asked the agent to drain.
    Drain,
    /// The agent is stopping (SIGTERM).
    Shutdown,
    /// Found at start-up by reconciling with the runtime.
    Adopted,
    /// The guest worker failed on the guest channel: no Hello in time,
    /// garbage or an oversized frame, heartbeats stopped, or the channel
    /// closed (QEMU or the guest died).
    GuestFailure,
    /// `reclaim_mode = "migrate"`: the saved VM moved to another host
    /// (on the source), or arrived from one (on the target).
    Migrated,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SpareCapacity => "spare_capacity",
            Reason::Started => "started",
            Reason::Idle => "idle",
            Reason::CpuPressure => "cpu_pressure",
            Reason::MemoryPressure => "memory_pressure",
            Reason::MemoryReserve => "memory_reserve",
            Reason::NetworkPressure => "network_pressure",
            Reason::DiskPressure => "disk_pressure",
            Reason::Latency => "latency",
            Reason::SuspendedTooLong => "suspended_too_long",
            Reason::BootTimeout => "boot_timeout",
            Reason::RuntimeError => "runtime_error",
            Reason::Exited => "exited",
            Reason::Drain => "drain",
            Reason::Shutdown => "shutdown",
            Reason::Adopted => "adopted",
            Reason::GuestFailure => "guest_failure",
            Reason::Migrated => "migrated",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recorded state change of one grid VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub vm: String,
    pub from: VmState,
    pub to: VmState,
    pub reason: Reason,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The load factor the decision used: the smoothed value, or for a
    /// suspend the larger of smoothed and peak.
    pub load: f64,
}
