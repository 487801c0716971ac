//! `/metrics`, `/health` and `/ready` of a real relay against real servers: the metric contract
//! (docs/OPERATIONS.md, "Metrics reference"), the text format as `promtool` reads it, readiness
//! through a ClickHouse outage, and the JetStream backlog gauges.

use std::time::Duration;

use crate::harness::{
    http_get, metric_sum, wait_for, wait_until, Bed, Load, RelayConfig, RelayProc, DRAIN_TIMEOUT,
};

/// How long /ready may take to change after ClickHouse goes or comes back: the bound
/// configured below, a retry delay and a few request timeouts on a loaded 2-core machine.
const READY_CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// `[metrics] ready_insert_failing_s` of these tests: short, so the test does not wait long.
const READY_INSERT_FAILING_S: u64 = 2;

/// Every name of the metric contract as it appears on the page (counters with `_total`,
/// histograms by their base name). Copied from the contract the alert rules and the dashboard
/// are written against, so a name dropped or renamed in the code fails here.
const CONTRACT_NAMES: &[&str] = &[
    "marketprism_storage_messages_received_total",
    "marketprism_storage_messages_processed_total",
    "marketprism_storage_messages_failed_total",
    "marketprism_storage_batch_inserts_total",
    "marketprism_storage_batch_size_total",
    "marketprism_storage_clickhouse_insert_errors_total",
    "marketprism_storage_batch_queue_size",
    "marketprism_storage_error_rate_percent",
    "marketprism_storage_last_message_timestamp_seconds",
    "prism_relay_acks_total",
    "prism_relay_fetch_batches_total",
    "prism_relay_ingest_paused",
    "prism_relay_wal_bytes",
    "prism_relay_wal_segments",
    "prism_relay_wal_durable_lsn",
    "prism_relay_drain_cursor_lsn",
    "prism_relay_drain_watermark_seconds",
    "prism_relay_ready",
    "prism_relay_metrics_label_overflow_total",
    "prism_relay_wal_failed",
    "marketprism_storage_validation_errors_total",
    "marketprism_storage_batch_size_avg",
    "marketprism_storage_clickhouse_tcp_hits_total",
    "marketprism_storage_clickhouse_http_fallback_total",
    "marketprism_storage_batch_queue_bytes",
    "marketprism_storage_process_cpu_percent",
    "marketprism_storage_process_rss_bytes",
    "marketprism_storage_last_error_timestamp_seconds",
    "prism_relay_build_info",
    "prism_relay_wal_fsync_seconds",
    "prism_relay_wal_group_commit_records",
    "prism_relay_batch_rows",
    "prism_relay_insert_seconds",
    "prism_relay_insert_errors_total",
    "prism_relay_insert_retries_total",
    "prism_relay_clickhouse_sent_bytes_total",
    "prism_relay_dead_letters_total",
    "prism_relay_jetstream_pending",
    "prism_relay_jetstream_ack_pending",
    "prism_relay_jetstream_redelivered",
    "prism_relay_wal_budget_used_ratio",
    "prism_relay_wal_oldest_undrained_age_seconds",
    "prism_relay_drain_lag_seconds",
    "prism_relay_insert_failing_seconds",
    "prism_relay_audit_checked_total",
    "prism_relay_audit_missing_total",
];

/// The label-name sets of `name`'s samples on `page`, each sorted.
fn label_sets(page: &str, name: &str) -> std::collections::BTreeSet<Vec<String>> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if rest.starts_with(' ') {
                return Some(Vec::new());
            }
            let inside = rest.strip_prefix('{')?.split_once('}')?.0;
            let mut names: Vec<String> = inside
                .split("\",")
                .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_owned()))
                .collect();
            names.sort();
            Some(names)
        })
        .collect()
}

/// `promtool check metrics` on `page`: its exit status and output.
fn promtool_check(page: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "promtool runs (Debian's prometheus package provides it: apt-get install prometheus)",
        );
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(page.as_bytes())
        .expect("write the page to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A relay config with a short readiness bound and a fast backlog poll.
fn config(bed: &Bed) -> RelayConfig {
    let mut config = bed.config();
    config.ready_insert_failing_s = Some(READY_INSERT_FAILING_S);
    config.backlog_poll_interval_s = Some(1);
    config.insert_timeout_ms = 1_000;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_naming_the_tables_while_clickhouse_is_killed_and_200_once_it_is_restarted(
) {
    let mut bed = Bed::start();
    let config = config(&bed);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let first = bed.publish(Load::new("ready-before", 200)).await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_eq!(
        http_get(relay.metrics_addr, "/ready")
            .await
            .ok()
            .map(|r| r.0),
        Some(200)
    );

    bed.ch.kill9().expect("kill clickhouse");
    // Trades and order books to insert while ClickHouse is gone.
    bed.publish(
        Load::new("ready-during", 200)
            .mix("trade=1,orderbook=1")
            .ts_start(first.ts_last_ms + 1_000),
    )
    .await;
    let addr = relay.metrics_addr;
    let body = wait_for(
        "/ready 503 naming the tables",
        READY_CHANGE_TIMEOUT,
        || async move {
            match http_get(addr, "/ready").await {
                Ok((503, body))
                    if body.contains("table trades") && body.contains("table orderbooks") =>
                {
                    Some(body)
                }
                _ => None,
            }
        },
    )
    .await;
    assert!(body.contains("inserts failing for"), "{body}");
    assert!(body.contains("last error retryable"), "{body}");
    // Liveness is not readiness: every loop waits legitimately through the outage.
    let health = http_get(addr, "/health").await.expect("GET /health");
    assert_eq!(health.0, 200, "{}", health.1);
    let page = relay.metrics().await;
    assert_eq!(metric_sum(&page, "prism_relay_ready", &[]), 0.0);
    for table in ["trades", "orderbooks"] {
        let failing = metric_sum(
            &page,
            "prism_relay_insert_failing_seconds",
            &[("table", table)],
        );
        assert!(
            failing >= READY_INSERT_FAILING_S as f64,
            "{table}: {failing}"
        );
        let lag = metric_sum(&page, "prism_relay_drain_lag_seconds", &[("table", table)]);
        assert!(lag > 0.0, "{table}: lag {lag}");
    }
    assert!(metric_sum(&page, "prism_relay_wal_oldest_undrained_age_seconds", &[]) > 0.0);
    // A table with nothing to insert is not named.
    assert!(!body.contains("table volatility_indices"), "{body}");

    bed.ch.restart().expect("restart clickhouse");
    wait_until("/ready 200 again", READY_CHANGE_TIMEOUT, || async move {
        matches!(http_get(addr, "/ready").await, Ok((200, _)))
    })
    .await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_eq!(report.totals().lost, 0, "{report}");
    let page = relay.metrics().await;
    assert_eq!(metric_sum(&page, "prism_relay_ready", &[]), 1.0);
    assert_eq!(
        metric_sum(&page, "prism_relay_insert_failing_seconds", &[]),
        0.0
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contract_name_is_on_a_real_relays_page_after_traffic_and_a_clickhouse_failure_and_promtool_accepts_the_page(
) {
    let mut bed = Bed::start();
    let config = config(&bed);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    // While loadgen publishes, a page scraped mid-traffic must pass promtool too.
    let addr = relay.metrics_addr;
    let (first, mid_traffic) = tokio::join!(
        bed.publish(Load::new("contract", 2_000).rate(500)),
        wait_for(
            "a page scraped while messages arrive",
            DRAIN_TIMEOUT,
            || async move {
                match http_get(addr, "/metrics").await {
                    Ok((200, page))
                        if metric_sum(
                            &page,
                            "marketprism_storage_messages_received_total",
                            &[],
                        ) > 0.0 =>
                    {
                        Some(page)
                    }
                    _ => None,
                }
            }
        )
    );
    let (ok, output) = promtool_check(&mid_traffic);
    assert!(
        ok,
        "promtool check metrics mid-traffic:\n{output}\n{mid_traffic}"
    );
    // One undecodable trade, for the dead-letter and validation series.
    bed.publish_raw("trade.binance.spot.BTC-USDT", "not json {")
        .await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;

    // One ClickHouse failure, for the error series.
    bed.ch.kill9().expect("kill clickhouse");
    bed.publish(
        Load::new("contract-outage", 100)
            .mix("trade=1")
            .ts_start(first.ts_last_ms + 1_000),
    )
    .await;
    wait_until(
        "an insert error counted",
        READY_CHANGE_TIMEOUT,
        || async move {
            match http_get(addr, "/metrics").await {
                Ok((200, page)) => metric_sum(&page, "prism_relay_insert_errors_total", &[]) > 0.0,
                _ => false,
            }
        },
    )
    .await;
    bed.ch.restart().expect("restart clickhouse");
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    let page = wait_for("the backlog gauges polled", DRAIN_TIMEOUT, || async {
        let page = relay.metrics().await;
        page.contains("prism_relay_jetstream_pending{")
            .then_some(page)
    })
    .await;

    for name in CONTRACT_NAMES {
        let help = page
            .lines()
            .filter(|l| l.starts_with(&format!("# HELP {name} ")))
            .count();
        let kind = page
            .lines()
            .filter(|l| l.starts_with(&format!("# TYPE {name} ")))
            .count();
        assert_eq!((help, kind), (1, 1), "HELP/TYPE of {name}:\n{page}");
        let sampled = page.lines().any(|l| {
            !l.starts_with('#')
                && [" ", "{", "_bucket{"]
                    .iter()
                    .any(|after| l.starts_with(&format!("{name}{after}")))
        });
        assert!(sampled, "{name} has no sample:\n{page}");
    }
    // MarketPrism's label sets, exactly.
    let sets = |list: &[&[&str]]| -> std::collections::BTreeSet<Vec<String>> {
        list.iter()
            .map(|l| {
                let mut v: Vec<String> = l.iter().map(|s| s.to_string()).collect();
                v.sort();
                v
            })
            .collect()
    };
    assert_eq!(
        label_sets(&page, "marketprism_storage_messages_processed_total"),
        sets(&[
            &[],
            &["data_type"],
            &["data_type", "exchange"],
            &["data_type", "exchange", "market_type"]
        ])
    );
    assert_eq!(
        label_sets(&page, "marketprism_storage_messages_failed_total"),
        sets(&[&[], &["data_type"]])
    );
    // The figures behind the names move with the traffic.
    let total = |name: &str| metric_sum(&page, name, &[]);
    assert!(total("prism_relay_insert_errors_total") > 0.0);
    assert!(total("prism_relay_insert_retries_total") > 0.0);
    assert_eq!(total("marketprism_storage_messages_failed_total"), 1.0);
    assert_eq!(total("marketprism_storage_validation_errors_total"), 1.0);
    assert_eq!(
        metric_sum(
            &page,
            "prism_relay_dead_letters_total",
            &[("table", "trades"), ("reason", "undecodable")]
        ),
        1.0
    );
    assert!(total("marketprism_storage_last_error_timestamp_seconds") > 1.7e9);
    assert!(total("marketprism_storage_process_rss_bytes") > 1e6);
    assert!(total("marketprism_storage_batch_size_avg") > 0.0);
    assert_eq!(total("marketprism_storage_clickhouse_tcp_hits_total"), 0.0);
    assert!(
        total("marketprism_storage_clickhouse_http_fallback_total")
            >= total("marketprism_storage_batch_inserts_total")
    );
    let compressed = metric_sum(
        &page,
        "prism_relay_clickhouse_sent_bytes_total",
        &[("encoding", "compressed")],
    );
    let uncompressed = metric_sum(
        &page,
        "prism_relay_clickhouse_sent_bytes_total",
        &[("encoding", "uncompressed")],
    );
    assert!(
        compressed > 0.0 && uncompressed > 0.0,
        "{compressed} {uncompressed}"
    );
    assert!(
        page.contains("prism_relay_wal_fsync_seconds_count "),
        "{page}"
    );
    assert!(metric_sum(&page, "prism_relay_wal_group_commit_records_count", &[]) > 0.0);
    assert!(
        metric_sum(
            &page,
            "prism_relay_batch_rows_count",
            &[("table", "trades")]
        ) > 0.0
    );
    assert_eq!(total("prism_relay_drain_lag_seconds"), 0.0, "caught up");
    let ratio = total("prism_relay_wal_budget_used_ratio");
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");

    let (ok, output) = promtool_check(&page);
    assert!(ok, "promtool check metrics:\n{output}\n{page}");
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauges_show_each_consumers_pending_messages_while_clickhouse_is_down_and_ingest_waits_on_the_wal_budget(
) {
    /// The smallest WAL budget the config allows, in 64 KiB segments: a few thousand order
    /// books fill it while ClickHouse is frozen.
    const BUDGET: u64 = 1024 * 1024;
    let bed = Bed::start();
    let mut config = config(&bed);
    config.segment_bytes_max = 64 * 1024;
    config.budget_bytes_max = BUDGET;
    config.retention_bytes_max = 0;
    config.retention_segments_max = 0;
    for consumer in &mut config.consumers {
        consumer.fetch_batch = 50;
    }
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    bed.ch.pause().expect("SIGSTOP clickhouse");
    let count = 3_000;
    bed.publish(Load::new("backlog", count).mix("trade=1,orderbook=3"))
        .await;
    let consumers = [
        ("MARKET_TRADES", "prism-relay-trades"),
        ("MARKET_BOOKS", "prism-relay-books"),
    ];
    // Ingest stops on the WAL budget; then the gauges must show what the server says, exactly,
    // and account for every message not yet in the WAL.
    let (received, pending) = wait_for(
        "backlog gauges equal to consumer info",
        DRAIN_TIMEOUT,
        || async {
            let page = relay.metrics().await;
            if metric_sum(&page, "prism_relay_ingest_paused", &[]) != 1.0 {
                return None;
            }
            let received = metric_sum(&page, "marketprism_storage_messages_received_total", &[]);
            let mut pending_sum = 0.0;
            for (stream, durable) in consumers {
                let info = bed.consumer_info(stream, durable).await;
                let labels = [("stream", stream), ("consumer", durable)];
                let pending = metric_sum(&page, "prism_relay_jetstream_pending", &labels);
                let ack_pending = metric_sum(&page, "prism_relay_jetstream_ack_pending", &labels);
                let redelivered = metric_sum(&page, "prism_relay_jetstream_redelivered", &labels);
                if (pending, ack_pending, redelivered)
                    != (
                        info.num_pending as f64,
                        info.num_ack_pending as f64,
                        info.num_redelivered as f64,
                    )
                {
                    return None;
                }
                pending_sum += pending + ack_pending;
            }
            // Every message is in the WAL (received and acked) or still at the server.
            let acked = metric_sum(&page, "prism_relay_acks_total", &[]);
            (acked == received && received + pending_sum == count as f64)
                .then_some((received, pending_sum))
        },
    )
    .await;
    assert!(
        pending > 0.0,
        "a backlog is waiting (received {received} of {count})"
    );
    assert!(received > 0.0);
    let page = relay.metrics().await;
    let ratio = metric_sum(&page, "prism_relay_wal_budget_used_ratio", &[]);
    assert!(ratio >= 1.0, "the budget is full: {ratio}");

    bed.ch.resume().expect("SIGCONT clickhouse");
    let report = bed.wait_accounted(DRAIN_TIMEOUT * 2).await;
    assert_eq!(report.totals().lost, 0, "{report}");
    let addr = relay.metrics_addr;
    wait_until(
        "the backlog gauges drop to 0",
        DRAIN_TIMEOUT,
        || async move {
            match http_get(addr, "/metrics").await {
                Ok((200, page)) => metric_sum(&page, "prism_relay_jetstream_pending", &[]) == 0.0,
                _ => false,
            }
        },
    )
    .await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
