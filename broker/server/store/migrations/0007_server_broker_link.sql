-- Waystation server store, schema version 7: a merge server also records since when it
-- has not been connected to its broker (0: connected), so that `waystation server status`
-- does not call a server cut off from the broker simply "running" while the devices'
-- changes wait in the broker (broker/server/liveness.py).
ALTER TABLE servers ADD COLUMN broker_down_ms bigint NOT NULL DEFAULT 0;
