//! Tests of pull mode's leases in the SQLite store: claiming by mode,
//! expiry and revival, renewal, fencing with the epoch, duplicates, late
//! completions, dead-lettering, and leases surviving a restart.

use std::collections::BTreeMap;

use super::*;
use crate::job::{Command, Resources, Split};

const TTL: Duration = Duration::from_millis(1_000);
const T0: i64 = 1_000_000;

fn request(name: &str, mode: DispatchMode, max_attempts: u32) -> JobRequest {
    JobRequest {
        name: name.to_owned(),
        command: Command::Argv(vec!["echo".into(), "{start}".into()]),
        split: Split::Range {
            start: 0,
            end: 1_000,
            chunk: 1,
        },
        resources: Resources::default(),
        max_attempts,
        priority: 0,
        mode,
        reduce: None,
        network: Default::default(),
    }
}

fn job(store: &dyn Store, mode: DispatchMode, n: u64, max_attempts: u32) -> JobId {
    store
        .create_job(
            &request("lease", mode, max_attempts),
            &mut (0..n).map(|i| SubtaskSpec {
                index: i,
                argv: vec!["echo".into(), i.to_string()],
                env: BTreeMap::new(),
                stdin: Vec::new(),
            }),
        )
        .unwrap()
}

fn ok() -> Outcome {
    Outcome {
        exit_code: Some(0),
        stdout: b"ok".to_vec(),
        stdout_size: 2,
        ..Outcome::default()
    }
}

fn fail(err: &str) -> Outcome {
    Outcome {
        exit_code: Some(1),
        error: Some(err.to_owned()),
        ..Outcome::default()
    }
}

fn store_with_hosts() -> SqliteStore {
    let store = SqliteStore::open_in_memory().unwrap();
    store.upsert_host("a", "").unwrap();
    store.upsert_host("b", "").unwrap();
    store
}

fn key(a: &Assignment) -> (JobId, u64, u32) {
    (a.job.clone(), a.index, a.epoch)
}

#[test]
fn pull_jobs_are_only_leased_and_push_jobs_only_claimed() {
    let store = store_with_hosts();
    let push = job(&store, DispatchMode::Push, 2, 3);
    let pull = job(&store, DispatchMode::Pull, 3, 3);
    let leased = store.claim_leases("a", 10, TTL, T0).unwrap();
    assert_eq!(leased.len(), 3);
    assert!(leased.iter().all(|a| a.job == pull && a.epoch == 1));
    let pushed = store.claim("b", 10).unwrap();
    assert_eq!(pushed.len(), 2);
    assert!(pushed.iter().all(|a| a.job == push));
    // A push claim leaves no lease: it never expires.
    assert!(store.expire_leases(i64::MAX).unwrap().len() == 3);
    assert_eq!(store.get_job(&push).unwrap().counts.assigned, 2);
}

#[test]
fn an_expired_lease_revives_its_subtask_and_a_late_completion_is_stale() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 2, 3);
    let first = store.claim_leases("a", 1, TTL, T0).unwrap();
    assert_eq!(first.len(), 1);
    let a = &first[0];
    // Not yet expired at the expiry instant itself.
    assert!(store.expire_leases(T0 + 1_000).unwrap().is_empty());
    let expired = store.expire_leases(T0 + 1_001).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (
            expired[0].index,
            expired[0].epoch,
            expired[0].host.as_deref()
        ),
        (a.index, a.epoch, Some("a"))
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!((rec.counts.queued, rec.counts.assigned), (2, 0));
    let attempts = store.attempts(&id, a.index).unwrap();
    assert_eq!(attempts[0].state, AttemptState::Withdrawn);
    assert_eq!(attempts[0].error.as_deref(), Some(LEASE_EXPIRED));
    // Revived: the next pull gets it again, with a new epoch.
    let again = store.claim_leases("b", 1, TTL, T0 + 2_000).unwrap();
    assert_eq!((again[0].index, again[0].epoch), (a.index, a.epoch + 1));
    // The late report of the expired lease changes nothing …
    assert_eq!(
        store.complete(&id, a.index, a.epoch, &ok()).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(store.get_job(&id).unwrap().counts.done, 0);
    // … and the current one counts once; its repeat is a duplicate.
    assert!(matches!(
        store.complete(&id, a.index, again[0].epoch, &ok()).unwrap(),
        CompletionResult::Accepted {
            subtask: SubtaskState::Done,
            ..
        }
    ));
    assert_eq!(
        store.complete(&id, a.index, again[0].epoch, &ok()).unwrap(),
        CompletionResult::Duplicate
    );
    // Even a stale epoch after it is done is not counted again.
    assert_eq!(store.get_job(&id).unwrap().counts.done, 1);
    // Failed attempts are not counted for an expiry.
    assert_eq!(store.subtasks(&id, 0, 10).unwrap()[0].failures, 0);
}

#[test]
fn renewal_extends_only_current_unexpired_leases_of_the_host() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 3, 3);
    let got = store.claim_leases("a", 3, TTL, T0).unwrap();
    let keys: Vec<_> = got.iter().map(key).collect();
    // Renew the first two at T0 + 900; the third runs out at T0 + 1000.
    let renewed = store.renew_leases("a", &keys[..2], TTL, T0 + 900).unwrap();
    assert_eq!(renewed, [true, true]);
    let expired = store.expire_leases(T0 + 1_500).unwrap();
    assert_eq!(
        expired.iter().map(|r| r.index).collect::<Vec<_>>(),
        [got[2].index]
    );
    // Another host's renewal, a wrong epoch, an expired lease and an
    // unknown job are all lost.
    let wrong_epoch = (id.clone(), got[0].index, got[0].epoch + 1);
    let unknown = (JobId::from("j-999"), 0, 1);
    let answers = store
        .renew_leases("b", &[keys[0].clone()], TTL, T0 + 1_600)
        .unwrap();
    assert_eq!(answers, [false]);
    let answers = store
        .renew_leases(
            "a",
            &[keys[0].clone(), wrong_epoch, keys[2].clone(), unknown],
            TTL,
            T0 + 1_600,
        )
        .unwrap();
    assert_eq!(answers, [true, false, false, false]);
    // Renewed at 1600: alive at 2600, gone after.
    assert!(store
        .expire_leases(T0 + 2_600)
        .unwrap()
        .iter()
        .all(|r| r.index != got[0].index));
    assert!(store
        .expire_leases(T0 + 2_601)
        .unwrap()
        .iter()
        .any(|r| r.index == got[0].index));
}

#[test]
fn stale_epoch_after_expiry_and_reclaim_is_rejected() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 1, 3);
    let a = store.claim_leases("a", 1, TTL, T0).unwrap().remove(0);
    store.expire_leases(T0 + 5_000).unwrap();
    let b = store
        .claim_leases("b", 1, TTL, T0 + 5_000)
        .unwrap()
        .remove(0);
    assert_eq!(b.epoch, a.epoch + 1);
    // Host a still works on epoch 1: its renewal is refused and its
    // completion (a failure or a success) is stale.
    assert_eq!(
        store
            .renew_leases("a", &[key(&a)], TTL, T0 + 5_100)
            .unwrap(),
        [false]
    );
    assert_eq!(
        store.complete(&id, 0, a.epoch, &fail("boom")).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(
        store.complete(&id, 0, a.epoch, &ok()).unwrap(),
        CompletionResult::Stale
    );
    let sub = &store.subtasks(&id, 0, 1).unwrap()[0];
    assert_eq!(
        (sub.state, sub.epoch, sub.failures),
        (SubtaskState::Assigned, 2, 0)
    );
    assert_eq!(sub.host.as_deref(), Some("b"));
}

#[test]
fn failed_leases_revive_until_max_attempts_then_dead_with_every_error() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 1, 3);
    for i in 1..=3u32 {
        let a = store.claim_leases("a", 1, TTL, T0).unwrap();
        assert_eq!(a.len(), 1, "attempt {i} leased");
        assert_eq!(a[0].epoch, i);
        store
            .complete(&id, 0, i, &fail(&format!("error {i}")))
            .unwrap();
    }
    assert!(store.claim_leases("a", 1, TTL, T0).unwrap().is_empty());
    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.counts.dead, 1);
    let errors: Vec<_> = store
        .attempts(&id, 0)
        .unwrap()
        .into_iter()
        .map(|a| a.error.unwrap_or_default())
        .collect();
    assert_eq!(errors, ["error 1", "error 2", "error 3"]);
    // A dead subtask's lease does not expire into the queue again.
    assert!(store.expire_leases(i64::MAX).unwrap().is_empty());
    assert_eq!(store.get_job(&id).unwrap().counts.queued, 0);
}

#[test]
fn restart_keeps_leases_and_their_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.db");
    let store = SqliteStore::open(&path).unwrap();
    store.upsert_host("a", "").unwrap();
    let id = job(&store, DispatchMode::Pull, 2, 3);
    let got = store.claim_leases("a", 2, TTL, T0).unwrap();
    store
        .renew_leases("a", &[key(&got[1])], TTL, T0 + 500)
        .unwrap();
    drop(store);

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.get_job(&id).unwrap().counts.assigned, 2);
    // Still not expired right at their expiries …
    assert!(store.expire_leases(T0 + 1_000).unwrap().is_empty());
    // … the first one after T0 + 1000, the renewed one after T0 + 1500.
    let first = store.expire_leases(T0 + 1_001).unwrap();
    assert_eq!(
        first.iter().map(|r| r.index).collect::<Vec<_>>(),
        [got[0].index]
    );
    let second = store.expire_leases(T0 + 1_501).unwrap();
    assert_eq!(
        second.iter().map(|r| r.index).collect::<Vec<_>>(),
        [got[1].index]
    );
    // And the store still knows it is a pull job.
    assert!(store.claim("a", 10).unwrap().is_empty());
    assert_eq!(
        store.claim_leases("a", 10, TTL, T0 + 2_000).unwrap().len(),
        2
    );
}

#[test]
fn an_expired_lease_is_not_renewed_even_before_the_sweep() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 1, 3);
    let a = store.claim_leases("a", 1, TTL, T0).unwrap().remove(0);
    // Renewing right at the expiry still works …
    assert_eq!(
        store
            .renew_leases("a", &[key(&a)], TTL, T0 + 1_000)
            .unwrap(),
        [true]
    );
    // … but once it has passed, the lease is lost although no sweep ran.
    assert_eq!(
        store
            .renew_leases("a", &[key(&a)], TTL, T0 + 2_001)
            .unwrap(),
        [false]
    );
    let swept = store.expire_leases(T0 + 2_001).unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(store.get_job(&id).unwrap().counts.queued, 1);
}

#[test]
fn job_leases_count_per_host_with_the_earliest_expiry_and_only_that_jobs() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 5, 3);
    assert!(store.job_leases(&id).unwrap().is_empty());
    store.claim_leases("a", 2, TTL, T0).unwrap();
    let b = store.claim_leases("b", 1, TTL, T0 + 500).unwrap();
    // A lease of another job is not counted.
    let other = job(&store, DispatchMode::Pull, 1, 3);
    store.claim_leases("b", 5, TTL, T0 + 900).unwrap();
    // b's first lease renewed later: its earliest expiry moves on.
    assert_eq!(
        store
            .renew_leases("b", &[key(&b[0])], TTL, T0 + 700)
            .unwrap(),
        [true]
    );
    let leases = store.job_leases(&id).unwrap();
    let ttl = TTL.as_millis() as i64;
    assert_eq!(
        leases,
        [
            HostLeases {
                host: "a".into(),
                leases: 2,
                earliest_expiry_ms: T0 + ttl,
            },
            HostLeases {
                host: "b".into(),
                leases: 3,
                earliest_expiry_ms: T0 + 700 + ttl,
            },
        ]
    );
    assert_eq!(
        store.job_leases(&other).unwrap(),
        [HostLeases {
            host: "b".into(),
            leases: 1,
            earliest_expiry_ms: T0 + 900 + ttl,
        }]
    );
    assert!(matches!(
        store.job_leases(&JobId::from("j-999")),
        Err(StoreError::JobNotFound(_))
    ));
}

#[test]
fn dead_subtasks_come_with_every_attempt_in_index_order() {
    let store = store_with_hosts();
    let id = job(&store, DispatchMode::Pull, 3, 2);
    assert!(store.dead_subtasks(&id, 10).unwrap().is_empty());
    for round in 1..=2u32 {
        for a in store.claim_leases("a", 3, TTL, T0).unwrap() {
            // Subtask 1 succeeds; 0 and 2 fail every time.
            let outcome = if a.index == 1 {
                ok()
            } else {
                fail(&format!("subtask {} round {round}", a.index))
            };
            store.complete(&a.job, a.index, a.epoch, &outcome).unwrap();
        }
    }
    let dead = store.dead_subtasks(&id, 10).unwrap();
    let seen: Vec<(u64, Vec<String>)> = dead
        .iter()
        .map(|d| {
            assert_eq!(d.subtask.state, SubtaskState::Dead);
            (
                d.subtask.index,
                d.attempts
                    .iter()
                    .map(|a| a.error.clone().unwrap_or_default())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                0,
                vec!["subtask 0 round 1".into(), "subtask 0 round 2".into()]
            ),
            (
                2,
                vec!["subtask 2 round 1".into(), "subtask 2 round 2".into()]
            ),
        ]
    );
    assert_eq!(store.dead_subtasks(&id, 1).unwrap().len(), 1);
    assert_eq!(dead[0].subtask.failures, 2);
}
