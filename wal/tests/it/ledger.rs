//! The ledger: atomic replacement and checksum failures.

use crate::common::*;
use prism_wal::fault::points::{DIR_FSYNC, LEDGER_FSYNC, LEDGER_RENAME, LEDGER_WRITE};
use prism_wal::{FaultyFs, InflightBatch, Ledger, Lsn, Wal, WalError, WalOptions};

fn ledger(cursor: u64) -> Ledger {
    let mut l = Ledger::default();
    l.cursors.insert("trades".into(), Lsn(cursor));
    l.cursors.insert("orderbooks".into(), Lsn(cursor + 1));
    l.inflight.insert(
        "trades".into(),
        InflightBatch {
            first: Lsn(cursor),
            last: Lsn(cursor + 9),
            rows: 10,
        },
    );
    l
}

#[tokio::test]
async fn ledger_is_empty_before_the_first_commit_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(wal.load_ledger().unwrap(), Ledger::default());
    wal.commit_ledger(&ledger(5)).unwrap();
    wal.commit_ledger(&ledger(7)).unwrap();
    assert_eq!(wal.load_ledger().unwrap(), ledger(7));
    wal.close().await.unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(wal.load_ledger().unwrap(), ledger(7));
    assert!(!dir.path().join("ledger.tmp").exists());
}

#[tokio::test]
async fn a_failed_ledger_commit_at_any_step_leaves_the_previous_ledger_after_a_crash() {
    for point in [LEDGER_WRITE, LEDGER_FSYNC, LEDGER_RENAME, DIR_FSYNC] {
        let fs = FaultyFs::new();
        let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
        wal.commit_ledger(&ledger(5)).unwrap();
        fs.fail(point, 1);
        assert!(wal.commit_ledger(&ledger(9)).is_err(), "{point}");
        drop(wal);
        fs.crash(7, true);
        let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
        assert_eq!(wal.load_ledger().unwrap(), ledger(5), "{point}");
        wal.commit_ledger(&ledger(9)).unwrap();
        assert_eq!(wal.load_ledger().unwrap(), ledger(9), "{point}");
    }
}

#[tokio::test]
async fn a_committed_ledger_survives_a_crash() {
    let fs = FaultyFs::new();
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    wal.commit_ledger(&ledger(11)).unwrap();
    drop(wal);
    fs.crash(3, true);
    let (wal, _) = open_mem(&fs, WalOptions::default()).unwrap();
    assert_eq!(wal.load_ledger().unwrap(), ledger(11));
}

#[tokio::test]
async fn a_ledger_with_a_bad_checksum_is_an_error_not_an_empty_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    wal.commit_ledger(&ledger(5)).unwrap();
    let path = dir.path().join("ledger");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        wal.load_ledger(),
        Err(WalError::LedgerCorrupt { .. })
    ));
    wal.close().await.unwrap();
    let err = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    assert!(matches!(err, WalError::LedgerCorrupt { .. }), "{err:?}");
}
