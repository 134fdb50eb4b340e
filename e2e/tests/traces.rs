//! One trace across every hop: an edge call to usage, usage's call to
//! user through its sidecar, and the delivery of the event it wrote to
//! settlement, received by a real OTLP/gRPC receiver with correct
//! parent/child links across processes and the RPC attributes. Then a
//! malformed `traceparent` starts a new trace, and a collector that goes
//! away costs no call.

mod common;

use std::time::Duration;

use common::*;
use trellis::pb::telco::usage::v1 as usage;
use trellis_test_support::{OtlpReceiver, ReceivedSpan, set_child_env};

use usage::usage_service_client::UsageServiceClient;

const USAGE: &str = "telco.usage.v1.UsageService";
const RECORD: &str = "telco.usage.v1.UsageService/RecordUsage";

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;

/// The one span in `trace` that `matches`, named in the failure.
fn one<'a>(
    trace: &'a [ReceivedSpan],
    what: &str,
    matches: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = trace.iter().filter(|s| matches(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "{what}: expected one span, found {}: {found:#?}\nthe whole trace: {}",
        found.len(),
        describe(trace)
    );
    found[0]
}

fn describe(trace: &[ReceivedSpan]) -> String {
    trace
        .iter()
        .map(|s| {
            format!(
                "\n  {} {} kind={} span={} parent={}",
                s.service, s.name, s.kind, s.span_id, s.parent_span_id
            )
        })
        .collect()
}

fn is_child(child: &ReceivedSpan, parent: &ReceivedSpan) -> bool {
    child.parent_span_id == parent.span_id
}

#[test]
fn an_edge_call_and_the_event_it_causes_are_one_trace_across_processes() {
    let receiver = OtlpReceiver::start();
    // Every process of the mesh exports to the receiver.
    set_child_env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint());
    set_child_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    set_child_env("OTEL_TRACES_SAMPLER", "parentbased_always_on");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(scenario(receiver));
}

async fn scenario(receiver: OtlpReceiver) {
    let fixture = start_billing(&[
        "telco.user.v1.UserService",
        USAGE,
        "telco.settlement.v1.SettlementService",
    ])
    .await;
    let mesh = &fixture.mesh;
    let user_id = subscribed_user(mesh.edge, "+491701234599", "Ada Lovelace", "plus").await;

    // The traced call: the caller starts the trace and records its span.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = "00f067aa0ba902b7";
    let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let record = |key: &str| usage::RecordUsageRequest {
        user_id: user_id.clone(),
        r#type: usage::UsageType::Data as i32,
        quantity: 100,
        occurred_at: Some(timestamp(now)),
        idempotency_key: key.to_owned(),
    };
    let mut usage_client = UsageServiceClient::new(channel(mesh.edge));
    let mut request = tonic::Request::new(record("traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    usage_client.record_usage(request).await.unwrap();

    // Everything down to settlement applying the event.
    let settled = |s: &ReceivedSpan| {
        s.service == "settlement" && s.kind == SERVER && s.attr("rpc.method") == Some("Deliver")
    };
    let trace = receiver
        .wait_for_trace(&trace_id, Duration::from_secs(30), |t| {
            t.iter().any(settled)
                && t.iter().any(|s| s.service == "user" && s.kind == SERVER)
                && t.iter().filter(|s| s.name.ends_with("/Deliver")).count() >= 3
        })
        .await
        .unwrap_or_else(|partial| {
            panic!(
                "the trace did not arrive whole within 30 s; got:{}",
                describe(&partial)
            )
        });

    // edge → usage's sidecar (inbound) → usage.
    let edge = one(&trace, "the edge's server span", |s| {
        s.service == "edge" && s.kind == SERVER && s.name == RECORD
    });
    assert_eq!(
        edge.parent_span_id, caller_span,
        "the edge continues the caller's trace"
    );
    let usage_in = one(&trace, "usage's sidecar, inbound", |s| {
        s.service == "usage-proxy" && s.kind == SERVER && s.name == RECORD
    });
    assert!(is_child(usage_in, edge), "{}", describe(&trace));
    assert!(
        usage_in
            .attr("trellis.peer.identity")
            .is_some_and(|id| id.ends_with("/sa/edge")),
        "the verified peer is the edge: {usage_in:#?}"
    );
    let usage_rpc = one(&trace, "usage's own server span", |s| {
        s.service == "usage" && s.kind == SERVER && s.name == RECORD
    });
    assert!(is_child(usage_rpc, usage_in), "{}", describe(&trace));

    // usage → its sidecar (outbound) → user's sidecar → user.
    let to_user = one(&trace, "usage's sidecar calling user", |s| {
        s.service == "usage-proxy" && s.kind == CLIENT && s.name.starts_with("telco.user.v1.")
    });
    assert!(is_child(to_user, usage_rpc), "{}", describe(&trace));
    assert!(to_user.attr("server.address").is_some(), "{to_user:#?}");
    assert!(to_user.attr("server.port").is_some(), "{to_user:#?}");
    assert!(
        to_user.events.iter().any(|e| e == "attempt"),
        "{to_user:#?}"
    );
    let user_in = one(&trace, "user's sidecar, inbound", |s| {
        s.service == "user-proxy" && s.kind == SERVER
    });
    assert!(is_child(user_in, to_user), "{}", describe(&trace));
    let user_rpc = one(&trace, "user's own server span", |s| {
        s.service == "user" && s.kind == SERVER
    });
    assert!(is_child(user_rpc, user_in), "{}", describe(&trace));
    assert!(
        user_rpc
            .attr("trellis.caller")
            .is_some_and(|c| c.ends_with("/sa/usage")),
        "user sees usage as its caller: {user_rpc:#?}"
    );

    // usage's outbox → delivery → settlement, in the same trace.
    let settlement_rpc = one(&trace, "settlement applying the event", settled);
    let settlement_in = trace
        .iter()
        .find(|s| s.span_id == settlement_rpc.parent_span_id)
        .expect("settlement's span has a parent in the trace");
    assert_eq!(
        (settlement_in.service.as_str(), settlement_in.kind),
        ("settlement-proxy", SERVER)
    );
    let delivery_call = trace
        .iter()
        .find(|s| s.span_id == settlement_in.parent_span_id)
        .expect("the sidecar's span has a parent in the trace");
    assert_eq!(
        (delivery_call.service.as_str(), delivery_call.kind),
        ("usage-proxy", CLIENT)
    );
    let delivery = trace
        .iter()
        .find(|s| s.span_id == delivery_call.parent_span_id)
        .expect("the delivery call has a parent in the trace");
    assert_eq!(
        (delivery.service.as_str(), delivery.kind),
        ("usage", PRODUCER)
    );
    assert_eq!(delivery.attr("messaging.system"), Some("trellis"));
    assert!(
        is_child(delivery, usage_rpc),
        "the delivery continues the call that wrote the event: {}",
        describe(&trace)
    );

    // The edge's access-log line leads to the trace.
    assert!(
        mesh.edge_proxy
            .process
            .wait_for_output(&format!("trace_id={trace_id}"), Duration::from_secs(5))
            .is_some(),
        "the edge's access log names the trace"
    );

    // The RPC conventions on every call span.
    for span in trace
        .iter()
        .filter(|s| s.kind == SERVER || s.kind == CLIENT)
    {
        assert_eq!(span.attr("rpc.system"), Some("grpc"), "{span:#?}");
        assert!(
            span.attr("rpc.service").is_some_and(|s| !s.is_empty()),
            "{span:#?}"
        );
        assert!(
            span.attr("rpc.method").is_some_and(|m| !m.is_empty()),
            "{span:#?}"
        );
        assert_eq!(span.attr("rpc.grpc.status_code"), Some("0"), "{span:#?}");
    }

    // A malformed traceparent is never passed on: the edge starts a new
    // trace, and usage's spans join that one.
    let mut request = tonic::Request::new(record("malformed"));
    request
        .metadata_mut()
        .insert("traceparent", "00-not-a-trace-01".parse().unwrap());
    usage_client.record_usage(request).await.unwrap();
    let fresh = eventually(
        "a new trace for the malformed call",
        Duration::from_secs(20),
        || {
            let spans = receiver.spans();
            let trace_id = trace_id.clone();
            async move {
                let edge = spans
                    .iter()
                    .find(|s| {
                        s.service == "edge"
                            && s.name == RECORD
                            && s.parent_span_id.is_empty()
                            && s.trace_id != trace_id
                    })
                    .ok_or("no root edge span yet")?;
                spans
                    .iter()
                    .any(|s| s.service == "usage" && s.trace_id == edge.trace_id)
                    .then(|| edge.clone())
                    .ok_or_else(|| "usage's span is not in the new trace".to_owned())
            }
        },
    )
    .await;
    assert_eq!(fresh.trace_id.len(), 32);

    // The collector goes away: every call still succeeds, and the spans
    // that cannot be sent are counted as dropped.
    receiver.stop();
    for i in 0..40 {
        usage_client
            .record_usage(record(&format!("collector-down-{i}")))
            .await
            .unwrap_or_else(|e| panic!("call {i} with the collector down: {e}"));
    }
    eventually(
        "the edge counting spans it could not send",
        Duration::from_secs(30),
        || {
            let dropped = mesh
                .edge_proxy
                .metric("trellis_proxy_spans_dropped_total", &[]);
            async move {
                dropped
                    .filter(|n| *n > 0.0)
                    .ok_or_else(|| format!("dropped: {dropped:?}"))
            }
        },
    )
    .await;
}
