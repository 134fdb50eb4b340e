//! The browser dashboard (`trellis dashboard`).

pub mod schema;
