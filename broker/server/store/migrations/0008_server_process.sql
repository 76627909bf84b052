-- Waystation server store, schema version 8: a merge server also records which process
-- on which host it is (boot id, PID namespace, pid, start time), so that
-- `waystation server status` on that host calls a killed or crashed server gone at once
-- rather than "running" until its liveness row is 30 s old
-- (broker/server/process_identity.py). '' : not known (an earlier release, not Linux).
ALTER TABLE servers ADD COLUMN proc text NOT NULL DEFAULT '';
