//! The WAL scenario, by the method of `wal/benches/append.rs`: [`APPENDERS`] concurrent
//! appenders each appending batches of [`BATCH_RECORDS`] records of [`PAYLOAD_BYTES`] bytes to a
//! `Wal` with default options (group commit), against the raw bandwidth of the same disk:
//! sequential [`RAW_WRITE_BYTES`] writes, each followed by `fdatasync`, measured right before
//! (the disk's bandwidth drifts when other work shares it). MiB/s counts the bytes written to
//! segments (framing and envelope included).

use std::borrow::Cow;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prism_wal::{Envelope, StreamSeq, Wal, WalOptions};

use crate::error::BenchError;

const MIB: u64 = 1024 * 1024;
/// Concurrent appenders (enough to fill group commits).
pub const APPENDERS: usize = 16;
/// Records per append call (a JetStream fetch batch of the append bench).
pub const BATCH_RECORDS: usize = 256;
/// Payload bytes per record (a MarketPrism trade message is about this size).
pub const PAYLOAD_BYTES: usize = 300;
/// Size of each raw write.
const RAW_WRITE_BYTES: usize = MIB as usize;
/// Worker threads of the appenders' runtime (as in the append bench).
const WORKER_THREADS: usize = 4;

/// One measurement of the WAL and its baseline.
#[derive(Debug, Clone, Copy)]
pub struct WalFigures {
    pub wal_mib_per_s: f64,
    pub raw_mib_per_s: f64,
    pub records_per_s: f64,
    pub records_per_group: f64,
}

/// Sequential 1 MiB writes, each followed by fdatasync: what the disk can do at best.
fn raw_bandwidth(dir: &Path, total: u64) -> Result<f64, BenchError> {
    let path = dir.join("raw.bin");
    let io = |e| BenchError::io(format!("raw writes to {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let chunk = vec![0xa5u8; RAW_WRITE_BYTES];
    let start = Instant::now();
    let mut written = 0;
    while written < total {
        f.write_all(&chunk).map_err(io)?;
        f.sync_data().map_err(io)?;
        written += RAW_WRITE_BYTES as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(written as f64 / MIB as f64 / secs)
}

/// Appends `total` payload bytes with [`APPENDERS`] appenders to a fresh WAL under `dir`.
fn wal_run(dir: &Path, total: u64) -> Result<(f64, f64, f64), BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .map_err(|e| BenchError::io("building the appenders' runtime", e))?;
    let wal_dir = dir.join("wal");
    let _ = std::fs::remove_dir_all(&wal_dir);
    let (wal, _) = Wal::open(&wal_dir, WalOptions::default())?;
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
    let batches_total = total / (BATCH_RECORDS * PAYLOAD_BYTES) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let batch = Arc::new(batch);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..APPENDERS {
            let (wal, next, batch) = (wal.clone(), next.clone(), batch.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < batches_total {
                    wal.append(&batch).await?;
                }
                Ok::<(), prism_wal::WalError>(())
            }));
        }
        for t in tasks {
            t.await
                .map_err(|e| BenchError::io("appender task", std::io::Error::other(e)))??;
        }
        Ok::<(), BenchError>(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    let stats = wal.stats();
    let records = stats.durable_lsn.0;
    let bytes = stats.bytes_on_disk - start_bytes;
    rt.block_on(wal.close())?;
    let _ = std::fs::remove_dir_all(&wal_dir);
    Ok((
        bytes as f64 / MIB as f64 / secs,
        records as f64 / secs,
        records as f64 / stats.groups_committed.max(1) as f64,
    ))
}

/// The raw baseline, then the WAL, `mib` MiB of payload each, in `dir`.
pub fn measure(dir: &Path, mib: u64) -> Result<WalFigures, BenchError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
    let total = mib * MIB;
    let raw = raw_bandwidth(dir, total)?;
    let (wal, records_per_s, records_per_group) = wal_run(dir, total)?;
    Ok(WalFigures {
        wal_mib_per_s: wal,
        raw_mib_per_s: raw,
        records_per_s,
        records_per_group,
    })
}
