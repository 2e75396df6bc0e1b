//! Warnings a peer can cause at will, logged at most once per interval: a
//! flood of refused registrations is one line a second with a count, not a
//! line each, so the log costs the junction nothing an attacker controls.
//!
//! Sans-IO like the rest of the core: the time is the input's.

use std::time::{Duration, Instant};

/// How often one kind of warning is logged at most.
const INTERVAL: Duration = Duration::from_secs(1);

/// One kind of warning, rate-limited. The first occurrence in an interval
/// is logged with its detail and the number of occurrences left unlogged
/// since the last line; the others are only counted.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    last: Option<Instant>,
    unlogged: u64,
}

impl Quiet {
    /// Whether to log an occurrence at `now`; `Some(n)` with the number of
    /// occurrences left unlogged before it.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < INTERVAL => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// What to add to a line to say how many went unlogged before it.
pub(crate) fn more(unlogged: u64) -> String {
    match unlogged {
        0 => String::new(),
        n => format!(" (and {n} more like it since the last line)"),
    }
}

/// The rate-limited warnings of one core.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    /// Refused registrations and authentications.
    pub(crate) refusals: Quiet,
    /// Names registered in the development namespace.
    pub(crate) dev_names: Quiet,
    /// Link states refused from neighbours.
    pub(crate) routing: Quiet,
    /// Session frames and hellos refused from other junctions: altered,
    /// forged, replayed, or in clear where keys are required.
    pub(crate) sessions: Quiet,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count() {
        let mut q = Quiet::default();
        let t = Instant::now();
        assert_eq!(q.admit(t), Some(0));
        for i in 1..1000 {
            assert_eq!(q.admit(t + Duration::from_micros(i)), None);
        }
        assert_eq!(q.admit(t + INTERVAL), Some(999));
        assert_eq!(q.admit(t + INTERVAL * 3), Some(0));
    }
}
