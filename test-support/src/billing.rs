//! The billing system as real processes on 127.0.0.1: a registry reading
//! the repository's `config/`, user, usage (two instances), settlement and
//! the archive, each behind its own sidecar, and an h2c edge.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use trellis::identity::IdentityPaths;

use crate::mesh::{ProxyOptions, RunningProxy, spawn_proxy};
use crate::pki::TestPki;
use crate::process::{ChildGuard, free_port};
use crate::registry::{RunningRegistry, spawn_registry};

/// The directory the workspace's binaries are built into: the running
/// binary's own, or the parent of a test binary's `deps/`.
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary's path");
    let dir = exe.parent().expect("the binary's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target profile directory").to_owned()
    } else {
        dir.to_owned()
    }
}

/// A workspace binary, which `cargo test --workspace` builds.
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// The log filter of the services: `TRELLIS_TEST_LOG`, else detailed (a
/// failing test prints the logs). Benchmarks set it to `warn`.
fn service_log() -> String {
    std::env::var("TRELLIS_TEST_LOG").unwrap_or_else(|_| "info,trellis=debug".to_owned())
}

/// The repository's root (for `config/`, `proto/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives in the workspace")
        .to_owned()
}

/// One service process and its sidecar.
#[derive(Debug)]
pub struct Instance {
    /// Instance name (`usage-2`).
    pub name: String,
    /// Where the service listens (h2c, loopback).
    pub addr: SocketAddr,
    /// The service process.
    pub process: ChildGuard,
    /// Its sidecar.
    pub proxy: RunningProxy,
    command: Vec<String>,
}

impl Instance {
    /// Kills the service process (SIGKILL, as a crash) and leaves its
    /// sidecar running.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the service process again with the same flags, on the same
    /// address.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..]).env("RUST_LOG", service_log());
        self.process = ChildGuard::spawn(&self.name, cmd).expect("service restarts");
    }
}

/// Where the services' databases live.
#[derive(Debug, Clone)]
pub struct Databases {
    /// `postgres://` URL of each service's database.
    pub user: String,
    /// Usage's database.
    pub usage: String,
    /// Settlement's database.
    pub settlement: String,
}

/// The running billing mesh.
#[derive(Debug)]
pub struct BillingMesh {
    /// The CA of the mesh.
    pub pki: TestPki,
    /// The registry.
    pub registry: RunningRegistry,
    /// A copy of the repository's `config/`, served by the registry.
    pub config_dir: tempfile::TempDir,
    /// The databases.
    pub databases: Databases,
    /// The user service.
    pub user: Instance,
    /// Two usage instances.
    pub usage: Vec<Instance>,
    /// Settlement.
    pub settlement: Instance,
    /// The archive.
    pub archive: Instance,
    /// The archive's directory.
    pub archive_dir: tempfile::TempDir,
    /// The edge's h2c address.
    pub edge: SocketAddr,
    /// The edge process.
    pub edge_proxy: RunningProxy,
}

impl BillingMesh {
    /// Starts everything and waits until every sidecar is ready (its
    /// service healthy and registered) and the edge routes to all of it.
    pub fn start(databases: Databases) -> Self {
        let pki = TestPki::new("trellis.local");
        let config_dir = tempfile::tempdir().expect("config directory");
        copy_dir(&repo_root().join("config"), config_dir.path());
        let registry = spawn_registry(
            workspace_binary("trellis-registry").to_str().unwrap(),
            &pki.issue("registry", "registry"),
            config_dir.path(),
        );
        let archive_dir = tempfile::tempdir().expect("archive directory");
        let proxy_bin = workspace_binary("mesh-proxy");
        let spawn = |name: &str, service: &str, args: Vec<String>| -> Instance {
            let identity = pki.issue(service, service);
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut command = vec![
                workspace_binary(&format!("trellis-{service}"))
                    .display()
                    .to_string(),
            ];
            command.extend(args);
            command.extend([
                "--listen".to_owned(),
                addr.to_string(),
                "--outbound".to_owned(),
                outbound.to_string(),
            ]);
            let mut cmd = Command::new(&command[0]);
            cmd.args(&command[1..]).env("RUST_LOG", service_log());
            let process = ChildGuard::spawn(name, cmd).expect("service starts");
            let proxy = spawn_proxy_with_outbound(
                &proxy_bin,
                name,
                &identity,
                addr,
                registry.addr,
                outbound,
            );
            Instance {
                name: name.to_owned(),
                addr,
                process,
                proxy,
                command,
            }
        };
        let db = |url: &str| vec!["--database-url".to_owned(), url.to_owned()];
        let user = spawn("user", "user", db(&databases.user));
        let usage = vec![
            spawn("usage-1", "usage", db(&databases.usage)),
            spawn("usage-2", "usage", db(&databases.usage)),
        ];
        let settlement = spawn("settlement", "settlement", db(&databases.settlement));
        let archive = spawn(
            "archive",
            "archive",
            vec![
                "serve".to_owned(),
                "--dir".to_owned(),
                archive_dir.path().display().to_string(),
            ],
        );
        let edge = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let edge_identity = pki.issue("edge", "edge");
        let edge_proxy = spawn_proxy(
            &proxy_bin,
            "edge",
            ProxyOptions::new(&edge_identity, None, Some(registry.addr))
                .args(&["--edge", &edge.to_string()]),
        );
        Self {
            pki,
            registry,
            config_dir,
            databases,
            user,
            usage,
            settlement,
            archive,
            archive_dir,
            edge,
            edge_proxy,
        }
    }

    /// `http://<edge>`.
    pub fn edge_url(&self) -> String {
        format!("http://{}", self.edge)
    }

    /// Identity files for a client of the mesh named `service`.
    pub fn identity(&self, service: &str) -> IdentityPaths {
        self.pki.issue(service, service)
    }
}

/// A sidecar on a chosen outbound port (the service was told it).
fn spawn_proxy_with_outbound(
    bin: &Path,
    name: &str,
    identity: &IdentityPaths,
    app: SocketAddr,
    registry: SocketAddr,
    outbound: SocketAddr,
) -> RunningProxy {
    let mut options = ProxyOptions::new(identity, Some(app), Some(registry));
    options.outbound = Some(outbound);
    // Ready once the service is healthy: migrated, configured.
    options.ready_within = Duration::from_secs(60);
    spawn_proxy(bin, name, options)
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("config directory") {
        let entry = entry.expect("directory entry");
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy config file");
        }
    }
}
