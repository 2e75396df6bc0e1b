//! Time as the core sees it: handed in with every input, never read from a
//! clock, so that a simulation can run the real core under a fake one.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// The moment an input happens, as the shell read its clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// A monotonic instant: what timers such as the Hello deadline are
    /// measured in, and what [`crate::Core::poll_timeout`] answers in.
    pub instant: Instant,
    /// Seconds since the Unix epoch: what certificates and capability
    /// expiries are read against.
    pub unix: u64,
}

impl Now {
    /// The moment `instant` on the monotonic clock, `unix` on the wall clock.
    pub fn new(instant: Instant, unix: u64) -> Self {
        Self { instant, unix }
    }

    /// The same moment `elapsed` later on both clocks (whole seconds of the
    /// wall clock), for simulations and tests.
    pub fn later(self, elapsed: Duration) -> Self {
        Self {
            instant: self.instant + elapsed,
            unix: self.unix + elapsed.as_secs(),
        }
    }

    /// When wall-clock second `at` comes, on the monotonic clock, as far as
    /// the two clocks agree now. A wall clock that jumps only makes the
    /// core wake early or late; it checks the wall clock again when it does.
    /// A second too far for the monotonic clock (a certificate valid
    /// "forever", `u64::MAX`) is a century away: the core wakes then, and
    /// finds it still far.
    pub(crate) fn instant_of(self, at: u64) -> Instant {
        const CENTURY: u64 = 100 * 365 * 24 * 3600;
        let wait = Duration::from_secs(at.saturating_sub(self.unix).min(CENTURY));
        self.instant.checked_add(wait).unwrap_or(self.instant)
    }
}

/// Deadlines on the monotonic clock that come in the order they were set
/// (every one is "now plus the same timeout"), soonest first.
#[derive(Debug)]
pub(crate) struct FifoTimers<T> {
    entries: VecDeque<(Instant, T)>,
}

impl<T: Copy> FifoTimers<T> {
    pub(crate) fn new() -> Self {
        Self {
            entries: VecDeque::new(),
        }
    }

    /// Sets a deadline no earlier than every one set before.
    pub(crate) fn push(&mut self, at: Instant, value: T) {
        debug_assert!(self.entries.back().is_none_or(|(last, _)| *last <= at));
        self.entries.push_back((at, value));
    }

    /// The soonest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.entries.front().map(|(at, _)| *at)
    }

    /// Takes the next deadline that has come by `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        match self.entries.front() {
            Some((at, _)) if *at <= now => self.entries.pop_front().map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Deadlines on the wall clock, in any order, soonest first. Entries whose
/// subject has gone stay until their time, so the owner checks each one it
/// pops and may [`WallTimers::retain`] now and then.
#[derive(Debug)]
pub(crate) struct WallTimers<T: Ord> {
    heap: BinaryHeap<Reverse<(u64, T)>>,
}

impl<T: Ord + Copy> WallTimers<T> {
    pub(crate) fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
        }
    }

    pub(crate) fn push(&mut self, at: u64, value: T) {
        self.heap.push(Reverse((at, value)));
    }

    /// The soonest deadline, in seconds since the Unix epoch.
    pub(crate) fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the next deadline that has come by `now` (Unix seconds).
    pub(crate) fn pop_due(&mut self, now: u64) -> Option<(u64, T)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Keeps only the entries `keep` approves.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u64, T) -> bool) {
        self.heap.retain(|Reverse((at, v))| keep(*at, *v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_past_any_clock_is_far_but_no_overflow() {
        let now = Now::new(Instant::now(), 1_800_000_000);
        assert!(now.instant_of(u64::MAX) > now.instant + Duration::from_secs(3600 * 24 * 365));
        assert_eq!(
            now.instant_of(now.unix + 5),
            now.instant + Duration::from_secs(5)
        );
        assert_eq!(now.instant_of(0), now.instant);
    }

    #[test]
    fn fifo_timers_pop_only_what_is_due() {
        let t0 = Instant::now();
        let mut timers = FifoTimers::new();
        timers.push(t0 + Duration::from_secs(1), 'a');
        timers.push(t0 + Duration::from_secs(2), 'b');
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(1)), Some('a'));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(1)), None);
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(5)), Some('b'));
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn wall_timers_come_soonest_first_and_can_be_pruned() {
        let mut timers = WallTimers::new();
        for (at, v) in [(30, 3), (10, 1), (20, 2)] {
            timers.push(at, v);
        }
        assert_eq!(timers.next(), Some(10));
        assert_eq!(timers.pop_due(15), Some((10, 1)));
        assert_eq!(timers.pop_due(15), None);
        timers.retain(|_, v| v != 2);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.pop_due(100), Some((30, 3)));
    }

    #[test]
    fn wall_seconds_map_onto_the_monotonic_clock() {
        let now = Now::new(Instant::now(), 1000);
        assert_eq!(now.instant_of(1010), now.instant + Duration::from_secs(10));
        assert_eq!(now.instant_of(990), now.instant, "a past second is due now");
        assert_eq!(now.later(Duration::from_millis(2500)).unix, 1002);
    }
}
