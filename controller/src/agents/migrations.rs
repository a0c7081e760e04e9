//! What the controller tells agents about moving things between hosts:
//! for `reclaim_mode = "migrate"` (the flow is in
//! [`sparegrid_proto::migrate`]) the idle host a saved grid VM goes to, and
//! moving the VM's attempt to it under a new epoch so the subtask is
//! counted once, whichever host reports last; a slot on the controller's
//! own transfer endpoint (`[data]`) for a saved state when neither host
//! reaches the other (a relay), and the offer and commit posted to the
//! target for a source that cannot reach its agent API; for the image
//! catalog
//! ([`sparegrid_proto::images`]) which hosts, and whether the controller
//! itself, serve an image.

use std::collections::HashSet;

use axum::extract::{Path, State};
use sparegrid_proto::grid::AttemptRef;
use sparegrid_proto::images::{
    image_file_id, is_image_digest, ImageSource, ImageSources, CONTROLLER_SOURCE, IMAGE_FILES,
};
use sparegrid_proto::migrate::{
    state_id, AdoptAttempt, AdoptedAttempt, ForwardRequest, ForwardStep, MigrationAnswer,
    MigrationRequest, MigrationTarget, RelayRequest, RelaySlot,
};
use sparegrid_transfer::token::Direction;

use super::msgpack::MsgPack;
use super::{AgentAuth, AgentError};
use crate::api::AppState;
use crate::store::JobId;

/// `POST /v1/agents/migrations`: the source must hold the attempt; the
/// target is [`crate::registry::Registry::migration_target`].
pub(crate) async fn target(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<MigrationRequest>,
) -> Result<MsgPack<MigrationTarget>, AgentError> {
    let plane = &s.agents;
    holds(&s, &req.host, &req.attempt).await?;
    let target = plane
        .book()
        .registry
        .migration_target(&req.host, plane.now())
        .ok_or(AgentError::NoTarget)?;
    tracing::info!(
        from = %req.host, to = %target.host, vm = %req.vm,
        "migration of grid VM {} ({} MiB of saved state) goes to {}",
        req.vm, req.state_bytes >> 20, target.host
    );
    Ok(MsgPack(target))
}

/// `Err(NotCurrent)` unless `host` holds `attempt` now.
pub(super) async fn holds(
    s: &AppState,
    host: &str,
    attempt: &AttemptRef,
) -> Result<(), AgentError> {
    let h = host.to_owned();
    let held: HashSet<(String, u64, u32)> = s
        .agents
        .blocking(move |store| store.assigned_to(&h))
        .await?
        .into_iter()
        .map(|r| (r.job.0, r.index, r.epoch))
        .collect();
    if held.contains(&(attempt.job.clone(), attempt.index, attempt.epoch)) {
        return Ok(());
    }
    Err(AgentError::NotCurrent {
        job: attempt.job.clone(),
        index: attempt.index,
        epoch: attempt.epoch,
        host: host.to_owned(),
    })
}

/// `POST /v1/agents/migrations/relay`: the source holds the attempt, and
/// the controller serves `/v1/data` with room for the state: an upload and
/// a download token for the state's id there. The source removes the copy
/// (tus termination) once the move is over.
pub(crate) async fn relay(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<RelayRequest>,
) -> Result<MsgPack<RelaySlot>, AgentError> {
    let Some(data) = s.data.clone() else {
        return Err(AgentError::NoRelay(
            "this controller serves no /v1/data ([data] enabled = false)".into(),
        ));
    };
    let max = data.config().max_upload_bytes;
    if req.state_bytes > max {
        return Err(AgentError::Mismatch {
            field: "state_bytes",
            message: format!(
                "state_bytes: {} is over the controller's data.max_upload_bytes ({max})",
                req.state_bytes
            ),
        });
    }
    holds(&s, &req.host, &req.attempt).await?;
    let id = state_id(&req.attempt);
    let sign = |d| {
        data.sign(&id, d)
            .map(|(t, _)| t)
            .map_err(|e| AgentError::NoRelay(e.to_string()))
    };
    let slot = RelaySlot {
        upload_token: sign(Direction::Upload)?,
        download_token: sign(Direction::Download)?,
        transfer_path: crate::data::PREFIX.to_owned(),
        id: id.clone(),
    };
    tracing::info!(from = %req.host,
        "relaying saved state {id} ({} MiB) through this controller: neither host reaches the other",
        req.state_bytes >> 20);
    Ok(MsgPack(slot))
}

/// How long a forwarded commit may take (the target restores the VM).
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);

/// `POST /v1/agents/migrations/forward`: the source (`incoming.from`)
/// holds the attempt and the target is a live registered host with an
/// agent API; the controller posts the offer or commit there with the
/// agent token and passes the answer back. 502 `target_unreachable` when
/// the target does not answer with one.
pub(crate) async fn forward(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<ForwardRequest>,
) -> Result<MsgPack<MigrationAnswer>, AgentError> {
    let ForwardRequest { to, step, incoming } = req;
    if to == incoming.from {
        return Err(AgentError::Mismatch {
            field: "to",
            message: format!("to: {to:?} is the source itself"),
        });
    }
    holds(&s, &incoming.from, &incoming.attempt).await?;
    let plane = &s.agents;
    let url = {
        let book = plane.book();
        let h = book
            .registry
            .host(&to)
            .ok_or_else(|| AgentError::Unreachable {
                host: to.clone(),
                message: "not registered here".into(),
            })?;
        h.agent_url.clone().ok_or_else(|| AgentError::Unreachable {
            host: to.clone(),
            message: "it registered no agent API".into(),
        })?
    };
    let unreachable = |message: String| AgentError::Unreachable {
        host: to.clone(),
        message,
    };
    let body = rmp_serde::to_vec_named(&incoming).map_err(|e| AgentError::Encode(e.to_string()))?;
    let target = format!("{}{}", url.trim_end_matches('/'), step.path());
    let mut post = plane
        .inner
        .client
        .post(&target)
        .timeout(FORWARD_TIMEOUT)
        .header(axum::http::header::CONTENT_TYPE, super::MSGPACK)
        .body(body);
    if let Some(token) = &plane.inner.agent_token {
        post = post.bearer_auth(token);
    }
    let resp = post
        .send()
        .await
        .map_err(|e| unreachable(format!("POST {target}: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| unreachable(format!("POST {target}: reading the answer: {e}")))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
        return Err(unreachable(format!("POST {target}: HTTP {status}: {text}")));
    }
    let answer: MigrationAnswer = rmp_serde::from_slice(&bytes)
        .map_err(|e| unreachable(format!("POST {target}: not a MigrationAnswer: {e}")))?;
    tracing::info!(from = %incoming.from, to = %to, vm = %incoming.vm, accepted = answer.accepted,
        "forwarded the {} of grid VM {} to {to}", match step { ForwardStep::Offer => "offer", ForwardStep::Commit => "commit" }, incoming.vm);
    Ok(MsgPack(answer))
}

/// `POST /v1/agents/migrations/adopt`: moves the attempt from `from` to the
/// asking host ([`crate::store::Store::move_attempt`]); a pull lease moves
/// with it, due one `lease_ttl` from now.
pub(crate) async fn adopt(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<AdoptAttempt>,
) -> Result<MsgPack<AdoptedAttempt>, AgentError> {
    let plane = &s.agents;
    let ttl_ms = i64::try_from(plane.inner.config.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let lease_until = super::leases::wall_ms().saturating_add(ttl_ms);
    let AdoptAttempt {
        host,
        from,
        attempt,
    } = req;
    let (job, to, src, a) = (
        JobId(attempt.job.clone()),
        host.clone(),
        from.clone(),
        attempt.clone(),
    );
    let moved = plane
        .blocking(move |store| store.move_attempt(&job, a.index, a.epoch, &src, &to, lease_until))
        .await?;
    let Some(epoch) = moved else {
        return Err(AgentError::NotCurrent {
            job: attempt.job,
            index: attempt.index,
            epoch: attempt.epoch,
            host: from,
        });
    };
    tracing::info!(
        from = %from, to = %host,
        "subtask {}/{} moved with its grid VM: attempt {} on {from} is now attempt {epoch} on {host}",
        attempt.job, attempt.index, attempt.epoch
    );
    Ok(MsgPack(AdoptedAttempt {
        attempt: sparegrid_proto::grid::AttemptRef { epoch, ..attempt },
    }))
}

/// `GET /v1/agents/images/{digest}`: the live hosts that serve the image, least
/// loaded first, then the controller when it serves it (`data.images`),
/// with download tokens it signs; 404 `image_unknown` when none does.
pub(crate) async fn image_sources(
    State(s): State<AppState>,
    _auth: AgentAuth,
    Path(digest): Path<String>,
) -> Result<MsgPack<ImageSources>, AgentError> {
    if !is_image_digest(&digest) {
        return Err(AgentError::Mismatch {
            field: "digest",
            message: format!("digest: {digest:?} is not a sha256 in lowercase hex"),
        });
    }
    let plane = &s.agents;
    let mut sources = plane.book().registry.image_sources(&digest, plane.now());
    if let Some(d) = s.data.as_ref().filter(|d| d.serves_image(&digest)) {
        let download_tokens = IMAGE_FILES
            .iter()
            .map(|f| {
                d.sign(&image_file_id(&digest, f), Direction::Download)
                    .map(|(t, _)| t)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AgentError::Task(e.to_string()))?;
        sources.push(ImageSource {
            host: CONTROLLER_SOURCE.to_owned(),
            transfer_url: crate::data::PREFIX.to_owned(),
            download_tokens,
        });
    }
    if sources.is_empty() {
        return Err(AgentError::ImageUnknown(digest));
    }
    Ok(MsgPack(ImageSources { digest, sources }))
}
