//! Ingest: JetStream batches -> WAL append -> ack, one task per configured consumer.
//!
//! The order of the three steps is the relay's first invariant: a message is acknowledged only after
//! the fdatasync that covers its WAL record has returned. `Wal::append` returns only then, and the ack
//! site asserts it against the WAL's durable watermark. Several consumers append concurrently and the
//! WAL's group commit lets them share one write and one fdatasync.
//!
//! Backpressure: while the WAL's byte budget is full, or the disk is, the task stops fetching; the
//! messages stay in JetStream (unacked ones are redelivered after `ack_wait`), memory does not grow.
//!
//! A message the WAL cannot take (its record would exceed [`RECORD_BYTES_MAX`]) must neither stop
//! the relay (it would come back at every restart) nor be dropped. Ingest writes a *dead-letter
//! record* in its place, in the same append and at the same position: the same stream, sequence,
//! subject and publish time, the payload cut to [`DEAD_LETTER_PAYLOAD_BYTES_MAX`], and the reason
//! in the header [`DEAD_LETTER_HEADER`]. The batch is acked after the fsync as usual, so the dead
//! letter is durable before its message is acked; the drain routes the record to the dead letters
//! with that reason (ingest knows no ClickHouse, so it cannot insert the dead letter itself).

use std::borrow::Cow;
use std::time::Duration;

use prism_wal::{Envelope, StreamSeq, Wal, WalError, RECORD_BYTES_MAX};
use tokio::sync::watch;

use crate::drain::route::DEAD_LETTER_HEADER;
use crate::logcond::{Condition, Occurrence};
use crate::metrics::Metrics;
use crate::source::{Fetcher, SourceError};

/// Payload bytes a dead-letter record keeps of a message too large for the WAL: enough to see
/// what the message was, small enough that the dead-letter record always fits in a record (the
/// rest of it, stream, subject and reason, is bounded by NATS at a few KiB).
pub const DEAD_LETTER_PAYLOAD_BYTES_MAX: usize = 64 * 1024;

// A dead-letter record keeps its truncated payload with ample room for the other fields.
const _: () = assert!(DEAD_LETTER_PAYLOAD_BYTES_MAX * 16 <= RECORD_BYTES_MAX);

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
    // Beats at every pass and while waiting legitimately (a pull, a retry delay, WAL budget);
    // an append stuck behind a hung fsync does not beat, so /health reports it.
    let heartbeat = metrics
        .health
        .heartbeat(format!("ingest {}/{consumer}", fetcher.stream()));
    let mut fetch_delay_ms = FETCH_RETRY_INITIAL_MS;
    // Conditions retried every few milliseconds, logged when they start, every reminder
    // interval while they last, and when they end (the metrics carry the rest).
    let mut disk_full = Condition::default();
    let mut files_exhausted = Condition::default();
    let mut budget_full = Condition::default();
    let mut fetch_failing = Condition::default();
    // Messages too large for the WAL: events a publisher controls, summarised the same way.
    let mut oversized = Condition::default();
    loop {
        heartbeat.beat();
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
        let batch = match heartbeat.wait(fetcher.fetch()).await {
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
                let mut stop = shutdown.clone();
                heartbeat
                    .wait(async {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => {}
                        }
                    })
                    .await;
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
            .map(|m| {
                fit_for_wal(
                    Envelope {
                        stream: Cow::Borrowed(m.stream()),
                        stream_seq: StreamSeq(m.stream_seq()),
                        subject: Cow::Borrowed(m.subject()),
                        headers: m
                            .record_headers()
                            .map(|(name, value)| (Cow::Borrowed(name), Cow::Borrowed(value)))
                            .collect(),
                        published_ns: m.published_ns(),
                        payload: Cow::Borrowed(m.payload()),
                    },
                    &mut oversized,
                )
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
                result = heartbeat.wait_while(wal.append(&envelopes), || wal.budget_full() || !wal.reserve_held()) => result,
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
                        heartbeat.beat();
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
                Err(error) if error.is_transient() => {
                    // Out of file descriptors at a rollover (FilesExhausted): nothing was written
                    // and the WAL lives on; keep the batch unacked and retry after a pause, as for
                    // a full disk, instead of exiting into a crash loop.
                    metrics.ingest_paused.set(1);
                    if let Some(o) = files_exhausted.occurred() {
                        tracing::warn!(%consumer, %error, occurrences = o.count(), lasted_s = o.lasted_s(), "WAL append paused: out of file descriptors; messages stay unacked in JetStream");
                    }
                    if pause(&mut shutdown).await {
                        break None;
                    }
                }
                Err(source) => return Err(IngestError::Wal { consumer, source }),
            }
        };
        if let Some(ended) = files_exhausted.cleared() {
            tracing::info!(%consumer, occurrences = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "WAL append resumed: file descriptors available again");
        }
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
        match heartbeat.wait(fetcher.ack(batch)).await {
            Ok(summary) => {
                metrics.acks.inc_by(summary.acks_sent as u64);
            }
            // The records are durable: a lost ack only means JetStream redelivers them, and the
            // redelivered copies collapse on their identity in ClickHouse.
            Err(error) => tracing::warn!(%consumer, %error, "ack failed; JetStream will redeliver"),
        }
    }
}

/// Size in bytes of `envelope` as a WAL record body (its bincode encoding, which
/// [`RECORD_BYTES_MAX`] bounds). Sizing counts the payload's length without copying it.
pub fn record_body_bytes(envelope: &Envelope<'_>) -> u64 {
    // bincode's sizing fails only for a type it cannot encode (a map of unknown length, say);
    // an envelope has none, and were it to fail, the message counts as too large for the WAL:
    // it becomes a dead letter rather than an append error.
    bincode::serialized_size(envelope).unwrap_or(u64::MAX)
}

/// `envelope` itself when its record fits in the WAL, otherwise the dead-letter record that takes
/// its place: same stream, sequence, subject and publish time, the payload cut to
/// [`DEAD_LETTER_PAYLOAD_BYTES_MAX`], and one header, [`DEAD_LETTER_HEADER`], with the reason.
/// Other headers are dropped: they may be what makes the message too large, and a dead letter
/// does not use them.
///
/// Each such message is an event a publisher controls, so it is logged through `oversized`: the
/// first at once, then one line per reminder interval with the count so far, never one per message.
pub fn fit_for_wal<'a>(envelope: Envelope<'a>, oversized: &mut Condition) -> Envelope<'a> {
    let body_bytes = record_body_bytes(&envelope);
    if body_bytes <= RECORD_BYTES_MAX as u64 {
        return envelope;
    }
    let payload_bytes = envelope.payload.len();
    let kept = payload_bytes.min(DEAD_LETTER_PAYLOAD_BYTES_MAX);
    let reason = format!(
        "message of {body_bytes} bytes as a WAL record (payload {payload_bytes} bytes) exceeds \
         the WAL record limit of {RECORD_BYTES_MAX} bytes; first {kept} payload bytes kept"
    );
    match oversized.occurred() {
        Some(Occurrence::Started) => tracing::warn!(stream = %envelope.stream,
            stream_seq = envelope.stream_seq.0, subject = %envelope.subject, %reason,
            "message too large for the WAL: written as a dead letter (further ones are summarised periodically)"),
        Some(o) => tracing::warn!(stream = %envelope.stream, stream_seq = envelope.stream_seq.0,
            subject = %envelope.subject, %reason, oversized_so_far = o.count(),
            "messages too large for the WAL keep arriving: written as dead letters"),
        None => {}
    }
    let payload = match envelope.payload {
        Cow::Borrowed(bytes) => Cow::Borrowed(&bytes[..kept]),
        Cow::Owned(mut bytes) => {
            bytes.truncate(kept);
            Cow::Owned(bytes)
        }
    };
    Envelope {
        headers: vec![(Cow::Borrowed(DEAD_LETTER_HEADER), Cow::Owned(reason))],
        payload,
        ..envelope
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
        // Out of file descriptors (for the reserve or a directory fsync): the reserve is not
        // back yet, so ingest stays paused and tries again, instead of exiting.
        Ok(Err(error)) if error.is_transient() => {
            tracing::debug!(%error, "cannot make room in the WAL yet; retrying");
            Ok(false)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::route::dead_letter_reason;
    use prism_wal::segment::encode_record;
    use prism_wal::Lsn;

    fn envelope(payload: Vec<u8>) -> Envelope<'static> {
        Envelope {
            stream: "MARKET_TRADES".into(),
            stream_seq: StreamSeq(42),
            subject: "trade.binance.spot.BTC-USDT".into(),
            headers: vec![("Nats-Msg-Id".into(), "abc".into())],
            published_ns: 1_700_000_000_000_000_000,
            payload: Cow::Owned(payload),
        }
    }

    /// An envelope whose record body is exactly `body_bytes` long.
    fn envelope_of_body(body_bytes: u64) -> Envelope<'static> {
        let overhead = record_body_bytes(&envelope(Vec::new()));
        envelope(vec![b'x'; (body_bytes - overhead) as usize])
    }

    #[test]
    fn the_record_size_is_exact_at_the_wal_record_limit() {
        let limit = RECORD_BYTES_MAX as u64;
        let at_limit = envelope_of_body(limit);
        assert_eq!(record_body_bytes(&at_limit), limit);
        let mut buf = Vec::new();
        assert!(encode_record(&mut buf, Lsn(1), &at_limit).is_ok());
        let over = envelope_of_body(limit + 1);
        assert!(matches!(
            encode_record(&mut Vec::new(), Lsn(1), &over),
            Err(WalError::RecordTooLarge { bytes, .. }) if bytes as u64 == limit + 1
        ));
        // At the limit the message is written as it is; one byte more makes it a dead letter.
        let mut oversized = Condition::default();
        assert_eq!(fit_for_wal(at_limit.clone(), &mut oversized), at_limit);
        assert!(dead_letter_reason(&fit_for_wal(over, &mut oversized)).is_some());
    }

    #[test]
    fn a_message_too_large_for_the_wal_becomes_a_dead_letter_record_with_its_identity_and_reason() {
        let payload: Vec<u8> = (0..RECORD_BYTES_MAX + 1024).map(|i| i as u8).collect();
        let original = envelope(payload.clone());
        let record = fit_for_wal(original.clone(), &mut Condition::default());
        assert_eq!(record.stream, original.stream);
        assert_eq!(record.stream_seq, original.stream_seq);
        assert_eq!(record.subject, original.subject);
        assert_eq!(record.published_ns, original.published_ns);
        assert_eq!(
            &record.payload[..],
            &payload[..DEAD_LETTER_PAYLOAD_BYTES_MAX]
        );
        assert_eq!(record.headers.len(), 1);
        let reason = dead_letter_reason(&record).expect("a dead-letter record");
        assert!(
            reason.contains(&format!("payload {} bytes", payload.len())),
            "{reason}"
        );
        assert!(reason.contains(&RECORD_BYTES_MAX.to_string()), "{reason}");
        assert!(record_body_bytes(&record) <= RECORD_BYTES_MAX as u64);
        assert!(encode_record(&mut Vec::new(), Lsn(1), &record).is_ok());
    }

    #[test]
    fn a_flood_of_oversized_messages_logs_one_line_not_one_per_message() {
        const FLOOD: usize = 200;
        // A reminder interval longer than any test run: only the first line is due.
        const REMINDER: Duration = Duration::from_secs(3_600);
        let over = envelope_of_body(RECORD_BYTES_MAX as u64 + 1);
        let mut oversized = Condition::new(REMINDER);
        let logs = crate::logcond::captured_logs(|| {
            for _ in 0..FLOOD {
                let record = fit_for_wal(over.clone(), &mut oversized);
                assert!(dead_letter_reason(&record).is_some());
            }
        });
        let lines = logs.lines().filter(|l| l.contains("too large")).count();
        assert_eq!(
            lines,
            1,
            "{} log lines for {FLOOD} messages",
            logs.lines().count()
        );
    }
}
