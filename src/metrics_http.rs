//! The admin port of the registry and the services: plain HTTP/1.1 on an
//! address of its own (`--admin`), serving `GET /metrics` (Prometheus text,
//! computed at scrape time) and `GET /live` (the process runs); anything
//! else is 404. It holds at most [`MAX_CONNECTIONS`] connections and gives a
//! client [`HEADER_READ_TIMEOUT`] to send a request's headers, so a flood or
//! a stalled client on this port costs the process little.
//!
//! Also here: what every service exposes through the library (its database
//! pool, and for a producer its outbox, see [`crate::events::metrics`]),
//! and small helpers for writing metrics computed at scrape time with
//! `prometheus-client`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::server::{AcceptBackoff, ConnectionLimit};

/// The content type of `/metrics`: the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Most connections the admin port holds at once: scrapers and probes need
/// a handful; the cap keeps a flood here from taking the file descriptors
/// the service's own port needs.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Produces the `/metrics` text; called once per scrape.
pub type Scrape = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Says whether the process is ready to serve (`/ready`): `Err` says why
/// not.
pub type Ready = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The `--admin` flag (flatten it into a binary's own).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AdminArgs {
    /// Address to serve `/metrics` (Prometheus text) and `/live` on, plain
    /// HTTP/1.1, e.g. `127.0.0.1:9100`. Without it no admin port is opened.
    #[arg(long = "admin", env = "TRELLIS_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
}

impl AdminArgs {
    /// Binds and serves the admin port when `--admin` was given, for the
    /// component `name` (in logs); `None` without the flag.
    pub async fn start(&self, name: &str, scrape: Scrape) -> anyhow::Result<Option<AdminServer>> {
        match self.admin {
            None => Ok(None),
            Some(addr) => AdminServer::start(name, addr, scrape).await.map(Some),
        }
    }
}

/// A running admin port; dropping it stops it (and its connections).
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` (naming it in the error when that fails) and serves
    /// the admin port there in the background.
    pub async fn start(name: &str, addr: SocketAddr, scrape: Scrape) -> anyhow::Result<Self> {
        Self::start_with_ready(name, addr, scrape, None).await
    }

    /// [`AdminServer::start`], also answering `GET /ready`: 200 when
    /// `ready` says so, 503 with its reason when not.
    pub async fn start_with_ready(
        name: &str,
        addr: SocketAddr,
        scrape: Scrape,
        ready: Option<Ready>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--admin {addr}: cannot listen: {e}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(server = name, %addr, ready = ready.is_some(), "admin port listening (/metrics, /live)");
        let limit = ConnectionLimit::new(&format!("{name} admin"), MAX_CONNECTIONS);
        let task = tokio::spawn(serve(listener, scrape, ready, limit));
        Ok(Self { addr, task })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the admin port on `listener` until the task is dropped, with at
/// most `limit` connections open.
pub async fn serve(
    listener: TcpListener,
    scrape: Scrape,
    ready: Option<Ready>,
    limit: ConnectionLimit,
) {
    let mut backoff = AcceptBackoff::new();
    // Owned here: when the admin port stops, so do its connections.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let tcp = backoff.accept(&listener, "admin").await;
        // Past the cap the connection is dropped, which closes it.
        let Some(permit) = limit.try_admit() else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let scrape = scrape.clone();
        let ready = ready.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let scrape = scrape.clone();
                    let ready = ready.clone();
                    async move {
                        Ok::<_, Infallible>(
                            answer(
                                request.method(),
                                request.uri().path(),
                                &scrape,
                                ready.as_ref(),
                            )
                            .await,
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(
    method: &Method,
    path: &str,
    scrape: &Scrape,
    ready: Option<&Ready>,
) -> Response<Full<Bytes>> {
    let get = method == Method::GET || method == Method::HEAD;
    let (status, content_type, body) = match (path, ready) {
        ("/metrics", _) if get => (StatusCode::OK, CONTENT_TYPE, scrape().await),
        ("/live", _) if get => (StatusCode::OK, "text/plain", "live\n".to_owned()),
        ("/ready", Some(ready)) if get => match ready() {
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
            "not found; try GET /metrics, GET /live or GET /ready\n".to_owned(),
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

/// `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; a collector that fails ends the
    // text early, which the scraper reports.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// One collector's metrics in the Prometheus text format.
pub fn encode_collector(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    encode(&registry)
}

/// Labels of one series: `(name, value)` pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Writes gauge `name` with one value per label set (each non-empty).
pub fn gauges<'a, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, V)>,
) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes gauge `name`, one series without labels.
pub fn gauge<V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: V,
) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    ConstGauge::new(value).encode(metric)
}

/// Writes counter `name` (shown as `name_total`), one series without
/// labels.
pub fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    ConstCounter::new(value).encode(metric)
}

/// Writes counter `name` (shown as `name_total`) with one value per label
/// set.
pub fn counters<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A database pool's use, read at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// Connections open and free.
    pub idle: usize,
    /// Connections open and taken.
    pub in_use: usize,
    /// The most connections the pool opens.
    pub max: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

impl PoolUse {
    /// `pool`'s use now.
    pub fn of(pool: &crate::db::Pool) -> Self {
        let status = pool.status();
        Self {
            idle: status.available,
            in_use: status.size.saturating_sub(status.available),
            max: status.max_size,
            waiting: status.waiting,
        }
    }
}

impl Collector for PoolUse {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauges(
            &mut encoder,
            "trellis_db_pool_connections",
            "Open database connections of the pool, idle or in use.",
            [
                (&[("state", "idle")][..], self.idle as i64),
                (&[("state", "in_use")][..], self.in_use as i64),
            ],
        )?;
        gauge(
            &mut encoder,
            "trellis_db_pool_max",
            "The most connections the database pool opens (--db-pool-size).",
            self.max as i64,
        )?;
        gauge(
            &mut encoder,
            "trellis_db_pool_waiting",
            "Callers waiting for a database connection.",
            self.waiting as i64,
        )
    }
}

/// What a database-backed service exposes on its admin port: its pool,
/// and for a producer (`publishes_events`) its outbox.
pub fn service_scrape(ctx: &crate::service::Context, publishes_events: bool) -> Scrape {
    let pool = ctx.pool.clone();
    let outbox =
        publishes_events.then(|| crate::events::metrics::OutboxMetrics::new(ctx.outbox_admin()));
    Arc::new(move || {
        let pool = pool.clone();
        let outbox = outbox.clone();
        Box::pin(async move {
            let mut text = encode_collector(PoolUse::of(&pool));
            if let Some(outbox) = outbox {
                // The EOF line is the registry's: keep one, at the end.
                strip_eof(&mut text);
                text.push_str(&encode_collector(outbox.scrape().await));
            }
            text
        })
    })
}

/// A scrape with nothing but what `metrics` computes (no pool, no outbox:
/// a service without a database).
pub fn collector_scrape<C>(metrics: impl Fn() -> C + Send + Sync + 'static) -> Scrape
where
    C: Collector,
{
    let metrics = Arc::new(metrics);
    Arc::new(move || {
        let text = encode_collector(metrics());
        Box::pin(async move { text })
    })
}

/// Removes the final `# EOF` line `encode` writes, so that two encodings
/// can be joined into one exposition.
fn strip_eof(text: &mut String) {
    if text.ends_with("# EOF\n") {
        text.truncate(text.len() - "# EOF\n".len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_use_renders_idle_in_use_max_and_waiting() {
        let text = encode_collector(PoolUse {
            idle: 2,
            in_use: 3,
            max: 16,
            waiting: 1,
        });
        for line in [
            "# TYPE trellis_db_pool_connections gauge",
            "trellis_db_pool_connections{state=\"idle\"} 2",
            "trellis_db_pool_connections{state=\"in_use\"} 3",
            "trellis_db_pool_max 16",
            "trellis_db_pool_waiting 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn counters_get_the_total_suffix_and_label_values_are_escaped() {
        #[derive(Debug)]
        struct Two;
        impl Collector for Two {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                counters(
                    &mut encoder,
                    "trellis_test_events",
                    "Events.",
                    [(&[("subscriber", "a\"b")][..], 7)],
                )
            }
        }
        let text = encode_collector(Two);
        assert!(
            text.contains("# TYPE trellis_test_events counter"),
            "{text}"
        );
        assert!(
            text.contains("trellis_test_events_total{subscriber=\"a\\\"b\"} 7"),
            "{text}"
        );
    }

    #[test]
    fn joined_expositions_keep_one_eof_at_the_end() {
        let mut text = encode_collector(PoolUse {
            idle: 0,
            in_use: 0,
            max: 1,
            waiting: 0,
        });
        strip_eof(&mut text);
        text.push_str(&encode_collector(PoolUse {
            idle: 0,
            in_use: 0,
            max: 2,
            waiting: 0,
        }));
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_live_and_404_otherwise() {
        let scrape: Scrape = Arc::new(|| Box::pin(async { "x 1\n# EOF\n".to_owned() }));
        let server = AdminServer::start("test", "127.0.0.1:0".parse().unwrap(), scrape)
            .await
            .unwrap();
        let addr = server.local_addr();
        let close = "Host: x\r\nConnection: close\r\n\r\n";
        let metrics = get(addr, &format!("GET /metrics HTTP/1.1\r\n{close}")).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("content-type: text/plain; version=0.0.4"),
            "{metrics}"
        );
        assert!(metrics.ends_with("x 1\n# EOF\n"), "{metrics}");
        let live = get(addr, &format!("GET /live HTTP/1.1\r\n{close}")).await;
        assert!(
            live.starts_with("HTTP/1.1 200") && live.ends_with("live\n"),
            "{live}"
        );
        let other = get(addr, &format!("GET /ready HTTP/1.1\r\n{close}")).await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        // With a readiness check, /ready follows it.
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = flag.clone();
        let ready: Ready = Arc::new(move || {
            if seen.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the store is not read yet".to_owned())
            }
        });
        let scrape: Scrape = Arc::new(|| Box::pin(async { String::new() }));
        let with_ready = AdminServer::start_with_ready(
            "test",
            "127.0.0.1:0".parse().unwrap(),
            scrape,
            Some(ready),
        )
        .await
        .unwrap();
        let at = with_ready.local_addr();
        let not_yet = get(at, &format!("GET /ready HTTP/1.1\r\n{close}")).await;
        assert!(not_yet.starts_with("HTTP/1.1 503"), "{not_yet}");
        assert!(
            not_yet.ends_with("not ready: the store is not read yet\n"),
            "{not_yet}"
        );
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        let now = get(at, &format!("GET /ready HTTP/1.1\r\n{close}")).await;
        assert!(now.starts_with("HTTP/1.1 200"), "{now}");
        let post = get(
            addr,
            &format!("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n{close}"),
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrape: Scrape = Arc::new(|| Box::pin(async { String::new() }));
        let limit = ConnectionLimit::new("test admin", 1);
        let _task = tokio::spawn(serve(listener, scrape, None, limit.clone()));
        let _held = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
            .await
            .expect("the connection past the cap is closed");
        assert!(matches!(read, Ok(0) | Err(_)));
        assert_eq!(limit.refused(), 1);
    }
}
