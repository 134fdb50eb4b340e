//! `trellis status` against a real registry, with echo instances behind
//! real sidecars: what it shows, and its exit status (0 all serving, 1 not,
//! 2 when the registry cannot be asked).
//!
//! Needs the workspace's binaries: `cargo test --workspace`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use trellis::identity::IdentityPaths;
use trellis_test_support::{
    ChildGuard, ProxyOptions, TestPki, free_port, sibling_binary, spawn_echo, spawn_proxy,
    wait_for_tcp,
};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn bin(name: &str) -> PathBuf {
    sibling_binary(TRELLIS, name)
}

/// `trellis status` as the `cli` identity of `pki`, with `extra` flags.
fn status_command(pki: &TestPki, registry: SocketAddr, extra: &[&str]) -> Command {
    status_of(pki, &registry.to_string(), extra)
}

/// `trellis status --registry LIST` (`A,B,...`).
fn status_of(pki: &TestPki, registry: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(TRELLIS);
    cmd.arg("status")
        .arg("--registry")
        .arg(registry)
        .arg("--certs")
        .arg(pki.dir())
        .args(extra)
        .env_remove("TRELLIS_CLI_IDENTITY")
        .env_remove("TRELLIS_REGISTRY_IDENTITY");
    cmd
}

fn status(pki: &TestPki, registry: SocketAddr, extra: &[&str]) -> (i32, String, String) {
    run(status_command(pki, registry, extra))
}

fn run(mut command: Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().unwrap();
    (
        status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Runs `trellis status` until its output contains `wanted` (the mesh
/// settles on its own time: registration, health, config polling).
fn status_until(pki: &TestPki, registry: SocketAddr, wanted: &str) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, stdout, stderr) = status(pki, registry, &[]);
        if stdout.contains(wanted) {
            return (code, stdout);
        }
        assert!(
            Instant::now() < deadline,
            "no {wanted:?} in time; last exit {code}:\n{stdout}{stderr}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The registry, started as `trellis up` starts it: `cli` may read but not
/// register.
fn spawn_registry(pki: &TestPki, config_dir: &Path) -> (SocketAddr, ChildGuard) {
    let identity = pki.issue("registry", "registry");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(bin("trellis-registry"));
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--read-only")
        .arg("edge,cli")
        .arg("--cert")
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca)
        .env("RUST_LOG", "info");
    let process = ChildGuard::spawn("registry", cmd).unwrap();
    assert!(
        wait_for_tcp(addr, Duration::from_secs(20)),
        "registry did not listen: {}",
        process.output()
    );
    (addr, process)
}

/// The line of the instance table that shows `address`.
fn line_with<'a>(output: &'a str, address: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.contains(address))
        .unwrap_or_else(|| panic!("no line shows {address}:\n{output}"))
}

#[test]
fn an_unreachable_registry_or_a_missing_identity_exits_2_with_a_readable_message() {
    let pki = TestPki::new("trellis.local");
    pki.issue("cli", "cli");
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));

    let (code, stdout, stderr) = status(&pki, nowhere, &[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the registry at {nowhere}")),
        "{stderr}"
    );
    assert!(stderr.contains("trellis up"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    let (code, _, stderr) = status(&pki, nowhere, &["--identity", "nobody"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nobody.pem"), "{stderr}");
    assert!(stderr.contains("--certs"), "{stderr}");

    // Several replicas, none answering: each is named with what it said.
    let elsewhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (code, stdout, stderr) = run(status_of(&pki, &format!("{nowhere},{elsewhere}"), &[]));
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "no registry replica answered (tried {nowhere}, {elsewhere})"
        )),
        "{stderr}"
    );
    for addr in [nowhere, elsewhere] {
        assert!(
            stderr.contains(&format!("cannot reach the registry at {addr}")),
            "{stderr}"
        );
    }

    // A bad list is refused before anything is asked, naming the entry.
    let (code, _, stderr) = run(status_of(&pki, &format!("{nowhere},,{elsewhere}"), &[]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("entry 2 is empty"), "{stderr}");
}

#[test]
fn shows_instances_health_leases_and_config_problems_and_follows_changes() {
    let pki = TestPki::new("trellis.local");
    pki.issue("cli", "cli");
    let config = tempfile::tempdir().unwrap();
    let (registry, _registry_process) = spawn_registry(&pki, config.path());

    // A certificate from another mesh's CA: no mTLS, and a hint why.
    let stranger = TestPki::new("trellis.local");
    stranger.issue("cli", "cli");
    let (code, _, stderr) = status(&stranger, registry, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the registry at {registry}")),
        "{stderr}"
    );
    assert!(stderr.contains("ca.pem"), "{stderr}");

    // Nothing registered yet: not a mesh that is up.
    let (code, stdout, stderr) = status(&pki, registry, &[]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("no instances registered"), "{stdout}");

    let echo_bin = bin("trellis-echo");
    let proxy_bin = bin("mesh-proxy");
    let echo_a = spawn_echo(&echo_bin, "a", &[]);
    let mut echo_b = spawn_echo(&echo_bin, "b", &[]);
    let identity_a = pki.issue("echo", "echo-a");
    let identity_b = pki.issue("echo", "echo-b");
    let proxy = |name: &str, app: SocketAddr, identity: &IdentityPaths, extra: &[&str]| {
        spawn_proxy(
            &proxy_bin,
            name,
            ProxyOptions::new(identity, Some(app), Some(registry)).args(extra),
        )
    };
    let proxy_a = proxy(
        "a",
        echo_a.addr,
        &identity_a,
        &["--service-version", "1.2.3", "--zone", "zone-a"],
    );
    let proxy_b = proxy("b", echo_b.addr, &identity_b, &[]);
    let (a, b) = (proxy_a.inbound.to_string(), proxy_b.inbound.to_string());

    let (code, all_up) = status_until(&pki, registry, "2 instances in 1 service, all serving");
    assert_eq!(code, 0, "{all_up}");
    for wanted in [
        "trellis.echo.v1.EchoService",
        "2/2",
        "as spiffe://trellis.local/ns/default/sa/cli",
        "config revision",
        "no problems",
    ] {
        assert!(all_up.contains(wanted), "no {wanted:?} in:\n{all_up}");
    }
    let line_a = line_with(&all_up, &a);
    for wanted in [
        "echo",
        "1.2.3",
        "zone-a",
        "SERVING",
        "ns/default/sa/echo",
        "ago",
        "expires in",
    ] {
        assert!(line_a.contains(wanted), "no {wanted:?} in {line_a:?}");
    }
    assert!(line_with(&all_up, &b).contains(" SERVING "), "{all_up}");

    // Given a dead replica first, the live one answers, and says so.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (code, failed_over, stderr) = run(status_of(&pki, &format!("{dead},{registry}"), &[]));
    assert_eq!(code, 0, "{failed_over}{stderr}");
    assert!(
        failed_over.contains("2 instances in 1 service, all serving"),
        "{failed_over}"
    );
    assert!(
        failed_over.contains(&format!("registry {registry}")),
        "{failed_over}"
    );
    let (code, json, stderr) = run(status_of(
        &pki,
        &format!("{dead},localhost:{}", registry.port()),
        &["--json"],
    ));
    assert_eq!(code, 0, "{json}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        json["registry"],
        format!("localhost:{}", registry.port()),
        "{json}"
    );

    // Follow along from here, as a pipe (a new block per change).
    let mut watch =
        ChildGuard::spawn("status-watch", status_command(&pki, registry, &["--watch"])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watch.output().contains("all serving") {
        assert!(Instant::now() < deadline, "{}", watch.output());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Instance b's service dies: its sidecar marks it NOT_SERVING.
    echo_b.process.kill();
    let (code, one_down) = status_until(&pki, registry, "1 not serving");
    assert_eq!(code, 1, "{one_down}");
    assert!(
        line_with(&one_down, &b).contains("NOT_SERVING"),
        "{one_down}"
    );
    assert!(line_with(&one_down, &a).contains(" SERVING "), "{one_down}");
    assert!(one_down.contains("1/2"), "{one_down}");
    assert!(
        one_down.contains("2 instances in 1 service: 1 not serving (echo "),
        "{one_down}"
    );

    // A configuration file the registry rejects.
    let staged = config.path().join(".echo.toml.tmp");
    std::fs::write(&staged, "[[routes]]\nmethod = \"*\"\ntimeout = \"soon\"\n").unwrap();
    std::fs::rename(&staged, config.path().join("echo.toml")).unwrap();
    let (code, bad_config) = status_until(&pki, registry, "1 config problem");
    assert_eq!(code, 1, "{bad_config}");
    let problem = line_with(&bad_config, "echo.toml:3");
    assert!(problem.contains("soon"), "{problem}");
    assert!(problem.contains("file rejected"), "{problem}");

    // The same as JSON.
    let (code, json, stderr) = status(&pki, registry, &["--json"]);
    assert_eq!(code, 1, "{json}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["healthy"], false);
    assert_eq!(json["instances"].as_array().unwrap().len(), 2);
    assert_eq!(json["config"]["problems"][0]["file"], "echo.toml");
    assert_eq!(json["config"]["problems"][0]["line"], 3);
    assert_eq!(json["config"]["problems"][0]["rejected"], true);

    // The watcher saw both changes as they happened, and stops on Ctrl-C
    // with the verdict on what it last showed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = watch.output();
        if seen.contains("SERVING -> NOT_SERVING") && seen.contains("1 config problem") {
            break;
        }
        assert!(Instant::now() < deadline, "watch output:\n{seen}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let interrupted = Command::new("kill")
        .args(["-INT", &watch.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let exit = watch
        .wait_exit(Duration::from_secs(5))
        .expect("watch stops on SIGINT");
    assert_eq!(exit.code(), Some(1), "{}", watch.output());

    // Instance b gone for good: its sidecar deregisters on SIGTERM.
    proxy_b.process.terminate();
    let (code, one_left) = status_until(&pki, registry, "1 instance in 1 service");
    assert_eq!(code, 1, "the config problem remains:\n{one_left}");
    assert!(!one_left.contains(&b), "{one_left}");
}

/// Given several replicas, `trellis status` uses the first that answers,
/// and says which; when none does, it names each.
#[test]
fn several_registry_replicas_the_first_that_answers_is_used() {
    let pki = TestPki::new("trellis.local");
    pki.issue("cli", "cli");
    let config = tempfile::tempdir().unwrap();
    let (registry, _registry_process) = spawn_registry(&pki, config.path());
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let both = format!("{nowhere},{registry}");

    let out = status_with(&pki, &both);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("registry {registry}")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let elsewhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = status_with(&pki, &format!("{nowhere},{elsewhere}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for addr in [nowhere, elsewhere] {
        assert!(stderr.contains(&format!("{addr}: ")), "{stderr}");
    }

    let out = status_with(&pki, "127.0.0.1:7000,,x");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("entry 2"), "{stderr}");
}

/// `trellis status --registry <list>` as `cli`.
fn status_with(pki: &TestPki, registry: &str) -> Output {
    Command::new(TRELLIS)
        .args(["status", "--registry", registry, "--certs"])
        .arg(pki.dir())
        .env_remove("TRELLIS_CLI_IDENTITY")
        .env_remove("TRELLIS_REGISTRY_IDENTITY")
        .output()
        .unwrap()
}
