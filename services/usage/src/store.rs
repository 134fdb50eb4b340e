//! The SQL of the usage service, over the `usage_records` table of
//! `migrations/V1__init.sql`.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::domain::{ListQuery, NewUsage, StoredUsage, SummaryQuery, UsageKind};

const COLUMNS: &str =
    "id, user_id, usage_type, quantity, occurred_at, idempotency_key, recorded_at";

/// A row that does not hold a usage record as this service writes them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    /// A stored `usage_type` is not one of ours.
    #[error("usage record {id} has unknown usage_type {value}")]
    UnknownType {
        /// The record.
        id: Uuid,
        /// The stored number.
        value: i16,
    },
}

impl StoreError {
    /// What the caller sees: database failures as `trellis::db::status`
    /// maps them, a corrupt row as INTERNAL (detail only in the log).
    pub fn into_status(self) -> tonic::Status {
        match self {
            StoreError::Db(e) => trellis::db::status(e),
            e @ StoreError::UnknownType { .. } => {
                tracing::error!(error = %e, "corrupt usage record");
                tonic::Status::internal("internal error")
            }
        }
    }
}

fn record(row: &Row) -> Result<StoredUsage, StoreError> {
    let id: Uuid = row.try_get("id")?;
    let value: i16 = row.try_get("usage_type")?;
    Ok(StoredUsage {
        id,
        user_id: row.try_get("user_id")?,
        kind: UsageKind::from_db(value).ok_or(StoreError::UnknownType { id, value })?,
        quantity: row.try_get("quantity")?,
        occurred_at: row.try_get("occurred_at")?,
        idempotency_key: row.try_get("idempotency_key")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// The record of `user_id` created with `idempotency_key`, if any.
pub async fn find_by_key(
    db: &impl GenericClient,
    user_id: &str,
    idempotency_key: &str,
) -> Result<Option<StoredUsage>, StoreError> {
    let sql =
        format!("SELECT {COLUMNS} FROM usage_records WHERE user_id = $1 AND idempotency_key = $2");
    // Prepared once per connection: every RecordUsage runs it.
    let statement = db.prepare_cached(&sql).await?;
    db.query_opt(&statement, &[&user_id, &idempotency_key])
        .await?
        .as_ref()
        .map(record)
        .transpose()
}

/// Inserts `usage` as a new record unless one with the same user and key
/// exists (committed, or committed meanwhile by a concurrent transaction,
/// which this waits for): `None` then.
pub async fn insert(
    db: &impl GenericClient,
    usage: &NewUsage,
) -> Result<Option<StoredUsage>, StoreError> {
    let sql = format!(
        "INSERT INTO usage_records ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, now()) \
         ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING {COLUMNS}"
    );
    let statement = db.prepare_cached(&sql).await?;
    db.query_opt(
        &statement,
        &[
            &Uuid::new_v4(),
            &usage.user_id,
            &usage.kind.to_db(),
            &usage.quantity,
            &usage.occurred_at,
            &usage.idempotency_key,
        ],
    )
    .await?
    .as_ref()
    .map(record)
    .transpose()
}

/// The records `query` selects, ordered by `occurred_at` then ID.
pub async fn list(
    db: &impl GenericClient,
    query: &ListQuery,
) -> Result<Vec<StoredUsage>, StoreError> {
    // NULL bounds select everything on that side; the index on
    // (user_id, occurred_at, id) serves the order and the range.
    let sql = format!(
        "SELECT {COLUMNS} FROM usage_records WHERE user_id = $1 \
         AND ($2::timestamptz IS NULL OR occurred_at >= $2) \
         AND ($3::timestamptz IS NULL OR occurred_at < $3) \
         ORDER BY occurred_at, id LIMIT $4"
    );
    db.query(
        &sql,
        &[&query.user_id, &query.start, &query.end, &query.limit],
    )
    .await?
    .iter()
    .map(record)
    .collect()
}

/// One line of a summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Total {
    /// The kind totalled.
    pub kind: UsageKind,
    /// Sum of the quantities.
    pub quantity: i64,
    /// Number of records.
    pub records: i64,
}

/// The totals per kind over the period of `query`, one per kind in
/// [`UsageKind::ALL`] order, zero where there was no usage.
pub async fn summary(
    db: &impl GenericClient,
    query: &SummaryQuery,
) -> Result<Vec<Total>, StoreError> {
    // A record is at most 1e6, so a BIGINT sum overflows only past ~9e12
    // records of one user in 400 days; if it ever did, the cast fails and
    // the caller gets INTERNAL, never a wrong number.
    let rows = db
        .query(
            "SELECT usage_type, SUM(quantity)::BIGINT AS quantity, COUNT(*) AS records \
             FROM usage_records WHERE user_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
             GROUP BY usage_type",
            &[&query.user_id, &query.start, &query.end],
        )
        .await?;
    let mut totals: Vec<Total> = UsageKind::ALL
        .iter()
        .map(|&kind| Total {
            kind,
            quantity: 0,
            records: 0,
        })
        .collect();
    for row in rows {
        let value: i16 = row.try_get("usage_type")?;
        let Some(total) = totals.iter_mut().find(|t| t.kind.to_db() == value) else {
            // Not one of ours (written by hand?): ignore it rather than fail
            // the whole summary, but say so.
            tracing::warn!(usage_type = value, user.id = %query.user_id, "unknown usage_type in summary");
            continue;
        };
        total.quantity = row.try_get("quantity")?;
        total.records = row.try_get("records")?;
    }
    Ok(totals)
}
