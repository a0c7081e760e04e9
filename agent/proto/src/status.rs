//! `GET /v1/status` body: what the agent sees and what it decided.

use serde::{Deserialize, Serialize};

use crate::overlay::{OverlayLease, TunnelPeerStatus};
use crate::{LoadBreakdown, Transition, VmState};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridVmStatus {
    pub name: String,
    pub state: VmState,
    /// Milliseconds spent in the current state.
    pub in_state_ms: u64,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Cumulative CPU time the runtime reports for it, in nanoseconds.
    pub cpu_time_ns: u64,
    /// The guest channel's state (`connecting`, `ready`, `busy`, …), for
    /// VMs whose subtasks run over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// The subtask attempt it runs (`job/index#epoch`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtask: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub host: String,
    /// `libvirt` or `process`.
    pub runtime: String,
    pub draining: bool,
    pub load: Option<LoadBreakdown>,
    pub vms: Vec<GridVmStatus>,
    /// The most recent transitions, oldest first.
    pub transitions: Vec<Transition>,
    /// The WireGuard tunnel endpoint, when `[tunnel]` is enabled (absent
    /// otherwise and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelStatus>,
    /// The grid bridge and its filtering, when `[tunnel]` is enabled
    /// (absent otherwise and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_net: Option<GridNetStatus>,
}

/// The host's grid bridge for its overlay slice, as `GET /v1/status` shows
/// it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GridNetStatus {
    /// The bridge's name (`overlay.bridge`).
    pub bridge: String,
    /// The slice applied to it, once a lease arrived.
    pub slice: Option<String>,
    /// The host's address on the bridge (`address/prefix`).
    pub address: Option<String>,
    /// Guest addresses in use, and how many the slice holds.
    pub guests: usize,
    pub capacity: usize,
    /// What the filtering dropped, by rule (`grid_to_host`,
    /// `grid_to_outside`, …); empty when the counters could not be read.
    pub dropped: std::collections::BTreeMap<String, DropCount>,
}

/// Packets and bytes one drop rule counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DropCount {
    pub packets: u64,
    pub bytes: u64,
}

/// The agent's tunnel endpoint as `GET /v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TunnelStatus {
    /// The host's WireGuard public key, base64.
    pub public_key: String,
    pub listen_port: u16,
    /// The TUN device's name.
    pub interface: String,
    /// The device and socket are up (a lease arrived and the start worked).
    pub up: bool,
    /// The TUN device's address (`host address/overlay prefix`).
    pub address: Option<String>,
    /// The slice the controller leased this host.
    pub lease: Option<OverlayLease>,
    /// The controller's peer-list version applied to the running tunnel
    /// (0: none yet).
    pub peers_version: u64,
    pub peers: Vec<TunnelPeerStatus>,
    /// Handshake initiations from keys not in the peer list.
    pub rejected_handshakes: u64,
    /// Packets with a receiver index that is no session of ours.
    pub unknown_index_packets: u64,
    /// Packets into the device for an address no peer holds.
    pub no_route_packets: u64,
    /// Decrypted packets whose inner source is not the sender's.
    pub bad_source_packets: u64,
    /// Datagrams that failed to parse, authenticate or decrypt.
    pub invalid_packets: u64,
    /// Why the tunnel is not up or the last peer list was refused.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metric, MetricReading, Reason};

    fn sample() -> AgentStatus {
        AgentStatus {
            grid_net: None,
            version: "0.1.0".into(),
            host: "h1".into(),
            runtime: "process".into(),
            draining: false,
            load: Some(LoadBreakdown {
                instant: 0.5,
                smoothed: 0.6,
                peak: 0.7,
                dominant: Some(Metric::Cpu),
                combine: "max".into(),
                metrics: vec![MetricReading {
                    metric: Metric::Cpu,
                    raw: 0.5,
                    grid: 0.1,
                    normalised: 0.5,
                    weight: 1.0,
                    available: true,
                }],
                mem_available_bytes: 1 << 30,
            }),
            vms: vec![GridVmStatus {
                name: "sg-1".into(),
                guest: Some("busy".into()),
                subtask: Some("j/1#1".into()),
                state: VmState::Suspended,
                in_state_ms: 10,
                vcpus: 1,
                memory_mib: 128,
                cpu_time_ns: 5,
            }],
            transitions: vec![Transition {
                vm: "sg-1".into(),
                from: VmState::Running,
                to: VmState::Suspended,
                reason: Reason::CpuPressure,
                at_unix_ms: 1,
                load: 0.9,
            }],
            tunnel: Some(TunnelStatus {
                public_key: "k".into(),
                listen_port: 51820,
                up: true,
                peers_version: 3,
                peers: vec![TunnelPeerStatus {
                    host: Some("h2".into()),
                    public_key: "k2".into(),
                    endpoint: Some("10.0.0.2:51820".into()),
                    last_handshake_secs: Some(4),
                    rx_bytes: 1,
                    tx_bytes: 2,
                }],
                rejected_handshakes: 1,
                ..TunnelStatus::default()
            }),
        }
    }

    #[test]
    fn status_round_trips_through_json_and_msgpack() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"cpu_pressure\""), "{json}");
        assert!(json.contains("\"suspended\""), "{json}");
        assert_eq!(serde_json::from_str::<AgentStatus>(&json).unwrap(), s);
        let mp = rmp_serde::to_vec_named(&s).unwrap();
        assert_eq!(rmp_serde::from_slice::<AgentStatus>(&mp).unwrap(), s);
        // Without a tunnel the field is left out, and older bodies decode.
        let bare = AgentStatus { tunnel: None, ..s };
        let json = serde_json::to_string(&bare).unwrap();
        assert!(!json.contains("tunnel"), "{json}");
        assert_eq!(serde_json::from_str::<AgentStatus>(&json).unwrap(), bare);
    }

    #[test]
    fn metric_names_match_serde_names() {
        for m in Metric::ALL {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
        }
    }
}
