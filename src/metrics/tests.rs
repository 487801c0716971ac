//! Unit tests of the exposition: names, label sets, format and buckets.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// Every name of the metric contract (docs/OPERATIONS.md "Metrics reference"), as it appears in
/// the exposition (`_total` on counters; histograms by their base name).
pub const CONTRACT_NAMES: &[&str] = &[
    "marketprism_storage_messages_received_total",
    "marketprism_storage_messages_processed_total",
    "marketprism_storage_messages_failed_total",
    "marketprism_storage_validation_errors_total",
    "marketprism_storage_batch_inserts_total",
    "marketprism_storage_batch_size_total",
    "marketprism_storage_batch_size_avg",
    "marketprism_storage_clickhouse_insert_errors_total",
    "marketprism_storage_clickhouse_tcp_hits_total",
    "marketprism_storage_clickhouse_http_fallback_total",
    "marketprism_storage_batch_queue_size",
    "marketprism_storage_batch_queue_bytes",
    "marketprism_storage_error_rate_percent",
    "marketprism_storage_last_message_timestamp_seconds",
    "marketprism_storage_last_error_timestamp_seconds",
    "marketprism_storage_process_cpu_percent",
    "marketprism_storage_process_rss_bytes",
    "prism_relay_build_info",
    "prism_relay_acks_total",
    "prism_relay_fetch_batches_total",
    "prism_relay_ingest_paused",
    "prism_relay_wal_bytes",
    "prism_relay_wal_segments",
    "prism_relay_wal_durable_lsn",
    "prism_relay_wal_budget_used_ratio",
    "prism_relay_wal_oldest_undrained_age_seconds",
    "prism_relay_wal_fsync_seconds",
    "prism_relay_wal_group_commit_records",
    "prism_relay_drain_cursor_lsn",
    "prism_relay_drain_watermark_seconds",
    "prism_relay_drain_lag_seconds",
    "prism_relay_insert_failing_seconds",
    "prism_relay_batch_rows",
    "prism_relay_insert_seconds",
    "prism_relay_insert_errors_total",
    "prism_relay_insert_retries_total",
    "prism_relay_rows_reinserted_total",
    "prism_relay_clickhouse_sent_bytes_total",
    "prism_relay_dead_letters_total",
    "prism_relay_jetstream_pending",
    "prism_relay_jetstream_ack_pending",
    "prism_relay_jetstream_redelivered",
    "prism_relay_audit_checked_total",
    "prism_relay_audit_missing_total",
    "prism_relay_ready",
    "prism_relay_metrics_label_overflow_total",
    "prism_relay_wal_failed",
];

/// Label-name sets per sample name in `text`, e.g. `{"x_total": {{}, {"data_type"}}}`.
fn label_sets(text: &str) -> BTreeMap<String, BTreeSet<Vec<String>>> {
    let mut sets: BTreeMap<String, BTreeSet<Vec<String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => {
                let inside = rest.rsplit_once('}').map_or("", |(l, _)| l);
                let names: Vec<String> = inside
                    .split("\",")
                    .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_owned()))
                    .collect();
                (name.to_owned(), names)
            }
            None => (line.split(' ').next().unwrap_or("").to_owned(), Vec::new()),
        };
        sets.entry(name).or_default().insert(labels);
    }
    sets
}

fn trade(exchange: &str, market_type: &str) -> RowLabels {
    RowLabels {
        data_type: "trade".into(),
        exchange: exchange.into(),
        market_type: market_type.into(),
    }
}

/// Metrics with one event of every kind, so every labelled family has a series.
fn exercised() -> (Registry, Metrics) {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.messages_received.inc();
    metrics.processed(&trade("binance", "spot"), 3);
    metrics.dead_lettered("trades", "trade", DeadReason::timestamp, 1);
    metrics.batch_inserted(3);
    metrics.insert_attempt("trades", Duration::from_millis(12), None);
    metrics.insert_attempt("trades", Duration::from_millis(40), Some("retryable"));
    metrics
        .insert_retries
        .get_or_create(&LaneLabels {
            table: "trades".into(),
        })
        .inc();
    metrics
        .rows_reinserted
        .get_or_create(&LaneLabels {
            table: "trades".into(),
        })
        .inc();
    metrics.group_committed(17, 4096, Duration::from_micros(700));
    metrics
        .batch_rows
        .get_or_create(&LaneLabels {
            table: "trades".into(),
        })
        .observe(3.0);
    let lane = LaneLabels {
        table: "trades".into(),
    };
    let queue = DataTypeLabels {
        data_type: "trades".into(),
    };
    metrics.batch_queue_size.get_or_create(&queue).set(5);
    metrics.batch_queue_bytes.get_or_create(&queue).set(2048);
    metrics.drain_cursor_lsn.get_or_create(&lane).set(9);
    metrics
        .drain_watermark_seconds
        .get_or_create(&lane)
        .set(1.7e9);
    let consumer = ConsumerLabels {
        stream: "MARKET_DATA".into(),
        consumer: "prism".into(),
    };
    metrics.jetstream_pending.get_or_create(&consumer).set(4);
    metrics
        .jetstream_ack_pending
        .get_or_create(&consumer)
        .set(2);
    metrics
        .jetstream_redelivered
        .get_or_create(&consumer)
        .set(1);
    metrics.health.drain_started();
    metrics.health.lane_started("trades");
    metrics.refresh(
        &WalStats {
            bytes_on_disk: 1024,
            segments: 1,
            first_lsn: prism_wal::Lsn(1),
            next_lsn: prism_wal::Lsn(10),
            durable_lsn: prism_wal::Lsn(9),
            released_through: prism_wal::Lsn(0),
            groups_committed: 1,
        },
        4096,
    );
    (registry, metrics)
}

#[test]
fn every_contract_name_is_exported_once_with_one_help_and_one_type() {
    let (registry, _metrics) = exercised();
    let text = render(&registry);
    for name in CONTRACT_NAMES {
        let help = text
            .lines()
            .filter(|l| l.starts_with(&format!("# HELP {name} ")))
            .count();
        let kind = text
            .lines()
            .filter(|l| l.starts_with(&format!("# TYPE {name} ")))
            .count();
        assert_eq!((help, kind), (1, 1), "{name} in:\n{text}");
        let sampled = text.lines().any(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name} "))
                    || l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name}_bucket{{")))
        });
        assert!(sampled, "{name} has no sample in:\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");
}

#[test]
fn marketprism_names_carry_exactly_the_old_services_label_sets() {
    let (registry, _metrics) = exercised();
    let sets = label_sets(&render(&registry));
    let names = |list: &[&[&str]]| -> BTreeSet<Vec<String>> {
        list.iter()
            .map(|l| l.iter().map(|s| s.to_string()).collect())
            .collect()
    };
    let expected: &[(&str, &[&[&str]])] = &[
        ("marketprism_storage_messages_received_total", &[&[]]),
        (
            "marketprism_storage_messages_processed_total",
            &[
                &[],
                &["data_type"],
                &["data_type", "exchange"],
                &["data_type", "exchange", "market_type"],
            ],
        ),
        (
            "marketprism_storage_messages_failed_total",
            &[&[], &["data_type"]],
        ),
        ("marketprism_storage_validation_errors_total", &[&[]]),
        ("marketprism_storage_batch_inserts_total", &[&[]]),
        ("marketprism_storage_batch_size_total", &[&[]]),
        ("marketprism_storage_batch_size_avg", &[&[]]),
        ("marketprism_storage_clickhouse_insert_errors_total", &[&[]]),
        ("marketprism_storage_clickhouse_tcp_hits_total", &[&[]]),
        ("marketprism_storage_clickhouse_http_fallback_total", &[&[]]),
        ("marketprism_storage_batch_queue_size", &[&["data_type"]]),
        ("marketprism_storage_batch_queue_bytes", &[&["data_type"]]),
        ("marketprism_storage_process_cpu_percent", &[&[]]),
        ("marketprism_storage_process_rss_bytes", &[&[]]),
        ("marketprism_storage_error_rate_percent", &[&[]]),
        ("marketprism_storage_last_message_timestamp_seconds", &[&[]]),
        ("marketprism_storage_last_error_timestamp_seconds", &[&[]]),
        ("prism_relay_build_info", &[&["version", "wal_format"]]),
        ("prism_relay_insert_errors_total", &[&["table", "class"]]),
        ("prism_relay_dead_letters_total", &[&["table", "reason"]]),
        ("prism_relay_clickhouse_sent_bytes_total", &[&["encoding"]]),
        ("prism_relay_jetstream_pending", &[&["stream", "consumer"]]),
        ("prism_relay_drain_lag_seconds", &[&["table"]]),
        ("prism_relay_insert_failing_seconds", &[&["table"]]),
    ];
    for (name, label_names) in expected {
        assert_eq!(
            sets.get(*name),
            Some(&names(label_names)),
            "label sets of {name}"
        );
    }
}

#[test]
fn each_processed_label_set_sums_to_the_rows_acknowledged() {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.processed(&trade("binance", "spot"), 3);
    metrics.processed(&trade("binance", "perpetual"), 4);
    metrics.processed(&trade("okx", "spot"), 5);
    metrics.dead_lettered("trades", "trade", DeadReason::undecodable, 1);
    let text = render(&registry);
    let mut sums: BTreeMap<usize, u64> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("marketprism_storage_messages_processed_total"))
    {
        let labels = line.matches("=\"").count();
        let value: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        *sums.entry(labels).or_default() += value;
    }
    assert_eq!(
        sums,
        BTreeMap::from([(0, 12), (1, 12), (2, 12), (3, 12)]),
        "{text}"
    );
    assert!(text.contains("marketprism_storage_messages_processed_total{data_type=\"trade\",exchange=\"binance\"} 7"), "{text}");
    assert!(
        text.contains("marketprism_storage_messages_failed_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("marketprism_storage_messages_failed_total{data_type=\"trade\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("marketprism_storage_validation_errors_total 1"),
        "{text}"
    );
    assert!(
        text.contains("prism_relay_dead_letters_total{table=\"trades\",reason=\"undecodable\"} 1"),
        "{text}"
    );
    // 1 failed of 13 handled.
    let rate: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("marketprism_storage_error_rate_percent "))
        .and_then(|v| v.parse().ok())
        .expect("error rate exported");
    assert!((rate - 100.0 / 13.0).abs() < 1e-9, "{rate}");
}

#[test]
fn histogram_buckets_are_increasing_and_span_their_ranges() {
    let (registry, _metrics) = exercised();
    let text = render(&registry);
    let bounds = |name: &str, labels: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket{{")) && l.contains(labels))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                if le == "+Inf" {
                    Some(f64::INFINITY)
                } else {
                    le.parse().ok()
                }
            })
            .collect()
    };
    for (name, labels, low, high) in [
        ("prism_relay_wal_fsync_seconds", "", 0.000_1, 3.0),
        ("prism_relay_wal_group_commit_records", "", 1.0, 65_536.0),
        ("prism_relay_batch_rows", "table=\"trades\"", 1.0, 100_000.0),
        (
            "prism_relay_insert_seconds",
            "table=\"trades\"",
            0.001,
            30.0,
        ),
    ] {
        let b = bounds(name, labels);
        assert!(b.len() >= 10, "{name}: {b:?}");
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{name}: {b:?}");
        assert!(b[0] <= low, "{name} starts at {}", b[0]);
        assert_eq!(b.last(), Some(&f64::INFINITY), "{name}");
        assert!(b[b.len() - 2] >= high, "{name} ends at {}", b[b.len() - 2]);
    }
    // The observations landed: one group of 17 records, one fsync of 0.7 ms.
    assert!(
        text.contains("prism_relay_wal_group_commit_records_count 1"),
        "{text}"
    );
    assert!(
        text.contains("prism_relay_wal_group_commit_records_sum 17"),
        "{text}"
    );
    assert!(
        text.contains("prism_relay_wal_fsync_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("prism_relay_insert_seconds_count{table=\"trades\"} 2"),
        "{text}"
    );
}

#[test]
fn counters_render_with_their_total_name_in_help_and_type() {
    let (registry, _metrics) = exercised();
    let text = render(&registry);
    assert!(
        text.contains("# TYPE marketprism_storage_messages_received_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# HELP marketprism_storage_messages_received_total Messages appended"),
        "{text}"
    );
    assert!(
        !text.contains("# TYPE marketprism_storage_messages_received counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE prism_relay_wal_fsync_seconds histogram\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE prism_relay_wal_bytes gauge\n"),
        "{text}"
    );
}

#[test]
fn exported_names_match_marketprism_dashboards() {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.messages_received.inc();
    metrics.processed(&trade("binance", "spot"), 3);
    metrics.dead_lettered("trades", "trade", DeadReason::rejected, 1);
    let text = render(&registry);
    for name in [
        "marketprism_storage_messages_received_total 1",
        "marketprism_storage_messages_processed_total{data_type=\"trade\",exchange=\"binance\",market_type=\"spot\"} 3",
        "marketprism_storage_messages_processed_total 3",
        "marketprism_storage_messages_failed_total 1",
        "marketprism_storage_error_rate_percent 25.0",
    ] {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
}

#[test]
fn tens_of_thousands_of_distinct_markets_render_a_bounded_page_and_keep_every_row_counted() {
    const MARKETS: u64 = 20_000;
    /// Far above the bounded label sets' page, far below one line per market.
    const PAGE_BYTES_MAX: usize = 256 * 1024;
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    for i in 0..MARKETS {
        metrics.processed(
            &RowLabels {
                data_type: "trade".into(),
                exchange: format!("x{i}"),
                market_type: format!("m{i}"),
            },
            1,
        );
    }
    // A subject's first token outside the known data types is bucketed too.
    metrics.processed(
        &RowLabels {
            data_type: "not_a_type".into(),
            exchange: "binance".into(),
            market_type: "spot".into(),
        },
        1,
    );
    let text = render(&registry);
    assert!(
        text.len() <= PAGE_BYTES_MAX,
        "page is {} bytes for {MARKETS} markets",
        text.len()
    );
    // The finest label set partitions the rows.
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with("marketprism_storage_messages_processed_total{"))
        .filter(|l| l.contains("market_type="))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, MARKETS + 1, "every row stays counted");
    assert!(
        !text.contains("not_a_type"),
        "unknown data type kept as a label"
    );
}

#[test]
fn the_open_metrics_text_of_a_counter_becomes_one_text_format_family() {
    let open = "# HELP a_x Help text.\n# TYPE a_x counter\na_x_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
    assert_eq!(
        to_text_format(open),
        "# HELP a_x_total Help text.\n# TYPE a_x_total counter\na_x_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
    );
}
