//! gRPC over HTTP/2 as the proxy sees it: paths, statuses, `grpc-timeout`,
//! and the trailers-only responses the proxy answers with itself.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tonic::Code;

/// The header that carries the verified caller's SPIFFE ID to a service.
/// The inbound side sets it from the peer certificate; whatever a caller
/// sent under this name is removed first, on both sides.
pub const CALLER_HEADER: &str = "x-trellis-caller";
/// Picks the version of the callee a call goes to, when the caller is one
/// its configuration trusts with it (`traffic.version_header_callers`);
/// removed by the caller's sidecar in every case.
pub const VERSION_HEADER: &str = "x-trellis-version";

/// The external caller an edge verified (`api-key:<name>` or
/// `jwt:<subject>`). Every port that sends into the mesh (a sidecar's or
/// an edge's outbound port, and the edge) removes whatever its caller sent
/// under this name; only the edge sets it, from the principal it verified;
/// an inbound proxy passes it to its service only on calls from a trusted
/// edge identity.
pub const PRINCIPAL_HEADER: &str = "x-trellis-principal";

/// Set by an inbound proxy on an UNAVAILABLE it answered because the local
/// service could not be reached at all: the request never reached
/// application code, so the caller's side may retry it on another endpoint
/// whatever the method.
pub const UNPROCESSED_HEADER: &str = "x-trellis-unprocessed";

/// Headers that only a proxy may put on a response: an inbound proxy
/// removes them from whatever the local service answers, so that a service
/// cannot, say, make its caller's sidecar replay a call that is not safe
/// to repeat by claiming it was never processed.
pub const PROXY_RESPONSE_HEADERS: [&str; 3] = [UNPROCESSED_HEADER, CALLER_HEADER, PRINCIPAL_HEADER];

/// A server's request not to retry (negative) or to wait before retrying.
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// `/package.Service/Method`, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcPath<'a> {
    /// The fully qualified gRPC service, `package.Service`.
    pub service: &'a str,
    /// The method name.
    pub method: &'a str,
}

impl<'a> GrpcPath<'a> {
    /// Parses a request path; `None` unless it is `/<service>/<method>`
    /// with both parts non-empty.
    pub fn parse(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix('/')?;
        let (service, method) = rest.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        Some(Self { service, method })
    }
}

/// The method a call names, kept as the request's own `:path` (shared, not
/// copied) with the position of the slash between service and method.
#[derive(Clone, Debug)]
pub struct GrpcMethod {
    path: http::uri::PathAndQuery,
    slash: usize,
}

impl GrpcMethod {
    /// The method `path` names; `None` unless it is `/<service>/<method>`.
    pub fn parse(path: &http::uri::PathAndQuery) -> Option<Self> {
        let parsed = GrpcPath::parse(path.path())?;
        Some(Self {
            path: path.clone(),
            slash: 1 + parsed.service.len(),
        })
    }

    /// The fully qualified gRPC service, `package.Service`.
    pub fn service(&self) -> &str {
        &self.path.path()[1..self.slash]
    }

    /// The method name.
    pub fn method(&self) -> &str {
        &self.path.path()[self.slash + 1..]
    }

    /// The request's path (and query, as sent).
    pub fn path(&self) -> &http::uri::PathAndQuery {
        &self.path
    }
}

/// The gRPC method a request calls, or the answer to give a request that
/// is not a gRPC call (`side` names the port in the message).
pub fn method_of<'a, B, R: Default>(
    request: &'a http::Request<B>,
    side: &str,
) -> Result<GrpcPath<'a>, Response<R>> {
    if !is_grpc(request.headers()) {
        return Err(not_grpc_response(side));
    }
    GrpcPath::parse(request.uri().path()).ok_or_else(|| {
        status_response(
            Code::Unimplemented,
            &format!(
                "{:?} is not a gRPC method path (/package.Service/Method)",
                request.uri().path()
            ),
        )
    })
}

/// Whether the request's content type is gRPC (`application/grpc`,
/// optionally `+proto`, `+json`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

/// Parses a `grpc-timeout` value (`<1-8 digits><H|M|S|m|u|n>`).
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes `d` for `grpc-timeout`, in the finest unit that fits in the
/// eight digits the protocol allows (rounding up, so a deadline is never
/// made shorter than it is... nor zero).
pub fn encode_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos().max(1);
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (size, unit) in units {
        let n = nanos.div_ceil(size);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("ASCII digits and unit");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The gRPC status in a header map (`grpc-status`), if any.
pub fn status_of(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// The gRPC code a non-200 HTTP response stands for (the mapping in the
/// gRPC HTTP/2 protocol spec).
pub fn code_for_http(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Percent-encodes a `grpc-message` as the protocol requires.
fn encode_message(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("percent-encoded text is a valid header")
}

/// The `grpc-message` in `headers`, percent-decoded (empty if none).
pub fn message_of(headers: &HeaderMap) -> String {
    let Some(raw) = headers.get("grpc-message") else {
        return String::new();
    };
    let raw = raw.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Adds `grpc-status` and `grpc-message` to `headers`.
pub fn set_status(headers: &mut HeaderMap, code: Code, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code as i32));
    if !message.is_empty() {
        headers.insert("grpc-message", encode_message(message));
    }
}

/// A trailers-only gRPC response carrying `code` and `message`: what the
/// proxy answers when it ends a call itself.
pub fn status_response<B: Default>(code: Code, message: &str) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    set_status(headers, code, message);
    response
}

/// The answer to a request that is not gRPC at all: HTTP 415, as the gRPC
/// spec asks, still carrying a gRPC status for clients that look.
pub fn not_grpc_response<B: Default>(what: &str) -> Response<B> {
    let mut response = status_response(
        Code::InvalidArgument,
        &format!("{what} accepts only gRPC (content-type application/grpc)"),
    );
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response
}

/// The gRPC code's canonical name (`UNAVAILABLE`), as used in config files
/// and metrics labels.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Parses a canonical code name (`UNAVAILABLE`, case-insensitive) or number.
pub fn parse_code(text: &str) -> Option<Code> {
    if let Ok(n) = text.parse::<i32>() {
        return (0..=16).contains(&n).then(|| Code::from_i32(n));
    }
    (0..=16)
        .map(Code::from_i32)
        .find(|c| code_name(*c).eq_ignore_ascii_case(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        let p = GrpcPath::parse("/telco.usage.v1.UsageService/RecordUsage").unwrap();
        assert_eq!(p.service, "telco.usage.v1.UsageService");
        assert_eq!(p.method, "RecordUsage");
        for bad in ["", "/", "//", "/a", "/a/", "//m", "/a/b/c", "a/b"] {
            assert!(GrpcPath::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_method_shares_the_request_path() {
        let path = http::uri::PathAndQuery::from_static("/telco.usage.v1.UsageService/RecordUsage");
        let m = GrpcMethod::parse(&path).unwrap();
        assert_eq!(m.service(), "telco.usage.v1.UsageService");
        assert_eq!(m.method(), "RecordUsage");
        assert_eq!(m.path(), &path);
        let bad = http::uri::PathAndQuery::from_static("/a/b/c");
        assert!(GrpcMethod::parse(&bad).is_none());
    }

    #[test]
    fn timeouts_round_trip_without_shrinking() {
        for (text, d) in [
            ("200m", Duration::from_millis(200)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
            ("5u", Duration::from_micros(5)),
        ] {
            assert_eq!(parse_timeout(&HeaderValue::from_static(text)), Some(d));
        }
        for bad in ["", "m", "10", "123456789m", "-1m", "1x", "1.5S"] {
            assert_eq!(parse_timeout(&HeaderValue::from_static(bad)), None, "{bad}");
        }
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(199),
            Duration::from_secs(2),
            Duration::from_secs(3 * 86_400),
        ] {
            let back = parse_timeout(&encode_timeout(d)).unwrap();
            assert!(back >= d, "{d:?} -> {back:?}");
        }
        assert_eq!(encode_timeout(Duration::ZERO), "1n");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no endpoints: 100%"), "no endpoints: 100%25");
        assert_eq!(encode_message("caf\u{e9}"), "caf%C3%A9");
        let mut headers = HeaderMap::new();
        set_status(&mut headers, Code::NotFound, "caf\u{e9} at 100% (no %zz)");
        assert_eq!(message_of(&headers), "caf\u{e9} at 100% (no %zz)");
    }

    #[test]
    fn code_names_parse_back() {
        assert_eq!(parse_code("unavailable"), Some(Code::Unavailable));
        assert_eq!(parse_code("14"), Some(Code::Unavailable));
        assert_eq!(parse_code("NOPE"), None);
        assert_eq!(parse_code("17"), None);
    }
}
