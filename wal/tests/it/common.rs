//! Helpers shared by the integration tests.

use prism_wal::{Envelope, FaultyFs, Lsn, Reader, Retention, StreamSeq, Wal, WalError, WalOptions};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An envelope whose fields are derived from `i`, with `payload_bytes` of payload.
pub fn env(i: u64, payload_bytes: usize) -> Envelope<'static> {
    let payload: Vec<u8> = (0..payload_bytes).map(|j| (i as usize + j) as u8).collect();
    Envelope {
        stream: Cow::Borrowed("MARKET_DATA"),
        stream_seq: StreamSeq(i),
        subject: Cow::Owned(format!("trade.binance.spot.S{}", i % 7)),
        headers: vec![(Cow::Borrowed("Nats-Msg-Id"), Cow::Owned(format!("id-{i}")))],
        published_ns: 1_700_000_000_000_000_000 + i as i64,
        payload: Cow::Owned(payload),
    }
}

/// Small limits so tests reach rollover, retention and budget edges quickly.
pub fn small_opts() -> WalOptions {
    WalOptions {
        segment_bytes_max: 1024,
        group_bytes_max: 64 * 1024,
        budget_bytes_max: 1 << 30,
        retention: Retention {
            bytes_max: 0,
            segments_max: 0,
            age_max: Duration::from_secs(3600),
        },
        ..WalOptions::default()
    }
}

pub fn mem_dir() -> PathBuf {
    PathBuf::from("/wal")
}

pub fn open_mem(fs: &FaultyFs, opts: WalOptions) -> Result<(Wal, prism_wal::Recovery), WalError> {
    Wal::open_with_fs(&mem_dir(), opts, Arc::new(fs.clone()))
}

/// Reads every record available now as (lsn, stream_seq).
pub fn read_all(reader: &mut Reader) -> Result<Vec<(Lsn, u64)>, WalError> {
    let mut out = Vec::new();
    while let Some(r) = reader.next()? {
        let e = r.envelope()?;
        out.push((r.lsn, e.stream_seq.0));
    }
    Ok(out)
}

/// Appends records `range` one call each.
pub async fn append_each(wal: &Wal, range: std::ops::Range<u64>, payload_bytes: usize) {
    for i in range {
        wal.append(&[env(i, payload_bytes)]).await.unwrap();
    }
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    v.sort();
    v
}
