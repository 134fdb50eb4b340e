//! Hardening of the control plane (issue 11), against the real registry
//! process over mTLS on 127.0.0.1: the config fails closed, a gRPC service
//! name and its contract belong to one identity, identity checks include
//! the namespace, operator input never panics the registry, each identity
//! holds a bounded share of the registry, and the registry's state
//! survives a restart.

use std::time::{Duration, Instant};

use prost::Message;
use prost_types::{
    DescriptorProto, FileDescriptorProto, MethodDescriptorProto, ServiceDescriptorProto,
};
use tonic::Code;
use tonic::transport::Channel;
use trellis::Workload;
use trellis::identity::{IdentityPaths, SpiffeId};
use trellis::pb::trellis::config::v1 as cfg;
use trellis::pb::trellis::registry::v1 as reg;
use trellis::tls::{ExpectedPeer, channel};
use trellis_test_support::{
    ChildGuard, RunningRegistry, TestPki, config_status, free_port, spawn_registry, wait_for_tcp,
};

use cfg::config_service_client::ConfigServiceClient;
use reg::registry_service_client::RegistryServiceClient;

const REGISTRY: &str = env!("CARGO_BIN_EXE_trellis-registry");
const USAGE: &str = "telco.usage.v1.UsageService";
const SETTLEMENT: &str = "telco.settlement.v1.SettlementService";

struct Mesh {
    pki: TestPki,
    registry: RunningRegistry,
    config_dir: tempfile::TempDir,
}

impl Mesh {
    /// A registry whose config directory holds `files` from the start.
    fn start_with(files: &[(&str, &str)]) -> Self {
        let pki = TestPki::new("trellis.local");
        let config_dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            write(config_dir.path(), name, text);
        }
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

    fn channel_for(&self, paths: &IdentityPaths) -> Channel {
        let workload = Workload::load(paths).unwrap();
        channel(
            &workload,
            self.registry.addr,
            ExpectedPeer::Exactly(self.pki.id("registry")),
        )
        .unwrap()
    }

    fn registry_as(&self, service: &str) -> RegistryServiceClient<Channel> {
        RegistryServiceClient::new(self.channel_for(&self.pki.issue(service, service)))
    }

    fn config_as(&self, service: &str) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::new(self.channel_for(&self.pki.issue(service, service)))
    }

    /// The registry's log so far; fails the test if it panicked.
    fn log_without_panic(&self) -> String {
        let out = self.registry.process.output();
        assert!(!out.contains("panicked"), "the registry panicked:\n{out}");
        out
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn instance(service: &str, port: u16, grpc: &[&str]) -> reg::RegisterRequest {
    reg::RegisterRequest {
        service: service.into(),
        address: format!("127.0.0.1:{port}"),
        grpc_services: grpc.iter().map(|s| (*s).to_owned()).collect(),
        health: reg::ServingStatus::Serving as i32,
        lease_ttl: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn trellis_files() -> Vec<FileDescriptorProto> {
    prost_types::FileDescriptorSet::decode(trellis::pb::FILE_DESCRIPTOR_SET)
        .unwrap()
        .file
}

fn encode(files: &[FileDescriptorProto]) -> Vec<Vec<u8>> {
    files.iter().map(Message::encode_to_vec).collect()
}

async fn rules_of(config: &mut ConfigServiceClient<Channel>, service: &str) -> usize {
    config
        .get_config(cfg::GetConfigRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap()
        .authorization
        .len()
}

/// Polls the status until a problem about `file` contains `needle`.
async fn wait_for_problem(
    config: &mut ConfigServiceClient<Channel>,
    file: &str,
    needle: &str,
) -> cfg::ConfigProblem {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = config_status(config).await;
        if let Some(p) = status
            .problems
            .iter()
            .find(|p| p.file == file && p.message.contains(needle))
        {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no problem about {file} mentioning {needle:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const USAGE_RULES: &str = "\
[[routes]]
method = \"*\"
timeout = \"2s\"

[[authorization]]
callers = [\"edge\"]
methods = [\"*\"]
action = \"allow\"
";

/// Item 1: an emptied, truncated or deleted service file is not "no rules,
/// allow everyone": the last good rules stay and the problem is reported.
#[tokio::test]
async fn an_emptied_truncated_or_deleted_service_file_keeps_its_last_rules() {
    let mesh = Mesh::start_with(&[("usage.toml", USAGE_RULES)]);
    let dir = mesh.config_dir.path();
    let mut config = mesh.config_as("usage");
    assert_eq!(rules_of(&mut config, "usage").await, 1);

    // Emptied (a failed write, a truncating editor).
    write(dir, "usage.toml", "");
    let problem = wait_for_problem(&mut config, "usage.toml", "empty").await;
    assert!(problem.rejected, "{problem:?}");
    assert_eq!(
        rules_of(&mut config, "usage").await,
        1,
        "empty file allowed all"
    );

    // Truncated just before its rules: valid TOML, but every rule gone.
    write(
        dir,
        "usage.toml",
        &USAGE_RULES[..USAGE_RULES.find("[[auth").unwrap()],
    );
    wait_for_problem(&mut config, "usage.toml", "authorization = []").await;
    assert_eq!(
        rules_of(&mut config, "usage").await,
        1,
        "truncated file allowed all"
    );

    // Deleted: kept until the registry restarts, and reported.
    std::fs::remove_file(dir.join("usage.toml")).unwrap();
    wait_for_problem(&mut config, "usage.toml", "missing").await;
    assert_eq!(
        rules_of(&mut config, "usage").await,
        1,
        "deleted file allowed all"
    );
    assert!(mesh.log_without_panic().contains("usage.toml"));

    // Back again: the problem clears.
    write(dir, "usage.toml", USAGE_RULES);
    let deadline = Instant::now() + Duration::from_secs(3);
    while config_status(&mut config)
        .await
        .problems
        .iter()
        .any(|p| p.file == "usage.toml")
    {
        assert!(Instant::now() < deadline, "problem never cleared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Dropping every rule on purpose takes an explicit empty list.
    write(dir, "usage.toml", "authorization = []\n");
    let deadline = Instant::now() + Duration::from_secs(3);
    while rules_of(&mut config, "usage").await != 0 {
        assert!(
            Instant::now() < deadline,
            "explicit empty list not accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 2: a name declared in config belongs to that service's identity,
/// whether or not it has instances.
#[tokio::test]
async fn a_declared_grpc_service_cannot_be_claimed_by_another_identity() {
    let mesh = Mesh::start_with(&[(
        "settlement.toml",
        &format!("grpc_services = [\"{SETTLEMENT}\"]\n"),
    )]);
    // Settlement has no instance; echo tries to take its traffic.
    let denied = mesh
        .registry_as("echo")
        .register(instance("echo", 9001, &[SETTLEMENT]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(SETTLEMENT), "{denied:?}");
    assert!(
        denied
            .message()
            .contains("spiffe://trellis.local/ns/default/sa/settlement"),
        "{denied:?}"
    );
    assert!(denied.message().contains("settlement.toml"), "{denied:?}");
    // Its owner may.
    mesh.registry_as("settlement")
        .register(instance("settlement", 9002, &[SETTLEMENT]))
        .await
        .unwrap();

    // A name claimed before config declared it for another service: the
    // claimant's instances are removed once the declaration applies.
    const ARCHIVE: &str = "telco.archive.v1.ArchiveEventsService";
    let mut echo = mesh.registry_as("echo");
    echo.register(instance("echo", 9003, &[ARCHIVE]))
        .await
        .unwrap();
    write(
        mesh.config_dir.path(),
        "archive.toml",
        &format!("grpc_services = [\"{ARCHIVE}\"]\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while echo
        .resolve(reg::ResolveRequest {
            target: ARCHIVE.into(),
        })
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "usurper still resolves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let denied = echo
        .register(instance("echo", 9003, &[ARCHIVE]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("archive.toml"), "{denied:?}");
}

/// Item 2: an undeclared name belongs to its first claimant for the
/// registry's lifetime, even once that claimant has no instance.
#[tokio::test]
async fn an_undeclared_grpc_service_stays_with_its_first_claimant() {
    let mesh = Mesh::start_with(&[]);
    let mut usage = mesh.registry_as("usage");
    let first = usage
        .register(instance("usage", 9001, &[USAGE]))
        .await
        .unwrap()
        .into_inner();
    usage
        .deregister(reg::DeregisterRequest {
            instance_id: first.instance_id,
        })
        .await
        .unwrap();
    let denied = mesh
        .registry_as("echo")
        .register(instance("echo", 9002, &[USAGE]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied
            .message()
            .contains("spiffe://trellis.local/ns/default/sa/usage"),
        "{denied:?}"
    );
    // The owner comes back to it.
    usage
        .register(instance("usage", 9003, &[USAGE]))
        .await
        .unwrap();
}

/// Item 2: health, reflection and the control plane's own APIs are never
/// routable names.
#[tokio::test]
async fn infrastructure_services_are_not_routable_names() {
    let mesh = Mesh::start_with(&[]);
    let mut echo = mesh.registry_as("echo");
    for name in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "trellis.registry.v1.RegistryService",
        "trellis.config.v1.ConfigService",
    ] {
        let refused = echo
            .register(instance("echo", 9001, &[name]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{name}: {refused:?}");
        assert!(refused.message().contains(name), "{refused:?}");
    }
    // Nothing was claimed along the way: no one resolves them.
    let resolved = echo
        .resolve(reg::ResolveRequest {
            target: "grpc.health.v1.Health".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(resolved.code(), Code::NotFound);
}

/// A file `evil/v1/evil.proto` defining `evil.v1.EvilService`.
fn evil_file() -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some("evil/v1/evil.proto".into()),
        package: Some("evil.v1".into()),
        message_type: vec![DescriptorProto {
            name: Some("Nothing".into()),
            ..Default::default()
        }],
        service: vec![ServiceDescriptorProto {
            name: Some("EvilService".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Do".into()),
                input_type: Some(".evil.v1.Nothing".into()),
                output_type: Some(".evil.v1.Nothing".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

fn method_names(file: &[u8]) -> Vec<String> {
    let file = FileDescriptorProto::decode(file).unwrap();
    file.service
        .iter()
        .filter(|s| s.name() == "SettlementService")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
        .collect()
}

/// Item 2: uploading descriptors that define another service's contract
/// does not change what the registry serves for it.
#[tokio::test]
async fn a_forged_contract_for_another_service_is_not_served() {
    let mesh = Mesh::start_with(&[]);
    let mut files = trellis_files();
    let real = encode(&files);
    // A rewritten settlement.proto: one more method, as a forger would add
    // (or change idempotency levels so proxies retry what is not safe).
    let forged = files
        .iter_mut()
        .find(|f| f.name() == "telco/settlement/v1/settlement.proto")
        .unwrap();
    let service = forged
        .service
        .iter_mut()
        .find(|s| s.name() == "SettlementService")
        .unwrap();
    let mut steal = service.method[0].clone();
    steal.name = Some("Steal".into());
    service.method.push(steal);
    files.push(evil_file());

    // "aardvark" sorts before "settlement": first in any by-name search.
    let mut attacker = instance("aardvark", 9001, &["evil.v1.EvilService"]);
    attacker.file_descriptors = encode(&files);
    mesh.registry_as("aardvark")
        .register(attacker)
        .await
        .unwrap();

    let mut edge = mesh.registry_as("edge");
    // Settlement has not registered: nothing is served for its service.
    let none = edge
        .get_service_descriptors(reg::GetServiceDescriptorsRequest {
            grpc_service: SETTLEMENT.into(),
        })
        .await;
    assert_eq!(
        none.as_ref().map_err(tonic::Status::code).err(),
        Some(Code::NotFound),
        "{none:?}"
    );

    let mut settlement = instance("settlement", 9002, &[SETTLEMENT]);
    settlement.file_descriptors = real;
    mesh.registry_as("settlement")
        .register(settlement)
        .await
        .unwrap();
    let served = edge
        .get_service_descriptors(reg::GetServiceDescriptorsRequest {
            grpc_service: SETTLEMENT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.service, "settlement");
    assert_eq!(
        method_names(&served.file_descriptors[0]),
        ["GetBill", "ListBills"]
    );
    for symbol in [SETTLEMENT, "telco.settlement.v1.SettlementService.GetBill"] {
        let found = edge
            .get_file_containing(reg::GetFileContainingRequest {
                symbol: symbol.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.service, "settlement", "{symbol}");
        assert_eq!(
            method_names(&found.file_descriptors[0]),
            ["GetBill", "ListBills"]
        );
    }
    let steal = edge
        .get_file_containing(reg::GetFileContainingRequest {
            symbol: "telco.settlement.v1.SettlementService.Steal".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(steal.code(), Code::NotFound, "{steal:?}");
    // A message type of settlement's file comes from settlement's upload.
    let message = edge
        .get_file_containing(reg::GetFileContainingRequest {
            symbol: "telco.settlement.v1.GetBillRequest".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(message.service, "settlement");
}

/// Item 3: a certificate for `settlement` in another namespace is not
/// settlement.
#[tokio::test]
async fn a_certificate_in_another_namespace_is_not_the_service() {
    let mesh = Mesh::start_with(&[]);
    let other = SpiffeId::parse("spiffe://trellis.local/ns/other/sa/settlement").unwrap();
    let paths = mesh.pki.issue_for_id(&other, "other-settlement");
    let mut client = RegistryServiceClient::new(mesh.channel_for(&paths));
    let denied = client
        .register(instance("settlement", 9001, &[SETTLEMENT]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("ns/other"), "{denied:?}");
    // The real settlement still can.
    mesh.registry_as("settlement")
        .register(instance("settlement", 9002, &[SETTLEMENT]))
        .await
        .unwrap();
}

/// Item 10: durations too large to represent are refused with file and
/// line; the registry keeps serving.
#[tokio::test]
async fn a_timeout_too_large_to_represent_is_a_problem_not_a_panic() {
    let mesh = Mesh::start_with(&[]);
    let dir = mesh.config_dir.path();
    let mut config = mesh.config_as("usage");
    for (value, field) in [
        // Fits a u64 of seconds, not a protobuf Duration (i64 seconds).
        ("10000000000000000000s", "timeout"),
        // Fits a protobuf Duration, not u64 milliseconds.
        ("100000000000000000s", "timeout"),
        // Does not fit a u64 at all.
        ("100000000000000000000s", "timeout"),
        ("10000000000000000000s", "initial_backoff"),
        ("10000000000000000000s", "max_backoff"),
    ] {
        let text = if field == "timeout" {
            format!("[[routes]]\nmethod = \"*\"\ntimeout = \"{value}\"\n")
        } else {
            format!("[[routes]]\nmethod = \"*\"\n\n[routes.retry]\n{field} = \"{value}\"\n")
        };
        let line = if field == "timeout" { 3 } else { 5 };
        write(dir, "usage.toml", &text);
        let problem = wait_for_problem(&mut config, "usage.toml", value).await;
        assert_eq!(problem.line, line, "{text}: {problem:?}");
        assert!(problem.rejected);
        // Still serving, and nothing panicked.
        config
            .get_config(cfg::GetConfigRequest {
                service: "usage".into(),
            })
            .await
            .unwrap();
        mesh.log_without_panic();
        // Reset, so the next case's problem is its own.
        write(dir, "usage.toml", "# nothing\n");
        let deadline = Instant::now() + Duration::from_secs(3);
        while !config_status(&mut config).await.problems.is_empty() {
            assert!(Instant::now() < deadline, "problem never cleared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts the registry on `addr` with `extra` flags; waits until it listens.
fn spawn_registry_with(
    pki: &TestPki,
    config_dir: &std::path::Path,
    addr: std::net::SocketAddr,
    extra: &[&std::ffi::OsStr],
) -> RunningRegistry {
    let identity = pki.issue("registry", "registry");
    let mut cmd = std::process::Command::new(REGISTRY);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--cert")
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca)
        .args(extra)
        .env("RUST_LOG", "info");
    let process = ChildGuard::spawn("registry", cmd).expect("registry starts");
    assert!(
        wait_for_tcp(addr, Duration::from_secs(20)),
        "registry did not listen on {addr}: {}",
        process.output()
    );
    RunningRegistry { addr, process }
}

fn local_addr() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Asserts a quota refusal: RESOURCE_EXHAUSTED naming the identity, the
/// limit and the flag that raises it.
fn assert_quota(status: &tonic::Status, service: &str, limit: &str, flag: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let message = status.message();
    for needle in [
        &format!("spiffe://trellis.local/ns/default/sa/{service}"),
        limit,
        flag,
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
}

/// Item 5: one identity holds at most 64 instances (the default); others
/// are unaffected, and deregistering makes room again.
#[tokio::test]
async fn an_identity_may_not_register_more_instances_than_its_quota() {
    let mesh = Mesh::start_with(&[]);
    let mut loadgen = mesh.registry_as("loadgen");
    let mut first = None;
    for i in 0..64 {
        let r = loadgen
            .register(instance("loadgen", 10_000 + i, &[]))
            .await
            .unwrap()
            .into_inner();
        first.get_or_insert(r.instance_id);
    }
    let refused = loadgen
        .register(instance("loadgen", 11_000, &[]))
        .await
        .unwrap_err();
    assert_quota(&refused, "loadgen", "64", "--max-instances-per-identity");
    // Another identity still registers.
    mesh.registry_as("usage")
        .register(instance("usage", 9001, &[USAGE]))
        .await
        .unwrap();
    // Room again once one is gone.
    loadgen
        .deregister(reg::DeregisterRequest {
            instance_id: first.unwrap(),
        })
        .await
        .unwrap();
    loadgen
        .register(instance("loadgen", 11_000, &[]))
        .await
        .unwrap();
    mesh.log_without_panic();
}

/// Item 5: one identity holds at most 64 gRPC service names by claim
/// (the default); names declared for it in config do not count.
#[tokio::test]
async fn an_identity_may_not_claim_more_grpc_names_than_its_quota() {
    let mesh = Mesh::start_with(&[(
        "loadgen.toml",
        "grpc_services = [\"load.declared.v1.Service\"]\n",
    )]);
    let names: Vec<String> = (0..65).map(|i| format!("load.v1.Service{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut loadgen = mesh.registry_as("loadgen");
    let refused = loadgen
        .register(instance("loadgen", 9001, &refs))
        .await
        .unwrap_err();
    assert_quota(&refused, "loadgen", "64", "--max-grpc-names-per-identity");
    // Nothing was claimed by the refused registration.
    let nobody = loadgen
        .resolve(reg::ResolveRequest {
            target: refs[0].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::NotFound);
    // 64 are fine, plus the declared one; registering them again is too.
    let mut within = refs[..64].to_vec();
    within.push("load.declared.v1.Service");
    loadgen
        .register(instance("loadgen", 9001, &within))
        .await
        .unwrap();
    loadgen
        .register(instance("loadgen", 9002, &within))
        .await
        .unwrap();
    // One more, even from a second instance, is not.
    let refused = loadgen
        .register(instance("loadgen", 9003, &[refs[64]]))
        .await
        .unwrap_err();
    assert_quota(&refused, "loadgen", "64", "--max-grpc-names-per-identity");
    assert!(refused.message().contains(refs[64]), "{refused:?}");
    // Another identity is unaffected.
    mesh.registry_as("usage")
        .register(instance("usage", 9004, &[USAGE]))
        .await
        .unwrap();
}

/// Item 5: the contract one identity registers is bounded by
/// --max-descriptor-bytes-per-identity.
#[tokio::test]
async fn an_identity_may_not_register_a_contract_over_its_byte_quota() {
    let pki = TestPki::new("trellis.local");
    let config_dir = tempfile::tempdir().unwrap();
    let registry = spawn_registry_with(
        &pki,
        config_dir.path(),
        local_addr(),
        &[
            "--max-descriptor-bytes-per-identity".as_ref(),
            "16KiB".as_ref(),
        ],
    );
    let mesh = Mesh {
        pki,
        registry,
        config_dir,
    };
    let files = encode(&trellis_files());
    let total: usize = files.iter().map(Vec::len).sum();
    assert!(total > 16 * 1024, "the test contract is only {total} bytes");
    let mut usage = mesh.registry_as("usage");
    let mut request = instance("usage", 9001, &[USAGE]);
    request.file_descriptors = files;
    let refused = usage.register(request).await.unwrap_err();
    assert_quota(
        &refused,
        "usage",
        "16384 bytes",
        "--max-descriptor-bytes-per-identity",
    );
    assert!(
        refused.message().contains(&total.to_string()),
        "{refused:?}"
    );
    // A contract within the limit is accepted.
    let mut small = instance("evil", 9002, &["evil.v1.EvilService"]);
    small.file_descriptors = encode(&[evil_file()]);
    mesh.registry_as("evil").register(small).await.unwrap();

    // A limit above what one registration can carry is refused at start.
    let pki = TestPki::new("trellis.local");
    let identity = pki.issue("registry", "registry");
    let mut cmd = std::process::Command::new(REGISTRY);
    cmd.args(["--listen", &local_addr().to_string(), "--config-dir"])
        .arg(mesh.config_dir.path())
        .args(["--max-descriptor-bytes-per-identity", "8MiB", "--cert"])
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca);
    let mut process = ChildGuard::spawn("registry", cmd).unwrap();
    let exit = process.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!exit.success());
    assert!(
        process
            .output()
            .contains("--max-descriptor-bytes-per-identity"),
        "{}",
        process.output()
    );
}

/// Item 5: one identity holds at most 256 open watches (the default),
/// Registry Watch and Config WatchConfig together; a closed watch frees
/// its place; other identities are unaffected.
#[tokio::test]
async fn an_identity_may_not_open_more_watches_than_its_quota() {
    let mesh = Mesh::start_with(&[]);
    let edge = mesh.pki.issue("edge", "edge");
    // Four connections, 64 streams each.
    let channels: Vec<Channel> = (0..4).map(|_| mesh.channel_for(&edge)).collect();
    let mut streams = Vec::new();
    for i in 0..256 {
        let mut client = RegistryServiceClient::new(channels[i % 4].clone());
        let mut stream = client
            .watch(reg::WatchRequest { targets: vec![] })
            .await
            .unwrap_or_else(|e| panic!("watch {i}: {e:?}"))
            .into_inner();
        // The snapshot arrives: the watch is served.
        stream.message().await.unwrap().unwrap();
        streams.push(stream);
    }
    let mut registry = RegistryServiceClient::new(channels[0].clone());
    let refused = registry
        .watch(reg::WatchRequest { targets: vec![] })
        .await
        .unwrap_err();
    assert_quota(&refused, "edge", "256", "--max-watches-per-identity");
    let mut config = ConfigServiceClient::new(channels[1].clone());
    let refused = config
        .watch_config(cfg::WatchConfigRequest {
            service: "usage".into(),
        })
        .await
        .unwrap_err();
    assert_quota(&refused, "edge", "256", "--max-watches-per-identity");
    // Another identity still watches.
    mesh.registry_as("usage")
        .watch(reg::WatchRequest { targets: vec![] })
        .await
        .unwrap();
    // Closing one frees its place (once the registry sees it closed).
    drop(streams.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match registry.watch(reg::WatchRequest { targets: vec![] }).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(Instant::now() < deadline, "a closed watch kept its place");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    mesh.log_without_panic();
}

fn with_ttl(mut request: reg::RegisterRequest, seconds: i64) -> reg::RegisterRequest {
    request.lease_ttl = Some(prost_types::Duration { seconds, nanos: 0 });
    request
}

/// Item 6: instances with their leases, name ownership, contracts and the
/// revision survive a SIGKILL of the registry with --state-dir; leases
/// that ran out meanwhile do not come back; a drain writes what changed
/// last.
#[tokio::test]
async fn registry_state_survives_a_sigkill_restart() {
    let pki = TestPki::new("trellis.local");
    let config_dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("registry");
    let addr = local_addr();
    let flags: [&std::ffi::OsStr; 4] = [
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
        "--grace".as_ref(),
        "1s".as_ref(),
    ];
    let mut mesh = Mesh {
        registry: spawn_registry_with(&pki, config_dir.path(), addr, &flags),
        pki,
        config_dir,
    };

    let mut usage = mesh.registry_as("usage");
    let mut request = with_ttl(instance("usage", 9001, &[USAGE]), 600);
    request.file_descriptors = encode(&trellis_files());
    let registered = usage.register(request).await.unwrap().into_inner();
    let settlement = mesh
        .registry_as("settlement")
        .register(with_ttl(instance("settlement", 9002, &[SETTLEMENT]), 2))
        .await
        .unwrap()
        .into_inner();
    let before = settlement.revision.max(registered.revision);
    // Give the coalesced write its time, then crash.
    tokio::time::sleep(Duration::from_millis(600)).await;
    mesh.registry.process.kill();
    // Settlement's 2 s lease runs out while the registry is down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    mesh.registry = spawn_registry_with(&mesh.pki, mesh.config_dir.path(), addr, &flags);

    // Resolve returns the instance at once, at a later revision.
    let mut edge = mesh.registry_as("edge");
    let resolved = edge
        .resolve(reg::ResolveRequest {
            target: USAGE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.instances.len(), 1, "{resolved:?}");
    assert_eq!(resolved.instances[0].instance_id, registered.instance_id);
    assert_eq!(resolved.instances[0].address, "127.0.0.1:9001");
    assert!(
        resolved.revision > before,
        "revision {} after the restart, {before} before",
        resolved.revision
    );
    // A watcher's snapshot has it too.
    let snapshot = edge
        .watch(reg::WatchRequest {
            targets: vec!["usage".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.instances.len(), 1);
    // The expired lease did not come back.
    let gone = edge
        .resolve(reg::ResolveRequest {
            target: "settlement".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // The lease is still renewable, by its owner only.
    let mut usage = mesh.registry_as("usage");
    let renewed = usage
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: registered.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.ttl.unwrap().seconds, 600);
    let mut replies = usage
        .keep_alive(tokio_stream::iter([reg::KeepAliveRequest {
            lease_id: registered.lease_id.clone(),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        replies.message().await.unwrap().unwrap().lease_id,
        registered.lease_id
    );
    let stolen = mesh
        .registry_as("echo")
        .renew_lease(reg::RenewLeaseRequest {
            lease_id: registered.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::PermissionDenied, "{stolen:?}");

    // Ownership holds: usage's name and settlement's (whose instance is
    // gone) still refuse another identity.
    for name in [USAGE, SETTLEMENT] {
        let denied = mesh
            .registry_as("echo")
            .register(instance("echo", 9003, &[name]))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{name}: {denied:?}");
    }
    // The contract is served as before.
    let contract = edge
        .get_service_descriptors(reg::GetServiceDescriptorsRequest {
            grpc_service: USAGE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(contract.service, "usage");

    // A change made just before a graceful stop is written by the drain.
    let last = mesh
        .registry_as("settlement")
        .register(with_ttl(instance("settlement", 9004, &[SETTLEMENT]), 600))
        .await
        .unwrap()
        .into_inner();
    mesh.registry.process.terminate();
    let exit = mesh.registry.process.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}");
    mesh.registry = spawn_registry_with(&mesh.pki, mesh.config_dir.path(), addr, &flags);
    let resolved = mesh
        .registry_as("edge")
        .resolve(reg::ResolveRequest {
            target: "settlement".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.instances[0].instance_id, last.instance_id);
    assert!(resolved.revision > last.revision);
    mesh.log_without_panic();
}

/// Item 6: a state file the registry cannot read stops it at start, with
/// a message naming the file, rather than starting empty (which would let
/// any identity claim the names it forgot).
#[tokio::test]
async fn a_corrupt_state_file_stops_the_registry_naming_it() {
    let pki = TestPki::new("trellis.local");
    let config_dir = tempfile::tempdir().unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let file = state_dir.path().join("registry.state");
    std::fs::write(&file, b"TRELLIS-REGISTRY-STATE 1\n\xff\xff\xff\xff").unwrap();
    let identity = pki.issue("registry", "registry");
    let mut cmd = std::process::Command::new(REGISTRY);
    cmd.args(["--listen", &local_addr().to_string(), "--config-dir"])
        .arg(config_dir.path())
        .arg("--state-dir")
        .arg(state_dir.path())
        .arg("--cert")
        .arg(&identity.cert)
        .arg("--key")
        .arg(&identity.key)
        .arg("--ca")
        .arg(&identity.ca);
    let mut process = ChildGuard::spawn("registry", cmd).unwrap();
    let exit = process.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!exit.success());
    let out = process.output();
    assert!(out.contains(&file.display().to_string()), "{out}");
    assert!(out.contains("move it aside"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}
