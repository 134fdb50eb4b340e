-- The plan catalogue. All amounts are euro cents (EUR).
--
-- id     name           fee/month  data incl.        voice incl.           SMS incl.  extra MB  extra min  extra SMS
-- basic  Basic 5 GB      9.99 EUR    5 GB (5120 MB)    100 min (6000 s)       100       2 ct      9 ct       9 ct
-- plus   Plus 20 GB     19.99 EUR   20 GB (20480 MB)   500 min (30000 s)      500       1 ct      5 ct       5 ct
-- max    Max 100 GB     39.99 EUR  100 GB (102400 MB) 3000 min (180000 s)    3000       1 ct      2 ct       2 ct
INSERT INTO plans (
    id, name, currency_code, monthly_fee_cents,
    included_data_mb, included_voice_seconds, included_sms,
    extra_data_mb_cents, extra_voice_minute_cents, extra_sms_cents
) VALUES
    ('basic', 'Basic 5 GB',  'EUR',  999,   5120,   6000,  100, 2, 9, 9),
    ('plus',  'Plus 20 GB',  'EUR', 1999,  20480,  30000,  500, 1, 5, 5),
    ('max',   'Max 100 GB',  'EUR', 3999, 102400, 180000, 3000, 1, 2, 2);
