//! The grid overlay end to end (issue 7): a real controller with
//! `overlay.cidr` and three real `sparegrid-agent` processes with
//! `[tunnel] enabled` (process runtime, push dispatch), each in its own
//! network namespace on a shared underlay.
//!
//! Topology (the tunnel lab's, tests/tests/tunnel_netns/lab.rs: one
//! namespace per host, veths to a bridge in a switch namespace, underlay
//! 192.168.77.0/24; names carry the pid):
//!
//! ```text
//!  root ns: controller on 192.168.77.1 ── veth ──┐
//!  h0 192.168.77.10  agent "ov0"  ───────────────┤
//!  h1 192.168.77.11  agent "ov1"  ───────────────┤ bridge (switch ns)
//!  h2 192.168.77.12  agent "ov2"  ───────────────┤
//!  h3 192.168.77.13  wireguard-go, a key nobody listed ┘
//! ```
//!
//! What it checks, in order:
//! 1. the agents register with their tunnel keys, get a slice each and the
//!    peer list; each agent's status shows the tunnel up with the
//!    controller's version applied and the other two hosts as peers;
//! 2. from host 0's namespace, ICMP and a checksummed TCP transfer reach
//!    hosts 1 and 2 at their overlay addresses (through the tunnel, whose
//!    per-peer byte counters rise in /metrics); status and the controller's
//!    hosts view (`sparegrid hosts --json`) show per-peer handshakes;
//!    then a job with `network = "overlay"` (two subtasks, one slot per
//!    host, so two hosts) runs each subtask in a grid namespace with an
//!    address of its host's slice: one listens, the other connects to it
//!    across the tunnel, and both report the other's address;
//! 3. host 2's underlay is cut (`ip link set down` on its switch port):
//!    its overlay address stops answering while host 1's still does, and
//!    host 0's handshake with it ages past WireGuard's retry point; the
//!    link comes back: traffic resumes and a new handshake is made;
//! 4. wireguard-go with a key the controller never listed tries to
//!    handshake with host 0: host 0's rejected-handshake counter rises (in
//!    /metrics, the status and the hosts view), wireguard-go never
//!    completes a handshake and nothing it sends gets through.
//!
//! Needs root, /dev/net/tun, `ip`, `nsenter`, `nft`, `wireguard-go` and
//! `wg` (`make deps`); skipped with the reason printed otherwise. Build the
//! agent, controller and CLI binaries first (`cargo build`). Deadlines only
//! bound waiting; nothing is timed. One test at a time per machine: the
//! root namespace's end of the underlay holds 192.168.77.1 (an flock).

#[path = "tunnel_netns/lab.rs"]
mod lab;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lab::{keypair, ping, ping_until, skip_reason, tcp_transfer, Lab, PeerSpec, WgGo};
use sparegrid_controller::store::JobState;
use sparegrid_proto::overlay::TunnelPeerStatus;
use sparegrid_proto::status::TunnelStatus;
use sparegrid_proto::AgentStatus;
use sparegrid_tests::controller::*;
use sparegrid_tests::*;

const AGENTS: usize = 3;
const AGENT_PORT: u16 = 7410;
const WG_PORT: u16 = 51820;
const CIDR: &str = "100.96.0.0/16";
/// Bytes in each TCP transfer through the tunnel.
const TRANSFER: usize = 4 << 20;
const DEADLINE: Duration = Duration::from_secs(60);
/// WireGuard starts a new handshake when data sent got no reply for
/// KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (10 + 5 s); a session older than this
/// while the link is cut shows that point has passed.
const RETRY_AGE_SECS: u64 = 16;

fn skip(test: &str) -> bool {
    let reason = skip_reason(true).or_else(|| {
        match Command::new("nft")
            .arg("--version")
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => None,
            _ => Some("nft is missing (make deps installs nftables)".into()),
        }
    });
    if let Some(r) = reason {
        eprintln!("SKIP {test}: {r}");
        return true;
    }
    false
}

/// The root namespace's leg on the lab's bridge: a veth with
/// 192.168.77.1/24 (the controller's address), removed on drop.
struct Uplink {
    root_if: String,
}

impl Uplink {
    /// Takes 192.168.77.1/24 in the root namespace. Called under [`lock`],
    /// so any `sgov*` link that already holds an address in the subnet is a
    /// leftover of a run that was killed before its drop (its lab's
    /// namespaces are still there): it is removed, because with two routes
    /// to 192.168.77.0/24 the replies to the agents would leave through the
    /// stale one and every connection would time out. Another interface in
    /// the subnet is not ours to remove: the test stops and names it.
    fn create(lab: &Lab) -> Uplink {
        let held = lab::run_out("ip", &["-o", "-4", "addr", "show", "to", "192.168.77.0/24"]);
        for line in held.lines() {
            // "7: sgov234420@if6    inet 192.168.77.1/24 …"
            let Some(name) = line.split_whitespace().nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            assert!(
                name.starts_with("sgov"),
                "{name} already holds an address in 192.168.77.0/24, which this test needs: {line}"
            );
            eprintln!("removing {name}, a stale uplink left by a killed run: {line}");
            lab::run("ip", &["link", "del", name]);
        }
        let up = Uplink {
            root_if: format!("sgov{}", lab.id),
        };
        assert!(up.root_if.len() <= 15, "{} too long", up.root_if);
        lab::run(
            "ip",
            &[
                "link",
                "add",
                &up.root_if,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                &lab.sw,
            ],
        );
        let _ = fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", up.root_if),
            "1",
        );
        lab::run(
            "ip",
            &["addr", "add", "192.168.77.1/24", "dev", &up.root_if],
        );
        lab::run("ip", &["link", "set", &up.root_if, "up"]);
        lab::ns_run(
            &lab.sw,
            &["ip", "link", "set", "dev", "uplink", "master", "br0"],
        );
        lab::ns_run(&lab.sw, &["ip", "link", "set", "dev", "uplink", "up"]);
        up
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        // Gone with the switch namespace normally.
        let _ = lab::try_run("ip", &["link", "del", &self.root_if]);
    }
}

/// Holds the machine-wide lock for the 192.168.77.1 uplink.
fn lock() -> fs::File {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join("sparegrid-overlay-hosts.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock on a descriptor we own; blocks until it is ours.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

/// A `sparegrid-agent` with `[tunnel] enabled` in a lab host's namespace
/// ([`NsAgentProcess`]); its cgroup partition goes with its harness
/// (dropped after the process, as declared after it).
struct NsAgent {
    host: String,
    underlay: Ipv4Addr,
    process: NsAgentProcess,
    harness: Harness,
    http: reqwest::blocking::Client,
}

impl NsAgent {
    fn start(lab: &Lab, i: usize, controller: &str, token: &str) -> NsAgent {
        let h = &lab.hosts[i];
        let host = format!("ov{i}");
        let mut harness = Harness::new();
        let partition = unique("sparegrid-overlay");
        harness.cleanup_partition_on_drop(Path::new(CGROUP_ROOT), &partition);
        let mut c = harness.base_conf();
        c.str(
            "agent",
            "listen",
            &SocketAddr::from((h.underlay, AGENT_PORT)).to_string(),
        )
        .str("agent", "host_name", &host)
        .str("sampler", "interval", "100ms");
        // Memory only: the machine's CPU (other builds) is not this test's
        // business.
        for m in sparegrid_proto::Metric::ALL {
            let w = if m == sparegrid_proto::Metric::Memory {
                "1.0"
            } else {
                "0.0"
            };
            c.set("load.weights", m.as_str(), w);
        }
        c.set("policy", "max_grid_vms", 0)
            .set("policy", "memory_reserve_mib", 64)
            .str("cgroup", "partition", &partition)
            .str("runtime", "kind", "process")
            .str("controller", "url", controller)
            .str("controller", "token", token)
            .set("controller", "slots", 1)
            .str("controller", "dispatch", "push")
            .set("tunnel", "enabled", true)
            .set("tunnel", "listen_port", WG_PORT);
        let config = harness.write_config(&c);
        let log = harness.dir().join("agent.log");
        let process = NsAgentProcess::spawn(&host, &h.ns, &config, &log);
        NsAgent {
            host,
            underlay: h.underlay,
            process,
            harness,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
        }
    }

    fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("http://{}:{AGENT_PORT}{path}", self.underlay);
        let r = self
            .http
            .get(&url)
            .send()
            .map_err(|e| format!("{url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("{url}: HTTP {}", r.status()));
        }
        r.text().map_err(|e| format!("{url}: {e}"))
    }

    fn status(&self) -> Option<AgentStatus> {
        let text = self.get("/v1/status").ok()?;
        Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("status: {e}: {text}")))
    }

    fn tunnel(&self) -> Option<TunnelStatus> {
        self.status()?.tunnel
    }

    fn metrics(&self) -> String {
        self.get("/metrics").unwrap_or_default()
    }

    fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    fn assert_running(&mut self) {
        self.process.assert_running()
    }
}

/// The overlay address (no prefix) in a tunnel status's lease.
fn overlay_addr(t: &TunnelStatus) -> Ipv4Addr {
    let lease = t.lease.as_ref().expect("a lease");
    lease
        .address
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("lease address {:?}", lease.address))
}

fn peer<'a>(t: &'a TunnelStatus, host: &str) -> Option<&'a TunnelPeerStatus> {
    t.peers.iter().find(|p| p.host.as_deref() == Some(host))
}

#[test]
fn root_overlay_three_agents_mesh_cut_and_reject_unknown_key() {
    const T: &str = "root_overlay_three_agents_mesh_cut_and_reject_unknown_key";
    if skip(T) {
        return;
    }
    let _lock = lock();
    // Drop order is the reverse: agents, controller, uplink, lab.
    let lab = Lab::new("ov", AGENTS + 1);
    let _uplink = Uplink::create(&lab);
    let dir = tempfile::Builder::new()
        .prefix("sparegrid-overlay-")
        .tempdir()
        .expect("scratch directory");
    let tokens = Tokens::new();
    let ctl_addr = SocketAddr::from(([192, 168, 77, 1], free_port()));
    let mut conf = ControllerConf::cluster(ctl_addr, &dir.path().join("controller.db"), &tokens);
    // The cut host must stay listed while its link is down: a long host
    // timeout.
    conf.sections
        .str("overlay", "cidr", CIDR)
        .str("registry", "host_timeout", "120s");
    let ctl_conf = dir.path().join("controller.toml");
    conf.write(&ctl_conf);
    let controller = Controller::start(dir.path(), &ctl_conf, ctl_addr, &tokens.admin);
    let admin = Cli {
        url: controller.url(),
        token: tokens.admin.clone(),
    };
    let mut agents: Vec<NsAgent> = (0..AGENTS)
        .map(|i| NsAgent::start(&lab, i, &controller.url(), &tokens.agent))
        .collect();
    let report = |agents: &[NsAgent]| -> String {
        let hosts = admin.run(&["hosts"]).stdout;
        let mut out = format!(
            "--- sparegrid hosts ---\n{hosts}--- controller log tail ---\n{}\n",
            controller.log_tail(30)
        );
        for a in agents {
            out.push_str(&format!(
                "--- agent {} tunnel ---\n{:#?}\n--- log tail ---\n{}\n",
                a.host,
                a.tunnel(),
                a.log_tail(20)
            ));
        }
        out
    };

    // 1. Registered, leased, peer lists applied everywhere.
    let end = Instant::now() + DEADLINE;
    let tunnels: Vec<TunnelStatus> = loop {
        for a in agents.iter_mut() {
            a.assert_running();
        }
        let ts: Vec<Option<TunnelStatus>> = agents.iter().map(|a| a.tunnel()).collect();
        let ready = ts.iter().all(|t| {
            t.as_ref().is_some_and(|t| {
                t.up && t.peers_version != 0 && t.peers.len() == AGENTS - 1 && t.lease.is_some()
            })
        });
        if ready {
            break ts.into_iter().map(Option::unwrap).collect();
        }
        assert!(
            Instant::now() < end,
            "the agents did not all bring their tunnels up with the peer list\n{}",
            report(&agents)
        );
        sleep_ms(200);
    };
    let addrs: Vec<Ipv4Addr> = tunnels.iter().map(overlay_addr).collect();
    let mut slices: Vec<&str> = tunnels
        .iter()
        .map(|t| t.lease.as_ref().unwrap().slice.as_str())
        .collect();
    slices.sort();
    slices.dedup();
    assert_eq!(
        slices.len(),
        AGENTS,
        "slices are not distinct: {tunnels:#?}"
    );
    for (i, t) in tunnels.iter().enumerate() {
        assert_eq!(t.lease.as_ref().unwrap().cidr, CIDR);
        assert_eq!(
            t.address.as_deref(),
            Some(format!("{}/16", addrs[i]).as_str()),
            "the TUN device holds the host address with the overlay's prefix"
        );
        for j in (0..AGENTS).filter(|&j| j != i) {
            let p = peer(t, &agents[j].host)
                .unwrap_or_else(|| panic!("ov{i} does not list ov{j}: {t:#?}"));
            assert_eq!(p.public_key, tunnels[j].public_key);
            assert_eq!(
                p.endpoint.as_deref(),
                Some(
                    SocketAddrV4::new(lab.hosts[j].underlay, WG_PORT)
                        .to_string()
                        .as_str()
                ),
                "the controller took ov{j}'s endpoint from its registration"
            );
        }
    }
    // The key was generated 0600 under the agent's data dir.
    {
        use std::os::unix::fs::PermissionsExt;
        let key = agents[0].harness.dir().join("data/tunnel.key");
        let mode = fs::metadata(&key)
            .unwrap_or_else(|e| panic!("{}: {e}", key.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }

    // 2. Host 0 reaches hosts 1 and 2 through the tunnel.
    let h0 = lab.hosts[0].ns.clone();
    for (j, &addr) in addrs.iter().enumerate().skip(1) {
        assert!(
            ping_until(&h0, addr, DEADLINE),
            "ov0 cannot reach ov{j} at {addr}\n{}",
            report(&agents)
        );
        let (sent, got, n) = tcp_transfer(
            &h0,
            &lab.hosts[j].ns,
            addr,
            5000 + j as u16,
            TRANSFER,
            DEADLINE,
        );
        assert_eq!(n, TRANSFER, "ov0 -> ov{j}: short transfer");
        assert_eq!(sent, got, "ov0 -> ov{j}: checksum");
    }
    assert!(
        ping_until(&lab.hosts[1].ns, addrs[2], DEADLINE),
        "ov1 cannot reach ov2"
    );
    let t0 = agents[0].tunnel().expect("ov0 tunnel");
    for (j, a) in agents.iter().enumerate().skip(1) {
        let p = peer(&t0, &a.host).expect("peer");
        assert!(
            p.tx_bytes >= TRANSFER as u64,
            "ov0 sent {TRANSFER} bytes to ov{j} but counts {}: {p:?}",
            p.tx_bytes
        );
        assert!(p.last_handshake_secs.is_some(), "no handshake: {p:?}");
    }
    let m = agents[0].metrics();
    let tx1 = metric_value(
        &m,
        "sparegrid_tunnel_peer_tx_bytes_total",
        &[("host", "ov1")],
    )
    .unwrap_or_else(|| panic!("no tx counter for ov1 in\n{m}"));
    assert!(tx1 >= TRANSFER as f64, "tx to ov1 {tx1}\n{m}");
    assert!(
        metric_value(
            &m,
            "sparegrid_tunnel_peer_info",
            &[
                ("host", "ov2"),
                (
                    "endpoint",
                    &SocketAddrV4::new(lab.hosts[2].underlay, WG_PORT).to_string()
                )
            ]
        ) == Some(1.0),
        "no peer info for ov2 in\n{m}"
    );
    // The controller's hosts view shows the per-peer handshakes (from the
    // agents' heartbeats).
    let end = Instant::now() + DEADLINE;
    loop {
        let v = admin.hosts();
        let seen = host(&v, "ov0")
            .and_then(|h| h.overlay.as_ref())
            .is_some_and(|o| {
                o.peers_current
                    && (1..AGENTS).all(|j| {
                        o.peers.iter().any(|p| {
                            p.host.as_deref() == Some(format!("ov{j}").as_str())
                                && p.last_handshake_secs.is_some()
                                && p.tx_bytes >= TRANSFER as u64
                        })
                    })
            });
        if seen {
            break;
        }
        assert!(
            Instant::now() < end,
            "the hosts view never showed ov0's handshakes with ov1 and ov2\n{}",
            report(&agents)
        );
        sleep_ms(200);
    }
    // And `sparegrid hosts --peers` prints them: every peer's endpoint.
    let peers_table = admin.run(&["hosts", "--peers"]).ok("hosts --peers").stdout;
    for h in &lab.hosts[..AGENTS] {
        let ep = SocketAddrV4::new(h.underlay, WG_PORT).to_string();
        assert!(
            peers_table.contains(&ep),
            "no {ep} in `sparegrid hosts --peers`:\n{peers_table}"
        );
    }

    // 2b. A job with network = "overlay": two subtasks, one slot per
    // host, so they run at once on two hosts, each in a grid namespace
    // with an address of its host's slice; one listens, the other connects
    // to it, across the tunnel.
    let pair = pair_job(dir.path());
    let cli = Cli {
        url: controller.url(),
        token: tokens.submit.clone(),
    };
    let job = cli.submit(&pair).id.to_string();
    let end = Instant::now() + Duration::from_secs(180);
    let state = loop {
        let d = cli.status(&job);
        if matches!(
            d.job.state,
            JobState::Done | JobState::Failed | JobState::Cancelled
        ) {
            break d.job.state;
        }
        assert!(
            Instant::now() < end,
            "the overlay job did not finish: {:?}\n{}",
            d.job.counts,
            report(&agents)
        );
        sleep_ms(300);
    };
    let results = cli.results(&job, true);
    assert_eq!(
        state,
        JobState::Done,
        "the overlay job failed: {results:#?}\n{}",
        report(&agents)
    );
    assert_eq!(results.results.len(), 2, "{results:?}");
    for r in &results.results {
        assert_eq!(r.exit_code, Some(0), "{r:?}\n{}", report(&agents));
    }
    let (server, client) = (&results.results[0], &results.results[1]);
    assert_ne!(server.host, client.host, "one slot each: two hosts");
    // "server <addr> from <client addr> ping from <client addr>"
    let words: Vec<&str> = server.stdout.split_whitespace().collect();
    assert!(words.len() >= 4 && words[0] == "server", "{server:?}");
    let slice_of = |host: &str, addr: &str| -> bool {
        let i: usize = host[2..].parse().expect("ovN");
        let slice = &tunnels[i].lease.as_ref().unwrap().slice;
        let prefix = slice.rsplit_once('.').expect("a.b.c.0/24").0;
        addr.starts_with(&format!("{prefix}."))
    };
    assert!(
        slice_of(&server.host, words[1]) && slice_of(&client.host, words[3]),
        "the subtasks' addresses are not from their hosts' slices: {results:?}"
    );
    assert!(
        client.stdout.contains(&format!("pong {}", words[1])),
        "{client:?}"
    );

    // 3. Cut host 2's underlay, long enough for ov0 to have sent data
    // without a reply past the retry point: both the session and the cut
    // must be older than that. (The session alone can be older already
    // when the cut starts; then a short cut is healed by the old session
    // and no new handshake is due.)
    lab.set_link(2, false);
    let cut_at = Instant::now();
    let end = cut_at + Duration::from_secs(120);
    let cut_age = loop {
        assert!(
            ping(&h0, addrs[2], Duration::from_millis(500)).is_none(),
            "ov2 answered through a cut link"
        );
        let t = agents[0].tunnel().expect("ov0 tunnel");
        let age = peer(&t, "ov2").and_then(|p| p.last_handshake_secs);
        if age.is_some_and(|a| a >= RETRY_AGE_SECS)
            && cut_at.elapsed() >= Duration::from_secs(RETRY_AGE_SECS)
        {
            break age.unwrap();
        }
        assert!(
            Instant::now() < end,
            "ov0's session with ov2 never aged past the retry point: {t:#?}"
        );
    };
    assert!(
        ping_until(&h0, addrs[1], DEADLINE),
        "ov0 -> ov1 broke with ov2's link"
    );
    lab.set_link(2, true);
    assert!(
        ping_until(&h0, addrs[2], DEADLINE),
        "traffic to ov2 did not resume after the link came back\n{}",
        report(&agents)
    );
    let end = Instant::now() + DEADLINE;
    loop {
        let t = agents[0].tunnel().expect("ov0 tunnel");
        let age = peer(&t, "ov2").and_then(|p| p.last_handshake_secs);
        if age.is_some_and(|a| a < cut_age) {
            break;
        }
        assert!(
            Instant::now() < end,
            "no new handshake with ov2 after the cut (age was {cut_age} s): {t:#?}"
        );
        let _ = ping(&h0, addrs[2], Duration::from_millis(500));
    }
    let (sent, got, n) = tcp_transfer(&lab.hosts[2].ns, &h0, addrs[0], 5100, TRANSFER, DEADLINE);
    assert_eq!((sent, n), (got, TRANSFER), "ov2 -> ov0 after the cut");

    // 4. A WireGuard peer with a key nobody listed.
    let before = agents[0].tunnel().expect("ov0 tunnel").rejected_handshakes;
    let (rogue_private, rogue_public) = keypair();
    let rogue = WgGo::start(
        &lab,
        AGENTS,
        WG_PORT,
        &rogue_private,
        &[PeerSpec {
            public: tunnels[0].public_key.clone(),
            endpoint: Some(SocketAddrV4::new(lab.hosts[0].underlay, WG_PORT)),
            allowed: vec![tunnels[0].lease.as_ref().unwrap().slice.clone()],
        }],
    );
    let rogue_ns = lab.hosts[AGENTS].ns.clone();
    let end = Instant::now() + DEADLINE;
    loop {
        // Traffic makes wireguard-go start (and retry) the handshake.
        assert!(
            ping(&rogue_ns, addrs[0], Duration::from_millis(500)).is_none(),
            "the unlisted wireguard-go peer reached ov0"
        );
        let t = agents[0].tunnel().expect("ov0 tunnel");
        if t.rejected_handshakes > before {
            assert!(
                t.peers.iter().all(|p| p.public_key != rogue_public),
                "ov0 lists the rogue key: {t:#?}"
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "ov0 never counted the rogue handshake: {t:#?}"
        );
    }
    assert_eq!(
        rogue.latest_handshake(&tunnels[0].public_key),
        0,
        "wireguard-go completed a handshake with ov0"
    );
    assert_eq!(
        rogue.transfer(&tunnels[0].public_key).0,
        0,
        "wireguard-go received something from ov0"
    );
    let m = agents[0].metrics();
    let rejected = metric_value_plain(&m, "sparegrid_tunnel_rejected_handshakes_total")
        .unwrap_or_else(|| panic!("no rejected-handshakes counter in\n{m}"));
    assert!(rejected >= 1.0, "rejected {rejected}\n{m}");
    let end = Instant::now() + DEADLINE;
    loop {
        let v = admin.hosts();
        let o = host(&v, "ov0").and_then(|h| h.overlay.clone());
        if o.as_ref().is_some_and(|o| o.rejected_handshakes > before) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the hosts view never showed ov0's rejected handshakes: {o:#?}"
        );
        sleep_ms(200);
    }
    // The listed peers are untouched by it.
    assert!(
        ping_until(&h0, addrs[1], DEADLINE),
        "ov0 -> ov1 after the rogue"
    );
    // Figures for the log: the hosts table as an operator sees it.
    eprintln!("{}", admin.run(&["hosts"]).stdout);
}

/// A sample without labels (`name value`).
fn metric_value_plain(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The overlay pair job: subtask 0 listens on its overlay address and
/// writes it to a file, subtask 1 connects to it; both print what they saw.
fn pair_job(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let rendezvous = dir.join("pair");
    fs::create_dir_all(&rendezvous).expect("rendezvous dir");
    fs::set_permissions(&rendezvous, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let script = format!(
        r#"import os, socket, sys, time
d = {d:?}
idx = int(os.environ["SPAREGRID_INDEX"])
me = os.environ["SPAREGRID_OVERLAY_ADDRESS"].split("/")[0]
if idx == 0:
    s = socket.socket()
    s.bind((me, 9000))
    s.listen(1)
    open(d + "/server.tmp", "w").write(me)
    os.rename(d + "/server.tmp", d + "/server")
    s.settimeout(120)
    c, peer = s.accept()
    data = c.recv(100).decode()
    c.sendall(("pong " + me).encode())
    print("server", me, "from", peer[0], data)
else:
    end = time.time() + 120
    while not os.path.exists(d + "/server"):
        if time.time() > end:
            sys.exit("no server address")
        time.sleep(0.1)
    srv = open(d + "/server").read()
    c = socket.create_connection((srv, 9000), timeout=30)
    c.sendall(("ping from " + me).encode())
    print("client", me, "to", srv, c.recv(100).decode())
"#,
        d = rendezvous.display().to_string()
    );
    let text = format!(
        "name = \"overlay-pair\"\nmode = \"push\"\nmax_attempts = 1\nnetwork = \"overlay\"\n\
         command = {{ argv = [\"/usr/bin/python3\", \"-c\", {}] }}\n\n\
         [resources]\ntimeout_secs = 150\n\n\
         [split.range]\nstart = 0\nend = 2\nchunk = 1\n",
        toml_str(&script)
    );
    let path = dir.join("pair.toml");
    fs::write(&path, text).expect("write the job file");
    path
}
