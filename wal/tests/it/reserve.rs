//! The reserve file that keeps room for the ledger on a full disk.

use prism_wal::{Wal, WalOptions, LEDGER_RESERVE_BYTES, RESERVE_FILE};

#[tokio::test]
async fn a_reserve_file_left_short_by_a_crash_mid_creation_is_created_again_at_full_length() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    // A crash while the reserve was being filled leaves it shorter than its size.
    let path = dir.path().join(RESERVE_FILE);
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let held = wal.ensure_reserve().unwrap();
    assert!(held && wal.reserve_held());
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        LEDGER_RESERVE_BYTES
    );
    wal.close().await.unwrap();
}
