//! Group-commit append throughput against the raw sequential write + fdatasync bandwidth of
//! the same disk, measured in the same run.
//!
//! Run: `cargo bench -p prism-wal --bench append`. Set `PRISM_BENCH_DIR` to measure another
//! disk (default: the target directory's tmp folder, on the disk the project builds on), and
//! `PRISM_BENCH_MIB` to change the data per configuration (default 64 MiB).
//!
//! Each appender appends batches of 256 records of 300 payload bytes per call, like a JetStream
//! fetch batch; the configurations run 1, 4 and 16 concurrent appenders.

use prism_wal::{Envelope, StreamSeq, Wal, WalOptions};
use std::borrow::Cow;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const MIB: u64 = 1024 * 1024;
/// Records per append call (a JetStream fetch batch).
const BATCH_RECORDS: usize = 256;
/// Payload bytes per record (a MarketPrism trade message is about this size).
const PAYLOAD_BYTES: usize = 300;
/// Size of each raw write.
const RAW_WRITE_BYTES: usize = MIB as usize;

fn bench_dir() -> PathBuf {
    std::env::var_os("PRISM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

fn data_bytes() -> u64 {
    std::env::var("PRISM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
        * MIB
}

/// Sequential 1 MiB writes, each followed by fdatasync: what the disk can do at best.
fn raw_bandwidth(dir: &Path, total: u64) -> f64 {
    let path = dir.join("raw.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(&path)
        .expect("create raw bench file");
    let chunk = vec![0xa5u8; RAW_WRITE_BYTES];
    let start = Instant::now();
    let mut written = 0;
    while written < total {
        f.write_all(&chunk).expect("raw write");
        f.sync_data().expect("raw fdatasync");
        written += RAW_WRITE_BYTES as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    written as f64 / MIB as f64 / secs
}

struct Run {
    records_per_s: f64,
    mib_per_s: f64,
    /// Average records per group commit.
    records_per_group: f64,
}

fn wal_run(dir: &Path, appenders: usize, total: u64) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let wal_dir = dir.join(format!("wal-{appenders}"));
    let _ = std::fs::remove_dir_all(&wal_dir);
    let (wal, _) = Wal::open(&wal_dir, WalOptions::default()).expect("open wal");
    let start_bytes = wal.stats().bytes_on_disk;
    let payload = vec![b'x'; PAYLOAD_BYTES];
    let batch: Vec<Envelope<'static>> = (0..BATCH_RECORDS)
        .map(|i| Envelope {
            stream: Cow::Borrowed("MARKET_DATA"),
            stream_seq: StreamSeq(i as u64),
            subject: Cow::Borrowed("trade.binance_spot.spot.BTC-USDT"),
            headers: vec![(Cow::Borrowed("Nats-Msg-Id"), Cow::Owned(format!("m-{i}")))],
            published_ns: 1_700_000_000_000_000_000,
            payload: Cow::Owned(payload.clone()),
        })
        .collect();
    let batch_bytes = (BATCH_RECORDS * PAYLOAD_BYTES) as u64;
    let batches_total = total / batch_bytes;
    let next = Arc::new(AtomicU64::new(0));
    let batch = Arc::new(batch);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..appenders {
            let (wal, next, batch) = (wal.clone(), next.clone(), batch.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < batches_total {
                    wal.append(&batch).await.expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("appender task");
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let stats = wal.stats();
    let records = stats.durable_lsn.0;
    let bytes = stats.bytes_on_disk - start_bytes;
    rt.block_on(wal.close()).expect("close");
    let _ = std::fs::remove_dir_all(&wal_dir);
    Run {
        records_per_s: records as f64 / secs,
        mib_per_s: bytes as f64 / MIB as f64 / secs,
        records_per_group: records as f64 / stats.groups_committed.max(1) as f64,
    }
}

fn main() {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).expect("bench dir");
    let total = data_bytes();
    println!(
        "WAL append bench: {} MiB of payload per configuration in {}",
        total / MIB,
        dir.display()
    );
    println!("records: {PAYLOAD_BYTES} payload bytes, {BATCH_RECORDS} per append call");
    println!(
        "raw = sequential {} KiB writes + fdatasync each, measured right before each configuration",
        RAW_WRITE_BYTES / 1024
    );
    println!(
        "{:>9} {:>12} {:>10} {:>10} {:>8} {:>10}",
        "appenders", "records/s", "MiB/s", "raw MiB/s", "x raw", "rec/group"
    );
    for appenders in [1usize, 4, 16] {
        // The disk is shared with other work; measuring the baseline next to each
        // configuration keeps the ratio honest when its bandwidth drifts.
        let raw = raw_bandwidth(&dir, total);
        let r = wal_run(&dir, appenders, total);
        println!(
            "{:>9} {:>12.0} {:>10.0} {:>10.0} {:>8.2} {:>10.0}",
            appenders,
            r.records_per_s,
            r.mib_per_s,
            raw,
            r.mib_per_s / raw,
            r.records_per_group
        );
    }
}
