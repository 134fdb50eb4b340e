//! The settlement service of the reference billing application: bills computed from usage and subscription events.
//!
//! It listens on loopback (h2c) behind its sidecar. This is its skeleton:
//! grpc.health.v1 and server reflection; its own API and database come with
//! the reference-application work.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use trellis::cli::exit_with;

/// The Trellis reference settlement service.
#[derive(Debug, Parser)]
#[command(name = "trellis-settlement", version, about)]
struct Args {
    /// Loopback address to serve gRPC on (plaintext h2c; its sidecar fronts it).
    #[arg(
        long,
        env = "TRELLIS_SETTLEMENT_LISTEN",
        default_value = "127.0.0.1:7103"
    )]
    listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM (e.g. `5s`).
    #[arg(long, env = "TRELLIS_SETTLEMENT_GRACE", default_value = "5s", value_parser = trellis::cli::parse_duration)]
    grace: Duration,
}

#[tokio::main]
async fn main() {
    trellis::telemetry::init("warn,trellis=info,trellis_settlement=info");
    let args = Args::parse();
    let (router, _health) = trellis::server::standard_router();
    if let Err(e) =
        trellis::server::run_plaintext("settlement", args.listen, args.grace, router).await
    {
        exit_with("trellis-settlement", &format!("{e:#}"));
    }
}
