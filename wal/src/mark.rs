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
use std::path::Path;
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
    /// The mark file.
    file: Arc<dyn WalFile>,
    /// Whether a failed update was logged already (it is logged once, not per group).
    failure_logged: bool,
}

impl DurableMark {
    /// Creates the mark afresh with `lsn` (a left-over file is removed first, so a planted
    /// symbolic link is never written through: the new file is created exclusively). The
    /// removal is made durable first (see the module doc).
    pub(crate) fn create(fs: &dyn FileSystem, dir: &Path, lsn: Lsn) -> Result<Self, WalError> {
        let path = dir.join(DURABLE_MARK_FILE);
        match fs.remove(&path) {
            Ok(()) => {
                fs.sync_dir(dir)
                    .map_err(|e| WalError::io("fsync directory", dir, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("remove durable mark", path, e)),
        }
        let file = fs
            .create(&path)
            .map_err(|e| WalError::io("create durable mark", &path, e))?;
        write_all_at(&*file, &encode(lsn), 0)
            .map_err(|e| WalError::io("write durable mark", &path, e))?;
        Ok(DurableMark {
            file,
            failure_logged: false,
        })
    }

    /// Publishes `lsn` as durable. A failure only makes offline readers stop earlier, so it is
    /// logged, not fatal.
    pub(crate) fn publish(&mut self, lsn: Lsn) {
        if let Err(e) = write_all_at(&*self.file, &encode(lsn), 0) {
            if !self.failure_logged {
                self.failure_logged = true;
                tracing::warn!(error = %e, "cannot update the durable mark; offline readers stop at its last value");
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
