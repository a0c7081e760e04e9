//! Pull mode end to end: real pulling agents ([`Grid`] with
//! `controller.dispatch = "pull"`, subtasks as host processes without a
//! cgroup) against the real controller router, dispatcher and an
//! in-memory store ([`real_controller`]). No test asserts a time:
//! deadlines only bound how long a test may hang.

use std::sync::Arc;
use std::time::Duration;

use sparegrid_controller::config::ControllerConfig;
use sparegrid_controller::store::{AttemptState, JobId, JobState, SqliteStore, Store};
use sparegrid_proto::grid::{AttemptRef, Completion};

use super::tests::{
    alive, config_for, pid_of, real_controller, sleeper, status, wait_until, REAL_TOKEN,
    SUBMIT_TOKEN,
};
use super::*;
use crate::subtask::{Executor, Limits};

const PATIENCE: Duration = Duration::from_secs(30);

/// A pulling agent of the controller at `ctl` (no routes served: a pulling
/// host cannot be reached).
fn pull_agent(ctl: &str, host: &str, slots: u32, shared: Arc<Shared>) -> Grid {
    let mut cfg = config_for(ctl, REAL_TOKEN, slots);
    cfg.controller.dispatch = AgentDispatch::Pull;
    cfg.validate().unwrap();
    Grid::start(
        &cfg,
        host,
        Executor::new(None, host, Limits::default()),
        shared,
    )
    .unwrap()
}

fn calm() -> Arc<Shared> {
    Arc::new(Shared::new(status(0.05, &[])))
}

/// Submits a range job of `n` subtasks in `mode`; returns its id.
fn submit(ctl: &str, mode: &str, n: u64, argv: &[&str], max_attempts: u32) -> JobId {
    let resp = reqwest::blocking::Client::new()
        .post(format!("{ctl}/v1/jobs"))
        .bearer_auth(SUBMIT_TOKEN)
        .json(&serde_json::json!({
            "name": "pulled",
            "command": {"argv": argv},
            "split": {"range": {"start": 0, "end": n, "chunk": 1}},
            "mode": mode,
            "max_attempts": max_attempts,
        }))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text());
    let v: serde_json::Value = resp.json().unwrap();
    JobId(v["id"].as_str().unwrap().to_owned())
}

fn job_json(ctl: &str, job: &JobId) -> serde_json::Value {
    let resp = reqwest::blocking::Client::new()
        .get(format!("{ctl}/v1/jobs/{}", job.0))
        .bearer_auth(SUBMIT_TOKEN)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().unwrap()
}

fn state_of(store: &SqliteStore, job: &JobId) -> JobState {
    store.get_job(job).unwrap().state
}

/// Every subtask of `job` (0..n) has exactly one attempt, and it
/// succeeded on a host of `hosts`; the results are the indices.
fn assert_ran_once(store: &SqliteStore, job: &JobId, n: u64, hosts: &[&str]) {
    for i in 0..n {
        let attempts = store.attempts(job, i).unwrap();
        assert_eq!(attempts.len(), 1, "subtask {i}: {attempts:?}");
        assert_eq!(attempts[0].state, AttemptState::Succeeded, "{attempts:?}");
        assert!(hosts.contains(&attempts[0].host.as_str()), "{attempts:?}");
    }
    let results = store.results(job, 0, 1000).unwrap();
    assert_eq!(results.len() as u64, n);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.stdout, format!("{i}\n").into_bytes());
    }
}

/// Two pulling agents finish a 20-subtask pull job: every subtask runs
/// exactly once. They register without a URL, and a push job submitted
/// alongside is never run by them.
#[test]
fn pulling_agents_run_a_pull_job_exactly_once_and_take_no_push_work() {
    let (ctl, store) = real_controller(|_| {});
    let a = pull_agent(&ctl, "pull-a", 3, calm());
    let b = pull_agent(&ctl, "pull-b", 2, calm());
    let pushed = submit(&ctl, "push", 2, &["echo", "{start}"], 3);
    let job = submit(&ctl, "pull", 20, &["echo", "{start}"], 3);
    wait_until("the pull job to finish", PATIENCE, || {
        state_of(&store, &job) == JobState::Done
    });
    assert_ran_once(&store, &job, 20, &["pull-a", "pull-b"]);
    let hosts = store.list_hosts().unwrap();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    for h in &hosts {
        assert_eq!(h.address, "", "a pulling agent advertises no URL: {h:?}");
    }
    // Nobody can take the push job: no agent has a URL.
    std::thread::sleep(Duration::from_millis(300));
    let c = store.get_job(&pushed).unwrap().counts;
    assert_eq!((c.queued, c.assigned), (2, 0), "{c:?}");
    a.stop();
    b.stop();
}

/// Leases shorter than the subtasks survive: renewed in each heartbeat
/// (heartbeats every 100 ms), or with `POST /v1/leases/renew` on their
/// own when the heartbeat comes less often than the lease needs (5 s
/// heartbeats, 600 ms leases). Either way each subtask has one attempt.
#[test]
fn leases_shorter_than_the_work_are_renewed_in_heartbeats_or_on_their_own() {
    for heartbeat in [Duration::from_millis(100), Duration::from_secs(5)] {
        let (ctl, store) = real_controller(|c: &mut ControllerConfig| {
            c.dispatch.lease_ttl = Duration::from_millis(600);
            c.registry.heartbeat_interval = heartbeat;
            c.registry.host_timeout = Duration::from_secs(60);
        });
        let grid = pull_agent(&ctl, "renewer", 2, calm());
        let job = submit(
            &ctl,
            "pull",
            2,
            &["sh", "-c", "sleep 2; echo $SPAREGRID_INDEX"],
            3,
        );
        wait_until("the job to finish", PATIENCE, || {
            state_of(&store, &job).is_terminal()
        });
        assert_eq!(state_of(&store, &job), JobState::Done, "{heartbeat:?}");
        assert_ran_once(&store, &job, 2, &["renewer"]);
        grid.stop();
    }
}

/// An agent that dies without a word (no release, no more renewals)
/// loses its leases when they expire; another agent runs them. The dead
/// agent's late completion is a 409 `stale_epoch` and changes nothing;
/// once the subtask is done, late and repeated reports are duplicates and
/// change nothing either.
#[test]
fn a_vanished_agents_leases_expire_and_run_elsewhere_and_late_reports_change_nothing() {
    let (ctl, store) = real_controller(|c| {
        c.dispatch.lease_ttl = Duration::from_millis(500);
        // Far away: only the lease expiry can revive the work.
        c.registry.host_timeout = Duration::from_secs(120);
    });
    let dir = tempfile::tempdir().unwrap();
    // The first attempt of each subtask sleeps; later ones wait for `go`,
    // then print the index.
    let script = format!(
        "if [ -e {d}/once-$SPAREGRID_INDEX ]; then while [ ! -e {d}/go ]; do sleep 0.05; done; echo $SPAREGRID_INDEX; else touch {d}/once-$SPAREGRID_INDEX; {}; fi",
        sleeper(dir.path()),
        d = dir.path().display()
    );
    let job = submit(&ctl, "pull", 2, &["sh", "-c", &script], 3);
    let a = pull_agent(&ctl, "vanishing", 2, calm());
    wait_until("both running on the first agent", PATIENCE, || {
        pid_of(dir.path(), 0).is_some() && pid_of(dir.path(), 1).is_some()
    });
    let mut first: Vec<AttemptRef> = a.runner().attempts();
    first.sort_by_key(|a| a.index);
    assert_eq!(first.len(), 2);
    // Gone without handing anything back (dropping stops the threads and
    // kills the subtasks; nothing is released or renewed any more).
    drop(a);
    let b = pull_agent(&ctl, "survivor", 2, calm());
    wait_until("both leased by the survivor", PATIENCE, || {
        (0..2).all(|i| {
            let t = store.attempts(&job, i).unwrap();
            t.len() == 2 && t[1].host == "survivor"
        })
    });
    for i in 0..2u64 {
        assert!(!alive(pid_of(dir.path(), i).unwrap()));
    }
    let mut cfg = config_for(&ctl, REAL_TOKEN, 1);
    cfg.controller.dispatch = AgentDispatch::Pull;
    let client = ControllerClient::new(&cfg.controller).unwrap();
    let report = |a: &AttemptRef, host: &str, out: &str| Completion {
        stdout_data: None,
        attempt: a.clone(),
        host: host.into(),
        exit_code: Some(0),
        signal: None,
        error: None,
        stdout: out.as_bytes().to_vec(),
        stderr: Vec::new(),
        stdout_size: out.len() as u64,
        stderr_size: 0,
        duration_ms: 1,
    };
    // The vanished agent's late completions while the survivor runs them:
    // 409 stale_epoch, nothing changes.
    for a in &first {
        let err = client
            .complete(&report(a, "vanishing", "late\n"), None)
            .unwrap_err();
        assert!(err.is_stale_epoch(), "{err}");
        assert_eq!(err.status(), Some(409), "{err}");
    }
    let c = store.get_job(&job).unwrap().counts;
    assert_eq!((c.assigned, c.done), (2, 0), "{c:?}");
    std::fs::write(dir.path().join("go"), b"").unwrap();
    wait_until("the job to finish elsewhere", PATIENCE, || {
        state_of(&store, &job) == JobState::Done
    });
    for i in 0..2u64 {
        let attempts = store.attempts(&job, i).unwrap();
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert_eq!(attempts[0].state, AttemptState::Withdrawn, "{attempts:?}");
        assert_eq!(attempts[0].host, "vanishing");
        assert_eq!(attempts[1].state, AttemptState::Succeeded, "{attempts:?}");
        assert_eq!(attempts[1].host, "survivor");
        assert_eq!(attempts[1].stdout, format!("{i}\n").into_bytes());
    }
    // Once done: late and repeated reports are duplicates, nothing changes.
    let before = store.results(&job, 0, 10).unwrap();
    for a in &first {
        let won = AttemptRef {
            epoch: a.epoch + 1,
            ..a.clone()
        };
        for (attempt, host) in [(a, "vanishing"), (&won, "survivor")] {
            let reply = client
                .complete(&report(attempt, host, "again\n"), None)
                .unwrap();
            assert_eq!(reply.result, "duplicate");
        }
    }
    assert_eq!(store.results(&job, 0, 10).unwrap(), before);
    let rec = store.get_job(&job).unwrap();
    assert_eq!((rec.state, rec.counts.done), (JobState::Done, 2));
    b.stop();
}

/// Cancelling a pull job: the controller cannot push a stop to a pulling
/// agent, so the heartbeat reports the leases lost; the agent kills them
/// and reports nothing.
#[test]
fn leases_the_controller_reports_lost_are_killed_and_not_reported() {
    let (ctl, store) = real_controller(|c| c.registry.host_timeout = Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let grid = pull_agent(&ctl, "loser", 2, calm());
    let job = submit(&ctl, "pull", 2, &["sh", "-c", &sleeper(dir.path())], 3);
    wait_until("both running", PATIENCE, || {
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
    wait_until("the agent to kill both", PATIENCE, || {
        grid.runner().attempts().is_empty() && pids.iter().all(|p| !alive(*p))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        grid.runner().outbox_len(),
        0,
        "lost leases are not reported"
    );
    assert_eq!(state_of(&store, &job), JobState::Cancelled);
    for i in 0..2 {
        let attempts = store.attempts(&job, i).unwrap();
        assert_eq!(attempts[0].state, AttemptState::Cancelled, "{attempts:?}");
    }
    grid.stop();
}

/// A draining pulling agent hands its leased subtasks back with the
/// release route: requeued at once, not failed, and leased again (by the
/// same agent) once the drain is lifted.
#[test]
fn a_draining_pulling_agent_hands_its_leases_back_at_once() {
    let (ctl, store) = real_controller(|c| c.registry.host_timeout = Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let shared = calm();
    let grid = pull_agent(&ctl, "drainer", 2, shared.clone());
    let script = format!(
        "if [ -e {d}/once-$SPAREGRID_INDEX ]; then echo $SPAREGRID_INDEX; else touch {d}/once-$SPAREGRID_INDEX; {}; fi",
        sleeper(dir.path()),
        d = dir.path().display()
    );
    let job = submit(&ctl, "pull", 2, &["sh", "-c", &script], 3);
    wait_until("both running", PATIENCE, || {
        pid_of(dir.path(), 0).is_some() && pid_of(dir.path(), 1).is_some()
    });
    let mut draining = status(0.05, &[]);
    draining.draining = true;
    shared.publish(draining);
    wait_until("both requeued", PATIENCE, || {
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
    shared.publish(status(0.05, &[]));
    wait_until("the job to finish", PATIENCE, || {
        state_of(&store, &job) == JobState::Done
    });
    for i in 0..2u64 {
        let attempts = store.attempts(&job, i).unwrap();
        assert!(
            attempts.iter().all(|t| t.state != AttemptState::Failed),
            "a release is not a failure: {attempts:?}"
        );
    }
    grid.stop();
}

/// A subtask that fails on every attempt is dead after `max_attempts`,
/// and `GET /v1/jobs/{id}` shows it with every attempt's error.
#[test]
fn failing_leased_subtasks_are_dead_after_max_attempts_with_their_errors_shown() {
    let (ctl, store) = real_controller(|_| {});
    let grid = pull_agent(&ctl, "failer", 2, calm());
    let job = submit(
        &ctl,
        "pull",
        2,
        &["sh", "-c", "echo boom-$SPAREGRID_INDEX >&2; exit 3"],
        3,
    );
    wait_until("the job to fail", PATIENCE, || {
        state_of(&store, &job).is_terminal()
    });
    let rec = store.get_job(&job).unwrap();
    assert_eq!(
        (rec.state, rec.counts.dead),
        (JobState::Failed, 2),
        "{rec:?}"
    );
    let v = job_json(&ctl, &job);
    let dead = v["dead_subtasks"].as_array().expect("dead_subtasks");
    assert_eq!(dead.len(), 2, "{v}");
    for (i, d) in dead.iter().enumerate() {
        assert_eq!(d["index"], i as u64, "{d}");
        let attempts = d["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 3, "{d}");
        for (n, a) in attempts.iter().enumerate() {
            assert_eq!(a["attempt"], n as u64 + 1, "{a}");
            assert_eq!(a["host"], "failer");
            assert_eq!(a["exit_code"], 3, "{a}");
            assert_eq!(a["stderr"], format!("boom-{i}\n"), "{a}");
        }
    }
    assert_eq!(v["leases"], serde_json::json!([]), "{v}");
    grid.stop();
}

/// While the controller answers lease requests with errors, the lease
/// loop backs off (0.2 s doubling) instead of asking in a tight loop.
#[test]
fn the_lease_loop_backs_off_while_the_controller_fails() {
    use axum::routing::post;
    use std::sync::atomic::{AtomicU64, Ordering};

    let leases = Arc::new(AtomicU64::new(0));
    let heartbeats = Arc::new(AtomicU64::new(0));
    let app = {
        let (leases, heartbeats) = (leases.clone(), heartbeats.clone());
        axum::Router::new()
            .route(
                "/v1/agents/register",
                post(|| async {
                    rmp_serde::to_vec_named(&sparegrid_proto::grid::Registered {
                        overlay: None,
                        host: "backoff".into(),
                        heartbeat_ms: 100,
                    })
                    .unwrap()
                }),
            )
            .route(
                "/v1/agents/heartbeat",
                post(move || async move {
                    heartbeats.fetch_add(1, Ordering::SeqCst);
                    rmp_serde::to_vec_named(&sparegrid_proto::grid::HeartbeatReply::default())
                        .unwrap()
                }),
            )
            .route(
                "/v1/leases",
                post(move || async move {
                    leases.fetch_add(1, Ordering::SeqCst);
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                }),
            )
    };
    let ctl = super::tests::serve_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), app);
    let grid = pull_agent(&ctl, "backoff", 2, calm());
    wait_until("a few heartbeats", PATIENCE, || {
        heartbeats.load(Ordering::SeqCst) >= 20
    });
    // About 2 s of failures: a loop without backoff would have asked
    // thousands of times; with it, about 0.2 + 0.4 + 0.8 + … s apart.
    let asked = leases.load(Ordering::SeqCst);
    assert!(asked >= 1, "it asked for leases at all");
    assert!(
        asked <= 15,
        "{asked} lease requests while the controller failed"
    );
    grid.stop();
}
