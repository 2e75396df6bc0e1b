//! What junctions say to each other over a Highway: the junction-to-junction
//! protocol, apart from the driver protocol in [`crate::frame`].
//!
//! This first part is routing. Each junction describes its own live links,
//! and the service names registered on it, in a [`LinkState`] and floods it
//! to the whole bus; every junction keeps the newest description from each,
//! computes routes from them, and finds names' owners by them (see
//! `junction-core`'s routing module). docs/protocol.md, part 2, gives the
//! bytes.

use junction_identity::{Certificate, IdentityError, Purpose, SecretKey, ServiceName, Signature};
use serde::{Deserialize, Serialize};

/// A frame between two junctions over a Highway, with a payload the frame
/// says the meaning of (empty but for [`HighwayFrame::Forward`]). Variant
/// order is the wire numbering; new variants go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HighwayFrame {
    /// A junction's description of its links, flooded (tag 0).
    LinkState(LinkState),
    /// Traffic from junction `from` to junction `to`, passed along `route`
    /// (tag 1). The payload is for `to` alone: transit junctions pass it on
    /// unread.
    Forward {
        /// The junction it started from.
        from: u16,
        /// The junction it is for.
        to: u16,
        /// The junctions after `from`, `to` last.
        route: Hops,
    },
    /// A junction on the way could not pass on traffic from `from` to `to`
    /// (tag 2); sent back to `from` along `route` (the way it came,
    /// reversed), so that it chooses another way. No payload.
    Unroutable {
        /// The junction the traffic started from, which this goes back to.
        from: u16,
        /// The junction the traffic was for.
        to: u16,
        /// The junction that could not pass it on.
        at: u16,
        /// The junctions from `at` back to `from`, `from` last.
        route: Hops,
    },
}

/// The most junctions a route may pass through.
pub const MAX_HOPS: usize = 16;

/// A route carried by a message: the junctions after the first, the
/// destination last, at most [`MAX_HOPS`]. Copied, never allocated: a
/// transit junction passes it on as it came.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hops {
    len: u8,
    ids: [u16; MAX_HOPS],
}

impl Hops {
    /// A route through `ids`, if there are 1 to [`MAX_HOPS`].
    pub fn new(ids: &[u16]) -> Option<Self> {
        if ids.is_empty() || ids.len() > MAX_HOPS {
            return None;
        }
        let mut hops = Hops {
            len: ids.len() as u8,
            ids: [0; MAX_HOPS],
        };
        hops.ids[..ids.len()].copy_from_slice(ids);
        Some(hops)
    }

    /// The junctions, in order.
    pub fn as_slice(&self) -> &[u16] {
        &self.ids[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Hops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Serialize for Hops {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hops {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Hops;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a route of 1 to {MAX_HOPS} junction ids")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Hops, A::Error> {
                let mut hops = Hops {
                    len: 0,
                    ids: [0; MAX_HOPS],
                };
                while let Some(id) = seq.next_element::<u16>()? {
                    let Some(slot) = hops.ids.get_mut(usize::from(hops.len)) else {
                        return Err(serde::de::Error::invalid_length(MAX_HOPS + 1, &self));
                    };
                    *slot = id;
                    hops.len += 1;
                }
                if hops.len == 0 {
                    return Err(serde::de::Error::invalid_length(0, &self));
                }
                Ok(hops)
            }
        }
        d.deserialize_seq(Visit)
    }
}

/// The most neighbours one [`LinkState`] may list: more is refused, so that
/// one junction cannot make every other hold an unbounded description.
pub const MAX_NEIGHBOURS: usize = 256;

/// The most service names one [`LinkState`] may announce: more is refused,
/// when decoded and by the junction that receives it. Link states flood to
/// every junction on every change and each carries all its origin's names,
/// so the names' size is paid on every Highway at every link change and
/// held by every junction for every origin (docs/protocol.md 14.1).
pub const MAX_ANNOUNCED_NAMES: usize = 1024;

/// The most bytes of names (the sum of their lengths) one [`LinkState`] may
/// announce: with [`MAX_ANNOUNCED_NAMES`], names of 32 bytes on average.
/// Without it, 1024 names of 255 bytes would make a link state of 260 KB.
pub const MAX_ANNOUNCED_NAME_BYTES: usize = 32 * 1024;

/// One junction's description of its live links and of the service names
/// registered on it, flooded to every junction.
///
/// A newer description replaces an older one: newer means a greater
/// `incarnation`, or the same incarnation and a greater `seq`.
///
/// Its [`Seal`] proves that the origin made it: the origin's signature over
/// the other fields ([`LinkState::signed_bytes`]) and the certificate chain
/// that binds the signing key to the origin's id. The chain travels in every
/// link state rather than once per origin, so that each one can be checked
/// alone, by any junction, whatever reached it first (see docs/protocol.md
/// section 14.1 for what that costs).
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
    /// The service names registered on it, each once, in increasing byte
    /// order; at most [`MAX_ANNOUNCED_NAMES`] of them and
    /// [`MAX_ANNOUNCED_NAME_BYTES`] in all, or the link state does not
    /// decode. Another junction finds a name's owner by them, then asks it.
    #[serde(deserialize_with = "bounded_names")]
    pub names: Vec<ServiceName>,
    /// The origin's signature and certificate chain; `None` from a junction
    /// with no key, which only junctions configured to trust unsigned
    /// routing take.
    pub seal: Option<Seal>,
}

/// The origin's proof that it made a [`LinkState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// The origin's signature, for [`Purpose::LinkState`], over
    /// [`LinkState::signed_bytes`].
    pub signature: Signature,
    /// The origin's certificate chain, leaf first: the leaf is a junction
    /// certificate whose id is the link state's `origin`, and its subject
    /// key made `signature`.
    pub chain: Vec<Certificate>,
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

    /// What the seal's signature covers: the postcard bytes of every field
    /// but the seal, exactly as they start the link state on the wire.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, IdentityError> {
        postcard::to_allocvec(&(
            self.origin,
            self.incarnation,
            self.seq,
            &self.neighbours,
            &self.names,
        ))
        .map_err(|e| IdentityError::Encoding(e.to_string()))
    }

    /// Seals it as its origin, with the origin's junction `key` and the
    /// `chain` (leaf first) that certifies that key for the origin's id.
    pub fn seal(&mut self, key: &SecretKey, chain: Vec<Certificate>) -> Result<(), IdentityError> {
        let signature = key.sign(Purpose::LinkState, &self.signed_bytes()?);
        self.seal = Some(Seal { signature, chain });
        Ok(())
    }
}

/// Decodes [`LinkState::names`], refusing more than the bounds as soon as
/// they are passed, so that a peer cannot make a junction allocate without
/// end. Each name is checked as a [`ServiceName`] as it is decoded; order
/// and repeats are the receiver's to check (`junction-core`'s routing).
fn bounded_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ServiceName>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Vec<ServiceName>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "at most {MAX_ANNOUNCED_NAMES} service names, {MAX_ANNOUNCED_NAME_BYTES} bytes in all"
            )
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<ServiceName>, A::Error> {
            let mut names = Vec::new();
            let mut bytes = 0usize;
            while let Some(name) = seq.next_element::<ServiceName>()? {
                bytes += name.as_str().len();
                if names.len() == MAX_ANNOUNCED_NAMES || bytes > MAX_ANNOUNCED_NAME_BYTES {
                    return Err(serde::de::Error::invalid_length(names.len() + 1, &self));
                }
                names.push(name);
            }
            Ok(names)
        }
    }
    d.deserialize_seq(Visit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples in docs/protocol.md section 14.4, byte for byte.
    #[test]
    fn forwarded_traffic_encodes_as_documented() {
        let forward = HighwayFrame::Forward {
            from: 1,
            to: 3,
            route: Hops::new(&[2, 3]).unwrap(),
        };
        let bytes = postcard::to_allocvec(&forward).unwrap();
        assert_eq!(bytes, [0x01, 0x01, 0x03, 0x02, 0x02, 0x03]);
        assert_eq!(
            postcard::from_bytes::<HighwayFrame>(&bytes).unwrap(),
            forward
        );
        let back = HighwayFrame::Unroutable {
            from: 1,
            to: 3,
            at: 2,
            route: Hops::new(&[1]).unwrap(),
        };
        let bytes = postcard::to_allocvec(&back).unwrap();
        assert_eq!(bytes, [0x02, 0x01, 0x03, 0x02, 0x01, 0x01]);
        // A route of no junctions, or of more than MAX_HOPS, is refused.
        assert!(postcard::from_bytes::<HighwayFrame>(&[0x01, 0x01, 0x03, 0x00]).is_err());
        let mut long = vec![0x01, 0x01, 0x03, MAX_HOPS as u8 + 1];
        long.extend(std::iter::repeat_n(0x02, MAX_HOPS + 1));
        assert!(postcard::from_bytes::<HighwayFrame>(&long).is_err());
    }

    /// The examples in docs/protocol.md section 14.1, byte for byte.
    #[test]
    fn a_link_state_encodes_as_documented() {
        let mut ls = LinkState {
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
            names: vec![
                ServiceName::new("echo").unwrap(),
                ServiceName::new("org.acme.db").unwrap(),
            ],
            seal: None,
        };
        let mut unsigned = vec![
            0x02, 0x80, 0xE2, 0xCF, 0xAA, 0x06, 0x03, 0x02, 0x01, 0x01, 0x03, 0x05,
        ];
        unsigned.extend([0x02, 0x04]); // two names; "echo", four bytes
        unsigned.extend(b"echo");
        unsigned.push(0x0B); // "org.acme.db", eleven bytes
        unsigned.extend(b"org.acme.db");
        assert_eq!(unsigned.len(), 30);
        let bytes = postcard::to_allocvec(&ls).unwrap();
        assert_eq!(bytes[..unsigned.len()], unsigned);
        assert_eq!(bytes[unsigned.len()..], [0x00], "no seal");
        assert_eq!(ls.signed_bytes().unwrap(), unsigned);
        assert_eq!(postcard::from_bytes::<LinkState>(&bytes).unwrap(), ls);
        let framed = postcard::to_allocvec(&HighwayFrame::LinkState(ls.clone())).unwrap();
        assert_eq!(framed[0], 0x00, "LinkState is tag 0");
        assert_eq!(&framed[1..], &bytes[..]);
        assert!(
            LinkState {
                incarnation: 1_700_000_001,
                seq: 0,
                ..ls.clone()
            }
            .newer_than(&ls),
            "a new life outranks any count of the old one"
        );

        // Sealed by junction 2's key, certified by an authority.
        let key = junction_identity::SecretKey::generate().unwrap();
        let authority = junction_identity::SecretKey::generate().unwrap();
        let cert = junction_identity::Certificate::issue(
            junction_identity::CertBody {
                version: 1,
                serial: 7,
                subject: key.public(),
                role: junction_identity::Role::Junction { id: 2 },
                not_before: 0,
                not_after: u64::MAX,
                issuer: authority.public(),
            },
            &authority,
        )
        .unwrap();
        ls.seal(&key, vec![cert.clone()]).unwrap();
        let bytes = postcard::to_allocvec(&ls).unwrap();
        let mut expected = unsigned.clone();
        expected.extend([0x01, 0x40]); // a seal; 64 signature bytes
        let signature = key.sign(Purpose::LinkState, &unsigned);
        expected.extend(signature.0);
        expected.push(0x01); // a chain of one certificate
        expected.extend(postcard::to_allocvec(&cert).unwrap());
        assert_eq!(bytes, expected);
        key.public()
            .verify(Purpose::LinkState, &unsigned, &signature)
            .unwrap();
        assert_eq!(postcard::from_bytes::<LinkState>(&bytes).unwrap(), ls);
    }

    /// Names that are not service names, or more than the bounds, do not
    /// decode.
    #[test]
    fn announced_names_are_checked_when_decoded() {
        let ls = |names: Vec<String>| {
            let mut bytes = vec![0x02, 0x01, 0x01, 0x00];
            bytes.extend(postcard::to_allocvec(&names).unwrap());
            bytes.push(0x00);
            postcard::from_bytes::<LinkState>(&bytes)
        };
        assert_eq!(ls(vec!["echo".into()]).unwrap().names[0].as_str(), "echo");
        assert!(ls(vec!["Echo".into()]).is_err(), "not a service name");
        assert!(ls(vec![String::new()]).is_err(), "not a service name");
        // (Order and repeats are routing's to check, not the decoder's.)
        let short = || "x".to_string();
        assert!(ls(vec![short(); MAX_ANNOUNCED_NAMES]).is_ok());
        assert!(
            ls(vec![short(); MAX_ANNOUNCED_NAMES + 1]).is_err(),
            "too many"
        );
        let long = format!("{}.{}", "a".repeat(31), "b".repeat(32));
        let fit = MAX_ANNOUNCED_NAME_BYTES / long.len();
        assert!(ls(vec![long.clone(); fit]).is_ok());
        assert!(ls(vec![long; fit + 1]).is_err(), "too many bytes");
    }
}
