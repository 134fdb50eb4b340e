//! mesh-proxy: the Trellis sidecar, and with `--edge` the mesh's front door.
//!
//! Reads top to bottom: tracing, configuration (every bad value printed,
//! exit 2), identity, the mesh view and its watches, the listeners
//! (outbound, inbound, edge), the local service's registration; then
//! SIGTERM: deregister, keep serving while peers notice, stop accepting,
//! finish calls in flight (the outbound port last, so that they can still
//! call out), exit 0.

mod access;
mod admin;
mod body;
mod config;
mod directory;
mod discovery;
mod edge;
mod endpoint;
mod grpc;
mod inbound;
mod keyed;
mod layer;
mod lifecycle;
mod metrics;
mod outbound;
mod policy;
#[cfg(test)]
mod properties;
mod retry;
mod serve;
mod settings;
mod shutdown;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;
use trellis::cli::exit_with;
use trellis::identity::{SpiffeId, Workload};

use crate::config::Args;
use crate::discovery::{ControlPlane, Discovery};
use crate::endpoint::{Endpoint, Transport};
use crate::settings::Settings;
use crate::shutdown::{Phase, Port, Shutdown};

fn main() {
    trellis::telemetry::init("warn,mesh_proxy=info");
    let args = Args::parse();
    let problems = args.problems();
    if !problems.is_empty() {
        exit_with("mesh-proxy", &problems.join("\n  "));
    }
    let runtime = match runtime(args.threads.into()) {
        Ok(runtime) => runtime,
        Err(e) => exit_with("mesh-proxy", &format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(start(args));
}

/// The runtime, shaped for a sidecar: with one thread (the default) every
/// connection, stream and timer runs on the thread that reads the
/// sockets, so a call is handed between tasks without waking another
/// thread; more threads suit an edge that transcodes JSON for many
/// clients.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().thread_name("mesh-proxy").build()
}

async fn start(args: Args) {
    // An expired (or not yet valid) certificate is no reason to exit: the
    // proxy says so on /ready and picks up the renewed files.
    let workload = match Workload::load_allowing_expiry(&args.identity.paths()) {
        Ok(workload) => Arc::new(workload),
        Err(e) => exit_with("mesh-proxy", &e),
    };
    let Some(service) = workload.id().service().map(str::to_owned) else {
        exit_with(
            "mesh-proxy",
            &format!("{} does not name a service (…/sa/<service>)", workload.id()),
        );
    };
    if let Err(e) = run(args, workload, service).await {
        exit_with("mesh-proxy", &format!("{e:#}"));
    }
}

async fn run(args: Args, workload: Arc<Workload>, service: String) -> anyhow::Result<()> {
    if let Some(problem) = workload.validity_problem() {
        tracing::warn!(%problem, "not ready until the certificate is renewed");
    }
    // Rotation needs no restart: new certificates, keys and CA bundles
    // apply to the connections made after they are read.
    let _identity_watch = workload.watch(args.identity.paths());
    // Our calls are counted as this service's; failed handshakes counted.
    metrics::get().init(workload.id());

    // Bind everything first: a taken port is a start-up error, not a
    // surprise later.
    let outbound_listener = trellis::server::bind(args.outbound).await?;
    let inbound_listener = match args.app {
        Some(_) => Some(trellis::server::bind(args.inbound).await?),
        None => None,
    };
    let admin_listener = trellis::server::bind(args.admin).await?;
    let admin_addr = admin_listener.local_addr()?;
    let edge_listener = match args.edge {
        Some(addr) => Some(trellis::server::bind(addr).await?),
        None => None,
    };
    // Read before anything serves: a bad policy or certificate is a
    // start-up error naming the file.
    let edge_policy = match &args.edge_policy {
        Some(path) => edge::policy::EdgePolicy::load(path)?,
        None => edge::policy::EdgePolicy::development(),
    };
    let edge_tls = match (&args.edge_tls_cert, &args.edge_tls_key) {
        (Some(cert), Some(key)) => Some(edge::listener::tls_config(cert, key)?),
        _ => None,
    };
    let inbound_addr = match &inbound_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    // Spans go to the collector the OTEL_* variables name, if any, under
    // `<service>-proxy` (or the edge's own name for a standalone edge).
    // The trace layer decides what is recorded; the SDK records what it
    // is given.
    let traces = trellis::telemetry::provider(
        &match args.app {
            Some(_) => format!("{service}-proxy"),
            None => service.clone(),
        },
        opentelemetry_sdk::trace::Sampler::AlwaysOn,
    );
    if let Some(provider) = &traces {
        layer::trace::install(provider, trellis::telemetry::Sampling::from_env());
    }

    // Every tunable of the request path, fixed once.
    let settings = Settings::from_args(&args);
    let mut discovery = Discovery::new(
        workload.clone(),
        args.static_routes.clone(),
        args.edge.is_some(),
        settings,
        &args.zone,
    );
    // The view is shared: routes added below show through it.
    let view = discovery.view();
    // The proxy's phase, and the background tasks that end with it.
    let mut shutdown = Shutdown::default();
    let control = match args.registry.clone() {
        Some(targets) => {
            let identity = match args.registry_identity.clone() {
                Some(id) => id,
                None => registry_identity(workload.id())?,
            };
            if args.edge.is_none() {
                discovery = discovery.with_config_route(targets.resolve_now(), identity.clone());
            }
            let control = ControlPlane::new(workload.clone(), targets, identity)?;
            let own = args.app.map(|_| service.clone());
            shutdown.spawn(discovery.run(control.clone(), own));
            Some(control)
        }
        None => {
            discovery.run_static();
            None
        }
    };

    let outbound = outbound::Outbound::new(view.clone(), "outbound", &settings);
    let outbound_task = tokio::spawn(serve::serve(
        "outbound",
        serve::Protocol::Http2,
        trellis::server::nodelay_incoming(outbound_listener),
        move |_tcp: &tokio::net::TcpStream| {
            let outbound = outbound.clone();
            move |request| {
                let outbound = outbound.clone();
                // Boxed: hyper moves every stream's future into its own
                // task, and this one is large.
                Box::pin(async move { outbound.handle(request).await })
            }
        },
        settings.server,
        serve::Stop {
            phases: shutdown.phases(),
            port: Port::Outbound,
        },
    ));
    tracing::info!(addr = %args.outbound, "outbound listening (h2c)");

    let mut lifecycle = None;
    let inbound_task = match (args.app, inbound_listener) {
        (Some(app), Some(listener)) => {
            let app_endpoint = Endpoint::with_settings(app, Transport::H2c, settings.app());
            let inbound = inbound::Inbound::new(
                app_endpoint,
                service.clone(),
                workload.id(),
                view.clone(),
                args.trusted_edges.clone(),
            );
            let tls = workload.server_config()?;
            let task = tokio::spawn(serve::serve(
                "inbound",
                serve::Protocol::Http2,
                trellis::tls::serve_incoming(listener, tls),
                move |stream: &trellis::tls::MeshTlsStream| {
                    let peer = Arc::new(layer::classify::Peer::of(stream.peer()));
                    let inbound = inbound.clone();
                    move |request| {
                        let inbound = inbound.clone();
                        let peer = peer.clone();
                        Box::pin(async move { inbound.handle(peer, request).await })
                    }
                },
                settings.server,
                serve::Stop {
                    phases: shutdown.phases(),
                    port: Port::Incoming,
                },
            ));
            let advertise = args.advertise.or(inbound_addr).expect("inbound is bound");
            tracing::info!(addr = %args.inbound, app = %app, "inbound listening (mTLS)");
            if let Some(control) = &control {
                lifecycle = Some(lifecycle::Lifecycle::start(
                    app,
                    control.clone(),
                    lifecycle::Registration {
                        service: service.clone(),
                        advertise: advertise.to_string(),
                        version: args.service_version.clone(),
                        zone: args.zone.clone(),
                        metadata: lifecycle::metadata(
                            args.metadata.iter().cloned(),
                            admin_addr,
                            advertise,
                        ),
                        grpc_services: args.grpc_services.clone(),
                        lease_ttl: args.lease_ttl,
                    },
                    view.snapshots.subscribe(),
                    settings.control,
                ));
            }
            Some(task)
        }
        _ => None,
    };

    let edge_task = match edge_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            tracing::info!(policy = %edge_policy.summary(), "edge policy");
            let edge = edge::Edge::start(
                view.clone(),
                edge::EdgeConfig {
                    policy: edge_policy,
                    max_json_body: args.edge_max_json_body,
                    max_json_response: args.edge_max_json_response,
                    cors_origins: args
                        .edge_cors_origins
                        .iter()
                        .filter_map(|o| http::HeaderValue::from_str(o).ok())
                        .collect(),
                    settings,
                },
                &mut shutdown,
            );
            let task = match edge_tls {
                Some(tls) => {
                    tracing::info!(%addr, "edge listening (TLS)");
                    tokio::spawn(serve::serve(
                        "edge",
                        serve::Protocol::Auto,
                        edge::listener::tls_incoming(listener, tls),
                        move |io: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
                            edge_handler(edge.clone(), io.get_ref().0.peer_addr())
                        },
                        settings.server,
                        serve::Stop {
                            phases: shutdown.phases(),
                            port: Port::Incoming,
                        },
                    ))
                }
                None => {
                    tracing::info!(%addr, "edge listening (h2c and HTTP/1.1, no TLS)");
                    tokio::spawn(serve::serve(
                        "edge",
                        serve::Protocol::Auto,
                        trellis::server::nodelay_incoming(listener),
                        move |io: &tokio::net::TcpStream| {
                            edge_handler(edge.clone(), io.peer_addr())
                        },
                        settings.server,
                        serve::Stop {
                            phases: shutdown.phases(),
                            port: Port::Incoming,
                        },
                    ))
                }
            };
            Some(task)
        }
        None => None,
    };

    let ready: admin::ReadyCheck = {
        let view = view.clone();
        let phases = shutdown.phases();
        let registered = lifecycle.as_ref().map(|l| l.registered.clone());
        let workload = workload.clone();
        Arc::new(move || {
            if !phases.borrow().serving() {
                return Err("draining".into());
            }
            // Peers refuse an expired certificate: no call would get through.
            if let Some(problem) = workload.validity_problem() {
                return Err(problem);
            }
            if !view.synced.load(Ordering::Acquire) {
                return Err("no registry snapshot yet".into());
            }
            if let Some(r) = &registered
                && !*r.borrow()
            {
                return Err("the local service is not registered yet".into());
            }
            Ok(())
        })
    };
    shutdown.spawn(admin::serve(
        admin_listener,
        ready,
        settings.server.admin_max_connections,
    ));
    tracing::info!(addr = %args.admin, "admin listening (/metrics, /live, /ready)");

    let signal = trellis::server::shutdown_signal().await;
    tracing::info!(signal, "shutting down: deregistering");
    shutdown.enter(Phase::Draining);
    if let Some(mut lifecycle) = lifecycle {
        lifecycle
            .deregister(std::time::Duration::from_secs(2))
            .await;
    }
    // Peers learn of the removal by push; until they have, calls still
    // arrive and are served.
    tokio::time::sleep(args.drain_delay).await;
    // One grace period for the whole drain: first the ports calls come in
    // on, then, once their calls are done, the outbound port, which those
    // calls may still need to reach other services.
    let until = tokio::time::Instant::now() + args.grace;
    shutdown.enter(Phase::Closing { until });
    let mut clean = true;
    for task in [inbound_task, edge_task].into_iter().flatten() {
        clean &= task.await.unwrap_or(false);
    }
    shutdown.enter(Phase::ClosingOutbound { until });
    clean &= outbound_task.await.unwrap_or(false);
    shutdown.stop().await;
    if clean {
        tracing::info!("drained cleanly");
    } else {
        tracing::warn!("grace period over with calls still in flight; exiting");
    }
    if let Some(provider) = traces {
        let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(2));
    }
    Ok(())
}

/// The per-connection request handler of the edge.
fn edge_handler(
    edge: Arc<edge::Edge>,
    peer: std::io::Result<std::net::SocketAddr>,
) -> impl Fn(
    http::Request<hyper::body::Incoming>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = http::Response<edge::EdgeBody>> + Send>,
> + Send
+ Sync
+ Clone
+ 'static {
    let peer = peer.unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    move |request| {
        let edge = edge.clone();
        Box::pin(edge.handle(request, peer))
    }
}

/// The registry's default identity: service `registry` in our own trust
/// domain and namespace.
fn registry_identity(own: &SpiffeId) -> anyhow::Result<SpiffeId> {
    let namespace = own.namespace().unwrap_or("default");
    Ok(SpiffeId::for_service(
        own.trust_domain(),
        namespace,
        "registry",
    )?)
}
