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
    /// per workload, with SPIFFE IDs spiffe://<trust-domain>/ns/<namespace>/sa/<workload>;
    /// with --kubernetes, as Secret manifests for deploy/kubernetes instead.
    Certs {
        /// Directory to write ca.pem, ca.key, <workload>.pem and <workload>.key into
        /// (with --kubernetes, only the CA: the workloads' keys go into the Secrets).
        #[arg(long, default_value = "certs", env = "TRELLIS_CERTS_DIR")]
        dir: PathBuf,
        /// SPIFFE trust domain of the mesh.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN, env = "TRELLIS_TRUST_DOMAIN")]
        trust_domain: String,
        /// Namespace part of every workload's SPIFFE ID; with --kubernetes
        /// also the Kubernetes namespace of the Secrets. Default: `default`;
        /// with --kubernetes, `trellis` (that of deploy/kubernetes).
        #[arg(long, env = "TRELLIS_NAMESPACE")]
        namespace: Option<String>,
        /// Workloads to issue certificates for (repeat or comma-separate).
        /// Default: registry, edge, user, usage, settlement; with
        /// --kubernetes, registry, edge and every service of --mesh-file.
        #[arg(long = "workload", value_delimiter = ',')]
        workloads: Vec<String>,
        /// Names external clients dial the edge by (DNS names or IP
        /// addresses; repeat or comma-separate): issues edge-server.pem and
        /// edge-server.key, the edge's TLS certificate for --edge-tls-cert
        /// (with --kubernetes, the Secret edge-server-tls).
        #[arg(long = "server-name", value_delimiter = ',')]
        server_names: Vec<String>,
        /// Validity of each workload certificate, in days.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
        /// Write Kubernetes Secret manifests (one per identity: ca.pem,
        /// <workload>.pem, <workload>.key) to stdout or --output, for
        /// deploy/kubernetes; the CA is still made or kept in --dir.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: the file to write the Secrets to (created
        /// readable by its owner only), instead of stdout.
        #[arg(long, value_name = "FILE", requires = "kubernetes")]
        output: Option<PathBuf>,
        /// With --kubernetes and no --workload: the mesh file whose
        /// services get identities.
        #[arg(long, value_name = "FILE", default_value = "trellis.toml")]
        mesh_file: PathBuf,
        /// Also write <workload>.xds.json beside each certificate: the
        /// bootstrap file a proxyless gRPC client (GRPC_XDS_BOOTSTRAP) uses
        /// to take its endpoints and policy from the registry at this
        /// address (host:port), with that certificate.
        #[arg(long, value_name = "REGISTRY", conflicts_with = "kubernetes")]
        xds_bootstrap: Option<String>,
        /// With --xds-bootstrap: the zone the clients run in (their
        /// calls prefer instances of the same zone).
        #[arg(long, default_value = "", requires = "xds_bootstrap")]
        zone: String,
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
    /// Serve the mesh in a browser: services and instances with their
    /// health, live golden metrics, a call map, the registry's and the
    /// configuration's state, recent changes, and a console that calls
    /// any registered method through the edge.
    Dashboard(trellis::dashboard::DashboardArgs),
}

/// The workloads `trellis certs` issues for without --workload.
const DEFAULT_WORKLOADS: [&str; 5] = ["registry", "edge", "user", "usage", "settlement"];
/// The namespace of deploy/kubernetes.
const KUBERNETES_NAMESPACE: &str = "trellis";

fn main() {
    trellis::telemetry::init("warn");
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => std::process::exit(trellis::up::main(args)),
        Command::Status(args) => std::process::exit(trellis::mesh_status::main(args)),
        Command::Top(args) => std::process::exit(trellis::top::main(args)),
        Command::Dashboard(args) => std::process::exit(trellis::dashboard::main(args)),
        Command::Certs {
            dir,
            trust_domain,
            namespace,
            workloads,
            server_names,
            days,
            kubernetes,
            output,
            mesh_file,
            xds_bootstrap,
            zone,
        } => {
            if kubernetes {
                let namespace = namespace.unwrap_or_else(|| KUBERNETES_NAMESPACE.to_owned());
                let workloads = if workloads.is_empty() {
                    mesh_workloads(&mesh_file)
                } else {
                    workloads
                };
                kubernetes_certs(
                    &dir,
                    &trust_domain,
                    &namespace,
                    &workloads,
                    &server_names,
                    days,
                    output.as_deref(),
                );
                return;
            }
            let namespace = namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let workloads = if workloads.is_empty() {
                DEFAULT_WORKLOADS.iter().map(|w| (*w).to_owned()).collect()
            } else {
                workloads
            };
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
                if let Some(registry) = &xds_bootstrap {
                    let written = trellis::certs::write_xds_bootstrap(path, id, registry, &zone)
                        .unwrap_or_else(|e| {
                            trellis::cli::exit_with("trellis certs", &format!("{e:#}"))
                        });
                    println!(
                        "wrote {} (GRPC_XDS_BOOTSTRAP for a proxyless client as {id})",
                        written.display()
                    );
                }
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

/// The identities a mesh file's mesh needs: the registry, the edge, and
/// each of its services.
fn mesh_workloads(mesh_file: &std::path::Path) -> Vec<String> {
    let mesh = trellis::up::mesh::MeshFile::load(mesh_file).unwrap_or_else(|e| {
        trellis::cli::exit_with(
            "trellis certs",
            &format!("{e} (--kubernetes takes its services from --mesh-file, or name them with --workload)"),
        )
    });
    let mut workloads = vec!["registry".to_owned(), "edge".to_owned()];
    for service in &mesh.services {
        if !workloads.contains(&service.name) {
            workloads.push(service.name.clone());
        }
    }
    workloads
}

/// `trellis certs --kubernetes`: the Secrets to stdout or `output`, what
/// was done to stderr (stdout is the manifests).
fn kubernetes_certs(
    dir: &std::path::Path,
    trust_domain: &str,
    namespace: &str,
    workloads: &[String],
    server_names: &[String],
    days: i64,
    output: Option<&std::path::Path>,
) {
    use std::io::Write;
    fn fail(e: &dyn std::fmt::Display) -> ! {
        trellis::cli::exit_with("trellis certs", e)
    }
    let made = trellis::certs::kubernetes_secrets(
        dir,
        trust_domain,
        namespace,
        workloads,
        server_names,
        days,
    )
    .unwrap_or_else(|e| fail(&format!("{e:#}")));
    let ca = dir.join("ca.pem");
    let kept = if made.created_ca {
        "created"
    } else {
        "kept existing"
    };
    eprintln!("{kept} CA {} (its key stays there)", ca.display());
    match output {
        Some(path) => {
            trellis::certs::write_file(path, &made.yaml, true).unwrap_or_else(|e| fail(&e));
            eprintln!("wrote {} Secrets to {}", made.secrets.len(), path.display());
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(made.yaml.as_bytes())
                .and_then(|()| stdout.flush())
                .unwrap_or_else(|e| fail(&format!("writing the Secrets: {e}")));
        }
    }
    for (secret, id) in &made.secrets {
        match id {
            Some(id) => eprintln!("secret/{secret} in {namespace}: {id}"),
            None => eprintln!(
                "secret/{secret} in {namespace}: the TLS edge's certificate for {}",
                server_names.join(", ")
            ),
        }
    }
}
