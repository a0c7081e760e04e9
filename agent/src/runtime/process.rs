//! Process runtime: each grid "VM" is a host process running `spec.command`
//! in its own child group `<partition>/<spec.name>` of the grid cgroup, for
//! hosts without libvirt and for fast tests.
//!
//! - launch: the child joins its cgroup in a `pre_exec` hook (it writes `0`
//!   to the child group's `cgroup.procs` in every hierarchy) before it execs,
//!   so none of the command's work ever runs outside the partition. It leads
//!   its own process group; stdin is /dev/null, stdout and stderr are the
//!   agent's.
//! - suspend/resume: the cgroup freezer; where the hierarchy has none,
//!   SIGSTOP/SIGCONT to the process group.
//! - destroy: SIGKILL to the process group and to everything left in the
//!   child group (`cgroup.kill` where the kernel has it), thaw so a v1-frozen
//!   group can die, reap, then remove the child group.
//! - save/restore: not supported (a host process has no state image).
//! - stats: Running/Paused, or Stopped once the command (the group leader)
//!   has exited; CPU time from the child group.
//!
//! The runtime knows only the processes it launched: it cannot adopt
//! processes across an agent restart, so `list` starts empty. A child group
//! that still holds processes (left by an agent that crashed) is refused at
//! launch rather than touched. Dropping the runtime kills every process it
//! launched and removes their groups.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{RunState, Runtime, RuntimeError, VmInfo, VmSpec};
use crate::cgroup::{CgroupError, GridCgroup, Partition};

/// How long destroy waits for the killed processes to leave the child group.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Grid VMs as host processes in the grid cgroup.
pub struct ProcessRuntime {
    cgroup: Arc<GridCgroup>,
    vms: BTreeMap<String, ProcVm>,
}

struct ProcVm {
    child: Child,
    vcpus: u32,
    memory_mib: u64,
    paused: Option<PausedBy>,
    exited: Option<ExitStatus>,
    /// Last CPU time read, kept for stats once the group is gone.
    cpu_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PausedBy {
    Freezer,
    Signal,
}

impl ProcVm {
    fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Reaps the command if it has exited (non-blocking).
    fn refresh(&mut self) {
        if self.exited.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                self.paused = None;
            }
        }
    }
}

fn op(vm: &str, op: &'static str, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Op {
        vm: vm.to_string(),
        op,
        message: message.into(),
    }
}

/// Pids in a child group; a group that is already gone has none.
fn pids_or_none(part: &dyn Partition, name: &str) -> Result<Vec<u32>, CgroupError> {
    match part.pids(name) {
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        other => other,
    }
}

impl ProcessRuntime {
    /// A runtime that places its processes under the grid partition. The
    /// partition must have been set up (`Partition::setup`); the runtime
    /// creates and removes only its children. Takes a `GridCgroup` or an
    /// `Arc` of one shared with the sampler.
    pub fn new(cgroup: impl Into<Arc<GridCgroup>>) -> ProcessRuntime {
        ProcessRuntime {
            cgroup: cgroup.into(),
            vms: BTreeMap::new(),
        }
    }

    /// The grid cgroup the processes live in.
    pub fn cgroup(&self) -> &Arc<GridCgroup> {
        &self.cgroup
    }

    /// The pid (and process group id) of a launched VM's command.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.vms.get(name).map(|vm| vm.child.id())
    }

    fn vm(&mut self, name: &str) -> Result<&mut ProcVm, RuntimeError> {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| RuntimeError::NotFound {
                vm: name.to_string(),
            })?;
        vm.refresh();
        Ok(vm)
    }

    fn info(part: &dyn Partition, name: &str, vm: &mut ProcVm) -> Result<VmInfo, RuntimeError> {
        vm.refresh();
        match part.child_cpu_ns(name) {
            Ok(ns) => vm.cpu_ns = ns,
            // A stopped VM's group may be gone; keep the last reading.
            Err(_) if vm.exited.is_some() => {}
            Err(e) => return Err(e.into()),
        }
        let state = match (vm.exited, vm.paused) {
            (Some(_), _) => RunState::Stopped { saved: false },
            (None, Some(_)) => RunState::Paused,
            (None, None) => RunState::Running,
        };
        Ok(VmInfo {
            name: name.to_string(),
            state,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            cpu_time_ns: vm.cpu_ns,
        })
    }

    /// Kills everything of one VM, reaps its command and removes its child
    /// group. Safe to call again after a partial failure.
    fn kill_and_remove(
        part: &dyn Partition,
        name: &str,
        vm: &mut ProcVm,
    ) -> Result<(), RuntimeError> {
        vm.refresh();
        if vm.exited.is_none() {
            // The leader is not reaped, so its pid still names this group.
            match killpg(vm.pgid(), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(op(
                        name,
                        "destroy",
                        format!("SIGKILL to process group: {e}"),
                    ))
                }
            }
        }
        let by_kernel = match part.kill_all(name) {
            Ok(k) => k,
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(e.into()),
        };
        // v1-frozen tasks die only once thawed; SIGSTOPped ones die anyway.
        match part.set_frozen(name, false) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        vm.paused = None;
        let me = std::process::id();
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let left = pids_or_none(part, name)?;
            if !by_kernel {
                // Processes that left the process group (setsid) but not the cgroup.
                for pid in left.iter().copied().filter(|&p| p > 1 && p != me) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
            vm.refresh();
            if vm.exited.is_some() && left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(op(
                    name,
                    "destroy",
                    format!(
                        "still alive {KILL_TIMEOUT:?} after SIGKILL: command {}, group pids {left:?}",
                        if vm.exited.is_some() { "reaped" } else { "not reaped" }
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        part.remove_child(name)?;
        Ok(())
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn launch(&mut self, spec: &VmSpec) -> Result<(), RuntimeError> {
        let name = spec.name.as_str();
        if self.vms.contains_key(name) {
            return Err(op(name, "launch", "already launched by this runtime"));
        }
        let Some((program, args)) = spec.command.split_first() else {
            return Err(op(name, "launch", "the process runtime needs a command"));
        };
        let part = self.cgroup.as_partition();
        part.create_child(name)?;
        let leftover = part.pids(name)?;
        if !leftover.is_empty() {
            return Err(op(
                name,
                "launch",
                format!(
                    "child group {} already holds processes {leftover:?} (left by an earlier agent?); \
                     refusing to touch them",
                    part.path().join(name).display()
                ),
            ));
        }
        let mut files = Vec::new();
        for path in part.procs_files(name)? {
            if !path.exists() {
                let _ = part.remove_child(name);
                return Err(CgroupError::Io {
                    path,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }
                .into());
            }
            files.push(CString::new(path.as_os_str().as_bytes()).map_err(|_| {
                op(
                    name,
                    "launch",
                    format!("cgroup path {} contains NUL", path.display()),
                )
            })?);
        }

        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        // SAFETY: the hook only calls open/write/close on paths prepared
        // above; it neither allocates nor takes locks.
        unsafe {
            cmd.pre_exec(move || crate::cgroup::files::join_in_child(&files));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = part.remove_child(name);
                return Err(op(
                    name,
                    "launch",
                    format!("cannot start {:?} in its cgroup: {e}", spec.command),
                ));
            }
        };
        tracing::info!(vm = name, pid = child.id(), "process VM launched");
        self.vms.insert(
            name.to_string(),
            ProcVm {
                child,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                paused: None,
                exited: None,
                cpu_ns: 0,
            },
        );
        Ok(())
    }

    fn suspend(&mut self, name: &str) -> Result<(), RuntimeError> {
        let cgroup = Arc::clone(&self.cgroup);
        let vm = self.vm(name)?;
        if vm.exited.is_some() {
            return Err(op(name, "suspend", "the command has exited"));
        }
        if vm.paused.is_some() {
            return Ok(());
        }
        vm.paused = Some(if cgroup.as_partition().set_frozen(name, true)? {
            PausedBy::Freezer
        } else {
            killpg(vm.pgid(), Signal::SIGSTOP)
                .map_err(|e| op(name, "suspend", format!("SIGSTOP to process group: {e}")))?;
            PausedBy::Signal
        });
        tracing::info!(vm = name, by = ?vm.paused, "process VM suspended");
        Ok(())
    }

    fn resume(&mut self, name: &str) -> Result<(), RuntimeError> {
        let cgroup = Arc::clone(&self.cgroup);
        let vm = self.vm(name)?;
        if vm.exited.is_some() {
            return Err(op(name, "resume", "the command has exited"));
        }
        match vm.paused {
            None => return Ok(()),
            Some(PausedBy::Freezer) => {
                cgroup.as_partition().set_frozen(name, false)?;
            }
            Some(PausedBy::Signal) => killpg(vm.pgid(), Signal::SIGCONT)
                .map_err(|e| op(name, "resume", format!("SIGCONT to process group: {e}")))?,
        }
        vm.paused = None;
        tracing::info!(vm = name, "process VM resumed");
        Ok(())
    }

    fn destroy(&mut self, name: &str) -> Result<(), RuntimeError> {
        let cgroup = Arc::clone(&self.cgroup);
        let vm = self.vm(name)?;
        Self::kill_and_remove(cgroup.as_partition(), name, vm)?;
        self.vms.remove(name);
        tracing::info!(vm = name, "process VM destroyed");
        Ok(())
    }

    fn save(&mut self, name: &str) -> Result<(), RuntimeError> {
        Err(op(
            name,
            "save",
            "not supported by the process runtime: a host process has no state image \
             (destroy it and run the subtask again instead)",
        ))
    }

    fn restore(&mut self, name: &str) -> Result<(), RuntimeError> {
        Err(op(
            name,
            "restore",
            "not supported by the process runtime: a host process has no state image",
        ))
    }

    fn stats(&mut self, name: &str) -> Result<VmInfo, RuntimeError> {
        let cgroup = Arc::clone(&self.cgroup);
        let vm = self.vm(name)?;
        Self::info(cgroup.as_partition(), name, vm)
    }

    /// The VMs this runtime launched since it was created (it cannot adopt
    /// processes across agent restarts).
    fn list(&mut self) -> Result<Vec<VmInfo>, RuntimeError> {
        let part = self.cgroup.as_partition();
        self.vms
            .iter_mut()
            .map(|(name, vm)| Self::info(part, name, vm))
            .collect()
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        let part = self.cgroup.as_partition();
        for (name, vm) in self.vms.iter_mut() {
            if let Err(e) = Self::kill_and_remove(part, name, vm) {
                tracing::warn!(vm = %name, error = %e, "could not clean up process VM");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::fixture::{self, read_trim, wait_for, V1Layout, GROW_TIMEOUT};
    use crate::cgroup::v1::V1Partition;
    use std::path::{Path, PathBuf};

    fn spec(name: &str, script: &str) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            vcpus: 1,
            memory_mib: 64,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            cmdline: String::new(),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            force_tcg: false,
        }
    }

    /// A VM running `argv` directly (no shell: a shell that vforks can sit
    /// in the kernel waiting for a stopped child, which hides its own T state).
    fn direct(name: &str, argv: &[&str]) -> VmSpec {
        VmSpec {
            command: argv.iter().map(|a| a.to_string()).collect(),
            force_tcg: false,
            ..spec(name, "")
        }
    }

    /// State letter of /proc/<pid>/stat (R, S, T, Z, …).
    fn proc_state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')')
            .next()
            .and_then(|s| s.trim_start().chars().next())
            .unwrap_or('?')
    }

    fn alive(pid: u32) -> bool {
        kill(Pid::from_raw(pid as i32), None).is_ok()
    }

    /// A fixture v1 tree whose partition and child `name` exist with the
    /// kernel's files (the fixture cannot create them on mkdir as cgroupfs does).
    fn fixture_runtime(layout: V1Layout, name: &str) -> (fixture::Fixture, ProcessRuntime) {
        let fx = fixture::v1_tree(layout);
        fx.v1_group("grid");
        fx.v1_group(&format!("grid/{name}"));
        let p = V1Partition::new(fx.root(), "grid").unwrap();
        let rt = ProcessRuntime::new(GridCgroup::V1(p));
        (fx, rt)
    }

    /// Empties the fixture's child dirs, as cgroupfs would on rmdir.
    fn clear_child_files(root: &Path, name: &str) {
        for m in std::fs::read_dir(root).unwrap().filter_map(Result::ok) {
            let dir = m.path().join("grid").join(name);
            if dir.is_dir() && !m.path().is_symlink() {
                for f in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
                    std::fs::remove_file(f.path()).unwrap();
                }
            }
        }
    }

    #[test]
    fn launch_joins_every_hierarchy_before_exec_and_sigstop_without_freezer() {
        let (fx, mut rt) = fixture_runtime(V1Layout::NoFreezer, "vm1");
        rt.launch(&direct("vm1", &["sleep", "60"])).unwrap();
        let pid = rt.pid("vm1").unwrap();
        // The pre_exec hook wrote "0" (itself) to each procs file.
        for m in ["cpu", "cpuacct", "memory"] {
            let f = fx.root().join(m).join("grid/vm1/cgroup.procs");
            assert_eq!(read_trim(&f), "0", "{m}");
        }
        // Own process group.
        assert_eq!(
            nix::unistd::getpgid(Some(Pid::from_raw(pid as i32))).unwrap(),
            Pid::from_raw(pid as i32)
        );
        std::fs::write(fx.root().join("cpuacct/grid/vm1/cpuacct.usage"), "4242\n").unwrap();
        let info = rt.stats("vm1").unwrap();
        assert_eq!(info.state, RunState::Running);
        assert_eq!(info.cpu_time_ns, 4242);
        assert_eq!((info.vcpus, info.memory_mib), (1, 64));

        // No freezer in this tree: SIGSTOP to the group.
        rt.suspend("vm1").unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || proc_state(pid) == 'T'),
            "state {} wchan {}",
            proc_state(pid),
            std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
        );
        assert_eq!(rt.stats("vm1").unwrap().state, RunState::Paused);
        rt.resume("vm1").unwrap();
        assert!(wait_for(Duration::from_secs(10), || proc_state(pid) != 'T'));
        assert_eq!(rt.stats("vm1").unwrap().state, RunState::Running);

        assert_eq!(rt.list().unwrap().len(), 1);
        clear_child_files(fx.root(), "vm1");
        rt.destroy("vm1").unwrap();
        assert!(!alive(pid) || proc_state(pid) == 'Z');
        assert!(rt.list().unwrap().is_empty());
        for m in ["cpu", "cpuacct", "memory"] {
            assert!(!fx.root().join(m).join("grid/vm1").exists(), "{m}");
        }
        assert!(matches!(
            rt.stats("vm1"),
            Err(RuntimeError::NotFound { .. })
        ));
    }

    #[test]
    fn suspend_uses_the_freezer_when_there_is_one() {
        let (fx, mut rt) = fixture_runtime(V1Layout::Separate, "vm1");
        rt.launch(&direct("vm1", &["sleep", "60"])).unwrap();
        let pid = rt.pid("vm1").unwrap();
        rt.suspend("vm1").unwrap();
        rt.suspend("vm1").unwrap();
        let state = fx.root().join("freezer/grid/vm1/freezer.state");
        assert_eq!(read_trim(&state), "FROZEN");
        // Not SIGSTOPped: the fixture freezer does not really freeze.
        std::thread::sleep(Duration::from_millis(50));
        assert_ne!(proc_state(pid), 'T');
        assert_eq!(rt.stats("vm1").unwrap().state, RunState::Paused);
        rt.resume("vm1").unwrap();
        assert_eq!(read_trim(&state), "THAWED");
        clear_child_files(fx.root(), "vm1");
        drop(rt);
        // Drop killed and reaped the process and removed its groups.
        assert!(!alive(pid));
        assert!(!fx.root().join("cpu/grid/vm1").exists());
    }

    #[test]
    fn exited_command_shows_stopped() {
        let (_fx, mut rt) = fixture_runtime(V1Layout::Separate, "vm1");
        rt.launch(&spec("vm1", "exit 3")).unwrap();
        assert!(wait_for(Duration::from_secs(5), || {
            rt.stats("vm1").unwrap().state == RunState::Stopped { saved: false }
        }));
        let err = rt.suspend("vm1").unwrap_err().to_string();
        assert!(err.contains("exited"), "{err}");
    }

    #[test]
    fn launch_errors_are_clear() {
        let (fx, mut rt) = fixture_runtime(V1Layout::Separate, "vm1");
        rt.launch(&spec("vm1", "sleep 60")).unwrap();
        let err = rt.launch(&spec("vm1", "true")).unwrap_err().to_string();
        assert!(err.contains("already launched"), "{err}");

        let mut bad = spec("vm2", "true");
        bad.command = vec!["/nonexistent/program".into()];
        fx.v1_group("grid/vm2");
        let err = rt.launch(&bad).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/program"), "{err}");
        assert!(rt.pid("vm2").is_none());

        bad.command.clear();
        let err = rt.launch(&bad).unwrap_err().to_string();
        assert!(err.contains("needs a command"), "{err}");

        // A child group without procs files (not set up by "the kernel").
        let err = rt.launch(&spec("vm3", "true")).unwrap_err().to_string();
        assert!(err.contains("grid/vm3/cgroup.procs"), "{err}");

        // Leftovers from an earlier agent are refused, not touched.
        fx.v1_group("grid/vm4");
        std::fs::write(fx.root().join("cpu/grid/vm4/cgroup.procs"), "999999\n").unwrap();
        let err = rt.launch(&spec("vm4", "true")).unwrap_err().to_string();
        assert!(err.contains("999999") && err.contains("refusing"), "{err}");

        assert!(matches!(
            rt.launch(&spec("../x", "true")),
            Err(RuntimeError::Cgroup(CgroupError::InvalidName { .. }))
        ));
        clear_child_files(fx.root(), "vm1");
    }

    #[test]
    fn save_and_restore_are_not_supported() {
        let (_fx, mut rt) = fixture_runtime(V1Layout::Separate, "vm1");
        for err in [rt.save("vm1").unwrap_err(), rt.restore("vm1").unwrap_err()] {
            let msg = err.to_string();
            assert!(matches!(err, RuntimeError::Op { .. }), "{msg}");
            assert!(
                msg.contains("not supported by the process runtime"),
                "{msg}"
            );
        }
        assert_eq!(rt.kind(), "process");
        assert!(matches!(
            rt.suspend("ghost"),
            Err(RuntimeError::NotFound { .. })
        ));
    }

    /// The full cycle on a real partition: busy loop, CPU grows, suspend
    /// stops it, resume restarts it, destroy removes process and group; a
    /// command that exits shows Stopped.
    fn real_cycle(cgroup: GridCgroup) {
        let cgroup = Arc::new(cgroup);
        let _cleanup = fixture::Cleanup::new(cgroup.as_partition());
        let mut rt = ProcessRuntime::new(Arc::clone(&cgroup));
        let part = cgroup.as_partition();

        rt.launch(&spec("busy", "while :; do :; done")).unwrap();
        let pid = rt.pid("busy").unwrap();
        // In the group from the first instruction on.
        assert_eq!(part.pids("busy").unwrap(), vec![pid]);
        let c0 = rt.stats("busy").unwrap().cpu_time_ns;
        assert!(
            wait_for(GROW_TIMEOUT, || rt.stats("busy").unwrap().cpu_time_ns
                > c0 + 20_000_000),
            "no CPU time in {GROW_TIMEOUT:?}"
        );

        rt.suspend("busy").unwrap();
        // A starved task may take a while to reach the freezer.
        assert!(wait_for(GROW_TIMEOUT, || part.frozen("busy").unwrap() == Some(true)));
        let s0 = rt.stats("busy").unwrap();
        assert_eq!(s0.state, RunState::Paused);
        std::thread::sleep(Duration::from_millis(400));
        let s1 = rt.stats("busy").unwrap();
        assert_eq!(
            s0.cpu_time_ns, s1.cpu_time_ns,
            "CPU time grew while suspended"
        );

        rt.resume("busy").unwrap();
        assert_eq!(rt.stats("busy").unwrap().state, RunState::Running);
        assert!(
            wait_for(GROW_TIMEOUT, || rt.stats("busy").unwrap().cpu_time_ns
                > s1.cpu_time_ns),
            "no CPU time after resume"
        );

        // Destroy while suspended: the frozen process must still die.
        rt.suspend("busy").unwrap();
        rt.destroy("busy").unwrap();
        assert!(!alive(pid));
        assert!(!part.path().join("busy").exists());
        assert!(rt.list().unwrap().is_empty());

        rt.launch(&spec("brief", "exit 0")).unwrap();
        assert!(wait_for(Duration::from_secs(10), || {
            rt.stats("brief").unwrap().state == RunState::Stopped { saved: false }
        }));
        rt.destroy("brief").unwrap();
        assert!(!part.path().join("brief").exists());

        // Drop cleans up what is left.
        rt.launch(&spec("left", "sleep 60")).unwrap();
        let left = rt.pid("left").unwrap();
        drop(rt);
        assert!(!alive(left));
        assert!(!part.path().join("left").exists());
    }

    #[test]
    fn root_process_runtime_on_real_host() {
        if let Some(cgroup) = fixture::real_partition("root_process_runtime_on_real_host", "proc") {
            real_cycle(cgroup);
        }
    }

    /// The same on the real unified hierarchy of a hybrid host (controllers
    /// stay with v1 there, so the partition directory is made by hand): the
    /// v2 freezer, cpu.stat and cgroup.kill paths of the runtime.
    #[test]
    fn root_process_runtime_on_real_unified_tree() {
        if let Some(cgroup) =
            fixture::real_unified_partition("root_process_runtime_on_real_unified_tree", "proc-v2")
        {
            real_cycle(cgroup);
        }
    }
}
