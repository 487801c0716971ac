//! Offline tools for operators, behind `prism-relay wal inspect|verify|dump`: list segments,
//! verify every record of a directory, read records read-only, explain what retention deletes
//! next ([`retention_plan`]), quarantine a corrupt segment.
//! They never modify a segment and work next to a running relay: [`read_dir`] only probes the
//! WAL's lock (for an instant, when it is free) to learn whether a live writer's durable mark
//! bounds what it may hand out. `quarantine_segment` takes the lock and fails with
//! [`WalError::Locked`] while the relay runs.

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

/// Most quarantined files of one segment name (`<name>`, `<name>.1`, ...): the same segment name
/// is quarantined again only after a WAL reset, so a handful is plenty; the bound keeps the
/// search for a free name finite.
const QUARANTINE_NAMES_MAX: u32 = 1000;

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

/// The LSNs that files in `dir/quarantine/` are named by: quarantined segments
/// (`<lsn>.wal`, `<lsn>.wal.N`) and gap notes (`<lsn>.gap`, written at open when the ledger was
/// ahead of the log). Each explains a gap that starts at its LSN; none without the folder.
pub(crate) fn quarantined_lsns(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<Lsn>, WalError> {
    let qdir = dir.join(QUARANTINE_DIR);
    let names = match fs.list(&qdir) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WalError::io_opening("list directory", qdir, e)),
    };
    let mut lsns: Vec<Lsn> = names
        .iter()
        .filter_map(|n| {
            let (digits, rest) = n.split_at_checked(SEGMENT_NAME_DIGITS)?;
            let ours = rest.starts_with(crate::segment::SEGMENT_SUFFIX) || rest == GAP_NOTE_SUFFIX;
            let all_digits = digits.bytes().all(|b| b.is_ascii_digit());
            (ours && all_digits).then(|| digits.parse().ok().map(Lsn))?
        })
        .collect();
    lsns.sort();
    Ok(lsns)
}

/// Suffix of a gap note in the quarantine folder.
pub(crate) const GAP_NOTE_SUFFIX: &str = ".gap";

/// Digits of the zero-padded LSN that starts the names of segments and gap notes.
const SEGMENT_NAME_DIGITS: usize = 20;

/// Records, durably, that the LSNs of `gap` are missing from the log on purpose (consumed by the
/// ledger, then lost or quarantined), so readers may cross the gap: `quarantine/<first>.gap`.
pub(crate) fn write_gap_note(
    fs: &dyn FileSystem,
    dir: &Path,
    gap: crate::LsnRange,
) -> Result<(), WalError> {
    let qdir = dir.join(QUARANTINE_DIR);
    fs.create_dir_all(&qdir)
        .map_err(|e| WalError::io("create quarantine directory", &qdir, e))?;
    let path = qdir.join(format!("{:020}{GAP_NOTE_SUFFIX}", gap.first.0));
    let file = match fs.create(&path) {
        Ok(f) => f,
        // A note for the same start exists already (an earlier open crashed after writing it).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        // No room for even an empty file: transient, nothing was created.
        Err(e) if crate::fs::is_disk_full(&e) => return Err(WalError::DiskFull { path }),
        Err(e) => return Err(WalError::io_opening("create gap note", &path, e)),
    };
    let text = format!(
        "lsn {}..={} were consumed by the ledger but missing from the log at open (segment \
         quarantined or lost); numbering continued at {}\n",
        gap.first,
        gap.last,
        gap.last.next()
    );
    // The note's name is what readers go by; its text only explains it to an operator, so a
    // disk too full for the text leaves an empty (or partial) note that still counts.
    match crate::fs::write_all_at(&*file, text.as_bytes(), 0) {
        Ok(()) => {}
        Err(e) if crate::fs::is_disk_full(&e) => {
            tracing::warn!(path = %path.display(), "disk full: the gap note is written without its text");
        }
        Err(e) => return Err(WalError::io("write gap note", &path, e)),
    }
    file.sync_data()
        .map_err(|e| WalError::io("fdatasync gap note", &path, e))?;
    fs.sync_dir(&qdir)
        .map_err(|e| WalError::io("fsync directory", &qdir, e))?;
    fs.sync_dir(dir)
        .map_err(|e| WalError::io("fsync directory", dir, e))?;
    Ok(())
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
    verify_with_options(fs, dir, &crate::WalOptions::default())
}

/// [`verify`] through `fs`, telling a torn tail of the last segment from corruption as
/// [`crate::Wal::open`] with `opts` would (its `group_bytes_max` bounds a torn tail; a bad record
/// the ledger has consumed, or one the durable mark covers, is corruption).
pub fn verify_with_options(
    fs: &dyn FileSystem,
    dir: &Path,
    opts: &crate::WalOptions,
) -> Result<VerifyReport, WalError> {
    let ids = segment_ids(fs, dir)?;
    // A ledger that does not load is no evidence either way; `wal inspect` reports it.
    let ledger_end = crate::ledger::load(fs, dir).map_or(Lsn::ZERO, |l| l.end());
    // The mark recovery would read: the live writer's, or the one a crashed writer left.
    let evidence = crate::wal::Evidence {
        ledger_end,
        mark: crate::mark::read(fs, dir),
    };
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
        let mut scan = match SegmentScan::open(id, file.clone()).map_err(io_err)? {
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
                        let explained = next.first_lsn() > scan.expected
                            && quarantined_lsns(fs, dir)?.contains(&scan.expected);
                        if next.first_lsn() != scan.expected && !explained {
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
                    let corrupt = if is_last {
                        crate::wal::not_a_torn_tail(
                            &*file,
                            offset,
                            len,
                            scan.expected,
                            evidence,
                            opts.group_bytes_max,
                        )
                        .map_err(io_err)?
                    } else {
                        None
                    };
                    if is_last && corrupt.is_none() {
                        report.torn_tail = Some(TornTail {
                            segment: id,
                            offset,
                            bytes_dropped: len - offset,
                            reason,
                        });
                    } else {
                        let reason = match corrupt {
                            Some(why) => format!("{reason}; not a torn tail: {why}"),
                            None => reason,
                        };
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
    let durable = live_writer_durable(&*fs, dir)?;
    Reader::offline(fs, dir.to_path_buf(), ids, from, durable)
}

/// How far an offline reader may read: the durable mark while a live writer holds the
/// directory's lock (records past it are written but their fdatasync has not returned), and
/// everything (`Lsn(u64::MAX)`, as recovery would see the directory) when nobody holds it.
///
/// Probing takes the lock for an instant when it is free; a relay opening the directory in
/// that instant fails with [`WalError::Locked`] and is restarted by its supervisor.
fn live_writer_durable(fs: &dyn FileSystem, dir: &Path) -> Result<Lsn, WalError> {
    match crate::wal::lock_dir(fs, dir) {
        Ok(lock) => {
            drop(lock);
            Ok(Lsn(u64::MAX))
        }
        Err(WalError::Locked { .. }) => Ok(crate::mark::read(fs, dir).unwrap_or_else(|| {
            // A writer without a valid mark (one from before marks existed): nothing tells
            // how far its records are durable; read what is there, as before marks existed.
            tracing::warn!(dir = %dir.display(), "a writer holds the WAL but its durable mark is unreadable; reading to the end of the files");
            Lsn(u64::MAX)
        })),
        // A directory this user cannot lock (read-only access): believe a mark if there is one,
        // which errs on the side of stopping early.
        Err(_) => Ok(crate::mark::read(fs, dir).unwrap_or(Lsn(u64::MAX))),
    }
}

/// Moves a segment into `dir/quarantine/` and fsyncs both directories; returns its new path.
/// Never replaces a file already there: the segment gets the first free name of
/// `<segment>.wal`, `<segment>.wal.1`, `<segment>.wal.2`, ...
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
    let name = segment_file_name(segment);
    let mut moved = None;
    for n in 0..QUARANTINE_NAMES_MAX {
        // An earlier quarantined file of the same name (from before the WAL was reset, or a
        // segment quarantined, restored and quarantined again) is evidence too: keep it.
        let to = if n == 0 {
            qdir.join(&name)
        } else {
            qdir.join(format!("{name}.{n}"))
        };
        match fs.rename_noreplace(&from, &to) {
            Ok(()) => {
                moved = Some(to);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(WalError::io("move segment to quarantine", &from, e)),
        }
    }
    let Some(to) = moved else {
        return Err(WalError::io(
            "move segment to quarantine",
            &from,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{QUARANTINE_NAMES_MAX} quarantined files of this name exist already"),
            ),
        ));
    };
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
