//! Continues the call's W3C trace: a client span on the outbound side, a
//! server span on the inbound side and at the edge, each the parent of
//! what comes after it (the `traceparent` passed on names it).
//!
//! Spans carry the OpenTelemetry RPC conventions (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`), the verified peer
//! (`trellis.peer.identity` inbound), the endpoint each attempt went to
//! (`server.address`/`server.port` and one `attempt` event per attempt)
//! and the retries (`trellis.retries`).
//!
//! The sampling decision is made here, not in the SDK, so that a call
//! that is not recorded costs a header parse and a header write, no span:
//! a caller's decision is followed (parent-based), a new trace is
//! recorded at the configured ratio. A `traceparent` that does not parse
//! is never passed on: the call starts a new trace. With no collector
//! configured, the context passes through untouched (a malformed one is
//! still removed).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tokio::time::Instant;
use tonic::Code;
use trellis::telemetry::Sampling;
use trellis::trace_context::{
    MAX_TRACESTATE, TRACEPARENT, TRACESTATE, TraceParent, random_span_id, random_trace_id,
};

use super::{Answer, CarriesCall, Ending, Handle};
use crate::body::{CallEnd, CallObserver};

/// How this proxy records spans, once a collector is configured.
struct Tracing {
    tracer: SdkTracer,
    sampling: Sampling,
}

static TRACING: OnceLock<Tracing> = OnceLock::new();

/// Records spans with `provider`'s tracer from now on.
pub fn install(provider: &SdkTracerProvider, sampling: Sampling) {
    use opentelemetry::trace::TracerProvider as _;
    let _ = TRACING.set(Tracing {
        tracer: provider.tracer("mesh-proxy"),
        sampling,
    });
}

/// Which span a side of the proxy makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The outbound port: a client span.
    Outbound,
    /// The inbound port: a server span.
    Inbound,
    /// The edge: a server span for an external caller.
    Edge,
}

/// The trace layer.
#[derive(Debug)]
pub struct Trace<S> {
    inner: S,
    side: Side,
}

impl<S> Trace<S> {
    /// Traces calls on `side`.
    pub fn new(side: Side, inner: S) -> Self {
        Self { inner, side }
    }
}

impl<S, R> Handle<R> for Trace<S>
where
    S: Handle<R, Answer = Answer>,
    R: CarriesCall,
{
    type Answer = Answer;

    // Not an `async fn`: the span's end rides on [`Ending`], which adds a
    // few bytes to the call's future rather than room for the request.
    fn handle(&self, mut request: R) -> impl Future<Output = Answer> + Send {
        let end = self.begin(&mut request);
        Ending::new(self.inner.handle(request), end)
    }
}

impl<S> Trace<S> {
    /// Fixes the context the call carries on, and starts its span if it
    /// is recorded.
    fn begin<R: CarriesCall>(&self, request: &mut R) -> Option<CallEnd> {
        let call = request.call_mut();
        let incoming = TraceParent::from_headers(&call.headers);
        if incoming.is_none() && call.headers.contains_key(TRACEPARENT) {
            // Never passed on as it came: a new trace starts here (or
            // further on, when nothing is recorded here).
            call.headers.remove(TRACEPARENT);
            call.headers.remove(TRACESTATE);
        }
        if call
            .headers
            .get(TRACESTATE)
            .is_some_and(|v| v.len() > MAX_TRACESTATE)
        {
            call.headers.remove(TRACESTATE);
        }
        let Some(tracing) = TRACING.get() else {
            if let Some(incoming) = incoming {
                in_access_log(call, incoming.trace_id);
            }
            return None;
        };
        if !tracing.sampling.sample(incoming.map(|p| p.sampled)) {
            let context = TraceParent {
                trace_id: incoming.map_or_else(random_trace_id, |p| p.trace_id),
                span_id: random_span_id(),
                sampled: false,
            };
            call.headers.insert(TRACEPARENT, context.header());
            in_access_log(call, context.trace_id);
            return None;
        }
        // Only a recorded call pays for naming its peer.
        let peer = request.peer_identity().map(str::to_owned);
        let call = request.call_mut();
        let parent = match incoming {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(p.trace_id),
                SpanId::from(p.span_id),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let method = &call.method;
        let mut attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", method.service().to_owned()),
            KeyValue::new("rpc.method", method.method().to_owned()),
            KeyValue::new("trellis.side", self.side.name()),
        ];
        if let Some(peer) = peer {
            attributes.push(KeyValue::new("trellis.peer.identity", peer));
        }
        if let Some(access) = &call.access {
            attributes.push(KeyValue::new(
                "client.address",
                access.peer.ip().to_string(),
            ));
            attributes.push(KeyValue::new("trellis.edge.protocol", access.protocol));
            if let Some(principal) = access.principal.as_ref().and_then(|p| p.to_str().ok()) {
                attributes.push(KeyValue::new("enduser.id", principal.to_owned()));
            }
        }
        let span = tracing
            .tracer
            .span_builder(format!("{}/{}", method.service(), method.method()))
            .with_kind(self.side.kind())
            .with_attributes(attributes)
            .start_with_context(&tracing.tracer, &parent);
        let own = span.span_context();
        let context = TraceParent {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(own.span_id().to_bytes()),
            sampled: true,
        };
        call.headers.insert(TRACEPARENT, context.header());
        in_access_log(call, context.trace_id);
        let recorded = Arc::new(CallSpan {
            span: Mutex::new(Some(span)),
            side: self.side,
            attempts: AtomicU32::new(0),
        });
        call.trace = Some(recorded.clone());
        Some(CallEnd::new(recorded, call.started))
    }
}

/// Names the trace in the edge's access-log line (edge calls only).
fn in_access_log(call: &mut super::Call, trace_id: u128) {
    if let Some(access) = call.access.as_mut() {
        access.trace_id = Some(trace_id.to_be_bytes());
    }
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
            Side::Edge => "edge",
        }
    }

    fn kind(self) -> SpanKind {
        match self {
            Side::Outbound => SpanKind::Client,
            Side::Inbound | Side::Edge => SpanKind::Server,
        }
    }
}

/// A recorded call's span, which the layers inside add to.
pub struct CallSpan {
    span: Mutex<Option<opentelemetry_sdk::trace::Span>>,
    side: Side,
    attempts: AtomicU32,
}

impl std::fmt::Debug for CallSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSpan")
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

impl CallSpan {
    /// An attempt went to `endpoint`, an instance of `service`.
    pub fn attempt(&self, endpoint: std::net::SocketAddr, service: &str) {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let mut span = self.span.lock().expect("span lock");
        let Some(span) = span.as_mut() else { return };
        let address = KeyValue::new("server.address", endpoint.ip().to_string());
        let port = KeyValue::new("server.port", i64::from(endpoint.port()));
        span.add_event(
            "attempt",
            vec![
                KeyValue::new("trellis.attempt", i64::from(n)),
                address.clone(),
                port.clone(),
            ],
        );
        // The last attempt's endpoint is the one that answered.
        span.set_attributes([
            address,
            port,
            KeyValue::new("trellis.peer.service", service.to_owned()),
        ]);
    }
}

impl CallObserver for CallSpan {
    fn finished(&self, code: Code, _started: Instant) {
        let Some(mut span) = self.span.lock().expect("span lock").take() else {
            return;
        };
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        let attempts = self.attempts.load(Ordering::Relaxed);
        if attempts > 1 {
            span.set_attribute(KeyValue::new("trellis.retries", i64::from(attempts - 1)));
        }
        // The RPC conventions: a client span is an error for any status
        // but OK; a server span only for the statuses a server is to
        // blame for.
        let error = match self.side {
            Side::Outbound => code != Code::Ok,
            Side::Inbound | Side::Edge => matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ),
        };
        if error {
            span.set_status(Status::error(format!("{code:?}")));
        }
        span.end();
    }
}

/// The export's counts on `/metrics`: `trellis_proxy_spans_dropped_total`
/// by reason (`queue_full`: the collector could not keep up;
/// `export_failed`: it refused or did not answer) and
/// `trellis_proxy_spans_exported_total`. Read at each scrape.
#[derive(Debug)]
pub struct SpanCounts;

impl prometheus_client::collector::Collector for SpanCounts {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        let (queue_full, export_failed) = trellis::telemetry::spans_dropped();
        let mut family = encoder.encode_descriptor(
            "spans_dropped",
            "Finished spans not sent to the collector, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [("queue_full", queue_full), ("export_failed", export_failed)] {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        ConstCounter::new(trellis::telemetry::spans_exported()).encode(
            encoder.encode_descriptor(
                "spans_exported",
                "Spans the collector accepted.",
                None,
                MetricType::Counter,
            )?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::testing::{Recorder, call};

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// What the layer inside saw of `headers` (no collector configured:
    /// unit tests install no tracer).
    async fn passed_on(headers: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let layer = Trace::new(
            Side::Edge,
            Recorder::new(|_: &crate::layer::Call| Answer::default()),
        );
        drop(layer.handle(call(headers)).await);
        layer.inner.seen.lock().unwrap().remove(0).headers
    }

    #[tokio::test]
    async fn a_valid_context_passes_through_untouched() {
        let seen = passed_on(&[(TRACEPARENT, GOOD), (TRACESTATE, "congo=t61rcWkgMzE")]).await;
        assert_eq!(seen[TRACEPARENT], GOOD);
        assert_eq!(seen[TRACESTATE], "congo=t61rcWkgMzE");
    }

    #[tokio::test]
    async fn a_malformed_context_is_never_passed_on() {
        let seen = passed_on(&[
            (TRACEPARENT, "00-not-a-trace-01"),
            (TRACESTATE, "congo=t61rcWkgMzE"),
        ])
        .await;
        assert!(seen.get(TRACEPARENT).is_none());
        assert!(seen.get(TRACESTATE).is_none());
    }

    #[tokio::test]
    async fn an_oversized_tracestate_is_dropped() {
        let long: &'static str = Box::leak(format!("a={}", "x".repeat(600)).into_boxed_str());
        let seen = passed_on(&[(TRACEPARENT, GOOD), (TRACESTATE, long)]).await;
        assert_eq!(seen[TRACEPARENT], GOOD);
        assert!(seen.get(TRACESTATE).is_none());
    }
}
