//! The Highway wire: what two junctions exchange over one QUIC connection,
//! byte by byte (docs/protocol.md, section 18). Pure functions and buffers,
//! no I/O.
//!
//! - One bidirectional **control stream**, opened by the dialer first,
//!   carries [`ControlFrame`]s: a [`Hello`] first each way, then
//!   keep-alives, link states and at last a goodbye. It is small and
//!   ordered, and bulk traffic never waits in front of it.
//! - **Data streams** are unidirectional, one per destination junction or
//!   lane (the shell chooses), each a sequence of [`HighwayFrame::Forward`]
//!   and [`HighwayFrame::Unroutable`] frames with their payloads, so that
//!   unrelated flows never block each other.
//!
//! Every frame, on either kind of stream, is framed as the driver protocol
//! frames its own (`junction_road::codec`): a 4-byte big-endian length `L`,
//! then `L` bytes: a postcard header, then the payload. Control frames have
//! no payload. A [`Decoder`] takes a stream's bytes in whatever chunks they
//! arrive and gives whole frames; [`Encoder`] appends frames to a
//! [`BytesMut`], so that many go out in one write.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use junction_road::highway::{HighwayFrame, LinkState};
use junction_road::pool::{self, POOLED_FRAME};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The Highway protocol version this crate speaks, carried in [`Hello`]
/// (and named by the ALPN).
pub const VERSION: u16 = 1;

/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;

/// The default largest frame, length prefix excluded: 4 MiB of payload and
/// 64 KiB of room for the header (a link state with its names and seal
/// fits in about 40 KB).
pub const DEFAULT_MAX_FRAME: u32 = 4 * 1024 * 1024 + 64 * 1024;

/// The first frame each way on the control stream: who the sender is.
///
/// A peer is admitted only once its `Hello` has arrived and its `junction`
/// is the id its verified certificate carries (the shell checks the
/// certificate, [`crate::link::Links`] the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The Highway protocol version the sender speaks ([`VERSION`]).
    pub version: u16,
    /// The sender's junction id.
    pub junction: u16,
    /// The sender's incarnation: chosen when it starts, greater than in any
    /// earlier life.
    pub incarnation: u64,
}

/// A frame on the control stream. Variant order is the wire numbering; new
/// variants go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlFrame {
    /// Who the sender is; first each way (tag 0).
    Hello(Hello),
    /// Asks for a [`ControlFrame::KeepAliveAck`] with the same nonce, to
    /// measure the round trip and show the sender is alive (tag 1).
    KeepAlive {
        /// Chosen by the sender, echoed back.
        nonce: u64,
    },
    /// The answer to a [`ControlFrame::KeepAlive`] (tag 2).
    KeepAliveAck {
        /// The nonce of the keep-alive it answers.
        nonce: u64,
    },
    /// The sender is closing the connection, and says why (tag 3).
    Goodbye {
        /// Why, for the peer's log.
        reason: String,
    },
    /// Routing: a junction's description of its links (tag 4), as in
    /// `junction_road::highway`.
    LinkState(LinkState),
}

/// What is wrong with the bytes a peer sent on a Highway stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length prefix was zero: a frame holds at least a header.
    #[error("bad Highway frame length 0: every frame carries at least a header")]
    ZeroLength,
    /// The length prefix was larger than the maximum in force.
    #[error("Highway frame of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// The length the peer announced.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("the Highway stream ended in the middle of a frame: {have} of {need} bytes arrived")]
    Truncated {
        /// Bytes that arrived.
        have: usize,
        /// Bytes the frame needed, length prefix included.
        need: usize,
    },
    /// The frame was well delimited, but its header did not decode.
    #[error("undecodable Highway frame header: {detail}")]
    BadHeader {
        /// What postcard said.
        detail: String,
    },
    /// A control frame, or an `Unroutable`, carried bytes after its
    /// header; those carry none.
    #[error("a frame carried {len} payload bytes where none belong (control frames, Unroutable)")]
    UnexpectedPayload {
        /// The bytes after the header.
        len: usize,
    },
    /// A data stream carried a frame that belongs on the control stream (a
    /// link state): data streams carry `Forward` and `Unroutable` only.
    #[error(
        "a data stream carried a frame with tag {tag}; data streams carry Forward and Unroutable only"
    )]
    WrongStream {
        /// The frame's tag.
        tag: u8,
    },
}

impl WireError {
    /// Whether the stream can no longer be trusted to be framed. After a
    /// fatal error the stream (and, for the control stream, the connection)
    /// must close; after any other the bad frame was skipped whole and the
    /// stream can go on.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            WireError::ZeroLength | WireError::TooLarge { .. } | WireError::Truncated { .. }
        )
    }
}

/// How the caller misused the [`Encoder`]: nothing a peer did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The frame would be larger than the maximum in force; nothing was
    /// appended. Send less in one frame.
    #[error("a Highway frame of {len} bytes would be larger than the limit of {max} bytes")]
    TooLarge {
        /// The frame's length, prefix excluded.
        len: usize,
        /// The limit in force.
        max: u32,
    },
    /// The header did not serialize (postcard's message); nothing was
    /// appended.
    #[error("a Highway frame header did not serialize: {detail}")]
    Header {
        /// What postcard said.
        detail: String,
    },
}

/// A frame from a data stream: its header and its payload, which shares
/// the decoder's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    /// `Forward` or `Unroutable`.
    pub header: HighwayFrame,
    /// The payload (empty for `Unroutable`).
    pub payload: Bytes,
}

/// Appends frames to a buffer, refusing any larger than its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoder {
    max: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Encoder {
    /// An encoder for frames of at most `max` bytes, prefix excluded.
    pub fn new(max: u32) -> Self {
        Self { max }
    }

    /// The largest frame it writes, prefix excluded.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Appends a control frame to `buf`; returns the bytes appended.
    pub fn control(&self, frame: &ControlFrame, buf: &mut BytesMut) -> Result<usize, EncodeError> {
        self.encode(frame, &[], buf)
    }

    /// Appends a data frame (`Forward` with its payload, or `Unroutable`
    /// with none) to `buf`; returns the bytes appended.
    pub fn data(
        &self,
        header: &HighwayFrame,
        payload: &[u8],
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        self.encode(header, payload, buf)
    }

    /// Appends the start of a data frame to `buf`: its length prefix and
    /// header, for a payload of `payload_len` bytes that the caller sends
    /// right after it (without copying it here). Returns the bytes
    /// appended.
    pub fn data_head(
        &self,
        header: &HighwayFrame,
        payload_len: usize,
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        self.head(header, payload_len, buf)
    }

    fn encode<H: Serialize>(
        &self,
        header: &H,
        payload: &[u8],
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        let head = self.head(header, payload.len(), buf)?;
        buf.extend_from_slice(payload);
        Ok(head + payload.len())
    }

    fn head<H: Serialize>(
        &self,
        header: &H,
        payload_len: usize,
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        let start = buf.len();
        buf.put_u32(0);
        if let Err(e) = postcard::to_io(header, (&mut *buf).writer()) {
            buf.truncate(start);
            return Err(EncodeError::Header {
                detail: e.to_string(),
            });
        }
        let len = buf.len() - start - LENGTH_BYTES + payload_len;
        let Some(prefix) = u32::try_from(len).ok().filter(|&l| l <= self.max) else {
            buf.truncate(start);
            return Err(EncodeError::TooLarge { len, max: self.max });
        };
        buf[start..start + LENGTH_BYTES].copy_from_slice(&prefix.to_be_bytes());
        Ok(buf.len() - start)
    }
}

/// Reads one Highway stream incrementally: feed it the bytes as they
/// arrive ([`Decoder::feed`], or read straight into
/// [`Decoder::buffer_mut`]), then take whole frames
/// ([`Decoder::next_control`] or [`Decoder::next_data`]) until they give
/// `Ok(None)`, and call [`Decoder::finish`] when the stream ends.
///
/// It never trusts a length beyond its maximum, never allocates from one,
/// and never panics on any input. After a fatal error
/// ([`WireError::is_fatal`]) it keeps returning that error: close the
/// stream.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max: u32,
    failed: Option<WireError>,
    /// A frame of [`POOLED_FRAME`] bytes or more under way.
    large: Option<Large>,
}

/// A large frame under way, copied as it arrives into a buffer from the
/// pool that grows fourfold at a time up to the frame's size: so a
/// megabyte frame is not copied again and again as a doubling buffer
/// would be, nor faulted into fresh pages each time, and the buffer is the
/// frame when it is whole. It is never more than four times what arrived
/// (at least [`POOLED_FRAME`]): nothing is allocated for bytes a peer only
/// announced, and nothing quinn read into is held on to (a piece of a
/// datagram would keep the whole receive batch it came in alive).
#[derive(Debug)]
struct Large {
    /// The whole frame's length, prefix included.
    need: usize,
    /// The frame so far, prefix included.
    body: Vec<u8>,
}

impl Large {
    /// Copies in what `bytes` has of the frame; returns the rest.
    fn take<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let (mine, rest) = bytes.split_at((self.need - self.body.len()).min(bytes.len()));
        let want = self.body.len() + mine.len();
        if want > self.body.capacity() {
            let mut grown = pool::take(room_for(want, self.need));
            grown.extend_from_slice(&self.body);
            pool::give(std::mem::replace(&mut self.body, grown));
        }
        self.body.extend_from_slice(mine);
        rest
    }
}

/// The room a large frame's buffer grows to when `want` bytes of it
/// (of `need`) no longer fit: four times that, at least [`POOLED_FRAME`],
/// at most the frame.
fn room_for(want: usize, need: usize) -> usize {
    want.saturating_mul(4)
        .clamp(POOLED_FRAME, need.max(POOLED_FRAME))
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder for frames of at most `max` bytes, prefix excluded.
    pub fn new(max: u32) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
            failed: None,
            large: None,
        }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        let rest = match &mut self.large {
            Some(large) => large.take(bytes),
            None => bytes,
        };
        self.buf.extend_from_slice(rest);
    }

    /// The buffer bytes read from the stream are appended to, for a shell
    /// that reads into it directly.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes held that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.large.as_ref().map_or(0, |l| l.body.len())
    }

    /// The next control frame, `Ok(None)` when no whole frame is buffered.
    pub fn next_control(&mut self) -> Result<Option<ControlFrame>, WireError> {
        let Some((frame, payload)) = self.next_frame::<ControlFrame>()? else {
            return Ok(None);
        };
        if !payload.is_empty() {
            return Err(WireError::UnexpectedPayload { len: payload.len() });
        }
        Ok(Some(frame))
    }

    /// The next data frame, `Ok(None)` when no whole frame is buffered.
    pub fn next_data(&mut self) -> Result<Option<DataFrame>, WireError> {
        let Some((header, payload)) = self.next_frame::<HighwayFrame>()? else {
            return Ok(None);
        };
        match header {
            HighwayFrame::LinkState(_) => return Err(WireError::WrongStream { tag: 0 }),
            HighwayFrame::Unroutable { .. } if !payload.is_empty() => {
                return Err(WireError::UnexpectedPayload { len: payload.len() });
            }
            _ => {}
        }
        Ok(Some(DataFrame { header, payload }))
    }

    /// Checks what is left when the stream ends: nothing, or the start of a
    /// frame that will never be completed.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if let Some(large) = &self.large {
            return Err(WireError::Truncated {
                have: large.body.len() + self.buf.len(),
                need: large.need,
            });
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = match self.peek_length() {
            Ok(Some(len)) => LENGTH_BYTES + len,
            Ok(None) => LENGTH_BYTES,
            Err(e) => return Err(e),
        };
        Err(WireError::Truncated {
            have: self.buf.len(),
            need,
        })
    }

    /// Takes one whole frame off the buffer: its header decoded as `H`, and
    /// the bytes after it.
    fn next_frame<H: DeserializeOwned>(&mut self) -> Result<Option<(H, Bytes)>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let body = match self.large.take() {
            Some(large) if large.body.len() < large.need => {
                self.large = Some(large);
                return Ok(None);
            }
            Some(large) => pool::into_bytes(large.body).slice(LENGTH_BYTES..),
            None => {
                let len = match self.peek_length() {
                    Ok(Some(len)) => len,
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        self.failed = Some(e.clone());
                        return Err(e);
                    }
                };
                let need = LENGTH_BYTES + len;
                if self.buf.len() < need {
                    if need >= POOLED_FRAME {
                        // What came so far is the frame's start; what
                        // follows goes straight into its own buffer.
                        let mut large = Large {
                            need,
                            body: Vec::new(),
                        };
                        large.take(&self.buf);
                        self.buf.clear();
                        self.large = Some(large);
                    }
                    return Ok(None);
                }
                self.buf.advance(LENGTH_BYTES);
                self.buf.split_to(len).freeze()
            }
        };
        let (header, rest) =
            postcard::take_from_bytes::<H>(&body).map_err(|e| WireError::BadHeader {
                detail: e.to_string(),
            })?;
        let header_len = body.len() - rest.len();
        Ok(Some((header, body.slice(header_len..))))
    }

    /// The length of the frame at the front, checked, or `None` when fewer
    /// than four bytes are there.
    fn peek_length(&self) -> Result<Option<usize>, WireError> {
        let Some(&[a, b, c, d]) = self.buf.get(..LENGTH_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        if len == 0 {
            return Err(WireError::ZeroLength);
        }
        if len > self.max {
            return Err(WireError::TooLarge { len, max: self.max });
        }
        usize::try_from(len)
            .map(Some)
            .map_err(|_| WireError::TooLarge { len, max: self.max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use junction_road::highway::{Hops, Neighbour};
    use proptest::prelude::*;

    fn control_bytes(frame: &ControlFrame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Encoder::default().control(frame, &mut buf).unwrap();
        buf.to_vec()
    }

    /// A head written alone, with its payload after it, is the frame
    /// `data` writes whole; and a head too large for the encoder is
    /// refused and leaves nothing behind.
    #[test]
    fn a_data_head_and_its_payload_make_the_whole_frame() {
        let header = HighwayFrame::Forward {
            from: 1,
            to: 3,
            route: Hops::new(&[2, 3]).unwrap(),
        };
        let payload = vec![9u8; 5000];
        let mut whole = BytesMut::new();
        let n = Encoder::default()
            .data(&header, &payload, &mut whole)
            .unwrap();
        let mut parts = BytesMut::from(&b"before"[..]);
        let head = Encoder::default()
            .data_head(&header, payload.len(), &mut parts)
            .unwrap();
        assert_eq!(head + payload.len(), n);
        parts.extend_from_slice(&payload);
        assert_eq!(&parts[6..], &whole[..]);
        let mut small = BytesMut::from(&b"before"[..]);
        let refused = Encoder::new(100).data_head(&header, payload.len(), &mut small);
        assert!(matches!(refused, Err(EncodeError::TooLarge { .. })));
        assert_eq!(&small[..], b"before");
    }

    /// A peer that announces the largest frame and sends it slowly gets
    /// no more memory than a few times what it sent.
    #[test]
    fn a_large_frame_costs_memory_as_it_arrives_not_as_announced() {
        let header = HighwayFrame::Forward {
            from: 1,
            to: 2,
            route: Hops::new(&[2]).unwrap(),
        };
        let mut buf = BytesMut::new();
        let payload = vec![7u8; DEFAULT_MAX_FRAME as usize - 64];
        Encoder::default()
            .data(&header, &payload, &mut buf)
            .unwrap();
        let need = buf.len();
        assert_eq!(room_for(20, need), POOLED_FRAME);
        assert_eq!(room_for(100_000, need), 400_000);
        assert_eq!(room_for(need - 1, need), need);
        let mut rx = Decoder::default();
        rx.feed(&buf[..20]);
        assert!(rx.next_data().unwrap().is_none());
        let mut sent = 20;
        for step in [1000, 100_000, 1 << 20] {
            rx.feed(&buf[sent..sent + step]);
            sent += step;
            assert!(rx.next_data().unwrap().is_none());
            assert_eq!(rx.buffered(), sent);
        }
        rx.feed(&buf[sent..]);
        let frame = rx.next_data().unwrap().unwrap();
        assert_eq!(&frame.payload[..], &payload[..]);
        rx.finish().unwrap();
    }

    /// The examples in docs/protocol.md section 18, byte for byte.
    #[test]
    fn frames_encode_as_documented() {
        let hello = ControlFrame::Hello(Hello {
            version: 1,
            junction: 2,
            incarnation: 1_700_000_000,
        });
        assert_eq!(
            control_bytes(&hello),
            [
                0x00, 0x00, 0x00, 0x08, 0x00, 0x01, 0x02, 0x80, 0xE2, 0xCF, 0xAA, 0x06
            ]
        );
        let ping = ControlFrame::KeepAlive { nonce: 7 };
        assert_eq!(control_bytes(&ping), [0x00, 0x00, 0x00, 0x02, 0x01, 0x07]);
        let pong = ControlFrame::KeepAliveAck { nonce: 300 };
        assert_eq!(
            control_bytes(&pong),
            [0x00, 0x00, 0x00, 0x03, 0x02, 0xAC, 0x02]
        );
        let bye = ControlFrame::Goodbye {
            reason: "bye".into(),
        };
        assert_eq!(
            control_bytes(&bye),
            [0x00, 0x00, 0x00, 0x05, 0x03, 0x03, b'b', b'y', b'e']
        );
        let ls = ControlFrame::LinkState(LinkState {
            origin: 2,
            incarnation: 1_700_000_000,
            seq: 3,
            neighbours: vec![Neighbour {
                junction: 1,
                cost: 1,
            }],
            names: vec![],
            seal: None,
        });
        assert_eq!(
            control_bytes(&ls),
            [
                0x00, 0x00, 0x00, 0x0D, 0x04, 0x02, 0x80, 0xE2, 0xCF, 0xAA, 0x06, 0x03, 0x01, 0x01,
                0x01, 0x00, 0x00
            ][..]
        );

        let forward = HighwayFrame::Forward {
            from: 1,
            to: 3,
            route: Hops::new(&[2, 3]).unwrap(),
        };
        let mut buf = BytesMut::new();
        Encoder::default().data(&forward, b"hi", &mut buf).unwrap();
        let back = HighwayFrame::Unroutable {
            from: 1,
            to: 3,
            at: 2,
            route: Hops::new(&[1]).unwrap(),
        };
        Encoder::default().data(&back, &[], &mut buf).unwrap();
        assert_eq!(
            buf[..],
            [
                0x00, 0x00, 0x00, 0x08, 0x01, 0x01, 0x03, 0x02, 0x02, 0x03, b'h', b'i', //
                0x00, 0x00, 0x00, 0x06, 0x02, 0x01, 0x03, 0x02, 0x01, 0x01,
            ]
        );

        let mut rx = Decoder::default();
        rx.feed(&buf);
        assert_eq!(
            rx.next_data().unwrap().unwrap(),
            DataFrame {
                header: forward,
                payload: Bytes::from_static(b"hi")
            }
        );
        assert_eq!(rx.next_data().unwrap().unwrap().header, back);
        assert_eq!(rx.next_data(), Ok(None));
        rx.finish().unwrap();

        let mut rx = Decoder::default();
        for frame in [hello, ping, pong, bye, ls] {
            rx.feed(&control_bytes(&frame));
            assert_eq!(rx.next_control().unwrap(), Some(frame));
        }
    }

    #[test]
    fn each_bad_input_has_its_own_error() {
        let mut rx = Decoder::new(16);
        rx.feed(&[0, 0, 0, 0]);
        assert_eq!(rx.next_control(), Err(WireError::ZeroLength));
        assert_eq!(rx.next_control(), Err(WireError::ZeroLength), "sticks");
        assert!(WireError::ZeroLength.is_fatal());

        let mut rx = Decoder::new(16);
        rx.feed(&17u32.to_be_bytes());
        assert_eq!(
            rx.next_data(),
            Err(WireError::TooLarge { len: 17, max: 16 })
        );

        let mut rx = Decoder::new(16);
        rx.feed(&[0, 0, 0, 3, 0xFF, 0xFF, 0xFF, 0, 0, 0, 2, 1, 7]);
        let err = rx.next_control().unwrap_err();
        assert!(matches!(err, WireError::BadHeader { .. }), "{err:?}");
        assert!(!err.is_fatal());
        assert_eq!(
            rx.next_control(),
            Ok(Some(ControlFrame::KeepAlive { nonce: 7 })),
            "the bad frame was skipped whole"
        );

        let mut rx = Decoder::new(16);
        rx.feed(&[0, 0, 0, 3, 1, 7, 0xAA]);
        assert_eq!(
            rx.next_control(),
            Err(WireError::UnexpectedPayload { len: 1 })
        );

        let mut rx = Decoder::new(64);
        let mut buf = BytesMut::new();
        Encoder::new(64)
            .control(
                &ControlFrame::LinkState(LinkState {
                    origin: 2,
                    incarnation: 1,
                    seq: 1,
                    neighbours: vec![],
                    names: vec![],
                    seal: None,
                }),
                &mut buf,
            )
            .unwrap();
        // A link state is tag 4 on the control stream; tag 0 on a data
        // stream is the same `HighwayFrame::LinkState` routing uses, refused.
        buf[LENGTH_BYTES] = 0;
        rx.feed(&buf);
        assert_eq!(rx.next_data(), Err(WireError::WrongStream { tag: 0 }));

        let mut rx = Decoder::new(64);
        let back = HighwayFrame::Unroutable {
            from: 1,
            to: 3,
            at: 2,
            route: Hops::new(&[1]).unwrap(),
        };
        let mut buf = BytesMut::new();
        Encoder::new(64).data(&back, b"x", &mut buf).unwrap();
        rx.feed(&buf);
        assert_eq!(rx.next_data(), Err(WireError::UnexpectedPayload { len: 1 }));

        let mut rx = Decoder::new(16);
        rx.feed(&[0, 0, 0, 10, 1, 2]);
        assert_eq!(rx.next_control(), Ok(None));
        assert_eq!(rx.finish(), Err(WireError::Truncated { have: 6, need: 14 }));
        let mut rx = Decoder::new(16);
        rx.feed(&[0, 0]);
        assert_eq!(rx.finish(), Err(WireError::Truncated { have: 2, need: 4 }));
    }

    #[test]
    fn the_encoder_refuses_frames_over_its_maximum() {
        let mut buf = BytesMut::from(&b"kept"[..]);
        let forward = HighwayFrame::Forward {
            from: 1,
            to: 3,
            route: Hops::new(&[3]).unwrap(),
        };
        let enc = Encoder::new(10);
        // Header of 5 bytes: 5 bytes of payload fit, 6 do not.
        assert_eq!(enc.data(&forward, &[0; 5], &mut buf), Ok(14));
        assert_eq!(
            enc.data(&forward, &[0; 6], &mut buf),
            Err(EncodeError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(buf.len(), 4 + 14, "nothing appended on refusal");
    }

    fn arb_control() -> impl Strategy<Value = ControlFrame> {
        prop_oneof![
            (any::<u16>(), any::<u16>(), any::<u64>()).prop_map(
                |(version, junction, incarnation)| {
                    ControlFrame::Hello(Hello {
                        version,
                        junction,
                        incarnation,
                    })
                }
            ),
            any::<u64>().prop_map(|nonce| ControlFrame::KeepAlive { nonce }),
            any::<u64>().prop_map(|nonce| ControlFrame::KeepAliveAck { nonce }),
            ".{0,40}".prop_map(|reason| ControlFrame::Goodbye { reason }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_any_chunks(
            frames in proptest::collection::vec(arb_control(), 1..10),
            chunk in 1usize..20,
        ) {
            let mut buf = BytesMut::new();
            for f in &frames {
                Encoder::default().control(f, &mut buf).unwrap();
            }
            let mut rx = Decoder::default();
            let mut out = Vec::new();
            for piece in buf.chunks(chunk) {
                rx.feed(piece);
                while let Some(f) = rx.next_control().unwrap() {
                    out.push(f);
                }
            }
            rx.finish().unwrap();
            prop_assert_eq!(out, frames);
        }

        /// Large frames among small ones, fed in pieces of any size, come
        /// out whole and in order, and a stream cut inside a large one is
        /// reported truncated.
        #[test]
        fn large_frames_round_trip_in_any_pieces(
            sizes in proptest::collection::vec(
                prop_oneof![0usize..100, POOLED_FRAME - 20..POOLED_FRAME + 3000],
                1..6,
            ),
            chunk in 1000usize..40_000,
            cut in any::<bool>(),
        ) {
            let header = HighwayFrame::Forward {
                from: 1,
                to: 2,
                route: Hops::new(&[2]).unwrap(),
            };
            let payloads: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|j| (i * 7 + j) as u8).collect())
                .collect();
            let mut buf = BytesMut::new();
            for p in &payloads {
                Encoder::default().data(&header, p, &mut buf).unwrap();
            }
            let whole = buf.len();
            let end = if cut { whole - 1 } else { whole };
            let mut rx = Decoder::default();
            let mut out = Vec::new();
            for piece in buf[..end].chunks(chunk) {
                rx.feed(piece);
                while let Some(f) = rx.next_data().unwrap() {
                    prop_assert_eq!(&f.header, &header);
                    out.push(f.payload.to_vec());
                }
            }
            if cut {
                prop_assert_eq!(&out[..], &payloads[..payloads.len() - 1]);
                let truncated = matches!(rx.finish(), Err(WireError::Truncated { .. }));
                prop_assert!(truncated);
            } else {
                rx.finish().unwrap();
                prop_assert_eq!(rx.buffered(), 0);
                prop_assert_eq!(out, payloads);
            }
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            data in any::<bool>(),
        ) {
            let mut rx = Decoder::new(256);
            rx.feed(&bytes);
            loop {
                let step = if data {
                    rx.next_data().map(|f| f.is_some())
                } else {
                    rx.next_control().map(|f| f.is_some())
                };
                match step {
                    Ok(true) => continue,
                    Ok(false) => { let _ = rx.finish(); break; }
                    Err(e) if e.is_fatal() => break,
                    Err(_) => continue,
                }
            }
        }
    }
}
