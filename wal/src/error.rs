//! [`WalError`]: every failure the WAL reports, with structured fields.

use crate::types::{Lsn, SegmentId};
use std::path::PathBuf;
use std::sync::Arc;

/// Errors of the WAL. Cloneable so one failed group can report the same error to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    /// An I/O operation failed.
    #[error("{op} failed on {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The disk is full (ENOSPC): nothing of the failed append was written and its LSNs were not
    /// consumed; appends succeed again once space is freed.
    #[error("disk full while writing {path}")]
    DiskFull {
        /// The segment being written.
        path: PathBuf,
    },
    /// The process (EMFILE) or the system (ENFILE) is out of file descriptors while a file (a
    /// segment, `ledger.tmp`, the reserve) or the directory was being created or opened: nothing
    /// of the failed call took effect (an append's LSNs were not consumed, the ledger in force
    /// is the old one, a reader stays where it was), and the same call succeeds again once
    /// descriptors are free.
    #[error("out of file descriptors while creating or opening {path}")]
    FilesExhausted {
        /// The file (or the directory) being opened.
        path: PathBuf,
    },
    /// An fsync failed earlier: the writer stopped for good. Restart to recover from disk.
    #[error("write-ahead log poisoned: {reason}")]
    Poisoned {
        /// What failed.
        reason: String,
    },
    /// The WAL was closed.
    #[error("write-ahead log is closed")]
    Closed,
    /// A record or segment header failed its checks somewhere a torn tail cannot be.
    #[error("corrupt record in segment {segment} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        segment: SegmentId,
        /// Byte offset of the bad record (or header) in the segment.
        offset: u64,
        /// Which check failed.
        reason: String,
    },
    /// Strict recovery found a torn tail.
    #[error(
        "torn tail in segment {segment} at offset {offset} ({bytes} bytes) under strict recovery"
    )]
    TornTail {
        /// The last segment.
        segment: SegmentId,
        /// Offset where the valid log ends.
        offset: u64,
        /// Bytes after it.
        bytes: u64,
    },
    /// The requested LSN was deleted by retention.
    #[error("lsn {requested} is gone: the oldest record kept is {first_available}")]
    Truncated {
        /// What was asked for.
        requested: Lsn,
        /// The oldest LSN still on disk.
        first_available: Lsn,
    },
    /// A record body is larger than [`crate::RECORD_BYTES_MAX`].
    #[error("record of {bytes} bytes exceeds the limit of {bytes_max} bytes")]
    RecordTooLarge {
        /// Size of the encoded body.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// An append with more than [`crate::APPEND_RECORDS_MAX`] records.
    #[error("append of {records} records exceeds the limit of {records_max}")]
    TooManyRecords {
        /// Records in the call.
        records: usize,
        /// The limit.
        records_max: usize,
    },
    /// An append with no records.
    #[error("append of zero records")]
    EmptyAppend,
    /// Encoding an envelope failed.
    #[error("cannot encode envelope: {reason}")]
    Encode {
        /// The encoder's message.
        reason: String,
    },
    /// A record body does not decode as an envelope.
    #[error("cannot decode envelope of lsn {lsn}: {reason}")]
    Decode {
        /// The record.
        lsn: Lsn,
        /// The decoder's message.
        reason: String,
    },
    /// The ledger file fails its checks.
    #[error("ledger {path} is corrupt: {reason}")]
    LedgerCorrupt {
        /// The ledger file.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// The ledger has more entries or bytes than allowed.
    #[error("ledger too large: {reason}")]
    LedgerTooLarge {
        /// Which limit.
        reason: String,
    },
    /// Options out of range.
    #[error("invalid WAL options: {reason}")]
    InvalidOptions {
        /// Which option.
        reason: String,
    },
    /// Another writer holds the WAL directory's lock: another process (a second relay started
    /// on the same volume), or another [`crate::Wal`] open on it in this process.
    #[error(
        "write-ahead log {dir} is locked: another process (or another open Wal in this process) \
         holds it; stop that relay (or close that Wal) first, or give this one its own WAL \
         directory. The lock goes away with its holder, so a left-over LOCK file is harmless"
    )]
    Locked {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// The directory's lock file is not a plain file of its own (a symbolic link, a FIFO, a
    /// directory...): someone else may have planted it, so the WAL neither follows nor writes it.
    #[error(
        "lock file {path} is unsafe to use ({reason}): remove it (the WAL creates a fresh one) \
         and check who can write to the WAL directory"
    )]
    UnsafeLockFile {
        /// The lock file.
        path: PathBuf,
        /// What it is instead of a plain file.
        reason: String,
    },
    /// A segment was written in another on-disk format (by another version of the WAL): its
    /// header is whole and its checksum holds, but the version is not [`crate::segment::SEGMENT_VERSION`].
    /// Never a torn tail, so recovery neither truncates nor rewrites it.
    #[error(
        "segment {path} is in WAL format version {found}, this build reads version {supported}: \
         drain it with the relay version that wrote it (or move the WAL directory aside and start \
         with an empty one)"
    )]
    FormatVersion {
        /// The segment.
        path: PathBuf,
        /// The version in its header.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A file in the WAL directory is not what its name says.
    #[error("segment {path} is unusable: {reason}")]
    BadSegment {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Displays an error with its causes, `error: cause: cause of the cause`, each once.
///
/// The errors of this workspace follow one rule: a message does not repeat its cause, which
/// [`std::error::Error::source`] returns instead; this walks that chain. Errors of other crates do
/// not all follow it (some print their cause in their own message and return it as the source
/// too), so a cause whose text is already shown is skipped rather than said twice. Log lines use it
/// (`error = %ErrorChain(&error)`) so they carry the whole story, like the binary's last message.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !text.is_empty() && !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            cause = error.source();
        }
        f.write_str(&shown)
    }
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WalError::Io {
            op,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// Like [`WalError::io`] for an operation that opens a file or a directory: running out of
    /// file descriptors there is [`WalError::FilesExhausted`], which callers retry.
    pub(crate) fn io_opening(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        if crate::fs::is_files_exhausted(&source) {
            WalError::FilesExhausted { path: path.into() }
        } else {
            WalError::io(op, path, source)
        }
    }

    /// Whether the writer is dead for good (an fsync failed).
    pub fn is_fatal(&self) -> bool {
        matches!(self, WalError::Poisoned { .. })
    }

    /// Whether the failure is expected to pass on its own (disk space or file descriptors run
    /// out): nothing was written, the WAL lives on, and the same append may be retried later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WalError::DiskFull { .. } | WalError::FilesExhausted { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of another crate that quotes its cause and returns it as the source as well.
    #[derive(Debug)]
    struct Quoting(std::io::Error);

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "IO error: {}", self.0)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once_after_a_message_that_leaves_it_out() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = WalError::io("open segment", "/wal/1.wal", io());
        assert_eq!(error.to_string(), "open segment failed on /wal/1.wal");
        assert_eq!(
            ErrorChain(&error).to_string(),
            "open segment failed on /wal/1.wal: no such file"
        );
        let quoting = Quoting(io());
        assert_eq!(ErrorChain(&quoting).to_string(), "IO error: no such file");
    }
}
