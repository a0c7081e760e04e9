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

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};

use super::capture::{Captured, Reader};
use super::{cgroup_name, label, Executor, SubtaskError, BASE_PATH};
use crate::cgroup::{CgroupError, GridCgroup, Partition};

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
    /// The command while it is not reaped; None after that or if it never
    /// started.
    proc_: Option<Proc>,
    pid: Option<u32>,
    started: Instant,
    timeout: Option<Duration>,
    paused: Option<(PausedBy, Instant)>,
    paused_total: Duration,
    error: Option<String>,
    done: Option<Completion>,
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

/// Runs in the forked child before exec: raises its OOM score (best effort)
/// and joins the child group in every hierarchy by writing "0" (the writer
/// itself) to each procs file. Only async-signal-safe calls (open, write,
/// close), no allocation.
fn pre_exec_hook(oom: &CString, files: &[CString]) -> std::io::Result<()> {
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

/// Pids in a child group; a group that is already gone has none.
fn pids_or_none(part: &dyn Partition, name: &str) -> Result<Vec<u32>, CgroupError> {
    match part.pids(name) {
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        other => other,
    }
}

pub(super) fn start(ex: &Executor, a: &Assignment) -> Result<RunningSubtask, SubtaskError> {
    let at = &a.attempt;
    let mut rs = RunningSubtask {
        attempt: at.clone(),
        host: ex.host.clone(),
        group: None,
        proc_: None,
        pid: None,
        started: Instant::now(),
        timeout: (a.timeout_ms > 0).then(|| Duration::from_millis(a.timeout_ms)),
        paused: None,
        paused_total: Duration::ZERO,
        error: None,
        done: None,
    };
    if let Err(msg) = check_input(a) {
        rs.error = Some(format!("spawn failed: {msg}"));
        return Ok(rs);
    }

    let mut files = Vec::new();
    if let Some(cgroup) = &ex.cgroup {
        let name = cgroup_name(at);
        let part = cgroup.as_partition();
        part.create_child(&name).map_err(cg(at))?;
        let pids = part.pids(&name).map_err(cg(at))?;
        if !pids.is_empty() {
            return Err(SubtaskError::Busy {
                subtask: label(at),
                group: part.path().join(&name).display().to_string(),
                pids,
            });
        }
        // From here on, dropping `rs` removes the group.
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
        cmd.pre_exec(move || pre_exec_hook(&oom, &files));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            rs.error = Some(format!("spawn failed: cannot start {:?}: {e}", a.argv[0]));
            rs.remove_group();
            return Ok(rs);
        }
    };
    rs.pid = Some(child.id());
    rs.started = Instant::now();
    tracing::debug!(subtask = %label(at), pid = child.id(), "subtask started");

    // From here on, failures to set up the stream threads kill the command
    // and end the subtask with an error through the normal reaping path.
    let mut thread_error = None;
    if let Some(mut stdin) = child.stdin.take() {
        let data = a.stdin.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("st-stdin-{}", at.index))
            .spawn(move || {
                // EPIPE when the command does not read all of it is fine.
                let _ = stdin.write_all(&data);
            });
        if let Err(e) = spawned {
            thread_error = Some(e);
        }
    }
    let cap = ex.limits.output_cap_bytes;
    let mut reader = |src: Option<_>, which: &str| -> Option<Reader> {
        let src = src?;
        match Reader::spawn(format!("st-{which}-{}", at.index), src, cap) {
            Ok(r) => Some(r),
            Err(e) => {
                thread_error.get_or_insert(e);
                None
            }
        }
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        "out",
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        "err",
    );
    rs.proc_ = Some(Proc {
        child,
        stdout,
        stderr,
    });
    if let Some(e) = thread_error {
        rs.error = Some(format!("spawn failed: cannot start an I/O thread: {e}"));
        rs.kill_group();
    }
    Ok(rs)
}

impl RunningSubtask {
    pub fn attempt(&self) -> &AttemptRef {
        &self.attempt
    }

    /// Pid (and process group id) of the command, if it started.
    pub fn pid(&self) -> Option<u32> {
        self.pid
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
        self.kill_group();
        if let Some(p) = self.proc_.as_mut() {
            let _ = p.child.wait();
        }
        self.remove_group();
    }
}
