//! One archived usage record: the JSON line written to the journal and to
//! the compressed day files, and its conversion from a delivered event.

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime, UtcOffset};
use tonic::Status;
use trellis::pb::telco::usage::v1::{UsageRecordedEvent, UsageType};
use trellis::pb::trellis::events::v1::Event;
use trellis::status::FieldViolations;
use uuid::Uuid;

/// The topic whose events the archive keeps.
pub const TOPIC: &str = "usage.recorded";

/// What was consumed, written as the proto enum's value name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UsageKind {
    /// Mobile data (megabytes).
    #[serde(rename = "USAGE_TYPE_DATA")]
    Data,
    /// Voice calls (seconds).
    #[serde(rename = "USAGE_TYPE_VOICE")]
    Voice,
    /// Text messages (count).
    #[serde(rename = "USAGE_TYPE_SMS")]
    Sms,
}

impl UsageKind {
    /// The value of usage's `usage_records.usage_type` column.
    pub fn as_i16(self) -> i16 {
        match self {
            Self::Data => 1,
            Self::Voice => 2,
            Self::Sms => 3,
        }
    }

    /// The kind stored as `value` in `usage_records.usage_type`.
    pub fn from_i16(value: i16) -> Option<Self> {
        match value {
            1 => Some(Self::Data),
            2 => Some(Self::Voice),
            3 => Some(Self::Sms),
            _ => None,
        }
    }

    /// The proto enum's value name, as written in the archive.
    pub fn name(self) -> &'static str {
        match self {
            Self::Data => "USAGE_TYPE_DATA",
            Self::Voice => "USAGE_TYPE_VOICE",
            Self::Sms => "USAGE_TYPE_SMS",
        }
    }
}

/// One usage record as archived: the record's own fields, then the event
/// that carried it (`event_id`, `source`, `key`, `sequence`), which is what
/// deduplication works on. Timestamps are RFC 3339 in UTC with exactly six
/// fractional digits (the precision of PostgreSQL's TIMESTAMPTZ).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedRecord {
    /// The usage record's ID.
    pub id: Uuid,
    /// The user who consumed.
    pub user_id: String,
    /// What was consumed.
    #[serde(rename = "type")]
    pub usage_type: UsageKind,
    /// How much, in the type's unit.
    pub quantity: i64,
    /// When the usage happened; its UTC day picks the day file.
    #[serde(with = "micros")]
    pub occurred_at: OffsetDateTime,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// When usage recorded it.
    #[serde(with = "micros")]
    pub recorded_at: OffsetDateTime,
    /// ID of the event that delivered the record.
    pub event_id: String,
    /// Mesh service that published the event.
    pub source: String,
    /// The event's ordering key (the user ID).
    pub key: String,
    /// The event's position among the events of (`source`, `key`).
    pub sequence: u64,
}

impl ArchivedRecord {
    /// Validates a delivered `usage.recorded` event and its decoded payload
    /// and builds the record to archive. Every missing or malformed field is
    /// reported in one INVALID_ARGUMENT: such an event can never be archived.
    pub fn from_event(event: &Event, payload: &UsageRecordedEvent) -> Result<Self, Status> {
        let mut bad = FieldViolations::new();
        if event.sequence == 0 {
            // Deduplication rests on the sequence: without one a redelivery
            // could not be told from a new event.
            bad.add("event.sequence", "must be at least 1");
        }
        let Some(record) = payload.record.as_ref() else {
            bad.add("event.payload.record", "is required");
            return Err(bad.check().expect_err("a violation was recorded"));
        };
        let field = |name: &str| format!("event.payload.record.{name}");
        let id = match Uuid::parse_str(&record.id) {
            Ok(id) => Some(id),
            Err(_) => {
                bad.add(field("id"), "must be a UUID");
                None
            }
        };
        if record.user_id.is_empty() {
            bad.add(field("user_id"), "is required");
        }
        let usage_type = match UsageType::try_from(record.r#type) {
            Ok(UsageType::Data) => Some(UsageKind::Data),
            Ok(UsageType::Voice) => Some(UsageKind::Voice),
            Ok(UsageType::Sms) => Some(UsageKind::Sms),
            _ => {
                bad.add(field("type"), "must be DATA, VOICE or SMS");
                None
            }
        };
        if record.quantity <= 0 {
            bad.add(field("quantity"), "must be positive");
        }
        let occurred_at = timestamp(record.occurred_at.as_ref(), &field("occurred_at"), &mut bad);
        if record.idempotency_key.is_empty() {
            bad.add(field("idempotency_key"), "is required");
        }
        let recorded_at = timestamp(record.recorded_at.as_ref(), &field("recorded_at"), &mut bad);
        bad.check()?;
        match (id, usage_type, occurred_at, recorded_at) {
            (Some(id), Some(usage_type), Some(occurred_at), Some(recorded_at)) => Ok(Self {
                id,
                user_id: record.user_id.clone(),
                usage_type,
                quantity: record.quantity,
                occurred_at,
                idempotency_key: record.idempotency_key.clone(),
                recorded_at,
                event_id: event.id.clone(),
                source: event.source.clone(),
                key: event.key.clone(),
                sequence: event.sequence,
            }),
            // Every None above recorded a violation, so check() returned.
            _ => Err(Status::internal("record validation is inconsistent")),
        }
    }

    /// The UTC day of `occurred_at`: which day file the record belongs to.
    pub fn day(&self) -> Date {
        self.occurred_at.date()
    }

    /// The record as one JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        let mut line = serde_json::to_vec(self).expect("a record serializes");
        line.push(b'\n');
        line
    }

    /// Whether `other` holds the same usage record (the fields usage keeps;
    /// the event fields are not part of the record).
    pub fn same_record(&self, other: &Self) -> bool {
        self.id == other.id
            && self.user_id == other.user_id
            && self.usage_type == other.usage_type
            && self.quantity == other.quantity
            && self.occurred_at == other.occurred_at
            && self.idempotency_key == other.idempotency_key
            && self.recorded_at == other.recorded_at
    }
}

/// A proto timestamp as a UTC time truncated to microseconds, or a
/// violation naming `field`.
fn timestamp(
    value: Option<&prost_types::Timestamp>,
    field: &str,
    bad: &mut FieldViolations,
) -> Option<OffsetDateTime> {
    let Some(value) = value else {
        bad.add(field, "is required");
        return None;
    };
    if !(0..1_000_000_000).contains(&value.nanos) {
        bad.add(field, "nanos must be between 0 and 999999999");
        return None;
    }
    let nanos = i128::from(value.seconds) * 1_000_000_000 + i128::from(value.nanos);
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        // RFC 3339 has four-digit years.
        Ok(t) if (1..=9999).contains(&t.year()) => Some(truncate_micros(t)),
        _ => {
            bad.add(field, "must be between years 1 and 9999");
            None
        }
    }
}

/// `t` in UTC with its sub-microsecond part dropped, as PostgreSQL stores it.
pub fn truncate_micros(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    let micros = t.nanosecond() / 1000 * 1000;
    t.replace_nanosecond(micros)
        .expect("a truncated nanosecond is in range")
}

/// `t` as RFC 3339 in UTC with six fractional digits.
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{}T{:02}:{:02}:{:02}.{:06}Z",
        format_day(t.date()),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Parses an RFC 3339 timestamp (any offset), as UTC.
pub fn parse_timestamp(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.to_offset(UtcOffset::UTC))
}

/// `d` as `YYYY-MM-DD`.
pub fn format_day(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Serde for timestamps in the archive's format.
mod micros {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_timestamp(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_timestamp(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;
    use trellis::pb::telco::usage::v1::UsageRecord;

    fn event() -> (Event, UsageRecordedEvent) {
        let event = Event {
            id: "7f1c1c1e-0000-4000-8000-000000000001".into(),
            topic: TOPIC.into(),
            key: "u1".into(),
            source: "usage".into(),
            sequence: 3,
            ..Default::default()
        };
        let payload = UsageRecordedEvent {
            record: Some(UsageRecord {
                id: "3e9b8f0a-1111-4222-8333-444455556666".into(),
                user_id: "u1".into(),
                r#type: UsageType::Voice as i32,
                quantity: 60,
                occurred_at: Some(Timestamp {
                    seconds: 1_714_564_800,
                    nanos: 123_456_789,
                }),
                idempotency_key: "cdr-1".into(),
                recorded_at: Some(Timestamp {
                    seconds: 1_714_564_801,
                    nanos: 0,
                }),
            }),
        };
        (event, payload)
    }

    #[test]
    fn writes_the_documented_line() {
        let (event, payload) = event();
        let record = ArchivedRecord::from_event(&event, &payload).unwrap();
        let line = String::from_utf8(record.to_line()).unwrap();
        assert_eq!(
            line,
            concat!(
                r#"{"id":"3e9b8f0a-1111-4222-8333-444455556666","user_id":"u1","type":"USAGE_TYPE_VOICE","#,
                r#""quantity":60,"occurred_at":"2024-05-01T12:00:00.123456Z","idempotency_key":"cdr-1","#,
                r#""recorded_at":"2024-05-01T12:00:01.000000Z","event_id":"7f1c1c1e-0000-4000-8000-000000000001","#,
                r#""source":"usage","key":"u1","sequence":3}"#,
                "\n"
            )
        );
        let back: ArchivedRecord = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, record);
        assert_eq!(format_day(record.day()), "2024-05-01");
    }

    #[test]
    fn names_every_bad_field() {
        let (mut event, mut payload) = event();
        event.sequence = 0;
        let record = payload.record.as_mut().unwrap();
        record.id = "nope".into();
        record.user_id.clear();
        record.r#type = 0;
        record.quantity = -1;
        record.occurred_at = None;
        record.idempotency_key.clear();
        record.recorded_at = Some(Timestamp {
            seconds: 0,
            nanos: -1,
        });
        let status = ArchivedRecord::from_event(&event, &payload).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        for field in [
            "event.sequence",
            "record.id",
            "record.user_id",
            "record.type",
            "record.quantity",
            "record.occurred_at",
            "record.idempotency_key",
            "record.recorded_at",
        ] {
            assert!(status.message().contains(field), "{field}: {status:?}");
        }

        payload.record = None;
        let status = ArchivedRecord::from_event(&event, &payload).unwrap_err();
        assert!(
            status.message().contains("event.payload.record"),
            "{status:?}"
        );
    }
}
