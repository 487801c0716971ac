//! Prometheus metrics: MarketPrism's storage-service names where a counterpart exists, `prism_relay_*` for the rest.
//!
//! MarketPrism's dashboards and alerts (HotInsertErrorsHigh, HotErrorRateHigh, BatchQueueBacklogHigh) read
//! `marketprism_storage_*`; the relay keeps those names with honest meanings: `processed` counts rows
//! ClickHouse acknowledged, never messages merely queued. Counters are registered without the `_total`
//! suffix because the encoder appends it.
//!
//! MarketPrism's old service exported some names under several label sets at once (PromQL only
//! divides series whose labels match, so its dashboards need each of them): `messages_processed`
//! unlabeled, by `{data_type}`, by `{data_type,exchange}` and by `{data_type,exchange,market_type}`,
//! and `messages_failed` unlabeled and by `{data_type}`. A `Family` has one label type, so those
//! two use label types whose absent labels are left out ([`ProcessedLabels`], [`FailedLabels`]):
//! one family, one `HELP`/`TYPE`, several label sets. Each row is counted once in every set, so
//! every set sums to the same total.
//!
//! Label values of `messages_processed` come from subject tokens, which publishers choose: a
//! publisher sending valid trades on ever new `trade.x{i}.y{i}.BTC` subjects would otherwise grow
//! the label sets, the `/metrics` page and the relay's memory without bound. The first
//! [`PROCESSED_LABEL_SETS_MAX`] label sets are kept as they are; rows of any later set are counted
//! under `exchange="other", market_type="other"` (and `data_type="other"` when their data type is
//! not among the kept sets), so every row stays counted under MarketPrism's label names, and
//! `prism_relay_metrics_label_overflow` counts the rows that went to such a bucket. Every other
//! label is bounded by the configuration (tables, consumers) or by an enum (error classes,
//! dead-letter reasons).
//!
//! The page is rendered in the Prometheus text format 0.0.4 ([`render`]), which every Prometheus
//! and `promtool check metrics` read; gauges that depend on time (drain lag, failing streaks,
//! process CPU) are computed at scrape time ([`Metrics::refresh`]), so they stay current while
//! the loop that owns them waits on ClickHouse.

pub mod health;
pub mod process;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prism_wal::{CommitObserver, WalStats};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use health::{Health, Heartbeat};

/// Label sets of `messages_processed` kept as they are. MarketPrism runs a handful of exchanges,
/// three market types and eight data types (about 120 sets); 500 leaves room for new markets
/// while bounding the series to about 100 KiB of `/metrics` and a few hundred KiB of memory.
pub const PROCESSED_LABEL_SETS_MAX: usize = 500;

/// The label value of rows whose label set is past [`PROCESSED_LABEL_SETS_MAX`].
pub const OVERFLOW_LABEL: &str = "other";

/// The `data_type` of dead letters no route claimed: their first subject token is the
/// publisher's choice, so it is not used as a label.
pub const UNROUTED_DATA_TYPE: &str = "unrouted";

/// WAL fsync latency buckets: 100 µs doubling 16 times (to about 3.3 s), from an NVMe flush to a
/// disk in trouble.
const FSYNC_BUCKET_START_S: f64 = 0.000_1;
/// Number of fsync latency buckets.
const FSYNC_BUCKETS: u16 = 16;
/// Group-commit size buckets: 1 record doubling 17 times (to 65,536, the most one append may carry).
const GROUP_RECORDS_BUCKETS: u16 = 17;
/// Batch size buckets: 1 row doubling 18 times (to 131,072), past any `rows_max` in use.
const BATCH_ROWS_BUCKETS: u16 = 18;
/// Insert latency buckets: 1 ms doubling 16 times (to about 33 s), past `insert_timeout_ms`'s
/// default, so a timed-out attempt lands in the last finite bucket or `+Inf`.
const INSERT_BUCKET_START_S: f64 = 0.001;
/// Number of insert latency buckets.
const INSERT_BUCKETS: u16 = 16;

// The group-commit buckets reach the most records one append may carry.
const _: () = assert!(1u64 << (GROUP_RECORDS_BUCKETS - 1) >= prism_wal::APPEND_RECORDS_MAX as u64);

/// Labels of processed rows, as MarketPrism's dashboards group them.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RowLabels {
    /// First subject token (`trade`, `orderbook`, ...).
    pub data_type: String,
    /// Second subject token.
    pub exchange: String,
    /// Third subject token.
    pub market_type: String,
}

/// A label set of `messages_processed`: the labels present are encoded, the absent ones left out,
/// so one family holds MarketPrism's four label sets (see the module documentation).
#[derive(Clone, Debug, Hash, PartialEq, Eq, Default)]
pub struct ProcessedLabels {
    /// First subject token.
    pub data_type: Option<String>,
    /// Second subject token.
    pub exchange: Option<String>,
    /// Third subject token.
    pub market_type: Option<String>,
}

impl ProcessedLabels {
    /// The four label sets one row of `labels` is counted in: none, data type, data type and
    /// exchange, all three.
    fn all_of(labels: &RowLabels) -> [ProcessedLabels; 4] {
        let dt = Some(labels.data_type.clone());
        let ex = Some(labels.exchange.clone());
        [
            ProcessedLabels::default(),
            ProcessedLabels {
                data_type: dt.clone(),
                ..ProcessedLabels::default()
            },
            ProcessedLabels {
                data_type: dt.clone(),
                exchange: ex.clone(),
                market_type: None,
            },
            ProcessedLabels {
                data_type: dt,
                exchange: ex,
                market_type: Some(labels.market_type.clone()),
            },
        ]
    }
}

impl EncodeLabelSet for ProcessedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        let present: Vec<(&str, &str)> = [
            ("data_type", &self.data_type),
            ("exchange", &self.exchange),
            ("market_type", &self.market_type),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_deref().map(|v| (name, v)))
        .collect();
        present.encode(encoder)
    }
}

/// A label set of `messages_failed`: unlabeled, or by data type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, Default)]
pub struct FailedLabels {
    /// The data type of the dead-lettered records, when this is the per-type set.
    pub data_type: Option<String>,
}

impl EncodeLabelSet for FailedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        match &self.data_type {
            Some(data_type) => vec![("data_type", data_type.as_str())].encode(encoder),
            None => Ok(()),
        }
    }
}

/// Labels of per-lane figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct LaneLabels {
    /// Drain lane: the table name (or `_unrouted`).
    pub table: String,
}

/// Labels of MarketPrism's queue gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DataTypeLabels {
    /// The lane's table name (MarketPrism's dashboards only sum or max over it).
    pub data_type: String,
}

/// Labels of the build information gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct BuildLabels {
    /// The relay's version (Cargo package version).
    pub version: String,
    /// The WAL segment format version the relay writes.
    pub wal_format: String,
}

/// Labels of failed insert attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct InsertErrorLabels {
    /// The table the insert was for (a lane's table or the dead-letter table).
    pub table: String,
    /// The sink's error class, lower_snake_case (`retryable`, `poison`, `schema`, ...).
    pub class: String,
}

/// Which side of the compression a byte count is on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Encoding {
    /// Bytes on the wire to ClickHouse (LZ4-compressed bodies and their HTTP framing).
    compressed,
    /// The bodies before compression.
    uncompressed,
}

/// Labels of bytes sent to ClickHouse.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EncodingLabels {
    /// Compressed (wire) or uncompressed (body) bytes.
    pub encoding: Encoding,
}

/// Why a record became a dead letter: a bounded set of classes for the `reason` label (the
/// full reason is in the dead letter's `error` column).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DeadReason {
    /// The message was larger than a WAL record may be (written by ingest in its place).
    oversized,
    /// The NATS client could not read the delivery (a subject or headers that are not UTF-8).
    invalid_subject,
    /// No route claims the subject's first token.
    unrouted,
    /// The payload did not decode into a row of its table.
    undecodable,
    /// The row's time lies outside the plausible window.
    timestamp,
    /// ClickHouse rejected the row's content (isolated from its batch).
    rejected,
}

impl DeadReason {
    /// The reasons the relay's own checks give, before anything is sent to ClickHouse:
    /// MarketPrism's `validation_errors` counts these.
    pub fn is_validation(self) -> bool {
        matches!(self, DeadReason::undecodable | DeadReason::timestamp)
    }
}

/// Labels of dead letters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// The lane the record was read by (its table, or `_unrouted`).
    pub table: String,
    /// The reason class.
    pub reason: DeadReason,
}

/// Labels of JetStream consumer figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The stream.
    pub stream: String,
    /// The durable consumer.
    pub consumer: String,
}

/// A histogram family keyed by table.
type TableHistograms = Family<LaneLabels, Histogram, fn() -> Histogram>;

fn batch_rows_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, BATCH_ROWS_BUCKETS))
}

fn insert_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        INSERT_BUCKET_START_S,
        2.0,
        INSERT_BUCKETS,
    ))
}

/// Every metric the relay exports. Cheap to clone (metrics are shared handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Messages appended to the WAL and covered by an fsync.
    pub messages_received: Counter,
    /// Rows ClickHouse acknowledged, under MarketPrism's four label sets.
    pub messages_processed: Family<ProcessedLabels, Counter>,
    /// Records sent to the dead-letter table, unlabeled and by data type.
    pub messages_failed: Family<FailedLabels, Counter>,
    /// Records the relay's own checks refused (undecodable payloads, implausible times).
    pub validation_errors: Counter,
    /// Successful batch inserts.
    pub batch_inserts: Counter,
    /// Rows in successful batch inserts.
    pub batch_size: Counter,
    /// Rows per successful batch insert, running average (batch_size / batch_inserts).
    pub batch_size_avg: Gauge<f64, AtomicU64>,
    /// Failed insert attempts (each retry counts).
    pub clickhouse_insert_errors: Counter,
    /// MarketPrism's native-protocol inserts: the relay speaks HTTP only, so this stays 0.
    pub clickhouse_tcp_hits: Counter,
    /// MarketPrism's HTTP inserts: every insert attempt of the relay.
    pub clickhouse_http_fallback: Counter,
    /// WAL records not yet inserted for a lane (durable LSN minus the lane's cursor; an upper bound).
    pub batch_queue_size: Family<DataTypeLabels, Gauge>,
    /// Payload bytes a lane holds in its open batch, not yet inserted.
    pub batch_queue_bytes: Family<DataTypeLabels, Gauge>,
    /// failed / (processed + failed), in percent.
    pub error_rate_percent: Gauge<f64, AtomicU64>,
    /// Publish time of the newest message appended to the WAL, unix seconds.
    pub last_message_timestamp_seconds: Gauge<f64, AtomicU64>,
    /// When an insert last failed or a record was last dead-lettered, unix seconds.
    pub last_error_timestamp_seconds: Gauge<f64, AtomicU64>,
    /// CPU used by the process over the last scrape interval, percent of one core.
    pub process_cpu_percent: Gauge<f64, AtomicU64>,
    /// Resident set size of the process now, bytes.
    pub process_rss_bytes: Gauge,
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
    /// WAL bytes on disk over `budget_bytes_max`.
    pub wal_budget_used_ratio: Gauge<f64, AtomicU64>,
    /// Age of the oldest WAL record some lane has not inserted yet (0 when none).
    pub wal_oldest_undrained_age_seconds: Gauge<f64, AtomicU64>,
    /// Latency of the WAL's fdatasync calls, per group commit.
    pub wal_fsync_seconds: Histogram,
    /// Records per WAL group commit.
    pub wal_group_commit_records: Histogram,
    /// A lane's durable cursor (every record of the lane below it is in ClickHouse).
    pub drain_cursor_lsn: Family<LaneLabels, Gauge>,
    /// Publish time (unix seconds) up to which a lane has inserted everything: the drain watermark
    /// a downstream copier (MarketPrism's cold replicator) can wait for after an outage.
    pub drain_watermark_seconds: Family<LaneLabels, Gauge<f64, AtomicU64>>,
    /// Age of the oldest record a lane has not inserted yet; 0 when it is caught up.
    pub drain_lag_seconds: Family<LaneLabels, Gauge<f64, AtomicU64>>,
    /// Seconds since the lane's first failed attempt of the current failure streak; 0 while
    /// inserts succeed.
    pub insert_failing_seconds: Family<LaneLabels, Gauge<f64, AtomicU64>>,
    /// Records per batch a lane inserted.
    pub batch_rows: TableHistograms,
    /// Latency of every insert attempt, successful or failed.
    pub insert_seconds: TableHistograms,
    /// Failed insert attempts by table and error class.
    pub insert_errors: Family<InsertErrorLabels, Counter>,
    /// Insert attempts repeated after a failure.
    pub insert_retries: Family<LaneLabels, Counter>,
    /// Rows inserted again under a new token: the server had answered their retried insert as
    /// a duplicate of one it never stored (see `drain::lane`).
    pub rows_reinserted: Family<LaneLabels, Counter>,
    /// Bytes sent to ClickHouse, compressed (wire) and uncompressed (bodies).
    pub clickhouse_sent_bytes: Family<EncodingLabels, Counter>,
    /// Dead letters by lane and reason class.
    pub dead_letters: Family<DeadLetterLabels, Counter>,
    /// Messages of a consumer's filter never delivered (JetStream's `num_pending`).
    pub jetstream_pending: Family<ConsumerLabels, Gauge>,
    /// Messages delivered and not acknowledged yet.
    pub jetstream_ack_pending: Family<ConsumerLabels, Gauge>,
    /// Messages delivered more than once and not acknowledged yet.
    pub jetstream_redelivered: Family<ConsumerLabels, Gauge>,
    /// Sampled identities the audit confirmed in ClickHouse.
    pub audit_checked: Counter,
    /// Sampled identities the audit did not find in ClickHouse.
    pub audit_missing: Counter,
    /// 1 while the relay is ready (see [`Health::readiness`]), else 0.
    pub ready: Gauge,
    /// 1 once the WAL failed for good (an fsync error): the process must restart and recover.
    pub wal_failed: Gauge,
    /// Rows counted under an `other` label set because the label-set cap was reached.
    pub metrics_label_overflow: Counter,
    /// Build information, always 1.
    pub build_info: Family<BuildLabels, Gauge>,
    /// Liveness of the task loops and readiness of the lanes.
    pub health: Health,
    /// Internal: processed total, for the error rate.
    processed_sum: Arc<AtomicI64>,
    /// Internal: the label sets of `messages_processed` kept as they are (at most
    /// [`PROCESSED_LABEL_SETS_MAX`]).
    processed_label_sets: Arc<Mutex<KeptLabelSets>>,
    /// Internal: the CPU sampler behind `process_cpu_percent`.
    cpu: Arc<Mutex<process::CpuSampler>>,
    /// Internal: the byte totals of the sinks that insert, read into `clickhouse_sent_bytes`.
    wires: Arc<Mutex<Vec<Arc<crate::sink::wire::WireBytes>>>>,
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
            messages_failed: Family::default(),
            validation_errors: Counter::default(),
            batch_inserts: Counter::default(),
            batch_size: Counter::default(),
            batch_size_avg: Gauge::default(),
            clickhouse_insert_errors: Counter::default(),
            clickhouse_tcp_hits: Counter::default(),
            clickhouse_http_fallback: Counter::default(),
            batch_queue_size: Family::default(),
            batch_queue_bytes: Family::default(),
            error_rate_percent: Gauge::default(),
            last_message_timestamp_seconds: Gauge::default(),
            last_error_timestamp_seconds: Gauge::default(),
            process_cpu_percent: Gauge::default(),
            process_rss_bytes: Gauge::default(),
            acks: Counter::default(),
            fetch_batches: Counter::default(),
            ingest_paused: Gauge::default(),
            wal_bytes: Gauge::default(),
            wal_segments: Gauge::default(),
            wal_durable_lsn: Gauge::default(),
            wal_budget_used_ratio: Gauge::default(),
            wal_oldest_undrained_age_seconds: Gauge::default(),
            wal_fsync_seconds: Histogram::new(exponential_buckets(
                FSYNC_BUCKET_START_S,
                2.0,
                FSYNC_BUCKETS,
            )),
            wal_group_commit_records: Histogram::new(exponential_buckets(
                1.0,
                2.0,
                GROUP_RECORDS_BUCKETS,
            )),
            drain_cursor_lsn: Family::default(),
            drain_watermark_seconds: Family::default(),
            drain_lag_seconds: Family::default(),
            insert_failing_seconds: Family::default(),
            batch_rows: Family::new_with_constructor(batch_rows_histogram),
            insert_seconds: Family::new_with_constructor(insert_seconds_histogram),
            insert_errors: Family::default(),
            insert_retries: Family::default(),
            rows_reinserted: Family::default(),
            clickhouse_sent_bytes: Family::default(),
            dead_letters: Family::default(),
            jetstream_pending: Family::default(),
            jetstream_ack_pending: Family::default(),
            jetstream_redelivered: Family::default(),
            audit_checked: Counter::default(),
            audit_missing: Counter::default(),
            ready: Gauge::default(),
            wal_failed: Gauge::default(),
            metrics_label_overflow: Counter::default(),
            build_info: Family::default(),
            health: Health::default(),
            processed_sum: Arc::new(AtomicI64::new(0)),
            processed_label_sets: Arc::new(Mutex::new(KeptLabelSets::default())),
            cpu: Arc::new(Mutex::new(process::CpuSampler::default())),
            wires: Arc::default(),
        };
        // The unlabeled sets exist from the start, so dashboards dividing by them see 0, not
        // nothing, before the first row; so do both byte counts.
        metrics
            .messages_processed
            .get_or_create(&ProcessedLabels::default())
            .inc_by(0);
        metrics
            .messages_failed
            .get_or_create(&FailedLabels::default())
            .inc_by(0);
        for encoding in [Encoding::compressed, Encoding::uncompressed] {
            metrics
                .clickhouse_sent_bytes
                .get_or_create(&EncodingLabels { encoding })
                .inc_by(0);
        }
        metrics
            .build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                wal_format: prism_wal::segment::SEGMENT_VERSION.to_string(),
            })
            .set(1);
        metrics.register(registry);
        metrics
    }

    fn register(&self, registry: &mut Registry) {
        let m = self;
        let storage = "marketprism_storage_";
        let mut reg = |name: String, help: &str, metric: Box<dyn RegisterOne>| {
            metric.register_into(registry, name, help);
        };
        reg(
            format!("{storage}messages_received"),
            "Messages appended to the WAL and covered by an fsync",
            Box::new(m.messages_received.clone()),
        );
        reg(
            format!("{storage}messages_processed"),
            "Rows ClickHouse acknowledged (unlabeled, by data_type, by data_type and exchange, by all three)",
            Box::new(m.messages_processed.clone()),
        );
        reg(
            format!("{storage}messages_failed"),
            "Records sent to the dead-letter table (unlabeled and by data_type)",
            Box::new(m.messages_failed.clone()),
        );
        reg(
            format!("{storage}validation_errors"),
            "Records the relay's checks refused (undecodable, implausible time): dead letters",
            Box::new(m.validation_errors.clone()),
        );
        reg(
            format!("{storage}batch_inserts"),
            "Successful batch inserts",
            Box::new(m.batch_inserts.clone()),
        );
        reg(
            format!("{storage}batch_size"),
            "Rows in successful batch inserts",
            Box::new(m.batch_size.clone()),
        );
        reg(
            format!("{storage}batch_size_avg"),
            "Rows per successful batch insert, running average",
            Box::new(m.batch_size_avg.clone()),
        );
        reg(
            format!("{storage}clickhouse_insert_errors"),
            "Failed ClickHouse insert attempts",
            Box::new(m.clickhouse_insert_errors.clone()),
        );
        reg(
            format!("{storage}clickhouse_tcp_hits"),
            "Inserts over ClickHouse's native protocol: always 0, the relay speaks HTTP only",
            Box::new(m.clickhouse_tcp_hits.clone()),
        );
        reg(
            format!("{storage}clickhouse_http_fallback"),
            "Insert attempts over HTTP (every insert attempt of the relay)",
            Box::new(m.clickhouse_http_fallback.clone()),
        );
        reg(
            format!("{storage}batch_queue_size"),
            "WAL records not yet inserted for a table (upper bound)",
            Box::new(m.batch_queue_size.clone()),
        );
        reg(
            format!("{storage}batch_queue_bytes"),
            "Payload bytes a table's open batch holds, not yet inserted",
            Box::new(m.batch_queue_bytes.clone()),
        );
        reg(
            format!("{storage}error_rate_percent"),
            "Dead-lettered records over all records handled, in percent",
            Box::new(m.error_rate_percent.clone()),
        );
        reg(
            format!("{storage}last_message_timestamp_seconds"),
            "Publish time of the newest message appended to the WAL",
            Box::new(m.last_message_timestamp_seconds.clone()),
        );
        reg(
            format!("{storage}last_error_timestamp_seconds"),
            "When an insert last failed or a record was last dead-lettered, unix seconds",
            Box::new(m.last_error_timestamp_seconds.clone()),
        );
        reg(
            format!("{storage}process_cpu_percent"),
            "CPU used by the relay over the last scrape interval, percent of one core",
            Box::new(m.process_cpu_percent.clone()),
        );
        reg(
            format!("{storage}process_rss_bytes"),
            "Resident set size of the relay now, bytes",
            Box::new(m.process_rss_bytes.clone()),
        );
        let relay = |name: &str| format!("prism_relay_{name}");
        reg(
            relay("build_info"),
            "Build information: version and WAL format; always 1",
            Box::new(m.build_info.clone()),
        );
        reg(
            relay("acks"),
            "JetStream acks sent",
            Box::new(m.acks.clone()),
        );
        reg(
            relay("fetch_batches"),
            "Fetches that returned messages",
            Box::new(m.fetch_batches.clone()),
        );
        reg(
            relay("ingest_paused"),
            "1 while fetching is paused by a full WAL budget or disk",
            Box::new(m.ingest_paused.clone()),
        );
        reg(
            relay("wal_bytes"),
            "WAL bytes on disk",
            Box::new(m.wal_bytes.clone()),
        );
        reg(
            relay("wal_segments"),
            "WAL segment files",
            Box::new(m.wal_segments.clone()),
        );
        reg(
            relay("wal_durable_lsn"),
            "Last WAL record covered by an fsync",
            Box::new(m.wal_durable_lsn.clone()),
        );
        reg(
            relay("wal_budget_used_ratio"),
            "WAL bytes on disk over the WAL budget (budget_bytes_max), 0 to 1",
            Box::new(m.wal_budget_used_ratio.clone()),
        );
        reg(
            relay("wal_oldest_undrained_age_seconds"),
            "Age by publish time of the oldest WAL record some table has not inserted; 0 when none",
            Box::new(m.wal_oldest_undrained_age_seconds.clone()),
        );
        reg(
            relay("wal_fsync_seconds"),
            "Time the WAL's fdatasync calls took per group commit",
            Box::new(m.wal_fsync_seconds.clone()),
        );
        reg(
            relay("wal_group_commit_records"),
            "Records per WAL group commit",
            Box::new(m.wal_group_commit_records.clone()),
        );
        reg(
            relay("drain_cursor_lsn"),
            "Per-table durable cursor",
            Box::new(m.drain_cursor_lsn.clone()),
        );
        reg(
            relay("drain_watermark_seconds"),
            "Publish time up to which a table has every record inserted",
            Box::new(m.drain_watermark_seconds.clone()),
        );
        reg(
            relay("drain_lag_seconds"),
            "Age by publish time of the oldest record a table has not inserted; 0 when caught up",
            Box::new(m.drain_lag_seconds.clone()),
        );
        reg(
            relay("insert_failing_seconds"),
            "Seconds since a table's current streak of failed inserts began; 0 while inserts succeed",
            Box::new(m.insert_failing_seconds.clone()),
        );
        reg(
            relay("batch_rows"),
            "Records per batch a table inserted",
            Box::new(m.batch_rows.clone()),
        );
        reg(
            relay("insert_seconds"),
            "Time of each insert attempt (successful or failed) per table",
            Box::new(m.insert_seconds.clone()),
        );
        reg(
            relay("insert_errors"),
            "Failed insert attempts by table and error class",
            Box::new(m.insert_errors.clone()),
        );
        reg(
            relay("insert_retries"),
            "Insert attempts repeated after a failure, per table",
            Box::new(m.insert_retries.clone()),
        );
        reg(
            relay("rows_reinserted"),
            "Rows inserted again under a new token after ClickHouse answered their retried insert \
             as a duplicate without holding them, per table",
            Box::new(m.rows_reinserted.clone()),
        );
        reg(
            relay("clickhouse_sent_bytes"),
            "Bytes sent to ClickHouse: compressed (on the wire) and uncompressed (request bodies)",
            Box::new(m.clickhouse_sent_bytes.clone()),
        );
        reg(
            relay("dead_letters"),
            "Dead letters by table and reason class",
            Box::new(m.dead_letters.clone()),
        );
        reg(
            relay("jetstream_pending"),
            "Messages of a consumer never delivered yet (consumer info num_pending)",
            Box::new(m.jetstream_pending.clone()),
        );
        reg(
            relay("jetstream_ack_pending"),
            "Messages delivered to a consumer and not acknowledged yet",
            Box::new(m.jetstream_ack_pending.clone()),
        );
        reg(
            relay("jetstream_redelivered"),
            "Messages delivered to a consumer more than once and not acknowledged yet",
            Box::new(m.jetstream_redelivered.clone()),
        );
        reg(
            relay("audit_checked"),
            "Sampled message identities the audit confirmed in ClickHouse",
            Box::new(m.audit_checked.clone()),
        );
        reg(
            relay("audit_missing"),
            "Sampled message identities the audit did not find in ClickHouse",
            Box::new(m.audit_missing.clone()),
        );
        reg(
            relay("ready"),
            "1 while the relay is ready (/ready answers 200)",
            Box::new(m.ready.clone()),
        );
        reg(
            relay("metrics_label_overflow"),
            "Rows counted under an other label set because the label-set cap was reached",
            Box::new(m.metrics_label_overflow.clone()),
        );
        reg(
            relay("wal_failed"),
            "1 once the WAL failed for good (restart to recover)",
            Box::new(m.wal_failed.clone()),
        );
    }

    /// Records rows ClickHouse acknowledged, in each of MarketPrism's four label sets.
    pub fn processed(&self, labels: &RowLabels, rows: u64) {
        let counted = match self.bounded_labels(labels) {
            None => ProcessedLabels::all_of(labels),
            Some(overflow) => {
                self.metrics_label_overflow.inc_by(rows);
                ProcessedLabels::all_of(&overflow)
            }
        };
        for set in &counted {
            self.messages_processed.get_or_create(set).inc_by(rows);
        }
        self.processed_sum
            .fetch_add(rows as i64, std::sync::atomic::Ordering::Relaxed);
        self.update_error_rate();
    }

    /// Records one successful batch insert of `rows` rows.
    pub fn batch_inserted(&self, rows: u64) {
        self.batch_inserts.inc();
        self.batch_size.inc_by(rows);
        let inserts = self.batch_inserts.get().max(1) as f64;
        self.batch_size_avg
            .set(self.batch_size.get() as f64 / inserts);
    }

    /// Records `records` dead letters of `lane` with `data_type` and `reason`.
    pub fn dead_lettered(&self, lane: &str, data_type: &str, reason: DeadReason, records: u64) {
        if records == 0 {
            return;
        }
        self.messages_failed
            .get_or_create(&FailedLabels::default())
            .inc_by(records);
        self.messages_failed
            .get_or_create(&FailedLabels {
                data_type: Some(data_type.to_owned()),
            })
            .inc_by(records);
        self.dead_letters
            .get_or_create(&DeadLetterLabels {
                table: lane.to_owned(),
                reason,
            })
            .inc_by(records);
        if reason.is_validation() {
            self.validation_errors.inc_by(records);
        }
        self.error_happened();
        self.update_error_rate();
    }

    /// Records one insert attempt into `table` that took `elapsed`, and its error if it failed.
    pub fn insert_attempt(&self, table: &str, elapsed: Duration, error_class: Option<&str>) {
        let lane = LaneLabels {
            table: table.to_owned(),
        };
        self.clickhouse_http_fallback.inc();
        self.insert_seconds
            .get_or_create(&lane)
            .observe(elapsed.as_secs_f64());
        if let Some(class) = error_class {
            self.clickhouse_insert_errors.inc();
            self.insert_errors
                .get_or_create(&InsertErrorLabels {
                    table: table.to_owned(),
                    class: class.to_owned(),
                })
                .inc();
            self.error_happened();
        }
    }

    /// Counts the bytes `wire` (a sink's totals) sends from now on in `clickhouse_sent_bytes`.
    pub fn count_sent_bytes(&self, wire: Arc<crate::sink::wire::WireBytes>) {
        self.wires
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wire);
    }

    /// Copies the sinks' byte totals into `clickhouse_sent_bytes` (totals only grow, so the
    /// counters stay monotonic).
    fn refresh_sent_bytes(&self) {
        let wires = self.wires.lock().unwrap_or_else(|p| p.into_inner());
        let compressed: u64 = wires.iter().map(|w| w.compressed()).sum();
        let uncompressed: u64 = wires.iter().map(|w| w.uncompressed()).sum();
        for (encoding, total) in [
            (Encoding::compressed, compressed),
            (Encoding::uncompressed, uncompressed),
        ] {
            self.clickhouse_sent_bytes
                .get_or_create(&EncodingLabels { encoding })
                .inner()
                .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Sets `last_error_timestamp_seconds` to now.
    fn error_happened(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_error_timestamp_seconds.set(now);
    }

    /// Brings the gauges computed at scrape time up to date: the WAL's figures from `wal`, the
    /// lanes' lag and failing streaks, readiness, and the process's CPU and memory.
    pub fn refresh(&self, wal: &WalStats, budget_bytes_max: u64) {
        self.wal_bytes.set(wal.bytes_on_disk as i64);
        self.wal_segments.set(wal.segments as i64);
        self.wal_durable_lsn.set(wal.durable_lsn.0 as i64);
        self.wal_budget_used_ratio
            .set(wal.bytes_on_disk as f64 / budget_bytes_max.max(1) as f64);
        let now_ns = health::unix_now_ns();
        let mut oldest_s: f64 = 0.0;
        for lane in self.health.lanes() {
            let labels = LaneLabels {
                table: lane.table.clone(),
            };
            let lag_s = lane
                .oldest_pending_ns
                .map_or(0.0, |ns| (now_ns.saturating_sub(ns)).max(0) as f64 / 1e9);
            oldest_s = oldest_s.max(lag_s);
            self.drain_lag_seconds.get_or_create(&labels).set(lag_s);
            self.insert_failing_seconds
                .get_or_create(&labels)
                .set(lane.failing_for.map_or(0.0, |d| d.as_secs_f64()));
        }
        self.wal_oldest_undrained_age_seconds.set(oldest_s);
        self.refresh_sent_bytes();
        self.ready.set(i64::from(
            self.health.readiness(self.wal_failed.get() == 1).is_ok(),
        ));
        if let Some(rss) = process::rss_bytes() {
            self.process_rss_bytes.set(rss as i64);
        }
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(percent) = cpu.sample() {
            self.process_cpu_percent.set(percent);
        }
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
        let failed = self
            .messages_failed
            .get_or_create(&FailedLabels::default())
            .get() as f64;
        let total = processed + failed;
        let rate = if total > 0.0 {
            100.0 * failed / total
        } else {
            0.0
        };
        self.error_rate_percent.set(rate);
    }
}

/// Feeds the WAL's group commits into the fsync and group-size histograms.
impl CommitObserver for Metrics {
    fn group_committed(&self, records: u64, _bytes: u64, fsync: Duration) {
        self.wal_fsync_seconds.observe(fsync.as_secs_f64());
        self.wal_group_commit_records.observe(records as f64);
    }
}

/// A metric of any kind, registered under a name: lets [`Metrics::register`] list every metric
/// in one table-like sequence.
trait RegisterOne {
    fn register_into(self: Box<Self>, registry: &mut Registry, name: String, help: &str);
}

impl<M: prometheus_client::registry::Metric> RegisterOne for M {
    fn register_into(self: Box<Self>, registry: &mut Registry, name: String, help: &str) {
        registry.register(name, help, *self);
    }
}

/// Renders the registry in the Prometheus text format 0.0.4.
///
/// The encoder writes OpenMetrics, whose counters carry `HELP`/`TYPE` under the name without
/// `_total` and end with `# EOF`; the 0.0.4 parsers (Prometheus's, `promtool check metrics`)
/// read a `_total` sample under such a `TYPE` as a second, untyped family. So the counters'
/// `HELP` and `TYPE` lines are renamed to the `_total` name their samples carry and `# EOF` is
/// left out: one `HELP` and one `TYPE` per name, as every 0.0.4 reader expects.
pub fn render(registry: &Registry) -> String {
    let mut open = String::new();
    // Writing into a String cannot fail; the encoder only propagates fmt::Write errors.
    let _ = prometheus_client::encoding::text::encode(&mut open, registry);
    to_text_format(&open)
}

/// The content type of [`render`]'s output.
pub const TEXT_FORMAT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text from the encoder, as Prometheus text 0.0.4 (see [`render`]).
fn to_text_format(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut held_help: Option<&str> = None;
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // The TYPE line follows and says whether the name needs `_total`.
            if let Some(help) = held_help.replace(line) {
                out.push_str(help);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" && !name.ends_with("_total") {
                "_total"
            } else {
                ""
            };
            if let Some(help) = held_help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.strip_prefix(name))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {name}{suffix}{text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if let Some(help) = held_help.take() {
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(help) = held_help {
        out.push_str(help);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
