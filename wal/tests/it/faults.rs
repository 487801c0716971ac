//! Injected faults: fsync errors, ENOSPC, short and torn writes.

use crate::common::*;
use prism_wal::fault::points::{DIR_FSYNC, SEGMENT_CREATE, SEGMENT_FSYNC, SEGMENT_WRITE};
use prism_wal::{FaultyFs, FileSystem, Ledger, Lsn, WalError, WalOptions};
use std::sync::Arc;

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

/// errno of "disk quota exceeded".
const EDQUOT: i32 = 122;
/// errno of "too many open files" (this process).
const EMFILE: i32 = 24;
/// errno of "too many open files in system".
const ENFILE: i32 = 23;

#[tokio::test]
async fn a_quota_exceeded_write_is_disk_full_and_transient_and_appends_resume_after_it() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 50)]).await.unwrap();
    fs.fail_with_errno(SEGMENT_WRITE, 1, EDQUOT);
    let err = wal.append(&[env(2, 50)]).await.unwrap_err();
    assert!(matches!(err, WalError::DiskFull { .. }), "{err:?}");
    assert!(err.is_transient() && !err.is_fatal(), "{err:?}");
    let r = wal.append(&[env(3, 50)]).await.unwrap();
    assert_eq!(r.first, Lsn(2), "the failed append consumed no LSN");
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, vec![(Lsn(1), 1), (Lsn(2), 3)]);
}

/// Fills the active segment of a `small_opts` WAL so that the next group rolls over; returns
/// the next stream sequence to use.
async fn fill_active_segment(fs: &FaultyFs, wal: &prism_wal::Wal, mut seq: u64) -> u64 {
    let segments = wal.stats().segments;
    loop {
        let last = prism_wal::list_segments_with_fs(fs, &mem_dir()).unwrap();
        if last.last().unwrap().bytes >= small_opts().segment_bytes_max {
            return seq;
        }
        wal.append(&[env(seq, 80)]).await.unwrap();
        seq += 1;
        assert_eq!(wal.stats().segments, segments, "rolled over while filling");
    }
}

#[tokio::test]
async fn running_out_of_file_descriptors_at_rollover_is_transient_and_loses_nothing() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    let mut seq = fill_active_segment(&fs, &wal, 1).await;
    let segments = wal.stats().segments;
    // Out of descriptors when the next segment file is created, then when the directory is
    // opened to fsync the new entry.
    for (point, errno) in [(SEGMENT_CREATE, EMFILE), (DIR_FSYNC, ENFILE)] {
        fs.fail_with_errno(point, 2, errno);
        for _ in 0..2 {
            let err = wal.append(&[env(1000, 80)]).await.unwrap_err();
            assert!(
                matches!(err, WalError::FilesExhausted { .. }),
                "{point}: {err:?}"
            );
            assert!(err.is_transient() && !err.is_fatal(), "{err:?}");
            assert_eq!(
                wal.stats().segments,
                segments,
                "{point}: a segment was left"
            );
        }
    }
    fs.clear_faults();
    let durable = wal.durable_lsn();
    let r = wal.append(&[env(seq, 80)]).await.unwrap();
    assert_eq!(r.first, durable.next(), "LSNs stay contiguous");
    seq += 1;
    append_each(&wal, seq..seq + 20, 80).await;
    assert!(wal.stats().segments > segments);
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    let lsns: Vec<u64> = got.iter().map(|g| g.0 .0).collect();
    assert_eq!(lsns, (1..=lsns.len() as u64).collect::<Vec<_>>());
    assert!(got.iter().all(|g| g.1 != 1000), "a failed append was kept");
    assert!(got.iter().any(|g| g.1 == seq + 19));
    drop(wal);
    let (_wal, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(lsns.len() as u64 + 1));
}

#[tokio::test]
async fn after_a_failed_fdatasync_a_restart_in_the_same_boot_does_not_take_the_unsynced_group_as_durable(
) {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 50)]).await.unwrap();
    fs.fail(SEGMENT_FSYNC, 1);
    assert!(wal.append(&[env(2, 50)]).await.unwrap_err().is_fatal());
    drop(wal);
    // No crash: the page cache (what FaultyFs reads) still holds whatever the writer left.
    let (wal, rec) = open_mem(&fs, WalOptions::default()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(2), "the unsynced group came back");
    assert_eq!(
        read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap(),
        vec![(Lsn(1), 1)]
    );
    let r = wal.append(&[env(3, 50)]).await.unwrap();
    assert_eq!(r.first, Lsn(2));
}

#[tokio::test]
async fn running_out_of_file_descriptors_for_the_ledger_is_transient_and_a_retry_writes_it() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    append_each(&wal, 1..4, 50).await;
    let mut old = Ledger::default();
    old.cursors.insert("trades".into(), Lsn(2));
    wal.commit_ledger(&old).unwrap();
    let mut new = Ledger::default();
    new.cursors.insert("trades".into(), Lsn(4));
    // Creating `ledger.tmp`, then opening the directory for its fsync after the rename.
    for (point, errno) in [("wal::ledger::create", EMFILE), (DIR_FSYNC, ENFILE)] {
        fs.fail_with_errno(point, 1, errno);
        let err = wal.commit_ledger(&new).unwrap_err();
        assert!(
            matches!(err, WalError::FilesExhausted { .. }),
            "{point}: {err:?}"
        );
        assert!(err.is_transient() && !err.is_fatal(), "{point}: {err:?}");
        wal.commit_ledger(&new).unwrap();
        assert_eq!(wal.load_ledger().unwrap(), new, "{point}");
        wal.commit_ledger(&old).unwrap();
    }
    // The ledger the retry wrote survives a power loss.
    wal.commit_ledger(&new).unwrap();
    drop(wal);
    fs.crash(3, true);
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    assert_eq!(wal.load_ledger().unwrap(), new);
}

#[tokio::test]
async fn a_reader_out_of_file_descriptors_at_the_next_segment_is_transient_and_resumes_where_it_was(
) {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..30, 80).await;
    assert!(wal.stats().segments > 2);
    // Opening the first segment when the reader is created.
    fs.fail_with_errno("wal::segment::open", 1, EMFILE);
    let err = wal.reader(Lsn(1)).unwrap_err();
    assert!(matches!(err, WalError::FilesExhausted { .. }), "{err:?}");
    let mut reader = wal.reader(Lsn(1)).unwrap();
    // Then at every later segment, once each.
    let mut got = Vec::new();
    let mut refusals = 0;
    let mut armed = true;
    loop {
        if armed {
            fs.fail_with_errno("wal::segment::open", 1, ENFILE);
        }
        let step = reader.next();
        fs.clear_faults();
        match step {
            Ok(Some(r)) => got.push((r.lsn, r.envelope().unwrap().stream_seq.0)),
            Ok(None) => break,
            Err(err) => {
                assert!(
                    matches!(err, WalError::FilesExhausted { .. }) && err.is_transient(),
                    "{err:?}"
                );
                refusals += 1;
                // The same call again, with a descriptor free this time.
                armed = false;
                continue;
            }
        }
        armed = true;
    }
    assert_eq!(refusals, wal.stats().segments - 1);
    assert_eq!(got, (1..30).map(|i| (Lsn(i), i)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_restart_on_a_disk_without_a_free_byte_opens_and_writes_the_durable_mark_once_space_returns(
) {
    use prism_wal::DURABLE_MARK_FILE;
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    append_each(&wal, 1..6, 50).await;
    drop(wal);
    // Not a byte left, even once the old mark (20 bytes) is removed: the mark of the new writer
    // cannot be written.
    fs.set_capacity_bytes(Some(fs.used_bytes() - 20));
    let (wal, rec) = open_mem(&fs, WalOptions::default())
        .unwrap_or_else(|e| panic!("open on a full disk failed: {e}"));
    assert_eq!(rec.next_lsn, Lsn(6));
    let mark = mem_dir().join(DURABLE_MARK_FILE);
    assert!(
        fs.metadata(&mark).map_or(true, |m| m.len == 0),
        "a mark was written on a full disk"
    );
    let err = wal.append(&[env(6, 50)]).await.unwrap_err();
    assert!(matches!(err, WalError::DiskFull { .. }), "{err:?}");
    fs.set_capacity_bytes(None);
    let r = wal.append(&[env(6, 50)]).await.unwrap();
    assert_eq!(r.first, Lsn(6));
    // The next group's publish created the mark, and an offline reader next to the writer
    // stops at it.
    assert_eq!(fs.metadata(&mark).unwrap().len, 20);
    let mut offline =
        prism_wal::read_dir_with_fs(Arc::new(fs.clone()), &mem_dir(), Lsn(1)).unwrap();
    let got = read_all(&mut offline).unwrap();
    assert_eq!(got.last(), Some(&(Lsn(6), 6)));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, (1..7).map(|i| (Lsn(i), i)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_segment_header_that_cannot_be_rewritten_on_a_full_disk_fails_open_transiently_and_a_later_open_completes_it(
) {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..4, 40).await;
    drop(wal);
    // A crash right after creating the next segment file, before its header was written.
    let seg = mem_dir().join("00000000000000000004.wal");
    fs.create(&seg).unwrap();
    fs.corrupt(&seg, 0, b"PR").unwrap();
    // Not a byte left once the two bytes are cut off.
    fs.set_capacity_bytes(Some(fs.used_bytes() - 2));
    for _ in 0..2 {
        let err = open_mem(&fs, small_opts()).unwrap_err();
        assert!(matches!(err, WalError::DiskFull { .. }), "{err:?}");
        assert!(err.is_transient(), "{err:?}");
    }
    fs.set_capacity_bytes(None);
    let (wal, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.torn_tail.map(|t| (t.segment.0, t.offset)), Some((4, 0)));
    append_each(&wal, 4..6, 40).await;
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(
        got.iter().map(|g| g.0 .0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}
