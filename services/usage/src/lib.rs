//! The usage service of the reference billing application.
//!
//! It records what users consume (mobile data, voice, text messages), one
//! record per network event, idempotently per client key, for users the
//! user service says have a plan in force; each new record is announced as a
//! `usage.recorded` event through the transactional outbox, to settlement
//! and archive. It lists and totals a user's records.
//!
//! - [`domain`]: what a valid request is (INVALID_ARGUMENT with every bad
//!   field), and the protobuf conversions;
//! - [`store`]: the SQL over `usage_records`;
//! - [`subscribers`]: the check with the user service, and its cache;
//! - [`api`]: the gRPC services.
//!
//! Settings (`[settings]` of the service's config, or `--setting`):
//! `max_page_size` (the most ListUsage returns, and what `limit` 0 means;
//! default 500) and the library's `subscribers` table of who receives
//! `usage.recorded`.

pub mod api;
pub mod domain;
pub mod store;
pub mod subscribers;

pub use api::{OutboxApi, UsageApi};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The service's database migrations (`migrations/`), for the bootstrap to
/// apply at start-up.
pub fn migrations() -> refinery::Runner {
    embedded::migrations::runner()
}
