//! The Trellis registry: the control plane's gRPC server, over mTLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use trellis::cli::{IdentityArgs, exit_with};
use trellis::pb::trellis::config::v1::config_service_server::ConfigServiceServer;
use trellis::pb::trellis::registry::v1::registry_service_server::RegistryServiceServer;
use trellis_registry::config::{ConfigApi, ConfigStore};
use trellis_registry::etcd::StoreUrl;
use trellis_registry::metrics::RegistryMetrics;
use trellis_registry::quota::{Quotas, parse_bytes};
use trellis_registry::registry::Availability;
use trellis_registry::registry::{MeshScope, Registry, RegistryApi};
use trellis_registry::replicated::Replicated;
use trellis_registry::store::Store;
use trellis_registry::xds::{AggregatedDiscoveryServiceServer, XdsApi, XdsStats};

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
    /// Address to serve `/metrics` (Prometheus text), `/live` and `/ready`
    /// (200 while the registry may serve; 503 with the reason while it is
    /// out of step with its etcd store) on, plain HTTP/1.1, e.g.
    /// `127.0.0.1:7001`. Without it no admin port is opened.
    #[arg(long, env = "TRELLIS_REGISTRY_ADMIN", value_name = "ADDR")]
    admin: Option<SocketAddr>,
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
    /// Directory keeping the registry's state (instances and their leases,
    /// gRPC service name owners, contracts, the revision) across restarts,
    /// in `registry.state`. Without it the state lives in memory only.
    #[arg(long, env = "TRELLIS_REGISTRY_STATE_DIR", conflicts_with = "store")]
    state_dir: Option<PathBuf>,
    /// Keep the mesh in etcd instead, shared by every registry replica
    /// given the same store: `etcd://host:port[,host:port...][/prefix]`
    /// (prefix default `/trellis`). Replicas then hold no state of their
    /// own; one that cannot reach etcd reports NOT_SERVING.
    #[arg(long, env = "TRELLIS_REGISTRY_STORE", value_name = "URL", value_parser = StoreUrl::parse)]
    store: Option<StoreUrl>,
    /// Most instances one identity may have registered at once.
    #[arg(long, env = "TRELLIS_REGISTRY_MAX_INSTANCES_PER_IDENTITY", default_value_t = Quotas::DEFAULT.instances)]
    max_instances_per_identity: usize,
    /// Most gRPC service names one identity may hold by first claim (names
    /// declared for it in config do not count).
    #[arg(long, env = "TRELLIS_REGISTRY_MAX_GRPC_NAMES_PER_IDENTITY", default_value_t = Quotas::DEFAULT.grpc_names)]
    max_grpc_names_per_identity: usize,
    /// Largest contract (file descriptors, bytes; `4MiB`, `512KiB`) one
    /// identity may register; at most 4MiB, the default.
    #[arg(long, env = "TRELLIS_REGISTRY_MAX_DESCRIPTOR_BYTES_PER_IDENTITY", default_value = "4MiB", value_parser = parse_bytes)]
    max_descriptor_bytes_per_identity: usize,
    /// Most open watches (Registry Watch and Config WatchConfig together)
    /// per identity. Each proxy holds one, plus one per mesh service.
    #[arg(long, env = "TRELLIS_REGISTRY_MAX_WATCHES_PER_IDENTITY", default_value_t = Quotas::DEFAULT.watches)]
    max_watches_per_identity: usize,
    /// How long in-flight calls may take to finish after SIGTERM (e.g. `5s`, `750ms`).
    #[arg(long, env = "TRELLIS_REGISTRY_GRACE", default_value = "5s", value_parser = trellis::cli::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    identity: IdentityArgs,
}

#[tokio::main]
async fn main() {
    // Logs only: every sidecar's lease renewals and watches would fill a
    // trace view with control-plane chatter that no call is part of.
    trellis::telemetry::init("warn,trellis=info,trellis_registry=info");
    let args = Args::parse();
    let workload = args.identity.load_or_exit(PROGRAM);
    // Rotated certificate and CA files are read again without a restart.
    let _identity_watch = workload.watch(args.identity.paths());
    // The registry serves the mesh services of its own trust domain and
    // namespace; identities elsewhere (the same CA may sign them) name none.
    let scope = MeshScope::of(workload.id()).unwrap_or_else(|e| exit_with(PROGRAM, &e));
    let quotas = Quotas {
        instances: args.max_instances_per_identity,
        grpc_names: args.max_grpc_names_per_identity,
        descriptor_bytes: args.max_descriptor_bytes_per_identity,
        watches: args.max_watches_per_identity,
    };
    quotas.check().unwrap_or_else(|e| exit_with(PROGRAM, &e));
    let read_only = args.read_only.iter().filter(|s| !s.is_empty()).cloned();
    let mut replicated = None;
    let registry = match (&args.state_dir, &args.store) {
        (Some(dir), _) => Store::open(dir)
            .and_then(|store| Registry::durable(scope, read_only, quotas, store))
            .unwrap_or_else(|e| exit_with(PROGRAM, &format!("--state-dir {e}"))),
        (None, Some(url)) => {
            let registry = Registry::new(scope.clone(), read_only, quotas);
            let r = Replicated::new(registry.clone(), &scope, url)
                .unwrap_or_else(|e| exit_with(PROGRAM, &format!("--store {e}")));
            replicated = Some(r);
            registry
        }
        (None, None) => {
            tracing::info!("no --state-dir or --store: the registry's state lives in memory only");
            Registry::new(scope, read_only, quotas)
        }
    };
    let config = ConfigStore::open(&args.config_dir, registry.clone())
        .unwrap_or_else(|e| exit_with(PROGRAM, &format!("--config-dir {e}")));
    let listener = trellis::server::bind(args.listen)
        .await
        .unwrap_or_else(|e| exit_with(PROGRAM, &e));

    let xds_stats = Arc::new(XdsStats::default());
    let _admin = match args.admin {
        Some(addr) => Some(
            trellis::metrics_http::AdminServer::start_with_ready(
                "registry",
                addr,
                RegistryMetrics::scrape(registry.clone(), config.clone(), xds_stats.clone()),
                Some({
                    // Ready while the registry may serve its view: with
                    // etcd, while it is in step with it.
                    let registry = registry.clone();
                    std::sync::Arc::new(move || {
                        registry
                            .check_available()
                            .map_err(|s| s.message().to_owned())
                    })
                }),
            )
            .await
            .unwrap_or_else(|e| exit_with(PROGRAM, &format!("{e:#}"))),
        ),
        None => None,
    };

    // etcd expires its own leases; the feed keeps the view in step.
    let expiry = match &replicated {
        Some(r) => r.spawn_feed(),
        None => registry.spawn_expiry(),
    };
    let persist = registry.spawn_persist();
    let _config_watch = config.spawn_watcher();
    let (router, health) = trellis::server::standard_router();
    // Serving while the view may be served: always with the embedded
    // store, with etcd only while in step with it.
    let mut availability = registry.availability();
    let _health = tokio::spawn(async move {
        loop {
            let serving = *availability.borrow_and_update() == Availability::Serving;
            if serving {
                health
                    .set_serving::<RegistryServiceServer<RegistryApi>>()
                    .await;
                health.set_serving::<ConfigServiceServer<ConfigApi>>().await;
            } else {
                health
                    .set_not_serving::<RegistryServiceServer<RegistryApi>>()
                    .await;
                health
                    .set_not_serving::<ConfigServiceServer<ConfigApi>>()
                    .await;
            }
            if availability.changed().await.is_err() {
                return;
            }
        }
    });
    let api = match &replicated {
        Some(r) => RegistryApi::replicated(r.clone()),
        None => RegistryApi::new(registry.clone()),
    };
    // Proxyless gRPC clients read the same view over xDS.
    let xds = XdsApi::new(registry.clone(), config.clone(), xds_stats.clone());
    let router = router
        .add_service(RegistryServiceServer::new(api))
        .add_service(ConfigServiceServer::new(ConfigApi::new(
            config.clone(),
            xds_stats.clone(),
        )))
        .add_service(AggregatedDiscoveryServiceServer::new(xds));
    tracing::info!(
        addr = %args.listen,
        identity = %workload.id(),
        config_dir = %args.config_dir.display(),
        state_dir = %args.state_dir.as_deref().map_or("(in memory)".into(), |d| d.display().to_string()),
        store = %args.store.as_ref().map_or("(embedded)".into(), ToString::to_string),
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
    // The last changes, made while draining, are written before exiting.
    if let Some(persist) = persist {
        persist.abort();
    }
    if let Err(e) = registry.save_now() {
        tracing::error!(error = %e, "the registry state was not written on exit");
    }
    if let Err(e) = served {
        exit_with(PROGRAM, &format!("{e:#}"));
    }
}
