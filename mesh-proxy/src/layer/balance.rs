//! Outbound: which endpoint an attempt goes to, and what its answer says
//! about the endpoint's health. First the version: the one the trusted
//! caller pinned, else one chosen by the split's weights among the
//! versions that have an endpoint in rotation (none configured: any).
//! Then the zone: the proxy's own, when an endpoint of the version there
//! is in rotation. Then the route's balancing among what is left
//! (round robin, least request, or peak EWMA), skipping ejected endpoints
//! and the ones this call already tried. An endpoint that cannot be
//! reached is ejected at once, one that fails calls in a row (resets,
//! non-gRPC answers, UNAVAILABLE) after a few (see [`Endpoint::record`]);
//! any other answer keeps it in. An attempt that does not answer within
//! its per-try timeout is abandoned here.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderMap;
use rand::Rng;
use tokio::time::Instant;
use tonic::Code;

use super::endpoint::{Attempted, Dispatch};
use super::{Handle, within};
use crate::body::{Recorder, RequestBody};
use crate::directory::Upstream;
use crate::endpoint::{Endpoint, Outcome};
use crate::grpc::GrpcMethod;
use crate::metrics;
use crate::policy::{Balancing, ServicePolicy};

/// One attempt of a call, before an endpoint is chosen.
#[derive(Debug)]
pub struct Attempt {
    /// The endpoints to choose from.
    pub upstream: Arc<Upstream>,
    /// How to choose.
    pub balancing: Balancing,
    /// The serving mesh service's policy (its version split).
    pub policy: Arc<ServicePolicy>,
    /// The version the caller pinned the call to.
    pub pinned: Option<Arc<str>>,
    /// Endpoints to go elsewhere than: the one the last attempt failed
    /// on, and (hedging) those other copies failed on or are on.
    pub avoid: Vec<Arc<Endpoint>>,
    /// Where the chosen endpoint is told, for a caller that needs to know
    /// before the attempt answers (hedging).
    pub chosen: Option<Arc<OnceLock<Arc<Endpoint>>>>,
    /// The method called.
    pub method: GrpcMethod,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request body.
    pub body: RequestBody,
    /// When the call must be over.
    pub deadline: Option<Instant>,
    /// How long this attempt may take to answer.
    pub per_try: Option<Duration>,
    /// See [`Dispatch::peek`].
    pub peek: Option<Recorder>,
    /// The call's span, told where the attempt went.
    pub trace: Option<Arc<crate::layer::trace::CallSpan>>,
}

/// What an attempt came to.
// Lives on the stack for one decision; boxing the answer would cost an
// allocation per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Balanced {
    /// It went to `endpoint`, and this happened.
    Tried(Arc<Endpoint>, Attempted),
    /// It went to `endpoint`, which did not answer within the per-try
    /// timeout; the attempt was cancelled.
    TimedOut(Arc<Endpoint>, Duration),
    /// No endpoint at all (the last one left since the call was routed).
    NoEndpoint,
    /// No endpoint of the version the caller pinned.
    NoVersion(Arc<str>),
}

/// The balance layer.
#[derive(Debug)]
pub struct Balance<S> {
    inner: S,
    zone: Option<Arc<str>>,
}

impl<S> Balance<S> {
    /// Balances attempts over the endpoints `inner` sends to, preferring
    /// those in `zone`.
    pub fn new(zone: Option<Arc<str>>, inner: S) -> Self {
        Self { inner, zone }
    }
}

/// The version an attempt must go to, if any: `Err` when it was pinned to
/// one no endpoint has.
fn version(attempt: &Attempt) -> Result<Option<Arc<str>>, Arc<str>> {
    let u = &attempt.upstream;
    let has = |v: &str, in_rotation: bool| {
        u.labels
            .iter()
            .zip(&u.endpoints)
            .any(|(l, e)| &*l.version == v && (!in_rotation || e.available()))
    };
    if let Some(pinned) = &attempt.pinned {
        return if has(pinned, false) {
            Ok(Some(pinned.clone()))
        } else {
            Err(pinned.clone())
        };
    }
    let split = &attempt.policy.split.weights;
    if split.is_empty() {
        return Ok(None);
    }
    // Versions with an endpoint in rotation; failing that, with any
    // endpoint; failing that, the split cannot apply.
    let pick = |in_rotation: bool| -> Option<Arc<str>> {
        let live = || split.iter().filter(|(v, _)| has(v, in_rotation));
        let count = live().count();
        if count == 0 {
            return None;
        }
        let total: u32 = live().map(|(_, w)| *w).sum();
        let mut rng = rand::rng();
        if total == 0 {
            return live()
                .nth(rng.random_range(0..count))
                .map(|(v, _)| v.clone());
        }
        let mut ticket = rng.random_range(0..total);
        live()
            .find(|(_, w)| {
                if ticket < *w {
                    return true;
                }
                ticket -= w;
                false
            })
            .map(|(v, _)| v.clone())
    };
    Ok(pick(true).or_else(|| pick(false)))
}

impl<S> Balance<S> {
    /// The index of the endpoint for `attempt`, or why there is none.
    fn choose(&self, attempt: &Attempt) -> Result<usize, Box<Balanced>> {
        let u = &attempt.upstream;
        let version = version(attempt).map_err(|v| Box::new(Balanced::NoVersion(v)))?;
        let of_version = |i: usize| {
            version
                .as_deref()
                .is_none_or(|v| &*u.labels[i].version == v)
        };
        let zone = self.zone.as_deref().filter(|z| {
            (0..u.endpoints.len())
                .any(|i| of_version(i) && &*u.labels[i].zone == *z && u.endpoints[i].available())
        });
        let avoid = |e: &Arc<Endpoint>| attempt.avoid.iter().any(|a| Arc::ptr_eq(a, e));
        let eligible = |i: usize| of_version(i) && zone.is_none_or(|z| &*u.labels[i].zone == z);
        u.choose(attempt.balancing, avoid, eligible)
            .ok_or_else(|| Box::new(Balanced::NoEndpoint))
    }
}

impl<S> Handle<Attempt> for Balance<S>
where
    S: Handle<Dispatch, Answer = Attempted>,
{
    type Answer = Balanced;

    async fn handle(&self, attempt: Attempt) -> Balanced {
        let i = match self.choose(&attempt) {
            Ok(i) => i,
            Err(none) => return *none,
        };
        let endpoint = attempt.upstream.endpoints[i].clone();
        if let Some(chosen) = &attempt.chosen {
            let _ = chosen.set(endpoint.clone());
        }
        if let Some(trace) = &attempt.trace {
            trace.attempt(endpoint.addr, &attempt.upstream.mesh_service);
        }
        let version = &attempt.upstream.labels[i].version;
        if !version.is_empty() {
            metrics::get().version_request(&attempt.upstream.mesh_service, version);
        }
        // An attempt that has to connect first says more about the
        // handshake than about how fast the endpoint answers: it does not
        // feed the latency estimate.
        let warm = endpoint.connected();
        let in_flight = endpoint.begin();
        let dispatch = self.inner.handle(Dispatch {
            endpoint: endpoint.clone(),
            path: attempt.method.path().clone(),
            headers: attempt.headers,
            body: attempt.body,
            deadline: attempt.deadline,
            peek: attempt.peek,
        });
        // One await for both cases (see [`within`]).
        let per_try = attempt.per_try;
        let Some(attempted) = within(per_try.map(|t| Instant::now() + t), dispatch).await else {
            // Slow is not unwell: no ejection, but the estimate learns
            // how slow.
            in_flight.answered(true);
            metrics::get().per_try_timeout(attempt.method.service());
            let per_try = per_try.expect("only a per-try timeout runs out");
            return Balanced::TimedOut(endpoint, per_try);
        };
        if matches!(attempted, Attempted::Answered(_) | Attempted::NotGrpc(_)) {
            in_flight.answered(warm);
        }
        if endpoint.record(outcome(&attempted)) {
            metrics::get().ejected(attempt.method.service());
        }
        Balanced::Tried(endpoint, attempted)
    }
}

/// What an attempt says about its endpoint's health.
pub fn outcome(attempted: &Attempted) -> Outcome {
    match attempted {
        Attempted::NotSent { .. } => Outcome::Unreachable,
        Attempted::Reset(_) | Attempted::NotGrpc(_) => Outcome::Failure,
        Attempted::Answered(a) => match a.status {
            Some(s) if s.code == Code::Unavailable => Outcome::Failure,
            _ => Outcome::Success,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::endpoint::{ConnectError, Transport};
    use crate::layer::endpoint::NotSent;
    use crate::layer::testing::Recorder as Inner;

    fn upstream(n: u16) -> Arc<Upstream> {
        Upstream::new(
            "a".into(),
            (0..n)
                .map(|i| {
                    Endpoint::new(
                        format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                        Transport::H2c,
                    )
                })
                .collect(),
        )
    }

    fn attempt(upstream: &Arc<Upstream>, avoid: Option<Arc<Endpoint>>) -> Attempt {
        Attempt {
            upstream: upstream.clone(),
            balancing: Balancing::RoundRobin,
            policy: Arc::default(),
            pinned: None,
            avoid: avoid.into_iter().collect(),
            chosen: None,
            per_try: None,
            method: GrpcMethod::parse(&http::uri::PathAndQuery::from_static("/a.v1.S/M")).unwrap(),
            headers: HeaderMap::new(),
            body: RequestBody::Empty,
            deadline: None,
            peek: None,
            trace: None,
        }
    }

    fn unreachable(d: &Dispatch) -> Attempted {
        Attempted::NotSent {
            error: NotSent::Connect(ConnectError::FailedWhileQueued {
                addr: d.endpoint.addr,
            }),
            headers: Some(HeaderMap::new()),
            body: RequestBody::Empty,
        }
    }

    #[tokio::test]
    async fn attempts_go_round_and_skip_the_endpoint_that_just_failed() {
        let u = upstream(3);
        let layer = Balance::new(
            None,
            Inner::new(|_: &Dispatch| Attempted::NotGrpc(http::StatusCode::OK)),
        );
        let mut counts: HashMap<_, usize> = HashMap::new();
        // (Four non-gRPC answers each: one short of ejection.)
        for _ in 0..12 {
            if let Balanced::Tried(e, _) = layer.handle(attempt(&u, None)).await {
                *counts.entry(e.addr).or_default() += 1;
            }
        }
        assert!(counts.values().all(|c| *c == 4), "{counts:?}");
        let u = upstream(3);
        let failed = u.endpoints[0].clone();
        for _ in 0..4 {
            let Balanced::Tried(e, _) = layer.handle(attempt(&u, Some(failed.clone()))).await
            else {
                panic!("endpoints are there");
            };
            assert_ne!(e.addr, failed.addr);
        }
        assert!(matches!(
            layer.handle(attempt(&upstream(0), None)).await,
            Balanced::NoEndpoint
        ));
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_leaves_rotation() {
        let u = upstream(2);
        let layer = Balance::new(None, Inner::new(unreachable));
        let Balanced::Tried(bad, _) = layer.handle(attempt(&u, None)).await else {
            panic!("endpoints are there");
        };
        assert!(!bad.available());
        assert!(u.endpoints.iter().any(|e| e.available()));
    }

    /// Endpoints labelled (version, zone), in order, that the non-gRPC
    /// answers of [`ok`] never eject.
    fn labelled(labels: &[(&str, &str)]) -> Arc<Upstream> {
        let mut settings = crate::settings::Upstream::default();
        settings.ejection.failures = u32::MAX;
        let endpoints = (0..labels.len())
            .map(|i| {
                Endpoint::with_settings(
                    format!("127.0.0.1:{}", 9200 + i).parse().unwrap(),
                    Transport::H2c,
                    settings,
                )
            })
            .collect();
        let labels = labels
            .iter()
            .map(|(v, z)| crate::directory::Labels {
                version: Arc::from(*v),
                zone: Arc::from(*z),
            })
            .collect();
        Upstream::labelled("echo".into(), endpoints, labels)
    }

    fn split(weights: &[(&str, u32)]) -> Arc<ServicePolicy> {
        use trellis::pb::trellis::config::v1 as pb;
        Arc::new(ServicePolicy::from_proto(&pb::ServiceConfig {
            traffic: Some(pb::TrafficPolicy {
                split: weights
                    .iter()
                    .map(|(v, w)| pb::VersionWeight {
                        version: (*v).into(),
                        weight: *w,
                    })
                    .collect(),
                version_header_callers: vec![],
            }),
            ..Default::default()
        }))
    }

    /// Where `n` attempts went, by port.
    async fn spread(
        layer: &Balance<Inner<Dispatch, Attempted>>,
        a: impl Fn() -> Attempt,
        n: usize,
    ) -> HashMap<u16, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            if let Balanced::Tried(e, _) = layer.handle(a()).await {
                *counts.entry(e.addr.port()).or_default() += 1;
            }
        }
        counts
    }

    fn ok(_: &Dispatch) -> Attempted {
        Attempted::NotGrpc(http::StatusCode::OK)
    }

    #[tokio::test]
    async fn a_split_sends_each_version_its_share_and_skips_versions_with_no_endpoint() {
        let u = labelled(&[("v1", ""), ("v1", ""), ("v2", "")]);
        let layer = Balance::new(None, Inner::new(ok));
        let policy = split(&[("v1", 90), ("v2", 10)]);
        let counts = spread(
            &layer,
            || Attempt {
                policy: policy.clone(),
                ..attempt(&u, None)
            },
            2000,
        )
        .await;
        let v2 = counts.get(&9202).copied().unwrap_or(0);
        assert!((120..=280).contains(&v2), "{counts:?}");
        // v3 has no endpoint: v1 takes its share.
        let policy = split(&[("v1", 50), ("v3", 50)]);
        let counts = spread(
            &layer,
            || Attempt {
                policy: policy.clone(),
                ..attempt(&u, None)
            },
            200,
        )
        .await;
        assert!(!counts.contains_key(&9202), "{counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 200);
    }

    #[tokio::test]
    async fn a_pin_goes_to_its_version_or_nowhere() {
        let u = labelled(&[("v1", ""), ("v2", "")]);
        let layer = Balance::new(None, Inner::new(ok));
        let counts = spread(
            &layer,
            || Attempt {
                pinned: Some("v2".into()),
                policy: split(&[("v1", 100)]),
                ..attempt(&u, None)
            },
            20,
        )
        .await;
        assert_eq!(counts.get(&9201), Some(&20), "{counts:?}");
        let none = layer
            .handle(Attempt {
                pinned: Some("v9".into()),
                ..attempt(&u, None)
            })
            .await;
        assert!(matches!(none, Balanced::NoVersion(v) if &*v == "v9"));
    }

    #[tokio::test]
    async fn the_own_zone_is_preferred_while_it_has_an_endpoint_in_rotation() {
        let u = labelled(&[("", "a"), ("", "b"), ("", "b")]);
        let layer = Balance::new(Some("a".into()), Inner::new(ok));
        let counts = spread(&layer, || attempt(&u, None), 30).await;
        assert_eq!(counts.get(&9200), Some(&30), "{counts:?}");
        u.endpoints[0].record(Outcome::Unreachable);
        let counts = spread(&layer, || attempt(&u, None), 30).await;
        assert!(!counts.contains_key(&9200), "zone a is down: {counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_keeps_away_from_a_slow_endpoint_and_least_request_from_a_busy_one() {
        let u = labelled(&[("", ""), ("", ""), ("", "")]);
        // One sample each: the third endpoint is slow.
        for (i, ms) in [1u64, 1, 200].into_iter().enumerate() {
            let guard = u.endpoints[i].begin();
            tokio::time::advance(std::time::Duration::from_millis(ms)).await;
            guard.answered(true);
        }
        let layer = Balance::new(None, Inner::new(ok));
        let counts = spread(
            &layer,
            || Attempt {
                balancing: Balancing::PeakEwma,
                ..attempt(&u, None)
            },
            300,
        )
        .await;
        assert!(!counts.contains_key(&9202), "{counts:?}");
        // Ten calls in flight on the first endpoint.
        let busy: Vec<_> = (0..10).map(|_| u.endpoints[0].begin()).collect();
        let counts = spread(
            &layer,
            || Attempt {
                balancing: Balancing::LeastRequest,
                ..attempt(&u, None)
            },
            300,
        )
        .await;
        assert!(!counts.contains_key(&9200), "{counts:?}");
        drop(busy);
        // Unobserved, a slow estimate decays below the others' fresh
        // ones: the endpoint is tried again.
        tokio::time::advance(std::time::Duration::from_secs(120)).await;
        for i in 0..2 {
            let guard = u.endpoints[i].begin();
            tokio::time::advance(std::time::Duration::from_millis(1)).await;
            guard.answered(true);
        }
        let counts = spread(
            &layer,
            || Attempt {
                balancing: Balancing::PeakEwma,
                ..attempt(&u, None)
            },
            300,
        )
        .await;
        assert!(counts.contains_key(&9202), "{counts:?}");
    }

    /// Answers every dispatch after a second.
    struct Slow;

    impl Handle<Dispatch> for Slow {
        type Answer = Attempted;
        async fn handle(&self, _: Dispatch) -> Attempted {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            Attempted::NotGrpc(http::StatusCode::OK)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_is_abandoned_at_its_per_try_timeout_without_ejection() {
        let u = upstream(1);
        let layer = Balance::new(None, Slow);
        let started = Instant::now();
        let per_try = std::time::Duration::from_millis(100);
        let timed_out = layer
            .handle(Attempt {
                per_try: Some(per_try),
                ..attempt(&u, None)
            })
            .await;
        assert!(matches!(timed_out, Balanced::TimedOut(_, d) if d == per_try));
        assert_eq!(started.elapsed(), per_try);
        assert!(u.endpoints[0].available());
        assert_eq!(u.endpoints[0].in_flight(), 0);
    }

    #[test]
    fn only_failures_count_against_an_endpoint() {
        assert_eq!(
            outcome(&Attempted::NotGrpc(http::StatusCode::BAD_GATEWAY)),
            Outcome::Failure
        );
    }
}
