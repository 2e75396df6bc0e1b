//! Lanes: one connection's send credit to one port.
//!
//! Every metered capability a connection holds to the same port sends on
//! the same lane, and the lane holds one window of credit however many such
//! capabilities there are, however often they are minted, looked up,
//! attenuated or dropped. So what one connection can have in flight to one
//! port is one window, always. Credit spent on a message comes back to its
//! lane whatever becomes of the message: consumed, refused or undeliverable.
//!
//! A lane lives while the connection holds a capability on it or has
//! messages in flight on it, that is, while its credit is below the window.
//! The Driver keeps its own copy by the same rule (see docs/protocol.md,
//! section 7.2), so neither needs to tell the other when a lane ends.

use std::collections::HashMap;

/// One lane: credit left and the capabilities that send on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lane {
    /// Credit units left; the window less what is in flight.
    pub(crate) credits: u32,
    /// Metered capabilities the connection holds to the port.
    pub(crate) caps: u32,
}

/// A connection's lanes, by the number of the port they send to.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    lanes: HashMap<u16, Lane>,
}

impl Lanes {
    /// A capability to `port` joins its lane; a new lane starts with a
    /// full `window`.
    pub(crate) fn join(&mut self, port: u16, window: u32) {
        self.lanes
            .entry(port)
            .or_insert(Lane {
                credits: window,
                caps: 0,
            })
            .caps += 1;
    }

    /// A capability to `port` left the table.
    pub(crate) fn leave(&mut self, port: u16, window: u32) {
        if let Some(lane) = self.lanes.get_mut(&port) {
            lane.caps = lane.caps.saturating_sub(1);
            self.end_if_idle(port, window);
        }
    }

    /// Spends `cost` units on the lane to `port`: `Err` with what is left
    /// when that is not enough.
    pub(crate) fn spend(&mut self, port: u16, cost: u32) -> Result<u32, u32> {
        let Some(lane) = self.lanes.get_mut(&port) else {
            return Err(0);
        };
        if lane.credits < cost {
            return Err(lane.credits);
        }
        lane.credits -= cost;
        Ok(lane.credits)
    }

    /// `units` come back to the lane to `port`. Whether the lane was there
    /// to take them.
    pub(crate) fn give_back(&mut self, port: u16, units: u32, window: u32) -> bool {
        let Some(lane) = self.lanes.get_mut(&port) else {
            return false;
        };
        lane.credits = lane.credits.saturating_add(units).min(window);
        self.end_if_idle(port, window);
        true
    }

    /// A lane with no capability and nothing in flight has nothing to
    /// remember.
    fn end_if_idle(&mut self, port: u16, window: u32) {
        if self
            .lanes
            .get(&port)
            .is_some_and(|l| l.caps == 0 && l.credits >= window)
        {
            self.lanes.remove(&port);
        }
    }

    /// Every lane.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u16, Lane)> + '_ {
        self.lanes.iter().map(|(&p, &l)| (p, l))
    }

    /// How many lanes there are.
    pub(crate) fn len(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_capabilities_share_one_window() {
        let mut lanes = Lanes::default();
        for _ in 0..80 {
            lanes.join(7, 10);
        }
        assert_eq!(lanes.spend(7, 6), Ok(4));
        assert_eq!(
            lanes.spend(7, 6),
            Err(4),
            "the window is not per capability"
        );
        for _ in 0..80 {
            lanes.leave(7, 10);
        }
        assert_eq!(lanes.len(), 1, "kept while messages are in flight");
        assert!(lanes.give_back(7, 6, 10));
        assert_eq!(lanes.len(), 0, "gone once idle");
        assert!(!lanes.give_back(7, 6, 10));
    }
}
