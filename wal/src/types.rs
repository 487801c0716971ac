//! Position newtypes shared by every module: [`Lsn`], [`SegmentId`], [`StreamSeq`], [`LsnRange`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// Log sequence number: the number of a record. Records start at `Lsn(1)`; `Lsn(0)` means
/// "nothing yet".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The LSN before any record.
    pub const ZERO: Lsn = Lsn(0);

    /// The LSN right after this one.
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A JetStream stream sequence.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct StreamSeq(pub u64);

impl fmt::Display for StreamSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A segment, identified by the LSN of its first record (which is also its file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SegmentId(pub u64);

impl SegmentId {
    /// The first LSN the segment holds.
    pub fn first_lsn(self) -> Lsn {
        Lsn(self.0)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020}.wal", self.0)
    }
}

/// An inclusive range of LSNs given to one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsnRange {
    /// First LSN of the range.
    pub first: Lsn,
    /// Last LSN of the range (inclusive).
    pub last: Lsn,
}

impl LsnRange {
    /// Number of records in the range.
    pub fn len(&self) -> u64 {
        self.last.0 + 1 - self.first.0
    }

    /// Ranges handed out by the WAL are never empty; this exists for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.last.0 < self.first.0
    }
}

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_be_shared_across_threads_and_tasks() {
        send_sync::<crate::Wal>();
        send_sync::<crate::FaultyFs>();
        fn send<T: Send>() {}
        send::<crate::Reader>();
    }

    #[test]
    fn lsn_display_and_order() {
        use super::Lsn;
        assert_eq!(Lsn(42).to_string(), "42");
        assert!(Lsn(1) < Lsn(2));
        assert_eq!(Lsn(1).next(), Lsn(2));
        assert_eq!(super::SegmentId(3).to_string(), "00000000000000000003.wal");
    }
}
