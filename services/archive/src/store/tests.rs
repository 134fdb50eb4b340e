//! Recovery and deduplication of the store, on real files.

use std::fs;
use std::io::Read;

use time::macros::datetime;

use super::*;
use crate::record::UsageKind;

fn record(key: &str, sequence: u64, day: u8) -> ArchivedRecord {
    let occurred_at = datetime!(2024-05-01 23:59:59.999999 UTC)
        .replace_day(day)
        .unwrap();
    ArchivedRecord {
        id: Uuid::new_v4(),
        user_id: key.into(),
        usage_type: UsageKind::Sms,
        quantity: i64::try_from(sequence).unwrap(),
        occurred_at,
        idempotency_key: format!("{key}-{sequence}"),
        recorded_at: occurred_at,
        event_id: Uuid::new_v4().to_string(),
        source: "usage".into(),
        key: key.into(),
        sequence,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap()
}

fn append_all(store: &mut Store, records: &[ArchivedRecord]) {
    let outcomes = store.append_batch(records.to_vec());
    assert!(
        outcomes.iter().all(|o| *o == Ok(Outcome::Appended)),
        "{outcomes:?}"
    );
}

fn read_part(dir: &Path, day: &str, generation: u64) -> Vec<ArchivedRecord> {
    let path = dir
        .join("usage")
        .join(format!("date={day}"))
        .join(part_name(generation));
    let mut text = String::new();
    MultiGzDecoder::new(File::open(&path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The archive's records, sorted by ID, asserting none is there twice.
fn archived_once(dir: &Path) -> Vec<ArchivedRecord> {
    let mut records = read_archive(dir).unwrap().records;
    records.sort_by_key(|r| r.id);
    let before = records.len();
    records.dedup_by_key(|r| r.id);
    assert_eq!(records.len(), before, "a record is archived twice");
    records
}

fn sorted(mut records: Vec<ArchivedRecord>) -> Vec<ArchivedRecord> {
    records.sort_by_key(|r| r.id);
    records
}

#[test]
fn dedupes_and_rolls_into_day_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let a1 = record("a", 1, 1);
    let a2 = record("a", 2, 2);
    let b5 = record("b", 5, 1);
    append_all(&mut store, &[a1.clone(), a2.clone(), b5.clone()]);

    // A redelivery (same event), an older sequence, and a duplicate inside
    // one batch: nothing written.
    let mut older = record("b", 4, 1);
    older.event_id = "other".into();
    let b6 = record("b", 6, 3);
    let outcomes = store.append_batch(vec![a2.clone(), older, b6.clone(), b6.clone()]);
    assert_eq!(
        outcomes,
        vec![
            Ok(Outcome::Duplicate),
            Ok(Outcome::Duplicate),
            Ok(Outcome::Appended),
            Ok(Outcome::Duplicate)
        ]
    );
    let journal = fs::read_to_string(dir.path().join("journal/journal-1.jsonl")).unwrap();
    assert_eq!(journal.lines().count(), 4, "{journal}");
    assert_eq!(store.status().journal_records, 4);
    assert_eq!(
        store.status().days,
        ["2024-05-01", "2024-05-02", "2024-05-03"]
    );

    store.roll().unwrap();
    assert!(!dir.path().join("journal/journal-1.jsonl").exists());
    assert!(dir.path().join("journal/journal-2.jsonl").exists());
    assert_eq!(
        read_part(dir.path(), "2024-05-01", 1),
        vec![a1.clone(), b5.clone()]
    );
    assert_eq!(read_part(dir.path(), "2024-05-02", 1), vec![a2.clone()]);
    assert_eq!(read_part(dir.path(), "2024-05-03", 1), vec![b6.clone()]);
    let status = store.status();
    assert_eq!(
        (
            status.committed_records,
            status.files,
            status.journal_records
        ),
        (4, 3, 0)
    );
    assert!(status.last_commit_at.is_some());
    // An empty journal does not roll.
    store.roll().unwrap();
    assert_eq!(store.status().files, 3);
    drop(store);

    // The sequence map survives a restart through the state file.
    let mut store = open(dir.path());
    assert_eq!(store.status(), status);
    assert_eq!(
        store.append_batch(vec![b6.clone()]),
        vec![Ok(Outcome::Duplicate)]
    );
    let a3 = record("a", 3, 1);
    append_all(&mut store, std::slice::from_ref(&a3));
    store.roll().unwrap();
    assert_eq!(read_part(dir.path(), "2024-05-01", 2), vec![a3.clone()]);
    assert_eq!(archived_once(dir.path()), sorted(vec![a1, a2, a3, b5, b6]));
}

#[test]
fn cuts_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let records = [record("a", 1, 1), record("a", 2, 1), record("b", 1, 2)];
    let mut store = open(dir.path());
    append_all(&mut store, &records);
    drop(store);
    let path = dir.path().join("journal/journal-1.jsonl");
    let whole = fs::read(&path).unwrap();
    // A crash in the middle of writing the next record.
    let torn = record("a", 3, 1).to_line();
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&torn[..torn.len() / 2]);
    fs::write(&path, &bytes).unwrap();

    // Readers skip the torn end; recovery cuts it.
    let contents = read_archive(dir.path()).unwrap();
    assert_eq!(
        (contents.records.len(), contents.torn_bytes),
        (3, torn.len() / 2)
    );
    let mut store = open(dir.path());
    assert_eq!(fs::read(&path).unwrap(), whole);
    assert_eq!(store.status().journal_records, 3);

    // The torn record was never acknowledged: its redelivery is new, the
    // others are duplicates.
    let again = record("a", 3, 1);
    let outcomes = store.append_batch(vec![records[1].clone(), again.clone()]);
    assert_eq!(
        outcomes,
        vec![Ok(Outcome::Duplicate), Ok(Outcome::Appended)]
    );
    store.roll().unwrap();
    let mut expected = records.to_vec();
    expected.push(again);
    assert_eq!(archived_once(dir.path()), sorted(expected));
}

#[test]
fn refuses_a_journal_corrupted_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    append_all(&mut store, &[record("a", 1, 1)]);
    drop(store);
    let path = dir.path().join("journal/journal-1.jsonl");
    let mut bytes = b"{not a record}\n".to_vec();
    bytes.extend_from_slice(&fs::read(&path).unwrap());
    fs::write(&path, &bytes).unwrap();
    let error = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(format!("{error:#}").contains("malformed line"), "{error:#}");
    // Nothing was cut.
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn crash_between_part_write_and_state_write() {
    let dir = tempfile::tempdir().unwrap();
    let first = [record("a", 1, 1), record("b", 1, 2)];
    let mut store = open(dir.path());
    append_all(&mut store, &first);
    store.roll().unwrap();
    let second = [record("a", 2, 1), record("b", 2, 2)];
    append_all(&mut store, &second);
    // The roll of generation 2 writes its parts, then the process dies
    // before the state file names generation 3.
    assert_eq!(
        store.write_parts_for_test().unwrap(),
        ["2024-05-01", "2024-05-02"]
    );
    drop(store);
    assert_eq!(read_part(dir.path(), "2024-05-01", 2).len(), 1);

    // A reader takes the journal, not the uncommitted parts.
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    assert_eq!(archived_once(dir.path()), sorted(all.clone()));

    // Recovery drops the uncommitted parts and keeps the journal.
    let mut store = open(dir.path());
    assert!(
        !dir.path()
            .join("usage/date=2024-05-01")
            .join(part_name(2))
            .exists()
    );
    let status = store.status();
    assert_eq!(
        (
            status.committed_records,
            status.files,
            status.journal_records
        ),
        (2, 2, 2)
    );
    assert_eq!(
        store.append_batch(second.to_vec()),
        vec![Ok(Outcome::Duplicate), Ok(Outcome::Duplicate)]
    );
    let third = record("c", 1, 3);
    append_all(&mut store, std::slice::from_ref(&third));
    store.roll().unwrap();
    assert_eq!(
        read_part(dir.path(), "2024-05-01", 2),
        vec![second[0].clone()]
    );
    assert_eq!(read_part(dir.path(), "2024-05-03", 2), vec![third.clone()]);
    let mut all = all;
    all.push(third);
    assert_eq!(archived_once(dir.path()), sorted(all));
}

#[test]
fn crash_between_state_write_and_journal_delete() {
    let dir = tempfile::tempdir().unwrap();
    let records = [record("a", 1, 1), record("a", 2, 2)];
    let mut store = open(dir.path());
    append_all(&mut store, &records);
    let path = dir.path().join("journal/journal-1.jsonl");
    let journal = fs::read(&path).unwrap();
    store.roll().unwrap();
    drop(store);
    // As if the process died right after the state file's rename.
    fs::write(&path, &journal).unwrap();
    fs::remove_file(dir.path().join("journal/journal-2.jsonl")).unwrap();

    assert_eq!(archived_once(dir.path()), sorted(records.to_vec()));
    let store = open(dir.path());
    assert!(!path.exists());
    let status = store.status();
    assert_eq!((status.committed_records, status.journal_records), (2, 0));
}

#[test]
fn a_failed_append_writes_nothing_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let a1 = record("a", 1, 1);
    append_all(&mut store, std::slice::from_ref(&a1));
    // A journal that cannot be written (as a full or failing disk would).
    let path = dir.path().join("journal/journal-1.jsonl");
    store.journal = Some(File::open(&path).unwrap());
    let a2 = record("a", 2, 1);
    let b1 = record("b", 1, 1);
    let outcomes = store.append_batch(vec![a2.clone(), b1.clone(), a1.clone()]);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(AppendError::Unwritable(_)))),
        "{outcomes:?}"
    );
    assert!(store.probe().is_err());
    assert_eq!(store.status().journal_records, 1);
    assert_eq!(store.keys, 1);

    // The disk recovers: the same records are new again.
    store.journal = None;
    store.probe().unwrap();
    let outcomes = store.append_batch(vec![a2.clone(), b1.clone()]);
    assert_eq!(outcomes, vec![Ok(Outcome::Appended), Ok(Outcome::Appended)]);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.status().journal_records, 3);
    assert_eq!(archived_once(dir.path()), sorted(vec![a1, a2, b1]));
}

#[test]
fn caps_the_sequence_map() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), StoreOptions { max_keys: 2 }).unwrap();
    append_all(&mut store, &[record("a", 1, 1), record("b", 1, 1)]);
    let outcomes = store.append_batch(vec![record("c", 1, 1), record("a", 2, 1)]);
    assert_eq!(outcomes[0], Err(AppendError::TooManyKeys(2)));
    assert_eq!(outcomes[1], Ok(Outcome::Appended));
    assert!(
        outcomes[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("--max-keys")
    );
}

#[test]
fn one_writer_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let error = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(format!("{error:#}").contains("in use"), "{error:#}");
}

#[test]
fn refuses_a_journal_newer_than_the_state() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    fs::write(dir.path().join("journal/journal-7.jsonl"), b"").unwrap();
    let error = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(format!("{error:#}").contains("inconsistent"), "{error:#}");
}

#[test]
fn a_parked_event_replayed_later_fills_its_gap_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    // Sequence 2 was parked by the producer: 3 arrives after 1.
    append_all(&mut store, &[record("k", 1, 1), record("k", 3, 1)]);
    let replayed = record("k", 2, 1);
    assert_eq!(
        store.append_batch(vec![replayed.clone()]),
        [Ok(Outcome::Appended)],
        "the replayed event fills its gap"
    );
    assert_eq!(
        store.append_batch(vec![record("k", 2, 1)]),
        [Ok(Outcome::Duplicate)],
        "and only once"
    );
    // Another gap, committed in the state file and found again after a
    // restart.
    append_all(&mut store, &[record("k", 5, 2)]);
    store.roll().unwrap();
    drop(store);
    let mut store = open(dir.path());
    assert_eq!(
        store.append_batch(vec![record("k", 3, 1)]),
        [Ok(Outcome::Duplicate)]
    );
    assert_eq!(
        store.append_batch(vec![record("k", 4, 2)]),
        [Ok(Outcome::Appended)]
    );
    store.roll().unwrap();
    let sequences: Vec<u64> = archived_once(dir.path())
        .iter()
        .map(|r| r.sequence)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5]);
}

#[test]
fn gaps_are_bounded_and_old_state_files_still_read() {
    let mut state = KeyState::default();
    state.add(1);
    state.add(1_000_000);
    assert_eq!(state.gaps.len(), MAX_GAPS);
    assert!(!state.has(999_999) && state.has(2) && state.has(1_000_000));
    let old: KeyState = serde_json::from_str("7").unwrap();
    assert_eq!(
        old,
        KeyState {
            last: 7,
            gaps: BTreeSet::new()
        }
    );
    let new: KeyState = serde_json::from_str(r#"{"last":9,"gaps":[4]}"#).unwrap();
    assert!(!new.has(4) && new.has(5));
    assert_eq!(
        serde_json::to_string(&KeyState {
            last: 3,
            gaps: BTreeSet::new()
        })
        .unwrap(),
        r#"{"last":3}"#
    );
}
