//! Frame types: the [`Header`] of every frame and the values it carries.
//!
//! Headers are encoded with postcard; enum variants are numbered in the order
//! they are declared here, so the order is part of the protocol: add new
//! variants at the end only.

use std::sync::Arc;

use bytes::Bytes;
use junction_identity::{PublicKey, ServiceName};
use serde::{Deserialize, Serialize};

use crate::address::Address;

/// The four bytes `JNCT` that open every Hello, so that a stray client of
/// another protocol is told apart from a Junction driver at once.
pub const MAGIC: [u8; 4] = *b"JNCT";

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 3;

/// The most capabilities one message may carry.
pub const MAX_CAPS_PER_MESSAGE: usize = 64;

/// How much larger than the largest frame a Driver accepts a frame from the
/// Junction: a `Deliver` header (with up to [`MAX_CAPS_PER_MESSAGE`]
/// capabilities) is larger than the `Send` header it replaces.
pub const DELIVER_SLACK: u32 = 4096;

/// Bytes of payload that one credit unit pays for, beyond the first.
pub const CREDIT_UNIT_BYTES: usize = 16 * 1024;

/// The send credits a message with `payload_len` bytes of payload costs:
/// one, plus one for every whole 16 KiB. Counting bytes as well as messages
/// keeps what a window lets into the Junction bounded in both.
///
/// ```
/// use junction_road::frame::credit_cost;
/// assert_eq!(credit_cost(0), 1);
/// assert_eq!(credit_cost(64), 1);
/// assert_eq!(credit_cost(16 * 1024), 2);
/// assert_eq!(credit_cost(1 << 20), 65);
/// ```
pub fn credit_cost(payload_len: usize) -> u32 {
    1 + u32::try_from(payload_len / CREDIT_UNIT_BYTES).unwrap_or(u32::MAX - 1)
}

/// One frame: a header and the payload bytes that follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// What the frame is.
    pub header: Header,
    /// The raw payload; empty for most control frames. The Junction forwards
    /// it without re-encoding.
    pub payload: Bytes,
}

impl Frame {
    /// A frame with no payload.
    pub fn bare(header: Header) -> Self {
        Self {
            header,
            payload: Bytes::new(),
        }
    }

    /// A frame with a payload.
    pub fn with_payload(header: Header, payload: Bytes) -> Self {
        Self { header, payload }
    }
}

/// The header of a frame. Arrows say who sends it: D is a Driver, J the Junction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Header {
    /// D→J, first frame: who is speaking and which protocol.
    Hello(Hello),
    /// J→D, answer to a good Hello: the limits of this connection.
    Welcome(Welcome),
    /// D→J: open a new port; the Driver holds its receive right.
    OpenPort {
        /// Request id, echoed in the answer.
        req: u32,
    },
    /// J→D: the port is open.
    PortOpened {
        /// Request id of the `OpenPort`.
        req: u32,
        /// The new port's address.
        address: Address,
    },
    /// D→J: close a port this Driver owns. Every capability to it dies.
    ClosePort {
        /// The port number.
        port: u16,
    },
    /// J→D: a port this Driver owned is closed.
    PortClosed {
        /// The port number.
        port: u16,
        /// Why it closed.
        reason: Reason,
    },
    /// D→J: mint a capability to a port this Driver owns.
    Mint {
        /// Request id, echoed in the answer.
        req: u32,
        /// The port number.
        port: u16,
        /// The rights of the new capability.
        rights: Rights,
    },
    /// J→D: the minted capability's handle.
    Minted {
        /// Request id of the `Mint`.
        req: u32,
        /// The new handle.
        handle: u32,
        /// The window of the lane it sends on, which the Driver's lane to
        /// the port starts with if it has none (1 for send-once).
        credits: u32,
    },
    /// D→J: forget a capability handle.
    Drop {
        /// The handle.
        handle: u32,
    },
    /// D→J: tell me when the port behind this handle dies.
    Watch {
        /// The handle.
        handle: u32,
    },
    /// J→D: a watched capability is dead.
    Dead {
        /// The handle.
        handle: u32,
        /// Why.
        reason: Reason,
    },
    /// D→J: send the payload to the port behind a capability.
    Send(Send),
    /// D→J: send the payload as a call; the receiver gets a send-once reply
    /// capability whose reply comes back to the caller's home port with `tag`.
    Call(Call),
    /// J→D: a message for one of this Driver's ports.
    Deliver(Deliver),
    /// D→J: the oldest `count` messages delivered to `port` have been consumed.
    Credit {
        /// The port number.
        port: u16,
        /// How many messages.
        count: u32,
    },
    /// J→D: `count` more credit units may be spent on the lane to `port`:
    /// every metered capability this Driver holds to that port shares them.
    SendCredit {
        /// The port the lane sends to.
        port: Address,
        /// How many credit units (see [`credit_cost`]).
        count: u32,
    },
    /// J→D: messages this Driver sent were not delivered.
    Undeliverable {
        /// The handle they were sent on.
        handle: u32,
        /// The per-handle sequence number of the first.
        first_seq: u64,
        /// How many consecutive messages from `first_seq`.
        count: u32,
        /// Why.
        reason: Reason,
    },
    /// J→D: a call made with `tag` will get no reply.
    CallFailed {
        /// The call's tag.
        tag: u64,
        /// Why.
        reason: Reason,
    },
    /// J→D: a request was refused, or a frame was bad.
    Error(ErrorFrame),
    /// Either way: are you there?
    Ping {
        /// Echoed in the Pong.
        nonce: u64,
    },
    /// Either way: answer to a Ping.
    Pong {
        /// The Ping's nonce.
        nonce: u64,
    },
    /// J→D: the Junction is closing this connection, and why.
    Goodbye {
        /// What happened, for a person.
        reason: String,
    },
    /// D→J: make a narrower capability from one this Driver holds: fewer
    /// rights, an expiry, a message budget, and optionally revocable. The
    /// answer is `Minted`.
    Attenuate(Attenuate),
    /// D→J: revoke the revocable capability `handle` (made with
    /// `Attenuate { revocable: true }`): it and every capability derived
    /// from it die with [`Reason::Revoked`].
    Revoke {
        /// The handle of the revocable root.
        handle: u32,
    },
    /// D→J: tell me once when no capability to this port I own is left in
    /// any table ("no senders", as in Mach). A registered name does not
    /// count: lookups can make new ones.
    WatchSenders {
        /// The port number.
        port: u16,
    },
    /// J→D: the port has no senders left (answers `WatchSenders` once).
    NoSenders {
        /// The port number.
        port: u16,
    },
    /// D→J: the caller gives up on its call `tag` (a timeout): it stops
    /// counting as pending, and the callee's reply capability dies.
    /// Answered with `CallFailed { tag, Cancelled }` unless the reply is
    /// already on its way.
    Cancel {
        /// The call's tag.
        tag: u64,
    },
    /// J→D: this connection's proven identity was taken away (its
    /// certificate was revoked by a reloaded revocation list, or expired),
    /// and with it every name it had registered. The connection and its
    /// ports live on, anonymous. A driver that does not know this frame
    /// skips it as a bad header, as for any frame it cannot decode.
    IdentityWithdrawn {
        /// The names the connection lost with it.
        names: Vec<ServiceName>,
        /// Why, for people (e.g. "certificate 0x1f has been revoked").
        reason: String,
    },
}

/// A request for a narrower capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attenuate {
    /// Request id, echoed in the answer.
    pub req: u32,
    /// The capability to narrow.
    pub handle: u32,
    /// The rights to keep: a subset of the original's.
    pub rights: Rights,
    /// Seconds since the Unix epoch from which it is dead; no later than
    /// the original's expiry.
    pub expires_at: Option<u64>,
    /// How many messages it may send; no more than the original's budget.
    /// A budgeted capability moves when passed on, never copies.
    pub max_messages: Option<u32>,
    /// Whether the new capability is the root of a revocable lineage: the
    /// requester may later `Revoke` it and everything derived from it.
    pub revocable: bool,
}

/// The first frame a Driver sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`MAGIC`].
    pub magic: [u8; 4],
    /// The protocol version the Driver speaks.
    pub version: u16,
    /// The largest frame the Driver accepts.
    pub max_frame: u32,
    /// A label for diagnostics (`junction ls`), such as the program name.
    pub label: String,
}

/// The Junction's answer to a good Hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version in use.
    pub version: u16,
    /// This junction's id.
    pub junction: u16,
    /// The Driver's home port: the origin of what it sends, and where replies
    /// to its calls arrive.
    pub home: Address,
    /// The largest frame the Junction accepts from this Driver.
    pub max_frame: u32,
    /// Send credits of each lane (all of a Driver's metered capabilities to
    /// one port), in units of [`credit_cost`].
    pub window: u32,
    /// The most capability handles this connection may hold.
    pub max_handles: u32,
    /// The most ports this connection may own.
    pub max_ports: u32,
    /// The most calls this connection may have waiting for a reply.
    pub max_pending_calls: u32,
    /// Fresh random bytes for this connection: what a proof of key
    /// possession signs (see the control port's `Authenticate`).
    pub nonce: [u8; 32],
}

/// A one-way message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Send {
    /// The capability to send on.
    pub handle: u32,
    /// Capabilities to pass along (at most [`MAX_CAPS_PER_MESSAGE`]); each
    /// needs the `grant` right. Send-once capabilities move; others are copied.
    pub caps: Vec<u32>,
}

/// A call: a message with a reply capability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// The capability to call on.
    pub handle: u32,
    /// Chosen by the caller; the reply (or `CallFailed`) carries it back.
    pub tag: u64,
    /// Capabilities to pass along, as in [`Send`].
    pub caps: Vec<u32>,
}

/// A message delivered to a port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deliver {
    /// The receiving port's number.
    pub port: u16,
    /// The sender's home port, stamped by the Junction; cannot be forged.
    pub origin: Address,
    /// For a reply: the tag of the call it answers; 0 otherwise.
    pub tag: u64,
    /// For a call: the send-once capability to reply with.
    pub reply: Option<u32>,
    /// Capabilities that came with the message, now in the receiver's table.
    pub caps: Vec<Granted>,
    /// Set when the sender would soon stall (low on credit, or for a reply,
    /// its caller has many calls pending): the receiver should report
    /// consumption (`Credit`) as soon as it has consumed this message.
    pub ack: bool,
    /// The sender's proven identity, stamped by the Junction when the
    /// sender authenticated; it cannot be forged.
    pub identity: Option<Arc<Identity>>,
}

/// A proven identity, as deliveries carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The key the sender proved it holds.
    pub key: PublicKey,
    /// The names its certificate grants (empty for clients).
    pub names: Vec<ServiceName>,
}

/// A capability handed to a Driver inside a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    /// Its handle in the receiver's table.
    pub handle: u32,
    /// Its rights.
    pub rights: Rights,
    /// The window of the lane it sends on, which the Driver's lane to the
    /// port starts with if it has none (1 for send-once).
    pub credits: u32,
    /// The address of the port it reaches: what names its lane.
    pub address: Address,
    /// Whether it moves when passed on (send-once, or a message budget):
    /// once its holder attaches it to a message, the holder no longer has it.
    pub moves: bool,
}

/// An error: which request failed or which frame was bad, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The request id it answers, or 0 when it answers no request.
    pub req: u32,
    /// The handle concerned, or `u32::MAX` when none.
    pub handle: u32,
    /// The tag of the call it answers, or 0 when it answers no call.
    pub tag: u64,
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people.
    pub message: String,
}

/// The rights a capability carries, a small bit set.
///
/// ```
/// use junction_road::Rights;
/// let r = Rights::SEND | Rights::GRANT;
/// assert!(r.contains(Rights::SEND));
/// assert!(!r.contains(Rights::SEND_ONCE));
/// assert_eq!(r.to_string(), "send+grant");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rights(u8);

impl Rights {
    /// No rights.
    pub const NONE: Rights = Rights(0);
    /// May send any number of messages.
    pub const SEND: Rights = Rights(1);
    /// May send exactly one message (a reply); consumed by its use.
    pub const SEND_ONCE: Rights = Rights(2);
    /// May be passed on inside a message.
    pub const GRANT: Rights = Rights(4);
    const KNOWN: u8 = 0b111;

    /// Rights from their bits; unknown bits are refused.
    pub fn from_bits(bits: u8) -> Option<Rights> {
        (bits & !Self::KNOWN == 0).then_some(Rights(bits))
    }

    /// The bits.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether every right in `other` is in `self`.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the bits are all known and the set is one a capability can
    /// have: some way to send, but not both `send` and `send-once`.
    pub fn is_valid(self) -> bool {
        Self::from_bits(self.0).is_some()
            && (self.contains(Self::SEND) != self.contains(Self::SEND_ONCE))
    }
}

impl std::ops::BitOr for Rights {
    type Output = Rights;
    fn bitor(self, rhs: Rights) -> Rights {
        Rights(self.0 | rhs.0)
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.contains(Rights::SEND) {
            parts.push("send");
        }
        if self.contains(Rights::SEND_ONCE) {
            parts.push("send-once");
        }
        if self.contains(Rights::GRANT) {
            parts.push("grant");
        }
        if parts.is_empty() {
            parts.push("none");
        }
        f.write_str(&parts.join("+"))
    }
}

/// Why a port, a capability or a call died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// Its owner closed the port.
    PortClosed,
    /// The process that owned the port went away.
    OwnerGone,
    /// The capability was revoked.
    Revoked,
    /// The capability expired.
    Expired,
    /// The receiver dropped a call's reply capability without replying.
    ReplyDropped,
    /// The Junction is shutting down.
    Shutdown,
    /// The capability used up its message budget.
    Exhausted,
    /// The caller gave up on the call (`Cancel`).
    Cancelled,
    /// The port's junction restarted: the port is gone with its earlier
    /// life, and nothing in flight to it was consumed.
    JunctionRestarted,
    /// The port's junction could not be reached for too long: a message
    /// reported with this reason may or may not have been consumed.
    JunctionUnreachable,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::PortClosed => "the port was closed by its owner",
            Reason::OwnerGone => "the process that owned the port went away",
            Reason::Revoked => "the capability was revoked",
            Reason::Expired => "the capability expired",
            Reason::ReplyDropped => "the receiver dropped the call without replying",
            Reason::Shutdown => "the junction is shutting down",
            Reason::Exhausted => "the capability used up its message budget",
            Reason::Cancelled => "the caller gave up on the call",
            Reason::JunctionRestarted => {
                "the port's junction restarted; nothing in flight to it was consumed"
            }
            Reason::JunctionUnreachable => {
                "the port's junction could not be reached; a message in flight may or may not have been consumed"
            }
        })
    }
}

/// What went wrong, in an [`ErrorFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The first frame was not a good Hello (wrong magic or another frame).
    HandshakeRequired,
    /// The Hello asked for a protocol version this Junction does not speak.
    UnsupportedVersion,
    /// The frame's header could not be decoded.
    BadHeader,
    /// The frame was larger than the limit given in the Welcome.
    FrameTooLarge,
    /// The frame is not one a Driver may send (e.g. a `Deliver`).
    UnexpectedFrame,
    /// No capability has that handle in this connection's table.
    UnknownHandle,
    /// This connection owns no port with that number.
    UnknownPort,
    /// The capability does not carry the right needed (send, or grant to pass it on).
    MissingRight,
    /// The rights asked for are not a valid set.
    BadRights,
    /// The capability has no send credit left: wait for `SendCredit`.
    NoCredit,
    /// The connection holds as many handles as it may.
    TooManyHandles,
    /// The connection owns as many ports as it may.
    TooManyPorts,
    /// The connection has as many calls waiting as it may.
    TooManyPendingCalls,
    /// A message carried the same capability twice, or its own reply capability.
    BadCapabilityList,
    /// The control port only answers calls, with a valid request.
    BadControlRequest,
    /// The name is registered already.
    NameTaken,
    /// No service is registered under that name.
    NameNotFound,
    /// Registering needs exactly one capability, with send and grant rights.
    BadRegistration,
    /// A call's tag was 0, which means "no call".
    BadTag,
    /// The certificate chain did not verify (untrusted, expired, not yet
    /// valid, tampered, outside its issuer's patterns).
    BadCertificate,
    /// A certificate of the chain is revoked.
    CertificateRevoked,
    /// The proof of possession does not verify (wrong key, or made for
    /// another connection).
    BadProof,
    /// The name is not granted to this connection's proven identity.
    NameNotGranted,
    /// This connection already proved an identity.
    AlreadyAuthenticated,
    /// The connecting user may not use this junction.
    NotAllowed,
    /// An attenuation asked for more than the original capability has.
    CannotWiden,
    /// The capability is not a revocable root this connection made.
    NotRevocable,
}
