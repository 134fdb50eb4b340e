//! The echo service: the mesh's own test and benchmark workload
//! (`trellis.echo.v1.EchoService`).
//!
//! It listens on loopback (h2c) behind its sidecar, with grpc.health.v1 and
//! server reflection, and drains on SIGTERM within the grace period.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use trellis::cli::exit_with;
use trellis_echo::{EchoServer, EchoServiceServer, Faults};

/// The Trellis echo service, a test and benchmark workload.
#[derive(Debug, Parser)]
#[command(name = "trellis-echo", version, about)]
struct Args {
    /// Address to serve gRPC on (plaintext h2c; its sidecar fronts it).
    #[arg(long, env = "TRELLIS_ECHO_LISTEN", default_value = "127.0.0.1:7200")]
    listen: SocketAddr,
    /// Instance name carried by every response; defaults to the listen
    /// address.
    #[arg(long, env = "TRELLIS_ECHO_NAME")]
    name: Option<String>,
    /// How long in-flight calls may take to finish after SIGTERM (e.g. `5s`).
    #[arg(long, env = "TRELLIS_ECHO_GRACE", default_value = "5s", value_parser = trellis::cli::parse_duration)]
    grace: Duration,
    /// If set, EchoService and the server as a whole ("") turn NOT_SERVING
    /// in grpc.health.v1 this long after start-up (e.g. `2s`), to test
    /// health-based routing. Unset, they stay SERVING.
    #[arg(long, env = "TRELLIS_ECHO_NOT_SERVING_AFTER", value_parser = trellis::cli::parse_duration)]
    not_serving_after: Option<Duration>,
    /// Fault at start: delay added before every call answers (e.g.
    /// `200ms`), at most `1h`. Inject calls replace the faults later.
    #[arg(long, env = "TRELLIS_ECHO_DELAY", default_value = "0s", value_parser = trellis::cli::parse_duration)]
    delay: Duration,
    /// Fault at start: the gRPC status code (1 to 16, e.g. 14 for
    /// UNAVAILABLE) the failing share of calls fails with; 0 fails none.
    #[arg(long, env = "TRELLIS_ECHO_FAIL_CODE", default_value_t = 0)]
    fail_code: i32,
    /// Fault at start: the share of calls (0 to 1) that fail with
    /// `--fail-code`; 1 fails every call.
    #[arg(long, env = "TRELLIS_ECHO_FAIL_RATIO", default_value_t = 0.0)]
    fail_ratio: f64,
}

#[tokio::main]
async fn main() {
    let _telemetry = trellis::telemetry::init_traced("echo", "warn,trellis=info,trellis_echo=info");
    let args = Args::parse();
    let faults =
        Faults::new(args.delay, args.fail_code, args.fail_ratio).unwrap_or_else(|invalid| {
            // Every bad value at once, by the flag that set it.
            let problems: Vec<String> = invalid
                .0
                .iter()
                .map(|v| format!("--{}: {}", v.field.replace('_', "-"), v.description))
                .collect();
            exit_with("trellis-echo", &problems.join("; "))
        });
    let name = args.name.unwrap_or_else(|| args.listen.to_string());
    tracing::info!(instance = %name, ?faults, "starting echo service");

    let echo = EchoServer::new(name).with_faults(faults);
    let (router, health) = trellis_echo::router(echo).await;
    if let Some(after) = args.not_serving_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            health
                .set_not_serving::<EchoServiceServer<EchoServer>>()
                .await;
            // The server as a whole ("") too: that is what sidecars follow.
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            tracing::info!(
                service = trellis_echo::SERVICE_NAME,
                "health now NOT_SERVING"
            );
        });
    }

    if let Err(e) = trellis::server::run_plaintext("echo", args.listen, args.grace, router).await {
        exit_with("trellis-echo", &format!("{e:#}"));
    }
}
