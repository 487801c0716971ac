//! The durable mark: the last LSN covered by a returned fdatasync, published by the writer for
//! offline readers in other processes (`wal dump`, `replay`) while the relay runs.
//!
//! The file `durable` in the WAL directory is rewritten in place (one `pwrite` of
//! [`MARK_BYTES`] bytes at offset 0) after every group's fdatasync has returned, and never
//! synced itself: the page cache is shared by every process of the machine, so a reader there
//! sees the value at once, and the cost per group is one small write without an fsync. A
//! crash may leave a stale or missing mark; offline readers only believe it while a live writer
//! holds the directory's lock (see `tools::read_dir`), and the writer rewrites it at open.
//!
//! Recovery reads the mark a crashed writer left as evidence: a bad record at or below it was
//! acknowledged, so it is corruption, not a torn tail (see `wal::Evidence`). That needs every
//! value the mark ever held to stay at or below the log's durable end. Within one writer it does
//! (the log only grows past it); at open, records may have gone (a torn tail, a quarantined
//! segment) and their LSNs are given out again, so the old mark file is removed and the removal
//! made durable (a directory fsync) before the new one is created: an older file can then never
//! come back after a machine crash with a value from before the LSNs were reused.
//!
//! Layout (little-endian): magic `PRSMDUR\0` (8) | lsn u64 | crc u32 of the lsn bytes.

use crate::error::WalError;
use crate::fs::{read_full_at, write_all_at, FileSystem, WalFile};
use crate::types::Lsn;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the durable mark in the WAL directory.
pub const DURABLE_MARK_FILE: &str = "durable";
const MARK_MAGIC: [u8; 8] = *b"PRSMDUR\0";
/// Size of the mark.
const MARK_BYTES: usize = 20;
/// Reads of a mark that fails its checksum before giving up: a read can overlap the writer's
/// rewrite, which the next read no longer does.
const MARK_READ_ATTEMPTS_MAX: u32 = 8;

const _: () = assert!(MARK_BYTES == 8 + 8 + 4);

fn encode(lsn: Lsn) -> [u8; MARK_BYTES] {
    let mut b = [0u8; MARK_BYTES];
    b[0..8].copy_from_slice(&MARK_MAGIC);
    b[8..16].copy_from_slice(&lsn.0.to_le_bytes());
    let crc = crc32fast::hash(&b[8..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Lsn> {
    if b.len() != MARK_BYTES || b[0..8] != MARK_MAGIC {
        return None;
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&b[16..20]);
    if u32::from_le_bytes(crc) != crc32fast::hash(&b[8..16]) {
        return None;
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&b[8..16]);
    Some(Lsn(u64::from_le_bytes(lsn)))
}

/// The writer's handle on the mark.
pub(crate) struct DurableMark {
    /// The file system and the mark's path, to create the mark once it could not be.
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    /// The mark file; `None` while it could not be created (a full disk at open).
    file: Option<Arc<dyn WalFile>>,
    /// Whether a failed update was logged already (it is logged once, not per group).
    failure_logged: bool,
}

impl DurableMark {
    /// Creates the mark afresh with `lsn` (a left-over file is removed first, so a planted
    /// symbolic link is never written through: the new file is created exclusively). The
    /// removal is made durable first (see the module doc).
    ///
    /// Creating and writing the new mark is best effort: on a full disk (or without a free file
    /// descriptor) the writer starts without one and creates it at a later publish, so a restart
    /// on a disk that stays full does not fail. Only a failure to take the old mark away is an
    /// error, since that needs no space.
    pub(crate) fn create(fs: Arc<dyn FileSystem>, dir: &Path, lsn: Lsn) -> Result<Self, WalError> {
        let path = dir.join(DURABLE_MARK_FILE);
        match fs.remove(&path) {
            Ok(()) => {
                fs.sync_dir(dir)
                    .map_err(|e| WalError::io("fsync directory", dir, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("remove durable mark", path, e)),
        }
        let mut mark = DurableMark {
            fs,
            path,
            file: None,
            failure_logged: false,
        };
        mark.publish(lsn);
        Ok(mark)
    }

    /// Creates the mark file holding `lsn`; on failure nothing is left behind.
    fn create_file(&self, lsn: Lsn) -> std::io::Result<Arc<dyn WalFile>> {
        let file = self.fs.create(&self.path)?;
        if let Err(e) = write_all_at(&*file, &encode(lsn), 0) {
            drop(file);
            // A file without a valid mark reads as no mark; removing it only keeps the next
            // attempt's exclusive create from failing.
            let _ = self.fs.remove(&self.path);
            return Err(e);
        }
        Ok(file)
    }

    /// Publishes `lsn` as durable (creating the mark if it could not be created before). A
    /// failure only makes offline readers stop earlier, so it is logged, not fatal.
    pub(crate) fn publish(&mut self, lsn: Lsn) {
        let result = match &self.file {
            Some(file) => write_all_at(&**file, &encode(lsn), 0),
            None => self.create_file(lsn).map(|file| {
                self.file = Some(file);
            }),
        };
        match result {
            Ok(()) => {
                if std::mem::take(&mut self.failure_logged) {
                    tracing::info!(path = %self.path.display(), "the durable mark is written again");
                }
            }
            Err(e) => {
                if !self.failure_logged {
                    self.failure_logged = true;
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the durable mark; offline readers next to this relay do not see how far the log is durable");
                }
            }
        }
    }
}

/// The durable LSN the live writer of `dir` published; `None` when there is no valid mark.
pub(crate) fn read(fs: &dyn FileSystem, dir: &Path) -> Option<Lsn> {
    let file = fs.open(&dir.join(DURABLE_MARK_FILE), false).ok()?;
    for _ in 0..MARK_READ_ATTEMPTS_MAX {
        let mut b = [0u8; MARK_BYTES];
        let n = read_full_at(&*file, &mut b, 0).ok()?;
        if let Some(lsn) = decode(&b[..n]) {
            return Some(lsn);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_round_trips_and_any_flipped_bit_is_refused() {
        let b = encode(Lsn(4711));
        assert_eq!(decode(&b), Some(Lsn(4711)));
        for i in 0..MARK_BYTES * 8 {
            let mut bad = b;
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(decode(&bad), None, "bit {i}");
        }
        assert_eq!(decode(&b[..MARK_BYTES - 1]), None);
    }
}
