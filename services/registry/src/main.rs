//! The Trellis registry: the control plane's gRPC server, over mTLS.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use trellis::cli::{IdentityArgs, exit_with};

/// The Trellis registry and configuration server.
#[derive(Debug, Parser)]
#[command(name = "trellis-registry", version, about)]
struct Args {
    /// Address to serve the Registry and Config APIs on (mTLS).
    #[arg(
        long,
        env = "TRELLIS_REGISTRY_LISTEN",
        default_value = "127.0.0.1:7000"
    )]
    listen: SocketAddr,
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
    let workload = args.identity.load_or_exit("trellis-registry");
    let listener = trellis::server::bind(args.listen)
        .await
        .unwrap_or_else(|e| exit_with("trellis-registry", &e));
    let (router, _health) = trellis::server::standard_router();
    tracing::info!(addr = %args.listen, identity = %workload.id(), "registry listening");
    let served = trellis::server::run_until_signal("registry", args.grace, |drain| async {
        trellis::server::serve_mtls(router, listener, &workload, drain).await
    })
    .await;
    if let Err(e) = served {
        exit_with("trellis-registry", &format!("{e:#}"));
    }
}
