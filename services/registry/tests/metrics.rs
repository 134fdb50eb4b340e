//! The registry's admin port (`--admin`), against the real registry
//! process: its metrics follow registrations, watches, deregistrations and
//! leases that run out.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis::Workload;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{ChildGuard, TestPki, free_port, http_get, metric_value, wait_for_tcp};

use reg::registry_service_client::RegistryServiceClient;

const REGISTRY: &str = env!("CARGO_BIN_EXE_trellis-registry");

struct Registry {
    pki: TestPki,
    addr: SocketAddr,
    admin: SocketAddr,
    process: ChildGuard,
    _config_dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let pki = TestPki::new("trellis.local");
        let identity = pki.issue("registry", "registry");
        let config_dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(REGISTRY);
        cmd.args(["--listen", &addr.to_string()])
            .args(["--admin", &admin.to_string()])
            .arg("--config-dir")
            .arg(config_dir.path())
            .arg("--cert")
            .arg(&identity.cert)
            .arg("--key")
            .arg(&identity.key)
            .arg("--ca")
            .arg(&identity.ca)
            .env("RUST_LOG", "info");
        let process = ChildGuard::spawn("registry", cmd).expect("registry starts");
        for at in [addr, admin] {
            assert!(
                wait_for_tcp(at, Duration::from_secs(20)),
                "registry did not listen on {at}: {}",
                process.output()
            );
        }
        Self {
            pki,
            addr,
            admin,
            process,
            _config_dir: config_dir,
        }
    }

    fn client(&self, service: &str) -> RegistryServiceClient<Channel> {
        let workload = Workload::load(&self.pki.issue(service, service)).unwrap();
        let channel = channel(
            &workload,
            self.addr,
            ExpectedPeer::Exactly(self.pki.id("registry")),
        )
        .unwrap();
        RegistryServiceClient::new(channel)
    }

    /// The value of `name` (summed over series with `labels`) now.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (status, body) = http_get(self.admin, "/metrics");
        assert_eq!(status, 200, "{body}");
        metric_value(&body, name, labels)
    }

    /// Waits until `name` with `labels` is `want`.
    async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.metric(name, labels);
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{name}{labels:?} is {last:?}, not {want}:\n{}\n{}",
            http_get(self.admin, "/metrics").1,
            self.process.output()
        );
    }
}

fn usage_instance(port: u16, ttl: Duration) -> reg::RegisterRequest {
    reg::RegisterRequest {
        service: "usage".into(),
        address: format!("127.0.0.1:{port}"),
        grpc_services: vec!["telco.usage.v1.UsageService".into()],
        health: reg::ServingStatus::Serving as i32,
        lease_ttl: Some(prost_types::Duration {
            seconds: ttl.as_secs() as i64,
            nanos: ttl.subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_follow_registrations_watches_and_lease_expiries() {
    let registry = Registry::start();
    let (status, body) = http_get(registry.admin, "/live");
    assert_eq!((status, body.as_str()), (200, "live\n"));
    // Its own store is always in step: ready.
    let (status, body) = http_get(registry.admin, "/ready");
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let mut client = registry.client("usage");
    let revision = registry.metric("trellis_registry_revision", &[]).unwrap();
    assert_eq!(
        registry.metric("trellis_registry_instances", &[("service", "usage")]),
        None
    );
    assert_eq!(
        registry.metric("trellis_registry_registrations_total", &[]),
        Some(0.0)
    );

    // A registration: one instance, the revision moves, a registration counted.
    let long = client
        .register(usage_instance(9001, Duration::from_secs(60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        registry.metric("trellis_registry_instances", &[("service", "usage")]),
        Some(1.0)
    );
    assert!(registry.metric("trellis_registry_revision", &[]).unwrap() > revision);
    assert_eq!(
        registry.metric("trellis_registry_registrations_total", &[]),
        Some(1.0)
    );

    // A watch is counted while it is open.
    assert_eq!(
        registry.metric("trellis_registry_watchers", &[("kind", "registry")]),
        Some(0.0)
    );
    let mut watch = client
        .watch(reg::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("a snapshot");
    registry
        .wait_metric("trellis_registry_watchers", &[("kind", "registry")], 1.0)
        .await;
    drop(watch);
    registry
        .wait_metric("trellis_registry_watchers", &[("kind", "registry")], 0.0)
        .await;

    // A registration nobody renews (no sidecar) lapses: an expiry.
    client
        .register(usage_instance(9002, Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(
        registry.metric("trellis_registry_instances", &[("service", "usage")]),
        Some(2.0)
    );
    assert_eq!(
        registry.metric("trellis_registry_lease_expiries_total", &[]),
        Some(0.0)
    );
    registry
        .wait_metric("trellis_registry_lease_expiries_total", &[], 1.0)
        .await;
    assert_eq!(
        registry.metric("trellis_registry_instances", &[("service", "usage")]),
        Some(1.0)
    );

    // A deregistration is counted apart from expiries.
    client
        .deregister(reg::DeregisterRequest {
            instance_id: long.instance_id,
        })
        .await
        .unwrap();
    assert_eq!(
        registry.metric("trellis_registry_deregistrations_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        registry.metric("trellis_registry_lease_expiries_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        registry.metric("trellis_registry_instances", &[("service", "usage")]),
        None
    );
    assert_eq!(
        registry.metric("trellis_registry_registrations_total", &[]),
        Some(2.0)
    );
}
