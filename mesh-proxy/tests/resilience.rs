//! The sidecar under faults, with real processes over real mTLS: an
//! endpoint that accepts TCP and never finishes TLS, a sidecar draining
//! while its service still has calls to make, and (see each test) the
//! control plane going away.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis::pb::telco::profile::v1 as profile;
use trellis::pb::trellis::echo::v1 as echo;
use trellis::pb::trellis::registry::v1 as reg;
use trellis_test_support::{
    ProxyOptions, RunningEcho, RunningProxy, TestMesh, sibling_binary, spawn_echo, spawn_proxy,
    spawn_registry_at,
};

use echo::echo_service_client::EchoServiceClient;
use profile::profile_service_client::ProfileServiceClient;
use profile::profile_service_server::{ProfileService, ProfileServiceServer};

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";
const PROFILE: &str = "telco.profile.v1.ProfileService";

fn proxy_bin() -> PathBuf {
    PathBuf::from(PROXY)
}

/// A registry and a CA; instances and callers are added per test.
struct Mesh(TestMesh);

impl std::ops::Deref for Mesh {
    type Target = TestMesh;
    fn deref(&self) -> &TestMesh {
        &self.0
    }
}

impl std::ops::DerefMut for Mesh {
    fn deref_mut(&mut self) -> &mut TestMesh {
        &mut self.0
    }
}

impl Mesh {
    fn start() -> Self {
        Self(TestMesh::start(PROXY, &[]))
    }

    /// An echo instance named `name` behind a sidecar of mesh service
    /// `echo`, with short leases.
    fn echo(&self, name: &str) -> (RunningEcho, RunningProxy) {
        self.echo_leased(name, "2s")
    }

    /// The same, with leases of `lease_ttl`.
    fn echo_leased(&self, name: &str, lease_ttl: &str) -> (RunningEcho, RunningProxy) {
        let echo = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), name, &[]);
        let identity = self.identity("echo");
        let proxy = spawn_proxy(
            &proxy_bin(),
            name,
            ProxyOptions::new(&identity, Some(echo.addr), Some(self.registry.addr)).args(&[
                "--drain-delay",
                "500ms",
                "--lease-ttl",
                lease_ttl,
            ]),
        );
        (echo, proxy)
    }

    /// A sidecar for a calling service with no server of its own.
    fn caller(&self, service: &str, extra: &[&str]) -> RunningProxy {
        let identity = self.identity(service);
        spawn_proxy(
            &proxy_bin(),
            service,
            ProxyOptions::new(&identity, None, Some(self.registry.addr)).args(extra),
        )
    }
}

fn echo_client(addr: SocketAddr) -> EchoServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    EchoServiceClient::new(channel)
}

fn say(message: &str) -> echo::EchoRequest {
    echo::EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    }
}

/// A TCP listener that accepts every connection and never sends a byte:
/// a peer whose TLS handshake never finishes. Connections are held open
/// for as long as the task runs.
async fn blackhole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// Item 8: an endpoint that accepts TCP and never finishes TLS costs a
/// call at most the connect timeout, after which the call goes to a
/// healthy endpoint; no call waits out a 10 s handshake or its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_endpoint_fails_over_within_the_deadline() {
    let mesh = Mesh::start();
    let (_echo, _echo_proxy) = mesh.echo("healthy");
    let (hole, _hole_task) = blackhole().await;
    // A second "instance" of echo, registered by hand under echo's own
    // identity, at the blackhole's address; a long lease keeps it listed
    // through the test.
    let mut registry = mesh.registry_client("echo");
    registry
        .register(reg::RegisterRequest {
            service: "echo".into(),
            address: hole.to_string(),
            grpc_services: vec![ECHO.into()],
            health: reg::ServingStatus::Serving as i32,
            lease_ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("the blackhole registers");
    let caller = mesh.caller("frontend", &[]);
    mesh.wait_serving("echo", 2).await;
    // The caller's sidecar learns both by push; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let deadline = Duration::from_secs(2);
    let until = Instant::now() + Duration::from_secs(6);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = echo_client(caller.outbound);
            tokio::spawn(async move {
                let mut calls = Vec::new();
                let mut i = 0;
                while Instant::now() < until {
                    let mut request = tonic::Request::new(say(&format!("w{w} call {i}")));
                    request.set_timeout(deadline);
                    let started = Instant::now();
                    let result = client.echo(request).await;
                    calls.push((
                        i,
                        started.elapsed(),
                        result.map(|r| r.into_inner().instance),
                    ));
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                calls
            })
        })
        .collect();
    let mut total = 0;
    let mut slowest = Duration::ZERO;
    for (w, worker) in workers.into_iter().enumerate() {
        for (i, took, result) in worker.await.unwrap() {
            total += 1;
            slowest = slowest.max(took);
            match result {
                Ok(instance) => assert_eq!(instance, "healthy", "worker {w} call {i}"),
                Err(status) => panic!(
                    "worker {w} call {i} failed after {took:?}: {status:?}\n{}",
                    caller.process.output()
                ),
            }
            assert!(took < deadline, "worker {w} call {i} took {took:?}");
        }
    }
    assert!(total > 40, "only {total} calls made");
    // The blackhole was tried (and failed over from), not just avoided.
    let (_, metrics) = caller.admin_get("/metrics");
    assert!(
        metrics.contains(&format!(
            r#"trellis_proxy_retries_total{{service="{ECHO}"}}"#
        )),
        "{metrics}"
    );
    eprintln!("{total} calls, slowest {slowest:?}");
}

/// A profile service that, on GetProfile, waits `delay`, then calls Echo
/// through its sidecar's outbound port on a fresh connection, and answers
/// with the echo instance that replied (an error if the call failed).
struct Relay {
    outbound: SocketAddr,
    delay: Duration,
    started: tokio::sync::mpsc::UnboundedSender<()>,
}

#[tonic::async_trait]
impl ProfileService for Relay {
    async fn get_profile(
        &self,
        request: tonic::Request<profile::GetProfileRequest>,
    ) -> Result<tonic::Response<profile::GetProfileResponse>, tonic::Status> {
        let _ = self.started.send(());
        tokio::time::sleep(self.delay).await;
        // A new connection, as a service opening one late in a call would.
        let channel = Channel::from_shared(format!("http://{}", self.outbound))
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("outbound port: {e}")))?;
        let reply = EchoServiceClient::new(channel)
            .echo(say(&request.get_ref().user_id))
            .await?
            .into_inner();
        Ok(tonic::Response::new(profile::GetProfileResponse {
            profile: Some(profile::Profile {
                user_id: request.into_inner().user_id,
                summary: reply.instance,
                ..Default::default()
            }),
        }))
    }
}

/// Item 9: after SIGTERM, deregistration and the drain delay, a call the
/// local service is still finishing can call other services: the
/// outbound port stays open until inbound calls have drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_sidecar_keeps_its_outbound_port_for_calls_in_flight() {
    let mesh = Mesh::start();
    let (_echo, _echo_proxy) = mesh.echo("callee");

    // The relay service: a gRPC server in this process, behind its own
    // sidecar, whose outbound port it is told in advance.
    let outbound: SocketAddr = format!("127.0.0.1:{}", trellis_test_support::free_port())
        .parse()
        .unwrap();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ProfileServiceServer<Relay>>().await;
    let relay = Relay {
        outbound,
        delay: Duration::from_millis(1500),
        started: started_tx,
    };
    let _server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ProfileServiceServer::new(relay))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(app)),
    );
    let identity = mesh.identity("profile");
    let mut options =
        ProxyOptions::new(&identity, Some(app_addr), Some(mesh.registry.addr)).args(&[
            "--grpc-services",
            PROFILE,
            "--drain-delay",
            "200ms",
            "--grace",
            "10s",
        ]);
    options.outbound = Some(outbound);
    let mut relay_proxy = spawn_proxy(&proxy_bin(), "profile", options);
    let caller = mesh.caller("frontend", &[]);
    mesh.wait_serving("echo", 1).await;
    mesh.wait_serving("profile", 1).await;

    let mut client = ProfileServiceClient::new(
        Channel::from_shared(format!("http://{}", caller.outbound))
            .unwrap()
            .connect_lazy(),
    );
    // Warm-up: the whole path works before anything drains.
    let warm = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let request = profile::GetProfileRequest {
                user_id: "warm".into(),
            };
            if let Ok(r) = client.get_profile(request).await {
                return r.into_inner();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay answers before the drain");
    assert_eq!(warm.profile.unwrap().summary, "callee");
    while started.try_recv().is_ok() {}

    // The call in flight: the relay is sleeping in it when SIGTERM lands,
    // and makes its outbound call after deregistration and the drain
    // delay are over.
    let call = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(profile::GetProfileRequest {
                user_id: "in flight".into(),
            });
            request.set_timeout(Duration::from_secs(8));
            client.get_profile(request).await
        }
    });
    tokio::time::timeout(Duration::from_secs(5), started.recv())
        .await
        .expect("the relay got the call")
        .unwrap();
    relay_proxy.process.terminate();
    let answer = call.await.unwrap().unwrap_or_else(|status| {
        panic!(
            "the call in flight failed: {status:?}\n{}",
            relay_proxy.process.output()
        )
    });
    assert_eq!(answer.into_inner().profile.unwrap().summary, "callee");
    // Then the sidecar finishes draining and exits.
    let status = relay_proxy
        .process
        .wait_exit(Duration::from_secs(10))
        .expect("the sidecar exits after draining");
    assert!(status.success(), "{status:?}");
    let output = relay_proxy.process.output();
    assert!(output.contains("drained cleanly"), "{output}");
}

/// Item 6, the proxies' part: a registry SIGKILLed and restarted (state in
/// memory: it comes back knowing nothing) costs no call, though leases are
/// long: callers keep the endpoints the old registry gave them until the
/// new one has them again, and instances register again as soon as their
/// watch reconnects, not a third of a lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_restart_costs_no_call_and_instances_register_again_at_once() {
    let mut mesh = Mesh::start();
    let (_echo, _echo_proxy) = mesh.echo_leased("steady", "60s");
    let caller = mesh.caller("frontend", &[]);
    mesh.wait_serving("echo", 1).await;
    let mut client = echo_client(caller.outbound);
    tokio::time::timeout(Duration::from_secs(15), async {
        while client.echo(say("warm-up")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("echo answers");

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        let mut client = client.clone();
        async move {
            let mut failures = Vec::new();
            let mut calls = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut request = tonic::Request::new(say(&format!("call {calls}")));
                request.set_timeout(Duration::from_secs(2));
                if let Err(status) = client.echo(request).await {
                    failures.push((calls, status));
                }
                calls += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (calls, failures)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let addr = mesh.registry.addr;
    mesh.registry.process.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let registry_bin = sibling_binary(PROXY, "trellis-registry");
    mesh.registry = spawn_registry_at(
        registry_bin.to_str().unwrap(),
        &mesh.identity("registry"),
        mesh.config.path(),
        addr,
    );
    let restarted = Instant::now();
    // The instance is back within moments (its sidecar's watch reconnects
    // with a backoff of a few hundred milliseconds here), not the 20 s a
    // lease renewal would take.
    let mut registry = mesh.registry_client("observer");
    loop {
        let listed = registry
            .resolve(reg::ResolveRequest {
                target: "echo".into(),
            })
            .await
            .map_or(0, |r| r.into_inner().instances.len());
        if listed == 1 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(3),
            "echo has not registered again after {:?}",
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "registered again {:?} after the restart",
        restarted.elapsed()
    );
    // Calls go on a while past the restart: the callers' views rebuilt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (calls, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed, first: {:?}\n{}",
        failures.len(),
        failures.first(),
        caller.process.output()
    );
    assert!(calls > 100, "only {calls} calls");
}
