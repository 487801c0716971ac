//! Every outcome of recovery at open.

use crate::common::*;
use prism_wal::{verify, Lsn, RecoveryMode, SegmentId, Wal, WalError, WalOptions};
use std::io::Write;

fn append_raw(path: &std::path::Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

const SEG1: &str = "00000000000000000001.wal";

#[tokio::test]
async fn clean_log_reopens_with_every_record_and_no_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(1));
    append_each(&wal, 1..6, 50).await;
    wal.close().await.unwrap();
    let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.torn_tail, None);
    assert_eq!(rec.segments, 1);
    assert_eq!(rec.next_lsn, Lsn(6));
    assert_eq!(rec.tail_records, 5);
    assert_eq!(wal.durable_lsn(), Lsn(5));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, (1..6).map(|i| (Lsn(i), i)).collect::<Vec<_>>());
}

#[tokio::test]
async fn empty_directory_gets_a_first_segment_starting_at_lsn_one() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("new");
    let (wal, rec) = Wal::open(&sub, WalOptions::default()).unwrap();
    assert_eq!(rec.segments, 0);
    assert_eq!(rec.next_lsn, Lsn(1));
    assert_eq!(rec.torn_tail, None);
    assert_eq!(wal.durable_lsn(), Lsn(0));
    assert_eq!(segment_files(&sub), vec![SEG1.to_string()]);
    assert!(wal.reader(Lsn(1)).unwrap().next().unwrap().is_none());
}

#[tokio::test]
async fn torn_tail_of_last_segment_is_truncated_at_recovery_and_its_lsns_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..4, 40).await;
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let good_len = std::fs::metadata(&path).unwrap().len();
    // Half of a record 4: its header claims more bytes than follow.
    let mut framed = Vec::new();
    prism_wal::segment::encode_record(&mut framed, Lsn(4), &env(4, 40)).unwrap();
    append_raw(&path, &framed[..framed.len() / 2]);

    let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let torn = rec.torn_tail.expect("torn tail reported");
    assert_eq!(torn.segment, SegmentId(1));
    assert_eq!(torn.offset, good_len);
    assert_eq!(torn.bytes_dropped, (framed.len() / 2) as u64);
    assert_eq!(rec.next_lsn, Lsn(4));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    let r = wal.append(&[env(40, 10)]).await.unwrap();
    assert_eq!(r.first, Lsn(4));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(
        got,
        vec![(Lsn(1), 1), (Lsn(2), 2), (Lsn(3), 3), (Lsn(4), 40)]
    );
}

#[tokio::test]
async fn garbage_after_the_last_record_is_truncated_as_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 40).await;
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let good_len = std::fs::metadata(&path).unwrap().len();
    append_raw(&path, &[0x5a; 300]);
    let (wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let torn = rec.torn_tail.expect("garbage reported as torn tail");
    assert_eq!((torn.offset, torn.bytes_dropped), (good_len, 300));
    assert_eq!(rec.next_lsn, Lsn(3));
    assert_eq!(read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap().len(), 2);
}

#[tokio::test]
async fn zeroes_after_the_last_record_are_truncated_as_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 40).await;
    wal.close().await.unwrap();
    append_raw(&dir.path().join(SEG1), &[0; 4096]);
    let (_wal, rec) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(rec.torn_tail.map(|t| t.bytes_dropped), Some(4096));
    assert_eq!(rec.next_lsn, Lsn(3));
}

#[tokio::test]
async fn strict_recovery_refuses_a_torn_tail_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 40).await;
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    append_raw(&path, &[1, 2, 3]);
    let len = std::fs::metadata(&path).unwrap().len();
    let strict = WalOptions {
        recovery_mode: RecoveryMode::Strict,
        ..WalOptions::default()
    };
    let err = Wal::open(dir.path(), strict).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::TornTail {
                segment: SegmentId(1),
                bytes: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

#[tokio::test]
async fn corrupt_header_of_the_last_segment_is_an_error_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 40).await;
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::Corrupt {
                segment: SegmentId(1),
                offset: 0,
                ..
            }
        ),
        "{err:?}"
    );
    let report = verify(dir.path()).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.problems[0].offset, 0);
}

#[tokio::test]
async fn segment_whose_header_was_never_completed_is_reinitialised() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..4, 40).await;
    wal.close().await.unwrap();
    // A crash right after creating the next segment file, before its header was written.
    std::fs::write(dir.path().join("00000000000000000004.wal"), [b'P', b'R']).unwrap();
    let (wal, rec) = Wal::open(dir.path(), small_opts()).unwrap();
    assert_eq!(
        rec.torn_tail.map(|t| (t.segment, t.offset)),
        Some((SegmentId(4), 0))
    );
    assert_eq!(rec.next_lsn, Lsn(4));
    append_each(&wal, 4..6, 40).await;
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(
        got.iter().map(|g| g.0 .0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}

#[tokio::test]
async fn corrupt_record_in_a_sealed_segment_is_not_scanned_at_open_but_reported_by_reader_and_verify(
) {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..40, 100).await;
    wal.close().await.unwrap();
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let first = dir.path().join(&segs[0]);
    let mut bytes = std::fs::read(&first).unwrap();
    // Inside the body of the second record.
    let second = prism_wal::segment::SEGMENT_HEADER_BYTES + bytes[24] as usize + 16;
    bytes[second + 30] ^= 0x01;
    std::fs::write(&first, &bytes).unwrap();

    let (wal, rec) = Wal::open(dir.path(), small_opts()).unwrap();
    assert_eq!(rec.torn_tail, None);
    let mut reader = wal.reader(Lsn(1)).unwrap();
    let r = reader.next().unwrap().unwrap();
    assert_eq!(r.lsn, Lsn(1));
    for _ in 0..3 {
        let err = reader.next().unwrap_err();
        assert!(
            matches!(err, WalError::Corrupt { segment: SegmentId(1), offset, .. } if offset == second as u64),
            "{err:?}"
        );
    }
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert_eq!(report.problems[0].segment, SegmentId(1));
    assert_eq!(report.problems[0].offset, second as u64);
    assert_eq!(report.torn_tail, None);

    // The operator moves it aside; a reader from the quarantined range (a lane whose cursor
    // was in it) goes on with the next segment.
    wal.close().await.unwrap();
    let moved = prism_wal::quarantine_segment(dir.path(), SegmentId(1)).unwrap();
    assert!(moved.exists());
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    let first_left = wal.stats().first_lsn;
    assert!(first_left > Lsn(1));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got.first().map(|g| g.0), Some(first_left));
    let got = read_all(&mut wal.reader(first_left).unwrap()).unwrap();
    assert_eq!(got.last().map(|g| g.0), Some(Lsn(39)));
}

#[tokio::test]
async fn verify_and_list_segments_describe_a_healthy_log() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..30, 100).await;
    wal.close().await.unwrap();
    let report = verify(dir.path()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 29);
    assert_eq!(
        (report.first_lsn, report.last_lsn),
        (Some(Lsn(1)), Some(Lsn(29)))
    );
    let list = prism_wal::list_segments(dir.path()).unwrap();
    assert_eq!(list.len(), report.segments);
    assert_eq!(list.last().unwrap().last_lsn, Some(Lsn(29)));
    for w in list.windows(2) {
        assert_eq!(w[0].last_lsn.unwrap().0 + 1, w[1].first_lsn.0);
    }
    let mut dump = prism_wal::read_dir(dir.path(), Lsn(10)).unwrap();
    let got = read_all(&mut dump).unwrap();
    assert_eq!(got.first(), Some(&(Lsn(10), 10)));
    assert_eq!(got.len(), 20);
}

#[tokio::test]
async fn a_segment_left_by_a_failed_rollover_is_made_durable_before_records_go_into_it() {
    let fs = prism_wal::FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..8, 80).await;
    let segments = wal.stats().segments;
    // Fill the active segment so that the next group rolls over.
    let dir = mem_dir();
    while prism_wal::list_segments_with_fs(&fs, &dir)
        .unwrap()
        .last()
        .unwrap()
        .bytes
        < 1024
    {
        wal.append(&[env(50, 80)]).await.unwrap();
    }
    // The rollover creates the file, then fails to write its header and to clean up.
    fs.freeze_after_ops(Some(1));
    while wal.append(&[env(100, 80)]).await.is_ok() {}
    wal.close().await.unwrap();
    fs.clear_faults();
    let (wal, rec) = open_mem(&fs, small_opts()).unwrap();
    let r = wal.append(&[env(200, 80)]).await.unwrap();
    assert!(wal.stats().segments >= segments);
    drop((wal, rec));
    fs.crash(9, true);
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert!(
        got.contains(&(r.first, 200)),
        "acknowledged record lost: {got:?}"
    );
}

/// Options with a small group commit, so "more than one group's bytes" is reached quickly, and
/// one large segment.
fn small_group_opts(mode: RecoveryMode) -> WalOptions {
    WalOptions {
        group_bytes_max: 1024,
        recovery_mode: mode,
        ..WalOptions::default()
    }
}

/// Offset of the record `n` (1-based) of a segment.
fn record_offset(bytes: &[u8], n: usize) -> usize {
    let mut at = prism_wal::segment::SEGMENT_HEADER_BYTES;
    for _ in 1..n {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += prism_wal::segment::RECORD_HEADER_BYTES + len;
    }
    at
}

#[tokio::test]
async fn a_flipped_byte_early_in_the_last_segment_is_corruption_in_both_modes_and_nothing_is_truncated(
) {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_group_opts(RecoveryMode::TruncateTornTail);
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    append_each(&wal, 1..60, 100).await;
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let mut bytes = std::fs::read(&path).unwrap();
    let bad = record_offset(&bytes, 2);
    bytes[bad + 40] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    for mode in [RecoveryMode::TruncateTornTail, RecoveryMode::Strict] {
        let err = Wal::open(dir.path(), small_group_opts(mode)).unwrap_err();
        assert!(
            matches!(err, WalError::Corrupt { segment: SegmentId(1), offset, .. } if offset == bad as u64),
            "{mode:?}: {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("wal verify"), "{message}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{mode:?} truncated");
    }
    // `wal verify` with the same options names the same place as corruption.
    let report = prism_wal::verify_with_options(&prism_wal::StdFs, dir.path(), &opts).unwrap();
    assert_eq!(report.torn_tail, None, "{report:?}");
    assert_eq!(
        report
            .problems
            .iter()
            .map(|p| (p.segment, p.offset))
            .collect::<Vec<_>>(),
        vec![(SegmentId(1), bad as u64)]
    );
}

#[tokio::test]
async fn a_bad_record_the_ledger_has_consumed_is_corruption_even_at_the_very_end() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_each(&wal, 1..6, 40).await;
    let mut ledger = prism_wal::Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(6));
    wal.commit_ledger(&ledger).unwrap();
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = record_offset(&bytes, 5);
    bytes[last + 20] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    assert!(
        matches!(err, WalError::Corrupt { segment: SegmentId(1), offset, .. } if offset == last as u64),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let report = verify(dir.path()).unwrap();
    assert!(!report.is_ok() && report.torn_tail.is_none(), "{report:?}");
}

#[tokio::test]
async fn a_torn_append_larger_than_a_group_is_still_a_torn_tail_after_any_crash() {
    for seed in 0..40 {
        let fs = prism_wal::FaultyFs::new();
        let opts = small_group_opts(RecoveryMode::TruncateTornTail);
        let (wal, _) = open_mem(&fs, opts).unwrap();
        append_each(&wal, 1..4, 100).await;
        // One append of about five groups' bytes whose first fdatasync fails; then power is lost.
        fs.fail(prism_wal::fault::points::SEGMENT_FSYNC, 1);
        let big: Vec<_> = (10..40).map(|i| env(i, 150)).collect();
        assert!(wal.append(&big).await.unwrap_err().is_fatal());
        drop(wal);
        fs.crash(seed, true);
        let (wal, rec) = open_mem(&fs, opts)
            .unwrap_or_else(|e| panic!("seed {seed}: a torn tail taken for corruption: {e}"));
        assert!(rec.next_lsn >= Lsn(4), "seed {seed}");
        let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
        assert_eq!(&got[..3], &[(Lsn(1), 1), (Lsn(2), 2), (Lsn(3), 3)]);
    }
}

#[tokio::test]
async fn a_flipped_byte_in_an_acknowledged_record_of_the_last_group_is_corruption_when_the_durable_mark_covers_it(
) {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_group_opts(RecoveryMode::TruncateTornTail);
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    append_each(&wal, 1..6, 100).await;
    assert_eq!(wal.durable_lsn(), Lsn(5));
    // Like a killed process: the durable mark (lsn 5) stays behind in the page cache.
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let mut bytes = std::fs::read(&path).unwrap();
    // The last record: fewer bytes than one group follow it, no ledger position covers it.
    let bad = record_offset(&bytes, 5);
    assert!(bytes.len() - bad < opts.group_bytes_max);
    bytes[bad + 30] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    for mode in [RecoveryMode::TruncateTornTail, RecoveryMode::Strict] {
        let err = Wal::open(dir.path(), small_group_opts(mode)).unwrap_err();
        assert!(
            matches!(err, WalError::Corrupt { segment: SegmentId(1), offset, .. } if offset == bad as u64),
            "{mode:?}: {err:?}"
        );
        assert!(err.to_string().contains("durable mark"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{mode:?} truncated");
    }
    let report = prism_wal::verify_with_options(&prism_wal::StdFs, dir.path(), &opts).unwrap();
    assert_eq!(report.torn_tail, None, "{report:?}");
    assert_eq!(
        report
            .problems
            .iter()
            .map(|p| (p.segment, p.offset))
            .collect::<Vec<_>>(),
        vec![(SegmentId(1), bad as u64)]
    );
}

#[tokio::test]
async fn a_bad_record_past_the_durable_mark_is_still_a_torn_tail_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_group_opts(RecoveryMode::TruncateTornTail);
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    append_each(&wal, 1..4, 100).await;
    wal.close().await.unwrap();
    let path = dir.path().join(SEG1);
    let good_len = std::fs::metadata(&path).unwrap().len();
    // An unsynced group of records 4 and 5 whose first page did not reach the disk intact; the
    // mark says 3, as the writer published nothing for the group.
    let mut framed = Vec::new();
    prism_wal::segment::encode_record(&mut framed, Lsn(4), &env(4, 100)).unwrap();
    prism_wal::segment::encode_record(&mut framed, Lsn(5), &env(5, 100)).unwrap();
    framed[30] ^= 0x10;
    append_raw(&path, &framed);
    let (wal, rec) = Wal::open(dir.path(), opts).unwrap();
    let torn = rec.torn_tail.expect("torn tail reported");
    assert_eq!((torn.segment, torn.offset), (SegmentId(1), good_len));
    assert_eq!(rec.next_lsn, Lsn(4));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(got, (1..4).map(|i| (Lsn(i), i)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_group_whose_fdatasync_never_returned_is_a_torn_tail_after_any_machine_crash() {
    for seed in 0..20 {
        let fs = prism_wal::FaultyFs::new();
        let opts = small_group_opts(RecoveryMode::TruncateTornTail);
        let (wal, _) = open_mem(&fs, opts).unwrap();
        append_each(&wal, 1..6, 100).await;
        // The next group is written but its fdatasync waits; then power is lost. The mark on
        // disk is 5 at most (older or none: it is never synced).
        fs.hold_segment_syncs(true);
        let pending = {
            let wal = wal.clone();
            tokio::spawn(async move {
                let group: Vec<_> = (6..9).map(|i| env(i, 100)).collect();
                wal.append(&group).await
            })
        };
        wait_until("the group's fdatasync to wait", || {
            fs.segment_syncs_held() == 1
        })
        .await;
        fs.crash(seed, true);
        fs.hold_segment_syncs(false);
        assert!(pending.await.unwrap().is_err(), "seed {seed}");
        drop(wal);
        let (wal, rec) = open_mem(&fs, opts)
            .unwrap_or_else(|e| panic!("seed {seed}: a torn tail taken for corruption: {e}"));
        assert!(rec.next_lsn >= Lsn(6), "seed {seed}");
        let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
        assert_eq!(
            &got[..5],
            &(1..6).map(|i| (Lsn(i), i)).collect::<Vec<_>>()[..]
        );
    }
}

#[tokio::test]
async fn a_durable_mark_from_before_a_quarantine_never_comes_back_to_call_a_later_torn_tail_corruption(
) {
    use prism_wal::{FileSystem, DURABLE_MARK_FILE};
    let mark_path = mem_dir().join(DURABLE_MARK_FILE);
    for seed in 0..20 {
        let fs = prism_wal::FaultyFs::new();
        let (wal, _) = open_mem(&fs, small_opts()).unwrap();
        append_each(&wal, 1..12, 100).await;
        wal.close().await.unwrap();
        // The mark (lsn 11) reached the disk, as the kernel may write it back at any time.
        let mut mark = [0u8; 20];
        let file = fs.open(&mark_path, false).unwrap();
        assert_eq!(file.read_at(&mut mark, 0).unwrap(), mark.len());
        fs.corrupt(&mark_path, 0, &mark).unwrap();
        // The last segment goes to quarantine: its LSNs, covered by the mark, are given out again.
        let segments = prism_wal::list_segments_with_fs(&fs, &mem_dir()).unwrap();
        let last = segments.last().unwrap().id;
        prism_wal::quarantine_segment_with_fs(&fs, &mem_dir(), last).unwrap();
        // Segments large enough now that no rollover (whose directory fsync would make the new
        // mark durable too) comes between the reuse and the crash.
        let opts = WalOptions {
            segment_bytes_max: 1 << 20,
            ..small_opts()
        };
        let (wal, rec) = open_mem(&fs, opts).unwrap();
        assert_eq!(rec.next_lsn, last.first_lsn(), "seed {seed}");
        // A group reusing them is written, its fdatasync never returns, and power is lost.
        fs.hold_segment_syncs(true);
        let pending = {
            let wal = wal.clone();
            tokio::spawn(async move { wal.append(&[env(100, 100), env(101, 100)]).await })
        };
        wait_until("the group's fdatasync to wait", || {
            fs.segment_syncs_held() == 1
        })
        .await;
        fs.crash(seed, true);
        fs.hold_segment_syncs(false);
        assert!(pending.await.unwrap().is_err(), "seed {seed}");
        drop(wal);
        let (_wal, rec) = open_mem(&fs, opts)
            .unwrap_or_else(|e| panic!("seed {seed}: a torn tail taken for corruption: {e}"));
        assert!(rec.next_lsn >= last.first_lsn(), "seed {seed}");
    }
}
