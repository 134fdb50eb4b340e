//! Mesh benchmark: the same unary `Echo` calls (128-byte payload) and
//! server-streaming `Count` calls sent to a service directly, through one
//! plaintext hop (mesh-proxy, and nginx and HAProxy for reference) and
//! through the whole mesh path (client sidecar → mTLS → server sidecar),
//! side by side in one run.
//!
//! Every round runs each target in turn, so drift on the machine (frequency,
//! noisy neighbours) falls on all of them alike; medians over the rounds are
//! reported, and ratios are taken within a round. Per target and round:
//! a short unmeasured warm-up, a closed loop (N callers, each sending its
//! next call when the last one returns, over a few HTTP/2 connections) for
//! throughput and latency at saturation, then an open loop at a fixed rate
//! for latency at a moderate load, then streaming calls back to back for
//! messages per second: the cost of a proxy per message of a long-lived
//! stream, apart from its cost per call. The CPU time (utime + stime, or
//! with `--cpu-clock schedstat` the threads' exact time on CPU) and
//! resident memory of the processes named with `--proc` are read from /proc
//! around every run.
//!
//! Run with `bench/mesh.sh`: it builds in release mode, starts and pins the
//! processes, and passes their addresses and pids. It records nothing by
//! itself: copy the summary into bench/RESULTS.md. All traffic goes to the
//! addresses given (loopback in the script) and every run is bounded in time.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use trellis::pb::trellis::echo::v1::echo_service_client::EchoServiceClient;
use trellis::pb::trellis::echo::v1::{CountRequest, EchoRequest};

type Client = EchoServiceClient<Channel>;

/// Compare direct calls with calls through mesh-proxy.
#[derive(Debug, Parser)]
#[command(name = "mesh-bench", about)]
struct Args {
    /// A target, `NAME=ADDR[,PROC...]`: an h2c address serving
    /// trellis.echo.v1.EchoService, then the `--proc` names of the proxies
    /// on its path (for the per-path summary). Repeat; the first target is
    /// the baseline that ratios are taken against.
    #[arg(long = "target", required = true, value_parser = parse_target)]
    targets: Vec<Target>,
    /// A process to measure, `NAME=PID`: CPU time per request and resident
    /// memory (VmRSS) after every run. Repeat.
    #[arg(long = "proc", value_parser = parse_proc)]
    procs: Vec<Proc>,
    /// Rounds; each runs every target once. Medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// How long each closed-loop run lasts (e.g. `3s`).
    #[arg(long, default_value = "3s", value_parser = trellis::cli::parse_duration)]
    duration: Duration,
    /// Stop each closed-loop run after this many calls instead; the run
    /// still ends after --duration at the latest.
    #[arg(long)]
    requests: Option<u64>,
    /// Unmeasured closed-loop load before each target's runs in a round.
    #[arg(long, default_value = "500ms", value_parser = trellis::cli::parse_duration)]
    warmup: Duration,
    /// Concurrent callers in the closed loop.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections per target; callers share them round robin.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Payload bytes per request (echoed back in the response).
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Calls per second of the fixed-rate (open loop) run; 0 skips it.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// How long each fixed-rate run lasts (e.g. `2s`).
    #[arg(long, default_value = "2s", value_parser = trellis::cli::parse_duration)]
    rate_duration: Duration,
    /// Messages per streaming `Count` call.
    #[arg(long, default_value_t = 1000)]
    stream_count: u32,
    /// Payload bytes per streamed message.
    #[arg(long, default_value_t = 16)]
    stream_payload: u32,
    /// How long each streaming run lasts (e.g. `2s`); 0 skips it.
    #[arg(long, default_value = "2s", value_parser = trellis::cli::parse_duration)]
    stream_duration: Duration,
    /// Concurrent streaming calls, each starting the next when the last one
    /// has ended.
    #[arg(long, default_value_t = 4)]
    stream_concurrency: usize,
    /// Deadline of each call, enforced by the load generator (no
    /// grpc-timeout header is sent, so the proxies see plain calls).
    #[arg(long, default_value = "5s", value_parser = trellis::cli::parse_duration)]
    timeout: Duration,
    /// Worker threads of the load generator's runtime (1 when pinned to
    /// one core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// How CPU time is read: `ticks`, utime + stime of /proc/<pid>/stat
    /// (clock ticks, sampled: a 3 s run resolves a few hundred of them), or
    /// `schedstat`, the time on CPU of each thread in
    /// /proc/<pid>/task/*/schedstat (nanoseconds, exact; the time of a
    /// thread that exits during a run is lost, which the proxies' fixed
    /// threads never do).
    #[arg(long, default_value = "ticks", value_parser = ["ticks", "schedstat"])]
    cpu_clock: String,
}

/// One address to load and the measured processes on its path.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    via: Vec<String>,
}

fn parse_target(text: &str) -> Result<Target, String> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=ADDR[,PROC...]"))?;
    let mut parts = rest.split(',').map(str::trim);
    let addr = parts
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|e| format!("{text:?}: not ip:port ({e})"))?;
    Ok(Target {
        name: name.trim().to_owned(),
        addr,
        via: parts.filter(|p| !p.is_empty()).map(str::to_owned).collect(),
    })
}

/// A process whose CPU time and memory are measured.
#[derive(Debug, Clone)]
struct Proc {
    name: String,
    pid: u32,
}

fn parse_proc(text: &str) -> Result<Proc, String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=PID"))?;
    Ok(Proc {
        name: name.trim().to_owned(),
        pid: pid
            .trim()
            .parse()
            .map_err(|e| format!("{text:?}: bad pid ({e})"))?,
    })
}

/// The CPU time of a process (all its threads) in nanoseconds, from
/// schedstat or from its clock ticks (`clk_tck` per second).
fn cpu_ns(pid: &str, schedstat: bool, clk_tck: u64) -> anyhow::Result<u64> {
    if !schedstat {
        return Ok(cpu_ticks(pid)? * 1_000_000_000 / clk_tck.max(1));
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mut total = 0;
    for task in tasks {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("unexpected {}: {text:?}", path.display()))?;
    }
    Ok(total)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name may hold spaces; the fields after it are fixed.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("unexpected /proc stat format")?
        .1
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of proc(5); fields[0] is field 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// A `Vm*:` line of /proc/<pid>/status, in MiB.
fn memory_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib as f64 / 1024.0)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// What a set of calls came to: latencies of the successful ones (ns) and
/// the failures by status.
struct Outcome {
    latency: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Outcome {
    fn new() -> Self {
        Self {
            // 1 ns to 60 s at 3 significant digits.
            latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn record(&mut self, result: Result<(), String>, took: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(took.as_nanos() as u64);
            }
            Err(e) => *self.errors.entry(e).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
        add_errors(&mut self.errors, other.errors);
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn quantile_us(&self, q: f64) -> f64 {
        if self.ok == 0 {
            return f64::NAN;
        }
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// A failed call's status as an error key: code and the start of the
/// message.
fn status_error(status: &Status) -> String {
    let mut message = status.message().to_owned();
    message.truncate(160);
    format!("{:?}: {message}", status.code())
}

/// One call, checked: the payload must come back whole.
async fn call(
    client: &mut Client,
    request: &EchoRequest,
    timeout: Duration,
) -> (Result<(), String>, Duration) {
    let start = Instant::now();
    let result = match tokio::time::timeout(timeout, client.echo(request.clone())).await {
        Err(_) => Err(format!("load generator deadline ({timeout:?}) passed")),
        Ok(Err(status)) => Err(status_error(&status)),
        Ok(Ok(response)) if response.get_ref().payload.len() != request.payload.len() => {
            Err(format!(
                "payload of {} bytes came back",
                response.get_ref().payload.len()
            ))
        }
        Ok(Ok(_)) => Ok(()),
    };
    (result, start.elapsed())
}

/// One streaming call, read to its end and checked: every message must
/// arrive, in order, with its payload whole. `timeout` bounds the whole
/// call.
async fn count_call(
    client: &mut Client,
    request: CountRequest,
    timeout: Duration,
) -> (Result<(), String>, Duration) {
    let start = Instant::now();
    let receive = async {
        let mut stream = client
            .count(request)
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        let mut received = 0;
        while let Some(message) = stream.message().await.map_err(|s| status_error(&s))? {
            if message.index != received {
                return Err(format!(
                    "message {} came as number {received}",
                    message.index
                ));
            }
            if message.payload.len() != request.payload_size as usize {
                return Err(format!(
                    "a message with {} payload bytes came",
                    message.payload.len()
                ));
            }
            received += 1;
        }
        if received != request.count {
            return Err(format!(
                "the stream ended after {received} of {} messages",
                request.count
            ));
        }
        Ok(())
    };
    let result = tokio::time::timeout(timeout, receive)
        .await
        .unwrap_or_else(|_| Err(format!("load generator deadline ({timeout:?}) passed")));
    (result.map_err(|e| format!("Count: {e}")), start.elapsed())
}

/// `callers` tasks call back to back until `run_time` has passed (or
/// `limit` calls were started). Returns the outcome and the wall time.
async fn closed_loop(
    clients: &[Client],
    request: &EchoRequest,
    callers: usize,
    run_time: Duration,
    limit: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<(Outcome, Duration)> {
    let start = Instant::now();
    let end = start + run_time;
    let started = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = request.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let mut outcome = Outcome::new();
                while Instant::now() < end {
                    if limit.is_some_and(|l| started.fetch_add(1, Ordering::Relaxed) >= l) {
                        break;
                    }
                    let (result, took) = call(&mut client, &request, timeout).await;
                    outcome.record(result, took);
                }
                outcome
            })
        })
        .collect();
    let mut total = Outcome::new();
    for task in tasks {
        total.merge(task.await?);
    }
    Ok((total, start.elapsed()))
}

/// `callers` tasks make streaming calls back to back until `run_time` has
/// passed; each call reads its whole stream. Returns the outcome by call
/// (latency from the request to the end of the stream) and the wall time.
async fn stream_loop(
    clients: &[Client],
    request: CountRequest,
    callers: usize,
    run_time: Duration,
    timeout: Duration,
) -> anyhow::Result<(Outcome, Duration)> {
    let start = Instant::now();
    let end = start + run_time;
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                let mut outcome = Outcome::new();
                while Instant::now() < end {
                    let (result, took) = count_call(&mut client, request, timeout).await;
                    outcome.record(result, took);
                }
                outcome
            })
        })
        .collect();
    let mut total = Outcome::new();
    for task in tasks {
        total.merge(task.await?);
    }
    Ok((total, start.elapsed()))
}

/// Starts `rate` calls per second for `run_time`, each on its own task
/// whatever the earlier ones are doing (open loop). A thread paces the
/// starts, as the runtime's timer only has millisecond resolution. Latency
/// is counted from the moment each call is issued.
async fn fixed_rate(
    clients: &[Client],
    request: &EchoRequest,
    rate: u32,
    run_time: Duration,
    timeout: Duration,
) -> anyhow::Result<(Outcome, Duration)> {
    let calls = (f64::from(rate) * run_time.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Handle::current();
    let clients = clients.to_vec();
    let request = request.clone();
    let start = Instant::now();
    let pacer = std::thread::spawn(move || {
        for i in 0..calls {
            let at = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let mut client = clients[i as usize % clients.len()].clone();
            let request = request.clone();
            let tx = tx.clone();
            runtime.spawn(async move {
                let _ = tx.send(call(&mut client, &request, timeout).await);
            });
        }
    });
    let mut outcome = Outcome::new();
    while let Some((result, took)) = rx.recv().await {
        outcome.record(result, took);
    }
    let elapsed = start.elapsed();
    if pacer.join().is_err() {
        bail!("the pacing thread panicked");
    }
    Ok((outcome, elapsed))
}

/// One measured run.
struct Run {
    /// Successful calls per second, or streamed messages per second.
    rate: f64,
    /// Latency of a call (for a streaming call, to its last message).
    p50_us: f64,
    p99_us: f64,
    calls: u64,
    errors: u64,
    /// CPU µs per successful call or streamed message, by --proc index.
    cpu_us: Vec<f64>,
    /// VmRSS after the run, by --proc index.
    rss_mib: Vec<f64>,
    /// The load generator's own CPU time over the run, in cores.
    loadgen_cores: f64,
}

struct Meter<'a> {
    procs: &'a [Proc],
    clk_tck: u64,
    schedstat: bool,
}

/// CPU time so far in nanoseconds, by --proc index, and of this process.
struct Snapshot {
    ns: Vec<u64>,
    own: u64,
}

impl Meter<'_> {
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            ns: self
                .procs
                .iter()
                .map(|p| {
                    cpu_ns(&p.pid.to_string(), self.schedstat, self.clk_tck)
                        .with_context(|| p.name.clone())
                })
                .collect::<anyhow::Result<_>>()?,
            own: cpu_ns("self", self.schedstat, self.clk_tck)?,
        })
    }

    /// The run since `before`; its rate and CPU time are per call, or per
    /// message for streaming calls of `messages_per_call` messages.
    fn run(
        &self,
        before: Snapshot,
        outcome: &Outcome,
        messages_per_call: u64,
        elapsed: Duration,
    ) -> anyhow::Result<Run> {
        let after = self.snapshot()?;
        let units = outcome.ok * messages_per_call;
        let per_unit = |b: u64, a: u64| a.saturating_sub(b) as f64 / 1e3 / units.max(1) as f64;
        Ok(Run {
            rate: units as f64 / elapsed.as_secs_f64(),
            p50_us: outcome.quantile_us(0.5),
            p99_us: outcome.quantile_us(0.99),
            calls: outcome.ok,
            errors: outcome.error_count(),
            cpu_us: before
                .ns
                .iter()
                .zip(&after.ns)
                .map(|(b, a)| per_unit(*b, *a))
                .collect(),
            rss_mib: self
                .procs
                .iter()
                .map(|p| memory_mib(p.pid, "VmRSS:"))
                .collect::<anyhow::Result<_>>()?,
            loadgen_cores: after.own.saturating_sub(before.own) as f64
                / 1e9
                / elapsed.as_secs_f64(),
        })
    }
}

/// Everything measured on one target.
struct Results {
    closed: Vec<Run>,
    fixed: Vec<Run>,
    stream: Vec<Run>,
    errors: BTreeMap<String, u64>,
}

async fn connect(target: &Target, connections: usize) -> anyhow::Result<Vec<Client>> {
    let endpoint = Endpoint::from_shared(format!("http://{}", target.addr))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let mut clients = Vec::new();
    for _ in 0..connections {
        // Each connect() is its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("{}: connecting to {}", target.name, target.addr))?;
        clients.push(EchoServiceClient::new(channel));
    }
    Ok(clients)
}

/// Calls until the target answers (proxies may still be loading their
/// routes), for at most 20 s; says who answered and who the service was
/// told called it.
async fn first_answer(target: &Target, client: &mut Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let request = EchoRequest {
            message: "mesh-bench".into(),
            payload: vec![0; 8],
        };
        match client.echo(request).await {
            Ok(response) => {
                let r = response.into_inner();
                let caller = if r.caller.is_empty() {
                    "none"
                } else {
                    &r.caller
                };
                println!(
                    "  {:<10} {}: answered by {} (verified caller: {caller})",
                    target.name, target.addr, r.instance
                );
                return Ok(());
            }
            Err(status) if Instant::now() > deadline => {
                bail!("{} never answered: {status}", target.name)
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The median CPU µs per call (or message) of the proxies on `target`'s
/// path, to `decimals` places.
fn cpu_cell(target: &Target, procs: &[Proc], runs: &[Run], decimals: usize) -> String {
    let cells: Vec<String> = target
        .via
        .iter()
        .filter_map(|name| {
            let i = procs.iter().position(|p| &p.name == name)?;
            let v: Vec<f64> = runs.iter().map(|r| r.cpu_us[i]).collect();
            Some(format!("{name} {:.decimals$}", median(&v)))
        })
        .collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(" + ")
    }
}

fn rss_cell(target: &Target, procs: &[Proc], runs: &[Run]) -> String {
    let cells: Vec<String> = target
        .via
        .iter()
        .filter_map(|name| {
            let i = procs.iter().position(|p| &p.name == name)?;
            let v: Vec<f64> = runs.iter().map(|r| r.rss_mib[i]).collect();
            Some(format!("{name} {:.1}", median(&v)))
        })
        .collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(", ")
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    for target in &args.targets {
        for name in &target.via {
            if !args.procs.iter().any(|p| &p.name == name) {
                bail!("target {}: no --proc named {name}", target.name);
            }
        }
    }
    if args.concurrency == 0 || args.connections == 0 || args.rounds == 0 {
        bail!("--concurrency, --connections and --rounds must be at least 1");
    }
    let stream = !args.stream_duration.is_zero();
    if stream && (args.stream_concurrency == 0 || args.stream_count == 0) {
        bail!("--stream-concurrency and --stream-count must be at least 1");
    }
    let request = EchoRequest {
        message: String::new(),
        payload: vec![0xA5; args.payload],
    };
    // No interval: echo then sends the messages back to back.
    let count_request = CountRequest {
        count: args.stream_count,
        payload_size: args.stream_payload,
        interval: None,
    };
    let meter = Meter {
        procs: &args.procs,
        clk_tck: args.clk_tck,
        schedstat: args.cpu_clock == "schedstat",
    };

    println!(
        "mesh-bench: {} rounds; closed loop {} callers over {} connections for {:?}; \
         fixed rate {} calls/s for {:?}; {}-byte payload",
        args.rounds,
        args.concurrency,
        args.connections,
        args.duration,
        args.rate,
        args.rate_duration,
        args.payload
    );
    if stream {
        println!(
            "  streaming: Count calls of {} × {}-byte messages, {} at a time, for {:?}",
            args.stream_count, args.stream_payload, args.stream_concurrency, args.stream_duration
        );
    }
    let mut clients = Vec::new();
    for target in &args.targets {
        let mut c = connect(target, args.connections).await?;
        first_answer(target, &mut c[0]).await?;
        if stream {
            // A proxy may pass unary calls and still break streams.
            let (result, _) = count_call(&mut c[0], count_request, args.timeout).await;
            if let Err(e) = result {
                bail!("{}: a streaming call failed: {e}", target.name);
            }
        }
        clients.push(c);
    }

    let mut results: Vec<Results> = args
        .targets
        .iter()
        .map(|_| Results {
            closed: Vec::new(),
            fixed: Vec::new(),
            stream: Vec::new(),
            errors: BTreeMap::new(),
        })
        .collect();
    let proc_cells = |run: &Run, decimals: usize| -> String {
        args.procs
            .iter()
            .zip(&run.cpu_us)
            .filter(|(_, us)| **us > 0.05)
            .map(|(p, us)| format!("{} {us:.decimals$}", p.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for round in 1..=args.rounds {
        for (t, target) in args.targets.iter().enumerate() {
            let c = &clients[t];
            closed_loop(
                c,
                &request,
                args.concurrency,
                args.warmup,
                None,
                args.timeout,
            )
            .await?;

            print!(
                "  round {round}/{} {:<10} closed ",
                args.rounds, target.name
            );
            std::io::stdout().flush()?;
            let before = meter.snapshot()?;
            let (outcome, elapsed) = closed_loop(
                c,
                &request,
                args.concurrency,
                args.duration,
                args.requests,
                args.timeout,
            )
            .await?;
            let run = meter.run(before, &outcome, 1, elapsed)?;
            println!(
                "{:>7.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  errors {}  \
                 CPU µs/call: {}  (load generator {:.0}% of a core)",
                run.rate,
                run.p50_us,
                run.p99_us,
                run.errors,
                proc_cells(&run, 1),
                run.loadgen_cores * 100.0
            );
            add_errors(&mut results[t].errors, outcome.errors);
            results[t].closed.push(run);

            if args.rate > 0 {
                print!(
                    "  round {round}/{} {:<10} {:>5}/s ",
                    args.rounds, target.name, args.rate
                );
                std::io::stdout().flush()?;
                let before = meter.snapshot()?;
                let (outcome, elapsed) =
                    fixed_rate(c, &request, args.rate, args.rate_duration, args.timeout).await?;
                let run = meter.run(before, &outcome, 1, elapsed)?;
                println!(
                    "{:>7.0} calls/s  p50 {:>6.0} µs  p99 {:>6.0} µs  errors {}  CPU µs/call: {}",
                    run.rate,
                    run.p50_us,
                    run.p99_us,
                    run.errors,
                    proc_cells(&run, 1)
                );
                add_errors(&mut results[t].errors, outcome.errors);
                results[t].fixed.push(run);
            }

            if stream {
                print!(
                    "  round {round}/{} {:<10} stream ",
                    args.rounds, target.name
                );
                std::io::stdout().flush()?;
                let before = meter.snapshot()?;
                let (outcome, elapsed) = stream_loop(
                    c,
                    count_request,
                    args.stream_concurrency,
                    args.stream_duration,
                    args.timeout,
                )
                .await?;
                let run = meter.run(before, &outcome, u64::from(args.stream_count), elapsed)?;
                println!(
                    "{:>7.0} msgs/s   call p50 {:>6.0} µs  p99 {:>6.0} µs  errors {}  \
                     CPU µs/message: {}  (load generator {:.0}% of a core)",
                    run.rate,
                    run.p50_us,
                    run.p99_us,
                    run.errors,
                    proc_cells(&run, 2),
                    run.loadgen_cores * 100.0
                );
                add_errors(&mut results[t].errors, outcome.errors);
                results[t].stream.push(run);
            }
        }
    }

    summary(&args, &results)
}

fn summary(args: &Args, results: &[Results]) -> anyhow::Result<()> {
    let base = &results[0];
    let base_name = &args.targets[0].name;
    println!();
    println!(
        "summary: median of {} rounds; ratios and deltas against {base_name} are taken \
         within each round, then the median",
        args.rounds
    );
    println!();
    println!(
        "| path | calls/s | × {base_name} | p50 µs | p99 µs | p50 µs @ {r}/s | p99 µs @ {r}/s | \
         Δp50 @ {r}/s | proxy CPU µs/call | proxy RSS MiB after load | errors |",
        r = args.rate
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (t, target) in args.targets.iter().enumerate() {
        let r = &results[t];
        let col =
            |runs: &[Run], f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let ratio: Vec<f64> = r
            .closed
            .iter()
            .zip(&base.closed)
            .map(|(a, b)| a.rate / b.rate)
            .collect();
        let delta: Vec<f64> = r
            .fixed
            .iter()
            .zip(&base.fixed)
            .map(|(a, b)| a.p50_us - b.p50_us)
            .collect();
        let delta_pct: Vec<f64> = r
            .fixed
            .iter()
            .zip(&base.fixed)
            .map(|(a, b)| (a.p50_us / b.p50_us - 1.0) * 100.0)
            .collect();
        let calls: u64 = r.closed.iter().chain(&r.fixed).map(|x| x.calls).sum();
        let errors: u64 = r.closed.iter().chain(&r.fixed).map(|x| x.errors).sum();
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} µs ({:+.1} %) | {} | {} | {errors} of {} |",
            target.name,
            col(&r.closed, |x| x.rate),
            median(&ratio),
            col(&r.closed, |x| x.p50_us),
            col(&r.closed, |x| x.p99_us),
            col(&r.fixed, |x| x.p50_us),
            col(&r.fixed, |x| x.p99_us),
            median(&delta),
            median(&delta_pct),
            cpu_cell(target, &args.procs, &r.closed, 1),
            rss_cell(target, &args.procs, &r.closed),
            calls + errors,
        );
    }

    if !base.stream.is_empty() {
        println!();
        println!(
            "streaming: Count calls of {} × {}-byte messages, {} at a time back to back \
             for {:?}; call latency is to the last message",
            args.stream_count, args.stream_payload, args.stream_concurrency, args.stream_duration
        );
        println!();
        println!(
            "| path | messages/s | × {base_name} | call p50 µs | call p99 µs | \
             proxy CPU µs/message | errors |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (t, target) in args.targets.iter().enumerate() {
            let r = &results[t];
            let col =
                |runs: &[Run], f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
            let ratio: Vec<f64> = r
                .stream
                .iter()
                .zip(&base.stream)
                .map(|(a, b)| a.rate / b.rate)
                .collect();
            let calls: u64 = r.stream.iter().map(|x| x.calls).sum();
            let errors: u64 = r.stream.iter().map(|x| x.errors).sum();
            println!(
                "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {} | {errors} of {} calls |",
                target.name,
                col(&r.stream, |x| x.rate),
                median(&ratio),
                col(&r.stream, |x| x.p50_us),
                col(&r.stream, |x| x.p99_us),
                cpu_cell(target, &args.procs, &r.stream, 2),
                calls + errors,
            );
        }
    }

    if !args.procs.is_empty() {
        println!();
        println!(
            "per process (median over rounds): CPU µs per call at saturation / at {}/s, \
             VmRSS MiB after the saturating / fixed-rate run{}",
            args.rate,
            if base.stream.is_empty() {
                ""
            } else {
                "; CPU µs per streamed message"
            }
        );
        println!();
        print!("| process |");
        for target in &args.targets {
            print!(" {} |", target.name);
        }
        println!(" VmHWM MiB at the end |");
        println!("|---|{}---|", "---|".repeat(args.targets.len()));
        for (i, p) in args.procs.iter().enumerate() {
            print!("| {} |", p.name);
            for r in results {
                let cpu =
                    |runs: &[Run]| median(&runs.iter().map(|x| x.cpu_us[i]).collect::<Vec<_>>());
                let rss =
                    |runs: &[Run]| median(&runs.iter().map(|x| x.rss_mib[i]).collect::<Vec<_>>());
                print!(
                    " {:.1} / {:.1} µs, {:.1} / {:.1} MiB",
                    cpu(&r.closed),
                    cpu(&r.fixed),
                    rss(&r.closed),
                    rss(&r.fixed)
                );
                if !r.stream.is_empty() {
                    print!("; {:.2} µs/message", cpu(&r.stream));
                }
                print!(" |");
            }
            println!(" {:.1} |", memory_mib(p.pid, "VmHWM:")?);
        }
    }

    println!();
    print!("load generator, share of its core during the closed loop:");
    for (t, target) in args.targets.iter().enumerate() {
        let v: Vec<f64> = results[t].closed.iter().map(|x| x.loadgen_cores).collect();
        print!(" {} {:.0}%", target.name, median(&v) * 100.0);
    }
    println!();
    if !base.stream.is_empty() {
        print!("load generator, share of its core while streaming:");
        for (t, target) in args.targets.iter().enumerate() {
            let v: Vec<f64> = results[t].stream.iter().map(|x| x.loadgen_cores).collect();
            print!(" {} {:.0}%", target.name, median(&v) * 100.0);
        }
        println!();
    }
    println!("raw closed-loop calls/s by round:");
    for (t, target) in args.targets.iter().enumerate() {
        let v: Vec<String> = results[t]
            .closed
            .iter()
            .map(|x| format!("{:.0}", x.rate))
            .collect();
        println!("  {}: {}", target.name, v.join(", "));
    }
    println!("raw p50 µs at {}/s by round:", args.rate);
    for (t, target) in args.targets.iter().enumerate() {
        let v: Vec<String> = results[t]
            .fixed
            .iter()
            .map(|x| format!("{:.0}", x.p50_us))
            .collect();
        println!("  {}: {}", target.name, v.join(", "));
    }
    if !base.stream.is_empty() {
        println!("raw streaming messages/s by round:");
        for (t, target) in args.targets.iter().enumerate() {
            let v: Vec<String> = results[t]
                .stream
                .iter()
                .map(|x| format!("{:.0}", x.rate))
                .collect();
            println!("  {}: {}", target.name, v.join(", "));
        }
    }
    let mut failed = false;
    for (t, target) in args.targets.iter().enumerate() {
        for (e, n) in &results[t].errors {
            println!("errors on {}: {n} × {e}", target.name);
            failed = true;
        }
    }
    if !failed {
        println!("no failed calls");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// Adds `from`'s error counts to `into`'s.
fn add_errors(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (e, n) in from {
        *into.entry(e).or_default() += n;
    }
}
