//! One writer per WAL directory: the exclusive lock on `LOCK`.

use crate::common::*;
use prism_wal::{
    list_segments, load_ledger, quarantine_segment, quarantine_segment_with_fs, read_dir, verify,
    FaultyFs, FileSystem, Ledger, Lsn, SegmentId, StdFs, Wal, WalError, WalOptions, LOCK_FILE,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn assert_locked(result: Result<(Wal, prism_wal::Recovery), WalError>, dir: &Path) {
    match result {
        Err(WalError::Locked { dir: d }) => assert_eq!(d, dir),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("expected Locked, the WAL opened a second time"),
    }
}

#[tokio::test]
async fn a_second_open_of_a_locked_wal_fails_with_locked_and_the_first_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..4, 20).await;

    let second = Wal::open(dir.path(), WalOptions::default());
    let Err(err) = second else {
        panic!("the WAL opened a second time");
    };
    let message = err.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("another process"), "{message}");
    assert_locked(Err(err), dir.path());

    // The refused open touched nothing: the first handle appends and reads on.
    append_each(&wal, 4..6, 20).await;
    assert_eq!(wal.durable_lsn(), Lsn(5));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, (1..6).map(|i| (Lsn(i), i)).collect::<Vec<_>>());
    wal.commit_ledger(&Ledger::default()).unwrap();
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_second_open_on_a_faulty_fs_fails_with_locked_until_the_first_closes() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..4, 20).await;
    assert_locked(open_mem(&fs, small_opts()), &mem_dir());
    append_each(&wal, 4..6, 20).await;
    wal.close().await.unwrap();
    assert!(!fs.is_locked(&mem_dir().join(LOCK_FILE)));
    let (wal, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(6));
    drop(wal);
}

#[tokio::test]
async fn after_close_and_after_drop_the_wal_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 20).await;
    let clone = wal.clone();
    wal.close().await.unwrap();
    // The lock went with close, though a clone is still around; the clone may no longer
    // write into a directory someone else may own now.
    let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(3));
    assert!(matches!(
        clone.commit_ledger(&Ledger::default()),
        Err(WalError::Closed)
    ));
    assert!(matches!(clone.enforce_retention(), Err(WalError::Closed)));
    drop(clone);

    // Dropping every clone without close releases it too, once the writer has stopped.
    append_each(&wal, 3..5, 20).await;
    let clone = wal.clone();
    drop(wal);
    assert_locked(Wal::open(dir.path(), WalOptions::default()), dir.path());
    drop(clone);
    let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(5));
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_recovery_releases_the_lock() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..3, 20).await;
    wal.close().await.unwrap();
    fs.fail("wal::dir::list", 1);
    assert!(matches!(
        open_mem(&fs, small_opts()),
        Err(WalError::Io { .. })
    ));
    assert!(!fs.is_locked(&mem_dir().join(LOCK_FILE)));
    let (_wal, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(3));
}

#[test]
fn the_kernel_lock_conflicts_between_handles_and_goes_with_the_handle() {
    // flock belongs to the open file description: a second lock in the same process conflicts,
    // and closing the descriptor (which the kernel does for a dying process) releases it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(LOCK_FILE);
    let first = StdFs.lock_exclusive(&path).unwrap();
    let err = StdFs.lock_exclusive(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    // A plain `File` sees the same lock.
    let other = std::fs::File::open(&path).unwrap();
    assert!(matches!(
        other.try_lock(),
        Err(std::fs::TryLockError::WouldBlock)
    ));
    drop(first);
    let again = StdFs.lock_exclusive(&path).unwrap();
    drop(again);
    // The file stays behind; it is harmless.
    assert!(path.exists());
}

/// Set in the child process of [`the_lock_of_a_killed_process_is_released`]: the WAL directory.
const CHILD_DIR_ENV: &str = "PRISM_WAL_LOCK_CHILD_DIR";
/// Set with [`CHILD_DIR_ENV`]: a file the child creates once it holds the WAL.
const CHILD_READY_ENV: &str = "PRISM_WAL_LOCK_CHILD_READY";

/// Not a test of its own: in the child process of
/// [`the_lock_of_a_killed_process_is_released`] it opens the WAL and waits to be killed; in
/// every other run it returns at once.
#[test]
fn lock_holding_child_process() {
    let (Ok(dir), Ok(ready)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_READY_ENV))
    else {
        return;
    };
    let (_wal, _) = Wal::open(Path::new(&dir), WalOptions::default()).unwrap();
    std::fs::write(ready, b"open").unwrap();
    // Bounded, in case the parent dies before killing us.
    std::thread::sleep(Duration::from_secs(60));
}

#[tokio::test]
async fn the_lock_of_a_killed_process_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    let ready = dir.path().join("ready");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock::lock_holding_child_process", "--nocapture"])
        .env(CHILD_DIR_ENV, &wal_dir)
        .env(CHILD_READY_ENV, &ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child exited before opening the WAL: {status}");
        }
        assert!(Instant::now() < deadline, "the child never opened the WAL");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_locked(Wal::open(&wal_dir, WalOptions::default()), &wal_dir);
    assert!(matches!(
        quarantine_segment(&wal_dir, SegmentId(1)),
        Err(WalError::Locked { .. })
    ));

    // SIGKILL: no destructor runs, no close; the kernel drops the lock with the process.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wal_dir.join(LOCK_FILE).exists(),
        "the LOCK file stays behind"
    );
    let (wal, rec) = Wal::open(&wal_dir, WalOptions::default()).unwrap();
    assert_eq!(rec.segments, 1);
    append_each(&wal, 1..3, 20).await;
    wal.close().await.unwrap();
}

#[tokio::test]
async fn read_only_tools_work_while_a_relay_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes_max: 1024,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    append_each(&wal, 1..40, 80).await;
    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(7));
    wal.commit_ledger(&ledger).unwrap();

    let report = verify(dir.path()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 39);
    let segments = list_segments(dir.path()).unwrap();
    assert!(segments.len() > 1);
    assert_eq!(segments.last().unwrap().last_lsn, Some(Lsn(39)));
    let mut reader = read_dir(dir.path(), Lsn(1)).unwrap();
    let got = read_all(&mut reader).unwrap();
    assert_eq!(got, (1..40).map(|i| (Lsn(i), i)).collect::<Vec<_>>());
    assert_eq!(load_ledger(dir.path()).unwrap(), ledger);

    // The relay is still the one writer.
    append_each(&wal, 40..42, 80).await;
    wal.close().await.unwrap();
}

#[tokio::test]
async fn quarantine_fails_while_locked_and_works_once_the_wal_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes_max: 1024,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    append_each(&wal, 1..40, 80).await;
    let before = segment_files(dir.path());

    match quarantine_segment(dir.path(), SegmentId(1)) {
        Err(WalError::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(segment_files(dir.path()), before, "nothing was moved");
    append_each(&wal, 40..42, 80).await;

    wal.close().await.unwrap();
    let moved = quarantine_segment(dir.path(), SegmentId(1)).unwrap();
    assert!(moved.exists());
    // Quarantine released its lock: the WAL opens.
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    wal.close().await.unwrap();
}

#[tokio::test]
async fn quarantine_through_a_faulty_fs_fails_while_locked() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..40, 80).await;
    assert!(matches!(
        quarantine_segment_with_fs(&fs, &mem_dir(), SegmentId(1)),
        Err(WalError::Locked { .. })
    ));
    wal.close().await.unwrap();
    quarantine_segment_with_fs(&fs, &mem_dir(), SegmentId(1)).unwrap();
}

#[tokio::test]
async fn a_faulty_fs_crash_releases_the_lock() {
    let fs = FaultyFs::new();
    let lock = mem_dir().join(LOCK_FILE);
    let (old, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&old, 1..5, 20).await;
    assert!(fs.is_locked(&lock));
    assert_locked(open_mem(&fs, small_opts()), &mem_dir());

    // The process holding the lock "died" with the machine: the lock is gone with it.
    fs.crash(7, false);
    assert!(!fs.is_locked(&lock));
    let (wal, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(5));

    // The dead handle going away later must not release the new holder's lock.
    drop(old);
    assert!(fs.is_locked(&lock));
    assert_locked(open_mem(&fs, small_opts()), &mem_dir());
    append_each(&wal, 5..7, 20).await;
    wal.close().await.unwrap();
    assert!(!fs.is_locked(&lock));
}

#[tokio::test]
async fn the_lock_file_is_not_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes_max: 1024,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    append_each(&wal, 1..40, 80).await;
    assert!(dir.path().join(LOCK_FILE).exists());

    let files = segment_files(dir.path());
    let segments = list_segments(dir.path()).unwrap();
    assert_eq!(segments.len(), files.len());
    let segment_bytes: u64 = segments.iter().map(|s| s.bytes).sum();
    let stats = wal.stats();
    assert_eq!(stats.segments, files.len());
    assert_eq!(
        stats.bytes_on_disk, segment_bytes,
        "LOCK is not in the budget"
    );
    let report = verify(dir.path()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.segments, files.len());
    assert_eq!(report.bytes, segment_bytes);

    // Retention deletes released segments, never the lock file.
    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(40));
    let opts_no_keep = prism_wal::Retention {
        bytes_max: 0,
        segments_max: 0,
        age_max: Duration::from_secs(3600),
    };
    wal.commit_ledger(&ledger).unwrap();
    wal.close().await.unwrap();
    let (wal, rec) = Wal::open(
        dir.path(),
        WalOptions {
            retention: opts_no_keep,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(
        rec.segments,
        files.len(),
        "LOCK was not taken for a segment"
    );
    assert!(wal.stats().segments < files.len(), "retention ran");
    assert!(dir.path().join(LOCK_FILE).exists());
    assert_eq!(
        wal.stats().bytes_on_disk,
        list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.bytes)
            .sum::<u64>()
    );
    wal.close().await.unwrap();
}

#[tokio::test]
async fn a_lock_file_that_is_a_symlink_is_refused_and_its_target_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("precious");
    std::fs::write(&target, b"do not truncate me\n").unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join(LOCK_FILE)).unwrap();
    let err = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    assert!(
        matches!(&err, WalError::UnsafeLockFile { path, .. } if path == &dir.path().join(LOCK_FILE)),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("remove it"), "{message}");
    assert_eq!(std::fs::read(&target).unwrap(), b"do not truncate me\n");
    assert!(segment_files(dir.path()).is_empty(), "opened anyway");
    // Quarantine takes the same lock and refuses the same way.
    let err = quarantine_segment(dir.path(), SegmentId(1)).unwrap_err();
    assert!(matches!(err, WalError::UnsafeLockFile { .. }), "{err:?}");
    assert_eq!(std::fs::read(&target).unwrap(), b"do not truncate me\n");
}

#[tokio::test]
async fn a_lock_file_with_content_is_neither_truncated_nor_written() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join(LOCK_FILE);
    std::fs::write(&lock, b"someone else's bytes\n").unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 20).await;
    assert_eq!(std::fs::read(&lock).unwrap(), b"someone else's bytes\n");
    wal.close().await.unwrap();
    assert_eq!(std::fs::read(&lock).unwrap(), b"someone else's bytes\n");
}

#[tokio::test]
async fn quarantining_a_segment_whose_quarantine_name_is_taken_keeps_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..10, 100).await;
    wal.close().await.unwrap();
    let seg1 = dir.path().join("00000000000000000001.wal");
    let original = std::fs::read(&seg1).unwrap();
    // An earlier quarantine of a segment of the same name (a WAL that was reset since).
    let qdir = dir.path().join(prism_wal::QUARANTINE_DIR);
    std::fs::create_dir_all(&qdir).unwrap();
    let earlier = qdir.join("00000000000000000001.wal");
    std::fs::write(&earlier, b"earlier quarantined segment").unwrap();
    let moved = quarantine_segment(dir.path(), SegmentId(1)).unwrap();
    assert_ne!(moved, earlier);
    assert_eq!(
        std::fs::read(&earlier).unwrap(),
        b"earlier quarantined segment"
    );
    assert_eq!(std::fs::read(&moved).unwrap(), original);
    assert!(!seg1.exists());
}
