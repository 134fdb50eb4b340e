//! Settlement's database: subscriptions, monthly usage totals and the
//! per-month marks of the last event applied (see `migrations/`).
//!
//! Every function runs inside the caller's transaction, so an event's effect
//! commits together with its inbox record, and a bill is read from one
//! snapshot.

use deadpool_postgres::Transaction;
use time::{Date, OffsetDateTime};
use tokio_postgres::{Error, Row};

use crate::billing::{BillingMonth, Plan, UsageKind};

/// A subscription as a "subscription.changed" event announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubscription {
    /// The subscribed user.
    pub user_id: String,
    /// The subscription's ID at the user service.
    pub subscription_id: String,
    /// When it takes or took effect.
    pub started_at: OffsetDateTime,
    /// The plan's terms at the time of the change.
    pub plan: Plan,
}

/// One usage record as a "usage.recorded" event announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUsage {
    /// The user who consumed.
    pub user_id: String,
    /// The billing month of its `occurred_at`.
    pub month: BillingMonth,
    /// What was consumed.
    pub kind: UsageKind,
    /// How much, in the kind's unit; positive.
    pub quantity: i64,
}

/// A stored subscription with the event that stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    /// When it takes or took effect.
    pub started_at: OffsetDateTime,
    /// The plan's terms.
    pub plan: Plan,
    /// The event that stored it.
    pub event_id: String,
    /// When that event was applied.
    pub applied_at: OffsetDateTime,
}

/// The last event applied to a user's month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The event's ID.
    pub last_event_id: String,
    /// When it was applied.
    pub updated_at: OffsetDateTime,
}

/// Stores `sub`, replacing every subscription of the user starting at or
/// after it (the user service's Subscribe replaces the plan in force from
/// then on and any change scheduled after it), and marks the month it
/// starts in.
pub async fn put_subscription(
    tx: &Transaction<'_>,
    event_id: &str,
    sub: &NewSubscription,
) -> Result<(), Error> {
    tx.execute(
        "DELETE FROM subscriptions WHERE user_id = $1 AND started_at >= $2",
        &[&sub.user_id, &sub.started_at],
    )
    .await?;
    let plan = &sub.plan;
    tx.execute(
        "INSERT INTO subscriptions (user_id, started_at, subscription_id, plan_id, currency_code, \
             monthly_fee_cents, included_data_mb, included_voice_seconds, included_sms, \
             extra_data_mb_cents, extra_voice_minute_cents, extra_sms_cents, event_id, applied_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now())",
        &[
            &sub.user_id,
            &sub.started_at,
            &sub.subscription_id,
            &plan.plan_id,
            &plan.currency_code,
            &plan.monthly_fee_cents,
            &plan.included_data_mb,
            &plan.included_voice_seconds,
            &plan.included_sms,
            &plan.extra_data_mb_cents,
            &plan.extra_voice_minute_cents,
            &plan.extra_sms_cents,
            &event_id,
        ],
    )
    .await?;
    mark(
        tx,
        &sub.user_id,
        BillingMonth::containing(sub.started_at),
        event_id,
    )
    .await
}

/// Adds `usage` to its month's total and marks the month. A total that
/// would overflow fails (PostgreSQL's `bigint out of range`) rather than
/// wrap.
pub async fn add_usage(
    tx: &Transaction<'_>,
    event_id: &str,
    usage: &NewUsage,
) -> Result<(), Error> {
    let kind = i16::try_from(usage.kind.code()).expect("usage codes are 1 to 3");
    // Prepared once per connection: every usage event runs it.
    let statement = tx
        .prepare_cached(
            "INSERT INTO usage_totals (user_id, month, usage_type, quantity, record_count) \
             VALUES ($1, $2, $3, $4, 1) \
             ON CONFLICT (user_id, month, usage_type) DO UPDATE \
             SET quantity = usage_totals.quantity + EXCLUDED.quantity, \
                 record_count = usage_totals.record_count + 1",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &usage.user_id,
            &usage.month.first_day(),
            &kind,
            &usage.quantity,
        ],
    )
    .await?;
    mark(tx, &usage.user_id, usage.month, event_id).await
}

async fn mark(
    tx: &Transaction<'_>,
    user_id: &str,
    month: BillingMonth,
    event_id: &str,
) -> Result<(), Error> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO bill_marks (user_id, month, last_event_id, updated_at) \
             VALUES ($1, $2, $3, now()) \
             ON CONFLICT (user_id, month) DO UPDATE \
             SET last_event_id = EXCLUDED.last_event_id, updated_at = EXCLUDED.updated_at",
        )
        .await?;
    tx.execute(&statement, &[&user_id, &month.first_day(), &event_id])
        .await?;
    Ok(())
}

const SUBSCRIPTION_COLUMNS: &str = "started_at, plan_id, currency_code, monthly_fee_cents, \
    included_data_mb, included_voice_seconds, included_sms, extra_data_mb_cents, \
    extra_voice_minute_cents, extra_sms_cents, event_id, applied_at";

fn stored_subscription(row: &Row) -> Result<StoredSubscription, Error> {
    Ok(StoredSubscription {
        started_at: row.try_get("started_at")?,
        plan: Plan {
            plan_id: row.try_get("plan_id")?,
            currency_code: row.try_get("currency_code")?,
            monthly_fee_cents: row.try_get("monthly_fee_cents")?,
            included_data_mb: row.try_get("included_data_mb")?,
            included_voice_seconds: row.try_get("included_voice_seconds")?,
            included_sms: row.try_get("included_sms")?,
            extra_data_mb_cents: row.try_get("extra_data_mb_cents")?,
            extra_voice_minute_cents: row.try_get("extra_voice_minute_cents")?,
            extra_sms_cents: row.try_get("extra_sms_cents")?,
        },
        event_id: row.try_get("event_id")?,
        applied_at: row.try_get("applied_at")?,
    })
}

/// The user's latest subscription starting before `end` (any, if `end` is
/// `None`): the plan in force at that instant.
pub async fn subscription_before(
    tx: &Transaction<'_>,
    user_id: &str,
    end: Option<OffsetDateTime>,
) -> Result<Option<StoredSubscription>, Error> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions \
                 WHERE user_id = $1 AND ($2::timestamptz IS NULL OR started_at < $2) \
                 ORDER BY started_at DESC LIMIT 1"
            ),
            &[&user_id, &end],
        )
        .await?;
    row.as_ref().map(stored_subscription).transpose()
}

/// Every subscription of the user, earliest first.
pub async fn subscriptions(
    tx: &Transaction<'_>,
    user_id: &str,
) -> Result<Vec<StoredSubscription>, Error> {
    tx.query(
        &format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions \
             WHERE user_id = $1 ORDER BY started_at"
        ),
        &[&user_id],
    )
    .await?
    .iter()
    .map(stored_subscription)
    .collect()
}

/// The user's usage totals of the months `from` to `to` (inclusive), as
/// (month, kind, quantity).
pub async fn usage(
    tx: &Transaction<'_>,
    user_id: &str,
    from: BillingMonth,
    to: BillingMonth,
) -> Result<Vec<(BillingMonth, UsageKind, i64)>, Error> {
    let rows = tx
        .query(
            "SELECT month, usage_type, quantity FROM usage_totals \
             WHERE user_id = $1 AND month BETWEEN $2 AND $3",
            &[&user_id, &from.first_day(), &to.first_day()],
        )
        .await?;
    let mut totals = Vec::with_capacity(rows.len());
    for row in rows {
        let month: Date = row.try_get("month")?;
        let code: i16 = row.try_get("usage_type")?;
        // The table's CHECK admits only known kinds.
        if let Some(kind) = UsageKind::from_code(code.into()) {
            totals.push((BillingMonth::of_date(month), kind, row.try_get("quantity")?));
        }
    }
    Ok(totals)
}

/// The latest month in which the user has usage.
pub async fn last_usage_month(
    tx: &Transaction<'_>,
    user_id: &str,
) -> Result<Option<BillingMonth>, Error> {
    let row = tx
        .query_one(
            "SELECT max(month) AS month FROM usage_totals WHERE user_id = $1",
            &[&user_id],
        )
        .await?;
    let month: Option<Date> = row.try_get("month")?;
    Ok(month.map(BillingMonth::of_date))
}

/// The marks of the user's months `from` to `to` (inclusive).
pub async fn marks(
    tx: &Transaction<'_>,
    user_id: &str,
    from: BillingMonth,
    to: BillingMonth,
) -> Result<Vec<(BillingMonth, Mark)>, Error> {
    let rows = tx
        .query(
            "SELECT month, last_event_id, updated_at FROM bill_marks \
             WHERE user_id = $1 AND month BETWEEN $2 AND $3",
            &[&user_id, &from.first_day(), &to.first_day()],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let month: Date = row.try_get("month")?;
            Ok((
                BillingMonth::of_date(month),
                Mark {
                    last_event_id: row.try_get("last_event_id")?,
                    updated_at: row.try_get("updated_at")?,
                },
            ))
        })
        .collect()
}
