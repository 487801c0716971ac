//! The commit observer: how a user of the WAL learns of each group commit without this crate
//! knowing any metrics library.
//!
//! The writer thread calls [`CommitObserver::group_committed`] once per successful group
//! commit, after its fdatasync returned and before the appenders are answered. The call runs on
//! the writer thread, between two groups, so an implementation must be cheap and must not block
//! (update a few atomics; no I/O, no lock another thread holds for long).

use std::time::Duration;

/// Receives one call per successful group commit (see the module documentation).
pub trait CommitObserver: Send + Sync {
    /// A group of `records` records (`bytes` bytes) was written and synced; its fdatasync
    /// calls took `fsync` in total (a group larger than `group_bytes_max` is synced per chunk).
    fn group_committed(&self, records: u64, bytes: u64, fsync: Duration);
}
