//! Events between services: a transactional outbox on the producer side,
//! a dispatcher that delivers it through the mesh, and an inbox on the
//! subscriber side (`trellis.events.v1`).
//!
//! - A producer writes the event in the transaction of the change it
//!   announces ([`Outbox::publish`]): one row per subscriber named in its
//!   settings (`subscribers = { "<topic>" = ["<gRPC service>", ...] }`).
//!   Events of one key get increasing sequence numbers in commit order.
//! - The dispatcher ([`dispatcher`]) of one instance at a time (a
//!   PostgreSQL advisory lock) delivers pending rows through the
//!   producer's sidecar, in sequence per (subscriber, key), keys in
//!   parallel, with backoff; one failing key never holds up another. A
//!   subscriber's INVALID_ARGUMENT parks the event (it would never
//!   succeed); operators list and replay parked events ([`OutboxAdmin`]).
//! - A subscriber records each applied event ID in the transaction of its
//!   effect ([`record_applied`]), so a redelivery changes nothing.

mod admin;
pub mod dispatcher;
pub mod metrics;

use std::sync::Arc;

use deadpool_postgres::Transaction;
use tokio::sync::Notify;
use tonic::Status;

pub use admin::OutboxAdmin;
pub use dispatcher::DispatchStats;

use crate::db::{self, DbError};
use crate::pb::trellis::events::v1::{DeliverRequest, Event};
use crate::service::Settings;

/// Embedded migrations of the event tables.
pub(crate) mod embedded {
    refinery::embed_migrations!("src/events/migrations");
}

/// The migrations creating the outbox and inbox tables, kept in their own
/// history table so they never collide with a service's own.
pub fn migrations() -> refinery::Runner {
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name("trellis_events_schema_history");
    runner
}

/// The settings key naming each topic's subscribers.
pub const SUBSCRIBERS_SETTING: &str = "subscribers";

/// Most subscribers one topic may name: each is a row per event.
const MAX_SUBSCRIBERS: usize = 16;

/// The producer side: writes events into the outbox.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: &'static str,
    settings: Settings,
    wake: Arc<Notify>,
}

impl Outbox {
    /// An outbox for events of `source` (the mesh service name), fanned out
    /// to the subscribers `settings` name.
    pub fn new(source: &'static str, settings: Settings, wake: Arc<Notify>) -> Self {
        Self {
            source,
            settings,
            wake,
        }
    }

    /// The subscribers of `topic` in the settings in force (gRPC service
    /// names), or why they cannot be known.
    pub fn subscribers(&self, topic: &str) -> Result<Vec<String>, Status> {
        subscribers_of(self.settings.get(SUBSCRIBERS_SETTING).as_ref(), topic)
    }

    /// Every subscriber the settings in force name, for any topic.
    pub fn all_subscribers(&self) -> Vec<String> {
        let setting = self.settings.get(SUBSCRIBERS_SETTING);
        let mut names: Vec<String> = setting
            .as_ref()
            .and_then(|s| s.as_object())
            .map(|table| {
                table
                    .keys()
                    .filter_map(|topic| subscribers_of(setting.as_ref(), topic).ok())
                    .flatten()
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    }

    /// Writes `payload` as an event of `topic` and `key` in `tx`, for every
    /// subscriber of the topic. It is delivered once `tx` commits, and not
    /// at all if it rolls back.
    pub async fn publish<M: prost::Name>(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
        key: &str,
        payload: &M,
    ) -> Result<Event, Status> {
        let subscribers = self.subscribers(topic)?;
        let id = uuid::Uuid::new_v4();
        let occurred_at = now_micros();
        let type_url = M::type_url();
        let bytes = payload.encode_to_vec();
        let sequence: i64 = if subscribers.is_empty() {
            // Nobody listens: nothing to order, nothing to store.
            0
        } else {
            // Prepared once per connection: this runs with every change.
            let statement = tx
                .prepare_cached(
                    "WITH seq AS (
                        INSERT INTO trellis_outbox_keys (key, last_sequence) VALUES ($1, 1)
                        ON CONFLICT (key) DO UPDATE SET last_sequence = trellis_outbox_keys.last_sequence + 1
                        RETURNING last_sequence),
                     ins AS (
                        INSERT INTO trellis_outbox
                            (subscriber, event_id, topic, key, sequence, payload_type, payload, occurred_at,
                             trace_context)
                        SELECT s, $2, $3, $1, seq.last_sequence, $4, $5, $6, $8
                        FROM seq, unnest($7::text[]) AS s
                        RETURNING 1)
                     SELECT last_sequence, (SELECT count(*) FROM ins) FROM seq",
                )
                .await
                .map_err(db::status)?;
            let row = tx
                .query_one(
                    &statement,
                    &[
                        &key,
                        &id,
                        &topic,
                        &type_url,
                        &bytes,
                        &occurred_at,
                        &subscribers,
                        &crate::rpc_trace::current_traceparent(),
                    ],
                )
                .await
                .map_err(db::status)?;
            row.get(0)
        };
        // A dispatcher in this process need not wait for its next poll.
        // (Woken before the commit, it may find nothing yet: the poll
        // catches that.)
        self.wake.notify_one();
        Ok(Event {
            id: id.to_string(),
            topic: topic.to_owned(),
            key: key.to_owned(),
            occurred_at: Some(to_timestamp(occurred_at)),
            payload: Some(prost_types::Any {
                type_url,
                value: bytes,
            }),
            source: self.source.to_owned(),
            sequence: sequence as u64,
        })
    }
}

/// Reads the `subscribers` setting for `topic`. A malformed setting is an
/// error (writes fail closed rather than lose their events).
fn subscribers_of(setting: Option<&serde_json::Value>, topic: &str) -> Result<Vec<String>, Status> {
    let Some(setting) = setting else {
        return Ok(Vec::new());
    };
    let bad = |why: &str| {
        tracing::error!(setting = %setting, why, "settings.subscribers is malformed");
        Status::unavailable(format!(
            "the service's `subscribers` setting is malformed ({why}); events cannot be routed"
        ))
    };
    let table = setting
        .as_object()
        .ok_or_else(|| bad("expected a table of topic = [gRPC services]"))?;
    let Some(list) = table.get(topic) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| bad("each topic takes a list of gRPC service names"))?;
    if list.len() > MAX_SUBSCRIBERS {
        return Err(bad("more than 16 subscribers for one topic"));
    }
    let mut names = Vec::with_capacity(list.len());
    for v in list {
        let name = v
            .as_str()
            .filter(|s| is_grpc_service_name(s))
            .ok_or_else(|| bad("a subscriber is not a gRPC service name such as pkg.v1.Service"))?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn is_grpc_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.contains('.')
        && s.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Checks a delivered event has what every event must: an ID (a UUID), a
/// topic, a key, a source and a payload. INVALID_ARGUMENT otherwise (a
/// redelivery would not help).
pub fn accept(request: &DeliverRequest) -> Result<&Event, Status> {
    let mut violations = crate::status::FieldViolations::new();
    let Some(event) = request.event.as_ref() else {
        violations.add("event", "required");
        return Err(violations.check().expect_err("one violation"));
    };
    if uuid::Uuid::parse_str(&event.id).is_err() {
        violations.add("event.id", "must be a UUID");
    }
    for (field, value) in [
        ("event.topic", &event.topic),
        ("event.key", &event.key),
        ("event.source", &event.source),
    ] {
        if value.is_empty() {
            violations.add(field, "required");
        } else if value.len() > 200 {
            violations.add(field, "at most 200 characters");
        }
    }
    if event.payload.is_none() {
        violations.add("event.payload", "required");
    }
    violations.check()?;
    Ok(event)
}

/// Decodes the event's payload as `M`: INVALID_ARGUMENT if it is another
/// type or does not decode.
pub fn decode<M: prost::Name + Default>(event: &Event) -> Result<M, Status> {
    let payload = event
        .payload
        .as_ref()
        .ok_or_else(|| crate::status::invalid_field("event.payload", "required"))?;
    if payload.type_url != M::type_url() {
        return Err(crate::status::invalid_field(
            "event.payload",
            &format!(
                "topic {:?} carries {}, not {:?}",
                event.topic,
                M::full_name(),
                payload.type_url
            ),
        ));
    }
    M::decode(payload.value.as_slice()).map_err(|e| {
        crate::status::invalid_field(
            "event.payload",
            &format!("does not decode as {}: {e}", M::full_name()),
        )
    })
}

/// Records `event` as applied, in `tx`. `Ok(true)`: the first time; apply
/// its effect in the same transaction and commit. `Ok(false)`: it was
/// applied before; change nothing and answer `duplicate = true`.
pub async fn record_applied(tx: &Transaction<'_>, event: &Event) -> Result<bool, DbError> {
    let id = uuid::Uuid::parse_str(&event.id).unwrap_or_default();
    let statement = tx
        .prepare_cached(
            "INSERT INTO trellis_inbox (event_id, source, key, sequence, topic)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &statement,
            &[
                &id,
                &event.source,
                &event.key,
                &(event.sequence as i64),
                &event.topic,
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// The event an outbox row holds, from a query whose columns start with
/// `id, subscriber, event_id, topic, key, sequence, payload_type, payload,
/// occurred_at` (the dispatcher's and the operator API's both do).
pub(crate) fn event_of(row: &tokio_postgres::Row, source: &str) -> Event {
    Event {
        id: row.get::<_, uuid::Uuid>(2).to_string(),
        topic: row.get(3),
        key: row.get(4),
        sequence: row.get::<_, i64>(5) as u64,
        payload: Some(prost_types::Any {
            type_url: row.get(6),
            value: row.get(7),
        }),
        occurred_at: Some(to_timestamp(row.get(8))),
        source: source.to_owned(),
    }
}

/// Now, at PostgreSQL's precision (microseconds), so what is stored and
/// what is sent are the same instant.
pub fn now_micros() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now)
}

/// A protobuf timestamp of `t`.
pub fn to_timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::{Message, Name};
    use serde_json::json;

    #[test]
    fn subscribers_are_read_from_settings() {
        let s = json!({"usage.recorded": ["a.v1.A", "b.v1.B", "a.v1.A"]});
        assert_eq!(
            subscribers_of(Some(&s), "usage.recorded").unwrap(),
            ["a.v1.A", "b.v1.B"]
        );
        assert!(subscribers_of(Some(&s), "other").unwrap().is_empty());
        assert!(subscribers_of(None, "usage.recorded").unwrap().is_empty());
        for bad in [
            json!(["x"]),
            json!({"t": "a.v1.A"}),
            json!({"t": ["no dots"]}),
            json!({"t": [1]}),
        ] {
            let e = subscribers_of(Some(&bad), "t").unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable, "{bad}");
        }
    }

    #[test]
    fn accept_names_every_missing_field() {
        let e = accept(&DeliverRequest { event: None }).unwrap_err();
        assert!(e.message().contains("event: required"));
        let e = accept(&DeliverRequest {
            event: Some(Event {
                id: "nope".into(),
                ..Default::default()
            }),
        })
        .unwrap_err();
        for field in [
            "event.id",
            "event.topic",
            "event.key",
            "event.source",
            "event.payload",
        ] {
            assert!(e.message().contains(field), "{}", e.message());
        }
    }

    #[test]
    fn decode_checks_the_type() {
        use crate::pb::trellis::events::v1::DeliverResponse;
        let mut event = Event {
            payload: Some(prost_types::Any {
                type_url: DeliverResponse::type_url(),
                value: DeliverResponse { duplicate: true }.encode_to_vec(),
            }),
            ..Default::default()
        };
        assert!(decode::<DeliverResponse>(&event).unwrap().duplicate);
        assert_eq!(
            decode::<DeliverRequest>(&event).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        event.payload.as_mut().unwrap().value = vec![0xff, 0xff];
        assert_eq!(
            decode::<DeliverResponse>(&event).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
