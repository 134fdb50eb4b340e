//! Billing benchmark: sustained `telco.usage.v1.UsageService/RecordUsage`
//! through the edge, with the bills kept current behind it.
//!
//! Each round starts the billing system afresh (`BillingMesh`: registry,
//! user, two usage instances, settlement and the archive, each behind its
//! own sidecar, and an h2c edge) on new databases of the PostgreSQL server
//! that `TestDb` finds, creates `--users` users each subscribed to a plan of
//! the catalogue, waits until settlement has every subscription, then:
//!
//! 1. **load**: RecordUsage at a fixed rate (open loop: a pacing thread
//!    starts each call on its own task whatever the earlier ones are doing)
//!    for `--duration` over `--connections` HTTP/2 connections to the edge.
//!    Every call carries a deadline (`grpc-timeout`, and the load generator
//!    gives up at the same time). Progress is printed once a second.
//! 2. **drain**: after the last call has returned, the usage outbox is
//!    polled (`UsageOutboxService/GetOutboxStatus` through the edge) until
//!    no event waits for any subscriber, then every bill is checked against
//!    usage's own database, as the end-to-end test does (per user and month:
//!    used quantities per type and the total computed here from the plan).
//!    The times from the end of the load to both are reported.
//!
//! Reported per round: achieved rate (successful calls per second of load),
//! failures by status, RecordUsage latency (HDR histogram), the
//! dispatcher's delivery lag per subscriber (commit to acknowledgement,
//! p50/p99, from the instance that dispatches), CPU time per process group
//! over the load (utime+stime from /proc, PostgreSQL backends attributed to
//! their database by their process title), CPU µs per recorded call,
//! PostgreSQL commits and WAL syncs, what the processes logged, and the
//! machine's busy and steal time and context switches (/proc/stat). With
//! several rounds, a summary table with the medians follows. With
//! `--pg-sample`, what PostgreSQL's backends were busy with or waiting on
//! during the load (pg_stat_activity every 10 ms).
//!
//! Everything is on 127.0.0.1, every call has a deadline, and every phase
//! is bounded in time, so a round ends by itself. The mesh's binaries are
//! taken from this binary's directory: build the workspace in release mode
//! and run `target/release/billing_bench` (or `bench/billing.sh`).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::signal::unix::SignalKind;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis::pb::telco::settlement::v1 as settlement;
use trellis::pb::telco::usage::v1 as usage;
use trellis::pb::telco::user::v1 as user;
use trellis::pb::trellis::events::v1::{GetOutboxStatusRequest, GetOutboxStatusResponse};
use trellis_test_support::{BillingMesh, Databases, TestDb};

use settlement::settlement_service_client::SettlementServiceClient;
use usage::usage_outbox_service_client::UsageOutboxServiceClient;
use usage::usage_service_client::UsageServiceClient;
use user::user_outbox_service_client::UserOutboxServiceClient;
use user::user_service_client::UserServiceClient;

/// The longest load a round may have.
const MAX_DURATION: Duration = Duration::from_secs(120);
/// The longest wait for the drain after the load.
const MAX_DRAIN: Duration = Duration::from_secs(300);
/// The gRPC services that must be served through the edge before a round.
const SERVICES: [&str; 4] = [
    "telco.user.v1.UserService",
    "telco.usage.v1.UsageService",
    "telco.settlement.v1.SettlementService",
    "telco.archive.v1.ArchiveService",
];
/// Deadline of the calls made around the load (setup, status, bills).
const SIDE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Sustained RecordUsage through the edge of the billing system, with the
/// bills kept current.
#[derive(Debug, Parser)]
#[command(name = "billing_bench", about)]
struct Args {
    /// RecordUsage calls started per second (open loop).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long the load lasts (at most 120s).
    #[arg(long, default_value = "20s", value_parser = trellis::cli::parse_duration)]
    duration: Duration,
    /// HTTP/2 connections to the edge; calls take them in turn.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Users created (each subscribed to a plan, plans taken in turn);
    /// calls take them in turn.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Rounds, each on a freshly started mesh and fresh databases; with
    /// more than one, medians are printed at the end.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Deadline of each RecordUsage call (sent as grpc-timeout and
    /// enforced by the load generator).
    #[arg(long, default_value = "2s", value_parser = trellis::cli::parse_duration)]
    timeout: Duration,
    /// Longest wait, after the load, for the outbox to drain and the bills
    /// to match usage's database (at most 300s).
    #[arg(long, default_value = "60s", value_parser = trellis::cli::parse_duration)]
    drain_limit: Duration,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Also sample pg_stat_activity every 10 ms during the load and print
    /// what our databases' backends were busy with (a diagnosis; it costs
    /// some PostgreSQL CPU itself, so leave it off for the figures).
    #[arg(long)]
    pg_sample: bool,
}

// ---------------------------------------------------------------- /proc

/// Fields after the command name of /proc/<pid>/stat (`fields[0]` is
/// field 3 of proc(5)).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's CPU time from the first line of /proc/stat, in ticks.
#[derive(Debug, Clone, Copy, Default)]
struct MachineTicks {
    total: u64,
    idle: u64,
    iowait: u64,
    steal: u64,
    /// Context switches since boot (the `ctxt` line).
    switches: u64,
}

fn machine_ticks() -> anyhow::Result<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() == 8, "unexpected /proc/stat line {line:?}");
    let switches = stat
        .lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(MachineTicks {
        switches,
        // user nice system idle iowait irq softirq steal (guest time is
        // already counted in user).
        total: v.iter().sum(),
        idle: v[3],
        iowait: v[4],
        steal: v[7],
    })
}

/// What the machine did between two readings, as shares of its time.
#[derive(Debug, Clone, Copy, Default)]
struct MachineShare {
    busy: f64,
    iowait: f64,
    steal: f64,
    /// Context switches, machine-wide.
    switches: u64,
}

fn machine_share(a: MachineTicks, b: MachineTicks) -> MachineShare {
    let total = b.total.saturating_sub(a.total).max(1) as f64;
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / total;
    let idle = d(a.idle, b.idle);
    let iowait = d(a.iowait, b.iowait);
    MachineShare {
        busy: 1.0 - idle - iowait,
        iowait,
        steal: d(a.steal, b.steal),
        switches: b.switches.saturating_sub(a.switches),
    }
}

/// The process groups CPU time is summed over, in the order printed.
const GROUPS: [&str; 12] = [
    "edge",
    "sidecars",
    "usage (2)",
    "settlement",
    "archive",
    "user",
    "registry",
    "pg: usage db",
    "pg: settlement db",
    "pg: user db",
    "pg: shared",
    "load generator",
];

/// A measured process of the mesh.
#[derive(Debug, Clone)]
struct Proc {
    name: String,
    group: &'static str,
    pid: u32,
    log: PathBuf,
}

fn mesh_procs(mesh: &BillingMesh) -> Vec<Proc> {
    let mut procs = vec![Proc {
        name: "edge".into(),
        group: "edge",
        pid: mesh.edge_proxy.process.id(),
        log: mesh.edge_proxy.process.log_path().to_owned(),
    }];
    let services = [
        (&mesh.user, "user"),
        (&mesh.usage[0], "usage (2)"),
        (&mesh.usage[1], "usage (2)"),
        (&mesh.settlement, "settlement"),
        (&mesh.archive, "archive"),
    ];
    for (instance, group) in services {
        procs.push(Proc {
            name: instance.name.clone(),
            group,
            pid: instance.process.id(),
            log: instance.process.log_path().to_owned(),
        });
        procs.push(Proc {
            name: format!("sidecar of {}", instance.name),
            group: "sidecars",
            pid: instance.proxy.process.id(),
            log: instance.proxy.process.log_path().to_owned(),
        });
    }
    procs.push(Proc {
        name: "registry".into(),
        group: "registry",
        pid: mesh.registry.process.id(),
        log: mesh.registry.process.log_path().to_owned(),
    });
    procs
}

/// CPU ticks by process name and group at one moment, with the
/// PostgreSQL processes found by name and sorted by their titles.
#[derive(Debug, Clone, Default)]
struct CpuSnapshot {
    /// By process name (the mesh's processes and the load generator).
    procs: BTreeMap<String, u64>,
    /// By group, PostgreSQL included.
    groups: BTreeMap<&'static str, u64>,
    /// Live PostgreSQL backends of our databases.
    our_backends: usize,
    /// PostgreSQL processes of nobody here (other clients' backends),
    /// left out of every group.
    foreign_ticks: u64,
    /// When the snapshot was taken.
    at: Option<Instant>,
    machine: MachineTicks,
}

/// Which of our databases a PostgreSQL process title names.
#[derive(Debug, Clone)]
struct DbNames {
    usage: String,
    settlement: String,
    user: String,
}

fn cpu_snapshot(procs: &[Proc], dbs: &DbNames) -> anyhow::Result<CpuSnapshot> {
    let mut snap = CpuSnapshot {
        machine: machine_ticks()?,
        at: Some(Instant::now()),
        ..Default::default()
    };
    for group in GROUPS {
        snap.groups.insert(group, 0);
    }
    for p in procs {
        let ticks = cpu_ticks(&p.pid.to_string())
            .with_context(|| format!("{} (pid {}) is gone", p.name, p.pid))?;
        snap.procs.insert(p.name.clone(), ticks);
        *snap.groups.entry(p.group).or_default() += ticks;
    }
    let own = cpu_ticks("self").context("own /proc/self/stat")?;
    snap.procs.insert("load generator".into(), own);
    *snap.groups.entry("load generator").or_default() += own;

    // PostgreSQL: every process named `postgres`. Backends show their
    // database in their title ("postgres: 15/main: root <db> 127.0.0.1(…)
    // idle"); the postmaster and the auxiliary processes (WAL writer,
    // checkpointer, …) serve everyone and count as shared.
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() != "postgres" {
            continue;
        }
        let Some(ticks) = cpu_ticks(pid) else {
            continue;
        };
        let title = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let words: Vec<&str> = title.split_whitespace().collect();
        let names = |db: &str| words.contains(&db);
        let group = if names(&dbs.usage) {
            "pg: usage db"
        } else if names(&dbs.settlement) {
            "pg: settlement db"
        } else if names(&dbs.user) {
            "pg: user db"
        } else if !title.starts_with("postgres: ") || !title.contains('(') {
            // The postmaster (its command line), or an auxiliary process
            // (no client address in its title).
            "pg: shared"
        } else {
            snap.foreign_ticks += ticks;
            continue;
        };
        if group != "pg: shared" {
            snap.our_backends += 1;
        }
        *snap.groups.entry(group).or_default() += ticks;
    }
    Ok(snap)
}

/// CPU seconds per group (and per process) between two snapshots.
#[derive(Debug, Clone, Default)]
struct CpuDelta {
    wall: Duration,
    groups: BTreeMap<&'static str, f64>,
    procs: BTreeMap<String, f64>,
    foreign: f64,
    machine: MachineShare,
    /// CPU seconds the whole machine was busy (steal included).
    machine_busy: f64,
    backends: (usize, usize),
}

impl CpuDelta {
    fn between(a: &CpuSnapshot, b: &CpuSnapshot, clk_tck: u64) -> Self {
        let secs = |x: u64, y: u64| y.saturating_sub(x) as f64 / clk_tck as f64;
        let wall = match (a.at, b.at) {
            (Some(x), Some(y)) => y - x,
            _ => Duration::ZERO,
        };
        Self {
            wall,
            groups: GROUPS
                .iter()
                .map(|g| (*g, secs(a.groups[g], b.groups[g])))
                .collect(),
            procs: b
                .procs
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        secs(a.procs.get(name).copied().unwrap_or(0), *t),
                    )
                })
                .collect(),
            foreign: secs(a.foreign_ticks, b.foreign_ticks),
            machine: machine_share(a.machine, b.machine),
            machine_busy: secs(
                a.machine.total - a.machine.idle - a.machine.iowait,
                b.machine.total - b.machine.idle - b.machine.iowait,
            ),
            backends: (a.our_backends, b.our_backends),
        }
    }

    /// Every group but the load generator.
    fn system_total(&self) -> f64 {
        self.groups
            .iter()
            .filter(|(g, _)| **g != "load generator")
            .map(|(_, s)| s)
            .sum()
    }

    /// What the rest of the machine used: busy time not accounted to any
    /// group (other people's processes, the kernel's threads).
    fn rest_of_machine(&self) -> f64 {
        (self.machine_busy - self.groups.values().sum::<f64>()).max(0.0)
    }

    fn pg_total(&self) -> f64 {
        self.groups
            .iter()
            .filter(|(g, _)| g.starts_with("pg: "))
            .map(|(_, s)| s)
            .sum()
    }
}

fn log_bytes(procs: &[Proc]) -> u64 {
    procs
        .iter()
        .map(|p| std::fs::metadata(&p.log).map(|m| m.len()).unwrap_or(0))
        .sum()
}

// ---------------------------------------------------------------- PostgreSQL statistics

/// Commits per database and the server's WAL counters (cumulative; the
/// statistics reach these views up to a second late).
#[derive(Debug, Clone, Default)]
struct PgStats {
    commits: BTreeMap<String, i64>,
    wal_records: i64,
    wal_syncs: i64,
    wal_bytes: f64,
}

async fn pg_stats(db: &tokio_postgres::Client, names: &DbNames) -> anyhow::Result<PgStats> {
    let list = vec![
        names.usage.clone(),
        names.settlement.clone(),
        names.user.clone(),
    ];
    let mut stats = PgStats::default();
    for row in db
        .query(
            "SELECT datname::text, xact_commit FROM pg_stat_database WHERE datname = ANY($1)",
            &[&list],
        )
        .await?
    {
        stats.commits.insert(row.get(0), row.get(1));
    }
    let row = db
        .query_one(
            "SELECT wal_records, wal_sync, wal_bytes::float8 FROM pg_stat_wal",
            &[],
        )
        .await?;
    stats.wal_records = row.get(0);
    stats.wal_syncs = row.get(1);
    stats.wal_bytes = row.get(2);
    Ok(stats)
}

/// Samples of active backends of our databases: (database, wait event
/// or CPU, statement) → samples, and the number of samples taken.
type ActivitySamples = (HashMap<(String, String, String), u64>, u64);

/// Samples pg_stat_activity every 10 ms until `stop` turns true.
async fn sample_activity(
    db: tokio_postgres::Client,
    names: DbNames,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<ActivitySamples> {
    let list = vec![
        names.usage.clone(),
        names.settlement.clone(),
        names.user.clone(),
    ];
    let statement = db
        .prepare(
            "SELECT datname::text,
                    coalesce(wait_event_type || ':' || wait_event, 'on CPU'),
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
             FROM pg_stat_activity
             WHERE state = 'active' AND datname = ANY($1) AND pid <> pg_backend_pid()",
        )
        .await?;
    let mut counts: HashMap<(String, String, String), u64> = HashMap::new();
    let mut samples = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        samples += 1;
        for row in db.query(&statement, &[&list]).await? {
            let datname: String = row.get(0);
            let db = if datname == names.usage {
                "usage"
            } else if datname == names.settlement {
                "settlement"
            } else {
                "user"
            };
            *counts
                .entry((db.to_owned(), row.get(1), row.get(2)))
                .or_default() += 1;
        }
    }
    Ok((counts, samples))
}

fn print_activity((counts, samples): &ActivitySamples) {
    let samples = (*samples).max(1) as f64;
    let mut per_db: BTreeMap<&str, f64> = BTreeMap::new();
    for ((db, _, _), n) in counts {
        *per_db.entry(db).or_default() += *n as f64 / samples;
    }
    println!(
        "  PostgreSQL backends active on average during the load ({samples} samples): {}",
        per_db
            .iter()
            .map(|(db, n)| format!("{db} db {n:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut top: Vec<_> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    for ((db, wait, query), n) in top.into_iter().take(15) {
        println!(
            "    {:>5.2} {db:<10} {wait:<28} {query}",
            *n as f64 / samples
        );
    }
}

// ---------------------------------------------------------------- the load

/// What the RecordUsage calls came to.
struct Outcome {
    /// Latency of successful calls, µs.
    latency: Histogram<u64>,
    ok: u64,
    /// Successful calls answered `duplicate` (none expected: keys are new).
    duplicates: u64,
    /// Failures by status code, with the first message seen.
    errors: BTreeMap<String, (u64, String)>,
}

impl Outcome {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            duplicates: 0,
            errors: BTreeMap::new(),
        }
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        if self.ok == 0 {
            return f64::NAN;
        }
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// A call's result: Ok(duplicate) or Err((code, message)).
type CallResult = Result<bool, (String, String)>;

async fn record(
    mut client: UsageServiceClient<Channel>,
    message: usage::RecordUsageRequest,
    timeout: Duration,
) -> (CallResult, Duration) {
    let start = Instant::now();
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    let result = match tokio::time::timeout(timeout, client.record_usage(request)).await {
        Err(_) => Err((
            "DeadlineExceeded (load generator)".to_owned(),
            format!("no answer within {timeout:?}"),
        )),
        Ok(Err(status)) => {
            let mut message = status.message().to_owned();
            message.truncate(200);
            Err((format!("{:?}", status.code()), message))
        }
        Ok(Ok(response)) => Ok(response.into_inner().duplicate),
    };
    (result, start.elapsed())
}

/// Counters the progress printer reads.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

fn now_timestamp() -> prost_types::Timestamp {
    let now = time::OffsetDateTime::now_utc();
    prost_types::Timestamp {
        seconds: now.unix_timestamp(),
        nanos: now.nanosecond() as i32,
    }
}

/// Runs the open-loop load; returns the outcome and the wall time from the
/// first call's start to the last call's end.
async fn load(
    args: &Args,
    clients: &[UsageServiceClient<Channel>],
    users: &[(String, user::Plan)],
    outbox: UsageOutboxServiceClient<Channel>,
) -> anyhow::Result<(Outcome, Duration, u64)> {
    let calls = (f64::from(args.rate) * args.duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let progress = Arc::new(Progress::default());
    let (tx, mut rx) = mpsc::unbounded_channel::<(CallResult, Duration)>();
    let runtime = tokio::runtime::Handle::current();
    let clients = clients.to_vec();
    let ids: Vec<String> = users.iter().map(|(id, _)| id.clone()).collect();
    let timeout = args.timeout;
    let start = Instant::now();
    let pacer = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            let n = ids.len() as u64;
            for i in 0..calls {
                let at = start + period.mul_f64(i as f64);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                // Users in turn; each user's records cycle through the
                // three types.
                let message = usage::RecordUsageRequest {
                    user_id: ids[(i % n) as usize].clone(),
                    r#type: ((i / n) % 3 + 1) as i32,
                    quantity: 1 + (i as i64 * 37) % 700,
                    occurred_at: Some(now_timestamp()),
                    idempotency_key: format!("bench-{i}"),
                };
                let client = clients[i as usize % clients.len()].clone();
                let tx = tx.clone();
                progress.sent.fetch_add(1, Ordering::Relaxed);
                runtime.spawn(async move {
                    let _ = tx.send(record(client, message, timeout).await);
                });
            }
        })
    };

    // Once a second: what was sent and answered, and the outbox backlog.
    let printer = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut outbox = outbox;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last_ok = 0;
            loop {
                tick.tick().await;
                let sent = progress.sent.load(Ordering::Relaxed);
                let ok = progress.ok.load(Ordering::Relaxed);
                let errors = progress.errors.load(Ordering::Relaxed);
                let elapsed = start.elapsed().as_secs_f64();
                let pending = match outbox_status(&mut outbox, Duration::from_millis(500)).await {
                    Ok(s) => s
                        .subscribers
                        .iter()
                        .map(|s| format!("{} {}", short(&s.subscriber), s.pending))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(e) => format!("status unavailable ({e})"),
                };
                println!(
                    "    {elapsed:>5.1}s  sent {sent:>7}  ok {ok:>7}  errors {errors:>5}  \
                     in flight {:>5}  ok/s {:>6.0} (last second {:>5})  outbox pending: {pending}",
                    sent - ok - errors,
                    ok as f64 / elapsed,
                    ok - last_ok,
                );
                last_ok = ok;
            }
        })
    };

    let mut outcome = Outcome::new();
    let mut last_end = start;
    while let Some((result, took)) = rx.recv().await {
        last_end = Instant::now();
        match result {
            Ok(duplicate) => {
                outcome.ok += 1;
                outcome.duplicates += u64::from(duplicate);
                outcome.latency.saturating_record(took.as_micros() as u64);
                progress.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((code, message)) => {
                let entry = outcome.errors.entry(code).or_insert((0, message));
                entry.0 += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    printer.abort();
    if pacer.join().is_err() {
        bail!("the pacing thread panicked");
    }
    Ok((outcome, last_end - start, calls))
}

// ---------------------------------------------------------------- status and bills

fn short(subscriber: &str) -> &str {
    match subscriber {
        "telco.settlement.v1.SettlementEventsService" => "settlement",
        "telco.archive.v1.ArchiveEventsService" => "archive",
        other => other,
    }
}

async fn outbox_status(
    client: &mut UsageOutboxServiceClient<Channel>,
    timeout: Duration,
) -> anyhow::Result<GetOutboxStatusResponse> {
    let mut request = tonic::Request::new(GetOutboxStatusRequest {});
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.get_outbox_status(request)).await {
        Err(_) => bail!("no answer within {timeout:?}"),
        Ok(r) => Ok(r
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner()),
    }
}

/// The status as the instance that dispatches reports it (the edge
/// balances status calls over both usage instances; delivery statistics
/// are kept by the dispatching one).
async fn dispatcher_status(
    client: &mut UsageOutboxServiceClient<Channel>,
) -> anyhow::Result<GetOutboxStatusResponse> {
    let mut last = None;
    for _ in 0..20 {
        let status = outbox_status(client, SIDE_CALL_TIMEOUT).await?;
        if status.dispatching {
            return Ok(status);
        }
        last = Some(status);
    }
    bail!("no usage instance said it dispatches in 20 status calls: {last:?}")
}

/// Totals of one user's usage in one month: (data MB, voice seconds, SMS).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Used {
    data: i64,
    voice: i64,
    sms: i64,
}

/// The bill total computed here, independently of settlement: the fee
/// plus usage beyond the allowances at the plan's rates, voice rounded up
/// to whole minutes (as in e2e/tests/common).
fn expected_total(plan: &user::Plan, used: Used) -> i64 {
    let over = |used: i64, included: i64| (used - included).max(0);
    let data = over(used.data, plan.included_data_mb) * plan.extra_data_mb_cents;
    let voice_seconds = over(used.voice, plan.included_voice_seconds);
    let voice = (voice_seconds + 59) / 60 * plan.extra_voice_minute_cents;
    let sms = over(used.sms, plan.included_sms) * plan.extra_sms_cents;
    plan.monthly_fee_cents + data + voice + sms
}

/// Usage's own database, per (user, year, month): the truth bills must
/// match. Also the number of records.
async fn usage_truth(
    db: &tokio_postgres::Client,
) -> anyhow::Result<(HashMap<(String, i32, i32), Used>, i64)> {
    let rows = db
        .query(
            "SELECT user_id, usage_type::int4, sum(quantity)::int8,
                    EXTRACT(YEAR FROM occurred_at AT TIME ZONE 'UTC')::int4,
                    EXTRACT(MONTH FROM occurred_at AT TIME ZONE 'UTC')::int4
             FROM usage_records GROUP BY 1, 2, 4, 5",
            &[],
        )
        .await?;
    let mut truth: HashMap<(String, i32, i32), Used> = HashMap::new();
    for row in rows {
        let used = truth
            .entry((row.get(0), row.get(3), row.get(4)))
            .or_default();
        let sum: i64 = row.get(2);
        match row.get::<_, i32>(1) {
            1 => used.data += sum,
            2 => used.voice += sum,
            3 => used.sms += sum,
            other => bail!("usage type {other} in usage's database"),
        }
    }
    let count: i64 = db
        .query_one("SELECT count(*) FROM usage_records", &[])
        .await?
        .get(0);
    Ok((truth, count))
}

/// What checking every bill found.
#[derive(Debug, Default)]
struct BillCheck {
    bills: usize,
    mismatches: Vec<String>,
    /// Sum of every bill line's used quantity, and the same from usage's
    /// database.
    billed_quantity: i64,
    recorded_quantity: i64,
}

async fn check_bills(
    edge: SocketAddr,
    truth: &HashMap<(String, i32, i32), Used>,
    plans: &HashMap<String, user::Plan>,
) -> anyhow::Result<BillCheck> {
    let client = SettlementServiceClient::new(lazy_channel(edge)?);
    let checks = futures::stream::iter(truth.iter())
        .map(|((user_id, year, month), used)| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(settlement::GetBillRequest {
                    user_id: user_id.clone(),
                    period: Some(settlement::BillingPeriod {
                        year: *year,
                        month: *month,
                    }),
                });
                request.set_timeout(SIDE_CALL_TIMEOUT);
                let bill = tokio::time::timeout(SIDE_CALL_TIMEOUT, client.get_bill(request))
                    .await
                    .map_err(|_| format!("GetBill {user_id}: no answer in time"))?
                    .map_err(|s| format!("GetBill {user_id}: {:?}: {}", s.code(), s.message()))?
                    .into_inner()
                    .bill
                    .ok_or_else(|| format!("GetBill {user_id}: no bill"))?;
                let billed: Vec<i64> = bill.lines.iter().map(|l| l.used_quantity).collect();
                let expected = plans
                    .get(user_id)
                    .map(|plan| expected_total(plan, *used))
                    .ok_or_else(|| format!("{user_id} is not one of ours"))?;
                let billed_sum = billed.iter().sum::<i64>();
                if billed != [used.data, used.voice, used.sms] || bill.total_cents != expected {
                    return Ok::<_, String>((
                        billed_sum,
                        Some(format!(
                            "{user_id} {year}-{month:02}: billed {billed:?} = {} cents, \
                             usage's database {used:?} = {expected} cents",
                            bill.total_cents
                        )),
                    ));
                }
                Ok((billed_sum, None))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut check = BillCheck {
        bills: truth.len(),
        recorded_quantity: truth.values().map(|u| u.data + u.voice + u.sms).sum(),
        ..Default::default()
    };
    for c in checks {
        match c {
            Ok((sum, mismatch)) => {
                check.billed_quantity += sum;
                check.mismatches.extend(mismatch);
            }
            Err(e) => check.mismatches.push(e),
        }
    }
    Ok(check)
}

// ---------------------------------------------------------------- a round

fn lazy_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy())
}

async fn wait_serving(edge: SocketAddr, service: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut health = HealthClient::new(lazy_channel(edge)?);
    loop {
        let status = tokio::time::timeout(
            SIDE_CALL_TIMEOUT,
            health.check(HealthCheckRequest {
                service: service.to_owned(),
            }),
        )
        .await
        .map(|r| r.map(|r| r.into_inner().status));
        if matches!(status, Ok(Ok(s)) if s == ServingStatus::Serving as i32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{service} not SERVING through the edge after {limit:?}: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Unary call with the side-call deadline.
async fn side<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(SIDE_CALL_TIMEOUT, call).await {
        Err(_) => bail!("{what}: no answer within {SIDE_CALL_TIMEOUT:?}"),
        Ok(Err(s)) => bail!("{what}: {:?}: {}", s.code(), s.message()),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// Creates the users, each subscribed to a plan (plans in turn).
async fn create_users(edge: SocketAddr, count: usize) -> anyhow::Result<Vec<(String, user::Plan)>> {
    let mut api = UserServiceClient::new(lazy_channel(edge)?);
    let plans = side("ListPlans", api.list_plans(user::ListPlansRequest {}))
        .await?
        .plans;
    ensure!(!plans.is_empty(), "the plan catalogue is empty");
    let results = futures::stream::iter(0..count)
        .map(|i| {
            let mut api = api.clone();
            let plan = plans[i % plans.len()].clone();
            async move {
                let created = side(
                    "CreateUser",
                    api.create_user(user::CreateUserRequest {
                        msisdn: format!("+447700{i:07}"),
                        name: format!("Bench subscriber {i}"),
                        email: format!("bench{i}@example.com"),
                    }),
                )
                .await?
                .user
                .context("CreateUser answered no user")?;
                side(
                    "Subscribe",
                    api.subscribe(user::SubscribeRequest {
                        user_id: created.id.clone(),
                        plan_id: plan.id.clone(),
                        effective_at: None,
                    }),
                )
                .await?;
                anyhow::Ok((created.id, plan))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

/// Waits until `check` is true, polling every 100 ms, for at most `limit`;
/// returns the time it took.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<(), String>>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Ok(())) => return Ok(start.elapsed()),
            Ok(Err(state)) => state,
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > limit {
            bail!("{what}: still not so after {limit:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Delivery statistics of one subscriber.
#[derive(Debug, Clone, Default)]
struct Lag {
    delivered: i64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Everything one round measured.
#[derive(Debug, Default)]
struct RoundResult {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    lag: BTreeMap<String, Lag>,
    /// From the end of the load until no event waited, and until the bills
    /// matched usage's database. None: not within the limit.
    drained: Option<Duration>,
    bills_ok: Option<Duration>,
    load_cpu: CpuDelta,
    drain_cpu: CpuDelta,
    /// Commits per database during the load, per second.
    commits_per_s: BTreeMap<String, f64>,
    wal_syncs_per_s: f64,
    log_bytes_per_call: f64,
}

fn ms(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6
}

async fn round(args: &Args, number: usize) -> anyhow::Result<RoundResult> {
    println!(
        "round {number}/{}: RecordUsage at {}/s for {:?} over {} connections, {} users",
        args.rounds, args.rate, args.duration, args.connections, args.users
    );
    let t0 = Instant::now();
    let dbs = [
        TestDb::new().await?,
        TestDb::new().await?,
        TestDb::new().await?,
    ];
    let names = DbNames {
        user: dbs[0].name().to_owned(),
        usage: dbs[1].name().to_owned(),
        settlement: dbs[2].name().to_owned(),
    };
    let databases = Databases {
        user: dbs[0].url(),
        usage: dbs[1].url(),
        settlement: dbs[2].url(),
    };
    let mesh = tokio::task::spawn_blocking(move || BillingMesh::start(databases))
        .await
        .map_err(|e| anyhow::anyhow!("the billing mesh did not start: {e}"))?;
    let edge = mesh.edge;
    ensure!(
        edge.ip().is_loopback(),
        "the edge is not on loopback: {edge}"
    );
    for service in SERVICES {
        wait_serving(edge, service, Duration::from_secs(30)).await?;
    }
    println!(
        "  mesh up in {:.1}s; edge {edge}",
        t0.elapsed().as_secs_f64()
    );

    let t1 = Instant::now();
    let users = create_users(edge, args.users).await?;
    // Settlement must know every subscription before usage arrives.
    let user_outbox = UserOutboxServiceClient::new(lazy_channel(edge)?);
    wait_for("the user outbox drains", Duration::from_secs(60), || {
        let mut client = user_outbox.clone();
        async move {
            let status = side(
                "user GetOutboxStatus",
                client.get_outbox_status(GetOutboxStatusRequest {}),
            )
            .await?;
            Ok(if status.subscribers.iter().any(|s| s.pending > 0) {
                Err(format!("{status:?}"))
            } else {
                Ok(())
            })
        }
    })
    .await?;
    println!(
        "  {} users subscribed and known to settlement in {:.1}s",
        users.len(),
        t1.elapsed().as_secs_f64()
    );

    // The load's connections, each its own HTTP/2 connection, opened now.
    let endpoint = Endpoint::from_shared(format!("http://{edge}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(UsageServiceClient::new(endpoint.connect().await?));
    }
    let mut usage_outbox = UsageOutboxServiceClient::new(lazy_channel(edge)?);
    let usage_db = dbs[1].connect().await?;

    let procs = mesh_procs(&mesh);
    let logs_before = log_bytes(&procs);
    let pg_before = pg_stats(&usage_db, &names).await?;
    let (stop_sampling, stopped) = tokio::sync::watch::channel(false);
    let sampler = if args.pg_sample {
        Some(tokio::spawn(sample_activity(
            dbs[1].connect().await?,
            names.clone(),
            stopped,
        )))
    } else {
        None
    };
    let cpu_before = cpu_snapshot(&procs, &names)?;
    let (outcome, load_wall, sent) = load(args, &clients, &users, usage_outbox.clone()).await?;
    let load_end = Instant::now();
    let _ = stop_sampling.send(true);
    let cpu_loaded = cpu_snapshot(&procs, &names)?;
    let pg_loaded = pg_stats(&usage_db, &names).await?;
    let logs_after = log_bytes(&procs);

    // The drain: no event waits, then every bill matches usage's database.
    let drain_limit = args.drain_limit;
    let drained = wait_for("the usage outbox drains", drain_limit, || {
        let mut client = usage_outbox.clone();
        async move {
            let status = outbox_status(&mut client, SIDE_CALL_TIMEOUT).await?;
            Ok(
                if status
                    .subscribers
                    .iter()
                    .any(|s| s.pending > 0 || s.parked > 0)
                {
                    Err(format!("{:?}", status.subscribers))
                } else {
                    Ok(())
                },
            )
        }
    })
    .await
    .map(|_| load_end.elapsed());
    if let Err(e) = &drained {
        println!("  {e:#}");
    }
    let plans: HashMap<String, user::Plan> = users.iter().cloned().collect();
    let mut last_check = BillCheck::default();
    let mut records = 0;
    let bills_ok = match drained {
        Err(_) => None,
        Ok(_) => loop {
            let (truth, count) = usage_truth(&usage_db).await?;
            records = count;
            last_check = check_bills(edge, &truth, &plans).await?;
            if last_check.mismatches.is_empty()
                && last_check.billed_quantity == last_check.recorded_quantity
            {
                break Some(load_end.elapsed());
            }
            if load_end.elapsed() > drain_limit {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        },
    };
    let cpu_drained = cpu_snapshot(&procs, &names)?;
    let status = dispatcher_status(&mut usage_outbox).await?;

    let load_cpu = CpuDelta::between(&cpu_before, &cpu_loaded, args.clk_tck);
    let drain_cpu = CpuDelta::between(&cpu_loaded, &cpu_drained, args.clk_tck);
    let wall = load_cpu.wall.as_secs_f64();
    let mut result = RoundResult {
        sent,
        ok: outcome.ok,
        errors: outcome
            .errors
            .iter()
            .map(|(code, (n, _))| (code.clone(), *n))
            .collect(),
        achieved: outcome.ok as f64 / load_wall.as_secs_f64(),
        p50_ms: outcome.quantile_ms(0.5),
        p99_ms: outcome.quantile_ms(0.99),
        max_ms: outcome.latency.max() as f64 / 1000.0,
        drained: drained.ok(),
        bills_ok,
        commits_per_s: pg_loaded
            .commits
            .iter()
            .map(|(db, c)| {
                let service = if *db == names.usage {
                    "usage"
                } else if *db == names.settlement {
                    "settlement"
                } else {
                    "user"
                };
                let before = pg_before.commits.get(db).copied().unwrap_or(0);
                (service.to_owned(), (c - before) as f64 / wall)
            })
            .collect(),
        wal_syncs_per_s: (pg_loaded.wal_syncs - pg_before.wal_syncs) as f64 / wall,
        log_bytes_per_call: logs_after.saturating_sub(logs_before) as f64
            / outcome.ok.max(1) as f64,
        ..Default::default()
    };
    for s in &status.subscribers {
        result.lag.insert(
            short(&s.subscriber).to_owned(),
            Lag {
                delivered: s.delivered,
                p50_ms: s.delivery_lag_p50.as_ref().map(ms).unwrap_or(f64::NAN),
                p99_ms: s.delivery_lag_p99.as_ref().map(ms).unwrap_or(f64::NAN),
            },
        );
    }

    // The round's report.
    println!(
        "  load: {} calls started in {:.1}s ({:.0}/s offered); {} OK in {:.2}s = {:.0} recorded/s; \
         latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        sent,
        args.duration.as_secs_f64(),
        sent as f64 / args.duration.as_secs_f64(),
        outcome.ok,
        load_wall.as_secs_f64(),
        result.achieved,
        result.p50_ms,
        result.p99_ms,
        result.max_ms,
    );
    if outcome.duplicates > 0 {
        println!("  {} calls were answered as duplicates", outcome.duplicates);
    }
    if outcome.errors.is_empty() {
        println!("  errors: none");
    }
    for (code, (n, message)) in &outcome.errors {
        println!("  errors: {n} × {code} (first: {message})");
    }
    let d = |x: Option<Duration>| {
        x.map_or_else(
            || format!("not within {drain_limit:?}"),
            |d| format!("{:.2}s", d.as_secs_f64()),
        )
    };
    println!(
        "  after the load: outbox drained in {}, every bill matched usage's database in {} \
         ({} bills; {} records in usage's database; billed quantity {} vs recorded {})",
        d(result.drained),
        d(result.bills_ok),
        last_check.bills,
        records,
        last_check.billed_quantity,
        last_check.recorded_quantity,
    );
    if records != outcome.ok as i64 {
        println!(
            "  note: usage holds {records} records for {} OK answers (a call that timed out \
             at the client may still have been recorded)",
            outcome.ok
        );
    }
    for m in last_check.mismatches.iter().take(5) {
        println!("  bill mismatch: {m}");
    }
    for (name, lag) in &result.lag {
        println!(
            "  delivery to {name}: {} events, lag p50 {:.1} ms, p99 {:.1} ms",
            lag.delivered, lag.p50_ms, lag.p99_ms
        );
    }
    let m = load_cpu.machine;
    println!(
        "  machine during the load ({:.1}s): busy {:.0}%, iowait {:.1}%, steal {:.1}% \
         (of {} cores); {:.0} context switches/s ({:.0} per recorded call); \
         PostgreSQL commits/s: {}; WAL syncs/s {:.0} (server-wide)",
        wall,
        m.busy * 100.0,
        m.iowait * 100.0,
        m.steal * 100.0,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        m.switches as f64 / wall,
        m.switches as f64 / outcome.ok.max(1) as f64,
        result
            .commits_per_s
            .iter()
            .map(|(s, c)| format!("{s} {c:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        result.wal_syncs_per_s,
    );
    println!(
        "  CPU during the load, and during the drain ({:.1}s):",
        drain_cpu.wall.as_secs_f64()
    );
    println!(
        "    {:<20} {:>8} {:>10} {:>12} {:>10}",
        "group", "CPU s", "cores", "µs per call", "drain s"
    );
    let per_call = |s: f64| s * 1e6 / outcome.ok.max(1) as f64;
    for g in GROUPS {
        let s = load_cpu.groups[g];
        println!(
            "    {:<20} {:>8.2} {:>10.2} {:>12.0} {:>10.2}",
            g,
            s,
            s / wall,
            per_call(s),
            drain_cpu.groups[g]
        );
    }
    let total = load_cpu.system_total();
    println!(
        "    {:<20} {:>8.2} {:>10.2} {:>12.0} {:>10.2}",
        "all but load gen.",
        total,
        total / wall,
        per_call(total),
        drain_cpu.system_total()
    );
    println!(
        "    {:<20} {:>8.2} {:>10.2} {:>12} {:>10.2}",
        "rest of the machine",
        load_cpu.rest_of_machine(),
        load_cpu.rest_of_machine() / wall,
        "",
        drain_cpu.rest_of_machine()
    );
    println!(
        "    per process: {}",
        load_cpu
            .procs
            .iter()
            .map(|(p, s)| format!("{p} {:.0}", per_call(*s)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "    PostgreSQL backends of our databases: {} before, {} after; other clients' \
         PostgreSQL processes used {:.2} CPU s (not counted); the mesh logged {:.0} bytes per call",
        load_cpu.backends.0, load_cpu.backends.1, load_cpu.foreign, result.log_bytes_per_call
    );
    if let Some(sampler) = sampler {
        match sampler.await {
            Ok(Ok(samples)) => print_activity(&samples),
            Ok(Err(e)) => println!("  sampling pg_stat_activity failed: {e:#}"),
            Err(e) => println!("  sampling pg_stat_activity failed: {e}"),
        }
    }
    result.load_cpu = load_cpu;
    result.drain_cpu = drain_cpu;

    drop(clients);
    drop(usage_db);
    drop(mesh);
    drop(dbs);
    println!("  round took {:.0}s", t0.elapsed().as_secs_f64());
    Ok(result)
}

// ---------------------------------------------------------------- summary

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn secs(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64())
}

fn summary(args: &Args, results: &[RoundResult]) {
    println!();
    println!(
        "summary: RecordUsage through the edge at {}/s for {:?} over {} connections, {} users, \
         {} round(s); last row: medians",
        args.rate,
        args.duration,
        args.connections,
        args.users,
        results.len()
    );
    println!();
    println!(
        "| round | offered/s | recorded/s | errors | p50 ms | p99 ms | lag p50 / p99 ms settlement | \
         lag p50 / p99 ms archive | drained s | bills match s | CPU µs/call (all) | \
         edge | sidecars | usage | settlement | archive | PostgreSQL | busy % | steal % | \
         other processes, cores | context switches per call |"
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    struct Row {
        offered: f64,
        rate: f64,
        errors: f64,
        p50: f64,
        p99: f64,
        lag: [f64; 4],
        drained: f64,
        bills: f64,
        cpu: [f64; 7],
        busy: f64,
        steal: f64,
        rest: f64,
        switches: f64,
    }
    let rows: Vec<Row> = results
        .iter()
        .map(|r| {
            let per_call = |s: f64| s * 1e6 / r.ok.max(1) as f64;
            let g = |name: &str| per_call(r.load_cpu.groups.get(name).copied().unwrap_or(0.0));
            let lag = |name: &str| {
                r.lag
                    .get(name)
                    .map_or((f64::NAN, f64::NAN), |l| (l.p50_ms, l.p99_ms))
            };
            let (s50, s99) = lag("settlement");
            let (a50, a99) = lag("archive");
            Row {
                offered: r.sent as f64 / args.duration.as_secs_f64(),
                rate: r.achieved,
                errors: r.errors.values().sum::<u64>() as f64,
                p50: r.p50_ms,
                p99: r.p99_ms,
                lag: [s50, s99, a50, a99],
                drained: secs(r.drained),
                bills: secs(r.bills_ok),
                cpu: [
                    per_call(r.load_cpu.system_total()),
                    g("edge"),
                    g("sidecars"),
                    g("usage (2)"),
                    g("settlement"),
                    g("archive"),
                    per_call(r.load_cpu.pg_total()),
                ],
                busy: r.load_cpu.machine.busy * 100.0,
                steal: r.load_cpu.machine.steal * 100.0,
                rest: r.load_cpu.rest_of_machine() / r.load_cpu.wall.as_secs_f64(),
                switches: r.load_cpu.machine.switches as f64 / r.ok.max(1) as f64,
            }
        })
        .collect();
    let print = |label: &str, r: &Row| {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.2} | \
             {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} |",
            r.offered,
            r.rate,
            r.errors,
            r.p50,
            r.p99,
            r.lag[0],
            r.lag[1],
            r.lag[2],
            r.lag[3],
            r.drained,
            r.bills,
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
            r.cpu[3],
            r.cpu[4],
            r.cpu[5],
            r.cpu[6],
            r.busy,
            r.steal,
            r.rest,
            r.switches,
        );
    };
    for (i, r) in rows.iter().enumerate() {
        print(&(i + 1).to_string(), r);
    }
    if rows.len() > 1 {
        let med = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f));
        let m = Row {
            offered: med(&|r| r.offered),
            rate: med(&|r| r.rate),
            errors: med(&|r| r.errors),
            p50: med(&|r| r.p50),
            p99: med(&|r| r.p99),
            lag: [0, 1, 2, 3].map(|i| med(&|r| r.lag[i])),
            drained: med(&|r| r.drained),
            bills: med(&|r| r.bills),
            cpu: [0, 1, 2, 3, 4, 5, 6].map(|i| med(&|r| r.cpu[i])),
            busy: med(&|r| r.busy),
            steal: med(&|r| r.steal),
            rest: med(&|r| r.rest),
            switches: med(&|r| r.switches),
        };
        print("median", &m);
    }
    let errors: BTreeMap<&str, u64> =
        results
            .iter()
            .flat_map(|r| &r.errors)
            .fold(BTreeMap::new(), |mut m, (code, n)| {
                *m.entry(code.as_str()).or_default() += n;
                m
            });
    if errors.is_empty() {
        println!("no failed RecordUsage call");
    } else {
        for (code, n) in errors {
            println!("failed RecordUsage calls, all rounds: {n} × {code}");
        }
    }
    let cores: Vec<String> = results
        .iter()
        .map(|r| {
            GROUPS
                .iter()
                .map(|g| {
                    format!(
                        "{g} {:.2}",
                        r.load_cpu.groups[g] / r.load_cpu.wall.as_secs_f64()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    println!("cores used during the load, by round:");
    for (i, c) in cores.iter().enumerate() {
        println!("  {}: {c}", i + 1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.rate > 0 && args.rate <= 50_000,
        "--rate must be 1 to 50000"
    );
    ensure!(
        !args.duration.is_zero() && args.duration <= MAX_DURATION,
        "--duration must be more than 0 and at most {MAX_DURATION:?}"
    );
    ensure!(
        args.drain_limit <= MAX_DRAIN,
        "--drain-limit must be at most {MAX_DRAIN:?}"
    );
    ensure!(
        args.connections >= 1 && args.users >= 1 && args.rounds >= 1,
        "--connections, --users and --rounds must be at least 1"
    );
    ensure!(args.users <= 100_000, "--users must be at most 100000");
    ensure!(
        args.timeout > Duration::ZERO && args.timeout <= Duration::from_secs(30),
        "--timeout must be more than 0 and at most 30s"
    );
    let mut results = Vec::new();
    for number in 1..=args.rounds {
        results.push(round(&args, number).await?);
        std::io::stdout().flush()?;
    }
    summary(&args, &results);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(async {
            let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
            tokio::select! {
                result = run(args) => result,
                // Dropping the round stops the mesh's processes and drops
                // its databases.
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                _ = term.recv() => bail!("terminated"),
            }
        })
}
