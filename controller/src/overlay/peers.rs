//! The overlay's members and the peer list the controller distributes.
//!
//! A member is a host that holds a slice. It is *listed* while it has a
//! public key (it registered a tunnel) and is active (not lost). Every
//! agent gets the list of the other listed members, each with its slice as
//! allowed IPs ([`PeerBook::peers_for`]).
//!
//! The list's version is a 64-bit hash of the listed (host, key, endpoint,
//! slice) tuples, never 0 (0 is an agent's "none yet"): it changes
//! whenever the list does and only then, and because it depends on the
//! content alone it survives a controller restart: agents whose list is
//! current are not sent it again. (A hash may in principle collide; with
//! 64 bits and a handful of changes that is not a practical concern, and
//! the cost would be one missed update until the next change.)

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use sparegrid_proto::overlay::{OverlayPeer, OverlayPeers};

/// One host that holds a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// `"100.96.3.0/24"`.
    pub slice: String,
    /// Canonical base64; `None` while the host runs without a tunnel.
    pub public_key: Option<String>,
    /// `ip:port`, when known.
    pub endpoint: Option<String>,
    /// Not lost.
    pub active: bool,
}

impl Member {
    fn listed(&self) -> bool {
        self.active && self.public_key.is_some()
    }
}

/// The members, the list of the listed ones, and its version.
#[derive(Debug, Clone, Default)]
pub struct PeerBook {
    members: BTreeMap<String, Member>,
    list: Vec<OverlayPeer>,
    version: u64,
}

impl PeerBook {
    pub fn new() -> PeerBook {
        let mut b = PeerBook::default();
        b.rebuild();
        b
    }

    /// Adds or replaces `host`'s membership.
    pub fn upsert(&mut self, host: &str, m: Member) {
        if self.members.get(host) != Some(&m) {
            self.members.insert(host.to_owned(), m);
            self.rebuild();
        }
    }

    /// `host` no longer holds a slice.
    pub fn remove(&mut self, host: &str) {
        if self.members.remove(host).is_some() {
            self.rebuild();
        }
    }

    /// `host` was lost (`false`) or came back (`true`).
    pub fn set_active(&mut self, host: &str, active: bool) {
        if let Some(m) = self.members.get_mut(host) {
            if m.active != active {
                m.active = active;
                self.rebuild();
            }
        }
    }

    pub fn member(&self, host: &str) -> Option<&Member> {
        self.members.get(host)
    }

    /// Every member, by host.
    pub fn members(&self) -> impl Iterator<Item = (&String, &Member)> {
        self.members.iter()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The current version of the list.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every listed member, by host.
    pub fn listed(&self) -> &[OverlayPeer] {
        &self.list
    }

    /// The list for `host` (every other listed member) when `host` is
    /// listed itself and `applied` (the version it reported) is not the
    /// current one; `None` otherwise.
    pub fn peers_for(&self, host: &str, applied: u64) -> Option<OverlayPeers> {
        if applied == self.version || !self.members.get(host).is_some_and(Member::listed) {
            return None;
        }
        Some(OverlayPeers {
            version: self.version,
            peers: self
                .list
                .iter()
                .filter(|p| p.host != host)
                .cloned()
                .collect(),
        })
    }

    fn rebuild(&mut self) {
        self.list = self
            .members
            .iter()
            .filter(|(_, m)| m.listed())
            .map(|(host, m)| OverlayPeer {
                host: host.clone(),
                public_key: m.public_key.clone().unwrap_or_default(),
                endpoint: m.endpoint.clone(),
                allowed_ips: vec![m.slice.clone()],
            })
            .collect();
        // std's DefaultHasher::new() is SipHash with fixed keys: the same
        // list hashes the same in every process of one build (a different
        // build at worst resends the list once).
        let mut h = DefaultHasher::new();
        for p in &self.list {
            (&p.host, &p.public_key, &p.endpoint, &p.allowed_ips).hash(&mut h);
        }
        self.version = h.finish().max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(slice: &str, key: &str, endpoint: &str) -> Member {
        Member {
            slice: slice.into(),
            public_key: Some(key.into()),
            endpoint: Some(endpoint.into()),
            active: true,
        }
    }

    fn three() -> PeerBook {
        let mut b = PeerBook::new();
        b.upsert("a", m("100.96.1.0/24", "ka", "192.0.2.1:51820"));
        b.upsert("b", m("100.96.2.0/24", "kb", "192.0.2.2:51820"));
        b.upsert("c", m("100.96.3.0/24", "kc", "192.0.2.3:51820"));
        b
    }

    #[test]
    fn a_host_gets_every_other_listed_host_never_itself() {
        let b = three();
        let for_a = b.peers_for("a", 0).unwrap();
        assert_eq!(for_a.version, b.version());
        let hosts: Vec<&str> = for_a.peers.iter().map(|p| p.host.as_str()).collect();
        assert_eq!(hosts, ["b", "c"]);
        assert_eq!(for_a.peers[0].allowed_ips, ["100.96.2.0/24"]);
        assert_eq!(for_a.peers[0].public_key, "kb");
        assert_eq!(for_a.peers[0].endpoint.as_deref(), Some("192.0.2.2:51820"));
        for h in ["a", "b", "c"] {
            assert!(b.peers_for(h, 0).unwrap().peers.iter().all(|p| p.host != h));
        }
        // Not a member, or a member without a key: no list.
        assert_eq!(b.peers_for("z", 0), None);
    }

    #[test]
    fn the_list_is_sent_only_on_a_version_mismatch() {
        let b = three();
        assert_eq!(b.peers_for("a", b.version()), None);
        assert!(b.peers_for("a", b.version().wrapping_add(1)).is_some());
        assert!(b.peers_for("a", 0).is_some());
    }

    #[test]
    fn the_version_changes_on_join_leave_and_endpoint_only() {
        let mut b = three();
        let v0 = b.version();
        assert_ne!(v0, 0);
        // The same membership again: no change.
        b.upsert("a", m("100.96.1.0/24", "ka", "192.0.2.1:51820"));
        b.set_active("a", true);
        b.set_active("nobody", false);
        b.remove("nobody");
        assert_eq!(b.version(), v0);
        // An endpoint changes.
        b.upsert("a", m("100.96.1.0/24", "ka", "192.0.2.9:51820"));
        let v1 = b.version();
        assert_ne!(v1, v0);
        // A host is lost: it leaves the list.
        b.set_active("b", false);
        let v2 = b.version();
        assert_ne!(v2, v1);
        assert!(b.listed().iter().all(|p| p.host != "b"));
        assert_eq!(b.peers_for("b", 0), None, "a lost host gets no list");
        // It comes back unchanged: the list, and so the version, is v1's.
        b.set_active("b", true);
        assert_eq!(b.version(), v1);
        // It runs without its tunnel: unlisted, though it keeps its slice.
        b.upsert(
            "b",
            Member {
                public_key: None,
                endpoint: None,
                ..m("100.96.2.0/24", "", "")
            },
        );
        assert_ne!(b.version(), v1);
        assert_eq!(b.len(), 3);
        // A new host joins, then leaves.
        let before = b.version();
        b.upsert("d", m("100.96.4.0/24", "kd", "192.0.2.4:51820"));
        assert_ne!(b.version(), before);
        b.remove("d");
        assert_eq!(b.version(), before);
        // The same content in another book: the same version (restarts).
        assert_eq!(three().version(), v0);
    }
}
