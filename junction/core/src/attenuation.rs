//! Narrower capabilities: fewer rights, an expiry, a message budget, and
//! revocable lineages.

use std::collections::HashMap;

use junction_road::{Attenuate, Header, Reason, Rights};

use super::{CONTROL_HANDLE, Cap, ConnId, Core, Refusal};
use crate::books::{BudgetId, MAX_NESTING};
use crate::caps::CapRef;

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
        // A budget is shared, never copied: the new capability spends from
        // every budget of the original, and from one of its own when that
        // is tighter than what they have left.
        let left = self.books.left(&original.budgets);
        let own_budget = match (left, a.max_messages) {
            (Some(old), Some(new)) if new > old => {
                refuse(
                    self,
                    format!(
                        "a budget of {new} messages is more than the {old} the capability has left"
                    ),
                );
                return;
            }
            (Some(old), Some(new)) => (new < old).then_some(new),
            (None, new) => new,
            (Some(_), None) => None,
        };
        let nesting = original.budgets.len() + usize::from(own_budget.is_some());
        let depth = original.lineages.len() + usize::from(a.revocable);
        if nesting > MAX_NESTING || depth > MAX_NESTING {
            let limit = MAX_NESTING;
            self.refuse(conn, a.req, a.handle, Refusal::NestedTooDeep { limit });
            return;
        }
        // Checked first, so that the budget and lineage made below always
        // find their capability a place.
        if !self.has_room(conn, 1) {
            self.too_many_handles(conn, a.req);
            return;
        }
        let flow = self.new_flow();
        let mut cap = Cap::new(original.target, a.rights, None, flow);
        cap.dead = original.dead;
        cap.expires_at = expires_at;
        cap.budgets = original.budgets;
        let budget = own_budget.map(|messages| self.books.new_budget(messages));
        cap.budgets.extend(budget);
        cap.lineages = original.lineages;
        if a.revocable {
            let lineage = self.books.new_lineage();
            cap.lineages.push(lineage);
            cap.root = Some(lineage);
        }
        let (credits, root) = (self.initial_credits(a.rights), cap.root);
        let inserted = self.insert_cap(conn, cap);
        if inserted.is_none() {
            // Not expected (the room was checked), but then nothing may
            // stay in the books for it.
            if let Some(budget) = budget {
                self.books.unshare(budget);
            }
            if let Some(root) = root {
                self.books.end(root);
            }
        }
        match inserted {
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
        for member in self.books.end(lineage) {
            // Stripped of the lineage, which is over, so that the books and
            // the capabilities keep agreeing; it dies of it all the same.
            let listed = self
                .conns
                .get_mut(member.conn.key())
                .and_then(|c| c.caps.get_ref_mut(member))
                .is_some_and(|cap| strip(&mut cap.lineages, lineage));
            if listed {
                self.cap_died(member.conn, member.handle, Reason::Revoked, |c| {
                    c.flow == member.flow
                });
            }
        }
    }

    /// `cap` entered `conn`'s table as `handle`: it joins its lineages and
    /// draws from its budgets. A lineage that has ended meanwhile is
    /// struck from it.
    pub(super) fn join_books(&mut self, conn: ConnId, handle: u32) {
        let Some(cap) = self
            .conns
            .get_mut(conn.key())
            .and_then(|c| c.caps.get_mut(handle))
        else {
            return;
        };
        let at = CapRef {
            conn,
            handle,
            flow: cap.flow,
        };
        let books = &mut self.books;
        cap.lineages.retain(|&l| books.join(l, at));
        for &budget in &cap.budgets {
            books.share(budget);
        }
    }

    /// The capability `handle` of `conn` spent the last message of a budget
    /// it draws from: it dies, and so does every watched capability that
    /// shares that budget, each told once.
    pub(super) fn budget_spent(&mut self, conn: ConnId, handle: u32) {
        self.cap_died(conn, handle, Reason::Exhausted, |_| true);
        let Some(budgets) = self.cap(conn, handle).map(|c| c.budgets.clone()) else {
            return;
        };
        for budget in budgets {
            for at in self.books.take_watchers_if_spent(budget) {
                self.cap_died(at.conn, at.handle, Reason::Exhausted, |c| c.flow == at.flow);
            }
        }
    }

    /// `cap`, which was `handle` in `conn`'s table, left it (dropped, moved,
    /// used up, its holder gone): it leaves its lineages and budgets, and
    /// if it was a lineage's root the lineage ends, since nobody can revoke
    /// it any more. O(its lineages and budgets), plus the members of an
    /// ending lineage, each stripped of it once.
    pub(super) fn leave_books(&mut self, conn: ConnId, handle: u32, cap: &Cap) {
        let at = CapRef {
            conn,
            handle,
            flow: cap.flow,
        };
        for &lineage in &cap.lineages {
            self.books.leave(lineage, at);
        }
        if cap.watched {
            self.books.unwatch_budgets(&cap.budgets, at);
        }
        for &budget in &cap.budgets {
            self.books.unshare(budget);
        }
        if let Some(root) = cap.root {
            for member in self.books.end(root) {
                if let Some(c) = self
                    .conns
                    .get_mut(member.conn.key())
                    .and_then(|c| c.caps.get_ref_mut(member))
                {
                    strip(&mut c.lineages, root);
                }
            }
        }
    }

    /// Checks the lineage and budget books against the tables: every
    /// capability is a member of each lineage it lists and draws from each
    /// budget it lists, and the books hold nothing more.
    pub(super) fn check_books(&self) -> Result<(), String> {
        let mut members: HashMap<u64, usize> = HashMap::new();
        let mut refs: HashMap<BudgetId, u32> = HashMap::new();
        for (key, c) in self.conns.iter() {
            let conn = ConnId {
                key,
                serial: c.serial,
            };
            for (handle, cap) in c.caps.iter() {
                if cap.lineages.len() > MAX_NESTING || cap.budgets.len() > MAX_NESTING {
                    return Err(format!(
                        "c{} handle {handle:#x} nests {} lineages and {} budgets",
                        c.serial,
                        cap.lineages.len(),
                        cap.budgets.len()
                    ));
                }
                let at = CapRef {
                    conn,
                    handle,
                    flow: cap.flow,
                };
                for &lineage in &cap.lineages {
                    if !self.books.is_member(lineage, at) {
                        return Err(format!(
                            "c{} handle {handle:#x} lists lineage {lineage}, which does not record it",
                            c.serial
                        ));
                    }
                    *members.entry(lineage).or_default() += 1;
                }
                for &budget in &cap.budgets {
                    *refs.entry(budget).or_default() += 1;
                    // A watched capability still alive hears when its budget
                    // runs out.
                    if cap.watched && cap.dead.is_none() && !self.books.is_watching(budget, at) {
                        return Err(format!(
                            "c{} handle {handle:#x} is watched but its budget does not record it",
                            c.serial
                        ));
                    }
                }
            }
        }
        for (budget, at) in self.books.budget_watchers() {
            let drawing = self
                .conns
                .get(at.conn.key())
                .and_then(|c| c.caps.get_ref(at))
                .is_some_and(|cap| cap.watched && cap.budgets.contains(&budget));
            if !drawing {
                return Err(format!(
                    "a budget keeps a watcher, handle {:#x} of {}, that does not draw from it",
                    at.handle, at.conn
                ));
            }
        }
        self.books.check(&members, &refs)
    }
}

/// Takes `lineage` out of a capability's list; whether it was there.
fn strip(lineages: &mut Vec<u64>, lineage: u64) -> bool {
    let before = lineages.len();
    lineages.retain(|&l| l != lineage);
    lineages.len() != before
}
