//! Receiving events: `telco.settlement.v1.SettlementEventsService.Deliver`.
//!
//! Each event is checked and turned into an [`Effect`] from its content
//! alone, before the database is touched, so an event that can never be
//! applied is INVALID_ARGUMENT (its producer parks it) and leaves nothing
//! behind. Its effect is then written in the same transaction as its inbox
//! record, so it takes effect exactly once however often it is delivered.
//!
//! - "subscription.changed" (`telco.user.v1.SubscriptionChangedEvent`)
//!   stores the subscription with its plan's terms, replacing the user's
//!   subscriptions that start at or after it.
//! - "usage.recorded" (`telco.usage.v1.UsageRecordedEvent`) adds the
//!   record's quantity to the user's total of its UTC month and type. Usage
//!   is kept even when the user's subscription has not arrived yet: the two
//!   producers' events arrive in no particular order relative to each other,
//!   and the bill is computed when asked for.
//! - Every other topic ("user.created" included) is recorded as applied and
//!   otherwise ignored.
//!
//! Each applied event of the first two topics also becomes the last event of
//! the month it concerns (the usage's month, the subscription's first
//! month).

use tonic::{Request, Response, Status};
use trellis::db;
use trellis::events;
use trellis::pb::telco::settlement::v1::settlement_events_service_server::SettlementEventsService;
use trellis::pb::telco::usage::v1::{UsageRecord, UsageRecordedEvent};
use trellis::pb::telco::user::v1::{Plan as PbPlan, SubscriptionChangedEvent};
use trellis::pb::trellis::events::v1::{DeliverRequest, DeliverResponse, Event};
use trellis::service::Context;
use trellis::status::FieldViolations;

use crate::billing::{BillingMonth, Plan, UsageKind};
use crate::store::{self, NewSubscription, NewUsage};
use crate::timestamp;

/// Topic of `telco.user.v1.SubscriptionChangedEvent`.
pub const SUBSCRIPTION_CHANGED: &str = "subscription.changed";
/// Topic of `telco.usage.v1.UsageRecordedEvent`.
pub const USAGE_RECORDED: &str = "usage.recorded";

/// What an event does to settlement's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Store a subscription.
    Subscribe(NewSubscription),
    /// Add usage to a month's total.
    Use(NewUsage),
    /// Nothing: a topic settlement does not bill from.
    Ignore,
}

impl Effect {
    /// The effect of `event`, from its content alone; INVALID_ARGUMENT
    /// naming every bad field if it can never be applied.
    pub fn of(event: &Event) -> Result<Effect, Status> {
        match event.topic.as_str() {
            SUBSCRIPTION_CHANGED => {
                let payload = events::decode::<SubscriptionChangedEvent>(event)?;
                subscription(&event.key, &payload).map(Effect::Subscribe)
            }
            USAGE_RECORDED => {
                let payload = events::decode::<UsageRecordedEvent>(event)?;
                usage(&event.key, payload.record.as_ref()).map(Effect::Use)
            }
            _ => Ok(Effect::Ignore),
        }
    }
}

fn required_text(v: &mut FieldViolations, field: &str, value: &str) {
    if value.is_empty() {
        v.add(field, "required");
    }
}

fn same_user(v: &mut FieldViolations, field: &str, user_id: &str, key: &str) {
    if !user_id.is_empty() && user_id != key {
        v.add(field, "must equal the event key (the user ID)");
    }
}

fn instant(
    v: &mut FieldViolations,
    field: &str,
    ts: Option<&prost_types::Timestamp>,
) -> Option<time::OffsetDateTime> {
    match ts {
        None => {
            v.add(field, "required");
            None
        }
        Some(ts) => {
            // PostgreSQL stores no years before 1 (4713 BC, but `time` not
            // beyond -9999): keep to what both hold, so a bad timestamp is
            // refused here rather than failing the write over and over.
            let instant = timestamp::from_proto(ts).filter(|t| t.year() >= 1);
            if instant.is_none() {
                v.add(field, "not a valid timestamp between the years 1 and 9999");
            }
            instant
        }
    }
}

fn usage(key: &str, record: Option<&UsageRecord>) -> Result<NewUsage, Status> {
    let mut v = FieldViolations::new();
    let Some(record) = record else {
        v.add("payload.record", "required");
        return Err(v.check().expect_err("a violation was recorded"));
    };
    required_text(&mut v, "payload.record.id", &record.id);
    required_text(&mut v, "payload.record.user_id", &record.user_id);
    same_user(&mut v, "payload.record.user_id", &record.user_id, key);
    let kind = UsageKind::from_code(record.r#type);
    if kind.is_none() {
        v.add("payload.record.type", "must be DATA, VOICE or SMS");
    }
    if record.quantity <= 0 {
        v.add("payload.record.quantity", "must be positive");
    }
    let occurred_at = instant(
        &mut v,
        "payload.record.occurred_at",
        record.occurred_at.as_ref(),
    );
    v.check()?;
    let (Some(kind), Some(occurred_at)) = (kind, occurred_at) else {
        unreachable!("checked above");
    };
    Ok(NewUsage {
        user_id: record.user_id.clone(),
        month: BillingMonth::containing(occurred_at),
        kind,
        quantity: record.quantity,
    })
}

fn subscription(key: &str, event: &SubscriptionChangedEvent) -> Result<NewSubscription, Status> {
    let mut v = FieldViolations::new();
    let (Some(sub), Some(plan)) = (&event.subscription, &event.plan) else {
        if event.subscription.is_none() {
            v.add("payload.subscription", "required");
        }
        if event.plan.is_none() {
            v.add("payload.plan", "required");
        }
        return Err(v.check().expect_err("a violation was recorded"));
    };
    required_text(&mut v, "payload.subscription.id", &sub.id);
    required_text(&mut v, "payload.subscription.user_id", &sub.user_id);
    same_user(&mut v, "payload.subscription.user_id", &sub.user_id, key);
    required_text(&mut v, "payload.subscription.plan_id", &sub.plan_id);
    let started_at = instant(
        &mut v,
        "payload.subscription.started_at",
        sub.started_at.as_ref(),
    );
    if plan.id != sub.plan_id {
        v.add("payload.plan.id", "must equal payload.subscription.plan_id");
    }
    let currency = &plan.currency_code;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        v.add(
            "payload.plan.currency_code",
            "must be an ISO 4217 code such as EUR",
        );
    }
    let terms = plan_terms(plan);
    for (field, value) in plan_amounts(&terms) {
        if value < 0 {
            v.add(format!("payload.plan.{field}"), "must not be negative");
        }
    }
    v.check()?;
    let Some(started_at) = started_at else {
        unreachable!("checked above");
    };
    Ok(NewSubscription {
        user_id: sub.user_id.clone(),
        subscription_id: sub.id.clone(),
        started_at,
        plan: terms,
    })
}

fn plan_terms(plan: &PbPlan) -> Plan {
    Plan {
        plan_id: plan.id.clone(),
        currency_code: plan.currency_code.clone(),
        monthly_fee_cents: plan.monthly_fee_cents,
        included_data_mb: plan.included_data_mb,
        included_voice_seconds: plan.included_voice_seconds,
        included_sms: plan.included_sms,
        extra_data_mb_cents: plan.extra_data_mb_cents,
        extra_voice_minute_cents: plan.extra_voice_minute_cents,
        extra_sms_cents: plan.extra_sms_cents,
    }
}

/// Every amount and quantity of `plan`, by its proto field name.
fn plan_amounts(plan: &Plan) -> [(&'static str, i64); 7] {
    [
        ("monthly_fee_cents", plan.monthly_fee_cents),
        ("included_data_mb", plan.included_data_mb),
        ("included_voice_seconds", plan.included_voice_seconds),
        ("included_sms", plan.included_sms),
        ("extra_data_mb_cents", plan.extra_data_mb_cents),
        ("extra_voice_minute_cents", plan.extra_voice_minute_cents),
        ("extra_sms_cents", plan.extra_sms_cents),
    ]
}

/// `telco.settlement.v1.SettlementEventsService`: applies delivered events
/// exactly once.
#[derive(Debug, Clone)]
pub struct EventsApi {
    ctx: Context,
}

impl EventsApi {
    /// The API over the service's context.
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl SettlementEventsService for EventsApi {
    /// Applies one event exactly once. INVALID_ARGUMENT for an event that can
    /// never be applied (nothing is written, not even the inbox record);
    /// UNAVAILABLE while the database is unreachable or not yet migrated.
    /// Never FAILED_PRECONDITION: usage that arrives before the user's
    /// subscription is kept and billed once the subscription arrives.
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.ctx.check_ready()?;
        let event = events::accept(request.get_ref())?;
        let effect = Effect::of(event)?;
        let mut client = self.ctx.pool.get().await.map_err(db::status)?;
        let tx = client.transaction().await.map_err(db::status)?;
        if !events::record_applied(&tx, event)
            .await
            .map_err(db::status)?
        {
            tracing::debug!(event.id = %event.id, event.topic = %event.topic, "duplicate delivery");
            return Ok(Response::new(DeliverResponse { duplicate: true }));
        }
        match &effect {
            Effect::Subscribe(sub) => store::put_subscription(&tx, &event.id, sub).await,
            Effect::Use(usage) => store::add_usage(&tx, &event.id, usage).await,
            Effect::Ignore => Ok(()),
        }
        .map_err(db::status)?;
        tx.commit().await.map_err(db::status)?;
        tracing::debug!(event.id = %event.id, event.topic = %event.topic, "applied");
        Ok(Response::new(DeliverResponse { duplicate: false }))
    }
}

#[cfg(test)]
mod tests {
    use prost::Name;
    use prost_types::{Any, Timestamp};
    use trellis::pb::telco::user::v1::Subscription;

    use super::*;

    fn event(topic: &str, type_url: String, value: Vec<u8>) -> Event {
        Event {
            id: "5b0c4a52-2f0d-4d8e-9d7e-0c5a3f2b1a00".into(),
            topic: topic.into(),
            key: "u1".into(),
            occurred_at: None,
            payload: Some(Any { type_url, value }),
            source: "usage".into(),
            sequence: 1,
        }
    }

    fn usage_event(record: UsageRecord) -> Event {
        let payload = UsageRecordedEvent {
            record: Some(record),
        };
        event(
            USAGE_RECORDED,
            UsageRecordedEvent::type_url(),
            prost::Message::encode_to_vec(&payload),
        )
    }

    fn record() -> UsageRecord {
        UsageRecord {
            id: "r1".into(),
            user_id: "u1".into(),
            r#type: 2,
            quantity: 61,
            // 2025-01-31T23:59:59.9999999Z: still January once truncated.
            occurred_at: Some(Timestamp {
                seconds: 1_738_367_999,
                nanos: 999_999_999,
            }),
            idempotency_key: "k".into(),
            recorded_at: None,
        }
    }

    fn violations(status: &Status) -> String {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        status.message().to_owned()
    }

    #[test]
    fn usage_becomes_a_monthly_total() {
        let effect = Effect::of(&usage_event(record())).unwrap();
        assert_eq!(
            effect,
            Effect::Use(NewUsage {
                user_id: "u1".into(),
                month: BillingMonth::new(2025, 1).unwrap(),
                kind: UsageKind::Voice,
                quantity: 61,
            })
        );
    }

    #[test]
    fn bad_usage_names_every_field() {
        let bad = UsageRecord {
            id: String::new(),
            user_id: "u2".into(),
            r#type: 0,
            quantity: 0,
            occurred_at: None,
            ..record()
        };
        let message = violations(&Effect::of(&usage_event(bad)).unwrap_err());
        for field in [
            "payload.record.id",
            "payload.record.user_id",
            "payload.record.type",
            "payload.record.quantity",
            "payload.record.occurred_at",
        ] {
            assert!(message.contains(field), "{field} missing from {message}");
        }
        let unknown_type = UsageRecord {
            r#type: 7,
            quantity: -5,
            ..record()
        };
        let message = violations(&Effect::of(&usage_event(unknown_type)).unwrap_err());
        assert!(message.contains("payload.record.type"), "{message}");
        assert!(message.contains("payload.record.quantity"), "{message}");
        let no_record = event(
            USAGE_RECORDED,
            UsageRecordedEvent::type_url(),
            prost::Message::encode_to_vec(&UsageRecordedEvent { record: None }),
        );
        assert!(violations(&Effect::of(&no_record).unwrap_err()).contains("payload.record"));
    }

    #[test]
    fn wrong_payload_type_is_invalid() {
        let wrong = event(
            USAGE_RECORDED,
            SubscriptionChangedEvent::type_url(),
            prost::Message::encode_to_vec(&SubscriptionChangedEvent::default()),
        );
        violations(&Effect::of(&wrong).unwrap_err());
        let garbage = event(
            SUBSCRIPTION_CHANGED,
            SubscriptionChangedEvent::type_url(),
            vec![0xff, 0xff, 0xff],
        );
        violations(&Effect::of(&garbage).unwrap_err());
    }

    fn plan() -> PbPlan {
        PbPlan {
            id: "basic".into(),
            name: "Basic".into(),
            currency_code: "EUR".into(),
            monthly_fee_cents: 1_000,
            included_data_mb: 1,
            included_voice_seconds: 2,
            included_sms: 3,
            extra_data_mb_cents: 4,
            extra_voice_minute_cents: 5,
            extra_sms_cents: 6,
        }
    }

    fn subscription_event(sub: Option<Subscription>, plan: Option<PbPlan>) -> Event {
        let payload = SubscriptionChangedEvent {
            subscription: sub,
            plan,
            previous_plan_id: String::new(),
        };
        event(
            SUBSCRIPTION_CHANGED,
            SubscriptionChangedEvent::type_url(),
            prost::Message::encode_to_vec(&payload),
        )
    }

    fn sub() -> Subscription {
        Subscription {
            id: "s1".into(),
            user_id: "u1".into(),
            plan_id: "basic".into(),
            started_at: Some(Timestamp {
                seconds: 1_735_689_600, // 2025-01-01T00:00:00Z
                nanos: 0,
            }),
        }
    }

    #[test]
    fn subscription_keeps_the_plan_terms() {
        let Effect::Subscribe(new) =
            Effect::of(&subscription_event(Some(sub()), Some(plan()))).unwrap()
        else {
            panic!("not a subscription");
        };
        assert_eq!(new.user_id, "u1");
        assert_eq!(new.subscription_id, "s1");
        assert_eq!(
            BillingMonth::containing(new.started_at),
            BillingMonth::new(2025, 1).unwrap()
        );
        assert_eq!(new.plan, plan_terms(&plan()));
    }

    #[test]
    fn bad_subscription_names_every_field() {
        let message = violations(&Effect::of(&subscription_event(None, None)).unwrap_err());
        assert!(message.contains("payload.subscription"), "{message}");
        assert!(message.contains("payload.plan"), "{message}");
        let bad_sub = Subscription {
            id: String::new(),
            user_id: "someone-else".into(),
            plan_id: "gold".into(),
            started_at: None,
        };
        let bad_plan = PbPlan {
            currency_code: "eur".into(),
            monthly_fee_cents: -1,
            extra_sms_cents: -1,
            ..plan()
        };
        let message = violations(
            &Effect::of(&subscription_event(Some(bad_sub), Some(bad_plan))).unwrap_err(),
        );
        for field in [
            "payload.subscription.id",
            "payload.subscription.user_id",
            "payload.subscription.started_at",
            "payload.plan.id",
            "payload.plan.currency_code",
            "payload.plan.monthly_fee_cents",
            "payload.plan.extra_sms_cents",
        ] {
            assert!(message.contains(field), "{field} missing from {message}");
        }
    }

    #[test]
    fn other_topics_are_ignored_without_decoding() {
        let created = event("user.created", "type.googleapis.com/x".into(), vec![0xff]);
        assert_eq!(Effect::of(&created).unwrap(), Effect::Ignore);
        let unknown = event("something.else", String::new(), vec![]);
        assert_eq!(Effect::of(&unknown).unwrap(), Effect::Ignore);
    }
}
