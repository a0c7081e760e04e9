//! The runner: a queue of pushed [`Assignment`]s, the subtasks started from
//! it on a [`Backend`], and the outbox of [`Completion`]s the client thread
//! reports.
//!
//! **Backends.** [`Backend::Process`]: [`RunningSubtask`]s started with
//! [`Executor`], host processes in the grid cgroup (the process runtime),
//! which the runner suspends and resumes itself. [`Backend::Vms`]: each
//! subtask goes to an idle grid VM of the [`GuestPool`] over the guest
//! channel (the libvirt runtime); the control loop pauses and resumes the
//! VMs, and a subtask whose VM was reclaimed or whose guest failed comes
//! back as handed back ("preempted"): the client releases it, so the
//! controller requeues it without counting a failed attempt. Queued work
//! starts only while an idle VM is ready.
//!
//! Starting processes happens in [`Runner::tick`], called by the runner
//! thread; the push handler only queues ([`Runner::submit`]), and the client
//! thread reads the running set and drains the outboxes. Killing happens
//! where it is asked for ([`Runner::withdraw`] from a heartbeat reply or
//! the stop route, [`Runner::release_all`] when draining), outside the
//! lock. An assignment whose attempt is already queued, running or recently
//! finished is ignored (a repeated push). A withdrawn attempt is killed and
//! not reported: the controller has already handed it elsewhere or
//! cancelled it.
//!
//! **Overlay network.** An assignment with `network = overlay` runs, on the
//! process backend, in a fresh grid namespace on the host's grid bridge
//! ([`Runner::with_overlay`], [`crate::overlay`]), torn down when it ends.
//! On the grid VM backend it gets a guest address whose settings go into
//! its environment (the guest worker configures the NIC from them), is
//! sent to an idle VM, and that VM gets a NIC on the bridge hot-plugged
//! ([`Runner::with_vm_nics`], [`crate::overlay::vm`]) until the subtask is
//! over (ended, withdrawn, released, stopped); a VM that cannot take the
//! NIC has the subtask cancelled and failed with the reason. Without an
//! overlay (no tunnel, or no slice leased yet), or on grid VMs without a
//! NIC plug ([`VM_OVERLAY_MISSING`]), it ends at once with an error in its
//! completion.
//!
//! **Peer-to-peer attempts** ([`Runner::submit_p2p`], taken from the
//! agent's durable peer queue by [`crate::peer::node`]) run like pushed
//! ones but never reach the controller through the runner: they are left
//! out of the heartbeat's running list (the controller only waits for
//! their completions), their completions go to [`Runner::take_p2p`]
//! instead of the outbox, and an attempt handed back (drain, shutdown,
//! preempted VM, withdrawn) goes back to the peer queue, not to the
//! controller.
//!
//! **Migration** (`reclaim_mode = "migrate"`, [`crate::migrate`]): an
//! attempt in a saved VM that moved to another host leaves without a report
//! ([`Runner::migrated_out`]); one that arrived in a VM from another host
//! runs here ([`Runner::adopt_in_vm`]).
//!
//! **Draining.** [`Runner::release_all`] kills everything queued or running
//! and moves those attempts to the release outbox, which the client thread
//! sends as a [`Release`](sparegrid_proto::grid::Release) so the controller
//! requeues them at once. While draining the runner takes no new work
//! ([`Runner::submit`] refuses it, the heartbeat reports no free slot);
//! finished attempts already in the outbox are still reported.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};
use sparegrid_proto::overlay::Network;

use std::sync::Arc;

use crate::guestlink::{GuestPool, VmEnd};
use crate::overlay::{HostNet, NicPlug, OverlayError, VmNic};
use crate::subtask::{label, Activity, Executor, RunningSubtask, SubtaskError};

/// Where subtasks run (see the module docs).
pub enum Backend {
    /// Host processes in the grid cgroup (process runtime).
    Process(Executor),
    /// Grid VMs over the guest channel (libvirt runtime).
    Vms(Arc<GuestPool>),
}

impl From<Executor> for Backend {
    fn from(e: Executor) -> Backend {
        Backend::Process(e)
    }
}

impl Backend {
    fn activity(&self) -> &Arc<Activity> {
        match self {
            Backend::Process(e) => e.activity(),
            Backend::Vms(p) => p.activity(),
        }
    }
}

/// The reason given to the controller for attempts handed back because
/// their grid VM went away (not a failure).
pub const PREEMPTED: &str = "preempted: its grid VM was reclaimed";

/// The error of a `network = overlay` subtask on grid VMs when the runner
/// has no way to plug NICs ([`Runner::with_vm_nics`]).
pub const VM_OVERLAY_MISSING: &str =
    "network = overlay: this agent cannot give grid VMs an overlay NIC (no NIC plug configured)";

/// A completion for an attempt that never ran in a grid VM.
fn vm_error(pool: &GuestPool, attempt: AttemptRef, error: String) -> Completion {
    Completion {
        stdout_data: None,
        attempt,
        host: pool.options().host.clone(),
        exit_code: None,
        signal: None,
        error: Some(error),
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_size: 0,
        stderr_size: 0,
        duration_ms: 0,
    }
}

/// Peer-to-peer attempts that are over in the runner ([`Runner::take_p2p`]).
#[derive(Debug, Default)]
pub struct P2pEnds {
    /// Finished: their completions, to keep in the peer queue's outbox.
    pub done: Vec<Completion>,
    /// Handed back unfinished: queued again in the peer queue.
    pub back: Vec<AttemptRef>,
    /// Stopped by the controller: over, nothing to report.
    pub stopped: Vec<AttemptRef>,
}

pub struct Runner {
    backend: Backend,
    /// The host's grid bridge, for `network = overlay` subtasks.
    overlay: Option<Arc<HostNet>>,
    /// Hot-plugs grid VMs' overlay NICs (libvirt runtime).
    vm_nics: Option<Arc<dyn NicPlug>>,
    state: Mutex<State>,
    /// Bumped when something is added to the outbox or the release list,
    /// so the client thread reports it at once instead of on its next tick.
    reports: Activity,
}

#[derive(Default)]
struct State {
    queued: VecDeque<Assignment>,
    /// Started on the process backend.
    running: Vec<RunningSubtask>,
    /// Started in a grid VM (the pool holds them).
    in_vm: Vec<AttemptRef>,
    outbox: Vec<Completion>,
    /// Attempts that finished recently (bounded by `RECENT_DONE`), so a
    /// repeated push of one never runs it twice.
    done: VecDeque<AttemptRef>,
    /// When the runner suspended its subtasks, while it has them suspended.
    suspended_since: Option<Instant>,
    /// Attempts handed back unfinished, not yet sent to the controller.
    released: Vec<AttemptRef>,
    /// Why the runner drains (no new work), while it does.
    draining: Option<String>,
    /// Queued or running attempts that came from the peer queue.
    p2p: HashSet<AttemptRef>,
    /// Peer-to-peer attempts finished, for [`Runner::take_p2p`].
    p2p_done: Vec<Completion>,
    /// Peer-to-peer attempts handed back unfinished, for the peer queue.
    p2p_back: Vec<AttemptRef>,
    /// Peer-to-peer attempts the controller stopped (job cancelled).
    p2p_stopped: Vec<AttemptRef>,
    /// Overlay NICs plugged into grid VMs: (attempt, VM, NIC).
    vm_nics: Vec<(AttemptRef, String, VmNic)>,
}

/// How many finished attempts the runner remembers to refuse repeats.
const RECENT_DONE: usize = 4096;

impl State {
    fn finished(&mut self, c: Completion) {
        self.remember(c.attempt.clone());
        if self.p2p.remove(&c.attempt) {
            self.p2p_done.push(c);
        } else {
            self.outbox.push(c);
        }
    }

    /// An attempt handed back unfinished: peer-to-peer ones go back to the
    /// peer queue, the others to the controller.
    fn hand_back(&mut self, a: AttemptRef) {
        if self.p2p.remove(&a) {
            self.p2p_back.push(a);
        } else {
            self.released.push(a);
        }
    }

    /// Reports waiting for the client or the peer node.
    fn pending_reports(&self) -> usize {
        self.outbox.len()
            + self.released.len()
            + self.p2p_done.len()
            + self.p2p_back.len()
            + self.p2p_stopped.len()
    }

    /// Takes the overlay NICs of the attempts `over` picks, to unplug.
    fn take_nics(&mut self, over: impl Fn(&AttemptRef) -> bool) -> Vec<(String, VmNic)> {
        let (gone, keep) = std::mem::take(&mut self.vm_nics)
            .into_iter()
            .partition(|(a, _, _)| over(a));
        self.vm_nics = keep;
        gone.into_iter().map(|(_, vm, nic)| (vm, nic)).collect()
    }

    /// Remembers an attempt that is over here (finished, withdrawn or
    /// released), so a repeated push never runs it again.
    fn remember(&mut self, a: AttemptRef) {
        if self.done.len() == RECENT_DONE {
            self.done.pop_front();
        }
        self.done.push_back(a);
    }
}

impl Runner {
    pub fn new(backend: impl Into<Backend>) -> Runner {
        Runner {
            backend: backend.into(),
            overlay: None,
            vm_nics: None,
            state: Mutex::new(State::default()),
            reports: Activity::default(),
        }
    }

    /// Gives the runner the host's grid bridge: `network = overlay`
    /// subtasks then run in a grid namespace on it (process backend).
    /// Without it, or before the controller leased a slice, such a subtask
    /// ends at once with an error saying so.
    pub fn with_overlay(mut self, overlay: Option<Arc<HostNet>>) -> Runner {
        self.overlay = overlay;
        self
    }

    /// Lets `network = overlay` subtasks run in grid VMs: each gets a NIC
    /// on the grid bridge, hot-plugged by `plug` while it runs (see
    /// [`crate::overlay::vm`]). Needs [`Runner::with_overlay`] too.
    pub fn with_vm_nics(mut self, plug: Option<Arc<dyn NicPlug>>) -> Runner {
        self.vm_nics = plug;
        self
    }

    /// A guest address for an overlay subtask in a grid VM.
    fn vm_nic(&self) -> Result<VmNic, String> {
        let Some(host) = &self.overlay else {
            return Err(OverlayError::NotConfigured.to_string());
        };
        if self.vm_nics.is_none() {
            return Err(VM_OVERLAY_MISSING.into());
        }
        host.attach_vm().map_err(|e| e.to_string())
    }

    /// Unplugs overlay NICs of attempts that are over (outside the lock);
    /// dropping each gives its address back.
    fn unplug(&self, nics: Vec<(String, VmNic)>) {
        let Some(plug) = &self.vm_nics else { return };
        for (vm, nic) in nics {
            if let Err(e) = plug.unplug(&vm, &nic) {
                tracing::warn!("grid VM {vm}: cannot unplug its overlay NIC: {e}");
            }
        }
    }

    /// Plugs the NICs of overlay subtasks just sent to grid VMs; a subtask
    /// whose VM cannot take its NIC is cancelled and ends with the error.
    /// Returns whether a completion was added.
    fn plug(&self, pool: &GuestPool, started: Vec<(AttemptRef, VmNic)>) -> bool {
        let (Some(plug), false) = (&self.vm_nics, started.is_empty()) else {
            return false;
        };
        let vms = pool.snapshot();
        let mut failed = false;
        for (attempt, nic) in started {
            let Some(vm) = vms
                .iter()
                .find(|s| s.attempt.as_ref() == Some(&attempt))
                .map(|s| s.vm.clone())
            else {
                // Already over (its end is reported on the next tick).
                continue;
            };
            match plug.plug(&vm, &nic) {
                Ok(()) => {
                    let mut st = self.lock();
                    if st.in_vm.contains(&attempt) {
                        tracing::debug!(
                            "subtask {}: overlay NIC {} ({}) plugged into grid VM {vm}",
                            label(&attempt),
                            nic.mac(),
                            nic.cidr()
                        );
                        st.vm_nics.push((attempt, vm, nic));
                    } else {
                        drop(st);
                        self.unplug(vec![(vm, nic)]);
                    }
                }
                Err(e) => {
                    tracing::warn!("subtask {}: {e}", label(&attempt));
                    pool.cancel(&attempt);
                    let mut st = self.lock();
                    if let Some(i) = st.in_vm.iter().position(|a| *a == attempt) {
                        st.in_vm.swap_remove(i);
                        st.finished(vm_error(
                            pool,
                            attempt,
                            format!("network = overlay: cannot give grid VM {vm} its NIC: {e}"),
                        ));
                        failed = true;
                    }
                }
            }
        }
        failed
    }

    /// Starts one assignment on the process backend, in a grid namespace
    /// when it asks for the overlay.
    fn start_process(
        &self,
        executor: &Executor,
        a: &Assignment,
    ) -> Result<RunningSubtask, SubtaskError> {
        let net = match a.network {
            Network::None => None,
            Network::Overlay => {
                let attached = match &self.overlay {
                    Some(host) => host.attach_namespace(&label(&a.attempt)),
                    None => Err(OverlayError::NotConfigured),
                };
                Some(attached.map_err(|source| SubtaskError::Network {
                    subtask: label(&a.attempt),
                    source,
                })?)
            }
        };
        executor.start_with(a, net)
    }

    /// The driver's wake-up counter: bumped when a subtask ends or new work
    /// is queued. Read it before [`Runner::tick`], then wait with
    /// [`Runner::wait_for_work`].
    pub fn work_seen(&self) -> u64 {
        self.backend.activity().seen()
    }

    /// Sleeps until a subtask ended or work was queued since `seen`, or
    /// `timeout` passed.
    pub fn wait_for_work(&self, seen: u64, timeout: std::time::Duration) {
        self.backend.activity().wait_since(seen, timeout);
    }

    /// The reporter's wake-up counter: bumped when a completion or a
    /// released attempt is waiting to be sent.
    pub fn reports_seen(&self) -> u64 {
        self.reports.seen()
    }

    /// Sleeps until something new waits to be reported since `seen`, or
    /// `timeout` passed.
    pub fn wait_for_reports(&self, seen: u64, timeout: std::time::Duration) {
        self.reports.wait_since(seen, timeout);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues assignments; the next tick starts them. Returns how many were
    /// new (not already queued, running or recently finished). Takes
    /// nothing while draining.
    pub fn submit(&self, batch: Vec<Assignment>) -> usize {
        let mut st = self.lock();
        if st.draining.is_some() {
            return 0;
        }
        let mut added = 0;
        for a in batch {
            let known = st.queued.iter().any(|q| q.attempt == a.attempt)
                || st.running.iter().any(|r| *r.attempt() == a.attempt)
                || st.in_vm.contains(&a.attempt)
                || st.done.contains(&a.attempt);
            if known {
                tracing::debug!(
                    "subtask {}: already here, ignoring the repeat",
                    label(&a.attempt)
                );
                continue;
            }
            st.queued.push_back(a);
            added += 1;
        }
        drop(st);
        if added > 0 {
            self.backend.activity().notify();
        }
        added
    }

    /// Queues one attempt taken from the peer queue (see the module docs).
    /// Returns false, taking nothing, while draining or when the attempt
    /// is already here: the caller puts it back in the peer queue.
    pub fn submit_p2p(&self, a: Assignment) -> bool {
        let mut st = self.lock();
        let known = st.queued.iter().any(|q| q.attempt == a.attempt)
            || st.running.iter().any(|r| *r.attempt() == a.attempt)
            || st.in_vm.contains(&a.attempt);
        if st.draining.is_some() || known {
            return false;
        }
        // A p2p attempt may come back after it ran here and went to a peer
        // (it is in the recent list then): the peer queue decides.
        st.done.retain(|d| *d != a.attempt);
        st.p2p.insert(a.attempt.clone());
        st.queued.push_back(a);
        drop(st);
        self.backend.activity().notify();
        true
    }

    /// Takes the peer-to-peer attempts that finished, were handed back,
    /// or were stopped by the controller.
    pub fn take_p2p(&self) -> P2pEnds {
        let mut st = self.lock();
        P2pEnds {
            done: std::mem::take(&mut st.p2p_done),
            back: std::mem::take(&mut st.p2p_back),
            stopped: std::mem::take(&mut st.p2p_stopped),
        }
    }

    /// Wakes whoever waits in [`Runner::wait_for_reports`].
    pub fn notify_reports(&self) {
        self.reports.notify();
    }

    /// Attempts queued or running that the controller handed out (pushed
    /// or leased; not peer-to-peer ones): the heartbeat's running list.
    pub fn attempts(&self) -> Vec<AttemptRef> {
        let st = self.lock();
        st.running
            .iter()
            .map(|r| r.attempt().clone())
            .chain(st.in_vm.iter().cloned())
            .chain(st.queued.iter().map(|a| a.attempt.clone()))
            .filter(|a| !st.p2p.contains(a))
            .collect()
    }

    /// Subtasks this agent can take now: `slots` minus those queued or
    /// running; with grid VMs, also no more than the idle ready VMs not
    /// already spoken for by queued work.
    pub fn free_slots(&self, slots: u32) -> u32 {
        let st = self.lock();
        let busy = st.running.len() + st.in_vm.len() + st.queued.len();
        let free = (slots as usize).saturating_sub(busy);
        let free = match &self.backend {
            Backend::Process(_) => free,
            Backend::Vms(pool) => free.min(pool.idle().saturating_sub(st.queued.len())),
        };
        free as u32
    }

    /// How long the runner has kept its subtasks suspended, ms (0 if not).
    pub fn suspended_ms(&self) -> u64 {
        self.lock()
            .suspended_since
            .map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    /// Kills (and forgets) the listed attempts, queued or running, and
    /// drops their unsent completions. Returns how many it found queued or
    /// running.
    pub fn withdraw(&self, refs: &[AttemptRef]) -> usize {
        if refs.is_empty() {
            return 0;
        }
        let in_vm_gone;
        let nics;
        let (queued, dropped): (usize, Vec<RunningSubtask>) = {
            let mut st = self.lock();
            let before = st.queued.len();
            st.queued.retain(|a| !refs.contains(&a.attempt));
            let queued = before - st.queued.len();
            let (gone, keep) = std::mem::take(&mut st.running)
                .into_iter()
                .partition(|r| refs.contains(r.attempt()));
            st.running = keep;
            let in_vm_before = st.in_vm.len();
            st.in_vm.retain(|a| !refs.contains(a));
            in_vm_gone = in_vm_before - st.in_vm.len();
            nics = st.take_nics(|a| refs.contains(a));
            st.outbox.retain(|c| !refs.contains(&c.attempt));
            st.released.retain(|a| !refs.contains(a));
            for a in refs {
                if !st.done.contains(a) {
                    st.remember(a.clone());
                }
                // A stopped p2p attempt (its job was cancelled) is over: the
                // peer queue marks it done with nothing to report.
                if st.p2p.remove(a) {
                    st.p2p_stopped.push(a.clone());
                }
            }
            (queued, gone)
        };
        let n = queued + dropped.len() + in_vm_gone;
        if n > 0 {
            // A slot is free: wake whoever waits for one (the lease loop).
            self.reports.notify();
        }
        if let Backend::Vms(pool) = &self.backend {
            for a in refs {
                pool.cancel(a);
            }
        }
        self.unplug(nics);
        for mut r in dropped {
            tracing::info!(
                "subtask {}: withdrawn by the controller",
                label(r.attempt())
            );
            r.cancel("withdrawn by the controller");
            // Dropping a running subtask kills its group and reaps it.
        }
        n
    }

    /// Starts draining for `reason` (no new work) and hands back everything
    /// queued or running: killed, not reported, listed for the client to
    /// release. Returns how many attempts it handed back.
    pub fn release_all(&self, reason: &str) -> usize {
        let (queued, running, in_vm, nics) = {
            let mut st = self.lock();
            st.draining.get_or_insert_with(|| reason.to_owned());
            let queued: Vec<AttemptRef> = st.queued.drain(..).map(|a| a.attempt).collect();
            let running = std::mem::take(&mut st.running);
            let in_vm = std::mem::take(&mut st.in_vm);
            let over: Vec<AttemptRef> = queued
                .iter()
                .cloned()
                .chain(running.iter().map(|r| r.attempt().clone()))
                .chain(in_vm.iter().cloned())
                .collect();
            for a in over {
                st.remember(a.clone());
                st.hand_back(a);
            }
            let nics = st.take_nics(|_| true);
            (queued, running, in_vm, nics)
        };
        let n = queued.len() + running.len() + in_vm.len();
        if let Backend::Vms(pool) = &self.backend {
            for a in &in_vm {
                pool.cancel(a);
            }
        }
        self.unplug(nics);
        if n > 0 {
            tracing::info!("{reason}: handing {n} grid subtasks back to the controller");
            self.reports.notify();
        }
        for mut r in running {
            r.cancel(reason.to_owned());
        }
        n
    }

    /// Why the runner drains, if it does.
    pub fn draining(&self) -> Option<String> {
        self.lock().draining.clone()
    }

    /// Ends a drain: new work is taken again.
    pub fn undrain(&self) {
        if self.lock().draining.take().is_some() {
            tracing::info!("grid drain lifted: taking subtasks again");
        }
    }

    /// Takes the attempts to release (all of them).
    pub fn take_released(&self) -> Vec<AttemptRef> {
        std::mem::take(&mut self.lock().released)
    }

    /// Puts attempts that could not be released back.
    pub fn requeue_released(&self, mut a: Vec<AttemptRef>) {
        let mut st = self.lock();
        a.append(&mut st.released);
        st.released = a;
    }

    /// Attempts waiting to be released.
    pub fn released_len(&self) -> usize {
        self.lock().released.len()
    }

    /// Takes up to `max` completions to report.
    pub fn take_outbox(&self, max: usize) -> Vec<Completion> {
        let mut st = self.lock();
        let n = st.outbox.len().min(max);
        st.outbox.drain(..n).collect()
    }

    /// Puts completions that could not be reported back at the front.
    pub fn requeue_outbox(&self, mut c: Vec<Completion>) {
        let mut st = self.lock();
        c.append(&mut st.outbox);
        st.outbox = c;
    }

    pub fn outbox_len(&self) -> usize {
        self.lock().outbox.len()
    }

    /// One round: starts what is queued (unless `suspend`), suspends or
    /// resumes the running subtasks to match `suspend` (process backend;
    /// grid VMs are paused by the control loop), and moves finished ones to
    /// the outbox and handed-back ones to the release list.
    pub fn tick(&self, suspend: bool) {
        match &self.backend {
            Backend::Process(executor) => self.tick_processes(executor, suspend),
            Backend::Vms(pool) => self.tick_vms(pool, suspend),
        }
    }

    fn tick_processes(&self, executor: &Executor, suspend: bool) {
        let mut st = self.lock();
        let reported_before = st.pending_reports();
        if !suspend {
            while let Some(a) = st.queued.pop_front() {
                match self.start_process(executor, &a) {
                    Ok(r) => st.running.push(r),
                    Err(e) => {
                        tracing::warn!("{e}");
                        let c = executor.error_completion(&a, &e);
                        st.finished(c);
                    }
                }
            }
        }
        let mut changed = false;
        for r in st.running.iter_mut() {
            if r.is_done() || r.is_suspended() == suspend {
                continue;
            }
            let res = if suspend { r.suspend() } else { r.resume() };
            match res {
                Ok(()) => changed = true,
                Err(e) => tracing::warn!("{e}"),
            }
        }
        if changed {
            tracing::info!(
                "{} grid subtasks",
                if suspend { "suspended" } else { "resumed" }
            );
        }
        st.suspended_since = match (suspend && !st.running.is_empty(), st.suspended_since) {
            (true, Some(t)) => Some(t),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
        let mut i = 0;
        while i < st.running.len() {
            if let Some(c) = st.running[i].try_wait() {
                st.running.swap_remove(i);
                tracing::debug!(
                    "subtask {}: done (exit {:?}, error {:?})",
                    label(&c.attempt),
                    c.exit_code,
                    c.error
                );
                st.finished(c);
            } else {
                i += 1;
            }
        }
        let more = st.pending_reports() > reported_before;
        drop(st);
        if more {
            self.reports.notify();
        }
    }

    fn tick_vms(&self, pool: &GuestPool, suspend: bool) {
        let ended = pool.take_ended();
        let mut st = self.lock();
        let reported_before = st.pending_reports();
        let mut unplug = Vec::new();
        let mut started = Vec::new();
        for end in ended {
            let over = match &end {
                VmEnd::Completed(c) => &c.attempt,
                VmEnd::HandedBack { attempt, .. } => attempt,
            };
            unplug.extend(st.take_nics(|a| a == over));
            match end {
                VmEnd::Completed(c) => {
                    let Some(i) = st.in_vm.iter().position(|a| *a == c.attempt) else {
                        tracing::debug!(
                            "subtask {}: ended in a VM after it was withdrawn",
                            label(&c.attempt)
                        );
                        continue;
                    };
                    st.in_vm.swap_remove(i);
                    tracing::debug!(
                        "subtask {}: done in a grid VM (exit {:?}, error {:?})",
                        label(&c.attempt),
                        c.exit_code,
                        c.error
                    );
                    st.finished(c);
                }
                VmEnd::HandedBack {
                    attempt,
                    vm,
                    reason,
                } => {
                    let Some(i) = st.in_vm.iter().position(|a| *a == attempt) else {
                        continue;
                    };
                    st.in_vm.swap_remove(i);
                    tracing::info!(
                        "subtask {}: handed back, grid VM {vm} is gone ({reason})",
                        label(&attempt)
                    );
                    st.remember(attempt.clone());
                    st.hand_back(attempt);
                }
            }
        }
        if !suspend && st.draining.is_none() {
            while let Some(mut a) = st.queued.pop_front() {
                let mut nic = None;
                if a.network == Network::Overlay {
                    // The guest configures the NIC from these (its
                    // address, gateway, MAC, MTU); ours win over the job's.
                    match self.vm_nic() {
                        Ok(n) => {
                            a.env
                                .extend(n.env().into_iter().map(|(k, v)| (k.to_owned(), v)));
                            nic = Some(n);
                        }
                        Err(e) => {
                            st.finished(vm_error(pool, a.attempt, e));
                            continue;
                        }
                    }
                }
                let attempt = a.attempt.clone();
                match pool.start(a) {
                    Ok(()) => {
                        st.in_vm.push(attempt.clone());
                        if let Some(n) = nic {
                            started.push((attempt, n));
                        }
                    }
                    Err(a) => {
                        // No idle VM: the address goes back with `nic`.
                        st.queued.push_front(a);
                        break;
                    }
                }
            }
        }
        drop(st);
        self.unplug(unplug);
        self.plug(pool, started);
        let more = self.lock().pending_reports() > reported_before;
        if more {
            self.reports.notify();
        }
    }

    /// Whether attempt `a` running in a grid VM may move to another host
    /// with its VM (`reclaim_mode = "migrate"`): the controller handed it
    /// out (peer-to-peer attempts belong to the peer queue) and it has no
    /// overlay NIC (its address belongs to this host's slice).
    pub fn can_migrate(&self, a: &AttemptRef) -> bool {
        let st = self.lock();
        st.in_vm.contains(a) && !st.p2p.contains(a) && !st.vm_nics.iter().any(|(x, _, _)| x == a)
    }

    /// Attempt `a` left with its VM for another host, which reports it: it
    /// is no longer running here and is never reported from here.
    pub fn migrated_out(&self, a: &AttemptRef) {
        let mut st = self.lock();
        st.in_vm.retain(|x| x != a);
        st.remember(a.clone());
    }

    /// A VM arrived from another host holding attempt `a` (under this
    /// host's epoch): it runs here now, in the heartbeat's running list,
    /// and its end is reported from here.
    pub fn adopt_in_vm(&self, a: AttemptRef) {
        let mut st = self.lock();
        if !st.in_vm.contains(&a) {
            st.in_vm.push(a);
        }
    }

    /// An attempt this host could not run on after all (a VM that arrived
    /// but could not be restored): handed back to the controller, which
    /// requeues it without counting a failure.
    pub fn hand_back(&self, a: AttemptRef) {
        let mut st = self.lock();
        st.in_vm.retain(|x| *x != a);
        st.remember(a.clone());
        st.hand_back(a);
        drop(st);
        self.reports.notify();
    }

    /// Why attempts in the release list are handed back: the drain's
    /// reason while draining, else [`PREEMPTED`].
    pub fn release_reason(&self) -> String {
        self.lock()
            .draining
            .clone()
            .unwrap_or_else(|| PREEMPTED.to_owned())
    }

    /// Kills everything queued or running; nothing is reported (see
    /// [`Runner::release_all`] to hand them back first).
    pub fn stop(&self) {
        let (running, in_vm, nics) = {
            let mut st = self.lock();
            st.queued.clear();
            // Peer-to-peer attempts stay `running` in the peer queue, which
            // requeues them when it is opened again.
            st.p2p.clear();
            (
                std::mem::take(&mut st.running),
                std::mem::take(&mut st.in_vm),
                st.take_nics(|_| true),
            )
        };
        if let Backend::Vms(pool) = &self.backend {
            for a in &in_vm {
                pool.cancel(a);
            }
        }
        self.unplug(nics);
        for mut r in running {
            r.cancel("the agent is stopping");
        }
    }
}

#[cfg(test)]
mod overlay_tests {
    //! `network = overlay` on the runner without root: the errors when
    //! there is no overlay or no lease, and the attachment's commands on a
    //! recorded host (tests/tests/overlay_filter.rs runs the real thing).

    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};
    use sparegrid_proto::overlay::{Network, OverlayLease};

    use super::*;
    use crate::overlay::{OverlaySection, Recorder};
    use crate::subtask::Limits;

    fn assignment(index: u64, network: Network) -> Assignment {
        Assignment {
            attempt: AttemptRef {
                job: "net".into(),
                index,
                epoch: 1,
            },
            argv: vec!["sh".into(), "-c".into(), "echo ran".into()],
            env: BTreeMap::new(),
            stdin: Vec::new(),
            timeout_ms: 10_000,
            vcpus: 1,
            memory_mib: 64,
            network,
        }
    }

    fn run_one(r: &Runner) -> Completion {
        let t = Instant::now();
        loop {
            r.tick(false);
            if let Some(c) = r.take_outbox(1).pop() {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no completion");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn overlay_without_a_tunnel_fails_in_the_completion() {
        let r = Runner::new(Executor::new(None, "h", Limits::default()));
        r.submit(vec![assignment(0, Network::Overlay)]);
        let c = run_one(&r);
        assert_eq!(c.exit_code, None);
        let e = c.error.unwrap();
        assert!(e.contains("no overlay"), "{e}");
        assert!(c.stdout.is_empty(), "it must not run on the host's network");
        // A job without the overlay still runs.
        r.submit(vec![assignment(1, Network::None)]);
        let c = run_one(&r);
        assert_eq!(c.exit_code, Some(0), "{:?}", c.error);
        assert_eq!(c.stdout, b"ran\n");
    }

    #[test]
    fn overlay_before_a_lease_fails_and_after_it_attaches() {
        let rec = Arc::new(Recorder::default());
        // No namespace is made (a recorder), and none of the machine's is
        // entered: an empty directory stands for /run/netns.
        let dir = tempfile::tempdir().unwrap();
        let host = Arc::new(
            HostNet::with_ops(&OverlaySection::default(), rec.clone())
                .unwrap()
                .netns_prefix("sg-grid-")
                .netns_dir(dir.path()),
        );
        let r = Runner::new(Executor::new(None, "h", Limits::default()))
            .with_overlay(Some(Arc::clone(&host)));
        r.submit(vec![assignment(0, Network::Overlay)]);
        let e = run_one(&r).error.unwrap();
        assert!(e.contains("net/0#1") && e.contains("not leased"), "{e}");
        host.apply_lease(&OverlayLease {
            cidr: "100.96.0.0/16".into(),
            slice: "100.96.3.0/24".into(),
            address: "100.96.3.1/24".into(),
        })
        .unwrap();
        rec.take();
        r.submit(vec![assignment(1, Network::Overlay)]);
        let c = run_one(&r);
        let log = rec.take();
        assert!(
            log.contains(&"ip netns add sg-grid-0".to_string()),
            "{log:?}"
        );
        // The recorder made no namespace, so entering it fails: reported.
        let e = c.error.unwrap();
        assert!(
            e.contains(&format!("{}/sg-grid-0", dir.path().display())),
            "{e}"
        );
        // And the namespace is torn down, its address free again.
        assert!(
            log.ends_with(&[
                "ip link del dev sgv0".into(),
                "ip netns del sg-grid-0".into()
            ]),
            "{log:?}"
        );
        assert_eq!(host.status().guests, 0);
    }

    /// Grid VMs on a fake guest (a unix socket played with the proto codec)
    /// and a recording NIC plug.
    mod vms {
        use std::io::{ErrorKind, Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::Mutex;

        use sparegrid_proto::guest::{
            decode_body, encode_frame, FrameDecoder, GuestMsg, Hello, HostMsg, RunSubtask,
            SubtaskResult, MAX_GUEST_FRAME, MAX_HOST_FRAME, PROTOCOL_VERSION,
        };

        use super::*;
        use crate::guestlink::LinkOptions;

        const PATIENCE: Duration = Duration::from_secs(20);

        #[derive(Default)]
        struct FakePlug {
            log: Mutex<Vec<String>>,
            fail: bool,
        }

        impl NicPlug for FakePlug {
            fn plug(&self, vm: &str, nic: &VmNic) -> Result<(), OverlayError> {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("plug {vm} {}", nic.mac()));
                if self.fail {
                    return Err(OverlayError::Command {
                        command: "attach".into(),
                        message: "no PCI slot".into(),
                    });
                }
                Ok(())
            }
            fn unplug(&self, vm: &str, nic: &VmNic) -> Result<(), OverlayError> {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("unplug {vm} {}", nic.mac()));
                Ok(())
            }
        }

        struct Guest {
            s: UnixStream,
            dec: FrameDecoder,
        }

        impl Guest {
            fn recv(&mut self) -> HostMsg {
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(body) = self.dec.next_frame().unwrap() {
                        match decode_body::<HostMsg>(&body).unwrap() {
                            HostMsg::Heartbeat { .. } => {}
                            m => return m,
                        }
                    }
                    let n = self.s.read(&mut buf).expect("a host message in time");
                    assert!(n > 0, "the host closed the channel");
                    self.dec.push(&buf[..n]);
                }
            }
            fn send(&mut self, m: &GuestMsg) {
                self.s
                    .write_all(&encode_frame(m, MAX_GUEST_FRAME).unwrap())
                    .unwrap();
            }
            fn run_subtask(&mut self) -> RunSubtask {
                loop {
                    match self.recv() {
                        HostMsg::RunSubtask(r) => return r,
                        HostMsg::Attach { .. } => {}
                        m => panic!("expected RunSubtask, got {m:?}"),
                    }
                }
            }
        }

        /// A pool with one ready VM `vm1` and a runner on it with the
        /// overlay (a recorded host with a lease) and `plug`.
        fn setup(
            plug: Arc<FakePlug>,
        ) -> (
            tempfile::TempDir,
            Arc<GuestPool>,
            Guest,
            Runner,
            Arc<HostNet>,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("vm1.channel.sock");
            let l = UnixListener::bind(&path).unwrap();
            let pool = GuestPool::new(LinkOptions {
                spill: None,
                host: "h1".into(),
                hello_timeout: Duration::from_secs(30),
                heartbeat: Duration::from_millis(50),
                dead_after: Duration::from_secs(30),
                output_cap: 1 << 20,
            });
            pool.attach("vm1", path);
            l.set_nonblocking(true).unwrap();
            let t = Instant::now();
            let s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && t.elapsed() < PATIENCE => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut g = Guest {
                s,
                dec: FrameDecoder::new(MAX_HOST_FRAME),
            };
            let HostMsg::Attach { session, .. } = g.recv() else {
                panic!("expected Attach");
            };
            g.send(&GuestMsg::Hello(Hello {
                session,
                protocol: PROTOCOL_VERSION,
                worker_version: "test".into(),
                capabilities: vec!["cancel".into()],
                interpreters: vec!["sh".into()],
                vcpus: 1,
                memory_mib: 128,
                current: None,
            }));
            let t = Instant::now();
            while pool.idle() == 0 {
                assert!(t.elapsed() < PATIENCE, "the VM never got ready");
                std::thread::sleep(Duration::from_millis(5));
            }
            let host = Arc::new(
                HostNet::with_ops(&OverlaySection::default(), Arc::new(Recorder::default()))
                    .unwrap(),
            );
            host.apply_lease(&OverlayLease {
                cidr: "100.96.0.0/16".into(),
                slice: "100.96.3.0/24".into(),
                address: "100.96.3.1/24".into(),
            })
            .unwrap();
            let r = Runner::new(Backend::Vms(Arc::clone(&pool)))
                .with_overlay(Some(Arc::clone(&host)))
                .with_vm_nics(Some(plug));
            (dir, pool, g, r, host)
        }

        #[test]
        fn an_overlay_subtask_gets_a_nic_while_it_runs() {
            let plug = Arc::new(FakePlug::default());
            let (_dir, _pool, mut g, r, host) = setup(Arc::clone(&plug));
            let mut a = assignment(0, Network::Overlay);
            // The job cannot pick its own address.
            a.env
                .insert("SPAREGRID_OVERLAY_ADDRESS".into(), "100.96.3.99/24".into());
            r.submit(vec![a]);
            r.tick(false);
            let sub = g.run_subtask();
            assert_eq!(sub.env["SPAREGRID_OVERLAY_ADDRESS"], "100.96.3.2/24");
            assert_eq!(sub.env["SPAREGRID_OVERLAY_GATEWAY"], "100.96.3.1");
            assert_eq!(sub.env["SPAREGRID_OVERLAY_MAC"], "52:54:00:60:03:02");
            assert_eq!(*plug.log.lock().unwrap(), ["plug vm1 52:54:00:60:03:02"]);
            assert_eq!(host.status().guests, 1);
            g.send(&GuestMsg::Result(SubtaskResult {
                id: sub.id,
                exit_code: Some(0),
                signal: None,
                error: None,
                duration_ms: 5,
                stdout_size: 0,
                stderr_size: 0,
                stdout_truncated: false,
                stderr_truncated: false,
                timed_out: false,
            }));
            let c = run_one(&r);
            assert_eq!((c.exit_code, c.error), (Some(0), None));
            // Unplugged and its address free once the subtask is over.
            assert_eq!(
                *plug.log.lock().unwrap(),
                ["plug vm1 52:54:00:60:03:02", "unplug vm1 52:54:00:60:03:02"]
            );
            assert_eq!(host.status().guests, 0);
        }

        #[test]
        fn a_vm_that_cannot_take_the_nic_fails_the_subtask() {
            let plug = Arc::new(FakePlug {
                fail: true,
                ..Default::default()
            });
            let (_dir, _pool, _g, r, host) = setup(plug);
            r.submit(vec![assignment(0, Network::Overlay)]);
            let c = run_one(&r);
            let e = c.error.unwrap();
            assert!(
                e.contains("cannot give grid VM vm1 its NIC") && e.contains("no PCI slot"),
                "{e}"
            );
            assert_eq!(host.status().guests, 0);
            assert!(r.attempts().is_empty());
        }

        #[test]
        fn without_a_plug_an_overlay_subtask_fails_in_a_vm() {
            let (_dir, pool, _g, _r, host) = setup(Arc::new(FakePlug::default()));
            let r = Runner::new(Backend::Vms(pool)).with_overlay(Some(host));
            r.submit(vec![assignment(0, Network::Overlay)]);
            assert_eq!(run_one(&r).error.as_deref(), Some(VM_OVERLAY_MISSING));
        }
    }
}
