//! The endpoint's counters as Prometheus metrics, for whichever daemon
//! hosts it (each agent's transfer endpoint, the controller's `/v1/data`):
//! [`TransferCollector`] reads [`crate::TransferState::counters`] at every
//! scrape and writes `transfer_requests{op,status}`,
//! `transfer_received_bytes`, `transfer_discarded_bytes`,
//! `transfer_sent_bytes` and `transfer_published` (counters, so `_total`
//! in OpenMetrics text) under the registry's prefix.

use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::TransferState;

/// Where the collector finds the endpoint: set once it is open, `None`
/// (no metrics) while it is off.
pub type TransferSource = Arc<RwLock<Option<TransferState>>>;

/// Reads the endpoint's counters at each scrape.
pub struct TransferCollector(pub TransferSource);

impl std::fmt::Debug for TransferCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransferCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    op: String,
    status: u16,
}

/// Writes one metric under `name` with its help text (for collectors
/// that build their metrics at scrape time; the agent's use it too).
pub fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(e)
}

impl Collector for TransferCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(t) = self.0.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let c = t.counters();
        let answers: Family<AnswerLabels, Counter> = Family::default();
        for ((op, status), n) in &c.requests {
            answers
                .get_or_create(&AnswerLabels {
                    op: (*op).to_owned(),
                    status: *status,
                })
                .inc_by(*n);
        }
        encode_one(
            &mut encoder,
            "transfer_requests",
            "Transfer endpoint answers by operation (create, upload, download, head, delete, options) and HTTP status",
            &answers,
        )?;
        for (name, help, v) in [
            (
                "transfer_received_bytes",
                "Upload bytes written (some later cut back: discarded)",
                c.received_bytes,
            ),
            (
                "transfer_discarded_bytes",
                "Upload bytes cut back to the last durable checkpoint (broken connections, bad checksums, full disk)",
                c.discarded_bytes,
            ),
            (
                "transfer_sent_bytes",
                "Download body bytes handed to connections",
                c.sent_bytes,
            ),
            (
                "transfer_published",
                "Uploads verified against their whole digest and published",
                c.published,
            ),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(v);
            encode_one(&mut encoder, name, help, &counter)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn nothing_is_written_until_the_endpoint_is_open() {
        let source = TransferSource::default();
        let mut r = Registry::with_prefix("sparegrid");
        r.register_collector(Box::new(TransferCollector(source)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(!out.contains("transfer_"), "{out}");
    }
}
