//! The golden metrics (issue 13), with real processes over real mTLS on
//! 127.0.0.1: after a known sequence of calls (calls that succeed, calls
//! that fail with a status no one retries, calls that succeed after one
//! retry) both sidecars' `/metrics` have moved by exactly what those calls
//! account for, by direction, caller, service, method and status; and a
//! refused TLS handshake on the inbound port is counted.
//!
//! Two echo instances, `good` and `bad`, each behind a sidecar of mesh
//! service `echo`; a caller's sidecar of mesh service `frontend`. Round
//! robin gives `bad` first attempts; when it answers UNAVAILABLE the
//! caller's sidecar retries on the other instance (the next attempt avoids
//! the endpoint the last one failed on), so each call `bad` fails takes
//! exactly one retry.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;
use trellis::identity::{IdentityPaths, Workload};
use trellis::pb::trellis::echo::v1 as echo;
use trellis::tls::ExpectedPeer;
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, TestMesh, TestPki, sibling_binary, spawn_echo,
    spawn_proxy,
};

use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";

const REQUESTS: &str = "trellis_proxy_requests_total";
const LATENCY_COUNT: &str = "trellis_proxy_request_duration_seconds_count";
const RETRIES: &str = "trellis_proxy_retries_total";
const TLS_FAILURES: &str = "trellis_proxy_tls_handshake_failures_total";
const OPEN: &str = "trellis_proxy_open_connections";

/// Round robin, so that `bad` keeps getting first attempts; one retry at
/// most, on UNAVAILABLE (the default).
const POLICY: &str = r#"
[[routes]]
method = "*"
load_balancing = "round_robin"

[routes.retry]
max_attempts = 2
"#;

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

/// One echo instance and its sidecar.
struct Instance {
    echo: RunningEcho,
    proxy: RunningProxy,
}

fn instance(mesh: &TestMesh, name: &str) -> Instance {
    let echo = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[]);
    let identity = mesh.identity("echo");
    let proxy = spawn_proxy(
        &proxy_bin(),
        name,
        ProxyOptions::new(&identity, Some(echo.addr), Some(mesh.registry.addr)),
    );
    Instance { echo, proxy }
}

fn client(addr: SocketAddr) -> EchoServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    EchoServiceClient::new(channel)
}

fn say(message: &str) -> tonic::Request<echo::EchoRequest> {
    let mut request = tonic::Request::new(echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    });
    request.set_timeout(Duration::from_secs(5));
    request
}

/// The value of `name` over the series with `labels` (0 when there is
/// none yet).
fn value(proxy: &RunningProxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    proxy.metric(name, labels).unwrap_or(0.0)
}

/// The labels of a call of `method` by `caller` in `direction`, ending in
/// `status` (any status when empty).
fn call<'a>(
    direction: &'a str,
    caller: &'a str,
    method: &'a str,
    status: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut labels = vec![
        ("direction", direction),
        ("caller", caller),
        ("service", ECHO),
        ("method", method),
    ];
    if !status.is_empty() {
        labels.push(("grpc_status", status));
    }
    labels
}

/// Every series the test reads, on the three sidecars, at one moment.
#[derive(Clone, Debug, PartialEq)]
struct Counts {
    /// The caller's outbound calls: Echo OK, Echo UNAVAILABLE, Fail NOT_FOUND.
    out_echo_ok: f64,
    out_echo_unavailable: f64,
    out_fail_not_found: f64,
    /// The caller's latency counts: Echo, Fail.
    out_echo_timed: f64,
    out_fail_timed: f64,
    /// The caller's retries to echo.
    retries: f64,
    /// Each instance's inbound calls from `frontend`: Echo OK, Echo
    /// UNAVAILABLE, Fail NOT_FOUND, and Echo calls timed.
    good: Inbound,
    bad: Inbound,
}

#[derive(Clone, Debug, PartialEq)]
struct Inbound {
    echo_ok: f64,
    echo_unavailable: f64,
    fail_not_found: f64,
    echo_timed: f64,
}

impl Inbound {
    fn read(proxy: &RunningProxy) -> Self {
        Self {
            echo_ok: value(proxy, REQUESTS, &call("inbound", "frontend", "Echo", "OK")),
            echo_unavailable: value(
                proxy,
                REQUESTS,
                &call("inbound", "frontend", "Echo", "UNAVAILABLE"),
            ),
            fail_not_found: value(
                proxy,
                REQUESTS,
                &call("inbound", "frontend", "Fail", "NOT_FOUND"),
            ),
            echo_timed: value(
                proxy,
                LATENCY_COUNT,
                &[
                    ("direction", "inbound"),
                    ("service", ECHO),
                    ("method", "Echo"),
                ],
            ),
        }
    }
}

impl Counts {
    fn read(caller: &RunningProxy, good: &RunningProxy, bad: &RunningProxy) -> Self {
        let timed = |method| {
            value(
                caller,
                LATENCY_COUNT,
                &[
                    ("direction", "outbound"),
                    ("service", ECHO),
                    ("method", method),
                ],
            )
        };
        Self {
            out_echo_ok: value(
                caller,
                REQUESTS,
                &call("outbound", "frontend", "Echo", "OK"),
            ),
            out_echo_unavailable: value(
                caller,
                REQUESTS,
                &call("outbound", "frontend", "Echo", "UNAVAILABLE"),
            ),
            out_fail_not_found: value(
                caller,
                REQUESTS,
                &call("outbound", "frontend", "Fail", "NOT_FOUND"),
            ),
            out_echo_timed: timed("Echo"),
            out_fail_timed: timed("Fail"),
            retries: value(caller, RETRIES, &[("service", ECHO)]),
            good: Inbound::read(good),
            bad: Inbound::read(bad),
        }
    }
}

/// Waits (up to 5 s) until the counts are `want`: a call's end is counted
/// as its last bytes pass, so a scrape may come a moment before it.
fn settle(
    caller: &RunningProxy,
    good: &RunningProxy,
    bad: &RunningProxy,
    want: &Counts,
    after: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = Counts::read(caller, good, bad);
        if now == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {after}:\n  counted  {now:?}\n  expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_sequence_of_calls_moves_the_metrics_by_exactly_that() {
    let mesh = TestMesh::start(PROXY, &[("echo.toml", POLICY)]);
    let good = instance(&mesh, "good");
    let bad = instance(&mesh, "bad");
    let caller = spawn_proxy(
        &proxy_bin(),
        "frontend",
        ProxyOptions::new(&mesh.identity("frontend"), None, Some(mesh.registry.addr)),
    );
    mesh.wait_serving("echo", 2).await;
    let mut client = client(caller.outbound);
    // Until both instances have answered: the caller's sidecar knows them
    // and the retry policy.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        if let Ok(r) = client.echo(say("warm-up")).await {
            seen.insert(r.into_inner().instance);
        }
        assert!(Instant::now() < deadline, "only {seen:?} answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Counts::read(&caller, &good.proxy, &bad.proxy);
    let mut want = start.clone();

    // 1. Five calls that succeed, wherever they land.
    for i in 0..5 {
        client
            .echo(say(&format!("ok {i}")))
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}\n{}", caller.process.output()));
    }
    want.out_echo_ok += 5.0;
    want.out_echo_timed += 5.0;
    let landed = Counts::read(&caller, &good.proxy, &bad.proxy);
    let on_good = landed.good.echo_ok - start.good.echo_ok;
    assert_eq!(
        on_good + landed.bad.echo_ok - start.bad.echo_ok,
        5.0,
        "{landed:?}"
    );
    want.good.echo_ok += on_good;
    want.good.echo_timed += on_good;
    want.bad.echo_ok += 5.0 - on_good;
    want.bad.echo_timed += 5.0 - on_good;
    settle(&caller, &good.proxy, &bad.proxy, &want, "five OK calls");

    // 2. Two calls that fail with NOT_FOUND, which no policy retries.
    for i in 0..2 {
        let status = client
            .fail(echo::FailRequest {
                code: Code::NotFound as i32,
                message: format!("no such thing {i}"),
                ..Default::default()
            })
            .await
            .expect_err("Fail fails");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    want.out_fail_not_found += 2.0;
    want.out_fail_timed += 2.0;
    let landed = Counts::read(&caller, &good.proxy, &bad.proxy);
    let on_good = landed.good.fail_not_found - start.good.fail_not_found;
    want.good.fail_not_found += on_good;
    want.bad.fail_not_found += 2.0 - on_good;
    settle(
        &caller,
        &good.proxy,
        &bad.proxy,
        &want,
        "two NOT_FOUND calls",
    );

    // 3. `bad` answers every call UNAVAILABLE from now on: each call whose
    // first attempt goes there succeeds on `good` after one retry.
    client_of(&bad.echo)
        .inject(echo::InjectRequest {
            delay: Some(Duration::ZERO.try_into().unwrap()),
            fail_code: Code::Unavailable as i32,
            fail_ratio: 1.0,
        })
        .await
        .unwrap();
    const CALLS: f64 = 4.0;
    for i in 0..CALLS as usize {
        let reply = client
            .echo(say(&format!("retried {i}")))
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}\n{}", caller.process.output()));
        assert_eq!(reply.into_inner().instance, "good");
    }
    // The bad instance's sidecar counts each refusal before it answers,
    // and the caller's sidecar a retry before it sends it: both are in
    // by the time the calls are over.
    let retried = value(
        &bad.proxy,
        REQUESTS,
        &call("inbound", "frontend", "Echo", "UNAVAILABLE"),
    ) - start.bad.echo_unavailable;
    assert!(
        (1.0..=CALLS).contains(&retried),
        "round robin gave `bad` {retried} of {CALLS} first attempts"
    );
    want.out_echo_ok += CALLS;
    want.out_echo_timed += CALLS;
    want.retries += retried;
    want.good.echo_ok += CALLS;
    want.good.echo_timed += CALLS;
    want.bad.echo_unavailable += retried;
    want.bad.echo_timed += retried;
    settle(
        &caller,
        &good.proxy,
        &bad.proxy,
        &want,
        &format!("{CALLS} calls, {retried} of them retried"),
    );
    // (`settle` has checked, too, that no UNAVAILABLE reached the caller:
    // the retries hid every one.)

    // The callee's own name is never the inbound caller, and the
    // caller's sidecar counts its calls under its own service alone.
    assert_eq!(
        caller.metric(REQUESTS, &[("direction", "outbound"), ("caller", "echo")]),
        None
    );
    assert_eq!(
        good.proxy
            .metric(REQUESTS, &[("direction", "inbound"), ("caller", "echo")]),
        None
    );

    // Open connections, per direction: the caller's service to its
    // sidecar, the sidecar to both instances, the sidecars from the caller,
    // and this scrape itself on the admin port.
    for (proxy, direction) in [
        (&caller, "outbound"),
        (&caller, "upstream"),
        (&caller, "admin"),
        (&good.proxy, "inbound"),
        (&bad.proxy, "inbound"),
    ] {
        let open = value(proxy, OPEN, &[("direction", direction)]);
        assert!(open >= 1.0, "{direction}: {open} open");
    }
}

/// `addr`'s echo service itself, bypassing the mesh.
fn client_of(echo: &RunningEcho) -> EchoServiceClient<Channel> {
    client(echo.addr)
}

/// Identity files holding `issued`'s certificate, key and CA, with the
/// mesh CA `mesh_ca` added to the bundle: a client that trusts the mesh's
/// sidecars, with a certificate the mesh did not issue.
fn foreign_identity(issued: &IdentityPaths, mesh_ca: &Path, dir: &Path) -> IdentityPaths {
    let paths = IdentityPaths::in_dir(dir, "intruder");
    std::fs::copy(&issued.cert, &paths.cert).unwrap();
    std::fs::copy(&issued.key, &paths.key).unwrap();
    let mut bundle = std::fs::read(&issued.ca).unwrap();
    bundle.extend(std::fs::read(mesh_ca).unwrap());
    std::fs::write(&paths.ca, bundle).unwrap();
    paths
}

/// Waits (up to 5 s) until `proxy`'s inbound TLS failures are `want`.
fn wait_tls_failures(proxy: &RunningProxy, want: f64, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = value(proxy, TLS_FAILURES, &[("direction", "inbound")]);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {after}: {now} inbound TLS handshake failures, expected {want}\n{}",
            proxy.process.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tls_handshake_on_the_inbound_port_is_counted() {
    let mesh = TestMesh::start(PROXY, &[]);
    let callee = instance(&mesh, "callee");
    let caller = spawn_proxy(
        &proxy_bin(),
        "frontend",
        ProxyOptions::new(&mesh.identity("frontend"), None, Some(mesh.registry.addr)),
    );
    mesh.wait_serving("echo", 1).await;
    // A good handshake first: it must not count.
    let mut client = client(caller.outbound);
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.echo(say("through the mesh")).await.is_err() {
        assert!(Instant::now() < deadline, "no call got through the mesh");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = value(&callee.proxy, TLS_FAILURES, &[("direction", "inbound")]);
    assert_eq!(before, 0.0, "a verified peer's handshake is no failure");

    // A client certificate from another CA (same trust domain name).
    let other = TestPki::new("trellis.local");
    let files = tempfile::tempdir().unwrap();
    let intruder = foreign_identity(
        &other.issue("frontend", "frontend"),
        &mesh.pki.ca_path(),
        files.path(),
    );
    let config = Workload::load(&intruder)
        .unwrap()
        .client_config(ExpectedPeer::Exactly(mesh.pki.id("echo")))
        .unwrap();
    let refused = trellis::tls::connect(callee.proxy.inbound, config).await;
    assert!(refused.is_err(), "a certificate from another CA got in");
    wait_tls_failures(&callee.proxy, before + 1.0, "a foreign certificate");

    // No TLS at all: the HTTP/2 preface in the clear, on one connection.
    let mut tcp = tokio::net::TcpStream::connect(callee.proxy.inbound)
        .await
        .unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    // Closed, or a TLS alert (record type 21): no HTTP/2 in the clear.
    assert!(
        answer.first().is_none_or(|&b| b == 21),
        "the mTLS port answered plaintext: {answer:?}"
    );
    wait_tls_failures(&callee.proxy, before + 2.0, "a plaintext connection");
    // The caller's sidecar refused nothing.
    assert_eq!(caller.metric(TLS_FAILURES, &[]), None);
}
