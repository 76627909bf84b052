-- Waystation server store, schema version 9: a merge server also records since when its
-- store refuses its writes (a full disk, a read-only database, a lost connection that
-- does not come back), and the latest error, so that `waystation server status` does
-- not call a server that merges nothing simply "running" (broker/server/liveness.py).
-- 0 and '': its writes go through (or an earlier release).
ALTER TABLE servers ADD COLUMN store_failing_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN store_error text NOT NULL DEFAULT '';
