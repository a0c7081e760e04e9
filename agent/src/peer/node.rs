//! [`Node`]: peer-to-peer work stealing inside a running agent. It owns
//! the agent's [`PeerQueue`], the [`HttpTransport`] to the other agents and
//! the [`ThiefPolicy`], and connects them to the grid runner and the
//! controller client ([`crate::grid`] starts it with
//! `peers.enabled` and `controller.dispatch = "push"`).
//!
//! - **Seeds** arrive on `POST /v1/peer/seed` ([`Node::routes`], with the
//!   trade routes) and are queued durably before the answer.
//! - **The worker** ([`Node::run`], thread `sparegrid-peer`): moves
//!   finished runs into the queue's outbox and handed-back ones back to
//!   `queued` ([`Node::settle`]); feeds the runner from the queue while it
//!   has free slots ([`crate::grid::runner::Runner::submit_p2p`]); with
//!   free slots and nothing queued it steals from a peer ([`trade::steal`],
//!   the policy choosing whom and how much); every second it settles
//!   trades it gave in that are not committed ([`trade::resolve_given`])
//!   and aborts its own requests that outlived `request_timeout`; every
//!   [`PRUNE_EVERY`] it forgets jobs finished here more than
//!   [`KEEP_FINISHED`] ago ([`PeerQueue::prune`]), so the file and the
//!   heartbeat's per-job steal scan stay small.
//! - **Completion callbacks** ([`Node::report`], called by the grid
//!   client thread): the outbox goes to the controller's
//!   `POST /v1/agents/completions`; every answered report (accepted,
//!   duplicate, stale, rejected) is marked sent. The controller accepts
//!   one completion per subtask from whichever peer ran it.
//! - **Counters** ([`Node::steals_to_report`]): per-job steals in and out,
//!   carried by heartbeats when they changed.
//! - **Peers** are `[peers] peers` from config plus the p2p agents the
//!   controller lists in each heartbeat reply while a p2p job is queued
//!   or running, and pushes (`POST /v1/peer/peers`) when one starts
//!   ([`Node::set_controller_peers`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use sparegrid_proto::grid::{Completion, JobSteals, PeerAddr};

use super::config::PeersSection;
use super::policy::{PolicyConfig, StealResult, ThiefPolicy};
use super::queue::{PeerQueue, QueueError};
use super::trade::{self, TransportError};
use super::{now_ms, routes, HttpTransport, PeerState};
use crate::grid::client::{ClientError, ControllerClient};
use crate::grid::runner::Runner;

/// Most completions sent to the controller in one request.
pub const REPORT_BATCH: usize = 64;
/// How often given trades are settled and stale requests aborted.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often finished jobs are pruned from the queue.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a job this agent is finished with (nothing queued, running or
/// given here, every report sent) stays in the queue: long past any trade
/// still being settled and any duplicate seed of it.
pub const KEEP_FINISHED: Duration = Duration::from_secs(3600);
/// Longest the worker sleeps when nothing wakes it.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("peer queue in {dir}: {source}")]
    Queue {
        dir: std::path::PathBuf,
        #[source]
        source: QueueError,
    },
    #[error("creating the peer queue directory {dir}: {source}")]
    Dir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("peer HTTP client: {0}")]
    Transport(#[from] TransportError),
}

/// See the module docs.
pub struct Node {
    queue: Arc<PeerQueue>,
    transport: HttpTransport,
    policy: Mutex<ThiefPolicy>,
    cfg: PeersSection,
    token: String,
    /// The queue may hold queued subtasks (set by seeds, steals, requeues;
    /// cleared when `take_next` finds none), so an idle agent does not
    /// query its queue on every round.
    maybe_queued: AtomicBool,
    /// The outbox may hold unreported completions.
    maybe_unreported: AtomicBool,
    /// Steal counts the controller has acknowledged, per job.
    steals_sent: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Wakes the worker and the grid client (the runner's report
    /// wake-up): seeds, a pushed peer list, completions in the outbox.
    wake: Arc<dyn Fn() + Send + Sync>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Opens the queue in `peers.queue_dir` (else `data_dir`) as `host`
    /// (the restart recovery runs here) with the agent `token`. `wake` is
    /// called when seeds arrive (the grid passes the runner's report
    /// wake-up, which the worker waits on).
    pub fn open(
        cfg: &PeersSection,
        data_dir: &std::path::Path,
        host: &str,
        token: &str,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<Node, NodeError> {
        let dir = if cfg.queue_dir.as_os_str().is_empty() {
            data_dir.to_path_buf()
        } else {
            cfg.queue_dir.clone()
        };
        std::fs::create_dir_all(&dir).map_err(|source| NodeError::Dir {
            dir: dir.clone(),
            source,
        })?;
        let queue =
            PeerQueue::open(&dir, host).map_err(|source| NodeError::Queue { dir, source })?;
        let r = queue.recovery();
        tracing::info!(
            queue = %queue.path().display(),
            recovery = ?r,
            "peer-to-peer queue open"
        );
        let transport = HttpTransport::new(token, static_peers(cfg), cfg.request_timeout)?;
        let policy = ThiefPolicy::new(
            PolicyConfig {
                k: cfg.spare,
                backoff_base: cfg.backoff_base,
                backoff_max: cfg.backoff_max,
                ..PolicyConfig::default()
            },
            static_peers(cfg).into_keys().collect(),
        );
        Ok(Node {
            queue: Arc::new(queue),
            transport,
            policy: Mutex::new(policy),
            cfg: cfg.clone(),
            token: token.to_owned(),
            maybe_queued: AtomicBool::new(true),
            maybe_unreported: AtomicBool::new(true),
            steals_sent: Mutex::new(BTreeMap::new()),
            wake: Arc::new(wake),
        })
    }

    pub fn queue(&self) -> &Arc<PeerQueue> {
        &self.queue
    }

    /// The trade routes, `POST /v1/peer/seed` and `POST /v1/peer/peers`,
    /// to merge into the agent's router.
    pub fn routes(self: &Arc<Self>) -> Router {
        let node = self.clone();
        let listed = self.clone();
        routes(
            PeerState::new(self.queue.clone(), &self.token)
                .on_seed(move || {
                    node.maybe_queued.store(true, Ordering::SeqCst);
                    (node.wake)();
                })
                .on_peers(move |peers| {
                    listed.set_controller_peers(peers);
                    (listed.wake)();
                }),
        )
    }

    /// The peers: config's plus `from_controller` (this host left out by
    /// the controller already). Config wins for an id in both.
    pub fn set_controller_peers(&self, from_controller: &[PeerAddr]) {
        let mut all: BTreeMap<String, String> = from_controller
            .iter()
            .map(|p| (p.host.clone(), p.url.clone()))
            .collect();
        all.extend(static_peers(&self.cfg));
        all.remove(self.queue.self_id());
        let ids: Vec<String> = all.keys().cloned().collect();
        let mut policy = lock(&self.policy);
        if policy_peers_differ(&policy, &ids) {
            tracing::info!(peers = ?ids, "peer list changed");
        }
        policy.set_peers(ids);
        drop(policy);
        self.transport.set_peers(all);
    }

    /// Per-job steal counts that changed since the controller last
    /// acknowledged them ([`Node::steals_acknowledged`]).
    pub fn steals_to_report(&self) -> Vec<JobSteals> {
        let now = match self.queue.steals_by_job() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("reading steal counts: {e}");
                return Vec::new();
            }
        };
        let mut sent = lock(&self.steals_sent);
        // Jobs pruned from the queue are forgotten here too.
        sent.retain(|job, _| now.contains_key(job));
        now.into_iter()
            .filter(|(job, c)| sent.get(job) != Some(c))
            .map(|(job, (stolen_in, given_out))| JobSteals {
                job,
                stolen_in,
                given_out,
            })
            .collect()
    }

    /// The controller answered a heartbeat carrying `sent`.
    pub fn steals_acknowledged(&self, sent: &[JobSteals]) {
        let mut s = lock(&self.steals_sent);
        for j in sent {
            s.insert(j.job.clone(), (j.stolen_in, j.given_out));
        }
    }

    /// The controller lost track of this host (it registers again): report
    /// every count again.
    pub fn forget_acknowledged(&self) {
        lock(&self.steals_sent).clear();
    }

    /// Moves what the runner finished or handed back into the queue.
    pub fn settle(&self, runner: &Runner) {
        let ends = runner.take_p2p();
        let now = now_ms();
        let finished = !ends.done.is_empty();
        for c in ends.done {
            let report = match rmp_serde::to_vec_named(&c) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(job = %c.attempt.job, index = c.attempt.index, "encoding a completion: {e}");
                    continue;
                }
            };
            match self.queue.finish(&c.attempt, c.duration_ms, &report, now) {
                Ok(()) => self.maybe_unreported.store(true, Ordering::SeqCst),
                Err(e) => tracing::error!("peer queue: finishing: {e}"),
            }
        }
        if finished {
            // The grid client sends the outbox when woken.
            (self.wake)();
        }
        for a in ends.back {
            match self.queue.requeue(&a, now) {
                Ok(()) => self.maybe_queued.store(true, Ordering::SeqCst),
                Err(e) => tracing::error!("peer queue: requeueing: {e}"),
            }
        }
        for a in ends.stopped {
            // Over: nothing to report (an empty report is never sent).
            if let Err(e) = self.queue.finish(&a, 0, &[], now) {
                tracing::error!("peer queue: dropping a stopped attempt: {e}");
            }
        }
    }

    /// Feeds the runner up to its free slots; returns the free slots left
    /// (the queue ran dry).
    fn feed(&self, runner: &Runner, slots: u32) -> u32 {
        let mut free = runner.free_slots(slots);
        // Cleared before the query, so a seed that lands meanwhile (its
        // route sets the flag again) is not lost.
        while free > 0 && self.maybe_queued.swap(false, Ordering::SeqCst) {
            match self.queue.take_next(now_ms()) {
                Ok(Some(a)) => {
                    self.maybe_queued.store(true, Ordering::SeqCst);
                    let attempt = a.attempt.clone();
                    if !runner.submit_p2p(a) {
                        // Draining, or already here: back to the queue.
                        if let Err(e) = self.queue.requeue(&attempt, now_ms()) {
                            tracing::error!("peer queue: requeueing: {e}");
                        }
                        return 0;
                    }
                    free -= 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("peer queue: taking the next subtask: {e}");
                    self.maybe_queued.store(true, Ordering::SeqCst);
                    return 0;
                }
            }
        }
        free
    }

    /// Steals from the peers the policy proposes, each at most once, until
    /// one gives something; true when one did. A peer that gives nothing
    /// goes into backoff, so the next one is asked at once rather than
    /// after a wait.
    fn steal(&self, free: u32) -> bool {
        let peers = lock(&self.policy).peers().len();
        (0..peers).any(|_| self.steal_once(free))
    }

    /// One steal if the policy proposes one; true when it got something.
    fn steal_once(&self, free: u32) -> bool {
        let Some(plan) = lock(&self.policy).plan(free, 0, Instant::now()) else {
            return false;
        };
        let (result, rtt) = match trade::steal(
            &self.queue,
            &self.transport,
            &plan.victim,
            &plan.ask,
        ) {
            Ok(o) if !o.got.is_empty() => {
                tracing::debug!(victim = %plan.victim, trade = %o.trade, got = o.got.len(), "stole subtasks");
                self.maybe_queued.store(true, Ordering::SeqCst);
                (StealResult::Got(o.got.len()), o.rtt)
            }
            Ok(o) => (StealResult::Nothing, o.rtt),
            Err(e) => {
                tracing::debug!(victim = %plan.victim, "steal failed: {e}");
                (StealResult::Failed, None)
            }
        };
        lock(&self.policy).record(&plan.victim, result, rtt, Instant::now());
        matches!(result, StealResult::Got(_))
    }

    fn housekeeping(&self) {
        let now = now_ms();
        match trade::resolve_given(&self.queue, &self.transport, self.cfg.resolve_after, now) {
            Ok(r) if !r.returned.is_empty() => {
                self.maybe_queued.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("settling given trades: {e}"),
        }
        // A request older than the timeout can no longer be answered.
        match self
            .queue
            .abort_stale_pending(self.cfg.request_timeout * 2, now)
        {
            Ok(n) if n > 0 => tracing::info!(n, "aborted steal requests that were never answered"),
            Ok(_) => {}
            Err(e) => tracing::warn!("aborting stale steal requests: {e}"),
        }
    }

    /// Forgets finished jobs (see [`KEEP_FINISHED`]).
    fn prune(&self) {
        match self.queue.prune(KEEP_FINISHED, now_ms()) {
            Ok(n) if n > 0 => tracing::info!(rows = n, "pruned finished jobs from the peer queue"),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning the peer queue: {e}"),
        }
    }

    /// The worker loop (see the module docs) until `stop`. `slots` reads
    /// `controller.slots` (it follows reloads).
    pub fn run(&self, runner: &Runner, slots: impl Fn() -> u32, stop: &AtomicBool) {
        let mut last_housekeeping = Instant::now() - HOUSEKEEPING;
        let mut last_prune = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let seen = runner.reports_seen();
            self.settle(runner);
            let draining = runner.draining().is_some();
            let free = if draining {
                0
            } else {
                self.feed(runner, slots())
            };
            if free > 0 && self.steal(free) {
                continue;
            }
            if last_housekeeping.elapsed() >= HOUSEKEEPING {
                last_housekeeping = Instant::now();
                self.housekeeping();
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.prune();
            }
            let wait = if free > 0 {
                // Try the next peer once its backoff is over.
                lock(&self.policy)
                    .next_ready(Instant::now())
                    .map_or(IDLE_WAIT, |t| t.saturating_duration_since(Instant::now()))
                    .clamp(Duration::from_millis(5), IDLE_WAIT)
            } else {
                IDLE_WAIT
            };
            runner.wait_for_reports(seen, wait);
        }
        // What the runner handed back on the way out goes back in the queue.
        self.settle(runner);
    }

    /// Sends up to [`REPORT_BATCH`] completions from the outbox; true when
    /// there may be more to send now.
    pub fn report(
        &self,
        client: &ControllerClient,
        timeout: Option<Duration>,
    ) -> Result<bool, ClientError> {
        if !self.maybe_unreported.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        let rows = match self.queue.unreported(REPORT_BATCH) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("peer queue: reading the outbox: {e}");
                self.maybe_unreported.store(true, Ordering::SeqCst);
                return Ok(false);
            }
        };
        if rows.is_empty() {
            return Ok(false);
        }
        let mut batch = Vec::with_capacity(rows.len());
        let mut answered = Vec::with_capacity(rows.len());
        for (attempt, bytes) in rows {
            if bytes.is_empty() {
                answered.push(attempt);
                continue;
            }
            match rmp_serde::from_slice::<Completion>(&bytes) {
                Ok(c) => batch.push(c),
                Err(e) => {
                    tracing::error!(job = %attempt.job, index = attempt.index, "a stored completion does not decode, dropped: {e}");
                    answered.push(attempt);
                }
            }
        }
        let result = if batch.is_empty() {
            Ok(())
        } else {
            client.completions(&batch, timeout)
        };
        match result {
            Ok(()) => {
                answered.extend(batch.into_iter().map(|c| c.attempt));
            }
            Err(e) if e.retryable() => {
                self.maybe_unreported.store(true, Ordering::SeqCst);
                if let Err(e2) = self.queue.mark_reported(&answered) {
                    tracing::error!("peer queue: marking reports sent: {e2}");
                }
                return Err(e);
            }
            Err(e) => {
                tracing::error!(
                    "the controller refused {} p2p completions, dropped: {e}",
                    batch.len()
                );
                answered.extend(batch.into_iter().map(|c| c.attempt));
            }
        }
        if let Err(e) = self.queue.mark_reported(&answered) {
            tracing::error!("peer queue: marking reports sent: {e}");
        }
        // There may be more than one batch.
        self.maybe_unreported.store(true, Ordering::SeqCst);
        Ok(true)
    }
}

fn static_peers(cfg: &PeersSection) -> BTreeMap<String, String> {
    cfg.peers
        .iter()
        .map(|p| (p.id.clone(), p.url.clone()))
        .collect()
}

fn policy_peers_differ(policy: &ThiefPolicy, ids: &[String]) -> bool {
    policy.peers() != ids
}
