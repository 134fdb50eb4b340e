//! The proxy's Prometheus metrics, served on the admin port.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tonic::Code;

use crate::body::CallObserver;
use crate::grpc;

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    direction: &'static str,
    service: String,
    method: String,
    grpc_status: &'static str,
}

/// Labels of a call's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    direction: &'static str,
    service: String,
    method: String,
}

/// Labels naming an upstream gRPC service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// Labels naming a side of the proxy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Labels of a call shed by a concurrency limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    direction: &'static str,
    service: String,
}

/// Labels of attempts sent to one version of a mesh service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    service: String,
    version: String,
}

/// Most (service, version) series kept; more count under version
/// [`UNKNOWN`].
const MAX_VERSION_SERIES: usize = 256;

type HistogramFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

/// Every metric the proxy keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<CallLabels, Counter>,
    latency: HistogramFamily,
    retries: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    connections: Family<DirectionLabels, Gauge>,
    refused: Family<DirectionLabels, Counter>,
    circuit_state: Family<ServiceLabels, Gauge>,
    circuit_rejected: Family<ServiceLabels, Counter>,
    circuit_opened: Family<ServiceLabels, Counter>,
    shed: Family<ShedLabels, Counter>,
    hedges: Family<ServiceLabels, Counter>,
    per_try_timeouts: Family<ServiceLabels, Counter>,
    versions: Family<VersionLabels, Counter>,
    version_series: AtomicUsize,
    calls: CallIndex,
}

/// The label both the service and the method of a call get when the
/// service is not one the proxy can route, or when [`MAX_SERIES`] is
/// reached: one series however many paths callers make up.
pub const UNKNOWN: &str = "unknown";

/// Most (direction, service, method) series kept; calls beyond count
/// under [`UNKNOWN`]. Each series renders as ~20 lines (a histogram), so
/// this bounds `/metrics` at a few MB even with every label in use.
const MAX_SERIES: usize = 1024;

/// Slots of the index: twice the series it may hold, so that probes stay
/// short; a few more for the `unknown` series, which the cap does not
/// apply to.
const SLOTS: usize = 2 * MAX_SERIES + 8;

/// The per-method observers, by (direction, service, method): a fixed
/// open-addressing table of write-once slots. Finding an observer reads
/// without a lock; adding one claims one empty slot (O(1), nothing
/// copied), so a flood of new paths costs no more than the cap allows.
#[derive(Debug)]
struct CallIndex {
    hasher: std::collections::hash_map::RandomState,
    slots: Box<[OnceLock<Arc<Call>>]>,
    /// Series added, `unknown` ones aside.
    series: AtomicUsize,
}

impl CallIndex {
    fn new() -> Self {
        Self {
            hasher: Default::default(),
            slots: (0..SLOTS).map(|_| OnceLock::new()).collect(),
            series: AtomicUsize::new(0),
        }
    }

    /// The observer of the series, or the index of the first empty slot
    /// of its probe sequence (where it would go).
    fn find(&self, direction: &str, service: &str, method: &str) -> Result<Arc<Call>, usize> {
        let start = self.hasher.hash_one((direction, service, method)) as usize;
        for i in 0..SLOTS {
            let at = (start + i) % SLOTS;
            match self.slots[at].get() {
                Some(call) if call.is(direction, service, method) => return Ok(call.clone()),
                Some(_) => continue,
                None => return Err(at),
            }
        }
        unreachable!("the cap keeps the index at most half full")
    }

    /// Adds `created` from slot `at` on (another thread may have added the
    /// same series, or taken the slot, in the meantime).
    fn insert(&self, mut at: usize, created: Arc<Call>) -> Arc<Call> {
        loop {
            match self.slots[at].set(created.clone()) {
                Ok(()) => return created,
                Err(_) => {
                    let taken = self.slots[at]
                        .get()
                        .expect("a slot that refused a value has one");
                    if taken.is(created.direction, &created.service, &created.method) {
                        return taken.clone();
                    }
                }
            }
            at = (at + 1) % SLOTS;
        }
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_proxy");
        registry.register_collector(Box::new(crate::layer::trace::SpanCounts));
        let requests = Family::<CallLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let retries = Family::<ServiceLabels, Counter>::default();
        let ejections = Family::<ServiceLabels, Counter>::default();
        let connections = Family::<DirectionLabels, Gauge>::default();
        let refused = Family::<DirectionLabels, Counter>::default();
        let circuit_state = Family::<ServiceLabels, Gauge>::default();
        let circuit_rejected = Family::<ServiceLabels, Counter>::default();
        let circuit_opened = Family::<ServiceLabels, Counter>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let hedges = Family::<ServiceLabels, Counter>::default();
        let per_try_timeouts = Family::<ServiceLabels, Counter>::default();
        let versions = Family::<VersionLabels, Counter>::default();
        registry.register(
            "circuit_state",
            "Circuit breaker state per upstream mesh service: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        registry.register(
            "circuit_rejected",
            "Calls failed at once because the circuit to their upstream mesh service was open",
            circuit_rejected.clone(),
        );
        registry.register(
            "circuit_opened",
            "Times the circuit to an upstream mesh service opened",
            circuit_opened.clone(),
        );
        registry.register(
            "shed",
            "Calls refused with RESOURCE_EXHAUSTED by a concurrency limit, by direction (outbound: the caller_limit; inbound: a route's limit) and gRPC service",
            shed.clone(),
        );
        registry.register(
            "hedges",
            "Hedged copies of calls sent, by upstream gRPC service",
            hedges.clone(),
        );
        registry.register(
            "per_try_timeouts",
            "Attempts abandoned at their per-try timeout, by upstream gRPC service",
            per_try_timeouts.clone(),
        );
        registry.register(
            "version_requests",
            "Attempts sent, by upstream mesh service and the version of the instance chosen",
            versions.clone(),
        );
        registry.register(
            "requests",
            "Calls handled, by direction, gRPC service, method and final gRPC status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Call latency from request to final status, by direction, service and method",
            latency.clone(),
        );
        registry.register(
            "retries",
            "Retry attempts sent, by upstream gRPC service",
            retries.clone(),
        );
        registry.register(
            "ejections",
            "Endpoints taken out of rotation, by upstream gRPC service",
            ejections.clone(),
        );
        registry.register(
            "open_connections",
            "Open HTTP/2 connections: inbound (from peers), outbound (from the local service), upstream (to peers and the local service)",
            connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as they were accepted because their port had --max-connections open",
            refused.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            retries,
            ejections,
            connections,
            refused,
            circuit_state,
            circuit_rejected,
            circuit_opened,
            shed,
            hedges,
            per_try_timeouts,
            versions,
            version_series: AtomicUsize::new(0),
            calls: CallIndex::new(),
        }
    }

    /// The circuit to mesh service `service` is now in `state` (0 closed,
    /// 1 open, 2 half-open).
    pub fn circuit(&self, service: &str, state: i64) {
        self.circuit_state
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(state);
        if state == 1 {
            count(&self.circuit_opened, service);
        }
    }

    /// A call to mesh service `service` failed fast: its circuit is open.
    pub fn circuit_rejected(&self, service: &str) {
        count(&self.circuit_rejected, service);
    }

    /// A concurrency limit refused a call to gRPC service `service`.
    pub fn shed(&self, direction: &'static str, service: &str) {
        self.shed
            .get_or_create(&ShedLabels {
                direction,
                service: service.to_owned(),
            })
            .inc();
    }

    /// A hedged copy of a call to `service` was sent.
    pub fn hedged(&self, service: &str) {
        count(&self.hedges, service);
    }

    /// An attempt to `service` ran out of its per-try timeout.
    pub fn per_try_timeout(&self, service: &str) {
        count(&self.per_try_timeouts, service);
    }

    /// An attempt went to an instance of mesh service `service` at
    /// `version`.
    pub fn version_request(&self, service: &str, version: &str) {
        let mut labels = VersionLabels {
            service: service.to_owned(),
            version: version.to_owned(),
        };
        if let Some(counter) = self.versions.get(&labels) {
            counter.inc();
            return;
        }
        if self.version_series.fetch_add(1, Ordering::Relaxed) >= MAX_VERSION_SERIES {
            labels.version = UNKNOWN.to_owned();
        }
        self.versions.get_or_create(&labels).inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A retry was sent for `service`.
    pub fn retried(&self, service: &str) {
        count(&self.retries, service);
    }

    /// An endpoint of `service` was ejected.
    pub fn ejected(&self, service: &str) {
        count(&self.ejections, service);
    }

    /// A connection on `direction` opened.
    pub fn connection_opened(&self, direction: &'static str) {
        self.connections
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// A connection on `direction` was closed at once: the port was full.
    pub fn connection_refused(&self, direction: &'static str) {
        self.refused
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// A connection on `direction` closed.
    pub fn connection_closed(&self, direction: &'static str) {
        self.connections
            .get_or_create(&DirectionLabels { direction })
            .dec();
    }

    /// An observer that counts one call when it ends. Observers are kept
    /// per direction, service and method, so a call allocates nothing here
    /// once its method has been seen. `routable` is asked only for a
    /// series not seen yet: if the service is not one the proxy can route,
    /// or [`MAX_SERIES`] are in use, the call counts under [`UNKNOWN`].
    pub fn call(
        &self,
        direction: &'static str,
        service: &str,
        method: &str,
        routable: impl FnOnce() -> bool,
    ) -> Arc<dyn CallObserver> {
        let at = match self.calls.find(direction, service, method) {
            Ok(found) => return found,
            Err(at) => at,
        };
        if !routable() || !self.reserve_series() {
            return self.unknown(direction);
        }
        let created = self.new_call(direction, service, method);
        let kept = self.calls.insert(at, created.clone());
        if !Arc::ptr_eq(&kept, &created) {
            // Another call added the same series first.
            self.calls.series.fetch_sub(1, Ordering::Relaxed);
        }
        kept
    }

    /// Takes one of the [`MAX_SERIES`]; false when none is left.
    fn reserve_series(&self) -> bool {
        self.calls
            .series
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_SERIES).then_some(n + 1)
            })
            .is_ok()
    }

    /// The observer for calls under [`UNKNOWN`] on `direction`.
    fn unknown(&self, direction: &'static str) -> Arc<dyn CallObserver> {
        match self.calls.find(direction, UNKNOWN, UNKNOWN) {
            Ok(found) => found,
            Err(at) => self
                .calls
                .insert(at, self.new_call(direction, UNKNOWN, UNKNOWN)),
        }
    }

    fn new_call(&self, direction: &'static str, service: &str, method: &str) -> Arc<Call> {
        Arc::new(Call {
            direction,
            service: service.to_owned(),
            method: method.to_owned(),
            by_status: Default::default(),
            latency: self
                .latency
                .get_or_create(&LatencyLabels {
                    direction,
                    service: service.to_owned(),
                    method: method.to_owned(),
                })
                .clone(),
        })
    }
}

/// One method's metrics in one direction: counters by final status, made
/// on first use, and the latency histogram.
#[derive(Debug)]
struct Call {
    direction: &'static str,
    service: String,
    method: String,
    by_status: [OnceLock<Counter>; 17],
    latency: Histogram,
}

impl Call {
    fn is(&self, direction: &str, service: &str, method: &str) -> bool {
        self.direction == direction && self.service == service && self.method == method
    }
}

impl CallObserver for Call {
    fn finished(&self, code: Code, started: Instant) {
        let counter = self.by_status[(code as usize).min(16)].get_or_init(|| {
            get()
                .requests
                .get_or_create(&CallLabels {
                    direction: self.direction,
                    service: self.service.clone(),
                    method: self.method.clone(),
                    grpc_status: grpc::code_name(code),
                })
                .clone()
        });
        counter.inc();
        self.latency.observe(started.elapsed().as_secs_f64());
    }
}

/// Counts one more in `family`'s series for `service`.
fn count(family: &Family<ServiceLabels, Counter>, service: &str) {
    family
        .get_or_create(&ServiceLabels {
            service: service.to_owned(),
        })
        .inc();
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::CallEnd;

    #[tokio::test]
    async fn a_finished_call_is_counted_with_its_status() {
        let observer = get().call("outbound", "a.v1.S", "M", || true);
        let mut end = CallEnd::new(observer.clone(), Instant::now());
        end.finish(Code::Unavailable);
        drop(end);
        drop(CallEnd::new(observer, Instant::now()));
        let text = get().render();
        assert!(
            text.contains(r#"trellis_proxy_requests_total{direction="outbound",service="a.v1.S",method="M",grpc_status="UNAVAILABLE"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"grpc_status="CANCELLED"} 1"#),
            "a call dropped before its end counts as cancelled: {text}"
        );
        assert!(
            text.contains(r#"trellis_proxy_request_duration_seconds_count{direction="outbound",service="a.v1.S",method="M"} 2"#),
            "both calls timed: {text}"
        );
    }
}
