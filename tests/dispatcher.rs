//! The outbox dispatcher against a real PostgreSQL database and a real
//! gRPC subscriber on 127.0.0.1: lines in order, backing-off lines never
//! crowding out due ones, and one dispatcher at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tonic::{Request, Response, Status};
use trellis::events::DispatchStats;
use trellis::events::dispatcher::Dispatcher;
use trellis::pb::telco::settlement::v1::settlement_events_service_server::{
    SettlementEventsService, SettlementEventsServiceServer,
};
use trellis::pb::trellis::events::v1::{DeliverRequest, DeliverResponse};
use trellis_test_support::{TestDb, free_port};

const SUBSCRIBER: &str = "telco.settlement.v1.SettlementEventsService";

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<String, Vec<u64>>>>);

#[tonic::async_trait]
impl SettlementEventsService for Recorder {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let event = trellis::events::accept(request.get_ref())?;
        self.0
            .lock()
            .unwrap()
            .entry(event.key.clone())
            .or_default()
            .push(event.sequence);
        Ok(Response::new(DeliverResponse { duplicate: false }))
    }
}

async fn serve(recorder: Recorder) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(tcp, _)| tcp), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SettlementEventsServiceServer::new(recorder))
            .serve_with_incoming(incoming),
    );
    addr
}

async fn database() -> (TestDb, trellis::db::Pool, tokio_postgres::Config) {
    let db = TestDb::new().await.unwrap();
    let config = trellis::db::parse_url(&db.url()).unwrap();
    trellis::db::migrate(&config, "test", vec![trellis::events::migrations()])
        .await
        .unwrap();
    let pool = trellis::db::pool(config.clone(), 4).unwrap();
    (db, pool, config)
}

fn dispatcher(
    pool: &trellis::db::Pool,
    config: &tokio_postgres::Config,
    to: SocketAddr,
) -> Dispatcher {
    Dispatcher {
        source: "test",
        pool: pool.clone(),
        config: config.clone(),
        channel: trellis::rpc_trace::mesh_channel(
            tonic::transport::Endpoint::from_shared(format!("http://{to}"))
                .unwrap()
                .connect_lazy(),
        ),
        wake: Arc::new(Notify::new()),
        stats: Arc::new(DispatchStats::default()),
    }
}

/// Inserts events for `key`, sequences `seqs`, due after `delay_secs`.
async fn insert(
    client: &tokio_postgres::Client,
    key: &str,
    seqs: std::ops::RangeInclusive<i64>,
    delay_secs: f64,
) {
    client
        .execute(
            "INSERT INTO trellis_outbox
                 (subscriber, event_id, topic, key, sequence, payload_type, payload, occurred_at, next_attempt_at)
             SELECT $1, gen_random_uuid(), 'test.topic', $2, s, 'type.googleapis.com/x.v1.X', '\\x'::bytea,
                    now(), now() + make_interval(secs => $5)
             FROM generate_series($3::int8, $4::int8) AS s",
            &[&SUBSCRIBER, &key, seqs.start(), seqs.end(), &delay_secs],
        )
        .await
        .unwrap();
}

async fn wait_for(
    recorder: &Recorder,
    what: &str,
    done: impl Fn(&HashMap<String, Vec<u64>>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if done(&recorder.0.lock().unwrap()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {:?}",
            recorder.0.lock().unwrap().keys().count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_due_line_is_delivered_in_order_however_many_lines_back_off() {
    let (_db, pool, config) = database().await;
    let client = pool.get().await.unwrap();
    // 200 lines of 32 events each, all backing off for an hour, sorted
    // before the one line that is due.
    for k in 0..200 {
        insert(&client, &format!("a-stuck-{k:03}"), 1..=32, 3600.0).await;
    }
    insert(&client, "z-due", 1..=50, 0.0).await;
    let recorder = Recorder::default();
    let addr = serve(recorder.clone()).await;
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(dispatcher(&pool, &config, addr).run(stop));
    wait_for(&recorder, "the due line is delivered", |seen| {
        seen.get("z-due").is_some_and(|v| v.len() == 50)
    })
    .await;
    let seen = recorder.0.lock().unwrap().clone();
    assert_eq!(seen["z-due"], (1..=50).collect::<Vec<u64>>(), "in sequence");
    assert_eq!(seen.len(), 1, "nothing backing off was sent");
    // Delivered rows are deleted once the answers are back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM trellis_outbox", &[])
            .await
            .unwrap()
            .get(0);
        if left == 200 * 32 {
            break;
        }
        assert!(
            Instant::now() < deadline && left > 200 * 32,
            "delivered events are gone, the rest wait: {left} rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the dispatcher stops when told")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_dispatcher_at_a_time_and_the_next_takes_over() {
    let (_db, pool, config) = database().await;
    let recorder = Recorder::default();
    let addr = serve(recorder.clone()).await;
    let first = dispatcher(&pool, &config, addr);
    let second = dispatcher(&pool, &config, addr);
    let (stats1, stats2) = (first.stats.clone(), second.stats.clone());
    let (stop1_tx, stop1) = watch::channel(false);
    let (_stop2_tx, stop2) = watch::channel(false);
    let t1 = tokio::spawn(first.run(stop1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats1.dispatching() {
        assert!(Instant::now() < deadline, "the first never dispatched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _t2 = tokio::spawn(second.run(stop2));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!stats2.dispatching(), "two dispatchers at once");
    let client = pool.get().await.unwrap();
    insert(&client, "k", 1..=10, 0.0).await;
    wait_for(&recorder, "delivered by the first", |s| {
        s.get("k").is_some_and(|v| v.len() == 10)
    })
    .await;
    // The first stops (its session, and with it the lock, go away).
    let _ = stop1_tx.send(true);
    t1.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats2.dispatching() {
        assert!(Instant::now() < deadline, "the second never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    insert(&client, "k", 11..=20, 0.0).await;
    wait_for(&recorder, "delivered by the second", |s| {
        s.get("k").is_some_and(|v| v.len() == 20)
    })
    .await;
    assert_eq!(
        recorder.0.lock().unwrap()["k"],
        (1..=20).collect::<Vec<u64>>()
    );
    // The dispatcher counts a delivery once the answer is back, a moment
    // after the subscriber has seen it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats2.snapshot().get(SUBSCRIBER).map(|s| s.0) != Some(10) {
        assert!(
            Instant::now() < deadline,
            "the second counts its 10 deliveries: {:?}",
            stats2.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_past_the_first_walk_get_their_turn() {
    let (_db, pool, config) = database().await;
    let client = pool.get().await.unwrap();
    // More lines backing off than one read walks, all sorted first.
    client
        .execute(
            "INSERT INTO trellis_outbox
                 (subscriber, event_id, topic, key, sequence, payload_type, payload, occurred_at, next_attempt_at)
             SELECT $1, gen_random_uuid(), 'test.topic', 'a-' || lpad(k::text, 5, '0'), 1,
                    'type.googleapis.com/x.v1.X', '\\x'::bytea, now(), now() + interval '1 hour'
             FROM generate_series(1, 5000) AS k",
            &[&SUBSCRIBER],
        )
        .await
        .unwrap();
    insert(&client, "z-due", 1..=3, 0.0).await;
    let recorder = Recorder::default();
    let addr = serve(recorder.clone()).await;
    let (_stop_tx, stop) = watch::channel(false);
    tokio::spawn(dispatcher(&pool, &config, addr).run(stop));
    wait_for(&recorder, "the line past the walk is delivered", |seen| {
        seen.get("z-due").is_some_and(|v| v.len() == 3)
    })
    .await;
}
