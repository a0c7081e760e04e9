//! Push dispatch, agent side: joins a controller when `controller.url` is
//! set (nothing here runs otherwise).
//!
//! Two std threads, no async code:
//! - **client** (`sparegrid-grid-client`): registers ([`Register`] with the
//!   host, version, the URL the controller pushes to and `controller.slots`),
//!   heartbeats every [`Registered::heartbeat_ms`] with the load read from the
//!   shared status (see [`heartbeat`]), registers again when a heartbeat gets
//!   409 `must_register`, kills the attempts a [`HeartbeatReply`] withdraws,
//!   and reports finished attempts (`Vec<Completion>`, at most
//!   [`COMPLETION_BATCH`] a request) with exponential backoff (0.2 s doubling
//!   to 10 s) while the controller cannot be reached. Completions the
//!   controller refuses outright (400/413/415) are logged and dropped.
//! - **runner** (`sparegrid-grid-runner`): every 50 ms starts queued
//!   assignments with [`Executor`] (as host processes in the daemon's grid
//!   cgroup), applies the suspend decision and polls for ends; see
//!   [`runner`].
//!
//! `POST /v1/subtasks` ([`routes`]) takes a MessagePack [`AssignBatch`] and
//! only queues it: 202 `{"accepted": n}`. With `controller.token` set it needs
//! `Authorization: Bearer <token>` (401 `unauthorized`); a body that is not an
//! `AssignBatch` is a 400 `malformed_msgpack`; bodies are capped at
//! [`MAX_BATCH_BYTES`].
//!
//! **Suspension** ([`should_suspend`]), deliberately simple: the runner
//! suspends all its subtasks while any grid VM is suspended or the smoothed
//! load factor is above `policy.suspend_above`, and resumes them once no VM is
//! suspended and the load is at or below `policy.resume_below` (the hysteresis
//! is the policy's own; `resume_after` is not applied). Queued assignments do
//! not start while suspended. How long the runner has kept them suspended
//! counts in the heartbeat's `suspended_ms`, so the controller's
//! `withdraw_after` moves them elsewhere.
//!
//! Limits: the controller settings and the policy thresholds are read at
//! start; a SIGHUP reload does not change them. Draining does not hand
//! subtasks back; on shutdown running subtasks are killed unreported (the
//! controller requeues them when the host's heartbeats stop).

pub mod client;
pub mod runner;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use sparegrid_proto::grid::{AssignBatch, Heartbeat, Register, Registered};
use sparegrid_proto::{AgentStatus, VmState};

use crate::config::{Config, ControllerSection, PolicySection};
use crate::daemon::status::Shared;
use crate::subtask::Executor;

use client::{ClientError, ControllerClient};
use runner::Runner;

/// Most completions sent in one request.
pub const COMPLETION_BATCH: usize = 16;
/// Largest `POST /v1/subtasks` body.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

const TICK: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The running grid client: its two threads and the runner.
pub struct Grid {
    runner: Arc<Runner>,
    token: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The URL the controller pushes to: `controller.advertise_url`, else
/// `http://<agent.listen>` with `host` in place of an unspecified address.
pub fn agent_url(cfg: &Config, host: &str) -> String {
    if !cfg.controller.advertise_url.is_empty() {
        return cfg.controller.advertise_url.clone();
    }
    let l: SocketAddr = cfg.agent.listen;
    if l.ip().is_unspecified() {
        format!("http://{host}:{}", l.port())
    } else {
        format!("http://{l}")
    }
}

/// Whether the runner's subtasks should be suspended now; `now_suspended`
/// is whether they are (for the hysteresis). See the module docs.
pub fn should_suspend(status: &AgentStatus, policy: &PolicySection, now_suspended: bool) -> bool {
    let vm_suspended = status.vms.iter().any(|v| v.state == VmState::Suspended);
    let load = status.load.as_ref().map_or(0.0, |l| l.smoothed);
    if vm_suspended || load > policy.suspend_above {
        return true;
    }
    now_suspended && load > policy.resume_below
}

/// The heartbeat for `status`: smoothed load, dominant metric, normalised
/// value of every available metric, free slots (`slots` − attempts queued or
/// running), those attempts, grid VMs by state, and the longest suspension
/// (of a grid VM, or of the runner's subtasks).
pub fn heartbeat(host: &str, status: &AgentStatus, slots: u32, runner: &Runner) -> Heartbeat {
    let running = runner.attempts();
    let mut vms: BTreeMap<VmState, u32> = BTreeMap::new();
    let mut suspended_ms = runner.suspended_ms();
    for v in &status.vms {
        *vms.entry(v.state).or_default() += 1;
        if v.state == VmState::Suspended {
            suspended_ms = suspended_ms.max(v.in_state_ms);
        }
    }
    let (load, dominant, breakdown) = match &status.load {
        Some(l) => (
            l.smoothed,
            l.dominant,
            l.metrics
                .iter()
                .filter(|m| m.available)
                .map(|m| (m.metric, m.normalised))
                .collect(),
        ),
        None => (0.0, None, BTreeMap::new()),
    };
    Heartbeat {
        host: host.to_string(),
        load,
        dominant,
        breakdown,
        free_slots: slots.saturating_sub(running.len() as u32),
        running,
        vms,
        suspended_ms,
    }
}

impl Grid {
    /// Starts the client and runner threads for `cfg.controller` (which
    /// must be enabled). Subtasks run through `executor`.
    pub fn start(
        cfg: &Config,
        host: &str,
        executor: Executor,
        shared: Arc<Shared>,
    ) -> std::io::Result<Grid> {
        let c = cfg.controller.clone();
        let client = ControllerClient::new(&c.url, &c.token).map_err(std::io::Error::other)?;
        let runner = Arc::new(Runner::new(executor));
        let stop = Arc::new(AtomicBool::new(false));
        let register = Register {
            host: host.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            agent_url: Some(agent_url(cfg, host)),
            slots: c.slots,
        };
        tracing::info!(
            "joining the controller at {} as {:?} ({} slots, pushes to {})",
            c.url,
            host,
            c.slots,
            register.agent_url.as_deref().unwrap_or("-")
        );
        let policy = cfg.policy.clone();
        let mut threads = Vec::new();
        {
            let (runner, stop, shared) = (runner.clone(), stop.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("sparegrid-grid-runner".into())
                    .spawn(move || run_runner(&runner, &stop, &shared, &policy))?,
            );
        }
        {
            let (runner, stop) = (runner.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("sparegrid-grid-client".into())
                    .spawn(move || run_client(&client, register, &c, &runner, &stop, &shared))?,
            );
        }
        Ok(Grid {
            runner,
            token: cfg.controller.token.clone(),
            stop,
            threads,
        })
    }

    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    /// The `POST /v1/subtasks` route, to merge into the daemon's router.
    pub fn routes(&self) -> Router {
        routes(self.runner.clone(), self.token.clone())
    }

    /// Stops both threads and kills what is still running.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Grid {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run_runner(runner: &Runner, stop: &AtomicBool, shared: &Shared, policy: &PolicySection) {
    let mut suspended = false;
    while !stop.load(Ordering::SeqCst) {
        suspended = should_suspend(&shared.status(), policy, suspended);
        runner.tick(suspended);
        std::thread::sleep(TICK);
    }
    runner.stop();
}

fn next_backoff(d: Duration) -> Duration {
    (d * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

fn run_client(
    client: &ControllerClient,
    register: Register,
    c: &ControllerSection,
    runner: &Runner,
    stop: &AtomicBool,
    shared: &Shared,
) {
    let mut registered: Option<Registered> = None;
    let mut reg_at = Instant::now();
    let mut reg_backoff = BACKOFF_MIN;
    let mut hb_at = Instant::now();
    let mut send_at = Instant::now();
    let mut send_backoff = BACKOFF_MIN;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        match &registered {
            None if now >= reg_at => match client.register(&register) {
                Ok(r) => {
                    tracing::info!("registered with the controller as {:?}", r.host);
                    reg_backoff = BACKOFF_MIN;
                    hb_at = now;
                    registered = Some(r);
                }
                Err(e) => {
                    tracing::warn!("registering with the controller: {e}");
                    reg_at = now + reg_backoff;
                    reg_backoff = next_backoff(reg_backoff);
                }
            },
            Some(r) if now >= hb_at => {
                let period = Duration::from_millis(r.heartbeat_ms.clamp(50, 60_000));
                hb_at = now + period;
                let hb = heartbeat(&register.host, &shared.status(), c.slots, runner);
                match client.heartbeat(&hb) {
                    Ok(reply) => runner.withdraw(&reply.withdraw),
                    Err(ClientError::MustRegister) => {
                        tracing::info!("the controller does not know this host; registering again");
                        registered = None;
                        reg_at = now;
                    }
                    Err(e) => tracing::warn!("heartbeat: {e}"),
                }
            }
            _ => {}
        }
        if now >= send_at && runner.outbox_len() > 0 {
            let batch = runner.take_outbox(COMPLETION_BATCH);
            match client.completions(&batch) {
                Ok(()) => send_backoff = BACKOFF_MIN,
                Err(e) if e.retryable() => {
                    tracing::warn!("reporting {} completions (will retry): {e}", batch.len());
                    runner.requeue_outbox(batch);
                    send_at = now + send_backoff;
                    send_backoff = next_backoff(send_backoff);
                }
                Err(e) => {
                    tracing::error!(
                        "the controller refused {} completions, dropped: {e}",
                        batch.len()
                    );
                }
            }
        }
        std::thread::sleep(TICK);
    }
}

#[derive(Clone)]
struct RouteState {
    runner: Arc<Runner>,
    token: String,
}

/// `POST /v1/subtasks` over `runner`; `token` empty means no auth.
pub fn routes(runner: Arc<Runner>, token: String) -> Router {
    Router::new()
        .route("/v1/subtasks", post(subtasks))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(RouteState { runner, token })
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"code": code, "message": message})),
    )
        .into_response()
}

fn token_ok(headers: &HeaderMap, want: &str) -> bool {
    if want.is_empty() {
        return true;
    }
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().as_bytes())
        .unwrap_or_default();
    got.len() == want.len()
        && got
            .iter()
            .zip(want.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn subtasks(State(s): State<RouteState>, headers: HeaderMap, body: Bytes) -> Response {
    if !token_ok(&headers, &s.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token".into(),
        );
    }
    let batch: AssignBatch = match rmp_serde::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "malformed_msgpack",
                format!("the body is not a valid MessagePack AssignBatch: {e}"),
            )
        }
    };
    let n = s.runner.submit(batch.assignments);
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"accepted": n})),
    )
        .into_response()
}
