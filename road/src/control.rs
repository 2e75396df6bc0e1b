//! The control port's requests and replies.
//!
//! Every Driver is born holding a capability to its Junction's control port
//! (handle 0). It calls it with a postcard-encoded [`ControlRequest`] as the
//! payload; the reply's payload is a postcard-encoded [`ControlReply`].

use junction_identity::{Certificate, ServiceName, Signature};
use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::frame::{ErrorCode, Identity};

/// The handle every Driver holds for its Junction's control port.
pub const CONTROL_HANDLE: u32 = 0;

/// A request to the control port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Register `name` for the capability passed as the call's only capability
    /// (it needs `send` and `grant`). Lookups hand out copies of it.
    Register {
        /// The name.
        name: ServiceName,
    },
    /// Remove a registration this connection made.
    Unregister {
        /// The name.
        name: ServiceName,
    },
    /// Get a capability for a registered name.
    Lookup {
        /// The name.
        name: ServiceName,
    },
    /// List ports, connections and names (behind `junction ls`).
    List,
    /// Prove this connection's identity: a certificate chain (leaf first)
    /// and a signature over the Welcome's nonce with the leaf's key (see
    /// `junction_identity::prove_possession`).
    Authenticate {
        /// The chain, leaf first.
        chain: Vec<Certificate>,
        /// The proof of possession.
        proof: Signature,
    },
}

/// The control port's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    /// The name is registered.
    Registered,
    /// The name is no longer registered.
    Unregistered,
    /// The capability for the name is the reply's only capability.
    Found {
        /// The address of the service's port.
        address: Address,
        /// The certificate chain the service proved when it registered, so
        /// the caller can check whom it talks to, end to end. `None` for a
        /// name in a development namespace.
        chain: Option<Vec<Certificate>>,
    },
    /// The identity is proven for this connection.
    Authenticated(Identity),
    /// What `List` asked for.
    Listing(Listing),
    /// The request was refused.
    Refused {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
}

/// A snapshot of a Junction, for `junction ls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    /// This junction's id.
    pub junction: u16,
    /// Every open port.
    pub ports: Vec<PortInfo>,
    /// Every connection.
    pub connections: Vec<ConnectionInfo>,
    /// Ports left out: the whole listing must fit in one frame, so past
    /// `max_frame` it shows the first ports and connections that fit (each
    /// side gets at least half) and counts the rest here.
    pub more_ports: u32,
    /// Connections left out, likewise.
    pub more_connections: u32,
}

/// One port in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortInfo {
    /// Its address.
    pub address: Address,
    /// The connection that owns it (`None` for the control port).
    pub owner: Option<u64>,
    /// Messages delivered to the owner and not yet consumed.
    pub queued: u32,
    /// Capabilities that can send to it.
    pub senders: u32,
    /// Capabilities whose holders watch it (asked to hear of its death).
    pub watchers: u32,
    /// The names registered for it.
    pub names: Vec<String>,
    /// Whether it is its owner's home port.
    pub home: bool,
}

/// One connection in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The connection id.
    pub id: u64,
    /// The label from its Hello.
    pub label: String,
    /// How it is attached: `unix`, `stdio`.
    pub road: String,
    /// Process id, when the Road knows it.
    pub pid: Option<u32>,
    /// User id, when the Road knows it.
    pub uid: Option<u32>,
    /// Its home port.
    pub home: Address,
    /// Ports it owns.
    pub ports: u32,
    /// Capability handles it holds.
    pub handles: u32,
    /// Of those, reply capabilities (calls it was made and has not
    /// answered); they do not count against `max_handles`.
    pub replies: u32,
    /// Its calls waiting for a reply.
    pub pending_calls: u32,
    /// Its proven key, if it authenticated.
    pub identity: Option<String>,
}
