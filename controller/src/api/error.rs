//! [`ApiError`]: everything the job API can refuse or fail with, and its
//! JSON body `{code, message, field?}`. The codes are listed, with their
//! statuses, in the [`api`](super) module header; [`ApiError::code`] is the
//! one place that spells them.

use std::net::SocketAddr;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::AuthError;
use super::tls::TlsError;
use crate::config::ConfigError;
use crate::job::ValidationError;
use crate::store::{JobId, StoreError};

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable code (`invalid_field`, `job_not_found`, …).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The request field it is about, as a dotted JSON path
    /// (`split.range.chunk`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What the API refuses or fails with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body was refused by parsing or validation (400).
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// A query parameter is wrong (400).
    #[error("query parameter `{param}`: {message}")]
    InvalidQuery {
        param: &'static str,
        message: String,
    },
    /// No bearer token or a wrong one (401), or the wrong role (403).
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The body is over `max_body_bytes` (413).
    #[error("the request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The body could not be read off the connection (400).
    #[error("reading the request body: {0}")]
    BodyRead(String),
    /// The body is not `application/json` (415).
    #[error("expected Content-Type application/json, got {got}")]
    UnsupportedMediaType { got: String },
    /// No job has this id (404).
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// No route matches the path (404).
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The route exists but not with this method (405).
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The job's results were asked for before it finished (409).
    #[error("job {id} is {state}; its results are ready when it is done, failed or cancelled (add ?partial=1 for what is there now)")]
    NotFinished { id: JobId, state: String },
    /// The store failed (500).
    #[error("{0}")]
    Store(StoreError),
    /// A blocking store task panicked or was cancelled (500).
    #[error("store task: {0}")]
    Task(String),
    /// The config is unusable (only from [`serve`](super::serve)).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The TLS cert or key cannot be used (only from [`serve`](super::serve)).
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// Opening the store failed (only from [`serve`](super::serve)).
    #[error("opening the store: {0}")]
    OpenStore(StoreError),
    /// The listen address could not be bound (only from [`serve`](super::serve)).
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an I/O error (only from [`serve`](super::serve)).
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::JobNotFound(id) => ApiError::JobNotFound(id),
            other => ApiError::Store(other),
        }
    }
}

impl ApiError {
    /// True for errors of the config (bad values, unusable TLS files): the
    /// binary exits 2 for these.
    pub fn is_config(&self) -> bool {
        matches!(self, ApiError::Config(_) | ApiError::Tls(_))
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::InvalidQuery { .. } | ApiError::BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Auth(e) if e.is_unauthorized() => StatusCode::UNAUTHORIZED,
            ApiError::Auth(_) => StatusCode::FORBIDDEN,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::JobNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotFinished { .. } => StatusCode::CONFLICT,
            ApiError::Store(_)
            | ApiError::Task(_)
            | ApiError::Config(_)
            | ApiError::Tls(_)
            | ApiError::OpenStore(_)
            | ApiError::Bind { .. }
            | ApiError::Serve(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid(v) => v.code.as_str(),
            ApiError::InvalidQuery { .. } => "invalid_query",
            ApiError::Auth(e) if e.is_unauthorized() => "unauthorized",
            ApiError::Auth(_) => "forbidden",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BodyRead(_) => "body_unreadable",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::JobNotFound(_) => "job_not_found",
            ApiError::RouteNotFound(_) => "route_not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::NotFinished { .. } => "job_not_finished",
            ApiError::Store(_) | ApiError::Task(_) => "internal",
            ApiError::Config(_) => "config",
            ApiError::Tls(_) => "tls",
            ApiError::OpenStore(_) => "store_open",
            ApiError::Bind { .. } | ApiError::Serve(_) => "serve",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        match self {
            ApiError::Invalid(v) => ErrorBody {
                code: v.code.as_str().to_owned(),
                message: v.message.clone(),
                field: Some(v.field.clone()),
            },
            ApiError::InvalidQuery { param, message } => ErrorBody {
                code: self.code().to_owned(),
                message: message.clone(),
                field: Some((*param).to_owned()),
            },
            other => ErrorBody {
                code: other.code().to_owned(),
                message: other.to_string(),
                field: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(code = self.code(), "{self}");
        }
        error_response(self.status(), self.body())
    }
}

/// The JSON error answer of every route (the job API and the agent plane):
/// the body, plus the headers its status calls for.
pub(crate) fn error_response(status: StatusCode, body: ErrorBody) -> Response {
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6750: a 401 names the scheme the client should use.
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body stays unread and the server closes the
        // connection; say so, or the client's pool may reuse it and its
        // next request fails with an incomplete message.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ErrorCode;

    #[test]
    fn validation_errors_keep_code_and_field() {
        let e = ApiError::from(ValidationError::new(
            ErrorCode::TooLarge,
            "split.range.chunk",
            "too many",
        ));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "too_large", "message": "too many", "field": "split.range.chunk"})
        );
    }

    #[test]
    fn store_not_found_is_404() {
        let e = ApiError::from(StoreError::JobNotFound(JobId::from("j-9")));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.code(), "job_not_found");
        let v = serde_json::to_value(e.body()).unwrap();
        assert!(v.get("field").is_none(), "{v}");
        assert_eq!(v["message"], "job j-9 not found");
    }
}
