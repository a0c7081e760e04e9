//! Multi-host test over network namespaces: a real controller on the host
//! side and three agent processes, each in its own network namespace joined
//! to the host by a veth pair, so the network between them is a real one
//! that can be firewalled and cut.
//!
//! Topology (one free /24 of 10.77.0.0/16 per test process, chosen under a
//! machine-wide flock; a /30 per agent; names carry the pid; nothing is
//! routed anywhere but between the host and these namespaces):
//!
//! ```text
//!  host: controller on 10.77.X.1 (the host end of A's veth)
//!    ├─ veth 10.77.X.1/30  ── ns A 10.77.X.2   pull; nft drops inbound new
//!    │                                          connections, agent listens
//!    │                                          on 127.0.0.1 in its ns only
//!    ├─ veth 10.77.X.5/30  ── ns B 10.77.X.6   push (controller connects in)
//!    └─ veth 10.77.X.9/30  ── ns C 10.77.X.10  pull; its link is cut mid-job
//! ```
//!
//! B and C reach the controller's address through a host route over their
//! own veth (the host delivers to its local address whatever the link).
//!
//! Why C pulls: a pulling host that loses its network keeps running and
//! keeps its subtasks but can no longer renew its leases, so the controller
//! must take them back by lease expiry (`lease_ttl`, set below
//! `host_timeout` here so it is the lease that frees them) and lease them to
//! A; that is the recovery path pull mode adds, and the one only a real
//! partition exercises (the in-process pull tests stop an agent instead).
//! Push-host loss after `host_timeout` is covered by the controller tests.
//!
//! The cut is `ip link set down` on the host end of C's veth: C's side
//! loses carrier and its packets are dropped (connections time out, as
//! with a pulled cable), and its routes survive, so bringing the link back
//! up after the job restores C and lets its late completions arrive; they
//! must change nothing.
//!
//! The agents are started with `nsenter --net=/run/netns/<ns>`, not `ip
//! netns exec`: the latter also remounts /sys in a new mount namespace,
//! which hides the cgroup hierarchy the agent needs.
//!
//! Needs root, `ip netns`, `nsenter` and `nft`; skipped with a printed reason
//! otherwise. Namespaces, veths and cgroup partitions are removed on drop,
//! also when the test panics. Deadlines are generous bounds on waiting,
//! never timing assertions.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sparegrid_controller::api::JobResults;
use sparegrid_controller::store::{HostState, JobState};
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

/// `registry.host_timeout`: longer than the lease TTL, so C's subtasks come
/// back by lease expiry.
const HOST_TIMEOUT: &str = "5s";
/// `dispatch.lease_ttl`.
const LEASE_TTL: &str = "2s";
const HEARTBEAT: &str = "300ms";
const SLOTS: u32 = 2;
/// Each subtask sleeps this long.
const SLEEP_S: &str = "0.4";
/// The pull job: 0..120 in chunks of 2 (60 subtasks, run by A and C).
const PULL_END: i64 = 120;
/// The push job: 0..80 in chunks of 2 (40 subtasks, run by B).
const PUSH_END: i64 = 80;
const CHUNK: u64 = 2;
/// A marker younger than this is a subtask surely still running (each
/// sleeps [`SLEEP_S`] after writing it).
const FRESH: Duration = Duration::from_millis(150);

// ---------------------------------------------------------------------------
// Skips and commands

/// The reason to skip, if any.
fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, cgroups)".into());
    }
    for (tool, args) in [
        ("ip", &["netns", "list"][..]),
        ("nsenter", &["--version"][..]),
        ("nft", &["--version"][..]),
    ] {
        match Command::new(tool).args(args).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Some(format!(
                    "`{tool} {}` fails: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Some(format!("cannot run {tool}: {e}")),
        }
    }
    None
}

/// Runs a command, panicking with its stderr when it fails.
fn run(cmd: &str, args: &[&str]) {
    if let Err(e) = try_run(cmd, args) {
        panic!("{e}");
    }
}

fn try_run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------
// The topology

/// One agent's namespace and veth pair.
struct Link {
    ns: String,
    /// The veth end on the host side, and the one inside `ns`.
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

/// The namespaces and veth pairs; all deleted on drop (deleting a namespace
/// deletes its veth end, and with it the pair; the host ends are deleted
/// too in case a namespace deletion failed).
struct Topology {
    links: Vec<Link>,
    /// The controller's address (the host end of the first link).
    controller_ip: Ipv4Addr,
}

impl Topology {
    /// `names.len()` namespaces (at most 60), in a 10.77.X.0/24 that no
    /// interface of the host uses yet.
    fn create(names: &[&str]) -> Topology {
        assert!(names.len() <= 60);
        // Choosing a free /24 and taking it is one step for all test
        // processes on the machine: an flock held until the addresses are
        // set (released when `_lock` is dropped).
        let _lock = {
            use std::os::fd::AsRawFd;
            let path = std::env::temp_dir().join("sparegrid-netns.lock");
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: flock on a descriptor we own; blocks until it is ours.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(
                rc,
                0,
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f
        };
        let pid = std::process::id();
        let x = (0..256u32)
            .map(|k| ((pid + k) % 256) as u8)
            .find(|x| {
                let out = Command::new("ip")
                    .args(["-o", "addr", "show", "to", &format!("10.77.{x}.0/24")])
                    .output()
                    .expect("run ip addr show");
                out.status.success() && out.stdout.is_empty()
            })
            .expect("no free 10.77.X.0/24 for the test namespaces");
        let id = pid % 100_000;
        let mut topo = Topology {
            links: Vec::new(),
            controller_ip: Ipv4Addr::new(10, 77, x, 1),
        };
        for (k, name) in names.iter().enumerate() {
            let base = 4 * k as u8;
            let link = Link {
                ns: format!("sgnet-{pid}-{name}"),
                host_if: format!("sgn{id}{name}h"),
                ns_if: format!("sgn{id}{name}n"),
                host_ip: Ipv4Addr::new(10, 77, x, base + 1),
                ns_ip: Ipv4Addr::new(10, 77, x, base + 2),
            };
            run("ip", &["netns", "add", &link.ns]);
            // Recorded at once, so a failure below still cleans it up.
            topo.links.push(link);
            let l = topo.links.last().expect("just pushed");
            run(
                "ip",
                &[
                    "link", "add", &l.host_if, "type", "veth", "peer", "name", &l.ns_if, "netns",
                    &l.ns,
                ],
            );
            // No IPv6 autoconfiguration chatter on the host end (best effort).
            let _ = fs::write(
                format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", l.host_if),
                "1",
            );
            run(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/30", l.host_ip),
                    "dev",
                    &l.host_if,
                ],
            );
            run("ip", &["link", "set", &l.host_if, "up"]);
            let n = ["-n", l.ns.as_str()];
            run("ip", &[&n[..], &["link", "set", "lo", "up"]].concat());
            run(
                "ip",
                &[
                    &n[..],
                    &["addr", "add", &format!("{}/30", l.ns_ip), "dev", &l.ns_if],
                ]
                .concat(),
            );
            run("ip", &[&n[..], &["link", "set", &l.ns_if, "up"]].concat());
            if k > 0 {
                // The controller's address is on the first link's host end.
                run(
                    "ip",
                    &[
                        &n[..],
                        &[
                            "route",
                            "add",
                            &format!("{}/32", topo.controller_ip),
                            "via",
                            &l.host_ip.to_string(),
                            "dev",
                            &l.ns_if,
                        ],
                    ]
                    .concat(),
                );
            }
        }
        topo
    }

    fn link(&self, name: &str) -> &Link {
        let suffix = format!("-{name}");
        self.links
            .iter()
            .find(|l| l.ns.ends_with(&suffix))
            .unwrap_or_else(|| panic!("no namespace for {name}"))
    }

    /// A firewall in `name`'s namespace: inbound new connections on its
    /// veth are dropped (replies to its own connections pass).
    fn firewall_inbound(&self, name: &str) {
        let l = self.link(name);
        let rules = format!(
            "table inet sgfw {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
             iifname \"{}\" ct state new drop\n  }}\n}}\n",
            l.ns_if
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &l.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft in the namespace");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write the nft rules");
        let out = child.wait_with_output().expect("wait for nft");
        assert!(
            out.status.success(),
            "nft in {}: {}",
            l.ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip link set <host end of name's veth> up|down`.
    fn set_link(&self, name: &str, up: bool) {
        let l = self.link(name);
        run(
            "ip",
            &["link", "set", &l.host_if, if up { "up" } else { "down" }],
        );
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for l in &self.links {
            if let Err(e) = try_run("ip", &["netns", "del", &l.ns]) {
                eprintln!("netns test: {e}");
            }
            // Gone with the namespace normally; quiet when it is.
            let _ = try_run("ip", &["link", "del", &l.host_if]);
        }
    }
}

// ---------------------------------------------------------------------------
// An agent process inside a namespace

/// An agent ([`NsAgentProcess`]) in a host's namespace. Its cgroup
/// partition goes with its [`Harness`] (dropped after the process).
struct NsAgent {
    host: String,
    partition: String,
    process: NsAgentProcess,
    _harness: Harness,
}

impl NsAgent {
    fn start(
        topo: &Topology,
        host: &str,
        listen: SocketAddr,
        controller: &str,
        token: &str,
        pull: bool,
    ) -> NsAgent {
        let mut h = Harness::new();
        let partition = unique("sparegrid-netns");
        h.cleanup_partition_on_drop(Path::new(CGROUP_ROOT), &partition);
        let mut c = h.base_conf();
        c.str("agent", "listen", &listen.to_string())
            .str("agent", "host_name", host)
            .str("sampler", "interval", "100ms")
            .str("load", "combine", "max")
            .str("load", "attack", "0s")
            .str("load", "decay", "500ms");
        // Memory only: the machine's CPU (other builds) cannot withdraw it.
        for m in sparegrid_proto::Metric::ALL {
            let w = if m == sparegrid_proto::Metric::Memory {
                "1.0"
            } else {
                "0.0"
            };
            c.set("load.weights", m.as_str(), w);
        }
        c.set("policy", "suspend_above", "0.75")
            .set("policy", "resume_below", "0.5")
            .set("policy", "launch_below", "0.4")
            .set("policy", "max_grid_vms", 0)
            .set("policy", "memory_reserve_mib", 64)
            .str("cgroup", "partition", &partition)
            .str("runtime", "kind", "process")
            .str("controller", "url", controller)
            .str("controller", "token", token)
            .set("controller", "slots", SLOTS)
            .str("controller", "dispatch", if pull { "pull" } else { "push" });
        let config = h.write_config(&c);
        let log = h.dir().join("agent.log");
        let process = NsAgentProcess::spawn(host, &topo.link(host).ns, &config, &log);
        NsAgent {
            host: host.to_string(),
            partition,
            process,
            _harness: h,
        }
    }

    fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    fn assert_running(&mut self) {
        self.process.assert_running()
    }
}

// ---------------------------------------------------------------------------
// Jobs and markers

fn write_job(dir: &Path, name: &str, mode: &str, end: i64, markers: &Path) -> PathBuf {
    let script = marker_script(markers, SLEEP_S);
    let text = format!(
        "name = {}\nmode = {}\nmax_attempts = 5\n\
         command = {{ argv = [\"/bin/sh\", \"-c\", {}] }}\n\n\
         [resources]\ntimeout_secs = 120\n\n\
         [split.range]\nstart = 0\nend = {end}\nchunk = {CHUNK}\n",
        toml_str(name),
        toml_str(mode),
        toml_str(&script)
    );
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).expect("write the job file");
    path
}

/// Start markers under `dir` ([`marker_script`]): `(index, epoch)` → the
/// agent whose partition the attempt ran in.
fn markers(dir: &Path, agents: &[NsAgent]) -> BTreeMap<(u64, u32), Option<String>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((i, ep)) = name.strip_suffix(".start").and_then(|s| s.split_once('.')) else {
            continue;
        };
        let (Ok(i), Ok(ep)) = (i.parse::<u64>(), ep.parse::<u32>()) else {
            continue;
        };
        let cgroups = fs::read_to_string(e.path()).unwrap_or_default();
        let host = agents
            .iter()
            .find(|a| cgroups.contains(&format!("/{}/", a.partition)))
            .map(|a| a.host.clone());
        out.insert((i, ep), host);
    }
    out
}

/// Whether an attempt started (its marker written) in `partition` within
/// the last `age`.
fn started_within(dir: &Path, partition: &str, age: Duration) -> bool {
    let needle = format!("/{partition}/");
    fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
        let fresh = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|d| d < age));
        fresh
            && fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains(&needle)
    })
}

fn done(results: &JobResults) -> BTreeSet<u64> {
    results.results.iter().map(|r| r.index).collect()
}

/// Started on `host` and not done yet: index → epoch.
fn held_by(
    m: &BTreeMap<(u64, u32), Option<String>>,
    host: &str,
    done: &BTreeSet<u64>,
) -> BTreeMap<u64, u32> {
    m.iter()
        .filter(|((i, _), h)| h.as_deref() == Some(host) && !done.contains(i))
        .map(|((i, ep), _)| (*i, *ep))
        .collect()
}

// ---------------------------------------------------------------------------
// The test

#[test]
fn root_netns_pull_push_and_cut_host_complete_exactly_once() {
    const T: &str = "root_netns_pull_push_and_cut_host_complete_exactly_once";
    if let Some(why) = skip_reason() {
        eprintln!("SKIP {T}: {why}");
        return;
    }
    // Field order of these locals is the teardown order, reversed: agents
    // stop first, then the controller, then the namespaces go.
    let topo = Topology::create(&["a", "b", "c"]);
    topo.firewall_inbound("a");

    let dir = tempfile::Builder::new()
        .prefix("sparegrid-netns-")
        .tempdir()
        .expect("scratch directory");
    let tokens = Tokens::new();
    let ctl_addr = SocketAddr::from((topo.controller_ip, free_port()));
    let mut conf = ControllerConf::cluster(ctl_addr, &dir.path().join("controller.db"), &tokens);
    conf.sections
        .str("registry", "host_timeout", HOST_TIMEOUT)
        .str("registry", "heartbeat_interval", HEARTBEAT)
        .str("dispatch", "lease_ttl", LEASE_TTL)
        .str("dispatch", "lease_wait_max", "2s");
    let ctl_conf = dir.path().join("controller.toml");
    conf.write(&ctl_conf);
    let controller = Controller::start(dir.path(), &ctl_conf, ctl_addr, &tokens.admin);
    let url = controller.url();
    let cli = Cli {
        url: url.clone(),
        token: tokens.submit.clone(),
    };
    let admin = Cli {
        url: url.clone(),
        token: tokens.admin.clone(),
    };

    let port = 7410;
    let a_listen = SocketAddr::from(([127, 0, 0, 1], port));
    let b_listen = SocketAddr::from((topo.link("b").ns_ip, port));
    let c_listen = SocketAddr::from((topo.link("c").ns_ip, port));
    let mut agents = vec![
        NsAgent::start(&topo, "a", a_listen, &url, &tokens.agent, true),
        NsAgent::start(&topo, "b", b_listen, &url, &tokens.agent, false),
        NsAgent::start(&topo, "c", c_listen, &url, &tokens.agent, true),
    ];
    let report = |agents: &[NsAgent]| -> String {
        let hosts = admin
            .run(&["hosts"])
            .stdout
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>();
        let mut out = format!(
            "--- hosts ---\n{hosts}--- controller log tail ---\n{}\n",
            controller.log_tail(40)
        );
        for a in agents {
            out.push_str(&format!(
                "--- agent {} log tail ---\n{}\n",
                a.host,
                a.log_tail(25)
            ));
        }
        out
    };

    // All three register (through the veths) and become eligible.
    let deadline = Instant::now() + secs(60);
    let hosts = loop {
        for a in agents.iter_mut() {
            a.assert_running();
        }
        let v = admin.hosts();
        let ok = ["a", "b", "c"].iter().all(|id| {
            host(&v, id).is_some_and(|h| {
                h.state == HostState::Active && h.eligible && !h.breakdown.is_empty()
            })
        });
        if ok {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the agents did not all register and become eligible\n{}",
            report(&agents)
        );
        sleep_ms(100);
    };
    // A and C pull (no URL); B pushes, at its namespace address.
    let a = host(&hosts, "a").expect("a");
    let b = host(&hosts, "b").expect("b");
    let c = host(&hosts, "c").expect("c");
    assert_eq!(a.agent_url, None, "A pulls, so it advertises no URL");
    assert_eq!(c.agent_url, None, "C pulls, so it advertises no URL");
    assert_eq!(
        b.agent_url.as_deref(),
        Some(format!("http://{b_listen}").as_str()),
        "B's push URL"
    );
    // The controller's side cannot open a connection to A (firewalled, and
    // its agent listens only inside its namespace), but can to B.
    let a_ip = SocketAddr::from((topo.link("a").ns_ip, port));
    assert!(
        TcpStream::connect_timeout(&a_ip, Duration::from_secs(1)).is_err(),
        "the host could connect to A at {a_ip}; A is supposed to be unreachable"
    );
    TcpStream::connect_timeout(&b_listen, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the host cannot connect to B at {b_listen}: {e}"));

    // One job of each mode, at once.
    // Markers are per index and epoch: one directory per job.
    let marker_dir = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(name);
        fs::create_dir_all(&p).expect("markers dir");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).expect("chmod");
        p
    };
    let (pull_marks, push_marks) = (marker_dir("pull-markers"), marker_dir("push-markers"));
    let pull_job = write_job(dir.path(), "netns-pull", "pull", PULL_END, &pull_marks);
    let push_job = write_job(dir.path(), "netns-push", "push", PUSH_END, &push_marks);
    let pull = cli.submit(&pull_job);
    let push = cli.submit(&push_job);
    let (pull_id, push_id) = (pull.id.to_string(), push.id.to_string());
    assert_eq!(pull.subtasks, PULL_END as u64 / CHUNK);
    assert_eq!(push.subtasks, PUSH_END as u64 / CHUNK);

    // Every agent holds work: wait until A, B and C each run a subtask.
    let deadline = Instant::now() + secs(120);
    loop {
        for a in agents.iter_mut() {
            a.assert_running();
        }
        let pull_results = cli.results(&pull_id, true);
        let pull_done = done(&pull_results);
        let push_done = done(&cli.results(&push_id, true));
        let m = markers(&pull_marks, &agents);
        let a_held = held_by(&m, "a", &pull_done);
        let b_held = held_by(&markers(&push_marks, &agents), "b", &push_done);
        let c_held = held_by(&m, "c", &pull_done);
        // Mid-job: C has also finished something already (which must stay
        // accepted from C). And C started a subtask just now (read last,
        // right before the cut: the CLI calls above take a while on a busy
        // machine): one that sleeps another SLEEP_S - FRESH at least, so it
        // is surely still held when the link goes down.
        let c_finished = pull_results.results.iter().any(|r| r.host == "c");
        if c_finished
            && !a_held.is_empty()
            && !b_held.is_empty()
            && started_within(&pull_marks, &agents[2].partition, FRESH)
        {
            break;
        }
        assert!(
            (pull_done.len() as u64) < pull.subtasks / 2,
            "half the pull job is done and not every agent holds work \
             (a {a_held:?}, b {b_held:?}, c {c_held:?})\n{}",
            report(&agents)
        );
        assert!(
            Instant::now() < deadline,
            "no moment where every agent held work\n{}",
            report(&agents)
        );
        sleep_ms(30);
    }

    // Cut C off.
    topo.set_link("c", false);
    let cut_at = Instant::now();
    // What C holds now: started on C and not accepted (its completions can
    // no longer arrive, so this is read after the cut).
    let pull_at_cut = cli.results(&pull_id, true);
    let c_done_at_cut: BTreeSet<u64> = pull_at_cut
        .results
        .iter()
        .filter(|r| r.host == "c")
        .map(|r| r.index)
        .collect();
    let c_held = held_by(&markers(&pull_marks, &agents), "c", &done(&pull_at_cut));
    eprintln!(
        "{T}: cut C's link; C held {c_held:?} ({} of the pull job done, {} by C)",
        pull_at_cut.results.len(),
        c_done_at_cut.len()
    );
    assert!(!c_held.is_empty(), "C held nothing when it was cut");

    // The held subtasks start again elsewhere (a later epoch on A).
    let deadline = Instant::now() + secs(120);
    loop {
        let m = markers(&pull_marks, &agents);
        let redone = c_held.iter().all(|(i, ep)| {
            m.iter()
                .any(|((j, e), h)| j == i && e > ep && h.as_deref() == Some("a"))
        });
        if redone {
            eprintln!(
                "{T}: all of C's subtasks started on A {:?} after the cut \
                 (lease_ttl {LEASE_TTL}, heartbeat {HEARTBEAT})",
                cut_at.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C's subtasks {c_held:?} were not started again on A\n{}",
            report(&agents)
        );
        sleep_ms(50);
    }

    // Both jobs finish with C still cut off.
    let deadline = Instant::now() + secs(300);
    for id in [&pull_id, &push_id] {
        let d = loop {
            for a in agents.iter_mut() {
                a.assert_running();
            }
            let d = cli.status(id);
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
                report(&agents)
            );
            sleep_ms(200);
        };
        assert_eq!(
            d.job.state,
            JobState::Done,
            "job {id}: {:?}\n{}",
            d.job.counts,
            report(&agents)
        );
    }
    let check = |results: &JobResults, end: i64, hosts: &[&str], what: &str| {
        assert!(results.complete, "{what} results not complete");
        let problems = range_coverage_problems(results, 0, end, CHUNK);
        assert!(
            problems.is_empty(),
            "{what} results:\n{}\n{}",
            problems.join("\n"),
            report(&agents)
        );
        for r in &results.results {
            assert!(
                hosts.contains(&r.host.as_str()),
                "{what}: subtask {} accepted from {}, expected one of {hosts:?}",
                r.index,
                r.host
            );
        }
    };
    let pull_results = cli.results(&pull_id, false);
    let push_results = cli.results(&push_id, false);
    check(&pull_results, PULL_END, &["a", "c"], "pull job");
    check(&push_results, PUSH_END, &["b"], "push job");
    assert!(
        pull_results.results.iter().any(|r| r.host == "a"),
        "A (outbound only) completed nothing of the pull job"
    );

    // C's held subtasks were accepted from A, at a later attempt; nothing
    // of C's arrived after the cut.
    let by_index: BTreeMap<u64, _> = pull_results.results.iter().map(|r| (r.index, r)).collect();
    for (i, ep) in &c_held {
        let r = by_index[i];
        assert!(
            r.host == "a" && r.attempt > *ep,
            "subtask {i}, held by C at attempt {ep} when it was cut, was accepted \
             from {} at attempt {}",
            r.host,
            r.attempt
        );
    }
    let c_done_at_end: BTreeSet<u64> = pull_results
        .results
        .iter()
        .filter(|r| r.host == "c")
        .map(|r| r.index)
        .collect();
    assert_eq!(
        c_done_at_end, c_done_at_cut,
        "results from C were accepted while its link was down"
    );

    // The link comes back: C's late completions (stale epochs) reach the
    // controller and must change nothing.
    topo.set_link("c", true);
    let back = Instant::now();
    let c_seen_again = loop {
        let v = admin.hosts();
        if host(&v, "c").is_some_and(|h| {
            h.state == HostState::Active && h.last_seen_ms_ago.is_some_and(|ms| ms < 1000)
        }) {
            break Some(back.elapsed());
        }
        if back.elapsed() > secs(30) {
            break None;
        }
        sleep_ms(200);
    };
    let Some(c_seen_again) = c_seen_again else {
        panic!(
            "C did not come back after its link was restored\n{}",
            report(&agents)
        );
    };
    // Its late completions: refused as stale (logged by C), or dropped by C
    // unsent when a heartbeat reply says the leases are lost; either way the
    // results must not change. Its client backs off up to 10 s between
    // retries, so wait for the refusals a little longer than one round.
    let refused = |agents: &[NsAgent]| {
        agents[2]
            .log_tail(100_000)
            .lines()
            .filter(|l| l.contains("the lease is no longer current"))
            .count()
    };
    let wait = Instant::now();
    while refused(&agents) < c_held.len() && wait.elapsed() < secs(12) {
        sleep_ms(200);
    }
    eprintln!(
        "{T}: C's late completions refused as stale: {} (it held {}; the others \
         were dropped unsent as lost leases)",
        refused(&agents),
        c_held.len()
    );
    for a in agents.iter_mut() {
        a.assert_running();
    }
    let pull_after = cli.results(&pull_id, false);
    let push_after = cli.results(&push_id, false);
    assert_eq!(
        pull_after, pull_results,
        "the pull job's results changed after C came back"
    );
    assert_eq!(
        push_after, push_results,
        "the push job's results changed after C came back"
    );
    let per_host = pull_results
        .results
        .iter()
        .chain(&push_results.results)
        .fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.host.clone()).or_insert(0u32) += 1;
            m
        });
    eprintln!("{T}: results per host {per_host:?}; C heartbeating again {c_seen_again:?} after its link came back");
    drop(agents);
    drop(controller);
    drop(topo);
}
