//! Keys and signatures: ed25519, with every signature bound to its purpose.

use std::fmt;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::IdentityError;

/// What a signature is for. The purpose is signed along with the message, so
/// a signature made for one purpose is worthless for any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purpose {
    /// A certificate's body.
    Certificate,
    /// A revocation list's body.
    RevocationList,
    /// A proof of key possession over a junction's nonce.
    ProofOfPossession,
    /// A capability token.
    CapabilityToken,
    /// A delegation link of a capability token.
    Delegation,
    /// A junction's description of its links (routing), so that no other
    /// junction can describe them for it.
    LinkState,
    /// A junction's hello opening an end-to-end session with another
    /// (its ephemeral key), so that no transit junction can make one.
    SessionHello,
}

impl Purpose {
    fn context(self) -> &'static [u8] {
        match self {
            Purpose::Certificate => b"junction/v1/certificate\0",
            Purpose::RevocationList => b"junction/v1/revocation-list\0",
            Purpose::ProofOfPossession => b"junction/v1/proof-of-possession\0",
            Purpose::CapabilityToken => b"junction/v1/capability-token\0",
            Purpose::Delegation => b"junction/v1/delegation\0",
            Purpose::LinkState => b"junction/v1/link-state\0",
            Purpose::SessionHello => b"junction/v1/session-hello\0",
        }
    }
}

fn framed(purpose: Purpose, message: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(purpose.context().len() + message.len());
    m.extend_from_slice(purpose.context());
    m.extend_from_slice(message);
    m
}

/// An ed25519 secret key. Zeroed when dropped; never printed.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(|e| IdentityError::Randomness(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Reads a PKCS#8 PEM key (`-----BEGIN PRIVATE KEY-----`), as written by
    /// [`SecretKey::to_pem`] or `openssl genpkey -algorithm ed25519`.
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| IdentityError::KeyFormat(e.to_string()))
    }

    /// Writes the key as PKCS#8 v1 PEM, the form openssl reads and writes.
    pub fn to_pem(&self) -> Result<Zeroizing<String>, IdentityError> {
        let bytes = KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        bytes
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| Zeroizing::new(pem.to_string()))
            .map_err(|e| IdentityError::KeyFormat(e.to_string()))
    }

    /// The key as PKCS#8 v1 DER, for TLS stacks (rustls, ring) that sign
    /// with it themselves; [`SecretKey::to_pem`] is the same in armour.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
        let bytes = KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        bytes
            .to_pkcs8_der()
            .map(|doc| Zeroizing::new(doc.as_bytes().to_vec()))
            .map_err(|e| IdentityError::KeyFormat(e.to_string()))
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message` for `purpose`.
    pub fn sign(&self, purpose: Purpose, message: &[u8]) -> Signature {
        Signature(self.0.sign(&framed(purpose, message)).to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {}, secret redacted)", self.public())
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Checks `signature` over `message` made for `purpose`.
    pub fn verify(
        &self,
        purpose: Purpose,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), IdentityError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| IdentityError::BadSignature)?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(&framed(purpose, message), &signature)
            .map_err(|_| IdentityError::BadSignature)
    }

    /// The key as hex, the form people compare.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::KeyFormat(format!("{hex:?} is not 64 hex digits"));
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", &self.to_hex()[..16])
    }
}

/// An ed25519 signature.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex: String = self.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "Signature({hex}…)")
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let bytes: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(bytes))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_purpose_binding() {
        let key = SecretKey::generate().unwrap();
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let again = SecretKey::from_pem(&pem).unwrap();
        assert_eq!(again.public(), key.public());
        assert!(
            !format!("{key:?}").contains(&pem[30..40]),
            "Debug leaks nothing"
        );

        let sig = key.sign(Purpose::Certificate, b"body");
        key.public()
            .verify(Purpose::Certificate, b"body", &sig)
            .unwrap();
        assert!(
            key.public()
                .verify(Purpose::ProofOfPossession, b"body", &sig)
                .is_err(),
            "a signature for one purpose is useless for another"
        );
        assert!(
            key.public()
                .verify(Purpose::Certificate, b"bodY", &sig)
                .is_err()
        );
        let other = SecretKey::generate().unwrap();
        assert!(
            other
                .public()
                .verify(Purpose::Certificate, b"body", &sig)
                .is_err()
        );
    }

    #[test]
    fn reads_an_openssl_key() {
        // `openssl genpkey -algorithm ed25519` output (PKCS#8 v1).
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEILhztnF27cX9NxuHBcbxQIPdxkP0695FR9r1sBtK66O1\n-----END PRIVATE KEY-----\n";
        let key = SecretKey::from_pem(pem).unwrap();
        // Our own writing of it is byte-identical to openssl's.
        assert_eq!(key.to_pem().unwrap().as_str(), pem);
        assert!(matches!(
            SecretKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(IdentityError::KeyFormat(_))
        ));
    }

    #[test]
    fn hex_round_trip() {
        let key = SecretKey::generate().unwrap().public();
        assert_eq!(PublicKey::from_hex(&key.to_hex()).unwrap(), key);
        assert!(PublicKey::from_hex("zz").is_err());
    }
}
