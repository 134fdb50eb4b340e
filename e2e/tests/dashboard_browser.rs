//! The dashboard in a real browser: `trellis up` runs the repository's
//! mesh (as in up.rs), and e2e/browser/dashboard_test.py drives headless
//! Chromium (Debian's `chromium`, through Playwright from PyPI) against
//! the dashboard it serves. This test is the script's other half: it
//! starts load through the edge when the script asks (`@@ ready: load`),
//! SIGKILLs an instance's service process when the script watches for it
//! (`@@ ready: kill <instance>`), and checks that `trellis up` restarted
//! it. Screenshots of every main view land in target/artefacts/dashboard/.
//!
//! Chromium and Playwright are required, not optional: `scripts/test` and
//! CI install them, and without them this test fails saying so.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::up::{Databases, Up, alive, signal};
use common::*;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::{repo_root, server_url};

use echo::echo_service_client::EchoServiceClient;

/// How long the whole browser script may run; each of its waits is at
/// most 30 s, and it has about a dozen steps.
const SCRIPT_LIMIT: Duration = Duration::from_secs(420);
/// The longest the load runs, whatever the script does.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// Concurrent callers of the load.
const LOAD_WORKERS: usize = 4;
/// The instance the script watches go unhealthy; its service is echo, the
/// one under load, with a second instance that keeps serving.
const KILLED: &str = "echo-1";

/// Chromium: `TRELLIS_CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    std::env::var_os("TRELLIS_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// The virtualenv's Python with Playwright in it, or a panic saying how to
/// get it (this test does not skip: CI installs both).
fn python_with_playwright() -> PathBuf {
    let python = repo_root().join("target/pytools/bin/python");
    let works = Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        works,
        "{} cannot import Playwright: run scripts/pytools (scripts/test does), which installs it from PyPI",
        python.display()
    );
    let chromium = chromium();
    assert!(
        chromium.exists(),
        "no Chromium at {}: install Debian's chromium (`apt-get install chromium`; scripts/test and CI do) \
         or set TRELLIS_CHROMIUM",
        chromium.display()
    );
    python
}

/// The value after `prefix` on the first line of what `trellis up` printed
/// that starts with it (the banner comes in one write, but the reader
/// threads may lag a little behind it).
fn banner_value(up: &Up, prefix: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = up
            .output()
            .lines()
            .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().to_owned()));
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The dashboard's base URL: the banner's `dashboard:` line, else the run
/// file's `dashboard` key.
fn dashboard_url(up: &Up) -> String {
    if let Some(url) = banner_value(up, "dashboard: ") {
        return url.split_whitespace().next().unwrap_or_default().to_owned();
    }
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(up.state().join("run/up.json")).expect("run/up.json"),
    )
    .expect("run/up.json is JSON");
    let address = run["dashboard"].as_str().unwrap_or_else(|| {
        panic!(
            "no `dashboard:` line in trellis up's banner and no \"dashboard\" in up.json:\n{}",
            up.output()
        )
    });
    if address.starts_with("http") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// The TLS edge's API key, from `edge (TLS): ADDR  (API key KEY; CA ...)`.
fn api_key(up: &Up) -> String {
    let line = banner_value(up, "edge (TLS): ")
        .unwrap_or_else(|| panic!("no `edge (TLS):` line:\n{}", up.output()));
    line.split("API key ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .map(|key| key.trim().to_owned())
        .unwrap_or_else(|| panic!("no API key in {line:?}"))
}

/// An instance's sidecar inbound address (what the registry lists), from
/// the run file.
fn inbound(up: &Up, instance: &str) -> String {
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.state().join("run/up.json")).unwrap()).unwrap();
    run["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["instance"] == instance))
        .and_then(|i| i["inbound"].as_str())
        .unwrap_or_else(|| panic!("{instance}'s inbound address in up.json: {run}"))
        .to_owned()
}

/// Echo calls through the edge from a few workers until `stop` or
/// [`LOAD_LIMIT`]; counts the calls that succeeded.
fn start_load(
    edge: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let started = Instant::now();
    (0..LOAD_WORKERS)
        .map(|w| {
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut client = EchoServiceClient::new(channel(edge));
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                    let mut request = tonic::Request::new(echo::EchoRequest {
                        message: format!("load {w}"),
                        payload: Vec::new(),
                    });
                    request.set_timeout(Duration::from_secs(5));
                    if client.echo(request).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_mesh_in_a_real_browser() {
    let python = python_with_playwright();
    let state = tempfile::tempdir().unwrap();
    let mut up = tokio::task::spawn_blocking({
        let state = state.path().to_owned();
        move || {
            Up::start(
                &repo_root().join("trellis.toml"),
                &state,
                &["--skip-build", "rust"],
                &[("DATABASE_URL", server_url().unwrap())],
                Duration::from_secs(240),
            )
        }
    })
    .await
    .unwrap();
    let _databases = Databases::of(state.path());
    for service in [
        "telco.user.v1.UserService",
        "telco.usage.v1.UsageService",
        "telco.settlement.v1.SettlementService",
        "telco.profile.v1.ProfileService",
        "trellis.echo.v1.EchoService",
    ] {
        wait_serving(up.edge, service, Duration::from_secs(30)).await;
    }
    let url = dashboard_url(&up);
    let key = api_key(&up);
    let artefacts = repo_root().join("target/artefacts/dashboard");
    std::fs::create_dir_all(&artefacts).unwrap();
    for old in std::fs::read_dir(&artefacts).unwrap().flatten() {
        if old.path().extension().is_some_and(|e| e == "png") {
            let _ = std::fs::remove_file(old.path());
        }
    }

    let mut script = Command::new(&python)
        .arg(repo_root().join("e2e/browser/dashboard_test.py"))
        .args(["--url", &url, "--api-key", &key, "--kill-instance", KILLED])
        .args(["--kill-address", &inbound(&up, KILLED)])
        .arg("--artefacts")
        .arg(&artefacts)
        .arg("--readme-shot")
        .arg(artefacts.join("readme.png"))
        .arg("--chromium")
        .arg(chromium())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the browser script starts");
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(64);
    for stream in [
        Box::new(script.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(script.stderr.take().unwrap()),
    ] {
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines_tx);

    // Act on the script's requests until its output ends (it exited) or
    // the limit passes.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    let mut killed = None;
    let deadline = tokio::time::Instant::now() + SCRIPT_LIMIT;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(_) => {
                let _ = script.kill();
                panic!("the browser script ran longer than {SCRIPT_LIMIT:?} (its output is above)");
            }
        };
        eprintln!("{line}");
        if line == "@@ ready: load" && load.is_empty() {
            load = start_load(up.edge, stop.clone(), done.clone());
        } else if let Some(instance) = line.strip_prefix("@@ ready: kill ") {
            let pid = up
                .pid(instance)
                .unwrap_or_else(|| panic!("{instance} has no pid file"));
            signal(pid, "KILL");
            killed = Some((instance.to_owned(), pid));
        }
    }
    let status = tokio::task::spawn_blocking(move || script.wait())
        .await
        .unwrap()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    assert!(
        status.success(),
        "the browser script failed ({status}; its output is above, ending with what failed); \
         screenshots in {}; trellis up printed:\n{}",
        artefacts.display(),
        up.output()
    );
    assert!(
        done.load(Ordering::Relaxed) > 0,
        "no load call succeeded through the edge"
    );
    for view in [
        "services", "service", "instance", "callmap", "registry", "events", "console",
    ] {
        let shot = artefacts.join(format!("{view}.png"));
        assert!(shot_is_png(&shot), "{} was not saved", shot.display());
    }

    // The script saw the instance go unhealthy and come back; the restart
    // was trellis up's.
    let (instance, old) = killed.expect("the script asked for the SIGKILL");
    eventually(
        &format!("{instance} restarted"),
        Duration::from_secs(30),
        || {
            let now = up.pid(&instance);
            async move {
                match now {
                    Some(pid) if pid != old && alive(pid) => Ok(()),
                    other => Err(format!("pid {other:?} (was {old})")),
                }
            }
        },
    )
    .await;
    let exit = up.interrupt(Duration::from_secs(90));
    assert!(exit.success(), "trellis up exit {exit:?}:\n{}", up.output());
}

/// Whether `path` is a non-empty PNG file.
fn shot_is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() > 8 && b.starts_with(b"\x89PNG"))
}
