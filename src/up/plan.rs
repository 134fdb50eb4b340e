//! Where everything listens: the mesh file's ports turned into addresses,
//! and its placeholders into each instance's command.
//!
//! Ports are taken in a fixed order (each instance's four, in service
//! order, then the edges', then the registry's admin port and the admin
//! port of each instance whose service has `metrics = true`, then a
//! private PostgreSQL's), so a mesh file
//! always gives the same addresses. Every port is checked before anything
//! starts: one already taken is an error naming it and what wanted it.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use super::mesh::{MeshFile, PortRange, PortSpec, ServiceSpec};

/// One instance of a service and its sidecar.
#[derive(Debug, Clone)]
pub struct InstancePlan {
    /// The mesh service.
    pub service: String,
    /// Its `[[service]]` entry: the index in [`MeshFile::services`].
    pub entry: usize,
    /// The entry's version, registered by its sidecar.
    pub version: Option<String>,
    /// The entry's zone, registered by its sidecar.
    pub zone: Option<String>,
    /// `user`, or `usage-1`, `usage-2` when there are several; with a
    /// version, `echo-v2` or `echo-v1-1` (see
    /// [`ServiceSpec::instance_names`]).
    pub name: String,
    /// Where the service listens (plaintext, loopback).
    pub listen: SocketAddr,
    /// The sidecar's inbound (mTLS) port.
    pub inbound: SocketAddr,
    /// The sidecar's outbound port: the service's way to the mesh.
    pub outbound: SocketAddr,
    /// The sidecar's admin port (`/ready`, `/metrics`).
    pub admin: SocketAddr,
    /// The service's own admin port (`/metrics`, `/live`), when its entry
    /// has `metrics = true`; given to it as `TRELLIS_ADMIN`.
    pub metrics: Option<SocketAddr>,
}

/// One edge: the front door for clients outside the mesh.
#[derive(Debug, Clone)]
pub struct EdgePlan {
    /// `edge` or `edge-tls`.
    pub name: String,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Its own outbound port (unused by clients, but it listens).
    pub outbound: SocketAddr,
    /// Its admin port.
    pub admin: SocketAddr,
    /// Whether it serves TLS (behind an API key).
    pub tls: bool,
}

/// Every address of the mesh.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The registry (mTLS).
    pub registry: SocketAddr,
    /// The registry's admin port (`/metrics`, `/live`).
    pub registry_admin: SocketAddr,
    /// More registry replicas (`[registry] replicas`), each where it
    /// serves and its admin port.
    pub more_registries: Vec<(SocketAddr, SocketAddr)>,
    /// Every instance, services in dependency order.
    pub instances: Vec<InstancePlan>,
    /// The edges, plaintext first.
    pub edges: Vec<EdgePlan>,
    /// The dashboard (`[dashboard]`), if the mesh has one.
    pub dashboard: Option<SocketAddr>,
    ports: PortSource,
}

/// Hands out ports: from the range in order, or any free one.
#[derive(Debug, Clone)]
struct PortSource {
    range: PortRange,
    next: u32,
    used: HashSet<u16>,
    check: bool,
}

/// A port that cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Taken by another process.
    #[error(
        "port {addr} ({wanted_by}) is already in use: stop what holds it (`ss -ltnp 'sport = :{port}'` shows it), or change {setting} in {file}"
    )]
    Taken {
        /// The address.
        addr: SocketAddr,
        /// Its port, for the hint.
        port: u16,
        /// The component that wanted it.
        wanted_by: String,
        /// The mesh file setting that gives it.
        setting: &'static str,
        /// The mesh file.
        file: String,
    },
    /// The range ran out.
    #[error(
        "[mesh] ports {first}-{last} in {file} has too few ports for this mesh ({wanted_by} found none left); widen the range"
    )]
    RangeTooSmall {
        /// Range start.
        first: u16,
        /// Range end.
        last: u16,
        /// Who found none.
        wanted_by: String,
        /// The mesh file.
        file: String,
    },
    /// The system would not give a free port.
    #[error("no free port on 127.0.0.1 for {wanted_by}: {source}")]
    NoFreePort {
        /// Who asked.
        wanted_by: String,
        /// Why.
        source: std::io::Error,
    },
}

impl PortSource {
    fn take(&mut self, wanted_by: &str, file: &Path) -> Result<SocketAddr, PortError> {
        match self.range {
            PortRange::Range(first, last) => {
                let port = u32::from(first) + self.next;
                if port > u32::from(last) {
                    return Err(PortError::RangeTooSmall {
                        first,
                        last,
                        wanted_by: wanted_by.to_owned(),
                        file: file.display().to_string(),
                    });
                }
                self.next += 1;
                let port = port as u16;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                if self.check {
                    check_free(addr, wanted_by, "[mesh] ports", file)?;
                }
                self.used.insert(port);
                Ok(addr)
            }
            PortRange::Auto => any_free_port(wanted_by, &mut self.used),
        }
    }
}

/// A port the system says is free and this plan has not handed out yet.
fn any_free_port(wanted_by: &str, used: &mut HashSet<u16>) -> Result<SocketAddr, PortError> {
    for _ in 0..64 {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|source| PortError::NoFreePort {
                wanted_by: wanted_by.to_owned(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| PortError::NoFreePort {
                wanted_by: wanted_by.to_owned(),
                source,
            })?;
        if used.insert(addr.port()) {
            return Ok(addr);
        }
    }
    Err(PortError::NoFreePort {
        wanted_by: wanted_by.to_owned(),
        source: std::io::Error::other("the system keeps handing out ports already planned"),
    })
}

fn check_free(
    addr: SocketAddr,
    wanted_by: &str,
    setting: &'static str,
    file: &Path,
) -> Result<(), PortError> {
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(_) => Err(PortError::Taken {
            addr,
            port: addr.port(),
            wanted_by: wanted_by.to_owned(),
            setting,
            file: file.display().to_string(),
        }),
    }
}

fn fixed_or_free(
    spec: PortSpec,
    wanted_by: &str,
    setting: &'static str,
    file: &Path,
    used: &mut HashSet<u16>,
    check: bool,
) -> Result<SocketAddr, PortError> {
    match spec {
        PortSpec::Fixed(addr) => {
            if check {
                check_free(addr, wanted_by, setting, file)?;
            }
            used.insert(addr.port());
            Ok(addr)
        }
        PortSpec::Auto => any_free_port(wanted_by, used),
    }
}

/// The instance names of a `[[service]]` entry: `user`, or `usage-1`,
/// `usage-2`; with a version, `echo-v2`, or `echo-v1-1`, `echo-v1-2`.
pub fn instance_names(service: &ServiceSpec) -> Vec<String> {
    service.instance_names()
}

impl Plan {
    /// Gives every component its addresses, checking each is free.
    pub fn new(file: &MeshFile) -> Result<Self, PortError> {
        Self::build(file, true)
    }

    /// The addresses the mesh file gives, without checking whether they
    /// are free (to compare with other descriptions of the same mesh).
    pub fn unchecked(file: &MeshFile) -> Result<Self, PortError> {
        Self::build(file, false)
    }

    fn build(file: &MeshFile, check: bool) -> Result<Self, PortError> {
        let path = file.path.as_path();
        let mut used = HashSet::new();
        let registry = fixed_or_free(
            file.registry_listen(),
            "the registry",
            "[registry] listen",
            path,
            &mut used,
            check,
        )?;
        let edge_listen = fixed_or_free(
            file.edge_listen(),
            "the edge",
            "[edge] listen",
            path,
            &mut used,
            check,
        )?;
        let tls_listen = file
            .edge_tls_listen()
            .map(|spec| {
                fixed_or_free(
                    spec,
                    "the TLS edge",
                    "[edge] tls_listen",
                    path,
                    &mut used,
                    check,
                )
            })
            .transpose()?;
        let mut ports = PortSource {
            range: file.port_range(),
            next: 0,
            used,
            check,
        };
        let mut instances = Vec::new();
        for (entry, service) in file.services.iter().enumerate() {
            for name in instance_names(service) {
                let mut take = |what: &str| ports.take(&format!("{name} {what}"), path);
                let listen = take("service")?;
                let inbound = take("sidecar inbound")?;
                let outbound = take("sidecar outbound")?;
                let admin = take("sidecar admin")?;
                instances.push(InstancePlan {
                    service: service.name.clone(),
                    entry,
                    version: service.version.clone(),
                    zone: service.zone.clone(),
                    name,
                    listen,
                    inbound,
                    outbound,
                    admin,
                    metrics: None,
                });
            }
        }
        let mut edges = vec![EdgePlan {
            name: "edge".to_owned(),
            listen: edge_listen,
            outbound: ports.take("edge outbound", path)?,
            admin: ports.take("edge admin", path)?,
            tls: false,
        }];
        if let Some(listen) = tls_listen {
            edges.push(EdgePlan {
                name: "edge-tls".to_owned(),
                listen,
                outbound: ports.take("edge-tls outbound", path)?,
                admin: ports.take("edge-tls admin", path)?,
                tls: true,
            });
        }
        // Taken after everything above, so that adding them left the other
        // addresses of a mesh file as they were.
        let registry_admin = ports.take("the registry admin", path)?;
        for instance in &mut instances {
            if file.services[instance.entry].metrics {
                instance.metrics = Some(ports.take(&format!("{} admin", instance.name), path)?);
            }
        }
        // Last again, for the same reason.
        let mut more_registries = Vec::new();
        for n in 2..=*file.registry.replicas.get_ref() {
            more_registries.push((
                ports.take(&format!("registry-{n}"), path)?,
                ports.take(&format!("registry-{n} admin"), path)?,
            ));
        }
        // Last of all, for the same reason.
        let dashboard = file
            .dashboard_listen()
            .map(|spec| match spec {
                PortSpec::Fixed(_) => fixed_or_free(
                    spec,
                    "the dashboard",
                    "[dashboard] listen",
                    path,
                    &mut ports.used,
                    check,
                ),
                PortSpec::Auto => ports.take("the dashboard", path),
            })
            .transpose()?;
        Ok(Self {
            dashboard,
            registry,
            registry_admin,
            more_registries,
            instances,
            edges,
            ports,
        })
    }

    /// Every registry replica's address, for `--registry`.
    pub fn registries(&self) -> String {
        std::iter::once(self.registry)
            .chain(self.more_registries.iter().map(|(listen, _)| *listen))
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One more port from the range (a private PostgreSQL's).
    pub fn extra_port(&mut self, wanted_by: &str, file: &Path) -> Result<SocketAddr, PortError> {
        self.ports.take(wanted_by, file)
    }

    /// The instances of `service`, of every entry (version) of it.
    pub fn instances_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a InstancePlan> {
        self.instances.iter().filter(move |i| i.service == service)
    }

    /// The instances of one `[[service]]` entry (its index in
    /// [`MeshFile::services`]).
    pub fn instances_of_entry(&self, entry: usize) -> impl Iterator<Item = &InstancePlan> {
        self.instances.iter().filter(move |i| i.entry == entry)
    }
}

/// What the placeholders of one instance stand for.
#[derive(Debug, Clone)]
pub struct Placeholders {
    values: BTreeMap<&'static str, String>,
}

impl Placeholders {
    /// The values for `instance`; `{admin}` only when it has an admin
    /// port of its own (`metrics = true`).
    pub fn new(instance: &InstancePlan, state: &Path, bin: &Path) -> Self {
        let mut values = BTreeMap::from([
            ("listen", instance.listen.to_string()),
            ("outbound", instance.outbound.to_string()),
            ("instance", instance.name.clone()),
            ("service", instance.service.clone()),
            ("state", state.display().to_string()),
            ("bin", bin.display().to_string()),
        ]);
        if let Some(admin) = instance.metrics {
            values.insert("admin", admin.to_string());
        }
        Self { values }
    }

    /// `text` with every `{name}` replaced; an unknown one is an error
    /// naming it.
    pub fn expand(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("{text:?} has a {{ without a closing }}"))?;
            let key = &after[..close];
            let value = self.values.get(key).ok_or_else(|| {
                let known: Vec<String> = self.values.keys().map(|k| format!("{{{k}}}")).collect();
                format!(
                    "{text:?} uses {{{key}}}; known placeholders are {}",
                    known.join(", ")
                )
            })?;
            out.push_str(value);
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// A path from the mesh file, relative to its directory.
pub fn resolve(root: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        root.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> MeshFile {
        MeshFile::parse(Path::new("trellis.toml"), text).unwrap()
    }

    #[test]
    fn auto_ports_are_distinct_and_every_instance_has_four() {
        let mut mesh = file(
            "[edge]\ntls_listen = \"auto\"\n[[service]]\nname = \"a\"\ninstances = 3\ncommand = [\"x\"]\n\
             [[service]]\nname = \"b\"\ncommand = [\"x\"]\nmetrics = true\n",
        );
        mesh.use_any_free_ports();
        let plan = Plan::new(&mesh).unwrap();
        let names: Vec<&str> = plan.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a-1", "a-2", "a-3", "b"]);
        let metrics: Vec<bool> = plan.instances.iter().map(|i| i.metrics.is_some()).collect();
        assert_eq!(metrics, [false, false, false, true]);
        let mut all: Vec<u16> = vec![plan.registry.port(), plan.registry_admin.port()];
        all.extend(
            plan.instances
                .iter()
                .filter_map(|i| i.metrics)
                .map(|a| a.port()),
        );
        for i in &plan.instances {
            all.extend([
                i.listen.port(),
                i.inbound.port(),
                i.outbound.port(),
                i.admin.port(),
            ]);
        }
        for e in &plan.edges {
            all.extend([e.listen.port(), e.outbound.port(), e.admin.port()]);
        }
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "every port once");
        assert_eq!(plan.edges.len(), 2);
    }

    #[test]
    fn every_version_of_a_service_has_its_own_instances() {
        let mut mesh = file(
            "[[service]]\nname = \"echo\"\nversion = \"v1\"\nzone = \"a\"\ninstances = 2\ncommand = [\"x\"]\n\
             [[service]]\nname = \"user\"\ncommand = [\"x\"]\n\
             [[service]]\nname = \"echo\"\nversion = \"v2\"\ncommand = [\"y\"]\n",
        );
        mesh.use_any_free_ports();
        let plan = Plan::new(&mesh).unwrap();
        let names: Vec<(&str, &str, Option<&str>, Option<&str>)> = plan
            .instances
            .iter()
            .map(|i| {
                (
                    i.service.as_str(),
                    i.name.as_str(),
                    i.version.as_deref(),
                    i.zone.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("echo", "echo-v1-1", Some("v1"), Some("a")),
                ("echo", "echo-v1-2", Some("v1"), Some("a")),
                ("user", "user", None, None),
                ("echo", "echo-v2", Some("v2"), None),
            ]
        );
        // By name, every version; by entry, that entry's alone.
        let of = |it: Vec<&InstancePlan>| it.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            of(plan.instances_of("echo").collect()),
            ["echo-v1-1", "echo-v1-2", "echo-v2"]
        );
        let v2 = mesh
            .services
            .iter()
            .position(|s| s.version.as_deref() == Some("v2"))
            .unwrap();
        assert_eq!(of(plan.instances_of_entry(v2).collect()), ["echo-v2"]);
        assert!(
            plan.instances
                .iter()
                .all(|i| mesh.services[i.entry].instance_names().contains(&i.name))
        );
    }

    #[test]
    fn a_taken_port_is_named_with_what_wanted_it() {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let mesh = file(&format!(
            "[registry]\nlisten = \"auto\"\n[edge]\nlisten = \"127.0.0.1:{port}\"\n\
             [mesh]\nports = \"auto\"\n[[service]]\nname = \"a\"\ncommand = [\"x\"]\n"
        ));
        let err = Plan::new(&mesh).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "port 127.0.0.1:{port} (the edge) is already in use"
            )),
            "{err}"
        );
        assert!(err.contains("[edge] listen in trellis.toml"), "{err}");
    }

    #[test]
    fn admin_ports_come_after_the_others_and_expand_as_admin() {
        let mesh = file(
            "[registry]\nlisten = \"127.0.0.1:7000\"\n[edge]\nlisten = \"127.0.0.1:8080\"\n\
             [mesh]\nports = \"7100-7199\"\n[[service]]\nname = \"a\"\ncommand = [\"x\", \"--admin\", \"{admin}\"]\nmetrics = true\n\
             [[service]]\nname = \"b\"\ncommand = [\"x\"]\n",
        );
        let plan = Plan::unchecked(&mesh).unwrap();
        let port = |a: SocketAddr| a.port();
        // a: 7100-7103, b: 7104-7107, the edge: 7108-7109, then the admins.
        assert_eq!(port(plan.instances[1].admin), 7107);
        assert_eq!(port(plan.edges[0].admin), 7109);
        assert_eq!(port(plan.registry_admin), 7110);
        assert_eq!(plan.instances[0].metrics.map(port), Some(7111));
        assert_eq!(plan.instances[1].metrics, None);
        let state = Path::new(".trellis");
        let bin = Path::new("bin");
        let a = Placeholders::new(&plan.instances[0], state, bin);
        assert_eq!(a.expand("{admin}").unwrap(), "127.0.0.1:7111");
        let b = Placeholders::new(&plan.instances[1], state, bin);
        let err = b.expand("{admin}").unwrap_err();
        assert!(err.contains("uses {admin}"), "{err}");
    }

    #[test]
    fn a_range_too_small_says_so() {
        let mesh = file(
            "[registry]\nlisten = \"auto\"\n[edge]\nlisten = \"auto\"\n\
             [mesh]\nports = \"1-3\"\n[[service]]\nname = \"a\"\ncommand = [\"x\"]\n",
        );
        let err = Plan::new(&mesh).unwrap_err().to_string();
        // Either port 1 cannot be bound here (taken/privileged) or the
        // range runs out: both name the range or the port.
        assert!(err.contains("ports"), "{err}");
    }

    #[test]
    fn placeholders_expand_and_unknown_ones_are_named() {
        let instance = InstancePlan {
            service: "usage".into(),
            entry: 0,
            version: None,
            zone: None,
            name: "usage-2".into(),
            listen: "127.0.0.1:7104".parse().unwrap(),
            inbound: "127.0.0.1:7105".parse().unwrap(),
            outbound: "127.0.0.1:7106".parse().unwrap(),
            admin: "127.0.0.1:7107".parse().unwrap(),
            metrics: None,
        };
        let p = Placeholders::new(
            &instance,
            Path::new(".trellis"),
            Path::new("target/release"),
        );
        assert_eq!(
            p.expand("{bin}/trellis-{service} --name {instance} {listen}")
                .unwrap(),
            "target/release/trellis-usage --name usage-2 127.0.0.1:7104"
        );
        assert!(p.expand("{nope}").unwrap_err().contains("{listen}"));
        assert!(p.expand("{open").unwrap_err().contains("without a closing"));
    }
}
