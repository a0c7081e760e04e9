//! The overlay part of a host in `GET /v1/hosts` ([`HostOverlay`]): its
//! slice, key and endpoint as the controller has them, and its tunnel's
//! last report (per peer: endpoint, last handshake, bytes).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use sparegrid_proto::overlay::TunnelPeerStatus;

use super::{Overlay, Pool, RECENT_HANDSHAKE_SECS};

/// One host's place in the overlay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostOverlay {
    /// Its slice (`100.96.3.0/24`).
    pub slice: String,
    /// Its own address in the slice (`100.96.3.1/24`).
    pub address: String,
    /// Its WireGuard public key; absent while it runs without a tunnel.
    pub public_key: Option<String>,
    /// Where peers reach its tunnel (`ip:port`), when known.
    pub endpoint: Option<String>,
    /// In the peer list (a tunnel registered, not lost).
    pub listed: bool,
    /// The peer-list version its agent last reported applying.
    pub peers_version: Option<u64>,
    /// True when that is the controller's current version.
    pub peers_current: bool,
    /// Handshakes from unlisted keys its tunnel refused since it started.
    pub rejected_handshakes: u64,
    /// Milliseconds since its last tunnel report; absent: none yet.
    pub report_age_ms: Option<u64>,
    /// Its tunnel's peers as it last reported them.
    pub peers: Vec<TunnelPeerStatus>,
}

impl HostOverlay {
    /// Peers with a handshake in the last [`RECENT_HANDSHAKE_SECS`].
    pub fn connected_peers(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| {
                p.last_handshake_secs
                    .is_some_and(|s| s <= RECENT_HANDSHAKE_SECS)
            })
            .count()
    }
}

impl Overlay {
    /// `host`'s overlay view, when it holds a slice. Peers the agent did
    /// not name are named from their key.
    pub fn view(&self, host: &str, now: Instant) -> Option<HostOverlay> {
        let m = self.peers.member(host)?;
        let address = m
            .slice
            .parse()
            .map(|s| Pool::host_address(&s).to_string())
            .unwrap_or_default();
        let report = self.reports.get(host);
        let peers = report
            .map(|r| {
                r.report
                    .peers
                    .iter()
                    .map(|p| TunnelPeerStatus {
                        host: p
                            .host
                            .clone()
                            .or_else(|| self.host_of_key(&p.public_key).map(str::to_owned)),
                        ..p.clone()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let version = self.peers.version();
        Some(HostOverlay {
            slice: m.slice.clone(),
            address,
            public_key: m.public_key.clone(),
            endpoint: m.endpoint.clone(),
            listed: m.active && m.public_key.is_some(),
            peers_version: report.map(|r| r.report.peers_version),
            peers_current: report.is_some_and(|r| r.report.peers_version == version),
            rejected_handshakes: report.map_or(0, |r| r.report.rejected_handshakes),
            report_age_ms: report.map(|r| {
                u64::try_from(now.saturating_duration_since(r.at).as_millis()).unwrap_or(u64::MAX)
            }),
            peers,
        })
    }
}
