//! Push dispatch, agent side: joins a controller when `controller.url` is
//! set (nothing here runs otherwise). With `controller.dispatch = "pull"`
//! the agent leases work instead of having it pushed: see [`pull`] (a third
//! thread, and the renewals and completions the client thread sends for
//! it).
//!
//! Two std threads (three when pulling), no async code:
//! - **client** (`sparegrid-grid-client`): registers ([`Register`] with the
//!   host, version, the URL the controller pushes to and `controller.slots`),
//!   heartbeats every [`Registered::heartbeat_ms`] with the load read from the
//!   shared status (see [`heartbeat`]), registers again when a heartbeat gets
//!   409 `must_register`, kills the attempts a [`HeartbeatReply`] withdraws,
//!   reports finished attempts (`Vec<Completion>`, at most
//!   [`COMPLETION_BATCH`] a request) and hands back released ones
//!   ([`Release`], `POST /v1/agents/release`), with exponential backoff
//!   (0.2 s doubling to 10 s) while the controller cannot be reached.
//!   Completions or releases the controller refuses outright (400/413/415)
//!   are logged and dropped. A successful completion whose stdout spilled
//!   past the 1 MiB sent inline is first uploaded to the controller on a
//!   thread of its own ([`outputs`]) and comes back to the outbox with
//!   `stdout_data`.
//! - **runner** (`sparegrid-grid-runner`): starts queued assignments with
//!   the runner's [`Backend`] (host processes in the daemon's grid cgroup
//!   with the process runtime, grid VMs over the guest channel with
//!   libvirt), applies
//!   the suspend decision and collects ends; see [`runner`]. It wakes when
//!   a push queues work or a subtask ends (the executor's activity
//!   counter), and at least every 50 ms for the suspend decision. The
//!   client wakes the same way when a completion or release is waiting, so
//!   a no-op subtask's round trip is not paced by a tick.
//!
//! **Overlay** (with `[tunnel] enabled`, [`OverlayParts`]): the
//! registration carries the tunnel's public key and port
//! (`Register.tunnel`); the lease in `Registered.overlay` brings the
//! tunnel up (or moves it to a changed slice) and sets up the host's grid
//! bridge ([`crate::overlay::HostNet`], when given); every heartbeat
//! carries the tunnel's per-peer report and the peer-list version applied
//! (`Heartbeat.tunnel`), and a `HeartbeatReply.overlay_peers` is applied
//! live. A lease that could not be applied is tried again with the
//! heartbeats (backing off from 0.2 s to 10 s). The client thread makes these calls (blocking but short).
//!
//! Routes ([`routes`]), MessagePack bodies; with `controller.token` set
//! they need `Authorization: Bearer <token>` (401 `unauthorized`); a body
//! that is not the expected message is a 400 `malformed_msgpack`; bodies
//! are capped at [`MAX_BATCH_BYTES`]:
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/subtasks` | [`AssignBatch`] | 202 `{"accepted": n}` (queued only); 503 `draining` while the agent drains |
//! | `POST /v1/subtasks/stop` | [`StopBatch`] | 200 `{"stopped": n}`: those attempts are killed at once and not reported |
//!
//! The controller pushes a stop when it cancels a job; the heartbeat reply
//! stays the fallback (it withdraws every reported attempt that is no
//! longer current).
//!
//! **Suspension** ([`SuspendGate`]): the runner suspends all its subtasks
//! while any grid VM is suspended or the load factor (the larger of the
//! smoothed load and the CPU-window peak, as the VM policy does) is above
//! `policy.suspend_above`, and resumes them once no VM is suspended and the
//! smoothed load has stayed below `policy.resume_below` for
//! `policy.resume_after` (the VM policy's rule). Queued assignments do not
//! start while suspended. How long the runner has kept them suspended
//! counts in the heartbeat's `suspended_ms`, so the controller's
//! `withdraw_after` moves them elsewhere.
//!
//! **Drain and shutdown** hand work back. While the agent drains
//! (`POST /v1/drain`, seen in the shared status) the runner kills what is
//! queued or running and the client releases those attempts, so the
//! controller requeues them at once (not as failures); the push route
//! answers 503 and heartbeats report no free slot until the drain is
//! lifted. On shutdown ([`GridHandle::begin_shutdown`] on SIGTERM, then
//! [`Grid::stop`]) the same happens, and the client spends at most
//! [`SHUTDOWN_WAIT`] sending the releases and the completions not yet
//! reported before it exits; what it could not send is logged (the
//! controller requeues it when the host's heartbeats stop).
//!
//! **Reload** ([`GridHandle::reload`] on SIGHUP): new `controller.slots`,
//! `advertise_url`, `token` or `ca_cert` apply at once: the client
//! registers again with them (running subtasks keep running; the next
//! heartbeat reports them and the controller keeps them), and the push
//! routes take the new token. A new `controller.url` first hands every
//! subtask back to the old controller (one bounded try), then joins the new
//! one. The `[policy]` thresholds apply from the next runner tick. Turning
//! the grid client on or off (`url` empty ↔ set) needs a restart: the
//! routes are mounted at start.

pub mod client;
pub mod outputs;
pub mod pull;
pub mod runner;

#[cfg(test)]
mod pull_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use sparegrid_proto::grid::{AssignBatch, Heartbeat, Register, Registered, Release, StopBatch};
use sparegrid_proto::overlay::{OverlayLease, OverlayPeers};
use sparegrid_proto::{AgentStatus, VmState};

use crate::config::{AgentDispatch, Config, ControllerSection, PolicySection};
use crate::daemon::status::Shared;

use crate::peer::node::Node;
use crate::tunnel::TunnelService;
use client::{ClientError, ControllerClient};
use runner::{Backend, Runner};

/// Most completions sent in one request.
pub const COMPLETION_BATCH: usize = 16;
/// Most attempts released in one request.
pub const RELEASE_BATCH: usize = 256;
/// Largest `POST /v1/subtasks` body.
pub const MAX_BATCH_BYTES: usize = 64 << 20;
/// Longest the client spends handing work back when the agent stops.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

const TICK: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest one try at handing work back to a controller being left.
const SWITCH_WAIT: Duration = Duration::from_secs(2);

/// What the threads read on every round; replaced on reload.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    host: String,
    controller: ControllerSection,
    policy: PolicySection,
    /// Where the controller pushes to ([`agent_url`]).
    agent_url: String,
    /// The transfer endpoint, when served ([`crate::migrate::transfer_url`]).
    transfer_url: Option<String>,
    /// Takes saved grid VMs from other hosts ([`crate::migrate::accepts`]).
    migrate_in: bool,
    /// Images it serves ([`crate::images::served`]).
    images: Vec<String>,
    /// Takes part in peer-to-peer jobs (a [`Node`] runs).
    p2p: bool,
}

impl Settings {
    fn of(cfg: &Config, host: &str) -> Settings {
        Settings {
            host: host.to_string(),
            controller: cfg.controller.clone(),
            policy: cfg.policy.clone(),
            agent_url: agent_url(cfg, host),
            transfer_url: cfg
                .transfer
                .enabled
                .then(|| crate::migrate::transfer_url(cfg, host)),
            migrate_in: crate::migrate::accepts(cfg),
            images: crate::images::served(cfg),
            p2p: p2p_enabled(cfg),
        }
    }

    fn pulls(&self) -> bool {
        self.controller.dispatch == AgentDispatch::Pull
    }

    fn register(&self) -> Register {
        Register {
            migrate_in: self.migrate_in,
            images: self.images.clone(),
            transfer_url: self.transfer_url.clone(),
            tunnel: None,
            host: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            // A pulling agent cannot be reached: the controller never
            // pushes to a host without a URL.
            agent_url: (!self.pulls()).then(|| self.agent_url.clone()),
            slots: self.controller.slots,
            p2p: self.p2p,
        }
    }
}

/// State shared by the threads, the routes and the handles.
struct Inner {
    runner: Arc<Runner>,
    /// The settings and a generation bumped on every change.
    settings: Mutex<(u64, Settings)>,
    /// Set by [`GridHandle::begin_shutdown`]: hand everything back, flush,
    /// exit.
    finishing: AtomicBool,
    /// When `finishing` was set.
    finish_at: Mutex<Option<Instant>>,
    /// Stops both threads now.
    stop: AtomicBool,
    /// Pull mode: the attempts held on lease (empty when pushed to).
    leases: pull::Leases,
    /// Peer-to-peer work stealing, when this agent takes part.
    node: Option<Arc<Node>>,
    overlay: OverlayParts,
    /// Large outputs uploaded to the controller ([`outputs`]).
    outputs: Arc<outputs::Outputs>,
}

impl Inner {
    /// The uploader of spilled outputs with the current settings.
    fn uploader(&self, s: &Settings) -> outputs::Uploader {
        outputs::Uploader {
            outputs: Arc::clone(&self.outputs),
            runner: Arc::clone(&self.runner),
            host: s.host.clone(),
            controller: s.controller.clone(),
        }
    }
}

/// The overlay's parts the grid client drives (see the module docs);
/// both absent without `[tunnel] enabled`.
#[derive(Clone, Default)]
pub struct OverlayParts {
    /// The WireGuard endpoint: registered, brought up on the lease, fed
    /// the peer list, reported in heartbeats.
    pub tunnel: Option<Arc<TunnelService>>,
    /// The grid bridge and its filtering, given every lease; the runner
    /// attaches `network = overlay` subtasks to it.
    pub host_net: Option<Arc<crate::overlay::HostNet>>,
    /// Hot-plugs grid VMs' overlay NICs (libvirt runtime).
    pub vm_nics: Option<Arc<dyn crate::overlay::vm::NicPlug>>,
}

impl OverlayParts {
    /// Applies a lease from `Registered.overlay`: the tunnel, then the
    /// host's grid bridge. True when both are in place (else try again).
    fn apply_lease(&self, lease: &OverlayLease) -> bool {
        let mut ok = true;
        if let Some(t) = &self.tunnel {
            if let Err(e) = t.apply_lease(lease) {
                tracing::error!(
                    "overlay lease {}: {e} (trying again at the next heartbeat)",
                    lease.slice
                );
                ok = false;
            }
        }
        if let Some(h) = &self.host_net {
            if let Err(e) = h.apply_lease(lease) {
                tracing::error!(
                    "overlay lease {}: grid bridge: {e} (trying again at the next heartbeat)",
                    lease.slice
                );
                ok = false;
            }
        }
        ok
    }

    fn apply_peers(&self, peers: &OverlayPeers) {
        if let Some(t) = &self.tunnel {
            if let Err(e) = t.apply_peers(peers) {
                tracing::warn!(
                    "overlay peer list version {} refused, keeping the current peers: {e}",
                    peers.version
                );
            }
        }
    }
}

impl Inner {
    fn settings(&self) -> MutexGuard<'_, (u64, Settings)> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn token(&self) -> String {
        self.settings().1.controller.token.clone()
    }
}

/// The running grid client: its two threads and the runner.
pub struct Grid {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    /// Pull mode's lease loop (not joined on stop if a long poll holds it).
    puller: Option<JoinHandle<()>>,
}

/// A cheap handle on a running [`Grid`] for the signal thread: reload and
/// begin the shutdown.
#[derive(Clone)]
pub struct GridHandle {
    inner: Arc<Inner>,
}

/// Whether this agent takes part in peer-to-peer jobs: `peers.enabled`
/// and pushed to (a pulling agent cannot be reached by its peers).
pub fn p2p_enabled(cfg: &Config) -> bool {
    cfg.peers.enabled && cfg.controller.dispatch == AgentDispatch::Push
}

/// The URL the controller pushes to: `controller.advertise_url`, else
/// `http://<agent.listen>` with `host` in place of an unspecified address.
pub fn agent_url(cfg: &Config, host: &str) -> String {
    if !cfg.controller.advertise_url.is_empty() {
        return cfg.controller.advertise_url.clone();
    }
    let l: SocketAddr = cfg.agent.listen;
    if l.ip().is_unspecified() {
        format!("http://{host}:{}", l.port())
    } else {
        format!("http://{l}")
    }
}

/// The runner's suspend decision with the policy's hysteresis: suspend at
/// once, resume only after the load stayed below `resume_below` for
/// `resume_after`. Time is passed in, so tests drive it with any clock.
#[derive(Debug, Clone, Default)]
pub struct SuspendGate {
    suspended: bool,
    /// Since when the load has been below `resume_below` with no grid VM
    /// suspended, while the gate is suspended.
    calm_since: Option<Duration>,
}

impl SuspendGate {
    /// Whether the subtasks should be suspended at `now` (any monotonic
    /// clock) given `status`. See the module docs.
    pub fn decide(&mut self, status: &AgentStatus, policy: &PolicySection, now: Duration) -> bool {
        let vm_suspended = status.vms.iter().any(|v| v.state == VmState::Suspended);
        let (load, peak) = status
            .load
            .as_ref()
            .map_or((0.0, 0.0), |l| (l.smoothed, l.peak));
        if vm_suspended || load.max(peak) > policy.suspend_above {
            self.suspended = true;
            self.calm_since = None;
        } else if self.suspended {
            if load < policy.resume_below {
                let since = *self.calm_since.get_or_insert(now);
                if now.saturating_sub(since) >= policy.resume_after {
                    self.suspended = false;
                    self.calm_since = None;
                }
            } else {
                self.calm_since = None;
            }
        }
        self.suspended
    }

    pub fn suspended(&self) -> bool {
        self.suspended
    }
}

/// The heartbeat for `status`: smoothed load, dominant metric, normalised
/// value of every available metric, free slots (`slots` − attempts queued or
/// running; none while draining), those attempts, grid VMs by state, and
/// the longest suspension (of a grid VM, or of the runner's subtasks).
pub fn heartbeat(host: &str, status: &AgentStatus, slots: u32, runner: &Runner) -> Heartbeat {
    let running = runner.attempts();
    let mut vms: BTreeMap<VmState, u32> = BTreeMap::new();
    let mut suspended_ms = runner.suspended_ms();
    for v in &status.vms {
        *vms.entry(v.state).or_default() += 1;
        if v.state == VmState::Suspended {
            suspended_ms = suspended_ms.max(v.in_state_ms);
        }
    }
    let (load, dominant, breakdown) = match &status.load {
        Some(l) => (
            l.smoothed,
            l.dominant,
            l.metrics
                .iter()
                .filter(|m| m.available)
                .map(|m| (m.metric, m.normalised))
                .collect(),
        ),
        None => (0.0, None, BTreeMap::new()),
    };
    // Before the first load sample the host's load is unknown: offer no
    // slots, so the controller does not push work on a reported 0.0 that
    // the first real sample may contradict.
    let free_slots = if runner.draining().is_some() || status.load.is_none() {
        0
    } else {
        runner.free_slots(slots)
    };
    Heartbeat {
        tunnel: None,
        host: host.to_string(),
        load,
        dominant,
        breakdown,
        free_slots,
        running,
        vms,
        suspended_ms,
        renew: Vec::new(),
        steals: Vec::new(),
    }
}

impl Grid {
    /// Starts the client and runner threads for `cfg.controller` (which
    /// must be enabled). Subtasks run on `backend`.
    pub fn start(
        cfg: &Config,
        host: &str,
        backend: impl Into<Backend>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Grid> {
        Self::start_with_overlay(cfg, host, backend, shared, OverlayParts::default())
    }

    /// [`Grid::start`] with the overlay's parts (the daemon with `[tunnel]
    /// enabled`).
    pub fn start_with_overlay(
        cfg: &Config,
        host: &str,
        backend: impl Into<Backend>,
        shared: Arc<Shared>,
        overlay: OverlayParts,
    ) -> std::io::Result<Grid> {
        let settings = Settings::of(cfg, host);
        let client = ControllerClient::new(&settings.controller).map_err(std::io::Error::other)?;
        let runner = Arc::new(
            Runner::new(backend)
                .with_overlay(overlay.host_net.clone())
                .with_vm_nics(overlay.vm_nics.clone()),
        );
        let node = if settings.p2p {
            let r = runner.clone();
            let node = Node::open(
                &cfg.peers,
                &cfg.agent.data_dir,
                host,
                &cfg.controller.token,
                move || r.notify_reports(),
            )
            .map_err(std::io::Error::other)?;
            Some(Arc::new(node))
        } else {
            None
        };
        let inner = Arc::new(Inner {
            runner,
            settings: Mutex::new((0, settings.clone())),
            finishing: AtomicBool::new(false),
            finish_at: Mutex::new(None),
            stop: AtomicBool::new(false),
            leases: pull::Leases::default(),
            node,
            overlay,
            outputs: Arc::new(outputs::Outputs::open(&outputs::spill_dir(
                &cfg.agent.data_dir,
            ))?),
        });
        tracing::info!(
            "joining the controller at {} as {:?} ({} slots, {})",
            settings.controller.url,
            host,
            settings.controller.slots,
            if settings.pulls() {
                "leasing work".to_owned()
            } else {
                format!("pushes to {}", settings.agent_url)
            }
        );
        let puller = if settings.pulls() {
            let pull_client =
                ControllerClient::new(&settings.controller).map_err(std::io::Error::other)?;
            let (inner, shared) = (inner.clone(), shared.clone());
            Some(
                std::thread::Builder::new()
                    .name("sparegrid-grid-pull".into())
                    .spawn(move || pull::run_pull(pull_client, &inner, &shared))?,
            )
        } else {
            None
        };
        let mut threads = Vec::new();
        if let Some(node) = inner.node.clone() {
            let inner = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sparegrid-peer".into())
                    .spawn(move || {
                        node.run(
                            &inner.runner,
                            || inner.settings().1.controller.slots,
                            &inner.stop,
                        )
                    })?,
            );
        }
        {
            let (inner, shared) = (inner.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("sparegrid-grid-runner".into())
                    .spawn(move || run_runner(&inner, &shared))?,
            );
        }
        {
            let inner = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sparegrid-grid-client".into())
                    .spawn(move || run_client(client, &inner, &shared))?,
            );
        }
        Ok(Grid {
            inner,
            threads,
            puller,
        })
    }

    pub fn runner(&self) -> &Arc<Runner> {
        &self.inner.runner
    }

    /// A handle for reloads and the start of a shutdown.
    pub fn handle(&self) -> GridHandle {
        GridHandle {
            inner: self.inner.clone(),
        }
    }

    /// The `POST /v1/subtasks` and `POST /v1/subtasks/stop` routes, to
    /// merge into the daemon's router.
    pub fn routes(&self) -> Router {
        let r = routes_over(self.inner.clone());
        match &self.inner.node {
            Some(node) => r.merge(node.routes()),
            None => r,
        }
    }

    /// Hands everything back to the controller (at most [`SHUTDOWN_WAIT`]
    /// from [`GridHandle::begin_shutdown`], which this calls if nobody did),
    /// then stops both threads and kills what is still running.
    pub fn stop(mut self) {
        self.handle().begin_shutdown();
        // The client thread exits once it has handed everything back or the
        // wait is over; then the runner stops.
        let client = self.threads.pop();
        if let Some(t) = client {
            let _ = t.join();
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(t) = self.puller.take() {
            // A long poll may hold it; it exits when that returns (and
            // hands back what it got, the runner being stopped).
            let until = Instant::now() + Duration::from_secs(1);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Grid {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
    }
}

impl GridHandle {
    /// SIGTERM: stop taking work and hand everything queued or running
    /// back to the controller now (the client sends it within
    /// [`SHUTDOWN_WAIT`]).
    pub fn begin_shutdown(&self) {
        if self.inner.finishing.swap(true, Ordering::SeqCst) {
            return;
        }
        *self
            .inner
            .finish_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.inner.runner.release_all("the agent is shutting down");
    }

    /// SIGHUP: applies `cfg`'s `[controller]` and `[policy]` (see the
    /// module docs). Returns false when nothing changed.
    pub fn reload(&self, cfg: &Config) -> bool {
        let mut guard = self.inner.settings();
        let host = guard.1.host.clone();
        let mut new = Settings::of(cfg, &host);
        if new.controller.dispatch != guard.1.controller.dispatch {
            tracing::warn!(
                "config reload: controller.dispatch changed; that needs a restart, keeping {:?}",
                guard.1.controller.dispatch
            );
            new.controller.dispatch = guard.1.controller.dispatch;
        }
        if !new.controller.enabled() {
            tracing::warn!(
                "config reload: controller.url is now empty; leaving the controller needs a restart, keeping {:?}",
                guard.1.controller.url
            );
            return false;
        }
        if new == guard.1 {
            return false;
        }
        tracing::info!(
            "config reload: grid client now joins {} ({} slots, pushes to {})",
            new.controller.url,
            new.controller.slots,
            new.agent_url
        );
        guard.0 += 1;
        guard.1 = new;
        true
    }
}

fn run_runner(inner: &Inner, shared: &Shared) {
    let runner = &inner.runner;
    let origin = Instant::now();
    let mut gate = SuspendGate::default();
    // Whether the runner drains because the agent does (POST /v1/drain).
    let mut drained_by_status = false;
    while !inner.stop.load(Ordering::SeqCst) {
        let status = shared.status();
        let finishing = inner.finishing.load(Ordering::SeqCst);
        if status.draining && !drained_by_status && !finishing {
            drained_by_status = true;
            runner.release_all("the agent is draining");
        } else if !status.draining && drained_by_status {
            drained_by_status = false;
            if !finishing {
                runner.undrain();
            }
        }
        let policy = inner.settings().1.policy.clone();
        let suspended = gate.decide(&status, &policy, origin.elapsed());
        // Read before the tick: an end or a push during it wakes the wait.
        let seen = runner.work_seen();
        runner.tick(suspended);
        runner.wait_for_work(seen, TICK);
    }
    runner.stop();
}

fn next_backoff(d: Duration) -> Duration {
    (d * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

/// Retry timing of one kind of request.
struct Backoff {
    /// Not before this; `None`: now.
    at: Option<Instant>,
    step: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            at: None,
            step: BACKOFF_MIN,
        }
    }

    fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|at| now >= at)
    }

    fn ok(&mut self) {
        self.at = None;
        self.step = BACKOFF_MIN;
    }

    fn failed(&mut self, now: Instant) {
        self.at = Some(now + self.step);
        self.step = next_backoff(self.step);
    }
}

/// Sends one batch of completions; true when the outbox may hold more to
/// send now.
fn send_completions(
    client: &ControllerClient,
    runner: &Runner,
    leases: &pull::Leases,
    up: Option<&outputs::Uploader>,
    b: &mut Backoff,
    now: Instant,
    timeout: Option<Duration>,
) -> bool {
    if !b.due(now) || runner.outbox_len() == 0 {
        return false;
    }
    let batch = runner.take_outbox(COMPLETION_BATCH);
    // Spilled outputs upload first, on threads of their own.
    let batch = match up {
        Some(up) => up.route(client, batch),
        None => batch,
    };
    // Leased attempts complete one by one on their own route (pull mode).
    let (leased, batch) = if leases.is_empty() {
        (Vec::new(), batch)
    } else {
        leases.split(batch)
    };
    if !leased.is_empty() {
        let retry = pull::send_leased(client, leases, leased, timeout);
        if !retry.is_empty() {
            runner.requeue_outbox(retry.into_iter().chain(batch).collect());
            b.failed(now);
            return false;
        }
    }
    if batch.is_empty() {
        b.ok();
        return true;
    }
    match client.completions(&batch, timeout) {
        Ok(()) => {
            b.ok();
            true
        }
        Err(e) if e.retryable() => {
            tracing::warn!("reporting {} completions (will retry): {e}", batch.len());
            runner.requeue_outbox(batch);
            b.failed(now);
            false
        }
        Err(e) => {
            tracing::error!(
                "the controller refused {} completions, dropped: {e}",
                batch.len()
            );
            true
        }
    }
}

/// Sends one batch of the peer queue's completions; true when there may
/// be more to send now.
fn send_p2p(
    client: &ControllerClient,
    node: Option<&Node>,
    b: &mut Backoff,
    now: Instant,
    timeout: Option<Duration>,
) -> bool {
    let Some(node) = node else {
        return false;
    };
    if !b.due(now) {
        return false;
    }
    match node.report(client, timeout) {
        Ok(more) => {
            b.ok();
            more
        }
        Err(e) => {
            tracing::warn!("reporting p2p completions (will retry): {e}");
            b.failed(now);
            false
        }
    }
}

/// Sends one batch of released attempts; true when there may be more to
/// send now.
fn send_released(
    client: &ControllerClient,
    runner: &Runner,
    host: &str,
    b: &mut Backoff,
    now: Instant,
    timeout: Option<Duration>,
) -> bool {
    if !b.due(now) || runner.released_len() == 0 {
        return false;
    }
    let mut all = runner.take_released();
    let rest = all.split_off(all.len().min(RELEASE_BATCH));
    runner.requeue_released(rest);
    let release = Release {
        host: host.to_string(),
        reason: runner.release_reason(),
        attempts: all,
    };
    match client.release(&release, timeout) {
        Ok(r) => {
            tracing::info!(
                "handed {} subtasks back to the controller ({} requeued)",
                release.attempts.len(),
                r.requeued
            );
            b.ok();
            true
        }
        Err(e) if e.retryable() => {
            tracing::warn!(
                "handing {} subtasks back (will retry): {e}",
                release.attempts.len()
            );
            runner.requeue_released(release.attempts);
            b.failed(now);
            false
        }
        Err(e) => {
            tracing::error!(
                "the controller refused the release of {} subtasks, dropped: {e}",
                release.attempts.len()
            );
            true
        }
    }
}

/// Hands back everything running and sends what is waiting to `client`
/// (a controller being left), until `deadline`.
fn flush(
    client: &ControllerClient,
    runner: &Runner,
    leases: &pull::Leases,
    host: &str,
    deadline: Instant,
) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let left = Some(deadline - now);
        let (mut rb, mut cb) = (Backoff::new(), Backoff::new());
        let more = send_released(client, runner, host, &mut rb, now, left)
            | send_completions(client, runner, leases, None, &mut cb, now, left);
        if !more {
            break;
        }
    }
}

fn run_client(mut client: ControllerClient, inner: &Inner, shared: &Shared) {
    let runner = &inner.runner;
    let (mut generation, mut settings) = {
        let g = inner.settings();
        (g.0, g.1.clone())
    };
    let registration = |s: &Settings| Register {
        tunnel: inner.overlay.tunnel.as_ref().map(|t| t.info()),
        ..s.register()
    };
    let mut register = registration(&settings);
    let mut registered: Option<Registered> = None;
    // A lease not applied yet (the tunnel or bridge failed): retried with
    // the heartbeats, backing off (0.2 s doubling to 10 s).
    let mut lease_pending: Option<OverlayLease> = None;
    let mut lease_retry = Backoff::new();
    let mut reg = Backoff::new();
    let mut hb_at = Instant::now();
    let mut sends = Backoff::new();
    let mut releases = Backoff::new();
    let mut renewals = Backoff::new();
    let mut p2p_sends = Backoff::new();
    let mut was_finishing = false;
    while !inner.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        // Read before sending: a report queued meanwhile wakes the wait.
        let reports_seen = runner.reports_seen();
        // Settings changed (SIGHUP): a new client and a new registration.
        let latest = {
            let g = inner.settings();
            (g.0 != generation).then(|| (g.0, g.1.clone()))
        };
        if let Some((g, new)) = latest {
            generation = g;
            match ControllerClient::new(&new.controller) {
                Ok(c) => {
                    if new.controller.url != settings.controller.url {
                        tracing::info!(
                            "leaving the controller at {}: handing its subtasks back",
                            settings.controller.url
                        );
                        runner.release_all("the agent moved to another controller");
                        flush(
                            &client,
                            runner,
                            &inner.leases,
                            &settings.host,
                            now + SWITCH_WAIT,
                        );
                        let (r, o) = (runner.take_released(), runner.take_outbox(usize::MAX));
                        if !r.is_empty() || !o.is_empty() {
                            tracing::warn!(
                                "could not hand {} subtasks and {} completions back to {}; it requeues them when this host times out",
                                r.len(),
                                o.len(),
                                settings.controller.url
                            );
                        }
                        runner.undrain();
                    }
                    client = c;
                    settings = new;
                    register = registration(&settings);
                    registered = None;
                    reg = Backoff::new();
                }
                Err(e) => tracing::error!("config reload: keeping the old controller client: {e}"),
            }
        }
        let finishing = inner.finishing.load(Ordering::SeqCst);
        if finishing && !was_finishing {
            // Try at once, whatever the backoff had planned.
            was_finishing = true;
            sends = Backoff::new();
            releases = Backoff::new();
        }
        if finishing {
            let started = inner
                .finish_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(now);
            let deadline = started + SHUTDOWN_WAIT;
            if runner.released_len() == 0 && runner.outbox_len() == 0 {
                break;
            }
            if now >= deadline {
                tracing::warn!(
                    "stopping with {} subtasks and {} completions not handed back; the controller requeues them when this host times out",
                    runner.released_len(),
                    runner.outbox_len()
                );
                break;
            }
            let left = Some(deadline - now);
            send_released(&client, runner, &settings.host, &mut releases, now, left);
            let up = inner.uploader(&settings);
            send_completions(
                &client,
                runner,
                &inner.leases,
                Some(&up),
                &mut sends,
                now,
                left,
            );
            // Peer-to-peer completions are durable: the rest goes after a
            // restart.
            send_p2p(&client, inner.node.as_deref(), &mut p2p_sends, now, left);
            std::thread::sleep(TICK);
            continue;
        }
        match &registered {
            None if reg.due(now) => match client.register(&register) {
                Ok(r) => {
                    tracing::info!("registered with the controller as {:?}", r.host);
                    if let Some(t) = &inner.overlay.tunnel {
                        // The controller sends its whole peer list again.
                        t.forget_version();
                        match &r.overlay {
                            Some(lease) => {
                                lease_retry = Backoff::new();
                                lease_pending = None;
                                if !inner.overlay.apply_lease(lease) {
                                    lease_pending = Some(lease.clone());
                                    lease_retry.failed(now);
                                }
                            }
                            None => tracing::warn!(
                                "the controller leased this host no overlay slice (no overlay.cidr there?); the tunnel stays down"
                            ),
                        }
                    }
                    reg.ok();
                    hb_at = now;
                    registered = Some(r);
                    inner.leases.set_registered(true);
                }
                Err(e) => {
                    tracing::warn!("registering with the controller: {e}");
                    reg.failed(now);
                }
            },
            Some(r) if now >= hb_at => {
                let period = Duration::from_millis(r.heartbeat_ms.clamp(50, 60_000));
                hb_at = now + period;
                let mut hb = heartbeat(
                    &settings.host,
                    &shared.status(),
                    settings.controller.slots,
                    runner,
                );
                // Pull mode: every held lease renews in this one batch.
                // Outputs still uploading hold their lease too.
                let held: Vec<sparegrid_proto::grid::AttemptRef> = hb
                    .running
                    .iter()
                    .cloned()
                    .chain(inner.outputs.uploading_attempts())
                    .collect();
                hb.renew = inner.leases.to_renew(&held);
                if let Some(node) = &inner.node {
                    hb.steals = node.steals_to_report();
                }
                if let Some(lease) = lease_pending.as_ref().filter(|_| lease_retry.due(now)) {
                    if inner.overlay.apply_lease(lease) {
                        lease_pending = None;
                        lease_retry.ok();
                    } else {
                        lease_retry.failed(now);
                    }
                }
                hb.tunnel = inner.overlay.tunnel.as_ref().map(|t| t.report());
                match client.heartbeat(&hb) {
                    Ok(reply) => {
                        if let Some(peers) = &reply.overlay_peers {
                            inner.overlay.apply_peers(peers);
                        }
                        runner.withdraw(&reply.withdraw);
                        pull::lost(runner, &inner.leases, &hb.renew, &reply.lost, now);
                        if let Some(node) = &inner.node {
                            node.steals_acknowledged(&hb.steals);
                            node.set_controller_peers(&reply.peers);
                        }
                    }
                    Err(ClientError::MustRegister) => {
                        tracing::info!("the controller does not know this host; registering again");
                        registered = None;
                        inner.leases.set_registered(false);
                        if let Some(node) = &inner.node {
                            node.forget_acknowledged();
                        }
                        reg = Backoff::new();
                    }
                    Err(e) => tracing::warn!("heartbeat: {e}"),
                }
            }
            // Pull mode: a lease that would expire before the next
            // heartbeat is renewed on its own.
            Some(_)
                if !inner.leases.is_empty()
                    && renewals.due(now)
                    && inner.leases.renew_due(&runner.attempts(), hb_at) =>
            {
                match pull::renew_now(&client, runner, &inner.leases, &settings.host) {
                    Ok(()) => renewals.ok(),
                    Err(e) => {
                        tracing::warn!("renewing leases: {e}");
                        renewals.failed(now);
                    }
                }
            }
            _ => {}
        }
        let more = send_released(&client, runner, &settings.host, &mut releases, now, None)
            | send_completions(
                &client,
                runner,
                &inner.leases,
                Some(&inner.uploader(&settings)),
                &mut sends,
                now,
                None,
            )
            | send_p2p(&client, inner.node.as_deref(), &mut p2p_sends, now, None);
        if !more {
            runner.wait_for_reports(reports_seen, TICK);
        }
    }
}

#[derive(Clone)]
struct RouteState {
    inner: Arc<Inner>,
}

impl RouteState {
    fn runner(&self) -> &Arc<Runner> {
        &self.inner.runner
    }
}

/// The push routes of a running grid; the token follows reloads.
fn routes_over(inner: Arc<Inner>) -> Router {
    router(RouteState { inner })
}

fn router(state: RouteState) -> Router {
    Router::new()
        .route("/v1/subtasks", post(subtasks))
        .route("/v1/subtasks/stop", post(stop_subtasks))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(state)
}

pub(crate) fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"code": code, "message": message})),
    )
        .into_response()
}

pub(crate) fn token_ok(headers: &HeaderMap, want: &str) -> bool {
    if want.is_empty() {
        return true;
    }
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().as_bytes())
        .unwrap_or_default();
    got.len() == want.len()
        && got
            .iter()
            .zip(want.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(crate) fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token".into(),
    )
}

pub(crate) fn malformed(what: &str, e: rmp_serde::decode::Error) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "malformed_msgpack",
        format!("the body is not a valid MessagePack {what}: {e}"),
    )
}

async fn subtasks(State(s): State<RouteState>, headers: HeaderMap, body: Bytes) -> Response {
    if !token_ok(&headers, &s.inner.token()) {
        return unauthorized();
    }
    let batch: AssignBatch = match rmp_serde::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return malformed("AssignBatch", e),
    };
    if let Some(why) = s.runner().draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            format!("this agent takes no new subtasks: {why}"),
        );
    }
    let n = s.runner().submit(batch.assignments);
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"accepted": n})),
    )
        .into_response()
}

async fn stop_subtasks(State(s): State<RouteState>, headers: HeaderMap, body: Bytes) -> Response {
    if !token_ok(&headers, &s.inner.token()) {
        return unauthorized();
    }
    let stop: StopBatch = match rmp_serde::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return malformed("StopBatch", e),
    };
    // Killing waits for the processes to be reaped: off the async runtime.
    let runner = s.runner().clone();
    let n = match tokio::task::spawn_blocking(move || runner.withdraw(&stop.attempts)).await {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("stopping subtasks: {e}"),
            )
        }
    };
    (StatusCode::OK, Json(serde_json::json!({"stopped": n}))).into_response()
}
