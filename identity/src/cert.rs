//! Certificates: a subject key bound to a role, signed by an issuer, and the
//! chain verification that turns one into a [`Verified`] identity.
//!
//! # Form
//!
//! A certificate is a postcard-encoded [`Certificate`] (its [`CertBody`] and
//! the issuer's signature over the body's postcard bytes, for
//! [`Purpose::Certificate`]), armoured as PEM with the label
//! `JUNCTION CERTIFICATE`. Several certificates may follow each other in one
//! file: a chain, leaf first.
//!
//! # Rules
//!
//! - An **authority** certificate is self-issued; trusting an authority means
//!   trusting its key.
//! - An authority may issue any role. An **intermediate** may issue services,
//!   clients and narrower intermediates, and only within its name patterns.
//!   Services, clients and junctions issue nothing.
//! - Every certificate of a chain must be inside its validity window, and none
//!   may be revoked (by serial or by subject key).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, Purpose, SecretKey, Signature};
use crate::name::{NamePattern, ServiceName};
use crate::revocation::RevocationList;
use crate::{IdentityError, Verified};

/// The PEM label of a certificate.
pub const CERT_LABEL: &str = "JUNCTION CERTIFICATE";

/// The most certificates a chain may hold.
pub const MAX_CHAIN: usize = 8;

/// What a certificate lets its subject be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The root of trust of a bus.
    Authority,
    /// May issue certificates for names matching its patterns.
    Intermediate {
        /// The names it may grant, such as `org.acme.*`.
        patterns: Vec<NamePattern>,
    },
    /// A junction, with its 16-bit id on the bus.
    Junction {
        /// The id no other junction may claim.
        id: u16,
    },
    /// A service, with the names it may register.
    Service {
        /// The names.
        names: Vec<ServiceName>,
    },
    /// A client: proves who it is, registers nothing.
    Client,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: &[String]| v.join(", ");
        match self {
            Role::Authority => f.write_str("authority"),
            Role::Intermediate { patterns } => write!(
                f,
                "intermediate for {}",
                join(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>())
            ),
            Role::Junction { id } => write!(f, "junction {id}"),
            Role::Service { names } => write!(
                f,
                "service {}",
                join(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            ),
            Role::Client => f.write_str("client"),
        }
    }
}

/// What a certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    /// Format version, 1.
    pub version: u8,
    /// Chosen at random by the issuer; what revocation lists name.
    pub serial: u64,
    /// The key the certificate speaks for.
    pub subject: PublicKey,
    /// What the subject may be.
    pub role: Role,
    /// Valid from (seconds since the Unix epoch, inclusive).
    pub not_before: u64,
    /// Valid until (seconds since the Unix epoch, exclusive).
    pub not_after: u64,
    /// The key that signed it.
    pub issuer: PublicKey,
}

/// A signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// What it says.
    pub body: CertBody,
    /// The issuer's signature over the body.
    pub signature: Signature,
}

impl Certificate {
    /// Signs `body` with `issuer`, whose public key must be `body.issuer`.
    pub fn issue(body: CertBody, issuer: &SecretKey) -> Result<Self, IdentityError> {
        if issuer.public() != body.issuer {
            return Err(IdentityError::WrongIssuerKey);
        }
        let bytes =
            postcard::to_allocvec(&body).map_err(|e| IdentityError::Encoding(e.to_string()))?;
        let signature = issuer.sign(Purpose::Certificate, &bytes);
        Ok(Self { body, signature })
    }

    /// A new self-issued authority certificate for `key`.
    pub fn authority(
        key: &SecretKey,
        serial: u64,
        not_before: u64,
        not_after: u64,
    ) -> Result<Self, IdentityError> {
        Self::issue(
            CertBody {
                version: 1,
                serial,
                subject: key.public(),
                role: Role::Authority,
                not_before,
                not_after,
                issuer: key.public(),
            },
            key,
        )
    }

    /// Checks the signature against `issuer`.
    fn check_signature(&self, issuer: &PublicKey) -> Result<(), IdentityError> {
        let bytes = postcard::to_allocvec(&self.body)
            .map_err(|e| IdentityError::Encoding(e.to_string()))?;
        issuer
            .verify(Purpose::Certificate, &bytes, &self.signature)
            .map_err(|_| IdentityError::BadCertificateSignature {
                serial: self.body.serial,
            })
    }

    /// The certificate's postcard bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("certificates always serialize")
    }

    /// Reads postcard bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        postcard::from_bytes(bytes)
            .map_err(|e| IdentityError::CertificateFormat(crate::undecodable(&e)))
    }

    /// The PEM armour.
    pub fn to_pem(&self) -> String {
        crate::armour::encode(CERT_LABEL, &self.to_bytes())
    }

    /// Reads every certificate in a PEM text, in order (a chain is leaf first).
    pub fn chain_from_pem(text: &str) -> Result<Vec<Self>, IdentityError> {
        let blocks = crate::armour::decode_all(CERT_LABEL, text)?;
        if blocks.is_empty() {
            return Err(IdentityError::CertificateFormat(
                "no JUNCTION CERTIFICATE block found".into(),
            ));
        }
        blocks.iter().map(|b| Self::from_bytes(b)).collect()
    }

    /// Whether the certificate is valid at `now`.
    fn check_time(&self, now: u64) -> Result<(), IdentityError> {
        let b = &self.body;
        if now < b.not_before {
            return Err(IdentityError::NotYetValid {
                serial: b.serial,
                not_before: b.not_before,
                now,
            });
        }
        if now >= b.not_after {
            return Err(IdentityError::Expired {
                serial: b.serial,
                not_after: b.not_after,
                now,
            });
        }
        Ok(())
    }
}

/// The authorities a junction trusts.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    authorities: Vec<PublicKey>,
}

impl TrustStore {
    /// Trusts nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the authority whose self-issued certificate this is. The
    /// certificate must be an authority's, and its own signature must hold.
    pub fn add_authority(&mut self, cert: &Certificate) -> Result<(), IdentityError> {
        if cert.body.role != Role::Authority || cert.body.issuer != cert.body.subject {
            return Err(IdentityError::NotAnAuthority {
                serial: cert.body.serial,
            });
        }
        cert.check_signature(&cert.body.subject)?;
        if !self.authorities.contains(&cert.body.subject) {
            self.authorities.push(cert.body.subject);
        }
        Ok(())
    }

    /// Whether `key` is a trusted authority.
    pub fn trusts(&self, key: &PublicKey) -> bool {
        self.authorities.contains(key)
    }

    /// Verifies a chain, leaf first, ending with a certificate issued by a
    /// trusted authority (the authority's own certificate may follow or not).
    pub fn verify_chain(
        &self,
        chain: &[Certificate],
        now: u64,
        revocations: Option<&Verified<RevocationList>>,
    ) -> Result<Verified<Certificate>, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
        if chain.len() > MAX_CHAIN {
            return Err(IdentityError::ChainTooLong { len: chain.len() });
        }
        for (i, cert) in chain.iter().enumerate() {
            cert.check_time(now)?;
            if let Some(list) = revocations {
                list.check(cert)?;
            }
            let issuer_key = cert.body.issuer;
            let trusted_root = self.trusts(&issuer_key);
            // The issuer is the next certificate, unless a trusted authority
            // signed this one directly.
            let parent = chain.get(i + 1);
            match parent {
                _ if trusted_root => {
                    cert.check_signature(&issuer_key)?;
                    may_issue(&Role::Authority, &cert.body.role)?;
                    return Ok(Verified::new(leaf.clone()));
                }
                Some(parent) => {
                    if parent.body.subject != issuer_key {
                        return Err(IdentityError::BrokenChain {
                            serial: cert.body.serial,
                        });
                    }
                    cert.check_signature(&parent.body.subject)?;
                    may_issue(&parent.body.role, &cert.body.role)?;
                }
                None => {
                    return Err(IdentityError::Untrusted { issuer: issuer_key });
                }
            }
        }
        Err(IdentityError::Untrusted {
            issuer: chain[chain.len() - 1].body.issuer,
        })
    }
}

/// Whether a certificate with role `issuer` may issue one with role `issued`.
fn may_issue(issuer: &Role, issued: &Role) -> Result<(), IdentityError> {
    match (issuer, issued) {
        (Role::Authority, _) => Ok(()),
        (Role::Intermediate { patterns }, Role::Service { names }) => {
            for name in names {
                if !patterns.iter().any(|p| p.matches(name)) {
                    return Err(IdentityError::OutsidePatterns {
                        what: name.to_string(),
                    });
                }
            }
            Ok(())
        }
        (Role::Intermediate { .. }, Role::Client) => Ok(()),
        (Role::Intermediate { patterns }, Role::Intermediate { patterns: inner }) => {
            for p in inner {
                if !patterns.iter().any(|outer| outer.covers(p)) {
                    return Err(IdentityError::OutsidePatterns {
                        what: p.to_string(),
                    });
                }
            }
            Ok(())
        }
        (issuer, issued) => Err(IdentityError::RoleCannotIssue {
            issuer: issuer.to_string(),
            issued: issued.to_string(),
        }),
    }
}

impl Verified<Certificate> {
    /// The names a verified service certificate grants (none for other roles).
    pub fn names(&self) -> &[ServiceName] {
        match &self.body.role {
            Role::Service { names } => names,
            _ => &[],
        }
    }

    /// Whether the verified certificate grants `name`.
    pub fn grants(&self, name: &ServiceName) -> bool {
        self.names().contains(name)
    }
}
