//! Group commit, LSN assignment and segment rollover.

use crate::common::*;
use prism_wal::fault::points::{SEGMENT_FSYNC, SEGMENT_WRITE};
use prism_wal::{FaultyFs, Lsn, SegmentId, Wal, WalOptions};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_share_writes_and_fsyncs() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    fs.set_sync_delay(Some(Duration::from_millis(2)));
    let fsyncs_before = fs.count(SEGMENT_FSYNC);
    let writes_before = fs.count(SEGMENT_WRITE);
    let appenders = 16u64;
    let per = 10u64;
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let mut ranges = Vec::new();
            for k in 0..per {
                let i = a * 1000 + k;
                ranges.push(wal.append(&[env(i, 100), env(i + 500, 100)]).await.unwrap());
            }
            ranges
        }));
    }
    let mut lsns = BTreeSet::new();
    for t in tasks {
        for r in t.await.unwrap() {
            assert_eq!(r.len(), 2);
            assert!(lsns.insert(r.first.0) && lsns.insert(r.last.0));
        }
    }
    let total = appenders * per;
    let fsyncs = fs.count(SEGMENT_FSYNC) - fsyncs_before;
    let writes = fs.count(SEGMENT_WRITE) - writes_before;
    assert_eq!(
        lsns,
        (1..=2 * total).collect::<BTreeSet<_>>(),
        "LSNs are dense and unique"
    );
    assert!(
        fsyncs * 2 <= total,
        "{fsyncs} fsyncs for {total} appends: groups were not shared"
    );
    assert_eq!(writes, fsyncs, "one write per group");
    assert_eq!(wal.durable_lsn(), Lsn(2 * total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_append_returns_only_after_an_fsync_covering_it() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    fs.set_sync_delay(Some(Duration::from_millis(1)));
    let mut tasks = Vec::new();
    for a in 0..4u64 {
        let wal = wal.clone();
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..8 {
                let r = wal.append(&[env(a * 100 + k, 60)]).await.unwrap();
                // What a crash right now would keep must already hold the record.
                let snap = fs.durable_snapshot();
                let (w, _) = open_mem(&snap, small_opts()).unwrap();
                let got = read_all(&mut w.reader(Lsn(1)).unwrap()).unwrap();
                assert!(
                    got.iter().any(|&(l, s)| l == r.first && s == a * 100 + k),
                    "lsn {} not durable",
                    r.first
                );
                drop(w);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn records_are_written_in_lsn_order_and_each_segment_is_named_by_its_first_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), small_opts()).unwrap();
    append_each(&wal, 1..40, 100).await;
    let r = wal
        .append(&(40..45).map(|i| env(i, 100)).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!((r.first, r.last), (Lsn(40), Lsn(44)));
    let stats = wal.stats();
    wal.close().await.unwrap();
    let list = prism_wal::list_segments(dir.path()).unwrap();
    assert!(list.len() >= 4, "rolled over: {list:?}");
    assert_eq!(stats.segments, list.len());
    assert_eq!(list[0].id, SegmentId(1));
    for s in &list {
        let bytes = std::fs::read(&s.path).unwrap();
        assert_eq!(prism_wal::segment::decode_header(&bytes), Ok(s.first_lsn));
        // A segment passes the limit by at most one group.
        if s.id != list.last().unwrap().id {
            assert!(
                s.bytes >= 1024,
                "{s:?} sealed before reaching segment_bytes_max"
            );
        }
    }
    let report = prism_wal::verify(dir.path()).unwrap();
    assert!(report.is_ok());
    assert_eq!(report.records, 44);
}

#[tokio::test]
async fn an_append_of_an_oversized_record_is_refused_before_writing_and_consumes_no_lsn() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.append(&[env(1, 10)]).await.unwrap();
    let big = env(2, prism_wal::RECORD_BYTES_MAX + 1);
    let err = wal.append(&[env(3, 10), big]).await.unwrap_err();
    assert!(
        matches!(err, prism_wal::WalError::RecordTooLarge { .. }),
        "{err:?}"
    );
    let r = wal.append(&[env(4, 10)]).await.unwrap();
    assert_eq!(r.first, Lsn(2));
    assert!(matches!(
        wal.append(&[]).await,
        Err(prism_wal::WalError::EmptyAppend)
    ));
}

#[tokio::test]
async fn close_completes_and_later_appends_on_clones_are_refused() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    let other = wal.clone();
    wal.append(&[env(1, 10)]).await.unwrap();
    wal.close().await.unwrap();
    assert!(matches!(
        other.append(&[env(2, 10)]).await,
        Err(prism_wal::WalError::Closed)
    ));
}

#[tokio::test]
async fn an_append_of_more_records_than_allowed_is_refused() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    let many = vec![env(1, 0); prism_wal::APPEND_RECORDS_MAX + 1];
    let err = wal.append(&many).await.unwrap_err();
    assert!(
        matches!(err, prism_wal::WalError::TooManyRecords { .. }),
        "{err:?}"
    );
    assert_eq!(wal.append(&[env(2, 0)]).await.unwrap().first, Lsn(1));
}

/// Counts what the WAL tells its commit observer.
#[derive(Default)]
struct Observed {
    groups: std::sync::atomic::AtomicU64,
    records: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl prism_wal::CommitObserver for Observed {
    fn group_committed(&self, records: u64, bytes: u64, _fsync: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.groups.fetch_add(1, Relaxed);
        self.records.fetch_add(records, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

#[tokio::test]
async fn the_commit_observer_is_told_every_group_with_its_records_and_bytes_and_a_second_observer_is_refused(
) {
    use std::sync::atomic::Ordering::Relaxed;
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    let observed = std::sync::Arc::new(Observed::default());
    assert!(wal.set_commit_observer(observed.clone()));
    assert!(!wal.set_commit_observer(std::sync::Arc::new(Observed::default())));
    let before = wal.stats();
    wal.append(&[env(1, 10), env(2, 10), env(3, 10)])
        .await
        .unwrap();
    append_each(&wal, 4..6, 20).await;
    let after = wal.stats();
    assert_eq!(
        observed.groups.load(Relaxed),
        after.groups_committed - before.groups_committed
    );
    assert_eq!(observed.records.load(Relaxed), 5);
    assert!(
        observed.bytes.load(Relaxed) > 5 * 10,
        "record bytes with framing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_whose_fdatasync_does_not_return_is_reported_as_running_until_it_returns() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, small_opts()).unwrap();
    assert_eq!(wal.commit_running_for(), None, "idle writer");
    fs.hold_segment_syncs(true);
    let appending = {
        let wal = wal.clone();
        tokio::spawn(async move { wal.append(&[env(1, 10)]).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while wal.commit_running_for().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the held commit is never reported"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !appending.is_finished(),
        "the append waits for its fdatasync"
    );
    fs.hold_segment_syncs(false);
    appending.await.unwrap().unwrap();
    assert_eq!(wal.commit_running_for(), None, "the commit ended");
}
