//! The Junction: the broker daemon of a Junction bus.
//!
//! - [`core`] (the `junction-core` crate): the sans-IO state machine: port table, capability tables, the
//!   name registry and routing. Fed events, drained for frames to write.
//! - [`shell`]: the tokio shell that listens on the Unix socket, spawns
//!   children with stdio Roads, and moves frames between Roads and the core.
//! - [`children`]: spawning and ending child processes.
//! - [`config`]: the optional TOML configuration file.
//! - [`admit`]: who may take a connection slot (global and per-user limits,
//!   and the slot kept for the junction's own user).
//! - [`authority`]: a bus authority made on the spot, for demos and tests.
//! - [`highway`]: the QUIC endpoint of the junction's Highways to others.
//! - [`service`]: running under systemd (socket activation, readiness),
//!   the socket's mode and group, and reloads.
//! - [`metrics`]: the opt-in Prometheus endpoint for the traffic counters.
//! - [`relay`]: a UDP relay that cuts a Highway on demand, for the tests
//!   and the benchmark.

pub mod admit;
pub mod authority;
pub mod children;
pub mod config;
pub use junction_core as core;
pub mod highway;
pub mod metrics;
mod ratelog;
pub mod relay;
pub mod service;
pub mod shell;

/// A new life's incarnation: its start time in Unix milliseconds. Peers
/// take a greater incarnation for a restart; in seconds, a junction
/// restarted within the second it last started would look like its
/// earlier life, and its first messages, numbered from 0 again, would be
/// dropped as already delivered.
pub fn new_incarnation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch: the clock certificates and capability
/// expiries are read against.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
