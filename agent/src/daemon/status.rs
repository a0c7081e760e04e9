//! The status board: what `GET /v1/status` returns, plus the ring of recent
//! transitions. Written by the control loop once per tick, read by HTTP.
//! The tunnel's part (`tunnel`) is read live from the
//! [`TunnelService`] at each read, and the grid bridge's (`grid_net`) from
//! the [`HostNet`], not published by the control loop.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use sparegrid_proto::{AgentStatus, DropCount, GridNetStatus, Transition};

use super::metrics::AgentMetrics;
use crate::overlay::{HostNet, OverlayStatus};
use crate::tunnel::TunnelService;

/// State shared between the control loop and the HTTP server.
pub struct Shared {
    status: RwLock<AgentStatus>,
    pub metrics: AgentMetrics,
    tunnel: RwLock<Option<Arc<TunnelService>>>,
    host_net: RwLock<Option<Arc<HostNet>>>,
}

impl Shared {
    pub fn new(initial: AgentStatus) -> Shared {
        Shared {
            status: RwLock::new(initial),
            metrics: AgentMetrics::new(),
            tunnel: RwLock::new(None),
            host_net: RwLock::new(None),
        }
    }

    /// Shows the grid bridge and its drop counters in the status and the
    /// metrics from now on.
    pub fn set_host_net(&self, host_net: Arc<HostNet>) {
        self.metrics.set_host_net(host_net.clone());
        *self.host_net.write().unwrap_or_else(|e| e.into_inner()) = Some(host_net);
    }

    /// Shows `tunnel` in the status and the metrics from now on.
    pub fn set_tunnel(&self, tunnel: Arc<TunnelService>) {
        self.metrics.set_tunnel(tunnel.clone());
        *self.tunnel.write().unwrap_or_else(|e| e.into_inner()) = Some(tunnel);
    }

    pub fn status(&self) -> AgentStatus {
        let mut s = self
            .status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let tunnel = self
            .tunnel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.tunnel = tunnel.map(|t| t.status());
        let host_net = self
            .host_net
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.grid_net = host_net.map(|h| grid_net_status(h.status()));
        s
    }

    pub fn publish(&self, status: AgentStatus) {
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;
    }
}

/// The wire form of the bridge's status.
pub fn grid_net_status(o: OverlayStatus) -> GridNetStatus {
    GridNetStatus {
        bridge: o.bridge,
        slice: o.slice,
        address: o.address,
        guests: o.guests,
        capacity: o.capacity,
        dropped: o
            .dropped
            .into_iter()
            .map(|(rule, c)| {
                (
                    rule,
                    DropCount {
                        packets: c.packets,
                        bytes: c.bytes,
                    },
                )
            })
            .collect(),
    }
}

/// The last `capacity` transitions, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    capacity: usize,
    items: VecDeque<Transition>,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            capacity: capacity.max(1),
            items: VecDeque::with_capacity(capacity.max(1)),
        }
    }

    pub fn push(&mut self, t: Transition) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(t);
    }

    pub fn resize(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.items.len() > self.capacity {
            self.items.pop_front();
        }
    }

    pub fn to_vec(&self) -> Vec<Transition> {
        self.items.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::{Reason, VmState};

    fn t(n: u64) -> Transition {
        Transition {
            vm: format!("sg-{n}"),
            from: VmState::Running,
            to: VmState::Suspended,
            reason: Reason::CpuPressure,
            at_unix_ms: n,
            load: 0.9,
        }
    }

    #[test]
    fn history_keeps_the_last_n_oldest_first() {
        let mut h = History::new(3);
        for n in 0..5 {
            h.push(t(n));
        }
        let v: Vec<u64> = h.to_vec().iter().map(|t| t.at_unix_ms).collect();
        assert_eq!(v, vec![2, 3, 4]);
        h.resize(1);
        assert_eq!(h.to_vec()[0].at_unix_ms, 4);
    }
}
