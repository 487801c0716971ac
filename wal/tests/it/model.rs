//! Model check: random appends, ledger commits, injected faults, crashes that keep a random
//! (possibly garbled) prefix of unsynced data, and reopenings, against the in-memory disk.
//! After every step the log must hold every acknowledged record still needed, in order, with
//! dense LSNs, and must never hand out a corrupt record.

use crate::common::*;
use prism_wal::fault::points::{SEGMENT_FSYNC, SEGMENT_WRITE};
use prism_wal::{FaultyFs, Ledger, Lsn, Retention, Wal, WalError, WalOptions};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    /// Append `count` records with payloads of `payload` bytes.
    Append { count: u8, payload: u16 },
    /// Move the cursor to a fraction of the durable records and commit the ledger.
    Commit { permille: u16 },
    /// Arm a fault for the next operations.
    Fault(Fault),
    /// Power loss: keep synced data and a random prefix of the rest, then reopen.
    Crash { seed: u64, tear: bool },
    /// Clean close and reopen.
    Reopen,
}

#[derive(Debug, Clone)]
enum Fault {
    FsyncError,
    DiskFullAfter(u16),
    ShortWrites(u8),
    TornWrite,
    /// The disk stops after this many more mutating operations (a crash mid-operation).
    FreezeAfter(u8),
    /// Every fault is lifted (an operator frees space); the WAL must carry on.
    Lift,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..6, 0u16..300).prop_map(|(count, payload)| Op::Append { count, payload }),
        2 => (0u16..=1000).prop_map(|permille| Op::Commit { permille }),
        2 => prop_oneof![
            Just(Fault::FsyncError),
            (0u16..400).prop_map(Fault::DiskFullAfter),
            (1u8..40).prop_map(Fault::ShortWrites),
            Just(Fault::TornWrite),
            (0u8..8).prop_map(Fault::FreezeAfter),
            Just(Fault::Lift),
        ]
        .prop_map(Op::Fault),
        2 => (any::<u64>(), any::<bool>()).prop_map(|(seed, tear)| Op::Crash { seed, tear }),
        1 => Just(Op::Reopen),
    ]
}

fn options(segments_max: u32) -> WalOptions {
    WalOptions {
        segment_bytes_max: 600,
        group_bytes_max: 4096,
        budget_bytes_max: 1 << 30,
        retention: Retention {
            bytes_max: 1500,
            segments_max,
            age_max: Duration::from_secs(3600),
        },
        ..WalOptions::default()
    }
}

struct Model {
    fs: FaultyFs,
    opts: WalOptions,
    wal: Option<Wal>,
    /// Acknowledged records: LSN -> id.
    acked: BTreeMap<u64, u64>,
    /// Cursor of the last ledger commit that returned Ok, and of later failed attempts.
    committed: u64,
    attempted: Vec<u64>,
    next_id: u64,
}

impl Model {
    fn open(&mut self) {
        let (wal, _) = open_mem(&self.fs, self.opts).expect("recovery after a crash must succeed");
        self.wal = Some(wal);
        self.check();
    }

    /// The invariants that must hold whenever the WAL is open.
    fn check(&mut self) {
        let Some(wal) = &self.wal else { return };
        let first = wal.stats().first_lsn.0;
        let ledger = wal.load_ledger().expect("ledger readable");
        let cursor = ledger.cursors.get("t").map_or(0, |l| l.0);
        assert!(
            cursor == self.committed || self.attempted.contains(&cursor),
            "ledger cursor {cursor} never committed"
        );
        // Nothing a cursor still needs is gone.
        assert!(
            first <= cursor.max(1),
            "first lsn {first} past cursor {cursor}"
        );
        let mut reader = wal.reader(Lsn(first)).expect("reader from the first lsn");
        let mut expected = first;
        loop {
            match reader.next() {
                Ok(Some(r)) => {
                    assert_eq!(r.lsn.0, expected, "gap or reordering");
                    let id = r
                        .envelope()
                        .expect("every handed-out record decodes")
                        .stream_seq
                        .0;
                    if let Some(&want) = self.acked.get(&r.lsn.0) {
                        assert_eq!(id, want, "acknowledged record {} changed", r.lsn);
                    }
                    expected += 1;
                }
                Ok(None) => break,
                Err(e) => panic!("reader failed at lsn {expected}: {e}"),
            }
        }
        let durable = wal.durable_lsn().0;
        assert_eq!(
            expected,
            durable + 1,
            "reader stopped before the durable lsn"
        );
        if let Some((&last, _)) = self.acked.iter().next_back() {
            assert!(
                last <= durable,
                "acknowledged lsn {last} missing (durable {durable})"
            );
        }
        // Acknowledged records below the first kept LSN were consumed; forget them.
        self.acked = self.acked.split_off(&first);
    }

    async fn step(&mut self, op: Op) {
        if self.wal.is_none() {
            self.open();
        }
        let Some(wal) = self.wal.clone() else { return };
        match op {
            Op::Append { count, payload } => {
                let records: Vec<_> = (0..count as u64)
                    .map(|k| env(self.next_id + k, payload as usize))
                    .collect();
                let ids = self.next_id;
                self.next_id += count as u64;
                match wal.append(&records).await {
                    Ok(r) => {
                        assert_eq!(r.len(), count as u64);
                        for (k, lsn) in (r.first.0..=r.last.0).enumerate() {
                            self.acked.insert(lsn, ids + k as u64);
                        }
                        assert!(wal.durable_lsn() >= r.last);
                    }
                    Err(WalError::DiskFull { .. })
                    | Err(WalError::Io { .. })
                    | Err(WalError::Poisoned { .. }) => {
                        // An unacknowledged append may or may not survive; a later
                        // acknowledged one may reuse its LSNs.
                        if let Some(&last) = self.acked.keys().next_back() {
                            assert!(wal.durable_lsn().0 >= last);
                        }
                    }
                    Err(e) => panic!("unexpected append error {e:?}"),
                }
                if wal.durable_lsn().0 < self.acked.keys().next_back().copied().unwrap_or(0) {
                    panic!("durable lsn went backwards");
                }
            }
            Op::Commit { permille } => {
                let first = wal.stats().first_lsn.0;
                let durable = wal.durable_lsn().0;
                let c = (first + (durable + 1 - first.min(durable + 1)) * permille as u64 / 1000)
                    .max(self.committed);
                let mut l = Ledger::default();
                l.cursors.insert("t".into(), Lsn(c));
                self.attempted.push(c);
                if wal.commit_ledger(&l).is_ok() {
                    self.committed = c;
                    self.attempted.clear();
                }
            }
            Op::Fault(f) => match f {
                Fault::FsyncError => self.fs.fail(SEGMENT_FSYNC, 1),
                Fault::DiskFullAfter(n) => self.fs.enospc_after(n as u64),
                Fault::ShortWrites(n) => self.fs.set_write_bytes_max(Some(n as usize)),
                Fault::TornWrite => self.fs.tear_writes(SEGMENT_WRITE, 1),
                Fault::FreezeAfter(n) => self.fs.freeze_after_ops(Some(n as u64)),
                Fault::Lift => self.fs.clear_faults(),
            },
            Op::Crash { seed, tear } => {
                self.wal = None;
                drop(wal);
                self.fs.crash(seed, tear);
                self.open();
            }
            Op::Reopen => {
                self.wal = None;
                // A poisoned or frozen WAL cannot close cleanly; a crash is what happens then.
                if wal.close().await.is_err() {
                    self.fs.crash(0, false);
                } else {
                    self.fs.clear_faults();
                }
                self.open();
            }
        }
        self.check();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_records_survive_any_crash_in_order_without_gaps(
        ops in proptest::collection::vec(op(), 1..40),
        segments_max in 0u32..3,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut m = Model {
                fs: FaultyFs::new(),
                opts: options(segments_max),
                wal: None,
                acked: BTreeMap::new(),
                committed: 0,
                attempted: Vec::new(),
                next_id: 1,
            };
            for op in ops {
                m.step(op).await;
            }
            // A final crash without tearing must keep everything acknowledged.
            m.wal = None;
            m.fs.crash(42, false);
            m.open();
        });
    }
}
