//! `deploy/kubernetes` runs the mesh of `trellis.toml` on a cluster: these
//! tests hold the two together. Every `[[service]]` has a Deployment whose
//! pods run the service beside a mesh-proxy native sidecar, with the ports
//! of `trellis up`'s own plan (the first instance's: every pod has its own
//! network namespace), the environment `trellis up` gives, the sidecar
//! flags `trellis up` gives (inbound on 0.0.0.0 and advertised as the pod's
//! IP, the registry by its headless Service), its identity from the Secret
//! `trellis certs --kubernetes` writes for it, probes on the sidecar's
//! `/ready` and `/live`, resources and a PodDisruptionBudget; the registry
//! and the edges listen where the plan says; the ConfigMap's files are
//! config/'s; and nothing runs that `trellis.toml` does not know of. A
//! difference fails naming the object and what differs.
//!
//! Then every manifest is checked against the Kubernetes schemas (strict:
//! an unknown field fails) with kubernetes-validate (scripts/pytools), and
//! `trellis certs --kubernetes` is shown to write exactly the Secrets the
//! pods mount.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use trellis::certs::kubernetes_identity_secret;
use trellis::identity::{IdentityPaths, Workload};
use trellis::up::mesh::MeshFile;
use trellis::up::plan::{InstancePlan, Placeholders, Plan};
use yaml_rust2::{Yaml, YamlLoader};

/// The manifests' directory, from the repository's root.
const DIR: &str = "deploy/kubernetes";
/// The namespace of the manifests and of the SPIFFE IDs.
const NAMESPACE: &str = "trellis";
/// Where every pod mounts its identity Secret.
const CERTS: &str = "/certs";
/// How sidecars and edges name the registry: its headless Service.
const REGISTRY_SERVICE: &str = "registry";
/// The ConfigMap of config/ and where the registry mounts it.
const CONFIG_MAP: &str = "trellis-config";
const CONFIG_MOUNT: &str = "/config";
/// The Secret holding the databases' DSNs, one key per service.
const POSTGRES_SECRET: &str = "postgres";
/// The etcd StatefulSet (and its headless Service).
const ETCD: &str = "etcd";
/// What {bin} and {state} of trellis.toml's commands stand for in the image.
const BIN: &str = "/usr/local/bin";
const STATE: &str = "/var/lib/trellis";
/// What {instance} stands for: the pod's name, through its environment.
const INSTANCE: &str = "$(TRELLIS_INSTANCE)";
/// The oldest Kubernetes with native sidecars (init containers with
/// `restartPolicy: Always`) on by default, and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load_mesh() -> MeshFile {
    MeshFile::load(&repo("trellis.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// One object of the manifests.
#[derive(Clone)]
struct Object {
    file: String,
    doc: Yaml,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// The kustomization and the objects of the files it lists.
#[derive(Clone)]
struct Manifests {
    kustomization: Yaml,
    objects: Vec<Object>,
}

impl Manifests {
    fn load(dir: &Path) -> Self {
        let kustomization = load_docs(&dir.join("kustomization.yaml")).remove(0);
        let mut objects = Vec::new();
        for file in strings(&kustomization["resources"]).unwrap_or_default() {
            for doc in load_docs(&dir.join(&file)) {
                objects.push(Object {
                    file: file.clone(),
                    doc,
                });
            }
        }
        Self {
            kustomization,
            objects,
        }
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Object> {
        self.objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name)
    }

    fn find_mut(&mut self, kind: &str, name: &str) -> &mut Yaml {
        &mut self
            .objects
            .iter_mut()
            .find(|o| o.kind() == kind && o.name() == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .doc
    }
}

/// The documents of a YAML file; empty ones (comments only) left out.
fn load_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

#[test]
fn the_manifests_run_the_mesh_of_trellis_toml() {
    let mesh = load_mesh();
    let manifests = Manifests::load(&repo(DIR));
    let problems = check(&mesh, &manifests);
    assert!(
        problems.is_empty(),
        "deploy/kubernetes does not match trellis.toml ({} differences; fix the manifests, or trellis.toml if it is the one that is wrong):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
}

/// The checker finds drift: each change is reported, naming the object.
#[test]
fn drift_is_reported_by_object() {
    let mesh = load_mesh();
    let good = Manifests::load(&repo(DIR));
    assert!(
        check(&mesh, &good).is_empty(),
        "the manifests must pass first"
    );

    let reported =
        |what: &str, expected: &str, mesh: &MeshFile, change: &dyn Fn(&mut Manifests)| {
            let mut drifted = good.clone();
            change(&mut drifted);
            let problems = check(mesh, &drifted);
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "changing {what}: expected a problem containing {expected:?}, got {problems:#?}"
            );
        };
    let set_arg = |c: &mut Yaml, flag: &str, value: &str| {
        if let Yaml::Array(args) = &mut c["args"]
            && let Some(i) = args.iter().position(|a| a.as_str() == Some(flag))
        {
            args[i + 1] = Yaml::String(value.to_owned());
        }
    };

    reported(
        "a sidecar's admin port",
        "Deployment usage: mesh-proxy --admin is 0.0.0.0:1; trellis.toml's plan gives 0.0.0.0:7107",
        &mesh,
        &|m| set_arg(sidecar(m, "usage"), "--admin", "0.0.0.0:1"),
    );
    reported(
        "the sidecar's program",
        "Deployment usage: mesh-proxy does not run mesh-proxy",
        &mesh,
        &|m| {
            sidecar(m, "usage")["command"] = Yaml::Array(vec![Yaml::String("sleep".into())]);
        },
    );
    reported(
        "a sidecar's identity file",
        "Deployment usage: mesh-proxy --cert is /certs/edge.pem",
        &mesh,
        &|m| set_arg(sidecar(m, "usage"), "--cert", "/certs/edge.pem"),
    );
    reported(
        "the identity Secret",
        "Deployment usage: volume identity mounts Secret identity-edge; its identity is identity-usage",
        &mesh,
        &|m| {
            m.find_mut("Deployment", "usage")["spec"]["template"]["spec"]["volumes"][0]["secret"]
                ["secretName"] = Yaml::String("identity-edge".into());
        },
    );
    reported(
        "the sidecar as a plain init container",
        "Deployment usage: mesh-proxy is not a native sidecar (restartPolicy: Always)",
        &mesh,
        &|m| remove(sidecar(m, "usage"), "restartPolicy"),
    );
    reported(
        "the readiness probe",
        "Deployment usage: mesh-proxy's readinessProbe is not GET /ready on the admin port 7107",
        &mesh,
        &|m| {
            sidecar(m, "usage")["readinessProbe"]["httpGet"]["path"] = Yaml::String("/live".into());
        },
    );
    reported(
        "the service's port",
        "Deployment usage: usage's TRELLIS_LISTEN is 127.0.0.1:9; trellis.toml's plan gives 127.0.0.1:7104",
        &mesh,
        &|m| {
            let env = &mut m.find_mut("Deployment", "usage")["spec"]["template"]["spec"]["containers"]
                [0]["env"];
            if let Yaml::Array(vars) = env {
                for var in vars {
                    if var["name"].as_str() == Some("TRELLIS_LISTEN") {
                        var["value"] = Yaml::String("127.0.0.1:9".into());
                    }
                }
            }
        },
    );
    reported(
        "the database",
        "Deployment usage: usage's TRELLIS_DATABASE_URL does not come from Secret postgres, key usage",
        &mesh,
        &|m| {
            let env = &mut m.find_mut("Deployment", "usage")["spec"]["template"]["spec"]["containers"]
                [0]["env"];
            if let Yaml::Array(vars) = env {
                vars.retain(|v| v["name"].as_str() != Some("TRELLIS_DATABASE_URL"));
            }
        },
    );
    reported(
        "a missing Deployment",
        "no Deployment `usage`",
        &mesh,
        &|m| {
            m.objects
                .retain(|o| !(o.kind() == "Deployment" && o.name() == "usage"))
        },
    );
    reported(
        "a missing PodDisruptionBudget",
        "no PodDisruptionBudget for Deployment usage",
        &mesh,
        &|m| {
            m.objects
                .retain(|o| !(o.kind() == "PodDisruptionBudget" && o.name() == "usage"))
        },
    );
    reported(
        "the edge's port",
        "Deployment edge-tls: edge --edge is 0.0.0.0:9443; trellis.toml's plan gives 0.0.0.0:8443",
        &mesh,
        &|m| {
            let c = &mut m.find_mut("Deployment", "edge-tls")["spec"]["template"]["spec"]["containers"]
                [0];
            set_arg(c, "--edge", "0.0.0.0:9443");
        },
    );
    reported(
        "the registry's store",
        "Deployment registry: registry --store is etcd://etcd-0.etcd:2379;",
        &mesh,
        &|m| {
            let c = &mut m.find_mut("Deployment", "registry")["spec"]["template"]["spec"]["containers"]
                [0];
            set_arg(c, "--store", "etcd://etcd-0.etcd:2379");
        },
    );
    reported(
        "a Deployment trellis.toml does not know",
        "Deployment `billing` runs a service trellis.toml does not list",
        &mesh,
        &|m| {
            let mut extra = m.find("Deployment", "usage").unwrap().clone();
            extra.doc["metadata"]["name"] = Yaml::String("billing".into());
            m.objects.push(extra);
        },
    );

    // A service added to trellis.toml without a Deployment.
    let text = std::fs::read_to_string(repo("trellis.toml")).unwrap()
        + "\n[[service]]\nname = \"billing\"\ncommand = [\"{bin}/trellis-billing\"]\n";
    let grown = MeshFile::parse(&repo("trellis.toml"), &text).unwrap();
    reported(
        "trellis.toml, with a service more",
        "no Deployment `billing` for trellis.toml's [[service]] \"billing\"",
        &grown,
        &|_| {},
    );
    // And one that moved every port (another range).
    let moved = MeshFile::parse(
        &repo("trellis.toml"),
        &std::fs::read_to_string(repo("trellis.toml"))
            .unwrap()
            .replace("ports = \"7100-7299\"", "ports = \"7400-7599\""),
    )
    .unwrap();
    reported(
        "trellis.toml's port range",
        "Deployment user: mesh-proxy --app is 127.0.0.1:7100; trellis.toml's plan gives 127.0.0.1:7400",
        &moved,
        &|_| {},
    );
}

/// The sidecar container of a service's Deployment.
fn sidecar<'a>(m: &'a mut Manifests, service: &str) -> &'a mut Yaml {
    &mut m.find_mut("Deployment", service)["spec"]["template"]["spec"]["initContainers"][0]
}

/// Every difference between the manifests and the mesh of `mesh`.
fn check(mesh: &MeshFile, manifests: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let plan = Plan::unchecked(mesh).unwrap_or_else(|e| panic!("{e}"));

    if manifests.kustomization["namespace"].as_str() != Some(NAMESPACE) {
        problems.push(format!(
            "kustomization.yaml: namespace is {}, not {NAMESPACE}",
            describe(&manifests.kustomization["namespace"])
        ));
    }
    if manifests.find("Namespace", NAMESPACE).is_none() {
        problems.push(format!("no Namespace `{NAMESPACE}`"));
    }

    // The services: one Deployment per [[service]] entry.
    let mut expected_deployments = BTreeSet::new();
    let several_entries = |name: &str| mesh.services.iter().filter(|s| s.name == name).count() > 1;
    for (entry, service) in mesh.services.iter().enumerate() {
        let deployment = match (&service.version, several_entries(&service.name)) {
            (Some(version), true) => format!("{}-{version}", service.name),
            _ => service.name.clone(),
        };
        expected_deployments.insert(deployment.clone());
        let instances: Vec<&InstancePlan> = plan.instances_of_entry(entry).collect();
        let Some(first) = instances.first() else {
            continue;
        };
        let Some(object) = manifests.find("Deployment", &deployment) else {
            problems.push(format!(
                "no Deployment `{deployment}` for trellis.toml's [[service]] \"{}\" (line {})",
                service.name, service.line
            ));
            continue;
        };
        let at = format!("Deployment {deployment}");
        let replicas = object.doc["spec"]["replicas"].as_i64().unwrap_or(1);
        if replicas < instances.len() as i64 {
            problems.push(format!(
                "{at}: {replicas} replicas; trellis.toml runs {} instances",
                instances.len()
            ));
        }
        check_service_pod(
            service,
            first,
            &registry_addr(&plan),
            &object.doc,
            &at,
            &mut problems,
        );
        check_pdb(manifests, &deployment, &object.doc, &mut problems);
    }

    // The registry.
    check_registry(&plan, manifests, &mut problems);
    // The edges, as trellis up runs them.
    for edge in &plan.edges {
        expected_deployments.insert(edge.name.clone());
        let Some(object) = manifests.find("Deployment", &edge.name) else {
            problems.push(format!(
                "no Deployment `{}` for trellis up's {}",
                edge.name, edge.name
            ));
            continue;
        };
        let at = format!("Deployment {}", edge.name);
        let pod = &object.doc["spec"]["template"]["spec"];
        let Some(container) = container(pod, "containers", "edge") else {
            problems.push(format!("{at}: no container `edge`"));
            continue;
        };
        let args = Args::of(&at, "edge", "mesh-proxy", container, &mut problems);
        let mut expected = vec![
            ("--edge", format!("0.0.0.0:{}", edge.listen.port())),
            ("--outbound", format!("127.0.0.1:{}", edge.outbound.port())),
            ("--admin", format!("0.0.0.0:{}", edge.admin.port())),
            ("--registry", registry_addr(&plan)),
        ];
        if edge.tls {
            expected.extend([
                ("--edge-tls-cert", "/edge-tls/tls.crt".to_owned()),
                ("--edge-tls-key", "/edge-tls/tls.key".to_owned()),
                ("--edge-policy", "/edge-policy/edge-policy.toml".to_owned()),
            ]);
            check_secret_volume(
                pod,
                "/edge-tls",
                trellis::certs::KUBERNETES_EDGE_SERVER_SECRET,
                &at,
                &mut problems,
            );
        }
        expected.extend(identity_flags("edge"));
        args.exactly(&expected, &mut problems);
        check_secret_volume(
            pod,
            CERTS,
            &kubernetes_identity_secret("edge"),
            &at,
            &mut problems,
        );
        check_probes(container, "edge", edge.admin.port(), &at, &mut problems);
        check_resources(container, "edge", &at, &mut problems);
        check_pdb(manifests, &edge.name, &object.doc, &mut problems);
        // Reachable: a Service in front, the TLS edge's from outside.
        let service = manifests
            .objects
            .iter()
            .find(|o| o.kind() == "Service" && selects(&o.doc["spec"]["selector"], &object.doc));
        match service {
            None => problems.push(format!("{at}: no Service in front of it")),
            Some(s) => {
                let kind = s.doc["spec"]["type"].as_str().unwrap_or("ClusterIP");
                let wanted = if edge.tls {
                    "LoadBalancer"
                } else {
                    "ClusterIP"
                };
                if kind != wanted {
                    problems.push(format!("Service {}: type {kind}, not {wanted}", s.name()));
                }
                let targets = target_ports(&s.doc, container);
                if !targets.contains(&edge.listen.port()) {
                    problems.push(format!(
                        "Service {}: sends to ports {targets:?}, not the edge's {}",
                        s.name(),
                        edge.listen.port()
                    ));
                }
            }
        }
    }

    // Nothing runs that trellis.toml and trellis up do not know of.
    for object in &manifests.objects {
        if object.kind() == "Deployment"
            && object.name() != "registry"
            && !expected_deployments.contains(object.name())
        {
            problems.push(format!(
                "Deployment `{}` runs a service trellis.toml does not list ({})",
                object.name(),
                object.file
            ));
        }
    }
    problems
}

/// A service's pod: the sidecar's flags, probes and identity; the
/// service's command and environment; resources on both.
fn check_service_pod(
    service: &trellis::up::mesh::ServiceSpec,
    first: &InstancePlan,
    registry: &str,
    deployment: &Yaml,
    at: &str,
    problems: &mut Vec<String>,
) {
    let pod = &deployment["spec"]["template"]["spec"];
    let name = &service.name;

    // The sidecar: the one init container, restarted always (native).
    let Some(sidecar) = container(pod, "initContainers", "mesh-proxy") else {
        problems.push(format!(
            "{at}: no init container `mesh-proxy` (the sidecar)"
        ));
        return;
    };
    if sidecar["restartPolicy"].as_str() != Some("Always") {
        problems.push(format!(
            "{at}: mesh-proxy is not a native sidecar (restartPolicy: Always)"
        ));
    }
    let args = Args::of(at, "mesh-proxy", "mesh-proxy", sidecar, problems);
    let mut expected = vec![
        ("--app", first.listen.to_string()),
        ("--inbound", format!("0.0.0.0:{}", first.inbound.port())),
        ("--advertise", format!("$(POD_IP):{}", first.inbound.port())),
        ("--outbound", first.outbound.to_string()),
        ("--admin", format!("0.0.0.0:{}", first.admin.port())),
        ("--registry", registry.to_owned()),
        ("--metadata", "instance=$(POD_NAME)".to_owned()),
    ];
    if let Some(version) = &service.version {
        expected.push(("--service-version", version.clone()));
    }
    if let Some(zone) = &service.zone {
        expected.push(("--zone", zone.clone()));
    }
    expected.extend(identity_flags(name));
    // The entry's own sidecar_args come last, as trellis up gives them.
    let mut extra = service.sidecar_args.iter();
    while let (Some(flag), Some(value)) = (extra.next(), extra.next()) {
        expected.push((flag.as_str(), value.clone()));
    }
    args.exactly(&expected, problems);
    for (var, field) in [("POD_IP", "status.podIP"), ("POD_NAME", "metadata.name")] {
        if field_ref(sidecar, var) != Some(field) {
            problems.push(format!("{at}: mesh-proxy's {var} is not the pod's {field}"));
        }
    }
    check_probes(sidecar, "mesh-proxy", first.admin.port(), at, problems);
    check_resources(sidecar, "mesh-proxy", at, problems);
    check_secret_volume(pod, CERTS, &kubernetes_identity_secret(name), at, problems);
    if mount_path(pod, sidecar, &kubernetes_identity_secret(name)).as_deref() != Some(CERTS) {
        problems.push(format!(
            "{at}: mesh-proxy does not mount its identity on {CERTS}"
        ));
    }

    // The service.
    let Some(app) = container(pod, "containers", name) else {
        problems.push(format!("{at}: no container `{name}` (the service)"));
        return;
    };
    let mut values_for = first.clone();
    values_for.name = INSTANCE.to_owned();
    let values = Placeholders::new(&values_for, Path::new(STATE), Path::new(BIN));
    let command: Vec<String> = service
        .command
        .iter()
        .map(|part| values.expand(part).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let actual: Vec<String> = strings(&app["command"])
        .unwrap_or_default()
        .into_iter()
        .chain(strings(&app["args"]).unwrap_or_default())
        .collect();
    if actual != command {
        problems.push(format!(
            "{at}: {name} runs {actual:?}; trellis.toml's command (line {}) expands to {command:?}",
            service.line
        ));
    }
    let env = env_values(app);
    let mut want: BTreeMap<String, Option<String>> = BTreeMap::from([
        ("TRELLIS_LISTEN".to_owned(), Some(first.listen.to_string())),
        (
            "TRELLIS_OUTBOUND".to_owned(),
            Some(first.outbound.to_string()),
        ),
        ("TRELLIS_SERVICE".to_owned(), Some(name.clone())),
    ]);
    if let Some(admin) = first.metrics {
        want.insert(
            "TRELLIS_ADMIN".to_owned(),
            Some(format!("0.0.0.0:{}", admin.port())),
        );
    }
    for (key, value) in &service.env {
        want.insert(
            key.clone(),
            Some(values.expand(value).unwrap_or_else(|e| panic!("{e}"))),
        );
    }
    for (key, value) in &want {
        match env.get(key) {
            Some(Some(have)) if Some(have) == value.as_ref() => {}
            Some(have) => problems.push(format!(
                "{at}: {name}'s {key} is {}; trellis.toml's plan gives {}",
                have.as_deref().unwrap_or("(not a value)"),
                value.as_deref().unwrap_or("")
            )),
            None => problems.push(format!("{at}: {name}'s {key} is not set")),
        }
    }
    if field_ref(app, "TRELLIS_INSTANCE") != Some("metadata.name") {
        problems.push(format!(
            "{at}: {name}'s TRELLIS_INSTANCE is not the pod's name (metadata.name)"
        ));
    }
    let database = secret_ref(app, "TRELLIS_DATABASE_URL");
    match (service.database, database) {
        (true, Some((secret, key))) if secret == POSTGRES_SECRET && key == *name => {}
        (true, _) => problems.push(format!(
            "{at}: {name}'s TRELLIS_DATABASE_URL does not come from Secret {POSTGRES_SECRET}, key {name}"
        )),
        (false, Some(_)) => problems.push(format!(
            "{at}: {name} gets TRELLIS_DATABASE_URL, but trellis.toml gives it no database"
        )),
        (false, None) => {}
    }
    // Nothing else of trellis up's environment that trellis up would not give.
    for key in env.keys() {
        if key.starts_with("TRELLIS_")
            && !want.contains_key(key)
            && key != "TRELLIS_INSTANCE"
            && !(service.database && key == "TRELLIS_DATABASE_URL")
        {
            problems.push(format!(
                "{at}: {name} gets {key}, which trellis up does not give"
            ));
        }
    }
    if let Some(admin) = first.metrics
        && !container_ports(app).contains(&admin.port())
    {
        problems.push(format!(
            "{at}: {name} does not declare its admin port {}",
            admin.port()
        ));
    }
    check_resources(app, name, at, problems);
}

fn check_registry(plan: &Plan, manifests: &Manifests, problems: &mut Vec<String>) {
    let at = "Deployment registry";
    let Some(object) = manifests.find("Deployment", "registry") else {
        problems.push("no Deployment `registry`".to_owned());
        return;
    };
    let pod = &object.doc["spec"]["template"]["spec"];
    if object.doc["spec"]["replicas"].as_i64() != Some(3) {
        problems.push(format!("{at}: not 3 replicas"));
    }
    let Some(container) = container(pod, "containers", "registry") else {
        problems.push(format!("{at}: no container `registry`"));
        return;
    };
    let args = Args::of(at, "registry", "trellis-registry", container, problems);
    let mut expected = vec![
        ("--listen", format!("0.0.0.0:{}", plan.registry.port())),
        ("--admin", format!("0.0.0.0:{}", plan.registry_admin.port())),
        ("--config-dir", CONFIG_MOUNT.to_owned()),
        ("--read-only", "edge,cli".to_owned()),
        ("--store", etcd_store(manifests)),
    ];
    expected.extend(identity_flags("registry"));
    args.exactly(&expected, problems);
    check_secret_volume(
        pod,
        CERTS,
        &kubernetes_identity_secret("registry"),
        at,
        problems,
    );
    let config = volumes(pod)
        .into_iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(CONFIG_MAP));
    match config {
        Some(v)
            if mount_path(pod, container, v["name"].as_str().unwrap_or("")).as_deref()
                == Some(CONFIG_MOUNT) => {}
        _ => problems.push(format!(
            "{at}: does not mount the ConfigMap {CONFIG_MAP} on {CONFIG_MOUNT}"
        )),
    }
    let admin = plan.registry_admin.port();
    // Ready while in step with etcd; live while the process runs.
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        if !probes(container, probe, path, admin) {
            problems.push(format!(
                "{at}: {probe} is not GET {path} on the admin port {admin}"
            ));
        }
    }
    check_resources(container, "registry", at, problems);
    match manifests.find("Service", REGISTRY_SERVICE) {
        None => problems.push(format!("no Service `{REGISTRY_SERVICE}` for the sidecars")),
        Some(s) => {
            if s.doc["spec"]["clusterIP"].as_str() != Some("None") {
                problems.push(format!(
                    "Service {REGISTRY_SERVICE}: not headless (clusterIP: None), so proxies would not see every replica"
                ));
            }
            if !selects(&s.doc["spec"]["selector"], &object.doc) {
                problems.push(format!(
                    "Service {REGISTRY_SERVICE}: does not select the registry's pods"
                ));
            }
            let targets = target_ports(&s.doc, container);
            if !targets.contains(&plan.registry.port()) {
                problems.push(format!(
                    "Service {REGISTRY_SERVICE}: sends to ports {targets:?}, not the registry's {}",
                    plan.registry.port()
                ));
            }
        }
    }
    match pdb_for(manifests, &object.doc) {
        Some(pdb) if pdb["spec"]["minAvailable"].as_i64() == Some(2) => {}
        _ => problems.push(format!("{at}: no PodDisruptionBudget with minAvailable 2")),
    }
}

/// `--store` for the etcd StatefulSet: each member by its stable name.
fn etcd_store(manifests: &Manifests) -> String {
    let replicas = manifests
        .find("StatefulSet", ETCD)
        .and_then(|s| s.doc["spec"]["replicas"].as_i64())
        .unwrap_or(0);
    let members: Vec<String> = (0..replicas)
        .map(|i| format!("{ETCD}-{i}.{ETCD}:2379"))
        .collect();
    format!("etcd://{}", members.join(","))
}

fn registry_addr(plan: &Plan) -> String {
    format!("{REGISTRY_SERVICE}:{}", plan.registry.port())
}

fn identity_flags(workload: &str) -> Vec<(&'static str, String)> {
    vec![
        ("--cert", format!("{CERTS}/{workload}.pem")),
        ("--key", format!("{CERTS}/{workload}.key")),
        ("--ca", format!("{CERTS}/ca.pem")),
    ]
}

/// A PodDisruptionBudget selecting the Deployment's pods.
fn check_pdb(manifests: &Manifests, name: &str, deployment: &Yaml, problems: &mut Vec<String>) {
    match pdb_for(manifests, deployment) {
        None => problems.push(format!("no PodDisruptionBudget for Deployment {name}")),
        Some(pdb) => {
            let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
            if let Some(min) = pdb["spec"]["minAvailable"].as_i64()
                && min >= replicas
            {
                problems.push(format!(
                    "PodDisruptionBudget for {name}: minAvailable {min} of {replicas} replicas blocks every drain"
                ));
            }
        }
    }
}

fn pdb_for<'a>(manifests: &'a Manifests, workload: &Yaml) -> Option<&'a Yaml> {
    manifests
        .objects
        .iter()
        .find(|o| {
            o.kind() == "PodDisruptionBudget"
                && selects(&o.doc["spec"]["selector"]["matchLabels"], workload)
        })
        .map(|o| &o.doc)
}

/// Whether `selector` (labels) is non-empty and matches the pod template's labels.
fn selects(selector: &Yaml, workload: &Yaml) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    match selector.as_hash() {
        Some(h) if !h.is_empty() => h
            .iter()
            .all(|(k, v)| labels[k.as_str().unwrap_or("")] == *v),
        _ => false,
    }
}

/// The container ports a Service sends to (named ports resolved).
fn target_ports(service: &Yaml, container: &Yaml) -> Vec<u16> {
    let mut out = Vec::new();
    for port in service["spec"]["ports"].as_vec().into_iter().flatten() {
        let target = if port["targetPort"].is_badvalue() {
            &port["port"]
        } else {
            &port["targetPort"]
        };
        if let Some(n) = target.as_i64() {
            out.push(n as u16);
        } else if let Some(name) = target.as_str()
            && let Some(n) = named_port(container, name)
        {
            out.push(n);
        }
    }
    out
}

fn named_port(container: &Yaml, name: &str) -> Option<u16> {
    container["ports"]
        .as_vec()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
        .map(|n| n as u16)
}

fn container_ports(container: &Yaml) -> Vec<u16> {
    container["ports"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_i64())
        .map(|n| n as u16)
        .collect()
}

/// A readiness probe on `/ready` and a liveness probe on `/live`, both on
/// the admin port (by number, or by a name declared with that number).
fn check_probes(container: &Yaml, name: &str, admin: u16, at: &str, problems: &mut Vec<String>) {
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        if !probes(container, probe, path, admin) {
            problems.push(format!(
                "{at}: {name}'s {probe} is not GET {path} on the admin port {admin}"
            ));
        }
    }
    if !container_ports(container).contains(&admin) {
        problems.push(format!(
            "{at}: {name} does not declare its admin port {admin}"
        ));
    }
}

fn probes(container: &Yaml, probe: &str, path: &str, port: u16) -> bool {
    let get = &container[probe]["httpGet"];
    let on_port = match (&get["port"].as_i64(), get["port"].as_str()) {
        (Some(n), _) => *n == i64::from(port),
        (None, Some(name)) => named_port(container, name) == Some(port),
        _ => false,
    };
    get["path"].as_str() == Some(path) && on_port
}

/// Requests and limits of CPU and memory.
fn check_resources(container: &Yaml, name: &str, at: &str, problems: &mut Vec<String>) {
    for side in ["requests", "limits"] {
        for what in ["cpu", "memory"] {
            if container["resources"][side][what].is_badvalue() {
                problems.push(format!("{at}: {name} has no {side}.{what}"));
            }
        }
    }
}

/// The Secret `secret` is a volume of the pod, mounted on `path`.
fn check_secret_volume(pod: &Yaml, path: &str, secret: &str, at: &str, problems: &mut Vec<String>) {
    let mounted: Vec<(String, String)> = all_containers(pod)
        .flat_map(|c| c["volumeMounts"].as_vec().cloned().unwrap_or_default())
        .filter(|m| m["mountPath"].as_str() == Some(path))
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .filter_map(|volume| {
            volumes(pod)
                .into_iter()
                .find(|v| v["name"].as_str() == Some(&volume))
                .and_then(|v| v["secret"]["secretName"].as_str().map(str::to_owned))
                .map(|s| (volume, s))
        })
        .collect();
    if mounted.is_empty() {
        problems.push(format!("{at}: no Secret is mounted on {path}"));
    }
    for (volume, name) in mounted {
        if name != secret {
            problems.push(format!(
                "{at}: volume {volume} mounts Secret {name}; its identity is {secret}"
            ));
        }
    }
}

fn mount_path(pod: &Yaml, container: &Yaml, volume_or_secret: &str) -> Option<String> {
    let volume = volumes(pod)
        .into_iter()
        .find(|v| {
            v["name"].as_str() == Some(volume_or_secret)
                || v["secret"]["secretName"].as_str() == Some(volume_or_secret)
        })?
        .clone();
    container["volumeMounts"]
        .as_vec()?
        .iter()
        .find(|m| m["name"] == volume["name"])
        .and_then(|m| m["mountPath"].as_str().map(str::to_owned))
}

fn volumes(pod: &Yaml) -> Vec<&Yaml> {
    pod["volumes"].as_vec().into_iter().flatten().collect()
}

fn all_containers(pod: &Yaml) -> impl Iterator<Item = &Yaml> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(|k| pod[k].as_vec().into_iter().flatten())
}

fn container<'a>(pod: &'a Yaml, list: &str, name: &str) -> Option<&'a Yaml> {
    pod[list]
        .as_vec()?
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
}

/// The container's environment: a value, or `None` for a reference.
fn env_values(container: &Yaml) -> BTreeMap<String, Option<String>> {
    container["env"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.to_owned(), scalar(&e["value"]))))
        .collect()
}

fn field_ref<'a>(container: &'a Yaml, var: &str) -> Option<&'a str> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(var))?["valueFrom"]["fieldRef"]["fieldPath"]
        .as_str()
}

fn secret_ref(container: &Yaml, var: &str) -> Option<(String, String)> {
    let r = &container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(var))?["valueFrom"]["secretKeyRef"];
    Some((
        r["name"].as_str()?.to_owned(),
        r["key"].as_str()?.to_owned(),
    ))
}

/// A container's flags: `command` after the program, then `args`; every
/// flag here takes a value.
struct Args<'a> {
    at: &'a str,
    container: String,
    pairs: Vec<(String, String)>,
}

impl<'a> Args<'a> {
    fn of(
        at: &'a str,
        name: &str,
        program: &str,
        container: &Yaml,
        problems: &mut Vec<String>,
    ) -> Self {
        let command = strings(&container["command"]).unwrap_or_default();
        if command.first().map(String::as_str) != Some(program) {
            problems.push(format!(
                "{at}: {name} does not run {program} (command {command:?})"
            ));
        }
        let all: Vec<String> = command
            .into_iter()
            .skip(1)
            .chain(strings(&container["args"]).unwrap_or_default())
            .collect();
        let mut pairs = Vec::new();
        let mut it = all.into_iter();
        while let Some(flag) = it.next() {
            match it.next() {
                Some(value) if flag.starts_with("--") => pairs.push((flag, value)),
                _ => problems.push(format!(
                    "{at}: {name}'s arguments are not --flag value pairs at {flag:?}"
                )),
            }
        }
        Self {
            at,
            container: name.to_owned(),
            pairs,
        }
    }

    /// Exactly these flags, each once with this value.
    fn exactly(&self, expected: &[(&str, String)], problems: &mut Vec<String>) {
        let (at, name) = (self.at, &self.container);
        for (flag, want) in expected {
            let have: Vec<&str> = self
                .pairs
                .iter()
                .filter(|(f, _)| f == flag)
                .map(|(_, v)| v.as_str())
                .collect();
            match have.as_slice() {
                [v] if v == want => {}
                [] => problems.push(format!(
                    "{at}: {name} has no {flag}; trellis.toml's plan gives {want}"
                )),
                [v] => problems.push(format!(
                    "{at}: {name} {flag} is {v}; trellis.toml's plan gives {want}"
                )),
                _ => problems.push(format!("{at}: {name} has {flag} more than once")),
            }
        }
        for (flag, value) in &self.pairs {
            if !expected.iter().any(|(f, _)| f == flag) {
                problems.push(format!(
                    "{at}: {name} has {flag} {value}, which trellis up does not give"
                ));
            }
        }
    }
}

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
    scalar(y).unwrap_or_else(|| "(not set)".to_owned())
}

fn remove(map: &mut Yaml, key: &str) {
    if let Yaml::Hash(h) = map {
        h.remove(&Yaml::String(key.to_owned()));
    }
}

/// The registry's ConfigMap holds config/'s files, unchanged: kustomize
/// reads nothing outside deploy/kubernetes, so config/ is copied there.
#[test]
fn the_config_map_holds_config_as_it_is() {
    let manifests = Manifests::load(&repo(DIR));
    let generators = manifests.kustomization["configMapGenerator"]
        .as_vec()
        .cloned()
        .unwrap_or_default();
    let generator = generators
        .iter()
        .find(|g| g["name"].as_str() == Some(CONFIG_MAP))
        .unwrap_or_else(|| panic!("kustomization.yaml has no configMapGenerator {CONFIG_MAP}"));
    let listed: BTreeSet<String> = strings(&generator["files"])
        .unwrap_or_default()
        .into_iter()
        .collect();
    let wanted: BTreeSet<String> = toml_files(&repo("config"))
        .into_iter()
        .map(|f| format!("config/{f}"))
        .collect();
    assert_eq!(
        listed, wanted,
        "kustomization.yaml's {CONFIG_MAP} must list every config/*.toml (as config/<file>)"
    );
    let mut stale = Vec::new();
    for file in toml_files(&repo("config")) {
        let original = std::fs::read(repo(&format!("config/{file}"))).unwrap();
        let copy = std::fs::read(repo(&format!("{DIR}/config/{file}"))).unwrap_or_default();
        if original != copy {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "{DIR}/config/ differs from config/ in {stale:?}: cp config/*.toml {DIR}/config/"
    );
    assert_eq!(
        toml_files(&repo(&format!("{DIR}/config"))),
        toml_files(&repo("config")),
        "{DIR}/config/ holds files config/ does not"
    );
    // Every YAML file of the directory is a resource of the kustomization.
    let resources: BTreeSet<String> = strings(&manifests.kustomization["resources"])
        .unwrap_or_default()
        .into_iter()
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(repo(DIR))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(
        resources, files,
        "kustomization.yaml must list every manifest of {DIR}"
    );
}

fn toml_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".toml"))
        .collect()
}

/// `trellis certs --kubernetes` writes exactly the identity Secrets the
/// pods mount, in the manifests' namespace, each with the files the pods'
/// flags name and the SPIFFE ID of the workload that mounts it.
#[test]
fn trellis_certs_writes_the_secrets_the_pods_mount() {
    let manifests = Manifests::load(&repo(DIR));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "certs",
            "--kubernetes",
            "--server-name",
            "edge.example.com",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secrets = YamlLoader::load_from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let made: BTreeMap<String, &Yaml> = secrets
        .iter()
        .filter(|d| !d.is_null())
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_owned(), d))
        .collect();

    let mut mounted = BTreeSet::new();
    for object in &manifests.objects {
        let pod = match object.kind() {
            "Deployment" | "StatefulSet" => &object.doc["spec"]["template"]["spec"],
            _ => continue,
        };
        for volume in volumes(pod) {
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                mounted.insert(secret.to_owned());
                if let Some(workload) = secret.strip_prefix("identity-") {
                    let doc = made.get(secret).unwrap_or_else(|| {
                        panic!("{} mounts Secret {secret}; trellis certs --kubernetes does not write it", object.name())
                    });
                    assert_eq!(doc["metadata"]["namespace"].as_str(), Some(NAMESPACE));
                    let data = &doc["stringData"];
                    for key in [
                        "ca.pem".to_owned(),
                        format!("{workload}.pem"),
                        format!("{workload}.key"),
                    ] {
                        assert!(
                            data[key.as_str()]
                                .as_str()
                                .is_some_and(|v| v.starts_with("-----BEGIN ")),
                            "Secret {secret} has no PEM {key}"
                        );
                    }
                    // The identity is the one the pod's container claims.
                    assert_eq!(
                        secret_identity(data, workload),
                        format!("spiffe://trellis.local/ns/{NAMESPACE}/sa/{workload}"),
                        "Secret {secret}"
                    );
                }
            }
        }
    }
    let made_identities: BTreeSet<String> = made
        .keys()
        .filter(|k| k.starts_with("identity-"))
        .cloned()
        .collect();
    let mounted_identities: BTreeSet<String> = mounted
        .iter()
        .filter(|k| k.starts_with("identity-"))
        .cloned()
        .collect();
    assert_eq!(
        made_identities, mounted_identities,
        "trellis certs --kubernetes (workloads from trellis.toml) and the pods' identity Secrets differ"
    );
    let server = trellis::certs::KUBERNETES_EDGE_SERVER_SECRET;
    assert!(mounted.contains(server), "no pod mounts {server}");
    assert_eq!(made[server]["type"].as_str(), Some("kubernetes.io/tls"));
}

/// Loads the identity a Secret holds with the library's own loader (the
/// key matches the certificate, which chains to the CA) and returns its
/// SPIFFE ID.
fn secret_identity(data: &Yaml, workload: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "ca.pem".to_owned(),
        format!("{workload}.pem"),
        format!("{workload}.key"),
    ] {
        std::fs::write(dir.path().join(&key), data[key.as_str()].as_str().unwrap()).unwrap();
    }
    let workload = Workload::load(&IdentityPaths::in_dir(dir.path(), workload))
        .unwrap_or_else(|e| panic!("the Secret of {workload} holds no usable identity: {e}"));
    workload.id().as_str().to_owned()
}

/// Every manifest passes the Kubernetes schemas, strictly (an unknown or
/// misplaced field fails), for the oldest Kubernetes with native sidecars
/// and the newest the validator knows; so does the ConfigMap the
/// kustomization generates (rendered here as kustomize would: kustomize
/// itself is not at hand). kubernetes-validate ships its schemas, so this
/// needs no network (scripts/pytools installs it).
#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let validator = repo("target/pytools/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run scripts/pytools (scripts/test does)",
        validator.display()
    );
    let manifests = Manifests::load(&repo(DIR));
    let mut files: Vec<PathBuf> = strings(&manifests.kustomization["resources"])
        .unwrap_or_default()
        .iter()
        .map(|f| repo(&format!("{DIR}/{f}")))
        .collect();
    let scratch = tempfile::tempdir().unwrap();
    let config_map = scratch.path().join("trellis-config.yaml");
    std::fs::write(&config_map, render_config_map()).unwrap();
    files.push(config_map);
    // A sidecar with a misspelt field: strict validation must refuse it.
    let bad = scratch.path().join("bad.yaml");
    let usage = std::fs::read_to_string(repo(&format!("{DIR}/usage.yaml"))).unwrap();
    assert!(usage.contains("\n          restartPolicy: Always"));
    std::fs::write(
        &bad,
        usage.replacen(
            "\n          restartPolicy: Always",
            "\n          restartPolicyy: Always",
            1,
        ),
    )
    .unwrap();

    for version in KUBERNETES_VERSIONS {
        let run = |files: &[PathBuf]| {
            Command::new(&validator)
                .args(["--strict", "--quiet", "--kubernetes-version", version])
                .args(files)
                .output()
                .unwrap()
        };
        let out = run(&files);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict (Kubernetes {version}) refused deploy/kubernetes:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(std::slice::from_ref(&bad));
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("restartPolicyy"),
            "a misspelt field passed kubernetes-validate --strict (Kubernetes {version}): {said}"
        );
    }
}

/// The ConfigMap `configMapGenerator` makes: each file under its own name.
fn render_config_map() -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {CONFIG_MAP}\n  namespace: {NAMESPACE}\ndata:\n"
    );
    for file in toml_files(&repo(&format!("{DIR}/config"))) {
        let text = std::fs::read_to_string(repo(&format!("{DIR}/config/{file}"))).unwrap();
        out.push_str(&format!("  {file}: |\n"));
        for line in text.lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    out
}
