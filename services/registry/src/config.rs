//! Configuration for services and proxies, read from a directory of TOML
//! files and served live.
//!
//! `defaults.toml` holds mesh-wide defaults; `<service>.toml` the policies
//! and settings of one mesh service. The directory is re-read every
//! [`POLL_INTERVAL`]; a changed file that is valid replaces its previous
//! version and bumps the revision, which every watcher then receives. A file
//! that is not valid is rejected whole, with its file, line and reason
//! reported by GetConfigStatus and logged, and its last good version stays
//! in force. Rules naming methods that no registered contract defines, and
//! version splits naming versions no instance serves, are reported the same
//! way (the entry stays, since the contract or the instances may register
//! later).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use toml::Spanned;
use tonic::{Request, Response, Status};
use trellis::pb::trellis::config::v1 as pb;

use crate::quota::WatchPermit;
use crate::registry::{Declaration, Registry};
use crate::xds::XdsStats;
use crate::{proto_duration, validate};

/// How often the directory is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The file holding mesh-wide defaults.
pub const DEFAULTS_FILE: &str = "defaults.toml";

/// Built-in values, used where no file sets a field (of a route, or of a
/// table a file gives).
mod builtin {
    use std::time::Duration;
    pub const MAX_ATTEMPTS: u32 = 3;
    pub const RETRYABLE: &[&str] = &["UNAVAILABLE"];
    pub const INITIAL_BACKOFF: Duration = Duration::from_millis(25);
    pub const MAX_BACKOFF: Duration = Duration::from_millis(250);
    pub const BUDGET_RATIO: f64 = 0.2;
    pub const MAX_BUFFERED_BYTES: u32 = 64 * 1024;
    pub const HEDGE_ATTEMPTS: u32 = 2;
    pub const MAX_QUEUED: u32 = 0;
    pub const CONSECUTIVE_FAILURES: u32 = 5;
    pub const FAILURE_RATE: f64 = 0.5;
    pub const MINIMUM_CALLS: u32 = 20;
    pub const WINDOW: Duration = Duration::from_secs(10);
    pub const OPEN_FOR: Duration = Duration::from_secs(5);
    pub const HALF_OPEN_CALLS: u32 = 1;
}

/// Bounds on traffic-management values. Each is far beyond what one
/// sidecar can use (a hedge past five copies multiplies load rather than
/// cutting latency; a hundred thousand calls in flight exhausts any
/// service), so a value over it is a typo reported with its line.
mod bounds {
    use std::ops::RangeInclusive;
    /// Copies of a hedged call in all, the first included.
    pub const HEDGE_ATTEMPTS: RangeInclusive<u32> = 2..=5;
    /// Most calls a concurrency limit lets through at once.
    pub const MAX_CONCURRENT: u32 = 100_000;
    /// Most calls a concurrency limit lets wait.
    pub const MAX_QUEUED: u32 = 10_000;
    /// Most probe calls a half-open circuit lets through.
    pub const HALF_OPEN_CALLS: u32 = 100;
}

/// The longest duration a config file may give. Durations are sent as
/// protobuf Durations (i64 seconds) and proxies add them to clocks and turn
/// them into milliseconds and `grpc-timeout` headers; a day is far beyond
/// any sensible call timeout or backoff and fits all of those, so a larger
/// value is an operator's mistake reported with its line, not a panic later.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A duration written with its unit (`750ms`, `2s`), at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration with a unit such as 750ms or 2s: {e}"
            ))
        })?;
        if parsed > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is longer than the longest duration allowed, {}",
                humantime::format_duration(MAX_DURATION)
            )));
        }
        Ok(Dur(parsed))
    }
}

/// `*`, `pkg.Service/*` or `pkg.Service/Method`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodMatch(String);

impl MethodMatch {
    /// The gRPC service and method (None for `/*`) it names, or None for `*`.
    pub fn parts(&self) -> Option<(&str, Option<&str>)> {
        if self.0 == "*" {
            return None;
        }
        let (service, method) = self.0.split_once('/')?;
        Some((service, (method != "*").then_some(method)))
    }

    fn parent(&self) -> Option<MethodMatch> {
        match self.parts() {
            None => None,
            Some((service, Some(_))) => Some(MethodMatch(format!("{service}/*"))),
            Some((_, None)) => Some(MethodMatch("*".into())),
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self(text.into()));
        }
        let bad = || {
            format!(
                "{text:?} is not a method match: use \"*\", \"pkg.Service/*\" or \"pkg.Service/Method\""
            )
        };
        let (service, method) = text.split_once('/').ok_or_else(bad)?;
        validate::qualified_name(service).map_err(|_| bad())?;
        let ident_ok = method == "*"
            || (method
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && method
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !ident_ok {
            return Err(bad());
        }
        Ok(Self(text.into()))
    }
}

impl<'de> Deserialize<'de> for MethodMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A gRPC status code by name or number.
#[derive(Debug, Clone, PartialEq)]
struct Code(String);

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let upper = text.to_ascii_uppercase();
        if let Ok(n) = text.parse::<usize>()
            && let Some(name) = CODE_NAMES.get(n)
        {
            return Ok(Self((*name).into()));
        }
        if CODE_NAMES.contains(&upper.as_str()) {
            return Ok(Self(upper));
        }
        Err(serde::de::Error::custom(format!(
            "{text:?} is not a gRPC status code name (e.g. UNAVAILABLE) or number (0-16)"
        )))
    }
}

/// Who a rule applies to: a SPIFFE ID, a mesh service name, or `*`.
#[derive(Debug, Clone, PartialEq)]
struct Caller(String);

impl<'de> Deserialize<'de> for Caller {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let ok = text == "*"
            || (text.starts_with("spiffe://") && trellis::SpiffeId::parse(&text).is_ok())
            || validate::service_name(&text).is_ok();
        if ok {
            Ok(Self(text))
        } else {
            Err(serde::de::Error::custom(format!(
                "{text:?} is not a caller: use a SPIFFE ID, a mesh service name or \"*\""
            )))
        }
    }
}

/// How proxies pick an instance, as a file names it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Balance {
    RoundRobin,
    LeastRequest,
    PeakEwma,
    /// No longer supported: read so that the refusal can name its line and
    /// say what to use instead (see [`check_route`]).
    Random,
}

const BALANCE_CHOICES: &str =
    "use \"peak_ewma\" (the default), \"least_request\" or \"round_robin\"";

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "round_robin" => Ok(Self::RoundRobin),
            "least_request" => Ok(Self::LeastRequest),
            "peak_ewma" => Ok(Self::PeakEwma),
            "random" => Ok(Self::Random),
            _ => Err(serde::de::Error::custom(format!(
                "{text:?} is not a load balancing policy: {BALANCE_CHOICES}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    max_attempts: Option<u32>,
    retryable_status_codes: Option<Vec<Code>>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
    budget_ratio: Option<f64>,
    max_buffered_bytes: Option<u32>,
    per_try_timeout: Option<Spanned<Dur>>,
}

/// `[routes.hedge]`: copies of a slow call to other instances.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct HedgeFile {
    /// Required; optional here so its absence is refused with a rule path.
    delay: Option<Spanned<Dur>>,
    max_attempts: Option<Spanned<u32>>,
}

/// `[routes.limit]` and `[caller_limit]`: calls in flight, and waiting.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitFile {
    /// Required; optional here so its absence is refused with a rule path.
    max_concurrent: Option<Spanned<u32>>,
    max_queued: Option<Spanned<u32>>,
}

/// `[circuit_breaker]`: when callers stop calling the service for a while.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerFile {
    consecutive_failures: Option<Spanned<u32>>,
    failure_rate: Option<Spanned<f64>>,
    minimum_calls: Option<Spanned<u32>>,
    window: Option<Spanned<Dur>>,
    open_for: Option<Spanned<Dur>>,
    half_open_calls: Option<Spanned<u32>>,
}

/// `[traffic]`: which versions get the calls, and who may pick one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficFile {
    split: Option<Spanned<Vec<Spanned<WeightFile>>>>,
    #[serde(default)]
    version_header_callers: Vec<Caller>,
}

impl TrafficFile {
    fn split(&self) -> &[Spanned<WeightFile>] {
        self.split.as_ref().map_or(&[], |s| s.get_ref())
    }
}

/// One `{ version = "v2", weight = 10 }` of a split.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightFile {
    version: Spanned<String>,
    weight: Spanned<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    method: Spanned<MethodMatch>,
    timeout: Option<Dur>,
    load_balancing: Option<Spanned<Balance>>,
    idempotent: Option<bool>,
    retry: Option<RetryFile>,
    hedge: Option<Spanned<HedgeFile>>,
    limit: Option<Spanned<LimitFile>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    callers: Vec<Caller>,
    methods: Vec<Spanned<MethodMatch>>,
    action: Action,
}

/// One parsed, accepted file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// gRPC services this mesh service owns: no other identity may
    /// register them, whether or not this service has instances.
    #[serde(default)]
    grpc_services: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    /// `None` when the file has no `authorization` at all, `Some([])` for an
    /// explicit `authorization = []`: only the latter may take away every
    /// rule a previous version had (see [`ConfigStore::reload`]).
    authorization: Option<Vec<RuleFile>>,
    #[serde(default)]
    settings: toml::Table,
    /// Replaces the defaults' table as a whole.
    circuit_breaker: Option<Spanned<BreakerFile>>,
    /// Replaces the defaults' table as a whole.
    caller_limit: Option<Spanned<LimitFile>>,
    /// A service's own: refused in defaults.toml.
    traffic: Option<Spanned<TrafficFile>>,
}

impl ConfigFile {
    fn rules(&self) -> &[RuleFile] {
        self.authorization.as_deref().unwrap_or_default()
    }
}

fn line_of(text: &str, offset: usize) -> u32 {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count() as u32
        + 1
}

/// Parses one file's text, or reports where and why it is invalid.
fn parse_file(name: &str, text: &str) -> Result<ConfigFile, pb::ConfigProblem> {
    let problem = |line, message: String| pb::ConfigProblem {
        file: name.to_owned(),
        line,
        rule: String::new(),
        message,
        rejected: true,
    };
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        problem(line, e.message().trim().to_owned())
    })?;
    for (i, g) in file.grpc_services.iter().enumerate() {
        let line = line_of(text, g.span().start);
        let rule = format!("grpc_services[{i}]");
        let message = if name == DEFAULTS_FILE {
            Some(format!(
                "{DEFAULTS_FILE} cannot own gRPC services; declare them in <service>.toml"
            ))
        } else if file.grpc_services[..i]
            .iter()
            .any(|other| other.get_ref() == g.get_ref())
        {
            Some(format!("{} is given twice", g.get_ref()))
        } else {
            validate::routable_name(g.get_ref()).err()
        };
        if let Some(message) = message {
            return Err(pb::ConfigProblem {
                rule,
                ..problem(line, message)
            });
        }
    }
    for (i, route) in file.routes.iter().enumerate() {
        if let Some(r) = &route.retry {
            if r.max_attempts == Some(0) {
                return Err(pb::ConfigProblem {
                    rule: format!("routes[{i}].retry.max_attempts"),
                    ..problem(
                        line_of(text, route.method.span().start),
                        "must be at least 1 (1 disables retries)".into(),
                    )
                });
            }
            if r.budget_ratio.is_some_and(|b| !(0.0..=1.0).contains(&b)) {
                return Err(pb::ConfigProblem {
                    rule: format!("routes[{i}].retry.budget_ratio"),
                    ..problem(
                        line_of(text, route.method.span().start),
                        "must be between 0 and 1".into(),
                    )
                });
            }
            if let (Some(a), Some(b)) = (r.initial_backoff, r.max_backoff)
                && a.0 > b.0
            {
                return Err(pb::ConfigProblem {
                    rule: format!("routes[{i}].retry"),
                    ..problem(
                        line_of(text, route.method.span().start),
                        "initial_backoff is longer than max_backoff".into(),
                    )
                });
            }
        }
        if file.routes[..i]
            .iter()
            .any(|r| r.method.get_ref() == route.method.get_ref())
        {
            return Err(pb::ConfigProblem {
                rule: format!("routes[{i}].method"),
                ..problem(
                    line_of(text, route.method.span().start),
                    format!("{} has more than one route", route.method.get_ref().0),
                )
            });
        }
    }
    check_traffic_management(name, &file).map_err(|fault| pb::ConfigProblem {
        rule: fault.rule,
        ..problem(line_of(text, fault.at), fault.message)
    })?;
    Ok(file)
}

/// Why a parsed file is refused: where the entry at fault starts (a byte
/// offset, for its line), the entry as a rule path, and what to do.
#[derive(Debug)]
struct Fault {
    at: usize,
    rule: String,
    message: String,
}

impl Fault {
    fn new<T>(at: &Spanned<T>, rule: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            at: at.span().start,
            rule: rule.into(),
            message: message.into(),
        }
    }
}

/// The value of an optional spanned field.
fn value<T: Copy>(field: &Option<Spanned<T>>) -> Option<T> {
    field.as_ref().map(|f| *f.get_ref())
}

/// Checks the traffic-management entries of file `name`: route balancing,
/// per-try timeouts, hedging and limits, the circuit breaker, the caller
/// limit and the version split.
fn check_traffic_management(name: &str, file: &ConfigFile) -> Result<(), Fault> {
    for (i, route) in file.routes.iter().enumerate() {
        check_route(&format!("routes[{i}]"), route)?;
    }
    if let Some(breaker) = &file.circuit_breaker {
        check_breaker(breaker)?;
    }
    if let Some(limit) = &file.caller_limit {
        check_limit("caller_limit", limit)?;
    }
    if let Some(traffic) = &file.traffic {
        if name == DEFAULTS_FILE {
            return Err(Fault::new(
                traffic,
                "traffic",
                format!(
                    "a traffic split belongs to one service's file (<service>.toml), not {DEFAULTS_FILE}: versions are each service's own"
                ),
            ));
        }
        check_traffic(traffic.get_ref())?;
    }
    Ok(())
}

fn check_route(rule: &str, route: &RouteFile) -> Result<(), Fault> {
    if let Some(balance) = &route.load_balancing
        && *balance.get_ref() == Balance::Random
    {
        return Err(Fault::new(
            balance,
            format!("{rule}.load_balancing"),
            format!("random is not supported; {BALANCE_CHOICES}"),
        ));
    }
    if let Some(t) = route
        .retry
        .as_ref()
        .and_then(|r| r.per_try_timeout.as_ref())
    {
        positive(
            t,
            format!("{rule}.retry.per_try_timeout"),
            "leave it out for no per-try timeout",
        )?;
    }
    if let Some(hedge) = &route.hedge {
        let rule = format!("{rule}.hedge");
        match &hedge.get_ref().delay {
            None => {
                return Err(Fault::new(
                    hedge,
                    format!("{rule}.delay"),
                    "is required: how long to wait for an answer before sending the next copy, e.g. delay = \"50ms\"",
                ));
            }
            Some(delay) => positive(
                delay,
                format!("{rule}.delay"),
                "it is how long to wait for an answer before sending the next copy, e.g. \"50ms\"",
            )?,
        }
        if let Some(n) = &hedge.get_ref().max_attempts
            && !bounds::HEDGE_ATTEMPTS.contains(n.get_ref())
        {
            return Err(Fault::new(
                n,
                format!("{rule}.max_attempts"),
                format!(
                    "must be {} to {} (copies in all, the first included); remove the table for no hedging",
                    bounds::HEDGE_ATTEMPTS.start(),
                    bounds::HEDGE_ATTEMPTS.end()
                ),
            ));
        }
    }
    if let Some(limit) = &route.limit {
        check_limit(&format!("{rule}.limit"), limit)?;
    }
    Ok(())
}

/// Refuses a zero duration, with `hint` saying what to write instead.
fn positive(d: &Spanned<Dur>, rule: String, hint: &str) -> Result<(), Fault> {
    if d.get_ref().0.is_zero() {
        return Err(Fault::new(
            d,
            rule,
            format!("must be longer than 0; {hint}"),
        ));
    }
    Ok(())
}

fn check_limit(rule: &str, limit: &Spanned<LimitFile>) -> Result<(), Fault> {
    let Some(max) = &limit.get_ref().max_concurrent else {
        return Err(Fault::new(
            limit,
            format!("{rule}.max_concurrent"),
            format!(
                "is required: the most calls in flight at once, 1 to {}; remove the table for no limit",
                bounds::MAX_CONCURRENT
            ),
        ));
    };
    let rule_max = format!("{rule}.max_concurrent");
    match *max.get_ref() {
        0 => {
            return Err(Fault::new(
                max,
                rule_max,
                "a limit of 0 would refuse every call; remove the table for no limit",
            ));
        }
        n if n > bounds::MAX_CONCURRENT => {
            return Err(Fault::new(
                max,
                rule_max,
                format!(
                    "{n} is more than the most allowed, {}",
                    bounds::MAX_CONCURRENT
                ),
            ));
        }
        _ => {}
    }
    if let Some(queued) = &limit.get_ref().max_queued
        && *queued.get_ref() > bounds::MAX_QUEUED
    {
        return Err(Fault::new(
            queued,
            format!("{rule}.max_queued"),
            format!(
                "{} is more than the most allowed, {} (0 fails every call over the limit at once)",
                queued.get_ref(),
                bounds::MAX_QUEUED
            ),
        ));
    }
    Ok(())
}

fn check_breaker(breaker: &Spanned<BreakerFile>) -> Result<(), Fault> {
    let b = breaker.get_ref();
    if let Some(rate) = &b.failure_rate
        && !(0.0..=1.0).contains(rate.get_ref())
    {
        return Err(Fault::new(
            rate,
            "circuit_breaker.failure_rate",
            "must be between 0 and 1 (0: only consecutive failures open the circuit)",
        ));
    }
    let consecutive = value(&b.consecutive_failures).unwrap_or(builtin::CONSECUTIVE_FAILURES);
    let rate = value(&b.failure_rate).unwrap_or(builtin::FAILURE_RATE);
    if consecutive == 0 && rate == 0.0 {
        return Err(Fault::new(
            breaker,
            "circuit_breaker",
            "consecutive_failures and failure_rate are both 0, so nothing would open the circuit; set one of them, or remove the table for no circuit breaking",
        ));
    }
    if let Some(n) = &b.minimum_calls
        && *n.get_ref() == 0
    {
        return Err(Fault::new(
            n,
            "circuit_breaker.minimum_calls",
            "must be at least 1: the fewest calls within window before failure_rate applies",
        ));
    }
    if let Some(window) = &b.window {
        positive(
            window,
            "circuit_breaker.window".into(),
            "it is how far back failure_rate looks, e.g. \"10s\"",
        )?;
    }
    if let Some(open_for) = &b.open_for {
        positive(
            open_for,
            "circuit_breaker.open_for".into(),
            "it is how long the circuit stays open before probing, e.g. \"5s\"",
        )?;
    }
    if let Some(n) = &b.half_open_calls
        && !(1..=bounds::HALF_OPEN_CALLS).contains(n.get_ref())
    {
        return Err(Fault::new(
            n,
            "circuit_breaker.half_open_calls",
            format!(
                "must be 1 to {}: the probe calls let through while half-open",
                bounds::HALF_OPEN_CALLS
            ),
        ));
    }
    Ok(())
}

fn check_traffic(traffic: &TrafficFile) -> Result<(), Fault> {
    let split = traffic.split();
    for (i, entry) in split.iter().enumerate() {
        let WeightFile { version, weight } = entry.get_ref();
        let rule = format!("traffic.split[{i}]");
        validate::version(version.get_ref())
            .map_err(|e| Fault::new(version, format!("{rule}.version"), e))?;
        if split[..i]
            .iter()
            .any(|other| other.get_ref().version.get_ref() == version.get_ref())
        {
            return Err(Fault::new(
                version,
                format!("{rule}.version"),
                format!("{} is listed twice", version.get_ref()),
            ));
        }
        if *weight.get_ref() > 100 {
            return Err(Fault::new(
                weight,
                format!("{rule}.weight"),
                format!(
                    "{} is over 100: a weight is the version's share of calls, in percent",
                    weight.get_ref()
                ),
            ));
        }
    }
    let total: u64 = split
        .iter()
        .map(|e| u64::from(*e.get_ref().weight.get_ref()))
        .sum();
    if let Some(list) = &traffic.split
        && !split.is_empty()
        && total != 100
    {
        return Err(Fault::new(
            list,
            "traffic.split",
            format!("weights add up to {total}; they must add up to exactly 100 (percent)"),
        ));
    }
    Ok(())
}

/// Checks a parsed file against what is already in force: `previous`, the
/// last good version of the same file, and `accepted`, every file's.
///
/// An empty file after a good version is taken as a failed or truncating
/// write, and a version without `authorization` after one with rules as a
/// truncated one: accepting either would turn "these callers only" into
/// "every caller". Taking every rule away takes an explicit
/// `authorization = []`.
fn check_against(
    name: &str,
    text: &str,
    file: &ConfigFile,
    previous: Option<&ConfigFile>,
    accepted: &BTreeMap<String, (String, ConfigFile)>,
) -> Result<(), pb::ConfigProblem> {
    let problem = |line, rule: String, message: String| pb::ConfigProblem {
        file: name.to_owned(),
        line,
        rule,
        message,
        rejected: true,
    };
    if let Some(previous) = previous {
        if text.trim().is_empty() {
            return Err(problem(
                0,
                String::new(),
                "file is empty; taken as a failed write, so its last good version stays in force (to drop its rules on purpose, write `authorization = []`)".into(),
            ));
        }
        if file.authorization.is_none() && !previous.rules().is_empty() {
            return Err(problem(
                0,
                "authorization".into(),
                format!(
                    "has no authorization rules where its last good version had {}; taken as truncated, so that version stays in force (to drop every rule on purpose, write `authorization = []`)",
                    previous.rules().len()
                ),
            ));
        }
    }
    for (i, g) in file.grpc_services.iter().enumerate() {
        let other = accepted.iter().find(|(other, (_, f))| {
            other.as_str() != name && f.grpc_services.iter().any(|o| o.get_ref() == g.get_ref())
        });
        if let Some((other, _)) = other {
            return Err(problem(
                line_of(text, g.span().start),
                format!("grpc_services[{i}]"),
                format!("{} is already declared by {other}", g.get_ref()),
            ));
        }
    }
    Ok(())
}

/// The gRPC service names `files` declare, each with its owner.
fn declarations(files: &BTreeMap<String, (String, ConfigFile)>) -> HashMap<String, Declaration> {
    let mut declared = HashMap::new();
    for (name, (_, file)) in files {
        let Some(service) = name.strip_suffix(".toml") else {
            continue;
        };
        for g in &file.grpc_services {
            declared
                .entry(g.get_ref().clone())
                .or_insert_with(|| Declaration {
                    service: service.to_owned(),
                    file: name.clone(),
                });
        }
    }
    declared
}

/// The accepted state of the directory.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    revision: u64,
    loaded_at: Option<SystemTime>,
    /// Accepted files by name, with their text (for line numbers).
    files: BTreeMap<String, (String, ConfigFile)>,
}

#[derive(Debug, Default)]
struct Reader {
    /// Raw text last seen per file name (accepted or not).
    seen: HashMap<String, String>,
    /// Parse problems by file name.
    rejected: BTreeMap<String, pb::ConfigProblem>,
    /// Contract problems last logged.
    unknown_logged: Vec<pb::ConfigProblem>,
    /// Split versions without a serving instance last logged.
    unserved_logged: Vec<pb::ConfigProblem>,
}

/// The configuration store: the accepted snapshot, the problems, and the
/// watchers' channel.
#[derive(Debug)]
pub struct ConfigStore {
    dir: PathBuf,
    snapshot: watch::Sender<Arc<Snapshot>>,
    reader: Mutex<Reader>,
    registry: Arc<Registry>,
}

impl ConfigStore {
    /// Reads `dir` once; its problems are reported, not fatal. The
    /// directory itself must exist.
    pub fn open(dir: &Path, registry: Arc<Registry>) -> Result<Arc<Self>, String> {
        if !dir.is_dir() {
            return Err(format!("{}: not a directory", dir.display()));
        }
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let store = Arc::new(Self {
            dir: dir.to_path_buf(),
            snapshot,
            reader: Mutex::new(Reader::default()),
            registry,
        });
        store.reload();
        Ok(store)
    }

    /// Re-reads the directory; returns whether a new revision was accepted.
    pub fn reload(&self) -> bool {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut texts = HashMap::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        match std::fs::read_to_string(&path) {
                            Ok(text) => {
                                texts.insert(name, text);
                            }
                            Err(e) => {
                                // Keep whatever was in force; try again next poll.
                                tracing::warn!(file = %path.display(), error = %e, "cannot read config file");
                                if let Some(old) = reader.seen.get(&name) {
                                    texts.insert(name, old.clone());
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read config directory");
                return false;
            }
        }
        if texts == reader.seen {
            return false;
        }
        let current = self.snapshot.borrow().clone();
        let mut files = current.files.clone();
        // A file that disappears keeps its last good version until it is
        // written again or the registry restarts: a missing file is as
        // likely a botched deploy or a remount as a deliberate removal, and
        // dropping it could drop a service's rules, which means "allow
        // every caller". It is reported until then.
        reader
            .rejected
            .retain(|name, _| texts.contains_key(name) || files.contains_key(name));
        for name in files.keys() {
            if !texts.contains_key(name) && reader.seen.contains_key(name) {
                let problem = pb::ConfigProblem {
                    file: name.clone(),
                    line: 0,
                    rule: String::new(),
                    message: "file is missing; its last good version stays in force until the file is written again or the registry restarts (to drop its rules on purpose, write `authorization = []`)".into(),
                    rejected: true,
                };
                tracing::warn!(file = %name, reason = %problem.message, "config file removed; its last good version stays in force");
                reader.rejected.insert(name.clone(), problem);
            }
        }
        // Sorted, so that of two files declaring the same gRPC service the
        // same one wins every time.
        let texts_sorted: BTreeMap<&String, &String> = texts.iter().collect();
        for (name, text) in texts_sorted {
            if reader.seen.get(name) == Some(text) {
                continue;
            }
            let stem = name.trim_end_matches(".toml");
            let parsed = if name != DEFAULTS_FILE && validate::service_name(stem).is_err() {
                Err(pb::ConfigProblem {
                    file: name.clone(),
                    line: 0,
                    rule: String::new(),
                    message: format!(
                        "file name must be {DEFAULTS_FILE} or <mesh service name>.toml; {stem:?} is not a mesh service name"
                    ),
                    rejected: true,
                })
            } else {
                parse_file(name, text).and_then(|file| {
                    check_against(name, text, &file, files.get(name).map(|(_, f)| f), &files)?;
                    Ok(file)
                })
            };
            match parsed {
                Ok(file) => {
                    reader.rejected.remove(name);
                    files.insert(name.clone(), (text.clone(), file));
                    tracing::info!(file = %name, "config file accepted");
                }
                Err(problem) => {
                    tracing::warn!(
                        file = %problem.file,
                        line = problem.line,
                        rule = %problem.rule,
                        reason = %problem.message,
                        "config file rejected; its last good version stays in force"
                    );
                    reader.rejected.insert(name.clone(), problem);
                }
            }
        }
        reader.seen = texts;
        let changed = files != current.files;
        if changed {
            self.registry.set_declared(declarations(&files));
            let next = Snapshot {
                revision: current.revision + 1,
                loaded_at: Some(SystemTime::now()),
                files,
            };
            tracing::info!(revision = next.revision, "config revision accepted");
            self.snapshot.send_replace(Arc::new(next));
        }
        drop(reader);
        self.check_contracts();
        self.check_versions();
        changed
    }

    /// Problems with rules that name methods no registered contract has.
    fn contract_problems(&self) -> Vec<pb::ConfigProblem> {
        let snapshot = self.snapshot.borrow().clone();
        let mut problems = Vec::new();
        for (name, (text, file)) in &snapshot.files {
            let mut check = |rule: String, m: &Spanned<MethodMatch>| {
                let Some((service, method)) = m.get_ref().parts() else {
                    return;
                };
                if !self.registry.knows_method(service, method) {
                    problems.push(pb::ConfigProblem {
                        file: name.clone(),
                        line: line_of(text, m.span().start),
                        rule,
                        message: format!(
                            "unknown method {}: no registered contract defines it",
                            m.get_ref().0
                        ),
                        rejected: false,
                    });
                }
            };
            for (i, r) in file.routes.iter().enumerate() {
                check(format!("routes[{i}].method"), &r.method);
            }
            for (i, a) in file.rules().iter().enumerate() {
                for (j, m) in a.methods.iter().enumerate() {
                    check(format!("authorization[{i}].methods[{j}]"), m);
                }
            }
        }
        problems
    }

    /// Logs rules naming unknown methods, once per change of that list.
    pub fn check_contracts(&self) {
        let problems = self.contract_problems();
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if reader.unknown_logged == problems {
            return;
        }
        for p in problems
            .iter()
            .filter(|p| !reader.unknown_logged.contains(p))
        {
            tracing::warn!(file = %p.file, line = p.line, rule = %p.rule, reason = %p.message, "config rule names an unknown method");
        }
        reader.unknown_logged = problems;
    }

    /// Problems with version splits naming versions that no serving
    /// instance of the service registers: not refusals, since proxies give
    /// such a version's share to the others and an instance may register.
    fn version_problems(&self) -> Vec<pb::ConfigProblem> {
        let snapshot = self.snapshot.borrow().clone();
        let mut problems = Vec::new();
        for (name, (text, file)) in &snapshot.files {
            let Some(traffic) = &file.traffic else {
                continue;
            };
            let split = traffic.get_ref().split();
            // defaults.toml cannot have a split; a file's name is its service.
            let Some(service) = name.strip_suffix(".toml") else {
                continue;
            };
            if split.is_empty() {
                continue;
            }
            let serving = self.registry.serving_versions(service);
            let none_served = split
                .iter()
                .all(|w| !serving.contains(w.get_ref().version.get_ref()));
            for (i, w) in split.iter().enumerate() {
                let version = &w.get_ref().version;
                if serving.contains(version.get_ref()) {
                    continue;
                }
                let message = if none_served {
                    format!(
                        "version {} of {service} has no serving instance, nor has any other version in the split; until one has, calls go to any instance of {service}",
                        version.get_ref()
                    )
                } else {
                    format!(
                        "version {} of {service} has no serving instance; its share goes to the other versions",
                        version.get_ref()
                    )
                };
                problems.push(pb::ConfigProblem {
                    file: name.clone(),
                    line: line_of(text, version.span().start),
                    rule: format!("traffic.split[{i}].version"),
                    message,
                    rejected: false,
                });
            }
        }
        problems
    }

    /// Logs split versions without a serving instance, once per change of
    /// that list.
    pub fn check_versions(&self) {
        let problems = self.version_problems();
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if reader.unserved_logged == problems {
            return;
        }
        for p in problems
            .iter()
            .filter(|p| !reader.unserved_logged.contains(p))
        {
            tracing::warn!(file = %p.file, line = p.line, rule = %p.rule, reason = %p.message, "config split names a version with no serving instance");
        }
        reader.unserved_logged = problems;
    }

    /// Re-reads the directory every [`POLL_INTERVAL`], re-checks rules
    /// when contracts change and splits when a version gains its first
    /// serving instance or loses its last, until the store is dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        enum Wake {
            Tick,
            Contracts,
            Versions,
        }
        let weak = Arc::downgrade(self);
        let mut contracts = self.registry.contracts_changes();
        let mut versions = self.registry.serving_versions_changes();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let wake = tokio::select! {
                    _ = tick.tick() => Wake::Tick,
                    r = contracts.changed() => if r.is_ok() { Wake::Contracts } else { Wake::Tick },
                    r = versions.changed() => if r.is_ok() { Wake::Versions } else { Wake::Tick },
                };
                let Some(store) = weak.upgrade() else { return };
                match wake {
                    Wake::Contracts => store.check_contracts(),
                    Wake::Versions => store.check_versions(),
                    Wake::Tick => {
                        // File I/O is small but blocking; keep it off the reactor.
                        let s = store.clone();
                        let _ = tokio::task::spawn_blocking(move || s.reload()).await;
                    }
                }
            }
        })
    }

    /// Open `WatchConfig` streams.
    pub fn watchers(&self) -> usize {
        self.snapshot.receiver_count()
    }

    /// The status: revision in force and every problem.
    pub fn status(&self) -> pb::GetConfigStatusResponse {
        let snapshot = self.snapshot.borrow().clone();
        let mut problems: Vec<pb::ConfigProblem> = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rejected
            .values()
            .cloned()
            .collect();
        problems.extend(self.contract_problems());
        problems.extend(self.version_problems());
        pb::GetConfigStatusResponse {
            revision: snapshot.revision,
            loaded_at: snapshot.loaded_at.map(prost_types::Timestamp::from),
            problems,
            xds_rejections: Vec::new(),
        }
    }

    /// The effective configuration of `service` in `snapshot`.
    fn effective(snapshot: &Snapshot, service: &str) -> (pb::ServiceConfig, String) {
        let own_name = format!("{service}.toml");
        let own = snapshot.files.get(&own_name).map(|(_, f)| f);
        let defaults = snapshot.files.get(DEFAULTS_FILE).map(|(_, f)| f);
        let layers: Vec<&ConfigFile> = own.into_iter().chain(defaults).collect();

        let mut keys: Vec<MethodMatch> = vec![MethodMatch("*".into())];
        for layer in &layers {
            for r in &layer.routes {
                if !keys.contains(r.method.get_ref()) {
                    keys.push(r.method.get_ref().clone());
                }
            }
        }
        keys.sort_by_key(|k| match k.parts() {
            None => (0, k.0.clone()),
            Some((_, None)) => (1, k.0.clone()),
            Some((_, Some(_))) => (2, k.0.clone()),
        });
        let routes = keys.iter().map(|k| resolve_route(&layers, k)).collect();

        let authorization = own
            .filter(|f| !f.rules().is_empty())
            .or(defaults)
            .map(|f| {
                f.rules()
                    .iter()
                    .map(|r| pb::AuthorizationRule {
                        callers: r.callers.iter().map(|c| c.0.clone()).collect(),
                        methods: r.methods.iter().map(|m| m.get_ref().0.clone()).collect(),
                        action: match r.action {
                            Action::Allow => pb::AuthorizationAction::Allow,
                            Action::Deny => pb::AuthorizationAction::Deny,
                        } as i32,
                    })
                    .collect()
            })
            .unwrap_or_default();

        let mut settings = defaults.map(|f| f.settings.clone()).unwrap_or_default();
        if let Some(own) = own {
            for (k, v) in &own.settings {
                settings.insert(k.clone(), v.clone());
            }
        }
        // Whole tables: the service's own replaces the defaults'.
        let circuit_breaker = own
            .and_then(|f| f.circuit_breaker.as_ref())
            .or_else(|| defaults.and_then(|f| f.circuit_breaker.as_ref()))
            .map(|b| breaker_policy(b.get_ref()));
        let caller_limit = own
            .and_then(|f| f.caller_limit.as_ref())
            .or_else(|| defaults.and_then(|f| f.caller_limit.as_ref()))
            .map(|l| limit_policy(l.get_ref()));
        let traffic = own
            .and_then(|f| f.traffic.as_ref())
            .map(|t| pb::TrafficPolicy {
                split: t
                    .get_ref()
                    .split()
                    .iter()
                    .map(|w| pb::VersionWeight {
                        version: w.get_ref().version.get_ref().clone(),
                        weight: *w.get_ref().weight.get_ref(),
                    })
                    .collect(),
                version_header_callers: t
                    .get_ref()
                    .version_header_callers
                    .iter()
                    .map(|c| c.0.clone())
                    .collect(),
            });
        let config = pb::ServiceConfig {
            service: service.to_owned(),
            routes,
            authorization,
            settings: Some(to_struct(&settings)),
            circuit_breaker,
            caller_limit,
            traffic,
        };
        let source = if own.is_some() {
            own_name
        } else {
            String::new()
        };
        (config, source)
    }

    /// Wakes on every accepted revision.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// `service`'s effective configuration now.
    pub fn get(&self, service: &str) -> pb::GetConfigResponse {
        let snapshot = self.snapshot.borrow().clone();
        let (config, source) = Self::effective(&snapshot, service);
        pb::GetConfigResponse {
            config: Some(config),
            revision: snapshot.revision,
            source,
        }
    }

    /// Streams `service`'s effective configuration: now, then each change.
    /// `permit` is the caller's place in its watch quota, held while the
    /// stream is served.
    pub fn watch(
        &self,
        service: String,
        permit: WatchPermit,
    ) -> ReceiverStream<Result<pb::WatchConfigResponse, Status>> {
        let mut rx = self.snapshot.subscribe();
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            let mut last: Option<(pb::ServiceConfig, String)> = None;
            loop {
                let snapshot = rx.borrow_and_update().clone();
                let current = Self::effective(&snapshot, &service);
                if last.as_ref() != Some(&current) {
                    let response = pb::WatchConfigResponse {
                        config: Some(current.0.clone()),
                        revision: snapshot.revision,
                        source: current.1.clone(),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                    last = Some(current);
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(out)
    }
}

/// The route for `key`: each field from the most specific place that sets
/// it (the service's file, from `key` up to `*`, then the defaults' file
/// the same way), else the built-in value; `hedge` and `limit` the same
/// way but each as a whole table, and unset if no place sets them.
fn resolve_route(layers: &[&ConfigFile], key: &MethodMatch) -> pb::RoutePolicy {
    let mut chain: Vec<&RouteFile> = Vec::new();
    for layer in layers {
        let mut k = Some(key.clone());
        while let Some(current) = k {
            if let Some(r) = layer.routes.iter().find(|r| *r.method.get_ref() == current) {
                chain.push(r);
            }
            k = current.parent();
        }
    }
    fn pick<T>(chain: &[&RouteFile], f: impl Fn(&RouteFile) -> Option<T>) -> Option<T> {
        chain.iter().find_map(|r| f(r))
    }
    fn retry<T>(chain: &[&RouteFile], f: impl Fn(&RetryFile) -> Option<T>) -> Option<T> {
        chain.iter().find_map(|r| r.retry.as_ref().and_then(&f))
    }
    let timeout = pick(&chain, |r| r.timeout);
    let balance = pick(&chain, |r| value(&r.load_balancing));
    let idempotent = pick(&chain, |r| r.idempotent);
    let codes = retry(&chain, |r| r.retryable_status_codes.clone());
    let hedge = chain.iter().find_map(|r| r.hedge.as_ref());
    let limit = chain.iter().find_map(|r| r.limit.as_ref());
    pb::RoutePolicy {
        method_match: key.0.clone(),
        timeout: timeout.map(|d| proto_duration(d.0)),
        retry: Some(pb::RetryPolicy {
            max_attempts: retry(&chain, |r| r.max_attempts).unwrap_or(builtin::MAX_ATTEMPTS),
            retryable_status_codes: codes
                .map(|c| c.into_iter().map(|c| c.0).collect())
                .unwrap_or_else(|| builtin::RETRYABLE.iter().map(|s| (*s).to_owned()).collect()),
            initial_backoff: Some(proto_duration(
                retry(&chain, |r| r.initial_backoff).map_or(builtin::INITIAL_BACKOFF, |d| d.0),
            )),
            max_backoff: Some(proto_duration(
                retry(&chain, |r| r.max_backoff).map_or(builtin::MAX_BACKOFF, |d| d.0),
            )),
            budget_ratio: retry(&chain, |r| r.budget_ratio).unwrap_or(builtin::BUDGET_RATIO),
            max_buffered_bytes: retry(&chain, |r| r.max_buffered_bytes)
                .unwrap_or(builtin::MAX_BUFFERED_BYTES),
            per_try_timeout: retry(&chain, |r| value(&r.per_try_timeout))
                .map(|d| proto_duration(d.0)),
        }),
        load_balancing: match balance.unwrap_or(Balance::PeakEwma) {
            Balance::RoundRobin => pb::LoadBalancing::RoundRobin,
            Balance::LeastRequest => pb::LoadBalancing::LeastRequest,
            // Refused when a file is read; never in force.
            Balance::PeakEwma | Balance::Random => pb::LoadBalancing::PeakEwma,
        } as i32,
        idempotent: idempotent.unwrap_or(false),
        hedge: hedge.map(|h| {
            let h = h.get_ref();
            pb::HedgePolicy {
                delay: value(&h.delay).map(|d| proto_duration(d.0)),
                max_attempts: value(&h.max_attempts).unwrap_or(builtin::HEDGE_ATTEMPTS),
            }
        }),
        limit: limit.map(|l| limit_policy(l.get_ref())),
    }
}

/// A limit as served: `max_concurrent` is required when a file is read.
fn limit_policy(limit: &LimitFile) -> pb::ConcurrencyLimit {
    pb::ConcurrencyLimit {
        max_concurrent: value(&limit.max_concurrent).unwrap_or_default(),
        max_queued: value(&limit.max_queued).unwrap_or(builtin::MAX_QUEUED),
    }
}

/// A circuit breaker as served, its unset fields built in.
fn breaker_policy(b: &BreakerFile) -> pb::CircuitBreaker {
    pb::CircuitBreaker {
        consecutive_failures: value(&b.consecutive_failures)
            .unwrap_or(builtin::CONSECUTIVE_FAILURES),
        failure_rate: value(&b.failure_rate).unwrap_or(builtin::FAILURE_RATE),
        minimum_calls: value(&b.minimum_calls).unwrap_or(builtin::MINIMUM_CALLS),
        window: Some(proto_duration(
            value(&b.window).map_or(builtin::WINDOW, |d| d.0),
        )),
        open_for: Some(proto_duration(
            value(&b.open_for).map_or(builtin::OPEN_FOR, |d| d.0),
        )),
        half_open_calls: value(&b.half_open_calls).unwrap_or(builtin::HALF_OPEN_CALLS),
    }
}

fn to_struct(table: &toml::Table) -> prost_types::Struct {
    prost_types::Struct {
        fields: table
            .iter()
            .map(|(k, v)| (k.clone(), to_value(v)))
            .collect(),
    }
}

fn to_value(value: &toml::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        toml::Value::String(s) => Kind::StringValue(s.clone()),
        toml::Value::Integer(i) => Kind::NumberValue(*i as f64),
        toml::Value::Float(f) => Kind::NumberValue(*f),
        toml::Value::Boolean(b) => Kind::BoolValue(*b),
        toml::Value::Datetime(d) => Kind::StringValue(d.to_string()),
        toml::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        toml::Value::Table(t) => Kind::StructValue(to_struct(t)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The gRPC face of the configuration store.
#[derive(Debug, Clone)]
pub struct ConfigApi {
    store: Arc<ConfigStore>,
    xds: Arc<XdsStats>,
}

impl ConfigApi {
    /// Serves `store`, and the rejections of xDS clients in `xds`.
    pub fn new(store: Arc<ConfigStore>, xds: Arc<XdsStats>) -> Self {
        Self { store, xds }
    }
}

fn check_service(name: &str) -> Result<(), Status> {
    validate::service_name(name).map_err(|e| trellis::status::invalid_field("service", &e))
}

#[tonic::async_trait]
impl pb::config_service_server::ConfigService for ConfigApi {
    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        trellis::tls::peer_identity(&request)?;
        let service = request.into_inner().service;
        check_service(&service)?;
        Ok(Response::new(self.store.get(&service)))
    }

    type WatchConfigStream = ReceiverStream<Result<pb::WatchConfigResponse, Status>>;

    async fn watch_config(
        &self,
        request: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        let caller = trellis::tls::peer_identity(&request)?.id.clone();
        let service = request.into_inner().service;
        check_service(&service)?;
        let permit = self.store.registry.admit_watch(&caller)?;
        Ok(Response::new(self.store.watch(service, permit)))
    }

    async fn get_config_status(
        &self,
        request: Request<pb::GetConfigStatusRequest>,
    ) -> Result<Response<pb::GetConfigStatusResponse>, Status> {
        trellis::tls::peer_identity(&request)?;
        let mut status = self.store.status();
        status.xds_rejections = self.xds.rejections();
        Ok(Response::new(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let text = r#"
[[routes]]
method = "*"
timeout = "2s"

[[routes]]
method = "telco.usage.v1.UsageService/RecordUsage"
idempotent = true
load_balancing = "least_request"
retry = { max_attempts = 4, retryable_status_codes = ["unavailable", "8"], initial_backoff = "10ms" }

[[authorization]]
callers = ["settlement", "spiffe://trellis.local/ns/default/sa/edge"]
methods = ["telco.usage.v1.UsageService/*"]
action = "allow"

[settings]
currency = "EUR"
"#;
        let file = parse_file("usage.toml", text).unwrap();
        assert_eq!(file.routes.len(), 2);
        let snapshot = Snapshot {
            revision: 1,
            loaded_at: None,
            files: [("usage.toml".to_owned(), (text.to_owned(), file))].into(),
        };
        let (config, source) = ConfigStore::effective(&snapshot, "usage");
        assert_eq!(source, "usage.toml");
        let record = config
            .routes
            .iter()
            .find(|r| r.method_match.ends_with("RecordUsage"))
            .unwrap();
        // Own field, inherited field ("*" timeout), built-in field.
        assert!(record.idempotent);
        assert_eq!(record.timeout.unwrap().seconds, 2);
        let retry = record.retry.as_ref().unwrap();
        assert_eq!(retry.max_attempts, 4);
        assert_eq!(
            retry.retryable_status_codes,
            ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
        );
        assert_eq!(retry.max_backoff.unwrap().nanos, 250_000_000);
        assert_eq!(record.load_balancing(), pb::LoadBalancing::LeastRequest);
        assert_eq!(config.authorization.len(), 1);
    }

    #[test]
    fn reports_file_line_and_reason() {
        let cases = [
            (
                "[[routes]]\nmethod = \"*\"\ntimeout = \"soon\"\n",
                3,
                "not a duration",
            ),
            (
                "[[routes]]\nmethod = \"UsageService\"\n",
                2,
                "not a method match",
            ),
            (
                "[[routes]]\nmethod = \"*\"\ntimout = \"1s\"\n",
                3,
                "unknown field `timout`",
            ),
            (
                "[[authorization]]\ncallers = [\"Bad Name\"]\nmethods = [\"*\"]\naction = \"allow\"\n",
                2,
                "not a caller",
            ),
            (
                "[[authorization]]\ncallers = [\"*\"]\nmethods = [\"*\"]\naction = \"maybe\"\n",
                4,
                "unknown variant",
            ),
            (
                "[[routes]]\nmethod = \"*\"\nretry = { retryable_status_codes = [\"NOPE\"] }\n",
                3,
                "not a gRPC status code",
            ),
            (
                "[[routes]]\nmethod = \"*\"\n[[routes]]\nmethod = \"*\"\n",
                4,
                "more than one route",
            ),
            ("this is not toml", 1, ""),
            (
                "[[routes]]\nmethod = \"*\"\ntimeout = \"10000000000000000000s\"\n",
                3,
                "longer than the longest duration allowed",
            ),
            (
                "[[routes]]\nmethod = \"*\"\nretry = { max_backoff = \"25h\" }\n",
                3,
                "longer than the longest duration allowed",
            ),
            (
                "\ngrpc_services = [\"grpc.health.v1.Health\"]\n",
                2,
                "never a routable name",
            ),
            ("grpc_services = [\"a.B\", \"a.B\"]\n", 1, "given twice"),
        ];
        for (text, line, reason) in cases {
            let problem = parse_file("usage.toml", text).unwrap_err();
            assert_eq!(problem.file, "usage.toml");
            assert_eq!(problem.line, line, "{text}: {problem:?}");
            assert!(problem.message.contains(reason), "{text}: {problem:?}");
            assert!(problem.rejected);
        }
        let problem = parse_file("defaults.toml", "grpc_services = [\"a.B\"]\n").unwrap_err();
        assert!(problem.message.contains("cannot own"), "{problem:?}");
        // The longest allowed duration still fits every representation.
        let file = parse_file(
            "usage.toml",
            "[[routes]]\nmethod = \"*\"\ntimeout = \"24h\"\n",
        );
        assert!(file.is_ok(), "{file:?}");
    }

    /// Each refusal of a traffic-management entry: (file text, line, rule
    /// path, part of the message).
    const REFUSED: &[(&str, u32, &str, &str)] = &[
        (
            "[[routes]]\nmethod = \"*\"\nload_balancing = \"random\"\n",
            3,
            "routes[0].load_balancing",
            "random is not supported; use \"peak_ewma\" (the default), \"least_request\" or \"round_robin\"",
        ),
        (
            "[[routes]]\nmethod = \"*\"\nload_balancing = \"fastest\"\n",
            3,
            "",
            "\"fastest\" is not a load balancing policy: use \"peak_ewma\"",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.retry]\nper_try_timeout = \"0s\"\n",
            5,
            "routes[0].retry.per_try_timeout",
            "must be longer than 0; leave it out for no per-try timeout",
        ),
        (
            "[[routes]]\nmethod = \"*\"\nretry = { per_try_timeout = \"-1s\" }\n",
            3,
            "",
            "not a duration",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.hedge]\nmax_attempts = 3\n",
            4,
            "routes[0].hedge.delay",
            "is required",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.hedge]\ndelay = \"0ms\"\n",
            5,
            "routes[0].hedge.delay",
            "must be longer than 0",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.hedge]\ndelay = \"50ms\"\nmax_attempts = 1\n",
            6,
            "routes[0].hedge.max_attempts",
            "must be 2 to 5",
        ),
        (
            "[[routes]]\nmethod = \"*\"\nhedge = { delay = \"50ms\", max_attempts = 6 }\n",
            3,
            "routes[0].hedge.max_attempts",
            "must be 2 to 5",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.hedge]\ndelya = \"50ms\"\n",
            5,
            "",
            "unknown field `delya`",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[[routes]]\nmethod = \"a.B/*\"\n\n[routes.limit]\nmax_concurrent = 0\n",
            8,
            "routes[1].limit.max_concurrent",
            "a limit of 0 would refuse every call; remove the table for no limit",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.limit]\nmax_concurrent = 100001\n",
            5,
            "routes[0].limit.max_concurrent",
            "100001 is more than the most allowed, 100000",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.limit]\nmax_concurrent = 10\nmax_queued = 10001\n",
            6,
            "routes[0].limit.max_queued",
            "10001 is more than the most allowed, 10000",
        ),
        (
            "[[routes]]\nmethod = \"*\"\n\n[routes.limit]\nmax_queued = 10\n",
            4,
            "routes[0].limit.max_concurrent",
            "is required",
        ),
        (
            "[caller_limit]\nmax_concurrent = 0\n",
            2,
            "caller_limit.max_concurrent",
            "a limit of 0 would refuse every call; remove the table for no limit",
        ),
        ("[caller_limit]\nmax_concurrent = -1\n", 2, "", ""),
        (
            "\n[circuit_breaker]\nconsecutive_failures = 0\nfailure_rate = 0\n",
            2,
            "circuit_breaker",
            "nothing would open the circuit",
        ),
        (
            "[circuit_breaker]\nconsecutive_failures = 0\nfailure_rate = 0.0\n",
            1,
            "circuit_breaker",
            "nothing would open the circuit",
        ),
        (
            "[circuit_breaker]\nfailure_rate = 1.5\n",
            2,
            "circuit_breaker.failure_rate",
            "must be between 0 and 1",
        ),
        (
            "[circuit_breaker]\nfailure_rate = -0.1\n",
            2,
            "circuit_breaker.failure_rate",
            "must be between 0 and 1",
        ),
        (
            "[circuit_breaker]\nfailure_rate = nan\n",
            2,
            "circuit_breaker.failure_rate",
            "must be between 0 and 1",
        ),
        (
            "[circuit_breaker]\nminimum_calls = 0\n",
            2,
            "circuit_breaker.minimum_calls",
            "must be at least 1",
        ),
        (
            "[circuit_breaker]\nwindow = \"0s\"\n",
            2,
            "circuit_breaker.window",
            "must be longer than 0",
        ),
        (
            "[circuit_breaker]\nopen_for = \"0ms\"\n",
            2,
            "circuit_breaker.open_for",
            "must be longer than 0",
        ),
        (
            "[circuit_breaker]\nhalf_open_calls = 0\n",
            2,
            "circuit_breaker.half_open_calls",
            "must be 1 to 100",
        ),
        (
            "[circuit_breaker]\nhalf_open_calls = 101\n",
            2,
            "circuit_breaker.half_open_calls",
            "must be 1 to 100",
        ),
        (
            "[circuit_breaker]\nopen_after = 3\n",
            2,
            "",
            "unknown field `open_after`",
        ),
        (
            "[traffic]\nsplit = [\n  { version = \"v1\", weight = 90 },\n  { version = \"\", weight = 10 },\n]\n",
            4,
            "traffic.split[1].version",
            "must not be empty",
        ),
        (
            "[traffic]\nsplit = [{ version = \"v 2\", weight = 100 }]\n",
            2,
            "traffic.split[0].version",
            "1 to 64 printable ASCII characters without spaces",
        ),
        (
            "[traffic]\nsplit = [\n  { version = \"v1\", weight = 50 },\n  { version = \"v1\", weight = 50 },\n]\n",
            4,
            "traffic.split[1].version",
            "v1 is listed twice",
        ),
        (
            "[traffic]\nsplit = [\n  { version = \"v1\", weight = 101 },\n]\n",
            3,
            "traffic.split[0].weight",
            "101 is over 100",
        ),
        (
            "[traffic]\nsplit = [\n  { version = \"v1\", weight = 90 },\n  { version = \"v2\", weight = 5 },\n]\n",
            2,
            "traffic.split",
            "weights add up to 95; they must add up to exactly 100",
        ),
        (
            "[traffic]\nsplit = [{ version = \"v1\", weight = 100, zone = \"a\" }]\n",
            2,
            "",
            "unknown field `zone`",
        ),
        (
            "[traffic]\nversion_header_callers = [\"Edge Proxy\"]\n",
            2,
            "",
            "not a caller",
        ),
    ];

    #[test]
    fn refuses_traffic_management_mistakes_with_file_line_and_rule() {
        for (text, line, rule, reason) in REFUSED {
            let problem = parse_file("echo.toml", text).unwrap_err();
            assert_eq!(problem.file, "echo.toml");
            assert_eq!(problem.line, *line, "{text}: {problem:?}");
            assert_eq!(problem.rule, *rule, "{text}: {problem:?}");
            assert!(problem.message.contains(reason), "{text}: {problem:?}");
            assert!(problem.rejected);
        }
        let problem = parse_file(
            "defaults.toml",
            "[[routes]]\nmethod = \"*\"\n\n[traffic]\nsplit = [{ version = \"v1\", weight = 100 }]\n",
        )
        .unwrap_err();
        assert_eq!((problem.line, problem.rule.as_str()), (4, "traffic"));
        assert!(
            problem
                .message
                .contains("a traffic split belongs to one service's file"),
            "{problem:?}"
        );
    }

    #[test]
    fn accepts_the_edges_of_each_range() {
        for text in [
            "[[routes]]\nmethod = \"*\"\nload_balancing = \"peak_ewma\"\nhedge = { delay = \"1ms\", max_attempts = 5 }\nlimit = { max_concurrent = 100000, max_queued = 10000 }\n",
            "[[routes]]\nmethod = \"*\"\nload_balancing = \"round_robin\"\nlimit = { max_concurrent = 1 }\nretry = { per_try_timeout = \"24h\" }\n",
            "[circuit_breaker]\nconsecutive_failures = 0\n",
            "[circuit_breaker]\nfailure_rate = 0\nhalf_open_calls = 100\n",
            "[circuit_breaker]\nfailure_rate = 1\nminimum_calls = 1\n",
            "[circuit_breaker]\n",
            "[traffic]\nsplit = []\nversion_header_callers = [\"edge\", \"*\"]\n",
            "[traffic]\nsplit = [{ version = \"v1\", weight = 100 }, { version = \"v2\", weight = 0 }]\n",
        ] {
            let file = parse_file("echo.toml", text);
            assert!(file.is_ok(), "{text}: {file:?}");
        }
    }

    fn snapshot(files: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            revision: 1,
            loaded_at: None,
            files: files
                .iter()
                .map(|(name, text)| {
                    let file = parse_file(name, text).unwrap();
                    ((*name).to_owned(), ((*text).to_owned(), file))
                })
                .collect(),
        }
    }

    fn route<'a>(config: &'a pb::ServiceConfig, method_match: &str) -> &'a pb::RoutePolicy {
        config
            .routes
            .iter()
            .find(|r| r.method_match == method_match)
            .unwrap_or_else(|| panic!("no route {method_match} in {config:?}"))
    }

    fn ms(d: Option<prost_types::Duration>) -> u128 {
        let d = d.expect("a duration");
        Duration::new(d.seconds as u64, d.nanos as u32).as_millis()
    }

    const DEFAULTS: &str = r#"
[[routes]]
method = "*"
load_balancing = "least_request"

[routes.retry]
per_try_timeout = "1s"

[routes.hedge]
delay = "100ms"

[routes.limit]
max_concurrent = 50

[circuit_breaker]
consecutive_failures = 3

[caller_limit]
max_concurrent = 200
max_queued = 10
"#;

    const ECHO: &str = r#"
[[routes]]
method = "trellis.echo.v1.EchoService/*"

[routes.retry]
per_try_timeout = "300ms"

[[routes]]
method = "trellis.echo.v1.EchoService/Echo"
load_balancing = "round_robin"

[routes.hedge]
delay = "20ms"
max_attempts = 3

[circuit_breaker]
failure_rate = 0.25

[traffic]
split = [{ version = "v1", weight = 90 }, { version = "v2", weight = 10 }]
version_header_callers = ["usage", "edge"]
"#;

    #[test]
    fn traffic_management_is_inherited_field_by_field_and_table_by_table() {
        let snapshot = snapshot(&[("defaults.toml", DEFAULTS), ("echo.toml", ECHO)]);
        let (echo, _) = ConfigStore::effective(&snapshot, "echo");

        let all = route(&echo, "*");
        assert_eq!(all.load_balancing(), pb::LoadBalancing::LeastRequest);
        assert_eq!(ms(all.retry.as_ref().unwrap().per_try_timeout), 1000);
        let hedge = all.hedge.unwrap();
        assert_eq!((ms(hedge.delay), hedge.max_attempts), (100, 2));
        let limit = all.limit.unwrap();
        assert_eq!((limit.max_concurrent, limit.max_queued), (50, 0));

        // Own per-try timeout; balancing, hedge and limit from the defaults.
        let service = route(&echo, "trellis.echo.v1.EchoService/*");
        assert_eq!(service.load_balancing(), pb::LoadBalancing::LeastRequest);
        assert_eq!(ms(service.retry.as_ref().unwrap().per_try_timeout), 300);
        assert_eq!(ms(service.hedge.unwrap().delay), 100);
        assert_eq!(service.limit.unwrap().max_concurrent, 50);

        // Own balancing and hedge (whole: max_attempts is its own, not
        // inherited), per-try timeout from the service's wildcard.
        let method = route(&echo, "trellis.echo.v1.EchoService/Echo");
        assert_eq!(method.load_balancing(), pb::LoadBalancing::RoundRobin);
        assert_eq!(ms(method.retry.as_ref().unwrap().per_try_timeout), 300);
        let hedge = method.hedge.unwrap();
        assert_eq!((ms(hedge.delay), hedge.max_attempts), (20, 3));
        assert_eq!(method.limit.unwrap().max_concurrent, 50);

        // The service's breaker replaces the defaults' whole: its unset
        // fields are built in, not the defaults' consecutive_failures = 3.
        let breaker = echo.circuit_breaker.unwrap();
        assert_eq!(breaker.consecutive_failures, 5);
        assert_eq!(breaker.failure_rate, 0.25);
        assert_eq!(breaker.minimum_calls, 20);
        assert_eq!(ms(breaker.window), 10_000);
        assert_eq!(ms(breaker.open_for), 5_000);
        assert_eq!(breaker.half_open_calls, 1);
        let caller_limit = echo.caller_limit.unwrap();
        assert_eq!(
            (caller_limit.max_concurrent, caller_limit.max_queued),
            (200, 10)
        );
        let traffic = echo.traffic.unwrap();
        let split: Vec<_> = traffic
            .split
            .iter()
            .map(|w| (w.version.as_str(), w.weight))
            .collect();
        assert_eq!(split, [("v1", 90), ("v2", 10)]);
        assert_eq!(traffic.version_header_callers, ["usage", "edge"]);

        // A service without a file gets the defaults' tables, and no split.
        let (usage, _) = ConfigStore::effective(&snapshot, "usage");
        assert_eq!(usage.circuit_breaker.unwrap().consecutive_failures, 3);
        assert_eq!(usage.caller_limit.unwrap().max_concurrent, 200);
        assert!(usage.traffic.is_none());

        // Nothing set anywhere: peak-EWMA, and no per-try timeout, hedge,
        // limit, breaker or split.
        let (bare, _) = ConfigStore::effective(&Snapshot::default(), "echo");
        let all = route(&bare, "*");
        assert_eq!(all.load_balancing(), pb::LoadBalancing::PeakEwma);
        assert!(all.retry.as_ref().unwrap().per_try_timeout.is_none());
        assert!(all.hedge.is_none() && all.limit.is_none());
        assert!(bare.circuit_breaker.is_none() && bare.caller_limit.is_none());
        assert!(bare.traffic.is_none());
    }

    #[test]
    fn the_shipped_defaults_file_is_accepted() {
        let text = include_str!("../../../config/defaults.toml");
        let snapshot = snapshot(&[("defaults.toml", text)]);
        let (config, _) = ConfigStore::effective(&snapshot, "echo");
        assert_eq!(
            route(&config, "*").load_balancing(),
            pb::LoadBalancing::PeakEwma
        );
    }

    fn echo_instance(
        version: &str,
        port: u16,
    ) -> trellis::pb::trellis::registry::v1::RegisterRequest {
        use trellis::pb::trellis::registry::v1 as reg;
        reg::RegisterRequest {
            service: "echo".into(),
            version: version.into(),
            address: format!("127.0.0.1:{port}"),
            health: reg::ServingStatus::Serving as i32,
            ..Default::default()
        }
    }

    /// A store over a directory holding `echo.toml` (with a 90/10 split of
    /// v1 and v2), its registry, and echo's identity.
    fn store_with_split() -> (
        tempfile::TempDir,
        Arc<ConfigStore>,
        Arc<Registry>,
        trellis::SpiffeId,
    ) {
        use crate::quota::Quotas;
        use crate::registry::MeshScope;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("echo.toml"), ECHO).unwrap();
        let scope = MeshScope {
            trust_domain: "trellis.local".into(),
            namespace: "default".into(),
        };
        let registry = Registry::new(scope, [], Quotas::UNLIMITED);
        let store = ConfigStore::open(dir.path(), registry.clone()).unwrap();
        let echo = trellis::SpiffeId::parse("spiffe://trellis.local/ns/default/sa/echo").unwrap();
        (dir, store, registry, echo)
    }

    /// The split problems GetConfigStatus reports (ECHO's methods are
    /// unknown too, with no contract registered).
    fn unserved(store: &ConfigStore) -> Vec<(String, u32, String)> {
        store
            .status()
            .problems
            .into_iter()
            .filter(|p| p.rule.starts_with("traffic"))
            .inspect(|p| assert!(!p.rejected, "{p:?}"))
            .map(|p| (p.rule, p.line, p.message))
            .collect()
    }

    #[test]
    fn a_split_version_without_a_serving_instance_is_reported_not_refused() {
        use trellis::pb::trellis::registry::v1::ServingStatus;
        let (_dir, store, registry, echo) = store_with_split();
        let split_line = ECHO.lines().position(|l| l.starts_with("split")).unwrap() as u32 + 1;

        let problems = unserved(&store);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].2.contains("nor has any other version"),
            "{problems:?}"
        );

        let v1 = registry.register(&echo, echo_instance("v1", 9001)).unwrap();
        assert_eq!(
            unserved(&store),
            [(
                "traffic.split[1].version".to_owned(),
                split_line,
                "version v2 of echo has no serving instance; its share goes to the other versions"
                    .to_owned()
            )]
        );
        // An instance of v2 that is not serving does not count.
        let mut v2 = echo_instance("v2", 9002);
        v2.health = ServingStatus::NotServing as i32;
        let v2 = registry.register(&echo, v2).unwrap();
        assert_eq!(unserved(&store).len(), 1);
        registry
            .set_health(&echo, &v2.instance_id, ServingStatus::Serving)
            .unwrap();
        assert!(unserved(&store).is_empty());
        registry
            .set_health(&echo, &v1.instance_id, ServingStatus::NotServing)
            .unwrap();
        assert_eq!(unserved(&store)[0].0, "traffic.split[0].version");
        registry.deregister(&echo, &v2.instance_id).unwrap();
        assert_eq!(unserved(&store).len(), 2);
    }

    #[test]
    fn only_a_versions_first_and_last_serving_instance_signal_a_change() {
        use trellis::pb::trellis::registry::v1::ServingStatus;
        let (_dir, _store, registry, echo) = store_with_split();
        let mut changes = registry.serving_versions_changes();
        let first = registry.register(&echo, echo_instance("v1", 9001)).unwrap();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let second = registry.register(&echo, echo_instance("v1", 9002)).unwrap();
        registry.deregister(&echo, &first.instance_id).unwrap();
        assert!(!changes.has_changed().unwrap());
        registry
            .set_health(&echo, &second.instance_id, ServingStatus::NotServing)
            .unwrap();
        assert!(changes.has_changed().unwrap());
        assert!(registry.serving_versions("echo").is_empty());
    }

    #[tokio::test]
    async fn the_watcher_rechecks_splits_when_instances_come_and_go() {
        let (_dir, store, registry, echo) = store_with_split();
        let logged = || {
            store
                .reader
                .lock()
                .unwrap()
                .unserved_logged
                .iter()
                .map(|p| p.rule.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(logged().len(), 2);
        let _watcher = store.spawn_watcher();
        let v1 = registry.register(&echo, echo_instance("v1", 9001)).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while logged() != ["traffic.split[1].version"] {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", logged());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        registry.deregister(&echo, &v1.instance_id).unwrap();
        while logged().len() != 2 {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", logged());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn losing_every_rule_takes_an_explicit_empty_list() {
        let with_rules =
            "[[authorization]]\ncallers = [\"*\"]\nmethods = [\"*\"]\naction = \"allow\"\n";
        let previous = parse_file("usage.toml", with_rules).unwrap();
        let accepted = BTreeMap::new();
        let check = |text: &str| {
            let file = parse_file("usage.toml", text).unwrap();
            check_against("usage.toml", text, &file, Some(&previous), &accepted)
        };
        assert!(check("").unwrap_err().message.contains("empty"));
        assert!(check("  \n").unwrap_err().message.contains("empty"));
        assert!(
            check("# cut\n")
                .unwrap_err()
                .message
                .contains("authorization = []")
        );
        assert!(check("authorization = []\n").is_ok());
        assert!(check(with_rules).is_ok());
        // A first version may be empty: there is nothing to lose.
        let empty = parse_file("usage.toml", "").unwrap();
        assert!(check_against("usage.toml", "", &empty, None, &accepted).is_ok());
    }

    #[test]
    fn a_grpc_service_is_declared_by_one_file() {
        let text = "grpc_services = [\"telco.usage.v1.UsageService\"]\n";
        let usage = parse_file("usage.toml", text).unwrap();
        let accepted: BTreeMap<_, _> = [("usage.toml".to_owned(), (text.to_owned(), usage))].into();
        let echo = parse_file("echo.toml", text).unwrap();
        let problem = check_against("echo.toml", text, &echo, None, &accepted).unwrap_err();
        assert!(
            problem.message.contains("already declared by usage.toml"),
            "{problem:?}"
        );
        assert_eq!(problem.line, 1);
        let declared = declarations(&accepted);
        assert_eq!(declared["telco.usage.v1.UsageService"].service, "usage");
    }
}
