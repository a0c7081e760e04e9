//! [`SqliteStore`]: the [`Store`] in one SQLite file (WAL,
//! `synchronous=NORMAL`, so a commit survives a crash of the controller
//! process; the last commits may be lost only if the machine itself loses
//! power). The schema is in `schema.sql`; `PRAGMA user_version` numbers the
//! migrations applied.
//!
//! One connection behind a mutex: SQLite writes one transaction at a time
//! anyway, and hot statements are prepared once and cached.
//!
//! Planned subtasks are rows of a few integers (`lo`, `hi`: their split
//! part's bounds); [`Store::claim`] builds their specs from the job's
//! request, which it parses once and keeps in a small cache
//! ([`RequestCache`]). See `schema_v2.sql` for the layout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::{
    Assignment, AttemptRecord, AttemptState, CancelOutcome, CompletionResult, DeadSubtask,
    HostLeases, HostRecord, HostState, JobCounts, JobId, JobRecord, JobState, Outcome, ReduceState,
    Report, Result, SliceLease, SliceRecord, Store, StoreError, SubtaskRecord, SubtaskRef,
    SubtaskState,
};
use crate::job::{DispatchMode, JobRequest, Limits, SubtaskSpec};
use crate::split::{self, Part, Plan};

/// Migrations in order; `user_version` is how many have been applied.
const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
];

/// The schema version this code reads and writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

// Subtask state codes used in SQL text, as in schema.sql.
const ASSIGNED: i64 = 1;
const DONE: i64 = 2;
const DEAD: i64 = 3;
const CANCELLED: i64 = 4;

// Job dispatch modes (jobs.mode), as in schema_v3.sql.
const MODE_PUSH: i64 = 0;
const MODE_PULL: i64 = 1;
const MODE_P2P: i64 = 2;

fn mode_code(mode: DispatchMode) -> i64 {
    match mode {
        DispatchMode::Push => MODE_PUSH,
        DispatchMode::Pull => MODE_PULL,
        DispatchMode::P2p => MODE_P2P,
    }
}

/// Why an expired lease's attempt was withdrawn (kept in the attempt).
pub const LEASE_EXPIRED: &str = "lease expired";

/// Parsed requests kept by [`RequestCache`]: at most this many jobs …
const REQUEST_CACHE_ENTRIES: usize = 16;
/// … and about this many bytes of request JSON (one larger request is
/// still kept, alone, so a huge `lines` job is not parsed at every claim).
const REQUEST_CACHE_BYTES: usize = 64 << 20;

/// Tuning for [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long a write waits for another connection's lock.
    pub busy_timeout: Duration,
    /// Stdout and stderr kept per attempt; longer output is cut (its
    /// original size is still recorded).
    pub output_cap: usize,
    /// The most bytes of map output a reduce subtask may get on stdin; a
    /// job whose map outputs add up to more fails instead of running its
    /// reduce. The controller sets it to `job_limits.max_input_bytes`.
    pub max_reduce_input: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: Duration::from_secs(5),
            output_cap: 1 << 20,
            max_reduce_input: Limits::default().max_input_bytes,
        }
    }
}

/// Parsed requests of recently claimed jobs, so a claim builds specs
/// without parsing the request's JSON again. Hand-written (a map and an
/// insertion-order queue, oldest out first): claims walk jobs in priority
/// order, so a few entries almost always hit, and no crate is needed for
/// that. Requests never change, so entries are never stale.
#[derive(Default)]
struct RequestCache {
    map: HashMap<i64, (Arc<JobRequest>, usize)>,
    order: VecDeque<i64>,
    bytes: usize,
}

impl RequestCache {
    fn get(&self, seq: i64) -> Option<Arc<JobRequest>> {
        self.map.get(&seq).map(|(r, _)| Arc::clone(r))
    }

    fn insert(&mut self, seq: i64, req: Arc<JobRequest>, bytes: usize) {
        if self.map.insert(seq, (req, bytes)).is_some() {
            return;
        }
        self.order.push_back(seq);
        self.bytes += bytes;
        while self.order.len() > 1
            && (self.order.len() > REQUEST_CACHE_ENTRIES || self.bytes > REQUEST_CACHE_BYTES)
        {
            if let Some(old) = self.order.pop_front() {
                if let Some((_, b)) = self.map.remove(&old) {
                    self.bytes -= b;
                }
            }
        }
    }
}

/// The embedded store. See the module docs.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    opts: StoreOptions,
    requests: Mutex<RequestCache>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl From<rusqlite::Error> for StoreError {
    /// Filled in with the operation and id by `SqliteStore::run`.
    fn from(source: rusqlite::Error) -> Self {
        StoreError::Db {
            op: "",
            about: String::new(),
            source,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `j-17` → 17. Anything else names no job in this store.
fn job_seq(job: &JobId) -> Result<i64> {
    job.0
        .strip_prefix("j-")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| StoreError::JobNotFound(job.clone()))
}

fn job_id(seq: i64) -> JobId {
    JobId(format!("j-{seq}"))
}

fn bad_column(idx: usize, ty: Type, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, msg.into())
}

/// A job row with its reduce subtask's state (NULL when it has none yet);
/// callers append `WHERE`/`ORDER BY` on `j`.
const JOB_SELECT: &str = "SELECT j.seq, j.name, j.state, j.priority, j.max_attempts, \
     j.created_ms, j.started_ms, j.finished_ms, j.n_total, j.n_queued, j.n_assigned, j.n_done, \
     j.n_dead, j.n_cancelled, j.n_map, j.has_reduce, j.error, r.state \
     FROM jobs j LEFT JOIN subtasks r ON j.has_reduce = 1 AND r.job = j.seq AND r.idx = j.n_map";

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = row.get(2)?;
    let state = JobState::parse(&state)
        .ok_or_else(|| bad_column(2, Type::Text, format!("unknown job state {state:?}")))?;
    let reduce = if row.get::<_, bool>(15)? {
        Some(match row.get::<_, Option<i64>>(17)? {
            Some(code) => SubtaskState::from_code(code)
                .ok_or_else(|| {
                    bad_column(17, Type::Integer, format!("unknown subtask state {code}"))
                })?
                .into(),
            None if state.is_terminal() => ReduceState::Skipped,
            None => ReduceState::Waiting,
        })
    } else {
        None
    };
    Ok(JobRecord {
        id: job_id(row.get(0)?),
        name: row.get(1)?,
        state,
        priority: row.get(3)?,
        max_attempts: row.get(4)?,
        created_ms: row.get(5)?,
        started_ms: row.get(6)?,
        finished_ms: row.get(7)?,
        counts: JobCounts {
            total: row.get(8)?,
            queued: row.get(9)?,
            assigned: row.get(10)?,
            done: row.get(11)?,
            dead: row.get(12)?,
            cancelled: row.get(13)?,
        },
        map_subtasks: row.get(14)?,
        reduce,
        error: row.get(16)?,
    })
}

const ATTEMPT_COLUMNS: &str = "a.idx, a.attempt, a.host, a.state, a.started_ms, a.finished_ms, \
     a.exit_code, a.error, a.stdout, a.stdout_size, a.stderr, a.stderr_size, a.duration_ms";

fn attempt_from_row(row: &Row<'_>) -> rusqlite::Result<AttemptRecord> {
    let state: i64 = row.get(3)?;
    let state = AttemptState::from_code(state)
        .ok_or_else(|| bad_column(3, Type::Integer, format!("unknown attempt state {state}")))?;
    Ok(AttemptRecord {
        index: row.get(0)?,
        attempt: row.get(1)?,
        host: row.get(2)?,
        state,
        started_ms: row.get(4)?,
        finished_ms: row.get(5)?,
        exit_code: row.get(6)?,
        error: row.get(7)?,
        stdout: row.get::<_, Option<Vec<u8>>>(8)?.unwrap_or_default(),
        stdout_size: row.get::<_, Option<u64>>(9)?.unwrap_or(0),
        stderr: row.get::<_, Option<Vec<u8>>>(10)?.unwrap_or_default(),
        stderr_size: row.get::<_, Option<u64>>(11)?.unwrap_or(0),
        duration_ms: row.get(12)?,
    })
}

/// A queued subtask as `claim` reads it: `epoch, idx, lo, hi, argv, env,
/// stdin`.
struct Picked {
    epoch: u32,
    index: u64,
    bounds: Option<(i64, i64)>,
    argv: Option<String>,
    env: Option<String>,
    stdin: Option<Vec<u8>>,
}

fn picked_from_row(row: &Row<'_>) -> rusqlite::Result<Picked> {
    let lo: Option<i64> = row.get(2)?;
    let hi: Option<i64> = row.get(3)?;
    Ok(Picked {
        epoch: row.get(0)?,
        index: row.get(1)?,
        bounds: lo.zip(hi),
        argv: row.get(4)?,
        env: row.get(5)?,
        stdin: row.get(6)?,
    })
}

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt {
        op: "",
        about: String::new(),
        detail,
    }
}

/// An explicit spec from its stored columns.
fn explicit_spec(
    index: u64,
    argv: &str,
    env: Option<&str>,
    stdin: Option<Vec<u8>>,
) -> Result<SubtaskSpec> {
    let argv: Vec<String> =
        serde_json::from_str(argv).map_err(|e| corrupt(format!("subtask {index}: argv: {e}")))?;
    let env = match env {
        Some(env) => {
            serde_json::from_str(env).map_err(|e| corrupt(format!("subtask {index}: env: {e}")))?
        }
        None => BTreeMap::new(),
    };
    Ok(SubtaskSpec {
        index,
        argv,
        env,
        stdin: stdin.unwrap_or_default(),
    })
}

/// The job's request, from `cache` or parsed from the jobs row.
fn cached_request(
    tx: &Transaction<'_>,
    cache: &Mutex<RequestCache>,
    seq: i64,
) -> Result<Arc<JobRequest>> {
    if let Some(req) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(seq) {
        return Ok(req);
    }
    let text: String = tx
        .prepare_cached("SELECT request FROM jobs WHERE seq = ?1")?
        .query_row([seq], |r| r.get(0))?;
    let req: JobRequest = serde_json::from_str(&text)
        .map_err(|e| corrupt(format!("job {}: request JSON: {e}", job_id(seq))))?;
    let req = Arc::new(req);
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(seq, Arc::clone(&req), text.len());
    Ok(req)
}

/// The accepted map outputs of job `seq` concatenated in index order: the
/// reduce subtask's stdin. Every map subtask is done when this is asked.
fn map_outputs(tx: &Transaction<'_>, seq: i64, n_map: u64) -> Result<Vec<u8>> {
    let mut stmt = tx.prepare_cached(
        "SELECT a.stdout FROM subtasks s JOIN attempts a \
         ON a.job = s.job AND a.idx = s.idx AND a.attempt = s.epoch \
         WHERE s.job = ?1 AND s.idx < ?2 AND s.state = 2 ORDER BY s.idx",
    )?;
    let mut rows = stmt.query(params![seq, n_map])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let bytes = row
            .get_ref(0)?
            .as_blob_or_null()
            .map_err(|e| bad_column(0, Type::Blob, format!("stdout: {e}")))?;
        if let Some(bytes) = bytes {
            out.extend_from_slice(bytes);
        }
    }
    Ok(out)
}

/// Why a job's reduce must not run on its map outputs, if it must not: a
/// cut output (stored bytes fewer than the reported size), or outputs that
/// add up to more than `max_input` bytes.
fn reduce_refusal(
    tx: &Transaction<'_>,
    seq: i64,
    n_map: u64,
    max_input: u64,
) -> Result<Option<String>> {
    let (total, cut): (i64, Option<u64>) = tx
        .prepare_cached(
            "SELECT ifnull(sum(length(a.stdout)), 0), \
             min(CASE WHEN ifnull(a.stdout_size, 0) > ifnull(length(a.stdout), 0) THEN s.idx END) \
             FROM subtasks s JOIN attempts a \
             ON a.job = s.job AND a.idx = s.idx AND a.attempt = s.epoch \
             WHERE s.job = ?1 AND s.idx < ?2 AND s.state = 2",
        )?
        .query_row(params![seq, n_map], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if let Some(index) = cut {
        let (kept, size): (i64, i64) = tx
            .prepare_cached(
                "SELECT ifnull(length(a.stdout), 0), a.stdout_size FROM subtasks s JOIN attempts a \
                 ON a.job = s.job AND a.idx = s.idx AND a.attempt = s.epoch \
                 WHERE s.job = ?1 AND s.idx = ?2",
            )?
            .query_row(params![seq, index], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if kept == 0 {
            // Nothing inline of a non-empty output: the agent uploaded it
            // whole as a file (over what it sends inline), which the
            // reduce's stdin is not built from.
            return Ok(Some(format!(
                "reduce not run: the output of subtask {index} ({size} bytes) is kept as a \
                 file (an output over the 1 MiB sent inline is uploaded whole), and a reduce \
                 reads map outputs kept inline only; fetch the outputs with `sparegrid results \
                 ID --output DIR`"
            )));
        }
        return Ok(Some(format!(
            "reduce not run: the output of subtask {index} was cut to {kept} of its {size} \
             bytes (an output cap of the agent or the controller), so the reduce would have \
             run on partial input"
        )));
    }
    if total as u64 > max_input {
        return Ok(Some(format!(
            "reduce not run: the map outputs add up to {total} bytes, over the reduce input \
             limit of {max_input} bytes (job_limits.max_input_bytes)"
        )));
    }
    Ok(None)
}

/// After map subtask `index` of job `seq` became done: when it was the last
/// one and the job has a reduce step, adds the reduce subtask (index
/// `n_map`), queued, or dead with the reason when [`reduce_refusal`] says
/// it must not run. Runs in the completion's transaction, and only when
/// every map is done and no reduce exists yet (`n_total == n_map`), so the
/// reduce is added exactly once.
fn maybe_enqueue_reduce(tx: &Transaction<'_>, seq: i64, index: u64, max_input: u64) -> Result<()> {
    let (n_map, has_reduce, total, done): (u64, bool, u64, u64) = tx
        .prepare_cached("SELECT n_map, has_reduce, n_total, n_done FROM jobs WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    if !has_reduce || index >= n_map || total != n_map || done != n_map {
        return Ok(());
    }
    match reduce_refusal(tx, seq, n_map, max_input)? {
        None => {
            tx.prepare_cached("INSERT INTO subtasks (job, idx) VALUES (?1, ?2)")?
                .execute(params![seq, n_map])?;
            tx.prepare_cached(
                "UPDATE jobs SET n_total = n_total + 1, n_queued = n_queued + 1 WHERE seq = ?1",
            )?
            .execute([seq])?;
            tracing::info!(job = %job_id(seq), index = n_map, "map subtasks done; reduce queued");
        }
        Some(error) => {
            tx.prepare_cached(
                "INSERT INTO subtasks (job, idx, state, error) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![seq, n_map, DEAD, error])?;
            tx.prepare_cached(
                "UPDATE jobs SET n_total = n_total + 1, n_dead = n_dead + 1, error = ?2 \
                 WHERE seq = ?1",
            )?
            .execute(params![seq, error])?;
            tracing::warn!(job = %job_id(seq), "{error}");
        }
    }
    Ok(())
}

/// Changes to a job's subtask counts, applied in one statement.
#[derive(Default, Clone, Copy)]
struct Delta {
    queued: i64,
    assigned: i64,
    done: i64,
    dead: i64,
    cancelled: i64,
}

fn apply(tx: &Transaction<'_>, seq: i64, d: Delta) -> Result<()> {
    tx.prepare_cached(
        "UPDATE jobs SET n_queued = n_queued + ?2, n_assigned = n_assigned + ?3, \
         n_done = n_done + ?4, n_dead = n_dead + ?5, n_cancelled = n_cancelled + ?6 \
         WHERE seq = ?1",
    )?
    .execute(params![
        seq,
        d.queued,
        d.assigned,
        d.done,
        d.dead,
        d.cancelled
    ])?;
    Ok(())
}

/// Moves a job to done or failed when its counts say so; returns its state.
fn rollup(tx: &Transaction<'_>, seq: i64, now: i64) -> Result<JobState> {
    let (state, total, queued, assigned, done, dead): (String, i64, i64, i64, i64, i64) = tx
        .prepare_cached(
            "SELECT state, n_total, n_queued, n_assigned, n_done, n_dead FROM jobs WHERE seq = ?1",
        )?
        .query_row([seq], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
    let current = JobState::parse(&state).ok_or_else(|| StoreError::Corrupt {
        op: "",
        about: String::new(),
        detail: format!("unknown job state {state:?}"),
    })?;
    if current.is_terminal() {
        return Ok(current);
    }
    let next = if done == total {
        JobState::Done
    } else if queued + assigned == 0 && dead > 0 {
        JobState::Failed
    } else {
        current
    };
    if next != current {
        tx.prepare_cached("UPDATE jobs SET state = ?2, finished_ms = ?3 WHERE seq = ?1")?
            .execute(params![seq, next.as_str(), now])?;
        tracing::info!(job = %job_id(seq), state = %next, "job finished");
    }
    Ok(next)
}

/// Puts one assigned subtask back in the queue and closes its attempt.
fn requeue_one(
    tx: &Transaction<'_>,
    seq: i64,
    index: u64,
    epoch: u32,
    reason: &str,
    now: i64,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE subtasks SET state = 0, host = NULL, lease_expires_ms = NULL \
         WHERE job = ?1 AND idx = ?2",
    )?
    .execute(params![seq, index])?;
    withdraw_attempt(tx, seq, index, epoch, reason, now)
}

/// Marks running attempt `epoch` withdrawn with `reason` (not a failure).
fn withdraw_attempt(
    tx: &Transaction<'_>,
    seq: i64,
    index: u64,
    epoch: u32,
    reason: &str,
    now: i64,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE attempts SET state = ?4, finished_ms = ?5, error = ?6 \
         WHERE job = ?1 AND idx = ?2 AND attempt = ?3 AND state = 0",
    )?
    .execute(params![
        seq,
        index,
        epoch,
        AttemptState::Withdrawn.code(),
        now,
        reason
    ])?;
    Ok(())
}

/// Requeues everything assigned to `host`, except peer-to-peer seeds: those
/// live in the agents' durable queues and may have moved to other peers,
/// so the controller only waits for their completions.
fn requeue_host_tx(tx: &Transaction<'_>, host: &str, reason: &str) -> Result<Vec<SubtaskRef>> {
    let now = now_ms();
    let rows: Vec<(i64, u64, u32)> = tx
        .prepare_cached(
            "SELECT job, idx, epoch FROM subtasks WHERE host = ?1 AND state = 1 \
             AND job NOT IN (SELECT seq FROM jobs WHERE mode = ?2)",
        )?
        .query_map(params![host, MODE_P2P], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut per_job: BTreeMap<i64, i64> = BTreeMap::new();
    for &(seq, index, epoch) in &rows {
        requeue_one(tx, seq, index, epoch, reason, now)?;
        *per_job.entry(seq).or_default() += 1;
    }
    for (seq, n) in per_job {
        apply(
            tx,
            seq,
            Delta {
                queued: n,
                assigned: -n,
                ..Delta::default()
            },
        )?;
    }
    if !rows.is_empty() {
        tracing::info!(host, subtasks = rows.len(), reason, "subtasks requeued");
    }
    Ok(rows
        .into_iter()
        .map(|(seq, index, epoch)| SubtaskRef {
            job: job_id(seq),
            index,
            epoch,
            host: Some(host.to_owned()),
        })
        .collect())
}

fn job_exists(conn: &Connection, seq: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM jobs WHERE seq = ?1")?
        .query_row([seq], |_| Ok(()))
        .optional()?
        .is_some())
}

/// JobNotFound, or SubtaskNotFound when the job exists.
fn missing_subtask(conn: &Connection, job: &JobId, seq: i64, index: u64) -> StoreError {
    match job_exists(conn, seq) {
        Ok(true) => StoreError::SubtaskNotFound {
            job: job.clone(),
            index,
        },
        Ok(false) => StoreError::JobNotFound(job.clone()),
        Err(e) => e,
    }
}

fn cap(bytes: &[u8], limit: usize) -> &[u8] {
    &bytes[..bytes.len().min(limit)]
}

/// Records one completion inside `tx`; see [`Store::complete`].
fn complete_tx(
    tx: &Transaction<'_>,
    opts: &StoreOptions,
    job: &JobId,
    seq: i64,
    index: u64,
    epoch: u32,
    outcome: &Outcome,
) -> Result<CompletionResult> {
    let row: Option<(i64, u32, u32, u32, bool, u64)> = tx
        .prepare_cached(
            "SELECT s.state, s.epoch, s.failures, j.max_attempts, j.has_reduce, j.n_map \
                 FROM subtasks s JOIN jobs j ON j.seq = s.job \
                 WHERE s.job = ?1 AND s.idx = ?2",
        )?
        .query_row(params![seq, index], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    let Some((state, current, failures, max_attempts, has_reduce, n_map)) = row else {
        return Err(missing_subtask(tx, job, seq, index));
    };
    if state == DONE {
        return Ok(CompletionResult::Duplicate);
    }
    if state != ASSIGNED || current != epoch {
        // Already reported (a failure that was requeued, or the
        // last failure of a dead subtask)? Otherwise the attempt
        // was withdrawn, cancelled, superseded or never existed.
        let reported: Option<i64> = tx
            .prepare_cached(
                "SELECT state FROM attempts WHERE job = ?1 AND idx = ?2 AND attempt = ?3",
            )?
            .query_row(params![seq, index, epoch], |r| r.get(0))
            .optional()?;
        let finished = [AttemptState::Succeeded.code(), AttemptState::Failed.code()];
        return Ok(match reported {
            Some(s) if finished.contains(&s) => CompletionResult::Duplicate,
            _ => CompletionResult::Stale,
        });
    }

    let ok = outcome.succeeded();
    let error = match (&outcome.error, ok) {
        (Some(e), _) => Some(e.clone()),
        (None, true) => None,
        (None, false) => Some(match outcome.exit_code {
            Some(code) => format!("exited with code {code}"),
            None => "ended without an exit code".to_owned(),
        }),
    };
    let attempt_state = if ok {
        AttemptState::Succeeded
    } else {
        AttemptState::Failed
    };
    let now = now_ms();
    tx.prepare_cached(
        "UPDATE attempts SET state = ?4, finished_ms = ?5, exit_code = ?6, error = ?7, \
             stdout = ?8, stdout_size = ?9, stderr = ?10, stderr_size = ?11, \
             duration_ms = ?12 WHERE job = ?1 AND idx = ?2 AND attempt = ?3",
    )?
    .execute(params![
        seq,
        index,
        epoch,
        attempt_state.code(),
        now,
        outcome.exit_code,
        error,
        cap(&outcome.stdout, opts.output_cap),
        outcome.stdout_size.max(outcome.stdout.len() as u64),
        cap(&outcome.stderr, opts.output_cap),
        outcome.stderr_size.max(outcome.stderr.len() as u64),
        outcome.duration_ms,
    ])?;

    let (next, delta) = if ok {
        (
            SubtaskState::Done,
            Delta {
                done: 1,
                ..Delta::default()
            },
        )
    } else if failures + 1 >= max_attempts.max(1) {
        (
            SubtaskState::Dead,
            Delta {
                dead: 1,
                ..Delta::default()
            },
        )
    } else {
        (
            SubtaskState::Queued,
            Delta {
                queued: 1,
                ..Delta::default()
            },
        )
    };
    let failures = failures + u32::from(!ok);
    if next == SubtaskState::Queued {
        tx.prepare_cached(
            "UPDATE subtasks SET state = ?3, failures = ?4, host = NULL, \
                 lease_expires_ms = NULL WHERE job = ?1 AND idx = ?2",
        )?
        .execute(params![seq, index, next.code(), failures])?;
    } else {
        tx.prepare_cached(
            "UPDATE subtasks SET state = ?3, failures = ?4, lease_expires_ms = NULL \
             WHERE job = ?1 AND idx = ?2",
        )?
        .execute(params![seq, index, next.code(), failures])?;
    }
    if next == SubtaskState::Dead {
        tracing::info!(job = %job, index, failures, "subtask dead");
    }
    apply(
        tx,
        seq,
        Delta {
            assigned: -1,
            ..delta
        },
    )?;
    if next == SubtaskState::Done && has_reduce && index < n_map {
        maybe_enqueue_reduce(tx, seq, index, opts.max_reduce_input)?;
    }
    let job_state = rollup(tx, seq, now)?;
    Ok(CompletionResult::Accepted {
        subtask: next,
        job: job_state,
    })
}

impl SqliteStore {
    /// Opens (or creates) the store at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        SqliteStore::open_with(path, StoreOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, opts: StoreOptions) -> Result<SqliteStore> {
        let path = path.as_ref();
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        SqliteStore::setup(conn, path.to_owned(), opts)
    }

    /// A private store in memory, for tests.
    pub fn open_in_memory() -> Result<SqliteStore> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        SqliteStore::setup(conn, path, StoreOptions::default())
    }

    fn setup(mut conn: Connection, path: PathBuf, opts: StoreOptions) -> Result<SqliteStore> {
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(64);

        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(open_err)?;
            tx.execute_batch(sql).map_err(open_err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(open_err)?;
            tx.commit().map_err(open_err)?;
            tracing::info!(path = %path.display(), version = i + 1, "store schema migrated");
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            opts,
            requests: Mutex::new(RequestCache::default()),
        })
    }

    /// Runs `f` on the connection; database errors get `op` and `about`.
    fn run<T>(
        &self,
        op: &'static str,
        about: &dyn Display,
        f: impl FnOnce(&mut Connection) -> Result<T>,
    ) -> Result<T> {
        // A panic inside `f` rolled its transaction back when it unwound, so
        // a poisoned connection is still consistent.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|e| match e {
            StoreError::Db { op: "", source, .. } => StoreError::Db {
                op,
                about: about.to_string(),
                source,
            },
            StoreError::Corrupt { op: "", detail, .. } => StoreError::Corrupt {
                op,
                about: about.to_string(),
                detail,
            },
            other => other,
        })
    }

    fn write<T>(
        &self,
        op: &'static str,
        about: &dyn Display,
        f: impl FnOnce(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.run(op, about, |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }
}

impl SqliteStore {
    /// Claims up to `n` queued subtasks of `mode` jobs for `host` (see
    /// [`Store::claim`]); `lease_expires` is set on each (pull mode).
    fn claim_tx(
        &self,
        tx: &Transaction<'_>,
        host: &str,
        n: usize,
        mode: i64,
        lease_expires: Option<i64>,
        now: i64,
    ) -> Result<Vec<Assignment>> {
        {
            let state: String = tx
                .prepare_cached("SELECT state FROM hosts WHERE id = ?1")?
                .query_row([host], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::HostNotFound(host.to_owned()))?;
            if HostState::parse(&state) != Some(HostState::Active) {
                return Err(StoreError::HostLost(host.to_owned()));
            }
            let mut out = Vec::new();
            if n == 0 {
                return Ok(out);
            }
            // Overlay jobs only for a host that holds a slice and registered
            // a tunnel (network 0 is none, 1 overlay).
            let max_network = i64::from(overlay::host_has_tunnel(tx, host)?);
            let jobs: Vec<(i64, String, u64, bool, i64)> = tx
                .prepare_cached(
                    "SELECT seq, state, n_map, has_reduce, network FROM jobs \
                     WHERE state IN ('queued', 'running') AND n_queued > 0 AND mode = ?1 \
                     AND network <= ?2 ORDER BY priority DESC, seq",
                )?
                .query_map([mode, max_network], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut pick = tx.prepare_cached(
                "SELECT epoch, idx, lo, hi, argv, env, stdin FROM subtasks \
                 INDEXED BY subtasks_queued WHERE job = ?1 AND state = 0 ORDER BY idx LIMIT ?2",
            )?;
            // The picked rows are the job's lowest queued indices, so "queued
            // and idx <= the last one picked" names exactly them: one
            // set-based INSERT and UPDATE per job instead of two statements
            // per subtask (claim is the dispatcher's hot path). INDEXED BY:
            // without statistics SQLite walks the primary key from index 0
            // over every assigned and done row instead, which makes each
            // claim O(job size); the queue index starts at the first queued
            // row (and SQLite refuses the statement if it cannot use it).
            let mut attempts = tx.prepare_cached(
                "INSERT INTO attempts (job, idx, attempt, host, state, started_ms) \
                 SELECT job, idx, epoch + 1, ?3, 0, ?4 FROM subtasks INDEXED BY subtasks_queued \
                 WHERE job = ?1 AND state = 0 AND idx <= ?2",
            )?;
            let mut assign = tx.prepare_cached(
                "UPDATE subtasks INDEXED BY subtasks_queued \
                 SET state = 1, epoch = epoch + 1, host = ?3, lease_expires_ms = ?4 \
                 WHERE job = ?1 AND state = 0 AND idx <= ?2",
            )?;
            for (seq, state, n_map, has_reduce, network) in jobs {
                let want = n - out.len();
                if want == 0 {
                    break;
                }
                let picked: Vec<Picked> = pick
                    .query_map(params![seq, want as i64], picked_from_row)?
                    .collect::<rusqlite::Result<_>>()?;
                let Some(last) = picked.last().map(|p| p.index) else {
                    continue;
                };
                let k = picked.len() as i64;
                for p in picked {
                    let (index, epoch) = (p.index, p.epoch + 1);
                    let spec = self.spec_for(tx, seq, n_map, has_reduce, p)?;
                    out.push(Assignment {
                        job: job_id(seq),
                        index,
                        epoch,
                        spec,
                        network: overlay::network_of(network),
                    });
                }
                let started = attempts.execute(params![seq, last, host, now])?;
                let assigned = assign.execute(params![seq, last, host, lease_expires])?;
                if started as i64 != k || assigned as i64 != k {
                    return Err(corrupt(format!(
                        "job {}: claimed {k} subtasks up to index {last} but started \
                         {started} attempts and assigned {assigned}",
                        job_id(seq)
                    )));
                }
                apply(
                    tx,
                    seq,
                    Delta {
                        queued: -k,
                        assigned: k,
                        ..Delta::default()
                    },
                )?;
                if state == "queued" && k > 0 {
                    tx.prepare_cached(
                        "UPDATE jobs SET state = 'running', started_ms = ?2 WHERE seq = ?1",
                    )?
                    .execute(params![seq, now])?;
                    tracing::info!(job = %job_id(seq), "job running");
                }
            }
            Ok(out)
        }
    }

    /// The spec of a claimed subtask: stored explicitly, the reduce (its
    /// stdin read now), or built from the job's request and the part's
    /// bounds. Stored data that does not fit the request is `Corrupt`.
    fn spec_for(
        &self,
        tx: &Transaction<'_>,
        seq: i64,
        n_map: u64,
        has_reduce: bool,
        p: Picked,
    ) -> Result<SubtaskSpec> {
        let index = p.index;
        if let Some(argv) = &p.argv {
            return explicit_spec(index, argv, p.env.as_deref(), p.stdin);
        }
        let req = cached_request(tx, &self.requests, seq)?;
        let what = || format!("job {} subtask {index}", job_id(seq));
        if has_reduce && index == n_map {
            let stdin = map_outputs(tx, seq, n_map)?;
            return split::reduce_subtask(&req, n_map, stdin)
                .ok_or_else(|| corrupt(format!("{}: a reduce without a reduce command", what())));
        }
        let (lo, hi) = p
            .bounds
            .ok_or_else(|| corrupt(format!("{}: neither a spec nor a part", what())))?;
        let part = Part::from_bounds(&req, lo, hi).ok_or_else(|| {
            corrupt(format!(
                "{}: part bounds {lo}..{hi} do not fit the request's split",
                what()
            ))
        })?;
        Ok(split::materialise(&req, index, n_map, part))
    }

    /// Inserts the jobs row (with `n` map subtasks counted as queued) and
    /// then the subtasks with `insert_subtasks`, which returns how many it
    /// inserted; `n` may be 0 when only that count knows it. All in one
    /// transaction: an error from `insert_subtasks` leaves nothing.
    fn insert_job(
        &self,
        req: &JobRequest,
        n: u64,
        insert_subtasks: impl FnOnce(&Transaction<'_>, i64) -> Result<u64>,
    ) -> Result<JobId> {
        let name = req.name.clone();
        let request = serde_json::to_string(req).map_err(|source| StoreError::Encode {
            name: name.clone(),
            source,
        })?;
        let seq = self.write("create_job", &format_args!("job {name:?}"), |tx| {
            tx.execute(
                "INSERT INTO jobs (name, request, state, priority, max_attempts, created_ms, \
                 n_total, n_queued, n_map, has_reduce, mode, network) \
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?6, ?6, ?7, ?8, ?9)",
                params![
                    req.name,
                    request,
                    req.priority,
                    req.max_attempts.max(1),
                    now_ms(),
                    n,
                    req.reduce.is_some(),
                    mode_code(req.mode),
                    overlay::network_code(req.network),
                ],
            )?;
            let seq = tx.last_insert_rowid();
            let inserted = insert_subtasks(tx, seq)?;
            if inserted == 0 {
                return Err(StoreError::EmptyJob { name: name.clone() });
            }
            if inserted != n {
                tx.execute(
                    "UPDATE jobs SET n_total = ?2, n_queued = ?2, n_map = ?2 WHERE seq = ?1",
                    params![seq, inserted],
                )?;
            }
            tracing::info!(job = %job_id(seq), name = %name, subtasks = inserted,
                reduce = req.reduce.is_some(), "job created");
            Ok(seq)
        })?;
        Ok(job_id(seq))
    }
}

impl Store for SqliteStore {
    fn create_planned_job(&self, req: &JobRequest) -> Result<JobId> {
        let plan = Plan::new(req).map_err(|source| StoreError::Unplannable {
            name: req.name.clone(),
            source,
        })?;
        self.insert_job(req, plan.count(), |tx, seq| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO subtasks (job, idx, lo, hi) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut n = 0u64;
            for (index, part) in plan.parts() {
                let (lo, hi) = part.bounds();
                insert.execute(params![seq, index, lo, hi])?;
                n += 1;
            }
            Ok(n)
        })
    }

    fn create_job(
        &self,
        req: &JobRequest,
        subtasks: &mut dyn Iterator<Item = SubtaskSpec>,
    ) -> Result<JobId> {
        let name = req.name.clone();
        let encode = |source| StoreError::Encode {
            name: name.clone(),
            source,
        };
        self.insert_job(req, 0, |tx, seq| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO subtasks (job, idx, argv, env, stdin) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut n: u64 = 0;
            for spec in subtasks {
                if spec.index != n {
                    return Err(StoreError::BadIndex {
                        name: name.clone(),
                        expected: n,
                        found: spec.index,
                    });
                }
                let argv = serde_json::to_string(&spec.argv).map_err(encode)?;
                let env = if spec.env.is_empty() {
                    None
                } else {
                    Some(serde_json::to_string(&spec.env).map_err(encode)?)
                };
                let stdin = (!spec.stdin.is_empty()).then_some(&spec.stdin[..]);
                insert.execute(params![seq, n, argv, env, stdin])?;
                n += 1;
            }
            Ok(n)
        })
    }

    fn get_job(&self, job: &JobId) -> Result<JobRecord> {
        let seq = job_seq(job)?;
        self.run("get_job", job, |conn| {
            conn.prepare_cached(&format!("{JOB_SELECT} WHERE j.seq = ?1"))?
                .query_row([seq], job_from_row)
                .optional()?
                .ok_or_else(|| StoreError::JobNotFound(job.clone()))
        })
    }

    fn job_request(&self, job: &JobId) -> Result<JobRequest> {
        let seq = job_seq(job)?;
        self.run("job_request", job, |conn| {
            let text: String = conn
                .prepare_cached("SELECT request FROM jobs WHERE seq = ?1")?
                .query_row([seq], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::JobNotFound(job.clone()))?;
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                op: "",
                about: String::new(),
                detail: format!("request JSON: {e}"),
            })
        })
    }

    fn list_jobs(&self, state: Option<JobState>, limit: usize) -> Result<Vec<JobRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("list_jobs", &"all jobs", |conn| {
            let rows = match state {
                Some(state) => conn
                    .prepare_cached(&format!(
                        "{JOB_SELECT} WHERE j.state = ?1 ORDER BY j.seq DESC LIMIT ?2"
                    ))?
                    .query_map(params![state.as_str(), limit], job_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
                None => conn
                    .prepare_cached(&format!("{JOB_SELECT} ORDER BY j.seq DESC LIMIT ?1"))?
                    .query_map([limit], job_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            };
            Ok(rows)
        })
    }

    fn cancel_job(&self, job: &JobId) -> Result<CancelOutcome> {
        let seq = job_seq(job)?;
        self.write("cancel_job", job, |tx| {
            let state: String = tx
                .query_row("SELECT state FROM jobs WHERE seq = ?1", [seq], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::JobNotFound(job.clone()))?;
            let active = matches!(
                JobState::parse(&state),
                Some(JobState::Queued | JobState::Running)
            );
            if !active {
                return Ok(CancelOutcome {
                    changed: false,
                    dropped_queued: 0,
                    stop: Vec::new(),
                });
            }
            let now = now_ms();
            let stop: Vec<SubtaskRef> = tx
                .prepare(
                    "SELECT idx, epoch, host FROM subtasks WHERE job = ?1 AND state = 1 \
                     ORDER BY idx",
                )?
                .query_map([seq], |r| {
                    Ok(SubtaskRef {
                        job: job.clone(),
                        index: r.get(0)?,
                        epoch: r.get(1)?,
                        host: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            tx.execute(
                "UPDATE attempts SET state = ?2, finished_ms = ?3, error = 'job cancelled' \
                 WHERE state = 0 AND (job, idx, attempt) IN \
                 (SELECT job, idx, epoch FROM subtasks WHERE job = ?1 AND state = 1)",
                params![seq, AttemptState::Cancelled.code(), now],
            )?;
            let dropped_queued = tx.execute(
                "UPDATE subtasks SET state = ?2 WHERE job = ?1 AND state = 0",
                params![seq, CANCELLED],
            )? as u64;
            tx.execute(
                "UPDATE subtasks SET state = ?2 WHERE job = ?1 AND state = 1",
                params![seq, CANCELLED],
            )?;
            tx.execute(
                "UPDATE jobs SET state = 'cancelled', finished_ms = ?2, \
                 n_cancelled = n_cancelled + n_queued + n_assigned, n_queued = 0, n_assigned = 0 \
                 WHERE seq = ?1",
                params![seq, now],
            )?;
            tracing::info!(job = %job, dropped_queued, running = stop.len(), "job cancelled");
            Ok(CancelOutcome {
                changed: true,
                dropped_queued,
                stop,
            })
        })
    }

    fn claim(&self, host: &str, n: usize) -> Result<Vec<Assignment>> {
        self.write("claim", &format_args!("host {host}"), |tx| {
            self.claim_tx(tx, host, n, MODE_PUSH, None, now_ms())
        })
    }

    fn claim_seeds(&self, host: &str, n: usize) -> Result<Vec<Assignment>> {
        self.write("claim_seeds", &format_args!("host {host}"), |tx| {
            self.claim_tx(tx, host, n, MODE_P2P, None, now_ms())
        })
    }

    fn p2p_active(&self) -> Result<bool> {
        self.run("p2p_active", &"jobs", |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT 1 FROM jobs WHERE mode = ?1 AND state IN ('queued', 'running') LIMIT 1",
                )?
                .query_row([MODE_P2P], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    fn claim_leases(
        &self,
        host: &str,
        n: usize,
        ttl: Duration,
        now: i64,
    ) -> Result<Vec<Assignment>> {
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.write("claim_leases", &format_args!("host {host}"), |tx| {
            self.claim_tx(tx, host, n, MODE_PULL, Some(expires), now)
        })
    }

    fn renew_leases(
        &self,
        host: &str,
        leases: &[(JobId, u64, u32)],
        ttl: Duration,
        now: i64,
    ) -> Result<Vec<bool>> {
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.write(
            "renew_leases",
            &format_args!("host {host}, {} leases", leases.len()),
            |tx| {
                // Only a lease that is still this host's current attempt and
                // has not expired yet (swept or not) is renewed.
                let mut renew = tx.prepare_cached(
                    "UPDATE subtasks SET lease_expires_ms = ?5 \
                     WHERE job = ?1 AND idx = ?2 AND epoch = ?3 AND host = ?4 AND state = 1 \
                     AND lease_expires_ms IS NOT NULL AND lease_expires_ms >= ?6",
                )?;
                let mut out = Vec::with_capacity(leases.len());
                for (job, index, epoch) in leases {
                    let Ok(seq) = job_seq(job) else {
                        out.push(false);
                        continue;
                    };
                    out.push(renew.execute(params![seq, index, epoch, host, expires, now])? == 1);
                }
                Ok(out)
            },
        )
    }

    fn expire_leases(&self, now: i64) -> Result<Vec<SubtaskRef>> {
        self.write("expire_leases", &format_args!("at {now}"), |tx| {
            let rows: Vec<(i64, u64, u32, Option<String>)> = tx
                .prepare_cached(
                    "SELECT job, idx, epoch, host FROM subtasks INDEXED BY subtasks_leases \
                     WHERE state = 1 AND lease_expires_ms IS NOT NULL AND lease_expires_ms < ?1",
                )?
                .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut per_job: BTreeMap<i64, i64> = BTreeMap::new();
            for (seq, index, epoch, _) in &rows {
                requeue_one(tx, *seq, *index, *epoch, LEASE_EXPIRED, now)?;
                *per_job.entry(*seq).or_default() += 1;
            }
            for (seq, n) in per_job {
                apply(
                    tx,
                    seq,
                    Delta {
                        queued: n,
                        assigned: -n,
                        ..Delta::default()
                    },
                )?;
            }
            if !rows.is_empty() {
                tracing::info!(subtasks = rows.len(), "leases expired; subtasks requeued");
            }
            Ok(rows
                .into_iter()
                .map(|(seq, index, epoch, host)| SubtaskRef {
                    job: job_id(seq),
                    index,
                    epoch,
                    host,
                })
                .collect())
        })
    }

    fn complete(
        &self,
        job: &JobId,
        index: u64,
        epoch: u32,
        outcome: &Outcome,
    ) -> Result<CompletionResult> {
        let seq = job_seq(job)?;
        let opts = &self.opts;
        self.write(
            "complete",
            &format_args!("job {job} subtask {index} attempt {epoch}"),
            |tx| complete_tx(tx, opts, job, seq, index, epoch, outcome),
        )
    }

    fn complete_many(&self, reports: &[Report]) -> Result<Vec<Result<CompletionResult>>> {
        let opts = &self.opts;
        self.write(
            "complete_many",
            &format_args!("{} reports", reports.len()),
            |tx| {
                let mut out = Vec::with_capacity(reports.len());
                for r in reports {
                    let one = job_seq(&r.job).and_then(|seq| {
                        complete_tx(tx, opts, &r.job, seq, r.index, r.epoch, &r.outcome)
                    });
                    match one {
                        // A database failure aborts the whole batch; a
                        // report about an unknown job or subtask does not.
                        Err(e @ (StoreError::Db { .. } | StoreError::Corrupt { .. })) => {
                            return Err(e)
                        }
                        other => out.push(other),
                    }
                }
                Ok(out)
            },
        )
    }

    fn withdraw(&self, job: &JobId, index: u64, epoch: u32, reason: &str) -> Result<bool> {
        let seq = job_seq(job)?;
        self.write(
            "withdraw",
            &format_args!("job {job} subtask {index} attempt {epoch}"),
            |tx| {
                let row: Option<(i64, u32)> = tx
                    .prepare_cached(
                        "SELECT state, epoch FROM subtasks WHERE job = ?1 AND idx = ?2",
                    )?
                    .query_row(params![seq, index], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let Some((state, current)) = row else {
                    return Err(missing_subtask(tx, job, seq, index));
                };
                if state != ASSIGNED || current != epoch {
                    return Ok(false);
                }
                requeue_one(tx, seq, index, epoch, reason, now_ms())?;
                apply(
                    tx,
                    seq,
                    Delta {
                        queued: 1,
                        assigned: -1,
                        ..Delta::default()
                    },
                )?;
                Ok(true)
            },
        )
    }

    fn move_attempt(
        &self,
        job: &JobId,
        index: u64,
        epoch: u32,
        from: &str,
        to: &str,
        lease_until: i64,
    ) -> Result<Option<u32>> {
        let seq = job_seq(job)?;
        self.write(
            "move_attempt",
            &format_args!("job {job} subtask {index} attempt {epoch} from {from} to {to}"),
            |tx| {
                let row: Option<(i64, u32, Option<String>)> = tx
                    .prepare_cached(
                        "SELECT state, epoch, host FROM subtasks WHERE job = ?1 AND idx = ?2",
                    )?
                    .query_row(params![seq, index], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                let Some((state, current, host)) = row else {
                    return Err(missing_subtask(tx, job, seq, index));
                };
                if state != ASSIGNED || current != epoch || host.as_deref() != Some(from) {
                    return Ok(None);
                }
                let now = now_ms();
                withdraw_attempt(tx, seq, index, epoch, &format!("migrated to {to}"), now)?;
                tx.prepare_cached(
                    "INSERT INTO attempts (job, idx, attempt, host, state, started_ms) \
                     VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                )?
                .execute(params![seq, index, epoch + 1, to, now])?;
                tx.prepare_cached(
                    "UPDATE subtasks SET epoch = ?3, host = ?4, lease_expires_ms = \
                     CASE WHEN lease_expires_ms IS NULL THEN NULL ELSE ?5 END \
                     WHERE job = ?1 AND idx = ?2",
                )?
                .execute(params![seq, index, epoch + 1, to, lease_until])?;
                Ok(Some(epoch + 1))
            },
        )
    }

    fn requeue_host(&self, host: &str, reason: &str) -> Result<Vec<SubtaskRef>> {
        self.write("requeue_host", &format_args!("host {host}"), |tx| {
            requeue_host_tx(tx, host, reason)
        })
    }

    fn assigned_to(&self, host: &str) -> Result<Vec<SubtaskRef>> {
        self.run("assigned_to", &format_args!("host {host}"), |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT job, idx, epoch FROM subtasks WHERE host = ?1 AND state = 1 \
                     ORDER BY job, idx",
                )?
                .query_map([host], |r| {
                    Ok(SubtaskRef {
                        job: job_id(r.get(0)?),
                        index: r.get(1)?,
                        epoch: r.get(2)?,
                        host: Some(host.to_owned()),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    fn subtasks(&self, job: &JobId, from: u64, limit: usize) -> Result<Vec<SubtaskRecord>> {
        let seq = job_seq(job)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("subtasks", job, |conn| {
            let (n_map, has_reduce): (u64, bool) = conn
                .prepare_cached("SELECT n_map, has_reduce FROM jobs WHERE seq = ?1")?
                .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or_else(|| StoreError::JobNotFound(job.clone()))?;
            Ok(conn
                .prepare_cached(
                    "SELECT idx, state, epoch, failures, host, error FROM subtasks \
                     WHERE job = ?1 AND idx >= ?2 ORDER BY idx LIMIT ?3",
                )?
                .query_map(params![seq, from, limit], |r| {
                    let state: i64 = r.get(1)?;
                    Ok(SubtaskRecord {
                        index: r.get(0)?,
                        state: SubtaskState::from_code(state).ok_or_else(|| {
                            bad_column(1, Type::Integer, format!("unknown subtask state {state}"))
                        })?,
                        epoch: r.get(2)?,
                        failures: r.get(3)?,
                        host: r.get(4)?,
                        reduce: has_reduce && r.get::<_, u64>(0)? == n_map,
                        error: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    fn job_leases(&self, job: &JobId) -> Result<Vec<HostLeases>> {
        let seq = job_seq(job)?;
        self.run("job_leases", job, |conn| {
            if !job_exists(conn, seq)? {
                return Err(StoreError::JobNotFound(job.clone()));
            }
            Ok(conn
                .prepare_cached(
                    "SELECT host, COUNT(*), MIN(lease_expires_ms) \
                     FROM subtasks INDEXED BY subtasks_leases \
                     WHERE state = 1 AND lease_expires_ms IS NOT NULL AND job = ?1 \
                     GROUP BY host ORDER BY host",
                )?
                .query_map([seq], |r| {
                    Ok(HostLeases {
                        host: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                        leases: r.get(1)?,
                        earliest_expiry_ms: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    fn dead_subtasks(&self, job: &JobId, limit: usize) -> Result<Vec<DeadSubtask>> {
        let seq = job_seq(job)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("dead_subtasks", job, |conn| {
            let (n_map, has_reduce): (u64, bool) = conn
                .prepare_cached("SELECT n_map, has_reduce FROM jobs WHERE seq = ?1")?
                .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or_else(|| StoreError::JobNotFound(job.clone()))?;
            let dead: Vec<SubtaskRecord> = conn
                .prepare_cached(&format!(
                    "SELECT idx, epoch, failures, host, error FROM subtasks \
                     WHERE job = ?1 AND state = {DEAD} ORDER BY idx LIMIT ?2"
                ))?
                .query_map(params![seq, limit], |r| {
                    Ok(SubtaskRecord {
                        index: r.get(0)?,
                        state: SubtaskState::Dead,
                        epoch: r.get(1)?,
                        failures: r.get(2)?,
                        host: r.get(3)?,
                        reduce: has_reduce && r.get::<_, u64>(0)? == n_map,
                        error: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut attempts = conn.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLUMNS} FROM attempts a \
                 WHERE a.job = ?1 AND a.idx = ?2 ORDER BY a.attempt"
            ))?;
            let mut out = Vec::with_capacity(dead.len());
            for subtask in dead {
                let list = attempts
                    .query_map(params![seq, subtask.index], attempt_from_row)?
                    .collect::<rusqlite::Result<_>>()?;
                out.push(DeadSubtask {
                    subtask,
                    attempts: list,
                });
            }
            Ok(out)
        })
    }

    fn attempts(&self, job: &JobId, index: u64) -> Result<Vec<AttemptRecord>> {
        let seq = job_seq(job)?;
        self.run(
            "attempts",
            &format_args!("job {job} subtask {index}"),
            |conn| {
                let exists = conn
                    .prepare_cached("SELECT 1 FROM subtasks WHERE job = ?1 AND idx = ?2")?
                    .query_row(params![seq, index], |_| Ok(()))
                    .optional()?
                    .is_some();
                if !exists {
                    return Err(missing_subtask(conn, job, seq, index));
                }
                Ok(conn
                    .prepare_cached(&format!(
                        "SELECT {ATTEMPT_COLUMNS} FROM attempts a \
                     WHERE a.job = ?1 AND a.idx = ?2 ORDER BY a.attempt"
                    ))?
                    .query_map(params![seq, index], attempt_from_row)?
                    .collect::<rusqlite::Result<_>>()?)
            },
        )
    }

    fn results(&self, job: &JobId, from: u64, limit: usize) -> Result<Vec<AttemptRecord>> {
        let seq = job_seq(job)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("results", job, |conn| {
            if !job_exists(conn, seq)? {
                return Err(StoreError::JobNotFound(job.clone()));
            }
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM subtasks s JOIN attempts a \
                     ON a.job = s.job AND a.idx = s.idx AND a.attempt = s.epoch \
                     WHERE s.job = ?1 AND s.state = {DONE} AND s.idx >= ?2 \
                     AND s.idx < (SELECT n_map FROM jobs WHERE seq = ?1) \
                     ORDER BY s.idx LIMIT ?3"
                ))?
                .query_map(params![seq, from, limit], attempt_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    fn reduce_result(&self, job: &JobId) -> Result<Option<AttemptRecord>> {
        let seq = job_seq(job)?;
        self.run("reduce_result", job, |conn| {
            if !job_exists(conn, seq)? {
                return Err(StoreError::JobNotFound(job.clone()));
            }
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM jobs j JOIN subtasks s \
                     ON s.job = j.seq AND s.idx = j.n_map JOIN attempts a \
                     ON a.job = s.job AND a.idx = s.idx AND a.attempt = s.epoch \
                     WHERE j.seq = ?1 AND j.has_reduce = 1 AND s.state = {DONE}"
                ))?
                .query_row([seq], attempt_from_row)
                .optional()?)
        })
    }

    fn upsert_host(&self, id: &str, address: &str) -> Result<()> {
        self.write("upsert_host", &format_args!("host {id}"), |tx| {
            tx.prepare_cached(
                "INSERT INTO hosts (id, address, state, registered_ms, last_heartbeat_ms) \
                 VALUES (?1, ?2, 'active', ?3, ?3) \
                 ON CONFLICT (id) DO UPDATE SET address = excluded.address, state = 'active', \
                 last_heartbeat_ms = excluded.last_heartbeat_ms",
            )?
            .execute(params![id, address, now_ms()])?;
            Ok(())
        })
    }

    fn heartbeat(&self, id: &str, load: &serde_json::Value) -> Result<()> {
        let load = load.to_string();
        self.write("heartbeat", &format_args!("host {id}"), |tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE hosts SET last_heartbeat_ms = ?2, load = ?3, state = 'active' \
                     WHERE id = ?1",
                )?
                .execute(params![id, now_ms(), load])?;
            if n == 0 {
                return Err(StoreError::HostNotFound(id.to_owned()));
            }
            Ok(())
        })
    }

    fn mark_lost(&self, id: &str) -> Result<Vec<SubtaskRef>> {
        self.write("mark_lost", &format_args!("host {id}"), |tx| {
            let n = tx.execute("UPDATE hosts SET state = 'lost' WHERE id = ?1", [id])?;
            if n == 0 {
                return Err(StoreError::HostNotFound(id.to_owned()));
            }
            tracing::info!(host = id, "host lost");
            requeue_host_tx(tx, id, "host lost")
        })
    }

    fn lease_slice(
        &self,
        host: &str,
        public_key: &str,
        endpoint: Option<&str>,
        pick: &dyn Fn(&[String]) -> Option<String>,
    ) -> Result<SliceLease> {
        self.write("lease_slice", &format_args!("host {host}"), |tx| {
            overlay::lease(tx, host, public_key, endpoint, pick)
        })
    }

    fn detach_slice(&self, host: Option<&str>) -> Result<()> {
        let about = host.unwrap_or("every host");
        self.write("detach_slice", &format_args!("host {about}"), |tx| {
            overlay::detach(tx, host)
        })
    }

    fn slices(&self) -> Result<Vec<SliceRecord>> {
        self.run("slices", &"all slices", |conn| overlay::all(conn))
    }

    fn release_slices(&self, before_ms: i64) -> Result<Vec<SliceRecord>> {
        self.write(
            "release_slices",
            &format_args!("lost before {before_ms}"),
            |tx| overlay::release(tx, before_ms),
        )
    }

    fn drop_slices(&self, hosts: &[String]) -> Result<usize> {
        self.write(
            "drop_slices",
            &format_args!("{} hosts", hosts.len()),
            |tx| overlay::drop_hosts(tx, hosts),
        )
    }

    fn list_hosts(&self) -> Result<Vec<HostRecord>> {
        self.run("list_hosts", &"all hosts", |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, address, state, registered_ms, last_heartbeat_ms, load \
                     FROM hosts ORDER BY id",
                )?
                .query_map([], |r| {
                    let state: String = r.get(2)?;
                    let load: Option<String> = r.get(5)?;
                    Ok(HostRecord {
                        id: r.get(0)?,
                        address: r.get(1)?,
                        state: HostState::parse(&state).ok_or_else(|| {
                            bad_column(2, Type::Text, format!("unknown host state {state:?}"))
                        })?,
                        registered_ms: r.get(3)?,
                        last_heartbeat_ms: r.get(4)?,
                        load: load
                            .map(|l| serde_json::from_str(&l))
                            .transpose()
                            .map_err(|e| bad_column(5, Type::Text, format!("load: {e}")))?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?)
        })
    }
}

mod overlay;

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod overlay_tests;
#[cfg(test)]
mod tests;
