//! `compose.yaml` runs the mesh of `trellis.toml` as containers: these
//! tests hold the two together. Every instance `trellis up` would start
//! has its container and a sidecar container in the same network
//! namespace, with the ports of `trellis up`'s own plan, the environment a
//! service gets from `trellis up`, the sidecar flags `trellis up` gives
//! (inbound on 0.0.0.0 and advertised by the container's address), and
//! the same start order; the registry and the edges listen where the plan
//! says; and nothing runs that `trellis.toml` does not know of. A
//! difference fails with the container and what differs.
//!
//! This only reads the file. That Compose itself accepts it is checked
//! with a real Compose parser (see README.md, "Containers").

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use trellis::up::mesh::{MeshFile, ServiceSpec};
use trellis::up::plan::{InstancePlan, Placeholders, Plan};
use yaml_rust2::{Yaml, YamlLoader};

/// Where certificates are mounted in every container that has them.
const CERTS: &str = "/certs";
/// The compose services that `trellis.toml` has no entry for.
const POSTGRES: &str = "postgres";
const CERTS_INIT: &str = "certs";
const REGISTRY: &str = "registry";
/// The network the mesh's fixed addresses are on.
const NETWORK: &str = "mesh";

fn repo(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
}

fn load_compose(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{} must hold one document", path.display());
    docs.remove(0)
}

fn load_mesh() -> MeshFile {
    MeshFile::load(&repo("trellis.toml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn compose_yaml_runs_the_mesh_of_trellis_toml() {
    let mesh = load_mesh();
    let compose = load_compose(&repo("compose.yaml"));
    let problems = check(&mesh, &compose);
    assert!(
        problems.is_empty(),
        "compose.yaml does not match trellis.toml ({} differences; fix compose.yaml, or trellis.toml if it is the one that is wrong):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
}

/// The checker finds drift: each change to a copy of compose.yaml is
/// reported, naming the container.
#[test]
fn a_drifted_compose_file_is_reported_by_container() {
    let mesh = load_mesh();
    let good = load_compose(&repo("compose.yaml"));
    let plan = Plan::unchecked(&mesh).unwrap();
    let with_database = plan
        .instances
        .iter()
        .find(|i| mesh.service(&i.service).is_some_and(|s| s.database))
        .expect("trellis.toml has a service with a database");
    let app = with_database.name.as_str();
    let sidecar = format!("{app}-proxy");
    let sidecar = sidecar.as_str();

    let reported = |what: &str, expected: &str, change: &dyn Fn(&mut Yaml)| {
        let mut drifted = good.clone();
        change(&mut drifted);
        let problems = check(&mesh, &drifted);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "changing {what}: expected a problem containing {expected:?}, got {problems:#?}"
        );
    };
    reported(
        "a sidecar's admin port",
        &format!("{sidecar}: --admin is 127.0.0.1:1;"),
        &|c| set_flag(&mut c["services"][sidecar], "--admin", "127.0.0.1:1"),
    );
    reported(
        "a sidecar's identity",
        &format!("{sidecar}: --cert is /certs/edge.pem;"),
        &|c| set_flag(&mut c["services"][sidecar], "--cert", "/certs/edge.pem"),
    );
    reported(
        "a zone trellis.toml does not give",
        &format!("{sidecar}: --zone is a; trellis.toml's entry (line"),
        &|c| {
            if let Yaml::Array(args) = &mut c["services"][sidecar]["command"] {
                args.extend(["--zone", "a"].map(|a| Yaml::String(a.to_owned())));
            }
        },
    );
    reported(
        "a sidecar's network namespace",
        &format!("{sidecar}: network_mode is \"service:registry\""),
        &|c| {
            c["services"][sidecar]["network_mode"] = Yaml::String("service:registry".into());
        },
    );
    reported(
        "a missing sidecar",
        &format!("no sidecar container `{sidecar}`"),
        &|c| remove(&mut c["services"], sidecar),
    );
    reported(
        "the database URL",
        &format!("{app}: TRELLIS_DATABASE_URL is not set"),
        &|c| {
            remove(
                &mut c["services"][app]["environment"],
                "TRELLIS_DATABASE_URL",
            )
        },
    );
    reported(
        "the start order",
        &format!("{app}: waits for {}, which trellis up does not", CERTS_INIT),
        &|c| {
            if let Yaml::Hash(deps) = &mut c["services"][app]["depends_on"] {
                deps.insert(Yaml::String(CERTS_INIT.into()), Yaml::Null);
            }
        },
    );
    reported(
        "a container trellis.toml does not know",
        "container `billing` is not in trellis.toml",
        &|c| {
            if let Yaml::Hash(services) = &mut c["services"] {
                services.insert(
                    Yaml::String("billing".into()),
                    Yaml::Hash(Default::default()),
                );
            }
        },
    );
    reported("the edge's port", "edge: --edge listens on port 9;", &|c| {
        set_flag(&mut c["services"]["edge"], "--edge", "0.0.0.0:9")
    });
}

/// The image is built with the toolchain of rust-toolchain.toml and holds
/// every binary trellis.toml's commands run.
#[test]
fn the_dockerfile_matches_the_toolchain_and_the_commands() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let toolchain = std::fs::read_to_string(repo("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .expect("rust-toolchain.toml names a channel");
    let arg = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG RUST_VERSION="))
        .expect("the Dockerfile has ARG RUST_VERSION=<version>");
    assert_eq!(
        arg.trim(),
        channel,
        "Dockerfile ARG RUST_VERSION and rust-toolchain.toml's channel differ"
    );

    let mesh = load_mesh();
    let words: BTreeSet<&str> = dockerfile
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .collect();
    let mut binaries = BTreeSet::from(["trellis", "trellis-registry", "mesh-proxy"]);
    for service in &mesh.services {
        if let Some(bin) = service.command[0].strip_prefix("{bin}/") {
            binaries.insert(bin);
        }
    }
    let missing: Vec<&&str> = binaries.iter().filter(|b| !words.contains(**b)).collect();
    assert!(
        missing.is_empty(),
        "the Dockerfile does not copy {missing:?} into the image"
    );
}

// ---- The checker.

/// Every difference between `compose` and what `mesh` says.
fn check(mesh: &MeshFile, compose: &Yaml) -> Vec<String> {
    let mut problems = Vec::new();
    let plan = match Plan::unchecked(mesh) {
        Ok(plan) => plan,
        Err(e) => return vec![format!("trellis.toml has no port plan: {e}")],
    };
    let Yaml::Hash(services) = &compose["services"] else {
        return vec!["compose.yaml has no `services` mapping".to_owned()];
    };
    let has = |name: &str| services.contains_key(&Yaml::String(name.to_owned()));
    let service = |name: &str| &compose["services"][name];

    // What {bin} and {state} stand for in the image.
    let image_path =
        |key: &str, problems: &mut Vec<String>| match compose["x-trellis"][key].as_str() {
            Some(v) => PathBuf::from(v),
            None => {
                problems.push(format!(
                    "x-trellis.{key} (what {{{key}}} of trellis.toml is in the image) is not set"
                ));
                PathBuf::from(format!("<{key}>"))
            }
        };
    let bin = image_path("bin", &mut problems);
    let state = image_path("state", &mut problems);

    let mut known: BTreeSet<String> = [POSTGRES, CERTS_INIT, REGISTRY]
        .iter()
        .map(|s| s.to_string())
        .collect();

    // PostgreSQL, when a service has a database.
    if mesh.services.iter().any(|s| s.database) {
        if !has(POSTGRES) {
            problems.push(format!(
                "no container `{POSTGRES}` for the services' databases"
            ));
        } else if service(POSTGRES)["healthcheck"]["test"].is_badvalue() {
            problems.push(format!(
                "{POSTGRES}: no healthcheck (services wait for it to be healthy)"
            ));
        }
    }

    // Certificates: one per workload `trellis up` makes one for.
    let mut workloads: BTreeSet<String> = ["registry", "edge", "cli"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    workloads.extend(mesh.services.iter().map(|s| s.name.clone()));
    check_certs(
        service(CERTS_INIT),
        &workloads,
        plan.edges.iter().any(|e| e.tls),
        &mut problems,
    );

    // The registry.
    let registry_ip = fixed_address(compose, REGISTRY);
    let registry = match registry_ip {
        Some(ip) => SocketAddr::from((ip, plan.registry.port())),
        None => {
            problems.push(format!(
                "{REGISTRY}: no networks.{NETWORK}.ipv4_address (sidecars dial it by address)"
            ));
            plan.registry
        }
    };
    if !has(REGISTRY) {
        problems.push(format!("no container `{REGISTRY}`"));
    } else {
        let flags = Flags::of(
            REGISTRY,
            service(REGISTRY),
            "trellis-registry",
            &mut problems,
        );
        flags.port(
            "--listen",
            plan.registry.port(),
            "[registry] listen",
            &mut problems,
        );
        flags.expect("--read-only", "edge,cli", &mut problems);
        flags.present("--config-dir", &mut problems);
        flags.identity(REGISTRY, &mut problems);
        if service(REGISTRY)["healthcheck"]["test"].is_badvalue() {
            problems.push(format!(
                "{REGISTRY}: no healthcheck (sidecars wait for it to be healthy)"
            ));
        }
    }

    // Every instance, with its sidecar.
    let mut addresses: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    if let Some(ip) = registry_ip {
        addresses.insert(ip, REGISTRY.to_owned());
    }
    let subnet = mesh_subnet(compose);
    let mut sidecars = Vec::new();
    for instance in &plan.instances {
        // Its own `[[service]]` entry: a service run in two versions has two.
        let spec = &mesh.services[instance.entry];
        let app = instance.name.as_str();
        let sidecar = format!("{app}-proxy");
        known.insert(app.to_owned());
        known.insert(sidecar.clone());
        sidecars.push(sidecar.clone());
        let origin = format!(
            "instance {app} of service {:?} (trellis.toml line {})",
            spec.name, spec.line
        );

        if !has(app) {
            problems.push(format!("no container `{app}` for {origin}"));
            continue;
        }
        let ip = fixed_address(compose, app);
        match ip {
            None => problems.push(format!(
                "{app}: no networks.{NETWORK}.ipv4_address (its sidecar advertises it to peers)"
            )),
            Some(ip) => {
                if let Some(other) = addresses.insert(ip, app.to_owned()) {
                    problems.push(format!("{app}: has address {ip}, as {other} does"));
                }
                if let Some((net, bits)) = subnet
                    && !in_subnet(ip, net, bits)
                {
                    problems.push(format!(
                        "{app}: address {ip} is outside the {NETWORK} network's subnet {net}/{bits}"
                    ));
                }
            }
        }

        // The command, placeholders expanded as `trellis up` does.
        let values = Placeholders::new(instance, &state, &bin);
        let expected: Result<Vec<String>, String> = spec
            .command
            .iter()
            .map(|part| values.expand(part))
            .collect();
        match (expected, strings(&service(app)["command"])) {
            (Err(e), _) => problems.push(format!("{app}: trellis.toml's command: {e}")),
            (Ok(want), Some(got)) if want != got => problems.push(format!(
                "{app}: command is {got:?}; trellis.toml runs {want:?}"
            )),
            (Ok(_), None) => problems.push(format!("{app}: command is not a list of strings")),
            _ => {}
        }

        // The environment.
        let env = environment(&service(app)["environment"]);
        let mut want_env = vec![
            ("TRELLIS_LISTEN", instance.listen.to_string()),
            ("TRELLIS_OUTBOUND", instance.outbound.to_string()),
            ("TRELLIS_INSTANCE", instance.name.clone()),
            ("TRELLIS_SERVICE", spec.name.clone()),
        ];
        for (key, value) in &spec.env {
            match values.expand(value) {
                Ok(v) => want_env.push((key.as_str(), v)),
                Err(e) => problems.push(format!("{app}: trellis.toml's env {key}: {e}")),
            }
        }
        for (key, want) in want_env {
            match env.get(key) {
                None => problems.push(format!("{app}: {key} is not set; trellis up sets {want}")),
                Some(got) if *got != want => {
                    problems.push(format!("{app}: {key} is {got}; trellis up sets {want}"))
                }
                _ => {}
            }
        }
        let database = format!(
            "{}_{}",
            // Containers have a PostgreSQL of their own (the pgdata
            // volume): the databases need no per-state-directory id.
            mesh.postgres
                .database_prefix
                .as_deref()
                .unwrap_or("trellis"),
            spec.name.replace('-', "_")
        );
        match (spec.database, env.get("TRELLIS_DATABASE_URL")) {
            (true, None) => problems.push(format!(
                "{app}: TRELLIS_DATABASE_URL is not set, but service {:?} has database = true",
                spec.name
            )),
            (true, Some(url)) => {
                let ok = url.starts_with("postgres://")
                    && url.contains(&format!("@{POSTGRES}:5432/"))
                    && url
                        .split('?')
                        .next()
                        .is_some_and(|u| u.ends_with(&format!("/{database}")));
                if !ok {
                    problems.push(format!(
                        "{app}: TRELLIS_DATABASE_URL is {url}; expected postgres://<user>:<password>@{POSTGRES}:5432/{database}"
                    ));
                }
            }
            (false, Some(_)) => problems.push(format!(
                "{app}: TRELLIS_DATABASE_URL is set, but service {:?} has no database = true",
                spec.name
            )),
            (false, None) => {}
        }

        // Start order: after the sidecars of what it depends on (and
        // PostgreSQL for a database).
        let mut want_deps: BTreeMap<String, &str> = BTreeMap::new();
        for dep in &spec.depends_on {
            for i in plan.instances_of(dep) {
                want_deps.insert(format!("{}-proxy", i.name), "service_healthy");
            }
        }
        if spec.database {
            want_deps.insert(POSTGRES.to_owned(), "service_healthy");
        }
        compare_depends_on(
            app,
            &service(app)["depends_on"],
            &want_deps,
            &format!(
                "trellis.toml has {:?} depend on {:?}",
                spec.name, spec.depends_on
            ),
            &mut problems,
        );

        // The sidecar.
        if !has(&sidecar) {
            problems.push(format!("no sidecar container `{sidecar}` for {origin}"));
            continue;
        }
        let side = service(&sidecar);
        let want_mode = format!("service:{app}");
        if side["network_mode"].as_str() != Some(want_mode.as_str()) {
            problems.push(format!(
                "{sidecar}: network_mode is {}; it must share {app}'s network namespace (network_mode: \"{want_mode}\")",
                describe(&side["network_mode"])
            ));
        }
        check_sidecar(&sidecar, side, instance, ip, registry, spec, &mut problems);
        let want: BTreeMap<String, &str> = [
            (app.to_owned(), "service_started"),
            (REGISTRY.to_owned(), "service_healthy"),
            (CERTS_INIT.to_owned(), "service_completed_successfully"),
        ]
        .into_iter()
        .collect();
        compare_depends_on(
            &sidecar,
            &side["depends_on"],
            &want,
            "a sidecar starts with its service, once the registry and the certificates are there",
            &mut problems,
        );
    }

    // The edges, once every sidecar is ready.
    for edge in &plan.edges {
        let name = edge.name.as_str();
        known.insert(name.to_owned());
        if !has(name) {
            problems.push(format!(
                "no container `{name}` for the {} edge of trellis.toml ({})",
                if edge.tls { "TLS" } else { "plaintext" },
                edge.listen
            ));
            continue;
        }
        let setting = if edge.tls {
            "[edge] tls_listen"
        } else {
            "[edge] listen"
        };
        let flags = Flags::of(name, service(name), "mesh-proxy", &mut problems);
        flags.port("--edge", edge.listen.port(), setting, &mut problems);
        flags.expect("--outbound", &edge.outbound.to_string(), &mut problems);
        flags.expect("--admin", &edge.admin.to_string(), &mut problems);
        flags.expect("--registry", &registry.to_string(), &mut problems);
        flags.identity("edge", &mut problems);
        for tls_flag in ["--edge-tls-cert", "--edge-tls-key", "--edge-policy"] {
            match (edge.tls, flags.get(tls_flag)) {
                (true, None) => {
                    problems.push(format!("{name}: {tls_flag} is missing (a TLS edge)"))
                }
                (false, Some(_)) => problems.push(format!(
                    "{name}: {tls_flag} is given, but trellis.toml's {setting} is plaintext"
                )),
                _ => {}
            }
        }
        flags.only(
            &[
                "--edge",
                "--outbound",
                "--admin",
                "--registry",
                "--cert",
                "--key",
                "--ca",
                "--edge-tls-cert",
                "--edge-tls-key",
                "--edge-policy",
            ],
            &mut problems,
        );
        let published = published(&service(name)["ports"]);
        let want = (
            edge.listen.ip().to_string(),
            edge.listen.port(),
            edge.listen.port(),
        );
        if !published.contains(&want) {
            problems.push(format!(
                "{name}: not published as \"{}:{}:{}\" (trellis.toml's {setting} is {}); ports are {published:?}",
                want.0, want.1, want.2, edge.listen
            ));
        }
        if !healthcheck_polls(service(name), edge.admin) {
            problems.push(format!(
                "{name}: its healthcheck does not ask http://{}/ready",
                edge.admin
            ));
        }
        let mut want: BTreeMap<String, &str> = sidecars
            .iter()
            .map(|s| (s.clone(), "service_healthy"))
            .collect();
        want.insert(REGISTRY.to_owned(), "service_healthy");
        want.insert(CERTS_INIT.to_owned(), "service_completed_successfully");
        compare_depends_on(
            name,
            &service(name)["depends_on"],
            &want,
            "trellis up starts the edges once every sidecar is ready",
            &mut problems,
        );
    }

    for name in services.keys().filter_map(Yaml::as_str) {
        if !known.contains(name) {
            problems.push(format!(
                "container `{name}` is not in trellis.toml (instances are <service> or <service>-<n>, sidecars <instance>-proxy; besides them only {POSTGRES}, {CERTS_INIT}, {REGISTRY} and the edges)"
            ));
        }
    }
    problems
}

/// The sidecar's flags are those `trellis up` gives (src/up/mod.rs
/// `sidecar_spec`), but for inbound on 0.0.0.0 and `--advertise`.
#[allow(clippy::too_many_arguments)]
fn check_sidecar(
    name: &str,
    sidecar: &Yaml,
    instance: &InstancePlan,
    ip: Option<Ipv4Addr>,
    registry: SocketAddr,
    spec: &ServiceSpec,
    problems: &mut Vec<String>,
) {
    let (identity, extra) = (spec.name.as_str(), spec.sidecar_args.as_slice());
    let flags = Flags::of(name, sidecar, "mesh-proxy", problems);
    flags.expect("--app", &instance.listen.to_string(), problems);
    flags.port(
        "--inbound",
        instance.inbound.port(),
        "[mesh] ports (the plan's sidecar inbound)",
        problems,
    );
    if let Some(ip) = ip {
        flags.expect(
            "--advertise",
            &SocketAddr::from((ip, instance.inbound.port())).to_string(),
            problems,
        );
    }
    flags.expect("--outbound", &instance.outbound.to_string(), problems);
    flags.expect("--admin", &instance.admin.to_string(), problems);
    flags.expect("--registry", &registry.to_string(), problems);
    flags.identity(identity, problems);
    // The labels of the entry's version and zone, when it has them.
    for (flag, value) in [("--service-version", &spec.version), ("--zone", &spec.zone)] {
        match (value, flags.get(flag)) {
            (Some(want), _) => flags.expect(flag, want, problems),
            (None, Some(got)) => problems.push(format!(
                "{name}: {flag} is {got}; trellis.toml's entry (line {}) sets none",
                spec.line
            )),
            (None, None) => {}
        }
    }
    let mut allowed = vec![
        "--app",
        "--inbound",
        "--advertise",
        "--outbound",
        "--admin",
        "--registry",
        "--cert",
        "--key",
        "--ca",
        "--service-version",
        "--zone",
    ];
    allowed.extend(
        extra
            .iter()
            .map(String::as_str)
            .filter(|a| a.starts_with("--")),
    );
    flags.only(&allowed, problems);
    if !extra.is_empty() && !flags.args.ends_with(extra) {
        problems.push(format!(
            "{name}: does not end with trellis.toml's sidecar_args {extra:?}"
        ));
    }
    if !healthcheck_polls(sidecar, instance.admin) {
        problems.push(format!(
            "{name}: its healthcheck does not ask http://{}/ready",
            instance.admin
        ));
    }
}

fn check_certs(
    certs: &Yaml,
    workloads: &BTreeSet<String>,
    tls_edge: bool,
    problems: &mut Vec<String>,
) {
    if certs.is_badvalue() {
        problems.push(format!(
            "no container `{CERTS_INIT}` making the certificates"
        ));
        return;
    }
    // The command is a list, or a shell script (`sh -c`) with a
    // `trellis certs` line: its words either way.
    let words: Vec<String> = match strings(&certs["command"]) {
        Some(list) if list.iter().any(|w| w.contains('\n') || w.contains(' ')) => list
            .iter()
            .flat_map(|w| w.lines())
            .find(|l| l.trim_start().starts_with("trellis certs"))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        Some(list) => list,
        None => certs["command"]
            .as_str()
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    let Some(start) = words
        .windows(2)
        .position(|w| w[0] == "trellis" && w[1] == "certs")
    else {
        problems.push(format!("{CERTS_INIT}: its command runs no `trellis certs`"));
        return;
    };
    let flags = Flags {
        container: CERTS_INIT.to_owned(),
        args: words[start + 2..].to_vec(),
    };
    flags.expect("--dir", CERTS, problems);
    let issued: BTreeSet<String> = flags
        .get("--workload")
        .map(|w| w.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if &issued != workloads {
        problems.push(format!(
            "{CERTS_INIT}: --workload is {:?}; trellis up issues {:?} (registry, edge, cli and every service)",
            issued, workloads
        ));
    }
    if tls_edge && flags.get("--server-name").is_none() {
        problems.push(format!(
            "{CERTS_INIT}: no --server-name, so no certificate for the TLS edge"
        ));
    }
}

/// A process's arguments after its program, read as `--flag value` pairs.
struct Flags {
    container: String,
    args: Vec<String>,
}

impl Flags {
    fn of(container: &str, service: &Yaml, program: &str, problems: &mut Vec<String>) -> Self {
        let mut args = match strings(&service["command"]) {
            Some(args) => args,
            None => {
                problems.push(format!("{container}: command is not a list of strings"));
                Vec::new()
            }
        };
        if args.first().map(String::as_str) == Some(program) {
            args.remove(0);
        } else if !args.is_empty() {
            problems.push(format!(
                "{container}: runs {:?}, not {program}",
                args.first().unwrap()
            ));
        }
        Self {
            container: container.to_owned(),
            args,
        }
    }

    fn get(&self, flag: &str) -> Option<&str> {
        let eq = format!("{flag}=");
        self.args.iter().enumerate().find_map(|(i, a)| {
            if a == flag {
                self.args.get(i + 1).map(String::as_str)
            } else {
                a.strip_prefix(&eq)
            }
        })
    }

    fn present(&self, flag: &str, problems: &mut Vec<String>) -> Option<&str> {
        let value = self.get(flag);
        if value.is_none() {
            problems.push(format!("{}: {flag} is missing", self.container));
        }
        value
    }

    fn expect(&self, flag: &str, want: &str, problems: &mut Vec<String>) {
        if let Some(got) = self.present(flag, problems)
            && got != want
        {
            problems.push(format!(
                "{}: {flag} is {got}; trellis up gives {want}",
                self.container
            ));
        }
    }

    /// `flag` is an address on `port` (any host: 0.0.0.0 in a container).
    fn port(&self, flag: &str, port: u16, setting: &str, problems: &mut Vec<String>) {
        if let Some(got) = self.present(flag, problems) {
            match got.parse::<SocketAddr>() {
                Ok(addr) if addr.port() == port => {}
                Ok(addr) => problems.push(format!(
                    "{}: {flag} listens on port {}; trellis.toml's {setting} gives port {port}",
                    self.container,
                    addr.port()
                )),
                Err(_) => problems.push(format!("{}: {flag} {got} is not ip:port", self.container)),
            }
        }
    }

    /// `--cert`, `--key` and `--ca` name the workload's files in /certs.
    fn identity(&self, workload: &str, problems: &mut Vec<String>) {
        self.expect("--cert", &format!("{CERTS}/{workload}.pem"), problems);
        self.expect("--key", &format!("{CERTS}/{workload}.key"), problems);
        self.expect("--ca", &format!("{CERTS}/ca.pem"), problems);
    }

    /// No flag outside `allowed`.
    fn only(&self, allowed: &[&str], problems: &mut Vec<String>) {
        for arg in self.args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap_or(arg);
            if !allowed.contains(&flag) {
                problems.push(format!(
                    "{}: {flag} is not a flag trellis up gives it",
                    self.container
                ));
            }
        }
    }
}

/// `depends_on` (a list, or a mapping with conditions) is exactly `want`.
fn compare_depends_on(
    container: &str,
    depends_on: &Yaml,
    want: &BTreeMap<String, &str>,
    why: &str,
    problems: &mut Vec<String>,
) {
    let mut got: BTreeMap<String, String> = BTreeMap::new();
    match depends_on {
        Yaml::Array(list) => {
            for name in list.iter().filter_map(Yaml::as_str) {
                got.insert(name.to_owned(), "service_started".to_owned());
            }
        }
        Yaml::Hash(map) => {
            for (name, v) in map {
                let condition = v["condition"].as_str().unwrap_or("service_started");
                if let Some(name) = name.as_str() {
                    got.insert(name.to_owned(), condition.to_owned());
                }
            }
        }
        _ => {}
    }
    for (name, condition) in want {
        match got.get(name) {
            None => problems.push(format!(
                "{container}: does not wait for {name} ({condition}); {why}"
            )),
            Some(c) if c != condition => problems.push(format!(
                "{container}: waits for {name} with condition {c}, not {condition}"
            )),
            _ => {}
        }
    }
    for name in got.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!(
            "{container}: waits for {name}, which trellis up does not; {why}"
        ));
    }
}

/// The container's fixed address on the mesh network.
fn fixed_address(compose: &Yaml, container: &str) -> Option<Ipv4Addr> {
    compose["services"][container]["networks"][NETWORK]["ipv4_address"]
        .as_str()?
        .parse()
        .ok()
}

/// The mesh network's subnet, `a.b.c.d/n`.
fn mesh_subnet(compose: &Yaml) -> Option<(Ipv4Addr, u32)> {
    let config = compose["networks"][NETWORK]["ipam"]["config"].as_vec()?;
    let subnet = config.iter().find_map(|c| c["subnet"].as_str())?;
    let (net, bits) = subnet.split_once('/')?;
    Some((net.parse().ok()?, bits.parse().ok().filter(|b| *b <= 32)?))
}

fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Whether the healthcheck asks the admin port's `/ready`.
fn healthcheck_polls(service: &Yaml, admin: SocketAddr) -> bool {
    let url = format!("http://{admin}/ready");
    let test = &service["healthcheck"]["test"];
    match test {
        Yaml::Array(_) => strings(test).is_some_and(|t| t.iter().any(|w| w.contains(&url))),
        Yaml::String(s) => s.contains(&url),
        _ => false,
    }
}

/// Published ports as (host ip, host port, container port).
fn published(ports: &Yaml) -> Vec<(String, u16, u16)> {
    let mut out = Vec::new();
    for entry in ports.as_vec().into_iter().flatten() {
        match entry {
            Yaml::String(s) => {
                let s = s.split('/').next().unwrap_or(s);
                // [ip:]host:container; without an ip, every interface.
                let parts: Vec<&str> = s.rsplitn(3, ':').collect();
                let (container, host, ip) = match parts[..] {
                    [container, host, ip] => (container, host, ip),
                    [container, host] => (container, host, "0.0.0.0"),
                    _ => continue,
                };
                if let (Ok(c), Ok(h)) = (container.parse(), host.parse()) {
                    out.push((ip.to_owned(), h, c));
                }
            }
            Yaml::Hash(_) => {
                let port = |y: &Yaml| match y {
                    Yaml::Integer(i) => u16::try_from(*i).ok(),
                    Yaml::String(s) => s.parse().ok(),
                    _ => None,
                };
                if let (Some(c), Some(h)) = (port(&entry["target"]), port(&entry["published"])) {
                    let ip = entry["host_ip"].as_str().unwrap_or("0.0.0.0");
                    out.push((ip.to_owned(), h, c));
                }
            }
            _ => {}
        }
    }
    out
}

/// `environment` as a mapping or a list of `KEY=value`.
fn environment(env: &Yaml) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match env {
        Yaml::Hash(map) => {
            for (k, v) in map {
                if let (Some(k), Some(v)) = (k.as_str(), scalar(v)) {
                    out.insert(k.to_owned(), v);
                }
            }
        }
        Yaml::Array(list) => {
            for item in list.iter().filter_map(Yaml::as_str) {
                if let Some((k, v)) = item.split_once('=') {
                    out.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        _ => {}
    }
    out
}

/// A list of scalars as strings.
fn strings(y: &Yaml) -> Option<Vec<String>> {
    y.as_vec()?.iter().map(scalar).collect()
}

fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn describe(y: &Yaml) -> String {
    scalar(y).map_or_else(|| "not set".to_owned(), |s| format!("{s:?}"))
}

// ---- Changing a parsed compose file (for the drift test).

fn set_flag(service: &mut Yaml, flag: &str, value: &str) {
    if let Yaml::Array(args) = &mut service["command"]
        && let Some(i) = args.iter().position(|a| a.as_str() == Some(flag))
    {
        args[i + 1] = Yaml::String(value.to_owned());
    }
}

fn remove(map: &mut Yaml, key: &str) {
    if let Yaml::Hash(h) = map {
        h.remove(&Yaml::String(key.to_owned()));
    }
}
