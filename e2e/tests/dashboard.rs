//! `trellis dashboard` as `trellis up` runs it, against the real mesh of
//! the repository's trellis.toml: every view rendered from the running
//! mesh and checked in its HTML, the live parts pushed as server-sent
//! events, the console's calls through the TLS edge under the operator's
//! API key, and what a dashboard shows when the registry cannot be read.
//! HTTP is spoken with curl, as an operator's tools would.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::eventually;
use common::up::{Up, signal};
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::{repo_root, server_url, workspace_binary};

/// A GET or POST with curl: (HTTP status, body).
fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn get(base: &str, path: &str) -> String {
    let (code, body) = curl(&format!("{base}{path}"), &[]);
    assert_eq!(code, 200, "GET {path}:\n{body}");
    body
}

fn post(base: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut args = vec!["-X", "POST", "-H", "content-type: application/json"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", body]);
    curl(&format!("{base}{path}"), &args)
}

/// The rows of `table_id` in `html`, each row's text.
fn rows<'a>(html: &'a str, table_id: &str) -> Vec<&'a str> {
    let start = html
        .find(&format!("<table id=\"{table_id}\""))
        .unwrap_or_else(|| panic!("table #{table_id} in:\n{html}"));
    let table = &html[start..];
    let table = &table[..table.find("</table>").unwrap()];
    table.split("<tr").skip(2).collect()
}

/// For `eventually`: the page once `ok`, else the page as the reason.
fn shown(html: String, ok: bool) -> Result<String, String> {
    if ok {
        Ok(html)
    } else {
        Err(format!("the page is:\n{html}"))
    }
}

/// `trellis up` on the repository's trellis.toml, databases on the test
/// server.
fn start(state: &Path) -> Up {
    Up::start(
        &repo_root().join("trellis.toml"),
        state,
        &["--skip-build", "rust"],
        &[("DATABASE_URL", server_url().unwrap())],
        Duration::from_secs(240),
    )
}

fn drop_databases(state: &Path) {
    let (Ok(id), Ok(url)) = (std::fs::read_to_string(state.join("mesh-id")), server_url()) else {
        return;
    };
    for service in ["user", "usage", "settlement"] {
        let _ = Command::new("psql")
            .arg(format!("{url}/postgres"))
            .args(["-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS trellis_{}_{service} WITH (FORCE)",
                id.trim()
            ))
            .output();
    }
}

/// Drops the mesh's databases when the test ends, however it ends.
struct Databases<'a>(&'a Path);

impl Drop for Databases<'_> {
    fn drop(&mut self) {
        drop_databases(self.0);
    }
}

/// Echo calls through the edge until `stop`, counting them.
async fn load(edge: SocketAddr, stop: tokio::sync::watch::Receiver<bool>) -> usize {
    let mut client = echo::echo_service_client::EchoServiceClient::new(common::channel(edge));
    let mut calls = 0;
    while !*stop.borrow() && calls < 20_000 {
        let _ = client
            .echo(echo::EchoRequest {
                message: format!("load {calls}"),
                ..Default::default()
            })
            .await;
        calls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    calls
}

#[tokio::test(flavor = "multi_thread")]
async fn every_view_renders_the_running_mesh() {
    let state = tempfile::tempdir().unwrap();
    let up = tokio::task::spawn_blocking({
        let state = state.path().to_owned();
        move || start(&state)
    })
    .await
    .unwrap();
    let _databases = Databases(state.path());
    let output = up.output();
    let line = output
        .lines()
        .find(|l| l.starts_with("dashboard: "))
        .unwrap_or_else(|| panic!("the banner names the dashboard:\n{output}"));
    let base = line
        .trim_start_matches("dashboard: ")
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    // Written just after the banner.
    let run_file = state.path().join("run/up.json");
    let run: serde_json::Value = eventually("run/up.json", Duration::from_secs(10), || {
        let read = std::fs::read(&run_file).map_err(|e| e.to_string());
        async move { serde_json::from_slice(&read?).map_err(|e| e.to_string()) }
    })
    .await;
    assert_eq!(run["dashboard"], format!("{base}/"), "up.json names it");
    let key = output
        .split("(API key ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("the banner prints the TLS edge's API key")
        .to_owned();

    // Services: every one, all serving, with the security headers.
    let services = ["archive", "echo", "profile", "settlement", "usage", "user"];
    let html = eventually(
        "every service serving on the dashboard",
        Duration::from_secs(60),
        || {
            let base = base.clone();
            async move {
                let html = get(&base, "/");
                let serving = services
                    .iter()
                    .all(|s| html.contains(&format!("<tr data-service=\"{s}\">")))
                    && !html.contains("data-health=\"down\"")
                    && !html.contains("data-health=\"degraded\"");
                shown(html, serving)
            }
        },
    )
    .await;
    assert_eq!(rows(&html, "services").len(), services.len(), "{html}");
    assert!(
        html.contains("2/2 serving"),
        "usage and echo have two instances:\n{html}"
    );
    assert!(
        html.contains("id=\"source-status\" class=\"source ok\" data-state=\"ok\""),
        "{html}"
    );
    let (_, headers) = curl(&format!("{base}/"), &["-o", "/dev/null", "-D", "-"]);
    assert!(
        headers
            .to_lowercase()
            .contains("content-security-policy: default-src 'self'"),
        "{headers}"
    );
    // A filter from the URL: only the matching service, the rest counted.
    let filtered = get(&base, "/?q=settle");
    assert_eq!(rows(&filtered, "services").len(), 1, "{filtered}");
    assert!(
        filtered.contains("5 service(s) hidden by the filters"),
        "{filtered}"
    );

    // Golden metrics move while load runs, and the call map shows who
    // calls whom: the edge calls echo.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let loader = tokio::spawn(load(up.edge, stopped));
    let echo_row = eventually("echo's rate above zero", Duration::from_secs(30), || {
        let base = base.clone();
        async move {
            let html = get(&base, "/?q=echo");
            let row = rows(&html, "services")
                .first()
                .copied()
                .unwrap_or("")
                .to_owned();
            let rate = row
                .split("class=\"rate num\">")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .and_then(|r| r.trim().parse::<f64>().ok());
            let moving = rate.is_some_and(|r| r > 0.0);
            shown(row, moving)
        }
    })
    .await;
    assert!(
        echo_row.contains("100.0 %"),
        "every echo call succeeds:\n{echo_row}"
    );
    assert!(
        echo_row.contains(" ms</td>"),
        "latencies shown:\n{echo_row}"
    );
    let map = eventually(
        "edge → echo on the call map",
        Duration::from_secs(30),
        || {
            let base = base.clone();
            async move {
                let html = get(&base, "/map");
                let found = html.contains("data-caller=\"edge\" data-callee=\"echo\"");
                shown(html, found)
            }
        },
    )
    .await;
    assert!(map.contains("<svg id=\"callmap-drawing\""), "{map}");

    // The live part is pushed as server-sent events, re-rendered.
    let (_, events) = curl(&format!("{base}/live/?q=echo"), &["-N", "--max-time", "5"]);
    let pushed = events.matches("event: live").count();
    assert!(
        pushed >= 2,
        "the live view is pushed again as the rates change:\n{events}"
    );
    assert!(
        events.contains("data: <tr data-service=\"echo\">"),
        "{events}"
    );
    stop.send(true).unwrap();
    let calls = loader.await.unwrap();
    assert!(calls > 0);

    // A service: its instances with identity, and every method of its
    // registered contract with a link to the console.
    let user = get(&base, "/services/user");
    assert_eq!(rows(&user, "instances").len(), 1, "{user}");
    assert!(
        user.contains("spiffe://trellis.local/ns/default/sa/user"),
        "{user}"
    );
    assert!(
        user.contains("<tr data-method=\"telco.user.v1.UserService/CreateUser\">"),
        "{user}"
    );
    assert!(
        user.contains("href=\"/console?method=telco.user.v1.UserService/CreateUser\""),
        "{user}"
    );
    let echo_page = get(&base, "/services/echo");
    assert!(
        echo_page.contains("<td class=\"kind\">client streaming</td>"),
        "{echo_page}"
    );
    let unknown = get(&base, "/services/nothing");
    assert!(
        unknown.contains("No instance of nothing is registered"),
        "{unknown}"
    );

    // An instance: registration, lease, health history, metadata.
    let id = user
        .split("<tr data-instance=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let instance = get(&base, &format!("/instances/{id}"));
    for expected in [
        "<dl id=\"instance\">",
        "expires in",
        "<ol id=\"health-history\">",
        "<li data-health=\"SERVING\">",
        "trellis.admin",
    ] {
        assert!(instance.contains(expected), "{expected:?} in:\n{instance}");
    }

    // The registry and the configuration in force, without problems.
    let registry = get(&base, "/registry");
    assert!(registry.contains("data-in-use=\"true\""), "{registry}");
    assert!(
        registry.contains("<p id=\"config-state\" data-ok=\"true\">revision"),
        "{registry}"
    );
    assert!(
        registry.contains("spiffe://trellis.local/ns/default/sa/dashboard"),
        "{registry}"
    );

    // Recent changes: every instance's registration.
    let changes = get(&base, "/events");
    assert_eq!(
        changes.matches("<tr data-kind=\"registered\"").count(),
        8,
        "{changes}"
    );

    // The console: the methods of every registered contract, the form's
    // schema, and calls through the TLS edge under the operator's key.
    let console = get(
        &base,
        "/console?method=telco.user.v1.UserService/CreateUser",
    );
    assert!(
        console.contains("<option value=\"telco.user.v1.UserService/CreateUser\" selected>"),
        "{console}"
    );
    assert!(!console.contains(&key), "the API key is never rendered");
    let schema: serde_json::Value = serde_json::from_str(&get(
        &base,
        "/api/schema?method=telco.user.v1.UserService/CreateUser",
    ))
    .unwrap();
    assert_eq!(schema["supported"], true, "{schema}");
    let collect: serde_json::Value = serde_json::from_str(&get(
        &base,
        "/api/schema?method=trellis.echo.v1.EchoService/Collect",
    ))
    .unwrap();
    assert_eq!(collect["supported"], false, "{collect}");
    assert!(
        collect["unsupported_reason"]
            .as_str()
            .unwrap()
            .contains("client-streaming"),
        "{collect}"
    );
    let api_key = format!("x-api-key: {key}");
    let (code, _) = post(&base, "/api/sign-in", &[&api_key], "");
    assert_eq!(code, 200, "the edge accepts the printed key");
    let (code, refused) = post(&base, "/api/sign-in", &["x-api-key: not-the-key"], "");
    assert_eq!(code, 401, "{refused}");
    assert!(refused.contains("unknown API key"), "{refused}");

    let create = r#"{"method":"telco.user.v1.UserService/CreateUser","body":{"msisdn":"+4915177700001","name":"Ada Lovelace","email":"ada@example.com"}}"#;
    let (code, refused) = post(&base, "/api/call", &[], create);
    assert_eq!(code, 401, "read-only without a credential: {refused}");
    let (code, answer) = post(&base, "/api/call", &[&api_key], create);
    assert_eq!(code, 200, "{answer}");
    let lines: Vec<serde_json::Value> = answer
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0]["message"]["user"]["msisdn"], "+4915177700001",
        "{answer}"
    );
    assert_eq!(lines[1]["end"]["status"], "OK", "{answer}");
    // The same again: the service's own error, with its status.
    let (_, again) = post(&base, "/api/call", &[&api_key], create);
    assert!(again.contains("\"status\":\"ALREADY_EXISTS\""), "{again}");
    // Invalid input is caught before sending, naming the field.
    let (code, bad) = post(
        &base,
        "/api/call",
        &[&api_key],
        r#"{"method":"trellis.echo.v1.EchoService/Count","body":{"count":"many"}}"#,
    );
    assert_eq!(code, 400, "{bad}");
    assert!(bad.contains("count"), "{bad}");
    // The callee sees the operator's verified identity, not the dashboard's.
    let (_, echoed) = post(
        &base,
        "/api/call",
        &[&api_key],
        r#"{"method":"trellis.echo.v1.EchoService/Echo","body":{"message":"who am I"}}"#,
    );
    assert!(echoed.contains("\"message\":\"who am I\""), "{echoed}");
    assert!(
        echoed.contains("\"x-trellis-principal\":\"api-key:you\""),
        "the edge's verified principal for the printed key (named `you`):\n{echoed}"
    );
    // A server stream arrives message by message.
    let (_, counted) = post(
        &base,
        "/api/call",
        &[&api_key],
        r#"{"method":"trellis.echo.v1.EchoService/Count","body":{"count":3}}"#,
    );
    assert_eq!(counted.matches("{\"message\":").count(), 3, "{counted}");
    // A request from another site's page is refused.
    let (code, _) = post(
        &base,
        "/api/call",
        &[&api_key, "origin: http://elsewhere.example"],
        create,
    );
    assert_eq!(code, 403);

    // A SIGKILLed instance goes unhealthy (its sidecar sees the process
    // gone), and the dashboard records it even though trellis up restarts
    // it at once.
    let echo_pid = up.pid("echo-1").expect("echo-1 runs");
    signal(echo_pid, "KILL");
    let changes = eventually(
        "echo NOT_SERVING among the changes",
        Duration::from_secs(30),
        || {
            let base = base.clone();
            async move {
                let html = get(&base, "/events?q=echo");
                let found = html.contains("now NOT_SERVING");
                shown(html, found)
            }
        },
    )
    .await;
    assert!(
        changes.contains("<tr data-kind=\"health\" data-service=\"echo\">"),
        "{changes}"
    );

    // A new registration of a service changes the console's contract
    // fingerprint, which makes an open console fetch the contract again.
    let fingerprint = |html: &str| {
        html.split("data-fingerprint=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(str::to_owned)
    };
    let before = fingerprint(&get(
        &base,
        "/console?method=trellis.echo.v1.EchoService/Echo",
    ))
    .expect("the console's live part carries the contract's fingerprint");
    let sidecar = up.pid("echo-2-proxy").expect("echo-2's sidecar runs");
    signal(sidecar, "KILL");
    eventually(
        "a new fingerprint once echo-2 registers again",
        Duration::from_secs(30),
        || {
            let base = base.clone();
            let before = before.clone();
            async move {
                let html = get(&base, "/console?method=trellis.echo.v1.EchoService/Echo");
                let now = fingerprint(&html);
                shown(html, now.is_some_and(|f| f != before))
            }
        },
    )
    .await;
    drop(up);
}

/// A dashboard whose registry cannot be reached says so, on every view
/// and in `/ready`, rather than showing an empty mesh.
#[tokio::test]
async fn a_registry_that_is_down_shows_as_down() {
    let certs = tempfile::tempdir().unwrap();
    let status = Command::new(workspace_binary("trellis"))
        .args(["certs", "--dir"])
        .arg(certs.path())
        .args(["--workload", "dashboard"])
        .status()
        .unwrap();
    assert!(status.success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let registry = closed.local_addr().unwrap();
    drop(closed);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(workspace_binary("trellis"))
        .args(["dashboard", "--listen", &port.to_string()])
        .args([
            "--registry",
            &registry.to_string(),
            "--identity",
            "dashboard",
        ])
        .arg("--certs")
        .arg(certs.path())
        .spawn()
        .unwrap();
    let base = format!("http://{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let html = loop {
        let (code, html) = curl(&format!("{base}/"), &[]);
        if code == 200 && html.contains("cannot be read") {
            break html;
        }
        assert!(
            Instant::now() < deadline,
            "no page saying the registry is down:\n{html}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (ready, why) = curl(&format!("{base}/ready"), &[]);
    // A browser's open live stream does not hold a stop up.
    let mut stream = Command::new("curl")
        .args(["-sN", "--max-time", "30", &format!("{base}/live/")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(child.id(), "TERM");
    let stopped = Instant::now();
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if stopped.elapsed() > Duration::from_secs(5) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = stream.kill();
    let _ = stream.wait();
    assert!(
        exited.is_some(),
        "the dashboard did not stop within 5s of SIGTERM with a live stream open"
    );
    assert_eq!(ready, 503, "{why}");
    assert!(why.contains(&registry.to_string()), "{why}");
    assert!(html.contains("data-state=\"down\""), "{html}");
    assert!(
        html.contains(&registry.to_string()),
        "names the registry:\n{html}"
    );
    assert!(html.contains("No view of the mesh"), "{html}");
    assert!(!html.contains("Nothing is registered"), "{html}");
}
