//! Registry benchmark: registrations per second, and how long one change
//! takes to reach every one of many watchers, against the real registry
//! process over mTLS on 127.0.0.1.
//!
//! With `--replicas N --store etcd://...` it starts N registry replicas on
//! one etcd store: registrations and watchers are spread over the replicas
//! (round-robin by connection), each change is made through the first
//! replica, and it is timed until every watcher on every replica has seen
//! it (also reported per replica: the one written through, and the others,
//! which learn it from etcd).
//!
//! Run with `bench/registry.sh` (the embedded store) or
//! `bench/registry_store.sh` (embedded and etcd side by side); they build
//! in release mode and record nothing by themselves: copy the summary into
//! bench/RESULTS.md. The last line, `result: ...`, is for those scripts.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::signal::unix::SignalKind;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use trellis::certs::{CertAuthority, write_file};
use trellis::identity::{IdentityPaths, SpiffeId, Workload};
use trellis::pb::trellis::registry::v1 as pb;
use trellis::tls::{ExpectedPeer, channel};

use pb::registry_service_client::RegistryServiceClient;

/// Measure the registry.
#[derive(Debug, Parser)]
struct Args {
    /// The registry binary to run.
    #[arg(long, default_value = "target/release/trellis-registry")]
    registry_bin: PathBuf,
    /// Registry replicas to start; more than one needs `--store`.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The registry's `--store` (`etcd://host:port,...`), given to every
    /// replica; without it the registry keeps its state in memory.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// A name for this setup in the `result:` line.
    #[arg(long)]
    label: Option<String>,
    /// Watchers to attach for the fan-out measurement.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Watch streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Repetitions of each measurement (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// How long each registration run lasts.
    #[arg(long, default_value = "1s", value_parser = trellis::cli::parse_duration)]
    run_time: Duration,
    /// Concurrent registering clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// HTTP/2 connections the registering clients share.
    #[arg(long, default_value_t = 4)]
    writer_connections: usize,
    /// Changes timed per fan-out run.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Longest wait for one change to reach every watcher (or for the
    /// watchers to attach) before the benchmark gives up.
    #[arg(long, default_value = "10s", value_parser = trellis::cli::parse_duration)]
    change_timeout: Duration,
}

struct Registry {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Registry {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Every replica's resident memory, `a+b` in MiB.
fn rss_mib(registries: &[Registry]) -> String {
    registries
        .iter()
        .map(|r| format!("{:.1}", rss_kib(r.child.id()) as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join("+")
}

struct Pki {
    dir: tempfile::TempDir,
    ca: CertAuthority,
}

impl Pki {
    fn issue(&self, service: &str) -> anyhow::Result<IdentityPaths> {
        let id = SpiffeId::for_service("trellis.local", "default", service)?;
        let issued = self.ca.issue(&id, 1)?;
        let paths = IdentityPaths::in_dir(self.dir.path(), service);
        write_file(&paths.cert, &issued.cert_pem, false)?;
        write_file(&paths.key, &issued.key_pem, true)?;
        Ok(paths)
    }

    fn channel(&self, service: &str, addr: SocketAddr) -> anyhow::Result<Channel> {
        let workload = Workload::load(&self.issue(service)?)?;
        let expected = SpiffeId::for_service("trellis.local", "default", "registry")?;
        Ok(channel(&workload, addr, ExpectedPeer::Exactly(expected))?)
    }
}

/// Fails clearly when `bin` has no `--store` flag (a build from before the
/// etcd store), instead of a replica exiting on an unknown argument.
fn check_knows_store(bin: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    if !help.contains("--store") {
        bail!(
            "{} has no --store flag: this build of trellis-registry predates the etcd store \
             (issue #14), so it cannot run on etcd; build one that has it",
            bin.display()
        );
    }
    Ok(())
}

fn start_registry(
    bin: &Path,
    pki: &Pki,
    replica: usize,
    store: Option<&str>,
) -> anyhow::Result<Registry> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let identity = pki.issue("registry")?;
    // Each replica its own configuration directory, as on its own host.
    let config = pki.dir.path().join(format!("config-{replica}"));
    std::fs::create_dir_all(&config)?;
    let log = pki.dir.path().join(format!("registry-{replica}.log"));
    let file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config-dir")
        .arg(&config)
        // The load generator registers tens of thousands of instances and
        // opens a thousand watches under one identity each: far past the
        // per-identity quotas a real workload is held to.
        .args(["--max-instances-per-identity", "1000000"])
        .args(["--max-watches-per-identity", "4096"])
        .arg("--cert")
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca);
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                bin.display()
            )
        })?;
    let mut registry = Registry { child, addr, log };
    for _ in 0..400 {
        if let Some(status) = registry.child.try_wait()? {
            bail!(
                "registry replica {replica} exited ({status}) before listening on {addr}; its log ends:\n{}",
                registry.log_tail()
            );
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(registry);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!(
        "registry replica {replica} did not listen on {addr} within 10 s; its log ends:\n{}",
        registry.log_tail()
    )
}

/// An instance of the bulk-registering `loadgen` service, or (i == 0) the
/// one `usage` instance whose changes are timed.
fn instance(i: usize) -> pb::RegisterRequest {
    let (service, grpc) = if i == 0 {
        ("usage", "telco.usage.v1.UsageService")
    } else {
        ("loadgen", "bench.v1.LoadService")
    };
    pb::RegisterRequest {
        service: service.into(),
        version: "bench".into(),
        address: format!("127.0.0.1:{}", 20_000 + (i % 40_000)),
        grpc_services: vec![grpc.into()],
        health: pb::ServingStatus::Serving as i32,
        lease_ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Registers as fast as `concurrency` clients can for `run_time` (client
/// `t` on connection `t % channels.len()`, the connections spread over the
/// replicas); returns registrations per second.
async fn registrations(
    channels: &[Channel],
    concurrency: usize,
    run_time: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let mut client = RegistryServiceClient::new(channels[t % channels.len()].clone());
            tokio::spawn(async move {
                let mut done = 0usize;
                while start.elapsed() < run_time {
                    client.register(instance(1 + t * 1_000_000 + done)).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// One event a watcher received: its replica, the revision, the arrival.
type Seen = (usize, u64, Instant);

async fn run(args: Args) -> anyhow::Result<()> {
    if args.replicas == 0 || args.watchers == 0 || args.runs == 0 || args.changes == 0 {
        bail!("--replicas, --watchers, --runs and --changes must be at least 1");
    }
    if args.replicas > 1 && args.store.is_none() {
        bail!(
            "--replicas {} needs --store: replicas share their state only through a store",
            args.replicas
        );
    }
    if args.store.is_some() {
        check_knows_store(&args.registry_bin)?;
    }
    let label = args.label.clone().unwrap_or_else(|| {
        if args.store.is_some() {
            "store".into()
        } else {
            "embedded".into()
        }
    });
    let pki = Pki {
        dir: tempfile::tempdir()?,
        ca: CertAuthority::generate("trellis.local", 1)?,
    };
    write_file(&pki.dir.path().join("ca.pem"), pki.ca.cert_pem(), false)?;
    let registries: Vec<Registry> = (0..args.replicas)
        .map(|r| start_registry(&args.registry_bin, &pki, r, args.store.as_deref()))
        .collect::<anyhow::Result<_>>()?;
    let addr_of = |i: usize| registries[i % registries.len()].addr;
    let writers: Vec<Channel> = (0..args.writer_connections.max(1))
        .map(|c| pki.channel("loadgen", addr_of(c)))
        .collect::<anyhow::Result<_>>()?;

    println!(
        "registry-bench ({label}): {} replica(s){}, {} runs each, medians reported",
        args.replicas,
        args.store
            .as_deref()
            .map_or(String::new(), |s| format!(" on --store {s}")),
        args.runs
    );
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let rate = registrations(&writers, args.concurrency, args.run_time).await?;
        println!("  registrations, no watchers, run {run}: {rate:.0}/s");
        rates.push(rate);
    }
    let idle_rate = median(&mut rates);

    // Attach the watchers; each reports (replica, revision, arrival) for
    // every event. Connection c goes to replica c % replicas.
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let connections = args.watchers.div_ceil(args.streams_per_connection);
    let mut watch_channels = Vec::new();
    for c in 0..connections {
        watch_channels.push((c % registries.len(), pki.channel("edge", addr_of(c))?));
    }
    // Every watcher follows the "usage" service, whose one instance's
    // changes are timed (made through replica 0); loadgen registrations
    // still pass every watcher's filter, as unrelated changes do in a real
    // mesh.
    let mut probe_client = RegistryServiceClient::new(pki.channel("usage", addr_of(0))?);
    let probe = probe_client.register(instance(0)).await?.into_inner();
    let mut on_replica = vec![0usize; registries.len()];
    let mut watch_tasks = Vec::with_capacity(args.watchers);
    for w in 0..args.watchers {
        let (replica, channel) = watch_channels[w / args.streams_per_connection].clone();
        on_replica[replica] += 1;
        let mut client = RegistryServiceClient::new(channel);
        let tx = tx.clone();
        let target = probe.instance_id.clone();
        watch_tasks.push(tokio::spawn(async move {
            let watched = async {
                let mut stream = client
                    .watch(pb::WatchRequest {
                        targets: vec!["usage".into()],
                    })
                    .await?
                    .into_inner();
                while let Some(event) = stream.message().await? {
                    let now = Instant::now();
                    if event.kind() == pb::WatchEventKind::Snapshot
                        || event.instances.iter().any(|i| i.instance_id == target)
                    {
                        let _ = tx.send((replica, event.revision, now));
                    }
                }
                anyhow::Ok(())
            };
            // A watch that fails makes a change miss its deadline; the
            // first failure says why.
            static REPORTED: AtomicBool = AtomicBool::new(false);
            if let Err(e) = watched.await
                && !REPORTED.swap(true, Ordering::Relaxed)
            {
                eprintln!("  a watcher on replica {replica} failed: {e:#}");
            }
        }));
    }
    drop(tx);
    // One snapshot per watcher. On another replica than the probe's, the
    // probe may come after its snapshot, through the store; that event
    // predates the first timed change and is not counted.
    let attach_within = args.change_timeout.max(Duration::from_secs(30));
    let attach_deadline = Instant::now() + attach_within;
    let mut ready = 0;
    while ready < args.watchers {
        match tokio::time::timeout_at(attach_deadline.into(), rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            Ok(None) => bail!("the watchers' streams ended ({ready} attached)"),
            Err(_) => bail!(
                "only {ready} of {} watchers attached within {attach_within:?}",
                args.watchers
            ),
        }
    }
    println!(
        "  {} watchers attached over {connections} connections ({} per replica); registry RSS {} MiB",
        args.watchers,
        on_replica
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        rss_mib(&registries)
    );

    let mut run_medians = Vec::new();
    let mut all = Vec::new();
    // Per change, until every watcher on replica r has it.
    let mut by_replica: Vec<Vec<f64>> = vec![Vec::new(); registries.len()];
    let mut serving = false;
    for run in 1..=args.runs {
        let mut latencies = Vec::new();
        for _ in 0..args.changes {
            let start = Instant::now();
            let response = probe_client
                .set_health(pb::SetHealthRequest {
                    instance_id: probe.instance_id.clone(),
                    health: if serving {
                        pb::ServingStatus::Serving
                    } else {
                        pb::ServingStatus::NotServing
                    } as i32,
                })
                .await?
                .into_inner();
            serving = !serving;
            let deadline = start + args.change_timeout;
            let mut arrived = vec![0usize; registries.len()];
            let mut last = vec![start; registries.len()];
            while arrived.iter().sum::<usize>() < args.watchers {
                let (replica, revision, at) = match tokio::time::timeout_at(
                    deadline.into(),
                    rx.recv(),
                )
                .await
                {
                    Ok(Some(seen)) => seen,
                    Ok(None) => bail!("the watchers' streams ended"),
                    Err(_) => bail!(
                        "a change (revision {}) reached only {:?} of {:?} watchers per replica within {:?}",
                        response.revision,
                        arrived,
                        on_replica,
                        args.change_timeout
                    ),
                };
                if revision >= response.revision {
                    arrived[replica] += 1;
                    last[replica] = last[replica].max(at);
                }
            }
            for (r, at) in last.iter().enumerate() {
                if on_replica[r] > 0 {
                    by_replica[r].push((*at - start).as_secs_f64() * 1000.0);
                }
            }
            let overall = last.iter().max().copied().unwrap_or(start);
            latencies.push((overall - start).as_secs_f64() * 1000.0);
        }
        all.extend_from_slice(&latencies);
        let m = median(&mut latencies);
        println!(
            "  change reaches all {} watchers, run {run}: median {m:.2} ms, max {:.2} ms",
            args.watchers,
            percentile(&mut latencies, 1.0)
        );
        run_medians.push(m);
    }
    let fanout = median(&mut run_medians);
    let p99 = percentile(&mut all, 0.99);
    let per_replica: Vec<String> = by_replica
        .iter_mut()
        .map(|l| {
            if l.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(l))
            }
        })
        .collect();
    let rss = rss_mib(&registries);

    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let rate = registrations(&writers, args.concurrency, args.run_time).await?;
        println!(
            "  registrations, {} watchers attached, run {run}: {rate:.0}/s",
            args.watchers
        );
        rates.push(rate);
    }
    let busy_rate = median(&mut rates);

    println!();
    println!("summary ({label}, median of {} runs):", args.runs);
    println!("  registrations/s, no watchers:            {idle_rate:.0}");
    println!(
        "  registrations/s, {} watchers:          {busy_rate:.0}",
        args.watchers
    );
    println!(
        "  change -> all {} watchers:              {fanout:.2} ms (p99 over all {} changes {p99:.2} ms)",
        args.watchers,
        all.len()
    );
    if registries.len() > 1 {
        println!(
            "  change -> all watchers of each replica:  {} ms (the first is the one written through)",
            per_replica.join(" / ")
        );
    }
    println!(
        "  registry RSS with {} watchers:          {rss} MiB",
        args.watchers
    );
    println!(
        "result: setup={label} replicas={} watchers={} reg_idle={idle_rate:.0} \
         reg_busy={busy_rate:.0} fanout_ms={fanout:.3} p99_ms={p99:.3} by_replica_ms={} \
         rss_mib={rss}",
        args.replicas,
        args.watchers,
        per_replica.join("/")
    );
    std::io::stdout().flush()?;
    // Done: the watches end before the replicas stop under them.
    for task in &watch_tasks {
        task.abort();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        result = run(args) => result,
        // Dropping the run stops the registry processes.
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}
