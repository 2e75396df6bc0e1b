//! The revocation and expiry books: which capabilities belong to each
//! revocable lineage, and when capabilities with an expiry die.

use std::collections::HashMap;

use crate::caps::CapRef;
use crate::time::WallTimers;

/// Lineages and expiries. Entries of capabilities that have gone linger
/// until they are next looked at; both books prune them so that they stay
/// proportional to the live capabilities.
#[derive(Debug)]
pub(crate) struct Books {
    /// Members of each revocable lineage, for `Revoke`.
    lineages: HashMap<u64, Vec<CapRef>>,
    next_lineage: u64,
    /// Capabilities with an expiry, soonest first.
    expiries: WallTimers<CapRef>,
}

/// Past this many entries, the expiry book is pruned of capabilities gone.
const EXPIRY_PRUNE_AT: usize = 4096;

impl Books {
    pub(crate) fn new() -> Self {
        Self {
            lineages: HashMap::new(),
            next_lineage: 1,
            expiries: WallTimers::new(),
        }
    }

    /// A new lineage, never used before.
    pub(crate) fn new_lineage(&mut self) -> u64 {
        let lineage = self.next_lineage;
        self.next_lineage += 1;
        lineage
    }

    /// Records `member` in `lineage`. Now and then (at powers of two from
    /// 64) the lineage is pruned of members `alive` no longer recognises.
    pub(crate) fn join(&mut self, lineage: u64, member: CapRef, alive: impl Fn(CapRef) -> bool) {
        let members = self.lineages.entry(lineage).or_default();
        members.push(member);
        if members.len() >= 64 && members.len().is_power_of_two() {
            members.retain(|&m| alive(m));
        }
    }

    /// Takes every member of `lineage` out, for revocation.
    pub(crate) fn revoke(&mut self, lineage: u64) -> Vec<CapRef> {
        self.lineages.remove(&lineage).unwrap_or_default()
    }

    /// Forgets `lineage`: its root is gone, so nobody can revoke it.
    pub(crate) fn forget(&mut self, lineage: u64) {
        self.lineages.remove(&lineage);
    }

    /// Records that `cap` dies at `at` (seconds since the Unix epoch).
    pub(crate) fn expire_at(&mut self, at: u64, cap: CapRef, alive: impl Fn(u64, CapRef) -> bool) {
        if self.expiries.len() >= EXPIRY_PRUNE_AT && self.expiries.len().is_power_of_two() {
            self.expiries.retain(alive);
        }
        self.expiries.push(at, cap);
    }

    /// The next expiry, in seconds since the Unix epoch.
    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.expiries.next()
    }

    /// The next capability whose expiry has come by `now`.
    pub(crate) fn pop_expired(&mut self, now: u64) -> Option<(u64, CapRef)> {
        self.expiries.pop_due(now)
    }

    /// How many entries the books hold, for the memory bounds.
    pub(crate) fn len(&self) -> usize {
        self.lineages.values().map(Vec::len).sum::<usize>() + self.expiries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConnId;
    use crate::caps::FlowId;

    fn member(flow: u64) -> CapRef {
        CapRef {
            conn: ConnId::for_tests(1),
            handle: flow as u32,
            flow: FlowId(flow),
        }
    }

    #[test]
    fn lineages_are_pruned_of_members_gone() {
        let mut books = Books::new();
        let lineage = books.new_lineage();
        assert_ne!(books.new_lineage(), lineage, "never reused");
        for flow in 0..64 {
            // Only the first member is still alive when pruning happens.
            books.join(lineage, member(flow), |m| m.flow == FlowId(0));
        }
        assert_eq!(books.revoke(lineage), vec![member(0)]);
        assert!(books.revoke(lineage).is_empty(), "revoked once");
    }

    #[test]
    fn expiries_come_in_order_and_are_pruned() {
        let mut books = Books::new();
        for i in 0..(EXPIRY_PRUNE_AT as u64 + 1) {
            books.expire_at(100 + i, member(i), |_, m| m.flow.0 % 2 == 0);
        }
        assert!(books.len() < EXPIRY_PRUNE_AT, "the gone half was pruned");
        assert_eq!(books.next_expiry(), Some(100));
        assert_eq!(books.pop_expired(99), None);
        assert_eq!(books.pop_expired(100), Some((100, member(0))));
    }
}
