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

use trellis::identity::SpiffeId;

use crate::body::CallObserver;
use crate::grpc;
use crate::policy::Locality;

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    direction: &'static str,
    service: String,
    method: String,
    grpc_status: &'static str,
    /// Last, so that series written before it existed still read the
    /// same up to it.
    caller: String,
}

/// Labels of a call's latency. No `caller`: a histogram renders as ~20
/// lines, so one per caller would multiply `/metrics` by the number of
/// callers for a view that the per-caller counts and the per-method
/// latency together nearly give; a caller's own sidecar has its latency
/// (`direction="outbound"`) anyway.
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
    tls_failures: Family<DirectionLabels, Counter>,
    calls: CallIndex,
    local: OnceLock<Local>,
}

/// This proxy's own identity, as the `caller` label needs it.
#[derive(Debug)]
struct Local {
    /// Its mesh service: the caller of its outbound calls.
    service: String,
    /// Its trust domain and namespace: inbound callers from here are
    /// named by their service alone.
    locality: Locality,
}

/// The label the caller, the service and the method of a call all get
/// when the service is not one the proxy can route, or when
/// [`MAX_SERIES`] is reached: one series per direction however many paths
/// (or callers) there are.
pub const UNKNOWN: &str = "unknown";

/// Most (direction, caller, service, method) series kept; calls beyond
/// count under [`UNKNOWN`]. Each renders as a line per final status seen
/// plus, shared by its callers, a latency histogram of ~20 lines, so this
/// bounds `/metrics` at a few MB even with every label in use.
const MAX_SERIES: usize = 1024;

/// Slots of the index: twice the series it may hold, so that probes stay
/// short; a few more for the `unknown` series, which the cap does not
/// apply to.
const SLOTS: usize = 2 * MAX_SERIES + 8;

/// The per-method observers, by (direction, caller, service, method): a fixed
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
    fn find(&self, key: Key<'_>) -> Result<Arc<Call>, usize> {
        let start = self.hasher.hash_one(key) as usize;
        for i in 0..SLOTS {
            let at = (start + i) % SLOTS;
            match self.slots[at].get() {
                Some(call) if call.key() == key => return Ok(call.clone()),
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
                    if taken.key() == created.key() {
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
        let tls_failures = Family::<DirectionLabels, Counter>::default();
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
            "Calls handled, by direction, gRPC service, method, final gRPC status and caller (inbound: the peer's service; outbound: this proxy's; edge: the API key, else edge)",
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
            "Open connections: inbound (from peers), outbound (from the local service), edge (from external callers), admin (scrapers and probes), upstream (pooled HTTP/2, to peers and the local service)",
            connections.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes refused or timed out on a listener, by direction (inbound: mTLS from peers; edge: external callers)",
            tls_failures.clone(),
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
            tls_failures,
            calls: CallIndex::new(),
            local: OnceLock::new(),
        }
    }

    /// Names this proxy (identity `own`) as the caller of its outbound
    /// calls and counts failed TLS handshakes on its listeners; once, at
    /// start-up.
    pub fn init(&self, own: &SpiffeId) {
        let _ = self.local.set(Local {
            service: own.service().unwrap_or(UNKNOWN).to_owned(),
            locality: Locality::of(own),
        });
        trellis::tls::on_handshake_failure(|kind| {
            // `serve_incoming` (mTLS) is the inbound port; the edge names
            // its own listener.
            let direction = if kind == "edge" { "edge" } else { "inbound" };
            get().tls_handshake_failed(direction);
        });
    }

    /// This proxy's mesh service, the caller of its outbound calls
    /// ([`UNKNOWN`] before [`Self::init`]).
    pub fn local_service(&self) -> &str {
        self.local.get().map_or(UNKNOWN, |l| l.service.as_str())
    }

    /// How the `caller` label names a verified peer: by its service alone
    /// when it is in this proxy's trust domain and namespace, else by its
    /// whole SPIFFE ID (so that `billing` here and `billing` elsewhere are
    /// two callers). Allocates nothing: it is asked on every inbound call.
    pub fn peer_name<'a>(&self, peer: &'a SpiffeId) -> &'a str {
        let local = match self.local.get() {
            Some(local) => local.locality.local_service(peer),
            None => peer.service(),
        };
        local.unwrap_or(peer.as_str())
    }

    /// A TLS handshake on the `direction` listener failed.
    pub fn tls_handshake_failed(&self, direction: &'static str) {
        self.tls_failures
            .get_or_create(&DirectionLabels { direction })
            .inc();
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

    /// Counts a connection on `direction` as open until the guard is
    /// dropped (however its task ends, aborted included).
    pub fn open_connection(&self, direction: &'static str) -> OpenConnection {
        self.connection_opened(direction);
        OpenConnection { direction }
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
    /// per direction, caller, service and method, so a call allocates
    /// nothing here once its caller has called its method. `routable` is
    /// asked only for a series not seen yet: if the service is not one the
    /// proxy can route, or [`MAX_SERIES`] are in use, the call counts under
    /// [`UNKNOWN`] (caller, service and method).
    pub fn call(
        &self,
        direction: &'static str,
        caller: &str,
        service: &str,
        method: &str,
        routable: impl FnOnce() -> bool,
    ) -> Arc<dyn CallObserver> {
        let key = Key {
            direction,
            caller,
            service,
            method,
        };
        let at = match self.calls.find(key) {
            Ok(found) => return found,
            Err(at) => at,
        };
        if !routable() || !self.reserve_series() {
            return self.unknown(direction);
        }
        let created = self.new_call(key);
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
        let key = Key {
            direction,
            caller: UNKNOWN,
            service: UNKNOWN,
            method: UNKNOWN,
        };
        match self.calls.find(key) {
            Ok(found) => found,
            Err(at) => self.calls.insert(at, self.new_call(key)),
        }
    }

    fn new_call(&self, key: Key<'_>) -> Arc<Call> {
        // One histogram per (direction, service, method), whoever calls.
        let latency = self
            .latency
            .get_or_create(&LatencyLabels {
                direction: key.direction,
                service: key.service.to_owned(),
                method: key.method.to_owned(),
            })
            .clone();
        Arc::new(Call {
            direction: key.direction,
            caller: key.caller.to_owned(),
            service: key.service.to_owned(),
            method: key.method.to_owned(),
            by_status: Default::default(),
            latency,
            requests: self.requests.clone(),
        })
    }
}

/// What a call's series is found by.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key<'a> {
    direction: &'static str,
    caller: &'a str,
    service: &'a str,
    method: &'a str,
}

/// One caller's calls of one method in one direction: counters by final
/// status, made on first use, and the method's latency histogram.
#[derive(Debug)]
struct Call {
    direction: &'static str,
    caller: String,
    service: String,
    method: String,
    by_status: [OnceLock<Counter>; 17],
    latency: Histogram,
    /// Where `by_status` is made.
    requests: Family<CallLabels, Counter>,
}

impl Call {
    fn key(&self) -> Key<'_> {
        Key {
            direction: self.direction,
            caller: &self.caller,
            service: &self.service,
            method: &self.method,
        }
    }
}

impl CallObserver for Call {
    fn finished(&self, code: Code, started: Instant) {
        let counter = self.by_status[(code as usize).min(16)].get_or_init(|| {
            self.requests
                .get_or_create(&CallLabels {
                    direction: self.direction,
                    service: self.service.clone(),
                    method: self.method.clone(),
                    grpc_status: grpc::code_name(code),
                    caller: self.caller.clone(),
                })
                .clone()
        });
        counter.inc();
        self.latency.observe(started.elapsed().as_secs_f64());
    }
}

/// An open connection, counted in `open_connections` while it lives.
#[derive(Debug)]
pub struct OpenConnection {
    direction: &'static str,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        get().connection_closed(self.direction);
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
        let observer = get().call("outbound", "billing", "a.v1.S", "M", || true);
        let mut end = CallEnd::new(observer.clone(), Instant::now());
        end.finish(Code::Unavailable);
        drop(end);
        drop(CallEnd::new(observer, Instant::now()));
        let text = get().render();
        assert!(
            text.contains(r#"trellis_proxy_requests_total{direction="outbound",service="a.v1.S",method="M",grpc_status="UNAVAILABLE",caller="billing"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"service="a.v1.S",method="M",grpc_status="CANCELLED",caller="billing"} 1"#
            ),
            "a call dropped before its end counts as cancelled: {text}"
        );
        assert!(
            text.contains(r#"trellis_proxy_request_duration_seconds_count{direction="outbound",service="a.v1.S",method="M"} 2"#),
            "both calls timed: {text}"
        );
    }

    #[tokio::test]
    async fn callers_count_apart_and_share_the_methods_latency() {
        let metrics = Metrics::new();
        for caller in ["billing", "usage", "billing"] {
            let observer = metrics.call("inbound", caller, "a.v1.S", "M", || true);
            CallEnd::new(observer, Instant::now()).finish(Code::Ok);
        }
        let text = metrics.render();
        assert!(
            text.contains(r#"trellis_proxy_requests_total{direction="inbound",service="a.v1.S",method="M",grpc_status="OK",caller="billing"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_proxy_requests_total{direction="inbound",service="a.v1.S",method="M",grpc_status="OK",caller="usage"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_proxy_request_duration_seconds_count{direction="inbound",service="a.v1.S",method="M"} 3"#),
            "one histogram for all callers: {text}"
        );
        assert_eq!(
            text.matches("trellis_proxy_request_duration_seconds_count")
                .count(),
            1,
            "{text}"
        );
    }

    #[tokio::test]
    async fn callers_past_the_cap_count_under_unknown() {
        let metrics = Metrics::new();
        for i in 0..MAX_SERIES {
            let caller = format!("caller-{i}");
            metrics.call("inbound", &caller, "a.v1.S", "M", || true);
        }
        let observer = metrics.call("inbound", "one-too-many", "a.v1.S", "M", || true);
        CallEnd::new(observer, Instant::now()).finish(Code::Ok);
        // A series already kept still counts as itself.
        let observer = metrics.call("inbound", "caller-7", "a.v1.S", "M", || true);
        CallEnd::new(observer, Instant::now()).finish(Code::Ok);
        let text = metrics.render();
        assert!(!text.contains("one-too-many"), "{text}");
        assert!(
            text.contains(r#"trellis_proxy_requests_total{direction="inbound",service="unknown",method="unknown",grpc_status="OK",caller="unknown"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"service="a.v1.S",method="M",grpc_status="OK",caller="caller-7"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn peers_here_are_named_by_service_and_others_in_full() {
        let metrics = Metrics::new();
        let id = |text: &str| SpiffeId::parse(text).unwrap();
        let here = id("spiffe://trellis.local/ns/default/sa/billing");
        let elsewhere = id("spiffe://trellis.local/ns/staging/sa/billing");
        assert_eq!(metrics.local_service(), UNKNOWN);
        assert_eq!(metrics.peer_name(&elsewhere), "billing", "no identity yet");
        metrics.init(&id("spiffe://trellis.local/ns/default/sa/echo"));
        assert_eq!(metrics.local_service(), "echo");
        assert_eq!(metrics.peer_name(&here), "billing");
        assert_eq!(metrics.peer_name(&elsewhere), elsewhere.as_str());
    }
}
