//! Tests of the grid client and runner against an in-process fake
//! controller (axum on 127.0.0.1:0) that records what the agent sends.
//! Subtasks run without a cgroup, so any user can run these.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::subtask::Executor;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use sparegrid_proto::grid::{
    AssignBatch, Assignment, AttemptRef, Completion, Heartbeat, HeartbeatReply, Register,
    Registered, Release, Released, StopBatch,
};
use sparegrid_proto::{AgentStatus, GridVmStatus, LoadBreakdown, Metric, MetricReading, VmState};

use super::*;
use crate::subtask::Limits;

#[derive(Default)]
struct Fake {
    registers: Vec<Register>,
    heartbeats: Vec<Heartbeat>,
    completions: Vec<Completion>,
    /// Answer the next heartbeat with 409 must_register.
    forget_host: bool,
    /// Attempts to withdraw in the next heartbeat reply.
    withdraw: Vec<AttemptRef>,
    /// Answer completions with 503 this many more times.
    fail_completions: u32,
    releases: Vec<Release>,
    /// `Registered.overlay` to answer with.
    lease: Option<sparegrid_proto::overlay::OverlayLease>,
    /// `HeartbeatReply.overlay_peers` to answer with.
    overlay_peers: Option<sparegrid_proto::overlay::OverlayPeers>,
}

type FakeState = Arc<Mutex<Fake>>;

fn mp<T: serde::Serialize>(v: &T) -> Response {
    (StatusCode::OK, rmp_serde::to_vec_named(v).unwrap()).into_response()
}

async fn fake_register(State(s): State<FakeState>, body: Bytes) -> Response {
    let r: Register = rmp_serde::from_slice(&body).unwrap();
    let host = r.host.clone();
    let mut f = s.lock().unwrap();
    f.registers.push(r);
    mp(&Registered {
        overlay: f.lease.clone(),
        host,
        heartbeat_ms: 50,
    })
}

async fn fake_heartbeat(State(s): State<FakeState>, body: Bytes) -> Response {
    let hb: Heartbeat = rmp_serde::from_slice(&body).unwrap();
    let mut f = s.lock().unwrap();
    if std::mem::take(&mut f.forget_host) {
        return (
            StatusCode::CONFLICT,
            r#"{"code":"must_register","message":"who?"}"#,
        )
            .into_response();
    }
    f.heartbeats.push(hb);
    let withdraw = std::mem::take(&mut f.withdraw);
    mp(&HeartbeatReply {
        overlay_peers: f.overlay_peers.clone(),
        peers: Vec::new(),
        withdraw,
        lost: Vec::new(),
    })
}

async fn fake_completions(State(s): State<FakeState>, body: Bytes) -> Response {
    let c: Vec<Completion> = rmp_serde::from_slice(&body).unwrap();
    let mut f = s.lock().unwrap();
    if f.fail_completions > 0 {
        f.fail_completions -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    f.completions.extend(c);
    mp(&serde_json::json!({"results": []}))
}

/// Serves `app` on 127.0.0.1:0 from a background thread; returns its URL.
fn serve(app: Router) -> String {
    serve_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), app)
}

pub(crate) fn serve_on(listener: std::net::TcpListener, app: Router) -> String {
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    url
}

async fn fake_release(State(s): State<FakeState>, body: Bytes) -> Response {
    let r: Release = rmp_serde::from_slice(&body).unwrap();
    let requeued = r.attempts.len() as u32;
    s.lock().unwrap().releases.push(r);
    mp(&Released { requeued })
}

fn fake_controller() -> (String, FakeState) {
    let state = FakeState::default();
    let app = Router::new()
        .route("/v1/agents/register", post(fake_register))
        .route("/v1/agents/heartbeat", post(fake_heartbeat))
        .route("/v1/agents/completions", post(fake_completions))
        .route("/v1/agents/release", post(fake_release))
        .with_state(state.clone());
    (serve(app), state)
}

pub(super) fn status(load: f64, vms: &[VmState]) -> AgentStatus {
    AgentStatus {
        grid_net: None,
        tunnel: None,
        version: "0".into(),
        host: "h1".into(),
        runtime: "process".into(),
        draining: false,
        load: Some(LoadBreakdown {
            instant: load,
            smoothed: load,
            peak: load,
            dominant: Some(Metric::Cpu),
            combine: "max".into(),
            metrics: vec![
                MetricReading {
                    metric: Metric::Cpu,
                    raw: load,
                    grid: 0.0,
                    normalised: load,
                    weight: 1.0,
                    available: true,
                },
                MetricReading {
                    metric: Metric::Rtt,
                    raw: 0.0,
                    grid: 0.0,
                    normalised: 0.0,
                    weight: 1.0,
                    available: false,
                },
            ],
            mem_available_bytes: 1 << 30,
        }),
        vms: vms
            .iter()
            .enumerate()
            .map(|(i, s)| GridVmStatus {
                name: format!("sg-{i}"),
                state: *s,
                in_state_ms: 1234,
                vcpus: 1,
                memory_mib: 256,
                cpu_time_ns: 0,
                guest: None,
                subtask: None,
            })
            .collect(),
        transitions: Vec::new(),
    }
}

fn sh(job: &str, index: u64, script: &str) -> Assignment {
    Assignment {
        network: sparegrid_proto::Network::None,
        attempt: AttemptRef {
            job: job.into(),
            index,
            epoch: 1,
        },
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout_ms: 60_000,
        vcpus: 1,
        memory_mib: 64,
    }
}

pub(super) fn config_for(url: &str, token: &str, slots: u32) -> Config {
    let mut cfg = Config::default();
    cfg.controller.url = url.into();
    cfg.controller.token = token.into();
    cfg.controller.slots = slots;
    cfg.agent.listen = "127.0.0.1:0".parse().unwrap();
    // Push only: a p2p node would open its queue in the default data_dir
    // (p2p has its own tests, peer::node and tests/tests/p2p_agents.rs).
    cfg.peers.enabled = false;
    cfg
}

pub(super) fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post_batch(url: &str, token: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let mut req = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/subtasks"))
        .header("content-type", "application/msgpack")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().unwrap();
    (resp.status().as_u16(), resp.text().unwrap())
}

fn batch(a: Vec<Assignment>) -> Vec<u8> {
    rmp_serde::to_vec_named(&AssignBatch { assignments: a }).unwrap()
}

#[test]
fn registers_heartbeats_runs_pushed_subtasks_and_reports_them() {
    let (ctl, fake) = fake_controller();
    fake.lock().unwrap().fail_completions = 2;
    let shared = Arc::new(Shared::new(status(0.1, &[VmState::Running])));
    let cfg = config_for(&ctl, "tok", 4);
    let grid = Grid::start(
        &cfg,
        "h1",
        Executor::new(None, "h1", Limits::default()),
        shared,
    )
    .unwrap();
    let agent = serve(grid.routes());

    wait_until("a heartbeat", Duration::from_secs(10), || {
        !fake.lock().unwrap().heartbeats.is_empty()
    });
    // The controller forgets the host: the agent registers again.
    fake.lock().unwrap().forget_host = true;
    wait_until("a second register", Duration::from_secs(10), || {
        fake.lock().unwrap().registers.len() >= 2
    });
    {
        let f = fake.lock().unwrap();
        let r = &f.registers[0];
        assert_eq!(r.host, "h1");
        assert_eq!(r.slots, 4);
        assert_eq!(r.agent_url.as_deref(), Some("http://127.0.0.1:0"));
        let hb = &f.heartbeats[0];
        assert_eq!(hb.free_slots, 4);
        assert_eq!(hb.load, 0.1);
        assert_eq!(hb.dominant, Some(Metric::Cpu));
        // Only available metrics, normalised.
        assert_eq!(hb.breakdown, [(Metric::Cpu, 0.1)].into());
        assert_eq!(hb.vms, [(VmState::Running, 1)].into());
        assert_eq!(hb.suspended_ms, 0);
    }

    let jobs: Vec<Assignment> = (0..3)
        .map(|i| sh("j1", i, "echo out-$SPAREGRID_INDEX; exit $SPAREGRID_INDEX"))
        .collect();
    assert_eq!(post_batch(&agent, None, batch(jobs.clone())).0, 401);
    assert_eq!(post_batch(&agent, Some("nope"), batch(jobs.clone())).0, 401);
    let (code, body) = post_batch(&agent, Some("tok"), b"\xc1garbage".to_vec());
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("malformed_msgpack"), "{body}");
    let (code, body) = post_batch(&agent, Some("tok"), batch(jobs.clone()));
    assert_eq!(code, 202, "{body}");
    // A repeated push is ignored.
    let (code, body) = post_batch(&agent, Some("tok"), batch(jobs[..1].to_vec()));
    assert_eq!((code, body.as_str()), (202, r#"{"accepted":0}"#));

    // The first two completion posts fail with 503: they are retried.
    wait_until("3 completions", Duration::from_secs(20), || {
        fake.lock().unwrap().completions.len() >= 3
    });
    let mut done = fake.lock().unwrap().completions.clone();
    done.sort_by_key(|c| c.attempt.index);
    assert_eq!(done.len(), 3, "each reported once");
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.attempt.index, i as u64);
        assert_eq!(c.host, "h1");
        assert_eq!(c.exit_code, Some(i as i32));
        assert_eq!(c.stdout, format!("out-{i}\n").into_bytes());
    }
    grid.stop();
}

#[test]
fn withdrawn_attempts_are_killed_and_not_reported() {
    let (ctl, fake) = fake_controller();
    let shared = Arc::new(Shared::new(status(0.0, &[])));
    let grid = Grid::start(
        &config_for(&ctl, "", 2),
        "h2",
        Executor::new(None, "h2", Limits::default()),
        shared,
    )
    .unwrap();
    let a = sh("j2", 0, "sleep 30");
    grid.runner()
        .submit(vec![a.clone(), sh("j2", 1, "echo ok")]);
    wait_until(
        "the attempt in a heartbeat",
        Duration::from_secs(10),
        || {
            fake.lock()
                .unwrap()
                .heartbeats
                .iter()
                .any(|h| h.running.contains(&a.attempt) && h.free_slots < 2)
        },
    );
    fake.lock().unwrap().withdraw = vec![a.attempt.clone()];
    wait_until("the withdrawal", Duration::from_secs(10), || {
        grid.runner().attempts().is_empty()
    });
    wait_until("the other completion", Duration::from_secs(10), || {
        !fake.lock().unwrap().completions.is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    let f = fake.lock().unwrap();
    assert_eq!(f.completions.len(), 1);
    assert_eq!(f.completions[0].attempt.index, 1);
    drop(f);
    grid.stop();
}

#[test]
fn suspend_decision_follows_vms_and_load_with_hysteresis_and_resume_after() {
    let p = PolicySection::default(); // above 0.75, below 0.5 for 30 s
    let at = Duration::from_secs;
    let mut g = SuspendGate::default();
    assert!(!g.decide(&status(0.1, &[]), &p, at(0)));
    assert!(
        !g.decide(&status(0.6, &[]), &p, at(1)),
        "the band alone never suspends"
    );
    assert!(g.decide(&status(0.8, &[]), &p, at(2)));
    // Calm, but not for resume_after yet.
    assert!(g.decide(&status(0.1, &[]), &p, at(3)));
    assert!(g.decide(&status(0.1, &[]), &p, at(32)));
    // A wobble into the band restarts the clock.
    assert!(g.decide(&status(0.6, &[]), &p, at(33)));
    assert!(g.decide(&status(0.4, &[]), &p, at(34)));
    assert!(g.decide(&status(0.4, &[]), &p, at(63)));
    // At resume_below is not below it (as the VM policy).
    let mut edge = SuspendGate::default();
    edge.decide(&status(0.9, &[]), &p, at(0));
    assert!(edge.decide(&status(0.5, &[]), &p, at(100)));
    assert!(edge.decide(&status(0.5, &[]), &p, at(200)));
    // Below for the whole resume_after: resumed.
    assert!(!g.decide(&status(0.4, &[]), &p, at(64)));
    assert!(!g.suspended());
    // A suspended grid VM suspends at once and holds the clock.
    assert!(g.decide(
        &status(0.1, &[VmState::Running, VmState::Suspended]),
        &p,
        at(70)
    ));
    assert!(g.decide(&status(0.1, &[VmState::Suspended]), &p, at(200)));
    assert!(g.decide(&status(0.1, &[]), &p, at(201)));
    assert!(!g.decide(&status(0.1, &[]), &p, at(231)));
    // The CPU-window peak suspends too, as it does for grid VMs.
    let mut spike = status(0.1, &[]);
    spike.load.as_mut().unwrap().peak = 0.9;
    assert!(g.decide(&spike, &p, at(232)));
    // No load reading counts as no load.
    let mut none = status(0.0, &[]);
    none.load = None;
    let mut fresh = SuspendGate::default();
    assert!(!fresh.decide(&none, &p, at(0)));
    // resume_after 0: resume as soon as the load is below.
    let quick = PolicySection {
        resume_after: Duration::ZERO,
        ..PolicySection::default()
    };
    let mut q = SuspendGate::default();
    assert!(q.decide(&status(0.9, &[]), &quick, at(0)));
    assert!(!q.decide(&status(0.4, &[]), &quick, at(0)));
}

#[test]
fn runner_suspends_and_resumes_its_subtasks() {
    let r = Runner::new(Executor::new(None, "h3", Limits::default()));
    r.submit(vec![sh("j3", 0, "sleep 0.3; echo done")]);
    r.tick(false);
    assert_eq!(r.attempts().len(), 1);
    r.tick(true);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(800) {
        r.tick(true);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(r.outbox_len(), 0, "a suspended subtask does not finish");
    assert!(r.suspended_ms() >= 700, "{}", r.suspended_ms());
    // Queued work does not start while suspended.
    r.submit(vec![sh("j3", 1, "echo second")]);
    r.tick(true);
    assert_eq!(r.attempts().len(), 2);
    wait_until(
        "both to finish after resuming",
        Duration::from_secs(10),
        || {
            r.tick(false);
            r.outbox_len() == 2
        },
    );
    assert_eq!(r.suspended_ms(), 0);
    let out = r.take_outbox(10);
    assert!(out.iter().all(|c| c.succeeded()), "{out:?}");
}

#[test]
fn agent_url_defaults_to_the_listener() {
    let mut cfg = Config::default();
    assert_eq!(agent_url(&cfg, "h"), "http://127.0.0.1:7410");
    cfg.agent.listen = "0.0.0.0:7411".parse().unwrap();
    assert_eq!(agent_url(&cfg, "node-7"), "http://node-7:7411");
    cfg.controller.advertise_url = "http://10.0.0.5:7410".into();
    assert_eq!(agent_url(&cfg, "node-7"), "http://10.0.0.5:7410");
}

#[test]
fn a_refused_completion_batch_is_not_retried_forever() {
    let e = ClientError::Status {
        url: "u".into(),
        status: 400,
        body: String::new(),
    };
    assert!(!e.retryable());
    let e = ClientError::Status {
        url: "u".into(),
        status: 503,
        body: String::new(),
    };
    assert!(e.retryable());
}

use sparegrid_controller::config::ControllerConfig;
use sparegrid_controller::store::{AttemptState, JobId, JobState, SqliteStore, Store};

pub(super) const REAL_TOKEN: &str = "agent-token-for-the-grid-test";
pub(super) const SUBMIT_TOKEN: &str = "submit-token-for-the-grid-test";

/// The real controller (router, dispatcher, in-memory SQLite store) on its
/// own runtime thread, with `tweak` applied to its config. Returns its URL
/// and the store.
pub(super) fn real_controller(
    tweak: impl FnOnce(&mut ControllerConfig),
) -> (String, Arc<SqliteStore>) {
    spawn_real_controller(tweak, None)
}

/// [`real_controller`], served over https with the PEM `(cert, key)` when
/// `tls` is given.
fn spawn_real_controller(
    tweak: impl FnOnce(&mut ControllerConfig),
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> (String, Arc<SqliteStore>) {
    use sparegrid_controller::api::{router, tls, AppState};
    let server = tls.map(|(cert, key)| tls::server_config(cert, key).unwrap());
    let mut config = ControllerConfig::default();
    config.registry.heartbeat_interval = Duration::from_millis(100);
    config.auth.agent_token = Some(REAL_TOKEN.to_owned());
    config.auth.submit_tokens = vec![SUBMIT_TOKEN.to_owned()];
    config.dispatch.interval = Duration::from_millis(20);
    tweak(&mut config);
    config.validate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let ctl_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let scheme = if server.is_some() { "https" } else { "http" };
    let ctl = format!("{scheme}://{}", ctl_listener.local_addr().unwrap());
    ctl_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let state = AppState::new(dyn_store, &config);
            sparegrid_controller::agents::spawn_dispatcher(state.agents.clone());
            let l = tokio::net::TcpListener::from_std(ctl_listener).unwrap();
            match server {
                Some(server) => tls::serve_tls_on(l, server, router(state), std::future::pending())
                    .await
                    .unwrap(),
                None => axum::serve(l, router(state)).await.unwrap(),
            }
        });
    });
    (ctl, store)
}

/// A grid client of the real controller at `ctl`, serving its push routes
/// on its advertised URL.
fn real_agent(ctl: &str, host: &str, slots: u32, shared: Arc<Shared>) -> Grid {
    let agent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config_for(ctl, REAL_TOKEN, slots);
    cfg.controller.advertise_url = format!("http://{}", agent_listener.local_addr().unwrap());
    let grid = Grid::start(
        &cfg,
        host,
        Executor::new(None, host, Limits::default()),
        shared,
    )
    .unwrap();
    serve_on(agent_listener, grid.routes());
    grid
}

/// Submits a range job of `n` subtasks running `argv`; returns its id.
fn submit(ctl: &str, n: u64, argv: &[&str]) -> JobId {
    let resp = reqwest::blocking::Client::new()
        .post(format!("{ctl}/v1/jobs"))
        .bearer_auth(SUBMIT_TOKEN)
        .json(&serde_json::json!({
            "name": "sweep",
            "command": {"argv": argv},
            "split": {"range": {"start": 0, "end": n, "chunk": 1}}
        }))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let v: serde_json::Value = resp.json().unwrap();
    JobId(v["id"].as_str().unwrap().to_owned())
}

/// The real controller pushes a 10-subtask range job to one agent whose
/// grid client and runner run it.
#[test]
fn a_real_controller_job_completes_through_the_runner() {
    let (ctl, store) = real_controller(|_| {});
    let grid = real_agent(&ctl, "real-1", 3, Arc::new(Shared::new(status(0.05, &[]))));
    let job = submit(&ctl, 10, &["echo", "{start}"]);
    wait_until("the job to finish", Duration::from_secs(30), || {
        store.get_job(&job).unwrap().state == JobState::Done
    });
    let record = store.get_job(&job).unwrap();
    assert_eq!(record.counts.done, 10, "{record:?}");
    let results = store.results(&job, 0, 100).unwrap();
    assert_eq!(results.len(), 10);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.index, i as u64);
        assert_eq!(r.stdout, format!("{i}\n").into_bytes());
        assert_eq!(r.host, "real-1");
    }
    grid.stop();
}

/// Cancelling a job stops its running subtasks at once: with heartbeats a
/// minute apart, only the controller's stop push can have killed them.
#[test]
fn cancelling_a_job_on_the_real_controller_kills_its_running_subtasks_at_once() {
    let (ctl, store) = real_controller(|c| {
        c.registry.heartbeat_interval = Duration::from_secs(60);
        c.registry.host_timeout = Duration::from_secs(120);
    });
    let dir = tempfile::tempdir().unwrap();
    let grid = real_agent(&ctl, "real-2", 2, Arc::new(Shared::new(status(0.05, &[]))));
    let script = sleeper(dir.path());
    let job = submit(&ctl, 2, &["sh", "-c", &script]);
    wait_until("both running", Duration::from_secs(20), || {
        pid_of(dir.path(), 0).is_some() && pid_of(dir.path(), 1).is_some()
    });
    let pids = [
        pid_of(dir.path(), 0).unwrap(),
        pid_of(dir.path(), 1).unwrap(),
    ];
    let resp = reqwest::blocking::Client::new()
        .delete(format!("{ctl}/v1/jobs/{}", job.0))
        .bearer_auth(SUBMIT_TOKEN)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: serde_json::Value = resp.json().unwrap();
    assert_eq!(v["stopping"], 2, "{v}");
    // Well under the 60 s heartbeat.
    wait_until("the agent to kill both", Duration::from_secs(20), || {
        grid.runner().attempts().is_empty() && pids.iter().all(|p| !alive(*p))
    });
    assert_eq!(store.get_job(&job).unwrap().state, JobState::Cancelled);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        grid.runner().outbox_len(),
        0,
        "stopped attempts are not reported"
    );
    grid.stop();
}

/// A drained agent hands its subtasks back: the controller requeues them
/// at once (withdrawn, not failed) and they finish after the drain.
#[test]
fn draining_on_the_real_controller_requeues_at_once_without_failures() {
    let (ctl, store) = real_controller(|c| {
        // Far away, so only the release can requeue.
        c.registry.host_timeout = Duration::from_secs(60);
    });
    let dir = tempfile::tempdir().unwrap();
    let shared = Arc::new(Shared::new(status(0.05, &[])));
    let grid = real_agent(&ctl, "real-3", 2, shared.clone());
    // The first attempt of each subtask sleeps; the second prints its index.
    let script = format!(
        "if [ -e {d}/once-$SPAREGRID_INDEX ]; then echo $SPAREGRID_INDEX; else touch {d}/once-$SPAREGRID_INDEX; {}; fi",
        sleeper(dir.path()),
        d = dir.path().display()
    );
    let job = submit(&ctl, 2, &["sh", "-c", &script]);
    wait_until("both running", Duration::from_secs(20), || {
        pid_of(dir.path(), 0).is_some() && pid_of(dir.path(), 1).is_some()
    });
    let mut draining = status(0.05, &[]);
    draining.draining = true;
    shared.publish(draining);
    wait_until("both requeued", Duration::from_secs(20), || {
        let c = store.get_job(&job).unwrap().counts;
        c.queued == 2 && c.assigned == 0
    });
    for i in 0..2 {
        let attempts = store.attempts(&job, i).unwrap();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert_eq!(attempts[0].state, AttemptState::Withdrawn, "{attempts:?}");
        let why = attempts[0].error.as_deref().unwrap_or_default();
        assert!(why.contains("draining"), "{attempts:?}");
    }
    // Nothing is pushed while the agent drains.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(store.get_job(&job).unwrap().counts.queued, 2);

    shared.publish(status(0.05, &[]));
    wait_until("the job to finish", Duration::from_secs(30), || {
        store.get_job(&job).unwrap().state == JobState::Done
    });
    let record = store.get_job(&job).unwrap();
    assert_eq!(record.counts.done, 2, "{record:?}");
    for (i, r) in store.results(&job, 0, 10).unwrap().iter().enumerate() {
        assert_eq!(r.stdout, format!("{i}\n").into_bytes());
        let attempts = store.attempts(&job, i as u64).unwrap();
        assert!(
            attempts.iter().all(|t| t.state != AttemptState::Failed),
            "a release is not a failure: {attempts:?}"
        );
    }
    grid.stop();
}

/// Stopping the agent hands its running subtask back before it exits, so
/// the controller requeues it without waiting for `host_timeout`.
#[test]
fn stopping_the_agent_requeues_its_subtask_on_the_real_controller() {
    let (ctl, store) = real_controller(|c| c.registry.host_timeout = Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let grid = real_agent(&ctl, "real-4", 1, Arc::new(Shared::new(status(0.05, &[]))));
    let script = sleeper(dir.path());
    let job = submit(&ctl, 1, &["sh", "-c", &script]);
    wait_until("it runs", Duration::from_secs(20), || {
        pid_of(dir.path(), 0).is_some()
    });
    grid.stop();
    let c = store.get_job(&job).unwrap().counts;
    assert_eq!((c.queued, c.assigned), (1, 0), "{c:?}");
    let attempts = store.attempts(&job, 0).unwrap();
    assert_eq!(attempts[0].state, AttemptState::Withdrawn, "{attempts:?}");
    assert!(!alive(pid_of(dir.path(), 0).unwrap()));
}

fn post_to(url: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let mut req = reqwest::blocking::Client::new()
        .post(format!("{url}{path}"))
        .header("content-type", "application/msgpack")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().unwrap();
    (resp.status().as_u16(), resp.text().unwrap())
}

fn stop_body(a: &[AttemptRef]) -> Vec<u8> {
    rmp_serde::to_vec_named(&StopBatch {
        attempts: a.to_vec(),
    })
    .unwrap()
}

/// A shell script that writes its pid to `dir/pid-<index>` and sleeps.
pub(super) fn sleeper(dir: &std::path::Path) -> String {
    format!(
        "echo $$ > {}/pid-$SPAREGRID_INDEX.tmp && mv {0}/pid-$SPAREGRID_INDEX.tmp {0}/pid-$SPAREGRID_INDEX; exec sleep 30",
        dir.display()
    )
}

/// The pid the [`sleeper`] of `index` wrote, once it did.
pub(super) fn pid_of(dir: &std::path::Path, index: u64) -> Option<u32> {
    std::fs::read_to_string(dir.join(format!("pid-{index}")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn start_grid(cfg: &Config, host: &str, shared: Arc<Shared>) -> (Grid, String) {
    let grid = Grid::start(
        cfg,
        host,
        Executor::new(None, host, Limits::default()),
        shared,
    )
    .unwrap();
    let url = serve(grid.routes());
    (grid, url)
}

#[test]
fn the_stop_route_kills_attempts_at_once_and_they_are_not_reported() {
    let (ctl, fake) = fake_controller();
    let dir = tempfile::tempdir().unwrap();
    let (grid, agent) = start_grid(
        &config_for(&ctl, "tok", 2),
        "h4",
        Arc::new(Shared::new(status(0.0, &[]))),
    );
    let (a, b) = (
        sh("j4", 0, &sleeper(dir.path())),
        sh("j4", 1, &sleeper(dir.path())),
    );
    let (code, _) = post_batch(&agent, Some("tok"), batch(vec![a.clone(), b.clone()]));
    assert_eq!(code, 202);
    wait_until("both running", Duration::from_secs(10), || {
        pid_of(dir.path(), 0).is_some() && pid_of(dir.path(), 1).is_some()
    });
    let (pa, pb) = (
        pid_of(dir.path(), 0).unwrap(),
        pid_of(dir.path(), 1).unwrap(),
    );

    let body = stop_body(std::slice::from_ref(&a.attempt));
    assert_eq!(
        post_to(&agent, "/v1/subtasks/stop", None, body.clone()).0,
        401
    );
    let (code, text) = post_to(&agent, "/v1/subtasks/stop", Some("tok"), b"\x93".to_vec());
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("StopBatch"), "{text}");
    let unknown = AttemptRef {
        job: "j4".into(),
        index: 9,
        epoch: 1,
    };
    let (code, text) = post_to(
        &agent,
        "/v1/subtasks/stop",
        Some("tok"),
        stop_body(&[a.attempt.clone(), unknown]),
    );
    assert_eq!((code, text.as_str()), (200, r#"{"stopped":1}"#));
    // The answer comes after the kill: the process is gone already.
    assert!(!alive(pa), "pid {pa} still alive");
    assert!(alive(pb));
    assert_eq!(grid.runner().attempts(), vec![b.attempt.clone()]);
    // A repeated push of the stopped attempt does not run it again.
    let (code, text) = post_batch(&agent, Some("tok"), batch(vec![a.clone()]));
    assert_eq!((code, text.as_str()), (202, r#"{"accepted":0}"#));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        fake.lock().unwrap().completions.is_empty(),
        "a stopped attempt is not reported"
    );
    grid.stop();
    assert!(!alive(pb));
}

#[test]
fn a_draining_agent_hands_its_subtasks_back_and_takes_no_more_until_undrained() {
    let (ctl, fake) = fake_controller();
    let dir = tempfile::tempdir().unwrap();
    let shared = Arc::new(Shared::new(status(0.0, &[])));
    let (grid, agent) = start_grid(&config_for(&ctl, "", 2), "h5", shared.clone());
    let a = sh("j5", 0, &sleeper(dir.path()));
    assert_eq!(post_batch(&agent, None, batch(vec![a.clone()])).0, 202);
    wait_until("it runs", Duration::from_secs(10), || {
        pid_of(dir.path(), 0).is_some()
    });
    let pid = pid_of(dir.path(), 0).unwrap();

    let mut draining = status(0.0, &[]);
    draining.draining = true;
    shared.publish(draining);
    wait_until("the release", Duration::from_secs(10), || {
        !fake.lock().unwrap().releases.is_empty()
    });
    {
        let f = fake.lock().unwrap();
        assert_eq!(f.releases.len(), 1);
        let r = &f.releases[0];
        assert_eq!(r.host, "h5");
        assert_eq!(r.attempts, vec![a.attempt.clone()]);
        assert!(r.reason.contains("draining"), "{r:?}");
    }
    assert!(!alive(pid));
    assert!(grid.runner().attempts().is_empty());
    let (code, text) = post_batch(&agent, None, batch(vec![sh("j5", 1, "echo one")]));
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("draining"), "{text}");
    let seen = fake.lock().unwrap().heartbeats.len();
    wait_until(
        "a heartbeat while draining",
        Duration::from_secs(10),
        || fake.lock().unwrap().heartbeats.len() > seen,
    );
    assert_eq!(
        fake.lock().unwrap().heartbeats.last().unwrap().free_slots,
        0
    );

    // The drain is lifted: work is taken again.
    shared.publish(status(0.0, &[]));
    wait_until("a push accepted again", Duration::from_secs(10), || {
        post_batch(&agent, None, batch(vec![sh("j5", 1, "echo one")])).0 == 202
    });
    wait_until("its completion", Duration::from_secs(10), || {
        !fake.lock().unwrap().completions.is_empty()
    });
    let f = fake.lock().unwrap();
    assert_eq!(f.completions.len(), 1);
    assert_eq!(f.completions[0].attempt.index, 1);
    assert_eq!(f.releases.len(), 1, "nothing more handed back");
    drop(f);
    grid.stop();
}

#[test]
fn stopping_hands_running_subtasks_back_and_flushes_unsent_completions() {
    let (ctl, fake) = fake_controller();
    let dir = tempfile::tempdir().unwrap();
    fake.lock().unwrap().fail_completions = 1000;
    let (grid, _agent) = start_grid(
        &config_for(&ctl, "", 2),
        "h6",
        Arc::new(Shared::new(status(0.0, &[]))),
    );
    let a = sh("j6", 0, &sleeper(dir.path()));
    grid.runner()
        .submit(vec![a.clone(), sh("j6", 1, "echo finished")]);
    wait_until(
        "a running and b's report refused once",
        Duration::from_secs(10),
        || pid_of(dir.path(), 0).is_some() && fake.lock().unwrap().fail_completions < 1000,
    );
    let pid = pid_of(dir.path(), 0).unwrap();
    // The controller is back; the client is in its backoff.
    fake.lock().unwrap().fail_completions = 0;
    grid.stop();
    assert!(!alive(pid));
    let f = fake.lock().unwrap();
    let released: Vec<AttemptRef> = f.releases.iter().flat_map(|r| r.attempts.clone()).collect();
    assert_eq!(released, vec![a.attempt.clone()]);
    assert!(
        f.releases[0].reason.contains("shutting down"),
        "{:?}",
        f.releases
    );
    assert_eq!(f.completions.len(), 1, "{:?}", f.completions);
    assert_eq!(f.completions[0].attempt.index, 1);
    assert_eq!(f.completions[0].stdout, b"finished\n");
}

#[test]
fn a_reload_applies_slots_token_and_url_without_losing_running_subtasks() {
    let (ctl, fake) = fake_controller();
    let (ctl2, fake2) = fake_controller();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_for(&ctl, "tok-1", 2);
    let (grid, agent) = start_grid(&cfg, "h7", Arc::new(Shared::new(status(0.0, &[]))));
    let a = sh("j7", 0, &sleeper(dir.path()));
    assert_eq!(
        post_batch(&agent, Some("tok-1"), batch(vec![a.clone()])).0,
        202
    );
    wait_until("it runs", Duration::from_secs(10), || {
        pid_of(dir.path(), 0).is_some()
    });
    let pid = pid_of(dir.path(), 0).unwrap();

    // Same settings: nothing to do.
    assert!(!grid.handle().reload(&cfg));
    // More slots and a new token: registers again, keeps running.
    let mut cfg2 = cfg.clone();
    cfg2.controller.slots = 3;
    cfg2.controller.token = "tok-2".into();
    assert!(grid.handle().reload(&cfg2));
    wait_until("a register with 3 slots", Duration::from_secs(10), || {
        // (Under load the first registration may not have arrived yet.)
        fake.lock()
            .unwrap()
            .registers
            .last()
            .is_some_and(|r| r.slots == 3)
    });
    let seen = fake.lock().unwrap().heartbeats.len();
    wait_until("a heartbeat after it", Duration::from_secs(10), || {
        fake.lock().unwrap().heartbeats.len() > seen
    });
    {
        let f = fake.lock().unwrap();
        let hb = f.heartbeats.last().unwrap();
        assert_eq!(hb.running, vec![a.attempt.clone()]);
        assert_eq!(hb.free_slots, 2);
        assert!(f.releases.is_empty());
    }
    assert!(alive(pid));
    assert_eq!(
        post_batch(&agent, Some("tok-1"), batch(vec![a.clone()])).0,
        401
    );
    let (code, text) = post_batch(&agent, Some("tok-2"), batch(vec![a.clone()]));
    assert_eq!((code, text.as_str()), (202, r#"{"accepted":0}"#));

    // Turning the client off needs a restart: refused, nothing changes.
    let mut off = cfg2.clone();
    off.controller.url = String::new();
    assert!(!grid.handle().reload(&off));

    // Another controller: the running subtask goes back to the old one.
    let mut cfg3 = cfg2.clone();
    cfg3.controller.url = ctl2.clone();
    assert!(grid.handle().reload(&cfg3));
    wait_until(
        "registered with the new controller",
        Duration::from_secs(10),
        || !fake2.lock().unwrap().heartbeats.is_empty(),
    );
    {
        let f = fake.lock().unwrap();
        let released: Vec<AttemptRef> =
            f.releases.iter().flat_map(|r| r.attempts.clone()).collect();
        assert_eq!(released, vec![a.attempt.clone()]);
        let f2 = fake2.lock().unwrap();
        assert_eq!(f2.registers[0].slots, 3);
        assert_eq!(
            f2.heartbeats[0].free_slots, 3,
            "not draining after the move"
        );
        assert!(f2.releases.is_empty());
    }
    assert!(!alive(pid));
    grid.stop();
}

/// A self-signed certificate for 127.0.0.1 in `dir`: (cert.pem, key.pem).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// The grid client joins an https controller (the real one, served with a
/// self-signed certificate) when `controller.ca_cert` names that
/// certificate, and refuses it without.
#[test]
fn the_client_joins_an_https_controller_that_its_ca_cert_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let (ctl, store) = spawn_real_controller(|_| {}, Some((&cert, &key)));

    let reg = Register {
        images: Vec::new(),
        migrate_in: false,
        transfer_url: None,
        tunnel: None,
        p2p: false,
        host: "tls-1".into(),
        version: "t".into(),
        agent_url: None,
        slots: 1,
    };
    let mut section = config_for(&ctl, REAL_TOKEN, 1).controller;
    // Without the CA the certificate is not trusted.
    let err = ControllerClient::new(&section)
        .unwrap()
        .register(&reg)
        .unwrap_err();
    assert!(matches!(err, ClientError::Http { .. }), "{err}");
    // A CA file that is not there, or holds no certificate, names the field.
    section.ca_cert = dir.path().join("missing.pem");
    let err = ControllerClient::new(&section).err().unwrap();
    assert!(err.to_string().contains("controller.ca_cert"), "{err}");
    assert!(!err.retryable());
    section.ca_cert = dir.path().join("key.pem");
    let err = ControllerClient::new(&section).err().unwrap();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");

    // With it, a whole job runs over https.
    let agent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config_for(&ctl, REAL_TOKEN, 2);
    cfg.controller.ca_cert = cert.clone();
    cfg.controller.advertise_url = format!("http://{}", agent_listener.local_addr().unwrap());
    cfg.validate().unwrap();
    let grid = Grid::start(
        &cfg,
        "tls-1",
        Executor::new(None, "tls-1", Limits::default()),
        Arc::new(Shared::new(status(0.05, &[]))),
    )
    .unwrap();
    serve_on(agent_listener, grid.routes());
    let resp = reqwest::blocking::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap()
        .post(format!("{ctl}/v1/jobs"))
        .bearer_auth(SUBMIT_TOKEN)
        .json(&serde_json::json!({
            "command": {"argv": ["echo", "{start}"]},
            "split": {"range": {"start": 0, "end": 4, "chunk": 1}}
        }))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let v: serde_json::Value = resp.json().unwrap();
    let job = JobId(v["id"].as_str().unwrap().to_owned());
    wait_until("the job to finish", Duration::from_secs(30), || {
        store.get_job(&job).unwrap().state == JobState::Done
    });
    let results = store.results(&job, 0, 10).unwrap();
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|r| r.host == "tls-1"));
    grid.stop();
}

#[test]
fn no_slots_are_offered_before_the_first_load_sample() {
    let r = Runner::new(Executor::new(None, "h4", Limits::default()));
    let mut s = status(0.1, &[]);
    assert_eq!(heartbeat("h4", &s, 3, &r).free_slots, 3);
    s.load = None;
    let hb = heartbeat("h4", &s, 3, &r);
    assert_eq!(hb.free_slots, 0, "{hb:?}");
    assert!(hb.breakdown.is_empty());
}

#[test]
fn a_push_and_an_end_wake_the_threads_instead_of_waiting_for_a_tick() {
    let r = Runner::new(Executor::new(None, "h5", Limits::default()));
    let work = r.work_seen();
    let reports = r.reports_seen();
    // A push wakes the runner thread.
    r.submit(vec![sh("j5", 0, "echo hi")]);
    assert_ne!(r.work_seen(), work, "a push bumps the work counter");
    let work = r.work_seen();
    r.tick(false);
    // The end of the subtask wakes the runner (a long timeout: the wait
    // returns on the end, not on the timeout)...
    let t = Instant::now();
    while r.work_seen() == work {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no end was signalled"
        );
        r.wait_for_work(work, Duration::from_secs(10));
    }
    assert_eq!(
        r.reports_seen(),
        reports,
        "nothing to report before the tick"
    );
    // ...and the tick that collects it wakes the client.
    wait_until("the end to be collected", Duration::from_secs(10), || {
        r.tick(false);
        r.outbox_len() == 1
    });
    assert_ne!(
        r.reports_seen(),
        reports,
        "a completion bumps the report counter"
    );
    // A repeated push is not new work.
    let work = r.work_seen();
    r.submit(vec![sh("j5", 0, "echo hi")]);
    assert_eq!(r.work_seen(), work);
}

/// With a tunnel (no root needed: the lease is refused before any device
/// is made): the registration publishes the key and port, the heartbeats
/// carry the tunnel's report, a refused lease shows in the status with
/// its field and is tried again, and a peer list that arrives before the
/// tunnel is up is kept, not reported as applied.
#[test]
fn a_tunnel_registers_its_key_and_reports_in_heartbeats() {
    use sparegrid_proto::overlay::{OverlayLease, OverlayPeer, OverlayPeers};
    let (ctl, fake) = fake_controller();
    let other = crate::tunnel::Key::generate().unwrap().public();
    {
        let mut f = fake.lock().unwrap();
        f.lease = Some(OverlayLease {
            cidr: "not a cidr".into(),
            slice: "100.96.3.0/24".into(),
            address: "100.96.3.1/24".into(),
        });
        f.overlay_peers = Some(OverlayPeers {
            version: 5,
            peers: vec![OverlayPeer {
                host: "h2".into(),
                public_key: other.to_string(),
                endpoint: Some("10.0.0.2:51820".into()),
                allowed_ips: vec!["100.96.2.0/24".into()],
            }],
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_for(&ctl, "tok", 1);
    cfg.tunnel.enabled = true;
    cfg.tunnel.public_endpoint = "203.0.113.7:51820".into();
    let tunnel = Arc::new(crate::tunnel::TunnelService::new(&cfg.tunnel, dir.path()).unwrap());
    let shared = Arc::new(Shared::new(status(0.1, &[])));
    shared.set_tunnel(tunnel.clone());
    let grid = Grid::start_with_overlay(
        &cfg,
        "h1",
        Executor::new(None, "h1", Limits::default()),
        shared.clone(),
        OverlayParts {
            tunnel: Some(tunnel.clone()),
            host_net: None,
            vm_nics: None,
        },
    )
    .unwrap();
    wait_until("three heartbeats", Duration::from_secs(10), || {
        fake.lock().unwrap().heartbeats.len() >= 3
    });
    {
        let f = fake.lock().unwrap();
        let info = f.registers[0].tunnel.as_ref().expect("Register.tunnel");
        assert_eq!(info.public_key, tunnel.public_key().to_string());
        assert_eq!(info.listen_port, 51820);
        assert_eq!(info.endpoint.as_deref(), Some("203.0.113.7:51820"));
        for hb in &f.heartbeats {
            let t = hb.tunnel.as_ref().expect("Heartbeat.tunnel");
            assert_eq!(t.peers_version, 0, "nothing applied without a tunnel");
            assert!(t.peers.is_empty());
        }
    }
    let st = shared.status().tunnel.expect("status shows the tunnel");
    assert!(!st.up);
    assert!(
        st.error
            .as_deref()
            .is_some_and(|e| e.contains("overlay.cidr")),
        "{st:?}"
    );
    assert_eq!(st.public_key, tunnel.public_key().to_string());
    let m = shared.metrics.render();
    assert!(m.contains("sparegrid_tunnel_up 0"), "{m}");
    grid.stop();
}
