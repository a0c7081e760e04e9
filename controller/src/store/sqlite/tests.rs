//! Tests of the SQLite store: round trips, fenced completion, retries,
//! host loss, cancel, restart and kill -9 durability, and insert throughput.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::time::Instant;

use super::*;
use crate::job::{Command, Resources, Split};
use crate::split;

fn request(name: &str, max_attempts: u32, priority: i32) -> JobRequest {
    JobRequest {
        name: name.to_owned(),
        command: Command::Argv(vec!["echo".into(), "{start}".into()]),
        split: Split::Range {
            start: 0,
            end: 1_000_000,
            chunk: 1,
        },
        resources: Resources::default(),
        max_attempts,
        priority,
        mode: Default::default(),
        reduce: None,
        network: Default::default(),
    }
}

fn spec(i: u64) -> SubtaskSpec {
    let mut env = BTreeMap::new();
    env.insert("SPAREGRID_START".to_owned(), i.to_string());
    env.insert("SPAREGRID_END".to_owned(), (i + 1).to_string());
    SubtaskSpec {
        index: i,
        argv: vec!["echo".into(), i.to_string()],
        env,
        stdin: match i % 2 {
            0 => format!("line {i}\n").into_bytes(),
            _ => Vec::new(),
        },
    }
}

fn create(store: &dyn Store, name: &str, n: u64, max_attempts: u32, priority: i32) -> JobId {
    store
        .create_job(
            &request(name, max_attempts, priority),
            &mut (0..n).map(spec),
        )
        .unwrap()
}

fn ok(out: &str) -> Outcome {
    Outcome {
        exit_code: Some(0),
        stdout: out.as_bytes().to_vec(),
        stdout_size: out.len() as u64,
        duration_ms: 5,
        ..Outcome::default()
    }
}

fn fail(err: &str) -> Outcome {
    Outcome {
        exit_code: Some(1),
        error: Some(err.to_owned()),
        stderr: err.as_bytes().to_vec(),
        stderr_size: err.len() as u64,
        duration_ms: 3,
        ..Outcome::default()
    }
}

fn accepted(subtask: SubtaskState, job: JobState) -> CompletionResult {
    CompletionResult::Accepted { subtask, job }
}

/// The job's counts agree with its subtasks' states.
fn check_counts(store: &SqliteStore, job: &JobId) {
    let rec = store.get_job(job).unwrap();
    let subs = store.subtasks(job, 0, usize::MAX).unwrap();
    let count = |s| subs.iter().filter(|r| r.state == s).count() as u64;
    let c = rec.counts;
    assert_eq!(c.total, subs.len() as u64, "{job} total");
    assert_eq!(c.queued, count(SubtaskState::Queued), "{job} queued");
    assert_eq!(c.assigned, count(SubtaskState::Assigned), "{job} assigned");
    assert_eq!(c.done, count(SubtaskState::Done), "{job} done");
    assert_eq!(c.dead, count(SubtaskState::Dead), "{job} dead");
    assert_eq!(
        c.cancelled,
        count(SubtaskState::Cancelled),
        "{job} cancelled"
    );
}

#[test]
fn job_round_trip() {
    let store = SqliteStore::open_in_memory().unwrap();
    let req = request("sweep", 3, 0);
    let id = store.create_job(&req, &mut (0..10).map(spec)).unwrap();
    assert_eq!(id.as_str(), "j-1");

    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.name, "sweep");
    assert_eq!(rec.state, JobState::Queued);
    assert_eq!(rec.max_attempts, 3);
    assert_eq!(rec.counts.total, 10);
    assert_eq!(rec.counts.queued, 10);
    assert!(rec.started_ms.is_none() && rec.finished_ms.is_none());
    assert_eq!(store.job_request(&id).unwrap(), req);
    assert_eq!(store.list_jobs(None, 10).unwrap(), vec![rec.clone()]);
    assert!(store
        .list_jobs(Some(JobState::Done), 10)
        .unwrap()
        .is_empty());

    store.upsert_host("h1", "10.0.0.1:7070").unwrap();
    let got = store.claim("h1", 100).unwrap();
    assert_eq!(got.len(), 10);
    for (i, a) in got.iter().enumerate() {
        assert_eq!(a.job, id);
        assert_eq!(a.index, i as u64);
        assert_eq!(a.epoch, 1);
        assert_eq!(a.spec, spec(i as u64), "spec {i} survives the store");
    }
    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Running);
    assert!(rec.started_ms.is_some());
    check_counts(&store, &id);
}

#[test]
fn unknown_ids_are_typed_errors() {
    let store = SqliteStore::open_in_memory().unwrap();
    for bad in ["j-9", "nope", "j-", "j-1x"] {
        let id = JobId::from(bad);
        match store.get_job(&id) {
            Err(StoreError::JobNotFound(got)) => assert_eq!(got, id),
            other => panic!("{bad}: {other:?}"),
        }
        assert!(matches!(
            store.complete(&id, 0, 1, &ok("")),
            Err(StoreError::JobNotFound(_))
        ));
    }
    let id = create(&store, "a", 2, 3, 0);
    match store.complete(&id, 5, 1, &ok("")) {
        Err(StoreError::SubtaskNotFound { job, index }) => {
            assert_eq!((job, index), (id.clone(), 5))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.attempts(&id, 2),
        Err(StoreError::SubtaskNotFound { .. })
    ));
    assert!(matches!(
        store.claim("ghost", 1),
        Err(StoreError::HostNotFound(h)) if h == "ghost"
    ));
    assert!(matches!(
        store.heartbeat("ghost", &serde_json::json!({})),
        Err(StoreError::HostNotFound(_))
    ));
    let msg = store.get_job(&"j-42".into()).unwrap_err().to_string();
    assert!(msg.contains("j-42"), "{msg}");
}

#[test]
fn create_job_is_all_or_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut gap = (0..5).map(spec).chain([spec(7)]);
    match store.create_job(&request("gap", 3, 0), &mut gap) {
        Err(StoreError::BadIndex {
            name,
            expected,
            found,
        }) => assert_eq!((name.as_str(), expected, found), ("gap", 5, 7)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.create_job(&request("empty", 3, 0), &mut std::iter::empty()),
        Err(StoreError::EmptyJob { .. })
    ));
    assert!(store.list_jobs(None, 10).unwrap().is_empty());
    store.upsert_host("h", "a").unwrap();
    assert!(
        store.claim("h", 10).unwrap().is_empty(),
        "no stray subtasks"
    );
}

#[test]
fn claim_orders_by_priority_then_age_then_index() {
    let store = SqliteStore::open_in_memory().unwrap();
    let old = create(&store, "old", 3, 3, 0);
    let new = create(&store, "new", 3, 3, 0);
    let urgent = create(&store, "urgent", 2, 3, 5);
    store.upsert_host("h", "a").unwrap();
    let got: Vec<(JobId, u64)> = store
        .claim("h", 6)
        .unwrap()
        .into_iter()
        .map(|a| (a.job, a.index))
        .collect();
    assert_eq!(
        got,
        vec![
            (urgent.clone(), 0),
            (urgent, 1),
            (old.clone(), 0),
            (old.clone(), 1),
            (old, 2),
            (new.clone(), 0),
        ]
    );
    assert_eq!(store.claim("h", 0).unwrap(), vec![]);
    let rest = store.claim("h", 10).unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|a| a.job == new));
    assert!(store.claim("h", 10).unwrap().is_empty());
}

#[test]
fn completion_is_idempotent_and_fenced() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 2, 3, 0);
    store.upsert_host("a", "a").unwrap();
    store.upsert_host("b", "b").unwrap();
    let first = store.claim("a", 1).unwrap();
    assert_eq!((first[0].index, first[0].epoch), (0, 1));

    // A report for an attempt that never existed changes nothing.
    assert_eq!(
        store.complete(&id, 0, 2, &ok("bogus")).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(
        store.complete(&id, 1, 1, &ok("not assigned")).unwrap(),
        CompletionResult::Stale
    );

    // Host a is withdrawn; b takes subtask 0 over with epoch 2.
    let back = store
        .requeue_host("a", "load above withdraw_above")
        .unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].index, back[0].epoch), (0, 1));
    // While queued, a's late report is stale.
    assert_eq!(
        store.complete(&id, 0, 1, &ok("from a")).unwrap(),
        CompletionResult::Stale
    );
    let second = store.claim("b", 1).unwrap();
    assert_eq!((second[0].index, second[0].epoch), (0, 2));
    // Still stale once b holds it: a never overwrites the newer attempt.
    assert_eq!(
        store.complete(&id, 0, 1, &ok("from a")).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(
        store.complete(&id, 0, 2, &ok("from b")).unwrap(),
        accepted(SubtaskState::Done, JobState::Running)
    );
    // The same report again, and a's very late one: duplicates.
    assert_eq!(
        store.complete(&id, 0, 2, &ok("from b again")).unwrap(),
        CompletionResult::Duplicate
    );
    assert_eq!(
        store.complete(&id, 0, 1, &ok("from a")).unwrap(),
        CompletionResult::Duplicate
    );
    check_counts(&store, &id);
    assert_eq!(store.get_job(&id).unwrap().counts.done, 1);

    let attempts = store.attempts(&id, 0).unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].state, AttemptState::Withdrawn);
    assert_eq!(attempts[0].host, "a");
    assert_eq!(
        attempts[0].error.as_deref(),
        Some("load above withdraw_above")
    );
    assert_eq!(attempts[1].state, AttemptState::Succeeded);
    assert_eq!(attempts[1].stdout, b"from b");

    // Finish the job; the results are b's output and subtask 1's, once each.
    let last = store.claim("a", 5).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(
        store.complete(&id, 1, 1, &ok("one")).unwrap(),
        accepted(SubtaskState::Done, JobState::Done)
    );
    let results = store.results(&id, 0, 100).unwrap();
    let outs: Vec<(u64, &[u8], &str)> = results
        .iter()
        .map(|r| (r.index, &r.stdout[..], r.host.as_str()))
        .collect();
    assert_eq!(outs, vec![(0, &b"from b"[..], "b"), (1, &b"one"[..], "a")]);
    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Done);
    assert!(rec.finished_ms.is_some());
}

#[test]
fn a_moved_attempt_is_fenced_by_its_new_epoch_and_counted_once() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 1, 3, 0);
    store.upsert_host("a", "a").unwrap();
    store.upsert_host("b", "b").unwrap();
    let first = store.claim("a", 1).unwrap();
    assert_eq!((first[0].index, first[0].epoch), (0, 1));

    // Only the current holder's current attempt moves.
    assert_eq!(store.move_attempt(&id, 0, 1, "b", "a", 0).unwrap(), None);
    assert_eq!(store.move_attempt(&id, 0, 2, "a", "b", 0).unwrap(), None);
    assert_eq!(store.move_attempt(&id, 0, 1, "a", "b", 0).unwrap(), Some(2));
    // Moving it again from a does nothing: it is b's now.
    assert_eq!(store.move_attempt(&id, 0, 1, "a", "b", 0).unwrap(), None);
    let held: Vec<(u64, u32)> = store
        .assigned_to("b")
        .unwrap()
        .iter()
        .map(|r| (r.index, r.epoch))
        .collect();
    assert_eq!(held, vec![(0, 2)]);
    assert!(store.assigned_to("a").unwrap().is_empty());
    // Still assigned (not queued): nobody else can claim it.
    assert!(store.claim("a", 5).unwrap().is_empty());

    // a's late report under the old epoch is stale; b's counts, once.
    assert_eq!(
        store.complete(&id, 0, 1, &ok("from a")).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(
        store.complete(&id, 0, 2, &ok("from b")).unwrap(),
        accepted(SubtaskState::Done, JobState::Done)
    );
    // After the end, any report is a duplicate: nothing is counted again.
    assert_eq!(
        store.complete(&id, 0, 1, &ok("from a")).unwrap(),
        CompletionResult::Duplicate
    );
    check_counts(&store, &id);
    let rec = store.get_job(&id).unwrap();
    assert_eq!((rec.counts.done, rec.counts.total), (1, 1));
    let attempts = store.attempts(&id, 0).unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].state, AttemptState::Withdrawn);
    assert_eq!(attempts[0].error.as_deref(), Some("migrated to b"));
    assert_eq!(attempts[1].state, AttemptState::Succeeded);
    assert_eq!(attempts[1].host, "b");
    // A move after the end changes nothing.
    assert_eq!(store.move_attempt(&id, 0, 2, "b", "a", 0).unwrap(), None);
    // An unknown subtask is a typed error, not a silent None.
    assert!(store.move_attempt(&id, 7, 1, "a", "b", 0).is_err());
}

#[test]
fn complete_many_is_one_transaction_with_per_report_results() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 3, 3, 0);
    store.upsert_host("a", "a").unwrap();
    let got = store.claim("a", 3).unwrap();
    let report = |job: &JobId, index, epoch, out| Report {
        job: job.clone(),
        index,
        epoch,
        outcome: out,
    };
    let reports = vec![
        report(&id, 0, got[0].epoch, ok("zero")),
        report(&id, 0, got[0].epoch, ok("zero again")),
        report(&"j-77".into(), 0, 1, ok("")),
        report(&id, 1, got[1].epoch + 1, ok("stale")),
        report(&id, 1, got[1].epoch, fail("bad")),
        report(&id, 2, got[2].epoch, ok("two")),
    ];
    let results = store.complete_many(&reports).unwrap();
    assert_eq!(results.len(), 6);
    assert_eq!(
        results[0].as_ref().unwrap(),
        &accepted(SubtaskState::Done, JobState::Running)
    );
    assert_eq!(results[1].as_ref().unwrap(), &CompletionResult::Duplicate);
    assert!(matches!(results[2], Err(StoreError::JobNotFound(_))));
    assert_eq!(results[3].as_ref().unwrap(), &CompletionResult::Stale);
    assert_eq!(
        results[4].as_ref().unwrap(),
        &accepted(SubtaskState::Queued, JobState::Running)
    );
    assert_eq!(
        results[5].as_ref().unwrap(),
        &accepted(SubtaskState::Done, JobState::Running)
    );
    check_counts(&store, &id);
    let rec = store.get_job(&id).unwrap();
    assert_eq!((rec.counts.done, rec.counts.queued), (2, 1));
}

#[test]
fn withdraw_is_fenced_by_epoch() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 1, 3, 0);
    store.upsert_host("a", "a").unwrap();
    let a = store.claim("a", 1).unwrap();
    assert!(!store.withdraw(&id, 0, a[0].epoch + 1, "wrong").unwrap());
    assert!(store
        .withdraw(&id, 0, a[0].epoch, "suspended too long")
        .unwrap());
    assert!(!store.withdraw(&id, 0, a[0].epoch, "again").unwrap());
    check_counts(&store, &id);
    assert_eq!(store.get_job(&id).unwrap().counts.queued, 1);
    let again = store.claim("a", 1).unwrap();
    assert_eq!(again[0].epoch, 2);
}

#[test]
fn failures_retry_until_max_attempts_then_dead_with_every_error() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "flaky", 2, 3, 0);
    for h in ["a", "b", "c"] {
        store.upsert_host(h, h).unwrap();
    }
    // Subtask 1 succeeds at once; subtask 0 fails on every host.
    let first = store.claim("a", 2).unwrap();
    assert_eq!(
        store.complete(&id, 1, first[1].epoch, &ok("fine")).unwrap(),
        accepted(SubtaskState::Done, JobState::Running)
    );
    assert_eq!(
        store.complete(&id, 0, 1, &fail("boom on a")).unwrap(),
        accepted(SubtaskState::Queued, JobState::Running)
    );
    // The same failure reported twice does not count twice.
    assert_eq!(
        store.complete(&id, 0, 1, &fail("boom on a")).unwrap(),
        CompletionResult::Duplicate
    );
    let b = store.claim("b", 5).unwrap();
    assert_eq!((b.len(), b[0].epoch), (1, 2));
    let crash = Outcome {
        exit_code: None,
        ..Outcome::default()
    };
    assert_eq!(
        store.complete(&id, 0, 2, &crash).unwrap(),
        accepted(SubtaskState::Queued, JobState::Running)
    );
    let c = store.claim("c", 5).unwrap();
    assert_eq!(c[0].epoch, 3);
    let nonzero = Outcome {
        exit_code: Some(7),
        ..Outcome::default()
    };
    assert_eq!(
        store.complete(&id, 0, 3, &nonzero).unwrap(),
        accepted(SubtaskState::Dead, JobState::Failed)
    );
    assert_eq!(
        store.complete(&id, 0, 3, &nonzero).unwrap(),
        CompletionResult::Duplicate
    );
    assert!(store.claim("a", 5).unwrap().is_empty(), "dead is parked");

    let attempts = store.attempts(&id, 0).unwrap();
    let errors: Vec<(&str, Option<i32>, Option<&str>)> = attempts
        .iter()
        .map(|a| (a.host.as_str(), a.exit_code, a.error.as_deref()))
        .collect();
    assert_eq!(
        errors,
        vec![
            ("a", Some(1), Some("boom on a")),
            ("b", None, Some("ended without an exit code")),
            ("c", Some(7), Some("exited with code 7")),
        ]
    );
    assert!(attempts.iter().all(|a| a.state == AttemptState::Failed));
    assert_eq!(attempts[0].stderr, b"boom on a");

    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!((rec.counts.done, rec.counts.dead), (1, 1));
    check_counts(&store, &id);
    let subs = store.subtasks(&id, 0, 10).unwrap();
    assert_eq!((subs[0].state, subs[0].failures), (SubtaskState::Dead, 3));
    // Results hold only the done subtask.
    let results = store.results(&id, 0, 10).unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].index, 1);
}

#[test]
fn host_loss_requeues_and_fences_its_subtasks() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 4, 3, 0);
    store.upsert_host("a", "10.0.0.1").unwrap();
    store.upsert_host("b", "10.0.0.2").unwrap();
    let on_a = store.claim("a", 3).unwrap();
    let on_b = store.claim("b", 3).unwrap();
    assert_eq!((on_a.len(), on_b.len()), (3, 1));
    assert_eq!(store.assigned_to("a").unwrap().len(), 3);

    let lost = store.mark_lost("a").unwrap();
    let mut idx: Vec<u64> = lost.iter().map(|r| r.index).collect();
    idx.sort_unstable();
    assert_eq!(idx, vec![0, 1, 2]);
    assert!(store.assigned_to("a").unwrap().is_empty());
    check_counts(&store, &id);
    assert_eq!(store.get_job(&id).unwrap().counts.queued, 3);
    let hosts = store.list_hosts().unwrap();
    assert_eq!(hosts[0].state, HostState::Lost);
    assert_eq!(hosts[1].state, HostState::Active);

    // A lost host gets no work, and its late reports are stale.
    assert!(matches!(
        store.claim("a", 1),
        Err(StoreError::HostLost(h)) if h == "a"
    ));
    assert_eq!(
        store.complete(&id, 0, 1, &ok("late")).unwrap(),
        CompletionResult::Stale
    );
    let retry = store.claim("b", 10).unwrap();
    assert_eq!(retry.len(), 3);
    assert!(retry.iter().all(|a| a.epoch == 2));
    for a in retry.iter().chain(&on_b) {
        store.complete(&a.job, a.index, a.epoch, &ok("b")).unwrap();
    }
    assert_eq!(store.get_job(&id).unwrap().state, JobState::Done);
    let attempts = store.attempts(&id, 0).unwrap();
    assert_eq!(attempts[0].state, AttemptState::Withdrawn);
    assert_eq!(attempts[0].error.as_deref(), Some("host lost"));
    // Host loss is not the subtask's fault.
    assert_eq!(store.subtasks(&id, 0, 1).unwrap()[0].failures, 0);

    // A heartbeat brings a lost host back.
    store
        .heartbeat("a", &serde_json::json!({"load_factor": 0.1}))
        .unwrap();
    let a = &store.list_hosts().unwrap()[0];
    assert_eq!(a.state, HostState::Active);
    assert_eq!(a.load, Some(serde_json::json!({"load_factor": 0.1})));
}

#[test]
fn hosts_round_trip() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.upsert_host("h2", "10.0.0.2:7070").unwrap();
    store.upsert_host("h1", "10.0.0.1:7070").unwrap();
    store.upsert_host("h1", "10.0.0.9:7070").unwrap();
    let load = serde_json::json!({"load_factor": 0.42, "free_slots": 3});
    store.heartbeat("h1", &load).unwrap();
    let hosts = store.list_hosts().unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0].id, "h1");
    assert_eq!(hosts[0].address, "10.0.0.9:7070");
    assert_eq!(hosts[0].load.as_ref(), Some(&load));
    assert!(hosts[0].last_heartbeat_ms >= hosts[0].registered_ms);
    assert_eq!(hosts[1].load, None);
    assert!(matches!(
        store.mark_lost("nobody"),
        Err(StoreError::HostNotFound(_))
    ));
}

#[test]
fn cancel_stops_queued_and_running_subtasks() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 5, 3, 0);
    let other = create(&store, "other", 1, 3, 0);
    store.upsert_host("a", "a").unwrap();
    let got = store.claim("a", 2).unwrap();
    store.complete(&id, 0, got[0].epoch, &ok("zero")).unwrap();

    let c = store.cancel_job(&id).unwrap();
    assert!(c.changed);
    assert_eq!(c.dropped_queued, 3);
    assert_eq!(c.stop.len(), 1);
    assert_eq!((c.stop[0].index, c.stop[0].host.as_deref()), (1, Some("a")));
    assert!(!store.cancel_job(&id).unwrap().changed, "second cancel");

    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Cancelled);
    assert_eq!((rec.counts.done, rec.counts.cancelled), (1, 4));
    check_counts(&store, &id);
    assert_eq!(
        store.complete(&id, 1, got[1].epoch, &ok("late")).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(
        store.attempts(&id, 1).unwrap()[0].state,
        AttemptState::Cancelled
    );
    // Only the other job is left to dispatch.
    let next = store.claim("a", 10).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].job, other);
    store.complete(&other, 0, 1, &ok("x")).unwrap();
    assert!(!store.cancel_job(&other).unwrap().changed, "done is final");
    assert!(matches!(
        store.cancel_job(&"j-99".into()),
        Err(StoreError::JobNotFound(_))
    ));
}

#[test]
fn output_is_capped_with_its_size_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(
        dir.path().join("s.db"),
        StoreOptions {
            output_cap: 4,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let id = create(&store, "j", 1, 3, 0);
    store.upsert_host("a", "a").unwrap();
    store.claim("a", 1).unwrap();
    let out = Outcome {
        exit_code: Some(0),
        stdout: b"0123456789".to_vec(),
        stdout_size: 1000,
        stderr: b"abcdef".to_vec(),
        stderr_size: 0,
        ..Outcome::default()
    };
    store.complete(&id, 0, 1, &out).unwrap();
    let r = &store.results(&id, 0, 1).unwrap()[0];
    assert_eq!((&r.stdout[..], r.stdout_size), (&b"0123"[..], 1000));
    assert_eq!((&r.stderr[..], r.stderr_size), (&b"abcd"[..], 6));
}

#[test]
fn results_page_in_index_order() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = create(&store, "j", 10, 3, 0);
    store.upsert_host("a", "a").unwrap();
    // Complete in reverse order.
    for a in store.claim("a", 10).unwrap().into_iter().rev() {
        store
            .complete(&a.job, a.index, a.epoch, &ok(&a.index.to_string()))
            .unwrap();
    }
    let page1 = store.results(&id, 0, 4).unwrap();
    let page2 = store.results(&id, 4, 100).unwrap();
    let idx: Vec<u64> = page1.iter().chain(&page2).map(|r| r.index).collect();
    assert_eq!(idx, (0..10).collect::<Vec<_>>());
    assert!(page2
        .iter()
        .all(|r| r.stdout == r.index.to_string().as_bytes()));
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    match SqliteStore::open(&path) {
        Err(StoreError::SchemaTooNew { path: p, found, .. }) => {
            assert_eq!((p, found), (path, SCHEMA_VERSION + 1))
        }
        other => panic!("{other:?}"),
    }
}

/// Claims and completes everything left in `job` on `host`, reopening
/// nothing; returns how many it completed.
fn drain(store: &dyn Store, host: &str) -> usize {
    let mut n = 0;
    loop {
        let got = store.claim(host, 64).unwrap();
        if got.is_empty() {
            return n;
        }
        for a in got {
            let r = store
                .complete(&a.job, a.index, a.epoch, &ok(&format!("out {}", a.index)))
                .unwrap();
            assert!(matches!(r, CompletionResult::Accepted { .. }), "{r:?}");
            n += 1;
        }
    }
}

fn assert_exactly_once(store: &dyn Store, id: &JobId, n: u64) {
    let rec = store.get_job(id).unwrap();
    assert_eq!(rec.state, JobState::Done, "{rec:?}");
    assert_eq!(rec.counts.done, n);
    let results = store.results(id, 0, usize::MAX).unwrap();
    let idx: Vec<u64> = results.iter().map(|r| r.index).collect();
    assert_eq!(idx, (0..n).collect::<Vec<_>>(), "every index exactly once");
    for r in &results {
        assert_eq!(r.stdout, format!("out {}", r.index).into_bytes());
    }
}

#[test]
fn restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.db");
    let store = SqliteStore::open(&path).unwrap();
    let id = create(&store, "durable", 100, 3, 0);
    store.upsert_host("a", "a").unwrap();
    let got = store.claim("a", 40).unwrap();
    for a in &got[..30] {
        store
            .complete(&a.job, a.index, a.epoch, &ok(&format!("out {}", a.index)))
            .unwrap();
    }
    // No close, no checkpoint: just gone.
    drop(store);

    let store = SqliteStore::open(&path).unwrap();
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.counts.done, rec.counts.assigned, rec.counts.queued),
        (30, 10, 60)
    );
    assert_eq!(store.assigned_to("a").unwrap().len(), 10);
    // A reported-before-restart completion is still a duplicate.
    assert_eq!(
        store
            .complete(&id, got[0].index, got[0].epoch, &ok("again"))
            .unwrap(),
        CompletionResult::Duplicate
    );
    // The ten in flight finish on the host that had them.
    for a in &got[30..] {
        store
            .complete(&a.job, a.index, a.epoch, &ok(&format!("out {}", a.index)))
            .unwrap();
    }
    assert_eq!(drain(&store, "a"), 60);
    assert_exactly_once(&store, &id, 100);
    check_counts(&store, &id);
}

const KILL_ENV: &str = "SPAREGRID_STORE_KILL_CHILD_DB";

/// The child half of `kill_9_mid_job_loses_no_accepted_completion`: claims
/// and completes subtasks forever, printing each accepted index after its
/// transaction committed, until the parent kills it with SIGKILL. Does
/// nothing when run on its own.
#[test]
#[ignore = "child process of kill_9_mid_job_loses_no_accepted_completion"]
fn kill_9_child_writer() {
    let Ok(path) = std::env::var(KILL_ENV) else {
        return;
    };
    let store = SqliteStore::open(&path).unwrap();
    let id = JobId::from("j-1");
    loop {
        let got = store.claim("child", 8).unwrap();
        for a in got {
            let r = store
                .complete(&a.job, a.index, a.epoch, &ok(&format!("out {}", a.index)))
                .unwrap();
            assert!(matches!(r, CompletionResult::Accepted { .. }));
            println!("done {} {}", a.job, a.index);
        }
        // Leave some subtasks assigned when the kill lands.
        store.claim("child", 3).unwrap();
        store.requeue_host("child", "churn").unwrap();
        assert_eq!(store.get_job(&id).unwrap().state, JobState::Running);
    }
}

#[test]
fn kill_9_mid_job_loses_no_accepted_completion() {
    const N: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        let id = create(&store, "kill", N, 3, 0);
        assert_eq!(id.as_str(), "j-1");
        store.upsert_host("child", "child").unwrap();
    }
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::sqlite::tests::kill_9_child_writer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reported = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while reported.len() < 500 {
        let line = lines.next().expect("child exited before the kill").unwrap();
        if let Some(rest) = line.strip_prefix("done j-1 ") {
            reported.push(rest.trim().parse::<u64>().unwrap());
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    drop(lines);

    let store = SqliteStore::open(&path).unwrap();
    let id = JobId::from("j-1");
    let done: Vec<u64> = store
        .subtasks(&id, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|s| s.state == SubtaskState::Done)
        .map(|s| s.index)
        .collect();
    for i in &reported {
        assert!(done.binary_search(i).is_ok(), "accepted {i} was lost");
    }
    check_counts(&store, &id);
    // The controller restarts: the child's host is gone, its work requeued.
    store.mark_lost("child").unwrap();
    store.upsert_host("after", "after").unwrap();
    let finished = drain(&store, "after");
    assert_eq!(finished as u64 + done.len() as u64, N);
    assert_exactly_once(&store, &id, N);
    eprintln!(
        "kill -9 after {} reported completions ({} durable); finished the other {finished}",
        reported.len(),
        done.len()
    );
}

/// Random claims, completions (ok, failed, repeated, late), withdrawals and
/// host losses, then a drain: counts always match, every index ends up in
/// the results exactly once, and nothing is ever accepted twice. Each
/// history runs twice: on a plain job, and on a job with a reduce step,
/// whose reduce subtask must appear exactly once, only after every map is
/// done, with every map output in index order on its stdin.
#[test]
fn random_histories_finish_exactly_once() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    #[derive(Debug, Clone)]
    enum Op {
        Claim(usize, usize),
        Complete(usize, bool),
        Replay(usize),
        Withdraw(usize),
        Lose(usize),
    }
    let op = prop_oneof![
        (0..3usize, 1..6usize).prop_map(|(h, n)| Op::Claim(h, n)),
        (0..64usize, any::<bool>()).prop_map(|(i, s)| Op::Complete(i, s)),
        (0..64usize).prop_map(Op::Replay),
        (0..64usize).prop_map(Op::Withdraw),
        (0..3usize).prop_map(Op::Lose),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(
            &(proptest::collection::vec(op, 1..80), any::<bool>()),
            |(ops, reduce)| {
                let store = SqliteStore::open_in_memory().unwrap();
                let n = 12;
                let id = if reduce {
                    store
                        .create_job(&with_reduce("p", 1000), &mut (0..n).map(spec))
                        .unwrap()
                } else {
                    create(&store, "p", n, 1000, 0)
                };
                let reduce_stdin: Vec<u8> = (0..n)
                    .flat_map(|i| format!("out {i}").into_bytes())
                    .collect();
                let check_reduce = |got: &[Assignment]| -> Result<(), TestCaseError> {
                    for a in got.iter().filter(|a| a.index == n) {
                        prop_assert!(reduce, "a reduce in a job without one");
                        prop_assert_eq!(&a.spec.stdin, &reduce_stdin);
                    }
                    let rec = store.get_job(&id).unwrap();
                    let maps_done = store
                        .subtasks(&id, 0, n as usize)
                        .unwrap()
                        .iter()
                        .all(|s| s.state == SubtaskState::Done);
                    // The reduce exists exactly when every map is done.
                    prop_assert_eq!(rec.counts.total, n + u64::from(reduce && maps_done));
                    Ok(())
                };
                let hosts = ["h0", "h1", "h2"];
                for h in hosts {
                    store.upsert_host(h, h).unwrap();
                }
                let mut live: Vec<Assignment> = Vec::new();
                let mut seen: Vec<(u64, u32)> = Vec::new();
                let mut accepted_ok = std::collections::BTreeSet::new();
                for op in ops {
                    match op {
                        Op::Claim(h, k) => {
                            store.heartbeat(hosts[h], &serde_json::json!({})).unwrap();
                            let got = store.claim(hosts[h], k).unwrap();
                            check_reduce(&got)?;
                            live.extend(got);
                        }
                        Op::Complete(i, success) if !live.is_empty() => {
                            let a = live.remove(i % live.len());
                            let out = if success {
                                ok(&format!("out {}", a.index))
                            } else {
                                fail("x")
                            };
                            let r = store.complete(&id, a.index, a.epoch, &out).unwrap();
                            seen.push((a.index, a.epoch));
                            if let CompletionResult::Accepted {
                                subtask: SubtaskState::Done,
                                ..
                            } = r
                            {
                                prop_assert!(accepted_ok.insert(a.index), "accepted twice");
                            }
                        }
                        Op::Replay(i) if !seen.is_empty() => {
                            let (index, epoch) = seen[i % seen.len()];
                            let r = store.complete(&id, index, epoch, &ok("replay")).unwrap();
                            prop_assert!(
                                !matches!(r, CompletionResult::Accepted { .. }),
                                "replay accepted: {:?}",
                                r
                            );
                        }
                        Op::Withdraw(i) if !live.is_empty() => {
                            let a = &live[i % live.len()];
                            store.withdraw(&id, a.index, a.epoch, "test").unwrap();
                        }
                        Op::Lose(h) => {
                            store.mark_lost(hosts[h]).unwrap();
                        }
                        _ => {}
                    }
                    check_counts(&store, &id);
                    check_reduce(&[])?;
                }
                // Whatever is still out there reports late, then the rest drains.
                for a in live {
                    store
                        .complete(&id, a.index, a.epoch, &ok(&format!("out {}", a.index)))
                        .unwrap();
                }
                for h in hosts {
                    store.mark_lost(h).unwrap();
                }
                store.upsert_host("final", "f").unwrap();
                if reduce {
                    // The rest of the maps, then the reduce, checked as claimed.
                    loop {
                        let got = store.claim("final", 5).unwrap();
                        check_reduce(&got)?;
                        if got.is_empty() {
                            break;
                        }
                        for a in got {
                            let out = ok(&format!("out {}", a.index));
                            let r = store.complete(&id, a.index, a.epoch, &out).unwrap();
                            let accepted = matches!(r, CompletionResult::Accepted { .. });
                            prop_assert!(accepted, "{:?}", r);
                        }
                    }
                    let rec = store.get_job(&id).unwrap();
                    prop_assert_eq!((rec.state, rec.counts.total), (JobState::Done, n + 1));
                    prop_assert_eq!(rec.reduce, Some(ReduceState::Done));
                    let out = store.reduce_result(&id).unwrap().unwrap();
                    prop_assert_eq!(out.index, n);
                    let results = store.results(&id, 0, usize::MAX).unwrap();
                    let idx: Vec<u64> = results.iter().map(|r| r.index).collect();
                    prop_assert_eq!(idx, (0..n).collect::<Vec<_>>());
                } else {
                    drain(&store, "final");
                    assert_exactly_once(&store, &id, n);
                }
                Ok(())
            },
        )
        .unwrap();
}

/// `cargo test -p sparegrid-controller --release -- --ignored --nocapture insert_throughput`
#[test]
#[ignore = "throughput measurement; prints subtasks/s"]
fn insert_throughput() {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("bench.db")).unwrap();
    let specs: Vec<SubtaskSpec> = (0..N).map(spec).collect();
    let t = Instant::now();
    let id = store
        .create_job(&request("bench", 3, 0), &mut specs.into_iter())
        .unwrap();
    let insert = t.elapsed();
    store.upsert_host("h", "h").unwrap();
    let t = Instant::now();
    let mut claimed = 0;
    loop {
        let got = store.claim("h", 1000).unwrap();
        if got.is_empty() {
            break;
        }
        claimed += got.len();
    }
    let claim = t.elapsed();
    let t = Instant::now();
    for i in 0..N / 2 {
        store.complete(&id, i, 1, &ok("x")).unwrap();
    }
    let complete = t.elapsed() * 2;
    let t = Instant::now();
    let reports: Vec<Report> = (N / 2..N)
        .map(|index| Report {
            job: id.clone(),
            index,
            epoch: 1,
            outcome: ok("x"),
        })
        .collect();
    for batch in reports.chunks(100) {
        for r in store.complete_many(batch).unwrap() {
            assert!(matches!(r, Ok(CompletionResult::Accepted { .. })));
        }
    }
    let batched = t.elapsed() * 2;
    assert_eq!(claimed as u64, N);
    assert_eq!(store.get_job(&id).unwrap().state, JobState::Done);
    let rate = |d: std::time::Duration| N as f64 / d.as_secs_f64();
    eprintln!(
        "{N} explicit subtasks: insert {:.0}/s ({insert:?}), claim in batches of 1000 {:.0}/s \
         ({claim:?}), complete one per transaction {:.0}/s, complete in batches of 100 {:.0}/s",
        rate(insert),
        rate(claim),
        rate(complete),
        rate(batched)
    );

    // The API's path: a planned range job, specs built at claim time.
    let req = JobRequest {
        split: Split::Range {
            start: 0,
            end: N as i64,
            chunk: 1,
        },
        ..request("planned", 3, 0)
    };
    let t = Instant::now();
    let id = store.create_planned_job(&req).unwrap();
    let insert = t.elapsed();
    let t = Instant::now();
    let mut claimed = 0;
    loop {
        let got = store.claim("h", 1000).unwrap();
        if got.is_empty() {
            break;
        }
        claimed += got.len();
    }
    let claim = t.elapsed();
    assert_eq!(claimed as u64, N);
    assert_eq!(store.get_job(&id).unwrap().counts.assigned, N);
    eprintln!(
        "{N} planned subtasks: insert {:.0}/s ({insert:?}), claim in batches of 1000 {:.0}/s \
         ({claim:?})",
        rate(insert),
        rate(claim),
    );
}

// --- reduce ----------------------------------------------------------------

fn with_reduce(name: &str, max_attempts: u32) -> JobRequest {
    JobRequest {
        reduce: Some(Command::Script {
            interpreter: "sh".into(),
            source: "sort -n".into(),
        }),
        ..request(name, max_attempts, 0)
    }
}

fn reduce_job(store: &dyn Store, n: u64, max_attempts: u32) -> JobId {
    store
        .create_job(&with_reduce("reduce", max_attempts), &mut (0..n).map(spec))
        .unwrap()
}

/// Claims everything claimable on `host`.
fn claim_all(store: &dyn Store, host: &str) -> Vec<Assignment> {
    store.claim(host, 1000).unwrap()
}

#[test]
fn reduce_is_enqueued_once_after_the_last_map() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = reduce_job(&store, 3, 3);
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.map_subtasks, rec.reduce),
        (3, Some(ReduceState::Waiting))
    );
    assert_eq!(rec.counts.total, 3, "the reduce does not exist yet");
    store.upsert_host("a", "a").unwrap();
    store.upsert_host("b", "b").unwrap();
    let maps = claim_all(&store, "a");
    assert_eq!(maps.len(), 3);
    // Subtask 1 is withdrawn and rerun on b; a's late report is stale.
    assert!(store.withdraw(&id, 1, maps[1].epoch, "test").unwrap());
    let again = claim_all(&store, "b");
    assert_eq!((again.len(), again[0].index, again[0].epoch), (1, 1, 2));
    // Out of order, with a duplicate and a stale report in between.
    assert_eq!(
        store.complete(&id, 2, maps[2].epoch, &ok("two\n")).unwrap(),
        accepted(SubtaskState::Done, JobState::Running)
    );
    assert_eq!(
        store.complete(&id, 2, maps[2].epoch, &ok("two\n")).unwrap(),
        CompletionResult::Duplicate
    );
    assert_eq!(
        store
            .complete(&id, 1, maps[1].epoch, &ok("stale\n"))
            .unwrap(),
        CompletionResult::Stale
    );
    store
        .complete(&id, 0, maps[0].epoch, &ok("zero\n"))
        .unwrap();
    assert_eq!(store.get_job(&id).unwrap().counts.total, 3);
    assert!(
        claim_all(&store, "a").is_empty(),
        "no reduce before the last map"
    );
    // The last map: the reduce is enqueued in the same transaction.
    assert_eq!(
        store.complete(&id, 1, 2, &ok("one\n")).unwrap(),
        accepted(SubtaskState::Done, JobState::Running)
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.reduce, Some(ReduceState::Queued));
    assert_eq!(
        (rec.counts.total, rec.counts.queued, rec.counts.done),
        (4, 1, 3)
    );
    check_counts(&store, &id);
    // Every repeat of a map report after that changes nothing.
    for (index, epoch) in [(1, 2), (1, 1), (0, 1), (2, 1)] {
        let r = store.complete(&id, index, epoch, &ok("again")).unwrap();
        assert!(!matches!(r, CompletionResult::Accepted { .. }), "{r:?}");
    }
    let complete_many = store
        .complete_many(&[Report {
            job: id.clone(),
            index: 1,
            epoch: 2,
            outcome: ok("again"),
        }])
        .unwrap();
    assert_eq!(
        complete_many[0].as_ref().unwrap(),
        &CompletionResult::Duplicate
    );
    assert_eq!(store.get_job(&id).unwrap().counts.total, 4);

    let reduce = claim_all(&store, "b");
    assert_eq!(reduce.len(), 1, "exactly one reduce subtask");
    let r = &reduce[0];
    assert_eq!((r.index, r.epoch), (3, 1));
    assert_eq!(r.spec.argv, ["sh", "-c", "sort -n"]);
    assert_eq!(
        r.spec.stdin, b"zero\none\ntwo\n",
        "map outputs in index order"
    );
    assert_eq!(r.spec.env[split::ENV_REDUCE], "1");
    assert_eq!(r.spec.env[split::ENV_SUBTASK_COUNT], "3");
    assert_eq!(
        store.get_job(&id).unwrap().reduce,
        Some(ReduceState::Assigned)
    );
    let subs = store.subtasks(&id, 0, 10).unwrap();
    assert_eq!(
        subs.iter().map(|s| s.reduce).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    assert_eq!(store.reduce_result(&id).unwrap(), None);

    assert_eq!(
        store.complete(&id, 3, 1, &ok("sorted\n")).unwrap(),
        accepted(SubtaskState::Done, JobState::Done)
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.state, rec.reduce),
        (JobState::Done, Some(ReduceState::Done))
    );
    assert_eq!((rec.counts.total, rec.counts.done), (4, 4));
    assert_eq!(rec.error, None);
    check_counts(&store, &id);
    let out = store.reduce_result(&id).unwrap().unwrap();
    assert_eq!(
        (out.index, &out.stdout[..], out.host.as_str()),
        (3, &b"sorted\n"[..], "b")
    );
    // Results are the maps only, once each.
    let maps: Vec<(u64, Vec<u8>)> = store
        .results(&id, 0, 100)
        .unwrap()
        .into_iter()
        .map(|a| (a.index, a.stdout))
        .collect();
    assert_eq!(
        maps,
        [
            (0, b"zero\n".to_vec()),
            (1, b"one\n".to_vec()),
            (2, b"two\n".to_vec())
        ]
    );
    // A job without a reduce has no reduce result.
    let plain = create(&store, "plain", 1, 3, 0);
    assert_eq!(store.get_job(&plain).unwrap().reduce, None);
    assert_eq!(store.reduce_result(&plain).unwrap(), None);
    assert!(matches!(
        store.reduce_result(&"j-99".into()),
        Err(StoreError::JobNotFound(_))
    ));
}

#[test]
fn a_failing_reduce_retries_with_the_same_input_then_fails_the_job() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = reduce_job(&store, 2, 2);
    store.upsert_host("a", "a").unwrap();
    store.upsert_host("b", "b").unwrap();
    for a in claim_all(&store, "a") {
        store
            .complete(&id, a.index, a.epoch, &ok(&format!("m{}\n", a.index)))
            .unwrap();
    }
    let first = claim_all(&store, "a");
    assert_eq!((first[0].index, first[0].epoch), (2, 1));
    assert_eq!(
        store.complete(&id, 2, 1, &fail("reduce crashed")).unwrap(),
        accepted(SubtaskState::Queued, JobState::Running)
    );
    // The retry goes anywhere, with the same stdin, built again.
    let second = claim_all(&store, "b");
    assert_eq!((second[0].index, second[0].epoch), (2, 2));
    assert_eq!(second[0].spec, first[0].spec);
    assert_eq!(second[0].spec.stdin, b"m0\nm1\n");
    assert_eq!(
        store.complete(&id, 2, 2, &fail("again")).unwrap(),
        accepted(SubtaskState::Dead, JobState::Failed)
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.state, rec.reduce),
        (JobState::Failed, Some(ReduceState::Dead))
    );
    assert_eq!((rec.counts.done, rec.counts.dead), (2, 1));
    check_counts(&store, &id);
    let errors: Vec<Option<String>> = store
        .attempts(&id, 2)
        .unwrap()
        .into_iter()
        .map(|a| a.error)
        .collect();
    assert_eq!(
        errors,
        [Some("reduce crashed".into()), Some("again".into())]
    );
    assert_eq!(store.reduce_result(&id).unwrap(), None);
}

#[test]
fn a_job_that_fails_in_its_maps_never_reduces() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = reduce_job(&store, 2, 1);
    store.upsert_host("a", "a").unwrap();
    let maps = claim_all(&store, "a");
    store.complete(&id, 0, maps[0].epoch, &fail("bad")).unwrap();
    assert_eq!(
        store.complete(&id, 1, maps[1].epoch, &ok("fine")).unwrap(),
        accepted(SubtaskState::Done, JobState::Failed)
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.reduce, rec.counts.total),
        (Some(ReduceState::Skipped), 2)
    );
    assert!(claim_all(&store, "a").is_empty());
}

#[test]
fn cancel_while_reducing_stops_the_reduce() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = reduce_job(&store, 2, 3);
    store.upsert_host("a", "a").unwrap();
    for a in claim_all(&store, "a") {
        store.complete(&id, a.index, a.epoch, &ok("x")).unwrap();
    }
    let r = claim_all(&store, "a");
    assert_eq!(r[0].index, 2);
    let c = store.cancel_job(&id).unwrap();
    assert!(c.changed);
    assert_eq!(c.dropped_queued, 0);
    let stop: Vec<(u64, u32, Option<&str>)> = c
        .stop
        .iter()
        .map(|s| (s.index, s.epoch, s.host.as_deref()))
        .collect();
    assert_eq!(stop, [(2, 1, Some("a"))], "the reduce is told to stop");
    assert_eq!(
        store.complete(&id, 2, 1, &ok("late")).unwrap(),
        CompletionResult::Stale
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.state, rec.reduce),
        (JobState::Cancelled, Some(ReduceState::Cancelled))
    );
    assert_eq!((rec.counts.done, rec.counts.cancelled), (2, 1));
    check_counts(&store, &id);
    assert_eq!(store.reduce_result(&id).unwrap(), None);

    // Cancelled while the maps run: the reduce never exists.
    let id = reduce_job(&store, 2, 3);
    claim_all(&store, "a");
    store.cancel_job(&id).unwrap();
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.reduce, rec.counts.total),
        (Some(ReduceState::Skipped), 2)
    );
    assert_eq!(
        store.complete(&id, 1, 1, &ok("late")).unwrap(),
        CompletionResult::Stale
    );
    assert_eq!(store.get_job(&id).unwrap().counts.total, 2);
}

#[test]
fn restart_mid_job_still_reduces_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.db");
    let store = SqliteStore::open(&path).unwrap();
    let id = reduce_job(&store, 4, 3);
    store.upsert_host("a", "a").unwrap();
    let maps = claim_all(&store, "a");
    for a in &maps[..3] {
        store
            .complete(&id, a.index, a.epoch, &ok(&format!("{}\n", a.index)))
            .unwrap();
    }
    drop(store);

    // Restart before the last map; the last map lands after it.
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.get_job(&id).unwrap().reduce,
        Some(ReduceState::Waiting)
    );
    store.complete(&id, 3, maps[3].epoch, &ok("3\n")).unwrap();
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.reduce, rec.counts.total),
        (Some(ReduceState::Queued), 5)
    );
    let r = claim_all(&store, "a");
    assert_eq!(r.len(), 1);
    drop(store);

    // Restart with the reduce running: its host is lost, it runs again.
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.get_job(&id).unwrap().reduce,
        Some(ReduceState::Assigned)
    );
    store.mark_lost("a").unwrap();
    store.upsert_host("b", "b").unwrap();
    let again = claim_all(&store, "b");
    assert_eq!((again.len(), again[0].index, again[0].epoch), (1, 4, 2));
    assert_eq!(again[0].spec.stdin, b"0\n1\n2\n3\n");
    assert_eq!(again[0].spec, r[0].spec);
    assert_eq!(
        store.complete(&id, 4, 1, &ok("from a")).unwrap(),
        CompletionResult::Stale
    );
    store.complete(&id, 4, 2, &ok("6\n")).unwrap();
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.state, rec.counts.total, rec.counts.done),
        (JobState::Done, 5, 5)
    );
    assert_eq!(store.reduce_result(&id).unwrap().unwrap().stdout, b"6\n");
    check_counts(&store, &id);
}

#[test]
fn a_cut_map_output_fails_the_job_instead_of_reducing() {
    // Cut by the agent: the reported size is larger than what it sent.
    let store = SqliteStore::open_in_memory().unwrap();
    let id = reduce_job(&store, 3, 3);
    store.upsert_host("a", "a").unwrap();
    let maps = claim_all(&store, "a");
    store
        .complete(&id, 0, maps[0].epoch, &ok("full\n"))
        .unwrap();
    let cut = Outcome {
        stdout_size: 5000,
        ..ok("first 17 bytes...")
    };
    store.complete(&id, 2, maps[2].epoch, &cut).unwrap();
    assert_eq!(
        store
            .complete(&id, 1, maps[1].epoch, &ok("full\n"))
            .unwrap(),
        accepted(SubtaskState::Done, JobState::Failed)
    );
    let rec = store.get_job(&id).unwrap();
    assert_eq!(
        (rec.state, rec.reduce),
        (JobState::Failed, Some(ReduceState::Dead))
    );
    let error = rec.error.expect("the job says why");
    assert!(error.contains("subtask 2"), "{error}");
    assert!(error.contains("17 of its 5000 bytes"), "{error}");
    assert_eq!(
        (rec.counts.total, rec.counts.dead, rec.counts.done),
        (4, 1, 3)
    );
    check_counts(&store, &id);
    let reduce = &store.subtasks(&id, 3, 1).unwrap()[0];
    assert!(reduce.reduce);
    assert_eq!(
        (reduce.state, reduce.epoch),
        (SubtaskState::Dead, 0),
        "never ran"
    );
    assert_eq!(reduce.error.as_deref(), Some(error.as_str()));
    assert!(claim_all(&store, "a").is_empty());

    // Cut by the store's own output cap.
    let store = SqliteStore::open_with(
        dir_db().path().join("s.db"),
        StoreOptions {
            output_cap: 4,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let id = reduce_job(&store, 2, 3);
    store.upsert_host("a", "a").unwrap();
    for a in claim_all(&store, "a") {
        let out = if a.index == 0 { "abc" } else { "abcdef" };
        store.complete(&id, a.index, a.epoch, &ok(out)).unwrap();
    }
    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert!(rec
        .error
        .unwrap()
        .contains("subtask 1 was cut to 4 of its 6 bytes"));

    // Uploaded whole as a file: nothing inline, the whole size reported.
    let store =
        SqliteStore::open_with(dir_db().path().join("s.db"), StoreOptions::default()).unwrap();
    let id = reduce_job(&store, 2, 3);
    store.upsert_host("a", "a").unwrap();
    for a in claim_all(&store, "a") {
        let out = if a.index == 0 {
            ok("abc")
        } else {
            Outcome {
                stdout: Vec::new(),
                stdout_size: 5 << 20,
                ..ok("")
            }
        };
        store.complete(&id, a.index, a.epoch, &out).unwrap();
    }
    let rec = store.get_job(&id).unwrap();
    assert_eq!(rec.state, JobState::Failed);
    let error = rec.error.unwrap();
    assert!(
        error.contains("subtask 1 (5242880 bytes) is kept as a file"),
        "{error}"
    );
    assert!(!error.contains("cut to"), "{error}");
}

fn dir_db() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn oversized_map_outputs_fail_the_job_instead_of_reducing() {
    let dir = dir_db();
    let store = SqliteStore::open_with(
        dir.path().join("s.db"),
        StoreOptions {
            max_reduce_input: 10,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    // 2 × 5 bytes fit exactly; 3 × 5 do not.
    let fits = reduce_job(&store, 2, 3);
    let over = reduce_job(&store, 3, 3);
    store.upsert_host("a", "a").unwrap();
    for a in store.claim("a", 5).unwrap() {
        store
            .complete(&a.job, a.index, a.epoch, &ok("12345"))
            .unwrap();
    }
    assert_eq!(
        store.get_job(&fits).unwrap().reduce,
        Some(ReduceState::Queued)
    );
    let rec = store.get_job(&over).unwrap();
    assert_eq!(
        (rec.state, rec.reduce),
        (JobState::Failed, Some(ReduceState::Dead))
    );
    let error = rec.error.unwrap();
    assert!(error.contains("15 bytes"), "{error}");
    assert!(error.contains("limit of 10 bytes"), "{error}");
    let r = claim_all(&store, "a");
    assert_eq!(
        (r.len(), r[0].job.clone(), r[0].spec.stdin.len()),
        (1, fits, 10)
    );
}

// --- planned jobs ----------------------------------------------------------

fn planned(split: Split) -> JobRequest {
    JobRequest {
        command: Command::Argv(vec!["run".into(), "{start}-{end}".into()]),
        split,
        ..request("planned", 3, 0)
    }
}

#[test]
fn planned_jobs_build_each_spec_at_claim_as_the_splitter_does() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.upsert_host("a", "a").unwrap();
    let reqs = [
        planned(Split::Range {
            start: -10,
            end: 95,
            chunk: 7,
        }),
        planned(Split::Items {
            items: (0..23).map(|i| format!("item {i}")).collect(),
            batch: 4,
        }),
        planned(Split::Lines {
            input: "a\nb\r\n\nlast line without newline".into(),
            block: 2,
        }),
    ];
    for req in &reqs {
        let id = store.create_planned_job(req).unwrap();
        let want = split::split(req).unwrap();
        let rec = store.get_job(&id).unwrap();
        assert_eq!(rec.counts.total, want.len() as u64);
        assert_eq!(rec.map_subtasks, want.len() as u64);
        assert_eq!(store.job_request(&id).unwrap(), *req);
        // Claimed in a few rounds, so specs come from several queries.
        let mut got = Vec::new();
        loop {
            let batch = store.claim("a", 3).unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(batch.into_iter().map(|a| a.spec));
        }
        assert_eq!(got, want);
        check_counts(&store, &id);
    }
}

#[test]
fn planned_reduce_job_runs_through() {
    let store = SqliteStore::open_in_memory().unwrap();
    let req = JobRequest {
        reduce: Some(Command::Argv(vec!["paste".into(), "-sd+".into()])),
        ..planned(Split::Range {
            start: 0,
            end: 10,
            chunk: 4,
        })
    };
    let id = store.create_planned_job(&req).unwrap();
    store.upsert_host("a", "a").unwrap();
    for a in claim_all(&store, "a") {
        let sum: i64 = (a.spec.env["SPAREGRID_START"].parse::<i64>().unwrap()
            ..a.spec.env["SPAREGRID_END"].parse().unwrap())
            .sum();
        store
            .complete(&id, a.index, a.epoch, &ok(&format!("{sum}\n")))
            .unwrap();
    }
    let r = claim_all(&store, "a");
    assert_eq!(r[0].spec.argv, ["paste", "-sd+"]);
    assert_eq!(r[0].spec.stdin, b"6\n22\n17\n");
    store.complete(&id, 3, 1, &ok("45\n")).unwrap();
    assert_eq!(store.get_job(&id).unwrap().state, JobState::Done);
}

#[test]
fn an_unplannable_request_stores_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    let bad = planned(Split::Range {
        start: 5,
        end: 5,
        chunk: 1,
    });
    match store.create_planned_job(&bad) {
        Err(StoreError::Unplannable { name, source }) => {
            assert_eq!(
                (name.as_str(), source.field.as_str()),
                ("planned", "split.range.end")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(store.list_jobs(None, 10).unwrap().is_empty());
}

#[test]
fn bounds_that_do_not_fit_the_request_are_corrupt_not_a_panic() {
    let dir = dir_db();
    let path = dir.path().join("s.db");
    let store = SqliteStore::open(&path).unwrap();
    let id = store
        .create_planned_job(&planned(Split::Items {
            items: vec!["x".into(), "y".into()],
            batch: 1,
        }))
        .unwrap();
    store.upsert_host("a", "a").unwrap();
    drop(store);
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE subtasks SET hi = 99 WHERE idx = 0", [])
        .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    match store.claim("a", 1) {
        Err(StoreError::Corrupt { op, detail, .. }) => {
            assert_eq!(op, "claim");
            assert!(
                detail.contains("0..99") && detail.contains(id.as_str()),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Nothing was claimed: the transaction rolled back.
    assert_eq!(store.get_job(&id).unwrap().counts.queued, 2);
}

#[test]
fn a_version_1_store_is_migrated_with_its_jobs() {
    let dir = dir_db();
    let path = dir.path().join("v1.db");
    {
        // What a controller of schema version 1 left behind.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let req = serde_json::to_string(&with_reduce("old", 3)).unwrap();
        conn.execute(
            "INSERT INTO jobs (name, request, state, priority, max_attempts, created_ms, \
             n_total, n_queued, n_assigned, n_done) VALUES ('old', ?1, 'running', 0, 3, 1, 3, 2, 0, 1)",
            [req],
        )
        .unwrap();
        for i in 0..3u64 {
            let s = spec(i);
            conn.execute(
                "INSERT INTO subtasks (job, idx, state, epoch, argv, env, stdin) \
                 VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    i,
                    if i == 0 { 2 } else { 0 },
                    u32::from(i == 0),
                    serde_json::to_string(&s.argv).unwrap(),
                    serde_json::to_string(&s.env).unwrap(),
                    (!s.stdin.is_empty()).then_some(s.stdin),
                ],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO attempts (job, idx, attempt, host, state, started_ms, stdout, stdout_size) \
             VALUES (1, 0, 1, 'a', 1, 1, x'6f7574203000', 6)",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let version: i64 = store
        .conn
        .lock()
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let id = JobId::from("j-1");
    let rec = store.get_job(&id).unwrap();
    assert_eq!((rec.map_subtasks, rec.counts.total), (3, 3));
    assert_eq!(
        rec.reduce, None,
        "a version-1 job keeps its promise: no reduce"
    );
    check_counts(&store, &id);
    store.upsert_host("a", "a").unwrap();
    let got = claim_all(&store, "a");
    assert_eq!(
        got.iter().map(|a| a.spec.clone()).collect::<Vec<_>>(),
        [spec(1), spec(2)],
        "stored specs survive the migration"
    );
    for a in &got {
        store
            .complete(&id, a.index, a.epoch, &ok(&format!("out {}", a.index)))
            .unwrap();
    }
    assert_eq!(store.get_job(&id).unwrap().state, JobState::Done);
    assert_eq!(store.results(&id, 0, 10).unwrap().len(), 3);
    // And a new job in the migrated store gets the next id.
    assert_eq!(create(&store, "new", 1, 3, 0).as_str(), "j-2");
}
