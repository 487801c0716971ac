//! The writer thread: group commit.
//!
//! Appenders encode their records straight into one shared pending buffer (framing, LSN and
//! CRC included; LSNs are assigned in buffer order, which is write order) and wait on a oneshot.
//! The writer swaps the buffer out, does one write and one fdatasync for everything in it (a
//! group larger than `group_bytes_max` gets one per chunk of at most that many bytes),
//! advances the durable LSN and answers every waiter. While it writes, new appends fill the
//! other buffer, so the next group is ready when the fdatasync returns. An idle writer woken by a
//! small group while appends come from several callers (consumers pulling on a shared tick) waits
//! up to [`GATHER`] for the others, so they share one fdatasync; a lone appender and a backlog's
//! large appends do not wait.
//!
//! Failure policy: a failed fdatasync (or directory fsync) poisons the WAL for good; it is never
//! retried, because the kernel may have dropped the dirty pages it failed to write. The unsynced
//! group is truncated away first, so a restart in the same boot (which reads the page cache)
//! does not take it for durable records. A failed write (ENOSPC or EDQUOT above all) or a
//! rollover that finds no free file descriptor is undone by truncating the segment to its
//! durable length; the group and everything queued behind it fail, their LSNs are given out
//! again, and the writer lives on.

use crate::error::WalError;
use crate::fs::{is_disk_full, write_all_at, WalFile};
use crate::mark::DurableMark;
use crate::types::{Lsn, LsnRange, SegmentId};
use crate::wal::{create_segment, Inner, SegMeta};
use crate::Envelope;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

type Answer = oneshot::Sender<Result<LsnRange, WalError>>;

/// Lifecycle of the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriterState {
    Running,
    Closed,
    Poisoned(String),
}

impl WriterState {
    pub(crate) fn check(&self) -> Result<(), WalError> {
        match self {
            WriterState::Running => Ok(()),
            WriterState::Closed => Err(WalError::Closed),
            WriterState::Poisoned(reason) => Err(WalError::Poisoned {
                reason: reason.clone(),
            }),
        }
    }
}

/// How long the writer, woken from idle by a group smaller than [`GATHER_BYTES_MAX`] while appends
/// come from several callers at once, waits for more before it writes and syncs.
const GATHER: Duration = Duration::from_millis(1);
/// A group this large is written at once: appends that large come from a backlog, where groups
/// form while the previous fdatasync runs.
const GATHER_BYTES_MAX: usize = 32 * 1024;
/// The writer waits for more appends only this long after a group that held several: a lone
/// appender (one consumer) gets its fdatasync at once.
const GATHER_AFTER_SHARED: Duration = Duration::from_secs(1);

/// One append waiting for its group.
pub(crate) struct Waiter {
    /// The LSNs its records got.
    range: LsnRange,
    /// Where the outcome goes.
    answer: Answer,
}

/// Records waiting for the writer.
pub(crate) struct Pending {
    /// Framed records, ready to be written as they are.
    pub(crate) buf: Vec<u8>,
    /// The appends whose records are in `buf`, in buffer order.
    waiters: Vec<Waiter>,
    /// LSN the next enqueued record gets.
    pub(crate) next_lsn: Lsn,
    /// Whether appends are accepted.
    pub(crate) state: WriterState,
}

impl Pending {
    pub(crate) fn new(next_lsn: Lsn) -> Self {
        Pending {
            buf: Vec::new(),
            waiters: Vec::new(),
            next_lsn,
            state: WriterState::Running,
        }
    }

    /// Encodes the records into the buffer with the next LSNs; all or nothing.
    pub(crate) fn enqueue(
        &mut self,
        records: &[Envelope<'_>],
    ) -> Result<oneshot::Receiver<Result<LsnRange, WalError>>, WalError> {
        let start = self.buf.len();
        let first = self.next_lsn;
        for (i, r) in records.iter().enumerate() {
            if let Err(e) = crate::segment::encode_record(&mut self.buf, Lsn(first.0 + i as u64), r)
            {
                self.buf.truncate(start);
                return Err(e);
            }
        }
        let range = LsnRange {
            first,
            last: Lsn(first.0 + records.len() as u64 - 1),
        };
        self.next_lsn = range.last.next();
        let (answer, rx) = oneshot::channel();
        self.waiters.push(Waiter { range, answer });
        Ok(rx)
    }

    /// Fails everything queued and gives its LSNs out again from `next_lsn`.
    fn fail_all(&mut self, next_lsn: Lsn, err: &WalError) {
        self.buf.clear();
        for w in self.waiters.drain(..) {
            // A dropped receiver means the appender went away; nobody to tell.
            let _ = w.answer.send(Err(err.clone()));
        }
        self.next_lsn = next_lsn;
    }
}

/// The writer thread's state: it alone writes to the active segment.
pub(crate) struct Writer {
    /// Shared state.
    inner: Arc<Inner>,
    /// The active segment.
    id: SegmentId,
    /// Its file.
    file: Arc<dyn WalFile>,
    /// Durable length of the active segment.
    len: u64,
    /// The buffer being written; swapped with the pending one.
    spare: Vec<u8>,
    /// Where the durable LSN is published for offline readers.
    mark: DurableMark,
    /// When a group last held appends of more than one caller.
    shared_group_at: Option<Instant>,
}

enum GroupError {
    /// The group failed; the writer lives on.
    Failed(WalError),
    /// The WAL is poisoned.
    Fatal(String),
}

impl Writer {
    pub(crate) fn new(
        inner: Arc<Inner>,
        id: SegmentId,
        file: Arc<dyn WalFile>,
        len: u64,
        mark: DurableMark,
    ) -> Self {
        Writer {
            inner,
            id,
            file,
            len,
            spare: Vec::new(),
            mark,
            shared_group_at: None,
        }
    }

    pub(crate) fn run(mut self, exited: oneshot::Sender<()>) {
        loop {
            let waiters = {
                let mut p = self.inner.lock_pending();
                let mut was_idle = false;
                loop {
                    if !p.buf.is_empty() {
                        break;
                    }
                    if p.state != WriterState::Running {
                        drop(p);
                        // The receiver may be gone if nobody awaits close; that is fine.
                        let _ = exited.send(());
                        return;
                    }
                    p = self.inner.work.wait(p).unwrap_or_else(|e| e.into_inner());
                    was_idle = true;
                }
                // Woken from idle by a small group while appends come from several callers:
                // those that come with it (the consumers pulling on one tick) share its
                // fdatasync instead of each paying one.
                let shared_lately = self
                    .shared_group_at
                    .is_some_and(|at| at.elapsed() < GATHER_AFTER_SHARED);
                if was_idle && shared_lately {
                    p = match self.inner.work.wait_timeout_while(p, GATHER, |p| {
                        p.buf.len() < GATHER_BYTES_MAX && p.state == WriterState::Running
                    }) {
                        Ok((p, _)) => p,
                        Err(e) => e.into_inner().0,
                    };
                }
                std::mem::swap(&mut p.buf, &mut self.spare);
                std::mem::take(&mut p.waiters)
            };
            if waiters.len() > 1 {
                self.shared_group_at = Some(Instant::now());
            }
            self.inner.drained.notify_waiters();
            let (Some(first), Some(last)) = (waiters.first(), waiters.last()) else {
                // Bytes without waiters cannot happen: enqueue adds both under one lock.
                self.spare.clear();
                continue;
            };
            let range = LsnRange {
                first: first.range.first,
                last: last.range.last,
            };
            self.set_commit_started(Some(std::time::Instant::now()));
            let committed = self.commit(range);
            self.set_commit_started(None);
            match committed {
                Ok(()) => {
                    for w in waiters {
                        let _ = w.answer.send(Ok(w.range));
                    }
                }
                Err(GroupError::Failed(err)) => {
                    // A full disk fails every retry until space returns: the caller logs that
                    // condition once (rate-limited), so here it is only a debug line.
                    if matches!(err, WalError::DiskFull { .. }) {
                        tracing::debug!(error = %crate::ErrorChain(&err), "write-ahead log group failed; nothing of it was kept");
                    } else {
                        tracing::warn!(error = %crate::ErrorChain(&err), "write-ahead log group failed; nothing of it was kept");
                    }
                    self.inner.lock_pending().fail_all(range.first, &err);
                    for w in waiters {
                        let _ = w.answer.send(Err(err.clone()));
                    }
                }
                Err(GroupError::Fatal(reason)) => {
                    tracing::error!(%reason, "write-ahead log poisoned");
                    let err = WalError::Poisoned {
                        reason: reason.clone(),
                    };
                    {
                        let mut p = self.inner.lock_pending();
                        p.state = WriterState::Poisoned(reason);
                        p.fail_all(range.first, &err);
                    }
                    for w in waiters {
                        let _ = w.answer.send(Err(err.clone()));
                    }
                    self.inner.drained.notify_waiters();
                    self.inner.disk_tx.send_modify(|_| {});
                    let _ = exited.send(());
                    return;
                }
            }
            self.spare.clear();
        }
    }

    /// Publishes when the group commit under way started (`None`: none is).
    fn set_commit_started(&self, started: Option<std::time::Instant>) {
        *self
            .inner
            .commit_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = started;
    }

    /// One write and one fdatasync for the whole group (after a rollover if due).
    fn commit(&mut self, range: LsnRange) -> Result<(), GroupError> {
        if self.len >= self.inner.opts.segment_bytes_max {
            self.roll(range.first)?;
        }
        let path = self.inner.segment_path(self.id);
        debug_assert!(
            group_is_well_formed(&self.spare, range),
            "group {range:?} is malformed"
        );
        // A group larger than `group_bytes_max` (one large append) is written and synced in
        // chunks of at most that many bytes, cut at record boundaries: a crash then leaves at most
        // one chunk unsynced, which is what lets recovery tell a torn tail from corruption.
        let mut written = 0;
        let mut fsync = std::time::Duration::ZERO;
        while written < self.spare.len() {
            let end = chunk_end(&self.spare, written, self.inner.opts.group_bytes_max);
            let at = self.len + written as u64;
            if let Err(e) = write_all_at(&*self.file, &self.spare[written..end], at) {
                // Undo whatever part of the group reached the file (synced chunks included: none
                // of it was acknowledged), so the next group starts at the durable end and the
                // failed LSNs can be given out again.
                if let Err(te) = self.file.set_len(self.len) {
                    return Err(GroupError::Fatal(format!(
                        "write to {} failed ({e}) and truncating it back failed too: {te}",
                        path.display()
                    )));
                }
                // Make the truncation durable right away instead of relying on the next group's
                // fdatasync, so the file never holds more than its durable records for long.
                if let Err(se) = self.file.sync_data() {
                    return Err(GroupError::Fatal(format!(
                        "fdatasync of {} after undoing a failed write failed: {se}",
                        path.display()
                    )));
                }
                return Err(GroupError::Failed(if is_disk_full(&e) {
                    WalError::DiskFull { path }
                } else {
                    WalError::io("write segment", path, e)
                }));
            }
            let sync_started = std::time::Instant::now();
            let synced = self.file.sync_data();
            fsync += sync_started.elapsed();
            if let Err(e) = synced {
                // The group's bytes may still sit in the page cache, where a restart in the same
                // boot would read them as durable records although they may never reach the
                // disk: cut them off before poisoning (best effort; the poison stands anyway).
                let undo = match self.file.set_len(self.len) {
                    Ok(()) => String::new(),
                    Err(te) => format!("; truncating the unsynced group away failed too: {te}"),
                };
                return Err(GroupError::Fatal(format!(
                    "fdatasync of {} failed: {e}{undo}",
                    path.display()
                )));
            }
            written = end;
        }
        self.len += self.spare.len() as u64;
        let bytes_on_disk = {
            let mut s = self.inner.lock_segs();
            if let Some(m) = s.list.get_mut(&self.id) {
                m.len = self.len;
            }
            s.durable_lsn = range.last;
            s.groups_committed += 1;
            s.bytes_on_disk += self.spare.len() as u64;
            s.bytes_on_disk
        };
        // One small pwrite, no fsync: other processes read it from the shared page cache.
        self.mark.publish(range.last);
        self.inner.durable_tx.send_replace(range.last);
        self.inner.disk_tx.send_replace(bytes_on_disk);
        if let Some(observer) = self.inner.observer.get() {
            let records = range.last.0.saturating_sub(range.first.0).saturating_add(1);
            observer.group_committed(records, self.spare.len() as u64, fsync);
        }
        Ok(())
    }

    /// Seals the active segment (fdatasync) and starts a new one whose first record is `first`
    /// (create, header, fdatasync, directory fsync).
    fn roll(&mut self, first: Lsn) -> Result<(), GroupError> {
        // Every group written to the old segment was synced already, and so was any undone
        // write; this fdatasync is a cheap guarantee that nothing of the sealed segment is left
        // only in the page cache.
        if let Err(e) = self.file.sync_data() {
            return Err(GroupError::Fatal(format!(
                "fdatasync of {} before sealing it failed: {e}",
                self.inner.segment_path(self.id).display()
            )));
        }
        let id = SegmentId(first.0);
        let file = match create_segment(&*self.inner.fs, &self.inner.dir, id) {
            Ok(f) => f,
            Err(WalError::Poisoned { reason }) => return Err(GroupError::Fatal(reason)),
            Err(WalError::Io { source, path, .. }) if is_disk_full(&source) => {
                return Err(GroupError::Failed(WalError::DiskFull { path }))
            }
            Err(e) => return Err(GroupError::Failed(e)),
        };
        let header = crate::segment::SEGMENT_HEADER_BYTES as u64;
        let bytes_on_disk = {
            let mut s = self.inner.lock_segs();
            if let Some(m) = s.list.get_mut(&self.id) {
                m.sealed_at = Some(SystemTime::now());
            }
            s.list.insert(
                id,
                SegMeta {
                    len: header,
                    sealed_at: None,
                },
            );
            s.bytes_on_disk += header;
            s.bytes_on_disk
        };
        self.inner.disk_tx.send_replace(bytes_on_disk);
        self.id = id;
        self.file = file;
        self.len = header;
        if let Err(e) = self.inner.apply_retention() {
            tracing::warn!(error = %crate::ErrorChain(&e), "retention at segment rollover failed");
        }
        Ok(())
    }
}

/// End (exclusive) of the chunk of `buf` that starts at the record boundary `start`: as many
/// whole records as fit in `bytes_max`, and at least one.
fn chunk_end(buf: &[u8], start: usize, bytes_max: usize) -> usize {
    let mut at = start;
    while at < buf.len() {
        // The buffer holds records framed by `encode_record`; a header cut short cannot happen,
        // and would only end the chunk at the buffer's end.
        let Some(len) = buf.get(at..at + 4) else {
            return buf.len();
        };
        let mut word = [0u8; 4];
        word.copy_from_slice(len);
        let next = at + crate::segment::RECORD_HEADER_BYTES + u32::from_le_bytes(word) as usize;
        if at > start && next - start > bytes_max {
            break;
        }
        at = next.min(buf.len());
    }
    at
}

/// Checks, right before writing, that the group is exactly the records of `range`, in order,
/// each with a valid CRC (debug builds only: it costs a second CRC pass).
fn group_is_well_formed(mut buf: &[u8], range: LsnRange) -> bool {
    let mut expected = range.first;
    while !buf.is_empty() {
        match crate::segment::decode_record(buf, Some(expected)) {
            Ok(f) => {
                buf = &buf[f.bytes..];
                expected = f.lsn.next();
            }
            Err(_) => return false,
        }
    }
    expected == range.last.next()
}

#[cfg(test)]
mod tests {
    use super::chunk_end;
    use crate::segment::RECORD_HEADER_BYTES;

    /// Frames records of the given body lengths (their content does not matter here).
    fn framed(bodies: &[usize]) -> Vec<u8> {
        let mut buf = Vec::new();
        for &len in bodies {
            buf.extend_from_slice(&(len as u32).to_le_bytes());
            buf.resize(buf.len() + RECORD_HEADER_BYTES - 4 + len, 0);
        }
        buf
    }

    #[test]
    fn chunks_hold_whole_records_up_to_the_limit_and_at_least_one_record() {
        let r = RECORD_HEADER_BYTES;
        let buf = framed(&[10, 10, 10, 100, 10]);
        // Two records of 10 fit in 2 * (r + 10) bytes, the third does not.
        assert_eq!(chunk_end(&buf, 0, 2 * (r + 10)), 2 * (r + 10));
        // A record larger than the limit forms a chunk of its own.
        let big = 3 * (r + 10);
        assert_eq!(chunk_end(&buf, big, 2 * (r + 10)), big + r + 100);
        // Everything fits: the chunk is the whole rest.
        assert_eq!(chunk_end(&buf, 0, 1 << 20), buf.len());
        let mut at = 0;
        let mut chunks = 0;
        while at < buf.len() {
            at = chunk_end(&buf, at, r + 10);
            chunks += 1;
        }
        assert_eq!((at, chunks), (buf.len(), 5));
    }
}
