//! A service's side of a trace: a server span for every call it handles,
//! continued from the caller's `traceparent` (its sidecar's span), and
//! the current span's context sent with every call it makes (through
//! [`Propagate`] on its channel), so that the sidecar's client span, and
//! everything after, joins the same trace.
//!
//! Spans carry the OpenTelemetry RPC conventions (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`) and the verified
//! caller the sidecar named (`trellis.caller`). Health checks and
//! reflection get none: the sidecar asks for health every second.

use std::time::Duration;

use http::{HeaderMap, Request, Response};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tower_http::classify::{GrpcErrorsAsFailures, GrpcFailureClass, SharedClassifier};
use tower_http::trace::{MakeSpan, OnEos, OnFailure, OnResponse};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::RPC_TARGET;
use crate::trace_context::TraceParent;

/// The tower layer that gives every call a server span.
pub type TraceLayer = tower_http::trace::TraceLayer<
    SharedClassifier<GrpcErrorsAsFailures>,
    ServerSpan,
    (),
    RecordStatus,
    (),
    RecordStatus,
    RecordStatus,
>;

/// The layer for a tonic server.
pub fn layer() -> TraceLayer {
    tower_http::trace::TraceLayer::new_for_grpc()
        .make_span_with(ServerSpan)
        .on_request(())
        .on_response(RecordStatus)
        .on_body_chunk(())
        .on_eos(RecordStatus)
        .on_failure(RecordStatus)
}

/// Makes a call's server span.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerSpan;

impl<B> MakeSpan<B> for ServerSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        if service.is_empty()
            || service == "grpc.health.v1.Health"
            || service.starts_with("grpc.reflection.")
        {
            return Span::none();
        }
        let caller = request
            .headers()
            .get("x-trellis-caller")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let span = tracing::info_span!(
            target: RPC_TARGET,
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            trellis.caller = %caller,
            trace_id = Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);
        record_trace_id(&span, request.headers());
        span
    }
}

/// Records the span's trace id as `trace_id` for log lines: the exported
/// span's own when traces are exported, else the caller's.
fn record_trace_id(span: &Span, headers: &HeaderMap) {
    let context = span.context();
    let own = context.span().span_context().trace_id();
    if own != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(own));
    } else if let Some(parent) = TraceParent::from_headers(headers) {
        span.record("trace_id", tracing::field::display(parent.trace_id_hex()));
    }
}

/// Records a call's gRPC status on its span, from the trailers-only
/// answer's headers, the trailers, or the failure.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordStatus;

impl<B> OnResponse<B> for RecordStatus {
    fn on_response(self, response: &Response<B>, _latency: Duration, span: &Span) {
        if let Some(code) = grpc_status(response.headers()) {
            record(span, code);
        }
    }
}

impl OnEos for RecordStatus {
    fn on_eos(self, trailers: Option<&HeaderMap>, _duration: Duration, span: &Span) {
        if let Some(code) = trailers.and_then(grpc_status) {
            record(span, code);
        }
    }
}

impl OnFailure<GrpcFailureClass> for RecordStatus {
    fn on_failure(&mut self, failure: GrpcFailureClass, _latency: Duration, span: &Span) {
        match failure {
            GrpcFailureClass::Code(code) => record(span, code.get()),
            GrpcFailureClass::Error(_) => record(span, tonic::Code::Unknown as i32),
        }
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The status as `rpc.grpc.status_code`; the span is an error when the
/// status is one the server is to blame for (the RPC conventions' list).
fn record(span: &Span, code: i32) {
    span.record("rpc.grpc.status_code", code);
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
    // DATA_LOSS.
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "ERROR");
    }
}

/// Reads trace context from request headers.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes trace context into a request's metadata.
#[derive(Debug)]
pub struct MetadataInjector<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Sends the current span's trace context with every call on a channel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject(&Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// Writes `span`'s trace context into `metadata` (nothing when traces are
/// not exported).
pub fn inject(span: &Span, metadata: &mut tonic::metadata::MetadataMap) {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

/// A channel to the own sidecar that carries trace context.
pub type MeshChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Propagate>;

/// `channel`, carrying trace context.
pub fn mesh_channel(channel: tonic::transport::Channel) -> MeshChannel {
    tonic::service::interceptor::InterceptedService::new(channel, Propagate)
}

/// The current span's `traceparent` (for an event written now, so that
/// its delivery joins the trace), if traces are exported.
pub fn current_traceparent() -> Option<String> {
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// The trace context a stored `traceparent` names, for a span to continue.
pub fn context_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::writer::BoxMakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn logged_in_a_call(json: bool) -> String {
        let lines = Lines::default();
        let writer = {
            let lines = lines.clone();
            BoxMakeWriter::new(move || lines.clone())
        };
        let subscriber = crate::telemetry::subscriber("warn", None, writer, false, json);
        tracing::subscriber::with_default(subscriber, || {
            let request = Request::builder()
                .uri("/telco.usage.v1.UsageService/RecordUsage")
                .header("traceparent", TRACEPARENT)
                .body(())
                .unwrap();
            let span = ServerSpan.make_span(&request);
            let _inside = span.enter();
            tracing::warn!("the database is slow");
        });
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_line_logged_in_a_call_carries_its_trace_id() {
        let text = logged_in_a_call(false);
        assert!(
            text.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"),
            "{text}"
        );
        let json = logged_in_a_call(true);
        let line: serde_json::Value = serde_json::from_str(json.trim()).expect(&json);
        assert_eq!(
            line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{json}"
        );
        assert_eq!(line["message"], "the database is slow");
    }

    #[test]
    fn health_checks_get_no_span() {
        let request = Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(())
            .unwrap();
        assert!(ServerSpan.make_span(&request).is_none());
    }
}
