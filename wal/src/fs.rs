//! The [`FileSystem`] trait: every file operation of the WAL goes through it, so tests can swap
//! the real disk ([`StdFs`]) for the fault-injecting in-memory [`crate::FaultyFs`].
//!
//! Files are addressed by offset (`read_at`/`write_at`), which keeps readers and the writer
//! independent of each other's file position. A write may be short; callers loop.

use std::any::Any;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// What the WAL needs to know about a file.
#[derive(Debug, Clone, Copy)]
pub struct FileMeta {
    /// Length in bytes.
    pub len: u64,
    /// Last modification time (used as the sealing time of segments found at open).
    pub modified: SystemTime,
}

/// An open file.
#[allow(clippy::len_without_is_empty)] // a fallible length; emptiness is never asked
pub trait WalFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes up to `buf.len()` bytes at `offset`; may write fewer (a short write).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`: makes the written data (and the length) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current length.
    fn len(&self) -> io::Result<u64>;
}

/// A held exclusive lock, from [`FileSystem::lock_exclusive`]; dropping it releases the lock.
pub struct WalLock {
    /// Whatever keeps the lock held (the locked file for [`StdFs`]); released by its drop.
    _held: Box<dyn Any + Send + Sync>,
}

impl WalLock {
    /// Wraps what keeps a lock held: the lock lasts until `held` is dropped.
    pub fn new(held: impl Any + Send + Sync) -> Self {
        WalLock {
            _held: Box::new(held),
        }
    }
}

impl std::fmt::Debug for WalLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalLock").finish_non_exhaustive()
    }
}

/// The file operations of the WAL.
pub trait FileSystem: Send + Sync + 'static {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new file for reading and writing; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn WalFile>>;
    /// Opens an existing file, for writing too when `writable`.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn WalFile>>;
    /// Renames a file, replacing the target.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Renames a file unless the target exists, in which case it fails with
    /// [`io::ErrorKind::AlreadyExists`] and changes nothing. The default checks first, which is
    /// only safe where nobody else creates files in the target's directory; [`StdFs`] and
    /// [`crate::FaultyFs`] do it atomically.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self.metadata(to) {
            Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.rename(from, to),
            Err(e) => Err(e),
        }
    }
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsyncs a directory so created, renamed and removed entries are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Length and modification time of a file.
    fn metadata(&self, path: &Path) -> io::Result<FileMeta>;
    /// Takes an exclusive advisory lock on the file at `path`, creating it if needed, without
    /// waiting: fails with [`io::ErrorKind::WouldBlock`] while anyone else holds it (another
    /// process, or another lock taken in this process). Held until the returned guard drops, or
    /// the process dies.
    fn lock_exclusive(&self, path: &Path) -> io::Result<WalLock>;
}

/// Permissions of a lock file the WAL creates: only its owner needs it.
const LOCK_FILE_MODE: u32 = 0o600;

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdFs;

struct StdFile(File);

impl WalFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl FileSystem for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            // Names that are not UTF-8 cannot be ours; skip them.
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn WalFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn WalFile>> {
        let f = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        // A hard link fails atomically with EEXIST when the target exists (renameat2 with
        // RENAME_NOREPLACE would need unsafe code, which this crate forbids). A crash between the
        // link and the unlink leaves the file under both names, which loses nothing.
        match std::fs::hard_link(from, to) {
            Ok(()) => std::fs::remove_file(from),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
            // A filesystem without hard links: check, then rename (the caller holds the WAL's
            // lock, so no other writer of this directory races it).
            Err(_) => match std::fs::symlink_metadata(to) {
                Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::rename(from, to),
                Err(e) => Err(e),
            },
        }
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        let m = std::fs::metadata(path)?;
        Ok(FileMeta {
            len: m.len(),
            modified: m.modified()?,
        })
    }
    fn lock_exclusive(&self, path: &Path) -> io::Result<WalLock> {
        // The file is never followed through a symbolic link (O_NOFOLLOW: a link planted by
        // another user would otherwise make a root relay create or lock its target), never
        // truncated and never written: its content means nothing. O_NONBLOCK keeps the open of
        // a planted FIFO from hanging; it changes nothing for a regular file.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(LOCK_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        if !f.metadata()?.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        // `flock(LOCK_EX | LOCK_NB)`: the lock belongs to this open file description, so a second
        // lock from this process conflicts too, and the kernel drops it when the process dies.
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "held by another process or handle",
                ))
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        Ok(WalLock::new(f))
    }
}

/// Reads exactly `buf.len()` bytes at `offset` unless the file ends first; returns how many
/// bytes were read (a short count means end of file).
pub(crate) fn read_full_at(file: &dyn WalFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`, looping over short writes.
pub(crate) fn write_all_at(file: &dyn WalFile, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write returned 0 bytes",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// errno of "no space left on device" (Linux).
const ENOSPC: i32 = 28;
/// errno of "disk quota exceeded" (Linux): for the WAL the same as a full disk, since space
/// comes back the same way (retention frees it, or an operator does).
const EDQUOT: i32 = 122;
/// errno of "too many open files" in this process (Linux).
const EMFILE: i32 = 24;
/// errno of "too many open files in system" (Linux).
const ENFILE: i32 = 23;

/// Whether an I/O error means "no space left": the device is full or the quota is used up.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// Whether an I/O error means "out of file descriptors" (EMFILE or ENFILE): nothing was opened,
/// and an open succeeds again once descriptors are freed.
pub(crate) fn is_files_exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}
