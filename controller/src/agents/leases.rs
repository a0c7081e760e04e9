//! Pull mode (issue 5): agents that the controller cannot reach lease work
//! instead of having it pushed.
//!
//! | route | body in → out |
//! |---|---|
//! | `POST /v1/leases` | [`LeaseRequest`] → [`LeaseGrant`] |
//! | `POST /v1/leases/renew` | [`LeaseRenew`] → [`LeaseRenewed`] |
//! | `POST /v1/subtasks/{job}/{index}/complete` | [`Completion`] → [`CompleteReply`] |
//!
//! **Which jobs.** Pull jobs (`mode = "pull"`) are only leased, push jobs
//! only pushed: the store's `claim_leases` takes only pull jobs' subtasks
//! and `claim` only push jobs'. One rule, no double bookkeeping of slots.
//!
//! **Long poll.** A lease request that finds no work waits up to
//! `min(wait_ms, dispatch.lease_wait_max)` on the plane's lease [`Notify`]
//! (woken when a job is created and when subtasks go back to the queue:
//! a failed completion, an expired lease, a release, a withdrawn or lost
//! host), and looks again once a second in case a wake was missed; it
//! answers as soon as it gets work, or with an empty grant. The host must
//! be registered (409 `must_register` otherwise) and in the eligible set
//! (below `dispatch_below`): a loaded host's request waits like one that
//! finds no work.
//!
//! **Leases.** Each leased subtask is a new attempt (its epoch bumped)
//! whose lease expires after `dispatch.lease_ttl` unless renewed. The
//! agent renews every lease it holds in one batch: the `renew` list of its
//! heartbeat (the reply's `lost` lists those not renewed), or on its own
//! with `POST /v1/leases/renew` (the reply's `lost` likewise); it stops
//! the lost ones. Each dispatch round
//! withdraws expired leases ([`expire`]) and their subtasks are leased
//! again; the withdrawn attempt does not count as a failure.
//!
//! **Completion.** `POST /v1/subtasks/{job}/{index}/complete` carries a
//! [`Completion`]; its epoch is the fencing token. The current epoch's
//! first report is accepted (a failure requeues the subtask until
//! `max_attempts`, then it is dead with every attempt's error, exactly as
//! for pushed subtasks); its repeat is 200 `duplicate`; any other epoch is
//! 409 `stale_epoch` and changes nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use sparegrid_proto::grid::{
    AttemptRef, CompleteReply, Completion, Lease, LeaseGrant, LeaseRenew, LeaseRenewed,
    LeaseRequest,
};
use tokio::time::Instant;

use super::dispatch::{attempt_of, to_wire};
use super::{report_of, AgentAuth, AgentError, AgentPlane, MsgPack};
use crate::api::{AppState, ErrorBody};
use crate::job::Resources;
use crate::store::{Assignment, CompletionResult, JobId, StoreError, SubtaskState};

/// How often a waiting lease request looks for work even without a wake.
const RECHECK: Duration = Duration::from_secs(1);

/// Most subtasks one lease request gets, whatever its `max`.
pub const MAX_LEASES_PER_REQUEST: u32 = 10_000;

/// The store's clock: ms since the Unix epoch. Lease expiries are kept in
/// it so that they survive a controller restart.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Withdraws expired leases (one dispatch round's step) and wakes the
/// waiting lease requests when that put subtasks back in the queue.
pub(crate) async fn expire(plane: &AgentPlane) {
    let now = wall_ms();
    match plane.blocking(move |store| store.expire_leases(now)).await {
        Ok(revived) if !revived.is_empty() => {
            tracing::info!(revived = revived.len(), "expired leases revived");
            {
                // The agent learns it from its renewal (or heartbeat) reply.
                let mut book = plane.book();
                for r in revived {
                    if let Some(host) = r.host.clone() {
                        book.stop.entry(host).or_default().push(attempt_of(r));
                    }
                }
            }
            plane.wake_leases();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("expiring leases: {e}"),
    }
}

/// Whether `host` may lease now: `Err` when it must register, `Ok(false)`
/// while it is out of the eligible set.
fn may_lease(plane: &AgentPlane, host: &str) -> Result<bool, AgentError> {
    let book = plane.book();
    if book.restored.contains(host) || book.registry.host(host).is_none() {
        return Err(AgentError::NotRegistered(host.to_owned()));
    }
    Ok(book
        .registry
        .eligible_with(plane.now(), |_| 1)
        .iter()
        .any(|h| h.host.as_str() == host))
}

/// Leases up to `n` subtasks to `host` and builds their wire form.
async fn lease_some(plane: &AgentPlane, host: &str, n: usize) -> Result<Vec<Lease>, AgentError> {
    let ttl = plane.inner.config.lease_ttl;
    let h = host.to_owned();
    let claimed: Vec<(Assignment, Resources)> = plane
        .blocking(move |store| {
            let claimed = store.claim_leases(&h, n, ttl, wall_ms())?;
            let mut out = Vec::with_capacity(claimed.len());
            let mut last: Option<(JobId, Resources)> = None;
            for a in claimed {
                let r = match &last {
                    Some((job, r)) if *job == a.job => r.clone(),
                    _ => {
                        let r = store.job_request(&a.job)?.resources;
                        last = Some((a.job.clone(), r.clone()));
                        r
                    }
                };
                out.push((a, r));
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(|e| match e {
            AgentError::Store(StoreError::HostNotFound(h) | StoreError::HostLost(h)) => {
                AgentError::NotRegistered(h)
            }
            other => other,
        })?;
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    Ok(claimed
        .into_iter()
        .map(|(a, r)| Lease {
            assignment: to_wire(a, &r),
            ttl_ms,
        })
        .collect())
}

/// `POST /v1/leases`: see the module docs.
#[utoipa::path(
    post,
    path = "/v1/leases",
    tag = "agents",
    request_body(
        content = Vec<u8>,
        content_type = "application/msgpack",
        description = "A MessagePack `LeaseRequest`: `{host, max, wait_ms}`"
    ),
    responses(
        (status = 200, description = "MessagePack `LeaseGrant`: `{leases: [{assignment, ttl_ms}]}`; empty when no work came within the wait",
            content_type = "application/msgpack", body = Vec<u8>),
        (status = 400, description = "The body is not a MessagePack `LeaseRequest`", body = ErrorBody),
        (status = 409, description = "`must_register`: the host is not registered (or was lost)", body = ErrorBody),
        (status = 413, description = "The body is over `dispatch.max_agent_body_bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/msgpack`", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn lease(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<LeaseRequest>,
) -> Result<MsgPack<LeaseGrant>, AgentError> {
    let plane = &s.agents;
    let n = req.max.min(MAX_LEASES_PER_REQUEST) as usize;
    let wait = Duration::from_millis(req.wait_ms).min(plane.inner.config.lease_wait_max);
    let deadline = Instant::now() + wait;
    loop {
        // Registered before looking, so a wake between the look and the
        // wait is not lost.
        let notified = plane.inner.lease_wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Out of the set: wait like a request that found nothing.
        if n > 0 && may_lease(plane, &req.host)? {
            let leases = lease_some(plane, &req.host, n).await?;
            if !leases.is_empty() {
                tracing::debug!(host = %req.host, leases = leases.len(), "leased");
                return Ok(MsgPack(LeaseGrant { leases }));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(MsgPack(LeaseGrant::default()));
        }
        let until = deadline.min(now + RECHECK);
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// `POST /v1/leases/renew`: see the module docs.
#[utoipa::path(
    post,
    path = "/v1/leases/renew",
    tag = "agents",
    request_body(
        content = Vec<u8>,
        content_type = "application/msgpack",
        description = "A MessagePack `LeaseRenew`: `{host, leases: [{job, index, epoch}]}`"
    ),
    responses(
        (status = 200, description = "MessagePack `LeaseRenewed`: `{ttl_ms, renewed, lost: [{job, index, epoch}]}`; stop the lost ones",
            content_type = "application/msgpack", body = Vec<u8>),
        (status = 400, description = "The body is not a MessagePack `LeaseRenew`", body = ErrorBody),
        (status = 409, description = "`must_register`: the host is not registered (or was lost)", body = ErrorBody),
        (status = 413, description = "The body is over `dispatch.max_agent_body_bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/msgpack`", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn renew(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<LeaseRenew>,
) -> Result<MsgPack<LeaseRenewed>, AgentError> {
    let plane = &s.agents;
    may_lease(plane, &req.host)?;
    Ok(MsgPack(renew_for(plane, &req.host, req.leases).await?))
}

/// Renews `leases` of `host` (a [`LeaseRenew`], or the `renew` list of a
/// heartbeat) and says which were lost.
pub(crate) async fn renew_for(
    plane: &AgentPlane,
    host: &str,
    leases: Vec<AttemptRef>,
) -> Result<LeaseRenewed, AgentError> {
    let ttl = plane.inner.config.lease_ttl;
    let keys: Vec<(JobId, u64, u32)> = leases
        .iter()
        .map(|a| (JobId(a.job.clone()), a.index, a.epoch))
        .collect();
    let h = host.to_owned();
    let answers = if keys.is_empty() {
        Vec::new()
    } else {
        plane
            .blocking(move |store| store.renew_leases(&h, &keys, ttl, wall_ms()))
            .await?
    };
    let mut reply = LeaseRenewed {
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        ..LeaseRenewed::default()
    };
    for (a, ok) in leases.into_iter().zip(answers) {
        if ok {
            reply.renewed += 1;
        } else {
            reply.lost.push(a);
        }
    }
    if !reply.lost.is_empty() {
        tracing::info!(host = %host, lost = reply.lost.len(), "leases not renewed");
    }
    Ok(reply)
}

/// `POST /v1/subtasks/{job}/{index}/complete`: see the module docs.
#[utoipa::path(
    post,
    path = "/v1/subtasks/{job}/{index}/complete",
    tag = "agents",
    params(
        ("job" = String, Path, description = "Job id, `j-<n>`"),
        ("index" = u64, Path, description = "Subtask index"),
    ),
    request_body(
        content = Vec<u8>,
        content_type = "application/msgpack",
        description = "A MessagePack `Completion` whose `attempt` names this subtask; `attempt.epoch` is the lease's fencing token"
    ),
    responses(
        (status = 200, description = "MessagePack `CompleteReply`: `{result: \"accepted\" | \"duplicate\"}`",
            content_type = "application/msgpack", body = Vec<u8>),
        (status = 400, description = "`malformed_msgpack`, or `invalid_field` when `attempt` names another subtask than the path", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job or subtask", body = ErrorBody),
        (status = 409, description = "`stale_epoch`: the epoch is not the subtask's current attempt (lease expired, withdrawn, cancelled); nothing changed", body = ErrorBody),
        (status = 413, description = "The body is over `dispatch.max_agent_body_bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/msgpack`", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn complete(
    State(s): State<AppState>,
    _auth: AgentAuth,
    Path((job, index)): Path<(String, u64)>,
    MsgPack(c): MsgPack<Completion>,
) -> Result<MsgPack<CompleteReply>, AgentError> {
    let plane = &s.agents;
    if c.attempt.job != job || c.attempt.index != index {
        return Err(AgentError::Mismatch {
            field: "attempt",
            message: format!(
                "the completion names subtask {} of job {}, the path subtask {index} of job {job}",
                c.attempt.index, c.attempt.job
            ),
        });
    }
    let AttemptRef { epoch, .. } = c.attempt;
    let host = c.host.clone();
    let report = report_of(c);
    let result = plane
        .blocking(move |store| {
            store.complete(&report.job, report.index, report.epoch, &report.outcome)
        })
        .await
        .map_err(|e| match e {
            AgentError::Store(
                e @ (StoreError::JobNotFound(_) | StoreError::SubtaskNotFound { .. }),
            ) => AgentError::SubtaskNotFound(e.to_string()),
            other => other,
        })?;
    match result {
        CompletionResult::Accepted { subtask, .. } => {
            tracing::debug!(host = %host, job = %job, index, epoch, ?subtask, "pull completion accepted");
            if subtask == SubtaskState::Queued {
                plane.wake_leases();
            }
            Ok(MsgPack(CompleteReply {
                result: "accepted".to_owned(),
            }))
        }
        CompletionResult::Duplicate => Ok(MsgPack(CompleteReply {
            result: "duplicate".to_owned(),
        })),
        CompletionResult::Stale => Err(AgentError::StaleEpoch { job, index, epoch }),
    }
}
