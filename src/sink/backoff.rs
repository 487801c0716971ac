//! Capped exponential backoff for retrying ClickHouse while it is down.
//!
//! The schedule is deterministic (no jitter): `initial, 2·initial, 4·initial, …` up to `max`.
//! A relay retries one batch at a time per table, so there is no herd of clients to spread out,
//! and a deterministic schedule keeps tests and operators' expectations exact.

use std::time::Duration;

/// A capped exponential backoff schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    /// Delays handed out since the last reset.
    attempts: u32,
}

impl Backoff {
    /// A schedule starting at `initial_ms` and doubling up to `max_ms`.
    ///
    /// `initial_ms` of 0 is raised to 1 (a zero delay would never grow), and `max_ms` below
    /// `initial_ms` is raised to it, so every schedule is well formed.
    pub fn new(initial_ms: u64, max_ms: u64) -> Self {
        let initial_ms = initial_ms.max(1);
        Backoff {
            initial_ms,
            max_ms: max_ms.max(initial_ms),
            attempts: 0,
        }
    }

    /// The delay to wait before the next attempt; each call doubles it until the cap.
    pub fn next_delay(&mut self) -> Duration {
        // 2^63 ms exceeds any cap; clamping the exponent keeps the shift defined.
        let factor = 1u64 << self.attempts.min(63);
        let delay_ms = self.initial_ms.saturating_mul(factor).min(self.max_ms);
        self.attempts = self.attempts.saturating_add(1);
        Duration::from_millis(delay_ms)
    }

    /// Starts the schedule again from `initial_ms` (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// Delays handed out since the last reset (the number of consecutive failures).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(backoff: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect()
    }

    #[test]
    fn delays_double_from_initial_and_stop_at_the_cap() {
        let mut backoff = Backoff::new(100, 1_000);
        assert_eq!(
            schedule(&mut backoff, 7),
            [100, 200, 400, 800, 1_000, 1_000, 1_000]
        );
        assert_eq!(backoff.attempts(), 7);
    }

    #[test]
    fn reset_starts_the_schedule_again() {
        let mut backoff = Backoff::new(50, 10_000);
        schedule(&mut backoff, 5);
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert_eq!(schedule(&mut backoff, 3), [50, 100, 200]);
    }

    #[test]
    fn many_failures_neither_overflow_nor_exceed_the_cap() {
        let mut backoff = Backoff::new(u64::MAX / 2, u64::MAX);
        for _ in 0..200 {
            assert!(backoff.next_delay() <= Duration::from_millis(u64::MAX));
        }
        let mut small = Backoff::new(1, 30_000);
        let delays = schedule(&mut small, 100);
        assert_eq!(*delays.last().unwrap_or(&0), 30_000);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "never decreases");
    }

    #[test]
    fn degenerate_bounds_are_made_well_formed() {
        assert_eq!(schedule(&mut Backoff::new(0, 0), 3), [1, 1, 1]);
        assert_eq!(schedule(&mut Backoff::new(500, 100), 2), [500, 500]);
    }

    #[test]
    fn identical_backoffs_produce_identical_schedules() {
        let mut a = Backoff::new(10, 5_000);
        let mut b = Backoff::new(10, 5_000);
        assert_eq!(schedule(&mut a, 20), schedule(&mut b, 20));
    }
}
