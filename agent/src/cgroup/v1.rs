//! cgroup v1 backend of the grid partition: one directory per controller
//! hierarchy, `<root>/<mount>/<partition>/<child>`, for cpu (`cpu.shares=2`,
//! plus `cpu.idle=1` where the kernel has it, 5.15+), cpuacct
//! (`cpuacct.usage`), memory (`memory.limit_in_bytes`,
//! `memory.usage_in_bytes`) and freezer (`freezer.state`).
//!
//! Hierarchies are found under the injected root by directory name, so both
//! layouts work: separate mounts (`cpu/`, `cpuacct/`) and co-mounted ones
//! (`cpu,cpuacct/`, usually with `cpu` and `cpuacct` symlinks). Paths are
//! canonicalised so a co-mounted hierarchy is written once. The cpu
//! hierarchy is required; cpuacct, memory and freezer are used when present.
//!
//! Hybrid hosts (systemd's layout: v1 controllers plus a v2 tree at
//! `<root>/unified`) also get `<root>/unified/<partition>/<child>`: the
//! processes join it too, which gives per-cgroup pressure (`cpu.pressure`,
//! reported as `cpu_stall_us`), `cgroup.kill`, and a freezer when the v1
//! freezer is not mounted.
//!
//! Control files are written directly rather than through cgroups-rs: see
//! the module header of [`crate::cgroup`].

use std::path::{Path, PathBuf};

use super::files::{self, CpuRate};
use super::v2::{apply_lowest_cpu, frozen_v2, kill_v2, psi_cpu_some, set_frozen_v2};
use super::{check_child_name, AppliedPriority, CgroupError, Partition, PartitionLimits};
use crate::sampler::GridUsage;

pub struct V1Partition {
    root: PathBuf,
    name: String,
    /// Mount directories (canonical) of the hierarchies used.
    cpu: PathBuf,
    cpuacct: Option<PathBuf>,
    memory: Option<PathBuf>,
    freezer: Option<PathBuf>,
    /// The v2 tree of a hybrid host.
    unified: Option<PathBuf>,
    rate: CpuRate,
}

/// The mount directory of a v1 controller under `root`: `root/<controller>`
/// (a directory or a symlink to a co-mount) or any `root/a,b,…` directory
/// naming it, canonicalised.
fn find_mount(root: &Path, controller: &str) -> Result<Option<PathBuf>, CgroupError> {
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(|e| files::io_err(p, e));
    let direct = root.join(controller);
    if direct.is_dir() {
        return canon(&direct).map(Some);
    }
    let entries = std::fs::read_dir(root).map_err(|e| files::io_err(root, e))?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.split(',').any(|c| c == controller))
        })
        .filter(|p| p.is_dir())
        .collect();
    names.sort();
    names.first().map(|p| canon(p)).transpose()
}

impl V1Partition {
    /// The partition `name` (a relative path) in each v1 hierarchy mounted
    /// under `root`. Finds the hierarchies but touches nothing until `setup`;
    /// fails when there is no cpu hierarchy.
    pub fn new(root: &Path, name: &str) -> Result<V1Partition, CgroupError> {
        let unsupported = |message: &str| CgroupError::Unsupported {
            root: root.to_path_buf(),
            message: message.to_string(),
        };
        if !root.is_dir() {
            return Err(unsupported("not a directory"));
        }
        let cpu = find_mount(root, "cpu")?.ok_or_else(|| {
            unsupported("no cgroup v1 cpu hierarchy (neither cpu/ nor a cpu,… directory)")
        })?;
        let unified = root.join("unified");
        Ok(V1Partition {
            root: root.to_path_buf(),
            name: name.to_string(),
            cpu,
            cpuacct: find_mount(root, "cpuacct")?,
            memory: find_mount(root, "memory")?,
            freezer: find_mount(root, "freezer")?,
            unified: unified
                .join("cgroup.controllers")
                .exists()
                .then_some(unified),
            rate: CpuRate::default(),
        })
    }

    /// The cgroup root this partition was found under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every distinct v1 hierarchy used (a co-mount appears once).
    fn v1_mounts(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = vec![&self.cpu];
        for m in [&self.cpuacct, &self.memory, &self.freezer]
            .into_iter()
            .flatten()
        {
            if !out.contains(&m.as_path()) {
                out.push(m);
            }
        }
        out
    }

    /// The v1 hierarchies plus the unified tree of a hybrid host.
    fn all_mounts(&self) -> Vec<&Path> {
        let mut out = self.v1_mounts();
        out.extend(self.unified.as_deref());
        out
    }

    fn part_in(&self, mount: &Path) -> PathBuf {
        mount.join(&self.name)
    }

    fn child_in(&self, mount: &Path, name: &str) -> PathBuf {
        mount.join(&self.name).join(name)
    }

    /// A child's directory in `mount`, which must exist.
    fn existing_child_in(&self, mount: &Path, name: &str) -> Result<PathBuf, CgroupError> {
        check_child_name(name)?;
        let dir = self.child_in(mount, name);
        if !dir.is_dir() {
            return Err(files::io_err(
                &dir,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Ok(dir)
    }

    /// `cgroup.procs`, or `tasks` on kernels whose hierarchy lacks it.
    fn procs_file(dir: &Path) -> PathBuf {
        let procs = dir.join("cgroup.procs");
        if procs.exists() || !dir.join("tasks").exists() {
            procs
        } else {
            dir.join("tasks")
        }
    }

    /// Cumulative CPU time of the group at `rel` (relative to each mount):
    /// cpuacct.usage, or the unified tree's cpu.stat on a hybrid host.
    fn cpu_ns_at(&self, rel: &Path) -> Result<u64, CgroupError> {
        if let Some(acct) = &self.cpuacct {
            let dir = acct.join(rel);
            if !dir.is_dir() {
                return Err(missing(&dir));
            }
            return files::read_u64(&dir.join("cpuacct.usage"));
        }
        if let Some(unified) = &self.unified {
            let path = unified.join(rel).join("cpu.stat");
            let content = files::read(&path)?;
            return Ok(files::flat_keyed(&path, &content, "usage_usec")?.saturating_mul(1000));
        }
        Err(CgroupError::Unsupported {
            root: self.root.clone(),
            message: "no cpuacct hierarchy and no unified tree: CPU time is not accounted".into(),
        })
    }
}

fn missing(path: &Path) -> CgroupError {
    files::io_err(path, std::io::Error::from(std::io::ErrorKind::NotFound))
}

impl Partition for V1Partition {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_boost(&self, boosted: bool) -> Result<(), CgroupError> {
        super::v2::set_cpu_boost(&self.part_in(&self.cpu), "cpu.shares", "2", "1024", boosted)
    }

    fn setup(&self, limits: &PartitionLimits) -> Result<AppliedPriority, CgroupError> {
        for m in self.all_mounts() {
            files::mkdir(&self.part_in(m))?;
        }
        let mut settings = Vec::new();

        if let Some(mem) = &self.memory {
            let dir = self.part_in(mem);
            // Kernels before 5.x may run a hierarchy flat; the ceiling only
            // covers the children when the partition is hierarchical, which
            // can only be switched on while it has no children.
            let hier = dir.join("memory.use_hierarchy");
            if files::read_opt(&hier)?.as_deref().map(str::trim) == Some("0") {
                if let Err(e) = files::write(&hier, "1") {
                    tracing::warn!(error = %e, "memory ceiling may not cover grid children");
                }
            }
        }

        apply_lowest_cpu(&self.part_in(&self.cpu), "cpu.shares", "2", &mut settings)?;

        match &self.memory {
            Some(mem) => {
                let value = match limits.memory_max_bytes {
                    0 => "-1".to_string(),
                    n => n.to_string(),
                };
                files::write(&self.part_in(mem).join("memory.limit_in_bytes"), &value)?;
                settings.push(format!("memory.limit_in_bytes={value}"));
            }
            None => tracing::warn!(
                root = %self.root.display(),
                "no v1 memory hierarchy: the grid partition has no memory ceiling"
            ),
        }
        tracing::info!(path = %self.path().display(), ?settings, "grid cgroup v1 partition ready");
        Ok(AppliedPriority { settings })
    }

    fn remove(&self) -> Result<(), CgroupError> {
        for m in self.all_mounts() {
            files::rmdir(&self.part_in(m))?;
        }
        Ok(())
    }

    fn create_child(&self, name: &str) -> Result<(), CgroupError> {
        check_child_name(name)?;
        for m in self.all_mounts() {
            let part = self.part_in(m);
            if !part.is_dir() {
                return Err(CgroupError::NotSetUp { path: part });
            }
        }
        for m in self.all_mounts() {
            files::mkdir(&self.child_in(m, name))?;
        }
        Ok(())
    }

    fn remove_child(&self, name: &str) -> Result<(), CgroupError> {
        check_child_name(name)?;
        for m in self.all_mounts() {
            files::rmdir(&self.child_in(m, name))?;
        }
        Ok(())
    }

    fn add_pid(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        for m in self.all_mounts() {
            let dir = self.existing_child_in(m, name)?;
            files::write(&Self::procs_file(&dir), &pid.to_string())?;
        }
        Ok(())
    }

    fn procs_files(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
        check_child_name(name)?;
        Ok(self
            .all_mounts()
            .into_iter()
            .map(|m| Self::procs_file(&self.child_in(m, name)))
            .collect())
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<bool, CgroupError> {
        let Some(freezer) = &self.freezer else {
            // No v1 freezer: the unified tree's core freezer, if any.
            return match &self.unified {
                Some(u) => set_frozen_v2(&self.existing_child_in(u, name)?, frozen),
                None => {
                    self.existing_child_in(&self.cpu, name)?;
                    Ok(false)
                }
            };
        };
        let state = self.existing_child_in(freezer, name)?.join("freezer.state");
        let want = if frozen { "FROZEN" } else { "THAWED" };
        files::write(&state, want)?;
        // A freeze reads FREEZING until every task has stopped; writing
        // FROZEN again retries tasks that could not be frozen at first
        // (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst).
        let done = files::poll_until(files::FREEZE_WAIT, || {
            if files::read(&state)?.trim() == want {
                return Ok(Some(()));
            }
            files::write(&state, want)?;
            Ok(None)
        })?;
        files::freeze_outcome(done, frozen, &state, "THAWED")
    }

    fn frozen(&self, name: &str) -> Result<Option<bool>, CgroupError> {
        match (&self.freezer, &self.unified) {
            (Some(freezer), _) => {
                let state = self.existing_child_in(freezer, name)?.join("freezer.state");
                Ok(Some(files::read(&state)?.trim() == "FROZEN"))
            }
            (None, Some(u)) => {
                let dir = self.existing_child_in(u, name)?;
                if !dir.join("cgroup.freeze").exists() {
                    return Ok(None);
                }
                frozen_v2(&dir.join("cgroup.events"))
            }
            (None, None) => {
                self.existing_child_in(&self.cpu, name)?;
                Ok(None)
            }
        }
    }

    fn kill_all(&self, name: &str) -> Result<bool, CgroupError> {
        match &self.unified {
            Some(u) => kill_v2(&self.existing_child_in(u, name)?),
            None => Ok(false),
        }
    }

    fn pids(&self, name: &str) -> Result<Vec<u32>, CgroupError> {
        let path = Self::procs_file(&self.existing_child_in(&self.cpu, name)?);
        files::parse_pids(&path, &files::read(&path)?)
    }

    fn child_cpu_ns(&self, name: &str) -> Result<u64, CgroupError> {
        check_child_name(name)?;
        self.cpu_ns_at(&Path::new(&self.name).join(name))
    }

    fn usage(&self) -> Result<GridUsage, CgroupError> {
        let part = self.part_in(&self.cpu);
        if !part.is_dir() {
            return Err(CgroupError::NotSetUp { path: part });
        }
        let cpu_ns = self.cpu_ns_at(Path::new(&self.name))?;
        let memory_bytes = match &self.memory {
            Some(m) => files::read_u64(&self.part_in(m).join("memory.usage_in_bytes"))?,
            None => 0,
        };
        let cpu_stall_us = match &self.unified {
            Some(u) if self.part_in(u).is_dir() => psi_cpu_some(&self.part_in(u))?,
            _ => None,
        };
        Ok(GridUsage {
            cpu_ns,
            memory_bytes,
            cpu_stall_us,
            runnable: self.rate.update(cpu_ns),
        })
    }

    fn path(&self) -> PathBuf {
        self.part_in(&self.cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::fixture::{self, read_trim, V1Layout};

    fn limits(mib: u64) -> PartitionLimits {
        PartitionLimits {
            memory_max_bytes: mib * 1024 * 1024,
        }
    }

    #[test]
    fn boost_lifts_to_normal_shares_and_restores_the_lowest() {
        let fx = fixture::v1_tree(V1Layout::Separate);
        fx.v1_group("grid");
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        p.setup(&limits(256)).unwrap();
        let cpu = fx.root().join("cpu/grid");
        p.set_boost(true).unwrap();
        assert_eq!(read_trim(&cpu.join("cpu.shares")), "1024");
        assert_eq!(read_trim(&cpu.join("cpu.idle")), "0");
        p.set_boost(false).unwrap();
        assert_eq!(read_trim(&cpu.join("cpu.shares")), "2");
        assert_eq!(read_trim(&cpu.join("cpu.idle")), "1");
    }

    #[test]
    fn setup_writes_shares_idle_and_memory_limit() {
        let fx = fixture::v1_tree(V1Layout::Separate);
        fx.v1_group("grid");
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        let applied = p.setup(&limits(256)).unwrap();
        let cpu = fx.root().join("cpu/grid");
        assert_eq!(read_trim(&cpu.join("cpu.shares")), "2");
        assert_eq!(read_trim(&cpu.join("cpu.idle")), "1");
        assert_eq!(
            read_trim(&fx.root().join("memory/grid/memory.limit_in_bytes")),
            "268435456"
        );
        assert_eq!(
            applied.settings,
            vec![
                "cpu.shares=2",
                "cpu.idle=1",
                "memory.limit_in_bytes=268435456"
            ]
        );
        assert_eq!(p.path(), cpu);
    }

    #[test]
    fn setup_creates_every_hierarchy_and_is_idempotent() {
        let fx = fixture::v1_tree(V1Layout::Hybrid);
        // No pre-created files: setup makes the directories itself, then fails
        // on the first missing control file, naming it.
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        let err = p.setup(&limits(64)).unwrap_err();
        assert!(err.to_string().contains("cpu/grid/cpu.shares"), "{err}");
        for m in ["cpu", "cpuacct", "memory", "freezer", "unified"] {
            assert!(fx.root().join(m).join("grid").is_dir(), "{m}");
        }
        fx.v1_group("grid");
        let first = p.setup(&limits(64)).unwrap();
        let second = p.setup(&limits(64)).unwrap();
        assert_eq!(first, second);
        assert_eq!(read_trim(&fx.root().join("cpu/grid/cpu.shares")), "2");
        assert_eq!(read_trim(&fx.root().join("cpu/grid/cpu.idle")), "1");
    }

    #[test]
    fn old_kernel_without_cpu_idle_gets_shares_only_and_flat_memory_is_fixed() {
        let fx = fixture::v1_tree(V1Layout::Separate);
        fx.v1_group("grid");
        std::fs::remove_file(fx.root().join("cpu/grid/cpu.idle")).unwrap();
        std::fs::write(fx.root().join("memory/grid/memory.use_hierarchy"), "0\n").unwrap();
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        let applied = p.setup(&limits(0)).unwrap();
        assert_eq!(
            applied.settings,
            vec!["cpu.shares=2", "memory.limit_in_bytes=-1"]
        );
        assert_eq!(
            read_trim(&fx.root().join("memory/grid/memory.use_hierarchy")),
            "1"
        );
    }

    #[test]
    fn co_mounted_cpu_cpuacct_with_and_without_symlinks() {
        for layout in [V1Layout::CoMounted, V1Layout::CoMountedNoLinks] {
            let fx = fixture::v1_tree(layout);
            fx.v1_group("grid");
            let p = V1Partition::new(fx.root(), "grid").unwrap();
            p.setup(&limits(64)).unwrap();
            let co = fx.root().join("cpu,cpuacct/grid");
            assert_eq!(p.path(), co, "{layout:?}");
            assert_eq!(read_trim(&co.join("cpu.shares")), "2");

            let child = fx.v1_group("grid/vm1");
            p.create_child("vm1").unwrap();
            // One procs file per distinct hierarchy: cpu,cpuacct + memory + freezer.
            let files = p.procs_files("vm1").unwrap();
            assert_eq!(files.len(), 3, "{layout:?}: {files:?}");
            assert_eq!(files[0], co.join("vm1/cgroup.procs"));
            p.add_pid("vm1", 77).unwrap();
            assert_eq!(p.pids("vm1").unwrap(), vec![77]);
            assert_eq!(
                read_trim(&fx.root().join("memory/grid/vm1/cgroup.procs")),
                "77"
            );
            std::fs::write(co.join("vm1/cpuacct.usage"), "987654321\n").unwrap();
            assert_eq!(p.child_cpu_ns("vm1").unwrap(), 987_654_321);
            drop(child);
        }
    }

    #[test]
    fn children_freeze_usage_and_pids_separate_mounts() {
        let fx = fixture::v1_tree(V1Layout::Separate);
        fx.v1_group("grid");
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        p.setup(&limits(64)).unwrap();
        fx.v1_group("grid/vm1");
        p.create_child("vm1").unwrap();
        p.create_child("vm1").unwrap();

        p.add_pid("vm1", 4242).unwrap();
        for m in ["cpu", "cpuacct", "memory", "freezer"] {
            let f = fx.root().join(m).join("grid/vm1/cgroup.procs");
            assert_eq!(read_trim(&f), "4242", "{m}");
        }
        assert_eq!(p.pids("vm1").unwrap(), vec![4242]);

        let state = fx.root().join("freezer/grid/vm1/freezer.state");
        assert_eq!(p.frozen("vm1").unwrap(), Some(false));
        assert!(p.set_frozen("vm1", true).unwrap());
        assert_eq!(read_trim(&state), "FROZEN");
        assert_eq!(p.frozen("vm1").unwrap(), Some(true));
        assert!(p.set_frozen("vm1", false).unwrap());
        assert_eq!(read_trim(&state), "THAWED");
        // No unified tree: no cgroup.kill, no PSI.
        assert!(!p.kill_all("vm1").unwrap());

        std::fs::write(fx.root().join("cpuacct/grid/vm1/cpuacct.usage"), "5000\n").unwrap();
        assert_eq!(p.child_cpu_ns("vm1").unwrap(), 5000);
        std::fs::write(fx.root().join("cpuacct/grid/cpuacct.usage"), "7000\n").unwrap();
        let u = p.usage().unwrap();
        assert_eq!(u.cpu_ns, 7000);
        assert_eq!(u.memory_bytes, 1_048_576);
        assert_eq!(u.cpu_stall_us, None);
        assert_eq!(u.runnable, 0.0);

        p.remove_child("vm1").unwrap_err(); // fixture files make the dirs non-empty
    }

    #[test]
    fn hybrid_joins_unified_for_psi_and_kill() {
        let fx = fixture::v1_tree(V1Layout::Hybrid);
        fx.v1_group("grid");
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        p.setup(&limits(64)).unwrap();
        fx.v1_group("grid/vm1");
        p.create_child("vm1").unwrap();
        let files = p.procs_files("vm1").unwrap();
        assert_eq!(files.len(), 5, "{files:?}");
        assert_eq!(
            files.last().unwrap(),
            &fx.root().join("unified/grid/vm1/cgroup.procs")
        );
        p.add_pid("vm1", 9).unwrap();
        assert_eq!(
            read_trim(&fx.root().join("unified/grid/vm1/cgroup.procs")),
            "9"
        );
        assert!(p.kill_all("vm1").unwrap());
        assert_eq!(
            read_trim(&fx.root().join("unified/grid/vm1/cgroup.kill")),
            "1"
        );
        assert_eq!(p.usage().unwrap().cpu_stall_us, Some(11_179_951));
    }

    #[test]
    fn without_v1_freezer_hybrid_uses_the_unified_freezer_else_reports_none() {
        let fx = fixture::v1_tree(V1Layout::NoFreezer);
        fx.v1_group("grid");
        fx.v1_group("grid/vm1");
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        assert!(!p.set_frozen("vm1", true).unwrap());
        assert_eq!(p.frozen("vm1").unwrap(), None);
        assert!(p.set_frozen("ghost", true).unwrap_err().is_not_found());

        let fx = fixture::v1_tree(V1Layout::HybridNoFreezer);
        fx.v1_group("grid");
        fx.v1_group("grid/vm1");
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        let unified = fx.root().join("unified/grid/vm1");
        std::fs::write(unified.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        assert!(p.set_frozen("vm1", true).unwrap());
        assert_eq!(read_trim(&unified.join("cgroup.freeze")), "1");
        assert_eq!(p.frozen("vm1").unwrap(), Some(true));
    }

    #[test]
    fn no_cpu_hierarchy_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        let err = V1Partition::new(dir.path(), "grid").err().unwrap();
        assert!(matches!(err, CgroupError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("cpu"), "{err}");
    }

    #[test]
    fn missing_partition_and_child_errors() {
        let fx = fixture::v1_tree(V1Layout::Separate);
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        let err = p.create_child("vm1").unwrap_err();
        assert!(matches!(err, CgroupError::NotSetUp { .. }), "{err}");
        assert!(matches!(p.usage(), Err(CgroupError::NotSetUp { .. })));
        fx.v1_group("grid");
        let err = p.add_pid("ghost", 1).unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("grid/ghost"), "{err}");
        assert!(p.child_cpu_ns("ghost").unwrap_err().is_not_found());
        p.remove_child("ghost").unwrap();
        assert!(matches!(
            p.remove_child(".."),
            Err(CgroupError::InvalidName { .. })
        ));
    }

    #[test]
    fn remove_child_and_partition_tolerate_already_gone() {
        let fx = fixture::v1_tree(V1Layout::Hybrid);
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        for m in ["cpu", "cpuacct", "memory", "freezer", "unified"] {
            std::fs::create_dir(fx.root().join(m).join("grid")).unwrap();
        }
        p.create_child("vm1").unwrap();
        p.remove_child("vm1").unwrap();
        p.remove_child("vm1").unwrap();
        p.remove().unwrap();
        p.remove().unwrap();
        assert!(!fx.root().join("cpu/grid").exists());
    }

    /// Real kernel, whatever v1 layout the host has: partition with a unique
    /// name, a busy child in it, CPU time grows, stops while frozen, grows
    /// after the thaw; then everything is removed.
    #[test]
    fn root_v1_partition_on_real_host() {
        if !fixture::is_root() {
            eprintln!("skipping root_v1_partition_on_real_host: needs root");
            return;
        }
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            eprintln!("skipping root_v1_partition_on_real_host: the host runs cgroup v2 only");
            return;
        }
        let name = fixture::unique_name("v1");
        let p = match V1Partition::new(root, &name) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipping root_v1_partition_on_real_host: {e}");
                return;
            }
        };
        let _cleanup = fixture::Cleanup::new(&p);
        let applied = p.setup(&limits(256)).unwrap();
        assert!(applied.settings.contains(&"cpu.shares=2".to_string()));
        let cpu = p.path();
        if cpu.join("cpu.idle").exists() {
            assert_eq!(read_trim(&cpu.join("cpu.idle")), "1");
            assert!(applied.settings.contains(&"cpu.idle=1".to_string()));
        } else {
            assert_eq!(read_trim(&cpu.join("cpu.shares")), "2");
        }
        if let Some(mem) = &p.memory {
            assert_eq!(
                read_trim(&p.part_in(mem).join("memory.limit_in_bytes")),
                (256u64 << 20).to_string()
            );
        }
        // Idempotent on the real kernel too (cpu.idle=1 blocks share writes).
        assert_eq!(p.setup(&limits(256)).unwrap(), applied);
        fixture::busy_child_freeze_thaw_kill(&p);
        let u = p.usage().unwrap();
        assert!(u.cpu_ns > 0);
        if p.unified.is_some() {
            assert!(
                u.cpu_stall_us.is_some(),
                "hybrid host: PSI per cgroup expected"
            );
        }
    }
}
