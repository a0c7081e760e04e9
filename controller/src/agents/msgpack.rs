//! MessagePack bodies for axum: [`MsgPack<T>`] reads a request body of
//! Content-Type `application/msgpack` (size-capped by the agent plane's
//! `max_agent_body_bytes`) and answers with one. A bad frame is refused
//! with a 400 whose JSON message carries rmp-serde's own description of
//! the problem; nothing here panics on what a peer sends.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::AgentError;
use crate::api::AppState;

/// The media type of every agent-plane body.
pub const MSGPACK: &str = "application/msgpack";

/// A MessagePack request or response body holding a `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct MsgPack<T>(pub T);

/// True for `application/msgpack` (and the older `application/x-msgpack`),
/// parameters ignored.
pub fn is_msgpack(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == MSGPACK || v == "application/x-msgpack")
}

/// Decodes `bytes` as a `T`; `what` names the message in the error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, AgentError> {
    rmp_serde::from_slice(bytes).map_err(|e| AgentError::BadMsgpack {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

/// Encodes `value` with field names (maps, not arrays), as agents expect.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AgentError> {
    rmp_serde::to_vec_named(value).map_err(|e| AgentError::Encode(e.to_string()))
}

/// `T`'s type name without module paths, for error messages
/// (`Heartbeat`, `Vec<Completion>`).
fn short_type_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    let mut word = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            out.push_str(word.rsplit("::").next().unwrap_or(&word));
            word.clear();
            out.push(c);
        }
    }
    out.push_str(word.rsplit("::").next().unwrap_or(&word));
    out
}

/// Reads `body` into memory, refusing it once it passes `limit` bytes.
pub async fn read_capped(body: Body, limit: usize) -> Result<Vec<u8>, AgentError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| AgentError::BodyRead(e.to_string()))?;
        if out.len().saturating_add(chunk.len()) > limit {
            return Err(AgentError::BodyTooLarge { limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

impl<T> FromRequest<AppState> for MsgPack<T>
where
    T: DeserializeOwned + Send,
{
    type Rejection = AgentError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !is_msgpack(req.headers()) {
            let got = req
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| "none".to_owned());
            return Err(AgentError::UnsupportedMediaType { got });
        }
        let limit = state.agents.max_body_bytes();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(AgentError::BodyTooLarge { limit });
        }
        let bytes = read_capped(req.into_body(), limit).await?;
        let what = short_type_name::<T>();
        rmp_serde::from_slice(&bytes)
            .map(MsgPack)
            .map_err(|e| AgentError::BadMsgpack {
                what,
                message: e.to_string(),
            })
    }
}

impl<T: Serialize> IntoResponse for MsgPack<T> {
    fn into_response(self) -> Response {
        match encode(&self.0) {
            Ok(bytes) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, HeaderValue::from_static(MSGPACK))],
                Body::from(bytes),
            )
                .into_response(),
            Err(e) => e.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_is_checked_without_parameters() {
        let mut h = HeaderMap::new();
        assert!(!is_msgpack(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/msgpack"),
        );
        assert!(is_msgpack(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/MsgPack; charset=binary"),
        );
        assert!(is_msgpack(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_msgpack(&h));
    }

    #[test]
    fn garbage_is_a_named_error() {
        let e = decode::<sparegrid_proto::grid::Heartbeat>(b"\xc1\x00", "Heartbeat").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("Heartbeat"), "{text}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn type_names_are_short() {
        assert_eq!(
            short_type_name::<sparegrid_proto::grid::Heartbeat>(),
            "Heartbeat"
        );
        assert_eq!(
            short_type_name::<Vec<sparegrid_proto::grid::Completion>>(),
            "Vec<Completion>"
        );
    }
}
