//! Capability tokens: how a capability travels on from the junction that
//! holds it to a third one. The junction that owns a port signs a token
//! naming the junction it granted the port to, and the export that grant
//! is (which carries the grant's lineages and budget on the owner);
//! passing it on appends a delegation signed by the current holder, which
//! may only narrow it, at most [`MAX_DELEGATIONS`] times. The owner
//! verifies the whole chain once, when the last holder opens its flow.

use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, Purpose, SecretKey, Signature};
use crate::{IdentityError, Verified};

/// What the owning junction grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// The junction that owns the port.
    pub owner: u16,
    /// The port on it.
    pub port: u16,
    /// The port's generation, so a token dies with its port.
    pub generation: u32,
    /// The export the owner made for `holder`: the owner's record of the
    /// grant, whose revocable lineages and budget everything opened from
    /// this token inherits.
    pub export: u32,
    /// Rights bits (send 1, send-once 2, grant 4).
    pub rights: u8,
    /// The junction that may use it.
    pub holder: u16,
    /// Seconds since the Unix epoch after which it is void.
    pub expires_at: u64,
    /// A random serial, for revocation.
    pub serial: u64,
    /// Messages left in the grant's budget when the token was issued, if
    /// it has one (the owner's count is the one that holds).
    pub budget: Option<u32>,
}

/// The most delegations a token may carry: each is checked with a
/// signature, once, when the flow opens.
pub const MAX_DELEGATIONS: usize = 8;

/// A link passing the token on to another junction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    /// The junction it is passed to.
    pub to: u16,
    /// Rights bits, a subset of the previous holder's.
    pub rights: u8,
    /// No later than the previous expiry.
    pub expires_at: u64,
    /// The previous holder's signature over the token so far and this link.
    pub signature: Signature,
}

/// A signed capability token with its delegations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityToken {
    /// What the owner granted.
    pub body: TokenBody,
    /// The owner junction's signature over the body.
    pub signature: Signature,
    /// Links, oldest first.
    pub delegations: Vec<Delegation>,
}

#[derive(Serialize)]
struct LinkSigned<'a> {
    body: &'a TokenBody,
    earlier: &'a [Delegation],
    to: u16,
    rights: u8,
    expires_at: u64,
}

impl CapabilityToken {
    /// Signs a token as the owner junction (`owner_key`).
    pub fn issue(body: TokenBody, owner_key: &SecretKey) -> Self {
        let bytes = postcard::to_allocvec(&body).expect("tokens always serialize");
        Self {
            signature: owner_key.sign(Purpose::CapabilityToken, &bytes),
            body,
            delegations: Vec::new(),
        }
    }

    /// The junction that holds it now, its rights and expiry.
    pub fn current(&self) -> (u16, u8, u64) {
        match self.delegations.last() {
            Some(d) => (d.to, d.rights, d.expires_at),
            None => (self.body.holder, self.body.rights, self.body.expires_at),
        }
    }

    /// Passes the token on, as its current holder (`holder_key`).
    pub fn delegate(
        &self,
        holder_key: &SecretKey,
        to: u16,
        rights: u8,
        expires_at: u64,
    ) -> Result<Self, IdentityError> {
        let (_, held, expiry) = self.current();
        if rights & !held != 0 || expires_at > expiry {
            return Err(IdentityError::TokenWidened);
        }
        if self.delegations.len() >= MAX_DELEGATIONS {
            return Err(IdentityError::TooManyDelegations {
                len: self.delegations.len() + 1,
            });
        }
        let bytes = postcard::to_allocvec(&LinkSigned {
            body: &self.body,
            earlier: &self.delegations,
            to,
            rights,
            expires_at,
        })
        .expect("tokens always serialize");
        let mut next = self.clone();
        next.delegations.push(Delegation {
            to,
            rights,
            expires_at,
            signature: holder_key.sign(Purpose::Delegation, &bytes),
        });
        Ok(next)
    }

    /// Verifies the token for use by junction `user` at `now`. `key_of`
    /// gives the verified key of a junction id (from its junction
    /// certificate); the owner's key must sign the body and each holder's key
    /// its delegation.
    pub fn verify(
        self,
        user: u16,
        now: u64,
        key_of: impl Fn(u16) -> Option<PublicKey>,
    ) -> Result<Verified<CapabilityToken>, IdentityError> {
        if self.delegations.len() > MAX_DELEGATIONS {
            return Err(IdentityError::TooManyDelegations {
                len: self.delegations.len(),
            });
        }
        let owner = key_of(self.body.owner).ok_or(IdentityError::UnknownJunction {
            id: self.body.owner,
        })?;
        let bytes = postcard::to_allocvec(&self.body).expect("tokens always serialize");
        owner
            .verify(Purpose::CapabilityToken, &bytes, &self.signature)
            .map_err(|_| IdentityError::BadTokenSignature)?;
        let (mut holder, mut rights, mut expiry) =
            (self.body.holder, self.body.rights, self.body.expires_at);
        for (i, link) in self.delegations.iter().enumerate() {
            if link.rights & !rights != 0 || link.expires_at > expiry {
                return Err(IdentityError::TokenWidened);
            }
            let key = key_of(holder).ok_or(IdentityError::UnknownJunction { id: holder })?;
            let bytes = postcard::to_allocvec(&LinkSigned {
                body: &self.body,
                earlier: &self.delegations[..i],
                to: link.to,
                rights: link.rights,
                expires_at: link.expires_at,
            })
            .expect("tokens always serialize");
            key.verify(Purpose::Delegation, &bytes, &link.signature)
                .map_err(|_| IdentityError::BadTokenSignature)?;
            (holder, rights, expiry) = (link.to, link.rights, link.expires_at);
        }
        if holder != user {
            return Err(IdentityError::TokenNotForYou { holder, user });
        }
        if now >= expiry {
            return Err(IdentityError::TokenExpired { expires_at: expiry });
        }
        Ok(Verified::new(self))
    }
}
