use prost_types::Timestamp;
use tonic::Code;
use tonic_types::StatusExt;

use super::*;

const USER: &str = "0b0c8a4e-4a53-4a8b-9d07-0a9d2c6b8f11";

fn now() -> OffsetDateTime {
    // 2025-03-10 12:00:00 UTC
    OffsetDateTime::from_unix_timestamp(1_741_608_000).unwrap()
}

fn ts(t: OffsetDateTime) -> Timestamp {
    to_timestamp(t)
}

fn good() -> pb::RecordUsageRequest {
    pb::RecordUsageRequest {
        user_id: USER.into(),
        r#type: pb::UsageType::Data.into(),
        quantity: 10,
        occurred_at: Some(ts(now() - Duration::hours(1))),
        idempotency_key: "cdr-1".into(),
    }
}

/// The fields an INVALID_ARGUMENT names, in its BadRequest details.
fn fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

fn record_fields(change: impl FnOnce(&mut pb::RecordUsageRequest)) -> Vec<String> {
    let mut request = good();
    change(&mut request);
    fields(&validate_record(&request, now()).unwrap_err())
}

#[test]
fn a_good_record_passes_canonicalised_and_truncated() {
    let mut request = good();
    request.user_id = USER.to_uppercase();
    request.occurred_at = Some(Timestamp {
        seconds: (now() - Duration::hours(1)).unix_timestamp(),
        nanos: 123_456_789,
    });
    let usage = validate_record(&request, now()).unwrap();
    assert_eq!(usage.user_id, USER);
    assert_eq!(usage.kind, UsageKind::Data);
    assert_eq!(usage.occurred_at.nanosecond(), 123_456_000);
    assert_eq!(usage.idempotency_key, "cdr-1");
}

#[test]
fn every_bad_field_is_named_at_once() {
    let request = pb::RecordUsageRequest::default();
    let status = validate_record(&request, now()).unwrap_err();
    assert_eq!(
        fields(&status),
        [
            "user_id",
            "type",
            "quantity",
            "occurred_at",
            "idempotency_key"
        ]
    );
    for field in [
        "user_id",
        "type",
        "quantity",
        "occurred_at",
        "idempotency_key",
    ] {
        assert!(status.message().contains(field), "{}", status.message());
    }
}

#[test]
fn each_rule_names_its_field() {
    assert_eq!(record_fields(|r| r.user_id = "nope".into()), ["user_id"]);
    assert_eq!(record_fields(|r| r.r#type = 9), ["type"]);
    assert_eq!(record_fields(|r| r.quantity = -1), ["quantity"]);
    assert_eq!(record_fields(|r| r.occurred_at = None), ["occurred_at"]);
    assert_eq!(
        record_fields(|r| r.occurred_at = Some(Timestamp {
            seconds: 1,
            nanos: -1
        })),
        ["occurred_at"]
    );
    assert_eq!(
        record_fields(|r| r.occurred_at = Some(Timestamp {
            seconds: i64::MAX,
            nanos: 0
        })),
        ["occurred_at"]
    );
    assert_eq!(
        record_fields(|r| r.idempotency_key = "k".repeat(201)),
        ["idempotency_key"]
    );
    assert_eq!(
        record_fields(|r| r.idempotency_key = "a\nb".into()),
        ["idempotency_key"]
    );
    // 200 characters, not bytes.
    let mut request = good();
    request.idempotency_key = "é".repeat(200);
    assert!(validate_record(&request, now()).is_ok());
}

#[test]
fn quantity_is_bounded_per_type() {
    for (kind, max) in [
        (pb::UsageType::Data, 1_000_000),
        (pb::UsageType::Voice, 86_400),
        (pb::UsageType::Sms, 1_000),
    ] {
        let mut request = good();
        request.r#type = kind.into();
        request.quantity = max;
        assert!(validate_record(&request, now()).is_ok(), "{kind:?} {max}");
        request.quantity = max + 1;
        let status = validate_record(&request, now()).unwrap_err();
        assert_eq!(fields(&status), ["quantity"]);
        assert!(
            status.message().contains(&max.to_string()),
            "{}",
            status.message()
        );
    }
}

#[test]
fn occurred_at_is_within_the_window() {
    let at = |t: OffsetDateTime| {
        let mut request = good();
        request.occurred_at = Some(ts(t));
        validate_record(&request, now())
    };
    assert!(at(now() + Duration::minutes(5)).is_ok());
    assert_eq!(
        fields(&at(now() + Duration::minutes(6)).unwrap_err()),
        ["occurred_at"]
    );
    assert!(at(now() - Duration::days(400)).is_ok());
    assert_eq!(
        fields(&at(now() - Duration::days(400) - Duration::seconds(1)).unwrap_err()),
        ["occurred_at"]
    );
}

#[test]
fn same_as_compares_the_parameters() {
    let usage = validate_record(&good(), now()).unwrap();
    let stored = StoredUsage {
        id: Uuid::new_v4(),
        user_id: usage.user_id.clone(),
        kind: usage.kind,
        quantity: usage.quantity,
        occurred_at: usage.occurred_at,
        idempotency_key: usage.idempotency_key.clone(),
        recorded_at: now(),
    };
    assert!(usage.same_as(&stored));
    assert!(!usage.same_as(&StoredUsage {
        quantity: 11,
        ..stored.clone()
    }));
    assert!(!usage.same_as(&StoredUsage {
        kind: UsageKind::Sms,
        ..stored.clone()
    }));
    assert!(!usage.same_as(&StoredUsage {
        occurred_at: stored.occurred_at + Duration::microseconds(1),
        ..stored.clone()
    }));
}

#[test]
fn list_limits_and_bounds() {
    let list = |limit: i32, start: Option<OffsetDateTime>, end: Option<OffsetDateTime>| {
        validate_list(
            &pb::ListUsageRequest {
                user_id: USER.into(),
                start_time: start.map(ts),
                end_time: end.map(ts),
                limit,
            },
            500,
        )
    };
    assert_eq!(list(0, None, None).unwrap().limit, 500);
    assert_eq!(list(7, None, None).unwrap().limit, 7);
    assert_eq!(list(500, None, None).unwrap().limit, 500);
    assert_eq!(fields(&list(501, None, None).unwrap_err()), ["limit"]);
    assert_eq!(fields(&list(-1, None, None).unwrap_err()), ["limit"]);
    assert!(list(0, Some(now()), Some(now())).is_ok());
    assert_eq!(
        fields(&list(0, Some(now()), Some(now() - Duration::seconds(1))).unwrap_err()),
        ["end_time"]
    );
    let status = validate_list(&pb::ListUsageRequest::default(), 500).unwrap_err();
    assert_eq!(fields(&status), ["user_id"]);
}

#[test]
fn summary_needs_a_bounded_period() {
    let summary = |start: Option<OffsetDateTime>, end: Option<OffsetDateTime>| {
        validate_summary(&pb::GetUsageSummaryRequest {
            user_id: USER.into(),
            start_time: start.map(ts),
            end_time: end.map(ts),
        })
    };
    assert!(summary(Some(now()), Some(now() + Duration::days(400))).is_ok());
    assert_eq!(
        fields(&summary(None, None).unwrap_err()),
        ["start_time", "end_time"]
    );
    assert_eq!(
        fields(&summary(Some(now()), Some(now())).unwrap_err()),
        ["end_time"]
    );
    assert_eq!(
        fields(&summary(Some(now()), Some(now() + Duration::days(401))).unwrap_err()),
        ["end_time"]
    );
}

#[test]
fn kinds_round_trip_through_the_contract_numbers() {
    for kind in UsageKind::ALL {
        assert_eq!(UsageKind::from_db(kind.to_db()), Some(kind));
        assert_eq!(UsageKind::from_proto(kind.to_proto().into()), Some(kind));
    }
    assert_eq!(UsageKind::from_proto(0), None);
    assert_eq!(UsageKind::from_db(4), None);
}
