//! The Junction: the broker daemon of a Junction bus.
//!
//! - [`core`]: the sans-IO state machine: port table, capability tables, the
//!   name registry and routing. Fed events, drained for frames to write.
//! - [`shell`]: the tokio shell that listens on the Unix socket, spawns
//!   children with stdio Roads, and moves bytes between Roads and the core.
//! - [`cli`]: the `junction` command.

pub mod core;
mod slab;
