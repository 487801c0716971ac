//! A tiny deterministic pseudo-random generator (SplitMix64) for fault schedules.
//!
//! A schedule must come out the same from the same seed on every machine and every build, and
//! needs no cryptographic quality: SplitMix64 is a few instructions per draw, passes BigCrush,
//! and keeps the runner free of a dependency whose output could change between versions.

/// SplitMix64 state; equal seeds give equal sequences.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed` (any value, zero included).
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `lo..=hi` (`lo <= hi`), by multiply-shift: the bias is below 2^-32 for the
    /// small ranges of a schedule.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi, "empty range {lo}..={hi}");
        let span = hi - lo + 1;
        lo + ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as u64
    }

    /// One of `items` (not empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        debug_assert!(!items.is_empty(), "pick from nothing");
        items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

/// A seed for a sub-schedule, mixed from the run's seed and a label, so that each scenario's
/// schedule depends only on the run's seed and its own number (a scenario run alone with the
/// same seed gets the same faults).
pub fn derive_seed(seed: u64, label: u64) -> u64 {
    SplitMix64::new(seed ^ label.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// A fresh seed from the clock and the process id, for runs without `--seed`.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Kept to 53 bits so the seed survives a round trip through tools that read numbers as
    // floating point (spreadsheets, JSON).
    SplitMix64::new(nanos ^ u64::from(std::process::id())).next_u64() >> 11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_seeds_give_equal_sequences_and_different_seeds_do_not() {
        let a: Vec<u64> = (0..8)
            .scan(SplitMix64::new(7), |g, _| Some(g.next_u64()))
            .collect();
        let b: Vec<u64> = (0..8)
            .scan(SplitMix64::new(7), |g, _| Some(g.next_u64()))
            .collect();
        let c: Vec<u64> = (0..8)
            .scan(SplitMix64::new(8), |g, _| Some(g.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn range_stays_within_its_bounds_and_reaches_both_ends() {
        let mut g = SplitMix64::new(1);
        let draws: Vec<u64> = (0..2_000).map(|_| g.range(3, 6)).collect();
        assert!(draws.iter().all(|v| (3..=6).contains(v)));
        assert!(draws.contains(&3) && draws.contains(&6));
        assert_eq!(g.range(5, 5), 5);
    }

    #[test]
    fn derived_seeds_differ_by_label_and_repeat_by_seed() {
        assert_eq!(derive_seed(42, 1), derive_seed(42, 1));
        assert_ne!(derive_seed(42, 1), derive_seed(42, 2));
        assert_ne!(derive_seed(42, 1), derive_seed(43, 1));
    }
}
