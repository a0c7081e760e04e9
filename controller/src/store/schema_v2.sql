-- sparegrid controller store, migration to schema version 2
-- (PRAGMA user_version = 2). Applied in one transaction with the version
-- bump, after schema.sql (version 1); never edit it once released.
--
-- 1. Subtasks no longer need a materialised spec per row. A job submitted
--    through the API stores its request once (jobs.request) and each map
--    subtask only the bounds of its split part (lo, hi):
--      range: [lo, hi) are the numbers; items: items[lo..hi];
--      lines: input bytes [lo, hi).
--    The argv, env and stdin are built when the subtask is claimed. Rows
--    stored with an explicit spec (every row of version 1, and
--    Store::create_job) keep argv/env/stdin, and argv is not NULL exactly
--    for them. SQLite cannot drop a NOT NULL constraint in place, so the
--    table is rebuilt (https://sqlite.org/lang_altertable.html, the
--    twelve-step procedure; there are no foreign keys, views or triggers).
--    The new table is WITHOUT ROWID: its primary key is the only key it is
--    looked up by, so the rowid b-tree and the separate primary-key index
--    become one.
-- 2. The reduce step: a job with `has_reduce` gets one more subtask, index
--    n_map (after its n_map map subtasks), in the same transaction as the
--    accepted completion that made its last map subtask done. Its stdin is
--    the map outputs concatenated in index order, read when it is claimed.
--    subtasks.error says why the controller parked a subtask as dead
--    without running it (a reduce refused because a map output was cut or
--    the outputs are too large); jobs.error repeats it for the job.
--    Jobs of version 1 are planned without a reduce step (has_reduce 0):
--    they were promised concatenated outputs when they were submitted.

CREATE TABLE subtasks_v2 (
    job      INTEGER NOT NULL,              -- jobs.seq
    idx      INTEGER NOT NULL,              -- position in the job, from 0; the reduce is n_map
    state    INTEGER NOT NULL DEFAULT 0,    -- 0 queued 1 assigned 2 done 3 dead 4 cancelled
    epoch    INTEGER NOT NULL DEFAULT 0,    -- attempts started; the current attempt's number
    failures INTEGER NOT NULL DEFAULT 0,    -- attempts that reported failure
    host     TEXT,                          -- assigned host, or the host that finished it
    lo       INTEGER,                       -- planned map subtask: its split part's bounds
    hi       INTEGER,
    argv     TEXT,                          -- explicit spec: JSON array (NULL otherwise)
    env      TEXT,                          -- explicit spec: JSON object, NULL when empty
    stdin    BLOB,                          -- explicit spec: NULL when empty
    error    TEXT,                          -- why the controller parked it without running it
    PRIMARY KEY (job, idx)
) WITHOUT ROWID;

INSERT INTO subtasks_v2 (job, idx, state, epoch, failures, host, argv, env, stdin)
    SELECT job, idx, state, epoch, failures, host, argv, env, stdin FROM subtasks;
DROP TABLE subtasks;
ALTER TABLE subtasks_v2 RENAME TO subtasks;

-- The dispatch queue: only queued rows are in it.
CREATE INDEX subtasks_queued ON subtasks (job, idx) WHERE state = 0;
-- What each host runs: only assigned rows are in it.
CREATE INDEX subtasks_assigned ON subtasks (host) WHERE state = 1;

-- Map subtasks of the job (the reduce, when there is one, is index n_map).
ALTER TABLE jobs ADD COLUMN n_map INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET n_map = n_total;
-- 1 when the job runs a reduce step after its map subtasks.
ALTER TABLE jobs ADD COLUMN has_reduce INTEGER NOT NULL DEFAULT 0;
-- Why the job failed, when the controller itself refused something.
ALTER TABLE jobs ADD COLUMN error TEXT;
