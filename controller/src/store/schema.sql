-- sparegrid controller store, schema version 1 (PRAGMA user_version = 1).
--
-- Every statement is idempotent (IF NOT EXISTS), so applying it to a store
-- that already has it changes nothing. Later versions append migrations in
-- store/sqlite.rs; never edit a released version in place.
--
-- Times are milliseconds since the Unix epoch. Subtask and attempt states are
-- small integers because those tables hold millions of rows:
--   subtasks.state: 0 queued, 1 assigned, 2 done, 3 dead, 4 cancelled
--   attempts.state: 0 running, 1 succeeded, 2 failed, 3 withdrawn, 4 cancelled
-- Jobs and hosts are few, so their states are readable text.

CREATE TABLE IF NOT EXISTS jobs (
    -- The job id is 'j-' || seq; AUTOINCREMENT never reuses a number.
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    request      TEXT    NOT NULL,          -- the JobRequest as JSON
    state        TEXT    NOT NULL,          -- queued running done failed cancelled
    priority     INTEGER NOT NULL,          -- higher runs first
    max_attempts INTEGER NOT NULL,          -- failed attempts before a subtask is dead
    created_ms   INTEGER NOT NULL,
    started_ms   INTEGER,                   -- first subtask assigned
    finished_ms  INTEGER,                   -- reached done, failed or cancelled
    -- Subtask counts by state, kept in step with subtasks in the same
    -- transaction so that status never scans a million rows.
    n_total      INTEGER NOT NULL,
    n_queued     INTEGER NOT NULL,
    n_assigned   INTEGER NOT NULL DEFAULT 0,
    n_done       INTEGER NOT NULL DEFAULT 0,
    n_dead       INTEGER NOT NULL DEFAULT 0,
    n_cancelled  INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS jobs_dispatch ON jobs (priority DESC, seq)
    WHERE state IN ('queued', 'running');

CREATE TABLE IF NOT EXISTS subtasks (
    job      INTEGER NOT NULL,              -- jobs.seq
    idx      INTEGER NOT NULL,              -- position in the job, from 0
    state    INTEGER NOT NULL DEFAULT 0,
    epoch    INTEGER NOT NULL DEFAULT 0,    -- attempts started; the current attempt's number
    failures INTEGER NOT NULL DEFAULT 0,    -- attempts that reported failure
    host     TEXT,                          -- assigned host, or the host that finished it
    argv     TEXT    NOT NULL,              -- JSON array
    env      TEXT,                          -- JSON object, NULL when empty
    stdin    BLOB,                          -- NULL when empty
    PRIMARY KEY (job, idx)
);

-- The dispatch queue: only queued rows are in it.
CREATE INDEX IF NOT EXISTS subtasks_queued ON subtasks (job, idx) WHERE state = 0;
-- What each host runs: only assigned rows are in it.
CREATE INDEX IF NOT EXISTS subtasks_assigned ON subtasks (host) WHERE state = 1;

CREATE TABLE IF NOT EXISTS attempts (
    job         INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,           -- the subtask's epoch when it was assigned
    host        TEXT    NOT NULL,
    state       INTEGER NOT NULL DEFAULT 0,
    started_ms  INTEGER NOT NULL,
    finished_ms INTEGER,
    exit_code   INTEGER,
    error       TEXT,
    stdout      BLOB,                       -- capped
    stdout_size INTEGER,                    -- size before the cap
    stderr      BLOB,                       -- capped
    stderr_size INTEGER,                    -- size before the cap
    duration_ms INTEGER,
    PRIMARY KEY (job, idx, attempt)
);

CREATE TABLE IF NOT EXISTS hosts (
    id                TEXT PRIMARY KEY,
    address           TEXT    NOT NULL,
    state             TEXT    NOT NULL,     -- active lost
    registered_ms     INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    load              TEXT                  -- the last heartbeat's load as JSON
);
