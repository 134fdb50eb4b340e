//! One upstream endpoint: where it is, whom it must be, its pooled
//! HTTP/2 connection (replaced when it reaches its maximum age, so that
//! the peer's certificate is checked again), and whether it is in
//! rotation.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::settings;

/// How to reach an endpoint.
#[derive(Clone)]
pub enum Transport {
    /// Plaintext HTTP/2 (the local service, or a static h2c upstream).
    H2c,
    /// Mesh mTLS, checking the peer against the config's expected identity.
    Mtls {
        /// The identity the registry named (or the trust domain, for a
        /// static TLS upstream); shown in errors.
        expected: String,
        /// Client configuration that checks it.
        config: Arc<ClientConfig>,
    },
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::H2c => f.write_str("h2c"),
            Self::Mtls { expected, .. } => write!(f, "mtls({expected})"),
        }
    }
}

/// Why no request could be sent to an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP or TLS failed: the request never left.
    #[error("cannot connect to {addr}: {source}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Http2 {
        /// The endpoint.
        addr: SocketAddr,
        /// What failed.
        source: h2::Error,
    },
    /// Connecting (TCP, TLS and HTTP/2 together) took longer than allowed:
    /// the peer accepts but does not answer, or is too slow to be worth
    /// the call's remaining time.
    #[error("connecting to {addr} took over {}ms", after.as_millis())]
    TimedOut {
        /// The endpoint.
        addr: SocketAddr,
        /// The bound that ran out.
        after: Duration,
    },
    /// Another call's connection attempt, which this call was waiting on,
    /// failed: trying again at once would only wait for the same peer.
    #[error("connecting to {addr} failed for a call queued before this one")]
    FailedWhileQueued {
        /// The endpoint.
        addr: SocketAddr,
    },
}

/// A pooled connection and when it was made.
struct Pooled {
    sender: SendRequest<Bytes>,
    /// Set by the connection's task when the connection has ended.
    closed: Arc<AtomicBool>,
    opened: Instant,
}

/// A typed upstream target and its state.
pub struct Endpoint {
    /// Its address.
    pub addr: SocketAddr,
    /// Its address as a request authority.
    pub authority: http::uri::Authority,
    /// How to reach it.
    pub transport: Transport,
    /// How connections are made and kept, and when it leaves rotation.
    settings: settings::Upstream,
    conn: ArcSwapOption<Pooled>,
    connecting: tokio::sync::Mutex<()>,
    /// Connection attempts that failed so far: a call that queued behind
    /// an attempt sees it move and fails over instead of trying again.
    failed_connects: AtomicU64,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is out of rotation.
    ejected_until: AtomicU64,
    epoch: Instant,
    /// Attempts in flight through the endpoint from this proxy.
    in_flight: AtomicU32,
    /// The peak-EWMA latency estimate.
    latency: std::sync::Mutex<PeakEwma>,
}

/// How fast a latency estimate forgets: the weight of an old sample
/// falls by e every this long (as Linkerd and Finagle do).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// A latency estimate that jumps to any slower sample at once and decays
/// towards faster ones (and, unobserved, towards zero) over
/// [`EWMA_DECAY`], so that a slow endpoint is avoided at once and tried
/// again after a while.
#[derive(Debug)]
struct PeakEwma {
    /// Nanoseconds.
    estimate: f64,
    at: Instant,
}

impl PeakEwma {
    /// The weight the estimate still has at `now`.
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (-elapsed / EWMA_DECAY.as_secs_f64()).exp()
    }

    fn decayed(&self, now: Instant) -> f64 {
        self.estimate * self.weight(now)
    }

    fn observe(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_nanos() as f64;
        if sample > self.estimate {
            self.estimate = sample;
        } else {
            let w = self.weight(now);
            self.estimate = self.estimate * w + sample * (1.0 - w);
        }
        self.at = now;
    }
}

/// An attempt in flight through an endpoint: counted while it lives.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
}

impl InFlight {
    /// The attempt answered (its response headers came): its latency
    /// feeds the endpoint's estimate, if `measured`.
    pub fn answered(self, measured: bool) {
        if !measured {
            return;
        }
        let now = Instant::now();
        self.endpoint
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(now - self.started, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// What happened to one call through an endpoint, for ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (whatever the status, bar UNAVAILABLE).
    Success,
    /// The call failed in a way that says the endpoint is unwell.
    Failure,
    /// It could not be reached at all: out of rotation at once.
    Unreachable,
}

impl Endpoint {
    /// A new endpoint, with no connection yet and the default settings.
    #[cfg(test)]
    pub fn new(addr: SocketAddr, transport: Transport) -> Arc<Self> {
        Self::with_settings(addr, transport, settings::Upstream::default())
    }

    /// A new endpoint whose connection attempts take at most
    /// `settings.connect_timeout` (less when a call has less time left),
    /// whose connections take new calls for `settings.max_age`, and which
    /// leaves rotation as `settings.ejection` says.
    pub fn with_settings(
        addr: SocketAddr,
        transport: Transport,
        settings: settings::Upstream,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr,
            authority: http::uri::Authority::try_from(addr.to_string())
                .expect("ip:port is an authority"),
            transport,
            settings,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            failed_connects: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            latency: std::sync::Mutex::new(PeakEwma {
                estimate: 0.0,
                at: Instant::now(),
            }),
        })
    }

    /// Counts an attempt in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
        }
    }

    /// Whether a pooled connection is open for new calls.
    pub fn connected(&self) -> bool {
        self.conn
            .load()
            .as_deref()
            .is_some_and(|pooled| self.takes_calls(pooled))
    }

    /// Attempts in flight through the endpoint now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The peak-EWMA cost of sending the endpoint one more attempt: its
    /// latency estimate times the attempts it would then have in flight.
    /// An endpoint with no estimate yet costs nothing while idle (so new
    /// endpoints are tried) and the most while busy (so they are not
    /// flooded before their first answer).
    pub fn cost(&self, now: Instant) -> f64 {
        let in_flight = self.in_flight() as f64;
        let estimate = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decayed(now);
        if estimate < 1.0 && in_flight > 0.0 {
            return f64::MAX / 2.0;
        }
        estimate * (in_flight + 1.0)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the endpoint is in rotation now (an endpoint whose ejection
    /// has run out is back in, on probation: one more failure ejects it
    /// for longer).
    pub fn available(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Records how a call went; returns true when this took the endpoint
    /// out of rotation.
    pub fn record(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Success => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                if self.ejections.load(Ordering::Relaxed) != 0 {
                    self.ejections.store(0, Ordering::Relaxed);
                }
                false
            }
            Outcome::Failure | Outcome::Unreachable => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let on_probation = self.ejections.load(Ordering::Relaxed) > 0;
                let ejection = self.settings.ejection;
                if outcome == Outcome::Unreachable || failures >= ejection.failures || on_probation
                {
                    if !self.available() {
                        return false;
                    }
                    let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(5);
                    let period = (ejection.base * 2u32.pow(n)).min(ejection.max);
                    self.ejected_until
                        .store(self.now_ms() + period.as_millis() as u64, Ordering::Relaxed);
                    self.failures.store(0, Ordering::Relaxed);
                    tracing::info!(endpoint.addr = %self.addr, eject_ms = period.as_millis() as u64, "endpoint ejected");
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A sender on the endpoint's pooled connection, connecting first if
    /// there is none (one connection attempt at a time per endpoint),
    /// within the configured connect timeout, for a call that must end by
    /// `deadline` (if it has one): waiting
    /// for a connection takes at most the connect timeout and at most half
    /// the time left, so that a peer that accepts and never answers leaves
    /// the call time to be sent elsewhere. Every error means the request
    /// never left.
    pub async fn sender_by(
        &self,
        deadline: Option<Instant>,
    ) -> Result<SendRequest<Bytes>, ConnectError> {
        match self.pooled() {
            Some(sender) => Ok(sender),
            // Boxed: connecting (TCP, TLS, HTTP/2) is a future of several
            // KiB that the pooled path, taken by nearly every call, would
            // otherwise carry and copy with every call's future.
            None => Box::pin(self.connect_by(deadline)).await,
        }
    }

    /// [`Self::sender_by`] when there is no pooled connection.
    async fn connect_by(
        &self,
        deadline: Option<Instant>,
    ) -> Result<SendRequest<Bytes>, ConnectError> {
        let started = Instant::now();
        let bound = connect_bound(&self.settings, deadline, started);
        let addr = self.addr;
        let timed_out = || ConnectError::TimedOut { addr, after: bound };
        let failed_before = self.failed_connects.load(Ordering::Acquire);
        // The bound covers queueing behind another call's attempt too: a
        // call must not wait out a handshake it did not start either.
        let Ok(_connecting) = tokio::time::timeout(bound, self.connecting.lock()).await else {
            return Err(timed_out());
        };
        if let Some(sender) = self.pooled() {
            return Ok(sender);
        }
        if self.failed_connects.load(Ordering::Acquire) != failed_before {
            return Err(ConnectError::FailedWhileQueued { addr });
        }
        let left = bound.saturating_sub(started.elapsed());
        let connected = match tokio::time::timeout(left, self.connect()).await {
            Ok(connected) => connected,
            Err(_) => Err(timed_out()),
        };
        match connected {
            Ok((sender, closed)) => {
                // Replacing an aged connection drops the pool's handle on
                // it: h2 closes it once the calls still on it are done.
                self.conn.store(Some(Arc::new(Pooled {
                    sender: sender.clone(),
                    closed,
                    opened: Instant::now(),
                })));
                Ok(sender)
            }
            Err(e) => {
                // Counted while the lock is held, so that every call
                // queued behind this attempt sees it. (An attempt dropped
                // because its caller went away is not counted: the next
                // call simply tries again.)
                self.failed_connects.fetch_add(1, Ordering::Release);
                Err(e)
            }
        }
    }

    /// The pooled connection, if it is still open and young enough for
    /// new calls.
    fn pooled(&self) -> Option<SendRequest<Bytes>> {
        self.conn
            .load()
            .as_deref()
            .filter(|pooled| self.takes_calls(pooled))
            .map(|pooled| pooled.sender.clone())
    }

    /// Whether `pooled` is still open and young enough for new calls.
    fn takes_calls(&self, pooled: &Pooled) -> bool {
        !pooled.closed.load(Ordering::Acquire)
            && self
                .settings
                .max_age
                .is_none_or(|max| pooled.opened.elapsed() < max)
    }

    /// Forgets the pooled connection (it failed).
    pub fn reset(&self) {
        self.conn.store(None);
    }

    async fn connect(&self) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), ConnectError> {
        let addr = self.addr;
        let io_err = |source| ConnectError::Io { addr, source };
        let connected = match &self.transport {
            // Bounded by the caller (`sender_by`), TCP to HTTP/2 as one.
            Transport::H2c => {
                let tcp = TcpStream::connect(addr).await.map_err(io_err)?;
                let _ = tcp.set_nodelay(true);
                http2(&self.settings, addr, tcp).await
            }
            Transport::Mtls { config, .. } => {
                let tls = trellis::tls::connect(addr, config.clone())
                    .await
                    .map_err(io_err)?;
                http2(&self.settings, addr, tls).await
            }
        };
        connected.map_err(|source| ConnectError::Http2 { addr, source })
    }
}

/// How long one connection attempt may take: the configured timeout, and
/// at most a share of the time left before `deadline` (but never nothing:
/// with no time left the call's own deadline ends it first).
fn connect_bound(
    settings: &settings::Upstream,
    deadline: Option<Instant>,
    now: Instant,
) -> Duration {
    let configured = settings.connect_timeout;
    match deadline {
        Some(deadline) => configured
            .min(deadline.saturating_duration_since(now) / settings.connect_share_of_deadline)
            .max(Duration::from_millis(1)),
        None => configured,
    }
}

/// The HTTP/2 handshake on a connected stream. The connection is driven
/// by its own task, which also pings an idle peer (keep-alive) and sets
/// the returned flag when the connection has ended.
async fn http2<IO>(
    settings: &settings::Upstream,
    addr: SocketAddr,
    io: IO,
) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), h2::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(settings.windows.stream)
        .initial_connection_window_size(settings.windows.connection)
        .max_header_list_size(settings.max_header_list_size)
        .handshake(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn(drive(addr, conn, closed.clone(), *settings));
    Ok((sender, closed))
}

/// Drives one upstream connection until it ends: the peer closed it, it
/// failed, its last handle and stream are gone, or a keep-alive ping went
/// unanswered.
async fn drive<IO>(
    addr: SocketAddr,
    mut conn: h2::client::Connection<IO, Bytes>,
    closed: Arc<AtomicBool>,
    settings: settings::Upstream,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    crate::metrics::get().connection_opened("upstream");
    let ping = conn.ping_pong();
    let keep_alive = async {
        let Some(mut ping) = ping else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(settings.keep_alive_interval).await;
            let pong =
                tokio::time::timeout(settings.keep_alive_timeout, ping.ping(h2::Ping::opaque()))
                    .await;
            if !matches!(pong, Ok(Ok(_))) {
                return "a keep-alive ping went unanswered";
            }
        }
    };
    tokio::select! {
        ended = &mut conn => {
            if let Err(error) = ended {
                tracing::debug!(endpoint.addr = %addr, error = %crate::layer::endpoint::describe(&error), "upstream connection ended");
            }
        }
        why = keep_alive => tracing::debug!(endpoint.addr = %addr, reason = why, "upstream connection closed"),
    }
    closed.store(true, Ordering::Release);
    crate::metrics::get().connection_closed("upstream");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        Endpoint::new("127.0.0.1:9".parse().unwrap(), Transport::H2c)
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_eject_for_a_growing_interval() {
        let e = endpoint();
        let ejection = settings::Ejection::default();
        for _ in 0..ejection.failures - 1 {
            assert!(!e.record(Outcome::Failure));
        }
        assert!(e.available());
        assert!(e.record(Outcome::Failure));
        assert!(!e.available());
        tokio::time::advance(ejection.base + Duration::from_millis(10)).await;
        assert!(e.available(), "back in rotation on probation");
        assert!(
            e.record(Outcome::Failure),
            "one failure on probation ejects again"
        );
        tokio::time::advance(ejection.base + Duration::from_millis(10)).await;
        assert!(!e.available(), "the second ejection lasts longer");
        tokio::time::advance(ejection.base).await;
        assert!(e.available());
        e.record(Outcome::Success);
        assert!(!e.record(Outcome::Failure), "a success ends probation");
    }

    #[test]
    fn a_connection_attempt_leaves_time_for_another_endpoint() {
        let now = Instant::now();
        let settings = settings::Upstream {
            connect_timeout: Duration::from_secs(1),
            ..settings::Upstream::default()
        };
        let configured = settings.connect_timeout;
        assert_eq!(connect_bound(&settings, None, now), configured);
        assert_eq!(
            connect_bound(&settings, Some(now + Duration::from_secs(10)), now),
            configured,
            "a distant deadline leaves the configured bound"
        );
        assert_eq!(
            connect_bound(&settings, Some(now + Duration::from_millis(600)), now),
            Duration::from_millis(300),
            "half of what is left"
        );
        assert_eq!(
            connect_bound(&settings, Some(now), now + Duration::from_secs(1)),
            Duration::from_millis(1),
            "a past deadline still makes a (tiny) bound, not a panic"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_endpoint_is_ejected_at_once() {
        let e = endpoint();
        assert!(e.record(Outcome::Unreachable));
        assert!(!e.available());
    }
}
