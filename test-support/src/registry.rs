//! Starting the registry binary for a test.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trellis::identity::IdentityPaths;

use crate::process::{ChildGuard, free_port, wait_for_tcp};

/// A registry process listening on 127.0.0.1.
#[derive(Debug)]
pub struct RunningRegistry {
    /// Where it serves the Registry and Config APIs (mTLS).
    pub addr: SocketAddr,
    /// The process, killed when dropped.
    pub process: ChildGuard,
}

/// Starts the registry binary `bin` with `identity`, reading configuration
/// from `config_dir`, and waits until it listens.
pub fn spawn_registry(bin: &str, identity: &IdentityPaths, config_dir: &Path) -> RunningRegistry {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    spawn_registry_at(bin, identity, config_dir, addr)
}

/// Starts the registry on `addr` (e.g. to restart one where its clients
/// expect it) and waits until it listens.
pub fn spawn_registry_at(
    bin: &str,
    identity: &IdentityPaths,
    config_dir: &Path,
    addr: SocketAddr,
) -> RunningRegistry {
    spawn_registry_with(bin, identity, config_dir, addr, &[])
}

/// Starts the registry on `addr` with more flags (`--store etcd://…`, say)
/// and waits until it listens.
pub fn spawn_registry_with(
    bin: &str,
    identity: &IdentityPaths,
    config_dir: &Path,
    addr: SocketAddr,
    extra: &[&str],
) -> RunningRegistry {
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--cert")
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca)
        .args(extra)
        .env("RUST_LOG", "info");
    let process = ChildGuard::spawn("registry", cmd).expect("registry starts");
    assert!(
        wait_for_tcp(addr, Duration::from_secs(20)),
        "registry did not listen on {addr}: {}",
        process.output()
    );
    RunningRegistry { addr, process }
}

/// The configuration's status as `config`'s registry reports it; panics
/// if the call fails.
pub async fn config_status(
    config: &mut trellis::pb::trellis::config::v1::config_service_client::ConfigServiceClient<
        tonic::transport::Channel,
    >,
) -> trellis::pb::trellis::config::v1::GetConfigStatusResponse {
    config
        .get_config_status(trellis::pb::trellis::config::v1::GetConfigStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}
