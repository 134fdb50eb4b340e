//! A mesh service's configuration from the Config API, compiled for the
//! request path: route policies (deadline, retries, balancing, hedging,
//! concurrency limits), authorization, the circuit breaker, the caller-side
//! limit and the version split.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tonic::Code;
use trellis::identity::SpiffeId;
use trellis::pb::trellis::config::v1 as pb;

use crate::grpc;

/// Retry settings of a route.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// Statuses worth another attempt on a safe method.
    pub retryable: Vec<Code>,
    /// The first backoff; doubles per retry, with full jitter.
    pub initial_backoff: Duration,
    /// The cap on one backoff.
    pub max_backoff: Duration,
    /// Retries may be at most this fraction of calls.
    pub budget_ratio: f64,
    /// Requests larger than this are not recorded for replay.
    pub max_buffered_bytes: usize,
    /// How long one attempt may take to answer.
    pub per_try_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retryable: vec![Code::Unavailable],
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            budget_ratio: 0.2,
            max_buffered_bytes: 64 * 1024,
            per_try_timeout: None,
        }
    }
}

/// How an endpoint is picked among those a call may go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Balancing {
    /// Each in turn.
    RoundRobin,
    /// Of two picked at random, the one with fewer calls in flight.
    LeastRequest,
    /// Of two picked at random, the one with the lower peak-EWMA cost.
    #[default]
    PeakEwma,
}

impl Balancing {
    /// The policy's choice; unspecified (and the refused RANDOM) mean the
    /// default.
    fn from_proto(value: pb::LoadBalancing) -> Self {
        match value {
            pb::LoadBalancing::RoundRobin => Self::RoundRobin,
            pb::LoadBalancing::LeastRequest => Self::LeastRequest,
            pb::LoadBalancing::PeakEwma
            | pb::LoadBalancing::Unspecified
            | pb::LoadBalancing::Random => Self::PeakEwma,
        }
    }
}

/// Hedging: copies of a slow call to other endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hedge {
    /// How long to wait for an answer before the next copy.
    pub delay: Duration,
    /// Copies in all, the first included.
    pub max_attempts: u32,
}

/// A bound on calls in flight, with a bounded queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Calls in flight at once.
    pub max_concurrent: u32,
    /// Calls that may wait for a place.
    pub max_queued: u32,
}

impl Limit {
    fn from_proto(limit: &pb::ConcurrencyLimit) -> Option<Self> {
        // A limit of 0 is refused by the registry; read as "no limit"
        // rather than "refuse everything" should one arrive anyway.
        (limit.max_concurrent > 0).then_some(Self {
            max_concurrent: limit.max_concurrent,
            max_queued: limit.max_queued,
        })
    }
}

/// When a caller's circuit to a service opens and closes again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Breaker {
    /// Failures in a row that open it (0: only the rate).
    pub consecutive_failures: u32,
    /// Share of failures over `window` that opens it (0: only the count).
    pub failure_rate: f64,
    /// Fewest calls in `window` before the rate applies.
    pub minimum_calls: u32,
    /// How far back the rate looks.
    pub window: Duration,
    /// How long it stays open before probing.
    pub open_for: Duration,
    /// Probes let through while half-open.
    pub half_open_calls: u32,
}

impl Breaker {
    fn from_proto(b: &pb::CircuitBreaker) -> Option<Self> {
        let breaker = Self {
            consecutive_failures: b.consecutive_failures,
            failure_rate: b.failure_rate.clamp(0.0, 1.0),
            minimum_calls: b.minimum_calls.max(1),
            window: b
                .window
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(10)),
            open_for: b
                .open_for
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(5)),
            half_open_calls: b.half_open_calls.max(1),
        };
        (breaker.consecutive_failures > 0 || breaker.failure_rate > 0.0).then_some(breaker)
    }
}

/// The versions a service's calls go to.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Split {
    /// Versions and their weights (percent), in config order.
    pub weights: Vec<(Arc<str>, u32)>,
}

/// The policy for calls matching one `method_match`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Route {
    /// `*`, `pkg.Service/*` or `pkg.Service/Method`.
    pub method_match: String,
    /// The whole call's deadline, retries included (the caller's
    /// `grpc-timeout` applies too, whichever is sooner).
    pub timeout: Option<Duration>,
    /// Retry settings.
    pub retry: RetryPolicy,
    /// Config says the method is safe to repeat.
    pub idempotent: bool,
    /// How an endpoint is picked.
    pub balancing: Balancing,
    /// Hedging for safe methods.
    pub hedge: Option<Hedge>,
    /// The callee side's limit on calls in flight, per method.
    pub limit: Option<Limit>,
}

/// Where a bare service name (`settlement`, in a rule or in
/// `--trusted-edge`) applies: the proxy's own trust domain and namespace.
/// `spiffe://trellis.local/ns/other/sa/settlement` is another workload
/// than `settlement` of our namespace, and must not pass for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locality {
    trust_domain: String,
    namespace: Option<String>,
}

impl Locality {
    /// The trust domain and namespace of `own`, the proxy's identity.
    pub fn of(own: &SpiffeId) -> Self {
        Self {
            trust_domain: own.trust_domain().to_owned(),
            namespace: own.namespace().map(str::to_owned),
        }
    }

    /// The service `caller` is, if it is in this trust domain and
    /// namespace; none for a caller anywhere else.
    pub fn local_service<'a>(&self, caller: &'a SpiffeId) -> Option<&'a str> {
        if caller.trust_domain() != self.trust_domain
            || caller.namespace() != self.namespace.as_deref()
        {
            return None;
        }
        caller.service()
    }

    /// Whether an entry of a caller list (`*`, a SPIFFE ID, or a bare
    /// service name, meaning that service here) names `caller`.
    pub fn names<'a>(&self, caller: &'a SpiffeId) -> impl Fn(&String) -> bool + 'a {
        let local_name = self.local_service(caller);
        move |c| c == "*" || c == caller.as_str() || local_name.is_some_and(|s| s == c)
    }
}

/// Who may call; see `trellis.config.v1.AuthorizationRule`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    callers: Vec<String>,
    methods: Vec<String>,
    allow: bool,
}

/// One mesh service's compiled configuration.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ServicePolicy {
    routes: Vec<Arc<Route>>,
    rules: Vec<Rule>,
    /// Whether any route has a callee-side limit.
    limited: bool,
    /// The caller side's circuit breaker for calls to the service.
    pub breaker: Option<Breaker>,
    /// The caller side's limit on calls in flight to the service.
    pub caller_limit: Option<Limit>,
    /// Which versions get the calls.
    pub split: Split,
    /// Callers whose `x-trellis-version` header picks the version.
    version_header_callers: Vec<String>,
}

/// Whether `pattern` (`*`, `pkg.Service/*`, `pkg.Service/Method`) covers
/// the method, and how specifically (higher is more specific).
fn specificity(pattern: &str, service: &str, method: &str) -> Option<u8> {
    if pattern == "*" {
        return Some(0);
    }
    let (s, m) = pattern.split_once('/')?;
    if s != service {
        return None;
    }
    match m {
        "*" => Some(1),
        m if m == method => Some(2),
        _ => None,
    }
}

impl ServicePolicy {
    /// Compiles the Config API's view of a service. Values the registry
    /// validated are trusted; a code name it did not know is skipped.
    pub fn from_proto(config: &pb::ServiceConfig) -> Self {
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let retry = r.retry.as_ref().map_or_else(RetryPolicy::default, |p| {
                    let d = RetryPolicy::default();
                    RetryPolicy {
                        max_attempts: p.max_attempts.max(1),
                        retryable: p
                            .retryable_status_codes
                            .iter()
                            .filter_map(|c| grpc::parse_code(c))
                            .collect(),
                        initial_backoff: p
                            .initial_backoff
                            .as_ref()
                            .map_or(d.initial_backoff, duration),
                        max_backoff: p.max_backoff.as_ref().map_or(d.max_backoff, duration),
                        budget_ratio: p.budget_ratio.clamp(0.0, 1.0),
                        max_buffered_bytes: p.max_buffered_bytes as usize,
                        per_try_timeout: p
                            .per_try_timeout
                            .as_ref()
                            .map(duration)
                            .filter(|d| !d.is_zero()),
                    }
                });
                Arc::new(Route {
                    method_match: r.method_match.clone(),
                    timeout: r.timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
                    retry,
                    idempotent: r.idempotent,
                    balancing: Balancing::from_proto(r.load_balancing()),
                    hedge: r.hedge.as_ref().and_then(|h| {
                        let delay = h.delay.as_ref().map(duration)?;
                        (h.max_attempts >= 2 && !delay.is_zero()).then_some(Hedge {
                            delay,
                            max_attempts: h.max_attempts,
                        })
                    }),
                    limit: r.limit.as_ref().and_then(Limit::from_proto),
                })
            })
            .collect::<Vec<Arc<Route>>>();
        let rules = config
            .authorization
            .iter()
            .map(|r| Rule {
                callers: r.callers.clone(),
                methods: r.methods.clone(),
                allow: r.action() != pb::AuthorizationAction::Deny,
            })
            .collect();
        let traffic = config.traffic.clone().unwrap_or_default();
        Self {
            limited: routes.iter().any(|r| r.limit.is_some()),
            routes,
            rules,
            breaker: config
                .circuit_breaker
                .as_ref()
                .and_then(Breaker::from_proto),
            caller_limit: config.caller_limit.as_ref().and_then(Limit::from_proto),
            split: Split {
                weights: traffic
                    .split
                    .iter()
                    .filter(|w| !w.version.is_empty())
                    .map(|w| (Arc::from(w.version.as_str()), w.weight))
                    .collect(),
            },
            version_header_callers: traffic.version_header_callers,
        }
    }

    /// Whether any route limits calls on the callee side.
    pub fn limited(&self) -> bool {
        self.limited
    }

    /// Whether the proxy whose identity is `own` honours its local
    /// caller's `x-trellis-version` header for calls to this service.
    pub fn honours_version_header(&self, own: &SpiffeId, local: &Locality) -> bool {
        self.version_header_callers.iter().any(local.names(own))
    }

    /// The most specific route covering the method; the built-in policy
    /// when none does.
    pub fn route(&self, service: &str, method: &str) -> Arc<Route> {
        static BUILT_IN: LazyLock<Arc<Route>> = LazyLock::new(|| {
            Arc::new(Route {
                method_match: "*".into(),
                ..Route::default()
            })
        });
        self.routes
            .iter()
            .filter_map(|r| specificity(&r.method_match, service, method).map(|s| (s, r)))
            .max_by_key(|(s, _)| *s)
            .map_or(&*BUILT_IN, |(_, r)| r)
            .clone()
    }

    /// Whether `caller` may call the method: the first matching rule
    /// decides; with rules and no match, no; with no rules, any mesh
    /// identity may. A rule's bare service name matches only that service
    /// in `local` (the proxy's trust domain and namespace); a full SPIFFE
    /// ID matches itself wherever it is. The error names the rule's
    /// outcome for the caller.
    pub fn authorize(
        &self,
        caller: &SpiffeId,
        local: &Locality,
        service: &str,
        method: &str,
    ) -> Result<(), String> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let caller_matches = local.names(caller);
        for (i, rule) in self.rules.iter().enumerate() {
            let method_matches = rule
                .methods
                .iter()
                .any(|m| specificity(m, service, method).is_some());
            if method_matches && rule.callers.iter().any(&caller_matches) {
                return if rule.allow {
                    Ok(())
                } else {
                    Err(format!(
                        "{caller} may not call {service}/{method}: denied by authorization rule {}",
                        i + 1
                    ))
                };
            }
        }
        Err(format!(
            "{caller} may not call {service}/{method}: no authorization rule allows it"
        ))
    }
}

fn duration(d: &prost_types::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        callers: &[&str],
        methods: &[&str],
        action: pb::AuthorizationAction,
    ) -> pb::AuthorizationRule {
        pb::AuthorizationRule {
            callers: callers.iter().map(|s| s.to_string()).collect(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
            action: action as i32,
        }
    }

    fn id(service: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://trellis.local/ns/default/sa/{service}")).unwrap()
    }

    fn here() -> Locality {
        Locality::of(&id("echo"))
    }

    #[test]
    fn the_most_specific_route_applies() {
        let config = pb::ServiceConfig {
            routes: vec![
                pb::RoutePolicy {
                    method_match: "*".into(),
                    timeout: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                pb::RoutePolicy {
                    method_match: "a.S/*".into(),
                    timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                pb::RoutePolicy {
                    method_match: "a.S/M".into(),
                    idempotent: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let policy = ServicePolicy::from_proto(&config);
        assert!(policy.route("a.S", "M").idempotent);
        assert_eq!(
            policy.route("a.S", "N").timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            policy.route("b.T", "M").timeout,
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            ServicePolicy::default().route("a.S", "M").retry,
            RetryPolicy::default()
        );
    }

    #[test]
    fn the_first_matching_rule_decides_and_no_match_denies() {
        use pb::AuthorizationAction::{Allow, Deny};
        let config = pb::ServiceConfig {
            authorization: vec![
                rule(&["billing"], &["a.S/Delete"], Deny),
                rule(
                    &["billing", "spiffe://trellis.local/ns/default/sa/edge"],
                    &["a.S/*"],
                    Allow,
                ),
            ],
            ..Default::default()
        };
        let policy = ServicePolicy::from_proto(&config);
        assert!(
            policy
                .authorize(&id("billing"), &here(), "a.S", "Get")
                .is_ok()
        );
        assert!(
            policy
                .authorize(&id("edge"), &here(), "a.S", "Delete")
                .is_ok()
        );
        let denied = policy
            .authorize(&id("billing"), &here(), "a.S", "Delete")
            .unwrap_err();
        assert!(denied.contains("rule 1"), "{denied}");
        let unmatched = policy
            .authorize(&id("web"), &here(), "a.S", "Get")
            .unwrap_err();
        assert!(unmatched.contains("no authorization rule"), "{unmatched}");
        assert!(
            ServicePolicy::default()
                .authorize(&id("web"), &here(), "a.S", "Get")
                .is_ok()
        );
    }

    #[test]
    fn a_bare_name_matches_only_in_our_trust_domain_and_namespace() {
        use pb::AuthorizationAction::Allow;
        let config = pb::ServiceConfig {
            authorization: vec![rule(
                &["billing", "spiffe://trellis.local/ns/other/sa/audit"],
                &["*"],
                Allow,
            )],
            ..Default::default()
        };
        let policy = ServicePolicy::from_proto(&config);
        let other = |s: &str| SpiffeId::for_service("trellis.local", "other", s).unwrap();
        let foreign = SpiffeId::for_service("elsewhere.test", "default", "billing").unwrap();
        assert!(
            policy
                .authorize(&id("billing"), &here(), "a.S", "M")
                .is_ok()
        );
        assert!(
            policy
                .authorize(&other("billing"), &here(), "a.S", "M")
                .is_err()
        );
        assert!(policy.authorize(&foreign, &here(), "a.S", "M").is_err());
        // A full ID names one workload wherever it is.
        assert!(
            policy
                .authorize(&other("audit"), &here(), "a.S", "M")
                .is_ok()
        );
        assert_eq!(here().local_service(&other("billing")), None);
        assert_eq!(here().local_service(&id("billing")), Some("billing"));
    }
}
