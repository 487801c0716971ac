//! Ingest: JetStream batches -> WAL append -> ack, one task per configured consumer.
//!
//! The order of the three steps is the relay's first invariant: a message is acknowledged only after
//! the fdatasync that covers its WAL record has returned. `Wal::append` returns only then, and the ack
//! site asserts it against the WAL's durable watermark. Several consumers append concurrently and the
//! WAL's group commit lets them share one write and one fdatasync.
//!
//! Backpressure: while the WAL's byte budget is full, or the disk is, the task stops fetching; the
//! messages stay in JetStream (unacked ones are redelivered after `ack_wait`), memory does not grow.

use std::borrow::Cow;
use std::time::Duration;

use prism_wal::{Envelope, StreamSeq, Wal, WalError};
use tokio::sync::watch;

use crate::logcond::{Condition, Occurrence};
use crate::metrics::Metrics;
use crate::source::{Fetcher, SourceError};

/// How often a paused task re-checks the WAL budget or a full disk.
const PAUSE_POLL_MS: u64 = 100;
/// First delay after a failed fetch (NATS down); doubles up to the maximum.
const FETCH_RETRY_INITIAL_MS: u64 = 100;
/// Longest delay between fetch attempts while NATS is unreachable.
const FETCH_RETRY_MAX_MS: u64 = 5_000;
/// How long a stop lets an append finish (an fsync takes milliseconds; an append that waits
/// longer is waiting for WAL budget, which only ClickHouse can free).
const APPEND_STOP_GRACE_MS: u64 = 2_000;

/// Why an ingest task stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The WAL writer failed for good (an fsync error); the relay must exit and recover at restart.
    #[error("WAL append failed for consumer {consumer}: {source}")]
    Wal {
        /// Durable consumer name.
        consumer: String,
        /// The WAL's error.
        #[source]
        source: WalError,
    },
}

/// Runs one consumer until shutdown: fetch, append, ack.
pub async fn run(
    mut fetcher: Fetcher,
    wal: Wal,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let consumer = fetcher.durable().to_string();
    let mut fetch_delay_ms = FETCH_RETRY_INITIAL_MS;
    // Conditions retried every few milliseconds, logged when they start, every reminder
    // interval while they last, and when they end (the metrics carry the rest).
    let mut disk_full = Condition::default();
    let mut budget_full = Condition::default();
    let mut fetch_failing = Condition::default();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // Without its reserve the WAL's free room belongs to the ledger (it was given up so
        // cursors could move on a full disk): fetch again only once the reserve is back.
        if wal.budget_full() || !wal.reserve_held() {
            metrics.ingest_paused.set(1);
            if wal.budget_full() {
                if let Some(o) = budget_full.occurred() {
                    tracing::warn!(%consumer, occurrences = o.count(), lasted_s = o.lasted_s(), "WAL budget full: fetching paused until the drain frees segments");
                }
            } else {
                log_disk_full(&consumer, &mut disk_full);
            }
            if !wal.reserve_held() {
                make_room(&wal).await.map_err(|source| IngestError::Wal {
                    consumer: consumer.clone(),
                    source,
                })?;
            }
            if pause(&mut shutdown).await {
                return Ok(());
            }
            continue;
        }
        if let Some(ended) = budget_full.cleared() {
            tracing::info!(%consumer, occurrences = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "WAL budget has room again: fetching resumed");
        }
        metrics.ingest_paused.set(0);

        // A pull in flight is finished, not abandoned at shutdown: JetStream counts its messages
        // as delivered, and dropping them would hold them back for ack_wait after a restart. It
        // ends within fetch_expires_ms; the loop then appends, acks, and sees the shutdown.
        let batch = match fetcher.fetch().await {
            Ok(batch) => {
                fetch_delay_ms = FETCH_RETRY_INITIAL_MS;
                if let Some(ended) = fetch_failing.cleared() {
                    tracing::info!(%consumer, failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "fetching works again");
                }
                batch
            }
            Err(error) => {
                log_fetch_error(&consumer, &error, &mut fetch_failing);
                let delay = Duration::from_millis(fetch_delay_ms);
                fetch_delay_ms = (fetch_delay_ms * 2).min(FETCH_RETRY_MAX_MS);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        metrics.fetch_batches.inc();

        // Borrow every field from the fetched messages: the only copy is the WAL write itself.
        let envelopes: Vec<Envelope<'_>> = batch
            .iter()
            .map(|m| Envelope {
                stream: Cow::Borrowed(m.stream()),
                stream_seq: StreamSeq(m.stream_seq()),
                subject: Cow::Borrowed(m.subject()),
                headers: m
                    .msg_id()
                    .map(|id| vec![(Cow::Borrowed("Nats-Msg-Id"), Cow::Borrowed(id))])
                    .unwrap_or_default(),
                published_ns: m.published_ns(),
                payload: Cow::Borrowed(m.payload()),
            })
            .collect();

        let appended = loop {
            // An append waits while the WAL budget is full; a stop must not wait for ClickHouse
            // to free it, so past a grace period the batch is handed back to JetStream instead.
            let stop_then_grace = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(Duration::from_millis(APPEND_STOP_GRACE_MS)).await;
            };
            let attempt = tokio::select! {
                biased;
                result = wal.append(&envelopes) => result,
                _ = stop_then_grace => break None,
            };
            match attempt {
                Ok(range) => break Some(range),
                Err(WalError::DiskFull { .. }) => {
                    // Nothing was written; keep the batch (unacked) and try again once space is
                    // freed: released segments go first, and the append waits for the reserve.
                    metrics.ingest_paused.set(1);
                    log_disk_full(&consumer, &mut disk_full);
                    let stopped = loop {
                        if pause(&mut shutdown).await {
                            break true;
                        }
                        let held = make_room(&wal).await.map_err(|source| IngestError::Wal {
                            consumer: consumer.clone(),
                            source,
                        })?;
                        if held {
                            break false;
                        }
                    };
                    if stopped {
                        break None;
                    }
                }
                Err(source) => return Err(IngestError::Wal { consumer, source }),
            }
        };
        let Some(range) = appended else {
            // Stopping with the batch not written: a negative ack makes JetStream redeliver it at
            // once (to the next start or another instance) instead of after ack_wait. Should the
            // WAL have written it after all, the redelivery collapses on its identity.
            drop(envelopes);
            if let Err(error) = batch.nak().await {
                tracing::warn!(%consumer, %error, "nak failed; JetStream redelivers after ack_wait");
            }
            return Ok(());
        };
        metrics.ingest_paused.set(0);
        if let Some(ended) = disk_full.cleared() {
            tracing::info!(%consumer, occurrences = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "disk space is back: WAL appends resumed");
        }

        // Invariant 1: the ack covers only records an fdatasync has covered.
        assert!(
            wal.durable_lsn() >= range.last,
            "ack before fsync: durable {} < batch end {}",
            wal.durable_lsn(),
            range.last
        );
        metrics.messages_received.inc_by(envelopes.len() as u64);
        if let Some(newest) = envelopes.iter().map(|e| e.published_ns).max() {
            metrics
                .last_message_timestamp_seconds
                .set(newest as f64 / 1e9);
        }
        drop(envelopes);
        match fetcher.ack(batch).await {
            Ok(summary) => {
                metrics.acks.inc_by(summary.acks_sent as u64);
            }
            // The records are durable: a lost ack only means JetStream redelivers them, and the
            // redelivered copies collapse on their identity in ClickHouse.
            Err(error) => tracing::warn!(%consumer, %error, "ack failed; JetStream will redeliver"),
        }
    }
}

/// Waits a pause interval; true if shutdown was requested meanwhile.
async fn pause(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(PAUSE_POLL_MS)) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// Frees room on a full disk (released segments, then the WAL's reserve) off the async workers;
/// true when the reserve is in place and appends may go on.
async fn make_room(wal: &Wal) -> Result<bool, WalError> {
    let wal = wal.clone();
    match tokio::task::spawn_blocking(move || wal.make_room()).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Cancelled only when the runtime shuts down.
        Err(_) => Err(WalError::Closed),
    }
}

fn log_fetch_error(consumer: &str, error: &SourceError, failing: &mut Condition) {
    if let Some(o) = failing.occurred() {
        tracing::warn!(%consumer, %error, failures = o.count(), lasted_s = o.lasted_s(), "fetch failed; retrying");
    }
}

fn log_disk_full(consumer: &str, disk_full: &mut Condition) {
    match disk_full.occurred() {
        Some(Occurrence::Started) => {
            tracing::warn!(%consumer, "disk full: WAL append paused, messages stay unacked in JetStream")
        }
        Some(o) => {
            tracing::warn!(%consumer, occurrences = o.count(), lasted_s = o.lasted_s(), "disk still full: WAL append paused")
        }
        None => {}
    }
}
