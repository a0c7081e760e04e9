//! The grid partition: a cgroup that holds every grid VM and process with the
//! lowest CPU weight and a memory ceiling, so the kernel yields CPU to the
//! customers within microseconds.
//!
//! One trait, [`Partition`], with a backend per cgroup version behind the
//! [`GridCgroup`] enum (youki's libcgroups style):
//!
//! - [`v2`]: `<root>/<partition>` with `cpu.weight=1`, `cpu.idle=1` where the
//!   kernel has it, `memory.max`, `cgroup.freeze`, `cgroup.kill`;
//! - [`v1`]: `<root>/<controller>/<partition>` for cpu, cpuacct, memory and
//!   freezer (separate or co-mounted), `cpu.shares=2` (plus `cpu.idle=1`
//!   where the kernel has it), `memory.limit_in_bytes`, `freezer.state`; on a
//!   hybrid host the processes also join `<root>/unified/<partition>/…` for
//!   per-cgroup pressure (PSI), `cgroup.kill` and a freezer fallback.
//!
//! The cgroup root is injected so tests run against a fixture tree. This is
//! also why the backends write the control files themselves instead of going
//! through `cgroups-rs`: cgroups-rs 0.3 finds v1 hierarchies only through
//! `/proc/self/mountinfo` and v2 only at the fixed `/sys/fs/cgroup`, so it can
//! neither run against a fixture root nor reach the v2 tree of a hybrid host
//! (`/sys/fs/cgroup/unified`), and it has no `cpu.idle`.
//!
//! Each child of the partition is one grid VM or process, named after it.
//! Child names are single path components (no `/`, not `.` or `..`).

pub(crate) mod files;
pub mod v1;
pub mod v2;

#[cfg(test)]
pub(crate) mod fixture;

use std::path::{Path, PathBuf};

use crate::sampler::GridUsage;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path}: cannot write {value:?}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cgroup {path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("no usable cgroup hierarchy under {root}: {message}")]
    Unsupported { root: PathBuf, message: String },
    #[error("grid partition {path} does not exist: setup() has not run")]
    NotSetUp { path: PathBuf },
    #[error("cgroup {path}: {message}")]
    Timeout { path: PathBuf, message: String },
    #[error("invalid grid cgroup child name {name:?}: {message}")]
    InvalidName { name: String, message: String },
}

impl CgroupError {
    /// True when the error is about a file or directory that does not exist
    /// (for example a child group that was already removed).
    pub fn is_not_found(&self) -> bool {
        match self {
            CgroupError::Io { source, .. } | CgroupError::Write { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        }
    }
}

/// What the partition's limits are.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionLimits {
    /// Memory ceiling for the whole partition, bytes; 0 means no ceiling.
    pub memory_max_bytes: u64,
}

/// What the partition applied, for `check` and status.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppliedPriority {
    /// `cpu.weight=1`, `cpu.idle=1`, `cpu.shares=2`, `memory.max=…` as written.
    pub settings: Vec<String>,
}

/// One cgroup version's grid partition.
///
/// Every method is blocking file I/O on the cgroup filesystem and cheap
/// (a few small reads or writes); `set_frozen` and `remove_child` may wait a
/// bounded time for the kernel (at most a few seconds).
pub trait Partition: Send + Sync {
    /// `v1` or `v2`.
    fn version(&self) -> &'static str;
    /// The partition's name relative to the cgroup root (of each hierarchy on v1).
    fn name(&self) -> &str;
    /// Creates the partition and applies the lowest CPU weight and the memory
    /// ceiling. Idempotent: running it again re-applies the same settings.
    fn setup(&self, limits: &PartitionLimits) -> Result<AppliedPriority, CgroupError>;
    /// Removes the partition itself (its children must be gone). Tolerates
    /// a partition that is already gone.
    fn remove(&self) -> Result<(), CgroupError>;
    /// Lifts the partition to a normal CPU weight for the few milliseconds a
    /// grid VM needs to obey a control request (libvirt's suspend makes QEMU
    /// process a monitor command, which a starved QEMU does only slowly), or
    /// puts it back to the lowest weight.
    fn set_boost(&self, boosted: bool) -> Result<(), CgroupError>;
    /// Creates a child group for one grid VM or process. Idempotent. Fails
    /// with [`CgroupError::NotSetUp`] when the partition does not exist.
    fn create_child(&self, name: &str) -> Result<(), CgroupError>;
    /// Removes a child group (it must be empty). Tolerates a child that is
    /// already gone.
    fn remove_child(&self, name: &str) -> Result<(), CgroupError>;
    /// Moves a process into a child group.
    fn add_pid(&self, name: &str, pid: u32) -> Result<(), CgroupError>;
    /// The `cgroup.procs` (or v1 `tasks`) files of a child group, one per
    /// hierarchy: a process that writes `0` to each of them has joined the
    /// child. Used to join from a `pre_exec` hook, before the command runs.
    fn procs_files(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError>;
    /// Freezes or thaws a child group and waits (bounded, 2 s) until the
    /// kernel reports it done. Returns false if this hierarchy has no freezer.
    /// A freeze still pending then is left to the kernel and returns true:
    /// tasks not stopped yet are ones that were not scheduled (starved by
    /// the customers' load), and the kernel stops each before it runs user
    /// code again. [`Partition::frozen`] tells when it has completed.
    fn set_frozen(&self, name: &str, frozen: bool) -> Result<bool, CgroupError>;
    /// Whether the kernel reports a child group completely frozen; None if
    /// this hierarchy has no freezer.
    fn frozen(&self, name: &str) -> Result<Option<bool>, CgroupError>;
    /// Sends SIGKILL to every process of a child group through the kernel
    /// (`cgroup.kill`, Linux 5.14+). Returns false if the kernel cannot, and
    /// the caller must signal the [`Partition::pids`] itself.
    fn kill_all(&self, name: &str) -> Result<bool, CgroupError>;
    /// Pids in a child group.
    fn pids(&self, name: &str) -> Result<Vec<u32>, CgroupError>;
    /// Cumulative CPU time of a child group, nanoseconds.
    fn child_cpu_ns(&self, name: &str) -> Result<u64, CgroupError>;
    /// The partition's total usage, for subtraction in the sampler.
    ///
    /// `runnable` is an estimate: the kernel does not expose how many tasks
    /// of a cgroup are runnable, so it is the average number of CPUs the
    /// partition kept busy since the previous call (CPU time delta over wall
    /// time delta, windows shorter than 100 ms reuse the last figure; 0.0 on
    /// the first call). A grid task that is runnable but starved by the
    /// customers counts as 0, so the estimate errs towards a higher customer
    /// load, the cautious side.
    fn usage(&self) -> Result<GridUsage, CgroupError>;
    /// The partition's directory for a controller (v1: the cpu hierarchy) or
    /// the unified tree (v2); used to place libvirt domains.
    fn path(&self) -> PathBuf;
}

/// The grid partition on whichever cgroup version the host runs.
pub enum GridCgroup {
    V1(v1::V1Partition),
    V2(v2::V2Partition),
}

impl GridCgroup {
    /// Picks the version: `cgroup_root` with `cgroup.controllers` is v2;
    /// one with a `cpu` (or `cpu,cpuacct`) directory is v1. A hybrid host
    /// (a tmpfs root with v1 controllers and v2 at `unified/`) is v1.
    pub fn detect(
        cgroup_root: &Path,
        partition: &str,
        version: crate::config::CgroupVersion,
    ) -> Result<GridCgroup, CgroupError> {
        use crate::config::CgroupVersion;
        let is_v2 = cgroup_root.join("cgroup.controllers").exists();
        match (version, is_v2) {
            (CgroupVersion::V2, _) | (CgroupVersion::Auto, true) => {
                Ok(GridCgroup::V2(v2::V2Partition::new(cgroup_root, partition)))
            }
            (CgroupVersion::V1, _) | (CgroupVersion::Auto, false) => Ok(GridCgroup::V1(
                v1::V1Partition::new(cgroup_root, partition)?,
            )),
        }
    }

    /// The backend as a trait object.
    pub fn as_partition(&self) -> &dyn Partition {
        match self {
            GridCgroup::V1(p) => p,
            GridCgroup::V2(p) => p,
        }
    }
}

/// Checks that a child name is one path component.
pub(crate) fn check_child_name(name: &str) -> Result<(), CgroupError> {
    let bad = |message: &str| {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
            message: message.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name == "." || name == ".." {
        return bad("not a directory name");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("must not contain '/' or NUL");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CgroupVersion;

    #[test]
    fn detect_picks_v2_on_a_unified_root() {
        let fx = fixture::v2_tree();
        let g = GridCgroup::detect(fx.root(), "grid", CgroupVersion::Auto).unwrap();
        assert_eq!(g.as_partition().version(), "v2");
        assert_eq!(g.as_partition().name(), "grid");
        assert_eq!(g.as_partition().path(), fx.root().join("grid"));
    }

    #[test]
    fn detect_picks_v1_on_a_controller_tree_and_on_hybrid() {
        let fx = fixture::v1_tree(fixture::V1Layout::Separate);
        let g = GridCgroup::detect(fx.root(), "grid", CgroupVersion::Auto).unwrap();
        assert_eq!(g.as_partition().version(), "v1");
        let fx = fixture::v1_tree(fixture::V1Layout::Hybrid);
        let g = GridCgroup::detect(fx.root(), "grid", CgroupVersion::Auto).unwrap();
        assert_eq!(g.as_partition().version(), "v1");
    }

    #[test]
    fn forced_v1_on_a_v2_root_is_unsupported_and_names_the_root() {
        let fx = fixture::v2_tree();
        let err = GridCgroup::detect(fx.root(), "grid", CgroupVersion::V1)
            .err()
            .expect("v1 on a v2 root must fail");
        let msg = err.to_string();
        assert!(matches!(err, CgroupError::Unsupported { .. }), "{msg}");
        assert!(msg.contains(&fx.root().display().to_string()), "{msg}");
    }

    #[test]
    fn child_names_are_single_components() {
        for ok in ["sg-host-1", "a.b", "x_y"] {
            check_child_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0"] {
            assert!(
                matches!(check_child_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn not_found_is_recognised() {
        let e = CgroupError::Io {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(e.is_not_found());
        let e = CgroupError::NotSetUp { path: "/x".into() };
        assert!(!e.is_not_found());
    }
}
