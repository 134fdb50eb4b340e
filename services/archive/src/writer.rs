//! The one writer: a thread that owns the [`Store`], appends what the gRPC
//! handlers hand it (grouping concurrent appends into one fsync), rolls the
//! journal on size and age, and reports whether the directory is writable.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::record::ArchivedRecord;
use crate::store::{AppendError, ArchiveStatus, Outcome, Store, StoreOptions};

/// Most records grouped into one journal write and fsync.
const MAX_BATCH: usize = 1024;

/// When the writer rolls the journal into day files.
#[derive(Clone, Copy, Debug)]
pub struct RollPolicy {
    /// Roll once the journal holds this many records.
    pub records: usize,
    /// Roll once the oldest journal record is this old; also how often an
    /// idle writer checks that the directory is writable.
    pub interval: Duration,
}

enum Command {
    Append(
        ArchivedRecord,
        oneshot::Sender<Result<Outcome, AppendError>>,
    ),
    Status(oneshot::Sender<ArchiveStatus>),
    Shutdown(oneshot::Sender<()>),
}

/// Why the writer could not take a request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriterError {
    /// The record was refused or could not be written.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// The writer has stopped (the server is shutting down).
    #[error("the archive is shutting down")]
    Stopped,
}

/// A cheap, cloneable handle to the writer.
#[derive(Clone, Debug)]
pub struct ArchiveHandle {
    commands: mpsc::Sender<Command>,
}

impl ArchiveHandle {
    /// Archives `record` unless it is a duplicate; resolves once it is on
    /// disk (fsynced).
    pub async fn append(&self, record: ArchivedRecord) -> Result<Outcome, WriterError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append(record, reply))
            .map_err(|_| WriterError::Stopped)?;
        Ok(answer.await.map_err(|_| WriterError::Stopped)??)
    }

    /// What the archive holds.
    pub async fn status(&self) -> Result<ArchiveStatus, WriterError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Status(reply))
            .map_err(|_| WriterError::Stopped)?;
        answer.await.map_err(|_| WriterError::Stopped)
    }
}

/// The running writer thread.
#[derive(Debug)]
pub struct Archive {
    handle: ArchiveHandle,
    healthy: watch::Receiver<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Archive {
    /// Opens and recovers the archive in `dir` (blocking) and starts its
    /// writer thread.
    pub fn open(dir: &Path, options: StoreOptions, policy: RollPolicy) -> anyhow::Result<Self> {
        let store = Store::open(dir, options)?;
        let (commands, receiver) = mpsc::channel();
        let (health, healthy) = watch::channel(true);
        let thread = std::thread::Builder::new()
            .name("archive-writer".into())
            .spawn(move || {
                Writer {
                    store,
                    policy,
                    health,
                    roll_at: None,
                    retry_at: None,
                    appends_ok: true,
                    rolls_ok: true,
                }
                .run(receiver)
            })?;
        Ok(Self {
            handle: ArchiveHandle { commands },
            healthy,
            thread: Some(thread),
        })
    }

    /// A handle for the gRPC handlers.
    pub fn handle(&self) -> ArchiveHandle {
        self.handle.clone()
    }

    /// Whether the directory is writable (true) or appends and rolls are
    /// failing (false); changes as that changes.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    /// Rolls what the journal holds and stops the writer. Requests sent
    /// after this fail with [`WriterError::Stopped`].
    pub async fn shutdown(mut self) {
        let (reply, done) = oneshot::channel();
        if self.handle.commands.send(Command::Shutdown(reply)).is_ok() {
            let _ = done.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct Writer {
    store: Store,
    policy: RollPolicy,
    health: watch::Sender<bool>,
    /// When the journal is due to roll (its oldest record's age).
    roll_at: Option<Instant>,
    /// After a failed roll: not before this.
    retry_at: Option<Instant>,
    /// Whether the last append (or probe) wrote the journal.
    appends_ok: bool,
    /// Whether the last roll committed.
    rolls_ok: bool,
}

impl Writer {
    fn run(mut self, commands: mpsc::Receiver<Command>) {
        if self.store.journal_records() > 0 {
            self.roll_at = Some(Instant::now() + self.policy.interval);
        }
        let mut probe_at = Instant::now() + self.policy.interval;
        loop {
            let wake = self.roll_at.map_or(probe_at, |at| at.min(probe_at));
            let first = match commands.recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(command) => Some(command),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut appends = Vec::new();
            let mut stop = None;
            let mut next = first;
            while let Some(command) = next.take() {
                match command {
                    Command::Append(record, reply) => appends.push((record, reply)),
                    Command::Status(reply) => {
                        let _ = reply.send(self.store.status());
                    }
                    Command::Shutdown(reply) => {
                        stop = Some(reply);
                        break;
                    }
                }
                if appends.len() < MAX_BATCH {
                    next = commands.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                self.append(appends);
            }
            if let Some(reply) = stop {
                self.roll("shutdown");
                let _ = reply.send(());
                return;
            }
            let now = Instant::now();
            let may_roll = self.retry_at.is_none_or(|at| at <= now);
            if may_roll && self.store.journal_records() >= self.policy.records {
                self.roll("size");
            } else if may_roll && self.roll_at.is_some_and(|at| at <= now) {
                self.roll("interval");
            }
            if probe_at <= now {
                probe_at = now + self.policy.interval;
                match self.store.probe() {
                    Ok(()) => self.appends_ok = true,
                    Err(e) => {
                        tracing::error!(dir = %self.store.dir().display(), error = %e, "archive directory is not writable");
                        self.appends_ok = false;
                    }
                }
                self.report_health();
            }
        }
        // Every handle is gone without a shutdown: still leave a clean archive.
        self.roll("shutdown");
    }

    fn append(
        &mut self,
        appends: Vec<(
            ArchivedRecord,
            oneshot::Sender<Result<Outcome, AppendError>>,
        )>,
    ) {
        let (records, replies): (Vec<_>, Vec<_>) = appends.into_iter().unzip();
        let outcomes = self.store.append_batch(records);
        let failed = outcomes
            .iter()
            .any(|o| matches!(o, Err(AppendError::Unwritable(_))));
        let wrote = outcomes.iter().any(|o| matches!(o, Ok(Outcome::Appended)));
        for (outcome, reply) in outcomes.into_iter().zip(replies) {
            let _ = reply.send(outcome);
        }
        if failed {
            self.appends_ok = false;
        } else if wrote {
            self.appends_ok = true;
        }
        self.report_health();
        if self.roll_at.is_none() && self.store.journal_records() > 0 {
            self.roll_at = Some(Instant::now() + self.policy.interval);
        }
    }

    fn roll(&mut self, reason: &'static str) {
        match self.store.roll() {
            Ok(()) => {
                self.roll_at = None;
                self.retry_at = None;
                self.rolls_ok = true;
            }
            Err(e) => {
                tracing::error!(reason, error = %e, "rolling the journal failed; its records stay in the journal");
                self.rolls_ok = false;
                // Try again soon, but not in a tight loop.
                let retry = Instant::now() + self.policy.interval.min(Duration::from_secs(1));
                self.retry_at = Some(retry);
                self.roll_at = Some(retry);
            }
        }
        self.report_health();
    }

    /// Healthy unless the last append (or probe) or the last roll failed.
    fn report_health(&self) {
        let healthy = self.appends_ok && self.rolls_ok;
        self.health.send_if_modified(|current| {
            let changed = *current != healthy;
            *current = healthy;
            changed
        });
    }
}
