//! The sidecar with real processes on 127.0.0.1: a registry, echo service
//! instances each behind its own sidecar, and a caller's sidecar that the
//! test process (playing the calling service) sends its calls to.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use trellis::identity::{IdentityPaths, Workload};
use trellis::pb::trellis::echo::v1 as echo;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, TestMesh, TestPki, sibling_binary, spawn_echo,
    spawn_proxy, spawn_registry_at,
};

use echo::echo_service_client::EchoServiceClient;
use reg::registry_service_client::RegistryServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

fn echo_bin() -> PathBuf {
    sibling_binary(PROXY, "trellis-echo")
}

/// A registry and a CA; instances and callers are added per test.
struct Mesh(TestMesh);

impl std::ops::Deref for Mesh {
    type Target = TestMesh;
    fn deref(&self) -> &TestMesh {
        &self.0
    }
}

impl std::ops::DerefMut for Mesh {
    fn deref_mut(&mut self) -> &mut TestMesh {
        &mut self.0
    }
}

/// One echo instance and its sidecar.
struct Instance {
    echo: RunningEcho,
    proxy: RunningProxy,
}

impl Mesh {
    fn start(config: &[(&str, &str)]) -> Self {
        Self(TestMesh::start(PROXY, config))
    }

    /// An echo instance named `name` behind a sidecar of mesh service `echo`.
    fn instance(&self, name: &str, sidecar_args: &[&str]) -> Instance {
        self.instance_with(name, &[], sidecar_args)
    }

    /// The same, with flags for the echo service too.
    fn instance_with(&self, name: &str, echo_args: &[&str], sidecar_args: &[&str]) -> Instance {
        let echo = spawn_echo(&echo_bin(), name, echo_args);
        let identity = self.identity("echo");
        let proxy = spawn_proxy(
            &proxy_bin(),
            name,
            ProxyOptions::new(&identity, Some(echo.addr), Some(self.registry.addr))
                .args(&["--drain-delay", "500ms", "--lease-ttl", "2s"])
                .args(sidecar_args),
        );
        Instance { echo, proxy }
    }

    /// A sidecar for a calling service with no server of its own.
    fn caller(&self, service: &str) -> RunningProxy {
        let identity = self.identity(service);
        spawn_proxy(
            &proxy_bin(),
            service,
            ProxyOptions::new(&identity, None, Some(self.registry.addr)),
        )
    }

    fn registry_client(&self) -> RegistryServiceClient<Channel> {
        self.0.registry_client("observer")
    }

    /// Waits until the registry lists `n` serving instances of `echo`.
    async fn wait_serving(&self, n: usize) {
        self.0.wait_serving("echo", n).await;
    }
}

impl Mesh {
    /// Echo instances named `names`, a `frontend` caller's sidecar, and a
    /// client of that sidecar that every instance has answered.
    async fn pool(
        &self,
        names: &[&str],
    ) -> (Vec<Instance>, RunningProxy, EchoServiceClient<Channel>) {
        let instances: Vec<Instance> = names.iter().map(|n| self.instance(n, &[])).collect();
        let caller = self.caller("frontend");
        self.wait_serving(names.len()).await;
        let mut client = client(&caller);
        wait_seen(&mut client, names).await;
        (instances, caller, client)
    }
}

/// A config file for `echo` that balances round robin (the default is
/// peak EWMA).
const ROUND_ROBIN: &str = "[[routes]]\nmethod = \"*\"\nload_balancing = \"round_robin\"\n";

fn client(proxy: &RunningProxy) -> EchoServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .connect_lazy();
    EchoServiceClient::new(channel)
}

fn say(message: &str) -> echo::EchoRequest {
    echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    }
}

/// Calls Echo until every one of `names` has answered (the caller's
/// sidecar has seen them all).
async fn wait_seen(client: &mut EchoServiceClient<Channel>, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < names.len() {
        if let Ok(r) = client.echo(say("warm-up")).await {
            seen.insert(r.into_inner().instance);
        }
        assert!(Instant::now() < deadline, "only {seen:?} answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn calls_cross_two_sidecars_with_the_callers_verified_identity() {
    let mesh = Mesh::start(&[]);
    let (b, caller, mut client) = mesh.pool(&["b1"]).await;

    // Unary, with a spoofed identity header that must be replaced.
    let mut request = tonic::Request::new(say("hello"));
    request.metadata_mut().insert(
        "x-trellis-caller",
        "spiffe://trellis.local/ns/default/sa/admin"
            .parse()
            .unwrap(),
    );
    let response = client.echo(request).await.unwrap().into_inner();
    assert_eq!(response.message, "hello");
    assert_eq!(response.instance, "b1");
    assert_eq!(
        response.caller, "spiffe://trellis.local/ns/default/sa/frontend",
        "the callee sees the caller's certificate identity, not the spoofed header"
    );
    assert_eq!(
        response.headers.get("x-trellis-caller").map(String::as_str),
        Some("spiffe://trellis.local/ns/default/sa/frontend")
    );

    // A large unary message (3 MiB) both ways.
    let big = vec![7u8; 3 * 1024 * 1024];
    let response = client
        .echo(echo::EchoRequest {
            message: "big".into(),
            payload: big.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.payload.len(), big.len());

    // Server streaming: 20 messages of 256 KiB, flow control end to end.
    let mut stream = client
        .count(echo::CountRequest {
            count: 20,
            payload_size: 256 * 1024,
            interval: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.payload.len(), 256 * 1024);
        indexes.push(m.index);
    }
    assert_eq!(indexes, (0..20).collect::<Vec<_>>());

    // Client streaming: 50 chunks of 64 KiB.
    let chunks = (0..50).map(|_| echo::CollectRequest {
        payload: vec![1u8; 64 * 1024],
    });
    let collected = client
        .collect(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(collected.messages, 50);
    assert_eq!(collected.bytes, 50 * 64 * 1024);

    // Bidirectional: each message answered before the next is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        tx.send(echo::ChatRequest {
            message: format!("m{i}"),
            payload: Vec::new(),
        })
        .await
        .unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(reply.message, format!("m{i}"));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // Trailers (a status with metadata) come through unchanged.
    let failed = client
        .fail(echo::FailRequest {
            code: Code::NotFound as i32,
            message: "no such thing".into(),
            retry_pushback_ms: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::NotFound);
    assert_eq!(failed.message(), "no such thing");

    // Metrics count the calls on both sides.
    let (status, metrics) = caller.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"direction="outbound",service="trellis.echo.v1.EchoService",method="Echo",grpc_status="OK""#),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_proxy_request_duration_seconds_bucket"));
    let (_, metrics) = b[0].proxy.admin_get("/metrics");
    assert!(
        metrics.contains(r#"direction="inbound",service="trellis.echo.v1.EchoService",method="Fail",grpc_status="NOT_FOUND""#),
        "{metrics}"
    );
    assert_eq!(caller.admin_get("/live").0, 200);
    assert_eq!(caller.admin_get("/ready").0, 200);
}

#[tokio::test]
async fn three_instances_share_calls_round_robin() {
    let mesh = Mesh::start(&[("echo.toml", ROUND_ROBIN)]);
    let (_instances, _caller, mut client) = mesh.pool(&["r1", "r2", "r3"]).await;

    let mut counts: HashMap<String, i64> = HashMap::new();
    for _ in 0..300 {
        let r = client.echo(say("rr")).await.unwrap().into_inner();
        *counts.entry(r.instance).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    let (min, max) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    assert!(max - min <= 1, "counts not within one: {counts:?}");
}

#[tokio::test]
async fn killed_instance_and_stopped_registry_lose_no_idempotent_call() {
    // Round robin, so that calls keep meeting the killed instance until
    // the caller learns it is gone (peak EWMA could have steered clear
    // of it before it died).
    let mut mesh = Mesh::start(&[("echo.toml", ROUND_ROBIN)]);
    let (mut instances, caller, mut client) = mesh.pool(&["k1", "k2", "k3"]).await;

    let mut answered_by: HashMap<String, u32> = HashMap::new();
    for i in 0..300 {
        if i == 100 {
            // Kill an instance outright, service and sidecar: no
            // deregistration, connections reset.
            // The sidecar first, so that no health change warns anyone.
            let mut victim = instances.remove(1);
            victim.proxy.process.kill();
            drop(victim);
        }
        if i == 200 {
            mesh.registry.process.terminate();
            mesh.registry.process.wait_exit(Duration::from_secs(5));
        }
        let r = client
            .echo(say(&format!("call {i}")))
            .await
            .unwrap_or_else(|s| panic!("call {i} failed: {s:?}\n{}", caller.process.output()));
        *answered_by.entry(r.into_inner().instance).or_default() += 1;
    }
    assert!(
        answered_by["k1"] >= 100 && answered_by["k3"] >= 100,
        "{answered_by:?}"
    );
    let (_, metrics) = caller.admin_get("/metrics");
    // Calls that met the dead instance were retried elsewhere.
    assert!(
        metrics.contains(r#"trellis_proxy_retries_total{service="trellis.echo.v1.EchoService"}"#),
        "{metrics}"
    );
    // Keep the registry dead until the end: the calls above after 200
    // went out with no registry at all.
    mesh.registry.process.terminate();
}

#[tokio::test]
async fn a_caller_deadline_ends_the_call_and_cancels_the_callee() {
    let mesh = Mesh::start(&[]);
    let (_b, caller, mut client) = mesh.pool(&["slow"]).await;

    // A raw HTTP/2 client: generated clients enforce `grpc-timeout`
    // themselves, and here the sidecar must be what ends the call.
    let sleep = echo::SleepRequest {
        duration: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
    };
    let started = Instant::now();
    let answer = raw_call(
        caller.outbound,
        "/trellis.echo.v1.EchoService/Sleep",
        &[("grpc-timeout", "200m")],
        grpc_frame(&sleep),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(
        answer.grpc_status(),
        Some(Code::DeadlineExceeded as i32),
        "{answer:?}"
    );
    assert!(took < Duration::from_millis(1000), "took {took:?}");

    // The remaining deadline travels downstream in `grpc-timeout`.
    let mut request = tonic::Request::new(say("how long do I have?"));
    request.set_timeout(Duration::from_secs(5));
    let seen = client.echo(request).await.unwrap().into_inner();
    let passed = seen
        .headers
        .get("grpc-timeout")
        .expect("grpc-timeout reaches the callee");
    let unit = passed.chars().last().unwrap();
    let n: u64 = passed[..passed.len() - 1].parse().unwrap();
    let left = match unit {
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        'S' => Duration::from_secs(n),
        other => panic!("unit {other}"),
    };
    assert!(
        left <= Duration::from_secs(5) && left > Duration::from_secs(4),
        "callee was given {passed}"
    );

    // The sleeping handler was cancelled, not left to run.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let stats = client
            .get_stats(echo::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if stats.cancelled == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "callee saw no cancellation: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_no_call() {
    let mesh = Mesh::start(&[]);
    let first = mesh.instance("v1-a", &[]);
    let _second = mesh.instance("v1-b", &[]);
    let caller = mesh.caller("frontend");
    mesh.wait_serving(2).await;
    let mut warm = client(&caller);
    wait_seen(&mut warm, &["v1-a", "v1-b"]).await;

    // A steady stream of non-idempotent calls: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let stop = stop.clone();
        let sent = sent.clone();
        let mut client = client(&caller);
        tokio::spawn(async move {
            let mut by: HashMap<String, u32> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                match client
                    .record(echo::RecordRequest {
                        message: format!("r{n}"),
                    })
                    .await
                {
                    Ok(r) => *by.entry(r.into_inner().instance).or_default() += 1,
                    Err(status) => return Err(format!("call {n} lost: {status:?}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(by)
        })
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGTERM to the instance (sidecar and service, as an orchestrator does).
    let Instance {
        echo: mut old_echo,
        proxy: mut old_proxy,
    } = first;
    old_proxy.process.terminate();
    old_echo.process.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let s = old_proxy.process.wait_exit(Duration::from_secs(15));
        (s, old_proxy)
    })
    .await
    .unwrap();
    let (exit, old_proxy) = status;
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "sidecar did not exit 0 after SIGTERM: {}",
        old_proxy.process.output()
    );
    let log = old_proxy.process.output();
    assert!(log.contains("deregistered"), "{log}");
    assert!(log.contains("drained cleanly"), "{log}");
    let _ = old_echo.process.wait_exit(Duration::from_secs(5));

    // The replacement comes up while calls continue.
    let replacement = tokio::task::spawn_blocking({
        let pki_dir = mesh.pki.dir().to_owned();
        let registry = mesh.registry.addr;
        move || {
            let echo = spawn_echo(&echo_bin(), "v2-a", &[]);
            let identity = IdentityPaths::in_dir(&pki_dir, "echo");
            let proxy = spawn_proxy(
                &proxy_bin(),
                "v2-a",
                ProxyOptions::new(&identity, Some(echo.addr), Some(registry))
                    .args(&["--drain-delay", "500ms"]),
            );
            Instance { echo, proxy }
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let by = load
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n--- caller ---\n{}", caller.process.output()));
    assert!(sent.load(Ordering::Relaxed) > 30, "too few calls to judge");
    assert!(
        by.get("v2-a").copied().unwrap_or(0) > 0,
        "replacement got no calls: {by:?}"
    );
    drop(replacement);
}

#[tokio::test]
async fn authorization_rules_decide_who_may_call() {
    let mesh = Mesh::start(&[(
        "echo.toml",
        "[[authorization]]\ncallers = [\"frontend\"]\nmethods = [\"trellis.echo.v1.EchoService/*\"]\naction = \"allow\"\n",
    )]);
    let _b = mesh.instance("guarded", &[]);
    let allowed = mesh.caller("frontend");
    let denied = mesh.caller("intruder");
    mesh.wait_serving(1).await;

    let mut ok = client(&allowed);
    wait_seen(&mut ok, &["guarded"]).await;
    let mut bad = client(&denied);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match bad.echo(say("let me in")).await {
            Err(s) if s.code() == Code::PermissionDenied => break s,
            other => {
                assert!(Instant::now() < deadline, "never denied: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        status.message().contains("intruder") && status.message().contains("Echo"),
        "{status:?}"
    );
    ok.echo(say("still fine")).await.unwrap();
}

#[tokio::test]
async fn unknown_and_unserved_services_get_named_errors() {
    let mesh = Mesh::start(&[]);
    let caller = mesh.caller("frontend");
    let b = mesh.instance("gone", &[]);
    mesh.wait_serving(1).await;
    let mut client = client(&caller);
    wait_seen(&mut client, &["gone"]).await;

    // A service nobody serves.
    let channel = Channel::from_shared(format!("http://{}", caller.outbound))
        .unwrap()
        .connect_lazy();
    let mut registry_via_mesh = RegistryServiceClient::new(channel);
    let error = registry_via_mesh
        .list_services(reg::ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unimplemented);
    assert!(
        error
            .message()
            .contains("trellis.registry.v1.RegistryService"),
        "{error:?}"
    );

    // A service whose last instance has gone.
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        match client.echo(say("anyone?")).await {
            Err(s) if s.message().contains("no healthy endpoint") => break s,
            other => {
                assert!(Instant::now() < deadline, "still routed: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(error.code(), Code::Unavailable);
    assert!(error.message().contains(ECHO), "{error:?}");
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_refused() {
    let mesh = Mesh::start(&[]);
    // An impostor sidecar (identity `impostor`) in front of an echo...
    let echo = spawn_echo(&echo_bin(), "impostor", &[]);
    let impostor_id = mesh.identity("impostor");
    let impostor = spawn_proxy(
        &proxy_bin(),
        "impostor",
        ProxyOptions::new(&impostor_id, Some(echo.addr), None)
            .args(&["--static-route", "none.v1.None=http://127.0.0.1:9"]),
    );
    // ...registered under `echo` by someone holding echo's certificate.
    let workload = Workload::load(&mesh.identity("echo")).unwrap();
    let mut as_echo = RegistryServiceClient::new(
        channel(
            &workload,
            mesh.registry.addr,
            ExpectedPeer::Exactly(mesh.pki.id("registry")),
        )
        .unwrap(),
    );
    as_echo
        .register(reg::RegisterRequest {
            service: "echo".into(),
            address: impostor.inbound.to_string(),
            grpc_services: vec![ECHO.into()],
            health: reg::ServingStatus::Serving as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let caller = mesh.caller("frontend");
    let mut client = client(&caller);
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        match client.echo(say("who are you?")).await {
            Err(s) if s.code() == Code::Unavailable && s.message().contains("impostor") => break s,
            Err(s) if s.code() == Code::Unimplemented => {}
            other => panic!("the impostor was reached or the error does not say why: {other:?}"),
        }
        assert!(Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(error.message().contains("echo"), "{error:?}");
    let (_, metrics) = impostor.admin_get("/metrics");
    assert!(
        !metrics.contains(r#"trellis_proxy_requests_total{direction="inbound""#),
        "a call reached the impostor: {metrics}"
    );
}

/// What a raw HTTP/2 call got back.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    headers: http::HeaderMap,
    trailers: Option<http::HeaderMap>,
}

impl RawAnswer {
    fn grpc_status(&self) -> Option<i32> {
        self.headers
            .get("grpc-status")
            .or_else(|| self.trailers.as_ref().and_then(|t| t.get("grpc-status")))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

/// A length-prefixed gRPC message.
fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    framed.into()
}

/// One HTTP/2 POST with `headers` (content type gRPC unless given) and
/// `body`, without any client-side deadline.
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: bytes::Bytes,
) -> Result<RawAnswer, hyper::Error> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("te", "trailers")
        .body(http_body_util::Full::new(body))
        .unwrap();
    if !headers.iter().any(|(k, _)| *k == "content-type") {
        request
            .headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
    }
    for (k, v) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let collected = body.collect().await?;
    Ok(RawAnswer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
    })
}

#[tokio::test]
async fn bad_requests_are_refused_without_affecting_other_callers() {
    use tokio::io::AsyncWriteExt;
    let mesh = Mesh::start(&[]);
    let (instances, caller, mut client) = mesh.pool(&["sturdy"]).await;
    let b = &instances[0];

    // A slow-loris connection that sends half a preface and stalls, on
    // both sides, held open throughout.
    let mut loris_out = tokio::net::TcpStream::connect(caller.outbound)
        .await
        .unwrap();
    loris_out.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut loris_in = tokio::net::TcpStream::connect(b.proxy.inbound)
        .await
        .unwrap();
    loris_in.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

    // Not gRPC: HTTP 415 with a gRPC status saying why.
    let answer = raw_call(
        caller.outbound,
        "/trellis.echo.v1.EchoService/Echo",
        &[("content-type", "application/json")],
        bytes::Bytes::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 415, "{answer:?}");
    assert!(
        answer.headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("application/grpc")
    );

    // Not a gRPC path.
    let answer = raw_call(caller.outbound, "/no-method", &[], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        answer.grpc_status(),
        Some(Code::Unimplemented as i32),
        "{answer:?}"
    );

    // Oversized headers: refused (the connection or the stream), not served.
    let huge = "x".repeat(64 * 1024);
    let answer = raw_call(
        caller.outbound,
        "/trellis.echo.v1.EchoService/Echo",
        &[("x-huge", huge.as_str())],
        grpc_frame(&say("huge")),
    )
    .await;
    assert!(
        answer
            .as_ref()
            .map_or(true, |a| a.status != 200 || a.grpc_status() != Some(0)),
        "an oversized header block was served: {answer:?}"
    );

    // Not HTTP/2 at all: the connection is closed.
    let mut junk = tokio::net::TcpStream::connect(caller.outbound)
        .await
        .unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_soon(&mut junk).await,
        "a non-HTTP/2 connection was kept open"
    );

    // Plaintext to the mTLS side: refused.
    let mut plain = tokio::net::TcpStream::connect(b.proxy.inbound)
        .await
        .unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_soon(&mut plain).await,
        "plaintext to the mTLS port was kept open"
    );

    // Everyone else is unaffected, while the slow connections still hang.
    for i in 0..20 {
        let r = client.echo(say(&format!("after {i}"))).await.unwrap();
        assert_eq!(r.into_inner().instance, "sturdy");
    }
    drop((loris_out, loris_in));
}

#[tokio::test]
async fn a_static_route_makes_a_plain_hop_without_a_registry() {
    let backend = spawn_echo(&echo_bin(), "direct", &[]);
    let pki = TestPki::new("trellis.local");
    let identity = pki.issue("bench", "bench");
    let hop = spawn_proxy(
        &proxy_bin(),
        "hop",
        ProxyOptions::new(&identity, None, None)
            .args(&["--static-route", &format!("*=http://{}", backend.addr)]),
    );
    let mut client = client(&hop);
    let r = client.echo(say("through")).await.unwrap().into_inner();
    assert_eq!(r.instance, "direct");
    assert_eq!(r.caller, "", "no inbound sidecar, so no verified caller");
    let mut stream = client
        .count(echo::CountRequest {
            count: 3,
            payload_size: 10,
            interval: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
}

#[tokio::test]
async fn bad_flags_are_named_and_the_process_exits_2() {
    let pki = TestPki::new("trellis.local");
    let identity = pki.issue("bench", "bench");
    let output = std::process::Command::new(proxy_bin())
        .args(["--cert", identity.cert.to_str().unwrap()])
        .args(["--key", identity.key.to_str().unwrap()])
        .args(["--ca", identity.ca.to_str().unwrap()])
        .args(["--static-route", "a.B=ftp://x", "--lease-ttl", "5s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ftp://x"), "{stderr}");

    let output = std::process::Command::new(proxy_bin())
        .args(["--cert", identity.cert.to_str().unwrap()])
        .args(["--key", identity.key.to_str().unwrap()])
        .args(["--ca", identity.ca.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--registry") && stderr.contains("--static-route"),
        "{stderr}"
    );
}

/// Whether the peer closes `stream` within five seconds (whatever it
/// sends first).
async fn closed_soon(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Calls Echo until `n` calls in a row are answered by `only`.
async fn wait_only(client: &mut EchoServiceClient<Channel>, only: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut streak = 0;
    while streak < n {
        match client.echo(say("who?")).await {
            Ok(r) if r.get_ref().instance == only => streak += 1,
            _ => streak = 0,
        }
        assert!(
            Instant::now() < deadline,
            "calls still reach others than {only}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_service_going_not_serving_leaves_rotation() {
    let mesh = Mesh::start(&[]);
    let _steady = mesh.instance("steady", &[]);
    let _fading = mesh.instance_with("fading", &["--not-serving-after", "3s"], &[]);
    let caller = mesh.caller("frontend");
    mesh.wait_serving(2).await;
    let mut client = client(&caller);
    wait_seen(&mut client, &["steady", "fading"]).await;
    // Its sidecar follows grpc.health.v1 and tells the registry, which
    // tells every caller.
    wait_only(&mut client, "steady", 20).await;
    mesh.wait_serving(1).await;
}

#[tokio::test]
async fn a_restarted_registry_is_resubscribed_and_relearns_every_instance() {
    let mut mesh = Mesh::start(&[]);
    let _first = mesh.instance("before", &[]);
    let caller = mesh.caller("frontend");
    mesh.wait_serving(1).await;
    let mut client = client(&caller);
    wait_seen(&mut client, &["before"]).await;

    // The registry crashes (state is in memory) and comes back on its address.
    let addr = mesh.registry.addr;
    mesh.registry.process.kill();
    for i in 0..20 {
        client
            .echo(say(&format!("registry down {i}")))
            .await
            .expect("calls go on from the last known endpoints");
    }
    let registry_bin = sibling_binary(PROXY, "trellis-registry");
    mesh.registry = spawn_registry_at(
        registry_bin.to_str().unwrap(),
        &mesh.identity("registry"),
        mesh.config.path(),
        addr,
    );
    // The old instance registers again by itself; a new one is learnt by
    // the caller through its resubscribed watch.
    mesh.wait_serving(1).await;
    let _second = mesh.instance("after", &[]);
    mesh.wait_serving(2).await;
    wait_seen(&mut client, &["before", "after"]).await;
}

#[tokio::test]
async fn a_python_service_joins_the_mesh_through_its_sidecar() {
    // Stubs for the Python service, generated from proto/ as its
    // developers would (grpcio-tools, installed by scripts/test).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let generated = tempfile::tempdir().unwrap();
    let protoc = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .arg(root.join("proto/trellis/echo/v1/echo.proto"))
        .output()
        .expect("python3 runs; run the tests through scripts/test, which installs grpcio-tools");
    assert!(
        protoc.status.success(),
        "grpc_tools.protoc failed (run the tests through scripts/test): {}",
        String::from_utf8_lossy(&protoc.stderr)
    );

    let mesh = Mesh::start(&[]);
    let port = trellis_test_support::free_port();
    let app: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(root.join("mesh-proxy/tests/python/echo_server.py"))
        .arg(app.to_string())
        .arg("py-1")
        .env("PYTHONPATH", generated.path());
    let python = trellis_test_support::ChildGuard::spawn("python-echo", cmd).unwrap();
    assert!(
        trellis_test_support::wait_for_tcp(app, Duration::from_secs(20)),
        "the Python service did not start: {}",
        python.output()
    );
    let identity = mesh.identity("echo");
    let _sidecar = spawn_proxy(
        &proxy_bin(),
        "python-echo",
        ProxyOptions::new(&identity, Some(app), Some(mesh.registry.addr)),
    );
    let caller = mesh.caller("frontend");
    mesh.wait_serving(1).await;

    // Registered with its contract, learnt through grpcio's reflection.
    let mut registry = mesh.registry_client();
    let contract = registry
        .get_service_descriptors(reg::GetServiceDescriptorsRequest {
            grpc_service: ECHO.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(contract.service, "echo");
    assert!(!contract.file_descriptors.is_empty());

    let mut client = client(&caller);
    wait_seen(&mut client, &["py-1"]).await;
    let r = client
        .echo(say("hello, python"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.message, "hello, python");
    assert_eq!(r.caller, "spiffe://trellis.local/ns/default/sa/frontend");
}
