-- Users, the plan catalogue and subscriptions.
-- The outbox table is created by the trellis library, not here.

CREATE TABLE users (
    id          UUID        PRIMARY KEY,
    -- E.164, validated by the service; the constraint name is what the
    -- service maps to ALREADY_EXISTS.
    msisdn      TEXT        NOT NULL CONSTRAINT users_msisdn_unique UNIQUE,
    name        TEXT        NOT NULL,
    email       TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every amount is integer cents of currency_code; allowances are per
-- calendar month.
CREATE TABLE plans (
    id                       TEXT   PRIMARY KEY,
    name                     TEXT   NOT NULL,
    currency_code            TEXT   NOT NULL CHECK (currency_code ~ '^[A-Z]{3}$'),
    monthly_fee_cents        BIGINT NOT NULL CHECK (monthly_fee_cents >= 0),
    included_data_mb         BIGINT NOT NULL CHECK (included_data_mb >= 0),
    included_voice_seconds   BIGINT NOT NULL CHECK (included_voice_seconds >= 0),
    included_sms             BIGINT NOT NULL CHECK (included_sms >= 0),
    extra_data_mb_cents      BIGINT NOT NULL CHECK (extra_data_mb_cents >= 0),
    extra_voice_minute_cents BIGINT NOT NULL CHECK (extra_voice_minute_cents >= 0),
    extra_sms_cents          BIGINT NOT NULL CHECK (extra_sms_cents >= 0)
);

-- A user's plan history: each row is in force from started_at until the
-- next row of the same user starts. Rows starting later than now are
-- scheduled changes.
CREATE TABLE subscriptions (
    id          UUID        PRIMARY KEY,
    user_id     UUID        NOT NULL REFERENCES users (id),
    plan_id     TEXT        NOT NULL REFERENCES plans (id),
    -- When the subscription takes effect (microsecond precision).
    started_at  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Two rows starting at the same instant would make "the plan in force"
    -- ambiguous; the index also serves every lookup by user and time.
    CONSTRAINT subscriptions_user_started_unique UNIQUE (user_id, started_at)
);
