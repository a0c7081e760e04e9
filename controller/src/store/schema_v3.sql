-- sparegrid controller store, migration to schema version 3
-- (PRAGMA user_version = 3). Applied in one transaction with the version
-- bump; never edit it once released.
--
-- Pull mode (issue 5). A job's dispatch mode decides who may take its
-- subtasks: push jobs only the push dispatcher (Store::claim), pull jobs
-- only agents that lease (Store::claim_leases). A lease is an assigned
-- subtask with an expiry: lease_expires_ms (controller clock, ms since the
-- epoch) is set when it is leased and moved on by each renewal; when it
-- passes, Store::expire_leases withdraws the attempt ("lease expired") and
-- the subtask goes back to the queue. It is NULL for pushed subtasks and
-- for every subtask that is not assigned.

-- 0 push, 1 pull, 2 p2p. Jobs from before version 3 were all push jobs.
ALTER TABLE jobs ADD COLUMN mode INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN lease_expires_ms INTEGER;
-- Leases by expiry, for the sweep: only assigned, leased rows are in it.
CREATE INDEX subtasks_leases ON subtasks (lease_expires_ms)
    WHERE state = 1 AND lease_expires_ms IS NOT NULL;
