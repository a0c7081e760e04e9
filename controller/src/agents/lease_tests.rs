//! Pull mode against a fake pulling agent: the controller runs on a real
//! listener with the real router, an in-memory store and the dispatcher;
//! the fake registers without a URL, heartbeats on its own task, leases
//! with `POST /v1/leases` and completes with
//! `POST /v1/subtasks/{job}/{index}/complete`. No test asserts a time:
//! deadlines are generous and only bound how long a test may hang.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{json, Value};
use sparegrid_proto::grid::{
    AttemptRef, CompleteReply, Completion, Heartbeat, Lease, LeaseGrant, LeaseRenew, LeaseRenewed,
    LeaseRequest, Register,
};
use tokio::task::JoinHandle;

use super::tests::{controller_with, enc, Ctl, ADMIN, TOKEN};
use super::*;
use crate::store::{AttemptState, JobState, LEASE_EXPIRED};

/// Bounds how long a test may wait for something that should happen.
const PATIENCE: Duration = Duration::from_secs(20);

/// The agent-plane test controller (`super::tests`), with a host timeout
/// long enough that a pulling fake is never lost mid-test.
async fn controller(tweak: impl FnOnce(&mut ControllerConfig)) -> Ctl {
    controller_with(|config| {
        config.registry.host_timeout = Duration::from_secs(5);
        tweak(config);
    })
    .await
}

impl Ctl {
    /// POSTs a MessagePack body with the agent token.
    async fn agent_post(&self, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
        self.post_mp(path, Some(TOKEN), body).await
    }

    async fn submit(&self, mode: &str, n: i64, argv: &[&str], max_attempts: u32) -> JobId {
        let r = self
            .client
            .post(format!("{}/v1/jobs", self.url))
            .bearer_auth(ADMIN)
            .json(&json!({
                "name": "pulled",
                "command": {"argv": argv},
                "split": {"range": {"start": 0, "end": n, "chunk": 1}},
                "mode": mode,
                "max_attempts": max_attempts,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        JobId(v["id"].as_str().unwrap().to_owned())
    }

    async fn get_job(&self, job: &JobId) -> Value {
        let r = self
            .client
            .get(format!("{}/v1/jobs/{}", self.url, job.0))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    /// Registers `host` without a URL and heartbeats it until the handle
    /// is aborted; returns once the host may lease.
    async fn pulling_agent(&self, host: &str) -> JoinHandle<()> {
        let reg = enc(&Register {
            images: Vec::new(),
            migrate_in: false,
            transfer_url: None,
            tunnel: None,
            p2p: false,
            host: host.into(),
            version: "t".into(),
            agent_url: None,
            slots: 4,
        });
        let (status, _) = self.agent_post("/v1/agents/register", reg).await;
        assert_eq!(status, StatusCode::OK);
        let hb = enc(&Heartbeat {
            tunnel: None,
            steals: Vec::new(),
            host: host.into(),
            load: 0.1,
            dominant: None,
            breakdown: BTreeMap::new(),
            free_slots: 4,
            running: Vec::new(),
            vms: BTreeMap::new(),
            suspended_ms: 0,
            renew: Vec::new(),
        });
        let (status, _) = self.agent_post("/v1/agents/heartbeat", hb.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let (url, client) = (self.url.clone(), self.client.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = client
                    .post(format!("{url}/v1/agents/heartbeat"))
                    .header("content-type", MSGPACK)
                    .bearer_auth(TOKEN)
                    .body(hb.clone())
                    .send()
                    .await;
            }
        })
    }

    async fn lease(&self, host: &str, max: u32, wait_ms: u64) -> Vec<Lease> {
        let (status, body) = self
            .agent_post(
                "/v1/leases",
                enc(&LeaseRequest {
                    host: host.into(),
                    max,
                    wait_ms,
                }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        rmp_serde::from_slice::<LeaseGrant>(&body).unwrap().leases
    }

    /// Leases until at least one lease comes (within [`PATIENCE`]).
    async fn lease_some(&self, host: &str, max: u32) -> Vec<Lease> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let got = self.lease(host, max, 2_000).await;
            if !got.is_empty() {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no lease for {host}"
            );
        }
    }

    /// Completes `attempt` as `host` with exit code `code`; the status and
    /// the JSON error or the decoded reply.
    async fn complete(
        &self,
        host: &str,
        attempt: &AttemptRef,
        code: i32,
    ) -> (StatusCode, Result<CompleteReply, Value>) {
        let c = Completion {
            stdout_data: None,
            attempt: attempt.clone(),
            host: host.into(),
            exit_code: Some(code),
            signal: None,
            error: (code != 0).then(|| format!("failed on {host} at epoch {}", attempt.epoch)),
            stdout: format!("{}\n", attempt.index).into_bytes(),
            stderr: Vec::new(),
            stdout_size: 0,
            stderr_size: 0,
            duration_ms: 1,
        };
        let path = format!("/v1/subtasks/{}/{}/complete", attempt.job, attempt.index);
        let (status, body) = self.agent_post(&path, enc(&c)).await;
        let out = if status == StatusCode::OK {
            Ok(rmp_serde::from_slice(&body).unwrap())
        } else {
            Err(serde_json::from_slice(&body).unwrap())
        };
        (status, out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulling_agent_leases_completes_and_stale_epochs_get_409() {
    let ctl = controller(|_| {}).await;
    let hb = ctl.pulling_agent("puller").await;
    // A push job is never leased; the pull job is.
    let push = ctl.submit("push", 2, &["echo", "{start}"], 3).await;
    let job = ctl.submit("pull", 3, &["echo", "{start}"], 3).await;
    let leases = ctl.lease_some("puller", 10).await;
    assert!(leases.iter().all(|l| l.assignment.attempt.job == job.0));
    assert!(leases.iter().all(|l| l.ttl_ms == 30_000));
    let mut held = leases;
    while held.len() < 3 {
        held.extend(ctl.lease_some("puller", 10).await);
    }
    assert_eq!(held.len(), 3);
    assert_eq!(ctl.store.get_job(&push).unwrap().counts.queued, 2);
    assert_eq!(held[0].assignment.argv, ["echo", "0"]);

    // Renewal in one batch; an unknown lease comes back as lost.
    let bogus = AttemptRef {
        job: job.0.clone(),
        index: 0,
        epoch: 99,
    };
    let mut refs: Vec<AttemptRef> = held.iter().map(|l| l.assignment.attempt.clone()).collect();
    refs.push(bogus.clone());
    let (status, body) = ctl
        .agent_post(
            "/v1/leases/renew",
            enc(&LeaseRenew {
                host: "puller".into(),
                leases: refs,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let renewed: LeaseRenewed = rmp_serde::from_slice(&body).unwrap();
    assert_eq!((renewed.renewed, renewed.lost), (3, vec![bogus.clone()]));

    // The right epoch is accepted once, then a duplicate.
    let first = &held[0].assignment.attempt;
    let (status, reply) = ctl.complete("puller", first, 0).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply.unwrap().result, "accepted");
    let (status, reply) = ctl.complete("puller", first, 0).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply.unwrap().result, "duplicate");
    // A stale epoch: 409 stale_epoch, nothing changed.
    let stale = AttemptRef {
        epoch: held[1].assignment.attempt.epoch + 1,
        ..held[1].assignment.attempt.clone()
    };
    let (status, err) = ctl.complete("puller", &stale, 0).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err.unwrap_err()["code"], "stale_epoch");
    assert_eq!(ctl.store.get_job(&job).unwrap().counts.done, 1);
    // A body that names another subtask than the path is refused.
    let c = enc(&Completion {
        stdout_data: None,
        attempt: held[1].assignment.attempt.clone(),
        host: "puller".into(),
        exit_code: Some(0),
        signal: None,
        error: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_size: 0,
        stderr_size: 0,
        duration_ms: 0,
    });
    let (status, body) = ctl
        .agent_post(&format!("/v1/subtasks/{}/2/complete", job.0), c)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["field"], "attempt", "{v}");
    // An unknown job is 404.
    let gone = AttemptRef {
        job: "j-4242".into(),
        index: 0,
        epoch: 1,
    };
    let (status, _) = ctl.complete("puller", &gone, 0).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for l in &held[1..] {
        let (status, _) = ctl.complete("puller", &l.assignment.attempt, 0).await;
        assert_eq!(status, StatusCode::OK);
    }
    let v = ctl.get_job(&job).await;
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["request"]["mode"], "pull", "{v}");
    assert_eq!(ctl.store.results(&job, 0, 10).unwrap().len(), 3);
    hb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_is_leased_again() {
    let ctl = controller(|c| c.dispatch.lease_ttl = Duration::from_millis(200)).await;
    let hb_a = ctl.pulling_agent("a").await;
    let hb_b = ctl.pulling_agent("b").await;
    let job = ctl.submit("pull", 1, &["echo", "{start}"], 3).await;
    let first = ctl.lease_some("a", 1).await.remove(0).assignment.attempt;
    // Host a never renews: the subtask comes back and b leases it.
    let second = ctl.lease_some("b", 1).await.remove(0).assignment.attempt;
    assert_eq!((second.index, second.epoch), (first.index, first.epoch + 1));
    let attempts = ctl.store.attempts(&job, 0).unwrap();
    assert_eq!(attempts[0].state, AttemptState::Withdrawn);
    assert_eq!(attempts[0].error.as_deref(), Some(LEASE_EXPIRED));
    // a's renewal is refused and its late completion is stale.
    let (status, body) = ctl
        .agent_post(
            "/v1/leases/renew",
            enc(&LeaseRenew {
                host: "a".into(),
                leases: vec![first.clone()],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let renewed: LeaseRenewed = rmp_serde::from_slice(&body).unwrap();
    assert_eq!(renewed.lost, vec![first.clone()]);
    let (status, _) = ctl.complete("a", &first, 0).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, reply) = ctl.complete("b", &second, 0).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply.unwrap().result, "accepted");
    let rec = ctl.store.get_job(&job).unwrap();
    assert_eq!((rec.state, rec.counts.done), (JobState::Done, 1));
    let results = ctl.store.results(&job, 0, 10).unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].host, "b");
    hb_a.abort();
    hb_b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lease_request_returns_when_a_job_is_submitted() {
    // The wait bound is far longer than the test may take: the request
    // can only return early because a job was queued (the submit wakes it;
    // a missed wake would be caught by the once-a-second recheck).
    let ctl = controller(|c| c.dispatch.lease_wait_max = Duration::from_secs(120)).await;
    let hb = ctl.pulling_agent("waiter").await;
    let waiting = {
        let ctl = Ctl {
            url: ctl.url.clone(),
            store: ctl.store.clone(),
            client: ctl.client.clone(),
        };
        tokio::spawn(async move { ctl.lease("waiter", 2, 120_000).await })
    };
    // Nothing is queued: the request is still waiting after a while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "an empty queue answered at once");
    let job = ctl.submit("pull", 2, &["echo", "{start}"], 3).await;
    let got = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the waiting lease request was not woken by the job")
        .unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|l| l.assignment.attempt.job == job.0));

    // With nothing queued and a short wait, the answer is an empty grant.
    assert!(ctl.lease("waiter", 2, 50).await.is_empty());
    hb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_dead_letter_after_max_attempts_with_every_error() {
    let ctl = controller(|_| {}).await;
    let hb = ctl.pulling_agent("p").await;
    let job = ctl.submit("pull", 1, &["false"], 3).await;
    for epoch in 1..=3u32 {
        let a = ctl.lease_some("p", 1).await.remove(0).assignment.attempt;
        assert_eq!(a.epoch, epoch);
        let (status, reply) = ctl.complete("p", &a, 1).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply.unwrap().result, "accepted");
    }
    // Nothing left to lease.
    assert!(ctl.lease("p", 1, 50).await.is_empty());
    let v = ctl.get_job(&job).await;
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(v["counts"]["dead"], 1, "{v}");
    let errors: Vec<String> = ctl
        .store
        .attempts(&job, 0)
        .unwrap()
        .into_iter()
        .map(|a| a.error.unwrap_or_default())
        .collect();
    assert_eq!(
        errors,
        (1..=3)
            .map(|e| format!("failed on p at epoch {e}"))
            .collect::<Vec<_>>()
    );
    hb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_host_must_register_to_lease() {
    let ctl = controller(|_| {}).await;
    let (status, body) = ctl
        .agent_post(
            "/v1/leases",
            enc(&LeaseRequest {
                host: "stranger".into(),
                max: 1,
                wait_ms: 0,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "must_register", "{v}");
    // Without the agent token: 401.
    let r = ctl
        .client
        .post(format!("{}/v1/leases", ctl.url))
        .header("content-type", MSGPACK)
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_renew_in_the_heartbeat_and_lost_ones_come_back() {
    let ctl = controller(|_| {}).await;
    let hb_task = ctl.pulling_agent("hb").await;
    let job = ctl.submit("pull", 1, &["echo", "{start}"], 3).await;
    let held = ctl.lease_some("hb", 1).await.remove(0).assignment.attempt;
    let bogus = AttemptRef {
        epoch: held.epoch + 7,
        ..held.clone()
    };
    let hb = enc(&Heartbeat {
        tunnel: None,
        steals: Vec::new(),
        host: "hb".into(),
        load: 0.1,
        dominant: None,
        breakdown: BTreeMap::new(),
        free_slots: 3,
        running: vec![held.clone()],
        vms: BTreeMap::new(),
        suspended_ms: 0,
        renew: vec![held.clone(), bogus.clone()],
    });
    let (status, body) = ctl.agent_post("/v1/agents/heartbeat", hb).await;
    assert_eq!(status, StatusCode::OK);
    let reply: sparegrid_proto::grid::HeartbeatReply = rmp_serde::from_slice(&body).unwrap();
    assert_eq!(reply.lost, vec![bogus]);
    assert!(reply.withdraw.is_empty(), "{reply:?}");
    // The renewed lease is still current: its completion counts.
    let (status, reply) = ctl.complete("hb", &held, 0).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply.unwrap().result, "accepted");
    assert_eq!(ctl.store.get_job(&job).unwrap().state, JobState::Done);
    hb_task.abort();
}
