//! The inbound side: calls from other sidecars (mTLS) to the local service.
//!
//! In order: gRPC check, authorization of the verified caller against the
//! service's rules, the caller-identity header (set from the certificate,
//! replacing anything sent), then forwarding over h2c with the caller's
//! deadline enforced.

use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::Code;
use trellis::identity::SpiffeId;
use trellis::tls::PeerIdentity;

use crate::body::{CallEnd, RequestBody, ResponseBody};
use crate::discovery::{self, MeshView};
use crate::endpoint::Endpoint;
use crate::forward::{self, AttemptError};
use crate::grpc;
use crate::metrics;
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

/// The process's inbound side, for readiness (there is at most one).
static INBOUND: OnceLock<Arc<Inbound>> = OnceLock::new();

/// Readiness as far as the inbound side goes: with a registry, not before
/// the local service's configuration (its authorization rules) is in.
pub fn ready() -> Result<(), String> {
    match INBOUND.get() {
        Some(inbound) => inbound.policy().map(drop).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// The inbound proxy in front of one local service.
#[derive(Debug)]
pub struct Inbound {
    app: Arc<Endpoint>,
    service: String,
    /// Our trust domain and namespace: where bare service names (rules,
    /// `trusted_edges`) apply.
    local: Locality,
    view: Arc<MeshView>,
    trusted_edges: Vec<String>,
}

impl Inbound {
    /// An inbound proxy forwarding to `app`, enforcing the authorization
    /// rules of mesh service `service`, whose identity is `own`.
    /// Calls from `trusted_edges` (service names, in `own`'s trust domain
    /// and namespace) may carry an external caller's principal.
    pub fn new(
        app: Arc<Endpoint>,
        service: String,
        own: &SpiffeId,
        view: Arc<MeshView>,
        trusted_edges: Vec<String>,
    ) -> Arc<Self> {
        let inbound = Arc::new(Self {
            app,
            service,
            local: Locality::of(own),
            view,
            trusted_edges,
        });
        let _ = INBOUND.set(inbound.clone());
        inbound
    }

    /// The local service's configuration. With a registry (the Config API
    /// is routed), none until its first answer: "no rules" then would mean
    /// "any mesh identity may call", so the call is refused instead (fail
    /// closed). Without a registry there is no configuration to wait for.
    fn policy(&self) -> Result<Arc<ServicePolicy>, NotConfigured> {
        if let Some(policy) = self.view.policies.load().get(&self.service) {
            return Ok(policy.clone());
        }
        if self
            .view
            .directory
            .load()
            .has_route(discovery::CONFIG_SERVICE)
        {
            return Err(NotConfigured {
                service: self.service.clone(),
            });
        }
        Ok(Arc::default())
    }

    /// Whether the local service serves `grpc_service`, as far as the
    /// registry says: only those get their own metric labels. Without a
    /// registry's word on our own service (no registry, or not registered
    /// yet) any service may be ours; the series cap still bounds them.
    fn serves(&self, grpc_service: &str) -> bool {
        let registered = self.view.registered.load();
        match registered.get(grpc_service) {
            Some(mesh_service) => *mesh_service == self.service,
            None => !registered.values().any(|m| *m == self.service),
        }
    }

    /// Handles one call from `peer`.
    pub async fn handle(
        &self,
        peer: &PeerIdentity,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let path = match grpc::method_of(&request, "the inbound port") {
            Ok(path) => path,
            Err(answer) => return answer,
        };
        let mut end = CallEnd::new(
            metrics::get().call("inbound", path.service, path.method, || {
                self.serves(path.service) && self.view.known_method(path.service, path.method)
            }),
            started,
        );
        let policy = match self.policy() {
            Ok(policy) => policy,
            Err(not_configured) => {
                tracing::info!(caller = %peer.id, service = path.service, method = path.method, "call refused: no configuration yet");
                end.finish(Code::Unavailable);
                let mut response =
                    grpc::status_response(Code::Unavailable, &not_configured.to_string());
                // It never reached the service: another instance may take it.
                response
                    .headers_mut()
                    .insert(grpc::UNPROCESSED_HEADER, HeaderValue::from_static("true"));
                return response;
            }
        };
        if let Err(reason) = policy.authorize(&peer.id, &self.local, path.service, path.method) {
            tracing::info!(caller = %peer.id, service = path.service, method = path.method, "call denied");
            end.finish(Code::PermissionDenied);
            return grpc::status_response(Code::PermissionDenied, &reason);
        }
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(grpc::parse_timeout)
            .map(|d| started + d);
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        headers.remove(grpc::CALLER_HEADER);
        // An edge of another namespace, named like ours, is not ours.
        if !self
            .local
            .local_service(&peer.id)
            .is_some_and(|s| self.trusted_edges.iter().any(|t| t == s))
        {
            headers.remove(grpc::PRINCIPAL_HEADER);
        }
        headers.insert(
            grpc::CALLER_HEADER,
            HeaderValue::from_str(peer.id.as_str()).expect("a SPIFFE ID is a valid header value"),
        );
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .expect("a parsed gRPC path");
        let request = forward::request(
            forward::uri_for(&self.app, &path_and_query),
            &headers,
            RequestBody::Direct(body),
        );
        let sent = match deadline {
            Some(d) => match tokio::time::timeout_at(d, forward::send(&self.app, request)).await {
                Ok(sent) => sent,
                Err(_) => {
                    end.finish(Code::DeadlineExceeded);
                    return grpc::status_response(
                        Code::DeadlineExceeded,
                        &format!("deadline exceeded in {}", self.service),
                    );
                }
            },
            None => forward::send(&self.app, request).await,
        };
        match sent {
            Ok(mut response) => {
                // The proxy's own headers mean something to the caller's
                // proxy (x-trellis-unprocessed: "safe to send again"); only
                // this proxy may set them, never the service behind it.
                for name in grpc::PROXY_RESPONSE_HEADERS {
                    response.headers_mut().remove(name);
                }
                if let Some(code) = grpc::status_of(response.headers()) {
                    end.finish(code);
                    return response.map(|_| ResponseBody::default());
                }
                response.map(|b| {
                    ResponseBody::upstream(b, None)
                        .with_deadline(deadline)
                        .with_end(end)
                })
            }
            Err(AttemptError::NotSent(_, why)) => {
                end.finish(Code::Unavailable);
                tracing::warn!(service = %self.service, app = %self.app.addr, reason = %why, "local service unreachable");
                let mut response = grpc::status_response(
                    Code::Unavailable,
                    &format!(
                        "{} is not reachable behind its sidecar: {why}",
                        self.service
                    ),
                );
                // It never reached the service: the caller may send it elsewhere.
                response
                    .headers_mut()
                    .insert(grpc::UNPROCESSED_HEADER, HeaderValue::from_static("true"));
                response
            }
            Err(AttemptError::Failed(why, refused)) => {
                end.finish(Code::Unavailable);
                let mut response = grpc::status_response(
                    Code::Unavailable,
                    &format!("{} failed mid-call: {why}", self.service),
                );
                if refused {
                    response
                        .headers_mut()
                        .insert(grpc::UNPROCESSED_HEADER, HeaderValue::from_static("true"));
                }
                response
            }
        }
    }
}
