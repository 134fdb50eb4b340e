//! `telco.settlement.v1.SettlementService`: users' bills, computed on request
//! from settlement's own database (see the crate docs for the rule).

use std::collections::HashMap;

use time::OffsetDateTime;
use tokio_postgres::IsolationLevel;
use tonic::{Request, Response, Status};
use trellis::db;
use trellis::events::to_timestamp;
use trellis::pb::telco::settlement::v1::settlement_service_server::SettlementService;
use trellis::pb::telco::settlement::v1::{
    Bill, BillLine, BillingPeriod, GetBillRequest, GetBillResponse, ListBillsRequest,
    ListBillsResponse,
};
use trellis::service::Context;
use trellis::status::{FieldViolations, invalid_field};

use crate::billing::{self, BillingMonth, Overflow, Usage};
use crate::store::{self, Mark, StoredSubscription};

/// The most bills ListBills returns: the newest ten years.
pub const MAX_BILLS: usize = 120;

/// The years a billing period may name.
const YEARS: std::ops::RangeInclusive<i32> = 2000..=9999;

/// `telco.settlement.v1.SettlementService` over the service's database.
///
/// A month's bill uses the plan in force at the end of the month (the
/// latest subscription started before the next month's first instant, UTC)
/// and rates the whole month's usage at it: the plan's fee plus, per DATA,
/// VOICE and SMS, `max(0, used - included) * rate`, VOICE's billable seconds
/// rounded up to whole minutes first. Amounts are checked `i64` cents: an
/// overflow is INTERNAL, never a wrong amount.
#[derive(Debug, Clone)]
pub struct BillingApi {
    ctx: Context,
}

impl BillingApi {
    /// The API over the service's context.
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl SettlementService for BillingApi {
    /// The user's bill for one month: the plan in force at the month's end,
    /// its fee, and the month's usage rated at it. INVALID_ARGUMENT for an
    /// empty user ID or a period outside 2000-01 to 9999-12; NOT_FOUND if no
    /// subscription of the user started before the month's end.
    async fn get_bill(
        &self,
        request: Request<GetBillRequest>,
    ) -> Result<Response<GetBillResponse>, Status> {
        self.ctx.check_ready()?;
        let request = request.into_inner();
        let month = validate_get(&request)?;
        let user_id = request.user_id.as_str();

        let mut client = self.ctx.pool.get().await.map_err(db::status)?;
        // One snapshot, so plan, usage and mark agree with each other.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db::status)?;
        let sub = store::subscription_before(&tx, user_id, month.end())
            .await
            .map_err(db::status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "user {user_id:?} has no subscription in {month} (as far as the events applied so far tell)"
                ))
            })?;
        let usage = store::usage(&tx, user_id, month, month)
            .await
            .map_err(db::status)?;
        let mark = store::marks(&tx, user_id, month, month)
            .await
            .map_err(db::status)?
            .pop()
            .map(|(_, mark)| mark);
        tx.commit().await.map_err(db::status)?;

        let mut totals = Usage::default();
        for (_, kind, quantity) in usage {
            totals.set(kind, quantity);
        }
        let bill = bill(user_id, month, &sub, &totals, mark.as_ref())
            .map_err(|e| overflow(user_id, month, e))?;
        Ok(Response::new(GetBillResponse { bill: Some(bill) }))
    }

    /// Every bill of the user, newest first: from the month of the user's
    /// first subscription to the later of the current month (UTC) and the
    /// last month with usage, at most [`MAX_BILLS`]. Empty for a user this
    /// service knows no subscription of. INVALID_ARGUMENT for an empty user
    /// ID.
    async fn list_bills(
        &self,
        request: Request<ListBillsRequest>,
    ) -> Result<Response<ListBillsResponse>, Status> {
        self.ctx.check_ready()?;
        let request = request.into_inner();
        if request.user_id.is_empty() {
            return Err(invalid_field("user_id", "required"));
        }
        let user_id = request.user_id.as_str();

        let mut client = self.ctx.pool.get().await.map_err(db::status)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db::status)?;
        let subs = store::subscriptions(&tx, user_id)
            .await
            .map_err(db::status)?;
        let Some(first) = subs.first() else {
            return Ok(Response::new(ListBillsResponse { bills: Vec::new() }));
        };
        let last_usage = store::last_usage_month(&tx, user_id)
            .await
            .map_err(db::status)?;
        let months = bill_months(
            BillingMonth::containing(first.started_at),
            last_usage,
            BillingMonth::containing(OffsetDateTime::now_utc()),
        );
        let (Some(&newest), Some(&oldest)) = (months.first(), months.last()) else {
            return Ok(Response::new(ListBillsResponse { bills: Vec::new() }));
        };
        let mut usage: HashMap<BillingMonth, Usage> = HashMap::new();
        for (month, kind, quantity) in store::usage(&tx, user_id, oldest, newest)
            .await
            .map_err(db::status)?
        {
            usage.entry(month).or_default().set(kind, quantity);
        }
        let marks: HashMap<BillingMonth, Mark> = store::marks(&tx, user_id, oldest, newest)
            .await
            .map_err(db::status)?
            .into_iter()
            .collect();
        tx.commit().await.map_err(db::status)?;

        let mut bills = Vec::with_capacity(months.len());
        for month in months {
            let Some(sub) = in_force_at_end(&subs, month) else {
                continue; // not reached: every listed month ends after the first subscription
            };
            let totals = usage.get(&month).copied().unwrap_or_default();
            let bill = bill(user_id, month, sub, &totals, marks.get(&month))
                .map_err(|e| overflow(user_id, month, e))?;
            bills.push(bill);
        }
        Ok(Response::new(ListBillsResponse { bills }))
    }
}

/// The month a GetBill names, or INVALID_ARGUMENT naming every bad field.
fn validate_get(request: &GetBillRequest) -> Result<BillingMonth, Status> {
    let mut v = FieldViolations::new();
    if request.user_id.is_empty() {
        v.add("user_id", "required");
    }
    let month = match &request.period {
        None => {
            v.add("period", "required");
            None
        }
        Some(BillingPeriod { year, month }) => {
            if !YEARS.contains(year) {
                v.add("period.year", "must be 2000 to 9999");
            }
            let month = u8::try_from(*month).ok().filter(|m| (1..=12).contains(m));
            if month.is_none() {
                v.add("period.month", "must be 1 to 12");
            }
            month.and_then(|m| BillingMonth::new(*year, m))
        }
    };
    v.check()?;
    month.ok_or_else(|| invalid_field("period", "not a calendar month"))
}

/// The months ListBills covers, newest first: from `first` (the first
/// subscription's month) to the later of `now` and `last_usage`, at most
/// [`MAX_BILLS`] of them.
fn bill_months(
    first: BillingMonth,
    last_usage: Option<BillingMonth>,
    now: BillingMonth,
) -> Vec<BillingMonth> {
    let newest = last_usage.map_or(now, |usage| usage.max(now));
    let mut months = Vec::new();
    let mut month = Some(newest);
    while let Some(m) = month {
        if m < first || months.len() == MAX_BILLS {
            break;
        }
        months.push(m);
        month = m.prev();
    }
    months
}

/// The subscription in force at the end of `month`: the latest starting
/// before the next month's first instant. `subs` is ordered by start.
fn in_force_at_end(
    subs: &[StoredSubscription],
    month: BillingMonth,
) -> Option<&StoredSubscription> {
    let started = match month.end() {
        Some(end) => subs.partition_point(|s| s.started_at < end),
        None => subs.len(),
    };
    started.checked_sub(1).map(|i| &subs[i])
}

/// The bill of `month`, computed with `sub`'s plan. Its `updated_at` and
/// `last_event_id` are those of the later of the month's mark and the event
/// that stored `sub`: a subscription stored after the month's last usage
/// (or starting in an earlier month) changes the bill as much as an event
/// of the month does.
fn bill(
    user_id: &str,
    month: BillingMonth,
    sub: &StoredSubscription,
    usage: &Usage,
    mark: Option<&Mark>,
) -> Result<Bill, Overflow> {
    let charges = billing::charge(&sub.plan, usage)?;
    let (updated_at, last_event_id) = match mark {
        Some(mark) if mark.updated_at >= sub.applied_at => {
            (mark.updated_at, mark.last_event_id.clone())
        }
        _ => (sub.applied_at, sub.event_id.clone()),
    };
    Ok(Bill {
        user_id: user_id.to_owned(),
        period: Some(BillingPeriod {
            year: month.year(),
            month: month.month().into(),
        }),
        plan_id: sub.plan.plan_id.clone(),
        currency_code: sub.plan.currency_code.clone(),
        plan_fee_cents: charges.plan_fee_cents,
        lines: charges
            .lines
            .iter()
            .map(|line| BillLine {
                r#type: line.kind.code(),
                used_quantity: line.used,
                included_quantity: line.included,
                billable_quantity: line.billable,
                rate_cents: line.rate_cents,
                amount_cents: line.amount_cents,
            })
            .collect(),
        total_cents: charges.total_cents,
        updated_at: Some(to_timestamp(updated_at)),
        last_event_id,
    })
}

fn overflow(user_id: &str, month: BillingMonth, error: Overflow) -> Status {
    tracing::error!(user.id = %user_id, period = %month, %error, "bill cannot be computed");
    Status::internal("the bill's amounts do not fit in 64-bit cents")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Plan;

    fn month(year: i32, month: u8) -> BillingMonth {
        BillingMonth::new(year, month).unwrap()
    }

    fn period(year: i32, month: i32) -> Option<BillingPeriod> {
        Some(BillingPeriod { year, month })
    }

    fn field_message(request: GetBillRequest) -> String {
        let status = validate_get(&request).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_owned()
    }

    #[test]
    fn periods_are_validated_field_by_field() {
        let ok = GetBillRequest {
            user_id: "u".into(),
            period: period(2025, 3),
        };
        assert_eq!(validate_get(&ok).unwrap(), month(2025, 3));
        assert_eq!(
            validate_get(&GetBillRequest {
                period: period(9999, 12),
                ..ok.clone()
            })
            .unwrap(),
            month(9999, 12)
        );
        let message = field_message(GetBillRequest {
            user_id: String::new(),
            period: None,
        });
        assert!(
            message.contains("user_id") && message.contains("period"),
            "{message}"
        );
        let message = field_message(GetBillRequest {
            user_id: "u".into(),
            period: period(1999, 13),
        });
        assert!(
            message.contains("period.year") && message.contains("period.month"),
            "{message}"
        );
        assert!(
            field_message(GetBillRequest {
                period: period(10_000, 1),
                ..ok.clone()
            })
            .contains("period.year")
        );
        assert!(
            field_message(GetBillRequest {
                period: period(2025, 0),
                ..ok.clone()
            })
            .contains("period.month")
        );
        assert!(
            !field_message(GetBillRequest {
                period: period(2025, -1),
                ..ok
            })
            .contains("period.year")
        );
    }

    #[test]
    fn bill_months_run_newest_first_and_are_bounded() {
        let now = month(2025, 3);
        assert_eq!(
            bill_months(month(2025, 1), None, now),
            vec![month(2025, 3), month(2025, 2), month(2025, 1)]
        );
        // Usage later than now extends the list; earlier usage does not.
        assert_eq!(
            bill_months(month(2025, 3), Some(month(2025, 5)), now).len(),
            3
        );
        assert_eq!(
            bill_months(month(2025, 3), Some(month(2024, 5)), now),
            vec![now]
        );
        // A first subscription scheduled for later has no bill yet.
        assert!(bill_months(month(2025, 4), None, now).is_empty());
        let many = bill_months(month(2000, 1), None, now);
        assert_eq!(many.len(), MAX_BILLS);
        assert_eq!(many[0], now);
        assert_eq!(many[MAX_BILLS - 1], month(2015, 4));
    }

    fn stored(
        started: OffsetDateTime,
        plan_id: &str,
        event_id: &str,
        applied_at: OffsetDateTime,
    ) -> StoredSubscription {
        StoredSubscription {
            started_at: started,
            plan: Plan {
                plan_id: plan_id.into(),
                currency_code: "EUR".into(),
                monthly_fee_cents: 500,
                included_data_mb: 0,
                included_voice_seconds: 0,
                included_sms: 0,
                extra_data_mb_cents: 1,
                extra_voice_minute_cents: 1,
                extra_sms_cents: 1,
            },
            event_id: event_id.into(),
            applied_at,
        }
    }

    #[test]
    fn the_plan_is_the_one_in_force_at_the_month_end() {
        let t = month(2025, 1).start();
        let subs = vec![
            stored(t + time::Duration::days(3), "a", "e1", t),
            stored(
                month(2025, 2).start() - time::Duration::SECOND,
                "b",
                "e2",
                t,
            ),
            stored(month(2025, 3).start(), "c", "e3", t),
        ];
        assert!(in_force_at_end(&subs, month(2024, 12)).is_none());
        assert_eq!(
            in_force_at_end(&subs, month(2025, 1)).unwrap().plan.plan_id,
            "b"
        );
        // Starting exactly at March's first instant is not in force at February's end.
        assert_eq!(
            in_force_at_end(&subs, month(2025, 2)).unwrap().plan.plan_id,
            "b"
        );
        assert_eq!(
            in_force_at_end(&subs, month(2025, 3)).unwrap().plan.plan_id,
            "c"
        );
        assert_eq!(
            in_force_at_end(&subs, month(9999, 12))
                .unwrap()
                .plan
                .plan_id,
            "c"
        );
    }

    #[test]
    fn freshness_is_the_later_of_mark_and_subscription() {
        let t = month(2025, 1).start();
        let sub = stored(t, "a", "sub-event", t + time::Duration::MINUTE);
        let usage = Usage::of(3, 0, 0);
        let no_mark = bill("u", month(2025, 1), &sub, &usage, None).unwrap();
        assert_eq!(no_mark.last_event_id, "sub-event");
        assert_eq!(
            no_mark.updated_at,
            Some(to_timestamp(t + time::Duration::MINUTE))
        );
        let later = Mark {
            last_event_id: "usage-event".into(),
            updated_at: t + time::Duration::HOUR,
        };
        let with_mark = bill("u", month(2025, 1), &sub, &usage, Some(&later)).unwrap();
        assert_eq!(with_mark.last_event_id, "usage-event");
        assert_eq!(with_mark.total_cents, 503);
        assert_eq!(with_mark.period, period(2025, 1));
        assert_eq!(with_mark.lines.len(), 3);
        let earlier = Mark {
            last_event_id: "old-usage".into(),
            updated_at: t,
        };
        assert_eq!(
            bill("u", month(2025, 1), &sub, &usage, Some(&earlier))
                .unwrap()
                .last_event_id,
            "sub-event"
        );
    }
}
