//! Property tests of every parser that reads network or operator input:
//! whatever the bytes, no panic and no unbounded allocation.
//!
//! `grpc-timeout` and the other gRPC headers a peer sends, the request
//! path, the edge's policy file and the credentials it checks, the JSON
//! transcoder in both directions, and the contracts (descriptor sets) the
//! registry hands out. Each property runs a bounded number of cases (a
//! second or two each) and writes no failure files into the repository.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt as _;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use prost_types::FileDescriptorProto;
use tonic::Code;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::descriptors::{contract_files, mutate, mutation};

use crate::body::{ResponseBody, UpstreamBody};
use crate::edge::json;
use crate::edge::policy::{EdgePolicy, Target};
use crate::edge::reflection::Contracts;
use crate::grpc::{self, GrpcPath};

/// Bounded: 256 cases (the `PROPTEST_CASES` variable can raise it), no
/// persistence files.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs an async property on one current-thread runtime.
fn run_async<S, F, Fut>(strategy: S, property: F)
where
    S: Strategy,
    S::Value: Clone,
    F: Fn(S::Value) -> Fut,
    Fut: std::future::Future<Output = Result<(), TestCaseError>>,
{
    run_async_with(config(), strategy, property);
}

/// [`run_async`] with its own configuration.
fn run_async_with<S, F, Fut>(config: ProptestConfig, strategy: S, property: F)
where
    S: Strategy,
    S::Value: Clone,
    F: Fn(S::Value) -> Fut,
    Fut: std::future::Future<Output = Result<(), TestCaseError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, |value| runtime.block_on(property(value))) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------- grpc-timeout

/// The nanoseconds one `grpc-timeout` unit stands for.
fn unit_nanos(unit: u8) -> Option<u128> {
    Some(match unit {
        b'H' => 3_600_000_000_000,
        b'M' => 60_000_000_000,
        b'S' => 1_000_000_000,
        b'm' => 1_000_000,
        b'u' => 1_000,
        b'n' => 1,
        _ => return None,
    })
}

/// Header values near the grammar (digits, then a unit, perhaps more) and
/// far from it.
fn timeout_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..14),
        ("[0-9]{0,11}", "[HMSmunx+ -]{0,2}").prop_map(|(d, u)| format!("{d}{u}").into_bytes()),
        ("[+-]?[0-9 ._]{0,10}", "[HMSmun]").prop_map(|(d, u)| format!("{d}{u}").into_bytes()),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a caller sends as `grpc-timeout`, the parser answers the
    /// exact value of a well-formed one (at most 8 digits and a unit) and
    /// `None` for anything else.
    #[test]
    fn grpc_timeout_parses_exactly_the_grammar(bytes in timeout_text()) {
        let Ok(value) = HeaderValue::from_bytes(&bytes) else {
            return Ok(());
        };
        let parsed = grpc::parse_timeout(&value);
        let well_formed = (2..=9).contains(&bytes.len())
            && bytes[..bytes.len() - 1].iter().all(u8::is_ascii_digit)
            && unit_nanos(bytes[bytes.len() - 1]).is_some();
        if well_formed {
            let digits: u128 = std::str::from_utf8(&bytes[..bytes.len() - 1])
                .unwrap()
                .parse()
                .unwrap();
            let want = digits * unit_nanos(bytes[bytes.len() - 1]).unwrap();
            prop_assert_eq!(parsed.map(|d| d.as_nanos()), Some(want), "{:?}", value);
        } else {
            prop_assert_eq!(parsed, None, "{:?}", value);
        }
    }

    /// Every duration encodes to a valid header that parses back to no
    /// less than it (a deadline is never shortened), within the precision
    /// of the unit chosen; beyond the largest the protocol can say, the
    /// largest.
    #[test]
    fn grpc_timeout_round_trips_without_shrinking(
        nanos in prop_oneof![
            0u128..2_000,
            0u128..10_000_000_000,
            0u128..400_000_000_000_000_000_000,
            Just(359_999_996_400_000_000_000u128),
            Just(359_999_996_400_000_000_001u128),
            Just(u64::MAX as u128 * 1_000_000_000),
        ]
    ) {
        let d = Duration::new(
            (nanos / 1_000_000_000) as u64,
            (nanos % 1_000_000_000) as u32,
        );
        let encoded = grpc::encode_timeout(d);
        prop_assert!(encoded.len() <= 9, "{:?}", encoded);
        let back = grpc::parse_timeout(&encoded);
        prop_assert!(back.is_some(), "{:?} does not parse", encoded);
        let back = back.unwrap().as_nanos();
        const LARGEST: u128 = 99_999_999 * 3_600_000_000_000;
        if nanos > LARGEST {
            prop_assert_eq!(encoded, "99999999H");
            return Ok(());
        }
        let nanos = nanos.max(1);
        prop_assert!(back >= nanos, "{:?} -> {:?} shrank", d, encoded);
        let unit = *encoded.as_bytes().last().unwrap();
        if unit == b'n' {
            prop_assert_eq!(back, nanos);
        } else {
            // A coarser unit is chosen only when the finer one needs more
            // than eight digits, so the overshoot is under 1/99,999.
            prop_assert!((back - nanos) * 99_000 <= nanos, "{:?} -> {:?}", d, encoded);
        }
    }
}

// ------------------------------------------------------------ the gRPC path

fn path_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(/?[a-zA-Z0-9._%-]{0,6}){0,4}/?",
        (
            "[a-z]{1,5}(\\.[a-z0-9]{1,5}){0,3}\\.[A-Z][a-zA-Z]{0,6}",
            "[A-Z][a-zA-Z0-9_]{0,8}"
        )
            .prop_map(|(s, m)| format!("/{s}/{m}")),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// The proxy routes on `/<service>/<method>`: a path splits into two
    /// non-empty parts without `/` that rebuild it exactly, or not at all.
    #[test]
    fn grpc_paths_split_exactly_or_not_at_all(path in path_text()) {
        let parsed = GrpcPath::parse(&path);
        let shape = path.strip_prefix('/').and_then(|rest| rest.split_once('/')).is_some_and(
            |(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'),
        );
        prop_assert_eq!(parsed.is_some(), shape, "{:?}", path);
        if let Some(p) = parsed {
            prop_assert!(!p.service.is_empty() && !p.method.is_empty());
            prop_assert!(!p.service.contains('/') && !p.method.contains('/'));
            prop_assert_eq!(format!("/{}/{}", p.service, p.method), path);
        }
    }

    /// A gRPC request whose URI is anything `http` accepts is either split
    /// or answered UNIMPLEMENTED; a non-gRPC one is answered 415.
    #[test]
    fn requests_resolve_to_a_method_or_a_status(path in path_text(), grpc_type in any::<bool>()) {
        let Ok(uri) = http::Uri::builder()
            .scheme("http")
            .authority("edge")
            .path_and_query(path.as_str())
            .build()
        else {
            return Ok(());
        };
        let mut request = Request::builder().uri(uri);
        if grpc_type {
            request = request.header("content-type", "application/grpc");
        }
        let request = request.body(()).unwrap();
        match grpc::method_of::<(), ()>(&request, "the outbound port") {
            Ok(method) => {
                prop_assert!(grpc_type);
                prop_assert_eq!(format!("/{}/{}", method.service, method.method), request.uri().path());
            }
            Err(response) => {
                let want = if grpc_type { Code::Unimplemented } else { Code::InvalidArgument };
                prop_assert_eq!(grpc::status_of(response.headers()), Some(want));
                if !grpc_type {
                    prop_assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
                }
            }
        }
    }

    /// `grpc-message` survives percent-encoding whatever its text, and any
    /// bytes a peer sends as `grpc-status`, `grpc-message` or
    /// `grpc-retry-pushback-ms` are read without panicking.
    #[test]
    fn status_headers_from_peers_are_read_safely(
        message in any::<String>(),
        raw in prop::collection::vec(any::<u8>(), 0..40),
        code_text in prop_oneof![any::<String>(), "-?[0-9]{1,12}", "[A-Za-z_]{1,20}"],
    ) {
        let mut headers = HeaderMap::new();
        grpc::set_status(&mut headers, Code::Unavailable, &message);
        prop_assert_eq!(grpc::message_of(&headers), message);

        if let Ok(value) = HeaderValue::from_bytes(&raw) {
            let mut peer = HeaderMap::new();
            peer.insert("grpc-message", value.clone());
            peer.insert("grpc-status", value.clone());
            peer.insert(grpc::PUSHBACK_HEADER, value);
            let _ = grpc::message_of(&peer);
            let _ = grpc::status_of(&peer);
            match crate::retry::pushback(&peer) {
                crate::retry::Pushback::Wait(d) => {
                    let ms: i64 = std::str::from_utf8(&raw).unwrap().trim().parse().unwrap();
                    prop_assert_eq!(d, Duration::from_millis(ms as u64));
                }
                crate::retry::Pushback::Stop => {}
                crate::retry::Pushback::None => prop_assert!(false, "the header is there"),
            }
        }
        if let Some(code) = grpc::parse_code(&code_text) {
            let numeric = code_text.parse::<i32>().is_ok_and(|n| n == code as i32);
            prop_assert!(numeric || grpc::code_name(code).eq_ignore_ascii_case(&code_text));
        }
    }
}

// ------------------------------------------------------- the edge policy file

/// One line of something like an edge policy: real keys and tables with
/// values of every kind, including the numbers that break arithmetic.
fn policy_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("reflection"),
        Just("health"),
        Just("name"),
        Just("sha256"),
        Just("issuer"),
        Just("audience"),
        Just("hs256_secret_file"),
        Just("rs256_public_key_file"),
        Just("leeway_seconds"),
        Just("match"),
        Just("auth"),
        Just("rate_per_second"),
        Just("burst"),
        Just("failed_auth_per_minute"),
        Just("max_tracked_callers"),
        Just("unknown"),
    ];
    let value = prop_oneof![
        prop_oneof![
            Just("public"),
            Just("required"),
            Just("*"),
            Just("a.S"),
            Just("a.S/M"),
            Just("a.S/*"),
            Just("/"),
            Just(""),
            Just("secret"),
            Just("missing.pem"),
            Just("../../etc/passwd"),
        ]
        .prop_map(|s| format!("{s:?}")),
        "[0-9a-fA-F]{60,66}".prop_map(|s| format!("{s:?}")),
        any::<String>().prop_map(|s| format!("{s:?}")),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![
            Just("inf"),
            Just("-inf"),
            Just("nan"),
            Just("0.0"),
            Just("-0.0"),
            Just("5e-324"),
            Just("1e-20"),
            Just("1e-300"),
            Just("1e300"),
            Just("4294967296"),
            Just("18446744073709551616"),
            Just("true"),
            Just("[1, 2]"),
            Just("{}"),
        ]
        .prop_map(str::to_owned),
    ];
    prop_oneof![
        3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop_oneof![Just("[[api_key]]"), Just("[[route]]"), Just("[jwt]"), Just("[route]")]
            .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// A policy file in a directory of its own, with an HS256 secret beside it.
fn load_policy(text: &str) -> anyhow::Result<EdgePolicy> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret-for-properties\n").unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    EdgePolicy::load(&path)
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A route: its pattern, whether it needs credentials, its rate and burst.
type RouteSpec = (String, bool, Option<(f64, Option<u32>)>);

/// A valid policy: keys (plain text, name) and routes.
#[derive(Clone, Debug)]
struct ValidPolicy {
    keys: Vec<(String, String)>,
    routes: Vec<RouteSpec>,
}

fn valid_policy() -> impl Strategy<Value = ValidPolicy> {
    let keys = prop::collection::vec("[ -~]{1,40}", 0..4);
    let routes = prop::collection::vec(
        (
            0u8..3,
            any::<bool>(),
            prop::option::of((0.001f64..1.0e6, prop::option::of(1u32..10_000))),
        ),
        0..5,
    );
    (keys, routes).prop_map(|(keys, routes)| ValidPolicy {
        keys: keys
            .into_iter()
            .enumerate()
            // An index makes every key and name distinct.
            .map(|(i, k)| (format!("{k}{i}"), format!("key-{i}")))
            .collect(),
        routes: routes
            .into_iter()
            .enumerate()
            .map(|(i, (shape, required, limit))| {
                let pattern = match shape {
                    0 if i == 0 => "*".to_owned(),
                    0 | 1 => format!("p{i}.v1.S"),
                    _ => format!("p{i}.v1.S/M"),
                };
                (pattern, required, limit)
            })
            .collect(),
    })
}

impl ValidPolicy {
    fn text(&self) -> String {
        let mut out = String::from("reflection = \"required\"\n");
        for (key, name) in &self.keys {
            out += &format!(
                "[[api_key]]\nname = {name:?}\nsha256 = \"{}\"\n",
                sha256_hex(key)
            );
        }
        out += "[jwt]\nissuer = \"iss\"\naudience = \"aud\"\nhs256_secret_file = \"secret\"\n";
        for (pattern, required, limit) in &self.routes {
            out += &format!(
                "[[route]]\nmatch = {pattern:?}\nauth = \"{}\"\n",
                if *required { "required" } else { "public" }
            );
            if let Some((rate, burst)) = limit {
                out += &format!("rate_per_second = {rate:?}\n");
                if let Some(b) = burst {
                    out += &format!("burst = {b}\n");
                }
            }
        }
        out
    }
}

proptest! {
    #![proptest_config(config())]

    /// Whatever an operator writes, loading the policy returns it or an
    /// error: it never panics (rates too small or too large included).
    #[test]
    fn any_policy_text_loads_or_is_refused(lines in prop::collection::vec(policy_line(), 0..14)) {
        let text = lines.join("\n");
        if let Ok(policy) = load_policy(&text) {
            let _ = policy.summary();
            let headers = HeaderMap::new();
            for target in [
                Target::Call { service: "a.S", method: "M" },
                Target::Reflection,
                Target::Health,
            ] {
                let _ = policy.admit(target, &headers, PEER);
            }
        }
    }

    /// Every well-formed policy loads, and answers as written: keys admit
    /// their callers by name, required routes refuse anonymous callers,
    /// a caller's first call is within its burst.
    #[test]
    fn valid_policies_load_and_admit_as_written(p in valid_policy()) {
        let text = p.text();
        let policy = load_policy(&text).map_err(|e| TestCaseError::fail(format!("{e:#}\n{text}")))?;
        let summary = policy.summary();
        prop_assert!(summary.starts_with(&format!("{} API keys, JWT (HS256), {} routes", p.keys.len(), p.routes.len())), "{}", summary);
        let anonymous = HeaderMap::new();
        prop_assert_eq!(policy.admit(Target::Reflection, &anonymous, PEER).unwrap_err().code, Code::Unauthenticated);
        for (i, (pattern, required, _)) in p.routes.iter().enumerate() {
            let (service, method) = match pattern.split_once('/') {
                Some((s, m)) => (s.to_owned(), m.to_owned()),
                None if pattern == "*" => ("zz.Any".to_owned(), "Any".to_owned()),
                None => (pattern.clone(), "Any".to_owned()),
            };
            let target = Target::Call { service: &service, method: &method };
            let got = policy.admit(target, &anonymous, PEER);
            if *required {
                prop_assert_eq!(got.unwrap_err().code, Code::Unauthenticated);
            } else {
                prop_assert!(got.is_ok(), "route {} ({}): {:?}", i, pattern, got);
            }
            if let Some((key, name)) = p.keys.first() {
                let mut headers = HeaderMap::new();
                headers.insert("x-api-key", HeaderValue::from_str(key).unwrap());
                let got = policy.admit(target, &headers, PEER);
                prop_assert_eq!(got.unwrap().unwrap().to_string(), format!("api-key:{name}"));
            }
        }
    }

    /// Whatever a caller sends as credentials, the edge answers
    /// UNAUTHENTICATED or admits it, and never repeats a key or token in
    /// its message.
    #[test]
    fn any_credentials_are_checked_without_leaking(
        key in prop::collection::vec(any::<u8>(), 8..60),
        token in prop_oneof![
            prop::collection::vec(any::<u8>(), 8..120),
            "[A-Za-z0-9_-]{8,40}\\.[A-Za-z0-9_-]{8,40}\\.[A-Za-z0-9_-]{0,40}".prop_map(String::into_bytes),
        ],
        scheme in prop_oneof![Just("Bearer "), Just("bearer "), Just("Basic "), Just("")],
    ) {
        let policy = load_policy(
            "[jwt]\nissuer = \"iss\"\naudience = \"aud\"\nhs256_secret_file = \"secret\"\n\
             [[route]]\nmatch = \"*\"\nauth = \"public\"\n",
        )
        .unwrap();
        let target = Target::Call { service: "a.S", method: "M" };
        if let Ok(value) = HeaderValue::from_bytes(&key) {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", value);
            let e = policy.admit(target, &headers, PEER).unwrap_err();
            prop_assert_eq!(e.code, Code::Unauthenticated);
            let key = String::from_utf8_lossy(&key);
            prop_assert!(key.trim().len() < 4 || !e.message.contains(key.trim()), "{}", e.message);
        }
        let mut authorization = scheme.as_bytes().to_vec();
        authorization.extend_from_slice(&token);
        if let Ok(value) = HeaderValue::from_bytes(&authorization) {
            let mut headers = HeaderMap::new();
            headers.insert("authorization", value);
            let e = policy.admit(target, &headers, PEER).unwrap_err();
            prop_assert_eq!(e.code, Code::Unauthenticated);
            let token = String::from_utf8_lossy(&token);
            prop_assert!(token.trim().len() < 4 || !e.message.contains(token.trim()), "{}", e.message);
        }
    }

    /// Signed tokens with any claims: only one that is current, names
    /// this edge's issuer and audience and has a subject is admitted, as
    /// that subject.
    #[test]
    fn signed_tokens_with_any_claims_are_judged(
        sub in prop::option::of(".{0,12}"),
        iss in prop_oneof![Just("iss".to_owned()), ".{0,6}"],
        aud in prop_oneof![Just(serde_json::json!("aud")), Just(serde_json::json!(["x", "aud"])), any::<i64>().prop_map(|n| serde_json::json!(n))],
        exp in prop_oneof![Just(None), (-100_000i64..100_000).prop_map(Some), any::<i64>().prop_map(Some)],
        nbf in prop_oneof![Just(None), (-100_000i64..100_000).prop_map(Some)],
        right_secret in any::<bool>(),
    ) {
        let policy = load_policy(
            "[jwt]\nissuer = \"iss\"\naudience = \"aud\"\nhs256_secret_file = \"secret\"\n\
             [[route]]\nmatch = \"*\"\nauth = \"required\"\n",
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut claims = serde_json::json!({ "iss": iss, "aud": aud });
        if let Some(sub) = &sub {
            claims["sub"] = serde_json::json!(sub);
        }
        if let Some(exp) = exp {
            claims["exp"] = serde_json::json!(now.saturating_add(exp));
        }
        if let Some(nbf) = nbf {
            claims["nbf"] = serde_json::json!(now + nbf);
        }
        let secret: &[u8] = if right_secret { b"s3cret-for-properties" } else { b"another" };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        let got = policy.admit(Target::Call { service: "a.S", method: "M" }, &headers, PEER);
        // Clear cases only; within the leeway either answer is right.
        let current = exp.is_some_and(|e| e > 60) && nbf.is_none_or(|n| n < -60);
        let stale = exp.is_none_or(|e| e < -60) || nbf.is_some_and(|n| n > 60);
        let audience_ok = aud == serde_json::json!("aud") || aud == serde_json::json!(["x", "aud"]);
        let good = right_secret && iss == "iss" && audience_ok && sub.as_deref().is_some_and(|s| !s.is_empty());
        if good && current {
            prop_assert_eq!(got.map(|p| p.map(|p| p.to_string())).map_err(|e| e.message), Ok(Some(format!("jwt:{}", sub.unwrap()))));
        } else if !good || stale {
            prop_assert_eq!(got.unwrap_err().code, Code::Unauthenticated);
        }
    }
}

// ------------------------------------------------------------- JSON transcoder

fn trellis_pool() -> DescriptorPool {
    DescriptorPool::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap()
}

fn method(pool: &DescriptorPool, service: &str, name: &str) -> MethodDescriptor {
    pool.get_service_by_name(service)
        .unwrap()
        .methods()
        .find(|m| m.name() == name)
        .unwrap()
}

/// Unary and server-streaming methods with scalars, bytes, maps, enums,
/// int64s, timestamps and durations in their requests.
const TRANSCODED: [(&str, &str); 5] = [
    ("trellis.echo.v1.EchoService", "Echo"),
    ("trellis.echo.v1.EchoService", "Sleep"),
    ("trellis.echo.v1.EchoService", "Count"),
    ("telco.usage.v1.UsageService", "RecordUsage"),
    ("trellis.registry.v1.RegistryService", "Register"),
];

/// JSON values shaped like requests: field names from the messages (both
/// spellings) and anything else, values of every JSON kind.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let names = prop_oneof![
        Just("message"),
        Just("payload"),
        Just("duration"),
        Just("count"),
        Just("payloadSize"),
        Just("payload_size"),
        Just("interval"),
        Just("userId"),
        Just("type"),
        Just("quantity"),
        Just("occurredAt"),
        Just("idempotencyKey"),
        Just("seconds"),
        Just("nanos"),
        Just("metadata"),
        Just("grpcServices"),
        Just("fileDescriptors"),
        Just("ttl"),
        Just("@type"),
    ]
    .prop_map(str::to_owned);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
        prop_oneof![
            Just("315576000001s"),
            Just("-315576000001s"),
            Just("1.5s"),
            Just("99999999999999999999s"),
            Just("0.0000000001s"),
            Just("9999-12-31T23:59:59Z"),
            Just("10000-01-01T00:00:00Z"),
            Just("0000-01-01T00:00:00Z"),
            Just("2024-02-30T25:61:61.9999999999+99:99"),
            Just("USAGE_TYPE_SMS"),
            Just("18446744073709551616"),
            Just("-9223372036854775809"),
            Just("1e400"),
            Just("NaN"),
            Just("Infinity"),
            Just("AAEC"),
            Just("_-_-"),
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec((names.clone(), inner), 0..6)
                .prop_map(|pairs| serde_json::Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn json_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => "[ \t\r\n{}\\[\\]\",:0-9a-z.eE+-]{0,40}".prop_map(String::into_bytes),
    ]
}

/// A transcoded request is one uncompressed gRPC frame whose length
/// prefix is its payload's length and whose payload is the method's input.
fn check_frame(frame: &[u8], input: &MessageDescriptor) -> Result<DynamicMessage, TestCaseError> {
    prop_assert!(frame.len() >= 5);
    prop_assert_eq!(frame[0], 0);
    let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    prop_assert_eq!(len, frame.len() - 5);
    DynamicMessage::decode(input.clone(), &frame[5..])
        .map_err(|e| TestCaseError::fail(format!("the frame does not decode: {e}")))
}

/// A JSON error answer: a 4xx/5xx status and `{code, status, message}`.
async fn check_error(
    response: Response<json::JsonBody>,
) -> Result<(StatusCode, Code), TestCaseError> {
    let status = response.status();
    prop_assert!(!status.is_success(), "an error answered {}", status);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| TestCaseError::fail(format!("the error is not JSON: {e}")))?;
    let code = Code::from_i32(value["code"].as_i64().unwrap_or(-1) as i32);
    prop_assert_eq!(value["status"].as_str(), Some(grpc::code_name(code)));
    prop_assert!(value["message"].is_string());
    Ok((status, code))
}

/// Any JSON body (and any non-JSON one) for real methods: a gRPC frame of
/// the input message, or a 400 INVALID_ARGUMENT; over the limit, a 429.
#[test]
fn any_json_body_becomes_a_frame_or_an_error() {
    let pool = trellis_pool();
    let methods: Vec<MethodDescriptor> = TRANSCODED
        .iter()
        .map(|(s, m)| method(&pool, s, m))
        .collect();
    run_async(
        (
            json_body(),
            0..methods.len(),
            prop_oneof![Just(1 << 20), 0usize..64],
        ),
        |(body, which, limit)| {
            let method = methods[which].clone();
            async move {
                let request = Request::builder()
                    .method("POST")
                    .uri(format!(
                        "/{}/{}",
                        method.parent_service().full_name(),
                        method.name()
                    ))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.clone())))
                    .unwrap();
                match json::transcode(request, &method, limit).await {
                    Ok(t) => {
                        prop_assert!(body.len() <= limit);
                        prop_assert_eq!(&t.request.headers()["content-type"], "application/grpc");
                        let frame = t.request.into_body().collect().await.unwrap().to_bytes();
                        check_frame(&frame, &method.input())?;
                    }
                    Err(response) => {
                        let (status, code) = check_error(response).await?;
                        if body.len() > limit {
                            prop_assert_eq!(code, Code::ResourceExhausted);
                            prop_assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
                        } else {
                            prop_assert_eq!(code, Code::InvalidArgument);
                            prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                        }
                    }
                }
                Ok(())
            }
        },
    );
}

fn echo_request() -> impl Strategy<Value = echo::EchoRequest> {
    (any::<String>(), prop::collection::vec(any::<u8>(), 0..64))
        .prop_map(|(message, payload)| echo::EchoRequest { message, payload })
}

/// An Echo request written as proto3 JSON arrives as exactly that
/// request.
#[test]
fn echo_requests_survive_json() {
    let pool = trellis_pool();
    let echo = method(&pool, "trellis.echo.v1.EchoService", "Echo");
    run_async(echo_request(), |want| {
        let echo = echo.clone();
        async move {
            let dynamic =
                DynamicMessage::decode(echo.input(), want.encode_to_vec().as_slice()).unwrap();
            let body = serde_json::to_vec(&dynamic).unwrap();
            let request = Request::builder()
                .method("POST")
                .uri("/trellis.echo.v1.EchoService/Echo")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let t = json::transcode(request, &echo, 1 << 20).await.unwrap();
            let frame = t.request.into_body().collect().await.unwrap().to_bytes();
            check_frame(&frame, &echo.input())?;
            prop_assert_eq!(echo::EchoRequest::decode(&frame[5..]).unwrap(), want);
            Ok(())
        }
    });
}

/// One piece of what a backend sends back: a frame with any flag, any
/// declared length and any bytes, or a real EchoResponse.
#[derive(Clone, Debug)]
enum Piece {
    Raw {
        flag: u8,
        declared: u32,
        bytes: Vec<u8>,
    },
    Message(echo::EchoResponse),
}

fn piece() -> impl Strategy<Value = Piece> {
    let response = (
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..32),
        ".{0,8}",
    )
        .prop_map(|(message, payload, instance)| echo::EchoResponse {
            message,
            payload,
            instance,
            ..Default::default()
        });
    prop_oneof![
        2 => response.prop_map(Piece::Message),
        1 => (
            prop_oneof![Just(0u8), Just(1u8), any::<u8>()],
            prop_oneof![0u32..40, any::<u32>(), Just(u32::MAX), Just(0x8000_0000)],
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(flag, declared, bytes)| Piece::Raw { flag, declared, bytes }),
    ]
}

/// What the backend sends: pieces cut into chunks at arbitrary points,
/// then trailers (or none).
#[derive(Clone, Debug)]
struct Answer {
    pieces: Vec<Piece>,
    cuts: Vec<usize>,
    status: Option<String>,
    streaming: bool,
    /// The largest message the edge reads.
    limit: usize,
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        prop::collection::vec(piece(), 0..4),
        prop::collection::vec(0usize..64, 0..6),
        prop::option::of(prop_oneof![
            3 => Just("0".to_owned()),
            1 => (1..17i32).prop_map(|c| c.to_string()),
            1 => "[ -~]{0,6}",
        ]),
        any::<bool>(),
        prop_oneof![Just(4usize << 20), 0usize..48],
    )
        .prop_map(|(pieces, cuts, status, streaming, limit)| Answer {
            pieces,
            cuts,
            status,
            streaming,
            limit,
        })
}

impl Answer {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Raw {
                    flag,
                    declared,
                    bytes,
                } => {
                    out.push(*flag);
                    out.extend_from_slice(&declared.to_be_bytes());
                    out.extend_from_slice(bytes);
                }
                Piece::Message(m) => {
                    let encoded = m.encode_to_vec();
                    out.push(0);
                    out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
                    out.extend_from_slice(&encoded);
                }
            }
        }
        out
    }

    fn chunks(&self) -> Vec<Bytes> {
        let all = Bytes::from(self.bytes());
        let mut points: Vec<usize> = self.cuts.iter().map(|c| c % (all.len() + 1)).collect();
        points.push(0);
        points.push(all.len());
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| all.slice(w[0]..w[1])).collect()
    }

    /// Whether the backend sent well-formed messages within the limit and
    /// then OK.
    fn well_formed(&self) -> bool {
        self.status.as_deref() == Some("0")
            && self
                .pieces
                .iter()
                .all(|p| matches!(p, Piece::Message(m) if m.encoded_len() <= self.limit))
            && (self.streaming || self.pieces.len() == 1)
    }
}

/// Serves `frames` as the body of one gRPC response over an in-memory
/// HTTP/2 connection (`hold` keeps the body open after them) and returns
/// the response as the edge's outbound path would hand it on.
async fn backend(frames: Vec<Frame<Bytes>>, hold: bool) -> Response<ResponseBody> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let frames = Arc::new(std::sync::Mutex::new(Some(frames)));
    let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| {
        let frames = frames.lock().unwrap().take().unwrap_or_default();
        async move {
            let stream = futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>));
            let body = if hold {
                StreamBody::new(stream.chain(futures::stream::pending())).boxed_unsync()
            } else {
                StreamBody::new(stream).boxed_unsync()
            };
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            Ok::<_, Infallible>(response)
        }
    });
    tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(server_io), service)
            .await;
    });
    let (send, connection) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method("POST")
        .uri("http://backend/trellis.echo.v1.EchoService/Echo")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, _) = send
        .ready()
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    let (parts, recv) = response.await.unwrap().into_parts();
    Response::from_parts(
        parts,
        ResponseBody::upstream(UpstreamBody::new(recv, None), None),
    )
}

/// Whatever a backend answers (hostile length prefixes, compressed flags,
/// garbage, cut anywhere, any status), the JSON answer is JSON: the
/// messages when they were well formed, else an error; and it comes as
/// soon as the backend's answer ends.
#[test]
fn any_backend_answer_becomes_json() {
    let pool = trellis_pool();
    let output = method(&pool, "trellis.echo.v1.EchoService", "Echo").output();
    run_async(answer(), |a| {
        let output = output.clone();
        async move {
            let mut frames: Vec<Frame<Bytes>> = a.chunks().into_iter().map(Frame::data).collect();
            if let Some(status) = &a.status
                && let Ok(value) = HeaderValue::from_str(status)
            {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", value);
                frames.push(Frame::trailers(trailers));
            }
            let response = backend(frames, false).await;
            let answered = tokio::time::timeout(Duration::from_secs(5), async {
                let response = json::answer(response, output.clone(), a.streaming, a.limit).await;
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            })
            .await;
            let Ok((status, body)) = answered else {
                return Err(TestCaseError::fail("no JSON answer within 5 s"));
            };
            let lines: Vec<serde_json::Value> = body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(serde_json::from_slice)
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(format!("not JSON lines: {e}")))?;
            let messages: Vec<serde_json::Value> = a
                .pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Message(m) => {
                        let d =
                            DynamicMessage::decode(output.clone(), m.encode_to_vec().as_slice())
                                .unwrap();
                        Some(
                            d.serialize_with_options(
                                serde_json::value::Serializer,
                                &prost_reflect::SerializeOptions::new().skip_default_fields(true),
                            )
                            .unwrap(),
                        )
                    }
                    Piece::Raw { .. } => None,
                })
                .collect();
            if a.streaming {
                prop_assert_eq!(status, StatusCode::OK);
                let results: Vec<&serde_json::Value> =
                    lines.iter().filter_map(|l| l.get("result")).collect();
                let errors = lines.iter().filter(|l| l.get("error").is_some()).count();
                prop_assert!(errors <= 1);
                prop_assert_eq!(results.len() + errors, lines.len());
                if a.well_formed() {
                    prop_assert_eq!(errors, 0);
                    prop_assert_eq!(results, messages.iter().collect::<Vec<_>>());
                }
            } else if a.well_formed() {
                prop_assert_eq!(status, StatusCode::OK);
                prop_assert_eq!(&lines, &messages);
            } else {
                prop_assert_eq!(lines.len(), 1);
                if status == StatusCode::OK {
                    // Bytes that happen to decode, then an OK status: an
                    // answer, never an error object.
                    prop_assert!(
                        lines[0].is_object() && lines[0].get("code").is_none(),
                        "{}",
                        lines[0]
                    );
                } else {
                    prop_assert!(lines[0]["code"].is_i64(), "{}", lines[0]);
                }
            }
            Ok(())
        }
    });
}

/// A backend that declares a message larger than the edge's limit, sends
/// a little of it and then nothing: the edge must not wait to buffer what
/// the prefix promises; it answers an error at once.
#[test]
fn a_huge_declared_length_is_refused_without_waiting_for_it() {
    let pool = trellis_pool();
    let output = method(&pool, "trellis.echo.v1.EchoService", "Echo").output();
    // Each case may wait its full two seconds: few cases, no shrinking.
    let few = ProptestConfig {
        cases: 8,
        max_shrink_iters: 0,
        ..config()
    };
    run_async_with(
        few,
        (
            prop_oneof![Just(4usize << 20), 16usize..(4 << 20)],
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
        ),
        |(limit, declared, bytes, streaming)| {
            // Any length over the limit, up to the largest a prefix can say.
            let declared = (limit as u32).saturating_add(1).max(declared);
            let output = output.clone();
            async move {
                let mut frame = BytesMut::new();
                frame.put_u8(0);
                frame.put_u32(declared);
                frame.put_slice(&bytes);
                let response = backend(vec![Frame::data(frame.freeze())], true).await;
                let answered = tokio::time::timeout(Duration::from_secs(2), async {
                    let response = json::answer(response, output.clone(), streaming, limit).await;
                    let status = response.status();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    (status, body)
                })
                .await;
                let Ok((status, body)) = answered else {
                    return Err(TestCaseError::fail(format!(
                        "a backend declaring a {declared}-byte message kept the answer waiting"
                    )));
                };
                let text = String::from_utf8_lossy(&body);
                prop_assert!(
                    !status.is_success() || text.contains("\"error\""),
                    "{} {}",
                    status,
                    text
                );
                Ok(())
            }
        },
    );
}

// ----------------------------------------------------- contracts from the registry

fn contracts_input() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        4 => prop::collection::vec(mutation(), 1..5).prop_map(|m| mutate(contract_files(), &m)),
        1 => prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4),
    ]
}

/// Whatever descriptors the registry hands the edge for a service, the
/// edge's reflection and JSON contracts are built (that service may be
/// left out and reported) and answer lookups; the proxy's reading of
/// which methods are safe to retry only names methods.
#[test]
fn any_registered_contract_is_merged_or_reported() {
    let mut runner = TestRunner::new(config());
    runner
        .run(&contracts_input(), |blobs| {
            let files: Arc<Vec<Bytes>> = Arc::new(blobs.iter().cloned().map(Bytes::from).collect());
            let mut registered = BTreeMap::new();
            let mut contracts = HashMap::new();
            for (grpc_service, mesh_service) in [
                ("trellis.echo.v1.EchoService", "echo"),
                ("telco.usage.v1.UsageService", "usage"),
            ] {
                registered.insert(grpc_service.to_owned(), mesh_service.to_owned());
                contracts.insert(grpc_service.to_owned(), files.clone());
            }
            let merged = Contracts::build(&registered, &contracts);
            prop_assert!(
                merged
                    .listed()
                    .contains(&"trellis.echo.v1.EchoService".to_owned())
            );
            for (service, name) in [
                ("trellis.echo.v1.EchoService", "Echo"),
                ("telco.usage.v1.UsageService", "RecordUsage"),
                ("grpc.health.v1.Health", "Check"),
                ("x", ""),
            ] {
                if let Ok(m) = merged.method(service, name) {
                    prop_assert_eq!(m.name(), name);
                    let _ = m.input().fields().count();
                }
            }
            let (_, safe) =
                crate::discovery::contract_methods(&blobs, "trellis.echo.v1.EchoService");
            let methods: Vec<String> = blobs
                .iter()
                .filter_map(|b| FileDescriptorProto::decode(b.as_slice()).ok())
                .flat_map(|f| f.service)
                .flat_map(|s| s.method)
                .map(|m| m.name().to_owned())
                .collect();
            prop_assert!(safe.iter().all(|m| methods.contains(m)), "{:?}", safe);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
