//! Starts the `trellis-echo` binary and calls every method through the
//! generated client.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Request};
use trellis::pb::trellis::echo::v1 as pb;
use trellis_test_support::{ChildGuard, free_port, wait_for_tcp};

use pb::echo_service_client::EchoServiceClient;

/// A running `trellis-echo`, killed on drop.
struct Echo {
    process: ChildGuard,
    addr: SocketAddr,
}

impl Echo {
    fn start(name: &str, extra: &[&str]) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-echo"));
        cmd.args(["--listen", &addr.to_string(), "--name", name])
            .args(extra);
        let process = ChildGuard::spawn("trellis-echo", cmd).expect("trellis-echo starts");
        assert!(
            wait_for_tcp(addr, Duration::from_secs(20)),
            "trellis-echo never listened on {addr}: {}",
            process.output()
        );
        Self { process, addr }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn serves_every_method() {
    let echo = Echo::start("echo-a", &[]);
    let mut client = EchoServiceClient::new(echo.channel().await);

    // Echo: the message, the caller header and the ASCII headers.
    let mut request = Request::new(pb::EchoRequest {
        message: "hello".into(),
        payload: vec![1, 2, 3],
    });
    request
        .metadata_mut()
        .insert("x-trellis-caller", "spiffe://trellis/test".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-test", "value".parse().unwrap());
    request.metadata_mut().insert_bin(
        "x-skip-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\xff"),
    );
    let reply = client.echo(request).await.unwrap().into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.payload, [1, 2, 3]);
    assert_eq!(reply.instance, "echo-a");
    assert_eq!(reply.caller, "spiffe://trellis/test");
    assert_eq!(
        reply.headers.get("x-test").map(String::as_str),
        Some("value")
    );
    assert!(
        !reply.headers.contains_key("x-skip-bin"),
        "{:?}",
        reply.headers
    );

    // Count: three messages of the requested size, in order.
    let mut stream = client
        .count(pb::CountRequest {
            count: 3,
            payload_size: 10,
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 10_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        assert_eq!(message.payload.len(), 10);
        assert_eq!(message.instance, "echo-a");
        indexes.push(message.index);
    }
    assert_eq!(indexes, [0, 1, 2]);

    // Collect: totals of the client stream.
    let requests = (0..4).map(|i| pb::CollectRequest {
        payload: vec![0; i * 5],
    });
    let totals = client
        .collect(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((totals.messages, totals.bytes), (4, 30));
    assert_eq!(totals.instance, "echo-a");

    // Chat: each message echoed back.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for text in ["one", "two"] {
        tx.send(pb::ChatRequest {
            message: text.into(),
            payload: text.as_bytes().to_vec(),
        })
        .await
        .unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(reply.message, text);
        assert_eq!(reply.payload, text.as_bytes());
        assert_eq!(reply.instance, "echo-a");
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // Record: sequence numbers count up.
    for sequence in 1..=2 {
        let reply = client
            .record(pb::RecordRequest {
                message: "r".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.sequence, sequence);
    }

    // Fail: the requested code, message and pushback trailer.
    let status = client
        .fail(pb::FailRequest {
            code: 14,
            message: "try later".into(),
            retry_pushback_ms: "50".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "try later");
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .map(|v| v.to_str().unwrap()),
        Some("50")
    );
    let status = client
        .fail(pb::FailRequest {
            code: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Sleep: a call cut short is counted as cancelled, whether the server
    // enforces the deadline the client sent (tonic answers CANCELLED) or
    // the client gives up and resets the stream.
    let two_seconds = pb::SleepRequest {
        duration: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
    };
    let mut request = Request::new(two_seconds);
    request.set_timeout(Duration::from_millis(200));
    let status = client.sleep(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    let abandoned =
        tokio::time::timeout(Duration::from_millis(200), client.sleep(two_seconds)).await;
    assert!(abandoned.is_err(), "{abandoned:?}");
    let deadline = Instant::now() + Duration::from_secs(1);
    let stats = loop {
        let stats = client
            .get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if stats.cancelled == 2 || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stats.cancelled, 2, "{stats:?}");
    assert_eq!(stats.instance, "echo-a");
    assert_eq!(stats.records, 2);
    // Echo, Count, Collect, Chat, 2 Record, 2 Fail, 2 Sleep; GetStats is
    // not counted.
    assert_eq!(stats.calls, 10, "{stats:?}");
    assert_eq!(stats.calls_by_method.get("Record"), Some(&2));
    assert_eq!(stats.calls_by_method.get("Fail"), Some(&2));
    assert_eq!(stats.calls_by_method.get("Sleep"), Some(&2));
    assert!(!stats.calls_by_method.contains_key("GetStats"));
}

#[tokio::test]
async fn reflection_lists_only_echo_health_and_reflection() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let echo = Echo::start("echo-r", &[]);
    let mut reflection = ServerReflectionClient::new(echo.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("trellis.echo.v1.EchoService".into()),
    ]
    .map(|message_request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message_request),
    });
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "trellis.echo.v1.EchoService",
        ]
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected the file describing EchoService");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn health_turns_not_serving_when_asked() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let echo = Echo::start("echo-h", &["--not-serving-after", "500ms"]);
    let mut health = HealthClient::new(echo.channel().await);
    let mut check = async |service: &str| {
        health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    };
    assert_eq!(check("").await, ServingStatus::Serving);
    assert_eq!(
        check("trellis.echo.v1.EchoService").await,
        ServingStatus::Serving
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while check("trellis.echo.v1.EchoService").await != ServingStatus::NotServing {
        assert!(
            Instant::now() < deadline,
            "still SERVING: {}",
            echo.process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The server as a whole follows (sidecars watch "").
    while check("").await != ServingStatus::NotServing {
        assert!(Instant::now() < deadline, "server still SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Multi-threaded: the client connection must be able to close while the
// test blocks waiting for the server to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_on_sigterm() {
    let mut echo = Echo::start("echo-d", &["--grace", "2s"]);
    // A served call shows the server is past start-up, so its SIGTERM
    // handler is installed.
    let mut client = EchoServiceClient::new(echo.channel().await);
    client.get_stats(pb::GetStatsRequest {}).await.unwrap();
    drop(client);
    echo.process.terminate();
    let exit = echo
        .process
        .wait_exit(Duration::from_secs(10))
        .expect("trellis-echo exits after SIGTERM");
    let output = echo.process.output();
    assert!(exit.success(), "{exit:?}: {output}");
    assert!(output.contains("drained cleanly"), "{output}");
}

#[tokio::test]
async fn fault_flags_apply_from_start_until_inject_replaces_them() {
    let echo = Echo::start(
        "echo-f",
        &["--delay", "300ms", "--fail-code", "14", "--fail-ratio", "1"],
    );
    let mut client = EchoServiceClient::new(echo.channel().await);

    let started = Instant::now();
    let status = client.echo(pb::EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("echo-f"), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Streaming calls fail before their first response.
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::ChatRequest>(1);
    let status = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = client
        .collect(futures::stream::iter([pb::CollectRequest::default()]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // GetStats and Inject are spared; an empty Inject clears the faults.
    let started = Instant::now();
    client.get_stats(pb::GetStatsRequest {}).await.unwrap();
    let reply = client
        .inject(pb::InjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.instance, "echo-f");
    client.echo(pb::EchoRequest::default()).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    // Half the calls fail, at random.
    client
        .inject(pb::InjectRequest {
            delay: None,
            fail_code: 8,
            fail_ratio: 0.5,
        })
        .await
        .unwrap();
    let mut failed = 0;
    for _ in 0..200 {
        if let Err(status) = client.echo(pb::EchoRequest::default()).await {
            assert_eq!(status.code(), Code::ResourceExhausted);
            failed += 1;
        }
    }
    assert!((60..140).contains(&failed), "{failed} of 200 failed");

    let status = client
        .inject(pb::InjectRequest {
            delay: None,
            fail_code: 99,
            fail_ratio: 0.5,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("fail_code"), "{status:?}");
}

#[test]
fn bad_fault_flags_are_all_named_and_the_process_exits_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_trellis-echo"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--delay",
            "2h",
            "--fail-code",
            "17",
        ])
        .env("TRELLIS_ECHO_FAIL_RATIO", "1.5")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for flag in ["--delay", "--fail-code", "--fail-ratio"] {
        assert!(stderr.contains(flag), "{flag} not named: {stderr}");
    }
}
