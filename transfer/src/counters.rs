//! The endpoint's request counters, for the host's metrics: answers by
//! operation and HTTP status (counted by a middleware around every route)
//! and download bytes sent. The store counts what uploads write, discard
//! and publish ([`crate::Store::written_bytes`] and friends);
//! [`crate::TransferState::counters`] gathers both.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::TransferState;

/// Live counters (shared by every request).
#[derive(Debug, Default)]
pub struct Counters {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    sent: AtomicU64,
}

impl Counters {
    pub(crate) fn record(&self, op: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((op, status)).or_default() += 1;
    }

    pub(crate) fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// `(operation, HTTP status) → answers`. Operations: `create` (POST),
    /// `upload` (PATCH), `download` (GET), `head`, `delete`, `options`,
    /// `other`.
    pub requests: BTreeMap<(&'static str, u16), u64>,
    /// Upload bytes written (some later cut off again: `discarded_bytes`).
    pub received_bytes: u64,
    pub discarded_bytes: u64,
    /// Download body bytes handed to the connection.
    pub sent_bytes: u64,
    /// Uploads verified against their digest and published.
    pub published: u64,
}

/// The operation a request method stands for.
pub fn operation(method: &Method) -> &'static str {
    match *method {
        Method::POST => "create",
        Method::PATCH => "upload",
        Method::GET => "download",
        Method::HEAD => "head",
        Method::DELETE => "delete",
        Method::OPTIONS => "options",
        _ => "other",
    }
}

/// Middleware: counts every answer by operation and status.
pub(crate) async fn count(
    State(state): State<TransferState>,
    req: Request,
    next: Next,
) -> Response {
    let op = operation(req.method());
    let r = next.run(req).await;
    state.inner.counters.record(op, r.status().as_u16());
    r
}

impl TransferState {
    /// The endpoint's counters now.
    pub fn counters(&self) -> CounterSnapshot {
        let store = self.store();
        CounterSnapshot {
            requests: self
                .inner
                .counters
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            received_bytes: store.written_bytes(),
            discarded_bytes: store.discarded_bytes(),
            sent_bytes: self.inner.counters.sent.load(Ordering::Relaxed),
            published: store.published(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_operations() {
        assert_eq!(operation(&Method::PATCH), "upload");
        assert_eq!(operation(&Method::GET), "download");
        assert_eq!(operation(&Method::PUT), "other");
    }

    #[test]
    fn records_add_up_per_operation_and_status() {
        let c = Counters::default();
        c.record("upload", 204);
        c.record("upload", 204);
        c.record("upload", 460);
        c.add_sent(10);
        c.add_sent(5);
        let m = c.requests.lock().unwrap().clone();
        assert_eq!(m[&("upload", 204)], 2);
        assert_eq!(m[&("upload", 460)], 1);
        assert_eq!(c.sent.load(Ordering::Relaxed), 15);
    }
}
