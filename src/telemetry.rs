//! Logs and traces.
//!
//! Logs go through `tracing` to stderr: quiet by default (warnings, plus
//! each binary's start-up and shutdown lines), `RUST_LOG` takes any
//! `tracing_subscriber` filter for more, and `TRELLIS_LOG_FORMAT=json`
//! switches to one JSON object per line. A line logged while a call is
//! handled carries the call's `trace_id`.
//!
//! Traces are exported with OTLP over gRPC when the standard variables
//! name a collector (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
//! `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_TRACES_EXPORTER=none` turns it
//! off), and not at all otherwise. Sampling follows `OTEL_TRACES_SAMPLER`
//! and `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`).
//!
//! Exporting never slows a call: finished spans go into a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) drained by a thread of its
//! own, in batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512) at
//! least every `OTEL_BSP_SCHEDULE_DELAY` ms (default 5000). When the
//! collector is slow or away, the queue fills and further spans are
//! dropped and counted ([`spans_dropped`]), never waited for.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The target of the spans that stand for calls (a service's handling of
/// an RPC, an event's delivery). These are the spans exported, whatever
/// the log filter says, and log lines inside them show their `trace_id`.
pub const RPC_TARGET: &str = "trellis::rpc";

/// Spans dropped because the export queue was full.
static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
/// Spans lost because the collector refused or did not answer a batch.
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// Spans dropped so far: `(queue full, export failed)`.
pub fn spans_dropped() -> (u64, u64) {
    (
        DROPPED_QUEUE_FULL.load(Ordering::Relaxed),
        DROPPED_EXPORT_FAILED.load(Ordering::Relaxed),
    )
}

/// Spans the collector has accepted so far.
pub fn spans_exported() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}

/// Installs the global subscriber for logs only (the CLI, the proxy: the
/// proxy makes its spans with [`provider`] itself). `default_filter`
/// applies when `RUST_LOG` is unset, e.g. `"warn,trellis_registry=info"`.
pub fn init(default_filter: &str) {
    install(default_filter, None);
}

/// Keeps a service's trace export going; flushes what is queued when
/// dropped.
#[derive(Debug, Default)]
#[must_use = "dropping it ends the export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(Duration::from_secs(2));
        }
    }
}

/// Installs the global subscriber for logs and, when a collector is
/// named, for traces of `service` (its `service.name`): the call spans
/// ([`RPC_TARGET`]) are exported through `tracing-opentelemetry`, and
/// W3C trace context is the propagator.
pub fn init_traced(service: &str, default_filter: &str) -> Telemetry {
    let provider = provider(service, Sampling::from_env().sampler());
    if let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    install(default_filter, provider.as_ref());
    Telemetry { provider }
}

fn install(default_filter: &str, provider: Option<&SdkTracerProvider>) {
    let json = std::env::var("TRELLIS_LOG_FORMAT").is_ok_and(|f| f == "json");
    let subscriber = subscriber(
        default_filter,
        provider,
        BoxMakeWriter::new(std::io::stderr),
        std::io::stderr().is_terminal(),
        json,
    );
    // A second init (tests) keeps the first subscriber.
    let _ = subscriber.try_init();
}

/// The subscriber [`init`] installs, writing to `writer`: log lines
/// (coloured if `ansi`, one JSON object each if `json`) filtered by
/// `RUST_LOG` or `default_filter`, and, with a provider, the call spans
/// for export.
pub fn subscriber(
    default_filter: &str,
    provider: Option<&SdkTracerProvider>,
    writer: BoxMakeWriter,
    ansi: bool,
    json: bool,
) -> impl tracing::Subscriber + Send + Sync {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter))
        // Known to the log layer so that lines inside a call show its
        // trace id; the spans themselves are not printed.
        .add_directive(
            format!("{RPC_TARGET}=info")
                .parse()
                .expect("a valid directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(true);
    let fmt = if json {
        fmt.json().flatten_event(true).with_filter(filter).boxed()
    } else {
        fmt.compact().with_filter(filter).boxed()
    };
    let otel = provider.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("trellis"))
            .with_filter(Targets::new().with_target(RPC_TARGET, tracing::Level::INFO))
    });
    tracing_subscriber::registry().with(fmt).with(otel)
}

/// How traces are sampled: the share of new traces recorded, and whether
/// a caller's decision (its `traceparent`'s sampled flag) is followed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// The share of traces begun here that are recorded, in [0, 1].
    pub ratio: f64,
    /// Whether a call that arrives in a trace follows the caller.
    pub parent_based: bool,
}

impl Sampling {
    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`; an
    /// unknown sampler or a bad ratio is reported and the default
    /// (`parentbased_always_on`) used, as the specification asks.
    pub fn from_env() -> Self {
        let sampler = std::env::var("OTEL_TRACES_SAMPLER").ok();
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
        match Self::parse(sampler.as_deref(), arg.as_deref()) {
            Ok(sampling) => sampling,
            Err(problem) => {
                tracing::warn!(%problem, "using parentbased_always_on");
                Self::DEFAULT
            }
        }
    }

    const DEFAULT: Self = Self {
        ratio: 1.0,
        parent_based: true,
    };

    /// Reads a sampler name and its argument.
    pub fn parse(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg {
                None => Ok(1.0),
                Some(text) => match text.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(format!(
                        "OTEL_TRACES_SAMPLER_ARG={text:?} is not a ratio between 0 and 1"
                    )),
                },
            }
        };
        let (ratio, parent_based) = match sampler.map(str::trim) {
            None | Some("") | Some("parentbased_always_on") => (1.0, true),
            Some("always_on") => (1.0, false),
            Some("always_off") => (0.0, false),
            Some("parentbased_always_off") => (0.0, true),
            Some("traceidratio") => (ratio()?, false),
            Some("parentbased_traceidratio") => (ratio()?, true),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not one of always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                ));
            }
        };
        Ok(Self {
            ratio,
            parent_based,
        })
    }

    /// The SDK's sampler for this.
    pub fn sampler(&self) -> Sampler {
        let root = if self.ratio >= 1.0 {
            Sampler::AlwaysOn
        } else if self.ratio <= 0.0 {
            Sampler::AlwaysOff
        } else {
            Sampler::TraceIdRatioBased(self.ratio)
        };
        if self.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        }
    }

    /// Whether a call is recorded: `parent` is the caller's sampled flag,
    /// if it sent a trace context.
    pub fn sample(&self, parent: Option<bool>) -> bool {
        match parent {
            Some(sampled) if self.parent_based => sampled,
            _ => self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio),
        }
    }
}

/// Where and how to export, from the environment; `None` when no
/// collector is named.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    /// The collector's OTLP/gRPC address (`http://host:4317`).
    pub endpoint: String,
    /// Most spans waiting for export.
    pub queue: usize,
    /// Most spans in one export.
    pub batch: usize,
    /// Longest wait before a batch goes out.
    pub delay: Duration,
    /// Longest an export may take.
    pub timeout: Duration,
}

impl ExportSettings {
    /// From the standard `OTEL_*` variables.
    pub fn from_env() -> Option<Self> {
        if std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|e| e.trim() == "none") {
            return None;
        }
        let endpoint = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))?;
        let number = |name: &str, default: u64, max: u64| -> u64 {
            match std::env::var(name) {
                Err(_) => default,
                Ok(text) => match text.trim().parse::<u64>() {
                    Ok(n) if (1..=max).contains(&n) => n,
                    _ => {
                        tracing::warn!(variable = name, value = %text, default, max, "not a number between 1 and the most allowed; using the default");
                        default
                    }
                },
            }
        };
        let queue = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1 << 20) as usize;
        Some(Self {
            endpoint: endpoint.trim().to_owned(),
            queue,
            batch: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1 << 16) as usize).min(queue),
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000, 3_600_000)),
            timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 10_000, 3_600_000)),
        })
    }
}

/// A tracer provider exporting the spans of `service` to the collector
/// the environment names, or `None` when it names none. `sampler` decides
/// which spans are recorded: [`Sampling::sampler`] for code that leaves
/// the decision to the SDK, `Sampler::AlwaysOn` for code that has made
/// it already (the proxy: a second decision would record the square of
/// the ratio, and pass on a sampled flag for spans never exported).
pub fn provider(service: &str, sampler: Sampler) -> Option<SdkTracerProvider> {
    let settings = ExportSettings::from_env()?;
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let processor = BoundedExport::start(settings.clone(), resource.clone());
    tracing::info!(endpoint = %settings.endpoint, ?sampler, "exporting traces (OTLP/gRPC)");
    Some(
        SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(sampler)
            .with_span_processor(processor)
            .build(),
    )
}

enum Message {
    Span(Box<SpanData>),
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Hands finished spans to the export thread through a bounded queue.
#[derive(Debug)]
struct BoundedExport {
    queue: mpsc::Sender<Message>,
}

impl BoundedExport {
    fn start(settings: ExportSettings, resource: Resource) -> Self {
        let (queue, rx) = mpsc::channel(settings.queue);
        let spawned = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_thread(settings, resource, rx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the trace export thread; spans will be dropped");
        }
        Self { queue }
    }

    fn flush(&self, timeout: Duration) -> OTelSdkResult {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.queue.try_send(Message::Flush(tx)).is_err() {
            return Ok(());
        }
        let _ = rx.recv_timeout(timeout);
        Ok(())
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(Message::Span(Box::new(span))).is_err() {
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush(timeout)
    }
}

fn export_thread(settings: ExportSettings, resource: Resource, rx: mpsc::Receiver<Message>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the trace export runtime; spans will be dropped");
            return;
        }
    };
    runtime.block_on(export_loop(settings, resource, rx));
}

async fn export_loop(
    settings: ExportSettings,
    resource: Resource,
    mut rx: mpsc::Receiver<Message>,
) {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.timeout)
        .build();
    let mut exporter = match exporter {
        Ok(exporter) => exporter,
        Err(e) => {
            tracing::warn!(endpoint = %settings.endpoint, error = %e, "cannot export traces; spans will be dropped");
            while let Some(message) = rx.recv().await {
                match message {
                    Message::Span(_) => {
                        DROPPED_EXPORT_FAILED.fetch_add(1, Ordering::Relaxed);
                    }
                    Message::Flush(done) => drop(done.send(())),
                }
            }
            return;
        }
    };
    exporter.set_resource(&resource);
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let mut batch = Vec::with_capacity(settings.batch.min(64));
        let mut flushed = None;
        match rx.recv().await {
            None => return,
            Some(Message::Span(span)) => batch.push(*span),
            Some(Message::Flush(done)) => {
                let _ = done.send(());
                continue;
            }
        }
        let due = tokio::time::Instant::now() + settings.delay;
        while batch.len() < settings.batch {
            match tokio::time::timeout_at(due, rx.recv()).await {
                Ok(Some(Message::Span(span))) => batch.push(*span),
                Ok(Some(Message::Flush(done))) => {
                    flushed = Some(done);
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match exporter.export(batch).await {
            Ok(()) => {
                EXPORTED.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                DROPPED_EXPORT_FAILED.fetch_add(n, Ordering::Relaxed);
                // A collector that is away would otherwise fill the log.
                let now = tokio::time::Instant::now();
                if last_warning.is_none_or(|t| now - t > Duration::from_secs(60)) {
                    last_warning = Some(now);
                    tracing::warn!(endpoint = %settings.endpoint, error = %e, spans = n, "trace export failed; spans dropped (logged at most once a minute)");
                }
            }
        }
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_read_from_the_standard_variables() {
        let p = |s, a| Sampling::parse(s, a);
        assert_eq!(p(None, None).unwrap(), Sampling::DEFAULT);
        assert_eq!(
            p(Some("parentbased_traceidratio"), Some("0.01")).unwrap(),
            Sampling {
                ratio: 0.01,
                parent_based: true
            }
        );
        assert_eq!(p(Some("always_off"), None).unwrap().ratio, 0.0);
        assert!(p(Some("traceidratio"), Some("1.5")).is_err());
        assert!(p(Some("traceidratio"), Some("lots")).is_err());
        assert!(
            p(Some("jaeger_remote"), None)
                .unwrap_err()
                .contains("jaeger_remote")
        );
    }

    #[test]
    fn a_parent_based_sampler_follows_the_caller() {
        let never = Sampling {
            ratio: 0.0,
            parent_based: true,
        };
        assert!(never.sample(Some(true)));
        assert!(!never.sample(None));
        let always = Sampling {
            ratio: 1.0,
            parent_based: false,
        };
        assert!(always.sample(Some(false)));
    }
}
