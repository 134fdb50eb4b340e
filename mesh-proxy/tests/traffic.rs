//! Traffic management with real processes on 127.0.0.1: balancing around a
//! slow instance, the circuit breaker, concurrency limits on the callee's
//! and on the caller's side, hedging, and version splits for canaries.
//!
//! Faults come from echo's `Inject`, called on each instance's own address;
//! policies from `echo.toml` in the registry's config directory, written
//! before the mesh starts or rewritten (atomically) while calls flow. A
//! test waits for a rewrite by watching where calls land, not by sleeping.
//! Each test first checks that the registry serves the policy it wrote, so
//! a failure says which side (registry or sidecar) fell short.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis::pb::trellis::config::v1 as cfg;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, TestMesh, sibling_binary, spawn_echo, spawn_proxy,
    write_atomically,
};

use cfg::config_service_client::ConfigServiceClient;
use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";
const VERSION_HEADER: &str = "x-trellis-version";

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

/// A registry reading a config directory of its own, and a CA; instances
/// and callers are added per test.
struct Mesh(TestMesh);

impl std::ops::Deref for Mesh {
    type Target = TestMesh;
    fn deref(&self) -> &TestMesh {
        &self.0
    }
}

/// One echo instance and its sidecar.
struct Instance {
    echo: RunningEcho,
    proxy: RunningProxy,
}

impl Mesh {
    /// A mesh whose `echo.toml` holds `echo_toml` from the start, so the
    /// sidecars have the policy before the first call.
    fn start(echo_toml: &str) -> Self {
        Self(TestMesh::start(PROXY, &[("echo.toml", echo_toml)]))
    }

    /// An echo instance named `name` behind a sidecar of mesh service
    /// `echo` registering `version` (none if empty).
    fn instance(&self, name: &str, version: &str) -> Instance {
        let echo = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[]);
        let identity = self.identity("echo");
        let mut args = vec!["--drain-delay", "500ms", "--lease-ttl", "2s"];
        if !version.is_empty() {
            args.extend(["--service-version", version]);
        }
        let proxy = spawn_proxy(
            &proxy_bin(),
            name,
            ProxyOptions::new(&identity, Some(echo.addr), Some(self.registry.addr)).args(&args),
        );
        Instance { echo, proxy }
    }

    /// The sidecar of a calling mesh service with no server of its own.
    fn caller(&self, service: &str) -> RunningProxy {
        let identity = self.identity(service);
        spawn_proxy(
            &proxy_bin(),
            service,
            ProxyOptions::new(&identity, None, Some(self.registry.addr)),
        )
    }

    fn config_client(&self) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::new(self.control_channel("observer"))
    }

    /// Waits until the registry lists `n` serving instances of `echo`.
    async fn wait_serving(&self, n: usize) {
        self.0.wait_serving("echo", n).await;
    }

    /// Rewrites `echo.toml` atomically.
    fn write_echo_config(&self, text: &str) {
        write_atomically(self.config.path(), "echo.toml", text);
    }

    async fn config_status(&self) -> cfg::GetConfigStatusResponse {
        self.config_client()
            .get_config_status(cfg::GetConfigStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the registry serves an effective `echo` configuration
    /// that `holds` (described by `what`); fails naming the problems the
    /// registry reports otherwise. This separates "the registry did not
    /// take the policy" from "the sidecars did not apply it".
    async fn wait_echo_config(&self, what: &str, holds: impl Fn(&cfg::ServiceConfig) -> bool) {
        let mut client = self.config_client();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let config = client
                .get_config(cfg::GetConfigRequest {
                    service: "echo".into(),
                })
                .await
                .map(|r| r.into_inner().config.unwrap_or_default());
            if config.as_ref().is_ok_and(&holds) {
                return;
            }
            if Instant::now() > deadline {
                let status = self.config_status().await;
                panic!(
                    "the registry does not serve {what} for echo\nconfig: {config:?}\nproblems: {:#?}",
                    status.problems
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Instance {
    /// A client of the echo service itself, bypassing the mesh.
    fn direct(&self) -> EchoServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.echo.addr))
            .unwrap()
            .connect_lazy();
        EchoServiceClient::new(channel)
    }

    /// Sets this instance's faults (all zero clears them).
    async fn inject(&self, delay: Duration, fail_code: Code, fail_ratio: f64) {
        self.direct()
            .inject(echo::InjectRequest {
                delay: Some(delay.try_into().unwrap()),
                fail_code: fail_code as i32,
                fail_ratio,
            })
            .await
            .unwrap_or_else(|s| panic!("Inject on {}: {s:?}", self.echo.name));
    }

    async fn clear_faults(&self) {
        self.inject(Duration::ZERO, Code::Ok, 0.0).await;
    }

    async fn stats(&self) -> echo::GetStatsResponse {
        self.direct()
            .get_stats(echo::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn calls_of(&self, method: &str) -> u64 {
        self.stats()
            .await
            .calls_by_method
            .get(method)
            .copied()
            .unwrap_or(0)
    }
}

/// A client of a sidecar's outbound port, as the local service has.
fn client(proxy: &RunningProxy) -> EchoServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .connect_lazy();
    EchoServiceClient::new(channel)
}

/// An Echo request that gives up after `timeout`, so no test waits on a
/// misbehaving proxy for longer than it means to.
fn echo_request(message: &str, timeout: Duration) -> tonic::Request<echo::EchoRequest> {
    let mut request = tonic::Request::new(echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    });
    request.set_timeout(timeout);
    request
}

fn sleep_request(duration: Duration, timeout: Duration) -> tonic::Request<echo::SleepRequest> {
    let mut request = tonic::Request::new(echo::SleepRequest {
        duration: Some(duration.try_into().unwrap()),
    });
    request.set_timeout(timeout);
    request
}

/// Calls Echo until every one of `names` has answered (the caller's
/// sidecar has discovered them all).
async fn wait_seen(client: &mut EchoServiceClient<Channel>, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = std::collections::HashSet::new();
    while !names.iter().all(|n| seen.contains(*n)) {
        if let Ok(r) = client
            .echo(echo_request("warm-up", Duration::from_secs(2)))
            .await
        {
            seen.insert(r.into_inner().instance);
        }
        assert!(Instant::now() < deadline, "only {seen:?} answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The route of `config` for exactly `method`.
fn route<'a>(config: &'a cfg::ServiceConfig, method: &str) -> Option<&'a cfg::RoutePolicy> {
    config.routes.iter().find(|r| r.method_match == method)
}

fn status_line(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

// ---------------------------------------------------------------------
// Must show 1: balancing around one slow instance of three.
// ---------------------------------------------------------------------

/// One route per balancer, so the three run side by side under the same
/// load and the same machine noise: Echo round robin, Sleep(0) peak EWMA,
/// Record least request.
const BALANCING: &str = r#"
[[routes]]
method = "trellis.echo.v1.EchoService/Echo"
load_balancing = "round_robin"

[[routes]]
method = "trellis.echo.v1.EchoService/Sleep"
load_balancing = "peak_ewma"

[[routes]]
method = "trellis.echo.v1.EchoService/Record"
load_balancing = "least_request"
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Balancer {
    RoundRobin,
    PeakEwma,
    LeastRequest,
}

impl Balancer {
    const ALL: [Balancer; 3] = [
        Balancer::RoundRobin,
        Balancer::PeakEwma,
        Balancer::LeastRequest,
    ];

    /// One call of the method whose route uses this balancer; the
    /// instance that answered.
    async fn call(self, client: &mut EchoServiceClient<Channel>) -> Result<String, Status> {
        let timeout = Duration::from_secs(5);
        match self {
            Balancer::RoundRobin => client
                .echo(echo_request("rr", timeout))
                .await
                .map(|r| r.into_inner().instance),
            Balancer::PeakEwma => client
                .sleep(sleep_request(Duration::ZERO, timeout))
                .await
                .map(|r| r.into_inner().instance),
            Balancer::LeastRequest => {
                let mut request = tonic::Request::new(echo::RecordRequest {
                    message: "lr".into(),
                });
                request.set_timeout(timeout);
                client
                    .record(request)
                    .await
                    .map(|r| r.into_inner().instance)
            }
        }
    }
}

/// Latencies of one balancer's measured calls.
#[derive(Debug)]
struct Summary {
    calls: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
    /// Share of the calls the slow instance answered.
    slow_share: f64,
}

impl Summary {
    fn of(samples: &[(Duration, String)], slow: &str) -> Self {
        let mut latencies: Vec<Duration> = samples.iter().map(|(d, _)| *d).collect();
        latencies.sort();
        let calls = latencies.len();
        let at = |p: usize| latencies[(calls * p / 100).min(calls - 1)];
        let slow_calls = samples.iter().filter(|(_, i)| i == slow).count();
        Self {
            calls,
            p50: at(50),
            p99: at(99),
            mean: latencies.iter().sum::<Duration>() / calls as u32,
            slow_share: slow_calls as f64 / calls as f64,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_steers_around_a_slow_instance_that_round_robin_keeps_calling() {
    const WORKERS: usize = 8;
    const PER_BALANCER: usize = 500;
    const SLOW: &str = "lb-slow";
    let mesh = Mesh::start(BALANCING);
    let names = ["lb-a", "lb-b", SLOW];
    let instances: Vec<Instance> = names.iter().map(|n| mesh.instance(n, "")).collect();
    let caller = mesh.caller("frontend");
    mesh.wait_serving(3).await;
    mesh.wait_echo_config("a balancer per route", |c| {
        let lb = |m: &str| route(c, &format!("{ECHO}/{m}")).map(|r| r.load_balancing());
        lb("Echo") == Some(cfg::LoadBalancing::RoundRobin)
            && lb("Sleep") == Some(cfg::LoadBalancing::PeakEwma)
            && lb("Record") == Some(cfg::LoadBalancing::LeastRequest)
    })
    .await;
    let mut warm = client(&caller);
    wait_seen(&mut warm, &names).await;
    instances[2]
        .inject(Duration::from_millis(250), Code::Ok, 0.0)
        .await;

    // A short warm-up lets the latency estimates learn the slow instance;
    // it is not measured.
    let measure_from = Instant::now() + Duration::from_millis(1500);
    let deadline = measure_from + Duration::from_secs(25);
    let measured: Arc<[AtomicUsize; 3]> = Arc::default();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut client = client(&caller);
            let measured = measured.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let enough = || {
                    measured
                        .iter()
                        .all(|m| m.load(Ordering::Relaxed) >= PER_BALANCER)
                };
                // Each worker starts the cycle at a different balancer, so
                // at any moment all three have calls in flight.
                let mut next = w % Balancer::ALL.len();
                while Instant::now() < deadline && !enough() {
                    let balancer = Balancer::ALL[next];
                    next = (next + 1) % Balancer::ALL.len();
                    let started = Instant::now();
                    let result = balancer.call(&mut client).await;
                    let took = started.elapsed();
                    if started >= measure_from {
                        measured[balancer as usize].fetch_add(1, Ordering::Relaxed);
                        samples.push((balancer, took, result));
                    } else if let Err(status) = result {
                        samples.push((balancer, took, Err(status)));
                    }
                }
                samples
            })
        })
        .collect();
    let mut by_balancer: HashMap<Balancer, Vec<(Duration, String)>> = HashMap::new();
    for worker in workers {
        for (balancer, took, result) in worker.await.unwrap() {
            let instance = result
                .unwrap_or_else(|s| panic!("a {balancer:?} call failed after {took:?}: {s:?}"));
            by_balancer
                .entry(balancer)
                .or_default()
                .push((took, instance));
        }
    }
    let summary = |b: Balancer| {
        let samples = by_balancer.get(&b).map_or(&[][..], Vec::as_slice);
        assert!(
            samples.len() >= 200,
            "{} {b:?} calls: too few to judge",
            samples.len()
        );
        Summary::of(samples, SLOW)
    };
    let (rr, ewma, lr) = (
        summary(Balancer::RoundRobin),
        summary(Balancer::PeakEwma),
        summary(Balancer::LeastRequest),
    );
    for (name, s) in [
        ("round_robin  ", &rr),
        ("peak_ewma    ", &ewma),
        ("least_request", &lr),
    ] {
        eprintln!(
            "{name}: {} calls, p50 {:?}, p99 {:?}, mean {:?}, {:.1} % to the slow instance",
            s.calls,
            s.p50,
            s.p99,
            s.mean,
            s.slow_share * 100.0
        );
    }
    // Round robin sends the slow instance its third, so its p99 is the
    // injected delay: the yardstick.
    assert!(
        rr.slow_share > 0.2,
        "round robin skipped the slow instance: {rr:?}"
    );
    assert!(rr.p99 >= Duration::from_millis(150), "{rr:?}");
    assert!(
        ewma.p99 < rr.p99 / 2,
        "peak EWMA p99 {:?} is not far below round robin's {:?}",
        ewma.p99,
        rr.p99
    );
    // Least request still gives the slow instance a call whenever it is
    // the less busy of the two it picks; should that reach a percent of
    // calls, its p99 is the delay too. Its gain is judged by the share
    // and the mean, and its p99 must be no worse than round robin's.
    assert!(
        lr.slow_share < rr.slow_share / 2.0 && lr.mean < rr.mean,
        "least request does not avoid the slow instance: {lr:?} vs round robin {rr:?}"
    );
    assert!(
        lr.p99 <= rr.p99 + Duration::from_millis(50),
        "{lr:?} vs {rr:?}"
    );
}

// ---------------------------------------------------------------------
// Must show 2: the circuit breaker.
// ---------------------------------------------------------------------

const CIRCUIT: &str = r#"
[[routes]]
method = "*"

[routes.retry]
max_attempts = 1

[circuit_breaker]
consecutive_failures = 5
failure_rate = 0
open_for = "1s"
half_open_calls = 1
"#;

/// Whether `status` is the caller's sidecar refusing a call because the
/// circuit to echo is open.
fn circuit_open(status: &Status) -> bool {
    let message = status.message().to_lowercase();
    status.code() == Code::Unavailable && message.contains("circuit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_opens_the_circuit_and_a_probe_closes_it() {
    let delay = Duration::from_millis(500);
    // Far below the delay every call reaching an instance waits.
    let fast = Duration::from_millis(250);
    let mesh = Mesh::start(CIRCUIT);
    let instances = [mesh.instance("cb-a", ""), mesh.instance("cb-b", "")];
    let caller = mesh.caller("frontend");
    mesh.wait_serving(2).await;
    mesh.wait_echo_config("the circuit breaker", |c| {
        c.circuit_breaker
            .as_ref()
            .is_some_and(|b| b.consecutive_failures == 5 && b.half_open_calls == 1)
    })
    .await;
    let mut client = client(&caller);
    wait_seen(&mut client, &["cb-a", "cb-b"]).await;
    let state = || caller.metric("trellis_proxy_circuit_state", &[("service", "echo")]);
    assert!(matches!(state(), None | Some(0.0)), "{:?}", state());

    for instance in &instances {
        instance.inject(delay, Code::Unavailable, 1.0).await;
    }

    // Five failures in a row reach the instances; the sixth call is
    // refused at once.
    let mut failures = Vec::new();
    let refused = loop {
        assert!(
            failures.len() < 10,
            "the circuit never opened; failures: {failures:?}"
        );
        let started = Instant::now();
        let status = client
            .echo(echo_request("failing", Duration::from_secs(5)))
            .await
            .expect_err("every instance fails every call");
        let took = started.elapsed();
        if circuit_open(&status) {
            break (took, status);
        }
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        failures.push((took, status_line(&status)));
    };
    let opened = Instant::now();
    assert_eq!(
        failures.len(),
        5,
        "the circuit opened after {} failures, not 5: {failures:?}",
        failures.len()
    );
    let (took, status) = refused;
    assert!(took < fast, "the refusal took {took:?}");
    let message = status.message().to_lowercase();
    assert!(
        message.contains("echo") && message.contains("open"),
        "the refusal must name the service and say the circuit is open: {status:?}"
    );
    assert_eq!(state(), Some(1.0), "circuit state while open");
    let rejected = caller.metric(
        "trellis_proxy_circuit_rejected_total",
        &[("service", "echo")],
    );
    assert!(rejected.is_some_and(|r| r > 0.0), "{rejected:?}");

    // While open, calls fail fast and none reaches an instance.
    let mut before = 0;
    for instance in &instances {
        before += instance.calls_of("Echo").await;
    }
    let mut refusals = 0;
    while opened.elapsed() < Duration::from_millis(500) {
        let started = Instant::now();
        let status = client
            .echo(echo_request("refused", Duration::from_secs(5)))
            .await
            .expect_err("the circuit is open");
        assert!(circuit_open(&status), "{status:?}");
        assert!(started.elapsed() < fast, "{:?}", started.elapsed());
        refusals += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut after = 0;
    for instance in &instances {
        after += instance.calls_of("Echo").await;
    }
    assert!(refusals >= 5, "only {refusals} calls while open");
    assert_eq!(
        after,
        before,
        "{} calls reached the instances while the circuit was open",
        after - before
    );

    // The service recovers; the breaker still holds calls back until
    // open_for has passed, then a probe succeeds and the circuit closes.
    for instance in &instances {
        instance.clear_faults().await;
    }
    let recovered = loop {
        match client
            .echo(echo_request("probe?", Duration::from_secs(5)))
            .await
        {
            Ok(_) => break opened.elapsed(),
            Err(status) => assert!(
                status.code() == Code::Unavailable && opened.elapsed() < Duration::from_secs(5),
                "no recovery {:?} after the circuit opened: {status:?}",
                opened.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("first success {recovered:?} after the circuit opened");
    assert!(
        recovered >= Duration::from_millis(900),
        "a call got through {recovered:?} after the circuit opened, before open_for (1s)"
    );
    for i in 0..10 {
        client
            .echo(echo_request("closed", Duration::from_secs(2)))
            .await
            .unwrap_or_else(|s| panic!("call {i} after the probe: {s:?}"));
    }
    assert_eq!(state(), Some(0.0), "circuit state after a successful probe");
}

// ---------------------------------------------------------------------
// Must show 3: concurrency limits, on the callee's side and the caller's.
// ---------------------------------------------------------------------

const ROUTE_LIMIT: &str = r#"
[[routes]]
method = "trellis.echo.v1.EchoService/Sleep"

[routes.retry]
max_attempts = 1

[routes.limit]
max_concurrent = 3
max_queued = 0
"#;

const CALLER_LIMIT: &str = r#"
[[routes]]
method = "*"

[routes.retry]
max_attempts = 1

[caller_limit]
max_concurrent = 3
max_queued = 0
"#;

/// How a burst of simultaneous calls ended.
#[derive(Debug, Default)]
struct Burst {
    ok: Vec<Duration>,
    shed: Vec<(Duration, String)>,
    other: Vec<(Duration, String)>,
}

/// `calls` Sleep(1.5 s) calls sent at once through `proxy`.
async fn burst(proxy: &RunningProxy, calls: usize) -> Burst {
    let start = Arc::new(tokio::sync::Barrier::new(calls));
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            let mut client = client(proxy);
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let started = Instant::now();
                let request = sleep_request(Duration::from_millis(1500), Duration::from_secs(10));
                let result = client.sleep(request).await;
                (started.elapsed(), result)
            })
        })
        .collect();
    let mut burst = Burst::default();
    for task in tasks {
        match task.await.unwrap() {
            (took, Ok(_)) => burst.ok.push(took),
            (took, Err(s)) if s.code() == Code::ResourceExhausted => {
                burst.shed.push((took, s.message().to_owned()));
            }
            (took, Err(s)) => burst.other.push((took, status_line(&s))),
        }
    }
    burst
}

/// `burst` had `ok` calls served and `shed` refused at once with
/// RESOURCE_EXHAUSTED naming the limit.
fn assert_shed(burst: &Burst, ok: usize, shed: usize) {
    assert!(burst.other.is_empty(), "{burst:?}");
    assert_eq!((burst.ok.len(), burst.shed.len()), (ok, shed), "{burst:?}");
    for (took, message) in &burst.shed {
        assert!(
            *took < Duration::from_millis(500),
            "a shed call took {took:?}: {burst:?}"
        );
        assert!(
            message.contains("limit"),
            "the message names no limit: {message:?}"
        );
    }
    for took in &burst.ok {
        assert!(*took >= Duration::from_millis(1400), "{burst:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_sheds_the_calls_over_it_at_the_callee() {
    let mesh = Mesh::start(ROUTE_LIMIT);
    let limited = mesh.instance("limited", "");
    let caller = mesh.caller("frontend");
    mesh.wait_serving(1).await;
    mesh.wait_echo_config("a limit of 3 on Sleep", |c| {
        route(c, &format!("{ECHO}/Sleep"))
            .and_then(|r| r.limit)
            .is_some_and(|l| l.max_concurrent == 3 && l.max_queued == 0)
    })
    .await;
    let mut warm = client(&caller);
    wait_seen(&mut warm, &["limited"]).await;

    let burst = burst(&caller, 7).await;
    eprintln!("{burst:?}");
    assert_shed(&burst, 3, 4);
    let stats = limited.stats().await;
    assert!(stats.peak_in_flight <= 3, "{stats:?}");
    // Shed calls never reached the service.
    assert_eq!(stats.calls_by_method.get("Sleep"), Some(&3), "{stats:?}");
    let shed = limited.proxy.metric(
        "trellis_proxy_shed_total",
        &[("direction", "inbound"), ("service", ECHO)],
    );
    assert_eq!(shed, Some(4.0), "inbound shed on the instance's sidecar");
    // Other methods have no limit.
    warm.echo(echo_request("unlimited", Duration::from_secs(2)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_limit_sheds_each_callers_calls_over_it() {
    let mesh = Mesh::start(CALLER_LIMIT);
    let shared = mesh.instance("shared", "");
    let callers = [mesh.caller("frontend"), mesh.caller("backend")];
    mesh.wait_serving(1).await;
    mesh.wait_echo_config("a caller limit of 3", |c| {
        c.caller_limit
            .is_some_and(|l| l.max_concurrent == 3 && l.max_queued == 0)
    })
    .await;
    for caller in &callers {
        wait_seen(&mut client(caller), &["shared"]).await;
    }

    // Both callers at once: the limit is each caller's own.
    let (first, second) = tokio::join!(burst(&callers[0], 7), burst(&callers[1], 7));
    eprintln!("frontend {first:?}\nbackend {second:?}");
    assert_shed(&first, 3, 4);
    assert_shed(&second, 3, 4);
    let stats = shared.stats().await;
    assert!(stats.peak_in_flight <= 6, "{stats:?}");
    assert_eq!(stats.calls_by_method.get("Sleep"), Some(&6), "{stats:?}");
    for caller in &callers {
        let shed = caller.metric(
            "trellis_proxy_shed_total",
            &[("direction", "outbound"), ("service", ECHO)],
        );
        assert_eq!(shed, Some(4.0), "outbound shed on a caller's sidecar");
    }
    let inbound = shared
        .proxy
        .metric("trellis_proxy_shed_total", &[("direction", "inbound")]);
    assert!(matches!(inbound, None | Some(0.0)), "{inbound:?}");
}

// ---------------------------------------------------------------------
// Must show 4: hedging.
// ---------------------------------------------------------------------

/// One route for every EchoService method: Echo (NO_SIDE_EFFECTS) may be
/// hedged, Record (no idempotency option) never. Round robin keeps giving
/// the stalling instance first attempts.
const HEDGING: &str = r#"
[[routes]]
method = "trellis.echo.v1.EchoService/*"
load_balancing = "round_robin"

[routes.retry]
budget_ratio = 1.0

[routes.hedge]
delay = "50ms"
max_attempts = 2
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_outruns_a_stalled_instance_but_never_copies_an_unsafe_call() {
    const RECORDS: u64 = 6;
    let stall = Duration::from_secs(2);
    let mesh = Mesh::start(HEDGING);
    let instances = [mesh.instance("fast", ""), mesh.instance("stall", "")];
    let caller = mesh.caller("frontend");
    mesh.wait_serving(2).await;
    mesh.wait_echo_config("a hedge policy for EchoService", |c| {
        route(c, &format!("{ECHO}/*"))
            .and_then(|r| r.hedge)
            .is_some_and(|h| h.max_attempts == 2)
    })
    .await;
    let mut client = client(&caller);
    wait_seen(&mut client, &["fast", "stall"]).await;
    instances[1].inject(stall, Code::Ok, 0.0).await;

    let hedges = || caller.metric("trellis_proxy_hedges_total", &[("service", ECHO)]);
    for i in 0..20 {
        let started = Instant::now();
        let reply = client
            .echo(echo_request(&format!("hedged {i}"), Duration::from_secs(5)))
            .await
            .unwrap_or_else(|s| panic!("Echo {i}: {s:?}"));
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "Echo {i} took {took:?}: it waited for the stall"
        );
        assert_eq!(reply.into_inner().instance, "fast", "Echo {i}");
    }
    let hedged = hedges();
    eprintln!("hedges after 20 Echo calls: {hedged:?}");
    assert!(hedged.is_some_and(|h| h > 0.0), "{hedged:?}");

    // Record calls at once: those given to the stalling instance wait
    // it out rather than being copied to the other.
    let records: Vec<_> = (0..RECORDS)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(echo::RecordRequest {
                    message: format!("record {i}"),
                });
                request.set_timeout(Duration::from_secs(5));
                let started = Instant::now();
                let reply = client.record(request).await;
                (started.elapsed(), reply.map(|r| r.into_inner().instance))
            })
        })
        .collect();
    let mut waited_out = 0;
    for record in records {
        let (took, reply) = record.await.unwrap();
        let instance = reply.unwrap_or_else(|s| panic!("Record: {s:?}"));
        if instance == "stall" {
            assert!(took >= Duration::from_millis(1500), "{took:?}");
            waited_out += 1;
        }
    }
    assert!(
        waited_out > 0,
        "no Record went to the stalling instance, so hedging was not put to the test"
    );
    let mut recorded = 0;
    for instance in &instances {
        recorded += instance.stats().await.records;
    }
    assert_eq!(recorded, RECORDS, "Record calls were copied");
    assert_eq!(hedges(), hedged, "hedges were sent for Record");
}

// ---------------------------------------------------------------------
// Must show 5: version splits (canaries).
// ---------------------------------------------------------------------

/// An `echo.toml` splitting calls between versions by `split`, with the
/// caller `tester` allowed to pin a version.
fn split_toml(split: &[(&str, u32)]) -> String {
    let entries: Vec<String> = split
        .iter()
        .map(|(version, weight)| format!("{{ version = \"{version}\", weight = {weight} }}"))
        .collect();
    format!(
        "[traffic]\nsplit = [ {} ]\nversion_header_callers = [\"tester\"]\n",
        entries.join(", ")
    )
}

/// Whether the registry serves exactly `split` for echo.
fn serves_split(config: &cfg::ServiceConfig, split: &[(&str, u32)]) -> bool {
    config.traffic.as_ref().is_some_and(|t| {
        t.split.len() == split.len()
            && t.split
                .iter()
                .zip(split)
                .all(|(w, (version, weight))| w.version == *version && w.weight == *weight)
    })
}

/// The version an instance serves: its name up to the first `-`.
fn version_of(instance: &str) -> &str {
    instance.split('-').next().unwrap_or_default()
}

/// Three instances, `v1-a` and `v1-b` of version v1 and `v2-a` of v2, and
/// the sidecars of `frontend` (not allowed to pin a version) and `tester`
/// (allowed), both warmed up.
async fn canary_mesh(split: &[(&str, u32)]) -> (Mesh, Vec<Instance>, RunningProxy, RunningProxy) {
    let mesh = Mesh::start(&split_toml(split));
    let instances = vec![
        mesh.instance("v1-a", "v1"),
        mesh.instance("v1-b", "v1"),
        mesh.instance("v2-a", "v2"),
    ];
    let frontend = mesh.caller("frontend");
    let tester = mesh.caller("tester");
    mesh.wait_serving(3).await;
    mesh.wait_echo_config("the version split", |c| serves_split(c, split))
        .await;
    wait_seen(&mut client(&frontend), &["v1-a", "v1-b"]).await;
    wait_seen(&mut client(&tester), &["v1-a", "v1-b"]).await;
    (mesh, instances, frontend, tester)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_gives_the_canary_its_share_and_only_listed_callers_may_pin() {
    const CALLS: usize = 4000;
    const WORKERS: usize = 8;
    let (_mesh, _instances, frontend, tester) = canary_mesh(&[("v1", 90), ("v2", 10)]).await;

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut client = client(&frontend);
            tokio::spawn(async move {
                let mut by_instance: HashMap<String, usize> = HashMap::new();
                for i in 0..CALLS / WORKERS {
                    let reply = client
                        .echo(echo_request("split", Duration::from_secs(5)))
                        .await
                        .unwrap_or_else(|s| panic!("worker {w} call {i}: {s:?}"));
                    *by_instance.entry(reply.into_inner().instance).or_default() += 1;
                }
                by_instance
            })
        })
        .collect();
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    for worker in workers {
        for (instance, n) in worker.await.unwrap() {
            *by_instance.entry(instance).or_default() += n;
        }
    }
    let v2: usize = by_instance
        .iter()
        .filter(|(i, _)| version_of(i) == "v2")
        .map(|(_, n)| n)
        .sum();
    let share = v2 as f64 / CALLS as f64;
    eprintln!("{by_instance:?}: {:.1} % to v2", share * 100.0);
    // 10 % of 4,000 calls: one standard deviation is 0.5 point.
    assert!((0.07..=0.13).contains(&share), "{by_instance:?}");
    assert!(
        by_instance.contains_key("v1-a") && by_instance.contains_key("v1-b"),
        "{by_instance:?}"
    );

    // A listed caller pins the canary with the header.
    let mut pinned = client(&tester);
    for i in 0..50 {
        let mut request = echo_request("pinned", Duration::from_secs(5));
        request
            .metadata_mut()
            .insert(VERSION_HEADER, "v2".parse().unwrap());
        let reply = pinned.echo(request).await.unwrap().into_inner();
        assert_eq!(reply.instance, "v2-a", "tester's pinned call {i}");
    }
    // A version with no instance fails rather than going elsewhere.
    let mut request = echo_request("pinned", Duration::from_secs(5));
    request
        .metadata_mut()
        .insert(VERSION_HEADER, "v9".parse().unwrap());
    let status = pinned.echo(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // From a caller not listed, the header is ignored (and removed).
    let mut unlisted = client(&frontend);
    let mut v1 = 0;
    for _ in 0..100 {
        let mut request = echo_request("pin attempt", Duration::from_secs(5));
        request
            .metadata_mut()
            .insert(VERSION_HEADER, "v2".parse().unwrap());
        let reply = unlisted.echo(request).await.unwrap().into_inner();
        assert!(
            !reply.headers.contains_key(VERSION_HEADER),
            "the header reached the service: {:?}",
            reply.headers
        );
        if version_of(&reply.instance) == "v1" {
            v1 += 1;
        }
    }
    assert!(
        v1 >= 70,
        "frontend pinned v2 anyway: {v1} of 100 calls on v1"
    );
}

/// Where a steady load's calls land, and what went wrong.
#[derive(Debug, Default)]
struct Tally {
    calls: usize,
    /// The version the latest calls all landed on, and how many in a row.
    streak: (String, usize),
    failures: Vec<String>,
}

/// Waits until `n` calls in a row of `tally`'s load have landed on
/// `version`.
async fn wait_streak(tally: &Mutex<Tally>, version: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let tally = tally.lock().unwrap();
            if tally.streak.0 == version && tally.streak.1 >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "calls still land elsewhere than {version}: {tally:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sequential calls until `n` in a row land on `version`.
async fn wait_only(client: &mut EchoServiceClient<Channel>, version: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut streak = 0;
    while streak < n {
        let reply = client
            .echo(echo_request("where?", Duration::from_secs(5)))
            .await
            .unwrap();
        if version_of(&reply.into_inner().instance) == version {
            streak += 1;
        } else {
            streak = 0;
        }
        assert!(
            Instant::now() < deadline,
            "calls still land elsewhere than {version}"
        );
    }
}

/// Every one of `n` calls lands on `version`.
async fn assert_only(client: &mut EchoServiceClient<Channel>, version: &str, n: usize) {
    for i in 0..n {
        let reply = client
            .echo(echo_request("where?", Duration::from_secs(5)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(version_of(&reply.instance), version, "call {i}: {reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifting_and_rolling_back_a_split_loses_no_call_and_bad_splits_are_reported() {
    let (mesh, _instances, frontend, _tester) = canary_mesh(&[("v1", 90), ("v2", 10)]).await;

    // A steady load while the split moves to v2 and back.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let mut client = client(&frontend);
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let result = client
                        .echo(echo_request(&format!("w{w} {i}"), Duration::from_secs(3)))
                        .await;
                    {
                        let mut tally = tally.lock().unwrap();
                        tally.calls += 1;
                        match result {
                            Ok(reply) => {
                                let version = version_of(&reply.get_ref().instance).to_owned();
                                if tally.streak.0 == version {
                                    tally.streak.1 += 1;
                                } else {
                                    tally.streak = (version, 1);
                                }
                            }
                            Err(s) => tally
                                .failures
                                .push(format!("w{w} {i}: {}", status_line(&s))),
                        }
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    while tally.lock().unwrap().calls < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_v2 = [("v2", 100)];
    mesh.write_echo_config(&split_toml(&all_v2));
    mesh.wait_echo_config("100 % v2", |c| serves_split(c, &all_v2))
        .await;
    wait_streak(&tally, "v2", 200).await;
    let all_v1 = [("v1", 100)];
    mesh.write_echo_config(&split_toml(&all_v1));
    mesh.wait_echo_config("100 % v1", |c| serves_split(c, &all_v1))
        .await;
    wait_streak(&tally, "v1", 200).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let (calls, failures) = {
        let tally = tally.lock().unwrap();
        (tally.calls, tally.failures.clone())
    };
    eprintln!("{calls} calls under load");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:?}",
        failures.len()
    );

    // A version with no instance: its share goes to the others, and the
    // registry reports the split without rejecting it. (From v2 first, so
    // the change shows.)
    let mut client = client(&frontend);
    mesh.write_echo_config(&split_toml(&all_v2));
    wait_only(&mut client, "v2", 50).await;
    let absent = [("v1", 50), ("v3", 50)];
    mesh.write_echo_config(&split_toml(&absent));
    mesh.wait_echo_config("v1 50 / v3 50", |c| serves_split(c, &absent))
        .await;
    wait_only(&mut client, "v1", 50).await;
    assert_only(&mut client, "v1", 200).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = mesh.config_status().await;
        let v3 = status
            .problems
            .iter()
            .find(|p| p.file == "echo.toml" && p.message.contains("v3"));
        if let Some(problem) = v3 {
            assert!(!problem.rejected, "{problem:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no problem names v3: {:#?}",
            status.problems
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bad edit (weights adding up to 120) is rejected with its file and
    // line; the last good split (all on v1) stays in force.
    mesh.write_echo_config(
        "# The weights add up to 120.\n\
         [traffic]\n\
         split = [\n\
         \x20 { version = \"v1\", weight = 60 },\n\
         \x20 { version = \"v2\", weight = 60 },\n\
         ]\n\
         version_header_callers = [\"tester\"]\n",
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let problem = loop {
        let status = mesh.config_status().await;
        if let Some(p) = status
            .problems
            .into_iter()
            .find(|p| p.file == "echo.toml" && p.rejected)
        {
            break p;
        }
        assert!(Instant::now() < deadline, "the bad edit was not rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{problem:?}");
    assert!(
        (2..=6).contains(&problem.line),
        "the problem is not on a line of [traffic]: {problem:?}"
    );
    // Long enough for a wrongly accepted split to reach the sidecar.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_only(&mut client, "v1", 10).await;
    }
}
