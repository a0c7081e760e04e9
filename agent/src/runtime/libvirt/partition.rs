//! The libvirt resource partition of grid domains on hosts without systemd:
//! where libvirt puts it ([`libvirt_partition_dir`]) and creating it before
//! the first launch ([`prepare_partition`]).
//!
//! What libvirt 9.0 does (verified against a real libvirtd on a hybrid
//! cgroup v1 host without systemd):
//!
//! - a partition path gets `.partition` appended to every component without
//!   a dot, except a top-level `machine`, `system` or `user`: `/sparegrid`
//!   lives at `<controller>/sparegrid.partition`, each domain below it at
//!   `sparegrid.partition/qemu-<id>-<name>.libvirt-qemu` (vCPU and emulator
//!   threads in child groups);
//! - libvirt creates only `/machine` by itself. Any other partition must
//!   already exist in every hierarchy libvirt binds — on that host `cpu`,
//!   `cpuset`, `memory`, `freezer` and the hybrid `unified` tree (start fails
//!   with "Failed to create v1 controller cpu for group" or "Failed to create
//!   v2 cgroup …" otherwise) — and a new v1 `cpuset` group needs
//!   `cpuset.cpus`/`cpuset.mems` filled in or QEMU's threads cannot join
//!   ("No space left on device");
//! - `<cputune><shares>` lands on the domain's own group, which competes only
//!   with its siblings inside the partition, so the partition itself needs
//!   the lowest weight too;
//! - with `cpu.idle=1` on the partition, QEMU itself runs at idle priority:
//!   on that 2-CPU host with three busy loops in the root group, `launch`
//!   (QEMU start-up and libvirt's monitor handshake) took 130 s instead of
//!   0.4 s. That is the point, but it blocks the caller that long.
//!
//! With systemd (machined), partitions are slices that systemd creates on
//! demand; nothing here is needed then.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Where libvirt puts a `<resource><partition>` in a cgroup v1 controller
/// (or the v2 tree) on a host without systemd, relative to that controller's
/// mount: libvirt appends `.partition` to each component without a dot,
/// except a top-level `machine`, `system` or `user`. `/sparegrid` →
/// `sparegrid.partition`; `/machine/grid` → `machine/grid.partition`.
/// (libvirt also prefixes `_` to components that start with `_` or `.` or
/// are named like a controller; such names are not supported here.)
pub fn libvirt_partition_dir(partition: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for (i, part) in partition.split('/').filter(|p| !p.is_empty()).enumerate() {
        let fixed = i == 0 && matches!(part, "machine" | "system" | "user");
        if fixed || part.contains('.') {
            out.push(part);
        } else {
            out.push(format!("{part}.partition"));
        }
    }
    out
}

/// What [`prepare_partition`] did, for logs and `check`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreparedPartition {
    /// Every partition directory, one per hierarchy.
    pub dirs: Vec<PathBuf>,
    /// Settings written, as `path=value`.
    pub settings: Vec<String>,
}

/// A failed step: the file and the I/O error.
#[derive(Debug, thiserror::Error)]
#[error("libvirt partition {path}: {source}")]
pub struct PartitionError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PartitionError + '_ {
    move |source| PartitionError {
        path: path.to_path_buf(),
        source,
    }
}

/// Hierarchies under `cgroup_root` libvirt may bind: every mounted v1
/// hierarchy (a directory with `cgroup.procs`) except the named `systemd`
/// one, plus `unified` on a hybrid host; or the root itself on pure v2.
/// Returns (directory, is_v2).
fn hierarchies(cgroup_root: &Path) -> Result<Vec<(PathBuf, bool)>, PartitionError> {
    if cgroup_root.join("cgroup.controllers").exists() {
        return Ok(vec![(cgroup_root.to_path_buf(), true)]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(cgroup_root).map_err(io_err(cgroup_root))? {
        let entry = entry.map_err(io_err(cgroup_root))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "systemd" || !path.join("cgroup.procs").exists() {
            continue;
        }
        // Co-mounted controllers show up as `cpu,cpuacct` plus symlinks
        // `cpu` and `cpuacct`; take the real directory once.
        if entry.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
            continue;
        }
        let is_v2 = path.join("cgroup.controllers").exists();
        out.push((path, is_v2));
    }
    out.sort();
    Ok(out)
}

fn write(path: &Path, value: &str, settings: &mut Vec<String>) -> Result<(), PartitionError> {
    std::fs::write(path, value).map_err(io_err(path))?;
    settings.push(format!("{}={value}", path.display()));
    Ok(())
}

/// Copies a v1 cpuset file from the parent when the new group's is empty.
fn inherit(dir: &Path, file: &str, settings: &mut Vec<String>) -> Result<(), PartitionError> {
    let own = dir.join(file);
    let current = std::fs::read_to_string(&own).map_err(io_err(&own))?;
    if !current.trim().is_empty() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(dir).join(file);
    let value = std::fs::read_to_string(&parent).map_err(io_err(&parent))?;
    write(&own, value.trim(), settings)
}

/// Creates libvirt's partition directory for `partition` (an absolute
/// libvirt partition path such as `/sparegrid`) in every hierarchy under
/// `cgroup_root`, fills in a v1 cpuset, and gives the partition the lowest
/// CPU weight (v1 `cpu.shares=2`, v2 `cpu.weight=1`, `cpu.idle=1` where the
/// kernel has it) and, when given, a memory ceiling in bytes (v1
/// `memory.limit_in_bytes`, v2 `memory.max`). Idempotent. On v2 it enables
/// `cpu` and `memory` for the parent's children first (best effort).
///
/// Does nothing at all for partitions under libvirt's own top-level
/// `machine`, `system` or `user`: libvirt creates `/machine` itself, and on
/// a hypervisor host the customers' VMs live there — they must not get the
/// grid's lowest weight.
pub fn prepare_partition(
    cgroup_root: &Path,
    partition: &str,
    memory_max_bytes: Option<u64>,
) -> Result<PreparedPartition, PartitionError> {
    let mut done = PreparedPartition::default();
    let top = partition.split('/').find(|p| !p.is_empty()).unwrap_or("");
    if matches!(top, "" | "machine" | "system" | "user") {
        return Ok(done);
    }
    let rel = libvirt_partition_dir(partition);
    for (hier, is_v2) in hierarchies(cgroup_root)? {
        let dir = hier.join(&rel);
        if is_v2 {
            // Each level needs cpu/memory enabled by its parent before the
            // child can have them; errors (controller not available, as on
            // a hybrid host's hugetlb-only tree) are fine.
            let mut level = hier.clone();
            for comp in rel.components() {
                let available =
                    std::fs::read_to_string(level.join("cgroup.controllers")).unwrap_or_default();
                for ctrl in ["cpu", "memory"] {
                    if available.split_whitespace().any(|c| c == ctrl) {
                        let _ = std::fs::write(
                            level.join("cgroup.subtree_control"),
                            format!("+{ctrl}"),
                        );
                    }
                }
                level.push(comp);
                match std::fs::create_dir(&level) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(&level)(e)),
                }
            }
        } else {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let s = &mut done.settings;
        if dir.join("cpuset.cpus").exists() {
            // Ancestors first: each inherits from its own parent.
            let mut level = hier.clone();
            for comp in rel.components() {
                level.push(comp);
                inherit(&level, "cpuset.cpus", s)?;
                inherit(&level, "cpuset.mems", s)?;
            }
        }
        // The kernel refuses weight writes (EINVAL) to a group that is
        // already idle, so the weight goes first and only while not idle.
        let idle = dir.join("cpu.idle");
        let already_idle = std::fs::read_to_string(&idle).is_ok_and(|v| v.trim() == "1");
        if !already_idle {
            if dir.join("cpu.shares").exists() {
                write(&dir.join("cpu.shares"), "2", s)?;
            }
            if dir.join("cpu.weight").exists() {
                write(&dir.join("cpu.weight"), "1", s)?;
            }
            if idle.exists() {
                write(&idle, "1", s)?;
            }
        }
        if let Some(bytes) = memory_max_bytes.filter(|b| *b > 0) {
            if dir.join("memory.limit_in_bytes").exists() {
                write(&dir.join("memory.limit_in_bytes"), &bytes.to_string(), s)?;
            }
            if dir.join("memory.max").exists() {
                write(&dir.join("memory.max"), &bytes.to_string(), s)?;
            }
        }
        done.dirs.push(dir);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn partition_dirs_follow_libvirt_naming() {
        assert_eq!(
            libvirt_partition_dir("/sparegrid"),
            PathBuf::from("sparegrid.partition")
        );
        assert_eq!(libvirt_partition_dir("/machine"), PathBuf::from("machine"));
        assert_eq!(
            libvirt_partition_dir("/machine/grid"),
            PathBuf::from("machine/grid.partition")
        );
        assert_eq!(
            libvirt_partition_dir("/grid.slice"),
            PathBuf::from("grid.slice")
        );
        assert_eq!(
            libvirt_partition_dir("/a/machine"),
            PathBuf::from("a.partition/machine.partition")
        );
    }

    /// A hybrid v1 fixture like the test host: separate cpu, cpuset, memory,
    /// freezer, named systemd and a unified tree. Files a kernel would
    /// create in new groups are created here by hand after the fact.
    fn hybrid(root: &Path) {
        for c in ["cpu", "cpuset", "memory", "freezer", "systemd", "unified"] {
            fs::create_dir_all(root.join(c)).unwrap();
            fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        fs::write(root.join("cpuset/cpuset.cpus"), "0-3\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        fs::write(root.join("unified/cgroup.subtree_control"), "").unwrap();
    }

    fn kernel_files(root: &Path, rel: &str) {
        fs::write(root.join("cpu").join(rel).join("cpu.shares"), "1024").unwrap();
        fs::write(root.join("cpu").join(rel).join("cpu.idle"), "0").unwrap();
        fs::write(root.join("cpuset").join(rel).join("cpuset.cpus"), "").unwrap();
        fs::write(root.join("cpuset").join(rel).join("cpuset.mems"), "").unwrap();
        fs::write(
            root.join("memory").join(rel).join("memory.limit_in_bytes"),
            "max",
        )
        .unwrap();
    }

    #[test]
    fn creates_partition_in_every_hierarchy_but_systemd() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        hybrid(root);
        let p = prepare_partition(root, "/sparegrid", None).unwrap();
        let dirs: Vec<_> = p
            .dirs
            .iter()
            .map(|d| d.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "cpu/sparegrid.partition",
                "cpuset/sparegrid.partition",
                "freezer/sparegrid.partition",
                "memory/sparegrid.partition",
                "unified/sparegrid.partition"
            ]
        );
        assert!(!root.join("systemd/sparegrid.partition").exists());
        // Now the "kernel" files exist: weights, cpuset and memory apply.
        kernel_files(root, "sparegrid.partition");
        let p = prepare_partition(root, "/sparegrid", Some(1 << 30)).unwrap();
        let read = |f: &str| fs::read_to_string(root.join(f)).unwrap();
        assert_eq!(read("cpu/sparegrid.partition/cpu.shares"), "2");
        assert_eq!(read("cpu/sparegrid.partition/cpu.idle"), "1");
        assert_eq!(read("cpuset/sparegrid.partition/cpuset.cpus"), "0-3");
        assert_eq!(read("cpuset/sparegrid.partition/cpuset.mems"), "0");
        assert_eq!(
            read("memory/sparegrid.partition/memory.limit_in_bytes"),
            "1073741824"
        );
        assert_eq!(p.settings.len(), 5, "{:?}", p.settings);
        // Idempotent, a filled cpuset is left alone, and an idle group's
        // weight is not written again (the kernel would refuse).
        fs::write(root.join("cpuset/sparegrid.partition/cpuset.cpus"), "1").unwrap();
        fs::write(root.join("cpu/sparegrid.partition/cpu.shares"), "3").unwrap();
        prepare_partition(root, "/sparegrid", None).unwrap();
        assert_eq!(read("cpuset/sparegrid.partition/cpuset.cpus"), "1");
        assert_eq!(read("cpu/sparegrid.partition/cpu.shares"), "3");
    }

    #[test]
    fn libvirts_own_top_level_partitions_are_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        hybrid(root);
        for p in ["/machine", "/machine/grid", "/system", "/user", "/", ""] {
            assert_eq!(
                prepare_partition(root, p, Some(1)).unwrap(),
                PreparedPartition::default()
            );
        }
        assert!(!root.join("cpu/machine").exists());
    }

    #[test]
    fn pure_v2_uses_the_root_and_enables_controllers() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let p = prepare_partition(root, "/sparegrid", Some(4096)).unwrap();
        assert_eq!(p.dirs, [root.join("sparegrid.partition")]);
        // A fixture file keeps the last write: the memory enable.
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        let d = root.join("sparegrid.partition");
        for f in ["cpu.weight", "cpu.idle", "memory.max"] {
            fs::write(d.join(f), "").unwrap();
        }
        prepare_partition(root, "/sparegrid", Some(4096)).unwrap();
        assert_eq!(fs::read_to_string(d.join("cpu.weight")).unwrap(), "1");
        assert_eq!(fs::read_to_string(d.join("cpu.idle")).unwrap(), "1");
        assert_eq!(fs::read_to_string(d.join("memory.max")).unwrap(), "4096");
    }

    #[test]
    fn comounted_controllers_are_created_once() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("cpu,cpuacct")).unwrap();
        fs::write(root.join("cpu,cpuacct/cgroup.procs"), "").unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpuacct")).unwrap();
        let p = prepare_partition(root, "/grid/vms", None).unwrap();
        assert_eq!(
            p.dirs,
            [root.join("cpu,cpuacct/grid.partition/vms.partition")]
        );
        assert!(root.join("cpu/grid.partition/vms.partition").is_dir());
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let err =
            prepare_partition(Path::new("/nonexistent/cgroup"), "/sparegrid", None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cgroup"), "{err}");
    }
}
