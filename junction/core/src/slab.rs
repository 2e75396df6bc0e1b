//! A generational slab: dense storage with keys that go stale when their
//! entry is removed, so a reused slot is never mistaken for the old one.

use std::collections::VecDeque;

/// A key into a [`Slab`]: a slot index and the generation it was issued in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Values addressed by [`Key`]s. Freed slots are reused oldest first, which
/// keeps a just-freed key from coming back soon.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: VecDeque<u32>,
    len: usize,
    limit: u32,
    generation_mask: u32,
    /// Slots it may have, held ones included: indices must fit their keys.
    max_slots: usize,
}

impl<T> Slab<T> {
    /// A slab of at most `limit` entries.
    pub(crate) fn with_limit(limit: u32) -> Self {
        Self {
            slots: Vec::new(),
            free: VecDeque::new(),
            len: 0,
            limit,
            generation_mask: u32::MAX,
            max_slots: u32::MAX as usize,
        }
    }

    /// A slab whose generations wrap within `mask`, and whose indices stay
    /// within it too (for keys packed into fewer bits).
    pub(crate) fn with_limit_and_mask(limit: u32, mask: u32) -> Self {
        Self {
            generation_mask: mask,
            max_slots: mask as usize + 1,
            ..Self::with_limit(limit)
        }
    }

    /// Whether [`Slab::insert`] would find room.
    pub(crate) fn has_room(&self) -> bool {
        (self.len as u64) < u64::from(self.limit)
            && (!self.free.is_empty() || self.slots.len() < self.max_slots)
    }

    /// Stores `value`; `None` when the slab is full.
    pub(crate) fn insert(&mut self, value: T) -> Option<Key> {
        if self.len as u64 >= u64::from(self.limit) {
            return None;
        }
        let index = match self.free.pop_front() {
            Some(index) => index,
            None => {
                if self.slots.len() >= self.max_slots {
                    return None;
                }
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                u32::try_from(self.slots.len() - 1).ok()?
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.value = Some(value);
        self.len += 1;
        Some(Key {
            index,
            generation: slot.generation,
        })
    }

    /// The value behind `key`, if it is still there.
    pub(crate) fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_ref()
    }

    /// The value behind `key`, if it is still there.
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Takes the value out; its key and all copies of it go stale.
    pub(crate) fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & self.generation_mask;
        self.free.push_back(key.index);
        self.len -= 1;
        Some(value)
    }

    /// Takes the value out like [`Slab::remove`], but keeps its slot from
    /// reuse until [`Slab::release`]: while something outside still names
    /// the old key, no new entry can be given a key equal to it, however
    /// the generations wrap.
    pub(crate) fn remove_and_hold(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & self.generation_mask;
        self.len -= 1;
        Some(value)
    }

    /// Lets a slot held by [`Slab::remove_and_hold`] be reused.
    pub(crate) fn release(&mut self, index: u32) {
        debug_assert!(
            self.slots
                .get(index as usize)
                .is_some_and(|s| s.value.is_none())
        );
        self.free.push_back(index);
    }

    /// The generation of the entry in slot `index`, if the slot is occupied.
    pub(crate) fn generation_of(&self, index: u32) -> Option<u32> {
        let slot = self.slots.get(index as usize)?;
        slot.value.as_ref().map(|_| slot.generation)
    }

    /// How many values are stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every stored key and value.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value.as_ref().map(|v| {
                (
                    Key {
                        index: i as u32,
                        generation: s.generation,
                    },
                    v,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss_after_reuse() {
        let mut s = Slab::with_limit(2);
        let a = s.insert("a").unwrap();
        let b = s.insert("b").unwrap();
        assert!(s.insert("c").is_none(), "limit holds");
        assert_eq!(s.remove(a), Some("a"));
        let c = s.insert("c").unwrap();
        assert_eq!(c.index, a.index);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&"c"));
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_held_slot_is_not_reused_until_released() {
        let mut s = Slab::with_limit_and_mask(4, 0x1);
        let a = s.insert("a").unwrap();
        assert_eq!(s.remove_and_hold(a), Some("a"));
        assert_eq!(s.len(), 0);
        // With one generation bit the slot would come back as `a` after two
        // reuses; held, it does not come back at all.
        for _ in 0..4 {
            let k = s.insert("x").unwrap();
            assert_ne!(k.index, a.index);
            s.remove(k);
        }
        s.release(a.index);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let k = s.insert("y").unwrap();
            seen.push(k.index);
            s.remove(k);
        }
        assert!(seen.contains(&a.index), "released slots are reused");
    }
}
