//! Junction bus identities.
//!
//! This crate holds the parts of a bus identity that need no I/O. Today that
//! is the validated [`ServiceName`] services register under. Keys,
//! certificates, proofs of possession and capability tokens join it with the
//! identity issue; nothing here pretends to check signatures yet.

#![forbid(unsafe_code)]

mod name;

pub use name::{MAX_NAME_LEN, NameError, ServiceName};
