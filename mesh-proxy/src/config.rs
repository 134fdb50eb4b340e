//! The proxy's configuration: flags and `TRELLIS_PROXY_*` environment
//! variables, parsed and checked once at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use trellis::cli::{IdentityArgs, RegistryTargets};
use trellis::identity::SpiffeId;

use crate::discovery::StaticRoute;

/// The Trellis sidecar and edge: carries every call between the service
/// beside it and the rest of the mesh, over mTLS, with discovery,
/// round-robin balancing, deadlines, retries and ejection; with --edge, the
/// mesh's front door for outside clients (gRPC, gRPC-Web, JSON; reflection
/// and health for the whole mesh; API keys, JWTs and rate limits).
#[derive(Debug, Parser)]
#[command(name = "mesh-proxy", version, about, long_about = None)]
pub struct Args {
    /// The local service (plaintext h2c, usually on loopback). Omit for a
    /// proxy that only sends calls out (a client with no server).
    #[arg(long, env = "TRELLIS_PROXY_APP")]
    pub app: Option<SocketAddr>,

    /// Where the local service sends its calls to the mesh (h2c; keep it
    /// on loopback).
    #[arg(long, env = "TRELLIS_PROXY_OUTBOUND", default_value = "127.0.0.1:4140")]
    pub outbound: SocketAddr,

    /// Where other sidecars reach the local service (mTLS).
    #[arg(long, env = "TRELLIS_PROXY_INBOUND", default_value = "127.0.0.1:4143")]
    pub inbound: SocketAddr,

    /// The inbound address registered for peers to dial, when it differs
    /// from --inbound (e.g. --inbound 0.0.0.0:4143). Default: --inbound.
    #[arg(long, env = "TRELLIS_PROXY_ADVERTISE")]
    pub advertise: Option<SocketAddr>,

    /// The admin port: /metrics, /live, /ready (plain HTTP).
    #[arg(long, env = "TRELLIS_PROXY_ADMIN", default_value = "127.0.0.1:4191")]
    pub admin: SocketAddr,

    /// The registry (Registry and Config APIs, mTLS): `host:port`, or
    /// several replicas comma-separated (at most 16; DNS names resolved on
    /// every connection). The proxy uses one at a time and moves to the
    /// next when it fails or says it cannot serve. Without it only
    /// --static-route endpoints are known and nothing is registered.
    #[arg(long, env = "TRELLIS_PROXY_REGISTRY", value_parser = RegistryTargets::parse)]
    pub registry: Option<RegistryTargets>,

    /// The SPIFFE ID the registry must present. Default: service
    /// `registry` in this proxy's own trust domain and namespace.
    #[arg(long, env = "TRELLIS_PROXY_REGISTRY_IDENTITY")]
    pub registry_identity: Option<SpiffeId>,

    /// The local service's gRPC services, comma-separated, when it has no
    /// server reflection. Default: listed through its reflection.
    #[arg(long, env = "TRELLIS_PROXY_GRPC_SERVICES", value_delimiter = ',')]
    pub grpc_services: Vec<String>,

    /// A fixed route, `SERVICE=URL[,URL...]`: a gRPC service (or `*` for
    /// every service not otherwise known) served by fixed endpoints;
    /// `http://ip:port` is h2c, `https://ip:port` is mesh mTLS (any
    /// identity of this trust domain). Repeatable; in the environment,
    /// separate routes with `;`.
    #[arg(long = "static-route", env = "TRELLIS_PROXY_STATIC_ROUTES", value_delimiter = ';', value_parser = parse_static_route)]
    pub static_routes: Vec<StaticRoute>,

    /// The registration's lease time to live (e.g. `10s`); renewed every
    /// third of it.
    #[arg(long, env = "TRELLIS_PROXY_LEASE_TTL", default_value = "10s", value_parser = trellis::cli::parse_duration)]
    pub lease_ttl: Duration,

    /// After SIGTERM and deregistration, how long to keep serving new calls
    /// while peers see the instance go (e.g. `2s`).
    #[arg(long, env = "TRELLIS_PROXY_DRAIN_DELAY", default_value = "2s", value_parser = trellis::cli::parse_duration)]
    pub drain_delay: Duration,

    /// The longest a connection to an endpoint (TCP, mTLS and HTTP/2
    /// handshakes) may take before the call is sent to another endpoint
    /// (e.g. `1s`); a call with less time left waits at most half of it.
    /// A mesh peer answers in milliseconds: one that accepts and has not
    /// finished its handshake in a second is unlikely to.
    #[arg(long, env = "TRELLIS_PROXY_CONNECT_TIMEOUT", default_value = "1s", value_parser = trellis::cli::parse_duration)]
    pub connect_timeout: Duration,

    /// How long a connection to a peer takes new calls (e.g. `5m`). After
    /// it, new calls open a fresh connection, whose handshake checks the
    /// peer's certificate again (expired, or issued by a CA since dropped
    /// from the bundle), while calls in flight on the old one finish
    /// there. At least 1s.
    #[arg(long, env = "TRELLIS_PROXY_MAX_CONNECTION_AGE", default_value = "5m", value_parser = trellis::cli::parse_duration)]
    pub max_connection_age: Duration,

    /// Then how long calls in flight may take to finish (e.g. `10s`).
    #[arg(long, env = "TRELLIS_PROXY_GRACE", default_value = "10s", value_parser = trellis::cli::parse_duration)]
    pub grace: Duration,

    /// Version label registered with the instance.
    #[arg(
        long = "service-version",
        env = "TRELLIS_PROXY_SERVICE_VERSION",
        default_value = ""
    )]
    pub service_version: String,

    /// Zone label registered with the instance.
    #[arg(long, env = "TRELLIS_PROXY_ZONE", default_value = "")]
    pub zone: String,

    /// A label registered with the instance, `KEY=VALUE` (repeatable; in
    /// the environment, separate them with `;`), e.g. `instance=usage-1`.
    /// At most 64, keys of 1 to 63 bytes, values up to 1,024 bytes (the
    /// registry's limits).
    #[arg(long = "metadata", env = "TRELLIS_PROXY_METADATA", value_delimiter = ';', value_parser = parse_metadata)]
    pub metadata: Vec<(String, String)>,

    /// Services (SPIFFE service names, comma-separated) whose calls may
    /// carry an external caller in `x-trellis-principal`: the edges. From
    /// anyone else the header is removed.
    #[arg(
        long = "trusted-edge",
        env = "TRELLIS_PROXY_TRUSTED_EDGES",
        value_delimiter = ',',
        default_value = "edge"
    )]
    pub trusted_edges: Vec<String>,

    /// Edge mode: listen here for clients outside the mesh (gRPC over
    /// HTTP/2, gRPC-Web and JSON over HTTP/1.1 or HTTP/2). Plaintext
    /// unless --edge-tls-cert and --edge-tls-key are given.
    #[arg(long, env = "TRELLIS_PROXY_EDGE")]
    pub edge: Option<SocketAddr>,

    /// The edge's TLS certificate chain (PEM), with --edge-tls-key: the
    /// name external clients check, not a mesh identity.
    #[arg(long, env = "TRELLIS_PROXY_EDGE_TLS_CERT")]
    pub edge_tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of --edge-tls-cert.
    #[arg(long, env = "TRELLIS_PROXY_EDGE_TLS_KEY")]
    pub edge_tls_key: Option<std::path::PathBuf>,

    /// Who may call through the edge, and how often (TOML; see README).
    /// Without it every call, reflection and health are public and
    /// unlimited: fine on a laptop, not in production.
    #[arg(long, env = "TRELLIS_PROXY_EDGE_POLICY")]
    pub edge_policy: Option<std::path::PathBuf>,

    /// Largest JSON request body the edge reads, in bytes.
    #[arg(long, env = "TRELLIS_PROXY_EDGE_MAX_JSON_BODY", default_value_t = 4 * 1024 * 1024)]
    pub edge_max_json_body: usize,

    /// Largest gRPC message the edge reads from the mesh to answer a JSON
    /// call, in bytes; a larger one (whatever its length prefix claims)
    /// is answered 500 INTERNAL without being read.
    #[arg(long, env = "TRELLIS_PROXY_EDGE_MAX_JSON_RESPONSE", default_value_t = 4 * 1024 * 1024)]
    pub edge_max_json_response: usize,

    /// Most connections open at once on each of the outbound, inbound and
    /// edge ports; one more is closed as soon as it is accepted (counted
    /// in `trellis_proxy_connections_refused_total`).
    #[arg(long, env = "TRELLIS_PROXY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Origins allowed to call through the edge from a browser (gRPC-Web
    /// and JSON; comma-separated, e.g. `https://app.example.com`).
    /// Default: any origin.
    #[arg(
        long = "edge-cors-origin",
        env = "TRELLIS_PROXY_EDGE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub edge_cors_origins: Vec<String>,

    /// Threads that carry calls. 1 (the default) runs the whole proxy on
    /// one thread, which suits a sidecar: it costs least CPU per call and
    /// memory. An edge in front of many clients may use more (e.g. the
    /// machine's cores).
    #[arg(long, env = "TRELLIS_PROXY_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// Most `--metadata` labels (the registry refuses more).
pub const MAX_METADATA: usize = 64;

/// Parses `KEY=VALUE` within the registry's limits.
fn parse_metadata(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() || key.len() > 63 {
        return Err(format!("{text:?}: the key must be 1 to 63 bytes"));
    }
    if value.len() > 1024 {
        return Err(format!("{text:?}: the value is over 1,024 bytes"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses `SERVICE=URL[,URL...]`.
pub fn parse_static_route(text: &str) -> Result<StaticRoute, String> {
    let (service, urls) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected SERVICE=URL[,URL...]"))?;
    let service = service.trim();
    if service.is_empty() {
        return Err(format!("{text:?}: the service name is empty"));
    }
    let mut endpoints = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (tls, addr) = if let Some(a) = url.strip_prefix("http://") {
            (false, a)
        } else if let Some(a) = url.strip_prefix("https://") {
            (true, a)
        } else {
            return Err(format!(
                "{url:?}: endpoints start with http:// (h2c) or https:// (mTLS)"
            ));
        };
        let addr: SocketAddr = addr
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("{url:?}: not ip:port ({e})"))?;
        endpoints.push((addr, tls));
    }
    if endpoints.is_empty() {
        return Err(format!("{text:?}: no endpoints given"));
    }
    Ok(StaticRoute {
        service: service.to_owned(),
        endpoints,
    })
}

impl Args {
    /// Cross-field rules, checked before anything starts; every problem is
    /// listed.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let ports = [
            ("--outbound", Some(self.outbound)),
            ("--inbound", self.app.map(|_| self.inbound)),
            ("--admin", Some(self.admin)),
            ("--edge", self.edge),
        ];
        for (i, (a, x)) in ports.iter().enumerate() {
            for (b, y) in &ports[i + 1..] {
                if let (Some(x), Some(y)) = (x, y)
                    && x == y
                    && x.port() != 0
                {
                    problems.push(format!("{a} and {b} are both {x}"));
                }
            }
        }
        if let Some(app) = self.app
            && (app == self.inbound || app == self.outbound)
        {
            problems.push(format!("--app {app} is one of the proxy's own ports"));
        }
        if self.registry.is_none() && self.static_routes.is_empty() {
            problems.push(
                "nothing to route to: give --registry or at least one --static-route".to_owned(),
            );
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > Duration::from_secs(3600) {
            problems.push(format!(
                "--lease-ttl {:?} is outside 1s..=1h",
                self.lease_ttl
            ));
        }
        if self.connect_timeout < Duration::from_millis(10)
            || self.connect_timeout > Duration::from_secs(60)
        {
            problems.push(format!(
                "--connect-timeout {:?} is outside 10ms..=60s",
                self.connect_timeout
            ));
        }
        if self.max_connection_age < Duration::from_secs(1) {
            problems.push(format!(
                "--max-connection-age {:?} is under 1s",
                self.max_connection_age
            ));
        }
        if self.edge_tls_cert.is_some() != self.edge_tls_key.is_some() {
            problems.push("--edge-tls-cert and --edge-tls-key go together".to_owned());
        }
        if self.metadata.len() > MAX_METADATA {
            problems.push(format!(
                "{} --metadata labels; the registry takes at most {MAX_METADATA}",
                self.metadata.len()
            ));
        }
        if self.edge.is_none()
            && (self.edge_tls_cert.is_some()
                || self.edge_policy.is_some()
                || !self.edge_cors_origins.is_empty())
        {
            problems.push("--edge-* settings need --edge ADDR".to_owned());
        }
        for origin in &self.edge_cors_origins {
            if http::HeaderValue::from_str(origin).is_err()
                || !(origin.starts_with("http://") || origin.starts_with("https://"))
            {
                problems.push(format!(
                    "--edge-cors-origin {origin:?} is not an origin (https://host[:port])"
                ));
            }
        }
        if self.edge_max_json_body == 0 {
            problems.push("--edge-max-json-body must be above 0".to_owned());
        }
        if self.edge_max_json_response == 0 {
            problems.push("--edge-max-json-response must be above 0".to_owned());
        }
        if self.max_connections == 0 {
            problems.push("--max-connections must be above 0".to_owned());
        }
        for s in &self.grpc_services {
            if s.is_empty() || s.contains('/') || !s.contains('.') {
                problems.push(format!(
                    "--grpc-services: {s:?} is not a qualified gRPC service name (package.Service)"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        let mut all = vec![
            "mesh-proxy",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--ca",
            "ca.pem",
        ];
        all.extend_from_slice(args);
        Args::try_parse_from(all).unwrap()
    }

    #[test]
    fn static_routes_parse_and_bad_ones_are_named() {
        let r = parse_static_route("a.v1.S=http://127.0.0.1:1,https://127.0.0.1:2").unwrap();
        assert_eq!(r.service, "a.v1.S");
        assert_eq!(r.endpoints.len(), 2);
        assert!(r.endpoints[1].1);
        for bad in [
            "a.v1.S",
            "=http://127.0.0.1:1",
            "a=ftp://x",
            "a=http://nohost",
            "a=",
        ] {
            let e = parse_static_route(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(
            parse_static_route("a=tcp://1.2.3.4:5")
                .unwrap_err()
                .contains("http://")
        );
    }

    #[test]
    fn metadata_labels_parse_within_the_registry_limits() {
        let args = parse(&[
            "--registry",
            "127.0.0.1:7000",
            "--metadata",
            "instance=usage-1",
            "--metadata",
            "team=billing=core",
        ]);
        assert_eq!(
            args.metadata,
            [
                ("instance".to_owned(), "usage-1".to_owned()),
                ("team".to_owned(), "billing=core".to_owned())
            ]
        );
        assert!(parse_metadata("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_metadata("=x").unwrap_err().contains("1 to 63"));
        assert!(
            parse_metadata(&format!("k={}", "v".repeat(1025)))
                .unwrap_err()
                .contains("1,024")
        );
        let many: Vec<String> = (0..65).map(|i| format!("k{i}=v")).collect();
        let mut flags = vec!["--registry", "127.0.0.1:7000"];
        for m in &many {
            flags.extend(["--metadata", m]);
        }
        assert!(
            parse(&flags)
                .problems()
                .iter()
                .any(|p| p.contains("at most 64"))
        );
    }

    #[test]
    fn cross_field_problems_are_all_listed() {
        let args = parse(&[
            "--outbound",
            "127.0.0.1:5000",
            "--admin",
            "127.0.0.1:5000",
            "--lease-ttl",
            "100ms",
            "--connect-timeout",
            "0s",
        ]);
        let problems = args.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("--outbound and --admin")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("nothing to route to")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("--lease-ttl")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("--connect-timeout")),
            "{problems:?}"
        );
        assert!(
            parse(&["--registry", "127.0.0.1:7000"])
                .problems()
                .is_empty()
        );
    }

    #[test]
    fn bad_values_are_refused_with_their_flag() {
        let e = Args::try_parse_from([
            "mesh-proxy",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "a",
            "--grace",
            "soon",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--grace") && e.contains("soon"), "{e}");
    }
}
