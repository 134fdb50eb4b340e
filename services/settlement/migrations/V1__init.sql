-- Settlement's own copy of what bills are computed from, kept from events
-- alone. The inbox (which events were applied) belongs to the library.

-- Every subscription a user has had or will have, with the plan's terms as
-- carried by its "subscription.changed" event. A user has at most one
-- subscription starting at a given instant.
CREATE TABLE subscriptions (
    user_id                  TEXT        NOT NULL,
    started_at               TIMESTAMPTZ NOT NULL,
    subscription_id          TEXT        NOT NULL,
    plan_id                  TEXT        NOT NULL,
    currency_code            TEXT        NOT NULL,
    monthly_fee_cents        BIGINT      NOT NULL CHECK (monthly_fee_cents >= 0),
    included_data_mb         BIGINT      NOT NULL CHECK (included_data_mb >= 0),
    included_voice_seconds   BIGINT      NOT NULL CHECK (included_voice_seconds >= 0),
    included_sms             BIGINT      NOT NULL CHECK (included_sms >= 0),
    extra_data_mb_cents      BIGINT      NOT NULL CHECK (extra_data_mb_cents >= 0),
    extra_voice_minute_cents BIGINT      NOT NULL CHECK (extra_voice_minute_cents >= 0),
    extra_sms_cents          BIGINT      NOT NULL CHECK (extra_sms_cents >= 0),
    -- The event that stored this row, and when it was applied.
    event_id                 TEXT        NOT NULL,
    applied_at               TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, started_at)
);

-- Usage totals per user, billing month (UTC) and usage type
-- (telco.usage.v1.UsageType: 1 DATA in MB, 2 VOICE in seconds, 3 SMS).
CREATE TABLE usage_totals (
    user_id      TEXT     NOT NULL,
    month        DATE     NOT NULL CHECK (EXTRACT(DAY FROM month) = 1),
    usage_type   SMALLINT NOT NULL CHECK (usage_type BETWEEN 1 AND 3),
    quantity     BIGINT   NOT NULL CHECK (quantity >= 0),
    record_count BIGINT   NOT NULL CHECK (record_count >= 0),
    PRIMARY KEY (user_id, month, usage_type)
);

-- The last event that affected a user's month (usage that occurred in it, or
-- a subscription starting in it): how up to date that month's bill is.
CREATE TABLE bill_marks (
    user_id       TEXT        NOT NULL,
    month         DATE        NOT NULL CHECK (EXTRACT(DAY FROM month) = 1),
    last_event_id TEXT        NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, month)
);
