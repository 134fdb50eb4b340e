//! The registry replicated on etcd (`--store etcd://…`), against a real
//! etcd cluster and real registry processes on 127.0.0.1: replicas serve
//! one mesh with the same revisions, claims are decided by etcd, leases are
//! etcd's, and a replica without etcd says so instead of serving stale data.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus as Health;
use tonic_health::pb::health_client::HealthClient;
use trellis::Workload;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    ChildGuard, EtcdCluster, TestPki, free_port, http_get, metric_value, spawn_registry_with,
};

use reg::registry_service_client::RegistryServiceClient;

const REGISTRY: &str = env!("CARGO_BIN_EXE_trellis-registry");
const ECHO: &str = "trellis.echo.v1.EchoService";

struct Replica {
    addr: SocketAddr,
    admin: SocketAddr,
    process: ChildGuard,
}

struct Mesh {
    pki: TestPki,
    config: tempfile::TempDir,
}

impl Mesh {
    fn new() -> Self {
        Self {
            pki: TestPki::new("trellis.local"),
            config: tempfile::tempdir().unwrap(),
        }
    }

    /// A registry replica on `store`; waits until it listens.
    fn replica(&self, store: &str) -> Replica {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.replica_at(store, addr)
    }

    fn replica_at(&self, store: &str, addr: SocketAddr) -> Replica {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let r = spawn_registry_with(
            REGISTRY,
            &self.pki.issue("registry", "registry"),
            self.config.path(),
            addr,
            &["--store", store, "--admin", &admin.to_string()],
        );
        Replica {
            addr: r.addr,
            admin,
            process: r.process,
        }
    }

    /// Two replicas on `store`, once both serve.
    async fn two_serving_replicas(&self, store: &str) -> (Replica, Replica) {
        let (a, b) = (self.replica(store), self.replica(store));
        for r in [&a, &b] {
            self.wait_health(r, Health::Serving, Duration::from_secs(10))
                .await;
        }
        (a, b)
    }

    fn channel(&self, replica: &Replica, service: &str) -> Channel {
        let paths = self.pki.issue(service, service);
        channel(
            &Workload::load(&paths).unwrap(),
            replica.addr,
            ExpectedPeer::Exactly(self.pki.id("registry")),
        )
        .unwrap()
    }

    fn client(&self, replica: &Replica, service: &str) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel(replica, service))
    }

    async fn health(&self, replica: &Replica) -> Option<Health> {
        let mut client = HealthClient::new(self.channel(replica, "observer"));
        let answer = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: "trellis.registry.v1.RegistryService".into(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status())
    }

    async fn wait_health(&self, replica: &Replica, want: Health, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.health(replica).await;
            if now == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} health {now:?}, expected {want:?}:\n{}",
                replica.addr,
                replica.process.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn instance(service: &str, port: u16, grpc: &[&str], ttl_seconds: i64) -> reg::RegisterRequest {
    reg::RegisterRequest {
        service: service.into(),
        address: format!("127.0.0.1:{port}"),
        grpc_services: grpc.iter().map(|s| (*s).to_owned()).collect(),
        health: reg::ServingStatus::Serving as i32,
        lease_ttl: Some(prost_types::Duration {
            seconds: ttl_seconds,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// The next watch message, within `limit`.
async fn next(
    stream: &mut tonic::Streaming<reg::WatchResponse>,
    limit: Duration,
) -> reg::WatchResponse {
    tokio::time::timeout(limit, stream.next())
        .await
        .expect("a watch message in time")
        .expect("the watch goes on")
        .expect("a watch message, not an error")
}

async fn watch(
    client: &mut RegistryServiceClient<Channel>,
) -> tonic::Streaming<reg::WatchResponse> {
    let mut stream = client
        .watch(reg::WatchRequest { targets: vec![] })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(first.kind(), reg::WatchEventKind::Snapshot);
    stream
}

/// Two replicas of one etcd cluster serve one mesh: what is written
/// through one is seen through the other within a second, at the same
/// revision; a lease granted by one is renewed through the other; health
/// and deregistration through B reach A's watchers, with their reasons.
#[tokio::test]
async fn two_replicas_serve_one_mesh() {
    let etcd = EtcdCluster::start(3);
    let mesh = Mesh::new();
    let (a, b) = mesh.two_serving_replicas(&etcd.store_url()).await;

    let mut watch_a = watch(&mut mesh.client(&a, "observer")).await;
    let mut watch_b = watch(&mut mesh.client(&b, "observer")).await;
    let mut echo_a = mesh.client(&a, "echo");
    let mut echo_b = mesh.client(&b, "echo");

    let started = Instant::now();
    let registered = echo_a
        .register(instance("echo", 9001, &[ECHO], 30))
        .await
        .unwrap()
        .into_inner();
    let seen = next(&mut watch_b, Duration::from_secs(1)).await;
    let latency = started.elapsed();
    assert_eq!(seen.kind(), reg::WatchEventKind::Upsert);
    assert_eq!(seen.instances[0].instance_id, registered.instance_id);
    assert_eq!(
        seen.revision, registered.revision,
        "one revision for all replicas"
    );
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    let on_a = next(&mut watch_a, Duration::from_secs(1)).await;
    assert_eq!(on_a.revision, registered.revision);

    // B resolves what A registered, and renews A's lease.
    let resolved = echo_b
        .resolve(reg::ResolveRequest {
            target: ECHO.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.instances.len(), 1);
    let renewed = echo_b
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: registered.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.ttl.unwrap().seconds, 30);
    // Another identity may not renew it, through either replica.
    let denied = mesh
        .client(&b, "usage")
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: registered.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Health through B reaches A's watchers.
    let health = echo_b
        .set_health(reg::SetHealthRequest {
            instance_id: registered.instance_id.clone(),
            health: reg::ServingStatus::NotServing as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let on_a = next(&mut watch_a, Duration::from_secs(1)).await;
    assert_eq!(on_a.revision, health.revision);
    assert_eq!(on_a.instances[0].health(), reg::ServingStatus::NotServing);
    next(&mut watch_b, Duration::from_secs(1)).await;

    // Deregistration through B: a removal, as deregistered, everywhere.
    let gone = echo_b
        .deregister(reg::DeregisterRequest {
            instance_id: registered.instance_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for stream in [&mut watch_a, &mut watch_b] {
        let removed = next(stream, Duration::from_secs(1)).await;
        assert_eq!(removed.kind(), reg::WatchEventKind::Remove);
        assert_eq!(removed.revision, gone.revision);
        assert_eq!(removed.removal_reason(), reg::RemovalReason::Deregistered);
    }
    let again = echo_a
        .deregister(reg::DeregisterRequest {
            instance_id: registered.instance_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    // The lease went with it.
    let renewed = echo_a
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: registered.lease_id,
        })
        .await
        .unwrap_err();
    assert_eq!(renewed.code(), Code::NotFound, "{renewed:?}");

    // A replica started later reads the whole mesh, contracts included.
    echo_b
        .register(instance("echo", 9002, &[ECHO], 30))
        .await
        .unwrap();
    let c = mesh.replica(&etcd.store_url());
    mesh.wait_health(&c, Health::Serving, Duration::from_secs(10))
        .await;
    let listed = mesh
        .client(&c, "observer")
        .list_services(reg::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.services.len(), 1);
    assert_eq!(listed.services[0].grpc_services, [ECHO]);
}

/// Two identities racing through two replicas for the same gRPC service
/// names: for each name exactly one wins, and the loser is told who owns
/// it; the winner keeps it.
#[tokio::test]
async fn racing_claims_are_decided_by_etcd() {
    let etcd = EtcdCluster::start(1);
    let mesh = Mesh::new();
    let (a, b) = mesh.two_serving_replicas(&etcd.store_url()).await;
    let echo = mesh.client(&a, "echo");
    let usage = mesh.client(&b, "usage");
    for round in 0..20 {
        let name = format!("race.v1.Service{round}");
        let (mut e, mut u) = (echo.clone(), usage.clone());
        let (by_echo, by_usage) = tokio::join!(
            e.register(instance("echo", 9100 + round, &[&name], 30)),
            u.register(instance("usage", 9200 + round, &[&name], 30)),
        );
        let winners: Vec<&str> = [("echo", &by_echo), ("usage", &by_usage)]
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(who, _)| *who)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {by_echo:?} {by_usage:?}");
        let loser = by_echo.err().or(by_usage.err()).unwrap();
        assert_eq!(loser.code(), Code::PermissionDenied, "{loser:?}");
        assert!(
            loser.message().contains(&format!("sa/{}", winners[0])),
            "{}",
            loser.message()
        );
    }
}

/// An instance whose lease is not renewed leaves every replica's view
/// within its TTL (etcd expires it), as an expiry.
#[tokio::test]
async fn leases_expire_across_replicas() {
    let etcd = EtcdCluster::start(1);
    let mesh = Mesh::new();
    let (a, b) = mesh.two_serving_replicas(&etcd.store_url()).await;
    let mut watch_a = watch(&mut mesh.client(&a, "observer")).await;
    let mut watch_b = watch(&mut mesh.client(&b, "observer")).await;
    let registered = mesh
        .client(&a, "echo")
        .register(instance("echo", 9001, &[ECHO], 2))
        .await
        .unwrap()
        .into_inner();
    let at = Instant::now();
    for stream in [&mut watch_a, &mut watch_b] {
        next(stream, Duration::from_secs(1)).await;
    }
    for stream in [&mut watch_a, &mut watch_b] {
        let removed = next(stream, Duration::from_secs(4)).await;
        assert_eq!(removed.kind(), reg::WatchEventKind::Remove);
        assert_eq!(removed.instances[0].instance_id, registered.instance_id);
        assert_eq!(removed.removal_reason(), reg::RemovalReason::LeaseExpired);
    }
    // Within the TTL and etcd's expiry sweep (500 ms).
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());
}

/// etcd unreachable at start: the replica listens, says NOT_SERVING and
/// why, and serves once etcd is there. etcd lost later: it turns
/// NOT_SERVING, ends its watches with UNAVAILABLE, refuses calls; when
/// etcd returns it serves the same mesh again.
#[tokio::test]
async fn a_replica_without_etcd_says_so() {
    let mesh = Mesh::new();
    let port = free_port();
    let store = format!("etcd://127.0.0.1:{port}");
    let a = mesh.replica(&store);
    mesh.wait_health(&a, Health::NotServing, Duration::from_secs(10))
        .await;
    let refused = mesh
        .client(&a, "echo")
        .register(instance("echo", 9001, &[ECHO], 30))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(&store), "{}", refused.message());
    // The admin port says so too: /ready (for Kubernetes) and a gauge.
    let (code, body) = http_get(a.admin, "/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&store), "{body}");
    let (_, metrics) = http_get(a.admin, "/metrics");
    assert_eq!(
        metric_value(&metrics, "trellis_registry_serving", &[]),
        Some(0.0)
    );

    let mut etcd = EtcdCluster::start_on(&[port]);
    mesh.wait_health(&a, Health::Serving, Duration::from_secs(10))
        .await;
    assert_eq!(http_get(a.admin, "/ready").0, 200);
    let (_, metrics) = http_get(a.admin, "/metrics");
    assert_eq!(
        metric_value(&metrics, "trellis_registry_serving", &[]),
        Some(1.0)
    );
    let mut echo = mesh.client(&a, "echo");
    let registered = echo
        .register(instance("echo", 9001, &[ECHO], 30))
        .await
        .unwrap()
        .into_inner();
    let mut stream = watch(&mut mesh.client(&a, "observer")).await;

    etcd.kill(0);
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the watch ends in time");
    match ended {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("lost its store"), "{status:?}");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    mesh.wait_health(&a, Health::NotServing, Duration::from_secs(5))
        .await;
    let refused = mesh
        .client(&a, "observer")
        .resolve(reg::ResolveRequest {
            target: ECHO.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    etcd.restart(0);
    mesh.wait_health(&a, Health::Serving, Duration::from_secs(15))
        .await;
    let resolved = mesh
        .client(&a, "observer")
        .resolve(reg::ResolveRequest {
            target: ECHO.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: HashSet<_> = resolved.instances.iter().map(|i| &i.instance_id).collect();
    assert!(ids.contains(&registered.instance_id), "{ids:?}");
    echo.renew_lease(reg::RenewLeaseRequest {
        lease_id: registered.lease_id,
    })
    .await
    .unwrap();
}

/// `--store` is checked at start: a wrong scheme, a bad member, or a
/// state directory besides.
#[test]
fn bad_store_flags_are_refused() {
    let mesh = Mesh::new();
    let identity = mesh.pki.issue("registry", "registry");
    for (args, needle) in [
        (vec!["--store", "http://127.0.0.1:2379"], "etcd://"),
        (vec!["--store", "etcd://127.0.0.1"], "not host:port"),
        (
            vec!["--store", "etcd://127.0.0.1:2379", "--state-dir", "/tmp/x"],
            "cannot be used with",
        ),
    ] {
        let mut cmd = std::process::Command::new(REGISTRY);
        cmd.args(&args)
            .arg("--config-dir")
            .arg(mesh.config.path())
            .arg("--cert")
            .arg(&identity.cert)
            .arg("--key")
            .arg(&identity.key)
            .arg("--ca")
            .arg(&identity.ca);
        let mut process = ChildGuard::spawn("registry", cmd).unwrap();
        let exit = process.wait_exit(Duration::from_secs(10)).expect("exits");
        assert!(!exit.success(), "{args:?}");
        assert!(
            process.output().contains(needle),
            "{args:?}: {}",
            process.output()
        );
    }
}
