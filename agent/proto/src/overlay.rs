//! The grid overlay's wire types (issue 7): what an agent publishes about
//! its WireGuard tunnel endpoint when it registers ([`TunnelInfo`]), the
//! slice of the overlay CIDR the controller leases it ([`OverlayLease`]),
//! the peer list the controller distributes ([`OverlayPeers`]), the
//! per-peer status an agent reports with its heartbeats ([`TunnelReport`]),
//! and the network a job's subtasks ask for ([`Network`]).
//!
//! Addresses and keys travel as strings (`"100.96.3.0/24"`,
//! `"203.0.113.7:51820"`, `wg`-style base64 keys) so that this crate stays
//! free of parsing dependencies; each side parses and names the field when
//! one is malformed.

use serde::{Deserialize, Serialize};

/// In [`crate::grid::Register`]: this agent runs a tunnel endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// The host's WireGuard public key, base64 (32 bytes).
    pub public_key: String,
    /// The UDP port the endpoint listens on.
    pub listen_port: u16,
    /// Where other agents reach it (`ip:port`), when the operator set one
    /// (`tunnel.public_endpoint`). Absent: the controller uses the address
    /// the registration came from, with `listen_port`.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// In [`crate::grid::Registered`]: the slice of the grid overlay leased to
/// this host. The same host keeps its slice across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayLease {
    /// The whole overlay (the controller's `overlay.cidr`), e.g.
    /// `"100.96.0.0/16"`: routed through the tunnel.
    pub cidr: String,
    /// This host's slice, e.g. `"100.96.3.0/24"`: its grid VMs take
    /// addresses from it.
    pub slice: String,
    /// The host's own address in the slice with the slice's prefix length
    /// (the first usable one, e.g. `"100.96.3.1/24"`): on the grid bridge,
    /// and the grid VMs' gateway.
    pub address: String,
}

/// In [`crate::grid::HeartbeatReply`]: the full peer list, sent when it
/// differs from the version the agent reported
/// ([`TunnelReport::peers_version`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OverlayPeers {
    /// Changes whenever the list does; the agent echoes it back.
    pub version: u64,
    /// Every other host with a tunnel and a slice (never the agent itself).
    pub peers: Vec<OverlayPeer>,
}

/// One other host of the overlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OverlayPeer {
    pub host: String,
    /// Base64 WireGuard public key.
    pub public_key: String,
    /// `ip:port`, when known.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// That host's slice (and anything else routed to it), CIDR strings.
    pub allowed_ips: Vec<String>,
}

/// In [`crate::grid::Heartbeat`]: the tunnel as the agent sees it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TunnelReport {
    /// The [`OverlayPeers::version`] the agent applied last (0: none yet).
    pub peers_version: u64,
    pub peers: Vec<TunnelPeerStatus>,
    /// Handshakes from keys not in the peer list, refused since start.
    #[serde(default)]
    pub rejected_handshakes: u64,
}

/// One peer's state, for `sparegrid hosts` and the metrics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TunnelPeerStatus {
    /// The peer's host name, when the agent knows it from the peer list.
    #[serde(default)]
    pub host: Option<String>,
    pub public_key: String,
    /// The endpoint in use now (`ip:port`; it follows a roaming peer).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Seconds since the last completed handshake; absent: never.
    #[serde(default)]
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The network a job's subtasks get (`network` in the job request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// No network (the default): grid VMs have no NIC, processes share
    /// nothing beyond what the runtime gives them.
    #[default]
    None,
    /// A NIC on the host's grid bridge with an address from the host's
    /// slice, routes to the other slices through the tunnel, and filtering
    /// so it reaches only overlay addresses.
    Overlay,
}

impl Network {
    pub fn as_str(&self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Overlay => "overlay",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names_and_default() {
        assert_eq!(Network::default(), Network::None);
        let v: Network = serde_json::from_str("\"overlay\"").unwrap();
        assert_eq!(v, Network::Overlay);
        assert_eq!(v.as_str(), "overlay");
        assert!(serde_json::from_str::<Network>("\"bridge\"").is_err());
    }

    #[test]
    fn tunnel_info_without_endpoint_decodes() {
        // Older or minimal senders leave `endpoint` out.
        let json = r#"{"public_key":"k","listen_port":51820}"#;
        let t: TunnelInfo = serde_json::from_str(json).unwrap();
        assert_eq!(t.endpoint, None);
        assert_eq!(t.listen_port, 51820);
    }

    #[test]
    fn msgpack_round_trip() {
        let p = OverlayPeers {
            version: 7,
            peers: vec![OverlayPeer {
                host: "b".into(),
                public_key: "k".into(),
                endpoint: Some("10.0.0.2:51820".into()),
                allowed_ips: vec!["100.96.1.0/24".into()],
            }],
        };
        let bytes = rmp_serde::to_vec_named(&p).unwrap();
        let back: OverlayPeers = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, p);
    }
}
