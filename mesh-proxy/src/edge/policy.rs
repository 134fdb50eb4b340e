//! Who may call through the edge, and how often: API keys, JWT bearer
//! tokens (HS256, RS256), per-route rules and per-caller token buckets,
//! read from a TOML file at start-up.
//!
//! ```toml
//! # Reflection and health: "public" (the default) or "required".
//! reflection = "public"
//! health = "public"
//!
//! # Failed authentications (a bad key or token) allowed per client IP:
//! # this many at once, earned back at this rate (default 10 a minute).
//! # Past them, that IP's credentials are refused with RESOURCE_EXHAUSTED,
//! # unchecked, until it has earned one back.
//! failed_auth_per_minute = 10
//! # Callers tracked per rate-limited route (default 100000); see below.
//! max_tracked_callers = 100000
//!
//! # API keys: callers send `x-api-key: <key>`. Only the SHA-256 of a key
//! # is stored (hex, as `printf %s "$KEY" | sha256sum` prints it).
//! [[api_key]]
//! name = "ci-bot"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!
//! # JWT bearer tokens: callers send `authorization: Bearer <token>`.
//! [jwt]
//! issuer = "https://auth.example.com"   # `iss` must equal it
//! audience = "trellis-edge"             # `aud` must contain it
//! hs256_secret_file = "jwt-secret"      # HS256 shared secret (file bytes, trailing newline trimmed)
//! rs256_public_key_file = "jwt.pub.pem" # RS256 public key (PEM); at least one of the two
//! leeway_seconds = 5                    # tolerance for exp and nbf (default 5)
//!
//! # Routes: the most specific match wins: "pkg.Service/Method", then
//! # "pkg.Service", then "*". A call no route matches needs credentials.
//! [[route]]
//! match = "trellis.echo.v1.EchoService/Echo"
//! auth = "public"          # or "required"
//! rate_per_second = 5.0    # optional: token bucket refill, per caller
//! burst = 10               # optional: bucket size (default: rate rounded up)
//! ```
//!
//! Rate limits and failed-authentication limits keep one small entry per
//! caller (verified name, else client IP), at most `max_tracked_callers`
//! per route (and as many client IPs for failed authentications). A full
//! table first forgets callers whose bucket has refilled (nothing is lost:
//! a new bucket is full too); while it stays full of active callers, new
//! callers share one bucket of the route's rate, and a warning is logged
//! once.
//!
//! Relative key file paths are read from the policy file's directory.
//! Credentials a caller sends are always checked, even on a public route:
//! a bad key or token is refused rather than silently ignored. No message
//! or log line ever contains a key or a token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use tonic::Code;

use super::limit::KeyedBuckets;

/// Failed authentications per client IP per minute, by default.
const DEFAULT_FAILED_AUTH_PER_MINUTE: u32 = 10;
/// Callers tracked per rate-limited route (and client IPs with failed
/// authentications), by default: at about a hundred bytes each, ten
/// megabytes at most per table.
const DEFAULT_MAX_TRACKED_CALLERS: usize = 100_000;

/// What the edge is asked to do.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A call into the mesh.
    Call {
        /// The gRPC service.
        service: &'a str,
        /// The method.
        method: &'a str,
    },
    /// Server reflection (v1 or v1alpha).
    Reflection,
    /// grpc.health.v1 at the edge.
    Health,
}

/// A verified external caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// How it was verified.
    pub kind: PrincipalKind,
    /// The key's name or the token's subject.
    pub name: String,
}

/// How a caller was verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrincipalKind {
    /// An API key.
    ApiKey,
    /// A JWT bearer token.
    Jwt,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            PrincipalKind::ApiKey => write!(f, "api-key:{}", self.name),
            PrincipalKind::Jwt => write!(f, "jwt:{}", self.name),
        }
    }
}

/// A refusal: UNAUTHENTICATED or RESOURCE_EXHAUSTED, with the reason.
#[derive(Clone, Debug)]
pub struct Rejection {
    /// The gRPC code.
    pub code: Code,
    /// What was wrong, for a person.
    pub message: String,
}

fn unauthenticated(message: impl Into<String>) -> Rejection {
    Rejection {
        code: Code::Unauthenticated,
        message: message.into(),
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Auth {
    #[default]
    Public,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    reflection: Auth,
    #[serde(default)]
    health: Auth,
    failed_auth_per_minute: Option<u32>,
    max_tracked_callers: Option<usize>,
    #[serde(default)]
    api_key: Vec<ApiKeyEntry>,
    jwt: Option<JwtEntry>,
    #[serde(default)]
    route: Vec<RouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    name: String,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtEntry {
    issuer: String,
    audience: String,
    hs256_secret_file: Option<PathBuf>,
    rs256_public_key_file: Option<PathBuf>,
    #[serde(default = "default_leeway")]
    leeway_seconds: u64,
}

fn default_leeway() -> u64 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    #[serde(rename = "match")]
    pattern: String,
    auth: Auth,
    rate_per_second: Option<f64>,
    burst: Option<u32>,
}

struct Jwt {
    issuer: String,
    audience: String,
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    leeway: u64,
}

struct Route {
    pattern: String,
    auth: Auth,
    limit: Option<Limit>,
}

struct Limit {
    rate: f64,
    burst: u32,
    buckets: KeyedBuckets<String>,
}

/// The edge's authentication and rate-limiting rules.
pub struct EdgePolicy {
    reflection: Auth,
    health: Auth,
    /// SHA-256 of a key to its name.
    keys: HashMap<[u8; 32], String>,
    jwt: Option<Jwt>,
    routes: HashMap<String, Route>,
    /// Failed authentications per client IP.
    failures: KeyedBuckets<IpAddr>,
}

impl std::fmt::Debug for EdgePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

fn failure_buckets(per_minute: u32, max_keys: usize) -> KeyedBuckets<IpAddr> {
    KeyedBuckets::new(
        f64::from(per_minute) / 60.0,
        per_minute,
        max_keys,
        "failed authentications per client IP".to_owned(),
    )
}

impl EdgePolicy {
    /// No file: everything public, no limits (local development).
    pub fn development() -> Self {
        Self {
            reflection: Auth::Public,
            health: Auth::Public,
            keys: HashMap::new(),
            jwt: None,
            routes: HashMap::from([(
                "*".to_owned(),
                Route {
                    pattern: "*".to_owned(),
                    auth: Auth::Public,
                    limit: None,
                },
            )]),
            failures: failure_buckets(DEFAULT_FAILED_AUTH_PER_MINUTE, DEFAULT_MAX_TRACKED_CALLERS),
        }
    }

    /// Reads and checks the policy file; errors name the file, the line
    /// and the bad value.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("edge policy {}: cannot read", path.display()))?;
        let file: File = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start].matches('\n').count() + 1)
                .unwrap_or(0);
            anyhow::anyhow!(
                "edge policy {}, line {line}: {}",
                path.display(),
                e.message()
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, base)
            .map_err(|e| anyhow::anyhow!("edge policy {}: {e:#}", path.display()))
    }

    fn from_file(file: File, base: &Path) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for key in file.api_key {
            if key.name.is_empty() || key.name.chars().any(|c| c.is_control()) {
                bail!(
                    "api_key name {:?} must be non-empty printable text",
                    key.name
                );
            }
            let digest = parse_hex32(&key.sha256).with_context(|| {
                format!(
                    "api_key {:?}: sha256 {:?} is not 64 hex digits",
                    key.name, key.sha256
                )
            })?;
            if !names.insert(key.name.clone()) {
                bail!("api_key {:?} is listed twice", key.name);
            }
            if keys.insert(digest, key.name.clone()).is_some() {
                bail!("api_key {:?} has the same key as another entry", key.name);
            }
        }
        let jwt = match file.jwt {
            None => None,
            Some(entry) => {
                if entry.issuer.is_empty() || entry.audience.is_empty() {
                    bail!("[jwt] needs a non-empty issuer and audience");
                }
                let read = |p: &Path| -> anyhow::Result<Vec<u8>> {
                    let full = base.join(p);
                    std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))
                };
                let hs256 = match &entry.hs256_secret_file {
                    Some(p) => {
                        let mut secret = read(p)?;
                        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            secret.pop();
                        }
                        if secret.is_empty() {
                            bail!("hs256_secret_file {} is empty", p.display());
                        }
                        Some(DecodingKey::from_secret(&secret))
                    }
                    None => None,
                };
                let rs256 = match &entry.rs256_public_key_file {
                    Some(p) => Some(DecodingKey::from_rsa_pem(&read(p)?).with_context(|| {
                        format!(
                            "rs256_public_key_file {} is not an RSA public key in PEM",
                            p.display()
                        )
                    })?),
                    None => None,
                };
                if hs256.is_none() && rs256.is_none() {
                    bail!("[jwt] needs hs256_secret_file or rs256_public_key_file");
                }
                Some(Jwt {
                    issuer: entry.issuer,
                    audience: entry.audience,
                    hs256,
                    rs256,
                    leeway: entry.leeway_seconds,
                })
            }
        };
        let max_callers = file
            .max_tracked_callers
            .unwrap_or(DEFAULT_MAX_TRACKED_CALLERS);
        if max_callers == 0 {
            bail!("max_tracked_callers must be at least 1");
        }
        let failed_auth = file
            .failed_auth_per_minute
            .unwrap_or(DEFAULT_FAILED_AUTH_PER_MINUTE);
        if failed_auth == 0 {
            bail!("failed_auth_per_minute must be at least 1");
        }
        let mut routes = HashMap::new();
        for r in file.route {
            check_pattern(&r.pattern)?;
            let limit = match (r.rate_per_second, r.burst) {
                (None, None) => None,
                (None, Some(_)) => bail!("route {:?}: burst needs rate_per_second", r.pattern),
                (Some(rate), burst) => {
                    if !rate.is_finite() || rate <= 0.0 {
                        bail!(
                            "route {:?}: rate_per_second {rate} must be above 0",
                            r.pattern
                        );
                    }
                    let burst = burst.unwrap_or_else(|| rate.ceil().max(1.0) as u32);
                    if burst == 0 {
                        bail!("route {:?}: burst must be at least 1", r.pattern);
                    }
                    // Under a nanosecond per token cannot be timed.
                    if rate > 1e9 {
                        bail!("route {:?}: rate_per_second {rate} is too high", r.pattern);
                    }
                    if rate < 1.0 / 86_400.0 {
                        bail!(
                            "route {:?}: rate_per_second {rate} is below one a day",
                            r.pattern
                        );
                    }
                    Some(Limit {
                        rate,
                        burst,
                        buckets: KeyedBuckets::new(
                            rate,
                            burst,
                            max_callers,
                            format!("route {}", r.pattern),
                        ),
                    })
                }
            };
            let route = Route {
                pattern: r.pattern.clone(),
                auth: r.auth,
                limit,
            };
            if routes.insert(r.pattern.clone(), route).is_some() {
                bail!("route {:?} is listed twice", r.pattern);
            }
        }
        Ok(Self {
            reflection: file.reflection,
            health: file.health,
            keys,
            jwt,
            routes,
            failures: failure_buckets(failed_auth, max_callers),
        })
    }

    /// A short summary for the start-up log.
    pub fn summary(&self) -> String {
        let mut algs = Vec::new();
        if let Some(j) = &self.jwt {
            if j.hs256.is_some() {
                algs.push("HS256");
            }
            if j.rs256.is_some() {
                algs.push("RS256");
            }
        }
        format!(
            "{} API keys, JWT ({}), {} routes, reflection {:?}, health {:?}",
            self.keys.len(),
            if algs.is_empty() {
                "off".to_owned()
            } else {
                algs.join(", ")
            },
            self.routes.len(),
            self.reflection,
            self.health
        )
    }

    fn route(&self, service: &str, method: &str) -> Option<&Route> {
        if self.routes.len() == 1
            && let Some(r) = self.routes.get("*")
        {
            return Some(r);
        }
        self.routes
            .get(&format!("{service}/{method}"))
            .or_else(|| self.routes.get(service))
            .or_else(|| self.routes.get("*"))
    }

    /// Decides about one request from `peer`: admitted anonymously
    /// (`Ok(None)`), admitted as a verified caller, or refused.
    pub fn admit(
        &self,
        target: Target<'_>,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Result<Option<Principal>, Rejection> {
        self.admit_at(target, headers, peer, Instant::now())
    }

    fn admit_at(
        &self,
        target: Target<'_>,
        headers: &HeaderMap,
        peer: IpAddr,
        now: Instant,
    ) -> Result<Option<Principal>, Rejection> {
        // An IP that has failed too often is not checked again (checking
        // a token costs a signature verification, and every failure a log
        // line) until it has earned a try back. Only callers that send
        // credentials are held back: public routes stay open.
        let sends_credentials =
            headers.contains_key("x-api-key") || headers.contains_key(http::header::AUTHORIZATION);
        if sends_credentials && let Err(empty) = self.failures.peek(&peer, now) {
            return Err(Rejection {
                code: Code::ResourceExhausted,
                message: format!(
                    "too many failed authentications from {peer}; retry in {}s",
                    whole_seconds(empty.retry_after)
                ),
            });
        }
        let principal = match self.verify(headers) {
            Ok(principal) => principal,
            Err(rejection) => {
                let _ = self.failures.check(&peer, now);
                return Err(rejection);
            }
        };
        let (auth, route, what) = match target {
            Target::Call { service, method } => match self.route(service, method) {
                Some(r) => (r.auth, Some(r), "this method"),
                None => (Auth::Required, None, "this method"),
            },
            Target::Reflection => (self.reflection, None, "reflection"),
            Target::Health => (self.health, None, "health"),
        };
        if auth == Auth::Required && principal.is_none() {
            return Err(unauthenticated(format!(
                "{what} needs credentials: send x-api-key: <key> or authorization: Bearer <JWT>"
            )));
        }
        if let Some(Route {
            pattern,
            limit: Some(limit),
            ..
        }) = route
        {
            let key = match &principal {
                Some(p) => p.to_string(),
                None => format!("ip:{peer}"),
            };
            if let Err(empty) = limit.buckets.check(&key, now) {
                let whose = if empty.shared {
                    "shared by new callers while the edge tracks as many callers as it may"
                } else {
                    "per caller"
                };
                return Err(Rejection {
                    code: Code::ResourceExhausted,
                    message: format!(
                        "rate limit for {pattern} exceeded: {}/s with bursts of {} {whose}; retry in {}s",
                        limit.rate,
                        limit.burst,
                        whole_seconds(empty.retry_after)
                    ),
                });
            }
        }
        Ok(principal)
    }

    /// Checks whatever credentials were sent.
    fn verify(&self, headers: &HeaderMap) -> Result<Option<Principal>, Rejection> {
        let key = headers.get("x-api-key");
        let authorization = headers.get(http::header::AUTHORIZATION);
        match (key, authorization) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(unauthenticated(
                "send either x-api-key or authorization, not both",
            )),
            (Some(key), None) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
                let digest: [u8; 32] = digest.as_ref().try_into().unwrap_or([0; 32]);
                match self.keys.get(&digest) {
                    Some(name) => Ok(Some(Principal {
                        kind: PrincipalKind::ApiKey,
                        name: name.clone(),
                    })),
                    None => Err(unauthenticated("unknown API key")),
                }
            }
            (None, Some(value)) => {
                let text = value
                    .to_str()
                    .map_err(|_| unauthenticated("the authorization header is not text"))?;
                let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
                if !scheme.eq_ignore_ascii_case("bearer") {
                    // Only a known scheme is named: a header with no scheme
                    // is often a raw secret, which must not be echoed.
                    const KNOWN: [&str; 5] = ["Basic", "Digest", "Negotiate", "NTLM", "Token"];
                    return Err(unauthenticated(
                        match KNOWN.iter().find(|k| k.eq_ignore_ascii_case(scheme)) {
                            Some(k) => format!(
                                "authorization scheme {k} is not accepted; send authorization: Bearer <JWT>"
                            ),
                            None => "the authorization header must be \"Bearer <JWT>\"".to_owned(),
                        },
                    ));
                }
                let Some(jwt) = &self.jwt else {
                    return Err(unauthenticated("this edge does not accept JWTs"));
                };
                jwt.verify(token.trim()).map(Some)
            }
        }
    }
}

impl Jwt {
    fn verify(&self, token: &str) -> Result<Principal, Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthenticated(format!("malformed token: {}", describe(&e))))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().ok_or_else(|| {
                unauthenticated("token is signed with HS256 but this edge has no HS256 secret")
            })?,
            Algorithm::RS256 => self.rs256.as_ref().ok_or_else(|| {
                unauthenticated("token is signed with RS256 but this edge has no RS256 key")
            })?,
            other => {
                return Err(unauthenticated(format!(
                    "token algorithm {other:?} is not accepted (HS256 or RS256)"
                )));
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        #[derive(Deserialize)]
        struct Claims {
            sub: Option<String>,
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            unauthenticated(match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".to_owned(),
                ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
                ErrorKind::InvalidSignature => {
                    "token signature does not verify (tampered or signed with another key)"
                        .to_owned()
                }
                ErrorKind::InvalidIssuer => format!("token issuer is not {}", self.issuer),
                ErrorKind::InvalidAudience => {
                    format!("token audience does not include {}", self.audience)
                }
                ErrorKind::MissingRequiredClaim(claim) => format!("token has no {claim} claim"),
                _ => format!("malformed token: {}", describe(&e)),
            })
        })?;
        match data.claims.sub {
            Some(sub) if !sub.is_empty() => Ok(Principal {
                kind: PrincipalKind::Jwt,
                name: sub,
            }),
            _ => Err(unauthenticated("token has no sub claim")),
        }
    }
}

/// An error's text without anything from the token itself.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::InvalidToken => "not three base64url parts".to_owned(),
        ErrorKind::Base64(_) => "a part is not base64url".to_owned(),
        ErrorKind::Json(_) => "a part is not the JSON expected".to_owned(),
        ErrorKind::Utf8(_) => "a part is not UTF-8".to_owned(),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "unsupported algorithm".to_owned()
        }
        other => format!("{other:?}"),
    }
}

/// `d` in whole seconds, rounded up (a retry sooner would be refused).
fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn check_pattern(pattern: &str) -> anyhow::Result<()> {
    if pattern == "*" {
        return Ok(());
    }
    let (service, method) = match pattern.split_once('/') {
        Some((s, m)) => (s, Some(m)),
        None => (pattern, None),
    };
    let bad_service = service.is_empty() || !service.contains('.') || service.contains('*');
    let bad_method = method.is_some_and(|m| m.is_empty() || m.contains('/') || m.contains('*'));
    if bad_service || bad_method {
        bail!("route match {pattern:?} is not \"pkg.Service/Method\", \"pkg.Service\" or \"*\"");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> anyhow::Result<EdgePolicy> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret-for-tests\n").unwrap();
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).unwrap();
        EdgePolicy::load(&path)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn call<'a>(service: &'a str, method: &'a str) -> Target<'a> {
        Target::Call { service, method }
    }

    fn sha(text: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn bad_files_are_refused_naming_line_and_value() {
        let e = policy("reflection = \"open\"\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = policy("\n\nunknown = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = policy("[[api_key]]\nname = \"a\"\nsha256 = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"abc\""), "{e}");
        for (text, want) in [
            (
                "[[route]]\nmatch = \"Echo\"\nauth = \"public\"\n",
                "\"Echo\"",
            ),
            (
                "[[route]]\nmatch = \"a.S\"\nauth = \"public\"\nrate_per_second = 0.0\n",
                "above 0",
            ),
            (
                "[[route]]\nmatch = \"a.S\"\nauth = \"public\"\nrate_per_second = 1.0\nburst = 0\n",
                "at least 1",
            ),
            (
                "[[route]]\nmatch = \"a.S\"\nauth = \"public\"\n[[route]]\nmatch = \"a.S\"\nauth = \"required\"\n",
                "twice",
            ),
            (
                "[jwt]\nissuer = \"i\"\naudience = \"a\"\n",
                "hs256_secret_file",
            ),
            (
                "[jwt]\nissuer = \"i\"\naudience = \"a\"\nrs256_public_key_file = \"missing.pem\"\n",
                "missing.pem",
            ),
        ] {
            let e = format!("{:#}", policy(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn api_keys_and_route_specificity() {
        let p = policy(&format!(
            "[[api_key]]\nname = \"ci\"\nsha256 = \"{}\"\n\
             [[route]]\nmatch = \"a.v1.S/Open\"\nauth = \"public\"\n\
             [[route]]\nmatch = \"a.v1.S\"\nauth = \"required\"\n\
             [[route]]\nmatch = \"*\"\nauth = \"public\"\n",
            sha("the-key")
        ))
        .unwrap();
        let none = HeaderMap::new();
        assert_eq!(p.admit(call("a.v1.S", "Open"), &none, LOCAL).unwrap(), None);
        assert!(
            p.admit(call("b.v1.T", "Any"), &none, LOCAL)
                .unwrap()
                .is_none()
        );
        let e = p.admit(call("a.v1.S", "Closed"), &none, LOCAL).unwrap_err();
        assert_eq!(e.code, Code::Unauthenticated);
        assert!(e.message.contains("needs credentials"));
        let good = headers(&[("x-api-key", "the-key")]);
        assert_eq!(
            p.admit(call("a.v1.S", "Closed"), &good, LOCAL)
                .unwrap()
                .unwrap()
                .to_string(),
            "api-key:ci"
        );
        // Bad credentials are refused even where none are needed.
        let bad = headers(&[("x-api-key", "guess")]);
        let e = p.admit(call("a.v1.S", "Open"), &bad, LOCAL).unwrap_err();
        assert_eq!(e.message, "unknown API key");
        let both = headers(&[("x-api-key", "the-key"), ("authorization", "Bearer x")]);
        assert!(p.admit(call("a.v1.S", "Open"), &both, LOCAL).is_err());
        let basic = headers(&[("authorization", "Basic dXNlcg==")]);
        let e = p.admit(call("a.v1.S", "Open"), &basic, LOCAL).unwrap_err();
        assert!(e.message.contains("Basic"), "{}", e.message);
        let raw = headers(&[("authorization", "s3cr3t-raw-token-value")]);
        let e = p.admit(call("a.v1.S", "Open"), &raw, LOCAL).unwrap_err();
        assert!(!e.message.contains("s3cr3t"), "{}", e.message);
        assert!(parse_hex32(&"+f".repeat(32)).is_none());
    }

    #[test]
    fn hs256_tokens_are_checked() {
        let p = policy(
            "[jwt]\nissuer = \"iss\"\naudience = \"aud\"\nhs256_secret_file = \"secret\"\n\
             [[route]]\nmatch = \"*\"\nauth = \"required\"\n",
        )
        .unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let sign = |claims: serde_json::Value, alg: Algorithm, secret: &[u8]| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(alg),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        let check = |token: &str| {
            p.admit(
                call("a.v1.S", "M"),
                &headers(&[("authorization", &format!("Bearer {token}"))]),
                LOCAL,
            )
        };
        let secret = b"s3cret-for-tests";
        let good = serde_json::json!({"sub": "alice", "iss": "iss", "aud": "aud", "exp": now + 60});
        let ok = check(&sign(good.clone(), Algorithm::HS256, secret))
            .unwrap()
            .unwrap();
        assert_eq!(ok.to_string(), "jwt:alice");
        for (claims, alg, key, want) in [
            (
                serde_json::json!({"sub": "a", "iss": "iss", "aud": "aud", "exp": now - 120}),
                Algorithm::HS256,
                &secret[..],
                "expired",
            ),
            (
                serde_json::json!({"sub": "a", "iss": "other", "aud": "aud", "exp": now + 60}),
                Algorithm::HS256,
                &secret[..],
                "issuer",
            ),
            (
                serde_json::json!({"sub": "a", "iss": "iss", "aud": "other", "exp": now + 60}),
                Algorithm::HS256,
                &secret[..],
                "audience",
            ),
            (
                serde_json::json!({"iss": "iss", "aud": "aud", "exp": now + 60}),
                Algorithm::HS256,
                &secret[..],
                "sub",
            ),
            (
                good.clone(),
                Algorithm::HS256,
                &b"another secret"[..],
                "signature",
            ),
            (good.clone(), Algorithm::HS512, &secret[..], "HS512"),
        ] {
            let e = check(&sign(claims, alg, key)).unwrap_err();
            assert_eq!(e.code, Code::Unauthenticated);
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
        let e = check("abc").unwrap_err();
        assert!(e.message.starts_with("malformed token"), "{}", e.message);
        // alg "none" with no signature.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhIn0"
        );
        assert!(check(&none).is_err());
    }

    #[test]
    fn failed_authentications_are_limited_per_ip() {
        let p = policy(&format!(
            "failed_auth_per_minute = 2\n\
             [[api_key]]\nname = \"ci\"\nsha256 = \"{}\"\n\
             [[route]]\nmatch = \"*\"\nauth = \"public\"\n",
            sha("the-key")
        ))
        .unwrap();
        let t0 = Instant::now();
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        let bad = headers(&[("x-api-key", "guess")]);
        let good = headers(&[("x-api-key", "the-key")]);
        let none = HeaderMap::new();
        let at = |h: &HeaderMap, ip, t| p.admit_at(call("a.v1.S", "M"), h, ip, t);
        for _ in 0..2 {
            assert_eq!(at(&bad, LOCAL, t0).unwrap_err().code, Code::Unauthenticated);
        }
        // Now even the right key is not checked, and the message says
        // when to come back; other IPs and anonymous calls are unaffected.
        let e = at(&good, LOCAL, t0).unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(e.message.contains("retry in 30s"), "{}", e.message);
        assert!(at(&none, LOCAL, t0).is_ok());
        assert!(at(&good, other, t0).unwrap().is_some());
        // One try is earned back every 30 s.
        let t1 = t0 + std::time::Duration::from_secs(30);
        assert!(at(&good, LOCAL, t1).unwrap().is_some());
        assert!(policy("failed_auth_per_minute = 0\n").is_err());
        assert!(policy("max_tracked_callers = 0\n").is_err());
    }

    #[test]
    fn rate_limits_share_a_bucket_once_full_of_active_callers() {
        let p = policy(
            "max_tracked_callers = 1\n\
             [[route]]\nmatch = \"*\"\nauth = \"public\"\nrate_per_second = 1.0\nburst = 1\n",
        )
        .unwrap();
        let t0 = Instant::now();
        let ip = |n| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n));
        let none = HeaderMap::new();
        let at = |n, t| p.admit_at(call("a.v1.S", "M"), &none, ip(n), t);
        assert!(at(1, t0).is_ok());
        assert!(at(2, t0).is_ok());
        let e = at(3, t0).unwrap_err();
        assert!(e.message.contains("shared by new callers"), "{}", e.message);
        assert!(e.message.contains("retry in 1s"), "{}", e.message);
    }

    #[test]
    fn rate_limits_are_per_caller_and_route() {
        let p = policy(
            "[[route]]\nmatch = \"a.v1.S\"\nauth = \"public\"\nrate_per_second = 1.0\nburst = 2\n",
        )
        .unwrap();
        let none = HeaderMap::new();
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        assert!(p.admit(call("a.v1.S", "M"), &none, LOCAL).is_ok());
        assert!(p.admit(call("a.v1.S", "M"), &none, LOCAL).is_ok());
        let e = p.admit(call("a.v1.S", "M"), &none, LOCAL).unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(e.message.contains("a.v1.S"), "{}", e.message);
        assert!(p.admit(call("a.v1.S", "M"), &none, other).is_ok());
        // Reflection and health are never rate limited, and unmatched
        // calls need credentials.
        assert!(p.admit(Target::Reflection, &none, LOCAL).is_ok());
        assert!(p.admit(call("b.v1.T", "M"), &none, LOCAL).is_err());
    }
}
