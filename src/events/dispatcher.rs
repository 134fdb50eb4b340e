//! Delivers a producer's outbox through its sidecar.
//!
//! One instance of a producer dispatches at a time: it holds a PostgreSQL
//! advisory lock on a connection of its own, and the others wait for it;
//! when the holder dies its session ends, the lock is freed and another
//! instance takes over within a second. The holder is woken by publishes
//! in its own process and by the `trellis_outbox` notification (sent by a
//! replay), and polls every [`POLL`] for events other instances wrote (a
//! notification per publish would serialize every commit on PostgreSQL's
//! notification lock).
//!
//! A line is one subscriber's events of one key. The holder reads lines
//! whose head is due (not backing off) and not already in flight, at most
//! [`RUN`] events each, and gives each line a task of its own that
//! delivers it in sequence: an acknowledged event is deleted;
//! INVALID_ARGUMENT parks it (a redelivery would not help) and the line
//! goes on; any other failure stops the line until its backoff ends.
//! Other lines go on meanwhile, at most [`CONCURRENCY`] at once.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tracing::Instrument;

use crate::db::{self, Pool};
use crate::pb::trellis::events::v1::{DeliverRequest, DeliverResponse, Event};

/// Most events of one (subscriber, key) line read at a time.
const RUN: i64 = 64;
/// Lines delivered at once.
const CONCURRENCY: usize = 64;
/// Longest wait between reads of the outbox when nothing wakes the
/// dispatcher (events written by another instance are found this way).
const POLL: Duration = Duration::from_millis(50);
/// Shortest time between two reads of the outbox: finished lines are
/// refilled together rather than one query each.
const FETCH_GAP: Duration = Duration::from_millis(20);
/// Most lines one read walks.
const WALK: i64 = 2048;
/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff after a failed delivery: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Subscribers whose delivery statistics are kept (names come from
/// configuration; more than this is a configuration mistake).
const MAX_TRACKED: usize = 64;

/// What one instance's dispatcher has done since it started.
#[derive(Debug, Default)]
pub struct DispatchStats {
    dispatching: AtomicBool,
    per_subscriber: Mutex<HashMap<String, SubscriberStats>>,
    /// Failed delivery attempts per subscriber (see `events::metrics`).
    pub(super) failed: Mutex<HashMap<String, u64>>,
}

#[derive(Debug)]
struct SubscriberStats {
    delivered: i64,
    /// Commit-to-acknowledgement time in microseconds.
    lag: Histogram<u64>,
}

impl DispatchStats {
    /// Whether this instance holds the dispatch lock now.
    pub fn dispatching(&self) -> bool {
        self.dispatching.load(Ordering::Relaxed)
    }

    fn record(&self, subscriber: &str, lag: Duration) {
        let mut map = self.per_subscriber.lock().expect("stats lock");
        if !map.contains_key(subscriber) {
            if map.len() >= MAX_TRACKED {
                tracing::warn!(
                    subscriber,
                    "more than {MAX_TRACKED} subscribers; delivery statistics not kept for this one"
                );
                return;
            }
            map.insert(
                subscriber.to_owned(),
                SubscriberStats {
                    delivered: 0,
                    lag: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
                },
            );
        }
        let stats = map.get_mut(subscriber).expect("inserted above");
        stats.delivered += 1;
        let micros = (lag.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = stats.lag.record(micros);
    }

    /// Per subscriber: (delivered, lag p50, lag p99).
    pub fn snapshot(&self) -> HashMap<String, (i64, Duration, Duration)> {
        let map = self.per_subscriber.lock().expect("stats lock");
        map.iter()
            .map(|(name, s)| {
                let q = |p: f64| Duration::from_micros(s.lag.value_at_quantile(p));
                (name.clone(), (s.delivered, q(0.5), q(0.99)))
            })
            .collect()
    }
}

/// What the dispatcher needs.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// The producer's mesh service name.
    pub source: &'static str,
    /// The producer's database.
    pub pool: Pool,
    /// Connection settings for the lock connection.
    pub config: Config,
    /// The producer's sidecar (outbound, h2c).
    pub channel: crate::rpc_trace::MeshChannel,
    /// Woken by publishes in this process and by notifications.
    pub wake: Arc<Notify>,
    /// Statistics for the status RPC.
    pub stats: Arc<DispatchStats>,
}

impl Dispatcher {
    /// Dispatches whenever this instance holds the lock, until `stop`
    /// turns true; a round in progress is finished first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let lock_name = format!("trellis.outbox.{}", self.source);
        while !*stop.borrow() {
            let (client, connection) = match self.config.connect(NoTls).await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "dispatcher cannot reach the database; retrying");
                    if wait_or_stop(&mut stop, Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            };
            let wake = self.wake.clone();
            let driver = tokio::spawn(async move {
                let mut connection = connection;
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            // Wait for the lock, on this session, until it is ours.
            let mut leading = false;
            while !*stop.borrow() && !client.is_closed() {
                match client
                    .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_name])
                    .await
                {
                    Ok(row) if row.get::<_, bool>(0) => {
                        leading = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
                if wait_or_stop(&mut stop, Duration::from_secs(1)).await {
                    break;
                }
            }
            if leading && client.batch_execute("LISTEN trellis_outbox").await.is_ok() {
                tracing::info!(source = self.source, "dispatching events");
                self.stats.dispatching.store(true, Ordering::Relaxed);
                Arc::new(self.clone()).lead(&client, &mut stop).await;
                self.stats.dispatching.store(false, Ordering::Relaxed);
                tracing::info!(source = self.source, "stopped dispatching events");
            }
            drop(client);
            driver.abort();
            if !*stop.borrow() && wait_or_stop(&mut stop, Duration::from_millis(500)).await {
                break;
            }
        }
    }

    /// Delivers while this instance leads: lines whose head is due are
    /// fetched whenever there is room for more in flight, and each is
    /// delivered by a task of its own, so a slow line never holds up a
    /// fast one. Returns once told to stop (or the lock connection is
    /// gone), after the lines in flight have finished.
    async fn lead(
        self: Arc<Self>,
        lock: &tokio_postgres::Client,
        stop: &mut watch::Receiver<bool>,
    ) {
        let mut in_flight: HashSet<(String, String)> = HashSet::new();
        let mut tasks: JoinSet<(String, String)> = JoinSet::new();
        let mut last_fetch = tokio::time::Instant::now() - FETCH_GAP;
        let mut cursor = None;
        let (acks, acked) = mpsc::channel(CONCURRENCY);
        let deleter = tokio::spawn(delete_acknowledged(self.pool.clone(), acked));
        while !*stop.borrow() && !lock.is_closed() {
            let room = CONCURRENCY.saturating_sub(tasks.len());
            let mut fetched = 0;
            if room > 0 {
                tokio::time::sleep_until(last_fetch + FETCH_GAP).await;
                last_fetch = tokio::time::Instant::now();
                match self.fetch(room, &in_flight, &mut cursor).await {
                    Ok(lines) => {
                        fetched = lines.len();
                        for line in lines {
                            let id = (line[0].subscriber.clone(), line[0].event.key.clone());
                            in_flight.insert(id.clone());
                            let (me, acks) = (self.clone(), acks.clone());
                            tasks.spawn(async move {
                                me.deliver_line(line, acks).await;
                                id
                            });
                        }
                    }
                    Err(e) if e.is_unavailable() => {
                        tracing::debug!(error = %e, "reading the outbox failed")
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the outbox failed"),
                }
            }
            // More may be waiting right away if the fetch was full.
            if fetched > 0 && fetched == room {
                continue;
            }
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(id) = done {
                        in_flight.remove(&id);
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => {}
            }
            // Collect every other line that finished meanwhile.
            while let Some(done) = tasks.try_join_next() {
                if let Ok(id) = done {
                    in_flight.remove(&id);
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        drop(acks);
        let _ = deleter.await;
    }

    /// Up to `room` lines whose head is due and that are not in flight,
    /// each with up to [`RUN`] events in sequence. Lines are walked in
    /// (subscriber, key) order from `cursor`, at most [`WALK`] per read, so
    /// a read costs index probes per line rather than a scan of the
    /// backlog; the cursor moves on when the walk stops short, so lines
    /// past the first [`WALK`] (many keys backing off, say) get their turn.
    async fn fetch(
        &self,
        room: usize,
        in_flight: &HashSet<(String, String)>,
        cursor: &mut Option<(String, String)>,
    ) -> Result<Vec<Vec<Pending>>, db::DbError> {
        let (busy_subscribers, busy_keys): (Vec<&str>, Vec<&str>) = in_flight
            .iter()
            .map(|(s, k)| (s.as_str(), k.as_str()))
            .unzip();
        let (from_subscriber, from_key) = cursor.clone().unwrap_or_default();
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "WITH RECURSIVE lines AS (
                    (SELECT subscriber, key, 1::int8 AS n FROM trellis_outbox
                     WHERE parked_at IS NULL AND (subscriber, key) > ($5, $6)
                     ORDER BY subscriber, key LIMIT 1)
                    UNION ALL
                    SELECT nx.subscriber, nx.key, l.n + 1 FROM lines l CROSS JOIN LATERAL (
                        SELECT o.subscriber, o.key FROM trellis_outbox o
                        WHERE o.parked_at IS NULL AND (o.subscriber, o.key) > (l.subscriber, l.key)
                        ORDER BY o.subscriber, o.key LIMIT 1) nx
                    WHERE l.n < $7::int8),
                 heads AS (
                    SELECT l.subscriber, l.key, h.id, h.next_attempt_at FROM lines l
                    CROSS JOIN LATERAL (
                        SELECT o.id, o.next_attempt_at FROM trellis_outbox o
                        WHERE o.subscriber = l.subscriber AND o.key = l.key AND o.parked_at IS NULL
                        ORDER BY o.sequence LIMIT 1) h),
                 due AS (
                    SELECT subscriber, key, id FROM heads
                    WHERE next_attempt_at <= now()
                      AND (subscriber, key) NOT IN
                          (SELECT * FROM unnest($3::text[], $4::text[]) AS b(subscriber, key))
                    ORDER BY id LIMIT $2)
                 SELECT r.id, r.subscriber, r.event_id, r.topic, r.key, r.sequence, r.payload_type,
                        r.payload, r.occurred_at, r.attempts, w.walked, w.last, r.trace_context
                 FROM (SELECT count(*) AS walked, max(ARRAY[subscriber, key]) AS last FROM lines) w
                 LEFT JOIN (
                    SELECT o.* FROM due d CROSS JOIN LATERAL (
                        SELECT * FROM trellis_outbox o
                        WHERE o.subscriber = d.subscriber AND o.key = d.key AND o.parked_at IS NULL
                        ORDER BY o.sequence LIMIT $1) o) r ON true
                 ORDER BY r.subscriber, r.key, r.sequence",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &RUN,
                    &(room as i64),
                    &busy_subscribers,
                    &busy_keys,
                    &from_subscriber,
                    &from_key,
                    &WALK,
                ],
            )
            .await?;
        // A full walk stopped short: the next read goes on from its end.
        // Otherwise (or with nothing due) the next read starts over.
        // (There is always one row, carrying the walk, even with nothing
        // due; its event columns are then empty.)
        *cursor = rows.first().and_then(|row| {
            let walked: i64 = row.get(10);
            let last: Option<Vec<String>> = row.get(11);
            match last {
                Some(last) if walked >= WALK && last.len() == 2 => {
                    Some((last[0].clone(), last[1].clone()))
                }
                _ => None,
            }
        });
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|row| row.get::<_, Option<i64>>(0).is_some())
            .collect();
        drop(client);
        let mut lines: Vec<Vec<Pending>> = Vec::new();
        for row in rows {
            let pending = Pending {
                row_id: row.get(0),
                subscriber: row.get(1),
                attempts: row.get(9),
                occurred_at: row.get(8),
                trace_context: row.get(12),
                event: super::event_of(&row, self.source),
            };
            match lines.last_mut() {
                Some(line)
                    if line[0].subscriber == pending.subscriber
                        && line[0].event.key == pending.event.key =>
                {
                    line.push(pending)
                }
                _ => lines.push(vec![pending]),
            }
        }
        Ok(lines)
    }

    /// Delivers one line in sequence; true if it moved.
    async fn deliver_line(&self, line: Vec<Pending>, acks: mpsc::Sender<Ack>) -> bool {
        let mut done: Vec<i64> = Vec::new();
        let mut moved = false;
        for pending in &line {
            match self.deliver(pending).await {
                Ok(_) => {
                    let lag = time::OffsetDateTime::now_utc() - pending.occurred_at;
                    self.stats.record(
                        &pending.subscriber,
                        lag.try_into().unwrap_or(Duration::ZERO),
                    );
                    done.push(pending.row_id);
                }
                Err(status) if status.code() == Code::InvalidArgument => {
                    tracing::warn!(
                        subscriber = %pending.subscriber,
                        event.id = %pending.event.id,
                        event.topic = %pending.event.topic,
                        message = status.message(),
                        "subscriber refused the event as invalid; parked"
                    );
                    let error = describe(&status);
                    if self.park(pending, &error).await.is_err() {
                        break;
                    }
                    moved = true;
                }
                Err(status) => {
                    self.stats.record_failure(&pending.subscriber);
                    let error = describe(&status);
                    tracing::debug!(subscriber = %pending.subscriber, event.id = %pending.event.id, error, "delivery failed; backing off");
                    let _ = self.back_off(pending, &error).await;
                    break;
                }
            }
        }
        if !done.is_empty() {
            moved = true;
            // The line stays in flight until its rows are gone, so the
            // next read cannot hand them out again.
            let (tx, rx) = oneshot::channel();
            if acks.send((done, tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
        moved
    }

    /// One attempt to deliver `pending`, in a span of its own continuing
    /// the trace of the call that wrote the event: the request that
    /// caused a change and the change's delivery are one story.
    async fn deliver(&self, pending: &Pending) -> Result<DeliverResponse, tonic::Status> {
        let span = delivery_span(pending);
        let result = self.send(pending).instrument(span.clone()).await;
        if let Err(status) = &result {
            span.record("rpc.grpc.status_code", status.code() as i32);
            span.record("otel.status_code", "ERROR");
        } else {
            span.record("rpc.grpc.status_code", 0);
        }
        result
    }

    async fn send(&self, pending: &Pending) -> Result<DeliverResponse, tonic::Status> {
        let path = PathAndQuery::from_str(&format!("/{}/Deliver", pending.subscriber))
            .map_err(|e| tonic::Status::internal(format!("subscriber name: {e}")))?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("sidecar: {e}")))?;
        let mut request = tonic::Request::new(DeliverRequest {
            event: Some(pending.event.clone()),
        });
        request.set_timeout(DELIVERY_TIMEOUT);
        grpc.unary(request, path, tonic_prost::ProstCodec::default())
            .await
            .map(tonic::Response::into_inner)
    }

    async fn park(&self, pending: &Pending, error: &str) -> Result<(), db::DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE trellis_outbox SET parked_at = now(), attempts = attempts + 1, last_error = $2
                 WHERE id = $1",
                &[&pending.row_id, &error],
            )
            .await?;
        Ok(())
    }

    async fn back_off(&self, pending: &Pending, error: &str) -> Result<(), db::DbError> {
        let delay = backoff(pending.attempts);
        let client = self.pool.get().await?;
        // The whole line waits: its head is what reads look at, and the
        // status shows the line's last error.
        client
            .execute(
                "UPDATE trellis_outbox
                 SET attempts = attempts + (id = $1)::int,
                     last_error = CASE WHEN id = $1 THEN $2 ELSE last_error END,
                     next_attempt_at = now() + make_interval(secs => $3)
                 WHERE subscriber = $4 AND key = $5 AND parked_at IS NULL",
                &[
                    &pending.row_id,
                    &error,
                    &delay.as_secs_f64(),
                    &pending.subscriber,
                    &pending.event.key,
                ],
            )
            .await?;
        Ok(())
    }
}

/// Rows delivered, and who waits for them to be deleted.
type Ack = (Vec<i64>, oneshot::Sender<()>);

/// Deletes delivered rows, those of every line that finished meanwhile in
/// one statement. Without waiting for the disk: a delete lost in a crash
/// only means a redelivery, which subscribers' inboxes make harmless, and
/// a flush per line was a large share of the database's work.
async fn delete_acknowledged(pool: Pool, mut acked: mpsc::Receiver<Ack>) {
    while let Some(first) = acked.recv().await {
        let mut batch = vec![first];
        while batch.len() < CONCURRENCY {
            match acked.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let ids: Vec<i64> = batch
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        let deleted = async {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.batch_execute("SET LOCAL synchronous_commit TO off")
                .await?;
            let statement = tx
                .prepare_cached("DELETE FROM trellis_outbox WHERE id = ANY($1)")
                .await?;
            tx.execute(&statement, &[&ids]).await?;
            tx.commit().await?;
            Ok::<(), db::DbError>(())
        }
        .await;
        if let Err(e) = deleted {
            tracing::debug!(error = %e, rows = ids.len(), "deleting delivered events failed; they will be delivered again");
        }
        for (_, done) in batch {
            let _ = done.send(());
        }
    }
}

/// One outbox row.
#[derive(Debug)]
struct Pending {
    row_id: i64,
    subscriber: String,
    attempts: i32,
    occurred_at: time::OffsetDateTime,
    event: Event,
    /// The `traceparent` of the call that wrote the event.
    trace_context: Option<String>,
}

/// The span of one delivery attempt (a producer span, in the messaging
/// conventions), child of the span that wrote the event when there was
/// one.
fn delivery_span(pending: &Pending) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        target: crate::telemetry::RPC_TARGET,
        "deliver",
        otel.name = %format_args!("deliver {}", pending.event.topic),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "trellis",
        messaging.operation.type = "send",
        messaging.destination.name = %pending.event.topic,
        messaging.message.id = %pending.event.id,
        trellis.subscriber = %pending.subscriber,
        trellis.delivery.attempt = pending.attempts + 1,
        rpc.system = "grpc",
        rpc.service = %pending.subscriber,
        rpc.method = "Deliver",
        rpc.grpc.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(traceparent) = &pending.trace_context {
        let _ = span.set_parent(crate::rpc_trace::context_from_traceparent(traceparent));
        if let Some(parent) = crate::trace_context::TraceParent::parse(traceparent.as_bytes()) {
            span.record("trace_id", tracing::field::display(parent.trace_id_hex()));
        }
    }
    span
}

/// `CODE: message`, bounded, for the outbox row and the status RPC.
fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if text.len() > 500 {
        let mut cut = 500;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The wait after `attempts` failures: exponential, capped, with jitter
/// (half to all of it) so retries of many keys do not march in step.
fn backoff(attempts: i32) -> Duration {
    let exp = attempts.clamp(0, 16) as u32;
    let full = BACKOFF_MIN
        .saturating_mul(2u32.saturating_pow(exp))
        .min(BACKOFF_MAX);
    full.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Sleeps `d`; true if `stop` turned true meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) <= BACKOFF_MIN && backoff(0) >= BACKOFF_MIN / 2);
        assert!(backoff(3) <= BACKOFF_MIN * 8 && backoff(3) >= BACKOFF_MIN * 4);
        assert!(backoff(1000) <= BACKOFF_MAX && backoff(1000) >= BACKOFF_MAX / 2);
        assert!(backoff(-5) <= BACKOFF_MIN);
    }

    #[test]
    fn stats_keep_lag_quantiles_and_a_bounded_set() {
        let stats = DispatchStats::default();
        for ms in 1..=100 {
            stats.record("a.v1.A", Duration::from_millis(ms));
        }
        let snap = stats.snapshot();
        let (n, p50, p99) = snap["a.v1.A"];
        assert_eq!(n, 100);
        assert!(p50 >= Duration::from_millis(45) && p50 <= Duration::from_millis(55));
        assert!(p99 >= Duration::from_millis(95));
        for i in 0..(MAX_TRACKED + 10) {
            stats.record(&format!("s{i}.v1.S"), Duration::from_millis(1));
        }
        assert_eq!(stats.snapshot().len(), MAX_TRACKED);
    }

    #[test]
    fn descriptions_are_bounded() {
        let long = tonic::Status::unavailable("é".repeat(1000));
        assert!(describe(&long).len() <= 500);
        assert!(describe(&long).starts_with("Unavailable: "));
    }
}
