//! The Registry and Config APIs, against the real registry process over
//! mTLS on 127.0.0.1, called with several workload identities.

use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use trellis::Workload;
use trellis::pb::trellis::config::v1 as cfg;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{RunningRegistry, TestPki, config_status, spawn_registry};

use cfg::config_service_client::ConfigServiceClient;
use reg::registry_service_client::RegistryServiceClient;

const REGISTRY: &str = env!("CARGO_BIN_EXE_trellis-registry");
const USAGE: &str = "telco.usage.v1.UsageService";

struct Mesh {
    pki: TestPki,
    registry: RunningRegistry,
    config_dir: tempfile::TempDir,
}

impl Mesh {
    fn start() -> Self {
        let pki = TestPki::new("trellis.local");
        let config_dir = tempfile::tempdir().unwrap();
        let registry = spawn_registry(
            REGISTRY,
            &pki.issue("registry", "registry"),
            config_dir.path(),
        );
        Self {
            pki,
            registry,
            config_dir,
        }
    }

    fn channel(&self, service: &str) -> Channel {
        let workload = Workload::load(&self.pki.issue(service, service)).unwrap();
        channel(
            &workload,
            self.registry.addr,
            ExpectedPeer::Exactly(self.pki.id("registry")),
        )
        .unwrap()
    }

    fn registry_as(&self, service: &str) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel(service))
    }

    fn config_as(&self, service: &str) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::new(self.channel(service))
    }
}

fn descriptors() -> Vec<Vec<u8>> {
    let set = prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET).unwrap();
    set.file.iter().map(|f| f.encode_to_vec()).collect()
}

fn usage_instance(port: u16, ttl: Duration) -> reg::RegisterRequest {
    reg::RegisterRequest {
        service: "usage".into(),
        version: "1.0.0".into(),
        zone: "local".into(),
        address: format!("127.0.0.1:{port}"),
        grpc_services: vec![USAGE.into()],
        metadata: [("lang".to_owned(), "rust".to_owned())].into(),
        health: reg::ServingStatus::Serving as i32,
        lease_ttl: Some(prost_types::Duration {
            seconds: ttl.as_secs() as i64,
            nanos: ttl.subsec_nanos() as i32,
        }),
        file_descriptors: Vec::new(),
    }
}

async fn next(
    stream: &mut tonic::Streaming<reg::WatchResponse>,
    within: Duration,
) -> reg::WatchResponse {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a watch event in time")
        .unwrap()
        .expect("stream open")
}

#[tokio::test]
async fn register_with_descriptors_and_fetch_them_by_symbol() {
    let mesh = Mesh::start();
    let mut usage = mesh.registry_as("usage");
    let mut request = usage_instance(9001, Duration::from_secs(30));
    request.file_descriptors = descriptors();
    let registered = usage.register(request).await.unwrap().into_inner();
    assert!(registered.instance_id.starts_with("usage-"));
    assert_eq!(
        registered.instance.unwrap().identity,
        "spiffe://trellis.local/ns/default/sa/usage"
    );

    let mut edge = mesh.registry_as("edge");
    for symbol in [
        USAGE,
        "telco.usage.v1.UsageService.RecordUsage",
        "telco.usage.v1.UsageRecord",
        "telco.usage.v1.UsageType",
    ] {
        let found = edge
            .get_file_containing(reg::GetFileContainingRequest {
                symbol: symbol.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.service, "usage");
        let names: Vec<String> = found
            .file_descriptors
            .iter()
            .map(|b| {
                prost_types::FileDescriptorProto::decode(b.as_slice())
                    .unwrap()
                    .name()
                    .to_owned()
            })
            .collect();
        assert_eq!(names[0], "telco/usage/v1/usage.proto", "{symbol}");
        assert!(
            names.contains(&"google/protobuf/timestamp.proto".to_owned()),
            "{names:?}"
        );
        // Comments survive the round trip, for reflection clients to show.
        let first =
            prost_types::FileDescriptorProto::decode(found.file_descriptors[0].as_slice()).unwrap();
        assert!(first.source_code_info.is_some());
    }
    let by_service = edge
        .get_service_descriptors(reg::GetServiceDescriptorsRequest {
            grpc_service: USAGE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_service.service, "usage");

    let missing = edge
        .get_file_containing(reg::GetFileContainingRequest {
            symbol: "telco.usage.v1.Nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("telco.usage.v1.Nothing"));

    // Deregistering the last instance withdraws its contract.
    usage
        .deregister(reg::DeregisterRequest {
            instance_id: registered.instance_id,
        })
        .await
        .unwrap();
    let gone = edge
        .get_file_containing(reg::GetFileContainingRequest {
            symbol: USAGE.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn watch_sees_add_health_change_deregister_and_expiry() {
    let mesh = Mesh::start();
    let mut usage = mesh.registry_as("usage");
    let mut edge = mesh.registry_as("edge");

    let mut watch = edge
        .watch(reg::WatchRequest {
            targets: vec![USAGE.into()],
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut watch, Duration::from_secs(5)).await;
    assert_eq!(snapshot.kind(), reg::WatchEventKind::Snapshot);
    assert!(snapshot.instances.is_empty());

    // Add.
    let a = usage
        .register(usage_instance(9001, Duration::from_secs(30)))
        .await
        .unwrap()
        .into_inner();
    let added = next(&mut watch, Duration::from_secs(2)).await;
    assert_eq!(added.kind(), reg::WatchEventKind::Upsert);
    assert_eq!(added.instances[0].instance_id, a.instance_id);
    assert!(added.revision > snapshot.revision);

    // Resolve by mesh service name and by gRPC service name.
    for target in ["usage", USAGE] {
        let resolved = edge
            .resolve(reg::ResolveRequest {
                target: target.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resolved.service, "usage");
        assert_eq!(resolved.instances.len(), 1);
        assert_eq!(resolved.instances[0].address, "127.0.0.1:9001");
    }

    // Health change, without removal.
    usage
        .set_health(reg::SetHealthRequest {
            instance_id: a.instance_id.clone(),
            health: reg::ServingStatus::NotServing as i32,
        })
        .await
        .unwrap();
    let changed = next(&mut watch, Duration::from_secs(2)).await;
    assert_eq!(changed.kind(), reg::WatchEventKind::Upsert);
    assert_eq!(
        changed.instances[0].health(),
        reg::ServingStatus::NotServing
    );
    let listed = edge
        .list_services(reg::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.services[0].name, "usage");
    assert_eq!(
        (
            listed.services[0].instance_count,
            listed.services[0].serving_instance_count
        ),
        (1, 0)
    );

    // Deregister.
    usage
        .deregister(reg::DeregisterRequest {
            instance_id: a.instance_id.clone(),
        })
        .await
        .unwrap();
    let removed = next(&mut watch, Duration::from_secs(2)).await;
    assert_eq!(removed.kind(), reg::WatchEventKind::Remove);
    assert_eq!(removed.removal_reason(), reg::RemovalReason::Deregistered);
    let gone = edge
        .resolve(reg::ResolveRequest {
            target: "usage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Lease expiry: a 2 s lease that is never renewed.
    let ttl = Duration::from_secs(2);
    let registered_at = Instant::now();
    let b = usage
        .register(usage_instance(9002, ttl))
        .await
        .unwrap()
        .into_inner();
    let added = next(&mut watch, Duration::from_secs(2)).await;
    assert_eq!(added.instances[0].instance_id, b.instance_id);
    let expired = next(&mut watch, ttl + Duration::from_secs(2)).await;
    assert_eq!(expired.kind(), reg::WatchEventKind::Remove);
    assert_eq!(expired.removal_reason(), reg::RemovalReason::LeaseExpired);
    assert!(
        registered_at.elapsed() <= ttl + Duration::from_secs(1),
        "expiry seen after {:?}",
        registered_at.elapsed()
    );
    let renew = usage
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: b.lease_id,
        })
        .await
        .unwrap_err();
    assert_eq!(renew.code(), Code::NotFound);
}

#[tokio::test]
async fn keep_alive_holds_a_lease_past_its_ttl() {
    let mesh = Mesh::start();
    let mut usage = mesh.registry_as("usage");
    let c = usage
        .register(usage_instance(9003, Duration::from_secs(1)))
        .await
        .unwrap()
        .into_inner();
    let lease = c.lease_id.clone();
    let pings = async_ping(lease.clone(), 8, Duration::from_millis(300));
    let mut replies = usage.keep_alive(pings).await.unwrap().into_inner();
    let mut answered = 0;
    while let Some(reply) = replies.message().await.unwrap() {
        assert_eq!(reply.lease_id, lease);
        assert_eq!(reply.ttl.unwrap().seconds, 1);
        answered += 1;
    }
    assert_eq!(answered, 8);
    // 2.4 s later the 1 s lease is still alive.
    let resolved = mesh
        .registry_as("edge")
        .resolve(reg::ResolveRequest {
            target: "usage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.instances[0].instance_id, c.instance_id);
}

fn async_ping(
    lease: String,
    count: usize,
    every: Duration,
) -> impl tokio_stream::Stream<Item = reg::KeepAliveRequest> {
    futures::stream::unfold(0, move |n| {
        let lease = lease.clone();
        async move {
            if n == count {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((reg::KeepAliveRequest { lease_id: lease }, n + 1))
        }
    })
}

#[tokio::test]
async fn another_identity_cannot_register_renew_or_deregister_as_the_first() {
    let mesh = Mesh::start();
    let mut usage = mesh.registry_as("usage");
    let mine = usage
        .register(usage_instance(9001, Duration::from_secs(30)))
        .await
        .unwrap()
        .into_inner();

    let mut settlement = mesh.registry_as("settlement");
    let denied = settlement
        .register(usage_instance(9009, Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains("may only register as its own service (settlement)"),
        "{denied:?}"
    );

    let denied = settlement
        .deregister(reg::DeregisterRequest {
            instance_id: mine.instance_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = settlement
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: mine.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = settlement
        .set_health(reg::SetHealthRequest {
            instance_id: mine.instance_id.clone(),
            health: reg::ServingStatus::NotServing as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // The read-only edge identity may read but not register, even as itself.
    let mut edge = mesh.registry_as("edge");
    let mut as_edge = usage_instance(9010, Duration::from_secs(30));
    as_edge.service = "edge".into();
    as_edge.grpc_services.clear();
    let denied = edge.register(as_edge).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("read-only"), "{denied:?}");
    edge.resolve(reg::ResolveRequest {
        target: "usage".into(),
    })
    .await
    .unwrap();

    // A gRPC service another identity owns cannot be claimed; the refusal
    // names the owner.
    let mut claim = usage_instance(9011, Duration::from_secs(30));
    claim.service = "settlement".into();
    let taken = settlement.register(claim).await.unwrap_err();
    assert_eq!(taken.code(), Code::PermissionDenied);
    assert!(
        taken
            .message()
            .contains("belongs to spiffe://trellis.local/ns/default/sa/usage"),
        "{taken:?}"
    );

    // The first identity's instance is untouched.
    let resolved = edge
        .resolve(reg::ResolveRequest {
            target: "usage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.instances.len(), 1);
    assert_eq!(resolved.instances[0].health(), reg::ServingStatus::Serving);
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let mesh = Mesh::start();
    let mut usage = mesh.registry_as("usage");
    let base = || usage_instance(9001, Duration::from_secs(30));
    let cases: Vec<(reg::RegisterRequest, &str)> = vec![
        (
            reg::RegisterRequest {
                service: String::new(),
                ..base()
            },
            "service",
        ),
        (
            reg::RegisterRequest {
                service: "Usage Service".into(),
                ..base()
            },
            "service",
        ),
        (
            reg::RegisterRequest {
                address: "not an address".into(),
                ..base()
            },
            "address",
        ),
        (
            reg::RegisterRequest {
                address: "127.0.0.1:0".into(),
                ..base()
            },
            "address",
        ),
        (
            reg::RegisterRequest {
                grpc_services: vec!["UsageService".into()],
                ..base()
            },
            "grpc_services[0]",
        ),
        (
            reg::RegisterRequest {
                health: 0,
                ..base()
            },
            "health",
        ),
        (
            reg::RegisterRequest {
                lease_ttl: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 100_000_000,
                }),
                ..base()
            },
            "lease_ttl",
        ),
        (
            reg::RegisterRequest {
                lease_ttl: Some(prost_types::Duration {
                    seconds: 86_400 * 365,
                    nanos: 0,
                }),
                ..base()
            },
            "lease_ttl",
        ),
        (
            reg::RegisterRequest {
                metadata: [("blob".to_owned(), "x".repeat(100_000))].into(),
                ..base()
            },
            "metadata[\"blob\"]",
        ),
        (
            reg::RegisterRequest {
                metadata: (0..1000)
                    .map(|i| (format!("k{i}"), "v".to_owned()))
                    .collect(),
                ..base()
            },
            "metadata",
        ),
        (
            reg::RegisterRequest {
                file_descriptors: vec![vec![0xff; 8]],
                ..base()
            },
            "file_descriptors[0]",
        ),
        (
            reg::RegisterRequest {
                grpc_services: vec!["telco.usage.v1.NotInTheDescriptors".into()],
                file_descriptors: descriptors(),
                ..base()
            },
            "grpc_services[0]",
        ),
    ];
    for (request, field) in cases {
        let status = usage.register(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("BadRequest details")
            .field_violations;
        assert_eq!(violations[0].field, field);
    }

    let unknown = usage
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: "lease-0000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = usage
        .deregister(reg::DeregisterRequest {
            instance_id: "usage-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let empty = usage
        .resolve(reg::ResolveRequest {
            target: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    // Nothing half-written: none of the refused registrations exists.
    let listed = usage
        .list_services(reg::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.services.is_empty(), "{listed:?}");
}

fn write(dir: &std::path::Path, name: &str, text: &str) {
    // Write then rename, as editors and config tooling do, so the reader
    // never sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn next_config(
    stream: &mut tonic::Streaming<cfg::WatchConfigResponse>,
    within: Duration,
) -> Option<cfg::WatchConfigResponse> {
    tokio::time::timeout(within, stream.message())
        .await
        .ok()
        .map(|m| m.unwrap().expect("stream open"))
}

fn usage_timeout(config: &cfg::ServiceConfig) -> i64 {
    config
        .routes
        .iter()
        .find(|r| r.method_match == "*")
        .and_then(|r| r.timeout)
        .map_or(0, |t| t.seconds)
}

#[tokio::test]
async fn config_edits_reach_watchers_live_and_bad_edits_are_refused() {
    let mesh = Mesh::start();
    let dir = mesh.config_dir.path();
    write(
        dir,
        "defaults.toml",
        "[[routes]]\nmethod = \"*\"\ntimeout = \"5s\"\n\n[settings]\nregion = \"eu\"\n",
    );
    write(
        dir,
        "usage.toml",
        "[[routes]]\nmethod = \"*\"\ntimeout = \"2s\"\n",
    );

    let mut config = mesh.config_as("usage");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut watch = loop {
        // The registry reads the directory every 200 ms.
        let current = config
            .get_config(cfg::GetConfigRequest {
                service: "usage".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if usage_timeout(current.config.as_ref().unwrap()) == 2 {
            break config
                .watch_config(cfg::WatchConfigRequest {
                    service: "usage".into(),
                })
                .await
                .unwrap()
                .into_inner();
        }
        assert!(Instant::now() < deadline, "initial files never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first = next_config(&mut watch, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(first.source, "usage.toml");
    let first_config = first.config.unwrap();
    assert_eq!(usage_timeout(&first_config), 2);
    // Settings come from the defaults.
    assert!(first_config.settings.unwrap().fields.contains_key("region"));

    // A valid edit reaches the watcher within a second.
    let edited_at = Instant::now();
    write(
        dir,
        "usage.toml",
        "[[routes]]\nmethod = \"*\"\ntimeout = \"3s\"\n",
    );
    let second = next_config(&mut watch, Duration::from_secs(2))
        .await
        .expect("edit pushed");
    assert!(
        edited_at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        edited_at.elapsed()
    );
    assert!(second.revision > first.revision);
    assert_eq!(usage_timeout(second.config.as_ref().unwrap()), 3);

    // An invalid edit is refused with file, line and reason; 3s stays.
    write(
        dir,
        "usage.toml",
        "[[routes]]\nmethod = \"*\"\n\ntimeout = \"three seconds\"\n",
    );
    assert!(
        next_config(&mut watch, Duration::from_millis(800))
            .await
            .is_none(),
        "bad edit was pushed"
    );
    let status = config_status(&mut config).await;
    let problem = status
        .problems
        .iter()
        .find(|p| p.rejected)
        .expect("the rejected file is reported");
    assert_eq!(problem.file, "usage.toml");
    assert_eq!(problem.line, 4);
    assert!(problem.message.contains("not a duration"), "{problem:?}");
    assert_eq!(status.revision, second.revision);
    let current = config
        .get_config(cfg::GetConfigRequest {
            service: "usage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage_timeout(current.config.as_ref().unwrap()), 3);
    assert!(
        mesh.registry
            .process
            .output()
            .contains("config file rejected"),
        "the rejection is logged"
    );

    // A service without a file gets the defaults.
    let settlement = config
        .get_config(cfg::GetConfigRequest {
            service: "settlement".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settlement.source, "");
    assert_eq!(usage_timeout(settlement.config.as_ref().unwrap()), 5);
    let bad = config
        .get_config(cfg::GetConfigRequest {
            service: "Not A Name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn rules_naming_unknown_methods_are_reported_until_a_contract_defines_them() {
    let mesh = Mesh::start();
    let dir = mesh.config_dir.path();
    write(
        dir,
        "usage.toml",
        "[[routes]]\nmethod = \"telco.usage.v1.UsageService/RecordUsage\"\nidempotent = true\n\n\
         [[authorization]]\ncallers = [\"settlement\"]\nmethods = [\"telco.usage.v1.UsageService/Recrod\"]\naction = \"allow\"\n",
    );
    let mut config = mesh.config_as("usage");
    let unknown = |status: &cfg::GetConfigStatusResponse| {
        status
            .problems
            .iter()
            .filter(|p| p.message.starts_with("unknown method"))
            .map(|p| (p.rule.clone(), p.line))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = config_status(&mut config).await;
        if unknown(&status).len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once the contract is registered, only the misspelt method is unknown.
    let mut request = usage_instance(9001, Duration::from_secs(30));
    request.file_descriptors = descriptors();
    mesh.registry_as("usage").register(request).await.unwrap();
    let status = config_status(&mut config).await;
    assert_eq!(
        unknown(&status),
        vec![("authorization[0].methods[0]".to_owned(), 7)]
    );
    assert!(
        mesh.registry
            .process
            .wait_for_output("UsageService/Recrod", Duration::from_secs(3))
            .is_some(),
        "unknown method was not logged"
    );
}

/// echo.toml with every traffic-management table, as config/README.md
/// documents them.
const ECHO_TRAFFIC: &str = r#"
[[routes]]
method = "trellis.echo.v1.EchoService/Echo"
load_balancing = "least_request"

[routes.retry]
per_try_timeout = "500ms"

[routes.hedge]
delay = "50ms"

[routes.limit]
max_concurrent = 10

[circuit_breaker]
failure_rate = 0.25

[caller_limit]
max_concurrent = 100
max_queued = 100

[traffic]
split = [ { version = "v1", weight = 90 }, { version = "v2", weight = 10 } ]
version_header_callers = ["usage", "edge"]
"#;

#[tokio::test]
async fn traffic_management_is_served_and_an_unserved_split_version_reported() {
    let mesh = Mesh::start();
    let dir = mesh.config_dir.path();
    write(dir, "echo.toml", ECHO_TRAFFIC);
    let mut config = mesh.config_as("usage");
    let deadline = Instant::now() + Duration::from_secs(3);
    let echo = loop {
        let current = config
            .get_config(cfg::GetConfigRequest {
                service: "echo".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if current.source == "echo.toml" {
            break current.config.unwrap();
        }
        assert!(Instant::now() < deadline, "echo.toml never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let route = echo
        .routes
        .iter()
        .find(|r| r.method_match.ends_with("/Echo"))
        .unwrap();
    assert_eq!(route.load_balancing(), cfg::LoadBalancing::LeastRequest);
    let per_try = route.retry.as_ref().unwrap().per_try_timeout.unwrap();
    assert_eq!((per_try.seconds, per_try.nanos), (0, 500_000_000));
    let hedge = route.hedge.unwrap();
    assert_eq!(hedge.max_attempts, 2);
    assert_eq!(hedge.delay.unwrap().nanos, 50_000_000);
    assert_eq!(route.limit.unwrap().max_concurrent, 10);
    let everything = echo.routes.iter().find(|r| r.method_match == "*").unwrap();
    assert_eq!(everything.load_balancing(), cfg::LoadBalancing::PeakEwma);
    assert!(everything.hedge.is_none() && everything.limit.is_none());
    let breaker = echo.circuit_breaker.unwrap();
    assert_eq!(
        (breaker.consecutive_failures, breaker.failure_rate),
        (5, 0.25)
    );
    assert_eq!(echo.caller_limit.unwrap().max_queued, 100);
    let traffic = echo.traffic.unwrap();
    assert_eq!(traffic.split.len(), 2);
    assert_eq!(traffic.version_header_callers, ["usage", "edge"]);

    // Reported, not rejected, until an instance of the version serves.
    let unserved = |status: &cfg::GetConfigStatusResponse| {
        status
            .problems
            .iter()
            .filter(|p| p.rule.starts_with("traffic"))
            .map(|p| {
                assert!(!p.rejected, "{p:?}");
                (p.rule.clone(), p.line)
            })
            .collect::<Vec<_>>()
    };
    let mut registry = mesh.registry_as("echo");
    let mut v1 = usage_instance(9001, Duration::from_secs(30));
    v1.service = "echo".into();
    v1.version = "v1".into();
    v1.grpc_services = Vec::new();
    registry.register(v1).await.unwrap();
    let status = config_status(&mut config).await;
    assert_eq!(
        unserved(&status),
        [("traffic.split[1].version".to_owned(), 23)]
    );
    let problem = status
        .problems
        .iter()
        .find(|p| p.rule == "traffic.split[1].version")
        .unwrap();
    assert_eq!(
        problem.message,
        "version v2 of echo has no serving instance; its share goes to the other versions"
    );
    // Logged when the instance registered, not only when a file changed.
    assert!(
        mesh.registry
            .process
            .wait_for_output(
                "version v2 of echo has no serving instance; its share",
                Duration::from_secs(3)
            )
            .is_some(),
        "unserved version was not logged"
    );

    // A refused value keeps the last good version, with file, line, rule.
    write(
        dir,
        "echo.toml",
        &ECHO_TRAFFIC.replace("\"least_request\"", "\"random\""),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let problem = loop {
        let status = config_status(&mut config).await;
        if let Some(p) = status.problems.into_iter().find(|p| p.rejected) {
            break p;
        }
        assert!(Instant::now() < deadline, "random was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (problem.file.as_str(), problem.line, problem.rule.as_str()),
        ("echo.toml", 4, "routes[0].load_balancing")
    );
    assert!(
        problem.message.starts_with("random is not supported"),
        "{problem:?}"
    );
    let current = config
        .get_config(cfg::GetConfigRequest {
            service: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let kept = current.config.unwrap();
    let route = kept
        .routes
        .iter()
        .find(|r| r.method_match.ends_with("/Echo"))
        .unwrap();
    assert_eq!(route.load_balancing(), cfg::LoadBalancing::LeastRequest);
}

#[tokio::test]
async fn a_grpc_service_moves_to_another_mesh_service_only_by_declaration() {
    let mesh = Mesh::start();
    let mut usage = mesh.registry_as("usage");
    let first = usage
        .register(usage_instance(9001, Duration::from_secs(30)))
        .await
        .unwrap()
        .into_inner();
    let mut settlement = mesh.registry_as("settlement");
    let mut claim = usage_instance(9011, Duration::from_secs(30));
    claim.service = "settlement".into();
    assert_eq!(
        settlement.register(claim.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // The first claim outlives its instances: the name is not up for grabs.
    usage
        .deregister(reg::DeregisterRequest {
            instance_id: first.instance_id,
        })
        .await
        .unwrap();
    assert_eq!(
        settlement.register(claim.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Config moves it.
    write(
        mesh.config_dir.path(),
        "settlement.toml",
        &format!("grpc_services = [\"{USAGE}\"]\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match settlement.register(claim.clone()).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{e:?}"),
        }
        assert!(Instant::now() < deadline, "declaration never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let denied = usage
        .register(usage_instance(9002, Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("settlement.toml"), "{denied:?}");
}

// Multi-threaded: the client connections must be able to close while the
// test blocks waiting for the registry to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_and_reflection_and_drains_on_sigterm() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut mesh = Mesh::start();
    let mut reflection = ServerReflectionClient::new(mesh.channel("edge"));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "trellis.registry.v1.RegistryService",
        "trellis.config.v1.ConfigService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }

    let mut health = tonic_health::pb::health_client::HealthClient::new(mesh.channel("edge"));
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "trellis.registry.v1.RegistryService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // With no call in flight, the drain is immediate and clean.
    drop((replies, reflection, health));
    mesh.registry.process.terminate();
    let exit = mesh
        .registry
        .process
        .wait_exit(Duration::from_secs(10))
        .expect("registry exits after SIGTERM");
    assert!(
        exit.success(),
        "{exit:?}: {}",
        mesh.registry.process.output()
    );
    let output = mesh.registry.process.output();
    assert!(output.contains("drained cleanly"), "{output}");
}

/// An xDS client's NACK is in GetConfigStatus with its reason and the
/// client's verified identity until the stream ends.
#[tokio::test]
async fn an_xds_nack_is_reported_in_config_status_until_its_stream_ends() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

    let mesh = Mesh::start();
    let mut config = mesh.config_as("billing");
    let mut registry = mesh.registry_as("usage");
    registry
        .register(usage_instance(9, Duration::from_secs(30)))
        .await
        .unwrap();

    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let mut ads = AggregatedDiscoveryServiceClient::new(mesh.channel("billing"));
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let ask = |version: &str, nonce: &str, error: Option<&str>| DiscoveryRequest {
        type_url: LISTENER.into(),
        resource_names: vec!["usage".into()],
        version_info: version.into(),
        response_nonce: nonce.into(),
        node: Some(Node {
            id: "billing-7".into(),
            ..Default::default()
        }),
        error_detail: error.map(|message| RpcStatus {
            code: 3,
            message: message.into(),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    requests.send(ask("", "", None)).await.unwrap();
    let sent = responses.message().await.unwrap().expect("a listener");
    assert_eq!(sent.resources.len(), 1, "{sent:?}");
    assert!(config_status(&mut config).await.xds_rejections.is_empty());

    requests
        .send(ask("", &sent.nonce, Some("listener usage: no router")))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let rejection = loop {
        if let Some(r) = config_status(&mut config).await.xds_rejections.pop() {
            break r;
        }
        assert!(Instant::now() < deadline, "the NACK was not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rejection.reason, "listener usage: no router");
    assert_eq!(rejection.caller, mesh.pki.id("billing").to_string());
    assert_eq!(rejection.node, "billing-7");
    assert_eq!(rejection.type_url, LISTENER);
    assert_eq!(rejection.rejected_version, sent.version_info);
    assert_eq!(rejection.kept_version, "");
    assert!(rejection.at.is_some());
    let log = mesh.registry.process.output();
    assert!(
        log.contains("NACKed") && log.contains("no router"),
        "the NACK is logged with its reason:\n{log}"
    );

    drop(requests);
    drop(responses);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !config_status(&mut config).await.xds_rejections.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the rejection outlived its stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
