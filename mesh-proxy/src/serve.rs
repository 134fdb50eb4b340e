//! Serving HTTP/2 connections: each connection its own task (one slow or
//! broken peer never holds up another), bounded headers and streams, and
//! a graceful stop that sends GOAWAY and lets calls in flight finish.

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
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::BoxError;
use crate::metrics;

/// Largest header block a peer may send (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Concurrent streams per connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// A connection that has not sent a single request by then is closed
/// (slow-loris protection); after its first request, HTTP/2 keep-alive
/// pings find dead peers.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
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

fn auto_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(FIRST_REQUEST_TIMEOUT)
        .max_buf_size(64 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .adaptive_window(true);
    b
}

/// Tells a listener to stop: `Some(until)` means stop accepting now and
/// let calls in flight run until `until`.
pub type Stop = watch::Receiver<Option<Instant>>;

/// Serves connections from `incoming` until `stop` says when to finish,
/// then stops accepting, asks every connection to finish (GOAWAY) and
/// waits until that instant for calls in flight. `handler` makes the
/// per-connection request handler. Returns whether the drain finished in
/// time.
pub async fn serve<I, IO, H, F, Fut, B>(
    name: &'static str,
    protocol: Protocol,
    mut incoming: I,
    handler: H,
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
    let h2 = builder();
    let auto = Arc::new(auto_builder());
    let graceful = GracefulShutdown::new();
    loop {
        let io = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                Some(Err(error)) => {
                    tracing::debug!(listener = name, %error, "accept failed");
                    continue;
                }
                None => break,
            },
            _ = stop.wait_for(Option::is_some) => break,
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
                tokio::spawn(run_connection(name, connection, used));
            }
            Protocol::Auto => {
                let watcher = graceful.watcher();
                let auto = auto.clone();
                tokio::spawn(async move {
                    let connection =
                        watcher.watch(auto.serve_connection(TokioIo::new(io), service));
                    run_connection(name, connection, used).await;
                });
            }
        }
    }
    // Dropping the listener stops accepting.
    drop(incoming);
    // A closed channel (the owner gone) means no grace at all.
    let until = stop.borrow().unwrap_or_else(Instant::now);
    tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep_until(until) => false,
    }
}

/// Drives one connection to its end, closing it early if it sends no
/// request in time.
async fn run_connection<C, E>(name: &'static str, connection: C, used: Arc<AtomicBool>)
where
    C: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    metrics::get().connection_opened(name);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = &mut connection => Some(result),
        () = tokio::time::sleep(FIRST_REQUEST_TIMEOUT) => None,
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
        tracing::debug!(listener = name, error = %crate::forward::describe(&*error), "connection ended with an error");
    }
    metrics::get().connection_closed(name);
}
