//! The grid filtering test (issue 7, "Done means"): a process in a grid
//! namespace, started through the runner's real attachment path
//! (`Runner::with_overlay`, network = overlay), reaches other grid
//! addresses and nothing else.
//!
//! The lab, all in namespaces named `sgof<pid><n>-*` (root needed):
//!
//! ```text
//!   out (10.77.0.2)  ── uplink ──┐            ┌── sgtun0 ── peer: "another slice"
//!   customers / internet         │   host     │   (100.96.4.1 and .7, routed
//!   allowed (10.78.0.2) ─ allowlink ─┤ (netns)  │    like the TUN: 100.96.0.0/16)
//!                                └─ sgbr0 100.96.3.1/24 ─ grid namespaces .2, .3
//! ```
//!
//! The host gets its lease straight from `HostNet::apply_lease` (no
//! controller, no real tunnel: a veth stands for the TUN device). TCP
//! listeners answer with a banner naming themselves: on the host
//! (0.0.0.0, so its underlay and bridge addresses both), in `out`, in
//! `allowed`, in `peer`, and in a second grid namespace. The grid process
//! is a bash script that tries each one (`/dev/tcp`, 3 s timeout) and
//! prints what answered.
//!
//! Controls, so the test can fail: the host's listener is reachable from
//! `out` and every outside listener from the host itself, and with the nft
//! table removed the grid process does reach the host.
//!
//! Skipped with the reason when not root or `ip`, `nft`, `bash`, `timeout`
//! are missing (`make deps` installs iproute2 and nftables).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sparegrid_agent::grid::runner::Runner;
use sparegrid_agent::overlay::{HostNet, OverlaySection};
use sparegrid_agent::subtask::{Executor, Limits};
use sparegrid_proto::grid::{Assignment, AttemptRef, Completion};
use sparegrid_proto::overlay::{Network, OverlayLease};

const HOST_PORT: u16 = 7001;
const OUT_PORT: u16 = 7002;
const ALLOWED_PORT: u16 = 7003;
const PEER_PORT: u16 = 7004;
const GRID_PORT: u16 = 7005;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, nftables)".into());
    }
    for (tool, arg) in [
        ("ip", "-V"),
        ("nft", "--version"),
        ("bash", "--version"),
        ("timeout", "--version"),
    ] {
        match Command::new(tool).arg(arg).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            _ => {
                return Some(format!(
                    "`{tool}` is missing (make deps installs iproute2 and nftables)"
                ))
            }
        }
    }
    None
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `f` on a thread that entered namespace `ns` (commands it spawns
/// and threads it starts are in there too).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a namespace fd we own, for this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A TCP listener in `ns` on `addr` that greets every connection with
/// `banner` (its thread lives as long as the test binary).
fn listen(ns: &str, addr: SocketAddrV4, banner: &'static str) {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: as in `in_ns`.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {path}: {e}"));
        tx.send(()).expect("ready");
        for mut s in l.incoming().flatten() {
            let _ = writeln!(s, "{banner}");
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("listener up");
}

/// The banner at `addr`, connecting from the calling thread's namespace.
fn banner(addr: SocketAddrV4) -> Option<String> {
    let s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim().to_owned())
}

/// [`banner`] from source address `src` (bound before connecting).
fn banner_from(src: Ipv4Addr, dst: SocketAddrV4) -> Option<String> {
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr and
    // timeval structs outlive the calls that read them.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sa = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let src = sa(src, 0);
    let dst = sa(*dst.ip(), dst.port());
    let timeout = libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    };
    // SAFETY: see above.
    unsafe {
        assert_eq!(
            libc::bind(fd, &src as *const _ as *const libc::sockaddr, len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        // Linux bounds a blocking connect by the send timeout.
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        if libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len) != 0 {
            return None;
        }
    }
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line.trim().to_owned())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one lab; removed on drop.
struct Lab {
    id: String,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("sgof{}-{name}", self.id)
    }

    fn new() -> Lab {
        let lab = Lab {
            id: format!(
                "{}{}",
                std::process::id() % 100_000,
                SEQ.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let (host, out, allowed, peer) = (
            lab.ns("host"),
            lab.ns("out"),
            lab.ns("allowed"),
            lab.ns("peer"),
        );
        for ns in [&host, &out, &allowed, &peer] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // A link from the host to `other`: `host_if` with `host_addr` in
        // the host, eth0 with `other_addr` there.
        let link = |host_if: &str, host_addr: &str, other: &str, other_addr: &str| {
            run(&[
                "ip", "-n", &host, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                "netns", other,
            ]);
            run(&["ip", "-n", &host, "addr", "add", host_addr, "dev", host_if]);
            run(&["ip", "-n", &host, "link", "set", host_if, "up"]);
            run(&["ip", "-n", other, "addr", "add", other_addr, "dev", "eth0"]);
            run(&["ip", "-n", other, "link", "set", "eth0", "up"]);
        };
        link("uplink", "10.77.0.1/24", &out, "10.77.0.2/24");
        link("allowlink", "10.78.0.1/24", &allowed, "10.78.0.2/24");
        // The TUN device's stand-in: the rest of the overlay is routed into
        // it; the peer holds another slice's host (.1) and grid VM (.7).
        link("sgtun0", "10.99.0.1/30", &peer, "10.99.0.2/30");
        run(&[
            "ip",
            "-n",
            &host,
            "route",
            "add",
            "100.96.0.0/16",
            "via",
            "10.99.0.2",
            "dev",
            "sgtun0",
        ]);
        for a in ["100.96.4.1/32", "100.96.4.7/32"] {
            run(&["ip", "-n", &peer, "addr", "add", a, "dev", "lo"]);
        }
        run(&[
            "ip",
            "-n",
            &peer,
            "route",
            "add",
            "100.96.3.0/24",
            "via",
            "10.99.0.1",
        ]);
        // Neither `out` nor `allowed` has a route to the overlay: what
        // reaches them from the grid must be masqueraded.
        listen(
            &host,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HOST_PORT),
            "host",
        );
        listen(
            &out,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, OUT_PORT),
            "out",
        );
        listen(
            &allowed,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ALLOWED_PORT),
            "allowed",
        );
        listen(
            &peer,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PEER_PORT),
            "peer",
        );
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in ["host", "out", "allowed", "peer"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// The probe the grid process runs: one line per target, `name ok
/// <banner>` or `name blocked`.
const TARGETS: [(&str, &str, u16); 7] = [
    ("grid", "100.96.3.2", GRID_PORT),
    ("peer_slice", "100.96.4.1", PEER_PORT),
    ("host_bridge", "100.96.3.1", HOST_PORT),
    ("host_underlay", "10.77.0.1", HOST_PORT),
    ("host_allowlink", "10.78.0.1", HOST_PORT),
    ("out", "10.77.0.2", OUT_PORT),
    ("allowed", "10.78.0.2", ALLOWED_PORT),
];

fn probe_script() -> String {
    let mut s = String::from(
        "probe() { if out=$(timeout 3 bash -c \"exec 3<>/dev/tcp/$2/$3 && head -n1 <&3\" 2>/dev/null) \
         && [ -n \"$out\" ]; then echo \"$1 ok $out\"; else echo \"$1 blocked\"; fi; }\n\
         echo \"address $SPAREGRID_OVERLAY_ADDRESS\"\n",
    );
    for (name, ip, port) in TARGETS {
        s.push_str(&format!("probe {name} {ip} {port} &\n"));
    }
    s.push_str("wait\n");
    s
}

fn assignment(index: u64) -> Assignment {
    Assignment {
        attempt: AttemptRef {
            job: "overlay-filter".into(),
            index,
            epoch: 1,
        },
        argv: vec!["bash".into(), "-c".into(), probe_script()],
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout_ms: 30_000,
        vcpus: 1,
        memory_mib: 64,
        network: Network::Overlay,
    }
}

/// Runs one probe subtask through the runner; its output as name → line.
fn probe(r: &Runner, index: u64) -> BTreeMap<String, String> {
    r.submit(vec![assignment(index)]);
    let t = Instant::now();
    let c: Completion = loop {
        r.tick(false);
        if let Some(c) = r.take_outbox(1).pop() {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the probe subtask did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = String::from_utf8_lossy(&c.stdout).into_owned();
    assert_eq!(
        c.exit_code,
        Some(0),
        "probe failed: error {:?}\nstdout:\n{out}\nstderr:\n{}",
        c.error,
        String::from_utf8_lossy(&c.stderr)
    );
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn lease() -> OverlayLease {
    OverlayLease {
        cidr: "100.96.0.0/16".into(),
        slice: "100.96.3.0/24".into(),
        address: "100.96.3.1/24".into(),
    }
}

/// What a scenario saw: the probe's lines, the drop counters, and with
/// `control` the probe's lines once the nft table was removed.
type Seen = (
    BTreeMap<String, String>,
    BTreeMap<String, u64>,
    Option<BTreeMap<String, String>>,
);

/// Sets up the host (lease, a second grid namespace with a listener, the
/// runner) with `allow`, runs the probe, reads the counters, optionally
/// probes again without the nft table, and tears the host down.
fn scenario(lab: &Lab, allow: &[&str], control: bool) -> Seen {
    let host_ns = lab.ns("host");
    let prefix = format!("sgof{}-g", lab.id);
    let peer_ns = lab.ns("peer");
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    in_ns(&host_ns, move || {
        let cfg = OverlaySection {
            allow,
            ..Default::default()
        };
        let net = Arc::new(
            HostNet::new(&cfg)
                .expect("config")
                .netns_prefix(&prefix)
                .forward_from(&["sgtun0"]),
        );
        assert!(net.apply_lease(&lease()).expect("apply lease"));
        // Applying the same lease again changes nothing.
        assert!(!net.apply_lease(&lease()).expect("apply again"));
        // The second grid "VM": a namespace of its own with a listener.
        let other = net
            .attach_namespace("listener")
            .expect("attach the listener's namespace");
        assert_eq!(other.cidr(), "100.96.3.2/24");
        listen(
            other.netns(),
            SocketAddrV4::new(other.address(), GRID_PORT),
            "grid",
        );

        let r = Runner::new(Executor::new(None, "overlay-host", Limits::default()))
            .with_overlay(Some(Arc::clone(&net)));
        let seen = probe(&r, 0);
        // The probe's namespace is gone and its address free again.
        assert_eq!(
            net.status().guests,
            1,
            "only the listener's namespace is left"
        );
        let gone = !std::path::Path::new(&format!("/run/netns/{prefix}1")).exists();
        assert!(gone, "the probe's grid namespace was not removed");

        // Through the tunnel, another host (its slice's first address)
        // reaches this host's overlay address; another host's grid VM does
        // not.
        let from_peer = in_ns(&peer_ns, || {
            let to = SocketAddrV4::new(Ipv4Addr::new(100, 96, 3, 1), HOST_PORT);
            [
                banner_from(Ipv4Addr::new(100, 96, 4, 1), to),
                banner_from(Ipv4Addr::new(100, 96, 4, 7), to),
            ]
        });
        let counters = net
            .counters()
            .expect("read the drop counters")
            .into_iter()
            .map(|(k, v)| (k, v.packets))
            .collect();
        assert_eq!(
            from_peer,
            [Some("host".to_string()), None],
            "from the peer slice: host .1, grid VM .7"
        );

        // Control: without the table, the same probe reaches the host. If it
        // did not, "blocked" above would prove nothing.
        let unfiltered = if control {
            run(&["nft", "delete", "table", "inet", "sparegrid"]);
            Some(probe(&r, 1))
        } else {
            None
        };
        drop(r);
        drop(other);
        net.teardown().expect("teardown");
        let out = Command::new("ip")
            .args(["link", "show", "dev", "sgbr0"])
            .output()
            .expect("ip");
        assert!(!out.status.success(), "the bridge survived the teardown");
        (seen, counters, unfiltered)
    })
}

fn check_common(seen: &BTreeMap<String, String>) {
    assert_eq!(
        seen.get("address").map(String::as_str),
        Some("100.96.3.3/24"),
        "{seen:?}"
    );
    // Other grid addresses: on the same bridge, and another slice through
    // the tunnel.
    assert_eq!(
        seen.get("grid").map(String::as_str),
        Some("ok grid"),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("peer_slice").map(String::as_str),
        Some("ok peer"),
        "{seen:?}"
    );
    // Never the host: its bridge address, its underlay address, its
    // address on an allowed network.
    for t in ["host_bridge", "host_underlay", "host_allowlink"] {
        assert_eq!(
            seen.get(t).map(String::as_str),
            Some("blocked"),
            "{t}: {seen:?}"
        );
    }
    // Never the customers / the internet.
    assert_eq!(
        seen.get("out").map(String::as_str),
        Some("blocked"),
        "{seen:?}"
    );
}

fn controls(lab: &Lab) {
    // The host's listener is up and reachable from the underlay …
    let from_out = in_ns(&lab.ns("out"), || banner("10.77.0.1:7001".parse().unwrap()));
    assert_eq!(from_out.as_deref(), Some("host"));
    // … and the outside listeners from the host.
    let from_host = in_ns(&lab.ns("host"), || {
        ["10.77.0.2:7002", "10.78.0.2:7003", "100.96.4.1:7004"].map(|a| banner(a.parse().unwrap()))
    });
    assert_eq!(
        from_host,
        [
            Some("out".to_string()),
            Some("allowed".into()),
            Some("peer".into())
        ]
    );
}

#[test]
fn root_overlay_grid_reaches_only_the_overlay() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP root_overlay_grid_reaches_only_the_overlay: {why}");
        return;
    }
    let lab = Lab::new();
    controls(&lab);
    let (seen, counters, unfiltered) = scenario(&lab, &[], true);
    check_common(&seen);
    // Not allowed: nothing outside the overlay.
    assert_eq!(
        seen.get("allowed").map(String::as_str),
        Some("blocked"),
        "{seen:?}"
    );
    // The drops were counted.
    assert!(
        counters.get("grid_to_host").copied().unwrap_or(0) > 0,
        "{counters:?}"
    );
    assert!(
        counters.get("grid_to_outside").copied().unwrap_or(0) > 0,
        "{counters:?}"
    );
    assert!(
        counters.get("overlay_to_host").copied().unwrap_or(0) > 0,
        "{counters:?}"
    );
    eprintln!("drop counters: {counters:?}");
    let unfiltered = unfiltered.expect("control run");
    assert_eq!(
        unfiltered.get("host_bridge").map(String::as_str),
        Some("ok host"),
        "without the nft table the grid reaches the host: {unfiltered:?}"
    );
}

#[test]
fn root_overlay_allow_opens_exactly_that_cidr() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP root_overlay_allow_opens_exactly_that_cidr: {why}");
        return;
    }
    let lab = Lab::new();
    let (seen, _, _) = scenario(&lab, &["10.78.0.0/24"], false);
    check_common(&seen);
    // The allowed network answers (masqueraded: it has no route to the
    // overlay), the host's own address in it does not.
    assert_eq!(
        seen.get("allowed").map(String::as_str),
        Some("ok allowed"),
        "{seen:?}"
    );
}
