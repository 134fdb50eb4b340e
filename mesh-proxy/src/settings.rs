//! Everything the proxy is tuned by, in one typed value built once from
//! the flags ([`Settings::from_args`]) and handed to the parts that use
//! it: the listeners, the connections to endpoints, ejection, the retry
//! layer, and how the control plane and the local service are followed.
//! The defaults are here, with the reason for each.

use std::time::Duration;

use crate::config::Args;

/// The proxy's settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The listeners (outbound, inbound, edge).
    pub server: Server,
    /// Connections to endpoints: peers, static upstreams, the local
    /// service.
    pub upstream: Upstream,
    /// The retry layer's own limits (the policy comes from config).
    pub retry: RetryLimits,
    /// Following the registry and the local service.
    pub control: ControlPlane,
}

/// How listeners serve HTTP/2 (and, at the edge, HTTP/1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Server {
    /// Largest header block a peer may send
    /// (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// A connection that has not sent a single request by then is closed
    /// (slow-loris protection); after its first request, keep-alive pings
    /// find dead peers.
    pub first_request_timeout: Duration,
    /// How often an idle connection is pinged.
    pub keep_alive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keep_alive_timeout: Duration,
    /// Largest HTTP/1.1 read buffer (request line and headers) at the edge.
    pub http1_max_buf: usize,
    /// Most connections open at once per port (`--max-connections`).
    pub max_connections: usize,
    /// Most connections open at once on the admin port (probes and
    /// Prometheus, not callers).
    pub admin_max_connections: usize,
}

/// How connections to an endpoint are made and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The longest one connection attempt (TCP, TLS and HTTP/2 handshakes)
    /// may take (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// A call with a deadline waits for a connection at most this share
    /// of its remaining time (as a divisor), leaving the rest for another
    /// endpoint.
    pub connect_share_of_deadline: u32,
    /// How long a connection takes new calls (`--max-connection-age`;
    /// `None`: as long as it stays open). After it, new calls go over a
    /// fresh connection, whose handshake checks the peer's certificate
    /// again, while calls in flight on the old one finish there.
    pub max_age: Option<Duration>,
    /// How often an idle connection is pinged.
    pub keep_alive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keep_alive_timeout: Duration,
    /// Largest response header block accepted from an endpoint.
    pub max_header_list_size: u32,
    /// HTTP/2 flow-control windows offered to endpoints.
    pub windows: Windows,
    /// When an endpoint leaves rotation.
    pub ejection: Ejection,
}

/// HTTP/2 flow-control windows: how much an endpoint may send on a
/// connection before the proxy has passed it on. Limits, not buffers
/// allocated up front; fixed, as large as an adaptive window grows to on a
/// fast network (measured the same as hyper's adaptive window on
/// loopback, bench/RESULTS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// Per stream.
    pub stream: u32,
    /// Per connection, all streams together.
    pub connection: u32,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            stream: 1024 * 1024,
            connection: 4 * 1024 * 1024,
        }
    }
}

/// When an endpoint is taken out of rotation, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failed calls that eject it (an unreachable endpoint is
    /// ejected at once).
    pub failures: u32,
    /// The first ejection; each further one in a row doubles.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
}

/// The retry layer's limits beyond each route's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryLimits {
    /// Attempts a request that never left may take whatever the policy:
    /// the endpoint did not see it, so sending it elsewhere is safe.
    pub max_unsent_attempts: u32,
    /// Retries allowed per second per upstream whatever the budget ratio,
    /// so a quiet service can still retry a lone failure.
    pub min_retries_per_second: u32,
    /// The window the budget ratio is measured over.
    pub budget_window: Duration,
}

/// How the proxy follows the registry and the local service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlPlane {
    /// Waits between attempts to watch the registry and its configs and
    /// to register the local service.
    pub reconnect: Backoff,
    /// How long an instance a restarted registry forgot is kept when its
    /// old lease's expiry is unknown.
    pub hold_without_lease: Duration,
    /// How often instances kept across a registry restart are checked for
    /// expiry.
    pub hold_check: Duration,
    /// How long connecting to the local service (health, reflection) may
    /// take.
    pub app_connect_timeout: Duration,
    /// How soon the local service's health is asked again after its
    /// health stream ended.
    pub app_health_retry: Duration,
    /// How soon the local service's reflection is asked again after it
    /// failed.
    pub app_reflection_retry: Duration,
}

/// A wait that doubles from `min` to `max` while a thing keeps failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait, and the wait again after a success.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after `current`.
    pub fn next(&self, current: Duration) -> Duration {
        (current * 2).clamp(self.min, self.max)
    }
}

impl Default for ControlPlane {
    fn default() -> Self {
        Self {
            reconnect: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            hold_without_lease: Duration::from_secs(30),
            hold_check: Duration::from_secs(1),
            app_connect_timeout: Duration::from_secs(2),
            app_health_retry: Duration::from_millis(200),
            app_reflection_retry: Duration::from_secs(1),
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Self {
            max_header_list_size: 16 * 1024,
            max_concurrent_streams: 1024,
            first_request_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            http1_max_buf: 64 * 1024,
            max_connections: 10_000,
            admin_max_connections: 256,
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            // A mesh peer answers in milliseconds: one that accepts and has
            // not finished its handshake in a second is unlikely to.
            connect_timeout: Duration::from_secs(1),
            connect_share_of_deadline: 2,
            max_age: None,
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(10),
            max_header_list_size: 64 * 1024,
            windows: Windows::default(),
            ejection: Ejection::default(),
        }
    }
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Default for RetryLimits {
    fn default() -> Self {
        Self {
            max_unsent_attempts: 3,
            min_retries_per_second: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// The settings `args` ask for (checked already by
    /// [`Args::problems`]).
    pub fn from_args(args: &Args) -> Self {
        let defaults = Self::default();
        Self {
            server: Server {
                max_connections: args.max_connections,
                ..defaults.server
            },
            upstream: Upstream {
                connect_timeout: args.connect_timeout,
                max_age: Some(args.max_connection_age),
                ..defaults.upstream
            },
            retry: defaults.retry,
            control: defaults.control,
        }
    }

    /// The local service's connection: plaintext on loopback, so there is
    /// no certificate to check again and no reason to age it out.
    pub fn app(&self) -> Upstream {
        Upstream {
            max_age: None,
            ..self.upstream
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn flags_reach_the_settings_and_the_rest_keeps_its_defaults() {
        let args = Args::try_parse_from([
            "mesh-proxy",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
            "--ca",
            "ca.pem",
            "--static-route",
            "*=http://127.0.0.1:9",
            "--connect-timeout",
            "250ms",
            "--max-connection-age",
            "1m",
            "--max-connections",
            "7",
        ])
        .unwrap();
        let s = Settings::from_args(&args);
        assert_eq!(s.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.upstream.max_age, Some(Duration::from_secs(60)));
        assert_eq!(s.server.max_connections, 7);
        assert_eq!(s.app().max_age, None);
        assert_eq!(s.retry, RetryLimits::default());
        assert_eq!(s.upstream.ejection, Ejection::default());
    }

    #[test]
    fn a_backoff_doubles_up_to_its_cap() {
        let b = ControlPlane::default().reconnect;
        let mut wait = b.min;
        let mut seen = vec![wait];
        for _ in 0..8 {
            wait = b.next(wait);
            seen.push(wait);
        }
        assert_eq!(seen[1], b.min * 2);
        assert_eq!(*seen.last().unwrap(), b.max);
    }
}
