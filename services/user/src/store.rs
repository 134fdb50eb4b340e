//! The service's tables (see `migrations/`): the SQL, and the rows as domain
//! values. Callers own the transaction; nothing here commits.

use time::OffsetDateTime;
use tokio_postgres::{Client, Error, GenericClient, Row, Transaction};
use trellis::events::to_timestamp;
use trellis::pb::telco::user::v1 as pb;
use uuid::Uuid;

use crate::validate::NewUser;

/// The unique constraint on `users.msisdn` (V1__init.sql).
pub const MSISDN_UNIQUE: &str = "users_msisdn_unique";

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Assigned on creation.
    pub id: Uuid,
    /// E.164 phone number, unique.
    pub msisdn: String,
    /// Display name.
    pub name: String,
    /// Email address.
    pub email: String,
    /// When the row was inserted (the database's clock).
    pub created_at: OffsetDateTime,
}

/// A plan of the catalogue; amounts in cents of `currency_code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// e.g. "basic".
    pub id: String,
    /// Display name.
    pub name: String,
    /// ISO 4217 code.
    pub currency_code: String,
    /// Fee per calendar month, cents.
    pub monthly_fee_cents: i64,
    /// Data included per month, MB.
    pub included_data_mb: i64,
    /// Voice included per month, seconds.
    pub included_voice_seconds: i64,
    /// SMS included per month.
    pub included_sms: i64,
    /// Price per MB beyond the allowance, cents.
    pub extra_data_mb_cents: i64,
    /// Price per voice minute beyond the allowance, cents.
    pub extra_voice_minute_cents: i64,
    /// Price per SMS beyond the allowance, cents.
    pub extra_sms_cents: i64,
}

/// A user on a plan from `started_at` until the user's next subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Assigned on creation.
    pub id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The plan.
    pub plan_id: String,
    /// When it takes effect (microsecond precision).
    pub started_at: OffsetDateTime,
}

/// What a user's subscriptions look like around one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// The latest subscription starting at or before the instant.
    pub in_force: Option<Subscription>,
    /// The earliest subscription starting after the instant.
    pub next: Option<Subscription>,
}

/// Inserts a user. A duplicate msisdn fails with a unique violation on
/// [`MSISDN_UNIQUE`].
pub async fn insert_user(tx: &Transaction<'_>, user: &NewUser) -> Result<User, Error> {
    let row = tx
        .query_one(
            "INSERT INTO users (id, msisdn, name, email) VALUES ($1, $2, $3, $4)
             RETURNING id, msisdn, name, email, created_at",
            &[&Uuid::new_v4(), &user.msisdn, &user.name, &user.email],
        )
        .await?;
    user_from(&row)
}

/// One user, if it exists.
pub async fn get_user(db: &Client, id: Uuid) -> Result<Option<User>, Error> {
    db.query_opt(
        "SELECT id, msisdn, name, email, created_at FROM users WHERE id = $1",
        &[&id],
    )
    .await?
    .as_ref()
    .map(user_from)
    .transpose()
}

/// Locks the user's row until the transaction ends, so that plan changes of
/// one user happen one after the other; false if there is no such user.
pub async fn lock_user(tx: &Transaction<'_>, id: Uuid) -> Result<bool, Error> {
    let row = tx
        .query_opt("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&id])
        .await?;
    Ok(row.is_some())
}

/// Every plan, cheapest first, ties by ID.
pub async fn list_plans(db: &Client) -> Result<Vec<Plan>, Error> {
    let rows = db
        .query(
            &format!("SELECT {PLAN_COLUMNS} FROM plans ORDER BY monthly_fee_cents, id"),
            &[],
        )
        .await?;
    rows.iter().map(plan_from).collect()
}

/// One plan, if it exists.
pub async fn get_plan(db: &impl GenericClient, id: &str) -> Result<Option<Plan>, Error> {
    db.query_opt(
        &format!("SELECT {PLAN_COLUMNS} FROM plans WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(plan_from)
    .transpose()
}

/// The user's subscriptions around `at`: the one in force and the next one.
/// `None` if the user does not exist. One statement, so one snapshot.
pub async fn timeline(
    db: &impl GenericClient,
    user_id: Uuid,
    at: OffsetDateTime,
) -> Result<Option<Timeline>, Error> {
    let row = db
        .query_opt(
            "SELECT c.id, c.plan_id, c.started_at, n.id, n.plan_id, n.started_at
             FROM users u
             LEFT JOIN LATERAL (
                 SELECT id, plan_id, started_at FROM subscriptions
                 WHERE user_id = u.id AND started_at <= $2
                 ORDER BY started_at DESC LIMIT 1
             ) c ON true
             LEFT JOIN LATERAL (
                 SELECT id, plan_id, started_at FROM subscriptions
                 WHERE user_id = u.id AND started_at > $2
                 ORDER BY started_at LIMIT 1
             ) n ON true
             WHERE u.id = $1",
            &[&user_id, &at],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let subscription = |offset: usize| -> Result<Option<Subscription>, Error> {
        let id: Option<Uuid> = row.try_get(offset)?;
        id.map(|id| {
            Ok(Subscription {
                id,
                user_id,
                plan_id: row.try_get(offset + 1)?,
                started_at: row.try_get(offset + 2)?,
            })
        })
        .transpose()
    };
    Ok(Some(Timeline {
        in_force: subscription(0)?,
        next: subscription(3)?,
    }))
}

/// Removes every subscription of the user starting at or after `from`: the
/// new one replaces them. Returns how many were removed.
pub async fn delete_from(
    tx: &Transaction<'_>,
    user_id: Uuid,
    from: OffsetDateTime,
) -> Result<u64, Error> {
    tx.execute(
        "DELETE FROM subscriptions WHERE user_id = $1 AND started_at >= $2",
        &[&user_id, &from],
    )
    .await
}

/// Inserts a subscription and returns it as stored.
pub async fn insert_subscription(
    tx: &Transaction<'_>,
    user_id: Uuid,
    plan_id: &str,
    started_at: OffsetDateTime,
) -> Result<Subscription, Error> {
    let row = tx
        .query_one(
            "INSERT INTO subscriptions (id, user_id, plan_id, started_at)
             VALUES ($1, $2, $3, $4)
             RETURNING id, user_id, plan_id, started_at",
            &[&Uuid::new_v4(), &user_id, &plan_id, &started_at],
        )
        .await?;
    Ok(Subscription {
        id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        plan_id: row.try_get(2)?,
        started_at: row.try_get(3)?,
    })
}

const PLAN_COLUMNS: &str = "id, name, currency_code, monthly_fee_cents, included_data_mb, \
     included_voice_seconds, included_sms, extra_data_mb_cents, extra_voice_minute_cents, \
     extra_sms_cents";

fn user_from(row: &Row) -> Result<User, Error> {
    Ok(User {
        id: row.try_get(0)?,
        msisdn: row.try_get(1)?,
        name: row.try_get(2)?,
        email: row.try_get(3)?,
        created_at: row.try_get(4)?,
    })
}

fn plan_from(row: &Row) -> Result<Plan, Error> {
    Ok(Plan {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        currency_code: row.try_get(2)?,
        monthly_fee_cents: row.try_get(3)?,
        included_data_mb: row.try_get(4)?,
        included_voice_seconds: row.try_get(5)?,
        included_sms: row.try_get(6)?,
        extra_data_mb_cents: row.try_get(7)?,
        extra_voice_minute_cents: row.try_get(8)?,
        extra_sms_cents: row.try_get(9)?,
    })
}

impl From<User> for pb::User {
    fn from(user: User) -> Self {
        pb::User {
            id: user.id.to_string(),
            msisdn: user.msisdn,
            name: user.name,
            email: user.email,
            created_at: Some(to_timestamp(user.created_at)),
        }
    }
}

impl From<Plan> for pb::Plan {
    fn from(plan: Plan) -> Self {
        pb::Plan {
            id: plan.id,
            name: plan.name,
            currency_code: plan.currency_code,
            monthly_fee_cents: plan.monthly_fee_cents,
            included_data_mb: plan.included_data_mb,
            included_voice_seconds: plan.included_voice_seconds,
            included_sms: plan.included_sms,
            extra_data_mb_cents: plan.extra_data_mb_cents,
            extra_voice_minute_cents: plan.extra_voice_minute_cents,
            extra_sms_cents: plan.extra_sms_cents,
        }
    }
}

impl From<Subscription> for pb::Subscription {
    fn from(subscription: Subscription) -> Self {
        pb::Subscription {
            id: subscription.id.to_string(),
            user_id: subscription.user_id.to_string(),
            plan_id: subscription.plan_id,
            started_at: Some(to_timestamp(subscription.started_at)),
        }
    }
}
