//! End-to-end protection of sessions between junctions: what the payload of
//! a `Forward` frame is. docs/protocol.md, part 2, section 17, gives the
//! bytes; `junction-identity`'s `secure` module does the cryptography and
//! `junction-core`'s `secure` module the handshake.
//!
//! A `Forward` payload is the postcard encoding of an [`Envelope`] followed,
//! for [`Envelope::Sealed`], by a session frame ([`crate::session`])
//! sealed with ChaCha20-Poly1305 (ciphertext, then the 16-byte tag), and for
//! [`Envelope::Plain`] by the session frame in clear, which only junctions
//! with no junction key send or take (development: unauthenticated).

use bytes::{BufMut, Bytes, BytesMut};
use junction_identity::secure::{EPHEMERAL_LEN, SessionKeys, TAG_LEN};
use junction_identity::{Certificate, IdentityError, Signature};
use serde::{Deserialize, Serialize};

use crate::Chained;
use crate::session::{self as wire, SessionFrame};

/// What a `Forward` payload carries. Variant order is the wire numbering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    /// A junction's half of the key agreement (tag 0); nothing follows.
    Hello(SessionHello),
    /// A session frame sealed under the session's keys, as the `counter`th
    /// frame its sender sealed under them (tag 1); ciphertext and tag
    /// follow.
    Sealed {
        /// Its sender's count of frames sealed under these keys, from 0;
        /// the nonce and the replay window's index.
        counter: u64,
    },
    /// A session frame in clear (tag 2), which follows: only between
    /// junctions with no junction key, which trust unsigned routing.
    Plain,
    /// Several session frames sealed together, as [`Envelope::Sealed`]
    /// seals one (tag 3): what opens is a [batch](batch_frames).
    SealedBatch {
        /// As [`Envelope::Sealed`]'s.
        counter: u64,
    },
    /// Several session frames in clear, as [`Envelope::Plain`] carries one
    /// (tag 4): a [batch](batch_frames) follows.
    PlainBatch,
}

/// The most bytes of session frames a sender gathers into one batch: small
/// messages share one seal and one `Forward` frame, and a batch stays far
/// below any frame limit. A frame this large or larger goes alone.
pub const BATCH_BYTES: usize = 16 * 1024;

/// A junction's hello: its ephemeral X25519 key, signed by its junction key,
/// with the certificate chain that certifies that key for its id. The
/// sender and receiver are the `Forward` frame's `from` and `to`, which the
/// signature covers ([`junction_identity::secure::HelloTranscript`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionHello {
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's ephemeral X25519 public key.
    pub ephemeral: [u8; EPHEMERAL_LEN],
    /// The receiver's ephemeral key this hello answers; `None` in a hello
    /// that starts a handshake (or asks the peer to start one).
    pub echo: Option<[u8; EPHEMERAL_LEN]>,
    /// The sender's certificate chain, leaf first: a junction certificate
    /// for the sender's id.
    pub chain: Vec<Certificate>,
    /// The sender's junction key's signature, for
    /// [`junction_identity::Purpose::SessionHello`], over the transcript.
    pub signature: Signature,
}

/// Why a `Forward` payload was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The envelope does not decode.
    #[error("the forwarded payload's envelope does not decode: {0}")]
    BadHeader(String),
    /// A hello has bytes after it.
    #[error("a session hello carries {len} bytes after it")]
    TrailingBytes {
        /// How many.
        len: usize,
    },
    /// A sealed frame is shorter than its tag.
    #[error("a sealed session frame has {len} bytes, fewer than its {TAG_LEN}-byte tag")]
    TooShort {
        /// How many it has.
        len: usize,
    },
    /// A sealed frame did not open: altered, forged or under other keys.
    #[error("{0}")]
    Unsealed(IdentityError),
    /// A batch's frame lengths do not add up to the batch.
    #[error("a batch of session frames is cut short at byte {at} of {len}")]
    BadBatch {
        /// Where its next frame should have started.
        at: usize,
        /// The batch's length.
        len: usize,
    },
}

/// Appends an envelope's header (for a hello, the whole of it) to `buf`.
pub fn encode(envelope: &Envelope, buf: &mut BytesMut) {
    match postcard::to_allocvec(envelope) {
        Ok(bytes) => buf.put_slice(&bytes),
        // Serialising into memory does not fail for these types.
        Err(_) => debug_assert!(false, "an envelope always encodes"),
    }
}

/// Splits a `Forward` payload into its envelope and what follows it
/// (empty for a hello), without copying.
pub fn decode(bytes: &Bytes) -> Result<(Envelope, Bytes), EnvelopeError> {
    let (envelope, rest) = postcard::take_from_bytes::<Envelope>(bytes)
        .map_err(|e| EnvelopeError::BadHeader(e.to_string()))?;
    let body = bytes.slice(bytes.len() - rest.len()..);
    match envelope {
        Envelope::Hello(_) if !body.is_empty() => {
            Err(EnvelopeError::TrailingBytes { len: body.len() })
        }
        Envelope::Sealed { .. } | Envelope::SealedBatch { .. } if body.len() < TAG_LEN => {
            Err(EnvelopeError::TooShort { len: body.len() })
        }
        _ => Ok((envelope, body)),
    }
}

/// A session frame and its payload in clear, as a `Forward` payload. A
/// large payload ([`crate::pool::POOLED_FRAME`] or more) keeps its large
/// piece as it is, behind the headers; a smaller one is copied in whole.
pub fn plain(frame: &SessionFrame, payload: &Chained) -> Chained {
    let mut head = BytesMut::with_capacity(1 + 64);
    encode(&Envelope::Plain, &mut head);
    wire::encode(frame, &[], &mut head);
    if payload.len() < crate::pool::POOLED_FRAME {
        payload.put_into(&mut head);
        return head.freeze().into();
    }
    if payload.body().is_empty() {
        return Chained::new(head.freeze(), payload.head().clone());
    }
    head.put_slice(payload.head());
    Chained::new(head.freeze(), payload.body().clone())
}

/// A session frame and its payload sealed under `keys` as the `counter`th
/// frame, as a `Forward` payload: the payload is copied once, into the
/// buffer it is encrypted in.
pub fn seal(
    keys: &SessionKeys,
    counter: u64,
    frame: &SessionFrame,
    payload: &Chained,
) -> Result<Bytes, IdentityError> {
    seal_with(keys, counter, 64 + payload.len(), |buf| {
        put_frame(frame, payload, buf)
    })
}

/// Session frames and their payloads in clear, as one `Forward` payload
/// ([`Envelope::PlainBatch`]).
pub fn plain_batch(frames: &[(SessionFrame, Chained)]) -> Bytes {
    let mut buf = BytesMut::with_capacity(1 + batch_size(frames));
    encode(&Envelope::PlainBatch, &mut buf);
    put_batch(frames, &mut buf);
    buf.freeze()
}

/// Session frames and their payloads sealed together under `keys` as the
/// `counter`th frame, as one `Forward` payload ([`Envelope::SealedBatch`]):
/// each payload is copied once, into the buffer it is encrypted in.
pub fn seal_batch(
    keys: &SessionKeys,
    counter: u64,
    frames: &[(SessionFrame, Chained)],
) -> Result<Bytes, IdentityError> {
    let mut buf = BytesMut::with_capacity(1 + 10 + batch_size(frames) + TAG_LEN);
    encode(&Envelope::SealedBatch { counter }, &mut buf);
    let start = buf.len();
    put_batch(frames, &mut buf);
    let tag = keys.seal(counter, &mut buf[start..])?;
    buf.put_slice(&tag);
    Ok(buf.freeze())
}

/// Room for a batch of `frames`: each session header takes at most 64
/// bytes, and its length 4.
fn batch_size(frames: &[(SessionFrame, Chained)]) -> usize {
    frames.iter().map(|(_, p)| 4 + 64 + p.len()).sum()
}

/// Appends a batch: each session frame ([`crate::session::encode`])
/// preceded by its length, a `u32` little-endian.
fn put_batch(frames: &[(SessionFrame, Chained)], buf: &mut BytesMut) {
    for (frame, payload) in frames {
        let at = buf.len();
        buf.put_u32_le(0);
        put_frame(frame, payload, buf);
        let len = u32::try_from(buf.len() - at - 4).unwrap_or(u32::MAX);
        buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Appends a session frame ([`crate::session::encode`]) with its payload.
fn put_frame(frame: &SessionFrame, payload: &Chained, buf: &mut BytesMut) {
    wire::encode(frame, &[], buf);
    payload.put_into(buf);
}

/// The session frames of a batch (opened, or in clear), without copying;
/// an error ends it where the lengths stop adding up.
pub fn batch_frames(batch: &Bytes) -> impl Iterator<Item = Result<Bytes, EnvelopeError>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= batch.len() {
            return None;
        }
        let len = batch.len();
        let frame = batch
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .and_then(|n| Some(at + 4..(at + 4).checked_add(n)?))
            .filter(|r| r.end <= len);
        match frame {
            Some(r) => {
                at = r.end;
                Some(Ok(batch.slice(r)))
            }
            None => {
                let e = EnvelopeError::BadBatch { at, len };
                at = len;
                Some(Err(e))
            }
        }
    })
}

/// An empty sealed frame, the `counter`th under `keys`: it carries no
/// session frame, and tells the peer that these keys are in use (a key
/// confirmation).
pub fn seal_empty(keys: &SessionKeys, counter: u64) -> Result<Bytes, IdentityError> {
    seal_with(keys, counter, 0, |_| {})
}

fn seal_with(
    keys: &SessionKeys,
    counter: u64,
    size: usize,
    write: impl FnOnce(&mut BytesMut),
) -> Result<Bytes, IdentityError> {
    let mut buf = BytesMut::with_capacity(1 + 10 + size + TAG_LEN);
    encode(&Envelope::Sealed { counter }, &mut buf);
    let start = buf.len();
    write(&mut buf);
    let tag = keys.seal(counter, &mut buf[start..])?;
    buf.put_slice(&tag);
    Ok(buf.freeze())
}

/// Opens the body of an [`Envelope::Sealed`] (ciphertext and tag) under
/// `keys`: the session frame it holds ([`crate::session::decode`] splits
/// it), or nothing for a key confirmation.
pub fn open(keys: &SessionKeys, counter: u64, body: Bytes) -> Result<Bytes, EnvelopeError> {
    let mut buf = body
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let len = keys
        .open(counter, &mut buf)
        .map_err(EnvelopeError::Unsealed)?
        .len();
    buf.truncate(len);
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use junction_identity::SecretKey;
    use junction_identity::secure::{HelloTranscript, Party};

    use super::*;
    use crate::session::{SessionAck, SessionData};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key of the example: `openssl genpkey -algorithm ed25519`.
    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEILhztnF27cX9NxuHBcbxQIPdxkP0695FR9r1sBtK66O1\n-----END PRIVATE KEY-----\n";

    /// The examples in docs/protocol.md section 17, byte for byte.
    #[test]
    fn envelopes_encode_as_documented() {
        // Junction 3 answers junction 1's hello.
        let key = SecretKey::from_pem(PEM).unwrap();
        let transcript = HelloTranscript {
            from: 3,
            to: 1,
            incarnation: 1_700_000_100,
            ephemeral: [0x33; 32],
            echo: Some([0x11; 32]),
        };
        let mut expected_transcript = vec![0x03, 0x00, 0x01, 0x00];
        expected_transcript.extend(1_700_000_100u64.to_le_bytes());
        expected_transcript.extend([0x33; 32]);
        expected_transcript.push(0x01);
        expected_transcript.extend([0x11; 32]);
        assert_eq!(transcript.bytes(), expected_transcript);
        let signature = transcript.sign(&key);
        assert_eq!(
            hex(&signature.0),
            "ef1b4e5985a1408b7a4f582cecabf37c0b32dbc4f60e1c602cdd385ee76cf6ae\
             94258d8303eecd5932769974d6f6a3e2c4ac953267c609e20b810f397ccb8d01"
        );
        let hello = Envelope::Hello(SessionHello {
            incarnation: 1_700_000_100,
            ephemeral: [0x33; 32],
            echo: Some([0x11; 32]),
            chain: vec![],
            signature: signature.clone(),
        });
        let mut buf = BytesMut::new();
        encode(&hello, &mut buf);
        let mut expected = vec![0x00, 0xE4, 0xE2, 0xCF, 0xAA, 0x06];
        expected.extend([0x33; 32]);
        expected.push(0x01);
        expected.extend([0x11; 32]);
        expected.push(0x00); // no certificate (a real hello has its chain)
        expected.push(0x40);
        expected.extend(signature.0);
        assert_eq!(buf.to_vec(), expected);
        let bytes = buf.freeze();
        assert_eq!(decode(&bytes).unwrap(), (hello, Bytes::new()));

        // Junction 1 seals an acknowledgement for junction 3, its 5th frame.
        let one = Party {
            junction: 1,
            incarnation: 1_700_000_000,
            ephemeral: [0x11; 32],
        };
        let three = Party {
            junction: 3,
            incarnation: 1_700_000_100,
            ephemeral: [0x33; 32],
        };
        let keys = SessionKeys::derive(&[0x42; 32], one, three).unwrap();
        let ack = SessionFrame::Ack(SessionAck {
            from_incarnation: 1_700_000_000,
            to_incarnation: 1_700_000_100,
            lane: 7,
            upto: 301,
        });
        let sealed = seal(&keys, 5, &ack, &Chained::default()).unwrap();
        assert_eq!(
            hex(&sealed),
            "0105de9f9458e347ca9d7e15155155c31cd39956deaccebb8e2d0f4048926311"
        );
        let (envelope, body) = decode(&sealed).unwrap();
        assert_eq!(envelope, Envelope::Sealed { counter: 5 });
        let theirs = SessionKeys::derive(&[0x42; 32], three, one).unwrap();
        let opened = open(&theirs, 5, body.clone()).unwrap();
        assert_eq!(wire::decode(&opened).unwrap(), (ack, Bytes::new()));
        let confirm = seal_empty(&keys, 6).unwrap();
        assert_eq!(confirm.len(), 2 + TAG_LEN);
        let (_, body6) = decode(&confirm).unwrap();
        assert_eq!(open(&theirs, 6, body6).unwrap(), Bytes::new());
        assert!(matches!(
            open(&keys, 5, body.clone()),
            Err(EnvelopeError::Unsealed(_))
        ));
        assert!(matches!(
            open(&theirs, 6, body),
            Err(EnvelopeError::Unsealed(_))
        ));

        // In clear, between keyless junctions: tag 2, then section 15.
        let data = SessionFrame::Data(SessionData {
            from_incarnation: 1,
            to_incarnation: 2,
            lane: 0,
            seq: 0,
            base: 0,
        });
        let p = plain(&data, &Bytes::from_static(b"hi").into()).to_bytes();
        assert_eq!(
            p.to_vec(),
            [0x02, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, b'h', b'i']
        );
        let (envelope, body) = decode(&p).unwrap();
        assert_eq!(envelope, Envelope::Plain);
        assert_eq!(
            wire::decode(&body).unwrap(),
            (data, Bytes::from_static(b"hi"))
        );
    }

    /// A large payload in clear keeps its large piece as it is, behind the
    /// headers, and reads as the same frame as one copied whole; a small
    /// one is one piece.
    #[test]
    fn a_large_payload_in_clear_is_not_copied() {
        let data = SessionFrame::Data(SessionData {
            from_incarnation: 1,
            to_incarnation: 2,
            lane: 0,
            seq: 9,
            base: 0,
        });
        let big = Bytes::from(vec![5u8; crate::pool::POOLED_FRAME]);
        let remote_head = Bytes::from_static(b"remote header");
        for payload in [
            Chained::new(remote_head.clone(), big.clone()),
            Chained::from(big.clone()),
        ] {
            let p = plain(&data, &payload);
            assert_eq!(p.body().as_ptr(), big.as_ptr(), "the payload is not copied");
            let (envelope, body) = decode(&p.to_bytes()).unwrap();
            assert_eq!(envelope, Envelope::Plain);
            assert_eq!(wire::decode(&body).unwrap(), (data, payload.to_bytes()));
        }
        let small = plain(&data, &Chained::new(remote_head, Bytes::from_static(b"x")));
        assert!(small.body().is_empty());
    }

    /// Several frames sealed together open into the same frames, in order;
    /// in clear, a batch is each frame after its length.
    #[test]
    fn batches_seal_and_split_into_their_frames() {
        let party = |junction, byte| Party {
            junction,
            incarnation: 7,
            ephemeral: [byte; 32],
        };
        let keys = SessionKeys::derive(&[0x42; 32], party(1, 0x11), party(3, 0x33)).unwrap();
        let theirs = SessionKeys::derive(&[0x42; 32], party(3, 0x33), party(1, 0x11)).unwrap();
        let data = |seq| {
            SessionFrame::Data(SessionData {
                from_incarnation: 1,
                to_incarnation: 2,
                lane: 0,
                seq,
                base: 0,
            })
        };
        let frames: Vec<_> = (0..3u64)
            .map(|i| (data(i), Chained::from(Bytes::from(format!("message {i}")))))
            .collect();
        let sealed = seal_batch(&keys, 9, &frames).unwrap();
        let (envelope, body) = decode(&sealed).unwrap();
        assert_eq!(envelope, Envelope::SealedBatch { counter: 9 });
        let opened = open(&theirs, 9, body).unwrap();
        let split: Vec<_> = batch_frames(&opened)
            .map(|f| wire::decode(&f.unwrap()).unwrap())
            .map(|(frame, payload)| (frame, payload.into()))
            .collect();
        assert_eq!(split, frames);

        let p = plain_batch(&frames[..1]);
        assert_eq!(
            p.to_vec(),
            [
                0x04, 15, 0, 0, 0, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, b'm', b'e', b's', b's',
                b'a', b'g', b'e', b' ', b'0'
            ]
        );
        // A length that runs past the end is an error, and ends the batch.
        let cut = Bytes::from_static(&[5, 0, 0, 0, 1, 2]);
        let mut frames = batch_frames(&cut);
        assert!(matches!(
            frames.next(),
            Some(Err(EnvelopeError::BadBatch { at: 0, len: 6 }))
        ));
        assert!(frames.next().is_none());
    }

    #[test]
    fn bad_envelopes_are_refused_with_reasons() {
        assert!(matches!(
            decode(&Bytes::new()),
            Err(EnvelopeError::BadHeader(_))
        ));
        assert!(matches!(
            decode(&Bytes::from_static(&[0x03])),
            Err(EnvelopeError::BadHeader(_))
        ));
        assert_eq!(
            decode(&Bytes::from_static(&[0x01, 0x05, 1, 2, 3])),
            Err(EnvelopeError::TooShort { len: 3 })
        );
        // A hello cut short.
        assert!(matches!(
            decode(&Bytes::from_static(&[0x00, 0x01, 0x33])),
            Err(EnvelopeError::BadHeader(_))
        ));
    }

    proptest::proptest! {
        /// Whatever the bytes, decoding and opening answer, never panic.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let keys = SessionKeys::derive(
                &[1; 32],
                Party { junction: 1, incarnation: 1, ephemeral: [1; 32] },
                Party { junction: 2, incarnation: 1, ephemeral: [2; 32] },
            ).unwrap();
            let bytes = Bytes::from(bytes);
            if let Ok((Envelope::Sealed { counter }, body)) = decode(&bytes) {
                proptest::prop_assert!(open(&keys, counter, body).is_err());
            }
        }

        /// A payload in two pieces, split anywhere, small or large, encodes
        /// to the same bytes as the same payload in one piece, in clear,
        /// sealed, alone or in a batch; and it decodes back whole.
        #[test]
        fn a_payload_encodes_the_same_wherever_it_splits(
            len in proptest::prop_oneof![0..200usize, 65_000..70_000usize],
            at in proptest::num::usize::ANY,
            seq in 0..u64::MAX,
        ) {
            let keys = SessionKeys::derive(
                &[1; 32],
                Party { junction: 1, incarnation: 1, ephemeral: [1; 32] },
                Party { junction: 2, incarnation: 1, ephemeral: [2; 32] },
            ).unwrap();
            let whole = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>());
            let at = if len == 0 { 0 } else { at % (len + 1) };
            let split = Chained::new(whole.slice(..at), whole.slice(at..));
            let whole = Chained::from(whole);
            let frame = SessionFrame::Data(SessionData {
                from_incarnation: 1,
                to_incarnation: 2,
                lane: 3,
                seq,
                base: 0,
            });
            proptest::prop_assert_eq!(plain(&frame, &split), plain(&frame, &whole));
            proptest::prop_assert_eq!(
                seal(&keys, 7, &frame, &split).unwrap(),
                seal(&keys, 7, &frame, &whole).unwrap()
            );
            let batch = |p: &Chained| vec![(frame, p.clone()), (frame, Chained::default())];
            proptest::prop_assert_eq!(plain_batch(&batch(&split)), plain_batch(&batch(&whole)));
            proptest::prop_assert_eq!(
                seal_batch(&keys, 8, &batch(&split)).unwrap(),
                seal_batch(&keys, 8, &batch(&whole)).unwrap()
            );
            let (envelope, body) = decode(&plain(&frame, &split).to_bytes()).unwrap();
            proptest::prop_assert_eq!(envelope, Envelope::Plain);
            proptest::prop_assert_eq!(wire::decode(&body).unwrap(), (frame, whole.to_bytes()));
        }
    }
}
