//! The mesh as `trellis up` runs it, from the repository's own
//! trellis.toml: the real `trellis` binary starts every process (the
//! Python profile service included), supervises them, and stops them on
//! Ctrl-C. Addresses are whatever ports are free (`--any-ports`), the
//! databases are made for this test on the test server.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::*;
use trellis::pb::telco::usage::v1 as usage;
use trellis::pb::telco::user::v1 as user;
use trellis_test_support::{binary_dir, repo_root, server_url, workspace_binary};

use usage::usage_service_client::UsageServiceClient;
use user::user_service_client::UserServiceClient;

/// `trellis up` running in a state directory of its own.
struct Up {
    child: Child,
    state: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    prefix: String,
    /// Whether dropping this run drops its databases (not between two
    /// runs on the same data).
    drop_databases: bool,
    edge: SocketAddr,
    registry: SocketAddr,
}

impl Up {
    /// Starts `trellis up` with the repository's mesh file and waits for
    /// its `edge:` line.
    fn start(state: &Path) -> Self {
        let mut child = Command::new(workspace_binary("trellis"))
            .args(["up", "--any-ports", "--skip-build", "rust"])
            .arg("--file")
            .arg(repo_root().join("trellis.toml"))
            .arg("--state-dir")
            .arg(state)
            .arg("--bin-dir")
            .arg(binary_dir())
            .env("DATABASE_URL", server_url().unwrap())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("trellis up starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut up = Self {
            child,
            state: state.to_owned(),
            output,
            lines,
            prefix: String::new(),
            drop_databases: true,
            edge: "0.0.0.0:0".parse().unwrap(),
            registry: "0.0.0.0:0".parse().unwrap(),
        };
        let edge = up.wait_line("edge: ", Duration::from_secs(240));
        up.edge = edge.trim_start_matches("edge: ").trim().parse().unwrap();
        // The databases belong to the state directory: trellis_<its id>_*.
        let id = std::fs::read_to_string(state.join("mesh-id")).unwrap();
        up.prefix = format!("trellis_{}", id.trim());
        let registry = up.wait_line("registry: ", Duration::from_secs(5));
        up.registry = registry
            .trim_start_matches("registry: ")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        up
    }

    /// The next line starting with `prefix`, or a panic showing the output.
    fn wait_line(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no line starting {prefix:?} within {limit:?}:\n{}",
                    self.output()
                ),
            }
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    fn run_dir(&self) -> PathBuf {
        self.state.join("run")
    }

    /// The pid of process `name` (`usage-1`) now.
    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.run_dir().join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every process trellis up runs now, by name.
    fn pids(&self) -> Vec<(String, u32)> {
        std::fs::read_dir(self.run_dir())
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_stem()?.to_str()?.to_owned();
                (path.extension()? == "pid" && name != "trellis-up")
                    .then(|| Some((name, self.pid(path.file_stem()?.to_str()?)?)))?
            })
            .collect()
    }

    /// An instance's admin address, from the run file.
    fn admin(&self, instance: &str) -> SocketAddr {
        let run: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.run_dir().join("up.json")).unwrap())
                .unwrap();
        run["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["instance"] == instance)
            .unwrap_or_else(|| panic!("{instance} in up.json: {run}"))["admin"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// `trellis status` against this mesh: exit code and output.
    fn status(&self) -> (i32, String) {
        let out = Command::new(workspace_binary("trellis"))
            .args(["status", "--registry", &self.registry.to_string()])
            .arg("--certs")
            .arg(self.state.join("certs"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Ctrl-C, then waits for trellis up to exit.
    fn interrupt(&mut self, limit: Duration) -> std::process::ExitStatus {
        signal(self.child.id(), "INT");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "trellis up did not stop within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // A failed test: stop the mesh, and kill what is left.
            signal(self.child.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            for (_, pid) in self.pids() {
                signal(pid, "KILL");
            }
        }
        if self.drop_databases {
            drop_databases(&self.prefix);
        }
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

fn drop_databases(prefix: &str) {
    let url = match server_url() {
        Ok(u) => u,
        Err(_) => return,
    };
    for service in ["user", "usage", "settlement"] {
        let _ = Command::new("psql")
            .arg(format!("{url}/postgres"))
            .args(["-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {prefix}_{service} WITH (FORCE)"
            ))
            .output();
    }
}

async fn ready(admin: SocketAddr) -> bool {
    trellis::up::http_get(admin, "/ready")
        .await
        .is_some_and(|(code, _)| code == 200)
}

/// The whole story a new user goes through, on one mesh (it takes a while
/// to start): status, the billing system and the Python service through
/// the edge, a usage instance SIGKILLed under load, then Ctrl-C.
#[tokio::test(flavor = "multi_thread")]
async fn trellis_up_runs_supervises_and_stops_the_mesh() {
    let state = tempfile::tempdir().unwrap();
    let mut up = tokio::task::spawn_blocking({
        let state = state.path().to_owned();
        move || Up::start(&state)
    })
    .await
    .unwrap();
    let edge = up.edge;
    for service in [
        "telco.user.v1.UserService",
        "telco.usage.v1.UsageService",
        "telco.settlement.v1.SettlementService",
        "telco.profile.v1.ProfileService",
    ] {
        wait_serving(edge, service, Duration::from_secs(30)).await;
    }

    // `trellis status`: every instance, serving, exit 0.
    let (code, status) = up.status();
    assert_eq!(code, 0, "trellis status:\n{status}");
    for instance in [
        "user",
        "usage-1",
        "usage-2",
        "settlement",
        "archive",
        "echo-1",
        "echo-2",
        "profile",
    ] {
        assert!(
            status.contains(&format!("instance={instance}")),
            "{instance} in trellis status:\n{status}"
        );
    }
    assert!(
        status.contains("8 instances in 6 services, all serving"),
        "{status}"
    );

    // The Python service, through the edge, calls user (Rust) through
    // its own sidecar.
    let created = buf_curl(
        edge,
        "telco.user.v1.UserService/CreateUser",
        r#"{"msisdn":"+4915199900001","name":"Grace Hopper","email":"grace@example.com"}"#,
    )
    .unwrap();
    let user_id = created["user"]["id"].as_str().unwrap().to_owned();
    buf_curl(
        edge,
        "telco.user.v1.UserService/Subscribe",
        &format!(r#"{{"userId":"{user_id}","planId":"plus"}}"#),
    )
    .unwrap();
    let profile = buf_curl(
        edge,
        "telco.profile.v1.ProfileService/GetProfile",
        &format!(r#"{{"userId":"{user_id}"}}"#),
    )
    .unwrap();
    assert_eq!(profile["profile"]["name"], "Grace Hopper", "{profile}");
    assert_eq!(profile["profile"]["plan"]["planId"], "plus", "{profile}");
    let unknown = buf_curl(
        edge,
        "telco.profile.v1.ProfileService/GetProfile",
        r#"{"userId":"00000000-0000-0000-0000-000000000000"}"#,
    )
    .unwrap_err();
    assert!(unknown.contains("not_found"), "{unknown}");

    // Steady load through the edge; usage-1 is SIGKILLed partway. Every
    // call is idempotent (its key), so none may fail, and the instance
    // comes back by itself.
    let killed = up.pid("usage-1").expect("usage-1 runs");
    let failures = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let load = Duration::from_secs(8);
    let mut workers = Vec::new();
    for w in 0..4 {
        let (failures, done, user_id) = (failures.clone(), done.clone(), user_id.clone());
        workers.push(tokio::spawn(async move {
            let mut client = UsageServiceClient::new(channel(edge));
            let mut i = 0;
            while started.elapsed() < load {
                i += 1;
                let request = usage::RecordUsageRequest {
                    user_id: user_id.clone(),
                    r#type: usage::UsageType::Sms as i32,
                    quantity: 1,
                    occurred_at: Some(timestamp(time::OffsetDateTime::now_utc())),
                    idempotency_key: format!("load-{w}-{i}"),
                };
                let mut request = tonic::Request::new(request);
                request.set_timeout(Duration::from_secs(5));
                match client.record_usage(request).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => failures.lock().unwrap().push(format!("{status:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(killed, "KILL");
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let done = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} calls failed after usage-1 was killed: {:?}",
        failures.len(),
        failures.len() + done,
        &failures[..failures.len().min(5)]
    );
    assert!(done > 20, "only {done} calls in {load:?}");
    let admin = up.admin("usage-1");
    eventually(
        "usage-1 restarted and ready",
        Duration::from_secs(60),
        || {
            let now = up.pid("usage-1");
            async move {
                match now {
                    Some(pid) if pid != killed && ready(admin).await => Ok(()),
                    other => Err(format!("pid {other:?}, ready {}", ready(admin).await)),
                }
            }
        },
    )
    .await;
    assert!(
        up.output()
            .contains("usage-1 was killed by SIGKILL; restarting"),
        "the restart is reported:\n{}",
        up.output()
    );
    let mut client = UserServiceClient::new(channel(edge));
    let got = client
        .get_user(user::GetUserRequest {
            user_id: user_id.clone(),
        })
        .await;
    assert!(got.is_ok(), "the rest kept serving: {got:?}");

    // Ctrl-C: everything drains and stops; nothing is left running.
    let pids = up.pids();
    assert!(pids.len() >= 18, "every process has a pid file: {pids:?}");
    let exit = up.interrupt(Duration::from_secs(90));
    assert!(exit.success(), "trellis up exit {exit:?}:\n{}", up.output());
    std::thread::sleep(Duration::from_millis(200));
    let left: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
    assert!(left.is_empty(), "left running: {left:?}\n{}", up.output());
    assert!(
        std::net::TcpStream::connect_timeout(&edge, Duration::from_millis(300)).is_err(),
        "the edge still listens"
    );
    assert!(up.output().contains("stopped; nothing is left running"));
    assert!(
        !up.output().contains("grace period over"),
        "every process drained within its grace period:\n{}",
        up.output()
    );

    // A second run in the same state directory starts cleanly, with the
    // data of the first.
    up.drop_databases = false;
    drop(up);
    let mut again = tokio::task::spawn_blocking({
        let state = state.path().to_owned();
        move || Up::start(&state)
    })
    .await
    .unwrap();
    wait_serving(
        again.edge,
        "telco.profile.v1.ProfileService",
        Duration::from_secs(30),
    )
    .await;
    let profile = buf_curl(
        again.edge,
        "telco.profile.v1.ProfileService/GetProfile",
        &format!(r#"{{"userId":"{user_id}"}}"#),
    )
    .unwrap();
    assert_eq!(profile["profile"]["plan"]["planId"], "plus", "{profile}");
    let exit = again.interrupt(Duration::from_secs(90));
    assert!(
        exit.success(),
        "second run exit {exit:?}:\n{}",
        again.output()
    );
}
