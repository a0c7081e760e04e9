//! The target's side of a move (see [`super`]): `POST /v1/migrations/offer`
//! and `POST /v1/migrations/commit` on the agent's API, MessagePack
//! [`IncomingVm`] → [`MigrationAnswer`], agent token.
//!
//! Both check the body's fields and the state (uploaded here, or fetched
//! from the source when the offer says so, [`IncomingVm::fetch`]; complete,
//! its size, its whole blake3), then ask the control loop ([`Command::MigrateIn`]):
//! the offer only whether the VM fits now, the commit to restore it. The
//! commit first moves the attempt to this host at the controller, so the
//! control loop restores it under the new epoch. A refusal is a 200 with
//! `accepted: false` and the reason; malformed bodies and bad fields are
//! 400s naming the field. The uploaded state is removed once the VM is
//! restored, or refused; one whose move never came back is removed by
//! [`sweep_stale_states`] after `transfer.upload_expiry`.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use sparegrid_proto::grid::AttemptRef;
use sparegrid_proto::migrate::{AdoptAttempt, AdoptedAttempt, IncomingVm, MigrationAnswer};
use sparegrid_transfer::TransferState;

use super::MigrateSetup;
use crate::daemon::control::Command;
use crate::grid::client::ControllerClient;
use crate::grid::{error, malformed, token_ok, unauthorized};

/// How long the control loop may take to answer (a commit restores a VM).
const LOOP_WAIT: Duration = Duration::from_secs(120);

/// What the routes need.
#[derive(Clone)]
pub struct IncomingState {
    setup: Arc<MigrateSetup>,
    transfer: TransferState,
    commands: Arc<Mutex<Sender<Command>>>,
}

/// The migration routes, to merge into the agent's API.
pub fn routes(
    setup: Arc<MigrateSetup>,
    transfer: TransferState,
    commands: Sender<Command>,
) -> Router {
    Router::new()
        .route("/v1/migrations/offer", post(offer))
        .route("/v1/migrations/commit", post(commit))
        .with_state(IncomingState {
            setup,
            transfer,
            commands: Arc::new(Mutex::new(commands)),
        })
}

/// Why an offer or commit is refused; `fetch_failed` when the state
/// could not be fetched from where the offer said (the source may relay
/// it through the controller).
#[derive(Debug)]
struct Refusal {
    reason: String,
    fetch_failed: bool,
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal {
            reason,
            fetch_failed: false,
        }
    }
}

fn answer(accepted: bool, refusal: Option<Refusal>, attempt: Option<AttemptRef>) -> Response {
    let fetch_failed = refusal.as_ref().is_some_and(|r| r.fetch_failed);
    let body = MigrationAnswer {
        accepted,
        reason: refusal.map(|r| r.reason),
        attempt,
        fetch_failed,
    };
    match rmp_serde::to_vec_named(&body) {
        Ok(b) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/msgpack")],
            b,
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding the answer: {e}"),
        ),
    }
}

fn refused(why: Refusal) -> Response {
    answer(false, Some(why), None)
}

fn invalid(field: &str, message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({"code": "invalid_field", "field": field, "message": format!("{field}: {message}")})),
    )
        .into_response()
}

/// Decodes and checks the body; `Err` is the 4xx to send.
#[allow(clippy::result_large_err)] // a Response, sent at once
fn parse(s: &IncomingState, headers: &HeaderMap, body: &Bytes) -> Result<IncomingVm, Response> {
    if !token_ok(headers, &s.setup.controller.token) {
        return Err(unauthorized());
    }
    let vm: IncomingVm = rmp_serde::from_slice(body).map_err(|e| malformed("IncomingVm", e))?;
    let name_ok = !vm.vm.is_empty()
        && vm.vm.len() <= 64
        && vm
            .vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        return Err(invalid(
            "vm",
            format!(
                "{:?} is not a grid VM name (1 to 64 of A-Z a-z 0-9 - _ .)",
                vm.vm
            ),
        ));
    }
    if vm.vcpus == 0 {
        return Err(invalid("vcpus", "must be at least 1".into()));
    }
    if vm.memory_mib < 32 {
        return Err(invalid(
            "memory_mib",
            format!("must be at least 32, got {}", vm.memory_mib),
        ));
    }
    if let Err(e) = sparegrid_transfer::store::validate_id(&vm.state_id) {
        return Err(invalid("state_id", e.to_string()));
    }
    if vm.state_blake3.len() != 64 || !vm.state_blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("state_blake3", "must be 64 hex digits".into()));
    }
    if let Some(f) = &vm.fetch {
        let relayed = f.url.starts_with('/') && !f.url.starts_with("//");
        if !(f.url.starts_with("http://") || f.url.starts_with("https://") || relayed) {
            return Err(invalid(
                "fetch.url",
                format!(
                    "must be an http(s) URL or a path on the controller, got {:?}",
                    f.url
                ),
            ));
        }
    }
    if vm.from.is_empty() || vm.from == s.setup.host {
        return Err(invalid(
            "from",
            format!("{:?} is not another host", vm.from),
        ));
    }
    Ok(vm)
}

/// Where a state fetched from the source goes (`<data_dir>/migrate/in/<id>`;
/// the id was validated).
fn fetched_path(s: &IncomingState, id: &str) -> PathBuf {
    s.setup.journal_dir.join("in").join(id)
}

/// The state's path here: uploaded to this endpoint, or, when the offer
/// says where to fetch it, downloaded from the source or the controller
/// (resuming a broken download from its journal).
fn locate_state(s: &IncomingState, vm: &IncomingVm) -> Result<PathBuf, Refusal> {
    let store = s.transfer.store();
    if store.is_complete(&vm.state_id).map_err(|e| e.to_string())? {
        return Ok(store
            .complete_path(&vm.state_id)
            .map_err(|e| e.to_string())?);
    }
    let Some(src) = &vm.fetch else {
        return Err(format!("the saved state {} is not (fully) uploaded", vm.state_id).into());
    };
    // A path: relayed, on this agent's controller.
    let (url, via) = if src.url.starts_with('/') {
        (
            format!(
                "{}{}",
                s.setup.controller.url.trim_end_matches('/'),
                src.url
            ),
            "the controller".to_owned(),
        )
    } else {
        (src.url.clone(), vm.from.clone())
    };
    let dest = fetched_path(s, &vm.state_id);
    if dest.is_file() {
        return Ok(dest);
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    tracing::info!(vm = %vm.vm, from = %vm.from, "fetching the saved state from {url}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let report = rt
        .block_on(sparegrid_transfer::client::download(
            &client,
            &url,
            &src.token,
            &dest,
            s.setup.checkpoint_bytes,
            Default::default(),
        ))
        .map_err(|e| Refusal {
            reason: format!("fetching the saved state from {via}: {e}"),
            fetch_failed: true,
        })?;
    tracing::info!(vm = %vm.vm, "saved state fetched: {} bytes, resumed at {}", report.size, report.resumed_at);
    Ok(dest)
}

/// The state's path, once it is here whole with the announced size and
/// digest.
fn check_state(s: &IncomingState, vm: &IncomingVm) -> Result<PathBuf, Refusal> {
    let path = locate_state(s, vm)?;
    let size = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size != vm.state_bytes {
        return Err(format!(
            "the saved state has {size} bytes, the offer says {}",
            vm.state_bytes
        )
        .into());
    }
    let digest = sparegrid_transfer::client::hash_file(&path).map_err(|e| e.to_string())?;
    if !digest.eq_ignore_ascii_case(&vm.state_blake3) {
        return Err(format!(
            "the saved state's blake3 is {digest}, the offer says {}",
            vm.state_blake3
        )
        .into());
    }
    Ok(path)
}

/// Asks the control loop; `Err` says why not.
fn ask_loop(
    s: &IncomingState,
    vm: IncomingVm,
    file: PathBuf,
    attempt: Option<AttemptRef>,
) -> Result<(), String> {
    let (tx, rx) = sync_channel(1);
    let sent = s
        .commands
        .lock()
        .map_err(|_| "the control loop is gone".to_owned())?
        .send(Command::MigrateIn {
            incoming: Box::new(vm),
            file,
            attempt,
            reply: tx,
        });
    if sent.is_err() {
        return Err("the agent is stopping".to_owned());
    }
    rx.recv_timeout(LOOP_WAIT)
        .unwrap_or_else(|_| Err("the control loop did not answer".to_owned()))
}

/// Removes the state, uploaded or fetched (with a fetch's leftovers).
fn remove_state(s: &IncomingState, id: &str) {
    if let Err(e) = s.transfer.store().remove(id) {
        tracing::warn!("removing the saved state {id}: {e}");
    }
    let fetched = fetched_path(s, id);
    for suffix in ["", ".part", ".journal"] {
        let mut p = fetched.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

/// Removes saved states uploaded here more than `max_age` ago (their
/// file's modification time) that no commit or refusal removed: a move
/// whose source gave up after the offer (drained meanwhile, or it
/// stopped). Other transfers are left alone. Returns how many went.
pub fn sweep_stale_states(transfer: &TransferState, max_age: Duration) -> usize {
    let store = transfer.store();
    let Some(dir) = store
        .complete_path("vmstate-x")
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
    else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for e in entries.flatten() {
        let Some(id) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !id.starts_with("vmstate-") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > max_age);
        if old && store.remove(&id).unwrap_or(false) {
            tracing::info!("removed saved state {id}: no move committed it within {max_age:?}");
            removed += 1;
        }
    }
    removed
}

/// Sweeps stale saved states every `every`, on a thread of its own, for
/// the agent's lifetime.
pub fn spawn_sweeper(transfer: TransferState, max_age: Duration, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("migrate-sweep".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            sweep_stale_states(&transfer, max_age);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the saved-state sweeper: {e}");
    }
}

async fn offer(State(s): State<IncomingState>, headers: HeaderMap, body: Bytes) -> Response {
    let vm = match parse(&s, &headers, &body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let result = tokio::task::spawn_blocking(move || {
        let id = vm.state_id.clone();
        let verdict = check_state(&s, &vm)
            .and_then(|file| ask_loop(&s, vm, file, None).map_err(Refusal::from));
        if verdict.is_err() {
            remove_state(&s, &id);
        }
        verdict
    })
    .await;
    match result {
        Ok(Ok(())) => answer(true, None, None),
        Ok(Err(why)) => refused(why),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

async fn commit(State(s): State<IncomingState>, headers: HeaderMap, body: Bytes) -> Response {
    let vm = match parse(&s, &headers, &body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let result = tokio::task::spawn_blocking(move || {
        let id = vm.state_id.clone();
        let verdict = commit_blocking(&s, vm);
        remove_state(&s, &id);
        verdict
    })
    .await;
    match result {
        Ok(Ok(a)) => answer(true, None, Some(a)),
        Ok(Err(why)) => refused(why),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Check the state, take the attempt over at the controller, restore.
fn commit_blocking(s: &IncomingState, vm: IncomingVm) -> Result<AttemptRef, Refusal> {
    let file = check_state(s, &vm)?;
    let ctl = ControllerClient::new(&s.setup.controller).map_err(|e| e.to_string())?;
    let adopted: AdoptedAttempt = ctl
        .post(
            "/v1/agents/migrations/adopt",
            &AdoptAttempt {
                host: s.setup.host.clone(),
                from: vm.from.clone(),
                attempt: vm.attempt.clone(),
            },
            None,
        )
        .map_err(|e| format!("the controller did not move the attempt here: {e}"))?;
    let attempt = adopted.attempt;
    tracing::info!(vm = %vm.vm, from = %vm.from, "taking over grid VM {} with subtask {}/{} (attempt {} here)",
        vm.vm, attempt.job, attempt.index, attempt.epoch);
    ask_loop(s, vm, file, Some(attempt.clone()))?;
    Ok(attempt)
}

#[cfg(test)]
#[path = "incoming_tests.rs"]
mod tests;
