//! Revocation lists: the certificates (by serial) and keys an authority
//! no longer vouches for, signed by that authority.

use serde::{Deserialize, Serialize};

use crate::cert::{Certificate, TrustStore};
use crate::keys::{PublicKey, Purpose, SecretKey, Signature};
use crate::{IdentityError, Verified};

/// The PEM label of a revocation list.
pub const REVOCATION_LABEL: &str = "JUNCTION REVOCATION LIST";

/// What a revocation list says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    /// The authority that signed it.
    pub issuer: PublicKey,
    /// Which list this is: each list the authority makes carries a number
    /// greater than the last one's (`junction cert revoke` counts from 1).
    /// A junction replaces the list in force only with a higher number, so
    /// neither an old list nor another one made in the same second can
    /// bring a revoked certificate back.
    pub number: u64,
    /// When it was made (seconds since the Unix epoch); for people, not
    /// for ordering: two lists can be made in the same second.
    pub issued_at: u64,
    /// Revoked certificate serials.
    pub serials: Vec<u64>,
    /// Revoked subject keys (a stolen key: every certificate for it).
    pub keys: Vec<PublicKey>,
}

/// A signed revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// What it says.
    pub body: RevocationBody,
    /// The authority's signature over the body.
    pub signature: Signature,
}

impl RevocationList {
    /// Signs `body` with the authority key `issuer`.
    pub fn issue(body: RevocationBody, issuer: &SecretKey) -> Result<Self, IdentityError> {
        if issuer.public() != body.issuer {
            return Err(IdentityError::WrongIssuerKey);
        }
        let bytes =
            postcard::to_allocvec(&body).map_err(|e| IdentityError::Encoding(e.to_string()))?;
        Ok(Self {
            signature: issuer.sign(Purpose::RevocationList, &bytes),
            body,
        })
    }

    /// Checks that a trusted authority signed it.
    pub fn verify(self, trust: &TrustStore) -> Result<Verified<RevocationList>, IdentityError> {
        if !trust.trusts(&self.body.issuer) {
            return Err(IdentityError::Untrusted {
                issuer: self.body.issuer,
            });
        }
        let bytes = postcard::to_allocvec(&self.body)
            .map_err(|e| IdentityError::Encoding(e.to_string()))?;
        self.body
            .issuer
            .verify(Purpose::RevocationList, &bytes, &self.signature)
            .map_err(|_| IdentityError::BadRevocationSignature)?;
        Ok(Verified::new(self))
    }

    /// The PEM armour.
    pub fn to_pem(&self) -> String {
        crate::armour::encode(
            REVOCATION_LABEL,
            &postcard::to_allocvec(self).expect("lists always serialize"),
        )
    }

    /// Reads the armour.
    pub fn from_pem(text: &str) -> Result<Self, IdentityError> {
        let blocks = crate::armour::decode_all(REVOCATION_LABEL, text).map_err(|e| match e {
            IdentityError::CertificateFormat(what) => IdentityError::RevocationListFormat(what),
            other => other,
        })?;
        let [bytes] = blocks.as_slice() else {
            return Err(IdentityError::RevocationListFormat(format!(
                "expected one {REVOCATION_LABEL} block, found {}",
                blocks.len()
            )));
        };
        postcard::from_bytes(bytes)
            .map_err(|e| IdentityError::RevocationListFormat(crate::undecodable(&e)))
    }
}

impl Verified<RevocationList> {
    /// Refuses a certificate the list revokes.
    pub fn check(&self, cert: &Certificate) -> Result<(), IdentityError> {
        if self.body.serials.contains(&cert.body.serial)
            || self.body.keys.contains(&cert.body.subject)
        {
            return Err(IdentityError::Revoked {
                serial: cert.body.serial,
            });
        }
        Ok(())
    }
}
