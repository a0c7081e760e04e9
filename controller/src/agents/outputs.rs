//! `POST /v1/agents/outputs`: an agent whose subtask printed more than it
//! sends inline (1 MiB) asks for room on the controller's `/v1/data` for
//! the whole stdout ([`OutputRequest`]: the attempt, size and blake3). The
//! attempt must be one `host` holds now (409 `not_current`, field
//! `attempt`) and the controller must serve `/v1/data` (409 `no_data`);
//! `size` must be 1..=`data.max_upload_bytes` and `blake3` 64 hex digits
//! (400 `invalid_field` naming the field). The answer ([`OutputGrant`])
//! is the id `out-<job>-<index>-<epoch>` (the id captured inline outputs
//! get, so the outputs listing and `sparegrid results` find either the
//! same way) and an `up` token for it alone; `complete` when that file is
//! there already with this size and digest (a retry after the upload
//! ended). A complete file of that id with another size or digest (an
//! earlier try at the same attempt) is removed first.
//!
//! The agent uploads with tus and then reports the completion with
//! `stdout_data`; [`crate::data::outputs::capture`] checks the file before
//! the report reaches the store.

use axum::extract::State;
use sparegrid_proto::grid::{output_data_id, OutputGrant, OutputRequest};
use sparegrid_transfer::token::Direction;

use super::msgpack::MsgPack;
use super::{AgentAuth, AgentError};
use crate::api::AppState;

/// See the module header.
pub(crate) async fn grant(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(req): MsgPack<OutputRequest>,
) -> Result<MsgPack<OutputGrant>, AgentError> {
    let Some(data) = s.data.clone() else {
        return Err(AgentError::NoData(
            "this controller serves no /v1/data ([data] enabled = false): send the output inline (cut)"
                .into(),
        ));
    };
    check(&req, data.config().max_upload_bytes)?;
    super::migrations::holds(&s, &req.host, &req.attempt).await?;
    let id = output_data_id(&req.attempt);
    let (size, blake3) = (req.size, req.blake3.clone());
    let d = data.clone();
    let idc = id.clone();
    let complete =
        tokio::task::spawn_blocking(move || match d.transfer().store().open_complete(&idc) {
            Ok(c) if c.size == size && c.digest == blake3 => true,
            Ok(_) => {
                if let Err(e) = d.remove(&idc) {
                    tracing::warn!(id = %idc, "removing an output file of another try: {e}");
                }
                false
            }
            Err(_) => false,
        })
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?;
    let (token, _) = data
        .sign(&id, Direction::Upload)
        .map_err(|e| AgentError::NoData(e.to_string()))?;
    tracing::info!(host = %req.host, id = %id,
        "output of {} bytes to be uploaded (too large to send inline)", req.size);
    Ok(MsgPack(OutputGrant {
        id,
        transfer_path: crate::data::PREFIX.to_owned(),
        token,
        checkpoint_bytes: data.config().checkpoint_bytes,
        complete,
    }))
}

/// The request's own fields.
fn check(req: &OutputRequest, max: u64) -> Result<(), AgentError> {
    let bad = |field, message: String| Err(AgentError::Mismatch { field, message });
    if req.size == 0 || req.size > max {
        return bad(
            "size",
            format!(
                "size: {} is not between 1 and the controller's data.max_upload_bytes ({max})",
                req.size
            ),
        );
    }
    if req.blake3.len() != 64 || !req.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad(
            "blake3",
            format!("blake3: {:?} is not 64 hex digits", req.blake3),
        );
    }
    if req.blake3.bytes().any(|b| b.is_ascii_uppercase()) {
        return bad("blake3", "blake3: must be lowercase hex".into());
    }
    if sparegrid_transfer::store::validate_id(&output_data_id(&req.attempt)).is_err() {
        return bad(
            "attempt.job",
            format!("attempt.job: {:?} makes no valid file id", req.attempt.job),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::grid::AttemptRef;

    fn req() -> OutputRequest {
        OutputRequest {
            host: "h".into(),
            attempt: AttemptRef {
                job: "j-1".into(),
                index: 0,
                epoch: 1,
            },
            size: 10,
            blake3: "ab".repeat(32),
        }
    }

    fn field(r: Result<(), AgentError>) -> Option<String> {
        r.err().and_then(|e| e.body().field)
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(check(&req(), 100).is_ok());
        let mut r = req();
        r.size = 0;
        assert_eq!(field(check(&r, 100)).as_deref(), Some("size"));
        r.size = 101;
        assert_eq!(field(check(&r, 100)).as_deref(), Some("size"));
        let mut r = req();
        r.blake3 = "xyz".into();
        assert_eq!(field(check(&r, 100)).as_deref(), Some("blake3"));
        r.blake3 = "AB".repeat(32);
        assert_eq!(field(check(&r, 100)).as_deref(), Some("blake3"));
        let mut r = req();
        r.attempt.job = "../x".into();
        assert_eq!(field(check(&r, 100)).as_deref(), Some("attempt.job"));
    }
}
