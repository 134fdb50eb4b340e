//! What the proxy knows of the mesh, kept current by push from the
//! registry: endpoints (Registry `Watch`), policies (Config `WatchConfig`)
//! and which methods the contracts mark safe to repeat. Every view is
//! swapped whole so the request path reads it without locks; when the
//! registry is unreachable the last views stay in force and the watches
//! resubscribe with backoff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::watch;
use tonic::transport::Channel;
use trellis::cli::RegistryTargets;
use trellis::identity::{SpiffeId, Workload};
use trellis::pb::trellis::config::v1 as config_pb;
use trellis::pb::trellis::registry::v1 as registry_pb;
use trellis::tls::ExpectedPeer;

use crate::directory::{Directory, Labels, Table, Upstream};
use crate::endpoint::{Endpoint, Transport};
use crate::keyed::Keyed;
use crate::layer::circuit::Circuit;
use crate::layer::limit::Limiter;
use crate::policy::{Locality, ServicePolicy};
use crate::retry::Budgets;
use crate::settings;

use config_pb::config_service_client::ConfigServiceClient;
use registry_pb::registry_service_client::RegistryServiceClient;

/// A fixed route: a gRPC service (or `*`, every service) served by fixed
/// endpoints, with no registry involved.
#[derive(Clone, Debug)]
pub struct StaticRoute {
    /// A gRPC service name, or `*`.
    pub service: String,
    /// Its endpoints.
    pub endpoints: Vec<(SocketAddr, bool)>,
}

/// The mesh as the request path sees it.
#[derive(Debug)]
pub struct MeshView {
    /// gRPC service to endpoints.
    pub directory: Directory,
    /// Mesh service to its compiled configuration.
    pub policies: ArcSwap<HashMap<String, Arc<ServicePolicy>>>,
    /// gRPC service to the methods its contract marks NO_SIDE_EFFECTS or
    /// IDEMPOTENT.
    pub safe_methods: ArcSwap<HashMap<String, Arc<HashSet<String>>>>,
    /// gRPC service to every method its registered contract defines (for
    /// services whose contract has been fetched).
    pub methods: ArcSwap<HashMap<String, Arc<HashSet<String>>>>,
    /// Retry budgets.
    pub budgets: Budgets,
    /// Who and where this proxy is, for version pins and zone preference.
    pub locale: Locale,
    /// Circuits, per upstream mesh service.
    pub circuits: Keyed<Circuit>,
    /// Caller-side limits, per upstream mesh service.
    pub caller_limits: Keyed<Limiter>,
    /// Callee-side limits, per method of the local service.
    pub method_limits: Keyed<Limiter>,
    /// The first registry snapshot has arrived (or there is no registry).
    pub synced: AtomicBool,
    /// gRPC services with at least one registered instance (whatever its
    /// health), to the mesh service that serves them.
    pub registered: ArcSwap<BTreeMap<String, String>>,
    /// gRPC service to its registered contract: the defining file first,
    /// then its transitive dependencies (serialized FileDescriptorProtos).
    /// Kept only when `keep_contracts` (the edge); a sidecar needs no more
    /// of a contract than its safe methods.
    pub contracts: ArcSwap<HashMap<String, Arc<Vec<Bytes>>>>,
    /// Whether `contracts` is filled.
    pub keep_contracts: bool,
    /// Bumped whenever the routing table, `registered` or `contracts`
    /// change; the edge rebuilds reflection and health from it.
    pub changes: watch::Sender<u64>,
    /// Bumped on every registry snapshot, i.e. each time the watch is
    /// (re)established: the registry may have restarted and forgotten
    /// this sidecar's own registration, which the lifecycle then checks
    /// at once rather than at its next lease renewal.
    pub snapshots: watch::Sender<u64>,
}

/// Who and where this proxy is.
#[derive(Debug, Default)]
pub struct Locale {
    /// Its identity, and where bare service names apply.
    pub id: Option<(SpiffeId, Locality)>,
    /// The zone it runs in; calls prefer endpoints in the same zone.
    pub zone: Option<Arc<str>>,
}

impl Default for MeshView {
    /// An empty view: no routes, no configuration, not synced.
    fn default() -> Self {
        Self {
            directory: Arc::new(ArcSwap::from_pointee(Table::default())),
            policies: ArcSwap::from_pointee(HashMap::new()),
            safe_methods: ArcSwap::from_pointee(HashMap::new()),
            methods: ArcSwap::from_pointee(HashMap::new()),
            budgets: Budgets::default(),
            locale: Locale::default(),
            circuits: Keyed::new("circuits"),
            caller_limits: Keyed::new("caller limits"),
            method_limits: Keyed::new("method limits"),
            synced: AtomicBool::new(false),
            registered: ArcSwap::from_pointee(BTreeMap::new()),
            contracts: ArcSwap::from_pointee(HashMap::new()),
            keep_contracts: false,
            changes: watch::channel(0).0,
            snapshots: watch::channel(0).0,
        }
    }
}

impl MeshView {
    /// The compiled configuration of `mesh_service` (built-in defaults
    /// until the Config API has answered).
    pub fn policy(&self, mesh_service: &str) -> Arc<ServicePolicy> {
        static BUILT_IN: std::sync::LazyLock<Arc<ServicePolicy>> =
            std::sync::LazyLock::new(Arc::default);
        self.policies
            .load()
            .get(mesh_service)
            .unwrap_or(&BUILT_IN)
            .clone()
    }

    /// Whether `method` may be one of `service`'s: it is in its contract,
    /// or no contract of it is known (then any method may be).
    pub fn known_method(&self, service: &str, method: &str) -> bool {
        self.methods
            .load()
            .get(service)
            .is_none_or(|m| m.contains(method))
    }

    /// Whether the contract marks `service/method` safe to repeat.
    pub fn contract_safe(&self, service: &str, method: &str) -> bool {
        self.safe_methods
            .load()
            .get(service)
            .is_some_and(|m| m.contains(method))
    }
}

/// The gRPC service of the Config API.
pub const CONFIG_SERVICE: &str = "trellis.config.v1.ConfigService";
/// The name the control plane's route goes by in metrics and policy.
const CONTROL_PLANE: &str = "trellis-registry";

/// Builds the view and the tasks that keep it current.
#[derive(Debug)]
pub struct Discovery {
    view: Arc<MeshView>,
    workload: Arc<Workload>,
    statics: Vec<StaticRoute>,
    /// How connections to endpoints are made and kept.
    settings: settings::Settings,
    /// Endpoints by (address, identity), kept across updates so that
    /// connections and ejection state survive them.
    endpoints: HashMap<(SocketAddr, String), Arc<Endpoint>>,
    instances: HashMap<String, registry_pb::Instance>,
    /// Instances (in `instances`) that a restarted registry no longer
    /// lists, kept until their old lease would have run out or they
    /// register again: a registry restart must not empty every route
    /// while the mesh re-registers.
    held: HashMap<String, SystemTime>,
    /// The registry revision of the last event applied.
    revision: u64,
    known: HashSet<String>,
    watched_configs: HashSet<String>,
    fetched_contracts: HashSet<String>,
    /// The registry, when the local service may read its own settings
    /// through this sidecar (the Config API).
    config_route: Option<(Vec<SocketAddr>, SpiffeId)>,
    /// Config watches and contract fetches, stopped with discovery.
    tasks: tokio::task::JoinSet<()>,
}

/// Clients of the control plane: one registry replica at a time, the
/// next one after a failure.
///
/// Every user (the registry watch, config watches, contract fetches, the
/// lifecycle) takes [`ControlPlane::clients`] before each call and reports
/// a replica failure with [`ControlPlane::fail_over`]; the first report
/// moves them all, later reports about the same replica are ignored.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    inner: Arc<ControlInner>,
}

#[derive(Debug)]
struct ControlInner {
    workload: Arc<Workload>,
    identity: SpiffeId,
    targets: RegistryTargets,
    current: std::sync::Mutex<Current>,
}

/// The replica in use.
#[derive(Debug, Clone)]
struct Current {
    /// Which entry of the targets.
    entry: usize,
    /// How many times the proxy moved on: a failure seen on an older
    /// channel does not move it twice.
    generation: u64,
    channel: Channel,
}

/// One use of the control plane: its clients, and the generation to name
/// when reporting that they failed.
#[derive(Debug, Clone)]
pub struct ControlClients {
    /// The Registry API.
    pub registry: RegistryServiceClient<Channel>,
    /// The Config API.
    pub config: ConfigServiceClient<Channel>,
    /// The entry of `--registry` they call.
    pub replica: String,
    generation: u64,
}

/// Where to go after entry `entry` failed, the proxy having moved
/// `generation` times before: the next entry (wrapping around), and from
/// which of its resolved addresses to start (one further each time round
/// the list, so a name with several addresses is not stuck on a dead one).
fn next_replica(entry: usize, generation: u64, entries: usize) -> (usize, usize) {
    let entries = entries.max(1);
    let next = (entry + 1) % entries;
    let start = ((generation + 1) / entries as u64) as usize;
    (next, start)
}

/// Counts the failures in a row of one user of the control plane: another
/// replica is tried at once, and the reconnect backoff applies only once
/// every replica has failed in a row.
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    replicas: usize,
    failed_in_a_row: usize,
}

impl Attempts {
    /// For a control plane of `replicas` replicas.
    pub fn new(replicas: usize) -> Self {
        Self {
            replicas: replicas.max(1),
            failed_in_a_row: 0,
        }
    }

    /// A call succeeded: the next failure starts a new round.
    pub fn succeeded(&mut self) {
        self.failed_in_a_row = 0;
    }

    /// A call failed (and the proxy moved on); returns whether every
    /// replica has now failed in a row, i.e. whether to back off before
    /// the next try.
    pub fn failed(&mut self) -> bool {
        self.failed_in_a_row += 1;
        if self.failed_in_a_row >= self.replicas {
            self.failed_in_a_row = 0;
            true
        } else {
            false
        }
    }
}

impl ControlPlane {
    /// Lazily connecting clients of the registry replicas `targets`, which
    /// must present `identity`.
    pub fn new(
        workload: Arc<Workload>,
        targets: RegistryTargets,
        identity: SpiffeId,
    ) -> anyhow::Result<Self> {
        let channel = trellis::tls::channel_to(
            &workload,
            &targets.entries()[0],
            0,
            ExpectedPeer::Exactly(identity.clone()),
        )?;
        Ok(Self {
            inner: Arc::new(ControlInner {
                workload,
                identity,
                targets,
                current: std::sync::Mutex::new(Current {
                    entry: 0,
                    generation: 0,
                    channel,
                }),
            }),
        })
    }

    fn current(&self) -> Current {
        self.inner
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many replicas (entries of `--registry`) there are.
    pub fn replicas(&self) -> usize {
        self.inner.targets.entries().len()
    }

    /// The entry of `--registry` in use.
    pub fn replica(&self) -> String {
        self.inner.targets.entries()[self.current().entry].clone()
    }

    /// A fresh count of failures in a row (see [`Attempts`]).
    pub fn attempts(&self) -> Attempts {
        Attempts::new(self.replicas())
    }

    /// Clients of the replica in use.
    pub fn clients(&self) -> ControlClients {
        let current = self.current();
        ControlClients {
            registry: RegistryServiceClient::new(current.channel.clone()),
            config: ConfigServiceClient::new(current.channel),
            replica: self.inner.targets.entries()[current.entry].clone(),
            generation: current.generation,
        }
    }

    /// Whether `status` says the replica (not the request) failed: it is
    /// gone or unreachable (transport errors come as UNAVAILABLE or
    /// UNKNOWN), or cannot serve (e.g. it lost its store).
    pub fn replica_failed(status: &tonic::Status) -> bool {
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        )
    }

    /// Moves on from the replica `used` came from to the next one (with
    /// one replica: a fresh connection to it, its next address if its
    /// name has several). A failure already moved on from is ignored.
    pub fn fail_over(&self, used: &ControlClients, status: &tonic::Status) {
        let mut current = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.generation != used.generation {
            return;
        }
        let entries = self.inner.targets.entries();
        let (next, start) = next_replica(current.entry, current.generation, entries.len());
        match trellis::tls::channel_to(
            &self.inner.workload,
            &entries[next],
            start,
            ExpectedPeer::Exactly(self.inner.identity.clone()),
        ) {
            Ok(channel) => {
                if entries.len() > 1 {
                    tracing::warn!(
                        from = %entries[current.entry],
                        to = %entries[next],
                        code = ?status.code(),
                        error = status.message(),
                        "registry replica failed; moving to the next"
                    );
                }
                *current = Current {
                    entry: next,
                    generation: current.generation + 1,
                    channel,
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a channel to the next registry replica")
            }
        }
    }

    /// Makes one call (`call` is given the clients to use) on the replica
    /// in use, and again on the next while replicas fail, each replica at
    /// most once: the result of the first that answers, or the last
    /// replica's failure.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(ControlClients) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempts = self.attempts();
        loop {
            let clients = self.clients();
            match call(clients.clone()).await {
                Err(status) if Self::replica_failed(&status) => {
                    self.fail_over(&clients, &status);
                    if attempts.failed() {
                        return Err(status);
                    }
                }
                answered => return answered,
            }
        }
    }
}

impl Discovery {
    /// A view holding only the static routes; whole contracts are kept
    /// only if `keep_contracts`; connections to endpoints are made and
    /// kept as `settings` say.
    ///
    /// Calls prefer endpoints in `zone` (the proxy's own), when any there
    /// is in rotation.
    pub fn new(
        workload: Arc<Workload>,
        statics: Vec<StaticRoute>,
        keep_contracts: bool,
        settings: settings::Settings,
        zone: &str,
    ) -> Self {
        let own = workload.id().clone();
        let view = Arc::new(MeshView {
            keep_contracts,
            budgets: Budgets::new(settings.retry),
            locale: Locale {
                id: Some((own.clone(), Locality::of(&own))),
                zone: (!zone.is_empty()).then(|| Arc::from(zone)),
            },
            ..MeshView::default()
        });
        let mut discovery = Self {
            view,
            workload,
            statics,
            settings,
            endpoints: HashMap::new(),
            instances: HashMap::new(),
            held: HashMap::new(),
            revision: 0,
            known: HashSet::new(),
            watched_configs: HashSet::new(),
            fetched_contracts: HashSet::new(),
            config_route: None,
            tasks: tokio::task::JoinSet::new(),
        };
        discovery.rebuild();
        discovery
    }

    /// Routes the Config API (`trellis.config.v1.ConfigService`) to the
    /// registry replicas at `addrs`, over mTLS under this sidecar's identity, so the
    /// local service can follow its own settings without knowing where
    /// the control plane is. Sidecars only: the edge must not expose it.
    pub fn with_config_route(mut self, addrs: Vec<SocketAddr>, identity: SpiffeId) -> Self {
        self.config_route = Some((addrs, identity));
        self.rebuild();
        self
    }

    /// The view the request path reads.
    pub fn view(&self) -> Arc<MeshView> {
        self.view.clone()
    }

    /// Without a registry: the static routes are all there is.
    pub fn run_static(self) {
        self.view.synced.store(true, Ordering::Release);
    }

    /// Follows the registry and the configs of `own_service` and of every
    /// mesh service the registry names, until the process ends.
    pub async fn run(mut self, control: ControlPlane, own_service: Option<String>) {
        if let Some(own) = own_service {
            self.watch_config(&control, own);
        }
        let reconnect = self.settings.control.reconnect;
        let mut backoff = reconnect.min;
        let mut attempts = control.attempts();
        loop {
            let clients = control.clients();
            let mut client = clients.registry.clone();
            // Whatever ends the watch moves to the next replica: one that
            // cannot keep a watch open is of no use to follow.
            let lost = match client
                .watch(registry_pb::WatchRequest { targets: vec![] })
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        let message = tokio::select! {
                            message = stream.message() => message,
                            () = tokio::time::sleep(self.settings.control.hold_check), if !self.held.is_empty() => {
                                if self.release_held() {
                                    self.rebuild();
                                }
                                continue;
                            }
                        };
                        match message {
                            Ok(Some(event)) => {
                                backoff = reconnect.min;
                                attempts.succeeded();
                                self.apply(&control, event);
                            }
                            Ok(None) => {
                                tracing::warn!(
                                    registry = %clients.replica,
                                    "registry ended the watch; routing from the last known endpoints"
                                );
                                break tonic::Status::unavailable("the registry ended the watch");
                            }
                            Err(status) => {
                                tracing::warn!(registry = %clients.replica, code = ?status.code(), message = status.message(), "registry watch lost; routing from the last known endpoints");
                                break status;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(registry = %clients.replica, code = ?status.code(), message = status.message(), "cannot watch the registry; routing from the last known endpoints");
                    status
                }
            };
            control.fail_over(&clients, &lost);
            // Another replica is tried at once; the same one (or all of
            // them in turn) only after the backoff.
            if attempts.failed() {
                tracing::debug!(
                    retry_ms = backoff.as_millis() as u64,
                    "no registry replica keeps a watch open; waiting"
                );
                tokio::time::sleep(backoff).await;
                backoff = reconnect.next(backoff);
            }
        }
    }

    fn apply(&mut self, control: &ControlPlane, event: registry_pb::WatchResponse) {
        use registry_pb::WatchEventKind as Kind;
        let last_revision = std::mem::replace(&mut self.revision, event.revision);
        match event.kind() {
            Kind::Snapshot => {
                let fresh = event
                    .instances
                    .into_iter()
                    .map(|i| (i.instance_id.clone(), i))
                    .collect();
                let previous = std::mem::replace(&mut self.instances, fresh);
                let first = !self.view.synced.swap(true, Ordering::AcqRel);
                // A snapshot at the last revision seen or later (the same
                // registry, or another replica of one shared store, whose
                // revisions are the same) is the whole truth: it replaces
                // the view, and what it lacks is gone. One that goes back
                // in time is a registry that restarted and forgot its
                // instances, or a replica with a store of its own (or one
                // not caught up), not one that saw them go. Keep what it
                // lacks until the old leases run out; the instances
                // register again long before.
                let behind = !first && !event.resync && event.revision < last_revision;
                if !behind {
                    self.held.clear();
                }
                // What the registry lists is no longer only held.
                let listed = &self.instances;
                self.held.retain(|id, _| !listed.contains_key(id));
                for (id, instance) in previous {
                    if !behind || self.instances.contains_key(&id) {
                        continue;
                    }
                    if !self.held.contains_key(&id) {
                        self.held.insert(
                            id.clone(),
                            held_until(&instance, self.settings.control.hold_without_lease),
                        );
                    }
                    self.instances.insert(id, instance);
                }
                if first {
                    tracing::info!(
                        instances = self.instances.len(),
                        revision = event.revision,
                        "first registry snapshot"
                    );
                } else {
                    tracing::info!(
                        instances = self.instances.len(),
                        held = self.held.len(),
                        revision = event.revision,
                        last_revision,
                        behind,
                        "registry resubscribed"
                    );
                }
                // Contracts may have changed while we were away.
                self.fetched_contracts.clear();
                self.view.snapshots.send_modify(|n| *n += 1);
            }
            Kind::Upsert => {
                for i in event.instances {
                    if !self.instances.contains_key(&i.instance_id) {
                        // A new instance may bring a new contract.
                        for s in &i.grpc_services {
                            self.fetched_contracts.remove(s);
                        }
                    }
                    self.held.remove(&i.instance_id);
                    self.instances.insert(i.instance_id.clone(), i);
                }
            }
            Kind::Remove => {
                for i in event.instances {
                    self.held.remove(&i.instance_id);
                    self.instances.remove(&i.instance_id);
                }
            }
            Kind::Unspecified => return,
        }
        self.release_held();
        let mesh_services: HashSet<String> =
            self.instances.values().map(|i| i.service.clone()).collect();
        for service in mesh_services {
            self.watch_config(control, service);
        }
        let grpc_services: HashSet<String> = self
            .instances
            .values()
            .flat_map(|i| i.grpc_services.iter().cloned())
            .collect();
        for service in grpc_services {
            if self.fetched_contracts.insert(service.clone()) {
                self.spawn(fetch_contract(control.clone(), self.view.clone(), service));
            }
        }
        self.rebuild();
    }

    /// Drops held instances whose old lease has run out or that the
    /// registry lists again (by address and identity, under a new ID);
    /// returns whether any went.
    fn release_held(&mut self) -> bool {
        if self.held.is_empty() {
            return false;
        }
        let now = SystemTime::now();
        let current: HashSet<(&str, &str)> = self
            .instances
            .iter()
            .filter(|(id, _)| !self.held.contains_key(*id))
            .map(|(_, i)| (i.address.as_str(), i.identity.as_str()))
            .collect();
        let released: Vec<String> = self
            .held
            .iter()
            .filter(|(id, until)| {
                **until <= now
                    || self.instances.get(*id).is_none_or(|i| {
                        current.contains(&(i.address.as_str(), i.identity.as_str()))
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &released {
            self.held.remove(id);
            if let Some(i) = self.instances.remove(id) {
                tracing::info!(instance = %id, address = %i.address, "instance kept across a registry restart released");
            }
        }
        !released.is_empty()
    }

    /// Runs `task` for as long as discovery runs (config watches, contract
    /// fetches): stopping discovery stops them.
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(task);
    }

    fn watch_config(&mut self, control: &ControlPlane, service: String) {
        if self.watched_configs.insert(service.clone()) {
            let reconnect = self.settings.control.reconnect;
            self.spawn(watch_config(
                control.clone(),
                self.view.clone(),
                service,
                reconnect,
            ));
        }
    }

    fn endpoint(
        &mut self,
        addr: SocketAddr,
        identity: Option<SpiffeId>,
        tls: bool,
    ) -> Option<Arc<Endpoint>> {
        let key = (
            addr,
            identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_else(|| format!("tls={tls}")),
        );
        if let Some(e) = self.endpoints.get(&key) {
            return Some(e.clone());
        }
        let transport = match (&identity, tls) {
            (Some(id), _) => Transport::Mtls {
                expected: id.to_string(),
                config: self
                    .workload
                    .client_config(ExpectedPeer::Exactly(id.clone()))
                    .ok()?,
            },
            (None, true) => {
                let domain = self.workload.id().trust_domain().to_owned();
                Transport::Mtls {
                    expected: format!("any identity in {domain}"),
                    config: self
                        .workload
                        .client_config(ExpectedPeer::TrustDomain(domain))
                        .ok()?,
                }
            }
            (None, false) => Transport::H2c,
        };
        let e = Endpoint::with_settings(addr, transport, self.settings.upstream);
        self.endpoints.insert(key, e.clone());
        Some(e)
    }

    fn rebuild(&mut self) {
        type Members = (String, Vec<Arc<Endpoint>>, Vec<Labels>);
        let mut by_service: HashMap<String, Members> = HashMap::new();
        // Shared label strings: one allocation per distinct value.
        let mut strings: HashSet<Arc<str>> = HashSet::new();
        let mut intern = |s: &str| -> Arc<str> {
            if let Some(known) = strings.get(s) {
                return known.clone();
            }
            let new: Arc<str> = Arc::from(s);
            strings.insert(new.clone());
            new
        };
        let mut instances: Vec<registry_pb::Instance> = self.instances.values().cloned().collect();
        // A stable order, so round robin is fair across updates.
        instances.sort_by(|a, b| {
            a.address
                .cmp(&b.address)
                .then(a.instance_id.cmp(&b.instance_id))
        });
        let mut used = HashSet::new();
        for instance in instances {
            for grpc in &instance.grpc_services {
                self.known.insert(grpc.clone());
            }
            if instance.health() != registry_pb::ServingStatus::Serving {
                continue;
            }
            let Ok(addr) = instance.address.parse::<SocketAddr>() else {
                tracing::warn!(instance = %instance.instance_id, address = %instance.address, "instance address is not ip:port; skipped");
                continue;
            };
            let Ok(identity) = SpiffeId::parse(&instance.identity) else {
                tracing::warn!(instance = %instance.instance_id, identity = %instance.identity, "instance identity is not a SPIFFE ID; skipped");
                continue;
            };
            let key = (addr, identity.to_string());
            let Some(endpoint) = self.endpoint(addr, Some(identity), true) else {
                continue;
            };
            used.insert(key);
            let labels = Labels {
                version: intern(&instance.version),
                zone: intern(&instance.zone),
            };
            for grpc in &instance.grpc_services {
                let entry = by_service
                    .entry(grpc.clone())
                    .or_insert_with(|| (instance.service.clone(), Vec::new(), Vec::new()));
                if !entry.1.iter().any(|e| Arc::ptr_eq(e, &endpoint)) {
                    entry.1.push(endpoint.clone());
                    entry.2.push(labels.clone());
                }
            }
        }
        let mut routes: HashMap<String, Arc<Upstream>> = by_service
            .into_iter()
            .map(|(grpc, (mesh, endpoints, labels))| {
                (grpc, Upstream::labelled(mesh, endpoints, labels))
            })
            .collect();
        if let Some((addrs, identity)) = self.config_route.clone() {
            let endpoints: Vec<Arc<Endpoint>> = addrs
                .iter()
                .filter_map(|addr| {
                    used.insert((*addr, identity.to_string()));
                    self.endpoint(*addr, Some(identity.clone()), true)
                })
                .collect();
            if !endpoints.is_empty() {
                // No config file names "the registry", so calls get the
                // built-in policy: no route timeout cutting a watch short.
                routes.insert(
                    CONFIG_SERVICE.to_owned(),
                    Upstream::new(CONTROL_PLANE.to_owned(), endpoints),
                );
            }
        }
        let mut fallback = None;
        for route in self.statics.clone() {
            let endpoints: Vec<Arc<Endpoint>> = route
                .endpoints
                .iter()
                .filter_map(|(addr, tls)| {
                    used.insert((*addr, format!("tls={tls}")));
                    self.endpoint(*addr, None, *tls)
                })
                .collect();
            let upstream = Upstream::new(route.service.clone(), endpoints);
            if route.service == "*" {
                fallback = Some(upstream);
            } else {
                routes.insert(route.service.clone(), upstream);
            }
        }
        // Endpoints no longer named by anyone are dropped with their
        // connections.
        self.endpoints.retain(|k, _| used.contains(k));
        self.view
            .directory
            .store(Arc::new(Table::new(routes, self.known.clone(), fallback)));
        let registered: BTreeMap<String, String> = self
            .instances
            .values()
            .flat_map(|i| {
                i.grpc_services
                    .iter()
                    .map(|g| (g.clone(), i.service.clone()))
            })
            .collect();
        // Health changes and re-registrations leave the set as it was; the
        // edge rebuilds its reflection pool only when the set changes.
        if **self.view.registered.load() != registered {
            self.view.registered.store(Arc::new(registered));
        }
        self.view.changes.send_modify(|n| *n += 1);
    }
}

/// Until when an instance a restarted registry forgot is kept: its old
/// lease's expiry, as the old registry told it, else `otherwise` from now.
fn held_until(instance: &registry_pb::Instance, otherwise: Duration) -> SystemTime {
    instance
        .lease_expires_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or_else(|| SystemTime::now() + otherwise)
}

/// Follows one mesh service's configuration, watching again when the
/// watch ends: at once on the next replica, after `reconnect` once every
/// replica has failed in a row.
///
/// Config revisions are not compared across watches: each replica reads
/// its own `--config-dir` and numbers its versions itself, so another
/// replica's first value (its version in force, whatever its number)
/// replaces the policy. Until that value arrives, and whenever a watch
/// breaks, the last policy stays in force.
async fn watch_config(
    control: ControlPlane,
    view: Arc<MeshView>,
    service: String,
    reconnect: settings::Backoff,
) {
    let mut backoff = reconnect.min;
    let mut attempts = control.attempts();
    loop {
        let clients = control.clients();
        let mut client = clients.config.clone();
        let request = config_pb::WatchConfigRequest {
            service: service.clone(),
        };
        let lost = match client.watch_config(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let update = match stream.message().await {
                        Ok(Some(update)) => update,
                        Ok(None) => {
                            break tonic::Status::unavailable("the registry ended the watch");
                        }
                        Err(status) => break status,
                    };
                    backoff = reconnect.min;
                    attempts.succeeded();
                    let Some(config) = update.config else {
                        continue;
                    };
                    let policy = Arc::new(ServicePolicy::from_proto(&config));
                    tracing::debug!(%service, registry = %clients.replica, revision = update.revision, "config updated");
                    view.policies.rcu(|current| {
                        let mut next = HashMap::clone(current);
                        next.insert(service.clone(), policy.clone());
                        next
                    });
                }
            }
            Err(status) => status,
        };
        tracing::debug!(%service, registry = %clients.replica, code = ?lost.code(), message = lost.message(), "config watch lost; keeping the last policy");
        if ControlPlane::replica_failed(&lost) {
            control.fail_over(&clients, &lost);
            if !attempts.failed() {
                continue;
            }
        } else {
            // Refused (say, an invalid name): no replica would do better.
            attempts.succeeded();
        }
        tokio::time::sleep(backoff).await;
        backoff = reconnect.next(backoff);
    }
}

/// Learns which methods of `grpc_service` its contract marks safe to
/// repeat (`idempotency_level` NO_SIDE_EFFECTS or IDEMPOTENT).
async fn fetch_contract(control: ControlPlane, view: Arc<MeshView>, grpc_service: String) {
    let request = registry_pb::GetServiceDescriptorsRequest {
        grpc_service: grpc_service.clone(),
    };
    let fetched = control
        .call(|mut clients| {
            let request = request.clone();
            async move { clients.registry.get_service_descriptors(request).await }
        })
        .await;
    let files = match fetched {
        Ok(r) => r.into_inner().file_descriptors,
        Err(status) => {
            // Registered without descriptors: only config can mark methods safe.
            tracing::debug!(service = %grpc_service, code = ?status.code(), "no contract for service");
            return;
        }
    };
    let (all, safe) = contract_methods(&files, &grpc_service);
    tracing::debug!(service = %grpc_service, methods = all.len(), safe = safe.len(), "contract loaded");
    let (all, safe) = (Arc::new(all), Arc::new(safe));
    view.safe_methods.rcu(|current| {
        let mut next = HashMap::clone(current);
        next.insert(grpc_service.clone(), safe.clone());
        next
    });
    view.methods.rcu(|current| {
        let mut next = HashMap::clone(current);
        next.insert(grpc_service.clone(), all.clone());
        next
    });
    if !view.keep_contracts {
        return;
    }
    let files: Arc<Vec<Bytes>> = Arc::new(files.into_iter().map(Bytes::from).collect());
    view.contracts.rcu(|current| {
        let mut next = HashMap::clone(current);
        next.insert(grpc_service.clone(), files.clone());
        next
    });
    view.changes.send_modify(|n| *n += 1);
}

pub use trellis::contract::contract_methods;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use trellis_test_support::TestPki;

    #[test]
    fn failing_over_goes_round_the_replicas_in_order() {
        // Three entries: 0 -> 1 -> 2 -> 0 ..., each name's addresses tried
        // from one further each time round the list.
        let mut entry = 0;
        let mut order = Vec::new();
        for generation in 0..7 {
            let (next, start) = next_replica(entry, generation, 3);
            order.push((next, start));
            entry = next;
        }
        assert_eq!(
            order,
            [(1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2)]
        );
        // One entry: always itself, from its next address.
        assert_eq!(next_replica(0, 0, 1), (0, 1));
        assert_eq!(next_replica(0, 4, 1), (0, 5));
    }

    #[test]
    fn backoff_only_once_every_replica_failed_in_a_row() {
        let mut one = Attempts::new(1);
        assert!(one.failed());
        assert!(one.failed());

        let mut three = Attempts::new(3);
        let rounds: Vec<bool> = (0..6).map(|_| three.failed()).collect();
        assert_eq!(rounds, [false, false, true, false, false, true]);
        assert!(!three.failed());
        three.succeeded();
        assert!(!three.failed());
        assert!(!three.failed());
        assert!(three.failed());
    }

    fn workload(pki: &TestPki, service: &str) -> Arc<Workload> {
        Arc::new(Workload::load(&pki.issue(service, service)).unwrap())
    }

    #[tokio::test]
    async fn one_failure_moves_every_user_once() {
        let pki = TestPki::new("trellis.local");
        let targets = RegistryTargets::parse("127.0.0.1:1,registry.invalid:2,127.0.0.1:3").unwrap();
        let control =
            ControlPlane::new(workload(&pki, "echo"), targets, pki.id("registry")).unwrap();
        assert_eq!(control.replicas(), 3);
        let down = tonic::Status::unavailable("gone");

        // Two users hold clients of the first replica; both see it fail.
        let (a, b) = (control.clients(), control.clients());
        assert_eq!(a.replica, "127.0.0.1:1");
        control.fail_over(&a, &down);
        assert_eq!(control.replica(), "registry.invalid:2");
        // The second report is about a replica already left.
        control.fail_over(&b, &down);
        assert_eq!(control.replica(), "registry.invalid:2");

        let c = control.clients();
        assert_eq!(c.replica, "registry.invalid:2");
        control.fail_over(&c, &down);
        assert_eq!(control.replica(), "127.0.0.1:3");
        control.fail_over(&control.clients(), &down);
        assert_eq!(control.replica(), "127.0.0.1:1", "wraps around");
    }

    #[tokio::test]
    async fn a_call_tries_each_replica_once_and_stops_at_an_answer() {
        let pki = TestPki::new("trellis.local");
        let targets = RegistryTargets::parse("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3").unwrap();
        let control =
            ControlPlane::new(workload(&pki, "echo"), targets, pki.id("registry")).unwrap();

        // Every replica down: each is asked once, then the failure.
        let mut asked = Vec::new();
        let r: Result<(), _> = control
            .call(|c| {
                asked.push(c.replica.clone());
                async { Err(tonic::Status::unavailable("gone")) }
            })
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(asked, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);

        // A replica that answers, even NOT_FOUND, ends the call there.
        let mut asked = Vec::new();
        let r: Result<(), _> = control
            .call(|c| {
                asked.push(c.replica.clone());
                let answer = if c.replica == "127.0.0.1:2" {
                    tonic::Status::not_found("no such lease")
                } else {
                    tonic::Status::unavailable("gone")
                };
                async move { Err(answer) }
            })
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(asked, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(control.replica(), "127.0.0.1:2");
    }

    fn instance(id: &str, port: u16) -> registry_pb::Instance {
        registry_pb::Instance {
            instance_id: id.into(),
            service: "echo".into(),
            address: format!("127.0.0.1:{port}"),
            identity: "spiffe://trellis.local/ns/default/sa/echo".into(),
            grpc_services: vec!["trellis.echo.v1.EchoService".into()],
            health: registry_pb::ServingStatus::Serving as i32,
            lease_expires_at: Some((SystemTime::now() + Duration::from_secs(60)).into()),
            ..Default::default()
        }
    }

    fn snapshot(revision: u64, instances: &[registry_pb::Instance]) -> registry_pb::WatchResponse {
        registry_pb::WatchResponse {
            revision,
            kind: registry_pb::WatchEventKind::Snapshot as i32,
            instances: instances.to_vec(),
            ..Default::default()
        }
    }

    fn ids(discovery: &Discovery) -> Vec<String> {
        let mut ids: Vec<String> = discovery.instances.keys().cloned().collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_snapshot_from_another_replica_replaces_the_view_unless_it_is_behind() {
        let pki = TestPki::new("trellis.local");
        let workload = workload(&pki, "caller");
        let control = ControlPlane::new(
            workload.clone(),
            RegistryTargets::parse("127.0.0.1:1,127.0.0.1:2").unwrap(),
            pki.id("registry"),
        )
        .unwrap();
        let mut discovery = Discovery::new(
            workload,
            Vec::new(),
            false,
            settings::Settings::default(),
            "",
        );
        let (x, y, z) = (
            instance("x", 1001),
            instance("y", 1002),
            instance("z", 1003),
        );

        discovery.apply(&control, snapshot(10, &[x.clone(), y.clone()]));
        assert!(discovery.view.synced.load(Ordering::Acquire));
        assert_eq!(ids(&discovery), ["x", "y"]);

        // A replica at a later revision (or the same): its view, whole.
        discovery.apply(&control, snapshot(12, std::slice::from_ref(&x)));
        assert_eq!(ids(&discovery), ["x"]);
        assert!(discovery.held.is_empty());
        discovery.apply(&control, snapshot(12, &[]));
        assert!(ids(&discovery).is_empty());

        // One behind (a store of its own, or not caught up): what it lacks
        // is held until its lease runs out...
        discovery.apply(&control, snapshot(30, &[x.clone(), y.clone()]));
        discovery.apply(&control, snapshot(4, std::slice::from_ref(&z)));
        assert_eq!(ids(&discovery), ["x", "y", "z"]);
        assert_eq!(discovery.held.len(), 2);
        // ...or until it is listed again, under its ID or, registered
        // again, under a new one at the same address and identity.
        let y_again = registry_pb::Instance {
            instance_id: "y2".into(),
            ..y.clone()
        };
        discovery.apply(
            &control,
            registry_pb::WatchResponse {
                revision: 5,
                kind: registry_pb::WatchEventKind::Upsert as i32,
                instances: vec![y_again],
                ..Default::default()
            },
        );
        assert_eq!(ids(&discovery), ["x", "y2", "z"]);
        assert_eq!(discovery.held.keys().collect::<Vec<_>>(), ["x"]);
        // A later snapshot at or past the last revision seen ends holding.
        discovery.apply(&control, snapshot(5, std::slice::from_ref(&z)));
        assert_eq!(ids(&discovery), ["z"]);
        assert!(discovery.held.is_empty());

        // Behind again with an expired lease: not held at all.
        let mut old = instance("old", 1004);
        old.lease_expires_at = Some((SystemTime::now() - Duration::from_secs(1)).into());
        discovery.apply(&control, snapshot(9, &[z.clone(), old]));
        discovery.apply(&control, snapshot(2, std::slice::from_ref(&z)));
        assert_eq!(ids(&discovery), ["z"]);
        assert!(discovery.held.is_empty());
    }

    #[test]
    fn contract_marks_read_and_idempotent_methods_safe() {
        let set = prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap();
        let files: Vec<Vec<u8>> = set.file.iter().map(|f| f.encode_to_vec()).collect();
        let (all, safe) = contract_methods(&files, "trellis.registry.v1.RegistryService");
        assert!(all.contains("Register") && all.is_superset(&safe));
        for m in ["RenewLease", "Deregister", "Resolve", "Watch"] {
            assert!(safe.contains(m), "{m}");
        }
        assert!(!safe.contains("Register"));
        assert!(!safe.contains("KeepAlive"));
    }
}
