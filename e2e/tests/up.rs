//! The mesh as `trellis up` runs it, from the repository's own
//! trellis.toml: the real `trellis` binary starts every process (the
//! Python profile service included), supervises them, and stops them on
//! Ctrl-C. Addresses are whatever ports are free (`--any-ports`), the
//! databases are made for this test on the test server.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::up::{Databases, Up, alive, signal};
use common::*;
use trellis::pb::telco::usage::v1 as usage;
use trellis::pb::telco::user::v1 as user;
use trellis_test_support::{OtlpReceiver, repo_root, server_url};

use usage::usage_service_client::UsageServiceClient;
use user::user_service_client::UserServiceClient;

/// `trellis up` on the repository's trellis.toml, with the databases on
/// the test server (dropped by [`Databases`]), exporting traces to
/// `collector`.
fn start(state: &Path, collector: &str) -> Up {
    Up::start(
        &repo_root().join("trellis.toml"),
        state,
        &["--skip-build", "rust", "--traces", collector],
        &[("DATABASE_URL", server_url().unwrap())],
        Duration::from_secs(240),
    )
}

async fn ready(admin: SocketAddr) -> bool {
    trellis::up::http_get(admin, "/ready")
        .await
        .is_some_and(|(code, _)| code == 200)
}

/// The whole story a new user goes through, on one mesh (it takes a while
/// to start): status, the billing system and the Python service through
/// the edge, a usage instance SIGKILLed under load, then Ctrl-C.
#[tokio::test(flavor = "multi_thread")]
async fn trellis_up_runs_supervises_and_stops_the_mesh() {
    let state = tempfile::tempdir().unwrap();
    let collector = OtlpReceiver::start();
    let mut up = tokio::task::spawn_blocking({
        let state = state.path().to_owned();
        let endpoint = collector.endpoint();
        move || start(&state, &endpoint)
    })
    .await
    .unwrap();
    let _databases = Databases::of(state.path());
    let edge = up.edge;
    for service in [
        "telco.user.v1.UserService",
        "telco.usage.v1.UsageService",
        "telco.settlement.v1.SettlementService",
        "telco.profile.v1.ProfileService",
    ] {
        wait_serving(edge, service, Duration::from_secs(30)).await;
    }

    // `trellis status`: every instance, serving, exit 0.
    let (code, status) = up.status();
    assert_eq!(code, 0, "trellis status:\n{status}");
    for instance in [
        "user",
        "usage-1",
        "usage-2",
        "settlement",
        "archive",
        "echo-1",
        "echo-2",
        "profile",
    ] {
        assert!(
            status.contains(&format!("instance={instance}")),
            "{instance} in trellis status:\n{status}"
        );
    }
    assert!(
        status.contains("8 instances in 6 services, all serving"),
        "{status}"
    );

    // The Python service, through the edge, calls user (Rust) through
    // its own sidecar.
    let created = buf_curl(
        edge,
        "telco.user.v1.UserService/CreateUser",
        r#"{"msisdn":"+4915199900001","name":"Grace Hopper","email":"grace@example.com"}"#,
    )
    .unwrap();
    let user_id = created["user"]["id"].as_str().unwrap().to_owned();
    // `--traces`: the call is one trace from the edge to user's own span.
    eventually(
        "CreateUser's trace at the collector",
        Duration::from_secs(20),
        || {
            let spans = collector.spans();
            async move {
                let edge = spans
                    .iter()
                    .find(|s| s.service == "edge" && s.name.ends_with("/CreateUser"))
                    .ok_or("no edge span yet")?;
                spans
                    .iter()
                    .any(|s| s.service == "user" && s.trace_id == edge.trace_id)
                    .then_some(())
                    .ok_or_else(|| "no span of user's in the edge's trace yet".to_owned())
            }
        },
    )
    .await;
    buf_curl(
        edge,
        "telco.user.v1.UserService/Subscribe",
        &format!(r#"{{"userId":"{user_id}","planId":"plus"}}"#),
    )
    .unwrap();
    let profile = buf_curl(
        edge,
        "telco.profile.v1.ProfileService/GetProfile",
        &format!(r#"{{"userId":"{user_id}"}}"#),
    )
    .unwrap();
    assert_eq!(profile["profile"]["name"], "Grace Hopper", "{profile}");
    assert_eq!(profile["profile"]["plan"]["planId"], "plus", "{profile}");
    let unknown = buf_curl(
        edge,
        "telco.profile.v1.ProfileService/GetProfile",
        r#"{"userId":"00000000-0000-0000-0000-000000000000"}"#,
    )
    .unwrap_err();
    assert!(unknown.contains("not_found"), "{unknown}");

    // Steady load through the edge; usage-1 is SIGKILLed partway. Every
    // call is idempotent (its key), so none may fail, and the instance
    // comes back by itself.
    let killed = up.pid("usage-1").expect("usage-1 runs");
    let failures = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let load = Duration::from_secs(8);
    let mut workers = Vec::new();
    for w in 0..4 {
        let (failures, done, user_id) = (failures.clone(), done.clone(), user_id.clone());
        workers.push(tokio::spawn(async move {
            let mut client = UsageServiceClient::new(channel(edge));
            let mut i = 0;
            while started.elapsed() < load {
                i += 1;
                let request = usage::RecordUsageRequest {
                    user_id: user_id.clone(),
                    r#type: usage::UsageType::Sms as i32,
                    quantity: 1,
                    occurred_at: Some(timestamp(time::OffsetDateTime::now_utc())),
                    idempotency_key: format!("load-{w}-{i}"),
                };
                let mut request = tonic::Request::new(request);
                request.set_timeout(Duration::from_secs(5));
                match client.record_usage(request).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => failures.lock().unwrap().push(format!("{status:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(killed, "KILL");
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let done = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} calls failed after usage-1 was killed: {:?}",
        failures.len(),
        failures.len() + done,
        &failures[..failures.len().min(5)]
    );
    assert!(done > 20, "only {done} calls in {load:?}");
    let admin = up.admin("usage-1");
    eventually(
        "usage-1 restarted and ready",
        Duration::from_secs(60),
        || {
            let now = up.pid("usage-1");
            async move {
                match now {
                    Some(pid) if pid != killed && ready(admin).await => Ok(()),
                    other => Err(format!("pid {other:?}, ready {}", ready(admin).await)),
                }
            }
        },
    )
    .await;
    assert!(
        up.output()
            .contains("usage-1 was killed by SIGKILL; restarting"),
        "the restart is reported:\n{}",
        up.output()
    );
    let mut client = UserServiceClient::new(channel(edge));
    let got = client
        .get_user(user::GetUserRequest {
            user_id: user_id.clone(),
        })
        .await;
    assert!(got.is_ok(), "the rest kept serving: {got:?}");

    // Ctrl-C: everything drains and stops; nothing is left running.
    let pids = up.pids();
    assert!(pids.len() >= 18, "every process has a pid file: {pids:?}");
    let exit = up.interrupt(Duration::from_secs(90));
    assert!(exit.success(), "trellis up exit {exit:?}:\n{}", up.output());
    std::thread::sleep(Duration::from_millis(200));
    let left: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
    assert!(left.is_empty(), "left running: {left:?}\n{}", up.output());
    assert!(
        std::net::TcpStream::connect_timeout(&edge, Duration::from_millis(300)).is_err(),
        "the edge still listens"
    );
    assert!(up.output().contains("stopped; nothing is left running"));
    assert!(
        !up.output().contains("grace period over"),
        "every process drained within its grace period:\n{}",
        up.output()
    );

    // A second run in the same state directory starts cleanly, with the
    // data of the first.
    drop(up);
    let mut again = tokio::task::spawn_blocking({
        let state = state.path().to_owned();
        let endpoint = collector.endpoint();
        move || start(&state, &endpoint)
    })
    .await
    .unwrap();
    wait_serving(
        again.edge,
        "telco.profile.v1.ProfileService",
        Duration::from_secs(30),
    )
    .await;
    let profile = buf_curl(
        again.edge,
        "telco.profile.v1.ProfileService/GetProfile",
        &format!(r#"{{"userId":"{user_id}"}}"#),
    )
    .unwrap();
    assert_eq!(profile["profile"]["plan"]["planId"], "plus", "{profile}");
    let exit = again.interrupt(Duration::from_secs(90));
    assert!(
        exit.success(),
        "second run exit {exit:?}:\n{}",
        again.output()
    );
}
