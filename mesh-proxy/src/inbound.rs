//! The inbound side: calls from other sidecars (mTLS) to the local service.
//!
//! In order: gRPC check, authorization of the verified caller against the
//! service's rules, the caller-identity header (set from the certificate,
//! replacing anything sent), then forwarding over h2c with the caller's
//! deadline enforced.

use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tonic::Code;
use trellis::tls::PeerIdentity;

use crate::body::{CallEnd, RequestBody, ResponseBody};
use crate::discovery::MeshView;
use crate::endpoint::Endpoint;
use crate::forward::{self, AttemptError};
use crate::grpc;
use crate::metrics;

/// The inbound proxy in front of one local service.
#[derive(Debug)]
pub struct Inbound {
    app: Arc<Endpoint>,
    service: String,
    view: Arc<MeshView>,
    trusted_edges: Vec<String>,
}

impl Inbound {
    /// An inbound proxy forwarding to `app`, enforcing the authorization
    /// rules of mesh service `service`.
    /// Calls from `trusted_edges` (service names) may carry an external
    /// caller's principal.
    pub fn new(
        app: Arc<Endpoint>,
        service: String,
        view: Arc<MeshView>,
        trusted_edges: Vec<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            app,
            service,
            view,
            trusted_edges,
        })
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
            metrics::get().call("inbound", path.service, path.method),
            started,
        );
        if let Err(reason) =
            self.view
                .policy(&self.service)
                .authorize(&peer.id, path.service, path.method)
        {
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
        if !peer
            .id
            .service()
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
            Ok(response) => {
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
