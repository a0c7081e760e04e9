//! In-process tests of the API (tower `oneshot` against the router over an
//! in-memory SQLite store), plus one over a real listener.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::store::{JobId, Outcome, SqliteStore, Store};

struct App {
    router: Router,
    store: Arc<SqliteStore>,
}

fn app_with(config: ControllerConfig) -> App {
    config.validate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let router = router(AppState::new(dyn_store, &config));
    App { router, store }
}

fn app() -> App {
    app_with(ControllerConfig {
        events_poll: Duration::from_millis(20),
        ..ControllerConfig::default()
    })
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts an error reply with this status, code and (optional) field.
    fn error(&self, status: StatusCode, code: &str, field: Option<&str>) -> Value {
        let v = self.json();
        assert_eq!(self.status, status, "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        match field {
            Some(f) => assert_eq!(v["field"], f, "{v}"),
            None => assert!(v.get("field").is_none(), "{v}"),
        }
        assert!(
            self.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{:?}",
            self.headers
        );
        v
    }
}

impl App {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            axum::body::to_bytes(resp.into_body(), usize::MAX),
        )
        .await
        .expect("the body ends")
        .unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None, Body::empty()).await
    }

    async fn submit(&self, body: &Value) -> Reply {
        self.call(
            Method::POST,
            "/v1/jobs",
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    async fn submit_ok(&self, body: &Value) -> (String, u64) {
        let r = self.submit(body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
        let v = r.json();
        (
            v["id"].as_str().unwrap().to_owned(),
            v["subtasks"].as_u64().unwrap(),
        )
    }

    async fn job_count(&self) -> usize {
        self.get("/v1/jobs").await.json()["jobs"]
            .as_array()
            .unwrap()
            .len()
    }

    /// Claims up to `n` subtasks for host `h1` and completes them in the
    /// order given by `order` (indices into the claimed list), each printing
    /// its index and a newline.
    fn run_subtasks(&self, n: usize, reverse: bool) {
        self.store.upsert_host("h1", "127.0.0.1:1").unwrap();
        let mut claimed = self.store.claim("h1", n).unwrap();
        if reverse {
            claimed.reverse();
        }
        for a in claimed {
            let out = format!("{}\n", a.index).into_bytes();
            let outcome = Outcome {
                exit_code: Some(0),
                stdout_size: out.len() as u64,
                stdout: out,
                duration_ms: 1,
                ..Outcome::default()
            };
            self.store
                .complete(&a.job, a.index, a.epoch, &outcome)
                .unwrap();
        }
    }
}

fn range_job(start: i64, end: i64, chunk: i64) -> Value {
    json!({
        "name": "sweep",
        "command": {"argv": ["echo", "{start}", "{end}"]},
        "split": {"range": {"start": start, "end": end, "chunk": chunk}}
    })
}

fn items_job(n: usize) -> Value {
    let items: Vec<String> = (0..n).map(|i| format!("item{i}")).collect();
    json!({
        "command": {"argv": ["cat"]},
        "split": {"items": {"items": items, "batch": 1}}
    })
}

#[tokio::test]
async fn malformed_json_is_400_and_stores_nothing() {
    let a = app();
    for body in ["{\"command\": ", "", "not json", "{\"a\":1,\"a\":2}"] {
        let r = a
            .call(Method::POST, "/v1/jobs", Some("application/json"), body)
            .await;
        r.error(StatusCode::BAD_REQUEST, "malformed_json", Some("body"));
    }
    assert_eq!(a.job_count().await, 0);
}

#[tokio::test]
async fn unknown_missing_and_mistyped_fields_are_named() {
    let a = app();
    let mut body = range_job(0, 10, 1);
    body["colour"] = json!("red");
    a.submit(&body)
        .await
        .error(StatusCode::BAD_REQUEST, "unknown_field", Some("colour"));
    let mut body = range_job(0, 10, 1);
    body["split"]["range"]["chunks"] = json!(1);
    a.submit(&body).await.error(
        StatusCode::BAD_REQUEST,
        "unknown_field",
        Some("split.range.chunks"),
    );
    a.submit(&json!({"command": {"argv": ["x"]}})).await.error(
        StatusCode::BAD_REQUEST,
        "missing_field",
        Some("split"),
    );
    let mut body = range_job(0, 10, 1);
    body["split"]["range"]["end"] = json!("10");
    a.submit(&body).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_type",
        Some("split.range.end"),
    );
    assert_eq!(a.job_count().await, 0);
}

#[tokio::test]
async fn bad_ranges_are_refused() {
    let a = app();
    a.submit(&range_job(0, 10, -1)).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        Some("split.range.chunk"),
    );
    a.submit(&range_job(0, 10, 0)).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        Some("split.range.chunk"),
    );
    let r = a.submit(&range_job(10, 0, 1)).await;
    let v = r.json();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["code"], "invalid_field", "{v}");
    assert!(
        v["field"].as_str().unwrap().starts_with("split.range"),
        "{v}"
    );
    // Huge: 2^64 subtasks.
    let r = a.submit(&range_job(i64::MIN, i64::MAX, 1)).await;
    let v = r.json();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["code"], "too_large", "{v}");
    assert!(
        v["field"].as_str().unwrap().starts_with("split.range"),
        "{v}"
    );
    // Over the config's cap.
    let small = app_with(ControllerConfig {
        job_limits: crate::job::Limits {
            max_subtasks: 5,
            ..Default::default()
        },
        ..ControllerConfig::default()
    });
    let v = small.submit(&range_job(0, 6, 1)).await.error(
        StatusCode::BAD_REQUEST,
        "too_large",
        Some("split.range.chunk"),
    );
    assert!(v["message"].as_str().unwrap().contains('5'), "{v}");
    assert_eq!(a.job_count().await, 0);
    assert_eq!(small.job_count().await, 0);
}

#[tokio::test]
async fn empty_commands_are_refused() {
    let a = app();
    let mut body = range_job(0, 10, 1);
    body["command"] = json!({"argv": []});
    a.submit(&body).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        Some("command.argv"),
    );
    body["command"] = json!({"argv": [""]});
    a.submit(&body).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        Some("command.argv[0]"),
    );
    body["command"] = json!({"script": {"interpreter": "sh", "source": ""}});
    let r = a.submit(&body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.json());
    assert!(r.json()["field"]
        .as_str()
        .unwrap()
        .starts_with("command.script"));
    assert_eq!(a.job_count().await, 0);
}

#[tokio::test]
async fn every_dispatch_mode_is_taken_and_an_unknown_one_names_the_field() {
    let a = app();
    let mut body = range_job(0, 10, 1);
    body["mode"] = json!("teleport");
    a.submit(&body)
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_field", Some("mode"));
    assert_eq!(a.job_count().await, 0);
    for (n, mode) in ["pull", "p2p", "push"].into_iter().enumerate() {
        body["mode"] = json!(mode);
        let r = a.submit(&body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{mode}");
        assert_eq!(a.job_count().await, n + 1);
    }
}

#[tokio::test]
async fn oversized_body_is_413() {
    let a = app_with(ControllerConfig {
        max_body_bytes: 2048,
        ..ControllerConfig::default()
    });
    let big = items_job(1000).to_string();
    assert!(big.len() > 2048);
    let r = a
        .call(Method::POST, "/v1/jobs", Some("application/json"), big)
        .await;
    let v = r.error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None);
    assert!(v["message"].as_str().unwrap().contains("2048"), "{v}");
    // Without a Content-Length (a stream), too.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..10).map(|_| Ok(Bytes::from(vec![b' '; 512]))).collect();
    let r = a
        .call(
            Method::POST,
            "/v1/jobs",
            Some("application/json"),
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
        .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None);
    assert_eq!(a.job_count().await, 0);
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let a = app();
    let body = range_job(0, 10, 1).to_string();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let r = a.call(Method::POST, "/v1/jobs", ct, body.clone()).await;
        r.error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        );
    }
    // Parameters are fine.
    let r = a
        .call(
            Method::POST,
            "/v1/jobs",
            Some("application/json; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn unknown_jobs_routes_and_methods() {
    let a = app();
    for id in ["j-999", "nonsense", "j-", "1"] {
        a.get(&format!("/v1/jobs/{id}"))
            .await
            .error(StatusCode::NOT_FOUND, "job_not_found", None);
        a.call(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            None,
            Body::empty(),
        )
        .await
        .error(StatusCode::NOT_FOUND, "job_not_found", None);
        a.get(&format!("/v1/jobs/{id}/results")).await.error(
            StatusCode::NOT_FOUND,
            "job_not_found",
            None,
        );
        a.get(&format!("/v1/jobs/{id}/events")).await.error(
            StatusCode::NOT_FOUND,
            "job_not_found",
            None,
        );
    }
    a.get("/v2/nothing")
        .await
        .error(StatusCode::NOT_FOUND, "route_not_found", None);
    a.call(Method::PUT, "/v1/jobs", None, Body::empty())
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None);
    a.get("/v1/jobs?state=sleeping").await.error(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        Some("state"),
    );
    a.get("/v1/jobs?limit=0")
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_query", Some("limit"));
}

#[tokio::test]
async fn submit_get_list_cancel_results() {
    let a = app();
    let (id, n) = a.submit_ok(&range_job(0, 10, 3)).await;
    assert_eq!(n, 4);

    let r = a.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["state"], "queued");
    assert_eq!(v["counts"]["total"], 4);
    assert_eq!(v["counts"]["queued"], 4);
    assert_eq!(v["request"]["split"]["range"]["chunk"], 3);
    assert_eq!(v["request"]["max_attempts"], 3);

    let (id2, _) = a.submit_ok(&items_job(2)).await;
    let v = a.get("/v1/jobs").await.json();
    let ids: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id2.as_str(), id.as_str()], "newest first");
    let v = a.get("/v1/jobs?state=queued&limit=1").await.json();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    let v = a.get("/v1/jobs?state=done").await.json();
    assert!(v["jobs"].as_array().unwrap().is_empty());

    // Not finished: 409 unless partial.
    a.get(&format!("/v1/jobs/{id}/results")).await.error(
        StatusCode::CONFLICT,
        "job_not_finished",
        None,
    );
    let r = a.get(&format!("/v1/jobs/{id}/results?partial=1")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert_eq!(r.headers["sparegrid-results"], "partial");
    a.get(&format!("/v1/jobs/{id}/results?partial=maybe"))
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_query", Some("partial"));
    a.get(&format!("/v1/jobs/{id}/results?format=xml"))
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_query", Some("format"));

    // Two subtasks run (the first job is older and same priority, so it
    // is claimed first).
    a.run_subtasks(2, false);
    let v = a.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(v["state"], "running");
    assert_eq!(v["counts"]["done"], 2);
    assert_eq!(v["counts"]["queued"], 2);

    let r = a
        .call(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["changed"], true);
    assert_eq!(v["dropped_queued"], 2);
    assert_eq!(v["stopping"], 0);
    let v = a
        .call(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            None,
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(
        (v["state"].as_str(), v["changed"].as_bool()),
        (Some("cancelled"), Some(false))
    );

    // Cancelled is final: results are what was done.
    let r = a.get(&format!("/v1/jobs/{id}/results")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"0\n1\n");
    assert_eq!(r.headers["sparegrid-results"], "partial");
    let v = a
        .get(&format!("/v1/jobs/{id}/results?format=json"))
        .await
        .json();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["complete"], false);
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["results"][1]["stdout"], "1\n");
    assert_eq!(v["results"][1]["host"], "h1");
}

#[tokio::test]
async fn results_come_in_subtask_order() {
    let a = app();
    // More than one page of results (256 per page).
    let (id, n) = a.submit_ok(&items_job(600)).await;
    assert_eq!(n, 600);
    a.run_subtasks(600, true);
    let v = a.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(v["state"], "done");
    let r = a.get(&format!("/v1/jobs/{id}/results")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["sparegrid-results"], "complete");
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/octet-stream");
    let expected: String = (0..600).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&r.body), expected);
    let r = a.get(&format!("/v1/jobs/{id}/results?format=json")).await;
    let v = r.json();
    assert_eq!(v["complete"], true);
    assert_eq!(v["state"], "done");
    let idx: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, (0..600).collect::<Vec<u64>>());
}

/// Server-sent events split into (event name, data JSON).
fn sse_events(body: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8_lossy(body);
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data = serde_json::from_str(d.trim()).ok();
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test]
async fn events_of_a_cancelled_job_end() {
    let a = app();
    let (id, _) = a.submit_ok(&range_job(0, 4, 1)).await;
    a.call(
        Method::DELETE,
        &format!("/v1/jobs/{id}"),
        None,
        Body::empty(),
    )
    .await;
    let r = a.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let evs = sse_events(&r.body);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].0, "end");
    assert_eq!(evs[0].1["state"], "cancelled");
    assert_eq!(evs[0].1["counts"]["cancelled"], 4);
}

#[tokio::test]
async fn events_follow_a_job_until_it_ends() {
    let a = Arc::new(app());
    let (id, _) = a.submit_ok(&range_job(0, 4, 1)).await;
    let reader = {
        let a = Arc::clone(&a);
        let id = id.clone();
        tokio::spawn(async move { a.get(&format!("/v1/jobs/{id}/events")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.run_subtasks(2, false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.run_subtasks(2, false);
    let r = reader.await.unwrap();
    let evs = sse_events(&r.body);
    assert!(evs.len() >= 2, "{evs:?}");
    assert_eq!(evs[0].0, "progress");
    assert_eq!(evs[0].1["state"], "queued");
    let last = evs.last().unwrap();
    assert_eq!(last.0, "end");
    assert_eq!(last.1["state"], "done");
    assert_eq!(last.1["counts"]["done"], 4);
    // Each event differs from the one before.
    for w in evs.windows(2) {
        assert_ne!(w[0].1, w[1].1, "{evs:?}");
    }
}

/// The document lists exactly the router's routes, each with every method
/// (the route list is read from the sources, so a new route fails this
/// until it is documented), and each operation carries the bearer schemes
/// of the roles the auth middleware admits on it.
#[tokio::test]
async fn openapi_document_lists_every_route() {
    let a = app();
    let r = a.get("/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert!(v["openapi"].as_str().unwrap().starts_with("3."), "{v}");
    let paths = v["paths"].as_object().unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "delete", "patch", "head", "options"] {
            if item.get(method).is_some() {
                documented.insert((method.to_owned(), path.clone()));
            }
        }
    }
    let routed = super::auth_tests::routes_in_source();
    assert!(routed.len() >= 12, "{routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /openapi.json: {undocumented:?}"
    );
    let stale: Vec<_> = documented.difference(&routed).collect();
    assert!(stale.is_empty(), "documented but not routed: {stale:?}");

    // Security follows the auth rule of each route.
    let schemes = &v["components"]["securitySchemes"];
    for role in [Role::Submit, Role::Agent, Role::Admin] {
        let s = &schemes[openapi::scheme_of(role)];
        assert_eq!(s["type"], "http", "{s}");
        assert_eq!(s["scheme"], "bearer", "{s}");
    }
    for (method, path) in &documented {
        let op = &paths[path][method];
        let access = Access::of(path);
        let listed: std::collections::BTreeSet<String> = op["security"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|req| req.as_object().unwrap().keys().cloned())
            .collect();
        let want: std::collections::BTreeSet<String> = match access {
            Access::Public => Default::default(),
            _ => access
                .roles()
                .iter()
                .map(|r| openapi::scheme_of(*r).to_owned())
                .collect(),
        };
        assert_eq!(listed, want, "{method} {path}");
        for status in ["401", "403"] {
            assert_eq!(
                op["responses"].get(status).is_some(),
                access != Access::Public,
                "{method} {path} {status}"
            );
        }
    }

    // The submit body is the request schema; the agent plane speaks
    // MessagePack with its messages' schemas.
    let body = &paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(body["$ref"], "#/components/schemas/JobRequest");
    for (path, schema) in [
        ("/v1/agents/register", "Register"),
        ("/v1/agents/heartbeat", "Heartbeat"),
        ("/v1/agents/release", "Release"),
    ] {
        let post = &paths[path]["post"];
        let body = &post["requestBody"]["content"]["application/msgpack"]["schema"];
        assert_eq!(
            body["$ref"],
            format!("#/components/schemas/{schema}"),
            "{path}"
        );
        assert!(
            post["responses"]["200"]["content"]["application/msgpack"].is_object(),
            "{path}: {post}"
        );
    }
    let completions = &paths["/v1/agents/completions"]["post"]["requestBody"]["content"]
        ["application/msgpack"]["schema"];
    assert_eq!(completions["type"], "array", "{completions}");
    assert_eq!(
        completions["items"]["$ref"],
        "#/components/schemas/Completion"
    );
    let hosts =
        &paths["/v1/hosts"]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
    assert_eq!(hosts["$ref"], "#/components/schemas/HostsView");
    assert!(v["components"]["schemas"]["ErrorBody"].is_object());
    assert!(v["components"]["schemas"]["HostView"].is_object());
}

#[tokio::test]
async fn metrics_count_jobs_subtasks_and_requests() {
    let a = app();
    a.submit_ok(&range_job(0, 3, 1)).await;
    a.get("/v1/jobs/j-999").await;
    let r = a.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("sparegrid_jobs{state=\"queued\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("sparegrid_subtasks{state=\"queued\"} 3"),
        "{text}"
    );
    assert!(
        text.contains(
            "sparegrid_http_requests_total{route=\"/v1/jobs\",method=\"POST\",status=\"201\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "sparegrid_http_requests_total{route=\"/v1/jobs/{id}\",method=\"GET\",status=\"404\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn serves_on_a_real_listener() {
    use std::io::{Read, Write};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let state = AppState::new(store, &ControllerConfig::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, state, async {
        let _ = rx.await;
    }));
    let body = range_job(0, 2, 1).to_string();
    let req = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let out = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 201"), "{out}");
    assert!(out.contains("\"id\":\"j-1\""), "{out}");
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert_eq!(JobId::from("j-1").as_str(), "j-1");
}

// --- reduce (helper H1) ----------------------------------------------------

#[tokio::test]
async fn a_reduce_job_answers_its_reduce_output_and_keeps_the_map_outputs() {
    let a = app();
    let mut body = range_job(0, 6, 2);
    body["reduce"] = json!({"argv": ["sort", "-r"]});
    let (id, n) = a.submit_ok(&body).await;
    assert_eq!(n, 3, "the map subtasks");
    let v = a.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(
        (
            &v["map_subtasks"],
            &v["reduce"],
            &v["counts"]["total"],
            &v["error"]
        ),
        (&json!(3), &json!("waiting"), &json!(3), &Value::Null)
    );
    let r = a
        .get(&format!("/v1/jobs/{id}/results?stage=map&partial=1"))
        .await;
    assert_eq!(
        (r.status, &r.headers["sparegrid-stage"], r.body.is_empty()),
        (
            StatusCode::OK,
            &"map".parse::<header::HeaderValue>().unwrap(),
            true
        )
    );

    a.run_subtasks(3, true);
    let v = a.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(
        (&v["state"], &v["reduce"]),
        (&json!("running"), &json!("queued"))
    );
    assert_eq!(
        (&v["counts"]["total"], &v["counts"]["queued"]),
        (&json!(4), &json!(1))
    );
    // The map stage is finished and readable; the job's results are not.
    let r = a.get(&format!("/v1/jobs/{id}/results?stage=map")).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"0\n1\n2\n"[..]));
    assert_eq!(r.headers["sparegrid-results"], "complete");
    a.get(&format!("/v1/jobs/{id}/results")).await.error(
        StatusCode::CONFLICT,
        "job_not_finished",
        None,
    );

    // The reduce runs like any subtask, on the map outputs in index order.
    let got = a.store.claim("h1", 10).unwrap();
    assert_eq!(got.len(), 1);
    let reduce = &got[0];
    assert_eq!(
        (reduce.index, reduce.spec.argv.join(" ")),
        (3, "sort -r".into())
    );
    assert_eq!(reduce.spec.stdin, b"0\n1\n2\n");
    let out = b"2\n1\n0\n".to_vec();
    let outcome = Outcome {
        exit_code: Some(0),
        stdout_size: out.len() as u64,
        stdout: out,
        ..Outcome::default()
    };
    a.store
        .complete(&reduce.job, 3, reduce.epoch, &outcome)
        .unwrap();
    let v = a.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(
        (&v["state"], &v["reduce"]),
        (&json!("done"), &json!("done"))
    );

    let r = a.get(&format!("/v1/jobs/{id}/results")).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"2\n1\n0\n"[..]));
    assert_eq!(r.headers["sparegrid-stage"], "reduce");
    assert_eq!(r.headers["sparegrid-results"], "complete");
    let v = a
        .get(&format!("/v1/jobs/{id}/results?format=json"))
        .await
        .json();
    assert_eq!(
        (&v["stage"], &v["complete"]),
        (&json!("reduce"), &json!(true))
    );
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(
        (
            &results[0]["index"],
            &results[0]["stage"],
            &results[0]["stdout"]
        ),
        (&json!(3), &json!("reduce"), &json!("2\n1\n0\n"))
    );
    let v = a
        .get(&format!("/v1/jobs/{id}/results?format=json&stage=map"))
        .await
        .json();
    assert_eq!(v["stage"], "map");
    let stages: Vec<(u64, &str)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["stage"].as_str().unwrap()))
        .collect();
    assert_eq!(stages, [(0, "map"), (1, "map"), (2, "map")]);

    a.get(&format!("/v1/jobs/{id}/results?stage=final"))
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_query", Some("stage"));
    let (plain, _) = a.submit_ok(&range_job(0, 1, 1)).await;
    let e = a
        .get(&format!("/v1/jobs/{plain}/results?stage=reduce&partial=1"))
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_query", Some("stage"));
    assert!(e["message"].as_str().unwrap().contains("no reduce"), "{e}");
    let v = a.get(&format!("/v1/jobs/{plain}")).await.json();
    assert_eq!(
        (&v["reduce"], &v["map_subtasks"]),
        (&Value::Null, &json!(1))
    );
    let r = a.get(&format!("/v1/jobs/{plain}/results?partial=1")).await;
    assert_eq!(r.headers["sparegrid-stage"], "map");
}

#[tokio::test]
async fn a_reduce_on_cut_output_fails_the_job_with_the_reason() {
    let a = app();
    let mut body = items_job(2);
    body["reduce"] = json!({"script": {"interpreter": "sh", "source": "wc -l"}});
    let (id, _) = a.submit_ok(&body).await;
    a.store.upsert_host("h1", "127.0.0.1:1").unwrap();
    for s in a.store.claim("h1", 2).unwrap() {
        let outcome = Outcome {
            exit_code: Some(0),
            stdout: b"kept".to_vec(),
            // The agent cut subtask 1's output.
            stdout_size: if s.index == 1 { 9000 } else { 4 },
            ..Outcome::default()
        };
        a.store
            .complete(&s.job, s.index, s.epoch, &outcome)
            .unwrap();
    }
    let v = a.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(
        (&v["state"], &v["reduce"]),
        (&json!("failed"), &json!("dead"))
    );
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("subtask 1") && error.contains("cut"),
        "{error}"
    );
    // Nothing to reduce, and nothing is claimable.
    let r = a.get(&format!("/v1/jobs/{id}/results")).await;
    assert_eq!((r.status, r.body.is_empty()), (StatusCode::OK, true));
    assert_eq!(r.headers["sparegrid-results"], "partial");
    assert!(a.store.claim("h1", 10).unwrap().is_empty());
}

#[tokio::test]
async fn openapi_documents_the_reduce_stage() {
    use crate::store::ReduceState;
    let a = app();
    let doc = a.get("/openapi.json").await.json();
    let states: Vec<&str> = doc["components"]["schemas"]["ReduceState"]["enum"]
        .as_array()
        .expect("ReduceState is in the document")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for s in [
        ReduceState::Waiting,
        ReduceState::Queued,
        ReduceState::Assigned,
        ReduceState::Done,
        ReduceState::Dead,
        ReduceState::Cancelled,
        ReduceState::Skipped,
    ] {
        let v = serde_json::to_value(s).unwrap();
        assert!(states.contains(&v.as_str().unwrap()), "{v}");
        assert_eq!(v, s.as_str());
    }
    assert_eq!(states.len(), 7);
    let summary = &doc["components"]["schemas"]["JobSummary"]["properties"];
    for field in ["map_subtasks", "reduce", "error"] {
        assert!(summary.get(field).is_some(), "JobSummary.{field}");
    }
    let params = doc["paths"]["/v1/jobs/{id}/results"]["get"]["parameters"]
        .as_array()
        .unwrap();
    assert!(params.iter().any(|p| p["name"] == "stage"), "{params:?}");
    let result = &doc["components"]["schemas"]["SubtaskResult"]["properties"];
    assert!(result.get("stage").is_some());
}
