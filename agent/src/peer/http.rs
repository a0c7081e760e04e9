//! The peer plane over HTTP: [`routes`] serves another agent's requests
//! (`POST /v1/peer/steal`, `/v1/peer/commit`, `/v1/peer/outcome`,
//! MessagePack bodies) and the controller's seeds (`POST /v1/peer/seed`)
//! and peer lists (`POST /v1/peer/peers`), and [`HttpTransport`] is the blocking client
//! implementing [`PeerTransport`] for this agent's own requests.
//!
//! Peers authenticate each other with the agent token (`Authorization:
//! Bearer <token>`). The token is compared in constant time; a missing or
//! wrong one is a 401 with `WWW-Authenticate: Bearer`. An empty configured
//! token leaves the routes open (tests, demos; the agent's config check
//! decides whether that is allowed). A malformed body is a 400 whose JSON
//! `message` names the field ([`decode_request`]); a body over the cap a
//! 413. Queue work runs on the blocking pool, never on the async runtime.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::queue::{PeerQueue, QueueError};
use super::trade::{self, PeerTransport, TradeError, TransportError};
use super::wire::{
    decode_request, Commit, Committed, Given, OutcomeQuery, OutcomeReply, Request, Steal,
};

/// The media type of every peer body.
pub const MSGPACK: &str = "application/msgpack";
/// The default cap on a request body (a Commit of a few thousand attempts).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The callback for a pushed peer list.
type OnPeers = dyn Fn(&[sparegrid_proto::grid::PeerAddr]) + Send + Sync;

/// What the peer routes share.
#[derive(Clone)]
pub struct PeerState {
    queue: Arc<PeerQueue>,
    token: Arc<[u8]>,
    max_body: usize,
    /// Called after seeds were queued (wakes the node's worker).
    on_seed: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Called with the peer list the controller pushes.
    on_peers: Option<Arc<OnPeers>>,
}

impl PeerState {
    /// Routes over `queue`, admitting requests bearing `token` (empty: open).
    pub fn new(queue: Arc<PeerQueue>, token: &str) -> PeerState {
        PeerState {
            queue,
            token: Arc::from(token.as_bytes()),
            max_body: MAX_BODY_BYTES,
            on_seed: None,
            on_peers: None,
        }
    }

    /// Calls `f` with each peer list the controller pushes.
    pub fn on_peers(
        mut self,
        f: impl Fn(&[sparegrid_proto::grid::PeerAddr]) + Send + Sync + 'static,
    ) -> PeerState {
        self.on_peers = Some(Arc::new(f));
        self
    }

    /// Calls `f` after each seed batch that queued something.
    pub fn on_seed(mut self, f: impl Fn() + Send + Sync + 'static) -> PeerState {
        self.on_seed = Some(Arc::new(f));
        self
    }

    /// Caps request bodies at `bytes`.
    pub fn with_max_body(mut self, bytes: usize) -> PeerState {
        self.max_body = bytes;
        self
    }
}

/// The victim's (and the thief's Outcome) routes.
pub fn routes(state: PeerState) -> Router {
    let limit = state.max_body;
    Router::new()
        .route("/v1/peer/steal", post(steal))
        .route("/v1/peer/commit", post(commit))
        .route("/v1/peer/outcome", post(outcome))
        .layer(DefaultBodyLimit::max(limit))
        .route("/v1/peer/peers", post(peers))
        .route(
            "/v1/peer/seed",
            post(seed).layer(DefaultBodyLimit::max(MAX_SEED_BYTES)),
        )
        .with_state(state)
}

/// `POST /v1/peer/peers` (the controller, agent token): a
/// [`PeerList`](sparegrid_proto::grid::PeerList) replacing the peers the
/// controller listed before (`{"peers": n}`).
async fn peers(State(s): State<PeerState>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&s, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a peer list needs the agent token (Authorization: Bearer …)".to_owned(),
        );
    }
    let list: sparegrid_proto::grid::PeerList = match rmp_serde::from_slice(&body) {
        Ok(l) => l,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("PeerList: not a valid MessagePack peer list: {e}"),
            )
        }
    };
    if let Some(f) = &s.on_peers {
        f(&list.peers);
    }
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "peers": list.peers.len() })),
    )
        .into_response()
}

/// The cap on a seed batch from the controller (as on pushed batches).
pub const MAX_SEED_BYTES: usize = 64 << 20;

/// `POST /v1/peer/seed` (the controller, agent token): an
/// [`AssignBatch`](sparegrid_proto::grid::AssignBatch) of a p2p job's
/// subtasks, queued here durably before the answer (`{"queued": n}`, the
/// new ones; a repeated seed queues nothing).
async fn seed(State(s): State<PeerState>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&s, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "seeding needs the agent token (Authorization: Bearer …)".to_owned(),
        );
    }
    let batch: sparegrid_proto::grid::AssignBatch = match rmp_serde::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("AssignBatch: not a valid MessagePack batch: {e}"),
            )
        }
    };
    let queue = s.queue.clone();
    let n = batch.assignments.len();
    match tokio::task::spawn_blocking(move || queue.enqueue(&batch.assignments, super::now_ms()))
        .await
    {
        Ok(Ok(added)) => {
            tracing::debug!(seeds = n, added, "p2p seeds queued");
            if added > 0 {
                if let Some(f) = &s.on_seed {
                    f();
                }
            }
            (
                StatusCode::OK,
                axum::Json(serde_json::json!({ "queued": added })),
            )
                .into_response()
        }
        Ok(Err(e)) => trade_error(TradeError::Queue(e)),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("seed task: {e}"),
        ),
    }
}

/// Compares two byte strings in time that depends only on their lengths
/// (`subtle`, as the controller's auth does).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn authorized(state: &PeerState, headers: &HeaderMap) -> bool {
    if state.token.is_empty() {
        return true;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    ct_eq(presented.as_bytes(), &state.token)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": code, "message": message });
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn msgpack<T: Serialize>(v: &T) -> Response {
    match rmp_serde::to_vec_named(v) {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(MSGPACK))],
            bytes,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string()),
    }
}

fn trade_error(e: TradeError) -> Response {
    match e {
        TradeError::BadRequest { field, message } => error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{field}: {message}"),
        ),
        TradeError::Queue(QueueError::UnknownTrade(t)) => error(
            StatusCode::NOT_FOUND,
            "unknown_trade",
            format!("trade {t} is not known here"),
        ),
        TradeError::Queue(e @ QueueError::TradeConflict { .. }) => {
            error(StatusCode::CONFLICT, "trade_conflict", e.to_string())
        }
        other => {
            tracing::warn!(error = %other, "peer request failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            )
        }
    }
}

/// Authenticates, decodes and runs `f` on the blocking pool.
async fn handle<Q, R>(
    state: PeerState,
    headers: HeaderMap,
    body: Bytes,
    f: fn(&PeerQueue, &Q) -> Result<R, TradeError>,
) -> Response
where
    Q: Request + Send + 'static,
    R: Serialize + Send + 'static,
{
    if !authorized(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a peer request needs the agent token (Authorization: Bearer …)".to_owned(),
        );
    }
    let req = match decode_request::<Q>(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    let queue = state.queue.clone();
    match tokio::task::spawn_blocking(move || f(&queue, &req)).await {
        Ok(Ok(r)) => msgpack(&r),
        Ok(Err(e)) => trade_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("peer request task: {e}"),
        ),
    }
}

async fn steal(State(s): State<PeerState>, headers: HeaderMap, body: Bytes) -> Response {
    handle::<Steal, Given>(s, headers, body, |q, r| {
        trade::serve_steal(q, r, super::now_ms())
    })
    .await
}

async fn commit(State(s): State<PeerState>, headers: HeaderMap, body: Bytes) -> Response {
    handle::<Commit, Committed>(s, headers, body, |q, r| {
        trade::serve_commit(q, r, super::now_ms())
    })
    .await
}

async fn outcome(State(s): State<PeerState>, headers: HeaderMap, body: Bytes) -> Response {
    handle::<OutcomeQuery, OutcomeReply>(s, headers, body, trade::serve_outcome).await
}

fn normalise(peers: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    peers
        .into_iter()
        .map(|(id, url)| (id, url.trim_end_matches('/').to_owned()))
        .collect()
}

/// Blocking HTTP client of other agents' peer routes.
pub struct HttpTransport {
    http: reqwest::blocking::Client,
    token: String,
    /// Agent id → base URL (`http://host:port`); replaced as the
    /// controller's peer list changes.
    peers: std::sync::RwLock<BTreeMap<String, String>>,
}

impl HttpTransport {
    /// A client sending `token` (empty: no `Authorization` header) to the
    /// peers `id → base URL`, waiting at most `timeout` per request.
    pub fn new(
        token: &str,
        peers: impl IntoIterator<Item = (String, String)>,
        timeout: Duration,
    ) -> Result<HttpTransport, TransportError> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .timeout(timeout)
            .use_rustls_tls()
            .build()
            .map_err(|e| TransportError::Unreachable {
                peer: String::new(),
                message: format!("building the HTTP client: {e}"),
            })?;
        Ok(HttpTransport {
            http,
            token: token.to_owned(),
            peers: std::sync::RwLock::new(normalise(peers)),
        })
    }

    /// Replaces the known peers.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = (String, String)>) {
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = normalise(peers);
    }

    fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
        body: &T,
    ) -> Result<R, TransportError> {
        let base = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned()
            .ok_or_else(|| TransportError::UnknownPeer(peer.to_owned()))?;
        let bytes = rmp_serde::to_vec_named(body).map_err(|e| TransportError::Decode {
            peer: peer.to_owned(),
            message: format!("encoding the request: {e}"),
        })?;
        let mut req = self
            .http
            .post(format!("{base}{path}"))
            .header(header::CONTENT_TYPE, MSGPACK)
            .body(bytes);
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        let unreachable = |e: reqwest::Error| TransportError::Unreachable {
            peer: peer.to_owned(),
            message: format!("{path}: {e}"),
        };
        let resp = req.send().map_err(unreachable)?;
        let status = resp.status();
        let body = resp.bytes().map_err(unreachable)?;
        if !status.is_success() {
            return Err(TransportError::Status {
                peer: peer.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        rmp_serde::from_slice(&body).map_err(|e| TransportError::Decode {
            peer: peer.to_owned(),
            message: format!("{path}: the reply is not valid MessagePack: {e}"),
        })
    }
}

impl PeerTransport for HttpTransport {
    fn steal(&self, victim: &str, req: &Steal) -> Result<Given, TransportError> {
        self.call(victim, "/v1/peer/steal", req)
    }
    fn commit(&self, victim: &str, req: &Commit) -> Result<Committed, TransportError> {
        self.call(victim, "/v1/peer/commit", req)
    }
    fn outcome(&self, thief: &str, req: &OutcomeQuery) -> Result<OutcomeReply, TransportError> {
        self.call(thief, "/v1/peer/outcome", req)
    }
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn constant_time_compare_is_equality() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
        assert!(!ct_eq(b"x\0", b"x"));
    }
}
