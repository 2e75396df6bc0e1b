//! Proof of key possession: the holder of a certificate signs a fresh nonce
//! from the junction, so a certificate alone (public, copyable) proves
//! nothing, and a proof made for one connection is worthless on another.

use serde::{Deserialize, Serialize};

use crate::cert::Certificate;
use crate::keys::{PublicKey, Purpose, SecretKey, Signature};
use crate::name::ServiceName;
use crate::{IdentityError, Verified};

/// The bytes a proof signs: the junction's nonce for this connection, the
/// junction's id, and the key being proven.
#[derive(Serialize)]
struct Challenge<'a> {
    nonce: &'a [u8; 32],
    junction: u16,
    key: &'a PublicKey,
}

fn challenge(nonce: &[u8; 32], junction: u16, key: &PublicKey) -> Vec<u8> {
    postcard::to_allocvec(&Challenge {
        nonce,
        junction,
        key,
    })
    .expect("challenges always serialize")
}

/// Signs the junction's `nonce` to prove possession of `key`.
pub fn prove_possession(key: &SecretKey, nonce: &[u8; 32], junction: u16) -> Signature {
    key.sign(
        Purpose::ProofOfPossession,
        &challenge(nonce, junction, &key.public()),
    )
}

/// A peer whose certificate chain holds and who proved it holds the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proven {
    /// The verified leaf certificate.
    pub certificate: Certificate,
}

impl Proven {
    /// The proven key.
    pub fn key(&self) -> PublicKey {
        self.certificate.body.subject
    }

    /// The names the certificate grants (services only).
    pub fn names(&self) -> &[ServiceName] {
        match &self.certificate.body.role {
            crate::Role::Service { names } => names,
            _ => &[],
        }
    }
}

/// Checks a proof of possession for a verified certificate.
pub fn verify_possession(
    certificate: Verified<Certificate>,
    nonce: &[u8; 32],
    junction: u16,
    proof: &Signature,
) -> Result<Verified<Proven>, IdentityError> {
    let key = certificate.body.subject;
    key.verify(
        Purpose::ProofOfPossession,
        &challenge(nonce, junction, &key),
        proof,
    )
    .map_err(|_| IdentityError::BadProof)?;
    Ok(Verified::new(Proven {
        certificate: certificate.into_inner(),
    }))
}
