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
pub mod route;

use std::sync::Arc;

use prism_wal::{InflightBatch, Ledger, Lsn, Wal, WalError};
use tokio::sync::Mutex;

pub use batch::{dead_letter, Batch, BatchLimits, Rows, RowsKind, TypedRows};
pub use lane::{Lane, LaneConfig};
pub use route::{Route, Router, UNROUTED_LANE};

/// Why a lane stopped.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The WAL failed (corruption, I/O); the relay must stop and an operator must look.
    #[error("WAL error in lane {lane}: {source}")]
    Wal {
        /// Lane that hit it.
        lane: String,
        /// The WAL's error.
        #[source]
        source: WalError,
    },
    /// Writing the ledger failed for good (an fsync error, corruption): the relay must stop.
    #[error("ledger commit failed: {0}")]
    Ledger(#[source] WalError),
    /// The disk is too full to write the ledger, even with the WAL's reserve given up. Transient:
    /// nothing changed on disk, and the same commit is retried once space returns.
    #[error("ledger commit waits for disk space: {0}")]
    LedgerDiskFull(#[source] WalError),
    /// Shutdown interrupted a batch that could not be inserted in time; it stays in flight in the
    /// ledger and is re-cut at the next start.
    #[error("lane {lane} stopped with a batch in flight (it is retried at the next start)")]
    Interrupted {
        /// Lane that was interrupted.
        lane: String,
    },
}

/// The ledger shared by the lanes: cursors and in-flight batches, committed atomically.
#[derive(Debug)]
pub struct LedgerKeeper {
    /// The WAL that stores the ledger and applies retention after each commit.
    wal: Wal,
    /// The ledger as last committed plus in-memory cursor moves of idle lanes, and what was
    /// last written.
    state: Mutex<KeeperState>,
}

/// The keeper's ledger in memory and on disk.
#[derive(Debug)]
struct KeeperState {
    /// The current ledger: committed state plus in-memory changes.
    ledger: Ledger,
    /// The ledger as last written to disk, so a periodic commit with nothing new writes nothing
    /// (every write needs a free block, which a full disk does not have).
    committed: Ledger,
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
            }),
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
        let mut state = self.state.lock().await;
        state.ledger.inflight.insert(lane.to_string(), batch);
        self.commit_locked(&mut state).await
    }

    /// Clears a lane's in-flight batch, moves its cursor and commits, after the insert succeeded.
    /// On [`DrainError::LedgerDiskFull`] the caller retries the same call.
    pub async fn finish(&self, lane: &str, cursor: Lsn) -> Result<(), DrainError> {
        let mut state = self.state.lock().await;
        state.ledger.inflight.remove(lane);
        state.ledger.cursors.insert(lane.to_string(), cursor);
        self.commit_locked(&mut state).await
    }

    /// Commits the in-memory state if it changed since the last write (used periodically so
    /// idle lanes release segments). With nothing new it only applies retention, which deletes
    /// files and so needs no free block.
    pub async fn commit(&self) -> Result<(), DrainError> {
        let mut state = self.state.lock().await;
        if state.ledger == state.committed {
            drop(state);
            let wal = self.wal.clone();
            return blocking(move || wal.enforce_retention())
                .await
                .map_err(DrainError::Ledger);
        }
        self.commit_locked(&mut state).await
    }

    /// The lowest position any lane still needs.
    pub async fn low_watermark(&self) -> Option<Lsn> {
        let state = self.state.lock().await;
        let ledger = &state.ledger;
        let cursors = ledger.cursors.values().copied();
        let inflight = ledger.inflight.values().map(|b| b.first);
        cursors.chain(inflight).min()
    }

    async fn commit_locked(&self, state: &mut KeeperState) -> Result<(), DrainError> {
        let wal = self.wal.clone();
        let snapshot = state.ledger.clone();
        let written = snapshot.clone();
        // The commit does an fsync, a rename and a directory fsync: keep it off the async workers.
        match blocking(move || wal.commit_ledger(&snapshot)).await {
            Ok(()) => {
                state.committed = written;
                Ok(())
            }
            Err(error @ WalError::DiskFull { .. }) => Err(DrainError::LedgerDiskFull(error)),
            Err(error) => Err(DrainError::Ledger(error)),
        }
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
