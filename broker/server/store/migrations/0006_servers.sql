-- Waystation server store, schema version 6: each merge server records its liveness
-- (broker/server/liveness.py): when it started, when it last recorded itself (every few
-- seconds while it runs) and when it stopped cleanly (0: running, or it died), so that
-- `waystation server status` can tell the operator that no server is running.
CREATE TABLE servers (
    id text COLLATE "C" PRIMARY KEY,
    grp text NOT NULL DEFAULT '',
    version text NOT NULL DEFAULT '',
    started_ms bigint NOT NULL,
    seen_ms bigint NOT NULL,
    stopped_ms bigint NOT NULL DEFAULT 0
);
