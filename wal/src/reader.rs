//! [`Reader`]: hands out records in LSN order from any starting LSN, crossing segments.
//!
//! A live reader (from [`crate::Wal::reader`]) stops at the durable LSN and returns `None` when
//! caught up; a later call continues (await [`crate::Wal::watch_durable`] to know when). An
//! offline reader ([`crate::read_dir`]) reads a directory as it is on disk, treating a torn tail
//! of the last segment as its end, and stops at the durable mark of a live writer. Either way,
//! a record that fails its checks anywhere else is returned as [`WalError::Corrupt`] again and
//! again: never skipped. An LSN gap between segments is crossed, with a warning naming it, only
//! where `quarantine/` explains it (a quarantined segment or a gap note starting there).

use crate::error::WalError;
use crate::fs::FileSystem;
use crate::segment::{segment_file_name, SegmentScan, Step};
use crate::types::{Lsn, SegmentId};
use crate::wal::Inner;
use crate::Envelope;
use std::ops::Bound::{Excluded, Unbounded};
use std::path::PathBuf;
use std::sync::Arc;

/// One record, borrowed from the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The record's LSN.
    pub lsn: Lsn,
    /// The record's body (bincode of an [`Envelope`]).
    pub body: &'a [u8],
}

impl RecordRef<'_> {
    /// Decodes the body; strings and payload borrow from it.
    pub fn envelope(&self) -> Result<Envelope<'_>, WalError> {
        bincode::deserialize(self.body).map_err(|e| WalError::Decode {
            lsn: self.lsn,
            reason: e.to_string(),
        })
    }

    /// The record's subject and the value of its first header named `name`, read from the body
    /// without decoding the rest: no allocation, the stream name, the other headers' text and
    /// the payload are not checked. What a reader that routes records by subject needs for each
    /// record it passes over; [`RecordRef::envelope`] checks everything, for the records it
    /// keeps. On a body [`RecordRef::envelope`] decodes, both agree.
    pub fn subject_and_header(&self, name: &str) -> Result<(&str, Option<&str>), WalError> {
        let decode = |reason: &str| WalError::Decode {
            lsn: self.lsn,
            reason: reason.to_owned(),
        };
        let mut body = Fields(self.body);
        body.bytes()
            .ok_or_else(|| decode("the body ends inside the stream name"))?;
        body.take(8)
            .ok_or_else(|| decode("the body ends inside the stream sequence"))?;
        let subject = body
            .bytes()
            .ok_or_else(|| decode("the body ends inside the subject"))?;
        let subject =
            std::str::from_utf8(subject).map_err(|_| decode("the subject is not UTF-8"))?;
        let count = body
            .len()
            .ok_or_else(|| decode("the body ends inside the header count"))?;
        let mut found = None;
        for _ in 0..count {
            let (key, value) = body
                .bytes()
                .zip(body.bytes())
                .ok_or_else(|| decode("the body ends inside a header"))?;
            if found.is_none() && key == name.as_bytes() {
                found = Some(
                    std::str::from_utf8(value)
                        .map_err(|_| decode("a header value is not UTF-8"))?,
                );
            }
        }
        Ok((subject, found))
    }
}

/// The unread rest of a record body, taken field by field in bincode's encoding (fixed-width
/// little-endian integers, u64 length prefixes).
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        let bytes: [u8; 8] = self.take(8)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(bytes)).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
}

/// Where a reader learns which segments exist and how far it may read.
enum Source {
    /// An open WAL: up to the durable LSN, segments as retention leaves them.
    Live(Arc<Inner>),
    /// A directory as found on disk (read-only tools).
    Offline {
        /// The filesystem.
        fs: Arc<dyn FileSystem>,
        /// The WAL directory.
        dir: PathBuf,
        /// Its segments, listed once.
        ids: Vec<SegmentId>,
        /// Records after it are not handed out: the durable mark of a live writer.
        durable: Lsn,
    },
}

/// What the source says about the segment being read.
struct View {
    /// Bytes of the segment that may be read.
    limit: u64,
    /// Records after this LSN are not handed out yet.
    durable: Lsn,
    /// The segment after this one, if this one is sealed.
    next: Option<SegmentId>,
    /// The oldest segment still present.
    first: Option<SegmentId>,
}

/// Reads records in LSN order. See the module documentation.
pub struct Reader {
    /// Where segments come from.
    source: Source,
    /// Records below it are skipped.
    from: Lsn,
    /// The segment being read; `None` only for an offline directory without segments.
    scan: Option<SegmentScan>,
    /// Length of the current segment once it is known to be sealed.
    sealed_len: Option<u64>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Reader {
    pub(crate) fn live(inner: Arc<Inner>, from: Lsn) -> Result<Reader, WalError> {
        let ids: Vec<SegmentId> = inner.lock_segs().list.keys().copied().collect();
        Self::start(Source::Live(inner), ids, from)
    }

    pub(crate) fn offline(
        fs: Arc<dyn FileSystem>,
        dir: PathBuf,
        ids: Vec<SegmentId>,
        from: Lsn,
        durable: Lsn,
    ) -> Result<Reader, WalError> {
        Self::start(
            Source::Offline {
                fs,
                dir,
                ids: ids.clone(),
                durable,
            },
            ids,
            from,
        )
    }

    fn start(source: Source, ids: Vec<SegmentId>, from: Lsn) -> Result<Reader, WalError> {
        let from = Lsn(from.0.max(1));
        let mut r = Reader {
            source,
            from,
            scan: None,
            sealed_len: None,
        };
        let Some(first) = ids.first().copied() else {
            return Ok(r);
        };
        if from < first.first_lsn() {
            // Records before the first segment are gone. That is expected only when an operator
            // quarantined the segment that held `from` (or the ledger noted a gap there): then
            // the reader goes on with the first record kept, and says what it skipped.
            let (fs, dir) = r.paths();
            let explained = crate::tools::quarantined_lsns(fs, &dir)?
                .iter()
                .any(|q| *q <= from);
            if !explained {
                return Err(WalError::Truncated {
                    requested: from,
                    first_available: first.first_lsn(),
                });
            }
            tracing::warn!(from = %from, first = %first.first_lsn(), "lsn {from}..={} are quarantined: reading on from {}", first.0 - 1, first.first_lsn());
        }
        // The segment holding `from`: the last one starting at or before it.
        let id = ids
            .iter()
            .rev()
            .copied()
            .find(|id| id.0 <= from.0)
            .unwrap_or(first);
        r.open_segment(id)?;
        Ok(r)
    }

    fn paths(&self) -> (&dyn FileSystem, PathBuf) {
        match &self.source {
            Source::Live(inner) => (&*inner.fs, inner.dir.clone()),
            Source::Offline { fs, dir, .. } => (&**fs, dir.clone()),
        }
    }

    fn open_segment(&mut self, id: SegmentId) -> Result<(), WalError> {
        let (fs, dir) = self.paths();
        let path = dir.join(segment_file_name(id));
        let file = match fs.open(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let first = self
                    .view_first()
                    .map_or(Lsn(id.0.saturating_add(1)), |f| f.first_lsn());
                return Err(WalError::Truncated {
                    requested: id.first_lsn(),
                    first_available: first,
                });
            }
            // Out of descriptors: the reader stays at the end of the segment it has, so the
            // next call tries again (FilesExhausted is transient).
            Err(e) => return Err(WalError::io_opening("open segment", path, e)),
        };
        let sealed_len = match &self.source {
            Source::Offline { .. } => Some(
                file.len()
                    .map_err(|e| WalError::io("stat segment", &path, e))?,
            ),
            Source::Live(_) => None,
        };
        match SegmentScan::open(id, file).map_err(|e| WalError::io("read segment", &path, e))? {
            Ok(scan) => {
                self.scan = Some(scan);
                self.sealed_len = sealed_len;
                Ok(())
            }
            Err(reason) => Err(WalError::Corrupt {
                segment: id,
                offset: 0,
                reason,
            }),
        }
    }

    fn view_first(&self) -> Option<SegmentId> {
        match &self.source {
            Source::Live(inner) => inner.lock_segs().list.keys().next().copied(),
            Source::Offline { ids, .. } => ids.first().copied(),
        }
    }

    fn view(&mut self, id: SegmentId) -> Result<View, WalError> {
        match &self.source {
            Source::Live(inner) => {
                let s = inner.lock_segs();
                let next = s
                    .list
                    .range((Excluded(id), Unbounded))
                    .next()
                    .map(|(k, _)| *k);
                let first = s.list.keys().next().copied();
                let limit = match (s.list.get(&id), next) {
                    (Some(m), _) => m.len,
                    // Deleted behind our back: our handle still reads it, and only sealed
                    // segments are deleted, so its current length is final.
                    (None, _) => match (self.sealed_len, self.scan.as_ref()) {
                        (Some(len), _) => len,
                        (None, Some(scan)) => scan
                            .file_len()
                            .map_err(|e| WalError::io("stat segment", segment_file_name(id), e))?,
                        (None, None) => 0,
                    },
                };
                if next.is_some() && self.sealed_len.is_none() {
                    self.sealed_len = Some(limit);
                }
                Ok(View {
                    limit,
                    durable: s.durable_lsn,
                    next,
                    first,
                })
            }
            Source::Offline { ids, durable, .. } => {
                let next = ids.iter().copied().find(|n| n.0 > id.0);
                Ok(View {
                    limit: self.sealed_len.unwrap_or(0),
                    durable: *durable,
                    next,
                    first: ids.first().copied(),
                })
            }
        }
    }

    /// The next record, or `None` when caught up (live) or at the end (offline). Not an
    /// `Iterator`: the record borrows from the reader's buffer.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<RecordRef<'_>>, WalError> {
        let (lsn, start, len) = loop {
            let Some(id) = self.scan.as_ref().map(|s| s.id) else {
                return Ok(None);
            };
            let view = self.view(id)?;
            let offline = matches!(self.source, Source::Offline { .. });
            let Some(scan) = self.scan.as_mut() else {
                return Ok(None);
            };
            if scan.expected > view.durable {
                return Ok(None);
            }
            let step = scan
                .step(view.limit)
                .map_err(|e| WalError::io("read segment", segment_file_name(id), e))?;
            match step {
                Step::Record {
                    lsn,
                    body_start,
                    body_len,
                    ..
                } => {
                    if lsn < self.from {
                        continue;
                    }
                    break (lsn, body_start, body_len);
                }
                Step::Invalid { offset, reason } => {
                    if offline && view.next.is_none() {
                        // The torn tail of the last segment: recovery would truncate it.
                        return Ok(None);
                    }
                    return Err(WalError::Corrupt {
                        segment: id,
                        offset,
                        reason,
                    });
                }
                Step::End => {
                    let Some(next) = view.next else {
                        return Ok(None);
                    };
                    let expected = scan.expected;
                    let pos = scan.pos;
                    if next.first_lsn() != expected {
                        if view.first.is_some_and(|f| f.0 > expected.0) {
                            return Err(WalError::Truncated {
                                requested: expected,
                                first_available: next.first_lsn(),
                            });
                        }
                        let (fs, dir) = self.paths();
                        if next.first_lsn() > expected
                            && crate::tools::quarantined_lsns(fs, &dir)?.contains(&expected)
                        {
                            // An operator quarantined the segment(s) of the gap, or the ledger
                            // was ahead of the log at open: skip it, and say so.
                            tracing::warn!(first = %expected, last = next.0 - 1, "lsn {expected}..={} are quarantined: the reader skips them", next.0 - 1);
                            self.open_segment(next)?;
                            continue;
                        }
                        return Err(WalError::Corrupt {
                            segment: id,
                            offset: pos,
                            reason: format!("segment ends before lsn {expected} but the next segment starts at {}", next.0),
                        });
                    }
                    self.open_segment(next)?;
                }
            }
        };
        // Set in the loop above, which only breaks with a scan in place.
        let scan = self.scan.as_ref().ok_or(WalError::Closed)?;
        Ok(Some(RecordRef {
            lsn,
            body: scan.body(start, len),
        }))
    }
}
