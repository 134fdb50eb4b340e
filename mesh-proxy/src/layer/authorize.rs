//! Inbound: who is calling, and may they. The caller is the SPIFFE ID of
//! the certificate the TLS handshake verified; the local service's
//! authorization rules (from the Config API) decide. Before the rules are
//! known the answer is UNAVAILABLE, marked unprocessed so the caller's
//! sidecar may try another instance: "no rules yet" must not mean "anyone
//! may call" (fail closed). The service then learns the caller from
//! `x-trellis-caller`, set here and only here, and an external principal
//! only on calls from a trusted edge.

use std::sync::Arc;

use http::HeaderValue;
use tonic::Code;
use trellis::identity::SpiffeId;

use super::classify::FromPeer;
use super::{Answer, Call, CarriesCall, Handle};
use crate::discovery::{self, MeshView};
use crate::grpc;
use crate::policy::{Locality, ServicePolicy};

/// Why the inbound side cannot decide who may call yet.
#[derive(Debug, thiserror::Error)]
#[error(
    "{service} has no configuration from the registry yet, so its sidecar cannot tell who may \
     call it; try another instance or again shortly"
)]
pub struct NotConfigured {
    service: String,
}

/// The local service's configuration. With a registry (the Config API is
/// routed), none until its first answer; without a registry there is no
/// configuration to wait for.
pub fn policy(view: &MeshView, service: &str) -> Result<Arc<ServicePolicy>, NotConfigured> {
    if let Some(policy) = view.policies.load().get(service) {
        return Ok(policy.clone());
    }
    if view.directory.load().has_route(discovery::CONFIG_SERVICE) {
        return Err(NotConfigured {
            service: service.to_owned(),
        });
    }
    Ok(Arc::default())
}

/// A call its caller may make.
#[derive(Debug)]
pub struct Authorized {
    /// The call, naming its verified caller.
    pub call: Call,
    /// The local mesh service.
    pub service: Arc<str>,
    /// Its configuration.
    pub policy: Arc<ServicePolicy>,
}

impl CarriesCall for Authorized {
    fn call(&self) -> &Call {
        &self.call
    }
    fn call_mut(&mut self) -> &mut Call {
        &mut self.call
    }
}

impl super::deadline::Deadlined for Authorized {
    fn timeout(&self) -> Option<std::time::Duration> {
        self.call.caller_timeout()
    }

    type Names = Arc<str>;

    fn names(&self) -> Arc<str> {
        self.service.clone()
    }

    fn expired(service: &Arc<str>) -> String {
        format!("deadline exceeded in {service}")
    }
}

/// The authorize layer.
#[derive(Debug)]
pub struct Authorize<S> {
    inner: S,
    view: Arc<MeshView>,
    service: Arc<str>,
    /// Our trust domain and namespace: where bare service names (rules,
    /// `trusted_edges`) apply.
    local: Locality,
    trusted_edges: Vec<String>,
}

impl<S> Authorize<S> {
    /// Authorizes calls to mesh service `service`, whose identity is
    /// `own`, by its rules in `view`. Calls from `trusted_edges` (service
    /// names in `own`'s trust domain and namespace) may carry an external
    /// caller's principal.
    pub fn new(
        view: Arc<MeshView>,
        service: &str,
        own: &SpiffeId,
        trusted_edges: Vec<String>,
        inner: S,
    ) -> Self {
        Self {
            inner,
            view,
            service: service.into(),
            local: Locality::of(own),
            trusted_edges,
        }
    }

    // Boxed: refusals are the rare path.
    fn authorize(&self, from: FromPeer) -> Result<Authorized, Box<Answer>> {
        let FromPeer { peer, mut call } = from;
        let (service, method) = (call.method.service(), call.method.method());
        let policy = match policy(&self.view, &self.service) {
            Ok(policy) => policy,
            Err(not_configured) => {
                tracing::info!(caller = %peer.id, service, method, "call refused: no configuration yet");
                let mut answer =
                    grpc::status_response(Code::Unavailable, &not_configured.to_string());
                // It never reached the service: another instance may take it.
                answer
                    .headers_mut()
                    .insert(grpc::UNPROCESSED_HEADER, HeaderValue::from_static("true"));
                return Err(Box::new(answer));
            }
        };
        if let Err(reason) = policy.authorize(&peer.id, &self.local, service, method) {
            tracing::info!(caller = %peer.id, service, method, "call denied");
            return Err(Box::new(grpc::status_response(
                Code::PermissionDenied,
                &reason,
            )));
        }
        // An edge of another namespace, named like ours, is not ours.
        let from_trusted_edge = self
            .local
            .local_service(&peer.id)
            .is_some_and(|s| self.trusted_edges.iter().any(|t| t == s));
        if !from_trusted_edge {
            call.headers.remove(grpc::PRINCIPAL_HEADER);
        }
        call.headers
            .insert(grpc::CALLER_HEADER, peer.header.clone());
        Ok(Authorized {
            call,
            service: self.service.clone(),
            policy,
        })
    }
}

impl<S> Handle<FromPeer> for Authorize<S>
where
    S: Handle<Authorized, Answer = Answer>,
{
    type Answer = Answer;

    async fn handle(&self, from: FromPeer) -> Answer {
        match self.authorize(from) {
            Ok(authorized) => self.inner.handle(authorized).await,
            Err(answer) => *answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use trellis::pb::trellis::config::v1 as pb;

    use super::*;
    use crate::layer::classify::Peer;
    use crate::layer::testing::{Recorder, call, status};

    fn id(service: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://trellis.local/ns/default/sa/{service}")).unwrap()
    }

    fn from(service: &str, headers: &[(&'static str, &'static str)]) -> FromPeer {
        FromPeer {
            peer: Arc::new(Peer::new(id(service))),
            call: call(headers),
        }
    }

    fn layer(rules: Option<Vec<pb::AuthorizationRule>>) -> Authorize<Recorder<Authorized, Answer>> {
        let view = Arc::new(MeshView::default());
        if let Some(rules) = rules {
            let config = pb::ServiceConfig {
                authorization: rules,
                ..Default::default()
            };
            let mut policies = HashMap::new();
            policies.insert(
                "echo".to_owned(),
                Arc::new(ServicePolicy::from_proto(&config)),
            );
            view.policies.store(Arc::new(policies));
        }
        Authorize::new(
            view,
            "echo",
            &id("echo"),
            vec!["edge".into()],
            Recorder::new(|_: &Authorized| Answer::default()),
        )
    }

    #[tokio::test]
    async fn the_verified_caller_is_named_and_claims_are_dropped() {
        let l = layer(None);
        l.handle(from(
            "billing",
            &[
                (
                    grpc::CALLER_HEADER,
                    "spiffe://trellis.local/ns/default/sa/admin",
                ),
                (grpc::PRINCIPAL_HEADER, "api-key:root"),
            ],
        ))
        .await;
        l.handle(from("edge", &[(grpc::PRINCIPAL_HEADER, "api-key:ops")]))
            .await;
        let seen = l.inner.seen.lock().unwrap();
        assert_eq!(
            seen[0].call.headers[grpc::CALLER_HEADER],
            "spiffe://trellis.local/ns/default/sa/billing"
        );
        assert!(seen[0].call.headers.get(grpc::PRINCIPAL_HEADER).is_none());
        assert_eq!(seen[1].call.headers[grpc::PRINCIPAL_HEADER], "api-key:ops");
    }

    #[tokio::test]
    async fn the_rules_decide() {
        let l = layer(Some(vec![pb::AuthorizationRule {
            callers: vec!["billing".into()],
            methods: vec!["*".into()],
            action: pb::AuthorizationAction::Allow as i32,
        }]));
        let denied = l.handle(from("intruder", &[])).await;
        assert_eq!(status(&denied), Some(Code::PermissionDenied));
        assert!(grpc::message_of(denied.headers()).contains("intruder"));
        let allowed = l.handle(from("billing", &[])).await;
        assert_eq!(status(&allowed), None);
        assert_eq!(l.inner.seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn with_a_registry_and_no_rules_yet_nobody_gets_in() {
        let l = layer(None);
        let mut routes = HashMap::new();
        routes.insert(
            discovery::CONFIG_SERVICE.to_owned(),
            crate::directory::Upstream::new("trellis-registry".into(), vec![]),
        );
        l.view
            .directory
            .store(Arc::new(crate::directory::Table::new(
                routes,
                Default::default(),
                None,
            )));
        let refused = l.handle(from("billing", &[])).await;
        assert_eq!(status(&refused), Some(Code::Unavailable));
        assert!(refused.headers().contains_key(grpc::UNPROCESSED_HEADER));
        assert!(l.inner.seen.lock().unwrap().is_empty());
    }
}
