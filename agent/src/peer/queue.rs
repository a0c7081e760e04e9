//! [`PeerQueue`]: this agent's peer-to-peer subtasks in one SQLite file
//! (WAL, `synchronous=NORMAL`: a commit survives a crash of the agent
//! process), with the trades they take part in and per-job run-time
//! statistics. Every operation is one `BEGIN IMMEDIATE` transaction, so a
//! crash (kill -9) at any point leaves the file as it was before or after
//! the operation, never in between.
//!
//! A subtask row is one attempt ([`AttemptRef`]: job, index, epoch) with
//! its [`Assignment`] (MessagePack) and a [`SubtaskState`]:
//!
//! ```text
//!  enqueue ──▶ queued ──take_next──▶ running ──finish──▶ done (outbox: report, reported)
//!               ▲  │◀──requeue / reopen──┘
//!               │  └──give(T)──▶ given(T) ──commit_given──▶ gone(T, owner)
//!               └──────────take_back(T)──┘
//!  receive(T): a thief's new rows are queued (a `gone` row of the same
//!  attempt, one that went out earlier and comes back, is revived).
//! ```
//!
//! Trades (see [`super::trade`] for the protocol) are recorded on both
//! sides: `thief_trades` (`pending` → `received` | `aborted`, with the
//! attempts received in `thief_items`) and `victim_trades` (`given` →
//! `committed` | `returned`). Trade ids are `<self_id>#<n>` with `n` from an
//! AUTOINCREMENT column, so an id is never reused, even after a restart.
//!
//! [`PeerQueue::open`] is the restart recovery: `running` rows go back to
//! `queued` (their run died with the process; the controller accepts one
//! completion per subtask, so running one again is safe), and every
//! `pending` thief trade becomes `aborted` (the answer to its request died
//! with the process, so it can never be received; the victim takes the
//! subtasks back when it asks for the outcome).
//!
//! One file belongs to one agent process; two processes on one file would
//! abort each other's pending trades. One connection behind a mutex.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use sparegrid_proto::grid::{Assignment, AttemptRef};

/// The file [`PeerQueue::open`] keeps in its directory.
pub const DB_FILE: &str = "peer-queue.sqlite";

const SCHEMA: &str = r#"
CREATE TABLE subtasks (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT, -- queue order
    job         TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    assignment  BLOB NOT NULL,                     -- MessagePack Assignment
    state       INTEGER NOT NULL,                  -- see SubtaskState::code
    trade       TEXT,                              -- given, gone: the trade
    owner       TEXT,                              -- gone: the thief
    since_ms    INTEGER NOT NULL,                  -- last state change
    duration_ms INTEGER,                           -- done
    report      BLOB,                              -- done: completion to send
    reported    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job, idx, epoch)
);
CREATE INDEX subtasks_state ON subtasks (state, seq);
CREATE INDEX subtasks_trade ON subtasks (trade) WHERE trade IS NOT NULL;
CREATE TABLE job_stats (
    job      TEXT PRIMARY KEY,
    runs     INTEGER NOT NULL,
    total_ms INTEGER NOT NULL
);
CREATE TABLE thief_trades (
    n          INTEGER PRIMARY KEY AUTOINCREMENT,
    trade      TEXT NOT NULL UNIQUE,
    victim     TEXT NOT NULL,
    state      INTEGER NOT NULL,                   -- 0 pending, 1 received, 2 aborted
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE thief_items (
    trade TEXT NOT NULL,
    job   TEXT NOT NULL,
    idx   INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (trade, job, idx, epoch)
);
CREATE TABLE victim_trades (
    trade      TEXT PRIMARY KEY,
    thief      TEXT NOT NULL,
    state      INTEGER NOT NULL,                   -- 0 given, 1 committed, 2 returned
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE peer_counters (
    peer   TEXT PRIMARY KEY,
    stolen INTEGER NOT NULL DEFAULT 0,             -- subtasks this agent took from peer
    given  INTEGER NOT NULL DEFAULT 0              -- subtasks peer took from this agent
);
"#;

/// Version 2: indexes for the outbox scan and for pruning by job.
const MIGRATE_V2: &str = r#"
CREATE INDEX IF NOT EXISTS subtasks_unreported ON subtasks (since_ms, seq)
    WHERE state = 3 AND reported = 0;
CREATE INDEX IF NOT EXISTS subtasks_job ON subtasks (job, state);
"#;

const SCHEMA_VERSION: i64 = 2;

const T_PENDING: i64 = 0;
const T_RECEIVED: i64 = 1;
const T_ABORTED: i64 = 2;

const V_GIVEN: i64 = 0;
const V_COMMITTED: i64 = 1;
const V_RETURNED: i64 = 2;

/// Ends a victim-side trade in `state` (committed or returned): its rows
/// still `given` go back to `queued`; returns how many did.
fn close_victim_trade(
    tx: &Transaction,
    trade: &str,
    state: i64,
    now_ms: u64,
    op: &'static str,
) -> Result<u32> {
    let returned = tx
        .execute(
            "UPDATE subtasks SET state = 0, trade = NULL, since_ms = ?2
             WHERE trade = ?1 AND state = 2",
            params![trade, now_ms as i64],
        )
        .map_err(db(op))? as u32;
    tx.execute(
        "UPDATE victim_trades SET state = ?2, updated_ms = ?3 WHERE trade = ?1",
        params![trade, state, now_ms as i64],
    )
    .map_err(db(op))?;
    Ok(returned)
}

/// Where one attempt is in this agent's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubtaskState {
    /// Waiting to run here (or to be given to a thief).
    Queued,
    /// Taken by this agent's runner.
    Running,
    /// Handed to a thief in an unresolved trade: in no run queue, accounted
    /// to the trade.
    Given,
    /// Ran here; its completion is in the outbox.
    Done,
    /// Moved to another agent by a committed trade (terminal here).
    Gone,
}

impl SubtaskState {
    fn from_code(c: i64) -> Option<SubtaskState> {
        Some(match c {
            0 => SubtaskState::Queued,
            1 => SubtaskState::Running,
            2 => SubtaskState::Given,
            3 => SubtaskState::Done,
            4 => SubtaskState::Gone,
            _ => return None,
        })
    }
}

/// A thief-side trade's state, as [`PeerQueue::thief_trade`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThiefTrade {
    /// Recorded, the steal request may be in flight.
    Pending,
    /// The subtasks were received (these attempts).
    Received(Vec<AttemptRef>),
    /// Given up (the request failed, or this agent restarted): never received.
    Aborted,
    /// This agent has no such trade.
    Unknown,
}

/// One open victim-side trade (subtasks `given`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenTrade {
    pub trade: String,
    pub thief: String,
    pub created_ms: u64,
    pub subtasks: u32,
}

/// What [`PeerQueue::commit_given`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitResult {
    /// Subtasks now gone to the thief.
    pub moved: u32,
    /// Subtasks of the trade the thief did not list, back in the queue.
    pub returned: u32,
    /// The trade was committed before (a repeated Commit); nothing changed.
    pub repeated: bool,
}

/// What [`PeerQueue::open`] recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// `running` subtasks put back in the queue.
    pub requeued: u32,
    /// `pending` thief trades marked `aborted`.
    pub aborted: u32,
}

/// Subtasks by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    pub queued: u64,
    pub running: u64,
    pub given: u64,
    pub done: u64,
    pub gone: u64,
}

/// Subtasks moved to and from one peer (for heartbeats and the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StealCounts {
    /// Taken from the peer by this agent (received).
    pub stolen: u64,
    /// Taken from this agent by the peer (committed).
    pub given: u64,
}

/// One row, for inspection (tests, status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub attempt: AttemptRef,
    pub state: SubtaskState,
    pub trade: Option<String>,
    pub owner: Option<String>,
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("peer queue {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("peer queue {path}: creating its directory: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer queue {path} has schema version {found}; this agent reads up to {supported}")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("peer queue: {op}: {source}")]
    Db {
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("peer queue: stored subtask {job}/{index}: {message}")]
    Corrupt {
        job: String,
        index: u64,
        message: String,
    },
    #[error("peer queue: encoding subtask {job}/{index}: {message}")]
    Encode {
        job: String,
        index: u64,
        message: String,
    },
    #[error("subtask {job}/{index} epoch {epoch} is not running here")]
    NotRunning { job: String, index: u64, epoch: u32 },
    #[error("trade {0} is not known here")]
    UnknownTrade(String),
    #[error("trade {trade}: {message}")]
    TradeConflict { trade: String, message: String },
}

impl QueueError {
    fn not_running(a: &AttemptRef) -> QueueError {
        QueueError::NotRunning {
            job: a.job.clone(),
            index: a.index,
            epoch: a.epoch,
        }
    }
}

type Result<T> = std::result::Result<T, QueueError>;

fn db(op: &'static str) -> impl Fn(rusqlite::Error) -> QueueError {
    move |source| QueueError::Db { op, source }
}

/// This agent's durable peer-to-peer queue.
pub struct PeerQueue {
    conn: Mutex<Connection>,
    path: PathBuf,
    self_id: String,
    recovery: Recovery,
}

impl std::fmt::Debug for PeerQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerQueue")
            .field("path", &self.path)
            .field("self_id", &self.self_id)
            .finish()
    }
}

impl PeerQueue {
    /// Opens (creating) `dir/peer-queue.sqlite` for the agent `self_id`
    /// and runs the restart recovery ([`PeerQueue::recovery`] says what it
    /// did).
    pub fn open(dir: &Path, self_id: &str) -> Result<PeerQueue> {
        std::fs::create_dir_all(dir).map_err(|source| QueueError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let open_err = |source| QueueError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(32);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(QueueError::SchemaTooNew {
                path,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(open_err)?;
            if version < 1 {
                tx.execute_batch(SCHEMA).map_err(open_err)?;
            }
            tx.execute_batch(MIGRATE_V2).map_err(open_err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(open_err)?;
            tx.commit().map_err(open_err)?;
        }
        let now = super::now_ms();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(open_err)?;
        let requeued = tx
            .execute(
                "UPDATE subtasks SET state = 0, since_ms = ?1 WHERE state = 1",
                params![now as i64],
            )
            .map_err(open_err)? as u32;
        let aborted = tx
            .execute(
                "UPDATE thief_trades SET state = ?1, updated_ms = ?2 WHERE state = ?3",
                params![T_ABORTED, now as i64, T_PENDING],
            )
            .map_err(open_err)? as u32;
        tx.commit().map_err(open_err)?;
        let recovery = Recovery { requeued, aborted };
        if requeued > 0 || aborted > 0 {
            tracing::info!(
                path = %path.display(),
                requeued,
                aborted,
                "peer queue recovered after a restart"
            );
        }
        Ok(PeerQueue {
            conn: Mutex::new(conn),
            path,
            self_id: self_id.to_owned(),
            recovery,
        })
    }

    /// What the restart recovery in [`PeerQueue::open`] did.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// The agent id this queue belongs to (the prefix of its trade ids).
    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction.
    fn tx<T>(&self, op: &'static str, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        // A poisoned lock only means another thread panicked between
        // statements; SQLite rolled its transaction back on drop.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(op))?;
        let out = f(&tx)?;
        tx.commit().map_err(db(op))?;
        Ok(out)
    }

    // ---- local queue -------------------------------------------------

    /// Adds subtasks the controller seeded here, in order. Idempotent per
    /// attempt: an attempt this queue already holds, in any state (also
    /// one that ran or went to a peer), is skipped. Returns how many were
    /// added.
    pub fn enqueue(&self, subtasks: &[Assignment], now_ms: u64) -> Result<usize> {
        let blobs = subtasks.iter().map(encode).collect::<Result<Vec<_>>>()?;
        self.tx("enqueue", |tx| {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO subtasks (job, idx, epoch, assignment, state, since_ms)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                )
                .map_err(db("enqueue"))?;
            let mut added = 0;
            for (a, blob) in subtasks.iter().zip(&blobs) {
                let at = &a.attempt;
                added += st
                    .execute(params![
                        at.job,
                        at.index as i64,
                        at.epoch,
                        blob,
                        now_ms as i64
                    ])
                    .map_err(db("enqueue"))?;
            }
            Ok(added)
        })
    }

    /// The oldest queued subtask, now `running`; `None` when none is queued.
    pub fn take_next(&self, now_ms: u64) -> Result<Option<Assignment>> {
        self.tx("take_next", |tx| {
            let row = tx
                .query_row(
                    "SELECT seq, job, idx, assignment FROM subtasks
                     WHERE state = 0 ORDER BY seq LIMIT 1",
                    [],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                        ))
                    },
                )
                .optional()
                .map_err(db("take_next"))?;
            let Some((seq, job, idx, blob)) = row else {
                return Ok(None);
            };
            let a = decode(&job, idx as u64, &blob)?;
            tx.execute(
                "UPDATE subtasks SET state = 1, since_ms = ?2 WHERE seq = ?1",
                params![seq, now_ms as i64],
            )
            .map_err(db("take_next"))?;
            Ok(Some(a))
        })
    }

    /// `running` → `done`: keeps `report` (the completion to send to the
    /// controller, opaque here) in the outbox and adds `duration_ms` to the
    /// job's run-time statistics, in one transaction.
    pub fn finish(
        &self,
        attempt: &AttemptRef,
        duration_ms: u64,
        report: &[u8],
        now_ms: u64,
    ) -> Result<()> {
        self.tx("finish", |tx| {
            let n = tx
                .execute(
                    "UPDATE subtasks SET state = 3, since_ms = ?4, duration_ms = ?5, report = ?6,
                        reported = 0
                     WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND state = 1",
                    params![
                        attempt.job,
                        attempt.index as i64,
                        attempt.epoch,
                        now_ms as i64,
                        duration_ms as i64,
                        report
                    ],
                )
                .map_err(db("finish"))?;
            if n == 0 {
                return Err(QueueError::not_running(attempt));
            }
            tx.execute(
                "INSERT INTO job_stats (job, runs, total_ms) VALUES (?1, 1, ?2)
                 ON CONFLICT (job) DO UPDATE SET runs = runs + 1, total_ms = total_ms + ?2",
                params![attempt.job, duration_ms as i64],
            )
            .map_err(db("finish"))?;
            Ok(())
        })
    }

    /// `running` → `queued` (the runner could not run it now, e.g. the
    /// host got busy); it keeps its place at the front of the queue.
    pub fn requeue(&self, attempt: &AttemptRef, now_ms: u64) -> Result<()> {
        self.tx("requeue", |tx| {
            let n = tx
                .execute(
                    "UPDATE subtasks SET state = 0, since_ms = ?4
                     WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND state = 1",
                    params![
                        attempt.job,
                        attempt.index as i64,
                        attempt.epoch,
                        now_ms as i64
                    ],
                )
                .map_err(db("requeue"))?;
            if n == 0 {
                return Err(QueueError::not_running(attempt));
            }
            Ok(())
        })
    }

    /// Done subtasks whose report was not yet marked sent, oldest first.
    pub fn unreported(&self, limit: usize) -> Result<Vec<(AttemptRef, Vec<u8>)>> {
        self.tx("unreported", |tx| {
            let mut st = tx
                .prepare_cached(
                    "SELECT job, idx, epoch, report FROM subtasks
                     WHERE state = 3 AND reported = 0 ORDER BY since_ms, seq LIMIT ?1",
                )
                .map_err(db("unreported"))?;
            let rows = st
                .query_map(params![limit as i64], |r| {
                    Ok((
                        AttemptRef {
                            job: r.get(0)?,
                            index: r.get::<_, i64>(1)? as u64,
                            epoch: r.get(2)?,
                        },
                        r.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default(),
                    ))
                })
                .map_err(db("unreported"))?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db("unreported"))
        })
    }

    /// Marks reports sent (the controller accepted them, or answered that
    /// they were duplicates or stale). Returns how many changed.
    pub fn mark_reported(&self, attempts: &[AttemptRef]) -> Result<usize> {
        self.tx("mark_reported", |tx| {
            let mut n = 0;
            for a in attempts {
                n += tx
                    .execute(
                        "UPDATE subtasks SET reported = 1
                         WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND state = 3",
                        params![a.job, a.index as i64, a.epoch],
                    )
                    .map_err(db("mark_reported"))?;
            }
            Ok(n)
        })
    }

    /// The mean run time of `job`'s subtasks that finished here, if any did.
    pub fn job_mean_ms(&self, job: &str) -> Result<Option<u64>> {
        self.tx("job_mean_ms", |tx| {
            tx.query_row(
                "SELECT runs, total_ms FROM job_stats WHERE job = ?1",
                params![job],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
            .map(|o| {
                o.filter(|(runs, _)| *runs > 0)
                    .map(|(runs, t)| (t / runs) as u64)
            })
            .map_err(db("job_mean_ms"))
        })
    }

    /// Subtasks by state.
    pub fn counts(&self) -> Result<QueueCounts> {
        self.tx("counts", |tx| {
            let mut st = tx
                .prepare_cached("SELECT state, COUNT(*) FROM subtasks GROUP BY state")
                .map_err(db("counts"))?;
            let mut c = QueueCounts::default();
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(db("counts"))?;
            for row in rows {
                let (state, n) = row.map_err(db("counts"))?;
                match SubtaskState::from_code(state) {
                    Some(SubtaskState::Queued) => c.queued = n,
                    Some(SubtaskState::Running) => c.running = n,
                    Some(SubtaskState::Given) => c.given = n,
                    Some(SubtaskState::Done) => c.done = n,
                    Some(SubtaskState::Gone) => c.gone = n,
                    None => {}
                }
            }
            Ok(c)
        })
    }

    /// Every row (tests, status), in queue order.
    pub fn rows(&self) -> Result<Vec<Row>> {
        self.tx("rows", |tx| {
            let mut st = tx
                .prepare_cached(
                    "SELECT job, idx, epoch, state, trade, owner FROM subtasks ORDER BY seq",
                )
                .map_err(db("rows"))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        AttemptRef {
                            job: r.get(0)?,
                            index: r.get::<_, i64>(1)? as u64,
                            epoch: r.get(2)?,
                        },
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                })
                .map_err(db("rows"))?;
            let mut out = Vec::new();
            for row in rows {
                let (attempt, code, trade, owner) = row.map_err(db("rows"))?;
                let state = SubtaskState::from_code(code).ok_or_else(|| QueueError::Corrupt {
                    job: attempt.job.clone(),
                    index: attempt.index,
                    message: format!("unknown state code {code}"),
                })?;
                out.push(Row {
                    attempt,
                    state,
                    trade,
                    owner,
                });
            }
            Ok(out)
        })
    }

    /// Subtasks moved to and from each peer.
    pub fn steal_counts(&self) -> Result<BTreeMap<String, StealCounts>> {
        self.tx("steal_counts", |tx| {
            let mut st = tx
                .prepare_cached("SELECT peer, stolen, given FROM peer_counters ORDER BY peer")
                .map_err(db("steal_counts"))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        StealCounts {
                            stolen: r.get::<_, i64>(1)? as u64,
                            given: r.get::<_, i64>(2)? as u64,
                        },
                    ))
                })
                .map_err(db("steal_counts"))?;
            rows.collect::<std::result::Result<BTreeMap<_, _>, _>>()
                .map_err(db("steal_counts"))
        })
    }

    /// Subtasks moved per job: `job → (stolen in, given out)`. Stolen in:
    /// attempts received in this agent's trades; given out: rows that
    /// went to a thief and are still gone.
    pub fn steals_by_job(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        self.tx("steals_by_job", |tx| {
            let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            let mut st = tx
                .prepare_cached(
                    "SELECT i.job, COUNT(*) FROM thief_items i
                     JOIN thief_trades t ON t.trade = i.trade
                     WHERE t.state = ?1 GROUP BY i.job",
                )
                .map_err(db("steals_by_job"))?;
            let rows = st
                .query_map([T_RECEIVED], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(db("steals_by_job"))?;
            for row in rows {
                let (job, n) = row.map_err(db("steals_by_job"))?;
                out.entry(job).or_default().0 = n as u64;
            }
            let mut st = tx
                .prepare_cached("SELECT job, COUNT(*) FROM subtasks WHERE state = 4 GROUP BY job")
                .map_err(db("steals_by_job"))?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db("steals_by_job"))?;
            for row in rows {
                let (job, n) = row.map_err(db("steals_by_job"))?;
                out.entry(job).or_default().1 = n as u64;
            }
            Ok(out)
        })
    }

    /// Forgets the jobs this agent is finished with: every row of a job
    /// with nothing queued, running or given here and every report sent,
    /// whose last change is older than `keep`, with its run-time
    /// statistics and the settled trades (received or aborted on the thief
    /// side, committed or returned on the victim side) last changed before
    /// then. Pending and given trades, and the per-peer counters, stay.
    /// Returns how many subtask rows went.
    pub fn prune(&self, keep: Duration, now_ms: u64) -> Result<u64> {
        let cutoff = now_ms.saturating_sub(keep.as_millis() as u64) as i64;
        self.tx("prune", |tx| {
            let rows = tx
                .execute(
                    "DELETE FROM subtasks WHERE job IN (
                         SELECT job FROM subtasks GROUP BY job
                         HAVING SUM(state IN (0, 1, 2)) = 0
                            AND SUM(state = 3 AND reported = 0) = 0
                            AND MAX(since_ms) < ?1)",
                    params![cutoff],
                )
                .map_err(db("prune"))?;
            tx.execute(
                "DELETE FROM job_stats WHERE job NOT IN (SELECT DISTINCT job FROM subtasks)",
                [],
            )
            .map_err(db("prune"))?;
            tx.execute(
                "DELETE FROM thief_items
                 WHERE job NOT IN (SELECT DISTINCT job FROM subtasks)
                   AND trade IN (SELECT trade FROM thief_trades
                                 WHERE state != ?1 AND updated_ms < ?2)",
                params![T_PENDING, cutoff],
            )
            .map_err(db("prune"))?;
            tx.execute(
                "DELETE FROM thief_trades
                 WHERE state != ?1 AND updated_ms < ?2
                   AND trade NOT IN (SELECT trade FROM thief_items)",
                params![T_PENDING, cutoff],
            )
            .map_err(db("prune"))?;
            tx.execute(
                "DELETE FROM victim_trades
                 WHERE state != ?1 AND updated_ms < ?2
                   AND trade NOT IN (SELECT trade FROM subtasks WHERE trade IS NOT NULL)",
                params![V_GIVEN, cutoff],
            )
            .map_err(db("prune"))?;
            Ok(rows as u64)
        })
    }

    // ---- thief side --------------------------------------------------

    /// Records a new `pending` trade with `victim` (before asking it) and
    /// returns its id, `<self_id>#<n>`.
    pub fn begin_trade(&self, victim: &str, now_ms: u64) -> Result<String> {
        let self_id = self.self_id.clone();
        self.tx("begin_trade", |tx| {
            // The id needs the row's number: insert with a placeholder,
            // then name it (one transaction, so no one sees the placeholder).
            tx.execute(
                "INSERT INTO thief_trades (trade, victim, state, created_ms, updated_ms)
                 VALUES ('', ?1, ?2, ?3, ?3)",
                params![victim, T_PENDING, now_ms as i64],
            )
            .map_err(db("begin_trade"))?;
            let n = tx.last_insert_rowid();
            let trade = format!("{self_id}#{n}");
            tx.execute(
                "UPDATE thief_trades SET trade = ?1 WHERE n = ?2",
                params![trade, n],
            )
            .map_err(db("begin_trade"))?;
            Ok(trade)
        })
    }

    /// The thief's commit point: if `trade` is still `pending`, inserts the
    /// given subtasks as `queued`, records them as the trade's items and
    /// marks it `received`, in one transaction. Idempotent: a trade already
    /// received returns its items unchanged. An aborted trade receives
    /// nothing: `ThiefTrade::Aborted` (the victim takes them back).
    ///
    /// An attempt that comes back is revived: a `gone` row (it went out
    /// from here earlier) or a `given` one (it went out in a trade of ours
    /// that its thief received, not yet settled here; the only way it can
    /// reach us again). An attempt held queued, running or done (a
    /// controller seeding one attempt twice) is counted as received without
    /// a second row, so the victim drops its copy.
    pub fn receive(&self, trade: &str, subtasks: &[Assignment], now_ms: u64) -> Result<ThiefTrade> {
        let blobs = subtasks.iter().map(encode).collect::<Result<Vec<_>>>()?;
        self.tx("receive", |tx| {
            let row = tx
                .query_row(
                    "SELECT victim, state FROM thief_trades WHERE trade = ?1",
                    params![trade],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()
                .map_err(db("receive"))?;
            let Some((victim, state)) = row else {
                return Ok(ThiefTrade::Unknown);
            };
            match state {
                T_PENDING => {}
                T_RECEIVED => return Ok(ThiefTrade::Received(items(tx, trade)?)),
                _ => return Ok(ThiefTrade::Aborted),
            }
            let mut got = Vec::with_capacity(subtasks.len());
            for (a, blob) in subtasks.iter().zip(&blobs) {
                let at = &a.attempt;
                let key = params![at.job, at.index as i64, at.epoch];
                // Coming back: a row that went out from here (`gone`), or
                // one still `given` in a trade of ours that its thief
                // received (it cannot be here otherwise); that trade will
                // resolve finding nothing left to move.
                tx.execute(
                    "DELETE FROM subtasks
                     WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND state IN (2, 4)",
                    key,
                )
                .map_err(db("receive"))?;
                tx.execute(
                    "INSERT OR IGNORE INTO subtasks (job, idx, epoch, assignment, state, since_ms)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                    params![at.job, at.index as i64, at.epoch, blob, now_ms as i64],
                )
                .map_err(db("receive"))?;
                let new = tx
                    .execute(
                        "INSERT OR IGNORE INTO thief_items (trade, job, idx, epoch)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![trade, at.job, at.index as i64, at.epoch],
                    )
                    .map_err(db("receive"))?;
                if new > 0 {
                    got.push(at.clone());
                }
            }
            tx.execute(
                "UPDATE thief_trades SET state = ?2, updated_ms = ?3 WHERE trade = ?1",
                params![trade, T_RECEIVED, now_ms as i64],
            )
            .map_err(db("receive"))?;
            bump(tx, &victim, got.len() as i64, 0)?;
            Ok(ThiefTrade::Received(items(tx, trade)?))
        })
    }

    /// `pending` → `aborted` (the request failed, or the answer was not
    /// usable). Returns the trade's state afterwards: a trade received
    /// meanwhile stays received.
    pub fn abort_trade(&self, trade: &str, now_ms: u64) -> Result<ThiefTrade> {
        self.tx("abort_trade", |tx| {
            tx.execute(
                "UPDATE thief_trades SET state = ?2, updated_ms = ?3 WHERE trade = ?1 AND state = ?4",
                params![trade, T_ABORTED, now_ms as i64, T_PENDING],
            )
            .map_err(db("abort_trade"))?;
            thief_state(tx, trade)
        })
    }

    /// Aborts every `pending` trade begun more than `older_than` ago (a
    /// steal whose thread died without aborting). Safe at any time: a
    /// steal answered later finds its trade aborted and receives nothing.
    pub fn abort_stale_pending(&self, older_than: Duration, now_ms: u64) -> Result<u32> {
        let before = now_ms.saturating_sub(older_than.as_millis() as u64);
        self.tx("abort_stale_pending", |tx| {
            tx.execute(
                "UPDATE thief_trades SET state = ?1, updated_ms = ?2
                 WHERE state = ?3 AND created_ms <= ?4",
                params![T_ABORTED, now_ms as i64, T_PENDING, before as i64],
            )
            .map(|n| n as u32)
            .map_err(db("abort_stale_pending"))
        })
    }

    /// The state of this agent's trade `trade` (what Outcome answers).
    pub fn thief_trade(&self, trade: &str) -> Result<ThiefTrade> {
        self.tx("thief_trade", |tx| thief_state(tx, trade))
    }

    // ---- victim side -------------------------------------------------

    /// The victim's half of a steal, in one transaction: moves up to
    /// `min(want, ceil(queued / 2))` queued subtasks (never running ones),
    /// newest first, to `given(trade)` and returns them.
    ///
    /// A subtask is eligible when its job's mean run time here is at least
    /// `min_runtime_ms` (the thief's trade cost), or, when no run of its job
    /// finished here yet, unless `need_stats`. Repeating a known trade
    /// returns what it gave the first time (still given, or gone after its
    /// commit); a returned trade gives nothing.
    pub fn give(
        &self,
        trade: &str,
        thief: &str,
        want: u32,
        min_runtime_ms: u64,
        need_stats: bool,
        now_ms: u64,
    ) -> Result<Vec<Assignment>> {
        self.tx("give", |tx| {
            let known = tx
                .query_row(
                    "SELECT thief, state FROM victim_trades WHERE trade = ?1",
                    params![trade],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()
                .map_err(db("give"))?;
            if let Some((who, state)) = known {
                if who != thief {
                    return Err(QueueError::TradeConflict {
                        trade: trade.to_owned(),
                        message: format!("belongs to {who}, not {thief}"),
                    });
                }
                if state == V_RETURNED {
                    return Ok(Vec::new());
                }
                let mut st = tx
                    .prepare_cached(
                        "SELECT job, idx, assignment FROM subtasks
                         WHERE trade = ?1 AND state IN (2, 4) ORDER BY seq DESC",
                    )
                    .map_err(db("give"))?;
                return collect_assignments(&mut st, params![trade]);
            }
            let queued: i64 = tx
                .query_row("SELECT COUNT(*) FROM subtasks WHERE state = 0", [], |r| {
                    r.get(0)
                })
                .map_err(db("give"))?;
            let half = (queued + 1) / 2;
            let n = half.min(want as i64);
            let picked = {
                let mut st = tx
                    .prepare_cached(
                        "SELECT s.job, s.idx, s.assignment FROM subtasks s
                         LEFT JOIN job_stats j ON j.job = s.job
                         WHERE s.state = 0 AND CASE
                             WHEN j.runs IS NULL OR j.runs = 0 THEN ?1 = 0
                             ELSE j.total_ms >= ?2 * j.runs END
                         ORDER BY s.seq DESC LIMIT ?3",
                    )
                    .map_err(db("give"))?;
                collect_assignments(
                    &mut st,
                    params![need_stats as i64, min_runtime_ms as i64, n],
                )?
            };
            for a in &picked {
                let at = &a.attempt;
                tx.execute(
                    "UPDATE subtasks SET state = 2, trade = ?4, since_ms = ?5
                     WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND state = 0",
                    params![at.job, at.index as i64, at.epoch, trade, now_ms as i64],
                )
                .map_err(db("give"))?;
            }
            // Recorded even when nothing was given, so that a repeated
            // request for this trade gets the same (empty) answer.
            let state = if picked.is_empty() {
                V_COMMITTED
            } else {
                V_GIVEN
            };
            tx.execute(
                "INSERT INTO victim_trades (trade, thief, state, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![trade, thief, state, now_ms as i64],
            )
            .map_err(db("give"))?;
            Ok(picked)
        })
    }

    /// Settles a `given` trade the thief received: the `attempts` it lists
    /// become `gone` (owner: the thief); any other subtask of the trade
    /// goes back to the queue. Idempotent: a committed trade changes
    /// nothing. A trade already returned is a conflict (the thief said it
    /// never received it).
    pub fn commit_given(
        &self,
        trade: &str,
        thief: &str,
        attempts: &[AttemptRef],
        now_ms: u64,
    ) -> Result<CommitResult> {
        self.tx("commit_given", |tx| {
            let (who, state) = victim_trade(tx, trade)?;
            if who != thief {
                return Err(QueueError::TradeConflict {
                    trade: trade.to_owned(),
                    message: format!("belongs to {who}, not {thief}"),
                });
            }
            match state {
                V_GIVEN => {}
                V_COMMITTED => {
                    return Ok(CommitResult {
                        repeated: true,
                        ..CommitResult::default()
                    })
                }
                _ => {
                    return Err(QueueError::TradeConflict {
                        trade: trade.to_owned(),
                        message: "its subtasks were taken back (the thief reported it aborted)"
                            .to_owned(),
                    })
                }
            }
            let mut moved = 0u32;
            for a in attempts {
                moved += tx
                    .execute(
                        "UPDATE subtasks SET state = 4, owner = ?5, since_ms = ?6
                         WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND state = 2 AND trade = ?4",
                        params![a.job, a.index as i64, a.epoch, trade, thief, now_ms as i64],
                    )
                    .map_err(db("commit_given"))? as u32;
            }
            let returned = close_victim_trade(tx, trade, V_COMMITTED, now_ms, "commit_given")?;
            bump(tx, thief, 0, moved as i64)?;
            Ok(CommitResult {
                moved,
                returned,
                repeated: false,
            })
        })
    }

    /// Takes a `given` trade's subtasks back into the queue (the thief
    /// reported it aborted or unknown). Returns how many came back; a trade
    /// no longer `given` changes nothing (0).
    pub fn take_back(&self, trade: &str, now_ms: u64) -> Result<u32> {
        self.tx("take_back", |tx| {
            let (_, state) = victim_trade(tx, trade)?;
            if state != V_GIVEN {
                return Ok(0);
            }
            close_victim_trade(tx, trade, V_RETURNED, now_ms, "take_back")
        })
    }

    /// Open (`given`) trades created at least `older_than` ago.
    pub fn given_trades(&self, older_than: Duration, now_ms: u64) -> Result<Vec<GivenTrade>> {
        let before = now_ms.saturating_sub(older_than.as_millis() as u64);
        self.tx("given_trades", |tx| {
            let mut st = tx
                .prepare_cached(
                    "SELECT v.trade, v.thief, v.created_ms,
                        (SELECT COUNT(*) FROM subtasks s WHERE s.trade = v.trade AND s.state = 2)
                     FROM victim_trades v WHERE v.state = ?1 AND v.created_ms <= ?2
                     ORDER BY v.created_ms",
                )
                .map_err(db("given_trades"))?;
            let rows = st
                .query_map(params![V_GIVEN, before as i64], |r| {
                    Ok(GivenTrade {
                        trade: r.get(0)?,
                        thief: r.get(1)?,
                        created_ms: r.get::<_, i64>(2)? as u64,
                        subtasks: r.get::<_, i64>(3)? as u32,
                    })
                })
                .map_err(db("given_trades"))?;
            rows.collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db("given_trades"))
        })
    }
}

fn encode(a: &Assignment) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(a).map_err(|e| QueueError::Encode {
        job: a.attempt.job.clone(),
        index: a.attempt.index,
        message: e.to_string(),
    })
}

fn decode(job: &str, index: u64, blob: &[u8]) -> Result<Assignment> {
    rmp_serde::from_slice(blob).map_err(|e| QueueError::Corrupt {
        job: job.to_owned(),
        index,
        message: e.to_string(),
    })
}

fn collect_assignments(
    st: &mut rusqlite::CachedStatement<'_>,
    p: impl rusqlite::Params,
) -> Result<Vec<Assignment>> {
    let rows = st
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })
        .map_err(db("give"))?;
    let mut out = Vec::new();
    for row in rows {
        let (job, idx, blob) = row.map_err(db("give"))?;
        out.push(decode(&job, idx as u64, &blob)?);
    }
    Ok(out)
}

fn items(tx: &Transaction, trade: &str) -> Result<Vec<AttemptRef>> {
    let mut st = tx
        .prepare_cached(
            "SELECT job, idx, epoch FROM thief_items WHERE trade = ?1 ORDER BY job, idx, epoch",
        )
        .map_err(db("trade items"))?;
    let rows = st
        .query_map(params![trade], |r| {
            Ok(AttemptRef {
                job: r.get(0)?,
                index: r.get::<_, i64>(1)? as u64,
                epoch: r.get(2)?,
            })
        })
        .map_err(db("trade items"))?;
    rows.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(db("trade items"))
}

fn thief_state(tx: &Transaction, trade: &str) -> Result<ThiefTrade> {
    let state = tx
        .query_row(
            "SELECT state FROM thief_trades WHERE trade = ?1",
            params![trade],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map_err(db("thief_trade"))?;
    Ok(match state {
        None => ThiefTrade::Unknown,
        Some(T_PENDING) => ThiefTrade::Pending,
        Some(T_RECEIVED) => ThiefTrade::Received(items(tx, trade)?),
        Some(_) => ThiefTrade::Aborted,
    })
}

fn victim_trade(tx: &Transaction, trade: &str) -> Result<(String, i64)> {
    tx.query_row(
        "SELECT thief, state FROM victim_trades WHERE trade = ?1",
        params![trade],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
    )
    .optional()
    .map_err(db("victim_trade"))?
    .ok_or_else(|| QueueError::UnknownTrade(trade.to_owned()))
}

fn bump(tx: &Transaction, peer: &str, stolen: i64, given: i64) -> Result<()> {
    if stolen == 0 && given == 0 {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO peer_counters (peer, stolen, given) VALUES (?1, ?2, ?3)
         ON CONFLICT (peer) DO UPDATE SET stolen = stolen + ?2, given = given + ?3",
        params![peer, stolen, given],
    )
    .map_err(db("peer counters"))?;
    Ok(())
}

#[cfg(test)]
#[path = "queue_tests.rs"]
pub(crate) mod tests;
