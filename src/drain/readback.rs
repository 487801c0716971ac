//! The read-back of a batch whose insert was sent before under the same token.
//!
//! A modern server writes an insert's deduplication token to its log before it commits the
//! insert's part. Killed in between, it comes back knowing the token but not the rows, and
//! answers the retry (same token) as a duplicate while storing nothing: only a read shows the
//! loss. So after such an insert succeeds, the lane (and `replay`) asks ClickHouse which of the
//! batch's message identities it holds ([`missing_rows`]) and inserts the missing rows again
//! under a token no insert has carried before ([`again_token`]). Once such an insert succeeds at
//! its first attempt, its rows are stored: nothing can be taken for a duplicate of it. If it
//! needed retries, the read is repeated.
//!
//! A row can also be missing by its message identity because the table collapsed it with
//! another row of the same natural key (ReplacingMergeTree): inserted again, it collapses again,
//! harmless. The legacy profile sends no token, so its retries are always stored and nothing is
//! read back.

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prism_wal::{Lsn, Reader, WalError};

use crate::sink::{DeadLetter, InsertError, IsolateOutcome, PoisonRow, Sink};

use super::batch::Rows;

/// A row whose message identity must be in ClickHouse: its index in the batch, the identity, and
/// its row time (typed rows) to narrow the read to the parts of that time.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub index: usize,
    pub stream: &'a str,
    pub seq: u64,
    pub time_ms: Option<i64>,
}

/// The token of round `round` (from 1) of inserting again what the server dropped from the batch
/// of `token`. It names this process too, so that it differs from every token an earlier run of
/// the relay sent for the same batch (one such insert may itself have been dropped).
pub fn again_token(token: &str, round: u32) -> String {
    static RUN: OnceLock<u64> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ u64::from(std::process::id()).rotate_left(48)
    });
    format!("{token}/again{round}.{run:x}")
}

/// The message identity (stream, sequence) of the records at `lsns` (ascending), read with
/// `reader` (positioned at or before the first of them).
pub fn row_identities(reader: &mut Reader, lsns: &[Lsn]) -> Result<Vec<(String, u64)>, WalError> {
    let mut identities = Vec::with_capacity(lsns.len());
    for &lsn in lsns {
        loop {
            let record = reader.next()?.ok_or(WalError::Truncated {
                requested: lsn,
                first_available: lsn,
            })?;
            if record.lsn < lsn {
                continue;
            }
            if record.lsn > lsn {
                return Err(WalError::Truncated {
                    requested: lsn,
                    first_available: record.lsn,
                });
            }
            let envelope = record.envelope()?;
            identities.push((envelope.stream.into_owned(), envelope.stream_seq.0));
            break;
        }
    }
    Ok(identities)
}

/// The rows of a batch (by `identities`, row index order) that must be stored: all but those
/// ClickHouse rejected (`poison`, which become dead letters).
pub fn expected_rows<'a>(
    identities: &'a [(String, u64)],
    rows: &Rows,
    poison: &[PoisonRow],
) -> Vec<Expected<'a>> {
    let rejected: HashSet<usize> = poison.iter().map(|p| p.index).collect();
    identities
        .iter()
        .enumerate()
        .filter(|(index, _)| !rejected.contains(index))
        .map(|(index, (stream, seq))| Expected {
            index,
            stream,
            seq: *seq,
            time_ms: rows.timestamp_ms(index),
        })
        .collect()
}

/// The dead letters of a batch, as rows of the dead-letter table that must be stored.
pub fn expected_dead_letters(letters: &[DeadLetter]) -> Vec<Expected<'_>> {
    letters
        .iter()
        .enumerate()
        .map(|(index, letter)| Expected {
            index,
            stream: &letter.nats_stream,
            seq: letter.nats_seq,
            time_ms: None,
        })
        .collect()
}

/// The indices (ascending) of `expected` whose message identity `table` does not hold: one read
/// per stream, over the stream's sequence range and the rows' time range (the type of the
/// table's time column is asked once, if any row has a time).
pub async fn missing_rows(
    sink: &Sink,
    table: &str,
    expected: &[Expected<'_>],
) -> Result<Vec<usize>, InsertError> {
    let mut by_stream: BTreeMap<&str, Vec<&Expected<'_>>> = BTreeMap::new();
    for row in expected {
        by_stream.entry(row.stream).or_default().push(row);
    }
    let row_time = if expected.iter().any(|r| r.time_ms.is_some()) {
        sink.row_time_column(table).await?
    } else {
        None
    };
    let mut missing = Vec::new();
    for (stream, rows) in by_stream {
        let seq_min = rows.iter().map(|r| r.seq).min().unwrap_or(0);
        let seq_max = rows.iter().map(|r| r.seq).max().unwrap_or(0);
        let times: Option<Vec<i64>> = rows.iter().map(|r| r.time_ms).collect();
        let time = row_time
            .zip(times)
            .and_then(|(column, t)| Some((column, *t.iter().min()?, *t.iter().max()?)));
        let found = sink
            .stored_seqs(table, stream, seq_min..=seq_max, time)
            .await?;
        missing.extend(
            rows.iter()
                .filter(|r| !found.contains(&r.seq))
                .map(|r| r.index),
        );
    }
    missing.sort_unstable();
    Ok(missing)
}

/// The rounds of a read-back, as its caller runs them with its own retries:
///
/// ```text
/// let mut rounds = Rounds::new(table, token);
/// while rounds.go_on() {
///     let missing = /* missing_rows, retried */;
///     let Some(again) = rounds.insert_again(&missing) else { break };
///     /* insert the rows `missing` under `again`, retried */
///     rounds.inserted(failed_attempts);
/// }
/// ```
///
/// The read-back ends once a read finds nothing missing, or once an insert under a new token
/// succeeds at its first attempt: nothing can have taken that one for a duplicate.
#[derive(Debug)]
pub struct Rounds<'a> {
    table: &'a str,
    token: &'a str,
    /// The round under way (from 1), and its rows.
    round: u32,
    rows: usize,
    over: bool,
    /// Rows inserted again so far.
    inserted_again: u64,
}

impl<'a> Rounds<'a> {
    /// The read-back of the batch of `token` in `table`.
    pub fn new(table: &'a str, token: &'a str) -> Rounds<'a> {
        Rounds {
            table,
            token,
            round: 0,
            rows: 0,
            over: false,
            inserted_again: 0,
        }
    }

    /// Whether to read the table (again).
    pub fn go_on(&self) -> bool {
        !self.over
    }

    /// After a read that found the rows `missing`: the token to insert them again under, or none
    /// when nothing is missing (the read-back is over).
    pub fn insert_again(&mut self, missing: &[usize]) -> Option<String> {
        if missing.is_empty() {
            self.over = true;
            return None;
        }
        self.round += 1;
        self.rows = missing.len();
        self.inserted_again += missing.len() as u64;
        tracing::warn!(table = self.table, token = self.token, rows = self.rows, round = self.round,
            "ClickHouse answered a retried insert as a duplicate but holds none of these rows (its deduplication log outlived a crash during the first attempt): inserting them again under a new token");
        Some(again_token(self.token, self.round))
    }

    /// After the insert of the round succeeded, `failed_attempts` having failed before it.
    pub fn inserted(&mut self, failed_attempts: u32) {
        if failed_attempts == 0 {
            self.over = true;
            tracing::info!(
                table = self.table,
                token = self.token,
                rows = self.rows,
                round = self.round,
                "the rows the server had dropped are stored"
            );
        }
    }

    /// Rows inserted again so far.
    pub fn inserted_again(&self) -> u64 {
        self.inserted_again
    }
}

/// Adds the rows the insert of the subset `missing` rejected to `outcome`, by batch index.
pub fn add_rejected(outcome: &mut IsolateOutcome, missing: &[usize], subset: IsolateOutcome) {
    outcome
        .poison
        .extend(subset.poison.into_iter().map(|p| PoisonRow {
            index: missing[p.index],
            error: p.error,
        }));
    outcome.poison.sort_by_key(|p| p.index);
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use prism_wal::{Envelope, StreamSeq, Wal, WalOptions};

    use super::*;

    fn poison(index: usize) -> PoisonRow {
        PoisonRow {
            index,
            error: InsertError::retryable("rejected"),
        }
    }

    #[test]
    fn each_round_and_each_run_gets_a_token_of_its_own() {
        let (first, second) = (
            again_token("trades:1-9:9:ab", 1),
            again_token("trades:1-9:9:ab", 2),
        );
        assert!(first.starts_with("trades:1-9:9:ab/again1."), "{first}");
        assert!(second.starts_with("trades:1-9:9:ab/again2."), "{second}");
        // The run's part is the same within a process.
        assert_eq!(first.split('.').next_back(), second.split('.').next_back());
        assert_eq!(first, again_token("trades:1-9:9:ab", 1));
    }

    #[test]
    fn rounds_end_when_nothing_is_missing_or_an_insert_again_needed_no_retry() {
        let mut rounds = Rounds::new("trades", "t");
        assert!(rounds.go_on());
        let first = rounds.insert_again(&[0, 1, 2]).expect("rows missing");
        assert!(first.starts_with("t/again1."), "{first}");
        // The insert needed retries: it may have been dropped too, so read again.
        rounds.inserted(2);
        assert!(rounds.go_on());
        let second = rounds.insert_again(&[2]).expect("a row missing");
        assert!(second.starts_with("t/again2."), "{second}");
        rounds.inserted(0);
        assert!(!rounds.go_on());
        assert_eq!(rounds.inserted_again(), 4);

        let mut stored = Rounds::new("trades", "t");
        assert_eq!(stored.insert_again(&[]), None);
        assert!(!stored.go_on());
        assert_eq!(stored.inserted_again(), 0);
    }

    #[test]
    fn rejected_rows_are_not_expected_and_a_subsets_rejections_map_back_to_the_batch() {
        let identities: Vec<(String, u64)> = (0..4).map(|i| ("S".to_string(), 10 + i)).collect();
        let expected = expected_rows(&identities, &Rows::None, &[poison(1)]);
        let seqs: Vec<(usize, u64)> = expected.iter().map(|e| (e.index, e.seq)).collect();
        assert_eq!(seqs, [(0, 10), (2, 12), (3, 13)]);
        assert!(expected.iter().all(|e| e.time_ms.is_none()));

        let mut outcome = IsolateOutcome {
            rows_inserted: 3,
            poison: vec![poison(1)],
            ..IsolateOutcome::default()
        };
        let subset = IsolateOutcome {
            rows_inserted: 1,
            poison: vec![poison(0)],
            ..IsolateOutcome::default()
        };
        add_rejected(&mut outcome, &[3, 0], subset);
        let indices: Vec<usize> = outcome.poison.iter().map(|p| p.index).collect();
        assert_eq!(indices, [1, 3]);
    }

    #[tokio::test]
    async fn identities_are_read_for_the_records_asked_for_among_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open WAL");
        let records: Vec<Envelope<'static>> = (0..6u64)
            .map(|i| Envelope {
                stream: Cow::Owned(if i % 2 == 0 { "A" } else { "B" }.to_string()),
                stream_seq: StreamSeq(100 + i),
                subject: Cow::Borrowed("trade.binance.spot.BTC-USDT"),
                headers: Vec::new(),
                published_ns: 0,
                payload: Cow::Borrowed(b"{}"),
            })
            .collect();
        let range = wal.append(&records).await.expect("append");
        let lsns = [
            Lsn(range.first.0 + 1),
            Lsn(range.first.0 + 2),
            Lsn(range.first.0 + 5),
        ];
        let mut reader = wal.reader(lsns[0]).expect("reader");
        let identities = row_identities(&mut reader, &lsns).expect("identities");
        assert_eq!(
            identities,
            [
                ("B".to_string(), 101),
                ("A".to_string(), 102),
                ("B".to_string(), 105)
            ]
        );
        // A record past the WAL's end is an error, not a wrong identity.
        let mut reader = wal.reader(lsns[0]).expect("reader");
        let beyond = [Lsn(range.first.0 + 1), Lsn(range.first.0 + 9)];
        assert!(row_identities(&mut reader, &beyond).is_err());
    }
}
