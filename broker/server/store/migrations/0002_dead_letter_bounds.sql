-- Waystation server store, schema version 2: dead letters bounded by bytes and age,
-- and what the bounds dropped counted (see broker/server/store/postgres/letters.py).

-- what each letter counts against the byte bound (base.dead_letter_bytes: the raw bytes
-- kept, the texts, 64 bytes of overhead)
ALTER TABLE dead_letters ADD COLUMN bytes bigint NOT NULL DEFAULT 0;
UPDATE dead_letters SET bytes = octet_length(raw) + octet_length(reason)
    + octet_length(device) + octet_length(code) + octet_length(topic) + 64;

-- the age bound finds the old letters without reading the table
CREATE INDEX dead_letters_t ON dead_letters (t_ms);

-- letters dropped by the bounds: one row per trim that dropped any (inserts only, so
-- concurrent servers never wait for each other here); periodically folded into one row
CREATE TABLE dead_letter_drops (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    t_ms bigint NOT NULL,
    count bigint NOT NULL,
    bytes bigint NOT NULL
);
