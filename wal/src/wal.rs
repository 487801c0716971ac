//! [`Wal`]: opening (recovery), appending through the writer thread, readers, the ledger and
//! statistics. The shared state lives in [`Inner`]; the writer thread is in `writer`.

use crate::error::WalError;
use crate::fs::{write_all_at, FileSystem, StdFs, WalLock};
use crate::ledger::{self, Ledger, LEDGER_TMP_FILE};
use crate::reader::Reader;
use crate::segment::{
    self, parse_segment_name, segment_file_name, SegmentScan, Step, SEGMENT_HEADER_BYTES,
};
use crate::types::{Lsn, LsnRange, SegmentId};
use crate::writer::{Pending, WriterState};
use crate::Envelope;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, watch, Notify};

const MIB: u64 = 1024 * 1024;

/// Name of the lock file in the WAL directory. An open [`Wal`] (and [`crate::quarantine_segment`])
/// holds an exclusive advisory lock on it, so two writers never share a directory. The file
/// itself means nothing and is never written (nor followed if it is a symbolic link): it stays
/// behind after a clean close and after a crash, and the lock dies with the process that held it.
pub const LOCK_FILE: &str = "LOCK";

/// Name of the reserve file in the WAL directory: headroom held back so the ledger can still be
/// written when the disk is full (see [`Wal::ensure_reserve`]).
pub const RESERVE_FILE: &str = "reserve";

/// Size of the reserve file: room for the largest ledger plus its `ledger.tmp` (the old ledger
/// and the new one coexist until the rename), each rounded up by a filesystem block.
pub const LEDGER_RESERVE_BYTES: u64 =
    2 * (crate::LEDGER_BYTES_MAX + ledger::LEDGER_HEADER_BYTES + RESERVE_BLOCK_BYTES) as u64;

/// Filesystem block size assumed when sizing the reserve (the largest common one, 4 KiB).
const RESERVE_BLOCK_BYTES: usize = 4096;

/// Bytes written per call while filling the reserve file, so filling it needs no 2 MiB buffer.
const RESERVE_CHUNK_BYTES: usize = 64 * 1024;

/// Takes the exclusive lock of the WAL directory `dir` (which must exist), without waiting.
pub(crate) fn lock_dir(fs: &dyn FileSystem, dir: &Path) -> Result<WalLock, WalError> {
    let path = dir.join(LOCK_FILE);
    fs.lock_exclusive(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            WalError::Locked {
                dir: dir.to_path_buf(),
            }
        } else if e.raw_os_error() == Some(libc::ELOOP) {
            WalError::UnsafeLockFile {
                path,
                reason: "it is a symbolic link".to_string(),
            }
        } else if e.kind() == std::io::ErrorKind::InvalidData {
            WalError::UnsafeLockFile {
                path,
                reason: e.to_string(),
            }
        } else {
            WalError::io("lock", path, e)
        }
    })
}

/// What to do with a torn tail of the last segment at recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Truncate it (it was never acknowledged) and report it in [`Recovery::torn_tail`].
    #[default]
    TruncateTornTail,
    /// Refuse to open: a torn tail is an error too.
    Strict,
}

/// How long released (fully consumed) segments are kept for replay. A released segment is
/// deleted once any limit is exceeded (oldest first), or sooner when the disk budget needs room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Bytes of released segments kept.
    pub bytes_max: u64,
    /// Released segments kept.
    pub segments_max: u32,
    /// Age of a released segment, counted from when it was sealed.
    pub age_max: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            bytes_max: 1024 * MIB,
            segments_max: 16,
            age_max: Duration::from_secs(24 * 3600),
        }
    }
}

/// Options of [`Wal::open`]. `Default` gives production values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// Roll to a new segment once the active one has reached this many bytes (64 MiB).
    pub segment_bytes_max: u64,
    /// One write + fdatasync covers about this many bytes at most (4 MiB); appends wait while
    /// this much is already queued.
    pub group_bytes_max: usize,
    /// Total bytes of segments on disk; appends wait while at or over it (4 GiB).
    pub budget_bytes_max: u64,
    /// Retention of released segments.
    pub retention: Retention,
    /// Torn-tail policy at recovery.
    pub recovery_mode: RecoveryMode,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes_max: 64 * MIB,
            group_bytes_max: 4 * MIB as usize,
            budget_bytes_max: 4096 * MIB,
            retention: Retention::default(),
            recovery_mode: RecoveryMode::TruncateTornTail,
        }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<(), WalError> {
        let bad = |reason: &str| {
            Err(WalError::InvalidOptions {
                reason: reason.to_string(),
            })
        };
        if self.segment_bytes_max <= SEGMENT_HEADER_BYTES as u64 {
            return bad("segment_bytes_max must exceed the segment header");
        }
        if self.group_bytes_max <= segment::RECORD_HEADER_BYTES {
            return bad("group_bytes_max must exceed a record header");
        }
        if self.budget_bytes_max == 0 {
            return bad("budget_bytes_max must be positive");
        }
        Ok(())
    }
}

/// A torn tail found (and, unless strict, truncated) at recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The last segment.
    pub segment: SegmentId,
    /// Where the valid log ends (the file was truncated here).
    pub offset: u64,
    /// Bytes dropped.
    pub bytes_dropped: u64,
    /// What made the first dropped record invalid.
    pub reason: String,
}

/// What [`Wal::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segments found (0 for a new WAL).
    pub segments: usize,
    /// Oldest LSN on disk.
    pub first_lsn: Lsn,
    /// LSN the next record gets.
    pub next_lsn: Lsn,
    /// Records found in the last segment.
    pub tail_records: u64,
    /// The torn tail, if any.
    pub torn_tail: Option<TornTail>,
    /// LSNs the ledger had consumed but the log no longer held (its last segment quarantined or
    /// lost): numbering continued past them and readers cross the gap. `None` normally.
    pub lsn_gap: Option<LsnRange>,
}

/// Counters for metrics and `wal inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalStats {
    /// Bytes of all segments (durable lengths).
    pub bytes_on_disk: u64,
    /// Segment files.
    pub segments: usize,
    /// Oldest LSN on disk.
    pub first_lsn: Lsn,
    /// LSN the next appended record gets.
    pub next_lsn: Lsn,
    /// Last durable LSN.
    pub durable_lsn: Lsn,
    /// Every record up to this LSN is in a released (or deleted) segment.
    pub released_through: Lsn,
    /// Group commits (one write + one fdatasync each) since open.
    pub groups_committed: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SegMeta {
    /// Durable length in bytes.
    pub(crate) len: u64,
    /// When it stopped being the active segment.
    pub(crate) sealed_at: Option<SystemTime>,
}

/// What is on disk, as the writer and retention maintain it.
pub(crate) struct Segments {
    /// Every segment on disk; the last one is the active one.
    pub(crate) list: BTreeMap<SegmentId, SegMeta>,
    /// Last LSN covered by a returned fdatasync (readers stop here).
    pub(crate) durable_lsn: Lsn,
    /// Sum of the durable lengths of `list`.
    pub(crate) bytes_on_disk: u64,
    /// Records below it are consumed, from the last committed ledger; `None`: keep everything.
    pub(crate) release_point: Option<Lsn>,
    /// See [`WalStats::released_through`].
    pub(crate) released_through: Lsn,
    /// See [`WalStats::groups_committed`].
    pub(crate) groups_committed: u64,
}

/// State shared by the handles, the writer thread and the readers.
pub(crate) struct Inner {
    /// The WAL directory.
    pub(crate) dir: PathBuf,
    /// Every file operation goes through it.
    pub(crate) fs: Arc<dyn FileSystem>,
    /// Options given at open.
    pub(crate) opts: WalOptions,
    /// Records waiting for the writer (the group being formed) and the writer's state.
    pub(crate) pending: Mutex<Pending>,
    /// Wakes the writer when records are pending or the WAL closes.
    pub(crate) work: Condvar,
    /// Wakes appenders waiting for room in the pending buffer.
    pub(crate) drained: Notify,
    /// The segments on disk and the durable position; lock order: `pending` before `segs`.
    pub(crate) segs: Mutex<Segments>,
    /// The durable LSN, for ackers.
    pub(crate) durable_tx: watch::Sender<Lsn>,
    /// Bytes of segments on disk, for appenders waiting on the budget.
    pub(crate) disk_tx: watch::Sender<u64>,
    /// Told of every group commit; set at most once, by [`Wal::set_commit_observer`].
    pub(crate) observer: std::sync::OnceLock<Arc<dyn crate::CommitObserver>>,
    /// When the group commit under way (write and fdatasync) started; `None` between groups.
    pub(crate) commit_started: Mutex<Option<std::time::Instant>>,
}

impl Inner {
    pub(crate) fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        // The lock is never held across code that can panic on external data.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_segs(&self) -> MutexGuard<'_, Segments> {
        self.segs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn segment_path(&self, id: SegmentId) -> PathBuf {
        self.dir.join(segment_file_name(id))
    }
}

/// Stops the writer when the last [`Wal`] clone is dropped, then releases the directory lock.
struct Owner {
    /// The shared state the writer serves.
    inner: Arc<Inner>,
    /// Fires when the writer thread exits; taken by `close`.
    exited: Mutex<Option<oneshot::Receiver<()>>>,
    /// The writer thread; joined by `close`, or by the drop of the last clone.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The directory lock; released by `close` once the writer has stopped, or by the drop (the
    /// field drops after the writer thread is joined). Held while the ledger is written, so a
    /// ledger commit never runs after the lock is gone.
    dir_lock: Mutex<Option<WalLock>>,
    /// Whether the reserve file is known to be in place (read without the lock by ingest).
    reserve_held: AtomicBool,
    /// Whether the owner keeps a reserve at all (set by the first [`Wal::ensure_reserve`]); only
    /// then do appends wait for it.
    reserve_kept: AtomicBool,
    /// Serializes creating, releasing and checking the reserve file.
    reserve_lock: Mutex<()>,
}

impl Owner {
    fn lock_dir_lock(&self) -> MutexGuard<'_, Option<WalLock>> {
        self.dir_lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let mut p = self.inner.lock_pending();
        if p.state == WriterState::Running {
            p.state = WriterState::Closed;
        }
        drop(p);
        self.inner.work.notify_all();
        self.inner.drained.notify_waiters();
        self.inner.disk_tx.send_modify(|_| {});
        // Wait for the writer so the lock (dropped with this struct) outlives every write: once
        // the last handle is gone the directory can be opened again at once. The writer finishes
        // the group in flight and exits; it never waits for anything this thread holds.
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            // Never the writer itself (it holds no handle), but joining oneself would fail.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The write-ahead log. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (or creates) the WAL in `dir` on the real filesystem and recovers it.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovery), WalError> {
        Self::open_with_fs(dir, opts, Arc::new(StdFs))
    }

    /// Opens (or creates) the WAL in `dir` through `fs`. Recovery scans only the last segment,
    /// so start-up time does not grow with the size of the WAL.
    ///
    /// Takes the directory's lock (file [`LOCK_FILE`]) before touching anything else and holds
    /// it until [`Wal::close`] or the drop of the last clone: fails at once with
    /// [`WalError::Locked`] while another process or another `Wal` has the directory open.
    ///
    /// A bad record in the last segment is truncated as a torn tail only when it can be one (at
    /// most one unsynced chunk of `group_bytes_max` bytes follows it, no ledger position lies
    /// past it and the durable mark left by the previous writer does not cover it); otherwise
    /// open fails with [`WalError::Corrupt`] in every [`RecoveryMode`]. When
    /// the ledger names positions past the recovered log, numbering continues past all of them
    /// in a new segment, and [`Recovery::lsn_gap`] names the skipped LSNs.
    pub fn open_with_fs(
        dir: &Path,
        opts: WalOptions,
        fs: Arc<dyn FileSystem>,
    ) -> Result<(Wal, Recovery), WalError> {
        opts.validate()?;
        fs.create_dir_all(dir)
            .map_err(|e| WalError::io("create directory", dir, e))?;
        // Dropped on every early return below, which releases it.
        let dir_lock = lock_dir(&*fs, dir)?;
        // Read before anything rewrites it: the last LSN the previous writer saw fsynced.
        let mark = crate::mark::read(&*fs, dir);
        let tmp = dir.join(LEDGER_TMP_FILE);
        if fs.remove(&tmp).is_ok() {
            fs.sync_dir(dir)
                .map_err(|e| WalError::io("fsync directory", dir, e))?;
        }
        let ledger = ledger::load(&*fs, dir)?;
        let names = fs
            .list(dir)
            .map_err(|e| WalError::io("list directory", dir, e))?;
        let mut ids: Vec<SegmentId> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        ids.sort();
        let found = ids.len();

        // Every position the ledger names was durable once; the log must never hand out an LSN
        // below it again, or a lane whose cursor lies ahead would skip the new records.
        let ledger_end = ledger.end();
        let mut lsn_gap = None;
        let (active_id, file, active_len, next_lsn, tail_records, torn_tail) =
            match ids.last().copied() {
                None => {
                    let first = Lsn(ledger_end.0.max(1));
                    if first > Lsn(1) {
                        let gap = LsnRange {
                            first: Lsn(1),
                            last: Lsn(first.0 - 1),
                        };
                        crate::tools::write_gap_note(&*fs, dir, gap)?;
                        lsn_gap = Some(gap);
                    }
                    let id = SegmentId(first.0);
                    let file = create_segment(&*fs, dir, id)?;
                    (id, file, SEGMENT_HEADER_BYTES as u64, first, 0, None)
                }
                Some(id) => {
                    let evidence = Evidence { ledger_end, mark };
                    let r = recover_last(&*fs, dir, id, &opts, evidence)?;
                    // The last segment's directory entry may never have been fsynced (a crash
                    // or a failed rollover right after creating it): make it durable first.
                    fs.sync_dir(dir)
                        .map_err(|e| WalError::io("fsync directory", dir, e))?;
                    if r.next_lsn < ledger_end {
                        // The ledger is ahead of the log (its last segment was quarantined or
                        // lost): start a new segment past every ledger position, after noting
                        // the gap durably so readers may cross it.
                        let gap = LsnRange {
                            first: r.next_lsn,
                            last: Lsn(ledger_end.0 - 1),
                        };
                        crate::tools::write_gap_note(&*fs, dir, gap)?;
                        drop(r.file);
                        let id = SegmentId(ledger_end.0);
                        let file = create_segment(&*fs, dir, id)?;
                        ids.push(id);
                        lsn_gap = Some(gap);
                        (
                            id,
                            file,
                            SEGMENT_HEADER_BYTES as u64,
                            ledger_end,
                            0,
                            r.torn_tail,
                        )
                    } else {
                        (id, r.file, r.len, r.next_lsn, r.records, r.torn_tail)
                    }
                }
            };
        if ids.is_empty() {
            ids.push(active_id);
        }

        let mut list = BTreeMap::new();
        let mut bytes_on_disk = 0;
        for &id in &ids {
            let meta = if id == active_id {
                SegMeta {
                    len: active_len,
                    sealed_at: None,
                }
            } else {
                let path = dir.join(segment_file_name(id));
                let m = fs
                    .metadata(&path)
                    .map_err(|e| WalError::io("stat segment", &path, e))?;
                SegMeta {
                    len: m.len,
                    sealed_at: Some(m.modified),
                }
            };
            bytes_on_disk += meta.len;
            list.insert(id, meta);
        }
        let durable = Lsn(next_lsn.0 - 1);
        let first_lsn = ids[0].first_lsn();
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            fs,
            opts,
            pending: Mutex::new(Pending::new(next_lsn)),
            work: Condvar::new(),
            drained: Notify::new(),
            segs: Mutex::new(Segments {
                list,
                durable_lsn: durable,
                bytes_on_disk,
                release_point: ledger.release_point(),
                released_through: Lsn::ZERO,
                groups_committed: 0,
            }),
            durable_tx: watch::Sender::new(durable),
            disk_tx: watch::Sender::new(bytes_on_disk),
            observer: std::sync::OnceLock::new(),
            commit_started: Mutex::new(None),
        });
        inner.apply_retention()?;
        let mark = crate::mark::DurableMark::create(inner.fs.clone(), dir, durable)?;
        let (exit_tx, exit_rx) = oneshot::channel();
        let writer = crate::writer::Writer::new(inner.clone(), active_id, file, active_len, mark);
        let thread = std::thread::Builder::new()
            .name("prism-wal-writer".into())
            .spawn(move || writer.run(exit_tx))
            .map_err(|e| WalError::io("spawn writer thread", dir, e))?;
        let owner = Arc::new(Owner {
            inner: inner.clone(),
            exited: Mutex::new(Some(exit_rx)),
            thread: Mutex::new(Some(thread)),
            dir_lock: Mutex::new(Some(dir_lock)),
            reserve_held: AtomicBool::new(false),
            reserve_kept: AtomicBool::new(false),
            reserve_lock: Mutex::new(()),
        });
        let recovery = Recovery {
            segments: found,
            first_lsn,
            next_lsn,
            tail_records,
            torn_tail,
            lsn_gap,
        };
        if let Some(g) = &recovery.lsn_gap {
            tracing::warn!(first = %g.first, last = %g.last, next_lsn = %next_lsn, "the ledger is ahead of the write-ahead log: lsn {}..={} are missing (segment quarantined or lost); numbering continues at {next_lsn}, and readers skip the gap", g.first, g.last);
        }
        if let Some(t) = &recovery.torn_tail {
            tracing::warn!(segment = %t.segment, offset = t.offset, bytes = t.bytes_dropped, reason = %t.reason, "truncated torn tail of the write-ahead log");
        }
        Ok((Wal { inner, owner }, recovery))
    }

    /// Appends the records; returns once one fdatasync covering all of them has returned.
    /// Concurrent callers share the write and the fdatasync (group commit). Waits while the
    /// disk budget is full. Fails with [`WalError::DiskFull`] while the reserve file is given
    /// up (once [`Wal::ensure_reserve`] was called), as on a full disk.
    pub async fn append(&self, records: &[Envelope<'_>]) -> Result<LsnRange, WalError> {
        if records.is_empty() {
            return Err(WalError::EmptyAppend);
        }
        if records.len() > crate::APPEND_RECORDS_MAX {
            return Err(WalError::TooManyRecords {
                records: records.len(),
                records_max: crate::APPEND_RECORDS_MAX,
            });
        }
        // The room a released reserve leaves belongs to the ledger: an append taking it would
        // leave the ledger unwritable and the disk full for good.
        if self.owner.reserve_kept.load(Ordering::Acquire) && !self.reserve_held() {
            return Err(WalError::DiskFull {
                path: self.inner.dir.join(RESERVE_FILE),
            });
        }
        self.wait_for_budget().await?;
        let inner = &self.inner;
        let rx = loop {
            let mut notified = std::pin::pin!(inner.drained.notified());
            notified.as_mut().enable();
            {
                let mut p = inner.lock_pending();
                p.state.check()?;
                if p.buf.len() < inner.opts.group_bytes_max {
                    break p.enqueue(records)?;
                }
            }
            notified.await;
        };
        inner.work.notify_one();
        match rx.await {
            Ok(result) => result,
            // The writer dropped the sender without answering: it is gone.
            Err(_) => Err(self
                .inner
                .lock_pending()
                .state
                .check()
                .err()
                .unwrap_or(WalError::Closed)),
        }
    }

    async fn wait_for_budget(&self) -> Result<(), WalError> {
        let budget = self.inner.opts.budget_bytes_max;
        if *self.inner.disk_tx.borrow() < budget {
            return Ok(());
        }
        let mut rx = self.inner.disk_tx.subscribe();
        loop {
            // Closing and poisoning also touch the watch, so a waiter notices them.
            self.inner.lock_pending().state.check()?;
            if *rx.borrow_and_update() < budget {
                return Ok(());
            }
            rx.changed().await.map_err(|_| WalError::Closed)?;
        }
    }

    /// Whether appends would wait for the disk budget (ingest stops fetching while true).
    pub fn budget_full(&self) -> bool {
        *self.inner.disk_tx.borrow() >= self.inner.opts.budget_bytes_max
    }

    /// Last LSN covered by a returned fdatasync.
    pub fn durable_lsn(&self) -> Lsn {
        *self.inner.durable_tx.borrow()
    }

    /// A watch of the durable LSN (runtime-agnostic).
    pub fn watch_durable(&self) -> watch::Receiver<Lsn> {
        self.inner.durable_tx.subscribe()
    }

    /// A reader of durable records with `lsn >= from`.
    pub fn reader(&self, from: Lsn) -> Result<Reader, WalError> {
        Reader::live(self.inner.clone(), from)
    }

    /// The ledger on disk (empty if none yet).
    pub fn load_ledger(&self) -> Result<Ledger, WalError> {
        ledger::load(&*self.inner.fs, &self.inner.dir)
    }

    /// Writes the ledger atomically, then applies retention with its release point. Fails with
    /// [`WalError::Closed`] after [`Wal::close`]: the directory may belong to someone else then.
    ///
    /// On a full disk the reserve file (if any) is given up to let this ledger be written, so
    /// cursors move and released segments can be freed; [`Wal::ensure_reserve`] takes the room
    /// back later. Fails with [`WalError::DiskFull`] when even that is not enough (nothing
    /// changed on disk then; retry once space returns).
    pub fn commit_ledger(&self, ledger: &Ledger) -> Result<(), WalError> {
        let held = self.owner.lock_dir_lock();
        if held.is_none() {
            return Err(WalError::Closed);
        }
        match ledger::store(&*self.inner.fs, &self.inner.dir, ledger) {
            Err(WalError::DiskFull { .. }) if self.release_reserve()? => {
                tracing::info!(
                    dir = %self.inner.dir.display(),
                    "disk full: released the WAL's reserve file to write the ledger"
                );
                ledger::store(&*self.inner.fs, &self.inner.dir, ledger)?;
            }
            result => result?,
        }
        self.inner.lock_segs().release_point = ledger.release_point();
        self.inner.apply_retention()
    }

    /// Applies retention now (age limits expire without a ledger commit; the writer also calls
    /// this at every rollover).
    pub fn enforce_retention(&self) -> Result<(), WalError> {
        let held = self.owner.lock_dir_lock();
        if held.is_none() {
            return Err(WalError::Closed);
        }
        self.inner.apply_retention()
    }

    /// Counters.
    pub fn stats(&self) -> WalStats {
        let next_lsn = self.inner.lock_pending().next_lsn;
        let s = self.inner.lock_segs();
        WalStats {
            bytes_on_disk: s.bytes_on_disk,
            segments: s.list.len(),
            first_lsn: s.list.keys().next().map_or(Lsn(1), |id| id.first_lsn()),
            next_lsn,
            durable_lsn: s.durable_lsn,
            released_through: s.released_through,
            groups_committed: s.groups_committed,
        }
    }

    /// Sets the observer told of every group commit from now on (see [`crate::CommitObserver`]).
    /// Only the first call takes effect; returns whether this one did.
    pub fn set_commit_observer(&self, observer: Arc<dyn crate::CommitObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// How long the group commit under way (its writes and fdatasyncs) has been running, or
    /// `None` while the writer waits for work. A commit takes milliseconds; one running for
    /// minutes is a hung disk, which a liveness check can report.
    pub fn commit_running_for(&self) -> Option<std::time::Duration> {
        self.inner
            .commit_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|started| started.elapsed())
    }

    /// The disk budget in bytes (`budget_bytes_max`), for a used-ratio gauge.
    pub fn budget_bytes_max(&self) -> u64 {
        self.inner.opts.budget_bytes_max
    }

    /// The WAL directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Completes pending appends, stops the writer thread, waits for it and releases the
    /// directory lock. Other clones get [`WalError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), WalError> {
        {
            let mut p = self.inner.lock_pending();
            if p.state == WriterState::Running {
                p.state = WriterState::Closed;
            }
        }
        self.inner.work.notify_all();
        self.inner.drained.notify_waiters();
        self.inner.disk_tx.send_modify(|_| {});
        let rx = self
            .owner
            .exited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            // An error only means the thread exited without sending, which is what we wait for.
            let _ = rx.await;
        }
        let thread = self
            .owner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = thread {
            // The thread has signalled its exit; joining does not block for long.
            let _ = t.join();
        }
        // Nothing writes any more (the writer is gone, ledger commits wait for this mutex):
        // another process may take the directory now.
        drop(self.owner.lock_dir_lock().take());
        match &self.inner.lock_pending().state {
            WriterState::Poisoned(reason) => Err(WalError::Poisoned {
                reason: reason.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// The reserve file and freeing space on a full disk.
///
/// Every ledger commit needs a free block, and on a full disk only a ledger commit moves the
/// cursors that let segments go. So a reserve file of [`LEDGER_RESERVE_BYTES`] is kept in the
/// WAL directory: [`Wal::commit_ledger`] deletes it when the disk is full, and the ledger fits in
/// the room it leaves. While the reserve is missing, appends should wait (the room is the
/// ledger's): [`Wal::reserve_held`] says so, and [`Wal::make_room`] frees released segments and
/// re-creates the reserve once there is space. Deleting files needs no free block.
impl Wal {
    /// Whether the reserve file is in place. False before [`Wal::ensure_reserve`] succeeded and
    /// after a ledger commit on a full disk used the reserve's room.
    pub fn reserve_held(&self) -> bool {
        self.owner.reserve_held.load(Ordering::Acquire)
    }

    /// Creates the reserve file if it is missing. `Ok(false)` if the disk has no room for it
    /// (nothing is left behind then); [`WalError::FilesExhausted`] (transient) when no file
    /// descriptor is free to create it; any other I/O error is an error.
    ///
    /// The file's bytes mean nothing and are never synced: after a crash a short or missing
    /// reserve is simply created again.
    pub fn ensure_reserve(&self) -> Result<bool, WalError> {
        let _serial = self
            .owner
            .reserve_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.owner.reserve_kept.store(true, Ordering::Release);
        let fs = &*self.inner.fs;
        let path = self.inner.dir.join(RESERVE_FILE);
        match fs.metadata(&path) {
            Ok(meta) if meta.len == LEDGER_RESERVE_BYTES => {
                self.owner.reserve_held.store(true, Ordering::Release);
                return Ok(true);
            }
            Ok(_) => {
                // Left short (or long) by a crash while it was being filled: the file is created
                // exclusively below, so the wrong one must go first.
                match fs.remove(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(WalError::io("remove partial reserve", path, e)),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("stat reserve", path, e)),
        }
        let filled = (|| {
            let file = fs.create(&path)?;
            let chunk = [0u8; RESERVE_CHUNK_BYTES];
            let mut offset = 0u64;
            while offset < LEDGER_RESERVE_BYTES {
                let n = (LEDGER_RESERVE_BYTES - offset).min(RESERVE_CHUNK_BYTES as u64);
                // Cannot truncate: n is at most RESERVE_CHUNK_BYTES.
                write_all_at(&*file, &chunk[..n as usize], offset)?;
                offset += n;
            }
            Ok::<_, std::io::Error>(())
        })();
        match filled {
            Ok(()) => {
                self.owner.reserve_held.store(true, Ordering::Release);
                Ok(true)
            }
            Err(e) => {
                // A partial reserve would hold room without being counted as held.
                match fs.remove(&path) {
                    Ok(()) => {}
                    Err(re) if re.kind() == std::io::ErrorKind::NotFound => {}
                    Err(re) => return Err(WalError::io("remove partial reserve", path, re)),
                }
                if crate::fs::is_disk_full(&e) {
                    Ok(false)
                } else {
                    Err(WalError::io_opening("create reserve", path, e))
                }
            }
        }
    }

    /// Deletes the reserve file; true if there was one.
    fn release_reserve(&self) -> Result<bool, WalError> {
        let _serial = self
            .owner
            .reserve_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.owner.reserve_held.store(false, Ordering::Release);
        let path = self.inner.dir.join(RESERVE_FILE);
        // The deletion frees its blocks at once; it need not be durable (after a crash the
        // reserve is back, which is what it is for).
        match self.inner.fs.remove(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(WalError::io("remove reserve", path, e)),
        }
    }

    /// Frees room on a full disk: deletes the oldest released segment even if retention for
    /// replay would keep it (a full disk outranks replay, as a full budget does), then tries to
    /// re-create the reserve. Returns whether the reserve is in place afterwards, that is
    /// whether appends may go on. Deletes at most one segment per call, so replay keeps what
    /// the disk can spare when the caller retries only while the disk is full.
    pub fn make_room(&self) -> Result<bool, WalError> {
        {
            let held = self.owner.lock_dir_lock();
            if held.is_none() {
                return Err(WalError::Closed);
            }
            self.delete_oldest_released()?;
        }
        self.ensure_reserve()
    }

    fn delete_oldest_released(&self) -> Result<(), WalError> {
        let inner = &self.inner;
        let mut s = inner.lock_segs();
        let Some(release) = s.release_point else {
            return Ok(());
        };
        let mut ids = s.list.keys().copied();
        let (Some(oldest), Some(next)) = (ids.next(), ids.next()) else {
            return Ok(());
        };
        // Released only when the next segment starts at or before the release point, so the
        // active segment (which has no next) is never deleted.
        if next.0 > release.0 {
            return Ok(());
        }
        let path = inner.segment_path(oldest);
        match inner.fs.remove(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("remove segment", path, e)),
        }
        let len = s.list.remove(&oldest).map_or(0, |m| m.len);
        s.bytes_on_disk -= len;
        s.released_through = s.released_through.max(Lsn(next.0 - 1));
        let bytes = s.bytes_on_disk;
        drop(s);
        tracing::debug!(segment = %oldest, bytes = len, "deleted released segment to free a full disk");
        // Out of descriptors for the directory fsync: the deletion stands (it need not be
        // durable to free the room), and the caller retries.
        inner
            .fs
            .sync_dir(&inner.dir)
            .map_err(|e| WalError::io_opening("fsync directory", &inner.dir, e))?;
        inner.disk_tx.send_replace(bytes);
        Ok(())
    }
}

/// Creates a segment: file, header, fdatasync, directory fsync.
pub(crate) fn create_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    id: SegmentId,
) -> Result<Arc<dyn crate::fs::WalFile>, WalError> {
    let path = dir.join(segment_file_name(id));
    let file = fs.create(&path).map_err(|e| {
        if crate::fs::is_files_exhausted(&e) {
            WalError::FilesExhausted { path: path.clone() }
        } else if crate::fs::is_disk_full(&e) {
            WalError::DiskFull { path: path.clone() }
        } else {
            WalError::io("create segment", &path, e)
        }
    })?;
    if let Err(e) = write_all_at(&*file, &segment::encode_header(id.first_lsn()), 0) {
        drop(file);
        // Best effort: an orphan header-less file is also handled by recovery.
        let _ = fs.remove(&path);
        let _ = fs.sync_dir(dir);
        return Err(if crate::fs::is_disk_full(&e) {
            WalError::DiskFull { path }
        } else {
            WalError::io("write segment header", path, e)
        });
    }
    file.sync_data().map_err(|e| WalError::Poisoned {
        reason: format!("fdatasync of new segment {}: {e}", path.display()),
    })?;
    if let Err(e) = fs.sync_dir(dir) {
        // The directory could not even be opened for its fsync (an fsync itself never fails
        // with these): nothing was synced, so nothing is lost. Take the new file away again,
        // which needs no descriptor, and let the append be retried; a header-only segment left
        // behind by a crash right here is an empty active segment to recovery.
        if crate::fs::is_files_exhausted(&e) {
            drop(file);
            let _ = fs.remove(&path);
            return Err(WalError::FilesExhausted {
                path: dir.to_path_buf(),
            });
        }
        return Err(WalError::Poisoned {
            reason: format!("fsync of directory {}: {e}", dir.display()),
        });
    }
    Ok(file)
}

/// What the directory says about how far the log was durable, besides the log itself: evidence
/// that a bad record of the last segment was acknowledged, so it is corruption, not a torn tail.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Evidence {
    /// One past the highest position the ledger names (a lane consumed everything below).
    pub(crate) ledger_end: Lsn,
    /// The durable mark the previous writer left, if it is readable.
    ///
    /// It is written only after an fdatasync covering it returned, so every LSN up to it was
    /// durable and acknowledged. After a process crash the page cache still holds it; after a
    /// machine crash the disk holds an older value or none (it is never synced), which is less
    /// evidence, never false evidence, as long as no LSN at or below a value it ever held is given
    /// out again. Recovery never truncates at or below it (that is corruption), and whenever
    /// records went away otherwise (a quarantined segment), open replaces the mark and makes the
    /// removal of the old one durable before the writer can reuse an LSN (see `mark`).
    pub(crate) mark: Option<Lsn>,
}

/// Why the bad record at `offset` of the last segment (file length `len`), where lsn
/// `expected` should be, cannot be a torn tail; `None` if it can. See [`recover_last`].
///
/// A CRC-valid frame with a later LSN after the bad record is no evidence: the pages of one
/// unsynced write can reach the disk in any order in a machine crash, so a later page of the
/// torn group may be there while an earlier one is not.
pub(crate) fn not_a_torn_tail(
    file: &dyn crate::fs::WalFile,
    offset: u64,
    len: u64,
    expected: Lsn,
    evidence: Evidence,
    group_bytes_max: usize,
) -> std::io::Result<Option<String>> {
    let after = len.saturating_sub(offset);
    let tail_bytes_max = unsynced_bytes_max(file, offset, group_bytes_max)?;
    let ledger_end = evidence.ledger_end;
    Ok(if expected < ledger_end {
        Some(format!(
            "the ledger has consumed records up to lsn {}, so lsn {expected} was durable",
            ledger_end.0 - 1
        ))
    } else if let Some(mark) = evidence.mark.filter(|m| expected <= *m) {
        Some(format!(
            "the durable mark says an fdatasync covering lsn {mark} returned, so lsn {expected} \
             was durable and acknowledged"
        ))
    } else if after > tail_bytes_max {
        Some(format!(
            "{after} bytes follow it, more than the {tail_bytes_max} bytes one unsynced write \
             can leave"
        ))
    } else {
        None
    })
}

/// The most bytes a crash can leave unsynced after the bad record at `offset`: one chunk of
/// `group_bytes_max` bytes, or the record itself when its (plausible) length says it is larger,
/// since a record is never split across chunks.
fn unsynced_bytes_max(
    file: &dyn crate::fs::WalFile,
    offset: u64,
    group_bytes_max: usize,
) -> std::io::Result<u64> {
    let mut len = [0u8; 4];
    let n = crate::fs::read_full_at(file, &mut len, offset)?;
    let declared = u32::from_le_bytes(len) as usize;
    let record = if n == len.len() && declared <= crate::RECORD_BYTES_MAX {
        segment::RECORD_HEADER_BYTES + declared
    } else {
        0
    };
    Ok(group_bytes_max.max(record) as u64)
}

struct Recovered {
    file: Arc<dyn crate::fs::WalFile>,
    len: u64,
    next_lsn: Lsn,
    records: u64,
    torn_tail: Option<TornTail>,
}

/// Scans the last segment to its end and truncates a torn tail.
///
/// A torn tail is what a crash leaves of the one write that was not yet covered by an
/// fdatasync: the writer syncs at most `group_bytes_max` bytes at a time (a larger group is
/// synced in chunks, see `writer`), except a single record larger than that. So a bad record
/// is corruption, never truncated, when more bytes follow it than one such chunk can hold, when
/// its LSN is below the ledger's end (a lane consumed it, so it was durable), or when the
/// durable mark covers it (an fdatasync covering it returned, see [`Evidence`]).
fn recover_last(
    fs: &dyn FileSystem,
    dir: &Path,
    id: SegmentId,
    opts: &WalOptions,
    evidence: Evidence,
) -> Result<Recovered, WalError> {
    let mode = opts.recovery_mode;
    let path = dir.join(segment_file_name(id));
    let file = fs
        .open(&path, true)
        .map_err(|e| WalError::io("open segment", &path, e))?;
    let len = file
        .len()
        .map_err(|e| WalError::io("stat segment", &path, e))?;
    let header = SEGMENT_HEADER_BYTES as u64;
    let header_only_invalid = len <= header && {
        let mut h = [0u8; SEGMENT_HEADER_BYTES];
        let n = crate::fs::read_full_at(&*file, &mut h, 0)
            .map_err(|e| WalError::io("read segment", &path, e))?;
        segment::decode_header(&h[..n]) != Ok(id.first_lsn())
    };
    if header_only_invalid {
        // The crash interrupted the creation of this segment: records are written only after
        // the header is durable, so a file with nothing but a bad header never held a record.
        // A bad header followed by records is corruption instead (below).
        let torn = TornTail {
            segment: id,
            offset: 0,
            bytes_dropped: len,
            reason: format!("segment header of {len} bytes is incomplete or invalid"),
        };
        if mode == RecoveryMode::Strict {
            return Err(WalError::TornTail {
                segment: id,
                offset: 0,
                bytes: len,
            });
        }
        file.set_len(0)
            .map_err(|e| WalError::io("truncate segment", &path, e))?;
        // A full disk is transient here: the empty file is the same case at the next open.
        write_all_at(&*file, &segment::encode_header(id.first_lsn()), 0).map_err(|e| {
            if crate::fs::is_disk_full(&e) {
                WalError::DiskFull { path: path.clone() }
            } else {
                WalError::io("write segment header", &path, e)
            }
        })?;
        file.sync_data()
            .map_err(|e| WalError::io("fdatasync segment", &path, e))?;
        return Ok(Recovered {
            file,
            len: header,
            next_lsn: id.first_lsn(),
            records: 0,
            torn_tail: Some(torn),
        });
    }
    let mut scan = match SegmentScan::open(id, file.clone())
        .map_err(|e| WalError::io("read segment", &path, e))?
    {
        Ok(s) => s,
        Err(reason) => {
            return Err(WalError::Corrupt {
                segment: id,
                offset: 0,
                reason,
            })
        }
    };
    let mut records = 0u64;
    let torn_tail = loop {
        match scan
            .step(len)
            .map_err(|e| WalError::io("read segment", &path, e))?
        {
            Step::Record { .. } => records += 1,
            Step::End => break None,
            Step::Invalid { offset, reason } => {
                let after = len - offset;
                let why_durable = not_a_torn_tail(
                    &*file,
                    offset,
                    len,
                    scan.expected,
                    evidence,
                    opts.group_bytes_max,
                )
                .map_err(|e| WalError::io("read segment", &path, e))?;
                if let Some(why) = why_durable {
                    return Err(WalError::Corrupt {
                        segment: id,
                        offset,
                        reason: format!(
                            "{reason}; not a torn tail: {why}. Nothing was truncated: run \
                             `prism-relay wal verify`, then move the segment aside with \
                             `prism-relay wal quarantine` (its later records go with it)"
                        ),
                    });
                }
                break Some(TornTail {
                    segment: id,
                    offset,
                    bytes_dropped: after,
                    reason,
                });
            }
        }
    };
    let mut end = len;
    if let Some(t) = &torn_tail {
        if mode == RecoveryMode::Strict {
            return Err(WalError::TornTail {
                segment: id,
                offset: t.offset,
                bytes: t.bytes_dropped,
            });
        }
        end = t.offset;
        file.set_len(end)
            .map_err(|e| WalError::io("truncate segment", &path, e))?;
    }
    // The records just scanned may sit in the page cache only (a previous process may have
    // died, or been poisoned, before its fdatasync): make them durable before calling them so.
    file.sync_data()
        .map_err(|e| WalError::io("fdatasync segment", &path, e))?;
    Ok(Recovered {
        file,
        len: end,
        next_lsn: scan.expected,
        records,
        torn_tail,
    })
}
