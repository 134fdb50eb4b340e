//! What the end-to-end tests share: running clients we did not write,
//! waiting for the mesh, and computing a bill independently of settlement.

#![allow(dead_code)]

pub mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis::pb::telco::settlement::v1 as settlement;
use trellis::pb::telco::user::v1 as user;
use trellis_test_support::{BillingMesh, Databases, TestDb, repo_root};

/// The Buf CLI (`scripts/test` installs it into target/pytools).
pub fn buf() -> PathBuf {
    let local = repo_root().join("target/pytools/bin/buf");
    if local.exists() {
        return local;
    }
    PathBuf::from("buf")
}

/// `buf curl` with JSON in and out against the edge: the parsed answer
/// (an array of the messages of a stream), or the error text.
pub fn buf_curl(edge: SocketAddr, method: &str, body: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(buf())
        .args([
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-d",
            body,
        ])
        .arg(format!("http://{edge}/{method}"))
        .output()
        .map_err(|e| format!("running buf: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // A stream prints one JSON document per message: those come back as
    // an array.
    let mut docs = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "buf printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
    Ok(if docs.len() == 1 {
        docs.remove(0)
    } else {
        serde_json::Value::Array(docs)
    })
}

/// A lazily connecting channel to `addr` (h2c).
pub fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// Waits until the edge reports `service` SERVING (at least one healthy
/// endpoint), or panics after `limit`.
pub async fn wait_serving(edge: SocketAddr, service: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut health = HealthClient::new(channel(edge));
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status
            .as_ref()
            .is_ok_and(|s| *s == ServingStatus::Serving as i32)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} not SERVING through the edge: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a user through the edge and subscribes them to `plan_id` from
/// now; their id.
pub async fn subscribed_user(edge: SocketAddr, msisdn: &str, name: &str, plan_id: &str) -> String {
    let mut users = user::user_service_client::UserServiceClient::new(channel(edge));
    let user_id = users
        .create_user(user::CreateUserRequest {
            msisdn: msisdn.into(),
            name: name.into(),
            email: format!(
                "{}@example.com",
                name.split(' ').next().unwrap_or("someone").to_lowercase()
            ),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    users
        .subscribe(user::SubscribeRequest {
            user_id: user_id.clone(),
            plan_id: plan_id.into(),
            effective_at: None,
        })
        .await
        .unwrap();
    user_id
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: still not so after {limit:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Totals of one user's usage in one month: (data MB, voice seconds, SMS).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub data: i64,
    pub voice: i64,
    pub sms: i64,
}

/// The bill total computed here, independently of settlement: the fee
/// plus usage beyond the allowances at the plan's rates, voice rounded up
/// to whole minutes.
pub fn expected_total(plan: &user::Plan, used: Used) -> i64 {
    let over = |used: i64, included: i64| (used - included).max(0);
    let data = over(used.data, plan.included_data_mb) * plan.extra_data_mb_cents;
    let voice_seconds = over(used.voice, plan.included_voice_seconds);
    let voice = (voice_seconds + 59) / 60 * plan.extra_voice_minute_cents;
    let sms = over(used.sms, plan.included_sms) * plan.extra_sms_cents;
    plan.monthly_fee_cents + data + voice + sms
}

/// The (year, month) of a UTC time.
pub fn period_of(t: time::OffsetDateTime) -> settlement::BillingPeriod {
    let t = t.to_offset(time::UtcOffset::UTC);
    settlement::BillingPeriod {
        year: t.year(),
        month: u8::from(t.month()) as i32,
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

/// RFC 3339 text of a time, as JSON bodies carry it.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A connection to a database by URL.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The billing mesh on three fresh databases, kept for as long as it runs.
pub struct Fixture {
    pub mesh: BillingMesh,
    pub _dbs: [TestDb; 3],
}

/// Starts the billing mesh and waits until the edge serves `services`.
pub async fn start_billing(services: &[&str]) -> Fixture {
    let dbs = [
        TestDb::new().await.unwrap(),
        TestDb::new().await.unwrap(),
        TestDb::new().await.unwrap(),
    ];
    let databases = Databases {
        user: dbs[0].url(),
        usage: dbs[1].url(),
        settlement: dbs[2].url(),
    };
    let mesh = tokio::task::spawn_blocking(move || BillingMesh::start(databases))
        .await
        .unwrap();
    for service in services {
        wait_serving(mesh.edge, service, Duration::from_secs(30)).await;
    }
    Fixture { mesh, _dbs: dbs }
}
