//! The usage service as it runs: `trellis-usage` on its own database,
//! calling a real `trellis-user` (on another database) through a
//! `mesh-proxy` sidecar in plain-hop mode, called by the test through the
//! generated clients. Events stay in the outbox (the sidecar has no route
//! to the subscribers), where the tests read them.
//!
//! Needs `trellis-user` and `mesh-proxy` built beside this crate's binary:
//! `cargo build -p trellis-user -p mesh-proxy` (or `cargo test --workspace`).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use prost_types::Timestamp;
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use trellis::pb::telco::usage::v1 as pb;
use trellis::pb::telco::usage::v1::usage_outbox_service_client::UsageOutboxServiceClient;
use trellis::pb::telco::usage::v1::usage_service_client::UsageServiceClient;
use trellis::pb::telco::user::v1 as user_pb;
use trellis::pb::telco::user::v1::user_service_client::UserServiceClient;
use trellis::pb::trellis::events::v1::GetOutboxStatusRequest;
use trellis_test_support::{
    ChildGuard, ProxyOptions, RunningProxy, TestDb, TestPki, free_port, sibling_binary, spawn_proxy,
};
use uuid::Uuid;

const USAGE_BIN: &str = env!("CARGO_BIN_EXE_trellis-usage");
const SETTLEMENT: &str = "telco.settlement.v1.SettlementEventsService";
const ARCHIVE: &str = "telco.archive.v1.ArchiveEventsService";

fn addr() -> SocketAddr {
    ([127, 0, 0, 1], free_port()).into()
}

/// A service process and a channel to it.
struct Process {
    guard: ChildGuard,
    channel: Channel,
}

impl Process {
    fn spawn(name: &str, mut cmd: Command, listen: SocketAddr) -> Self {
        cmd.env("RUST_LOG", "info");
        let guard = ChildGuard::spawn(name, cmd).unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let channel = Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect_lazy();
        Self { guard, channel }
    }

    /// Waits until `service`'s health check says SERVING (database
    /// reachable and migrated, settings loaded).
    async fn wait_serving(&self, service: &str) {
        let mut health = HealthClient::new(self.channel.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            let request = HealthCheckRequest {
                service: service.into(),
            };
            match health.check(request).await {
                Ok(r) if r.get_ref().status() == ServingStatus::Serving => return,
                Ok(r) => last = format!("{:?}", r.get_ref().status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{service} never became SERVING (last: {last}):\n{}",
            self.guard.output()
        );
    }
}

/// user (own database) <- sidecar (plain hop) <- usage instance(s) (one
/// shared database).
struct Stack {
    usage_db: TestDb,
    _user_db: TestDb,
    _pki: TestPki,
    user: Process,
    _proxy: RunningProxy,
    usage: Vec<Process>,
    plan_id: String,
}

impl Stack {
    /// Starts the stack with `instances` usage processes, each given
    /// `settings` (`KEY=VALUE`) besides the subscribers of usage.recorded.
    async fn start(instances: usize, settings: &[&str]) -> Self {
        let (user_db, usage_db) = (
            TestDb::new().await.expect("a test database for user"),
            TestDb::new().await.expect("a test database for usage"),
        );

        let user_addr = addr();
        let mut cmd = Command::new(sibling_binary(USAGE_BIN, "trellis-user"));
        cmd.args(["--listen", &user_addr.to_string()])
            .args(["--database-url", &user_db.url()])
            // user's own events go nowhere here.
            .args(["--outbound", &addr().to_string()])
            .arg("--no-config");
        let user = Process::spawn("trellis-user", cmd, user_addr);

        let pki = TestPki::new("trellis.local");
        let identity = pki.issue("usage", "usage");
        let proxy = spawn_proxy(
            &sibling_binary(USAGE_BIN, "mesh-proxy"),
            "usage",
            ProxyOptions::new(&identity, None, None).args(&[
                "--static-route",
                &format!("telco.user.v1.UserService=http://{user_addr}"),
            ]),
        );

        let subscribers =
            format!(r#"subscribers={{"usage.recorded":["{SETTLEMENT}","{ARCHIVE}"]}}"#);
        let usage: Vec<Process> = (0..instances)
            .map(|i| {
                let listen = addr();
                let mut cmd = Command::new(USAGE_BIN);
                cmd.args(["--listen", &listen.to_string()])
                    .args(["--database-url", &usage_db.url()])
                    .args(["--outbound", &proxy.outbound.to_string()])
                    .arg("--no-config")
                    .args(["--setting", &subscribers]);
                for setting in settings {
                    cmd.args(["--setting", setting]);
                }
                Process::spawn(&format!("trellis-usage-{i}"), cmd, listen)
            })
            .collect();

        user.wait_serving("telco.user.v1.UserService").await;
        for instance in &usage {
            instance.wait_serving("telco.usage.v1.UsageService").await;
        }
        let plans = UserServiceClient::new(user.channel.clone())
            .list_plans(user_pb::ListPlansRequest {})
            .await
            .expect("ListPlans")
            .into_inner()
            .plans;
        let plan_id = plans
            .first()
            .expect("the user service has plans")
            .id
            .clone();
        Self {
            usage_db,
            _user_db: user_db,
            _pki: pki,
            user,
            _proxy: proxy,
            usage,
            plan_id,
        }
    }

    fn usage(&self) -> UsageServiceClient<Channel> {
        self.usage_at(0)
    }

    fn usage_at(&self, instance: usize) -> UsageServiceClient<Channel> {
        UsageServiceClient::new(self.usage[instance].channel.clone())
    }

    fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.user.channel.clone())
    }

    /// A new user, without a plan.
    async fn new_user(&self) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let user = self
            .users()
            .create_user(user_pb::CreateUserRequest {
                msisdn: format!("+4915{:010}", n),
                name: format!("Test User {n}"),
                email: format!("user{n}@example.com"),
            })
            .await
            .expect("CreateUser")
            .into_inner()
            .user
            .expect("a user");
        user.id
    }

    /// A new user with a plan in force from `effective_at` (now if unset).
    async fn subscribe(&self, user_id: &str, effective_at: Option<OffsetDateTime>) {
        self.users()
            .subscribe(user_pb::SubscribeRequest {
                user_id: user_id.into(),
                plan_id: self.plan_id.clone(),
                effective_at: effective_at.map(ts),
            })
            .await
            .expect("Subscribe");
    }

    /// A new user with a plan in force now.
    async fn subscribed_user(&self) -> String {
        let id = self.new_user().await;
        self.subscribe(&id, None).await;
        id
    }

    async fn db(&self) -> tokio_postgres::Client {
        self.usage_db
            .connect()
            .await
            .expect("connect to usage's database")
    }

    async fn record_count(&self, user_id: &str) -> i64 {
        self.db()
            .await
            .query_one(
                "SELECT count(*) FROM usage_records WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The outbox rows of `user_id`: (subscriber, topic, sequence, payload).
    async fn outbox(&self, user_id: &str) -> Vec<(String, String, i64, pb::UsageRecordedEvent)> {
        self.db()
            .await
            .query(
                "SELECT subscriber, topic, sequence, payload_type, payload FROM trellis_outbox \
                 WHERE key = $1 ORDER BY subscriber, sequence",
                &[&user_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let payload_type: String = row.get("payload_type");
                assert_eq!(
                    payload_type,
                    "type.googleapis.com/telco.usage.v1.UsageRecordedEvent"
                );
                let payload: Vec<u8> = row.get("payload");
                (
                    row.get("subscriber"),
                    row.get("topic"),
                    row.get("sequence"),
                    pb::UsageRecordedEvent::decode(payload.as_slice()).expect("payload decodes"),
                )
            })
            .collect()
    }
}

fn ts(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Whole seconds, some time ago (so records are comfortably in the window).
fn ago(d: time::Duration) -> OffsetDateTime {
    let t = now() - d;
    t.replace_nanosecond(0).unwrap()
}

fn record(
    user_id: &str,
    kind: pb::UsageType,
    quantity: i64,
    at: OffsetDateTime,
    key: &str,
) -> pb::RecordUsageRequest {
    pb::RecordUsageRequest {
        user_id: user_id.into(),
        r#type: kind.into(),
        quantity,
        occurred_at: Some(ts(at)),
        idempotency_key: key.into(),
    }
}

/// The fields an INVALID_ARGUMENT names in its BadRequest details, after
/// checking its message names them too.
fn bad_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    for field in &fields {
        assert!(
            status.message().contains(field.as_str()),
            "{field} not in {:?}",
            status.message()
        );
    }
    fields
}

async fn list(
    client: &mut UsageServiceClient<Channel>,
    request: pb::ListUsageRequest,
) -> Result<Vec<pb::UsageRecord>, Status> {
    let mut stream = client.list_usage(request).await?.into_inner();
    let mut records = Vec::new();
    while let Some(message) = stream.message().await? {
        records.push(message.record.expect("a record in every message"));
    }
    Ok(records)
}

#[tokio::test]
async fn records_each_type_once_per_key_and_publishes_it() {
    let stack = Stack::start(1, &[]).await;
    let mut usage = stack.usage();
    let user = stack.subscribed_user().await;

    // Nanoseconds are dropped to the microseconds that are stored.
    let at = ago(time::Duration::hours(2)) + time::Duration::nanoseconds(123_456_789);
    let stored_at = at.replace_nanosecond(123_456_000).unwrap();
    let before = now();
    let mut first = Vec::new();
    for (kind, quantity, key) in [
        (pb::UsageType::Data, 250, "cdr-data"),
        (pb::UsageType::Voice, 61, "cdr-voice"),
        (pb::UsageType::Sms, 1, "cdr-sms"),
    ] {
        let r = usage
            .record_usage(record(&user, kind, quantity, at, key))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e:?}"))
            .into_inner();
        assert!(!r.duplicate);
        let rec = r.record.expect("a record");
        Uuid::parse_str(&rec.id).expect("the ID is a UUID");
        assert_eq!(rec.user_id, user);
        assert_eq!(rec.r#type(), kind);
        assert_eq!(rec.quantity, quantity);
        assert_eq!(rec.occurred_at, Some(ts(stored_at)));
        assert_eq!(rec.idempotency_key, key);
        let recorded = rec.recorded_at.expect("recorded_at");
        assert!(
            (before.unix_timestamp() - 5..=now().unix_timestamp() + 5).contains(&recorded.seconds),
            "recorded_at {recorded:?}"
        );
        first.push(rec);
    }

    // A retry with the same parameters: the original record, nothing new.
    // The user ID may be spelled in capitals; it is the same user.
    for user_spelling in [user.clone(), user.to_uppercase()] {
        let again = usage
            .record_usage(record(
                &user_spelling,
                pb::UsageType::Data,
                250,
                at,
                "cdr-data",
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(again.duplicate);
        assert_eq!(again.record.as_ref(), Some(&first[0]));
    }

    // The same key with anything different is refused, naming the key.
    for (kind, quantity, when) in [
        (pb::UsageType::Data, 251, at),
        (pb::UsageType::Voice, 250, at),
        (pb::UsageType::Data, 250, at + time::Duration::seconds(1)),
    ] {
        let e = usage
            .record_usage(record(&user, kind, quantity, when, "cdr-data"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(e.message().contains("cdr-data"), "{e:?}");
    }

    // The same key for another user is another record.
    let other = stack.subscribed_user().await;
    let r = usage
        .record_usage(record(&other, pb::UsageType::Data, 250, at, "cdr-data"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.duplicate);
    assert_ne!(r.record.unwrap().id, first[0].id);

    assert_eq!(stack.record_count(&user).await, 3);

    // One event per record and subscriber, keyed by the user, in order.
    let outbox = stack.outbox(&user).await;
    assert_eq!(outbox.len(), 6, "{outbox:?}");
    for (i, (subscriber, topic, sequence, event)) in outbox.iter().enumerate() {
        let expected_subscriber = if i < 3 { ARCHIVE } else { SETTLEMENT };
        assert_eq!(subscriber, expected_subscriber);
        assert_eq!(topic, "usage.recorded");
        assert_eq!(*sequence, (i % 3) as i64 + 1);
        assert_eq!(event.record.as_ref(), Some(&first[i % 3]));
    }
    let status = UsageOutboxServiceClient::new(stack.usage[0].channel.clone())
        .get_outbox_status(GetOutboxStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.source, "usage");
    for subscriber in [SETTLEMENT, ARCHIVE] {
        let s = status
            .subscribers
            .iter()
            .find(|s| s.subscriber == subscriber)
            .unwrap_or_else(|| panic!("{subscriber} in {status:?}"));
        // Three for `user`, one for `other`; undeliverable here.
        assert_eq!(s.pending + s.parked, 4, "{s:?}");
    }
}

#[tokio::test]
async fn refuses_unknown_users_users_without_a_plan_and_bad_input() {
    let stack = Stack::start(1, &[]).await;
    let mut usage = stack.usage();
    let at = ago(time::Duration::hours(1));

    let unknown = Uuid::new_v4().to_string();
    let e = usage
        .record_usage(record(&unknown, pb::UsageType::Sms, 1, at, "k1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains(&unknown) && e.message().contains("does not exist"),
        "{e:?}"
    );

    let no_plan = stack.new_user().await;
    let e = usage
        .record_usage(record(&no_plan, pb::UsageType::Sms, 1, at, "k1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("has no subscription in force"),
        "{e:?}"
    );

    // A plan scheduled for tomorrow is not in force today.
    let scheduled = stack.new_user().await;
    stack
        .subscribe(&scheduled, Some(now() + time::Duration::days(1)))
        .await;
    let e = usage
        .record_usage(record(&scheduled, pb::UsageType::Sms, 1, at, "k1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Once subscribed, the same request goes through (refusals are not
    // remembered).
    stack.subscribe(&no_plan, None).await;
    let r = usage
        .record_usage(record(&no_plan, pb::UsageType::Sms, 1, at, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.duplicate);

    // Every bad field at once, then each rule on its own.
    let e = usage
        .record_usage(pb::RecordUsageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&e),
        [
            "user_id",
            "type",
            "quantity",
            "occurred_at",
            "idempotency_key"
        ]
    );
    let user = stack.subscribed_user().await;
    let good = || record(&user, pb::UsageType::Data, 10, at, "good");
    type Change<'a> = Box<dyn Fn(&mut pb::RecordUsageRequest) + 'a>;
    let cases: Vec<(&str, Change<'_>, &str)> = vec![
        ("empty user", Box::new(|r| r.user_id.clear()), "user_id"),
        (
            "non-UUID user",
            Box::new(|r| r.user_id = "ada".into()),
            "user_id",
        ),
        ("unspecified type", Box::new(|r| r.r#type = 0), "type"),
        ("unknown type", Box::new(|r| r.r#type = 7), "type"),
        ("zero quantity", Box::new(|r| r.quantity = 0), "quantity"),
        (
            "negative quantity",
            Box::new(|r| r.quantity = -3),
            "quantity",
        ),
        (
            "too much data",
            Box::new(|r| r.quantity = 1_000_001),
            "quantity",
        ),
        (
            "a call over a day",
            Box::new(|r| {
                r.r#type = pb::UsageType::Voice.into();
                r.quantity = 86_401;
            }),
            "quantity",
        ),
        (
            "too many messages",
            Box::new(|r| {
                r.r#type = pb::UsageType::Sms.into();
                r.quantity = 1_001;
            }),
            "quantity",
        ),
        ("no time", Box::new(|r| r.occurred_at = None), "occurred_at"),
        (
            "in the future",
            Box::new(|r| r.occurred_at = Some(ts(now() + time::Duration::minutes(10)))),
            "occurred_at",
        ),
        (
            "too long ago",
            Box::new(|r| r.occurred_at = Some(ts(now() - time::Duration::days(401)))),
            "occurred_at",
        ),
        (
            "bad nanos",
            Box::new(|r| {
                r.occurred_at = Some(Timestamp {
                    seconds: at.unix_timestamp(),
                    nanos: 1_000_000_000,
                })
            }),
            "occurred_at",
        ),
        (
            "no key",
            Box::new(|r| r.idempotency_key.clear()),
            "idempotency_key",
        ),
        (
            "long key",
            Box::new(|r| r.idempotency_key = "k".repeat(201)),
            "idempotency_key",
        ),
        (
            "control character in key",
            Box::new(|r| r.idempotency_key = "cdr\u{7}1".into()),
            "idempotency_key",
        ),
    ];
    for (what, change, field) in cases {
        let mut request = good();
        change(&mut request);
        let e = usage.record_usage(request).await.unwrap_err();
        assert_eq!(bad_fields(&e), [field], "{what}: {e:?}");
    }
    // The limits themselves are accepted.
    for (kind, quantity, key) in [
        (pb::UsageType::Data, 1_000_000, "max-data"),
        (pb::UsageType::Voice, 86_400, "max-voice"),
        (pb::UsageType::Sms, 1_000, "max-sms"),
    ] {
        usage
            .record_usage(record(&user, kind, quantity, at, key))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
    }
    usage
        .record_usage(record(&user, pb::UsageType::Sms, 1, at, &"k".repeat(200)))
        .await
        .unwrap();
    assert_eq!(stack.record_count(&user).await, 4);

    // Nothing was written for the refused requests.
    for refused in [&unknown, &scheduled] {
        assert_eq!(stack.record_count(refused).await, 0);
        assert!(stack.outbox(refused).await.is_empty());
    }

    // ListUsage and GetUsageSummary validate too.
    let list_request = |limit: i32| pb::ListUsageRequest {
        user_id: user.clone(),
        start_time: None,
        end_time: None,
        limit,
    };
    for limit in [-1, 501] {
        let e = list(&mut usage, list_request(limit)).await.unwrap_err();
        assert_eq!(bad_fields(&e), ["limit"], "limit {limit}");
    }
    assert_eq!(list(&mut usage, list_request(500)).await.unwrap().len(), 4);
    let e = list(
        &mut usage,
        pb::ListUsageRequest {
            user_id: String::new(),
            start_time: Some(ts(now())),
            end_time: Some(ts(now() - time::Duration::hours(1))),
            limit: 0,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(bad_fields(&e), ["user_id", "end_time"]);

    let summary =
        |start: Option<OffsetDateTime>, end: Option<OffsetDateTime>| pb::GetUsageSummaryRequest {
            user_id: user.clone(),
            start_time: start.map(ts),
            end_time: end.map(ts),
        };
    let t = ago(time::Duration::days(10));
    for (request, fields) in [
        (summary(None, None), vec!["start_time", "end_time"]),
        (summary(Some(t), Some(t)), vec!["end_time"]),
        (
            summary(Some(t), Some(t + time::Duration::days(401))),
            vec!["end_time"],
        ),
    ] {
        let e = usage.get_usage_summary(request).await.unwrap_err();
        assert_eq!(bad_fields(&e), fields);
    }

    // With the user service gone, a user not checked before cannot record,
    // and the answer says so without its internals.
    let fresh = stack.subscribed_user().await;
    drop(stack.user.guard);
    let e = usage
        .record_usage(record(&fresh, pb::UsageType::Data, 1, at, "k1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("user service"), "{e:?}");
    // A user confirmed a moment ago still can (the subscription cache), and
    // retries need no user service at all.
    usage
        .record_usage(record(
            &user,
            pb::UsageType::Data,
            1,
            at,
            "while-user-is-down",
        ))
        .await
        .unwrap();
    let r = usage
        .record_usage(record(&no_plan, pb::UsageType::Sms, 1, at, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.duplicate);
}

#[tokio::test]
async fn lists_in_order_and_totals_per_type() {
    let stack = Stack::start(1, &["max_page_size=5"]).await;
    let mut usage = stack.usage();
    let user = stack.subscribed_user().await;
    let other = stack.subscribed_user().await;

    let base = ago(time::Duration::days(3));
    let at = |minutes: i64| base + time::Duration::minutes(minutes);
    // Recorded out of order; two share an instant (ordered by ID then).
    let plan = [
        (pb::UsageType::Voice, 120, at(30)),
        (pb::UsageType::Data, 500, at(10)),
        (pb::UsageType::Data, 700, at(20)),
        (pb::UsageType::Voice, 30, at(20)),
        (pb::UsageType::Data, 1, at(0)),
        (pb::UsageType::Data, 9, at(40)),
    ];
    let mut ids = Vec::new();
    for (i, (kind, quantity, when)) in plan.iter().enumerate() {
        let r = usage
            .record_usage(record(&user, *kind, *quantity, *when, &format!("e{i}")))
            .await
            .unwrap()
            .into_inner();
        ids.push((*when, r.record.unwrap().id));
    }
    usage
        .record_usage(record(&other, pb::UsageType::Sms, 3, at(15), "o1"))
        .await
        .unwrap();
    ids.sort_by(|a, b| {
        a.0.cmp(&b.0).then(
            Uuid::parse_str(&a.1)
                .unwrap()
                .cmp(&Uuid::parse_str(&b.1).unwrap()),
        )
    });
    let expected: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();

    let listed = |start: Option<OffsetDateTime>, end: Option<OffsetDateTime>, limit: i32| {
        pb::ListUsageRequest {
            user_id: user.clone(),
            start_time: start.map(ts),
            end_time: end.map(ts),
            limit,
        }
    };
    let ids_of = |records: Vec<pb::UsageRecord>| -> Vec<String> {
        assert!(records.iter().all(|r| r.user_id == user));
        records.into_iter().map(|r| r.id).collect()
    };

    // limit 0 is the max_page_size setting (5 here); more is refused.
    let page = list(&mut usage, listed(None, None, 0)).await.unwrap();
    assert_eq!(ids_of(page), expected[..5]);
    let e = list(&mut usage, listed(None, None, 6)).await.unwrap_err();
    assert_eq!(bad_fields(&e), ["limit"]);
    assert_eq!(
        ids_of(list(&mut usage, listed(None, None, 2)).await.unwrap()),
        expected[..2]
    );
    // start inclusive, end exclusive.
    assert_eq!(
        ids_of(
            list(&mut usage, listed(Some(at(10)), Some(at(30)), 0))
                .await
                .unwrap()
        ),
        expected[1..4]
    );
    assert_eq!(
        ids_of(
            list(&mut usage, listed(Some(at(20)), None, 0))
                .await
                .unwrap()
        ),
        expected[2..6]
    );
    assert_eq!(
        ids_of(
            list(&mut usage, listed(None, Some(at(10)), 0))
                .await
                .unwrap()
        ),
        expected[..1]
    );
    assert!(
        list(&mut usage, listed(Some(at(20)), Some(at(20)), 0))
            .await
            .unwrap()
            .is_empty()
    );
    // Someone unknown here has an empty list.
    let nobody = pb::ListUsageRequest {
        user_id: Uuid::new_v4().to_string(),
        ..Default::default()
    };
    assert!(list(&mut usage, nobody).await.unwrap().is_empty());

    // Totals in DATA, VOICE, SMS order, zeros included.
    let totals = |start: OffsetDateTime, end: OffsetDateTime| {
        let mut usage = usage.clone();
        let user = user.clone();
        async move {
            let r = usage
                .get_usage_summary(pb::GetUsageSummaryRequest {
                    user_id: user.clone(),
                    start_time: Some(ts(start)),
                    end_time: Some(ts(end)),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.user_id, user);
            assert_eq!(r.start_time, Some(ts(start)));
            assert_eq!(r.end_time, Some(ts(end)));
            r.totals
                .into_iter()
                .map(|t| (t.r#type(), t.quantity, t.record_count))
                .collect::<Vec<_>>()
        }
    };
    use pb::UsageType::{Data, Sms, Voice};
    assert_eq!(
        totals(at(0), at(60)).await,
        [(Data, 1210, 4), (Voice, 150, 2), (Sms, 0, 0)]
    );
    assert_eq!(
        totals(at(10), at(40)).await,
        [(Data, 1200, 2), (Voice, 150, 2), (Sms, 0, 0)]
    );
    assert_eq!(
        totals(at(-60), at(0)).await,
        [(Data, 0, 0), (Voice, 0, 0), (Sms, 0, 0)]
    );
}

#[tokio::test]
async fn concurrent_twins_record_once_across_instances() {
    let stack = Stack::start(2, &[]).await;
    let at = ago(time::Duration::minutes(30));

    // Twenty identical calls at once, split over both instances: one
    // record, one event per subscriber, every caller gets that record.
    let user = stack.subscribed_user().await;
    let calls = (0..20).map(|i| {
        let mut client = stack.usage_at(i % 2);
        let request = record(&user, pb::UsageType::Voice, 42, at, "twin");
        async move { client.record_usage(request).await }
    });
    let answers: Vec<pb::RecordUsageResponse> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("every twin succeeds").into_inner())
        .collect();
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
    let id = &answers[0].record.as_ref().unwrap().id;
    assert!(answers.iter().all(|a| &a.record.as_ref().unwrap().id == id));
    assert_eq!(stack.record_count(&user).await, 1);
    let outbox = stack.outbox(&user).await;
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    assert!(
        outbox
            .iter()
            .all(|(_, _, seq, e)| *seq == 1 && &e.record.as_ref().unwrap().id == id)
    );

    // Twenty at once with one key but two different quantities: one
    // record; the calls that agree with it succeed, the others are refused.
    let user = stack.subscribed_user().await;
    let calls = (0..20).map(|i| {
        let mut client = stack.usage_at(i % 2);
        let quantity = if i % 4 < 2 { 5 } else { 6 };
        let request = record(&user, pb::UsageType::Sms, quantity, at, "rival");
        async move { (quantity, client.record_usage(request).await) }
    });
    let answers = futures::future::join_all(calls).await;
    let rows = stack
        .db()
        .await
        .query(
            "SELECT quantity FROM usage_records WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let winner: i64 = rows[0].get(0);
    for (quantity, answer) in answers {
        match answer {
            Ok(r) => assert_eq!(quantity, winner, "{r:?}"),
            Err(e) => {
                assert_ne!(quantity, winner, "{e:?}");
                assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
            }
        }
    }
    assert_eq!(stack.outbox(&user).await.len(), 2);
}
