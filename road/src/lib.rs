//! The Junction wire protocol and the local Roads.
//!
//! A Road is a framed, bidirectional byte link between a Driver and its
//! Junction: the Junction's Unix stream socket, or the stdin/stdout pipes of a
//! child the Junction spawned. This crate holds everything both ends must agree
//! on, and nothing that decides what to do with a frame:
//!
//! - [`chained`]: bytes in two pieces, so that a large payload is never
//!   copied behind the headers put in front of it;
//! - [`frame`]: the frame types ([`Header`], [`Frame`]) and the values they carry;
//! - [`codec`]: the pure codec: [`codec::encode`] into a buffer and
//!   [`codec::decode`] out of one, with a distinct [`FrameError`] for every way a
//!   peer's bytes can be wrong;
//! - [`control`]: the requests the control port (port 0) answers;
//! - [`monitor`]: what monitors and the traffic counters see;
//! - [`highway`]: what junctions say to each other (routing, for now);
//! - [`session`]: the frames of end-to-end sessions between junctions;
//! - [`remote`]: what junctions say to each other about capabilities;
//! - [`secure`]: what a forwarded payload is: a session hello, a sealed
//!   session frame, or (keyless development) one in clear;
//! - `outbox`: encoded frames waiting for a link, drained by one writer;
//! - `transport`: async readers and writers over any byte stream, and the two
//!   local transports.
//!
//! The last two need tokio and sit behind the default `transport` feature;
//! without it the crate is the pure protocol.
//!
//! Every frame is a 4-byte big-endian length, a postcard-encoded [`Header`],
//! then the payload as raw bytes, which the Junction forwards without touching.
//! `docs/protocol.md` in the repository describes every frame byte by byte.

#![deny(unsafe_code)]

pub mod address;
pub mod chained;
pub mod codec;
pub mod control;
pub mod frame;
pub mod highway;
pub mod monitor;
#[cfg(feature = "transport")]
pub mod outbox;
pub mod pool;
pub mod remote;
pub mod secure;
pub mod session;
#[cfg(feature = "transport")]
mod sys;
#[cfg(feature = "transport")]
pub mod transport;

pub use address::{Address, AddressError};
pub use chained::Chained;
pub use codec::FrameError;
pub use frame::{
    Attenuate, Call, Deliver, ErrorCode, ErrorFrame, Frame, Granted, Header, Hello, Identity,
    MAGIC, PROTOCOL_VERSION, Reason, Rights, Send, Welcome,
};
#[cfg(feature = "transport")]
pub use transport::{DirectLink, RoadError, RoadReader, RoadWriter};

/// The default largest frame (length prefix excluded) a Junction accepts: 4 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 4 * 1024 * 1024;

/// The smallest maximum frame size a peer may announce; below it control
/// replies could not fit.
pub const MIN_MAX_FRAME: u32 = 64 * 1024;
