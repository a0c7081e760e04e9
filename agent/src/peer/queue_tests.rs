//! [`PeerQueue`] transitions, steal-half sizes, the min-runtime rule and
//! restart recovery. A crash is `std::mem::forget` of the queue (the
//! connection is never closed, like kill -9) and a reopen of the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sparegrid_proto::grid::{Assignment, AttemptRef};

use super::*;

pub(crate) fn assignment(job: &str, index: u64) -> Assignment {
    Assignment {
        network: sparegrid_proto::Network::None,
        attempt: AttemptRef {
            job: job.into(),
            index,
            epoch: 1,
        },
        argv: vec!["/bin/true".into(), format!("{index}")],
        env: BTreeMap::from([("N".to_owned(), index.to_string())]),
        stdin: vec![0, 1, 2, index as u8],
        timeout_ms: 1000,
        vcpus: 1,
        memory_mib: 64,
    }
}

fn at(job: &str, index: u64) -> AttemptRef {
    AttemptRef {
        job: job.into(),
        index,
        epoch: 1,
    }
}

/// kill -9: the connection is leaked, never closed; then the file is
/// opened again the way a restarted agent opens it.
pub(crate) fn crash_and_reopen(q: PeerQueue, dir: &Path) -> PeerQueue {
    let id = q.self_id().to_owned();
    std::mem::forget(q);
    PeerQueue::open(dir, &id).unwrap()
}

fn states(q: &PeerQueue) -> BTreeMap<u64, SubtaskState> {
    q.rows()
        .unwrap()
        .into_iter()
        .map(|r| (r.attempt.index, r.state))
        .collect()
}

fn seed(q: &PeerQueue, job: &str, range: std::ops::Range<u64>) {
    let v: Vec<Assignment> = range.map(|i| assignment(job, i)).collect();
    q.enqueue(&v, 1).unwrap();
}

#[test]
fn enqueue_is_idempotent_per_attempt_and_keeps_the_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "a").unwrap();
    assert_eq!(
        q.enqueue(&[assignment("j", 0), assignment("j", 1)], 1)
            .unwrap(),
        2
    );
    assert_eq!(
        q.enqueue(&[assignment("j", 1), assignment("j", 2)], 1)
            .unwrap(),
        1
    );
    let mut other_epoch = assignment("j", 1);
    other_epoch.attempt.epoch = 2;
    assert_eq!(
        q.enqueue(&[other_epoch], 1).unwrap(),
        1,
        "another epoch is another attempt"
    );
    assert_eq!(q.counts().unwrap().queued, 4);
    let first = q.take_next(2).unwrap().unwrap();
    assert_eq!(first, assignment("j", 0), "the assignment comes back whole");
    // Seeding an attempt again after it ran does not queue it twice.
    q.finish(&at("j", 0), 5, b"r", 3).unwrap();
    assert_eq!(q.enqueue(&[assignment("j", 0)], 4).unwrap(), 0);
    assert_eq!(states(&q)[&0], SubtaskState::Done);
}

#[test]
fn take_next_runs_in_order_and_finish_records_the_mean() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "a").unwrap();
    seed(&q, "j", 0..3);
    let order: Vec<u64> = (0..3)
        .map(|_| q.take_next(1).unwrap().unwrap().attempt.index)
        .collect();
    assert_eq!(order, [0, 1, 2]);
    assert_eq!(q.take_next(1).unwrap(), None);
    assert_eq!(q.job_mean_ms("j").unwrap(), None);
    q.finish(&at("j", 0), 10, b"", 2).unwrap();
    q.finish(&at("j", 1), 31, b"", 2).unwrap();
    assert_eq!(q.job_mean_ms("j").unwrap(), Some(20));
    let e = q.finish(&at("j", 1), 1, b"", 2).unwrap_err();
    assert!(matches!(e, QueueError::NotRunning { index: 1, .. }), "{e}");
    assert!(q.finish(&at("j", 9), 1, b"", 2).is_err());
    q.requeue(&at("j", 2), 3).unwrap();
    assert!(
        q.requeue(&at("j", 2), 3).is_err(),
        "only a running one goes back"
    );
    assert_eq!(q.take_next(4).unwrap().unwrap().attempt.index, 2);
    let c = q.counts().unwrap();
    assert_eq!((c.queued, c.running, c.done), (0, 1, 2));
}

#[test]
fn a_crash_between_any_two_operations_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = PeerQueue::open(dir.path(), "a").unwrap();
    seed(&q, "j", 0..3);
    q = crash_and_reopen(q, dir.path());
    assert_eq!(q.counts().unwrap().queued, 3);

    let a0 = q.take_next(1).unwrap().unwrap().attempt;
    q = crash_and_reopen(q, dir.path());
    assert_eq!(
        q.recovery(),
        Recovery {
            requeued: 1,
            aborted: 0
        }
    );
    assert_eq!(
        states(&q)[&a0.index],
        SubtaskState::Queued,
        "the lost run is queued again"
    );
    assert_eq!(
        q.take_next(1).unwrap().unwrap().attempt,
        a0,
        "and keeps its place"
    );

    q.finish(&a0, 7, b"report-0", 2).unwrap();
    q = crash_and_reopen(q, dir.path());
    assert_eq!(q.recovery(), Recovery::default());
    assert_eq!(states(&q)[&0], SubtaskState::Done);
    assert_eq!(q.job_mean_ms("j").unwrap(), Some(7));
    assert_eq!(
        q.unreported(10).unwrap(),
        vec![(a0.clone(), b"report-0".to_vec())]
    );

    q.mark_reported(std::slice::from_ref(&a0)).unwrap();
    q = crash_and_reopen(q, dir.path());
    assert!(q.unreported(10).unwrap().is_empty());

    let a1 = q.take_next(3).unwrap().unwrap().attempt;
    q.requeue(&a1, 3).unwrap();
    q = crash_and_reopen(q, dir.path());
    let c = q.counts().unwrap();
    assert_eq!((c.queued, c.running, c.done), (2, 0, 1));
    assert_eq!(q.rows().unwrap().len(), 3);
}

#[test]
fn the_outbox_keeps_reports_until_marked() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "a").unwrap();
    seed(&q, "j", 0..3);
    for i in 0..3 {
        let a = q.take_next(i).unwrap().unwrap().attempt;
        q.finish(&a, 1, format!("r{i}").as_bytes(), 10 + i).unwrap();
    }
    let out = q.unreported(2).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1, b"r0");
    assert_eq!(
        q.mark_reported(&[out[0].0.clone(), at("j", 99)]).unwrap(),
        1
    );
    let rest: Vec<u64> = q
        .unreported(10)
        .unwrap()
        .iter()
        .map(|(a, _)| a.index)
        .collect();
    assert_eq!(rest, [1, 2]);
}

#[test]
fn give_moves_half_of_the_queue_at_most_want_newest_first() {
    for queued in 0..8u64 {
        for want in 1..6u32 {
            let dir = tempfile::tempdir().unwrap();
            let q = PeerQueue::open(dir.path(), "v").unwrap();
            seed(&q, "j", 0..queued);
            let given = q.give("t#1", "t", want, 0, false, 5).unwrap();
            let expect = (queued.div_ceil(2)).min(want as u64);
            assert_eq!(given.len() as u64, expect, "queued {queued} want {want}");
            let idx: Vec<u64> = given.iter().map(|a| a.attempt.index).collect();
            let newest: Vec<u64> = (0..queued).rev().take(expect as usize).collect();
            assert_eq!(idx, newest, "queued {queued} want {want}");
            let c = q.counts().unwrap();
            assert_eq!((c.queued, c.given), (queued - expect, expect));
        }
    }
}

#[test]
fn give_never_moves_a_running_subtask() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "v").unwrap();
    seed(&q, "j", 0..4);
    let running: Vec<u64> = (0..3)
        .map(|_| q.take_next(1).unwrap().unwrap().attempt.index)
        .collect();
    let given = q.give("t#1", "t", 10, 0, false, 2).unwrap();
    assert_eq!(given.len(), 1, "half of the one queued, rounded up");
    assert_eq!(given[0].attempt.index, 3);
    assert!(q.give("t#2", "t", 10, 0, false, 2).unwrap().is_empty());
    for i in running {
        assert_eq!(states(&q)[&i], SubtaskState::Running);
    }
}

#[test]
fn give_skips_jobs_that_run_shorter_than_the_trade_cost() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "v").unwrap();
    // Job "short" averages 10 ms, "long" 50 ms, "new" has no finished run.
    for (job, ms) in [("short", 10), ("long", 50)] {
        seed(&q, job, 0..1);
        let a = q.take_next(1).unwrap().unwrap().attempt;
        assert_eq!(a.job, job);
        q.finish(&a, ms, b"", 1).unwrap();
    }
    seed(&q, "short", 1..5);
    seed(&q, "long", 1..5);
    seed(&q, "new", 0..4);
    let jobs = |v: &[Assignment]| {
        let mut j: Vec<String> = v.iter().map(|a| a.attempt.job.clone()).collect();
        j.sort();
        j.dedup();
        j
    };
    let g = q.give("t#1", "t", 100, 20, true, 2).unwrap();
    assert_eq!(
        jobs(&g),
        ["long"],
        "need_stats: only jobs with a mean ≥ 20 ms"
    );
    assert_eq!(g.len(), 4);
    let g = q.give("t#2", "t", 100, 20, false, 2).unwrap();
    assert_eq!(jobs(&g), ["new"], "without need_stats, unknown jobs may go");
    let g = q.give("t#3", "t", 100, 10, false, 2).unwrap();
    assert_eq!(jobs(&g), ["short"], "a mean equal to the cost is worth it");
    assert_eq!(g.len(), 2, "half of the 4 queued");
    let g = q.give("t#4", "t", 100, 51, false, 2).unwrap();
    assert!(g.is_empty());
}

#[test]
fn a_repeated_steal_gets_the_same_answer_and_commit_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "v").unwrap();
    seed(&q, "j", 0..6);
    let first = q.give("t#1", "t", 2, 0, false, 1).unwrap();
    assert_eq!(q.give("t#1", "t", 2, 0, false, 1).unwrap(), first);
    let e = q.give("t#1", "x", 2, 0, false, 1).unwrap_err();
    assert!(matches!(e, QueueError::TradeConflict { .. }), "{e}");
    assert_eq!(q.counts().unwrap().given, 2);

    // The thief lists one of the two: that one goes, the other comes back.
    let listed = vec![first[0].attempt.clone()];
    let e = q.commit_given("t#1", "x", &listed, 2).unwrap_err();
    assert!(matches!(e, QueueError::TradeConflict { .. }), "{e}");
    let r = q.commit_given("t#1", "t", &listed, 2).unwrap();
    assert_eq!(
        r,
        CommitResult {
            moved: 1,
            returned: 1,
            repeated: false
        }
    );
    let r = q.commit_given("t#1", "t", &listed, 3).unwrap();
    assert!(r.repeated && r.moved == 0);
    let c = q.counts().unwrap();
    assert_eq!((c.queued, c.given, c.gone), (5, 0, 1));
    let gone = q
        .rows()
        .unwrap()
        .into_iter()
        .find(|r| r.state == SubtaskState::Gone)
        .unwrap();
    assert_eq!(gone.owner.as_deref(), Some("t"));
    assert_eq!(gone.trade.as_deref(), Some("t#1"));
    // A committed trade asked again answers what went (not new subtasks).
    assert_eq!(
        q.give("t#1", "t", 2, 0, false, 4).unwrap(),
        vec![first[0].clone()]
    );
    assert_eq!(
        q.steal_counts().unwrap()["t"],
        StealCounts {
            stolen: 0,
            given: 1
        }
    );
    assert!(matches!(
        q.commit_given("t#404", "t", &[], 1).unwrap_err(),
        QueueError::UnknownTrade(_)
    ));
}

#[test]
fn take_back_requeues_and_a_late_commit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "v").unwrap();
    seed(&q, "j", 0..4);
    let g = q.give("t#1", "t", 4, 0, false, 100).unwrap();
    assert_eq!(g.len(), 2);
    assert_eq!(
        q.given_trades(Duration::from_millis(50), 120).unwrap(),
        vec![]
    );
    let open = q.given_trades(Duration::from_millis(50), 150).unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!((open[0].thief.as_str(), open[0].subtasks), ("t", 2));
    assert_eq!(q.take_back("t#1", 200).unwrap(), 2);
    assert_eq!(q.take_back("t#1", 200).unwrap(), 0, "idempotent");
    assert_eq!(q.counts().unwrap().queued, 4);
    let e = q
        .commit_given("t#1", "t", &[g[0].attempt.clone()], 201)
        .unwrap_err();
    assert!(matches!(e, QueueError::TradeConflict { .. }), "{e}");
    assert!(q.give("t#1", "t", 4, 0, false, 1).unwrap().is_empty());
    assert!(q.given_trades(Duration::ZERO, 300).unwrap().is_empty());
}

#[test]
fn thief_trades_get_unique_ids_and_restart_aborts_pending_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = PeerQueue::open(dir.path(), "t").unwrap();
    let t1 = q.begin_trade("v", 1).unwrap();
    let t2 = q.begin_trade("v", 1).unwrap();
    assert_ne!(t1, t2);
    assert!(t1.starts_with("t#"), "{t1}");
    assert_eq!(q.thief_trade(&t1).unwrap(), ThiefTrade::Pending);
    let got = q.receive(&t2, &[assignment("j", 5)], 2).unwrap();
    assert_eq!(got, ThiefTrade::Received(vec![at("j", 5)]));
    q = crash_and_reopen(q, dir.path());
    assert_eq!(
        q.recovery(),
        Recovery {
            requeued: 0,
            aborted: 1
        }
    );
    assert_eq!(q.thief_trade(&t1).unwrap(), ThiefTrade::Aborted);
    assert_eq!(
        q.thief_trade(&t2).unwrap(),
        ThiefTrade::Received(vec![at("j", 5)])
    );
    assert_eq!(q.thief_trade("t#999").unwrap(), ThiefTrade::Unknown);
    // An aborted trade receives nothing, ever.
    assert_eq!(
        q.receive(&t1, &[assignment("j", 6)], 3).unwrap(),
        ThiefTrade::Aborted
    );
    assert_eq!(q.rows().unwrap().len(), 1);
    // Receiving again is idempotent.
    assert_eq!(
        q.receive(&t2, &[assignment("j", 5), assignment("j", 7)], 3)
            .unwrap(),
        ThiefTrade::Received(vec![at("j", 5)])
    );
    assert_eq!(q.rows().unwrap().len(), 1);
    // Ids are never reused after a restart, even for the latest trade.
    let t3 = q.begin_trade("v", 4).unwrap();
    assert!(t3 != t1 && t3 != t2);
    assert_eq!(
        q.steal_counts().unwrap()["v"],
        StealCounts {
            stolen: 1,
            given: 0
        }
    );
    // abort_trade leaves a received trade received.
    assert!(matches!(
        q.abort_trade(&t2, 5).unwrap(),
        ThiefTrade::Received(_)
    ));
    assert_eq!(q.abort_trade(&t3, 5).unwrap(), ThiefTrade::Aborted);
}

#[test]
fn stale_pending_trades_are_aborted_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "t").unwrap();
    let old = q.begin_trade("v", 1000).unwrap();
    let new = q.begin_trade("v", 1900).unwrap();
    assert_eq!(
        q.abort_stale_pending(Duration::from_millis(500), 2000)
            .unwrap(),
        1
    );
    assert_eq!(q.thief_trade(&old).unwrap(), ThiefTrade::Aborted);
    assert_eq!(q.thief_trade(&new).unwrap(), ThiefTrade::Pending);
}

#[test]
fn a_subtask_that_comes_back_is_revived_and_a_live_duplicate_is_not_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "a").unwrap();
    seed(&q, "j", 0..2);
    // j/1 goes to b …
    let g = q.give("b#1", "b", 1, 0, false, 1).unwrap();
    q.commit_given("b#1", "b", &[g[0].attempt.clone()], 2)
        .unwrap();
    assert_eq!(states(&q)[&1], SubtaskState::Gone);
    // … and comes back in a trade of a's own; j/0 is still queued here.
    let t = q.begin_trade("b", 3).unwrap();
    let got = q
        .receive(&t, &[assignment("j", 1), assignment("j", 0)], 4)
        .unwrap();
    assert_eq!(got, ThiefTrade::Received(vec![at("j", 0), at("j", 1)]));
    let s = states(&q);
    assert_eq!((s[&0], s[&1]), (SubtaskState::Queued, SubtaskState::Queued));
    assert_eq!(q.rows().unwrap().len(), 2);
    // The revived one joins the back of the queue.
    assert_eq!(q.take_next(5).unwrap().unwrap().attempt.index, 0);
}

#[test]
fn a_newer_schema_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    drop(PeerQueue::open(dir.path(), "a").unwrap());
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let e = PeerQueue::open(dir.path(), "a").unwrap_err();
    assert!(
        e.to_string().contains(DB_FILE) && e.to_string().contains("99"),
        "{e}"
    );
}

#[test]
fn a_subtask_stolen_back_before_its_trade_settled_is_revived_once() {
    // a gives j/0 to b in b#1; b received it but a has not heard (no
    // Commit). a then steals j/0 back from b in a#1.
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "a").unwrap();
    seed(&q, "j", 0..1);
    assert_eq!(q.give("b#1", "b", 1, 0, false, 1).unwrap().len(), 1);
    let t = q.begin_trade("b", 2).unwrap();
    let got = q.receive(&t, &[assignment("j", 0)], 3).unwrap();
    assert_eq!(got, ThiefTrade::Received(vec![at("j", 0)]));
    assert_eq!(states(&q)[&0], SubtaskState::Queued);
    // b#1 resolves (b received it): nothing is left to move, nothing returns.
    let r = q.commit_given("b#1", "b", &[at("j", 0)], 4).unwrap();
    assert_eq!((r.moved, r.returned), (0, 0));
    assert_eq!(states(&q)[&0], SubtaskState::Queued);
    assert_eq!(q.rows().unwrap().len(), 1);
}

#[test]
fn prune_forgets_finished_jobs_only_after_keep() {
    let dir = tempfile::tempdir().unwrap();
    let q = PeerQueue::open(dir.path(), "v").unwrap();
    // Job "done": every row finished and reported at t = 10.
    seed(&q, "done", 0..2);
    for _ in 0..2 {
        let a = q.take_next(5).unwrap().unwrap().attempt;
        q.finish(&a, 1, b"r", 10).unwrap();
    }
    let sent: Vec<AttemptRef> = q.unreported(10).unwrap().into_iter().map(|r| r.0).collect();
    assert_eq!(q.mark_reported(&sent).unwrap(), 2);
    // Job "gone": one row went to a thief in a committed trade, the other
    // ran here and was reported.
    seed(&q, "gone", 0..2);
    let given = q.give("t#1", "t", 1, 0, false, 10).unwrap();
    assert_eq!(given.len(), 1);
    let listed: Vec<AttemptRef> = given.iter().map(|g| g.attempt.clone()).collect();
    q.commit_given("t#1", "t", &listed, 10).unwrap();
    let a = q.take_next(10).unwrap().unwrap().attempt;
    q.finish(&a, 1, b"r", 10).unwrap();
    q.mark_reported(&[a]).unwrap();
    // Job "open": one finished but not reported, one still queued.
    seed(&q, "open", 0..2);
    let a = q.take_next(5).unwrap().unwrap().attempt;
    q.finish(&a, 1, b"r", 10).unwrap();

    let keep = Duration::from_millis(100);
    // Too recent: nothing goes.
    assert_eq!(q.prune(keep, 50).unwrap(), 0);
    assert_eq!(q.rows().unwrap().len(), 6);

    let gone_rows = q.prune(keep, 1_000).unwrap();
    assert_eq!(gone_rows, 4, "'done' and 'gone' go, 'open' stays");
    let jobs: std::collections::BTreeSet<String> = q
        .rows()
        .unwrap()
        .into_iter()
        .map(|r| r.attempt.job)
        .collect();
    assert_eq!(jobs, ["open".to_owned()].into());
    assert_eq!(q.job_mean_ms("done").unwrap(), None);
    assert!(!q.steals_by_job().unwrap().contains_key("gone"));
    // The outbox still holds the unsent report; the per-peer counters stay.
    assert_eq!(q.unreported(10).unwrap().len(), 1);
    assert_eq!(q.steal_counts().unwrap()["t"].given, 1);
    // A committed trade that was pruned is unknown afterwards.
    assert!(matches!(
        q.commit_given("t#1", "t", &listed, 2_000).unwrap_err(),
        QueueError::UnknownTrade(_)
    ));
}

#[test]
fn a_version_1_file_gains_the_v2_indexes_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO subtasks (job, idx, epoch, assignment, state, since_ms)
             VALUES ('j', 0, 1, ?1, 0, 1)",
            [rmp_serde::to_vec_named(&assignment("j", 0)).unwrap()],
        )
        .unwrap();
    }
    let q = PeerQueue::open(dir.path(), "v").unwrap();
    assert_eq!(q.counts().unwrap().queued, 1);
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index'
             AND name IN ('subtasks_unreported', 'subtasks_job')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 2);
}
