//! `trellis-archive`: the usage archive server and its check and restore
//! commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis::cli::{exit_with, parse_duration};
use trellis_archive::serve::ServeConfig;
use trellis_archive::store::StoreOptions;
use trellis_archive::writer::RollPolicy;

const PROGRAM: &str = "trellis-archive";

/// The Trellis usage archive: every usage record, once, in date-partitioned,
/// compressed JSON-lines files.
#[derive(Debug, Parser)]
#[command(name = PROGRAM, version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive "usage.recorded" events (telco.archive.v1.ArchiveEventsService)
    /// and write each record once; serve telco.archive.v1.ArchiveService.
    Serve(ServeArgs),
    /// Compare the archive with usage's usage_records table: exit 0 if they
    /// hold exactly the same records, each archived once; else list the
    /// differences (the first 20 of each kind) and exit 1.
    Check(DatabaseArgs),
    /// Insert every archived record into usage's usage_records table, which
    /// must exist (usage creates it at start-up) and be empty; one
    /// transaction, all or nothing. Outbox events are not re-created: the
    /// services downstream of usage already applied them.
    Restore(DatabaseArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The archive directory (created if missing).
    #[arg(long, env = "TRELLIS_ARCHIVE_DIR", value_name = "DIR")]
    dir: PathBuf,
    /// Loopback address to serve gRPC on (plaintext h2c; its sidecar fronts it).
    #[arg(long, env = "TRELLIS_LISTEN", value_name = "ADDR")]
    listen: SocketAddr,
    /// The own sidecar's outbound port. Accepted so that every service
    /// starts with the same flags; unused, as the archive calls no other
    /// service.
    #[arg(long, env = "TRELLIS_OUTBOUND", value_name = "ADDR")]
    outbound: Option<SocketAddr>,
    /// How long in-flight calls may take to finish after SIGTERM (e.g. `10s`).
    #[arg(long, env = "TRELLIS_GRACE", default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
    /// Roll the journal into day files once it holds this many records.
    #[arg(long, env = "TRELLIS_ARCHIVE_ROLL_RECORDS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    roll_records: u64,
    /// Roll the journal once its oldest record is this old (e.g. `10s`).
    #[arg(long, env = "TRELLIS_ARCHIVE_ROLL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    roll_interval: Duration,
    /// Most event keys (users) whose last archived sequence is remembered;
    /// events of further keys are refused (RESOURCE_EXHAUSTED) until raised.
    #[arg(long, env = "TRELLIS_ARCHIVE_MAX_KEYS", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_keys: u64,
}

#[derive(Debug, clap::Args)]
struct DatabaseArgs {
    /// The archive directory.
    #[arg(long, env = "TRELLIS_ARCHIVE_DIR", value_name = "DIR")]
    dir: PathBuf,
    /// Usage's database (postgres://...).
    #[arg(long, env = "TRELLIS_DATABASE_URL", value_name = "URL")]
    database_url: String,
}

#[tokio::main]
async fn main() {
    let _telemetry =
        trellis::telemetry::init_traced("archive", "warn,trellis=info,trellis_archive=info");
    match Args::parse().command {
        Command::Serve(args) => {
            let _ = args.outbound;
            if args.roll_interval.is_zero() {
                exit_with(PROGRAM, &"--roll-interval must be more than zero");
            }
            if !args.listen.ip().is_loopback() {
                exit_with(
                    PROGRAM,
                    &format!(
                        "--listen {} is not a loopback address: the archive serves plaintext behind its sidecar",
                        args.listen
                    ),
                );
            }
            let config = ServeConfig {
                dir: args.dir,
                listen: args.listen,
                grace: args.grace,
                roll: RollPolicy {
                    records: usize::try_from(args.roll_records).unwrap_or(usize::MAX),
                    interval: args.roll_interval,
                },
                store: StoreOptions {
                    max_keys: usize::try_from(args.max_keys).unwrap_or(usize::MAX),
                },
            };
            if let Err(e) = trellis_archive::serve::serve(config).await {
                exit_with(PROGRAM, &format!("{e:#}"));
            }
        }
        Command::Check(args) => {
            let comparison = trellis_archive::check::check(&args.dir, &args.database_url)
                .await
                .unwrap_or_else(|e| exit_with(PROGRAM, &format!("{e:#}")));
            print!("{}", comparison.report());
            if !comparison.agrees() {
                eprintln!("{PROGRAM}: {}", comparison.summary());
                std::process::exit(1);
            }
        }
        Command::Restore(args) => {
            let restored = trellis_archive::restore::restore(&args.dir, &args.database_url)
                .await
                .unwrap_or_else(|e| exit_with(PROGRAM, &format!("{e:#}")));
            println!(
                "restored {restored} usage records into usage_records (outbox events are not re-created)"
            );
        }
    }
}
