//! The proxy's Prometheus metrics, served on the admin port.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

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
    calls: ArcSwap<CallIndex>,
}

/// Direction, then gRPC service, then method.
type CallIndex = HashMap<&'static str, HashMap<String, HashMap<String, Arc<Call>>>>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_proxy");
        let requests = Family::<CallLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let retries = Family::<ServiceLabels, Counter>::default();
        let ejections = Family::<ServiceLabels, Counter>::default();
        let connections = Family::<DirectionLabels, Gauge>::default();
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
        Self {
            registry,
            requests,
            latency,
            retries,
            ejections,
            connections,
            calls: ArcSwap::default(),
        }
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
        self.retries
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// An endpoint of `service` was ejected.
    pub fn ejected(&self, service: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A connection on `direction` opened.
    pub fn connection_opened(&self, direction: &'static str) {
        self.connections
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
    /// once its method has been seen.
    pub fn call(
        &self,
        direction: &'static str,
        service: &str,
        method: &str,
    ) -> Arc<dyn CallObserver> {
        let found = self
            .calls
            .load()
            .get(direction)
            .and_then(|by_service| by_service.get(service))
            .and_then(|by_method| by_method.get(method))
            .cloned();
        if let Some(found) = found {
            return found;
        }
        let created = Arc::new(Call {
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
        });
        self.calls.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(direction)
                .or_default()
                .entry(service.to_owned())
                .or_default()
                .entry(method.to_owned())
                .or_insert_with(|| created.clone());
            next
        });
        created
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
        let observer = get().call("outbound", "a.v1.S", "M");
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
