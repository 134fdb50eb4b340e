//! Trellis: a gRPC-first service mesh.
//!
//! This crate is what every Trellis component shares: the code generated
//! from the contracts in `proto/` ([`pb`]), workload identity ([`identity`])
//! and mutual TLS ([`tls`]), the development CA ([`certs`]), logging
//! and traces ([`telemetry`], [`rpc_trace`], [`trace_context`]), the bootstrap every gRPC
//! server uses ([`server`]), and for services with
//! a database: PostgreSQL ([`db`]), the service bootstrap ([`service`]) and
//! events through an outbox and inbox ([`events`]).

pub mod certs;
pub mod cli;
pub mod contract;
pub mod dashboard;
pub mod db;
pub mod events;
pub mod identity;
pub mod mesh_status;
pub mod metrics_http;
pub mod pb;
pub mod rpc_trace;
pub mod server;
pub mod service;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod top;
pub mod trace_context;
pub mod up;

pub use identity::{IdentityError, IdentityPaths, SpiffeId, Workload};
