//! A drift-free rate schedule for `loadgen`.
//!
//! Message `n` (counting from 0) is due at `start + n / rate`. Computing each due time from
//! the start, instead of sleeping a fixed interval after every message, keeps the achieved
//! rate exact over a run: a late wake-up makes the following messages go out at once until
//! the schedule is met again, and timer granularity never accumulates.

use std::time::{Duration, Instant};

const NANOS_PER_S: u128 = 1_000_000_000;

/// When message `n` is due, relative to the start of the run, for `rate_per_s` messages per
/// second. A rate of 0 means "as fast as possible": every message is due at once.
pub fn due_offset(n: u64, rate_per_s: u64) -> Duration {
    if rate_per_s == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(n) * NANOS_PER_S / u128::from(rate_per_s);
    // n < 2^64 and rate >= 1 keep nanos below 2^94; Duration holds u64 seconds, which
    // nanos / 1e9 < 2^64 always fits.
    let secs = (nanos / NANOS_PER_S) as u64;
    let sub = (nanos % NANOS_PER_S) as u32;
    Duration::new(secs, sub)
}

/// A schedule anchored at the instant the run started.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate_per_s: u64,
}

impl Schedule {
    /// A schedule for `rate_per_s` messages per second (0 = unlimited) starting at `start`.
    pub fn new(start: Instant, rate_per_s: u64) -> Self {
        Schedule { start, rate_per_s }
    }

    /// The instant message `n` is due, or `None` when the rate is unlimited.
    pub fn due(&self, n: u64) -> Option<Instant> {
        (self.rate_per_s > 0).then(|| self.start + due_offset(n, self.rate_per_s))
    }

    /// Waits until message `n` is due (returns at once if it is already late).
    pub async fn wait_for(&self, n: u64) {
        if let Some(due) = self.due(n) {
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_offsets_are_exact_multiples_of_the_interval() {
        assert_eq!(due_offset(0, 1000), Duration::ZERO);
        assert_eq!(due_offset(1, 1000), Duration::from_millis(1));
        assert_eq!(due_offset(1000, 1000), Duration::from_secs(1));
        assert_eq!(due_offset(5, 2), Duration::from_millis(2500));
        // A rate that does not divide a second: the offset rounds down and never drifts,
        // message 3n is due exactly at n seconds.
        assert_eq!(due_offset(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(due_offset(3_000_000, 3), Duration::from_secs(1_000_000));
    }

    #[test]
    fn unlimited_rate_makes_every_message_due_at_once() {
        assert_eq!(due_offset(123_456_789, 0), Duration::ZERO);
        let schedule = Schedule::new(Instant::now(), 0);
        assert_eq!(schedule.due(10), None);
    }

    #[test]
    fn offsets_are_monotonic_and_huge_counts_do_not_overflow() {
        let mut last = Duration::ZERO;
        for n in 0..10_000u64 {
            let d = due_offset(n, 7_919);
            assert!(d >= last);
            last = d;
        }
        let far = due_offset(u64::MAX, 1);
        assert_eq!(far.as_secs(), u64::MAX);
    }

    #[test]
    fn schedule_due_times_are_anchored_at_the_start() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 200);
        assert_eq!(schedule.due(0), Some(start));
        assert_eq!(schedule.due(200), Some(start + Duration::from_secs(1)));
        assert_eq!(schedule.due(1), Some(start + Duration::from_millis(5)));
    }

    #[tokio::test]
    async fn waiting_for_a_late_message_returns_at_once() {
        let start = Instant::now() - Duration::from_secs(10);
        let schedule = Schedule::new(start, 10);
        let before = Instant::now();
        schedule.wait_for(5).await;
        assert!(before.elapsed() < Duration::from_secs(1));
    }
}
