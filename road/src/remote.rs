//! Capabilities between junctions: what one junction says to another about
//! ports, names, messages and calls, carried as the payload of their
//! end-to-end session ([`crate::session`]). What a junction does with these
//! frames is `junction-core`'s remote module; docs/protocol.md, part 2,
//! section 16, gives the bytes.
//!
//! A remote frame is the postcard encoding of a [`RemoteFrame`] followed,
//! for [`RemoteFrame::Send`] and [`RemoteFrame::Reply`] only, by the
//! message's payload as raw bytes up to the end of the session message
//! (which gives its length), so that the payload is never re-encoded.
//!
//! The parties: the **owner** is the junction whose port it is; a **holder**
//! is a junction whose drivers hold capabilities to it. The owner *exports*
//! the port to each holder, counting what it granted; the holder *imports*
//! it, as a local stand-in port its drivers' capabilities reach.

use bytes::{BufMut, Bytes, BytesMut};
use junction_identity::{CapabilityToken, Certificate, ServiceName, Signature};
use serde::{Deserialize, Serialize};

use crate::frame::{ErrorCode, Identity, MAX_CAPS_PER_MESSAGE, Reason, Rights};
use crate::{Address, Chained};

/// The first session lane remote frames travel on; lanes below it are left
/// for other uses. Messages to ports (`Send`) go on [`data_lane`]s, which
/// the session gives up on when the peer stays out of reach (and the
/// senders are told); everything else goes on control lanes, from
/// [`CONTROL_LANE_BASE`], which it never gives up on: they carry state
/// both junctions must come to agree on (grants, releases, settlements,
/// deaths, replies), which a partition may delay but must not lose.
pub const REMOTE_LANE_BASE: u32 = 0x8000_0000;

/// The first control lane.
pub const CONTROL_LANE_BASE: u32 = 0xC000_0000;

/// How many lanes ports spread over, each way.
pub const PORT_LANES: u32 = 32;

/// The lane of messages to port number `port` of their owner.
pub fn data_lane(port: u16) -> u32 {
    REMOTE_LANE_BASE + u32::from(port) % PORT_LANES
}

/// The lane of everything else about port number `port` of its owner, in
/// the order it was said: grants, opens, settlements, refusals, releases,
/// death.
pub fn control_lane(port: u16) -> u32 {
    CONTROL_LANE_BASE + u32::from(port) % PORT_LANES
}

/// The lane of lookups, replies and call outcomes.
pub const CALL_LANE: u32 = CONTROL_LANE_BASE + PORT_LANES;

/// A port of the owner junction as one holder junction reaches it: the
/// port's number and the generation of that number, so a message for a dead
/// port never reaches a newer one that reuses the number, and the export:
/// the owner's record of what it granted that holder, with the limits it
/// granted (expiry, revocable lineages, budget), which it checks on every
/// use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemotePort {
    /// Its number on the owner junction.
    pub port: u16,
    /// The generation of that number.
    pub generation: u32,
    /// The export, chosen by the owner.
    pub export: u32,
}

/// A service's proof, made when it authenticated to its junction, that it
/// holds its certificate's key: its signature over the junction's nonce
/// for that connection and the junction's id (docs/protocol.md 9.3). It
/// names the junction it was made for, so no other junction can pass it
/// off as made for itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Possession {
    /// The junction's nonce for the service's connection.
    pub nonce: [u8; 32],
    /// The service's signature.
    pub signature: Signature,
}

/// A capability travelling with a message between two junctions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Carried {
    /// To a port of the sending junction, which now exports it to the
    /// receiving junction one grant more (tag 0).
    Grant {
        /// The port.
        port: RemotePort,
        /// Its rights.
        rights: Rights,
        /// The sending junction's signed token for the grant, which lets
        /// the receiving junction pass it on to a third; `None` from a
        /// junction with no key.
        token: Option<CapabilityToken>,
    },
    /// To a port of the receiving junction, coming home: the sender held
    /// it as an import, and one of its grants comes back with it (tag 1).
    Home {
        /// The port, on the receiving junction.
        port: RemotePort,
        /// Its rights.
        rights: Rights,
    },
    /// To a port of a third junction (the token's owner), passed on by the
    /// sending junction, which holds it: the token with the sender's
    /// delegation to the receiving junction last (tag 2). The receiving
    /// junction opens it with the owner ([`RemoteFrame::Open`]).
    Token {
        /// The delegated token.
        token: CapabilityToken,
    },
}

/// A message from a holder's driver to an exported port. Its payload
/// follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSend {
    /// The port, on the receiving (owner) junction.
    pub port: RemotePort,
    /// The holder's number for this message, one more per message to the
    /// port: what [`RemoteFrame::Settled`] and [`RemoteFrame::Refused`]
    /// name it by.
    pub n: u64,
    /// The sender's home port: what the receiver sees as the origin.
    pub origin: Address,
    /// The sender's proven identity, if it authenticated to its junction.
    pub identity: Option<Identity>,
    /// For a call: the holder junction's id for it, never 0; 0 for a send.
    pub call: u64,
    /// The sender would soon stall: the receiver should report consumption
    /// promptly.
    pub ack: bool,
    /// Capabilities passed along, at most [`MAX_CAPS_PER_MESSAGE`].
    pub caps: Vec<Carried>,
}

/// What one junction says to another about remote capabilities. Variant
/// order is the wire numbering; new variants go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteFrame {
    /// Asks the owner of a name for a capability to it (tag 0); answered
    /// by [`RemoteFrame::Found`] or [`RemoteFrame::NotFound`] with the same
    /// `req`.
    Lookup {
        /// Chosen by the asker.
        req: u32,
        /// The service name.
        name: ServiceName,
    },
    /// The answer to a lookup: the port is exported to the asker, one
    /// grant more, with these rights (tag 1).
    Found {
        /// The lookup it answers.
        req: u32,
        /// The port.
        port: RemotePort,
        /// Its rights.
        rights: Rights,
        /// The certificate chain its registrant proved, leaf first; `None`
        /// in the development namespace.
        chain: Option<Vec<Certificate>>,
        /// The registrant's proof that it holds the chain's key, made for
        /// the owner junction (with the chain; `None` without).
        proof: Option<Possession>,
        /// The owner's signed token for the grant (see [`Carried::Grant`]).
        token: Option<CapabilityToken>,
    },
    /// The lookup found nothing (tag 2).
    NotFound {
        /// The lookup it answers.
        req: u32,
        /// Why, for people.
        message: String,
    },
    /// A message to an exported port; its payload follows (tag 3).
    Send(RemoteSend),
    /// Messages `first` to `first + count - 1` to `port` were consumed, or
    /// settled otherwise: their credit goes back (tag 4).
    Settled {
        /// The port.
        port: RemotePort,
        /// The first message, by the holder's number.
        first: u64,
        /// How many consecutive messages.
        count: u32,
    },
    /// Message `n` to `port` was refused on arrival (tag 5).
    Refused {
        /// The port.
        port: RemotePort,
        /// The message, by the holder's number.
        n: u64,
        /// The call it made, if any (the holder's id), which fails.
        call: u64,
        /// What was wrong, for programs.
        code: ErrorCode,
        /// What was wrong, for people.
        message: String,
    },
    /// The port died: every capability to it is dead, and messages the
    /// owner did not settle before this were not consumed (tag 6).
    Dead {
        /// The port.
        port: RemotePort,
        /// Why.
        reason: Reason,
    },
    /// The holder no longer holds `grants` of the grants it was given for
    /// `port` (tag 7). When every grant is released the owner stops
    /// counting the holder as a sender.
    Release {
        /// The port.
        port: RemotePort,
        /// How many grants.
        grants: u32,
    },
    /// The reply to call `call`; its payload follows (tag 8).
    Reply {
        /// The caller junction's id for the call.
        call: u64,
        /// Capabilities passed along.
        caps: Vec<Carried>,
    },
    /// Call `call` ends without a reply (tag 9).
    CallFailed {
        /// The caller junction's id for the call.
        call: u64,
        /// Why.
        reason: Reason,
    },
    /// The caller gave up on call `call`: its reply capability dies
    /// (tag 10).
    Cancel {
        /// The caller junction's id for the call.
        call: u64,
    },
    /// A junction that was passed a token asks its owner for an export of
    /// its own (tag 11); answered by [`RemoteFrame::Opened`] or
    /// [`RemoteFrame::OpenRefused`] with the same `open`.
    Open {
        /// Chosen by the asker.
        open: u32,
        /// The token, delegated to the asker last.
        token: CapabilityToken,
    },
    /// The token holds: the asker's export (tag 12).
    Opened {
        /// The request it answers.
        open: u32,
        /// The asker's export, one grant of it.
        port: RemotePort,
    },
    /// The token does not hold, or what it was issued for is gone (tag
    /// 13).
    OpenRefused {
        /// The request it answers.
        open: u32,
        /// Why, as a capability's death.
        reason: Reason,
        /// Why, for people.
        message: String,
    },
}

/// Why bytes are not a remote frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteFrameError {
    /// The header does not decode.
    #[error("the remote frame's header does not decode: {0}")]
    BadHeader(String),
    /// A frame without a payload has bytes after its header.
    #[error(
        "a remote frame carries {len} bytes after its header; only Send and Reply have a payload"
    )]
    TrailingBytes {
        /// How many bytes followed.
        len: usize,
    },
    /// A message carries more capabilities than any message may.
    #[error(
        "a remote message carries {count} capabilities; at most {MAX_CAPS_PER_MESSAGE} may travel with one"
    )]
    TooManyCaps {
        /// How many it carried.
        count: usize,
    },
    /// A call id of 0 on a call-related frame, which names no call.
    #[error("a remote frame names call 0, which no call has")]
    NoCall,
}

impl RemoteFrame {
    /// Whether a payload follows the header.
    pub fn has_payload(&self) -> bool {
        matches!(self, Self::Send(_) | Self::Reply { .. })
    }
}

/// Appends `frame` and, for `Send` and `Reply`, `payload` to `buf`. Other
/// frames have no payload: pass an empty one.
pub fn encode(frame: &RemoteFrame, payload: &[u8], buf: &mut BytesMut) {
    // The usual header fits on the stack and is put in one piece (postcard
    // through `io::Write` checks room byte by byte); a large one (a chain,
    // many capabilities) goes straight into the buffer. No allocation of
    // its own on the message path either way.
    let mut head = [0u8; 128];
    match postcard::to_slice(frame, &mut head) {
        Ok(head) => {
            buf.reserve(head.len() + payload.len());
            buf.put_slice(head);
        }
        Err(_) => {
            buf.reserve(256 + payload.len());
            let mut writer = (&mut *buf).writer();
            postcard::to_io(frame, &mut writer).expect("remote frames always serialize");
        }
    }
    buf.put_slice(payload);
}

/// `frame` and `payload` as one session message, in one piece.
pub fn to_bytes(frame: &RemoteFrame, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    encode(frame, payload, &mut buf);
    buf.freeze()
}

/// `frame` and `payload` as one session message: a large payload
/// ([`crate::pool::POOLED_FRAME`] or more) follows the header as it is,
/// a smaller one is copied in with it.
///
/// Only a large payload is kept by reference because a Road reads each
/// large frame into a buffer of its own: holding it holds that frame and
/// nothing else, where a small one may share its buffer with other frames.
pub fn chained(frame: &RemoteFrame, payload: &Bytes) -> Chained {
    if payload.len() >= crate::pool::POOLED_FRAME {
        return Chained::new(to_bytes(frame, &[]), payload.clone());
    }
    to_bytes(frame, payload).into()
}

/// Splits a remote frame into its header and payload (empty but for `Send`
/// and `Reply`), without copying the payload, and checks what the types
/// alone cannot.
pub fn decode(bytes: &Bytes) -> Result<(RemoteFrame, Bytes), RemoteFrameError> {
    let (frame, rest) = postcard::take_from_bytes::<RemoteFrame>(bytes)
        .map_err(|e| RemoteFrameError::BadHeader(e.to_string()))?;
    let payload = bytes.slice(bytes.len() - rest.len()..);
    if !frame.has_payload() && !payload.is_empty() {
        return Err(RemoteFrameError::TrailingBytes { len: payload.len() });
    }
    let caps = match &frame {
        RemoteFrame::Send(send) => send.caps.len(),
        RemoteFrame::Reply { caps, .. } => caps.len(),
        _ => 0,
    };
    if caps > MAX_CAPS_PER_MESSAGE {
        return Err(RemoteFrameError::TooManyCaps { count: caps });
    }
    match &frame {
        RemoteFrame::Reply { call: 0, .. }
        | RemoteFrame::CallFailed { call: 0, .. }
        | RemoteFrame::Cancel { call: 0 } => return Err(RemoteFrameError::NoCall),
        _ => {}
    }
    Ok((frame, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn port(port: u16, generation: u32) -> RemotePort {
        RemotePort {
            port,
            generation,
            export: 2,
        }
    }

    /// Message 300 of call 9 to port 5/1 from 1.7, carrying `caps`.
    fn send_to_5(caps: Vec<Carried>) -> RemoteFrame {
        RemoteFrame::Send(RemoteSend {
            port: port(5, 1),
            n: 300,
            origin: Address::new(1, 7),
            identity: None,
            call: 9,
            ack: false,
            caps,
        })
    }

    /// The examples in docs/protocol.md, section 16, byte for byte.
    #[test]
    fn remote_frames_encode_as_documented() {
        let send = send_to_5(vec![Carried::Grant {
            port: port(8, 0),
            rights: Rights::SEND | Rights::GRANT,
            token: None,
        }]);
        let bytes = to_bytes(&send, b"hi");
        assert_eq!(
            &bytes[..],
            [
                0x03, 0x05, 0x01, 0x02, 0xAC, 0x02, 0x01, 0x07, 0x00, 0x09, 0x00, 0x01, 0x00, 0x08,
                0x00, 0x02, 0x05, 0x00, b'h', b'i'
            ]
        );
        assert_eq!(decode(&bytes).unwrap(), (send, Bytes::from_static(b"hi")));

        let settled = RemoteFrame::Settled {
            port: port(5, 1),
            first: 300,
            count: 2,
        };
        let bytes = to_bytes(&settled, b"");
        assert_eq!(&bytes[..], [0x04, 0x05, 0x01, 0x02, 0xAC, 0x02, 0x02]);
        assert_eq!(decode(&bytes).unwrap(), (settled, Bytes::new()));

        let lookup = RemoteFrame::Lookup {
            req: 1,
            name: "echo".parse().unwrap(),
        };
        let bytes = to_bytes(&lookup, b"");
        assert_eq!(&bytes[..], [0x00, 0x01, 0x04, b'e', b'c', b'h', b'o']);

        let dead = RemoteFrame::Dead {
            port: port(5, 1),
            reason: Reason::PortClosed,
        };
        assert_eq!(&to_bytes(&dead, b"")[..], [0x06, 0x05, 0x01, 0x02, 0x00]);
        let release = RemoteFrame::Release {
            port: port(5, 1),
            grants: 3,
        };
        assert_eq!(&to_bytes(&release, b"")[..], [0x07, 0x05, 0x01, 0x02, 0x03]);
    }

    #[test]
    fn bad_remote_frames_are_refused_with_reasons() {
        assert!(matches!(
            decode(&Bytes::from_static(&[0x0B])),
            Err(RemoteFrameError::BadHeader(_))
        ));
        assert_eq!(
            decode(&Bytes::from_static(&[0x06, 0x05, 0x01, 0x02, 0x00, 0xFF])),
            Err(RemoteFrameError::TrailingBytes { len: 1 })
        );
        assert_eq!(
            decode(&to_bytes(&RemoteFrame::Cancel { call: 0 }, b"")),
            Err(RemoteFrameError::NoCall)
        );
        let many = RemoteFrame::Reply {
            call: 1,
            caps: vec![
                Carried::Home {
                    port: port(1, 0),
                    rights: Rights::SEND,
                };
                MAX_CAPS_PER_MESSAGE + 1
            ],
        };
        assert_eq!(
            decode(&to_bytes(&many, b"")),
            Err(RemoteFrameError::TooManyCaps {
                count: MAX_CAPS_PER_MESSAGE + 1
            })
        );
    }

    #[test]
    fn lanes_keep_a_port_on_one_lane_and_calls_apart() {
        assert_eq!(data_lane(5), data_lane(5 + 32));
        assert_ne!(data_lane(5), data_lane(6));
        for p in [0, 1, 31, 32, u16::MAX] {
            assert!((REMOTE_LANE_BASE..CONTROL_LANE_BASE).contains(&data_lane(p)));
            assert!((CONTROL_LANE_BASE..CALL_LANE).contains(&control_lane(p)));
        }
    }

    /// A header too large for the stack (many capabilities) is encoded
    /// straight into the buffer, after what it already held, and decodes
    /// back whole.
    #[test]
    fn a_large_header_encodes_and_decodes_whole() {
        let caps: Vec<Carried> = (0..MAX_CAPS_PER_MESSAGE as u16)
            .map(|i| Carried::Grant {
                port: port(1000 + i, 70_000),
                rights: Rights::SEND,
                token: None,
            })
            .collect();
        let send = send_to_5(caps);
        let mut buf = BytesMut::from(&b"before"[..]);
        encode(&send, b"payload", &mut buf);
        let bytes = Bytes::from(buf).slice(6..);
        assert!(bytes.len() > 128 + 7, "{}", bytes.len());
        assert_eq!(
            decode(&bytes).unwrap(),
            (send, Bytes::from_static(b"payload"))
        );
    }

    /// A large payload follows its header as it is; a small one is copied
    /// in with it. Either way the message reads as the same bytes.
    #[test]
    fn only_a_large_payload_is_kept_by_reference() {
        let send = send_to_5(vec![]);
        let big = Bytes::from(vec![9u8; crate::pool::POOLED_FRAME]);
        let large = chained(&send, &big);
        assert_eq!(large.body().as_ptr(), big.as_ptr(), "not copied");
        assert_eq!(decode(&large.to_bytes()).unwrap(), (send.clone(), big));
        let small = Bytes::from_static(b"small");
        let one = chained(&send, &small);
        assert!(one.body().is_empty(), "one piece");
        assert_eq!(one.to_bytes(), to_bytes(&send, &small));
    }

    proptest! {
        /// No bytes make the decoder panic; whatever decodes encodes to
        /// bytes that decode to the same frame.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let bytes = Bytes::from(bytes);
            if let Ok((frame, payload)) = decode(&bytes) {
                let again = decode(&to_bytes(&frame, &payload)).unwrap();
                prop_assert_eq!(again, (frame, payload));
            }
        }
    }
}
