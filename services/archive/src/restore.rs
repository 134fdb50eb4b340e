//! `trellis-archive restore`: put the archived records back into usage's
//! empty `usage_records` table, all or nothing.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::record::ArchivedRecord;
use crate::store::read_archive;
use crate::usage_db;

/// Inserts every record of the archive in `dir` into `usage_records` at
/// `database_url` in one transaction, and returns how many. Refuses when
/// the table is missing or not empty, or when the archive holds two
/// different records under one ID.
pub async fn restore(dir: &Path, database_url: &str) -> anyhow::Result<u64> {
    let dir = dir.to_owned();
    let contents = tokio::task::spawn_blocking(move || read_archive(&dir))
        .await
        .context("reading the archive")??;
    let records = unique_records(contents.records)?;

    let mut client = usage_db::connect(database_url).await?;
    let tx = client
        .transaction()
        .await
        .context("starting a transaction")?;
    usage_db::require_table(&tx).await?;
    // Keep usage (or a second restore) from writing between the count and
    // the copy.
    tx.batch_execute("LOCK TABLE usage_records IN SHARE ROW EXCLUSIVE MODE")
        .await
        .context("locking usage_records")?;
    let existing: i64 = tx
        .query_one("SELECT count(*) FROM usage_records", &[])
        .await
        .context("counting usage_records")?
        .get(0);
    if existing > 0 {
        bail!(
            "usage_records already holds {existing} rows; restore only fills an empty table \
             (nothing was changed)"
        );
    }

    let sink = tx
        .copy_in(
            "COPY usage_records (id, user_id, usage_type, quantity, occurred_at, idempotency_key, recorded_at) \
             FROM STDIN (FORMAT binary)",
        )
        .await
        .context("starting to copy into usage_records")?;
    let types = [
        Type::UUID,
        Type::TEXT,
        Type::INT2,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TIMESTAMPTZ,
    ];
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    for r in &records {
        writer
            .as_mut()
            .write(&[
                &r.id,
                &r.user_id,
                &r.usage_type.as_i16(),
                &r.quantity,
                &r.occurred_at,
                &r.idempotency_key,
                &r.recorded_at,
            ])
            .await
            .map_err(copy_error)?;
    }
    let copied = writer.finish().await.map_err(copy_error)?;
    tx.commit().await.context("committing the restore")?;
    Ok(copied)
}

/// The archive's records, each ID once. Identical copies (which `check`
/// reports) are restored once; different records under one ID are refused.
fn unique_records(records: Vec<ArchivedRecord>) -> anyhow::Result<Vec<ArchivedRecord>> {
    let mut seen: HashMap<Uuid, usize> = HashMap::with_capacity(records.len());
    let mut unique: Vec<ArchivedRecord> = Vec::with_capacity(records.len());
    for record in records {
        match seen.get(&record.id) {
            Some(&at) if unique[at].same_record(&record) => {}
            Some(_) => bail!(
                "the archive holds two different records with ID {}; nothing was restored \
                 (run `trellis-archive check` to see them)",
                record.id
            ),
            None => {
                seen.insert(record.id, unique.len());
                unique.push(record);
            }
        }
    }
    Ok(unique)
}

fn copy_error(e: tokio_postgres::Error) -> anyhow::Error {
    let detail = e
        .as_db_error()
        .map(|db| {
            let mut text = db.message().to_owned();
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        })
        .unwrap_or_else(|| e.to_string());
    anyhow::anyhow!("copying into usage_records failed, nothing was restored: {detail}")
}
