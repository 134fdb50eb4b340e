//! The mesh file (`trellis.toml`): what `trellis up` runs.
//!
//! Parsed once, strictly: an unknown key, a missing command, a dependency
//! on a service that is not listed or a dependency cycle is refused with
//! the file, the line and the reason, before anything starts.
//!
//! One mesh service may have several `[[service]]` entries, one per
//! `version`, to run a canary beside the release it replaces. They share
//! everything that belongs to the service (its identity, its config file,
//! its database) and differ in what belongs to a build: the command, the
//! number of instances, the environment, the sidecars' flags.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Most instances one service may ask for: each takes four ports and four
/// processes, so a typo (`instances = 200`) is refused rather than tried.
pub const MAX_INSTANCES: u32 = 32;
/// Most services one mesh file may list.
pub const MAX_SERVICES: usize = 64;
/// Longest `version` or `zone`: the registry's limit on both labels.
pub const MAX_LABEL: usize = 64;

/// A parsed, checked mesh file.
#[derive(Debug, Clone)]
pub struct MeshFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// `[mesh]`.
    pub mesh: MeshSection,
    /// `[[build]]` steps, in order.
    pub build: Vec<BuildStep>,
    /// `[registry]`.
    pub registry: RegistrySection,
    /// `[postgres]`.
    pub postgres: PostgresSection,
    /// `[edge]`.
    pub edge: EdgeSection,
    /// `[dashboard]`: the mesh in a browser; none when the section is
    /// absent.
    pub dashboard: Option<DashboardSection>,
    /// `[[service]]` entries, in dependency order (an entry after every
    /// entry of each service it depends on; otherwise in file order). A
    /// service run in several versions has an entry per version.
    pub services: Vec<ServiceSpec>,
    /// `[banner] text`: printed once the mesh is up (calls to try).
    pub banner: Option<String>,
}

/// `[mesh]`: where things go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// State directory: certificates, logs, the archive, a private
    /// PostgreSQL. Relative to the mesh file's directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The ports instances and sidecars take, in order.
    #[serde(default = "default_ports")]
    pub ports: Spanned<String>,
    /// The directory the registry serves through the Config API.
    #[serde(default = "default_config_dir")]
    pub config_dir: PathBuf,
    /// Where `{bin}` points: the built binaries.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
}

/// One `[[build]]` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildStep {
    /// Shown while it runs.
    pub name: String,
    /// Program and arguments, run in the mesh file's directory.
    pub command: Vec<String>,
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySection {
    /// Where the registry serves (mTLS), or `auto`.
    #[serde(default = "default_registry_listen")]
    pub listen: Spanned<String>,
    /// Keep the mesh in etcd (`etcd://host:port[,host:port...]`, an etcd
    /// that runs already) instead of the registry's state directory.
    #[serde(default)]
    pub store: Option<Spanned<String>>,
    /// How many registry replicas to run (more than one needs `store`);
    /// every sidecar and edge is given them all.
    #[serde(default = "default_registry_replicas")]
    pub replicas: Spanned<usize>,
}

/// Most registry replicas `trellis up` runs.
pub const MAX_REGISTRY_REPLICAS: usize = 5;

fn default_registry_replicas() -> Spanned<usize> {
    Spanned::new(0..0, 1)
}

/// `[postgres]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// The server (`postgres://user@host:port`); `DATABASE_URL` wins over
    /// it. Unset: 127.0.0.1:5432, else a private cluster.
    pub url: Option<String>,
    /// Databases are named `<prefix>_<service>`. Unset: `trellis_<id>`,
    /// with an id made once per state directory, so the databases belong
    /// to the state directory (its archive, its certificates) and a fresh
    /// state directory starts from empty databases.
    pub database_prefix: Option<String>,
    /// Always run a private cluster under the state directory.
    #[serde(default)]
    pub private: bool,
}

/// `[edge]`: the front door.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSection {
    /// The plaintext (h2c) edge, every call public; or `auto`.
    #[serde(default = "default_edge_listen")]
    pub listen: Spanned<String>,
    /// The TLS edge, behind an API key made at start-up; or `auto`.
    pub tls_listen: Option<Spanned<String>>,
}

/// `[dashboard]`: `trellis dashboard`, reading the registry and the
/// sidecars' metrics, its console calling through the TLS edge (else the
/// plaintext one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSection {
    /// Where it serves (plain HTTP); or `auto`.
    pub listen: Spanned<String>,
}

/// One `[[service]]` entry.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The mesh service name: its identity, its config file, its
    /// databases' suffix. Entries with the same name are one service.
    pub name: String,
    /// The version its sidecars register (`--service-version`), which
    /// traffic splits name. Set, and distinct, on every entry when a name
    /// has several.
    pub version: Option<String>,
    /// The zone its sidecars register (`--zone`).
    pub zone: Option<String>,
    /// How many instances, each with its own sidecar.
    pub instances: u32,
    /// Program and arguments, placeholders expanded per instance.
    pub command: Vec<String>,
    /// Extra environment, placeholders expanded per instance.
    pub env: BTreeMap<String, String>,
    /// Whether it gets `TRELLIS_DATABASE_URL` (the same on every entry of
    /// a name: they share the database).
    pub database: bool,
    /// Services (every entry of each) that must be serving before this
    /// entry starts.
    pub depends_on: Vec<String>,
    /// Extra flags for each of its sidecars.
    pub sidecar_args: Vec<String>,
    /// Whether its process serves its own `/metrics` and `/live` on the
    /// address in `TRELLIS_ADMIN` (the Trellis services' `--admin`): each
    /// instance is then given one more port for it.
    pub metrics: bool,
    /// The line of its `[[service]]` table, for messages.
    pub line: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default = "default_mesh")]
    mesh: MeshSection,
    #[serde(default)]
    build: Vec<BuildStep>,
    #[serde(default = "default_registry")]
    registry: RegistrySection,
    #[serde(default)]
    postgres: PostgresSection,
    #[serde(default = "default_edge")]
    edge: EdgeSection,
    dashboard: Option<DashboardSection>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    banner: Option<Banner>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Banner {
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    version: Option<Spanned<String>>,
    zone: Option<Spanned<String>>,
    #[serde(default = "one")]
    instances: Spanned<u32>,
    command: Spanned<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "no_database")]
    database: Spanned<bool>,
    #[serde(default = "no_dependencies")]
    depends_on: Spanned<Vec<String>>,
    #[serde(default = "no_sidecar_args")]
    sidecar_args: Spanned<Vec<String>>,
    #[serde(default)]
    metrics: bool,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".trellis")
}
fn default_ports() -> Spanned<String> {
    Spanned::new(0..0, "7100-7299".to_owned())
}
fn default_config_dir() -> PathBuf {
    PathBuf::from("config")
}
fn default_bin_dir() -> PathBuf {
    PathBuf::from("target/release")
}
fn default_registry_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:7000".to_owned())
}
fn default_edge_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8080".to_owned())
}
fn default_mesh() -> MeshSection {
    MeshSection {
        state_dir: default_state_dir(),
        ports: default_ports(),
        config_dir: default_config_dir(),
        bin_dir: default_bin_dir(),
    }
}
fn default_registry() -> RegistrySection {
    RegistrySection {
        listen: default_registry_listen(),
        store: None,
        replicas: default_registry_replicas(),
    }
}
fn default_edge() -> EdgeSection {
    EdgeSection {
        listen: default_edge_listen(),
        tls_listen: None,
    }
}
fn no_dependencies() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}
fn no_sidecar_args() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}
fn no_database() -> Spanned<bool> {
    Spanned::new(0..0, false)
}
fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// Why a mesh file was refused: where, and what to change.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct MeshFileError {
    /// The file.
    pub path: PathBuf,
    /// The line, when the problem has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// Where one port comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    /// This address.
    Fixed(SocketAddr),
    /// Any free port on 127.0.0.1.
    Auto,
}

/// The `ports` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRange {
    /// Taken in order from this range (inclusive).
    Range(u16, u16),
    /// Any free ports.
    Auto,
}

impl MeshFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, MeshFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| MeshFileError {
            path: path.to_owned(),
            line: None,
            message: format!("cannot be read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, MeshFileError> {
        let error = |span: Option<Range<usize>>, message: String| MeshFileError {
            path: path.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let message = e.message().to_owned();
            error(e.span(), message)
        })?;

        if raw.service.is_empty() {
            return Err(error(None, "lists no [[service]]".to_owned()));
        }
        if raw.service.len() > MAX_SERVICES {
            return Err(error(
                None,
                format!(
                    "lists {} services; at most {MAX_SERVICES} are supported",
                    raw.service.len()
                ),
            ));
        }
        parse_port_range(raw.mesh.ports.get_ref())
            .map_err(|m| error(Some(raw.mesh.ports.span()), format!("[mesh] ports: {m}")))?;
        parse_port_spec(raw.registry.listen.get_ref()).map_err(|m| {
            error(
                Some(raw.registry.listen.span()),
                format!("[registry] listen: {m}"),
            )
        })?;
        let replicas = &raw.registry.replicas;
        if !(1..=MAX_REGISTRY_REPLICAS).contains(replicas.get_ref()) {
            return Err(error(
                Some(replicas.span()),
                format!(
                    "[registry] replicas = {}: must be 1 to {MAX_REGISTRY_REPLICAS}",
                    replicas.get_ref()
                ),
            ));
        }
        match &raw.registry.store {
            Some(store) if !store.get_ref().starts_with("etcd://") => {
                return Err(error(
                    Some(store.span()),
                    format!(
                        "[registry] store = {:?}: must be etcd://host:port[,host:port...] (an etcd that runs already)",
                        store.get_ref()
                    ),
                ));
            }
            None if *replicas.get_ref() > 1 => {
                return Err(error(
                    Some(replicas.span()),
                    "[registry] replicas: more than one replica needs a shared store: set [registry] store = \"etcd://host:port\"".to_owned(),
                ));
            }
            _ => {}
        }
        parse_port_spec(raw.edge.listen.get_ref())
            .map_err(|m| error(Some(raw.edge.listen.span()), format!("[edge] listen: {m}")))?;
        if let Some(tls) = &raw.edge.tls_listen {
            parse_port_spec(tls.get_ref())
                .map_err(|m| error(Some(tls.span()), format!("[edge] tls_listen: {m}")))?;
        }
        if let Some(d) = &raw.dashboard {
            parse_port_spec(d.listen.get_ref())
                .map_err(|m| error(Some(d.listen.span()), format!("[dashboard] listen: {m}")))?;
        }
        for (i, step) in raw.build.iter().enumerate() {
            if step.command.is_empty() || step.command[0].is_empty() {
                return Err(error(
                    None,
                    format!("[[build]] #{} ({}) has an empty command", i + 1, step.name),
                ));
            }
        }
        if let Some(prefix) = &raw.postgres.database_prefix
            && !valid_name(prefix)
        {
            return Err(error(
                None,
                format!(
                    "[postgres] database_prefix {prefix:?} must be lowercase letters, digits and _ (it names databases)"
                ),
            ));
        }

        let mut services: Vec<ServiceSpec> = Vec::with_capacity(raw.service.len());
        // Each name's entries so far, as indices into `services`.
        let mut entries: HashMap<String, Vec<usize>> = HashMap::new();
        for spanned in &raw.service {
            let service = spanned.get_ref();
            let name = service.name.get_ref();
            let line = line_of(text, spanned.span().start);
            // A key left out has no span of its own: point at its entry.
            let or_entry = |span: Range<usize>| {
                if span == (0..0) { spanned.span() } else { span }
            };
            if !valid_name(name) {
                return Err(error(
                    Some(service.name.span()),
                    format!(
                        "service name {name:?} must be lowercase letters, digits, - and _ (it is an identity and a config file name)"
                    ),
                ));
            }
            if matches!(name.as_str(), "registry" | "edge" | "cli" | "dashboard") {
                return Err(error(
                    Some(service.name.span()),
                    format!(
                        "service name {name:?} is taken by the mesh itself (registry, edge, cli, dashboard)"
                    ),
                ));
            }
            let label = |key: &str, value: &Option<Spanned<String>>| {
                let Some(value) = value else {
                    return Ok(None);
                };
                check_label(value.get_ref())
                    .map(|()| Some(value.get_ref().clone()))
                    .map_err(|m| error(Some(value.span()), format!("service {name:?}: {key} {m}")))
            };
            let version = label("version", &service.version)?;
            let zone = label("zone", &service.zone)?;
            let database = *service.database.get_ref();
            // Entries of one name are one service: versions tell them
            // apart, and what belongs to the service must agree.
            for earlier in entries.get(name).into_iter().flatten() {
                let earlier = &services[*earlier];
                match (&earlier.version, &version, &service.version) {
                    (Some(_), Some(_), Some(spanned_version)) if earlier.version == version => {
                        return Err(error(
                            Some(spanned_version.span()),
                            format!(
                                "service {name:?} has version {:?} twice (first on line {}); give each entry of {name:?} a distinct `version`",
                                spanned_version.get_ref(),
                                earlier.line
                            ),
                        ));
                    }
                    (Some(_), Some(_), _) => {}
                    _ => {
                        return Err(error(
                            Some(service.name.span()),
                            format!(
                                "service {name:?} is listed twice (first on line {}); to run two versions of it side by side, give each entry a distinct `version` (e.g. version = \"v1\" and version = \"v2\")",
                                earlier.line
                            ),
                        ));
                    }
                }
                if earlier.database != database {
                    return Err(error(
                        Some(or_entry(service.database.span())),
                        format!(
                            "service {name:?} has database = {database} here but database = {} on line {}; its entries share one database, so give each the same `database`",
                            earlier.database, earlier.line
                        ),
                    ));
                }
            }
            for arg in service.sidecar_args.get_ref() {
                for (flag, key) in [("--service-version", "version"), ("--zone", "zone")] {
                    if arg == flag || arg.starts_with(&format!("{flag}=")) {
                        return Err(error(
                            Some(or_entry(service.sidecar_args.span())),
                            format!(
                                "service {name:?}: sidecar_args gives {flag}; set `{key} = \"...\"` in the [[service]] entry instead (trellis up passes it to each of the entry's sidecars)"
                            ),
                        ));
                    }
                }
            }
            let instances = *service.instances.get_ref();
            if instances == 0 || instances > MAX_INSTANCES {
                return Err(error(
                    Some(service.instances.span()),
                    format!(
                        "service {name:?}: instances must be 1 to {MAX_INSTANCES}, not {instances}"
                    ),
                ));
            }
            let command = service.command.get_ref();
            if command.is_empty() || command[0].is_empty() {
                return Err(error(
                    Some(service.command.span()),
                    format!(
                        "service {name:?}: command is empty; give the program and its arguments"
                    ),
                ));
            }
            entries
                .entry(name.clone())
                .or_default()
                .push(services.len());
            services.push(ServiceSpec {
                name: name.clone(),
                version,
                zone,
                instances,
                command: command.clone(),
                env: service.env.clone(),
                database,
                depends_on: service.depends_on.get_ref().clone(),
                sidecar_args: service.sidecar_args.get_ref().clone(),
                metrics: service.metrics,
                line,
            });
        }
        check_process_names(&services)
            .map_err(|(i, message)| error(Some(raw.service[i].get_ref().name.span()), message))?;
        for (spanned, spec) in raw.service.iter().zip(&services) {
            for dep in &spec.depends_on {
                if !entries.contains_key(dep) {
                    return Err(error(
                        Some(spanned.get_ref().depends_on.span()),
                        format!(
                            "service {:?} depends on {dep:?}, which is not a [[service]] here",
                            spec.name
                        ),
                    ));
                }
                if dep == &spec.name {
                    return Err(error(
                        Some(spanned.get_ref().depends_on.span()),
                        format!("service {:?} depends on itself", spec.name),
                    ));
                }
            }
        }
        let services = dependency_order(services).map_err(|(line, cycle)| MeshFileError {
            path: path.to_owned(),
            line: Some(line),
            message: format!("services depend on each other in a cycle: {cycle}"),
        })?;

        Ok(Self {
            path: path.to_owned(),
            mesh: raw.mesh,
            build: raw.build,
            registry: raw.registry,
            postgres: raw.postgres,
            edge: raw.edge,
            dashboard: raw.dashboard,
            services,
            banner: raw.banner.map(|b| b.text),
        })
    }

    /// The directory relative paths in the file are taken from.
    pub fn root(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    /// The `ports` range.
    pub fn port_range(&self) -> PortRange {
        parse_port_range(self.mesh.ports.get_ref()).expect("checked when parsed")
    }

    /// The registry's address.
    pub fn registry_listen(&self) -> PortSpec {
        parse_port_spec(self.registry.listen.get_ref()).expect("checked when parsed")
    }

    /// The plaintext edge's address.
    pub fn edge_listen(&self) -> PortSpec {
        parse_port_spec(self.edge.listen.get_ref()).expect("checked when parsed")
    }

    /// The TLS edge's address, if there is one.
    pub fn edge_tls_listen(&self) -> Option<PortSpec> {
        self.edge
            .tls_listen
            .as_ref()
            .map(|s| parse_port_spec(s.get_ref()).expect("checked when parsed"))
    }

    /// The dashboard's address, if the mesh has one.
    pub fn dashboard_listen(&self) -> Option<PortSpec> {
        self.dashboard
            .as_ref()
            .map(|d| parse_port_spec(d.listen.get_ref()).expect("checked when parsed"))
    }

    /// Every port becomes `auto`: for tests and for running a second mesh
    /// beside the first.
    pub fn use_any_free_ports(&mut self) {
        let auto = |s: &mut Spanned<String>| *s = Spanned::new(s.span(), "auto".to_owned());
        auto(&mut self.mesh.ports);
        auto(&mut self.registry.listen);
        auto(&mut self.edge.listen);
        if let Some(tls) = &mut self.edge.tls_listen {
            auto(tls);
        }
        if let Some(d) = &mut self.dashboard {
            auto(&mut d.listen);
        }
    }

    /// The first entry of the service named `name`: enough for what its
    /// entries share (the identity, `database`); [`Self::entries`] gives
    /// them all.
    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Every entry of the service named `name` (one per version).
    pub fn entries<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ServiceSpec> {
        self.services.iter().filter(move |s| s.name == name)
    }

    /// Each service's name once, in the order of [`Self::services`].
    pub fn service_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::with_capacity(self.services.len());
        for service in &self.services {
            if !names.contains(&service.name.as_str()) {
                names.push(&service.name);
            }
        }
        names
    }
}

impl ServiceSpec {
    /// How the launcher's log names this entry: `echo`, or `echo v2`.
    pub fn label(&self) -> String {
        match &self.version {
            Some(version) => format!("{} {version}", self.name),
            None => self.name.clone(),
        }
    }

    /// How messages name this entry: `service "echo"`, or
    /// `service "echo" version "v2"`.
    pub fn describe(&self) -> String {
        match &self.version {
            Some(version) => format!("service {:?} version {version:?}", self.name),
            None => format!("service {:?}", self.name),
        }
    }

    /// Its instances' names: `user`, or `usage-1`, `usage-2` when there
    /// are several; with a version, `echo-v2`, or `echo-v1-1`, `echo-v1-2`.
    /// They name processes, log and pid files, so in the version anything
    /// but letters, digits, `.`, `-` and `_` becomes `_`.
    pub fn instance_names(&self) -> Vec<String> {
        let base = match &self.version {
            Some(version) => {
                let version: String = version
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("{}-{version}", self.name)
            }
            None => self.name.clone(),
        };
        if self.instances == 1 {
            vec![base]
        } else {
            (1..=self.instances)
                .map(|i| format!("{base}-{i}"))
                .collect()
        }
    }
}

/// `a-b` or `auto`.
fn parse_port_range(text: &str) -> Result<PortRange, String> {
    if text == "auto" {
        return Ok(PortRange::Auto);
    }
    let bad = || format!("{text:?} is not a range such as \"7100-7299\" or \"auto\"");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok(PortRange::Range(a, b))
}

/// `host:port` (an IP address) or `auto`.
fn parse_port_spec(text: &str) -> Result<PortSpec, String> {
    if text == "auto" {
        return Ok(PortSpec::Auto);
    }
    text.parse::<SocketAddr>()
        .map(PortSpec::Fixed)
        .map_err(|_| format!("{text:?} is not an address such as \"127.0.0.1:8080\" or \"auto\""))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase()
}

/// A `version` or `zone`: what the registry takes as a label.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL || !label.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{label:?} must be 1 to {MAX_LABEL} printable ASCII characters without spaces (e.g. \"v2\")"
        ));
    }
    Ok(())
}

/// The processes `trellis up` runs besides instances and their sidecars:
/// their names are taken (log and pid files are named after processes).
const OWN_PROCESSES: [&str; 6] = [
    "registry",
    "edge",
    "edge-tls",
    "postgres",
    "trellis-up",
    "dashboard",
];

/// Every instance and its sidecar (`<instance>-proxy`) need a process name
/// of their own; otherwise the entry (its index) whose instance would
/// take a name already taken, and why.
fn check_process_names(services: &[ServiceSpec]) -> Result<(), (usize, String)> {
    let mut taken: HashMap<String, String> = OWN_PROCESSES
        .iter()
        .map(|p| ((*p).to_owned(), format!("the mesh's own {p} process")))
        .collect();
    for (i, service) in services.iter().enumerate() {
        for instance in service.instance_names() {
            let sidecar = format!("{instance}-proxy");
            for (process, what) in [
                (&instance, "an instance"),
                (&sidecar, "the sidecar of an instance"),
            ] {
                if let Some(holder) = taken.get(process) {
                    return Err((
                        i,
                        format!(
                            "{}: {what} would be named {process:?}, as {holder} is; rename a service or change a version so their names differ",
                            service.describe()
                        ),
                    ));
                }
                taken.insert(
                    process.clone(),
                    format!("{what} of {} (line {})", service.describe(), service.line),
                );
            }
        }
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Orders entries so each comes after every entry of the services it
/// depends on (stable: file order otherwise), or names a cycle.
fn dependency_order(services: Vec<ServiceSpec>) -> Result<Vec<ServiceSpec>, (usize, String)> {
    let mut placed: Vec<ServiceSpec> = Vec::with_capacity(services.len());
    // Entries of each name not placed yet.
    let mut unplaced: HashMap<String, usize> = HashMap::new();
    for s in &services {
        *unplaced.entry(s.name.clone()).or_default() += 1;
    }
    let mut left = services;
    while !left.is_empty() {
        let ready = left.iter().position(|s| {
            s.depends_on
                .iter()
                .all(|d| unplaced.get(d).is_none_or(|n| *n == 0))
        });
        match ready {
            Some(i) => {
                let service = left.remove(i);
                if let Some(n) = unplaced.get_mut(&service.name) {
                    *n -= 1;
                }
                placed.push(service);
            }
            None => {
                let mut names: Vec<&str> = Vec::new();
                for s in &left {
                    if !names.contains(&s.name.as_str()) {
                        names.push(&s.name);
                    }
                }
                return Err((left[0].line, names.join(", ")));
            }
        }
    }
    Ok(placed)
}

#[cfg(test)]
mod tests;
