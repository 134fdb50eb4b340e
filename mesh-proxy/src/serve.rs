//! Serving HTTP/2 connections: each connection its own task (one slow or
//! broken peer never holds up another), bounded headers and streams, at
//! most so many connections per port (one more is closed at once), accept
//! errors waited out with a growing backoff, and a graceful stop that
//! sends GOAWAY and lets calls in flight finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use trellis::server::{AcceptBackoff, ConnectionLimit};

use crate::body::BoxError;
use crate::metrics;
use crate::settings;
use crate::shutdown::{Phase, Port};

fn builder(settings: &settings::Server) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_list_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keep_alive_interval)
        .keep_alive_timeout(settings.keep_alive_timeout)
        .adaptive_window(true);
    b
}

/// Which HTTP versions a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 only (gRPC between proxies and services).
    Http2,
    /// HTTP/1.1 and HTTP/2, chosen per connection (the edge: browsers,
    /// gRPC-Web and JSON callers as well as gRPC clients).
    Auto,
}

fn auto_builder(
    settings: &settings::Server,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.first_request_timeout)
        .max_buf_size(settings.http1_max_buf);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_list_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keep_alive_interval)
        .keep_alive_timeout(settings.keep_alive_timeout)
        .adaptive_window(true);
    b
}

/// When a listener stops: once the proxy's phase gives its kind of port a
/// time to finish by ([`Phase::close_by`]).
#[derive(Debug)]
pub struct Stop {
    /// The proxy's phase.
    pub phases: watch::Receiver<Phase>,
    /// Which kind of port this is.
    pub port: Port,
}

impl Stop {
    /// Waits until the listener must stop accepting (at once if the
    /// proxy's phase is gone).
    async fn requested(&mut self) {
        let port = self.port;
        let _ = self
            .phases
            .wait_for(|phase| phase.close_by(port).is_some())
            .await;
    }

    /// When calls in flight must be done (now, if the phase is gone).
    fn until(&self) -> Instant {
        self.phases
            .borrow()
            .close_by(self.port)
            .unwrap_or_else(Instant::now)
    }
}

/// Serves connections from `incoming` until `stop` says when to finish,
/// then stops accepting, asks every connection to finish (GOAWAY) and
/// waits until that instant for calls in flight; connections still open
/// then are closed (each runs as a task this function owns). `handler` makes the
/// per-connection request handler. At most `settings.max_connections`
/// are open at once; one more is closed as soon as it arrives (counted in
/// `connections_refused`), so those open keep working. Returns whether
/// the drain finished in time.
pub async fn serve<I, IO, H, F, Fut, B>(
    name: &'static str,
    protocol: Protocol,
    mut incoming: I,
    handler: H,
    settings: settings::Server,
    mut stop: Stop,
) -> bool
where
    I: Stream<Item = std::io::Result<IO>> + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(&IO) -> F,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let h2 = builder(&settings);
    let auto = Arc::new(auto_builder(&settings));
    let first_request_timeout = settings.first_request_timeout;
    let graceful = GracefulShutdown::new();
    let limit = ConnectionLimit::new(name, settings.max_connections);
    let mut backoff = AcceptBackoff::new();
    let mut connections = JoinSet::new();
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            () = stop.requested() => break,
        };
        // Connections that ended are reaped as new ones come.
        while connections.try_join_next().is_some() {}
        let io = match next {
            Some(Ok(io)) => {
                backoff.succeeded();
                io
            }
            Some(Err(error)) => {
                // Out of file descriptors (EMFILE) or memory: trying again
                // at once would spin while nothing frees up.
                let wait = backoff.failed();
                tracing::warn!(listener = name, %error, wait_ms = wait.as_millis() as u64, "accept failed; waiting before the next try");
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = stop.requested() => break,
                }
            }
            None => break,
        };
        let Some(permit) = limit.try_admit() else {
            // Dropping it closes it before any byte is read or sent.
            metrics::get().connection_refused(name);
            drop(io);
            continue;
        };
        let handle = handler(&io);
        let used = Arc::new(AtomicBool::new(false));
        let service = {
            let used = used.clone();
            hyper::service::service_fn(move |request| {
                used.store(true, Ordering::Relaxed);
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(request).await) }
            })
        };
        match protocol {
            Protocol::Http2 => {
                let connection = graceful.watch(h2.serve_connection(TokioIo::new(io), service));
                connections.spawn(run_connection(
                    name,
                    connection,
                    used,
                    permit,
                    first_request_timeout,
                ));
            }
            Protocol::Auto => {
                let watcher = graceful.watcher();
                let auto = auto.clone();
                connections.spawn(async move {
                    let connection =
                        watcher.watch(auto.serve_connection(TokioIo::new(io), service));
                    run_connection(name, connection, used, permit, first_request_timeout).await;
                });
            }
        }
    }
    // Dropping the listener stops accepting.
    drop(incoming);
    let until = stop.until();
    let clean = tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep_until(until) => false,
    };
    // Whatever is still open is closed now, not left behind.
    connections.shutdown().await;
    clean
}

/// Drives one connection to its end, closing it early if it sends no
/// request in time; its place under the port's cap (`permit`) is given
/// back when it ends.
async fn run_connection<C, E>(
    name: &'static str,
    connection: C,
    used: Arc<AtomicBool>,
    permit: OwnedSemaphorePermit,
    first_request_timeout: Duration,
) where
    C: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let _open = metrics::get().open_connection(name);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = &mut connection => Some(result),
        () = tokio::time::sleep(first_request_timeout) => None,
    };
    let result = match result {
        Some(result) => result,
        None if !used.load(Ordering::Relaxed) => {
            tracing::debug!(listener = name, "closing a connection that sent no request");
            Ok(())
        }
        None => connection.await,
    };
    if let Err(error) = result {
        let error: BoxError = error.into();
        tracing::debug!(listener = name, error = %crate::layer::endpoint::describe(&*error), "connection ended with an error");
    }
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    // Accepting that keeps failing (EMFILE) is retried after 10 ms, then
    // 20, 40, … up to 1 s: not in a loop that spins a core.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_waited_out_with_a_growing_backoff() {
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = tries.clone();
        let incoming = futures::stream::repeat_with(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            Err::<tokio::io::DuplexStream, _>(std::io::Error::from_raw_os_error(24))
        });
        let (stop_tx, stop_rx) = watch::channel(Phase::Serving);
        let server = tokio::spawn(serve(
            "test",
            Protocol::Http2,
            incoming,
            |_: &tokio::io::DuplexStream| {
                |_: Request<Incoming>| async {
                    Response::new(http_body_util::Empty::<bytes::Bytes>::new())
                }
            },
            settings::Server {
                max_connections: 8,
                ..settings::Server::default()
            },
            Stop {
                phases: stop_rx,
                port: Port::Incoming,
            },
        ));
        // Tries at 0, 10, 30, 70, 150, 310, 630 and 1270 ms.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(tries.load(Ordering::Relaxed), 8);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(tries.load(Ordering::Relaxed), 11, "at most one a second");
        // A stop is heard while waiting.
        stop_tx
            .send(Phase::Closing {
                until: Instant::now() + Duration::from_secs(1),
            })
            .unwrap();
        assert!(server.await.unwrap(), "no connection, so a clean drain");
    }
}
