//! The settlement service of the reference billing application: users'
//! monthly bills, kept up to date from events.
//!
//! Settlement computes bills from its own database only, and keeps that
//! database current from the events it is delivered alone; it never calls
//! the user or usage service.
//!
//! - [`apply`]: `SettlementEventsService.Deliver`, applying
//!   "subscription.changed" (a subscription and its plan's terms) and
//!   "usage.recorded" (usage totals per user, UTC month and type) exactly
//!   once, through the library's inbox.
//! - [`api`]: `SettlementService.GetBill` / `ListBills`.
//! - [`billing`]: billing months and the arithmetic of a bill.
//! - [`store`]: the SQL.
//!
//! # The billing rule
//!
//! The bill for a month uses the plan in force at the **end** of that month:
//! the user's latest subscription that started before the first instant
//! (UTC) of the next month. The whole month's usage is rated at that plan; a
//! month in which no subscription had started by its end has no bill
//! (NOT_FOUND). The plan's fee is charged in full, not prorated. Lines come
//! in the order DATA, VOICE, SMS, each with
//! `billable = max(0, used - included)` and `amount = billable * rate`,
//! except that VOICE's billable seconds are rounded up to whole minutes
//! before being multiplied by the per-minute rate (its `billable_quantity`
//! stays in seconds). `total = plan fee + every line's amount`. Amounts are
//! `i64` cents computed with checked arithmetic: a bill that would overflow
//! is INTERNAL (and logged), never a wrong amount.
//!
//! A bill's `updated_at` and `last_event_id` are those of the last event
//! applied that changed it: the later of the last event of that month
//! (usage that occurred in it, a subscription starting in it) and the event
//! that stored the subscription the bill uses.

pub mod api;
pub mod apply;
pub mod billing;
pub mod store;
mod timestamp;

pub use api::BillingApi;
pub use apply::EventsApi;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The migrations of settlement's database (`migrations/`), for the bootstrap
/// to apply at start-up.
pub fn migrations() -> refinery::Runner {
    embedded::migrations::runner()
}
