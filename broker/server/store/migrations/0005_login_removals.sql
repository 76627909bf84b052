-- Waystation server store, schema version 5: the broker logins of removed devices that
-- the server still has to delete (RabbitMQ, broker/server/login_removal.py) get a table
-- of their own. Until now each was a `remove_login` row in `commands` (never sent to a
-- device), its failure in `args`; those rows move here (the newest of a device's).
CREATE TABLE login_removals (
    dev text COLLATE "C" PRIMARY KEY,
    id text COLLATE "C" NOT NULL,
    queued_ms bigint NOT NULL,
    failed_ms bigint NOT NULL DEFAULT 0,
    error text NOT NULL DEFAULT '',
    hint text NOT NULL DEFAULT ''
);

INSERT INTO login_removals (dev, id, queued_ms, failed_ms, error, hint)
SELECT DISTINCT ON (dev) dev, id, created_ms,
       CASE WHEN jsonb_typeof(args -> 'failed_ms') = 'number'
            THEN (args ->> 'failed_ms')::bigint ELSE 0 END,
       COALESCE(args ->> 'error', ''), COALESCE(args ->> 'hint', '')
FROM commands
WHERE cmd = 'remove_login' AND done_ms = 0
ORDER BY dev, created_ms DESC, id DESC;

DELETE FROM commands WHERE cmd = 'remove_login';
