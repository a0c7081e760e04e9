//! The trade protocol as functions over a [`PeerQueue`] and a
//! [`PeerTransport`]: thief-decides two-phase, so a subtask is in exactly
//! one run queue at any moment even if either side crashes mid-trade.
//!
//! Thief ([`steal`], composed of [`begin`], [`ask`], [`accept`], [`confirm`]):
//! 1. records trade `T` as `pending` (with the victim) BEFORE asking;
//! 2. sends [`Steal`] `{ T, thief, want: 1 + k, min_runtime_ms }`; on any
//!    failure it aborts `T` (`pending` → `aborted`) and stops;
//! 3. in one transaction inserts the answer's subtasks as `queued` and marks
//!    `T` `received` — the commit point of the trade; if `T` was aborted
//!    meanwhile it receives nothing;
//! 4. sends [`Commit`] `{ T, attempts }` (best effort: the victim asks for
//!    the outcome if it never arrives).
//!
//! Victim ([`serve_steal`], [`serve_commit`], [`resolve_given`]):
//! - on Steal, in one transaction, moves up to `min(want, ceil(queued/2))`
//!   queued (never running) subtasks to `given(T)` and answers them; it
//!   gives nothing of a job whose mean run time is below `min_runtime_ms`;
//! - on Commit marks the listed ones `gone` (idempotent);
//! - for a `given(T)` older than a bound it asks the thief [`OutcomeQuery`]:
//!   `received` → commit the attempts listed, take back any other;
//!   `aborted`/`unknown` → take them all back; `pending` → ask later;
//!   `not_thief` or no answer → keep waiting (logged): they are in no run
//!   queue but accounted to the trade.
//!
//! Thief, on restart ([`PeerQueue::open`]): every `pending` trade becomes
//! `aborted`, so it can never receive it later; [`serve_outcome`] answers
//! `aborted` for it. Because `pending` → `received` and `pending` →
//! `aborted` are both single transactions on the thief, the thief alone
//! decides each trade, exactly once.

use std::time::{Duration, Instant};

use sparegrid_proto::grid::AttemptRef;

use super::queue::{PeerQueue, QueueError, ThiefTrade};
use super::wire::{Commit, Committed, Given, OutcomeQuery, OutcomeReply, OutcomeState, Steal};

/// How a call to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("peer {0} has no known address")]
    UnknownPeer(String),
    /// No answer (connect, timeout, reading the reply).
    #[error("peer {peer}: {message}")]
    Unreachable { peer: String, message: String },
    /// An answer that is not a success.
    #[error("peer {peer}: HTTP {status}: {body}")]
    Status {
        peer: String,
        status: u16,
        body: String,
    },
    /// A success whose body is not the expected message.
    #[error("peer {peer}: {message}")]
    Decode { peer: String, message: String },
}

/// Calls to other agents' peer routes. Blocking; do not call from the
/// async runtime.
pub trait PeerTransport {
    /// `POST /v1/peer/steal` on `victim`.
    fn steal(&self, victim: &str, req: &Steal) -> Result<Given, TransportError>;
    /// `POST /v1/peer/commit` on `victim`.
    fn commit(&self, victim: &str, req: &Commit) -> Result<Committed, TransportError>;
    /// `POST /v1/peer/outcome` on `thief`.
    fn outcome(&self, thief: &str, req: &OutcomeQuery) -> Result<OutcomeReply, TransportError>;
}

/// Why a trade step failed.
#[derive(Debug, thiserror::Error)]
pub enum TradeError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("trade {trade}: {error}")]
    Transport {
        trade: String,
        error: TransportError,
    },
    /// A request this agent refuses (e.g. from itself).
    #[error("{field}: {message}")]
    BadRequest { field: String, message: String },
}

/// What the thief asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub want: u32,
    pub min_runtime_ms: u64,
    pub need_stats: bool,
}

/// How a steal ended (for the policy and the counters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StealOutcome {
    pub trade: String,
    /// Attempts received (empty: the victim gave nothing, or the trade was
    /// aborted before it could be received).
    pub got: Vec<AttemptRef>,
    /// The steal request's round trip, when it was answered.
    pub rtt: Option<Duration>,
    /// Whether the victim confirmed the Commit (if not, it will ask).
    pub committed: bool,
}

/// Step 1: records a `pending` trade with `victim`; returns its id.
pub fn begin(queue: &PeerQueue, victim: &str, now_ms: u64) -> Result<String, TradeError> {
    if victim == queue.self_id() {
        return Err(TradeError::BadRequest {
            field: "victim".to_owned(),
            message: "an agent cannot steal from itself".to_owned(),
        });
    }
    Ok(queue.begin_trade(victim, now_ms)?)
}

/// Step 2: sends the Steal for `trade`; a failed or unusable answer aborts
/// the trade (the victim takes back whatever it gave when it asks).
pub fn ask(
    queue: &PeerQueue,
    transport: &dyn PeerTransport,
    victim: &str,
    trade: &str,
    ask: &Ask,
) -> Result<(Given, Duration), TradeError> {
    let req = Steal {
        trade: trade.to_owned(),
        thief: queue.self_id().to_owned(),
        want: ask.want,
        min_runtime_ms: ask.min_runtime_ms,
        need_stats: ask.need_stats,
    };
    let t0 = Instant::now();
    let answer = transport.steal(victim, &req).and_then(|g| {
        if g.trade != trade || g.victim != victim {
            Err(TransportError::Decode {
                peer: victim.to_owned(),
                message: format!(
                    "answered trade {} from {} to a steal of {trade} from {victim}",
                    g.trade, g.victim
                ),
            })
        } else {
            Ok(g)
        }
    });
    let rtt = t0.elapsed();
    match answer {
        Ok(g) => Ok((g, rtt)),
        Err(error) => {
            // If this abort fails, the trade stays pending until the next
            // restart or stale sweep aborts it; the victim keeps asking.
            if let Err(e) = queue.abort_trade(trade, super::now_ms()) {
                tracing::warn!(trade, error = %e, "could not abort a failed trade");
            }
            Err(TradeError::Transport {
                trade: trade.to_owned(),
                error,
            })
        }
    }
}

/// Step 3, the commit point: receives the answer's subtasks (if the trade
/// is still pending). Returns the attempts now held for the trade; empty
/// when it was aborted meanwhile.
pub fn accept(
    queue: &PeerQueue,
    given: &Given,
    now_ms: u64,
) -> Result<Vec<AttemptRef>, TradeError> {
    match queue.receive(&given.trade, &given.subtasks, now_ms)? {
        ThiefTrade::Received(got) => Ok(got),
        other => {
            tracing::info!(trade = %given.trade, state = ?other, "steal answered after the trade was given up");
            Ok(Vec::new())
        }
    }
}

/// Step 4: tells the victim the trade was received (best effort). A
/// failure is logged: the victim resolves it with [`OutcomeQuery`].
pub fn confirm(
    queue: &PeerQueue,
    transport: &dyn PeerTransport,
    victim: &str,
    trade: &str,
    attempts: Vec<AttemptRef>,
) -> bool {
    let req = Commit {
        trade: trade.to_owned(),
        thief: queue.self_id().to_owned(),
        attempts,
    };
    match transport.commit(victim, &req) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(trade, victim, error = %e, "commit not delivered; the victim will ask");
            false
        }
    }
}

/// A whole steal from `victim`: [`begin`], [`ask`], [`accept`], [`confirm`].
/// A transport failure is an `Err` (the trade is aborted); an empty answer
/// is an `Ok` with nothing got.
pub fn steal(
    queue: &PeerQueue,
    transport: &dyn PeerTransport,
    victim: &str,
    want: &Ask,
) -> Result<StealOutcome, TradeError> {
    let trade = begin(queue, victim, super::now_ms())?;
    let (given, rtt) = ask(queue, transport, victim, &trade, want)?;
    let held = accept(queue, &given, super::now_ms())?;
    let committed = if given.subtasks.is_empty() {
        // The victim recorded the empty trade as settled; nothing to commit.
        true
    } else if held.is_empty() {
        false
    } else {
        confirm(queue, transport, victim, &trade, held.clone())
    };
    Ok(StealOutcome {
        trade,
        got: held,
        rtt: Some(rtt),
        committed,
    })
}

/// The victim's handling of [`Steal`].
pub fn serve_steal(queue: &PeerQueue, req: &Steal, now_ms: u64) -> Result<Given, TradeError> {
    if req.thief == queue.self_id() {
        return Err(TradeError::BadRequest {
            field: "Steal.thief".to_owned(),
            message: "is this agent itself".to_owned(),
        });
    }
    if !req.trade.starts_with(&format!("{}#", req.thief)) {
        return Err(TradeError::BadRequest {
            field: "Steal.trade".to_owned(),
            message: format!("must be the thief's own id, {}#<n>", req.thief),
        });
    }
    let subtasks = queue.give(
        &req.trade,
        &req.thief,
        req.want,
        req.min_runtime_ms,
        req.need_stats,
        now_ms,
    )?;
    if !subtasks.is_empty() {
        tracing::debug!(trade = %req.trade, thief = %req.thief, n = subtasks.len(), "gave subtasks");
    }
    Ok(Given {
        trade: req.trade.clone(),
        victim: queue.self_id().to_owned(),
        subtasks,
    })
}

/// The victim's handling of [`Commit`].
pub fn serve_commit(queue: &PeerQueue, req: &Commit, now_ms: u64) -> Result<Committed, TradeError> {
    let r = queue.commit_given(&req.trade, &req.thief, &req.attempts, now_ms)?;
    Ok(Committed {
        trade: req.trade.clone(),
        moved: r.moved,
        returned: r.returned,
    })
}

/// The thief's handling of [`OutcomeQuery`].
pub fn serve_outcome(queue: &PeerQueue, req: &OutcomeQuery) -> Result<OutcomeReply, TradeError> {
    if req.thief != queue.self_id() {
        return Ok(OutcomeReply {
            trade: req.trade.clone(),
            state: OutcomeState::NotThief,
            attempts: Vec::new(),
        });
    }
    let (state, attempts) = match queue.thief_trade(&req.trade)? {
        ThiefTrade::Pending => (OutcomeState::Pending, Vec::new()),
        ThiefTrade::Received(a) => (OutcomeState::Received, a),
        ThiefTrade::Aborted => (OutcomeState::Aborted, Vec::new()),
        ThiefTrade::Unknown => (OutcomeState::Unknown, Vec::new()),
    };
    Ok(OutcomeReply {
        trade: req.trade.clone(),
        state,
        attempts,
    })
}

/// What [`resolve_given`] did, by trade id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Received by the thief: now gone.
    pub committed: Vec<String>,
    /// Aborted or unknown to the thief: back in the queue.
    pub returned: Vec<String>,
    /// Pending at the thief: asked again later.
    pub pending: Vec<String>,
    /// No usable answer (unreachable, not the thief): still given.
    pub waiting: Vec<String>,
}

/// The victim's recovery: for each `given` trade older than `older_than`,
/// asks its thief for the outcome and settles it.
pub fn resolve_given(
    queue: &PeerQueue,
    transport: &dyn PeerTransport,
    older_than: Duration,
    now_ms: u64,
) -> Result<Resolved, TradeError> {
    let mut out = Resolved::default();
    for t in queue.given_trades(older_than, now_ms)? {
        let q = OutcomeQuery {
            trade: t.trade.clone(),
            thief: t.thief.clone(),
        };
        match transport.outcome(&t.thief, &q) {
            Ok(r) if r.trade == t.trade => match r.state {
                OutcomeState::Received => {
                    let c = queue.commit_given(&t.trade, &t.thief, &r.attempts, super::now_ms())?;
                    tracing::info!(trade = %t.trade, thief = %t.thief, moved = c.moved, returned = c.returned, "trade resolved: received");
                    out.committed.push(t.trade);
                }
                OutcomeState::Aborted | OutcomeState::Unknown => {
                    let n = queue.take_back(&t.trade, super::now_ms())?;
                    tracing::info!(trade = %t.trade, thief = %t.thief, state = ?r.state, n, "trade resolved: taken back");
                    out.returned.push(t.trade);
                }
                OutcomeState::Pending => out.pending.push(t.trade),
                OutcomeState::NotThief => {
                    tracing::warn!(trade = %t.trade, thief = %t.thief, n = t.subtasks, "the peer asked is not the trade's thief; subtasks stay given");
                    out.waiting.push(t.trade);
                }
            },
            Ok(r) => {
                tracing::warn!(trade = %t.trade, answered = %r.trade, "outcome answer for another trade");
                out.waiting.push(t.trade);
            }
            Err(e) => {
                tracing::warn!(trade = %t.trade, thief = %t.thief, n = t.subtasks, error = %e, "thief unreachable; subtasks stay given to the trade");
                out.waiting.push(t.trade);
            }
        }
    }
    Ok(out)
}
