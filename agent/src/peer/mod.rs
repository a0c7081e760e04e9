//! Peer-to-peer work stealing, the agent side (issue 5, part 2): a durable
//! queue of p2p subtasks, the trade protocol between agents, and the
//! thief's policy. Self-contained: the daemon wires it in (config
//! `[peers]`, the runner taking work from the queue, completion callbacks
//! to the controller). See docs/p2p.md for the protocol and its reasoning.
//!
//! - [`queue`]: [`PeerQueue`], one SQLite file: subtasks queued | running |
//!   given(trade) | done | gone, trades on both sides, per-job mean run
//!   times. Every operation is one transaction; reopening is the restart
//!   recovery.
//! - [`trade`]: the thief-decides two-phase trade as functions over the
//!   queue and a [`PeerTransport`](trade::PeerTransport).
//! - [`http`]: the victim's axum routes ([`routes`]) and the blocking
//!   [`HttpTransport`](http::HttpTransport) (bearer agent token, MessagePack).
//! - [`wire`]: the request and reply bodies.
//! - [`policy`]: when to steal, from whom, how much.
//!
//! Why thief-decides: a subtask must be in exactly one run queue at any
//! moment, whichever side crashes. The victim moves subtasks to
//! `given(T)` (in no run queue) before answering; the thief alone turns
//! trade `T` into `received` or `aborted`, each a single transaction on its
//! side, so the trade has exactly one outcome; the victim learns it by
//! Commit or by asking (Outcome) and only then drops or takes back the
//! subtasks.

pub mod config;
pub mod http;
pub mod node;
pub mod policy;
pub mod queue;
pub mod trade;
pub mod wire;

pub use http::{routes, HttpTransport, PeerState};
pub use queue::PeerQueue;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the epoch: trade and state ages are kept
/// in the queue file, so they must survive a restart (a monotonic clock
/// would not). Only ages ("older than") are derived from it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
