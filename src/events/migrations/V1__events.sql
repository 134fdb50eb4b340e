-- The event tables every Trellis service has (created by the shared
-- library, history in trellis_events_schema_history).

-- Outbox: one row per event and subscriber, written in the transaction of
-- the change the event announces; deleted once the subscriber has
-- acknowledged it, parked if the subscriber refused it as invalid.
CREATE TABLE trellis_outbox (
    id              BIGSERIAL PRIMARY KEY,
    subscriber      TEXT NOT NULL,
    event_id        UUID NOT NULL,
    topic           TEXT NOT NULL,
    key             TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    payload_type    TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    parked_at       TIMESTAMPTZ,
    UNIQUE (subscriber, event_id)
);
CREATE INDEX trellis_outbox_pending ON trellis_outbox (subscriber, key, sequence)
    WHERE parked_at IS NULL;
CREATE INDEX trellis_outbox_parked ON trellis_outbox (id) WHERE parked_at IS NOT NULL;

-- The last sequence number given to each key: taking the next one locks
-- the key's row until commit, so sequence order is commit order per key.
CREATE TABLE trellis_outbox_keys (
    key           TEXT PRIMARY KEY,
    last_sequence BIGINT NOT NULL
);

-- Inbox: the events a subscriber applied, written in the transaction of
-- their effect, so a redelivered event changes nothing.
CREATE TABLE trellis_inbox (
    event_id   UUID PRIMARY KEY,
    source     TEXT NOT NULL,
    key        TEXT NOT NULL,
    sequence   BIGINT NOT NULL,
    topic      TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
