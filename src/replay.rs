//! `prism-relay replay`: re-insert a WAL range into ClickHouse, to backfill a database that lost
//! data or to fill a new cluster (or MarketPrism's cold database).
//!
//! It reads the WAL directory read-only through `prism_wal`'s offline tools (no lock, so the
//! relay may keep running on it) and uses the drain's batches and the sink's isolating inserts,
//! but not the ledger: a replay moves no cursor and frees no segment, so it changes neither the
//! relay's progress nor its retention.
//!
//! The range is a WAL range ([`ReplayOptions::from`], [`ReplayOptions::to`]; by default everything
//! on disk, starting at the oldest segment retention has kept) narrowed by the records' publish
//! time and by table. Publish times are not ordered by LSN (several consumers append to one
//! WAL), so the time bounds filter records rather than end the scan.
//!
//! Idempotence: every row carries its identity, so a second replay collapses under FINAL; and
//! batches are cut at fixed LSN windows ([`REPLAY_WINDOW_LSNS`]) with tokens derived only from
//! their content (`replay:` and the drain's batch token), so a second replay of the same range
//! sends the very same batches with the very same tokens, and a modern server's insert
//! deduplication drops them. The `replay:` namespace keeps those tokens apart from the drain's,
//! whose batches of the same records are cut at other boundaries.
//!
//! Corruption stops a replay with the segment and offset named, unless
//! [`ReplayOptions::skip_corrupt`] asks to go on; then every skipped LSN range is in
//! [`ReplaySummary::skipped`] with its reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use prism_wal::{Lsn, SegmentId, WalError};

use crate::drain::readback;
use crate::drain::{dead_letter, Batch, BatchLimits, Router, RowsKind};
use crate::sink::{Backoff, DeadLetter, InsertError, IsolateOutcome, Sink};

/// Attempts per batch before a replay gives up (a replay is operator-driven; it must not hang).
const REPLAY_ATTEMPTS_MAX: u32 = 10;

/// Width of the LSN windows batches are cut at, in records. Aligning batch boundaries to fixed
/// windows (rather than to where a replay happened to start) makes two replays of overlapping
/// ranges cut the same batches, hence send the same deduplication tokens. Large enough that a
/// table with a small share of the traffic still gets batches of thousands of rows.
pub const REPLAY_WINDOW_LSNS: u64 = 262_144;

/// Rows per replay insert at most: the drain's default for the busiest tables, large enough
/// that inserts stay few (ClickHouse prefers large parts) and small enough to bound memory.
pub const REPLAY_BATCH_ROWS_MAX: usize = 10_000;

/// Payload bytes per replay batch at most: bounds memory per table whatever the row size
/// (the drain's default byte limit is of the same order).
pub const REPLAY_BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Records between two progress reports (besides one after each insert), so a range that is
/// mostly filtered out still shows it is moving.
const PROGRESS_EVERY_RECORDS: u64 = 8_192;

/// Attempts to open the oldest segment when the range starts at the oldest on disk: a relay
/// running on the directory may delete it between listing and opening (each attempt lists
/// again, so this bounds only a pathological race).
const OPEN_OLDEST_ATTEMPTS_MAX: u32 = 8;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// WAL directory.
    pub dir: PathBuf,
    /// First LSN to replay; `None` for the oldest on disk.
    pub from: Option<Lsn>,
    /// Last LSN to replay, inclusive; `None` for the newest on disk when the replay starts.
    pub to: Option<Lsn>,
    /// Only records published at or after this time (unix milliseconds).
    pub from_time_ms: Option<i64>,
    /// Only records published at or before this time (unix milliseconds).
    pub to_time_ms: Option<i64>,
    /// Only these lanes (tables); empty for all. Check them with [`check_tables`].
    pub tables: Vec<String>,
    /// Rows per insert.
    pub rows_max: usize,
    /// Dead-letter table.
    pub dead_letter_table: String,
    /// First retry delay.
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
    /// Go on past a corrupt segment (or an undecodable record), reporting what was skipped.
    pub skip_corrupt: bool,
    /// Plausible row times (`[drain] timestamp_*`), the same as the drain's so a replay decides
    /// every row as the drain did.
    pub time_window: crate::codec::TimeWindow,
}

/// The LSN range a replay covers, resolved against the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayRange {
    /// First LSN read.
    pub first: Lsn,
    /// Last LSN read (inclusive); `None` when the directory holds no record.
    pub last: Option<Lsn>,
}

impl ReplayRange {
    /// Records in the range (an upper bound of what a replay reads).
    pub fn len(&self) -> u64 {
        self.last
            .map_or(0, |last| (last.0 + 1).saturating_sub(self.first.0))
    }

    /// Whether the range holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a replay has got to, reported to its progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayProgress {
    /// Last LSN read.
    pub lsn: Lsn,
    /// Records read so far.
    pub records: u64,
    /// Rows inserted so far (all tables), dead letters included.
    pub rows: u64,
}

/// WAL records a replay could not read and went past (only with [`ReplayOptions::skip_corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The segment holding the damage.
    pub segment: Option<SegmentId>,
    /// Byte offset of the damage in the segment, when known.
    pub offset: Option<u64>,
    /// First LSN not replayed.
    pub first: Lsn,
    /// Last LSN not replayed (inclusive); `None` when the damage ran to the end of the WAL.
    pub last: Option<Lsn>,
    /// What was wrong.
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.last {
            Some(last) => write!(f, "lsn {}..={}", self.first, last)?,
            None => write!(f, "lsn {} to the end", self.first)?,
        }
        if let Some(segment) = self.segment {
            write!(f, " (segment {segment}")?;
            if let Some(offset) = self.offset {
                write!(f, " at offset {offset}")?;
            }
            write!(f, ")")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What a replay inserted into one table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableSummary {
    /// Records of the range routed to this table (after the time filter).
    pub records: u64,
    /// Rows inserted.
    pub rows: u64,
    /// Records of this table that became dead letters.
    pub dead_letters: u64,
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records read from the WAL in the LSN range.
    pub records: u64,
    /// Per table (lane).
    pub tables: BTreeMap<String, TableSummary>,
    /// Dead letters written.
    pub dead_letters: u64,
    /// First LSN read.
    pub first: Option<Lsn>,
    /// Last LSN read.
    pub last: Option<Lsn>,
    /// What was skipped (only with [`ReplayOptions::skip_corrupt`]).
    pub skipped: Vec<Skipped>,
}

impl ReplaySummary {
    /// Rows inserted into all tables.
    pub fn rows(&self) -> u64 {
        self.tables.values().map(|t| t.rows).sum()
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the WAL failed (corruption is reported, not skipped).
    #[error("reading the WAL")]
    Wal(#[from] WalError),
    /// The range starts before the oldest record retention kept.
    #[error(
        "lsn {requested} is gone: the oldest record kept is {first_available}; \
         start at or after it, or leave out --from-lsn to replay everything on disk"
    )]
    RangeGone {
        /// The first LSN asked for.
        requested: Lsn,
        /// The oldest LSN on disk.
        first_available: Lsn,
    },
    /// The range is empty by construction.
    #[error("empty range: --from-lsn {from} is after --to-lsn {to}")]
    EmptyRange {
        /// First LSN.
        from: Lsn,
        /// Last LSN.
        to: Lsn,
    },
    /// The time range is empty by construction.
    #[error("empty time range: --from-time ({from_ms} ms) is after --to-time ({to_ms} ms)")]
    EmptyTimeRange {
        /// Lower bound, unix milliseconds.
        from_ms: i64,
        /// Upper bound, unix milliseconds.
        to_ms: i64,
    },
    /// A `--table` the relay does not write.
    #[error("unknown table {table:?}; the tables are: {valid}")]
    UnknownTable {
        /// The name given.
        table: String,
        /// The valid names, comma-separated.
        valid: String,
    },
    /// ClickHouse kept failing.
    #[error("insert into {table} failed {attempts} times")]
    Insert {
        /// Table.
        table: String,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        #[source]
        source: InsertError,
    },
}

/// Checks `tables` against the lanes `router` produces; the error lists the valid names.
pub fn check_tables(router: &Router, tables: &[String]) -> Result<(), ReplayError> {
    let lanes = router.lanes();
    match tables.iter().find(|t| !lanes.contains(t)) {
        None => Ok(()),
        Some(table) => Err(ReplayError::UnknownTable {
            table: table.clone(),
            valid: lanes.join(", "),
        }),
    }
}

/// Resolves the LSN range of `options` against the directory as it is now.
pub fn resolve_range(options: &ReplayOptions) -> Result<ReplayRange, ReplayError> {
    if let (Some(from), Some(to)) = (options.from, options.to) {
        if from > to {
            return Err(ReplayError::EmptyRange { from, to });
        }
    }
    if let (Some(from_ms), Some(to_ms)) = (options.from_time_ms, options.to_time_ms) {
        if from_ms > to_ms {
            return Err(ReplayError::EmptyTimeRange { from_ms, to_ms });
        }
    }
    let segments = prism_wal::list_segments(&options.dir)?;
    let oldest = segments.first().map(|s| s.first_lsn);
    let newest = segments
        .iter()
        .rev()
        .find_map(|s| s.last_lsn)
        .filter(|last| oldest.is_some_and(|first| *last >= first));
    let first = match (options.from, oldest) {
        (Some(from), Some(oldest)) if from < oldest => {
            return Err(ReplayError::RangeGone {
                requested: from,
                first_available: oldest,
            })
        }
        (Some(from), _) => from,
        (None, Some(oldest)) => oldest,
        (None, None) => Lsn(1),
    };
    let last = match (options.to, newest) {
        (Some(to), Some(newest)) => Some(to.min(newest)),
        (_, newest) => newest,
    };
    Ok(ReplayRange {
        first,
        last: last.filter(|l| *l >= first),
    })
}

/// Opens a reader at the first LSN of the range. When the range starts at the oldest on disk,
/// a segment deleted by a running relay's retention meanwhile moves the start to the new oldest.
fn open_reader(
    options: &ReplayOptions,
    range: &mut ReplayRange,
) -> Result<prism_wal::Reader, ReplayError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match prism_wal::read_dir(&options.dir, range.first) {
            Ok(reader) => return Ok(reader),
            Err(WalError::Truncated {
                requested,
                first_available,
            }) => {
                if options.from.is_some() {
                    return Err(ReplayError::RangeGone {
                        requested,
                        first_available,
                    });
                }
                if attempts >= OPEN_OLDEST_ATTEMPTS_MAX {
                    return Err(WalError::Truncated {
                        requested,
                        first_available,
                    }
                    .into());
                }
                *range = resolve_range(options)?;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Replays the range, calling `progress` after each insert and every few thousand records.
pub async fn replay(
    options: &ReplayOptions,
    router: &Router,
    sink: &Sink,
    mut progress: impl FnMut(ReplayProgress),
) -> Result<ReplaySummary, ReplayError> {
    let mut range = resolve_range(options)?;
    let mut summary = ReplaySummary::default();
    let Some(mut last) = range.last else {
        return Ok(summary);
    };
    let mut reader = open_reader(options, &mut range)?;
    last = range.last.unwrap_or(last);
    let limits = BatchLimits {
        rows_max: options.rows_max,
        bytes_max: REPLAY_BATCH_BYTES_MAX,
        age_max: Duration::MAX,
    };
    let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
    // The next LSN the reader should hand out, to name what a skip leaves out.
    let mut expected = range.first;
    let mut rows_total = 0u64;
    loop {
        let record = match reader.next() {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(error) => {
                let Some(resume) = skip_past(options, &error, expected, &mut summary)? else {
                    return Err(error.into());
                };
                if resume.is_some_and(|r| r > last) || resume.is_none() {
                    break;
                }
                expected = resume.unwrap_or(expected);
                reader = prism_wal::read_dir(&options.dir, expected)?;
                continue;
            }
        };
        let lsn = record.lsn;
        if lsn > last {
            break;
        }
        expected = Lsn(lsn.0 + 1);
        let envelope = match record.envelope() {
            Ok(envelope) => envelope,
            Err(error) => {
                if skip_past(options, &error, lsn, &mut summary)?.is_none() {
                    return Err(error.into());
                }
                continue;
            }
        };
        summary.records += 1;
        summary.first.get_or_insert(lsn);
        summary.last = Some(lsn);
        let in_time = options
            .from_time_ms
            .is_none_or(|from| envelope.published_ns >= from.saturating_mul(1_000_000))
            && options
                .to_time_ms
                .is_none_or(|to| envelope.published_ns <= to.saturating_mul(1_000_000));
        let lane = router.route_envelope(&envelope).lane().to_string();
        let wanted = in_time && (options.tables.is_empty() || options.tables.contains(&lane));
        let mut full = None;
        if wanted {
            summary.tables.entry(lane.clone()).or_default().records += 1;
            let batch = batches.entry(lane.clone()).or_insert_with(|| {
                Batch::new(&lane, RowsKind::for_lane(&lane), options.time_window)
            });
            // A batch never spans two windows, so its boundaries do not depend on where the
            // replay started.
            if batch
                .first()
                .is_some_and(|first| first.0 / REPLAY_WINDOW_LSNS != lsn.0 / REPLAY_WINDOW_LSNS)
            {
                full = Some(std::mem::replace(
                    batch,
                    Batch::new(&lane, RowsKind::for_lane(&lane), options.time_window),
                ));
            }
            batch.push(lsn, &envelope, now_ms());
        }
        drop(envelope);
        if let Some(full) = full {
            rows_total += flush(options, sink, &lane, full, &mut summary).await?;
            progress(ReplayProgress {
                lsn,
                records: summary.records,
                rows: rows_total,
            });
        }
        if let Some(batch) = batches.get_mut(&lane).filter(|b| b.is_full(&limits)) {
            let full = std::mem::replace(
                batch,
                Batch::new(&lane, RowsKind::for_lane(&lane), options.time_window),
            );
            rows_total += flush(options, sink, &lane, full, &mut summary).await?;
            progress(ReplayProgress {
                lsn,
                records: summary.records,
                rows: rows_total,
            });
        } else if summary.records % PROGRESS_EVERY_RECORDS == 0 {
            progress(ReplayProgress {
                lsn,
                records: summary.records,
                rows: rows_total,
            });
        }
    }
    for (lane, batch) in batches {
        if !batch.is_empty() {
            rows_total += flush(options, sink, &lane, batch, &mut summary).await?;
        }
    }
    if let Some(lsn) = summary.last {
        progress(ReplayProgress {
            lsn,
            records: summary.records,
            rows: rows_total,
        });
    }
    Ok(summary)
}

/// With `skip_corrupt`, records what `error` makes the replay skip and returns where to resume
/// (`Some(None)`: nothing left to read); `None` when the error must stop the replay.
fn skip_past(
    options: &ReplayOptions,
    error: &WalError,
    expected: Lsn,
    summary: &mut ReplaySummary,
) -> Result<Option<Option<Lsn>>, ReplayError> {
    if !options.skip_corrupt {
        return Ok(None);
    }
    match error {
        WalError::Decode { lsn, reason } => {
            summary.skipped.push(Skipped {
                segment: None,
                offset: None,
                first: *lsn,
                last: Some(*lsn),
                reason: format!("envelope does not decode: {reason}"),
            });
            Ok(Some(Some(Lsn(lsn.0 + 1))))
        }
        WalError::Corrupt {
            segment,
            offset,
            reason,
        } => {
            let segments = prism_wal::list_segments(&options.dir)?;
            let next = segments
                .iter()
                .find(|s| s.id > *segment)
                .map(|s| s.first_lsn);
            let first = expected.max(segment.first_lsn());
            summary.skipped.push(Skipped {
                segment: Some(*segment),
                offset: Some(*offset),
                first,
                last: next.map(|n| Lsn(n.0.saturating_sub(1))),
                reason: reason.clone(),
            });
            Ok(Some(next))
        }
        _ => Ok(None),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Inserts one batch (and its dead letters); returns the rows written.
async fn flush(
    options: &ReplayOptions,
    sink: &Sink,
    lane: &str,
    batch: Batch,
    summary: &mut ReplaySummary,
) -> Result<u64, ReplayError> {
    let token = format!("replay:{}", batch.token());
    let (mut outcome, failed) =
        with_retries(options, lane, || batch.rows.insert(sink, lane, &token)).await?;
    if failed > 0 {
        store_rows_dropped_as_duplicates(options, sink, lane, &batch, &token, &mut outcome).await?;
    }
    let mut dead: Vec<DeadLetter> = batch.dead.clone();
    for poison in &outcome.poison {
        let lsn = batch.row_lsns[poison.index];
        let mut reader = prism_wal::read_dir(&options.dir, lsn)?;
        if let Some(record) = reader.next()? {
            let envelope = record.envelope()?;
            dead.push(dead_letter(
                lane,
                &envelope,
                lsn,
                poison.error.message.clone(),
                now_ms(),
            ));
        }
    }
    if !dead.is_empty() {
        let dead_token = format!("{token}/dead");
        let table = options.dead_letter_table.as_str();
        let (_, failed) = with_retries(options, table, || {
            sink.insert_dead_letters(table, &dead, Some(&dead_token))
        })
        .await?;
        if failed > 0 && sink.sends_tokens() {
            let expected = readback::expected_dead_letters(&dead);
            let mut rounds = readback::Rounds::new(table, &dead_token);
            while rounds.go_on() {
                let (missing, _) = with_retries(options, table, || {
                    readback::missing_rows(sink, table, &expected)
                })
                .await?;
                let Some(again) = rounds.insert_again(&missing) else {
                    break;
                };
                let subset: Vec<DeadLetter> = missing.iter().map(|&i| dead[i].clone()).collect();
                let (_, failed) = with_retries(options, table, || {
                    sink.insert_dead_letters(table, &subset, Some(&again))
                })
                .await?;
                rounds.inserted(failed);
            }
        }
        summary.dead_letters += dead.len() as u64;
    }
    let entry = summary.tables.entry(lane.to_string()).or_default();
    entry.rows += outcome.rows_inserted as u64;
    entry.dead_letters += dead.len() as u64;
    Ok(outcome.rows_inserted as u64 + dead.len() as u64)
}

/// After a replayed batch's insert succeeded on a retry: reads back which of its rows ClickHouse
/// holds and inserts the missing ones again under a new token, as a drain lane does (see
/// [`crate::drain::readback`]).
async fn store_rows_dropped_as_duplicates(
    options: &ReplayOptions,
    sink: &Sink,
    lane: &str,
    batch: &Batch,
    token: &str,
    outcome: &mut IsolateOutcome,
) -> Result<(), ReplayError> {
    let Some(&first) = batch.row_lsns.first() else {
        return Ok(());
    };
    if !sink.sends_tokens() {
        return Ok(());
    }
    let mut reader = prism_wal::read_dir(&options.dir, first)?;
    let identities = readback::row_identities(&mut reader, &batch.row_lsns)?;
    drop(reader);
    let mut rounds = readback::Rounds::new(lane, token);
    while rounds.go_on() {
        let expected = readback::expected_rows(&identities, &batch.rows, &outcome.poison);
        let (missing, _) = with_retries(options, lane, || {
            readback::missing_rows(sink, lane, &expected)
        })
        .await?;
        let Some(again) = rounds.insert_again(&missing) else {
            break;
        };
        let subset = batch.rows.subset(&missing);
        let (inserted, failed) =
            with_retries(options, lane, || subset.insert(sink, lane, &again)).await?;
        readback::add_rejected(outcome, &missing, inserted);
        rounds.inserted(failed);
    }
    Ok(())
}

/// Runs `attempt` until it succeeds (at most [`REPLAY_ATTEMPTS_MAX`] times); returns its value
/// and how many attempts failed before it.
async fn with_retries<T, F, Fut>(
    options: &ReplayOptions,
    table: &str,
    mut attempt: F,
) -> Result<(T, u32), ReplayError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, InsertError>>,
{
    let mut backoff = Backoff::new(options.backoff_initial_ms, options.backoff_max_ms);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Ok(value) => return Ok((value, attempts - 1)),
            Err(source) if attempts >= REPLAY_ATTEMPTS_MAX => {
                return Err(ReplayError::Insert {
                    table: table.to_string(),
                    attempts,
                    source,
                })
            }
            Err(error) => {
                tracing::warn!(%table, error = %prism_wal::ErrorChain(&error), "replay insert failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// A time given to `--from-time`/`--to-time` that is neither RFC 3339 nor epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a time: {reason}; give RFC 3339 (2026-11-30T12:00:00Z, \
     2026-11-30T12:00:00.250+01:00) or unix epoch milliseconds"
)]
pub struct TimeParseError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Milliseconds in one day.
const DAY_MS: i64 = 86_400_000;

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` or an integer of unix epoch milliseconds
/// into unix milliseconds. Fractions finer than a millisecond are truncated (publish times are
/// compared at millisecond precision); leap seconds (`:60`) are refused.
pub fn parse_time_ms(input: &str) -> Result<i64, TimeParseError> {
    let fail = |reason| TimeParseError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if !s.is_empty()
        && s.trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return s.parse().map_err(|_| fail("the number is out of range"));
    }
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Result<i64, TimeParseError> {
        let part = b
            .get(from..from + len)
            .ok_or(fail("it is too short for a date and time"))?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(fail("a digit is missing"));
        }
        Ok(part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8], reason| -> Result<(), TimeParseError> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(fail(reason)),
        }
    };
    let year = digits(0, 4)?;
    sep(4, b"-", "the date must be YYYY-MM-DD")?;
    let month = digits(5, 2)?;
    sep(7, b"-", "the date must be YYYY-MM-DD")?;
    let day = digits(8, 2)?;
    sep(10, b"Tt ", "the date and the time must be separated by T")?;
    let hour = digits(11, 2)?;
    sep(13, b":", "the time must be HH:MM:SS")?;
    let minute = digits(14, 2)?;
    sep(16, b":", "the time must be HH:MM:SS")?;
    let second = digits(17, 2)?;
    if !(1..=12).contains(&month) {
        return Err(fail("the month is out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(fail("the day is out of range"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(fail("the time of day is out of range"));
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(fail("the fraction of a second has no digits"));
        }
        for _ in (at - start)..3 {
            millis *= 10;
        }
    }
    let offset_min = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() => {
            let hours = digits(at + 1, 2)?;
            sep(at + 3, b":", "the offset must be +HH:MM or -HH:MM")?;
            let minutes = digits(at + 4, 2)?;
            if hours > 23 || minutes > 59 {
                return Err(fail("the offset is out of range"));
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        None => return Err(fail("the offset is missing (Z or +HH:MM)")),
        _ => {
            return Err(fail(
                "the offset must be Z, +HH:MM or -HH:MM, and end the time",
            ))
        }
    };
    let days = crate::codec::days_from_civil(year, month, day);
    let local_ms = days * DAY_MS + ((hour * 60 + minute) * 60 + second) * 1000 + millis;
    Ok(local_ms - offset_min * 60_000)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_in_utc_parse_to_their_unix_milliseconds() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time_ms("2026-11-30T12:34:56Z"), Ok(1_796_042_096_000));
        assert_eq!(parse_time_ms("2000-02-29t00:00:00.5z"), Ok(951_782_400_500));
        assert_eq!(
            parse_time_ms("2026-11-30 12:34:56.123456789Z"),
            Ok(1_796_042_096_123)
        );
        assert_eq!(parse_time_ms("1969-12-31T23:59:59.999Z"), Ok(-1));
    }

    #[test]
    fn rfc3339_offsets_are_subtracted_to_reach_utc() {
        assert_eq!(parse_time_ms("1970-01-01T01:00:00+01:00"), Ok(0));
        assert_eq!(parse_time_ms("1969-12-31T19:30:00-04:30"), Ok(0));
        assert_eq!(
            parse_time_ms("2026-11-30T14:34:56.250+02:00"),
            Ok(1_796_042_096_250)
        );
    }

    #[test]
    fn epoch_milliseconds_are_taken_as_they_are() {
        assert_eq!(parse_time_ms("1796042096123"), Ok(1_796_042_096_123));
        assert_eq!(parse_time_ms("0"), Ok(0));
        assert_eq!(parse_time_ms("-5"), Ok(-5));
    }

    #[test]
    fn malformed_or_out_of_range_times_are_refused_with_the_reason() {
        for bad in [
            "",
            "2026-11-30",
            "2026-11-30T12:34:56",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T23:59:60Z",
            "2026-11-30T12:34:56.Z",
            "2026-11-30T12:34:56+0100",
            "2026-11-30T12:34:56+01:00x",
            "2026/11/30T12:34:56Z",
            "99999999999999999999",
            "yesterday",
        ] {
            let error = parse_time_ms(bad).expect_err(bad);
            assert_eq!(error.input, bad);
            assert!(error.to_string().contains("RFC 3339"), "{error}");
        }
    }

    #[test]
    fn unknown_tables_are_refused_with_the_list_of_valid_ones() {
        let router = Router::new([("news".to_string(), "news_json".to_string())]);
        assert!(check_tables(&router, &["trades".to_string(), "news_json".to_string()]).is_ok());
        let error = check_tables(&router, &["trade".to_string()]).expect_err("unknown table");
        let text = error.to_string();
        assert!(text.contains("\"trade\""), "{text}");
        assert!(
            text.contains("trades") && text.contains("news_json"),
            "{text}"
        );
    }
}
