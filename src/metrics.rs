//! Prometheus metrics: MarketPrism's storage-service names where a counterpart exists, `prism_relay_*` for the rest.
//!
//! MarketPrism's dashboards and alerts (HotInsertErrorsHigh, HotErrorRateHigh, BatchQueueBacklogHigh) read
//! `marketprism_storage_*`; the relay keeps those names with honest meanings: `processed` counts rows
//! ClickHouse acknowledged, never messages merely queued. Counters are registered without the `_total`
//! suffix because the OpenMetrics encoder appends it.
//!
//! Label values of `messages_processed` come from subject tokens, which publishers choose: a
//! publisher sending valid trades on ever new `trade.x{i}.y{i}.BTC` subjects would otherwise grow
//! the label sets, the `/metrics` page and the relay's memory without bound. The first
//! [`PROCESSED_LABEL_SETS_MAX`] label sets are kept as they are; rows of any later set are counted
//! under `exchange="other", market_type="other"` (and `data_type="other"` when their data type is
//! not among the kept sets), so every row stays counted under MarketPrism's label names, and
//! `prism_relay_metrics_label_overflow` counts the rows that went to such a bucket.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label sets of `messages_processed` kept as they are. MarketPrism runs a handful of exchanges,
/// three market types and eight data types (about 120 sets); 500 leaves room for new markets
/// while bounding the series to about 100 KiB of `/metrics` and a few hundred KiB of memory.
pub const PROCESSED_LABEL_SETS_MAX: usize = 500;

/// The label value of rows whose label set is past [`PROCESSED_LABEL_SETS_MAX`].
pub const OVERFLOW_LABEL: &str = "other";

/// Labels of processed rows, as MarketPrism's dashboards group them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RowLabels {
    /// First subject token (`trade`, `orderbook`, ...).
    pub data_type: String,
    /// Second subject token.
    pub exchange: String,
    /// Third subject token.
    pub market_type: String,
}

/// Labels of per-lane figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    /// Drain lane: the table name (or `_unrouted`).
    pub table: String,
}

/// Labels of MarketPrism's queue gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DataTypeLabels {
    /// Lane expressed as MarketPrism's data type where one exists, else the table name.
    pub data_type: String,
}

/// Every metric the relay exports. Cheap to clone (metrics are shared handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Messages appended to the WAL and covered by an fsync.
    pub messages_received: Counter,
    /// Rows ClickHouse acknowledged, by data type, exchange and market type.
    pub messages_processed: Family<RowLabels, Counter>,
    /// Records sent to the dead-letter table.
    pub messages_failed: Counter,
    /// Successful batch inserts.
    pub batch_inserts: Counter,
    /// Rows in successful batch inserts.
    pub batch_size: Counter,
    /// Failed insert attempts (each retry counts).
    pub clickhouse_insert_errors: Counter,
    /// WAL records not yet inserted for a lane (durable LSN minus the lane's cursor; an upper bound).
    pub batch_queue_size: Family<DataTypeLabels, Gauge>,
    /// failed / (processed + failed), in percent.
    pub error_rate_percent: Gauge<f64, AtomicU64>,
    /// Publish time of the newest message appended to the WAL, unix seconds.
    pub last_message_timestamp_seconds: Gauge<f64, AtomicU64>,
    /// JetStream acks sent (one per message with explicit acks, one per batch with ack-all).
    pub acks: Counter,
    /// Fetch calls that returned at least one message.
    pub fetch_batches: Counter,
    /// 1 while fetching is paused because the WAL budget or the disk is full.
    pub ingest_paused: Gauge,
    /// WAL bytes on disk.
    pub wal_bytes: Gauge,
    /// WAL segment files.
    pub wal_segments: Gauge,
    /// Last LSN covered by an fsync.
    pub wal_durable_lsn: Gauge,
    /// A lane's durable cursor (every record of the lane below it is in ClickHouse).
    pub drain_cursor_lsn: Family<LaneLabels, Gauge>,
    /// Publish time (unix seconds) up to which a lane has inserted everything: the drain watermark
    /// a downstream copier (MarketPrism's cold replicator) can wait for after an outage.
    pub drain_watermark_seconds: Family<LaneLabels, Gauge<f64, AtomicU64>>,
    /// 1 while the relay is ready (ClickHouse reachable and schema checked), else 0.
    pub ready: Gauge,
    /// 1 once the WAL failed for good (an fsync error): the process must restart and recover.
    pub wal_failed: Gauge,
    /// Rows counted under an `other` label set because the label-set cap was reached.
    pub metrics_label_overflow: Counter,
    /// Sampled acknowledged messages the audit looked up in ClickHouse.
    pub audit_checked: Counter,
    /// Sampled acknowledged messages the audit did not find in ClickHouse.
    pub audit_missing: Counter,
    /// Internal: processed total, for the error rate.
    processed_sum: Arc<AtomicI64>,
    /// Internal: the label sets of `messages_processed` kept as they are (at most
    /// [`PROCESSED_LABEL_SETS_MAX`]).
    processed_label_sets: Arc<Mutex<KeptLabelSets>>,
}

/// The label sets of `messages_processed` kept as they are, and their data types.
#[derive(Debug, Default)]
struct KeptLabelSets {
    /// At most [`PROCESSED_LABEL_SETS_MAX`].
    sets: HashSet<RowLabels>,
    /// The data types of `sets`.
    data_types: HashSet<String>,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            messages_received: Counter::default(),
            messages_processed: Family::default(),
            messages_failed: Counter::default(),
            batch_inserts: Counter::default(),
            batch_size: Counter::default(),
            clickhouse_insert_errors: Counter::default(),
            batch_queue_size: Family::default(),
            error_rate_percent: Gauge::default(),
            last_message_timestamp_seconds: Gauge::default(),
            acks: Counter::default(),
            fetch_batches: Counter::default(),
            ingest_paused: Gauge::default(),
            wal_bytes: Gauge::default(),
            wal_segments: Gauge::default(),
            wal_durable_lsn: Gauge::default(),
            drain_cursor_lsn: Family::default(),
            drain_watermark_seconds: Family::default(),
            ready: Gauge::default(),
            wal_failed: Gauge::default(),
            metrics_label_overflow: Counter::default(),
            audit_checked: Counter::default(),
            audit_missing: Counter::default(),
            processed_sum: Arc::new(AtomicI64::new(0)),
            processed_label_sets: Arc::new(Mutex::new(KeptLabelSets::default())),
        };
        let m = &metrics;
        let storage = "marketprism_storage_";
        registry.register(
            format!("{storage}messages_received"),
            "Messages appended to the WAL and covered by an fsync",
            m.messages_received.clone(),
        );
        registry.register(
            format!("{storage}messages_processed"),
            "Rows ClickHouse acknowledged",
            m.messages_processed.clone(),
        );
        registry.register(
            format!("{storage}messages_failed"),
            "Records sent to the dead-letter table",
            m.messages_failed.clone(),
        );
        registry.register(
            format!("{storage}batch_inserts"),
            "Successful batch inserts",
            m.batch_inserts.clone(),
        );
        registry.register(
            format!("{storage}batch_size"),
            "Rows in successful batch inserts",
            m.batch_size.clone(),
        );
        registry.register(
            format!("{storage}clickhouse_insert_errors"),
            "Failed ClickHouse insert attempts",
            m.clickhouse_insert_errors.clone(),
        );
        registry.register(
            format!("{storage}batch_queue_size"),
            "WAL records not yet inserted for a table (upper bound)",
            m.batch_queue_size.clone(),
        );
        registry.register(
            format!("{storage}error_rate_percent"),
            "Dead-lettered records over all records handled, in percent",
            m.error_rate_percent.clone(),
        );
        registry.register(
            format!("{storage}last_message_timestamp_seconds"),
            "Publish time of the newest message appended to the WAL",
            m.last_message_timestamp_seconds.clone(),
        );
        registry.register("prism_relay_acks", "JetStream acks sent", m.acks.clone());
        registry.register(
            "prism_relay_fetch_batches",
            "Fetches that returned messages",
            m.fetch_batches.clone(),
        );
        registry.register(
            "prism_relay_ingest_paused",
            "1 while fetching is paused by a full WAL budget or disk",
            m.ingest_paused.clone(),
        );
        registry.register(
            "prism_relay_wal_bytes",
            "WAL bytes on disk",
            m.wal_bytes.clone(),
        );
        registry.register(
            "prism_relay_wal_segments",
            "WAL segment files",
            m.wal_segments.clone(),
        );
        registry.register(
            "prism_relay_wal_durable_lsn",
            "Last WAL record covered by an fsync",
            m.wal_durable_lsn.clone(),
        );
        registry.register(
            "prism_relay_drain_cursor_lsn",
            "Per-table durable cursor",
            m.drain_cursor_lsn.clone(),
        );
        registry.register(
            "prism_relay_drain_watermark_seconds",
            "Publish time up to which a table has every record inserted",
            m.drain_watermark_seconds.clone(),
        );
        registry.register(
            "prism_relay_ready",
            "1 while the relay is ready",
            m.ready.clone(),
        );
        registry.register(
            "prism_relay_metrics_label_overflow",
            "Rows counted under an other label set because the label-set cap was reached",
            m.metrics_label_overflow.clone(),
        );
        registry.register(
            "prism_relay_audit_checked",
            "Sampled acknowledged messages the audit looked up in ClickHouse",
            m.audit_checked.clone(),
        );
        registry.register(
            "prism_relay_audit_missing",
            "Sampled acknowledged messages the audit did not find in ClickHouse",
            m.audit_missing.clone(),
        );
        registry.register(
            "prism_relay_wal_failed",
            "1 once the WAL failed for good (restart to recover)",
            m.wal_failed.clone(),
        );
        metrics
    }

    /// Records rows ClickHouse acknowledged.
    pub fn processed(&self, labels: &RowLabels, rows: u64) {
        match self.bounded_labels(labels) {
            None => {
                self.messages_processed.get_or_create(labels).inc_by(rows);
            }
            Some(overflow) => {
                self.messages_processed
                    .get_or_create(&overflow)
                    .inc_by(rows);
                self.metrics_label_overflow.inc_by(rows);
            }
        }
        self.processed_sum
            .fetch_add(rows as i64, std::sync::atomic::Ordering::Relaxed);
        self.update_error_rate();
    }

    /// Records dead-lettered records.
    pub fn failed(&self, records: u64) {
        self.messages_failed.inc_by(records);
        self.update_error_rate();
    }

    /// `None` when `labels` may be used as they are, else the overflow label set to count under.
    fn bounded_labels(&self, labels: &RowLabels) -> Option<RowLabels> {
        // A panic while the lock was held cannot leave the set inconsistent (insert is the only
        // change), so a poisoned lock is used as it is.
        let mut kept = self
            .processed_label_sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if kept.sets.contains(labels) {
            return None;
        }
        if kept.sets.len() < PROCESSED_LABEL_SETS_MAX {
            kept.sets.insert(labels.clone());
            kept.data_types.insert(labels.data_type.clone());
            return None;
        }
        // Keep the data type only when a kept set has it, so the overflow sets stay bounded too.
        let known = kept.data_types.contains(&labels.data_type);
        Some(RowLabels {
            data_type: if known {
                labels.data_type.clone()
            } else {
                OVERFLOW_LABEL.to_owned()
            },
            exchange: OVERFLOW_LABEL.to_owned(),
            market_type: OVERFLOW_LABEL.to_owned(),
        })
    }

    fn update_error_rate(&self) {
        let processed = self
            .processed_sum
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(0) as f64;
        let failed = self.messages_failed.get() as f64;
        let total = processed + failed;
        let rate = if total > 0.0 {
            100.0 * failed / total
        } else {
            0.0
        };
        self.error_rate_percent.set(rate);
    }
}

/// Renders the registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; the encoder only propagates fmt::Write errors.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_match_marketprism_dashboards() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.messages_received.inc();
        metrics.processed(
            &RowLabels {
                data_type: "trade".into(),
                exchange: "binance".into(),
                market_type: "spot".into(),
            },
            3,
        );
        metrics.failed(1);
        let text = render(&registry);
        for name in [
            "marketprism_storage_messages_received_total 1",
            "marketprism_storage_messages_processed_total{data_type=\"trade\",exchange=\"binance\",market_type=\"spot\"} 3",
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
        const PAGE_BYTES_MAX: usize = 128 * 1024;
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
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with("marketprism_storage_messages_processed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(total, MARKETS + 1, "every row stays counted");
        assert!(
            !text.contains("not_a_type"),
            "unknown data type kept as a label"
        );
    }
}
