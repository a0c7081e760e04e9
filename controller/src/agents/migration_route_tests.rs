//! The controller's help for moves between hosts that cannot reach each
//! other, through the whole API router (tower `oneshot`, an in-memory
//! store, a data plane in a temporary directory):
//! `POST /v1/agents/migrations/relay` (who may have a slot, the fields it
//! checks, its tokens working on `/v1/data` for exactly one id and
//! direction each) and `POST /v1/agents/migrations/forward` (posted to the
//! registered target's agent API, which a fake agent on loopback records).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use sparegrid_proto::grid::AttemptRef;
use sparegrid_proto::grid::Register;
use sparegrid_proto::migrate::{
    state_id, ForwardRequest, ForwardStep, IncomingVm, MigrationAnswer, RelayRequest, RelaySlot,
};
use tower::ServiceExt;

use crate::api::{router, AppState};
use crate::config::{AuthConfig, ControllerConfig};
use crate::data::{DataConfig, DataPlane};
use crate::store::{SqliteStore, Store};

const SUBMIT: &str = "submit-token-r";
const AGENT: &str = "agent-token-r";
const MAX: u64 = 1 << 20;

struct App {
    router: Router,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

fn app(data: bool) -> App {
    let config = ControllerConfig {
        auth: AuthConfig {
            agent_token: Some(AGENT.into()),
            submit_tokens: vec![SUBMIT.into()],
            admin_tokens: vec![],
        },
        data: DataConfig {
            enabled: data,
            max_upload_bytes: MAX,
            ..DataConfig::default()
        },
        ..ControllerConfig::default()
    };
    config.validate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut state = AppState::new(store.clone(), &config);
    if data {
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
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (StatusCode, Bytes) {
        let mut rb = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            rb = rb.header(*k, v);
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

    async fn relay(&self, req: &RelayRequest) -> (StatusCode, Bytes) {
        self.call(
            Method::POST,
            "/v1/agents/migrations/relay",
            &[
                ("authorization", format!("Bearer {AGENT}")),
                ("content-type", "application/msgpack".into()),
            ],
            rmp_serde::to_vec_named(req).unwrap(),
        )
        .await
    }

    /// A one-subtask job claimed by `h1`: its attempt.
    async fn held_attempt(&self) -> AttemptRef {
        let body = json!({"command": {"argv": ["true"]}, "split": {"range": {"start": 0, "end": 1, "chunk": 1}}});
        let (s, b) = self
            .call(
                Method::POST,
                "/v1/jobs",
                &[
                    ("authorization", format!("Bearer {SUBMIT}")),
                    ("content-type", "application/json".into()),
                ],
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
        let job = serde_json::from_slice::<Value>(&b).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.store.upsert_host("h1", "127.0.0.1:1").unwrap();
        let claimed = self.store.claim("h1", 1).unwrap();
        assert_eq!(claimed.len(), 1);
        AttemptRef {
            job,
            index: claimed[0].index,
            epoch: claimed[0].epoch,
        }
    }
}

fn error_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_relay_slot_is_only_for_the_attempts_holder_and_within_the_upload_limit() {
    let a = app(true);
    let attempt = a.held_attempt().await;
    let req = |host: &str, state_bytes| RelayRequest {
        host: host.into(),
        attempt: attempt.clone(),
        state_bytes,
    };
    let (s, b) = a.relay(&req("h2", 10)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(error_of(&b)["code"], "not_current", "{}", error_of(&b));
    let (s, b) = a.relay(&req("h1", MAX + 1)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&b)["field"], "state_bytes", "{}", error_of(&b));
    let stale = RelayRequest {
        attempt: AttemptRef {
            epoch: attempt.epoch + 1,
            ..attempt.clone()
        },
        ..req("h1", 10)
    };
    assert_eq!(a.relay(&stale).await.0, StatusCode::CONFLICT);
    let (s, b) = a.relay(&req("h1", 10)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let slot: RelaySlot = rmp_serde::from_slice(&b).unwrap();
    assert_eq!(slot.id, state_id(&attempt));
    assert_eq!(slot.transfer_path, "/v1/data");
}

#[tokio::test]
async fn relay_tokens_upload_download_and_remove_one_state_each_way_only() {
    let a = app(true);
    let attempt = a.held_attempt().await;
    let (s, b) = a
        .relay(&RelayRequest {
            host: "h1".into(),
            attempt,
            state_bytes: 11,
        })
        .await;
    assert_eq!(s, StatusCode::OK);
    let slot: RelaySlot = rmp_serde::from_slice(&b).unwrap();
    let data = b"saved state".to_vec();
    let digest = blake3::hash(&data).to_hex().to_string();
    let b64 = base64::engine::general_purpose::STANDARD;
    let files = format!("{}{}", slot.transfer_path, sparegrid_transfer::FILES);
    let file = format!("{files}/{}", slot.id);
    let create = |token: &str| {
        vec![
            ("authorization", format!("Bearer {token}")),
            ("tus-resumable", "1.0.0".into()),
            ("upload-length", data.len().to_string()),
            ("upload-metadata", format!("blake3 {}", b64.encode(&digest))),
            ("content-type", "application/offset+octet-stream".into()),
        ]
    };
    // The download token cannot upload.
    let (s, _) = a
        .call(
            Method::POST,
            &files,
            &create(&slot.download_token),
            data.clone(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = a
        .call(
            Method::POST,
            &files,
            &create(&slot.upload_token),
            data.clone(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    let get = |token: &str| vec![("authorization", format!("Bearer {token}"))];
    // The upload token cannot download; the download token gets the bytes.
    assert_eq!(
        a.call(Method::GET, &file, &get(&slot.upload_token), vec![])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (s, body) = a
        .call(Method::GET, &file, &get(&slot.download_token), vec![])
        .await;
    assert_eq!((s, body.to_vec()), (StatusCode::OK, data.clone()));
    // Neither reaches another id.
    let other = format!("{files}/vmstate-other-0-1");
    assert_eq!(
        a.call(Method::GET, &other, &get(&slot.download_token), vec![])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // The source removes the copy with its upload token.
    let del = vec![
        ("authorization", format!("Bearer {}", slot.upload_token)),
        ("tus-resumable", "1.0.0".into()),
    ];
    assert_eq!(
        a.call(Method::DELETE, &file, &del, vec![]).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        a.call(Method::GET, &file, &get(&slot.download_token), vec![])
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn without_data_there_is_no_relay() {
    let a = app(false);
    let attempt = a.held_attempt().await;
    let (s, b) = a
        .relay(&RelayRequest {
            host: "h1".into(),
            attempt,
            state_bytes: 10,
        })
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(error_of(&b)["code"], "no_relay", "{}", error_of(&b));
}

impl App {
    async fn agent_post(&self, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
        self.call(
            Method::POST,
            path,
            &[
                ("authorization", format!("Bearer {AGENT}")),
                ("content-type", "application/msgpack".into()),
            ],
            body,
        )
        .await
    }

    async fn register(&self, host: &str, agent_url: &str) {
        let reg = Register {
            images: Vec::new(),
            migrate_in: true,
            transfer_url: None,
            tunnel: None,
            p2p: false,
            host: host.into(),
            version: "test".into(),
            agent_url: Some(agent_url.into()),
            slots: 1,
        };
        let (s, b) = self
            .agent_post(
                "/v1/agents/register",
                rmp_serde::to_vec_named(&reg).unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    }
}

/// A fake target agent API on loopback: answers offers with `accepted`
/// and the vm name as the reason; records the paths and tokens it got.
async fn fake_target() -> (String, Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    use axum::extract::OriginalUri;
    use axum::http::HeaderMap;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = move |uri: OriginalUri, headers: HeaderMap, body: Bytes| {
        let s = s.clone();
        async move {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            s.lock().unwrap().push((uri.path().to_owned(), auth));
            let vm: IncomingVm = rmp_serde::from_slice(&body).unwrap();
            let a = MigrationAnswer {
                accepted: true,
                reason: Some(vm.vm),
                attempt: None,
                fetch_failed: false,
            };
            rmp_serde::to_vec_named(&a).unwrap()
        }
    };
    let app = Router::new()
        .route("/v1/migrations/offer", axum::routing::post(handler.clone()))
        .route("/v1/migrations/commit", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn incoming_vm(attempt: &AttemptRef) -> IncomingVm {
    IncomingVm {
        from: "h1".into(),
        vm: "sg-h1-1".into(),
        vcpus: 1,
        memory_mib: 64,
        state_id: state_id(attempt),
        state_bytes: 10,
        state_blake3: "0".repeat(64),
        attempt: attempt.clone(),
        guest_subtask: 1,
        timeout_ms: 1000,
        fetch: None,
    }
}

#[tokio::test]
async fn offers_and_commits_are_forwarded_to_the_registered_target_with_the_agent_token() {
    let a = app(true);
    let attempt = a.held_attempt().await;
    let (url, seen) = fake_target().await;
    a.register("h2", &url).await;
    for step in [ForwardStep::Offer, ForwardStep::Commit] {
        let req = ForwardRequest {
            to: "h2".into(),
            step,
            incoming: incoming_vm(&attempt),
        };
        let (s, b) = a
            .agent_post(
                "/v1/agents/migrations/forward",
                rmp_serde::to_vec_named(&req).unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let answer: MigrationAnswer = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(
            (answer.accepted, answer.reason.as_deref()),
            (true, Some("sg-h1-1"))
        );
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (
                "/v1/migrations/offer".to_string(),
                format!("Bearer {AGENT}")
            ),
            (
                "/v1/migrations/commit".to_string(),
                format!("Bearer {AGENT}")
            ),
        ]
    );
}

#[tokio::test]
async fn a_forward_is_refused_for_a_non_holder_an_unknown_target_or_the_source_itself() {
    let a = app(true);
    let attempt = a.held_attempt().await;
    let (url, seen) = fake_target().await;
    a.register("h2", &url).await;
    let send = |to: &str, from: &str| {
        let mut incoming = incoming_vm(&attempt);
        incoming.from = from.into();
        rmp_serde::to_vec_named(&ForwardRequest {
            to: to.into(),
            step: ForwardStep::Offer,
            incoming,
        })
        .unwrap()
    };
    let (s, b) = a
        .agent_post("/v1/agents/migrations/forward", send("h2", "h3"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(error_of(&b)["code"], "not_current");
    let (s, b) = a
        .agent_post("/v1/agents/migrations/forward", send("nobody", "h1"))
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(
        error_of(&b)["code"],
        "target_unreachable",
        "{}",
        error_of(&b)
    );
    let (s, b) = a
        .agent_post("/v1/agents/migrations/forward", send("h1", "h1"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&b)["field"], "to");
    // A registered target that does not answer.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    a.register("h4", &dead).await;
    let (s, b) = a
        .agent_post("/v1/agents/migrations/forward", send("h4", "h1"))
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(
        error_of(&b)["message"].as_str().unwrap().contains("h4"),
        "{}",
        error_of(&b)
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing reached h2");
}
