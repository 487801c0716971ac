//! Bisection of a poison batch down to the rows ClickHouse rejects.
//!
//! When a batch fails as [`ErrorClass::Poison`], it is split into deterministic halves, each
//! half inserted on its own, and failing halves split again until single rows remain. Rows in
//! halves that succeed are stored; single rows that still fail are reported with their reason
//! so the drain can dead-letter them (invariant 8).
//!
//! Design constraints:
//!
//! - **Deterministic.** Ranges are always split at `start + len / 2` and visited depth first,
//!   left before right; each sub-insert carries a token derived from the batch token and its
//!   absolute row range (`{token}/{start}-{end}`, end exclusive). A bisection interrupted by a
//!   retryable error and run again on the same batch therefore sends the same inserts with the
//!   same tokens, which server-side deduplication drops (modern servers), and the
//!   ReplacingMergeTree tables collapse anyway (invariants 6 and 7).
//! - **Retryable and schema errors stop the bisection** and are returned as they are: they are not
//!   the rows' fault, and the caller retries the whole batch later.
//! - **Bounded, and never at the expense of good rows.** The depth is at most `ceil(log2(rows))`
//!   by construction (asserted), the pending stack at most one range per level plus one. A batch of
//!   `n` rows needs at most `2n - 1` inserts to isolate every row, so the budget of one isolation is
//!   `max(inserts_max, 2n - 1)`: a budget below that would have to report rows that were never shown
//!   to be bad, and dead-letter good rows. Should the budget still run out (it cannot by the bound
//!   above), the isolation stops with a retryable error: the batch is kept and retried, and no row
//!   is reported as poison without its own failed insert.

use std::future::Future;
use std::ops::Range;

use super::classify::{ErrorClass, InsertError};

/// Default floor of the inserts one isolation may issue: enough to isolate every row of a
/// 8,192-row batch. Larger batches get `2n - 1` (see the module docs).
pub const ISOLATE_INSERTS_MAX_DEFAULT: u32 = 16_384;

/// A row ClickHouse rejected, by its index in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoisonRow {
    /// Index of the row in the batch passed to the isolating insert.
    pub index: usize,
    /// Why it was rejected (class [`ErrorClass::Poison`]).
    pub error: InsertError,
}

/// The result of an isolating insert that did not hit a retryable or schema error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IsolateOutcome {
    /// Rows stored in ClickHouse.
    pub rows_inserted: usize,
    /// Rejected rows, ascending by index; empty when the whole batch went in at once.
    pub poison: Vec<PoisonRow>,
    /// INSERT statements issued, including the first one for the whole batch.
    pub inserts: u32,
}

impl IsolateOutcome {
    /// True when every row of a non-empty batch was rejected, which for typed rows more often means
    /// the table does not match the row type than that all rows are bad; the caller may check.
    pub fn all_rows_poison(&self) -> bool {
        self.rows_inserted == 0 && !self.poison.is_empty()
    }
}

/// Token for a sub-range of a batch, derived from the batch token and the absolute row range.
pub fn sub_batch_token(token: &str, range: &Range<usize>) -> String {
    format!("{token}/{}-{}", range.start, range.end)
}

/// The most inserts a bisection of `n` rows can issue: every range it tries is a node of a
/// binary tree with at most `n` leaves, which has at most `2n - 1` nodes.
pub fn inserts_needed_max(n: usize) -> u32 {
    u32::try_from(n.saturating_mul(2).saturating_sub(1)).unwrap_or(u32::MAX)
}

/// Smallest `d` with `2^d >= n`: the deepest level halving can reach from `n` rows.
fn depth_bound(n: usize) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// Inserts rows `0..len` through `attempt`, bisecting on poison as described in the module docs.
///
/// `attempt(range, token)` inserts exactly the rows in `range` with the given deduplication token
/// and classifies any failure. The whole batch uses `token` itself; sub-ranges use
/// [`sub_batch_token`]. The budget is `inserts_max` raised to [`inserts_needed_max`] of `len`.
pub async fn isolate<F, Fut>(
    len: usize,
    token: Option<&str>,
    inserts_max: u32,
    mut attempt: F,
) -> Result<IsolateOutcome, InsertError>
where
    F: FnMut(Range<usize>, Option<String>) -> Fut,
    Fut: Future<Output = Result<(), InsertError>>,
{
    let mut outcome = IsolateOutcome::default();
    if len == 0 {
        return Ok(outcome);
    }
    let inserts_max = inserts_max.max(inserts_needed_max(len));
    let depth_max = depth_bound(len);

    let mut stack = vec![Pending {
        range: 0..len,
        depth: 0,
    }];

    while let Some(pending) = stack.pop() {
        assert!(
            pending.depth <= depth_max,
            "bisection deeper than log2 of the batch"
        );
        assert!(
            stack.len() as u32 <= depth_max + 1,
            "pending ranges exceed one per level"
        );
        if outcome.inserts >= inserts_max {
            // Unreachable by the 2n - 1 bound; if it ever happens, keep the batch for a retry
            // rather than report rows that no insert showed to be bad.
            return Err(InsertError::retryable(format!(
                "bisection of {len} rows ran out of its budget of {inserts_max} inserts; the batch is kept and retried"
            )));
        }

        let range = pending.range;
        let sub_token = token.map(|t| {
            if range == (0..len) {
                t.to_owned()
            } else {
                sub_batch_token(t, &range)
            }
        });
        outcome.inserts += 1;
        match attempt(range.clone(), sub_token).await {
            Ok(()) => outcome.rows_inserted += range.len(),
            Err(error) if error.class != ErrorClass::Poison => return Err(error),
            Err(error) if range.len() == 1 => outcome.poison.push(PoisonRow {
                index: range.start,
                error,
            }),
            Err(_) => {
                let mid = range.start + range.len() / 2;
                // Right pushed first so the left half is inserted first.
                stack.push(Pending {
                    range: mid..range.end,
                    depth: pending.depth + 1,
                });
                stack.push(Pending {
                    range: range.start..mid,
                    depth: pending.depth + 1,
                });
            }
        }
    }

    outcome.poison.sort_by_key(|p| p.index);
    debug_assert_eq!(
        outcome.rows_inserted + outcome.poison.len(),
        len,
        "every row is either stored or reported"
    );
    Ok(outcome)
}

/// A range still to insert, with its depth.
struct Pending {
    range: Range<usize>,
    depth: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    /// A fake table that rejects any insert containing a row from `bad`, and records each call.
    struct FakeTable {
        bad: std::collections::BTreeSet<usize>,
        calls: RefCell<Vec<(Range<usize>, Option<String>)>>,
        stored: RefCell<Vec<usize>>,
        /// Fail with this (non-poison) error on the call with this number, counting from 1.
        fail_on_call: Option<(usize, InsertError)>,
    }

    impl FakeTable {
        fn new(bad: &[usize]) -> Self {
            FakeTable {
                bad: bad.iter().copied().collect(),
                calls: RefCell::new(Vec::new()),
                stored: RefCell::new(Vec::new()),
                fail_on_call: None,
            }
        }

        fn insert(&self, range: Range<usize>, token: Option<String>) -> Result<(), InsertError> {
            self.calls.borrow_mut().push((range.clone(), token));
            if let Some((n, error)) = &self.fail_on_call {
                if self.calls.borrow().len() == *n {
                    return Err(error.clone());
                }
            }
            if let Some(bad) = self.bad.range(range.clone()).next() {
                return Err(InsertError {
                    class: ErrorClass::Poison,
                    message: format!("row {bad} is bad"),
                    code: Some(27),
                });
            }
            self.stored.borrow_mut().extend(range);
            Ok(())
        }
    }

    fn run(
        table: &FakeTable,
        len: usize,
        token: Option<&str>,
        max: u32,
    ) -> Result<IsolateOutcome, InsertError> {
        let fut = isolate(len, token, max, |range, token| {
            let result = table.insert(range, token);
            async move { result }
        });
        // The fake completes synchronously, so polling with a no-op waker drives it to the end.
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(result) = fut.as_mut().poll(&mut cx) {
                return result;
            }
        }
    }

    fn poison_indices(outcome: &IsolateOutcome) -> Vec<usize> {
        outcome.poison.iter().map(|p| p.index).collect()
    }

    #[test]
    fn a_clean_batch_is_inserted_once_with_the_batch_token() {
        let table = FakeTable::new(&[]);
        let outcome = run(&table, 10, Some("t"), 100).expect("no error");
        assert_eq!(outcome.rows_inserted, 10);
        assert!(outcome.poison.is_empty());
        assert_eq!(outcome.inserts, 1);
        assert_eq!(*table.calls.borrow(), vec![(0..10, Some("t".to_owned()))]);
    }

    #[test]
    fn one_bad_row_is_isolated_and_every_other_row_is_stored() {
        for bad in 0..9 {
            let table = FakeTable::new(&[bad]);
            let outcome = run(&table, 9, Some("t"), 100).expect("no error");
            assert_eq!(poison_indices(&outcome), vec![bad]);
            assert_eq!(outcome.poison[0].error.message, format!("row {bad} is bad"));
            assert_eq!(outcome.rows_inserted, 8);
            let mut stored = table.stored.borrow().clone();
            stored.sort_unstable();
            assert_eq!(stored, (0..9).filter(|&i| i != bad).collect::<Vec<_>>());
            assert!(
                outcome.inserts <= 2 * depth_bound(9) + 1,
                "{} inserts",
                outcome.inserts
            );
        }
    }

    #[test]
    fn several_bad_rows_are_all_reported_in_ascending_order() {
        let table = FakeTable::new(&[13, 2, 14, 99]);
        let outcome = run(&table, 100, Some("t"), 1_000).expect("no error");
        assert_eq!(poison_indices(&outcome), vec![2, 13, 14, 99]);
        assert_eq!(outcome.rows_inserted, 96);
        assert_eq!(table.stored.borrow().len(), 96);
    }

    #[test]
    fn sub_inserts_carry_tokens_derived_from_their_absolute_range() {
        let table = FakeTable::new(&[3]);
        run(&table, 4, Some("b7"), 100).expect("no error");
        let tokens: Vec<_> = table
            .calls
            .borrow()
            .iter()
            .map(|(_, t)| t.clone().unwrap_or_default())
            .collect();
        assert_eq!(tokens, ["b7", "b7/0-2", "b7/2-4", "b7/2-3", "b7/3-4"]);
    }

    #[test]
    fn without_a_token_no_sub_insert_gets_one() {
        let table = FakeTable::new(&[1]);
        run(&table, 4, None, 100).expect("no error");
        assert!(table.calls.borrow().iter().all(|(_, t)| t.is_none()));
    }

    #[test]
    fn a_repeated_bisection_issues_the_same_inserts_in_the_same_order() {
        let first = FakeTable::new(&[5, 6, 40]);
        let second = FakeTable::new(&[5, 6, 40]);
        run(&first, 64, Some("x"), 1_000).expect("no error");
        run(&second, 64, Some("x"), 1_000).expect("no error");
        assert_eq!(*first.calls.borrow(), *second.calls.borrow());
    }

    #[test]
    fn a_retryable_error_during_bisection_is_returned_as_is() {
        let mut table = FakeTable::new(&[7]);
        let down = InsertError::retryable("connection refused");
        table.fail_on_call = Some((3, down.clone()));
        assert_eq!(run(&table, 16, Some("t"), 100), Err(down));
    }

    #[test]
    fn a_schema_error_on_the_whole_batch_is_returned_without_bisecting() {
        let mut table = FakeTable::new(&[]);
        let missing = InsertError {
            class: ErrorClass::Schema,
            message: "Table t doesn't exist".into(),
            code: Some(60),
        };
        table.fail_on_call = Some((1, missing.clone()));
        assert_eq!(run(&table, 16, Some("t"), 100), Err(missing));
        assert_eq!(table.calls.borrow().len(), 1);
    }

    #[test]
    fn an_all_bad_batch_needs_at_most_two_n_minus_one_inserts() {
        let bad: Vec<usize> = (0..33).collect();
        let table = FakeTable::new(&bad);
        let outcome = run(&table, 33, Some("t"), 1_000).expect("no error");
        assert_eq!(poison_indices(&outcome), bad);
        assert!(outcome.all_rows_poison());
        assert!(outcome.inserts < 2 * 33, "at most 2n - 1 inserts");
    }

    #[test]
    fn a_budget_below_what_the_batch_needs_is_raised_and_no_good_row_is_reported() {
        let table = FakeTable::new(&[0, 9]);
        let outcome = run(&table, 10, Some("t"), 3).expect("no error");
        assert!(outcome.inserts > 3, "{}", outcome.inserts);
        assert!(outcome.inserts <= inserts_needed_max(10));
        assert_eq!(poison_indices(&outcome), vec![0, 9]);
        assert_eq!(outcome.rows_inserted, 8);
    }

    #[test]
    fn a_batch_larger_than_the_default_budget_dead_letters_only_its_poison_rows() {
        // 40,000 rows with every tenth one bad need far more than the default budget's inserts.
        let len = 40_000;
        let bad: Vec<usize> = (0..len).step_by(10).collect();
        let table = FakeTable::new(&bad);
        let outcome = run(&table, len, Some("t"), ISOLATE_INSERTS_MAX_DEFAULT).expect("no error");
        assert!(
            outcome.inserts > ISOLATE_INSERTS_MAX_DEFAULT,
            "{}",
            outcome.inserts
        );
        assert_eq!(poison_indices(&outcome), bad);
        assert_eq!(outcome.rows_inserted, len - bad.len());
        let mut stored = table.stored.borrow().clone();
        stored.sort_unstable();
        let good: Vec<usize> = (0..len).filter(|i| i % 10 != 0).collect();
        assert_eq!(stored, good, "every good row is inserted");
    }

    #[test]
    fn an_empty_batch_issues_no_insert() {
        let table = FakeTable::new(&[]);
        let outcome = run(&table, 0, Some("t"), 10).expect("no error");
        assert_eq!(outcome, IsolateOutcome::default());
        assert!(table.calls.borrow().is_empty());
    }

    #[test]
    fn depth_bound_is_ceil_log2() {
        assert_eq!(depth_bound(1), 0);
        assert_eq!(depth_bound(2), 1);
        assert_eq!(depth_bound(3), 2);
        assert_eq!(depth_bound(1024), 10);
        assert_eq!(depth_bound(1025), 11);
    }

    proptest! {
        #[test]
        fn any_set_of_bad_rows_is_reported_exactly_and_the_rest_is_stored(
            len in 1usize..300,
            bad_seed in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut bad: Vec<usize> = bad_seed.iter().map(|b| b % len).collect();
            bad.sort_unstable();
            bad.dedup();
            let table = FakeTable::new(&bad);
            let outcome = run(&table, len, Some("t"), u32::MAX).expect("no error");
            prop_assert_eq!(poison_indices(&outcome), bad.clone());
            let mut stored = table.stored.borrow().clone();
            stored.sort_unstable();
            let good: Vec<usize> = (0..len).filter(|i| !bad.contains(i)).collect();
            prop_assert_eq!(stored, good);
            prop_assert!((outcome.inserts as usize) < 2 * len, "at most 2n - 1 inserts");
            // Each bad row costs at most two inserts per level, plus the first insert.
            let bound = 1 + 2 * bad.len() * depth_bound(len) as usize;
            prop_assert!(outcome.inserts as usize <= bound, "{} > {}", outcome.inserts, bound);
        }
    }
}
