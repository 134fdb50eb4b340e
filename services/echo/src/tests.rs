//! The handlers called directly, without sockets, on paused time.

use std::time::Duration;

use pb::echo_service_server::EchoService;
use tokio::time::Instant;

use super::*;

fn inject(delay_ms: u64, fail_code: i32, fail_ratio: f64) -> Request<pb::InjectRequest> {
    Request::new(pb::InjectRequest {
        delay: Some(Duration::from_millis(delay_ms).try_into().unwrap()),
        fail_code,
        fail_ratio,
    })
}

fn sleep_for(ms: u64) -> Request<pb::SleepRequest> {
    Request::new(pb::SleepRequest {
        duration: Some(Duration::from_millis(ms).try_into().unwrap()),
    })
}

async fn stats(server: &EchoServer) -> pb::GetStatsResponse {
    server
        .get_stats(Request::new(pb::GetStatsRequest {}))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(start_paused = true)]
async fn inject_replaces_the_faults_and_an_empty_request_clears_them() {
    let server = EchoServer::new("a");
    let reply = server.inject(inject(100, 0, 0.0)).await.unwrap();
    assert_eq!(reply.into_inner().instance, "a");
    assert_eq!(server.faults().delay(), Duration::from_millis(100));

    // Replaced whole: the delay does not survive a request without one.
    server.inject(inject(0, 14, 1.0)).await.unwrap();
    assert_eq!(server.faults().delay(), Duration::ZERO);
    assert_eq!(server.faults().failure(), Some((Code::Unavailable, 1.0)));

    server
        .inject(Request::new(pb::InjectRequest::default()))
        .await
        .unwrap();
    assert!(server.faults().is_none());
    server
        .echo(Request::new(pb::EchoRequest::default()))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_bad_inject_is_refused_and_leaves_the_faults_in_force() {
    let server = EchoServer::new("a");
    server.inject(inject(50, 0, 0.0)).await.unwrap();
    let status = server.inject(inject(0, 42, 1.5)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("fail_code") && status.message().contains("fail_ratio"),
        "{status:?}"
    );
    let too_long = inject(2 * 60 * 60 * 1000, 0, 0.0);
    let status = server.inject(too_long).await.unwrap_err();
    assert!(
        status.message().contains("delay: must be at most 1h"),
        "{status:?}"
    );
    assert_eq!(server.faults().delay(), Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn faults_apply_to_every_method_but_get_stats_and_inject() {
    let server = EchoServer::new("a");
    server.inject(inject(1000, 14, 1.0)).await.unwrap();
    let second = Duration::from_secs(1);

    let started = Instant::now();
    let status = server
        .echo(Request::new(pb::EchoRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(started.elapsed(), second);

    let started = Instant::now();
    let status = server.sleep(sleep_for(0)).await.unwrap_err();
    assert_eq!(
        (status.code(), started.elapsed()),
        (Code::Unavailable, second)
    );

    // Fail fails with the injected code, not the one it was asked for.
    let fail = Request::new(pb::FailRequest {
        code: 5,
        ..Default::default()
    });
    assert_eq!(
        server.fail(fail).await.unwrap_err().code(),
        Code::Unavailable
    );

    // A streaming method fails before its first response.
    let started = Instant::now();
    let count = Request::new(pb::CountRequest {
        count: 3,
        ..Default::default()
    });
    let status = server.count(count).await.err().expect("Count fails");
    assert_eq!(
        (status.code(), started.elapsed()),
        (Code::Unavailable, second)
    );

    // A failed Record still reached the instance, and is counted.
    let record = Request::new(pb::RecordRequest::default());
    server.record(record).await.unwrap_err();

    // GetStats and Inject answer at once.
    let started = Instant::now();
    let stats = stats(&server).await;
    server.inject(inject(0, 0, 0.0)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(stats.records, 1);
    // Echo, Sleep, Fail, Count, Record and the first Inject.
    assert_eq!(stats.calls, 6, "{stats:?}");
    assert_eq!(stats.calls_by_method.get("Inject"), Some(&1));
    // The injected failures did not cancel the Sleep.
    assert_eq!(stats.cancelled, 0);
    // Calls made one at a time; Inject and GetStats are not in flight.
    assert_eq!(stats.peak_in_flight, 1);
}

#[tokio::test(start_paused = true)]
async fn peak_in_flight_counts_calls_until_they_end_or_are_cancelled() {
    let server = EchoServer::new("a");
    let sleeps: Vec<_> = [1000, 2000, 3000]
        .map(|ms| {
            let server = server.clone();
            tokio::spawn(async move { server.sleep(sleep_for(ms)).await })
        })
        .into_iter()
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(server.stats.in_flight.load(Ordering::Relaxed), 3);

    // A cancelled call leaves at once (tonic drops its future).
    sleeps[2].abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(server.stats.in_flight.load(Ordering::Relaxed), 2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(server.stats.in_flight.load(Ordering::Relaxed), 0);

    // Fewer calls later do not lower the peak.
    server.sleep(sleep_for(10)).await.unwrap();
    let stats = stats(&server).await;
    assert_eq!(stats.peak_in_flight, 3);
    assert_eq!(stats.cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn a_sleep_cancelled_during_the_injected_delay_is_counted_as_cancelled() {
    let server = EchoServer::new("a");
    server.inject(inject(1000, 0, 0.0)).await.unwrap();
    let abandoned = tokio::time::timeout(Duration::from_millis(500), server.sleep(sleep_for(0)));
    assert!(abandoned.await.is_err());
    let stats = stats(&server).await;
    assert_eq!(stats.cancelled, 1);
    assert_eq!(server.stats.in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_response_stream_is_in_flight_until_it_ends() {
    let server = EchoServer::new("a");
    let count = Request::new(pb::CountRequest {
        count: 2,
        payload_size: 0,
        interval: Some(Duration::from_millis(100).try_into().unwrap()),
    });
    let mut stream = server.count(count).await.unwrap().into_inner();
    assert_eq!(server.stats.in_flight.load(Ordering::Relaxed), 1);
    assert_eq!(stream.next().await.unwrap().unwrap().index, 0);
    assert_eq!(stream.next().await.unwrap().unwrap().index, 1);
    assert!(stream.next().await.is_none());
    drop(stream);
    assert_eq!(server.stats.in_flight.load(Ordering::Relaxed), 0);
}
