//! The registry replicated on etcd (`--store etcd://…`).
//!
//! etcd holds the mesh; every replica holds only a view of it, fed by one
//! etcd watch, and serves reads and watches from that view with the same
//! code as the embedded store. Writes go to etcd as transactions, so two
//! replicas racing on one claim are decided by etcd, never by timing:
//!
//! - `i/<instance id>`: the instance (a [`StoredInstance`]), attached to
//!   an etcd lease: the registry lease *is* the etcd lease, renewed through
//!   any replica and expired by etcd.
//! - `c/<gRPC service name>`: the mesh service that claimed the name.
//!   A first claim requires the key to be absent.
//! - `k/<mesh service>`: the service's contract (a [`StoredContract`]).
//! - `g/<instance id>`: written with an instance's removal by
//!   Deregister, so every view tells a deregistration from an expiry.
//!
//! Revisions are etcd's: the same on every replica, so a proxy moving from
//! one replica to another compares like with like. A replica that loses
//! etcd (its watch ends and cannot be opened again) turns NOT_SERVING, ends
//! every watch with UNAVAILABLE and refuses calls until it has read etcd
//! again; proxies keep routing from their last view meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;
use trellis::SpiffeId;
use trellis::pb::trellis::registry::v1 as pb;
use trellis::pb::trellis::registry::v1::{RemovalReason, ServingStatus};

use crate::contracts::Contract;
use crate::etcd::pb::etcdserverpb as rpc;
use crate::etcd::pb::mvccpb;
use crate::etcd::{Etcd, StoreUrl, prefix_end};
use crate::proto_duration;
use crate::registry::{
    Availability, Entry, MeshScope, Prepared, Registry, ViewEvent, new_instance, random_id,
};
use crate::store::{StoredContract, StoredInstance};

/// Keys read per page when the whole view is (re)loaded.
const LOAD_PAGE: i64 = 64;
/// How long a write waits to see itself in this replica's view.
const SEE_OWN_WRITE: Duration = Duration::from_secs(3);
/// Transactions tried before a registration that keeps racing gives up.
const ATTEMPTS: usize = 3;
/// Retry pace while etcd cannot be read.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A watch that breaks again this soon after the last break means etcd
/// is not there to follow (e.g. no member has a leader).
const BROKEN_AGAIN: Duration = Duration::from_secs(1);
/// Removals of instances whose names config gives another service, queued.
const USURPER_QUEUE: usize = 16;

/// The keys of one mesh (trust domain and namespace) under the store's
/// prefix.
#[derive(Debug, Clone)]
struct Keys {
    root: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Instance,
    Claim,
    Contract,
    Gone,
}

impl Keys {
    fn new(url: &StoreUrl, scope: &MeshScope) -> Self {
        Self {
            root: format!(
                "{}/registry/{}/{}/",
                url.prefix, scope.trust_domain, scope.namespace
            ),
        }
    }

    fn key(&self, kind: Kind, name: &str) -> Vec<u8> {
        let tag = match kind {
            Kind::Instance => "i",
            Kind::Claim => "c",
            Kind::Contract => "k",
            Kind::Gone => "g",
        };
        format!("{}{tag}/{name}", self.root).into_bytes()
    }

    fn parse<'a>(&self, key: &'a [u8]) -> Option<(Kind, &'a str)> {
        let rest = key.strip_prefix(self.root.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (tag, name) = rest.split_once('/')?;
        let kind = match tag {
            "i" => Kind::Instance,
            "c" => Kind::Claim,
            "k" => Kind::Contract,
            "g" => Kind::Gone,
            _ => return None,
        };
        Some((kind, name))
    }

    fn range(&self) -> (Vec<u8>, Vec<u8>) {
        let start = self.root.clone().into_bytes();
        let end = prefix_end(&start);
        (start, end)
    }
}

/// The registry lease id for etcd lease `id`.
fn lease_name(id: i64) -> String {
    format!("lease-{:016x}", id as u64)
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> rpc::RequestOp {
    rpc::RequestOp {
        request: Some(rpc::request_op::Request::RequestPut(rpc::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> rpc::RequestOp {
    rpc::RequestOp {
        request: Some(rpc::request_op::Request::RequestDeleteRange(
            rpc::DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

fn compare(key: Vec<u8>, target: rpc::compare::TargetUnion) -> rpc::Compare {
    use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
    let kind = match &target {
        TargetUnion::Version(_) => CompareTarget::Version,
        TargetUnion::CreateRevision(_) => CompareTarget::Create,
        TargetUnion::ModRevision(_) => CompareTarget::Mod,
        TargetUnion::Value(_) => CompareTarget::Value,
        TargetUnion::Lease(_) => CompareTarget::Lease,
    };
    rpc::Compare {
        result: CompareResult::Equal as i32,
        target: kind as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(target),
    }
}

fn revision_of(header: Option<&rpc::ResponseHeader>) -> u64 {
    header.map_or(0, |h| h.revision.max(0) as u64)
}

/// A refusal by etcd that the operator can act on, or UNAVAILABLE.
fn store_error(status: Status) -> Status {
    let message = status.message();
    if message.contains("too many operations") {
        Status::invalid_argument(format!(
            "etcd refused the write: {message}; register fewer gRPC services at once, or raise etcd's --max-txn-ops"
        ))
    } else if message.contains("request is too large") {
        Status::resource_exhausted(format!(
            "etcd refused the write: {message}; etcd's --max-request-bytes must be above the registry's --max-descriptor-bytes-per-identity"
        ))
    } else {
        status
    }
}

/// The registry's writes to etcd and the feed of its view.
#[derive(Debug)]
pub struct Replicated {
    registry: Arc<Registry>,
    etcd: Arc<Etcd>,
    keys: Keys,
    /// The last etcd revision applied to the view.
    applied: watch::Sender<u64>,
    store: String,
}

impl Replicated {
    /// Replicates `registry` (new and empty) on the etcd cluster at `url`;
    /// it is unavailable until [`Replicated::spawn_feed`] has read etcd.
    pub fn new(
        registry: Arc<Registry>,
        scope: &MeshScope,
        url: &StoreUrl,
    ) -> Result<Arc<Self>, String> {
        let etcd = Etcd::new(url)?;
        registry.start_unavailable(format!("the registry has not read its store ({url}) yet"));
        Ok(Arc::new(Self {
            registry,
            etcd,
            keys: Keys::new(url, scope),
            applied: watch::channel(0).0,
            store: url.to_string(),
        }))
    }

    /// The view.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Feeds the view from etcd until the task is aborted: reads it all,
    /// then follows its changes; reads it all again after losing it.
    /// Also removes, from etcd, instances config takes names from.
    pub fn spawn_feed(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::channel::<Vec<i64>>(USURPER_QUEUE);
        self.registry.remove_usurpers_with(tx);
        let this = self.clone();
        let remover = tokio::spawn(async move {
            while let Some(leases) = rx.recv().await {
                for lease in leases {
                    if let Err(e) = this.etcd.revoke(lease).await {
                        tracing::warn!(lease = %lease_name(lease), error = %e.message(), "cannot remove an instance serving a name config declares for another service");
                    }
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let _remover = AbortOnDrop(remover);
            this.feed().await;
        })
    }

    async fn feed(&self) {
        let mut backoff = RETRY_MIN;
        loop {
            let revision = match self.load().await {
                Ok(revision) => revision,
                Err(status) => {
                    self.registry
                        .set_availability(Availability::Unavailable(format!(
                            "the registry cannot read its store ({}): {}; retrying",
                            self.store,
                            status.message()
                        )));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            };
            backoff = RETRY_MIN;
            self.registry.set_availability(Availability::Serving);
            let mut from = revision + 1;
            let mut last_break: Option<std::time::Instant> = None;
            // Follow etcd; a broken watch is opened again at once (on
            // another member if need be) from where it stopped. Only when
            // it cannot be (or breaks again at once: no member has a
            // leader) is the replica out of step.
            loop {
                let lost = match self.follow(from).await {
                    Ended::Broken(status)
                        if last_break.is_none_or(|at| at.elapsed() >= BROKEN_AGAIN) =>
                    {
                        tracing::info!(error = %status.message(), "etcd watch broke; resuming");
                        last_break = Some(std::time::Instant::now());
                        from = *self.applied.borrow() + 1;
                        continue;
                    }
                    Ended::Compacted(at) => {
                        tracing::warn!(
                            compacted = at,
                            "etcd compacted past the view's revision; reading it all again"
                        );
                        break;
                    }
                    Ended::Broken(status) | Ended::Unreachable(status) => status,
                };
                self.registry
                    .set_availability(Availability::Unavailable(format!(
                        "the registry lost its store ({}): {}; retrying",
                        self.store,
                        lost.message()
                    )));
                tokio::time::sleep(backoff).await;
                break;
            }
        }
    }

    /// Reads every key at one revision and replaces the view with it.
    async fn load(&self) -> Result<u64, Status> {
        let (start, end) = self.keys.range();
        let mut key = start;
        let mut at = 0;
        let mut entries = Vec::new();
        let mut claims = HashMap::new();
        let mut contracts = HashMap::new();
        loop {
            let page = self
                .etcd
                .range(rpc::RangeRequest {
                    key: key.clone(),
                    range_end: end.clone(),
                    limit: LOAD_PAGE,
                    revision: at,
                    ..Default::default()
                })
                .await?;
            if at == 0 {
                at = page.header.as_ref().map_or(0, |h| h.revision);
            }
            for kv in &page.kvs {
                match self.decode(kv) {
                    Some(ViewEvent::Instance { entry, .. }) => entries.push(*entry),
                    Some(ViewEvent::Claim { grpc, service }) => {
                        claims.insert(grpc, service);
                    }
                    Some(ViewEvent::Contract { service, contract }) => {
                        contracts.insert(service, contract);
                    }
                    Some(ViewEvent::Removed { .. }) | None => {}
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    key = last.key.clone();
                    key.push(0);
                }
                _ => break,
            }
        }
        let revision = at.max(0) as u64;
        tracing::info!(
            store = %self.store,
            revision,
            instances = entries.len(),
            names = claims.len(),
            contracts = contracts.len(),
            "registry view read from etcd"
        );
        self.registry
            .replace_view(revision, entries, claims, contracts);
        self.applied.send_replace(revision);
        Ok(revision)
    }

    /// A key's current value as a change to the view (`None`: not one of
    /// ours, or unreadable, which is logged).
    fn decode(&self, kv: &mvccpb::KeyValue) -> Option<ViewEvent> {
        let (kind, name) = self.keys.parse(&kv.key)?;
        let revision = kv.mod_revision.max(0) as u64;
        let event = match kind {
            Kind::Instance => {
                let stored = StoredInstance::decode(kv.value.as_slice());
                let entry = stored.map_err(|e| e.to_string()).and_then(|s| {
                    let instance = s.instance.ok_or("no instance record")?;
                    let owner = SpiffeId::parse(&s.owner).map_err(|e| e.to_string())?;
                    Ok(Entry::stored(
                        instance,
                        owner,
                        s.lease_id,
                        Duration::from_millis(s.ttl_ms),
                        kv.mod_revision,
                        kv.lease,
                    ))
                });
                match entry {
                    Ok(entry) => ViewEvent::Instance {
                        revision,
                        entry: Box::new(entry),
                    },
                    Err(e) => {
                        tracing::error!(key = %String::from_utf8_lossy(&kv.key), error = %e, "unreadable instance in etcd; ignored");
                        return None;
                    }
                }
            }
            Kind::Claim => ViewEvent::Claim {
                grpc: name.to_owned(),
                service: String::from_utf8_lossy(&kv.value).into_owned(),
            },
            Kind::Contract => {
                let parsed = StoredContract::decode(kv.value.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|c| Contract::parse(&c.files, &[]).map_err(|e| e.reason));
                match parsed {
                    Ok(contract) => ViewEvent::Contract {
                        service: name.to_owned(),
                        contract: Arc::new(contract),
                    },
                    Err(e) => {
                        tracing::error!(service = name, error = %e, "unreadable contract in etcd; ignored");
                        return None;
                    }
                }
            }
            Kind::Gone => return None,
        };
        Some(event)
    }

    /// Follows etcd's changes from revision `from` until the watch ends.
    async fn follow(&self, from: u64) -> Ended {
        let (key, range_end) = self.keys.range();
        let mut stream = match self
            .etcd
            .watch(rpc::WatchCreateRequest {
                key,
                range_end,
                start_revision: from as i64,
                ..Default::default()
            })
            .await
        {
            Ok(stream) => stream,
            Err(status) => return Ended::Unreachable(status),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ended::Broken(Status::unavailable("etcd ended the watch")),
                Err(status) => return Ended::Broken(status),
            };
            if response.compact_revision > 0 {
                return Ended::Compacted(response.compact_revision);
            }
            if response.canceled {
                return Ended::Broken(Status::unavailable(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason
                )));
            }
            if response.events.is_empty() {
                continue;
            }
            self.apply(response.events);
        }
    }

    /// Applies one watch response's events, in revision order; within one
    /// revision names and contracts before the instance that uses them.
    fn apply(&self, events: Vec<mvccpb::Event>) {
        let gone: Vec<(i64, String)> = events
            .iter()
            .filter(|e| e.r#type == mvccpb::event::EventType::Put as i32)
            .filter_map(|e| e.kv.as_ref())
            .filter_map(|kv| match self.keys.parse(&kv.key) {
                Some((Kind::Gone, id)) => Some((kv.mod_revision, id.to_owned())),
                _ => None,
            })
            .collect();
        let mut last = 0;
        let mut changes: Vec<(i64, u8, ViewEvent)> = Vec::with_capacity(events.len());
        for event in events {
            let Some(kv) = event.kv else { continue };
            last = last.max(kv.mod_revision);
            let deleted = event.r#type == mvccpb::event::EventType::Delete as i32;
            if deleted {
                if let Some((Kind::Instance, id)) = self.keys.parse(&kv.key) {
                    let reason = if gone.iter().any(|(r, g)| *r == kv.mod_revision && g == id) {
                        RemovalReason::Deregistered
                    } else {
                        RemovalReason::LeaseExpired
                    };
                    changes.push((
                        kv.mod_revision,
                        1,
                        ViewEvent::Removed {
                            revision: kv.mod_revision.max(0) as u64,
                            instance_id: id.to_owned(),
                            reason,
                        },
                    ));
                }
                continue;
            }
            if let Some(change) = self.decode(&kv) {
                let rank = u8::from(matches!(change, ViewEvent::Instance { .. }));
                changes.push((kv.mod_revision, rank, change));
            }
        }
        changes.sort_by_key(|(revision, rank, _)| (*revision, *rank));
        let last = last.max(0) as u64;
        self.registry
            .apply(changes.into_iter().map(|(_, _, c)| c).collect(), last);
        self.applied.send_if_modified(|applied| {
            let moved = last > *applied;
            *applied = (*applied).max(last);
            moved
        });
    }

    /// Waits until the view has applied `revision`.
    async fn see(&self, revision: u64) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(SEE_OWN_WRITE, applied.wait_for(|a| *a >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Brings the view up to etcd's latest write of the registry's keys
    /// (another replica's registration, say).
    async fn catch_up(&self) -> Result<(), Status> {
        let (key, range_end) = self.keys.range();
        let latest = self
            .etcd
            .range(rpc::RangeRequest {
                key,
                range_end,
                limit: 1,
                sort_order: rpc::range_request::SortOrder::Descend as i32,
                sort_target: rpc::range_request::SortTarget::Mod as i32,
                keys_only: true,
                ..Default::default()
            })
            .await?;
        let revision = latest
            .kvs
            .first()
            .map_or(0, |kv| kv.mod_revision.max(0) as u64);
        if self.see(revision).await {
            Ok(())
        } else {
            Err(Status::unavailable(format!(
                "this registry replica is behind its store ({}); try again or use another replica",
                self.store
            )))
        }
    }

    /// Registers an instance for `caller`.
    pub async fn register(
        &self,
        caller: &SpiffeId,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, Status> {
        self.registry.check_available()?;
        let prepared = self.registry.prepare(caller, req)?;
        let (lease, ttl) = self.etcd.grant(prepared.ttl).await?;
        let registered = self.commit(caller, prepared, lease, ttl).await;
        if registered.is_err()
            && let Err(e) = self.etcd.revoke(lease).await
        {
            tracing::debug!(error = %e.message(), "unused lease not revoked; it expires");
        }
        registered
    }

    async fn commit(
        &self,
        caller: &SpiffeId,
        prepared: Prepared,
        lease: i64,
        ttl: Duration,
    ) -> Result<pb::RegisterResponse, Status> {
        let Prepared { req, contract, .. } = prepared;
        let instance_id = random_id(&req.service);
        let lease_id = lease_name(lease);
        let mut instance = new_instance(caller, instance_id.clone(), req, ttl);
        // etcd holds the lease and its expiry; renewals through any
        // replica move it, unseen by the others' views.
        instance.lease_expires_at = None;
        let record = StoredInstance {
            instance: Some(instance.clone()),
            owner: caller.to_string(),
            lease_id: lease_id.clone(),
            ttl_ms: ttl.as_millis() as u64,
        }
        .encode_to_vec();
        let service = instance.service.clone();
        let contract = contract.map(|c| {
            StoredContract {
                service: service.clone(),
                files: c.registered_files().iter().map(|b| b.to_vec()).collect(),
            }
            .encode_to_vec()
        });
        for _ in 0..ATTEMPTS {
            let claims = self
                .registry
                .check_claims(caller, &service, &instance.grpc_services)?;
            let instance_key = self.keys.key(Kind::Instance, &instance_id);
            let mut compares = vec![compare(
                instance_key.clone(),
                rpc::compare::TargetUnion::Version(0),
            )];
            let mut ops = vec![put(instance_key, record.clone(), lease)];
            for claim in &claims {
                let key = self.keys.key(Kind::Claim, &claim.name);
                if !claim.declared {
                    // A first claim: nobody may have made one meanwhile.
                    compares.push(compare(key.clone(), rpc::compare::TargetUnion::Version(0)));
                }
                ops.push(put(key, service.clone().into_bytes(), 0));
            }
            // A name the view says is ours must still be ours.
            for g in &instance.grpc_services {
                if !claims.iter().any(|c| &c.name == g) {
                    compares.push(compare(
                        self.keys.key(Kind::Claim, g),
                        rpc::compare::TargetUnion::Value(service.clone().into_bytes()),
                    ));
                }
            }
            if let Some(contract) = &contract {
                ops.push(put(
                    self.keys.key(Kind::Contract, &service),
                    contract.clone(),
                    0,
                ));
            }
            let done = self
                .etcd
                .txn(rpc::TxnRequest {
                    compare: compares,
                    success: ops,
                    failure: Vec::new(),
                })
                .await
                .map_err(store_error)?;
            let revision = if done.succeeded {
                revision_of(done.header.as_ref())
            } else if let Some(at) = self.written(&instance_id, &record).await? {
                // A member that failed after committing it, then sent again.
                at
            } else {
                // Someone else claimed a name first: learn who, and check
                // again (which refuses, naming the owner).
                self.catch_up().await?;
                continue;
            };
            self.see(revision).await;
            self.registry.count_registration();
            tracing::info!(
                instance.id = %instance_id,
                service = %service,
                address = %instance.address,
                identity = %caller,
                revision,
                "instance registered"
            );
            return Ok(pb::RegisterResponse {
                instance_id,
                lease_id,
                ttl: Some(proto_duration(ttl)),
                revision,
                instance: Some(instance),
            });
        }
        Err(Status::aborted(format!(
            "registration of {service} raced others claiming the same gRPC service names {ATTEMPTS} times; try again"
        )))
    }

    /// The revision at which instance `id` was written as `record`, if it
    /// was.
    async fn written(&self, id: &str, record: &[u8]) -> Result<Option<u64>, Status> {
        let found = self
            .etcd
            .range(rpc::RangeRequest {
                key: self.keys.key(Kind::Instance, id),
                ..Default::default()
            })
            .await?;
        Ok(found
            .kvs
            .first()
            .filter(|kv| kv.value == record)
            .map(|kv| kv.mod_revision.max(0) as u64))
    }

    /// The view's entry for lease `lease_id`, catching up with etcd first
    /// if this replica has not seen it yet.
    async fn lease_holder(&self, lease_id: &str) -> Result<Option<Entry>, Status> {
        if let Some(entry) = self.registry.lease_holder(lease_id) {
            return Ok(Some(entry));
        }
        self.catch_up().await?;
        Ok(self.registry.lease_holder(lease_id))
    }

    /// Instance `instance_id` of `caller`, catching up first if unseen.
    async fn owned(&self, caller: &SpiffeId, instance_id: &str) -> Result<Entry, Status> {
        match self.registry.owned(caller, instance_id) {
            Err(status) if status.code() == tonic::Code::NotFound => {
                self.catch_up().await?;
                self.registry.owned(caller, instance_id)
            }
            other => other,
        }
    }

    /// Renews a lease; `Ok(None)` when it is unknown or already expired.
    pub async fn renew(
        &self,
        caller: &SpiffeId,
        lease_id: &str,
    ) -> Result<Option<Duration>, Status> {
        if lease_id.is_empty() {
            return Err(trellis::status::invalid_field(
                "lease_id",
                "must not be empty",
            ));
        }
        self.registry.check_available()?;
        let Some(entry) = self.lease_holder(lease_id).await? else {
            return Ok(None);
        };
        if entry.owner != *caller {
            return Err(Status::permission_denied(format!(
                "lease {lease_id} belongs to {}, not {caller}",
                entry.owner
            )));
        }
        self.etcd.keep_alive(entry.etcd_lease).await
    }

    /// Removes an instance now.
    pub async fn deregister(&self, caller: &SpiffeId, instance_id: &str) -> Result<u64, Status> {
        self.registry.check_available()?;
        let entry = self.owned(caller, instance_id).await?;
        let key = self.keys.key(Kind::Instance, instance_id);
        let done = self
            .etcd
            .txn(rpc::TxnRequest {
                compare: vec![compare(
                    key.clone(),
                    rpc::compare::TargetUnion::Lease(entry.etcd_lease),
                )],
                success: vec![
                    delete(key),
                    put(
                        self.keys.key(Kind::Gone, instance_id),
                        b"deregistered".to_vec(),
                        entry.etcd_lease,
                    ),
                ],
                failure: Vec::new(),
            })
            .await
            .map_err(store_error)?;
        if !done.succeeded {
            return Err(Status::not_found(format!(
                "no instance {instance_id:?} is registered"
            )));
        }
        let revision = revision_of(done.header.as_ref());
        self.see(revision).await;
        // The lease goes too (and with it the deregistration mark).
        if let Err(e) = self.etcd.revoke(entry.etcd_lease).await {
            tracing::debug!(error = %e.message(), "lease of a deregistered instance not revoked; it expires");
        }
        self.registry.count_deregistration();
        tracing::info!(instance.id = %instance_id, identity = %caller, revision, "instance deregistered");
        Ok(revision)
    }

    /// Changes an instance's serving status.
    pub async fn set_health(
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
        self.registry.check_available()?;
        for _ in 0..ATTEMPTS {
            let entry = self.owned(caller, instance_id).await?;
            if entry.instance.health() == health {
                return Ok(self.registry.revision());
            }
            let mut instance = entry.instance.clone();
            instance.set_health(health);
            let record = StoredInstance {
                instance: Some(instance),
                owner: entry.owner.to_string(),
                lease_id: entry.lease_id.clone(),
                ttl_ms: entry.ttl.as_millis() as u64,
            }
            .encode_to_vec();
            let key = self.keys.key(Kind::Instance, instance_id);
            let done = self
                .etcd
                .txn(rpc::TxnRequest {
                    compare: vec![compare(
                        key.clone(),
                        rpc::compare::TargetUnion::ModRevision(entry.mod_revision),
                    )],
                    success: vec![put(key, record, entry.etcd_lease)],
                    failure: Vec::new(),
                })
                .await
                .map_err(store_error)?;
            if done.succeeded {
                let revision = revision_of(done.header.as_ref());
                self.see(revision).await;
                tracing::info!(instance.id = %instance_id, health = ?health, revision, "instance health changed");
                return Ok(revision);
            }
            // Changed meanwhile (or gone): read it again.
            self.catch_up().await?;
        }
        Err(Status::aborted(format!(
            "instance {instance_id} kept changing while its health was set; try again"
        )))
    }
}

/// Why following etcd stopped.
enum Ended {
    /// The watch broke; open it again from the last applied revision.
    Broken(Status),
    /// etcd no longer has the revisions after the view's.
    Compacted(i64),
    /// No member would open a watch.
    Unreachable(Status),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_stay_in_their_mesh() {
        let url = StoreUrl::parse("etcd://a:1/t").unwrap();
        let scope = MeshScope {
            trust_domain: "trellis.local".into(),
            namespace: "default".into(),
        };
        let keys = Keys::new(&url, &scope);
        let k = keys.key(Kind::Claim, "telco.user.v1.UserService");
        assert_eq!(
            k,
            b"/t/registry/trellis.local/default/c/telco.user.v1.UserService"
        );
        assert_eq!(
            keys.parse(&k),
            Some((Kind::Claim, "telco.user.v1.UserService"))
        );
        let other = Keys::new(
            &url,
            &MeshScope {
                trust_domain: "trellis.local".into(),
                namespace: "staging".into(),
            },
        );
        assert_eq!(other.parse(&k), None);
        let (start, end) = keys.range();
        assert!(k >= start && k < end);
        assert_eq!(lease_name(0x1234), "lease-0000000000001234");
    }
}
