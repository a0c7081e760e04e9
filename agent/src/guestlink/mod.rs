//! The host side of the guest channel: a [`GuestPool`] of grid VMs, each
//! with a session thread that talks to its `sparegrid-guest` worker over the
//! VM's virtio-serial unix socket, using the wire contract of
//! [`sparegrid_proto::guest`] (read its header for the protocol).
//!
//! The pool is shared as `Arc<GuestPool>` by two threads: the control loop
//! (which launches, pauses, saves and destroys VMs and tells the pool) and
//! the grid runner (which starts [`Assignment`]s in idle VMs and collects
//! how they ended). Std threads only: per attached VM one **session** thread
//! (`guest-<vm>`: connects, handshakes, reads frames, runs the watchdog) and
//! one **writer** thread (`guest-w-<vm>`: writes queued frames, so a big
//! `RunSubtask` or a guest that reads slowly never blocks a caller). All
//! state sits behind one mutex; every call returns at once.
//!
//! **Control-loop side.**
//! - [`GuestPool::attach`]: the VM was launched or restored. The session
//!   connects (retrying until the socket accepts), sends
//!   [`HostMsg::Attach`] with a fresh nonce every `heartbeat` until a
//!   [`Hello`](sparegrid_proto::guest::Hello) with that nonce, skipping
//!   anything else meanwhile (resync). If the VM holds a subtask (a restore,
//!   or a second attach) and the Hello's `current` names it, the session
//!   sends [`HostMsg::Replay`] from the offsets already received; if the
//!   guest no longer holds it, it is handed back. Until the replay has
//!   caught up, live output past what arrived is dropped (the replay
//!   re-sends it) and a Result whose output is incomplete waits for it (for
//!   at most `dead_after` of running time).
//! - [`GuestPool::paused`] (just before or right after suspending: the
//!   watchdog allows `dead_after` of silence anyway) /
//!   [`GuestPool::resumed`] (after resuming): no watchdog while paused; it
//!   restarts from the resume. Paused time is counted per VM and per subtask.
//! - [`GuestPool::saving`]: a managed save follows; the EOF is expected, the
//!   subtask is kept, and the time until the next `attach` counts as paused.
//!   If the save fails and the VM goes on, call `resumed` (it reconnects if
//!   the channel closed).
//! - [`GuestPool::held`] / [`GuestPool::migrated`] / [`GuestPool::adopt`]
//!   (`reclaim_mode = "migrate"`): what a saved VM holds; the VM left for
//!   another host (forgotten, nothing handed back: that host reports it);
//!   a VM arrived from another host holding a subtask (attached like a
//!   restore, the guest replays all its kept output).
//! - [`GuestPool::reclaimed`]: the VM is destroyed; its subtask is handed
//!   back as `"preempted"` and its entry forgotten.
//! - [`GuestPool::take_ready`]: VMs whose guest said Hello since the last
//!   call (once per attach: a launch or a restore).
//! - [`GuestPool::take_failed`]: VMs whose guest misbehaved, once each, with
//!   a [`GuestFailure`]; the control loop reclaims them (and then calls
//!   `reclaimed`, which finds nothing left to hand back).
//!
//! **Runner side.** [`GuestPool::idle`], [`GuestPool::start`] (one subtask
//! per ready VM; gives the assignment back when none is idle),
//! [`GuestPool::cancel`] (a withdrawn attempt: killed in the guest, never
//! reported; its VM is idle again once the guest's Result arrives),
//! [`GuestPool::take_ended`] ([`VmEnd`]), [`GuestPool::running`].
//! [`GuestPool::activity`] is bumped on every Hello, end and failure (and
//! when a cancelled subtask's VM is free again), so the runner can sleep on
//! it. [`GuestPool::snapshot`] gives each VM's [`VmLinkStatus`].
//!
//! **Failures.** No Hello within `hello_timeout`, the channel closing while
//! not saving, a frame above
//! [`MAX_GUEST_FRAME`](sparegrid_proto::guest::MAX_GUEST_FRAME), bytes after the Hello that
//! are not well-formed frames, a guest silent for `dead_after` while not
//! paused (and, when the control loop reports the VM's CPU time, after
//! using a third of that in CPU: a starved guest is not a dead one, unless
//! silent for ten times `dead_after`), a gap in the output, a protocol mismatch, a guest that rejects
//! our frames, or one that outlives a subtask's timeout or a cancel by far:
//! each is logged at warn with the VM and its subtask, the subtask is handed
//! back (never completed, never failed), the connection is closed and the VM
//! shows up in `take_failed` once. No I/O error panics.
//!
//! **Completions** look like the process path's ([`crate::subtask`]): the
//! options' `host`, the guest's exit code, signal and error (a timeout
//! without an error becomes `"timeout after N ms"`), stdout and stderr
//! reassembled by offset and capped at `output_cap` with the guest's full
//! sizes, and `duration_ms` the guest's own (its monotonic clock stops while
//! the VM is paused). Host-side paused time is in the snapshot. With
//! [`LinkOptions::spill`], the guest is asked for up to
//! [`LinkOptions::guest_cap`] of each stream (at most `max_output_bytes`
//! and an eighth of the VM's memory, which the guest keeps for replays),
//! and stdout past `output_cap` spills to [`crate::subtask::spill_path`]
//! for the grid client to upload ([`crate::grid::outputs`]); only a
//! successful subtask keeps its spill file.
//!
//! **Tests** (`tests.rs`): a fake guest on a unix listener played with the
//! proto codec for every failure and the save/replay paths, plus the real
//! `sparegrid-guest` worker behind a relay that plays QEMU (skipped with a
//! printed reason unless `target/debug/sparegrid-guest` or
//! `$SPAREGRID_GUEST_BIN` exists), and an ignored benchmark printing the
//! host side's round trip and throughput.

mod output;
mod session;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};
use sparegrid_proto::guest::{
    encode_frame, Hello, HostMsg, RunSubtask, SubtaskResult, MAX_HOST_FRAME,
};

use crate::subtask::{label, Activity};

use output::Assembly;

/// A subtask the guest has not ended this long after its timeout (VM time
/// not paused) means the guest is stuck.
const TIMEOUT_GRACE: Duration = Duration::from_secs(30);

/// A cancelled subtask whose Result has not come this long after the
/// Cancel (VM time not paused) means the guest is stuck.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// What the pool needs to know.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Goes into every [`Completion::host`].
    pub host: String,
    /// From attach to Hello (the boot timeout), not counting paused time.
    pub hello_timeout: Duration,
    /// The guest's heartbeat interval (sent in Attach); also how often the
    /// host repeats Attach and sends its own heartbeat.
    pub heartbeat: Duration,
    /// Silence after which a running (not paused) guest is declared dead.
    pub dead_after: Duration,
    /// Bytes of stdout and of stderr (each) kept in memory per subtask
    /// and sent inline.
    pub output_cap: u64,
    /// Stdout past `output_cap` spills to a file for the grid client to
    /// upload (none: it is cut at `output_cap`).
    pub spill: Option<GuestSpill>,
}

/// Where a guest's long stdout spills ([`LinkOptions::spill`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpill {
    /// [`crate::subtask::spill_path`] under it.
    pub dir: PathBuf,
    /// Most stdout bytes kept (`controller.max_output_bytes`).
    pub max_output_bytes: u64,
}

/// The share of a grid VM's memory each output stream may take in the
/// guest, which keeps what it streams (up to the cap asked of it) for a
/// replay after a save and restore: 1/8 (stdout and stderr: a quarter).
const GUEST_OUTPUT_SHARE: u64 = 8;

impl LinkOptions {
    /// The per-stream cap asked of the guest for a VM of `memory_mib`:
    /// `output_cap` without a spill, else up to `max_output_bytes` but no
    /// more than an eighth of the VM's memory (never below
    /// `output_cap`).
    pub fn guest_cap(&self, memory_mib: u64) -> u64 {
        match &self.spill {
            None => self.output_cap,
            Some(sp) => sp
                .max_output_bytes
                .min(memory_mib.saturating_mul(1 << 20) / GUEST_OUTPUT_SHARE)
                .max(self.output_cap),
        }
    }

    /// A stdout assembly for `attempt` (spilling when set up to).
    fn stdout_assembly(&self, attempt: &AttemptRef) -> Assembly {
        match &self.spill {
            None => Assembly::new(self.output_cap),
            Some(sp) => Assembly::with_spill(
                self.output_cap,
                crate::subtask::spill_path(&sp.dir, attempt),
                sp.max_output_bytes,
            ),
        }
    }
}

/// Why a VM's guest was given up on. Its `Display` says what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFailure {
    /// The channel socket never accepted a connection.
    NoConnection { after: Duration, error: String },
    /// Connected, but no Hello carrying our nonce.
    NoHello { after: Duration },
    /// The Hello speaks another protocol version.
    Version { guest: u32, host: u32 },
    /// A frame header announced more than
    /// [`MAX_GUEST_FRAME`](sparegrid_proto::guest::MAX_GUEST_FRAME).
    FrameTooLarge { size: usize, max: usize },
    /// Bytes after the Hello that are not a well-formed frame or message.
    Garbage { detail: String },
    /// No frame for `ago` while the VM was running.
    Silent { ago: Duration },
    /// EOF or a read error while the VM was not being saved.
    ChannelClosed { error: Option<String> },
    /// A well-formed message that breaks the protocol (a gap in the output,
    /// a result with missing output, a stuck subtask, a rejected frame).
    Protocol { detail: String },
    /// The agent could not run the session (a thread or socket call failed).
    Agent { detail: String },
}

/// `60 s`, `5.2 s`.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestFailure::NoConnection { after, error } => write!(
                f,
                "channel socket accepted no connection within {} ({error})",
                secs(*after)
            ),
            GuestFailure::NoHello { after } => write!(f, "no Hello within {}", secs(*after)),
            GuestFailure::Version { guest, host } => {
                write!(f, "guest speaks protocol {guest}, the host speaks {host}")
            }
            GuestFailure::FrameTooLarge { size, max } => {
                write!(f, "frame of {size} bytes exceeds {max}")
            }
            GuestFailure::Garbage { detail } => write!(f, "garbage on the channel: {detail}"),
            GuestFailure::Silent { ago } => {
                write!(f, "guest stopped heartbeating {} ago", secs(*ago))
            }
            GuestFailure::ChannelClosed { error: None } => {
                f.write_str("channel closed (guest died?)")
            }
            GuestFailure::ChannelClosed { error: Some(e) } => {
                write!(f, "channel closed (guest died?): {e}")
            }
            GuestFailure::Protocol { detail } => write!(f, "protocol violation: {detail}"),
            GuestFailure::Agent { detail } => write!(f, "agent-side channel error: {detail}"),
        }
    }
}

/// How a subtask started with [`GuestPool::start`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEnd {
    /// The guest reported a result.
    Completed(Completion),
    /// Not finished: the VM was reclaimed (`reason` = `"preempted"`), its
    /// guest failed (`reason` says how) or lost the subtask. Not a failure
    /// of the subtask.
    HandedBack {
        attempt: AttemptRef,
        vm: String,
        reason: String,
    },
}

/// A subtask a saved VM holds, as it moves between hosts with the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSubtask {
    /// The guest's id for it (its Hello names it).
    pub id: u64,
    pub attempt: AttemptRef,
    pub timeout_ms: u64,
}

/// What a VM's link is doing, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Attached, no Hello yet.
    Connecting,
    /// Hello received, no subtask.
    Ready,
    /// Running a subtask.
    Busy,
    Paused,
    /// Being saved, or saved and waiting for attach after a restore.
    Saving,
    /// Given up on (see [`GuestPool::take_failed`]); waits for `reclaimed`.
    Failed,
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkState::Connecting => "connecting",
            LinkState::Ready => "ready",
            LinkState::Busy => "busy",
            LinkState::Paused => "paused",
            LinkState::Saving => "saving",
            LinkState::Failed => "failed",
        })
    }
}

/// One VM's link, as [`GuestPool::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VmLinkStatus {
    pub vm: String,
    pub state: LinkState,
    /// The subtask it runs (not a cancelled one).
    pub attempt: Option<AttemptRef>,
    /// Time the VM spent paused (or saved) since it was first attached,
    /// including a pause going on now.
    pub paused_ms: u64,
    /// Of that, time during the current subtask.
    pub subtask_paused_ms: u64,
    /// Output bytes (stdout + stderr) of the current subtask received so far.
    pub output_bytes: u64,
    /// How long ago the last frame arrived; `None` before the first.
    pub last_frame_ms: Option<u64>,
    /// The guest worker's version from its last Hello.
    pub worker_version: Option<String>,
    /// Why it failed, when it did.
    pub failure: Option<String>,
}

/// A guest silent for `dead_after` is declared dead only if it also used
/// at least this fraction of `dead_after` in CPU time meanwhile (when its
/// CPU time is known, see [`GuestPool::vm_cpu`]): a healthy worker
/// heartbeats every second of wall time, so a guest that had seconds of CPU
/// and said nothing is broken, while one that had none was starved.
pub const STARVED_CPU_FRACTION: f64 = 1.0 / 3.0;

/// Silence longer than this many times `dead_after` is a dead guest even
/// without CPU (a QEMU stopped with SIGSTOP gets none and never speaks
/// again); a guest starved that long by customers would have been
/// suspended by the policy, which turns the watchdog off.
pub const STARVED_MAX_FACTOR: u32 = 10;

/// The grid VMs' guest links. See the module docs.
pub struct GuestPool {
    shared: Arc<Shared>,
}

/// What the pool and its session threads share.
struct Shared {
    opts: LinkOptions,
    activity: Arc<Activity>,
    state: Mutex<Inner>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Inner {
    vms: BTreeMap<String, Vm>,
    ready: Vec<String>,
    failed: Vec<(String, GuestFailure)>,
    ended: Vec<VmEnd>,
    next_gen: u64,
    closed: bool,
}

/// One attached VM.
struct Vm {
    socket: PathBuf,
    /// The live session, if any (none once failed, or after a save's EOF).
    session: Option<SessionSlot>,
    /// The session nonce of the current session.
    nonce: u64,
    /// The current session's Hello.
    hello: Option<Hello>,
    worker_version: Option<String>,
    saving: bool,
    paused_since: Option<Instant>,
    paused_total: Duration,
    failed: Option<GuestFailure>,
    job: Option<Job>,
    last_frame: Option<Instant>,
    /// Where the watchdog (Hello or heartbeat) counts from: attach, resume.
    watch_from: Instant,
    /// The VM's cumulative CPU time as the control loop last reported it
    /// ([`GuestPool::vm_cpu`]), and its value at the last frame (or when
    /// the watchdog restarted): a silent guest that got almost no CPU
    /// meanwhile is starved by the host's customers, not dead.
    cpu_ns: Option<u64>,
    cpu_mark: Option<u64>,
}

/// The pool's handle on a session thread.
struct SessionSlot {
    gen: u64,
    /// Frames to the writer thread; set once connected.
    tx: Option<Sender<Vec<u8>>>,
    /// A clone of the connection, to shut it down from outside.
    stream: Option<UnixStream>,
}

impl SessionSlot {
    fn close(&self) {
        if let Some(s) = &self.stream {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The subtask a VM runs.
struct Job {
    id: u64,
    attempt: AttemptRef,
    timeout_ms: u64,
    started: Instant,
    /// `paused_total` of the VM when it started.
    paused_at_start: Duration,
    /// When it was cancelled, with the VM's `paused_total` then.
    cancelled: Option<(Instant, Duration)>,
    /// The per-stream cap asked of the guest: every byte up to it must
    /// arrive before the Result counts.
    guest_cap: u64,
    stdout: Assembly,
    stderr: Assembly,
    /// A Replay was asked for (after a re-attach): until it has caught up,
    /// live chunks past what arrived are dropped (the replay re-sends them)
    /// instead of being a gap, and a Result whose output is not all here
    /// yet waits for it.
    replaying: bool,
    /// Such a Result, with when it came and the VM's `paused_total` then.
    pending: Option<(SubtaskResult, Instant, Duration)>,
}

impl Vm {
    fn new(socket: PathBuf, now: Instant) -> Vm {
        Vm {
            socket,
            session: None,
            nonce: 0,
            hello: None,
            worker_version: None,
            saving: false,
            paused_since: None,
            paused_total: Duration::ZERO,
            failed: None,
            job: None,
            last_frame: None,
            watch_from: now,
            cpu_ns: None,
            cpu_mark: None,
        }
    }

    /// Restarts the CPU count of the silence watchdog (a frame arrived, or
    /// the watchdog restarted).
    fn mark_cpu(&mut self) {
        self.cpu_mark = self.cpu_ns;
    }

    /// CPU time the VM used since [`Vm::mark_cpu`], if the control loop
    /// reports CPU time for it.
    fn cpu_since_mark(&self) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.cpu_ns?.saturating_sub(self.cpu_mark?),
        ))
    }

    /// Paused time so far, including a pause going on now.
    fn paused_now(&self, now: Instant) -> Duration {
        self.paused_total
            + self
                .paused_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Time since `(at, paused_then)` that the VM was not paused.
    fn running_since(&self, at: Instant, paused_then: Duration, now: Instant) -> Duration {
        now.saturating_duration_since(at)
            .saturating_sub(self.paused_now(now).saturating_sub(paused_then))
    }

    fn end_pause(&mut self, now: Instant) {
        if let Some(t) = self.paused_since.take() {
            self.paused_total += now.saturating_duration_since(t);
        }
        self.watch_from = now;
        self.mark_cpu();
    }

    fn is_idle(&self) -> bool {
        self.failed.is_none()
            && !self.saving
            && self.paused_since.is_none()
            && self.job.is_none()
            && self.hello.is_some()
            && self.session.as_ref().is_some_and(|s| s.tx.is_some())
    }

    /// Queues a frame for the writer; a closed writer means the connection
    /// is gone, which the reader reports.
    fn send(&self, msg: &HostMsg) {
        let Some(tx) = self.session.as_ref().and_then(|s| s.tx.as_ref()) else {
            return;
        };
        match encode_frame(msg, MAX_HOST_FRAME) {
            Ok(frame) => {
                let _ = tx.send(frame);
            }
            Err(e) => tracing::warn!("cannot encode a frame for the guest: {e}"),
        }
    }

    fn state(&self) -> LinkState {
        if self.failed.is_some() {
            LinkState::Failed
        } else if self.saving {
            LinkState::Saving
        } else if self.paused_since.is_some() {
            LinkState::Paused
        } else if self.hello.is_none() {
            LinkState::Connecting
        } else if self.job.is_some() {
            // Also a cancelled subtask whose Result has not come: not free yet.
            LinkState::Busy
        } else {
            LinkState::Ready
        }
    }
}

impl Inner {
    /// Gives up on `name`'s current session `gen`: logs, hands its subtask
    /// back, closes the connection and queues it for `take_failed`. Returns
    /// false when that session is no longer current (nothing done).
    fn fail(&mut self, name: &str, gen: u64, failure: GuestFailure) -> bool {
        let Some(vm) = self.vms.get_mut(name) else {
            return false;
        };
        if vm.failed.is_some() || vm.session.as_ref().map(|s| s.gen) != Some(gen) {
            return false;
        }
        let job = vm.job.take();
        tracing::warn!(
            vm = name,
            subtask = job.as_ref().map(|j| label(&j.attempt)).as_deref(),
            "grid VM {name}: guest failed: {failure}"
        );
        if let Some(s) = vm.session.take() {
            s.close();
        }
        vm.hello = None;
        vm.failed = Some(failure.clone());
        if let Some(job) = job {
            if job.cancelled.is_none() {
                self.ended.push(VmEnd::HandedBack {
                    attempt: job.attempt,
                    vm: name.to_owned(),
                    reason: format!("guest failed: {failure}"),
                });
            }
        }
        self.failed.push((name.to_owned(), failure));
        true
    }
}

/// A fresh session nonce. Hand-written instead of a `rand` dependency: it
/// only has to differ from the previous sessions' (so a stale Hello is not
/// taken for the new one), and std's `RandomState` is randomly keyed.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl GuestPool {
    pub fn new(opts: LinkOptions) -> Arc<GuestPool> {
        Arc::new(GuestPool {
            shared: Arc::new(Shared {
                opts,
                activity: Arc::default(),
                state: Mutex::default(),
                // Subtask ids start somewhere random (below 2^62, so they
                // never wrap) so that a guest still holding a subtask from
                // an earlier agent process does not match a new one.
                next_id: AtomicU64::new((nonce() >> 2).max(1)),
            }),
        })
    }

    pub fn options(&self) -> &LinkOptions {
        &self.shared.opts
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// The VM was launched or restored (or re-attached): start a session on
    /// `socket`. An earlier session of the VM is closed; its subtask is kept
    /// and replayed if the guest still holds it.
    pub fn attach(&self, vm: &str, socket: PathBuf) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.next_gen += 1;
        let gen = st.next_gen;
        let entry = st
            .vms
            .entry(vm.to_owned())
            .or_insert_with(|| Vm::new(socket.clone(), now));
        if entry.failed.is_some() {
            // A new VM under a failed one's name: start afresh.
            *entry = Vm::new(socket.clone(), now);
        }
        if let Some(old) = entry.session.take() {
            old.close();
        }
        if entry.saving {
            entry.saving = false;
            entry.end_pause(now);
        }
        entry.socket = socket.clone();
        entry.hello = None;
        entry.last_frame = None;
        entry.watch_from = now;
        entry.mark_cpu();
        entry.nonce = nonce();
        entry.session = Some(SessionSlot {
            gen,
            tx: None,
            stream: None,
        });
        let nonce = entry.nonce;
        drop(st);
        self.spawn_session(vm, gen, nonce, socket);
    }

    fn spawn_session(&self, vm: &str, gen: u64, nonce: u64, socket: PathBuf) {
        let shared = self.shared.clone();
        let name = vm.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("guest-{vm}"))
            .spawn(move || session::run(shared, name, gen, nonce, socket));
        if let Err(e) = spawned {
            let failed = self.lock().fail(
                vm,
                gen,
                GuestFailure::Agent {
                    detail: format!("cannot start the session thread: {e}"),
                },
            );
            if failed {
                self.shared.activity.notify();
            }
        }
    }

    /// The VM is (about to be) paused: no watchdog until [`GuestPool::resumed`].
    pub fn paused(&self, vm: &str) {
        let now = Instant::now();
        if let Some(v) = self.lock().vms.get_mut(vm) {
            v.paused_since.get_or_insert(now);
        }
    }

    /// The VM runs again: the watchdog restarts from now. After a failed
    /// save whose channel closed, this reconnects.
    pub fn resumed(&self, vm: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.closed {
            return;
        }
        let Some(v) = st.vms.get_mut(vm) else {
            return;
        };
        v.end_pause(now);
        v.saving = false;
        if v.session.is_none() && v.failed.is_none() {
            let socket = v.socket.clone();
            drop(st);
            self.attach(vm, socket);
        }
    }

    /// The VM's cumulative CPU time (ns), from the runtime's stats, each
    /// control-loop tick. With it, the silence watchdog declares a guest
    /// dead only when it also had CPU to speak with (see
    /// [`STARVED_CPU_FRACTION`]): a grid VM at the lowest CPU weight under
    /// busy customers can get almost no CPU for a long time, which is the
    /// design working, not a failure. Without it (tests, other runtimes)
    /// silence alone counts.
    pub fn vm_cpu(&self, vm: &str, cpu_time_ns: u64) {
        let mut st = self.lock();
        if let Some(v) = st.vms.get_mut(vm) {
            v.cpu_ns = Some(cpu_time_ns);
            if v.cpu_mark.is_none() {
                v.cpu_mark = Some(cpu_time_ns);
            }
        }
    }

    /// The VM is about to be managed-saved: the channel's EOF is expected,
    /// its subtask is kept for the [`GuestPool::attach`] after the restore.
    pub fn saving(&self, vm: &str) {
        let now = Instant::now();
        if let Some(v) = self.lock().vms.get_mut(vm) {
            v.saving = true;
            v.paused_since.get_or_insert(now);
        }
    }

    /// The VM is destroyed: its subtask (if any, and not cancelled) is
    /// handed back as `"preempted"`, its session ends, the pool forgets it.
    pub fn reclaimed(&self, vm: &str) {
        let mut st = self.lock();
        let Some(v) = st.vms.remove(vm) else {
            return;
        };
        if let Some(s) = &v.session {
            s.close();
        }
        st.ready.retain(|r| r != vm);
        if let Some(job) = v.job {
            if job.cancelled.is_none() {
                tracing::info!(
                    vm,
                    subtask = %label(&job.attempt),
                    "grid VM {vm} reclaimed mid-subtask; handing it back"
                );
                st.ended.push(VmEnd::HandedBack {
                    attempt: job.attempt,
                    vm: vm.to_owned(),
                    reason: "preempted".to_owned(),
                });
                drop(st);
                self.shared.activity.notify();
            }
        }
    }

    /// The subtask saved VM `vm` holds, if any (not a cancelled one): what
    /// another host needs to take it over (`reclaim_mode = "migrate"`).
    pub fn held(&self, vm: &str) -> Option<HeldSubtask> {
        let st = self.lock();
        let job = st.vms.get(vm)?.job.as_ref()?;
        if job.cancelled.is_some() {
            return None;
        }
        Some(HeldSubtask {
            id: job.id,
            attempt: job.attempt.clone(),
            timeout_ms: job.timeout_ms,
        })
    }

    /// VM `vm` moved to another host with its subtask: its session ends and
    /// the pool forgets it without handing the subtask back (the other host
    /// reports it). Returns the subtask it held.
    pub fn migrated(&self, vm: &str) -> Option<HeldSubtask> {
        let mut st = self.lock();
        let v = st.vms.remove(vm)?;
        if let Some(s) = &v.session {
            s.close();
        }
        st.ready.retain(|r| r != vm);
        let job = v.job?;
        Some(HeldSubtask {
            id: job.id,
            attempt: job.attempt,
            timeout_ms: job.timeout_ms,
        })
    }

    /// A VM restored from another host's saved state, holding `held`
    /// (under this host's attempt): attached like a restore here, so its
    /// Hello names the subtask and the whole kept output is replayed (none
    /// of it arrived here). Time before the attach counts as paused.
    pub fn adopt(&self, vm: &str, socket: PathBuf, held: HeldSubtask) {
        let now = Instant::now();
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            let cap = self.shared.opts.output_cap;
            let mut v = Vm::new(socket.clone(), now);
            let stdout = self.shared.opts.stdout_assembly(&held.attempt);
            v.job = Some(Job {
                id: held.id,
                attempt: held.attempt,
                timeout_ms: held.timeout_ms,
                started: now,
                paused_at_start: Duration::ZERO,
                cancelled: None,
                // What the guest was asked for elsewhere is not known:
                // every byte up to the inline cap must arrive, the rest
                // spills as it comes.
                guest_cap: cap,
                stdout,
                stderr: Assembly::new(cap),
                replaying: false,
                pending: None,
            });
            st.vms.insert(vm.to_owned(), v);
        }
        self.attach(vm, socket);
    }

    /// VMs whose guest said Hello since the last call (once per attach).
    pub fn take_ready(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().ready)
    }

    /// VMs whose guest failed since the last call, each once.
    pub fn take_failed(&self) -> Vec<(String, GuestFailure)> {
        std::mem::take(&mut self.lock().failed)
    }

    /// Ready VMs with no subtask (not paused, saving or failed).
    pub fn idle(&self) -> usize {
        self.lock().vms.values().filter(|v| v.is_idle()).count()
    }

    /// Sends the assignment to an idle VM, or gives it back when none is
    /// idle. An assignment too large for the channel ends at once as a
    /// completion with `error` set (the subtask's own fault, like a bad argv
    /// on the process path).
    // The assignment comes back whole so the runner can queue it again.
    #[allow(clippy::result_large_err)]
    pub fn start(&self, a: Assignment) -> Result<(), Assignment> {
        if !self.lock().vms.values().any(Vm::is_idle) {
            return Err(a);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let Assignment {
            attempt,
            argv,
            env,
            stdin,
            timeout_ms,
            vcpus,
            memory_mib,
            network: _,
        } = a;
        // The same identity variables a process-run subtask gets; the
        // assignment's own env may override them.
        let mut env_all: std::collections::BTreeMap<String, String> = [
            ("SPAREGRID_JOB", attempt.job.clone()),
            ("SPAREGRID_INDEX", attempt.index.to_string()),
            ("SPAREGRID_EPOCH", attempt.epoch.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env_all.extend(env);
        let msg = HostMsg::RunSubtask(RunSubtask {
            id,
            label: label(&attempt),
            argv,
            env: env_all,
            stdin,
            timeout_ms,
            output_cap: self.shared.opts.guest_cap(memory_mib),
        });
        // Encoded outside the lock: stdin may be tens of MiB.
        let frame = match encode_frame(&msg, MAX_HOST_FRAME) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(subtask = %label(&attempt), "cannot send the subtask to a guest: {e}");
                self.lock().ended.push(VmEnd::Completed(Completion {
                    stdout_data: None,
                    attempt,
                    host: self.shared.opts.host.clone(),
                    exit_code: None,
                    signal: None,
                    error: Some(format!("cannot send the subtask to a grid VM: {e}")),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    stdout_size: 0,
                    stderr_size: 0,
                    duration_ms: 0,
                }));
                self.shared.activity.notify();
                return Ok(());
            }
        };
        let now = Instant::now();
        let cap = self.shared.opts.output_cap;
        let mut st = self.lock();
        let Some((name, vm)) = st.vms.iter_mut().find(|(_, v)| v.is_idle()) else {
            // Raced with a pause or failure: rebuild the assignment.
            drop(st);
            let HostMsg::RunSubtask(r) = msg else {
                unreachable!("built above as RunSubtask")
            };
            return Err(Assignment {
                network: sparegrid_proto::Network::None,
                attempt,
                argv: r.argv,
                env: r.env,
                stdin: r.stdin,
                timeout_ms,
                vcpus,
                memory_mib,
            });
        };
        tracing::debug!(vm = %name, subtask = %label(&attempt), id, "starting a subtask in a grid VM");
        if let Some(tx) = vm.session.as_ref().and_then(|s| s.tx.as_ref()) {
            let _ = tx.send(frame);
        }
        let stdout = self.shared.opts.stdout_assembly(&attempt);
        vm.job = Some(Job {
            id,
            attempt,
            timeout_ms,
            started: now,
            paused_at_start: vm.paused_now(now),
            cancelled: None,
            guest_cap: self.shared.opts.guest_cap(memory_mib),
            stdout,
            stderr: Assembly::new(cap),
            replaying: false,
            pending: None,
        });
        Ok(())
    }

    /// Cancels the attempt in its guest; it is not reported. Its VM is idle
    /// again once the guest's Result for it arrives.
    pub fn cancel(&self, attempt: &AttemptRef) {
        let now = Instant::now();
        let mut st = self.lock();
        for (name, vm) in st.vms.iter_mut() {
            let paused = vm.paused_now(now);
            let Some(job) = vm.job.as_mut().filter(|j| j.attempt == *attempt) else {
                continue;
            };
            if job.cancelled.is_some() {
                return;
            }
            job.cancelled = Some((now, paused));
            let id = job.id;
            tracing::debug!(vm = %name, subtask = %label(attempt), "cancelling a subtask in a grid VM");
            if vm.failed.is_some() {
                // Its session is gone; nothing to tell.
                vm.job = None;
            } else {
                vm.send(&HostMsg::Cancel { id });
            }
            return;
        }
    }

    /// How subtasks ended since the last call.
    pub fn take_ended(&self) -> Vec<VmEnd> {
        std::mem::take(&mut self.lock().ended)
    }

    /// The attempts running in VMs (not the cancelled ones).
    pub fn running(&self) -> Vec<AttemptRef> {
        self.lock()
            .vms
            .values()
            .filter_map(|v| v.job.as_ref())
            .filter(|j| j.cancelled.is_none())
            .map(|j| j.attempt.clone())
            .collect()
    }

    /// Bumped on every Hello, end and failure.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.shared.activity
    }

    /// Every attached VM's link.
    pub fn snapshot(&self) -> Vec<VmLinkStatus> {
        let now = Instant::now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.lock()
            .vms
            .iter()
            .map(|(name, v)| {
                let paused = v.paused_now(now);
                let job = v.job.as_ref().filter(|j| j.cancelled.is_none());
                VmLinkStatus {
                    vm: name.clone(),
                    state: v.state(),
                    attempt: job.map(|j| j.attempt.clone()),
                    paused_ms: ms(paused),
                    subtask_paused_ms: v
                        .job
                        .as_ref()
                        .map_or(0, |j| ms(paused.saturating_sub(j.paused_at_start))),
                    output_bytes: v
                        .job
                        .as_ref()
                        .map_or(0, |j| j.stdout.received() + j.stderr.received()),
                    last_frame_ms: v.last_frame.map(|t| ms(now.saturating_duration_since(t))),
                    worker_version: v.worker_version.clone(),
                    failure: v.failed.as_ref().map(|f| f.to_string()),
                }
            })
            .collect()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for GuestPool {
    /// Ends every session (their threads exit on their next tick).
    fn drop(&mut self) {
        let mut st = self.lock();
        st.closed = true;
        for vm in st.vms.values_mut() {
            if let Some(s) = vm.session.take() {
                s.close();
            }
        }
    }
}
