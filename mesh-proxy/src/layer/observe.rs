//! Counts every call that reaches it: its final gRPC status and latency
//! (`trellis_proxy_requests_total`, `trellis_proxy_request_duration_seconds`)
//! and, for the edge, one access-log line. The end is reported when the
//! call really ends: at once for a status-only answer, or when the
//! response body's trailers pass (or the caller goes away: CANCELLED).

use std::sync::Arc;

use super::{Answer, CarriesCall, Handle};
use crate::access::AccessLog;
use crate::body::{CallEnd, CallObserver};
use crate::grpc::{self, GrpcMethod};
use crate::metrics;

/// Whether a method gets metric labels of its own: only methods the proxy
/// can route, so that callers choosing paths do not choose how many series
/// are kept. Asked once per new series, not per call.
pub type Routable = Box<dyn Fn(&GrpcMethod) -> bool + Send + Sync>;

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
    R: CarriesCall,
{
    type Answer = Answer;

    async fn handle(&self, request: R) -> Answer {
        let call = request.call();
        let method = &call.method;
        let mut observer: Arc<dyn CallObserver> =
            metrics::get().call(self.direction, method.service(), method.method(), || {
                (self.routable)(method)
            });
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
        let text = metrics::get().render();
        let prefix = format!(
            r#"trellis_proxy_requests_total{{direction="{direction}",service="a.v1.S",method="M",grpc_status="{code}"}} "#
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
            text.contains(r#"direction="test-observe-c",service="unknown",method="unknown",grpc_status="UNIMPLEMENTED"} 1"#),
            "{text}"
        );
    }
}
