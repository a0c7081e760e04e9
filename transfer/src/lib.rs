//! The transfer endpoint: resumable uploads in the tus 1.0 protocol and
//! downloads with HTTP Range, on their own listen address, with a
//! checkpoint journal per transfer (docs/transfer.md).
//!
//! - [`config`]: the `[transfer]` section and its validation.
//! - [`token`]: HMAC-signed bearer tokens scoped to one id and direction.
//! - [`journal`]: the append-only checkpoint journal both ends keep.
//! - [`store`]: ids → files under the data directory, the upload writer,
//!   verification and the atomic rename into place.
//! - [`tus`]: the tus 1.0 routes (core, creation, creation-with-upload,
//!   checksum, termination, expiration).
//! - [`download`]: `GET` with Range / If-Range / ETag.
//! - [`client`]: a streaming, journaled uploader and downloader for these
//!   routes (used by peers, the benchmark and the tests).
//! - [`tls`]: the optional rustls listener.
//! - [`counters`]: answers by operation and status, bytes moved, for the
//!   host's metrics ([`TransferState::counters`]).
//!
//! [`TransferState::new`] opens the store; [`router`] is the axum app;
//! [`serve`] binds `listen` (with TLS when configured) and runs until a
//! shutdown future resolves (then running transfers get a grace period),
//! sweeping expired uploads meanwhile; [`run`] does both for the daemon.

// Handlers return ready HTTP answers as their error; boxing them would
// only move the allocation.
#![allow(clippy::result_large_err)]

pub mod client;
pub mod config;
pub mod counters;
pub mod download;
pub mod journal;
pub mod metrics;
pub mod store;
pub mod tls;
pub mod token;
pub mod tree;
pub mod tus;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;

pub use config::TransferConfig;
pub use counters::CounterSnapshot;
pub use store::{Store, StoreError};
pub use token::Direction;

/// The URL prefix of every transfer: `/v1/files/<id>`.
pub const FILES: &str = "/v1/files";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Config(#[from] config::ConfigFieldError),
    #[error("the transfer endpoint needs a signing key (the agent token); anonymous access is not offered")]
    NoKey,
    #[error("transfer store {}: {source}", dir.display())]
    Store {
        dir: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("transfer.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("transfer endpoint: {0}")]
    Serve(#[source] std::io::Error),
}

pub(crate) struct Inner {
    pub(crate) config: TransferConfig,
    pub(crate) store: Store,
    key: Vec<u8>,
    pub(crate) counters: counters::Counters,
}

/// The endpoint's shared state: config, store, signing key.
#[derive(Clone)]
pub struct TransferState {
    pub(crate) inner: Arc<Inner>,
}

impl TransferState {
    /// Validates `config`, opens its directory under `agent_data_dir` and
    /// keeps `key` (the agent token) for signing and checking tokens.
    pub fn new(
        config: &TransferConfig,
        agent_data_dir: &Path,
        key: &[u8],
    ) -> Result<TransferState, TransferError> {
        config.validate()?;
        if key.is_empty() {
            return Err(TransferError::NoKey);
        }
        let dir = config.resolve_dir(agent_data_dir);
        let store =
            Store::open(&dir, config.checkpoint_bytes).map_err(|source| TransferError::Store {
                dir: dir.clone(),
                source,
            })?;
        Ok(TransferState {
            inner: Arc::new(Inner {
                config: config.clone(),
                store,
                key: key.to_vec(),
                counters: counters::Counters::default(),
            }),
        })
    }

    pub fn config(&self) -> &TransferConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.inner.key
    }

    /// A token for `id` in `direction`, valid for `ttl`.
    pub fn sign(
        &self,
        id: &str,
        direction: Direction,
        ttl: Duration,
    ) -> Result<String, store::IdError> {
        token::sign(self.key(), id, direction, SystemTime::now() + ttl)
    }

    /// Removes incomplete uploads past their expiry; returns their ids.
    pub async fn sweep_expired(&self) -> Vec<String> {
        let store_state = self.clone();
        let ids =
            tokio::task::spawn_blocking(move || store_state.store().expired(SystemTime::now()))
                .await
                .unwrap_or_default();
        let mut removed = Vec::new();
        for id in ids {
            let slot = self.store().slot(&id);
            let mut guard = slot.lock().await;
            // Re-check under the lock: it may have completed meanwhile.
            if matches!(self.store().is_complete(&id), Ok(true)) {
                continue;
            }
            guard.take();
            match self.store().remove(&id) {
                Ok(_) => {
                    tracing::info!(id, "expired upload removed");
                    removed.push(id);
                }
                Err(e) => tracing::warn!(id, error = %e, "cannot remove an expired upload"),
            }
        }
        removed
    }
}

/// The endpoint's routes (see docs/transfer.md):
/// `OPTIONS|POST /v1/files`, `OPTIONS|HEAD|PATCH|DELETE|GET /v1/files/{id}`.
pub fn router(state: TransferState) -> Router {
    Router::new()
        .route(FILES, post(tus::create).options(tus::options))
        .route(
            &format!("{FILES}/{{id}}"),
            get(download::get)
                .head(head)
                .patch(tus::patch)
                .delete(tus::delete)
                .options(tus::options),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn(refuse_odd_paths))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            counters::count,
        ))
        // Bodies are streamed to disk; the upload's own limits apply.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// `HEAD` is tus's offset query when it carries `Tus-Resumable`, else the
/// download's headers.
async fn head(
    state: axum::extract::State<TransferState>,
    id: axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(tus::TUS_RESUMABLE) {
        tus::head(state, id, headers).await
    } else {
        download::head(state, id, headers).await
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route".into())
}

/// Rejects, before routing, any path with `.` or `..` segments, empty
/// segments (`//`, an absolute path after the prefix), backslashes, NUL or
/// percent-encoding: ids never need them, so they are traversal attempts
/// (400, logged).
async fn refuse_odd_paths(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let odd = path.contains('%')
        || path.contains('\\')
        || path.contains('\0')
        || path.contains("//")
        || path.split('/').any(|s| s == "." || s == "..");
    if odd {
        tracing::warn!(path, method = %req.method(), "transfer: refused a traversal attempt");
        return error(
            StatusCode::BAD_REQUEST,
            "bad_path",
            format!("path {path:?} is not a transfer path"),
        );
    }
    next.run(req).await
}

/// A JSON error `{code, message}`.
pub(crate) fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"code": code, "message": message})),
    )
        .into_response()
}

/// Checks a path id: 400 (logged as a traversal attempt) when invalid.
pub(crate) fn check_id(id: &str) -> Result<(), Response> {
    store::validate_id(id).map_err(|e| {
        tracing::warn!(id, "transfer: refused an invalid id");
        error(StatusCode::BAD_REQUEST, "bad_id", e.to_string())
    })
}

/// Checks the bearer token for `id` and `direction`: 401 without a valid
/// token, 403 for a valid one of another scope.
pub(crate) fn authorize(
    state: &TransferState,
    headers: &HeaderMap,
    id: Option<&str>,
    direction: Option<Direction>,
) -> Result<token::Claims, Response> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let result = token::bearer(auth).and_then(|t| {
        let claims = token::decode(state.key(), t, SystemTime::now())?;
        if let Some(id) = id {
            if claims.id != id {
                return Err(token::TokenError::WrongId {
                    token: claims.id,
                    requested: id.to_owned(),
                });
            }
        }
        if let Some(d) = direction {
            token::check_direction(&claims, d)?;
        }
        Ok(claims)
    });
    result.map_err(|e| {
        let (status, code) = if e.is_forbidden() {
            (StatusCode::FORBIDDEN, "forbidden")
        } else {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        };
        let mut r = error(status, code, e.to_string());
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        r
    })
}

/// Maps a store error to its HTTP answer (traversal-like ones logged).
pub(crate) fn store_error(e: StoreError) -> Response {
    use StoreError as E;
    let (status, code) = match &e {
        E::BadId(_) | E::Symlink { .. } => (StatusCode::BAD_REQUEST, "bad_path"),
        E::NotFound { .. } | E::Incomplete { .. } => (StatusCode::NOT_FOUND, "not_found"),
        E::Gone { .. } => (StatusCode::GONE, "expired"),
        E::Exists { .. } => (StatusCode::CONFLICT, "exists"),
        E::OffsetMismatch { .. } => (StatusCode::CONFLICT, "offset_mismatch"),
        E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        E::DiskFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
        E::ChecksumMismatch { .. } => (tus::CHECKSUM_MISMATCH, "checksum_mismatch"),
        E::DigestMismatch { .. } => (tus::CHECKSUM_MISMATCH, "digest_mismatch"),
        _ if e.is_traversal() => (StatusCode::BAD_REQUEST, "bad_path"),
        E::Io { .. } | E::Journal(_) | E::ChunkLen { .. } => {
            (StatusCode::INTERNAL_SERVER_ERROR, "io")
        }
    };
    if status == StatusCode::BAD_REQUEST {
        tracing::warn!(error = %e, "transfer: refused a path");
    } else if status.is_server_error() {
        tracing::warn!(error = %e, "transfer: request failed");
    }
    error(status, code, e.to_string())
}

/// Binds `config.listen` and serves [`router`] (over TLS when `tls_cert`
/// and `tls_key` are set) until `shutdown` resolves; expired uploads are
/// swept meanwhile.
pub async fn serve(
    state: TransferState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransferError> {
    let addr = state.config().listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| TransferError::Bind { addr, source })?;
    serve_on(listener, state, shutdown).await
}

/// [`serve`] on a listener the caller bound (tests, port 0). Once
/// `shutdown` resolves no new connection is accepted; transfers still
/// running get [`tls::SHUTDOWN_GRACE`] to finish and are then dropped
/// (an upload cut this way keeps its last checkpoint, as after any broken
/// connection).
pub async fn serve_on(
    listener: TcpListener,
    state: TransferState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransferError> {
    serve_with_grace(listener, state, shutdown, tls::SHUTDOWN_GRACE).await
}

async fn serve_with_grace(
    listener: TcpListener,
    state: TransferState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), TransferError> {
    let tls = match (&state.config().tls_cert, &state.config().tls_key) {
        (Some(c), Some(k)) => Some(tls::server_config(c, k, tls::TRANSFER_FIELDS)?),
        _ => None,
    };
    let sweeper = tokio::spawn(sweep_loop(state.clone()));
    let app = router(state);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stopped = stop_rx.clone();
    let stopping = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let server = async move {
        match tls {
            Some(cfg) => tls::serve_tls_on(listener, cfg, app, stopping).await,
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopping)
                    .await
            }
        }
    };
    // axum's graceful shutdown waits for every connection; a long
    // transfer would hold the agent's exit for as long as it runs.
    let deadline = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = server => r,
        () = deadline => {
            tracing::info!("transfer endpoint: dropping transfers still running after {grace:?}");
            Ok(())
        }
    };
    sweeper.abort();
    result.map_err(TransferError::Serve)
}

/// Opens the endpoint for `config` (files under `agent_data_dir`, tokens
/// signed with `key`, the agent token) and serves it on `config.listen`
/// until `shutdown` resolves. What the daemon calls when `enabled`.
pub async fn run(
    config: &TransferConfig,
    agent_data_dir: &Path,
    key: &[u8],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransferError> {
    let state = TransferState::new(config, agent_data_dir, key)?;
    tracing::info!(listen = %config.listen, dir = %config.resolve_dir(agent_data_dir).display(), "transfer endpoint listening");
    serve(state, shutdown).await
}

async fn sweep_loop(state: TransferState) {
    let every =
        (state.config().upload_expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        state.sweep_expired().await;
    }
}
