//! The agent's HTTP API: `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus text), `POST /v1/drain` and `DELETE /v1/drain`.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::control::Command;
use super::status::Shared;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    commands: Arc<Mutex<Sender<Command>>>,
}

pub fn router(shared: Arc<Shared>, commands: Sender<Command>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/drain", axum::routing::post(drain).delete(undrain))
        .with_state(AppState {
            shared,
            commands: Arc::new(Mutex::new(commands)),
        })
}

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.shared.status())
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.shared.metrics.render(),
    )
}

fn send(s: &AppState, cmd: Command) -> Response {
    let sent = s
        .commands
        .lock()
        .map(|tx| tx.send(cmd).is_ok())
        .unwrap_or(false);
    if sent {
        (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"accepted": true})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "code": "shutting_down",
                "message": "the agent is shutting down"
            })),
        )
            .into_response()
    }
}

async fn drain(State(s): State<AppState>) -> Response {
    send(&s, Command::Drain)
}

async fn undrain(State(s): State<AppState>) -> Response {
    send(&s, Command::Undrain)
}
