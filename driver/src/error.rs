//! The Driver's one error type.

use std::path::PathBuf;
use std::time::Duration;

use junction_road::{ErrorCode, Reason};

/// Everything that can go wrong for a Driver user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Junction's socket could not be reached.
    #[error("could not reach the junction at {}: {source}; is `junction serve` running there? (set JUNCTION_SOCKET to point elsewhere)", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The Junction did not accept the connection, or did not answer the
    /// handshake, in time.
    #[error("the junction at {} did not answer within {waited:?}; it may be stopped, wedged or overloaded (check that `junction serve` is running and responsive)", path.display())]
    NoAnswer {
        /// The socket path tried.
        path: PathBuf,
        /// How long the driver waited.
        waited: Duration,
    },
    /// stdin/stdout could not be used as a Road.
    #[error("could not attach over stdin/stdout: {0}")]
    Stdio(std::io::Error),
    /// The blocking facade could not start its runtime.
    #[error("could not start the blocking driver's runtime: {0}")]
    Runtime(std::io::Error),
    /// The Junction refused the handshake.
    #[error("the junction refused the handshake: {0}")]
    Handshake(String),
    /// The connection to the Junction is gone.
    #[error("the connection to the junction is closed: {reason}")]
    Closed {
        /// What happened.
        reason: String,
    },
    /// The Junction refused a request.
    #[error("the junction refused: {message} ({code:?})")]
    Refused {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// The port behind a capability is gone.
    #[error("the capability is dead: {0}")]
    Dead(Reason),
    /// A call will get no reply.
    #[error("the call failed: {0}")]
    CallFailed(Reason),
    /// No reply came in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// A capability without `grant` cannot be passed on.
    #[error("capability {handle} has rights {rights} without grant, so it cannot be passed on")]
    NotGrantable {
        /// Its handle.
        handle: u32,
        /// Its rights.
        rights: junction_road::Rights,
    },
    /// The capability moves when passed on (send-once, or a message
    /// budget) and this Driver passed it on or used it up already.
    #[error(
        "capability {handle} is no longer held by this driver: it moves when passed on (send-once, or with a message budget) and was already attached to a message or used up; nothing was sent"
    )]
    Moved {
        /// Its handle.
        handle: u32,
    },
    /// A reply capability was used already.
    #[error("this message was replied to already, or was not a call")]
    NoReply,
    /// The name is not a valid service name.
    #[error(transparent)]
    Name(#[from] junction_identity::NameError),
    /// A value could not be encoded.
    #[error("could not encode the message: {0}")]
    Encode(postcard::Error),
    /// A payload was not the expected type.
    #[error("could not decode the message: {0}")]
    Decode(postcard::Error),
    /// A payload is larger than the Junction accepts in one message.
    #[error(
        "a payload of {len} bytes is larger than the {max} bytes one message may carry; send it in parts"
    )]
    TooLarge {
        /// Its length.
        len: usize,
        /// The most one message may carry.
        max: usize,
    },
    /// A policy refused the sender.
    #[error("not allowed: {0}")]
    Denied(String),
    /// Key or certificate files could not be used.
    #[error(transparent)]
    Identity(#[from] junction_identity::IdentityError),
    /// The Junction sent something this Driver did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
}
