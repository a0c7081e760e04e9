//! A network-namespace lab for the tunnel: hosts (one namespace each)
//! joined by veths to a switch namespace (a bridge), our endpoint
//! (`sparegrid-tunnel`) or `wireguard-go` in a host, and traffic made from
//! threads that entered a host's namespace (`setns`): ICMP echo on a raw
//! socket (no `ping` binary needed) and TCP transfers with checksums.
//!
//! Shared by tests/tests/tunnel_netns.rs and the `bench-tunnel` binary.
//! Every address lives only inside the lab's own namespaces (underlay
//! 192.168.77.0/24, overlay 100.96.0.0/16), so labs never clash with the
//! host or with each other; names carry the pid and a counter. Namespaces
//! go on drop (with them the veths, the bridge and the TUN devices), and
//! endpoint processes are stopped on drop.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sparegrid_agent::tunnel::{Key, TunnelStats};

/// Why the lab cannot run here, if it cannot.
pub fn skip_reason(need_wireguard_go: bool) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, TUN devices)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    let mut tools = vec![("ip", "-V"), ("nsenter", "--version")];
    if need_wireguard_go {
        tools.push(("wireguard-go", "--version"));
        tools.push(("wg", "--version"));
    }
    for (tool, arg) in tools {
        match Command::new(tool).arg(arg).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Some(format!(
                    "`{tool} {arg}` fails: {} (make deps installs it)",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Some(format!("cannot run {tool}: {e} (make deps installs it)")),
        }
    }
    None
}

/// `sparegrid-tunnel`: `$SPAREGRID_TUNNEL_BIN`, else next to the running
/// executable's target directory (`target/<profile>/`).
pub fn tunnel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SPAREGRID_TUNNEL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    for c in [
        dir.join("sparegrid-tunnel"),
        dir.join("../sparegrid-tunnel"),
    ] {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "sparegrid-tunnel not found next to {}; build it first (cargo build -p \
         sparegrid-agent --bin sparegrid-tunnel, --release for the bench) or set \
         SPAREGRID_TUNNEL_BIN",
        exe.display()
    );
}

pub fn run(cmd: &str, args: &[&str]) {
    if let Err(e) = try_run(cmd, args) {
        panic!("{e}");
    }
}

/// Runs a command on the host and returns its stdout; panics naming it
/// when it fails.
#[allow(dead_code)] // not every test file that includes the lab uses it
pub fn run_out(cmd: &str, args: &[&str]) -> String {
    try_run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command inside `ns` (network namespace only, so /sys and the
/// wireguard-go control sockets stay the host's).
pub fn ns_run(ns: &str, args: &[&str]) -> String {
    let netns = format!("--net=/run/netns/{ns}");
    let mut all = vec![netns.as_str(), "--"];
    all.extend_from_slice(args);
    try_run("nsenter", &all).unwrap_or_else(|e| panic!("in {ns}: {e}"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique_id() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// One host: its namespace, underlay and overlay addresses.
pub struct Host {
    pub ns: String,
    pub underlay: Ipv4Addr,
    /// Its overlay address; its slice is overlay/24.
    pub overlay: Ipv4Addr,
    /// Its veth's end in the switch namespace (what a cut takes down).
    sw_if: String,
}

impl Host {
    pub fn slice(&self) -> String {
        let o = self.overlay.octets();
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    }
}

/// Hosts on a bridge; removed on drop.
pub struct Lab {
    pub id: String,
    pub sw: String,
    pub hosts: Vec<Host>,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// `n` hosts: host `i` has underlay 192.168.77.(10+i) and overlay
    /// 100.96.(1+i).1.
    pub fn new(tag: &str, n: usize) -> Lab {
        let id = unique_id();
        let mut lab = Lab {
            sw: format!("sgtun-{id}-{tag}-sw"),
            id: id.clone(),
            hosts: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix(&format!("sgtun-{tag}-"))
                .tempdir()
                .expect("tempdir"),
        };
        run("ip", &["netns", "add", &lab.sw]);
        ns_run(&lab.sw, &["ip", "link", "set", "lo", "up"]);
        ns_run(&lab.sw, &["ip", "link", "add", "br0", "type", "bridge"]);
        ns_run(&lab.sw, &["ip", "link", "set", "br0", "up"]);
        for i in 0..n {
            let host = Host {
                ns: format!("sgtun-{id}-{tag}-h{i}"),
                underlay: Ipv4Addr::new(192, 168, 77, 10 + i as u8),
                overlay: Ipv4Addr::new(100, 96, 1 + i as u8, 1),
                sw_if: format!("h{i}"),
            };
            run("ip", &["netns", "add", &host.ns]);
            lab.hosts.push(host);
            let h = lab.hosts.last().expect("pushed");
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &h.ns, "type", "veth", "peer", "name",
                    &h.sw_if, "netns", &lab.sw,
                ],
            );
            ns_run(&lab.sw, &["ip", "link", "set", &h.sw_if, "master", "br0"]);
            ns_run(&lab.sw, &["ip", "link", "set", &h.sw_if, "up"]);
            ns_run(&h.ns, &["ip", "link", "set", "lo", "up"]);
            ns_run(
                &h.ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", h.underlay),
                    "dev",
                    "eth0",
                ],
            );
            ns_run(&h.ns, &["ip", "link", "set", "eth0", "up"]);
        }
        lab
    }

    /// `ip link set down|up` on host `i`'s veth (its switch end): its
    /// underlay is cut (or restored) as with a pulled cable.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ns_run(
            &self.sw,
            &["ip", "link", "set", &self.hosts[i].sw_if, state],
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self
            .hosts
            .iter()
            .map(|h| h.ns.as_str())
            .chain([self.sw.as_str()])
        {
            if let Err(e) = try_run("ip", &["netns", "del", ns]) {
                eprintln!("lab cleanup: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Keys

/// A fresh key pair (private, public), both base64.
pub fn keypair() -> (String, String) {
    let k = Key::generate().expect("key");
    (k.to_string(), k.public().to_string())
}

pub fn write_private(path: &Path, private: &str) {
    fs::write(path, format!("{private}\n")).expect("write key");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod key");
}

/// A peer as either side's config names it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub public: String,
    pub endpoint: Option<SocketAddrV4>,
    pub allowed: Vec<String>,
}

// ---------------------------------------------------------------------------
// Our endpoint

pub struct Ours {
    pub ns: String,
    pub child: Child,
    pub public: String,
    pub config: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    key_file: PathBuf,
    port: u16,
    overlay: Ipv4Addr,
}

impl Ours {
    /// Starts `sparegrid-tunnel` in `host`'s namespace on UDP `port` with
    /// interface `sgtun0`, overlay address/16. `private` None: the endpoint
    /// generates its key on first start.
    pub fn start(
        lab: &Lab,
        host: usize,
        port: u16,
        private: Option<&str>,
        peers: &[PeerSpec],
    ) -> Ours {
        let h = &lab.hosts[host];
        let key_file = lab.path(&format!("h{host}.key"));
        if let Some(p) = private {
            write_private(&key_file, p);
        }
        let mut ours = Ours {
            ns: h.ns.clone(),
            child: Command::new("true").spawn().expect("placeholder"),
            public: String::new(),
            config: lab.path(&format!("h{host}.toml")),
            control: lab.path(&format!("h{host}.sock")),
            log: lab.path(&format!("h{host}.log")),
            key_file,
            port,
            overlay: h.overlay,
        };
        let _ = ours.child.wait();
        ours.write_config(peers);
        let log = fs::File::create(&ours.log).expect("log file");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .arg("--")
            .arg(tunnel_bin())
            .args(["run", "--config"])
            .arg(&ours.config)
            .arg("--control")
            .arg(&ours.control)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn sparegrid-tunnel");
        let stdout = child.stdout.take().expect("stdout");
        ours.child = child;
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let Some(public) = line.trim().strip_prefix("ready ") else {
            let _ = ours.child.kill();
            let _ = ours.child.wait();
            panic!(
                "sparegrid-tunnel in {} did not start: {line:?}\n{}",
                h.ns,
                fs::read_to_string(&ours.log).unwrap_or_default()
            );
        };
        ours.public = public.to_string();
        ours
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    pub fn endpoint(&self, lab: &Lab) -> SocketAddrV4 {
        let h = lab.hosts.iter().find(|h| h.ns == self.ns).expect("host");
        SocketAddrV4::new(h.underlay, self.port)
    }

    pub fn write_config(&self, peers: &[PeerSpec]) {
        let mut s = format!(
            "private_key_file = {:?}\nlisten_port = {}\ninterface = \"sgtun0\"\naddress = \"{}/16\"\n",
            self.key_file.display().to_string(),
            self.port,
            self.overlay
        );
        for p in peers {
            s.push_str(&format!("\n[[peer]]\npublic_key = \"{}\"\n", p.public));
            if let Some(e) = p.endpoint {
                s.push_str(&format!("endpoint = \"{e}\"\n"));
            }
            let nets: Vec<String> = p.allowed.iter().map(|n| format!("\"{n}\"")).collect();
            s.push_str(&format!("allowed_ips = [{}]\n", nets.join(", ")));
        }
        fs::write(&self.config, s).expect("write tunnel config");
    }

    /// Rewrites the config's peers and has the running endpoint apply them.
    pub fn reload(&self, peers: &[PeerSpec]) -> String {
        self.write_config(peers);
        let answer = sparegrid_agent::tunnel::control::request(&self.control, "reload")
            .unwrap_or_else(|e| panic!("reload {}: {e}", self.ns));
        assert!(
            answer.starts_with("ok"),
            "reload: {answer}\n{}",
            self.log_text()
        );
        answer
    }

    pub fn stats(&self) -> TunnelStats {
        let answer = sparegrid_agent::tunnel::control::request(&self.control, "stats")
            .unwrap_or_else(|e| panic!("stats {}: {e}\n{}", self.ns, self.log_text()));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("stats {answer:?}: {e}"))
    }

    pub fn peer(&self, public: &str) -> sparegrid_agent::tunnel::PeerStats {
        let s = self.stats();
        s.peers
            .iter()
            .find(|p| p.public_key.to_string() == public)
            .cloned()
            .unwrap_or_else(|| panic!("no peer {public} in {s:?}"))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn as_peer(&self, lab: &Lab, allowed: &str) -> PeerSpec {
        PeerSpec {
            public: self.public.clone(),
            endpoint: Some(self.endpoint(lab)),
            allowed: vec![allowed.to_string()],
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "--- {} sparegrid-tunnel log ---\n{}",
                self.ns,
                self.log_text()
            );
        }
    }
}

fn stop(child: &mut Child) {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// wireguard-go, configured with wg

pub struct WgGo {
    pub ns: String,
    pub ifname: String,
    pub public: String,
    pub child: Child,
    port: u16,
}

impl WgGo {
    /// `wireguard-go` in `host`'s namespace, interface named uniquely (its
    /// control socket lives in the shared /var/run/wireguard), configured
    /// with `wg set` and given overlay/16.
    pub fn start(lab: &Lab, host: usize, port: u16, private: &str, peers: &[PeerSpec]) -> WgGo {
        let h = &lab.hosts[host];
        let ifname = format!("wg{}h{host}", lab.id);
        assert!(ifname.len() <= 15, "{ifname} too long");
        let log = fs::File::create(lab.path(&format!("h{host}-wg.log"))).expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .args(["--", "wireguard-go", "-f", &ifname])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn wireguard-go");
        let mut wg = WgGo {
            ns: h.ns.clone(),
            ifname: ifname.clone(),
            public: pubkey_of(private),
            child,
            port,
        };
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline && wg.is_running(),
                "wireguard-go {ifname} in {} never made {}",
                h.ns,
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let key_file = lab.path(&format!("h{host}-wg.key"));
        write_private(&key_file, private);
        let mut args: Vec<String> = vec![
            "wg".into(),
            "set".into(),
            ifname.clone(),
            "listen-port".into(),
            port.to_string(),
            "private-key".into(),
            key_file.display().to_string(),
        ];
        for p in peers {
            args.push("peer".into());
            args.push(p.public.clone());
            if let Some(e) = p.endpoint {
                args.push("endpoint".into());
                args.push(e.to_string());
            }
            args.push("allowed-ips".into());
            args.push(p.allowed.join(","));
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        ns_run(&h.ns, &argv);
        ns_run(
            &h.ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/16", h.overlay),
                "dev",
                &ifname,
            ],
        );
        ns_run(&h.ns, &["ip", "link", "set", &ifname, "up"]);
        wg
    }

    pub fn endpoint(&self, lab: &Lab) -> SocketAddrV4 {
        let h = lab.hosts.iter().find(|h| h.ns == self.ns).expect("host");
        SocketAddrV4::new(h.underlay, self.port)
    }

    pub fn as_peer(&self, lab: &Lab, allowed: &str) -> PeerSpec {
        PeerSpec {
            public: self.public.clone(),
            endpoint: Some(self.endpoint(lab)),
            allowed: vec![allowed.to_string()],
        }
    }

    /// `wg show <if> <what>` lines as (peer, value) pairs.
    fn show(&self, what: &str) -> Vec<(String, String)> {
        ns_run(&self.ns, &["wg", "show", &self.ifname, what])
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.collect::<Vec<_>>().join(" ")))
            })
            .collect()
    }

    /// Unix time of the latest handshake with `peer` (0: none).
    pub fn latest_handshake(&self, peer: &str) -> u64 {
        self.show("latest-handshakes")
            .into_iter()
            .find(|(p, _)| p == peer)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    }

    /// (received, sent) bytes with `peer`.
    pub fn transfer(&self, peer: &str) -> (u64, u64) {
        self.show("transfer")
            .into_iter()
            .find(|(p, _)| p == peer)
            .map(|(_, v)| {
                let mut it = v.split_whitespace().map(|x| x.parse().unwrap_or(0));
                (it.next().unwrap_or(0), it.next().unwrap_or(0))
            })
            .unwrap_or((0, 0))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for WgGo {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The public key of a private one, by `wg pubkey` (the standard tool).
pub fn pubkey_of(private: &str) -> String {
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run wg pubkey");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{private}\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wg pubkey");
    assert!(out.status.success(), "wg pubkey failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------
// Traffic from inside a namespace

/// Runs `f` on a thread that entered `ns`'s network namespace (sockets it
/// makes belong there).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a namespace fd we own, for this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo from inside `ns` to `dst`; the round-trip time, or None
/// when no reply came within `timeout`. A raw socket, so no `ping` binary
/// is needed (we are root).
pub fn ping(ns: &str, dst: Ipv4Addr, timeout: Duration) -> Option<Duration> {
    ping_many(ns, dst, 1, timeout, Duration::ZERO)
        .into_iter()
        .next()
        .flatten()
}

/// `count` echoes, `gap` apart; each one's RTT or None.
pub fn ping_many(
    ns: &str,
    dst: Ipv4Addr,
    count: usize,
    timeout: Duration,
    gap: Duration,
) -> Vec<Option<Duration>> {
    in_ns(ns, move || {
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let id = (std::process::id() as u16) ^ (SEQ.fetch_add(1, Ordering::Relaxed) as u16);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let mut out = Vec::with_capacity(count);
        for seq in 0..count as u16 {
            let mut pkt = vec![8u8, 0, 0, 0];
            pkt.extend_from_slice(&id.to_be_bytes());
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend_from_slice(&[0x5a; 56]);
            let ck = icmp_checksum(&pkt);
            pkt[2..4].copy_from_slice(&ck.to_be_bytes());
            let start = Instant::now();
            // SAFETY: sendto with a buffer and address we own.
            unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr() as *const libc::c_void,
                    pkt.len(),
                    0,
                    &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            let mut got = None;
            let mut buf = [0u8; 2048];
            while start.elapsed() < timeout {
                let left = timeout.saturating_sub(start.elapsed());
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
                if rc <= 0 {
                    continue;
                }
                // SAFETY: recv into our buffer.
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n < 28 {
                    continue;
                }
                let b = &buf[..n as usize];
                let ihl = ((b[0] & 0x0f) as usize) * 4;
                let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
                let icmp = &b[ihl..];
                if src == dst
                    && icmp.len() >= 8
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                {
                    got = Some(start.elapsed());
                    break;
                }
            }
            out.push(got);
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        out
    })
}

/// Pings until one reply comes or `deadline` passes.
pub fn ping_until(ns: &str, dst: Ipv4Addr, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if ping(ns, dst, Duration::from_millis(500)).is_some() {
            return true;
        }
    }
    false
}

/// FNV-1a, 64 bits: the checksum both ends of a transfer compute.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Sends `bytes` of pseudo-random data over TCP from `from_ns` to
/// `to_ns`'s `to:port`; returns (sent checksum, received checksum,
/// received length). Fails (panics) instead of hanging after `deadline`.
pub fn tcp_transfer(
    from_ns: &str,
    to_ns: &str,
    to: Ipv4Addr,
    port: u16,
    bytes: usize,
    deadline: Duration,
) -> (u64, u64, usize) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to_ns2 = to_ns.to_string();
    let server = std::thread::spawn(move || {
        in_ns(&to_ns2, move || {
            let l = TcpListener::bind(SocketAddr::from((to, port)))
                .unwrap_or_else(|e| panic!("bind {to}:{port}: {e}"));
            ready_tx.send(()).expect("ready");
            l.set_nonblocking(true).expect("nonblocking");
            let end = Instant::now() + deadline;
            let (mut s, _) = loop {
                match l.accept() {
                    Ok(c) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < end, "no connection to {to}:{port}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).expect("blocking");
            s.set_read_timeout(Some(deadline)).expect("timeout");
            let mut h = Fnv::default();
            let mut n = 0;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k;
                    }
                    Err(e) => panic!("read after {n} bytes: {e}"),
                }
            }
            (h.value(), n)
        })
    });
    ready_rx
        .recv_timeout(deadline)
        .expect("server never listened");
    let sent = in_ns(from_ns, move || {
        let addr = SocketAddr::from((to, port));
        let mut s = TcpStream::connect_timeout(&addr, deadline)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_write_timeout(Some(deadline)).expect("timeout");
        let mut h = Fnv::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ bytes as u64;
        let mut left = bytes;
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            let k = left.min(buf.len());
            for chunk in buf[..k].chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x.to_le_bytes();
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
            s.write_all(&buf[..k]).expect("write");
            h.update(&buf[..k]);
            left -= k;
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        h.value()
    });
    let (got, n) = server.join().expect("server thread");
    (sent, got, n)
}
