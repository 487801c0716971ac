//! Isolation of the rows ClickHouse rejects in a batch: splitting by partition, then bisection.
//!
//! When a batch fails as [`ErrorClass::Poison`], it is cut into smaller inserts until the rows
//! ClickHouse rejects stand alone. Rows in inserts that succeed are stored; single rows that still
//! fail are reported with their reason so the drain can dead-letter them (invariant 8).
//!
//! Two ways to cut a failed set of rows:
//!
//! - **By partition**, when the failure is "Too many partitions for single INSERT block"
//!   ([`InsertError::is_too_many_partitions`]): the rows are grouped by their partition key (the
//!   caller's function, the month of the row time for the relay's tables) in order of first
//!   appearance, and each group is inserted on its own, its rows in batch order. A batch of old
//!   data spread over years thus goes in with one insert (and one part) per month, instead of a
//!   bisection that creates a part per month in each of many small inserts. Should a group still
//!   fail that way (a table partitioned more finely than the key says), it is bisected: a single
//!   row always lies in one partition, so that ends too.
//! - **In halves**, for any other poison failure: split at `start + len / 2`.
//!
//! Design constraints:
//!
//! - **Deterministic.** Cuts depend only on the rows and the server's verdicts, and pending sets
//!   are visited depth first, in row order. Each insert carries a token derived from the batch
//!   token: a group `k` (from 0) of a set whose token is `t` gets `{t}/part{k}`; a half gets
//!   `{g}/{start}-{end}` (end exclusive), positions within its enclosing group, whose token is
//!   `g` (the whole batch is the outermost group, so halves of it name absolute row ranges). An
//!   isolation interrupted by a retryable error and run again on the same batch therefore sends
//!   the same inserts with the same tokens, which server-side deduplication drops (modern
//!   servers), and the ReplacingMergeTree tables collapse anyway (invariants 6 and 7).
//! - **Retryable and schema errors stop the isolation** and are returned as they are: they are not
//!   the rows' fault, and the caller retries the whole batch later.
//! - **Bounded per batch, and never at the expense of good rows.** Every failed set is cut into
//!   at least two disjoint non-empty sets and every set that goes in or stands alone as poison is
//!   a leaf, so the inserts form a tree with at most `n` leaves: at most `2n - 1` inserts for `n`
//!   rows, and at most `n` sets pending (asserted). The budget of one isolation is
//!   `max(inserts_max, 2n - 1)`: a budget below that would have to report rows that were never
//!   shown to be bad, and dead-letter good rows. Should the budget still run out (it cannot by the
//!   bound above), the isolation stops with a retryable error: the batch is kept and retried, and
//!   no row is reported as poison without its own failed insert.
//! - **Bounded per minute.** A [`Pace`] (a token bucket shared by every lane of a sink) holds
//!   the isolation inserts (every insert after a batch's first) to a rate. An isolation starts
//!   only while the bucket holds a token; once started it runs to its end (at most `2n - 1`
//!   inserts, charged to the bucket, which may go into debt), because stopping half-way would
//!   only make the retry send the same inserts again. A batch that finds the bucket empty fails
//!   as retryable: the lane backs off and retries it as the same batch, and no row is reported.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::classify::{ErrorClass, InsertError};

/// Default floor of the inserts one isolation may issue: enough to isolate every row of a
/// 8,192-row batch. Larger batches get `2n - 1` (see the module docs).
pub const ISOLATE_INSERTS_MAX_DEFAULT: u32 = 16_384;

/// Default rate of isolation inserts per sink, per minute (100 per second). A small insert takes
/// ClickHouse a few milliseconds and creates a part per partition it touches, so one lane
/// isolating at full speed issues a few hundred a second; this keeps a storm of poison batches
/// in all lanes together below one lane's pace, while the 151 inserts of a batch spread over
/// 150 months, or a bisection of a few bad rows, still pass at once.
pub const ISOLATE_INSERTS_PER_MINUTE_DEFAULT: u32 = 6_000;

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
    /// Groups made by splitting failed sets by partition (each inserted at least once).
    pub partition_groups: u32,
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

/// Token for group `k` (from 0) of a set split by partition, derived from the set's token.
pub fn partition_token(token: &str, k: usize) -> String {
    format!("{token}/part{k}")
}

/// The most inserts an isolation of `n` rows can issue: every set it tries is a node of a tree
/// whose inner nodes have at least two children and which has at most `n` leaves, so at most
/// `2n - 1` nodes.
pub fn inserts_needed_max(n: usize) -> u32 {
    u32::try_from(n.saturating_mul(2).saturating_sub(1)).unwrap_or(u32::MAX)
}

/// The rows of a batch one insert carries: the positions `range` of `members` (batch indices in
/// batch order), or of the whole batch when there are no members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Batch indices of the enclosing partition group; `None` for the whole batch.
    members: Option<Arc<[usize]>>,
    /// Positions within `members` (or the batch).
    range: Range<usize>,
}

impl Selection {
    /// The whole batch's rows `range`.
    pub fn rows(range: Range<usize>) -> Selection {
        Selection {
            members: None,
            range,
        }
    }

    /// How many rows the insert carries.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// True when the insert carries no row (never the case for a selection the isolation makes).
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The batch indices of the rows, in batch order.
    pub fn indices(&self) -> impl Iterator<Item = usize> + Send + '_ {
        self.range
            .clone()
            .map(|p| self.members.as_ref().map_or(p, |m| m[p]))
    }
}

/// A token bucket of isolation inserts, shared by the lanes of one sink (see the module docs).
#[derive(Debug)]
pub struct Pace {
    /// Tokens earned per minute, and the bucket's capacity.
    per_minute: u32,
    state: Mutex<PaceState>,
}

#[derive(Debug)]
struct PaceState {
    /// Tokens in the bucket; negative while isolations that started have overspent it.
    available: i64,
    /// The instant up to which tokens have been credited.
    refilled_at: Instant,
}

/// Microseconds in a minute, the period of [`Pace`]'s rate.
const MINUTE_US: u128 = 60_000_000;

impl Pace {
    /// A full bucket of `per_minute` tokens (positive, checked by the sink's options).
    pub fn new(per_minute: u32, now: Instant) -> Pace {
        Pace {
            per_minute,
            state: Mutex::new(PaceState {
                available: i64::from(per_minute),
                refilled_at: now,
            }),
        }
    }

    /// True when an isolation may start at `now`: the bucket holds at least one token.
    pub fn admit_at(&self, now: Instant) -> bool {
        let mut state = self.lock();
        self.refill(&mut state, now);
        state.available > 0
    }

    /// Takes `n` tokens for inserts about to be sent; the bucket may go into debt.
    pub fn charge(&self, n: u32) {
        let mut state = self.lock();
        state.available = state.available.saturating_sub(i64::from(n));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        // The state is two plain numbers, consistent after any panic that poisoned the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refill(&self, state: &mut PaceState, now: Instant) {
        let capacity = i64::from(self.per_minute);
        let per_minute = u128::from(self.per_minute.max(1));
        let elapsed_us = now.saturating_duration_since(state.refilled_at).as_micros();
        let earned = elapsed_us.saturating_mul(per_minute) / MINUTE_US;
        if earned == 0 {
            return;
        }
        // Credit only the time the whole tokens took, so fractions carry over to the next call.
        let spent_us = earned.saturating_mul(MINUTE_US) / per_minute;
        state.refilled_at += Duration::from_micros(u64::try_from(spent_us).unwrap_or(u64::MAX));
        let earned = i64::try_from(earned).unwrap_or(i64::MAX);
        state.available = state.available.saturating_add(earned).min(capacity);
        if state.available == capacity {
            // A full bucket banks no time: the burst stays at one minute's worth.
            state.refilled_at = now;
        }
    }
}

/// Inserts rows `0..len` through `attempt`, cutting failed sets by partition or in halves as
/// described in the module docs.
///
/// `attempt(selection, token)` inserts exactly the selected rows, in batch order, with the given
/// deduplication token and classifies any failure. The whole batch uses `token` itself. The
/// budget is `inserts_max` raised to [`inserts_needed_max`] of `len`; `partition_of(i)` is the
/// partition key of row `i`; `pace` admits the isolation once the whole batch has failed.
pub async fn isolate<K, P, F, Fut>(
    len: usize,
    token: Option<&str>,
    inserts_max: u32,
    pace: &Pace,
    partition_of: P,
    mut attempt: F,
) -> Result<IsolateOutcome, InsertError>
where
    K: Eq + Hash,
    P: Fn(usize) -> K,
    F: FnMut(Selection, Option<String>) -> Fut,
    Fut: Future<Output = Result<(), InsertError>>,
{
    let mut outcome = IsolateOutcome::default();
    if len == 0 {
        return Ok(outcome);
    }
    let inserts_max = inserts_max.max(inserts_needed_max(len));

    let mut stack = vec![Pending {
        selection: Selection::rows(0..len),
        token: token.map(str::to_owned),
        scope: token.map(str::to_owned),
    }];

    while let Some(pending) = stack.pop() {
        assert!(
            stack.len() < len,
            "pending sets are disjoint and non-empty, so fewer than the rows"
        );
        if outcome.inserts >= inserts_max {
            // Unreachable by the 2n - 1 bound; if it ever happens, keep the batch for a retry
            // rather than report rows that no insert showed to be bad.
            return Err(InsertError::retryable(format!(
                "isolation of {len} rows ran out of its budget of {inserts_max} inserts; the batch is kept and retried"
            )));
        }
        if outcome.inserts == 1 {
            // The whole batch failed as poison: an isolation starts, if the pace allows one.
            if !pace.admit_at(Instant::now()) {
                return Err(InsertError::retryable(format!(
                    "isolation of {len} rows waits: the sink's budget of {} isolation inserts per minute is spent; the batch is kept and retried",
                    pace.per_minute
                )));
            }
        }
        if outcome.inserts >= 1 {
            pace.charge(1);
        }

        outcome.inserts += 1;
        let Pending {
            selection,
            token: set_token,
            scope,
        } = pending;
        let error = match attempt(selection.clone(), set_token.clone()).await {
            Ok(()) => {
                outcome.rows_inserted += selection.len();
                continue;
            }
            Err(error) if error.class != ErrorClass::Poison => return Err(error),
            Err(error) => error,
        };
        if let (1, Some(index)) = (selection.len(), selection.indices().next()) {
            outcome.poison.push(PoisonRow { index, error });
            continue;
        }
        let groups = if error.is_too_many_partitions() {
            group_by_partition(&selection, &partition_of)
        } else {
            Vec::new()
        };
        if groups.len() > 1 {
            outcome.partition_groups += u32::try_from(groups.len()).unwrap_or(u32::MAX);
            // Pushed last first, so the groups are inserted in order of first appearance.
            for (k, group) in groups.into_iter().enumerate().rev() {
                let group_token = set_token.as_deref().map(|t| partition_token(t, k));
                let group_len = group.len();
                stack.push(Pending {
                    selection: Selection {
                        members: Some(Arc::from(group)),
                        range: 0..group_len,
                    },
                    token: group_token.clone(),
                    scope: group_token,
                });
            }
            continue;
        }
        let range = selection.range.clone();
        let mid = range.start + range.len() / 2;
        // Right pushed first so the left half is inserted first.
        for half in [mid..range.end, range.start..mid] {
            stack.push(Pending {
                token: scope.as_deref().map(|t| sub_batch_token(t, &half)),
                selection: Selection {
                    members: selection.members.clone(),
                    range: half,
                },
                scope: scope.clone(),
            });
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

/// The batch indices of `selection` grouped by partition key, groups in order of first
/// appearance and indices in batch order within each.
fn group_by_partition<K: Eq + Hash>(
    selection: &Selection,
    partition_of: impl Fn(usize) -> K,
) -> Vec<Vec<usize>> {
    let mut position: HashMap<K, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for index in selection.indices() {
        let next = groups.len();
        let k = *position.entry(partition_of(index)).or_insert(next);
        if k == next {
            groups.push(Vec::new());
        }
        groups[k].push(index);
    }
    groups
}

/// A set of rows still to insert, with its token and the token its halves are named under.
struct Pending {
    selection: Selection,
    token: Option<String>,
    /// Token of the enclosing partition group (the batch token outside any group).
    scope: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::classify::BodyFormat;
    use proptest::prelude::*;
    use std::cell::RefCell;

    /// A fake table that rejects any insert containing a row from `bad`, and records each call.
    struct FakeTable {
        bad: std::collections::BTreeSet<usize>,
        calls: RefCell<Vec<(Vec<usize>, Option<String>)>>,
        stored: RefCell<Vec<usize>>,
        /// Fail with this (non-poison) error on the call with this number, counting from 1.
        fail_on_call: Option<(usize, InsertError)>,
        /// Reject inserts spanning more partitions than this; row `i` is in partition `i % months`.
        partitions_max: Option<usize>,
        months: usize,
        /// Check the partitions before the rows' content (servers check content first).
        partitions_first: bool,
    }

    impl FakeTable {
        fn new(bad: &[usize]) -> Self {
            FakeTable {
                bad: bad.iter().copied().collect(),
                calls: RefCell::new(Vec::new()),
                stored: RefCell::new(Vec::new()),
                fail_on_call: None,
                partitions_max: None,
                months: 1,
                partitions_first: false,
            }
        }

        fn insert(&self, rows: Vec<usize>, token: Option<String>) -> Result<(), InsertError> {
            self.calls.borrow_mut().push((rows.clone(), token));
            if let Some((n, error)) = &self.fail_on_call {
                if self.calls.borrow().len() == *n {
                    return Err(error.clone());
                }
            }
            let content = || match rows.iter().find(|i| self.bad.contains(i)) {
                Some(bad) => Err(InsertError {
                    class: ErrorClass::Poison,
                    message: format!("row {bad} is bad"),
                    code: Some(27),
                }),
                None => Ok(()),
            };
            let partitions = || {
                let spanned: std::collections::BTreeSet<usize> =
                    rows.iter().map(|i| i % self.months).collect();
                match self.partitions_max {
                    Some(limit) if spanned.len() > limit => Err(InsertError::classified(
                        Some(252),
                        format!("Too many partitions for single INSERT block (more than {limit})"),
                        BodyFormat::RowBinary,
                    )),
                    _ => Ok(()),
                }
            };
            if self.partitions_first {
                partitions().and_then(|()| content())?;
            } else {
                content().and_then(|()| partitions())?;
            }
            self.stored.borrow_mut().extend(rows);
            Ok(())
        }
    }

    fn run(
        table: &FakeTable,
        len: usize,
        token: Option<&str>,
        max: u32,
    ) -> Result<IsolateOutcome, InsertError> {
        let pace = Pace::new(u32::MAX, Instant::now());
        run_paced(table, len, token, max, &pace)
    }

    fn run_paced(
        table: &FakeTable,
        len: usize,
        token: Option<&str>,
        max: u32,
        pace: &Pace,
    ) -> Result<IsolateOutcome, InsertError> {
        let months = table.months;
        let fut = isolate(
            len,
            token,
            max,
            pace,
            |i| i % months,
            |selection, token| {
                let result = table.insert(selection.indices().collect(), token);
                async move { result }
            },
        );
        block_on(fut)
    }

    fn block_on<T>(fut: impl Future<Output = T>) -> T {
        // The fake completes synchronously, so polling with a no-op waker drives it to the end.
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(result) = fut.as_mut().poll(&mut cx) {
                return result;
            }
        }
    }

    /// Smallest `d` with `2^d >= n`: the deepest level halving can reach from `n` rows.
    fn depth_bound(n: usize) -> u32 {
        n.max(1).next_power_of_two().trailing_zeros()
    }

    /// A table that takes at most 100 partitions per insert, with row `i` in month `i % months`.
    fn partitioned(bad: &[usize], months: usize) -> FakeTable {
        let mut table = FakeTable::new(bad);
        table.partitions_max = Some(100);
        table.months = months;
        table
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
        assert_eq!(
            *table.calls.borrow(),
            vec![((0..10).collect(), Some("t".to_owned()))]
        );
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

    #[test]
    fn too_many_partitions_splits_the_batch_into_one_insert_per_partition_in_order() {
        let table = partitioned(&[], 150);
        let outcome = run(&table, 600, Some("t"), 100).expect("no error");
        assert!(outcome.poison.is_empty());
        assert_eq!(outcome.rows_inserted, 600);
        assert_eq!(outcome.inserts, 151);
        assert_eq!(outcome.partition_groups, 150);
        let calls = table.calls.borrow();
        assert_eq!(calls[0].1.as_deref(), Some("t"));
        for (k, (rows, token)) in calls[1..].iter().enumerate() {
            assert_eq!(
                *rows,
                vec![k, k + 150, k + 300, k + 450],
                "group {k} in batch order"
            );
            assert_eq!(token.as_deref(), Some(format!("t/part{k}").as_str()));
        }
    }

    #[test]
    fn a_poison_row_in_a_partition_group_is_bisected_within_its_group() {
        // Rows 0..300 over 150 months: group `k` holds rows `k` and `k + 150`.
        let mut table = partitioned(&[157], 150);
        table.partitions_first = true;
        let outcome = run(&table, 300, Some("t"), 100).expect("no error");
        assert_eq!(poison_indices(&outcome), vec![157]);
        assert_eq!(outcome.rows_inserted, 299);
        assert_eq!(outcome.partition_groups, 150);
        assert_eq!(
            outcome.inserts,
            1 + 150 + 2,
            "the group of the bad row is halved once"
        );
        let calls = table.calls.borrow();
        let call = |token: &str| {
            calls
                .iter()
                .find(|(_, t)| t.as_deref() == Some(token))
                .map(|(rows, _)| rows.clone())
        };
        assert_eq!(call("t/part7"), Some(vec![7, 157]));
        assert_eq!(call("t/part7/0-1"), Some(vec![7]));
        assert_eq!(
            call("t/part7/1-2"),
            Some(vec![157]),
            "positions map to batch indices"
        );
    }

    #[test]
    fn a_poison_row_reported_before_the_partitions_is_isolated_by_halves_then_partitions() {
        // Content is checked first, as servers do: the halves span 150 months and are split.
        let table = partitioned(&[157], 150);
        let outcome = run(&table, 300, Some("t"), 100).expect("no error");
        assert_eq!(poison_indices(&outcome), vec![157]);
        assert_eq!(outcome.rows_inserted, 299);
        let calls = table.calls.borrow();
        let tokens: Vec<&str> = calls.iter().filter_map(|(_, t)| t.as_deref()).collect();
        assert!(tokens.contains(&"t/0-150"), "{tokens:?}");
        assert!(tokens.contains(&"t/150-225"), "{tokens:?}");
    }

    #[test]
    fn a_group_that_still_spans_too_many_partitions_is_bisected() {
        // The key says one partition, the table has 150: bisection still stores every row.
        let table = partitioned(&[], 150);
        let outcome = {
            let pace = Pace::new(u32::MAX, Instant::now());
            let fut = isolate(
                600,
                Some("t"),
                100,
                &pace,
                |_| (),
                |selection, token| {
                    let result = table.insert(selection.indices().collect(), token);
                    async move { result }
                },
            );
            block_on(fut)
        }
        .expect("no error");
        assert_eq!(outcome.rows_inserted, 600);
        assert_eq!(outcome.partition_groups, 0);
        assert!(outcome.inserts > 1 && outcome.inserts < 2 * 600);
    }

    #[test]
    fn a_repeated_partition_split_issues_the_same_inserts_in_the_same_order() {
        let first = partitioned(&[3, 200, 201], 130);
        let second = partitioned(&[3, 200, 201], 130);
        run(&first, 520, Some("x"), 1_000).expect("no error");
        run(&second, 520, Some("x"), 1_000).expect("no error");
        assert_eq!(*first.calls.borrow(), *second.calls.borrow());
    }

    #[test]
    fn an_isolation_waits_while_the_pace_is_spent_and_reports_no_row() {
        let table = FakeTable::new(&[2]);
        let pace = Pace::new(1, Instant::now());
        pace.charge(1);
        let error = run_paced(&table, 8, Some("t"), 100, &pace).expect_err("paced");
        assert_eq!(error.class, ErrorClass::Retryable, "{error}");
        assert_eq!(
            table.calls.borrow().len(),
            1,
            "only the whole batch was tried"
        );
        assert!(table.stored.borrow().is_empty());
    }

    #[test]
    fn an_isolation_that_started_runs_to_its_end_and_leaves_the_pace_in_debt() {
        let table = FakeTable::new(&[2, 5]);
        let pace = Pace::new(2, Instant::now());
        let outcome = run_paced(&table, 8, Some("t"), 100, &pace).expect("admitted");
        assert_eq!(poison_indices(&outcome), vec![2, 5]);
        assert!(outcome.inserts > 3);
        // The next isolation waits for the debt to be repaid.
        let next = FakeTable::new(&[0]);
        assert!(run_paced(&next, 4, Some("u"), 100, &pace).is_err());
    }

    #[test]
    fn the_pace_refills_at_its_rate_up_to_one_minute_of_tokens() {
        let start = Instant::now();
        let pace = Pace::new(60, start);
        pace.charge(61);
        assert!(!pace.admit_at(start));
        assert!(
            !pace.admit_at(start + Duration::from_millis(1_999)),
            "one token repays the debt"
        );
        assert!(pace.admit_at(start + Duration::from_secs(2)));
        // An hour idle fills the bucket to its capacity only.
        let later = start + Duration::from_secs(3_600);
        assert!(pace.admit_at(later));
        pace.charge(60);
        assert!(!pace.admit_at(later));
    }

    proptest! {
        #[test]
        fn any_bad_rows_over_any_months_are_reported_exactly_and_the_rest_is_stored(
            len in 1usize..400,
            months in 1usize..200,
            partitions_first in any::<bool>(),
            bad_seed in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut bad: Vec<usize> = bad_seed.iter().map(|b| b % len).collect();
            bad.sort_unstable();
            bad.dedup();
            let mut table = partitioned(&bad, months);
            table.partitions_first = partitions_first;
            let outcome = run(&table, len, Some("t"), 1).expect("no error");
            prop_assert_eq!(poison_indices(&outcome), bad.clone());
            let mut stored = table.stored.borrow().clone();
            stored.sort_unstable();
            let good: Vec<usize> = (0..len).filter(|i| !bad.contains(i)).collect();
            prop_assert_eq!(stored, good);
            prop_assert!((outcome.inserts as usize) < 2 * len, "at most 2n - 1 inserts");
        }

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
