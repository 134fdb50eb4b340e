//! Chaos under load: steady calls through the edge while the registry is
//! SIGKILLed and restarted twice and one of two echo instances (the
//! service and its sidecar) is SIGKILLed. Echo's `Echo` is idempotent (NO_SIDE_EFFECTS), so the mesh
//! may retry it anywhere: not one call may fail.
//!
//! The real `trellis up` runs a small mesh of its own (the registry, two
//! echo instances with their sidecars, the edge) on free loopback ports
//! and restarts what is killed, the registry on the same port. No
//! database is needed.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::up::{Up, signal};
use common::{channel, wait_serving};
use tokio::time::MissedTickBehavior;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::repo_root;

use echo::echo_service_client::EchoServiceClient;

const ECHO: &str = "trellis.echo.v1.EchoService";
/// Concurrent callers, each pacing its calls.
const WORKERS: usize = 8;
/// Between two calls of one worker: 8 workers at 40/s is about 320 calls/s.
const PACE: Duration = Duration::from_millis(25);
/// How long the load runs; the faults happen within it.
const LOAD: Duration = Duration::from_secs(24);
/// Each call's deadline: far above a healthy call, so that a failure is
/// the mesh's answer, not impatience.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `trellis up` on a mesh file of this test's: the registry, two echo
/// instances with their sidecars, the edge.
fn start_mesh(dir: &std::path::Path) -> Up {
    let file = dir.join("trellis.toml");
    std::fs::write(
        &file,
        format!(
            "[mesh]\nports = \"auto\"\nconfig_dir = {:?}\n\n\
             [registry]\nlisten = \"auto\"\n\n\
             [edge]\nlisten = \"auto\"\n\n\
             [[service]]\nname = \"echo\"\ninstances = 2\n\
             command = [\"{{bin}}/trellis-echo\", \"--listen\", \"{{listen}}\", \"--name\", \"{{instance}}\"]\n",
            repo_root().join("config").display().to_string()
        ),
    )
    .unwrap();
    Up::start(
        &file,
        &dir.join("state"),
        &[],
        &[],
        Duration::from_secs(120),
    )
}

async fn wait_port(addr: SocketAddr, limit: Duration) -> Duration {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(started.elapsed() < limit, "{addr} not listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// One Echo call through the edge: the instance that answered, or what
/// went wrong.
async fn echo_once(
    client: &mut EchoServiceClient<tonic::transport::Channel>,
    message: String,
) -> Result<String, String> {
    let mut request = tonic::Request::new(echo::EchoRequest {
        message: message.clone(),
        payload: Vec::new(),
    });
    request.set_timeout(CALL_TIMEOUT);
    match client.echo(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.message == message {
                Ok(response.instance)
            } else {
                Err(format!("answered {:?} to {message:?}", response.message))
            }
        }
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<(Duration, String)>>,
    by_instance: Mutex<BTreeMap<String, u64>>,
    slowest: Mutex<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_survive_registry_restarts_and_a_dead_instance() {
    let dir = tempfile::tempdir().unwrap();
    let up = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || start_mesh(&dir)
    })
    .await
    .unwrap();
    let edge = up.edge;
    wait_serving(edge, ECHO, Duration::from_secs(30)).await;
    // Both instances are in the edge's view before the faults begin.
    let mut probe = EchoServiceClient::new(channel(edge));
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "only {seen:?} answered before the load:\n{}",
            up.output()
        );
        if let Ok(instance) = echo_once(&mut probe, "probe".into()).await {
            seen.insert(instance);
        }
    }

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (tally, stop) = (tally.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut client = EchoServiceClient::new(channel(edge));
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let begun = Instant::now();
                let result = echo_once(&mut client, format!("chaos-{w}-{i}")).await;
                let took = begun.elapsed();
                {
                    let mut slowest = tally.slowest.lock().unwrap();
                    *slowest = (*slowest).max(took);
                }
                match result {
                    Ok(instance) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        *tally
                            .by_instance
                            .lock()
                            .unwrap()
                            .entry(instance)
                            .or_default() += 1;
                    }
                    Err(e) => tally
                        .failures
                        .lock()
                        .unwrap()
                        .push((started.elapsed(), format!("worker {w} call {i}: {e}"))),
                }
            }
        }));
    }

    // The faults, spread over the load. Each restart is waited for.
    let mut events = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let took = up
        .kill_and_wait_restart("registry", Duration::from_secs(20))
        .await;
    let listening = wait_port(up.registry, Duration::from_secs(20)).await;
    events.push(format!(
        "{:>5.1}s registry SIGKILLed; restarted in {took:.1?}, listening {listening:.1?} later",
        started.elapsed().as_secs_f64()
    ));

    // The whole instance dies at once, the service and its sidecar, as
    // when its machine or pod goes: calls in flight on the sidecar's
    // connections are cut, and the registry still lists it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let app = up.pid("echo-2").expect("echo-2 runs");
    let sidecar = up.pid("echo-2-proxy").expect("echo-2-proxy runs");
    signal(sidecar, "KILL");
    signal(app, "KILL");
    events.push(format!(
        "{:>5.1}s echo-2 and its sidecar SIGKILLed (pids {app}, {sidecar})",
        started.elapsed().as_secs_f64()
    ));

    tokio::time::sleep(Duration::from_secs(4)).await;
    let took = up
        .kill_and_wait_restart("registry", Duration::from_secs(20))
        .await;
    let listening = wait_port(up.registry, Duration::from_secs(20)).await;
    events.push(format!(
        "{:>5.1}s registry SIGKILLed again; restarted in {took:.1?}, listening {listening:.1?} later",
        started.elapsed().as_secs_f64()
    ));

    tokio::time::sleep(LOAD.saturating_sub(started.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();

    let ok = tally.ok.load(Ordering::Relaxed);
    let failures = tally.failures.lock().unwrap().clone();
    let made = ok + failures.len() as u64;
    println!("chaos: {WORKERS} workers through the edge at {edge} for {elapsed:.1?}");
    for e in &events {
        println!("chaos: {e}");
    }
    println!(
        "chaos: {made} calls ({:.0}/s), {} failed, slowest {:.1?}, answered by {:?}",
        made as f64 / elapsed.as_secs_f64(),
        failures.len(),
        *tally.slowest.lock().unwrap(),
        tally.by_instance.lock().unwrap()
    );
    for (at, f) in failures.iter().take(20) {
        println!("chaos: failed at {:.1}s: {f}", at.as_secs_f64());
    }
    assert!(
        failures.is_empty(),
        "{} of {made} idempotent calls failed; first: {:?}\n--- trellis up:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        up.output()
    );
    assert!(
        made as f64 >= 100.0 * elapsed.as_secs_f64(),
        "only {made} calls in {elapsed:?}: not a steady load"
    );

    // The killed instance comes back and takes calls again through the
    // restarted registry.
    let back = Instant::now();
    loop {
        if echo_once(&mut probe, "after".into()).await.as_deref() == Ok("echo-2") {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "echo-2 did not take calls again within 30 s:\n{}",
            up.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "chaos: echo-2 answered again {:.1?} after the load",
        back.elapsed()
    );
    assert!(
        up.output()
            .contains("echo-2 was killed by SIGKILL; restarting"),
        "trellis up reports the restart:\n{}",
        up.output()
    );
    drop(up);
}
