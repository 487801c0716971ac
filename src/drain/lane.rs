//! One drain lane: tails the WAL, batches the records of one table and inserts them with retries.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prism_wal::{Envelope, InflightBatch, Lsn, Reader, RecordRef, Wal};
use tokio::sync::watch;

use crate::codec::TimeWindow;
use crate::logcond::Condition;
use crate::metrics::{DataTypeLabels, DeadReason, Heartbeat, LaneLabels, Metrics};
use crate::sink::{Backoff, DeadLetter, ErrorClass, InsertError, IsolateOutcome, Sink};

use super::batch::{dead_letter, flush_due, Batch, BatchLimits, RowsKind};
use super::readback::{self, Expected};
use super::route::Router;
use super::tail::{Tail, Take};
use super::{DrainError, LedgerKeeper};

/// Records read per pass before the lane yields to other tasks and checks its timers.
const READ_CHUNK_RECORDS: usize = 4_096;

/// Test hook (debug builds only): the environment variable naming a failpoint at which the
/// process aborts, so a test can crash the relay at an exact point of a batch's life. Release
/// builds compile no failpoint, and a debug build without the variable reaches none.
pub const FAILPOINT_ENV: &str = "PRISM_RELAY_FAILPOINT";

/// The failpoint between a batch's successful insert and the ledger's move of the lane's cursor
/// past it: a restart finds the batch in flight, re-cuts the same records and inserts them again
/// with the same token.
pub const FAILPOINT_AFTER_INSERT_BEFORE_CURSOR: &str = "drain.after_insert_before_cursor";

/// Aborts the process when [`FAILPOINT_ENV`] names `failpoint` (debug builds only).
fn failpoint(failpoint: &str) {
    #[cfg(debug_assertions)]
    {
        static ACTIVE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let active = ACTIVE.get_or_init(|| std::env::var(FAILPOINT_ENV).ok());
        if active.as_deref() == Some(failpoint) {
            tracing::error!(failpoint, "failpoint reached: aborting the process");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = failpoint;
}

/// Static settings of a lane.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    /// Lane name: the table (or the unrouted lane).
    pub name: String,
    /// Batch cutting limits.
    pub limits: BatchLimits,
    /// Dead-letter table name.
    pub dead_letter_table: String,
    /// First retry delay after a failed insert.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Plausible row times; typed rows outside are dead letters.
    pub time_window: TimeWindow,
}

/// A running lane.
pub struct Lane {
    config: LaneConfig,
    wal: Wal,
    router: Arc<Router>,
    sink: Sink,
    ledger: Arc<LedgerKeeper>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    /// Drain before exit (`[shutdown] drain`): once this turns true (fetching has stopped, so the
    /// WAL's durable end no longer moves), the lane flushes what it batched as soon as it has read
    /// to the durable end, and returns once it holds nothing. `shutdown` still stops it at once.
    finish: Option<watch::Receiver<bool>>,
    /// Next WAL position this lane will look at.
    read_pos: Lsn,
    /// Records of this lane below this position are already in ClickHouse.
    resume_cursor: Lsn,
    /// A batch found in flight at start-up: re-cut exactly this range first.
    recut: Option<InflightBatch>,
    /// How the rows of this lane are encoded.
    kind: RowsKind,
    /// Publish time of the newest record handled (for the drain watermark).
    newest_published_ns: i64,
    /// The lane loop's liveness (see [`crate::metrics::health`]).
    heartbeat: Heartbeat,
    /// The lanes' shared read of the WAL, and this lane's index in it (None: not one of its
    /// lanes, so the lane reads on its own).
    tail: Arc<Tail>,
    tail_index: Option<usize>,
    /// Whether the last batch was cut by its row or byte limit: the lane was reading a backlog.
    /// Once such a lane has read everything and the WAL has not grown for [`BACKLOG_END_QUIET`],
    /// the backlog is over and nothing is coming to fill the batch: it goes at once instead of
    /// at its age (up to `flush_interval_ms` later). Never set while a re-cut is pending: a
    /// re-cut exists only from start-up to its end, and only a cut by the limits sets this.
    cut_full: bool,
    /// The WAL's durable end as the lane last saw it, and when it saw it move.
    durable_seen: (Lsn, Instant),
}

/// Resolves when the lane is asked to finish; never without a finish signal (or once its sender
/// is gone, so a dropped sender cannot make the wait spin).
async fn finish_changed(finish: &mut Option<watch::Receiver<bool>>) {
    let gone = match finish {
        Some(finish) => finish.changed().await.is_err(),
        None => true,
    };
    if gone {
        std::future::pending::<()>().await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Lane {
    /// Prepares a lane from its ledger state; `first_lsn` is the oldest record the WAL holds.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        config: LaneConfig,
        kind: RowsKind,
        wal: Wal,
        router: Arc<Router>,
        tail: Arc<Tail>,
        sink: Sink,
        ledger: Arc<LedgerKeeper>,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
        first_lsn: Lsn,
    ) -> Lane {
        let (cursor, recut) = ledger.lane_state(&config.name).await;
        let resume_cursor = cursor.unwrap_or(first_lsn).max(first_lsn);
        debug_assert!(
            recut.as_ref().is_none_or(|b| b.first >= resume_cursor),
            "an in-flight batch starts at or after its lane's cursor"
        );
        ledger.register(&config.name, resume_cursor).await;
        let tail_index = tail.register(&config.name, resume_cursor).await;
        metrics.health.lane_started(&config.name);
        let heartbeat = metrics
            .health
            .heartbeat(format!("drain lane {}", config.name));
        Lane {
            config,
            wal,
            router,
            sink,
            ledger,
            metrics,
            shutdown,
            finish: None,
            read_pos: resume_cursor,
            resume_cursor,
            recut,
            kind,
            newest_published_ns: 0,
            heartbeat,
            tail,
            tail_index,
            cut_full: false,
            durable_seen: (Lsn(0), Instant::now()),
        }
    }

    /// Makes the lane drain before it exits: once `finish` turns true it inserts everything up to
    /// the WAL's durable end and returns (see [`Lane::run`]).
    pub fn finish_on(mut self, finish: watch::Receiver<bool>) -> Lane {
        self.finish = Some(finish);
        self
    }

    /// Whether the lane was asked to drain to the WAL's end and exit.
    fn finishing(&self) -> bool {
        self.finish.as_ref().is_some_and(|f| *f.borrow())
    }

    /// Runs until shutdown, inserting every record of the lane; with [`Lane::finish_on`], also
    /// returns once asked to finish and every durable record of the lane is inserted.
    pub async fn run(mut self) -> Result<(), DrainError> {
        let mut batch = Batch::new(&self.config.name, self.kind, self.config.time_window);
        let mut durable = self.wal.watch_durable();
        let mut files_exhausted = Condition::default();
        // The lane's own reader, only while it reads outside the tail's chunks (see
        // `super::tail`); positioned at `read_pos` while it exists.
        let mut own: Option<Reader> = None;
        loop {
            self.heartbeat.beat();
            let mut caught_up = false;
            let mut read_blocked = false;
            let take = match self.tail_index {
                Some(index) => {
                    self.tail
                        .chunk_at(index, self.read_pos, own.is_some())
                        .await
                }
                None => Ok(Take::OwnReader),
            };
            // Handed a chunk, or at the tail's end: a lane that read on its own is back with it.
            if matches!(take, Ok(Take::Chunk(_) | Take::CaughtUp)) && own.take().is_some() {
                tracing::debug!(lane = %self.config.name, lsn = self.read_pos.0, "the lane reads through the shared tail of the WAL again");
            }
            let failure = match take {
                Ok(Take::Chunk(chunk)) => {
                    let index = self.tail_index.unwrap_or(usize::MAX);
                    for (lsn, body) in chunk.records_of(index, self.read_pos) {
                        self.take_record(&mut batch, lsn, body, true).await?;
                    }
                    self.read_pos = self.read_pos.max(chunk.end());
                    None
                }
                Ok(Take::CaughtUp) => {
                    caught_up = true;
                    None
                }
                Ok(Take::OwnReader) => {
                    let reader = match own.as_mut() {
                        Some(reader) => Ok(reader),
                        None => self.wal.reader(self.read_pos).map(|r| {
                            if self.tail_index.is_some() {
                                tracing::debug!(lane = %self.config.name, lsn = self.read_pos.0, "the lane is outside the shared tail of the WAL (held back, or resumed apart from the others): it reads the WAL on its own");
                            }
                            own.insert(r)
                        }),
                    };
                    match reader {
                        Ok(reader) => {
                            let mut failure = None;
                            for _ in 0..READ_CHUNK_RECORDS {
                                match reader.next() {
                                    Ok(Some(record)) => {
                                        let (lsn, body) = (record.lsn, record.body);
                                        self.take_record(&mut batch, lsn, body, false).await?;
                                    }
                                    Ok(None) => {
                                        caught_up = true;
                                        break;
                                    }
                                    // The reader stays where it was (its next segment could
                                    // not be opened): the same call is tried again after a
                                    // pause.
                                    Err(source) => {
                                        failure = Some(source);
                                        break;
                                    }
                                }
                            }
                            failure
                        }
                        Err(source) => Some(source),
                    }
                }
                Err(source) => Some(source),
            };
            match failure {
                // Out of file descriptors passes on its own: wait and try again.
                Some(source) if source.is_transient() => {
                    if let Some(o) = files_exhausted.occurred() {
                        tracing::warn!(lane = %self.config.name, error = %source, failures = o.count(), lasted_s = o.lasted_s(), "cannot read the WAL; retrying");
                    }
                    read_blocked = true;
                }
                Some(source) => return Err(wal_error(&self.config.name)(source)),
                None => {
                    if let Some(ended) = files_exhausted.cleared() {
                        tracing::info!(lane = %self.config.name, failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "reading the WAL again");
                    }
                }
            }

            if caught_up {
                let durable_lsn = self.wal.durable_lsn();
                if durable_lsn != self.durable_seen.0 {
                    self.durable_seen = (durable_lsn, Instant::now());
                }
            }
            // The re-cut ends only once the reader is past its range: a read chunk can end
            // before the range starts (records of other lanes), and clearing it then would let
            // the limits cut that batch differently, under another token.
            if self.recut.as_ref().is_some_and(|r| self.read_pos > r.last) {
                if !batch.is_empty() {
                    self.flush(&mut batch, false).await?;
                }
                self.recut = None;
            } else if self.recut.is_none()
                && batch.opened_at().is_some_and(|t| {
                    let now = Instant::now();
                    now >= flush_due(t, self.config.limits.age_max)
                        || (caught_up && self.backlog_end().is_some_and(|end| now >= end))
                })
            {
                self.flush(&mut batch, false).await?;
                self.cut_full = false;
            }
            if batch.is_empty() {
                self.ledger
                    .note_cursor(&self.config.name, self.read_pos)
                    .await;
            }
            // Draining before exit: what is batched goes now (its age limit may be minutes away);
            // the lane is done once its read position is past the durable end (the reader's own
            // end of data is not taken for it) and it holds nothing. Short of that end it waits
            // below like any caught-up lane and reads again.
            let past_durable_end = self.read_pos.0 > self.wal.durable_lsn().0;
            if caught_up && !read_blocked && self.finishing() && !*self.shutdown.borrow() {
                if !batch.is_empty() {
                    self.flush(&mut batch, false).await?;
                    continue;
                }
                if past_durable_end {
                    self.ledger
                        .note_cursor(&self.config.name, self.read_pos)
                        .await;
                    self.publish_progress(&batch, caught_up);
                    tracing::debug!(lane = %self.config.name, cursor = self.read_pos.0, "drained to the WAL's end");
                    return Ok(());
                }
            }
            self.publish_progress(&batch, caught_up);
            if *self.shutdown.borrow() {
                return self.stop(&mut batch).await;
            }
            if read_blocked {
                tokio::select! {
                    _ = tokio::time::sleep(READ_RETRY) => {}
                    _ = self.shutdown.changed() => {}
                }
            } else if caught_up {
                let deadline = batch
                    .opened_at()
                    .map(|t| {
                        let due = flush_due(t, self.config.limits.age_max);
                        self.backlog_end().map_or(due, |end| due.min(end))
                    })
                    .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
                // Waiting for records or for the batch's age limit (flush_interval_ms may be
                // minutes) is legitimate: beat meanwhile.
                let mut shutdown = self.shutdown.clone();
                let mut finish = self.finish.clone();
                self.heartbeat
                    .wait(async {
                        tokio::select! {
                            _ = durable.changed() => {}
                            _ = tokio::time::sleep_until(deadline.into()) => {}
                            _ = shutdown.changed() => {}
                            _ = finish_changed(&mut finish) => {}
                        }
                    })
                    .await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Handles the record at `lsn`: batches it when it is this lane's (`routed`: the tail
    /// already routed it here) and not yet in ClickHouse, and inserts the batch when it is cut.
    async fn take_record(
        &mut self,
        batch: &mut Batch,
        lsn: Lsn,
        body: &[u8],
        routed: bool,
    ) -> Result<(), DrainError> {
        let record = RecordRef { lsn, body };
        // Another lane's record is routed from its subject alone: a lane reading on its own
        // passes over every other lane's records, and decoding each in full cost more than
        // reading it.
        let mine = routed
            || self
                .router
                .route_record(&record)
                .map_err(wal_error(&self.config.name))?
                .lane()
                == self.config.name;
        // A re-cut batch ends exactly where it ended before the crash; past it, batches are cut
        // by the limits again.
        if self.recut.as_ref().is_some_and(|r| lsn > r.last) {
            if !batch.is_empty() {
                self.flush(batch, false).await?;
            }
            self.recut = None;
        }
        self.read_pos = Lsn(lsn.0 + 1);
        // The committed cursor never passes an in-flight batch's first record, so the cursor
        // alone says which records of this lane are already in ClickHouse.
        if !mine || lsn < self.resume_cursor {
            return Ok(());
        }
        let envelope = record.envelope().map_err(wal_error(&self.config.name))?;
        self.newest_published_ns = self.newest_published_ns.max(envelope.published_ns);
        batch.push(lsn, &envelope, now_ms());
        let (cut, full) = match &self.recut {
            Some(r) => (lsn >= r.last, false),
            None => {
                let full = batch.is_full(&self.config.limits);
                (full, full)
            }
        };
        if cut {
            self.flush(batch, false).await?;
            // The re-cut batch (if that was it) is done: the records after it must not each
            // become a batch of their own.
            self.recut = None;
            self.cut_full = full;
        }
        Ok(())
    }

    /// When the backlog this lane was reading counts as over, if its last batch was cut full:
    /// [`BACKLOG_END_QUIET`] after the WAL's durable end last moved (as seen when caught up).
    fn backlog_end(&self) -> Option<Instant> {
        self.cut_full
            .then(|| self.durable_seen.1 + BACKLOG_END_QUIET)
    }

    /// On shutdown: one bounded attempt to insert what is batched, then stop.
    /// A re-cut still short of its range is left in flight: flushing it now would cut it
    /// differently from the batch recorded in the ledger.
    async fn stop(&mut self, batch: &mut Batch) -> Result<(), DrainError> {
        if !batch.is_empty() && self.recut.is_none() {
            self.flush(batch, true).await?;
            self.ledger
                .note_cursor(&self.config.name, self.read_pos)
                .await;
        }
        Ok(())
    }

    fn publish_progress(&self, batch: &Batch, caught_up: bool) {
        let lane = LaneLabels {
            table: self.config.name.clone(),
        };
        let cursor = batch.first().unwrap_or(self.read_pos);
        self.metrics
            .drain_cursor_lsn
            .get_or_create(&lane)
            .set(cursor.0 as i64);
        let backlog = self
            .wal
            .durable_lsn()
            .0
            .saturating_sub(cursor.0.saturating_sub(1));
        let queue = DataTypeLabels {
            data_type: self.config.name.clone(),
        };
        self.metrics
            .batch_queue_size
            .get_or_create(&queue)
            .set(backlog as i64);
        self.metrics
            .batch_queue_bytes
            .get_or_create(&queue)
            .set(batch.bytes() as i64);
        // The oldest record not inserted: the open batch's oldest, or none once the lane has
        // read everything durable and holds no batch. An empty batch short of the end keeps
        // the previous figure until the next record of the lane is read.
        if !batch.is_empty() {
            self.metrics
                .health
                .lane_pending(&self.config.name, batch.oldest_published_ns());
        } else if caught_up {
            self.metrics.health.lane_pending(&self.config.name, None);
        }
        if batch.is_empty() && self.newest_published_ns > 0 {
            self.metrics
                .drain_watermark_seconds
                .get_or_create(&lane)
                .set(self.newest_published_ns as f64 / 1e9);
        }
    }

    /// Inserts the batch (rows, then dead letters) with retries, then moves the cursor.
    /// `stopping` bounds the retries to one attempt: shutdown must not wait on ClickHouse.
    async fn flush(&mut self, batch: &mut Batch, stopping: bool) -> Result<(), DrainError> {
        let Some(first) = batch.first() else {
            return Ok(());
        };
        let full = std::mem::replace(
            batch,
            Batch::new(&self.config.name, self.kind, self.config.time_window),
        );
        let token = full.token();
        // While the batch is in flight (and retried through an outage) it is what the lane has
        // not inserted: the lag and the queue bytes must show it.
        self.metrics
            .health
            .lane_pending(&self.config.name, full.oldest_published_ns());
        self.metrics
            .batch_queue_bytes
            .get_or_create(&DataTypeLabels {
                data_type: self.config.name.clone(),
            })
            .set(full.bytes() as i64);
        let inflight = InflightBatch {
            first,
            last: full.last(),
            rows: u32::try_from(full.len()).unwrap_or(u32::MAX),
        };
        self.ledger_step(LedgerStep::Begin(inflight), stopping)
            .await?;

        // Sent before under the same token: a re-cut batch from before a restart, or any batch
        // once an attempt failed. The server may then hold the token without the rows.
        let recut = self.recut.is_some();
        let (rows, table, token_ref) = (&full.rows, self.config.name.clone(), token.as_str());
        let lane_table = self.config.name.clone();
        let inserted = self
            .retry(stopping, &lane_table, |sink| {
                let table = table.clone();
                async move { rows.insert(&sink, &table, token_ref).await }
            })
            .await?;
        let mut outcome = inserted.value;
        if recut || inserted.failed_attempts > 0 {
            self.store_rows_dropped_as_duplicates(&full, &token, &mut outcome, stopping)
                .await?;
        }
        let rejected: Vec<usize> = outcome.poison.iter().map(|p| p.index).collect();
        let mut dead = full.dead.clone();
        let mut dead_classes = full.dead_classes.clone();
        for poison in &outcome.poison {
            let lsn = full.row_lsns[poison.index];
            let letter = self.reread_dead_letter(lsn, poison.error.message.clone())?;
            dead_classes.push((
                DeadReason::rejected,
                super::batch::dead_letter_data_type(&self.config.name, &letter.subject),
            ));
            dead.push(letter);
        }
        if !dead.is_empty() {
            let dead_table = self.config.dead_letter_table.as_str().to_owned();
            let dead_token = format!("{token}/dead");
            let (dead_rows, dead_table, dead_token) =
                (&dead, dead_table.as_str(), dead_token.as_str());
            let inserted = self
                .retry(stopping, dead_table, |sink| async move {
                    sink.insert_dead_letters(dead_table, dead_rows, Some(dead_token))
                        .await
                })
                .await?;
            if recut || inserted.failed_attempts > 0 {
                self.store_dead_letters_dropped_as_duplicates(
                    dead_table, dead_rows, dead_token, stopping,
                )
                .await?;
            }
            // A handful of classes and data types per batch: count each group once.
            let mut groups: Vec<(DeadReason, &str, u64)> = Vec::new();
            for (class, data_type) in &dead_classes {
                match groups
                    .iter_mut()
                    .find(|(c, d, _)| c == class && d == data_type)
                {
                    Some(group) => group.2 += 1,
                    None => groups.push((*class, data_type, 1)),
                }
            }
            for (class, data_type, records) in groups {
                self.metrics
                    .dead_lettered(&self.config.name, data_type, class, records);
            }
        }
        self.metrics
            .batch_rows
            .get_or_create(&LaneLabels {
                table: self.config.name.clone(),
            })
            .observe(full.len() as f64);
        if outcome.rows_inserted > 0 {
            self.metrics.batch_inserted(outcome.rows_inserted as u64);
            for (labels, rows) in full.label_counts(&rejected) {
                self.metrics.processed(labels, rows);
            }
            failpoint(FAILPOINT_AFTER_INSERT_BEFORE_CURSOR);
        }
        self.ledger_step(LedgerStep::Finish(self.read_pos), stopping)
            .await?;
        // One line per batch at debug level: the LSN range ties a row in ClickHouse to its WAL
        // records (`wal dump`, `replay --from-lsn`).
        tracing::debug!(table = %self.config.name, lsn_first = first.0, lsn_last = inflight.last.0,
            rows = outcome.rows_inserted, dead_letters = dead.len(), "batch inserted");
        Ok(())
    }

    /// Commits a ledger step, waiting out a disk too full to write the ledger: the step is
    /// retried as is (the batch stays the same batch) until it is written, or until shutdown,
    /// which leaves the batch to the next start. Any other ledger failure stops the lane.
    async fn ledger_step(&mut self, step: LedgerStep, stopping: bool) -> Result<(), DrainError> {
        let mut disk_full = Condition::default();
        loop {
            let result = match step {
                LedgerStep::Begin(inflight) => self.ledger.begin(&self.config.name, inflight).await,
                LedgerStep::Finish(cursor) => self.ledger.finish(&self.config.name, cursor).await,
            };
            match result {
                Ok(()) => {
                    if let Some(ended) = disk_full.cleared() {
                        tracing::info!(lane = %self.config.name, failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "ledger written again");
                    }
                    return Ok(());
                }
                Err(DrainError::LedgerDiskFull(error)) => {
                    if let Some(o) = disk_full.occurred() {
                        tracing::warn!(lane = %self.config.name, error = %prism_wal::ErrorChain(&error), failures = o.count(), lasted_s = o.lasted_s(), "disk full: the ledger cannot be written; waiting for space");
                    }
                    if stopping || *self.shutdown.borrow() {
                        return Err(DrainError::Interrupted {
                            lane: self.config.name.clone(),
                        });
                    }
                    // Waiting for disk space is legitimate: the loop is alive.
                    self.heartbeat.beat();
                    tokio::select! {
                        _ = tokio::time::sleep(LEDGER_RETRY) => {}
                        _ = self.shutdown.changed() => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// After the insert of a batch that was sent before under the same token (an attempt failed,
    /// or the batch is re-cut from before a restart): reads back which of its rows ClickHouse
    /// holds and inserts the missing ones again under a new token (see [`super::readback`]). The
    /// read costs one query per stream of the batch, and only after a failure.
    async fn store_rows_dropped_as_duplicates(
        &self,
        full: &Batch,
        token: &str,
        outcome: &mut IsolateOutcome,
        stopping: bool,
    ) -> Result<(), DrainError> {
        if !self.sink.sends_tokens() || full.row_lsns.is_empty() {
            return Ok(());
        }
        let wal_error = wal_error(&self.config.name);
        // The batch is in flight, so the ledger keeps its records.
        let mut reader = self.wal.reader(full.row_lsns[0]).map_err(wal_error)?;
        let identities =
            readback::row_identities(&mut reader, &full.row_lsns).map_err(wal_error)?;
        drop(reader);
        let table = self.config.name.as_str();
        let mut rounds = readback::Rounds::new(table, token);
        while rounds.go_on() {
            let expected = readback::expected_rows(&identities, &full.rows, &outcome.poison);
            let missing = self.missing_rows(table, &expected, stopping).await?;
            let Some(again) = rounds.insert_again(&missing) else {
                break;
            };
            let (subset, again) = (&full.rows.subset(&missing), again.as_str());
            let inserted = self
                .retry(stopping, table, |sink| async move {
                    subset.insert(&sink, table, again).await
                })
                .await?;
            readback::add_rejected(outcome, &missing, inserted.value);
            rounds.inserted(inserted.failed_attempts);
        }
        if rounds.inserted_again() > 0 {
            self.metrics
                .rows_reinserted
                .get_or_create(&LaneLabels {
                    table: table.to_owned(),
                })
                .inc_by(rounds.inserted_again());
        }
        Ok(())
    }

    /// [`Lane::store_rows_dropped_as_duplicates`] for the batch's dead letters, in the dead-letter
    /// table (keyed by the message identity).
    async fn store_dead_letters_dropped_as_duplicates(
        &self,
        table: &str,
        letters: &[DeadLetter],
        token: &str,
        stopping: bool,
    ) -> Result<(), DrainError> {
        if !self.sink.sends_tokens() {
            return Ok(());
        }
        let expected = readback::expected_dead_letters(letters);
        let mut rounds = readback::Rounds::new(table, token);
        while rounds.go_on() {
            let missing = self.missing_rows(table, &expected, stopping).await?;
            let Some(again) = rounds.insert_again(&missing) else {
                break;
            };
            let subset: &Vec<DeadLetter> = &missing.iter().map(|&i| letters[i].clone()).collect();
            let again = again.as_str();
            let inserted = self
                .retry(stopping, table, |sink| async move {
                    sink.insert_dead_letters(table, subset, Some(again)).await
                })
                .await?;
            rounds.inserted(inserted.failed_attempts);
        }
        Ok(())
    }

    /// [`readback::missing_rows`], retried like an insert.
    async fn missing_rows(
        &self,
        table: &str,
        expected: &[Expected<'_>],
        stopping: bool,
    ) -> Result<Vec<usize>, DrainError> {
        let retried = self
            .retry(stopping, table, |sink| async move {
                readback::missing_rows(&sink, table, expected).await
            })
            .await?;
        Ok(retried.value)
    }

    fn reread_dead_letter(&self, lsn: Lsn, reason: String) -> Result<DeadLetter, DrainError> {
        let wal_error = wal_error(&self.config.name);
        let mut reader = self.wal.reader(lsn).map_err(wal_error)?;
        let record = reader.next().map_err(wal_error)?.ok_or_else(|| {
            wal_error(prism_wal::WalError::Truncated {
                requested: lsn,
                first_available: lsn,
            })
        })?;
        let envelope: Envelope<'_> = record.envelope().map_err(wal_error)?;
        Ok(dead_letter(
            &self.config.name,
            &envelope,
            lsn,
            reason,
            now_ms(),
        ))
    }

    /// Runs an insert into `table` until it succeeds (saying how many attempts failed before);
    /// retryable and schema errors back off and try again. Each attempt is timed and counted, and reported to the lane's readiness; the
    /// loop beats while an attempt and a retry delay last (both are legitimate waits, bounded by
    /// `insert_timeout_ms` and the backoff).
    async fn retry<T, F, Fut>(
        &self,
        stopping: bool,
        table: &str,
        mut attempt: F,
    ) -> Result<Retried<T>, DrainError>
    where
        F: FnMut(Sink) -> Fut,
        Fut: std::future::Future<Output = Result<T, InsertError>>,
    {
        let mut backoff = Backoff::new(
            self.config.backoff_initial.as_millis() as u64,
            self.config.backoff_max.as_millis() as u64,
        );
        let mut failing = Condition::default();
        // Failures no retry can fix are a condition of their own, logged as such from the first.
        let mut refused = Condition::default();
        let mut failed_attempts = 0u32;
        loop {
            let started = Instant::now();
            let result = self.heartbeat.wait(attempt(self.sink.clone())).await;
            let elapsed = started.elapsed();
            match result {
                Ok(value) => {
                    self.metrics.insert_attempt(table, elapsed, None);
                    self.metrics.health.insert_succeeded(&self.config.name);
                    if let Some(ended) = failing.cleared() {
                        tracing::info!(lane = %self.config.name, failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "insert succeeded after retries");
                    }
                    if let Some(ended) = refused.cleared() {
                        tracing::info!(lane = %self.config.name, failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "ClickHouse accepts the relay's inserts again");
                    }
                    return Ok(Retried {
                        value,
                        failed_attempts,
                    });
                }
                Err(error) => {
                    failed_attempts = failed_attempts.saturating_add(1);
                    let class = error_class_label(error.class);
                    self.metrics.insert_attempt(table, elapsed, Some(&class));
                    self.metrics
                        .health
                        .insert_failed(&self.config.name, &class, &error.message);
                    // /ready fails at once on a class no retry can fix (Health::insert_failed).
                    if let Some(hint) = error.class.operator_hint() {
                        if let Some(o) = refused.occurred() {
                            tracing::error!(lane = %self.config.name, class = %error.class, %error, failures = o.count(), lasted_s = o.lasted_s(), retry_ms = self.config.backoff_max.as_millis() as u64, "{hint}");
                        }
                    } else if let Some(o) = failing.occurred() {
                        tracing::warn!(lane = %self.config.name, class = ?error.class, %error, failures = o.count(), lasted_s = o.lasted_s(), "insert failed; retrying");
                    }
                    if stopping || *self.shutdown.borrow() {
                        return Err(DrainError::Interrupted {
                            lane: self.config.name.clone(),
                        });
                    }
                    self.metrics
                        .insert_retries
                        .get_or_create(&LaneLabels {
                            table: table.to_owned(),
                        })
                        .inc();
                    // An operator's fix takes minutes: retry at the slowest pace meanwhile.
                    let delay = if error.class.needs_operator() {
                        self.config.backoff_max
                    } else {
                        backoff.next_delay()
                    };
                    let mut shutdown = self.shutdown.clone();
                    self.heartbeat
                        .wait(async {
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = shutdown.changed() => {}
                            }
                        })
                        .await;
                }
            }
        }
    }
}

/// The `class` label of an insert error: the sink's class in lower_snake_case.
fn error_class_label(class: ErrorClass) -> String {
    class.to_string().replace(['-', ' '], "_").to_lowercase()
}

/// How long a lane waits before retrying a ledger commit that found the disk full: space comes
/// back when an operator or retention frees it, so a short poll resumes promptly at little cost.
const LEDGER_RETRY: Duration = Duration::from_millis(200);

/// How long a lane waits before reading again after the WAL ran out of file descriptors: they
/// come back as soon as other files are closed, so a short poll resumes promptly.
const READ_RETRY: Duration = Duration::from_millis(200);

/// An insert that succeeded, and how many attempts failed before it.
struct Retried<T> {
    value: T,
    failed_attempts: u32,
}

/// A ledger commit of a batch's life, retried as is while the disk is full.
#[derive(Debug, Clone, Copy)]
enum LedgerStep {
    /// Record the batch as in flight before inserting it.
    Begin(InflightBatch),
    /// Move the cursor past the batch (to this position) after the insert.
    Finish(Lsn),
}

/// How long an idle lane sleeps before re-checking (a durable-LSN change wakes it sooner).
const IDLE_WAKE: Duration = Duration::from_millis(1_000);

/// How long the WAL must stay still before a lane that was reading a backlog takes it as over
/// and inserts its last batch at once ([`Lane::backlog_end`]). Under traffic the WAL grows at
/// least every `fetch_linger_ms` (50 ms by default), so steady batches keep going for their age.
const BACKLOG_END_QUIET: Duration = Duration::from_millis(200);

/// The drain's error for a WAL error met by lane `lane`.
fn wal_error(lane: &str) -> impl Fn(prism_wal::WalError) -> DrainError + Copy + '_ {
    move |source| DrainError::Wal {
        lane: lane.to_owned(),
        source,
    }
}
