//! What junctions say to each other over a Highway: the junction-to-junction
//! protocol, apart from the driver protocol in [`crate::frame`].
//!
//! This first part is routing. Each junction describes its own live links in
//! a [`LinkState`] and floods it to the whole bus; every junction keeps the
//! newest description from each, and computes routes from them (see
//! `junction-core`'s routing module). docs/protocol.md, part 2, gives the
//! bytes.

use serde::{Deserialize, Serialize};

/// A frame between two junctions over a Highway's control stream, which is
/// reliable and ordered while the Highway lives. Variant order is the wire
/// numbering; new variants go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HighwayFrame {
    /// A junction's description of its links, flooded (tag 0).
    LinkState(LinkState),
}

/// The most neighbours one [`LinkState`] may list: more is refused, so that
/// one junction cannot make every other hold an unbounded description.
pub const MAX_NEIGHBOURS: usize = 256;

/// One junction's description of its live links, flooded to every junction.
///
/// A newer description replaces an older one: newer means a greater
/// `incarnation`, or the same incarnation and a greater `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// The junction it describes, which made it.
    pub origin: u16,
    /// Chosen by the origin when it starts, greater than any before (its
    /// start time in Unix seconds, say): what it said in an earlier life
    /// is older than anything it says now.
    pub incarnation: u64,
    /// Counts the descriptions the origin made in this incarnation.
    pub seq: u64,
    /// Its neighbours over live Highways, each once, in increasing id order.
    pub neighbours: Vec<Neighbour>,
}

/// A neighbour in a [`LinkState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    /// Its junction id.
    pub junction: u16,
    /// What a hop to it costs, at least 1.
    pub cost: u32,
}

impl LinkState {
    /// Whether it is newer than `other` (same origin assumed).
    pub fn newer_than(&self, other: &LinkState) -> bool {
        (self.incarnation, self.seq) > (other.incarnation, other.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in docs/protocol.md, part 2, byte for byte.
    #[test]
    fn a_link_state_encodes_as_documented() {
        let ls = LinkState {
            origin: 2,
            incarnation: 1_700_000_000,
            seq: 3,
            neighbours: vec![
                Neighbour {
                    junction: 1,
                    cost: 1,
                },
                Neighbour {
                    junction: 3,
                    cost: 5,
                },
            ],
        };
        let bytes = postcard::to_allocvec(&ls).unwrap();
        assert_eq!(
            bytes,
            [
                0x02, 0x80, 0xE2, 0xCF, 0xAA, 0x06, 0x03, 0x02, 0x01, 0x01, 0x03, 0x05
            ]
        );
        assert_eq!(postcard::from_bytes::<LinkState>(&bytes).unwrap(), ls);
        assert!(
            LinkState {
                incarnation: 1_700_000_001,
                seq: 0,
                ..ls.clone()
            }
            .newer_than(&ls),
            "a new life outranks any count of the old one"
        );
    }
}
