//! The archive on disk, and how it stays exactly-once across crashes.
//!
//! ```text
//! DIR/lock                                         held (flock) by the one writer
//! DIR/state.json                                   the commit point: next generation, counts,
//!                                                  per (source, key): last sequence archived
//!                                                  and the sequences skipped below it
//! DIR/journal/journal-<G>.jsonl                    records not yet in a part (G = next generation)
//! DIR/usage/date=YYYY-MM-DD/part-<G:012>.jsonl.gz  committed records of generation G for that day
//! ```
//!
//! A record is appended to the journal of generation G and fsynced before it
//! is acknowledged. A roll writes one part per day present in journal G
//! (temporary file, fsync, rename, fsync of the directory), then replaces
//! `state.json` (next generation G+1, the sequence map including journal G):
//! that rename is the commit point. Only then is journal G deleted.
//!
//! Recovery after a crash at any instant: journals older than the state's
//! next generation are committed and deleted; the journal of the next
//! generation loses at most a torn, never-acknowledged last line and is
//! replayed into memory; parts of the next generation (a crash between the
//! part writes and the state write) are deleted, as their records are all
//! still in the journal and the next roll writes them again. Readers
//! ([`read_archive`]) only ever take parts older than the state's next
//! generation plus the next generation's journal, so a record is never
//! counted twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::record::{ArchivedRecord, format_day, format_timestamp, parse_timestamp};

#[cfg(test)]
mod tests;

const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

/// What is archived of one (source, key), per event source, per event key.
pub type Sequences = HashMap<String, HashMap<String, KeyState>>;

/// Most sequence numbers one key may have skipped and still accept later.
const MAX_GAPS: usize = 64;

/// What is archived of one (source, key): events arrive in sequence, so
/// everything up to `last` is archived except `gaps`, the sequences that
/// were skipped (events the producer parked for this subscriber). A parked
/// event replayed later fills its gap instead of counting as a duplicate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "KeyStateIn")]
pub struct KeyState {
    /// The highest sequence archived.
    pub last: u64,
    /// Sequences below `last` not archived yet (at most [`MAX_GAPS`]).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub gaps: BTreeSet<u64>,
}

/// A key's state as state files hold it: a bare number (what version 1
/// wrote before gaps were kept) or the whole state.
#[derive(Deserialize)]
#[serde(untagged)]
enum KeyStateIn {
    Last(u64),
    Full {
        last: u64,
        #[serde(default)]
        gaps: BTreeSet<u64>,
    },
}

impl From<KeyStateIn> for KeyState {
    fn from(state: KeyStateIn) -> Self {
        match state {
            KeyStateIn::Last(last) => KeyState {
                last,
                gaps: BTreeSet::new(),
            },
            KeyStateIn::Full { last, gaps } => KeyState { last, gaps },
        }
    }
}

impl KeyState {
    /// Whether `sequence` is archived already.
    fn has(&self, sequence: u64) -> bool {
        sequence <= self.last && !self.gaps.contains(&sequence)
    }

    /// Counts `sequence` as archived.
    fn add(&mut self, sequence: u64) {
        if sequence > self.last {
            // Keep the newest gaps if a key skipped more than we remember.
            let skipped_from = (self.last + 1).max(sequence.saturating_sub(MAX_GAPS as u64));
            self.gaps.extend(skipped_from..sequence);
            while self.gaps.len() > MAX_GAPS {
                let oldest = *self.gaps.first().expect("not empty");
                self.gaps.remove(&oldest);
            }
            self.last = sequence;
        } else {
            self.gaps.remove(&sequence);
        }
    }
}

/// How the store behaves.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Most (source, key) pairs whose last sequence the store remembers; a
    /// new key beyond it is refused with [`AppendError::TooManyKeys`].
    pub max_keys: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
        }
    }
}

/// What became of one record handed to [`Store::append_batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written to the journal and fsynced.
    Appended,
    /// Already archived (its sequence is archived for its source and key,
    /// or it is already in the journal); nothing written.
    Duplicate,
}

/// Why a record was not archived. Neither is the record's fault: a later
/// delivery may succeed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppendError {
    /// The journal could not be written or fsynced.
    #[error("the archive directory cannot be written: {0}")]
    Unwritable(String),
    /// The sequence map is full.
    #[error(
        "the archive already tracks {0} event keys, its limit (--max-keys); raise the limit to archive events of new keys"
    )]
    TooManyKeys(usize),
}

/// What the archive holds, for GetArchiveStatus.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveStatus {
    /// Records in committed parts.
    pub committed_records: u64,
    /// Committed part files.
    pub files: u64,
    /// Records in the journal.
    pub journal_records: u64,
    /// UTC days with records, committed or in the journal, oldest first.
    pub days: Vec<String>,
    /// When the last part was committed.
    pub last_commit_at: Option<OffsetDateTime>,
}

/// The committed part of the state file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Committed {
    /// The generation of the journal records go to now; every part of a
    /// lower generation is committed.
    next_generation: u64,
    /// Records in committed parts.
    records: u64,
    /// Committed part files.
    files: u64,
    /// Days with committed parts.
    days: BTreeSet<String>,
    /// When the last roll committed (RFC 3339).
    last_commit_at: Option<String>,
}

impl Default for Committed {
    fn default() -> Self {
        Self {
            next_generation: 1,
            records: 0,
            files: 0,
            days: BTreeSet::new(),
            last_commit_at: None,
        }
    }
}

#[derive(Serialize)]
struct StateOut<'a> {
    version: u32,
    #[serde(flatten)]
    committed: &'a Committed,
    sequences: &'a Sequences,
}

#[derive(Deserialize)]
struct StateIn {
    version: u32,
    #[serde(flatten)]
    committed: Committed,
    sequences: Sequences,
}

/// The archive directory, open for writing by this process alone. All its
/// methods block on file I/O; one thread owns it (see [`crate::writer`]).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    /// Held for the life of the store: two writers would double records.
    _lock: File,
    committed: Committed,
    /// Committed sequences plus those of the journal records.
    sequences: Sequences,
    keys: usize,
    /// The open journal of `committed.next_generation`; `None` when it
    /// must be (re)created before the next append.
    journal: Option<File>,
    /// Length of the journal's fsynced, acknowledged content.
    journal_len: u64,
    /// A failed append may have left bytes past `journal_len`: cut them
    /// before writing again.
    journal_dirty: bool,
    journal_records: Vec<ArchivedRecord>,
    journal_events: HashSet<String>,
    journal_ids: HashSet<Uuid>,
    journal_days: BTreeSet<Date>,
}

impl Store {
    /// Opens (creating if needed) the archive in `dir` and recovers it from
    /// whatever a crash left. Fails if another process has it open or if
    /// it is inconsistent in a way recovery must not guess about.
    pub fn open(dir: &Path, options: StoreOptions) -> anyhow::Result<Self> {
        for sub in ["", "journal", "usage"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path)
                .with_context(|| format!("creating directory {}", path.display()))?;
        }
        let lock = lock_dir(dir)?;
        let _ = fs::remove_file(dir.join(format!("{STATE_FILE}.tmp")));
        let (committed, sequences) = read_state(dir)?.unwrap_or_default();
        let next = committed.next_generation;

        let mut journal_path = None;
        for (generation, path) in list_journals(dir)? {
            match generation.cmp(&next) {
                // Committed by the state file; a crash came before its delete.
                std::cmp::Ordering::Less => {
                    tracing::info!(journal = %path.display(), "removing committed journal");
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
                std::cmp::Ordering::Equal => journal_path = Some(path),
                std::cmp::Ordering::Greater => bail!(
                    "{} is newer than {} (next generation {next}): the archive directory is inconsistent; \
                     was state.json replaced?",
                    path.display(),
                    dir.join(STATE_FILE).display()
                ),
            }
        }
        remove_uncommitted_parts(dir, next)?;

        let path = journal_path.unwrap_or_else(|| journal_file(dir, next));
        let (journal, journal_len, records) = recover_journal(&path)?;
        sync_dir(&dir.join("journal"))?;

        let mut store = Self {
            dir: dir.to_owned(),
            options,
            _lock: lock,
            committed,
            keys: sequences.values().map(HashMap::len).sum(),
            sequences,
            journal: Some(journal),
            journal_len,
            journal_dirty: false,
            journal_records: Vec::new(),
            journal_events: HashSet::new(),
            journal_ids: HashSet::new(),
            journal_days: BTreeSet::new(),
        };
        for record in records {
            store.remember(&record);
            store.journal_records.push(record);
        }
        if store.keys > options.max_keys {
            tracing::warn!(
                keys = store.keys,
                max_keys = options.max_keys,
                "the archive tracks more event keys than --max-keys; events of new keys will be refused"
            );
        }
        tracing::info!(
            dir = %dir.display(),
            generation = next,
            committed_records = store.committed.records,
            journal_records = store.journal_records.len(),
            keys = store.keys,
            "archive recovered"
        );
        Ok(store)
    }

    /// The archive directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records in the journal, waiting for a roll.
    pub fn journal_records(&self) -> usize {
        self.journal_records.len()
    }

    /// Appends the records that are not duplicates to the journal as one
    /// write and one fsync, and says what became of each, in order. If the
    /// write fails, nothing of the batch counts as archived (every record
    /// gets an error, duplicates of one another included) and the journal is
    /// cut back before the next write.
    pub fn append_batch(
        &mut self,
        records: Vec<ArchivedRecord>,
    ) -> Vec<Result<Outcome, AppendError>> {
        let mut outcomes = Vec::with_capacity(records.len());
        let mut undo = Vec::new();
        let mut appended = Vec::new();
        let mut buf = Vec::new();
        for record in records {
            if self.is_duplicate(&record) {
                outcomes.push(Ok(Outcome::Duplicate));
                continue;
            }
            let previous = self.last_sequence(&record.source, &record.key);
            if previous.is_none() && self.keys >= self.options.max_keys {
                tracing::error!(
                    max_keys = self.options.max_keys,
                    source = %record.source,
                    key = %record.key,
                    "refusing an event of a new key: the sequence map is full"
                );
                outcomes.push(Err(AppendError::TooManyKeys(self.keys)));
                continue;
            }
            undo.push((record.source.clone(), record.key.clone(), previous));
            self.remember(&record);
            buf.extend_from_slice(&record.to_line());
            appended.push(record);
            outcomes.push(Ok(Outcome::Appended));
        }
        if buf.is_empty() {
            return outcomes;
        }
        match self.write_journal(&buf) {
            Ok(()) => {
                self.journal_len += buf.len() as u64;
                self.journal_records.extend(appended);
            }
            Err(e) => {
                tracing::error!(error = %e, journal = %self.journal_path().display(), "journal write failed");
                self.journal_dirty = true;
                for (source, key, previous) in undo.into_iter().rev() {
                    self.set_sequence(source, key, previous);
                }
                for record in &appended {
                    self.journal_events.remove(&record.event_id);
                    self.journal_ids.remove(&record.id);
                }
                self.journal_days = self
                    .journal_records
                    .iter()
                    .map(ArchivedRecord::day)
                    .collect();
                let error = AppendError::Unwritable(e.to_string());
                outcomes = outcomes.into_iter().map(|_| Err(error.clone())).collect();
            }
        }
        outcomes
    }

    /// Moves the journal's records into their day files and commits them
    /// (see the module docs). Does nothing when the journal is empty. On an
    /// error nothing is committed and the journal keeps its records.
    pub fn roll(&mut self) -> io::Result<()> {
        if self.journal_records.is_empty() {
            return Ok(());
        }
        let generation = self.committed.next_generation;
        let written = self.write_parts()?;

        let mut committed = self.committed.clone();
        committed.next_generation = generation + 1;
        committed.records += self.journal_records.len() as u64;
        committed.files += written.len() as u64;
        committed.days.extend(written);
        committed.last_commit_at = Some(format_timestamp(OffsetDateTime::now_utc()));
        write_state(&self.dir, &committed, &self.sequences)?;
        // Committed: from here on the records are in the parts, and journal
        // `generation` is dead whatever happens next.
        self.committed = committed;
        let old = self.journal_path_of(generation);
        self.journal = None;
        self.journal_len = 0;
        self.journal_dirty = false;
        self.journal_records.clear();
        self.journal_events.clear();
        self.journal_ids.clear();
        self.journal_days.clear();
        if let Err(e) = fs::remove_file(&old) {
            // Recovery removes it: its generation is below the state's.
            tracing::warn!(journal = %old.display(), error = %e, "could not remove a committed journal");
        }
        if let Err(e) = self.journal_file() {
            tracing::warn!(error = %e, "could not create the next journal; retrying at the next append");
        }
        tracing::info!(generation, "archive rolled");
        Ok(())
    }

    /// Writes (but does not commit) one part per day of the journal for the
    /// current generation, returning the days written.
    fn write_parts(&mut self) -> io::Result<Vec<String>> {
        let generation = self.committed.next_generation;
        let mut by_day: BTreeMap<Date, Vec<&ArchivedRecord>> = BTreeMap::new();
        for record in &self.journal_records {
            by_day.entry(record.day()).or_default().push(record);
        }
        let mut days = Vec::with_capacity(by_day.len());
        for (day, records) in by_day {
            let day = format_day(day);
            write_part(&self.dir, &day, generation, &records)?;
            days.push(day);
        }
        Ok(days)
    }

    /// Checks that the directory can still be written (and repairs the
    /// journal after a failed append), for health reporting when idle.
    pub fn probe(&mut self) -> io::Result<()> {
        self.journal_file()?;
        let path = self.dir.join(".probe");
        let mut file = File::create(&path)?;
        file.write_all(b"probe")?;
        file.sync_all()?;
        drop(file);
        fs::remove_file(&path)
    }

    /// What the archive holds.
    pub fn status(&self) -> ArchiveStatus {
        let mut days = self.committed.days.clone();
        days.extend(self.journal_days.iter().copied().map(format_day));
        ArchiveStatus {
            committed_records: self.committed.records,
            files: self.committed.files,
            journal_records: self.journal_records.len() as u64,
            days: days.into_iter().collect(),
            last_commit_at: self
                .committed
                .last_commit_at
                .as_deref()
                .and_then(|t| parse_timestamp(t).ok()),
        }
    }

    fn is_duplicate(&self, record: &ArchivedRecord) -> bool {
        self.last_sequence(&record.source, &record.key)
            .is_some_and(|state| state.has(record.sequence))
            || self.journal_events.contains(&record.event_id)
            || self.journal_ids.contains(&record.id)
    }

    fn last_sequence(&self, source: &str, key: &str) -> Option<KeyState> {
        self.sequences.get(source)?.get(key).cloned()
    }

    /// Counts `record` as archived in the in-memory indexes.
    fn remember(&mut self, record: &ArchivedRecord) {
        let state = match self.last_sequence(&record.source, &record.key) {
            Some(mut state) => {
                state.add(record.sequence);
                state
            }
            // The first event seen of a key: nothing before it is owed.
            None => KeyState {
                last: record.sequence,
                gaps: BTreeSet::new(),
            },
        };
        self.set_sequence(record.source.clone(), record.key.clone(), Some(state));
        self.journal_events.insert(record.event_id.clone());
        self.journal_ids.insert(record.id);
        self.journal_days.insert(record.day());
    }

    fn set_sequence(&mut self, source: String, key: String, sequence: Option<KeyState>) {
        match sequence {
            Some(sequence) => {
                let keys = self.sequences.entry(source).or_default();
                if keys.insert(key, sequence).is_none() {
                    self.keys += 1;
                }
            }
            None => {
                if let Some(keys) = self.sequences.get_mut(&source) {
                    if keys.remove(&key).is_some() {
                        self.keys -= 1;
                    }
                    if keys.is_empty() {
                        self.sequences.remove(&source);
                    }
                }
            }
        }
    }

    fn write_journal(&mut self, buf: &[u8]) -> io::Result<()> {
        let file = self.journal_file()?;
        file.write_all(buf)?;
        file.sync_data()
    }

    /// The journal, ready for appending: created if a roll could not create
    /// it, cut back to its acknowledged length after a failed append.
    fn journal_file(&mut self) -> io::Result<&mut File> {
        if self.journal.is_none() {
            let path = self.journal_path();
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            // Nothing in it was acknowledged (the in-memory journal is empty
            // when it is missing).
            file.set_len(self.journal_len)?;
            file.sync_all()?;
            sync_dir(&self.dir.join("journal"))?;
            self.journal = Some(file);
            self.journal_dirty = false;
        }
        let file = self.journal.as_mut().expect("the journal was just opened");
        if self.journal_dirty {
            file.set_len(self.journal_len)?;
            file.sync_data()?;
            self.journal_dirty = false;
        }
        Ok(file)
    }

    fn journal_path(&self) -> PathBuf {
        self.journal_path_of(self.committed.next_generation)
    }

    fn journal_path_of(&self, generation: u64) -> PathBuf {
        journal_file(&self.dir, generation)
    }

    #[cfg(test)]
    fn write_parts_for_test(&mut self) -> io::Result<Vec<String>> {
        self.write_parts()
    }
}

/// Takes the directory's lock file, or says who holds it.
fn lock_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "{} is in use by another trellis-archive process (it holds {})",
            dir.display(),
            path.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

fn journal_file(dir: &Path, generation: u64) -> PathBuf {
    dir.join("journal")
        .join(format!("journal-{generation}.jsonl"))
}

/// The journals in `dir`, by generation.
fn list_journals(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let journal_dir = dir.join("journal");
    let mut journals = Vec::new();
    let entries =
        fs::read_dir(&journal_dir).with_context(|| format!("listing {}", journal_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", journal_dir.display()))?;
        let name = entry.file_name();
        let generation = name
            .to_str()
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse().ok());
        if let Some(generation) = generation {
            journals.push((generation, entry.path()));
        }
    }
    journals.sort();
    Ok(journals)
}

/// A committed or uncommitted part file: (day, generation, path).
type PartFile = (String, u64, PathBuf);

/// Every part file (and leftover temporary file) under `DIR/usage`.
fn list_parts(dir: &Path) -> anyhow::Result<(Vec<PartFile>, Vec<PathBuf>)> {
    let usage = dir.join("usage");
    let mut parts = Vec::new();
    let mut temporary = Vec::new();
    let days = match fs::read_dir(&usage) {
        Ok(days) => days,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((parts, temporary)),
        Err(e) => return Err(e).with_context(|| format!("listing {}", usage.display())),
    };
    for day in days {
        let day = day.with_context(|| format!("listing {}", usage.display()))?;
        let Some(name) = day
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("date="))
            .map(str::to_owned)
        else {
            continue;
        };
        let day_dir = day.path();
        for file in
            fs::read_dir(&day_dir).with_context(|| format!("listing {}", day_dir.display()))?
        {
            let file = file.with_context(|| format!("listing {}", day_dir.display()))?;
            let file_name = file.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.ends_with(".tmp") {
                temporary.push(file.path());
            } else if let Some(generation) = file_name
                .strip_prefix("part-")
                .and_then(|n| n.strip_suffix(".jsonl.gz"))
                .and_then(|n| n.parse().ok())
            {
                parts.push((name.clone(), generation, file.path()));
            }
        }
    }
    parts.sort();
    Ok((parts, temporary))
}

/// Deletes parts of generation `next` or later (a roll that crashed before
/// its commit; the journal still holds their records) and temporary files.
fn remove_uncommitted_parts(dir: &Path, next: u64) -> anyhow::Result<()> {
    let (parts, temporary) = list_parts(dir)?;
    let stale = parts
        .into_iter()
        .filter(|(_, generation, _)| *generation >= next)
        .map(|(_, _, path)| path);
    for path in temporary.into_iter().chain(stale) {
        tracing::info!(file = %path.display(), "removing an uncommitted file");
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Reads the records of a journal, stopping at the first line that is not
/// a complete record. Returns the records, the length they span, and the
/// number of bytes after them. A complete record after a bad line is
/// corruption no crash explains: an error.
fn parse_journal(path: &Path, bytes: &[u8]) -> anyhow::Result<(Vec<ArchivedRecord>, usize)> {
    let mut records = Vec::new();
    let mut good = 0;
    while let Some(end) = bytes[good..].iter().position(|b| *b == b'\n') {
        match serde_json::from_slice::<ArchivedRecord>(&bytes[good..good + end]) {
            Ok(record) => {
                records.push(record);
                good += end + 1;
            }
            Err(_) => break,
        }
    }
    let later_record = bytes[good..]
        .split(|b| *b == b'\n')
        .skip(1)
        .any(|line| serde_json::from_slice::<ArchivedRecord>(line).is_ok());
    if later_record {
        bail!(
            "{} has a malformed line after record {} (byte {good}) followed by more records; \
             it was not cut by a crash, so it is left for an operator to inspect",
            path.display(),
            records.len()
        );
    }
    Ok((records, good))
}

/// Opens the journal at `path` for appending (creating it if missing), cuts
/// a torn last line a crash left, and makes what remains durable: records
/// written but not fsynced before a crash were never acknowledged, but once
/// recovered they answer redeliveries as duplicates, so they must be on disk.
fn recover_journal(path: &Path) -> anyhow::Result<(File, u64, Vec<ArchivedRecord>)> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let (records, good) = parse_journal(path, &bytes)?;
    if good < bytes.len() {
        tracing::warn!(
            journal = %path.display(),
            bytes = bytes.len() - good,
            "cutting a torn last line (a write cut short by a crash; it was never acknowledged)"
        );
        file.set_len(good as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok((file, good as u64, records))
}

fn read_state(dir: &Path) -> anyhow::Result<Option<(Committed, Sequences)>> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Written by rename, so it is whole; anything else is not ours to fix.
    let state: StateIn = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid archive state file", path.display()))?;
    if state.version != STATE_VERSION {
        bail!(
            "{} has version {}; this trellis-archive reads version {STATE_VERSION}",
            path.display(),
            state.version
        );
    }
    Ok(Some((state.committed, state.sequences)))
}

/// Replaces the state file atomically: the commit point of a roll.
fn write_state(dir: &Path, committed: &Committed, sequences: &Sequences) -> io::Result<()> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let state = StateOut {
        version: STATE_VERSION,
        committed,
        sequences,
    };
    let mut writer = BufWriter::new(File::create(&tmp)?);
    serde_json::to_writer(&mut writer, &state)?;
    writer.write_all(b"\n")?;
    let file = writer
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &path)?;
    // The rename is the commit: it is visible to a restarted process from
    // here on, so a failing directory fsync must not undo the roll in
    // memory (the journal it replaces would be deleted at the next start).
    if let Err(e) = sync_dir(dir) {
        tracing::error!(dir = %dir.display(), error = %e, "fsync of the archive directory failed after committing a roll");
    }
    Ok(())
}

/// Writes one day's part of `generation`, durably, under its final name.
fn write_part(
    dir: &Path,
    day: &str,
    generation: u64,
    records: &[&ArchivedRecord],
) -> io::Result<()> {
    let usage = dir.join("usage");
    let day_dir = usage.join(format!("date={day}"));
    if !day_dir.is_dir() {
        fs::create_dir_all(&day_dir)?;
        sync_dir(&usage)?;
    }
    let name = part_name(generation);
    let tmp = day_dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut gz = GzEncoder::new(BufWriter::new(File::create(&tmp)?), Compression::default());
        for record in records {
            gz.write_all(&record.to_line())?;
        }
        let file = gz
            .finish()?
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, day_dir.join(&name))?;
        sync_dir(&day_dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The file name of a part of `generation`.
pub fn part_name(generation: u64) -> String {
    format!("part-{generation:012}.jsonl.gz")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Everything in an archive directory, as read by `check` and `restore`.
#[derive(Debug, Default)]
pub struct ArchiveContents {
    /// Every archived record: committed parts (by day, then generation),
    /// then the journal, in order.
    pub records: Vec<ArchivedRecord>,
    /// Committed part files read.
    pub files: usize,
    /// Of `records`, how many came from the journal.
    pub journal_records: usize,
    /// Bytes at the end of the journal that are not a complete record (a
    /// write a crash cut short, never acknowledged; the server cuts it when
    /// it next starts).
    pub torn_bytes: usize,
}

/// Reads every record of the archive in `dir` without changing anything,
/// also while a server is writing to it: only committed parts and the
/// current journal are read, and the read is repeated if a roll commits
/// meanwhile.
pub fn read_archive(dir: &Path) -> anyhow::Result<ArchiveContents> {
    if !dir.is_dir() {
        bail!("{} is not a directory (no archive there)", dir.display());
    }
    if !dir.join(STATE_FILE).exists() && !dir.join("journal").is_dir() {
        bail!(
            "{} holds no archive (neither {STATE_FILE} nor journal/)",
            dir.display()
        );
    }
    for _ in 0..20 {
        let next = read_state(dir)?.unwrap_or_default().0.next_generation;
        let contents = read_generation(dir, next)?;
        let now = read_state(dir)?.unwrap_or_default().0.next_generation;
        if now == next {
            return Ok(contents);
        }
    }
    bail!(
        "{} kept changing while being read (rolls committing); try again",
        dir.display()
    )
}

fn read_generation(dir: &Path, next: u64) -> anyhow::Result<ArchiveContents> {
    let mut contents = ArchiveContents::default();
    let (parts, _) = list_parts(dir)?;
    for (day, _, path) in parts.into_iter().filter(|(_, g, _)| *g < next) {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let reader = BufReader::new(MultiGzDecoder::new(BufReader::new(file)));
        for (n, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let record: ArchivedRecord = serde_json::from_str(&line).with_context(|| {
                format!("{} line {}: not an archived record", path.display(), n + 1)
            })?;
            if format_day(record.day()) != day {
                bail!(
                    "{} line {}: record {} occurred on {}, not on the file's day",
                    path.display(),
                    n + 1,
                    record.id,
                    format_day(record.day())
                );
            }
            contents.records.push(record);
        }
        contents.files += 1;
    }
    let path = journal_file(dir, next);
    match fs::read(&path) {
        Ok(bytes) => {
            let (records, good) = parse_journal(&path, &bytes)?;
            contents.torn_bytes = bytes.len() - good;
            contents.journal_records = records.len();
            contents.records.extend(records);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(contents)
}
