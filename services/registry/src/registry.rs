//! The registry: live instances under leases, watched by proxies.
//!
//! All state sits behind one short-held mutex; every change bumps the
//! revision and is published, under that lock, on a bounded broadcast
//! channel. A watcher subscribes and takes its snapshot under the same lock,
//! so it misses nothing; one that falls more than the channel's capacity
//! behind is sent a fresh snapshot (`resync`) instead of growing a queue.
//!
//! What one identity may hold is bounded by [`Quotas`]. With a state
//! directory, every change marks the state dirty and a background task
//! writes it out, coalesced (see [`Registry::spawn_persist`]); a restarted
//! registry picks up its instances, leases, name ownership and contracts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis::SpiffeId;
use trellis::pb::trellis::registry::v1 as pb;
use trellis::status::FieldViolations;
use trellis::tls::peer_identity;

use crate::contracts::Contract;
use crate::quota::{self, Quotas, WatchPermit, Watches};
use crate::replicated::Replicated;
use crate::store::{Store, StoreError, StoredContract, StoredInstance, StoredState};
use crate::{proto_duration, validate};

use pb::registry_service_server::RegistryService;
use pb::{RemovalReason, ServingStatus, WatchEventKind};

/// How many changes a watcher may fall behind before it is resynced.
pub const WATCH_BUFFER: usize = 1024;
/// How often expired leases are swept.
pub const EXPIRY_SWEEP: Duration = Duration::from_millis(100);
/// How soon a change to instances, names or contracts is written to the
/// state directory: later changes within this time share one write.
pub const PERSIST_DELAY: Duration = Duration::from_millis(100);
/// How soon renewed leases alone are written: a renewal only moves an
/// expiry forward, and a stored expiry a second old still leaves the
/// instance most of its lease (sidecars renew every third of it).
pub const PERSIST_RENEWALS_DELAY: Duration = Duration::from_secs(1);

/// What is published to watchers.
#[derive(Debug)]
pub enum Change {
    /// One instance changed.
    Instance {
        /// The revision of the change.
        revision: u64,
        /// Upsert or remove.
        kind: WatchEventKind,
        /// Why a removed instance went.
        reason: RemovalReason,
        /// The instance, as it is now (or was, removed).
        instance: Box<pb::Instance>,
    },
    /// The view was replaced whole (the store was read again): every
    /// watcher is sent a fresh snapshot.
    Resync,
    /// The store is lost: every watch ends with UNAVAILABLE, so proxies
    /// turn to a replica that still has it.
    Lost(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) instance: pb::Instance,
    pub(crate) owner: SpiffeId,
    pub(crate) lease_id: String,
    pub(crate) ttl: Duration,
    /// When the lease runs out (the embedded store's leases only: etcd
    /// expires its own).
    expires: Instant,
    /// With etcd: the instance key's last modification, and its lease.
    pub(crate) mod_revision: i64,
    pub(crate) etcd_lease: i64,
}

/// Where the mesh's workloads live. Only IDs of the form
/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service>` name mesh
/// services: the same CA may sign other namespaces, and
/// `ns/other/sa/usage` is not `usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshScope {
    /// The trust domain, e.g. `trellis.local`.
    pub trust_domain: String,
    /// The namespace, e.g. `default`.
    pub namespace: String,
}

impl MeshScope {
    /// The scope of `id` (normally the registry's own identity), which must
    /// have the `/ns/<namespace>/sa/<service>` form.
    pub fn of(id: &SpiffeId) -> Result<Self, String> {
        let namespace = id.namespace().ok_or_else(|| {
            format!("{id}: the registry's SPIFFE ID must have the /ns/<namespace>/sa/<service> form, to know which namespace it serves")
        })?;
        Ok(Self {
            trust_domain: id.trust_domain().to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// The mesh service `id` names, when it is in this scope.
    pub fn service_of<'a>(&self, id: &'a SpiffeId) -> Option<&'a str> {
        id.service_in(&self.trust_domain, &self.namespace)
    }

    /// The identity of mesh service `service`, as text for messages.
    fn identity(&self, service: &str) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{service}",
            self.trust_domain, self.namespace
        )
    }
}

/// A gRPC service name declared in config for one mesh service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// The mesh service (and so identity) that owns the name.
    pub service: String,
    /// The config file declaring it, for messages.
    pub file: String,
}

/// Who owns a gRPC service name, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner<'a> {
    /// Declared in config.
    Declared(&'a Declaration),
    /// Claimed by the first registration naming it (and kept for the
    /// registry's lifetime, instances or not).
    Claimed(&'a str),
}

impl<'a> Owner<'a> {
    fn service(self) -> &'a str {
        match self {
            Owner::Declared(d) => &d.service,
            Owner::Claimed(s) => s,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    instances: BTreeMap<String, Entry>,
    leases: HashMap<String, String>,
    contracts: HashMap<String, Arc<Contract>>,
    /// Instances per mesh service.
    per_service: HashMap<String, usize>,
    /// gRPC service names declared in config: they belong to the declared
    /// mesh service whether or not it has instances.
    declared: HashMap<String, Declaration>,
    /// Every gRPC service name ever registered, with the mesh service that
    /// last registered it with the right to. Never forgotten while the
    /// registry runs, and kept across restarts with a state directory: a
    /// name whose owner has no instance right now is not up for grabs.
    claims: HashMap<String, String>,
    /// Serving instances per mesh service and version: what config's
    /// version splits are checked against.
    serving: HashMap<String, HashMap<String, usize>>,
}

impl State {
    fn serves(instance: &pb::Instance, target: &str) -> bool {
        instance.service == target || instance.grpc_services.iter().any(|s| s == target)
    }

    /// Who owns gRPC service `grpc`: config first, then the first claim.
    fn owner(&self, grpc: &str) -> Option<Owner<'_>> {
        self.declared
            .get(grpc)
            .map(Owner::Declared)
            .or_else(|| self.claims.get(grpc).map(|s| Owner::Claimed(s)))
    }

    fn index(&mut self, instance: &pb::Instance) {
        *self
            .per_service
            .entry(instance.service.clone())
            .or_default() += 1;
        for g in &instance.grpc_services {
            // The registration was allowed, so its service owns the name.
            self.claims.insert(g.clone(), instance.service.clone());
        }
    }

    /// Adds a new instance: its lease, its indexes, and its count among
    /// its version's serving instances; true if that version had no
    /// serving instance until now.
    fn add(&mut self, entry: Entry) -> bool {
        self.leases
            .insert(entry.lease_id.clone(), entry.instance.instance_id.clone());
        self.index(&entry.instance);
        let first = self.serve(&entry.instance);
        self.instances
            .insert(entry.instance.instance_id.clone(), entry);
        first
    }

    /// Counts `instance` among its version's serving instances, if it is
    /// serving; true if its version had none until now.
    fn serve(&mut self, instance: &pb::Instance) -> bool {
        if instance.health() != ServingStatus::Serving {
            return false;
        }
        let count = self
            .serving
            .entry(instance.service.clone())
            .or_default()
            .entry(instance.version.clone())
            .or_default();
        *count += 1;
        *count == 1
    }

    /// Stops counting `instance` among its version's serving instances, if
    /// it was serving; true if it was its version's last.
    fn unserve(&mut self, instance: &pb::Instance) -> bool {
        if instance.health() != ServingStatus::Serving {
            return false;
        }
        let Some(versions) = self.serving.get_mut(&instance.service) else {
            return false;
        };
        let Some(count) = versions.get_mut(&instance.version) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        versions.remove(&instance.version);
        if versions.is_empty() {
            self.serving.remove(&instance.service);
        }
        true
    }

    /// Forgets an instance in the indexes; true if it was its service's last.
    fn unindex(&mut self, instance: &pb::Instance) -> bool {
        match self.per_service.get_mut(&instance.service) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => {
                self.per_service.remove(&instance.service);
                true
            }
        }
    }

    fn matching<'a>(
        &'a self,
        targets: &'a [String],
    ) -> impl Iterator<Item = &'a pb::Instance> + 'a {
        self.instances
            .values()
            .map(|e| &e.instance)
            .filter(move |i| targets.is_empty() || targets.iter().any(|t| Self::serves(i, t)))
    }
}

/// The registry's state and the publisher of its changes.
#[derive(Debug)]
pub struct Registry {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Bumped whenever the set of registered contracts changes.
    contracts_version: watch::Sender<u64>,
    /// Bumped whenever a version of some mesh service gains its first
    /// serving instance or loses its last.
    serving_version: watch::Sender<u64>,
    read_only: HashSet<String>,
    scope: MeshScope,
    quotas: Quotas,
    watches: Arc<Watches>,
    persist: Option<Persist>,
    counts: Counts,
    /// Whether the registry may answer from its view (always, with the
    /// embedded store; with etcd, only while it is in step with etcd).
    available: watch::Sender<Availability>,
    /// With etcd: where instances that serve a name config declares for
    /// another service are sent, to be removed from etcd (by lease).
    usurpers: std::sync::OnceLock<mpsc::Sender<Vec<i64>>>,
}

/// Whether the registry's view may be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// In step with its store.
    Serving,
    /// Not (yet, or no longer) in step with its store: why.
    Unavailable(String),
}

/// What has happened since the registry started, for its metrics.
#[derive(Debug, Default)]
struct Counts {
    registrations: AtomicU64,
    deregistrations: AtomicU64,
    lease_expiries: AtomicU64,
}

/// The registry's numbers at one moment, for its metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// The revision: bumped by every change watchers see.
    pub revision: u64,
    /// Registered instances per mesh service, by name.
    pub instances: BTreeMap<String, usize>,
    /// Open Registry `Watch` streams.
    pub watchers: usize,
    /// Registrations accepted since the start.
    pub registrations: u64,
    /// Instances deregistered by their sidecars since the start.
    pub deregistrations: u64,
    /// Instances removed because their lease ran out, since the start.
    pub lease_expiries: u64,
    /// Whether the registry may serve its view (always with its own
    /// store; with etcd, while it is in step with etcd).
    pub serving: bool,
}

/// Writing the state out: what is pending, and the store.
#[derive(Debug)]
struct Persist {
    store: Store,
    dirty: Mutex<Dirty>,
    wake: Arc<Notify>,
    /// One write at a time (the periodic task and the final one on drain).
    writing: Mutex<()>,
    /// Whether the last write failed (logged once, until one succeeds).
    failing: AtomicBool,
}

#[derive(Debug, Default)]
struct Dirty {
    /// Something changed since the last write.
    pending: bool,
    /// Something other than a renewal changed.
    urgent: bool,
}

pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// A registration whose fields and caller were checked.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) req: pb::RegisterRequest,
    pub(crate) ttl: Duration,
    pub(crate) contract: Option<Arc<Contract>>,
}

/// The instance a checked registration creates.
pub(crate) fn new_instance(
    caller: &SpiffeId,
    instance_id: String,
    req: pb::RegisterRequest,
    ttl: Duration,
) -> pb::Instance {
    let now = SystemTime::now();
    pb::Instance {
        instance_id,
        service: req.service,
        version: req.version,
        zone: req.zone,
        address: req.address,
        grpc_services: req.grpc_services,
        metadata: req.metadata,
        health: req.health,
        identity: caller.to_string(),
        registered_at: Some(prost_types::Timestamp::from(now)),
        lease_expires_at: Some(prost_types::Timestamp::from(now + ttl)),
    }
}

impl Registry {
    /// A new, empty, in-memory registry for the mesh services of `scope`.
    /// Callers whose service name or SPIFFE ID is in `read_only` may
    /// resolve and watch but not register; each identity may hold what
    /// `quotas` allow.
    pub fn new(
        scope: MeshScope,
        read_only: impl IntoIterator<Item = String>,
        quotas: Quotas,
    ) -> Arc<Self> {
        Arc::new(Self::build(scope, read_only, quotas, None))
    }

    /// A registry kept in `store`: it starts from the stored state
    /// (instances whose leases have not run out, with their lease ids; name
    /// ownership; contracts; the revision, moved one forward), and
    /// [`Registry::spawn_persist`] writes every change back. A state file
    /// that cannot be read is an error naming it, not an empty start.
    pub fn durable(
        scope: MeshScope,
        read_only: impl IntoIterator<Item = String>,
        quotas: Quotas,
        store: Store,
    ) -> Result<Arc<Self>, StoreError> {
        let stored = store.load()?;
        let path = store.path().display().to_string();
        let registry = Self::build(
            scope,
            read_only,
            quotas,
            Some(Persist {
                store,
                dirty: Mutex::new(Dirty::default()),
                wake: Arc::new(Notify::new()),
                writing: Mutex::new(()),
                failing: AtomicBool::new(false),
            }),
        );
        if let Some(stored) = stored {
            let (kept, dropped) =
                registry
                    .restore(stored)
                    .map_err(|reason| StoreError::Corrupt {
                        path: path.clone(),
                        reason,
                    })?;
            let state = registry.lock();
            tracing::info!(
                path = %path,
                instances = kept,
                expired = dropped,
                names = state.claims.len(),
                contracts = state.contracts.len(),
                revision = state.revision,
                "registry state restored"
            );
        } else {
            tracing::info!(path = %path, "no registry state yet; starting empty");
        }
        Ok(Arc::new(registry))
    }

    fn build(
        scope: MeshScope,
        read_only: impl IntoIterator<Item = String>,
        quotas: Quotas,
        persist: Option<Persist>,
    ) -> Self {
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        let (contracts_version, _) = watch::channel(0);
        let (serving_version, _) = watch::channel(0);
        Self {
            state: Mutex::new(State::default()),
            changes,
            contracts_version,
            serving_version,
            read_only: read_only.into_iter().collect(),
            scope,
            quotas,
            watches: Watches::new(quotas.watches),
            persist,
            counts: Counts::default(),
            available: watch::channel(Availability::Serving).0,
            usurpers: std::sync::OnceLock::new(),
        }
    }

    /// Loads `stored` into this (empty) registry; returns how many
    /// instances came back and how many had expired meanwhile.
    fn restore(&self, stored: StoredState) -> Result<(usize, usize), String> {
        let mut state = self.lock();
        let now = SystemTime::now();
        let monotonic = Instant::now();
        state.claims = stored.claims;
        let (mut kept, mut dropped) = (0, 0);
        for (i, s) in stored.instances.into_iter().enumerate() {
            let what = |e: &str| format!("instance {i}: {e}");
            let instance = s.instance.ok_or_else(|| what("no instance record"))?;
            let owner = SpiffeId::parse(&s.owner).map_err(|e| what(&e.to_string()))?;
            let ttl = Duration::from_millis(s.ttl_ms);
            if !(validate::MIN_TTL..=validate::MAX_TTL).contains(&ttl) {
                return Err(what(&format!("lease ttl of {ttl:?} is out of range")));
            }
            let expires_at = instance
                .lease_expires_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .ok_or_else(|| what("no lease expiry"))?;
            let left = match expires_at.duration_since(now) {
                Ok(left) if !left.is_zero() => left,
                _ => {
                    dropped += 1;
                    continue;
                }
            };
            if instance.instance_id.is_empty() || s.lease_id.is_empty() {
                return Err(what("no instance or lease id"));
            }
            state.add(Entry {
                instance,
                owner,
                lease_id: s.lease_id,
                ttl,
                // A lease never outlasts its ttl, whatever the clock did.
                expires: monotonic + left.min(ttl),
                mod_revision: 0,
                etcd_lease: 0,
            });
            kept += 1;
        }
        for c in stored.contracts {
            // A contract goes with its service's last instance.
            if !state.per_service.contains_key(&c.service) {
                continue;
            }
            let contract = Contract::parse(&c.files, &[])
                .map_err(|e| format!("contract of {}: {}", c.service, e.reason))?;
            state.contracts.insert(c.service, Arc::new(contract));
        }
        // Watchers see the revision move forward. (Changes made after the
        // last write are lost with a crash; then the revision may be lower
        // than one a proxy saw, which is how proxies know to keep the
        // instances this registry forgot until their leases run out.)
        state.revision = stored.revision + 1;
        Ok((kept, dropped))
    }

    /// The state as stored; contracts are copied outside the lock.
    fn stored(&self) -> StoredState {
        let (mut stored, contracts) = {
            let state = self.lock();
            let stored = StoredState {
                revision: state.revision,
                instances: state
                    .instances
                    .values()
                    .map(|e| StoredInstance {
                        instance: Some(e.instance.clone()),
                        owner: e.owner.to_string(),
                        lease_id: e.lease_id.clone(),
                        ttl_ms: e.ttl.as_millis() as u64,
                    })
                    .collect(),
                claims: state.claims.clone(),
                contracts: Vec::new(),
            };
            let contracts: Vec<(String, Arc<Contract>)> = state
                .contracts
                .iter()
                .map(|(s, c)| (s.clone(), c.clone()))
                .collect();
            (stored, contracts)
        };
        stored.contracts = contracts
            .into_iter()
            .map(|(service, c)| StoredContract {
                service,
                files: c.registered_files().iter().map(|b| b.to_vec()).collect(),
            })
            .collect();
        stored
    }

    /// Notes a change for the state directory, if there is one.
    fn mark_dirty(&self, urgent: bool) {
        if let Some(p) = &self.persist {
            let mut dirty = p.dirty.lock().unwrap_or_else(|e| e.into_inner());
            dirty.pending = true;
            dirty.urgent |= urgent;
            p.wake.notify_one();
        }
    }

    /// Writes the state now (blocking), if there is a state directory and
    /// something changed since the last write. Called by the persist task,
    /// and once more after the server has drained.
    pub fn save_now(&self) -> Result<(), StoreError> {
        let Some(p) = &self.persist else {
            return Ok(());
        };
        let _writing = p.writing.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut dirty = p.dirty.lock().unwrap_or_else(|e| e.into_inner());
            if !dirty.pending {
                return Ok(());
            }
            *dirty = Dirty::default();
        }
        let saved = p.store.save(&self.stored());
        match &saved {
            Ok(()) => {
                if p.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %p.store.path().display(), "registry state written again");
                }
            }
            Err(e) => {
                // Try again with the next change (or the next tick).
                self.mark_dirty(true);
                if !p.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "cannot write the registry state; serving from memory and retrying");
                }
            }
        }
        saved
    }

    /// With a state directory, writes the state out after each change, at
    /// most every [`PERSIST_DELAY`] (renewals alone: every
    /// [`PERSIST_RENEWALS_DELAY`]), off the async threads, until the
    /// registry is dropped or the task aborted.
    pub fn spawn_persist(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        self.persist.as_ref()?;
        let weak = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            loop {
                // Wait for a change.
                loop {
                    let Some(registry) = weak.upgrade() else {
                        return;
                    };
                    let p = registry.persist.as_ref().expect("checked above");
                    let wake = p.wake.clone();
                    if p.dirty.lock().unwrap_or_else(|e| e.into_inner()).pending {
                        break;
                    }
                    drop(registry);
                    wake.notified().await;
                }
                // Let more changes join it.
                let since = tokio::time::Instant::now();
                loop {
                    let Some(registry) = weak.upgrade() else {
                        return;
                    };
                    let p = registry.persist.as_ref().expect("checked above");
                    let wake = p.wake.clone();
                    let urgent = p.dirty.lock().unwrap_or_else(|e| e.into_inner()).urgent;
                    drop(registry);
                    let delay = if urgent {
                        PERSIST_DELAY
                    } else {
                        PERSIST_RENEWALS_DELAY
                    };
                    tokio::select! {
                        () = tokio::time::sleep_until(since + delay) => break,
                        () = wake.notified() => {}
                    }
                }
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                let saved = tokio::task::spawn_blocking(move || registry.save_now()).await;
                if saved.as_ref().is_ok_and(Result::is_err) {
                    // Do not retry faster than the coalescing delay.
                    tokio::time::sleep(PERSIST_DELAY).await;
                }
            }
        }))
    }

    /// The numbers the registry's metrics show, read under one lock.
    pub fn stats(&self) -> RegistryStats {
        let (revision, instances) = {
            let state = self.lock();
            let instances = state
                .per_service
                .iter()
                .map(|(service, n)| (service.clone(), *n))
                .collect();
            (state.revision, instances)
        };
        RegistryStats {
            revision,
            instances,
            watchers: self.changes.receiver_count(),
            registrations: self.counts.registrations.load(Ordering::Relaxed),
            deregistrations: self.counts.deregistrations.load(Ordering::Relaxed),
            lease_expiries: self.counts.lease_expiries.load(Ordering::Relaxed),
            serving: *self.available.borrow() == Availability::Serving,
        }
    }

    /// Admits one more watch (Registry or Config API) for `caller`.
    pub fn admit_watch(&self, caller: &SpiffeId) -> Result<WatchPermit, Status> {
        self.watches.admit(caller.as_str())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way later calls would trip on; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(
        &self,
        state: &mut State,
        kind: WatchEventKind,
        reason: RemovalReason,
        instance: pb::Instance,
    ) -> u64 {
        let revision = state.revision + 1;
        self.publish_at(state, revision, kind, reason, instance)
    }

    /// Publishes a change made at `revision` (with etcd, the change's own).
    fn publish_at(
        &self,
        state: &mut State,
        revision: u64,
        kind: WatchEventKind,
        reason: RemovalReason,
        instance: pb::Instance,
    ) -> u64 {
        state.revision = state.revision.max(revision);
        let change = Arc::new(Change::Instance {
            revision,
            kind,
            reason,
            instance: Box::new(instance),
        });
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
        self.mark_dirty(true);
        state.revision
    }

    /// Follows changes to the set of registered contracts.
    pub fn contracts_changes(&self) -> watch::Receiver<u64> {
        self.contracts_version.subscribe()
    }

    /// Follows changes to which versions of mesh services have a serving
    /// instance (not every registration: only a version's first serving
    /// instance and its last).
    pub fn serving_versions_changes(&self) -> watch::Receiver<u64> {
        self.serving_version.subscribe()
    }

    /// The versions of mesh service `service` that have at least one
    /// serving instance now.
    pub fn serving_versions(&self, service: &str) -> HashSet<String> {
        self.lock()
            .serving
            .get(service)
            .map(|versions| versions.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn serving_changed(&self) {
        self.serving_version.send_modify(|v| *v += 1);
    }

    /// Whether gRPC service `service` (and `method`, when given) is defined
    /// by its owner's registered contract. Another service's upload that
    /// happens to define it does not count.
    pub fn knows_method(&self, service: &str, method: Option<&str>) -> bool {
        let state = self.lock();
        state
            .owner(service)
            .and_then(|o| state.contracts.get(o.service()))
            .is_some_and(|c| c.has_method(service, method))
    }

    /// Replaces the gRPC service names declared in config (name → owner).
    /// Instances of another mesh service that serve a name now declared
    /// for someone else are removed: they were let in before the
    /// declaration, and the declared owner's traffic must not keep going to
    /// them (their sidecars' next registration is refused, naming the owner).
    pub fn set_declared(&self, declared: HashMap<String, Declaration>) {
        let mut state = self.lock();
        if state.declared == declared {
            return;
        }
        state.declared = declared;
        let usurpers: Vec<String> = state
            .instances
            .iter()
            .filter(|(_, e)| {
                e.instance.grpc_services.iter().any(|g| {
                    state
                        .declared
                        .get(g)
                        .is_some_and(|d| d.service != e.instance.service)
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        if let Some(remover) = self.usurpers.get() {
            // With etcd the instances go from etcd, and so from every view.
            let leases: Vec<i64> = usurpers
                .iter()
                .filter_map(|id| state.instances.get(id).map(|e| e.etcd_lease))
                .collect();
            if !leases.is_empty() && remover.try_send(leases).is_err() {
                tracing::warn!(
                    "instances serving names config declares for another service are not removed yet: the removal queue is full; the next config change tries again"
                );
            }
            return;
        }
        for id in &usurpers {
            let revision = self.remove(&mut state, id, RemovalReason::Unspecified);
            tracing::warn!(instance.id = %id, revision, "instance removed: it serves a gRPC service config now declares for another mesh service");
        }
    }

    fn check_may_register(&self, caller: &SpiffeId, service: &str) -> Result<(), Status> {
        // Only an identity in the registry's own trust domain and namespace
        // names a mesh service (see MeshScope).
        let caller_service = self.scope.service_of(caller);
        if self.read_only.contains(caller.as_str())
            || caller_service.is_some_and(|s| self.read_only.contains(s))
        {
            return Err(Status::permission_denied(format!(
                "{caller} is a read-only identity: it may resolve and watch, not register"
            )));
        }
        if caller_service != Some(service) {
            let scope = &self.scope;
            return Err(match caller_service {
                Some(own) => Status::permission_denied(format!(
                    "{caller} may only register as its own service ({own}), not as {service:?}"
                )),
                None => Status::permission_denied(format!(
                    "{caller} may not register as {service:?}: only spiffe://{}/ns/{}/sa/<service> identities name mesh services here",
                    scope.trust_domain, scope.namespace
                )),
            });
        }
        Ok(())
    }

    /// Refuses a claim on a gRPC service name another identity owns.
    fn check_owned(
        &self,
        state: &State,
        caller: &SpiffeId,
        service: &str,
        grpc: &[String],
    ) -> Result<(), Status> {
        for g in grpc {
            let Some(owner) = state.owner(g) else {
                continue;
            };
            if owner.service() == service {
                continue;
            }
            let why = match owner {
                Owner::Declared(d) => format!("declared in {}", d.file),
                Owner::Claimed(_) => "claimed first while this registry runs".to_owned(),
            };
            return Err(Status::permission_denied(format!(
                "{g} belongs to {} (mesh service {}, {why}); {caller} may not serve it",
                self.scope.identity(owner.service()),
                owner.service()
            )));
        }
        Ok(())
    }

    /// Refuses a registration that would take `caller` over its instance
    /// or name quota. (Registration is as the caller's own service, so the
    /// instances of `service` are the identity's.)
    fn check_quotas(
        &self,
        state: &State,
        caller: &SpiffeId,
        service: &str,
        grpc: &[String],
    ) -> Result<(), Status> {
        let instances = state.per_service.get(service).copied().unwrap_or(0);
        if instances >= self.quotas.instances {
            return Err(quota::exhausted(
                caller.as_str(),
                &format!("already has {instances} registered instances"),
                self.quotas.instances,
                quota::flag::INSTANCES,
                "deregister instances it no longer runs (or let their leases expire)",
            ));
        }
        // Names declared in config are the operator's choice, not claims.
        let new: HashSet<&str> = grpc
            .iter()
            .map(String::as_str)
            .filter(|g| {
                !state.declared.contains_key(*g)
                    && state.claims.get(*g).is_none_or(|s| s != service)
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let held = state
            .claims
            .iter()
            .filter(|(g, s)| *s == service && !state.declared.contains_key(*g))
            .count();
        if held + new.len() > self.quotas.grpc_names {
            let mut new: Vec<&str> = new.into_iter().collect();
            new.sort_unstable();
            return Err(quota::exhausted(
                caller.as_str(),
                &format!(
                    "would hold {} gRPC service names by claim ({held} already, {} new, first {})",
                    held + new.len(),
                    new.len(),
                    new[0]
                ),
                self.quotas.grpc_names,
                quota::flag::GRPC_NAMES,
                "serve fewer gRPC services (a claimed name stays the identity's), or have the names declared in config (grpc_services in <service>.toml; declared names do not count)",
            ));
        }
        Ok(())
    }

    /// Checks a registration's fields and the caller's right to make it
    /// (everything but name ownership and quotas, which depend on the
    /// state), and parses its contract.
    pub(crate) fn prepare(
        &self,
        caller: &SpiffeId,
        req: pb::RegisterRequest,
    ) -> Result<Prepared, Status> {
        let mut violations = FieldViolations::new();
        if let Err(e) = validate::service_name(&req.service) {
            violations.add("service", e);
        }
        if let Err(e) = validate::address(&req.address) {
            violations.add("address", e);
        }
        for (field, value) in [("version", &req.version), ("zone", &req.zone)] {
            if value.len() > validate::MAX_LABEL {
                violations.add(
                    field,
                    format!("must be at most {} bytes", validate::MAX_LABEL),
                );
            }
        }
        if req.grpc_services.len() > validate::MAX_GRPC_SERVICES {
            violations.add(
                "grpc_services",
                format!("at most {} entries", validate::MAX_GRPC_SERVICES),
            );
        }
        for (i, s) in req.grpc_services.iter().enumerate() {
            // Sidecars leave health and reflection out of what they learn
            // through reflection; one given them explicitly is refused.
            if let Err(e) = validate::routable_name(s) {
                violations.add(format!("grpc_services[{i}]"), e);
            }
        }
        check_metadata(&req.metadata, &mut violations);
        if req.health() == ServingStatus::Unspecified {
            violations.add("health", "must be SERVING or NOT_SERVING");
        }
        let ttl = match &req.lease_ttl {
            None => validate::DEFAULT_TTL,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                violations.add("lease_ttl", "must not be negative");
                validate::DEFAULT_TTL
            }
            Some(d) => {
                let ttl = Duration::new(d.seconds as u64, d.nanos as u32);
                if ttl.is_zero() {
                    validate::DEFAULT_TTL
                } else if !(validate::MIN_TTL..=validate::MAX_TTL).contains(&ttl) {
                    violations.add(
                        "lease_ttl",
                        format!(
                            "{ttl:?} is outside {:?}..={:?}",
                            validate::MIN_TTL,
                            validate::MAX_TTL
                        ),
                    );
                    ttl
                } else {
                    ttl
                }
            }
        };
        violations.check()?;
        self.check_may_register(caller, &req.service)?;
        let descriptor_bytes: usize = req.file_descriptors.iter().map(Vec::len).sum();
        if descriptor_bytes > self.quotas.descriptor_bytes {
            return Err(quota::exhausted(
                caller.as_str(),
                &format!("sent a contract (file_descriptors) of {descriptor_bytes} bytes"),
                format_args!("{} bytes", self.quotas.descriptor_bytes),
                quota::flag::DESCRIPTOR_BYTES,
                "register only the files its gRPC services need and their imports",
            ));
        }
        let contract = if req.file_descriptors.is_empty() {
            None
        } else {
            let contract = Contract::parse(&req.file_descriptors, &req.grpc_services)
                .map_err(|e| trellis::status::invalid_field(&e.field, &e.reason))?;
            Some(Arc::new(contract))
        };
        Ok(Prepared { req, ttl, contract })
    }

    /// Refuses names another identity owns, and registrations over quota,
    /// as the view stands now; returns the names whose claim is new (not
    /// held by `service` already).
    pub(crate) fn check_claims(
        &self,
        caller: &SpiffeId,
        service: &str,
        grpc: &[String],
    ) -> Result<Vec<NewClaim>, Status> {
        let state = self.lock();
        self.check_owned(&state, caller, service, grpc)?;
        self.check_quotas(&state, caller, service, grpc)?;
        Ok(grpc
            .iter()
            .filter(|g| state.claims.get(*g).is_none_or(|s| s != service))
            .map(|g| NewClaim {
                name: g.clone(),
                declared: state.declared.contains_key(g),
            })
            .collect())
    }

    /// Registers an instance for `caller`.
    pub fn register(
        &self,
        caller: &SpiffeId,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, Status> {
        let Prepared { req, ttl, contract } = self.prepare(caller, req)?;
        let mut state = self.lock();
        self.check_owned(&state, caller, &req.service, &req.grpc_services)?;
        self.check_quotas(&state, caller, &req.service, &req.grpc_services)?;
        let instance_id = random_id(&req.service);
        let lease_id = random_id("lease");
        let instance = new_instance(caller, instance_id.clone(), req, ttl);
        if let Some(contract) = contract {
            state.contracts.insert(instance.service.clone(), contract);
            self.contracts_version.send_modify(|v| *v += 1);
        }
        let first = state.add(Entry {
            instance: instance.clone(),
            owner: caller.clone(),
            lease_id: lease_id.clone(),
            ttl,
            expires: Instant::now() + ttl,
            mod_revision: 0,
            etcd_lease: 0,
        });
        if first {
            self.serving_changed();
        }
        let revision = self.publish(
            &mut state,
            WatchEventKind::Upsert,
            RemovalReason::Unspecified,
            instance.clone(),
        );
        self.counts.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            instance.id = %instance_id,
            service = %instance.service,
            address = %instance.address,
            identity = %caller,
            revision,
            "instance registered"
        );
        Ok(pb::RegisterResponse {
            instance_id,
            lease_id,
            ttl: Some(proto_duration(ttl)),
            revision,
            instance: Some(instance),
        })
    }

    /// Renews a lease; `Ok(None)` when it is unknown or already expired.
    pub fn renew(&self, caller: &SpiffeId, lease_id: &str) -> Result<Option<Duration>, Status> {
        if lease_id.is_empty() {
            return Err(trellis::status::invalid_field(
                "lease_id",
                "must not be empty",
            ));
        }
        let mut state = self.lock();
        let Some(instance_id) = state.leases.get(lease_id).cloned() else {
            return Ok(None);
        };
        let Some(entry) = state.instances.get_mut(&instance_id) else {
            return Ok(None);
        };
        if entry.owner != *caller {
            return Err(Status::permission_denied(format!(
                "lease {lease_id} belongs to {}, not {caller}",
                entry.owner
            )));
        }
        entry.expires = Instant::now() + entry.ttl;
        entry.instance.lease_expires_at =
            Some(prost_types::Timestamp::from(SystemTime::now() + entry.ttl));
        let ttl = entry.ttl;
        drop(state);
        self.mark_dirty(false);
        Ok(Some(ttl))
    }

    fn owned_entry<'a>(
        state: &'a mut State,
        caller: &SpiffeId,
        instance_id: &str,
    ) -> Result<&'a mut Entry, Status> {
        if instance_id.is_empty() {
            return Err(trellis::status::invalid_field(
                "instance_id",
                "must not be empty",
            ));
        }
        let entry = state.instances.get_mut(instance_id).ok_or_else(|| {
            Status::not_found(format!("no instance {instance_id:?} is registered"))
        })?;
        if entry.owner != *caller {
            return Err(Status::permission_denied(format!(
                "instance {instance_id} belongs to {}, not {caller}",
                entry.owner
            )));
        }
        Ok(entry)
    }

    /// Removes an instance now.
    pub fn deregister(&self, caller: &SpiffeId, instance_id: &str) -> Result<u64, Status> {
        let mut state = self.lock();
        Self::owned_entry(&mut state, caller, instance_id)?;
        let revision = self.remove(&mut state, instance_id, RemovalReason::Deregistered);
        self.counts.deregistrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(instance.id = %instance_id, identity = %caller, revision, "instance deregistered");
        Ok(revision)
    }

    /// Changes an instance's serving status.
    pub fn set_health(
        &self,
        caller: &SpiffeId,
        instance_id: &str,
        health: ServingStatus,
    ) -> Result<u64, Status> {
        if health == ServingStatus::Unspecified {
            return Err(trellis::status::invalid_field(
                "health",
                "must be SERVING or NOT_SERVING",
            ));
        }
        let mut state = self.lock();
        let entry = Self::owned_entry(&mut state, caller, instance_id)?;
        if entry.instance.health() == health {
            return Ok(state.revision);
        }
        let before = entry.instance.clone();
        entry.instance.set_health(health);
        let instance = entry.instance.clone();
        let left = state.unserve(&before);
        let joined = state.serve(&instance);
        if left || joined {
            self.serving_changed();
        }
        let revision = self.publish(
            &mut state,
            WatchEventKind::Upsert,
            RemovalReason::Unspecified,
            instance,
        );
        tracing::info!(instance.id = %instance_id, health = ?health, revision, "instance health changed");
        Ok(revision)
    }

    fn remove(&self, state: &mut State, instance_id: &str, reason: RemovalReason) -> u64 {
        let revision = state.revision + 1;
        self.remove_at(state, instance_id, reason, revision)
    }

    fn remove_at(
        &self,
        state: &mut State,
        instance_id: &str,
        reason: RemovalReason,
        revision: u64,
    ) -> u64 {
        let Some(entry) = state.instances.remove(instance_id) else {
            return state.revision;
        };
        state.leases.remove(&entry.lease_id);
        if state.unserve(&entry.instance) {
            self.serving_changed();
        }
        let last = state.unindex(&entry.instance);
        if last && state.contracts.remove(&entry.instance.service).is_some() {
            self.contracts_version.send_modify(|v| *v += 1);
        }
        self.publish_at(
            state,
            revision,
            WatchEventKind::Remove,
            reason,
            entry.instance,
        )
    }

    /// Removes every instance whose lease has run out; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let expired: Vec<String> = state
            .instances
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            let revision = self.remove(&mut state, id, RemovalReason::LeaseExpired);
            tracing::info!(instance.id = %id, revision, "lease expired; instance removed");
        }
        self.counts
            .lease_expiries
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        expired.len()
    }

    /// Sweeps expired leases until the registry is dropped.
    pub fn spawn_expiry(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.expire(Instant::now());
            }
        })
    }

    /// The instances serving `target` (a mesh or gRPC service name).
    pub fn resolve(&self, target: &str) -> Result<pb::ResolveResponse, Status> {
        if target.is_empty() {
            return Err(trellis::status::invalid_field(
                "target",
                "must not be empty",
            ));
        }
        let state = self.lock();
        let targets = [target.to_owned()];
        let instances: Vec<pb::Instance> = state.matching(&targets).cloned().collect();
        let Some(first) = instances.first() else {
            return Err(Status::not_found(format!(
                "no registered instance serves {target:?}"
            )));
        };
        Ok(pb::ResolveResponse {
            service: first.service.clone(),
            instances,
            revision: state.revision,
        })
    }

    /// Every mesh service with at least one instance, sorted by name.
    pub fn list_services(&self) -> pb::ListServicesResponse {
        let state = self.lock();
        let mut services: BTreeMap<&str, pb::ServiceSummary> = BTreeMap::new();
        for e in state.instances.values() {
            let summary = services
                .entry(e.instance.service.as_str())
                .or_insert_with(|| pb::ServiceSummary {
                    name: e.instance.service.clone(),
                    ..Default::default()
                });
            summary.instance_count += 1;
            if e.instance.health() == ServingStatus::Serving {
                summary.serving_instance_count += 1;
            }
            for g in &e.instance.grpc_services {
                if !summary.grpc_services.contains(g) {
                    summary.grpc_services.push(g.clone());
                }
            }
        }
        let mut services: Vec<_> = services.into_values().collect();
        for s in &mut services {
            s.grpc_services.sort();
        }
        pb::ListServicesResponse {
            services,
            revision: state.revision,
        }
    }

    /// The registered file defining `symbol`, with its dependencies, and the
    /// mesh service that registered it.
    ///
    /// Any upload may carry other services' files (imports), so who may
    /// answer is decided by ownership: a file that defines a gRPC service
    /// with an owner is answered only from the owner's contract; a service
    /// or method nobody owns is not answered at all (it is not routable);
    /// other symbols (messages, enums) from any contract whose file defines
    /// no owned service, first by mesh service name.
    pub fn file_containing(&self, symbol: &str) -> Option<(String, Vec<Bytes>)> {
        let state = self.lock();
        let mut contracts: Vec<_> = state.contracts.iter().collect();
        contracts.sort_by(|a, b| a.0.cmp(b.0));
        let mut fallback = None;
        for (service, c) in contracts {
            let Some(found) = c.locate(symbol) else {
                continue;
            };
            let owners: Vec<&str> = found
                .file_services
                .iter()
                .filter_map(|s| state.owner(s).map(|o| o.service()))
                .collect();
            if owners.contains(&service.as_str()) {
                return c.file_containing(symbol).map(|f| (service.clone(), f));
            }
            if owners.is_empty() && !found.is_service && fallback.is_none() {
                fallback = c.file_containing(symbol).map(|f| (service.clone(), f));
            }
        }
        fallback
    }

    /// The files defining gRPC service `grpc`, from its owner's contract.
    pub fn service_descriptors(&self, grpc: &str) -> Option<(String, Vec<Bytes>)> {
        let state = self.lock();
        let owner = state.owner(grpc)?.service().to_owned();
        let contract = state.contracts.get(&owner)?;
        if !contract.has_method(grpc, None) {
            return None;
        }
        contract.file_containing(grpc).map(|f| (owner, f))
    }

    /// Every change from now on (for xDS, which re-reads the view on each).
    pub fn changes(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Every registered instance, whatever its health.
    pub fn instances(&self) -> Vec<pb::Instance> {
        self.lock().matching(&[]).cloned().collect()
    }

    /// Subscribes to changes and takes a snapshot of `targets`, atomically.
    fn subscribe(
        &self,
        targets: &[String],
    ) -> (broadcast::Receiver<Arc<Change>>, pb::WatchResponse) {
        let state = self.lock();
        let rx = self.changes.subscribe();
        (rx, Self::snapshot(&state, targets, false))
    }

    fn snapshot(state: &State, targets: &[String], resync: bool) -> pb::WatchResponse {
        pb::WatchResponse {
            revision: state.revision,
            kind: WatchEventKind::Snapshot as i32,
            instances: state.matching(targets).cloned().collect(),
            removal_reason: RemovalReason::Unspecified as i32,
            resync,
        }
    }

    /// Streams a snapshot of `targets` and then every change to them, for
    /// `caller`, within its watch quota.
    pub fn watch(
        self: &Arc<Self>,
        caller: &SpiffeId,
        targets: Vec<String>,
    ) -> Result<ReceiverStream<Result<pb::WatchResponse, Status>>, Status> {
        let permit = self.admit_watch(caller)?;
        let (tx, out) = mpsc::channel(16);
        let (mut rx, first) = self.subscribe(&targets);
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            // Held while the stream is served.
            let _permit = permit;
            // Changes up to the last snapshot's revision are in it.
            let mut floor = first.revision;
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let received = tokio::select! {
                    r = rx.recv() => r,
                    () = tx.closed() => return,
                };
                let response = match received.as_deref() {
                    Ok(Change::Instance {
                        revision,
                        kind,
                        reason,
                        instance,
                    }) => {
                        if *revision <= floor
                            || !(targets.is_empty()
                                || targets.iter().any(|t| State::serves(instance, t)))
                        {
                            continue;
                        }
                        pb::WatchResponse {
                            revision: *revision,
                            kind: *kind as i32,
                            instances: vec![(**instance).clone()],
                            removal_reason: *reason as i32,
                            resync: false,
                        }
                    }
                    Ok(Change::Lost(why)) => {
                        let _ = tx.send(Err(Status::unavailable(why.clone()))).await;
                        return;
                    }
                    // The view was replaced, or this watcher fell too far
                    // behind: a fresh snapshot, then changes after it.
                    Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let Some(registry) = registry.upgrade() else {
                            return;
                        };
                        let snapshot = Self::snapshot(&registry.lock(), &targets, true);
                        if let Err(broadcast::error::RecvError::Lagged(missed)) = &received {
                            tracing::debug!(
                                missed,
                                revision = snapshot.revision,
                                "slow watcher resynced"
                            );
                        }
                        floor = snapshot.revision;
                        snapshot
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(out))
    }
}

impl Entry {
    /// An instance as a replicated store holds it.
    pub(crate) fn stored(
        instance: pb::Instance,
        owner: SpiffeId,
        lease_id: String,
        ttl: Duration,
        mod_revision: i64,
        etcd_lease: i64,
    ) -> Self {
        Self {
            instance,
            owner,
            lease_id,
            ttl,
            // Unused: etcd expires its own leases.
            expires: Instant::now() + ttl,
            mod_revision,
            etcd_lease,
        }
    }
}

/// A gRPC service name a registration claims for the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewClaim {
    pub(crate) name: String,
    /// Config declares it for the registering service: no earlier claim
    /// stands against it.
    pub(crate) declared: bool,
}

/// One change read from a replicated store, applied to the view.
#[derive(Debug)]
pub(crate) enum ViewEvent {
    /// An instance was written (registered, or its health changed).
    Instance { revision: u64, entry: Box<Entry> },
    /// An instance key went.
    Removed {
        revision: u64,
        instance_id: String,
        reason: RemovalReason,
    },
    /// A gRPC service name was claimed by a mesh service.
    Claim { grpc: String, service: String },
    /// A mesh service's contract was written.
    Contract {
        service: String,
        contract: Arc<Contract>,
    },
}

/// The view of a replicated store (etcd): what the store holds, applied in
/// its order, under the same lock and publishing as the embedded store.
impl Registry {
    /// Follows whether the registry may serve its view.
    pub fn availability(&self) -> watch::Receiver<Availability> {
        self.available.subscribe()
    }

    /// Says whether the view is in step with the store; losing it ends
    /// every watch, so proxies turn to another replica.
    pub(crate) fn set_availability(&self, now: Availability) {
        let lost = match &now {
            Availability::Unavailable(why) => Some(why.clone()),
            Availability::Serving => None,
        };
        let changed = self.available.send_if_modified(|current| {
            let changed = *current != now;
            *current = now;
            changed
        });
        if changed {
            match lost {
                Some(why) => {
                    tracing::warn!(reason = %why, "registry not serving");
                    let _ = self.changes.send(Arc::new(Change::Lost(why)));
                }
                None => tracing::info!("registry serving: in step with its store"),
            }
        }
    }

    /// Starts out not serving (until a replicated store is read).
    pub(crate) fn start_unavailable(&self, why: String) {
        self.available.send_replace(Availability::Unavailable(why));
    }

    /// UNAVAILABLE (with why) when the view may not be served.
    pub fn check_available(&self) -> Result<(), Status> {
        match &*self.available.borrow() {
            Availability::Serving => Ok(()),
            Availability::Unavailable(why) => Err(Status::unavailable(why.clone())),
        }
    }

    /// Where instances serving names config gives another service are
    /// sent for removal from the store (by lease), instead of being
    /// removed from this view alone.
    pub(crate) fn remove_usurpers_with(&self, remover: mpsc::Sender<Vec<i64>>) {
        let _ = self.usurpers.set(remover);
    }

    /// The view's revision.
    pub(crate) fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// The instance holding lease `lease_id`.
    pub(crate) fn lease_holder(&self, lease_id: &str) -> Option<Entry> {
        let state = self.lock();
        let id = state.leases.get(lease_id)?;
        state.instances.get(id).cloned()
    }

    /// Instance `instance_id`, if `caller` registered it.
    pub(crate) fn owned(&self, caller: &SpiffeId, instance_id: &str) -> Result<Entry, Status> {
        let mut state = self.lock();
        Self::owned_entry(&mut state, caller, instance_id).map(|e| e.clone())
    }

    pub(crate) fn count_registration(&self) {
        self.counts.registrations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_deregistration(&self) {
        self.counts.deregistrations.fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces the view with what the store holds at `revision`, and
    /// sends every watcher a fresh snapshot.
    pub(crate) fn replace_view(
        &self,
        revision: u64,
        entries: Vec<Entry>,
        claims: HashMap<String, String>,
        contracts: HashMap<String, Arc<Contract>>,
    ) {
        let mut state = self.lock();
        let declared = std::mem::take(&mut state.declared);
        *state = State {
            revision,
            declared,
            claims,
            ..State::default()
        };
        for entry in entries {
            state.add(entry);
        }
        // A contract goes with its service's last instance.
        state.contracts = contracts
            .into_iter()
            .filter(|(service, _)| state.per_service.contains_key(service))
            .collect();
        self.contracts_version.send_modify(|v| *v += 1);
        self.serving_changed();
        let _ = self.changes.send(Arc::new(Change::Resync));
    }

    /// Applies changes read from the store, in its order, through its
    /// revision `through` (changes outside the registry's keys move etcd's
    /// revision too).
    pub(crate) fn apply(&self, events: Vec<ViewEvent>, through: u64) {
        let mut state = self.lock();
        for event in events {
            match event {
                ViewEvent::Claim { grpc, service } => {
                    state.claims.insert(grpc, service);
                }
                ViewEvent::Contract { service, contract } => {
                    state.contracts.insert(service, contract);
                    self.contracts_version.send_modify(|v| *v += 1);
                }
                ViewEvent::Instance { revision, entry } => {
                    let instance = entry.instance.clone();
                    // An update replaces the entry whole: out, then in.
                    let left = match state.instances.remove(&instance.instance_id) {
                        Some(old) => {
                            state.leases.remove(&old.lease_id);
                            state.unindex(&old.instance);
                            state.unserve(&old.instance)
                        }
                        None => false,
                    };
                    let joined = state.add(*entry);
                    if left || joined {
                        self.serving_changed();
                    }
                    self.publish_at(
                        &mut state,
                        revision,
                        WatchEventKind::Upsert,
                        RemovalReason::Unspecified,
                        instance,
                    );
                }
                ViewEvent::Removed {
                    revision,
                    instance_id,
                    reason,
                } => {
                    if reason == RemovalReason::LeaseExpired
                        && state.instances.contains_key(&instance_id)
                    {
                        self.counts.lease_expiries.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(instance.id = %instance_id, revision, "lease expired; instance removed");
                    }
                    self.remove_at(&mut state, &instance_id, reason, revision);
                }
            }
        }
        state.revision = state.revision.max(through);
    }
}

fn check_metadata(metadata: &HashMap<String, String>, violations: &mut FieldViolations) {
    if metadata.len() > validate::MAX_METADATA_ENTRIES {
        violations.add(
            "metadata",
            format!(
                "{} entries; at most {} allowed",
                metadata.len(),
                validate::MAX_METADATA_ENTRIES
            ),
        );
        return;
    }
    let mut total = 0;
    for (k, v) in metadata {
        total += k.len() + v.len();
        if k.is_empty() || k.len() > validate::MAX_METADATA_KEY {
            violations.add(
                format!("metadata[{k:?}]"),
                format!("keys must be 1 to {} bytes", validate::MAX_METADATA_KEY),
            );
        } else if v.len() > validate::MAX_METADATA_VALUE {
            violations.add(
                format!("metadata[{k:?}]"),
                format!(
                    "value of {} bytes; at most {} allowed",
                    v.len(),
                    validate::MAX_METADATA_VALUE
                ),
            );
        }
    }
    if total > validate::MAX_METADATA_TOTAL {
        violations.add(
            "metadata",
            format!(
                "{total} bytes in all; at most {} allowed",
                validate::MAX_METADATA_TOTAL
            ),
        );
    }
}

/// The gRPC face of the registry.
#[derive(Debug, Clone)]
pub struct RegistryApi {
    registry: Arc<Registry>,
    /// With etcd: where writes go (reads are served from the view).
    replicated: Option<Arc<Replicated>>,
}

impl RegistryApi {
    /// Serves `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            replicated: None,
        }
    }

    /// Serves a registry replicated on etcd: writes go to etcd.
    pub fn replicated(replicated: Arc<Replicated>) -> Self {
        Self {
            registry: replicated.registry().clone(),
            replicated: Some(replicated),
        }
    }

    async fn renew(&self, caller: &SpiffeId, lease_id: &str) -> Result<Option<Duration>, Status> {
        match &self.replicated {
            Some(r) => r.renew(caller, lease_id).await,
            None => self.registry.renew(caller, lease_id),
        }
    }
}

fn caller<T>(request: &Request<T>) -> Result<SpiffeId, Status> {
    Ok(peer_identity(request)?.id.clone())
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = caller(&request)?;
        match &self.replicated {
            Some(r) => r.register(&caller, request.into_inner()).await,
            None => self.registry.register(&caller, request.into_inner()),
        }
        .map(Response::new)
    }

    type KeepAliveStream = ReceiverStream<Result<pb::KeepAliveResponse, Status>>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let caller = caller(&request)?;
        let mut inbound = request.into_inner();
        let api = self.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    () = tx.closed() => return,
                };
                let reply =
                    match next {
                        Ok(Some(ping)) => api.renew(&caller, &ping.lease_id).await.map(|ttl| {
                            pb::KeepAliveResponse {
                                lease_id: ping.lease_id,
                                ttl: Some(proto_duration(ttl.unwrap_or_default())),
                            }
                        }),
                        Ok(None) | Err(_) => return,
                    };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let caller = caller(&request)?;
        let lease_id = request.into_inner().lease_id;
        match self.renew(&caller, &lease_id).await? {
            Some(ttl) => Ok(Response::new(pb::RenewLeaseResponse {
                lease_id,
                ttl: Some(proto_duration(ttl)),
            })),
            None => Err(Status::not_found(format!(
                "lease {lease_id:?} is unknown or has expired; register again"
            ))),
        }
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let caller = caller(&request)?;
        let instance_id = request.into_inner().instance_id;
        let revision = match &self.replicated {
            Some(r) => r.deregister(&caller, &instance_id).await?,
            None => self.registry.deregister(&caller, &instance_id)?,
        };
        Ok(Response::new(pb::DeregisterResponse { revision }))
    }

    async fn set_health(
        &self,
        request: Request<pb::SetHealthRequest>,
    ) -> Result<Response<pb::SetHealthResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let revision = match &self.replicated {
            Some(r) => {
                r.set_health(&caller, &req.instance_id, req.health())
                    .await?
            }
            None => self
                .registry
                .set_health(&caller, &req.instance_id, req.health())?,
        };
        Ok(Response::new(pb::SetHealthResponse { revision }))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        caller(&request)?;
        self.registry.check_available()?;
        self.registry
            .resolve(&request.into_inner().target)
            .map(Response::new)
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = caller(&request)?;
        self.registry.check_available()?;
        let targets = request.into_inner().targets;
        for (i, t) in targets.iter().enumerate() {
            if t.is_empty() {
                return Err(trellis::status::invalid_field(
                    &format!("targets[{i}]"),
                    "must not be empty",
                ));
            }
        }
        Ok(Response::new(self.registry.watch(&caller, targets)?))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        caller(&request)?;
        self.registry.check_available()?;
        Ok(Response::new(self.registry.list_services()))
    }

    async fn get_file_containing(
        &self,
        request: Request<pb::GetFileContainingRequest>,
    ) -> Result<Response<pb::GetFileContainingResponse>, Status> {
        caller(&request)?;
        self.registry.check_available()?;
        let symbol = request.into_inner().symbol;
        if symbol.is_empty() {
            return Err(trellis::status::invalid_field(
                "symbol",
                "must not be empty",
            ));
        }
        let (service, files) = self.registry.file_containing(&symbol).ok_or_else(|| {
            Status::not_found(format!("no registered contract defines {symbol:?}"))
        })?;
        Ok(Response::new(pb::GetFileContainingResponse {
            service,
            file_descriptors: files.into_iter().map(|b| b.to_vec()).collect(),
        }))
    }

    async fn get_service_descriptors(
        &self,
        request: Request<pb::GetServiceDescriptorsRequest>,
    ) -> Result<Response<pb::GetServiceDescriptorsResponse>, Status> {
        caller(&request)?;
        self.registry.check_available()?;
        let name = request.into_inner().grpc_service;
        if let Err(e) = validate::qualified_name(&name) {
            return Err(trellis::status::invalid_field("grpc_service", &e));
        }
        let (service, files) = self.registry.service_descriptors(&name).ok_or_else(|| {
            Status::not_found(format!(
                "gRPC service {name} is not registered, or was registered without descriptors"
            ))
        })?;
        Ok(Response::new(pb::GetServiceDescriptorsResponse {
            service,
            file_descriptors: files.into_iter().map(|b| b.to_vec()).collect(),
        }))
    }
}
