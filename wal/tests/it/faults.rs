//! Injected faults: fsync errors, ENOSPC, short and torn writes.

use crate::common::*;
use prism_wal::fault::points::{SEGMENT_CREATE, SEGMENT_FSYNC, SEGMENT_WRITE};
use prism_wal::{FaultyFs, FileSystem, Ledger, Lsn, WalError, WalOptions};

#[tokio::test]
async fn an_fsync_error_poisons_the_wal_for_good_and_is_never_retried() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 10)]).await.unwrap();
    fs.fail(SEGMENT_FSYNC, 1);
    let fsyncs = fs.count(SEGMENT_FSYNC);
    let err = wal.append(&[env(2, 10)]).await.unwrap_err();
    assert!(err.is_fatal(), "{err:?}");
    assert_eq!(fs.count(SEGMENT_FSYNC), fsyncs + 1, "fsync retried");
    // The fault is spent, but the WAL stays dead.
    for i in 3..6 {
        assert!(wal.append(&[env(i, 10)]).await.unwrap_err().is_fatal());
    }
    assert_eq!(fs.count(SEGMENT_FSYNC), fsyncs + 1);
    assert_eq!(wal.durable_lsn(), Lsn(1));
    assert!(wal.clone().close().await.unwrap_err().is_fatal());
    drop(wal);
    // A restart recovers from disk.
    fs.crash(1, false);
    let (wal, rec) = open_mem(&fs, WalOptions::default()).unwrap();
    assert!(rec.next_lsn >= Lsn(2));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got[0], (Lsn(1), 1));
}

#[tokio::test]
async fn disk_full_fails_the_group_corrupts_nothing_and_appends_succeed_once_space_is_freed() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 100), env(2, 100)]).await.unwrap();
    let seg = mem_dir().join("00000000000000000001.wal");
    let len = fs.synced_len(&seg).unwrap();
    fs.enospc_after(150);
    let err = wal.append(&[env(3, 100), env(4, 100)]).await.unwrap_err();
    assert!(matches!(err, WalError::DiskFull { .. }), "{err:?}");
    assert!(!err.is_fatal());
    assert_eq!(
        FileSystem::metadata(&fs, &seg).unwrap().len,
        len,
        "partial group left behind"
    );
    assert_eq!(wal.durable_lsn(), Lsn(2));
    // Still full: still DiskFull, still alive.
    assert!(matches!(
        wal.append(&[env(5, 100)]).await,
        Err(WalError::DiskFull { .. })
    ));
    fs.set_capacity_bytes(None);
    let r = wal.append(&[env(6, 100)]).await.unwrap();
    assert_eq!(r.first, Lsn(3), "LSNs of failed groups are given out again");
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, vec![(Lsn(1), 1), (Lsn(2), 2), (Lsn(3), 6)]);
    assert!(prism_wal::verify_with_fs(&fs, &mem_dir()).unwrap().is_ok());
}

#[tokio::test]
async fn disk_full_is_cured_by_retention_deleting_consumed_segments() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..40, 80).await;
    // Room for the small ledger file, not for another record.
    fs.enospc_after(120);
    assert!(matches!(
        wal.append(&[env(40, 80)]).await,
        Err(WalError::DiskFull { .. })
    ));
    let mut l = Ledger::default();
    l.cursors.insert("trades".into(), Lsn(40));
    wal.commit_ledger(&l).unwrap();
    let r = wal.append(&[env(40, 80)]).await.unwrap();
    assert_eq!(r.first, Lsn(40));
}

#[tokio::test]
async fn a_failure_to_create_the_next_segment_fails_the_group_and_the_writer_lives_on() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..8, 80).await;
    fs.fail(SEGMENT_CREATE, u32::MAX);
    let mut failed = 0;
    for i in 8..30 {
        match wal.append(&[env(i, 80)]).await {
            Ok(_) => {}
            Err(WalError::Io { .. }) | Err(WalError::DiskFull { .. }) => failed += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(failed > 0);
    fs.clear_faults();
    let r = wal.append(&[env(100, 80)]).await.unwrap();
    assert_eq!(r.first, wal.durable_lsn());
    assert!(prism_wal::verify_with_fs(&fs, &mem_dir()).unwrap().is_ok());
}

#[tokio::test]
async fn short_writes_are_completed_by_looping() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    fs.set_write_bytes_max(Some(7));
    append_each(&wal, 1..20, 90).await;
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got.len(), 19);
    drop(wal);
    fs.crash(5, true);
    let (_, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.torn_tail, None);
    assert_eq!(rec.next_lsn, Lsn(20));
}

#[tokio::test]
async fn a_torn_write_fails_its_group_and_is_truncated_away() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 50)]).await.unwrap();
    fs.tear_writes(SEGMENT_WRITE, 1);
    let err = wal.append(&[env(2, 50), env(3, 50)]).await.unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err:?}");
    let r = wal.append(&[env(4, 50)]).await.unwrap();
    assert_eq!(r.first, Lsn(2));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, vec![(Lsn(1), 1), (Lsn(2), 4)]);
}
