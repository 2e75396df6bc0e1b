//! The frame codec: pure functions over byte buffers, no I/O.
//!
//! A frame on the wire is a 4-byte big-endian length `L`, then `L` bytes: a
//! postcard-encoded [`Header`] followed by the payload. [`decode`] never trusts
//! the length beyond the configured maximum, never allocates from it, and never
//! panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{Frame, Header};

/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;

/// What is wrong with the bytes a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix was zero: a frame holds at least a header.
    #[error("bad frame length 0: every frame carries at least a header")]
    ZeroLength,
    /// The length prefix was larger than the maximum agreed at the handshake.
    #[error(
        "frame of {len} bytes is larger than the limit of {max} bytes; send large data as a stream of smaller messages"
    )]
    TooLarge {
        /// The length the peer announced.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The link ended in the middle of a frame.
    #[error("the link closed in the middle of a frame: {have} of {need} bytes arrived")]
    Truncated {
        /// Bytes that arrived.
        have: usize,
        /// Bytes the frame needed, length prefix included.
        need: usize,
    },
    /// The frame was well delimited, but its header did not decode.
    #[error("undecodable frame header: {detail}")]
    BadHeader {
        /// What postcard said.
        detail: String,
    },
}

impl FrameError {
    /// Whether the byte stream can no longer be trusted to be framed. After a
    /// fatal error the link must close; after [`FrameError::BadHeader`] the
    /// frame was skipped whole and the link can go on.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FrameError::BadHeader { .. })
    }
}

/// Appends one frame to `buf`.
pub fn encode(frame: &Frame, buf: &mut BytesMut) {
    encode_parts(&frame.header, &frame.payload, buf);
}

/// Appends a frame made of `header` and `payload` to `buf`.
pub fn encode_parts(header: &Header, payload: &[u8], buf: &mut BytesMut) {
    let start = encode_header(header, payload.len(), buf);
    buf.extend_from_slice(payload);
    debug_assert!(buf.len() - start >= LENGTH_BYTES);
}

/// Appends the length prefix and `header` of a frame whose payload of
/// `payload_len` bytes the caller writes next. Returns where the frame starts.
pub fn encode_header(header: &Header, payload_len: usize, buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.put_u32(0);
    // Most headers are a few dozen bytes: encode on the stack and copy once.
    let mut scratch = [0u8; 128];
    match postcard::to_slice(header, &mut scratch) {
        Ok(encoded) => buf.extend_from_slice(encoded),
        // Writing into a BytesMut cannot fail, and every header serializes.
        Err(_) => {
            postcard::to_io(header, (&mut *buf).writer()).expect("headers always serialize");
        }
    }
    let len = buf.len() - start - LENGTH_BYTES + payload_len;
    let len = u32::try_from(len).expect("frames are limited far below 4 GiB");
    buf[start..start + LENGTH_BYTES].copy_from_slice(&len.to_be_bytes());
    start
}

/// The length of the frame at the front of `buf`, checked against `max`, or
/// `None` when fewer than four bytes are there.
pub fn peek_length(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if len == 0 {
        return Err(FrameError::ZeroLength);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len as usize))
}

/// Takes one whole frame off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (read more and call
/// again); on [`FrameError::BadHeader`] the bad frame has been removed from
/// `buf`. The payload shares `buf`'s memory: nothing is copied.
pub fn decode(buf: &mut BytesMut, max: u32) -> Result<Option<Frame>, FrameError> {
    let Some(len) = peek_length(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < LENGTH_BYTES + len {
        return Ok(None);
    }
    buf.advance(LENGTH_BYTES);
    let body = buf.split_to(len).freeze();
    decode_body(body).map(Some)
}

/// Decodes a frame body (header then payload, without the length prefix).
pub fn decode_body(body: Bytes) -> Result<Frame, FrameError> {
    let (header, rest) =
        postcard::take_from_bytes::<Header>(&body).map_err(|e| FrameError::BadHeader {
            detail: e.to_string(),
        })?;
    let header_len = body.len() - rest.len();
    Ok(Frame {
        header,
        payload: body.slice(header_len..),
    })
}

/// Checks what is left in a read buffer when the link ends: nothing, or the
/// start of a frame that will never be completed.
pub fn check_eof(buf: &[u8], max: u32) -> Result<(), FrameError> {
    if buf.is_empty() {
        return Ok(());
    }
    let need = match peek_length(buf, max)? {
        Some(len) => LENGTH_BYTES + len,
        None => LENGTH_BYTES,
    };
    Err(FrameError::Truncated {
        have: buf.len(),
        need,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Address;
    use crate::frame::*;
    use proptest::prelude::*;

    const MAX: u32 = 1 << 20;

    fn arb_rights() -> impl Strategy<Value = Rights> {
        (0u8..8).prop_map(|b| Rights::from_bits(b).unwrap())
    }

    fn arb_address() -> impl Strategy<Value = Address> {
        (any::<u16>(), any::<u16>()).prop_map(|(j, p)| Address::new(j, p))
    }

    fn arb_reason() -> impl Strategy<Value = Reason> {
        prop_oneof![
            Just(Reason::PortClosed),
            Just(Reason::OwnerGone),
            Just(Reason::Revoked),
            Just(Reason::Expired),
            Just(Reason::ReplyDropped),
            Just(Reason::Shutdown),
        ]
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        let caps = proptest::collection::vec(any::<u32>(), 0..4);
        let granted = proptest::collection::vec(
            (
                any::<u32>(),
                arb_rights(),
                any::<u32>(),
                arb_address(),
                any::<bool>(),
            )
                .prop_map(|(handle, rights, credits, address, moves)| Granted {
                    handle,
                    rights,
                    credits,
                    address,
                    moves,
                }),
            0..4,
        );
        prop_oneof![
            (any::<u16>(), any::<u32>(), ".{0,20}").prop_map(|(version, max_frame, label)| {
                Header::Hello(Hello {
                    magic: MAGIC,
                    version,
                    max_frame,
                    label,
                })
            }),
            (any::<u32>(), arb_address())
                .prop_map(|(req, address)| Header::PortOpened { req, address }),
            (any::<u32>(), any::<u16>(), arb_rights())
                .prop_map(|(req, port, rights)| Header::Mint { req, port, rights }),
            (any::<u32>(), caps.clone())
                .prop_map(|(handle, caps)| Header::Send(Send { handle, caps })),
            (any::<u32>(), any::<u64>(), caps).prop_map(|(handle, tag, caps)| Header::Call(Call {
                handle,
                tag,
                caps
            })),
            (
                any::<u16>(),
                arb_address(),
                any::<u64>(),
                any::<Option<u32>>(),
                granted,
                any::<bool>()
            )
                .prop_map(|(port, origin, tag, reply, caps, ack)| Header::Deliver(
                    Deliver {
                        port,
                        origin,
                        tag,
                        reply,
                        caps,
                        ack,
                        identity: None,
                    }
                )),
            (any::<u32>(), any::<u64>(), any::<u32>(), arb_reason()).prop_map(
                |(handle, first_seq, count, reason)| Header::Undeliverable {
                    handle,
                    first_seq,
                    count,
                    reason
                }
            ),
            (any::<u64>(), arb_reason())
                .prop_map(|(tag, reason)| Header::CallFailed { tag, reason }),
            (any::<u32>(), ".{0,40}").prop_map(|(req, message)| Header::Error(ErrorFrame {
                req,
                handle: u32::MAX,
                tag: 0,
                code: ErrorCode::NameTaken,
                message
            })),
            any::<u64>().prop_map(|nonce| Header::Ping { nonce }),
        ]
    }

    /// docs/protocol.md 11.5; and a decoder from before the variant skips
    /// it as a bad header and reads the next frame (3.2).
    #[test]
    fn identity_withdrawn_encodes_as_documented_and_old_decoders_skip_it() {
        let frame = Frame::bare(Header::IdentityWithdrawn {
            names: vec!["org.x".parse().unwrap()],
            reason: "r".into(),
        });
        let mut buf = BytesMut::new();
        encode(&frame, &mut buf);
        assert_eq!(
            &buf[..],
            &[
                0, 0, 0, 0x0A, 0x1B, 1, 5, b'o', b'r', b'g', b'.', b'x', 1, b'r'
            ]
        );
        // Discriminant 27 is unknown to a version-3 decoder that stops at
        // Cancel: simulate one with a discriminant past every variant.
        let mut unknown = BytesMut::from(&[0u8, 0, 0, 2, 0x7F, 0][..]);
        encode(&Frame::bare(Header::Ping { nonce: 1 }), &mut unknown);
        assert!(matches!(
            decode(&mut unknown, MAX),
            Err(FrameError::BadHeader { .. })
        ));
        assert_eq!(
            decode(&mut unknown, MAX).unwrap().unwrap().header,
            Header::Ping { nonce: 1 }
        );
    }

    #[test]
    fn each_bad_input_has_its_own_error() {
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode(&mut zero, MAX), Err(FrameError::ZeroLength));

        let mut big = BytesMut::from(&(MAX + 1).to_be_bytes()[..]);
        assert_eq!(
            decode(&mut big, MAX),
            Err(FrameError::TooLarge {
                len: MAX + 1,
                max: MAX
            })
        );

        let mut garbage = BytesMut::new();
        garbage.extend_from_slice(&3u32.to_be_bytes());
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = decode(&mut garbage, MAX).unwrap_err();
        assert!(matches!(err, FrameError::BadHeader { .. }), "{err:?}");
        assert!(!err.is_fatal());
        assert!(garbage.is_empty(), "the bad frame is skipped whole");

        let half = [0u8, 0, 0, 10, 1, 2];
        assert_eq!(
            check_eof(&half, MAX),
            Err(FrameError::Truncated { have: 6, need: 14 })
        );
        assert_eq!(check_eof(&[], MAX), Ok(()));
    }

    #[test]
    fn payload_shares_the_read_buffer() {
        let frame = Frame::with_payload(
            Header::Send(Send {
                handle: 3,
                caps: vec![],
            }),
            Bytes::from_static(b"hello"),
        );
        let mut buf = BytesMut::new();
        encode(&frame, &mut buf);
        let before = buf.as_ptr() as usize;
        let decoded = decode(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(decoded, frame);
        let at = decoded.payload.as_ptr() as usize;
        assert!(at > before && at < before + 64, "payload was copied");
    }

    proptest! {
        #[test]
        fn frames_round_trip(headers in proptest::collection::vec(arb_header(), 1..8),
                             payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::new();
            let frames: Vec<Frame> = headers
                .into_iter()
                .map(|h| Frame::with_payload(h, Bytes::from(payload.clone())))
                .collect();
            for f in &frames {
                encode(f, &mut buf);
            }
            // Feed the bytes in two pieces to exercise partial frames.
            let all = buf.split().freeze();
            let cut = all.len() / 3;
            let mut rx = BytesMut::from(&all[..cut]);
            let mut out = Vec::new();
            while let Some(f) = decode(&mut rx, MAX).unwrap() {
                out.push(f);
            }
            rx.extend_from_slice(&all[cut..]);
            while let Some(f) = decode(&mut rx, MAX).unwrap() {
                out.push(f);
            }
            prop_assert!(rx.is_empty());
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                match decode(&mut buf, 256) {
                    Ok(Some(_)) => continue,
                    Ok(None) => { let _ = check_eof(&buf, 256); break; }
                    Err(e) if e.is_fatal() => break,
                    Err(_) => continue,
                }
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_body(Bytes::from(bytes));
        }
    }
}
