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
