//! The mesh on a replicated control plane, with real processes on
//! 127.0.0.1: a three-member etcd cluster, two registry replicas on it
//! (`--store etcd://…`), echo instances whose sidecars are given both
//! replicas, and an edge in front. Losing a replica, then an etcd member,
//! costs no call, and both come back in step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis::pb::trellis::echo::v1 as echo;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    EchoLoad, EtcdCluster, ProxyOptions, RunningEcho, RunningProxy, RunningRegistry, TestPki,
    free_port, sibling_binary, spawn_echo, spawn_proxy, spawn_registry_with,
};

use echo::echo_service_client::EchoServiceClient;
use reg::registry_service_client::RegistryServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";

struct ControlPlane {
    pki: TestPki,
    config: tempfile::TempDir,
    etcd: EtcdCluster,
    replicas: Vec<(SocketAddr, Option<RunningRegistry>)>,
}

/// One echo instance and its sidecar.
struct Instance {
    _echo: RunningEcho,
    _proxy: RunningProxy,
}

impl ControlPlane {
    fn start(replicas: usize) -> Self {
        let mut plane = Self {
            pki: TestPki::new("trellis.local"),
            config: tempfile::tempdir().unwrap(),
            etcd: EtcdCluster::start(3),
            replicas: Vec::new(),
        };
        for _ in 0..replicas {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            plane.replicas.push((addr, None));
            plane.restart_replica(plane.replicas.len() - 1);
        }
        plane
    }

    fn restart_replica(&mut self, i: usize) {
        let addr = self.replicas[i].0;
        let running = spawn_registry_with(
            sibling_binary(PROXY, "trellis-registry").to_str().unwrap(),
            &self.pki.issue("registry", "registry"),
            self.config.path(),
            addr,
            &["--store", &self.etcd.store_url()],
        );
        self.replicas[i].1 = Some(running);
    }

    fn kill_replica(&mut self, i: usize) {
        let mut running = self.replicas[i].1.take().expect("running");
        running.process.kill();
    }

    /// Every replica's address, comma-separated, for `--registry`.
    fn registry_flag(&self) -> String {
        self.replicas
            .iter()
            .map(|(a, _)| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn identity(&self, service: &str) -> trellis::identity::IdentityPaths {
        let paths = trellis::identity::IdentityPaths::in_dir(self.pki.dir(), service);
        if paths.cert.exists() {
            return paths;
        }
        self.pki.issue(service, service)
    }

    fn client(&self, i: usize) -> RegistryServiceClient<Channel> {
        let workload = trellis::Workload::load(&self.identity("observer")).unwrap();
        RegistryServiceClient::new(
            channel(
                &workload,
                self.replicas[i].0,
                ExpectedPeer::Exactly(self.pki.id("registry")),
            )
            .unwrap(),
        )
    }

    /// The echo instances replica `i` resolves (none when it cannot).
    async fn resolved(&self, i: usize) -> Vec<reg::Instance> {
        self.client(i)
            .resolve(reg::ResolveRequest {
                target: ECHO.into(),
            })
            .await
            .map(|r| r.into_inner().instances)
            .unwrap_or_default()
    }

    async fn wait_resolved(&self, i: usize, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.resolved(i).await.len();
            if got == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} resolves {got} echo instances, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An echo instance whose sidecar is given `registry` (`A,B`, or one).
    fn instance(&self, name: &str, registry: &str) -> Instance {
        let echo = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[]);
        let proxy = spawn_proxy(
            &PathBuf::from(PROXY),
            name,
            ProxyOptions::new(&self.identity("echo"), Some(echo.addr), None).args(&[
                "--registry",
                registry,
                "--drain-delay",
                "300ms",
                "--lease-ttl",
                "3s",
            ]),
        );
        Instance {
            _echo: echo,
            _proxy: proxy,
        }
    }
}

fn say(message: &str) -> echo::EchoRequest {
    echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    }
}

#[tokio::test]
async fn losing_a_replica_and_an_etcd_member_costs_no_call() {
    let mut plane = ControlPlane::start(2);
    let both = plane.registry_flag();
    let (a, b) = (
        plane.replicas[0].0.to_string(),
        plane.replicas[1].0.to_string(),
    );

    // A caller whose sidecar watches replica B only sees, within a second,
    // an instance that registered through replica A only.
    let caller = spawn_proxy(
        &PathBuf::from(PROXY),
        "caller",
        ProxyOptions::new(&plane.identity("caller"), None, None).args(&["--registry", &b]),
    );
    let through_b = EchoServiceClient::new(
        Channel::from_shared(format!("http://{}", caller.outbound))
            .unwrap()
            .connect_lazy(),
    );
    let first = plane.instance("e1", &a);
    let deadline = Instant::now() + Duration::from_secs(15);
    while plane.resolved(0).await.is_empty() {
        assert!(Instant::now() < deadline, "e1 never registered through A");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let registered = Instant::now();
    loop {
        if through_b.clone().echo(say("seen?")).await.is_ok() {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(1),
            "the sidecar watching B did not route to e1 within a second:\n{}",
            caller.process.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen_within = registered.elapsed();

    // A SIGKILLed instance leaves both replicas' views within its lease.
    drop(first);
    let killed = Instant::now();
    plane.wait_resolved(0, 0, Duration::from_secs(6)).await;
    plane.wait_resolved(1, 0, Duration::from_secs(1)).await;
    let expired_within = killed.elapsed();

    // The rest of the mesh is given both replicas.
    let _second = plane.instance("e2", &both);
    plane.wait_resolved(1, 1, Duration::from_secs(15)).await;
    let edge_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = spawn_proxy(
        &PathBuf::from(PROXY),
        "edge",
        ProxyOptions::new(&plane.identity("edge"), None, None).args(&[
            "--registry",
            &both,
            "--edge",
            &edge_addr.to_string(),
        ]),
    );
    let through_edge = EchoServiceClient::new(
        Channel::from_shared(format!("http://{edge_addr}"))
            .unwrap()
            .connect_lazy(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while through_edge.clone().echo(say("warm-up")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the edge never routed:\n{}",
            edge.process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    drop(through_edge);
    let load = EchoLoad::start(edge_addr);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL replica A: calls go on; a new instance given both replicas
    // registers (through B) and the edge routes to it.
    plane.kill_replica(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _third = plane.instance("e3", &both);
    plane.wait_resolved(1, 2, Duration::from_secs(15)).await;

    // SIGKILL one etcd member: calls go on, registrations too.
    plane.etcd.kill(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _fourth = plane.instance("e4", &both);
    plane.wait_resolved(1, 3, Duration::from_secs(15)).await;

    // The member and the replica come back and catch up.
    plane.etcd.restart(0);
    plane.restart_replica(0);
    plane.wait_resolved(0, 3, Duration::from_secs(15)).await;
    let mut on_a: Vec<String> = plane
        .resolved(0)
        .await
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    let mut on_b: Vec<String> = plane
        .resolved(1)
        .await
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    on_a.sort();
    on_b.sort();
    assert_eq!(on_a, on_b, "the restarted replica serves the same mesh");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (ok, failed, errors) = load.stop().await;
    eprintln!(
        "seen through B within {seen_within:?}; a killed instance gone from both within {expired_within:?}; {ok} calls through the edge, {failed} failed"
    );
    // Its lease is 3 s; etcd sweeps expired leases every 500 ms.
    assert!(
        expired_within < Duration::from_millis(4500),
        "{expired_within:?}"
    );
    assert!(ok > 100, "too few calls to tell: {ok}");
    assert_eq!(failed, 0, "calls failed: {errors:?}");
}
