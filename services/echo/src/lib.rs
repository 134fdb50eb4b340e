//! `trellis.echo.v1.EchoService`: the mesh's own test and benchmark
//! workload.
//!
//! It holds no data. It echoes, sleeps, streams and fails on request, and
//! counts what reached it, so that tests can check what the mesh delivered
//! (retries, cancellations, load balancing) and benchmarks can measure the
//! mesh rather than a service. Faults injected per instance (a delay, a
//! share of failures) make it a slow or failing instance on demand.

mod faults;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::metadata::{KeyAndValueRef, MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use trellis::pb::trellis::echo::v1 as pb;
use trellis::server::Router;

pub use faults::{Faults, InvalidFaults, MAX_DELAY, Violation};
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
    Inject,
}

impl Method {
    const ALL: [Method; 8] = [
        Method::Echo,
        Method::Sleep,
        Method::Count,
        Method::Collect,
        Method::Chat,
        Method::Record,
        Method::Fail,
        Method::Inject,
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
            Method::Inject => "Inject",
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
    /// Calls in progress (see [`InFlight`]) and the most there have been.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

impl Stats {
    fn count_call(&self, method: Method) {
        self.calls_by_method[method as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// One call in progress, from its arrival until the guard is dropped: when
/// the handler returns, when tonic drops its future because the call was
/// cancelled, or, for a response stream, when the stream ends or is
/// dropped. The peak is what `GetStats` reports as `peak_in_flight`, so
/// tests can check a concurrency limit held in front of the instance.
#[derive(Debug)]
struct InFlight {
    stats: Arc<Stats>,
}

impl InFlight {
    fn enter(stats: &Arc<Stats>) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        Self {
            stats: stats.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The EchoService implementation. Clones share the instance name, the
/// counters and the faults in force.
#[derive(Clone, Debug)]
pub struct EchoServer {
    instance: Arc<str>,
    stats: Arc<Stats>,
    faults: Arc<RwLock<Faults>>,
}

impl EchoServer {
    /// A server whose responses name it `instance`, with zeroed counters
    /// and no faults.
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            instance: Arc::from(instance.into()),
            stats: Arc::default(),
            faults: Arc::default(),
        }
    }

    /// The same server with `faults` in force from the start (until an
    /// `Inject` call replaces them).
    pub fn with_faults(self, faults: Faults) -> Self {
        self.set_faults(faults);
        self
    }

    /// The instance name responses carry.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        // Faults is plain data, replaced whole: a panic elsewhere cannot
        // leave it half-written, so a poisoned lock is still good.
        *self.faults.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_faults(&self, faults: Faults) {
        *self.faults.write().unwrap_or_else(PoisonError::into_inner) = faults;
    }

    /// Counts a call of `method` and marks it in progress until the
    /// returned guard is dropped.
    fn arrive(&self, method: Method) -> InFlight {
        self.stats.count_call(method);
        InFlight::enter(&self.stats)
    }

    /// Applies the faults in force when the call arrived: their delay,
    /// then maybe a failure.
    async fn inject_faults(&self) -> Result<(), Status> {
        let faults = self.faults();
        if faults.is_none() {
            return Ok(());
        }
        faults.apply(&self.instance).await
    }
}

/// `stream`, holding `in_flight` until it ends or is dropped: a streaming
/// call is in progress for as long as its responses are being sent.
fn holding<S>(stream: S, in_flight: InFlight) -> impl Stream<Item = S::Item> + Send + 'static
where
    S: Stream + Send + 'static,
{
    stream.map(move |item| {
        let _held = &in_flight;
        item
    })
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
        let _in_flight = self.arrive(Method::Echo);
        self.inject_faults().await?;
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
        let _in_flight = self.arrive(Method::Sleep);
        // A call dropped during the injected delay is cancelled too; one
        // that fails (fault or bad duration) is not.
        let guard = SleepGuard {
            cancelled: &self.stats.cancelled,
            finished: false,
        };
        let slept = async {
            self.inject_faults().await?;
            let duration = duration("duration", request.into_inner().duration)?;
            tokio::time::sleep(duration).await;
            Ok::<_, Status>(())
        }
        .await;
        guard.finish();
        slept?;
        Ok(Response::new(pb::SleepResponse {
            instance: self.instance.to_string(),
        }))
    }

    type CountStream = ResponseStream<pb::CountResponse>;

    async fn count(
        &self,
        request: Request<pb::CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let in_flight = self.arrive(Method::Count);
        self.inject_faults().await?;
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
        Ok(Response::new(Box::pin(holding(stream, in_flight))))
    }

    async fn collect(
        &self,
        request: Request<Streaming<pb::CollectRequest>>,
    ) -> Result<Response<pb::CollectResponse>, Status> {
        let _in_flight = self.arrive(Method::Collect);
        self.inject_faults().await?;
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
        let in_flight = self.arrive(Method::Chat);
        self.inject_faults().await?;
        let instance = self.instance.to_string();
        let replies = request.into_inner().map(move |message| {
            message.map(|pb::ChatRequest { message, payload }| pb::ChatResponse {
                message,
                payload,
                instance: instance.clone(),
            })
        });
        Ok(Response::new(Box::pin(holding(replies, in_flight))))
    }

    async fn record(
        &self,
        _request: Request<pb::RecordRequest>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let _in_flight = self.arrive(Method::Record);
        // Counted on arrival, before any fault: `records` says how many
        // Record calls reached the instance (what a mesh must not
        // duplicate), whether or not they were answered.
        let sequence = self.stats.records.fetch_add(1, Ordering::Relaxed) + 1;
        self.inject_faults().await?;
        Ok(Response::new(pb::RecordResponse {
            instance: self.instance.to_string(),
            sequence,
        }))
    }

    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        let _in_flight = self.arrive(Method::Fail);
        self.inject_faults().await?;
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

    async fn inject(
        &self,
        request: Request<pb::InjectRequest>,
    ) -> Result<Response<pb::InjectResponse>, Status> {
        // Counted in `calls`, but neither delayed, failed nor in flight:
        // faults must always be removable, and must not skew what they
        // are meant to measure.
        self.stats.count_call(Method::Inject);
        let faults = Faults::try_from(request.into_inner())?;
        self.set_faults(faults);
        let (fail_code, fail_ratio) = faults.failure().map_or((0, 0.0), |(c, r)| (c as i32, r));
        tracing::info!(
            instance = %self.instance,
            delay = ?faults.delay(),
            fail_code,
            fail_ratio,
            "faults injected"
        );
        Ok(Response::new(pb::InjectResponse {
            instance: self.instance.to_string(),
        }))
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
            peak_in_flight: self.stats.peak_in_flight.load(Ordering::Relaxed),
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

#[cfg(test)]
mod tests;
