//! The `*_MIN`/`*_MAX` bounds of every configuration field, and the compile-time checks of the
//! relations between them.
//!
//! They are kept apart from the model so that each bound reads next to the reason for it, and so
//! that validation, `relay.example.toml` and its test have one place to take them from. The size
//! units (`KIB` .. `TIB`) live here because the bounds are written in them; the model's defaults
//! use them too.

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;
pub(super) const TIB: u64 = 1024 * GIB;

// ---- [nats] bounds ----
/// A TCP connect plus TLS handshake on a LAN takes milliseconds; below this is a typo.
pub const NATS_CONNECT_TIMEOUT_MS_MIN: u64 = 100;
/// Beyond five minutes a start-up looks hung to an operator.
pub const NATS_CONNECT_TIMEOUT_MS_MAX: u64 = 300_000;
/// JetStream API requests (stream/consumer info) answer in milliseconds.
pub const NATS_REQUEST_TIMEOUT_MS_MIN: u64 = 100;
/// Beyond five minutes a stuck request should surface as an error.
pub const NATS_REQUEST_TIMEOUT_MS_MAX: u64 = 300_000;

// ---- [[stream]] bounds ----
/// 0 means unlimited age; a positive age below a minute would expire messages during a restart.
pub const STREAM_MAX_AGE_S_MIN: u64 = 60;
/// Ten years: longer is certainly a unit mistake (ms given as s).
pub const STREAM_MAX_AGE_S_MAX: u64 = 10 * 365 * 86_400;
/// -1 means unlimited; a stream smaller than 1 MiB cannot hold one order book burst.
pub const STREAM_MAX_BYTES_MIN: i64 = MIB as i64;
/// 1 PiB: past any single server.
pub const STREAM_MAX_BYTES_MAX: i64 = (1024 * TIB) as i64;
/// -1 means unlimited; otherwise at least one message.
pub const STREAM_MAX_MSGS_MIN: i64 = 1;
/// 10^12 messages.
pub const STREAM_MAX_MSGS_MAX: i64 = 1_000_000_000_000;
/// 0 disables publish deduplication; the server caps the window by max_age.
pub const STREAM_DUPLICATE_WINDOW_S_MIN: u64 = 0;
/// One day: deduplication state is held in server memory for the whole window.
pub const STREAM_DUPLICATE_WINDOW_S_MAX: u64 = 86_400;
/// JetStream replicas are 1, 3 or 5 in practice; the server allows 1..=5.
pub const STREAM_REPLICAS_MIN: u32 = 1;
/// The server's limit.
pub const STREAM_REPLICAS_MAX: u32 = 5;

// ---- [[consumer]] bounds ----
/// Below one second an fsync stall under load would trigger redeliveries.
pub const CONSUMER_ACK_WAIT_MS_MIN: u64 = 1_000;
/// One hour: past this a crashed relay's messages wait too long for redelivery.
pub const CONSUMER_ACK_WAIT_MS_MAX: u64 = 3_600_000;
/// At least one message must be allowed in flight.
pub const CONSUMER_MAX_ACK_PENDING_MIN: i64 = 1;
/// Bounds the messages one consumer holds in flight (and in relay memory).
pub const CONSUMER_MAX_ACK_PENDING_MAX: i64 = 1_000_000;
/// A finite max_deliver below this drops messages for good after a few failed attempts
/// (the service the relay replaces lost data with max_deliver 3); -1 (unlimited) is the default.
pub const CONSUMER_MAX_DELIVER_MIN: i64 = 10;
/// Upper bound of a finite max_deliver.
pub const CONSUMER_MAX_DELIVER_MAX: i64 = 1_000_000;
/// One message per pull at least.
pub const CONSUMER_FETCH_BATCH_MIN: u32 = 1;
/// Bounds relay memory per pull (messages are held until their WAL fsync).
pub const CONSUMER_FETCH_BATCH_MAX: u32 = 10_000;
/// NATS's default max_payload is 1 MiB. JetStream answers a pull whose next message is larger
/// than the pull's byte limit with an error and does not deliver it, so a smaller limit could
/// stall the consumer for good.
pub const CONSUMER_FETCH_BYTES_MAX_MIN: u64 = MIB;
/// Bounds relay memory per pull.
pub const CONSUMER_FETCH_BYTES_MAX_MAX: u64 = 256 * MIB;
/// A pull shorter than this spends more time on round trips than waiting for data.
pub const CONSUMER_FETCH_EXPIRES_MS_MIN: u64 = 100;
/// An idle pull must come back soon enough for shutdown and health checks to stay prompt.
pub const CONSUMER_FETCH_EXPIRES_MS_MAX: u64 = 60_000;
/// A linger adds to the time a message waits for its WAL append and ack; past a second it
/// would hold messages longer than the drain's own flush interval does.
pub const CONSUMER_FETCH_LINGER_MS_MAX: u64 = 1_000;

// ---- [wal] bounds ----
/// Small segments are allowed so that tests and tiny edge disks can exercise rollover.
pub const WAL_SEGMENT_BYTES_MAX_MIN: u64 = 64 * KIB;
/// Larger segments make retention too coarse.
pub const WAL_SEGMENT_BYTES_MAX_MAX: u64 = 4 * GIB;
/// One fsync group holds at least one typical record.
pub const WAL_GROUP_BYTES_MAX_MIN: u64 = 4 * KIB;
/// A larger group only delays the acks of its first records.
pub const WAL_GROUP_BYTES_MAX_MAX: u64 = 256 * MIB;
/// The budget must hold a few segments (checked against segment_bytes_max too).
pub const WAL_BUDGET_BYTES_MAX_MIN: u64 = MIB;
/// 64 TiB: past any local disk.
pub const WAL_BUDGET_BYTES_MAX_MAX: u64 = 64 * TIB;
/// The budget must hold at least this many segments, so that rollover never waits on itself.
pub const WAL_BUDGET_SEGMENTS_MIN: u64 = 2;
/// Retention of released segments kept for replay; at most the budget (checked separately).
pub const WAL_RETENTION_BYTES_MAX_MAX: u64 = 64 * TIB;
/// Upper bound of released segments kept for replay.
pub const WAL_RETENTION_SEGMENTS_MAX_MAX: u32 = 1_000_000;
/// One year of replay history at most.
pub const WAL_RETENTION_AGE_S_MAX: u64 = 365 * 86_400;

// ---- [clickhouse] bounds ----
/// An insert of a full batch takes at least this long over a slow link.
pub const CLICKHOUSE_INSERT_TIMEOUT_MS_MIN: u64 = 1_000;
/// Beyond ten minutes a stuck insert should be retried.
pub const CLICKHOUSE_INSERT_TIMEOUT_MS_MAX: u64 = 600_000;
/// Same reasoning as the NATS connect timeout.
pub const CLICKHOUSE_CONNECT_TIMEOUT_MS_MIN: u64 = 100;
/// Beyond a minute a connect attempt should be retried.
pub const CLICKHOUSE_CONNECT_TIMEOUT_MS_MAX: u64 = 60_000;
/// A TTL shorter than a day would delete rows before the cold replicator copies them.
pub const CLICKHOUSE_TTL_DAYS_MIN: u32 = 1;
/// Ten years.
pub const CLICKHOUSE_TTL_DAYS_MAX: u32 = 3_650;
/// The longest `[clickhouse] cluster` name, in characters: the same bound as a database name,
/// far above any name an operator writes into `<remote_servers>`.
pub const CLICKHOUSE_CLUSTER_NAME_CHARS_MAX: usize = 128;

// ---- [drain] bounds ----
/// Flushing more often than this only multiplies ClickHouse parts.
pub const DRAIN_FLUSH_INTERVAL_MS_MIN: u64 = 10;
/// Ten minutes: rows older than this are late for dashboards and the cold replicator.
pub const DRAIN_FLUSH_INTERVAL_MS_MAX: u64 = 600_000;
/// The first retry after a failed insert waits at least this long.
pub const DRAIN_RETRY_BACKOFF_MS_MIN: u64 = 10;
/// A ClickHouse that comes back is noticed within this bound.
pub const DRAIN_RETRY_BACKOFF_MS_MAX: u64 = 3_600_000;
/// Latest `drain.timestamp_min_ms`: 2100-01-01T00:00:00Z in epoch milliseconds (a later minimum
/// would refuse every row of this century).
pub const DRAIN_TIMESTAMP_MIN_MS_MAX: u64 = 4_102_444_800_000;
/// Shortest `drain.timestamp_future_max_ms`: one minute, so collectors' clock drift of seconds
/// never dead-letters good rows.
pub const DRAIN_TIMESTAMP_FUTURE_MAX_MS_MIN: u64 = 60_000;
/// Longest `drain.timestamp_future_max_ms`: 366 days; rows further ahead than that cannot be
/// market data, and a year bounds the partitions one batch can touch.
pub const DRAIN_TIMESTAMP_FUTURE_MAX_MS_MAX: u64 = 366 * 86_400_000;
/// One row per insert at least.
pub const DRAIN_TABLE_ROWS_MAX_MIN: u32 = 1;
/// ClickHouse's own default max_insert_block_size is about a million rows.
pub const DRAIN_TABLE_ROWS_MAX_MAX: u32 = 1_000_000;
/// One order book row (100 levels each side) is about 10 KiB.
pub const DRAIN_TABLE_BYTES_MAX_MIN: u64 = 64 * KIB;
/// Bounds drain memory per table.
pub const DRAIN_TABLE_BYTES_MAX_MAX: u64 = GIB;

// ---- [metrics] bounds ----
/// One connection at least, for the scraper.
pub const METRICS_CONNECTIONS_MAX_MIN: u32 = 1;
/// Each connection holds a file descriptor the WAL and ClickHouse need too; a relay often runs
/// with a limit of 1024.
pub const METRICS_CONNECTIONS_MAX_MAX: u32 = 1_024;
/// Request headers of a scraper on a LAN arrive within milliseconds.
pub const METRICS_HEADER_READ_TIMEOUT_MS_MIN: u64 = 100;
/// Beyond a minute an idle connection holds its slot too long.
pub const METRICS_HEADER_READ_TIMEOUT_MS_MAX: u64 = 60_000;
/// Rendering and sending the page takes milliseconds; a second leaves room for a slow link.
pub const METRICS_REQUEST_TIMEOUT_MS_MIN: u64 = 1_000;
/// Prometheus gives up on a scrape after its scrape_timeout (10 s by default) anyway.
pub const METRICS_REQUEST_TIMEOUT_MS_MAX: u64 = 300_000;
/// A lane's inserts must fail at least this long before `/ready` fails: one retry delay, so a
/// single lost connection does not flap readiness.
pub const METRICS_READY_INSERT_FAILING_S_MIN: u64 = 1;
/// A day: past it a relay that cannot insert would look ready through a whole outage.
pub const METRICS_READY_INSERT_FAILING_S_MAX: u64 = 86_400;
/// Consumer info is one small JetStream API request; more often than every second would add
/// load for a gauge Prometheus reads every 15 s or so.
pub const METRICS_BACKLOG_POLL_INTERVAL_S_MIN: u64 = 1;
/// An hour: slower, and the backlog gauges would not serve as an alert or a scaling signal.
pub const METRICS_BACKLOG_POLL_INTERVAL_S_MAX: u64 = 3_600;

/// A status line a day at the least; beyond that nobody reads it as a heartbeat (0 = off).
pub const METRICS_STATUS_INTERVAL_S_MAX: u64 = 86_400;

// ---- [shutdown] bounds ----
/// Stopping fetches, an fsync and a flush need at least this long.
pub const SHUTDOWN_TIMEOUT_MS_MIN: u64 = 1_000;
/// Orchestrators kill a pod after their own grace period (30 s on Kubernetes by default).
pub const SHUTDOWN_TIMEOUT_MS_MAX: u64 = 300_000;

// Relations between bounds, checked at compile time so that no value within every bound can
// violate a relation that validation checks between fields.
const _: () = {
    // Every allowed fetch_batch fits under some allowed max_ack_pending.
    assert!(CONSUMER_FETCH_BATCH_MAX as i64 <= CONSUMER_MAX_ACK_PENDING_MAX);
    // A pull can always expire before its messages' ack wait.
    assert!(CONSUMER_FETCH_EXPIRES_MS_MIN < CONSUMER_ACK_WAIT_MS_MIN);
    // The smallest segment can hold the smallest group commit.
    assert!(WAL_GROUP_BYTES_MAX_MIN <= WAL_SEGMENT_BYTES_MAX_MIN);
    // The largest budget holds the largest segments.
    assert!(WAL_SEGMENT_BYTES_MAX_MAX * WAL_BUDGET_SEGMENTS_MIN <= WAL_BUDGET_BYTES_MAX_MAX);
    // A pull's byte limit can hold the largest NATS payload the server allows by default (1 MiB).
    assert!(CONSUMER_FETCH_BYTES_MAX_MIN >= MIB);
    assert!(DRAIN_RETRY_BACKOFF_MS_MIN <= DRAIN_RETRY_BACKOFF_MS_MAX);
    assert!(DRAIN_TIMESTAMP_FUTURE_MAX_MS_MIN <= DRAIN_TIMESTAMP_FUTURE_MAX_MS_MAX);
    assert!(crate::codec::TIMESTAMP_MIN_MS_DEFAULT as u64 <= DRAIN_TIMESTAMP_MIN_MS_MAX);
    assert!(DRAIN_TIMESTAMP_MIN_MS_MAX <= i64::MAX as u64);
    assert!(DRAIN_TIMESTAMP_FUTURE_MAX_MS_MAX <= i64::MAX as u64);
    // Some allowed request timeout is at least every allowed header-read timeout.
    assert!(METRICS_HEADER_READ_TIMEOUT_MS_MAX <= METRICS_REQUEST_TIMEOUT_MS_MAX);
};

// ---- [audit] bounds ----
/// Every record sampled (1) is allowed for tests and small nodes; it doubles the decode work.
pub const AUDIT_SAMPLE_EVERY_RECORDS_MIN: u64 = 1;
/// One in ten million: rarer than that the audit says nothing for hours at MarketPrism's rates.
pub const AUDIT_SAMPLE_EVERY_RECORDS_MAX: u64 = 10_000_000;
/// A round more often than every 100 ms would make the audit the busiest ClickHouse client.
pub const AUDIT_INTERVAL_MS_MIN: u64 = 100;
/// One hour: rarer rounds leave a loss unseen for too long.
pub const AUDIT_INTERVAL_MS_MAX: u64 = 3_600_000;
/// At least one sample must fit.
pub const AUDIT_PENDING_MAX_MIN: u64 = 1;
/// A million samples take about 200 MB: the bound on the audit's memory.
pub const AUDIT_PENDING_MAX_MAX: u64 = 1_000_000;
