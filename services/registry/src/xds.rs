//! Proxyless gRPC: the registry as an xDS control plane.
//!
//! gRPC libraries carry an xDS client: given a bootstrap file naming this
//! registry, `xds:///usage` resolves, balances and does mTLS by itself,
//! with no sidecar on the caller's side. This module serves them the
//! state-of-the-world Aggregated Discovery Service
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService`), built from
//! the registry's instances and the configuration's route policies:
//!
//! - a Listener per target (a mesh service name like `usage`, or one of
//!   its gRPC service names), an API listener whose HttpConnectionManager
//!   takes its routes over ADS and ends with the router filter;
//! - a RouteConfiguration per mesh service: one route per route policy
//!   (method matches, timeouts as `max_stream_duration`, retries for the
//!   methods the policy marks idempotent, weighted clusters for a version
//!   split);
//! - a Cluster per mesh service (and per split version) of type EDS,
//!   round robin, with an UpstreamTlsContext that names the callee's
//!   SPIFFE IDs, certificates from the client's own `trellis` provider;
//! - a ClusterLoadAssignment per cluster: the instances' sidecar inbound
//!   addresses (IP addresses only) by zone, the caller's zone first.
//!
//! Every registry or configuration change is pushed; a resource type is
//! re-sent only when its content changed. ACKs are recorded; a NACK is
//! logged with its reason, counted, and never answered with the same
//! content again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf as gpb;
use futures::Stream;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis::pb::trellis::config::v1 as cfg;
use trellis::pb::trellis::registry::v1::{self as pb, ServingStatus};
use trellis::tls::peer_identity;

use crate::config::ConfigStore;
use crate::registry::{Change, Registry};

pub use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

/// The resource types served, by type URL.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const WRR_LOCALITY: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.wrr_locality.v3.WrrLocality";
const LEAST_REQUEST: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const ROUND_ROBIN: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// The certificate provider instance a client's bootstrap must define
/// (`trellis certs --xds-bootstrap` writes it): its workload certificate
/// and the mesh CA.
pub const CERTIFICATE_PROVIDER: &str = "trellis";

/// The most resource names one stream may subscribe to per type.
pub const MAX_NAMES: usize = 1_000;

/// Separates a mesh service from a version in a split's cluster names
/// (`usage~v2`): neither a service name nor a version may contain it.
const VERSION_SEPARATOR: char = '~';

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsApi {
    registry: Arc<Registry>,
    config: Arc<ConfigStore>,
    stats: Arc<XdsStats>,
}

/// What operators see of the xDS clients.
#[derive(Debug, Default)]
pub struct XdsStats {
    /// Streams open now.
    pub streams: AtomicU64,
    /// Responses sent.
    pub responses: AtomicU64,
    /// NACKs received: a client rejected what it was sent.
    pub nacks: AtomicU64,
    /// Numbers the streams, to key their rejections.
    next_stream: AtomicU64,
    /// The rejections in force, by stream and type.
    rejections: Mutex<Rejections>,
}

/// The most rejections kept for GetConfigStatus; the oldest goes first.
pub const MAX_REJECTIONS: usize = 64;

/// The longest reason or node ID kept from a client (in bytes), in the log
/// and in GetConfigStatus; longer ones are cut, saying so.
pub const MAX_CLIENT_TEXT: usize = 1024;

/// `text` cut to [`MAX_CLIENT_TEXT`] bytes at a character boundary.
fn clip(text: &str) -> String {
    if text.len() <= MAX_CLIENT_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_CLIENT_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

#[derive(Debug, Default)]
struct Rejections {
    /// (stream, type) → (arrival order, the rejection).
    by_stream: BTreeMap<(u64, &'static str), (u64, cfg::XdsRejection)>,
    arrivals: u64,
}

/// [`XdsStats`] read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdsNumbers {
    /// Streams open.
    pub streams: u64,
    /// Responses sent.
    pub responses: u64,
    /// NACKs received.
    pub nacks: u64,
}

impl XdsStats {
    /// Each client's latest rejection of a type it has not accepted a
    /// version of since, newest first.
    pub fn rejections(&self) -> Vec<cfg::XdsRejection> {
        let kept = self
            .rejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<&(u64, cfg::XdsRejection)> = kept.by_stream.values().collect();
        all.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
        all.into_iter().map(|(_, r)| r.clone()).collect()
    }

    /// Applies what one stream's client said: its NACKs are kept (at most
    /// [`MAX_REJECTIONS`] over all streams), an ACK clears its type's.
    fn record(&self, stream: u64, outcomes: Vec<Outcome>) {
        if outcomes.is_empty() {
            return;
        }
        let mut kept = self
            .rejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for outcome in outcomes {
            match outcome {
                Outcome::Accepted(type_url) => {
                    kept.by_stream.remove(&(stream, type_url));
                }
                Outcome::Rejected(type_url, rejection) => {
                    self.nacks.fetch_add(1, Ordering::Relaxed);
                    kept.arrivals += 1;
                    let order = kept.arrivals;
                    kept.by_stream
                        .insert((stream, type_url), (order, rejection));
                    if kept.by_stream.len() > MAX_REJECTIONS
                        && let Some(oldest) = kept
                            .by_stream
                            .iter()
                            .min_by_key(|(_, (order, _))| *order)
                            .map(|(key, _)| *key)
                    {
                        kept.by_stream.remove(&oldest);
                    }
                }
            }
        }
    }

    /// A stream ended: its rejections are no longer in force.
    fn forget(&self, stream: u64) {
        self.rejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_stream
            .retain(|(s, _), _| *s != stream);
    }

    /// The counters now.
    pub fn read(&self) -> XdsNumbers {
        XdsNumbers {
            streams: self.streams.load(Ordering::Relaxed),
            responses: self.responses.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
        }
    }
}

impl XdsApi {
    /// Serves xDS from `registry` and `config`, counting into `stats`.
    pub fn new(registry: Arc<Registry>, config: Arc<ConfigStore>, stats: Arc<XdsStats>) -> Self {
        Self {
            registry,
            config,
            stats,
        }
    }
}

type AdsStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsApi {
    type StreamAggregatedResourcesStream = AdsStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<AdsStream>, Status> {
        let caller = peer_identity(&request)?.id.clone();
        self.registry.check_available()?;
        let permit = self.registry.admit_watch(&caller)?;
        let mut inbound = request.into_inner();
        let (tx, out) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            api.stats.streams.fetch_add(1, Ordering::Relaxed);
            let id = api.stats.next_stream.fetch_add(1, Ordering::Relaxed);
            let mut changes = api.registry.changes();
            let mut config = api.config.subscribe();
            let mut stream = AdsState::new(caller.to_string());
            loop {
                let responses = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(request)) => {
                            let view = View::read(&api.registry, &api.config);
                            match stream.on_request(request, &view) {
                                Ok(r) => r.into_iter().collect(),
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    break;
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = changes.recv() => {
                        if let Ok(change) = &changed
                            && let Change::Lost(why) = change.as_ref()
                        {
                            let _ = tx.send(Err(Status::unavailable(format!(
                                "this registry replica lost its store ({why}); reconnect to another"
                            )))).await;
                            break;
                        }
                        if matches!(changed, Err(broadcast::error::RecvError::Closed)) {
                            break;
                        }
                        // Everything queued is in the view read now.
                        while changes.try_recv().is_ok() {}
                        stream.refresh(&View::read(&api.registry, &api.config))
                    }
                    changed = config.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        stream.refresh(&View::read(&api.registry, &api.config))
                    }
                    () = tx.closed() => break,
                };
                for response in responses {
                    api.stats.responses.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Ok(response)).await.is_err() {
                        break;
                    }
                }
                api.stats.record(id, std::mem::take(&mut stream.outcomes));
            }
            api.stats.forget(id);
            api.stats.streams.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "this registry serves state-of-the-world ADS only (StreamAggregatedResources); \
             leave out \"xds_v3\"-incremental options from the client's bootstrap",
        ))
    }
}

/// The mesh as xDS sees it at one moment.
struct View {
    /// Every registered instance.
    instances: Vec<pb::Instance>,
    /// Effective configuration per mesh service, read on demand.
    config: Arc<ConfigStore>,
    /// The contracts, read on demand.
    registry: Arc<Registry>,
}

impl View {
    fn read(registry: &Arc<Registry>, config: &Arc<ConfigStore>) -> Self {
        Self {
            instances: registry.instances(),
            config: config.clone(),
            registry: registry.clone(),
        }
    }

    /// The methods (`pkg.Service/Method`) of `service`'s contracts that
    /// declare themselves safe to repeat (idempotency level IDEMPOTENT or
    /// NO_SIDE_EFFECTS), as the sidecars read them.
    fn safe_methods(&self, service: &str) -> BTreeSet<String> {
        let grpc_services: BTreeSet<&str> = self
            .of_service(service)
            .flat_map(|i| i.grpc_services.iter().map(String::as_str))
            .collect();
        let mut out = BTreeSet::new();
        for grpc in grpc_services {
            let Some((_, files)) = self.registry.service_descriptors(grpc) else {
                continue;
            };
            let files: Vec<Vec<u8>> = files.iter().map(|f| f.to_vec()).collect();
            let (_, safe) = trellis::contract::contract_methods(&files, grpc);
            out.extend(safe.into_iter().map(|m| format!("{grpc}/{m}")));
        }
        out
    }

    /// The mesh service a listener name (mesh or gRPC service name) names.
    fn service_of(&self, target: &str) -> Option<&str> {
        self.instances
            .iter()
            .find(|i| i.service == target || i.grpc_services.iter().any(|g| g == target))
            .map(|i| i.service.as_str())
    }

    fn of_service<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a pb::Instance> + 'a {
        self.instances.iter().filter(move |i| i.service == service)
    }

    fn serving(i: &pb::Instance) -> bool {
        i.health == ServingStatus::Serving as i32
    }
}

/// One ADS stream's subscriptions and what it was sent.
struct AdsState {
    caller: String,
    /// The client's node ID and zone, from its first request.
    node: String,
    zone: String,
    types: HashMap<&'static str, Subscription>,
    nonces: u64,
    /// ACKs and NACKs since the caller last took them.
    outcomes: Vec<Outcome>,
}

/// What a client said of a response.
#[derive(Debug)]
enum Outcome {
    Accepted(&'static str),
    Rejected(&'static str, cfg::XdsRejection),
}

#[derive(Default)]
struct Subscription {
    names: BTreeSet<String>,
    /// The version and nonce of the last response sent.
    sent: Option<(String, String)>,
    /// The version the client last accepted.
    acked: Option<String>,
}

impl AdsState {
    fn new(caller: String) -> Self {
        Self {
            caller,
            node: String::new(),
            zone: String::new(),
            types: HashMap::new(),
            nonces: 0,
            outcomes: Vec::new(),
        }
    }

    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        view: &View,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        if let Some(node) = &request.node {
            self.node = clip(&node.id);
            if let Some(l) = &node.locality {
                self.zone.clone_from(&l.zone);
            }
        }
        let Some(type_url) = [LISTENER, ROUTE, CLUSTER, ENDPOINTS]
            .into_iter()
            .find(|t| *t == request.type_url)
        else {
            tracing::debug!(caller = %self.caller, type_url = %request.type_url, "xDS: resource type not served; ignored");
            return Ok(None);
        };
        if request.resource_names.len() > MAX_NAMES {
            return Err(Status::resource_exhausted(format!(
                "{} resource names of {type_url} asked on one stream; at most {MAX_NAMES} are served",
                request.resource_names.len()
            )));
        }
        let sub = self.types.entry(type_url).or_default();
        let current_nonce = sub.sent.as_ref().map(|(_, n)| n.as_str());
        if !request.response_nonce.is_empty()
            && Some(request.response_nonce.as_str()) != current_nonce
        {
            // An answer to an older response: the client will answer the
            // newest one too.
            return Ok(None);
        }
        if let Some(error) = &request.error_detail {
            let rejected = sub.sent.as_ref().map_or("", |(v, _)| v.as_str());
            let reason = clip(&error.message);
            let kept = clip(&request.version_info);
            tracing::warn!(
                caller = %self.caller,
                node = %self.node,
                type_url,
                rejected_version = %rejected,
                kept_version = %kept,
                reason = %reason,
                "xDS: a client rejected (NACKed) what it was sent; it keeps its previous resources"
            );
            let rejection = cfg::XdsRejection {
                caller: self.caller.clone(),
                node: self.node.clone(),
                type_url: type_url.to_owned(),
                rejected_version: rejected.to_owned(),
                kept_version: kept,
                reason,
                at: Some(std::time::SystemTime::now().into()),
            };
            self.outcomes.push(Outcome::Rejected(type_url, rejection));
        } else if !request.response_nonce.is_empty() {
            // An ACK names the version sent; a request after a NACK (for
            // other names, say) carries the version kept instead.
            if sub
                .sent
                .as_ref()
                .is_some_and(|(v, _)| *v == request.version_info)
            {
                self.outcomes.push(Outcome::Accepted(type_url));
            }
            sub.acked = Some(request.version_info.clone());
        }
        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        let renamed = names != sub.names || sub.sent.is_none();
        sub.names = names;
        Ok(self.respond(type_url, view, renamed))
    }

    /// Every type whose content changed.
    fn refresh(&mut self, view: &View) -> Vec<DiscoveryResponse> {
        let types: Vec<&'static str> = self.types.keys().copied().collect();
        types
            .into_iter()
            .filter_map(|t| self.respond(t, view, false))
            .collect()
    }

    /// A response for `type_url` if its content differs from what was last
    /// sent, or if `always` (the subscription changed).
    fn respond(
        &mut self,
        type_url: &'static str,
        view: &View,
        always: bool,
    ) -> Option<DiscoveryResponse> {
        let zone = self.zone.clone();
        let sub = self.types.get_mut(type_url)?;
        if sub.names.is_empty() && sub.sent.is_some() && !always {
            return None;
        }
        let resources = build(type_url, &sub.names, view, &zone);
        let version = version_of(&resources);
        if !always && sub.sent.as_ref().is_some_and(|(v, _)| *v == version) {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        sub.sent = Some((version.clone(), nonce.clone()));
        Some(DiscoveryResponse {
            version_info: version,
            resources: resources.into_values().collect(),
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}

/// A version that changes exactly when the content does.
fn version_of(resources: &BTreeMap<String, gpb::Any>) -> String {
    let mut h = DefaultHasher::new();
    for (name, any) in resources {
        name.hash(&mut h);
        any.value.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn any<M: Message>(type_url: &str, m: &M) -> gpb::Any {
    gpb::Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

/// The resources of `type_url` that exist among `names`, by name. An
/// asked-for name left out does not exist (for listeners and clusters the
/// client learns so at once).
fn build(
    type_url: &str,
    names: &BTreeSet<String>,
    view: &View,
    zone: &str,
) -> BTreeMap<String, gpb::Any> {
    let mut out = BTreeMap::new();
    for name in names {
        let resource = match type_url {
            LISTENER => view
                .service_of(name)
                .map(|s| any(LISTENER, &listener_for(name, s))),
            ROUTE => view
                .service_of(name)
                .filter(|s| s == name)
                .map(|s| any(ROUTE, &routes_for(s, view))),
            CLUSTER => cluster_for(name, view).map(|c| any(CLUSTER, &c)),
            ENDPOINTS => endpoints_for(name, view, zone).map(|e| any(ENDPOINTS, &e)),
            _ => None,
        };
        if let Some(r) = resource {
            out.insert(name.clone(), r);
        }
    }
    out
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn listener_for(target: &str, service: &str) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: service.to_owned(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: service.to_owned(),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                ROUTER,
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: target.to_owned(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(any(HCM, &manager)),
        }),
        ..Default::default()
    }
}

fn duration(d: &prost_types::Duration) -> gpb::Duration {
    gpb::Duration {
        seconds: d.seconds,
        nanos: d.nanos,
    }
}

fn nonzero(d: Option<&prost_types::Duration>) -> Option<gpb::Duration> {
    d.filter(|d| d.seconds > 0 || d.nanos > 0).map(duration)
}

/// The status codes gRPC's xDS client retries on, by their `retry_on`
/// names; the others in a policy cannot be expressed and are left out.
fn retry_on(codes: &[String]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = codes
        .iter()
        .filter_map(|c| match c.to_ascii_uppercase().as_str() {
            "CANCELLED" | "1" => Some("cancelled"),
            "DEADLINE_EXCEEDED" | "4" => Some("deadline-exceeded"),
            "RESOURCE_EXHAUSTED" | "8" => Some("resource-exhausted"),
            "INTERNAL" | "13" => Some("internal"),
            "UNAVAILABLE" | "14" => Some("unavailable"),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The clusters a call to `service` is split over, with their weights; one
/// cluster when there is no split (or no listed version can serve).
fn split_of(
    service: &str,
    view: &View,
    traffic: Option<&cfg::TrafficPolicy>,
) -> Vec<(String, u32)> {
    let split = traffic.map_or(&[][..], |t| t.split.as_slice());
    let live: Vec<(String, u32)> = split
        .iter()
        .filter(|w| w.weight > 0)
        .filter(|w| {
            view.of_service(service)
                .any(|i| i.version == w.version && View::serving(i))
        })
        .map(|w| {
            (
                format!("{service}{VERSION_SEPARATOR}{}", w.version),
                w.weight,
            )
        })
        .collect();
    if live.is_empty() {
        vec![(service.to_owned(), 1)]
    } else {
        live
    }
}

fn routes_for(service: &str, view: &View) -> route::RouteConfiguration {
    let config = view.config.get(service).config.unwrap_or_default();
    let clusters = split_of(service, view, config.traffic.as_ref());
    let specifier = if let [(only, _)] = clusters.as_slice() {
        route::route_action::ClusterSpecifier::Cluster(only.clone())
    } else {
        route::route_action::ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: clusters
                .iter()
                .map(|(name, weight)| route::weighted_cluster::ClusterWeight {
                    name: name.clone(),
                    weight: Some(gpb::UInt32Value { value: *weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    // A method its contract marks safe is retried under the policy that
    // covers it, as the sidecars do: a route of its own when that policy
    // does not say `idempotent` for every method it covers.
    let covering = |method: &str| {
        let grpc = method.split('/').next().unwrap_or_default();
        let by = |m: &str| config.routes.iter().find(|p| p.method_match == m);
        by(method)
            .map(|_| None)
            .unwrap_or_else(|| by(&format!("{grpc}/*")).or_else(|| by("*")))
    };
    let safe: Vec<cfg::RoutePolicy> = view
        .safe_methods(service)
        .into_iter()
        .filter_map(|m| {
            let policy = covering(&m).filter(|p| !p.idempotent)?;
            Some(cfg::RoutePolicy {
                method_match: m,
                idempotent: true,
                ..policy.clone()
            })
        })
        .collect();
    // Most specific first: gRPC takes the first route that matches.
    let mut policies: Vec<&cfg::RoutePolicy> = config.routes.iter().chain(&safe).collect();
    policies.sort_by_key(|p| match p.method_match.as_str() {
        "*" => 2,
        m if m.ends_with("/*") => 1,
        _ => 0,
    });
    let mut routes: Vec<route::Route> = policies
        .into_iter()
        .map(|p| route_for(p, &specifier))
        .collect();
    if !routes.iter().any(|r| {
        matches!(&r.r#match, Some(m) if matches!(&m.path_specifier,
            Some(route::route_match::PathSpecifier::Prefix(p)) if p.is_empty()))
    }) {
        routes.push(route_for(&cfg::RoutePolicy::default(), &specifier));
    }
    route::RouteConfiguration {
        name: service.to_owned(),
        virtual_hosts: vec![route::VirtualHost {
            name: service.to_owned(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_for(
    policy: &cfg::RoutePolicy,
    specifier: &route::route_action::ClusterSpecifier,
) -> route::Route {
    use route::route_match::PathSpecifier;
    let path = match policy.method_match.as_str() {
        "" | "*" => PathSpecifier::Prefix(String::new()),
        m => match m.strip_suffix("/*") {
            Some(grpc_service) => PathSpecifier::Prefix(format!("/{grpc_service}/")),
            None => PathSpecifier::Path(format!("/{m}")),
        },
    };
    let retry = policy
        .retry
        .as_ref()
        .filter(|r| policy.idempotent && r.max_attempts > 1)
        .and_then(|r| {
            let on = retry_on(&r.retryable_status_codes);
            (!on.is_empty()).then(|| route::RetryPolicy {
                retry_on: on.join(","),
                num_retries: Some(gpb::UInt32Value {
                    value: r.max_attempts - 1,
                }),
                retry_back_off: nonzero(r.initial_backoff.as_ref()).map(|base| {
                    route::retry_policy::RetryBackOff {
                        base_interval: Some(base),
                        max_interval: nonzero(r.max_backoff.as_ref()),
                    }
                }),
                ..Default::default()
            })
        });
    route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(path),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(specifier.clone()),
            max_stream_duration: nonzero(policy.timeout.as_ref()).map(|d| {
                route::route_action::MaxStreamDuration {
                    max_stream_duration: Some(d),
                    ..Default::default()
                }
            }),
            retry_policy: retry,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The instances a cluster name (`usage`, or `usage~v2` for one version)
/// covers, if any instance of it is registered.
fn members<'a>(name: &'a str, view: &'a View) -> Option<Vec<&'a pb::Instance>> {
    let (service, version) = match name.split_once(VERSION_SEPARATOR) {
        Some((s, v)) => (s, Some(v)),
        None => (name, None),
    };
    let of_service: Vec<&pb::Instance> = view.of_service(service).collect();
    if of_service.is_empty() {
        return None;
    }
    Some(
        of_service
            .into_iter()
            .filter(|i| version.is_none_or(|v| i.version == v))
            .collect(),
    )
}

/// The balancing of a service's clusters, from its catch-all route (gRPC
/// balances per cluster, not per route): a load-aware policy (least
/// request, peak EWMA, or none set: the default is peak EWMA) asks for
/// gRPC's least request, with round robin after it in the list for
/// clients without it; round robin stays round robin. Wrapped in
/// `wrr_locality`, so locality weights still apply.
fn balancing_of(config: &cfg::ServiceConfig) -> cluster::LoadBalancingPolicy {
    use envoy_types::pb::envoy::extensions::load_balancing_policies as lb;
    let general = config
        .routes
        .iter()
        .find(|r| r.method_match == "*")
        .or_else(|| {
            config
                .routes
                .iter()
                .find(|r| r.method_match.ends_with("/*"))
        });
    // Unset means the mesh's default, peak EWMA, as in the sidecar.
    let load_aware = !matches!(
        general.map(cfg::RoutePolicy::load_balancing),
        Some(cfg::LoadBalancing::RoundRobin)
    );
    let policy = |name: &str, config: gpb::Any| cluster::load_balancing_policy::Policy {
        typed_extension_config: Some(core::TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(config),
        }),
    };
    let mut picking = Vec::new();
    if load_aware {
        let least = lb::least_request::v3::LeastRequest {
            choice_count: Some(gpb::UInt32Value { value: 2 }),
            ..Default::default()
        };
        picking.push(policy("least_request", any(LEAST_REQUEST, &least)));
    }
    let turns = lb::round_robin::v3::RoundRobin::default();
    picking.push(policy("round_robin", any(ROUND_ROBIN, &turns)));
    let locality = lb::wrr_locality::v3::WrrLocality {
        endpoint_picking_policy: Some(cluster::LoadBalancingPolicy { policies: picking }),
    };
    cluster::LoadBalancingPolicy {
        policies: vec![policy("wrr_locality", any(WRR_LOCALITY, &locality))],
    }
}

/// The service's `caller_limit` as gRPC's circuit breaking (gRFC A32):
/// at most `max_concurrent` calls in flight from one client to a cluster,
/// the ones over it failing at once with UNAVAILABLE. gRPC has no queue,
/// so `max_queued` has no equivalent; and it counts per cluster, so with a
/// split over versions the limit applies to each version.
fn limit_of(config: &cfg::ServiceConfig) -> Option<cluster::CircuitBreakers> {
    let limit = config.caller_limit.as_ref()?;
    Some(cluster::CircuitBreakers {
        thresholds: vec![cluster::circuit_breakers::Thresholds {
            priority: core::RoutingPriority::Default as i32,
            max_requests: Some(gpb::UInt32Value {
                value: limit.max_concurrent,
            }),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn cluster_for(name: &str, view: &View) -> Option<cluster::Cluster> {
    members(name, view)?;
    let service = name.split(VERSION_SEPARATOR).next().unwrap_or(name);
    let config = view.config.get(service).config.unwrap_or_default();
    let identities: BTreeSet<&str> = view
        .of_service(service)
        .map(|i| i.identity.as_str())
        .filter(|id| !id.is_empty())
        .collect();
    let provider = |name: &str| tls::CertificateProviderPluginInstance {
        instance_name: name.to_owned(),
        certificate_name: String::new(),
    };
    let context = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_provider_instance: Some(provider(CERTIFICATE_PROVIDER)),
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    #[allow(deprecated)]
                    tls::CertificateValidationContext {
                        ca_certificate_provider_instance: Some(provider(CERTIFICATE_PROVIDER)),
                        match_subject_alt_names: identities
                            .into_iter()
                            .map(|id| matcher::StringMatcher {
                                match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                    id.to_owned(),
                                )),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(cluster::Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_owned(),
        }),
        load_balancing_policy: Some(balancing_of(&config)),
        circuit_breakers: limit_of(&config),
        connect_timeout: Some(duration(&prost_types::Duration {
            seconds: 5,
            nanos: 0,
        })),
        transport_socket: Some(core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
                UPSTREAM_TLS,
                &context,
            ))),
        }),
        ..Default::default()
    })
}

fn endpoints_for(
    name: &str,
    view: &View,
    caller_zone: &str,
) -> Option<endpoint::ClusterLoadAssignment> {
    let members = members(name, view)?;
    let mut by_zone: BTreeMap<&str, Vec<endpoint::LbEndpoint>> = BTreeMap::new();
    for i in members {
        // gRPC's xDS client takes IP addresses only.
        let Ok(addr) = i.address.parse::<SocketAddr>() else {
            tracing::debug!(instance = %i.instance_id, address = %i.address, "xDS: not an IP address; left out");
            continue;
        };
        let health = if View::serving(i) {
            core::HealthStatus::Healthy
        } else {
            core::HealthStatus::Unhealthy
        };
        by_zone
            .entry(i.zone.as_str())
            .or_default()
            .push(endpoint::LbEndpoint {
                health_status: health as i32,
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint::Endpoint {
                        address: Some(core::Address {
                            address: Some(core::address::Address::SocketAddress(
                                core::SocketAddress {
                                    address: addr.ip().to_string(),
                                    port_specifier: Some(
                                        core::socket_address::PortSpecifier::PortValue(u32::from(
                                            addr.port(),
                                        )),
                                    ),
                                    ..Default::default()
                                },
                            )),
                        }),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            });
    }
    // The caller's zone first (priority 0) while it has a healthy
    // instance; the others are its failover. Priorities must be contiguous.
    let local_serving = !caller_zone.is_empty()
        && by_zone.get(caller_zone).is_some_and(|eps| {
            eps.iter()
                .any(|e| e.health_status == core::HealthStatus::Healthy as i32)
        });
    let endpoints = by_zone
        .into_iter()
        .map(|(zone, lb_endpoints)| endpoint::LocalityLbEndpoints {
            locality: Some(core::Locality {
                zone: zone.to_owned(),
                ..Default::default()
            }),
            load_balancing_weight: Some(gpb::UInt32Value {
                value: u32::try_from(lb_endpoints.len()).unwrap_or(u32::MAX),
            }),
            priority: u32::from(local_serving && zone != caller_zone),
            lb_endpoints,
            ..Default::default()
        })
        .collect();
    Some(endpoint::ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
