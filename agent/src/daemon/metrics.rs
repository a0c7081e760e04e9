//! Prometheus metrics of the agent, rendered as text on `GET /metrics`.
//! Every load figure, every grid VM state and every transition (with its
//! reason) is visible here, and with `[tunnel]` enabled the tunnel's
//! figures (per peer: endpoint, handshake age, bytes; rejected
//! handshakes and dropped packets), read live from the
//! [`TunnelService`] at each scrape ([`TunnelCollector`]).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sparegrid_proto::{LoadBreakdown, Transition, VmState};

use crate::overlay::HostNet;
use crate::tunnel::TunnelService;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabel {
    metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: String,
    to: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabel {
    direction: String,
    outcome: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The agent's metric registry and handles to every metric in it.
pub struct AgentMetrics {
    registry: Registry,
    load: Family<KindLabel, FloatGauge>,
    metric_normalised: Family<MetricLabel, FloatGauge>,
    metric_raw: Family<MetricLabel, FloatGauge>,
    metric_grid: Family<MetricLabel, FloatGauge>,
    dominant: Family<MetricLabel, Gauge>,
    mem_available: Gauge,
    vms: Family<StateLabel, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    runtime_errors: Family<OpLabel, Counter>,
    migrations: Family<MigrationLabel, Counter>,
    samples: Counter,
    sample_errors: Counter,
    tick_seconds: FloatGauge,
    draining: Gauge,
    tunnel: TunnelSource,
    host_net: HostNetSource,
    transfer: TransferSource,
}

type TunnelSource = Arc<RwLock<Option<Arc<TunnelService>>>>;
type HostNetSource = Arc<RwLock<Option<Arc<HostNet>>>>;
use sparegrid_transfer::metrics::{encode_one, TransferSource};

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("sparegrid");
        let m = AgentMetrics {
            registry: Registry::default(),
            load: Family::default(),
            metric_normalised: Family::default(),
            metric_raw: Family::default(),
            metric_grid: Family::default(),
            dominant: Family::default(),
            mem_available: Gauge::default(),
            vms: Family::default(),
            transitions: Family::default(),
            runtime_errors: Family::default(),
            migrations: Family::default(),
            samples: Counter::default(),
            sample_errors: Counter::default(),
            tick_seconds: FloatGauge::default(),
            draining: Gauge::default(),
            tunnel: TunnelSource::default(),
            host_net: HostNetSource::default(),
            transfer: TransferSource::default(),
        };
        registry.register(
            "load_factor",
            "Composite load factor, 0..1 (kind=instant|smoothed|peak)",
            m.load.clone(),
        );
        registry.register(
            "load_metric_normalised",
            "Customer load per metric, normalised to 0..1",
            m.metric_normalised.clone(),
        );
        registry.register(
            "load_metric_raw",
            "Customer load per metric in its own unit",
            m.metric_raw.clone(),
        );
        registry.register(
            "load_metric_grid",
            "The grid's own share subtracted from each metric, in its unit",
            m.metric_grid.clone(),
        );
        registry.register(
            "load_dominant",
            "1 for the metric that dominates the load factor",
            m.dominant.clone(),
        );
        registry.register(
            "memory_available_bytes",
            "MemAvailable, checked against the memory reserve",
            m.mem_available.clone(),
        );
        registry.register("grid_vms", "Grid VMs by state", m.vms.clone());
        registry.register(
            "transitions",
            "Grid VM state transitions by from, to and reason",
            m.transitions.clone(),
        );
        registry.register(
            "runtime_errors",
            "Runtime operations that failed, by operation",
            m.runtime_errors.clone(),
        );
        registry.register(
            "migrations",
            "Saved grid VMs moved between hosts, by direction (out, in) and outcome",
            m.migrations.clone(),
        );
        registry.register("samples", "Samples taken", m.samples.clone());
        registry.register(
            "sample_errors",
            "Samples that failed",
            m.sample_errors.clone(),
        );
        registry.register(
            "tick_seconds",
            "Duration of the last sample + evaluate step",
            m.tick_seconds.clone(),
        );
        registry.register("draining", "1 while the agent drains", m.draining.clone());
        registry.register_collector(Box::new(TunnelCollector(m.tunnel.clone())));
        registry.register_collector(Box::new(GridNetCollector(m.host_net.clone())));
        registry.register_collector(Box::new(sparegrid_transfer::metrics::TransferCollector(
            m.transfer.clone(),
        )));
        AgentMetrics { registry, ..m }
    }

    /// Renders `tunnel`'s figures from now on.
    pub fn set_tunnel(&self, tunnel: Arc<TunnelService>) {
        *self.tunnel.write().unwrap_or_else(|e| e.into_inner()) = Some(tunnel);
    }

    /// Renders the transfer endpoint's counters from now on.
    pub fn set_transfer(&self, transfer: crate::transfer::TransferState) {
        *self.transfer.write().unwrap_or_else(|e| e.into_inner()) = Some(transfer);
    }

    /// Renders the grid bridge's figures from now on.
    pub fn set_host_net(&self, host_net: Arc<HostNet>) {
        *self.host_net.write().unwrap_or_else(|e| e.into_inner()) = Some(host_net);
    }

    pub fn record_load(&self, b: &LoadBreakdown, tick_seconds: f64) {
        self.samples.inc();
        self.tick_seconds.set(tick_seconds);
        self.load.get_or_create(&kind("instant")).set(b.instant);
        self.load.get_or_create(&kind("smoothed")).set(b.smoothed);
        self.load.get_or_create(&kind("peak")).set(b.peak);
        self.mem_available.set(b.mem_available_bytes as i64);
        for r in &b.metrics {
            let l = MetricLabel {
                metric: r.metric.as_str().to_string(),
            };
            let (norm, raw, grid) = if r.available {
                (r.normalised, r.raw, r.grid)
            } else {
                (f64::NAN, f64::NAN, f64::NAN)
            };
            self.metric_normalised.get_or_create(&l).set(norm);
            self.metric_raw.get_or_create(&l).set(raw);
            self.metric_grid.get_or_create(&l).set(grid);
            self.dominant
                .get_or_create(&l)
                .set(i64::from(b.dominant == Some(r.metric)));
        }
    }

    pub fn record_sample_error(&self) {
        self.sample_errors.inc();
    }

    pub fn record_transition(&self, t: &Transition) {
        self.transitions
            .get_or_create(&TransitionLabels {
                from: t.from.as_str().into(),
                to: t.to.as_str().into(),
                reason: t.reason.as_str().into(),
            })
            .inc();
    }

    /// A saved grid VM's move: `direction` `out` (outcome `moved`, `kept`
    /// here, `lost`) or `in` (`restored`, `refused`, `failed`).
    pub fn record_migration(&self, direction: &str, outcome: &str) {
        self.migrations
            .get_or_create(&MigrationLabel {
                direction: direction.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn record_runtime_error(&self, op: &str) {
        self.runtime_errors
            .get_or_create(&OpLabel { op: op.into() })
            .inc();
    }

    pub fn record_vms(&self, states: impl Iterator<Item = VmState>, draining: bool) {
        let mut counts = [0i64; 6];
        for s in states {
            counts[s as usize] += 1;
        }
        for s in [
            VmState::Launching,
            VmState::Running,
            VmState::Suspended,
            VmState::Saved,
        ] {
            self.vms
                .get_or_create(&StateLabel {
                    state: s.as_str().into(),
                })
                .set(counts[s as usize]);
        }
        self.draining.set(i64::from(draining));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    /// The peer's host name from the controller's list ("" if unknown).
    host: String,
    public_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerInfoLabels {
    host: String,
    public_key: String,
    /// `ip:port` in use ("" until known).
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The tunnel's figures, read from the service at each scrape (nothing is
/// rendered without a tunnel). Families are built per scrape so peers that
/// left the list leave the output too.
#[derive(Debug)]
struct TunnelCollector(TunnelSource);

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(svc) = self.0.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let st = svc.status();
        let up = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        up.set(i64::from(st.up));
        encode_one(
            &mut encoder,
            "tunnel_up",
            "1 while the tunnel endpoint runs",
            &up,
        )?;
        let version = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        version.set(st.peers_version as i64);
        encode_one(
            &mut encoder,
            "tunnel_peers_version",
            "The controller's peer-list version applied (0: none)",
            &version,
        )?;
        let rejected = Counter::<u64>::default();
        rejected.inc_by(st.rejected_handshakes);
        encode_one(
            &mut encoder,
            "tunnel_rejected_handshakes",
            "Handshake initiations from keys not in the peer list",
            &rejected,
        )?;
        let dropped: Family<ReasonLabel, Counter> = Family::default();
        for (reason, n) in [
            ("unknown_index", st.unknown_index_packets),
            ("no_route", st.no_route_packets),
            ("bad_source", st.bad_source_packets),
            ("invalid", st.invalid_packets),
        ] {
            dropped
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc_by(n);
        }
        encode_one(
            &mut encoder,
            "tunnel_dropped_packets",
            "Tunnel input dropped, by reason",
            &dropped,
        )?;
        let info: Family<PeerInfoLabels, Gauge> = Family::default();
        let age: Family<PeerLabels, FloatGauge> = Family::default();
        let rx: Family<PeerLabels, Counter> = Family::default();
        let tx: Family<PeerLabels, Counter> = Family::default();
        for p in &st.peers {
            let l = PeerLabels {
                host: p.host.clone().unwrap_or_default(),
                public_key: p.public_key.clone(),
            };
            info.get_or_create(&PeerInfoLabels {
                host: l.host.clone(),
                public_key: l.public_key.clone(),
                endpoint: p.endpoint.clone().unwrap_or_default(),
            })
            .set(1);
            if let Some(s) = p.last_handshake_secs {
                age.get_or_create(&l).set(s as f64);
            }
            rx.get_or_create(&l).inc_by(p.rx_bytes);
            tx.get_or_create(&l).inc_by(p.tx_bytes);
        }
        encode_one(
            &mut encoder,
            "tunnel_peer_info",
            "1 per tunnel peer, with its current endpoint",
            &info,
        )?;
        encode_one(
            &mut encoder,
            "tunnel_peer_handshake_age_seconds",
            "Seconds since the peer's last completed handshake (absent: none)",
            &age,
        )?;
        encode_one(
            &mut encoder,
            "tunnel_peer_rx_bytes",
            "Plaintext bytes received from the peer through the tunnel",
            &rx,
        )?;
        encode_one(
            &mut encoder,
            "tunnel_peer_tx_bytes",
            "Plaintext bytes sent to the peer through the tunnel",
            &tx,
        )?;
        Ok(())
    }
}

/// The grid bridge's figures, read at each scrape (the drop counters come
/// from nft): guest addresses in use and the filtering's drops by rule.
struct GridNetCollector(HostNetSource);

impl std::fmt::Debug for GridNetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GridNetCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

impl Collector for GridNetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(h) = self.0.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let st = h.status();
        if st.slice.is_none() {
            return Ok(());
        }
        let guests = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        guests.set(st.guests as i64);
        encode_one(
            &mut encoder,
            "overlay_guests",
            "Grid guests (VMs, namespaces) holding an address of the slice",
            &guests,
        )?;
        let capacity = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        capacity.set(st.capacity as i64);
        encode_one(
            &mut encoder,
            "overlay_guest_capacity",
            "Guest addresses the slice holds",
            &capacity,
        )?;
        let packets: Family<RuleLabel, Counter> = Family::default();
        let bytes: Family<RuleLabel, Counter> = Family::default();
        for (rule, c) in &st.dropped {
            let l = RuleLabel { rule: rule.clone() };
            packets.get_or_create(&l).inc_by(c.packets);
            bytes.get_or_create(&l).inc_by(c.bytes);
        }
        encode_one(
            &mut encoder,
            "overlay_dropped_packets",
            "Packets the grid filtering dropped, by rule",
            &packets,
        )?;
        encode_one(
            &mut encoder,
            "overlay_dropped_bytes",
            "Bytes the grid filtering dropped, by rule",
            &bytes,
        )
    }
}

fn kind(k: &str) -> KindLabel {
    KindLabel { kind: k.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparegrid_proto::{Metric, MetricReading, Reason};

    #[test]
    fn renders_load_states_and_transitions() {
        let m = AgentMetrics::new();
        m.record_load(
            &LoadBreakdown {
                instant: 0.9,
                smoothed: 0.8,
                peak: 0.85,
                dominant: Some(Metric::Cpu),
                combine: "max".into(),
                metrics: vec![MetricReading {
                    metric: Metric::Cpu,
                    raw: 0.9,
                    grid: 0.25,
                    normalised: 0.9,
                    weight: 1.0,
                    available: true,
                }],
                mem_available_bytes: 42,
            },
            0.00002,
        );
        m.record_transition(&Transition {
            vm: "sg-1".into(),
            from: VmState::Running,
            to: VmState::Suspended,
            reason: Reason::CpuPressure,
            at_unix_ms: 0,
            load: 0.8,
        });
        m.record_vms([VmState::Suspended, VmState::Saved].into_iter(), false);
        let text = m.render();
        for needle in [
            "sparegrid_load_factor{kind=\"smoothed\"} 0.8",
            "sparegrid_load_metric_normalised{metric=\"cpu\"} 0.9",
            "sparegrid_load_metric_grid{metric=\"cpu\"} 0.25",
            "sparegrid_load_dominant{metric=\"cpu\"} 1",
            "sparegrid_memory_available_bytes 42",
            "sparegrid_grid_vms{state=\"suspended\"} 1",
            "sparegrid_grid_vms{state=\"running\"} 0",
            "sparegrid_grid_vms{state=\"saved\"} 1",
            "sparegrid_transitions_total{from=\"running\",to=\"suspended\",reason=\"cpu_pressure\"} 1",
            "sparegrid_samples_total 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(
            !text.contains("tunnel"),
            "no tunnel, no tunnel figures:\n{text}"
        );
    }

    #[test]
    fn renders_the_tunnel_once_set() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Arc::new(
            TunnelService::new(
                &crate::tunnel::AgentTunnelSection {
                    enabled: true,
                    ..Default::default()
                },
                dir.path(),
            )
            .unwrap(),
        );
        let m = AgentMetrics::new();
        m.set_tunnel(svc);
        let text = m.render();
        for needle in [
            "sparegrid_tunnel_up 0",
            "sparegrid_tunnel_peers_version 0",
            "sparegrid_tunnel_rejected_handshakes_total 0",
            "sparegrid_tunnel_dropped_packets_total{reason=\"no_route\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn renders_the_grid_bridge_once_leased() {
        use crate::overlay::{OverlaySection, Recorder};
        let rec = Arc::new(Recorder::default());
        let net = Arc::new(HostNet::with_ops(&OverlaySection::default(), rec.clone()).unwrap());
        let m = AgentMetrics::new();
        m.set_host_net(net.clone());
        assert!(
            !m.render().contains("overlay_"),
            "no lease yet, no bridge figures"
        );
        net.apply_lease(&sparegrid_proto::overlay::OverlayLease {
            cidr: "100.96.0.0/16".into(),
            slice: "100.96.3.0/24".into(),
            address: "100.96.3.1/24".into(),
        })
        .unwrap();
        rec.answer(
            "nft -j list counters",
            r#"{"nftables":[{"counter":{"family":"inet","name":"grid_to_host","table":"sparegrid","packets":4,"bytes":240}}]}"#,
        );
        let _guest = net.attach_vm().unwrap();
        let text = m.render();
        for needle in [
            "sparegrid_overlay_guests 1",
            "sparegrid_overlay_guest_capacity 253",
            "sparegrid_overlay_dropped_packets_total{rule=\"grid_to_host\"} 4",
            "sparegrid_overlay_dropped_bytes_total{rule=\"grid_to_host\"} 240",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn renders_the_transfer_counters_once_set() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::transfer::TransferState::new(
            &crate::transfer::TransferConfig::default(),
            dir.path(),
            b"key",
        )
        .unwrap();
        let m = AgentMetrics::new();
        assert!(!m.render().contains("transfer_"));
        m.set_transfer(state);
        let text = m.render();
        for needle in [
            "sparegrid_transfer_received_bytes_total 0",
            "sparegrid_transfer_sent_bytes_total 0",
            "sparegrid_transfer_published_total 0",
            "# TYPE sparegrid_transfer_requests counter",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
