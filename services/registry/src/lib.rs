//! The Trellis control plane: the Registry API (instances under leases,
//! resolve and watch, the contracts they serve) and the Config API (route
//! policies, authorization rules and settings from a directory of files,
//! served live).

pub mod config;
pub mod contracts;
pub mod etcd;
pub mod metrics;
pub mod quota;
pub mod registry;
pub mod replicated;
pub mod store;
pub mod validate;
pub mod xds;

/// A `std` duration as a protobuf `Duration`. Every duration the registry
/// sends is bounded (TTLs by `validate::MAX_TTL`, config durations by
/// `config::MAX_DURATION`), far inside the protobuf range.
pub(crate) fn proto_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).expect("bounded durations fit a protobuf Duration")
}
