//! Agent ↔ controller messages (HTTP bodies in MessagePack): registration,
//! heartbeats with the load factor and running subtasks, subtask batches
//! pushed to an agent, stops pushed to an agent, completion reports, and
//! releases (attempts an agent hands back unfinished when it drains), and
//! pull mode's leases ([`LeaseRequest`], [`LeaseGrant`], [`LeaseRenew`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::overlay::{Network, OverlayLease, OverlayPeers, TunnelInfo, TunnelReport};
use crate::{Metric, VmState};

/// Identifies one attempt at one subtask. `epoch` is the attempt number the
/// controller handed out; a report with another epoch is stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    pub job: String,
    pub index: u64,
    pub epoch: u32,
}

/// `POST /v1/agents/register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    pub host: String,
    pub version: String,
    /// Where the controller reaches this agent (`http://addr:port`), if it can.
    pub agent_url: Option<String>,
    /// Subtasks this agent can run at once.
    pub slots: u32,
    /// Whether it takes part in peer-to-peer jobs: serves the peer routes
    /// (`/v1/peer/*`) at `agent_url` and takes seeds. Absent (false) from
    /// older agents.
    #[serde(default)]
    pub p2p: bool,
    /// The agent's WireGuard tunnel endpoint, when `[tunnel]` is enabled:
    /// the controller leases it a slice of the overlay and lists it to the
    /// other hosts. Absent from agents without a tunnel and older agents.
    #[serde(default)]
    pub tunnel: Option<TunnelInfo>,
    /// Its transfer endpoint (`http://addr:port`), when `[transfer]` is
    /// enabled. Absent from older agents.
    #[serde(default)]
    pub transfer_url: Option<String>,
    /// Whether it takes saved grid VMs from other hosts
    /// (`reclaim_mode = "migrate"`): a runtime that can restore saved state
    /// and a transfer endpoint. Absent (false) from older agents.
    #[serde(default)]
    pub migrate_in: bool,
    /// The grid VM images it serves on its transfer endpoint, by manifest
    /// sha256 ([`crate::images`]). Absent (empty) from older agents.
    #[serde(default)]
    pub images: Vec<String>,
}

/// The controller's answer to [`Register`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub host: String,
    /// How often the agent should heartbeat.
    pub heartbeat_ms: u64,
    /// The overlay slice leased to this host, when it registered a tunnel
    /// and the controller has an overlay configured.
    #[serde(default)]
    pub overlay: Option<OverlayLease>,
}

/// `POST /v1/agents/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub host: String,
    /// Smoothed composite load factor, 0..1.
    pub load: f64,
    pub dominant: Option<Metric>,
    /// Normalised value per available metric.
    pub breakdown: BTreeMap<Metric, f64>,
    pub free_slots: u32,
    pub running: Vec<AttemptRef>,
    /// Grid VMs by state.
    pub vms: BTreeMap<VmState, u32>,
    /// How long the longest-suspended grid VM has been suspended, ms.
    pub suspended_ms: u64,
    /// Pull mode: the leases to renew (every lease the agent still works
    /// on), the same as a [`LeaseRenew`] sent on its own. Absent (empty)
    /// from agents that do not pull, and from older agents.
    #[serde(default)]
    pub renew: Vec<AttemptRef>,
    /// Peer-to-peer: subtasks moved by work stealing, per job, counted by
    /// this agent since its queue was created (absolute, so a lost
    /// heartbeat loses nothing). Only jobs whose counts changed since the
    /// last heartbeat the controller answered. Absent (empty) from agents
    /// that do not steal, and from older agents.
    #[serde(default)]
    pub steals: Vec<JobSteals>,
    /// The tunnel's per-peer state and the peer-list version applied, from
    /// agents with a tunnel. Absent otherwise and from older agents.
    #[serde(default)]
    pub tunnel: Option<TunnelReport>,
}

/// One job's work-stealing counts on one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSteals {
    pub job: String,
    /// Subtasks this agent took from peers.
    pub stolen_in: u64,
    /// Subtasks peers took from this agent.
    pub given_out: u64,
}

/// `POST /v1/peer/peers` on a p2p agent (the controller, agent token): the
/// other p2p agents, pushed when a p2p job starts so that idle agents need
/// not wait for their next heartbeat reply to start stealing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerList {
    pub peers: Vec<PeerAddr>,
}

/// Another agent that takes part in peer-to-peer jobs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerAddr {
    pub host: String,
    /// Where its peer routes are (`http://addr:port`).
    pub url: String,
}

/// The controller's answer to a [`Heartbeat`]: attempts the agent must stop
/// (its host left the eligible set; they are dispatched elsewhere).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub withdraw: Vec<AttemptRef>,
    /// Pull mode: the leases of [`Heartbeat::renew`] that were not renewed
    /// (expired, revived, cancelled or done); stop them. Absent (empty)
    /// from older controllers.
    #[serde(default)]
    pub lost: Vec<AttemptRef>,
    /// Peer-to-peer: the other active agents that take part (for an agent
    /// that registered with `p2p`; empty otherwise and from older
    /// controllers).
    #[serde(default)]
    pub peers: Vec<PeerAddr>,
    /// The overlay's peer list, when it differs from the version in
    /// [`Heartbeat::tunnel`] (absent: no change, or no tunnel).
    #[serde(default)]
    pub overlay_peers: Option<OverlayPeers>,
}

/// One subtask pushed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub attempt: AttemptRef,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    #[serde(with = "bytes_as_bin")]
    pub stdin: Vec<u8>,
    pub timeout_ms: u64,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The job's network (`none` when absent, as from older controllers).
    #[serde(default)]
    pub network: Network,
}

/// `POST /v1/subtasks` on the agent: a batch of assignments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignBatch {
    pub assignments: Vec<Assignment>,
}

/// `POST /v1/subtasks/stop` on the agent: attempts to kill at once (their
/// job was cancelled, or they were dispatched elsewhere). The agent does not
/// report them; a late report would be stale anyway.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StopBatch {
    pub attempts: Vec<AttemptRef>,
}

/// `POST /v1/agents/release`: attempts the agent hands back unfinished
/// (it drains or shuts down). The controller puts each one that is still
/// its current attempt on this host back in the queue; a release is not a
/// failure and does not count against `max_attempts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub host: String,
    pub attempts: Vec<AttemptRef>,
    /// Why (for the attempt records and logs), e.g. "agent draining".
    pub reason: String,
}

/// The controller's answer to [`Release`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Released {
    /// Attempts put back in the queue; the others were no longer current
    /// (already withdrawn, cancelled or done) and changed nothing.
    pub requeued: u32,
}

/// `POST /v1/leases` (pull mode): ask for up to `max` subtasks of pull
/// jobs. A long poll: when nothing is queued the controller holds the
/// request up to `wait_ms` (capped by its `dispatch.lease_wait_max`) and
/// answers as soon as work is queued, or with an empty grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub host: String,
    pub max: u32,
    pub wait_ms: u64,
}

/// One leased subtask: run it like a pushed [`Assignment`], renew the lease
/// before `ttl_ms` has passed ([`LeaseRenew`]), and complete it with its
/// epoch (`POST /v1/subtasks/{job}/{index}/complete`). The TTL is relative
/// so that the two clocks need not agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub assignment: Assignment,
    pub ttl_ms: u64,
}

/// The controller's answer to [`LeaseRequest`]; empty when the wait ran out.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub leases: Vec<Lease>,
}

/// `POST /v1/leases/renew`: every lease the agent still works on, in one
/// batch (sent with each heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRenew {
    pub host: String,
    pub leases: Vec<AttemptRef>,
}

/// The controller's answer to [`LeaseRenew`]: `lost` are the leases that
/// were not renewed (expired, revived for another host, cancelled or
/// done); the agent stops them, a late completion would be stale.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LeaseRenewed {
    pub ttl_ms: u64,
    pub renewed: u32,
    pub lost: Vec<AttemptRef>,
}

/// The answer to `POST /v1/subtasks/{job}/{index}/complete` when the report
/// counted or repeated the accepted one (a stale epoch is a 409 error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteReply {
    /// `"accepted"` or `"duplicate"`.
    pub result: String,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub attempt: AttemptRef,
    pub host: String,
    /// Exit code when the command exited.
    pub exit_code: Option<i32>,
    /// Signal number when it was killed.
    pub signal: Option<i32>,
    /// Why it could not run or finish (timeout, spawn failure, withdrawn), if so.
    pub error: Option<String>,
    #[serde(with = "bytes_as_bin")]
    pub stdout: Vec<u8>,
    #[serde(with = "bytes_as_bin")]
    pub stderr: Vec<u8>,
    /// Sizes before capping.
    pub stdout_size: u64,
    pub stderr_size: u64,
    pub duration_ms: u64,
    /// Stdout was too large to send inline: it is the complete upload of
    /// this size and digest on the controller's `/v1/data` (granted by
    /// `POST /v1/agents/outputs`), and `stdout` is empty. Absent (none)
    /// from older agents.
    #[serde(default)]
    pub stdout_data: Option<OutputData>,
}

/// Stdout uploaded to the controller's `/v1/data` ([`Completion::stdout_data`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputData {
    /// The transfer id: [`output_data_id`] of the attempt.
    pub id: String,
    /// Bytes uploaded: all of stdout, or the first `max_output_bytes`.
    pub size: u64,
    /// Their blake3, hex.
    pub blake3: String,
}

/// The id of the output file of one attempt on the controller's
/// `/v1/data` (`out-<job>-<index>-<epoch>`): captured inline outputs and
/// uploaded ones share it.
pub fn output_data_id(a: &AttemptRef) -> String {
    format!("out-{}-{}-{}", a.job, a.index, a.epoch)
}

/// `POST /v1/agents/outputs`: room on the controller's `/v1/data` for the
/// stdout of `attempt`, which this host holds, `size` bytes with digest
/// `blake3` (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRequest {
    pub host: String,
    pub attempt: AttemptRef,
    pub size: u64,
    pub blake3: String,
}

/// The answer to [`OutputRequest`]: upload with tus to
/// `<controller><transfer_path>/v1/files/<id>` with `token` (an `up`
/// token for this id only), then report [`OutputData`] in the completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputGrant {
    pub id: String,
    /// The transfer base on the controller (`/v1/data`).
    pub transfer_path: String,
    pub token: String,
    /// The controller's checkpoint size (the client journal uses the same).
    pub checkpoint_bytes: u64,
    /// The upload is already complete with this size and digest.
    #[serde(default)]
    pub complete: bool,
}

impl Completion {
    /// Success means exit code 0 and no error.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none() && self.signal.is_none()
    }
}

/// Byte buffers as MessagePack `bin` (not an array of integers).
mod bytes_as_bin {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion() -> Completion {
        Completion {
            stdout_data: None,
            attempt: AttemptRef {
                job: "j-1".into(),
                index: 7,
                epoch: 2,
            },
            host: "h1".into(),
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout: b"out\n\xff".to_vec(),
            stderr: Vec::new(),
            stdout_size: 5,
            stderr_size: 0,
            duration_ms: 12,
        }
    }

    #[test]
    fn completion_round_trips_and_keeps_bytes_as_bin() {
        let c = completion();
        let mp = rmp_serde::to_vec_named(&c).unwrap();
        // 0xc4 = bin 8: stdout travels as bytes, not an integer array.
        assert!(mp.windows(2).any(|w| w == [0xc4, 5]), "{mp:x?}");
        assert_eq!(rmp_serde::from_slice::<Completion>(&mp).unwrap(), c);
        assert!(c.succeeded());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Completion>(&json).unwrap(), c);
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = Heartbeat {
            tunnel: None,
            steals: Vec::new(),
            host: "h1".into(),
            load: 0.4,
            dominant: Some(Metric::Cpu),
            breakdown: [(Metric::Cpu, 0.4), (Metric::Memory, 0.1)].into(),
            free_slots: 2,
            running: vec![completion().attempt],
            vms: [(VmState::Running, 1)].into(),
            suspended_ms: 0,
            renew: Vec::new(),
        };
        let mp = rmp_serde::to_vec_named(&hb).unwrap();
        assert_eq!(rmp_serde::from_slice::<Heartbeat>(&mp).unwrap(), hb);
    }

    #[test]
    fn lease_messages_round_trip_as_named_maps() {
        let grant = LeaseGrant {
            leases: vec![Lease {
                assignment: Assignment {
                    network: crate::overlay::Network::None,
                    attempt: completion().attempt,
                    argv: vec!["echo".into()],
                    env: BTreeMap::new(),
                    stdin: b"in".to_vec(),
                    timeout_ms: 1000,
                    vcpus: 1,
                    memory_mib: 64,
                },
                ttl_ms: 30_000,
            }],
        };
        let mp = rmp_serde::to_vec_named(&grant).unwrap();
        assert_eq!(rmp_serde::from_slice::<LeaseGrant>(&mp).unwrap(), grant);
        let req = LeaseRequest {
            host: "h1".into(),
            max: 4,
            wait_ms: 500,
        };
        let mp = rmp_serde::to_vec_named(&req).unwrap();
        assert_eq!(rmp_serde::from_slice::<LeaseRequest>(&mp).unwrap(), req);
        let renewed = LeaseRenewed {
            ttl_ms: 1,
            renewed: 0,
            lost: vec![completion().attempt],
        };
        let mp = rmp_serde::to_vec_named(&renewed).unwrap();
        assert_eq!(rmp_serde::from_slice::<LeaseRenewed>(&mp).unwrap(), renewed);
    }

    #[test]
    fn heartbeat_without_renew_still_decodes() {
        // A heartbeat from an agent that predates pull mode: no `renew`.
        #[derive(Serialize)]
        struct Old {
            host: String,
            load: f64,
            dominant: Option<Metric>,
            breakdown: BTreeMap<Metric, f64>,
            free_slots: u32,
            running: Vec<AttemptRef>,
            vms: BTreeMap<VmState, u32>,
            suspended_ms: u64,
        }
        let old = Old {
            host: "h1".into(),
            load: 0.2,
            dominant: None,
            breakdown: BTreeMap::new(),
            free_slots: 1,
            running: vec![completion().attempt],
            vms: BTreeMap::new(),
            suspended_ms: 3,
        };
        let hb: Heartbeat = rmp_serde::from_slice(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        assert!(hb.renew.is_empty());
        assert_eq!((hb.host.as_str(), hb.suspended_ms), ("h1", 3));
        // And a reply without `lost`.
        #[derive(Serialize)]
        struct OldReply {
            withdraw: Vec<AttemptRef>,
        }
        let reply: HeartbeatReply = rmp_serde::from_slice(
            &rmp_serde::to_vec_named(&OldReply {
                withdraw: vec![completion().attempt],
            })
            .unwrap(),
        )
        .unwrap();
        assert!(reply.lost.is_empty());
        assert_eq!(reply.withdraw.len(), 1);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\xc1",
            b"\x92\x01",
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(rmp_serde::from_slice::<Completion>(bytes).is_err());
        }
    }
}
