//! What the dashboard knows of the registry: every instance, each one's
//! health history, and the recent registrations and removals, kept
//! current by one Watch of the whole registry.
//!
//! When the registry cannot be reached the last view is kept, marked as
//! such with the reason: a registry that is down never looks like an
//! empty mesh.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::mesh_status::RegistryReader;
use crate::pb::trellis::registry::v1 as registry_pb;
use registry_pb::{RemovalReason, ServingStatus, WatchEventKind};

/// Most recent registrations, removals and health changes kept.
pub const MAX_EVENTS: usize = 500;
/// Health changes kept per instance.
pub const MAX_HISTORY: usize = 32;
/// Most instances kept; a registry listing more is shown truncated, and
/// says so.
pub const MAX_INSTANCES: usize = 10_000;

/// The registry as the dashboard last saw it.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    /// Whether the registry is being followed.
    pub source: Source,
    /// The registry's revision of the view.
    pub revision: u64,
    /// Every instance, by instance ID.
    pub instances: BTreeMap<String, Tracked>,
    /// Instances left out because the view holds [`MAX_INSTANCES`].
    pub left_out: usize,
    /// Registrations, removals and health changes, newest last.
    pub events: VecDeque<Event>,
}

/// Whether the registry answers.
#[derive(Debug, Clone, Default)]
pub enum Source {
    /// Not asked yet.
    #[default]
    Connecting,
    /// Following the replica at this address since then.
    Following { replica: String, since: SystemTime },
    /// Cannot be followed: why, and since when. The view is the last one
    /// seen (if any).
    Down { reason: String, since: SystemTime },
}

/// One instance and what happened to its health.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// Its last known registration.
    pub instance: registry_pb::Instance,
    /// (when, health) for each change seen, oldest first.
    pub history: VecDeque<(SystemTime, ServingStatus)>,
}

/// Something that happened to an instance.
#[derive(Debug, Clone)]
pub struct Event {
    /// When the dashboard saw it (for registrations found in the first
    /// snapshot: when the instance registered).
    pub at: SystemTime,
    /// What happened.
    pub kind: EventKind,
    /// The instance, in its state at the time.
    pub instance: registry_pb::Instance,
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// It registered.
    Registered,
    /// It deregistered (a graceful stop).
    Deregistered,
    /// Its lease ran out (it crashed or lost the registry).
    Expired,
    /// A new registration at the same address replaced it.
    Replaced,
    /// It left while the dashboard could not see why (found missing from
    /// a later snapshot).
    Gone,
    /// Its health changed.
    Health,
}

impl EventKind {
    /// The name used in pages (`data-kind`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Deregistered => "deregistered",
            Self::Expired => "expired",
            Self::Replaced => "replaced",
            Self::Gone => "gone",
            Self::Health => "health",
        }
    }
}

/// `SERVING` / `NOT_SERVING` as pages show them.
pub fn health_name(health: i32) -> &'static str {
    match ServingStatus::try_from(health) {
        Ok(ServingStatus::Serving) => "SERVING",
        Ok(ServingStatus::NotServing) => "NOT_SERVING",
        _ => "UNKNOWN",
    }
}

impl Mesh {
    fn record(&mut self, event: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn health_changed(tracked: &mut Tracked, at: SystemTime) {
        if tracked.history.len() >= MAX_HISTORY {
            tracked.history.pop_front();
        }
        tracked.history.push_back((at, tracked.instance.health()));
    }

    /// Adds or updates one instance, recording what changed.
    fn upsert(&mut self, instance: registry_pb::Instance, at: SystemTime, first: bool) {
        if let Some(tracked) = self.instances.get_mut(&instance.instance_id) {
            let before = tracked.instance.health;
            tracked.instance = instance;
            if tracked.instance.health != before {
                Self::health_changed(tracked, at);
                let instance = tracked.instance.clone();
                self.record(Event {
                    at,
                    kind: EventKind::Health,
                    instance,
                });
            }
            return;
        }
        if self.instances.len() >= MAX_INSTANCES {
            self.left_out += 1;
            return;
        }
        // Found in the first snapshot: it registered before we looked.
        let registered = instance
            .registered_at
            .as_ref()
            .and_then(|t| SystemTime::try_from(*t).ok());
        let at = if first { registered.unwrap_or(at) } else { at };
        let mut history = VecDeque::new();
        history.push_back((at, instance.health()));
        self.record(Event {
            at,
            kind: EventKind::Registered,
            instance: instance.clone(),
        });
        self.instances
            .insert(instance.instance_id.clone(), Tracked { instance, history });
    }

    fn remove(&mut self, instance: registry_pb::Instance, kind: EventKind, at: SystemTime) {
        if self.instances.remove(&instance.instance_id).is_some() {
            self.record(Event { at, kind, instance });
        }
    }

    /// Applies one step of the Watch.
    pub fn apply(&mut self, step: registry_pb::WatchResponse, first: bool, at: SystemTime) {
        self.revision = step.revision;
        match step.kind() {
            WatchEventKind::Snapshot => {
                // A snapshot replaces the view: what it lacks has left.
                let present: std::collections::HashSet<&str> = step
                    .instances
                    .iter()
                    .map(|i| i.instance_id.as_str())
                    .collect();
                let gone: Vec<registry_pb::Instance> = self
                    .instances
                    .values()
                    .filter(|t| !present.contains(t.instance.instance_id.as_str()))
                    .map(|t| t.instance.clone())
                    .collect();
                for instance in gone {
                    self.remove(instance, EventKind::Gone, at);
                }
                self.left_out = 0;
                let mut instances = step.instances;
                // Registrations found at once are recorded oldest first.
                instances.sort_by_key(|i| {
                    i.registered_at
                        .as_ref()
                        .map(|t| (t.seconds, t.nanos))
                        .unwrap_or_default()
                });
                for instance in instances {
                    self.upsert(instance, at, first);
                }
                if first {
                    self.events
                        .make_contiguous()
                        .sort_by_key(|e| e.at.duration_since(SystemTime::UNIX_EPOCH).ok());
                }
            }
            WatchEventKind::Upsert => {
                for instance in step.instances {
                    self.upsert(instance, at, false);
                }
            }
            WatchEventKind::Remove => {
                let kind = match step.removal_reason() {
                    RemovalReason::Deregistered => EventKind::Deregistered,
                    RemovalReason::LeaseExpired => EventKind::Expired,
                    RemovalReason::Replaced => EventKind::Replaced,
                    RemovalReason::Unspecified => EventKind::Gone,
                };
                for instance in step.instances {
                    self.remove(instance, kind, at);
                }
            }
            WatchEventKind::Unspecified => {}
        }
    }

    /// Instances by mesh service, each list by instance ID.
    pub fn by_service(&self) -> BTreeMap<&str, Vec<&Tracked>> {
        let mut services: BTreeMap<&str, Vec<&Tracked>> = BTreeMap::new();
        for tracked in self.instances.values() {
            services
                .entry(tracked.instance.service.as_str())
                .or_default()
                .push(tracked);
        }
        services
    }

    /// The mesh service that serves a gRPC service, if any instance does.
    pub fn service_of(&self, grpc_service: &str) -> Option<&str> {
        self.instances
            .values()
            .find(|t| t.instance.grpc_services.iter().any(|g| g == grpc_service))
            .map(|t| t.instance.service.as_str())
    }

    /// Whether the registry answered at least once.
    pub fn seen(&self) -> bool {
        self.revision > 0 || matches!(self.source, Source::Following { .. })
    }
}

/// Follows the registry until the process ends: one Watch at a time, on
/// the replica that answers, opened again after a pause when it breaks.
pub async fn follow(mut reader: RegistryReader, view: watch::Sender<Mesh>) {
    let mut pause = Duration::from_millis(200);
    let mut first = true;
    loop {
        match reader.watch().await {
            Ok((replica, mut stream)) => {
                let mut opened = true;
                loop {
                    match stream.message().await {
                        Ok(Some(step)) => {
                            let now = SystemTime::now();
                            view.send_modify(|mesh| {
                                if opened {
                                    mesh.source = Source::Following {
                                        replica: replica.clone(),
                                        since: now,
                                    };
                                }
                                mesh.apply(step, first, now);
                            });
                            opened = false;
                            first = false;
                            pause = Duration::from_millis(200);
                        }
                        Ok(None) => {
                            down(&view, format!("the registry at {replica} ended the watch"));
                            break;
                        }
                        Err(status) => {
                            down(
                                &view,
                                format!(
                                    "the watch on the registry at {replica} broke: {:?}: {}",
                                    status.code(),
                                    status.message()
                                ),
                            );
                            break;
                        }
                    }
                }
            }
            Err(e) => down(&view, e.to_string()),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(3));
    }
}

fn down(view: &watch::Sender<Mesh>, reason: String) {
    tracing::warn!(%reason, "registry not followed");
    view.send_modify(|mesh| {
        let since = match &mesh.source {
            Source::Down { since, .. } => *since,
            _ => SystemTime::now(),
        };
        mesh.source = Source::Down { reason, since };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, service: &str, health: ServingStatus) -> registry_pb::Instance {
        registry_pb::Instance {
            instance_id: id.into(),
            service: service.into(),
            health: health as i32,
            ..Default::default()
        }
    }

    fn step(
        kind: WatchEventKind,
        revision: u64,
        instances: Vec<registry_pb::Instance>,
    ) -> registry_pb::WatchResponse {
        registry_pb::WatchResponse {
            revision,
            kind: kind as i32,
            instances,
            ..Default::default()
        }
    }

    #[test]
    fn health_changes_and_removals_are_recorded_with_their_reason() {
        let mut mesh = Mesh::default();
        let now = SystemTime::now();
        mesh.apply(
            step(
                WatchEventKind::Snapshot,
                1,
                vec![instance("a", "usage", ServingStatus::Serving)],
            ),
            true,
            now,
        );
        mesh.apply(
            step(
                WatchEventKind::Upsert,
                2,
                vec![instance("a", "usage", ServingStatus::NotServing)],
            ),
            false,
            now,
        );
        let mut removal = step(
            WatchEventKind::Remove,
            3,
            vec![instance("a", "usage", ServingStatus::NotServing)],
        );
        removal.removal_reason = RemovalReason::LeaseExpired as i32;
        mesh.apply(removal, false, now);
        let kinds: Vec<&str> = mesh.events.iter().map(|e| e.kind.name()).collect();
        assert_eq!(kinds, ["registered", "health", "expired"]);
        assert!(mesh.instances.is_empty());
        assert_eq!(mesh.revision, 3);
    }

    #[test]
    fn a_resync_snapshot_removes_what_it_lacks_and_history_is_bounded() {
        let mut mesh = Mesh::default();
        let now = SystemTime::now();
        mesh.apply(
            step(
                WatchEventKind::Snapshot,
                1,
                vec![
                    instance("a", "usage", ServingStatus::Serving),
                    instance("b", "usage", ServingStatus::Serving),
                ],
            ),
            true,
            now,
        );
        for n in 0..100 {
            let health = if n % 2 == 0 {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            };
            mesh.apply(
                step(
                    WatchEventKind::Upsert,
                    2 + n,
                    vec![instance("a", "usage", health)],
                ),
                false,
                now,
            );
        }
        assert_eq!(mesh.instances["a"].history.len(), MAX_HISTORY);
        mesh.apply(
            step(
                WatchEventKind::Snapshot,
                200,
                vec![instance("a", "usage", ServingStatus::Serving)],
            ),
            false,
            now,
        );
        assert!(!mesh.instances.contains_key("b"));
        assert_eq!(mesh.events.back().unwrap().kind, EventKind::Gone);
        assert!(mesh.events.len() <= MAX_EVENTS);
    }
}
