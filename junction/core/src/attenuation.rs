//! Narrower capabilities: fewer rights, an expiry, a message budget, and
//! revocable lineages.

use junction_road::{Attenuate, Header, Reason, Rights};

use super::{CONTROL_HANDLE, Cap, ConnId, Core, Refusal};

impl Core {
    /// `Attenuate`: a new handle that can do no more than the original.
    pub(super) fn attenuate(&mut self, conn: ConnId, a: Attenuate) {
        let Some(original) = self.cap(conn, a.handle).cloned() else {
            let handle = a.handle;
            self.refuse(conn, a.req, handle, Refusal::UnknownHandle { handle });
            return;
        };
        let refuse = |core: &mut Core, what: String| {
            core.refuse(conn, a.req, a.handle, Refusal::CannotWiden { what });
        };
        if a.handle == CONTROL_HANDLE || original.rights.contains(Rights::SEND_ONCE) {
            refuse(
                self,
                "the control capability and send-once capabilities cannot be attenuated".into(),
            );
            return;
        }
        if !a.rights.is_valid() {
            let rights = a.rights;
            self.refuse(conn, a.req, a.handle, Refusal::BadRights { rights });
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
        let flow = self.new_flow();
        let mut cap = Cap::new(original.target, a.rights, None, flow);
        cap.dead = original.dead;
        cap.expires_at = expires_at;
        cap.remaining = remaining;
        cap.lineages = original.lineages.clone();
        if a.revocable {
            let lineage = self.books.new_lineage();
            cap.lineages.push(lineage);
            cap.root = Some(lineage);
        }
        let credits = self.initial_credits(a.rights);
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
            self.refuse(conn, 0, handle, Refusal::UnknownHandle { handle });
            return;
        };
        let Some(lineage) = cap.root else {
            self.refuse(conn, 0, handle, Refusal::NotRevocable { handle });
            return;
        };
        for member in self.books.revoke(lineage) {
            self.cap_died(member.conn, member.handle, Reason::Revoked, |c| {
                c.flow == member.flow && c.lineages.contains(&lineage)
            });
        }
    }
}
