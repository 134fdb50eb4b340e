//! The edge with real processes on 127.0.0.1: a registry, echo instances
//! behind sidecars, and `mesh-proxy --edge`, called by clients that are not
//! part of this codebase (the Buf CLI, Python grpcio with reflection, curl)
//! as well as by tonic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use trellis::identity::IdentityPaths;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, RunningRegistry, TestPki, free_port, sibling_binary,
    spawn_echo, spawn_proxy, spawn_registry,
};

use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A registry, a CA, and an edge; echo instances are added per test.
struct Mesh {
    pki: TestPki,
    registry: RunningRegistry,
    _config: tempfile::TempDir,
    edge: SocketAddr,
    edge_proxy: RunningProxy,
}

/// One echo instance and its sidecar.
struct Instance {
    _echo: RunningEcho,
    proxy: RunningProxy,
}

impl Mesh {
    /// A mesh whose edge runs with `edge_args`.
    fn start(edge_args: &[&str]) -> Self {
        let pki = TestPki::new("trellis.local");
        let config = tempfile::tempdir().unwrap();
        let registry = spawn_registry(
            sibling_binary(PROXY, "trellis-registry").to_str().unwrap(),
            &pki.issue("registry", "registry"),
            config.path(),
        );
        let edge = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let identity = pki.issue("edge", "edge");
        let edge_proxy = spawn_proxy(
            &proxy_bin(),
            "edge",
            ProxyOptions::new(&identity, None, Some(registry.addr))
                .args(&["--edge", &edge.to_string()])
                .args(edge_args),
        );
        Self {
            pki,
            registry,
            _config: config,
            edge,
            edge_proxy,
        }
    }

    fn identity(&self, service: &str) -> IdentityPaths {
        let paths = IdentityPaths::in_dir(self.pki.dir(), service);
        if paths.cert.exists() {
            return paths;
        }
        self.pki.issue(service, service)
    }

    /// An echo instance `name` behind a sidecar of mesh service `echo`.
    fn instance(&self, name: &str) -> Instance {
        let echo = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[]);
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
        Instance { _echo: echo, proxy }
    }

    fn url(&self) -> String {
        format!("http://{}", self.edge)
    }

    fn client(&self) -> EchoServiceClient<Channel> {
        EchoServiceClient::new(Channel::from_shared(self.url()).unwrap().connect_lazy())
    }

    fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(Channel::from_shared(self.url()).unwrap().connect_lazy())
    }

    /// Waits until a call through the edge reaches an echo instance.
    async fn wait_routable(&self) {
        let mut client = self.client();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if client.echo(say("warm-up")).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the edge never routed to echo:\n{}",
                self.edge_proxy.process.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `buf curl` against the edge: (success, stdout, stderr).
    fn buf_curl(&self, args: &[&str]) -> (bool, String, String) {
        run(Command::new("buf")
            .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
            .args(args))
    }
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .expect("the client runs (run the tests through scripts/test, which installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn say(message: &str) -> echo::EchoRequest {
    echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    }
}

fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test]
async fn reflection_describes_and_calls_the_mesh_for_clients_without_protos() {
    let mesh = Mesh::start(&[]);
    let _a = mesh.instance("a1");
    mesh.wait_routable().await;

    // buf curl: list (reflection v1), then the methods, both from the edge.
    let (ok, out, err) = mesh.buf_curl(&["--list-services", &mesh.url()]);
    assert!(ok, "{err}");
    let services = lines(&out);
    for s in [
        ECHO,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} not in {services:?}");
    }
    let (ok, out, err) = mesh.buf_curl(&[
        "--reflect-protocol",
        "grpc-v1alpha",
        "--list-methods",
        &mesh.url(),
    ]);
    assert!(ok, "{err}");
    for m in ["Echo", "Count", "Collect", "Chat", "Sleep"] {
        assert!(out.contains(&format!("{ECHO}/{m}")), "{m} not in {out}");
    }

    // A unary and a server-streaming call with JSON bodies, built from
    // what reflection returned.
    let (ok, out, err) = mesh.buf_curl(&[
        "-d",
        r#"{"message":"from buf"}"#,
        &format!("{}/{ECHO}/Echo", mesh.url()),
    ]);
    assert!(ok, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["message"], "from buf");
    assert_eq!(reply["instance"], "a1");
    assert_eq!(reply["caller"], "spiffe://trellis.local/ns/default/sa/edge");
    let (ok, out, err) = mesh.buf_curl(&[
        "-d",
        r#"{"count":3}"#,
        &format!("{}/{ECHO}/Count", mesh.url()),
    ]);
    assert!(ok, "{err}");
    let stream: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stream.len(), 3, "{out}");
    assert_eq!(stream[2]["index"], 2);

    // Python grpcio with grpcio-reflection (v1alpha): list, describe a
    // service and a message from an import, call from JSON.
    let (ok, out, err) = run(Command::new("python3")
        .arg(root().join("mesh-proxy/tests/python/reflect_client.py"))
        .arg(mesh.edge.to_string()));
    assert!(ok, "python reflection client failed: {err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        got["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == ECHO),
        "{got}"
    );
    assert_eq!(got["methods"]["Count"]["server_streaming"], true);
    assert_eq!(
        got["methods"]["Echo"]["input"],
        "trellis.echo.v1.EchoRequest"
    );
    assert_eq!(got["sleep_fields"][0], "google.protobuf.Duration");
    assert_eq!(got["echo"]["message"], "from python");
    assert_eq!(got["count"].as_array().unwrap().len(), 3);

    // A symbol no contract defines: a clear NOT_FOUND, not a broken stream.
    let (ok, _, err) = mesh.buf_curl(&[
        "-d",
        "{}",
        &format!("{}/no.such.v1.Service/Get", mesh.url()),
    ]);
    assert!(!ok);
    assert!(err.contains("no.such.v1.Service"), "{err}");
}

#[tokio::test]
async fn services_appear_and_disappear_in_reflection_and_health() {
    let mesh = Mesh::start(&[]);
    let mut health = mesh.health();
    let edge = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(edge.status(), ServingStatus::Serving);
    let unknown = health
        .check(HealthCheckRequest {
            service: ECHO.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let listed = |mesh: &Mesh| {
        let (ok, out, err) = mesh.buf_curl(&["--list-services", &mesh.url()]);
        assert!(ok, "{err}");
        lines(&out).contains(&ECHO)
    };
    assert!(!listed(&mesh));

    // Started after the edge: listed within a few seconds.
    let instance = mesh.instance("late");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listed(&mesh) {
        assert!(Instant::now() < deadline, "echo never listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: ECHO.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut status = next_status(&mut watch).await;
    while status != ServingStatus::Serving {
        status = next_status(&mut watch).await;
    }

    // Its last instance stops: NOT_SERVING on the watch, gone from list.
    instance.proxy.process.terminate();
    let mut status = next_status(&mut watch).await;
    while status != ServingStatus::NotServing {
        status = next_status(&mut watch).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while listed(&mesh) {
        assert!(Instant::now() < deadline, "echo still listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let check = health
        .check(HealthCheckRequest {
            service: ECHO.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.status(), ServingStatus::NotServing);
}

async fn next_status(watch: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a health change in time")
        .unwrap()
        .unwrap()
        .status()
}

const API_KEY: &str = "key-for-ci-bot-0123456789";
const ISSUER: &str = "https://auth.trellis.test";
const AUDIENCE: &str = "trellis-edge";
const HS_SECRET: &[u8] = b"a shared secret long enough for HS256";

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An RSA key pair made with openssl: (private PEM, public key file).
fn rsa_keys(dir: &Path) -> (Vec<u8>, PathBuf) {
    let private = dir.join("rs.pem");
    let public = dir.join("rs.pub.pem");
    let (ok, _, err) = run(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str().unwrap(),
    ]));
    assert!(ok, "openssl genpkey: {err}");
    let (ok, _, err) = run(Command::new("openssl").args([
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]));
    assert!(ok, "openssl pkey: {err}");
    (std::fs::read(private).unwrap(), public)
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    exp: u64,
}

fn token(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &Claims<'_>,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
}

fn with(header: &'static str, value: &str, message: &str) -> tonic::Request<echo::EchoRequest> {
    let mut request = tonic::Request::new(say(message));
    request
        .metadata_mut()
        .insert(header, value.parse().unwrap());
    request
}

fn count_request(header: Option<(&'static str, &str)>) -> tonic::Request<echo::CountRequest> {
    let mut request = tonic::Request::new(echo::CountRequest {
        count: 2,
        ..Default::default()
    });
    if let Some((name, value)) = header {
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn callers_are_authenticated_and_rate_limited() {
    let keys = tempfile::tempdir().unwrap();
    let (rsa_private, rsa_public) = rsa_keys(keys.path());
    std::fs::write(keys.path().join("hs.secret"), HS_SECRET).unwrap();
    let policy = keys.path().join("edge.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
reflection = "required"
health = "public"

[[api_key]]
name = "ci-bot"
sha256 = "{}"

[jwt]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
hs256_secret_file = "hs.secret"
rs256_public_key_file = "{}"

[[route]]
match = "{ECHO}/Echo"
auth = "public"
rate_per_second = 0.2
burst = 3

[[route]]
match = "{ECHO}"
auth = "required"
"#,
            sha256_hex(API_KEY),
            rsa_public.display()
        ),
    )
    .unwrap();
    let mesh = Mesh::start(&["--edge-policy", policy.to_str().unwrap()]);
    let _a = mesh.instance("a1");
    let mut client = mesh.client();

    // A public method: anyone, but at most a burst of 3 per caller; the
    // fourth is refused while a caller with its own bucket still passes.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(status) = client.echo(with("x-api-key", API_KEY, "warm-up")).await {
        assert!(Instant::now() < deadline, "echo never routable: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        let r = client.echo(say("anonymous")).await;
        assert!(r.is_ok(), "call {i}: {r:?}");
    }
    let limited = client.echo(say("one too many")).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert!(
        limited.message().contains("rate limit"),
        "{}",
        limited.message()
    );

    // The verified caller reaches the service; a claimed one does not.
    let mut forged = with("x-api-key", API_KEY, "who am i");
    forged
        .metadata_mut()
        .insert("x-trellis-principal", "api-key:admin".parse().unwrap());
    let r = client.echo(forged).await.unwrap().into_inner();
    assert_eq!(r.headers["x-trellis-principal"], "api-key:ci-bot");

    // A method that needs credentials.
    let missing = client.count(count_request(None)).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("credentials"),
        "{}",
        missing.message()
    );
    let unknown = client
        .count(count_request(Some(("x-api-key", "not-a-key"))))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(
        unknown.message().contains("unknown API key"),
        "{}",
        unknown.message()
    );
    assert!(
        !unknown.message().contains("not-a-key"),
        "a key is never echoed"
    );
    assert!(
        client
            .count(count_request(Some(("x-api-key", API_KEY))))
            .await
            .is_ok()
    );

    // JWTs: good ones (HS256 and RS256) name their subject; each broken
    // kind is refused with its reason.
    let hs = jsonwebtoken::EncodingKey::from_secret(HS_SECRET);
    let rs = jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_private).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let good = Claims {
        sub: "alice",
        iss: ISSUER,
        aud: AUDIENCE,
        exp: now + 300,
    };
    for (alg, key, who) in [
        (jsonwebtoken::Algorithm::HS256, &hs, "alice"),
        (jsonwebtoken::Algorithm::RS256, &rs, "alice"),
    ] {
        let bearer = format!("Bearer {}", token(alg, key, &good));
        let r = client
            .echo(with("authorization", &bearer, "jwt"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.headers["x-trellis-principal"], format!("jwt:{who}"));
        assert!(
            client
                .count(count_request(Some(("authorization", &bearer))))
                .await
                .is_ok()
        );
    }
    let expired = token(
        jsonwebtoken::Algorithm::HS256,
        &hs,
        &Claims {
            exp: now - 600,
            ..good
        },
    );
    let wrong_issuer = token(
        jsonwebtoken::Algorithm::HS256,
        &hs,
        &Claims {
            iss: "https://elsewhere.test",
            ..good
        },
    );
    let wrong_audience = token(
        jsonwebtoken::Algorithm::HS256,
        &hs,
        &Claims {
            aud: "another-api",
            ..good
        },
    );
    let other_secret = token(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(b"some other secret entirely"),
        &good,
    );
    let mut tampered = token(jsonwebtoken::Algorithm::RS256, &rs, &good);
    // Change the payload (alice → mallory) and keep the signature.
    let parts: Vec<&str> = tampered.split('.').collect();
    let forged_claims =
        serde_json::json!({"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300});
    let payload = base64url(forged_claims.to_string().as_bytes());
    tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
    for (what, token, reason) in [
        ("expired", expired, "expired"),
        ("wrong issuer", wrong_issuer, "issuer"),
        ("wrong audience", wrong_audience, "audience"),
        ("other secret", other_secret, "signature"),
        ("tampered", tampered, "signature"),
        ("garbage", "not.a.jwt".to_owned(), "malformed"),
    ] {
        let status = client
            .count(count_request(Some((
                "authorization",
                &format!("Bearer {token}"),
            ))))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert!(
            status.message().contains(reason),
            "{what}: {}",
            status.message()
        );
    }

    // Reflection behind authentication: refused without, served with
    // (buf curl --reflect-header, as grpcurl -reflect-header).
    let (ok, _, err) = mesh.buf_curl(&["--list-services", &mesh.url()]);
    assert!(!ok);
    assert!(err.contains("not authenticated"), "{err}");
    let (ok, out, err) = mesh.buf_curl(&[
        "--reflect-header",
        &format!("x-api-key: {API_KEY}"),
        "--list-services",
        &mesh.url(),
    ]);
    assert!(ok, "{err}");
    assert!(lines(&out).contains(&ECHO));
    // Health stays public.
    assert!(
        mesh.health()
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_ok()
    );

    // Every call, refused or not, has its access-log line; no secret does.
    let log = mesh.edge_proxy.process.output();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mesh_proxy::access"))
        .collect();
    for want in [
        "caller=api-key:ci-bot",
        "caller=jwt:alice",
        "caller=anonymous",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "method=\"Count\"",
    ] {
        assert!(
            access.iter().any(|l| l.contains(want)),
            "no access line with {want}:\n{log}"
        );
    }
    assert!(!log.contains(API_KEY), "the API key leaked into the log");
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Runs curl: (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let (ok, out, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args));
    assert!(ok, "curl failed: {err}");
    let (body, status) = out.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test]
async fn json_and_grpc_web_callers_get_through_and_bad_input_is_named() {
    let mesh = Mesh::start(&["--edge-max-json-body", "4096"]);
    let _a = mesh.instance("a1");
    mesh.wait_routable().await;
    let url = |method: &str| format!("{}/{ECHO}/{method}", mesh.url());
    let json = ["-H", "content-type: application/json", "-X", "POST"];

    // Unary, then a server stream as newline-delimited JSON.
    let (status, body) = curl(
        &[
            &json[..],
            &["-d", r#"{"message":"over http"}"#, &url("Echo")],
        ]
        .concat(),
    );
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["message"], "over http");
    assert_eq!(reply["instance"], "a1");
    let (status, body) = curl(&[&json[..], &["-d", r#"{"count":3}"#, &url("Count")]].concat());
    assert_eq!(status, 200, "{body}");
    let items: Vec<serde_json::Value> = lines(&body)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 3, "{body}");
    assert_eq!(items[1]["result"]["index"], 1);
    // A status from the service, as JSON with a fitting HTTP status.
    let (status, body) = curl(
        &[
            &json[..],
            &[
                "-d",
                r#"{"code":5,"message":"no such thing"}"#,
                &url("Fail"),
            ],
        ]
        .concat(),
    );
    assert_eq!(status, 404, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["status"], "NOT_FOUND");
    assert_eq!(error["message"], "no such thing");
    // The service's trailers reach a JSON caller as grpc-trailer-*
    // headers (gRPC's own, the status, stay in the body).
    let (status, head) = curl(
        &[
            &json[..],
            &[
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-d",
                r#"{"code":5,"message":"gone","retryPushbackMs":"250"}"#,
                &url("Fail"),
            ],
        ]
        .concat(),
    );
    assert_eq!(status, 404, "{head}");
    let head = head.to_lowercase();
    assert!(
        head.contains("grpc-trailer-grpc-retry-pushback-ms: 250"),
        "{head}"
    );
    assert!(!head.contains("grpc-trailer-grpc-status"), "{head}");

    // Bad input over JSON: each named.
    for (args, want_status, want_text) in [
        (
            vec!["-d", r#"{"mesage":"typo"}"#, &url("Echo") as &str],
            400,
            "mesage",
        ),
        (vec!["-d", "{not json", &url("Echo")], 400, "not a valid"),
        (
            vec![
                "-d",
                "{}",
                &format!("{}/no.such.v1.Service/Get", mesh.url()),
            ],
            501,
            "no.such.v1.Service",
        ),
        (vec!["-d", "{}", &url("Nope")], 404, "no method Nope"),
        (
            vec!["-d", "{}", &format!("{}/not-a-path", mesh.url())],
            404,
            "not a method path",
        ),
        (
            vec!["-d", "{}", &url("Collect")],
            501,
            "streams its requests",
        ),
    ] {
        let (status, body) = curl(&[&json[..], &args].concat());
        assert_eq!(status, want_status, "{args:?}: {body}");
        assert!(body.contains(want_text), "{args:?}: {body}");
    }
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(5000));
    let (status, body) = curl(&[&json[..], &["-d", &big, &url("Echo")]].concat());
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("4096"), "{body}");
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: text/plain",
        "-d",
        "hi",
        &url("Echo"),
    ]);
    assert_eq!(status, 415, "{body}");

    // gRPC-Web over HTTP/1.1, as a browser sends it: a CORS preflight,
    // then the call; the status comes back in a trailer frame.
    let (status, _) = curl(&[
        "-X",
        "OPTIONS",
        "-H",
        "origin: http://app.example",
        "-H",
        "access-control-request-method: POST",
        "-H",
        "access-control-request-headers: content-type,x-grpc-web",
        "-D",
        "-",
        &url("Echo"),
    ]);
    assert_eq!(status, 200);
    let message = prost::Message::encode_to_vec(&say("from a browser"));
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let dir = tempfile::tempdir().unwrap();
    let body_file = dir.path().join("request.bin");
    let out_file = dir.path().join("response.bin");
    std::fs::write(&body_file, &frame).unwrap();
    let (status, _) = curl(&[
        "--http1.1",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "x-grpc-web: 1",
        "-H",
        "origin: http://app.example",
        "--data-binary",
        &format!("@{}", body_file.display()),
        "-o",
        out_file.to_str().unwrap(),
        &url("Echo"),
    ]);
    assert_eq!(status, 200);
    let response = std::fs::read(&out_file).unwrap();
    assert_eq!(response[0], 0, "a data frame first");
    let len = u32::from_be_bytes(response[1..5].try_into().unwrap()) as usize;
    let reply: echo::EchoResponse = prost::Message::decode(&response[5..5 + len]).unwrap();
    assert_eq!(reply.message, "from a browser");
    let trailer = &response[5 + len..];
    assert_eq!(trailer[0], 0x80, "then a trailer frame");
    let trailer_text = String::from_utf8_lossy(&trailer[5..]).to_lowercase();
    assert!(trailer_text.contains("grpc-status:0"), "{trailer_text}");

    // Native gRPC bad input: unknown service, a message larger than the
    // service accepts.
    let mut client = mesh.client();
    let mut channel =
        tonic::client::Grpc::new(Channel::from_shared(mesh.url()).unwrap().connect_lazy());
    channel.ready().await.unwrap();
    let unknown: Result<tonic::Response<echo::EchoResponse>, tonic::Status> = channel
        .unary(
            tonic::Request::new(say("x")),
            "/no.such.v1.Service/Get".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let unknown = unknown.unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);
    assert!(
        unknown.message().contains("no.such.v1.Service"),
        "{}",
        unknown.message()
    );
    let mut big = say("big");
    big.payload = vec![7; 5 * 1024 * 1024];
    let too_big = client
        .clone()
        .max_encoding_message_size(8 * 1024 * 1024)
        .echo(big)
        .await
        .unwrap_err();
    // The service's limit, in its words (tonic says OUT_OF_RANGE).
    assert!(
        matches!(too_big.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{too_big:?}"
    );
    assert!(too_big.message().contains("too large"), "{too_big:?}");
    // And the edge still serves everyone else.
    assert!(client.echo(say("still here")).await.is_ok());
}

#[tokio::test]
async fn the_edge_serves_tls_with_a_certificate_from_a_file() {
    let pki = TestPki::new("trellis.local");
    let (cert, key) = pki.issue_server(&["localhost", "127.0.0.1"]);
    let ca = pki.ca_path();
    let mesh = Mesh::start(&[
        "--edge-tls-cert",
        cert.to_str().unwrap(),
        "--edge-tls-key",
        key.to_str().unwrap(),
    ]);
    let _a = mesh.instance("a1");
    let https = format!("https://localhost:{}", mesh.edge.port());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, out, err) = run(Command::new("buf").args([
            "curl",
            "--protocol",
            "grpc",
            "--cacert",
            ca.to_str().unwrap(),
            "-d",
            r#"{"message":"over tls"}"#,
            &format!("{https}/{ECHO}/Echo"),
        ]));
        if ok {
            assert!(out.contains("over tls"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "no TLS call succeeded: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Plaintext to a TLS listener is refused, not hung.
    let (ok, _, _) = mesh.buf_curl(&["--list-services", &mesh.url()]);
    assert!(!ok);
}
