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
//! `root_overlay_grid_vm_reaches_only_the_overlay` does the same from a
//! real grid VM: the guest image (with its worker) boots under QEMU (TCG)
//! in the host namespace, the runner sends the probe over the guest
//! channel and hot-plugs the VM's NIC through a QEMU-monitor `NicPlug` (a
//! tap on the grid bridge and a virtio NIC, as libvirt does for
//! `LibvirtNics`), and the guest worker configures the NIC from the
//! subtask's environment. It needs the image from `make image`
//! (`$SPAREGRID_IMAGE_DIR`, with `virtio_net` and the worker).
//!
//! Skipped with the reason when not root or `ip`, `nft`, `bash`, `timeout`
//! (or, for the VM, QEMU or the image) are missing (`make deps` installs
//! iproute2, nftables and QEMU).

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

/// With `busybox` (a grid VM: no bash there) the connection is busybox
/// `nc`'s instead of bash's `/dev/tcp`.
fn probe_script(busybox: bool) -> String {
    let connect = if busybox {
        "out=$(echo | timeout 3 nc $2 $3 2>/dev/null | head -n1)"
    } else {
        "out=$(timeout 3 bash -c \"exec 3<>/dev/tcp/$2/$3 && head -n1 <&3\" 2>/dev/null)"
    };
    let mut s = format!(
        "probe() {{ {connect}; if [ -n \"$out\" ]; then echo \"$1 ok $out\"; \
         else echo \"$1 blocked\"; fi; }}\n\
         echo \"address $SPAREGRID_OVERLAY_ADDRESS\"\n",
    );
    for (name, ip, port) in TARGETS {
        s.push_str(&format!("probe {name} {ip} {port} &\n"));
    }
    s.push_str("wait\n");
    s
}

fn assignment(index: u64, busybox: bool) -> Assignment {
    Assignment {
        attempt: AttemptRef {
            job: "overlay-filter".into(),
            index,
            epoch: 1,
        },
        argv: vec![
            if busybox { "sh" } else { "bash" }.into(),
            "-c".into(),
            probe_script(busybox),
        ],
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout_ms: 30_000,
        vcpus: 1,
        memory_mib: 64,
        network: Network::Overlay,
    }
}

/// Runs one probe subtask through the runner; its output as name → line.
fn probe(r: &Runner, index: u64, busybox: bool) -> BTreeMap<String, String> {
    r.submit(vec![assignment(index, busybox)]);
    let t = Instant::now();
    let c: Completion = loop {
        r.tick(false);
        if let Some(c) = r.take_outbox(1).pop() {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
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
        let seen = probe(&r, 0, false);
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
            Some(probe(&r, 1, false))
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

// ---------------------------------------------------------------------------
// A grid VM on the overlay: the real guest image and worker under QEMU,
// started in the host namespace; the runner sends the probe to it over the
// guest channel and hot-plugs its NIC through a QEMU-monitor NicPlug (what
// libvirt does for `LibvirtNics`: a tap on the grid bridge and a virtio
// NIC); the guest worker configures the NIC from the subtask's env.

mod vm {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::Child;

    use sparegrid_agent::grid::runner::Backend;
    use sparegrid_agent::guestlink::{GuestPool, LinkOptions};
    use sparegrid_agent::overlay::{NicPlug, OverlayError, VmNic};

    use super::*;

    /// A QEMU grid VM with an HMP monitor socket; killed on drop.
    pub struct Qemu {
        child: Child,
        pub monitor: PathBuf,
        pub channel: PathBuf,
        pub console: PathBuf,
    }

    impl Qemu {
        /// Boots `image` (kernel, initrd, manifest cmdline) with the guest
        /// channel's socket and the monitor in `dir`; no NIC.
        pub fn start(image: &Path, dir: &Path) -> Qemu {
            let manifest: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(image.join("manifest.json")).expect("manifest"),
            )
            .expect("manifest json");
            let cmdline = manifest["cmdline"]
                .as_str()
                .unwrap_or("console=ttyS0 quiet panic=-1");
            let q = |n: &str| dir.join(n);
            let (monitor, channel, console) = (q("mon.sock"), q("vm1.sock"), q("console.log"));
            // TCG: /dev/kvm may exist without working (nested hosts), and
            // the test is about networking, not speed.
            let accel = "tcg";
            let child = Command::new("qemu-system-x86_64")
                .args(["-machine", &format!("pc,accel={accel}")])
                .args(["-m", "256", "-smp", "1", "-display", "none", "-no-reboot"])
                .arg("-kernel")
                .arg(image.join("vmlinuz"))
                .arg("-initrd")
                .arg(image.join("initrd.img"))
                .args(["-append", cmdline])
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .args(["-device", "virtio-serial"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=ch0,path={},server=on,wait=off",
                    channel.display()
                ))
                .args([
                    "-device",
                    "virtserialport,chardev=ch0,name=org.sparegrid.guest.0",
                ])
                .arg("-monitor")
                .arg(format!("unix:{},server=on,wait=off", monitor.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start qemu-system-x86_64");
            let t = Instant::now();
            while !(monitor.exists() && channel.exists()) {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "QEMU made no sockets"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Qemu {
                child,
                monitor,
                channel,
                console,
            }
        }

        /// Runs one HMP command; returns what it printed.
        pub fn hmp(&self, cmd: &str) -> String {
            let mut s = UnixStream::connect(&self.monitor).expect("monitor");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let read_prompt = |s: &mut UnixStream| {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&all).ends_with("(qemu) ") {
                    let n = s.read(&mut buf).expect("monitor output");
                    assert!(n > 0, "monitor closed");
                    all.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&all).into_owned()
            };
            read_prompt(&mut s);
            writeln!(s, "{cmd}").unwrap();
            let out = read_prompt(&mut s);
            // The echo of the command comes first (with line editing).
            let out = out
                .rsplit_once(cmd)
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or(out);
            strip_escapes(out.trim_end_matches("(qemu) "))
                .trim()
                .to_owned()
        }
    }

    /// The text without terminal escapes (`ESC [ … letter`) and `\r`.
    fn strip_escapes(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\u{1b}' => {
                    if chars.next() == Some('[') {
                        for c in chars.by_ref() {
                            if c.is_ascii_alphabetic() {
                                break;
                            }
                        }
                    }
                }
                '\r' => {}
                c => out.push(c),
            }
        }
        out
    }

    impl Drop for Qemu {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// NicPlug through the QEMU monitor: a tap (`sgvm<last octet>`) on the
    /// grid bridge and a virtio NIC with the VmNic's MAC.
    pub struct QemuNics {
        pub qemu: Arc<Qemu>,
    }

    fn check(out: String, what: &str) -> Result<(), OverlayError> {
        if out.is_empty() {
            Ok(())
        } else {
            Err(OverlayError::Command {
                command: what.to_owned(),
                message: out,
            })
        }
    }

    impl NicPlug for QemuNics {
        fn plug(&self, _vm: &str, nic: &VmNic) -> Result<(), OverlayError> {
            let o = nic.address().octets()[3];
            let tap = format!("sgvm{o}");
            check(
                self.qemu.hmp(&format!(
                    "netdev_add tap,id=nd{o},ifname={tap},script=no,downscript=no"
                )),
                "netdev_add",
            )?;
            run(&[
                "ip",
                "link",
                "set",
                "dev",
                &tap,
                "mtu",
                &nic.mtu().to_string(),
                "master",
                nic.bridge(),
                "up",
            ]);
            check(
                self.qemu.hmp(&format!(
                    "device_add virtio-net-pci,netdev=nd{o},mac={},id=nic{o}",
                    nic.mac()
                )),
                "device_add",
            )
        }

        fn unplug(&self, _vm: &str, nic: &VmNic) -> Result<(), OverlayError> {
            let o = nic.address().octets()[3];
            check(self.qemu.hmp(&format!("device_del nic{o}")), "device_del")?;
            check(self.qemu.hmp(&format!("netdev_del nd{o}")), "netdev_del")
        }
    }

    /// The image to boot, if it can run this test (a guest worker, and
    /// `virtio_net` unless built into the kernel: we trust the manifest).
    pub fn image(test: &str) -> Option<PathBuf> {
        let dir = sparegrid_tests::image_dir(test)?;
        let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap_or_default();
        let ok =
            manifest.contains("\"virtio_net\"") && !manifest.contains("\"guest_version\": null");
        if !ok {
            // `make test` builds the image with both: there it is a failure.
            assert!(
                std::env::var_os("SPAREGRID_IMAGE_DIR").is_none(),
                "{test}: the image in {} has no virtio_net module or no guest worker; run `make image`",
                dir.display()
            );
            eprintln!(
                "SKIP {test}: the image in {} has no virtio_net or no guest worker (make image)",
                dir.display()
            );
            return None;
        }
        Some(dir)
    }

    pub fn pool_options() -> LinkOptions {
        LinkOptions {
            spill: None,
            host: "overlay-host".into(),
            hello_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(120),
            output_cap: 1 << 20,
        }
    }

    pub fn backend(pool: &Arc<GuestPool>) -> Backend {
        Backend::Vms(Arc::clone(pool))
    }
}

#[test]
fn root_overlay_grid_vm_reaches_only_the_overlay() {
    const TEST: &str = "root_overlay_grid_vm_reaches_only_the_overlay";
    if let Some(why) = skip_reason() {
        eprintln!("SKIP {TEST}: {why}");
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("SKIP {TEST}: qemu-system-x86_64 is missing (make deps)");
        return;
    }
    let Some(image) = vm::image(TEST) else {
        return;
    };
    let lab = Lab::new();
    let host_ns = lab.ns("host");
    let prefix = format!("sgof{}-g", lab.id);
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_path = dir.path().to_path_buf();
    let (seen, guests_after) = in_ns(&host_ns, move || {
        let net = Arc::new(
            HostNet::new(&OverlaySection::default())
                .expect("config")
                .netns_prefix(&prefix)
                .forward_from(&["sgtun0"]),
        );
        assert!(net.apply_lease(&lease()).expect("apply lease"));
        let other = net
            .attach_namespace("listener")
            .expect("attach the listener's namespace");
        listen(
            other.netns(),
            SocketAddrV4::new(other.address(), GRID_PORT),
            "grid",
        );
        // QEMU runs in the host namespace: its taps appear there.
        let qemu = Arc::new(vm::Qemu::start(&image, &dir_path));
        let pool = sparegrid_agent::guestlink::GuestPool::new(vm::pool_options());
        pool.attach("vm1", qemu.channel.clone());
        let t = Instant::now();
        while pool.idle() == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "the grid VM did not come up; console:\n{}",
                std::fs::read_to_string(&qemu.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = Runner::new(vm::backend(&pool))
            .with_overlay(Some(Arc::clone(&net)))
            .with_vm_nics(Some(Arc::new(vm::QemuNics {
                qemu: Arc::clone(&qemu),
            })));
        let seen = probe(&r, 0, true);
        let guests_after = net.status().guests;
        drop(r);
        drop(pool);
        drop(qemu);
        drop(other);
        net.teardown().expect("teardown");
        (seen, guests_after)
    });
    eprintln!("the grid VM saw: {seen:?}");
    check_common(&seen);
    assert_eq!(
        seen.get("allowed").map(String::as_str),
        Some("blocked"),
        "{seen:?}"
    );
    assert_eq!(guests_after, 1, "the VM's address was not given back");
}
