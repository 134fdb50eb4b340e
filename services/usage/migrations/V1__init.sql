-- Usage records. The archive's check and restore commands read this table
-- too: change its columns only together with them.
CREATE TABLE usage_records (
    id UUID PRIMARY KEY,
    user_id TEXT NOT NULL,
    -- telco.usage.v1.UsageType number: 1 data, 2 voice, 3 sms
    usage_type SMALLINT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    occurred_at TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, idempotency_key)
);

-- ListUsage and GetUsageSummary: one user's records by time, in the order
-- they are listed.
CREATE INDEX usage_records_user_occurred ON usage_records (user_id, occurred_at, id);
