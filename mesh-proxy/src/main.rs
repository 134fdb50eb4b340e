//! mesh-proxy: the Trellis sidecar and edge proxy.
//!
//! The data plane (outbound and inbound listeners, discovery, balancing,
//! retries, timeouts, the admin port) is not built yet; this binary checks
//! its identity files and says so, rather than pretending to proxy.

use clap::Parser;
use trellis::cli::IdentityArgs;

/// The Trellis sidecar and edge proxy.
#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about)]
struct Args {
    #[command(flatten)]
    identity: IdentityArgs,
}

fn main() {
    trellis::telemetry::init("warn,mesh_proxy=info");
    let args = Args::parse();
    let workload = args.identity.load_or_exit("mesh-proxy");
    eprintln!(
        "mesh-proxy: identity {} loaded; the data plane is not built yet",
        workload.id()
    );
    std::process::exit(3);
}
