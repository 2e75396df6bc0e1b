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
    /// List ports, connections, names, Highways, routes and sessions
    /// (behind `junction ls`).
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
    /// Reload the revocation list and the configuration file (what
    /// `junction reload` and SIGHUP do). Only a connection of the junction's
    /// own user, or root, may ask.
    Reload,
    /// Deliver a [`MonitorEvent`](crate::monitor::MonitorEvent) for every
    /// message this junction sees to `port`, a port this connection owns,
    /// until it closes. Only the junction's own user (or root), or an
    /// identity granted `junction.monitor`, may.
    Monitor {
        /// The port the events go to.
        port: u16,
        /// Which messages.
        filter: crate::monitor::MonitorFilter,
        /// Whether events carry payloads (the junction's own user, root, or
        /// an identity granted `junction.monitor.payload`).
        payloads: bool,
    },
    /// The traffic counters (behind `junction top` and the metrics endpoint).
    Traffic,
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
    /// What `Reload` did.
    Reloaded(ReloadReport),
    /// Events now go to the port named in `Monitor`.
    Monitoring {
        /// Whether they carry payloads.
        payloads: bool,
        /// How many events may wait unconsumed before the junction drops.
        queue: u32,
    },
    /// What `Traffic` asked for.
    Traffic(crate::monitor::TrafficReport),
}

/// What a reload did: one line per change applied, one per problem (a file
/// that did not load keeps what was in force; a setting that needs a
/// restart stays as it was).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// What changed, for people.
    pub applied: Vec<String>,
    /// What could not be applied, and why, for people.
    pub failed: Vec<String>,
}

/// A snapshot of a Junction, for `junction ls`. Fields are only ever
/// added at the end, so that an older decoder still reads it
/// (docs/protocol.md 8.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    /// This junction's id.
    pub junction: u16,
    /// Every open port.
    pub ports: Vec<PortInfo>,
    /// Every connection.
    pub connections: Vec<ConnectionInfo>,
    /// Ports left out: the whole listing must fit in one frame, so past
    /// `max_frame` it shows the first ports and connections that fit in
    /// what Highways, routes and sessions leave (each side gets at least
    /// half of it) and counts the rest here.
    pub more_ports: u32,
    /// Connections left out, likewise.
    pub more_connections: u32,
    /// The Highways to neighbour junctions, as the junction's shell last
    /// reported them (empty for a junction with none).
    pub highways: Vec<HighwayInfo>,
    /// The routes to every junction routing reaches, by destination.
    pub routes: Vec<RouteInfo>,
    /// The end-to-end sessions with other junctions, by junction.
    pub sessions: Vec<SessionInfo>,
    /// Highways left out to fit the frame.
    pub more_highways: u32,
    /// Routes left out to fit the frame.
    pub more_routes: u32,
    /// Sessions left out to fit the frame.
    pub more_sessions: u32,
    /// Names that listed ports lost while they lived, because the identity
    /// that registered them was withdrawn (its certificate revoked or
    /// expired): so `junction ls` can show the loss instead of a blank.
    pub withdrawn: Vec<WithdrawnName>,
    /// Withdrawn names left out to fit the frame.
    pub more_withdrawn: u32,
}

/// A name a port lost with its registrant's identity, in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawnName {
    /// The port that had the name.
    pub port: Address,
    /// The name.
    pub name: String,
    /// Why it was withdrawn, for people.
    pub reason: String,
}

/// One Highway (a QUIC link to a neighbour junction) in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighwayInfo {
    /// The neighbour's junction id.
    pub junction: u16,
    /// Its address (`host:port`), when known.
    pub address: Option<String>,
    /// Where the link stands.
    pub state: HighwayState,
    /// The smoothed round-trip time, in microseconds, once measured.
    pub rtt_us: Option<u64>,
    /// Bytes sent on its current connection.
    pub bytes_out: u64,
    /// Bytes received on its current connection.
    pub bytes_in: u64,
}

/// Where a [`HighwayInfo`]'s link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HighwayState {
    /// Linked: the neighbour was admitted and routes use the link.
    Up,
    /// A connection is open, the neighbour not yet admitted.
    Connecting,
    /// Dialing the neighbour.
    Dialing,
    /// Waiting to dial again (backoff), or for the neighbour to dial.
    Waiting,
}

impl HighwayState {
    /// Its name as `junction ls` prints it: `up`, `connecting`, `dialing`,
    /// `waiting`.
    pub fn as_str(self) -> &'static str {
        match self {
            HighwayState::Up => "up",
            HighwayState::Connecting => "connecting",
            HighwayState::Dialing => "dialing",
            HighwayState::Waiting => "waiting",
        }
    }
}

impl std::fmt::Display for HighwayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One route in a [`Listing`]: how this junction reaches another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The destination junction.
    pub junction: u16,
    /// The neighbour its traffic goes to first.
    pub next_hop: u16,
    /// The sum of the links' costs.
    pub cost: u64,
    /// The junctions after this one, the destination last.
    pub path: Vec<u16>,
    /// The incarnation the destination last described itself in.
    pub incarnation: u64,
}

/// One end-to-end session with another junction in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The other junction.
    pub junction: u16,
    /// Its incarnation as the session knows it (0 before it was heard).
    pub incarnation: u64,
    /// Lanes this junction sends on.
    pub lanes_out: u32,
    /// Lanes it receives on.
    pub lanes_in: u32,
    /// Messages sent and not yet acknowledged, over all lanes.
    pub unacked: u32,
    /// Whether its frames travel sealed.
    pub sealing: Sealing,
    /// Handshakes completed (keys put in use).
    pub handshakes: u64,
    /// Traffic the channel refused: frames that did not open, replays,
    /// refused hellos, malformed envelopes.
    pub refused: u64,
    /// Ports of that junction this one holds capabilities to (imports).
    pub imports: u32,
    /// Capabilities to this junction's ports that junction holds
    /// (exports, one per anchor).
    pub exports: u32,
}

/// Whether a [`SessionInfo`]'s frames travel sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sealing {
    /// In clear: the junction has no junction key.
    Clear,
    /// Sealed, but the handshake has not given keys yet: the session
    /// holds its frames.
    Keying,
    /// Sealed under keys in use.
    Sealed,
    /// In clear inside the Highway's TLS: the peer is a neighbour and the
    /// route to it is their Highway alone, which authenticates and encrypts
    /// the whole way (keys are still agreed, for a route through others).
    Direct,
}

impl Sealing {
    /// Its name as `junction ls` prints it: `clear`, `keying`, `sealed`,
    /// `direct`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sealing::Clear => "clear",
            Sealing::Keying => "keying",
            Sealing::Sealed => "sealed",
            Sealing::Direct => "direct",
        }
    }
}

impl std::fmt::Display for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `Listing` example in docs/protocol.md section 8.4, byte for byte;
    /// and a decoder that knows only the first five fields reads it too.
    #[test]
    fn a_listing_encodes_as_documented() {
        let listing = Listing {
            junction: 1,
            ports: vec![],
            connections: vec![],
            more_ports: 0,
            more_connections: 0,
            highways: vec![HighwayInfo {
                junction: 2,
                address: Some("b:1".into()),
                state: HighwayState::Up,
                rtt_us: Some(300),
                bytes_out: 1,
                bytes_in: 2,
            }],
            routes: vec![RouteInfo {
                junction: 3,
                next_hop: 2,
                cost: 2,
                path: vec![2, 3],
                incarnation: 5,
            }],
            sessions: vec![SessionInfo {
                junction: 3,
                incarnation: 5,
                lanes_out: 1,
                lanes_in: 1,
                unacked: 0,
                sealing: Sealing::Sealed,
                handshakes: 1,
                refused: 0,
                imports: 1,
                exports: 0,
            }],
            more_highways: 0,
            more_routes: 0,
            more_sessions: 0,
            withdrawn: vec![],
            more_withdrawn: 0,
        };
        let reply = ControlReply::Listing(listing.clone());
        let bytes = postcard::to_allocvec(&reply).unwrap();
        #[rustfmt::skip]
        let want = [
            0x04, 0x01, 0x00, 0x00, 0x00, 0x00,
            0x01, 0x02, 0x01, 0x03, b'b', b':', b'1', 0x00, 0x01, 0xAC, 0x02, 0x01, 0x02,
            0x01, 0x03, 0x02, 0x02, 0x02, 0x02, 0x03, 0x05,
            0x01, 0x03, 0x05, 0x01, 0x01, 0x00, 0x02, 0x01, 0x00, 0x01, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(bytes, want);
        assert_eq!(postcard::from_bytes::<ControlReply>(&bytes).unwrap(), reply);

        /// `Listing` before Highways, routes and sessions.
        #[derive(Debug, PartialEq, Deserialize)]
        struct OldListing {
            junction: u16,
            ports: Vec<PortInfo>,
            connections: Vec<ConnectionInfo>,
            more_ports: u32,
            more_connections: u32,
        }
        #[derive(Debug, PartialEq, Deserialize)]
        enum OldReply {
            Registered,
            Unregistered,
            Found {
                address: Address,
                chain: Option<Vec<Certificate>>,
            },
            Authenticated(Identity),
            Listing(OldListing),
        }
        assert_eq!(
            postcard::from_bytes::<OldReply>(&bytes).unwrap(),
            OldReply::Listing(OldListing {
                junction: 1,
                ports: vec![],
                connections: vec![],
                more_ports: 0,
                more_connections: 0,
            })
        );
    }
}
