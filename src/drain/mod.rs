//! Drain: durable WAL records -> decoded rows -> ClickHouse batches, one lane per table.
//!
//! Each lane (a typed MarketPrism table, a passthrough table, or the unrouted lane) runs its own task:
//! it tails the WAL from its ledger cursor, keeps the records its route claims, cuts batches by rows,
//! bytes and age, and inserts them through the [`crate::sink`]. Lanes are independent, so one table
//! whose inserts fail does not hold back the others; the cost is that every lane reads the WAL, which
//! comes from the page cache at these rates.
//!
//! Crash safety rests on the ledger (a `prism_wal::Ledger`, written atomically):
//! - before a batch is inserted, its WAL range is recorded as the lane's in-flight batch; after a crash
//!   the lane re-cuts exactly that range, so the retry is the identical batch with the identical
//!   deduplication token (invariant 7);
//! - after the insert (and the dead letters of the batch) succeeded, the lane's cursor moves past it;
//!   the WAL frees a segment only when every lane's cursor and in-flight batch is past it (invariant 2).

mod batch;
mod lane;
pub mod readback;
pub mod route;
mod tail;

use std::sync::Arc;

use prism_wal::{InflightBatch, Ledger, Lsn, Wal, WalError};
use tokio::sync::Mutex;

pub use batch::{
    dead_letter, Batch, BatchLimits, Rows, RowsKind, TypedRows, PASSTHROUGH_RELAY_FIELDS,
};
pub use lane::{Lane, LaneConfig, FAILPOINT_AFTER_INSERT_BEFORE_CURSOR, FAILPOINT_ENV};
pub use route::{Route, Router, UNROUTED_LANE};
pub use tail::Tail;

/// Why a lane stopped.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The WAL failed (corruption, I/O); the relay must stop and an operator must look.
    #[error("WAL error in lane {lane}")]
    Wal {
        /// Lane that hit it.
        lane: String,
        /// The WAL's error.
        #[source]
        source: WalError,
    },
    /// Writing the ledger failed for good (an fsync error, corruption): the relay must stop.
    #[error("ledger commit failed")]
    Ledger(#[source] WalError),
    /// The disk is too full to write the ledger, even with the WAL's reserve given up, or no file
    /// descriptor is free to write it. Transient: nothing changed on disk, and the same commit is
    /// retried once space (or a descriptor) returns.
    #[error("ledger commit waits for disk space")]
    LedgerDiskFull(#[source] WalError),
    /// Shutdown interrupted a batch that could not be inserted in time; it stays in flight in the
    /// ledger and is re-cut at the next start.
    #[error("lane {lane} stopped with a batch in flight (it is retried at the next start)")]
    Interrupted {
        /// Lane that was interrupted.
        lane: String,
    },
}

/// A lane the ledger knew that the configuration no longer has, as it was dropped at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleLane {
    /// The lane's name (its table).
    pub lane: String,
    /// Its cursor: records of the lane below it had reached ClickHouse.
    pub cursor: Option<Lsn>,
    /// Its abandoned in-flight batch, whose insert may or may not have happened.
    pub inflight: Option<InflightBatch>,
}

/// The ledger shared by the lanes: cursors and in-flight batches, committed atomically.
///
/// Commits are grouped: a lane applies its change in memory, then waits for a write that covers
/// it. One write runs at a time; the lanes whose changes arrived meanwhile are all covered by the
/// next one, which writes the whole ledger as it then stands. A change is durable when its call
/// returns `Ok`, as before, and lanes that flush together pay for one write instead of one each.
#[derive(Debug)]
pub struct LedgerKeeper {
    /// The WAL that stores the ledger and applies retention after each commit.
    wal: Wal,
    /// The ledger as last committed plus in-memory cursor moves of idle lanes, and what was
    /// last written. Never held across a write.
    state: Mutex<KeeperState>,
    /// Held for the duration of one write: writes happen one at a time, in order.
    writing: Mutex<()>,
}

/// The keeper's ledger in memory and on disk.
#[derive(Debug)]
struct KeeperState {
    /// The current ledger: committed state plus in-memory changes.
    ledger: Ledger,
    /// The ledger as last written to disk, so a periodic commit with nothing new writes nothing
    /// (every write needs a free block, which a full disk does not have).
    committed: Ledger,
    /// Changes applied to `ledger` so far, counted from the load.
    changes: u64,
    /// Of those, how many the last successful write covered.
    written: u64,
}

impl LedgerKeeper {
    /// Loads the ledger from the WAL directory.
    pub fn load(wal: Wal) -> Result<Arc<LedgerKeeper>, WalError> {
        let ledger = wal.load_ledger()?;
        Ok(Arc::new(LedgerKeeper {
            wal,
            state: Mutex::new(KeeperState {
                committed: ledger.clone(),
                ledger,
                changes: 0,
                written: 0,
            }),
            writing: Mutex::new(()),
        }))
    }

    /// The committed state of one lane: its cursor (if any) and in-flight batch (if any).
    pub async fn lane_state(&self, lane: &str) -> (Option<Lsn>, Option<InflightBatch>) {
        let state = self.state.lock().await;
        let ledger = &state.ledger;
        (
            ledger.cursors.get(lane).copied(),
            ledger.inflight.get(lane).cloned(),
        )
    }

    /// Registers a lane's cursor if it has none, so retention waits for a lane that has not run yet.
    pub async fn register(&self, lane: &str, cursor: Lsn) {
        let mut state = self.state.lock().await;
        state
            .ledger
            .cursors
            .entry(lane.to_string())
            .or_insert(cursor);
    }

    /// Makes the ledger's lanes exactly `lanes` and commits once, before any lane starts.
    ///
    /// Every lane in `lanes` without a cursor is registered at `first_lsn` (the oldest record the
    /// WAL holds). Lanes start one by one and the first one to commit a batch also applies
    /// retention; a lane not registered by then would not hold back the segments it has yet to
    /// read, and a first start with a full budget would delete them under it.
    ///
    /// Cursors and in-flight batches of lanes not in `lanes` (a `[[drain.passthrough]]` route or
    /// table that was removed) are dropped and returned for the caller to report: nothing would
    /// ever move them again, so they would pin the WAL for good and ingest would stop once the
    /// budget filled. Their in-flight batch is abandoned, not finished: with its route gone no
    /// lane can re-cut it, and its records stay readable in the WAL until retention frees them.
    pub async fn register_lanes(
        &self,
        lanes: &[String],
        first_lsn: Lsn,
    ) -> Result<Vec<StaleLane>, DrainError> {
        let mut state = self.state.lock().await;
        let ledger = &mut state.ledger;
        let known = |lane: &String| lanes.contains(lane);
        let mut stale: Vec<StaleLane> = ledger
            .cursors
            .keys()
            .chain(ledger.inflight.keys())
            .filter(|lane| !known(lane))
            .map(|lane| StaleLane {
                lane: lane.clone(),
                cursor: ledger.cursors.get(lane).copied(),
                inflight: ledger.inflight.get(lane).cloned(),
            })
            .collect();
        stale.sort_by(|a, b| a.lane.cmp(&b.lane));
        stale.dedup_by(|a, b| a.lane == b.lane);
        for gone in &stale {
            ledger.cursors.remove(&gone.lane);
            ledger.inflight.remove(&gone.lane);
        }
        for lane in lanes {
            ledger.cursors.entry(lane.clone()).or_insert(first_lsn);
        }
        let change = state.changed();
        drop(state);
        self.write_covering(change).await?;
        Ok(stale)
    }

    /// Moves a lane's cursor in memory; it is persisted with the next commit.
    /// Only safe for positions below which every record of the lane is already in ClickHouse.
    pub async fn note_cursor(&self, lane: &str, cursor: Lsn) {
        let mut state = self.state.lock().await;
        let entry = state
            .ledger
            .cursors
            .entry(lane.to_string())
            .or_insert(cursor);
        debug_assert!(*entry <= cursor, "a lane cursor never moves back");
        *entry = cursor;
    }

    /// Records a batch as in flight and commits, before it is inserted.
    ///
    /// On [`DrainError::LedgerDiskFull`] the batch stays recorded in memory (a later commit may
    /// write it, which is harmless: the batch is re-cut identically) and the caller retries the
    /// same call once space returns, before inserting.
    pub async fn begin(&self, lane: &str, batch: InflightBatch) -> Result<(), DrainError> {
        let change = {
            let mut state = self.state.lock().await;
            state.ledger.inflight.insert(lane.to_string(), batch);
            state.changed()
        };
        self.write_covering(change).await
    }

    /// Clears a lane's in-flight batch, moves its cursor and commits, after the insert succeeded.
    /// On [`DrainError::LedgerDiskFull`] the caller retries the same call.
    pub async fn finish(&self, lane: &str, cursor: Lsn) -> Result<(), DrainError> {
        let change = {
            let mut state = self.state.lock().await;
            state.ledger.inflight.remove(lane);
            state.ledger.cursors.insert(lane.to_string(), cursor);
            state.changed()
        };
        self.write_covering(change).await
    }

    /// Commits the in-memory state if it changed since the last write (used periodically so
    /// idle lanes release segments). With nothing new it only applies retention, which deletes
    /// files and so needs no free block.
    pub async fn commit(&self) -> Result<(), DrainError> {
        let writing = self.writing.lock().await;
        let (snapshot, covers) = {
            let state = self.state.lock().await;
            (state.ledger != state.committed).then(|| (state.ledger.clone(), state.changes))
        }
        .unzip();
        match (snapshot, covers) {
            (Some(snapshot), Some(covers)) => self.write(snapshot, covers).await,
            _ => {
                drop(writing);
                let wal = self.wal.clone();
                blocking(move || wal.enforce_retention())
                    .await
                    .map_err(DrainError::Ledger)
            }
        }
    }

    /// The lowest position any lane still needs.
    pub async fn low_watermark(&self) -> Option<Lsn> {
        let state = self.state.lock().await;
        let ledger = &state.ledger;
        let cursors = ledger.cursors.values().copied();
        let inflight = ledger.inflight.values().map(|b| b.first);
        cursors.chain(inflight).min()
    }

    /// Returns once a successful write covers change number `change` ([`KeeperState::changed`]):
    /// one that started after it, or the one this call makes when none has.
    async fn write_covering(&self, change: u64) -> Result<(), DrainError> {
        let _writing = self.writing.lock().await;
        let (snapshot, covers) = {
            let state = self.state.lock().await;
            if state.written >= change {
                return Ok(());
            }
            (state.ledger.clone(), state.changes)
        };
        self.write(snapshot, covers).await
    }

    /// Writes `snapshot`, the ledger with its first `covers` changes; the caller holds `writing`.
    async fn write(&self, snapshot: Ledger, covers: u64) -> Result<(), DrainError> {
        let wal = self.wal.clone();
        let written = snapshot.clone();
        // The commit does an fsync, a rename and a directory fsync: keep it off the async workers.
        match blocking(move || wal.commit_ledger(&snapshot)).await {
            Ok(()) => {
                let mut state = self.state.lock().await;
                state.committed = written;
                state.written = state.written.max(covers);
                Ok(())
            }
            // A full disk and a lack of file descriptors pass on their own; nothing changed on
            // disk, so the same commit is retried.
            Err(error) if error.is_transient() => Err(DrainError::LedgerDiskFull(error)),
            Err(error) => Err(DrainError::Ledger(error)),
        }
    }
}

impl KeeperState {
    /// Counts a change just applied to the ledger and returns its number.
    fn changed(&mut self) -> u64 {
        self.changes += 1;
        self.changes
    }
}

/// Runs a blocking WAL call on the blocking pool.
async fn blocking(
    call: impl FnOnce() -> Result<(), WalError> + Send + 'static,
) -> Result<(), WalError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Cancelled only when the runtime shuts down; a ledger commit is atomic, so the ledger
        // on disk is the old one or the new one.
        Err(_) => Err(WalError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::time::Duration;

    use prism_wal::{Envelope, InflightBatch, Lsn, Retention, StreamSeq, Wal, WalOptions};

    use super::LedgerKeeper;

    /// Segments so small that a few records roll over, and no retention of released segments,
    /// so a commit deletes at once whatever the ledger releases.
    fn tiny_wal(dir: &std::path::Path) -> Wal {
        let options = WalOptions {
            segment_bytes_max: 1_024,
            group_bytes_max: 64 * 1_024,
            budget_bytes_max: 1 << 30,
            retention: Retention {
                bytes_max: 0,
                segments_max: 0,
                age_max: Duration::ZERO,
            },
            ..WalOptions::default()
        };
        Wal::open(dir, options).expect("open WAL").0
    }

    async fn append(wal: &Wal, count: u64) {
        for seq in 1..=count {
            let payload = vec![b'x'; 200];
            let envelope = Envelope {
                stream: Cow::Borrowed("S"),
                stream_seq: StreamSeq(seq),
                subject: Cow::Borrowed("trade.binance.spot.BTC-USDT"),
                headers: Vec::new(),
                published_ns: 0,
                payload: Cow::Owned(payload),
            };
            wal.append(&[envelope]).await.expect("append");
        }
    }

    #[tokio::test]
    async fn a_lane_removed_from_the_configuration_loses_its_cursor_and_in_flight_batch_so_retention_moves(
    ) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let wal = tiny_wal(dir.path());
        append(&wal, 40).await;
        let first = wal.stats().first_lsn;
        let end = Lsn(wal.durable_lsn().0 + 1);
        {
            // An earlier run had a passthrough lane that stopped at the start of the WAL with a
            // batch in flight.
            let keeper = LedgerKeeper::load(wal.clone()).expect("load ledger");
            keeper.note_cursor("tickers", first).await;
            let batch = InflightBatch {
                first,
                last: Lsn(first.0 + 2),
                rows: 3,
            };
            keeper.begin("tickers", batch).await.expect("commit");
        }

        // This run's configuration no longer routes to `tickers`.
        let keeper = LedgerKeeper::load(wal.clone()).expect("load ledger");
        let lanes = ["trades".to_string()];
        keeper
            .register_lanes(&lanes, first)
            .await
            .expect("register lanes");
        keeper.finish("trades", end).await.expect("commit");

        let ledger = wal.load_ledger().expect("load ledger");
        assert!(!ledger.cursors.contains_key("tickers"), "{ledger:?}");
        assert!(!ledger.inflight.contains_key("tickers"), "{ledger:?}");
        assert!(
            wal.stats().first_lsn > first,
            "retention released nothing: {:?}",
            wal.stats()
        );
    }

    #[tokio::test]
    async fn a_ledger_commit_out_of_file_descriptors_is_transient_for_the_lane_and_the_retry_writes_it(
    ) {
        /// errno of "too many open files" in this process (Linux).
        const EMFILE: i32 = 24;
        let fs = prism_wal::FaultyFs::new();
        let dir = std::path::Path::new("/wal");
        let (wal, _) =
            Wal::open_with_fs(dir, WalOptions::default(), Arc::new(fs.clone())).expect("open WAL");
        append(&wal, 3).await;
        let keeper = LedgerKeeper::load(wal.clone()).expect("load ledger");
        fs.fail_with_errno("wal::ledger::create", 1, EMFILE);
        let error = keeper
            .finish("trades", Lsn(4))
            .await
            .expect_err("no descriptor for ledger.tmp");
        assert!(
            matches!(error, super::DrainError::LedgerDiskFull(_)),
            "{error:?}"
        );
        keeper.finish("trades", Lsn(4)).await.expect("retry");
        let ledger = wal.load_ledger().expect("load ledger");
        assert_eq!(ledger.cursors.get("trades"), Some(&Lsn(4)));
    }

    #[tokio::test]
    async fn lanes_committing_together_share_ledger_writes_and_each_returns_only_once_written() {
        const LANES: u64 = 8;
        let fs = prism_wal::FaultyFs::new();
        let dir = std::path::Path::new("/wal");
        let (wal, _) =
            Wal::open_with_fs(dir, WalOptions::default(), Arc::new(fs.clone())).expect("open WAL");
        append(&wal, LANES).await;
        let keeper = LedgerKeeper::load(wal.clone()).expect("load ledger");
        // A slow disk: each write takes a while, so the lanes arrive while one runs.
        fs.set_sync_delay(Some(Duration::from_millis(50)));
        let before = fs.count("wal::ledger::create");
        let lanes: Vec<String> = (1..=LANES).map(|i| format!("lane{i}")).collect();
        let begins = lanes.iter().zip(1..).map(|(lane, i)| {
            let keeper = Arc::clone(&keeper);
            let wal = wal.clone();
            async move {
                let batch = InflightBatch {
                    first: Lsn(i),
                    last: Lsn(i),
                    rows: 1,
                };
                keeper.begin(lane, batch).await.expect("commit");
                // Returned: the batch is on disk, whoever wrote it.
                let on_disk = wal.load_ledger().expect("load ledger");
                assert_eq!(on_disk.inflight.get(lane.as_str()), Some(&batch), "{lane}");
            }
        });
        futures_util::future::join_all(begins).await;
        let writes = fs.count("wal::ledger::create") - before;
        assert!(
            (1..LANES / 2).contains(&writes),
            "{LANES} lanes' changes took {writes} ledger writes"
        );
        let ledger = wal.load_ledger().expect("load ledger");
        assert_eq!(ledger.inflight.len() as u64, LANES);
    }

    #[tokio::test]
    async fn a_lane_registered_at_start_up_keeps_its_segments_while_another_lane_commits_past_them()
    {
        let dir = tempfile::tempdir().expect("temporary directory");
        let wal = tiny_wal(dir.path());
        append(&wal, 40).await;
        let first = wal.stats().first_lsn;
        let end = Lsn(wal.durable_lsn().0 + 1);
        let keeper = LedgerKeeper::load(wal.clone()).expect("load ledger");

        let lanes = ["early".to_string(), "late".to_string()];
        keeper
            .register_lanes(&lanes, first)
            .await
            .expect("register lanes");
        // The first lane to start drains everything and commits before the second one starts.
        keeper.finish("early", end).await.expect("commit");

        assert_eq!(
            wal.stats().first_lsn,
            first,
            "a segment the late lane needs was deleted"
        );
        let mut reader = wal
            .reader(first)
            .expect("the late lane can still read from the start");
        let record = reader.next().expect("read").expect("a record");
        assert_eq!(record.lsn, first);
        let state = keeper.lane_state("late").await;
        assert_eq!(state.0, Some(first));
    }
}
