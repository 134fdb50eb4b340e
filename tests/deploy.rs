//! `deploy/` holds Prometheus and Grafana set up for a mesh on this
//! machine: these tests hold it to the repository. The scrape config has
//! the three jobs, each reading file_sd targets from a directory that
//! exists and that deploy/README.md documents, and its static targets are
//! the admin ports `trellis up` gives with trellis.toml, labelled as
//! `scripts/prometheus-targets` labels them (so a target found both ways
//! is scraped once). The dashboard is valid JSON whose every panel has the
//! `${DS_PROMETHEUS}` data source and a unique id, whose variables are
//! defined, and whose every metric is one the code defines: the proxy's
//! names and types are read from the `register` calls in
//! mesh-proxy/src/metrics.rs, so renaming a metric there without the
//! dashboard fails here.
//!
//! This only reads files (and runs the Python script once). That
//! Prometheus accepts the config and the PromQL is checked with promtool
//! and a local Prometheus (see deploy/README.md, "Checking changes").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use trellis::up::mesh::MeshFile;
use trellis::up::plan::Plan;
use yaml_rust2::{Yaml, YamlLoader};

/// The scrape jobs, one per kind of admin port.
const JOBS: [&str; 3] = ["trellis-proxies", "trellis-registry", "trellis-services"];

/// The `trellis_service` label of the edges' targets.
const EDGE_SERVICE: &str = "edge";

/// Variables Grafana itself defines.
const GRAFANA_VARIABLES: [&str; 2] = ["__rate_interval", "__range"];

fn repo(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn load_prometheus() -> Yaml {
    let path = repo("deploy/prometheus/prometheus.yml");
    let mut docs = YamlLoader::load_from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{} must hold one document", path.display());
    docs.remove(0)
}

fn load_dashboard() -> Value {
    let path = repo("deploy/grafana/trellis-mesh.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn scrape_configs(config: &Yaml) -> &[Yaml] {
    config["scrape_configs"]
        .as_vec()
        .expect("prometheus.yml has a scrape_configs list")
}

fn job<'a>(config: &'a Yaml, name: &str) -> &'a Yaml {
    scrape_configs(config)
        .iter()
        .find(|j| j["job_name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("prometheus.yml has no job {name}"))
}

/// A target as Prometheus sees it: address, trellis_service,
/// trellis_instance.
type Target = (String, String, String);

fn target_of(address: &str, labels: impl Fn(&str) -> Option<String>) -> Target {
    let label = |name: &str| labels(name).unwrap_or_else(|| panic!("{address} has no {name}"));
    (
        address.to_owned(),
        label("trellis_service"),
        label("trellis_instance"),
    )
}

/// The targets `trellis up` has with the repository's trellis.toml.
fn planned_targets() -> BTreeSet<Target> {
    let mesh = MeshFile::load(&repo("trellis.toml")).unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::unchecked(&mesh).unwrap_or_else(|e| panic!("{e}"));
    let instances = plan
        .instances
        .iter()
        .map(|i| (i.admin.to_string(), i.service.clone(), i.name.clone()));
    let edges = plan
        .edges
        .iter()
        .map(|e| (e.admin.to_string(), EDGE_SERVICE.to_owned(), e.name.clone()));
    instances.chain(edges).collect()
}

#[test]
fn prometheus_yml_has_the_three_jobs_each_reading_documented_targets() {
    let config = load_prometheus();
    let names: Vec<&str> = scrape_configs(&config)
        .iter()
        .map(|j| j["job_name"].as_str().expect("every job has a job_name"))
        .collect();
    assert_eq!(names, JOBS, "the scrape jobs");
    let readme = read(&repo("deploy/README.md"));
    let base = repo("deploy/prometheus");
    for name in JOBS {
        let job = job(&config, name);
        let files: Vec<&str> = job["file_sd_configs"]
            .as_vec()
            .unwrap_or_else(|| panic!("{name} has no file_sd_configs"))
            .iter()
            .flat_map(|sd| sd["files"].as_vec().into_iter().flatten())
            .map(|f| f.as_str().expect("file_sd files are strings"))
            .collect();
        assert!(!files.is_empty(), "{name} reads no file_sd files");
        for file in files {
            // Relative to prometheus.yml, as Prometheus resolves them.
            let dir = base.join(file).parent().unwrap().to_owned();
            assert!(
                dir.is_dir(),
                "{name}: the directory of {file} ({}) does not exist",
                dir.display()
            );
            let exists = base.join(file).exists();
            assert!(
                exists || readme.contains(file),
                "{name}: {file} neither exists nor is documented in deploy/README.md"
            );
        }
        // Every series carries trellis_service and a readable instance.
        let relabel = job["relabel_configs"]
            .as_vec()
            .unwrap_or_else(|| panic!("{name} has no relabel_configs"));
        let sets = |label: &str| {
            relabel
                .iter()
                .any(|r| r["target_label"].as_str() == Some(label))
        };
        assert!(sets("instance"), "{name} does not set instance");
        assert!(
            sets("trellis_service"),
            "{name} does not default trellis_service"
        );
        assert!(
            relabel
                .iter()
                .any(|r| r["action"].as_str() == Some("labeldrop")
                    && r["regex"].as_str() == Some("trellis_instance")),
            "{name} keeps trellis_instance beside instance"
        );
    }
}

#[test]
fn the_static_targets_are_the_admin_ports_of_trellis_toml() {
    let config = load_prometheus();
    let mut listed = BTreeSet::new();
    for group in job(&config, "trellis-proxies")["static_configs"]
        .as_vec()
        .expect("trellis-proxies has static_configs")
    {
        for address in group["targets"].as_vec().expect("a group has targets") {
            let address = address.as_str().expect("a target is a string");
            let target = target_of(address, |l| group["labels"][l].as_str().map(str::to_owned));
            assert!(listed.insert(target), "{address} listed twice");
        }
    }
    let planned = planned_targets();
    let missing: Vec<_> = planned.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&planned).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "prometheus.yml's static targets do not match trellis.toml's plan \
         (address, trellis_service, trellis_instance):\n  missing {missing:?}\n  not in the plan {extra:?}"
    );
}

/// The script turns an up.json of the plan into the same targets as the
/// static ones, and refuses a service admin port of an unknown instance.
#[test]
fn the_targets_script_writes_what_the_static_config_lists() {
    let mesh = MeshFile::load(&repo("trellis.toml")).unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::unchecked(&mesh).unwrap_or_else(|e| panic!("{e}"));
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(state.path().join("run")).unwrap();
    // The fields of `trellis up`'s <state>/run/up.json the script reads;
    // registry_admin and an instance's metrics (its service's own admin
    // port) only when `trellis up` gives those admin ports.
    let up = serde_json::json!({
        "registry_admin": "0.0.0.0:7136",
        "instances": plan.instances.iter().enumerate().map(|(n, i)| serde_json::json!({
            "service": i.service, "instance": i.name, "admin": i.admin.to_string(),
            "metrics": (n == 0).then_some("127.0.0.1:7137"),
        })).collect::<Vec<_>>(),
        "edges": plan.edges.iter().map(|e| serde_json::json!({
            "name": e.name, "admin": e.admin.to_string(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(state.path().join("run/up.json"), up.to_string()).unwrap();
    let out = state.path().join("targets");
    let [first, second] = [0, 1].map(|n| plan.instances[n].clone());
    let run = |extra: &[String]| {
        Command::new("python3")
            .arg(repo("scripts/prometheus-targets"))
            .arg("--state")
            .arg(state.path())
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .expect("python3 runs")
    };
    let succeeds = |extra: &[String]| {
        let output = run(extra);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let one = |address: &str, service: &str, instance: &str| {
        (address.to_owned(), service.to_owned(), instance.to_owned())
    };
    succeeds(&[
        "--service-admin".into(),
        format!("{}=127.0.0.1:7201", second.name),
    ]);
    let groups = |job: &str| -> BTreeSet<Target> {
        let path = out.join(format!("{job}.json"));
        let doc: Value = serde_json::from_str(&read(&path)).unwrap();
        doc.as_array()
            .unwrap_or_else(|| panic!("{} is not a list", path.display()))
            .iter()
            .flat_map(|g| {
                g["targets"].as_array().unwrap().iter().map(move |t| {
                    target_of(t.as_str().unwrap(), |l| {
                        g["labels"][l].as_str().map(str::to_owned)
                    })
                })
            })
            .collect()
    };
    assert_eq!(groups("trellis-proxies"), planned_targets());
    assert_eq!(
        groups("trellis-registry"),
        BTreeSet::from([one("127.0.0.1:7136", "registry", "registry")]),
        "an unspecified address becomes loopback"
    );
    assert_eq!(
        groups("trellis-services"),
        BTreeSet::from([
            one("127.0.0.1:7137", &first.service, &first.name),
            one("127.0.0.1:7201", &second.service, &second.name),
        ])
    );
    // The flags win over up.json.
    succeeds(&[
        "--registry-admin".into(),
        "127.0.0.1:7001".into(),
        "--service-admin".into(),
        format!("{}=127.0.0.1:7202", first.name),
    ]);
    assert_eq!(
        groups("trellis-registry"),
        BTreeSet::from([one("127.0.0.1:7001", "registry", "registry")])
    );
    assert_eq!(
        groups("trellis-services"),
        BTreeSet::from([one("127.0.0.1:7202", &first.service, &first.name)])
    );
    let refused = run(&["--service-admin".into(), "nobody=127.0.0.1:1".into()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("'nobody' is not an instance"), "{stderr}");
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for p in dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels")
    {
        all.push(p);
        all.extend(p["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Every PromQL expression: the panels' and the query variables'.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            all.push((title, t["expr"].as_str().unwrap_or("").to_owned()));
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let query = v["query"]["query"].as_str().or(v["query"].as_str());
            all.push((
                format!("variable {}", v["name"]),
                query.unwrap_or("").to_owned(),
            ));
        }
    }
    all
}

/// Words of `text` made of `[a-z0-9_]` that start with `prefix`.
fn tokens<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut at = 0;
    while let Some(i) = text[at..].find(prefix) {
        let start = at + i;
        let mut end = start + prefix.len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !(word(bytes[start - 1]) || bytes[start - 1].is_ascii_uppercase()) {
            found.push(&text[start..end]);
        }
        at = end;
    }
    found
}

/// The `trellis_` metric names in a PromQL expression: the `trellis_`
/// words that are neither a label matcher's label (`trellis_service="a"`)
/// nor in a `by`, `without`, `on` or `ignoring` list.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut at = 0;
    for word in tokens(expr, "trellis_") {
        let start = at + expr[at..].find(word).expect("the word is in the text");
        at = start + word.len();
        if expr[at..].trim_start().starts_with(['=', '!']) {
            continue;
        }
        let open = expr[..start].rfind('(');
        let in_list = open.is_some_and(|open| {
            let keyword = expr[..open].trim_end();
            !expr[open..start].contains(')')
                && ["by", "without", "on", "ignoring"]
                    .iter()
                    .any(|k| keyword.ends_with(k))
        });
        if !in_list {
            names.push(word);
        }
    }
    names
}

/// The problems of a dashboard, given the metric names the code defines.
fn check_dashboard(dashboard: &Value, defined: &Defined) -> Vec<String> {
    let mut problems = Vec::new();
    let ds = "${DS_PROMETHEUS}";
    let inputs = dashboard["__inputs"].as_array().into_iter().flatten();
    if !inputs.clone().any(|i| i["name"] == "DS_PROMETHEUS") {
        problems.push("no DS_PROMETHEUS in __inputs".to_owned());
    }
    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    match variables.get("DS_PROMETHEUS") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => problems.push("no DS_PROMETHEUS data source variable".to_owned()),
    }
    for name in ["service", "direction"] {
        if !variables.contains_key(name) {
            problems.push(format!("no variable {name}"));
        }
    }
    if dashboard["uid"] != "trellis-mesh" {
        problems.push(format!("uid is {}, not trellis-mesh", dashboard["uid"]));
    }
    if dashboard["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
        problems.push(format!("schemaVersion {}", dashboard["schemaVersion"]));
    }
    let mut ids = BTreeSet::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        match p["id"].as_u64() {
            Some(id) if !ids.insert(id) => problems.push(format!("{title}: id {id} used twice")),
            Some(_) => {}
            None => problems.push(format!("{title}: no id")),
        }
        if p["datasource"]["uid"] != ds {
            problems.push(format!("{title}: data source is not {ds}"));
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if t["datasource"]["uid"] != ds {
                problems.push(format!("{title}: a query's data source is not {ds}"));
            }
        }
        if p["type"] != "row" && p["targets"].as_array().is_none_or(|t| t.is_empty()) {
            problems.push(format!("{title}: no queries"));
        }
    }
    for (title, expr) in expressions(dashboard) {
        if expr.is_empty() {
            problems.push(format!("{title}: an empty query"));
        }
        for var in tokens(&expr, "$").into_iter().chain(tokens(&expr, "${")) {
            let name = var.trim_start_matches(['$', '{']);
            if !name.is_empty()
                && !variables.contains_key(name)
                && !GRAFANA_VARIABLES.contains(&name)
            {
                problems.push(format!("{title}: ${name} is not a variable"));
            }
        }
        for metric in metric_names(&expr) {
            if !defined.exposes(metric) {
                problems.push(format!(
                    "{title}: {metric} is not a metric anything in the repository defines"
                ));
            }
        }
    }
    problems
}

/// The metric names the repository's code defines.
#[derive(Debug, Default)]
struct Defined {
    /// Names exactly as exposed (`trellis_proxy_requests_total`): from
    /// `register` calls whose metric type is known, and names written out
    /// in full.
    exact: BTreeSet<String>,
    /// Names registered with a type this test cannot tell: any of the
    /// suffixes Prometheus adds may follow.
    base: BTreeSet<String>,
}

impl Defined {
    fn exposes(&self, name: &str) -> bool {
        if self.exact.contains(name) {
            return true;
        }
        let mut base = name;
        for suffix in ["_bucket", "_sum", "_count", "_total"] {
            if let Some(b) = name.strip_suffix(suffix) {
                base = b;
                break;
            }
        }
        self.base.contains(base) || self.base.contains(name)
    }
}

/// The string literal at the start of `text` (after whitespace), and what
/// follows it.
fn literal(text: &str) -> Option<(&str, &str)> {
    let rest = text.trim_start().strip_prefix('"')?;
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some((&rest[..i], &rest[i + 1..])),
            _ => escaped = false,
        }
    }
    None
}

/// The metrics one Rust file defines: `Registry::with_prefix("p")` and
/// `register("name", "help", value)`, the name's type read from the
/// declaration of `value` (`value: Family<_, Counter>`); and every
/// `trellis_...` word in it, for metrics named in full.
fn defined_in(source: &str, defined: &mut Defined) {
    // A name written out in full is taken as written (a histogram's
    // base name with its series' suffixes).
    for word in tokens(source, "trellis_") {
        for suffix in ["", "_bucket", "_sum", "_count"] {
            defined.exact.insert(format!("{word}{suffix}"));
        }
    }
    let prefixes: Vec<&str> = source
        .match_indices("with_prefix(")
        .filter_map(|(i, m)| literal(&source[i + m.len()..]).map(|(p, _)| p))
        .collect();
    for (i, m) in source.match_indices(".register(") {
        let Some((name, rest)) = literal(&source[i + m.len()..]) else {
            continue;
        };
        let value: String = literal(rest.trim_start().trim_start_matches(','))
            .map(|(_, after)| after.trim_start().trim_start_matches(',').trim_start())
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let kind = declaration(source, &value);
        for prefix in &prefixes {
            let full = format!("{prefix}_{name}");
            match kind {
                Some(Kind::Counter) => defined.exact.insert(format!("{full}_total")),
                Some(Kind::Gauge) => defined.exact.insert(full),
                Some(Kind::Histogram) => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        defined.exact.insert(format!("{full}{suffix}"));
                    }
                    true
                }
                None => defined.base.insert(full),
            };
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The kind of metric `name` is declared as in `source` (a field or a
/// `let` with its type on the same line).
fn declaration(source: &str, name: &str) -> Option<Kind> {
    if name.is_empty() {
        return None;
    }
    source.lines().find_map(|line| {
        let line = line.trim();
        let ty = line
            .strip_prefix(&format!("{name}:"))
            .or_else(|| line.strip_prefix(&format!("let {name} =")))
            .or_else(|| line.strip_prefix(&format!("let {name}:")))?;
        if ty.contains("Histogram") {
            Some(Kind::Histogram)
        } else if ty.contains("Counter") {
            Some(Kind::Counter)
        } else if ty.contains("Gauge") {
            Some(Kind::Gauge)
        } else {
            None
        }
    })
}

/// Every metric the repository's Rust sources define (this file aside).
fn defined_metrics() -> Defined {
    let root = repo("");
    let this = repo("tests/deploy.rs");
    let mut defined = Defined::default();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") && path != this {
                defined_in(&read(&path), &mut defined);
            }
        }
    }
    defined
}

#[test]
fn the_dashboard_uses_only_defined_metrics_and_every_panel_has_the_data_source() {
    let problems = check_dashboard(&load_dashboard(), &defined_metrics());
    assert!(
        problems.is_empty(),
        "deploy/grafana/trellis-mesh.json ({} problems):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
}

/// The proxy's names come from its `register` calls, with the suffix of
/// their type: a sample of what the dashboard relies on.
#[test]
fn the_proxy_metrics_are_read_from_its_source() {
    let mut defined = Defined::default();
    defined_in(&read(&repo("mesh-proxy/src/metrics.rs")), &mut defined);
    for name in [
        "trellis_proxy_requests_total",
        "trellis_proxy_request_duration_seconds_bucket",
        "trellis_proxy_circuit_state",
        "trellis_proxy_open_connections",
        "trellis_proxy_retries_total",
    ] {
        assert!(defined.exact.contains(name), "{name}: {defined:#?}");
    }
    assert!(
        !defined.exposes("trellis_proxy_circuit_state_total"),
        "a gauge has no _total"
    );
}

/// The checker reports what it should: each change to a copy of the
/// dashboard is named.
#[test]
fn a_broken_dashboard_is_reported() {
    let good = load_dashboard();
    let defined = defined_metrics();
    let reported = |what: &str, expected: &str, change: &dyn Fn(&mut Value)| {
        let mut broken = good.clone();
        change(&mut broken);
        let problems = check_dashboard(&broken, &defined);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{what}: expected a problem containing {expected:?}, got {problems:#?}"
        );
    };
    let title = good["panels"][1]["title"].as_str().unwrap().to_owned();
    reported(
        "a metric nothing defines",
        "trellis_proxy_made_up_total is not a metric",
        &|d| d["panels"][1]["targets"][0]["expr"] = "rate(trellis_proxy_made_up_total[5m])".into(),
    );
    reported(
        "a renamed proxy metric",
        "trellis_proxy_circuit_state_total is not a metric",
        &|d| d["panels"][1]["targets"][0]["expr"] = "trellis_proxy_circuit_state_total".into(),
    );
    reported("a duplicate id", "used twice", &|d| {
        let id = d["panels"][1]["id"].clone();
        d["panels"][2]["id"] = id;
    });
    reported(
        "a panel without the data source",
        &format!("{title}: data source is not"),
        &|d| {
            d["panels"][1]
                .as_object_mut()
                .expect("a panel is an object")
                .remove("datasource");
        },
    );
    reported("an unknown variable", "$nope is not a variable", &|d| {
        d["panels"][1]["targets"][0]["expr"] =
            "trellis_proxy_circuit_state{service=~\"$nope\"}".into()
    });
}

/// Every panel is described in deploy/README.md.
#[test]
fn the_readme_describes_every_panel() {
    let readme = read(&repo("deploy/README.md"));
    let dashboard = load_dashboard();
    let missing: Vec<&str> = panels(&dashboard)
        .into_iter()
        .filter_map(|p| p["title"].as_str())
        .filter(|t| !readme.contains(t))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/README.md does not name these panels: {missing:?}"
    );
}

/// Labels are not taken for metrics.
#[test]
fn metric_names_skip_labels() {
    assert_eq!(
        metric_names(
            r#"max by (trellis_service, subscriber) (trellis_outbox_pending{trellis_service="usage"}) / on (trellis_service) group_left sum(trellis_db_pool_max)"#
        ),
        ["trellis_outbox_pending", "trellis_db_pool_max"]
    );
}
