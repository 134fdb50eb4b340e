//! Usage's `usage_records` table, read and written by `check` and `restore`.
//! The table belongs to the usage service (it creates it at start-up); the
//! archive only relies on its columns:
//!
//! ```sql
//! usage_records (id UUID PRIMARY KEY, user_id TEXT, usage_type SMALLINT /* 1 data, 2 voice, 3 sms */,
//!                quantity BIGINT, occurred_at TIMESTAMPTZ, idempotency_key TEXT,
//!                recorded_at TIMESTAMPTZ, UNIQUE (user_id, idempotency_key))
//! ```

use anyhow::{Context, bail};
use futures::TryStreamExt;
use time::OffsetDateTime;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

/// One row of `usage_records`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// Record ID.
    pub id: Uuid,
    /// The user.
    pub user_id: String,
    /// 1 data, 2 voice, 3 sms.
    pub usage_type: i16,
    /// Quantity in the type's unit.
    pub quantity: i64,
    /// When the usage happened.
    pub occurred_at: OffsetDateTime,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// When usage recorded it.
    pub recorded_at: OffsetDateTime,
}

/// Connects to `url`, naming the database's error if that fails.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to usage's database")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

/// Fails with a readable message unless `usage_records` exists.
pub async fn require_table(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<()> {
    let row = client
        .query_one("SELECT to_regclass('usage_records') IS NOT NULL", &[])
        .await
        .context("looking for the usage_records table")?;
    if !row.get::<_, bool>(0) {
        bail!(
            "the database has no usage_records table: the usage service creates it when it starts; \
             start usage once against this database (and stop it), then try again"
        );
    }
    Ok(())
}

/// Every row of `usage_records`.
pub async fn load(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<Vec<UsageRow>> {
    let rows = client
        .query_raw(
            "SELECT id, user_id, usage_type, quantity, occurred_at, idempotency_key, recorded_at \
             FROM usage_records",
            std::iter::empty::<i32>(),
        )
        .await
        .context("reading usage_records")?;
    let rows: Vec<tokio_postgres::Row> =
        rows.try_collect().await.context("reading usage_records")?;
    rows.iter()
        .map(|row| {
            Ok(UsageRow {
                id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                usage_type: row.try_get(2)?,
                quantity: row.try_get(3)?,
                occurred_at: row.try_get(4)?,
                idempotency_key: row.try_get(5)?,
                recorded_at: row.try_get(6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .context("usage_records holds a row the archive cannot read (a NULL or a column of another type)")
}
