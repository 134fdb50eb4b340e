//! The proxy records the share of new traces its sampler asks for, and
//! passes on a sampled flag only for spans it exports: one decision per
//! call, never a second one in the SDK (which would record the square of
//! the ratio). Real processes: an echo service, a sidecar routing to it,
//! a real OTLP/gRPC receiver.

use std::time::Duration;

use tonic::transport::Channel;
use trellis::pb::trellis::echo::v1 as echo;
use trellis_test_support::{
    OtlpReceiver, ProxyOptions, TestPki, set_child_env, sibling_binary, spawn_echo, spawn_proxy,
};

use echo::echo_service_client::EchoServiceClient;

const PROXY: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const ECHO: &str = "trellis.echo.v1.EchoService";
const CALLS: usize = 400;

#[tokio::test(flavor = "multi_thread")]
async fn a_ratio_sampler_records_that_share_of_new_traces() {
    let receiver = OtlpReceiver::start();
    set_child_env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint());
    set_child_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    set_child_env("OTEL_TRACES_SAMPLER", "traceidratio");
    set_child_env("OTEL_TRACES_SAMPLER_ARG", "0.5");
    let pki = TestPki::new("trellis.local");
    let app = spawn_echo(&sibling_binary(PROXY, "trellis-echo"), "echo", &[]);
    let identity = pki.issue("client", "client");
    let route = format!("{ECHO}=http://{}", app.addr);
    let proxy = spawn_proxy(
        std::path::Path::new(PROXY),
        "client",
        ProxyOptions::new(&identity, None, None).args(&["--static-route", &route]),
    );
    let channel = Channel::from_shared(format!("http://{}", proxy.outbound))
        .unwrap()
        .connect_lazy();
    let mut client = EchoServiceClient::new(channel);
    for i in 0..CALLS {
        client
            .echo(echo::EchoRequest {
                message: format!("call {i}"),
                payload: Vec::new(),
            })
            .await
            .unwrap();
    }

    // Everything recorded has arrived once the proxy's count stops
    // moving and matches what the receiver holds.
    let mut recorded = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let exported = proxy
            .metric("trellis_proxy_spans_exported_total", &[])
            .unwrap_or(0.0) as usize;
        recorded = receiver
            .spans()
            .iter()
            .filter(|s| s.service == "client")
            .count();
        if exported > 0 && exported == recorded {
            break;
        }
    }
    // Half of 400, give or take six standard deviations (10 each).
    assert!(
        (140..=260).contains(&recorded),
        "{recorded} of {CALLS} calls recorded at a ratio of 0.5"
    );
    assert_eq!(
        proxy.metric("trellis_proxy_spans_dropped_total", &[]),
        Some(0.0),
        "nothing dropped with the collector up"
    );
}
