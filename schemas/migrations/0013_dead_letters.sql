-- The dead-letter topic, indexed by the workers for the API: a tenant's admins see the records
-- of theirs that were set aside (GET /api/dead-letters). Keyed by the letter's own position
-- and time (a dead-letter topic deleted and made again reuses its positions), so a letter read
-- again is not stored twice. No foreign key to tenants: a record naming a tenant that does not
-- exist is one reason a record is set aside.
CREATE TABLE dead_letters (
    letter_partition integer NOT NULL,
    letter_offset    bigint NOT NULL,
    dead_lettered_at timestamptz NOT NULL,
    tenant_id        uuid,          -- the record's own tenant_id; NULL when it names none
    source_topic     text NOT NULL,
    source_partition integer,
    source_offset    bigint,
    kind             text,
    consumer         text,
    reason           text NOT NULL,
    record_key       bytea,
    record           bytea NOT NULL,
    PRIMARY KEY (letter_partition, letter_offset, dead_lettered_at)
);
CREATE INDEX dead_letters_tenant_time ON dead_letters (tenant_id, dead_lettered_at DESC);
-- Rows older than DEAD_LETTERS_KEPT_DAYS are deleted (they hold the tenants' records).
CREATE INDEX dead_letters_time ON dead_letters (dead_lettered_at);

-- Each replay of a letter (`flexoraa dead-letters replay`), from the marks topic. Apart from
-- the letters: the two topics are read independently, and a mark may be stored first.
CREATE TABLE dead_letter_replays (
    letter_partition integer NOT NULL,
    letter_offset    bigint NOT NULL,
    dead_lettered_at timestamptz NOT NULL,
    replayed_at      timestamptz NOT NULL,
    PRIMARY KEY (letter_partition, letter_offset, dead_lettered_at, replayed_at)
);
CREATE INDEX dead_letter_replays_time ON dead_letter_replays (dead_lettered_at);
