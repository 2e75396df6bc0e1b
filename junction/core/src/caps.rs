//! Capabilities and the per-connection table that holds them.
//!
//! A capability names a [`Target`] and carries a [`FlowId`]: the flow every
//! message sent on it is recorded against. Flow ids are never reused, so a
//! credit or an undeliverable notice finds the capability it belongs to, or
//! nothing, never a newer capability that happens to hold the same handle.
//! A handle whose capability left with messages still in flight keeps its
//! number out of reuse until they are settled (see [`CapTable::hold`]).

use junction_road::{Reason, Rights};

use crate::ConnId;
use crate::books::BudgetId;
use crate::slab::{Key, Slab};

/// The flow of messages sent on one capability; unique for the life of the
/// core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FlowId(pub(crate) u64);

/// What a capability reaches. Only a port of this junction today; ports on
/// other junctions (over Highways) will be another variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// A port of this junction, by its key in the port table.
    Local(Key),
}

/// Where the reply to a call goes. A call made on this junction is answered
/// on its caller's home port; a call from another junction goes back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyRoute {
    /// A caller connected here, and the tag it chose.
    Local {
        /// The calling connection.
        caller: ConnId,
        /// Its tag for the call.
        tag: u64,
    },
    /// A caller on another junction, by that junction's id for the call.
    Remote {
        /// The caller's junction.
        junction: u16,
        /// Its id for the call.
        call: u64,
    },
}

/// Where a call this junction's connection made is answered from: the
/// reply capability here, or a junction it went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallAt {
    /// The reply capability, in its holder's table.
    Local(CapRef),
    /// The call went to another junction, which knows it by `call`.
    Remote {
        /// The callee's junction.
        junction: u16,
        /// This junction's id for the call.
        call: u64,
    },
}

/// A capability as seen from outside its table: its holder, its handle and
/// its flow. Stored wherever the core must come back to a capability later
/// (watchers, lineages, expiries, in-flight messages); it goes stale when
/// the capability leaves its table, however the handle is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CapRef {
    pub(crate) conn: ConnId,
    pub(crate) handle: u32,
    pub(crate) flow: FlowId,
}

/// A capability in a connection's table.
#[derive(Debug, Clone)]
pub(crate) struct Cap {
    pub(crate) target: Target,
    pub(crate) rights: Rights,
    /// Sequence number of the next message sent on this handle.
    pub(crate) seq: u64,
    pub(crate) flow: FlowId,
    /// Metered messages sent on it and not yet consumed or refused.
    pub(crate) in_flight: u32,
    /// For a send-once reply capability: where the reply goes.
    pub(crate) reply_to: Option<ReplyRoute>,
    /// Dead on its own (revoked, expired, budget used up), port alive or not.
    pub(crate) dead: Option<Reason>,
    /// Seconds since the Unix epoch from which it is dead.
    pub(crate) expires_at: Option<u64>,
    /// The budgets it spends from (see [`crate::books`]): its own, if it
    /// was attenuated with one, and those of the capability it came from.
    /// Shared, never copied; a budgeted capability moves when passed on.
    pub(crate) budgets: Vec<BudgetId>,
    /// The revocable lineages it belongs to.
    pub(crate) lineages: Vec<u64>,
    /// The lineage this handle is the revocable root of.
    pub(crate) root: Option<u64>,
    /// Whether its holder asked to hear of its death.
    pub(crate) watched: bool,
}

impl Cap {
    /// A fresh capability with no limits; `flow` must be new.
    pub(crate) fn new(
        target: Target,
        rights: Rights,
        reply_to: Option<ReplyRoute>,
        flow: FlowId,
    ) -> Self {
        Self {
            target,
            rights,
            seq: 0,
            flow,
            in_flight: 0,
            reply_to,
            dead: None,
            expires_at: None,
            budgets: Vec::new(),
            lineages: Vec::new(),
            root: None,
            watched: false,
        }
    }

    /// A copy for another holder, on a new flow: every limit of the
    /// original (its budgets shared, not copied) and its lineages, but not
    /// the power to revoke.
    pub(crate) fn copy(&self, flow: FlowId) -> Self {
        let mut copy = Cap::new(self.target, self.rights, self.reply_to, flow);
        copy.dead = self.dead;
        copy.expires_at = self.expires_at;
        copy.budgets = self.budgets.clone();
        copy.lineages = self.lineages.clone();
        copy
    }

    /// Whether it must move rather than copy when passed on.
    pub(crate) fn moves(&self) -> bool {
        self.rights.contains(Rights::SEND_ONCE) || !self.budgets.is_empty()
    }

    /// The local port it reaches.
    pub(crate) fn port(&self) -> Key {
        let Target::Local(port) = self.target;
        port
    }

    /// The number of the port it reaches: what names its lane.
    pub(crate) fn port_number(&self) -> u16 {
        // Port keys index a table of at most 65,536.
        self.port().index as u16
    }

    /// Whether messages sent on it spend credit of its lane: everything
    /// but replies (bounded by their caller's pending calls) and the
    /// control capability.
    pub(crate) fn metered(&self) -> bool {
        !self.rights.contains(Rights::SEND_ONCE) && self.port_number() != crate::ports::CONTROL_PORT
    }
}

/// One connection's capabilities, addressed by handles: a 16-bit slot index
/// and a 16-bit generation, so a stale handle misses.
///
/// Reply capabilities do not count against the table's limit: their number
/// is bounded by their callers' pending calls, and a caller must not be able
/// to fill its callee's table. They share the 16-bit slot space only.
#[derive(Debug)]
pub(crate) struct CapTable {
    slab: Slab<Cap>,
    /// Capabilities other than replies it may hold.
    limit: u32,
    /// Reply capabilities it holds.
    replies: u32,
}

impl CapTable {
    /// A table of at most `limit` capabilities besides replies.
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            slab: Slab::with_limit_and_mask(0xFFFF, 0xFFFF),
            limit,
            replies: 0,
        }
    }

    /// Stores `cap`; its handle, or `None` when the table is full.
    pub(crate) fn insert(&mut self, cap: Cap) -> Option<u32> {
        let reply = cap.reply_to.is_some();
        if !reply && !self.has_room(1) {
            return None;
        }
        let handle = self.slab.insert(cap).map(handle_of)?;
        self.replies += u32::from(reply);
        Some(handle)
    }

    /// Whether `n` more capabilities other than replies fit.
    pub(crate) fn has_room(&self, n: usize) -> bool {
        self.ordinary() + n <= self.limit as usize
    }

    /// How many reply capabilities it holds.
    pub(crate) fn replies(&self) -> u32 {
        self.replies
    }

    /// Whether a slot is free, for a reply capability.
    pub(crate) fn has_slot(&self) -> bool {
        self.slab.has_room()
    }

    /// Capabilities other than replies.
    fn ordinary(&self) -> usize {
        self.slab.len() - self.replies as usize
    }

    pub(crate) fn get(&self, handle: u32) -> Option<&Cap> {
        self.slab.get(key_of(handle))
    }

    pub(crate) fn get_mut(&mut self, handle: u32) -> Option<&mut Cap> {
        self.slab.get_mut(key_of(handle))
    }

    /// The capability `at` names, if it is still the same one.
    pub(crate) fn get_ref(&self, at: CapRef) -> Option<&Cap> {
        self.get(at.handle).filter(|c| c.flow == at.flow)
    }

    /// The capability `at` names, if it is still the same one.
    pub(crate) fn get_ref_mut(&mut self, at: CapRef) -> Option<&mut Cap> {
        self.get_mut(at.handle).filter(|c| c.flow == at.flow)
    }

    /// Takes a capability out. With messages still in flight its handle is
    /// held (see [`CapTable::hold`]) until [`CapTable::release`].
    pub(crate) fn remove(&mut self, handle: u32) -> Option<Cap> {
        let in_flight = self.get(handle)?.in_flight;
        let cap = if in_flight > 0 {
            self.hold(handle)
        } else {
            self.slab.remove(key_of(handle))
        }?;
        self.replies -= u32::from(cap.reply_to.is_some());
        Some(cap)
    }

    /// Takes a capability out but keeps its handle from being given to
    /// another until [`CapTable::release`]: notices about its messages
    /// still name it, and must not be mistaken for another's.
    fn hold(&mut self, handle: u32) -> Option<Cap> {
        self.slab.remove_and_hold(key_of(handle))
    }

    /// The last message of a held handle is settled: the slot may be reused.
    pub(crate) fn release(&mut self, handle: u32) {
        self.slab.release(key_of(handle).index);
    }

    /// How many capabilities it holds.
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Every handle and capability.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &Cap)> {
        self.slab.iter().map(|(k, c)| (handle_of(k), c))
    }
}

fn handle_of(key: Key) -> u32 {
    (key.generation << 16) | key.index
}

fn key_of(handle: u32) -> Key {
    Key {
        index: handle & 0xFFFF,
        generation: handle >> 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(flow: u64) -> Cap {
        Cap::new(
            Target::Local(Key {
                index: 1,
                generation: 0,
            }),
            Rights::SEND,
            None,
            FlowId(flow),
        )
    }

    #[test]
    fn a_handle_with_messages_in_flight_is_not_reused() {
        let mut table = CapTable::new(8);
        let h = table.insert(cap(1)).unwrap();
        table.get_mut(h).unwrap().in_flight = 1;
        table.remove(h).unwrap();
        // However often the table churns, `h` stays unused while held.
        for flow in 2..70_000 {
            let other = table.insert(cap(flow)).unwrap();
            assert_ne!(other, h);
            table.remove(other);
        }
        table.release(h);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn refs_go_stale_when_the_capability_leaves() {
        let mut table = CapTable::new(1);
        let h = table.insert(cap(7)).unwrap();
        let at = CapRef {
            conn: ConnId::for_tests(1),
            handle: h,
            flow: FlowId(7),
        };
        assert!(table.get_ref(at).is_some());
        table.remove(h);
        assert!(table.get_ref(at).is_none());
        assert!(table.insert(cap(8)).is_some(), "room again");
        assert!(table.get_ref(at).is_none());
    }
}
