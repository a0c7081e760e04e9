//! The controller's Prometheus metrics (`GET /metrics`, OpenMetrics text):
//!
//! - `sparegrid_jobs{state}`: jobs by state, read from the store at scrape;
//! - `sparegrid_subtasks{state}`: subtasks of all jobs by state, likewise;
//! - `sparegrid_http_requests_total{route, method, status}`: requests
//!   answered, by matched route pattern (`/v1/jobs/{id}`, or `unmatched`);
//! - `sparegrid_transfer_*`: the counters of the transfer endpoint under
//!   `/v1/data` ([`sparegrid_transfer::metrics`]), once it is open.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::store::{JobRecord, JobState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabel {
    route: String,
    method: String,
    status: u16,
}

const JOB_STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Running,
    JobState::Done,
    JobState::Failed,
    JobState::Cancelled,
];

const SUBTASK_STATES: [&str; 5] = ["queued", "assigned", "done", "dead", "cancelled"];

/// The API's metrics registry.
pub struct ApiMetrics {
    registry: Registry,
    jobs: Family<StateLabel, Gauge>,
    subtasks: Family<StateLabel, Gauge>,
    http: Family<HttpLabel, Counter>,
    /// The `/v1/data` transfer endpoint, set by [`ApiMetrics::set_transfer`].
    transfer: sparegrid_transfer::metrics::TransferSource,
    /// Serialises scrapes so two never interleave their gauge updates.
    scrape: Mutex<()>,
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiMetrics").finish_non_exhaustive()
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    pub fn new() -> ApiMetrics {
        let mut registry = Registry::with_prefix("sparegrid");
        let jobs = Family::<StateLabel, Gauge>::default();
        let subtasks = Family::<StateLabel, Gauge>::default();
        let http = Family::<HttpLabel, Counter>::default();
        registry.register("jobs", "Jobs by state", jobs.clone());
        registry.register(
            "subtasks",
            "Subtasks of all jobs by state",
            subtasks.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route pattern, method and status",
            http.clone(),
        );
        let transfer = sparegrid_transfer::metrics::TransferSource::default();
        registry.register_collector(Box::new(sparegrid_transfer::metrics::TransferCollector(
            transfer.clone(),
        )));
        ApiMetrics {
            registry,
            jobs,
            subtasks,
            http,
            transfer,
            scrape: Mutex::new(()),
        }
    }

    /// Adds a collector read at every scrape (the overlay's gauges, see
    /// [`crate::overlay::metrics`]).
    pub fn register_collector(
        &mut self,
        collector: Box<dyn prometheus_client::collector::Collector>,
    ) {
        self.registry.register_collector(collector);
    }

    /// Renders the `/v1/data` endpoint's counters from now on.
    pub fn set_transfer(&self, transfer: sparegrid_transfer::TransferState) {
        *self.transfer.write().unwrap_or_else(|e| e.into_inner()) = Some(transfer);
    }

    /// Counts one answered request.
    pub fn record_request(&self, route: &str, method: &str, status: u16) {
        self.http
            .get_or_create(&HttpLabel {
                route: route.to_owned(),
                method: method.to_owned(),
                status,
            })
            .inc();
    }

    /// Sets the job and subtask gauges from every job in the store, then
    /// renders the registry.
    pub fn render(&self, jobs: &[JobRecord]) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_job = [0i64; 5];
        let mut by_subtask = [0i64; 5];
        for j in jobs {
            if let Some(i) = JOB_STATES.iter().position(|s| *s == j.state) {
                by_job[i] += 1;
            }
            let c = &j.counts;
            for (slot, n) in
                by_subtask
                    .iter_mut()
                    .zip([c.queued, c.assigned, c.done, c.dead, c.cancelled])
            {
                *slot = slot.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for (state, n) in JOB_STATES.iter().zip(by_job) {
            self.jobs
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n);
        }
        for (state, n) in SUBTASK_STATES.iter().zip(by_subtask) {
            self.subtasks
                .get_or_create(&StateLabel {
                    state: (*state).to_owned(),
                })
                .set(n);
        }
        let mut out = String::new();
        // Writing to a String cannot fail; an error would only truncate.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
