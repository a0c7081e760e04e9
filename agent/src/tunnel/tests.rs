//! Endpoint tests without root: real UDP on loopback, in-memory packet
//! devices, boringtun on both sides. The namespace tests with a real TUN
//! device and wireguard-go are in tests/tests/tunnel_netns.rs.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::device::MemTun;
use super::*;

/// Generous: only to fail instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

/// A minimal IPv4/UDP packet from `src` to `dst` carrying `payload` (the
/// tunnel looks only at the addresses and length).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

struct Node {
    key: Key,
    tun: Arc<MemTun>,
    tunnel: Tunnel,
    addr: Ipv4Addr,
}

impl Node {
    fn start(key: Key, addr: Ipv4Addr, peers: &[PeerConfig]) -> Node {
        let tun = Arc::new(MemTun::default());
        let tunnel = Tunnel::start(
            key,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tun.clone(),
            peers,
            1420,
        )
        .unwrap();
        Node {
            key,
            tun,
            tunnel,
            addr,
        }
    }

    fn endpoint(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tunnel.local_port()))
    }

    fn as_peer(&self, with_endpoint: bool) -> PeerConfig {
        PeerConfig {
            public_key: self.key.public(),
            endpoint: with_endpoint.then(|| self.endpoint()),
            allowed_ips: vec![format!("{}/32", self.addr).parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    /// Sends `payload` from this node's address to `to` until it comes
    /// out of `to`'s device (the first packets wait for the handshake).
    fn deliver(&self, to: &Node, payload: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        let pkt = ipv4(self.addr, to.addr, payload);
        while Instant::now() < deadline {
            self.tun.inject(pkt.clone());
            while let Some(got) = to.tun.take(Duration::from_millis(300)) {
                if got == pkt {
                    return got;
                }
            }
        }
        panic!(
            "packet {} -> {} never arrived; stats from: {:?} to: {:?}",
            self.addr,
            to.addr,
            self.tunnel.stats(),
            to.tunnel.stats()
        );
    }
}

fn addr(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 96, last, 1)
}

#[test]
fn two_endpoints_handshake_and_carry_packets_both_ways() {
    let (ka, kb) = (Key::generate().unwrap(), Key::generate().unwrap());
    let mut b = Node::start(kb, addr(2), &[]);
    let a = Node::start(
        ka,
        addr(1),
        &[PeerConfig {
            public_key: kb.public(),
            endpoint: Some(b.endpoint()),
            allowed_ips: vec![format!("{}/32", addr(2)).parse().unwrap()],
            persistent_keepalive: None,
        }],
    );
    // B learns A's endpoint from A's handshake (no endpoint configured).
    b.tunnel.update_peers(&[a.as_peer(false)]).unwrap();
    b.addr = addr(2);
    let got = a.deliver(&b, b"hello b");
    assert!(got.ends_with(b"hello b"));
    let back = b.deliver(&a, b"hello a");
    assert!(back.ends_with(b"hello a"));

    let sa = a.tunnel.stats();
    let sb = b.tunnel.stats();
    assert_eq!(sa.peers.len(), 1);
    let pa = &sa.peers[0];
    let pb = &sb.peers[0];
    assert!(pa.last_handshake_unix.is_some(), "{sa:?}");
    assert!(pa.handshake_initiations_sent >= 1, "{sa:?}");
    assert!(pb.handshake_responses_sent >= 1, "{sb:?}");
    assert!(pa.tx_bytes > 0 && pa.rx_bytes > 0, "{sa:?}");
    assert_eq!(pb.endpoint, Some(a.endpoint()), "B learnt A's endpoint");
    assert_eq!(sb.rejected_handshakes, 0);
}

#[test]
fn unknown_key_is_rejected_and_counted_until_added_live() {
    let (ka, kc) = (Key::generate().unwrap(), Key::generate().unwrap());
    let a = Node::start(ka, addr(1), &[]);
    // C knows A, A does not know C.
    let c = Node::start(
        kc,
        addr(3),
        &[PeerConfig {
            public_key: ka.public(),
            endpoint: Some(a.endpoint()),
            allowed_ips: vec![format!("{}/32", addr(1)).parse().unwrap()],
            persistent_keepalive: None,
        }],
    );
    let pkt = ipv4(c.addr, a.addr, b"let me in");
    let deadline = Instant::now() + WAIT;
    while a.tunnel.stats().rejected_handshakes == 0 {
        assert!(Instant::now() < deadline, "A never saw C's handshake");
        c.tun.inject(pkt.clone());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.tun.take(Duration::from_millis(300)).is_none());
    let sc = c.tunnel.stats();
    assert!(sc.peers[0].last_handshake_unix.is_none(), "{sc:?}");

    // Added live: the next handshake (C retries) is accepted.
    let change = a.tunnel.update_peers(&[c.as_peer(false)]).unwrap();
    assert_eq!(change.added, vec![kc.public()]);
    c.deliver(&a, b"now in");
}

#[test]
fn packet_with_a_foreign_inner_source_is_dropped() {
    let (ka, kb) = (Key::generate().unwrap(), Key::generate().unwrap());
    let b = Node::start(kb, addr(2), &[]);
    let a = Node::start(ka, addr(1), &[b.as_peer(true)]);
    b.tunnel.update_peers(&[a.as_peer(true)]).unwrap();
    a.deliver(&b, b"first");
    // A claims an address that is not in its allowed IPs at B.
    let spoof = ipv4(Ipv4Addr::new(100, 96, 9, 9), b.addr, b"spoofed");
    let deadline = Instant::now() + WAIT;
    while b.tunnel.stats().bad_source_packets == 0 {
        assert!(
            Instant::now() < deadline,
            "B never counted the spoofed packet"
        );
        a.tun.inject(spoof.clone());
        std::thread::sleep(Duration::from_millis(50));
    }
    while let Some(p) = b.tun.take(Duration::from_millis(200)) {
        assert_ne!(p, spoof, "the spoofed packet reached B's device");
    }
}

#[test]
fn packet_without_a_route_is_counted() {
    let a = Node::start(Key::generate().unwrap(), addr(1), &[]);
    a.tun.inject(ipv4(a.addr, addr(7), b"nowhere"));
    let deadline = Instant::now() + WAIT;
    while a.tunnel.stats().no_route_packets == 0 {
        assert!(Instant::now() < deadline, "no_route never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_burst_of_full_size_packets_arrives_whole() {
    // More full-MTU packets than one UDP GSO send may carry (64 x 1452
    // bytes overflow the 16-bit IP length): every one must still arrive.
    let (ka, kb) = (Key::generate().unwrap(), Key::generate().unwrap());
    let b = Node::start(kb, addr(2), &[]);
    let a = Node::start(ka, addr(1), &[b.as_peer(true)]);
    b.tunnel.update_peers(&[a.as_peer(true)]).unwrap();
    a.deliver(&b, b"handshake first");
    let burst: Vec<Vec<u8>> = (0..100u32)
        .map(|i| {
            let mut payload = vec![0u8; 1420 - 28];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            ipv4(a.addr, b.addr, &payload)
        })
        .collect();
    for p in &burst {
        a.tun.inject(p.clone());
    }
    let mut got = 0;
    while got < burst.len() {
        let Some(p) = b.tun.take(WAIT) else {
            panic!(
                "{got} of {} packets arrived; A: {:?}",
                burst.len(),
                a.tunnel.stats()
            );
        };
        if burst.contains(&p) {
            got += 1;
        }
    }
}
