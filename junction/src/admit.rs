//! Who may take a connection slot: the global and per-user limits, and the
//! slot kept for the junction's own user and root, so that they can always
//! run `junction ls` on a full junction.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Connection slots kept for the junction's own user and root: past
/// `max_connections - RESERVED_SLOTS`, other users are turned away.
pub const RESERVED_SLOTS: usize = 1;

/// The default `max_connections`: room for 10,000 idle drivers and more, at
/// about 7 KiB of junction memory and one descriptor each.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// The default per-user limit for a given `max_connections`: three quarters,
/// so one user cannot take every slot, yet one user may still run the
/// 10,000 drivers the default configuration promises.
pub fn default_per_uid(max_connections: usize) -> usize {
    (max_connections / 4 * 3).max(1)
}

/// The connection limits the shell enforces at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once, the reserved slot included.
    pub max_connections: usize,
    /// Connections one user may hold at once (the junction's own user and
    /// root may go over it by the reserved slot).
    pub max_per_uid: usize,
    /// The junction's own user id.
    pub own_uid: u32,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Every slot is taken (for other users: every slot but the reserved one).
    #[error(
        "this junction serves as many connections as it may ({limit}); try again later, or ask its operator to raise --max-connections"
    )]
    Full {
        /// The limit that applied to this user.
        limit: usize,
    },
    /// This user holds as many connections as one user may.
    #[error(
        "user {uid} holds as many connections as one user may ({limit}); close some, or ask the operator to raise --max-connections-per-uid"
    )]
    PerUid {
        /// The user.
        uid: u32,
        /// The limit that applied to this user.
        limit: usize,
    },
}

impl Limits {
    /// Whether a connection from `uid` (unknown when the kernel would not
    /// say) may take a slot, with `total` slots taken and `held` of them by
    /// that user.
    pub fn admit(&self, total: usize, uid: Option<u32>, held: usize) -> Result<(), Refusal> {
        let privileged = uid.is_some_and(|u| u == self.own_uid || u == 0);
        let reserve = if privileged { 0 } else { RESERVED_SLOTS };
        let limit = self.max_connections.saturating_sub(reserve);
        if total >= limit {
            return Err(Refusal::Full { limit });
        }
        let per_uid = self.max_per_uid + RESERVED_SLOTS - reserve;
        if let Some(uid) = uid
            && held >= per_uid
        {
            return Err(Refusal::PerUid {
                uid,
                limit: per_uid,
            });
        }
        Ok(())
    }
}

/// Connections held per user, counted by [`Ticket`]s.
#[derive(Debug, Clone, Default)]
pub struct UidCounts(Rc<RefCell<HashMap<u32, usize>>>);

impl UidCounts {
    /// Connections `uid` holds now.
    pub fn held(&self, uid: u32) -> usize {
        self.0.borrow().get(&uid).copied().unwrap_or(0)
    }

    /// Counts one more connection for `uid` until the ticket is dropped.
    pub fn ticket(&self, uid: u32) -> Ticket {
        *self.0.borrow_mut().entry(uid).or_insert(0) += 1;
        Ticket {
            counts: self.clone(),
            uid,
        }
    }
}

/// One connection's place in its user's count; dropping it gives the place
/// back.
#[derive(Debug)]
pub struct Ticket {
    counts: UidCounts,
    uid: u32,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.counts.0.borrow_mut();
        if let Some(n) = counts.get_mut(&self.uid) {
            *n -= 1;
            // Users come and go: keep no entry for one that holds nothing.
            if *n == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// This process's effective user id (the owner of `/proc/self`).
pub fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 10,
        max_per_uid: 4,
        own_uid: 1000,
    };

    #[test]
    fn others_leave_the_last_slot_to_the_junctions_user_and_root() {
        assert_eq!(LIMITS.admit(8, Some(2000), 0), Ok(()));
        assert_eq!(
            LIMITS.admit(9, Some(2000), 0),
            Err(Refusal::Full { limit: 9 })
        );
        assert_eq!(
            LIMITS.admit(9, None, 0),
            Err(Refusal::Full { limit: 9 }),
            "an unknown user is not privileged"
        );
        assert_eq!(LIMITS.admit(9, Some(1000), 0), Ok(()));
        assert_eq!(LIMITS.admit(9, Some(0), 0), Ok(()));
        assert_eq!(
            LIMITS.admit(10, Some(1000), 0),
            Err(Refusal::Full { limit: 10 })
        );
    }

    #[test]
    fn one_user_cannot_take_every_slot() {
        assert_eq!(LIMITS.admit(3, Some(2000), 3), Ok(()));
        assert_eq!(
            LIMITS.admit(4, Some(2000), 4),
            Err(Refusal::PerUid {
                uid: 2000,
                limit: 4
            })
        );
        // The junction's user and root are limited too, one slot later.
        assert_eq!(LIMITS.admit(4, Some(1000), 4), Ok(()));
        assert_eq!(
            LIMITS.admit(5, Some(0), 5),
            Err(Refusal::PerUid { uid: 0, limit: 5 })
        );
    }

    #[test]
    fn tickets_count_while_held() {
        let counts = UidCounts::default();
        let a = counts.ticket(7);
        let b = counts.ticket(7);
        assert_eq!(counts.held(7), 2);
        drop(a);
        assert_eq!(counts.held(7), 1);
        drop(b);
        assert_eq!(counts.held(7), 0);
        assert!(counts.0.borrow().is_empty());
    }

    #[test]
    fn the_default_per_user_limit_fits_ten_thousand_drivers() {
        assert!(default_per_uid(DEFAULT_MAX_CONNECTIONS) > 10_000);
        assert!(default_per_uid(DEFAULT_MAX_CONNECTIONS) < DEFAULT_MAX_CONNECTIONS);
        assert_eq!(default_per_uid(1), 1);
    }
}
