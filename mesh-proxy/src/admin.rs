//! The admin port (plain HTTP/1.1): `/metrics` (Prometheus text),
//! `/live` (the process runs) and `/ready` (identity loaded and its
//! certificate within its validity period, first registry snapshot and the
//! local service's configuration in, local service registered, not
//! draining).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics;

/// What readiness depends on; each check names what is missing.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves the admin port on `listener` until the process ends, with at
/// most `max_connections` open: scrapers and probes need a handful; the
/// cap keeps a flood on this port from taking the file descriptors the
/// data ports need.
pub async fn serve(listener: TcpListener, ready: ReadyCheck, max_connections: usize) {
    let limit = trellis::server::ConnectionLimit::new("admin", max_connections);
    let mut backoff = trellis::server::AcceptBackoff::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let tcp = backoff.accept(&listener, "admin").await;
        let Some(permit) = limit.try_admit() else {
            metrics::get().connection_refused("admin");
            continue;
        };
        let ready = ready.clone();
        // Owned here: when the admin port is stopped, so are they.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let _permit = permit;
            let _open = metrics::get().open_connection("admin");
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let ready = ready.clone();
                    async move { Ok::<_, Infallible>(answer(request.uri().path(), &ready)) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn answer(path: &str, ready: &ReadyCheck) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::get().render(),
        ),
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_owned()),
        "/ready" => match ready().and_then(|()| crate::inbound::ready()) {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /live or /ready\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
