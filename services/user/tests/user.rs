//! Starts the `trellis-user` binary on a fresh database and calls it through
//! the generated clients: users, plans, subscriptions, and the events the
//! outbox holds afterwards.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use prost_types::Timestamp;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use trellis::pb::telco::user::v1 as pb;
use trellis_test_support::{ChildGuard, TestDb, free_port};

use pb::user_service_client::UserServiceClient;

const SETTLEMENT: &str = "telco.settlement.v1.SettlementEventsService";

/// A running `trellis-user` on its own database, stopped on drop.
struct User {
    db: TestDb,
    process: ChildGuard,
    channel: Channel,
}

impl User {
    /// Starts the service and waits until its health check says SERVING
    /// (database reachable and migrated). Its sidecar's outbound port is a
    /// port nobody listens on, so delivery fails and events stay in the
    /// outbox for the tests to read.
    async fn start() -> Self {
        let db = TestDb::new().await.expect("a test database");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let dead_outbound: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let subscribers = format!(
            r#"subscribers={{"subscription.changed":["{SETTLEMENT}"],"user.created":["{SETTLEMENT}"]}}"#
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-user"));
        cmd.args(["--listen", &addr.to_string()])
            .args(["--database-url", &db.url()])
            .args(["--outbound", &dead_outbound.to_string()])
            .arg("--no-config")
            .args(["--setting", &subscribers])
            .env("RUST_LOG", "info");
        let process = ChildGuard::spawn("trellis-user", cmd).expect("trellis-user starts");
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let user = Self {
            db,
            process,
            channel,
        };
        user.wait_serving().await;
        user
    }

    async fn wait_serving(&self) {
        let mut health = HealthClient::new(self.channel.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            let request = HealthCheckRequest {
                service: "telco.user.v1.UserService".into(),
            };
            match health.check(request).await {
                Ok(r) if r.get_ref().status() == ServingStatus::Serving => return,
                Ok(r) => last = format!("{:?}", r.get_ref().status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "trellis-user never became SERVING (last: {last}):\n{}",
            self.process.output()
        );
    }

    fn client(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel.clone())
    }

    /// (topic, key, sequence) of every outbox row, in sequence order.
    async fn outbox(&self) -> Vec<(String, String, i64)> {
        let db = self.db.connect().await.unwrap();
        db.query(
            "SELECT topic, key, sequence FROM trellis_outbox ORDER BY sequence, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    }

    /// The payloads of the outbox rows of `topic` and `key`, in sequence order.
    async fn payloads<M: Message + Default>(&self, topic: &str, key: &str) -> Vec<M> {
        let db = self.db.connect().await.unwrap();
        db.query(
            "SELECT payload FROM trellis_outbox WHERE topic = $1 AND key = $2 ORDER BY sequence",
            &[&topic, &key],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| M::decode(r.get::<_, &[u8]>(0)).unwrap())
        .collect()
    }
}

fn create_request(msisdn: &str, name: &str, email: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        msisdn: msisdn.into(),
        name: name.into(),
        email: email.into(),
    }
}

async fn create(client: &mut UserServiceClient<Channel>, msisdn: &str) -> pb::User {
    client
        .create_user(create_request(msisdn, "Ada Lovelace", "ada@example.com"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

/// Asserts INVALID_ARGUMENT whose BadRequest names exactly `fields`.
#[track_caller]
fn assert_bad_fields(status: &Status, fields: &[&str]) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_request = status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries BadRequest details");
    let named: Vec<&str> = bad_request
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(named, fields, "{status:?}");
}

fn timestamp(offset_secs: i64) -> Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Timestamp {
        seconds: now.as_secs() as i64 + offset_secs,
        nanos: now.subsec_nanos() as i32,
    }
}

fn subscribe_request(user: &str, plan: &str, at: Option<Timestamp>) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        user_id: user.into(),
        plan_id: plan.into(),
        effective_at: at,
    }
}

async fn subscribe(
    client: &mut UserServiceClient<Channel>,
    user: &str,
    plan: &str,
    at: Option<Timestamp>,
) -> pb::Subscription {
    client
        .subscribe(subscribe_request(user, plan, at))
        .await
        .unwrap()
        .into_inner()
        .subscription
        .unwrap()
}

async fn get_subscription(
    client: &mut UserServiceClient<Channel>,
    user: &str,
) -> Result<pb::GetSubscriptionResponse, Status> {
    client
        .get_subscription(pb::GetSubscriptionRequest {
            user_id: user.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn users_are_created_validated_and_unique() {
    let service = User::start().await;
    let mut client = service.client();

    // Happy path: the name is trimmed, the ID is a UUID, GetUser agrees.
    let ada = client
        .create_user(create_request(
            "+4915112345678",
            "  Ada Lovelace  ",
            "ada@example.com",
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(ada.msisdn, "+4915112345678");
    assert_eq!(ada.name, "Ada Lovelace");
    assert_eq!(ada.email, "ada@example.com");
    assert!(uuid::Uuid::parse_str(&ada.id).is_ok(), "{}", ada.id);
    assert!(ada.created_at.is_some());
    let got = client
        .get_user(pb::GetUserRequest {
            user_id: ada.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(got, ada);

    // Every bad field is named, together.
    let e = client
        .create_user(create_request("", "", ""))
        .await
        .unwrap_err();
    assert_bad_fields(&e, &["msisdn", "name", "email"]);
    let e = client
        .create_user(create_request("0151 1234567", " \t ", "ada@"))
        .await
        .unwrap_err();
    assert_bad_fields(&e, &["msisdn", "name", "email"]);
    for msisdn in [
        "4915112345678",
        "+0915112345678",
        "+123456",
        "+1234567890123456",
        "+49 151 12345678",
    ] {
        let e = client
            .create_user(create_request(msisdn, "Ada", "ada@example.com"))
            .await
            .unwrap_err();
        assert_bad_fields(&e, &["msisdn"]);
    }
    for name in ["Ada\u{7}", &"x".repeat(201)] {
        let e = client
            .create_user(create_request("+4915100000001", name, "ada@example.com"))
            .await
            .unwrap_err();
        assert_bad_fields(&e, &["name"]);
    }
    let too_long = format!("{}@example.com", "a".repeat(243));
    for email in [
        "ada",
        "@example.com",
        "ada@example",
        "ada@x@example.com",
        "ada @example.com",
        too_long.as_str(),
    ] {
        let e = client
            .create_user(create_request("+4915100000001", "Ada", email))
            .await
            .unwrap_err();
        assert_bad_fields(&e, &["email"]);
    }

    // A duplicate msisdn is ALREADY_EXISTS, and leaves nothing behind.
    let e = client
        .create_user(create_request("+4915112345678", "Bob", "bob@example.com"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Concurrent creates of one msisdn: exactly one wins.
    let attempts = (0..8).map(|i| {
        let mut client = service.client();
        async move {
            client
                .create_user(create_request(
                    "+4479460000000",
                    &format!("Racer {i}"),
                    "race@example.com",
                ))
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    }
    let winner = results
        .into_iter()
        .find_map(Result::ok)
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    // GetUser: bad IDs, unknown IDs.
    for id in ["", "not-a-uuid"] {
        let e = client
            .get_user(pb::GetUserRequest { user_id: id.into() })
            .await
            .unwrap_err();
        assert_bad_fields(&e, &["user_id"]);
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    let e = client
        .get_user(pb::GetUserRequest {
            user_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&unknown), "{e:?}");

    // Exactly one user.created per user created, keyed by the user ID.
    let outbox = service.outbox().await;
    let mut created: Vec<(String, String, i64)> = vec![
        ("user.created".into(), ada.id.clone(), 1),
        ("user.created".into(), winner.id.clone(), 1),
    ];
    created.sort_by(|a, b| a.1.cmp(&b.1));
    let mut outbox_sorted = outbox.clone();
    outbox_sorted.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(outbox_sorted, created, "{outbox:?}");
    let events: Vec<pb::UserCreatedEvent> = service.payloads("user.created", &ada.id).await;
    assert_eq!(events, [pb::UserCreatedEvent { user: Some(ada) }]);
}

#[tokio::test]
async fn plans_are_listed_and_looked_up() {
    let service = User::start().await;
    let mut client = service.client();

    let plans = client
        .list_plans(pb::ListPlansRequest {})
        .await
        .unwrap()
        .into_inner()
        .plans;
    let ids: Vec<&str> = plans.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["basic", "plus", "max"]);
    assert!(
        plans
            .windows(2)
            .all(|w| (w[0].monthly_fee_cents, &w[0].id) <= (w[1].monthly_fee_cents, &w[1].id))
    );
    for plan in &plans {
        assert_eq!(plan.currency_code, "EUR");
        assert!(plan.monthly_fee_cents > 0 && plan.included_data_mb > 0);
        assert!(plan.extra_data_mb_cents > 0 && plan.extra_voice_minute_cents > 0);
        assert!(plan.extra_sms_cents > 0 && !plan.name.is_empty());
    }

    let basic = client
        .get_plan(pb::GetPlanRequest {
            plan_id: "basic".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!(basic, plans[0]);

    let e = client
        .get_plan(pb::GetPlanRequest {
            plan_id: "gold".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .get_plan(pb::GetPlanRequest {
            plan_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_fields(&e, &["plan_id"]);
}

#[tokio::test]
async fn subscriptions_change_now_and_later() {
    let service = User::start().await;
    let mut client = service.client();
    let ada = create(&mut client, "+4915112345678").await;

    // No subscription yet.
    let e = get_subscription(&mut client, &ada.id).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no subscription"), "{e:?}");

    // First subscription, now.
    let basic = subscribe(&mut client, &ada.id, "basic", None).await;
    assert_eq!(
        (basic.user_id.as_str(), basic.plan_id.as_str()),
        (ada.id.as_str(), "basic")
    );
    let started = basic.started_at.unwrap();
    assert_eq!(started.nanos % 1000, 0, "stored at microsecond precision");
    let now = get_subscription(&mut client, &ada.id).await.unwrap();
    assert_eq!(now.subscription.as_ref(), Some(&basic));
    assert_eq!(now.scheduled, None);

    // The same plan again: nothing changes, the same subscription returns.
    let again = subscribe(&mut client, &ada.id, "basic", None).await;
    assert_eq!(again, basic);

    // A change now, to plus.
    let plus = subscribe(&mut client, &ada.id, "plus", None).await;
    assert_ne!(plus.id, basic.id);
    let now = get_subscription(&mut client, &ada.id).await.unwrap();
    assert_eq!(now.subscription.as_ref(), Some(&plus));

    // A change scheduled in 30 days, with nanoseconds that get truncated.
    let mut in_30_days = timestamp(30 * 86_400);
    in_30_days.nanos = 123_456_789;
    let max = subscribe(&mut client, &ada.id, "max", Some(in_30_days)).await;
    let stored = max.started_at.unwrap();
    assert_eq!(
        (stored.seconds, stored.nanos),
        (in_30_days.seconds, 123_456_000)
    );
    let now = get_subscription(&mut client, &ada.id).await.unwrap();
    assert_eq!(now.subscription.as_ref(), Some(&plus));
    assert_eq!(now.scheduled.as_ref(), Some(&max));

    // Subscribing to the plan in force now no longer is a no-op: the
    // scheduled change is replaced (cancelled).
    let plus_again = subscribe(&mut client, &ada.id, "plus", None).await;
    assert_ne!(plus_again.id, plus.id);
    let now = get_subscription(&mut client, &ada.id).await.unwrap();
    assert_eq!(now.subscription.as_ref(), Some(&plus_again));
    assert_eq!(now.scheduled, None);

    // A new scheduled change, then an earlier one replacing it.
    let max = subscribe(&mut client, &ada.id, "max", Some(timestamp(60 * 86_400))).await;
    let basic_later = subscribe(&mut client, &ada.id, "basic", Some(timestamp(10 * 86_400))).await;
    let now = get_subscription(&mut client, &ada.id).await.unwrap();
    assert_eq!(now.scheduled.as_ref(), Some(&basic_later));
    assert_ne!(now.scheduled.as_ref(), Some(&max));

    // Subscribing to the scheduled plan at the scheduled time changes nothing.
    let same = subscribe(&mut client, &ada.id, "basic", basic_later.started_at).await;
    assert_eq!(same, basic_later);

    // Slightly in the past is allowed (clock skew).
    let past = subscribe(&mut client, &ada.id, "max", Some(timestamp(-60))).await;
    let now = get_subscription(&mut client, &ada.id).await.unwrap();
    assert_eq!(now.subscription.as_ref(), Some(&past));
    assert_eq!(now.scheduled, None);

    // The outbox: one subscription.changed per change, keyed by the user,
    // in order, with the full plan and the previous plan.
    let events: Vec<pb::SubscriptionChangedEvent> =
        service.payloads("subscription.changed", &ada.id).await;
    let summary: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.subscription.as_ref().unwrap().plan_id.as_str(),
                e.previous_plan_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("basic", ""),
            ("plus", "basic"),
            ("max", "plus"),
            ("plus", "plus"),
            ("max", "plus"),
            ("basic", "plus"),
            // A minute ago nothing was in force yet: every row of this
            // test started later, and all of them are replaced.
            ("max", ""),
        ]
    );
    for event in &events {
        let plan = event.plan.as_ref().unwrap();
        assert_eq!(plan.id, event.subscription.as_ref().unwrap().plan_id);
        assert_eq!(plan.currency_code, "EUR");
    }
    assert_eq!(events[0].subscription.as_ref(), Some(&basic));
    let outbox = service.outbox().await;
    let changes: Vec<i64> = outbox
        .iter()
        .filter(|(topic, key, _)| topic == "subscription.changed" && *key == ada.id)
        .map(|(_, _, sequence)| *sequence)
        .collect();
    assert_eq!(changes.len(), 7, "{outbox:?}");
    assert!(changes.windows(2).all(|w| w[0] < w[1]), "{outbox:?}");
    // user.created came first, on the same key.
    assert_eq!(outbox[0], ("user.created".into(), ada.id.clone(), 1));
}

#[tokio::test]
async fn subscribe_rejects_bad_input_and_unknown_ids() {
    let service = User::start().await;
    let mut client = service.client();
    let ada = create(&mut client, "+4915112345678").await;

    let e = client
        .subscribe(subscribe_request("", "", Some(timestamp(-3600))))
        .await
        .unwrap_err();
    assert_bad_fields(&e, &["user_id", "plan_id", "effective_at"]);
    for at in [
        timestamp(-6 * 60),
        timestamp(367 * 86_400),
        Timestamp {
            seconds: 0,
            nanos: -5,
        },
    ] {
        let e = client
            .subscribe(subscribe_request(&ada.id, "basic", Some(at)))
            .await
            .unwrap_err();
        assert_bad_fields(&e, &["effective_at"]);
    }
    let e = client
        .subscribe(subscribe_request("42", "basic", None))
        .await
        .unwrap_err();
    assert_bad_fields(&e, &["user_id"]);

    let unknown = uuid::Uuid::new_v4().to_string();
    let e = client
        .subscribe(subscribe_request(&unknown, "basic", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("user"), "{e:?}");
    let e = client
        .subscribe(subscribe_request(&ada.id, "gold", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("plan"), "{e:?}");

    for id in ["", "nope"] {
        let e = get_subscription(&mut client, id).await.unwrap_err();
        assert_bad_fields(&e, &["user_id"]);
    }
    let e = get_subscription(&mut client, &unknown).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("not found"), "{e:?}");

    // Only something scheduled: nothing in force now is still NOT_FOUND.
    subscribe(&mut client, &ada.id, "plus", Some(timestamp(86_400))).await;
    let e = get_subscription(&mut client, &ada.id).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no subscription"), "{e:?}");

    // Nothing was written by the failed calls.
    let topics: Vec<String> = service.outbox().await.into_iter().map(|r| r.0).collect();
    assert_eq!(topics, ["user.created", "subscription.changed"]);
}

#[tokio::test]
async fn concurrent_subscribes_of_one_user_take_turns() {
    let service = User::start().await;
    let mut client = service.client();
    let ada = create(&mut client, "+4915112345678").await;

    // Many plan changes for the same instant at once: without the row lock
    // they would collide on (user_id, started_at); with it, each replaces
    // the one before.
    let at = timestamp(3600);
    let plans = ["basic", "plus", "max"];
    let calls = (0..12).map(|i| {
        let mut client = service.client();
        let user = ada.id.clone();
        async move {
            client
                .subscribe(subscribe_request(&user, plans[i % 3], Some(at)))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    for r in &results {
        assert!(r.is_ok(), "{results:?}");
    }
    let db = service.db.connect().await.unwrap();
    let rows = db
        .query(
            "SELECT plan_id FROM subscriptions WHERE user_id = $1",
            &[&uuid::Uuid::parse_str(&ada.id).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let last: String = rows[0].get(0);
    let events: Vec<pb::SubscriptionChangedEvent> =
        service.payloads("subscription.changed", &ada.id).await;
    assert_eq!(
        events
            .last()
            .unwrap()
            .subscription
            .as_ref()
            .unwrap()
            .plan_id,
        last,
        "the last event announces what is stored"
    );
}
