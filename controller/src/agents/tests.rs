//! The agent plane against fake agents: each fake is an in-test axum server
//! that accepts `POST /v1/subtasks`, "runs" each assignment for a few
//! milliseconds and reports it back, and heartbeats its load, free slots
//! and running attempts. The controller runs on a real listener with the
//! real router, an in-memory SQLite store and the dispatcher.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use sparegrid_proto::grid::{
    AssignBatch, AttemptRef, Completion, Heartbeat, HeartbeatReply, Register, StopBatch,
};
use tokio::net::TcpListener;

use super::*;
use crate::api::router;
use crate::store::{AttemptState, JobState, SqliteStore};

pub(super) const TOKEN: &str = "agent-token-for-tests";
/// The admin token (the job and hosts routes need one once `[auth]` has
/// tokens).
pub(super) const ADMIN: &str = "admin-token-for-tests";

pub(super) struct Ctl {
    pub(super) url: String,
    pub(super) store: Arc<SqliteStore>,
    pub(super) client: reqwest::Client,
}

async fn controller() -> Ctl {
    controller_with(|_| {}).await
}

/// The test controller with `tweak` applied to its config.
pub(super) async fn controller_with(tweak: impl FnOnce(&mut ControllerConfig)) -> Ctl {
    let mut config = ControllerConfig::default();
    config.registry.heartbeat_interval = Duration::from_millis(100);
    config.registry.host_timeout = Duration::from_millis(400);
    config.auth.agent_token = Some(TOKEN.to_owned());
    config.auth.admin_tokens = vec![ADMIN.to_owned()];
    config.dispatch.interval = Duration::from_millis(20);
    // Small enough that an oversized test body fits in the socket buffers:
    // the server answers 413 after reading past the cap and closes, and a
    // client still writing a 33 MiB body would see a broken pipe instead of
    // the answer.
    config.dispatch.max_agent_body_bytes = 64 * 1024;
    tweak(&mut config);
    config.validate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let state = AppState::new(dyn_store, &config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    spawn_dispatcher(state.agents.clone());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Ctl {
        url,
        store,
        client: reqwest::Client::new(),
    }
}

impl Ctl {
    pub(super) async fn post_mp(
        &self,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Bytes) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", MSGPACK)
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status(), r.bytes().await.unwrap())
    }

    async fn submit_range(&self, n: i64) -> JobId {
        let r = self
            .client
            .post(format!("{}/v1/jobs", self.url))
            .bearer_auth(ADMIN)
            .json(&json!({
                "name": "sweep",
                "command": {"argv": ["echo", "{start}"]},
                "split": {"range": {"start": 0, "end": n, "chunk": 1}}
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        JobId(v["id"].as_str().unwrap().to_owned())
    }

    async fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut(&Ctl) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn done(&self, job: &JobId) -> u64 {
        self.store.get_job(job).unwrap().counts.done
    }

    /// Asserts every subtask of `job` has exactly one result, with the
    /// output its index asks for, and returns the host of each.
    fn check_results(&self, job: &JobId, n: u64) -> BTreeMap<u64, String> {
        let record = self.store.get_job(job).unwrap();
        assert_eq!(record.state, JobState::Done, "{record:?}");
        assert_eq!(record.counts.done, n);
        let results = self.store.results(job, 0, 10_000).unwrap();
        assert_eq!(results.len() as u64, n);
        let mut hosts = BTreeMap::new();
        for (i, r) in results.iter().enumerate() {
            assert_eq!(r.index, i as u64, "one result per subtask, in order");
            assert_eq!(r.stdout, format!("{i}\n").into_bytes());
            hosts.insert(r.index, r.host.clone());
        }
        hosts
    }
}

pub(super) fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

#[derive(Default)]
struct FakeState {
    load: f64,
    running: Vec<(AttemptRef, Instant)>,
    received: Vec<AttemptRef>,
    withdrawn: Vec<AttemptRef>,
    reported: Vec<Completion>,
    acks: Vec<CompletionAck>,
    /// Heartbeats sent, and the most attempts ever held at once.
    heartbeats: u32,
    max_running: usize,
    /// Attempts the controller told it to stop with a push.
    stopped: Vec<AttemptRef>,
}

struct Fake {
    name: String,
    slots: u32,
    run: Duration,
    ctl_url: String,
    url: String,
    client: reqwest::Client,
    heartbeating: AtomicBool,
    working: AtomicBool,
    /// Whether it serves `POST /v1/subtasks/stop` (404 otherwise).
    stop_route: AtomicBool,
    st: Mutex<FakeState>,
}

impl Fake {
    async fn start(ctl: &Ctl, name: &str, slots: u32, run_ms: u64) -> Arc<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(Fake {
            name: name.to_owned(),
            slots,
            run: Duration::from_millis(run_ms),
            ctl_url: ctl.url.clone(),
            url: format!("http://{}", listener.local_addr().unwrap()),
            client: reqwest::Client::new(),
            heartbeating: AtomicBool::new(true),
            working: AtomicBool::new(true),
            stop_route: AtomicBool::new(true),
            st: Mutex::new(FakeState::default()),
        });
        let f = fake.clone();
        let app = Router::new().route(
            "/v1/subtasks",
            post(move |headers: HeaderMap, body: Bytes| {
                let f = f.clone();
                async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if auth != Some(&format!("Bearer {TOKEN}")) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    let Ok(batch) = rmp_serde::from_slice::<AssignBatch>(&body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut st = f.st.lock().unwrap();
                    for a in batch.assignments {
                        assert_eq!(a.argv, vec!["echo".to_owned(), a.attempt.index.to_string()]);
                        st.received.push(a.attempt.clone());
                        st.running.push((a.attempt, Instant::now()));
                    }
                    st.max_running = st.max_running.max(st.running.len());
                    StatusCode::OK
                }
            }),
        );
        let f = fake.clone();
        let app = app.route(
            "/v1/subtasks/stop",
            post(move |headers: HeaderMap, body: Bytes| {
                let f = f.clone();
                async move {
                    if !f.stop_route.load(Ordering::SeqCst) {
                        return StatusCode::NOT_FOUND;
                    }
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if auth != Some(&format!("Bearer {TOKEN}")) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    let Ok(stop) = rmp_serde::from_slice::<StopBatch>(&body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut st = f.st.lock().unwrap();
                    for a in stop.attempts {
                        st.running.retain(|(r, _)| *r != a);
                        st.stopped.push(a);
                    }
                    StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        fake.register().await;
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                if f.heartbeating.load(Ordering::SeqCst) {
                    f.heartbeat().await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                if f.working.load(Ordering::SeqCst) {
                    f.finish_due().await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        fake
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.ctl_url))
            .header("content-type", MSGPACK)
            .bearer_auth(TOKEN)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn register(&self) {
        let r = self
            .post(
                "/v1/agents/register",
                enc(&Register {
                    images: Vec::new(),
                    migrate_in: false,
                    transfer_url: None,
                    tunnel: None,
                    p2p: false,
                    host: self.name.clone(),
                    version: "test".into(),
                    agent_url: Some(self.url.clone()),
                    slots: self.slots,
                }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let reg: Registered = rmp_serde::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(reg.host, self.name);
    }

    async fn heartbeat(&self) {
        let hb = {
            let st = self.st.lock().unwrap();
            Heartbeat {
                tunnel: None,
                steals: Vec::new(),
                host: self.name.clone(),
                load: st.load,
                dominant: Some(sparegrid_proto::Metric::Cpu),
                breakdown: [(sparegrid_proto::Metric::Cpu, st.load)].into(),
                free_slots: self.slots.saturating_sub(st.running.len() as u32),
                running: st.running.iter().map(|(a, _)| a.clone()).collect(),
                vms: BTreeMap::new(),
                suspended_ms: 0,
                renew: Vec::new(),
            }
        };
        let r = self.post("/v1/agents/heartbeat", enc(&hb)).await;
        self.st.lock().unwrap().heartbeats += 1;
        if r.status() == StatusCode::CONFLICT {
            self.register().await;
            return;
        }
        assert_eq!(r.status(), StatusCode::OK);
        let reply: HeartbeatReply = rmp_serde::from_slice(&r.bytes().await.unwrap()).unwrap();
        let mut st = self.st.lock().unwrap();
        for w in reply.withdraw {
            st.running.retain(|(a, _)| *a != w);
            st.withdrawn.push(w);
        }
    }

    fn completion(&self, attempt: AttemptRef, stdout: &str) -> Completion {
        Completion {
            stdout_data: None,
            attempt,
            host: self.name.clone(),
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
            stdout_size: stdout.len() as u64,
            stderr_size: 0,
            duration_ms: 1,
        }
    }

    async fn finish_due(&self) {
        let due: Vec<Completion> = {
            let mut st = self.st.lock().unwrap();
            let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.running)
                .into_iter()
                .partition(|(_, t)| t.elapsed() >= self.run);
            st.running = keep;
            due.into_iter()
                .map(|(a, _)| {
                    let out = format!("{}\n", a.index);
                    self.completion(a, &out)
                })
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let reply = self.complete(&due).await;
        let mut st = self.st.lock().unwrap();
        st.reported.extend(due);
        st.acks.extend(reply.results);
    }

    async fn complete(&self, reports: &[Completion]) -> CompletionsReply {
        let r = self.post("/v1/agents/completions", enc(&reports)).await;
        assert_eq!(r.status(), StatusCode::OK);
        rmp_serde::from_slice(&r.bytes().await.unwrap()).unwrap()
    }

    fn accepted(&self) -> usize {
        let st = self.st.lock().unwrap();
        st.acks.iter().filter(|a| a.result == Ack::Accepted).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_finish_a_job_and_an_overloaded_one_hands_its_work_back() {
    let ctl = controller().await;
    let a = Fake::start(&ctl, "host-a", 4, 40).await;
    let b = Fake::start(&ctl, "host-b", 4, 40).await;
    let c = Fake::start(&ctl, "host-c", 4, 40).await;
    let job = ctl.submit_range(100).await;

    // Midway, host-a holds work: freeze it and raise its load.
    ctl.wait_for("20 done and host-a busy", 20, |ctl| {
        ctl.done(&job) >= 20 && !a.st.lock().unwrap().running.is_empty()
    })
    .await;
    a.working.store(false, Ordering::SeqCst);
    a.st.lock().unwrap().load = 0.95;
    ctl.wait_for("host-a told to stop all its attempts", 10, |_| {
        let st = a.st.lock().unwrap();
        !st.withdrawn.is_empty() && st.running.is_empty()
    })
    .await;
    let received_then = a.st.lock().unwrap().received.len();
    let withdrawn = a.st.lock().unwrap().withdrawn.clone();

    ctl.wait_for("the job to finish", 30, |ctl| {
        ctl.store.get_job(&job).unwrap().state.is_terminal()
    })
    .await;
    let hosts = ctl.check_results(&job, 100);
    // A heartbeat reply also tells host-a to stop attempts that it listed
    // as running but whose completion overtook the heartbeat (they are no
    // longer current): those succeeded on host-a before the withdrawal and
    // count once. Every other attempt it was told to stop was withdrawn in
    // the store and its subtask finished elsewhere.
    let mut taken_back = 0;
    for w in &withdrawn {
        let attempts = ctl.store.attempts(&job, w.index).unwrap();
        let this = attempts
            .iter()
            .find(|t| t.attempt == w.epoch)
            .unwrap_or_else(|| panic!("no attempt {w:?} in {attempts:?}"));
        match this.state {
            AttemptState::Succeeded => assert_eq!(hosts[&w.index], "host-a", "{w:?}"),
            AttemptState::Withdrawn => {
                taken_back += 1;
                assert_ne!(
                    hosts[&w.index], "host-a",
                    "withdrawn {w:?} finished elsewhere"
                );
            }
            other => panic!("{w:?} told to stop is {other:?}: {attempts:?}"),
        }
    }
    assert!(
        taken_back > 0,
        "host-a held work that was withdrawn: {withdrawn:?}"
    );
    assert_eq!(
        a.st.lock().unwrap().received.len(),
        received_then,
        "no new work for host-a"
    );
    assert!(a.st.lock().unwrap().running.is_empty());
    // The store counts a completion before its reply reaches the fake, so
    // the fakes' tallies may trail the job's end by a moment.
    ctl.wait_for("every acceptance to reach its fake", 10, |_| {
        a.accepted() + b.accepted() + c.accepted() >= 100
    })
    .await;
    assert_eq!(a.accepted() + b.accepted() + c.accepted(), 100);
    assert!(b.accepted() > 0 && c.accepted() > 0);

    // The users' view shows host-a out of the set with its load.
    let v: Value = ctl
        .client
        .get(format!("{}/v1/hosts", ctl.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{v}");
    let ha = hosts.iter().find(|h| h["id"] == "host-a").unwrap();
    assert_eq!(ha["membership"], "out", "{ha}");
    assert_eq!(ha["load"], 0.95, "{ha}");
    assert_eq!(ha["dominant"], "cpu", "{ha}");
    assert_eq!(ha["eligible"], false, "{ha}");
    assert_eq!(ha["state"], "active", "{ha}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_agent_is_lost_its_work_redone_and_late_reports_change_nothing() {
    let ctl = controller().await;
    let a = Fake::start(&ctl, "host-a", 4, 20).await;
    let b = Fake::start(&ctl, "host-b", 4, 20).await;
    let c = Fake::start(&ctl, "host-c", 4, 20).await;
    // host-c takes work and never finishes it, then falls silent.
    c.working.store(false, Ordering::SeqCst);
    let job = ctl.submit_range(100).await;
    ctl.wait_for("host-c to get work", 10, |_| {
        !c.st.lock().unwrap().received.is_empty()
    })
    .await;
    c.heartbeating.store(false, Ordering::SeqCst);
    ctl.wait_for("the job to finish", 30, |ctl| {
        ctl.store.get_job(&job).unwrap().state.is_terminal()
    })
    .await;
    let hosts = ctl.check_results(&job, 100);
    assert!(hosts.values().all(|h| h != "host-c"));
    let lost = ctl.store.list_hosts().unwrap();
    let hc = lost.iter().find(|h| h.id == "host-c").unwrap();
    assert_eq!(hc.state, crate::store::HostState::Lost);

    // host-c wakes up and reports what it held. Those subtasks are done by
    // now, so the store calls the reports duplicates (a report of a
    // withdrawn attempt of a subtask not yet done is stale; see the failed
    // push test). Either way nothing changes.
    let late: Vec<Completion> = {
        let st = c.st.lock().unwrap();
        st.running
            .iter()
            .map(|(a, _)| c.completion(a.clone(), "late\n"))
            .collect()
    };
    assert!(!late.is_empty());
    let reply = c.complete(&late).await;
    assert_eq!(
        (reply.stale + reply.duplicate) as usize,
        late.len(),
        "{reply:?}"
    );
    assert_eq!(reply.accepted + reply.rejected, 0);

    // host-b repeats a report it already made: duplicate, nothing changes.
    let again: Vec<Completion> = {
        let st = b.st.lock().unwrap();
        st.reported
            .iter()
            .take(2)
            .map(|r| b.completion(r.attempt.clone(), "changed\n"))
            .collect()
    };
    let reply = b.complete(&again).await;
    assert_eq!(reply.duplicate, 2, "{reply:?}");
    assert_eq!(reply.accepted + reply.stale + reply.rejected, 0);

    // An unknown job is rejected on its own, naming it.
    let bogus = b.completion(
        AttemptRef {
            job: "j-999".into(),
            index: 0,
            epoch: 1,
        },
        "",
    );
    let reply = b.complete(&[bogus]).await;
    assert_eq!(reply.rejected, 1);
    assert!(reply.results[0].error.as_deref().unwrap().contains("j-999"));

    ctl.check_results(&job, 100);
    assert_eq!(a.accepted() + b.accepted(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_media_type_and_garbage_bodies_are_refused() {
    let ctl = controller().await;
    let reg = enc(&Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: None,
        p2p: false,
        host: "h1".into(),
        version: "t".into(),
        agent_url: None,
        slots: 1,
    });
    for path in [
        "/v1/agents/register",
        "/v1/agents/heartbeat",
        "/v1/agents/completions",
    ] {
        for token in [None, Some("wrong-token-xyz")] {
            let (status, body) = ctl.post_mp(path, token, reg.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], "unauthorized", "{v}");
        }
    }

    let garbage = b"\x93\xc1\xff\x00".to_vec();
    let (status, body) = ctl
        .post_mp("/v1/agents/register", Some(TOKEN), garbage.clone())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "malformed_msgpack", "{v}");
    let rmp_text = rmp_serde::from_slice::<Register>(&garbage)
        .unwrap_err()
        .to_string();
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("MessagePack Register"), "{message}");
    assert!(message.contains(&rmp_text), "{message} / {rmp_text}");

    let (status, body) = ctl
        .post_mp("/v1/agents/completions", Some(TOKEN), b"".to_vec())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("Vec<Completion>"),
        "{v}"
    );

    let r = ctl
        .client
        .post(format!("{}/v1/agents/register", ctl.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let big = vec![0x90u8; 128 * 1024];
    let (status, _) = ctl
        .post_mp("/v1/agents/completions", Some(TOKEN), big)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // A heartbeat before registering: register first.
    let hb = enc(&Heartbeat {
        tunnel: None,
        steals: Vec::new(),
        host: "h1".into(),
        load: 0.1,
        dominant: None,
        breakdown: BTreeMap::new(),
        free_slots: 1,
        running: Vec::new(),
        vms: BTreeMap::new(),
        suspended_ms: 0,
        renew: Vec::new(),
    });
    let (status, body) = ctl
        .post_mp("/v1/agents/heartbeat", Some(TOKEN), hb.clone())
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "must_register", "{v}");

    // A bad host name names its field.
    let bad = enc(&Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: None,
        p2p: false,
        host: "no spaces".into(),
        version: "t".into(),
        agent_url: None,
        slots: 1,
    });
    let (status, body) = ctl.post_mp("/v1/agents/register", Some(TOKEN), bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["field"], "host", "{v}");

    let (status, _) = ctl.post_mp("/v1/agents/register", Some(TOKEN), reg).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = ctl.post_mp("/v1/agents/heartbeat", Some(TOKEN), hb).await;
    assert_eq!(status, StatusCode::OK);
    let reply: HeartbeatReply = rmp_serde::from_slice(&body).unwrap();
    assert!(reply.withdraw.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_push_puts_the_work_back_in_the_queue() {
    let ctl = controller().await;
    // An agent URL nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let reg = enc(&Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: None,
        p2p: false,
        host: "h-dead".into(),
        version: "t".into(),
        agent_url: Some(dead_url),
        slots: 2,
    });
    let (status, _) = ctl.post_mp("/v1/agents/register", Some(TOKEN), reg).await;
    assert_eq!(status, StatusCode::OK);
    let hb = enc(&Heartbeat {
        tunnel: None,
        steals: Vec::new(),
        host: "h-dead".into(),
        load: 0.1,
        dominant: None,
        breakdown: BTreeMap::new(),
        free_slots: 2,
        running: Vec::new(),
        vms: BTreeMap::new(),
        suspended_ms: 0,
        renew: Vec::new(),
    });
    let (status, _) = ctl.post_mp("/v1/agents/heartbeat", Some(TOKEN), hb).await;
    assert_eq!(status, StatusCode::OK);
    let job = ctl.submit_range(3).await;
    ctl.wait_for("a withdrawn attempt", 10, |ctl| {
        ctl.store
            .attempts(&job, 0)
            .unwrap()
            .iter()
            .any(|t| t.state == AttemptState::Withdrawn)
    })
    .await;
    ctl.wait_for("everything queued again", 10, |ctl| {
        let counts = ctl.store.get_job(&job).unwrap().counts;
        counts.queued == 3 && counts.assigned == 0
    })
    .await;
    // Skipped until its next heartbeat: nothing is claimed meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ctl.store.attempts(&job, 0).unwrap().len(), 1);
    // A report of the withdrawn attempt is stale and changes nothing.
    let report = Completion {
        stdout_data: None,
        attempt: AttemptRef {
            job: job.0.clone(),
            index: 0,
            epoch: 1,
        },
        host: "h-dead".into(),
        exit_code: Some(0),
        signal: None,
        error: None,
        stdout: b"0\n".to_vec(),
        stderr: Vec::new(),
        stdout_size: 2,
        stderr_size: 0,
        duration_ms: 1,
    };
    let (status, body) = ctl
        .post_mp("/v1/agents/completions", Some(TOKEN), enc(&vec![report]))
        .await;
    assert_eq!(status, StatusCode::OK);
    let reply: CompletionsReply = rmp_serde::from_slice(&body).unwrap();
    assert_eq!(reply.stale, 1, "{reply:?}");
    assert_eq!(ctl.store.get_job(&job).unwrap().counts.queued, 3);
}

/// Free slots refill from completions: a 1-slot host that heartbeats once
/// runs a whole job, one subtask at a time, with no heartbeat in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_frees_the_slot_without_waiting_for_a_heartbeat() {
    let ctl = controller_with(|c| {
        c.registry.heartbeat_interval = Duration::from_secs(30);
        c.registry.host_timeout = Duration::from_secs(60);
    })
    .await;
    let a = Fake::start(&ctl, "host-a", 1, 5).await;
    ctl.wait_for("host-a's first heartbeat", 10, |_| {
        a.st.lock().unwrap().heartbeats >= 1
    })
    .await;
    a.heartbeating.store(false, Ordering::SeqCst);
    // Let a heartbeat that was already on its way land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let beats = a.st.lock().unwrap().heartbeats;

    let job = ctl.submit_range(6).await;
    ctl.wait_for("the job to finish", 30, |ctl| {
        ctl.store.get_job(&job).unwrap().state.is_terminal()
    })
    .await;
    let hosts = ctl.check_results(&job, 6);
    assert!(hosts.values().all(|h| h == "host-a"));
    let st = a.st.lock().unwrap();
    assert_eq!(st.heartbeats, beats, "no heartbeat while the job ran");
    assert_eq!(st.received.len(), 6, "each subtask pushed once");
    assert_eq!(st.max_running, 1, "never more than its one slot");
}

/// Cancelling a job pushes a stop to the hosts running it at once; a host
/// the push cannot reach learns it from its next heartbeat reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_pushes_a_stop_and_the_heartbeat_reply_is_the_fallback() {
    let ctl = controller_with(|c| {
        c.registry.heartbeat_interval = Duration::from_secs(30);
        c.registry.host_timeout = Duration::from_secs(60);
    })
    .await;
    let a = Fake::start(&ctl, "host-a", 2, 0).await;
    a.working.store(false, Ordering::SeqCst);
    ctl.wait_for("host-a's first heartbeat", 10, |_| {
        a.st.lock().unwrap().heartbeats >= 1
    })
    .await;
    a.heartbeating.store(false, Ordering::SeqCst);
    let job = ctl.submit_range(2).await;
    ctl.wait_for("both pushed", 10, |_| {
        a.st.lock().unwrap().received.len() == 2
    })
    .await;
    let cancel = |job: JobId| {
        let ctl = &ctl;
        async move {
            let r = ctl
                .client
                .delete(format!("{}/v1/jobs/{}", ctl.url, job.0))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let v: Value = r.json().await.unwrap();
            v
        }
    };
    let v = cancel(job.clone()).await;
    assert_eq!(v["stopping"], 2, "{v}");
    // No heartbeat in between (30 s apart and switched off): the push did it.
    ctl.wait_for("the stop push", 10, |_| {
        a.st.lock().unwrap().stopped.len() == 2
    })
    .await;
    {
        let st = a.st.lock().unwrap();
        let mut stopped = st.stopped.clone();
        stopped.sort_by_key(|x| x.index);
        assert_eq!(stopped, st.received);
        assert!(st.running.is_empty());
        assert!(st.withdrawn.is_empty());
    }

    // A host whose stop route fails: the heartbeat reply withdraws them.
    // host-a leaves the set first, so host-b gets the work.
    a.st.lock().unwrap().load = 0.9;
    let beats = a.st.lock().unwrap().heartbeats;
    a.heartbeating.store(true, Ordering::SeqCst);
    ctl.wait_for("host-a to report its load", 10, |_| {
        a.st.lock().unwrap().heartbeats >= beats + 2
    })
    .await;
    let b = Fake::start(&ctl, "host-b", 2, 0).await;
    b.working.store(false, Ordering::SeqCst);
    b.stop_route.store(false, Ordering::SeqCst);
    ctl.wait_for("host-b's first heartbeat", 10, |_| {
        b.st.lock().unwrap().heartbeats >= 1
    })
    .await;
    let job = ctl.submit_range(2).await;
    ctl.wait_for("host-b to get work", 10, |_| {
        !b.st.lock().unwrap().received.is_empty()
    })
    .await;
    b.heartbeating.store(false, Ordering::SeqCst);
    let held = b.st.lock().unwrap().running.len();
    cancel(job).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.st.lock().unwrap().withdrawn.len(), 0);
    b.heartbeat().await;
    let st = b.st.lock().unwrap();
    assert!(st.stopped.is_empty());
    assert_eq!(st.withdrawn.len(), held, "{:?}", st.withdrawn);
    assert!(st.running.is_empty());
}
