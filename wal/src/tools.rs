//! Offline tools for operators, behind `prism-relay wal inspect|verify|dump`: list segments,
//! verify every record of a directory, read records read-only, explain what retention deletes
//! next ([`retention_plan`]), quarantine a corrupt segment.
//! They never modify a segment and take no lock, so they work next to a running relay, except
//! `quarantine_segment`, which takes the WAL's lock and fails with [`WalError::Locked`] while
//! the relay runs.

use crate::error::WalError;
use crate::fs::{FileSystem, StdFs};
use crate::reader::Reader;
use crate::segment::{parse_segment_name, segment_file_name, SegmentScan, Step};
use crate::types::{Lsn, SegmentId};
use crate::wal::TornTail;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the folder corrupt segments are moved into.
pub const QUARANTINE_DIR: &str = "quarantine";

/// One segment as listed by [`list_segments`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment.
    pub id: SegmentId,
    /// Its file.
    pub path: PathBuf,
    /// File size.
    pub bytes: u64,
    /// First LSN (from the name).
    pub first_lsn: Lsn,
    /// Last LSN: from the next segment's name for sealed segments, by scanning for the last
    /// one; `None` if the segment holds no record.
    pub last_lsn: Option<Lsn>,
}

/// A problem found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentProblem {
    /// The segment.
    pub segment: SegmentId,
    /// Byte offset of the bad record or header.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Segments checked.
    pub segments: usize,
    /// Valid records seen.
    pub records: u64,
    /// Bytes of all segments.
    pub bytes: u64,
    /// First LSN on disk.
    pub first_lsn: Option<Lsn>,
    /// Last valid LSN.
    pub last_lsn: Option<Lsn>,
    /// Corruption: in a sealed segment, a bad header, or an envelope that does not decode.
    pub problems: Vec<SegmentProblem>,
    /// A torn tail of the last segment (recovery would truncate it; not a problem).
    pub torn_tail: Option<TornTail>,
}

impl VerifyReport {
    /// Whether no corruption was found (a torn tail is not corruption).
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn segment_ids(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<SegmentId>, WalError> {
    let names = fs
        .list(dir)
        .map_err(|e| WalError::io("list directory", dir, e))?;
    let mut ids: Vec<SegmentId> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    ids.sort();
    Ok(ids)
}

/// Lists the segments of `dir` with their LSN ranges and sizes; scans only the last segment.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentInfo>, WalError> {
    list_segments_with_fs(&StdFs, dir)
}

/// [`list_segments`] through `fs`.
pub fn list_segments_with_fs(
    fs: &dyn FileSystem,
    dir: &Path,
) -> Result<Vec<SegmentInfo>, WalError> {
    let ids = segment_ids(fs, dir)?;
    let mut out = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        let path = dir.join(segment_file_name(id));
        let bytes = fs
            .metadata(&path)
            .map_err(|e| WalError::io("stat segment", &path, e))?
            .len;
        let last_lsn = match ids.get(i + 1) {
            Some(next) => (next.0 > id.0).then(|| Lsn(next.0 - 1)),
            None => {
                let mut last = None;
                let file = fs
                    .open(&path, false)
                    .map_err(|e| WalError::io("open segment", &path, e))?;
                if let Ok(mut scan) = SegmentScan::open(id, file)
                    .map_err(|e| WalError::io("read segment", &path, e))?
                {
                    while let Step::Record { lsn, .. } = scan
                        .step(bytes)
                        .map_err(|e| WalError::io("read segment", &path, e))?
                    {
                        last = Some(lsn);
                    }
                }
                last
            }
        };
        out.push(SegmentInfo {
            id,
            path,
            bytes,
            first_lsn: id.first_lsn(),
            last_lsn,
        });
    }
    Ok(out)
}

/// Scans every record of every segment of `dir`: CRCs, LSN continuity within and across
/// segments, and envelope decoding. Reads only.
pub fn verify(dir: &Path) -> Result<VerifyReport, WalError> {
    verify_with_fs(&StdFs, dir)
}

/// [`verify`] through `fs`.
pub fn verify_with_fs(fs: &dyn FileSystem, dir: &Path) -> Result<VerifyReport, WalError> {
    let ids = segment_ids(fs, dir)?;
    let mut report = VerifyReport {
        segments: ids.len(),
        first_lsn: ids.first().map(|i| i.first_lsn()),
        ..Default::default()
    };
    for (i, &id) in ids.iter().enumerate() {
        let is_last = i + 1 == ids.len();
        let path = dir.join(segment_file_name(id));
        let io_err = |e| WalError::io("read segment", &path, e);
        let file = fs
            .open(&path, false)
            .map_err(|e| WalError::io("open segment", &path, e))?;
        let len = file.len().map_err(io_err)?;
        report.bytes += len;
        let mut scan = match SegmentScan::open(id, file).map_err(io_err)? {
            Ok(s) => s,
            Err(reason) => {
                if is_last && len < crate::segment::SEGMENT_HEADER_BYTES as u64 {
                    report.torn_tail = Some(TornTail {
                        segment: id,
                        offset: 0,
                        bytes_dropped: len,
                        reason,
                    });
                } else {
                    report.problems.push(SegmentProblem {
                        segment: id,
                        offset: 0,
                        reason,
                    });
                }
                continue;
            }
        };
        loop {
            match scan.step(len).map_err(io_err)? {
                Step::Record {
                    lsn,
                    offset,
                    body_start,
                    body_len,
                } => {
                    report.records += 1;
                    report.last_lsn = Some(lsn);
                    let body = scan.body(body_start, body_len);
                    if let Err(e) = bincode::deserialize::<crate::Envelope<'_>>(body) {
                        report.problems.push(SegmentProblem {
                            segment: id,
                            offset,
                            reason: format!("envelope of lsn {lsn} does not decode: {e}"),
                        });
                    }
                }
                Step::End => {
                    if let Some(next) = ids.get(i + 1) {
                        if next.first_lsn() != scan.expected {
                            report.problems.push(SegmentProblem {
                                segment: id,
                                offset: scan.pos,
                                reason: format!(
                                    "segment ends before lsn {} but the next segment starts at {}",
                                    scan.expected, next.0
                                ),
                            });
                        }
                    }
                    break;
                }
                Step::Invalid { offset, reason } => {
                    if is_last {
                        report.torn_tail = Some(TornTail {
                            segment: id,
                            offset,
                            bytes_dropped: len - offset,
                            reason,
                        });
                    } else {
                        report.problems.push(SegmentProblem {
                            segment: id,
                            offset,
                            reason,
                        });
                    }
                    break;
                }
            }
        }
    }
    Ok(report)
}

/// A read-only reader over the records of `dir` from `from`, as they are on disk (for
/// `wal dump`). A torn tail of the last segment ends it; corruption elsewhere is an error.
pub fn read_dir(dir: &Path, from: Lsn) -> Result<Reader, WalError> {
    read_dir_with_fs(Arc::new(StdFs), dir, from)
}

/// [`read_dir`] through `fs`.
pub fn read_dir_with_fs(
    fs: Arc<dyn FileSystem>,
    dir: &Path,
    from: Lsn,
) -> Result<Reader, WalError> {
    let ids = segment_ids(&*fs, dir)?;
    Reader::offline(fs, dir.to_path_buf(), ids, from)
}

/// Moves a segment into `dir/quarantine/` and fsyncs both directories; returns its new path.
/// Only while the WAL is not open (the relay would otherwise still count it): holds the WAL's
/// lock meanwhile and fails with [`WalError::Locked`] if a relay (or a [`crate::Wal`]) has it.
pub fn quarantine_segment(dir: &Path, segment: SegmentId) -> Result<PathBuf, WalError> {
    quarantine_segment_with_fs(&StdFs, dir, segment)
}

/// [`quarantine_segment`] through `fs`.
pub fn quarantine_segment_with_fs(
    fs: &dyn FileSystem,
    dir: &Path,
    segment: SegmentId,
) -> Result<PathBuf, WalError> {
    let _lock = crate::wal::lock_dir(fs, dir)?;
    let qdir = dir.join(QUARANTINE_DIR);
    fs.create_dir_all(&qdir)
        .map_err(|e| WalError::io("create quarantine directory", &qdir, e))?;
    let from = dir.join(segment_file_name(segment));
    let to = qdir.join(segment_file_name(segment));
    fs.rename(&from, &to)
        .map_err(|e| WalError::io("move segment to quarantine", &from, e))?;
    fs.sync_dir(&qdir)
        .map_err(|e| WalError::io("fsync directory", &qdir, e))?;
    fs.sync_dir(dir)
        .map_err(|e| WalError::io("fsync directory", dir, e))?;
    Ok(to)
}

/// Reads the ledger of `dir` without opening the WAL (for `wal inspect`); an empty ledger if
/// none was written yet.
pub fn load_ledger(dir: &Path) -> Result<crate::Ledger, WalError> {
    crate::ledger::load(&StdFs, dir)
}

/// What retention will do with one segment, as [`retention_plan`] explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentFate {
    /// Not released: some cursor or in-flight batch still needs it, or it is the active segment.
    Held {
        /// Why, in words.
        reason: String,
    },
    /// Released and over a retention limit: the next ledger commit (or retention check) of the
    /// relay deletes it.
    DeletedNext {
        /// The limit it is over, in words.
        reason: String,
    },
    /// Released but within every limit: kept for replay.
    Kept {
        /// When age alone will make it go, in seconds from now (0: it is already that old).
        expires_in_s: u64,
        /// What else would make it go sooner, in words.
        reason: String,
    },
}

/// Which segments retention deletes next and why, from the directory and its ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Records below this LSN are released (no cursor needs them); `None` without cursors.
    pub release_point: Option<Lsn>,
    /// Every segment, oldest first, with its fate.
    pub segments: Vec<(SegmentId, SegmentFate)>,
}

/// Explains what retention will do with the segments of `dir` under `retention` and a disk
/// budget of `budget_bytes_max`, as the writer's retention pass would decide it now: released
/// segments (wholly below the ledger's release point) are deleted oldest first while one of the
/// limits is exceeded. Segment ages count from the files' modification times, which is what a
/// relay opening the directory uses. Reads only; takes no lock.
pub fn retention_plan(
    dir: &Path,
    retention: crate::Retention,
    budget_bytes_max: u64,
    now: std::time::SystemTime,
) -> Result<RetentionPlan, WalError> {
    let fs = StdFs;
    let ledger = crate::ledger::load(&fs, dir)?;
    let release = ledger.release_point();
    let ids = segment_ids(&fs, dir)?;
    let mut metas = Vec::with_capacity(ids.len());
    for id in &ids {
        let path = dir.join(segment_file_name(*id));
        metas.push(
            fs.metadata(&path)
                .map_err(|e| WalError::io("stat segment", &path, e))?,
        );
    }
    let released = match release {
        Some(point) => ids.windows(2).take_while(|w| w[1].0 <= point.0).count(),
        None => 0,
    };
    let mut bytes_on_disk: u64 = metas.iter().map(|m| m.len).sum();
    let mut released_bytes: u64 = metas[..released].iter().map(|m| m.len).sum();
    let mut released_left = released;
    let mut deleting = true;
    let mut segments = Vec::with_capacity(ids.len());
    for (i, (id, meta)) in ids.iter().zip(&metas).enumerate() {
        if i >= released {
            let reason = if i + 1 == ids.len() {
                "the active segment (the relay appends to it)".to_string()
            } else {
                match release {
                    None => "no cursor in the ledger yet: nothing is released before the \
                             relay has drained"
                        .to_string(),
                    Some(point) => holder(&ledger, point),
                }
            };
            segments.push((*id, SegmentFate::Held { reason }));
            continue;
        }
        let age = now.duration_since(meta.modified).unwrap_or_default();
        let expires_in_s = retention.age_max.saturating_sub(age).as_secs();
        let over = if released_left > retention.segments_max as usize {
            Some(format!(
                "{released_left} released segments, more than retention_segments_max {}",
                retention.segments_max
            ))
        } else if released_bytes > retention.bytes_max {
            Some(format!(
                "released segments hold {released_bytes} bytes, more than retention_bytes_max {}",
                retention.bytes_max
            ))
        } else if age > retention.age_max {
            Some(format!(
                "sealed {} s ago, older than retention_age_s {}",
                age.as_secs(),
                retention.age_max.as_secs()
            ))
        } else if bytes_on_disk >= budget_bytes_max {
            Some(format!(
                "the WAL holds {bytes_on_disk} bytes, at or over budget_bytes_max {budget_bytes_max}"
            ))
        } else {
            None
        };
        match over {
            Some(reason) if deleting => {
                bytes_on_disk -= meta.len;
                released_bytes -= meta.len;
                released_left -= 1;
                segments.push((*id, SegmentFate::DeletedNext { reason }));
            }
            _ => {
                // Retention stops at the first segment within every limit, oldest first.
                deleting = false;
                segments.push((
                    *id,
                    SegmentFate::Kept {
                        expires_in_s,
                        reason: format!(
                            "released, kept for replay until it is older than retention_age_s {} \
                             or more than retention_segments_max {} segments or \
                             retention_bytes_max {} bytes are released after it, or the budget \
                             is full",
                            retention.age_max.as_secs(),
                            retention.segments_max,
                            retention.bytes_max
                        ),
                    },
                ));
            }
        }
    }
    Ok(RetentionPlan {
        release_point: release,
        segments,
    })
}

/// Names the cursor or in-flight batch that holds the release point.
fn holder(ledger: &crate::Ledger, point: Lsn) -> String {
    if let Some((lane, batch)) = ledger.inflight.iter().find(|(_, b)| b.first == point) {
        return format!(
            "needed by the in-flight batch of {lane} ({}..={})",
            batch.first.0, batch.last.0
        );
    }
    match ledger.cursors.iter().find(|(_, c)| **c == point) {
        Some((lane, _)) => format!("needed by the cursor of {lane} at lsn {}", point.0),
        None => format!("holds records at or after the release point {}", point.0),
    }
}
