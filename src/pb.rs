//! Code generated from the contracts in `proto/`. Nothing hand-written lives
//! here; conversions to domain types are written beside the code that uses
//! them.

#![allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]

include!(concat!(env!("OUT_DIR"), "/_includes.rs"));

/// The encoded `FileDescriptorSet` of every contract in `proto/`, with
/// source comments and all imports (well-known types included). Served by
/// server reflection and registered with the registry.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trellis_descriptor.bin"));
