//! [`FaultyFs`]: an in-memory [`FileSystem`] that injects faults, for this crate's tests and for
//! other crates' (e.g. the relay's disk-full tests).
//!
//! It models what a crash keeps: file data is durable up to the last `sync_data`, directory
//! entries (creations, renames, removals) up to the last `sync_dir`. [`FaultyFs::crash`] drops
//! everything else, keeping a random prefix of each file's unsynced tail (optionally garbled, like
//! a torn sector write); handles opened before the crash go dead.
//!
//! Locks ([`FileSystem::lock_exclusive`]) are modelled in memory like `flock`: a second lock on
//! a path fails until the first guard drops, and a crash (the holder died) releases every lock.
//!
//! Faults are named by fault point, in the style `wal::segment::fsync` (see [`points`]); the point
//! of an operation follows from the file it touches (`*.wal` is a segment, `ledger*` the ledger).

use crate::fs::{FileMeta, FileSystem, WalFile, WalLock};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Names of the fault points.
pub mod points {
    /// Creating a segment file.
    pub const SEGMENT_CREATE: &str = "wal::segment::create";
    /// Writing to a segment.
    pub const SEGMENT_WRITE: &str = "wal::segment::write";
    /// `fdatasync` of a segment.
    pub const SEGMENT_FSYNC: &str = "wal::segment::fsync";
    /// Truncating a segment.
    pub const SEGMENT_TRUNCATE: &str = "wal::segment::truncate";
    /// Removing a segment.
    pub const SEGMENT_REMOVE: &str = "wal::segment::remove";
    /// Writing the ledger's temporary file.
    pub const LEDGER_WRITE: &str = "wal::ledger::write";
    /// `fdatasync` of the ledger's temporary file.
    pub const LEDGER_FSYNC: &str = "wal::ledger::fsync";
    /// Renaming the ledger into place.
    pub const LEDGER_RENAME: &str = "wal::ledger::rename";
    /// fsync of a directory.
    pub const DIR_FSYNC: &str = "wal::dir::fsync";
}

fn point_of(path: &Path, op: &str) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let kind = if name.ends_with(".wal") {
        "segment"
    } else if name.starts_with("ledger") {
        "ledger"
    } else {
        "file"
    };
    format!("wal::{kind}::{op}")
}

/// A change to a file since its last `sync_data`.
enum Unsynced {
    Write { offset: usize, bytes: Vec<u8> },
    SetLen(usize),
}

/// A file's contents, current and durable. Appends (the common case) cost no copy: the durable
/// content is `data[..synced_len]` until a change reaches below `synced_len`, which first saves
/// the durable content aside.
#[derive(Default)]
struct FileData {
    /// What reads see now.
    data: Vec<u8>,
    /// Length of the durable prefix of `data` (while `durable_image` is `None`).
    synced_len: usize,
    /// The durable content, once a change reached below `synced_len`.
    durable_image: Option<Vec<u8>>,
    /// Changes since the last `sync_data`, in order; a crash keeps a random prefix of them.
    log: Vec<Unsynced>,
    modified: Option<SystemTime>,
}

impl FileData {
    fn durable(data: Vec<u8>, modified: Option<SystemTime>) -> Self {
        let synced_len = data.len();
        FileData {
            data,
            synced_len,
            durable_image: None,
            log: Vec::new(),
            modified,
        }
    }

    fn durable_content(&self) -> Vec<u8> {
        match &self.durable_image {
            Some(img) => img.clone(),
            None => self.data[..self.synced_len.min(self.data.len())].to_vec(),
        }
    }

    /// Saves the durable content before a change at `offset` could overwrite it.
    fn protect(&mut self, offset: usize) {
        if offset < self.synced_len && self.durable_image.is_none() {
            self.durable_image = Some(self.data[..self.synced_len.min(self.data.len())].to_vec());
        }
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.protect(offset);
        let end = offset + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[offset..end].copy_from_slice(bytes);
        self.log.push(Unsynced::Write {
            offset,
            bytes: bytes.to_vec(),
        });
        self.modified = Some(SystemTime::now());
    }

    fn set_len(&mut self, len: usize) {
        self.protect(len);
        self.data.resize(len, 0);
        self.log.push(Unsynced::SetLen(len));
    }

    fn sync(&mut self) {
        self.synced_len = self.data.len();
        self.durable_image = None;
        self.log.clear();
    }

    /// What a power loss leaves: the durable content, then a random prefix of the unsynced
    /// changes in order, the last one possibly partial (and garbled when `tear`).
    fn after_crash(&self, rng: &mut SplitMix, tear: bool) -> Vec<u8> {
        let mut img = self.durable_content();
        let applied = (rng.next() % (self.log.len() as u64 + 1)) as usize;
        let mut last_write = None;
        for (i, op) in self.log.iter().enumerate().take(applied + 1) {
            match op {
                Unsynced::SetLen(len) if i < applied => img.resize(*len, 0),
                Unsynced::SetLen(_) => {}
                Unsynced::Write { offset, bytes } => {
                    let n = if i < applied {
                        bytes.len()
                    } else {
                        (rng.next() % (bytes.len() as u64 + 1)) as usize
                    };
                    if n == 0 {
                        continue;
                    }
                    let end = offset + n;
                    if img.len() < end {
                        img.resize(end, 0);
                    }
                    img[*offset..end].copy_from_slice(&bytes[..n]);
                    last_write = Some((*offset, end));
                }
            }
        }
        // A later truncation may have cut into the last write.
        let last_write = last_write
            .map(|(start, end)| (start, end.min(img.len())))
            .filter(|(s, e)| s < e);
        if let (true, Some((start, end))) = (tear, last_write) {
            for _ in 0..1 + rng.next() % 3 {
                let at = start + (rng.next() % (end - start) as u64) as usize;
                img[at] ^= 1 << (rng.next() % 8);
            }
        }
        img
    }
}

#[derive(Default)]
struct MemFile {
    data: Mutex<FileData>,
}

impl MemFile {
    fn lock(&self) -> MutexGuard<'_, FileData> {
        // A panic while holding this lock can only come from a test assertion; keep going.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct State {
    dirs: BTreeSet<PathBuf>,
    files: BTreeMap<PathBuf, Arc<MemFile>>,
    /// Directory entries as of each file's directory's last `sync_dir`.
    durable_files: BTreeMap<PathBuf, Arc<MemFile>>,
    /// Bumped by a crash; handles of an older generation fail.
    generation: u64,
    /// Fault point -> remaining failures (`u32::MAX` = forever) and the errno they carry
    /// (`None`: a plain I/O error without one).
    failures: BTreeMap<String, (u32, Option<i32>)>,
    /// Fault point -> remaining writes to tear (write half, then fail).
    tears: BTreeMap<String, u32>,
    /// Total file bytes allowed; writes past it get ENOSPC.
    capacity_bytes: Option<u64>,
    /// Largest write that completes in one call (short writes).
    write_bytes_max: Option<usize>,
    /// Mutating operations left before the disk "freezes" (every later operation fails with EIO,
    /// like a machine that lost power at that instant); reset by [`FaultyFs::crash`].
    ops_until_freeze: Option<u64>,
    /// Calls per fault point.
    counts: BTreeMap<String, u64>,
    /// How long each `sync_data` takes (to let concurrent appends pile up in tests).
    sync_delay: Option<Duration>,
    /// Held locks: path -> token of the guard holding it.
    locks: BTreeMap<PathBuf, u64>,
    /// Token of the next lock taken (so a guard from before a crash cannot release a newer lock).
    next_lock_token: u64,
}

impl State {
    fn used_bytes(&self) -> u64 {
        self.files
            .values()
            .map(|f| f.lock().data.len() as u64)
            .sum()
    }

    /// Counts the call and returns an error if a fault is armed for the point.
    fn enter(&mut self, point: &str, mutating: bool) -> io::Result<()> {
        *self.counts.entry(point.to_string()).or_default() += 1;
        if mutating {
            if let Some(left) = self.ops_until_freeze.as_mut() {
                if *left == 0 {
                    return Err(io::Error::other(format!(
                        "{point}: disk frozen (simulated power loss)"
                    )));
                }
                *left -= 1;
            }
        }
        if let Some((left, errno)) = self.failures.get_mut(point) {
            if *left > 0 {
                if *left != u32::MAX {
                    *left -= 1;
                }
                return Err(match errno {
                    Some(code) => io::Error::from_raw_os_error(*code),
                    None => io::Error::other(format!("{point}: injected failure")),
                });
            }
        }
        Ok(())
    }
}

/// Holds segment fdatasyncs while closed (see [`FaultyFs::hold_segment_syncs`]).
#[derive(Default)]
struct SyncGate {
    /// Whether segment fdatasyncs wait; and how many wait now.
    state: Mutex<(bool, u64)>,
    /// Wakes the waiting fdatasyncs when the gate opens.
    opened: Condvar,
}

/// An in-memory, fault-injecting [`FileSystem`]. Cloning shares the same disk.
#[derive(Clone, Default)]
pub struct FaultyFs {
    state: Arc<Mutex<State>>,
    gate: Arc<SyncGate>,
}

impl std::fmt::Debug for FaultyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyFs").finish_non_exhaustive()
    }
}

/// An open file of a [`FaultyFs`].
struct Handle {
    /// The file's data (kept alive after removal, like an open descriptor).
    file: Arc<MemFile>,
    /// Its path, which names its fault points.
    path: PathBuf,
    /// The disk's generation at open; a crash makes the handle dead.
    generation: u64,
    /// Opened for writing.
    writable: bool,
    /// The disk, for faults and counters.
    fs: FaultyFs,
}

impl FaultyFs {
    /// An empty disk without faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `times` operations at `point` fail with an I/O error (`u32::MAX`: forever).
    pub fn fail(&self, point: &str, times: u32) {
        self.lock()
            .failures
            .insert(point.to_string(), (times, None));
    }

    /// Like [`FaultyFs::fail`], with the OS error `errno` (e.g. 24 for EMFILE, 122 for EDQUOT),
    /// so tests can check how each kind of failure is classified.
    pub fn fail_with_errno(&self, point: &str, times: u32, errno: i32) {
        self.lock()
            .failures
            .insert(point.to_string(), (times, Some(errno)));
    }

    /// Disarms every failure, tear, capacity, short-write and freeze setting.
    pub fn clear_faults(&self) {
        let mut s = self.lock();
        s.failures.clear();
        s.tears.clear();
        s.capacity_bytes = None;
        s.write_bytes_max = None;
        s.ops_until_freeze = None;
    }

    /// Tears the next `times` writes at `point`: half of the bytes land, then the write fails.
    pub fn tear_writes(&self, point: &str, times: u32) {
        self.lock().tears.insert(point.to_string(), times);
    }

    /// Limits the total bytes of all files; a write past it writes what fits and then fails with
    /// ENOSPC. `None` lifts the limit.
    pub fn set_capacity_bytes(&self, bytes: Option<u64>) {
        self.lock().capacity_bytes = bytes;
    }

    /// Sets the capacity to the bytes used now plus `bytes`: ENOSPC after `bytes` more.
    pub fn enospc_after(&self, bytes: u64) {
        let mut s = self.lock();
        let used = s.used_bytes();
        s.capacity_bytes = Some(used + bytes);
    }

    /// Makes every write complete at most `bytes` per call (short writes).
    pub fn set_write_bytes_max(&self, bytes: Option<usize>) {
        self.lock().write_bytes_max = bytes.map(|b| b.max(1));
    }

    /// After `ops` more mutating operations every operation fails, as if power was lost then.
    pub fn freeze_after_ops(&self, ops: Option<u64>) {
        self.lock().ops_until_freeze = ops;
    }

    /// Makes every `sync_data` take `delay` (like a slow disk), so concurrent appends queue up.
    pub fn set_sync_delay(&self, delay: Option<Duration>) {
        self.lock().sync_delay = delay;
    }

    /// While `held`, every segment `fdatasync` waits (its data written, not yet durable) until
    /// the hold is lifted: lets a test look at the log while a group's fdatasync has not
    /// returned, without timing.
    pub fn hold_segment_syncs(&self, held: bool) {
        let mut g = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = held;
        drop(g);
        self.gate.opened.notify_all();
    }

    /// How many segment `fdatasync`s wait at the hold now.
    pub fn segment_syncs_held(&self) -> u64 {
        self.gate.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// A new disk holding what would survive a crash right now (synced data and synced
    /// directory entries only); this disk is left as it is.
    pub fn durable_snapshot(&self) -> FaultyFs {
        let s = self.lock();
        let mut files = BTreeMap::new();
        for (path, file) in s.durable_files.iter() {
            let d = file.lock();
            let fresh = MemFile {
                data: Mutex::new(FileData::durable(d.durable_content(), d.modified)),
            };
            files.insert(path.clone(), Arc::new(fresh));
        }
        let state = State {
            dirs: s.dirs.clone(),
            durable_files: files.clone(),
            files,
            ..State::default()
        };
        FaultyFs {
            state: Arc::new(Mutex::new(state)),
            gate: Arc::default(),
        }
    }

    /// Whether a lock on `path` is held now.
    pub fn is_locked(&self, path: &Path) -> bool {
        self.lock().locks.contains_key(path)
    }

    /// Length of a file that would survive a crash now; `None` if its entry would not.
    pub fn synced_len(&self, path: &Path) -> Option<u64> {
        let s = self.lock();
        s.durable_files
            .get(path)
            .map(|f| f.lock().durable_content().len() as u64)
    }

    /// How many times the fault point was entered (e.g. `wal::segment::fsync`).
    pub fn count(&self, point: &str) -> u64 {
        self.lock().counts.get(point).copied().unwrap_or(0)
    }

    /// Total bytes of all files.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes()
    }

    /// Overwrites bytes of a file (for corruption tests); the file's content then counts as
    /// synced.
    pub fn corrupt(&self, path: &Path, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let s = self.lock();
        let f = s
            .files
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut d = f.lock();
        d.write(offset, bytes);
        d.sync();
        Ok(())
    }

    /// Simulates a power loss and reboot: directory entries fall back to their last `sync_dir`,
    /// each file keeps its synced content plus a random prefix of its later changes (writes and
    /// truncations, in order; the last write possibly partial, and garbled when `tear`),
    /// faults are cleared and every handle opened before goes dead. `seed` drives the choices.
    pub fn crash(&self, seed: u64, tear: bool) {
        let mut rng = SplitMix(seed);
        let mut s = self.lock();
        s.generation += 1;
        let mut files = BTreeMap::new();
        for (path, file) in s.durable_files.iter() {
            let old = file.lock();
            let data = old.after_crash(&mut rng, tear);
            let fresh = MemFile {
                data: Mutex::new(FileData::durable(data, old.modified)),
            };
            files.insert(path.clone(), Arc::new(fresh));
        }
        s.durable_files = files.clone();
        s.files = files;
        // The processes that held locks died with the machine.
        s.locks.clear();
        s.failures.clear();
        s.tears.clear();
        s.capacity_bytes = None;
        s.write_bytes_max = None;
        s.ops_until_freeze = None;
    }

    fn new_handle(
        &self,
        s: &State,
        path: &Path,
        file: Arc<MemFile>,
        writable: bool,
    ) -> Arc<dyn WalFile> {
        Arc::new(Handle {
            file,
            path: path.to_path_buf(),
            generation: s.generation,
            writable,
            fs: self.clone(),
        })
    }
}

/// A lock held on a [`FaultyFs`]; releases it on drop unless a crash released it already.
struct MemLock {
    fs: FaultyFs,
    path: PathBuf,
    token: u64,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        let mut s = self.fs.lock();
        if s.locks.get(&self.path) == Some(&self.token) {
            s.locks.remove(&self.path);
        }
    }
}

/// A tiny deterministic generator so crashes are reproducible from a seed without a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn dead() -> io::Error {
    io::Error::other("file handle from before a simulated crash")
}

impl Handle {
    fn check(&self, s: &State) -> io::Result<()> {
        if s.generation != self.generation {
            return Err(dead());
        }
        Ok(())
    }
}

impl WalFile for Handle {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        {
            let s = self.fs.lock();
            self.check(&s)?;
        }
        let d = self.file.lock();
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        if offset >= d.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.data.len() - offset);
        buf[..n].copy_from_slice(&d.data[offset..offset + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only handle",
            ));
        }
        let point = point_of(&self.path, "write");
        let mut s = self.fs.lock();
        self.check(&s)?;
        s.enter(&point, true)?;
        let mut n = buf.len();
        if let Some(max) = s.write_bytes_max {
            n = n.min(max);
        }
        let mut tear = false;
        if let Some(left) = s.tears.get_mut(&point) {
            if *left > 0 {
                *left -= 1;
                tear = true;
                n = n.div_ceil(2);
            }
        }
        let offset = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let current_len = self.file.lock().data.len();
        if let Some(cap) = s.capacity_bytes {
            let used = s.used_bytes();
            let growth = (offset + n).saturating_sub(current_len) as u64;
            if used + growth > cap {
                let room = cap.saturating_sub(used) as usize;
                let fits = (current_len + room).saturating_sub(offset).min(n);
                if fits == 0 {
                    return Err(io::Error::from(io::ErrorKind::StorageFull));
                }
                n = fits;
            }
        }
        self.file.lock().write(offset, &buf[..n]);
        if tear {
            return Err(io::Error::other(format!("{point}: torn write")));
        }
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        if point_of(&self.path, "fsync") == points::SEGMENT_FSYNC {
            let gate = &self.fs.gate;
            let mut g = gate.state.lock().unwrap_or_else(|p| p.into_inner());
            if g.0 {
                g.1 += 1;
                while g.0 {
                    g = gate.opened.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                g.1 -= 1;
            }
        }
        let delay = {
            let mut s = self.fs.lock();
            self.check(&s)?;
            s.enter(&point_of(&self.path, "fsync"), true)?;
            s.sync_delay
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.file.lock().sync();
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.fs.lock();
        self.check(&s)?;
        s.enter(&point_of(&self.path, "truncate"), true)?;
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        // Like a write, a truncation is durable only after the next `sync_data`.
        self.file.lock().set_len(len);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        {
            let s = self.fs.lock();
            self.check(&s)?;
        }
        Ok(self.file.lock().data.len() as u64)
    }
}

impl FileSystem for FaultyFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.enter("wal::dir::create", true)?;
        for a in dir.ancestors() {
            s.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut s = self.lock();
        s.enter("wal::dir::list", false)?;
        if !s.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let mut names: Vec<String> = s
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect();
        for d in s.dirs.iter() {
            if d.parent() == Some(dir) {
                if let Some(n) = d.file_name().and_then(|n| n.to_str()) {
                    names.push(n.to_string());
                }
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn WalFile>> {
        let mut s = self.lock();
        s.enter(&point_of(path, "create"), true)?;
        let parent_ok = path.parent().is_some_and(|p| s.dirs.contains(p));
        if !parent_ok {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        if s.files.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let file = Arc::new(MemFile::default());
        file.lock().modified = Some(SystemTime::now());
        s.files.insert(path.to_path_buf(), file.clone());
        Ok(self.new_handle(&s, path, file, true))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn WalFile>> {
        let mut s = self.lock();
        s.enter(&point_of(path, "open"), false)?;
        let file = s
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(self.new_handle(&s, path, file, writable))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.enter(&point_of(to, "rename"), true)?;
        if to.parent().is_none_or(|p| !s.dirs.contains(p)) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let file = s
            .files
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        s.files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        {
            let s = self.lock();
            if s.files.contains_key(to) || s.dirs.contains(to) {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
        }
        // Nothing else runs between the check and the rename in the tests that use it.
        self.rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.enter(&point_of(path, "remove"), true)?;
        s.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.enter(points::DIR_FSYNC, true)?;
        let State {
            files,
            durable_files,
            ..
        } = &mut *s;
        durable_files.retain(|p, _| p.parent() != Some(dir));
        for (p, f) in files.iter() {
            if p.parent() == Some(dir) {
                durable_files.insert(p.clone(), f.clone());
            }
        }
        Ok(())
    }

    fn lock_exclusive(&self, path: &Path) -> io::Result<WalLock> {
        let mut s = self.lock();
        // Not a mutating operation for `freeze_after_ops`: it changes no data a crash could keep.
        s.enter("wal::lock::acquire", false)?;
        let parent_ok = path.parent().is_some_and(|p| s.dirs.contains(p));
        if !parent_ok {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        if s.locks.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "held by another handle",
            ));
        }
        // Like the real one, the lock file is created (empty, its entry not synced) if missing.
        if !s.files.contains_key(path) {
            let file = Arc::new(MemFile::default());
            file.lock().modified = Some(SystemTime::now());
            s.files.insert(path.to_path_buf(), file);
        }
        let token = s.next_lock_token;
        s.next_lock_token += 1;
        s.locks.insert(path.to_path_buf(), token);
        drop(s);
        Ok(WalLock::new(MemLock {
            fs: self.clone(),
            path: path.to_path_buf(),
            token,
        }))
    }

    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        let s = self.lock();
        let file = s
            .files
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let d = file.lock();
        Ok(FileMeta {
            len: d.data.len() as u64,
            modified: d.modified.unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }
}
