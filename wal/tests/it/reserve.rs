//! The reserve file that keeps room for the ledger on a full disk.

use crate::common::*;
use prism_wal::{Wal, WalOptions, LEDGER_RESERVE_BYTES, RESERVE_FILE};
use std::sync::Arc;

/// errno of "too many open files" in this process (Linux).
const EMFILE: i32 = 24;

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

#[tokio::test]
async fn running_out_of_file_descriptors_for_the_reserve_is_transient_and_leaves_nothing_behind() {
    use prism_wal::{FaultyFs, FileSystem, WalError};
    let fs = FaultyFs::new();
    let (wal, _) =
        Wal::open_with_fs(&mem_dir(), WalOptions::default(), Arc::new(fs.clone())).unwrap();
    let path = mem_dir().join(RESERVE_FILE);
    // The reserve is neither a segment nor the ledger: its fault point is the generic one.
    fs.fail_with_errno("wal::file::create", 1, EMFILE);
    let err = wal.ensure_reserve().unwrap_err();
    assert!(matches!(err, WalError::FilesExhausted { .. }), "{err:?}");
    assert!(err.is_transient() && !err.is_fatal(), "{err:?}");
    assert!(!wal.reserve_held());
    assert!(fs.metadata(&path).is_err(), "a partial reserve was left");
    assert!(wal.ensure_reserve().unwrap() && wal.reserve_held());
    assert_eq!(fs.metadata(&path).unwrap().len, LEDGER_RESERVE_BYTES);
}
