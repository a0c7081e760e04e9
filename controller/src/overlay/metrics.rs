//! The overlay's Prometheus metrics, read from [`Overlay`] at each scrape
//! (a [`Collector`], registered with the API's registry, so every name
//! gets the `sparegrid_` prefix):
//!
//! - `overlay_slices_in_use`, `overlay_slices_capacity`: slices held
//!   (lost hosts' too, until released) and slices the pool can hand out
//!   (0 with the overlay off);
//! - `overlay_listed_hosts`: hosts in the peer list;
//! - `overlay_pool_exhausted_total`: registrations that found no free slice;
//! - per host and peer (`host`, `peer`: the peer's host, or its key when
//!   unknown), from the host's last tunnel report:
//!   `overlay_peer_rx_bytes_total`, `overlay_peer_tx_bytes_total`
//!   (plaintext bytes, since the agent's tunnel started) and
//!   `overlay_peer_last_handshake_seconds` (seconds since the last
//!   handshake, aged by the report's age; absent before the first);
//! - `overlay_rejected_handshakes_total{host}`: handshakes from keys not in
//!   the host's peer list.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::Overlay;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    host: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

/// Reads the shared [`Overlay`] at each scrape.
#[derive(Debug)]
pub struct OverlayCollector(pub Arc<Mutex<Overlay>>);

/// One peer's figures.
struct PeerRow {
    labels: PeerLabels,
    rx: u64,
    tx: u64,
    handshake: Option<u64>,
}

impl Collector for OverlayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Copy what is needed, then encode without the lock.
        let now = Instant::now();
        let (in_use, capacity, listed, exhausted, rows, rejected) = {
            let o = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let mut rows = Vec::new();
            let mut rejected = Vec::new();
            for (host, r) in &o.reports {
                let age = now.saturating_duration_since(r.at).as_secs();
                rejected.push((host.clone(), r.report.rejected_handshakes));
                for p in &r.report.peers {
                    let peer = p
                        .host
                        .clone()
                        .or_else(|| o.host_of_key(&p.public_key).map(str::to_owned))
                        .unwrap_or_else(|| p.public_key.clone());
                    rows.push(PeerRow {
                        labels: PeerLabels {
                            host: host.clone(),
                            peer,
                        },
                        rx: p.rx_bytes,
                        tx: p.tx_bytes,
                        handshake: p.last_handshake_secs.map(|s| s.saturating_add(age)),
                    });
                }
            }
            (
                o.peers.len() as i64,
                o.pool()
                    .map_or(0, |p| i64::try_from(p.capacity()).unwrap_or(i64::MAX)),
                o.peers.listed().len() as i64,
                o.exhausted,
                rows,
                rejected,
            )
        };
        for (name, help, v) in [
            (
                "overlay_slices_in_use",
                "Overlay slices held by hosts (lost hosts' until released)",
                in_use,
            ),
            (
                "overlay_slices_capacity",
                "Overlay slices the pool can hand out",
                capacity,
            ),
            (
                "overlay_listed_hosts",
                "Hosts in the overlay peer list",
                listed,
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let c = ConstCounter::new(exhausted);
        c.encode(encoder.encode_descriptor(
            "overlay_pool_exhausted",
            "Tunnel registrations that found no free overlay slice",
            None,
            c.metric_type(),
        )?)?;
        {
            let mut e = encoder.encode_descriptor(
                "overlay_peer_rx_bytes",
                "Plaintext bytes a host's tunnel received from a peer (since the tunnel started)",
                None,
                MetricType::Counter,
            )?;
            for r in &rows {
                ConstCounter::new(r.rx).encode(e.encode_family(&r.labels)?)?;
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "overlay_peer_tx_bytes",
                "Plaintext bytes a host's tunnel sent to a peer (since the tunnel started)",
                None,
                MetricType::Counter,
            )?;
            for r in &rows {
                ConstCounter::new(r.tx).encode(e.encode_family(&r.labels)?)?;
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "overlay_peer_last_handshake_seconds",
                "Seconds since a host's tunnel last completed a handshake with a peer",
                None,
                MetricType::Gauge,
            )?;
            for r in &rows {
                if let Some(s) = r.handshake {
                    ConstGauge::new(i64::try_from(s).unwrap_or(i64::MAX))
                        .encode(e.encode_family(&r.labels)?)?;
                }
            }
        }
        let mut e = encoder.encode_descriptor(
            "overlay_rejected_handshakes",
            "Handshakes a host's tunnel refused from keys not in its peer list",
            None,
            MetricType::Counter,
        )?;
        for (host, n) in &rejected {
            ConstCounter::new(*n).encode(e.encode_family(&HostLabel { host: host.clone() })?)?;
        }
        Ok(())
    }
}
