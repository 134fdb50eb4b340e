//! The golden metrics the dashboard shows: every sidecar's inbound calls
//! (rate, success, p50 and p99), per gRPC method and per mesh service,
//! and who calls whom, from two readings of each sidecar's `/metrics` an
//! interval apart (the readings `trellis top` takes). Also the
//! configuration's state, asked of the registry at the same pace.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::mesh::Mesh;
use crate::mesh_status::RegistryReader;
use crate::pb::trellis::config::v1 as config_pb;
use crate::top::stats::{self, Callers, Counters, Method, Scrape};
use crate::top::{ADMIN_METADATA_KEY, MAX_INSTANCES};

/// The calls over the last interval.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// When the later of the two readings was taken; `None` before there
    /// are two.
    pub at: Option<SystemTime>,
    /// Over how long the rates are measured.
    pub interval: Duration,
    /// Calls by gRPC method, summed over the instances serving it.
    pub methods: BTreeMap<Method, Counters>,
    /// Calls by mesh service, all methods together.
    pub services: BTreeMap<String, Counters>,
    /// Calls by (caller, callee mesh service): (calls, failures).
    pub edges: BTreeMap<(String, String), (f64, f64)>,
    /// Instances whose metrics could not be read, with why.
    pub unread: BTreeMap<String, String>,
    /// Instances with no admin address registered (not read).
    pub no_admin: usize,
    /// Instances over [`MAX_INSTANCES`], not read.
    pub left_out: usize,
}

impl Traffic {
    /// Calls per second of `c` over the interval.
    pub fn rate(&self, c: &Counters) -> f64 {
        c.calls() / self.interval.as_secs_f64().max(1e-3)
    }
}

/// The configuration as the registry last reported it.
#[derive(Debug, Clone, Default)]
pub enum ConfigState {
    /// Not asked yet.
    #[default]
    Unknown,
    /// The registry's answer.
    Known(config_pb::GetConfigStatusResponse),
    /// The question failed: why.
    Unavailable(String),
}

/// One instance's last reading.
struct Reading {
    at: Instant,
    service: String,
    calls: Scrape,
    callers: Callers,
}

/// Reads every sidecar's metrics each `interval` until the process ends.
pub async fn follow(
    mesh: watch::Receiver<Mesh>,
    traffic: watch::Sender<Traffic>,
    interval: Duration,
) {
    let mut last: HashMap<String, Reading> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut targets = Vec::new();
        let mut no_admin = 0;
        let mut left_out = 0;
        for tracked in mesh.borrow().instances.values() {
            let i = &tracked.instance;
            match i.metadata.get(ADMIN_METADATA_KEY) {
                Some(admin) if targets.len() < MAX_INSTANCES => {
                    targets.push((i.instance_id.clone(), i.service.clone(), admin.clone()))
                }
                Some(_) => left_out += 1,
                None => no_admin += 1,
            }
        }
        let reads = targets.into_iter().map(|(id, service, admin)| async move {
            let reading = match crate::top::read_text(&admin).await {
                Ok(text) => match (stats::parse(&text), stats::parse_callers(&text)) {
                    (Ok(calls), Ok(callers)) => Ok(Reading {
                        at: Instant::now(),
                        service,
                        calls,
                        callers,
                    }),
                    (Err(e), _) | (_, Err(e)) => Err(format!("{admin}/metrics: {e}")),
                },
                Err(e) => Err(e),
            };
            (id, reading)
        });
        let readings = futures::future::join_all(reads).await;
        let mut next = Traffic {
            interval,
            no_admin,
            left_out,
            ..Traffic::default()
        };
        let mut fresh = HashMap::new();
        let mut spans = Vec::new();
        for (id, reading) in readings {
            match reading {
                Ok(now) => {
                    if let Some(before) = last.get(&id) {
                        spans.push(now.at.duration_since(before.at));
                        add(&mut next, before, &now);
                    }
                    fresh.insert(id, now);
                }
                Err(why) => {
                    next.unread.insert(id, why);
                }
            }
        }
        if !spans.is_empty() {
            spans.sort();
            next.interval = spans[spans.len() / 2].max(Duration::from_millis(1));
            next.at = Some(SystemTime::now());
        }
        last = fresh;
        traffic.send_replace(next);
    }
}

/// Adds one instance's calls between two readings.
fn add(traffic: &mut Traffic, before: &Reading, now: &Reading) {
    for (method, counters) in stats::delta(&before.calls, &now.calls) {
        traffic
            .services
            .entry(now.service.clone())
            .or_default()
            .add(&counters);
        traffic.methods.entry(method).or_default().add(&counters);
    }
    // A counter lower than before means the proxy restarted: count all.
    let restarted = now
        .callers
        .iter()
        .any(|(k, v)| before.callers.get(k).is_some_and(|b| sum(b) > sum(v)));
    for (key, statuses) in &now.callers {
        let old = (!restarted).then(|| before.callers.get(key)).flatten();
        let calls = sum(statuses) - old.map(sum).unwrap_or(0.0);
        let ok = statuses.get(stats::OK).copied().unwrap_or(0.0)
            - old.and_then(|o| o.get(stats::OK).copied()).unwrap_or(0.0);
        if calls <= 0.0 {
            continue;
        }
        let edge = traffic
            .edges
            .entry((key.0.clone(), now.service.clone()))
            .or_default();
        edge.0 += calls;
        edge.1 += (calls - ok).max(0.0);
    }
}

fn sum(statuses: &BTreeMap<String, f64>) -> f64 {
    statuses.values().sum()
}

/// Asks the registry for the configuration's state each `interval`.
pub async fn follow_config(
    mut reader: RegistryReader,
    config: watch::Sender<ConfigState>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = match reader.config().await {
            Ok(status) => ConfigState::Known(status),
            Err(e) => ConfigState::Unavailable(e.to_string()),
        };
        config.send_replace(state);
    }
}
