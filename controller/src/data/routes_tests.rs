//! The `/v1/data` routes and output capture through the whole API router
//! (tower `oneshot`, an in-memory store, a data plane in a temporary
//! directory), with closed auth.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use sparegrid_proto::grid::{AttemptRef, Completion};
use tower::ServiceExt;

use super::outputs::OutputList;
use super::{DataConfig, DataPlane};
use crate::api::{router, AppState};
use crate::config::{AuthConfig, ControllerConfig};
use crate::store::{SqliteStore, Store};

const SUBMIT: &str = "submit-token-1";
const AGENT: &str = "agent-token-1";

struct App {
    router: Router,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

fn app(enabled: bool) -> App {
    let config = ControllerConfig {
        auth: AuthConfig {
            agent_token: Some(AGENT.into()),
            submit_tokens: vec![SUBMIT.into()],
            admin_tokens: vec![],
        },
        data: DataConfig {
            enabled,
            output_file_above: 16,
            ..DataConfig::default()
        },
        ..ControllerConfig::default()
    };
    config.validate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut state = AppState::new(store.clone(), &config);
    if enabled {
        state.data = Some(DataPlane::open_dir(&config.data, dir.path(), 1 << 20).unwrap());
    }
    App {
        router: router(state),
        store,
        _dir: dir,
    }
}

impl App {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Bytes) {
        let mut rb = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            rb = rb.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            rb = rb.header(header::CONTENT_TYPE, ct);
        }
        rb = rb.header(header::CONTENT_LENGTH, body.len());
        let resp = self
            .router
            .clone()
            .oneshot(rb.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes)
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let (s, b) = self
            .call(
                method,
                path,
                token,
                Some("application/json"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
}

fn completion(job: &str, index: u64, epoch: u32, stdout: &[u8]) -> Completion {
    Completion {
        stdout_data: None,
        attempt: AttemptRef {
            job: job.into(),
            index,
            epoch,
        },
        host: "h1".into(),
        exit_code: Some(0),
        signal: None,
        error: None,
        stdout: stdout.to_vec(),
        stderr: Vec::new(),
        stdout_size: stdout.len() as u64,
        stderr_size: 0,
        duration_ms: 1,
    }
}

#[tokio::test]
async fn data_routes_need_the_submit_role() {
    let a = app(true);
    let (s, _) = a.json(Method::POST, "/v1/data", None, json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = a
        .json(Method::POST, "/v1/data", Some(AGENT), json!({}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, m) = a
        .json(Method::POST, "/v1/data", Some(SUBMIT), json!({}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    let id = m["id"].as_str().unwrap();
    let (s, st) = a
        .json(
            Method::GET,
            &format!("/v1/data/{id}"),
            Some(SUBMIT),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "not created yet: {st}");
    let (s, e) = a
        .json(
            Method::POST,
            "/v1/data",
            Some(SUBMIT),
            json!({"path": "/etc"}),
        )
        .await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("body")),
        "{e}"
    );
    let (s, _) = a
        .json(Method::DELETE, "/v1/data", Some(SUBMIT), Value::Null)
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let (s, _) = a
        .json(Method::GET, "/v1/data/a/b", Some(SUBMIT), Value::Null)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The transfer routes take transfer tokens only.
    let (s, _) = a
        .call(
            Method::OPTIONS,
            "/v1/data/v1/files",
            Some(SUBMIT),
            None,
            vec![],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let off = app(false);
    let (s, e) = off
        .json(Method::POST, "/v1/data", Some(SUBMIT), json!({}))
        .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("data_disabled")),
        "{e}"
    );
}

#[tokio::test]
async fn large_outputs_become_files_and_refused_reports_leave_none() {
    let a = app(true);
    let req = json!({
        "command": {"argv": ["cat"]},
        "split": {"lines": {"input": "a\nb\nc\n", "block": 2}},
    });
    let (s, sub) = a.json(Method::POST, "/v1/jobs", Some(SUBMIT), req).await;
    assert_eq!(s, StatusCode::CREATED, "{sub}");
    let job = sub["id"].as_str().unwrap().to_owned();
    a.store.upsert_host("h1", "127.0.0.1:1").unwrap();
    let claimed = a.store.claim("h1", 10).unwrap();
    assert_eq!(claimed.len(), 2);
    let big = b"0123456789abcdef-more-than-16-bytes\n".to_vec();
    let small = b"c\n".to_vec();
    let e0 = claimed.iter().find(|c| c.index == 0).unwrap().epoch;
    let e1 = claimed.iter().find(|c| c.index == 1).unwrap().epoch;
    let reports = vec![
        completion(&job, 0, e0, &big),
        // Stale (a later epoch than the current): its file must go again.
        completion(&job, 1, e1 + 5, &big),
        completion(&job, 1, e1, &small),
    ];
    let body = rmp_serde::to_vec_named(&reports).unwrap();
    let (s, _) = a
        .call(
            Method::POST,
            "/v1/agents/completions",
            Some(AGENT),
            Some("application/msgpack"),
            body,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, list) = a
        .json(
            Method::GET,
            &format!("/v1/data/jobs/{job}/outputs"),
            Some(SUBMIT),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let list: OutputList = serde_json::from_value(list).unwrap();
    assert!(list.complete);
    assert_eq!(list.outputs.len(), 2);
    let f = list.outputs[0]
        .file
        .clone()
        .expect("a file for the large output");
    assert_eq!(f.size, big.len() as u64);
    let inline = list.outputs[1]
        .stdout_b64
        .as_ref()
        .expect("inline small output");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(inline)
            .unwrap(),
        small
    );
    // The stale report's file is gone; the accepted one downloads whole.
    let stale = super::outputs::output_id(&job, 1, e1 + 5);
    let (s, _) = a
        .json(
            Method::GET,
            &format!("/v1/data/{stale}"),
            Some(SUBMIT),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, bytes) = a
        .call(Method::GET, &f.url, Some(&f.token), None, vec![])
        .await;
    assert_eq!((s, bytes.to_vec()), (StatusCode::OK, big.clone()));
    // A report without the agent token is not looked at (and refused).
    let other = rmp_serde::to_vec_named(&vec![completion(&job, 0, e0 + 1, &big)]).unwrap();
    let (s, _) = a
        .call(
            Method::POST,
            "/v1/agents/completions",
            Some(SUBMIT),
            Some("application/msgpack"),
            other,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let id = super::outputs::output_id(&job, 0, e0 + 1);
    let (s, _) = a
        .json(
            Method::GET,
            &format!("/v1/data/{id}"),
            Some(SUBMIT),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pull_completions_keep_their_file_only_when_accepted() {
    let a = app(true);
    let req = json!({
        "command": {"argv": ["cat"]},
        "split": {"lines": {"input": "a\n", "block": 1}},
        "mode": "pull",
    });
    let (s, sub) = a.json(Method::POST, "/v1/jobs", Some(SUBMIT), req).await;
    assert_eq!(s, StatusCode::CREATED, "{sub}");
    let job = sub["id"].as_str().unwrap().to_owned();
    a.store.upsert_host("h1", "127.0.0.1:1").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let leased = a
        .store
        .claim_leases("h1", 10, std::time::Duration::from_secs(30), now)
        .unwrap();
    assert_eq!(leased.len(), 1);
    let epoch = leased[0].epoch;
    let big = vec![b'z'; 4096];
    let path = format!("/v1/subtasks/{job}/0/complete");
    let (a, job) = (&a, &job);
    let send = |epoch: u32| {
        let body = rmp_serde::to_vec_named(&completion(job, 0, epoch, &big)).unwrap();
        a.call(
            Method::POST,
            &path,
            Some(AGENT),
            Some("application/msgpack"),
            body,
        )
    };
    let status_of = |epoch: u32| {
        let id = super::outputs::output_id(job, 0, epoch);
        async move {
            a.json(
                Method::GET,
                &format!("/v1/data/{id}"),
                Some(SUBMIT),
                Value::Null,
            )
            .await
        }
    };
    // A stale epoch: 409, and no file stays.
    let (s, _) = send(epoch + 1).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(status_of(epoch + 1).await.0, StatusCode::NOT_FOUND);
    // The current one: accepted, its file complete; a repeat changes nothing.
    let (s, _) = send(epoch).await;
    assert_eq!(s, StatusCode::OK);
    let (s, st) = status_of(epoch).await;
    assert_eq!(
        (s, &st["complete"], &st["size"]),
        (StatusCode::OK, &json!(true), &json!(4096)),
        "{st}"
    );
    let (s, _) = send(epoch).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status_of(epoch).await.1["complete"], json!(true));
}
