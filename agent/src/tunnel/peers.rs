//! The live peer set: who may talk to us, where they are, which overlay
//! prefixes are theirs, and what each has done (stats).
//!
//! Each peer owns one boringtun [`Tunn`] (handshake state, sessions,
//! WireGuard's timers) behind a mutex, a 24-bit index that is the top of
//! every session index we hand out to it (so an incoming packet's receiver
//! index finds its peer), and counters. The routing table (longest prefix
//! first) and the key and index maps are one immutable [`PeerTable`]
//! swapped whole on [`PeerSet::update`]; peers whose key stays keep their
//! `Tunn` and sessions, so a live update does not interrupt their traffic.
//!
//! Cryptokey routing, as WireGuard defines it: a packet to an overlay
//! address goes to the peer whose allowed IPs hold it, and a packet
//! decrypted from a peer is accepted only when its inner source address
//! routes back to that same peer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::config::{validate_peers, ConfigError, PeerConfig};
use super::keys::Key;

/// Handshake initiations per second above which the shared rate limiter
/// asks initiators for a cookie (boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// One peer's live state.
pub struct Peer {
    pub key: Key,
    /// Our index for this peer (< 2^24; boringtun adds 8 bits per session).
    pub index: u32,
    pub(crate) tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    keepalive: Option<u16>,
    allowed_ips: Vec<IpNet>,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) inits_sent: AtomicU64,
    pub(crate) responses_sent: AtomicU64,
}

impl Peer {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read().expect("endpoint lock")
    }

    /// Roaming: an authenticated packet came from `addr`.
    pub fn set_endpoint(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            *self.endpoint.write().expect("endpoint lock") = Some(addr);
            tracing::info!(peer = %self.key.short(), endpoint = %addr, "peer endpoint");
        }
    }

    fn stats(&self) -> PeerStats {
        let since = self.tunn.lock().expect("tunn lock").stats().0;
        let last_handshake_unix = since.and_then(|d| {
            SystemTime::now()
                .checked_sub(d)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|t| t.as_secs())
        });
        PeerStats {
            public_key: self.key,
            endpoint: self.endpoint(),
            allowed_ips: self.allowed_ips.clone(),
            last_handshake_unix,
            seconds_since_handshake: since.map(|d| d.as_secs_f64()),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            handshake_initiations_sent: self.inits_sent.load(Ordering::Relaxed),
            handshake_responses_sent: self.responses_sent.load(Ordering::Relaxed),
            persistent_keepalive: self.keepalive,
        }
    }
}

/// What one peer has done, for status and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStats {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// When the current session's handshake completed (unix seconds); none
    /// without a session.
    pub last_handshake_unix: Option<u64>,
    pub seconds_since_handshake: Option<f64>,
    /// Plaintext bytes sent into the tunnel to this peer / received from it.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Handshake messages we sent: initiations (we started) and responses
    /// (it started).
    pub handshake_initiations_sent: u64,
    pub handshake_responses_sent: u64,
    pub persistent_keepalive: Option<u16>,
}

/// Endpoint-wide counters of dropped input.
#[derive(Debug, Default)]
pub struct Counters {
    /// Handshake initiations from a static key that is not in the peer list.
    pub rejected_handshakes: AtomicU64,
    /// Packets whose receiver index is no session of ours.
    pub unknown_index: AtomicU64,
    /// Packets from the TUN device to an address no peer's allowed IPs hold.
    pub no_route: AtomicU64,
    /// Decrypted packets whose inner source is not the sender's.
    pub bad_source: AtomicU64,
    /// Datagrams that failed to parse, authenticate or decrypt.
    pub invalid: AtomicU64,
}

/// The routing table and lookups, replaced whole on each update.
#[derive(Default)]
pub struct PeerTable {
    by_key: HashMap<Key, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Longest prefix first.
    routes: Vec<(IpNet, Arc<Peer>)>,
}

impl PeerTable {
    pub fn by_key(&self, key: &Key) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    /// The peer of a receiver index in an incoming packet.
    pub fn by_receiver(&self, receiver_idx: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&(receiver_idx >> 8))
    }

    /// The peer whose allowed IPs hold `ip` (longest prefix).
    pub fn route(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, p)| p)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.by_key.values()
    }

    /// Every allowed prefix.
    pub fn nets(&self) -> Vec<IpNet> {
        self.routes.iter().map(|(n, _)| *n).collect()
    }
}

/// What an update changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub added: Vec<Key>,
    pub removed: Vec<Key>,
    pub updated: Vec<Key>,
}

/// The live peer set of one endpoint.
pub struct PeerSet {
    private: Key,
    public: Key,
    pub(crate) rate_limiter: Arc<RateLimiter>,
    table: RwLock<Arc<PeerTable>>,
    next_index: AtomicU32,
    pub counters: Counters,
}

impl PeerSet {
    pub fn new(private: Key, peers: &[PeerConfig]) -> Result<PeerSet, ConfigError> {
        let public = private.public();
        let set = PeerSet {
            private,
            public,
            rate_limiter: Arc::new(RateLimiter::new(&public.as_public(), HANDSHAKE_RATE_LIMIT)),
            table: RwLock::new(Arc::new(PeerTable::default())),
            // Any start will do; a random one makes stale packets from a
            // previous run of this host miss.
            next_index: AtomicU32::new(random_u32() & 0xff_ffff),
            counters: Counters::default(),
        };
        set.update(peers)?;
        Ok(set)
    }

    pub fn private_key(&self) -> &Key {
        &self.private
    }

    pub fn public_key(&self) -> &Key {
        &self.public
    }

    /// The current table (cheap: one `Arc` clone).
    pub fn snapshot(&self) -> Arc<PeerTable> {
        self.table.read().expect("table lock").clone()
    }

    /// Replaces the peer list. Peers that stay keep their sessions (their
    /// endpoint and allowed IPs are updated; a changed keepalive starts a
    /// fresh `Tunn`); peers that go are dropped with their sessions; new
    /// ones start without a session (the first packet either way starts the
    /// handshake).
    pub fn update(&self, peers: &[PeerConfig]) -> Result<PeerChange, ConfigError> {
        validate_peers(peers)?;
        let old = self.snapshot();
        let mut change = PeerChange::default();
        let mut table = PeerTable::default();
        for pc in peers {
            let peer = match old.by_key(&pc.public_key) {
                Some(p)
                    if p.keepalive == pc.persistent_keepalive
                        && p.allowed_ips == pc.allowed_ips =>
                {
                    if let Some(e) = pc.endpoint {
                        p.set_endpoint(e);
                    }
                    p.clone()
                }
                Some(p) => {
                    // Its prefixes or keepalive changed: a new `Peer` with
                    // the same index and counters. Same keepalive: the live
                    // `Tunn` (sessions) moves over; a new keepalive needs a
                    // new `Tunn` (boringtun sets it only at creation).
                    change.updated.push(pc.public_key);
                    let tunn = if p.keepalive == pc.persistent_keepalive {
                        std::mem::replace(
                            &mut *p.tunn.lock().expect("tunn lock"),
                            self.new_tunn(pc, p.index),
                        )
                    } else {
                        self.new_tunn(pc, p.index)
                    };
                    let load = |c: &AtomicU64| AtomicU64::new(c.load(Ordering::Relaxed));
                    Arc::new(Peer {
                        key: pc.public_key,
                        index: p.index,
                        tunn: Mutex::new(tunn),
                        endpoint: RwLock::new(pc.endpoint.or(p.endpoint())),
                        keepalive: pc.persistent_keepalive,
                        allowed_ips: pc.allowed_ips.clone(),
                        tx_bytes: load(&p.tx_bytes),
                        rx_bytes: load(&p.rx_bytes),
                        inits_sent: load(&p.inits_sent),
                        responses_sent: load(&p.responses_sent),
                    })
                }
                None => {
                    change.added.push(pc.public_key);
                    let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
                    Arc::new(Peer {
                        key: pc.public_key,
                        index,
                        tunn: Mutex::new(self.new_tunn(pc, index)),
                        endpoint: RwLock::new(pc.endpoint),
                        keepalive: pc.persistent_keepalive,
                        allowed_ips: pc.allowed_ips.clone(),
                        tx_bytes: AtomicU64::new(0),
                        rx_bytes: AtomicU64::new(0),
                        inits_sent: AtomicU64::new(0),
                        responses_sent: AtomicU64::new(0),
                    })
                }
            };
            table.by_index.insert(peer.index, peer.clone());
            for net in &pc.allowed_ips {
                table.routes.push((*net, peer.clone()));
            }
            table.by_key.insert(pc.public_key, peer);
        }
        table
            .routes
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        for k in old.by_key.keys() {
            if !table.by_key.contains_key(k) {
                change.removed.push(*k);
            }
        }
        *self.table.write().expect("table lock") = Arc::new(table);
        if change != PeerChange::default() {
            tracing::info!(
                added = change.added.len(),
                removed = change.removed.len(),
                updated = change.updated.len(),
                peers = peers.len(),
                "tunnel peers updated"
            );
        }
        Ok(change)
    }

    fn new_tunn(&self, pc: &PeerConfig, index: u32) -> Tunn {
        Tunn::new(
            self.private.secret(),
            pc.public_key.as_public(),
            None,
            pc.persistent_keepalive,
            index,
            Some(self.rate_limiter.clone()),
        )
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        let t = self.snapshot();
        let mut v: Vec<PeerStats> = t.peers().map(|p| p.stats()).collect();
        v.sort_by_key(|s| s.public_key);
        v
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    u32::from_le_bytes(b)
}

/// How long ago, as a readable figure for the CLI.
pub fn ago(d: Option<f64>) -> String {
    match d {
        None => "never".into(),
        Some(s) => format!("{:?} ago", Duration::from_secs(s as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(key: Key, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key,
            endpoint: None,
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn k() -> Key {
        Key::generate().unwrap().public()
    }

    #[test]
    fn routes_by_longest_prefix_and_receiver_index() {
        let (a, b) = (k(), k());
        let set = PeerSet::new(
            Key::generate().unwrap(),
            &[pc(a, &["100.96.0.0/16"]), pc(b, &["100.96.2.0/24"])],
        )
        .unwrap();
        let t = set.snapshot();
        assert_eq!(t.route("100.96.2.9".parse().unwrap()).unwrap().key, b);
        assert_eq!(t.route("100.96.3.9".parse().unwrap()).unwrap().key, a);
        assert!(t.route("10.0.0.1".parse().unwrap()).is_none());
        let pb = t.by_key(&b).unwrap();
        assert_eq!(t.by_receiver((pb.index << 8) | 3).unwrap().key, b);
    }

    #[test]
    fn update_keeps_staying_peers_and_reports_changes() {
        let (a, b, c) = (k(), k(), k());
        let set = PeerSet::new(
            Key::generate().unwrap(),
            &[pc(a, &["100.96.1.0/24"]), pc(b, &["100.96.2.0/24"])],
        )
        .unwrap();
        let before = set.snapshot().by_key(&a).unwrap().clone();
        before.tx_bytes.store(7, Ordering::Relaxed);
        let change = set
            .update(&[pc(a, &["100.96.1.0/24"]), pc(c, &["100.96.3.0/24"])])
            .unwrap();
        assert_eq!(change.added, vec![c]);
        assert_eq!(change.removed, vec![b]);
        assert!(change.updated.is_empty());
        let t = set.snapshot();
        assert!(Arc::ptr_eq(t.by_key(&a).unwrap(), &before));
        assert!(t.by_key(&b).is_none());
        // Changing a peer's prefixes keeps its index and counters.
        let change = set
            .update(&[pc(a, &["100.96.9.0/24"]), pc(c, &["100.96.3.0/24"])])
            .unwrap();
        assert_eq!(change.updated, vec![a]);
        let after = set.snapshot().by_key(&a).unwrap().clone();
        assert_eq!(after.index, before.index);
        assert_eq!(after.tx_bytes.load(Ordering::Relaxed), 7);
        assert_eq!(
            set.snapshot()
                .route("100.96.9.1".parse().unwrap())
                .unwrap()
                .key,
            a
        );
    }

    #[test]
    fn invalid_update_changes_nothing() {
        let a = k();
        let set = PeerSet::new(Key::generate().unwrap(), &[pc(a, &["100.96.1.0/24"])]).unwrap();
        let err = set
            .update(&[pc(a, &["100.96.1.0/24"]), pc(a, &["100.96.2.0/24"])])
            .unwrap_err();
        assert!(err.to_string().contains("peer[1].public_key"), "{err}");
        assert!(set.snapshot().by_key(&a).is_some());
    }
}
