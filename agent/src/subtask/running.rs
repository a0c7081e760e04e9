//! One started subtask attempt: its process (group), child cgroup, stream
//! threads, pause state and timeout, up to the [`Completion`] it ends with.
//!
//! - The timeout counts time not suspended: a subtask frozen because the
//!   customers came back does not time out for it (the controller's
//!   `withdraw_after` rule handles subtasks suspended too long). A
//!   `timeout_ms` of 0 means no limit. The timeout is checked whenever
//!   [`RunningSubtask::try_wait`] or [`RunningSubtask::wait`] runs, so the
//!   owner must poll (the daemon's control loop does).
//! - When the command (the process group leader) has exited, it is left a
//!   zombie while the rest of its process group and child cgroup are killed
//!   (the zombie keeps the group id from being reused), then reaped; the
//!   subtask ends with its leader, and whatever it left behind is killed.
//! - `duration_ms` is wall time from spawn to reap, suspensions included.
//! - Until its I/O thread has reported the spawn (see the module docs of
//!   [`super`]), a subtask is pending: `try_wait` returns None without
//!   waiting, while `pid`, `suspend`, `cancel` and drop wait for the report
//!   (a spawn takes milliseconds).
//! - A grid namespace ([`Attachment`]) is held until the subtask has
//!   ended and its processes are gone, then dropped (torn down).

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};

use super::capture::{self, Captured, Drain, Reader};
use super::{cgroup_name, label, Activity, Executor, SubtaskError, BASE_PATH};
use crate::cgroup::{CgroupError, GridCgroup, Partition};
use crate::overlay::Attachment;
use sparegrid_proto::overlay::Network;

/// How long the end of a subtask waits for its processes to leave the
/// child cgroup after SIGKILL before giving up on removing it.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a subtask waits for its output pipes to close after
/// every process of it was killed.
const READER_GRACE: Duration = Duration::from_secs(1);
/// Longest sleep between polls in [`RunningSubtask::wait`].
const MAX_POLL: Duration = Duration::from_millis(20);
/// Working directory and `HOME` of every subtask.
const WORKDIR: &str = "/tmp";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PausedBy {
    Freezer,
    Signal,
}

struct Proc {
    child: Child,
    stdout: Option<Reader>,
    stderr: Option<Reader>,
}

/// One subtask attempt started by [`Executor::start`]. Dropping it before it
/// has completed kills it and removes its cgroup.
pub struct RunningSubtask {
    attempt: AttemptRef,
    host: String,
    /// The partition and child group name while the child group exists.
    group: Option<(Arc<GridCgroup>, String)>,
    /// The executor's groups in use; this one's name is released with it.
    in_use: Arc<Mutex<HashSet<String>>>,
    /// The command while it is not reaped; None after that or if it never
    /// started.
    proc_: Option<Proc>,
    /// Until the I/O thread has reported the spawn.
    pending: Option<Pending>,
    pid: Option<u32>,
    started: Instant,
    timeout: Option<Duration>,
    paused: Option<(PausedBy, Instant)>,
    paused_total: Duration,
    error: Option<String>,
    done: Option<Completion>,
    /// The grid namespace (`network = overlay`) until the subtask has ended.
    net: Option<Attachment>,
}

fn op(a: &AttemptRef, op: &'static str, message: impl Into<String>) -> SubtaskError {
    SubtaskError::Op {
        subtask: label(a),
        op,
        message: message.into(),
    }
}

fn cg(a: &AttemptRef) -> impl FnOnce(CgroupError) -> SubtaskError + '_ {
    move |source| SubtaskError::Cgroup {
        subtask: label(a),
        source,
    }
}

/// Why the assignment cannot be spawned as given, if it cannot.
fn check_input(a: &Assignment) -> Result<(), String> {
    if a.argv.is_empty() {
        return Err("empty argv".into());
    }
    if a.argv[0].is_empty() {
        return Err("empty program name (argv[0])".into());
    }
    if let Some(i) = a.argv.iter().position(|s| s.contains('\0')) {
        return Err(format!("argv[{i}] contains a NUL byte"));
    }
    for (k, v) in &a.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("invalid environment variable name {k:?}"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} contains a NUL byte"));
        }
    }
    Ok(())
}

/// Runs in the forked child before exec: enters the grid namespace if
/// there is one, raises its OOM score (best effort) and joins the child
/// group in every hierarchy by writing "0" (the writer itself) to each
/// procs file. Only async-signal-safe calls (setns, open, write, close), no
/// allocation.
fn pre_exec_hook(oom: &CString, files: &[CString], netns: Option<RawFd>) -> std::io::Result<()> {
    if let Some(fd) = netns {
        // SAFETY: setns takes a descriptor and a flag; `fd` is open (the
        // parent keeps it until the spawn has returned).
        if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Failing to raise the OOM score is not worth failing the subtask.
    let _ = crate::cgroup::files::write_in_child(oom, b"1000");
    crate::cgroup::files::join_in_child(files)
}

/// Whether child `pid` has exited, without reaping it (`WNOWAIT`).
fn exited_unreaped(pid: u32) -> std::io::Result<bool> {
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid out-pointer; waitid has no other preconditions.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // With WNOHANG, si_pid stays 0 while the child runs.
            // SAFETY: waitid filled `info` (or left it zeroed).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Pids in a child group; a group that is already gone has none.
fn pids_or_none(part: &dyn Partition, name: &str) -> Result<Vec<u32>, CgroupError> {
    match part.pids(name) {
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        other => other,
    }
}

pub(super) fn start(
    ex: &Executor,
    a: &Assignment,
    net: Option<Attachment>,
) -> Result<RunningSubtask, SubtaskError> {
    let at = &a.attempt;
    let mut rs = RunningSubtask {
        attempt: at.clone(),
        host: ex.host.clone(),
        group: None,
        in_use: Arc::clone(&ex.in_use),
        proc_: None,
        pending: None,
        pid: None,
        started: Instant::now(),
        timeout: (a.timeout_ms > 0).then(|| Duration::from_millis(a.timeout_ms)),
        paused: None,
        paused_total: Duration::ZERO,
        error: None,
        done: None,
        net,
    };
    if let Err(msg) = check_input(a) {
        rs.error = Some(format!("spawn failed: {msg}"));
        return Ok(rs);
    }
    if a.network == Network::Overlay && rs.net.is_none() {
        rs.error = Some(
            "spawn failed: network = overlay, but the subtask was started without a grid namespace"
                .into(),
        );
        return Ok(rs);
    }
    // Opened here (close-on-exec) and entered in the child before exec.
    let netns = match rs.net.as_ref().map(|n| (n.open_netns(), n.netns_path())) {
        None => None,
        Some((Ok(f), _)) => Some(f),
        Some((Err(e), path)) => {
            rs.error = Some(format!(
                "spawn failed: cannot open the grid namespace {}: {e}",
                path.display()
            ));
            return Ok(rs);
        }
    };
    let net_env: Vec<(&str, String)> = rs.net.iter().flat_map(|n| n.env()).collect();

    let mut files = Vec::new();
    if let Some(cgroup) = &ex.cgroup {
        let name = cgroup_name(at);
        let part = cgroup.as_partition();
        let busy = |pids| SubtaskError::Busy {
            subtask: label(at),
            group: part.path().join(&name).display().to_string(),
            pids,
        };
        if !lock(&ex.in_use).insert(name.clone()) {
            return Err(busy(Vec::new()));
        }
        let checked = part
            .create_child(&name)
            .and_then(|()| part.pids(&name))
            .map_err(cg(at))
            .and_then(|pids| {
                if pids.is_empty() {
                    Ok(())
                } else {
                    Err(busy(pids))
                }
            });
        if let Err(e) = checked {
            lock(&ex.in_use).remove(&name);
            return Err(e);
        }
        // From here on, dropping `rs` removes the group and releases the name.
        rs.group = Some((Arc::clone(cgroup), name.clone()));
        for path in part.procs_files(&name).map_err(cg(at))? {
            if !path.exists() {
                return Err(cg(at)(CgroupError::Io {
                    path,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }));
            }
            let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
                op(
                    at,
                    "start",
                    format!("cgroup path {} contains NUL", path.display()),
                )
            })?;
            files.push(c);
        }
    }
    let oom = CString::new("/proc/self/oom_score_adj").expect("literal without NUL");

    let mut cmd = Command::new(&a.argv[0]);
    cmd.args(&a.argv[1..])
        .env_clear()
        .env("PATH", BASE_PATH)
        .env("HOME", WORKDIR)
        .env("TMPDIR", WORKDIR)
        .env("LANG", "C")
        .env("SPAREGRID_JOB", &at.job)
        .env("SPAREGRID_INDEX", at.index.to_string())
        .env("SPAREGRID_EPOCH", at.epoch.to_string())
        .envs(net_env)
        .envs(&a.env)
        .current_dir(WORKDIR)
        .process_group(0)
        .stdin(if a.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the hook only calls open/write/close on paths prepared above;
    // it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || pre_exec_hook(&oom, &files, netns.as_ref().map(|f| f.as_raw_fd())));
    }
    // The command is spawned on its I/O thread, not here: joining the child
    // cgroups before exec makes the kernel migrate the process, which often
    // waits for an RCU grace period (11 ms on average on the benchmark host,
    // against 0.5 ms for a spawn without cgroups), and `spawn` waits for the
    // exec. Starting many subtasks one after another would add those waits
    // up on the caller's thread; on I/O threads they overlap.
    let cap = ex.limits.output_cap_bytes;
    let spill = ex
        .limits
        .spill_dir
        .as_deref()
        .and_then(|d| super::spill_path(d, at))
        .map(|path| capture::Spill {
            path,
            max: ex.limits.max_output_bytes,
        });
    let (stdout, out_drain) = capture::pair(cap, spill);
    let (stderr, err_drain) = capture::pair(cap, None);
    let launch = Arc::new(Launch::default());
    let io = IoThread {
        cmd,
        argv0: a.argv[0].clone(),
        stdin: a.stdin.clone(),
        index: at.index,
        out_drain,
        err_drain,
        launch: Arc::clone(&launch),
        activity: Arc::clone(&ex.activity),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("st-io-{}", at.index))
        .spawn(move || io.run());
    if let Err(e) = spawned {
        rs.error = Some(format!("spawn failed: cannot start an I/O thread: {e}"));
        rs.remove_group();
        return Ok(rs);
    }
    rs.pending = Some(Pending {
        launch,
        stdout,
        stderr,
    });
    Ok(rs)
}

/// What the I/O thread reports once the command was spawned or not.
enum Launched {
    /// Running; with an error when a stream thread could not be made (the
    /// owner then kills it).
    Running(Child, Option<String>),
    Failed(String),
}

/// Where the I/O thread puts [`Launched`] for the owner.
#[derive(Default)]
struct Launch {
    slot: Mutex<Option<Launched>>,
    cv: Condvar,
}

impl Launch {
    fn put(&self, l: Launched) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(l);
        self.cv.notify_all();
    }

    /// Waits until the I/O thread has reported.
    fn wait(&self) -> MutexGuard<'_, Option<Launched>> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        while slot.is_none() {
            slot = self.cv.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
        slot
    }
}

/// A subtask whose I/O thread has not reported the spawn yet.
struct Pending {
    launch: Arc<Launch>,
    stdout: Reader,
    stderr: Reader,
}

/// The subtask's I/O thread: spawns the command, feeds stdin (own thread),
/// drains stderr (own thread) and stdout (this one), waits for the command
/// to exit and tells the executor's [`Activity`].
struct IoThread {
    cmd: Command,
    argv0: String,
    stdin: Vec<u8>,
    index: u64,
    out_drain: Drain,
    err_drain: Drain,
    launch: Arc<Launch>,
    activity: Arc<Activity>,
}

impl IoThread {
    fn run(mut self) {
        let mut child = match self.cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.launch.put(Launched::Failed(format!(
                    "spawn failed: cannot start {:?}: {e}",
                    self.argv0
                )));
                self.activity.notify();
                return;
            }
        };
        // Opened while the command cannot have been reaped (the owner gets
        // the Child below), so it names this process and no later one.
        let exit_fd = pidfd_open(child.id());
        let mut thread_error = None;
        if let Some(mut stdin) = child.stdin.take() {
            let data = std::mem::take(&mut self.stdin);
            let spawned = std::thread::Builder::new()
                .name(format!("st-stdin-{}", self.index))
                .spawn(move || {
                    // EPIPE when the command does not read all of it is fine.
                    let _ = stdin.write_all(&data);
                });
            if let Err(e) = spawned {
                thread_error = Some(e);
            }
        }
        if let Some(err) = child.stderr.take() {
            let drain = self.err_drain;
            let spawned = std::thread::Builder::new()
                .name(format!("st-err-{}", self.index))
                .spawn(move || drain.run(err));
            if let Err(e) = spawned {
                thread_error.get_or_insert(e);
            }
        }
        let out = child.stdout.take();
        tracing::debug!(index = self.index, pid = child.id(), "subtask started");
        self.launch.put(Launched::Running(
            child,
            thread_error.map(|e| format!("spawn failed: cannot start an I/O thread: {e}")),
        ));
        if let Some(out) = out {
            self.out_drain.run(out);
        }
        if let Some(fd) = exit_fd {
            wait_readable(&fd);
        }
        self.activity.notify();
    }
}

/// A pidfd for `pid` (Linux 5.3+); None where the kernel has none.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Blocks until `fd` is readable (a pidfd: the process has exited).
fn wait_readable(fd: &OwnedFd) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

impl RunningSubtask {
    pub fn attempt(&self) -> &AttemptRef {
        &self.attempt
    }

    /// Pid (and process group id) of the command, if it started. Waits
    /// for the spawn on the I/O thread to settle.
    pub fn pid(&self) -> Option<u32> {
        if let Some(p) = &self.pending {
            return match &*p.launch.wait() {
                Some(Launched::Running(c, _)) => Some(c.id()),
                _ => None,
            };
        }
        self.pid
    }

    /// Takes the I/O thread's report once it is there (at once when `block`).
    fn settle(&mut self, block: bool) {
        let Some(p) = &self.pending else {
            return;
        };
        let launched = if block {
            p.launch.wait().take()
        } else {
            p.launch
                .slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        };
        let Some(launched) = launched else {
            return;
        };
        let Some(p) = self.pending.take() else {
            return;
        };
        match launched {
            Launched::Running(child, thread_error) => {
                self.pid = Some(child.id());
                self.proc_ = Some(Proc {
                    child,
                    stdout: Some(p.stdout),
                    stderr: Some(p.stderr),
                });
                if let Some(e) = thread_error {
                    self.error = Some(e);
                    self.kill_group();
                }
            }
            Launched::Failed(e) => {
                self.error = Some(e);
                self.remove_group();
            }
        }
    }

    /// The child cgroup's name while it exists.
    pub fn cgroup_name(&self) -> Option<&str> {
        self.group.as_ref().map(|(_, n)| n.as_str())
    }

    pub fn is_suspended(&self) -> bool {
        self.paused.is_some()
    }

    /// Whether the completion is known (try_wait or wait returned it, or the
    /// subtask never started).
    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }

    /// Cumulative CPU time of the child cgroup, nanoseconds; None without a
    /// cgroup or once it is removed.
    pub fn cpu_time_ns(&self) -> Option<u64> {
        let (cgroup, name) = self.group.as_ref()?;
        cgroup.as_partition().child_cpu_ns(name).ok()
    }

    /// Time since start not spent suspended.
    fn running_time(&self) -> Duration {
        let mut paused = self.paused_total;
        if let Some((_, since)) = self.paused {
            paused += since.elapsed();
        }
        self.started.elapsed().saturating_sub(paused)
    }

    fn pgid(&self) -> Option<Pid> {
        // Only while the leader is not reaped does its pid name the group.
        self.proc_
            .as_ref()
            .map(|p| Pid::from_raw(p.child.id() as i32))
    }

    /// Stops the subtask: the cgroup freezer where there is one, else
    /// SIGSTOP to its process group. A no-op when it is already suspended or
    /// has ended.
    pub fn suspend(&mut self) -> Result<(), SubtaskError> {
        self.settle(true);
        if self.paused.is_some() || self.done.is_some() {
            return Ok(());
        }
        let Some(pgid) = self.pgid() else {
            return Ok(());
        };
        let mut by = PausedBy::Signal;
        if let Some((cgroup, name)) = &self.group {
            if cgroup
                .as_partition()
                .set_frozen(name, true)
                .map_err(cg(&self.attempt))?
            {
                by = PausedBy::Freezer;
            }
        }
        if by == PausedBy::Signal {
            match killpg(pgid, Signal::SIGSTOP) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(op(
                        &self.attempt,
                        "suspend",
                        format!("SIGSTOP to process group {pgid}: {e}"),
                    ))
                }
            }
        }
        self.paused = Some((by, Instant::now()));
        tracing::debug!(subtask = %label(&self.attempt), ?by, "subtask suspended");
        Ok(())
    }

    /// Continues a suspended subtask. A no-op when it is not suspended.
    pub fn resume(&mut self) -> Result<(), SubtaskError> {
        let Some((by, since)) = self.paused else {
            return Ok(());
        };
        match by {
            PausedBy::Freezer => {
                if let Some((cgroup, name)) = &self.group {
                    cgroup
                        .as_partition()
                        .set_frozen(name, false)
                        .map_err(cg(&self.attempt))?;
                }
            }
            PausedBy::Signal => {
                if let Some(pgid) = self.pgid() {
                    match killpg(pgid, Signal::SIGCONT) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(e) => {
                            return Err(op(
                                &self.attempt,
                                "resume",
                                format!("SIGCONT to process group {pgid}: {e}"),
                            ))
                        }
                    }
                }
            }
        }
        self.paused = None;
        self.paused_total += since.elapsed();
        tracing::debug!(subtask = %label(&self.attempt), "subtask resumed");
        Ok(())
    }

    /// Kills the subtask (its process group and everything in its child
    /// cgroup, suspended or not); its completion carries `error: reason`
    /// unless an error (timeout, spawn failure) was recorded first. A no-op
    /// once the completion is known. Collect the completion with
    /// [`RunningSubtask::wait`].
    pub fn cancel(&mut self, reason: impl Into<String>) {
        self.settle(true);
        if self.done.is_some() {
            return;
        }
        self.error.get_or_insert_with(|| reason.into());
        self.kill_group();
    }

    /// The completion if the subtask has ended, else None; enforces the
    /// timeout. Once it returned the completion it returns the same again.
    pub fn try_wait(&mut self) -> Option<Completion> {
        if let Some(c) = &self.done {
            return Some(c.clone());
        }
        self.settle(false);
        if self.pending.is_some() {
            return None;
        }
        let Some(pid) = self.proc_.as_ref().map(|p| p.child.id()) else {
            return Some(self.complete(None));
        };
        if let Some(t) = self.timeout {
            if self.error.is_none() && self.paused.is_none() && self.running_time() >= t {
                self.error = Some(format!("timeout after {} ms", t.as_millis()));
                tracing::debug!(subtask = %label(&self.attempt), "subtask timed out");
                self.kill_group();
            }
        }
        match exited_unreaped(pid) {
            Ok(false) => return None,
            Ok(true) => {}
            // ECHILD: reaped elsewhere (SIGCHLD ignored?); wait reports it below.
            Err(_) => {}
        }
        // The leader is a zombie: kill what it left while its pid still
        // reserves the process group id, then reap it.
        self.kill_group();
        let status = match self.proc_.as_mut().map(|p| p.child.wait()) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                self.error
                    .get_or_insert_with(|| format!("cannot collect the exit status: {e}"));
                None
            }
            None => None,
        };
        Some(self.complete(status))
    }

    /// Blocks until the subtask ends (enforcing its timeout) and returns its
    /// completion.
    pub fn wait(&mut self) -> Completion {
        let mut nap = Duration::from_millis(1);
        loop {
            if let Some(c) = self.try_wait() {
                return c;
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(MAX_POLL);
        }
    }

    /// [`RunningSubtask::wait`] for at most `limit`; None if still running.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<Completion> {
        let deadline = Instant::now() + limit;
        let mut nap = Duration::from_millis(1);
        loop {
            if let Some(c) = self.try_wait() {
                return Some(c);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(MAX_POLL);
        }
    }

    /// SIGKILL to the process group (while the leader is unreaped) and to
    /// everything in the child cgroup; thaws a frozen cgroup so its tasks
    /// can die. Errors are logged: the reaping path notices what survived.
    fn kill_group(&mut self) {
        if let Some(pgid) = self.pgid() {
            match killpg(pgid, Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => tracing::warn!(subtask = %label(&self.attempt), error = %e,
                    "SIGKILL to the process group failed"),
            }
        }
        if let Some((cgroup, name)) = &self.group {
            let part = cgroup.as_partition();
            let by_kernel = part.kill_all(name).unwrap_or(false);
            if !by_kernel {
                kill_pids(part, name);
            }
            if matches!(self.paused, Some((PausedBy::Freezer, _))) {
                // v1-frozen tasks die only once thawed.
                if let Err(e) = part.set_frozen(name, false) {
                    tracing::warn!(subtask = %label(&self.attempt), error = %e,
                        "cannot thaw the killed subtask's cgroup");
                }
            }
        }
        if let Some((_, since)) = self.paused.take() {
            self.paused_total += since.elapsed();
        }
    }

    /// Kills what is left in the child cgroup, waits (bounded) until it is
    /// empty and removes it. Failures are logged and leave the group.
    fn remove_group(&mut self) {
        let Some((cgroup, name)) = self.group.take() else {
            return;
        };
        // Released whatever happens below: a group left with survivors in it
        // is refused by the pids check of a later start.
        lock(&self.in_use).remove(&name);
        let part = cgroup.as_partition();
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            match pids_or_none(part, &name) {
                Ok(left) if left.is_empty() => break,
                Ok(left) if Instant::now() >= deadline => {
                    tracing::warn!(subtask = %label(&self.attempt), group = %name, pids = ?left,
                        "processes survived SIGKILL for {KILL_TIMEOUT:?}; child cgroup left in place");
                    return;
                }
                Ok(_) => kill_pids(part, &name),
                Err(e) => {
                    tracing::warn!(subtask = %label(&self.attempt), error = %e,
                        "cannot list the child cgroup's processes");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Err(e) = part.remove_child(&name) {
            tracing::warn!(subtask = %label(&self.attempt), error = %e,
                "cannot remove the child cgroup");
        }
    }

    /// Builds and keeps the completion once the leader is reaped (or never
    /// started): removes the group, collects the output.
    fn complete(&mut self, status: Option<ExitStatus>) -> Completion {
        let duration = self.started.elapsed();
        let proc_ = self.proc_.take();
        self.paused = None;
        self.remove_group();
        // Its processes are gone: the grid namespace (if any) goes too.
        drop(self.net.take());
        let (out, err) = match proc_ {
            Some(p) => (
                p.stdout.map(|r| r.finish(READER_GRACE)).unwrap_or_default(),
                p.stderr.map(|r| r.finish(READER_GRACE)).unwrap_or_default(),
            ),
            None => (Captured::default(), Captured::default()),
        };
        if !(out.complete && err.complete) && self.pid.is_some() {
            tracing::warn!(subtask = %label(&self.attempt),
                "output pipe still open after the subtask ended (an escaped descendant?); output cut there");
        }
        let c = Completion {
            stdout_data: None,
            attempt: self.attempt.clone(),
            host: self.host.clone(),
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            error: self.error.clone(),
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_size: out.size,
            stderr_size: err.size,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        };
        if let Some(path) = &out.spilled {
            if !c.succeeded() {
                // Only a successful attempt's output is uploaded.
                let _ = std::fs::remove_file(path);
            }
        }
        tracing::debug!(subtask = %label(&self.attempt), exit = ?c.exit_code,
            signal = ?c.signal, error = ?c.error, "subtask ended");
        self.done = Some(c.clone());
        c
    }
}

/// SIGKILL to each pid of a child group (where the kernel has no
/// `cgroup.kill`), never to the agent itself or init.
fn kill_pids(part: &dyn Partition, name: &str) {
    let me = std::process::id();
    for pid in pids_or_none(part, name).unwrap_or_default() {
        if pid > 1 && pid != me {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Drop for RunningSubtask {
    fn drop(&mut self) {
        if self.done.is_some() {
            return;
        }
        self.settle(true);
        self.kill_group();
        if let Some(p) = self.proc_.as_mut() {
            let _ = p.child.wait();
        }
        self.remove_group();
    }
}
