//! Outermost on both sides: is this a gRPC call, and of which method.
//!
//! A request that is not gRPC (by content type) is answered HTTP 415, and
//! a path that is not `/package.Service/Method` UNIMPLEMENTED, before
//! anything counts or routes it. What passes becomes a [`Call`].

use std::sync::Arc;

use http::HeaderValue;
use http::Request;
use tokio::time::Instant;
use tonic::Code;
use trellis::identity::SpiffeId;
use trellis::tls::PeerIdentity;

use super::{Answer, Call, CarriesCall, Handle};
use crate::access::AccessInfo;
use crate::body::RequestBody;
use crate::grpc::{self, GrpcMethod};

/// The classify layer; `side` names the port in its answers.
#[derive(Debug)]
pub struct Classify<S> {
    inner: S,
    side: &'static str,
}

impl<S> Classify<S> {
    /// Classifies calls for `inner`.
    pub fn new(side: &'static str, inner: S) -> Self {
        Self { inner, side }
    }

    // Boxed: refusals are the rare path.
    fn call<B: Into<RequestBody>>(&self, request: Request<B>) -> Result<Call, Box<Answer>> {
        let started = Instant::now();
        if !grpc::is_grpc(request.headers()) {
            return Err(Box::new(grpc::not_grpc_response(self.side)));
        }
        let Some(method) = request.uri().path_and_query().and_then(GrpcMethod::parse) else {
            return Err(Box::new(grpc::status_response(
                Code::Unimplemented,
                &format!(
                    "{:?} is not a gRPC method path (/package.Service/Method)",
                    request.uri().path()
                ),
            )));
        };
        let (mut parts, body) = request.into_parts();
        Ok(Call {
            method,
            access: parts.extensions.remove::<AccessInfo>(),
            headers: parts.headers,
            body: body.into(),
            started,
            deadline: None,
            trace: None,
        })
    }
}

impl<S, B> Handle<Request<B>> for Classify<S>
where
    S: Handle<Call, Answer = Answer>,
    B: Into<RequestBody> + Send + 'static,
{
    type Answer = Answer;

    async fn handle(&self, request: Request<B>) -> Answer {
        match self.call(request) {
            Ok(call) => self.inner.handle(call).await,
            Err(answer) => *answer,
        }
    }
}

/// The verified peer of an mTLS connection, made once per connection for
/// every call on it.
#[derive(Debug)]
pub struct Peer {
    /// The SPIFFE ID of its certificate.
    pub id: SpiffeId,
    /// `id` as the value of `x-trellis-caller`.
    pub header: HeaderValue,
}

impl Peer {
    /// The peer `id`.
    pub fn new(id: SpiffeId) -> Self {
        let header =
            HeaderValue::from_str(id.as_str()).expect("a SPIFFE ID is a valid header value");
        Self { id, header }
    }

    /// The peer a TLS handshake verified.
    pub fn of(identity: &PeerIdentity) -> Self {
        Self::new(identity.id.clone())
    }
}

/// A call from a peer whose certificate the TLS handshake verified (the
/// inbound side).
#[derive(Debug)]
pub struct FromPeer {
    /// Who is calling.
    pub peer: Arc<Peer>,
    /// The call.
    pub call: Call,
}

impl CarriesCall for FromPeer {
    fn call(&self) -> &Call {
        &self.call
    }
    fn call_mut(&mut self) -> &mut Call {
        &mut self.call
    }
    fn peer_identity(&self) -> Option<&str> {
        Some(self.peer.id.as_str())
    }
}

impl<S, B> Handle<(Arc<Peer>, Request<B>)> for Classify<S>
where
    S: Handle<FromPeer, Answer = Answer>,
    B: Into<RequestBody> + Send + 'static,
{
    type Answer = Answer;

    async fn handle(&self, (peer, request): (Arc<Peer>, Request<B>)) -> Answer {
        match self.call(request) {
            Ok(call) => self.inner.handle(FromPeer { peer, call }).await,
            Err(answer) => *answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::testing::{Recorder, status};

    fn request(content_type: &'static str, path: &'static str) -> Request<RequestBody> {
        Request::builder()
            .uri(path)
            .header("content-type", content_type)
            .body(RequestBody::Empty)
            .unwrap()
    }

    #[tokio::test]
    async fn grpc_calls_go_on_with_their_method() {
        let layer = Classify::new(
            "the outbound port",
            Recorder::new(|_: &Call| Answer::default()),
        );
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            layer.handle(request(ct, "/a.v1.S/M")).await;
        }
        let seen = layer.inner.seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].method.service(), "a.v1.S");
        assert_eq!(seen[0].method.method(), "M");
    }

    #[tokio::test]
    async fn other_requests_are_answered_here() {
        let layer = Classify::new(
            "the outbound port",
            Recorder::new(|_: &Call| Answer::default()),
        );
        let not_grpc = layer.handle(request("application/json", "/a.v1.S/M")).await;
        assert_eq!(not_grpc.status(), http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(grpc::message_of(not_grpc.headers()).contains("the outbound port"));
        let bad_path = layer.handle(request("application/grpc", "/a.v1.S")).await;
        assert_eq!(status(&bad_path), Some(Code::Unimplemented));
        assert!(layer.inner.seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_edges_caller_travels_with_the_call() {
        let layer = Classify::new("the edge", Recorder::new(|_: &Call| Answer::default()));
        let mut req = request("application/grpc", "/a.v1.S/M");
        req.extensions_mut().insert(AccessInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            protocol: "grpc",
            principal: None,
            trace_id: None,
        });
        layer.handle(req).await;
        assert!(layer.inner.seen.lock().unwrap()[0].access.is_some());
    }
}
