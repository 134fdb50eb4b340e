//! `trellis top` against a real mesh: a registry, two echo instances
//! behind real sidecars, and a caller's sidecar that a steady load goes
//! through. What `--once` shows while the load runs (as a table and as
//! JSON), an instance whose sidecar died, and a registry that cannot be
//! reached.
//!
//! Needs the workspace's binaries: `cargo test --workspace`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::{
    ChildGuard, ProxyOptions, TestMesh, free_port, sibling_binary, spawn_echo, spawn_proxy,
};

use echo::echo_service_client::EchoServiceClient;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");
const ECHO: &str = "trellis.echo.v1.EchoService";

fn bin(name: &str) -> PathBuf {
    sibling_binary(TRELLIS, name)
}

/// The `trellis top` command with `extra` flags, as the `cli` identity.
fn top_command(mesh: &TestMesh, registry: &str, extra: &[&str]) -> Command {
    mesh.identity("cli");
    let mut cmd = Command::new(TRELLIS);
    cmd.arg("top")
        .arg("--registry")
        .arg(registry)
        .arg("--certs")
        .arg(mesh.pki.dir())
        .args(extra)
        .env_remove("TRELLIS_CLI_IDENTITY")
        .env_remove("TRELLIS_REGISTRY_IDENTITY");
    cmd
}

/// `trellis top` with `extra` flags, as the `cli` identity of the mesh,
/// asking `registry`: (exit status, stdout, stderr).
async fn top(mesh: &TestMesh, registry: &str, extra: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::from(top_command(mesh, registry, extra))
        .output()
        .await
        .unwrap();
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The table line of gRPC method `method` of the echo service.
fn method_line<'a>(output: &'a str, method: &str) -> &'a str {
    output
        .lines()
        .find(|l| {
            let mut cells = l.split_whitespace();
            cells.next() == Some(ECHO) && cells.next() == Some(method)
        })
        .unwrap_or_else(|| panic!("no line for {ECHO} {method}:\n{output}"))
}

/// The RPS column of a table line.
fn rps(line: &str) -> f64 {
    line.split_whitespace()
        .nth(2)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {line:?}"))
}

/// Calls Echo through `outbound` (a caller's sidecar) every few
/// milliseconds until `stop`, counting the answers.
fn steady_load(
    outbound: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let channel = Channel::from_shared(format!("http://{outbound}"))
            .unwrap()
            .connect_lazy();
        let mut client = EchoServiceClient::new(channel);
        while !stop.load(Ordering::Relaxed) {
            let request = echo::EchoRequest {
                message: "load".into(),
                payload: Vec::new(),
            };
            if client.echo(request).await.is_ok() {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_shows_rates_while_a_load_runs_and_names_unreadable_instances() {
    let mesh = TestMesh::start(TRELLIS, &[]);
    let registry = mesh.registry.addr.to_string();
    let (echo_bin, proxy_bin) = (bin("trellis-echo"), bin("mesh-proxy"));
    let echo_a = spawn_echo(&echo_bin, "a", &[]);
    let echo_b = spawn_echo(&echo_bin, "b", &[]);
    let identity = mesh.identity("echo");
    let _proxy_a = spawn_proxy(
        &proxy_bin,
        "a",
        ProxyOptions::new(&identity, Some(echo_a.addr), Some(mesh.registry.addr)),
    );
    // b's registration outlives its sidecar long enough to be seen dead.
    let mut proxy_b = spawn_proxy(
        &proxy_bin,
        "b",
        ProxyOptions::new(&identity, Some(echo_b.addr), Some(mesh.registry.addr))
            .args(&["--lease-ttl", "60s"]),
    );
    let frontend = mesh.identity("frontend");
    let caller = spawn_proxy(
        &proxy_bin,
        "frontend",
        ProxyOptions::new(&frontend, None, Some(mesh.registry.addr)),
    );
    mesh.wait_serving("echo", 2).await;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let load = steady_load(caller.outbound, stop.clone(), answered.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    while answered.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "the load gets no answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Both instances read; the load shows on the Echo method.
    let (code, table, stderr) = top(&mesh, &registry, &["--once", "--interval", "1s"]).await;
    assert_eq!(code, 0, "{table}{stderr}");
    let line = method_line(&table, "Echo");
    assert!(rps(line) > 0.0, "{table}");
    assert!(line.contains(" 100% "), "{table}");
    assert!(line.trim_end().ends_with("2/2"), "{table}");
    assert!(table.contains("2 read of 2 serving instances"), "{table}");
    assert!(!table.contains("unreadable"), "{table}");
    // Only the method called shows.
    assert!(!table.contains(" Sleep "), "{table}");

    // Live, off a terminal: a table per refresh (the first one waiting
    // for a second reading) until Ctrl-C, which exits 0.
    let mut live = ChildGuard::spawn(
        "top-live",
        top_command(&mesh, &registry, &["--interval", "300ms"]),
    )
    .unwrap();
    let first = live
        .wait_for_output("first reading; rates next refresh", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no first reading:\n{}", live.output()));
    assert!(first.contains("2 serving instances"), "{first}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.output().matches("Echo ").count() < 2 {
        assert!(Instant::now() < deadline, "{}", live.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !live.output().contains('\x1b'),
        "no terminal codes into a pipe"
    );
    let interrupted = Command::new("kill")
        .args(["-INT", &live.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let exit = live
        .wait_exit(Duration::from_secs(5))
        .expect("top stops on SIGINT");
    assert_eq!(exit.code(), Some(0), "{}", live.output());

    // The same for a program, narrowed to the mesh service.
    let (code, json, stderr) = top(
        &mesh,
        &registry,
        &[
            "--once",
            "--interval",
            "500ms",
            "--json",
            "--service",
            "echo",
        ],
    )
    .await;
    assert_eq!(code, 0, "{json}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let service = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["grpc_service"] == ECHO)
        .unwrap_or_else(|| panic!("{json:#}"));
    let method = &service["methods"][0];
    assert_eq!(method["method"], "Echo", "{json:#}");
    assert!(method["rps"].as_f64().unwrap() > 0.0, "{json:#}");
    assert_eq!(method["success_rate"], 1.0, "{json:#}");
    assert!(method["p99_seconds"].as_f64().unwrap() > 0.0, "{json:#}");
    assert_eq!(service["instances_reporting"], 2, "{json:#}");
    for instance in json["instances"].as_array().unwrap() {
        assert_eq!(instance["state"], "read", "{json:#}");
        assert!(
            instance["admin"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{json:#}"
        );
    }

    // b's sidecar dies (no deregistration): b is unreadable, not idle,
    // and the rates are a's alone.
    proxy_b.process.kill();
    let b = proxy_b.inbound.to_string();
    let (code, table, stderr) = top(&mesh, &registry, &["--once", "--interval", "1s"]).await;
    assert_eq!(code, 0, "{table}{stderr}");
    let b_line = table
        .lines()
        .find(|l| l.contains(&b))
        .unwrap_or_else(|| panic!("b ({b}) is not named:\n{table}"));
    assert!(b_line.contains("unreadable"), "{table}");
    let line = method_line(&table, "Echo");
    assert!(line.trim_end().ends_with("1/2"), "{table}");
    assert!(rps(line) > 0.0, "{table}");
    assert!(
        table.contains("1 read of 2 serving instances, 1 unreadable"),
        "{table}"
    );

    // A --service that matches nothing says so.
    let (code, _, stderr) = top(&mesh, &registry, &["--once", "--service", "ech"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no registered instance serves \"ech\""),
        "{stderr}"
    );
    assert!(stderr.contains("echo"), "{stderr}");

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
}

#[tokio::test]
async fn an_unreachable_registry_exits_2_with_a_readable_message() {
    let mesh = TestMesh::start(TRELLIS, &[]);
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (code, stdout, stderr) = top(&mesh, &nowhere, &["--once"]).await;
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the registry at {nowhere}")),
        "{stderr}"
    );
    assert!(stderr.contains("trellis up"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}
