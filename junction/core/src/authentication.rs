//! Proven identities: `Authenticate` on the control port, and what a new
//! revocation list does to connections that proved one.

use std::sync::Arc;

use junction_identity::{
    Certificate, IdentityError, RevocationList, Role, Signature, Verified, cert::MAX_CHAIN,
    verify_possession,
};
use junction_road::Identity;
use junction_road::control::ControlReply;

use super::{ConnId, Core, Now, Refusal};
use crate::control::refused;

impl Core {
    /// Checks a certificate chain and a proof of possession over this
    /// connection's nonce; on success the connection has a proven identity
    /// that every message it sends carries.
    ///
    /// Signature checks are the dear part, so their cost per connection is
    /// bounded: a connection gets one attempt (a failed one spends it, and
    /// later ones are refused without looking at them), and the cheap
    /// checks (length, a trusted issuer, sizes) come before any signature.
    /// Only the verified part of the chain, up to the link a trusted
    /// authority signed, is kept and served to lookups.
    pub(super) fn authenticate(
        &mut self,
        conn: ConnId,
        chain: Vec<Certificate>,
        proof: &Signature,
    ) -> ControlReply {
        let Some(c) = self.conns.get_mut(conn.key()) else {
            return refused(Refusal::UnexpectedFrame {
                frame: "Authenticate",
            });
        };
        if c.identity.is_some() {
            return refused(Refusal::AlreadyAuthenticated);
        }
        if c.authentication_failed {
            return refused(Refusal::AuthenticationSpent);
        }
        let nonce = c.nonce;
        match self.prove(chain, &nonce, proof) {
            Ok((identity, chain)) => {
                if let Some(c) = self.conns.get_mut(conn.key()) {
                    c.proof = Some(proof.clone());
                }
                self.proven(conn, identity, chain)
            }
            Err(refusal) => {
                if let Some(c) = self.conns.get_mut(conn.key()) {
                    c.authentication_failed = true;
                }
                self.log_refusal(conn, &format!("authentication: {refusal}"));
                refused(refusal)
            }
        }
    }

    /// The checks of `Authenticate`, cheapest first: the identity proven,
    /// and the verified part of the chain.
    fn prove(
        &self,
        mut chain: Vec<Certificate>,
        nonce: &[u8; 32],
        proof: &Signature,
    ) -> Result<(Identity, Vec<Certificate>), Refusal> {
        let trust = &self.config.trust;
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            let len = chain.len();
            return Err(Refusal::Identity(if len == 0 {
                IdentityError::EmptyChain
            } else {
                IdentityError::ChainTooLong { len }
            }));
        }
        // Verification stops at the first link a trusted authority signed;
        // whatever follows it is never checked, so it is neither kept nor
        // served. A chain with no such link is refused unsigned-checked.
        let Some(last) = chain.iter().position(|c| trust.trusts(&c.body.issuer)) else {
            let issuer = chain[chain.len() - 1].body.issuer;
            return Err(Refusal::Identity(IdentityError::Untrusted { issuer }));
        };
        chain.truncate(last + 1);
        let bytes = postcard::to_allocvec(&chain).map_or(usize::MAX, |b| b.len());
        if bytes > MAX_CHAIN_BYTES {
            return Err(Refusal::BadChain {
                what: format!(
                    "the verified chain takes {bytes} bytes, more than the {MAX_CHAIN_BYTES} a junction keeps and serves to lookups; use fewer or smaller certificates (fewer intermediate patterns)"
                ),
            });
        }
        // Every delivery carries the identity: it must fit the slack the
        // protocol gives a Deliver header.
        let leaf = &chain[0];
        let identity = Identity {
            key: leaf.body.subject,
            names: match &leaf.body.role {
                Role::Service { names } => names.clone(),
                _ => Vec::new(),
            },
        };
        let size = postcard::to_allocvec(&identity).map_or(usize::MAX, |b| b.len());
        if size > MAX_IDENTITY_BYTES {
            return Err(Refusal::IdentityTooLarge {
                names: identity.names.len(),
                bytes: size,
                limit: MAX_IDENTITY_BYTES,
            });
        }
        trust
            .verify_chain(&chain, self.now.unix, self.config.revocations.as_ref())
            .and_then(|verified| verify_possession(verified, nonce, self.config.junction, proof))
            .map_err(Refusal::Identity)?;
        Ok((identity, chain))
    }

    /// `conn` proved `identity` with `chain`: every message it sends from
    /// now on carries it, until the chain's first certificate expires.
    fn proven(
        &mut self,
        conn: ConnId,
        identity: Identity,
        chain: Vec<Certificate>,
    ) -> ControlReply {
        let identity = Arc::new(identity);
        tracing::info!(conn = %conn, key = %identity.key, names = ?identity.names, "identity proven");
        // Trust anchors are keys; their own certificates' windows do not count.
        let until = chain
            .iter()
            .filter(|c| c.body.issuer != c.body.subject)
            .map(|c| c.body.not_after)
            .min()
            .unwrap_or(u64::MAX);
        if let Some(c) = self.conns.get_mut(conn.key()) {
            c.identity = Some((identity.clone(), Arc::new(chain)));
            c.identity_until = until;
            self.identity_expiries.push(until, conn);
        }
        ControlReply::Authenticated(identity.as_ref().clone())
    }

    /// A new revocation list (or none): from now on it applies, and every
    /// connection whose proven chain it revokes loses its identity and the
    /// names it registered with it.
    ///
    /// A list whose number is not greater than the one in force is refused:
    /// replaying an old list, or another list with the same number (say,
    /// made in the same second), must not bring revoked certificates back.
    /// The very list in force again (a second SIGHUP) changes nothing and
    /// is no error.
    pub fn set_revocations(
        &mut self,
        list: Option<Verified<RevocationList>>,
        now: Now,
    ) -> Result<(), String> {
        self.now = now;
        if let (Some(current), Some(new)) = (&self.config.revocations, &list) {
            if new.body == current.body {
                return Ok(());
            }
            // The number, not `issued_at`: seconds do not order two lists
            // made in the same second.
            if new.body.number <= current.body.number {
                return Err(format!(
                    "the new revocation list is number {}, not newer than number {} in force; \
                     make lists with `junction cert revoke`, which numbers each one above the last",
                    new.body.number, current.body.number
                ));
            }
        }
        self.config.revocations = list;
        let mut lost = Vec::new();
        for (key, c) in self.conns.iter() {
            let Some((_, chain)) = &c.identity else {
                continue;
            };
            if let Err(e) = self.config.trust.verify_chain(
                chain,
                self.now.unix,
                self.config.revocations.as_ref(),
            ) {
                lost.push((key, c.serial, e));
            }
        }
        for (key, _, e) in lost {
            self.withdraw_identity(key, &e.to_string());
        }
        Ok(())
    }

    /// A certificate expired while its connection lived: the identity goes,
    /// as if revoked, if it is still the one that expires `at`.
    pub(super) fn expire_identity(&mut self, conn: ConnId, at: u64) {
        if self
            .conns
            .get(conn.key())
            .is_some_and(|c| c.identity.is_some() && c.identity_until == at)
        {
            self.withdraw_identity(conn.key(), "its certificate expired; issue a new one");
        }
    }

    /// Takes a connection's proven identity away, with the names it
    /// registered under it.
    fn withdraw_identity(&mut self, key: crate::slab::Key, why: &str) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let id = super::ConnId {
            key,
            serial: c.serial,
        };
        let conn = format!("c{}", c.serial);
        c.identity = None;
        let ports = c.ports.clone();
        tracing::warn!(%conn, "identity withdrawn: {why}");
        let names: Vec<_> = self
            .registry
            .iter()
            .filter(|(_, reg)| reg.chain.is_some() && ports.contains(&(reg.port.index as u16)))
            .map(|(name, _)| name.clone())
            .collect();
        let reason: Arc<str> = Arc::from(why);
        for name in &names {
            if let Some(reg) = self.registry.remove(name)
                && let Some(p) = self.ports.get_mut(reg.port)
            {
                p.names.retain(|n| n != name);
                if p.withdrawn.len() >= crate::ports::MAX_WITHDRAWN {
                    p.withdrawn.remove(0);
                }
                p.withdrawn.push((name.clone(), reason.clone()));
            }
            tracing::warn!(%conn, "{name} unregistered: {why}");
        }
        self.announce_names();
        // Said to the connection itself: a listener that lost its name
        // would otherwise go on waiting for messages nobody can address.
        self.frame(
            id,
            junction_road::Header::IdentityWithdrawn {
                names,
                reason: why.to_string(),
            },
        );
    }

    /// Logs a refused attempt with where it came from.
    pub(super) fn log_refusal(&mut self, conn: ConnId, what: &str) {
        // A peer can cause these at will: one line a second at most.
        let Some(unlogged) = self.quiet.refusals.admit(self.now.instant) else {
            return;
        };
        let peer = self.conns.get(conn.key()).map(|c| &c.peer);
        tracing::warn!(
            conn = %conn,
            pid = ?peer.and_then(|p| p.pid),
            uid = ?peer.and_then(|p| p.uid),
            road = peer.map_or("?", |p| p.road),
            "refused: {what}{}",
            crate::quiet::more(unlogged)
        );
    }
}

/// The most a proven identity may take on a delivery, in bytes.
const MAX_IDENTITY_BYTES: usize = 2048;

/// The most a kept chain may take, in bytes: it is served on every lookup
/// of the names it registers, so it must stay small next to a lookup.
/// Eight certificates with a full identity's names fit comfortably.
pub(crate) const MAX_CHAIN_BYTES: usize = 16 * 1024;
