//! `trellis.echo.v1.EchoService`: the mesh's own test and benchmark
//! workload.
//!
//! It holds no data. It echoes, sleeps, streams and fails on request, and
//! counts what reached it, so that tests can check what the mesh delivered
//! (retries, cancellations, load balancing) and benchmarks can measure the
//! mesh rather than a service.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use trellis::pb::trellis::echo::v1 as pb;

pub use pb::echo_service_server::EchoServiceServer;

/// The fully qualified gRPC name of the service, as health checks and
/// reflection know it.
pub const SERVICE_NAME: &str = <EchoServiceServer<EchoServer> as NamedService>::NAME;

/// The header through which the mesh tells a service who called it.
pub const CALLER_HEADER: &str = "x-trellis-caller";

/// The trailer that tells a gRPC client how long to wait before retrying.
const RETRY_PUSHBACK_TRAILER: &str = "grpc-retry-pushback-ms";

/// Largest `Count` payload served: 4 MiB, the default largest message a
/// gRPC client accepts. Larger requests fail with INVALID_ARGUMENT rather
/// than allocate without bound.
pub const MAX_PAYLOAD_SIZE: u32 = 4 * 1024 * 1024;

/// The methods counted in `GetStats` (all but `GetStats` itself), in the
/// order of [`Stats::calls_by_method`].
#[derive(Clone, Copy, Debug)]
enum Method {
    Echo,
    Sleep,
    Count,
    Collect,
    Chat,
    Record,
    Fail,
}

impl Method {
    const ALL: [Method; 7] = [
        Method::Echo,
        Method::Sleep,
        Method::Count,
        Method::Collect,
        Method::Chat,
        Method::Record,
        Method::Fail,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Echo => "Echo",
            Method::Sleep => "Sleep",
            Method::Count => "Count",
            Method::Collect => "Collect",
            Method::Chat => "Chat",
            Method::Record => "Record",
            Method::Fail => "Fail",
        }
    }
}

/// What an instance counts since it started.
#[derive(Debug, Default)]
struct Stats {
    /// Calls per method, indexed by `Method as usize`. The total is their
    /// sum, so the two never disagree.
    calls_by_method: [AtomicU64; Method::ALL.len()],
    cancelled: AtomicU64,
    records: AtomicU64,
}

impl Stats {
    fn count_call(&self, method: Method) {
        self.calls_by_method[method as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The EchoService implementation. Clones share the instance name and the
/// counters.
#[derive(Clone, Debug)]
pub struct EchoServer {
    instance: Arc<str>,
    stats: Arc<Stats>,
}

impl EchoServer {
    /// A server whose responses name it `instance`, with zeroed counters.
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            instance: Arc::from(instance.into()),
            stats: Arc::default(),
        }
    }

    /// The instance name responses carry.
    pub fn instance(&self) -> &str {
        &self.instance
    }
}

/// Counts a cancelled `Sleep` when dropped before [`SleepGuard::finish`]:
/// tonic drops a handler's future when its call is cancelled (client reset,
/// deadline), so the drop is the only place the cancellation is visible.
struct SleepGuard<'a> {
    cancelled: &'a AtomicU64,
    finished: bool,
}

impl SleepGuard<'_> {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for SleepGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A protobuf duration as a `std` one; unset is zero, negative is rejected
/// naming `field`.
fn duration(field: &str, value: Option<prost_types::Duration>) -> Result<Duration, Status> {
    value.map_or(Ok(Duration::ZERO), |d| {
        Duration::try_from(d).map_err(|_| {
            Status::invalid_argument(format!("{field} must be a non-negative duration"))
        })
    })
}

/// Every request header with a printable ASCII value, by name; repeated
/// headers are joined with `, ` as HTTP does.
fn ascii_headers(metadata: &MetadataMap) -> std::collections::HashMap<String, String> {
    let mut headers = std::collections::HashMap::<String, String>::new();
    for entry in metadata.iter() {
        let KeyAndValueRef::Ascii(key, value) = entry else {
            continue;
        };
        let Ok(value) = value.to_str() else {
            continue;
        };
        headers
            .entry(key.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value);
            })
            .or_insert_with(|| value.to_owned());
    }
    headers
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::echo_service_server::EchoService for EchoServer {
    async fn echo(
        &self,
        request: Request<pb::EchoRequest>,
    ) -> Result<Response<pb::EchoResponse>, Status> {
        self.stats.count_call(Method::Echo);
        let caller = request
            .metadata()
            .get(CALLER_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let headers = ascii_headers(request.metadata());
        let pb::EchoRequest { message, payload } = request.into_inner();
        Ok(Response::new(pb::EchoResponse {
            message,
            payload,
            instance: self.instance.to_string(),
            caller,
            headers,
        }))
    }

    async fn sleep(
        &self,
        request: Request<pb::SleepRequest>,
    ) -> Result<Response<pb::SleepResponse>, Status> {
        self.stats.count_call(Method::Sleep);
        let duration = duration("duration", request.into_inner().duration)?;
        let guard = SleepGuard {
            cancelled: &self.stats.cancelled,
            finished: false,
        };
        tokio::time::sleep(duration).await;
        guard.finish();
        Ok(Response::new(pb::SleepResponse {
            instance: self.instance.to_string(),
        }))
    }

    type CountStream = ResponseStream<pb::CountResponse>;

    async fn count(
        &self,
        request: Request<pb::CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        self.stats.count_call(Method::Count);
        let request = request.into_inner();
        let interval = duration("interval", request.interval)?;
        if request.payload_size > MAX_PAYLOAD_SIZE {
            return Err(Status::invalid_argument(format!(
                "payload_size must be at most {MAX_PAYLOAD_SIZE} bytes"
            )));
        }
        let payload = vec![0u8; request.payload_size as usize];
        let instance = self.instance.to_string();
        // The stream is polled only as the client reads, so a cancelled call
        // stops it (and its sleeps) with nothing left running.
        let stream = futures::stream::iter(0..request.count).then(move |index| {
            let response = pb::CountResponse {
                index,
                instance: instance.clone(),
                payload: payload.clone(),
            };
            async move {
                if index > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Ok(response)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn collect(
        &self,
        request: Request<Streaming<pb::CollectRequest>>,
    ) -> Result<Response<pb::CollectResponse>, Status> {
        self.stats.count_call(Method::Collect);
        let mut stream = request.into_inner();
        let (mut messages, mut bytes) = (0u64, 0u64);
        while let Some(message) = stream.message().await? {
            messages += 1;
            bytes += message.payload.len() as u64;
        }
        Ok(Response::new(pb::CollectResponse {
            messages,
            bytes,
            instance: self.instance.to_string(),
        }))
    }

    type ChatStream = ResponseStream<pb::ChatResponse>;

    async fn chat(
        &self,
        request: Request<Streaming<pb::ChatRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        self.stats.count_call(Method::Chat);
        let instance = self.instance.to_string();
        let replies = request.into_inner().map(move |message| {
            message.map(|pb::ChatRequest { message, payload }| pb::ChatResponse {
                message,
                payload,
                instance: instance.clone(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn record(
        &self,
        _request: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        self.stats.count_call(Method::Record);
        let sequence = self.stats.records.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Response::new(pb::RecordResponse {
            instance: self.instance.to_string(),
            sequence,
        }))
    }

    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        self.stats.count_call(Method::Fail);
        let request = request.into_inner();
        // `Code::from_i32` maps unknown numbers to UNKNOWN; only a real
        // failure code is honoured.
        let code = match Code::from_i32(request.code) {
            Code::Ok => None,
            code if code as i32 == request.code => Some(code),
            _ => None,
        };
        let Some(code) = code else {
            return Err(Status::invalid_argument(format!(
                "code {} is not a gRPC failure code (1 to 16)",
                request.code
            )));
        };
        let mut trailers = MetadataMap::new();
        if !request.retry_pushback_ms.is_empty() {
            let value = MetadataValue::try_from(request.retry_pushback_ms.as_str())
                .map_err(|_| Status::invalid_argument("retry_pushback_ms is not a header value"))?;
            trailers.insert(RETRY_PUSHBACK_TRAILER, value);
        }
        Err(Status::with_metadata(code, request.message, trailers))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let calls_by_method: std::collections::HashMap<String, u64> = Method::ALL
            .iter()
            .map(|&m| {
                let calls = self.stats.calls_by_method[m as usize].load(Ordering::Relaxed);
                (m.name().to_owned(), calls)
            })
            .collect();
        Ok(Response::new(pb::GetStatsResponse {
            instance: self.instance.to_string(),
            calls: calls_by_method.values().sum(),
            cancelled: self.stats.cancelled.load(Ordering::Relaxed),
            records: self.stats.records.load(Ordering::Relaxed),
            calls_by_method,
        }))
    }
}

/// A server builder serving `echo`, grpc.health.v1 (the server and
/// EchoService SERVING) and server reflection (v1 and v1alpha). Unlike
/// `trellis::server::standard_router`, reflection lists only EchoService,
/// health and reflection: the binary embeds every Trellis contract, but
/// serves only this one.
pub async fn router(echo: EchoServer) -> (Router, HealthReporter) {
    let (router, reporter) = trellis::server::router_serving(&[SERVICE_NAME]);
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_serving::<EchoServiceServer<EchoServer>>()
        .await;
    (router.add_service(EchoServiceServer::new(echo)), reporter)
}
