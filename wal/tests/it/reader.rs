//! Readers: from any LSN, across segments, tailing durable records, and behind retention.

use crate::common::*;
use prism_wal::fault::points::SEGMENT_WRITE;
use prism_wal::{FaultyFs, Ledger, Lsn, WalError, WalOptions};
use std::time::Duration;

#[tokio::test]
async fn reader_from_any_lsn_crosses_segment_boundaries() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..60, 80).await;
    assert!(wal.stats().segments > 5);
    for from in [1u64, 2, 7, 17, 33, 59, 60] {
        let got = read_all(&mut wal.reader(Lsn(from)).unwrap()).unwrap();
        assert_eq!(
            got,
            (from..60).map(|i| (Lsn(i), i)).collect::<Vec<_>>(),
            "from {from}"
        );
    }
    let got = read_all(&mut wal.reader(Lsn(0)).unwrap()).unwrap();
    assert_eq!(got.len(), 59);
}

#[tokio::test]
async fn reader_tails_records_as_they_become_durable() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    let mut reader = wal.reader(Lsn(1)).unwrap();
    assert!(reader.next().unwrap().is_none());
    let mut durable = wal.watch_durable();
    let mut seen = Vec::new();
    for i in 1..30u64 {
        let w = wal.clone();
        tokio::spawn(async move { w.append(&[env(i, 70)]).await.unwrap() });
        durable.wait_for(|l| *l >= Lsn(i)).await.unwrap();
        while let Some(r) = reader.next().unwrap() {
            seen.push((r.lsn, r.envelope().unwrap().stream_seq.0));
        }
        assert_eq!(seen.last(), Some(&(Lsn(i), i)));
    }
    assert_eq!(seen.len(), 29);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_does_not_hand_out_a_record_written_but_not_yet_synced() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 10)]).await.unwrap();
    let mut reader = wal.reader(Lsn(1)).unwrap();
    assert_eq!(reader.next().unwrap().map(|r| r.lsn), Some(Lsn(1)));
    fs.set_sync_delay(Some(Duration::from_millis(300)));
    let writes = fs.count(SEGMENT_WRITE);
    let w = wal.clone();
    let task = tokio::spawn(async move { w.append(&[env(2, 10)]).await.unwrap() });
    wait_until("the write of record 2", || fs.count(SEGMENT_WRITE) > writes).await;
    assert_eq!(wal.durable_lsn(), Lsn(1));
    assert!(
        reader.next().unwrap().is_none(),
        "record 2 handed out before its fsync"
    );
    task.await.unwrap();
    assert_eq!(reader.next().unwrap().map(|r| r.lsn), Some(Lsn(2)));
}

#[tokio::test]
async fn reader_survives_retention_deleting_segments_behind_it_and_old_lsns_are_gone() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..60, 80).await;
    let mut ahead = wal.reader(Lsn(50)).unwrap();
    assert_eq!(ahead.next().unwrap().map(|r| r.lsn), Some(Lsn(50)));
    let mut behind = wal.reader(Lsn(1)).unwrap();
    assert_eq!(behind.next().unwrap().map(|r| r.lsn), Some(Lsn(1)));

    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(45));
    wal.commit_ledger(&ledger).unwrap();
    let first = wal.stats().first_lsn;
    assert!(first > Lsn(20) && first <= Lsn(45), "first kept {first}");

    let got = read_all(&mut ahead).unwrap();
    assert_eq!(got.first().map(|g| g.0), Some(Lsn(51)));
    assert_eq!(got.last().map(|g| g.0), Some(Lsn(59)));
    let err = wal.reader(Lsn(3)).unwrap_err();
    assert_eq!(
        err.to_string(),
        WalError::Truncated {
            requested: Lsn(3),
            first_available: first
        }
        .to_string()
    );
    // The lagging reader finishes its open segment, then finds the next one deleted.
    let mut n = 0;
    let err = loop {
        match behind.next() {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("reader skipped deleted records"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, WalError::Truncated { .. }),
        "{err:?} after {n} records"
    );
    assert!(read_all(&mut wal.reader(Lsn(45)).unwrap()).unwrap().len() == 15);
}

#[tokio::test]
async fn a_reader_whose_segment_is_deleted_before_its_first_read_still_reads_it_to_the_end() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..60, 80).await;
    let mut behind = wal.reader(Lsn(1)).unwrap();
    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(45));
    wal.commit_ledger(&ledger).unwrap();
    let mut lsns = Vec::new();
    let err = loop {
        match behind.next() {
            Ok(Some(r)) => lsns.push(r.lsn.0),
            Ok(None) => panic!("reader skipped deleted records"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, WalError::Truncated { .. }), "{err:?}");
    assert_eq!(lsns, (1..=lsns.len() as u64).collect::<Vec<_>>());
    assert!(!lsns.is_empty());
}

#[tokio::test]
async fn an_offline_reader_next_to_a_live_writer_stops_at_the_durable_end() {
    use prism_wal::{read_dir_with_fs, FaultyFs, WalOptions};
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    append_each(&wal, 1..3, 50).await;
    fs.hold_segment_syncs(true);
    // Lifts the hold even when an assertion fails, so the writer (joined on drop) can finish.
    struct Release(FaultyFs);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.hold_segment_syncs(false);
        }
    }
    let _release = Release(fs.clone());
    let appender = wal.clone();
    let task = tokio::spawn(async move { appender.append(&[env(3, 50)]).await });
    wait_until("the group written and its fdatasync waiting", || {
        fs.segment_syncs_held() == 1
    })
    .await;
    let dump = |fs: &FaultyFs| {
        let mut r = read_dir_with_fs(std::sync::Arc::new(fs.clone()), &mem_dir(), Lsn(1)).unwrap();
        read_all(&mut r).unwrap()
    };
    // Record 3 is in the segment file, but its fdatasync has not returned.
    assert_eq!(dump(&fs), vec![(Lsn(1), 1), (Lsn(2), 2)]);
    fs.hold_segment_syncs(false);
    assert_eq!(task.await.unwrap().unwrap().first, Lsn(3));
    assert_eq!(dump(&fs), vec![(Lsn(1), 1), (Lsn(2), 2), (Lsn(3), 3)]);
    wal.close().await.unwrap();
    // Without a writer the directory reads as recovery would see it, whatever a (stale) mark
    // says: a crash may have left any old value there.
    let mark = mem_dir().join(prism_wal::DURABLE_MARK_FILE);
    let mut stale = b"PRSMDUR\0".to_vec();
    stale.extend_from_slice(&1u64.to_le_bytes());
    stale.extend_from_slice(&crc32fast::hash(&1u64.to_le_bytes()).to_le_bytes());
    fs.corrupt(&mark, 0, &stale).unwrap();
    assert_eq!(dump(&fs).len(), 3);
}
