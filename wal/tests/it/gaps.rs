//! LSN gaps: a ledger ahead of the recovered log, and segments an operator quarantined.

use crate::common::*;
use prism_wal::{quarantine_segment, read_dir, InflightBatch, Ledger, Lsn, SegmentId, Wal};

/// Segment ids of a directory, oldest first.
fn segment_ids(dir: &std::path::Path) -> Vec<SegmentId> {
    prism_wal::list_segments(dir)
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect()
}

/// `small_opts` keeping every segment, so replay from the start sees the whole log.
fn keep_all() -> prism_wal::WalOptions {
    prism_wal::WalOptions {
        retention: prism_wal::Retention {
            bytes_max: 1 << 30,
            segments_max: 1000,
            age_max: std::time::Duration::from_secs(3600),
        },
        ..small_opts()
    }
}

fn lsns(got: &[(Lsn, u64)]) -> Vec<u64> {
    got.iter().map(|g| g.0 .0).collect()
}

#[tokio::test]
async fn after_the_last_segment_is_quarantined_numbering_continues_past_every_ledger_position() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), keep_all()).unwrap();
    append_each(&wal, 1..40, 100).await;
    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(40));
    ledger.cursors.insert("books".into(), Lsn(38));
    ledger.inflight.insert(
        "books".into(),
        InflightBatch {
            first: Lsn(38),
            last: Lsn(39),
            rows: 2,
        },
    );
    wal.commit_ledger(&ledger).unwrap();
    wal.close().await.unwrap();
    let last = *segment_ids(dir.path()).last().unwrap();
    assert!(last.0 > 1 && last.0 < 40, "{last:?}");
    quarantine_segment(dir.path(), last).unwrap();

    let (wal, rec) = Wal::open(dir.path(), keep_all()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(40), "numbering restarted below a cursor");
    assert_eq!(
        rec.lsn_gap.map(|g| (g.first, g.last)),
        Some((Lsn(last.0), Lsn(39)))
    );
    let r = wal.append(&[env(100, 100), env(101, 100)]).await.unwrap();
    assert_eq!(r.first, Lsn(40));
    // A lane whose cursor was ahead reads every new record, and so does one inside the gap.
    for from in [Lsn(40), Lsn(last.0 + 1)] {
        let got = read_all(&mut wal.reader(from).unwrap()).unwrap();
        assert_eq!(got, vec![(Lsn(40), 100), (Lsn(41), 101)], "from {from}");
    }
    // A reader from the start crosses the gap the ledger explains.
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    let want: Vec<u64> = (1..last.0).chain([40, 41]).collect();
    assert_eq!(lsns(&got), want);
    wal.close().await.unwrap();

    // After a restart nothing is renumbered again and the gap is still crossed, offline too.
    let (wal, rec) = Wal::open(dir.path(), keep_all()).unwrap();
    assert_eq!((rec.next_lsn, rec.lsn_gap), (Lsn(42), None));
    assert_eq!(
        lsns(&read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap()),
        want
    );
    wal.close().await.unwrap();
    assert_eq!(
        lsns(&read_all(&mut read_dir(dir.path(), Lsn(1)).unwrap()).unwrap()),
        want
    );
    assert!(prism_wal::verify(dir.path()).unwrap().is_ok());
}

#[tokio::test]
async fn an_inflight_batch_beyond_the_log_is_never_numbered_again() {
    let fs = prism_wal::FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    append_each(&wal, 1..5, 50).await;
    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), Lsn(3));
    // As if the records 5..=9 had been written and lost with a quarantined segment.
    ledger.inflight.insert(
        "trades".into(),
        InflightBatch {
            first: Lsn(3),
            last: Lsn(9),
            rows: 7,
        },
    );
    wal.commit_ledger(&ledger).unwrap();
    drop(wal);
    let (wal, rec) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(10));
    let r = wal.append(&[env(7, 50)]).await.unwrap();
    assert_eq!(r.first, Lsn(10));
    let got = read_all(&mut wal.reader(Lsn(3)).unwrap()).unwrap();
    assert_eq!(got, vec![(Lsn(3), 3), (Lsn(4), 4), (Lsn(10), 7)]);
}

#[tokio::test]
async fn a_reader_crosses_a_quarantined_middle_segment_and_goes_on_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..40, 100).await;
    wal.close().await.unwrap();
    let ids = segment_ids(dir.path());
    assert!(ids.len() >= 4, "{ids:?}");
    let (hole, after) = (ids[1], ids[2]);
    quarantine_segment(dir.path(), hole).unwrap();
    let want: Vec<u64> = (1..hole.0).chain(after.0..40).collect();

    let (wal, rec) = Wal::open(dir.path(), small_opts()).unwrap();
    assert_eq!(rec.next_lsn, Lsn(40));
    let got = read_all(&mut wal.reader(Lsn(1)).unwrap()).unwrap();
    assert_eq!(lsns(&got), want);
    // From inside the hole: the first record after it.
    let got = read_all(&mut wal.reader(Lsn(hole.0 + 1)).unwrap()).unwrap();
    assert_eq!(got.first().map(|g| g.0), Some(after.first_lsn()));
    // New records follow as usual.
    let r = wal.append(&[env(500, 10)]).await.unwrap();
    assert_eq!(r.first, Lsn(40));
    wal.close().await.unwrap();
    let got = read_all(&mut read_dir(dir.path(), Lsn(1)).unwrap()).unwrap();
    assert_eq!(
        lsns(&got),
        want.iter().copied().chain([40]).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_lane_whose_cursor_was_in_a_quarantined_first_segment_goes_on_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..30, 100).await;
    wal.close().await.unwrap();
    let ids = segment_ids(dir.path());
    quarantine_segment(dir.path(), ids[0]).unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    for from in [Lsn(1), Lsn(2)] {
        let got = read_all(&mut wal.reader(from).unwrap()).unwrap();
        assert_eq!(
            lsns(&got),
            (ids[1].0..30).collect::<Vec<_>>(),
            "from {from}"
        );
    }
}

#[tokio::test]
async fn a_missing_segment_nobody_quarantined_is_still_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..40, 100).await;
    wal.close().await.unwrap();
    let ids = segment_ids(dir.path());
    std::fs::remove_file(
        dir.path()
            .join(prism_wal::segment::segment_file_name(ids[1])),
    )
    .unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    let mut reader = wal.reader(Lsn(1)).unwrap();
    let err = read_all(&mut reader).unwrap_err();
    assert!(
        matches!(err, prism_wal::WalError::Corrupt { .. }),
        "{err:?}"
    );
}
