//! The pages: what each shows, prepared here as plain rows and rendered
//! by the templates in `templates/` (escaped by askama; only our own
//! rendered fragments are inserted unescaped).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use askama::Template;
use serde::Deserialize;

use super::Dashboard;
use super::mesh::{self, Mesh, Source, Tracked};
use super::traffic::{ConfigState, Traffic};
use crate::mesh_status::short_type;
use crate::pb::trellis::registry::v1 as registry_pb;
use crate::top::stats::Counters;

/// Metadata keys whose values are never shown: whatever looks like a
/// credential.
const SECRET_WORDS: [&str; 7] = [
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "apikey",
    "private",
];

/// Longest filter text taken from a URL.
const MAX_FILTER: usize = 200;

/// The filters of the services and events views, from the URL.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filters {
    /// Text to find in service names, gRPC names, addresses.
    #[serde(default)]
    pub q: String,
    /// Only instances in this zone.
    #[serde(default)]
    pub zone: String,
    /// Only instances of this version.
    #[serde(default)]
    pub version: String,
}

impl Filters {
    /// `?q=…&zone=…` for the filters set, or nothing.
    pub fn query(&self) -> String {
        let pairs: Vec<String> = [
            ("q", &self.q),
            ("zone", &self.zone),
            ("version", &self.version),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", query_value(v)))
        .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }

    fn text(&self) -> String {
        self.q
            .chars()
            .take(MAX_FILTER)
            .collect::<String>()
            .to_lowercase()
    }

    fn admits(&self, i: &registry_pb::Instance) -> bool {
        (self.zone.is_empty() || i.zone == self.zone)
            && (self.version.is_empty() || i.version == self.version)
    }

    fn finds(&self, i: &registry_pb::Instance) -> bool {
        let q = self.text();
        q.is_empty()
            || i.service.to_lowercase().contains(&q)
            || i.grpc_services
                .iter()
                .any(|g| g.to_lowercase().contains(&q))
            || i.address.contains(&q)
            || i.instance_id.to_lowercase().contains(&q)
    }
}

/// `text` percent-encoded for a path segment.
pub fn path_segment(text: &str) -> String {
    encode(text, |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// `text` percent-encoded for a query value.
pub fn query_value(text: &str) -> String {
    encode(text, |b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
}

fn encode(text: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ----- formatting -----

fn rate(traffic: &Traffic, c: Option<&Counters>) -> String {
    match (traffic.at, c) {
        (None, _) => "–".into(),
        (Some(_), None) => "0/s".into(),
        (Some(_), Some(c)) => {
            let r = traffic.rate(c);
            if r >= 100.0 {
                format!("{r:.0}/s")
            } else {
                format!("{r:.1}/s")
            }
        }
    }
}

fn success(c: Option<&Counters>) -> String {
    match c.and_then(Counters::success_rate) {
        Some(s) => format!("{:.1} %", s * 100.0),
        None => "–".into(),
    }
}

fn latency(c: Option<&Counters>, q: f64) -> String {
    match c.and_then(|c| c.latency(q)) {
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
        None => "–".into(),
    }
}

/// "3s", "4m 10s", "2h 5m" ago or ahead.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m {}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d {}h", s / 86_400, (s % 86_400) / 3600)
    }
}

fn ago(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) => format!("{} ago", span(d)),
        Err(_) => "just now".into(),
    }
}

/// An RFC 3339 time, to the second, UTC.
fn clock(t: SystemTime) -> String {
    let t: time::OffsetDateTime = t.into();
    t.format(&time::format_description::well_known::Rfc3339)
        .map(|s| {
            let mut s = s;
            if let Some(dot) = s.find('.') {
                s.replace_range(dot..s.len() - 1, "");
            }
            s
        })
        .unwrap_or_default()
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

fn secret(key: &str) -> bool {
    let k: String = key
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    SECRET_WORDS.iter().any(|w| k.contains(w))
}

// ----- the source banner -----

/// How the registry and metrics sources stand, for the top of a view.
struct SourceLine {
    state: &'static str,
    text: String,
}

fn source_line(mesh: &Mesh, traffic: &Traffic) -> SourceLine {
    match &mesh.source {
        Source::Connecting => SourceLine {
            state: "down",
            text: "Connecting to the registry…".into(),
        },
        Source::Down { reason, since } => SourceLine {
            state: "down",
            text: if mesh.seen() {
                format!(
                    "The registry cannot be read since {} ({reason}). Showing the mesh as it was then.",
                    ago(*since)
                )
            } else {
                format!("The registry cannot be read ({reason}). Nothing is known of the mesh yet.")
            },
        },
        Source::Following { replica, .. } => {
            let mut text = format!(
                "Live from the registry at {replica}, revision {}.",
                mesh.revision
            );
            if traffic.at.is_none() {
                text.push_str(" Metrics: waiting for two readings.");
            } else if !traffic.unread.is_empty() {
                text.push_str(&format!(
                    " Metrics of {} instance(s) cannot be read (see their pages).",
                    traffic.unread.len()
                ));
            }
            SourceLine {
                state: if traffic.unread.is_empty() {
                    "ok"
                } else {
                    "partial"
                },
                text,
            }
        }
    }
}

// ----- layout -----

#[derive(Template)]
#[template(path = "layout.html")]
struct Layout<'a> {
    title: &'a str,
    nav: &'a str,
    head: &'a str,
    fragment: &'a str,
    live: &'a str,
}

/// A whole page.
pub fn layout(title: &str, nav: &str, head: &str, fragment: &str, live: &str) -> String {
    Layout {
        title,
        nav,
        head,
        fragment,
        live,
    }
    .render()
    .unwrap_or_else(|e| format!("template error: {e}"))
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
}

/// A page that only says what went wrong.
pub fn error_page(title: &str, message: &str) -> String {
    let body = ErrorPage { title, message }.render().unwrap_or_default();
    layout(title, "", &body, "", "")
}

fn render(t: impl Template) -> String {
    t.render()
        .unwrap_or_else(|e| format!("<p class=\"error\">template error: {e}</p>"))
}

// ----- services -----

#[derive(Template)]
#[template(path = "services_head.html")]
struct ServicesHead<'a> {
    f: &'a Filters,
    zones: Vec<String>,
    versions: Vec<String>,
}

/// The filters above the services table, with every zone and version.
pub fn services_head(d: &Dashboard, f: &Filters) -> String {
    let mesh = d.mesh.borrow();
    let mut zones = BTreeSet::new();
    let mut versions = BTreeSet::new();
    for t in mesh.instances.values() {
        if !t.instance.zone.is_empty() {
            zones.insert(t.instance.zone.clone());
        }
        if !t.instance.version.is_empty() {
            versions.insert(t.instance.version.clone());
        }
    }
    // A filter from a link stays selectable even if nothing matches now.
    for (set, v) in [(&mut zones, &f.zone), (&mut versions, &f.version)] {
        if !v.is_empty() {
            set.insert(v.clone());
        }
    }
    render(ServicesHead {
        f,
        zones: zones.into_iter().collect(),
        versions: versions.into_iter().collect(),
    })
}

struct ServiceRow {
    name: String,
    health: &'static str,
    serving: usize,
    total: usize,
    versions: String,
    zones: String,
    grpc: String,
    rate: String,
    success: String,
    p50: String,
    p99: String,
}

#[derive(Template)]
#[template(path = "services.html")]
struct Services {
    source: SourceLine,
    rows: Vec<ServiceRow>,
    hidden: usize,
    left_out: usize,
}

fn health_of(serving: usize, total: usize) -> &'static str {
    if total > 0 && serving == total {
        "serving"
    } else if serving > 0 {
        "degraded"
    } else {
        "down"
    }
}

fn joined(set: BTreeSet<&str>) -> String {
    if set.is_empty() {
        "–".into()
    } else {
        set.into_iter().collect::<Vec<_>>().join(", ")
    }
}

/// Every service, its health, instances, versions, zones and traffic.
pub fn services(d: &Dashboard, f: &Filters) -> String {
    let mesh = d.mesh.borrow();
    let traffic = d.traffic.borrow();
    let mut rows = Vec::new();
    let mut hidden = 0;
    for (name, instances) in mesh.by_service() {
        let shown: Vec<&&Tracked> = instances.iter().filter(|t| f.admits(&t.instance)).collect();
        if shown.is_empty() || !instances.iter().any(|t| f.finds(&t.instance)) {
            hidden += 1;
            continue;
        }
        let serving = shown
            .iter()
            .filter(|t| t.instance.health() == registry_pb::ServingStatus::Serving)
            .count();
        let counters = traffic.services.get(name);
        rows.push(ServiceRow {
            name: name.to_owned(),
            health: health_of(serving, shown.len()),
            serving,
            total: shown.len(),
            versions: joined(
                shown
                    .iter()
                    .map(|t| t.instance.version.as_str())
                    .filter(|v| !v.is_empty())
                    .collect(),
            ),
            zones: joined(
                shown
                    .iter()
                    .map(|t| t.instance.zone.as_str())
                    .filter(|v| !v.is_empty())
                    .collect(),
            ),
            grpc: joined(
                shown
                    .iter()
                    .flat_map(|t| t.instance.grpc_services.iter().map(String::as_str))
                    .collect(),
            ),
            rate: rate(&traffic, counters),
            success: success(counters),
            p50: latency(counters, 0.5),
            p99: latency(counters, 0.99),
        });
    }
    render(Services {
        source: source_line(&mesh, &traffic),
        rows,
        hidden,
        left_out: mesh.left_out,
    })
}

// ----- one service -----

#[derive(Template)]
#[template(path = "service_head.html")]
struct ServiceHead<'a> {
    name: &'a str,
}

/// The title of a service's page.
pub fn service_head(name: &str) -> String {
    render(ServiceHead { name })
}

struct InstanceRow {
    id: String,
    link: String,
    address: String,
    version: String,
    zone: String,
    health: &'static str,
    identity: String,
    age: String,
    metrics: String,
}

struct MethodRow {
    full: String,
    kind: &'static str,
    rate: String,
    success: String,
    p50: String,
    p99: String,
    link: String,
}

#[derive(Template)]
#[template(path = "service.html")]
struct ServiceView {
    source: SourceLine,
    name: String,
    known: bool,
    health: &'static str,
    serving: usize,
    instances: Vec<InstanceRow>,
    methods: Vec<MethodRow>,
    contract_note: Option<String>,
}

fn instance_row(t: &Tracked, traffic: &Traffic) -> InstanceRow {
    let i = &t.instance;
    InstanceRow {
        id: i.instance_id.clone(),
        link: format!("/instances/{}", path_segment(&i.instance_id)),
        address: i.address.clone(),
        version: if i.version.is_empty() {
            "–".into()
        } else {
            i.version.clone()
        },
        zone: if i.zone.is_empty() {
            "–".into()
        } else {
            i.zone.clone()
        },
        health: mesh::health_name(i.health),
        identity: i.identity.clone(),
        age: timestamp(&i.registered_at)
            .map(ago)
            .unwrap_or_else(|| "–".into()),
        metrics: match traffic.unread.get(&i.instance_id) {
            Some(why) => format!("cannot be read: {why}"),
            None if i.metadata.contains_key(crate::top::ADMIN_METADATA_KEY) => "read".into(),
            None => "no admin port registered".into(),
        },
    }
}

/// A service's instances and its methods with their traffic.
pub async fn service(d: &Dashboard, name: &str) -> String {
    let grpc: Vec<String> = {
        let mesh = d.mesh.borrow();
        let mut set = BTreeSet::new();
        for t in mesh
            .instances
            .values()
            .filter(|t| t.instance.service == name)
        {
            set.extend(t.instance.grpc_services.iter().cloned());
        }
        set.into_iter().collect()
    };
    // The contract names every method, including those never called.
    let mut methods: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut contract_note = None;
    for g in &grpc {
        match super::console::methods_of(d, g).await {
            Ok(list) => {
                for (m, kind) in list {
                    methods.insert(format!("{g}/{m}"), kind);
                }
            }
            Err(why) => contract_note = Some(why),
        }
    }
    let mesh = d.mesh.borrow();
    let traffic = d.traffic.borrow();
    for m in traffic.methods.keys().filter(|m| grpc.contains(&m.service)) {
        methods
            .entry(format!("{}/{}", m.service, m.method))
            .or_insert("unary");
    }
    let instances: Vec<InstanceRow> = mesh
        .instances
        .values()
        .filter(|t| t.instance.service == name)
        .map(|t| instance_row(t, &traffic))
        .collect();
    let serving = instances.iter().filter(|i| i.health == "SERVING").count();
    let methods = methods
        .into_iter()
        .map(|(full, kind)| {
            let (service, method) = full.split_once('/').unwrap_or((&full, ""));
            let key = crate::top::stats::Method {
                service: service.to_owned(),
                method: method.to_owned(),
            };
            let c = traffic.methods.get(&key);
            MethodRow {
                link: format!("/console?method={}", query_value(&full)),
                kind,
                rate: rate(&traffic, c),
                success: success(c),
                p50: latency(c, 0.5),
                p99: latency(c, 0.99),
                full,
            }
        })
        .collect();
    render(ServiceView {
        source: source_line(&mesh, &traffic),
        name: name.to_owned(),
        known: !instances.is_empty(),
        health: health_of(serving, instances.len()),
        serving,
        instances,
        methods,
        contract_note,
    })
}

// ----- one instance -----

#[derive(Template)]
#[template(path = "instance_head.html")]
struct InstanceHead<'a> {
    id: &'a str,
}

/// The title of an instance's page.
pub fn instance_head(id: &str) -> String {
    render(InstanceHead { id })
}

#[derive(Template)]
#[template(path = "instance.html")]
struct InstanceView {
    source: SourceLine,
    found: Option<InstanceDetail>,
    /// What happened to it, newest first (also once it is gone).
    events: Vec<EventRow>,
}

struct InstanceDetail {
    row: InstanceRow,
    service: String,
    grpc: Vec<String>,
    registered: String,
    lease: String,
    metadata: Vec<(String, String)>,
    history: Vec<(String, String, &'static str)>,
}

/// An instance's registration, lease, health history and metadata.
pub async fn instance(d: &Dashboard, id: &str) -> String {
    // The lease as the registry holds it now: the Watch sends no renewals.
    let service = d
        .mesh
        .borrow()
        .instances
        .get(id)
        .map(|t| t.instance.service.clone());
    let lease = match service {
        Some(service) => match d.registry.lock().await.resolve(&service).await {
            Ok(answer) => answer
                .instances
                .into_iter()
                .find(|i| i.instance_id == id)
                .map(|i| Ok(i.lease_expires_at)),
            Err(e) => Some(Err(e.to_string())),
        },
        None => None,
    };
    let mesh = d.mesh.borrow();
    let traffic = d.traffic.borrow();
    let found = mesh.instances.get(id).map(|t| {
        let i = &t.instance;
        InstanceDetail {
            row: instance_row(t, &traffic),
            service: i.service.clone(),
            grpc: i.grpc_services.clone(),
            registered: timestamp(&i.registered_at)
                .map(|t| format!("{} ({})", clock(t), ago(t)))
                .unwrap_or_else(|| "–".into()),
            lease: match &lease {
                Some(Ok(expires)) => match timestamp(expires) {
                    Some(t) => match t.duration_since(SystemTime::now()) {
                        Ok(left) => format!("expires in {} unless renewed", span(left)),
                        Err(_) => "expired, not yet removed".into(),
                    },
                    None => {
                        "held by the registry's store (etcd): renewed through any replica".into()
                    }
                },
                Some(Err(why)) => format!("cannot be read: {why}"),
                None => "–".into(),
            },
            metadata: i
                .metadata
                .iter()
                .map(|(k, v)| {
                    let shown = if secret(k) {
                        "(hidden)".to_owned()
                    } else {
                        v.clone()
                    };
                    (k.clone(), shown)
                })
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
            history: t
                .history
                .iter()
                .rev()
                .map(|(at, h)| (clock(*at), ago(*at), mesh::health_name(*h as i32)))
                .collect(),
        }
    });
    let events = mesh
        .events
        .iter()
        .rev()
        .filter(|e| e.instance.instance_id == id)
        .take(50)
        .map(event_row)
        .collect();
    render(InstanceView {
        source: source_line(&mesh, &traffic),
        found,
        events,
    })
}

// ----- call map -----

#[derive(Template)]
#[template(path = "map_head.html")]
struct MapHead;

/// The title of the call map.
pub fn map_head() -> String {
    render(MapHead)
}

struct EdgeRow {
    caller: String,
    callee: String,
    rate: String,
    errors: String,
    error_class: &'static str,
    /// Stroke width in the drawing.
    width: f64,
    /// Drawing coordinates: caller's row, callee's row.
    y1: f64,
    y2: f64,
}

#[derive(Template)]
#[template(path = "map.html")]
struct MapView {
    source: SourceLine,
    rows: Vec<EdgeRow>,
    callers: Vec<(String, f64)>,
    callees: Vec<(String, f64)>,
    height: f64,
    measured: bool,
}

/// Row height of the call map's drawing.
const MAP_ROW: f64 = 28.0;

/// Who calls whom, with rates and error rates, as a table and a drawing
/// (callers left, callees right) that stays readable at dozens of
/// services.
pub fn map(d: &Dashboard) -> String {
    let mesh = d.mesh.borrow();
    let traffic = d.traffic.borrow();
    let interval = traffic.interval.as_secs_f64().max(1e-3);
    let callers: Vec<String> = traffic
        .edges
        .keys()
        .map(|(c, _)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let callees: Vec<String> = traffic
        .edges
        .keys()
        .map(|(_, c)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let y = |list: &[String], name: &str| {
        list.iter().position(|n| n == name).unwrap_or(0) as f64 * MAP_ROW + MAP_ROW / 2.0
    };
    let top = traffic
        .edges
        .values()
        .map(|(c, _)| *c)
        .fold(0.0, f64::max)
        .max(1e-9);
    let rows = traffic
        .edges
        .iter()
        .map(|((caller, callee), (calls, failures))| {
            let share = failures / calls.max(1e-9);
            EdgeRow {
                caller: caller.clone(),
                callee: callee.clone(),
                rate: format!("{:.1}/s", calls / interval),
                errors: format!("{:.1} %", share * 100.0),
                error_class: if share >= 0.05 {
                    "bad"
                } else if share > 0.0 {
                    "warn"
                } else {
                    "ok"
                },
                width: 1.0 + 7.0 * (calls / top),
                y1: y(&callers, caller),
                y2: y(&callees, callee),
            }
        })
        .collect();
    let height = (callers.len().max(callees.len()).max(1)) as f64 * MAP_ROW;
    render(MapView {
        source: source_line(&mesh, &traffic),
        rows,
        callers: callers
            .iter()
            .map(|c| (c.clone(), y(&callers, c)))
            .collect(),
        callees: callees
            .iter()
            .map(|c| (c.clone(), y(&callees, c)))
            .collect(),
        height,
        measured: traffic.at.is_some(),
    })
}

// ----- registry and config -----

#[derive(Template)]
#[template(path = "registry_head.html")]
struct RegistryHead;

/// The title of the registry page.
pub fn registry_head() -> String {
    render(RegistryHead)
}

struct Problem {
    file: String,
    line: String,
    rule: String,
    message: String,
    rejected: bool,
}

/// An xDS client's rejection of what the registry sent it.
struct Rejection {
    caller: String,
    node: String,
    kind: String,
    when: String,
    reason: String,
}

#[derive(Template)]
#[template(path = "registry.html")]
struct RegistryView {
    source: SourceLine,
    replicas: Vec<(String, bool)>,
    caller: String,
    revision: u64,
    instances: usize,
    services: usize,
    since: String,
    config: String,
    config_ok: Option<bool>,
    problems: Vec<Problem>,
    rejections: Vec<Rejection>,
    metrics: Vec<(String, String)>,
    no_admin: usize,
}

/// The registry replicas, the configuration in force and its problems,
/// and which metrics sources answer.
pub fn registry(d: &Dashboard) -> String {
    let mesh = d.mesh.borrow();
    let traffic = d.traffic.borrow();
    let in_use = match &mesh.source {
        Source::Following { replica, .. } => Some(replica.clone()),
        _ => None,
    };
    let since = match &mesh.source {
        Source::Following { since, .. } => format!("followed since {}", ago(*since)),
        Source::Down { since, reason } => format!("cannot be read since {}: {reason}", ago(*since)),
        Source::Connecting => "connecting".into(),
    };
    let (config, config_ok, problems, rejections) = match &*d.config.borrow() {
        ConfigState::Unknown => ("not asked yet".into(), None, Vec::new(), Vec::new()),
        ConfigState::Unavailable(why) => (
            format!("cannot be read: {why}"),
            Some(false),
            Vec::new(),
            Vec::new(),
        ),
        ConfigState::Known(status) => (
            format!(
                "revision {}{}",
                status.revision,
                timestamp(&status.loaded_at)
                    .map(|t| format!(", in force since {} ({})", clock(t), ago(t)))
                    .unwrap_or_default()
            ),
            Some(status.problems.is_empty()),
            status
                .problems
                .iter()
                .map(|p| Problem {
                    file: p.file.clone(),
                    line: if p.line == 0 {
                        "–".into()
                    } else {
                        p.line.to_string()
                    },
                    rule: if p.rule.is_empty() {
                        "–".into()
                    } else {
                        p.rule.clone()
                    },
                    message: p.message.clone(),
                    rejected: p.rejected,
                })
                .collect(),
            status
                .xds_rejections
                .iter()
                .map(|r| Rejection {
                    caller: r.caller.clone(),
                    node: r.node.clone(),
                    kind: short_type(&r.type_url).to_owned(),
                    when: timestamp(&r.at)
                        .map(|t| format!("{} ({})", clock(t), ago(t)))
                        .unwrap_or_default(),
                    reason: r.reason.clone(),
                })
                .collect(),
        ),
    };
    render(RegistryView {
        source: source_line(&mesh, &traffic),
        replicas: d
            .replicas
            .iter()
            .map(|r| (r.clone(), in_use.as_deref() == Some(r.as_str())))
            .collect(),
        caller: d.caller.clone(),
        revision: mesh.revision,
        instances: mesh.instances.len(),
        services: mesh.by_service().len(),
        since,
        config,
        config_ok,
        problems,
        rejections,
        metrics: traffic
            .unread
            .iter()
            .map(|(id, why)| (id.clone(), why.clone()))
            .collect(),
        no_admin: traffic.no_admin,
    })
}

// ----- recent changes -----

#[derive(Template)]
#[template(path = "events_head.html")]
struct EventsHead<'a> {
    f: &'a Filters,
}

/// The filter above the recent changes.
pub fn events_head(f: &Filters) -> String {
    render(EventsHead { f })
}

struct EventRow {
    kind: &'static str,
    what: String,
    at: String,
    ago: String,
    service: String,
    id: String,
    link: String,
    address: String,
    version: String,
}

fn event_row(e: &mesh::Event) -> EventRow {
    let i = &e.instance;
    EventRow {
        kind: e.kind.name(),
        what: match e.kind {
            mesh::EventKind::Registered => "registered".into(),
            mesh::EventKind::Deregistered => "deregistered (stopped gracefully)".into(),
            mesh::EventKind::Expired => "lease expired (crashed or cut off)".into(),
            mesh::EventKind::Replaced => "replaced by a new registration".into(),
            mesh::EventKind::Gone => "gone (seen missing after a resync)".into(),
            mesh::EventKind::Health => format!("now {}", mesh::health_name(i.health)),
        },
        at: clock(e.at),
        ago: ago(e.at),
        service: i.service.clone(),
        id: i.instance_id.clone(),
        link: format!("/instances/{}", path_segment(&i.instance_id)),
        address: i.address.clone(),
        version: i.version.clone(),
    }
}

#[derive(Template)]
#[template(path = "events.html")]
struct EventsView {
    source: SourceLine,
    rows: Vec<EventRow>,
    kept: usize,
}

/// Recent registrations, removals and health changes, newest first.
pub fn events(d: &Dashboard, f: &Filters) -> String {
    let mesh = d.mesh.borrow();
    let traffic = d.traffic.borrow();
    let rows = mesh
        .events
        .iter()
        .rev()
        .filter(|e| f.admits(&e.instance) && f.finds(&e.instance))
        .take(200)
        .map(event_row)
        .collect();
    render(EventsView {
        source: source_line(&mesh, &traffic),
        rows,
        kept: mesh::MAX_EVENTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_metadata_are_recognised() {
        for k in [
            "api-key",
            "API_KEY",
            "db_password",
            "jwt.token",
            "client-secret",
        ] {
            assert!(secret(k), "{k}");
        }
        for k in ["trellis.admin", "region", "build"] {
            assert!(!secret(k), "{k}");
        }
    }

    #[test]
    fn xds_rejections_are_shown_escaped_beside_the_config() {
        let html = render(RegistryView {
            source: SourceLine {
                state: "up",
                text: String::new(),
            },
            replicas: Vec::new(),
            caller: String::new(),
            revision: 1,
            instances: 0,
            services: 0,
            since: String::new(),
            config: "revision 1".into(),
            config_ok: Some(true),
            problems: Vec::new(),
            rejections: vec![Rejection {
                caller: "spiffe://trellis.local/ns/default/sa/billing".into(),
                node: "billing-7".into(),
                kind: "Cluster".into(),
                when: "12:00:00 (5s ago)".into(),
                reason: "cluster <usage>: LB policy is not supported".into(),
            }],
            metrics: Vec::new(),
            no_admin: 0,
        });
        assert!(html.contains("id=\"xds-rejections\""), "{html}");
        assert!(
            html.contains("cluster &#60;usage&#62;: LB policy is not supported")
                || html.contains("cluster &lt;usage&gt;: LB policy is not supported"),
            "{html}"
        );
        assert!(html.contains("billing-7"), "{html}");
    }

    #[test]
    fn filters_round_trip_through_the_url() {
        let f = Filters {
            q: "usage service".into(),
            zone: "a&b".into(),
            version: String::new(),
        };
        assert_eq!(f.query(), "?q=usage%20service&zone=a%26b");
        assert_eq!(path_segment("id/1 x"), "id%2F1%20x");
    }
}
