//! The core-level books of capability limits: which capabilities belong to
//! each revocable lineage, the message budgets capabilities share, and when
//! capabilities with an expiry die.
//!
//! Lineages and budgets are kept exact: a capability joins them when it
//! enters a table ([`Books::join`], [`Books::share`]) and leaves them when it
//! leaves its table ([`Books::leave`], [`Books::unshare`]). A lineage ends
//! with its root (revoked, dropped, moved or its holder gone) and a budget
//! when no capability draws from it any more, so both books are bounded by
//! the live capabilities, whatever churn goes through them.

use std::collections::{BTreeSet, HashMap};

use crate::caps::CapRef;
use crate::slab::{Key, Slab};
use crate::time::WallTimers;

/// A message budget in the [`Books`]: every capability that holds its id
/// spends from it.
pub(crate) type BudgetId = Key;

/// How many lineages, and how many budgets, one capability may belong to:
/// every message spends from each budget, and every copy carries the lists.
pub(crate) const MAX_NESTING: usize = 8;

/// A message budget shared by the capabilities attenuated from it.
#[derive(Debug)]
struct Budget {
    /// Messages it still allows.
    left: u32,
    /// Capabilities in tables that draw from it.
    refs: u32,
    /// Those of them whose holders watch them: told when it runs out,
    /// whichever of them spent the last message.
    watchers: BTreeSet<CapRef>,
}

/// Lineages, budgets and expiries.
#[derive(Debug)]
pub(crate) struct Books {
    /// Members of each live revocable lineage (the root among them), for
    /// `Revoke`. A lineage is here exactly while its root is in a table.
    lineages: HashMap<u64, BTreeSet<CapRef>>,
    next_lineage: u64,
    /// Message budgets, each with the count of capabilities drawing from it.
    budgets: Slab<Budget>,
    /// Capabilities with an expiry, soonest first. Entries of capabilities
    /// gone linger until popped or pruned.
    expiries: WallTimers<CapRef>,
}

/// Past this many entries, the expiry book is pruned of capabilities gone.
const EXPIRY_PRUNE_AT: usize = 4096;

impl Books {
    pub(crate) fn new() -> Self {
        Self {
            lineages: HashMap::new(),
            next_lineage: 1,
            budgets: Slab::with_limit(u32::MAX),
            expiries: WallTimers::new(),
        }
    }

    /// A new lineage, never used before, with no members yet: its root
    /// joins it when it enters its table.
    pub(crate) fn new_lineage(&mut self) -> u64 {
        let lineage = self.next_lineage;
        self.next_lineage += 1;
        self.lineages.insert(lineage, BTreeSet::new());
        lineage
    }

    /// Records `member` in `lineage`; false if the lineage has ended (its
    /// root is gone), and then the member must not list it.
    pub(crate) fn join(&mut self, lineage: u64, member: CapRef) -> bool {
        match self.lineages.get_mut(&lineage) {
            Some(members) => {
                members.insert(member);
                true
            }
            None => false,
        }
    }

    /// `member` left its table: it is no longer part of `lineage`.
    pub(crate) fn leave(&mut self, lineage: u64, member: CapRef) {
        if let Some(members) = self.lineages.get_mut(&lineage) {
            members.remove(&member);
        }
    }

    /// Ends `lineage` (revoked, or its root gone) and takes its members
    /// out, so that they can be told or stripped of it.
    pub(crate) fn end(&mut self, lineage: u64) -> BTreeSet<CapRef> {
        self.lineages.remove(&lineage).unwrap_or_default()
    }

    /// Whether `member` is recorded in `lineage`.
    pub(crate) fn is_member(&self, lineage: u64, member: CapRef) -> bool {
        self.lineages
            .get(&lineage)
            .is_some_and(|m| m.contains(&member))
    }

    /// A new budget of `messages`, drawn on by nobody yet: a capability
    /// shares it when it enters a table. Make it only for a capability
    /// that is sure to enter one, or it stays until [`Books::unshare`].
    pub(crate) fn new_budget(&mut self, messages: u32) -> BudgetId {
        self.budgets
            .insert(Budget {
                left: messages,
                refs: 0,
                watchers: BTreeSet::new(),
            })
            .expect("budgets are bounded by the capabilities, far below 2^32")
    }

    /// One more capability draws from `budget`.
    pub(crate) fn share(&mut self, budget: BudgetId) {
        if let Some(b) = self.budgets.get_mut(budget) {
            b.refs += 1;
        }
    }

    /// One capability fewer draws from `budget`; it goes with the last.
    pub(crate) fn unshare(&mut self, budget: BudgetId) {
        if let Some(b) = self.budgets.get_mut(budget) {
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                self.budgets.remove(budget);
            }
        }
    }

    /// `watcher`, which draws from `budgets`, is to hear when one runs out.
    pub(crate) fn watch_budgets(&mut self, budgets: &[BudgetId], watcher: CapRef) {
        for &id in budgets {
            if let Some(b) = self.budgets.get_mut(id) {
                b.watchers.insert(watcher);
            }
        }
    }

    /// `watcher` no longer watches (it left its table).
    pub(crate) fn unwatch_budgets(&mut self, budgets: &[BudgetId], watcher: CapRef) {
        for &id in budgets {
            if let Some(b) = self.budgets.get_mut(id) {
                b.watchers.remove(&watcher);
            }
        }
    }

    /// The watchers of `budget` if it has run out, taken out: each is told
    /// once.
    pub(crate) fn take_watchers_if_spent(&mut self, budget: BudgetId) -> BTreeSet<CapRef> {
        match self.budgets.get_mut(budget) {
            Some(b) if b.left == 0 => std::mem::take(&mut b.watchers),
            _ => BTreeSet::new(),
        }
    }

    /// Every budget's recorded watchers, for the invariants.
    pub(crate) fn budget_watchers(&self) -> impl Iterator<Item = (BudgetId, CapRef)> + '_ {
        self.budgets
            .iter()
            .flat_map(|(id, b)| b.watchers.iter().map(move |&w| (id, w)))
    }

    /// Whether `watcher` is recorded as watching `budget`.
    pub(crate) fn is_watching(&self, budget: BudgetId, watcher: CapRef) -> bool {
        self.budgets
            .get(budget)
            .is_some_and(|b| b.watchers.contains(&watcher))
    }

    /// The fewest messages any of `budgets` still allows; `None` for no
    /// budget at all.
    pub(crate) fn left(&self, budgets: &[BudgetId]) -> Option<u32> {
        budgets
            .iter()
            .map(|&b| self.budgets.get(b).map_or(0, |b| b.left))
            .min()
    }

    /// Whether one of `budgets` is used up.
    #[inline]
    pub(crate) fn exhausted(&self, budgets: &[BudgetId]) -> bool {
        self.left(budgets) == Some(0)
    }

    /// Spends one message from each of `budgets`; whether one of them is
    /// now used up.
    #[inline]
    pub(crate) fn spend(&mut self, budgets: &[BudgetId]) -> bool {
        let mut exhausted = false;
        for &id in budgets {
            if let Some(b) = self.budgets.get_mut(id) {
                b.left = b.left.saturating_sub(1);
                exhausted |= b.left == 0;
            }
        }
        exhausted
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

    /// How many entries the books hold, for the memory bounds: lineages
    /// and their members, budgets, expiries.
    pub(crate) fn len(&self) -> usize {
        self.lineages.len()
            + self.lineages.values().map(BTreeSet::len).sum::<usize>()
            + self
                .budgets
                .iter()
                .map(|(_, b)| 1 + b.watchers.len())
                .sum::<usize>()
            + self.expiries.len()
    }

    /// Checks the lineage and budget books against what the tables hold:
    /// `members[l]` is how many capabilities list lineage `l`, `refs[b]`
    /// how many draw from budget `b`.
    pub(crate) fn check(
        &self,
        members: &HashMap<u64, usize>,
        refs: &HashMap<BudgetId, u32>,
    ) -> Result<(), String> {
        for (lineage, m) in &self.lineages {
            let listed = members.get(lineage).copied().unwrap_or(0);
            if m.len() != listed {
                return Err(format!(
                    "lineage {lineage} records {} members, {listed} capabilities list it",
                    m.len()
                ));
            }
        }
        for (id, budget) in self.budgets.iter() {
            let held = refs.get(&id).copied().unwrap_or(0);
            if budget.refs != held || held == 0 {
                return Err(format!(
                    "budget {}.{} counts {} capabilities, {held} draw from it",
                    id.index, id.generation, budget.refs
                ));
            }
        }
        if let Some(id) = refs.keys().find(|&&id| self.budgets.get(id).is_none()) {
            return Err(format!(
                "a capability draws from budget {}.{}, which is gone",
                id.index, id.generation
            ));
        }
        Ok(())
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
    fn lineages_hold_their_members_until_they_leave_or_the_lineage_ends() {
        let mut books = Books::new();
        let lineage = books.new_lineage();
        assert_ne!(books.new_lineage(), lineage, "never reused");
        for flow in 0..64 {
            assert!(books.join(lineage, member(flow)));
        }
        for flow in 1..64 {
            books.leave(lineage, member(flow));
        }
        assert!(books.is_member(lineage, member(0)));
        assert_eq!(
            books.end(lineage).into_iter().collect::<Vec<_>>(),
            vec![member(0)]
        );
        assert!(books.end(lineage).is_empty(), "ended once");
        assert!(
            !books.join(lineage, member(5)),
            "an ended lineage is not recreated"
        );
    }

    #[test]
    fn a_budget_is_shared_and_goes_with_its_last_holder() {
        let mut books = Books::new();
        let outer = books.new_budget(3);
        let inner = books.new_budget(1);
        books.share(outer);
        books.share(outer);
        books.share(inner);
        assert_eq!(books.left(&[outer, inner]), Some(1));
        assert_eq!(books.left(&[]), None);
        assert!(books.spend(&[outer, inner]), "the inner budget is used up");
        assert!(books.exhausted(&[outer, inner]));
        assert_eq!(books.left(&[outer]), Some(2), "spent from both");
        books.unshare(inner);
        books.unshare(outer);
        assert_eq!(books.len(), 1);
        books.unshare(outer);
        assert_eq!(books.len(), 0);
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
