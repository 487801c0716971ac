//! Retention of released segments and the disk budget.

use crate::common::*;
use prism_wal::{FaultyFs, InflightBatch, Ledger, Lsn, Retention, Wal, WalOptions};
use std::time::Duration;

fn cursor(lsn: u64) -> Ledger {
    let mut l = Ledger::default();
    l.cursors.insert("trades".into(), Lsn(lsn));
    l
}

fn opts(retention: Retention) -> WalOptions {
    WalOptions {
        retention,
        ..small_opts()
    }
}

const KEEP_ALL: Retention = Retention {
    bytes_max: u64::MAX,
    segments_max: u32::MAX,
    age_max: Duration::from_secs(3600),
};

/// Opens a WAL with many small segments and returns it with the first LSN of each segment.
async fn filled(fs: &FaultyFs, retention: Retention) -> (Wal, Vec<u64>) {
    let (wal, _) = open_mem(fs, opts(retention)).unwrap();
    append_each(&wal, 1..80, 80).await;
    let firsts = prism_wal::list_segments_with_fs(fs, &mem_dir())
        .unwrap()
        .iter()
        .map(|s| s.first_lsn.0)
        .collect();
    (wal, firsts)
}

fn assert_cursor_readable(wal: &Wal, from: u64) {
    let got = read_all(&mut wal.reader(Lsn(from)).unwrap()).unwrap();
    assert_eq!(got.first().map(|g| g.0), Some(Lsn(from)));
    assert_eq!(got.last().map(|g| g.0), Some(Lsn(79)));
}

#[tokio::test]
async fn without_any_cursor_nothing_is_released_or_deleted() {
    let fs = FaultyFs::new();
    let zero = Retention {
        bytes_max: 0,
        segments_max: 0,
        age_max: Duration::ZERO,
    };
    let (wal, firsts) = filled(&fs, zero).await;
    let mut l = Ledger::default();
    l.inflight.insert(
        "trades".into(),
        InflightBatch {
            first: Lsn(70),
            last: Lsn(75),
            rows: 6,
        },
    );
    wal.commit_ledger(&l).unwrap();
    assert_eq!(wal.stats().segments, firsts.len());
    assert_eq!(wal.stats().released_through, Lsn(0));
}

#[tokio::test]
async fn retention_by_segment_count_keeps_that_many_released_segments_and_everything_needed() {
    let fs = FaultyFs::new();
    let (wal, firsts) = filled(
        &fs,
        Retention {
            segments_max: 2,
            ..KEEP_ALL
        },
    )
    .await;
    // The cursor sits inside the fifth-to-last segment.
    let i = firsts.len() - 5;
    let c = firsts[i] + 1;
    wal.commit_ledger(&cursor(c)).unwrap();
    // Segments 0..i are released; two of them are kept.
    assert_eq!(wal.stats().first_lsn, Lsn(firsts[i - 2]));
    assert_eq!(wal.stats().released_through, Lsn(firsts[i] - 1));
    assert_cursor_readable(&wal, c);
    // Moving the cursor to the last record releases everything but the active segment.
    wal.commit_ledger(&cursor(80)).unwrap();
    assert_eq!(wal.stats().segments, 3);
    assert_eq!(wal.stats().first_lsn, Lsn(firsts[firsts.len() - 3]));
}

#[tokio::test]
async fn retention_by_bytes_deletes_the_oldest_released_segments_first() {
    let fs = FaultyFs::new();
    let (wal, firsts) = filled(
        &fs,
        Retention {
            bytes_max: 2500,
            ..KEEP_ALL
        },
    )
    .await;
    let c = firsts[firsts.len() - 2];
    wal.commit_ledger(&cursor(c)).unwrap();
    let list = prism_wal::list_segments_with_fs(&fs, &mem_dir()).unwrap();
    let released: u64 = list
        .iter()
        .filter(|s| s.first_lsn.0 < c)
        .map(|s| s.bytes)
        .sum();
    assert!(
        released <= 2500,
        "{released} bytes of released segments kept"
    );
    assert!(
        released + 1100 > 2500,
        "deleted more than needed: {released}"
    );
    assert_cursor_readable(&wal, c);
    assert_cursor_readable(&wal, list[0].first_lsn.0);
}

#[tokio::test]
async fn retention_by_age_deletes_released_segments_once_they_are_older_than_the_limit() {
    let fs = FaultyFs::new();
    let (wal, firsts) = filled(&fs, KEEP_ALL).await;
    let c = firsts[firsts.len() - 3] + 2;
    wal.commit_ledger(&cursor(c)).unwrap();
    assert_eq!(
        wal.stats().segments,
        firsts.len(),
        "young segments are kept"
    );
    drop(wal);
    // Reopened with a zero age limit, every released segment is too old.
    let zero_age = Retention {
        age_max: Duration::ZERO,
        ..KEEP_ALL
    };
    let (wal, _) = open_mem(&fs, opts(zero_age)).unwrap();
    assert_eq!(wal.stats().first_lsn, Lsn(firsts[firsts.len() - 3]));
    assert_cursor_readable(&wal, c);
}

#[tokio::test]
async fn an_inflight_batch_holds_back_release_below_the_cursors() {
    let fs = FaultyFs::new();
    let zero = Retention {
        bytes_max: 0,
        segments_max: 0,
        age_max: Duration::ZERO,
    };
    let (wal, firsts) = filled(&fs, zero).await;
    let mut l = cursor(78);
    l.inflight.insert(
        "trades".into(),
        InflightBatch {
            first: Lsn(firsts[3] + 1),
            last: Lsn(77),
            rows: 9,
        },
    );
    wal.commit_ledger(&l).unwrap();
    assert_eq!(wal.stats().first_lsn, Lsn(firsts[3]));
    assert_cursor_readable(&wal, firsts[3] + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_makes_appends_wait_and_they_resume_once_retention_frees_space() {
    let fs = FaultyFs::new();
    let o = WalOptions {
        budget_bytes_max: 4000,
        retention: KEEP_ALL,
        ..small_opts()
    };
    let (wal, _) = open_mem(&fs, o).unwrap();
    let mut i = 1;
    while !wal.budget_full() {
        wal.append(&[env(i, 80)]).await.unwrap();
        i += 1;
        assert!(i < 1000);
    }
    let w = wal.clone();
    let mut blocked = tokio::spawn(async move { w.append(&[env(9999, 80)]).await });
    let waited = tokio::time::timeout(Duration::from_millis(100), &mut blocked).await;
    assert!(waited.is_err(), "append went through a full budget");
    assert!(wal.budget_full());
    // Consuming everything releases all sealed segments; the budget deletes them although
    // the retention limits would keep them.
    wal.commit_ledger(&cursor(i)).unwrap();
    assert!(!wal.budget_full());
    let r = blocked.await.unwrap().unwrap();
    assert_eq!(r.first, Lsn(i));
}

#[tokio::test]
async fn retention_keeps_released_segments_across_a_reopen_until_the_ledger_allows() {
    let dir = tempfile::tempdir().unwrap();
    let zero = Retention {
        bytes_max: 0,
        segments_max: 0,
        age_max: Duration::ZERO,
    };
    let (wal, _) = Wal::open(dir.path(), opts(KEEP_ALL)).unwrap();
    append_each(&wal, 1..40, 80).await;
    wal.commit_ledger(&cursor(20)).unwrap();
    let before = segment_files(dir.path()).len();
    wal.close().await.unwrap();
    let (wal, _) = Wal::open(dir.path(), opts(zero)).unwrap();
    let after = segment_files(dir.path()).len();
    assert!(after < before);
    assert_cursor_readable_std(&wal, 20);
}

fn assert_cursor_readable_std(wal: &Wal, from: u64) {
    let got = read_all(&mut wal.reader(Lsn(from)).unwrap()).unwrap();
    assert_eq!(got.first().map(|g| g.0), Some(Lsn(from)));
}
