//! Auth through the real router: 401 without a token or with a wrong one,
//! 403 for the wrong role, the right role passes, on every route of the
//! router (found in the source by [`routes_in_source`]); the open mode.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use sparegrid_proto::grid::Register;
use tower::ServiceExt;

use super::*;
use crate::agents::MSGPACK;
use crate::config::AuthConfig;
use crate::store::{SqliteStore, Store};

const SUBMIT: &str = "submit-token-for-tests";
const ADMIN: &str = "admin-token-for-tests";
const AGENT: &str = "agent-token-for-tests";

/// Every `(method, route pattern)` the crate's non-test sources register
/// with `.route("…", get(…).post(…))`. Reading the sources is the only way
/// to list what an axum router serves; [`routes_are_found_and_served`]
/// proves each one found is really routed, and the scan refuses ways of
/// adding routes it cannot read (`nest`, `route_service`).
pub(super) fn routes_in_source() -> BTreeSet<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "tests") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && !path
                    .file_name()
                    .is_some_and(|n| n == "tests.rs" || n.to_string_lossy().ends_with("_tests.rs"))
            {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut routes = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Inline test modules (at the end of a file, by convention) build
        // routers of their own.
        let text = match text.find("#[cfg(test)]\nmod tests {") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        for other in [".nest(", ".route_service(", ".nest_service("] {
            assert!(
                !text.contains(other),
                "{} adds routes with `{other}`: teach routes_in_source to read it",
                file.display()
            );
        }
        let mut rest = text;
        while let Some(i) = rest.find(".route(") {
            // rustfmt may put the path on the next line.
            rest = rest[i + ".route(".len()..].trim_start();
            let Some(quoted) = rest.strip_prefix('"') else {
                panic!(
                    "{}: a `.route(` whose path is not a string literal: teach routes_in_source to read it",
                    file.display()
                );
            };
            rest = quoted;
            let end = rest.find('"').unwrap();
            let path = rest[..end].to_owned();
            // The method router: up to the parenthesis closing `.route(`.
            let mut depth = 1;
            let mut close = end;
            for (j, c) in rest[end..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    close = end + j;
                    break;
                }
            }
            let methods = &rest[end..close];
            let mut found = 0;
            for m in ["get", "post", "put", "delete", "patch", "head", "options"] {
                let call = format!("{m}(");
                let mut from = 0;
                while let Some(k) = methods[from..].find(&call) {
                    let at = from + k;
                    let before = methods[..at].chars().next_back();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        routes.insert((m.to_owned(), path.clone()));
                        found += 1;
                    }
                    from = at + call.len();
                }
            }
            assert!(
                found > 0,
                "{}: no method found for route {path}: {methods}",
                file.display()
            );
        }
    }
    routes
}

/// A concrete path for a route pattern.
fn concrete(route: &str) -> String {
    route.replace("{id}", "j-1")
}

fn router_with(auth: AuthConfig) -> (Router, Arc<SqliteStore>) {
    let mut config = ControllerConfig {
        auth,
        ..ControllerConfig::default()
    };
    config.events_poll = std::time::Duration::from_millis(20);
    config.validate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    (router(AppState::new(dyn_store, &config)), store)
}

fn closed() -> (Router, Arc<SqliteStore>) {
    router_with(AuthConfig {
        agent_token: Some(AGENT.into()),
        submit_tokens: vec!["another-submit-token".into(), SUBMIT.into()],
        admin_tokens: vec![ADMIN.into()],
    })
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a 401 `unauthorized` with `WWW-Authenticate: Bearer`.
    fn unauthorized(&self, what: &str) {
        assert_eq!(self.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(self.json()["code"], "unauthorized", "{what}");
        assert_eq!(self.headers[header::WWW_AUTHENTICATE], "Bearer", "{what}");
    }

    /// Asserts a 403 `forbidden` naming the caller's role.
    fn forbidden(&self, role: &str, what: &str) {
        assert_eq!(self.status, StatusCode::FORBIDDEN, "{what}");
        let v = self.json();
        assert_eq!(v["code"], "forbidden", "{what}: {v}");
        assert!(v["message"].as_str().unwrap().contains(role), "{what}: {v}");
        assert!(self.headers.get(header::WWW_AUTHENTICATE).is_none());
    }
}

async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Reply {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
        .uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let resp = router
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(10),
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

fn job() -> String {
    json!({
        "name": "auth",
        "command": {"argv": ["echo", "{start}"]},
        "split": {"range": {"start": 0, "end": 2, "chunk": 1}}
    })
    .to_string()
}

fn register_body() -> Vec<u8> {
    rmp_serde::to_vec_named(&Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: None,
        p2p: false,
        host: "h1".into(),
        version: "t".into(),
        agent_url: None,
        slots: 1,
    })
    .unwrap()
}

#[tokio::test]
async fn routes_are_found_and_served() {
    let routes = routes_in_source();
    for want in [
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs/{id}"),
        ("delete", "/v1/jobs/{id}"),
        ("get", "/v1/hosts"),
        ("post", "/v1/agents/heartbeat"),
        ("get", "/openapi.json"),
    ] {
        assert!(
            routes.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} not found in {routes:?}"
        );
    }
    // Each one the scan found is routed (not the 404/405 fallbacks).
    let (router, _) = router_with(AuthConfig::default());
    for (method, route) in &routes {
        let r = call(&router, method, &concrete(route), None, None, Body::empty()).await;
        let code = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned));
        assert!(
            !matches!(
                code.as_deref(),
                Some("route_not_found" | "method_not_allowed")
            ),
            "{method} {route} is not routed: {code:?}"
        );
    }
}

/// Every route × every credential: no token or a wrong one is 401, a role
/// the route does not admit is 403, an admitted role gets past auth (to the
/// handler's own answer), and `/openapi.json` is public.
#[tokio::test]
async fn every_route_checks_the_role() {
    let (router, _) = closed();
    let mut checked = 0;
    for (method, route) in routes_in_source() {
        let access = Access::of(&route);
        let path = concrete(&route);
        let what = |who: &str| format!("{method} {route} as {who}");
        let creds: [(&str, Option<&str>, Option<Role>); 5] = [
            ("nobody", None, None),
            ("a wrong token", Some("not-a-token-of-ours"), None),
            ("submit", Some(SUBMIT), Some(Role::Submit)),
            ("agent", Some(AGENT), Some(Role::Agent)),
            ("admin", Some(ADMIN), Some(Role::Admin)),
        ];
        for (who, token, role) in creds {
            let r = call(&router, &method, &path, token, None, Body::empty()).await;
            match (access, role) {
                (Access::Public, _) => assert_eq!(r.status, StatusCode::OK, "{}", what(who)),
                (_, None) => r.unauthorized(&what(who)),
                (_, Some(role)) if access.admits(role) => assert!(
                    !matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
                    "{}: {}",
                    what(who),
                    r.status
                ),
                (_, Some(role)) => r.forbidden(role.as_str(), &what(who)),
            }
            checked += 1;
        }
    }
    assert!(checked >= 5 * 12, "only {checked} checks");
}

#[tokio::test]
async fn the_role_boundaries() {
    let (router, store) = closed();
    // An agent token cannot submit, and nothing is created.
    let r = call(
        &router,
        "post",
        "/v1/jobs",
        Some(AGENT),
        Some("application/json"),
        job(),
    )
    .await;
    r.forbidden("agent", "agent submits");
    assert!(store.list_jobs(None, 10).unwrap().is_empty());
    // Neither can no token or a wrong one.
    let r = call(
        &router,
        "post",
        "/v1/jobs",
        None,
        Some("application/json"),
        job(),
    )
    .await;
    r.unauthorized("anonymous submit");
    let r = call(
        &router,
        "post",
        "/v1/jobs",
        Some("submit-token-for-test"),
        Some("application/json"),
        job(),
    )
    .await;
    r.unauthorized("a token one character short");
    assert!(store.list_jobs(None, 10).unwrap().is_empty());

    // A submit token submits, reads and cancels.
    let r = call(
        &router,
        "post",
        "/v1/jobs",
        Some(SUBMIT),
        Some("application/json"),
        job(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = call(
        &router,
        "get",
        &format!("/v1/jobs/{id}"),
        Some(SUBMIT),
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &router,
        "get",
        "/v1/jobs",
        Some("another-submit-token"),
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["jobs"].as_array().unwrap().len(), 1);
    // ... but not the hosts, the metrics or the agent plane.
    let r = call(
        &router,
        "get",
        "/v1/hosts",
        Some(SUBMIT),
        None,
        Body::empty(),
    )
    .await;
    r.forbidden("submit", "submit reads hosts");
    let r = call(
        &router,
        "get",
        "/metrics",
        Some(SUBMIT),
        None,
        Body::empty(),
    )
    .await;
    r.forbidden("submit", "submit reads metrics");
    let r = call(
        &router,
        "post",
        "/v1/agents/register",
        Some(SUBMIT),
        Some(MSGPACK),
        register_body(),
    )
    .await;
    r.forbidden("submit", "submit registers");
    let r = call(
        &router,
        "post",
        "/v1/agents/heartbeat",
        Some(SUBMIT),
        Some(MSGPACK),
        Body::empty(),
    )
    .await;
    r.forbidden("submit", "submit heartbeats");

    // The agent token registers; it cannot read hosts or jobs.
    let r = call(
        &router,
        "post",
        "/v1/agents/register",
        Some(AGENT),
        Some(MSGPACK),
        register_body(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = call(
        &router,
        "get",
        "/v1/hosts",
        Some(AGENT),
        None,
        Body::empty(),
    )
    .await;
    r.forbidden("agent", "agent reads hosts");
    let r = call(
        &router,
        "get",
        &format!("/v1/jobs/{id}/results?partial=1"),
        Some(AGENT),
        None,
        Body::empty(),
    )
    .await;
    r.forbidden("agent", "agent reads results");
    let r = call(
        &router,
        "delete",
        &format!("/v1/jobs/{id}"),
        Some(AGENT),
        None,
        Body::empty(),
    )
    .await;
    r.forbidden("agent", "agent cancels");

    // Admin does everything.
    let r = call(
        &router,
        "get",
        "/v1/hosts",
        Some(ADMIN),
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["hosts"][0]["id"], "h1");
    let r = call(&router, "get", "/metrics", Some(ADMIN), None, Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&r.body).contains("status=\"403\""));
    let r = call(
        &router,
        "post",
        "/v1/agents/register",
        Some(ADMIN),
        Some(MSGPACK),
        register_body(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &router,
        "delete",
        &format!("/v1/jobs/{id}"),
        Some(ADMIN),
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "cancelled");

    // The document is public; unknown paths are 404 with or without a token.
    let r = call(&router, "get", "/openapi.json", None, None, Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(&router, "get", "/v1/nothing", None, None, Body::empty()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["code"], "route_not_found");
    // A token under another scheme is no token.
    let req = Request::get("/v1/jobs")
        .header(header::AUTHORIZATION, format!("Basic {SUBMIT}"))
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_tokens_the_api_is_open() {
    let (router, _) = router_with(AuthConfig::default());
    let r = call(
        &router,
        "post",
        "/v1/jobs",
        None,
        Some("application/json"),
        job(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    for path in ["/v1/jobs", "/v1/hosts", "/metrics", "/openapi.json"] {
        let r = call(&router, "get", path, None, None, Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    let r = call(
        &router,
        "post",
        "/v1/agents/register",
        None,
        Some(MSGPACK),
        register_body(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // A token is ignored, not refused.
    let r = call(
        &router,
        "get",
        "/v1/hosts",
        Some("whatever-token"),
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}
