//! The one check of junction identities: whether a certificate chain
//! certifies a key as a junction of this bus, and for which id.
//!
//! Link-state seals and session hellos (junction-core's routing) and
//! Highway peers (junction-highway's TLS verifiers) all go through
//! [`certify_junction`], so a junction is believed on the same terms
//! wherever it shows its chain.

use crate::cert::{Certificate, Role, TrustStore};
use crate::keys::PublicKey;
use crate::revocation::RevocationList;
use crate::{IdentityError, Verified};

/// Why a certificate chain does not certify a junction (for the id asked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JunctionCertError {
    /// The chain does not hold: untrusted authority, broken, badly signed,
    /// expired or not yet valid.
    #[error("its certificate chain is refused: {0}")]
    Certificate(IdentityError),
    /// A certificate of the chain was revoked.
    #[error("its certificate {serial:#x} is revoked")]
    Revoked {
        /// The revoked certificate's serial.
        serial: u64,
    },
    /// The leaf is a junction certificate for another id than the one
    /// expected.
    #[error("its certificate is for junction {certified}, not {expected}")]
    WrongJunction {
        /// The id that was expected.
        expected: u16,
        /// The id the certificate carries.
        certified: u16,
    },
    /// The leaf is not a junction certificate.
    #[error("its certificate is a {role} certificate, not a junction's")]
    NotAJunction {
        /// The certificate's role.
        role: String,
    },
}

/// The junction id and key that `chain` (leaf first) certifies, if the chain
/// reaches an authority of `trust` at `now`, no certificate of it is revoked
/// by `revocations`, its leaf has the junction role, and (when `expected`
/// is given) that role's id is `expected`.
pub fn certify_junction(
    chain: &[Certificate],
    expected: Option<u16>,
    trust: &TrustStore,
    revocations: Option<&Verified<RevocationList>>,
    now: u64,
) -> Result<(u16, PublicKey), JunctionCertError> {
    let leaf = trust
        .verify_chain(chain, now, revocations)
        .map_err(|source| match source {
            IdentityError::Revoked { serial } => JunctionCertError::Revoked { serial },
            source => JunctionCertError::Certificate(source),
        })?;
    match leaf.body.role {
        Role::Junction { id: certified } => match expected {
            Some(expected) if expected != certified => Err(JunctionCertError::WrongJunction {
                expected,
                certified,
            }),
            _ => Ok((certified, leaf.body.subject)),
        },
        ref role => Err(JunctionCertError::NotAJunction {
            role: role.to_string(),
        }),
    }
}
