//! What every Trellis gRPC server shares: grpc.health.v1, server reflection
//! (v1 and v1alpha) over the contracts in `proto/`, a bounded, logged
//! drain on SIGTERM or Ctrl-C, and listeners that hold at most so many
//! connections and back off when accepting fails.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::transport::Server;
use tonic::transport::server::Connected;
use tonic_health::server::HealthReporter;

use crate::identity::Workload;

/// A service's tonic router: every call it handles gets a server span
/// (see [`crate::rpc_trace`]).
pub type Router = tonic::transport::server::Router<
    tower::layer::util::Stack<crate::rpc_trace::TraceLayer, tower::layer::util::Identity>,
>;

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
        .layer(crate::rpc_trace::layer())
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
    let incoming = limit_incoming(
        ConnectionLimit::new("mTLS", DEFAULT_MAX_CONNECTIONS),
        crate::tls::serve_incoming(listener, config),
    );
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
    let incoming = limit_incoming(
        ConnectionLimit::new(name, DEFAULT_MAX_CONNECTIONS),
        nodelay_incoming(listener),
    );
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

/// Connections a listener holds at once unless told otherwise: enough for
/// any one service's callers, and well under a default file limit raised
/// for a server (the one resource a flood of idle connections exhausts).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How often, at most, a listener logs that it is refusing connections.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

/// The most connections a listener holds open at once. A connection past
/// the cap is closed as soon as it is accepted, so one that is open keeps
/// working and a flood costs a file descriptor only for an instant.
/// Refusals are counted and logged at most every 10 s.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    name: Arc<str>,
    permits: Arc<Semaphore>,
    max: usize,
    refused: Arc<AtomicU64>,
    /// When refusals were last logged, and how many had been by then.
    logged: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl ConnectionLimit {
    /// At most `max` (at least 1) connections at once on the listener
    /// `name`.
    pub fn new(name: &str, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            name: name.into(),
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: Arc::new(AtomicU64::new(0)),
            logged: Arc::new(Mutex::new(None)),
        }
    }

    /// A permit for one more connection, to be dropped when it closes;
    /// `None` (counted, logged now and then) when the listener is full.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let due = match *logged {
            None => true,
            Some((at, _)) => now.duration_since(at) >= REFUSED_LOG_EVERY,
        };
        if due {
            let since = refused - logged.map_or(0, |(_, n)| n);
            *logged = Some((now, refused));
            tracing::warn!(
                listener = %self.name,
                max_connections = self.max,
                refused = since,
                "listener full: closing new connections (logged at most every 10s)"
            );
        }
        None
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// How long to wait after a failed accept. Accepting fails mostly when the
/// process is out of file descriptors (EMFILE) or memory; retrying at once
/// would spin a core while nothing frees up, so each failure in a row
/// doubles the wait, from 10 ms to at most 1 s, and a success resets it.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    /// The wait after a first failure.
    pub const FIRST: Duration = Duration::from_millis(10);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(1);

    /// A backoff with no failure yet.
    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// Accepting failed: how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    /// Accepting worked: the next failure waits the shortest time again.
    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }

    /// The next connection on `listener` (named `name` in the log), each
    /// failure before it logged and waited out.
    pub async fn accept(&mut self, listener: &TcpListener, name: &str) -> tokio::net::TcpStream {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    self.succeeded();
                    return tcp;
                }
                Err(error) => {
                    let wait = self.failed();
                    tracing::warn!(listener = name, %error, wait_ms = wait.as_millis() as u64, "accept failed; waiting before the next try");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection holding its place under a [`ConnectionLimit`].
#[derive(Debug)]
pub struct Counted<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Counted<IO> {
    /// The connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// `incoming` under `limit`: connections past it are closed at once, and
/// accept errors are logged and waited out ([`AcceptBackoff`]) rather than
/// passed on (a server that stopped on one would stop serving; one that
/// retried at once would spin).
pub fn limit_incoming<S, IO>(
    limit: ConnectionLimit,
    incoming: S,
) -> impl Stream<Item = io::Result<Counted<IO>>> + Send + Unpin + 'static
where
    S: Stream<Item = io::Result<IO>> + Send + Unpin + 'static,
    IO: Send + 'static,
{
    let state = (incoming, limit, AcceptBackoff::new());
    Box::pin(futures::stream::unfold(
        state,
        |(mut incoming, limit, mut backoff)| async move {
            loop {
                match incoming.next().await? {
                    Ok(io) => {
                        backoff.succeeded();
                        // Dropping a connection past the cap closes it.
                        if let Some(permit) = limit.try_admit() {
                            let counted = Counted {
                                io,
                                _permit: permit,
                            };
                            return Some((Ok(counted), (incoming, limit, backoff)));
                        }
                    }
                    Err(error) => {
                        let wait = backoff.failed();
                        tracing::warn!(
                            listener = %limit.name,
                            %error,
                            wait_ms = wait.as_millis() as u64,
                            "accept failed; waiting before the next try"
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::new();
        let waits: Vec<u64> = (0..9).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_and_errors_waited_out() {
        let (tx, rx) =
            tokio::sync::mpsc::unbounded_channel::<io::Result<tokio::io::DuplexStream>>();
        let limit = ConnectionLimit::new("test", 2);
        let mut incoming = limit_incoming(
            limit.clone(),
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        );
        let mut peers = Vec::new();
        for _ in 0..3 {
            let (ours, theirs) = tokio::io::duplex(64);
            tx.send(Ok(ours)).unwrap();
            peers.push(theirs);
        }
        let first = incoming.next().await.unwrap().unwrap();
        let _second = incoming.next().await.unwrap().unwrap();
        // The third is closed without being handed on.
        let mut third = peers.pop().unwrap();
        let mut buf = [0u8; 1];
        tokio::select! {
            next = incoming.next() => panic!("handed on past the cap: {:?}", next.map(|r| r.is_ok())),
            read = third.read(&mut buf) => assert_eq!(read.unwrap(), 0),
        }
        assert_eq!(limit.refused(), 1);
        // A closed connection frees its place; errors before the next
        // connection are waited out (10 + 20 ms), not passed on.
        drop(first);
        let started = std::time::Instant::now();
        tx.send(Err(io::Error::other("EMFILE"))).unwrap();
        tx.send(Err(io::Error::other("EMFILE"))).unwrap();
        let (ours, _theirs) = tokio::io::duplex(64);
        tx.send(Ok(ours)).unwrap();
        assert!(incoming.next().await.unwrap().is_ok());
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(limit.refused(), 1);
    }
}
