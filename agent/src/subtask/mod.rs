//! Runs one pushed subtask ([`Assignment`]) as a host process inside the grid
//! partition and turns its end into a [`Completion`]: the "process" path of
//! push dispatch, used until grid VMs run subtasks through the guest channel.
//!
//! - [`Executor::start`] creates the child cgroup `st-<job>-<index>-<epoch>`
//!   (see [`cgroup_name`]) and hands the command to the subtask's I/O thread
//!   (`st-io-<index>`), which spawns `argv` in its own process group, joined
//!   to that cgroup in a `pre_exec` hook before it execs (so none of its work
//!   runs outside the partition), feeds `stdin` from a thread, drains stderr
//!   on a thread and stdout itself into buffers capped at
//!   [`Limits::output_cap_bytes`] while counting the full sizes (stdout
//!   past that cap also spills whole, up to [`Limits::max_output_bytes`],
//!   to [`spill_path`] under [`Limits::spill_dir`] when one is set; a
//!   completion that did not succeed has its spill file removed), and then
//!   waits for the command to exit (a pidfd). `start` does not wait for the
//!   spawn: moving a new process into cgroups often waits for an RCU grace
//!   period in the kernel (milliseconds), and a caller starting several
//!   subtasks would otherwise wait for each in turn.
//! - [`Activity`]: the I/O thread bumps the executor's activity counter when
//!   its command has exited (or could not start), so whoever polls
//!   [`RunningSubtask::try_wait`] can sleep on [`Activity::wait_since`]
//!   instead of a fixed tick and still see each end at once.
//! - The environment is clean: only [`BASE_PATH`] as `PATH`, `HOME=/tmp`,
//!   `TMPDIR=/tmp`, `LANG=C`, `SPAREGRID_JOB`, `SPAREGRID_INDEX` and
//!   `SPAREGRID_EPOCH`, then the assignment's `env` on top (it may override
//!   any of them). The working directory is `/tmp`. Nothing of the agent's
//!   own environment leaks in. The command gets `oom_score_adj=1000` (best
//!   effort) so the kernel's OOM killer picks grid work before customers.
//! - [`RunningSubtask`] suspends and resumes (cgroup freezer, SIGSTOP/SIGCONT
//!   where there is none), cancels, enforces the timeout and reports the
//!   [`Completion`]; it removes the child cgroup once the command has ended.
//!
//! - `network = overlay`: [`Executor::start_with`] takes a grid namespace
//!   ([`crate::overlay::Attachment`]); the command enters it in the same
//!   `pre_exec` hook, before it joins its cgroup, gets
//!   `SPAREGRID_OVERLAY_ADDRESS` (`100.96.3.2/24`) and
//!   `SPAREGRID_OVERLAY_GATEWAY` in its environment, and the namespace is
//!   torn down when the subtask has ended. Without one, such a subtask ends
//!   at once with an error instead of running on the host's network.
//!
//! Bad input never panics: an empty argv, a missing binary, a NUL byte or a
//! bad env name give a completed subtask whose `error` says so. Only
//! agent-side trouble (the cgroup cannot be created, or still holds
//! processes) is a [`SubtaskError`] from `start`;
//! [`Executor::error_completion`] turns it into a report for the controller.
//!
//! Without a cgroup (`Executor::new(None, …)`, for unprivileged tests) the
//! subtask runs at the agent's own priority and only its process group is
//! signalled: a descendant that leaves the group (`setsid`) escapes.

mod capture;
mod running;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};

use crate::cgroup::{CgroupError, GridCgroup};
use crate::overlay::{Attachment, OverlayError};

pub use running::RunningSubtask;

/// `PATH` of every subtask unless its env overrides it.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Per-subtask limits the executor applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of stdout and of stderr (each) kept in memory and sent inline
    /// in the completion; the rest is read and counted. Default 1 MiB.
    pub output_cap_bytes: usize,
    /// With a spill directory: stdout longer than `output_cap_bytes` is
    /// written whole (up to `max_output_bytes`) to
    /// [`spill_path`]`(dir, attempt)` for the grid client to upload. None:
    /// it is cut at `output_cap_bytes`.
    pub spill_dir: Option<PathBuf>,
    /// Most stdout bytes kept per attempt (`controller.max_output_bytes`).
    pub max_output_bytes: u64,
}

/// Default [`Limits::max_output_bytes`]: 1 GiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 30;

/// Where the stdout of `attempt` spills under `dir`:
/// `<dir>/<job>-<index>-<epoch>.out`. None when the job id is not a plain
/// file name part (ids are `j-<n>`; anything else is not trusted as a path).
pub fn spill_path(dir: &Path, attempt: &AttemptRef) -> Option<PathBuf> {
    let job = &attempt.job;
    let plain = !job.is_empty()
        && !job.starts_with('.')
        && job.len() <= 128
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    plain.then(|| dir.join(format!("{job}-{}-{}.out", attempt.index, attempt.epoch)))
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            output_cap_bytes: 1 << 20,
            spill_dir: None,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        }
    }
}

/// Agent-side failures to run a subtask (the subtask's own failures are
/// completions with `error` set, not these).
#[derive(Debug, thiserror::Error)]
pub enum SubtaskError {
    #[error("subtask {subtask}: cgroup: {source}")]
    Cgroup {
        subtask: String,
        #[source]
        source: CgroupError,
    },
    #[error(
        "subtask {subtask}: child cgroup {group} is in use (by this attempt started \
         twice, or by processes {pids:?} left by an earlier agent); refusing to touch it"
    )]
    Busy {
        subtask: String,
        group: String,
        pids: Vec<u32>,
    },
    #[error("subtask {subtask}: {source}")]
    Network {
        subtask: String,
        #[source]
        source: OverlayError,
    },
    #[error("subtask {subtask}: {op}: {message}")]
    Op {
        subtask: String,
        op: &'static str,
        message: String,
    },
}

/// `job/index#epoch`, how errors and logs name a subtask attempt.
pub fn label(a: &AttemptRef) -> String {
    format!("{}/{}#{}", a.job, a.index, a.epoch)
}

/// The child cgroup of one attempt: `st-<job>-<index>-<epoch>`. A job id with
/// characters other than ASCII letters, digits, `.`, `_` and `-`, or longer
/// than 128 bytes, is cut to 128 bytes with the others replaced by `_`, and
/// gets `-<hash of the original id>` appended so distinct ids stay distinct.
pub fn cgroup_name(a: &AttemptRef) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let job = &a.job;
    let clean = !job.is_empty() && job.len() <= 128 && job.chars().all(ok);
    let job = if clean {
        job.clone()
    } else {
        let cut: String = job
            .chars()
            .map(|c| if ok(c) { c } else { '_' })
            .take(128)
            .collect();
        format!("{cut}-{:016x}", fnv1a(job.as_bytes()))
    };
    format!("st-{job}-{}-{}", a.index, a.epoch)
}

/// FNV-1a, 64 bit: stable across runs and Rust releases (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A counter bumped whenever a subtask's command has exited or failed to
/// start (and by [`Activity::notify`] from anyone else, e.g. when new work
/// is queued): lets the thread that drives the subtasks sleep until there is
/// something to do.
#[derive(Debug, Default)]
pub struct Activity {
    seq: Mutex<u64>,
    cv: Condvar,
}

impl Activity {
    /// Bumps the counter and wakes every waiter.
    pub fn notify(&self) {
        *self.seq.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.cv.notify_all();
    }

    /// The counter now; pass it to [`Activity::wait_since`].
    pub fn seen(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the counter differs from `seen` or `timeout` passed;
    /// returns the counter. Read [`Activity::seen`] before looking at the
    /// subtasks, so an end that happens in between is not slept through.
    pub fn wait_since(&self, seen: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut seq = self.seq.lock().unwrap_or_else(PoisonError::into_inner);
        while *seq == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            seq = self
                .cv
                .wait_timeout(seq, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *seq
    }
}

/// Runs subtasks as host processes in the grid partition.
pub struct Executor {
    cgroup: Option<Arc<GridCgroup>>,
    host: String,
    limits: Limits,
    activity: Arc<Activity>,
    /// Child groups of subtasks started and not yet ended: a second start
    /// of the same attempt is refused even before the first one's command
    /// has joined its group.
    in_use: Arc<Mutex<HashSet<String>>>,
}

impl Executor {
    /// An executor that places subtasks under `cgroup`'s partition (which
    /// must have been set up with `Partition::setup`; the executor creates
    /// and removes only its children), or runs them without a cgroup when
    /// `None`. `host` goes into every completion.
    pub fn new(
        cgroup: Option<Arc<GridCgroup>>,
        host: impl Into<String>,
        limits: Limits,
    ) -> Executor {
        Executor {
            cgroup,
            host: host.into(),
            limits,
            activity: Arc::default(),
            in_use: Arc::default(),
        }
    }

    /// Bumped when a subtask started by this executor has exited or could
    /// not start; see [`Activity`].
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn cgroup(&self) -> Option<&Arc<GridCgroup>> {
        self.cgroup.as_ref()
    }

    /// Starts one attempt. See the module docs for what the process gets.
    /// A subtask that cannot start for its own reasons (empty argv, missing
    /// binary, …) is returned already completed with `error` set.
    pub fn start(&self, a: &Assignment) -> Result<RunningSubtask, SubtaskError> {
        running::start(self, a, None)
    }

    /// [`Executor::start`] in a grid namespace: the command runs inside
    /// `net` (entered before exec) and the attachment is torn down with
    /// the subtask. An assignment with `network = overlay` must come this
    /// way; through [`Executor::start`] it fails (it would otherwise run
    /// on the host's network).
    pub fn start_with(
        &self,
        a: &Assignment,
        net: Option<Attachment>,
    ) -> Result<RunningSubtask, SubtaskError> {
        running::start(self, a, net)
    }

    /// The completion to report when [`Executor::start`] failed on the agent
    /// side: no exit code, `error` from `err`.
    pub fn error_completion(&self, a: &Assignment, err: &SubtaskError) -> Completion {
        Completion {
            stdout_data: None,
            attempt: a.attempt.clone(),
            host: self.host.clone(),
            exit_code: None,
            signal: None,
            error: Some(err.to_string()),
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_size: 0,
            stderr_size: 0,
            duration_ms: 0,
        }
    }
}
