//! The WireGuard engine: one UDP socket, one packet device, one boringtun
//! `Tunn` per peer, three threads.
//!
//! - **device → network** (`tun` thread): read a batch of plaintext packets
//!   (with offload, one read is a TCP super-packet split into MTU-sized
//!   packets), find each one's peer by destination (allowed IPs), encrypt
//!   it, and send runs of equal-sized datagrams to one peer with UDP GSO
//!   (one `sendmsg` for up to 64 datagrams).
//! - **network → device** (`udp` thread): receive batches (`recvmmsg`, and
//!   UDP GRO where the kernel coalesces), find each datagram's peer — by
//!   the receiver index for responses, cookies and data, and by the
//!   initiator's static key (decrypted with `parse_handshake_anon`) for a
//!   handshake initiation, so a key that is not in the peer list is
//!   rejected and counted before any state is made for it — decrypt, check
//!   the inner source against the sender's allowed IPs, and write the batch
//!   to the device (with offload, coalesced per flow).
//! - **timers** (`timers` thread, every 250 ms): WireGuard's handshake
//!   retransmission, rekeying, keepalives and session expiry
//!   (`Tunn::update_timers`), and the shared handshake rate limiter's reset.
//!
//! Either side can start a handshake: we start one when a packet for a peer
//! finds no session (or the timers say so), and we answer one from any
//! listed peer. A peer's endpoint follows its last authenticated packet
//! (roaming). Threads are plain OS threads, not async tasks: each loop
//! blocks in `poll` with a short timeout and checks the stop flag, which
//! keeps the data path free of an executor's overhead.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use serde::{Deserialize, Serialize};

use super::config::{ConfigError, PeerConfig, TunnelConfig};
use super::device::{
    poll_in, poll_out, DeviceError, ReadBatch, TunDevice, TunIo, WriteBatch, BATCH,
};
use super::keys::{self, Key, KeyError};
use super::peers::{Peer, PeerChange, PeerSet, PeerStats, PeerTable};

/// How long a loop blocks before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// boringtun's timers have one-second resolution; its device ticks at 250 ms.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// WireGuard message types (first byte).
const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_DATA: u8 = 4;
/// Socket buffers asked for (wireguard-go asks for 7 MiB too).
const SOCKET_BUFFER: usize = 7 << 20;
/// Bytes in one GSO send: the datagrams of a run travel as one IP packet
/// to the kernel, whose length field is 16 bits (65535 less the IPv4 and
/// UDP headers; more fails with EMSGSIZE, which quinn-udp ignores).
const MAX_GSO_BYTES: usize = 65535 - 20 - 8;
/// Receive buffers per `recvmmsg` (each holds up to 64 KiB of GRO segments).
const RECV_BUFS: usize = 8;

/// A tunnel that could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("tunnel UDP socket {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("start tunnel thread {name}: {source}")]
    Thread { name: String, source: io::Error },
}

/// The endpoint's figures: per peer and dropped input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStats {
    pub public_key: Key,
    pub listen_port: u16,
    pub peers: Vec<PeerStats>,
    /// Handshake initiations from keys not in the peer list.
    pub rejected_handshakes: u64,
    pub unknown_index_packets: u64,
    pub no_route_packets: u64,
    pub bad_source_packets: u64,
    pub invalid_packets: u64,
}

/// A running tunnel endpoint; stops (threads joined) on drop.
pub struct Tunnel {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    peers: PeerSet,
    socket: UdpSocket,
    udp: UdpSocketState,
    tun: Arc<dyn TunIo>,
    /// The real device, for routes (none in tests).
    device: Option<Arc<TunDevice>>,
    /// The device's own prefix (routed by the kernel already).
    own_net: Option<IpNet>,
    mtu: usize,
    stop: AtomicBool,
}

impl Tunnel {
    /// Creates the TUN device from `cfg`, loads (or generates) the key,
    /// routes the peers' prefixes that the device's own prefix does not
    /// cover into it, and starts.
    pub fn from_config(cfg: &TunnelConfig) -> Result<Tunnel, EndpointError> {
        cfg.validate()?;
        let key = keys::load_or_generate(&cfg.private_key_file)?;
        let dev = Arc::new(TunDevice::create(
            &cfg.interface,
            cfg.address,
            cfg.mtu,
            cfg.offload,
        )?);
        let listen = SocketAddr::from(([0, 0, 0, 0], cfg.listen_port));
        Self::start_inner(
            key,
            listen,
            dev.clone(),
            Some((dev, cfg.address.trunc())),
            &cfg.peers,
            cfg.mtu,
        )
    }

    /// Starts on any packet device (tests use an in-memory one).
    pub fn start(
        key: Key,
        listen: SocketAddr,
        tun: Arc<dyn TunIo>,
        peers: &[PeerConfig],
        mtu: u16,
    ) -> Result<Tunnel, EndpointError> {
        Self::start_inner(key, listen, tun, None, peers, mtu)
    }

    fn start_inner(
        key: Key,
        listen: SocketAddr,
        tun: Arc<dyn TunIo>,
        device: Option<(Arc<TunDevice>, IpNet)>,
        peers: &[PeerConfig],
        mtu: u16,
    ) -> Result<Tunnel, EndpointError> {
        let sock_err = |source| EndpointError::Socket {
            addr: listen,
            source,
        };
        let socket = UdpSocket::bind(listen).map_err(sock_err)?;
        grow_buffers(&socket);
        let udp = UdpSocketState::new((&socket).into()).map_err(sock_err)?;
        let (device, own_net) = match device {
            Some((d, n)) => (Some(d), Some(n)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            peers: PeerSet::new(key, peers)?,
            socket,
            udp,
            tun,
            device,
            own_net,
            mtu: mtu as usize,
            stop: AtomicBool::new(false),
        });
        shared.sync_routes(&[], &shared.peers.snapshot().nets())?;
        let mut tunnel = Tunnel {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        for (name, f) in [
            ("tunnel-tun", tun_loop as fn(&Shared)),
            ("tunnel-udp", udp_loop),
            ("tunnel-timers", timer_loop),
        ] {
            let sh = shared.clone();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&sh))
                .map_err(|source| EndpointError::Thread {
                    name: name.into(),
                    source,
                })?;
            tunnel.threads.push(handle);
        }
        tracing::info!(
            public_key = %shared.peers.public_key(),
            port = tunnel.local_port(),
            peers = peers.len(),
            gso = shared.udp.max_gso_segments(),
            gro = shared.udp.gro_segments(),
            "tunnel endpoint started"
        );
        Ok(tunnel)
    }

    pub fn public_key(&self) -> Key {
        *self.shared.peers.public_key()
    }

    /// The UDP port actually bound.
    pub fn local_port(&self) -> u16 {
        self.shared.socket.local_addr().map_or(0, |a| a.port())
    }

    /// Applies a new peer list live: staying peers keep their sessions,
    /// routes of new prefixes are added and those of gone ones removed.
    /// An invalid list changes nothing.
    pub fn update_peers(&self, peers: &[PeerConfig]) -> Result<PeerChange, EndpointError> {
        let before = self.shared.peers.snapshot().nets();
        let change = self.shared.peers.update(peers)?;
        self.shared
            .sync_routes(&before, &self.shared.peers.snapshot().nets())?;
        Ok(change)
    }

    pub fn stats(&self) -> TunnelStats {
        let c = &self.shared.peers.counters;
        TunnelStats {
            public_key: self.public_key(),
            listen_port: self.local_port(),
            peers: self.shared.peers.stats(),
            rejected_handshakes: c.rejected_handshakes.load(Ordering::Relaxed),
            unknown_index_packets: c.unknown_index.load(Ordering::Relaxed),
            no_route_packets: c.no_route.load(Ordering::Relaxed),
            bad_source_packets: c.bad_source.load(Ordering::Relaxed),
            invalid_packets: c.invalid.load(Ordering::Relaxed),
        }
    }

    /// Stops the threads and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Bigger socket buffers than the default 208 KiB: a burst of a 64 KiB
/// super-packet per flow must not overflow them. SO_*BUFFORCE (root) first,
/// then the capped SO_*BUF.
fn grow_buffers(socket: &UdpSocket) {
    let fd = socket.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: setsockopt with a c_int option value we own.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sends `data` (several datagrams of `segment` bytes when given).
    fn send(&self, dst: SocketAddr, data: &[u8], segment: Option<usize>) {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents: data,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            match self.udp.send((&self.socket).into(), &t) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.stopping() {
                        return;
                    }
                    let _ = poll_out(self.socket.as_raw_fd(), POLL);
                }
                Err(e) => {
                    tracing::debug!(%dst, error = %e, "tunnel send failed");
                    return;
                }
            }
        }
    }

    /// Keeps the device's routes equal to the peers' prefixes that its own
    /// prefix does not cover.
    fn sync_routes(&self, before: &[IpNet], after: &[IpNet]) -> Result<(), DeviceError> {
        let Some(dev) = &self.device else {
            return Ok(());
        };
        let outside = |n: &IpNet| !self.own_net.is_some_and(|own| own.contains(n));
        for n in after.iter().filter(|n| outside(n) && !before.contains(n)) {
            dev.add_route(n)?;
        }
        for n in before.iter().filter(|n| outside(n) && !after.contains(n)) {
            dev.remove_route(n);
        }
        Ok(())
    }
}

/// A run of encrypted datagrams to one peer, contiguous in the output
/// buffer: all `seg` bytes long except maybe the last (UDP GSO's rule).
struct Run {
    dst: SocketAddr,
    start: usize,
    len: usize,
    seg: usize,
    count: usize,
    /// The last datagram was shorter: nothing more may join.
    closed: bool,
}

fn flush_run(sh: &Shared, out: &[u8], run: &mut Option<Run>) {
    if let Some(r) = run.take() {
        let seg = (r.count > 1).then_some(r.seg);
        sh.send(r.dst, &out[r.start..r.start + r.len], seg);
    }
}

fn tun_loop(sh: &Shared) {
    let mut rb = ReadBatch::new(sh.mtu);
    let room = sh.mtu.max(1500) + 64;
    let mut out = vec![0u8; BATCH * room + 256];
    while !sh.stopping() {
        let n = match sh.tun.read(&mut rb, POLL) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel device read failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        if n == 0 {
            continue;
        }
        let max_segs = sh.udp.max_gso_segments().max(1);
        let table = sh.peers.snapshot();
        let mut run: Option<Run> = None;
        let mut pos = 0;
        for i in 0..n {
            let pkt = &rb.bufs[i][..rb.sizes[i]];
            let Some(dst_ip) = Tunn::dst_address(pkt) else {
                sh.peers.counters.invalid.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(peer) = table.route(dst_ip) else {
                sh.peers.counters.no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(ep) = peer.endpoint() else {
                sh.peers.counters.no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (kind, len) = {
                let mut t = peer.tunn.lock().expect("tunn lock");
                match t.encapsulate(pkt, &mut out[pos..]) {
                    TunnResult::WriteToNetwork(b) => (b[0], b.len()),
                    TunnResult::Err(e) => {
                        tracing::debug!(peer = %peer.key.short(), error = ?e, "encapsulate");
                        continue;
                    }
                    // Queued until the handshake completes.
                    _ => (0, 0),
                }
            };
            peer.tx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            if kind != MSG_DATA {
                if kind == MSG_INIT {
                    peer.inits_sent.fetch_add(1, Ordering::Relaxed);
                }
                if len > 0 {
                    sh.send(ep, &out[pos..pos + len], None);
                }
                continue;
            }
            let joins = run.as_ref().is_some_and(|r| {
                r.dst == ep
                    && !r.closed
                    && len <= r.seg
                    && r.count < max_segs
                    && r.len + len <= MAX_GSO_BYTES
            });
            if joins {
                let r = run.as_mut().expect("checked");
                r.len += len;
                r.count += 1;
                r.closed = len < r.seg;
            } else {
                flush_run(sh, &out, &mut run);
                run = Some(Run {
                    dst: ep,
                    start: pos,
                    len,
                    seg: len,
                    count: 1,
                    closed: false,
                });
            }
            pos += len;
        }
        flush_run(sh, &out, &mut run);
    }
}

fn udp_loop(sh: &Shared) {
    let mut bufs = vec![vec![0u8; 65536]; RECV_BUFS];
    let mut meta = vec![RecvMeta::default(); RECV_BUFS];
    let mut wb = WriteBatch::default();
    let mut scratch = vec![0u8; 65536 + 256];
    let fd = sh.socket.as_raw_fd();
    while !sh.stopping() {
        match poll_in(fd, POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel poll failed");
                std::thread::sleep(POLL);
                continue;
            }
        }
        let n = {
            let mut iovs: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match sh.udp.recv((&sh.socket).into(), &mut iovs, &mut meta) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel recv failed");
                    continue;
                }
            }
        };
        let table = sh.peers.snapshot();
        for (m, buf) in meta[..n].iter().zip(&bufs) {
            let stride = m.stride.max(1);
            for dgram in buf[..m.len].chunks(stride) {
                handle_datagram(sh, &table, m.addr, dgram, &mut wb, &mut scratch);
                if wb.is_full() {
                    write_device(sh, &mut wb);
                }
            }
        }
        write_device(sh, &mut wb);
    }
}

fn write_device(sh: &Shared, wb: &mut WriteBatch) {
    if wb.count == 0 {
        return;
    }
    if let Err(e) = sh.tun.write(wb) {
        tracing::debug!(error = %e, "tunnel device write failed");
    }
    wb.count = 0;
}

/// Finds the peer a datagram is from; `None` drops it (counted).
fn sender<'t>(
    sh: &Shared,
    table: &'t PeerTable,
    src: SocketAddr,
    data: &[u8],
    packet: &Packet<'_>,
) -> Option<&'t Arc<Peer>> {
    let c = &sh.peers.counters;
    let receiver = match packet {
        Packet::HandshakeInit(init) => {
            // mac1 first (cheap, keyed with our public key); under load the
            // rate limiter answers with a cookie instead.
            let mut cookie = [0u8; 64];
            match sh
                .peers
                .rate_limiter
                .verify_packet(Some(src.ip()), data, &mut cookie)
            {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(reply)) => {
                    sh.send(src, reply, None);
                    return None;
                }
                Err(_) => {
                    c.invalid.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
            let private = sh.peers.private_key();
            let half = match parse_handshake_anon(
                &private.secret(),
                &sh.peers.public_key().as_public(),
                init,
            ) {
                Ok(h) => h,
                Err(_) => {
                    c.invalid.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            };
            let key = Key(half.peer_static_public);
            let peer = table.by_key(&key);
            if peer.is_none() {
                let n = c.rejected_handshakes.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged once per power of two: a flood stays quiet.
                if n.is_power_of_two() {
                    tracing::warn!(key = %key, %src, rejected = n, "handshake from a key not in the peer list rejected");
                }
            }
            return peer;
        }
        Packet::HandshakeResponse(r) => r.receiver_idx,
        Packet::PacketCookieReply(r) => r.receiver_idx,
        Packet::PacketData(d) => d.receiver_idx,
    };
    let peer = table.by_receiver(receiver);
    if peer.is_none() {
        c.unknown_index.fetch_add(1, Ordering::Relaxed);
    }
    peer
}

fn handle_datagram(
    sh: &Shared,
    table: &PeerTable,
    src: SocketAddr,
    data: &[u8],
    wb: &mut WriteBatch,
    scratch: &mut [u8],
) {
    let c = &sh.peers.counters;
    let packet = match Tunn::parse_incoming_packet(data) {
        Ok(p) => p,
        Err(_) => {
            c.invalid.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let Some(peer) = sender(sh, table, src, data, &packet) else {
        return;
    };
    let mut t = peer.tunn.lock().expect("tunn lock");
    let slot = wb.slot(data.len().max(256));
    match t.decapsulate(Some(src.ip()), data, slot) {
        TunnResult::WriteToTunnelV4(p, inner_src) => {
            let len = p.len();
            accept_inner(table, peer, inner_src.into(), len, wb, c);
            peer.set_endpoint(src);
        }
        TunnResult::WriteToTunnelV6(p, inner_src) => {
            let len = p.len();
            accept_inner(table, peer, inner_src.into(), len, wb, c);
            peer.set_endpoint(src);
        }
        TunnResult::WriteToNetwork(p) => {
            match p[0] {
                MSG_INIT => peer.inits_sent.fetch_add(1, Ordering::Relaxed),
                MSG_RESPONSE => peer.responses_sent.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            sh.send(src, p, None);
            // A handshake that completed may release queued packets.
            while let TunnResult::WriteToNetwork(q) = t.decapsulate(None, &[], scratch) {
                sh.send(src, q, None);
            }
            peer.set_endpoint(src);
        }
        TunnResult::Done => peer.set_endpoint(src),
        TunnResult::Err(e) => {
            c.invalid.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.key.short(), %src, error = ?e, "decapsulate");
        }
    }
}

/// Cryptokey routing on receive: the inner source must be one of the
/// sender's addresses. Keepalives (empty) are not written.
fn accept_inner(
    table: &PeerTable,
    peer: &Arc<Peer>,
    inner_src: std::net::IpAddr,
    len: usize,
    wb: &mut WriteBatch,
    c: &super::peers::Counters,
) {
    if len == 0 {
        return;
    }
    if table.route(inner_src).is_some_and(|p| Arc::ptr_eq(p, peer)) {
        peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        wb.commit(len);
    } else {
        c.bad_source.fetch_add(1, Ordering::Relaxed);
    }
}

fn timer_loop(sh: &Shared) {
    let mut buf = vec![0u8; 4096];
    let mut last_reset = Instant::now();
    while !sh.stopping() {
        std::thread::sleep(TIMER_TICK);
        if last_reset.elapsed() >= Duration::from_secs(1) {
            sh.peers.rate_limiter.reset_count();
            last_reset = Instant::now();
        }
        let table = sh.peers.snapshot();
        for peer in table.peers() {
            let mut t = peer.tunn.lock().expect("tunn lock");
            match t.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(p) => {
                    if p[0] == MSG_INIT {
                        peer.inits_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(ep) = peer.endpoint() {
                        sh.send(ep, p, None);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.key.short(), error = ?e, "timers");
                }
                _ => {}
            }
        }
    }
}
