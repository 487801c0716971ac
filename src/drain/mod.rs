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
    /// Writing the ledger failed.
    #[error("ledger commit failed: {0}")]
    Ledger(#[source] WalError),
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
    /// The ledger as last committed plus in-memory cursor moves of idle lanes.
    ledger: Mutex<Ledger>,
}

impl LedgerKeeper {
    /// Loads the ledger from the WAL directory.
    pub fn load(wal: Wal) -> Result<Arc<LedgerKeeper>, WalError> {
        let ledger = wal.load_ledger()?;
        Ok(Arc::new(LedgerKeeper {
            wal,
            ledger: Mutex::new(ledger),
        }))
    }

    /// The committed state of one lane: its cursor (if any) and in-flight batch (if any).
    pub async fn lane_state(&self, lane: &str) -> (Option<Lsn>, Option<InflightBatch>) {
        let ledger = self.ledger.lock().await;
        (
            ledger.cursors.get(lane).copied(),
            ledger.inflight.get(lane).cloned(),
        )
    }

    /// Registers a lane's cursor if it has none, so retention waits for a lane that has not run yet.
    pub async fn register(&self, lane: &str, cursor: Lsn) {
        let mut ledger = self.ledger.lock().await;
        ledger.cursors.entry(lane.to_string()).or_insert(cursor);
    }

    /// Moves a lane's cursor in memory; it is persisted with the next commit.
    /// Only safe for positions below which every record of the lane is already in ClickHouse.
    pub async fn note_cursor(&self, lane: &str, cursor: Lsn) {
        let mut ledger = self.ledger.lock().await;
        let entry = ledger.cursors.entry(lane.to_string()).or_insert(cursor);
        debug_assert!(*entry <= cursor, "a lane cursor never moves back");
        *entry = cursor;
    }

    /// Records a batch as in flight and commits, before it is inserted.
    pub async fn begin(&self, lane: &str, batch: InflightBatch) -> Result<(), DrainError> {
        let mut ledger = self.ledger.lock().await;
        ledger.inflight.insert(lane.to_string(), batch);
        self.commit_locked(&ledger).await
    }

    /// Clears a lane's in-flight batch, moves its cursor and commits, after the insert succeeded.
    pub async fn finish(&self, lane: &str, cursor: Lsn) -> Result<(), DrainError> {
        let mut ledger = self.ledger.lock().await;
        ledger.inflight.remove(lane);
        ledger.cursors.insert(lane.to_string(), cursor);
        self.commit_locked(&ledger).await
    }

    /// Commits the in-memory state (used periodically so idle lanes release segments).
    pub async fn commit(&self) -> Result<(), DrainError> {
        let ledger = self.ledger.lock().await;
        self.commit_locked(&ledger).await
    }

    /// The lowest position any lane still needs.
    pub async fn low_watermark(&self) -> Option<Lsn> {
        let ledger = self.ledger.lock().await;
        let cursors = ledger.cursors.values().copied();
        let inflight = ledger.inflight.values().map(|b| b.first);
        cursors.chain(inflight).min()
    }

    async fn commit_locked(&self, ledger: &Ledger) -> Result<(), DrainError> {
        let wal = self.wal.clone();
        let snapshot = ledger.clone();
        // The commit does an fsync, a rename and a directory fsync: keep it off the async workers.
        match tokio::task::spawn_blocking(move || wal.commit_ledger(&snapshot)).await {
            Ok(result) => result.map_err(DrainError::Ledger),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Cancelled only when the runtime shuts down; the commit is atomic, so the ledger
            // on disk is the old one or the new one.
            Err(_) => Err(DrainError::Interrupted {
                lane: "ledger".to_string(),
            }),
        }
    }
}
