//! Request validation: every rule the contract states, checked before the
//! database is touched, with every bad field reported at once.

use prost_types::Timestamp;
use time::{Duration, OffsetDateTime};
use tonic::Status;
use trellis::pb::telco::user::v1 as pb;
use trellis::status::{FieldViolations, invalid_field};
use uuid::Uuid;

/// How far in the past `effective_at` may lie: room for clock skew and a
/// request in flight, not for rewriting history.
pub const MAX_EFFECTIVE_PAST: Duration = Duration::minutes(5);

/// How far ahead a plan change may be scheduled.
pub const MAX_EFFECTIVE_AHEAD: Duration = Duration::days(366);

/// Longest name accepted, in characters, after trimming.
pub const MAX_NAME_CHARS: usize = 200;

/// Longest email address accepted, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// A validated CreateUser request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// E.164 phone number.
    pub msisdn: String,
    /// Name, trimmed.
    pub name: String,
    /// Email address.
    pub email: String,
}

/// A validated Subscribe request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeCommand {
    /// The user to subscribe.
    pub user_id: Uuid,
    /// The plan to subscribe to (its existence is checked by the store).
    pub plan_id: String,
    /// When the plan takes effect, truncated to microseconds.
    pub effective_at: OffsetDateTime,
}

/// Validates a CreateUser request; INVALID_ARGUMENT listing every bad field.
pub fn new_user(request: pb::CreateUserRequest) -> Result<NewUser, Status> {
    let mut violations = FieldViolations::new();
    if let Err(why) = msisdn(&request.msisdn) {
        violations.add("msisdn", why);
    }
    let name = request.name.trim();
    if let Err(why) = check_name(name) {
        violations.add("name", why);
    }
    if let Err(why) = email(&request.email) {
        violations.add("email", why);
    }
    violations.check()?;
    Ok(NewUser {
        name: name.to_owned(),
        msisdn: request.msisdn,
        email: request.email,
    })
}

/// Validates a Subscribe request against the clock reading `now`.
pub fn subscribe(
    request: pb::SubscribeRequest,
    now: OffsetDateTime,
) -> Result<SubscribeCommand, Status> {
    let mut violations = FieldViolations::new();
    let user_id = uuid_field(&request.user_id).map_err(|why| violations.add("user_id", why));
    if request.plan_id.is_empty() {
        violations.add("plan_id", "is required");
    }
    let effective_at = match request.effective_at {
        None => Ok(now),
        Some(at) => effective_at(at, now),
    }
    .map_err(|why| violations.add("effective_at", why));
    match (violations.check(), user_id, effective_at) {
        (Ok(()), Ok(user_id), Ok(effective_at)) => Ok(SubscribeCommand {
            user_id,
            plan_id: request.plan_id,
            effective_at: truncate_to_micros(effective_at),
        }),
        (Err(status), ..) => Err(status),
        // Every Err above recorded a violation, so check() failed.
        (Ok(()), ..) => Err(Status::internal("subscribe validation is inconsistent")),
    }
}

/// Parses a user ID from field `field`; INVALID_ARGUMENT if it is not a UUID.
pub fn user_id(field: &str, value: &str) -> Result<Uuid, Status> {
    uuid_field(value).map_err(|why| invalid_field(field, why))
}

/// Checks a plan ID from field `field` is present.
pub fn plan_id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(invalid_field(field, "is required"));
    }
    Ok(value)
}

/// Drops the nanoseconds PostgreSQL's TIMESTAMPTZ cannot store, so that what
/// the service returns is exactly what it stored.
pub fn truncate_to_micros(at: OffsetDateTime) -> OffsetDateTime {
    let micros = at.microsecond();
    at.replace_microsecond(micros).unwrap_or(at)
}

fn uuid_field(value: &str) -> Result<Uuid, &'static str> {
    if value.is_empty() {
        return Err("is required");
    }
    Uuid::parse_str(value).map_err(|_| "must be a UUID")
}

/// E.164: '+', then 7 to 15 digits, the first (country code) not zero.
fn msisdn(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("is required");
    }
    let Some(digits) = value.strip_prefix('+') else {
        return Err("must be in E.164 format: '+' then 7 to 15 digits, e.g. +4915112345678");
    };
    let well_formed = (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if !well_formed {
        return Err("must be in E.164 format: '+' then 7 to 15 digits, e.g. +4915112345678");
    }
    Ok(())
}

fn check_name(trimmed: &str) -> Result<(), &'static str> {
    if trimmed.is_empty() {
        return Err("is required");
    }
    if trimmed.chars().count() > MAX_NAME_CHARS {
        return Err("must be at most 200 characters");
    }
    if trimmed.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

/// A deliberately modest check: one '@', a non-empty local part, a domain of
/// dot-separated non-empty labels, no whitespace or control characters.
/// Whether the mailbox exists is not ours to know.
fn email(value: &str) -> Result<(), &'static str> {
    const SHAPE: &str = "must be an email address such as ada@example.com";
    if value.is_empty() {
        return Err("is required");
    }
    if value.len() > MAX_EMAIL_LEN {
        return Err("must be at most 254 characters");
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    let mut parts = value.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SHAPE);
    };
    if local.is_empty() || !domain.contains('.') || domain.split('.').any(str::is_empty) {
        return Err(SHAPE);
    }
    Ok(())
}

fn effective_at(at: Timestamp, now: OffsetDateTime) -> Result<OffsetDateTime, &'static str> {
    if !(0..1_000_000_000).contains(&at.nanos) {
        return Err("is not a valid timestamp (nanos out of range)");
    }
    let at = OffsetDateTime::from_unix_timestamp(at.seconds)
        .ok()
        .and_then(|t| t.replace_nanosecond(at.nanos as u32).ok())
        .ok_or("is not a valid timestamp")?;
    if at < now - MAX_EFFECTIVE_PAST {
        return Err("must be at most 5 minutes in the past");
    }
    if at > now + MAX_EFFECTIVE_AHEAD {
        return Err("must be at most 366 days ahead");
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(msisdn: &str, name: &str, email: &str) -> Result<NewUser, Status> {
        new_user(pb::CreateUserRequest {
            msisdn: msisdn.into(),
            name: name.into(),
            email: email.into(),
        })
    }

    fn bad_fields(status: &Status) -> String {
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_owned()
    }

    #[test]
    fn accepts_a_good_user_and_trims_the_name() {
        let user = create("+4915112345678", "  Ada Lovelace ", "ada@example.com").unwrap();
        assert_eq!(user.name, "Ada Lovelace");
        assert_eq!(user.msisdn, "+4915112345678");
        create("+1234567", "A", "a@b.c").unwrap();
        create(
            "+123456789012345",
            &"x".repeat(200),
            "a.b+c@mail.example.org",
        )
        .unwrap();
    }

    #[test]
    fn rejects_bad_msisdns() {
        for bad in [
            "",
            "4915112345678",
            "+0491511234567",
            "+123456",
            "+1234567890123456",
            "+49 151 1234567",
            "+49151-1234567",
            "++4915112345678",
            "+４９１５１１２３４５６７", // full-width digits are not ASCII digits
        ] {
            let e = create(bad, "Ada", "ada@example.com").unwrap_err();
            assert!(bad_fields(&e).starts_with("msisdn:"), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "   ",
            "Ada\u{0}Lovelace",
            "Ada\nLovelace",
            &"x".repeat(201),
        ] {
            let e = create("+4915112345678", bad, "ada@example.com").unwrap_err();
            assert!(bad_fields(&e).starts_with("name:"), "{bad:?}: {e:?}");
        }
        // 200 characters that are more than 200 bytes are fine.
        create("+4915112345678", &"é".repeat(200), "ada@example.com").unwrap();
    }

    #[test]
    fn rejects_bad_emails() {
        let long = format!("{}@example.com", "a".repeat(243));
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "ada@@example.com",
            "ada@b@example.com",
            "ada@example..com",
            "ada@.example.com",
            "ada@example.com.",
            "ada lovelace@example.com",
            " ada@example.com",
            long.as_str(),
        ] {
            let e = create("+4915112345678", "Ada", bad).unwrap_err();
            assert!(bad_fields(&e).starts_with("email:"), "{bad:?}: {e:?}");
        }
        assert_eq!(long.len(), 255);
        create("+4915112345678", "Ada", &long[1..]).unwrap();
    }

    #[test]
    fn lists_every_bad_field() {
        let e = create("", "", "").unwrap_err();
        let message = bad_fields(&e);
        for field in ["msisdn:", "name:", "email:"] {
            assert!(message.contains(field), "{message}");
        }
    }

    fn at(t: OffsetDateTime) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: t.unix_timestamp(),
            nanos: t.nanosecond() as i32,
        })
    }

    fn sub(user_id: &str, plan_id: &str, effective_at: Option<Timestamp>) -> pb::SubscribeRequest {
        pb::SubscribeRequest {
            user_id: user_id.into(),
            plan_id: plan_id.into(),
            effective_at,
        }
    }

    #[test]
    fn subscribe_defaults_to_now_and_truncates_to_microseconds() {
        let now = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let id = Uuid::new_v4();
        let command = subscribe(sub(&id.to_string(), "basic", None), now).unwrap();
        assert_eq!(command.user_id, id);
        assert_eq!(
            command.effective_at.unix_timestamp_nanos(),
            1_700_000_000_123_456_000
        );
        let later = now + Duration::days(366);
        let command = subscribe(sub(&id.to_string(), "basic", at(later)), now).unwrap();
        assert_eq!(command.effective_at, truncate_to_micros(later));
        let earlier = now - Duration::minutes(5);
        subscribe(sub(&id.to_string(), "basic", at(earlier)), now).unwrap();
    }

    #[test]
    fn subscribe_rejects_bad_fields_together() {
        let now = OffsetDateTime::now_utc();
        let too_old = at(now - Duration::minutes(5) - Duration::seconds(1));
        let e = subscribe(sub("not-a-uuid", "", too_old), now).unwrap_err();
        let message = bad_fields(&e);
        for field in ["user_id:", "plan_id:", "effective_at:"] {
            assert!(message.contains(field), "{message}");
        }

        let id = Uuid::new_v4().to_string();
        let too_far = at(now + Duration::days(366) + Duration::seconds(1));
        let e = subscribe(sub(&id, "basic", too_far), now).unwrap_err();
        assert!(bad_fields(&e).starts_with("effective_at:"), "{e:?}");

        let bad_nanos = Some(Timestamp {
            seconds: now.unix_timestamp(),
            nanos: -1,
        });
        let e = subscribe(sub(&id, "basic", bad_nanos), now).unwrap_err();
        assert!(bad_fields(&e).starts_with("effective_at:"), "{e:?}");

        let e = subscribe(sub("", "basic", None), now).unwrap_err();
        assert!(bad_fields(&e).starts_with("user_id:"), "{e:?}");
    }

    #[test]
    fn ids() {
        assert!(user_id("user_id", "").is_err());
        assert!(user_id("user_id", "42").is_err());
        let id = Uuid::new_v4();
        assert_eq!(user_id("user_id", &id.to_string()).unwrap(), id);
        assert!(plan_id("plan_id", "").is_err());
        assert_eq!(plan_id("plan_id", "max").unwrap(), "max");
    }
}
