//! Junction bus identities, with no I/O.
//!
//! - [`keys`]: ed25519 keys (PKCS#8 PEM, as openssl writes them) and
//!   signatures bound to their [`Purpose`];
//! - [`cert`]: certificates binding a key to a [`Role`], PEM-armoured
//!   postcard, and [`TrustStore::verify_chain`] with name constraints at
//!   every link;
//! - [`revocation`]: signed revocation lists;
//! - [`junction`]: the one check of junction identities
//!   ([`certify_junction`]), for routing, sessions and Highways alike;
//! - [`proof`]: proof of possession over a junction's nonce;
//! - [`token`]: capability tokens for Highways, with delegation;
//! - [`secure`]: end-to-end session keys between junctions (X25519,
//!   HKDF-SHA256, ChaCha20-Poly1305, all `ring`'s);
//! - [`when`]: Unix times as dates for people;
//! - [`ServiceName`] and [`NamePattern`]: the names services register.
//!
//! Checks return [`Verified`] values, which only this crate can make: code
//! that takes a `Verified<Certificate>` cannot be handed an unchecked one.

#![forbid(unsafe_code)]

mod armour;
pub mod cert;
pub mod junction;
pub mod keys;
mod name;
pub mod proof;
pub mod revocation;
pub mod secure;
pub mod token;
pub mod when;

pub use cert::{CertBody, Certificate, Role, TrustStore};
pub use junction::{JunctionCertError, certify_junction};
pub use keys::{PublicKey, Purpose, SecretKey, Signature};
pub use name::{MAX_NAME_LEN, NameError, NamePattern, ServiceName};
pub use proof::{Proven, prove_possession, verify_possession};
pub use revocation::{RevocationBody, RevocationList};
pub use token::{CapabilityToken, Delegation, MAX_DELEGATIONS, TokenBody};

/// A value that passed its checks. Only this crate constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(value)
    }

    /// The checked value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Why an identity check failed. Each says what was expected and what came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The operating system gave no randomness.
    #[error("no randomness from the operating system: {0}")]
    Randomness(String),
    /// A key file could not be read or written.
    #[error("not a usable ed25519 key (PKCS#8 PEM expected): {0}")]
    KeyFormat(String),
    /// A certificate could not be decoded.
    #[error("not a valid junction certificate: {0}")]
    CertificateFormat(String),
    /// Encoding failed.
    #[error("encoding failed: {0}")]
    Encoding(String),
    /// A signature did not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// A certificate's signature does not match its issuer.
    #[error(
        "certificate {serial:#x} is not signed by its issuer (tampered, or issued by another key)"
    )]
    BadCertificateSignature {
        /// Its serial.
        serial: u64,
    },
    /// The issuing key does not match the body's issuer field.
    #[error("the signing key is not the issuer the certificate names")]
    WrongIssuerKey,
    /// A certificate used as an authority is not one.
    #[error("certificate {serial:#x} is not a self-issued authority certificate")]
    NotAnAuthority {
        /// Its serial.
        serial: u64,
    },
    /// No certificate was given.
    #[error("no certificate was presented")]
    EmptyChain,
    /// Too many certificates.
    #[error("a chain of {len} certificates is longer than the limit of 8")]
    ChainTooLong {
        /// Its length.
        len: usize,
    },
    /// A certificate's issuer is not the next certificate's subject.
    #[error("certificate {serial:#x} is not issued by the next certificate of the chain")]
    BrokenChain {
        /// The serial of the certificate whose issuer is missing.
        serial: u64,
    },
    /// The chain does not end at a trusted authority.
    #[error("the chain ends at {issuer}, which is not a trusted authority of this bus")]
    Untrusted {
        /// The last issuer.
        issuer: PublicKey,
    },
    /// A certificate has expired.
    #[error(
        "certificate {serial:#x} expired {}; issue a new one (junction cert issue)",
        when::dated(*not_after, *now)
    )]
    Expired {
        /// Its serial.
        serial: u64,
        /// Its end.
        not_after: u64,
        /// The time of the check.
        now: u64,
    },
    /// A certificate is not valid yet.
    #[error(
        "certificate {serial:#x} is not valid before {}",
        when::dated(*not_before, *now)
    )]
    NotYetValid {
        /// Its serial.
        serial: u64,
        /// Its start.
        not_before: u64,
        /// The time of the check.
        now: u64,
    },
    /// A certificate was revoked.
    #[error("certificate {serial:#x} has been revoked")]
    Revoked {
        /// Its serial.
        serial: u64,
    },
    /// An issuer's role does not allow issuing this role.
    #[error("a {issuer} certificate may not issue a {issued} certificate")]
    RoleCannotIssue {
        /// The issuer's role.
        issuer: String,
        /// The issued role.
        issued: String,
    },
    /// A name or pattern is outside the issuing intermediate's patterns.
    #[error("{what} is outside the name patterns its issuer was granted")]
    OutsidePatterns {
        /// The name or pattern.
        what: String,
    },
    /// The revocation list's signature does not hold.
    #[error("the revocation list is not signed by its authority")]
    BadRevocationSignature,
    /// A proof of possession does not verify.
    #[error("the proof of possession does not verify: wrong key, or made for another connection")]
    BadProof,
    /// A token's signature does not verify.
    #[error("the capability token's signatures do not verify")]
    BadTokenSignature,
    /// A delegation tried to widen rights or expiry.
    #[error("a delegation may only narrow a token's rights and expiry")]
    TokenWidened,
    /// A token is held by another junction.
    #[error("the token is held by junction {holder}, not {user}")]
    TokenNotForYou {
        /// Its holder.
        holder: u16,
        /// Who presented it.
        user: u16,
    },
    /// A token has expired.
    #[error("the token expired at {}", when::utc(*expires_at))]
    TokenExpired {
        /// Its expiry.
        expires_at: u64,
    },
    /// A token passed on more times than any may be.
    #[error(
        "the token carries {len} delegations; at most {} are taken",
        token::MAX_DELEGATIONS
    )]
    TooManyDelegations {
        /// How many it carries (or would).
        len: usize,
    },
    /// An X25519 agreement or key derivation failed: the peer's
    /// ephemeral key is not a usable one.
    #[error(
        "the session key agreement failed: the peer's ephemeral key is not a usable X25519 key"
    )]
    KeyAgreement,
    /// A sealed session frame did not open.
    #[error("a sealed session frame does not open: altered, forged, or sealed under other keys")]
    Unsealed,
    /// A junction id whose key is unknown.
    #[error("no verified key is known for junction {id}")]
    UnknownJunction {
        /// The id.
        id: u16,
    },
    /// A revocation list could not be decoded.
    #[error("not a valid revocation list: {0}")]
    RevocationListFormat(String),
}

/// What a postcard decoding error means for a file a person handed us,
/// in words (postcard's own say "Serde Deserialization Error").
pub(crate) fn undecodable(e: &postcard::Error) -> String {
    match e {
        postcard::Error::DeserializeUnexpectedEnd => {
            "its contents end too early (the file is cut short)".to_string()
        }
        _ => {
            "its contents do not decode (the file is corrupt, or holds something else)".to_string()
        }
    }
}

#[cfg(test)]
mod tests;
