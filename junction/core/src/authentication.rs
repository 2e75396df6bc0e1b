//! Proven identities: `Authenticate` on the control port, and what a new
//! revocation list does to connections that proved one.

use std::sync::Arc;

use junction_identity::{Certificate, RevocationList, Signature, Verified, verify_possession};
use junction_road::Identity;
use junction_road::control::ControlReply;

use super::{ConnId, Core, Now, Refusal};
use crate::control::refused;

impl Core {
    /// Checks a certificate chain and a proof of possession over this
    /// connection's nonce; on success the connection has a proven identity
    /// that every message it sends carries.
    pub(super) fn authenticate(
        &mut self,
        conn: ConnId,
        chain: Vec<Certificate>,
        proof: &Signature,
    ) -> ControlReply {
        let Some(c) = self.conns.get(conn.key()) else {
            return refused(Refusal::UnexpectedFrame {
                frame: "Authenticate",
            });
        };
        if c.identity.is_some() {
            return refused(Refusal::AlreadyAuthenticated);
        }
        let nonce = c.nonce;
        let checked = self
            .config
            .trust
            .verify_chain(&chain, self.now.unix, self.config.revocations.as_ref())
            .and_then(|verified| verify_possession(verified, &nonce, self.config.junction, proof));
        let proven = match checked {
            Ok(proven) => proven,
            Err(e) => {
                let refusal = Refusal::Identity(e);
                self.log_refusal(conn, &refusal.to_string());
                return refused(refusal);
            }
        };
        let identity = Arc::new(Identity {
            key: proven.key(),
            names: proven.names().to_vec(),
        });
        // Every delivery carries the identity: it must fit the slack the
        // protocol gives a Deliver header.
        let size = postcard::to_allocvec(identity.as_ref()).map_or(usize::MAX, |b| b.len());
        if size > MAX_IDENTITY_BYTES {
            let refusal = Refusal::IdentityTooLarge {
                names: identity.names.len(),
                bytes: size,
                limit: MAX_IDENTITY_BYTES,
            };
            self.log_refusal(conn, &refusal.to_string());
            return refused(refusal);
        }
        tracing::info!(conn = %conn, key = %proven.key(), names = ?identity.names, "identity proven");
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
            self.withdraw_identity(conn.key(), "its certificate expired");
        }
    }

    /// Takes a connection's proven identity away, with the names it
    /// registered under it.
    fn withdraw_identity(&mut self, key: crate::slab::Key, why: &str) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
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
        for name in names {
            if let Some(reg) = self.registry.remove(&name)
                && let Some(p) = self.ports.get_mut(reg.port)
            {
                p.names.retain(|n| n != &name);
            }
            tracing::warn!(%conn, "{name} unregistered: {why}");
        }
    }

    /// Logs a refused attempt with where it came from.
    pub(super) fn log_refusal(&self, conn: ConnId, what: &str) {
        let peer = self.conns.get(conn.key()).map(|c| &c.peer);
        tracing::warn!(
            conn = %conn,
            pid = ?peer.and_then(|p| p.pid),
            uid = ?peer.and_then(|p| p.uid),
            road = peer.map_or("?", |p| p.road),
            "refused: {what}"
        );
    }
}

/// The most a proven identity may take on a delivery, in bytes.
const MAX_IDENTITY_BYTES: usize = 2048;
