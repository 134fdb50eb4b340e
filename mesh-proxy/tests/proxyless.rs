//! Proxyless gRPC: a Python grpcio client with no sidecar takes its
//! endpoints, routes and mTLS settings from the registry over xDS (ADS) and
//! calls echo instances through their sidecars' inbound ports, as a mesh
//! identity of its own.
//!
//! The client (tests/python/xds_client.py) is grpcio from PyPI and nothing
//! of Trellis but the stubs generated from proto/ and the bootstrap file
//! `trellis certs --xds-bootstrap` writes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::Code;
use trellis::pb::trellis::echo::v1 as echo;
use trellis::pb::trellis::registry::v1 as reg;
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, TestMesh, sibling_binary, spawn_echo, spawn_proxy,
};

use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");

/// Retries on UNAVAILABLE for every method of echo's that is safe to
/// repeat: the route does not say `idempotent`, Echo's contract does
/// (NO_SIDE_EFFECTS), and xDS hands the client a retry policy for it.
/// The caller limit reaches the client as circuit breaking, which it
/// must accept (no NACK).
const ECHO_TOML: &str = r#"
caller_limit = { max_concurrent = 64, max_queued = 0 }

[[routes]]
method = "trellis.echo.v1.EchoService/*"
timeout = "5s"

[routes.retry]
max_attempts = 3
retryable_status_codes = ["UNAVAILABLE"]
initial_backoff = "10ms"
max_backoff = "50ms"
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Python stubs for echo, generated from proto/ as a user would.
fn python_stubs() -> tempfile::TempDir {
    let generated = tempfile::tempdir().unwrap();
    let protoc = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root().join("proto"))
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .arg(root().join("proto/trellis/echo/v1/echo.proto"))
        .output()
        .expect("python3 runs; run the tests through scripts/test, which installs grpcio-tools");
    assert!(
        protoc.status.success(),
        "grpc_tools.protoc failed (run the tests through scripts/test): {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    generated
}

/// One echo instance behind its sidecar.
struct Instance {
    echo: RunningEcho,
    proxy: RunningProxy,
}

fn instance(mesh: &TestMesh, service: &str, name: &str) -> Instance {
    let echo = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[]);
    let identity = mesh.identity(service);
    // The identity names the mesh service the sidecar registers.
    let options = ProxyOptions::new(&identity, Some(echo.addr), Some(mesh.registry.addr)).args(&[
        "--drain-delay",
        "200ms",
        "--lease-ttl",
        "2s",
    ]);
    let proxy = spawn_proxy(&PathBuf::from(PROXY), name, options);
    Instance { echo, proxy }
}

async fn direct(instance: &Instance) -> EchoServiceClient<tonic::transport::Channel> {
    EchoServiceClient::connect(format!("http://{}", instance.echo.addr))
        .await
        .expect("echo answers directly")
}

async fn inject(instance: &Instance, code: Code, ratio: f64) {
    direct(instance)
        .await
        .inject(echo::InjectRequest {
            delay: Some(Duration::ZERO.try_into().unwrap()),
            fail_code: code as i32,
            fail_ratio: ratio,
        })
        .await
        .expect("Inject");
}

async fn calls_seen(instance: &Instance) -> u64 {
    direct(instance)
        .await
        .get_stats(echo::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
        .calls
}

/// The Python client, driven line by line.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn start(stubs: &Path, bootstrap: &Path, target: &str) -> Self {
        let mut child = Command::new("python3")
            .arg(root().join("mesh-proxy/tests/python/xds_client.py"))
            .arg(target)
            .env("PYTHONPATH", stubs)
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// `n` calls: what answered them, and how.
    fn call(&mut self, n: usize) -> Value {
        self.call_within(n, Duration::from_secs(5))
    }

    /// `n` calls, each with `deadline`.
    fn call_within(&mut self, n: usize, deadline: Duration) -> Value {
        writeln!(self.stdin, "call {n} {}", deadline.as_secs_f64()).expect("the client reads");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the client answers");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Calls in rounds of `n` until `done` holds of a round (up to 20 s).
    fn call_until(&mut self, n: usize, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let round = self.call(n);
            if done(&round) {
                return round;
            }
            assert!(
                Instant::now() < deadline,
                "never {what}; last round: {round}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(round: &Value, key: &str, name: &str) -> u64 {
    round[key][name].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_without_a_sidecar_calls_the_mesh_through_xds() {
    let stubs = python_stubs();
    let mesh = TestMesh::start(PROXY, &[("echo.toml", ECHO_TOML)]);
    let mut a = instance(&mesh, "echo", "echo-a");
    let b = instance(&mesh, "echo", "echo-b");
    mesh.wait_serving("echo", 2).await;

    // What a user runs: `trellis certs --workload pyclient --xds-bootstrap`.
    let identity = mesh.identity("pyclient");
    let client_id = mesh.pki.id("pyclient");
    let bootstrap = trellis::certs::write_xds_bootstrap(
        &identity.cert,
        &client_id,
        &mesh.registry.addr.to_string(),
        "",
    )
    .expect("the bootstrap file is written");
    let mut client = Client::start(stubs.path(), &bootstrap, "xds:///echo");

    // Spread over both instances, over mTLS, as the client's identity.
    let round = client.call_until(40, "reached both instances", |r| {
        count(r, "instances", "echo-a") > 0 && count(r, "instances", "echo-b") > 0
    });
    assert_eq!(count(&round, "codes", "OK"), 40, "{round}");
    assert_eq!(
        round["callers"],
        serde_json::json!([client_id.as_str()]),
        "the callee's sidecar saw the client's verified identity"
    );
    // The gRPC service name names the same listener.
    let mut by_grpc_name = Client::start(
        stubs.path(),
        &bootstrap,
        "xds:///trellis.echo.v1.EchoService",
    );
    let round = by_grpc_name.call(10);
    assert_eq!(count(&round, "codes", "OK"), 10, "{round}");
    drop(by_grpc_name);

    // The route's retry policy, for a method its contract marks safe:
    // every call succeeds while one instance fails them all with
    // UNAVAILABLE.
    inject(&a, Code::Unavailable, 1.0).await;
    let round = client.call(40);
    assert_eq!(
        count(&round, "codes", "OK"),
        40,
        "retries hid the failing instance: {round}"
    );
    assert_eq!(count(&round, "instances", "echo-b"), 40, "{round}");
    assert!(calls_seen(&a).await > 0, "echo-a was tried (and failed)");
    inject(&a, Code::Ok, 0.0).await;

    // Set NOT_SERVING in the registry: out of the rotation.
    let instance_id = {
        let resolved = mesh
            .registry_client("observer")
            .resolve(reg::ResolveRequest {
                target: "echo".into(),
            })
            .await
            .unwrap()
            .into_inner();
        resolved
            .instances
            .iter()
            .find(|i| i.address == a.proxy.inbound.to_string())
            .expect("echo-a is registered")
            .instance_id
            .clone()
    };
    mesh.registry_client("echo")
        .set_health(reg::SetHealthRequest {
            instance_id: instance_id.clone(),
            health: reg::ServingStatus::NotServing as i32,
        })
        .await
        .expect("the instance's own identity sets its health");
    client.call_until(20, "left echo-a out once NOT_SERVING", |r| {
        count(r, "instances", "echo-b") == 20
    });
    mesh.registry_client("echo")
        .set_health(reg::SetHealthRequest {
            instance_id,
            health: reg::ServingStatus::Serving as i32,
        })
        .await
        .unwrap();
    client.call_until(40, "took echo-a back once SERVING", |r| {
        count(r, "instances", "echo-a") > 0 && count(r, "codes", "OK") == 40
    });

    // SIGKILL: out of the rotation, every call still answered.
    a.echo.process.kill();
    a.proxy.process.kill();
    client.call_until(20, "left the killed echo-a out", |r| {
        count(r, "instances", "echo-b") == 20
    });
    mesh.wait_serving("echo", 1).await;
    let round = client.call(20);
    assert_eq!(count(&round, "instances", "echo-b"), 20, "{round}");

    // An unknown target: the does-not-exist answer gRPC expects. The
    // registry answers at once without it, but gRPC waits out its 15 s
    // resource timer for a name it never received before failing.
    let mut lost = Client::start(stubs.path(), &bootstrap, "xds:///nosuch");
    let started = Instant::now();
    let round = lost.call_within(1, Duration::from_secs(30));
    assert_eq!(count(&round, "codes", "UNAVAILABLE"), 1, "{round}");
    assert!(
        round["errors"][0]
            .as_str()
            .unwrap_or("")
            .contains("does not exist"),
        "{round}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "an unknown target failed before the call's deadline: {round}"
    );
    drop(lost);
    drop(client);
    drop(b);

    let log = mesh.registry.process.output();
    assert!(
        !log.contains("NACKed"),
        "a client rejected what it was sent:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_another_identity_is_refused() {
    let stubs = python_stubs();
    let mesh = TestMesh::start(PROXY, &[]);
    // The sidecar of another service, registered (with echo's own
    // identity) as an instance of echo: the client expects echo's SPIFFE
    // ID and meets other's.
    let other = instance(&mesh, "other", "other-1");
    mesh.wait_serving("other", 1).await;
    mesh.registry_client("echo")
        .register(reg::RegisterRequest {
            service: "echo".into(),
            address: other.proxy.inbound.to_string(),
            lease_ttl: Some(Duration::from_secs(30).try_into().unwrap()),
            health: reg::ServingStatus::Serving as i32,
            ..Default::default()
        })
        .await
        .expect("echo registers an address");
    mesh.wait_serving("echo", 1).await;

    let identity = mesh.identity("pyclient");
    let bootstrap = trellis::certs::write_xds_bootstrap(
        &identity.cert,
        &mesh.pki.id("pyclient"),
        &mesh.registry.addr.to_string(),
        "",
    )
    .unwrap();
    let mut client = Client::start(stubs.path(), &bootstrap, "xds:///echo");
    let round = client.call(5);
    assert_eq!(count(&round, "codes", "OK"), 0, "{round}");
    assert_eq!(count(&round, "codes", "UNAVAILABLE"), 5, "{round}");
    assert_eq!(calls_seen(&other).await, 0, "nothing reached the impostor");
    let log = mesh.registry.process.output();
    assert!(
        !log.contains("NACKed"),
        "a client rejected what it was sent:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_rides_out_a_registry_restart_and_follows_it_after() {
    let stubs = python_stubs();
    let mut mesh = TestMesh::start(PROXY, &[]);
    let _a = instance(&mesh, "echo", "echo-a");
    mesh.wait_serving("echo", 1).await;
    let identity = mesh.identity("pyclient");
    let bootstrap = trellis::certs::write_xds_bootstrap(
        &identity.cert,
        &mesh.pki.id("pyclient"),
        &mesh.registry.addr.to_string(),
        "",
    )
    .unwrap();
    let mut client = Client::start(stubs.path(), &bootstrap, "xds:///echo");
    client.call_until(10, "reached echo-a", |r| count(r, "codes", "OK") == 10);

    // With the registry gone the client keeps what it was sent.
    mesh.registry.process.terminate();
    mesh.registry.process.wait_exit(Duration::from_secs(5));
    let round = client.call(10);
    assert_eq!(count(&round, "instances", "echo-a"), 10, "{round}");

    // Back where the client expects it (in memory: the sidecars register
    // again), then a new instance: the client's new stream learns of it.
    let addr = mesh.registry.addr;
    mesh.registry = trellis_test_support::spawn_registry_at(
        sibling_binary(PROXY, "trellis-registry").to_str().unwrap(),
        &mesh.identity("registry"),
        mesh.config.path(),
        addr,
    );
    let _b = instance(&mesh, "echo", "echo-b");
    mesh.wait_serving("echo", 2).await;
    client.call_until(20, "followed the restarted registry to echo-b", |r| {
        count(r, "instances", "echo-b") > 0 && count(r, "codes", "OK") == 20
    });
    let log = mesh.registry.process.output();
    assert!(
        !log.contains("NACKed"),
        "a client rejected what it was sent:\n{log}"
    );
}
