-- sparegrid controller store, migration to schema version 4
-- (PRAGMA user_version = 4). Applied in one transaction with the version
-- bump; never edit it once released.
--
-- The grid overlay (issue 7). Each host that registers a WireGuard tunnel
-- holds a slice of the controller's overlay.cidr, kept here so that the
-- same host gets the same slice back across agent and controller
-- restarts. public_key and endpoint are what the host last registered;
-- both are NULL while it runs without a tunnel (it keeps the slice, but
-- takes no overlay job). A slice is released (its row deleted) once its
-- host is lost and its last heartbeat is older than overlay.release_after.

-- A job's network: 0 none, 1 overlay. Jobs from before version 4 had none.
ALTER TABLE jobs ADD COLUMN network INTEGER NOT NULL DEFAULT 0;

CREATE TABLE overlay_slices (
    host          TEXT PRIMARY KEY,
    slice         TEXT    NOT NULL UNIQUE,  -- "100.96.3.0/24"
    public_key    TEXT    UNIQUE,           -- canonical base64; NULL: no tunnel now
    endpoint      TEXT,                     -- "ip:port"; NULL: unknown
    allocated_ms  INTEGER NOT NULL,
    updated_ms    INTEGER NOT NULL
);
