//! `trellis up` when things go wrong: a bad mesh file, a port already
//! taken, a program that cannot be found or dies while starting, a
//! PostgreSQL that cannot be had, and a service that keeps crashing once
//! the mesh is up. The real binary, real processes (the registry, echo and
//! mesh-proxy), nothing left running afterwards.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn trellis() -> &'static str {
    env!("CARGO_BIN_EXE_trellis")
}

fn bin_dir() -> PathBuf {
    Path::new(trellis()).parent().unwrap().to_owned()
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// A mesh file in a fresh directory (its state directory beside it).
fn mesh_file(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trellis.toml");
    let text = format!(
        "[mesh]\nports = \"auto\"\nconfig_dir = {:?}\n\n[registry]\nlisten = \"auto\"\n\n[edge]\nlisten = \"auto\"\n\n{body}",
        config_dir().display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn up(path: &Path, env: &[(&str, &str)]) -> Output {
    up_with(path, &[], env)
}

fn up_with(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(trellis())
        .arg("up")
        .arg("--file")
        .arg(path)
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Processes whose command line mentions `dir` (every process trellis up
/// starts names its state directory: certificates, logs).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (!zombie && cmdline.contains(&needle)).then_some(cmdline)
        })
        .collect()
}

/// `trellis up` running in the background, its output collected.
struct Running {
    child: std::process::Child,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn start(path: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(trellis())
            .arg("up")
            .arg("--file")
            .arg(path)
            .arg("--bin-dir")
            .arg(bin_dir())
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Self { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output holds `what` (while trellis up runs).
    fn wait_for(&mut self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.output().contains(what) {
            assert!(
                Instant::now() < deadline && self.child.try_wait().unwrap().is_none(),
                "no {what:?} within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ctrl-C; waits for a successful exit.
    fn interrupt(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "did not stop:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "{status:?}\n{}", self.output());
    }
}

#[test]
fn a_bad_mesh_file_is_refused_with_file_line_and_reason() {
    let (_dir, path) =
        mesh_file("[[service]]\nname = \"a\"\ncommand = [\"x\"]\ndepends_on = [\"b\"]\n");
    let out = up(&path, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:14: service \"a\" depends on \"b\"",
            path.display()
        )),
        "{stderr}"
    );

    let missing = up(Path::new("/nonexistent/trellis.toml"), &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("/nonexistent/trellis.toml: cannot be read"));
}

#[test]
fn a_port_already_taken_is_named() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let (dir, path) =
        mesh_file("[[service]]\nname = \"echo\"\ncommand = [\"{bin}/trellis-echo\"]\n");
    let text_with_port = std::fs::read_to_string(&path).unwrap().replace(
        "[edge]\nlisten = \"auto\"",
        &format!("[edge]\nlisten = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&path, text_with_port).unwrap();
    let out = up(&path, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "port 127.0.0.1:{port} (the edge) is already in use"
        )),
        "{}",
        text(&out)
    );
    assert!(processes_under(dir.path()).is_empty());
}

#[test]
fn a_program_that_cannot_run_stops_the_start_and_everything_started() {
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"echo\"\ncommand = [\"{bin}/trellis-echo\", \"--listen\", \"{listen}\"]\n\n\
         [[service]]\nname = \"ghost\"\ncommand = [\"/nonexistent/ghost-service\"]\ndepends_on = [\"echo\"]\n",
    );
    let out = up(&path, &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("ghost: cannot run /nonexistent/ghost-service: no such program"),
        "{all}"
    );
    assert!(
        all.contains("check: the command of service \"ghost\" on line"),
        "{all}"
    );
    // Echo and the registry had started; they were stopped again.
    assert!(all.contains("echo: ready"), "{all}");
    assert!(all.contains("stopping registry"), "{all}");
    assert!(
        processes_under(dir.path()).is_empty(),
        "{:?}",
        processes_under(dir.path())
    );
}

#[test]
fn a_service_that_dies_while_starting_is_shown_with_its_last_lines() {
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"broken\"\ncommand = [\"sh\", \"-c\", \"echo 'cannot open the widget store' >&2; exit 3\"]\n",
    );
    let out = up(&path, &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("broken exited with status 3 while broken was starting"),
        "{all}"
    );
    assert!(all.contains("    cannot open the widget store"), "{all}");
    assert!(processes_under(dir.path()).is_empty());
}

#[test]
fn every_process_gets_the_trace_collector_and_the_log_format() {
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"telltale\"\ncommand = [\"sh\", \"-c\", \"echo \\\"format=$TRELLIS_LOG_FORMAT otlp=$OTEL_EXPORTER_OTLP_ENDPOINT\\\" >&2; exit 3\"]\n",
    );
    let out = up_with(
        &path,
        &["--traces", "http://127.0.0.1:4999", "--log-format", "json"],
        &[],
    );
    let all = text(&out);
    assert!(
        all.contains("exporting traces to http://127.0.0.1:4999"),
        "{all}"
    );
    assert!(
        all.contains("    format=json otlp=http://127.0.0.1:4999"),
        "{all}"
    );
    assert!(processes_under(dir.path()).is_empty());

    let out = up_with(&path, &["--traces", "127.0.0.1:4317"], &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("give `jaeger` (to start Jaeger's all-in-one binary) or a collector's"),
        "{all}"
    );
}

#[test]
fn a_postgresql_that_cannot_be_had_stops_the_start() {
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"needs-db\"\ncommand = [\"{bin}/trellis-echo\"]\ndatabase = true\n",
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://nobody@127.0.0.1:{port}/x");
    let out = up(&path, &[("DATABASE_URL", &url)]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains(&format!("PostgreSQL at postgres://nobody@127.0.0.1:{port} (from DATABASE_URL or [postgres] url) cannot be used")),
        "{all}"
    );
    assert!(processes_under(dir.path()).is_empty());
}

/// Once the mesh is up, a service that keeps crashing is restarted with
/// backoff, then given up on; the rest keeps serving, and Ctrl-C still
/// stops everything.
#[test]
fn a_service_that_keeps_crashing_is_given_up_on_and_the_rest_keeps_running() {
    // `flaky` serves for three seconds, then its process dies. (Its
    // sidecar names its gRPC service: two mesh services cannot both serve
    // EchoService.)
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"steady\"\ncommand = [\"{bin}/trellis-echo\", \"--listen\", \"{listen}\"]\n\n\
         [[service]]\nname = \"flaky\"\n\
         command = [\"sh\", \"-c\", \"{bin}/trellis-echo --listen {listen} & sleep 3; kill -9 $!; exit 1\"]\n\
         sidecar_args = [\"--grpc-services\", \"trellis.echo.v1.FlakyEcho\"]\n",
    );
    let mut up = Running::start(&path, &[]);
    up.wait_for("given up on it", Duration::from_secs(90));
    let all = up.output();
    for expected in [
        "flaky exited with status 1; restarting in 500ms (restart 1 of at most 4)",
        "restarting in 1s (restart 2 of at most 4)",
        "flaky exited with status 1 again: 5 times in a row",
    ] {
        assert!(all.contains(expected), "{expected}:\n{all}");
    }

    // The rest of the mesh is still up: steady's sidecar is ready.
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".trellis/run/up.json")).unwrap())
            .unwrap();
    let admin = run["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance"] == "steady")
        .unwrap()["admin"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ready = runtime.block_on(trellis::up::http_get(admin, "/ready"));
    assert_eq!(ready.map(|(code, _)| code), Some(200), "{all}");
    assert!(
        up.child.try_wait().unwrap().is_none(),
        "trellis up keeps running"
    );

    up.interrupt();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        processes_under(dir.path()).is_empty(),
        "{:?}",
        processes_under(dir.path())
    );
}

/// With no server to use (`--private-postgres` stands in for a machine
/// without one), `trellis up` makes a cluster under the state directory,
/// runs the service on it, stops it last, and finds its data again on the
/// next run.
#[test]
fn a_private_postgresql_is_made_under_the_state_directory_and_kept() {
    if trellis::up::postgres::bindir().is_err() {
        // Every database test needs PostgreSQL binaries or a server; CI
        // installs them. Say so rather than pass quietly.
        panic!("no PostgreSQL binaries on this machine: install postgresql (CI does)");
    }
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"user\"\ncommand = [\"{bin}/trellis-user\"]\ndatabase = true\n",
    );
    // The cluster runs as the postgres user, which must reach the state
    // directory; a test's temporary directory is private to root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    for run in 1..=2 {
        let mut up = Running::start(&path, &["--private-postgres"]);
        up.wait_for("\nedge: ", Duration::from_secs(120));
        let all = up.output();
        assert!(all.contains("PostgreSQL: a private cluster"), "{all}");
        let data = dir.path().join(".trellis/postgres/data/PG_VERSION");
        assert!(data.exists(), "the cluster lives in the state directory");
        let id = std::fs::read_to_string(dir.path().join(".trellis/mesh-id")).unwrap();
        assert!(
            all.contains(&format!(
                "databases: trellis_{}_user on postgres://postgres@127.0.0.1:",
                id.trim()
            )),
            "{all}"
        );

        up.interrupt();
        let all = up.output();
        assert!(
            all.contains("stopping postgres"),
            "PostgreSQL stops last:\n{all}"
        );
        let postgres_at = all.find("stopping postgres").unwrap();
        assert!(
            all.find("stopping registry").unwrap() < postgres_at,
            "{all}"
        );
        std::thread::sleep(Duration::from_millis(300));
        let left: Vec<String> = processes_under(dir.path());
        assert!(left.is_empty(), "run {run} left {left:?}");
    }
}

/// A canary: `echo` in two versions side by side, v1 in two instances in
/// zone a, v2 in one with its own arguments. Every instance is named for
/// its version, shown with it, and its sidecar registers the version and
/// zone with the registry.
#[test]
fn two_versions_of_one_service_run_side_by_side() {
    let (dir, path) = mesh_file(
        "[[service]]\nname = \"echo\"\nversion = \"v1\"\nzone = \"a\"\ninstances = 2\n\
         command = [\"{bin}/trellis-echo\", \"--listen\", \"{listen}\"]\n\n\
         [[service]]\nname = \"echo\"\nversion = \"v2\"\n\
         command = [\"{bin}/trellis-echo\", \"--listen\", \"{listen}\", \"--name\", \"{instance}\"]\n",
    );
    let mut up = Running::start(&path, &[]);
    up.wait_for("\nedge: ", Duration::from_secs(90));
    let all = up.output();
    assert!(
        all.contains("The mesh is up (3 instances of 1 services"),
        "{all}"
    );
    for (instance, label) in [
        ("echo-v1-1", "version v1, zone a"),
        ("echo-v1-2", "version v1, zone a"),
        ("echo-v2", "version v2"),
    ] {
        assert!(
            all.lines()
                .any(|l| l.trim_start().starts_with(instance) && l.contains(label)),
            "{instance} with {label}:\n{all}"
        );
    }

    let state = dir.path().join(".trellis");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("run/up.json")).unwrap()).unwrap();
    let planned: Vec<(String, serde_json::Value, serde_json::Value)> = run["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["instance"].as_str().unwrap().to_owned(),
                i["version"].clone(),
                i["zone"].clone(),
            )
        })
        .collect();
    assert_eq!(
        planned,
        [
            ("echo-v1-1".to_owned(), "v1".into(), "a".into()),
            ("echo-v1-2".to_owned(), "v1".into(), "a".into()),
            ("echo-v2".to_owned(), "v2".into(), serde_json::Value::Null),
        ]
    );

    // What the registry has: each instance with its entry's labels.
    let status = Command::new(trellis())
        .args(["status", "--json", "--registry"])
        .arg(run["registry"].as_str().unwrap())
        .arg("--certs")
        .arg(state.join("certs"))
        .output()
        .unwrap();
    // (It exits 1 here: the repository's config/ names services this mesh
    // does not run.)
    let registered: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&status)));
    assert!(registered["error"].is_null(), "{registered}");
    let mut labels: Vec<(String, String, String)> = registered["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["service"], "echo", "{i}");
            (
                i["metadata"]["instance"].as_str().unwrap_or("?").to_owned(),
                i["version"].as_str().unwrap_or("?").to_owned(),
                i["zone"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    labels.sort();
    let label = |i: &str, v: &str, z: &str| (i.to_owned(), v.to_owned(), z.to_owned());
    assert_eq!(
        labels,
        [
            label("echo-v1-1", "v1", "a"),
            label("echo-v1-2", "v1", "a"),
            label("echo-v2", "v2", ""),
        ],
        "{registered}"
    );

    up.interrupt();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        processes_under(dir.path()).is_empty(),
        "{:?}",
        processes_under(dir.path())
    );
}
