-- Waystation server store, schema version 4: the published collection-schema history
-- (`waystation schema publish / history / rollback`, broker/server/schema_history.py).
-- `text` is the TOML file as published, its [[migrations]] included; a rolled-back
-- version keeps its row (rolled_back_ms > 0) so that its number is never reused.
CREATE TABLE schema_versions (
    version        bigint PRIMARY KEY CHECK (version >= 1),
    published_ms   bigint NOT NULL,
    source         text NOT NULL,
    text           text NOT NULL,
    rolled_back_ms bigint NOT NULL DEFAULT 0
);
