//! The database stops in the middle of traffic (an immediate shutdown, as
//! in a crash) and comes back: calls fail with UNAVAILABLE, never anything
//! else; health turns NOT_SERVING so the sidecars take the instances out
//! of rotation; everything recovers by itself, and no event is lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis::pb::telco::settlement::v1 as settlement;
use trellis::pb::telco::usage::v1 as usage;
use trellis::pb::telco::user::v1 as user;
use trellis::pb::trellis::events::v1::GetOutboxStatusRequest;
use trellis_test_support::{BillingMesh, Databases, PgCluster};

use settlement::settlement_service_client::SettlementServiceClient;
use usage::usage_outbox_service_client::UsageOutboxServiceClient;
use usage::usage_service_client::UsageServiceClient;
use user::user_service_client::UserServiceClient;

const USAGE: &str = "telco.usage.v1.UsageService";

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_fails_calls_cleanly_and_recovers_without_losing_events() {
    let cluster = PgCluster::start().expect("a PostgreSQL cluster of this test's own");
    let databases = Databases {
        user: cluster.url("user_db"),
        usage: cluster.url("usage_db"),
        settlement: cluster.url("settlement_db"),
    };
    let mesh = tokio::task::spawn_blocking(move || BillingMesh::start(databases))
        .await
        .unwrap();
    for service in [
        "telco.user.v1.UserService",
        USAGE,
        "telco.settlement.v1.SettlementService",
    ] {
        wait_serving(mesh.edge, service, Duration::from_secs(30)).await;
    }
    let edge = mesh.edge;
    let user_id = subscribed_user(edge, "+491701234567", "Grace Hopper", "plus").await;
    let mut users = UserServiceClient::new(channel(edge));
    let plan = users
        .get_plan(user::GetPlanRequest {
            plan_id: "plus".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();

    let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(10);
    let record = |i: usize| usage::RecordUsageRequest {
        user_id: user_id.clone(),
        r#type: usage::UsageType::Data as i32,
        quantity: 100 + i as i64,
        occurred_at: Some(timestamp(now)),
        idempotency_key: format!("outage-{i}"),
    };
    let mut client = UsageServiceClient::new(channel(edge));
    let mut recorded = Vec::new();
    for i in 0..20 {
        client.record_usage(record(i)).await.unwrap();
        recorded.push(i);
    }

    // The database goes away mid-traffic.
    cluster.stop();
    let outage = Instant::now();
    let mut codes = Vec::new();
    let mut health = HealthClient::new(channel(edge));
    let mut not_serving = false;
    let mut i = 100;
    while outage.elapsed() < Duration::from_secs(20) && !(not_serving && codes.len() >= 5) {
        match client.record_usage(record(i)).await {
            Ok(_) => recorded.push(i),
            Err(status) => codes.push((status.code(), status.message().to_owned())),
        }
        i += 1;
        let status = health
            .check(HealthCheckRequest {
                service: USAGE.into(),
            })
            .await
            .map(|r| r.into_inner().status);
        not_serving |= status.is_ok_and(|s| s == ServingStatus::NotServing as i32);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_serving, "usage never turned NOT_SERVING at the edge");
    assert!(
        !codes.is_empty(),
        "no call failed while the database was down"
    );
    for (code, message) in &codes {
        assert_eq!(*code, Code::Unavailable, "{message}");
        assert!(
            !message.contains("SQLSTATE") && !message.contains("postgres"),
            "{message}"
        );
    }

    // It comes back; so does everything else, by itself.
    cluster.up().expect("the cluster restarts");
    wait_serving(edge, USAGE, Duration::from_secs(30)).await;
    for j in 0..20 {
        let i = 1000 + j;
        eventually("RecordUsage works again", Duration::from_secs(20), || {
            let mut client = client.clone();
            let request = record(i);
            async move {
                client
                    .record_usage(request)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        recorded.push(i);
    }

    // No event lost: every record acknowledged is on the bill.
    let outbox = UsageOutboxServiceClient::new(channel(edge));
    eventually("usage's outbox drains", Duration::from_secs(60), || {
        let mut outbox = outbox.clone();
        async move {
            let status = outbox
                .get_outbox_status(GetOutboxStatusRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if status
                .subscribers
                .iter()
                .all(|s| s.pending == 0 && s.parked == 0)
            {
                Ok(())
            } else {
                Err(format!("{status:?}"))
            }
        }
    })
    .await;
    let db = connect(&mesh.databases.usage).await;
    let (count, sum): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT count(*), coalesce(sum(quantity), 0)::int8 FROM usage_records",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        count >= recorded.len() as i64,
        "{count} rows, {} acknowledged",
        recorded.len()
    );
    let expected = expected_total(
        &plan,
        Used {
            data: sum,
            ..Default::default()
        },
    );
    let mut bills = SettlementServiceClient::new(channel(edge));
    let period = period_of(now);
    eventually("the bill has every record", Duration::from_secs(30), || {
        let mut bills = bills.clone();
        let request = settlement::GetBillRequest {
            user_id: user_id.clone(),
            period: Some(period),
        };
        async move {
            let bill = bills
                .get_bill(request)
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .bill
                .unwrap();
            (bill.lines[0].used_quantity == sum && bill.total_cents == expected)
                .then_some(())
                .ok_or_else(|| format!("{bill:?}, want {sum} MB and {expected} cents"))
        }
    })
    .await;
    let _ = bills
        .list_bills(settlement::ListBillsRequest { user_id })
        .await;
}
