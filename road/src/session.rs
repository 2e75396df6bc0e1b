//! End-to-end sessions between two junctions: the frames. What a junction
//! does with them is `junction-core`'s session module; docs/protocol.md,
//! part 2, section 15, gives the bytes.
//!
//! A session frame is the postcard encoding of a [`SessionFrame`] followed,
//! for [`SessionFrame::Data`] only, by the payload as raw bytes up to the end
//! of whatever carries the frame (which gives its length). The payload is
//! kept out of the header, as in the driver protocol, so that a junction can
//! forward it without copying or re-encoding it: [`encode`] and [`decode`]
//! split and join the two.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// What one junction says to another within their session.
///
/// Every frame names the incarnation of the junction that sent it and the
/// incarnation it is meant for, so that nothing from an earlier life of
/// either end is ever taken for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionFrame {
    /// A message; its payload follows.
    Data(SessionData),
    /// Messages of a lane received, cumulatively.
    Ack(SessionAck),
    /// "I am this incarnation and did not take what you sent": the answer
    /// to a [`SessionData`] addressed to another incarnation, or to none.
    Reset(SessionReset),
}

/// The header of one message on a lane. The payload follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionData {
    /// The sender's incarnation: chosen when it starts, greater than in any
    /// earlier life (its start time in Unix milliseconds, as in routing).
    pub from_incarnation: u64,
    /// The incarnation the sender believes the destination has; 0 when it
    /// does not know it yet. A destination takes the message only when this
    /// is its own.
    pub to_incarnation: u64,
    /// The flow it belongs to, chosen by the sender; order holds per lane.
    pub lane: u32,
    /// Its number on the lane, from 0, one more per message.
    pub seq: u64,
    /// The lowest sequence number of the lane the sender still holds: every
    /// earlier one was acknowledged or given up (and the sender's caller
    /// told so), so the destination need not wait for it.
    pub base: u64,
}

/// A cumulative acknowledgement: every message of the lane below `upto`
/// has been handed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAck {
    /// The acknowledging junction's incarnation.
    pub from_incarnation: u64,
    /// The incarnation of the junction whose messages it acknowledges.
    pub to_incarnation: u64,
    /// The lane.
    pub lane: u32,
    /// The next sequence number it expects on the lane.
    pub upto: u64,
}

/// The answer to data addressed to an incarnation the receiver is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReset {
    /// The receiver's incarnation, now.
    pub from_incarnation: u64,
    /// The incarnation of the junction whose data it refused.
    pub to_incarnation: u64,
}

impl SessionFrame {
    /// The incarnation of the junction that sent it.
    pub fn from_incarnation(&self) -> u64 {
        match self {
            Self::Data(d) => d.from_incarnation,
            Self::Ack(a) => a.from_incarnation,
            Self::Reset(r) => r.from_incarnation,
        }
    }

    /// The incarnation it is meant for (0: unknown to its sender).
    pub fn to_incarnation(&self) -> u64 {
        match self {
            Self::Data(d) => d.to_incarnation,
            Self::Ack(a) => a.to_incarnation,
            Self::Reset(r) => r.to_incarnation,
        }
    }
}

/// Why bytes are not a session frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionFrameError {
    /// The header does not decode.
    #[error("the session frame's header does not decode: {0}")]
    BadHeader(String),
    /// An acknowledgement or reset has bytes after its header.
    #[error("a session {kind} carries {len} bytes after its header; only data has a payload")]
    TrailingBytes {
        /// Which frame.
        kind: &'static str,
        /// How many bytes followed.
        len: usize,
    },
}

/// Appends `frame` and, for data, `payload` to `buf`. Acknowledgements and
/// resets have no payload: pass an empty one.
pub fn encode(frame: &SessionFrame, payload: &[u8], buf: &mut BytesMut) {
    // Postcard writes at most 10 bytes per varint: 1 tag, 5 fields.
    let mut head = [0u8; 64];
    let used = postcard::to_slice(frame, &mut head).map_or(0, |s| s.len());
    buf.reserve(used + payload.len());
    buf.put_slice(&head[..used]);
    buf.put_slice(payload);
}

/// Splits a session frame into its header and payload (empty but for data),
/// without copying the payload.
pub fn decode(bytes: &Bytes) -> Result<(SessionFrame, Bytes), SessionFrameError> {
    let (frame, rest) = postcard::take_from_bytes::<SessionFrame>(bytes)
        .map_err(|e| SessionFrameError::BadHeader(e.to_string()))?;
    let payload = bytes.slice(bytes.len() - rest.len()..);
    match frame {
        SessionFrame::Data(_) => Ok((frame, payload)),
        SessionFrame::Ack(_) | SessionFrame::Reset(_) if !payload.is_empty() => {
            let kind = if matches!(frame, SessionFrame::Ack(_)) {
                "acknowledgement"
            } else {
                "reset"
            };
            Err(SessionFrameError::TrailingBytes {
                kind,
                len: payload.len(),
            })
        }
        _ => Ok((frame, payload)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: &SessionFrame, payload: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(frame, payload, &mut buf);
        buf.to_vec()
    }

    /// The examples in docs/protocol.md, section 15, byte for byte.
    #[test]
    fn session_frames_encode_as_documented() {
        let data = SessionFrame::Data(SessionData {
            from_incarnation: 1_700_000_000,
            to_incarnation: 1_700_000_100,
            lane: 7,
            seq: 300,
            base: 298,
        });
        let bytes = encoded(&data, b"hi");
        assert_eq!(
            bytes,
            [
                0x00, 0x80, 0xE2, 0xCF, 0xAA, 0x06, 0xE4, 0xE2, 0xCF, 0xAA, 0x06, 0x07, 0xAC, 0x02,
                0xAA, 0x02, b'h', b'i'
            ]
        );
        assert_eq!(
            decode(&Bytes::from(bytes)).unwrap(),
            (data, Bytes::from_static(b"hi"))
        );

        let ack = SessionFrame::Ack(SessionAck {
            from_incarnation: 1_700_000_100,
            to_incarnation: 1_700_000_000,
            lane: 7,
            upto: 301,
        });
        let bytes = encoded(&ack, b"");
        assert_eq!(
            bytes,
            [
                0x01, 0xE4, 0xE2, 0xCF, 0xAA, 0x06, 0x80, 0xE2, 0xCF, 0xAA, 0x06, 0x07, 0xAD, 0x02
            ]
        );
        assert_eq!(decode(&Bytes::from(bytes)).unwrap(), (ack, Bytes::new()));

        let reset = SessionFrame::Reset(SessionReset {
            from_incarnation: 1_700_000_200,
            to_incarnation: 1_700_000_000,
        });
        let bytes = encoded(&reset, b"");
        assert_eq!(
            bytes,
            [
                0x02, 0xC8, 0xE3, 0xCF, 0xAA, 0x06, 0x80, 0xE2, 0xCF, 0xAA, 0x06
            ]
        );
        assert_eq!(decode(&Bytes::from(bytes)).unwrap(), (reset, Bytes::new()));
    }

    #[test]
    fn bad_session_frames_are_refused_with_reasons() {
        assert!(matches!(
            decode(&Bytes::from_static(&[0x03, 0x01])),
            Err(SessionFrameError::BadHeader(_))
        ));
        assert!(matches!(
            decode(&Bytes::from_static(&[0x00, 0x01])),
            Err(SessionFrameError::BadHeader(_))
        ));
        assert_eq!(
            decode(&Bytes::from_static(&[0x02, 0x01, 0x01, 0xFF])),
            Err(SessionFrameError::TrailingBytes {
                kind: "reset",
                len: 1
            })
        );
        // The largest header fits the encoder's scratch space.
        let max = SessionFrame::Data(SessionData {
            from_incarnation: u64::MAX,
            to_incarnation: u64::MAX,
            lane: u32::MAX,
            seq: u64::MAX,
            base: u64::MAX,
        });
        let bytes = encoded(&max, b"x");
        assert_eq!(bytes.len(), 1 + 10 + 10 + 5 + 10 + 10 + 1);
        assert_eq!(decode(&Bytes::from(bytes)).unwrap().0, max);
    }
}
