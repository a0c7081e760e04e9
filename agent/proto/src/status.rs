//! `GET /v1/status` body: what the agent sees and what it decided.

use serde::{Deserialize, Serialize};

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metric, MetricReading, Reason};

    fn sample() -> AgentStatus {
        AgentStatus {
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
    }

    #[test]
    fn metric_names_match_serde_names() {
        for m in Metric::ALL {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
        }
    }
}
