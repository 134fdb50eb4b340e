//! The arithmetic of `trellis top`, free of I/O: reading the call series
//! out of a proxy's Prometheus text, the calls between two readings, and
//! latency quantiles from histogram buckets.
//!
//! Only the inbound side (`direction="inbound"`) is read: it sees every
//! call a service receives, whichever caller made it. Series are summed
//! over every label other than `service`, `method`, `grpc_status` and
//! `le`, so labels a proxy adds (a caller, a zone) change nothing here.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

/// Calls finished, by direction, service, method and final gRPC status.
pub const REQUESTS: &str = "trellis_proxy_requests_total";
/// The latency histogram's cumulative buckets.
pub const BUCKETS: &str = "trellis_proxy_request_duration_seconds_bucket";
/// The latency histogram's count of observations.
pub const COUNT: &str = "trellis_proxy_request_duration_seconds_count";

/// Most (service, method) pairs read from one proxy. A proxy keeps at
/// most 1,024 series per direction, so more is not a Trellis proxy.
pub const MAX_METHODS: usize = 4096;
/// Most distinct `grpc_status` values per method (gRPC has 17 codes).
pub const MAX_STATUSES: usize = 32;
/// Most distinct `le` bounds per method (a proxy uses 18).
pub const MAX_BOUNDS: usize = 64;

/// The status that counts as success; every other status is a failure.
pub const OK: &str = "OK";

/// A gRPC method of a gRPC service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Method {
    /// The gRPC service, e.g. `telco.usage.v1.UsageService`.
    pub service: String,
    /// The method, e.g. `RecordUsage`.
    pub method: String,
}

/// One method's counters, as read or as a difference of two readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Calls finished, by final gRPC status name (`OK`, `UNAVAILABLE`, …).
    pub by_status: BTreeMap<String, f64>,
    /// The latency histogram: (upper bound in seconds, calls at or under
    /// it), cumulative, sorted by bound; `+Inf` last when present.
    pub buckets: Vec<(f64, f64)>,
    /// Calls timed (the histogram's `_count`).
    pub timed: f64,
}

/// One proxy's inbound counters at one moment, by method.
pub type Scrape = BTreeMap<Method, Counters>;

/// Why a proxy's metrics could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More methods than any proxy keeps.
    #[error("more than {MAX_METHODS} (service, method) pairs in its metrics")]
    TooManyMethods,
    /// More values of a label for one method than make sense.
    #[error("{service}/{method}: more than {limit} distinct {label} values in its metrics")]
    TooManyValues {
        /// The gRPC service.
        service: String,
        /// The method.
        method: String,
        /// `grpc_status` or `le`.
        label: &'static str,
        /// The bound.
        limit: usize,
    },
}

impl Counters {
    /// Calls finished, whatever their status.
    pub fn calls(&self) -> f64 {
        // A fold from +0.0: an empty f64 sum is -0.0.
        self.by_status.values().fold(0.0, |sum, n| sum + n)
    }

    /// Calls that finished with a status other than OK.
    pub fn failures(&self) -> f64 {
        self.by_status
            .iter()
            .filter(|(status, _)| status.as_str() != OK)
            .fold(0.0, |sum, (_, n)| sum + n)
    }

    /// The share of calls that succeeded (0 to 1); `None` without calls.
    pub fn success_rate(&self) -> Option<f64> {
        let calls = self.calls();
        (calls > 0.0).then(|| (calls - self.failures()) / calls)
    }

    /// The `q` quantile of the latency, in seconds; `None` without timed
    /// calls. See [`quantile`].
    pub fn latency(&self, q: f64) -> Option<f64> {
        if self
            .buckets
            .last()
            .is_some_and(|(le, _)| *le == f64::INFINITY)
        {
            return quantile(q, &self.buckets);
        }
        // Without a +Inf bucket the count stands for it.
        let mut buckets = self.buckets.clone();
        buckets.push((f64::INFINITY, self.timed));
        quantile(q, &buckets)
    }

    /// Adds `other`'s counts to these (series by series, buckets by bound).
    pub fn add(&mut self, other: &Counters) {
        for (status, n) in &other.by_status {
            *self.by_status.entry(status.clone()).or_default() += n;
        }
        for &(le, n) in &other.buckets {
            add_bucket(&mut self.buckets, le, n);
        }
        self.timed += other.timed;
    }

    /// Whether any counter here is lower than in `earlier`, or missing: a
    /// counter only goes down when its process starts again.
    fn went_down_from(&self, earlier: &Counters) -> bool {
        earlier
            .by_status
            .iter()
            .any(|(status, n)| self.by_status.get(status).is_none_or(|now| now < n))
            || earlier.buckets.iter().any(|&(le, n)| {
                self.buckets
                    .iter()
                    .find(|(b, _)| *b == le)
                    .is_none_or(|&(_, now)| now < n)
            })
            || self.timed < earlier.timed
    }

    /// `self - earlier`, series by series.
    fn minus(&self, earlier: &Counters) -> Counters {
        let by_status = self
            .by_status
            .iter()
            .map(|(status, n)| {
                let before = earlier.by_status.get(status).copied().unwrap_or(0.0);
                (status.clone(), n - before)
            })
            .collect();
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(b, _)| *b == le)
                    .map_or(0.0, |&(_, n)| n);
                (le, n - before)
            })
            .collect();
        Counters {
            by_status,
            buckets,
            timed: self.timed - earlier.timed,
        }
    }
}

/// Adds `n` to the bucket with bound `le`, keeping the buckets sorted.
fn add_bucket(buckets: &mut Vec<(f64, f64)>, le: f64, n: f64) {
    match buckets.binary_search_by(|(b, _)| b.total_cmp(&le)) {
        Ok(at) => buckets[at].1 += n,
        Err(at) => buckets.insert(at, (le, n)),
    }
}

/// Reads the inbound call series out of a proxy's Prometheus text. Lines
/// that do not parse, other metrics, other directions and samples that
/// are not finite non-negative numbers are skipped; a text with more
/// methods or label values than a proxy keeps is refused.
pub fn parse(text: &str) -> Result<Scrape, ParseError> {
    let mut scrape = Scrape::new();
    for line in text.lines() {
        let line = line.trim();
        // Cheap test first: most of a proxy's lines are other metrics.
        if !line.starts_with("trellis_proxy_request") {
            continue;
        }
        let Some(sample) = Sample::parse(line) else {
            continue;
        };
        if !matches!(sample.name, REQUESTS | BUCKETS | COUNT)
            || sample.label("direction") != Some("inbound")
            || !sample.value.is_finite()
            || sample.value < 0.0
        {
            continue;
        }
        let (Some(service), Some(method)) = (sample.label("service"), sample.label("method"))
        else {
            continue;
        };
        // Checked before the method is added: a malformed line adds nothing.
        let status = sample.label("grpc_status");
        let le = sample.label("le").and_then(parse_value);
        match sample.name {
            REQUESTS if status.is_none() => continue,
            BUCKETS if le.is_none_or(f64::is_nan) => continue,
            _ => {}
        }
        let key = Method {
            service: service.to_owned(),
            method: method.to_owned(),
        };
        let methods = scrape.len();
        let counters = match scrape.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                if methods >= MAX_METHODS {
                    return Err(ParseError::TooManyMethods);
                }
                e.insert(Counters::default())
            }
        };
        let too_many = |label, limit| ParseError::TooManyValues {
            service: service.to_owned(),
            method: method.to_owned(),
            label,
            limit,
        };
        match sample.name {
            REQUESTS => {
                let status = status.expect("checked above");
                if !counters.by_status.contains_key(status)
                    && counters.by_status.len() >= MAX_STATUSES
                {
                    return Err(too_many("grpc_status", MAX_STATUSES));
                }
                *counters.by_status.entry(status.to_owned()).or_default() += sample.value;
            }
            BUCKETS => {
                let le = le.expect("checked above");
                if !counters.buckets.iter().any(|(b, _)| *b == le)
                    && counters.buckets.len() >= MAX_BOUNDS
                {
                    return Err(too_many("le", MAX_BOUNDS));
                }
                add_bucket(&mut counters.buckets, le, sample.value);
            }
            _ => counters.timed += sample.value,
        }
    }
    Ok(scrape)
}

/// Calls one proxy received, by caller (the `caller` label: the calling
/// mesh service, `edge`, or for the edge's own side the API key's name)
/// and gRPC service, by final status.
pub type Callers = BTreeMap<(String, String), BTreeMap<String, f64>>;

/// Reads the inbound calls by caller out of a proxy's Prometheus text;
/// the same bounds and skipping as [`parse`].
pub fn parse_callers(text: &str) -> Result<Callers, ParseError> {
    let mut callers = Callers::new();
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with(REQUESTS) {
            continue;
        }
        let Some(sample) = Sample::parse(line) else {
            continue;
        };
        if sample.name != REQUESTS
            || sample.label("direction") != Some("inbound")
            || !sample.value.is_finite()
            || sample.value < 0.0
        {
            continue;
        }
        let (Some(caller), Some(service), Some(status)) = (
            sample.label("caller"),
            sample.label("service"),
            sample.label("grpc_status"),
        ) else {
            continue;
        };
        let key = (caller.to_owned(), service.to_owned());
        let pairs = callers.len();
        let statuses = match callers.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                if pairs >= MAX_METHODS {
                    return Err(ParseError::TooManyMethods);
                }
                e.insert(BTreeMap::new())
            }
        };
        if !statuses.contains_key(status) && statuses.len() >= MAX_STATUSES {
            return Err(ParseError::TooManyValues {
                service: service.to_owned(),
                method: format!("(caller {caller})"),
                label: "grpc_status",
                limit: MAX_STATUSES,
            });
        }
        *statuses.entry(status.to_owned()).or_default() += sample.value;
    }
    Ok(callers)
}

/// The calls one proxy handled between two readings. A counter lower
/// than before (or gone) means the proxy restarted in between, which
/// resets every counter it has: then the calls since its start, `after`
/// itself, are what it handled.
pub fn delta(before: &Scrape, after: &Scrape) -> Scrape {
    let restarted = before
        .iter()
        .any(|(m, earlier)| after.get(m).is_none_or(|now| now.went_down_from(earlier)));
    if restarted {
        return after.clone();
    }
    after
        .iter()
        .map(|(m, now)| {
            let counters = match before.get(m) {
                Some(earlier) => now.minus(earlier),
                None => now.clone(),
            };
            (m.clone(), counters)
        })
        .collect()
}

/// The `q` quantile (0 to 1) of the observations in `buckets`
/// (cumulative counts by upper bound, sorted, `+Inf` last), as
/// Prometheus' `histogram_quantile` estimates it: linear interpolation
/// inside the bucket the rank falls in, the lowest bucket starting at 0,
/// and the highest finite bound when the rank falls in `+Inf`. `None`
/// without observations or without a `+Inf` bucket.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let q = q.clamp(0.0, 1.0);
    if buckets.len() < 2 || buckets.last()?.0 != f64::INFINITY {
        return None;
    }
    // Counts read at slightly different moments can dip; cumulative
    // counts never do.
    let mut cumulative = Vec::with_capacity(buckets.len());
    let mut highest = 0.0_f64;
    for &(le, n) in buckets {
        highest = highest.max(n);
        cumulative.push((le, highest));
    }
    let observations = cumulative.last()?.1;
    if observations <= 0.0 {
        return None;
    }
    let rank = q * observations;
    let last = cumulative.len() - 1;
    let b = cumulative[..last]
        .iter()
        .position(|&(_, n)| n >= rank)
        .unwrap_or(last);
    if b == last {
        return Some(cumulative[last - 1].0);
    }
    let (end, count) = cumulative[b];
    if b == 0 && end <= 0.0 {
        return Some(end);
    }
    let (start, below) = if b == 0 {
        (0.0, 0.0)
    } else {
        cumulative[b - 1]
    };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(start);
    }
    Some(start + (end - start) * ((rank - below) / in_bucket))
}

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn parse(line: &'a str) -> Option<Self> {
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            loop {
                rest = rest.trim_start();
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = rest.find('=')?;
                let label = rest[..eq].trim();
                if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return None;
                }
                let (value, after) = quoted(rest[eq + 1..].trim_start())?;
                labels.push((label, value));
                rest = after.trim_start();
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else if !rest.starts_with('}') {
                    return None;
                }
            }
        }
        // The value, then an optional timestamp, and nothing else.
        let mut fields = rest.split_ascii_whitespace();
        let value = parse_value(fields.next()?)?;
        if let Some(timestamp) = fields.next() {
            timestamp.parse::<f64>().ok()?;
        }
        if fields.next().is_some() {
            return None;
        }
        Some(Self {
            name,
            labels,
            value,
        })
    }
}

/// A sample value or an `le` bound: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(text: &str) -> Option<f64> {
    text.parse().ok()
}

/// Reads a `"..."` label value off the start of `text`, undoing the
/// escapes `\\`, `\"` and `\n`; returns it and what follows.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut chars = text.strip_prefix('"')?.char_indices();
    let mut value = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 2..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(service: &str, method: &str) -> Method {
        Method {
            service: service.into(),
            method: method.into(),
        }
    }

    #[test]
    fn callers_are_read_from_inbound_calls_only() {
        let text = r#"trellis_proxy_requests_total{direction="inbound",service="e.v1.Echo",method="Echo",grpc_status="OK",caller="edge"} 7
trellis_proxy_requests_total{direction="inbound",service="e.v1.Echo",method="Count",grpc_status="OK",caller="edge"} 3
trellis_proxy_requests_total{direction="inbound",service="e.v1.Echo",method="Echo",grpc_status="UNAVAILABLE",caller="usage"} 2
trellis_proxy_requests_total{direction="outbound",service="e.v1.Echo",method="Echo",grpc_status="OK",caller="echo"} 99
trellis_proxy_requests_total{direction="inbound",service="e.v1.Echo",method="Echo",grpc_status="OK"} 5
"#;
        let callers = parse_callers(text).unwrap();
        let edge = &callers[&("edge".to_owned(), "e.v1.Echo".to_owned())];
        assert_eq!(edge[OK], 10.0);
        let usage = &callers[&("usage".to_owned(), "e.v1.Echo".to_owned())];
        assert_eq!(usage["UNAVAILABLE"], 2.0);
        assert_eq!(
            callers.len(),
            2,
            "outbound and caller-less series are skipped"
        );

        let many: String = (0..=MAX_METHODS)
            .map(|n| {
                format!(
                    "trellis_proxy_requests_total{{direction=\"inbound\",service=\"s\",method=\"m\",grpc_status=\"OK\",caller=\"c{n}\"}} 1\n"
                )
            })
            .collect();
        assert_eq!(parse_callers(&many), Err(ParseError::TooManyMethods));
    }

    /// A proxy's exposition with `ok` and `unavailable` inbound Echo calls,
    /// and some lines that must be ignored.
    fn exposition(ok: u64, unavailable: u64, fast: u64) -> String {
        let all = ok + unavailable;
        format!(
            r#"# HELP trellis_proxy_requests Calls handled.
# TYPE trellis_proxy_requests counter
trellis_proxy_requests_total{{direction="inbound",service="e.v1.Echo",method="Echo",grpc_status="OK"}} {ok}
trellis_proxy_requests_total{{direction="inbound",service="e.v1.Echo",method="Echo",grpc_status="UNAVAILABLE"}} {unavailable}
trellis_proxy_requests_total{{direction="outbound",service="e.v1.Echo",method="Echo",grpc_status="OK"}} 999
trellis_proxy_request_duration_seconds_sum{{direction="inbound",service="e.v1.Echo",method="Echo"}} 1.5
trellis_proxy_request_duration_seconds_count{{direction="inbound",service="e.v1.Echo",method="Echo"}} {all}
trellis_proxy_request_duration_seconds_bucket{{le="0.001",direction="inbound",service="e.v1.Echo",method="Echo"}} {fast}
trellis_proxy_request_duration_seconds_bucket{{le="0.002",direction="inbound",service="e.v1.Echo",method="Echo"}} {all}
trellis_proxy_request_duration_seconds_bucket{{le="+Inf",direction="inbound",service="e.v1.Echo",method="Echo"}} {all}
trellis_proxy_retries_total{{service="e.v1.Echo"}} 4
# EOF
"#
        )
    }

    #[test]
    fn reads_inbound_calls_by_status_and_their_histogram() {
        let scrape = parse(&exposition(90, 10, 40)).unwrap();
        assert_eq!(scrape.len(), 1);
        let echo = &scrape[&method("e.v1.Echo", "Echo")];
        assert_eq!(echo.calls(), 100.0, "outbound calls are not counted");
        assert_eq!(echo.failures(), 10.0);
        assert_eq!(echo.success_rate(), Some(0.9));
        assert_eq!(
            echo.buckets,
            [(0.001, 40.0), (0.002, 100.0), (f64::INFINITY, 100.0)]
        );
        assert_eq!(echo.timed, 100.0);
    }

    #[test]
    fn extra_labels_are_summed_away() {
        let text = r#"
trellis_proxy_requests_total{direction="inbound",caller="spiffe://t/ns/default/sa/a",service="s.S",method="M",grpc_status="OK"} 3
trellis_proxy_requests_total{direction="inbound",caller="spiffe://t/ns/default/sa/b",service="s.S",method="M",grpc_status="OK"} 4
trellis_proxy_requests_total{direction="inbound",caller="spiffe://t/ns/default/sa/b",service="s.S",method="M",grpc_status="INTERNAL",zone="z"} 1
trellis_proxy_request_duration_seconds_bucket{direction="inbound",caller="a",service="s.S",method="M",le="0.5"} 3
trellis_proxy_request_duration_seconds_bucket{direction="inbound",caller="b",service="s.S",method="M",le="0.5"} 5
trellis_proxy_request_duration_seconds_bucket{direction="inbound",caller="a",service="s.S",method="M",le="+Inf"} 3
trellis_proxy_request_duration_seconds_bucket{direction="inbound",caller="b",service="s.S",method="M",le="+Inf"} 5
"#;
        let scrape = parse(text).unwrap();
        let m = &scrape[&method("s.S", "M")];
        assert_eq!(m.by_status["OK"], 7.0);
        assert_eq!(m.by_status["INTERNAL"], 1.0);
        assert_eq!(m.buckets, [(0.5, 8.0), (f64::INFINITY, 8.0)]);
    }

    #[test]
    fn malformed_lines_are_skipped_and_the_rest_read() {
        let text = r#"
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK"} 5
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK" 5
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK"} five
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK"} -3
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK"} NaN
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK"} 1 2 3
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M"} 7
trellis_proxy_requests_total{direction="inbound",method="M",grpc_status="OK"} 7
trellis_proxy_requests_total{direction="inbound",service="s.S",method="M",grpc_status="OK",bad-label="x"} 7
trellis_proxy_request_duration_seconds_bucket{direction="inbound",service="s.S",method="M",le="soon"} 7
trellis_proxy_requests_total{direction="inbound",service="t.T",method="N",grpc_status="OK"} 2 1700000000000
trellis_proxy_requests_total{ direction = "inbound" , service="quoted \"s\"\\x",method="M",grpc_status="OK", } 1
"#;
        let scrape = parse(text).unwrap();
        assert_eq!(scrape[&method("s.S", "M")].calls(), 5.0);
        assert_eq!(scrape[&method("t.T", "N")].calls(), 2.0);
        assert_eq!(scrape[&method("quoted \"s\"\\x", "M")].calls(), 1.0);
        assert_eq!(scrape.len(), 3, "{scrape:?}");
    }

    #[test]
    fn more_methods_than_a_proxy_keeps_is_refused() {
        let text: String = (0..=MAX_METHODS)
            .map(|i| {
                format!(
                    "trellis_proxy_requests_total{{direction=\"inbound\",service=\"s\",method=\"m{i}\",grpc_status=\"OK\"}} 1\n"
                )
            })
            .collect();
        assert_eq!(parse(&text), Err(ParseError::TooManyMethods));
        let text: String = (0..=MAX_STATUSES)
            .map(|i| {
                format!(
                    "trellis_proxy_requests_total{{direction=\"inbound\",service=\"s\",method=\"m\",grpc_status=\"S{i}\"}} 1\n"
                )
            })
            .collect();
        let error = parse(&text).unwrap_err();
        assert!(error.to_string().contains("grpc_status"), "{error}");
    }

    #[test]
    fn rates_come_from_the_difference_of_two_readings() {
        let before = parse(&exposition(90, 10, 40)).unwrap();
        let after = parse(&exposition(180, 20, 50)).unwrap();
        let d = delta(&before, &after);
        let echo = &d[&method("e.v1.Echo", "Echo")];
        assert_eq!(echo.calls(), 100.0);
        assert_eq!(echo.failures(), 10.0);
        assert_eq!(
            echo.buckets,
            [(0.001, 10.0), (0.002, 100.0), (f64::INFINITY, 100.0)]
        );
        // Nothing happened: no calls, not a failure rate.
        let idle = delta(&after, &after);
        assert_eq!(idle[&method("e.v1.Echo", "Echo")].calls(), 0.0);
        assert_eq!(idle[&method("e.v1.Echo", "Echo")].success_rate(), None);
        assert_eq!(idle[&method("e.v1.Echo", "Echo")].latency(0.5), None);
    }

    #[test]
    fn a_counter_that_went_down_is_a_restart() {
        let before = parse(&exposition(90, 10, 40)).unwrap();
        let restarted = parse(&exposition(30, 0, 30)).unwrap();
        let d = delta(&before, &restarted);
        assert_eq!(d[&method("e.v1.Echo", "Echo")].calls(), 30.0);
        assert_eq!(d[&method("e.v1.Echo", "Echo")].failures(), 0.0);

        // A series gone is a restart too; a new one counts from zero.
        let mut other = parse(&exposition(1, 0, 1)).unwrap();
        let m = other.remove(&method("e.v1.Echo", "Echo")).unwrap();
        other.insert(method("e.v1.Echo", "Other"), m);
        let d = delta(&before, &other);
        assert!(!d.contains_key(&method("e.v1.Echo", "Echo")));
        assert_eq!(d[&method("e.v1.Echo", "Other")].calls(), 1.0);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let buckets = [
            (0.001, 40.0),
            (0.002, 100.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        // Rank 50 lies 10 of 60 calls into (1ms, 2ms].
        let p50 = quantile(0.5, &buckets).unwrap();
        assert!((p50 - (0.001 + 0.001 * 10.0 / 60.0)).abs() < 1e-12, "{p50}");
        // Rank 20 lies halfway into (0, 1ms].
        assert!((quantile(0.2, &buckets).unwrap() - 0.0005).abs() < 1e-12);
        let p99 = quantile(0.99, &buckets).unwrap();
        assert!((p99 - (0.001 + 0.001 * 59.0 / 60.0)).abs() < 1e-12, "{p99}");

        // In +Inf: the highest finite bound.
        let slow = [(0.001, 1.0), (0.002, 2.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.99, &slow), Some(0.002));

        // No observations, no +Inf, or a single bucket: no estimate.
        assert_eq!(quantile(0.5, &[(0.001, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(0.001, 3.0), (0.002, 3.0)]), None);
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 3.0)]), None);

        // Counts that dip are made monotonic.
        let dipping = [(0.001, 10.0), (0.002, 9.0), (f64::INFINITY, 10.0)];
        assert!((quantile(0.5, &dipping).unwrap() - 0.0005).abs() < 1e-12);
    }

    #[test]
    fn counters_add_up_across_proxies() {
        let a = parse(&exposition(90, 10, 40)).unwrap();
        let b = parse(&exposition(10, 0, 10)).unwrap();
        let mut sum = Counters::default();
        sum.add(&a[&method("e.v1.Echo", "Echo")]);
        sum.add(&b[&method("e.v1.Echo", "Echo")]);
        assert_eq!(sum.calls(), 110.0);
        assert_eq!(sum.buckets[0], (0.001, 50.0));
        assert_eq!(sum.timed, 110.0);
        // Without a +Inf bucket, the count stands in for it.
        let no_inf = Counters {
            buckets: vec![(0.001, 5.0)],
            timed: 10.0,
            ..Default::default()
        };
        assert_eq!(no_inf.latency(0.99), Some(0.001));
    }
}
