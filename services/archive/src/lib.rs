//! The usage archive: every `usage.recorded` event's record written exactly
//! once to date-partitioned, gzip-compressed JSON-lines files, surviving a
//! crash at any instant (see [`store`] for how), plus `check` and `restore`
//! against usage's database.
//!
//! - [`record`]: the archived JSON line and its validation;
//! - [`store`]: the directory (journal, day files, state) and its recovery;
//! - [`writer`]: the one writer thread, group commit and rolls;
//! - [`api`]: the gRPC services; [`serve`]: the server;
//! - [`check`], [`restore`], [`usage_db`]: the database commands.

pub mod api;
pub mod check;
pub mod record;
pub mod restore;
pub mod serve;
pub mod store;
pub mod usage_db;
pub mod writer;
