//! The Trellis registry: the control plane's gRPC server, over mTLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use trellis::cli::{IdentityArgs, exit_with};
use trellis::pb::trellis::config::v1::config_service_server::ConfigServiceServer;
use trellis::pb::trellis::registry::v1::registry_service_server::RegistryServiceServer;
use trellis_registry::config::{ConfigApi, ConfigStore};
use trellis_registry::registry::{MeshScope, Registry, RegistryApi};

const PROGRAM: &str = "trellis-registry";

/// The Trellis registry and configuration server.
#[derive(Debug, Parser)]
#[command(name = PROGRAM, version, about)]
struct Args {
    /// Address to serve the Registry and Config APIs on (mTLS).
    #[arg(
        long,
        env = "TRELLIS_REGISTRY_LISTEN",
        default_value = "127.0.0.1:7000"
    )]
    listen: SocketAddr,
    /// Directory of configuration files: defaults.toml and <service>.toml.
    /// Re-read live; see config/README.md.
    #[arg(long, env = "TRELLIS_REGISTRY_CONFIG_DIR", default_value = "config")]
    config_dir: PathBuf,
    /// Identities that may resolve and watch but never register: mesh
    /// service names or SPIFFE IDs, comma-separated.
    #[arg(
        long,
        env = "TRELLIS_REGISTRY_READ_ONLY",
        value_delimiter = ',',
        default_value = "edge"
    )]
    read_only: Vec<String>,
    /// How long in-flight calls may take to finish after SIGTERM (e.g. `5s`, `750ms`).
    #[arg(long, env = "TRELLIS_REGISTRY_GRACE", default_value = "5s", value_parser = trellis::cli::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    identity: IdentityArgs,
}

#[tokio::main]
async fn main() {
    trellis::telemetry::init("warn,trellis=info,trellis_registry=info");
    let args = Args::parse();
    let workload = args.identity.load_or_exit(PROGRAM);
    // The registry serves the mesh services of its own trust domain and
    // namespace; identities elsewhere (the same CA may sign them) name none.
    let scope = MeshScope::of(workload.id()).unwrap_or_else(|e| exit_with(PROGRAM, &e));
    let registry = Registry::new(
        scope,
        args.read_only.iter().filter(|s| !s.is_empty()).cloned(),
    );
    let config = ConfigStore::open(&args.config_dir, registry.clone())
        .unwrap_or_else(|e| exit_with(PROGRAM, &format!("--config-dir {e}")));
    let listener = trellis::server::bind(args.listen)
        .await
        .unwrap_or_else(|e| exit_with(PROGRAM, &e));

    let expiry = registry.spawn_expiry();
    let _config_watch = config.spawn_watcher();
    let (router, health) = trellis::server::standard_router();
    health
        .set_serving::<RegistryServiceServer<RegistryApi>>()
        .await;
    health.set_serving::<ConfigServiceServer<ConfigApi>>().await;
    let router = router
        .add_service(RegistryServiceServer::new(RegistryApi::new(
            registry.clone(),
        )))
        .add_service(ConfigServiceServer::new(ConfigApi::new(config.clone())));
    tracing::info!(
        addr = %args.listen,
        identity = %workload.id(),
        config_dir = %args.config_dir.display(),
        "registry listening"
    );
    let served = trellis::server::run_until_signal("registry", args.grace, |drain| async {
        // A draining registry no longer hears renewals, so it must not
        // expire leases either: that would push removals of healthy
        // instances to every watcher still connected.
        let drain = Box::pin(async move {
            drain.await;
            expiry.abort();
        });
        trellis::server::serve_mtls(router, listener, &workload, drain).await
    })
    .await;
    if let Err(e) = served {
        exit_with(PROGRAM, &format!("{e:#}"));
    }
}
