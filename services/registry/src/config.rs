//! Configuration for services and proxies, read from a directory of TOML
//! files and served live.
//!
//! `defaults.toml` holds mesh-wide defaults; `<service>.toml` the policies
//! and settings of one mesh service. The directory is re-read every
//! [`POLL_INTERVAL`]; a changed file that is valid replaces its previous
//! version and bumps the revision, which every watcher then receives. A file
//! that is not valid is rejected whole, with its file, line and reason
//! reported by GetConfigStatus and logged, and its last good version stays
//! in force. Rules naming methods that no registered contract defines are
//! reported the same way (the rule stays, since the contract may register
//! later).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use toml::Spanned;
use tonic::{Request, Response, Status};
use trellis::pb::trellis::config::v1 as pb;

use crate::quota::WatchPermit;
use crate::registry::{Declaration, Registry};
use crate::{proto_duration, validate};

/// How often the directory is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The file holding mesh-wide defaults.
pub const DEFAULTS_FILE: &str = "defaults.toml";

/// Built-in route values, used where no file sets a field.
mod builtin {
    use std::time::Duration;
    pub const MAX_ATTEMPTS: u32 = 3;
    pub const RETRYABLE: &[&str] = &["UNAVAILABLE"];
    pub const INITIAL_BACKOFF: Duration = Duration::from_millis(25);
    pub const MAX_BACKOFF: Duration = Duration::from_millis(250);
    pub const BUDGET_RATIO: f64 = 0.2;
    pub const MAX_BUFFERED_BYTES: u32 = 64 * 1024;
}

/// The longest duration a config file may give. Durations are sent as
/// protobuf Durations (i64 seconds) and proxies add them to clocks and turn
/// them into milliseconds and `grpc-timeout` headers; a day is far beyond
/// any sensible call timeout or backoff and fits all of those, so a larger
/// value is an operator's mistake reported with its line, not a panic later.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A duration written with its unit (`750ms`, `2s`), at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration with a unit such as 750ms or 2s: {e}"
            ))
        })?;
        if parsed > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "{text:?} is longer than the longest duration allowed, {}",
                humantime::format_duration(MAX_DURATION)
            )));
        }
        Ok(Dur(parsed))
    }
}

/// `*`, `pkg.Service/*` or `pkg.Service/Method`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MethodMatch(String);

impl MethodMatch {
    /// The gRPC service and method (None for `/*`) it names, or None for `*`.
    pub fn parts(&self) -> Option<(&str, Option<&str>)> {
        if self.0 == "*" {
            return None;
        }
        let (service, method) = self.0.split_once('/')?;
        Some((service, (method != "*").then_some(method)))
    }

    fn parent(&self) -> Option<MethodMatch> {
        match self.parts() {
            None => None,
            Some((service, Some(_))) => Some(MethodMatch(format!("{service}/*"))),
            Some((_, None)) => Some(MethodMatch("*".into())),
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self(text.into()));
        }
        let bad = || {
            format!(
                "{text:?} is not a method match: use \"*\", \"pkg.Service/*\" or \"pkg.Service/Method\""
            )
        };
        let (service, method) = text.split_once('/').ok_or_else(bad)?;
        validate::qualified_name(service).map_err(|_| bad())?;
        let ident_ok = method == "*"
            || (method
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && method
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !ident_ok {
            return Err(bad());
        }
        Ok(Self(text.into()))
    }
}

impl<'de> Deserialize<'de> for MethodMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A gRPC status code by name or number.
#[derive(Debug, Clone, PartialEq)]
struct Code(String);

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let upper = text.to_ascii_uppercase();
        if let Ok(n) = text.parse::<usize>()
            && let Some(name) = CODE_NAMES.get(n)
        {
            return Ok(Self((*name).into()));
        }
        if CODE_NAMES.contains(&upper.as_str()) {
            return Ok(Self(upper));
        }
        Err(serde::de::Error::custom(format!(
            "{text:?} is not a gRPC status code name (e.g. UNAVAILABLE) or number (0-16)"
        )))
    }
}

/// Who a rule applies to: a SPIFFE ID, a mesh service name, or `*`.
#[derive(Debug, Clone, PartialEq)]
struct Caller(String);

impl<'de> Deserialize<'de> for Caller {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let ok = text == "*"
            || (text.starts_with("spiffe://") && trellis::SpiffeId::parse(&text).is_ok())
            || validate::service_name(&text).is_ok();
        if ok {
            Ok(Self(text))
        } else {
            Err(serde::de::Error::custom(format!(
                "{text:?} is not a caller: use a SPIFFE ID, a mesh service name or \"*\""
            )))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Balance {
    RoundRobin,
    Random,
    LeastRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    max_attempts: Option<u32>,
    retryable_status_codes: Option<Vec<Code>>,
    initial_backoff: Option<Dur>,
    max_backoff: Option<Dur>,
    budget_ratio: Option<f64>,
    max_buffered_bytes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    method: Spanned<MethodMatch>,
    timeout: Option<Dur>,
    load_balancing: Option<Balance>,
    idempotent: Option<bool>,
    retry: Option<RetryFile>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    callers: Vec<Caller>,
    methods: Vec<Spanned<MethodMatch>>,
    action: Action,
}

/// One parsed, accepted file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// gRPC services this mesh service owns: no other identity may
    /// register them, whether or not this service has instances.
    #[serde(default)]
    grpc_services: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    /// `None` when the file has no `authorization` at all, `Some([])` for an
    /// explicit `authorization = []`: only the latter may take away every
    /// rule a previous version had (see [`ConfigStore::reload`]).
    authorization: Option<Vec<RuleFile>>,
    #[serde(default)]
    settings: toml::Table,
}

impl ConfigFile {
    fn rules(&self) -> &[RuleFile] {
        self.authorization.as_deref().unwrap_or_default()
    }
}

fn line_of(text: &str, offset: usize) -> u32 {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count() as u32
        + 1
}

/// Parses one file's text, or reports where and why it is invalid.
fn parse_file(name: &str, text: &str) -> Result<ConfigFile, pb::ConfigProblem> {
    let problem = |line, message: String| pb::ConfigProblem {
        file: name.to_owned(),
        line,
        rule: String::new(),
        message,
        rejected: true,
    };
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        problem(line, e.message().trim().to_owned())
    })?;
    for (i, g) in file.grpc_services.iter().enumerate() {
        let line = line_of(text, g.span().start);
        let rule = format!("grpc_services[{i}]");
        let message = if name == DEFAULTS_FILE {
            Some(format!(
                "{DEFAULTS_FILE} cannot own gRPC services; declare them in <service>.toml"
            ))
        } else if file.grpc_services[..i]
            .iter()
            .any(|other| other.get_ref() == g.get_ref())
        {
            Some(format!("{} is given twice", g.get_ref()))
        } else {
            validate::routable_name(g.get_ref()).err()
        };
        if let Some(message) = message {
            return Err(pb::ConfigProblem {
                rule,
                ..problem(line, message)
            });
        }
    }
    for (i, route) in file.routes.iter().enumerate() {
        if let Some(r) = &route.retry {
            if r.max_attempts == Some(0) {
                return Err(pb::ConfigProblem {
                    rule: format!("routes[{i}].retry.max_attempts"),
                    ..problem(
                        line_of(text, route.method.span().start),
                        "must be at least 1 (1 disables retries)".into(),
                    )
                });
            }
            if r.budget_ratio.is_some_and(|b| !(0.0..=1.0).contains(&b)) {
                return Err(pb::ConfigProblem {
                    rule: format!("routes[{i}].retry.budget_ratio"),
                    ..problem(
                        line_of(text, route.method.span().start),
                        "must be between 0 and 1".into(),
                    )
                });
            }
            if let (Some(a), Some(b)) = (r.initial_backoff, r.max_backoff)
                && a.0 > b.0
            {
                return Err(pb::ConfigProblem {
                    rule: format!("routes[{i}].retry"),
                    ..problem(
                        line_of(text, route.method.span().start),
                        "initial_backoff is longer than max_backoff".into(),
                    )
                });
            }
        }
        if file.routes[..i]
            .iter()
            .any(|r| r.method.get_ref() == route.method.get_ref())
        {
            return Err(pb::ConfigProblem {
                rule: format!("routes[{i}].method"),
                ..problem(
                    line_of(text, route.method.span().start),
                    format!("{} has more than one route", route.method.get_ref().0),
                )
            });
        }
    }
    Ok(file)
}

/// Checks a parsed file against what is already in force: `previous`, the
/// last good version of the same file, and `accepted`, every file's.
///
/// An empty file after a good version is taken as a failed or truncating
/// write, and a version without `authorization` after one with rules as a
/// truncated one: accepting either would turn "these callers only" into
/// "every caller". Taking every rule away takes an explicit
/// `authorization = []`.
fn check_against(
    name: &str,
    text: &str,
    file: &ConfigFile,
    previous: Option<&ConfigFile>,
    accepted: &BTreeMap<String, (String, ConfigFile)>,
) -> Result<(), pb::ConfigProblem> {
    let problem = |line, rule: String, message: String| pb::ConfigProblem {
        file: name.to_owned(),
        line,
        rule,
        message,
        rejected: true,
    };
    if let Some(previous) = previous {
        if text.trim().is_empty() {
            return Err(problem(
                0,
                String::new(),
                "file is empty; taken as a failed write, so its last good version stays in force (to drop its rules on purpose, write `authorization = []`)".into(),
            ));
        }
        if file.authorization.is_none() && !previous.rules().is_empty() {
            return Err(problem(
                0,
                "authorization".into(),
                format!(
                    "has no authorization rules where its last good version had {}; taken as truncated, so that version stays in force (to drop every rule on purpose, write `authorization = []`)",
                    previous.rules().len()
                ),
            ));
        }
    }
    for (i, g) in file.grpc_services.iter().enumerate() {
        let other = accepted.iter().find(|(other, (_, f))| {
            other.as_str() != name && f.grpc_services.iter().any(|o| o.get_ref() == g.get_ref())
        });
        if let Some((other, _)) = other {
            return Err(problem(
                line_of(text, g.span().start),
                format!("grpc_services[{i}]"),
                format!("{} is already declared by {other}", g.get_ref()),
            ));
        }
    }
    Ok(())
}

/// The gRPC service names `files` declare, each with its owner.
fn declarations(files: &BTreeMap<String, (String, ConfigFile)>) -> HashMap<String, Declaration> {
    let mut declared = HashMap::new();
    for (name, (_, file)) in files {
        let Some(service) = name.strip_suffix(".toml") else {
            continue;
        };
        for g in &file.grpc_services {
            declared
                .entry(g.get_ref().clone())
                .or_insert_with(|| Declaration {
                    service: service.to_owned(),
                    file: name.clone(),
                });
        }
    }
    declared
}

/// The accepted state of the directory.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    revision: u64,
    loaded_at: Option<SystemTime>,
    /// Accepted files by name, with their text (for line numbers).
    files: BTreeMap<String, (String, ConfigFile)>,
}

#[derive(Debug, Default)]
struct Reader {
    /// Raw text last seen per file name (accepted or not).
    seen: HashMap<String, String>,
    /// Parse problems by file name.
    rejected: BTreeMap<String, pb::ConfigProblem>,
    /// Contract problems last logged.
    unknown_logged: Vec<pb::ConfigProblem>,
}

/// The configuration store: the accepted snapshot, the problems, and the
/// watchers' channel.
#[derive(Debug)]
pub struct ConfigStore {
    dir: PathBuf,
    snapshot: watch::Sender<Arc<Snapshot>>,
    reader: Mutex<Reader>,
    registry: Arc<Registry>,
}

impl ConfigStore {
    /// Reads `dir` once; its problems are reported, not fatal. The
    /// directory itself must exist.
    pub fn open(dir: &Path, registry: Arc<Registry>) -> Result<Arc<Self>, String> {
        if !dir.is_dir() {
            return Err(format!("{}: not a directory", dir.display()));
        }
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let store = Arc::new(Self {
            dir: dir.to_path_buf(),
            snapshot,
            reader: Mutex::new(Reader::default()),
            registry,
        });
        store.reload();
        Ok(store)
    }

    /// Re-reads the directory; returns whether a new revision was accepted.
    pub fn reload(&self) -> bool {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut texts = HashMap::new();
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        match std::fs::read_to_string(&path) {
                            Ok(text) => {
                                texts.insert(name, text);
                            }
                            Err(e) => {
                                // Keep whatever was in force; try again next poll.
                                tracing::warn!(file = %path.display(), error = %e, "cannot read config file");
                                if let Some(old) = reader.seen.get(&name) {
                                    texts.insert(name, old.clone());
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read config directory");
                return false;
            }
        }
        if texts == reader.seen {
            return false;
        }
        let current = self.snapshot.borrow().clone();
        let mut files = current.files.clone();
        // A file that disappears keeps its last good version until it is
        // written again or the registry restarts: a missing file is as
        // likely a botched deploy or a remount as a deliberate removal, and
        // dropping it could drop a service's rules, which means "allow
        // every caller". It is reported until then.
        reader
            .rejected
            .retain(|name, _| texts.contains_key(name) || files.contains_key(name));
        for name in files.keys() {
            if !texts.contains_key(name) && reader.seen.contains_key(name) {
                let problem = pb::ConfigProblem {
                    file: name.clone(),
                    line: 0,
                    rule: String::new(),
                    message: "file is missing; its last good version stays in force until the file is written again or the registry restarts (to drop its rules on purpose, write `authorization = []`)".into(),
                    rejected: true,
                };
                tracing::warn!(file = %name, reason = %problem.message, "config file removed; its last good version stays in force");
                reader.rejected.insert(name.clone(), problem);
            }
        }
        // Sorted, so that of two files declaring the same gRPC service the
        // same one wins every time.
        let texts_sorted: BTreeMap<&String, &String> = texts.iter().collect();
        for (name, text) in texts_sorted {
            if reader.seen.get(name) == Some(text) {
                continue;
            }
            let stem = name.trim_end_matches(".toml");
            let parsed = if name != DEFAULTS_FILE && validate::service_name(stem).is_err() {
                Err(pb::ConfigProblem {
                    file: name.clone(),
                    line: 0,
                    rule: String::new(),
                    message: format!(
                        "file name must be {DEFAULTS_FILE} or <mesh service name>.toml; {stem:?} is not a mesh service name"
                    ),
                    rejected: true,
                })
            } else {
                parse_file(name, text).and_then(|file| {
                    check_against(name, text, &file, files.get(name).map(|(_, f)| f), &files)?;
                    Ok(file)
                })
            };
            match parsed {
                Ok(file) => {
                    reader.rejected.remove(name);
                    files.insert(name.clone(), (text.clone(), file));
                    tracing::info!(file = %name, "config file accepted");
                }
                Err(problem) => {
                    tracing::warn!(
                        file = %problem.file,
                        line = problem.line,
                        rule = %problem.rule,
                        reason = %problem.message,
                        "config file rejected; its last good version stays in force"
                    );
                    reader.rejected.insert(name.clone(), problem);
                }
            }
        }
        reader.seen = texts;
        let changed = files != current.files;
        if changed {
            self.registry.set_declared(declarations(&files));
            let next = Snapshot {
                revision: current.revision + 1,
                loaded_at: Some(SystemTime::now()),
                files,
            };
            tracing::info!(revision = next.revision, "config revision accepted");
            self.snapshot.send_replace(Arc::new(next));
        }
        drop(reader);
        self.check_contracts();
        changed
    }

    /// Problems with rules that name methods no registered contract has.
    fn contract_problems(&self) -> Vec<pb::ConfigProblem> {
        let snapshot = self.snapshot.borrow().clone();
        let mut problems = Vec::new();
        for (name, (text, file)) in &snapshot.files {
            let mut check = |rule: String, m: &Spanned<MethodMatch>| {
                let Some((service, method)) = m.get_ref().parts() else {
                    return;
                };
                if !self.registry.knows_method(service, method) {
                    problems.push(pb::ConfigProblem {
                        file: name.clone(),
                        line: line_of(text, m.span().start),
                        rule,
                        message: format!(
                            "unknown method {}: no registered contract defines it",
                            m.get_ref().0
                        ),
                        rejected: false,
                    });
                }
            };
            for (i, r) in file.routes.iter().enumerate() {
                check(format!("routes[{i}].method"), &r.method);
            }
            for (i, a) in file.rules().iter().enumerate() {
                for (j, m) in a.methods.iter().enumerate() {
                    check(format!("authorization[{i}].methods[{j}]"), m);
                }
            }
        }
        problems
    }

    /// Logs rules naming unknown methods, once per change of that list.
    pub fn check_contracts(&self) {
        let problems = self.contract_problems();
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if reader.unknown_logged == problems {
            return;
        }
        for p in problems
            .iter()
            .filter(|p| !reader.unknown_logged.contains(p))
        {
            tracing::warn!(file = %p.file, line = p.line, rule = %p.rule, reason = %p.message, "config rule names an unknown method");
        }
        reader.unknown_logged = problems;
    }

    /// Re-reads the directory every [`POLL_INTERVAL`] and re-checks rules
    /// when contracts change, until the store is dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let mut contracts = self.registry.contracts_changes();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let contracts_changed = tokio::select! {
                    _ = tick.tick() => false,
                    r = contracts.changed() => r.is_ok(),
                };
                let Some(store) = weak.upgrade() else { return };
                if contracts_changed {
                    store.check_contracts();
                } else {
                    // File I/O is small but blocking; keep it off the reactor.
                    let s = store.clone();
                    let _ = tokio::task::spawn_blocking(move || s.reload()).await;
                }
            }
        })
    }

    /// The status: revision in force and every problem.
    pub fn status(&self) -> pb::GetConfigStatusResponse {
        let snapshot = self.snapshot.borrow().clone();
        let mut problems: Vec<pb::ConfigProblem> = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rejected
            .values()
            .cloned()
            .collect();
        problems.extend(self.contract_problems());
        pb::GetConfigStatusResponse {
            revision: snapshot.revision,
            loaded_at: snapshot.loaded_at.map(prost_types::Timestamp::from),
            problems,
        }
    }

    /// The effective configuration of `service` in `snapshot`.
    fn effective(snapshot: &Snapshot, service: &str) -> (pb::ServiceConfig, String) {
        let own_name = format!("{service}.toml");
        let own = snapshot.files.get(&own_name).map(|(_, f)| f);
        let defaults = snapshot.files.get(DEFAULTS_FILE).map(|(_, f)| f);
        let layers: Vec<&ConfigFile> = own.into_iter().chain(defaults).collect();

        let mut keys: Vec<MethodMatch> = vec![MethodMatch("*".into())];
        for layer in &layers {
            for r in &layer.routes {
                if !keys.contains(r.method.get_ref()) {
                    keys.push(r.method.get_ref().clone());
                }
            }
        }
        keys.sort_by_key(|k| match k.parts() {
            None => (0, k.0.clone()),
            Some((_, None)) => (1, k.0.clone()),
            Some((_, Some(_))) => (2, k.0.clone()),
        });
        let routes = keys.iter().map(|k| resolve_route(&layers, k)).collect();

        let authorization = own
            .filter(|f| !f.rules().is_empty())
            .or(defaults)
            .map(|f| {
                f.rules()
                    .iter()
                    .map(|r| pb::AuthorizationRule {
                        callers: r.callers.iter().map(|c| c.0.clone()).collect(),
                        methods: r.methods.iter().map(|m| m.get_ref().0.clone()).collect(),
                        action: match r.action {
                            Action::Allow => pb::AuthorizationAction::Allow,
                            Action::Deny => pb::AuthorizationAction::Deny,
                        } as i32,
                    })
                    .collect()
            })
            .unwrap_or_default();

        let mut settings = defaults.map(|f| f.settings.clone()).unwrap_or_default();
        if let Some(own) = own {
            for (k, v) in &own.settings {
                settings.insert(k.clone(), v.clone());
            }
        }
        let config = pb::ServiceConfig {
            service: service.to_owned(),
            routes,
            authorization,
            settings: Some(to_struct(&settings)),
        };
        let source = if own.is_some() {
            own_name
        } else {
            String::new()
        };
        (config, source)
    }

    /// `service`'s effective configuration now.
    pub fn get(&self, service: &str) -> pb::GetConfigResponse {
        let snapshot = self.snapshot.borrow().clone();
        let (config, source) = Self::effective(&snapshot, service);
        pb::GetConfigResponse {
            config: Some(config),
            revision: snapshot.revision,
            source,
        }
    }

    /// Streams `service`'s effective configuration: now, then each change.
    /// `permit` is the caller's place in its watch quota, held while the
    /// stream is served.
    pub fn watch(
        &self,
        service: String,
        permit: WatchPermit,
    ) -> ReceiverStream<Result<pb::WatchConfigResponse, Status>> {
        let mut rx = self.snapshot.subscribe();
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            let mut last: Option<(pb::ServiceConfig, String)> = None;
            loop {
                let snapshot = rx.borrow_and_update().clone();
                let current = Self::effective(&snapshot, &service);
                if last.as_ref() != Some(&current) {
                    let response = pb::WatchConfigResponse {
                        config: Some(current.0.clone()),
                        revision: snapshot.revision,
                        source: current.1.clone(),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                    last = Some(current);
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(out)
    }
}

/// The route for `key`: each field from the most specific place that sets
/// it (the service's file, from `key` up to `*`, then the defaults' file
/// the same way), else the built-in value.
fn resolve_route(layers: &[&ConfigFile], key: &MethodMatch) -> pb::RoutePolicy {
    let mut chain: Vec<&RouteFile> = Vec::new();
    for layer in layers {
        let mut k = Some(key.clone());
        while let Some(current) = k {
            if let Some(r) = layer.routes.iter().find(|r| *r.method.get_ref() == current) {
                chain.push(r);
            }
            k = current.parent();
        }
    }
    fn pick<T>(chain: &[&RouteFile], f: impl Fn(&RouteFile) -> Option<T>) -> Option<T> {
        chain.iter().find_map(|r| f(r))
    }
    fn retry<T>(chain: &[&RouteFile], f: impl Fn(&RetryFile) -> Option<T>) -> Option<T> {
        chain.iter().find_map(|r| r.retry.as_ref().and_then(&f))
    }
    let timeout = pick(&chain, |r| r.timeout);
    let balance = pick(&chain, |r| r.load_balancing);
    let idempotent = pick(&chain, |r| r.idempotent);
    let codes = retry(&chain, |r| r.retryable_status_codes.clone());
    pb::RoutePolicy {
        method_match: key.0.clone(),
        timeout: timeout.map(|d| proto_duration(d.0)),
        retry: Some(pb::RetryPolicy {
            max_attempts: retry(&chain, |r| r.max_attempts).unwrap_or(builtin::MAX_ATTEMPTS),
            retryable_status_codes: codes
                .map(|c| c.into_iter().map(|c| c.0).collect())
                .unwrap_or_else(|| builtin::RETRYABLE.iter().map(|s| (*s).to_owned()).collect()),
            initial_backoff: Some(proto_duration(
                retry(&chain, |r| r.initial_backoff).map_or(builtin::INITIAL_BACKOFF, |d| d.0),
            )),
            max_backoff: Some(proto_duration(
                retry(&chain, |r| r.max_backoff).map_or(builtin::MAX_BACKOFF, |d| d.0),
            )),
            budget_ratio: retry(&chain, |r| r.budget_ratio).unwrap_or(builtin::BUDGET_RATIO),
            max_buffered_bytes: retry(&chain, |r| r.max_buffered_bytes)
                .unwrap_or(builtin::MAX_BUFFERED_BYTES),
        }),
        load_balancing: match balance.unwrap_or(Balance::RoundRobin) {
            Balance::RoundRobin => pb::LoadBalancing::RoundRobin,
            Balance::Random => pb::LoadBalancing::Random,
            Balance::LeastRequest => pb::LoadBalancing::LeastRequest,
        } as i32,
        idempotent: idempotent.unwrap_or(false),
    }
}

fn to_struct(table: &toml::Table) -> prost_types::Struct {
    prost_types::Struct {
        fields: table
            .iter()
            .map(|(k, v)| (k.clone(), to_value(v)))
            .collect(),
    }
}

fn to_value(value: &toml::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        toml::Value::String(s) => Kind::StringValue(s.clone()),
        toml::Value::Integer(i) => Kind::NumberValue(*i as f64),
        toml::Value::Float(f) => Kind::NumberValue(*f),
        toml::Value::Boolean(b) => Kind::BoolValue(*b),
        toml::Value::Datetime(d) => Kind::StringValue(d.to_string()),
        toml::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        toml::Value::Table(t) => Kind::StructValue(to_struct(t)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The gRPC face of the configuration store.
#[derive(Debug, Clone)]
pub struct ConfigApi {
    store: Arc<ConfigStore>,
}

impl ConfigApi {
    /// Serves `store`.
    pub fn new(store: Arc<ConfigStore>) -> Self {
        Self { store }
    }
}

fn check_service(name: &str) -> Result<(), Status> {
    validate::service_name(name).map_err(|e| trellis::status::invalid_field("service", &e))
}

#[tonic::async_trait]
impl pb::config_service_server::ConfigService for ConfigApi {
    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        trellis::tls::peer_identity(&request)?;
        let service = request.into_inner().service;
        check_service(&service)?;
        Ok(Response::new(self.store.get(&service)))
    }

    type WatchConfigStream = ReceiverStream<Result<pb::WatchConfigResponse, Status>>;

    async fn watch_config(
        &self,
        request: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        let caller = trellis::tls::peer_identity(&request)?.id.clone();
        let service = request.into_inner().service;
        check_service(&service)?;
        let permit = self.store.registry.admit_watch(&caller)?;
        Ok(Response::new(self.store.watch(service, permit)))
    }

    async fn get_config_status(
        &self,
        request: Request<pb::GetConfigStatusRequest>,
    ) -> Result<Response<pb::GetConfigStatusResponse>, Status> {
        trellis::tls::peer_identity(&request)?;
        Ok(Response::new(self.store.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let text = r#"
[[routes]]
method = "*"
timeout = "2s"

[[routes]]
method = "telco.usage.v1.UsageService/RecordUsage"
idempotent = true
load_balancing = "least_request"
retry = { max_attempts = 4, retryable_status_codes = ["unavailable", "8"], initial_backoff = "10ms" }

[[authorization]]
callers = ["settlement", "spiffe://trellis.local/ns/default/sa/edge"]
methods = ["telco.usage.v1.UsageService/*"]
action = "allow"

[settings]
currency = "EUR"
"#;
        let file = parse_file("usage.toml", text).unwrap();
        assert_eq!(file.routes.len(), 2);
        let snapshot = Snapshot {
            revision: 1,
            loaded_at: None,
            files: [("usage.toml".to_owned(), (text.to_owned(), file))].into(),
        };
        let (config, source) = ConfigStore::effective(&snapshot, "usage");
        assert_eq!(source, "usage.toml");
        let record = config
            .routes
            .iter()
            .find(|r| r.method_match.ends_with("RecordUsage"))
            .unwrap();
        // Own field, inherited field ("*" timeout), built-in field.
        assert!(record.idempotent);
        assert_eq!(record.timeout.unwrap().seconds, 2);
        let retry = record.retry.as_ref().unwrap();
        assert_eq!(retry.max_attempts, 4);
        assert_eq!(
            retry.retryable_status_codes,
            ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
        );
        assert_eq!(retry.max_backoff.unwrap().nanos, 250_000_000);
        assert_eq!(record.load_balancing(), pb::LoadBalancing::LeastRequest);
        assert_eq!(config.authorization.len(), 1);
    }

    #[test]
    fn reports_file_line_and_reason() {
        let cases = [
            (
                "[[routes]]\nmethod = \"*\"\ntimeout = \"soon\"\n",
                3,
                "not a duration",
            ),
            (
                "[[routes]]\nmethod = \"UsageService\"\n",
                2,
                "not a method match",
            ),
            (
                "[[routes]]\nmethod = \"*\"\ntimout = \"1s\"\n",
                3,
                "unknown field `timout`",
            ),
            (
                "[[authorization]]\ncallers = [\"Bad Name\"]\nmethods = [\"*\"]\naction = \"allow\"\n",
                2,
                "not a caller",
            ),
            (
                "[[authorization]]\ncallers = [\"*\"]\nmethods = [\"*\"]\naction = \"maybe\"\n",
                4,
                "unknown variant",
            ),
            (
                "[[routes]]\nmethod = \"*\"\nretry = { retryable_status_codes = [\"NOPE\"] }\n",
                3,
                "not a gRPC status code",
            ),
            (
                "[[routes]]\nmethod = \"*\"\n[[routes]]\nmethod = \"*\"\n",
                4,
                "more than one route",
            ),
            ("this is not toml", 1, ""),
            (
                "[[routes]]\nmethod = \"*\"\ntimeout = \"10000000000000000000s\"\n",
                3,
                "longer than the longest duration allowed",
            ),
            (
                "[[routes]]\nmethod = \"*\"\nretry = { max_backoff = \"25h\" }\n",
                3,
                "longer than the longest duration allowed",
            ),
            (
                "\ngrpc_services = [\"grpc.health.v1.Health\"]\n",
                2,
                "never a routable name",
            ),
            ("grpc_services = [\"a.B\", \"a.B\"]\n", 1, "given twice"),
        ];
        for (text, line, reason) in cases {
            let problem = parse_file("usage.toml", text).unwrap_err();
            assert_eq!(problem.file, "usage.toml");
            assert_eq!(problem.line, line, "{text}: {problem:?}");
            assert!(problem.message.contains(reason), "{text}: {problem:?}");
            assert!(problem.rejected);
        }
        let problem = parse_file("defaults.toml", "grpc_services = [\"a.B\"]\n").unwrap_err();
        assert!(problem.message.contains("cannot own"), "{problem:?}");
        // The longest allowed duration still fits every representation.
        let file = parse_file(
            "usage.toml",
            "[[routes]]\nmethod = \"*\"\ntimeout = \"24h\"\n",
        );
        assert!(file.is_ok(), "{file:?}");
    }

    #[test]
    fn losing_every_rule_takes_an_explicit_empty_list() {
        let with_rules =
            "[[authorization]]\ncallers = [\"*\"]\nmethods = [\"*\"]\naction = \"allow\"\n";
        let previous = parse_file("usage.toml", with_rules).unwrap();
        let accepted = BTreeMap::new();
        let check = |text: &str| {
            let file = parse_file("usage.toml", text).unwrap();
            check_against("usage.toml", text, &file, Some(&previous), &accepted)
        };
        assert!(check("").unwrap_err().message.contains("empty"));
        assert!(check("  \n").unwrap_err().message.contains("empty"));
        assert!(
            check("# cut\n")
                .unwrap_err()
                .message
                .contains("authorization = []")
        );
        assert!(check("authorization = []\n").is_ok());
        assert!(check(with_rules).is_ok());
        // A first version may be empty: there is nothing to lose.
        let empty = parse_file("usage.toml", "").unwrap();
        assert!(check_against("usage.toml", "", &empty, None, &accepted).is_ok());
    }

    #[test]
    fn a_grpc_service_is_declared_by_one_file() {
        let text = "grpc_services = [\"telco.usage.v1.UsageService\"]\n";
        let usage = parse_file("usage.toml", text).unwrap();
        let accepted: BTreeMap<_, _> = [("usage.toml".to_owned(), (text.to_owned(), usage))].into();
        let echo = parse_file("echo.toml", text).unwrap();
        let problem = check_against("echo.toml", text, &echo, None, &accepted).unwrap_err();
        assert!(
            problem.message.contains("already declared by usage.toml"),
            "{problem:?}"
        );
        assert_eq!(problem.line, 1);
        let declared = declarations(&accepted);
        assert_eq!(declared["telco.usage.v1.UsageService"].service, "usage");
    }
}
