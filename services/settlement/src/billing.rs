//! Billing months and the arithmetic of a bill.
//!
//! The rule: a month's bill uses the plan in force at the end of the month
//! (chosen by the caller, see the crate docs) and rates the whole month's
//! usage at it. For each usage type, in the order DATA, VOICE, SMS:
//! `billable = max(0, used - included)` and `amount = billable * rate`,
//! except that VOICE's billable seconds are first rounded up to whole
//! minutes, because its rate is per minute (`billable` itself stays in
//! seconds). The total is the plan's fee plus every line's amount.
//!
//! Amounts are integer cents in `i64`, computed with checked arithmetic: a
//! bill that would overflow is an [`Overflow`] error, never a wrong number.

use std::fmt;

use time::{Date, Month, OffsetDateTime, Time};

/// A calendar month in UTC, the period a bill covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BillingMonth(Date); // always the first day of the month

impl BillingMonth {
    /// The month `month` (1 to 12) of `year`; `None` if out of range (the
    /// years `time` can represent, -9999 to 9999).
    pub fn new(year: i32, month: u8) -> Option<Self> {
        let month = Month::try_from(month).ok()?;
        Date::from_calendar_date(year, month, 1).ok().map(Self)
    }

    /// The month (in UTC) that contains `instant`.
    pub fn containing(instant: OffsetDateTime) -> Self {
        let date = instant.to_offset(time::UtcOffset::UTC).date();
        Self::of_date(date)
    }

    /// The month that contains `date`.
    pub fn of_date(date: Date) -> Self {
        Self(date.replace_day(1).expect("every month has a first day"))
    }

    /// The year, e.g. 2025.
    pub fn year(self) -> i32 {
        self.0.year()
    }

    /// The month of the year, 1 (January) to 12 (December).
    pub fn month(self) -> u8 {
        self.0.month().into()
    }

    /// The month's first day: how the month is stored in the database.
    pub fn first_day(self) -> Date {
        self.0
    }

    /// The month's first instant (midnight UTC of its first day).
    pub fn start(self) -> OffsetDateTime {
        self.0.with_time(Time::MIDNIGHT).assume_utc()
    }

    /// The first instant after the month, i.e. the next month's start; `None`
    /// for December 9999, whose end lies beyond representable time (so
    /// nothing stored can start after it).
    pub fn end(self) -> Option<OffsetDateTime> {
        self.next().map(Self::start)
    }

    /// The following month; `None` after December 9999.
    pub fn next(self) -> Option<Self> {
        match self.0.month() {
            Month::December => Self::new(self.year().checked_add(1)?, 1),
            month => Self::new(self.year(), month.next().into()),
        }
    }

    /// The preceding month; `None` before January -9999.
    pub fn prev(self) -> Option<Self> {
        match self.0.month() {
            Month::January => Self::new(self.year().checked_sub(1)?, 12),
            month => Self::new(self.year(), month.previous().into()),
        }
    }
}

impl fmt::Display for BillingMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month())
    }
}

/// A kind of usage, and the order of a bill's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UsageKind {
    /// Mobile data, in megabytes.
    Data,
    /// Voice calls, in seconds (rated per started minute).
    Voice,
    /// Text messages, counted.
    Sms,
}

impl UsageKind {
    /// Every kind, in the order of a bill's lines.
    pub const ALL: [UsageKind; 3] = [UsageKind::Data, UsageKind::Voice, UsageKind::Sms];

    /// The kind's `telco.usage.v1.UsageType` number, also its database code.
    pub fn code(self) -> i32 {
        match self {
            UsageKind::Data => 1,
            UsageKind::Voice => 2,
            UsageKind::Sms => 3,
        }
    }

    /// The kind with `telco.usage.v1.UsageType` number `code`; `None` for
    /// UNSPECIFIED and unknown numbers.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.code() == code)
    }

    fn index(self) -> usize {
        match self {
            UsageKind::Data => 0,
            UsageKind::Voice => 1,
            UsageKind::Sms => 2,
        }
    }
}

/// The terms of a plan a bill is computed with, as carried by the
/// subscription event. Amounts in cents of `currency_code`, quantities in
/// the usage kind's unit; none negative (checked when the event arrives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The plan's ID, e.g. "basic".
    pub plan_id: String,
    /// ISO 4217 code of every amount, e.g. "EUR".
    pub currency_code: String,
    /// Fee per calendar month, not prorated.
    pub monthly_fee_cents: i64,
    /// Data included per month, MB.
    pub included_data_mb: i64,
    /// Voice included per month, seconds.
    pub included_voice_seconds: i64,
    /// Messages included per month.
    pub included_sms: i64,
    /// Price per MB beyond the allowance.
    pub extra_data_mb_cents: i64,
    /// Price per started minute beyond the allowance.
    pub extra_voice_minute_cents: i64,
    /// Price per message beyond the allowance.
    pub extra_sms_cents: i64,
}

impl Plan {
    fn included(&self, kind: UsageKind) -> i64 {
        match kind {
            UsageKind::Data => self.included_data_mb,
            UsageKind::Voice => self.included_voice_seconds,
            UsageKind::Sms => self.included_sms,
        }
    }

    fn rate_cents(&self, kind: UsageKind) -> i64 {
        match kind {
            UsageKind::Data => self.extra_data_mb_cents,
            UsageKind::Voice => self.extra_voice_minute_cents,
            UsageKind::Sms => self.extra_sms_cents,
        }
    }
}

/// A month's usage totals, one per kind, in the kind's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage([i64; 3]);

impl Usage {
    /// The total of `kind`.
    pub fn get(&self, kind: UsageKind) -> i64 {
        self.0[kind.index()]
    }

    /// Sets the total of `kind`.
    pub fn set(&mut self, kind: UsageKind, quantity: i64) {
        self.0[kind.index()] = quantity;
    }

    /// Usage of the given totals.
    pub fn of(data_mb: i64, voice_seconds: i64, sms: i64) -> Self {
        Self([data_mb, voice_seconds, sms])
    }
}

/// The charge for one usage kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// The kind charged.
    pub kind: UsageKind,
    /// Used in the month, in the kind's unit.
    pub used: i64,
    /// Included in the plan, same unit.
    pub included: i64,
    /// `max(0, used - included)`, same unit (seconds for VOICE).
    pub billable: i64,
    /// Price per extra unit: per MB, per minute, per message.
    pub rate_cents: i64,
    /// `billable * rate`, VOICE's seconds rounded up to minutes first.
    pub amount_cents: i64,
}

/// A computed bill: the fee, a line per kind (DATA, VOICE, SMS) and the total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charges {
    /// The plan's monthly fee.
    pub plan_fee_cents: i64,
    /// One line per kind, in [`UsageKind::ALL`] order.
    pub lines: [Line; 3],
    /// The fee plus every line's amount.
    pub total_cents: i64,
}

/// A bill whose amounts do not fit in `i64` cents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} overflows 64-bit cents")]
pub struct Overflow(&'static str);

/// Computes the bill of `usage` under `plan` (see the module docs).
pub fn charge(plan: &Plan, usage: &Usage) -> Result<Charges, Overflow> {
    let line = |kind: UsageKind| -> Result<Line, Overflow> {
        let used = usage.get(kind);
        let included = plan.included(kind);
        let rate_cents = plan.rate_cents(kind);
        let billable = used
            .checked_sub(included)
            .ok_or(Overflow("billable quantity"))?
            .max(0);
        let units = match kind {
            UsageKind::Voice => whole_minutes(billable),
            UsageKind::Data | UsageKind::Sms => billable,
        };
        let amount_cents = units
            .checked_mul(rate_cents)
            .ok_or(Overflow("line amount"))?;
        Ok(Line {
            kind,
            used,
            included,
            billable,
            rate_cents,
            amount_cents,
        })
    };
    let lines = [
        line(UsageKind::Data)?,
        line(UsageKind::Voice)?,
        line(UsageKind::Sms)?,
    ];
    let total_cents = lines
        .iter()
        .try_fold(plan.monthly_fee_cents, |total, line| {
            total.checked_add(line.amount_cents)
        })
        .ok_or(Overflow("total"))?;
    Ok(Charges {
        plan_fee_cents: plan.monthly_fee_cents,
        lines,
        total_cents,
    })
}

/// Seconds rounded up to whole minutes; `seconds` is not negative.
fn whole_minutes(seconds: i64) -> i64 {
    // Written without `seconds + 59` so that it cannot overflow.
    seconds / 60 + i64::from(seconds % 60 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            plan_id: "basic".into(),
            currency_code: "EUR".into(),
            monthly_fee_cents: 1_000,
            included_data_mb: 5_000,
            included_voice_seconds: 6_000,
            included_sms: 100,
            extra_data_mb_cents: 2,
            extra_voice_minute_cents: 9,
            extra_sms_cents: 19,
        }
    }

    fn amounts(charges: &Charges) -> [i64; 3] {
        charges.lines.map(|l| l.amount_cents)
    }

    #[test]
    fn zero_usage_is_the_fee() {
        let charges = charge(&plan(), &Usage::default()).unwrap();
        assert_eq!(charges.plan_fee_cents, 1_000);
        assert_eq!(charges.total_cents, 1_000);
        assert_eq!(
            charges.lines.map(|l| l.kind),
            [UsageKind::Data, UsageKind::Voice, UsageKind::Sms]
        );
        for line in charges.lines {
            assert_eq!((line.used, line.billable, line.amount_cents), (0, 0, 0));
        }
        assert_eq!(charges.lines.map(|l| l.included), [5_000, 6_000, 100]);
        assert_eq!(charges.lines.map(|l| l.rate_cents), [2, 9, 19]);
    }

    #[test]
    fn usage_up_to_the_allowance_is_free() {
        let charges = charge(&plan(), &Usage::of(5_000, 6_000, 100)).unwrap();
        assert_eq!(charges.lines.map(|l| l.billable), [0, 0, 0]);
        assert_eq!(charges.total_cents, 1_000);
    }

    #[test]
    fn one_unit_over_the_allowance_is_charged() {
        let charges = charge(&plan(), &Usage::of(5_001, 6_001, 101)).unwrap();
        assert_eq!(charges.lines.map(|l| l.billable), [1, 1, 1]);
        // One second of voice is a whole minute.
        assert_eq!(amounts(&charges), [2, 9, 19]);
        assert_eq!(charges.total_cents, 1_000 + 2 + 9 + 19);
    }

    #[test]
    fn voice_rounds_up_to_whole_minutes() {
        let mut p = plan();
        p.included_voice_seconds = 0;
        let voice = |seconds| {
            let charges = charge(&p, &Usage::of(0, seconds, 0)).unwrap();
            let line = charges.lines[1];
            assert_eq!(line.billable, seconds, "billable stays in seconds");
            line.amount_cents / 9
        };
        assert_eq!(voice(0), 0);
        assert_eq!(voice(1), 1);
        assert_eq!(voice(59), 1);
        assert_eq!(voice(60), 1);
        assert_eq!(voice(61), 2);
        assert_eq!(voice(120), 2);
        assert_eq!(voice(121), 3);
        assert_eq!(whole_minutes(i64::MAX), i64::MAX / 60 + 1);
    }

    #[test]
    fn overflow_is_an_error_not_a_number() {
        let mut p = plan();
        p.extra_data_mb_cents = i64::MAX;
        assert_eq!(
            charge(&p, &Usage::of(5_002, 0, 0)),
            Err(Overflow("line amount"))
        );
        // Each line fits, their sum with the fee does not.
        let mut p = plan();
        p.extra_data_mb_cents = i64::MAX / 2;
        p.extra_sms_cents = i64::MAX / 2;
        assert_eq!(
            charge(&p, &Usage::of(5_001, 0, 101)),
            Err(Overflow("total"))
        );
        // The fee alone at the limit is fine.
        let mut p = plan();
        p.monthly_fee_cents = i64::MAX;
        assert_eq!(charge(&p, &Usage::default()).unwrap().total_cents, i64::MAX);
        assert_eq!(charge(&p, &Usage::of(5_001, 0, 0)), Err(Overflow("total")));
    }

    #[test]
    fn months_step_and_bound() {
        let jan = BillingMonth::new(2025, 1).unwrap();
        assert_eq!(jan.to_string(), "2025-01");
        assert_eq!(jan.prev(), BillingMonth::new(2024, 12));
        assert_eq!(jan.next(), BillingMonth::new(2025, 2));
        assert_eq!(BillingMonth::new(2024, 12).unwrap().next(), Some(jan));
        assert_eq!(BillingMonth::new(2025, 0), None);
        assert_eq!(BillingMonth::new(2025, 13), None);
        let last = BillingMonth::new(9999, 12).unwrap();
        assert_eq!(last.next(), None);
        assert_eq!(last.end(), None);
        assert_eq!(jan.end(), Some(BillingMonth::new(2025, 2).unwrap().start()));
    }

    #[test]
    fn an_instant_belongs_to_its_utc_month() {
        let last_moment = BillingMonth::new(2025, 2).unwrap().start() - time::Duration::NANOSECOND;
        assert_eq!(
            BillingMonth::containing(last_moment),
            BillingMonth::new(2025, 1).unwrap()
        );
        // 00:30 on 1 Feb at +01:00 is still January in UTC.
        let offset = time::UtcOffset::from_hms(1, 0, 0).unwrap();
        let local = BillingMonth::new(2025, 2)
            .unwrap()
            .start()
            .to_offset(offset)
            .replace_time(Time::from_hms(0, 30, 0).unwrap());
        assert_eq!(
            BillingMonth::containing(local),
            BillingMonth::new(2025, 1).unwrap()
        );
    }
}
