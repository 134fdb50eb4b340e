//! `trellis-archive check`: does the archive hold exactly usage's records?

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use uuid::Uuid;

use crate::record::{ArchivedRecord, UsageKind, format_timestamp};
use crate::store::read_archive;
use crate::usage_db::{self, UsageRow};

/// How many records each list of the report shows.
pub const LIST_LIMIT: usize = 20;

/// The archive compared with usage's table.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Records in the archive (copies included).
    pub archive_records: usize,
    /// Committed part files read.
    pub archive_files: usize,
    /// Of `archive_records`, how many are in the journal.
    pub journal_records: usize,
    /// Rows in `usage_records`.
    pub database_records: usize,
    /// Rows with no record in the archive, by ID.
    pub missing: Vec<UsageRow>,
    /// Archived records with no row, by ID.
    pub unexpected: Vec<ArchivedRecord>,
    /// Records whose archived fields differ from the row: ID and what differs.
    pub differ: Vec<(Uuid, Vec<String>)>,
    /// Records archived more than once: ID and how many times.
    pub doubled: Vec<(Uuid, usize)>,
}

impl Comparison {
    /// Whether archive and database hold exactly the same records, once.
    pub fn agrees(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.differ.is_empty()
            && self.doubled.is_empty()
    }

    /// One line: whether they agree, and if not, how.
    pub fn summary(&self) -> String {
        if self.agrees() {
            return format!(
                "the archive and the database agree ({} records)",
                self.database_records
            );
        }
        let mut problems = Vec::new();
        for (count, what) in [
            (self.missing.len(), "missing from the archive"),
            (
                self.unexpected.len(),
                "in the archive but not in the database",
            ),
            (self.differ.len(), "different in the archive"),
            (self.doubled.len(), "archived more than once"),
        ] {
            if count > 0 {
                problems.push(format!("{count} {what}"));
            }
        }
        format!(
            "the archive and the database disagree: {}",
            problems.join(", ")
        )
    }

    /// The full report: counts, the first [`LIST_LIMIT`] records of each
    /// kind of difference, and the summary.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "archive:  {} records ({} files, {} in the journal)",
            self.archive_records, self.archive_files, self.journal_records
        );
        let _ = writeln!(
            out,
            "database: {} records in usage_records",
            self.database_records
        );
        section(&mut out, "missing from the archive", &self.missing, |row| {
            format!(
                "{} user {} {} {} at {} (key {})",
                row.id,
                row.user_id,
                kind_name(row.usage_type),
                row.quantity,
                format_timestamp(row.occurred_at),
                row.idempotency_key
            )
        });
        section(
            &mut out,
            "in the archive but not in the database",
            &self.unexpected,
            |record| {
                format!(
                    "{} user {} {} {} at {} (key {}; event {} sequence {})",
                    record.id,
                    record.user_id,
                    record.usage_type.name(),
                    record.quantity,
                    format_timestamp(record.occurred_at),
                    record.idempotency_key,
                    record.event_id,
                    record.sequence
                )
            },
        );
        section(
            &mut out,
            "different in the archive",
            &self.differ,
            |(id, fields)| format!("{id}: {}", fields.join("; ")),
        );
        section(
            &mut out,
            "archived more than once",
            &self.doubled,
            |(id, count)| format!("{id}: {count} times"),
        );
        let _ = writeln!(out, "{}", self.summary());
        out
    }
}

fn section<T>(out: &mut String, title: &str, items: &[T], line: impl Fn(&T) -> String) {
    let _ = writeln!(out, "{title}: {}", items.len());
    for item in items.iter().take(LIST_LIMIT) {
        let _ = writeln!(out, "  {}", line(item));
    }
    if items.len() > LIST_LIMIT {
        let _ = writeln!(out, "  ... and {} more", items.len() - LIST_LIMIT);
    }
}

fn kind_name(value: i16) -> String {
    UsageKind::from_i16(value)
        .map_or_else(|| format!("usage_type {value}"), |k| k.name().to_owned())
}

/// Compares archived records with usage's rows.
pub fn compare(archive: &[ArchivedRecord], database: &[UsageRow]) -> Comparison {
    let mut by_id: HashMap<Uuid, Vec<&ArchivedRecord>> = HashMap::new();
    for record in archive {
        by_id.entry(record.id).or_default().push(record);
    }
    let mut comparison = Comparison {
        archive_records: archive.len(),
        database_records: database.len(),
        ..Comparison::default()
    };
    let mut in_database = HashSet::with_capacity(database.len());
    for row in database {
        in_database.insert(row.id);
        match by_id.get(&row.id) {
            None => comparison.missing.push(row.clone()),
            Some(copies) => {
                // Every copy must match; report the first that does not.
                if let Some(fields) = copies
                    .iter()
                    .map(|r| differences(r, row))
                    .find(|d| !d.is_empty())
                {
                    comparison.differ.push((row.id, fields));
                }
            }
        }
    }
    for (id, copies) in &by_id {
        if copies.len() > 1 {
            comparison.doubled.push((*id, copies.len()));
        }
        if !in_database.contains(id) {
            comparison.unexpected.push(copies[0].clone());
        }
    }
    comparison
        .missing
        .sort_by_key(|row| (row.occurred_at, row.id));
    comparison.unexpected.sort_by_key(|r| (r.occurred_at, r.id));
    comparison.differ.sort();
    comparison.doubled.sort();
    comparison
}

/// What differs between an archived record and its row, one text per field.
fn differences(record: &ArchivedRecord, row: &UsageRow) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, archived: String, database: String| {
        if archived != database {
            out.push(format!(
                "{name}: archive {archived:?}, database {database:?}"
            ));
        }
    };
    field("user_id", record.user_id.clone(), row.user_id.clone());
    field(
        "type",
        record.usage_type.name().into(),
        kind_name(row.usage_type),
    );
    field(
        "quantity",
        record.quantity.to_string(),
        row.quantity.to_string(),
    );
    field(
        "occurred_at",
        format_timestamp(record.occurred_at),
        format_timestamp(row.occurred_at),
    );
    field(
        "idempotency_key",
        record.idempotency_key.clone(),
        row.idempotency_key.clone(),
    );
    field(
        "recorded_at",
        format_timestamp(record.recorded_at),
        format_timestamp(row.recorded_at),
    );
    out
}

/// Reads the archive in `dir` and usage's table at `database_url` and
/// compares them.
pub async fn check(dir: &Path, database_url: &str) -> anyhow::Result<Comparison> {
    let dir = dir.to_owned();
    let contents = tokio::task::spawn_blocking(move || read_archive(&dir))
        .await
        .context("reading the archive")??;
    let client = usage_db::connect(database_url).await?;
    usage_db::require_table(&client).await?;
    let rows = usage_db::load(&client).await?;
    let mut comparison = compare(&contents.records, &rows);
    comparison.archive_files = contents.files;
    comparison.journal_records = contents.journal_records;
    Ok(comparison)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn record(n: u128, quantity: i64) -> ArchivedRecord {
        ArchivedRecord {
            id: Uuid::from_u128(n),
            user_id: "u1".into(),
            usage_type: UsageKind::Data,
            quantity,
            occurred_at: datetime!(2024-05-01 10:00:00.000001 UTC),
            idempotency_key: format!("k{n}"),
            recorded_at: datetime!(2024-05-01 10:00:01 UTC),
            event_id: format!("e{n}"),
            source: "usage".into(),
            key: "u1".into(),
            sequence: n as u64,
        }
    }

    fn row(record: &ArchivedRecord) -> UsageRow {
        UsageRow {
            id: record.id,
            user_id: record.user_id.clone(),
            usage_type: record.usage_type.as_i16(),
            quantity: record.quantity,
            occurred_at: record.occurred_at,
            idempotency_key: record.idempotency_key.clone(),
            recorded_at: record.recorded_at,
        }
    }

    #[test]
    fn agrees_on_the_same_records() {
        let archive = vec![record(1, 10), record(2, 20)];
        let rows: Vec<_> = archive.iter().map(row).collect();
        let comparison = compare(&archive, &rows);
        assert!(comparison.agrees(), "{}", comparison.report());
    }

    #[test]
    fn names_every_kind_of_difference() {
        let archive = vec![record(1, 10), record(2, 20), record(2, 20), record(3, 30)];
        let mut altered = row(&archive[0]);
        altered.quantity = 11;
        let missing = row(&record(4, 40));
        let rows = vec![altered, row(&archive[1]), missing];
        let comparison = compare(&archive, &rows);
        assert!(!comparison.agrees());
        let report = comparison.report();
        assert_eq!(comparison.missing.len(), 1, "{report}");
        assert_eq!(comparison.unexpected.len(), 1, "{report}");
        assert_eq!(comparison.differ.len(), 1, "{report}");
        assert_eq!(
            comparison.doubled,
            vec![(Uuid::from_u128(2), 2)],
            "{report}"
        );
        for id in 1..=4 {
            assert!(
                report.contains(&Uuid::from_u128(id).to_string()),
                "{report}"
            );
        }
        assert!(
            report.contains(r#"quantity: archive "10", database "11""#),
            "{report}"
        );
        assert!(comparison.summary().contains("1 missing from the archive"));
    }
}
