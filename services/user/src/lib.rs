//! The user service of the reference billing application: users
//! (subscribers identified by their phone number), the plan catalogue, and
//! which plan each user is on when (`telco.user.v1.UserService`).
//!
//! Every change and the event announcing it ("user.created",
//! "subscription.changed", keyed by user ID) are written in one transaction
//! through the library's outbox; `telco.user.v1.UserOutboxService` is the
//! operator API of that outbox.

pub mod api;
pub mod store;
pub mod validate;

use trellis::service::ServiceSpec;

pub use api::{Api, OutboxApi};

/// The SQL migrations in `migrations/`, compiled in.
pub mod embedded {
    refinery::embed_migrations!("migrations");
}

/// What the user service is, for the bootstrap.
pub static SPEC: ServiceSpec = ServiceSpec {
    name: "user",
    grpc_services: &[
        "telco.user.v1.UserService",
        "telco.user.v1.UserOutboxService",
    ],
    migrations: embedded::migrations::runner,
    publishes_events: true,
};
