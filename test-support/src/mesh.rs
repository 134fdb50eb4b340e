//! Starting mesh processes for a test: echo service instances and their
//! sidecars, as real processes on 127.0.0.1.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use trellis::identity::IdentityPaths;

use crate::process::{ChildGuard, free_port, wait_for_tcp};

/// A binary built beside `known` (a binary of the package under test,
/// from `env!("CARGO_BIN_EXE_...")`): `cargo test --workspace` builds
/// every binary of the workspace into the same directory.
pub fn sibling_binary(known: &str, name: &str) -> PathBuf {
    let path = Path::new(known)
        .parent()
        .expect("a binary lives in a directory")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// An echo service process.
#[derive(Debug)]
pub struct RunningEcho {
    /// Where it serves (h2c).
    pub addr: SocketAddr,
    /// Its instance name, returned in every response.
    pub name: String,
    /// The process.
    pub process: ChildGuard,
}

/// Starts the echo service binary `bin` as instance `name`, with `extra`
/// arguments, and waits until it listens.
pub fn spawn_echo(bin: &Path, name: &str, extra: &[&str]) -> RunningEcho {
    let addr = addr();
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--name")
        .arg(name)
        .args(extra)
        .env("RUST_LOG", "info");
    let process = ChildGuard::spawn(&format!("echo-{name}"), cmd).expect("echo starts");
    assert!(
        wait_for_tcp(addr, Duration::from_secs(20)),
        "echo {name} did not listen on {addr}: {}",
        process.output()
    );
    RunningEcho {
        addr,
        name: name.to_owned(),
        process,
    }
}

/// A sidecar process.
#[derive(Debug)]
pub struct RunningProxy {
    /// Its outbound port (h2c), for the local service's calls.
    pub outbound: SocketAddr,
    /// Its inbound port (mTLS), where peers reach the local service.
    pub inbound: SocketAddr,
    /// Its admin port (HTTP/1.1).
    pub admin: SocketAddr,
    /// The process.
    pub process: ChildGuard,
}

/// How to start a sidecar.
#[derive(Debug, Clone)]
pub struct ProxyOptions<'a> {
    /// Its identity files.
    pub identity: &'a IdentityPaths,
    /// The local service, if any.
    pub app: Option<SocketAddr>,
    /// The registry, if any.
    pub registry: Option<SocketAddr>,
    /// More flags.
    pub extra: Vec<String>,
    /// Wait until `/ready` answers 200.
    pub wait_ready: bool,
    /// The outbound port, when the local service must be told it before
    /// the sidecar starts; a free one otherwise.
    pub outbound: Option<SocketAddr>,
    /// How long to wait for `/ready` (default 20 s).
    pub ready_within: Duration,
}

impl<'a> ProxyOptions<'a> {
    /// A sidecar with `identity`, in front of `app`, discovering through
    /// `registry`, started and ready.
    pub fn new(
        identity: &'a IdentityPaths,
        app: Option<SocketAddr>,
        registry: Option<SocketAddr>,
    ) -> Self {
        Self {
            identity,
            app,
            registry,
            extra: Vec::new(),
            wait_ready: true,
            outbound: None,
            ready_within: Duration::from_secs(20),
        }
    }

    /// Adds flags.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|s| (*s).to_owned()));
        self
    }
}

/// Starts the sidecar binary `bin` and waits until it listens (and, if
/// asked, is ready).
pub fn spawn_proxy(bin: &Path, name: &str, options: ProxyOptions<'_>) -> RunningProxy {
    let (outbound, inbound, admin) = (options.outbound.unwrap_or_else(addr), addr(), addr());
    let mut cmd = Command::new(bin);
    cmd.arg("--outbound")
        .arg(outbound.to_string())
        .arg("--inbound")
        .arg(inbound.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--cert")
        .arg(&options.identity.cert)
        .arg("--key")
        .arg(&options.identity.key)
        .arg("--ca")
        .arg(&options.identity.ca)
        .args(&options.extra)
        // TRELLIS_TEST_PROXY_LOG overrides (benchmarks: `warn`).
        .env(
            "RUST_LOG",
            std::env::var("TRELLIS_TEST_PROXY_LOG")
                .unwrap_or_else(|_| "info,mesh_proxy=debug".to_owned()),
        );
    if let Some(app) = options.app {
        cmd.arg("--app").arg(app.to_string());
    }
    if let Some(registry) = options.registry {
        cmd.arg("--registry").arg(registry.to_string());
    }
    let process = ChildGuard::spawn(&format!("proxy-{name}"), cmd).expect("mesh-proxy starts");
    assert!(
        wait_for_tcp(admin, Duration::from_secs(20)),
        "proxy {name} did not listen on {admin}: {}",
        process.output()
    );
    let proxy = RunningProxy {
        outbound,
        inbound,
        admin,
        process,
    };
    if options.wait_ready {
        let deadline = Instant::now() + options.ready_within;
        loop {
            let (status, body) = proxy.admin_get("/ready");
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "proxy {name} not ready: {body}\n{}",
                proxy.process.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    proxy
}

impl RunningProxy {
    /// GETs `path` on the admin port: (HTTP status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }
}

/// A minimal HTTP/1.1 GET (the admin port speaks plain HTTP/1.1).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, "connection refused".into());
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).is_err() {
        return (0, "write failed".into());
    }
    let mut response = String::new();
    let _ = tcp.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

impl RunningProxy {
    /// The value of metric `name` on the admin port's `/metrics`, summed
    /// over its series whose labels include every one of `labels`; `None`
    /// if no series matches.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics");
        metric_value(&body, name, labels)
    }
}

/// In a Prometheus text exposition, the sum of the samples of metric
/// `name` (the full sample name, e.g. `trellis_proxy_shed_total`) whose
/// labels include every one of `labels`; `None` if no sample matches.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series, value) = match rest.strip_prefix('{') {
            Some(rest) => {
                let Some((series, value)) = parse_labels(rest) else {
                    continue;
                };
                (series, value)
            }
            // Another metric whose name starts with this one's.
            None if !rest.starts_with(' ') => continue,
            None => (Vec::new(), rest),
        };
        let matches = labels
            .iter()
            .all(|(k, v)| series.iter().any(|(sk, sv)| sk == k && sv == v));
        let value = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let (true, Some(value)) = (matches, value) {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// Parses `k="v",k2="v2"} rest` into the labels (values unescaped) and
/// what follows the closing brace.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        rest = &after[end + 1..];
    }
}

/// Writes `text` to `dir/name` atomically: to a hidden temporary file in
/// the same directory, then renamed over `name`, so a process polling the
/// directory (the registry's config reader) never sees half a file.
pub fn write_atomically(dir: &Path, name: &str, text: &str) {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text)
        .unwrap_or_else(|e| panic!("writing {}: {e}", temporary.display()));
    std::fs::rename(&temporary, dir.join(name))
        .unwrap_or_else(|e| panic!("renaming {} to {name}: {e}", temporary.display()));
}

/// Echo calls every 5 ms through one address (an edge, or a sidecar's
/// outbound port) until stopped, each given 5 s, counting what succeeded
/// and what failed (and keeping the first few errors): the steady load of
/// failure tests.
#[derive(Debug)]
pub struct EchoLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl EchoLoad {
    /// Starts calling `trellis.echo.v1.EchoService/Echo` at `target` (h2c).
    pub fn start(target: SocketAddr) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use trellis::pb::trellis::echo::v1 as echo;
        let client = echo::echo_service_client::EchoServiceClient::new(
            tonic::transport::Channel::from_shared(format!("http://{target}"))
                .expect("an address is a URI")
                .connect_lazy(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (ok2, failed2, stop2) = (ok.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop2.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut client = client.clone();
                let request = echo::EchoRequest {
                    message: "steady".into(),
                    payload: Vec::new(),
                };
                let error = match tokio::time::timeout(Duration::from_secs(5), client.echo(request))
                    .await
                {
                    Ok(Ok(_)) => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                    Err(_) => "no answer within 5 s".to_owned(),
                };
                failed2.fetch_add(1, Ordering::Relaxed);
                if errors.len() < 10 {
                    errors.push(error);
                }
            }
            errors
        });
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Calls that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops, and returns (succeeded, failed, the first errors).
    pub async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = (self.ok.clone(), self.failed.clone());
        let errors = self.task.await.expect("the load task ends");
        let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        (count(&ok), count(&failed), errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_sums_the_series_with_the_labels_asked() {
        let text = "# HELP trellis_proxy_shed Calls shed.\n\
            # TYPE trellis_proxy_shed counter\n\
            trellis_proxy_shed_total{direction=\"inbound\",service=\"a.v1.S\"} 4\n\
            trellis_proxy_shed_total{direction=\"outbound\",service=\"a.v1.S\"} 2\n\
            trellis_proxy_shed_total{direction=\"outbound\",service=\"b.v1.T\"} 1\n\
            trellis_proxy_circuit_state{service=\"say \\\"hi\\\", twice\"} 2\n\
            trellis_proxy_circuit_state_other{service=\"echo\"} 7\n\
            trellis_proxy_up 1\n";
        let shed = "trellis_proxy_shed_total";
        assert_eq!(
            metric_value(text, shed, &[("direction", "inbound")]),
            Some(4.0)
        );
        assert_eq!(
            metric_value(text, shed, &[("service", "a.v1.S")]),
            Some(6.0)
        );
        assert_eq!(metric_value(text, shed, &[]), Some(7.0));
        assert_eq!(metric_value(text, shed, &[("service", "c.v1.U")]), None);
        let state = "trellis_proxy_circuit_state";
        assert_eq!(
            metric_value(text, state, &[("service", "say \"hi\", twice")]),
            Some(2.0)
        );
        assert_eq!(metric_value(text, state, &[("service", "echo")]), None);
        assert_eq!(metric_value(text, "trellis_proxy_up", &[]), Some(1.0));
    }

    #[test]
    fn write_atomically_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "echo.toml", "a = 1\n");
        write_atomically(dir.path(), "echo.toml", "a = 2\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["echo.toml"]);
        let text = std::fs::read_to_string(dir.path().join("echo.toml")).unwrap();
        assert_eq!(text, "a = 2\n");
    }
}

/// A registry reading a config directory of its own, and a CA: the base
/// of tests that add echo instances and callers, each behind a sidecar.
#[derive(Debug)]
pub struct TestMesh {
    /// The CA and the identities it issued.
    pub pki: crate::TestPki,
    /// The registry process.
    pub registry: crate::RunningRegistry,
    /// The directory the registry serves configuration from.
    pub config: tempfile::TempDir,
}

impl TestMesh {
    /// A registry (the binary beside `known`, a binary of the package
    /// under test) whose config directory holds `files` (name, text) from
    /// the start.
    pub fn start(known: &str, files: &[(&str, &str)]) -> Self {
        let pki = crate::TestPki::new("trellis.local");
        let config = tempfile::tempdir().expect("a temporary directory");
        for (name, text) in files {
            write_atomically(config.path(), name, text);
        }
        let registry = crate::spawn_registry(
            sibling_binary(known, "trellis-registry")
                .to_str()
                .expect("a UTF-8 path"),
            &pki.issue("registry", "registry"),
            config.path(),
        );
        Self {
            pki,
            registry,
            config,
        }
    }

    /// The identity files of mesh service `service`, issued on first use.
    pub fn identity(&self, service: &str) -> IdentityPaths {
        let paths = IdentityPaths::in_dir(self.pki.dir(), service);
        if paths.cert.exists() {
            return paths;
        }
        self.pki.issue(service, service)
    }

    /// An mTLS channel to the registry (its Registry and Config APIs)
    /// under mesh service `service`'s identity.
    pub fn control_channel(&self, service: &str) -> tonic::transport::Channel {
        let workload =
            trellis::identity::Workload::load(&self.identity(service)).expect("the identity loads");
        trellis::tls::channel(
            &workload,
            self.registry.addr,
            trellis::tls::ExpectedPeer::Exactly(self.pki.id("registry")),
        )
        .expect("a channel to the registry")
    }

    /// A Registry API client under `service`'s identity.
    pub fn registry_client(
        &self,
        service: &str,
    ) -> trellis::pb::trellis::registry::v1::registry_service_client::RegistryServiceClient<
        tonic::transport::Channel,
    > {
        trellis::pb::trellis::registry::v1::registry_service_client::RegistryServiceClient::new(
            self.control_channel(service),
        )
    }

    /// Waits (up to 15 s) until the registry lists `n` serving instances
    /// of mesh service `service`.
    pub async fn wait_serving(&self, service: &str, n: usize) {
        use trellis::pb::trellis::registry::v1 as reg;
        let mut client = self.registry_client("observer");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let resolved = client
                .resolve(reg::ResolveRequest {
                    target: service.into(),
                })
                .await;
            let serving = resolved.map_or(0, |r| {
                r.into_inner()
                    .instances
                    .iter()
                    .filter(|i| i.health() == reg::ServingStatus::Serving)
                    .count()
            });
            if serving == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{serving} serving {service} instances, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
