//! The billing system end to end: real PostgreSQL, every service as its
//! own process behind its own sidecar, called through the edge by clients
//! we did not write (the Buf CLI) and by generated stubs.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tonic::Code;
use trellis::pb::telco::settlement::v1 as settlement;
use trellis::pb::telco::usage::v1 as usage;
use trellis::pb::telco::user::v1 as user;
use trellis::pb::trellis::events::v1::GetOutboxStatusRequest;
use trellis_test_support::{TestDb, workspace_binary};

use settlement::settlement_service_client::SettlementServiceClient;
use usage::usage_outbox_service_client::UsageOutboxServiceClient;
use usage::usage_service_client::UsageServiceClient;
use user::user_outbox_service_client::UserOutboxServiceClient;
use user::user_service_client::UserServiceClient;

const SERVICES: [&str; 4] = [
    "telco.user.v1.UserService",
    "telco.usage.v1.UsageService",
    "telco.settlement.v1.SettlementService",
    "telco.archive.v1.ArchiveService",
];

fn field<'a>(v: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    path.split('.').fold(v, |v, k| &v[k])
}

fn int(v: &serde_json::Value, path: &str) -> i64 {
    let v = field(v, path);
    // proto3 JSON writes int64 as strings, int32 as numbers; zero is left out.
    v.as_str()
        .map(|s| s.parse().unwrap())
        .or_else(|| v.as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bill_through_the_edge_with_buf_curl_and_json_only() {
    let fx = start_billing(&SERVICES).await;
    let edge = fx.mesh.edge;
    let call = |method: &str, body: String| -> serde_json::Value {
        buf_curl(edge, method, &body).unwrap_or_else(|e| panic!("{method} {body}: {e}"))
    };

    let created = call(
        "telco.user.v1.UserService/CreateUser",
        r#"{"msisdn":"+4915112345678","name":"Ada Lovelace","email":"ada@example.com"}"#.into(),
    );
    let user_id = field(&created, "user.id").as_str().unwrap().to_owned();

    let plans = call("telco.user.v1.UserService/ListPlans", "{}".into());
    let plan_json = field(&plans, "plans")
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "basic")
        .expect("the catalogue has a basic plan")
        .clone();
    let plan = user::Plan {
        id: "basic".into(),
        monthly_fee_cents: int(&plan_json, "monthlyFeeCents"),
        included_data_mb: int(&plan_json, "includedDataMb"),
        included_voice_seconds: int(&plan_json, "includedVoiceSeconds"),
        included_sms: int(&plan_json, "includedSms"),
        extra_data_mb_cents: int(&plan_json, "extraDataMbCents"),
        extra_voice_minute_cents: int(&plan_json, "extraVoiceMinuteCents"),
        extra_sms_cents: int(&plan_json, "extraSmsCents"),
        ..Default::default()
    };
    assert!(plan.monthly_fee_cents > 0, "{plan_json}");

    let sub = call(
        "telco.user.v1.UserService/Subscribe",
        format!(r#"{{"userId":"{user_id}","planId":"basic"}}"#),
    );
    assert_eq!(field(&sub, "subscription.planId"), "basic");

    // Over every allowance, so each line has a charge; voice 61 s over
    // the allowance bills two minutes.
    let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let used = Used {
        data: plan.included_data_mb + 880,
        voice: plan.included_voice_seconds + 61,
        sms: plan.included_sms + 5,
    };
    for (i, (kind, quantity)) in [
        ("USAGE_TYPE_DATA", used.data),
        ("USAGE_TYPE_VOICE", used.voice),
        ("USAGE_TYPE_SMS", used.sms),
    ]
    .into_iter()
    .enumerate()
    {
        let body = format!(
            r#"{{"userId":"{user_id}","type":"{kind}","quantity":"{quantity}","occurredAt":"{}","idempotencyKey":"cdr-{i}"}}"#,
            rfc3339(now)
        );
        let recorded = call("telco.usage.v1.UsageService/RecordUsage", body.clone());
        assert_ne!(field(&recorded, "duplicate"), true, "{recorded}");
        // The same call again is recognised, not recorded twice.
        let again = call("telco.usage.v1.UsageService/RecordUsage", body);
        assert_eq!(field(&again, "duplicate"), true, "{again}");
    }

    let expected = expected_total(&plan, used);
    let over = |u: i64, inc: i64| (u - inc).max(0);
    assert_eq!(
        expected,
        plan.monthly_fee_cents
            + over(used.data, plan.included_data_mb) * plan.extra_data_mb_cents
            + 2 * plan.extra_voice_minute_cents
            + 5 * plan.extra_sms_cents
    );
    let period = period_of(now);
    let bill = eventually("the bill totals the usage", Duration::from_secs(30), || {
        let body = format!(
            r#"{{"userId":"{user_id}","period":{{"year":{},"month":{}}}}}"#,
            period.year, period.month
        );
        async move {
            let bill = buf_curl(edge, "telco.settlement.v1.SettlementService/GetBill", &body)?;
            if int(&bill, "bill.totalCents") == expected {
                Ok(bill)
            } else {
                Err(bill.to_string())
            }
        }
    })
    .await;
    let lines = field(&bill, "bill.lines").as_array().unwrap();
    assert_eq!(lines.len(), 3, "{bill}");
    assert_eq!(lines[0]["type"], "USAGE_TYPE_DATA");
    assert_eq!(int(&lines[0], "usedQuantity"), used.data);
    assert_eq!(int(&lines[0], "billableQuantity"), 880);
    assert_eq!(int(&lines[1], "billableQuantity"), 61);
    assert_eq!(
        int(&lines[1], "amountCents"),
        2 * plan.extra_voice_minute_cents
    );
    assert_eq!(int(&lines[2], "amountCents"), 5 * plan.extra_sms_cents);
    assert_eq!(field(&bill, "bill.planId"), "basic");
    assert_eq!(field(&bill, "bill.currencyCode"), "EUR");

    // Settings are live: a smaller page size in usage's config file is
    // in force within seconds, with no restart.
    let list = format!(r#"{{"userId":"{user_id}","limit":3}}"#);
    let listed =
        buf_curl(edge, "telco.usage.v1.UsageService/ListUsage", &list).expect("3 is within 500");
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    let usage_toml = fx.mesh.config_dir.path().join("usage.toml");
    let text = std::fs::read_to_string(&usage_toml).unwrap();
    let tmp = usage_toml.with_extension("tmp");
    std::fs::write(
        &tmp,
        text.replace("max_page_size = 500", "max_page_size = 2"),
    )
    .unwrap();
    std::fs::rename(&tmp, &usage_toml).unwrap();
    eventually(
        "max_page_size = 2 in force",
        Duration::from_secs(15),
        || {
            let list = list.clone();
            async move {
                // Twice: the edge takes turns between the two instances.
                for _ in 0..2 {
                    match buf_curl(edge, "telco.usage.v1.UsageService/ListUsage", &list) {
                        Err(e) if e.contains("invalid_argument") && e.contains("limit") => {}
                        other => return Err(format!("{other:?}")),
                    }
                }
                Ok(())
            }
        },
    )
    .await;

    // Bad input is refused with the field named, through the edge.
    let err = buf_curl(
        edge,
        "telco.usage.v1.UsageService/RecordUsage",
        &format!(r#"{{"userId":"{user_id}","type":"USAGE_TYPE_DATA","quantity":"-5","idempotencyKey":"x"}}"#),
    )
    .unwrap_err();
    assert!(
        err.contains("invalid_argument") && err.contains("quantity"),
        "{err}"
    );
    let err = buf_curl(
        edge,
        "telco.user.v1.UserService/CreateUser",
        r#"{"msisdn":"+4915112345678","name":"Someone Else","email":"else@example.com"}"#,
    )
    .unwrap_err();
    assert!(err.contains("already_exists"), "{err}");
    // Events are delivered by producers only; the edge may not.
    let err = buf_curl(
        edge,
        "telco.settlement.v1.SettlementEventsService/Deliver",
        r#"{"event":{"id":"6f1c1c1e-3a4b-4c5d-8e9f-000000000001","topic":"usage.recorded","key":"k","source":"usage"}}"#,
    )
    .unwrap_err();
    assert!(err.contains("permission_denied"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_client_with_nothing_but_reflection_gets_the_right_bill() {
    let fx = start_billing(&SERVICES).await;
    let python = trellis_test_support::repo_root().join("target/pytools/bin/python");
    let script = trellis_test_support::repo_root().join("e2e/tests/python/billing_client.py");
    let edge = fx.mesh.edge.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(edge)
            .arg("+4930123456789")
            .output()
            .expect("python from target/pytools (scripts/test installs it)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        int(&answer, "bill.totalCents"),
        answer["expected"].as_i64().unwrap(),
        "{answer}"
    );
    assert_eq!(field(&answer, "bill.planId"), "basic");
}

/// What one sender saw.
#[derive(Default)]
struct Sent {
    recorded: usize,
    duplicates: usize,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_records_reconcile_across_two_usage_instances_and_a_settlement_crash() {
    let mut fx = start_billing(&SERVICES).await;
    let edge = fx.mesh.edge;
    let mut users_api = UserServiceClient::new(channel(edge));
    let plans = users_api
        .list_plans(user::ListPlansRequest {})
        .await
        .unwrap()
        .into_inner()
        .plans;
    let mut users: Vec<(String, user::Plan)> = Vec::new();
    for i in 0..10 {
        let created = users_api
            .create_user(user::CreateUserRequest {
                msisdn: format!("+44770090{i:04}"),
                name: format!("Subscriber {i}"),
                email: format!("s{i}@example.com"),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        let plan = plans[i % plans.len()].clone();
        users_api
            .subscribe(user::SubscribeRequest {
                user_id: created.id.clone(),
                plan_id: plan.id.clone(),
                effective_at: None,
            })
            .await
            .unwrap();
        users.push((created.id, plan));
    }
    let users = Arc::new(users);

    const RECORDS: usize = 1000;
    const SENDERS: usize = 8;
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(30);
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let users = users.clone();
        let acknowledged = acknowledged.clone();
        senders.push(tokio::spawn(async move {
            // Each sender is its own client with its own connection.
            let mut client = UsageServiceClient::new(channel(edge));
            let mut sent = Sent::default();
            let mine: Vec<usize> = (s..RECORDS).step_by(SENDERS).collect();
            // One record in ten is sent a second time, later.
            let again: Vec<usize> = mine.iter().copied().filter(|i| i % 10 == 3).collect();
            for (round, list) in [mine, again].into_iter().enumerate() {
                for i in list {
                    let (user_id, _) = &users[i % users.len()];
                    let request = usage::RecordUsageRequest {
                        user_id: user_id.clone(),
                        r#type: (i % 3 + 1) as i32,
                        quantity: 1 + (i as i64 * 37) % 700,
                        occurred_at: Some(timestamp(now + time::Duration::milliseconds(i as i64))),
                        idempotency_key: format!("rec-{i}"),
                    };
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        match client.record_usage(request.clone()).await {
                            Ok(r) => {
                                let r = r.into_inner();
                                if r.duplicate {
                                    sent.duplicates += 1;
                                } else {
                                    sent.recorded += 1;
                                }
                                if round == 1 && !r.duplicate {
                                    sent.failures
                                        .push(format!("rec-{i}: a resend was recorded again"));
                                }
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            // What any client of an idempotent call does.
                            Err(e) if e.code() == Code::Unavailable && attempt < 5 => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => {
                                sent.failures.push(format!("rec-{i}: {e}"));
                                break;
                            }
                        }
                    }
                }
            }
            sent
        }));
    }
    // Settlement crashes in the middle of the traffic and comes back.
    while acknowledged.load(Ordering::Relaxed) < RECORDS / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fx.mesh.settlement.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fx.mesh.settlement.restart();

    let mut total = Sent::default();
    for sender in senders {
        let sent = sender.await.unwrap();
        total.recorded += sent.recorded;
        total.duplicates += sent.duplicates;
        total.failures.extend(sent.failures);
    }
    assert!(
        total.failures.is_empty(),
        "failed calls: {:?}",
        total.failures
    );
    assert_eq!(total.recorded, RECORDS);
    assert_eq!(total.duplicates, RECORDS / 10);

    // Every event delivered to every subscriber, none parked.
    let mut usage_outbox = UsageOutboxServiceClient::new(channel(edge));
    let mut user_outbox = UserOutboxServiceClient::new(channel(edge));
    eventually("the outboxes drain", Duration::from_secs(60), || {
        let mut usage_outbox = usage_outbox.clone();
        let mut user_outbox = user_outbox.clone();
        async move {
            for status in [
                usage_outbox
                    .get_outbox_status(GetOutboxStatusRequest {})
                    .await,
                user_outbox
                    .get_outbox_status(GetOutboxStatusRequest {})
                    .await,
            ] {
                let status = status.map_err(|e| e.to_string())?.into_inner();
                if status
                    .subscribers
                    .iter()
                    .any(|s| s.pending > 0 || s.parked > 0)
                {
                    return Err(format!("{status:?}"));
                }
            }
            Ok(())
        }
    })
    .await;
    let status = usage_outbox
        .get_outbox_status(GetOutboxStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let _ = user_outbox
        .get_outbox_status(GetOutboxStatusRequest {})
        .await;
    println!("usage outbox after the run: {status:?}");

    // Usage's own database is the truth the bills must match.
    let db = connect(&fx.mesh.databases.usage).await;
    let count: i64 = db
        .query_one("SELECT count(*) FROM usage_records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, RECORDS as i64, "each record stored once");
    let rows = db
        .query(
            "SELECT user_id, usage_type::int4, sum(quantity)::int8,
                    EXTRACT(YEAR FROM occurred_at AT TIME ZONE 'UTC')::int4,
                    EXTRACT(MONTH FROM occurred_at AT TIME ZONE 'UTC')::int4
             FROM usage_records GROUP BY 1, 2, 4, 5",
            &[],
        )
        .await
        .unwrap();
    let mut truth: HashMap<(String, i32, i32), Used> = HashMap::new();
    for row in rows {
        let used = truth
            .entry((row.get(0), row.get(3), row.get(4)))
            .or_default();
        let sum: i64 = row.get(2);
        match row.get::<_, i32>(1) {
            1 => used.data += sum,
            2 => used.voice += sum,
            3 => used.sms += sum,
            other => panic!("usage type {other}"),
        }
    }
    let plans: HashMap<&str, &user::Plan> =
        users.iter().map(|(id, plan)| (id.as_str(), plan)).collect();
    let mut bills = SettlementServiceClient::new(channel(edge));
    for ((user_id, year, month), used) in &truth {
        let bill = bills
            .get_bill(settlement::GetBillRequest {
                user_id: user_id.clone(),
                period: Some(settlement::BillingPeriod {
                    year: *year,
                    month: *month,
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .bill
            .unwrap();
        let plan = plans[user_id.as_str()];
        assert_eq!(bill.plan_id, plan.id);
        assert_eq!(
            bill.total_cents,
            expected_total(plan, *used),
            "bill of {user_id} for {year}-{month}: {bill:?}, usage {used:?}"
        );
        let quantities: Vec<i64> = bill.lines.iter().map(|l| l.used_quantity).collect();
        assert_eq!(quantities, [used.data, used.voice, used.sms]);
    }

    // The archive holds each record exactly once, as its check says.
    let out = std::process::Command::new(workspace_binary("trellis-archive"))
        .arg("check")
        .arg("--dir")
        .arg(fx.mesh.archive_dir.path())
        .arg("--database-url")
        .arg(&fx.mesh.databases.usage)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "archive check disagrees:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Disaster recovery: a new usage database, its schema made by usage
    // itself, filled from the archive alone, holds the same records.
    let fresh = TestDb::new().await.unwrap();
    let mut usage = std::process::Command::new(workspace_binary("trellis-usage"));
    usage
        .args([
            "--listen",
            &format!("127.0.0.1:{}", trellis_test_support::free_port()),
        ])
        .args(["--database-url", &fresh.url(), "--no-config"]);
    let mut usage = trellis_test_support::ChildGuard::spawn("usage-restore", usage).unwrap();
    let restored_db = fresh.connect().await.unwrap();
    eventually("usage made its schema", Duration::from_secs(20), || {
        let db = &restored_db;
        async move {
            db.query_one("SELECT count(*) FROM usage_records", &[])
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    usage.kill();
    let out = std::process::Command::new(workspace_binary("trellis-archive"))
        .arg("restore")
        .arg("--dir")
        .arg(fx.mesh.archive_dir.path())
        .arg("--database-url")
        .arg(fresh.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (original, restored) = (usage_rows(&db).await, usage_rows(&restored_db).await);
    assert_eq!(original.len(), RECORDS);
    assert!(
        original == restored,
        "the restored records differ from usage's"
    );
}

/// Every usage record of a usage database, in a comparable form.
async fn usage_rows(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT id, user_id, usage_type, quantity, occurred_at, idempotency_key, recorded_at
         FROM usage_records ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        format!(
            "{:?}",
            (
                r.get::<_, uuid::Uuid>(0),
                r.get::<_, String>(1),
                r.get::<_, i16>(2),
                r.get::<_, i64>(3),
                r.get::<_, time::OffsetDateTime>(4),
                r.get::<_, String>(5),
                r.get::<_, time::OffsetDateTime>(6),
            )
        )
    })
    .collect()
}
