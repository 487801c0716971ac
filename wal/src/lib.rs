//! `prism-wal`: a segmented, checksummed write-ahead log with group commit, a cursor ledger
//! and retention, built for prism-relay (JetStream -> WAL -> ClickHouse).
//!
//! Main types:
//! - [`Wal`]: the handle (cheap to clone). [`Wal::append`] hands records to a dedicated writer
//!   thread that batches concurrent appends into one write and one `fdatasync` (group commit)
//!   and returns the [`LsnRange`] they were given once that `fdatasync` has returned.
//! - [`Envelope`]: the body of every record (a JetStream message), encoded with bincode 1.3.3.
//! - [`Reader`]: tails durable records from any [`Lsn`], across segments, yielding [`RecordRef`]s
//!   that borrow from its read buffer.
//! - [`Ledger`]: named cursors and in-flight batches, written atomically next to the segments;
//!   [`Wal::commit_ledger`] also applies [`Retention`] and frees the disk budget.
//! - [`CommitObserver`]: told of every group commit (records, bytes, fsync time), so the relay
//!   can keep latency histograms without this crate depending on a metrics library.
//! - [`Recovery`]: what [`Wal::open`] found (torn tails are outcomes, not errors, unless
//!   [`RecoveryMode::Strict`]).
//! - One writer per directory: [`Wal::open`] takes an exclusive advisory lock on [`LOCK_FILE`]
//!   and fails with [`WalError::Locked`] while another process (or `Wal`) holds it; the kernel
//!   drops the lock when its process dies, so a crash never leaves a stale lock.
//! - [`FileSystem`]: every file operation goes through it; [`StdFs`] is the real one and
//!   [`FaultyFs`] an in-memory one that injects fsync errors, ENOSPC, short and torn writes and crashes.
//! - [`verify()`], [`list_segments`], [`read_dir`], [`retention_plan`], [`quarantine_segment`]:
//!   offline tools for operators (`prism-relay wal verify|inspect|dump`). The read-only ones work
//!   next to a running relay ([`read_dir`] stops at the durable mark the writer publishes after
//!   every fdatasync); [`quarantine_segment`] takes the lock.
//!
//! The on-disk layout is drawn in [`segment`]. Invariants this crate upholds: a record is handed
//! out only after its CRC checks and only once an `fdatasync` covering it has returned; an
//! `fsync` error poisons the log for good (never retried); corruption outside the torn tail of the
//! last segment is reported, never skipped; a segment is deleted only once every cursor is past it.

mod envelope;
mod error;
pub mod fault;
mod fs;
#[doc(hidden)]
pub mod fuzzing;
mod ledger;
mod mark;
mod observe;
mod reader;
mod retention;
pub mod segment;
mod tools;
mod types;
mod wal;
mod writer;

pub use envelope::Envelope;
pub use error::WalError;
pub use fault::FaultyFs;
pub use fs::{FileMeta, FileSystem, StdFs, WalFile, WalLock};
pub use ledger::{InflightBatch, Ledger};
pub use mark::DURABLE_MARK_FILE;
pub use observe::CommitObserver;
pub use reader::{Reader, RecordRef};
pub use tools::{
    list_segments, list_segments_with_fs, load_ledger, quarantine_segment,
    quarantine_segment_with_fs, read_dir, read_dir_with_fs, retention_plan, verify, verify_with_fs,
    verify_with_options, RetentionPlan, SegmentFate, SegmentInfo, SegmentProblem, VerifyReport,
    QUARANTINE_DIR,
};
pub use types::{Lsn, LsnRange, SegmentId, StreamSeq};
pub use wal::{
    Recovery, RecoveryMode, Retention, TornTail, Wal, WalOptions, WalStats, LEDGER_RESERVE_BYTES,
    LOCK_FILE, RESERVE_FILE,
};

/// Largest record body in bytes. Checked before a record is written and after it is read, so
/// a garbled length can never make the reader allocate more than this.
pub const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Most records one [`Wal::append`] call may carry (a JetStream fetch batch is a few hundred);
/// bounds the memory one caller can queue in the shared group buffer.
pub const APPEND_RECORDS_MAX: usize = 65_536;

/// How many bytes the reader pulls from a segment per read when it refills its buffer.
pub const READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Largest ledger body in bytes (cursors and in-flight batches are few: one per table).
pub const LEDGER_BYTES_MAX: usize = 1024 * 1024;

// The framing stores the body length in a u32.
const _: () = assert!(RECORD_BYTES_MAX <= u32::MAX as usize);
// A read chunk must at least hold a record header so a refill always makes progress.
const _: () = assert!(READ_CHUNK_BYTES >= segment::RECORD_HEADER_BYTES);
const _: () = assert!(LEDGER_BYTES_MAX <= u32::MAX as usize);
