//! The operator API of a producer's outbox (`EventOutboxService`'s
//! methods, served by each producer under its own gRPC service name).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Status;

use super::DispatchStats;
use crate::db::{self, Pool};
use crate::pb::trellis::events::v1::{
    GetOutboxStatusRequest, GetOutboxStatusResponse, ListParkedEventsRequest,
    ListParkedEventsResponse, ParkedEvent, ReplayParkedEventsRequest, ReplayParkedEventsResponse,
    SubscriberStatus,
};
use crate::status::FieldViolations;

const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;
const MAX_REPLAY_IDS: usize = 1000;

/// Reports on and repairs one producer's outbox.
#[derive(Clone, Debug)]
pub struct OutboxAdmin {
    pub(crate) source: &'static str,
    pub(crate) pool: Pool,
    pub(crate) stats: Arc<DispatchStats>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) outbox: super::Outbox,
}

impl OutboxAdmin {
    /// Pending and parked events per subscriber, and this instance's
    /// delivery statistics.
    pub async fn get_outbox_status(
        &self,
        _request: GetOutboxStatusRequest,
    ) -> Result<GetOutboxStatusResponse, Status> {
        let client = self.pool.get().await.map_err(db::status)?;
        let rows = client
            .query(
                "SELECT subscriber,
                        count(*) FILTER (WHERE parked_at IS NULL),
                        count(*) FILTER (WHERE parked_at IS NOT NULL),
                        EXTRACT(EPOCH FROM (now() - min(occurred_at) FILTER (WHERE parked_at IS NULL)))::float8,
                        (array_agg(last_error ORDER BY sequence, id) FILTER (WHERE parked_at IS NULL))[1]
                 FROM trellis_outbox GROUP BY subscriber",
                &[],
            )
            .await
            .map_err(db::status)?;
        let mut by_name: BTreeMap<String, SubscriberStatus> = BTreeMap::new();
        for row in rows {
            let name: String = row.get(0);
            let age: Option<f64> = row.get(3);
            by_name.insert(
                name.clone(),
                SubscriberStatus {
                    subscriber: name,
                    pending: row.get(1),
                    parked: row.get(2),
                    oldest_pending_age: age.map(|s| duration(Duration::from_secs_f64(s.max(0.0)))),
                    last_error: row.get::<_, Option<String>>(4).unwrap_or_default(),
                    ..Default::default()
                },
            );
        }
        // Configured subscribers with nothing waiting are listed too.
        for name in self.outbox.all_subscribers() {
            by_name
                .entry(name.clone())
                .or_insert_with(|| SubscriberStatus {
                    subscriber: name,
                    ..Default::default()
                });
        }
        for (name, (delivered, p50, p99)) in self.stats.snapshot() {
            let entry = by_name
                .entry(name.clone())
                .or_insert_with(|| SubscriberStatus {
                    subscriber: name,
                    ..Default::default()
                });
            entry.delivered = delivered;
            entry.delivery_lag_p50 = Some(duration(p50));
            entry.delivery_lag_p99 = Some(duration(p99));
        }
        Ok(GetOutboxStatusResponse {
            source: self.source.to_owned(),
            subscribers: by_name.into_values().collect(),
            dispatching: self.stats.dispatching(),
        })
    }

    /// One page of parked events, oldest first.
    pub async fn list_parked_events(
        &self,
        request: ListParkedEventsRequest,
    ) -> Result<ListParkedEventsResponse, Status> {
        let mut violations = FieldViolations::new();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n < 0 || i64::from(n) > MAX_PAGE => {
                violations.add(
                    "page_size",
                    format!("must be 0 (for {DEFAULT_PAGE}) to {MAX_PAGE}"),
                );
                0
            }
            n => i64::from(n),
        };
        let after: i64 = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().unwrap_or_else(|_| {
                violations.add("page_token", "not a token from a previous page");
                0
            })
        };
        violations.check()?;
        let client = self.pool.get().await.map_err(db::status)?;
        let rows = client
            .query(
                "SELECT id, subscriber, event_id, topic, key, sequence, payload_type, payload,
                        occurred_at, attempts, last_error, parked_at
                 FROM trellis_outbox
                 WHERE parked_at IS NOT NULL AND id > $1 AND ($2 = '' OR subscriber = $2)
                 ORDER BY id LIMIT $3",
                &[&after, &request.subscriber, &(page_size + 1)],
            )
            .await
            .map_err(db::status)?;
        let more = rows.len() as i64 > page_size;
        let mut events = Vec::new();
        let mut last = 0i64;
        for row in rows.into_iter().take(page_size as usize) {
            last = row.get(0);
            events.push(ParkedEvent {
                event: Some(super::event_of(&row, self.source)),
                subscriber: row.get(1),
                attempts: row.get(9),
                last_error: row.get::<_, Option<String>>(10).unwrap_or_default(),
                parked_at: row
                    .get::<_, Option<time::OffsetDateTime>>(11)
                    .map(super::to_timestamp),
            });
        }
        Ok(ListParkedEventsResponse {
            events,
            next_page_token: if more {
                last.to_string()
            } else {
                String::new()
            },
        })
    }

    /// Puts parked events of a subscriber back in line.
    pub async fn replay_parked_events(
        &self,
        request: ReplayParkedEventsRequest,
    ) -> Result<ReplayParkedEventsResponse, Status> {
        let mut violations = FieldViolations::new();
        if request.subscriber.is_empty() {
            violations.add("subscriber", "required");
        }
        if request.event_ids.len() > MAX_REPLAY_IDS {
            violations.add("event_ids", format!("at most {MAX_REPLAY_IDS} at once"));
        }
        let mut ids = Vec::with_capacity(request.event_ids.len());
        for (i, id) in request.event_ids.iter().enumerate() {
            match uuid::Uuid::parse_str(id) {
                Ok(id) => ids.push(id),
                Err(_) => violations.add(format!("event_ids[{i}]"), "must be a UUID"),
            }
        }
        violations.check()?;
        let client = self.pool.get().await.map_err(db::status)?;
        let replayed = client
            .execute(
                "UPDATE trellis_outbox
                 SET parked_at = NULL, attempts = 0, next_attempt_at = now(), last_error = NULL
                 WHERE parked_at IS NOT NULL AND subscriber = $1
                   AND (cardinality($2::uuid[]) = 0 OR event_id = ANY($2))",
                &[&request.subscriber, &ids],
            )
            .await
            .map_err(db::status)?;
        if replayed > 0 {
            tracing::info!(subscriber = %request.subscriber, replayed, "parked events replayed");
            // Tell whichever instance dispatches.
            let _ = client
                .execute("SELECT pg_notify('trellis_outbox', '')", &[])
                .await;
            self.wake.notify_one();
        }
        Ok(ReplayParkedEventsResponse {
            replayed: replayed as i64,
        })
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Defines `$name`, holding an [`OutboxAdmin`], and implements a producer's
/// generated `*OutboxService` trait for it (the methods of
/// `trellis.events.v1.EventOutboxService` under the producer's own name)
/// by handing each call to the admin:
///
/// ```ignore
/// trellis::outbox_service!(
///     /// `UsageOutboxService`: the outbox operator API under usage's name.
///     pub struct OutboxApi: usage_outbox_service_server::UsageOutboxService
/// );
/// ```
#[macro_export]
macro_rules! outbox_service {
    ($(#[$meta:meta])* $vis:vis struct $name:ident: $trait:path) => {
        $(#[$meta])*
        #[derive(Clone, Debug)]
        $vis struct $name(pub $crate::events::OutboxAdmin);

        #[tonic::async_trait]
        impl $trait for $name {
            async fn get_outbox_status(
                &self,
                request: tonic::Request<$crate::pb::trellis::events::v1::GetOutboxStatusRequest>,
            ) -> Result<tonic::Response<$crate::pb::trellis::events::v1::GetOutboxStatusResponse>, tonic::Status> {
                self.0.get_outbox_status(request.into_inner()).await.map(tonic::Response::new)
            }

            async fn list_parked_events(
                &self,
                request: tonic::Request<$crate::pb::trellis::events::v1::ListParkedEventsRequest>,
            ) -> Result<tonic::Response<$crate::pb::trellis::events::v1::ListParkedEventsResponse>, tonic::Status> {
                self.0.list_parked_events(request.into_inner()).await.map(tonic::Response::new)
            }

            async fn replay_parked_events(
                &self,
                request: tonic::Request<$crate::pb::trellis::events::v1::ReplayParkedEventsRequest>,
            ) -> Result<tonic::Response<$crate::pb::trellis::events::v1::ReplayParkedEventsResponse>, tonic::Status> {
                self.0.replay_parked_events(request.into_inner()).await.map(tonic::Response::new)
            }
        }
    };
}
