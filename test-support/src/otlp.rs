//! A real OTLP/gRPC trace receiver for tests: a tonic server implementing
//! `opentelemetry.proto.collector.trace.v1.TraceService`, keeping every
//! span it is sent (bounded) so a test can check whole traces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};

/// Most spans kept; a test that sends more has a bug.
const MAX_SPANS: usize = 100_000;

/// A span as received, with ids in hex.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// OTLP span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, empty for a root span.
    pub parent_span_id: String,
    /// Attributes, values as text.
    pub attributes: HashMap<String, String>,
    /// Event names, in order.
    pub events: Vec<String>,
    /// The status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl ReceivedSpan {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| {
                    r.attributes
                        .iter()
                        .find(|kv| kv.key == "service.name")
                        .map(value_of)
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    if kept.len() >= MAX_SPANS {
                        return Err(tonic::Status::resource_exhausted(
                            "the test receiver keeps at most 100000 spans",
                        ));
                    }
                    kept.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), value_of(kv)))
                            .collect(),
                        events: span.events.into_iter().map(|e| e.name).collect(),
                        status: span.status.map_or(0, |s| s.code),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A running receiver on 127.0.0.1, on a runtime of its own (so that
/// stopping it closes every connection, as a collector that goes away
/// would); stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl OtlpReceiver {
    /// Starts a receiver on a free port.
    pub fn start() -> Self {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the OTLP receiver");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let spans = receiver.spans.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(receiver))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                // Not a graceful stop: the receiver vanishes at once.
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection's task.
            runtime.shutdown_background();
        });
        Self {
            addr,
            spans,
            stop: Mutex::new(Some(stop)),
        }
    }

    /// `http://<addr>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of trace `trace_id`, once `done` says they are all there
    /// (checked every 100 ms, up to `limit`); what arrived on timeout.
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        limit: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>, Vec<ReceivedSpan>> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let trace: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if done(&trace) {
                return Ok(trace);
            }
            if tokio::time::Instant::now() > until {
                return Err(trace);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops listening and closes its connections (a collector that goes
    /// away).
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}
