//! The `trellis` command: tools for running a Trellis mesh.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use trellis::identity::{DEFAULT_NAMESPACE, DEFAULT_TRUST_DOMAIN};

/// Trellis, a gRPC-first service mesh.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the development CA (kept if it exists) and one certificate
    /// per workload, with SPIFFE IDs spiffe://<trust-domain>/ns/<namespace>/sa/<workload>.
    Certs {
        /// Directory to write ca.pem, ca.key, <workload>.pem and <workload>.key into.
        #[arg(long, default_value = "certs", env = "TRELLIS_CERTS_DIR")]
        dir: PathBuf,
        /// SPIFFE trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN, env = "TRELLIS_TRUST_DOMAIN")]
        trust_domain: String,
        /// Namespace part of every workload's SPIFFE ID.
        #[arg(long, default_value = DEFAULT_NAMESPACE, env = "TRELLIS_NAMESPACE")]
        namespace: String,
        /// Workloads to issue certificates for (repeat or comma-separate).
        #[arg(
            long = "workload",
            value_delimiter = ',',
            default_value = "registry,edge,user,usage,settlement"
        )]
        workloads: Vec<String>,
        /// Names external clients dial the edge by (DNS names or IP
        /// addresses; repeat or comma-separate): issues edge-server.pem and
        /// edge-server.key, the edge's TLS certificate for --edge-tls-cert.
        #[arg(long = "server-name", value_delimiter = ',')]
        server_names: Vec<String>,
        /// Validity of each workload certificate, in days.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
    /// Build and run the mesh a mesh file (trellis.toml) describes, on this
    /// machine, and supervise it until Ctrl-C.
    Up(trellis::up::UpArgs),
    /// Show the mesh as the registry sees it: services, instances, health,
    /// leases and configuration problems. Exits 0 when all is serving, 1
    /// when not, 2 when the registry cannot be asked.
    Status(trellis::mesh_status::StatusArgs),
    /// Show the mesh's traffic, live: per gRPC service and method, calls
    /// per second, success rate and p50/p99 latency, read from the
    /// sidecars' metrics. `--once` prints one table and exits.
    Top(trellis::top::TopArgs),
}

fn main() {
    trellis::telemetry::init("warn");
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => std::process::exit(trellis::up::main(args)),
        Command::Status(args) => std::process::exit(trellis::mesh_status::main(args)),
        Command::Top(args) => std::process::exit(trellis::top::main(args)),
        Command::Certs {
            dir,
            trust_domain,
            namespace,
            workloads,
            server_names,
            days,
        } => {
            let report = trellis::certs::write_dev_certs(
                &dir,
                &trust_domain,
                &namespace,
                &workloads,
                &server_names,
                days,
            )
            .unwrap_or_else(|e| trellis::cli::exit_with("trellis certs", &format!("{e:#}")));
            let ca = dir.join("ca.pem");
            if report.created_ca {
                println!("created CA {}", ca.display());
            } else {
                println!("kept existing CA {}", ca.display());
            }
            for (id, path) in &report.workloads {
                println!("issued {} for {id}", path.display());
            }
            if let Some(path) = &report.server {
                println!(
                    "issued {} for {} (the edge's TLS certificate)",
                    path.display(),
                    server_names.join(", ")
                );
            }
        }
    }
}
