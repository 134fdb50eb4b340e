//! Usage's admin port (`--admin`) as it runs: `trellis-usage` on its own
//! database, calling a real `trellis-user` through a `mesh-proxy` sidecar
//! that has no route to the event subscribers, so recorded usage stays in
//! the outbox and its delivery lag grows.
//!
//! Needs `trellis-user` and `mesh-proxy` built beside this crate's binary:
//! `cargo build -p trellis-user -p mesh-proxy` (or `cargo test --workspace`).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use prost_types::Timestamp;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis::pb::telco::usage::v1 as pb;
use trellis::pb::telco::usage::v1::usage_service_client::UsageServiceClient;
use trellis::pb::telco::user::v1 as user_pb;
use trellis::pb::telco::user::v1::user_service_client::UserServiceClient;
use trellis_test_support::{
    ChildGuard, ProxyOptions, TestDb, TestPki, free_port, http_get, metric_value, sibling_binary,
    spawn_proxy,
};

const USAGE_BIN: &str = env!("CARGO_BIN_EXE_trellis-usage");
const SETTLEMENT: &str = "telco.settlement.v1.SettlementEventsService";
const ARCHIVE: &str = "telco.archive.v1.ArchiveEventsService";

fn addr() -> SocketAddr {
    ([127, 0, 0, 1], free_port()).into()
}

fn spawn(name: &str, mut cmd: Command, listen: SocketAddr) -> (ChildGuard, Channel) {
    cmd.env("RUST_LOG", "info");
    let guard = ChildGuard::spawn(name, cmd).unwrap_or_else(|e| panic!("{name} starts: {e}"));
    let channel = Channel::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect_lazy();
    (guard, channel)
}

async fn wait_serving(guard: &ChildGuard, channel: &Channel, service: &str) {
    let mut health = HealthClient::new(channel.clone());
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
        guard.output()
    );
}

/// `/metrics` of `admin`, checked to be a whole exposition.
fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// Waits until `check` holds for a scrape of `admin`.
async fn wait_scrape(admin: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = scrape(admin);
        if check(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pool_and_outbox_metrics_follow_recorded_usage() {
    let (user_db, usage_db) = (
        TestDb::new().await.expect("a test database for user"),
        TestDb::new().await.expect("a test database for usage"),
    );
    let user_addr = addr();
    let mut cmd = Command::new(sibling_binary(USAGE_BIN, "trellis-user"));
    cmd.args(["--listen", &user_addr.to_string()])
        .args(["--database-url", &user_db.url()])
        .args(["--outbound", &addr().to_string()])
        .arg("--no-config");
    let (user, user_channel) = spawn("trellis-user", cmd, user_addr);

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

    let listen = addr();
    let admin = addr();
    let subscribers = format!(r#"subscribers={{"usage.recorded":["{SETTLEMENT}","{ARCHIVE}"]}}"#);
    let mut cmd = Command::new(USAGE_BIN);
    cmd.args(["--listen", &listen.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--database-url", &usage_db.url()])
        .args(["--outbound", &proxy.outbound.to_string()])
        .args(["--db-pool-size", "5"])
        .arg("--no-config")
        .args(["--setting", &subscribers]);
    let (usage, usage_channel) = spawn("trellis-usage", cmd, listen);
    wait_serving(&user, &user_channel, "telco.user.v1.UserService").await;
    wait_serving(&usage, &usage_channel, "telco.usage.v1.UsageService").await;

    let (status, body) = http_get(admin, "/live");
    assert_eq!((status, body.as_str()), (200, "live\n"));
    assert_eq!(http_get(admin, "/nothing").0, 404);

    // The pool: its size, and the connections health probes opened.
    let body = scrape(admin);
    assert_eq!(metric_value(&body, "trellis_db_pool_max", &[]), Some(5.0));
    assert_eq!(
        metric_value(&body, "trellis_db_pool_waiting", &[]),
        Some(0.0)
    );
    let open = metric_value(&body, "trellis_db_pool_connections", &[]).unwrap();
    assert!((1.0..=5.0).contains(&open), "{body}");
    // The outbox: readable, and nothing waiting for either subscriber.
    assert_eq!(metric_value(&body, "trellis_outbox_up", &[]), Some(1.0));
    for subscriber in [SETTLEMENT, ARCHIVE] {
        let labels = [("subscriber", subscriber)];
        assert_eq!(
            metric_value(&body, "trellis_outbox_pending", &labels),
            Some(0.0),
            "{body}"
        );
        assert_eq!(
            metric_value(&body, "trellis_outbox_delivery_lag_seconds", &labels),
            Some(0.0),
            "{body}"
        );
    }

    // A user with a plan records usage: one event per subscriber waits.
    let mut users = UserServiceClient::new(user_channel.clone());
    let plan_id = users
        .list_plans(user_pb::ListPlansRequest {})
        .await
        .unwrap()
        .into_inner()
        .plans[0]
        .id
        .clone();
    let user_id = users
        .create_user(user_pb::CreateUserRequest {
            msisdn: "+4915100000777".into(),
            name: "Metrics User".into(),
            email: "metrics@example.com".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    users
        .subscribe(user_pb::SubscribeRequest {
            user_id: user_id.clone(),
            plan_id,
            effective_at: None,
        })
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    UsageServiceClient::new(usage_channel.clone())
        .record_usage(pb::RecordUsageRequest {
            user_id,
            r#type: pb::UsageType::Data.into(),
            quantity: 6000,
            occurred_at: Some(Timestamp {
                seconds: now.unix_timestamp(),
                nanos: now.nanosecond() as i32,
            }),
            idempotency_key: "metrics-1".into(),
        })
        .await
        .unwrap();

    // The subscribers cannot be reached through the sidecar: the event
    // stays pending, it ages, and the failed attempts are counted.
    let pending =
        |body: &str, s: &str| metric_value(body, "trellis_outbox_pending", &[("subscriber", s)]);
    let body = scrape(admin);
    assert_eq!(pending(&body, SETTLEMENT), Some(1.0), "{body}");
    assert_eq!(pending(&body, ARCHIVE), Some(1.0), "{body}");
    let body = wait_scrape(
        admin,
        "a delivery lag over 0.5s and failed attempts",
        |body| {
            let lag = metric_value(
                body,
                "trellis_outbox_delivery_lag_seconds",
                &[("subscriber", SETTLEMENT)],
            );
            let failed = metric_value(
                body,
                "trellis_outbox_failed_attempts_total",
                &[("subscriber", SETTLEMENT)],
            );
            lag.is_some_and(|l| l > 0.5) && failed.is_some_and(|f| f >= 1.0)
        },
    )
    .await;
    assert_eq!(pending(&body, SETTLEMENT), Some(1.0), "{body}");
    assert_eq!(
        metric_value(
            &body,
            "trellis_outbox_delivered_total",
            &[("subscriber", SETTLEMENT)]
        ),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        metric_value(&body, "trellis_outbox_dispatching", &[]),
        Some(1.0)
    );
    drop(proxy);
    drop(usage);
}
