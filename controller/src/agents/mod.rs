//! The controller's agent plane: the routes agents call (MessagePack
//! bodies, bearer-token auth), the users' view of the hosts, and the push
//! dispatcher that hands queued subtasks to eligible hosts.
//!
//! | route | body in → out | what |
//! |---|---|---|
//! | `POST /v1/agents/register` | [`Register`] → [`Registered`] | join (or rejoin) the registry; the host is upserted in the store; with a `tunnel` and `[overlay]` on, it gets its overlay slice (`overlay`, see [`crate::overlay`]) |
//! | `POST /v1/agents/heartbeat` | [`Heartbeat`] → [`HeartbeatReply`] | report load and running attempts, renew pull leases (`renew`), and report the tunnel (`tunnel`); the reply lists attempts to stop, lost leases (`lost`), and the overlay peer list when the agent's version is not current (`overlay_peers`) |
//! | `POST /v1/agents/completions` | `Vec<Completion>` → [`CompletionsReply`] | report finished attempts; each is accepted, duplicate, stale or rejected |
//! | `POST /v1/agents/release` | [`Release`] → [`Released`] | hand attempts back unfinished (the agent drains or stops): each still current on that host goes back to the queue, not as a failure |
//! | `POST /v1/leases` | [`LeaseRequest`](sparegrid_proto::grid::LeaseRequest) → [`LeaseGrant`](sparegrid_proto::grid::LeaseGrant) | pull mode: lease up to `max` subtasks of pull jobs; a long poll (see [`leases`]) |
//! | `POST /v1/leases/renew` | [`LeaseRenew`](sparegrid_proto::grid::LeaseRenew) → [`LeaseRenewed`](sparegrid_proto::grid::LeaseRenewed) | pull mode: renew every lease the agent holds, in one batch; the reply lists the lost ones |
//! | `POST /v1/subtasks/{job}/{index}/complete` | [`Completion`] → [`CompleteReply`](sparegrid_proto::grid::CompleteReply) | pull mode: report one attempt; its epoch is the fencing token (409 `stale_epoch` when not current) |
//! | `GET /v1/hosts` | → JSON [`HostsView`] | every host's load, dominant metric, free slots, state and running count |
//! | `POST /v1/agents/migrations` | [`MigrationRequest`](sparegrid_proto::migrate::MigrationRequest) → [`MigrationTarget`](sparegrid_proto::migrate::MigrationTarget) | `reclaim_mode = "migrate"`: where a saved grid VM should go (see [`migrations`]) |
//! | `GET /v1/agents/images/{digest}` | → [`ImageSources`](sparegrid_proto::images::ImageSources) | the image catalog: the live hosts serving a grid VM image (by manifest sha256) on their transfer endpoints |
//! | `POST /v1/agents/migrations/relay` | [`RelayRequest`](sparegrid_proto::migrate::RelayRequest) → [`RelaySlot`](sparegrid_proto::migrate::RelaySlot) | neither host reaches the other: tokens to park the saved state on the controller's `/v1/data` |
//! | `POST /v1/agents/migrations/forward` | [`ForwardRequest`](sparegrid_proto::migrate::ForwardRequest) → [`MigrationAnswer`](sparegrid_proto::migrate::MigrationAnswer) | the source cannot reach the target's agent API: the controller posts the offer or commit there |
//! | `POST /v1/agents/outputs` | [`OutputRequest`](sparegrid_proto::grid::OutputRequest) → [`OutputGrant`](sparegrid_proto::grid::OutputGrant) | stdout too large to send inline: an upload of it to the controller's `/v1/data` (see [`outputs`]) |
//! | `POST /v1/agents/migrations/adopt` | [`AdoptAttempt`](sparegrid_proto::migrate::AdoptAttempt) → [`AdoptedAttempt`](sparegrid_proto::migrate::AdoptedAttempt) | the target takes the VM's attempt over under a new epoch |
//!
//! The agent routes take and give `application/msgpack` (see [`msgpack`]);
//! their errors are JSON `{code, message, field?}` like the rest of the API.
//! When `[auth]` has tokens they need `Authorization: Bearer <token>` with
//! `auth.agent_token` (or an admin token; 401 `unauthorized` without one or
//! with a wrong one, 403 `forbidden` with another role's; see
//! [`crate::api::auth`]); the controller sends `auth.agent_token` when it
//! pushes to agents.
//!
//! | code | status | when |
//! |---|---|---|
//! | `unauthorized` | 401 | no bearer token, or a wrong one |
//! | `forbidden` | 403 | a submit token (agent routes) or an agent token (`/v1/hosts`) |
//! | `malformed_msgpack` | 400 | the body is not the expected MessagePack message (rmp-serde's description follows) |
//! | `invalid_field` | 400 | a register or heartbeat field is refused (`field` names it, e.g. `tunnel.public_key`) |
//! | `public_key_in_use` | 409 | a register whose `tunnel.public_key` another host (not lost) registered; `field` is `tunnel.public_key` |
//! | `body_unreadable` | 400 | the body could not be read off the connection |
//! | `must_register` | 409 | a heartbeat, lease request or renewal from a host the controller does not know (yet, or any more): register, then heartbeat again |
//! | `stale_epoch` | 409 | a pull completion (`POST /v1/subtasks/{job}/{index}/complete`) whose epoch is not current; nothing changed |
//! | `not_current` | 409 | a migration request or adoption for an attempt the source host does not hold (any more) |
//! | `no_target` | 409 | a migration request when no idle host takes migrations |
//! | `no_relay` | 409 | a relay request when the controller serves no `/v1/data` |
//! | `no_data` | 409 | an output upload request when the controller serves no `/v1/data` |
//! | `target_unreachable` | 502 | a forwarded migration request the target did not answer |
//! | `image_unknown` | 404 | no live host serves the image asked for |
//! | `not_found` | 404 | a pull completion for an unknown job or subtask |
//! | `body_too_large` | 413 | the body is over `dispatch.max_agent_body_bytes` |
//! | `unsupported_media_type` | 415 | the body is not `application/msgpack` |
//! | `internal` | 500 | the store failed |
//!
//! # State
//!
//! [`AgentPlane`] holds the [`Registry`] behind a mutex (never held across
//! an `.await`), the attempts each host must be told to stop in its next
//! heartbeat reply, the hosts whose last push failed or that just released
//! work (no new work until their next heartbeat), and each host's free
//! slots between heartbeats ([`slots`]: a push debits, a completion, stop,
//! withdrawal or release credits, the heartbeat resets). Time is the
//! [`Instant`] since the plane was made. Every store call runs on the
//! blocking pool. The dispatcher ([`spawn_dispatcher`]) is in [`dispatch`];
//! a completion that frees a slot or requeues work wakes it.
//!
//! # Stopping attempts
//!
//! Attempts a host must stop reach it two ways. At once: when a job is
//! cancelled, [`AgentPlane::stop_attempts`] pushes a [`StopBatch`] to each
//! host that runs one (`POST <agent_url>/v1/subtasks/stop`, agent token).
//! As the fallback: every heartbeat reply withdraws the reported attempts
//! that are no longer current in the store (cancelled, requeued,
//! superseded), and those the plane queued for the host (a stop push that
//! failed, a host that left the set).

pub mod dispatch;
mod hosts;
pub mod leases;
mod migrations;
pub mod msgpack;
mod outputs;
mod slots;

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod migration_route_tests;
#[cfg(test)]
mod overlay_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use sparegrid_proto::grid::{
    AttemptRef, Completion, Heartbeat, HeartbeatReply, Register, Registered, Release, Released,
    StopBatch,
};
use tokio::sync::Notify;

pub use dispatch::spawn_dispatcher;
pub use hosts::{HostView, HostsView};
pub use msgpack::{MsgPack, MSGPACK};

use crate::api::{AppState, ErrorBody};
use crate::config::{ControllerConfig, DispatchConfig};
use crate::job::Resources;
use crate::overlay::Overlay;
use crate::registry::{Registry, RegistryError, RegistryEvent};
use crate::store::{
    CompletionResult, HostState, JobId, Outcome, Report, Store, StoreError, SubtaskRef,
};
use slots::SlotBook;

/// What the agent plane refuses or fails with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No bearer token, or a wrong one (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The body is not `application/msgpack` (415).
    #[error("expected Content-Type application/msgpack, got {got}")]
    UnsupportedMediaType { got: String },
    /// The body is over `dispatch.max_agent_body_bytes` (413).
    #[error("the request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The body could not be read off the connection (400).
    #[error("reading the request body: {0}")]
    BodyRead(String),
    /// The body is not a valid MessagePack `what` (400).
    #[error("the body is not a valid MessagePack {what}: {message}")]
    BadMsgpack { what: String, message: String },
    /// The registry refused a register or heartbeat (400, or 409 when the
    /// host must register again).
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// A heartbeat from a host known only from the store, from before a
    /// controller restart (409): it must register to give its slots again.
    #[error("host {0:?} is known from before a controller restart; register again (POST /v1/agents/register)")]
    Restored(String),
    /// A lease request or renewal from a host the registry does not know
    /// (yet, or since a restart) or that is lost (409 `must_register`).
    #[error(
        "host {0:?} is not registered (or was lost); register again (POST /v1/agents/register)"
    )]
    NotRegistered(String),
    /// A pull completion whose epoch is not the subtask's current attempt
    /// (409 `stale_epoch`); nothing changed.
    #[error("attempt {epoch} of subtask {index} of job {job} is not current (its lease expired, or it was withdrawn or cancelled); nothing changed")]
    StaleEpoch { job: String, index: u64, epoch: u32 },
    /// A pull completion for a job or subtask that does not exist (404).
    #[error("{0}")]
    SubtaskNotFound(String),
    /// A body field that contradicts the path (400 `invalid_field`).
    #[error("{message}")]
    Mismatch {
        field: &'static str,
        message: String,
    },
    /// A register's `tunnel` field is refused (400 `invalid_field`).
    #[error("register from host {host:?}: {field} {message}")]
    Tunnel {
        host: String,
        field: &'static str,
        message: String,
    },
    /// A register whose tunnel key another live host holds (409
    /// `public_key_in_use`).
    #[error("register from host {host:?}: tunnel.public_key is already registered by host {other:?}; every host needs its own key pair")]
    PublicKeyInUse { host: String, other: String },
    /// A migration from a host that does not hold the attempt, or an
    /// adoption of an attempt its source no longer holds (409
    /// `not_current`); nothing changed.
    #[error("attempt {epoch} of subtask {index} of job {job} is not held by host {host:?} (requeued, withdrawn, moved or done); nothing changed")]
    NotCurrent {
        job: String,
        index: u64,
        epoch: u32,
        host: String,
    },
    /// No live host serves the image (404 `image_unknown`).
    #[error("no live host serves image {0} (hosts list the images they hold when they register), nor does the controller (data.images)")]
    ImageUnknown(String),
    /// A forwarded migration request the target did not answer (502
    /// `target_unreachable`).
    #[error("cannot reach host {host:?} for the migration: {message}")]
    Unreachable { host: String, message: String },
    /// The controller cannot relay a saved state (409 `no_relay`).
    #[error("cannot relay the saved state through the controller: {0}")]
    NoRelay(String),
    /// An output upload asked of a controller that serves no `/v1/data`
    /// (409 `no_data`).
    #[error("{0}")]
    NoData(String),
    /// No host can take a saved grid VM now (409 `no_target`).
    #[error("no idle host takes migrations now (one needs reclaim_mode-capable runtime, a transfer endpoint, load below dispatch_below and nothing suspended or saved)")]
    NoTarget,
    /// The store failed (500).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A blocking store task panicked or was cancelled (500).
    #[error("store task: {0}")]
    Task(String),
    /// A reply could not be encoded (500).
    #[error("encoding the reply: {0}")]
    Encode(String),
}

impl AgentError {
    pub fn status(&self) -> StatusCode {
        match self {
            AgentError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AgentError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AgentError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::BodyRead(_) | AgentError::BadMsgpack { .. } => StatusCode::BAD_REQUEST,
            AgentError::Registry(e) if e.must_register() => StatusCode::CONFLICT,
            AgentError::Restored(_) => StatusCode::CONFLICT,
            AgentError::NotRegistered(_) | AgentError::StaleEpoch { .. } => StatusCode::CONFLICT,
            AgentError::NotCurrent { .. } | AgentError::NoTarget => StatusCode::CONFLICT,
            AgentError::NoRelay(_) | AgentError::NoData(_) => StatusCode::CONFLICT,
            AgentError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            AgentError::SubtaskNotFound(_) | AgentError::ImageUnknown(_) => StatusCode::NOT_FOUND,
            AgentError::Mismatch { .. } => StatusCode::BAD_REQUEST,
            AgentError::Registry(_) => StatusCode::BAD_REQUEST,
            AgentError::Tunnel { .. } => StatusCode::BAD_REQUEST,
            AgentError::PublicKeyInUse { .. } => StatusCode::CONFLICT,
            AgentError::Store(_) | AgentError::Task(_) | AgentError::Encode(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The stable code of the error body (listed in the module header).
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Unauthorized(_) => "unauthorized",
            AgentError::UnsupportedMediaType { .. } => "unsupported_media_type",
            AgentError::BodyTooLarge { .. } => "body_too_large",
            AgentError::BodyRead(_) => "body_unreadable",
            AgentError::BadMsgpack { .. } => "malformed_msgpack",
            AgentError::Registry(e) if e.must_register() => "must_register",
            AgentError::Restored(_) | AgentError::NotRegistered(_) => "must_register",
            AgentError::StaleEpoch { .. } => "stale_epoch",
            AgentError::NotCurrent { .. } => "not_current",
            AgentError::NoTarget => "no_target",
            AgentError::NoRelay(_) => "no_relay",
            AgentError::NoData(_) => "no_data",
            AgentError::Unreachable { .. } => "target_unreachable",
            AgentError::ImageUnknown(_) => "image_unknown",
            AgentError::SubtaskNotFound(_) => "not_found",
            AgentError::Registry(_) | AgentError::Mismatch { .. } => "invalid_field",
            AgentError::Tunnel { .. } => "invalid_field",
            AgentError::PublicKeyInUse { .. } => "public_key_in_use",
            AgentError::Store(_) | AgentError::Task(_) | AgentError::Encode(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        let field = match self {
            AgentError::Registry(
                RegistryError::BadRegister { field, .. }
                | RegistryError::BadHeartbeat { field, .. },
            ) => Some((*field).to_owned()),
            AgentError::BadMsgpack { .. } => Some("body".to_owned()),
            AgentError::Mismatch { field, .. } => Some((*field).to_owned()),
            AgentError::Tunnel { field, .. } => Some((*field).to_owned()),
            AgentError::PublicKeyInUse { .. } => Some("tunnel.public_key".to_owned()),
            AgentError::NotCurrent { .. } => Some("attempt".to_owned()),
            _ => None,
        };
        ErrorBody {
            code: self.code().to_owned(),
            message: self.to_string(),
            field,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(code = self.code(), "{self}");
        }
        crate::api::error_response(self.status(), self.body())
    }
}

/// Mutable bookkeeping of the plane, behind one mutex.
#[derive(Debug)]
pub(crate) struct Book {
    pub(crate) registry: Registry,
    /// Attempts to list in each host's next heartbeat reply.
    pub(crate) stop: BTreeMap<String, Vec<AttemptRef>>,
    /// Hosts whose last push failed: no work until their next heartbeat.
    pub(crate) skip: HashSet<String>,
    /// Hosts restored from the store that have not registered since.
    pub(crate) restored: HashSet<String>,
    /// Registry events whose store side failed; retried next round.
    pub(crate) retry: Vec<RegistryEvent>,
    /// Each job's per-subtask resources, for building assignments.
    pub(crate) resources: BTreeMap<JobId, Resources>,
    /// Free slots between heartbeats (see [`slots`]).
    pub(crate) slots: SlotBook,
    /// Peer-to-peer work stealing as the agents last reported it: job →
    /// host → (stolen in, given out). In memory only: agents report every
    /// count again after they register.
    pub(crate) steals: BTreeMap<String, BTreeMap<String, (u64, u64)>>,
    /// Some p2p job is queued or running (checked every dispatch round):
    /// only then do heartbeat replies list peers, so idle agents do not
    /// probe each other for work.
    pub(crate) p2p_active: bool,
}

impl Book {
    /// The other active p2p agents with an address, for `host`'s heartbeat
    /// reply (empty when `host` is not a p2p agent).
    pub(crate) fn peers_of(&self, host: &str) -> Vec<sparegrid_proto::grid::PeerAddr> {
        if !self.p2p_active || !self.registry.host(host).is_some_and(|h| h.p2p) {
            return Vec::new();
        }
        self.registry
            .hosts()
            .filter(|h| h.p2p && h.id.as_str() != host && h.state == HostState::Active)
            .filter_map(|h| {
                Some(sparegrid_proto::grid::PeerAddr {
                    host: h.id.as_str().to_owned(),
                    url: h.agent_url.clone()?,
                })
            })
            .collect()
    }
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) book: Mutex<Book>,
    pub(crate) start: Instant,
    pub(crate) config: DispatchConfig,
    /// The agent token (`auth.agent_token`), sent on every push to an agent.
    pub(crate) agent_token: Option<String>,
    pub(crate) wake: Notify,
    /// Wakes the lease requests that wait for work ([`leases`]).
    pub(crate) lease_wake: Notify,
    pub(crate) client: reqwest::Client,
    /// The grid overlay, behind its own lock: never held together with
    /// `book`'s.
    pub(crate) overlay: Arc<Mutex<Overlay>>,
}

/// The agent plane's shared state; cheap to clone. Lives in
/// [`AppState::agents`].
#[derive(Clone)]
pub struct AgentPlane {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPlane")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AgentPlane {
    /// A plane over `store` with the registry and dispatch settings of
    /// `config` (which should have been validated). Its clock starts now.
    pub fn new(store: Arc<dyn Store>, config: &ControllerConfig) -> AgentPlane {
        let client = reqwest::Client::builder()
            .timeout(config.dispatch.push_timeout)
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!("building the agent HTTP client: {e}; using the defaults");
                reqwest::Client::new()
            });
        AgentPlane {
            inner: Arc::new(Inner {
                store,
                book: Mutex::new(Book {
                    registry: Registry::new(config.registry.clone()),
                    stop: BTreeMap::new(),
                    skip: HashSet::new(),
                    restored: HashSet::new(),
                    retry: Vec::new(),
                    resources: BTreeMap::new(),
                    slots: SlotBook::new(config.registry.host_timeout),
                    steals: BTreeMap::new(),
                    p2p_active: false,
                }),
                start: Instant::now(),
                config: config.dispatch.clone(),
                agent_token: config.auth.agent_token.clone(),
                wake: Notify::new(),
                lease_wake: Notify::new(),
                client,
                overlay: Arc::new(Mutex::new(Overlay::new(&config.overlay))),
            }),
        }
    }

    /// A p2p job's work stealing by host, as the agents last reported it.
    pub fn steals_of(&self, job: &str) -> Vec<crate::api::HostSteals> {
        self.book()
            .steals
            .get(job)
            .map_or_else(Vec::new, |by_host| {
                by_host
                    .iter()
                    .map(|(host, &(stolen_in, given_out))| crate::api::HostSteals {
                        host: host.clone(),
                        stolen_in,
                        given_out,
                    })
                    .collect()
            })
    }

    /// Time since the plane was made: the registry's clock.
    pub fn now(&self) -> Duration {
        self.inner.start.elapsed()
    }

    /// Wakes the dispatcher for a round now (a job was created, a host
    /// heartbeat, a subtask went back to the queue).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Wakes every waiting lease request (a job was created, or subtasks
    /// went back to the queue): each looks for work again.
    pub fn wake_leases(&self) {
        self.inner.lease_wake.notify_waiters();
    }

    /// Largest agent-plane body accepted.
    pub fn max_body_bytes(&self) -> usize {
        usize::try_from(self.inner.config.max_agent_body_bytes).unwrap_or(usize::MAX)
    }

    /// The overlay's state (see [`crate::overlay`]).
    pub(crate) fn overlay(&self) -> MutexGuard<'_, Overlay> {
        self.inner
            .overlay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The overlay's state, shared (for the metrics collector).
    pub fn overlay_state(&self) -> Arc<Mutex<Overlay>> {
        Arc::clone(&self.inner.overlay)
    }

    /// True when `[overlay]` is on, so `network = "overlay"` jobs can run.
    pub fn overlay_enabled(&self) -> bool {
        crate::overlay::plane::enabled(&self.overlay())
    }

    pub(crate) fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock leaves plain data behind; carry on.
        self.inner
            .book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` against the store on the blocking pool.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(&self.inner.store);
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))?
            .map_err(AgentError::from)
    }
}

impl AgentPlane {
    /// Tells the hosts of `refs` (a cancelled job's running subtasks) to
    /// stop those attempts now: one `POST <agent_url>/v1/subtasks/stop`
    /// ([`StopBatch`]) per host, each on its own task, so this returns at
    /// once. A host that cannot be reached (or has no URL) learns it from
    /// its next heartbeat reply instead. A stopped attempt's slot is free
    /// again as soon as the agent confirms.
    pub fn stop_attempts(&self, refs: &[SubtaskRef]) {
        let mut by_host: BTreeMap<String, Vec<AttemptRef>> = BTreeMap::new();
        for r in refs {
            if let Some(host) = &r.host {
                by_host
                    .entry(host.clone())
                    .or_default()
                    .push(dispatch::attempt_of(r.clone()));
            }
        }
        let mut book = self.book();
        for (host, attempts) in by_host {
            let url = book.registry.host(&host).and_then(|h| h.agent_url.clone());
            let body = msgpack::encode(&StopBatch {
                attempts: attempts.clone(),
            });
            let (Some(url), Ok(body)) = (url, body) else {
                book.stop.entry(host).or_default().extend(attempts);
                continue;
            };
            let plane = self.clone();
            tokio::spawn(async move {
                match dispatch::push_stop(&plane, &url, body).await {
                    Ok(()) => {
                        tracing::info!(host = %host, stopped = attempts.len(), "agent stopped attempts");
                        {
                            let mut book = plane.book();
                            for a in &attempts {
                                book.slots.release(&host, a);
                            }
                        }
                        plane.wake();
                    }
                    Err(e) => {
                        tracing::warn!(host = %host, "pushing a stop failed, the next heartbeat reply carries it: {e}");
                        plane.book().stop.entry(host).or_default().extend(attempts);
                    }
                }
            });
        }
    }
}

/// Extractor: the request carries the agent (or admin) token, when
/// `[auth]` has tokens. The router's auth middleware
/// ([`crate::api::auth`]) checks this first; the extractor checks again so
/// the agent routes stay closed wherever they are mounted.
#[derive(Debug, Clone, Copy)]
pub struct AgentAuth;

impl FromRequestParts<AppState> for AgentAuth {
    type Rejection = crate::api::ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, crate::api::ApiError> {
        state
            .auth
            .check(crate::api::Access::Agent, &parts.headers)
            .map(|_| AgentAuth)
            .map_err(Into::into)
    }
}

/// The agent plane's routes, to merge into the API router.
pub fn routes() -> Router<AppState> {
    // Short, so that rustfmt keeps each route call on one line: the route
    // inventory in `api::auth_tests` reads them from this source text.
    use leases::complete as pull_done;
    Router::new()
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/heartbeat", post(heartbeat))
        .route("/v1/agents/completions", post(completions))
        .route("/v1/agents/release", post(release))
        .route("/v1/leases", post(leases::lease))
        .route("/v1/leases/renew", post(leases::renew))
        .route("/v1/subtasks/{job}/{index}/complete", post(pull_done))
        .route("/v1/hosts", get(hosts::list))
        .route("/v1/agents/migrations", post(migrations::target))
        .route("/v1/agents/migrations/adopt", post(migrations::adopt))
        .route("/v1/agents/migrations/relay", post(migrations::relay))
        .route("/v1/agents/migrations/forward", post(migrations::forward))
        .route("/v1/agents/images/{digest}", get(migrations::image_sources))
        .route("/v1/agents/outputs", post(outputs::grant))
}

/// Middleware: wakes the dispatcher when `POST /v1/jobs` created a job.
pub async fn wake_on_submit(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let submit = req.method() == Method::POST && req.uri().path() == "/v1/jobs";
    let response = next.run(req).await;
    if submit && response.status() == StatusCode::CREATED {
        s.agents.wake();
        s.agents.wake_leases();
    }
    response
}

/// Extractor: the peer address of the request's connection, when the
/// server was started with connect info (`serve_on`, `serve_tls_on`);
/// `None` otherwise (tests that serve the bare router).
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub Option<std::net::SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for RemoteAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RemoteAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// `POST /v1/agents/register`.
async fn register(
    State(s): State<AppState>,
    _auth: AgentAuth,
    RemoteAddr(remote): RemoteAddr,
    MsgPack(reg): MsgPack<Register>,
) -> Result<MsgPack<Registered>, AgentError> {
    let plane = &s.agents;
    let host = reg.host.clone();
    let address = reg.agent_url.clone().unwrap_or_default();
    // The registration's own fields first, then the overlay (which may
    // refuse it, e.g. a key another host holds), then the registry.
    crate::registry::check_register(&reg)?;
    let overlay = crate::overlay::plane::register(plane, &reg, remote).await?;
    let registered = {
        let mut book = plane.book();
        let mut registered = book.registry.register(reg, plane.now())?;
        registered.overlay = overlay;
        book.restored.remove(&host);
        book.skip.remove(&host);
        book.stop.remove(&host);
        book.slots.forget(&host);
        registered
    };
    plane
        .blocking(move |store| store.upsert_host(&host, &address))
        .await?;
    plane.wake();
    Ok(MsgPack(registered))
}

/// The load report kept in the store for `GET /v1/hosts` after a restart.
fn load_json(hb: &Heartbeat) -> serde_json::Value {
    serde_json::json!({
        "load": hb.load,
        "dominant": hb.dominant,
        "breakdown": hb.breakdown,
        "free_slots": hb.free_slots,
        "running": hb.running.len(),
        "vms": hb.vms,
        "suspended_ms": hb.suspended_ms,
    })
}

/// `POST /v1/agents/heartbeat`.
async fn heartbeat(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(mut hb): MsgPack<Heartbeat>,
) -> Result<MsgPack<HeartbeatReply>, AgentError> {
    let plane = &s.agents;
    let host = hb.host.clone();
    if plane.book().restored.contains(&host) {
        return Err(AgentError::Restored(host));
    }
    let renew = std::mem::take(&mut hb.renew);
    let steals = std::mem::take(&mut hb.steals);
    let tunnel = hb.tunnel.take();
    let load = load_json(&hb);
    let h = host.clone();
    let current: HashSet<(String, u64, u32)> = plane
        .blocking(move |store| store.assigned_to(&h))
        .await?
        .into_iter()
        .map(|r| (r.job.0, r.index, r.epoch))
        .collect();
    let (mut outcome, events) = {
        let mut guard = plane.book();
        let book = &mut *guard;
        let now = plane.now();
        let outcome = book.registry.heartbeat(hb, now, |a| {
            current.contains(&(a.job.clone(), a.index, a.epoch))
        })?;
        if let Some(h) = book.registry.host(&host) {
            if let Some(last) = &h.last {
                book.slots.heartbeat(last, h.slots, now);
            }
        }
        book.skip.remove(&host);
        for js in steals {
            book.steals
                .entry(js.job)
                .or_default()
                .insert(host.clone(), (js.stolen_in, js.given_out));
        }
        let events = book.registry.tick(now);
        (outcome, events)
    };
    dispatch::apply_events(plane, events).await;
    if let Some(stop) = plane.book().stop.remove(&host) {
        let mut seen: BTreeSet<(String, u64, u32)> = outcome
            .withdraw
            .iter()
            .map(|a| (a.job.clone(), a.index, a.epoch))
            .collect();
        for a in stop {
            if seen.insert((a.job.clone(), a.index, a.epoch)) {
                outcome.withdraw.push(a);
            }
        }
    }
    let h = host.clone();
    if let Err(e) = plane
        .blocking(move |store| store.heartbeat(&h, &load))
        .await
    {
        // The registry has the heartbeat; the stored copy is for display.
        tracing::warn!(host = %host, "recording a heartbeat in the store: {e}");
    }
    if !outcome.withdraw.is_empty() {
        tracing::info!(host = %host, withdraw = outcome.withdraw.len(), "telling agent to stop attempts");
        let mut book = plane.book();
        for a in &outcome.withdraw {
            book.slots.release(&host, a);
        }
    }
    plane.wake();
    let mut reply = outcome.into_reply();
    reply.peers = plane.book().peers_of(&host);
    reply.overlay_peers = crate::overlay::plane::heartbeat(plane, &host, tunnel);
    if !renew.is_empty() {
        // Pull mode: renewals ride on the heartbeat (see `leases`).
        reply.lost = leases::renew_for(plane, &host, renew).await?.lost;
    }
    Ok(MsgPack(reply))
}

/// Longest reason kept from a [`Release`].
const MAX_RELEASE_REASON: usize = 200;

/// `POST /v1/agents/release`: the agent hands attempts back unfinished.
/// Each one that is still the current attempt of a subtask assigned to
/// that host goes back to the queue (`Store::withdraw`, not a failure);
/// the others change nothing. The host gets no new work until its next
/// heartbeat (a draining agent reports no free slot).
#[utoipa::path(
    post,
    path = "/v1/agents/release",
    tag = "agents",
    request_body(
        content = Vec<u8>,
        content_type = "application/msgpack",
        description = "A MessagePack `Release`: `{host, attempts: [{job, index, epoch}], reason}`"
    ),
    responses(
        (status = 200, description = "MessagePack `Released`: `{requeued}`, the attempts put back in the queue",
            content_type = "application/msgpack", body = Vec<u8>),
        (status = 400, description = "The body is not a MessagePack `Release`", body = ErrorBody),
        (status = 401, description = "No bearer token, or a wrong one", body = ErrorBody),
        (status = 403, description = "A token of a role other than agent or admin", body = ErrorBody),
        (status = 413, description = "The body is over `dispatch.max_agent_body_bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/msgpack`", body = ErrorBody),
        (status = 500, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn release(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(rel): MsgPack<Release>,
) -> Result<MsgPack<Released>, AgentError> {
    let plane = &s.agents;
    let Release {
        host,
        attempts,
        reason,
    } = rel;
    let mut reason: String = reason.chars().take(MAX_RELEASE_REASON).collect();
    if reason.is_empty() {
        reason = "released by the agent".to_owned();
    }
    let (h, list, why) = (host.clone(), attempts.clone(), reason.clone());
    let requeued = plane
        .blocking(move |store| {
            let assigned: HashSet<(String, u64, u32)> = store
                .assigned_to(&h)?
                .into_iter()
                .map(|r| (r.job.0, r.index, r.epoch))
                .collect();
            let mut n = 0u32;
            for a in &list {
                if assigned.contains(&(a.job.clone(), a.index, a.epoch))
                    && store.withdraw(&JobId(a.job.clone()), a.index, a.epoch, &why)?
                {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await?;
    {
        let mut book = plane.book();
        for a in &attempts {
            book.slots.release(&host, a);
        }
        book.skip.insert(host.clone());
    }
    tracing::info!(host = %host, released = attempts.len(), requeued, reason = %reason, "agent handed attempts back");
    if requeued > 0 {
        plane.wake();
        plane.wake_leases();
    }
    Ok(MsgPack(Released { requeued }))
}

/// What became of one completion report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// Counted: the subtask is done, queued for a retry, or dead.
    Accepted,
    /// Already reported or the subtask is already done; nothing changed.
    Duplicate,
    /// Not the subtask's current attempt (withdrawn, superseded,
    /// cancelled); nothing changed.
    Stale,
    /// Unknown job or subtask; nothing changed.
    Rejected,
}

/// One report's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionAck {
    pub attempt: AttemptRef,
    pub result: Ack,
    /// Why a report was rejected.
    pub error: Option<String>,
}

/// The answer to `POST /v1/agents/completions`: one ack per report, in
/// order, and the counts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CompletionsReply {
    pub accepted: u32,
    pub duplicate: u32,
    pub stale: u32,
    pub rejected: u32,
    pub results: Vec<CompletionAck>,
}

/// A completion as the store records it. A signal is kept in the error.
pub fn report_of(c: Completion) -> Report {
    let error = match (c.error, c.signal) {
        (Some(e), Some(sig)) => Some(format!("{e} (killed by signal {sig})")),
        (Some(e), None) => Some(e),
        (None, Some(sig)) => Some(format!("killed by signal {sig}")),
        (None, None) => None,
    };
    let stdout_size = c.stdout_size.max(c.stdout.len() as u64);
    let stderr_size = c.stderr_size.max(c.stderr.len() as u64);
    Report {
        job: JobId(c.attempt.job),
        index: c.attempt.index,
        epoch: c.attempt.epoch,
        outcome: Outcome {
            exit_code: c.exit_code,
            error,
            stdout: c.stdout,
            stdout_size,
            stderr: c.stderr,
            stderr_size,
            duration_ms: c.duration_ms,
        },
    }
}

/// `POST /v1/agents/completions`.
async fn completions(
    State(s): State<AppState>,
    _auth: AgentAuth,
    MsgPack(reports): MsgPack<Vec<Completion>>,
) -> Result<MsgPack<CompletionsReply>, AgentError> {
    let plane = &s.agents;
    let freed = {
        let mut book = plane.book();
        reports
            .iter()
            .filter(|c| book.slots.release(&c.host, &c.attempt))
            .count()
    };
    let attempts: Vec<AttemptRef> = reports.iter().map(|c| c.attempt.clone()).collect();
    let reports: Vec<Report> = reports.into_iter().map(report_of).collect();
    let results = if reports.is_empty() {
        Vec::new()
    } else {
        plane
            .blocking(move |store| store.complete_many(&reports))
            .await?
    };
    let mut reply = CompletionsReply::default();
    for (attempt, result) in attempts.into_iter().zip(results) {
        let (ack, error) = match result {
            Ok(CompletionResult::Accepted { .. }) => (Ack::Accepted, None),
            Ok(CompletionResult::Duplicate) => (Ack::Duplicate, None),
            Ok(CompletionResult::Stale) => (Ack::Stale, None),
            Err(e) => (Ack::Rejected, Some(e.to_string())),
        };
        let count = match ack {
            Ack::Accepted => &mut reply.accepted,
            Ack::Duplicate => &mut reply.duplicate,
            Ack::Stale => &mut reply.stale,
            Ack::Rejected => &mut reply.rejected,
        };
        *count += 1;
        reply.results.push(CompletionAck {
            attempt,
            result: ack,
            error,
        });
    }
    if reply.accepted > 0 || freed > 0 {
        // Slots came free, or failed attempts went back to the queue.
        plane.wake();
        plane.wake_leases();
    }
    Ok(MsgPack(reply))
}
