//! The controller's HTTP/JSON API (axum): the job routes, `/metrics` and
//! `/openapi.json`. [`router`] builds it over an [`AppState`]; [`serve`]
//! opens the store and listens as a [`ControllerConfig`] says.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/jobs` | submit a job (`application/json`); 201 `{id, subtasks}` |
//! | `GET /v1/jobs?state=&limit=` | jobs, newest first, with states and counts |
//! | `GET /v1/jobs/{id}` | one job: state, subtask counts by state, request |
//! | `DELETE /v1/jobs/{id}` | cancel; 200 with the state afterwards |
//! | `GET /v1/jobs/{id}/results?format=raw\|json&partial=1&stage=map\|reduce` | outputs in subtask order; for a job with a `reduce`, the reduce's output unless `stage=map` |
//! | `GET /v1/jobs/{id}/events` | server-sent `progress` events, then `end` |
//! | `GET /v1/hosts` | hosts with load, dominant metric, free slots, state (see [`crate::agents`]) |
//! | `POST /v1/agents/{register,heartbeat,completions,release}` | the agent plane, MessagePack (see [`crate::agents`]) |
//! | `GET /metrics` | Prometheus text (jobs, subtasks, requests; the overlay, see [`crate::overlay::metrics`]; the `/v1/data` transfer endpoint's counters) |
//! | `GET /openapi.json` | the OpenAPI 3 document of all of the above |
//! | `/v1/data*` | job data: uploads and output files, served by [`crate::data::layer`] in front of the router (not in the OpenAPI document; docs/transfer.md) |
//!
//! Only `push` jobs are accepted until the other dispatch modes exist.
//!
//! Every route but `/openapi.json` needs a bearer token of a role it
//! admits once `[auth]` has any token (see [`auth`] for the roles); with
//! none the API is open, which config validation allows only on a
//! loopback `listen`. With `[tls]` the API is HTTPS (rustls, see [`tls`]).
//!
//! # Errors
//!
//! Every error is JSON `{code, message, field?}`; `field` is the request
//! field (dotted JSON path, `body` for the body as a whole) or the query
//! parameter it is about. The codes are stable:
//!
//! | code | status | when |
//! |---|---|---|
//! | `malformed_json` | 400 | the body is not JSON (syntax, truncated, empty, duplicate key) |
//! | `unknown_field` | 400 | a field the request format does not have |
//! | `missing_field` | 400 | a required field is absent |
//! | `invalid_type` | 400 | a field holds the wrong kind of value |
//! | `invalid_field` | 400 | a refused value (empty argv, `chunk: 0`, `end <= start`, a mode other than push, …) |
//! | `too_large` | 400 | a field over the controller's `job_limits` |
//! | `invalid_query` | 400 | a bad query parameter |
//! | `body_unreadable` | 400 | the body could not be read off the connection |
//! | `job_not_found` | 404 | no job has this id |
//! | `route_not_found` | 404 | no route has this path |
//! | `method_not_allowed` | 405 | the route exists, not with this method |
//! | `job_not_finished` | 409 | results asked for before the job ended, without `partial` |
//! | `body_too_large` | 413 | the body is over `max_body_bytes` |
//! | `unauthorized` | 401 | no bearer token, or one no role has (with `WWW-Authenticate: Bearer`) |
//! | `forbidden` | 403 | a token of a role this route does not admit |
//! | `unsupported_media_type` | 415 | the body is not `application/json` |
//! | `internal` | 500 | the store failed; nothing was half-done |

pub mod auth;
mod error;
mod jobs;
mod metrics;
mod openapi;
pub mod tls;

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

pub use auth::{Access, Auth, AuthError, Role};
pub(crate) use error::error_response;
pub use error::{ApiError, ErrorBody};
pub use jobs::{
    AttemptView, CancelResponse, DeadSubtaskView, HostSteals, JobDetail, JobList, JobResults,
    JobSummary, LeaseHolder, ProgressEvent, SubmitResponse, SubtaskResult, DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
};
pub use metrics::ApiMetrics;
pub use openapi::{document as openapi_document, ApiDoc};

use crate::agents::{self, AgentPlane};
use crate::config::ControllerConfig;
use crate::job::Limits;
use crate::store::{SqliteStore, Store, StoreOptions};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub limits: Arc<Limits>,
    /// Bodies over this get a 413.
    pub max_body_bytes: usize,
    /// How often an event stream polls its job.
    pub events_poll: Duration,
    pub metrics: Arc<ApiMetrics>,
    /// The agent plane: registry, dispatcher state, agent routes.
    pub agents: AgentPlane,
    /// Bearer tokens by role.
    pub auth: Arc<Auth>,
    /// Job data under `/v1/data` (see [`crate::data`]); `None` until
    /// [`serve`] opens it, or with `[data] enabled = false`.
    pub data: Option<crate::data::DataPlane>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("limits", &self.limits)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("events_poll", &self.events_poll)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over `store` with the limits, body cap and poll interval of
    /// `config` (which should have been validated).
    pub fn new(store: Arc<dyn Store>, config: &ControllerConfig) -> AppState {
        let agents = AgentPlane::new(Arc::clone(&store), config);
        let mut metrics = ApiMetrics::new();
        metrics.register_collector(Box::new(crate::overlay::metrics::OverlayCollector(
            agents.overlay_state(),
        )));
        AppState {
            agents,
            store,
            limits: Arc::new(config.job_limits.clone()),
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            events_poll: config.events_poll,
            metrics: Arc::new(metrics),
            auth: Arc::new(Auth::new(&config.auth)),
            data: None,
        }
    }
}

/// The whole API over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", get(jobs::list).post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/jobs/{id}/results", get(jobs::results))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/metrics", get(metrics_route))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(agents::routes())
        // Only routed requests: an unknown path answers 404 with or without
        // a token, as it names nothing.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_role,
        ))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        // `/v1/data*` and output capture from completion reports.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::data::layer,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            agents::wake_on_submit,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// Counts each answered request by its route pattern and status.
async fn count_requests(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let response = next.run(req).await;
    s.metrics
        .record_request(&route, method.as_str(), response.status().as_u16());
    response
}

/// Prometheus metrics: jobs and subtasks by state, HTTP requests by route
/// and status, the overlay's slices and per-peer tunnel figures.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn metrics_route(State(s): State<AppState>) -> Result<Response, ApiError> {
    let jobs = jobs::blocking(&s.store, |store| store.list_jobs(None, usize::MAX)).await?;
    let text = s.metrics.render(&jobs);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, with
/// the push dispatcher running alongside.
pub async fn serve_on(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let dispatcher = agents::spawn_dispatcher(state.agents.clone());
    // With the peer address, for the overlay's default tunnel endpoint.
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ApiError::Serve);
    dispatcher.abort();
    served
}

/// [`serve_on`] over HTTPS with the rustls config `tls` (see
/// [`tls::server_config`]); on shutdown, open connections get
/// [`tls::SHUTDOWN_GRACE`] to finish.
pub async fn serve_tls_on(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let dispatcher = agents::spawn_dispatcher(state.agents.clone());
    let served = tls::serve_tls_on(listener, tls, router(state), shutdown)
        .await
        .map_err(ApiError::Serve);
    dispatcher.abort();
    served
}

/// Validates `config`, reads the TLS files if `[tls]` names them, opens
/// the SQLite store at `db_path` (creating its directory), listens on
/// `listen` and serves (HTTPS with `[tls]`) until SIGINT or SIGTERM.
pub async fn serve(config: ControllerConfig) -> Result<(), ApiError> {
    config.validate()?;
    let tls = match config.tls.paths() {
        Some((cert, key)) => Some(tls::server_config(cert, key)?),
        None => None,
    };
    let path = config.db_path.clone();
    let opts = StoreOptions {
        max_reduce_input: config.job_limits.max_input_bytes,
        ..StoreOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A failure here shows up, with the path, when the file is opened.
            let _ = std::fs::create_dir_all(dir);
        }
        SqliteStore::open_with(&path, opts)
    })
    .await
    .map_err(|e| ApiError::Task(e.to_string()))?
    .map_err(ApiError::OpenStore)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, db = %config.db_path.display(), "controller API listening");
    if config.auth.is_open() {
        tracing::warn!(
            %addr,
            "NO AUTH: [auth] has no tokens, so anyone who reaches {addr} may submit and cancel \
             jobs, act as an agent and read hosts and metrics; set auth.submit_tokens, \
             auth.admin_tokens and auth.agent_token outside tests and demos"
        );
    }
    let mut state = AppState::new(Arc::new(store), &config);
    let data_config = config.clone();
    state.data = tokio::task::spawn_blocking(move || crate::data::DataPlane::open(&data_config))
        .await
        .map_err(|e| ApiError::Task(e.to_string()))?
        .map_err(|e| ApiError::Task(e.to_string()))?;
    if let Some(d) = &state.data {
        tracing::info!(dir = %d.dir().display(), "job data under /v1/data");
        state.metrics.set_transfer(d.transfer().clone());
    }
    match tls {
        Some(tls) => serve_tls_on(listener, tls, state, shutdown_signal()).await,
        None => serve_on(listener, state, shutdown_signal()).await,
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("controller API shutting down");
}
