//! Hardening (issue 11), with real processes over real mTLS on 127.0.0.1:
//! identity headers that cannot be forged or leaked, metrics that stay
//! bounded, authorization that fails closed, and identity checks that
//! include the namespace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use trellis::identity::{IdentityPaths, SpiffeId, Workload};
use trellis::pb::trellis::echo::v1 as echo;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, RunningRegistry, TestPki, free_port, sibling_binary,
    spawn_echo, spawn_proxy, spawn_registry, spawn_registry_at,
};

use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

fn echo_bin() -> PathBuf {
    sibling_binary(PROXY, "trellis-echo")
}

/// A registry (with `config` files) and a CA.
struct Mesh {
    pki: TestPki,
    registry: RunningRegistry,
    _config: tempfile::TempDir,
}

/// One echo instance behind its sidecar (mesh service `echo`).
struct Instance {
    _echo: RunningEcho,
    _proxy: RunningProxy,
}

impl Mesh {
    fn start(config: &[(&str, &str)]) -> Self {
        let pki = TestPki::new("trellis.local");
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in config {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let registry = spawn_registry(
            sibling_binary(PROXY, "trellis-registry").to_str().unwrap(),
            &pki.issue("registry", "registry"),
            dir.path(),
        );
        Self {
            pki,
            registry,
            _config: dir,
        }
    }

    fn identity(&self, service: &str) -> IdentityPaths {
        let paths = IdentityPaths::in_dir(self.pki.dir(), service);
        if paths.cert.exists() {
            return paths;
        }
        self.pki.issue(service, service)
    }

    fn instance(&self, name: &str) -> Instance {
        let echo = spawn_echo(&echo_bin(), name, &[]);
        let proxy = spawn_proxy(
            &proxy_bin(),
            name,
            ProxyOptions::new(
                &self.identity("echo"),
                Some(echo.addr),
                Some(self.registry.addr),
            )
            .args(&["--drain-delay", "300ms", "--lease-ttl", "2s"]),
        );
        Instance {
            _echo: echo,
            _proxy: proxy,
        }
    }

    /// An edge (identity `edge`) listening for external clients on the
    /// returned address, with `args`.
    fn edge(&self, args: &[&str]) -> (SocketAddr, RunningProxy) {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proxy = spawn_proxy(
            &proxy_bin(),
            "edge",
            ProxyOptions::new(&self.identity("edge"), None, Some(self.registry.addr))
                .args(&["--edge", &addr.to_string()])
                .args(args),
        );
        (addr, proxy)
    }
}

fn h2c(addr: SocketAddr) -> EchoServiceClient<Channel> {
    EchoServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    )
}

/// A client calling `inbound` directly over mTLS with the identity in
/// `paths`, expecting the peer to be `expected`.
fn mtls(
    paths: &IdentityPaths,
    inbound: SocketAddr,
    expected: SpiffeId,
) -> EchoServiceClient<Channel> {
    let workload = Workload::load(paths).unwrap();
    EchoServiceClient::new(channel(&workload, inbound, ExpectedPeer::Exactly(expected)).unwrap())
}

fn with(headers: &[(&'static str, &str)], message: &str) -> tonic::Request<echo::EchoRequest> {
    let mut request = tonic::Request::new(echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    });
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    request
}

/// Calls Echo until it succeeds (discovery has caught up).
async fn wait_echo(client: &mut EchoServiceClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client.echo(with(&[], "warm-up")).await {
            Ok(_) => return,
            Err(s) => assert!(Instant::now() < deadline, "never routed: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Item 4, verified finding: a local process calling an edge's outbound
// port claimed a principal and echo believed it.
#[tokio::test]
async fn a_principal_claimed_on_an_outbound_port_never_reaches_a_service() {
    let mesh = Mesh::start(&[]);
    let _a = mesh.instance("a1");
    let (_, edge) = mesh.edge(&[]);
    let frontend = spawn_proxy(
        &proxy_bin(),
        "frontend",
        ProxyOptions::new(&mesh.identity("frontend"), None, Some(mesh.registry.addr)),
    );
    for port in [edge.outbound, frontend.outbound] {
        let mut client = h2c(port);
        wait_echo(&mut client).await;
        let r = client
            .echo(with(&[("x-trellis-principal", "api-key:admin")], "forged"))
            .await
            .unwrap()
            .into_inner();
        assert!(
            !r.headers.contains_key("x-trellis-principal"),
            "a claimed principal got through {port}: {:?}",
            r.headers
        );
    }
}

// Item 4, verified finding: credentials the edge checked reached the
// backend's headers.
#[tokio::test]
async fn the_edge_strips_credentials_after_verifying_them() {
    const KEY: &str = "a-test-api-key";
    const SECRET: &[u8] = b"a shared secret long enough for HS256";
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("hs.secret"), SECRET).unwrap();
    let key_hash: String = ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let policy = files.path().join("edge.toml");
    std::fs::write(
        &policy,
        format!(
            "[[api_key]]\nname = \"ci-bot\"\nsha256 = \"{key_hash}\"\n\n\
             [jwt]\nissuer = \"test\"\naudience = \"trellis-edge\"\nhs256_secret_file = \"hs.secret\"\n\n\
             [[route]]\nmatch = \"*\"\nauth = \"required\"\n"
        ),
    )
    .unwrap();
    let mesh = Mesh::start(&[]);
    let _a = mesh.instance("a1");
    let (addr, _edge) = mesh.edge(&["--edge-policy", policy.to_str().unwrap()]);
    let mut client = h2c(addr);
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(s) = client.echo(with(&[("x-api-key", KEY)], "warm-up")).await {
        assert!(Instant::now() < deadline, "never routed: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let r = client
        .echo(with(&[("x-api-key", KEY)], "key"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.headers["x-trellis-principal"], "api-key:ci-bot");
    assert!(
        !r.headers.contains_key("x-api-key"),
        "the raw key reached the service: {:?}",
        r.headers
    );

    #[derive(serde::Serialize)]
    struct Claims {
        sub: &'static str,
        iss: &'static str,
        aud: &'static str,
        exp: u64,
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: "alice",
            iss: "test",
            aud: "trellis-edge",
            exp: jsonwebtoken::get_current_timestamp() + 300,
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    let r = client
        .echo(with(&[("authorization", &bearer)], "jwt"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.headers["x-trellis-principal"], "jwt:alice");
    assert!(
        !r.headers.contains_key("authorization"),
        "the raw token reached the service: {:?}",
        r.headers
    );
}

/// A local app that answers every call UNAVAILABLE while claiming, in the
/// proxy's own header, that it never processed it; counts the calls.
async fn lying_app() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |_request: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "14")
                            .header("grpc-message", "charged, then failed")
                            .header("x-trellis-unprocessed", "true")
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
            });
        }
    });
    (addr, calls)
}

// Item 4: an app must not be able to make its caller's sidecar replay a
// call that is not safe to repeat.
#[tokio::test]
async fn an_app_cannot_make_its_caller_replay_a_call() {
    let pki = TestPki::new("trellis.local");
    let (app, calls) = lying_app().await;
    let server = spawn_proxy(
        &proxy_bin(),
        "liar",
        // A sidecar needs something to route to: a route to nowhere.
        ProxyOptions::new(&pki.issue("liar", "liar"), Some(app), None)
            .args(&["--static-route", "none.v1.None=http://127.0.0.1:9"]),
    );
    let caller = spawn_proxy(
        &proxy_bin(),
        "caller",
        ProxyOptions::new(&pki.issue("caller", "caller"), None, None).args(&[
            "--static-route",
            &format!("trellis.echo.v1.EchoService=https://{}", server.inbound),
        ]),
    );
    let mut client = h2c(caller.outbound);
    let status = client
        .record(echo::RecordRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a non-idempotent call was sent again: {status:?}"
    );
}

/// Sends `n` gRPC POSTs with random-looking paths on one HTTP/2
/// connection to `addr`.
async fn random_paths(addr: SocketAddr, n: usize) {
    paths(addr, n, |i| format!("/x{i}.S/M{i}")).await;
}

/// Sends `n` gRPC POSTs to `path(i)` on one HTTP/2 connection to `addr`.
async fn paths(addr: SocketAddr, n: usize, path: impl Fn(usize) -> String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..n {
        let request = http::Request::post(format!("http://{addr}{}", path(i)))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
                0, 0, 0, 0, 0,
            ])))
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    }
}

// Item 5, verified finding: random paths on the public edge grew /metrics
// without bound.
#[tokio::test]
async fn random_paths_do_not_grow_metrics() {
    let mesh = Mesh::start(&[]);
    let _a = mesh.instance("a1");
    let (addr, edge) = mesh.edge(&[]);
    let mut client = h2c(addr);
    wait_echo(&mut client).await;
    wait_echo(&mut h2c(edge.outbound)).await;
    let (_, before) = edge.admin_get("/metrics");
    random_paths(addr, 300).await;
    random_paths(edge.outbound, 300).await;
    let (status, after) = edge.admin_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        after.len() < before.len() + 16 * 1024,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(
        after.contains(r#"direction="edge",service="unknown",method="unknown",grpc_status="UNIMPLEMENTED",caller="unknown"} 300"#),
        "{after}"
    );
    assert!(
        after.contains(r#"direction="outbound",service="unknown",method="unknown",grpc_status="UNIMPLEMENTED",caller="unknown"} 300"#),
        "{after}"
    );
    // Routable services keep their own labels.
    assert!(
        after.contains(r#"direction="edge",service="trellis.echo.v1.EchoService",method="Echo""#),
        "{after}"
    );

    // Methods a routable service's contract does not define count as
    // unknown too: a caller cannot grow the series through a real service.
    paths(addr, 300, |i| {
        format!("/trellis.echo.v1.EchoService/Nope{i}")
    })
    .await;
    let (_, methods) = edge.admin_get("/metrics");
    assert!(
        methods.len() < after.len() + 4 * 1024,
        "/metrics grew from {} to {} bytes",
        after.len(),
        methods.len()
    );
    assert!(!methods.contains("Nope"), "{methods}");
}

// Item 1: until a sidecar has its configuration, it does not know who may
// call, so it lets no one in.
#[tokio::test]
async fn a_sidecar_without_config_refuses_inbound_calls_and_is_not_ready() {
    let pki = TestPki::new("trellis.local");
    let config = tempfile::tempdir().unwrap();
    let registry_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let echo = spawn_echo(&echo_bin(), "early", &[]);
    let echo_id = pki.issue("echo", "echo");
    let mut options = ProxyOptions::new(&echo_id, Some(echo.addr), Some(registry_addr));
    options.wait_ready = false;
    let sidecar = spawn_proxy(&proxy_bin(), "early", options);
    let mut client = mtls(
        &pki.issue("frontend", "frontend"),
        sidecar.inbound,
        pki.id("echo"),
    );
    // The inbound port serves, but refuses.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match client.echo(with(&[], "too early")).await {
            Err(s) if s.code() == Code::Unavailable && s.message().contains("configuration") => {
                break s;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "an unconfigured sidecar answered: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(status.message().contains("echo"), "{status:?}");
    let (code, body) = sidecar.admin_get("/ready");
    assert_eq!(code, 503, "{body}");

    // Once the registry is there, config arrives and calls get through.
    let _registry = spawn_registry_at(
        sibling_binary(PROXY, "trellis-registry").to_str().unwrap(),
        &pki.issue("registry", "registry"),
        config.path(),
        registry_addr,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.echo(with(&[], "now")).await {
            Ok(_) => break,
            Err(s) => assert!(Instant::now() < deadline, "still refused: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while sidecar.admin_get("/ready").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{}",
            sidecar.admin_get("/ready").1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// Item 3: a bare service name in a rule or in --trusted-edge means that
// service in the proxy's own namespace, not any namesake elsewhere.
#[tokio::test]
async fn a_caller_in_another_namespace_is_not_its_namesake() {
    let other_edge = "spiffe://trellis.local/ns/other/sa/edge";
    let mesh = Mesh::start(&[(
        "echo.toml",
        &format!(
            "[[authorization]]\ncallers = [\"frontend\", \"edge\", \"{other_edge}\"]\n\
             methods = [\"trellis.echo.v1.EchoService/*\"]\naction = \"allow\"\n"
        ),
    )]);
    let a = mesh.instance("a1");
    let elsewhere = |service: &str| {
        mesh.pki.issue_for_id(
            &SpiffeId::for_service("trellis.local", "other", service).unwrap(),
            &format!("other-{service}"),
        )
    };
    let echo_id = mesh.pki.id("echo");

    // The namesakes in our namespace get in, the edge's principal with them.
    let mut ours = mtls(
        &mesh.identity("frontend"),
        a._proxy.inbound,
        echo_id.clone(),
    );
    wait_echo(&mut ours).await;
    let mut our_edge = mtls(&mesh.identity("edge"), a._proxy.inbound, echo_id.clone());
    let r = our_edge
        .echo(with(&[("x-trellis-principal", "api-key:ci-bot")], "edge"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.headers["x-trellis-principal"], "api-key:ci-bot");

    // `frontend` in another namespace is not `frontend`.
    let mut theirs = mtls(&elsewhere("frontend"), a._proxy.inbound, echo_id.clone());
    let denied = theirs.echo(with(&[], "let me in")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // `edge` in another namespace (let in by its full ID) is no trusted
    // edge: the principal it claims is dropped.
    let mut their_edge = mtls(&elsewhere("edge"), a._proxy.inbound, echo_id);
    let r = their_edge
        .echo(with(&[("x-trellis-principal", "api-key:admin")], "edge"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.caller, other_edge);
    assert!(
        !r.headers.contains_key("x-trellis-principal"),
        "an edge of another namespace vouched for a caller: {:?}",
        r.headers
    );
}

/// Writes an edge policy file into a new directory, with `hs.secret`
/// (HS256) beside it; returns the directory and the policy's path.
fn edge_policy(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hs.secret"), HS256_SECRET).unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

const HS256_SECRET: &[u8] = b"a shared secret long enough for HS256";

/// A bearer token for `sub`, signed with [`HS256_SECRET`].
fn bearer(sub: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub,
        "iss": "test",
        "aud": "trellis-edge",
        "exp": jsonwebtoken::get_current_timestamp() + 300,
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HS256_SECRET),
    )
    .unwrap();
    format!("Bearer {token}")
}

/// The most callers the edge tracks per rate-limited route in the test
/// below (the bound under test).
const TRACKED_CALLERS: &str = "2";

// Item 5: the rate limiter keeps one bucket per caller; a flood of new
// callers (here JWT subjects, as anyone holding a signing key or many
// IPs can make) must not grow it without bound. Once it tracks as many
// active callers as it may, new ones share one bucket.
#[tokio::test]
async fn rate_limiter_state_is_bounded() {
    let (_files, policy) = edge_policy(&format!(
        "max_tracked_callers = {TRACKED_CALLERS}\n\
         [jwt]\nissuer = \"test\"\naudience = \"trellis-edge\"\nhs256_secret_file = \"hs.secret\"\n\n\
         [[route]]\nmatch = \"*\"\nauth = \"required\"\nrate_per_second = 0.1\nburst = 1\n"
    ));
    let mesh = Mesh::start(&[]);
    let _a = mesh.instance("a1");
    let (addr, edge) = mesh.edge(&["--edge-policy", &policy]);
    // Routed (the edge's outbound port shares its view, and no limit).
    wait_echo(&mut h2c(edge.outbound)).await;
    let mut client = h2c(addr);
    let call = |sub: &str| with(&[("authorization", &bearer(sub))], sub);
    // Two callers get their own buckets, and spend them.
    for sub in ["alice", "bob"] {
        client.echo(call(sub)).await.unwrap();
    }
    let limited = client.echo(call("alice")).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    // The table is full of active callers: carol and dave share one
    // bucket (a burst of 1) rather than adding two more.
    client.echo(call("carol")).await.unwrap();
    let shared = client.echo(call("dave")).await.unwrap_err();
    assert_eq!(shared.code(), Code::ResourceExhausted, "{shared:?}");
    assert!(
        shared.message().contains("shared by new callers"),
        "{shared:?}"
    );
    assert!(shared.message().contains("retry in"), "{shared:?}");
}

// Item 5: failed authentications are limited per client IP. After ten
// failures (the default) the edge stops checking that IP's credentials,
// even right ones, and says when to come back.
#[tokio::test]
async fn failed_authentications_are_rate_limited_per_ip() {
    const KEY: &str = "the-right-key";
    let key_hash: String = ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (_files, policy) = edge_policy(&format!(
        "[[api_key]]\nname = \"ci-bot\"\nsha256 = \"{key_hash}\"\n\n\
         [[route]]\nmatch = \"*\"\nauth = \"public\"\n"
    ));
    let mesh = Mesh::start(&[]);
    let _a = mesh.instance("a1");
    let (addr, _edge) = mesh.edge(&["--edge-policy", &policy]);
    let mut client = h2c(addr);
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(s) = client.echo(with(&[("x-api-key", KEY)], "warm-up")).await {
        assert!(Instant::now() < deadline, "never routed: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..10 {
        let guess = format!("guess-{i}");
        let s = client
            .echo(with(&[("x-api-key", &guess)], "guess"))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }
    let s = client
        .echo(with(&[("x-api-key", KEY)], "right key, too late"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("too many failed authentications")
            && s.message().contains("retry in "),
        "{s:?}"
    );
    // Calls without credentials (a public route) are not held back.
    client.echo(with(&[], "anonymous")).await.unwrap();
}

/// An h2c "service" that answers every call with a gRPC message whose
/// length prefix claims 4 GiB - 1, sends 16 MiB of it, then stalls.
async fn boastful_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|_request: http::Request<hyper::body::Incoming>| {
                        let mut head = vec![0u8, 0xff, 0xff, 0xff, 0xff];
                        head.resize(1024 * 1024, 0);
                        let chunk = bytes::Bytes::from(vec![0u8; 1024 * 1024]);
                        use futures::StreamExt as _;
                        let frames = futures::stream::iter(
                            std::iter::once(bytes::Bytes::from(head))
                                .chain(std::iter::repeat_n(chunk, 15))
                                .map(|b| {
                                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))
                                }),
                        )
                        .chain(futures::stream::pending());
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(http_body_util::StreamBody::new(frames))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
            });
        }
    });
    addr
}

/// POSTs `body` as JSON to `addr` `path` over HTTP/1.1; the status and
/// body, or `None` if no whole answer came within `within`.
async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
    within: Duration,
) -> Option<(u16, String)> {
    let call = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::post(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(within, call).await.ok()
}

/// The edge's bound on JSON answers in the test below, in bytes.
const JSON_RESPONSE_LIMIT: &str = "1048576";

// Item 5: the JSON transcoder reads a backend's answer up to the edge's
// limit, whatever length the backend's gRPC frame claims; it answers an
// error at once instead of buffering toward 4 GiB.
#[tokio::test]
async fn a_backend_claiming_a_huge_message_cannot_make_the_edge_buffer_it() {
    let mesh = Mesh::start(&[]);
    // A real echo registers the contract; the edge's calls go to the
    // boastful app instead.
    let _a = mesh.instance("a1");
    let app = boastful_app().await;
    let (addr, _edge) = mesh.edge(&[
        "--edge-max-json-response",
        JSON_RESPONSE_LIMIT,
        "--static-route",
        &format!("trellis.echo.v1.EchoService=http://{app}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (status, body) = loop {
        let answer = post_json(
            addr,
            "/trellis.echo.v1.EchoService/Echo",
            r#"{"message": "hi"}"#,
            Duration::from_secs(10),
        )
        .await;
        match answer {
            // The service or its contract is not known yet.
            Some((404 | 501, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(answer) => break answer,
            None => panic!("no answer within 10 s: the edge is buffering the backend's claim"),
        }
    };
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("INTERNAL") && body.contains("larger than the edge's JSON limit of 1048576"),
        "{body}"
    );
}

/// Whether the server at `addr` closes a new connection at once (rather
/// than serving it: an HTTP/2 server speaks first, with SETTINGS).
async fn closed_at_once(addr: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// The cap on connections per port in the test below.
const MAX_CONNECTIONS: usize = 8;

// Item 5: every port holds at most --max-connections; one more is closed
// at once, counted, and those open keep working.
#[tokio::test]
async fn connections_past_the_cap_are_closed_and_open_ones_keep_working() {
    let pki = TestPki::new("trellis.local");
    let echo = spawn_echo(&echo_bin(), "capped", &[]);
    let proxy = spawn_proxy(
        &proxy_bin(),
        "capped",
        ProxyOptions::new(&pki.issue("caller", "caller"), None, None).args(&[
            "--static-route",
            &format!("trellis.echo.v1.EchoService=http://{}", echo.addr),
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
        ]),
    );
    // Each client its own connection, each used.
    let mut clients: Vec<_> = (0..MAX_CONNECTIONS).map(|_| h2c(proxy.outbound)).collect();
    for client in &mut clients {
        client.echo(with(&[], "in")).await.unwrap();
    }
    for _ in 0..3 {
        assert!(
            closed_at_once(proxy.outbound).await,
            "a connection past the cap of {MAX_CONNECTIONS} was served"
        );
    }
    for client in &mut clients {
        client.echo(with(&[], "still in")).await.unwrap();
    }
    let (_, metrics) = proxy.admin_get("/metrics");
    assert!(
        metrics.contains(r#"trellis_proxy_connections_refused_total{direction="outbound"} 3"#),
        "{metrics}"
    );
    // A connection that closes makes room for another.
    clients.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut late = h2c(proxy.outbound);
    while let Err(s) = late.echo(with(&[], "late")).await {
        assert!(Instant::now() < deadline, "no room made: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        late = h2c(proxy.outbound);
    }
}
