//! Where the controller keeps what must survive a restart: jobs, their
//! subtasks, every attempt at a subtask, and the host registry.
//!
//! [`Store`] is the contract; [`SqliteStore`] is the embedded implementation
//! (one file, WAL). A PostgreSQL store for controllers that share one
//! database can implement the same trait later.
//!
//! The rules every implementation keeps:
//!
//! - **All or nothing.** Each call is one transaction: a job is created with
//!   all of its subtasks or not at all; a claim, completion, requeue or cancel
//!   moves subtasks, attempts and the job's counts together.
//! - **Specs are built at claim time.** [`Store::create_planned_job`] keeps
//!   the request once and, per subtask, only the bounds of its split
//!   [`Part`](crate::split::Part); [`Store::claim`] builds the argv, env and
//!   stdin ([`crate::split::materialise`]). A million queued subtasks cost
//!   a few integers each, on disk. [`Store::create_job`] stores explicit
//!   specs as given (tests, and callers with their own splitting).
//! - **Fenced, idempotent completion.** Each assignment bumps the subtask's
//!   epoch (its attempt number). A completion counts only when it names the
//!   current epoch of an assigned subtask; the first accepted completion
//!   wins. A repeated report is [`CompletionResult::Duplicate`], a report
//!   from an older or withdrawn attempt is [`CompletionResult::Stale`], and
//!   neither changes anything.
//! - **Retries with memory.** A failed attempt requeues the subtask until it
//!   has failed `max_attempts` times, then the subtask is dead; every
//!   attempt's exit code, error and output stay in the attempts table.
//!   Attempts withdrawn because their host was lost or overloaded do not
//!   count as failures.
//! - **Reduce.** A job whose request has a `reduce` command has
//!   [`JobRecord::map_subtasks`] map subtasks (indices `0..n`) and, once
//!   every one of them is done, one reduce subtask with index `n`. It is
//!   enqueued in the same transaction as the accepted completion that made
//!   the last map subtask done, so exactly once whatever duplicates or
//!   late reports arrive. Its stdin is the accepted map outputs (stdout)
//!   concatenated in index order, read when it is claimed; it runs like any
//!   other subtask (same resources, `max_attempts`, retries, epochs). It is
//!   never run on partial input: when a map output was cut (by the agent or
//!   by the store's `output_cap`: stored bytes < reported size; nothing
//!   stored of a non-empty output means it was uploaded as a file), or the
//!   outputs together exceed [`StoreOptions::max_reduce_input`], the reduce
//!   subtask is created dead with an error saying why
//!   ([`SubtaskRecord::error`], [`JobRecord::error`]) and the job fails.
//!   [`Store::results`] returns map results only; [`Store::reduce_result`]
//!   the reduce's.
//! - **Counts.** [`JobCounts::total`] counts the subtasks that exist: the
//!   map subtasks from the start, plus the reduce subtask once it is
//!   enqueued (so `total` grows by one when the maps are done, and the
//!   counts by state always add up to `total`). [`JobRecord::reduce`] says
//!   where the reduce step is, including "waiting" before it exists.
//! - **Leases (pull mode).** A job's mode decides who takes its subtasks:
//!   [`Store::claim`] only push jobs', [`Store::claim_leases`] only pull
//!   jobs'. A lease is an assigned subtask with an expiry
//!   (`lease_expires_ms`); [`Store::renew_leases`] moves it on, and
//!   [`Store::expire_leases`] withdraws expired ones (not a failure) and
//!   requeues their subtasks. Completion, retries and dead-lettering are
//!   the same as for pushed subtasks: the epoch is the fencing token.
//! - **Overlay slices.** A host that registers a tunnel holds one slice of
//!   the grid overlay ([`SliceRecord`]); [`Store::lease_slice`] gives it
//!   the slice it held before or the lowest free one the caller's pool
//!   picks, and keeps public keys unique among hosts that are not lost.
//!   The claims ([`Store::claim`], [`Store::claim_seeds`],
//!   [`Store::claim_leases`]) give an `overlay` job's subtasks only to a
//!   host whose slice has a key (it registered a tunnel), in the same
//!   transaction. [`Store::release_slices`] frees the slices of hosts lost
//!   for long enough.
//! - **Job rollup.** A job is `done` when every subtask is done (for a job
//!   with a reduce, that includes the reduce subtask) and `failed` when some
//!   subtask is dead and none is queued or assigned; `cancelled` is final.

mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::{JobRequest, Network, SubtaskSpec};

pub use sqlite::{SqliteStore, StoreOptions, LEASE_EXPIRED, SCHEMA_VERSION};

/// A job's id as the API shows it (`j-1`, `j-2`, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl JobId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        JobId(s.to_owned())
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        JobId(s)
    }
}

/// A job's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// No subtask has been assigned yet.
    Queued,
    /// Some subtask has been assigned; not every subtask is finished.
    Running,
    /// Every subtask is done.
    Done,
    /// Some subtask is dead and none is queued or assigned.
    Failed,
    /// Cancelled by a user; final.
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    /// Done, failed or cancelled: nothing more will happen to the job.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subtask's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubtaskState {
    Queued,
    Assigned,
    Done,
    /// Failed `max_attempts` times; parked with every attempt's error.
    Dead,
    Cancelled,
}

impl SubtaskState {
    pub(crate) fn code(self) -> i64 {
        match self {
            SubtaskState::Queued => 0,
            SubtaskState::Assigned => 1,
            SubtaskState::Done => 2,
            SubtaskState::Dead => 3,
            SubtaskState::Cancelled => 4,
        }
    }

    pub(crate) fn from_code(code: i64) -> Option<SubtaskState> {
        Some(match code {
            0 => SubtaskState::Queued,
            1 => SubtaskState::Assigned,
            2 => SubtaskState::Done,
            3 => SubtaskState::Dead,
            4 => SubtaskState::Cancelled,
            _ => return None,
        })
    }
}

/// What became of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    Running,
    Succeeded,
    Failed,
    /// Taken back from its host (host lost, overloaded or drained).
    Withdrawn,
    /// Its job was cancelled while it ran.
    Cancelled,
}

impl AttemptState {
    pub(crate) fn code(self) -> i64 {
        match self {
            AttemptState::Running => 0,
            AttemptState::Succeeded => 1,
            AttemptState::Failed => 2,
            AttemptState::Withdrawn => 3,
            AttemptState::Cancelled => 4,
        }
    }

    pub(crate) fn from_code(code: i64) -> Option<AttemptState> {
        Some(match code {
            0 => AttemptState::Running,
            1 => AttemptState::Succeeded,
            2 => AttemptState::Failed,
            3 => AttemptState::Withdrawn,
            4 => AttemptState::Cancelled,
            _ => return None,
        })
    }
}

/// A host's standing in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Active,
    /// Heartbeats stopped; its subtasks went back to the queue.
    Lost,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Active => "active",
            HostState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<HostState> {
        match s {
            "active" => Some(HostState::Active),
            "lost" => Some(HostState::Lost),
            _ => None,
        }
    }
}

/// Subtask counts of a job by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JobCounts {
    pub total: u64,
    pub queued: u64,
    pub assigned: u64,
    pub done: u64,
    pub dead: u64,
    pub cancelled: u64,
}

/// A job as listings show it (the request itself is in [`Store::job_request`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    pub priority: i32,
    pub max_attempts: u32,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub counts: JobCounts,
    /// Map subtasks (indices `0..map_subtasks`); the reduce subtask, when
    /// the job has one, is index `map_subtasks`.
    pub map_subtasks: u64,
    /// Where the reduce step is; `None` when the job has none.
    pub reduce: Option<ReduceState>,
    /// Why the job failed, when the controller itself refused to go on
    /// (a reduce that would have run on cut or oversized input).
    pub error: Option<String>,
}

/// Where a job's reduce step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceState {
    /// Some map subtask is not done yet.
    Waiting,
    Queued,
    Assigned,
    Done,
    /// Failed `max_attempts` times, or refused before it ran (see
    /// [`JobRecord::error`]).
    Dead,
    Cancelled,
    /// The job ended (failed or cancelled) before its map subtasks were
    /// all done, so the reduce never existed.
    Skipped,
}

impl ReduceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReduceState::Waiting => "waiting",
            ReduceState::Queued => "queued",
            ReduceState::Assigned => "assigned",
            ReduceState::Done => "done",
            ReduceState::Dead => "dead",
            ReduceState::Cancelled => "cancelled",
            ReduceState::Skipped => "skipped",
        }
    }
}

impl From<SubtaskState> for ReduceState {
    fn from(s: SubtaskState) -> Self {
        match s {
            SubtaskState::Queued => ReduceState::Queued,
            SubtaskState::Assigned => ReduceState::Assigned,
            SubtaskState::Done => ReduceState::Done,
            SubtaskState::Dead => ReduceState::Dead,
            SubtaskState::Cancelled => ReduceState::Cancelled,
        }
    }
}

/// One subtask handed to a host: run `spec`, then report with `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub index: u64,
    /// The attempt number; a completion must carry it back.
    pub epoch: u32,
    pub spec: SubtaskSpec,
    /// The job's network (for the agent's [`Assignment`](sparegrid_proto::grid::Assignment)).
    pub network: Network,
}

/// A subtask named by job, index and the epoch it had.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SubtaskRef {
    pub job: JobId,
    pub index: u64,
    pub epoch: u32,
    /// The host it was assigned to, when it was.
    pub host: Option<String>,
}

/// A subtask's bookkeeping (not its spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskRecord {
    pub index: u64,
    pub state: SubtaskState,
    /// Attempts started so far; the current attempt's number.
    pub epoch: u32,
    pub failures: u32,
    pub host: Option<String>,
    /// True for a job's reduce subtask.
    pub reduce: bool,
    /// Why the controller parked it as dead without running it.
    pub error: Option<String>,
}

/// What an agent reports when an attempt ends.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// `None` when the process did not exit on its own (killed, timed out,
    /// never started).
    pub exit_code: Option<i32>,
    /// Why the attempt failed, when the runtime knows more than the exit code.
    pub error: Option<String>,
    /// Captured stdout, possibly already capped by the agent.
    pub stdout: Vec<u8>,
    /// Its size before any cap (at least `stdout.len()`).
    pub stdout_size: u64,
    pub stderr: Vec<u8>,
    pub stderr_size: u64,
    pub duration_ms: u64,
}

impl Outcome {
    /// Exit code 0 and no error.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none()
    }
}

/// One completion report, for [`Store::complete_many`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub job: JobId,
    pub index: u64,
    pub epoch: u32,
    pub outcome: Outcome,
}

/// What a completion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum CompletionResult {
    /// Counted. `subtask` is where the subtask went (done, queued for
    /// a retry, or dead), `job` the job's state afterwards.
    Accepted {
        subtask: SubtaskState,
        job: JobState,
    },
    /// The subtask is already done, or this very attempt was already
    /// reported. Nothing changed.
    Duplicate,
    /// The report is for an attempt that is no longer current (withdrawn,
    /// superseded, cancelled). Nothing changed.
    Stale,
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    /// False when the job was already done, failed or cancelled.
    pub changed: bool,
    /// Queued subtasks that will now never run.
    pub dropped_queued: u64,
    /// Subtasks that were running: tell their hosts to stop them. Any late
    /// completion for them is [`CompletionResult::Stale`].
    pub stop: Vec<SubtaskRef>,
}

/// One attempt at a subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub index: u64,
    pub attempt: u32,
    pub host: String,
    pub state: AttemptState,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub stdout: Vec<u8>,
    pub stdout_size: u64,
    pub stderr: Vec<u8>,
    pub stderr_size: u64,
    pub duration_ms: Option<u64>,
}

/// Pull mode: the leases one host holds on one job's subtasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLeases {
    pub host: String,
    /// Leased subtasks (assigned, with an expiry).
    pub leases: u64,
    /// The soonest expiry among them, ms since the Unix epoch.
    pub earliest_expiry_ms: i64,
}

/// A dead subtask with every attempt at it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadSubtask {
    pub subtask: SubtaskRecord,
    pub attempts: Vec<AttemptRecord>,
}

/// A host in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: String,
    pub address: String,
    pub state: HostState,
    pub registered_ms: i64,
    pub last_heartbeat_ms: i64,
    /// The last heartbeat's load report, as the agent sent it.
    pub load: Option<serde_json::Value>,
}

/// One host's slice of the grid overlay (see `schema_v4.sql`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceRecord {
    pub host: String,
    /// `"100.96.3.0/24"`.
    pub slice: String,
    /// The host's WireGuard public key (canonical base64); `None` while it
    /// runs without a tunnel.
    pub public_key: Option<String>,
    /// Where peers reach its tunnel (`ip:port`), when known.
    pub endpoint: Option<String>,
    pub allocated_ms: i64,
    pub updated_ms: i64,
}

/// What [`Store::lease_slice`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceLease {
    /// The host holds this slice; `new` when it was just allocated.
    Leased { record: SliceRecord, new: bool },
    /// The pool has no free slice; nothing changed.
    Exhausted,
}

/// Errors of the store; each names the job, subtask, host or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0} not found")]
    JobNotFound(JobId),
    #[error("subtask {index} of job {job} not found")]
    SubtaskNotFound { job: JobId, index: u64 },
    #[error("host {0} not found")]
    HostNotFound(String),
    #[error("host {0} is lost; it must register again before it gets work")]
    HostLost(String),
    #[error("job {name:?} has no subtasks")]
    EmptyJob { name: String },
    #[error("job {name:?}: subtask at position {expected} has index {found}; indices must be 0, 1, 2, … in order")]
    BadIndex {
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("opening store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {path} has schema version {found}; this controller knows up to {supported}")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("store {op} ({about}): {source}")]
    Db {
        op: &'static str,
        about: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {op} ({about}): bad stored data: {detail}")]
    Corrupt {
        op: &'static str,
        about: String,
        detail: String,
    },
    #[error("job {name:?} cannot be planned: {source}")]
    Unplannable {
        name: String,
        #[source]
        source: crate::job::ValidationError,
    },
    #[error(
        "tunnel.public_key of host {host:?} is already registered by host {other:?}; every \
         host needs its own key pair"
    )]
    PublicKeyInUse { host: String, other: String },
    #[error("job {name:?}: encoding for the store: {source}")]
    Encode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The controller's persistent state. Every method is one transaction.
///
/// Object safe, `Send + Sync`: the controller holds an `Arc<dyn Store>`.
/// Calls block on I/O; async callers use `spawn_blocking`.
pub trait Store: Send + Sync {
    /// Stores a job and its map subtasks as planned from `req` by
    /// [`crate::split::Plan`], or nothing: the request once, and per
    /// subtask only its part's bounds; specs are built at claim time. The
    /// plan is streamed into the store, never held as a list. A request
    /// that cannot be split is [`StoreError::Unplannable`]; the caller
    /// checks the controller's limits first.
    fn create_planned_job(&self, req: &JobRequest) -> Result<JobId>;

    /// Stores a job with the given explicit map subtasks, or nothing.
    /// Subtask indices must be 0, 1, 2, … in order, and there must be at
    /// least one. `req.reduce`, if any, runs after them as usual.
    fn create_job(
        &self,
        req: &JobRequest,
        subtasks: &mut dyn Iterator<Item = SubtaskSpec>,
    ) -> Result<JobId>;

    fn get_job(&self, job: &JobId) -> Result<JobRecord>;

    /// The request the job was created from.
    fn job_request(&self, job: &JobId) -> Result<JobRequest>;

    /// Newest first, at most `limit`, optionally only those in `state`.
    fn list_jobs(&self, state: Option<JobState>, limit: usize) -> Result<Vec<JobRecord>>;

    /// Cancels queued and assigned subtasks and marks the job cancelled.
    fn cancel_job(&self, job: &JobId) -> Result<CancelOutcome>;

    /// Assigns up to `n` queued subtasks to `host`: highest job priority
    /// first, then oldest job, then lowest index. Each gets a new epoch and a
    /// running attempt. The host must be registered and active.
    fn claim(&self, host: &str, n: usize) -> Result<Vec<Assignment>>;

    /// Peer-to-peer mode: seeds up to `n` queued subtasks of p2p jobs to
    /// `host`, in the order [`Store::claim`] uses, each as a new attempt
    /// with no lease. From then on the agents trade them among themselves;
    /// the controller accepts the attempt's completion from any host, and
    /// [`Store::requeue_host`] leaves seeds alone. Neither `claim` nor
    /// `claim_leases` takes a p2p job's subtasks.
    fn claim_seeds(&self, host: &str, n: usize) -> Result<Vec<Assignment>>;

    /// Whether any peer-to-peer job is queued or running (the agents then
    /// get each other's addresses to steal from).
    fn p2p_active(&self) -> Result<bool>;

    /// Pull mode: leases up to `n` queued subtasks of pull jobs to `host`,
    /// in the order [`Store::claim`] uses, each as a new attempt whose lease
    /// expires at `now + ttl` (ms since the epoch, the controller's clock).
    /// [`Store::claim`] never takes a pull job's subtasks, and this never
    /// takes a push job's.
    fn claim_leases(
        &self,
        host: &str,
        n: usize,
        ttl: Duration,
        now: i64,
    ) -> Result<Vec<Assignment>>;

    /// Moves the expiry of each lease `(job, index, epoch)` that is still
    /// `host`'s current, unexpired attempt to `now + ttl`. One answer per
    /// lease, in order: `false` means it is lost (expired, revived,
    /// cancelled, done, or never this host's), and a completion for it
    /// will be stale unless it is still current.
    fn renew_leases(
        &self,
        host: &str,
        leases: &[(JobId, u64, u32)],
        ttl: Duration,
        now: i64,
    ) -> Result<Vec<bool>>;

    /// Withdraws every lease that expired before `now` (the attempt is
    /// marked withdrawn with the reason "lease expired", not a failure) and
    /// puts its subtask back in the queue; returns them. A late completion
    /// for such an attempt is [`CompletionResult::Stale`].
    fn expire_leases(&self, now: i64) -> Result<Vec<SubtaskRef>>;

    /// Records the end of attempt `epoch` of subtask `index`; see
    /// [`CompletionResult`] for what counts.
    fn complete(
        &self,
        job: &JobId,
        index: u64,
        epoch: u32,
        outcome: &Outcome,
    ) -> Result<CompletionResult>;

    /// Records many completions in one transaction (agents report in
    /// batches), each exactly as [`Store::complete`] would. An unknown job
    /// or subtask fails only its own report; a database error fails the
    /// batch and records none of it.
    fn complete_many(&self, reports: &[Report]) -> Result<Vec<Result<CompletionResult>>>;

    /// Takes one assigned subtask back to the queue if `epoch` is still its
    /// current attempt (the attempt is marked withdrawn with `reason`).
    /// Returns whether it did.
    fn withdraw(&self, job: &JobId, index: u64, epoch: u32, reason: &str) -> Result<bool>;

    /// Moves attempt `epoch` of subtask `index` from `from` to `to`
    /// (`reclaim_mode = "migrate"`: a saved grid VM went to another host
    /// with its subtask). Only when that attempt is current and assigned to
    /// `from`: it is marked withdrawn with "migrated to <to>" (not a
    /// failure) and attempt `epoch + 1` starts on `to`, so a late
    /// completion of the old one is [`CompletionResult::Stale`] and the
    /// subtask is counted once. A pull lease moves with it, due at
    /// `lease_until` (ms). Returns the new epoch, or `None` when the
    /// attempt is no longer `from`'s.
    fn move_attempt(
        &self,
        job: &JobId,
        index: u64,
        epoch: u32,
        from: &str,
        to: &str,
        lease_until: i64,
    ) -> Result<Option<u32>>;

    /// Takes every subtask assigned to `host` back to the queue (their
    /// attempts are marked withdrawn with `reason`) and returns them.
    /// Peer-to-peer seeds stay assigned (see [`Store::claim_seeds`]).
    fn requeue_host(&self, host: &str, reason: &str) -> Result<Vec<SubtaskRef>>;

    /// Subtasks currently assigned to `host`.
    fn assigned_to(&self, host: &str) -> Result<Vec<SubtaskRef>>;

    /// Subtask bookkeeping from index `from`, at most `limit`, in index order.
    fn subtasks(&self, job: &JobId, from: u64, limit: usize) -> Result<Vec<SubtaskRecord>>;

    /// Pull mode: the leases held on `job`'s subtasks, per host (sorted by
    /// host). Looks only at leased rows (an index of the leases in flight).
    fn job_leases(&self, job: &JobId) -> Result<Vec<HostLeases>>;

    /// `job`'s dead subtasks in index order, at most `limit`, each with
    /// every attempt (its error, exit code and output). Scans the job's
    /// subtasks; callers ask only when the job's counts show dead ones.
    fn dead_subtasks(&self, job: &JobId, limit: usize) -> Result<Vec<DeadSubtask>>;

    /// Every attempt at one subtask, oldest first.
    fn attempts(&self, job: &JobId, index: u64) -> Result<Vec<AttemptRecord>>;

    /// The accepted attempt of each done map subtask from index `from`, at
    /// most `limit`, in index order: one per done subtask, never more. The
    /// reduce subtask is not among them (see [`Store::reduce_result`]).
    fn results(&self, job: &JobId, from: u64, limit: usize) -> Result<Vec<AttemptRecord>>;

    /// The accepted attempt of the job's reduce subtask, once it is done.
    fn reduce_result(&self, job: &JobId) -> Result<Option<AttemptRecord>>;

    /// Registers a host or refreshes its address; it becomes active.
    fn upsert_host(&self, id: &str, address: &str) -> Result<()>;

    /// Records a heartbeat and its load; a lost host becomes active again.
    fn heartbeat(&self, id: &str, load: &serde_json::Value) -> Result<()>;

    /// Marks a host lost and requeues its subtasks, returning them.
    fn mark_lost(&self, id: &str) -> Result<Vec<SubtaskRef>>;

    fn list_hosts(&self) -> Result<Vec<HostRecord>>;

    /// Overlay: `host` registered a tunnel with `public_key` (and
    /// `endpoint`, when known). It keeps the slice it holds; a host without
    /// one gets `pick(slices in use)`, or [`SliceLease::Exhausted`] (and
    /// nothing changes) when that is `None`. The key must not be another
    /// host's that is not lost ([`StoreError::PublicKeyInUse`], nothing
    /// changes); a lost host's key moves to `host` (the lost host keeps
    /// its slice, without a key, until it is released).
    fn lease_slice(
        &self,
        host: &str,
        public_key: &str,
        endpoint: Option<&str>,
        pick: &dyn Fn(&[String]) -> Option<String>,
    ) -> Result<SliceLease>;

    /// Overlay: `host` (every host, with `None`) runs without a tunnel: its
    /// key and endpoint are cleared, so it takes no overlay job; the slice
    /// stays its own.
    fn detach_slice(&self, host: Option<&str>) -> Result<()>;

    /// Every slice held, by host.
    fn slices(&self) -> Result<Vec<SliceRecord>>;

    /// Releases (deletes) the slices of hosts that are lost and whose last
    /// heartbeat is before `before_ms` (ms since the epoch); returns them.
    fn release_slices(&self, before_ms: i64) -> Result<Vec<SliceRecord>>;

    /// Deletes the slices of `hosts` (slices outside a changed pool).
    fn drop_slices(&self, hosts: &[String]) -> Result<usize>;
}
