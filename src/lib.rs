//! Trellis: a gRPC-first service mesh.
//!
//! This crate is what every Trellis component shares: the code generated
//! from the contracts in `proto/` ([`pb`]), workload identity ([`identity`])
//! and mutual TLS ([`tls`]), the development CA ([`certs`]), logging
//! ([`telemetry`]) and the bootstrap every gRPC server uses ([`server`]).

pub mod certs;
pub mod cli;
pub mod identity;
pub mod pb;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod tls;

pub use identity::{IdentityError, IdentityPaths, SpiffeId, Workload};
