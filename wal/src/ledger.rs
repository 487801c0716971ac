//! The ledger: named cursors (one per ClickHouse table) and in-flight batches, stored in a file
//! next to the segments and replaced atomically (write `ledger.tmp`, fdatasync, rename over
//! `ledger`, fsync the directory).
//!
//! Layout (little-endian): magic `PRSMLDG\0` (8) | version u32 | body length u32 | body crc u32 |
//! body (bincode of [`Ledger`]). A ledger that fails any check is an error, never an empty
//! ledger: an empty ledger would let retention delete records nobody has consumed.

use crate::error::WalError;
use crate::fs::{is_disk_full, read_full_at, write_all_at, FileSystem};
use crate::types::Lsn;
use crate::LEDGER_BYTES_MAX;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name of the ledger in the WAL directory.
pub const LEDGER_FILE: &str = "ledger";
/// File name of the ledger while it is being written.
pub const LEDGER_TMP_FILE: &str = "ledger.tmp";
const LEDGER_MAGIC: [u8; 8] = *b"PRSMLDG\0";
const LEDGER_VERSION: u32 = 1;
pub(crate) const LEDGER_HEADER_BYTES: usize = 20;
/// Most cursors plus in-flight batches a ledger holds (one per table; a few dozen in practice).
pub const LEDGER_ENTRIES_MAX: usize = 4096;

/// Cursors and in-flight batches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Cursor per name (table): every record of that name with `lsn < cursor` is done.
    pub cursors: BTreeMap<String, Lsn>,
    /// The batch being inserted per name, re-cut identically after a crash.
    pub inflight: BTreeMap<String, InflightBatch>,
}

/// A batch cut from the WAL and not yet confirmed inserted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightBatch {
    /// First LSN of the batch.
    pub first: Lsn,
    /// Last LSN of the batch (inclusive).
    pub last: Lsn,
    /// Rows in the batch.
    pub rows: u32,
}

impl Ledger {
    /// Records below this LSN are no longer needed by anybody: the minimum of all cursors and
    /// in-flight batch starts. `None` when there are no cursors at all (then nothing is released).
    pub fn release_point(&self) -> Option<Lsn> {
        let cursors = self.cursors.values().copied().min()?;
        let inflight = self.inflight.values().map(|b| b.first).min();
        Some(inflight.map_or(cursors, |i| i.min(cursors)))
    }

    /// The LSN right after every position the ledger names: past every cursor and past the end
    /// of every in-flight batch. Every record below it was durable once (lanes read only
    /// durable records), and the WAL must never give out an LSN below it again. `Lsn::ZERO` for
    /// an empty ledger.
    pub(crate) fn end(&self) -> Lsn {
        let cursors = self.cursors.values().copied().max().unwrap_or(Lsn::ZERO);
        let inflight = self
            .inflight
            .values()
            .map(|b| b.last.next())
            .max()
            .unwrap_or(Lsn::ZERO);
        cursors.max(inflight)
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, WalError> {
        let entries = self.cursors.len() + self.inflight.len();
        if entries > LEDGER_ENTRIES_MAX {
            return Err(WalError::LedgerTooLarge {
                reason: format!("{entries} entries, limit {LEDGER_ENTRIES_MAX}"),
            });
        }
        let body = bincode::serialize(self).map_err(|e| WalError::Encode {
            reason: e.to_string(),
        })?;
        if body.len() > LEDGER_BYTES_MAX {
            return Err(WalError::LedgerTooLarge {
                reason: format!("{} bytes, limit {LEDGER_BYTES_MAX}", body.len()),
            });
        }
        let mut out = Vec::with_capacity(LEDGER_HEADER_BYTES + body.len());
        out.extend_from_slice(&LEDGER_MAGIC);
        out.extend_from_slice(&LEDGER_VERSION.to_le_bytes());
        // Cannot truncate: checked against LEDGER_BYTES_MAX, which fits in u32.
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Ledger, WalError> {
        let bad = |reason: String| WalError::LedgerCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < LEDGER_HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, shorter than the header",
                bytes.len()
            )));
        }
        if bytes[0..8] != LEDGER_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let word = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(a)
        };
        if word(8) != LEDGER_VERSION {
            return Err(bad(format!("unsupported version {}", word(8))));
        }
        let len = word(12) as usize;
        if len > LEDGER_BYTES_MAX || bytes.len() != LEDGER_HEADER_BYTES + len {
            return Err(bad(format!(
                "body length {len} does not match file length {}",
                bytes.len()
            )));
        }
        let body = &bytes[LEDGER_HEADER_BYTES..];
        if crc32fast::hash(body) != word(16) {
            return Err(bad("checksum mismatch".into()));
        }
        let ledger: Ledger =
            bincode::deserialize(body).map_err(|e| bad(format!("body does not decode: {e}")))?;
        if ledger.cursors.len() + ledger.inflight.len() > LEDGER_ENTRIES_MAX {
            return Err(bad("too many entries".into()));
        }
        Ok(ledger)
    }
}

/// Loads the ledger of `dir`; an empty ledger if there is none yet.
pub(crate) fn load(fs: &dyn FileSystem, dir: &Path) -> Result<Ledger, WalError> {
    let path = dir.join(LEDGER_FILE);
    let file = match fs.open(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
        Err(e) => return Err(WalError::io("open ledger", path, e)),
    };
    let len = file
        .len()
        .map_err(|e| WalError::io("stat ledger", &path, e))?;
    if len > (LEDGER_HEADER_BYTES + LEDGER_BYTES_MAX) as u64 {
        return Err(WalError::LedgerCorrupt {
            path,
            reason: format!("{len} bytes, larger than allowed"),
        });
    }
    let mut buf = vec![0u8; len as usize];
    let n = read_full_at(&*file, &mut buf, 0).map_err(|e| WalError::io("read ledger", &path, e))?;
    buf.truncate(n);
    Ledger::decode(&buf, &path)
}

/// Writes the ledger atomically: tmp file, fdatasync, rename, directory fsync. A full disk is
/// [`WalError::DiskFull`] (nothing changed on disk); any other failure is an I/O error.
pub(crate) fn store(fs: &dyn FileSystem, dir: &Path, ledger: &Ledger) -> Result<(), WalError> {
    let bytes = ledger.encode()?;
    let tmp: PathBuf = dir.join(LEDGER_TMP_FILE);
    let path = dir.join(LEDGER_FILE);
    match fs.remove(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(WalError::io("remove stale ledger.tmp", tmp, e)),
    }
    // A full disk fails the create or the write (never the fdatasync, whose errors stay fatal):
    // that is a transient condition the caller waits out, so the partial file is removed and
    // the old ledger stays in force.
    let file = fs.create(&tmp).map_err(|e| {
        if is_disk_full(&e) {
            WalError::DiskFull { path: tmp.clone() }
        } else {
            // Out of descriptors is transient too: nothing was created, the old ledger stands.
            WalError::io_opening("create ledger.tmp", &tmp, e)
        }
    })?;
    if let Err(e) = write_all_at(&*file, &bytes, 0) {
        drop(file);
        // Best effort: a stale ledger.tmp is removed by the next store and at open.
        let _ = fs.remove(&tmp);
        return Err(if is_disk_full(&e) {
            WalError::DiskFull { path: tmp }
        } else {
            WalError::io("write ledger.tmp", &tmp, e)
        });
    }
    file.sync_data()
        .map_err(|e| WalError::io("fdatasync ledger.tmp", &tmp, e))?;
    drop(file);
    fs.rename(&tmp, &path)
        .map_err(|e| WalError::io("rename ledger", &path, e))?;
    // Opening the directory for its fsync can run out of descriptors (the fsync itself never
    // fails with that): the new ledger is in place but maybe not durable yet, and the caller's
    // retry of the same store makes it so.
    fs.sync_dir(dir)
        .map_err(|e| WalError::io_opening("fsync directory", dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_bytes_round_trip_and_a_flipped_bit_is_an_error() {
        let mut l = Ledger::default();
        l.cursors.insert("trades".into(), Lsn(10));
        l.inflight.insert(
            "trades".into(),
            InflightBatch {
                first: Lsn(10),
                last: Lsn(20),
                rows: 11,
            },
        );
        let bytes = l.encode().unwrap();
        assert_eq!(Ledger::decode(&bytes, Path::new("x")).unwrap(), l);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Ledger::decode(&b, Path::new("x")).is_err(), "byte {i}");
        }
        assert!(Ledger::decode(&bytes[..bytes.len() - 1], Path::new("x")).is_err());
    }

    fn full_disk_wal() -> (crate::FaultyFs, crate::Wal, tempfile::TempDir) {
        let fs = crate::FaultyFs::new();
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = crate::Wal::open_with_fs(
            dir.path(),
            crate::WalOptions::default(),
            std::sync::Arc::new(fs.clone()),
        )
        .unwrap();
        (fs, wal, dir)
    }

    fn ledger_with_cursor(lsn: u64) -> Ledger {
        let mut l = Ledger::default();
        l.cursors.insert("trades".into(), Lsn(lsn));
        l
    }

    #[test]
    fn a_ledger_commit_on_a_full_disk_is_disk_full_and_leaves_the_old_ledger_in_force() {
        let (fs, wal, _dir) = full_disk_wal();
        wal.commit_ledger(&ledger_with_cursor(1)).unwrap();
        fs.enospc_after(0);
        let error = wal.commit_ledger(&ledger_with_cursor(2)).unwrap_err();
        assert!(matches!(error, WalError::DiskFull { .. }), "{error}");
        assert_eq!(wal.load_ledger().unwrap(), ledger_with_cursor(1));
    }

    #[test]
    fn the_reserve_is_given_up_to_write_the_ledger_on_a_full_disk_and_taken_back_when_room_returns()
    {
        let (fs, wal, _dir) = full_disk_wal();
        assert!(wal.ensure_reserve().unwrap());
        assert!(wal.reserve_held());
        fs.enospc_after(0);
        wal.commit_ledger(&ledger_with_cursor(2)).unwrap();
        assert_eq!(wal.load_ledger().unwrap(), ledger_with_cursor(2));
        assert!(!wal.reserve_held(), "the reserve's room went to the ledger");
        // No room for a new reserve yet: nothing partial is left behind.
        let used = fs.used_bytes();
        assert!(!wal.make_room().unwrap());
        assert_eq!(fs.used_bytes(), used);
        fs.set_capacity_bytes(None);
        assert!(wal.make_room().unwrap());
        assert!(wal.reserve_held());
    }

    #[tokio::test]
    async fn appends_fail_as_on_a_full_disk_while_the_reserve_is_given_up_so_they_cannot_take_its_room(
    ) {
        let (fs, wal, _dir) = full_disk_wal();
        let envelope = crate::Envelope {
            stream: "S".into(),
            stream_seq: crate::StreamSeq(1),
            subject: "trade.x".into(),
            headers: Vec::new(),
            published_ns: 0,
            payload: b"{}".as_slice().into(),
        };
        assert!(wal.ensure_reserve().unwrap());
        wal.append(std::slice::from_ref(&envelope)).await.unwrap();
        fs.enospc_after(0);
        wal.commit_ledger(&ledger_with_cursor(2)).unwrap();
        fs.set_capacity_bytes(None);
        let error = wal
            .append(std::slice::from_ref(&envelope))
            .await
            .unwrap_err();
        assert!(matches!(error, WalError::DiskFull { .. }), "{error}");
        assert!(wal.make_room().unwrap());
        wal.append(std::slice::from_ref(&envelope)).await.unwrap();
    }

    #[test]
    fn release_point_is_the_minimum_of_cursors_and_inflight_starts_and_none_without_cursors() {
        let mut l = Ledger::default();
        l.inflight.insert(
            "a".into(),
            InflightBatch {
                first: Lsn(3),
                last: Lsn(4),
                rows: 2,
            },
        );
        assert_eq!(l.release_point(), None);
        l.cursors.insert("a".into(), Lsn(9));
        l.cursors.insert("b".into(), Lsn(7));
        assert_eq!(l.release_point(), Some(Lsn(3)));
        l.inflight.clear();
        assert_eq!(l.release_point(), Some(Lsn(7)));
    }
}
