//! Highways: QUIC links between Junctions on different machines.
//!
//! Nothing is implemented yet. This crate holds the place DESIGN.md gives
//! it in the workspace (between `road` and `junction`), so that the
//! dependency order is fixed from the start; the Highways issue fills it
//! with the QUIC endpoint, peer authentication with bus identities, link
//! framing and reconnection. Until then a junction has no Highways and
//! this crate exports nothing.

#![forbid(unsafe_code)]
