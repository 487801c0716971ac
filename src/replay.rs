//! `prism-relay replay`: re-insert a WAL range into ClickHouse, to backfill a database that lost
//! data or to fill a new cluster (or MarketPrism's cold database).
//!
//! It reads the WAL directory read-only (the relay may keep running on it) and uses the drain's
//! batches and the sink's isolating inserts, but not the ledger: a replay moves no cursor and
//! frees no segment. Its deduplication tokens live in their own namespace (`replay:<start>:`), so a
//! modern server's insert deduplication does not swallow a backfill of rows it still remembers
//! inserting; ReplacingMergeTree collapses whatever was already there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use prism_wal::{Lsn, WalError};

use crate::drain::{dead_letter, Batch, BatchLimits, Router, RowsKind};
use crate::sink::{Backoff, DeadLetter, InsertError, Sink};

/// Attempts per batch before a replay gives up (a replay is operator-driven; it must not hang).
const REPLAY_ATTEMPTS_MAX: u32 = 10;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// WAL directory.
    pub dir: PathBuf,
    /// First LSN to replay (the WAL's first when older).
    pub from: Lsn,
    /// Last LSN to replay, inclusive; `None` for everything on disk.
    pub to: Option<Lsn>,
    /// Only these lanes (tables); empty for all.
    pub tables: Vec<String>,
    /// Rows per insert.
    pub rows_max: usize,
    /// Dead-letter table.
    pub dead_letter_table: String,
    /// First retry delay.
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
    /// Token namespace, unique per replay run.
    pub token_prefix: String,
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records read from the WAL in the range.
    pub records: u64,
    /// Rows inserted, per table.
    pub rows: BTreeMap<String, u64>,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Last LSN read.
    pub last: Option<Lsn>,
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the WAL failed (corruption is reported, not skipped).
    #[error("reading the WAL: {0}")]
    Wal(#[from] WalError),
    /// ClickHouse kept failing.
    #[error("insert into {table} failed {attempts} times, last error: {source}")]
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

/// Replays the range, calling `progress` with the LSN reached after each batch.
pub async fn replay(
    options: &ReplayOptions,
    router: &Router,
    sink: &Sink,
    mut progress: impl FnMut(Lsn),
) -> Result<ReplaySummary, ReplayError> {
    let mut reader = prism_wal::read_dir(&options.dir, options.from)?;
    let limits = BatchLimits {
        rows_max: options.rows_max,
        bytes_max: usize::MAX,
        age_max: Duration::MAX,
    };
    let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
    let mut summary = ReplaySummary::default();
    while let Some(record) = reader.next()? {
        if options.to.is_some_and(|to| record.lsn > to) {
            break;
        }
        let envelope = record.envelope()?;
        summary.records += 1;
        summary.last = Some(record.lsn);
        let lane = router.route_envelope(&envelope).lane().to_string();
        if !options.tables.is_empty() && !options.tables.contains(&lane) {
            continue;
        }
        let batch = batches
            .entry(lane.clone())
            .or_insert_with(|| Batch::new(&lane, RowsKind::for_lane(&lane)));
        batch.push(record.lsn, &envelope, now_ms());
        if batch.is_full(&limits) {
            let full = std::mem::replace(batch, Batch::new(&lane, RowsKind::for_lane(&lane)));
            flush(options, sink, &lane, full, &mut summary).await?;
            progress(record.lsn);
        }
    }
    for (lane, batch) in batches {
        if !batch.is_empty() {
            flush(options, sink, &lane, batch, &mut summary).await?;
        }
    }
    if let Some(last) = summary.last {
        progress(last);
    }
    Ok(summary)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn flush(
    options: &ReplayOptions,
    sink: &Sink,
    lane: &str,
    batch: Batch,
    summary: &mut ReplaySummary,
) -> Result<(), ReplayError> {
    let token = format!("{}{}", options.token_prefix, batch.token());
    let outcome = with_retries(options, lane, || batch.rows.insert(sink, lane, &token)).await?;
    let mut dead: Vec<DeadLetter> = batch.dead.clone();
    for poison in &outcome.poison {
        let lsn = batch.row_lsns[poison.index];
        let mut reader = prism_wal::read_dir(&options.dir, lsn)?;
        if let Some(record) = reader.next()? {
            let envelope = record.envelope()?;
            dead.push(dead_letter(
                lane,
                &envelope,
                poison.error.message.clone(),
                now_ms(),
            ));
        }
    }
    if !dead.is_empty() {
        let dead_token = format!("{token}/dead");
        let table = options.dead_letter_table.as_str();
        with_retries(options, table, || {
            sink.insert_dead_letters(table, &dead, Some(&dead_token))
        })
        .await?;
        summary.dead_letters += dead.len() as u64;
    }
    *summary.rows.entry(lane.to_string()).or_default() += outcome.rows_inserted as u64;
    Ok(())
}

async fn with_retries<T, F, Fut>(
    options: &ReplayOptions,
    table: &str,
    mut attempt: F,
) -> Result<T, ReplayError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, InsertError>>,
{
    let mut backoff = Backoff::new(options.backoff_initial_ms, options.backoff_max_ms);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(source) if attempts >= REPLAY_ATTEMPTS_MAX => {
                return Err(ReplayError::Insert {
                    table: table.to_string(),
                    attempts,
                    source,
                })
            }
            Err(error) => {
                tracing::warn!(%table, %error, "replay insert failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}
