//! End-to-end tests of the controller with real processes: one
//! `sparegrid-controller`, three `sparegrid-agent`s (process runtime, each
//! with its own cgroup partition and port, registered to the controller) and
//! the `sparegrid` CLI as the user's client.
//!
//! Each subtask of the range jobs here records its start in a marker file
//! (index, epoch and the cgroup it ran in, which names the agent), sleeps,
//! and prints its bounds; so the tests know which host started which attempt
//! and check that the results cover the range exactly once.
//!
//! Load: all agents share this machine, whose CPU other builds and tests
//! keep busy, so a CPU-driven load factor cannot single out one agent (a
//! CPU-only agent was withdrawn by a neighbour's compile the moment the job
//! started). The host to be loaded counts network only, on its own uplink (a
//! veth pair, see [`Uplink`]), and its customer load is real traffic sent
//! through that link at four times its configured capacity; the two other
//! hosts count memory only. Nothing else on the machine moves either.
//!
//! `root_` tests need root (cgroups) and are skipped otherwise. Deadlines
//! are generous bounds on waiting, never timing assertions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use sparegrid_controller::registry::Membership;
use sparegrid_controller::store::{HostState, JobState};
use sparegrid_proto::Metric;
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

const START: i64 = 0;
const END: i64 = 120;
const CHUNK: u64 = 2;
const SUBTASKS: u64 = 60;

/// A range job over START..END in chunks of CHUNK, each subtask running
/// [`marker_script`] with `sleep_s`.
fn write_job(dir: &Path, name: &str, markers: &Path, sleep_s: &str) -> std::path::PathBuf {
    let script = marker_script(markers, sleep_s);
    let text = format!(
        "name = {}\nmax_attempts = 5\n\
         command = {{ argv = [\"/bin/sh\", \"-c\", {}] }}\n\n\
         [resources]\ntimeout_secs = 120\n\n\
         [split.range]\nstart = {START}\nend = {END}\nchunk = {CHUNK}\n",
        toml_str(name),
        toml_str(&script)
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the job file");
    path
}

/// Waits until every host in `hosts` is registered, active and eligible.
fn wait_all_eligible(c: &Cluster, hosts: &[&str], timeout: Duration) {
    c.wait_hosts(
        &format!("{hosts:?} to be registered and eligible"),
        timeout,
        |v| {
            hosts
                .iter()
                .all(|id| {
                    // An empty breakdown: no load sample reported yet.
                    host(v, id).is_some_and(|h| {
                        h.state == HostState::Active && h.eligible && !h.breakdown.is_empty()
                    })
                })
                .then_some(())
        },
    );
}

/// Indexes that have an accepted result so far.
fn done_indexes(cli: &Cli, id: &str) -> BTreeSet<u64> {
    cli.results(id, true)
        .results
        .iter()
        .map(|r| r.index)
        .collect()
}

#[test]
fn root_loaded_host_is_withdrawn_and_the_job_completes_exactly_once() {
    const T: &str = "root_loaded_host_is_withdrawn_and_the_job_completes_exactly_once";
    if skip_unless_root(T) {
        return;
    }
    let _machine = exclusive(T);
    let uplink = Uplink::create();
    let mut c = Cluster::start_controller(|_| {});
    let busy = "busy";
    c.add_agent(busy, 2, AgentLoad::Uplink(uplink.name.clone()));
    c.add_agent("calm-1", 2, AgentLoad::MemoryOnly);
    c.add_agent("calm-2", 2, AgentLoad::MemoryOnly);
    let cli = c.cli();
    let admin = c.admin_cli();
    wait_all_eligible(&c, &[busy, "calm-1", "calm-2"], secs(60));

    let markers = c.shared_dir("markers");
    let job = write_job(c.dir(), "withdraw", &markers, "1");
    let sub = cli.submit(&job);
    assert_eq!(sub.subtasks, SUBTASKS, "subtask count of {sub:?}");
    let id = sub.id.to_string();

    // Midway: some subtasks done, and the busy host running some now.
    let deadline = Instant::now() + secs(120);
    let held: BTreeMap<u64, u32> = loop {
        let done = done_indexes(&cli, &id);
        let running_on_busy: BTreeMap<u64, u32> = c
            .markers(&markers)
            .into_iter()
            .filter(|((i, _), h)| h.as_deref() == Some(busy) && !done.contains(i))
            .map(|((i, ep), _)| (i, ep))
            .collect();
        if done.len() as u64 >= SUBTASKS / 10 && !running_on_busy.is_empty() {
            break running_on_busy;
        }
        assert!(
            (done.len() as u64) < SUBTASKS / 2,
            "half the job is done and {busy} runs nothing (was it too loaded all along?)\n{}",
            c.report()
        );
        assert!(
            Instant::now() < deadline,
            "no midway point with {busy} running a subtask; {} done\n{}",
            done.len(),
            c.report()
        );
        sleep_ms(50);
    };

    // Customer traffic saturates the busy host's uplink.
    let load = uplink.load(4 * UPLINK_BYTES_PER_SEC);
    eprintln!("{T}: load on; {busy} held {held:?}");

    // The busy host leaves the set, for the load on its uplink (nothing
    // else moves its load factor); its agent stops what it held.
    c.wait_hosts(
        &format!("{busy} to leave the eligible set under load"),
        secs(60),
        |v| {
            host(v, busy)
                .filter(|h| {
                    h.membership == Some(Membership::Out)
                        && !h.eligible
                        && h.load.is_some_and(|l| l > WITHDRAW_ABOVE)
                        && h.dominant == Some(Metric::Network)
                })
                .map(|_| ())
        },
    );
    // The API says what the CLI showed.
    let api: sparegrid_controller::agents::HostsView = c
        .controller
        .get_json("/v1/hosts")
        .unwrap_or_else(|e| panic!("GET /v1/hosts: {e:#}"));
    let h = host(&api, busy).expect("busy host in GET /v1/hosts");
    assert!(
        h.membership == Some(Membership::Out) && !h.eligible,
        "GET /v1/hosts disagrees with `sparegrid hosts`:\n{}",
        hosts_summary(&api)
    );
    c.wait_hosts(
        &format!("{busy} to stop its withdrawn subtasks (running 0)"),
        secs(60),
        |v| host(v, busy).filter(|h| h.running == 0).map(|_| ()),
    );
    let started_on_busy = |c: &Cluster| -> BTreeSet<(u64, u32)> {
        c.markers(&markers)
            .into_iter()
            .filter(|(_, h)| h.as_deref() == Some(busy))
            .map(|(k, _)| k)
            .collect()
    };
    let busy_when_out = started_on_busy(&c);

    // The job completes on the other hosts while the load holds, and the
    // busy host stays out of the set all along.
    let deadline = Instant::now() + secs(300);
    let detail = loop {
        let v = admin.hosts();
        let h = host(&v, busy).expect("busy host listed");
        assert!(
            h.membership == Some(Membership::Out) && !h.eligible,
            "{busy} came back into the set while under load:\n{}\n{}",
            hosts_summary(&v),
            c.report()
        );
        let d = cli.status(&id);
        if matches!(
            d.job.state,
            JobState::Done | JobState::Failed | JobState::Cancelled
        ) {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not finish: {:?}\n{}",
            d.job.counts,
            c.report()
        );
        sleep_ms(200);
    };
    let busy_at_end = started_on_busy(&c);
    drop(load);
    assert_eq!(
        detail.job.state,
        JobState::Done,
        "job {id}: {:?}\n{}",
        detail.job.counts,
        c.report()
    );
    assert_eq!(
        busy_at_end,
        busy_when_out,
        "{busy} started subtasks after it left the set\n{}",
        c.report()
    );

    // Every subtask exactly once, with its own bounds.
    let results = cli.results(&id, false);
    assert!(results.complete, "results not complete: {results:?}");
    let problems = range_coverage_problems(&results, START, END, CHUNK);
    assert!(
        problems.is_empty(),
        "results of job {id}:\n{}\n{}",
        problems.join("\n"),
        c.report()
    );

    // What the busy host held when the load came was redispatched: its
    // accepted result is a later attempt on another host (unless it had
    // finished on the busy host before its agent froze it).
    let by_index: BTreeMap<u64, _> = results.results.iter().map(|r| (r.index, r)).collect();
    let mut moved = Vec::new();
    for (i, ep) in &held {
        let r = by_index[i];
        if r.host == busy {
            assert_eq!(
                r.attempt, *ep,
                "subtask {i}: accepted attempt {} on {busy}, which held attempt {ep}",
                r.attempt
            );
        } else {
            assert!(
                r.attempt > *ep,
                "subtask {i}: accepted attempt {} on {} is not later than attempt {ep} held by {busy}",
                r.attempt,
                r.host
            );
            moved.push(*i);
        }
    }
    assert!(
        !moved.is_empty(),
        "none of the subtasks {busy} held ({held:?}) was redispatched\n{}",
        c.report()
    );
    let log = c.controller.log();
    assert!(
        log.lines()
            .any(|l| l.contains("host withdrawn") && l.contains(busy)),
        "no 'host withdrawn' line for {busy} in the controller log\n{}",
        c.controller.log_tail(40)
    );
    let per_host = results.results.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.host.as_str()).or_insert(0u32) += 1;
        m
    });
    eprintln!("{T}: redispatched {moved:?}; results per host {per_host:?}");

    // The human `hosts` table lists all three.
    let table = admin.run(&["hosts"]).ok("hosts");
    for h in [busy, "calm-1", "calm-2"] {
        assert!(
            table.stdout.contains(h),
            "`sparegrid hosts` lacks {h}:\n{}",
            table.stdout
        );
    }
}

#[test]
fn root_controller_killed_mid_job_restarts_and_finishes_exactly_once() {
    const T: &str = "root_controller_killed_mid_job_restarts_and_finishes_exactly_once";
    if skip_unless_root(T) {
        return;
    }
    let _machine = exclusive(T);
    let mut c = Cluster::start_controller(|_| {});
    let hosts = ["a", "b", "c"];
    for h in hosts {
        c.add_agent(h, 2, AgentLoad::MemoryOnly);
    }
    let cli = c.cli();
    wait_all_eligible(&c, &hosts, secs(60));

    let markers = c.shared_dir("markers");
    let job = write_job(c.dir(), "restart", &markers, "0.5");
    let sub = cli.submit(&job);
    assert_eq!(sub.subtasks, SUBTASKS);
    let id = sub.id.to_string();

    // Midway: a sixth done, and subtasks running.
    let deadline = Instant::now() + secs(120);
    let before = loop {
        let r = cli.results(&id, true);
        let done: BTreeSet<u64> = r.results.iter().map(|r| r.index).collect();
        let running = c
            .markers(&markers)
            .keys()
            .filter(|(i, _)| !done.contains(i))
            .count();
        if done.len() as u64 >= SUBTASKS / 6 && running > 0 {
            break r;
        }
        assert!(
            (done.len() as u64) < SUBTASKS / 2,
            "half the job is done before a midway point was seen\n{}",
            c.report()
        );
        assert!(
            Instant::now() < deadline,
            "no midway point: {} done\n{}",
            done.len(),
            c.report()
        );
        sleep_ms(50);
    };

    // kill -9, a pause during which subtasks end and their reports fail,
    // then the same controller on the same database.
    c.controller.kill9();
    eprintln!("{T}: controller killed with {} done", before.results.len());
    sleep_ms(1500);
    c.controller.restart();

    let detail = c.wait_job_end(&id, secs(300), |_| {});
    assert_eq!(
        detail.job.state,
        JobState::Done,
        "job {id}: {:?}\n{}",
        detail.job.counts,
        c.report()
    );
    let results = cli.results(&id, false);
    assert!(results.complete, "results not complete");
    let problems = range_coverage_problems(&results, START, END, CHUNK);
    assert!(
        problems.is_empty(),
        "results of job {id} after the restart:\n{}\n{}",
        problems.join("\n"),
        c.report()
    );
    // What was accepted before the kill is what the results still say.
    let after: BTreeMap<u64, _> = results.results.iter().map(|r| (r.index, r)).collect();
    for r in &before.results {
        assert_eq!(
            after.get(&r.index).copied(),
            Some(r),
            "subtask {}'s accepted result changed across the restart",
            r.index
        );
    }
    assert!(
        (before.results.len() as u64) < SUBTASKS,
        "the job was already done when the controller was killed"
    );
    // `watch` on the restarted controller agrees: exit 0, done.
    let w = cli.run(&["watch", &id]);
    assert_eq!(w.code, Some(0), "sparegrid watch {id}: {w:?}");
}
