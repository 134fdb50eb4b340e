//! The Trellis control plane: the Registry API (instances under leases,
//! resolve and watch, the contracts they serve) and the Config API (route
//! policies, authorization rules and settings from a directory of files,
//! served live).

pub mod config;
pub mod contracts;
pub mod registry;
pub mod validate;
