//! Narrower capabilities: fewer rights, an expiry, a message budget, and
//! revocable lineages.

use junction_road::{Attenuate, ErrorCode, Header, Reason, Rights};

use super::{CONTROL_HANDLE, Cap, ConnId, Core};

impl Core {
    /// `Attenuate`: a new handle that can do no more than the original.
    pub(super) fn attenuate(&mut self, conn: ConnId, a: Attenuate) {
        let Some(original) = self.cap(conn, a.handle).cloned() else {
            self.unknown_handle(conn, a.req, a.handle);
            return;
        };
        let refuse = |core: &mut Core, message: String| {
            core.error(conn, a.req, a.handle, ErrorCode::CannotWiden, message);
        };
        if a.handle == CONTROL_HANDLE || original.rights.contains(Rights::SEND_ONCE) {
            refuse(
                self,
                "the control capability and send-once capabilities cannot be attenuated".into(),
            );
            return;
        }
        if !a.rights.is_valid() {
            self.error(
                conn,
                a.req,
                a.handle,
                ErrorCode::BadRights,
                format!("rights {} are not a valid set", a.rights),
            );
            return;
        }
        if a.max_messages == Some(0) {
            refuse(self, "a budget must allow at least one message".into());
            return;
        }
        if !original.rights.contains(a.rights) {
            refuse(
                self,
                format!(
                    "rights {} are not a valid subset of the capability's {}",
                    a.rights, original.rights
                ),
            );
            return;
        }
        let expires_at = match (original.expires_at, a.expires_at) {
            (Some(old), Some(new)) if new > old => {
                refuse(
                    self,
                    format!("expiry {new} is later than the capability's own, {old}"),
                );
                return;
            }
            (old, new) => new.or(old),
        };
        let remaining = match (original.remaining, a.max_messages) {
            (Some(old), Some(new)) if new > old => {
                refuse(
                    self,
                    format!(
                        "a budget of {new} messages is more than the {old} the capability has left"
                    ),
                );
                return;
            }
            (old, new) => new.or(old),
        };
        let mut cap = Cap::new(
            original.port,
            a.rights,
            self.initial_credits(a.rights),
            None,
        );
        cap.dead = original.dead;
        cap.expires_at = expires_at;
        cap.remaining = remaining;
        cap.lineages = original.lineages.clone();
        if a.revocable {
            let lineage = self.next_lineage;
            self.next_lineage += 1;
            cap.lineages.push(lineage);
            cap.root = Some(lineage);
        }
        let credits = cap.credits;
        match self.insert_cap(conn, cap) {
            Some(handle) => self.frame(
                conn,
                Header::Minted {
                    req: a.req,
                    handle,
                    credits,
                },
            ),
            None => self.too_many_handles(conn, a.req),
        }
    }

    /// `Revoke`: the revocable root `handle` and every capability derived
    /// from it die, wherever they are; watchers are told.
    pub(super) fn revoke(&mut self, conn: ConnId, handle: u32) {
        let Some(cap) = self.cap(conn, handle) else {
            self.unknown_handle(conn, 0, handle);
            return;
        };
        let Some(lineage) = cap.root else {
            self.error(
                conn,
                0,
                handle,
                ErrorCode::NotRevocable,
                format!("handle {handle} is not a revocable capability this connection made (use Attenuate with revocable)"),
            );
            return;
        };
        for (holder, h) in self.lineages.remove(&lineage).unwrap_or_default() {
            self.cap_died(holder, h, Reason::Revoked, |c| {
                c.lineages.contains(&lineage)
            });
        }
    }
}
