//! The method console: a form for any method of any registered service,
//! built from the contract the registry holds, sent through the edge as
//! JSON (the edge's transcoding) under the operator's own credential.
//!
//! The credential (an API key or a JWT) lives in the browser tab only.
//! The browser sends it to the dashboard with each call in the header the
//! edge takes (`x-api-key` or `authorization: Bearer`); the dashboard
//! passes that one header to the edge and nothing else of it: it is never
//! stored, logged or put in a page. Calls without one are refused before
//! anything is sent, so the dashboard stays read-only for whoever the
//! edge does not know. Custom headers also keep other sites out: a page
//! elsewhere cannot send them to the dashboard without a CORS preflight,
//! which the dashboard never grants.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use askama::Template;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use prost_reflect::DescriptorPool;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::mesh::Source;
use super::{Dashboard, View, schema, views};

/// Longest credential taken from the browser.
const MAX_CREDENTIAL: usize = 8 * 1024;
/// Largest request body the console sends.
const MAX_BODY: usize = 1024 * 1024;
/// Longest line (one message) read from the edge.
const MAX_LINE: usize = 4 * 1024 * 1024;
/// Most messages of a server stream shown; the call is cancelled past it.
const MAX_MESSAGES: usize = 10_000;
/// How long one console call may take, server streams included.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// Contracts kept (by gRPC service and the instances serving it).
const MAX_CONTRACTS: usize = 256;

/// The edge the console calls.
pub struct Edge {
    /// As given, without a trailing `/`: shown in copied commands.
    url: String,
    authority: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The CA file, for the copied commands.
    ca: String,
}

/// Registered contracts by (gRPC service, fingerprint of the instances
/// serving it): a page re-rendered live asks again only once a serving
/// instance changed.
#[derive(Default)]
pub struct Contracts(Mutex<HashMap<(String, u64), Arc<DescriptorPool>>>);

impl Edge {
    /// The edge at `url` (`http://host:port` or `https://host:port`), whose
    /// certificate `ca` signed when it is https.
    pub fn new(url: &str, ca: &FsPath) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            anyhow::bail!("{url:?}: give the edge as http://host:port or https://host:port");
        };
        let authority = rest.trim_end_matches('/').to_owned();
        let uri: http::uri::Authority = authority
            .parse()
            .map_err(|e| anyhow::anyhow!("{url:?}: {e}"))?;
        anyhow::ensure!(
            uri.port_u16().is_some(),
            "{url:?}: name the edge's port (e.g. https://127.0.0.1:8443)"
        );
        let tls = if tls {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the edge's CA {}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.with_context(|| format!("{}: not PEM certificates", ca.display()))?)
                    .with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
            }
            anyhow::ensure!(!roots.is_empty(), "{}: no certificate in it", ca.display());
            let mut config =
                rustls::ClientConfig::builder_with_provider(crate::tls::provider().clone())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = rustls::pki_types::ServerName::try_from(uri.host().to_owned())
                .map_err(|e| anyhow::anyhow!("{url:?}: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            authority,
            tls,
            ca: ca.display().to_string(),
        })
    }

    /// POSTs `body` as JSON to `path` with the operator's credential; the
    /// answer's head, its body still to read.
    async fn post(
        &self,
        path: &str,
        credential: &Credential,
        body: Vec<u8>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            format!(
                "the edge at {} did not accept a connection within 5s",
                self.url
            )
        })?
        .map_err(|e| format!("cannot reach the edge at {}: {e}", self.url))?;
        let request = http::Request::post(path)
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(credential.name.clone(), credential.value.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with the edge at {} failed: {e}", self.url))?;
                send(TokioIo::new(stream), request).await
            }
            None => send(TokioIo::new(tcp), request).await,
        }
    }
}

async fn send<T>(
    io: T,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP with the edge failed: {e}"))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("the edge did not answer: {e}"))
}

/// The one header of the operator's credential, as the browser sent it.
struct Credential {
    name: HeaderName,
    value: HeaderValue,
}

/// Names the header only: the value is never printed.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: …)", self.name)
    }
}

/// The credential in the browser's request: exactly one of `x-api-key`
/// and `authorization: Bearer …`.
fn credential(headers: &HeaderMap) -> Result<Credential, String> {
    let key = headers.get("x-api-key");
    let bearer = headers.get(header::AUTHORIZATION);
    let (name, value) = match (key, bearer) {
        (None, None) => {
            return Err(
                "sign in first: the console calls methods only with a credential the edge accepts (an API key or a JWT)"
                    .into(),
            );
        }
        (Some(_), Some(_)) => return Err("send an API key or a JWT, not both".into()),
        (Some(v), None) => (HeaderName::from_static("x-api-key"), v.clone()),
        (None, Some(v)) => {
            let text = v.to_str().unwrap_or("");
            if !text
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("bearer "))
            {
                return Err("a JWT is sent as authorization: Bearer <token>".into());
            }
            (header::AUTHORIZATION, v.clone())
        }
    };
    if value.len() > MAX_CREDENTIAL || value.to_str().is_err() || value.is_empty() {
        return Err(format!(
            "the credential must be printable text of at most {MAX_CREDENTIAL} bytes"
        ));
    }
    Ok(Credential { name, value })
}

/// A request from a page of another site (a browser says so in `Origin`).
fn foreign(headers: &HeaderMap) -> bool {
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST))
    else {
        return false;
    };
    let origin = origin.to_str().unwrap_or("");
    let host = host.to_str().unwrap_or("-");
    origin
        .split_once("://")
        .is_none_or(|(_, authority)| authority != host)
}

fn refuse(status: StatusCode, message: impl Into<String>, field: Option<String>) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(field) = field {
        body["field"] = Value::String(field);
    }
    (status, axum::Json(body)).into_response()
}

/// A fingerprint of the instances serving `grpc_service`: it changes when
/// one registers or leaves, and with it possibly the contract.
fn servers(d: &Dashboard, grpc_service: &str) -> (u64, Vec<String>) {
    let mesh = d.mesh.borrow();
    let mut ids: Vec<(&str, &str)> = mesh
        .instances
        .values()
        .filter(|t| t.instance.grpc_services.iter().any(|g| g == grpc_service))
        .map(|t| (t.instance.instance_id.as_str(), t.instance.version.as_str()))
        .collect();
    ids.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ids.hash(&mut hasher);
    let mut versions: Vec<String> = ids
        .iter()
        .map(|(_, v)| {
            if v.is_empty() {
                "unversioned".into()
            } else {
                (*v).to_owned()
            }
        })
        .collect();
    versions.dedup();
    (hasher.finish(), versions)
}

/// The registered contract of `grpc_service`, fetched again whenever the
/// instances serving it change.
async fn contract(d: &Dashboard, grpc_service: &str) -> Result<Arc<DescriptorPool>, String> {
    let (fingerprint, _) = servers(d, grpc_service);
    let key = (grpc_service.to_owned(), fingerprint);
    let cached = d.contracts.0.lock().ok().and_then(|c| c.get(&key).cloned());
    if let Some(pool) = cached {
        return Ok(pool);
    }
    let answer = d
        .registry
        .lock()
        .await
        .contract(grpc_service)
        .await
        .map_err(|e| e.to_string())?;
    let pool = Arc::new(schema::pool_from_files(&answer.file_descriptors)?);
    if let Ok(mut cache) = d.contracts.0.lock() {
        // Old fingerprints are never asked again: start afresh when full.
        if cache.len() >= MAX_CONTRACTS {
            cache.clear();
        }
        cache.insert(key, pool.clone());
    }
    Ok(pool)
}

/// The methods of `grpc_service` by name, each `unary`, `server
/// streaming`, `client streaming` or `bidi streaming`.
pub async fn methods_of(
    d: &Dashboard,
    grpc_service: &str,
) -> Result<Vec<(String, &'static str)>, String> {
    let pool = contract(d, grpc_service).await?;
    let service = pool
        .get_service_by_name(grpc_service)
        .ok_or_else(|| format!("the registered contract does not define {grpc_service}"))?;
    Ok(service
        .methods()
        .map(|m| {
            let kind = match (m.is_client_streaming(), m.is_server_streaming()) {
                (false, false) => "unary",
                (false, true) => "server streaming",
                (true, false) => "client streaming",
                (true, true) => "bidi streaming",
            };
            (m.name().to_owned(), kind)
        })
        .collect())
}

/// `pkg.Service/Method` split, or why not.
fn split_method(full: &str) -> Result<(&str, &str), String> {
    match full.split_once('/') {
        Some((s, m))
            if !s.is_empty()
                && !m.is_empty()
                && !m.contains('/')
                && s.contains('.')
                && full.len() <= 512 =>
        {
            Ok((s, m))
        }
        _ => Err(format!(
            "{:?} is not a method: give package.Service/Method, e.g. telco.user.v1.UserService/CreateUser",
            full.chars().take(200).collect::<String>()
        )),
    }
}

async fn method(
    d: &Dashboard,
    full: &str,
) -> Result<prost_reflect::MethodDescriptor, (StatusCode, String)> {
    let (service, name) = split_method(full).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    if d.mesh.borrow().service_of(service).is_none() {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no registered instance serves {service}"),
        ));
    }
    let pool = contract(d, service).await.map_err(|e| {
        (
            StatusCode::BAD_GATEWAY,
            format!("the contract of {service}: {e}"),
        )
    })?;
    pool.get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == name))
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("{service} has no method {name:?} in its registered contract"),
            )
        })
}

#[derive(Debug, Default, Deserialize)]
pub struct MethodQuery {
    #[serde(default)]
    method: String,
}

/// `GET /api/schema?method=…`: what the form for a method is made of.
pub async fn schema(State(d): State<Arc<Dashboard>>, Query(q): Query<MethodQuery>) -> Response {
    match method(&d, &q.method).await {
        Ok(m) => axum::Json(schema::method_form(&m)).into_response(),
        Err((status, message)) => refuse(status, message, None),
    }
}

/// The edge and the operator's credential for a request from the
/// browser, or why it is refused: from another site, without a
/// credential, or with no edge to call.
fn admit<'a>(
    d: &'a Dashboard,
    headers: &HeaderMap,
) -> Result<(&'a Edge, Credential), (StatusCode, String)> {
    if foreign(headers) {
        return Err((StatusCode::FORBIDDEN, "not from another site".into()));
    }
    let credential = credential(headers).map_err(|e| (StatusCode::UNAUTHORIZED, e))?;
    let edge = d.edge.as_ref().ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "this dashboard has no edge to call: start it with --edge https://HOST:PORT".into(),
        )
    })?;
    Ok((edge, credential))
}

/// `POST /api/sign-in`: whether the edge's policy accepts the credential.
/// It is shown a request the edge refuses without credentials whatever
/// its routes say (a call it will not find): an edge that does not know
/// the credential answers UNAUTHENTICATED first.
pub async fn sign_in(State(d): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    let (edge, credential) = match admit(&d, &headers) {
        Ok(admitted) => admitted,
        Err((status, why)) => return refuse(status, why, None),
    };
    let answer = match edge
        .post("/grpc.health.v1.Health/Check", &credential, b"{}".to_vec())
        .await
    {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_GATEWAY, e, None),
    };
    let status = answer.status();
    let body = read_all(answer.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let said: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let message = said["message"].as_str().unwrap_or("").to_owned();
    if matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    ) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!("the edge refused the credential: {message}"),
            None,
        );
    }
    let kind = if credential.name == header::AUTHORIZATION {
        "JWT"
    } else {
        "API key"
    };
    axum::Json(json!({ "accepted": true, "kind": kind, "edge": edge.url })).into_response()
}

async fn read_all(mut body: hyper::body::Incoming, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(format!("the answer is larger than {limit} bytes"));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct CallRequest {
    method: String,
    #[serde(default)]
    body: Value,
}

/// `POST /api/call` with `{"method": "pkg.Service/Method", "body": {…}}`:
/// checks the body against the contract, sends it through the edge, and
/// answers newline-delimited JSON as the edge answers: a
/// `{"message": …}` line per response message, then one `{"end": {…}}`
/// with the gRPC status, the edge's response headers and timing.
pub async fn call(State(d): State<Arc<Dashboard>>, headers: HeaderMap, body: Bytes) -> Response {
    let (edge, credential) = match admit(&d, &headers) {
        Ok(admitted) => admitted,
        Err((status, why)) => return refuse(status, why, None),
    };
    if body.len() > MAX_BODY {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request is larger than {MAX_BODY} bytes"),
            None,
        );
    }
    let request: CallRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"method\": \"pkg.Service/Method\", \"body\": {{…}}}}: {e}"),
                None,
            );
        }
    };
    let descriptor = match method(&d, &request.method).await {
        Ok(m) => m,
        Err((status, message)) => return refuse(status, message, None),
    };
    if descriptor.is_client_streaming() {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "{} takes a stream of requests, which the console (and the edge's JSON) cannot send: use grpcurl or buf curl",
                request.method
            ),
            None,
        );
    }
    let message = if request.body.is_null() {
        json!({})
    } else {
        request.body
    };
    if let Err(e) = schema::check_body(&descriptor, &message) {
        return refuse(StatusCode::BAD_REQUEST, e, None);
    }
    let started = Instant::now();
    let path = format!("/{}", request.method);
    let answer = match tokio::time::timeout(
        CALL_LIMIT,
        edge.post(
            &path,
            &credential,
            serde_json::to_vec(&message).unwrap_or_default(),
        ),
    )
    .await
    {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return refuse(StatusCode::BAD_GATEWAY, e, None),
        Err(_) => {
            return refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "the edge did not answer in time",
                None,
            );
        }
    };
    let first_byte = started.elapsed();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(relay(answer, tx, started, first_byte));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Reads the edge's answer and sends the browser its lines as they come.
async fn relay(
    answer: http::Response<hyper::body::Incoming>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    started: Instant,
    first_byte: Duration,
) {
    let (parts, mut body) = answer.into_parts();
    let http_status = parts.status.as_u16();
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut trailers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = value.to_str().unwrap_or("(binary)").to_owned();
        match name.as_str().strip_prefix("grpc-trailer-") {
            Some(t) => {
                trailers.insert(t.to_owned(), value);
            }
            None => {
                shown.insert(name.as_str().to_owned(), value);
            }
        }
    }
    let mut status = (0i64, "OK".to_owned(), String::new());
    let mut buffer: Vec<u8> = Vec::new();
    let mut messages = 0usize;
    let mut whole: Vec<u8> = Vec::new();
    let deadline = tokio::time::sleep_until(started + CALL_LIMIT);
    tokio::pin!(deadline);
    let mut failure: Option<String> = None;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut deadline => {
                failure = Some(format!("the call took longer than {}s and was cancelled", CALL_LIMIT.as_secs()));
                break;
            }
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                failure = Some(format!("the edge's answer broke off: {e}"));
                break;
            }
        };
        if let Some(t) = frame.trailers_ref() {
            for (name, value) in t {
                trailers.insert(
                    name.as_str().to_owned(),
                    value.to_str().unwrap_or("(binary)").to_owned(),
                );
            }
        }
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if !streaming {
            if whole.len() + data.len() > MAX_LINE {
                failure = Some(format!("the answer is larger than {MAX_LINE} bytes"));
                break;
            }
            whole.extend_from_slice(data);
            continue;
        }
        buffer.extend_from_slice(data);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let text: Vec<u8> = buffer.drain(..=end).collect();
            let item: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
            if let Some(result) = item.get("result") {
                messages += 1;
                if tx.send(line(&json!({ "message": result }))).await.is_err() {
                    return;
                }
            } else if let Some(error) = item.get("error") {
                status = status_of(error);
            }
        }
        if buffer.len() > MAX_LINE {
            failure = Some(format!(
                "a message of the stream is larger than {MAX_LINE} bytes"
            ));
            break;
        }
        if messages >= MAX_MESSAGES {
            failure = Some(format!("stopped after {MAX_MESSAGES} messages"));
            break;
        }
    }
    if !streaming && failure.is_none() {
        let value: Value = serde_json::from_slice(&whole).unwrap_or(Value::Null);
        if http_status == 200 {
            let _ = tx.send(line(&json!({ "message": value }))).await;
        } else if value.get("code").is_some() {
            status = status_of(&value);
        } else {
            status = (
                2,
                "UNKNOWN".into(),
                format!(
                    "the edge answered HTTP {http_status}: {}",
                    String::from_utf8_lossy(&whole)
                        .chars()
                        .take(300)
                        .collect::<String>()
                ),
            );
        }
    }
    if let Some(why) = failure {
        status = (1, "CANCELLED".into(), why);
    }
    let _ = tx
        .send(line(&json!({ "end": {
            "code": status.0,
            "status": status.1,
            "message": status.2,
            "http_status": http_status,
            "headers": shown,
            "trailers": trailers,
            "first_byte_ms": first_byte.as_secs_f64() * 1000.0,
            "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
        }})))
        .await;
}

fn status_of(error: &Value) -> (i64, String, String) {
    (
        error["code"].as_i64().unwrap_or(2),
        error["status"].as_str().unwrap_or("UNKNOWN").to_owned(),
        error["message"].as_str().unwrap_or("").to_owned(),
    )
}

// ----- the page -----

struct MethodOption {
    full: String,
    label: String,
    selected: bool,
}

struct MethodGroup {
    service: String,
    methods: Vec<MethodOption>,
    problem: Option<String>,
}

#[derive(Template)]
#[template(path = "console.html")]
struct ConsolePage<'a> {
    groups: Vec<MethodGroup>,
    edge: Option<&'a Edge>,
    selected: &'a str,
}

/// Services the console does not offer: the edge answers them itself.
const NOT_OFFERED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// `GET /console?method=…&body=…`: the page; the form is built in the
/// browser from `/api/schema`.
pub async fn page(State(d): State<Arc<Dashboard>>, Query(q): Query<MethodQuery>) -> Response {
    let services: Vec<String> = {
        let mesh = d.mesh.borrow();
        let mut set = std::collections::BTreeSet::new();
        for t in mesh.instances.values() {
            set.extend(t.instance.grpc_services.iter().cloned());
        }
        set.into_iter()
            .filter(|s| !NOT_OFFERED.contains(&s.as_str()))
            .collect()
    };
    let mut groups = Vec::new();
    for service in services {
        let (methods, problem) = match methods_of(&d, &service).await {
            Ok(list) => (
                list.into_iter()
                    .map(|(m, kind)| {
                        let full = format!("{service}/{m}");
                        MethodOption {
                            selected: full == q.method,
                            label: if kind == "unary" {
                                m
                            } else {
                                format!("{m} ({kind})")
                            },
                            full,
                        }
                    })
                    .collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e)),
        };
        groups.push(MethodGroup {
            service,
            methods,
            problem,
        });
    }
    let head = ConsolePage {
        groups,
        edge: d.edge.as_ref(),
        selected: &q.method,
    }
    .render()
    .unwrap_or_else(|e| format!("template error: {e}"));
    let method = (!q.method.is_empty()).then(|| q.method.clone());
    let live = format!("/live/console?method={}", views::query_value(&q.method));
    let fragment = d.fragment(&View::Console(method)).await;
    Html(views::layout("Console", "console", &head, &fragment, &live)).into_response()
}

#[derive(Template)]
#[template(path = "console_live.html")]
struct ConsoleLive {
    method: String,
    service: String,
    serving: String,
    fingerprint: String,
    state: &'static str,
    text: String,
}

/// The live part of the console: who serves the chosen method's service
/// now, and a fingerprint of them that the page watches to rebuild the
/// form when a new version registers.
pub fn fragment(d: &Dashboard, method: Option<&str>) -> String {
    let Some(full) = method.filter(|m| !m.is_empty()) else {
        return String::new();
    };
    let service = full.split_once('/').map(|(s, _)| s).unwrap_or(full);
    let (fingerprint, versions) = servers(d, service);
    let mesh = d.mesh.borrow();
    let (state, text) = match &mesh.source {
        Source::Down { reason, .. } => (
            "down",
            format!(
                "The registry cannot be read ({reason}); the contract shown may be out of date."
            ),
        ),
        _ if versions.is_empty() => (
            "gone",
            format!("No registered instance serves {service} now."),
        ),
        _ => ("ok", String::new()),
    };
    let mut shown = versions.clone();
    shown.dedup();
    ConsoleLive {
        method: full.to_owned(),
        service: mesh.service_of(service).unwrap_or("–").to_owned(),
        serving: format!("{} instance(s), {}", versions.len(), shown.join(", ")),
        fingerprint: format!("{fingerprint:x}"),
        state,
        text,
    }
    .render()
    .unwrap_or_default()
}

/// `GET /live/console?method=…`.
pub async fn live(
    State(d): State<Arc<Dashboard>>,
    Query(q): Query<MethodQuery>,
) -> impl IntoResponse {
    let method = (!q.method.is_empty()).then_some(q.method);
    d.live(View::Console(method))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn credentials_are_one_known_header() {
        assert!(credential(&headers(&[])).unwrap_err().contains("sign in"));
        assert!(
            credential(&headers(&[
                ("x-api-key", "k"),
                ("authorization", "Bearer t")
            ]))
            .is_err()
        );
        assert!(credential(&headers(&[("authorization", "Basic abc")])).is_err());
        assert_eq!(
            credential(&headers(&[("x-api-key", "k")])).unwrap().name,
            "x-api-key"
        );
        assert_eq!(
            credential(&headers(&[("authorization", "Bearer t")]))
                .unwrap()
                .name,
            "authorization"
        );
    }

    #[test]
    fn requests_from_other_sites_are_recognised() {
        assert!(!foreign(&headers(&[("host", "127.0.0.1:8090")])));
        assert!(!foreign(&headers(&[
            ("host", "127.0.0.1:8090"),
            ("origin", "http://127.0.0.1:8090")
        ])));
        assert!(foreign(&headers(&[
            ("host", "127.0.0.1:8090"),
            ("origin", "http://evil.example")
        ])));
    }

    #[test]
    fn method_names_are_checked() {
        assert!(split_method("telco.user.v1.UserService/CreateUser").is_ok());
        for bad in ["", "CreateUser", "a/b", "x.Y/", "x.Y/a/b"] {
            assert!(split_method(bad).is_err(), "{bad}");
        }
    }
}
