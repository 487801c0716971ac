//! Metric label cardinality: subjects with ever new exchange and market-type tokens must not grow
//! `/metrics` or the relay's memory without bound.

use std::fs;

use crate::harness::{metric_sum, wait_until, wait_until_sync, Bed, RelayProc, DRAIN_TIMEOUT};

/// Publishes `count` valid trades whose exchange and market-type tokens are all distinct
/// (`trade.x{i}-...`), pipelining the JetStream acks; returns the number acknowledged.
async fn publish_distinct_trades(bed: &Bed, first: u64, count: u64) -> u64 {
    /// Publishes awaiting their ack at once: enough to keep a local server busy.
    const INFLIGHT_MAX: usize = 512;
    let js = bed.js().await;
    let pad = "p".repeat(48);
    let mut pending = std::collections::VecDeque::new();
    let mut acked = 0;
    for i in first..first + count {
        let exchange = format!("x{i}{pad}");
        let market = format!("m{i}{pad}");
        let subject = format!("trade.{exchange}.{market}.BTC-USDT");
        let payload = format!(
            r#"{{"symbol":"BTC-USDT","price":"100.5","quantity":"0.001","side":"buy","trade_id":"t{i}","exchange":"{exchange}","market_type":"{market}","data_type":"trade","ts_ms":{ts},"trade_ts_ms":{ts}}}"#,
            ts = 1_761_714_312_000i64 + i as i64
        );
        let ack = js
            .publish(subject, payload.into())
            .await
            .expect("publish a trade");
        pending.push_back(ack);
        if pending.len() >= INFLIGHT_MAX {
            if let Some(ack) = pending.pop_front() {
                ack.await.expect("JetStream ack");
                acked += 1;
            }
        }
    }
    for ack in pending {
        ack.await.expect("JetStream ack");
        acked += 1;
    }
    acked
}

/// Resident set size of a process, in bytes (from /proc).
fn rss_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tens_of_thousands_of_distinct_subject_tokens_keep_the_metrics_page_and_memory_bounded() {
    /// Distinct exchanges and market types per round.
    const ROUND: u64 = 20_000;
    /// Far above what the bounded label sets render to, far below one line per market.
    const METRICS_PAGE_BYTES_MAX: usize = 256 * 1024;
    /// A second round of new markets may move the allocator a little, never by the label sets.
    const RSS_GROWTH_BYTES_MAX: u64 = 32 * 1024 * 1024;
    let bed = Bed::start();
    let relay = RelayProc::spawn_ready(&bed, "relay", &bed.config()).await;
    let pid = relay.pid().expect("relay runs");

    assert_eq!(publish_distinct_trades(&bed, 0, ROUND).await, ROUND);
    wait_until_sync("first round stored", DRAIN_TIMEOUT, || {
        bed.count_final("trades") >= ROUND
    })
    .await;
    let name = "marketprism_storage_messages_processed_total";
    wait_until("first round counted", DRAIN_TIMEOUT, || async {
        relay.metric_sum(name, &[]).await >= ROUND as f64
    })
    .await;
    let page = relay.metrics().await;
    assert!(
        page.len() <= METRICS_PAGE_BYTES_MAX,
        "/metrics is {} bytes after {ROUND} distinct markets",
        page.len()
    );
    let rss_after_first = rss_bytes(pid);

    assert_eq!(publish_distinct_trades(&bed, ROUND, ROUND).await, ROUND);
    wait_until_sync("second round stored", DRAIN_TIMEOUT, || {
        bed.count_final("trades") >= 2 * ROUND
    })
    .await;
    wait_until("second round counted", DRAIN_TIMEOUT, || async {
        relay.metric_sum(name, &[]).await >= 2.0 * ROUND as f64
    })
    .await;
    let page = relay.metrics().await;
    assert!(
        page.len() <= METRICS_PAGE_BYTES_MAX,
        "/metrics is {} bytes after {} distinct markets",
        page.len(),
        2 * ROUND
    );
    // Every row is still counted: overflowing markets are bucketed, not dropped.
    assert_eq!(
        metric_sum(&page, name, &[("data_type", "trade")]),
        2.0 * ROUND as f64
    );
    let rss_after_second = rss_bytes(pid);
    assert!(
        rss_after_second.saturating_sub(rss_after_first) <= RSS_GROWTH_BYTES_MAX,
        "RSS grew from {rss_after_first} to {rss_after_second} bytes over {ROUND} new markets"
    );
}
