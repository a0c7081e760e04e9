//! Pull mode, agent side (`controller.dispatch = "pull"`): for hosts the
//! controller cannot reach. The agent registers without a push URL (so the
//! controller never pushes to it) and leases subtasks of pull jobs instead.
//!
//! - **Lease loop** ([`run_pull`], thread `sparegrid-grid-pull`): while the
//!   runner has free slots (`controller.slots` minus what is queued or
//!   running; none while draining, shutting down or before the first load
//!   sample), it asks `POST /v1/leases` for up to that many, a long poll of
//!   at most [`LONG_POLL`] (the controller caps it at its
//!   `dispatch.lease_wait_max`), and queues what it gets into the runner.
//!   With no free slot it sleeps until the runner reports an end (the
//!   runner's report counter) or a [`TICK`](super::TICK) passes, so a slot
//!   that frees is filled at once. While the controller cannot be reached
//!   (or does not know the host yet) it backs off like the client thread
//!   (0.2 s doubling to 10 s).
//! - **Which attempts are leased**: [`Leases`], shared with the client
//!   thread, holds every leased attempt with its expiry. Pushed attempts
//!   are never in it.
//! - **Renewal** (client thread): each heartbeat carries every held lease
//!   still queued or running in `renew` (one batch); the reply's `lost`
//!   ones are killed and not reported (`Runner::withdraw`). When a lease
//!   would expire (within a quarter of its TTL) before the next heartbeat,
//!   the client renews them all with `POST /v1/leases/renew` in between.
//! - **Completion** (client thread): a finished leased attempt goes to
//!   `POST /v1/subtasks/{job}/{index}/complete` with its epoch as the
//!   fencing token ([`send_leased`]), not in the pushed batch. A 409
//!   `stale_epoch` (the lease expired and went elsewhere) or another
//!   refusal is logged and dropped, never retried; network trouble and 5xx
//!   are retried with the client's backoff.
//! - **Drain and shutdown**: the runner hands leased attempts back like
//!   pushed ones (`POST /v1/agents/release`, which requeues a leased
//!   attempt at once). A grant that arrives while the runner already
//!   drains is handed back by the lease loop itself.
//!
//! The controller side is `controller/src/agents/leases.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sparegrid_proto::grid::{AttemptRef, Completion, Lease, LeaseRenew, LeaseRequest, Release};

use super::client::{ClientError, ControllerClient};
use super::runner::Runner;
use super::{Backoff, Inner, TICK};
use crate::daemon::status::Shared;
use crate::subtask::label;

/// Longest long poll the agent asks for (the controller may cap it lower).
pub const LONG_POLL: Duration = Duration::from_secs(10);
/// How much longer than the long poll the HTTP request may take.
const POLL_SLACK: Duration = Duration::from_secs(5);

/// One held lease.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// When the controller lets it expire unless renewed (our clock: the
    /// grant's relative TTL from when we got it, so a little early).
    expires: Instant,
    ttl: Duration,
}

/// The attempts this agent holds on lease, and whether the client thread
/// is registered (no point asking for leases before).
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<HashMap<AttemptRef, Held>>,
    registered: AtomicBool,
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<AttemptRef, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records granted leases, before their assignments are queued (so a
    /// fast end is already known as leased).
    pub fn hold(&self, leases: &[Lease], now: Instant) {
        let mut held = self.lock();
        for l in leases {
            let ttl = Duration::from_millis(l.ttl_ms);
            held.insert(
                l.assignment.attempt.clone(),
                Held {
                    expires: now + ttl,
                    ttl,
                },
            );
        }
    }

    pub fn is_leased(&self, a: &AttemptRef) -> bool {
        self.lock().contains_key(a)
    }

    pub fn forget(&self, attempts: &[AttemptRef]) {
        let mut held = self.lock();
        for a in attempts {
            held.remove(a);
        }
    }

    /// How many leases are held (including ones not yet pruned).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The held leases among `running` (the runner's queued or running
    /// attempts): what to renew.
    pub fn to_renew(&self, running: &[AttemptRef]) -> Vec<AttemptRef> {
        let held = self.lock();
        running
            .iter()
            .filter(|a| held.contains_key(*a))
            .cloned()
            .collect()
    }

    /// The controller answered a renewal of `sent`: the `lost` ones are
    /// forgotten, the others expire a TTL from `now`.
    pub fn renewed(&self, sent: &[AttemptRef], lost: &[AttemptRef], now: Instant) {
        let mut held = self.lock();
        for a in lost {
            held.remove(a);
        }
        for a in sent {
            if let Some(h) = held.get_mut(a) {
                h.expires = now + h.ttl;
            }
        }
    }

    /// Whether a lease among `running` would come within a quarter of its
    /// TTL of expiring before `next_heartbeat`: then renew on its own.
    pub fn renew_due(&self, running: &[AttemptRef], next_heartbeat: Instant) -> bool {
        let held = self.lock();
        running.iter().any(|a| {
            held.get(a).is_some_and(|h| {
                h.expires.checked_sub(h.ttl / 4).unwrap_or(h.expires) <= next_heartbeat
            })
        })
    }

    /// Forgets leases that are neither queued nor running here and expired
    /// a TTL ago (killed, handed back, or reported long since).
    pub fn prune(&self, running: &[AttemptRef], now: Instant) {
        let mut held = self.lock();
        held.retain(|a, h| now < h.expires + h.ttl || running.contains(a));
    }

    /// Splits a batch of completions into the leased ones and the rest.
    pub fn split(&self, batch: Vec<Completion>) -> (Vec<Completion>, Vec<Completion>) {
        let held = self.lock();
        batch
            .into_iter()
            .partition(|c| held.contains_key(&c.attempt))
    }

    pub fn set_registered(&self, yes: bool) {
        self.registered.store(yes, Ordering::SeqCst);
    }

    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
    }
}

/// Sends leased completions one by one to
/// `POST /v1/subtasks/{job}/{index}/complete`; returns those to try again
/// (the controller could not be reached or answered 5xx). Everything else
/// is over: accepted, duplicate, or refused (409 `stale_epoch`, 404, 400:
/// logged and dropped).
pub fn send_leased(
    client: &ControllerClient,
    leases: &Leases,
    batch: Vec<Completion>,
    timeout: Option<Duration>,
) -> Vec<Completion> {
    let mut retry = Vec::new();
    let mut it = batch.into_iter();
    for c in it.by_ref() {
        match client.complete(&c, timeout) {
            Ok(reply) => {
                tracing::debug!(
                    "subtask {}: lease completed ({})",
                    label(&c.attempt),
                    reply.result
                );
                leases.forget(std::slice::from_ref(&c.attempt));
            }
            Err(e) if e.is_stale_epoch() => {
                tracing::info!(
                    "subtask {}: completion refused, the lease is no longer current (dropped): {e}",
                    label(&c.attempt)
                );
                leases.forget(std::slice::from_ref(&c.attempt));
            }
            Err(e) if !e.retryable() || e.status() == Some(404) => {
                tracing::error!(
                    "subtask {}: the controller refused the completion, dropped: {e}",
                    label(&c.attempt)
                );
                leases.forget(std::slice::from_ref(&c.attempt));
            }
            Err(e) => {
                tracing::warn!(
                    "subtask {}: reporting the completion (will retry): {e}",
                    label(&c.attempt)
                );
                retry.push(c);
                break;
            }
        }
    }
    // After a failure the rest waits for the retry too.
    retry.extend(it);
    retry
}

/// Renews every held lease still queued or running with
/// `POST /v1/leases/renew`; kills the lost ones. Err when the controller
/// could not be asked.
pub fn renew_now(
    client: &ControllerClient,
    runner: &Runner,
    leases: &Leases,
    host: &str,
) -> Result<(), ClientError> {
    let sent = leases.to_renew(&runner.attempts());
    if sent.is_empty() {
        return Ok(());
    }
    let now = Instant::now();
    let reply = client.renew(&LeaseRenew {
        host: host.to_owned(),
        leases: sent.clone(),
    })?;
    lost(runner, leases, &sent, &reply.lost, now);
    Ok(())
}

/// Applies a renewal's answer: the `lost` leases are killed (not reported)
/// and forgotten, the others renewed.
pub fn lost(
    runner: &Runner,
    leases: &Leases,
    sent: &[AttemptRef],
    lost: &[AttemptRef],
    now: Instant,
) {
    if !lost.is_empty() {
        tracing::info!(
            "the controller took back {} leases (expired or revived elsewhere); stopping them",
            lost.len()
        );
        runner.withdraw(lost);
    }
    leases.renewed(sent, lost, now);
}

/// The lease loop (see the module docs); returns when the grid stops or
/// begins its shutdown.
pub(super) fn run_pull(mut client: ControllerClient, inner: &Inner, shared: &Shared) {
    let runner = &inner.runner;
    let leases = &inner.leases;
    let (mut generation, mut settings) = {
        let g = inner.settings();
        (g.0, g.1.clone())
    };
    let mut backoff = Backoff::new();
    let done = || inner.stop.load(Ordering::SeqCst) || inner.finishing.load(Ordering::SeqCst);
    while !done() {
        // A reload: the client thread re-registers; lease with the new
        // settings from now on.
        let latest = {
            let g = inner.settings();
            (g.0 != generation).then(|| (g.0, g.1.clone()))
        };
        if let Some((g, new)) = latest {
            generation = g;
            match ControllerClient::new(&new.controller) {
                Ok(c) => {
                    client = c;
                    settings = new;
                    backoff = Backoff::new();
                }
                Err(e) => tracing::error!("config reload: keeping the old lease client: {e}"),
            }
        }
        let now = Instant::now();
        // Read before looking: an end meanwhile wakes the wait.
        let seen = runner.reports_seen();
        if !backoff.due(now) {
            runner.wait_for_reports(seen, TICK);
            continue;
        }
        let status = shared.status();
        let free = if !leases.registered()
            || status.draining
            || status.load.is_none()
            || runner.draining().is_some()
        {
            0
        } else {
            runner.free_slots(settings.controller.slots)
        };
        leases.prune(&runner.attempts(), now);
        if free == 0 {
            runner.wait_for_reports(seen, TICK);
            continue;
        }
        let req = LeaseRequest {
            host: settings.host.clone(),
            max: free,
            wait_ms: LONG_POLL.as_millis() as u64,
        };
        match client.lease(&req, LONG_POLL + POLL_SLACK) {
            Ok(grant) => {
                backoff.ok();
                if !grant.leases.is_empty() {
                    take(&client, runner, leases, &settings.host, grant.leases);
                }
            }
            Err(e) => {
                if matches!(e, ClientError::MustRegister) {
                    tracing::debug!("leasing: the controller does not know this host yet");
                } else {
                    tracing::warn!("asking the controller for leases: {e}");
                }
                backoff.failed(now);
            }
        }
    }
}

/// Queues granted leases into the runner; hands them straight back when
/// the runner drains (it takes nothing then).
fn take(
    client: &ControllerClient,
    runner: &Runner,
    leases: &Leases,
    host: &str,
    granted: Vec<Lease>,
) {
    let now = Instant::now();
    leases.hold(&granted, now);
    let attempts: Vec<AttemptRef> = granted
        .iter()
        .map(|l| l.assignment.attempt.clone())
        .collect();
    let n = granted.len();
    let added = runner.submit(granted.into_iter().map(|l| l.assignment).collect());
    tracing::debug!("leased {n} subtasks ({added} new)");
    if added > 0 {
        return;
    }
    if let Some(reason) = runner.draining() {
        leases.forget(&attempts);
        let release = Release {
            host: host.to_owned(),
            attempts,
            reason: reason.clone(),
        };
        match client.release(&release, Some(Duration::from_secs(2))) {
            Ok(r) => tracing::info!(
                "{reason}: handed {n} just-leased subtasks back ({} requeued)",
                r.requeued
            ),
            Err(e) => tracing::warn!(
                "{reason}: could not hand {n} just-leased subtasks back ({e}); their leases expire"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sparegrid_proto::grid::Assignment;

    use super::*;

    fn lease(index: u64, ttl_ms: u64) -> Lease {
        Lease {
            assignment: Assignment {
                network: sparegrid_proto::Network::None,
                attempt: attempt(index),
                argv: vec!["true".into()],
                env: BTreeMap::new(),
                stdin: Vec::new(),
                timeout_ms: 1000,
                vcpus: 1,
                memory_mib: 64,
            },
            ttl_ms,
        }
    }

    fn attempt(index: u64) -> AttemptRef {
        AttemptRef {
            job: "j-1".into(),
            index,
            epoch: 1,
        }
    }

    fn done(index: u64) -> Completion {
        Completion {
            stdout_data: None,
            attempt: attempt(index),
            host: "h".into(),
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_size: 0,
            stderr_size: 0,
            duration_ms: 1,
        }
    }

    #[test]
    fn held_leases_renew_split_and_prune() {
        let l = Leases::default();
        let t0 = Instant::now();
        l.hold(&[lease(0, 1000), lease(1, 1000)], t0);
        assert!(l.is_leased(&attempt(0)) && !l.is_leased(&attempt(2)));
        // Only held attempts the runner still has are renewed.
        let running = vec![attempt(0), attempt(2)];
        assert_eq!(l.to_renew(&running), vec![attempt(0)]);
        // A heartbeat 500 ms away is fine; one 800 ms away is within a
        // quarter TTL of the expiry: renew on its own first.
        assert!(!l.renew_due(&running, t0 + Duration::from_millis(500)));
        assert!(l.renew_due(&running, t0 + Duration::from_millis(800)));
        // Not running here: never due.
        assert!(!l.renew_due(&[], t0 + Duration::from_secs(5)));
        l.renewed(&[attempt(0)], &[], t0 + Duration::from_millis(600));
        assert!(!l.renew_due(&running, t0 + Duration::from_millis(800)));
        // Completions split into leased and pushed.
        let (leased, pushed) = l.split(vec![done(0), done(2), done(1)]);
        let idx = |v: &[Completion]| v.iter().map(|c| c.attempt.index).collect::<Vec<_>>();
        assert_eq!((idx(&leased), idx(&pushed)), (vec![0, 1], vec![2]));
        // Lost ones are forgotten.
        l.renewed(&[attempt(0), attempt(1)], &[attempt(1)], t0);
        assert!(!l.is_leased(&attempt(1)));
        // A lease neither running nor recent is pruned; a running one stays.
        l.hold(&[lease(3, 1000)], t0);
        l.prune(&[attempt(0)], t0 + Duration::from_secs(10));
        assert!(l.is_leased(&attempt(0)) && !l.is_leased(&attempt(3)));
        assert_eq!(l.len(), 1);
    }
}
