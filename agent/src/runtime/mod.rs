//! Runtimes run grid VMs. Both backends implement [`Runtime`]:
//!
//! - [`libvirt`]: real VMs through libvirt (the `virt` crate);
//! - [`process`]: host processes in the grid cgroup, for hosts without
//!   libvirt and for fast tests.
//!
//! Every method blocks. The daemon calls them only from its control thread,
//! never from the async runtime.

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod process;

use std::path::{Path, PathBuf};

/// What to launch.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// Unique name, `sg-<host>-<n>`; also the libvirt domain name.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Guest kernel, initramfs and command line (libvirt).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Command to run (process runtime).
    pub command: Vec<String>,
    /// Use the emulator (TCG) even where hardware acceleration is usable:
    /// set after a KVM guest failed to come up within `boot_timeout`.
    pub force_tcg: bool,
}

/// The runtime's view of one grid VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Shut off, crashed, or gone; `saved` when a managed save image exists.
    Stopped {
        saved: bool,
    },
    Other,
}

/// One grid VM as the runtime reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub name: String,
    pub state: RunState,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Cumulative CPU time, nanoseconds.
    pub cpu_time_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot connect to the runtime at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("grid VM {vm}: {op} failed: {message}")]
    Op {
        vm: String,
        op: &'static str,
        message: String,
    },
    #[error("grid VM {vm} is not known to this agent")]
    NotFound { vm: String },
    #[error("refusing to touch {vm}: it is not a sparegrid VM")]
    NotOurs { vm: String },
    #[error("cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

fn unsupported(vm: &str, op: &'static str, kind: &str) -> RuntimeError {
    RuntimeError::Op {
        vm: vm.to_owned(),
        op,
        message: format!("the {kind} runtime cannot move saved VMs between hosts"),
    }
}

/// One backend that runs grid VMs. Only VMs this agent created (tagged as
/// sparegrid's) are ever listed or touched.
pub trait Runtime: Send {
    /// `libvirt` or `process`.
    fn kind(&self) -> &'static str;
    /// Creates and starts a VM. Returns once the runtime has started it.
    fn launch(&mut self, spec: &VmSpec) -> Result<(), RuntimeError>;
    /// Pauses it: no CPU, memory kept.
    fn suspend(&mut self, name: &str) -> Result<(), RuntimeError>;
    fn resume(&mut self, name: &str) -> Result<(), RuntimeError>;
    /// Stops it at once and removes every trace (definition, save image).
    fn destroy(&mut self, name: &str) -> Result<(), RuntimeError>;
    /// Saves its state to disk and stops it (libvirt managed save).
    fn save(&mut self, name: &str) -> Result<(), RuntimeError>;
    /// Starts it again from a saved state.
    fn restore(&mut self, name: &str) -> Result<(), RuntimeError>;
    fn stats(&mut self, name: &str) -> Result<VmInfo, RuntimeError>;
    /// Every sparegrid VM this runtime holds, for reconciliation at start.
    fn list(&mut self) -> Result<Vec<VmInfo>, RuntimeError>;
    /// A second, independent handle on the same runtime for slow operations
    /// (launch, destroy, save) on a worker thread, so they never hold up a
    /// suspend. `None` when the runtime's operations are fast and its state
    /// lives in this handle (the process runtime).
    fn second_handle(&self) -> Result<Option<Box<dyn Runtime>>, RuntimeError> {
        Ok(None)
    }
    /// True when suspend, save and destroy need the VM's own process to run
    /// (so the daemon lifts the partition's CPU weight for the call).
    fn control_needs_cpu(&self) -> bool {
        false
    }
    /// The host end of VM `name`'s guest channel (a unix socket), when
    /// subtasks run inside this runtime's VMs over it.
    fn guest_channel(&self, _name: &str) -> Option<PathBuf> {
        None
    }
    /// The file holding saved VM `name`'s state (libvirt: its managed save
    /// image), to move it to another host (`reclaim_mode = "migrate"`).
    fn saved_state(&mut self, name: &str) -> Result<PathBuf, RuntimeError> {
        Err(unsupported(name, "saved_state", self.kind()))
    }
    /// Restores a VM from another host's saved state in `file`, as this
    /// host's VM: the saved domain's identity (libvirt keeps its name and
    /// UUID) with this host's paths and owner for `spec`; running and
    /// persistent, so it can be suspended, saved and reclaimed here like
    /// one launched here. `spec.name` must be the saved VM's name.
    fn restore_moved(&mut self, spec: &VmSpec, _file: &Path) -> Result<(), RuntimeError> {
        Err(unsupported(&spec.name, "restore_moved", self.kind()))
    }
    /// True when launches use hardware acceleration (KVM), so a guest that
    /// does not come up may do better under the emulator.
    fn hw_accelerated(&self) -> bool {
        false
    }
}
