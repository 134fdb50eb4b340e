//! The settlement binary against a real PostgreSQL database: events are
//! delivered straight to its SettlementEventsService (as a producer's
//! dispatcher would, without the mesh) and bills read back through
//! SettlementService.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prost::{Message, Name};
use prost_types::{Any, Timestamp};
use time::{Month, OffsetDateTime};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use trellis::pb::telco::settlement::v1::settlement_events_service_client::SettlementEventsServiceClient;
use trellis::pb::telco::settlement::v1::settlement_service_client::SettlementServiceClient;
use trellis::pb::telco::settlement::v1::{Bill, BillingPeriod, GetBillRequest, ListBillsRequest};
use trellis::pb::telco::usage::v1::{UsageRecord, UsageRecordedEvent, UsageType};
use trellis::pb::telco::user::v1::{
    Plan, Subscription, SubscriptionChangedEvent, User, UserCreatedEvent,
};
use trellis::pb::trellis::events::v1::{DeliverRequest, Event};
use trellis_test_support::{ChildGuard, TestDb, free_port, wait_for_tcp};

// ---------------------------------------------------------------------------
// Fixtures

/// A running settlement process.
struct Settlement {
    child: ChildGuard,
    channel: Channel,
}

impl Settlement {
    /// Starts the binary on `db` and waits until it reports SERVING.
    async fn start(db: &TestDb) -> Settlement {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-settlement"));
        cmd.args(["--listen", &addr.to_string()])
            .args(["--database-url", &db.url()])
            .arg("--no-config")
            .env_remove("TRELLIS_SETTINGS");
        let child = ChildGuard::spawn("settlement", cmd).expect("settlement starts");
        let up = tokio::task::spawn_blocking(move || wait_for_tcp(addr, Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(up, "settlement did not listen:\n{}", child.output());
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut health = HealthClient::new(channel.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let serving = health
                .check(HealthCheckRequest {
                    service: "telco.settlement.v1.SettlementEventsService".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
            if serving {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "settlement never became SERVING:\n{}",
                child.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Settlement { child, channel }
    }

    fn events(&self) -> SettlementEventsServiceClient<Channel> {
        SettlementEventsServiceClient::new(self.channel.clone())
    }

    fn bills(&self) -> SettlementServiceClient<Channel> {
        SettlementServiceClient::new(self.channel.clone())
    }

    /// Delivers `event`; `Ok(duplicate)`.
    async fn deliver(&self, event: &Event) -> Result<bool, tonic::Status> {
        deliver(&mut self.events(), event).await
    }

    async fn get_bill(&self, user: &str, year: i32, month: i32) -> Result<Bill, tonic::Status> {
        let response = self
            .bills()
            .get_bill(GetBillRequest {
                user_id: user.into(),
                period: Some(BillingPeriod { year, month }),
            })
            .await?;
        Ok(response.into_inner().bill.expect("a bill"))
    }

    async fn list_bills(&self, user: &str) -> Result<Vec<Bill>, tonic::Status> {
        let response = self
            .bills()
            .list_bills(ListBillsRequest {
                user_id: user.into(),
            })
            .await?;
        Ok(response.into_inner().bills)
    }
}

async fn deliver(
    client: &mut SettlementEventsServiceClient<Channel>,
    event: &Event,
) -> Result<bool, tonic::Status> {
    let response = client
        .deliver(DeliverRequest {
            event: Some(event.clone()),
        })
        .await?;
    Ok(response.into_inner().duplicate)
}

fn at(year: i32, month: u8, day: u8, hour: u8, minute: u8, second: u8) -> Timestamp {
    let instant = time::Date::from_calendar_date(year, Month::try_from(month).unwrap(), day)
        .unwrap()
        .with_hms(hour, minute, second)
        .unwrap()
        .assume_utc();
    Timestamp {
        seconds: instant.unix_timestamp(),
        nanos: 0,
    }
}

fn event<M: Message + Name>(
    topic: &str,
    key: &str,
    source: &str,
    sequence: u64,
    payload: &M,
) -> Event {
    Event {
        id: uuid::Uuid::new_v4().to_string(),
        topic: topic.into(),
        key: key.into(),
        occurred_at: Some(trellis::events::to_timestamp(OffsetDateTime::now_utc())),
        payload: Some(Any {
            type_url: M::type_url(),
            value: payload.encode_to_vec(),
        }),
        source: source.into(),
        sequence,
    }
}

fn usage(
    user: &str,
    sequence: u64,
    kind: UsageType,
    quantity: i64,
    occurred_at: Timestamp,
) -> Event {
    let record = UsageRecord {
        id: format!("rec-{user}-{sequence}"),
        user_id: user.into(),
        r#type: kind as i32,
        quantity,
        occurred_at: Some(occurred_at),
        idempotency_key: format!("key-{sequence}"),
        recorded_at: Some(trellis::events::to_timestamp(OffsetDateTime::now_utc())),
    };
    event(
        "usage.recorded",
        user,
        "usage",
        sequence,
        &UsageRecordedEvent {
            record: Some(record),
        },
    )
}

/// A plan: fee, included data MB / voice s / SMS, rates per MB / minute / SMS.
fn plan(id: &str, fee: i64, included: [i64; 3], rates: [i64; 3]) -> Plan {
    Plan {
        id: id.into(),
        name: format!("Plan {id}"),
        currency_code: "EUR".into(),
        monthly_fee_cents: fee,
        included_data_mb: included[0],
        included_voice_seconds: included[1],
        included_sms: included[2],
        extra_data_mb_cents: rates[0],
        extra_voice_minute_cents: rates[1],
        extra_sms_cents: rates[2],
    }
}

fn subscribe(user: &str, sequence: u64, plan: Plan, started_at: Timestamp) -> Event {
    let payload = SubscriptionChangedEvent {
        subscription: Some(Subscription {
            id: format!("sub-{user}-{sequence}"),
            user_id: user.into(),
            plan_id: plan.id.clone(),
            started_at: Some(started_at),
        }),
        plan: Some(plan),
        previous_plan_id: String::new(),
    };
    event("subscription.changed", user, "user", sequence, &payload)
}

/// (used, included, billable, rate, amount) of the bill's lines, in order.
fn lines(bill: &Bill) -> Vec<(i32, i64, i64, i64, i64, i64)> {
    bill.lines
        .iter()
        .map(|l| {
            (
                l.r#type,
                l.used_quantity,
                l.included_quantity,
                l.billable_quantity,
                l.rate_cents,
                l.amount_cents,
            )
        })
        .collect()
}

fn field_violations(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

const DATA: i32 = UsageType::Data as i32;
const VOICE: i32 = UsageType::Voice as i32;
const SMS: i32 = UsageType::Sms as i32;

// ---------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_bill_is_the_fee_plus_usage_beyond_the_allowances() {
    let db = TestDb::new().await.unwrap();
    let s = Settlement::start(&db).await;
    let user = "u-bill";
    let basic = plan("basic", 1_999, [1_000, 600, 50], [3, 10, 15]);
    assert!(
        !s.deliver(&subscribe(user, 1, basic, at(2025, 1, 5, 10, 0, 0)))
            .await
            .unwrap()
    );

    let january = [
        usage(user, 1, UsageType::Data, 700, at(2025, 1, 6, 8, 0, 0)),
        usage(user, 2, UsageType::Data, 450, at(2025, 1, 20, 8, 0, 0)),
        usage(user, 3, UsageType::Voice, 590, at(2025, 1, 7, 9, 0, 0)),
        usage(user, 4, UsageType::Voice, 71, at(2025, 1, 8, 9, 0, 0)),
        usage(user, 5, UsageType::Sms, 30, at(2025, 1, 9, 9, 0, 0)),
        // The month's last second is still January (UTC).
        usage(user, 6, UsageType::Sms, 25, at(2025, 1, 31, 23, 59, 59)),
    ];
    for e in &january {
        assert!(!s.deliver(e).await.unwrap());
    }
    // The first second of February is not.
    let february = usage(user, 7, UsageType::Data, 5, at(2025, 2, 1, 0, 0, 0));
    assert!(!s.deliver(&february).await.unwrap());
    // Topics settlement does not bill from are acknowledged and ignored.
    let created = event(
        "user.created",
        user,
        "user",
        2,
        &UserCreatedEvent {
            user: Some(User {
                id: user.into(),
                ..User::default()
            }),
        },
    );
    assert!(!s.deliver(&created).await.unwrap());
    assert!(
        s.deliver(&created).await.unwrap(),
        "second delivery is a duplicate"
    );
    let unknown = event(
        "plan.renamed",
        user,
        "user",
        3,
        &UserCreatedEvent::default(),
    );
    assert!(!s.deliver(&unknown).await.unwrap());

    let bill = s.get_bill(user, 2025, 1).await.unwrap();
    assert_eq!(bill.user_id, user);
    assert_eq!(
        bill.period,
        Some(BillingPeriod {
            year: 2025,
            month: 1
        })
    );
    assert_eq!(bill.plan_id, "basic");
    assert_eq!(bill.currency_code, "EUR");
    assert_eq!(bill.plan_fee_cents, 1_999);
    assert_eq!(
        lines(&bill),
        vec![
            // 1150 MB, 150 over, 3 ct each.
            (DATA, 1_150, 1_000, 150, 3, 450),
            // 661 s, 61 s over = 2 started minutes at 10 ct.
            (VOICE, 661, 600, 61, 10, 20),
            // 55 messages, 5 over, 15 ct each.
            (SMS, 55, 50, 5, 15, 75),
        ]
    );
    assert_eq!(bill.total_cents, 1_999 + 450 + 20 + 75);
    assert_eq!(bill.last_event_id, january[5].id);
    assert!(bill.updated_at.is_some());

    let feb = s.get_bill(user, 2025, 2).await.unwrap();
    assert_eq!(lines(&feb)[0], (DATA, 5, 1_000, 0, 3, 0));
    assert_eq!(feb.total_cents, 1_999);
    assert_eq!(feb.last_event_id, february.id);

    // Redelivering an applied event changes nothing.
    assert!(s.deliver(&january[1]).await.unwrap());
    assert_eq!(s.get_bill(user, 2025, 1).await.unwrap(), bill);
}

#[tokio::test]
async fn usage_before_the_subscription_is_billed_once_it_arrives() {
    let db = TestDb::new().await.unwrap();
    let s = Settlement::start(&db).await;
    let user = "u-early";
    let early = [
        usage(user, 1, UsageType::Voice, 60, at(2025, 3, 2, 0, 0, 0)),
        usage(user, 2, UsageType::Voice, 1, at(2025, 3, 3, 0, 0, 0)),
        usage(user, 3, UsageType::Sms, 3, at(2025, 3, 4, 0, 0, 0)),
    ];
    for e in &early {
        // Never FAILED_PRECONDITION: the usage is kept.
        assert!(!s.deliver(e).await.unwrap());
    }
    let status = s.get_bill(user, 2025, 3).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(s.list_bills(user).await.unwrap().is_empty());

    let sub = subscribe(
        user,
        1,
        plan("talk", 500, [0, 0, 0], [1, 7, 2]),
        at(2025, 3, 1, 0, 0, 0),
    );
    assert!(!s.deliver(&sub).await.unwrap());
    let bill = s.get_bill(user, 2025, 3).await.unwrap();
    assert_eq!(
        lines(&bill),
        vec![
            (DATA, 0, 0, 0, 1, 0),
            // 61 s: two started minutes.
            (VOICE, 61, 0, 61, 7, 14),
            (SMS, 3, 0, 3, 2, 6),
        ]
    );
    assert_eq!(bill.total_cents, 520);
    // The subscription is the last event that changed the bill.
    assert_eq!(bill.last_event_id, sub.id);
}

#[tokio::test]
async fn the_plan_in_force_at_the_month_end_rates_the_whole_month() {
    let db = TestDb::new().await.unwrap();
    let s = Settlement::start(&db).await;
    let user = "u-change";
    let cheap = plan("cheap", 1_000, [0, 0, 0], [1, 1, 1]);
    let pricey = plan("pricey", 3_000, [0, 0, 0], [10, 10, 10]);
    let gold = plan("gold", 9_000, [100, 100, 100], [0, 0, 0]);
    let mid = plan("mid", 2_000, [0, 0, 0], [5, 5, 5]);

    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    s.deliver(&subscribe(user, next(), cheap, at(2025, 1, 1, 0, 0, 0)))
        .await
        .unwrap();
    for month in 1..=5 {
        s.deliver(&usage(
            user,
            100 + u64::from(month),
            UsageType::Data,
            10,
            at(2025, month, 10, 0, 0, 0),
        ))
        .await
        .unwrap();
    }
    // Changed in the middle of March.
    s.deliver(&subscribe(user, next(), pricey, at(2025, 3, 15, 12, 0, 0)))
        .await
        .unwrap();
    // Scheduled for May.
    s.deliver(&subscribe(user, next(), gold, at(2025, 5, 1, 0, 0, 0)))
        .await
        .unwrap();

    let plan_and_total = |bill: Bill| (bill.plan_id, bill.total_cents);
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 2).await.unwrap()),
        ("cheap".into(), 1_010)
    );
    // March's usage, also that before the 15th, is rated at the new plan.
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 3).await.unwrap()),
        ("pricey".into(), 3_100)
    );
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 4).await.unwrap()),
        ("pricey".into(), 3_100)
    );
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 5).await.unwrap()),
        ("gold".into(), 9_000)
    );
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 6).await.unwrap()),
        ("gold".into(), 9_000)
    );

    // A change from 20 March replaces the one scheduled for May (and not
    // the one of 15 March).
    let replace = subscribe(user, next(), mid, at(2025, 3, 20, 0, 0, 0));
    s.deliver(&replace).await.unwrap();
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 3).await.unwrap()),
        ("mid".into(), 2_050)
    );
    let may = s.get_bill(user, 2025, 5).await.unwrap();
    assert_eq!(plan_and_total(may.clone()), ("mid".into(), 2_050));
    // May's bill changed with that event, though it concerns March.
    assert_eq!(may.last_event_id, replace.id);
    assert_eq!(
        plan_and_total(s.get_bill(user, 2025, 2).await.unwrap()),
        ("cheap".into(), 1_010)
    );
}

#[tokio::test]
async fn requests_are_validated_and_missing_bills_are_not_found() {
    let db = TestDb::new().await.unwrap();
    let s = Settlement::start(&db).await;
    let user = "u-valid";
    s.deliver(&subscribe(
        user,
        1,
        plan("p", 100, [0, 0, 0], [1, 1, 1]),
        at(2025, 6, 30, 23, 59, 59),
    ))
    .await
    .unwrap();
    assert_eq!(s.get_bill(user, 2025, 6).await.unwrap().total_cents, 100);
    for (who, year, month) in [(user, 2025, 5), (user, 2000, 1), ("nobody", 2025, 6)] {
        let status = s.get_bill(who, year, month).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "{who} {year}-{month}: {status:?}"
        );
    }

    let mut bills = s.bills();
    let invalid = |request: GetBillRequest| {
        let mut bills = bills.clone();
        async move { field_violations(&bills.get_bill(request).await.unwrap_err()) }
    };
    let period = |year, month| Some(BillingPeriod { year, month });
    assert_eq!(
        invalid(GetBillRequest {
            user_id: String::new(),
            period: None
        })
        .await,
        ["user_id", "period"]
    );
    assert_eq!(
        invalid(GetBillRequest {
            user_id: user.into(),
            period: period(1999, 6)
        })
        .await,
        ["period.year"]
    );
    assert_eq!(
        invalid(GetBillRequest {
            user_id: user.into(),
            period: period(10_000, 6)
        })
        .await,
        ["period.year"]
    );
    assert_eq!(
        invalid(GetBillRequest {
            user_id: user.into(),
            period: period(2025, 13)
        })
        .await,
        ["period.month"]
    );
    assert_eq!(
        invalid(GetBillRequest {
            user_id: user.into(),
            period: period(0, 0)
        })
        .await,
        ["period.year", "period.month"]
    );
    let status = bills
        .list_bills(ListBillsRequest {
            user_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["user_id"]);
    assert!(s.list_bills("nobody").await.unwrap().is_empty());
}

#[tokio::test]
async fn poison_events_are_invalid_and_write_nothing() {
    let db = TestDb::new().await.unwrap();
    let s = Settlement::start(&db).await;
    let user = "u-poison";
    let good = usage(user, 1, UsageType::Sms, 1, at(2025, 1, 1, 0, 0, 0));

    let mut wrong_type = good.clone();
    wrong_type.payload.as_mut().unwrap().type_url = SubscriptionChangedEvent::type_url();
    let mut garbage = good.clone();
    garbage.payload.as_mut().unwrap().value = vec![0xff, 0xff, 0xff, 0xff];
    let mut no_id = good.clone();
    no_id.id = String::new();
    let mut not_uuid = good.clone();
    not_uuid.id = "event-1".into();
    let mut no_payload = good.clone();
    no_payload.payload = None;
    let unspecified = usage(user, 2, UsageType::Unspecified, 1, at(2025, 1, 1, 0, 0, 0));
    let zero = usage(user, 3, UsageType::Data, 0, at(2025, 1, 1, 0, 0, 0));
    let other_user = {
        let mut e = usage(
            "someone-else",
            4,
            UsageType::Data,
            1,
            at(2025, 1, 1, 0, 0, 0),
        );
        e.key = user.into();
        e
    };
    let mut bad_sub = subscribe(
        user,
        1,
        plan("p", -5, [0, 0, 0], [1, 1, 1]),
        at(2025, 1, 1, 0, 0, 0),
    );
    // A subscription payload under the usage topic.
    let mut crossed = bad_sub.clone();
    crossed.topic = "usage.recorded".into();
    bad_sub.id = uuid::Uuid::new_v4().to_string();

    for (name, poison, field) in [
        ("wrong type URL", &wrong_type, "event.payload"),
        ("garbage bytes", &garbage, "event.payload"),
        ("missing id", &no_id, "event.id"),
        ("id not a UUID", &not_uuid, "event.id"),
        ("missing payload", &no_payload, "event.payload"),
        ("UNSPECIFIED type", &unspecified, "payload.record.type"),
        ("zero quantity", &zero, "payload.record.quantity"),
        (
            "record of another user",
            &other_user,
            "payload.record.user_id",
        ),
        ("negative fee", &bad_sub, "payload.plan.monthly_fee_cents"),
        ("crossed topic", &crossed, "event.payload"),
    ] {
        let status = s.deliver(poison).await.unwrap_err();
        assert!(
            field_violations(&status).iter().any(|f| f == field),
            "{name}: {status:?}"
        );
        // Redelivery will not help: still INVALID_ARGUMENT.
        assert_eq!(
            s.deliver(poison).await.unwrap_err().code(),
            Code::InvalidArgument,
            "{name}"
        );
    }

    let client = db.connect().await.unwrap();
    for table in [
        "subscriptions",
        "usage_totals",
        "bill_marks",
        "trellis_inbox",
    ] {
        let row = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 0, "{table} has rows");
    }
    // The poisoned IDs were not recorded as applied: the fixed event (same
    // ID as the wrong-type one) applies.
    assert!(!s.deliver(&good).await.unwrap());
}

#[tokio::test]
async fn list_bills_runs_newest_first_from_the_first_subscription() {
    let db = TestDb::new().await.unwrap();
    let s = Settlement::start(&db).await;
    let user = "u-list";
    let now = OffsetDateTime::now_utc();
    // (year, month) `offset` months from now.
    let month_from_now = |offset: i32| {
        let index = now.year() * 12 + i32::from(u8::from(now.month())) - 1 + offset;
        (index.div_euclid(12), (index.rem_euclid(12) + 1) as u8)
    };
    let ts = |(year, month): (i32, u8), day| at(year, month, day, 12, 0, 0);

    s.deliver(&subscribe(
        user,
        1,
        plan("old", 100, [0, 0, 0], [1, 1, 1]),
        ts(month_from_now(-3), 20),
    ))
    .await
    .unwrap();
    s.deliver(&subscribe(
        user,
        2,
        plan("new", 200, [0, 0, 0], [1, 1, 1]),
        ts(month_from_now(-1), 2),
    ))
    .await
    .unwrap();
    // Usage dated two months ahead extends the list to that month.
    s.deliver(&usage(user, 1, UsageType::Sms, 4, ts(month_from_now(2), 3)))
        .await
        .unwrap();
    s.deliver(&usage(user, 2, UsageType::Sms, 7, ts(month_from_now(0), 3)))
        .await
        .unwrap();
    // Usage before the first subscription's month is on no bill.
    s.deliver(&usage(
        user,
        3,
        UsageType::Sms,
        9,
        ts(month_from_now(-5), 3),
    ))
    .await
    .unwrap();

    let bills = s.list_bills(user).await.unwrap();
    let summary: Vec<((i32, u8), String, i64)> = bills
        .iter()
        .map(|b| {
            let p = b.period.unwrap();
            ((p.year, p.month as u8), b.plan_id.clone(), b.total_cents)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (month_from_now(2), "new".into(), 204),
            (month_from_now(1), "new".into(), 200),
            (month_from_now(0), "new".into(), 207),
            (month_from_now(-1), "new".into(), 200),
            (month_from_now(-2), "old".into(), 100),
            (month_from_now(-3), "old".into(), 100),
        ]
    );
    // Each listed bill is the one GetBill returns.
    for bill in &bills {
        let p = bill.period.unwrap();
        assert_eq!(&s.get_bill(user, p.year, p.month).await.unwrap(), bill);
    }
}

#[tokio::test]
async fn state_survives_a_crash_and_redelivery_changes_nothing() {
    let db = TestDb::new().await.unwrap();
    let user = "u-crash";
    let sub = subscribe(
        user,
        1,
        plan("p", 1_000, [0, 0, 10], [1, 1, 2]),
        at(2025, 4, 1, 0, 0, 0),
    );
    // 200 messages' worth of events, quantities 1..=200: any event applied
    // twice or lost shows in the total.
    let events: Arc<Vec<Event>> = Arc::new(
        (1..=200)
            .map(|i| {
                usage(
                    user,
                    i,
                    UsageType::Sms,
                    i as i64,
                    at(2025, 4, 2, 0, 0, (i % 60) as u8),
                )
            })
            .collect(),
    );
    let expected_sms: i64 = (1..=200).sum();

    let mut first = Settlement::start(&db).await;
    assert!(!first.deliver(&sub).await.unwrap());
    // Four producers deliver concurrently; the process is killed (SIGKILL)
    // while they are at it.
    let acked = Arc::new(AtomicUsize::new(0));
    let acked_quantity = Arc::new(AtomicI64::new(0));
    let mut producers = Vec::new();
    for part in 0..4 {
        let (events, acked, acked_quantity) =
            (events.clone(), acked.clone(), acked_quantity.clone());
        let mut client = first.events();
        producers.push(tokio::spawn(async move {
            for e in events.iter().skip(part).step_by(4) {
                if deliver(&mut client, e).await.is_err() {
                    return;
                }
                acked.fetch_add(1, Ordering::SeqCst);
                acked_quantity.fetch_add(e.sequence as i64, Ordering::SeqCst);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::SeqCst) < 40 {
        assert!(
            Instant::now() < deadline,
            "deliveries stalled:\n{}",
            first.child.output()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.child.kill();
    for p in producers {
        p.await.unwrap();
    }
    let acked_before = acked.load(Ordering::SeqCst);
    assert!(
        acked_before < events.len(),
        "the crash came too late to test anything"
    );

    // Restarted on the same database: what was acknowledged is there.
    let second = Settlement::start(&db).await;
    let bill = second.get_bill(user, 2025, 4).await.unwrap();
    assert!(bill.lines[2].used_quantity >= acked_quantity.load(Ordering::SeqCst));
    // The producers deliver everything again (at least once): each event
    // takes effect exactly once.
    assert!(second.deliver(&sub).await.unwrap());
    let mut duplicates = 0;
    for e in events.iter() {
        if second.deliver(e).await.unwrap() {
            duplicates += 1;
        }
    }
    assert!(
        duplicates >= acked_before,
        "{duplicates} duplicates, {acked_before} acknowledged"
    );
    let bill = second.get_bill(user, 2025, 4).await.unwrap();
    assert_eq!(
        lines(&bill)[2],
        (
            SMS,
            expected_sms,
            10,
            expected_sms - 10,
            2,
            2 * (expected_sms - 10)
        )
    );
    assert_eq!(bill.total_cents, 1_000 + 2 * (expected_sms - 10));

    // Once more: crash, restart, redeliver; the bill stays the same, to its
    // `updated_at` and `last_event_id`.
    let mut second = second;
    second.child.kill();
    let third = Settlement::start(&db).await;
    assert_eq!(third.get_bill(user, 2025, 4).await.unwrap(), bill);
    for e in events.iter().take(20) {
        assert!(third.deliver(e).await.unwrap());
    }
    assert_eq!(third.get_bill(user, 2025, 4).await.unwrap(), bill);
}
