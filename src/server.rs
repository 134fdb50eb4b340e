//! What every Trellis gRPC server shares: grpc.health.v1, server reflection
//! (v1 and v1alpha) over the contracts in `proto/`, and a bounded, logged
//! drain on SIGTERM or Ctrl-C.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;

use crate::identity::Workload;

/// A server builder with grpc.health.v1 and server reflection (v1 and
/// v1alpha) already added. Add the server's own services to the router;
/// use the reporter to publish their health. Reflection lists every
/// Trellis contract; see [`router_serving`] to list only one's own.
pub fn standard_router() -> (Router, HealthReporter) {
    router_with_reflection(&[])
}

/// Like [`standard_router`], but reflection lists only `services` (plus
/// health and reflection themselves): every binary embeds all of Trellis's
/// contracts, while a service should show only those it serves.
pub fn router_serving(services: &[&str]) -> (Router, HealthReporter) {
    router_with_reflection(services)
}

fn router_with_reflection(listed: &[&str]) -> (Router, HealthReporter) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if !listed.is_empty() {
            // Naming services turns off listing everything; name the
            // infrastructure too, with the reflection contracts so each
            // listed service can be described.
            builder = builder
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                );
            for name in listed.iter().copied().chain([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]) {
                builder = builder.with_service_name(name);
            }
        }
        builder
    };
    // The descriptor sets are compiled into the binary: failure here is a
    // build defect, not a runtime condition.
    let v1 = reflection()
        .build_v1()
        .expect("embedded descriptor set is valid");
    let v1alpha = reflection()
        .build_v1alpha()
        .expect("embedded descriptor set is valid");
    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);
    (router, reporter)
}

/// Resolves when the process receives SIGTERM or SIGINT (Ctrl-C), naming it.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The future a server stops accepting on.
pub type Drain = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs a server until a shutdown signal, then lets in-flight calls finish
/// within `grace`. `serve` receives the future that tells it to stop
/// accepting. Logs whether the drain was clean.
pub async fn run_until_signal<F, E>(
    name: &str,
    grace: Duration,
    serve: impl FnOnce(Drain) -> F,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let server = serve(Box::pin(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }));
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        signal = shutdown_signal() => {
            tracing::info!(server = name, signal, grace_ms = grace.as_millis() as u64, "draining");
            let _ = tx.send(true);
        }
    }
    match tokio::time::timeout(grace, server).await {
        Ok(result) => {
            tracing::info!(server = name, "drained cleanly");
            result
        }
        Err(_) => {
            tracing::warn!(
                server = name,
                "grace period over with calls still in flight; exiting"
            );
            Ok(())
        }
    }
}

/// Serves `router` over mesh mTLS on `listener` until `drain` resolves.
pub async fn serve_mtls(
    router: Router,
    listener: TcpListener,
    workload: &Workload,
    drain: Drain,
) -> Result<(), anyhow::Error> {
    let config = workload.server_config()?;
    let incoming = crate::tls::serve_incoming(listener, config);
    router.serve_with_incoming_shutdown(incoming, drain).await?;
    Ok(())
}

/// Binds `addr`, naming it in the error when that fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, anyhow::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Serves `router` over plaintext h2c on `addr` (a service behind its
/// sidecar listens on loopback only) until SIGTERM or Ctrl-C, then drains
/// within `grace`. Logs the address once listening.
pub async fn run_plaintext(
    name: &str,
    addr: SocketAddr,
    grace: Duration,
    router: Router,
) -> Result<(), anyhow::Error> {
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(server = name, addr = %local, "listening (h2c)");
    let incoming = nodelay_incoming(listener);
    run_until_signal(name, grace, |drain| async move {
        router
            .serve_with_incoming_shutdown(incoming, drain)
            .await
            .map_err(anyhow::Error::from)
    })
    .await
}

/// Accepted connections with Nagle's algorithm off. gRPC writes a
/// response's trailers apart from its data; with Nagle on, that small
/// write waits for the peer's delayed ACK (about 40 ms on Linux).
pub fn nodelay_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Unpin {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
}
