//! A sidecar given several registries (`--registry A,B`) moves to the next
//! when the one in use dies, with real processes on 127.0.0.1. The two
//! registries here keep their own state (no shared store), the harder
//! case: the second one does not know the sidecar's registration and
//! numbers its revisions itself, so the sidecar registers again there and
//! resyncs its view from its snapshot.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis::pb::trellis::echo::v1 as echo;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    EchoLoad, ProxyOptions, RunningEcho, RunningProxy, RunningRegistry, TestPki, free_port,
    sibling_binary, spawn_echo, spawn_proxy, spawn_registry,
};

use echo::echo_service_client::EchoServiceClient;
use reg::registry_service_client::RegistryServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";
/// What the sidecar under test registers its own service as (its app is
/// an echo server, but echo's gRPC service belongs to the `echo` identity).
const CALLER: &str = "test.failover.v1.Caller";

/// A CA, one config directory, and registries that share nothing else.
struct Plane {
    pki: TestPki,
    config: tempfile::TempDir,
}

impl Plane {
    fn new() -> Self {
        Self {
            pki: TestPki::new("trellis.local"),
            config: tempfile::tempdir().unwrap(),
        }
    }

    fn registry(&self) -> RunningRegistry {
        spawn_registry(
            sibling_binary(PROXY, "trellis-registry").to_str().unwrap(),
            &self.identity("registry"),
            self.config.path(),
        )
    }

    fn identity(&self, service: &str) -> trellis::identity::IdentityPaths {
        let paths = trellis::identity::IdentityPaths::in_dir(self.pki.dir(), service);
        if paths.cert.exists() {
            return paths;
        }
        self.pki.issue(service, service)
    }

    fn client(&self, registry: SocketAddr) -> RegistryServiceClient<Channel> {
        let workload = trellis::Workload::load(&self.identity("observer")).unwrap();
        RegistryServiceClient::new(
            channel(
                &workload,
                registry,
                ExpectedPeer::Exactly(self.pki.id("registry")),
            )
            .unwrap(),
        )
    }

    /// How many instances of `target` `registry` lists (0 when it cannot
    /// answer).
    async fn resolved(&self, registry: SocketAddr, target: &str) -> usize {
        self.client(registry)
            .resolve(reg::ResolveRequest {
                target: target.into(),
            })
            .await
            .map(|r| r.into_inner().instances.len())
            .unwrap_or(0)
    }

    async fn wait_resolved(&self, registry: SocketAddr, target: &str, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.resolved(registry, target).await;
            if got == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{registry} lists {got} instances of {target}, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A sidecar in front of `app` as `service`, given `registry`.
    fn sidecar(
        &self,
        name: &str,
        service: &str,
        app: SocketAddr,
        registry: &str,
        extra: &[&str],
    ) -> RunningProxy {
        let mut args = vec![
            "--registry",
            registry,
            "--lease-ttl",
            "3s",
            "--drain-delay",
            "200ms",
        ];
        args.extend_from_slice(extra);
        spawn_proxy(
            &PathBuf::from(PROXY),
            name,
            ProxyOptions::new(&self.identity(service), Some(app), None).args(&args),
        )
    }
}

fn echo_app(name: &str) -> RunningEcho {
    spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[])
}

fn client(proxy: &RunningProxy) -> EchoServiceClient<Channel> {
    EchoServiceClient::new(
        Channel::from_shared(format!("http://{}", proxy.outbound))
            .unwrap()
            .connect_lazy(),
    )
}

fn say(message: &str) -> echo::EchoRequest {
    echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    }
}

/// Calls through `client` until one is served by instance `name`.
async fn until_served_by(client: &EchoServiceClient<Channel>, name: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = client.clone().echo(say("who?")).await
            && r.into_inner().instance == name
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_sidecar_follows_the_next_registry_when_the_one_in_use_dies() {
    let plane = Plane::new();
    let mut a = plane.registry();
    let b = plane.registry();
    let (a_addr, b_addr) = (a.addr, b.addr);
    let both = format!("{a_addr},{b_addr}");

    // The callee, registered at both registries: one echo server behind
    // two sidecars, one per registry.
    let callee = echo_app("c1");
    let _callee_at_a = plane.sidecar("c1-a", "echo", callee.addr, &a_addr.to_string(), &[]);
    let _callee_at_b = plane.sidecar("c1-b", "echo", callee.addr, &b_addr.to_string(), &[]);

    // The sidecar under test, given both, uses A.
    let app = echo_app("caller");
    let sidecar = plane.sidecar(
        "caller",
        "caller",
        app.addr,
        &both,
        &["--grpc-services", CALLER],
    );
    plane
        .wait_resolved(a_addr, CALLER, 1, Duration::from_secs(15))
        .await;
    assert_eq!(plane.resolved(b_addr, CALLER).await, 0);
    plane
        .wait_resolved(b_addr, ECHO, 1, Duration::from_secs(15))
        .await;
    let calls = client(&sidecar);
    assert!(
        until_served_by(&calls, "c1", Duration::from_secs(15)).await,
        "no call reached the callee:\n{}",
        sidecar.process.output()
    );

    let load = EchoLoad::start(sidecar.outbound);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = load.failed();

    // SIGKILL A: the sidecar registers at B within a few seconds.
    a.process.kill();
    let killed = Instant::now();
    plane
        .wait_resolved(b_addr, CALLER, 1, Duration::from_secs(5))
        .await;
    let registered_at_b = killed.elapsed();
    let logged = sidecar
        .process
        .wait_for_output("moving to the next", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("no failover logged:\n{}", sidecar.process.output()));
    let line = logged
        .lines()
        .find(|l| l.contains("moving to the next"))
        .unwrap();
    assert!(
        line.contains(&a_addr.to_string()) && line.contains(&b_addr.to_string()),
        "the failover log names both registries: {line}"
    );
    assert_eq!(
        logged.matches("moving to the next").count(),
        1,
        "one failover, logged once:\n{logged}"
    );

    // Its watch follows B: an instance registered only at B gets calls.
    let late = echo_app("c2");
    let _late_at_b = plane.sidecar("c2-b", "echo", late.addr, &b_addr.to_string(), &[]);
    plane
        .wait_resolved(b_addr, ECHO, 2, Duration::from_secs(15))
        .await;
    let seen = Instant::now();
    assert!(
        until_served_by(&calls, "c2", Duration::from_secs(5)).await,
        "the sidecar never routed to an instance only B knows:\n{}",
        sidecar.process.output()
    );
    let routed_within = seen.elapsed();

    // From here on nothing fails.
    let during = load.failed() - before;
    let settled = load.failed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed, errors) = load.stop().await;
    let after = failed - settled;
    eprintln!(
        "registered at B {registered_at_b:?} after A was killed; routed to an instance only B knows within {routed_within:?}; \
         {ok} calls succeeded, {during} failed during the failover, {after} after"
    );
    assert!(ok > 200, "too few calls to tell: {ok}");
    assert_eq!(before, 0, "calls failed before the failover: {errors:?}");
    assert_eq!(after, 0, "calls failed after the failover: {errors:?}");
    assert_eq!(
        during, 0,
        "calls failed during the failover (the callee never moved): {errors:?}"
    );
    assert!(sidecar.admin_get("/ready").0 == 200, "still ready");
}

#[tokio::test]
async fn a_sidecar_starts_on_whichever_registry_answers() {
    let plane = Plane::new();
    let live = plane.registry();
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let callee = echo_app("c1");
    let _callee = plane.sidecar("c1", "echo", callee.addr, &live.addr.to_string(), &[]);

    // The dead one first, then the live one by name (`localhost` may
    // resolve to ::1 first, where nothing listens: its next address is
    // tried); and the live one first, the dead one second.
    let by_name = format!("{dead},localhost:{}", live.addr.port());
    let live_first = format!("{},{dead}", live.addr);
    for (name, registry) in [("dead-first", by_name), ("live-first", live_first)] {
        let app = echo_app(name);
        let own = format!("test.failover.v1.{}", name.replace('-', "_"));
        let sidecar = plane.sidecar(name, name, app.addr, &registry, &["--grpc-services", &own]);
        assert!(
            until_served_by(&client(&sidecar), "c1", Duration::from_secs(10)).await,
            "{name} ({registry}) never routed:\n{}",
            sidecar.process.output()
        );
        plane
            .wait_resolved(live.addr, name, 1, Duration::from_secs(10))
            .await;
    }
}

/// `mesh-proxy` with `--registry value` (and flags that would otherwise
/// do): its exit status and stderr.
fn proxy_with_registry(value: &str, by_env: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new(PROXY);
    cmd.args([
        "--cert",
        "/nonexistent/proxy.pem",
        "--key",
        "/nonexistent/proxy.key",
        "--ca",
        "/nonexistent/ca.pem",
    ])
    .env_remove("TRELLIS_PROXY_REGISTRY");
    if by_env {
        cmd.env("TRELLIS_PROXY_REGISTRY", value);
    } else {
        cmd.args(["--registry", value]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_registry_lists_are_refused_at_start_naming_the_entry() {
    let seventeen: Vec<String> = (0..17).map(|i| format!("10.0.0.{i}:7000")).collect();
    let seventeen = seventeen.join(",");
    for (value, named) in [
        (seventeen.as_str(), "entry 17 (\"10.0.0.16:7000\")"),
        ("127.0.0.1:7000,,127.0.0.1:7001", "entry 2 is empty"),
        ("nonsense", "entry 1 (\"nonsense\")"),
        (
            "127.0.0.1:7000,registry:http",
            "entry 2 (\"registry:http\")",
        ),
    ] {
        for by_env in [false, true] {
            let (code, stderr) = proxy_with_registry(value, by_env);
            assert!(
                code.is_some_and(|c| c != 0),
                "{value:?} accepted ({code:?}): {stderr}"
            );
            assert!(
                stderr.contains(named),
                "{value:?}: no {named:?} in {stderr}"
            );
            assert!(stderr.contains("--registry"), "{stderr}");
        }
    }
}
