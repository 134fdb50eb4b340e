//! Runs the `trellis-archive` binary: delivery through the generated
//! client, rolls into day files, SIGKILL in the middle of traffic, and the
//! `check` and `restore` commands against a real PostgreSQL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost_types::{Any, Timestamp};
use time::OffsetDateTime;
use time::macros::datetime;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis::pb::telco::archive::v1::GetArchiveStatusRequest;
use trellis::pb::telco::archive::v1::archive_events_service_client::ArchiveEventsServiceClient;
use trellis::pb::telco::archive::v1::archive_service_client::ArchiveServiceClient;
use trellis::pb::telco::usage::v1::{UsageRecord, UsageRecordedEvent, UsageType};
use trellis::pb::trellis::events::v1::{DeliverRequest, Event};
use trellis_archive::record::ArchivedRecord;
use trellis_archive::store::read_archive;
use trellis_test_support::{ChildGuard, TestDb, free_port, wait_for_tcp};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_trellis-archive");

/// A running `trellis-archive serve`, killed on drop.
struct Server {
    process: ChildGuard,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--dir")
            .arg(dir)
            .args(["--listen", &addr.to_string(), "--grace", "2s"])
            .args(extra)
            .env("RUST_LOG", "info");
        let process = ChildGuard::spawn("trellis-archive", cmd).expect("trellis-archive starts");
        assert!(
            wait_for_tcp(addr, Duration::from_secs(20)),
            "trellis-archive never listened on {addr}: {}",
            process.output()
        );
        Self { process, addr }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap()
    }

    async fn events(&self) -> ArchiveEventsServiceClient<Channel> {
        ArchiveEventsServiceClient::new(self.channel().await)
    }

    async fn status(&self) -> trellis::pb::telco::archive::v1::GetArchiveStatusResponse {
        ArchiveServiceClient::new(self.channel().await)
            .get_archive_status(GetArchiveStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// SIGTERM, and the exit status once it has stopped.
    fn stop(mut self) -> std::process::ExitStatus {
        self.process.terminate();
        let status = self
            .process
            .wait_exit(Duration::from_secs(20))
            .expect("trellis-archive stops after SIGTERM");
        assert!(status.success(), "{status}: {}", self.process.output());
        status
    }
}

/// One usage event as usage would publish it.
#[derive(Clone, Debug)]
struct Usage {
    event_id: String,
    key: String,
    sequence: u64,
    record: UsageRecord,
}

fn timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap(),
    }
}

/// The `n`th usage of `user`, at microsecond precision, spread over days.
fn usage(user: &str, sequence: u64, n: u64) -> Usage {
    let occurred = datetime!(2024-05-01 00:00:00.000001 UTC)
        + Duration::from_secs(n * 11 * 3600)
        + Duration::from_micros(n * 1013);
    let types = [UsageType::Data, UsageType::Voice, UsageType::Sms];
    Usage {
        event_id: Uuid::new_v4().to_string(),
        key: user.to_owned(),
        sequence,
        record: UsageRecord {
            id: Uuid::new_v4().to_string(),
            user_id: user.to_owned(),
            r#type: types[(n % 3) as usize] as i32,
            quantity: i64::try_from(n).unwrap() + 1,
            occurred_at: Some(timestamp(occurred)),
            idempotency_key: format!("cdr-{user}-{sequence}"),
            recorded_at: Some(timestamp(occurred + Duration::from_millis(1500))),
        },
    }
}

impl Usage {
    fn request(&self) -> DeliverRequest {
        let payload = UsageRecordedEvent {
            record: Some(self.record.clone()),
        };
        DeliverRequest {
            event: Some(Event {
                id: self.event_id.clone(),
                topic: "usage.recorded".into(),
                key: self.key.clone(),
                occurred_at: self.record.recorded_at,
                payload: Some(Any::from_msg(&payload).unwrap()),
                source: "usage".into(),
                sequence: self.sequence,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.record.id.parse().unwrap()
    }

    fn day(&self) -> String {
        let t = self.record.occurred_at.unwrap();
        let t = OffsetDateTime::from_unix_timestamp(t.seconds).unwrap();
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    }

    /// Whether `archived` is this usage, field for field.
    fn matches(&self, archived: &ArchivedRecord) -> bool {
        let r = &self.record;
        let at = |t: &Option<Timestamp>| {
            let t = t.unwrap();
            OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
            )
            .unwrap()
        };
        archived.id == self.id()
            && archived.user_id == r.user_id
            && i32::from(archived.usage_type.as_i16()) == r.r#type
            && archived.quantity == r.quantity
            && archived.occurred_at == at(&r.occurred_at)
            && archived.idempotency_key == r.idempotency_key
            && archived.recorded_at == at(&r.recorded_at)
            && archived.event_id == self.event_id
            && archived.source == "usage"
            && archived.key == self.key
            && archived.sequence == self.sequence
    }
}

async fn deliver(client: &mut ArchiveEventsServiceClient<Channel>, usage: &Usage) -> bool {
    client
        .deliver(usage.request())
        .await
        .unwrap_or_else(|e| panic!("delivering {usage:?}: {e:?}"))
        .into_inner()
        .duplicate
}

/// Asserts the archive in `dir` holds exactly `sent`, each once.
fn assert_archived_exactly(dir: &Path, sent: &[Usage]) {
    let contents = read_archive(dir).unwrap();
    let mut by_id: HashMap<Uuid, Vec<&ArchivedRecord>> = HashMap::new();
    for record in &contents.records {
        by_id.entry(record.id).or_default().push(record);
    }
    for usage in sent {
        let copies = by_id.remove(&usage.id()).unwrap_or_default();
        assert_eq!(copies.len(), 1, "{usage:?} archived {} times", copies.len());
        assert!(
            usage.matches(copies[0]),
            "{usage:?} archived as {:?}",
            copies[0]
        );
    }
    assert!(by_id.is_empty(), "archived but never sent: {by_id:?}");
}

fn journal_lines(dir: &Path, generation: u64) -> usize {
    std::fs::read_to_string(dir.join(format!("journal/journal-{generation}.jsonl")))
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_each_record_once_and_rolls_by_day() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--roll-records", "1000", "--roll-interval", "1h"],
    );

    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "telco.archive.v1.ArchiveEventsService",
        "telco.archive.v1.ArchiveService",
    ] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut client = server.events().await;
    let sent: Vec<Usage> = (0..6)
        .map(|n| usage(if n % 2 == 0 { "alice" } else { "bob" }, n / 2 + 1, n))
        .collect();
    for usage in &sent {
        assert!(!deliver(&mut client, usage).await, "{usage:?}");
    }
    // Redelivery: duplicate, and nothing more written.
    assert!(deliver(&mut client, &sent[3]).await);
    assert!(deliver(&mut client, &sent[0]).await);
    assert_eq!(journal_lines(dir.path(), 1), 6);

    let status = server.status().await;
    assert_eq!(
        (status.records, status.journal_records, status.files),
        (6, 6, 0)
    );
    let mut days: Vec<String> = sent.iter().map(Usage::day).collect();
    days.dedup();
    assert_eq!(days.len(), 3, "{days:?}");
    assert_eq!(status.days, days);
    assert!(status.last_commit_at.is_none());

    // A clean stop rolls the journal into one file per day.
    server.stop();
    for day in &days {
        let part = dir
            .path()
            .join(format!("usage/date={day}/part-000000000001.jsonl.gz"));
        assert!(part.exists(), "{}", part.display());
    }
    assert_eq!(journal_lines(dir.path(), 2), 0);
    assert!(!dir.path().join("journal/journal-1.jsonl").exists());
    let contents = read_archive(dir.path()).unwrap();
    assert_eq!((contents.files, contents.journal_records), (3, 0));
    for record in &contents.records {
        let usage = sent.iter().find(|u| u.id() == record.id).unwrap();
        assert_eq!(
            trellis_archive::record::format_day(record.day()),
            usage.day()
        );
    }
    assert_archived_exactly(dir.path(), &sent);

    // After a restart the archive still knows what it holds, and rolls by
    // size.
    let server = Server::start(
        dir.path(),
        &["--roll-records", "2", "--roll-interval", "1h"],
    );
    let status = server.status().await;
    assert_eq!(
        (status.records, status.journal_records, status.files),
        (6, 0, 3)
    );
    assert!(status.last_commit_at.is_some());
    let mut client = server.events().await;
    assert!(
        deliver(&mut client, &sent[5]).await,
        "a duplicate after a restart"
    );
    let more = [usage("alice", 4, 6), usage("carol", 1, 7)];
    for usage in &more {
        assert!(!deliver(&mut client, usage).await);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = server.status().await;
        if status.journal_records == 0 {
            assert_eq!((status.records, status.files), (8, 5));
            break;
        }
        assert!(Instant::now() < deadline, "no roll by size: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop();
    let all: Vec<Usage> = sent.iter().chain(&more).cloned().collect();
    assert_archived_exactly(dir.path(), &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_poison_events_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut client = server.events().await;
    let good = usage("dave", 1, 0);

    let mut wrong_type = good.request();
    wrong_type.event.as_mut().unwrap().payload = Some(Any {
        type_url: "type.googleapis.com/telco.user.v1.UserCreatedEvent".into(),
        value: vec![],
    });
    let mut garbage = good.request();
    garbage
        .event
        .as_mut()
        .unwrap()
        .payload
        .as_mut()
        .unwrap()
        .value = vec![0xff, 0xff, 0xff];
    let mut incomplete = good.clone();
    incomplete.record.user_id.clear();
    incomplete.record.occurred_at = None;
    incomplete.record.r#type = 0;
    let mut no_sequence = good.request();
    no_sequence.event.as_mut().unwrap().sequence = 0;
    let mut no_id = good.request();
    no_id.event.as_mut().unwrap().id = "not-a-uuid".into();

    for (what, request, fields) in [
        ("no event", DeliverRequest { event: None }, &["event"][..]),
        ("wrong payload type", wrong_type, &["event.payload"][..]),
        ("undecodable payload", garbage, &["event.payload"][..]),
        (
            "record missing fields",
            incomplete.request(),
            &["record.user_id", "record.occurred_at", "record.type"][..],
        ),
        ("no sequence", no_sequence, &["event.sequence"][..]),
        ("bad event id", no_id, &["event.id"][..]),
    ] {
        let status = client.deliver(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        for field in fields {
            assert!(status.message().contains(field), "{what}: {status:?}");
        }
    }

    // An event of another topic is acknowledged and ignored.
    let mut other = good.request();
    other.event.as_mut().unwrap().topic = "user.created".into();
    assert!(!client.deliver(other).await.unwrap().into_inner().duplicate);

    let status = server.status().await;
    assert_eq!((status.records, status.files), (0, 0), "{status:?}");
    assert_eq!(
        std::fs::metadata(dir.path().join("journal/journal-1.jsonl"))
            .unwrap()
            .len(),
        0
    );
    // The good event is still archived afterwards.
    assert!(!deliver(&mut client, &good).await);
    server.stop();
    assert_archived_exactly(dir.path(), &[good]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_traffic_loses_and_doubles_nothing() {
    const USERS: usize = 8;
    const PER_USER: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    // Small, frequent rolls so kills land in rolls too.
    let flags = ["--roll-records", "25", "--roll-interval", "50ms"];
    let events: Arc<Vec<Vec<Usage>>> = Arc::new(
        (0..USERS)
            .map(|u| {
                (1..=PER_USER)
                    .map(|s| usage(&format!("user-{u}"), s * 2, s + u as u64))
                    .collect()
            })
            .collect(),
    );
    // Per user: how many of its events were acknowledged (a prefix, as the
    // dispatcher delivers in order and stops at a failure).
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..USERS).map(|_| AtomicU64::new(0)).collect());
    let mut kills = 0;
    for round in 0..6 {
        let mut server = Server::start(dir.path(), &flags);
        let channel = server.channel().await;
        let mut tasks = Vec::new();
        for user in 0..USERS {
            let (events, acked) = (events.clone(), acked.clone());
            let mut client = ArchiveEventsServiceClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                let done = acked[user].load(Ordering::SeqCst) as usize;
                // Redeliver a few acknowledged events, then everything after.
                let from = done.saturating_sub(3);
                for (i, usage) in events[user].iter().enumerate().skip(from) {
                    match client.deliver(usage.request()).await {
                        Ok(answer) => {
                            let duplicate = answer.into_inner().duplicate;
                            assert!(
                                i >= done || duplicate,
                                "an acknowledged event was archived again: {usage:?}"
                            );
                            acked[user].fetch_max(i as u64 + 1, Ordering::SeqCst);
                        }
                        Err(status) => {
                            assert_ne!(status.code(), Code::InvalidArgument, "{status:?}");
                            return;
                        }
                    }
                }
            }));
        }
        if round < 3 {
            // Kill once this round has acknowledged some events, however
            // fast the machine: 100, 200, then 300 more (1,200 in all).
            let total = || acked.iter().map(|a| a.load(Ordering::SeqCst)).sum::<u64>();
            let target = total() + 100 * (round as u64 + 1);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while total() < target && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            server.process.kill();
            kills += 1;
            for task in tasks {
                task.await.unwrap();
            }
            let done: u64 = acked.iter().map(|a| a.load(Ordering::SeqCst)).sum();
            assert!(
                done < (USERS as u64) * PER_USER,
                "all events were delivered before the kill of round {round}; \
                 the test no longer kills mid-traffic"
            );
        } else {
            for task in tasks {
                task.await.unwrap();
            }
            let done: u64 = acked.iter().map(|a| a.load(Ordering::SeqCst)).sum();
            if done == (USERS as u64) * PER_USER {
                let status = server.status().await;
                assert_eq!(status.records, done as i64, "{status:?}");
                server.stop();
                break;
            }
            server.stop();
        }
    }
    assert_eq!(kills, 3);
    let sent: Vec<Usage> = events.iter().flatten().cloned().collect();
    assert_archived_exactly(dir.path(), &sent);
}

async fn health(server: &Server) -> i32 {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: "telco.archive.v1.ArchiveEventsService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_for_health(server: &Server, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(server).await != want as i32 {
        assert!(
            Instant::now() < deadline,
            "health never became {want:?}: {}",
            server.process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_while_day_files_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--roll-records", "1", "--roll-interval", "200ms"],
    );
    wait_for_health(&server, ServingStatus::Serving).await;
    // The tests run as root, so permissions would not stop a write: put a
    // file where the day directories go.
    let usage_dir = dir.path().join("usage");
    let moved = dir.path().join("usage.moved");
    std::fs::rename(&usage_dir, &moved).unwrap();
    std::fs::write(&usage_dir, b"in the way").unwrap();

    let mut client = server.events().await;
    let first = usage("frank", 1, 0);
    // The journal still takes records; the roll fails.
    assert!(!deliver(&mut client, &first).await);
    wait_for_health(&server, ServingStatus::NotServing).await;
    let status = server.status().await;
    assert_eq!((status.journal_records, status.files), (1, 0));

    std::fs::remove_file(&usage_dir).unwrap();
    std::fs::rename(&moved, &usage_dir).unwrap();
    wait_for_health(&server, ServingStatus::Serving).await;
    let status = server.status().await;
    assert_eq!(
        (status.records, status.journal_records, status.files),
        (1, 0, 1)
    );
    server.stop();
    assert_archived_exactly(dir.path(), &[first]);
}

const USAGE_TABLE: &str = "CREATE TABLE usage_records (
    id UUID PRIMARY KEY,
    user_id TEXT NOT NULL,
    usage_type SMALLINT NOT NULL,
    quantity BIGINT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, idempotency_key))";

async fn insert(client: &tokio_postgres::Client, usage: &Usage) {
    let r = &usage.record;
    let at = |t: &Option<Timestamp>| {
        let t = t.unwrap();
        OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
        )
        .unwrap()
    };
    client
        .execute(
            "INSERT INTO usage_records VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &usage.id(),
                &r.user_id,
                &(r.r#type as i16),
                &r.quantity,
                &at(&r.occurred_at),
                &r.idempotency_key,
                &at(&r.recorded_at),
            ],
        )
        .await
        .unwrap();
}

type Row = (
    Uuid,
    String,
    i16,
    i64,
    OffsetDateTime,
    String,
    OffsetDateTime,
);

async fn rows(client: &tokio_postgres::Client) -> Vec<Row> {
    client
        .query("SELECT * FROM usage_records ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect()
}

fn run(command: &str, dir: &Path, db: &TestDb) -> Output {
    Command::new(BIN)
        .arg(command)
        .arg("--dir")
        .arg(dir)
        .args(["--database-url", &db.url()])
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_restore_against_usage_database() {
    let dir = tempfile::tempdir().unwrap();
    // Some records in committed day files, the rest in the journal, and the
    // server still running while `check` reads.
    let server = Server::start(
        dir.path(),
        &["--roll-records", "10", "--roll-interval", "1h"],
    );
    let mut client = server.events().await;
    let sent: Vec<Usage> = (0..25)
        .map(|n| usage(&format!("user-{}", n % 4), n / 4 + 1, n))
        .collect();
    for usage in &sent {
        assert!(!deliver(&mut client, usage).await);
    }

    let source = TestDb::new().await.unwrap();
    let db = source.connect().await.unwrap();
    db.batch_execute(USAGE_TABLE).await.unwrap();
    for usage in &sent {
        insert(&db, usage).await;
    }
    let output = run("check", dir.path(), &source);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("agree (25 records)"),
        "{}",
        text(&output)
    );

    // An altered row, a row the archive lacks, a record the database lacks.
    let altered = &sent[3];
    db.execute(
        "UPDATE usage_records SET quantity = quantity + 1 WHERE id = $1",
        &[&altered.id()],
    )
    .await
    .unwrap();
    let output = run("check", dir.path(), &source);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report = text(&output);
    assert!(report.contains("different in the archive: 1"), "{report}");
    assert!(
        report.contains(&format!("{}: quantity", altered.id())),
        "{report}"
    );

    let unarchived = usage("erin", 1, 99);
    insert(&db, &unarchived).await;
    let deleted = &sent[17];
    db.execute("DELETE FROM usage_records WHERE id = $1", &[&deleted.id()])
        .await
        .unwrap();
    let output = run("check", dir.path(), &source);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let report = text(&output);
    assert!(report.contains("missing from the archive: 1"), "{report}");
    assert!(report.contains(&unarchived.id().to_string()), "{report}");
    assert!(
        report.contains("in the archive but not in the database: 1"),
        "{report}"
    );
    assert!(report.contains(&deleted.id().to_string()), "{report}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("disagree"),
        "{report}"
    );
    server.stop();

    // Restore into an empty table reproduces the original rows exactly.
    let pristine = TestDb::new().await.unwrap();
    let expected = pristine.connect().await.unwrap();
    expected.batch_execute(USAGE_TABLE).await.unwrap();
    for usage in &sent {
        insert(&expected, usage).await;
    }
    let target = TestDb::new().await.unwrap();
    let restored = target.connect().await.unwrap();
    restored.batch_execute(USAGE_TABLE).await.unwrap();
    let output = run("restore", dir.path(), &target);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("restored 25 usage records"),
        "{}",
        text(&output)
    );
    assert_eq!(rows(&restored).await, rows(&expected).await);
    let output = run("check", dir.path(), &target);
    assert!(output.status.success(), "{}", text(&output));

    // Not into a table that holds rows, and not without the table.
    let output = run("restore", dir.path(), &target);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("already holds 25 rows"),
        "{}",
        text(&output)
    );
    assert_eq!(rows(&restored).await.len(), 25);
    let empty = TestDb::new().await.unwrap();
    let output = run("restore", dir.path(), &empty);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("usage service creates it"),
        "{}",
        text(&output)
    );
}
