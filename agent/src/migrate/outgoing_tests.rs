//! The source's choice of how the offer and commit reach the target
//! ([`first_offer`], [`PeerRoute`]): a fake target agent API and a fake
//! controller on loopback, each recording what it was sent.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use sparegrid_proto::grid::AttemptRef;
use sparegrid_proto::migrate::{ForwardRequest, ForwardStep, IncomingVm, MigrationAnswer};

use super::*;
use crate::config::ControllerSection;

const TOKEN: &str = "outgoing-test-token";

fn incoming() -> IncomingVm {
    IncomingVm {
        from: "a".into(),
        vm: "sg-a-1".into(),
        vcpus: 1,
        memory_mib: 64,
        state_id: "vmstate-j-0-1".into(),
        state_bytes: 10,
        state_blake3: "0".repeat(64),
        attempt: AttemptRef {
            job: "j".into(),
            index: 0,
            epoch: 1,
        },
        guest_subtask: 1,
        timeout_ms: 1000,
        fetch: None,
    }
}

fn msgpack(v: &impl serde::Serialize) -> axum::response::Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/msgpack")],
        rmp_serde::to_vec_named(v).unwrap(),
    )
        .into_response()
}

fn accepted(reason: &str) -> MigrationAnswer {
    MigrationAnswer {
        accepted: true,
        reason: Some(reason.into()),
        attempt: None,
        fetch_failed: false,
    }
}

/// A fake target agent API: answers offers and commits (`status` 200 with
/// an accepted answer, else that status); records the paths it was sent.
fn target(status: StatusCode) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    let app = Router::new()
        .route(
            "/v1/migrations/offer",
            post(move |_b: Bytes| async move {
                s1.lock().unwrap().push("offer".into());
                if status == StatusCode::OK {
                    msgpack(&accepted("direct"))
                } else {
                    (status, "no").into_response()
                }
            }),
        )
        .route(
            "/v1/migrations/commit",
            post(move |_b: Bytes| async move {
                s2.lock().unwrap().push("commit".into());
                msgpack(&accepted("direct"))
            }),
        );
    let url =
        crate::grid::tests::serve_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), app);
    (url, seen)
}

/// A fake controller's forward route: records each request.
fn controller() -> (String, Arc<Mutex<Vec<ForwardRequest>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Router::new().route(
        "/v1/agents/migrations/forward",
        post(move |b: Bytes| async move {
            let req: ForwardRequest = rmp_serde::from_slice(&b).unwrap();
            s.lock().unwrap().push(req);
            msgpack(&accepted("forwarded"))
        }),
    );
    let url =
        crate::grid::tests::serve_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), app);
    (url, seen)
}

fn client(url: &str) -> ControllerClient {
    ControllerClient::new(&ControllerSection {
        url: url.into(),
        token: TOKEN.into(),
        ..ControllerSection::default()
    })
    .unwrap()
}

/// A loopback URL nobody listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[test]
fn a_target_that_answers_gets_the_offer_and_the_commit_directly() {
    let (t, t_seen) = target(StatusCode::OK);
    let (c, c_seen) = controller();
    let (route, answer) = first_offer(client(&t), client(&c), "b", &incoming()).unwrap();
    assert_eq!(answer.reason.as_deref(), Some("direct"));
    assert!(matches!(route, PeerRoute::Direct(_)));
    route.send(ForwardStep::Commit, &incoming()).unwrap();
    assert_eq!(*t_seen.lock().unwrap(), ["offer", "commit"]);
    assert!(
        c_seen.lock().unwrap().is_empty(),
        "the controller was not asked"
    );
}

#[test]
fn a_target_nobody_reaches_gets_both_through_the_controller() {
    let (c, c_seen) = controller();
    let (route, answer) = first_offer(client(&dead_url()), client(&c), "b", &incoming()).unwrap();
    assert_eq!(answer.reason.as_deref(), Some("forwarded"));
    assert!(matches!(&route, PeerRoute::Forwarded { to, .. } if to == "b"));
    let a = route.send(ForwardStep::Commit, &incoming()).unwrap();
    assert!(a.accepted);
    let seen = c_seen.lock().unwrap();
    let steps: Vec<(ForwardStep, &str, &str)> = seen
        .iter()
        .map(|r| (r.step, r.to.as_str(), r.incoming.vm.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            (ForwardStep::Offer, "b", "sg-a-1"),
            (ForwardStep::Commit, "b", "sg-a-1")
        ]
    );
}

#[test]
fn a_target_that_answers_with_an_error_is_not_asked_another_way() {
    let (t, t_seen) = target(StatusCode::BAD_REQUEST);
    let (c, c_seen) = controller();
    let err = match first_offer(client(&t), client(&c), "b", &incoming()) {
        Err(e) => e,
        Ok(_) => panic!("a 400 from the target is the answer"),
    };
    assert!(
        matches!(err, MigrateError::Offer { ref host, .. } if host == "b"),
        "{err}"
    );
    assert_eq!(*t_seen.lock().unwrap(), ["offer"]);
    assert!(c_seen.lock().unwrap().is_empty());
}
