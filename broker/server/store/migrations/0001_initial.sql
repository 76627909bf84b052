-- Waystation server store, schema version 1 (see broker/server/store/postgres/).
-- Applied by the store itself on open, inside one transaction, under an advisory lock.
-- Every name lives in the schema `waystation`; text keys use the "C" collation so that
-- they sort byte-wise, as in the LMDB store (and as Python sorts str).

-- registry generation: one row, bumped by every structural registry change
CREATE TABLE registry_gen (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    gen bigint NOT NULL
);
INSERT INTO registry_gen (one, gen) VALUES (true, 0);

-- devices: DeviceRow.to_json() (jsonb, so that concurrent writers can merge fields)
CREATE TABLE devices (
    id text COLLATE "C" PRIMARY KEY,
    data jsonb NOT NULL
);

-- records: merge.to_json() as orjson bytes (never parsed by the database), and the
-- record's entry in its scope's compacted change log: (scope, q) of its newest version.
-- A row may hold only one of the two (state NULL: a bare log entry; q NULL: no entry).
CREATE TABLE records (
    c text COLLATE "C" NOT NULL,
    k text COLLATE "C" NOT NULL,
    state bytea,
    scope text COLLATE "C",
    q bigint,
    PRIMARY KEY (c, k),
    CHECK ((scope IS NULL) = (q IS NULL)),
    CHECK (state IS NOT NULL OR q IS NOT NULL)
);
-- the compacted change log in q order per scope: what catch-up pages read
CREATE INDEX records_log ON records (scope, q) WHERE q IS NOT NULL;

-- per scope: the last allocated q (the row every writer of the scope locks) and the
-- purge horizon (highest q of a purged tombstone)
CREATE TABLE scope_seq (
    scope text COLLATE "C" PRIMARY KEY,
    q bigint NOT NULL DEFAULT 0,
    horizon bigint NOT NULL DEFAULT 0
);

-- deleted records, oldest first per scope, for purging
CREATE TABLE tombs (
    scope text COLLATE "C" NOT NULL,
    q bigint NOT NULL,
    c text COLLATE "C" NOT NULL,
    k text COLLATE "C" NOT NULL,
    t_ms bigint NOT NULL,
    PRIMARY KEY (scope, q)
);

-- what became of each change id: applied at (scope, q) or rejected (code, reason).
-- The primary key is what makes a change apply once across concurrent consumers.
CREATE TABLE outcomes (
    dev text COLLATE "C" NOT NULL,
    n bigint NOT NULL,
    c text NOT NULL,
    k text NOT NULL,
    scope text NOT NULL DEFAULT '',
    q bigint NOT NULL DEFAULT 0,
    code text NOT NULL DEFAULT '',
    reason text NOT NULL DEFAULT '',
    PRIMARY KEY (dev, n)
);

-- the conflict log; open entries are also indexed per field
CREATE TABLE conflicts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_ms bigint NOT NULL,
    c text COLLATE "C" NOT NULL,
    k text COLLATE "C" NOT NULL,
    s text NOT NULL,
    field text COLLATE "C" NOT NULL,
    entry jsonb NOT NULL,
    open boolean NOT NULL,
    closed_ms bigint NOT NULL DEFAULT 0,
    resolution text NOT NULL DEFAULT ''
);
CREATE INDEX conflicts_open_field ON conflicts (c, k, field, id) WHERE open;
CREATE INDEX conflicts_open_id ON conflicts (id) WHERE open;

-- refused input kept for the operator (newest first by id: the primary key)
CREATE TABLE dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    t_ms bigint NOT NULL,
    device text NOT NULL,
    topic text NOT NULL,
    code text NOT NULL,
    reason text NOT NULL,
    raw bytea NOT NULL,
    size bigint NOT NULL
);

-- commands per device
CREATE TABLE commands (
    dev text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    cmd text NOT NULL,
    args jsonb NOT NULL,
    created_ms bigint NOT NULL,
    done_ms bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (dev, id)
);

-- record versions written outside the merge consumer, waiting to be fanned out
CREATE TABLE notices (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope text NOT NULL,
    q bigint NOT NULL,
    rec jsonb NOT NULL
);
