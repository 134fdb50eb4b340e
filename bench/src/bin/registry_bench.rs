//! Registry benchmark: registrations per second, and how long one change
//! takes to reach every one of many watchers, against the real registry
//! process over mTLS on 127.0.0.1.
//!
//! Run with `bench/registry.sh`; it builds in release mode and records
//! nothing by itself: copy the summary into bench/RESULTS.md.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
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
    /// Changes timed per fan-out run.
    #[arg(long, default_value_t = 20)]
    changes: usize,
}

struct Registry {
    child: Child,
    addr: SocketAddr,
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

fn start_registry(bin: &PathBuf, pki: &Pki) -> anyhow::Result<Registry> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let identity = pki.issue("registry")?;
    let config = pki.dir.path().join("config");
    std::fs::create_dir_all(&config)?;
    let child = Command::new(bin)
        .arg("--listen")
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
        .arg(&identity.ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                bin.display()
            )
        })?;
    let registry = Registry { child, addr };
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(registry);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("registry did not start listening on {addr}")
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

/// Registers as fast as `concurrency` clients can for `run_time`; returns
/// registrations per second.
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pki = Pki {
        dir: tempfile::tempdir()?,
        ca: CertAuthority::generate("trellis.local", 1)?,
    };
    write_file(&pki.dir.path().join("ca.pem"), pki.ca.cert_pem(), false)?;
    let registry = start_registry(&args.registry_bin, &pki)?;
    let writers: Vec<Channel> = (0..4)
        .map(|_| pki.channel("loadgen", registry.addr))
        .collect::<anyhow::Result<_>>()?;

    println!("registry-bench: {} runs each, medians reported", args.runs);
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let rate = registrations(&writers, args.concurrency, args.run_time).await?;
        println!("  registrations, no watchers, run {run}: {rate:.0}/s");
        rates.push(rate);
    }
    let idle_rate = median(&mut rates);

    // Attach the watchers; each reports (revision, arrival) for every event.
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let connections = args.watchers.div_ceil(args.streams_per_connection);
    let mut watch_channels = Vec::new();
    for _ in 0..connections {
        watch_channels.push(pki.channel("edge", registry.addr)?);
    }
    // Every watcher follows the "usage" service, whose one instance's
    // changes are timed; loadgen registrations still pass every watcher's
    // filter, as unrelated changes do in a real mesh.
    let mut probe_client = RegistryServiceClient::new(pki.channel("usage", registry.addr)?);
    let probe = probe_client.register(instance(0)).await?.into_inner();
    for w in 0..args.watchers {
        let mut client =
            RegistryServiceClient::new(watch_channels[w / args.streams_per_connection].clone());
        let tx = tx.clone();
        let target = probe.instance_id.clone();
        tokio::spawn(async move {
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
                    let _ = tx.send((event.revision, now));
                }
            }
            anyhow::Ok(())
        });
    }
    let mut ready = 0;
    while ready < args.watchers {
        rx.recv().await.context("watchers failed")?;
        ready += 1;
    }
    println!(
        "  {} watchers attached over {connections} connections; registry RSS {} KiB",
        args.watchers,
        rss_kib(registry.child.id())
    );

    let mut run_medians = Vec::new();
    let mut all = Vec::new();
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
            let mut arrived = 0;
            let mut last = start;
            while arrived < args.watchers {
                let (revision, at) = rx.recv().await.context("watchers failed")?;
                if revision >= response.revision {
                    arrived += 1;
                    last = last.max(at);
                }
            }
            latencies.push((last - start).as_secs_f64() * 1000.0);
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
    let rss = rss_kib(registry.child.id());

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
    println!("summary (median of {} runs):", args.runs);
    println!("  registrations/s, no watchers:            {idle_rate:.0}");
    println!(
        "  registrations/s, {} watchers:          {busy_rate:.0}",
        args.watchers
    );
    println!(
        "  change -> all {} watchers:              {fanout:.2} ms (p99 over all changes {p99:.2} ms)",
        args.watchers
    );
    println!(
        "  registry RSS with {} watchers:          {:.1} MiB",
        args.watchers,
        rss as f64 / 1024.0
    );
    Ok(())
}
