//! End-to-end tests of the billing system on the mesh live in `tests/`;
//! this crate has no code of its own.
