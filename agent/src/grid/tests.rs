//! Tests of the grid client and runner against an in-process fake
//! controller (axum on 127.0.0.1:0) that records what the agent sends.
//! Subtasks run without a cgroup, so any user can run these.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use sparegrid_proto::grid::{
    AssignBatch, Assignment, AttemptRef, Completion, Heartbeat, HeartbeatReply, Register,
    Registered,
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
}

type FakeState = Arc<Mutex<Fake>>;

fn mp<T: serde::Serialize>(v: &T) -> Response {
    (StatusCode::OK, rmp_serde::to_vec_named(v).unwrap()).into_response()
}

async fn fake_register(State(s): State<FakeState>, body: Bytes) -> Response {
    let r: Register = rmp_serde::from_slice(&body).unwrap();
    let host = r.host.clone();
    s.lock().unwrap().registers.push(r);
    mp(&Registered {
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
    mp(&HeartbeatReply { withdraw })
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

fn serve_on(listener: std::net::TcpListener, app: Router) -> String {
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

fn fake_controller() -> (String, FakeState) {
    let state = FakeState::default();
    let app = Router::new()
        .route("/v1/agents/register", post(fake_register))
        .route("/v1/agents/heartbeat", post(fake_heartbeat))
        .route("/v1/agents/completions", post(fake_completions))
        .with_state(state.clone());
    (serve(app), state)
}

fn status(load: f64, vms: &[VmState]) -> AgentStatus {
    AgentStatus {
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
            })
            .collect(),
        transitions: Vec::new(),
    }
}

fn sh(job: &str, index: u64, script: &str) -> Assignment {
    Assignment {
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

fn config_for(url: &str, token: &str, slots: u32) -> Config {
    let mut cfg = Config::default();
    cfg.controller.url = url.into();
    cfg.controller.token = token.into();
    cfg.controller.slots = slots;
    cfg.agent.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
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
fn suspend_decision_follows_vms_and_load_with_hysteresis() {
    let p = PolicySection::default(); // suspend above 0.75, resume below 0.5
    assert!(!should_suspend(&status(0.1, &[]), &p, false));
    assert!(should_suspend(&status(0.8, &[]), &p, false));
    assert!(should_suspend(
        &status(0.1, &[VmState::Running, VmState::Suspended]),
        &p,
        false
    ));
    // Between the thresholds: stay as we are.
    assert!(should_suspend(&status(0.6, &[]), &p, true));
    assert!(!should_suspend(&status(0.6, &[]), &p, false));
    assert!(!should_suspend(&status(0.5, &[]), &p, true));
    let mut none = status(0.0, &[]);
    none.load = None;
    assert!(!should_suspend(&none, &p, false));
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

/// The real controller (router, dispatcher, in-memory SQLite store) pushes
/// a 10-subtask range job to one agent whose grid client and runner run it.
#[test]
fn a_real_controller_job_completes_through_the_runner() {
    use sparegrid_controller::api::{router, AppState};
    use sparegrid_controller::config::ControllerConfig;
    use sparegrid_controller::store::{JobId, JobState, SqliteStore, Store};

    const TOKEN: &str = "agent-token-for-the-grid-test";
    let mut config = ControllerConfig::default();
    config.registry.heartbeat_interval = Duration::from_millis(100);
    config.dispatch.agent_token = Some(TOKEN.to_owned());
    config.dispatch.interval = Duration::from_millis(20);
    config.validate().unwrap();
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let ctl_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ctl = format!("http://{}", ctl_listener.local_addr().unwrap());
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
            axum::serve(l, router(state)).await.unwrap();
        });
    });

    let agent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config_for(&ctl, TOKEN, 3);
    cfg.controller.advertise_url = format!("http://{}", agent_listener.local_addr().unwrap());
    let shared = Arc::new(Shared::new(status(0.05, &[])));
    let grid = Grid::start(
        &cfg,
        "real-1",
        Executor::new(None, "real-1", Limits::default()),
        shared,
    )
    .unwrap();
    serve_on(agent_listener, grid.routes());

    let resp = reqwest::blocking::Client::new()
        .post(format!("{ctl}/v1/jobs"))
        .json(&serde_json::json!({
            "name": "sweep",
            "command": {"argv": ["echo", "{start}"]},
            "split": {"range": {"start": 0, "end": 10, "chunk": 1}}
        }))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let v: serde_json::Value = resp.json().unwrap();
    let job = JobId(v["id"].as_str().unwrap().to_owned());

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
