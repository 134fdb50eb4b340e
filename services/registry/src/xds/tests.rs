//! The ADS state machine and the resources, without a network: what a
//! stream sends for requests, ACKs, NACKs, stale nonces and changes.

use envoy_types::pb::google::rpc::Status as RpcStatus;

use super::*;
use crate::quota::Quotas;
use crate::registry::MeshScope;

const ECHO_TOML: &str = r#"
[[routes]]
method = "trellis.echo.v1.EchoService/Echo"
idempotent = true
timeout = "2s"

[routes.retry]
max_attempts = 3
retryable_status_codes = ["UNAVAILABLE", "NOT_FOUND"]
initial_backoff = "10ms"
max_backoff = "40ms"

[traffic]
split = [ { version = "v1", weight = 90 }, { version = "v2", weight = 10 } ]
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    config: Arc<ConfigStore>,
}

impl Fixture {
    fn new() -> Self {
        Self::with(ECHO_TOML)
    }

    fn with(echo_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("echo.toml"), echo_toml).unwrap();
        let scope = MeshScope {
            trust_domain: "trellis.local".into(),
            namespace: "default".into(),
        };
        let registry = Registry::new(scope, [], Quotas::UNLIMITED);
        let config = ConfigStore::open(dir.path(), registry.clone()).unwrap();
        Self {
            _dir: dir,
            registry,
            config,
        }
    }

    fn register(&self, address: &str, version: &str, zone: &str) -> String {
        let echo = trellis::SpiffeId::parse("spiffe://trellis.local/ns/default/sa/echo").unwrap();
        self.registry
            .register(
                &echo,
                pb::RegisterRequest {
                    service: "echo".into(),
                    version: version.into(),
                    zone: zone.into(),
                    address: address.into(),
                    grpc_services: vec!["trellis.echo.v1.EchoService".into()],
                    health: ServingStatus::Serving as i32,
                    lease_ttl: Some(prost_types::Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
            )
            .unwrap()
            .instance_id
    }

    fn view(&self) -> View {
        View::read(&self.registry, &self.config)
    }
}

fn ask(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        node: Some(core::Node {
            id: "test-node".into(),
            locality: Some(core::Locality {
                zone: "z1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A NACK of the response with `nonce`, keeping no version, for `reason`.
fn nack(type_url: &str, names: &[&str], nonce: &str, reason: String) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: reason,
            details: Vec::new(),
        }),
        ..ask(type_url, names, "", nonce)
    }
}

fn decode<M: Message + Default>(response: &DiscoveryResponse) -> Vec<M> {
    response
        .resources
        .iter()
        .map(|a| M::decode(a.value.as_slice()).unwrap())
        .collect()
}

#[test]
fn a_listener_is_sent_once_acked_and_not_again_until_it_changes() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    let mut s = AdsState::new("caller".into());
    let first = s
        .on_request(ask(LISTENER, &["echo"], "", ""), &f.view())
        .unwrap()
        .expect("the first request is answered");
    let listeners: Vec<listener::Listener> = decode(&first);
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].name, "echo");
    // ACK: nothing new to send.
    let ack = ask(LISTENER, &["echo"], &first.version_info, &first.nonce);
    assert!(s.on_request(ack, &f.view()).unwrap().is_none());
    assert_eq!(
        s.types[LISTENER].acked.as_deref(),
        Some(first.version_info.as_str())
    );
    // A registry change that leaves listeners as they were sends nothing.
    f.register("127.0.0.1:9002", "v1", "z1");
    assert!(s.refresh(&f.view()).is_empty());
}

#[test]
fn a_nack_is_recorded_and_the_same_content_is_not_sent_again() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    let mut s = AdsState::new("caller".into());
    let sent = s
        .on_request(ask(CLUSTER, &["echo"], "", ""), &f.view())
        .unwrap()
        .unwrap();
    let rejected = nack(
        CLUSTER,
        &["echo"],
        &sent.nonce,
        "cluster echo: unsupported field".into(),
    );
    assert!(s.on_request(rejected, &f.view()).unwrap().is_none());
    assert!(s.types[CLUSTER].acked.is_none());
    assert!(s.refresh(&f.view()).is_empty(), "not re-sent unchanged");
    // Reported with its reason until the client accepts a later version.
    let stats = XdsStats::default();
    stats.record(7, std::mem::take(&mut s.outcomes));
    assert_eq!(stats.read().nacks, 1);
    let rejections = stats.rejections();
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].reason, "cluster echo: unsupported field");
    assert_eq!(rejections[0].type_url, CLUSTER);
    assert_eq!(rejections[0].node, "test-node");
    assert_eq!(rejections[0].rejected_version, sent.version_info);
    assert_eq!(rejections[0].kept_version, "");
    // Asking for more names, still on the old version: not an ACK.
    f.register("127.0.0.1:9002", "v2", "z1");
    let more = ask(CLUSTER, &["echo", "echo~v2"], "", &sent.nonce);
    let next = s.on_request(more, &f.view()).unwrap().expect("answered");
    stats.record(7, std::mem::take(&mut s.outcomes));
    assert_eq!(stats.rejections().len(), 1);
    let ack = ask(
        CLUSTER,
        &["echo", "echo~v2"],
        &next.version_info,
        &next.nonce,
    );
    assert!(s.on_request(ack, &f.view()).unwrap().is_none());
    stats.record(7, std::mem::take(&mut s.outcomes));
    assert!(stats.rejections().is_empty(), "an ACK clears it");
    assert_eq!(stats.read().nacks, 1, "but it stays counted");
}

#[test]
fn rejections_are_bounded_newest_first_and_end_with_their_stream() {
    let stats = XdsStats::default();
    let rejection = |n: u64| {
        Outcome::Rejected(
            LISTENER,
            cfg::XdsRejection {
                reason: format!("no. {n}"),
                ..Default::default()
            },
        )
    };
    for n in 0..(MAX_REJECTIONS as u64 + 6) {
        stats.record(n, vec![rejection(n)]);
    }
    // The same stream and type again replaces, not adds.
    stats.record(69, vec![rejection(100)]);
    let kept = stats.rejections();
    assert_eq!(kept.len(), MAX_REJECTIONS);
    assert_eq!(kept[0].reason, "no. 100");
    assert_eq!(kept[1].reason, "no. 68");
    assert_eq!(
        kept.last().unwrap().reason,
        "no. 6",
        "the oldest went first"
    );
    stats.forget(69);
    assert_eq!(stats.rejections()[0].reason, "no. 68");
    assert_eq!(stats.read().nacks, MAX_REJECTIONS as u64 + 7);
}

#[test]
fn a_request_answering_an_older_nonce_is_ignored() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    let mut s = AdsState::new("caller".into());
    let first = s
        .on_request(ask(LISTENER, &["echo"], "", ""), &f.view())
        .unwrap()
        .unwrap();
    let second = s
        .on_request(
            ask(
                LISTENER,
                &["echo", "trellis.echo.v1.EchoService"],
                "",
                &first.nonce,
            ),
            &f.view(),
        )
        .unwrap()
        .expect("a new name is answered");
    assert_eq!(decode::<listener::Listener>(&second).len(), 2);
    let stale = ask(LISTENER, &["echo"], &first.version_info, &first.nonce);
    assert!(s.on_request(stale, &f.view()).unwrap().is_none());
    assert_eq!(
        s.types[LISTENER].names.len(),
        2,
        "the stale request changed nothing"
    );
}

#[test]
fn an_unknown_name_is_left_out_and_too_many_names_are_refused() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    let mut s = AdsState::new("caller".into());
    let r = s
        .on_request(ask(LISTENER, &["nosuch"], "", ""), &f.view())
        .unwrap()
        .expect("answered at once, without it");
    assert!(r.resources.is_empty());
    let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("s{i}")).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    let refused = s
        .on_request(ask(LISTENER, &names, "", ""), &f.view())
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("at most 1000"),
        "{}",
        refused.message()
    );
}

#[test]
fn routes_carry_the_policy_and_the_split() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    f.register("127.0.0.1:9002", "v2", "z1");
    let config = routes_for("echo", &f.view());
    let routes = &config.virtual_hosts[0].routes;
    let first = routes.first().unwrap();
    assert_eq!(
        first.r#match.as_ref().unwrap().path_specifier,
        Some(route::route_match::PathSpecifier::Path(
            "/trellis.echo.v1.EchoService/Echo".into()
        ))
    );
    let Some(route::route::Action::Route(action)) = &first.action else {
        panic!("a route action");
    };
    let retry = action.retry_policy.as_ref().expect("a retry policy");
    // NOT_FOUND cannot be said to gRPC's xDS client: left out.
    assert_eq!(retry.retry_on, "unavailable");
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 2);
    assert_eq!(
        action
            .max_stream_duration
            .as_ref()
            .unwrap()
            .max_stream_duration
            .as_ref()
            .unwrap()
            .seconds,
        2
    );
    let Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) =
        &action.cluster_specifier
    else {
        panic!("a split: {action:?}");
    };
    let split: Vec<(&str, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
        .collect();
    assert_eq!(split, [("echo~v1", 90), ("echo~v2", 10)]);
    // The last route catches every other method.
    assert_eq!(
        routes
            .last()
            .unwrap()
            .r#match
            .as_ref()
            .unwrap()
            .path_specifier,
        Some(route::route_match::PathSpecifier::Prefix(String::new()))
    );
}

#[test]
fn endpoints_put_the_callers_zone_first_and_unhealthy_ones_aside() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    let far = f.register("127.0.0.1:9002", "v1", "z2");
    f.register("localhost:9003", "v1", "z1");
    let echo = trellis::SpiffeId::parse("spiffe://trellis.local/ns/default/sa/echo").unwrap();
    f.registry
        .set_health(&echo, &far, ServingStatus::NotServing)
        .unwrap();
    let assignment = endpoints_for("echo", &f.view(), "z1").unwrap();
    let by_zone: Vec<(&str, u32, Vec<i32>)> = assignment
        .endpoints
        .iter()
        .map(|l| {
            (
                l.locality.as_ref().unwrap().zone.as_str(),
                l.priority,
                l.lb_endpoints.iter().map(|e| e.health_status).collect(),
            )
        })
        .collect();
    // localhost:9003 is not an IP address: left out.
    assert_eq!(
        by_zone,
        [
            ("z1", 0, vec![core::HealthStatus::Healthy as i32]),
            ("z2", 1, vec![core::HealthStatus::Unhealthy as i32]),
        ]
    );
    // The v2 cluster of a split has none of v1's instances.
    assert!(
        endpoints_for("echo~v2", &f.view(), "z1")
            .unwrap()
            .endpoints
            .is_empty()
    );
}

/// The names of the endpoint-picking policies inside a cluster's
/// `wrr_locality`, in the order gRPC tries them.
fn picking_of(cluster: &cluster::Cluster) -> Vec<String> {
    use envoy_types::pb::envoy::extensions::load_balancing_policies as lb;
    let outer = &cluster.load_balancing_policy.as_ref().unwrap().policies;
    assert_eq!(outer.len(), 1);
    let wrapper = outer[0].typed_extension_config.as_ref().unwrap();
    let any = wrapper.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, WRR_LOCALITY);
    let locality = lb::wrr_locality::v3::WrrLocality::decode(any.value.as_slice()).unwrap();
    locality
        .endpoint_picking_policy
        .unwrap()
        .policies
        .iter()
        .map(|p| {
            let config = p.typed_extension_config.as_ref().unwrap();
            config.typed_config.as_ref().unwrap().type_url.clone()
        })
        .collect()
}

#[test]
fn clusters_carry_the_balancing_and_the_caller_limit() {
    let f = Fixture::with(
        r#"
caller_limit = { max_concurrent = 40, max_queued = 10 }

[[routes]]
method = "*"
load_balancing = "peak_ewma"
"#,
    );
    f.register("127.0.0.1:9001", "v1", "z1");
    let cluster = cluster_for("echo", &f.view()).unwrap();
    // The caller limit is gRPC's circuit breaking: requests in flight.
    let thresholds = &cluster.circuit_breakers.as_ref().unwrap().thresholds;
    assert_eq!(thresholds.len(), 1);
    assert_eq!(thresholds[0].max_requests.as_ref().unwrap().value, 40);
    // The enum is left unset: gRPC refuses LEAST_REQUEST there.
    assert_eq!(cluster.lb_policy, 0);
    assert_eq!(picking_of(&cluster), [LEAST_REQUEST, ROUND_ROBIN]);
    // No catch-all route: the default, peak EWMA, is load-aware too.
    let plain = Fixture::new();
    plain.register("127.0.0.1:9001", "v1", "z1");
    let cluster = cluster_for("echo", &plain.view()).unwrap();
    assert_eq!(picking_of(&cluster), [LEAST_REQUEST, ROUND_ROBIN]);
    assert!(cluster.circuit_breakers.is_none(), "no limit, no breaker");
    // Round robin asked for: round robin alone.
    let turns = Fixture::with("[[routes]]\nmethod = \"*\"\nload_balancing = \"round_robin\"\n");
    turns.register("127.0.0.1:9001", "v1", "z1");
    let cluster = cluster_for("echo", &turns.view()).unwrap();
    assert_eq!(picking_of(&cluster), [ROUND_ROBIN]);
}

#[test]
fn a_long_reason_is_cut_at_a_character_boundary() {
    let f = Fixture::new();
    f.register("127.0.0.1:9001", "v1", "z1");
    let mut s = AdsState::new("caller".into());
    let sent = s
        .on_request(ask(LISTENER, &["echo"], "", ""), &f.view())
        .unwrap()
        .unwrap();
    let long = nack(LISTENER, &["echo"], &sent.nonce, "é".repeat(100_000));
    s.on_request(long, &f.view()).unwrap();
    let Some(Outcome::Rejected(_, rejection)) = s.outcomes.pop() else {
        panic!("a rejection");
    };
    assert!(rejection.reason.len() < MAX_CLIENT_TEXT + 40);
    assert!(
        rejection.reason.ends_with("… (200000 bytes in all)"),
        "{}",
        &rejection.reason[rejection.reason.len() - 40..]
    );
}
