//! Highways: QUIC links between Junctions on different machines.
//!
//! The protocol logic is sans-IO, as quinn-proto is: pure Rust, no tokio,
//! no clock of its own, driven by a shell that owns the QUIC endpoint.
//!
//! - [`wire`]: what junctions exchange over a Highway, byte by byte: the
//!   control stream's frames, the data streams' frames, their framing, an
//!   incremental decoder and a batching encoder (docs/protocol.md,
//!   section 18).
//! - [`link`]: the link state machine, one per junction: hellos,
//!   admission, keep-alives and liveness, round-trip times, the redial
//!   schedule with backoff and the tie-break that keeps one connection per
//!   pair of junctions.

#![forbid(unsafe_code)]

pub mod link;

pub mod wire;
