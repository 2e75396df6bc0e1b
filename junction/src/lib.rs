//! The Junction: the broker daemon of a Junction bus.
//!
//! - [`core`]: the sans-IO state machine: port table, capability tables, the
//!   name registry and routing. Fed events, drained for frames to write.
//! - [`shell`]: the tokio shell that listens on the Unix socket, spawns
//!   children with stdio Roads, and moves frames between Roads and the core.
//! - [`children`]: spawning and ending child processes.
//! - [`config`]: the optional TOML configuration file.

pub mod children;
pub mod config;
pub mod core;
pub mod shell;
mod slab;
