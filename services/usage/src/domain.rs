//! The usage domain: what a valid request is, checked field by field at the
//! gRPC boundary, and the conversions between protobuf and database values.

use prost_types::Timestamp;
use time::{Duration, OffsetDateTime};
use tonic::Status;
use trellis::pb::telco::usage::v1 as pb;
use trellis::status::FieldViolations;
use uuid::Uuid;

/// How far in the future `occurred_at` may be: the network's clocks and
/// ours disagree a little.
pub const MAX_FUTURE: Duration = Duration::minutes(5);
/// How far in the past `occurred_at` may be: late records are accepted for
/// a bit more than a year of bills, no further back.
pub const MAX_AGE: Duration = Duration::days(400);
/// The longest period GetUsageSummary totals.
pub const MAX_SUMMARY_SPAN: Duration = Duration::days(400);
/// The longest idempotency key, in characters.
pub const MAX_KEY_CHARS: usize = 200;

/// A usage type other than UNSPECIFIED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageKind {
    /// Mobile data, in megabytes.
    Data,
    /// Voice calls, in seconds.
    Voice,
    /// Text messages, counted.
    Sms,
}

impl UsageKind {
    /// Every kind, in the order summaries list them.
    pub const ALL: [UsageKind; 3] = [UsageKind::Data, UsageKind::Voice, UsageKind::Sms];

    /// The kind of a `telco.usage.v1.UsageType` number; `None` for
    /// UNSPECIFIED and numbers the contract does not define.
    pub fn from_proto(number: i32) -> Option<Self> {
        match pb::UsageType::try_from(number).ok()? {
            pb::UsageType::Unspecified => None,
            pb::UsageType::Data => Some(Self::Data),
            pb::UsageType::Voice => Some(Self::Voice),
            pb::UsageType::Sms => Some(Self::Sms),
        }
    }

    /// The protobuf enum value.
    pub fn to_proto(self) -> pb::UsageType {
        match self {
            Self::Data => pb::UsageType::Data,
            Self::Voice => pb::UsageType::Voice,
            Self::Sms => pb::UsageType::Sms,
        }
    }

    /// The value of the `usage_type` column: the contract's enum number, so
    /// that other readers of the table (the archive) need no mapping.
    pub fn to_db(self) -> i16 {
        match self {
            Self::Data => 1,
            Self::Voice => 2,
            Self::Sms => 3,
        }
    }

    /// The kind stored as `usage_type`, if it is one.
    pub fn from_db(value: i16) -> Option<Self> {
        Self::from_proto(i32::from(value))
    }

    /// The largest quantity one record may carry: a day of calls, a
    /// terabyte of data, a thousand messages. More is a broken feed, not
    /// usage.
    pub fn max_quantity(self) -> i64 {
        match self {
            Self::Data => 1_000_000,
            Self::Voice => 86_400,
            Self::Sms => 1_000,
        }
    }

    /// The unit of a quantity of this kind, for messages.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Data => "MB",
            Self::Voice => "seconds",
            Self::Sms => "messages",
        }
    }
}

/// A RecordUsage request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUsage {
    /// The user's ID in canonical UUID form (lowercase, hyphenated).
    pub user_id: String,
    /// What was consumed.
    pub kind: UsageKind,
    /// How much, in the kind's unit; 1..=`kind.max_quantity()`.
    pub quantity: i64,
    /// When, truncated to microseconds (what PostgreSQL stores), so that a
    /// retry compares equal to the stored record.
    pub occurred_at: OffsetDateTime,
    /// The client's idempotency key.
    pub idempotency_key: String,
}

impl NewUsage {
    /// Whether `record` (stored under the same user and key) was recorded
    /// with these parameters, i.e. this request is a retry of it.
    pub fn same_as(&self, record: &StoredUsage) -> bool {
        self.kind == record.kind
            && self.quantity == record.quantity
            && self.occurred_at == record.occurred_at
    }
}

/// A usage record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUsage {
    /// The record's ID.
    pub id: Uuid,
    /// The user's ID.
    pub user_id: String,
    /// What was consumed.
    pub kind: UsageKind,
    /// How much.
    pub quantity: i64,
    /// When it happened.
    pub occurred_at: OffsetDateTime,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// When it was recorded.
    pub recorded_at: OffsetDateTime,
}

impl From<&StoredUsage> for pb::UsageRecord {
    fn from(r: &StoredUsage) -> Self {
        pb::UsageRecord {
            id: r.id.to_string(),
            user_id: r.user_id.clone(),
            r#type: r.kind.to_proto().into(),
            quantity: r.quantity,
            occurred_at: Some(to_timestamp(r.occurred_at)),
            idempotency_key: r.idempotency_key.clone(),
            recorded_at: Some(to_timestamp(r.recorded_at)),
        }
    }
}

/// Validates a RecordUsage request against the clock reading `now`,
/// naming every bad field at once.
pub fn validate_record(
    request: &pb::RecordUsageRequest,
    now: OffsetDateTime,
) -> Result<NewUsage, Status> {
    let mut violations = FieldViolations::new();
    let user_id = user_id(&request.user_id, &mut violations);

    let kind = UsageKind::from_proto(request.r#type);
    if kind.is_none() {
        let what = if request.r#type == 0 {
            "is required (USAGE_TYPE_DATA, USAGE_TYPE_VOICE or USAGE_TYPE_SMS)".to_owned()
        } else {
            format!(
                "{} is not a usage type (USAGE_TYPE_DATA, USAGE_TYPE_VOICE or USAGE_TYPE_SMS)",
                request.r#type
            )
        };
        violations.add("type", what);
    }

    if request.quantity <= 0 {
        violations.add(
            "quantity",
            format!("must be positive, got {}", request.quantity),
        );
    } else if let Some(kind) = kind
        && request.quantity > kind.max_quantity()
    {
        violations.add(
            "quantity",
            format!(
                "at most {} {} per record for {}, got {}",
                kind.max_quantity(),
                kind.unit(),
                kind.to_proto().as_str_name(),
                request.quantity
            ),
        );
    }

    let occurred_at = match &request.occurred_at {
        None => {
            violations.add("occurred_at", "is required");
            None
        }
        Some(ts) => match from_timestamp(ts) {
            Err(why) => {
                violations.add("occurred_at", why);
                None
            }
            Ok(t) if t > now + MAX_FUTURE => {
                violations.add(
                    "occurred_at",
                    format!("{} is more than 5 minutes in the future", rfc3339(t)),
                );
                None
            }
            Ok(t) if t < now - MAX_AGE => {
                violations.add(
                    "occurred_at",
                    format!("{} is more than 400 days in the past", rfc3339(t)),
                );
                None
            }
            Ok(t) => Some(truncate_to_micros(t)),
        },
    };

    let key = &request.idempotency_key;
    let chars = key.chars().count();
    if chars == 0 {
        violations.add("idempotency_key", "is required");
    } else if chars > MAX_KEY_CHARS {
        violations.add(
            "idempotency_key",
            format!("at most {MAX_KEY_CHARS} characters, got {chars}"),
        );
    } else if key.chars().any(char::is_control) {
        violations.add(
            "idempotency_key",
            "must be printable (no control characters)",
        );
    }

    violations.check()?;
    // Every `None` above recorded a violation, so `check` returned early.
    match (user_id, kind, occurred_at) {
        (Some(user_id), Some(kind), Some(occurred_at)) => Ok(NewUsage {
            user_id,
            kind,
            quantity: request.quantity,
            occurred_at,
            idempotency_key: key.clone(),
        }),
        _ => Err(Status::internal("validation fell through")),
    }
}

/// A validated ListUsage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// The user's ID in canonical form.
    pub user_id: String,
    /// Inclusive lower bound of `occurred_at`, if any.
    pub start: Option<OffsetDateTime>,
    /// Exclusive upper bound of `occurred_at`, if any.
    pub end: Option<OffsetDateTime>,
    /// At most this many records; 1..=max_page_size.
    pub limit: i64,
}

/// Validates a ListUsage request; `max_page_size` is the service setting
/// (what `limit` 0 means, and the most it may be).
pub fn validate_list(
    request: &pb::ListUsageRequest,
    max_page_size: u64,
) -> Result<ListQuery, Status> {
    let mut violations = FieldViolations::new();
    let user_id = user_id(&request.user_id, &mut violations);
    let start = optional_time("start_time", request.start_time.as_ref(), &mut violations);
    let end = optional_time("end_time", request.end_time.as_ref(), &mut violations);
    if let (Some(start), Some(end)) = (start, end)
        && end < start
    {
        violations.add("end_time", "must not be before start_time");
    }
    // A setting of 0 would make every page empty; treat it as 1.
    let max = i64::try_from(max_page_size).unwrap_or(i64::MAX).max(1);
    let limit = match i64::from(request.limit) {
        0 => max,
        n if n < 0 => {
            violations.add("limit", format!("must not be negative, got {n}"));
            0
        }
        n if n > max => {
            violations.add("limit", format!("at most {max}, got {n}"));
            0
        }
        n => n,
    };
    violations.check()?;
    Ok(ListQuery {
        user_id: user_id.unwrap_or_default(),
        start,
        end,
        limit,
    })
}

/// A validated GetUsageSummary request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryQuery {
    /// The user's ID in canonical form.
    pub user_id: String,
    /// Start of the period, inclusive.
    pub start: OffsetDateTime,
    /// End of the period, exclusive; after `start`, at most 400 days later.
    pub end: OffsetDateTime,
}

/// Validates a GetUsageSummary request.
pub fn validate_summary(request: &pb::GetUsageSummaryRequest) -> Result<SummaryQuery, Status> {
    let mut violations = FieldViolations::new();
    let user_id = user_id(&request.user_id, &mut violations);
    let start = required_time("start_time", request.start_time.as_ref(), &mut violations);
    let end = required_time("end_time", request.end_time.as_ref(), &mut violations);
    if let (Some(start), Some(end)) = (start, end) {
        if end <= start {
            violations.add("end_time", "must be after start_time");
        } else if end - start > MAX_SUMMARY_SPAN {
            violations.add("end_time", "must be at most 400 days after start_time");
        }
    }
    violations.check()?;
    match (user_id, start, end) {
        (Some(user_id), Some(start), Some(end)) => Ok(SummaryQuery {
            user_id,
            start,
            end,
        }),
        _ => Err(Status::internal("validation fell through")),
    }
}

/// Checks a user ID and returns its canonical form (lowercase, hyphenated):
/// the user service assigns UUIDs, and one spelling per user keeps the
/// idempotency keys and listings of a user together.
fn user_id(text: &str, violations: &mut FieldViolations) -> Option<String> {
    if text.is_empty() {
        violations.add("user_id", "is required");
        return None;
    }
    match Uuid::try_parse(text) {
        Ok(id) => Some(id.hyphenated().to_string()),
        Err(_) => {
            violations.add("user_id", "must be a user ID (a UUID)");
            None
        }
    }
}

fn optional_time(
    field: &str,
    ts: Option<&Timestamp>,
    violations: &mut FieldViolations,
) -> Option<OffsetDateTime> {
    match from_timestamp(ts?) {
        Ok(t) => Some(t),
        Err(why) => {
            violations.add(field, why);
            None
        }
    }
}

fn required_time(
    field: &str,
    ts: Option<&Timestamp>,
    violations: &mut FieldViolations,
) -> Option<OffsetDateTime> {
    if ts.is_none() {
        violations.add(field, "is required");
        return None;
    }
    optional_time(field, ts, violations)
}

/// A protobuf timestamp as a time, or why it is not one.
pub fn from_timestamp(ts: &Timestamp) -> Result<OffsetDateTime, String> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(format!("nanos {} out of range 0..999999999", ts.nanos));
    }
    OffsetDateTime::from_unix_timestamp(ts.seconds)
        .map(|t| t + Duration::nanoseconds(i64::from(ts.nanos)))
        .map_err(|_| format!("seconds {} out of range", ts.seconds))
}

/// A time as a protobuf timestamp.
pub fn to_timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// Drops the nanoseconds PostgreSQL cannot store. Truncating here, rather
/// than letting the database round, means what we compare is what we store.
pub fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

#[cfg(test)]
mod tests;

/// A time as people read it in an error message.
fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
