//! The job routes: submit, list, get, cancel, results and the progress event
//! stream, with their response types. Every store call runs on the blocking
//! pool ([`tokio::task::spawn_blocking`]); nothing here blocks the runtime.
//!
//! A job with a `reduce` command has two stages (see [`crate::store`]): its
//! map subtasks, then one reduce subtask on their concatenated outputs.
//! Its summary says how many map subtasks it has (`map_subtasks`) and where
//! the reduce is (`reduce`); `counts.total` includes the reduce subtask once
//! it exists, that is once every map subtask is done. Its results are the
//! reduce's output by default; `?stage=map` gives the map outputs.
//!
//! `GET /v1/jobs/{id}` also shows, for a pull job, the leases held by
//! each host (`leases`), and for any job its first [`DEAD_SHOWN`] dead
//! subtasks with every attempt's error (`dead_subtasks`; `counts.dead`
//! says how many there are).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::openapi::{JobCountsDoc, JobRequestDoc, JobStateDoc};
use super::AppState;
use crate::job::{self, DispatchMode, JobRequest};
use crate::split;
use crate::store::{
    AttemptRecord, AttemptState, DeadSubtask, HostLeases, JobCounts, JobId, JobRecord, JobState,
    ReduceState, Store, StoreError,
};

/// Jobs a listing returns when `limit` is not given.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// The largest `limit` a listing accepts.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// Dead subtasks `GET /v1/jobs/{id}` lists (with their attempts).
pub const DEAD_SHOWN: usize = 100;
/// Tail of each failed attempt's stderr shown with a dead subtask.
pub const DEAD_STDERR_TAIL: usize = 2048;
/// Results read from the store per page while a results body streams.
const RESULTS_PAGE: usize = 256;

/// Runs `f` against the store on the blocking pool.
pub(crate) async fn blocking<T, F>(store: &Arc<dyn Store>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|e| ApiError::Task(e.to_string()))?
        .map_err(ApiError::from)
}

// ---------------------------------------------------------------------------
// Response types
// ---------------------------------------------------------------------------

/// `POST /v1/jobs` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    /// The new job's id (`j-1`, …).
    #[schema(value_type = String, example = "j-1")]
    pub id: JobId,
    /// Map subtasks the job was cut into (a reduce subtask, when the job
    /// has one, comes on top once they are done).
    pub subtasks: u64,
}

/// Where a job's reduce step is (schema of [`ReduceState`]).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = ReduceState)]
#[serde(rename_all = "snake_case")]
pub enum ReduceStateDoc {
    /// Some map subtask is not done yet; the reduce subtask does not exist.
    Waiting,
    Queued,
    Assigned,
    Done,
    /// Failed `max_attempts` times, or refused before it ran (`error` says why).
    Dead,
    Cancelled,
    /// The job ended before its map subtasks were all done.
    Skipped,
}

/// Which outputs a results answer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The map subtasks' outputs, in index order.
    #[default]
    Map,
    /// The reduce subtask's output.
    Reduce,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Map => "map",
            Stage::Reduce => "reduce",
        }
    }
}

/// A job as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    #[schema(value_type = String, example = "j-1")]
    pub id: JobId,
    pub name: String,
    #[schema(value_type = JobStateDoc)]
    pub state: JobState,
    pub priority: i32,
    pub max_attempts: u32,
    /// Milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// When the first subtask was assigned.
    pub started_ms: Option<i64>,
    /// When the job became done, failed or cancelled.
    pub finished_ms: Option<i64>,
    /// Subtasks by state. `total` counts the subtasks that exist: the map
    /// subtasks, plus the reduce subtask once every map subtask is done.
    #[schema(value_type = JobCountsDoc)]
    pub counts: JobCounts,
    /// Map subtasks; the reduce subtask, when there is one, has this index.
    #[serde(default)]
    pub map_subtasks: u64,
    /// Where the reduce step is; `null` when the job has none.
    #[serde(default)]
    #[schema(value_type = Option<ReduceStateDoc>)]
    pub reduce: Option<ReduceState>,
    /// Why the job failed when the controller refused to go on (a reduce
    /// that would have run on cut or oversized input); `null` otherwise.
    #[serde(default)]
    pub error: Option<String>,
}

impl From<JobRecord> for JobSummary {
    fn from(r: JobRecord) -> Self {
        JobSummary {
            id: r.id,
            name: r.name,
            state: r.state,
            priority: r.priority,
            max_attempts: r.max_attempts,
            created_ms: r.created_ms,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            counts: r.counts,
            map_subtasks: r.map_subtasks,
            reduce: r.reduce,
            error: r.error,
        }
    }
}

/// `GET /v1/jobs` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<JobSummary>,
}

/// `GET /v1/jobs/{id}` answer: the summary, the request it was made from,
/// the leases held on it (pull jobs) and its dead subtasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobSummary,
    #[schema(value_type = JobRequestDoc)]
    pub request: JobRequest,
    /// Pull jobs: the leases held now, per host (sorted by host); empty
    /// for other jobs and when nothing is leased.
    #[serde(default)]
    pub leases: Vec<LeaseHolder>,
    /// The first 100 dead subtasks in index order, each with every
    /// attempt; `counts.dead` says how many there are in all.
    #[serde(default)]
    pub dead_subtasks: Vec<DeadSubtaskView>,
    /// Peer-to-peer jobs: subtasks moved by work stealing, per host, as the
    /// agents last reported them (sorted by host); empty for other jobs.
    #[serde(default)]
    pub steals: Vec<HostSteals>,
}

/// One host's work stealing on a p2p job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostSteals {
    pub host: String,
    /// Subtasks it took from peers.
    pub stolen_in: u64,
    /// Subtasks peers took from it.
    pub given_out: u64,
}

/// The leases one host holds on a pull job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseHolder {
    pub host: String,
    /// Subtasks it holds on lease.
    pub leases: u64,
    /// When the first of them expires unless renewed, ms since the Unix
    /// epoch (the controller's clock).
    pub earliest_expiry_ms: i64,
}

impl From<HostLeases> for LeaseHolder {
    fn from(h: HostLeases) -> Self {
        LeaseHolder {
            host: h.host,
            leases: h.leases,
            earliest_expiry_ms: h.earliest_expiry_ms,
        }
    }
}

/// A dead subtask: failed `max_attempts` times (or refused before it ran,
/// `error` says why), with every attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeadSubtaskView {
    pub index: u64,
    /// True for a job's reduce subtask.
    pub reduce: bool,
    /// Why the controller parked it without running it; `null` when its
    /// attempts failed.
    pub error: Option<String>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptView>,
}

/// One attempt at a dead subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// The attempt number (epoch), from 1.
    pub attempt: u32,
    pub host: String,
    /// `failed`, `withdrawn` (taken back: lease expired, host lost or
    /// drained; not a failure), `running`, `succeeded` or `cancelled`.
    pub state: String,
    pub exit_code: Option<i32>,
    /// The agent's error (timeout, spawn failure, signal) or why the
    /// attempt was withdrawn.
    pub error: Option<String>,
    /// The last 2 KiB of its stderr as UTF-8 (invalid bytes replaced).
    pub stderr: String,
    /// Stderr's size before any cap.
    pub stderr_size: u64,
    pub finished_ms: Option<i64>,
}

fn attempt_state_name(s: AttemptState) -> &'static str {
    match s {
        AttemptState::Running => "running",
        AttemptState::Succeeded => "succeeded",
        AttemptState::Failed => "failed",
        AttemptState::Withdrawn => "withdrawn",
        AttemptState::Cancelled => "cancelled",
    }
}

impl From<AttemptRecord> for AttemptView {
    fn from(a: AttemptRecord) -> Self {
        let cut = a.stderr.len().saturating_sub(DEAD_STDERR_TAIL);
        AttemptView {
            attempt: a.attempt,
            host: a.host,
            state: attempt_state_name(a.state).to_owned(),
            exit_code: a.exit_code,
            error: a.error,
            stderr: String::from_utf8_lossy(&a.stderr[cut..]).into_owned(),
            stderr_size: a.stderr_size,
            finished_ms: a.finished_ms,
        }
    }
}

impl From<DeadSubtask> for DeadSubtaskView {
    fn from(d: DeadSubtask) -> Self {
        DeadSubtaskView {
            index: d.subtask.index,
            reduce: d.subtask.reduce,
            error: d.subtask.error,
            attempts: d.attempts.into_iter().map(AttemptView::from).collect(),
        }
    }
}

/// `DELETE /v1/jobs/{id}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CancelResponse {
    #[schema(value_type = String, example = "j-1")]
    pub id: JobId,
    /// The job's state after the cancel (`cancelled`, or the final state it
    /// already had).
    #[schema(value_type = JobStateDoc)]
    pub state: JobState,
    /// False when the job had already finished or been cancelled.
    pub changed: bool,
    /// Queued subtasks that will now never run.
    pub dropped_queued: u64,
    /// Subtasks that were running and are being stopped.
    pub stopping: u64,
}

/// One done subtask's accepted result (`?format=json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubtaskResult {
    pub index: u64,
    /// `reduce` for the reduce subtask's result, `map` otherwise.
    #[serde(default)]
    pub stage: Stage,
    /// The attempt (epoch) whose result was accepted.
    pub attempt: u32,
    pub host: String,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<u64>,
    /// Captured stdout as UTF-8 (invalid bytes replaced by U+FFFD).
    pub stdout: String,
    /// Stdout's size before any cap.
    pub stdout_size: u64,
    pub stderr: String,
    pub stderr_size: u64,
}

impl From<AttemptRecord> for SubtaskResult {
    fn from(a: AttemptRecord) -> Self {
        SubtaskResult {
            index: a.index,
            stage: Stage::Map,
            attempt: a.attempt,
            host: a.host,
            exit_code: a.exit_code,
            duration_ms: a.duration_ms,
            stdout: String::from_utf8_lossy(&a.stdout).into_owned(),
            stdout_size: a.stdout_size,
            stderr: String::from_utf8_lossy(&a.stderr).into_owned(),
            stderr_size: a.stderr_size,
        }
    }
}

/// `GET /v1/jobs/{id}/results?format=json` answer (streamed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobResults {
    #[schema(value_type = String, example = "j-1")]
    pub id: JobId,
    #[schema(value_type = JobStateDoc)]
    pub state: JobState,
    /// Which outputs `results` holds: `reduce` (the default for a job with
    /// a reduce step: one entry, the reduce's output) or `map` (one entry
    /// per done map subtask).
    #[serde(default)]
    pub stage: Stage,
    /// True when the stage is finished: every map subtask done (`map`), or
    /// the reduce subtask done (`reduce`).
    pub complete: bool,
    /// Done subtasks of the stage in index order.
    pub results: Vec<SubtaskResult>,
}

/// The data of each `GET /v1/jobs/{id}/events` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProgressEvent {
    #[schema(value_type = String, example = "j-1")]
    pub id: JobId,
    #[schema(value_type = JobStateDoc)]
    pub state: JobState,
    #[schema(value_type = JobCountsDoc)]
    pub counts: JobCounts,
}

// ---------------------------------------------------------------------------
// Query parameters
// ---------------------------------------------------------------------------

/// `GET /v1/jobs` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state.
    #[param(value_type = Option<JobStateDoc>)]
    pub state: Option<String>,
    /// At most this many jobs (1..=10000, default 100), newest first.
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
}

/// `GET /v1/jobs/{id}/results` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// `raw` (default): the outputs concatenated in subtask order;
    /// `json`: one entry per done subtask.
    #[param(value_type = Option<String>, example = "json")]
    pub format: Option<String>,
    /// `1`/`true`: answer before the stage has finished, with what is done.
    #[param(value_type = Option<String>, example = "1")]
    pub partial: Option<String>,
    /// `reduce` (the default for a job with a reduce step): the reduce
    /// subtask's output; `map` (the default otherwise): the map subtasks'
    /// outputs. `reduce` on a job without one is a 400.
    #[param(value_type = Option<String>, example = "map")]
    pub stage: Option<String>,
}

fn query<T: Default>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::InvalidQuery {
        param: "query",
        message: e.body_text(),
    })
}

fn parse_bool(param: &'static str, v: Option<&str>) -> Result<bool, ApiError> {
    match v {
        None => Ok(false),
        Some("1" | "true" | "yes" | "") => Ok(true),
        Some("0" | "false" | "no") => Ok(false),
        Some(other) => Err(ApiError::InvalidQuery {
            param,
            message: format!("expected 1/true or 0/false, got {other:?}"),
        }),
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// Whether `Content-Type` is `application/json` (parameters such as
/// `charset` allowed).
fn is_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let got = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let ok = got.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType {
            got: got.unwrap_or_else(|| "no Content-Type".to_owned()),
        })
    }
}

/// Submit a job: the request is parsed, validated against the controller's
/// limits, cut into subtasks and stored with all of them in one transaction
/// (the request once, and each subtask's slice of it; argv, env and stdin
/// are built when a subtask is dispatched).
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body(content = JobRequestDoc, content_type = "application/json"),
    responses(
        (status = 201, description = "The job and all its subtasks were stored", body = SubmitResponse),
        (status = 400, description = "Malformed JSON, an unknown or missing field, a wrong type or a refused value; `field` names it", body = ErrorBody),
        (status = 413, description = "The body is over `max_body_bytes`", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 500, description = "The store failed; nothing was stored", body = ErrorBody),
    )
)]
pub async fn submit(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    is_json(&headers)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge {
                limit: s.max_body_bytes,
            }
        } else {
            ApiError::BodyRead(e.body_text())
        }
    })?;
    let req = match job::parse_json(&body) {
        Ok(req) => req,
        // `split.lines.input` may be a reference to uploaded data.
        Err(e) if e.field == "split.lines.input" => {
            let (data, limits) = (s.data.clone(), Arc::clone(&s.limits));
            let resolved = tokio::task::spawn_blocking(move || {
                crate::data::input::resolve_body(&body, data.as_ref(), &limits)
            })
            .await
            .map_err(|err| ApiError::Task(err.to_string()))??;
            job::parse_json(&resolved.ok_or(e)?)?
        }
        Err(e) => return Err(e.into()),
    };
    req.validate(&s.limits)?;
    if req.network == job::Network::Overlay && !s.agents.overlay_enabled() {
        return Err(job::ValidationError::new(
            job::ErrorCode::InvalidField,
            "network",
            "\"overlay\" needs the grid overlay, and this controller has none (overlay.cidr)",
        )
        .into());
    }
    // Validated above, so the count is that of the plan the store makes.
    let count = split::subtask_count(&req);
    let name = req.name.clone();
    let id = blocking(&s.store, move |store| store.create_planned_job(&req)).await?;
    tracing::info!(job = %id, name = %name, subtasks = count, "job submitted");
    Ok((
        StatusCode::CREATED,
        Json(SubmitResponse {
            id,
            subtasks: count,
        }),
    ))
}

/// List jobs, newest first, with their states and subtask counts.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "Jobs, newest first", body = JobList),
        (status = 400, description = "A bad `state` or `limit`", body = ErrorBody),
    )
)]
pub async fn list(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let q = query(q)?;
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(v) => Some(JobState::parse(v).ok_or_else(|| ApiError::InvalidQuery {
            param: "state",
            message: format!(
                "unknown job state {v:?}; one of queued, running, done, failed, cancelled"
            ),
        })?),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIST_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::InvalidQuery {
                    param: "limit",
                    message: format!("expected a whole number in 1..={MAX_LIST_LIMIT}, got {v:?}"),
                })
            }
        },
    };
    let jobs = blocking(&s.store, move |store| store.list_jobs(state, limit)).await?;
    Ok(Json(JobList {
        jobs: jobs.into_iter().map(JobSummary::from).collect(),
    }))
}

/// One job: its state, subtask counts by state, the request, the leases
/// held on it by host (pull jobs) and its dead subtasks with every
/// attempt's error.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id", example = "j-1")),
    responses(
        (status = 200, description = "The job", body = JobDetail),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    let id = JobId::from(id);
    let (record, request, leases, dead) = blocking(&s.store, move |store| {
        let record = store.get_job(&id)?;
        let request = store.job_request(&id)?;
        // Each only when there can be some (the dead scan reads the job's
        // subtasks).
        let leases = if request.mode == DispatchMode::Pull && record.counts.assigned > 0 {
            store.job_leases(&id)?
        } else {
            Vec::new()
        };
        let dead = if record.counts.dead > 0 {
            store.dead_subtasks(&id, DEAD_SHOWN)?
        } else {
            Vec::new()
        };
        Ok((record, request, leases, dead))
    })
    .await?;
    let steals = if request.mode == DispatchMode::P2p {
        s.agents.steals_of(&record.id.0)
    } else {
        Vec::new()
    };
    Ok(Json(JobDetail {
        job: record.into(),
        request,
        leases: leases.into_iter().map(LeaseHolder::from).collect(),
        dead_subtasks: dead.into_iter().map(DeadSubtaskView::from).collect(),
        steals,
    }))
}

/// Cancel a job: queued subtasks are dropped, running ones are stopped.
/// Cancelling a finished job changes nothing and answers its state.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id", example = "j-1")),
    responses(
        (status = 200, description = "The job's state after the cancel", body = CancelResponse),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CancelResponse>, ApiError> {
    let id = JobId::from(id);
    let (outcome, record) = blocking(&s.store, move |store| {
        let outcome = store.cancel_job(&id)?;
        let record = store.get_job(&id)?;
        Ok((outcome, record))
    })
    .await?;
    // Running attempts stop now, not at their hosts' next heartbeat.
    s.agents.stop_attempts(&outcome.stop);
    if outcome.changed {
        tracing::info!(
            job = %record.id,
            dropped = outcome.dropped_queued,
            stopping = outcome.stop.len(),
            "job cancelled"
        );
    }
    Ok(Json(CancelResponse {
        id: record.id,
        state: record.state,
        changed: outcome.changed,
        dropped_queued: outcome.dropped_queued,
        stopping: outcome.stop.len() as u64,
    }))
}

/// Pages of accepted results in index order, read lazily from the store.
fn result_pages(
    store: Arc<dyn Store>,
    id: JobId,
) -> impl Stream<Item = Result<Vec<AttemptRecord>, ApiError>> + Send {
    stream::unfold(Some(0u64), move |from| {
        let store = Arc::clone(&store);
        let id = id.clone();
        async move {
            let from = from?;
            let page = blocking(&store, move |st| st.results(&id, from, RESULTS_PAGE)).await;
            match page {
                Ok(page) if page.is_empty() => None,
                Ok(page) => {
                    let next = match page.last() {
                        Some(last) if page.len() == RESULTS_PAGE => last.index.checked_add(1),
                        _ => None,
                    };
                    Some((Ok(page), next))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    })
}

/// The job's results: every done subtask's stdout concatenated in subtask
/// order (default), or one JSON entry per done subtask (`?format=json`).
/// For a job with a reduce step they are the reduce subtask's output
/// (`stage` `reduce`), unless `?stage=map` asks for the map outputs.
/// Until the job is done, failed or cancelled (or, for `stage=map`, every
/// map subtask is done) the answer is 409, unless `?partial=1` asks for
/// what is there. The body streams from the store. The `Sparegrid-Results`
/// header says `complete` (the stage is finished) or `partial`, and
/// `Sparegrid-Stage` says `map` or `reduce`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/results",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id", example = "j-1"), ResultsQuery),
    responses(
        (status = 200, description = "The results",
            content(
                (String = "application/octet-stream"),
                (JobResults = "application/json"),
            ),
            headers(
                ("Sparegrid-Results" = String, description = "`complete` or `partial`"),
                ("Sparegrid-Stage" = String, description = "`map` or `reduce`: which outputs the body holds"),
            )),
        (status = 400, description = "A bad `format`, `partial` or `stage` (`reduce` on a job without one)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job (or for `stage=map`, its map stage) has not finished and `partial` was not asked for", body = ErrorBody),
    )
)]
pub async fn results(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<ResultsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let json = match q.format.as_deref() {
        None | Some("" | "raw") => false,
        Some("json") => true,
        Some(other) => {
            return Err(ApiError::InvalidQuery {
                param: "format",
                message: format!("expected raw or json, got {other:?}"),
            })
        }
    };
    let partial = parse_bool("partial", q.partial.as_deref())?;
    let asked = match q.stage.as_deref() {
        None | Some("") => None,
        Some("map") => Some(Stage::Map),
        Some("reduce") => Some(Stage::Reduce),
        Some(other) => {
            return Err(ApiError::InvalidQuery {
                param: "stage",
                message: format!("expected map or reduce, got {other:?}"),
            })
        }
    };
    let id = JobId::from(id);
    let record = {
        let id = id.clone();
        blocking(&s.store, move |store| store.get_job(&id)).await?
    };
    let stage = match (asked, record.reduce.is_some()) {
        (Some(Stage::Reduce), false) => {
            return Err(ApiError::InvalidQuery {
                param: "stage",
                message: format!(
                    "job {id} has no reduce step; its results are its map outputs (stage=map)"
                ),
            })
        }
        (Some(stage), _) => stage,
        (None, true) => Stage::Reduce,
        (None, false) => Stage::Map,
    };
    let reduce_done = record.reduce == Some(ReduceState::Done);
    let complete = match stage {
        Stage::Map => {
            let maps_done = record.counts.done.saturating_sub(u64::from(reduce_done));
            record.map_subtasks > 0 && maps_done == record.map_subtasks
        }
        Stage::Reduce => reduce_done,
    };
    // The map stage can be read in full while the reduce runs.
    if !record.state.is_terminal() && !complete && !partial {
        return Err(ApiError::NotFinished {
            id,
            state: record.state.to_string(),
        });
    }
    let pages = match stage {
        Stage::Map => result_pages(Arc::clone(&s.store), id.clone()).boxed(),
        Stage::Reduce => {
            let (store, id) = (Arc::clone(&s.store), id.clone());
            stream::once(async move {
                blocking(&store, move |st| st.reduce_result(&id))
                    .await
                    .map(|r| r.into_iter().collect::<Vec<_>>())
            })
            .boxed()
        }
    };
    let (content_type, body) = if json {
        let head = serde_json::json!({
            "id": id,
            "state": record.state,
            "stage": stage,
            "complete": complete,
        })
        .to_string();
        // `{"id":…,"state":…,"complete":…` then `,"results":[…]}`.
        let head = format!("{},\"results\":[", head.trim_end_matches('}'));
        let items = pages.scan(true, move |first, page| {
            let chunk = page.map(|page| {
                let mut out = Vec::new();
                for rec in page {
                    if !std::mem::take(first) {
                        out.push(b',');
                    }
                    // A struct of strings and numbers always serialises.
                    let result = SubtaskResult {
                        stage,
                        ..SubtaskResult::from(rec)
                    };
                    let _ = serde_json::to_writer(&mut out, &result);
                }
                Bytes::from(out)
            });
            std::future::ready(Some(chunk))
        });
        let body = stream::once(std::future::ready(Ok::<_, ApiError>(Bytes::from(head))))
            .chain(items)
            .chain(stream::once(std::future::ready(Ok(Bytes::from_static(
                b"]}",
            )))));
        ("application/json", Body::from_stream(body))
    } else {
        let body = pages.map(|page| {
            page.map(|page| {
                let mut out = Vec::new();
                for rec in page {
                    out.extend_from_slice(&rec.stdout);
                }
                Bytes::from(out)
            })
        });
        ("application/octet-stream", Body::from_stream(body))
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "sparegrid-results",
        HeaderValue::from_static(if complete { "complete" } else { "partial" }),
    );
    headers.insert("sparegrid-stage", HeaderValue::from_static(stage.as_str()));
    Ok(response)
}

struct EventsState {
    store: Arc<dyn Store>,
    id: JobId,
    poll: Duration,
    last: Option<(JobState, JobCounts)>,
    pending: Option<JobRecord>,
    ended: bool,
}

fn progress_event(rec: &JobRecord) -> Event {
    let data = ProgressEvent {
        id: rec.id.clone(),
        state: rec.state,
        counts: rec.counts,
    };
    let name = if rec.state.is_terminal() {
        "end"
    } else {
        "progress"
    };
    Event::default()
        .event(name)
        .json_data(&data)
        .unwrap_or_else(|_| Event::default().event(name))
}

/// The job's progress as server-sent events: one `progress` event with the
/// state and counts at once and whenever they change, and a last `end`
/// event when the job is done, failed or cancelled, after which the stream
/// closes. A store failure mid-stream sends an `error` event (an
/// [`ErrorBody`]) and closes.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id", example = "j-1")),
    responses(
        (status = 200, description = "`progress` events, then one `end` event; each carries a ProgressEvent as JSON data",
            content_type = "text/event-stream", body = ProgressEvent),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn events(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = JobId::from(id);
    let first = {
        let id = id.clone();
        blocking(&s.store, move |store| store.get_job(&id)).await?
    };
    let init = EventsState {
        store: Arc::clone(&s.store),
        id,
        poll: s.events_poll,
        last: None,
        pending: Some(first),
        ended: false,
    };
    let stream = stream::unfold(init, |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            let rec = match st.pending.take() {
                Some(rec) => rec,
                None => {
                    tokio::time::sleep(st.poll).await;
                    let id = st.id.clone();
                    match blocking(&st.store, move |store| store.get_job(&id)).await {
                        Ok(rec) => rec,
                        Err(e) => {
                            st.ended = true;
                            let ev = Event::default()
                                .event("error")
                                .json_data(e.body())
                                .unwrap_or_else(|_| Event::default().event("error"));
                            return Some((Ok(ev), st));
                        }
                    }
                }
            };
            let key = (rec.state, rec.counts);
            if st.last != Some(key) {
                st.last = Some(key);
                st.ended = rec.state.is_terminal();
                return Some((Ok(progress_event(&rec)), st));
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod detail_tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The OpenAPI document describes the leases and dead subtasks of
    /// `GET /v1/jobs/{id}` with the fields they really have.
    #[test]
    fn job_detail_extras_are_in_the_openapi_document() {
        let doc: Value = serde_json::from_str(super::super::openapi::document()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let attempt = AttemptView {
            attempt: 1,
            host: "h".into(),
            state: "failed".into(),
            exit_code: Some(1),
            error: None,
            stderr: String::new(),
            stderr_size: 0,
            finished_ms: None,
        };
        let dead = DeadSubtaskView {
            index: 0,
            reduce: false,
            error: None,
            attempts: vec![attempt.clone()],
        };
        let lease = LeaseHolder {
            host: "h".into(),
            leases: 1,
            earliest_expiry_ms: 0,
        };
        for (name, v) in [
            ("AttemptView", serde_json::to_value(&attempt).unwrap()),
            ("DeadSubtaskView", serde_json::to_value(&dead).unwrap()),
            ("LeaseHolder", serde_json::to_value(&lease).unwrap()),
        ] {
            assert_eq!(keys(&schemas[name]["properties"]), keys(&v), "{name}");
        }
        let detail = schemas["JobDetail"].to_string();
        for field in [
            "\"leases\"",
            "\"dead_subtasks\"",
            "LeaseHolder",
            "DeadSubtaskView",
        ] {
            assert!(detail.contains(field), "{field} in {detail}");
        }
    }

    #[test]
    fn a_dead_attempt_shows_the_tail_of_its_stderr() {
        let mut stderr = vec![b'x'; DEAD_STDERR_TAIL];
        stderr.extend_from_slice(b"\nthe end\n");
        let a = AttemptRecord {
            index: 0,
            attempt: 2,
            host: "h".into(),
            state: AttemptState::Failed,
            started_ms: 0,
            finished_ms: Some(1),
            exit_code: None,
            error: Some("timed out".into()),
            stderr_size: stderr.len() as u64,
            stderr,
            stdout: Vec::new(),
            stdout_size: 0,
            duration_ms: Some(1),
        };
        let v = AttemptView::from(a);
        assert_eq!(v.stderr.len(), DEAD_STDERR_TAIL);
        assert!(v.stderr.ends_with("\nthe end\n"));
        assert_eq!(v.stderr_size, DEAD_STDERR_TAIL as u64 + 9);
        assert_eq!((v.state.as_str(), v.attempt), ("failed", 2));
    }
}
