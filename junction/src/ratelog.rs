//! Warnings that a hostile peer could trigger once per connection, logged
//! at most once per interval with a count: a flood of 5,000 refused
//! connections is one line a second, not 5,000 lines.

use std::cell::Cell;
use std::fmt::Display;
use std::rc::Rc;
use std::time::Duration;

/// How often one kind of warning is logged at most.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// One kind of warning, rate-limited.
///
/// The first occurrence is logged at once, with its detail. Later ones in the
/// same interval are counted, and the count is logged when the interval
/// ends; while they keep coming, one line per interval. Must be used inside
/// a `LocalSet` (a timer task logs the count).
#[derive(Debug)]
pub(crate) struct RateLimitedWarn {
    what: &'static str,
    interval: Duration,
    /// Occurrences not logged yet; `None` while no interval is open.
    unlogged: Rc<Cell<Option<u64>>>,
}

impl RateLimitedWarn {
    /// A warning that says `what` happened, e.g. "turned away a connection".
    pub(crate) fn new(what: &'static str) -> Self {
        Self::every(INTERVAL, what)
    }

    /// As [`RateLimitedWarn::new`], logged at most once per `interval`.
    pub(crate) fn every(interval: Duration, what: &'static str) -> Self {
        Self {
            what,
            interval,
            unlogged: Rc::new(Cell::new(None)),
        }
    }

    /// Notes one occurrence, with what is particular to it.
    pub(crate) fn warn(&self, detail: impl Display) {
        if let Some(n) = self.unlogged.get() {
            self.unlogged.set(Some(n + 1));
            return;
        }
        tracing::warn!("{}: {detail}", self.what);
        self.unlogged.set(Some(0));
        let (what, interval, unlogged) = (self.what, self.interval, self.unlogged.clone());
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(interval).await;
                match unlogged.get() {
                    Some(n) if n > 0 => {
                        tracing::warn!(
                            "{what}: {n} more times in the last {:.1} s",
                            interval.as_secs_f32()
                        );
                        unlogged.set(Some(0));
                    }
                    // A quiet interval: the next one is logged at once.
                    _ => {
                        unlogged.set(None);
                        return;
                    }
                }
            }
        });
    }

    /// Occurrences counted and not logged yet, if an interval is open.
    #[cfg(test)]
    fn unlogged(&self) -> Option<u64> {
        self.unlogged.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (without a timed assertion: only a generous bound against a
    /// hang) until `done` holds.
    async fn eventually(mut done: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("it happens");
    }

    #[tokio::test]
    async fn a_burst_is_counted_then_the_warning_rearms() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let w =
                    RateLimitedWarn::every(Duration::from_millis(20), "turned away a connection");
                assert_eq!(w.unlogged(), None);
                for i in 0..5_907 {
                    w.warn(i);
                }
                assert_eq!(w.unlogged(), Some(5_906), "one logged, the rest counted");
                // The count is logged, then a quiet interval rearms it.
                eventually(|| w.unlogged().is_none()).await;
                w.warn("again");
                assert_eq!(
                    w.unlogged(),
                    Some(0),
                    "after a quiet interval, logged at once"
                );
            })
            .await;
    }
}
