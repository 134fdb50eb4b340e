//! Counts every call that reaches it: its caller and final gRPC status
//! (`trellis_proxy_requests_total`), its latency
//! (`trellis_proxy_request_duration_seconds`) and, for the edge, one
//! access-log line. The end is reported when the call really ends: at
//! once for a status-only answer, or when the response body's trailers
//! pass (or the caller goes away: CANCELLED).
//!
//! The caller is known here, before authorization, on every side: on the
//! inbound side it is the peer the mTLS handshake verified (for the whole
//! connection), so a call the rules refuse still counts under who made it.

use std::sync::Arc;

use super::classify::FromPeer;
use super::{Answer, Call, CarriesCall, Handle};
use crate::access::{AccessInfo, AccessLog};
use crate::body::{CallEnd, CallObserver};
use crate::grpc::{self, GrpcMethod};
use crate::metrics;

/// Whether a method gets metric labels of its own: only methods the proxy
/// can route, so that callers choosing paths do not choose how many series
/// are kept. Asked once per new series, not per call.
pub type Routable = Box<dyn Fn(&GrpcMethod) -> bool + Send + Sync>;

/// A call that names its caller for the `caller` label.
pub trait NamesCaller: CarriesCall {
    /// Who makes the call. Asked on every call: it allocates nothing.
    fn caller(&self) -> &str;
}

/// The outbound side (and the edge): the local service's own calls, or on
/// the edge the external caller's API key.
impl NamesCaller for Call {
    fn caller(&self) -> &str {
        match &self.access {
            Some(info) => edge_caller(info),
            None => metrics::get().local_service(),
        }
    }
}

/// The inbound side: the verified peer.
impl NamesCaller for FromPeer {
    fn caller(&self) -> &str {
        metrics::get().peer_name(&self.peer.id)
    }
}

/// The label of an external caller: its API key's name (`api-key:ops`),
/// one of a list the operator keeps; any other (a JWT's subject, one per
/// user, or nobody) is `edge`, so that callers do not choose how many
/// series are kept.
fn edge_caller(info: &AccessInfo) -> &str {
    info.principal
        .as_ref()
        .and_then(|p| p.to_str().ok())
        .filter(|p| p.starts_with("api-key:"))
        .unwrap_or("edge")
}

/// The observe layer.
pub struct Observe<S> {
    inner: S,
    direction: &'static str,
    routable: Routable,
}

impl<S> std::fmt::Debug for Observe<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl<S> Observe<S> {
    /// Counts calls under `direction` (`outbound`, `inbound`, `edge`).
    pub fn new(direction: &'static str, routable: Routable, inner: S) -> Self {
        Self {
            inner,
            direction,
            routable,
        }
    }
}

impl<S, R> Handle<R> for Observe<S>
where
    S: Handle<R, Answer = Answer>,
    R: NamesCaller,
{
    type Answer = Answer;

    async fn handle(&self, request: R) -> Answer {
        let call = request.call();
        let method = &call.method;
        let mut observer: Arc<dyn CallObserver> = metrics::get().call(
            self.direction,
            request.caller(),
            method.service(),
            method.method(),
            || (self.routable)(method),
        );
        if let Some(info) = &call.access {
            observer = Arc::new(AccessLog {
                inner: observer,
                info: info.clone(),
                service: method.service().to_owned(),
                method: method.method().to_owned(),
            });
        }
        let mut end = CallEnd::new(observer, call.started);
        let answer = self.inner.handle(request).await;
        match grpc::status_of(answer.headers()) {
            Some(code) => {
                end.finish(code);
                answer
            }
            None => answer.map(|body| body.with_end(end)),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tonic::Code;

    use super::*;
    use crate::layer::Call;
    use crate::layer::testing::{Recorder, call};

    fn count(direction: &str, code: &str) -> u64 {
        count_from(direction, metrics::get().local_service(), code)
    }

    fn count_from(direction: &str, caller: &str, code: &str) -> u64 {
        let text = metrics::get().render();
        let prefix = format!(
            r#"trellis_proxy_requests_total{{direction="{direction}",service="a.v1.S",method="M",grpc_status="{code}",caller="{caller}"}} "#
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.parse().unwrap())
    }

    #[tokio::test]
    async fn a_status_only_answer_is_counted_at_once() {
        let layer = Observe::new(
            "test-observe-a",
            Box::new(|_| true),
            Recorder::new(|_: &Call| grpc::status_response(Code::NotFound, "no")),
        );
        layer.handle(call(&[])).await;
        assert_eq!(count("test-observe-a", "NOT_FOUND"), 1);
    }

    #[tokio::test]
    async fn a_streamed_answer_is_counted_when_its_body_ends() {
        let layer = Observe::new(
            "test-observe-b",
            Box::new(|_| true),
            Recorder::new(|_: &Call| Answer::default()),
        );
        let answer = layer.handle(call(&[])).await;
        assert_eq!(count("test-observe-b", "CANCELLED"), 0, "not over yet");
        // A body with no upstream ends at once, with no status: the call
        // was cut short (the real stack never makes one, but dropping
        // without reading is what a caller that goes away does).
        drop(answer.into_body().collect().await);
        assert_eq!(count("test-observe-b", "CANCELLED"), 1);
    }

    #[tokio::test]
    async fn unroutable_methods_share_one_series() {
        let layer = Observe::new(
            "test-observe-c",
            Box::new(|_| false),
            Recorder::new(|_: &Call| grpc::status_response(Code::Unimplemented, "no")),
        );
        layer.handle(call(&[])).await;
        let text = metrics::get().render();
        assert!(
            text.contains(r#"direction="test-observe-c",service="unknown",method="unknown",grpc_status="UNIMPLEMENTED",caller="unknown"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_inbound_call_counts_under_its_verified_peer() {
        let layer = Observe::new(
            "test-observe-d",
            Box::new(|_| true),
            Recorder::new(|_: &FromPeer| grpc::status_response(Code::PermissionDenied, "no")),
        );
        let id = trellis::identity::SpiffeId::parse("spiffe://trellis.local/ns/default/sa/billing")
            .unwrap();
        let from = FromPeer {
            peer: Arc::new(crate::layer::classify::Peer::new(id)),
            call: call(&[]),
        };
        layer.handle(from).await;
        assert_eq!(
            count_from("test-observe-d", "billing", "PERMISSION_DENIED"),
            1,
            "counted under who called, refused or not"
        );
    }

    #[tokio::test]
    async fn an_edge_call_counts_under_its_api_key_and_no_other_name() {
        let layer = Observe::new(
            "test-observe-e",
            Box::new(|_| true),
            Recorder::new(|_: &Call| grpc::status_response(Code::Ok, "")),
        );
        for principal in [Some("api-key:ops"), Some("jwt:alice"), None] {
            let mut c = call(&[]);
            c.access = Some(AccessInfo {
                peer: "127.0.0.1:1".parse().unwrap(),
                protocol: "grpc",
                principal: principal.map(http::HeaderValue::from_static),
                trace_id: None,
            });
            layer.handle(c).await;
        }
        assert_eq!(count_from("test-observe-e", "api-key:ops", "OK"), 1);
        assert_eq!(count_from("test-observe-e", "edge", "OK"), 2);
        assert!(!metrics::get().render().contains("alice"));
    }
}
