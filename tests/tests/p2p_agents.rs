//! Peer-to-peer work stealing end to end: one `sparegrid-controller`, four
//! `sparegrid-agent` processes (process runtime) that take part in p2p
//! jobs, and the `sparegrid` CLI.
//!
//! The controller seeds the whole job onto one agent
//! (`dispatch.p2p_seed_hosts = 1`); the others get work only by stealing.
//! While trades go on, the agent that gave the most is killed with
//! SIGKILL (it is in the middle of trades as a victim: subtasks given in
//! trades not yet committed, seeds queued) and started again on the same
//! data directory. The job must finish with every subtask completed
//! exactly once: one accepted result per index (the controller), and each
//! attempt done in exactly one agent's durable queue (the agents).
//!
//! `root_` tests need root (cgroups) and are skipped otherwise. Deadlines
//! are generous bounds on waiting, never timing assertions.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use sparegrid_agent::peer::queue::SubtaskState;
use sparegrid_agent::peer::PeerQueue;
use sparegrid_controller::store::{HostState, JobState};
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

const START: i64 = 0;
const END: i64 = 240;
const CHUNK: u64 = 2;
const SUBTASKS: u64 = 120;
const HOSTS: [&str; 4] = ["peer-a", "peer-b", "peer-c", "peer-d"];

fn write_job(dir: &Path, markers: &Path) -> std::path::PathBuf {
    let script = marker_script(markers, "0.4");
    let text = format!(
        "name = \"p2p\"\nmode = \"p2p\"\nmax_attempts = 3\n\
         command = {{ argv = [\"/bin/sh\", \"-c\", {}] }}\n\n\
         [resources]\ntimeout_secs = 120\n\n\
         [split.range]\nstart = {START}\nend = {END}\nchunk = {CHUNK}\n",
        toml_str(&script)
    );
    let path = dir.join("p2p.toml");
    std::fs::write(&path, text).expect("write the job file");
    path
}

#[test]
fn root_p2p_agent_killed_mid_trade_every_subtask_completes_exactly_once() {
    const T: &str = "root_p2p_agent_killed_mid_trade_every_subtask_completes_exactly_once";
    if skip_unless_root(T) {
        return;
    }
    let _machine = exclusive(T);
    let mut c = Cluster::start_controller(|conf| {
        conf.sections.set("dispatch", "p2p_seed_hosts", 1);
    });
    for h in HOSTS {
        c.add_agent_with(h, 2, AgentLoad::MemoryOnly, |conf| {
            conf.str("peers", "request_timeout", "1s")
                .str("peers", "resolve_after", "2s")
                .str("peers", "backoff_base", "50ms")
                .str("peers", "backoff_max", "500ms")
                .set("peers", "spare", 2);
        });
    }
    let cli = c.cli();
    c.wait_hosts("four eligible p2p agents", secs(60), |v| {
        HOSTS
            .iter()
            .all(|id| {
                host(v, id).is_some_and(|h| {
                    h.state == HostState::Active && h.eligible && !h.breakdown.is_empty()
                })
            })
            .then_some(())
    });

    let markers = c.shared_dir("markers");
    let sub = cli.submit(&write_job(c.dir(), &markers));
    assert_eq!(sub.subtasks, SUBTASKS);
    let id = sub.id.to_string();

    // Trading under way: some peer stole, and under half is done.
    let deadline = Instant::now() + secs(120);
    let victim = loop {
        let d = cli.status(&id);
        let stolen: u64 = d.steals.iter().map(|s| s.stolen_in).sum();
        if stolen > 0 {
            let v = d
                .steals
                .iter()
                .max_by_key(|s| s.given_out)
                .map(|s| s.host.clone())
                .expect("a host that gave");
            eprintln!("{T}: trading: {:?}; {:?}", d.steals, d.job.counts);
            assert!(
                d.job.counts.done < SUBTASKS / 2,
                "half the job was done before any steal was reported\n{}",
                c.report()
            );
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no steal reported; {:?}\n{}",
            d.job.counts,
            c.report()
        );
        sleep_ms(100);
    };

    c.kill9_agent(&victim);
    eprintln!("{T}: killed {victim} with SIGKILL");
    sleep_ms(1500);
    c.restart_agent(&victim);
    eprintln!("{T}: {victim} started again");

    let detail = c.wait_job_end(&id, secs(300), |_| {});
    assert_eq!(
        detail.job.state,
        JobState::Done,
        "{:?}\n{}",
        detail.job.counts,
        c.report()
    );
    let results = cli.results(&id, false);
    let problems = range_coverage_problems(&results, START, END, CHUNK);
    assert!(problems.is_empty(), "{problems:#?}\n{}", c.report());
    let moved: u64 = detail.steals.iter().map(|s| s.stolen_in).sum();
    assert!(
        moved > 0,
        "no steals in the final status: {:?}",
        detail.steals
    );
    let text = cli.run(&["status", &id]).ok("status").stdout;
    assert!(text.contains("  steals: "), "{text}");
    eprintln!("{T}: done; steals by host {:?}", detail.steals);

    // The agents' side: stop them, then every attempt of the job is done in
    // exactly one queue, and nothing is left queued, running or given.
    let dirs: Vec<(String, std::path::PathBuf)> = c
        .agents
        .iter()
        .map(|a| (a.host.clone(), a.harness().subdir("data")))
        .collect();
    for a in &mut c.agents {
        a.agent.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = a.agent.wait_exit(secs(30));
    }
    let mut done_in: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (host, dir) in &dirs {
        let q = PeerQueue::open(dir, host).unwrap_or_else(|e| panic!("{host}'s queue: {e}"));
        for row in q.rows().expect("rows") {
            if row.attempt.job != id {
                continue;
            }
            match row.state {
                SubtaskState::Done => done_in
                    .entry(row.attempt.index)
                    .or_default()
                    .push(host.clone()),
                SubtaskState::Gone => {}
                other => panic!("{host}: {:?} is still {other:?}", row.attempt),
            }
        }
    }
    let wrong: Vec<_> = (0..SUBTASKS)
        .filter(|i| done_in.get(i).map_or(0, Vec::len) != 1)
        .map(|i| (i, done_in.get(&i).cloned().unwrap_or_default()))
        .collect();
    assert!(
        wrong.is_empty(),
        "subtasks not done in exactly one queue: {wrong:?}"
    );
    let by_host: BTreeMap<&String, usize> =
        done_in
            .values()
            .flatten()
            .fold(BTreeMap::new(), |mut m, h| {
                *m.entry(h).or_default() += 1;
                m
            });
    eprintln!("{T}: subtasks run per host {by_host:?}");
    assert!(
        by_host.len() > 1,
        "only one agent ran subtasks: {by_host:?}"
    );
}
