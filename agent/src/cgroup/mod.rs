//! The grid partition: a cgroup that holds every grid VM and process with the
//! lowest CPU weight and a memory ceiling, so the kernel yields CPU to the
//! customers within microseconds.
//!
//! One trait, [`Partition`], with a backend per cgroup version behind the
//! [`GridCgroup`] enum (youki's libcgroups style):
//!
//! - v2: `cpu.weight=1`, `cpu.idle=1` where the kernel has it, `memory.max`,
//!   `cgroup.freeze`;
//! - v1: `cpu.shares=2`, `memory.limit_in_bytes`, the freezer controller.
//!
//! The cgroup root is injected so tests run against a fixture tree.

pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};

use crate::sampler::GridUsage;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("no usable cgroup hierarchy under {root}: {message}")]
    Unsupported { root: PathBuf, message: String },
}

/// What the partition's limits are.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionLimits {
    /// Memory ceiling for the whole partition, bytes.
    pub memory_max_bytes: u64,
}

/// What the partition applied, for `check` and status.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppliedPriority {
    /// `cpu.weight=1`, `cpu.idle=1`, `cpu.shares=2`, `memory.max=…` as written.
    pub settings: Vec<String>,
}

/// One cgroup version's grid partition.
pub trait Partition {
    /// `v1` or `v2`.
    fn version(&self) -> &'static str;
    /// Creates the partition and applies the lowest CPU weight and the memory ceiling.
    fn setup(&self, limits: &PartitionLimits) -> Result<AppliedPriority, CgroupError>;
    /// Creates a child group for one grid VM or process.
    fn create_child(&self, name: &str) -> Result<(), CgroupError>;
    /// Removes a child group (it must be empty).
    fn remove_child(&self, name: &str) -> Result<(), CgroupError>;
    /// Moves a process into a child group.
    fn add_pid(&self, name: &str, pid: u32) -> Result<(), CgroupError>;
    /// Freezes or thaws a child group. Returns false if this hierarchy has no freezer.
    fn set_frozen(&self, name: &str, frozen: bool) -> Result<bool, CgroupError>;
    /// Pids in a child group.
    fn pids(&self, name: &str) -> Result<Vec<u32>, CgroupError>;
    /// Cumulative CPU time of a child group, nanoseconds.
    fn child_cpu_ns(&self, name: &str) -> Result<u64, CgroupError>;
    /// The partition's total usage, for subtraction in the sampler.
    fn usage(&self) -> Result<GridUsage, CgroupError>;
    /// The partition's directory for a controller (v1) or the unified tree (v2);
    /// used to place libvirt domains.
    fn path(&self) -> PathBuf;
}

/// The grid partition on whichever cgroup version the host runs.
pub enum GridCgroup {
    V1(v1::V1Partition),
    V2(v2::V2Partition),
}

impl GridCgroup {
    /// Picks the version: `cgroup_root` with `cgroup.controllers` is v2;
    /// one with a `cpu` (or `cpu,cpuacct`) directory is v1.
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
            (CgroupVersion::V1, _) | (CgroupVersion::Auto, false) => {
                Ok(GridCgroup::V1(v1::V1Partition::new(cgroup_root, partition)?))
            }
        }
    }
}
