//! End-to-end keys of a session between two junctions: each side's hello
//! (an X25519 ephemeral key signed by its junction key), the two
//! directional keys they agree on, and sealing and opening of session
//! frames under them. The wire form is `junction-road`'s `secure` module;
//! docs/protocol.md, part 2, section 17, gives the bytes.
//!
//! Every primitive is `ring`'s: X25519 ([`ring::agreement`]), HKDF-SHA256
//! ([`ring::hkdf`]) and ChaCha20-Poly1305 ([`ring::aead`]). Nothing of ring
//! shows in this module's API, as nothing of dalek shows in [`crate::keys`].

use std::fmt;

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf::{self, HKDF_SHA256, KeyType};
use ring::rand::SystemRandom;

use crate::IdentityError;
use crate::keys::{PublicKey, Purpose, SecretKey, Signature};

/// Bytes of an X25519 public key.
pub const EPHEMERAL_LEN: usize = 32;

/// Bytes of the authentication tag after a sealed frame's ciphertext.
pub const TAG_LEN: usize = 16;

/// The HKDF salt of session keys.
pub const KEY_SALT: &[u8] = b"junction/v1/session-keys\0";

/// What a session hello's signature covers (for [`Purpose::SessionHello`]):
/// who says it to whom, in which life, with which ephemeral key, and which
/// of the peer's ephemeral keys it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloTranscript {
    /// The junction that says it.
    pub from: u16,
    /// The junction it is for.
    pub to: u16,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's ephemeral X25519 public key.
    pub ephemeral: [u8; EPHEMERAL_LEN],
    /// The peer's ephemeral key this hello answers, if it answers one.
    pub echo: Option<[u8; EPHEMERAL_LEN]>,
}

impl HelloTranscript {
    /// The signed bytes (after the purpose's context): `from` and `to` as
    /// u16 little-endian, `incarnation` as u64 little-endian, the 32
    /// ephemeral bytes, then 0x00 for no echo or 0x01 and the 32 echoed
    /// bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(2 + 2 + 8 + 32 + 1 + 32);
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&self.to.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.ephemeral);
        match &self.echo {
            None => b.push(0),
            Some(echo) => {
                b.push(1);
                b.extend_from_slice(echo);
            }
        }
        b
    }

    /// Signs it with the sender's junction key.
    pub fn sign(&self, key: &SecretKey) -> Signature {
        key.sign(Purpose::SessionHello, &self.bytes())
    }

    /// Checks `signature` over it with the sender's junction key `key`
    /// (which the caller took from a verified certificate for `from`).
    pub fn verify(&self, key: &PublicKey, signature: &Signature) -> Result<(), IdentityError> {
        key.verify(Purpose::SessionHello, &self.bytes(), signature)
    }
}

/// One end of a session, as the key derivation binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    /// Its junction id.
    pub junction: u16,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its ephemeral public key.
    pub ephemeral: [u8; EPHEMERAL_LEN],
}

impl Party {
    fn put(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.junction.to_le_bytes());
        b.extend_from_slice(&self.incarnation.to_le_bytes());
        b.extend_from_slice(&self.ephemeral);
    }
}

/// An ephemeral X25519 key pair. Its private half can be used once: an
/// agreement consumes it.
pub struct Ephemeral {
    private: EphemeralPrivateKey,
    public: [u8; EPHEMERAL_LEN],
}

impl Ephemeral {
    /// A new key pair from the operating system's randomness.
    pub fn generate() -> Result<Self, IdentityError> {
        let rng = SystemRandom::new();
        let no_randomness = |_| IdentityError::Randomness("X25519 key generation".into());
        let private = EphemeralPrivateKey::generate(&X25519, &rng).map_err(no_randomness)?;
        let public = private.compute_public_key().map_err(no_randomness)?;
        let public = public
            .as_ref()
            .try_into()
            .map_err(|_| IdentityError::KeyAgreement)?;
        Ok(Self { private, public })
    }

    /// The public half, which a hello carries.
    pub fn public(&self) -> [u8; EPHEMERAL_LEN] {
        self.public
    }

    /// Agrees with `peer` on the session's keys, as junction `me` in its
    /// `incarnation`: X25519 with the peer's ephemeral key, then HKDF (see
    /// [`SessionKeys::derive`]). Consumes the private half.
    pub fn agree(
        self,
        me: u16,
        incarnation: u64,
        peer: Party,
    ) -> Result<SessionKeys, IdentityError> {
        let own = Party {
            junction: me,
            incarnation,
            ephemeral: self.public,
        };
        let theirs = UnparsedPublicKey::new(&X25519, peer.ephemeral);
        agreement::agree_ephemeral(self.private, &theirs, |shared| {
            SessionKeys::derive(shared, own, peer)
        })
        .map_err(|_| IdentityError::KeyAgreement)?
    }
}

impl fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ephemeral(public {:02x?}…)", &self.public[..4])
    }
}

/// A length for HKDF's output.
struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The keys of one session, one per direction, and whom they bind.
pub struct SessionKeys {
    own: Party,
    peer: Party,
    seal: LessSafeKey,
    open: LessSafeKey,
}

impl SessionKeys {
    /// The keys from an X25519 shared secret: HKDF-SHA256 with salt
    /// [`KEY_SALT`] and info the two parties, the lower junction id first,
    /// each as its id (u16 LE), incarnation (u64 LE) and ephemeral key; 64
    /// bytes of output, the first 32 the key of the lower id's frames, the
    /// other 32 the higher's. Public for test vectors; sessions get their
    /// keys from [`Ephemeral::agree`].
    pub fn derive(shared: &[u8], own: Party, peer: Party) -> Result<Self, IdentityError> {
        if own.junction == peer.junction {
            return Err(IdentityError::KeyAgreement);
        }
        let (lo, hi) = if own.junction < peer.junction {
            (own, peer)
        } else {
            (peer, own)
        };
        let mut info = Vec::with_capacity(2 * 42);
        lo.put(&mut info);
        hi.put(&mut info);
        let mut okm = zeroize::Zeroizing::new([0u8; 64]);
        hkdf::Salt::new(HKDF_SHA256, KEY_SALT)
            .extract(shared)
            .expand(&[&info], Len(64))
            .and_then(|okm_| okm_.fill(&mut okm[..]))
            .map_err(|_| IdentityError::KeyAgreement)?;
        let key = |bytes: &[u8]| {
            UnboundKey::new(&CHACHA20_POLY1305, bytes)
                .map(LessSafeKey::new)
                .map_err(|_| IdentityError::KeyAgreement)
        };
        let (lo_key, hi_key) = (key(&okm[..32])?, key(&okm[32..])?);
        let (seal, open) = if own.junction < peer.junction {
            (lo_key, hi_key)
        } else {
            (hi_key, lo_key)
        };
        Ok(Self {
            own,
            peer,
            seal,
            open,
        })
    }

    /// This end, as bound.
    pub fn own(&self) -> Party {
        self.own
    }

    /// The peer, as bound.
    pub fn peer(&self) -> Party {
        self.peer
    }

    /// Seals `in_out` (a session frame) in place as the `counter`th frame
    /// of this end under these keys, and returns the tag that follows it.
    /// A counter must never be used twice with the same keys.
    pub fn seal(&self, counter: u64, in_out: &mut [u8]) -> Result<[u8; TAG_LEN], IdentityError> {
        let aad = aad(&self.own, &self.peer, counter);
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| IdentityError::Unsealed)?;
        tag.as_ref().try_into().map_err(|_| IdentityError::Unsealed)
    }

    /// Opens, in place, the peer's `counter`th frame: ciphertext then tag.
    /// The plaintext is the returned start of `in_out`. Fails if anything
    /// was altered, or it was sealed under other keys or for another
    /// counter.
    pub fn open<'a>(
        &self,
        counter: u64,
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], IdentityError> {
        let aad = aad(&self.peer, &self.own, counter);
        self.open
            .open_in_place(nonce(counter), Aad::from(aad), in_out)
            .map_err(|_| IdentityError::Unsealed)
    }
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("own", &self.own)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The nonce of the `counter`th frame: four zero bytes, then the counter
/// as u64 little-endian (as WireGuard's).
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The associated data of a frame from `sender` to `receiver`: both ids
/// (u16 LE), both incarnations (u64 LE), then the counter (u64 LE).
fn aad(sender: &Party, receiver: &Party, counter: u64) -> [u8; 28] {
    let mut a = [0u8; 28];
    a[0..2].copy_from_slice(&sender.junction.to_le_bytes());
    a[2..4].copy_from_slice(&receiver.junction.to_le_bytes());
    a[4..12].copy_from_slice(&sender.incarnation.to_le_bytes());
    a[12..20].copy_from_slice(&receiver.incarnation.to_le_bytes());
    a[20..28].copy_from_slice(&counter.to_le_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let (a, c) = (
            Ephemeral::generate().unwrap(),
            Ephemeral::generate().unwrap(),
        );
        let (pa, pc) = (a.public(), c.public());
        let ka = a
            .agree(
                1,
                10,
                Party {
                    junction: 3,
                    incarnation: 30,
                    ephemeral: pc,
                },
            )
            .unwrap();
        let kc = c
            .agree(
                3,
                30,
                Party {
                    junction: 1,
                    incarnation: 10,
                    ephemeral: pa,
                },
            )
            .unwrap();
        (ka, kc)
    }

    #[test]
    fn both_ends_agree_and_each_direction_has_its_key() {
        let (a, c) = pair();
        let mut frame = b"a session frame".to_vec();
        let tag = a.seal(0, &mut frame).unwrap();
        assert_ne!(&frame[..], b"a session frame");
        let mut sealed = [frame.clone(), tag.to_vec()].concat();
        assert_eq!(c.open(0, &mut sealed).unwrap(), b"a session frame");
        // Not under its own sending key, nor for another counter.
        let mut again = [frame.clone(), tag.to_vec()].concat();
        assert!(a.open(0, &mut again).is_err());
        let mut again = [frame.clone(), tag.to_vec()].concat();
        assert!(c.open(1, &mut again).is_err());
        // Any flipped bit is caught.
        for bit in 0..(frame.len() + TAG_LEN) * 8 {
            let mut bad = [frame.clone(), tag.to_vec()].concat();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(c.open(0, &mut bad), Err(IdentityError::Unsealed));
        }
        // The other way.
        let mut back = b"back".to_vec();
        let tag = c.seal(7, &mut back).unwrap();
        back.extend(tag);
        assert_eq!(a.open(7, &mut back).unwrap(), b"back");
    }

    #[test]
    fn hellos_are_bound_to_sender_receiver_and_purpose() {
        let key = SecretKey::generate().unwrap();
        let t = HelloTranscript {
            from: 1,
            to: 3,
            incarnation: 9,
            ephemeral: [7; 32],
            echo: None,
        };
        let sig = t.sign(&key);
        t.verify(&key.public(), &sig).unwrap();
        for other in [
            HelloTranscript { from: 2, ..t },
            HelloTranscript { to: 4, ..t },
            HelloTranscript {
                incarnation: 10,
                ..t
            },
            HelloTranscript {
                ephemeral: [8; 32],
                ..t
            },
            HelloTranscript {
                echo: Some([0; 32]),
                ..t
            },
        ] {
            assert!(other.verify(&key.public(), &sig).is_err(), "{other:?}");
        }
        assert!(
            key.public()
                .verify(Purpose::LinkState, &t.bytes(), &sig)
                .is_err()
        );
    }

    #[test]
    fn a_bad_ephemeral_key_is_refused() {
        let e = Ephemeral::generate().unwrap();
        // The all-zero point has small order: X25519 with it is refused.
        let zero = Party {
            junction: 2,
            incarnation: 1,
            ephemeral: [0; 32],
        };
        assert_eq!(
            e.agree(1, 1, zero).unwrap_err(),
            IdentityError::KeyAgreement
        );
    }

    /// Seal and open cost, 64 B and 1 MiB (docs/protocol.md section 17).
    /// `cargo test --release -p junction-identity seal_costs -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn seal_costs() {
        let (a, c) = pair();
        for size in [64usize, 1 << 20] {
            let rounds = if size == 64 { 100_000 } else { 100 };
            let mut buf = vec![0u8; size];
            let t = std::time::Instant::now();
            for i in 0..rounds {
                let tag = a.seal(i, &mut buf).unwrap();
                buf.extend(tag);
                let n = c.open(i, &mut buf).unwrap().len();
                buf.truncate(n);
            }
            let each = t.elapsed() / rounds as u32;
            println!("seal + open of {size} B: {each:?}");
        }
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            let _ = pair();
        }
        println!(
            "two ephemeral keys and both agreements: {:?}",
            t.elapsed() / 1000
        );
    }
}
