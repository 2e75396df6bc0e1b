//! The port table: every port of this junction, who owns it, what was
//! delivered to it and not yet consumed, who watches it, and why dead ports
//! died.

use std::collections::{BTreeSet, HashMap, VecDeque};

use junction_identity::ServiceName;
use junction_road::Reason;

use crate::ConnId;
use crate::caps::CapRef;
use crate::remote::Proxy;
use crate::slab::{Key, Slab};

/// Port 0: the junction's control port.
pub(crate) const CONTROL_PORT: u16 = 0;

/// One port.
#[derive(Debug)]
pub(crate) struct Port {
    /// `None` for the control port.
    pub(crate) owner: Option<ConnId>,
    /// Delivered to the owner and not yet reported consumed, oldest first.
    pub(crate) in_flight: VecDeque<InFlight>,
    /// Capabilities that reach it.
    pub(crate) senders: u32,
    /// Capabilities whose holders asked to hear of its death; an entry
    /// leaves with its capability, so the set is bounded by the live
    /// capabilities to the port.
    pub(crate) watchers: BTreeSet<CapRef>,
    /// Names registered for it.
    pub(crate) names: Vec<ServiceName>,
    /// Names it lost with its registrant's identity, and why: the last
    /// [`MAX_WITHDRAWN`], so `junction ls` shows the loss, not a blank.
    pub(crate) withdrawn: Vec<(ServiceName, std::sync::Arc<str>)>,
    /// Whether it is its owner's home port.
    pub(crate) home: bool,
    /// Whether the owner asked to hear when `senders` reaches zero.
    pub(crate) watch_senders: bool,
    /// For a stand-in for something on another junction (no owner here):
    /// what it stands for.
    pub(crate) proxy: Option<Proxy>,
    /// What was delivered to it.
    pub(crate) traffic: junction_road::monitor::Tally,
}

/// A message delivered to a port's owner and not yet consumed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlight {
    /// The metered flow it was sent on, to return the credit to.
    pub(crate) flow: Option<CapRef>,
    /// The credit units it cost.
    pub(crate) cost: u32,
    pub(crate) seq: u64,
    /// The send-once reply capability it carried into the owner's table.
    pub(crate) reply: Option<u32>,
    /// Whether it is a reply to one of the owner's calls.
    pub(crate) is_reply: bool,
    /// The junction it came from, for a message from another junction
    /// (0 otherwise), and that junction's number for it; in a stand-in
    /// port, this junction's number for it.
    pub(crate) junction: u16,
    pub(crate) n: u64,
    /// For a message from another junction: the export it came by.
    pub(crate) export: u32,
}

/// Every port, by number. Numbers are one 16-bit space shared by all
/// connections; a number's generation tells a port from an earlier one.
#[derive(Debug)]
pub(crate) struct PortTable {
    slab: Slab<Port>,
    /// Why each number's last port died, to tell late senders.
    deaths: HashMap<u32, (u32, Reason)>,
}

impl PortTable {
    /// A table holding only the control port.
    pub(crate) fn new() -> Self {
        let mut slab = Slab::with_limit(u32::from(u16::MAX) + 1);
        let control = slab.insert(Port::new(None, false));
        debug_assert_eq!(control.map(|k| k.index), Some(u32::from(CONTROL_PORT)));
        Self {
            slab,
            deaths: HashMap::new(),
        }
    }

    /// The control port's key.
    pub(crate) fn control() -> Key {
        port_key(CONTROL_PORT, 0)
    }

    /// A new port for `owner`; its number, or `None` when every number is
    /// taken (the table holds at most 65,536, so every index is a `u16`).
    pub(crate) fn open(&mut self, owner: ConnId, home: bool) -> Option<u16> {
        let key = self.slab.insert(Port::new(Some(owner), home))?;
        u16::try_from(key.index).ok()
    }

    pub(crate) fn get(&self, key: Key) -> Option<&Port> {
        self.slab.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut Port> {
        self.slab.get_mut(key)
    }

    /// A stand-in port for `proxy`, owned by no connection; `None` when
    /// every number is taken.
    pub(crate) fn open_proxy(&mut self, proxy: Proxy) -> Option<Key> {
        let mut port = Port::new(None, false);
        port.proxy = Some(proxy);
        self.slab.insert(port)
    }

    /// The key of the live port numbered `number`.
    pub(crate) fn key(&self, number: u16) -> Option<Key> {
        let generation = self.slab.generation_of(u32::from(number))?;
        Some(port_key(number, generation))
    }

    /// Takes a port out of the table, remembering why it died.
    pub(crate) fn remove(&mut self, key: Key, reason: Reason) -> Option<Port> {
        let port = self.slab.remove(key)?;
        self.deaths.insert(key.index, (key.generation, reason));
        Some(port)
    }

    /// Why the port `key` named died (`PortClosed` when it is long forgotten).
    pub(crate) fn death_reason(&self, key: Key) -> Reason {
        match self.deaths.get(&key.index) {
            Some(&(generation, reason)) if generation == key.generation => reason,
            _ => Reason::PortClosed,
        }
    }

    /// Every live port.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Key, &Port)> {
        self.slab.iter()
    }

    /// Its own invariants: only the control port and stand-ins are ownerless, and the
    /// death book holds at most one entry per number.
    pub(crate) fn check(&self) -> Result<(), String> {
        for (key, port) in self.slab.iter() {
            let control = key.index == u32::from(CONTROL_PORT);
            if port.proxy.is_none() && control == port.owner.is_some() {
                return Err(format!("port {} has the wrong kind of owner", key.index));
            }
            if control && !port.in_flight.is_empty() {
                return Err("the control port holds messages".into());
            }
        }
        if self.deaths.len() > usize::from(u16::MAX) + 1 {
            return Err("the death book outgrew the port numbers".into());
        }
        Ok(())
    }
}

/// Withdrawn names a port remembers (the oldest is forgotten first), so
/// the memory stays bounded by the ports however often names come and go.
pub(crate) const MAX_WITHDRAWN: usize = 4;

impl Port {
    fn new(owner: Option<ConnId>, home: bool) -> Self {
        Self {
            owner,
            in_flight: VecDeque::new(),
            senders: 0,
            watchers: BTreeSet::new(),
            names: Vec::new(),
            withdrawn: Vec::new(),
            home,
            watch_senders: false,
            proxy: None,
            traffic: Default::default(),
        }
    }
}

/// The key of port `number` in generation `generation`.
pub(crate) fn port_key(number: u16, generation: u32) -> Key {
    Key {
        index: u32::from(number),
        generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_number_remembers_why_until_it_is_reused() {
        let mut ports = PortTable::new();
        let owner = ConnId::for_tests(1);
        let number = ports.open(owner, false).unwrap();
        assert_ne!(number, CONTROL_PORT);
        let a = ports.key(number).unwrap();
        ports.remove(a, Reason::OwnerGone).unwrap();
        assert_eq!(ports.key(number), None);
        assert_eq!(ports.death_reason(a), Reason::OwnerGone);
        let again = ports.open(owner, false).unwrap();
        let b = ports.key(again).unwrap();
        assert_ne!(a, b);
        assert!(ports.get(a).is_none(), "a stale key misses");
        assert_eq!(ports.death_reason(b), Reason::PortClosed);
        ports.check().unwrap();
    }
}
