//! Outbound: where a call goes and under which policy. Finds the gRPC
//! service in the routing table (unknown: UNIMPLEMENTED; known but with no
//! endpoint now: UNAVAILABLE), takes the most specific route of the
//! serving mesh service's configuration, and decides whether the method is
//! safe to repeat (config, or the contract's idempotency level). It also
//! removes the headers only the mesh may set: the caller's identity is
//! named by the callee's inbound side, and an external principal only by
//! an edge, from the credentials it verified. A version pin
//! (`x-trellis-version`) is taken from callers the callee's configuration
//! trusts with it, and removed in every case.

use std::sync::Arc;

use tonic::Code;

use super::{Answer, Call, CarriesCall, Handle};
use crate::directory::{Lookup, Upstream};
use crate::discovery::MeshView;
use crate::grpc;
use crate::policy::{Route, ServicePolicy};

/// A call with its upstream and policy.
#[derive(Debug)]
pub struct Routed {
    /// The call.
    pub call: Call,
    /// Who serves it.
    pub upstream: Arc<Upstream>,
    /// The route policy that applies (timeout, retries).
    pub route: Arc<Route>,
    /// The serving mesh service's whole policy (circuit, limit, split).
    pub policy: Arc<ServicePolicy>,
    /// The version the trusted caller pinned the call to.
    pub pinned: Option<Arc<str>>,
    /// Whether the method may be repeated without harm.
    pub safe: bool,
}

impl CarriesCall for Routed {
    fn call(&self) -> &Call {
        &self.call
    }
    fn call_mut(&mut self) -> &mut Call {
        &mut self.call
    }
}

impl super::deadline::Deadlined for Routed {
    fn timeout(&self) -> Option<std::time::Duration> {
        [self.route.timeout, self.call.caller_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    type Names = crate::grpc::GrpcMethod;

    fn names(&self) -> Self::Names {
        self.call.method.clone()
    }

    fn expired(method: &Self::Names) -> String {
        format!("deadline exceeded calling {}", method.service())
    }
}

/// The route layer.
#[derive(Debug)]
pub struct RouteLayer<S> {
    inner: S,
    view: Arc<MeshView>,
}

impl<S> RouteLayer<S> {
    /// Routes by `view`.
    pub fn new(view: Arc<MeshView>, inner: S) -> Self {
        Self { inner, view }
    }

    // Boxed: refusals are the rare path.
    fn route(&self, mut call: Call) -> Result<Routed, Box<Answer>> {
        let service = call.method.service();
        let upstream = match self.view.directory.load().lookup(service) {
            Lookup::Found(upstream) => upstream,
            Lookup::NoEndpoints => {
                return Err(Box::new(grpc::status_response(
                    Code::Unavailable,
                    &format!("no healthy endpoint serves {service} right now"),
                )));
            }
            Lookup::Unknown => {
                return Err(Box::new(grpc::status_response(
                    Code::Unimplemented,
                    &format!("no service in the mesh serves {service}"),
                )));
            }
        };
        let method = call.method.method();
        let policy = self.view.policy(&upstream.mesh_service);
        let route = policy.route(service, method);
        let safe = route.idempotent || self.view.contract_safe(service, method);
        let pinned = match call.headers.remove(grpc::VERSION_HEADER) {
            Some(version) if self.may_pin(&policy, &call) => version
                .to_str()
                .ok()
                .filter(|v| !v.is_empty())
                .map(Arc::from),
            _ => None,
        };
        // Only the inbound side names the caller, from its certificate.
        call.headers.remove(grpc::CALLER_HEADER);
        // Only an edge names an external caller, from credentials it
        // verified (carried in the call, where no client can put it): a
        // local process claiming a principal on this port is not believed.
        call.headers.remove(grpc::PRINCIPAL_HEADER);
        if let Some(principal) = call.access.as_ref().and_then(|a| a.principal.clone()) {
            call.headers.insert(grpc::PRINCIPAL_HEADER, principal);
        }
        Ok(Routed {
            call,
            upstream,
            route,
            policy,
            pinned,
            safe,
        })
    }

    /// Whether this call's caller may pin a version: the callee trusts
    /// this proxy's identity with it, and at the edge the external
    /// caller was authenticated.
    fn may_pin(&self, policy: &ServicePolicy, call: &Call) -> bool {
        if call.access.as_ref().is_some_and(|a| a.principal.is_none()) {
            return false;
        }
        self.view
            .locale
            .id
            .as_ref()
            .is_some_and(|(own, local)| policy.honours_version_header(own, local))
    }
}

impl<S> Handle<Call> for RouteLayer<S>
where
    S: Handle<Routed, Answer = Answer>,
{
    type Answer = Answer;

    async fn handle(&self, call: Call) -> Answer {
        match self.route(call) {
            Ok(routed) => self.inner.handle(routed).await,
            Err(answer) => *answer,
        }
    }
}

/// Whether the outbound side gives `method` metric labels of its own: a
/// service the mesh routes, and a method of its contract (when known).
pub fn routable(view: Arc<MeshView>) -> super::observe::Routable {
    Box::new(move |method| {
        !matches!(
            view.directory.load().lookup(method.service()),
            Lookup::Unknown
        ) && view.known_method(method.service(), method.method())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use http::HeaderValue;

    use super::*;
    use crate::access::AccessInfo;
    use crate::directory::Table;
    use crate::endpoint::{Endpoint, Transport};
    use crate::layer::testing::{Recorder, call, status};

    fn view(routes: &[(&str, usize)]) -> Arc<MeshView> {
        let view = Arc::new(MeshView::default());
        let mut table = HashMap::new();
        for (service, n) in routes {
            let endpoints = (0..*n)
                .map(|i| {
                    Endpoint::new(
                        format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                        Transport::H2c,
                    )
                })
                .collect();
            table.insert(service.to_string(), Upstream::new("a".into(), endpoints));
        }
        view.directory
            .store(Arc::new(Table::new(table, HashSet::new(), None)));
        view
    }

    fn layer(view: Arc<MeshView>) -> RouteLayer<Recorder<Routed, Answer>> {
        RouteLayer::new(view, Recorder::new(|_: &Routed| Answer::default()))
    }

    #[tokio::test]
    async fn unknown_and_unserved_services_are_answered_here() {
        let unknown = layer(view(&[])).handle(call(&[])).await;
        assert_eq!(status(&unknown), Some(Code::Unimplemented));
        let unserved = layer(view(&[("a.v1.S", 0)])).handle(call(&[])).await;
        assert_eq!(status(&unserved), Some(Code::Unavailable));
        assert!(grpc::message_of(unserved.headers()).contains("a.v1.S"));
    }

    #[tokio::test]
    async fn headers_only_the_mesh_may_set_are_replaced() {
        let l = layer(view(&[("a.v1.S", 1)]));
        l.handle(call(&[
            (grpc::CALLER_HEADER, "spiffe://x/ns/default/sa/evil"),
            (grpc::PRINCIPAL_HEADER, "api-key:stolen"),
        ]))
        .await;
        let mut from_edge = call(&[(grpc::PRINCIPAL_HEADER, "api-key:stolen")]);
        from_edge.access = Some(AccessInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            protocol: "grpc",
            principal: Some(HeaderValue::from_static("api-key:ops")),
            trace_id: None,
        });
        l.handle(from_edge).await;
        let seen = l.inner.seen.lock().unwrap();
        assert!(seen[0].call.headers.get(grpc::CALLER_HEADER).is_none());
        assert!(seen[0].call.headers.get(grpc::PRINCIPAL_HEADER).is_none());
        assert_eq!(seen[1].call.headers[grpc::PRINCIPAL_HEADER], "api-key:ops");
        assert_eq!(seen[1].upstream.endpoints.len(), 1);
        assert!(!seen[0].safe, "no config and no contract: not safe");
    }
}
