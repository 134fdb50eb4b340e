//! Outbound: which endpoint an attempt goes to, and what its answer says
//! about the endpoint's health. Round robin over the endpoints in
//! rotation, skipping the one the last attempt failed on; an endpoint that
//! cannot be reached is ejected at once, one that fails calls in a row
//! (resets, non-gRPC answers, UNAVAILABLE) after a few (see
//! [`Endpoint::record`]); any other answer keeps it in.

use std::sync::Arc;

use http::HeaderMap;
use tokio::time::Instant;
use tonic::Code;

use super::Handle;
use super::endpoint::{Attempted, Dispatch};
use crate::body::{Recorder, RequestBody};
use crate::directory::Upstream;
use crate::endpoint::{Endpoint, Outcome};
use crate::grpc::GrpcMethod;
use crate::metrics;

/// One attempt of a call, before an endpoint is chosen.
#[derive(Debug)]
pub struct Attempt {
    /// The endpoints to choose from.
    pub upstream: Arc<Upstream>,
    /// The endpoint the last attempt failed on, to go elsewhere.
    pub avoid: Option<Arc<Endpoint>>,
    /// The method called.
    pub method: GrpcMethod,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request body.
    pub body: RequestBody,
    /// When the call must be over.
    pub deadline: Option<Instant>,
    /// See [`Dispatch::peek`].
    pub peek: Option<Recorder>,
}

/// What an attempt came to.
// Lives on the stack for one decision; boxing the answer would cost an
// allocation per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Balanced {
    /// It went to `endpoint`, and this happened.
    Tried(Arc<Endpoint>, Attempted),
    /// No endpoint at all (the last one left since the call was routed).
    NoEndpoint,
}

/// The balance layer.
#[derive(Debug)]
pub struct Balance<S> {
    inner: S,
}

impl<S> Balance<S> {
    /// Balances attempts over the endpoints `inner` sends to.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Handle<Attempt> for Balance<S>
where
    S: Handle<Dispatch, Answer = Attempted>,
{
    type Answer = Balanced;

    async fn handle(&self, attempt: Attempt) -> Balanced {
        let Some(endpoint) = attempt.upstream.pick(attempt.avoid.as_ref()) else {
            return Balanced::NoEndpoint;
        };
        let attempted = self
            .inner
            .handle(Dispatch {
                endpoint: endpoint.clone(),
                path: attempt.method.path().clone(),
                headers: attempt.headers,
                body: attempt.body,
                deadline: attempt.deadline,
                peek: attempt.peek,
            })
            .await;
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
            avoid,
            method: GrpcMethod::parse(&http::uri::PathAndQuery::from_static("/a.v1.S/M")).unwrap(),
            headers: HeaderMap::new(),
            body: RequestBody::Empty,
            deadline: None,
            peek: None,
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
        let layer = Balance::new(Inner::new(|_: &Dispatch| {
            Attempted::NotGrpc(http::StatusCode::OK)
        }));
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
        let layer = Balance::new(Inner::new(unreachable));
        let Balanced::Tried(bad, _) = layer.handle(attempt(&u, None)).await else {
            panic!("endpoints are there");
        };
        assert!(!bad.available());
        assert!(u.endpoints.iter().any(|e| e.available()));
    }

    #[test]
    fn only_failures_count_against_an_endpoint() {
        assert_eq!(
            outcome(&Attempted::NotGrpc(http::StatusCode::BAD_GATEWAY)),
            Outcome::Failure
        );
    }
}
