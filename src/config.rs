//! The relay's configuration: one TOML file, environment overrides, and validation.
//!
//! Loading happens in three steps, each of which can only narrow what the next one sees:
//!
//! 1. [`Config::load`] parses the TOML file (or starts from [`Config::default`] when no file is
//!    given). Every field has a default, and unknown fields are rejected by name, so a typo
//!    (`fetch_bach = 10`) fails loudly instead of silently keeping the default.
//! 2. Environment variables `PRISM_RELAY_<SECTION>_<FIELD>` override scalar fields of the
//!    non-array sections (`[nats]`, `[wal]`, `[clickhouse]`, `[drain]`, `[metrics]`,
//!    `[shutdown]`), for example `PRISM_RELAY_NATS_URL`, `PRISM_RELAY_CLICKHOUSE_URL`,
//!    `PRISM_RELAY_WAL_DIR`. An empty value clears an optional field. Arrays and maps
//!    (`[[stream]]`, `[[consumer]]`, `[drain.tables.*]`, `[[drain.passthrough]]`) are
//!    config-file only: an environment variable cannot describe them unambiguously.
//!    A variable naming a known section but an unknown field is an error; variables of other
//!    shapes (`PRISM_RELAY_CONFIG`, for the binary's flags) are left alone.
//! 3. [`Config::validate`] checks every bound. An invalid value is reported with its field path
//!    (`consumer[1].fetch_batch`), the value, the allowed range with its unit, and the fix.
//!    All problems are reported at once, not one per start-up attempt.
//!
//! The bounds are the `*_MIN`/`*_MAX` constants below; `relay.example.toml` at the repository
//! root lists every field with its default, unit and bounds, and a unit test keeps it equal to
//! the code.
//!
//! This module only holds values: `source` maps `[nats]`, `[[stream]]` and `[[consumer]]` onto
//! JetStream, and the relay maps `[wal]` onto the WAL crate's options.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::drain::UNROUTED_LANE;
use crate::redact::{self, redact, REDACTED};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "PRISM_RELAY_";

/// The eight MarketPrism tables the relay has typed codecs for, in subject order.
pub const TYPED_TABLES: [&str; 8] = [
    "trades",
    "orderbooks",
    "funding_rates",
    "open_interests",
    "liquidations",
    "lsr_top_positions",
    "lsr_all_accounts",
    "volatility_indices",
];

/// The first subject token (data type) of each of [`TYPED_TABLES`], same order.
pub const TYPED_DATA_TYPES: [&str; 8] = [
    "trade",
    "orderbook",
    "funding_rate",
    "open_interest",
    "liquidation",
    "lsr_top_position",
    "lsr_all_account",
    "volatility_index",
];

/// MarketPrism's start-up script deletes a stream of this name, so the relay refuses to own one.
pub const RESERVED_STREAM_NAME: &str = "ORDERBOOK_SNAP";

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

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

/// The whole relay configuration. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// Streams to create when missing (never altered). Empty by default: creating a stream makes
    /// the server store data, which is an operator's decision.
    pub stream: Vec<StreamConfig>,
    /// Durable pull consumers to read from; each feeds the WAL independently.
    pub consumer: Vec<ConsumerConfig>,
    /// The local write-ahead log.
    pub wal: WalConfig,
    /// Where rows go.
    pub clickhouse: ClickHouseConfig,
    /// How WAL records are batched into ClickHouse.
    pub drain: DrainConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: NatsConfig::default(),
            stream: Vec::new(),
            consumer: vec![ConsumerConfig::default()],
            wal: WalConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            drain: DrainConfig::default(),
            metrics: MetricsConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

/// `[nats]`: connection to the NATS server (or cluster).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://a:4222,nats://b:4222`).
    pub url: String,
    /// Connection name shown by the server's monitoring (`/connz`).
    pub name: String,
    /// Timeout of one connect attempt, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Timeout of a JetStream API request (stream and consumer info, create), in milliseconds.
    pub request_timeout_ms: u64,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`. Prefer `password_file` or `PRISM_RELAY_NATS_PASSWORD`.
    pub password: Option<String>,
    /// File holding the password (its content, without a trailing newline), with `user`.
    pub password_file: Option<PathBuf>,
    /// Token authentication (exclusive with user/password and creds_file). Prefer `token_file`
    /// or `PRISM_RELAY_NATS_TOKEN`.
    pub token: Option<String>,
    /// File holding the token (exclusive with `token`).
    pub token_file: Option<PathBuf>,
    /// Path of a `.creds` file (JWT + NKey seed; exclusive with the other methods).
    pub creds_file: Option<PathBuf>,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of logs and error messages: see crate::redact.
        f.debug_struct("NatsConfig")
            .field("url", &redact(&self.url))
            .field("name", &self.name)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("password_file", &self.password_file)
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .field("token_file", &self.token_file)
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            name: "prism-relay".to_owned(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            creds_file: None,
        }
    }
}

/// JetStream storage backend of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// Survives server restarts; what MarketPrism uses.
    File,
    /// Lost on server restart.
    Memory,
}

/// `[[stream]]`: a JetStream stream the relay creates when missing and never alters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Stream name (required).
    pub name: String,
    /// Subjects the stream captures (required, at least one), e.g. `trade.>`.
    pub subjects: Vec<String>,
    /// `file` (default) or `memory`.
    pub storage: StorageKind,
    /// Messages older than this are discarded, in seconds; 0 = unlimited. Default 48 h.
    pub max_age_s: u64,
    /// Total size limit, in bytes; -1 = unlimited. Default 2 GiB.
    pub max_bytes: i64,
    /// Message count limit; -1 = unlimited. Default 5,000,000.
    pub max_msgs: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped, in seconds. Default 120.
    pub duplicate_window_s: u64,
    /// Number of replicas in a cluster. Default 1.
    pub replicas: u32,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: String::new(),
            subjects: Vec::new(),
            storage: StorageKind::File,
            max_age_s: 172_800,
            max_bytes: 2 * GIB as i64,
            max_msgs: 5_000_000,
            duplicate_window_s: 120,
            replicas: 1,
        }
    }
}

/// Where a new durable consumer starts. Only used when the consumer is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverPolicyKind {
    /// Every message the stream still holds (default: nothing already stored is skipped).
    All,
    /// Only messages published after the consumer is created.
    New,
    /// The last message of the stream, then everything after it.
    Last,
    /// From `start_sequence` on.
    ByStartSequence,
}

/// How the relay acknowledges messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicyKind {
    /// Each message is acked on its own (default). Safe when several relay instances share
    /// one durable consumer.
    Explicit,
    /// One ack covers every earlier message of the consumer. Only for a consumer that a single
    /// relay instance owns: with two instances on one durable, one instance's ack would
    /// acknowledge messages the other has not made durable yet.
    All,
}

/// `[[consumer]]`: a durable pull consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Stream to consume from. Default `MARKET_DATA` (MarketPrism's JetStream stream).
    pub stream: String,
    /// Durable name. Default `prism-relay`.
    pub durable: String,
    /// Subjects to receive; empty = every subject of the stream (default). Several consumers on
    /// one stream with disjoint filters shard the work.
    pub filter_subjects: Vec<String>,
    /// Where a new consumer starts: all (default), new, last, by_start_sequence.
    pub deliver_policy: DeliverPolicyKind,
    /// First stream sequence for `deliver_policy = "by_start_sequence"` (required there only).
    pub start_sequence: Option<u64>,
    /// explicit (default) or all; see [`AckPolicyKind::All`] before using `all`.
    pub ack_policy: AckPolicyKind,
    /// Unacked messages are redelivered after this, in milliseconds. Default 30,000.
    pub ack_wait_ms: u64,
    /// Messages delivered but not acked, at most; fetching pauses beyond it. Default 20,000.
    pub max_ack_pending: i64,
    /// Delivery attempts per message; -1 = unlimited (default). A finite value drops a message
    /// for good after that many unacknowledged deliveries.
    pub max_deliver: i64,
    /// Messages per pull, at most. Default 1,000.
    pub fetch_batch: u32,
    /// Bytes per pull, at most (a message larger than this is fetched alone). Default 16 MiB.
    pub fetch_bytes_max: u64,
    /// How long one pull waits for messages, in milliseconds; an idle stream returns an empty
    /// batch after this. Default 1,000.
    pub fetch_expires_ms: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            stream: "MARKET_DATA".to_owned(),
            durable: "prism-relay".to_owned(),
            filter_subjects: Vec::new(),
            deliver_policy: DeliverPolicyKind::All,
            start_sequence: None,
            ack_policy: AckPolicyKind::Explicit,
            ack_wait_ms: 30_000,
            max_ack_pending: 20_000,
            max_deliver: -1,
            fetch_batch: 1_000,
            fetch_bytes_max: 16 * MIB,
            fetch_expires_ms: 1_000,
        }
    }
}

/// How the WAL treats a damaged tail at recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryModeKind {
    /// A torn tail of the last segment (a crash mid-write) is truncated (default).
    TruncateTornTail,
    /// Any damage, a torn tail included, stops the relay for an operator to look at.
    Strict,
}

/// `[wal]`: the local write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Directory of the segments and the ledger; one per relay instance.
    pub dir: PathBuf,
    /// A segment rolls over past this, in bytes. Default 64 MiB.
    pub segment_bytes_max: u64,
    /// One write + fdatasync covers at most this, in bytes. Default 4 MiB.
    pub group_bytes_max: u64,
    /// Total WAL size on disk; fetching pauses above it, in bytes. Default 4 GiB.
    pub budget_bytes_max: u64,
    /// Released (fully drained) segments kept for replay, in bytes. Default 1 GiB.
    pub retention_bytes_max: u64,
    /// Released segments kept for replay, in segments. Default 16.
    pub retention_segments_max: u32,
    /// Released segments older than this are deleted, in seconds. Default 86,400 (one day).
    pub retention_age_s: u64,
    /// truncate_torn_tail (default) or strict.
    pub recovery_mode: RecoveryModeKind,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            dir: PathBuf::from("./data/wal"),
            segment_bytes_max: 64 * MIB,
            group_bytes_max: 4 * MIB,
            budget_bytes_max: 4 * GIB,
            retention_bytes_max: GIB,
            retention_segments_max: 16,
            retention_age_s: 86_400,
            recovery_mode: RecoveryModeKind::TruncateTornTail,
        }
    }
}

/// Which DDL and column types the relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClickHouseProfile {
    /// ClickHouse 23.8 and newer: DateTime64, LowCardinality, codecs, deduplication tokens.
    Modern,
    /// ClickHouse 18.16: Int64 milliseconds, String, no codecs, no TTL.
    Legacy,
    /// Chosen at start-up from `SELECT version()` (default).
    Auto,
}

/// `[clickhouse]`: the destination.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint.
    pub url: String,
    /// User name.
    pub user: String,
    /// Password (empty for none). Prefer `password_file` or `PRISM_RELAY_CLICKHOUSE_PASSWORD`.
    pub password: String,
    /// File holding the password (its content, without a trailing newline; exclusive with
    /// `password`).
    pub password_file: Option<PathBuf>,
    /// Database of the tables.
    pub database: String,
    /// modern, legacy or auto (default).
    pub profile: ClickHouseProfile,
    /// One insert request, in milliseconds. Default 30,000.
    pub insert_timeout_ms: u64,
    /// One connect attempt, in milliseconds. Default 5,000.
    pub connect_timeout_ms: u64,
    /// Apply the DDL (CREATE ... IF NOT EXISTS) at start-up. Default false.
    pub create_schema: bool,
    /// Row TTL of created tables, in days; none by default. Modern profile only.
    pub ttl_days: Option<u32>,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".to_owned(),
            user: "default".to_owned(),
            password: String::new(),
            password_file: None,
            database: "marketprism_hot".to_owned(),
            profile: ClickHouseProfile::Auto,
            insert_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            create_schema: false,
            ttl_days: None,
        }
    }
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of logs and error messages: see crate::redact.
        let password = if self.password.is_empty() {
            ""
        } else {
            REDACTED
        };
        f.debug_struct("ClickHouseConfig")
            .field("url", &redact(&self.url))
            .field("user", &self.user)
            .field("password", &password)
            .field("password_file", &self.password_file)
            .field("database", &self.database)
            .field("profile", &self.profile)
            .field("insert_timeout_ms", &self.insert_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("create_schema", &self.create_schema)
            .field("ttl_days", &self.ttl_days)
            .finish()
    }
}

/// Batch limits of one table: a batch is cut when any of them is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableBatch {
    /// Rows per insert, at most.
    pub rows_max: u32,
    /// Encoded bytes per insert, at most.
    pub bytes_max: u64,
    /// A batch is flushed at the latest this long after its first row, in milliseconds.
    pub flush_interval_ms: u64,
}

impl TableBatch {
    /// Defaults of the trades table: the busiest small-row table.
    pub const TRADES: TableBatch = TableBatch {
        rows_max: 10_000,
        bytes_max: 8 * MIB,
        flush_interval_ms: 1_000,
    };
    /// Defaults of the orderbooks table: few, large rows.
    pub const ORDERBOOKS: TableBatch = TableBatch {
        rows_max: 2_000,
        bytes_max: 32 * MIB,
        flush_interval_ms: 1_000,
    };
    /// Defaults of the six low-frequency tables, and of passthrough tables.
    pub const LOW_FREQUENCY: TableBatch = TableBatch {
        rows_max: 500,
        bytes_max: 2 * MIB,
        flush_interval_ms: 1_000,
    };

    /// The default limits of `table`.
    pub fn default_for(table: &str) -> TableBatch {
        match table {
            "trades" => Self::TRADES,
            "orderbooks" => Self::ORDERBOOKS,
            _ => Self::LOW_FREQUENCY,
        }
    }
}

/// A `[drain.tables.<table>]` entry as written: missing fields take that table's default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableBatchPatch {
    rows_max: Option<u32>,
    bytes_max: Option<u64>,
    flush_interval_ms: Option<u64>,
}

/// Deserializes `[drain.tables]` onto the per-table defaults, so that setting one field of one
/// table keeps every other default.
fn deserialize_tables<'de, D>(deserializer: D) -> Result<BTreeMap<String, TableBatch>, D::Error>
where
    D: Deserializer<'de>,
{
    let patches = BTreeMap::<String, TableBatchPatch>::deserialize(deserializer)?;
    let mut tables = default_tables();
    for (table, patch) in patches {
        let base = TableBatch::default_for(&table);
        let entry = tables.entry(table).or_insert(base);
        if let Some(v) = patch.rows_max {
            entry.rows_max = v;
        }
        if let Some(v) = patch.bytes_max {
            entry.bytes_max = v;
        }
        if let Some(v) = patch.flush_interval_ms {
            entry.flush_interval_ms = v;
        }
    }
    Ok(tables)
}

fn default_tables() -> BTreeMap<String, TableBatch> {
    TYPED_TABLES
        .iter()
        .map(|t| ((*t).to_owned(), TableBatch::default_for(t)))
        .collect()
}

/// `[[drain.passthrough]]`: subjects without a typed codec, inserted as JSONEachRow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughRoute {
    /// First subject token, e.g. `ticker` for `ticker.binance.spot.BTC-USDT`.
    pub data_type: String,
    /// Destination table: created by `schema apply` when missing, keyed by (nats_stream, nats_seq);
    /// an existing one must have those two columns.
    pub table: String,
}

/// `[drain]`: batching WAL records into ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// How often the drain checks batch ages, in milliseconds. Default 1,000.
    pub flush_interval_ms: u64,
    /// First retry delay after a failed insert, in milliseconds; doubles up to the max. Default 100.
    pub retry_backoff_initial_ms: u64,
    /// Longest retry delay, in milliseconds. Default 30,000.
    pub retry_backoff_max_ms: u64,
    /// Table of rows that cannot be decoded or that ClickHouse rejects.
    pub dead_letter_table: String,
    /// Earliest accepted row `timestamp`, in epoch milliseconds; older rows are dead letters.
    /// Default 1,230,768,000,000 (2009-01-01T00:00:00Z).
    pub timestamp_min_ms: u64,
    /// How far past its JetStream publish time a row's `timestamp` may lie, in milliseconds;
    /// later rows are dead letters. Default 86,400,000 (one day).
    pub timestamp_future_max_ms: u64,
    /// Batch limits per table; tables not listed use [`TableBatch::default_for`].
    #[serde(deserialize_with = "deserialize_tables")]
    pub tables: BTreeMap<String, TableBatch>,
    /// Routes of untyped subjects.
    pub passthrough: Vec<PassthroughRoute>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            flush_interval_ms: 1_000,
            retry_backoff_initial_ms: 100,
            retry_backoff_max_ms: 30_000,
            dead_letter_table: "dead_letters".to_owned(),
            timestamp_min_ms: crate::codec::TIMESTAMP_MIN_MS_DEFAULT as u64,
            timestamp_future_max_ms: crate::codec::TIMESTAMP_FUTURE_MAX_MS_DEFAULT as u64,
            tables: default_tables(),
            passthrough: Vec::new(),
        }
    }
}

impl DrainConfig {
    /// The window of plausible row times (validated to fit `i64`).
    pub fn time_window(&self) -> crate::codec::TimeWindow {
        crate::codec::TimeWindow {
            min_ms: i64::try_from(self.timestamp_min_ms).unwrap_or(i64::MAX),
            future_max_ms: i64::try_from(self.timestamp_future_max_ms).unwrap_or(i64::MAX),
        }
    }

    /// The batch limits of `table`, defaults included.
    pub fn table_batch(&self, table: &str) -> TableBatch {
        self.tables
            .get(table)
            .copied()
            .unwrap_or_else(|| TableBatch::default_for(table))
    }
}

/// `[metrics]`: the Prometheus endpoint (`/metrics`, `/health`, `/ready`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Listen address; MarketPrism's Prometheus scrapes port 9094.
    pub listen: SocketAddr,
    /// Connections open at once, at most; later ones wait in the listen queue. Default 64.
    pub connections_max: u32,
    /// A connection whose request headers have not arrived this long after accept is closed,
    /// in milliseconds. Default 5,000.
    pub header_read_timeout_ms: u64,
    /// Every connection is closed this long after accept (one request each), in milliseconds.
    /// Default 10,000.
    pub request_timeout_ms: u64,
    /// `/ready` answers 503 once a table's inserts have been failing this long, in seconds.
    /// Default 30.
    pub ready_insert_failing_s: u64,
    /// JetStream consumer info is polled this often for the backlog gauges, in seconds.
    /// Default 15.
    pub backlog_poll_interval_s: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            // Loopback: the endpoint tells anyone who reaches it about the relay's data flow;
            // exposing it (MarketPrism's compose sets 0.0.0.0:9094) is a deliberate setting.
            listen: SocketAddr::from(([127, 0, 0, 1], 9094)),
            connections_max: 64,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            ready_insert_failing_s: crate::metrics::health::READY_INSERT_FAILING_S_DEFAULT,
            backlog_poll_interval_s: 15,
        }
    }
}

/// `[shutdown]`: graceful shutdown on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Stop fetching, fsync, ack and flush within this, in milliseconds; then exit. Default 10,000.
    pub timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { timeout_ms: 10_000 }
    }
}

/// One invalid value, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    /// Field path, e.g. `consumer[1].fetch_batch`.
    pub field: String,
    /// The rejected value as written.
    pub value: String,
    /// What is allowed, with the unit.
    pub allowed: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}: allowed {}; {}",
            self.field, self.value, self.allowed, self.fix
        )
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (syntax, type, unknown field). The
    /// message is redacted: the parser quotes the offending line, which may hold a password.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment override names a field that does not exist.
    #[error("unknown environment override {var}: {section} has no scalar field {field}; overridable: {known}")]
    UnknownEnv {
        var: String,
        section: String,
        field: String,
        known: String,
    },
    /// An environment override's value does not parse as the field's type.
    #[error("environment override {var} = {value:?} is not {expected}")]
    EnvValue {
        var: String,
        value: String,
        expected: &'static str,
    },
    /// A `password_file` or `token_file` could not be read.
    #[error("cannot read {field} {path}: {source}")]
    SecretFile {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file holds a secret (a password, a token, or credentials inside a URL).
    /// A configuration file is copied, versioned and read by many, so secrets come from
    /// `password_file`/`token_file` or the environment; every such field is listed, none shows its
    /// value.
    #[error("config file {path} holds secrets, which belong in a file or the environment:\n  {}", .values.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    SecretInFile {
        path: PathBuf,
        values: Vec<InvalidValue>,
    },
    /// Values out of their bounds; every one is listed.
    #[error("invalid configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<InvalidValue>),
}

impl ConfigError {
    /// The invalid values, if this is a validation error.
    pub fn invalid_values(&self) -> &[InvalidValue] {
        match self {
            ConfigError::Invalid(values) | ConfigError::SecretInFile { values, .. } => values,
            _ => &[],
        }
    }
}

impl Config {
    /// Loads the file at `path` (defaults when `None`), applies the process's `PRISM_RELAY_*`
    /// environment overrides, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment, for tests and tools.
    pub fn load_with_env<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let config = Self::parse_toml(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    message: redact(&source.to_string()).into_owned(),
                })?;
                let secrets = config.secrets_in_file();
                if !secrets.is_empty() {
                    return Err(ConfigError::SecretInFile {
                        path: path.to_owned(),
                        values: secrets,
                    });
                }
                config
            }
        };
        config.apply_env(env)?;
        // Registered before validation, whose errors quote URLs, and again once the secret files
        // are read.
        config.register_secrets();
        config.validate()?;
        config.read_secret_files()?;
        config.register_secrets();
        Ok(config)
    }

    /// The secrets a configuration parsed from a file holds, as invalid values naming the field
    /// and the fix; their values show as [`REDACTED`]. Secrets from the environment are applied
    /// after this check and stay allowed.
    pub fn secrets_in_file(&self) -> Vec<InvalidValue> {
        const ALLOWED: &str = "no secret in the configuration file";
        let mut found = Vec::new();
        let mut push = |field: &str, fix: &str| {
            found.push(InvalidValue {
                field: field.to_owned(),
                value: REDACTED.to_owned(),
                allowed: ALLOWED.to_owned(),
                fix: fix.to_owned(),
            })
        };
        if self.nats.password.as_ref().is_some_and(|p| !p.is_empty()) {
            push(
                "nats.password",
                "remove it; set nats.password_file to a file holding it, or PRISM_RELAY_NATS_PASSWORD",
            );
        }
        if self.nats.token.as_ref().is_some_and(|t| !t.is_empty()) {
            push(
                "nats.token",
                "remove it; set nats.token_file to a file holding it, or PRISM_RELAY_NATS_TOKEN",
            );
        }
        if !redact::url_secrets(&self.nats.url, true).is_empty() {
            push(
                "nats.url",
                "remove the credentials from the URL; set nats.user with nats.password_file (or \
                 nats.token_file), or give the whole URL in PRISM_RELAY_NATS_URL",
            );
        }
        if !self.clickhouse.password.is_empty() {
            push(
                "clickhouse.password",
                "remove it; set clickhouse.password_file to a file holding it, or \
                 PRISM_RELAY_CLICKHOUSE_PASSWORD",
            );
        }
        if !redact::url_secrets(&self.clickhouse.url, false).is_empty() {
            push(
                "clickhouse.url",
                "remove the password from the URL; set clickhouse.password_file, or give the \
                 whole URL in PRISM_RELAY_CLICKHOUSE_URL",
            );
        }
        found
    }

    /// Registers every secret this configuration holds (passwords, tokens, passwords and tokens
    /// of URLs) with [`redact::register_secret`], so text that echoes one anywhere is redacted.
    pub fn register_secrets(&self) {
        let secrets = [
            self.nats.password.as_deref(),
            self.nats.token.as_deref(),
            Some(self.clickhouse.password.as_str()),
        ];
        for secret in secrets.into_iter().flatten() {
            redact::register_secret(secret);
        }
        for secret in redact::url_secrets(&self.nats.url, true)
            .into_iter()
            .chain(redact::url_secrets(&self.clickhouse.url, false))
        {
            redact::register_secret(secret);
        }
    }

    /// Reads `password_file` and `token_file` into the fields they stand for (validation made
    /// sure each is the only source of its secret). A trailing newline is not part of a secret.
    pub fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        fn read(field: &'static str, path: &Path) -> Result<String, ConfigError> {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                field,
                path: path.to_owned(),
                source,
            })?;
            Ok(text.trim_end_matches(['\n', '\r']).to_owned())
        }
        if let Some(path) = &self.nats.password_file {
            self.nats.password = Some(read("nats.password_file", path)?);
        }
        if let Some(path) = &self.nats.token_file {
            self.nats.token = Some(read("nats.token_file", path)?);
        }
        if let Some(path) = &self.clickhouse.password_file {
            self.clickhouse.password = read("clickhouse.password_file", path)?;
        }
        Ok(())
    }

    /// Parses TOML text without environment overrides or validation.
    pub fn parse_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Applies every `PRISM_RELAY_<SECTION>_<FIELD>` variable of `env` whose section is one of
    /// the overridable sections. Variables are applied in name order so the result does not
    /// depend on the environment's order.
    pub fn apply_env<I>(&mut self, env: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, value) in vars {
            let rest = &var[ENV_PREFIX.len()..];
            let Some((section, field)) = rest.split_once('_') else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            let field = field.to_ascii_lowercase();
            if !ENV_SECTIONS.contains(&section.as_str()) {
                continue;
            }
            self.apply_env_field(&var, &section, &field, &value)?;
        }
        Ok(())
    }

    fn apply_env_field(
        &mut self,
        var: &str,
        section: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let v = EnvValue { var, value };
        match (section, field) {
            ("nats", "url") => self.nats.url = value.to_owned(),
            ("nats", "name") => self.nats.name = value.to_owned(),
            ("nats", "connect_timeout_ms") => self.nats.connect_timeout_ms = v.parse()?,
            ("nats", "request_timeout_ms") => self.nats.request_timeout_ms = v.parse()?,
            ("nats", "user") => self.nats.user = v.optional_string(),
            ("nats", "password") => self.nats.password = v.optional_string(),
            ("nats", "password_file") => {
                self.nats.password_file = v.optional_string().map(PathBuf::from)
            }
            ("nats", "token") => self.nats.token = v.optional_string(),
            ("nats", "token_file") => self.nats.token_file = v.optional_string().map(PathBuf::from),
            ("nats", "creds_file") => self.nats.creds_file = v.optional_string().map(PathBuf::from),
            ("wal", "dir") => self.wal.dir = PathBuf::from(value),
            ("wal", "segment_bytes_max") => self.wal.segment_bytes_max = v.parse()?,
            ("wal", "group_bytes_max") => self.wal.group_bytes_max = v.parse()?,
            ("wal", "budget_bytes_max") => self.wal.budget_bytes_max = v.parse()?,
            ("wal", "retention_bytes_max") => self.wal.retention_bytes_max = v.parse()?,
            ("wal", "retention_segments_max") => self.wal.retention_segments_max = v.parse()?,
            ("wal", "retention_age_s") => self.wal.retention_age_s = v.parse()?,
            ("wal", "recovery_mode") => self.wal.recovery_mode = v.parse_enum()?,
            ("clickhouse", "url") => self.clickhouse.url = value.to_owned(),
            ("clickhouse", "user") => self.clickhouse.user = value.to_owned(),
            ("clickhouse", "password") => self.clickhouse.password = value.to_owned(),
            ("clickhouse", "password_file") => {
                self.clickhouse.password_file = v.optional_string().map(PathBuf::from)
            }
            ("clickhouse", "database") => self.clickhouse.database = value.to_owned(),
            ("clickhouse", "profile") => self.clickhouse.profile = v.parse_enum()?,
            ("clickhouse", "insert_timeout_ms") => self.clickhouse.insert_timeout_ms = v.parse()?,
            ("clickhouse", "connect_timeout_ms") => {
                self.clickhouse.connect_timeout_ms = v.parse()?
            }
            ("clickhouse", "create_schema") => self.clickhouse.create_schema = v.parse()?,
            ("clickhouse", "ttl_days") => self.clickhouse.ttl_days = v.parse_optional()?,
            ("drain", "flush_interval_ms") => self.drain.flush_interval_ms = v.parse()?,
            ("drain", "retry_backoff_initial_ms") => {
                self.drain.retry_backoff_initial_ms = v.parse()?
            }
            ("drain", "retry_backoff_max_ms") => self.drain.retry_backoff_max_ms = v.parse()?,
            ("drain", "timestamp_min_ms") => self.drain.timestamp_min_ms = v.parse()?,
            ("drain", "timestamp_future_max_ms") => {
                self.drain.timestamp_future_max_ms = v.parse()?
            }
            ("drain", "dead_letter_table") => self.drain.dead_letter_table = value.to_owned(),
            ("metrics", "listen") => self.metrics.listen = v.parse()?,
            ("metrics", "connections_max") => self.metrics.connections_max = v.parse()?,
            ("metrics", "header_read_timeout_ms") => {
                self.metrics.header_read_timeout_ms = v.parse()?
            }
            ("metrics", "request_timeout_ms") => self.metrics.request_timeout_ms = v.parse()?,
            ("metrics", "ready_insert_failing_s") => {
                self.metrics.ready_insert_failing_s = v.parse()?
            }
            ("metrics", "backlog_poll_interval_s") => {
                self.metrics.backlog_poll_interval_s = v.parse()?
            }
            ("shutdown", "timeout_ms") => self.shutdown.timeout_ms = v.parse()?,
            _ => {
                let known: Vec<String> = ENV_OVERRIDES
                    .iter()
                    .filter(|(s, _)| *s == section)
                    .map(|(s, f)| env_var_name(s, f))
                    .collect();
                return Err(ConfigError::UnknownEnv {
                    var: var.to_owned(),
                    section: format!("[{section}]"),
                    field: field.to_owned(),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }

    /// Checks every bound and relation; returns all violations at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut v = Validator::default();
        self.validate_nats(&mut v);
        self.validate_streams(&mut v);
        self.validate_consumers(&mut v);
        self.validate_wal(&mut v);
        self.validate_clickhouse(&mut v);
        self.validate_drain(&mut v);
        self.validate_metrics(&mut v);
        v.range(
            "shutdown.timeout_ms",
            self.shutdown.timeout_ms,
            SHUTDOWN_TIMEOUT_MS_MIN,
            SHUTDOWN_TIMEOUT_MS_MAX,
            "ms",
        );
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(v.errors))
        }
    }

    fn validate_nats(&self, v: &mut Validator) {
        let n = &self.nats;
        for server in n.url.split(',') {
            if let Err(why) = check_nats_url(server.trim()) {
                v.push(
                    "nats.url",
                    &n.url,
                    "comma-separated nats://, tls://, ws:// or wss:// URLs (or host:port)",
                    why,
                );
            }
        }
        v.range(
            "nats.connect_timeout_ms",
            n.connect_timeout_ms,
            NATS_CONNECT_TIMEOUT_MS_MIN,
            NATS_CONNECT_TIMEOUT_MS_MAX,
            "ms",
        );
        v.range(
            "nats.request_timeout_ms",
            n.request_timeout_ms,
            NATS_REQUEST_TIMEOUT_MS_MIN,
            NATS_REQUEST_TIMEOUT_MS_MAX,
            "ms",
        );
        let has_password = n.password.is_some() || n.password_file.is_some();
        let methods = [
            n.user.is_some() || has_password,
            n.token.is_some() || n.token_file.is_some(),
            n.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            v.push(
                "nats",
                "several of user/password, token, creds_file",
                "one authentication method",
                "keep exactly one of user+password, token or creds_file".to_owned(),
            );
        }
        if n.password.is_some() && n.password_file.is_some() {
            v.push(
                "nats.password_file",
                "set together with nats.password",
                "one source of the password",
                "keep nats.password_file and remove nats.password".to_owned(),
            );
        }
        if n.token.is_some() && n.token_file.is_some() {
            v.push(
                "nats.token_file",
                "set together with nats.token",
                "one source of the token",
                "keep nats.token_file and remove nats.token".to_owned(),
            );
        }
        if n.user.is_some() != has_password {
            v.push(
                if n.user.is_some() {
                    "nats.password"
                } else {
                    "nats.user"
                },
                "<unset>",
                "user and password together",
                "set both nats.user and nats.password (or nats.password_file), or neither"
                    .to_owned(),
            );
        }
    }

    fn validate_streams(&self, v: &mut Validator) {
        let mut names = BTreeSet::new();
        for (i, s) in self.stream.iter().enumerate() {
            let p = |f: &str| format!("stream[{i}].{f}");
            v.name(&p("name"), &s.name);
            if s.name == RESERVED_STREAM_NAME {
                v.push(
                    &p("name"),
                    &s.name,
                    "any name but ORDERBOOK_SNAP",
                    "MarketPrism's init script deletes ORDERBOOK_SNAP; choose another name such as MARKET_BOOKS".to_owned(),
                );
            }
            if !names.insert(s.name.as_str()) {
                v.push(
                    &p("name"),
                    &s.name,
                    "a name not used by another [[stream]]",
                    "remove the duplicate [[stream]] entry".to_owned(),
                );
            }
            if s.subjects.is_empty() {
                v.push(
                    &p("subjects"),
                    "[]",
                    "one or more subjects",
                    "list the subjects the stream captures, e.g. [\"trade.>\"]".to_owned(),
                );
            }
            for (j, subject) in s.subjects.iter().enumerate() {
                v.subject(&format!("stream[{i}].subjects[{j}]"), subject);
            }
            if s.max_age_s != 0 {
                v.range(
                    &p("max_age_s"),
                    s.max_age_s,
                    STREAM_MAX_AGE_S_MIN,
                    STREAM_MAX_AGE_S_MAX,
                    "s (or 0 = unlimited)",
                );
            }
            if s.max_bytes != -1 {
                v.range(
                    &p("max_bytes"),
                    s.max_bytes,
                    STREAM_MAX_BYTES_MIN,
                    STREAM_MAX_BYTES_MAX,
                    "bytes (or -1 = unlimited)",
                );
            }
            if s.max_msgs != -1 {
                v.range(
                    &p("max_msgs"),
                    s.max_msgs,
                    STREAM_MAX_MSGS_MIN,
                    STREAM_MAX_MSGS_MAX,
                    "messages (or -1 = unlimited)",
                );
            }
            v.range(
                &p("duplicate_window_s"),
                s.duplicate_window_s,
                STREAM_DUPLICATE_WINDOW_S_MIN,
                STREAM_DUPLICATE_WINDOW_S_MAX,
                "s",
            );
            if s.max_age_s != 0 && s.duplicate_window_s > s.max_age_s {
                v.push(
                    &p("duplicate_window_s"),
                    &s.duplicate_window_s.to_string(),
                    &format!("at most max_age_s ({} s)", s.max_age_s),
                    "JetStream rejects a deduplication window longer than the stream's max age; lower it".to_owned(),
                );
            }
            v.range(
                &p("replicas"),
                s.replicas,
                STREAM_REPLICAS_MIN,
                STREAM_REPLICAS_MAX,
                "replicas",
            );
        }
    }

    fn validate_consumers(&self, v: &mut Validator) {
        let mut durables = BTreeSet::new();
        for (i, c) in self.consumer.iter().enumerate() {
            let p = |f: &str| format!("consumer[{i}].{f}");
            v.name(&p("stream"), &c.stream);
            v.name(&p("durable"), &c.durable);
            if !durables.insert((c.stream.as_str(), c.durable.as_str())) {
                v.push(
                    &p("durable"),
                    &c.durable,
                    "a durable not used by another [[consumer]] of the same stream",
                    "remove the duplicate or give it another durable name".to_owned(),
                );
            }
            let mut filters = BTreeSet::new();
            for (j, subject) in c.filter_subjects.iter().enumerate() {
                let field = format!("consumer[{i}].filter_subjects[{j}]");
                v.subject(&field, subject);
                if !filters.insert(subject.as_str()) {
                    v.push(
                        &field,
                        subject,
                        "each filter subject once",
                        "remove the duplicate filter subject".to_owned(),
                    );
                }
            }
            match (c.deliver_policy, c.start_sequence) {
                (DeliverPolicyKind::ByStartSequence, None | Some(0)) => v.push(
                    &p("start_sequence"),
                    &format!("{:?}", c.start_sequence),
                    "1 ..= 18446744073709551615 (stream sequence)",
                    "set start_sequence with deliver_policy = \"by_start_sequence\"".to_owned(),
                ),
                (DeliverPolicyKind::ByStartSequence, Some(_)) | (_, None) => {}
                (_, Some(seq)) => v.push(
                    &p("start_sequence"),
                    &seq.to_string(),
                    "only with deliver_policy = \"by_start_sequence\"",
                    "remove start_sequence or set deliver_policy = \"by_start_sequence\""
                        .to_owned(),
                ),
            }
            v.range(
                &p("ack_wait_ms"),
                c.ack_wait_ms,
                CONSUMER_ACK_WAIT_MS_MIN,
                CONSUMER_ACK_WAIT_MS_MAX,
                "ms",
            );
            v.range(
                &p("max_ack_pending"),
                c.max_ack_pending,
                CONSUMER_MAX_ACK_PENDING_MIN,
                CONSUMER_MAX_ACK_PENDING_MAX,
                "messages",
            );
            if c.max_deliver != -1
                && !(CONSUMER_MAX_DELIVER_MIN..=CONSUMER_MAX_DELIVER_MAX).contains(&c.max_deliver)
            {
                v.push(
                    &p("max_deliver"),
                    &c.max_deliver.to_string(),
                    &format!(
                        "-1 (unlimited) or {CONSUMER_MAX_DELIVER_MIN} ..= {CONSUMER_MAX_DELIVER_MAX} deliveries"
                    ),
                    "use -1: a small max_deliver drops messages for good after a short outage".to_owned(),
                );
            }
            v.range(
                &p("fetch_batch"),
                c.fetch_batch,
                CONSUMER_FETCH_BATCH_MIN,
                CONSUMER_FETCH_BATCH_MAX,
                "messages",
            );
            if i64::from(c.fetch_batch) > c.max_ack_pending && c.max_ack_pending >= 1 {
                v.push(
                    &p("fetch_batch"),
                    &c.fetch_batch.to_string(),
                    &format!("at most max_ack_pending ({} messages)", c.max_ack_pending),
                    "lower fetch_batch or raise max_ack_pending, or pulls stall at max_ack_pending"
                        .to_owned(),
                );
            }
            v.range(
                &p("fetch_bytes_max"),
                c.fetch_bytes_max,
                CONSUMER_FETCH_BYTES_MAX_MIN,
                CONSUMER_FETCH_BYTES_MAX_MAX,
                "bytes",
            );
            v.range(
                &p("fetch_expires_ms"),
                c.fetch_expires_ms,
                CONSUMER_FETCH_EXPIRES_MS_MIN,
                CONSUMER_FETCH_EXPIRES_MS_MAX,
                "ms",
            );
            if c.fetch_expires_ms >= c.ack_wait_ms {
                v.push(
                    &p("fetch_expires_ms"),
                    &c.fetch_expires_ms.to_string(),
                    &format!("less than ack_wait_ms ({} ms)", c.ack_wait_ms),
                    "lower fetch_expires_ms: messages of a long pull would be redelivered before they are written".to_owned(),
                );
            }
        }
    }

    fn validate_wal(&self, v: &mut Validator) {
        let w = &self.wal;
        if w.dir.as_os_str().is_empty() {
            v.push(
                "wal.dir",
                "\"\"",
                "a directory path",
                "set wal.dir, e.g. \"./data/wal\"".to_owned(),
            );
        }
        v.range(
            "wal.segment_bytes_max",
            w.segment_bytes_max,
            WAL_SEGMENT_BYTES_MAX_MIN,
            WAL_SEGMENT_BYTES_MAX_MAX,
            "bytes",
        );
        v.range(
            "wal.group_bytes_max",
            w.group_bytes_max,
            WAL_GROUP_BYTES_MAX_MIN,
            WAL_GROUP_BYTES_MAX_MAX.min(w.segment_bytes_max.max(WAL_GROUP_BYTES_MAX_MIN)),
            "bytes (at most segment_bytes_max)",
        );
        let budget_min = WAL_BUDGET_BYTES_MAX_MIN
            .max(w.segment_bytes_max.saturating_mul(WAL_BUDGET_SEGMENTS_MIN));
        v.range(
            "wal.budget_bytes_max",
            w.budget_bytes_max,
            budget_min,
            WAL_BUDGET_BYTES_MAX_MAX,
            "bytes (at least 2 x segment_bytes_max)",
        );
        v.range(
            "wal.retention_bytes_max",
            w.retention_bytes_max,
            0,
            WAL_RETENTION_BYTES_MAX_MAX.min(w.budget_bytes_max),
            "bytes (at most budget_bytes_max)",
        );
        v.range(
            "wal.retention_segments_max",
            w.retention_segments_max,
            0,
            WAL_RETENTION_SEGMENTS_MAX_MAX,
            "segments",
        );
        v.range(
            "wal.retention_age_s",
            w.retention_age_s,
            0,
            WAL_RETENTION_AGE_S_MAX,
            "s",
        );
    }

    fn validate_clickhouse(&self, v: &mut Validator) {
        let c = &self.clickhouse;
        if !(c.url.starts_with("http://") || c.url.starts_with("https://"))
            || c.url.len() <= "https://".len()
            || c.url.contains(char::is_whitespace)
        {
            v.push(
                "clickhouse.url",
                &c.url,
                "an http:// or https:// URL",
                "use the HTTP interface, e.g. \"http://127.0.0.1:8123\" (not the native TCP port 9000)".to_owned(),
            );
        }
        if !c.password.is_empty() && c.password_file.is_some() {
            v.push(
                "clickhouse.password_file",
                "set together with clickhouse.password",
                "one source of the password",
                "keep clickhouse.password_file and remove clickhouse.password".to_owned(),
            );
        }
        v.identifier("clickhouse.database", &c.database);
        v.range(
            "clickhouse.insert_timeout_ms",
            c.insert_timeout_ms,
            CLICKHOUSE_INSERT_TIMEOUT_MS_MIN,
            CLICKHOUSE_INSERT_TIMEOUT_MS_MAX,
            "ms",
        );
        v.range(
            "clickhouse.connect_timeout_ms",
            c.connect_timeout_ms,
            CLICKHOUSE_CONNECT_TIMEOUT_MS_MIN,
            CLICKHOUSE_CONNECT_TIMEOUT_MS_MAX,
            "ms",
        );
        if let Some(days) = c.ttl_days {
            v.range(
                "clickhouse.ttl_days",
                days,
                CLICKHOUSE_TTL_DAYS_MIN,
                CLICKHOUSE_TTL_DAYS_MAX,
                "days",
            );
            if c.profile == ClickHouseProfile::Legacy {
                v.push(
                    "clickhouse.ttl_days",
                    &days.to_string(),
                    "unset with profile = \"legacy\"",
                    "remove ttl_days: the legacy profile creates tables without TTL".to_owned(),
                );
            }
        }
    }

    fn validate_metrics(&self, v: &mut Validator) {
        let m = &self.metrics;
        v.range(
            "metrics.connections_max",
            m.connections_max,
            METRICS_CONNECTIONS_MAX_MIN,
            METRICS_CONNECTIONS_MAX_MAX,
            "connections",
        );
        v.range(
            "metrics.header_read_timeout_ms",
            m.header_read_timeout_ms,
            METRICS_HEADER_READ_TIMEOUT_MS_MIN,
            METRICS_HEADER_READ_TIMEOUT_MS_MAX,
            "ms",
        );
        v.range(
            "metrics.request_timeout_ms",
            m.request_timeout_ms,
            METRICS_REQUEST_TIMEOUT_MS_MIN.max(m.header_read_timeout_ms),
            METRICS_REQUEST_TIMEOUT_MS_MAX,
            "ms (at least header_read_timeout_ms)",
        );
        v.range(
            "metrics.ready_insert_failing_s",
            m.ready_insert_failing_s,
            METRICS_READY_INSERT_FAILING_S_MIN,
            METRICS_READY_INSERT_FAILING_S_MAX,
            "s",
        );
        v.range(
            "metrics.backlog_poll_interval_s",
            m.backlog_poll_interval_s,
            METRICS_BACKLOG_POLL_INTERVAL_S_MIN,
            METRICS_BACKLOG_POLL_INTERVAL_S_MAX,
            "s",
        );
    }

    fn validate_drain(&self, v: &mut Validator) {
        let d = &self.drain;
        v.range(
            "drain.flush_interval_ms",
            d.flush_interval_ms,
            DRAIN_FLUSH_INTERVAL_MS_MIN,
            DRAIN_FLUSH_INTERVAL_MS_MAX,
            "ms",
        );
        v.range(
            "drain.retry_backoff_initial_ms",
            d.retry_backoff_initial_ms,
            DRAIN_RETRY_BACKOFF_MS_MIN,
            DRAIN_RETRY_BACKOFF_MS_MAX,
            "ms",
        );
        v.range(
            "drain.retry_backoff_max_ms",
            d.retry_backoff_max_ms,
            d.retry_backoff_initial_ms.max(DRAIN_RETRY_BACKOFF_MS_MIN),
            DRAIN_RETRY_BACKOFF_MS_MAX,
            "ms (at least retry_backoff_initial_ms)",
        );
        v.range(
            "drain.timestamp_min_ms",
            d.timestamp_min_ms,
            0,
            DRAIN_TIMESTAMP_MIN_MS_MAX,
            "ms since the epoch (0 accepts any time; at most 2100-01-01)",
        );
        v.range(
            "drain.timestamp_future_max_ms",
            d.timestamp_future_max_ms,
            DRAIN_TIMESTAMP_FUTURE_MAX_MS_MIN,
            DRAIN_TIMESTAMP_FUTURE_MAX_MS_MAX,
            "ms",
        );
        v.identifier("drain.dead_letter_table", &d.dead_letter_table);
        if TYPED_TABLES.contains(&d.dead_letter_table.as_str())
            || d.dead_letter_table == UNROUTED_LANE
        {
            v.push(
                "drain.dead_letter_table",
                &d.dead_letter_table,
                "a table of its own (not a data table, not the internal lane _unrouted)",
                "use a name such as dead_letters".to_owned(),
            );
        }

        let mut data_types = BTreeSet::new();
        for (i, route) in d.passthrough.iter().enumerate() {
            let p = |f: &str| format!("drain.passthrough[{i}].{f}");
            let token_ok = !route.data_type.is_empty()
                && !route
                    .data_type
                    .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace());
            if !token_ok {
                v.push(
                    &p("data_type"),
                    &route.data_type,
                    "one subject token (no '.', '*', '>' or spaces)",
                    "use the first token of the subjects, e.g. \"ticker\"".to_owned(),
                );
            }
            if TYPED_DATA_TYPES.contains(&route.data_type.as_str()) {
                v.push(
                    &p("data_type"),
                    &route.data_type,
                    "a data type without a typed codec",
                    "remove the route: this data type has a typed table".to_owned(),
                );
            }
            if !data_types.insert(route.data_type.as_str()) {
                v.push(
                    &p("data_type"),
                    &route.data_type,
                    "each data type once",
                    "remove the duplicate route".to_owned(),
                );
            }
            v.identifier(&p("table"), &route.table);
            // `_unrouted` names the drain's internal lane (and its ledger cursor): a passthrough
            // table of that name would share the lane with unroutable records.
            if TYPED_TABLES.contains(&route.table.as_str())
                || route.table == d.dead_letter_table
                || route.table == UNROUTED_LANE
            {
                v.push(
                    &p("table"),
                    &route.table,
                    "a table of its own (not a data table, the dead-letter table or the internal lane _unrouted)",
                    "route to a table of its own".to_owned(),
                );
            }
        }

        for (table, batch) in &d.tables {
            let known = TYPED_TABLES.contains(&table.as_str())
                || d.passthrough.iter().any(|r| &r.table == table);
            let p = |f: &str| format!("drain.tables.{table}.{f}");
            if !known {
                v.push(
                    &format!("drain.tables.{table}"),
                    table,
                    &format!("one of {} or a passthrough table", TYPED_TABLES.join(", ")),
                    "fix the table name or add a [[drain.passthrough]] route to it".to_owned(),
                );
            }
            v.range(
                &p("rows_max"),
                batch.rows_max,
                DRAIN_TABLE_ROWS_MAX_MIN,
                DRAIN_TABLE_ROWS_MAX_MAX,
                "rows",
            );
            v.range(
                &p("bytes_max"),
                batch.bytes_max,
                DRAIN_TABLE_BYTES_MAX_MIN,
                DRAIN_TABLE_BYTES_MAX_MAX,
                "bytes",
            );
            v.range(
                &p("flush_interval_ms"),
                batch.flush_interval_ms,
                DRAIN_FLUSH_INTERVAL_MS_MIN,
                DRAIN_FLUSH_INTERVAL_MS_MAX,
                "ms",
            );
        }
    }

    /// A copy with passwords and tokens replaced, for printing.
    pub fn redacted(&self) -> Config {
        const HIDDEN: &str = REDACTED;
        let mut c = self.clone();
        c.nats.url = redact(&c.nats.url).into_owned();
        c.clickhouse.url = redact(&c.clickhouse.url).into_owned();
        if c.nats.password.is_some() {
            c.nats.password = Some(HIDDEN.to_owned());
        }
        if c.nats.token.is_some() {
            c.nats.token = Some(HIDDEN.to_owned());
        }
        if !c.clickhouse.password.is_empty() {
            c.clickhouse.password = HIDDEN.to_owned();
        }
        c
    }
}

/// Sections whose scalar fields environment variables may override.
pub const ENV_SECTIONS: [&str; 6] = ["nats", "wal", "clickhouse", "drain", "metrics", "shutdown"];

/// Every (section, field) an environment variable may override.
pub const ENV_OVERRIDES: [(&str, &str); 41] = [
    ("nats", "url"),
    ("nats", "name"),
    ("nats", "connect_timeout_ms"),
    ("nats", "request_timeout_ms"),
    ("nats", "user"),
    ("nats", "password"),
    ("nats", "password_file"),
    ("nats", "token"),
    ("nats", "token_file"),
    ("nats", "creds_file"),
    ("wal", "dir"),
    ("wal", "segment_bytes_max"),
    ("wal", "group_bytes_max"),
    ("wal", "budget_bytes_max"),
    ("wal", "retention_bytes_max"),
    ("wal", "retention_segments_max"),
    ("wal", "retention_age_s"),
    ("wal", "recovery_mode"),
    ("clickhouse", "url"),
    ("clickhouse", "user"),
    ("clickhouse", "password"),
    ("clickhouse", "password_file"),
    ("clickhouse", "database"),
    ("clickhouse", "profile"),
    ("clickhouse", "insert_timeout_ms"),
    ("clickhouse", "connect_timeout_ms"),
    ("clickhouse", "create_schema"),
    ("clickhouse", "ttl_days"),
    ("drain", "flush_interval_ms"),
    ("drain", "retry_backoff_initial_ms"),
    ("drain", "retry_backoff_max_ms"),
    ("drain", "dead_letter_table"),
    ("drain", "timestamp_min_ms"),
    ("drain", "timestamp_future_max_ms"),
    ("metrics", "listen"),
    ("metrics", "connections_max"),
    ("metrics", "header_read_timeout_ms"),
    ("metrics", "request_timeout_ms"),
    ("metrics", "ready_insert_failing_s"),
    ("metrics", "backlog_poll_interval_s"),
    ("shutdown", "timeout_ms"),
];

/// `PRISM_RELAY_<SECTION>_<FIELD>` for a (section, field).
pub fn env_var_name(section: &str, field: &str) -> String {
    format!(
        "{ENV_PREFIX}{}_{}",
        section.to_ascii_uppercase(),
        field.to_ascii_uppercase()
    )
}

/// One environment override being parsed.
struct EnvValue<'a> {
    var: &'a str,
    value: &'a str,
}

impl EnvValue<'_> {
    fn parse<T: std::str::FromStr>(&self) -> Result<T, ConfigError> {
        self.value
            .trim()
            .parse()
            .map_err(|_| ConfigError::EnvValue {
                var: self.var.to_owned(),
                value: redact(self.value).into_owned(),
                expected: std::any::type_name::<T>(),
            })
    }

    fn parse_optional<T: std::str::FromStr>(&self) -> Result<Option<T>, ConfigError> {
        if self.value.trim().is_empty() {
            Ok(None)
        } else {
            self.parse().map(Some)
        }
    }

    fn optional_string(&self) -> Option<String> {
        (!self.value.is_empty()).then(|| self.value.to_owned())
    }

    /// Parses a snake_case enum value the way the TOML file spells it.
    fn parse_enum<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        T::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(self.value.trim()),
        )
        .map_err(|_| ConfigError::EnvValue {
            var: self.var.to_owned(),
            value: redact(self.value).into_owned(),
            expected: "one of the values listed in relay.example.toml",
        })
    }
}

fn check_nats_url(server: &str) -> Result<(), String> {
    if server.is_empty() || server.contains(char::is_whitespace) {
        return Err("give a server URL such as \"nats://127.0.0.1:4222\"".to_owned());
    }
    let rest = match server.split_once("://") {
        Some((scheme, rest)) => {
            if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
                return Err(format!(
                    "scheme {scheme}:// is not a NATS scheme; use nats://, tls://, ws:// or wss://"
                ));
            }
            rest
        }
        None => server,
    };
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    if host_port.is_empty() || host_port.starts_with(':') {
        return Err("the URL has no host; e.g. \"nats://127.0.0.1:4222\"".to_owned());
    }
    Ok(())
}

/// Collects invalid values.
#[derive(Default)]
struct Validator {
    errors: Vec<InvalidValue>,
}

impl Validator {
    fn push(&mut self, field: &str, value: &str, allowed: &str, fix: String) {
        self.errors.push(InvalidValue {
            field: field.to_owned(),
            // A URL value may carry a password in its user info.
            value: redact(value).into_owned(),
            allowed: allowed.to_owned(),
            fix,
        });
    }

    fn range<T>(&mut self, field: &str, value: T, min: T, max: T, unit: &str)
    where
        T: PartialOrd + fmt::Display + Copy,
    {
        if value < min || value > max {
            let short = field.rsplit('.').next().unwrap_or(field);
            let fix = if value < min {
                format!("raise {short} to at least {min}")
            } else {
                format!("lower {short} to at most {max}")
            };
            self.push(
                field,
                &value.to_string(),
                &format!("{min} ..= {max} {unit}"),
                fix,
            );
        }
    }

    /// A JetStream stream or consumer name: the server forbids these characters because names
    /// become subject tokens and file names.
    fn name(&mut self, field: &str, value: &str) {
        const NAME_LEN_MAX: usize = 255;
        let bad = value.is_empty()
            || value.len() > NAME_LEN_MAX
            || value.contains(|c: char| {
                matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
            });
        if bad {
            self.push(
                field,
                value,
                "1 ..= 255 characters without '.', '*', '>', '/', '\\' or whitespace",
                "use a plain name such as MARKET_TRADES or prism-relay".to_owned(),
            );
        }
    }

    /// A NATS subject, wildcards allowed: non-empty tokens, `>` only as the last token.
    fn subject(&mut self, field: &str, value: &str) {
        let tokens: Vec<&str> = value.split('.').collect();
        let last = tokens.len() - 1;
        let bad = value.is_empty()
            || value.contains(char::is_whitespace)
            || tokens.iter().enumerate().any(|(i, t)| {
                t.is_empty()
                    || (t.contains('>') && (*t != ">" || i != last))
                    || (t.contains('*') && *t != "*")
            });
        if bad {
            self.push(
                field,
                value,
                "a NATS subject: dot-separated non-empty tokens, '*' as a whole token, '>' only last",
                "write it like \"trade.>\" or \"funding_rate.*.perpetual.>\"".to_owned(),
            );
        }
    }

    /// A ClickHouse identifier the relay writes unquoted in DDL.
    fn identifier(&mut self, field: &str, value: &str) {
        let mut chars = value.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && value.len() <= 128;
        if !ok {
            self.push(
                field,
                value,
                "1 ..= 128 characters of [A-Za-z0-9_], not starting with a digit",
                "use a plain identifier such as marketprism_hot".to_owned(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn invalid_fields(config: &Config) -> Vec<String> {
        match config.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.invalid_values().iter().map(|v| v.field.clone()).collect(),
        }
    }

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml")
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(
            Config::default().validate().map_err(|e| e.to_string()),
            Ok(())
        );
    }

    #[test]
    fn loading_without_a_file_gives_the_defaults() {
        let config = Config::load_with_env(None, Vec::new()).expect("defaults load");
        assert_eq!(config, Config::default());
        assert_eq!(config.consumer.len(), 1);
        assert_eq!(config.consumer[0].stream, "MARKET_DATA");
        assert_eq!(config.consumer[0].max_deliver, -1);
        assert_eq!(config.metrics.listen.port(), 9094);
    }

    #[test]
    fn example_file_equals_defaults_plus_its_streams_and_consumers() {
        let config = Config::load_with_env(Some(&example_path()), Vec::new())
            .unwrap_or_else(|e| panic!("relay.example.toml must load: {e}"));
        let expected = Config {
            stream: vec![
                StreamConfig {
                    name: "MARKET_TRADES".to_owned(),
                    subjects: vec!["trade.>".to_owned()],
                    ..StreamConfig::default()
                },
                StreamConfig {
                    name: "MARKET_BOOKS".to_owned(),
                    subjects: vec!["orderbook.>".to_owned()],
                    max_age_s: 86_400,
                    ..StreamConfig::default()
                },
            ],
            consumer: vec![
                ConsumerConfig::default(),
                ConsumerConfig {
                    stream: "MARKET_TRADES".to_owned(),
                    durable: "prism-relay-trades".to_owned(),
                    filter_subjects: vec!["trade.>".to_owned()],
                    ..ConsumerConfig::default()
                },
                ConsumerConfig {
                    stream: "MARKET_BOOKS".to_owned(),
                    durable: "prism-relay-books".to_owned(),
                    filter_subjects: vec!["orderbook.>".to_owned()],
                    fetch_batch: 500,
                    ..ConsumerConfig::default()
                },
            ],
            ..Config::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn example_file_mentions_every_field_of_every_section() {
        let text = std::fs::read_to_string(example_path()).expect("example readable");
        let value: toml::Value = toml::Value::try_from(Config::default()).expect("serializes");
        let mut missing = Vec::new();
        let mut check = |prefix: &str, table: &toml::Table| {
            for (key, value) in table {
                // Nested tables ([drain.tables.*], [[drain.passthrough]]) are checked below.
                let nested = value.is_table()
                    || value
                        .as_array()
                        .is_some_and(|a| a.is_empty() && key == "passthrough");
                if nested {
                    continue;
                }
                let written =
                    text.contains(&format!("\n{key} = ")) || text.contains(&format!("# {key} = "));
                if !written {
                    missing.push(format!("{prefix}.{key}"));
                }
            }
        };
        for (section, body) in value.as_table().expect("table") {
            match body {
                toml::Value::Table(t) => check(section, t),
                toml::Value::Array(items) => {
                    for item in items {
                        if let toml::Value::Table(t) = item {
                            check(section, t);
                        }
                    }
                }
                _ => {}
            }
        }
        for table in TYPED_TABLES {
            if !text.contains(&format!("[drain.tables.{table}]")) {
                missing.push(format!("drain.tables.{table}"));
            }
        }
        if !text.contains("# [[drain.passthrough]]") {
            missing.push("drain.passthrough".to_owned());
        }
        // Optional fields are absent from the serialized defaults; they must be written
        // commented out.
        for key in [
            "user",
            "password",
            "password_file",
            "token",
            "token_file",
            "creds_file",
            "start_sequence",
            "ttl_days",
        ] {
            if !text.contains(&format!("# {key} = ")) && !text.contains(&format!("\n{key} = ")) {
                missing.push(key.to_owned());
            }
        }
        assert!(missing.is_empty(), "relay.example.toml lacks {missing:?}");
    }

    #[test]
    fn environment_overrides_scalar_fields_of_sections() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("PRISM_RELAY_CLICKHOUSE_URL", "http://ch.example:8123"),
                ("PRISM_RELAY_NATS_URL", "nats://nats.example:4222"),
                ("PRISM_RELAY_WAL_DIR", "/var/lib/prism-relay/wal"),
                ("PRISM_RELAY_WAL_RECOVERY_MODE", "strict"),
                ("PRISM_RELAY_CLICKHOUSE_TTL_DAYS", "3"),
                ("PRISM_RELAY_CLICKHOUSE_PROFILE", "modern"),
                ("PRISM_RELAY_CLICKHOUSE_CREATE_SCHEMA", "true"),
                ("PRISM_RELAY_METRICS_LISTEN", "127.0.0.1:9100"),
                ("PRISM_RELAY_SHUTDOWN_TIMEOUT_MS", "5000"),
                ("PRISM_RELAY_NATS_TOKEN", "s3cret"),
                // Not a section: belongs to the binary's flags and is left alone.
                ("PRISM_RELAY_CONFIG", "/etc/prism-relay.toml"),
                ("HOME", "/root"),
            ]),
        )
        .expect("overrides apply");
        assert_eq!(config.clickhouse.url, "http://ch.example:8123");
        assert_eq!(config.nats.url, "nats://nats.example:4222");
        assert_eq!(config.wal.dir, PathBuf::from("/var/lib/prism-relay/wal"));
        assert_eq!(config.wal.recovery_mode, RecoveryModeKind::Strict);
        assert_eq!(config.clickhouse.ttl_days, Some(3));
        assert_eq!(config.clickhouse.profile, ClickHouseProfile::Modern);
        assert!(config.clickhouse.create_schema);
        assert_eq!(config.metrics.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(config.shutdown.timeout_ms, 5_000);
        assert_eq!(config.nats.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn environment_overrides_win_over_the_file_and_empty_clears_an_option() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "[clickhouse]\nttl_days = 7\nurl = \"http://file:8123\"\n",
        )
        .expect("write");
        let config = Config::load_with_env(
            Some(&path),
            env(&[
                ("PRISM_RELAY_CLICKHOUSE_TTL_DAYS", ""),
                ("PRISM_RELAY_CLICKHOUSE_URL", "http://env:8123"),
            ]),
        )
        .expect("loads");
        assert_eq!(config.clickhouse.ttl_days, None);
        assert_eq!(config.clickhouse.url, "http://env:8123");
    }

    #[test]
    fn secrets_in_the_file_are_refused_naming_each_field_and_its_fix_without_showing_them() {
        const SECRET: &str = "Zq7MarkerSecretXy";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        let files = [
            (
                format!("[nats]\nuser = \"alice\"\npassword = \"{SECRET}\"\n"),
                "nats.password",
                "PRISM_RELAY_NATS_PASSWORD",
            ),
            (
                format!("[nats]\ntoken = \"{SECRET}\"\n"),
                "nats.token",
                "nats.token_file",
            ),
            (
                format!("[nats]\nurl = \"nats://alice:{SECRET}@127.0.0.1:4222\"\n"),
                "nats.url",
                "PRISM_RELAY_NATS_URL",
            ),
            (
                format!("[nats]\nurl = \"nats://a:4222,tls://{SECRET}@b:4222\"\n"),
                "nats.url",
                "PRISM_RELAY_NATS_URL",
            ),
            (
                format!("[clickhouse]\npassword = \"{SECRET}\"\n"),
                "clickhouse.password",
                "clickhouse.password_file",
            ),
            (
                format!("[clickhouse]\nurl = \"http://default:{SECRET}@127.0.0.1:8123\"\n"),
                "clickhouse.url",
                "PRISM_RELAY_CLICKHOUSE_URL",
            ),
        ];
        for (text, field, fix) in files {
            std::fs::write(&path, &text).expect("write");
            let err = Config::load_with_env(Some(&path), Vec::new()).expect_err(field);
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(
                matches!(err, ConfigError::SecretInFile { .. }),
                "{field}: {shown}"
            );
            assert_eq!(err.invalid_values()[0].field, field, "{shown}");
            assert!(shown.contains(fix), "{field}: {shown}");
        }
        // A user name in a ClickHouse URL and an empty password are no secrets.
        std::fs::write(
            &path,
            "[clickhouse]\nurl = \"http://default@127.0.0.1:8123\"\npassword = \"\"\n",
        )
        .expect("write");
        Config::load_with_env(Some(&path), Vec::new()).expect("no secret in the file");
    }

    #[test]
    fn secrets_from_the_environment_and_from_files_are_allowed_next_to_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        let password = dir.path().join("password");
        std::fs::write(&password, "from-a-file\n").expect("write");
        std::fs::write(
            &path,
            format!(
                "[clickhouse]\npassword_file = {:?}\n",
                password.display().to_string()
            ),
        )
        .expect("write");
        let config = Config::load_with_env(
            Some(&path),
            env(&[
                (
                    "PRISM_RELAY_NATS_URL",
                    "nats://alice:from-env@127.0.0.1:4222",
                ),
                ("PRISM_RELAY_NATS_USER", ""),
            ]),
        )
        .expect("loads");
        assert_eq!(config.clickhouse.password, "from-a-file");
        assert_eq!(config.nats.url, "nats://alice:from-env@127.0.0.1:4222");
    }

    #[test]
    fn loading_registers_every_secret_so_redaction_hides_it_outside_urls_and_assignments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "Tok/File@Zq7\n").expect("write");
        let token_var = token.display().to_string();
        let text = |secrets: &[&str]| format!("server said: bad credentials {}", secrets.join(" "));
        let secrets = ["Tok/File@Zq7", "Ch/Env@Zq7", "Url/Pw@Zq7"];
        let shown = redact(&text(&secrets)).into_owned();
        assert!(
            shown.contains("Tok/File@Zq7"),
            "not hidden before loading: {shown}"
        );
        Config::load_with_env(
            None,
            env(&[
                ("PRISM_RELAY_NATS_TOKEN_FILE", token_var.as_str()),
                ("PRISM_RELAY_CLICKHOUSE_PASSWORD", "Ch/Env@Zq7"),
                (
                    "PRISM_RELAY_CLICKHOUSE_URL",
                    "http://default:Url/Pw@Zq7@127.0.0.1:8123",
                ),
            ]),
        )
        .expect("loads");
        let shown = redact(&text(&secrets)).into_owned();
        for secret in secrets {
            assert!(!shown.contains(secret), "{secret}: {shown}");
        }
    }

    #[test]
    fn a_validation_error_quoting_a_url_hides_a_password_the_url_pattern_cannot_find() {
        const SECRET: &str = "Zq7Odd/Pass@word";
        let err = Config::load_with_env(
            None,
            env(&[(
                "PRISM_RELAY_CLICKHOUSE_URL",
                "tcp://default:Zq7Odd/Pass@word@127.0.0.1:9000",
            )]),
        )
        .expect_err("not an HTTP URL");
        let text = err.to_string();
        assert!(text.contains("clickhouse.url"), "{text}");
        assert!(!text.contains("Zq7Odd") && !text.contains(SECRET), "{text}");
    }

    #[test]
    fn every_listed_environment_override_is_accepted() {
        for (section, field) in ENV_OVERRIDES {
            let mut config = Config::default();
            let var = env_var_name(section, field);
            let result = config.apply_env(env(&[(&var, "")]));
            // Numbers reject "", strings accept it; what matters is that no listed name is unknown.
            assert!(
                !matches!(result, Err(ConfigError::UnknownEnv { .. })),
                "{var} is listed but not applied"
            );
        }
    }

    #[test]
    fn unknown_environment_field_is_rejected_naming_it() {
        let err = Config::load_with_env(None, env(&[("PRISM_RELAY_NATS_URLS", "nats://x")]))
            .expect_err("unknown field");
        let text = err.to_string();
        assert!(text.contains("PRISM_RELAY_NATS_URLS"), "{text}");
        assert!(
            text.contains("PRISM_RELAY_NATS_URL"),
            "lists the known ones: {text}"
        );
    }

    #[test]
    fn unparsable_environment_value_is_rejected_naming_the_variable() {
        let err = Config::load_with_env(
            None,
            env(&[("PRISM_RELAY_SHUTDOWN_TIMEOUT_MS", "ten seconds")]),
        )
        .expect_err("not a number");
        assert!(
            err.to_string().contains("PRISM_RELAY_SHUTDOWN_TIMEOUT_MS"),
            "{err}"
        );
        let err = Config::load_with_env(None, env(&[("PRISM_RELAY_WAL_RECOVERY_MODE", "lenient")]))
            .expect_err("not a mode");
        assert!(
            err.to_string().contains("PRISM_RELAY_WAL_RECOVERY_MODE"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_in_the_file_is_rejected_naming_it() {
        let err = Config::parse_toml("[[consumer]]\nfetch_bach = 10\n").expect_err("unknown");
        assert!(err.to_string().contains("fetch_bach"), "{err}");
        let err = Config::parse_toml("[nats]\nurll = \"x\"\n").expect_err("unknown");
        assert!(err.to_string().contains("urll"), "{err}");
        let err = Config::parse_toml("[drain.tables.trades]\nrow_max = 1\n").expect_err("unknown");
        assert!(err.to_string().contains("row_max"), "{err}");
        let err = Config::parse_toml("[sink]\n").expect_err("unknown section");
        assert!(err.to_string().contains("sink"), "{err}");
    }

    #[test]
    fn out_of_range_value_is_rejected_with_field_path_value_range_and_fix() {
        let config = Config::parse_toml(
            "[[consumer]]\ndurable = \"a\"\n[[consumer]]\ndurable = \"b\"\nfetch_batch = 0\n",
        )
        .expect("parses");
        let err = config.validate().expect_err("fetch_batch 0");
        let values = err.invalid_values();
        assert_eq!(values.len(), 1, "{err}");
        assert_eq!(values[0].field, "consumer[1].fetch_batch");
        assert_eq!(values[0].value, "0");
        assert_eq!(values[0].allowed, "1 ..= 10000 messages");
        assert!(
            values[0].fix.contains("raise fetch_batch"),
            "{}",
            values[0].fix
        );
        let text = err.to_string();
        assert!(text.contains("consumer[1].fetch_batch = 0"), "{text}");
    }

    #[test]
    fn each_kind_of_invalid_value_is_rejected_naming_the_field() {
        type Case = (&'static str, fn(&mut Config));
        let cases: Vec<Case> = vec![
            ("nats.url", |c| c.nats.url = "http://127.0.0.1:4222".into()),
            ("nats.connect_timeout_ms", |c| c.nats.connect_timeout_ms = 0),
            ("nats.request_timeout_ms", |c| {
                c.nats.request_timeout_ms = 1_000_000
            }),
            ("nats.password", |c| c.nats.user = Some("u".into())),
            ("nats", |c| {
                c.nats.token = Some("t".into());
                c.nats.creds_file = Some("x.creds".into());
            }),
            ("stream[0].name", |c| {
                c.stream.push(stream("MARKET.TRADES", "trade.>"))
            }),
            ("stream[0].name", |c| {
                c.stream.push(stream("ORDERBOOK_SNAP", "orderbook.>"))
            }),
            ("stream[0].subjects[0]", |c| {
                c.stream.push(stream("S", "trade.>.x"))
            }),
            ("stream[0].subjects", |c| {
                let mut s = stream("S", "x");
                s.subjects.clear();
                c.stream.push(s);
            }),
            ("stream[0].max_age_s", |c| {
                let mut s = stream("S", "x.>");
                s.max_age_s = 5;
                c.stream.push(s);
            }),
            ("stream[0].max_bytes", |c| {
                let mut s = stream("S", "x.>");
                s.max_bytes = 0;
                c.stream.push(s);
            }),
            ("stream[0].max_msgs", |c| {
                let mut s = stream("S", "x.>");
                s.max_msgs = -5;
                c.stream.push(s);
            }),
            ("stream[0].duplicate_window_s", |c| {
                let mut s = stream("S", "x.>");
                s.max_age_s = 60;
                s.duplicate_window_s = 120;
                c.stream.push(s);
            }),
            ("stream[0].replicas", |c| {
                let mut s = stream("S", "x.>");
                s.replicas = 0;
                c.stream.push(s);
            }),
            ("stream[1].name", |c| {
                c.stream.push(stream("S", "x.>"));
                c.stream.push(stream("S", "y.>"));
            }),
            ("consumer[0].durable", |c| {
                c.consumer[0].durable = "a b".into()
            }),
            ("consumer[0].stream", |c| {
                c.consumer[0].stream = String::new()
            }),
            ("consumer[0].filter_subjects[1]", |c| {
                c.consumer[0].filter_subjects = vec!["trade.>".into(), "trade.>".into()]
            }),
            ("consumer[0].filter_subjects[0]", |c| {
                c.consumer[0].filter_subjects = vec!["trade..x".into()]
            }),
            ("consumer[0].start_sequence", |c| {
                c.consumer[0].deliver_policy = DeliverPolicyKind::ByStartSequence
            }),
            ("consumer[0].start_sequence", |c| {
                c.consumer[0].start_sequence = Some(5)
            }),
            ("consumer[0].ack_wait_ms", |c| {
                c.consumer[0].ack_wait_ms = 10
            }),
            ("consumer[0].max_ack_pending", |c| {
                c.consumer[0].max_ack_pending = 0;
            }),
            ("consumer[0].max_deliver", |c| c.consumer[0].max_deliver = 3),
            ("consumer[0].fetch_batch", |c| {
                c.consumer[0].fetch_batch = 50_000
            }),
            ("consumer[0].fetch_batch", |c| {
                c.consumer[0].max_ack_pending = 10
            }),
            ("consumer[0].fetch_bytes_max", |c| {
                c.consumer[0].fetch_bytes_max = 1024
            }),
            ("consumer[0].fetch_expires_ms", |c| {
                c.consumer[0].fetch_expires_ms = 10
            }),
            ("consumer[0].fetch_expires_ms", |c| {
                c.consumer[0].ack_wait_ms = 2_000;
                c.consumer[0].fetch_expires_ms = 5_000;
            }),
            ("consumer[1].durable", |c| {
                c.consumer.push(ConsumerConfig::default())
            }),
            ("wal.dir", |c| c.wal.dir = PathBuf::new()),
            ("wal.segment_bytes_max", |c| c.wal.segment_bytes_max = 1),
            ("wal.group_bytes_max", |c| c.wal.group_bytes_max = 128 * MIB),
            ("wal.budget_bytes_max", |c| {
                c.wal.budget_bytes_max = 100 * MIB
            }),
            ("wal.retention_bytes_max", |c| {
                c.wal.retention_bytes_max = 8 * GIB
            }),
            ("wal.retention_segments_max", |c| {
                c.wal.retention_segments_max = u32::MAX
            }),
            ("wal.retention_age_s", |c| c.wal.retention_age_s = u64::MAX),
            ("clickhouse.url", |c| {
                c.clickhouse.url = "tcp://127.0.0.1:9000".into()
            }),
            ("clickhouse.database", |c| {
                c.clickhouse.database = "market-prism".into()
            }),
            ("clickhouse.insert_timeout_ms", |c| {
                c.clickhouse.insert_timeout_ms = 0
            }),
            ("clickhouse.connect_timeout_ms", |c| {
                c.clickhouse.connect_timeout_ms = 0
            }),
            ("clickhouse.ttl_days", |c| c.clickhouse.ttl_days = Some(0)),
            ("clickhouse.ttl_days", |c| {
                c.clickhouse.ttl_days = Some(3);
                c.clickhouse.profile = ClickHouseProfile::Legacy;
            }),
            ("drain.flush_interval_ms", |c| c.drain.flush_interval_ms = 0),
            ("drain.retry_backoff_initial_ms", |c| {
                c.drain.retry_backoff_initial_ms = 0
            }),
            ("drain.retry_backoff_max_ms", |c| {
                c.drain.retry_backoff_max_ms = 50
            }),
            ("drain.dead_letter_table", |c| {
                c.drain.dead_letter_table = "1bad".into()
            }),
            ("drain.tables.trades.rows_max", |c| {
                c.drain.tables.get_mut("trades").unwrap().rows_max = 0
            }),
            ("drain.tables.orderbooks.bytes_max", |c| {
                c.drain.tables.get_mut("orderbooks").unwrap().bytes_max = 10
            }),
            ("drain.tables.liquidations.flush_interval_ms", |c| {
                c.drain
                    .tables
                    .get_mut("liquidations")
                    .unwrap()
                    .flush_interval_ms = 0
            }),
            ("drain.tables.trade", |c| {
                c.drain.tables.insert("trade".into(), TableBatch::TRADES);
            }),
            ("drain.passthrough[0].data_type", |c| {
                c.drain.passthrough.push(route("trade", "raw_trades"))
            }),
            ("drain.passthrough[0].data_type", |c| {
                c.drain.passthrough.push(route("ticker.x", "tickers"))
            }),
            ("drain.passthrough[1].data_type", |c| {
                c.drain.passthrough.push(route("ticker", "tickers"));
                c.drain.passthrough.push(route("ticker", "tickers2"));
            }),
            ("drain.passthrough[0].table", |c| {
                c.drain.passthrough.push(route("ticker", "trades"))
            }),
            ("shutdown.timeout_ms", |c| c.shutdown.timeout_ms = 1),
            ("metrics.connections_max", |c| c.metrics.connections_max = 0),
            ("metrics.header_read_timeout_ms", |c| {
                c.metrics.header_read_timeout_ms = 0
            }),
            ("metrics.request_timeout_ms", |c| {
                c.metrics.header_read_timeout_ms = 20_000;
                c.metrics.request_timeout_ms = 10_000;
            }),
            ("metrics.ready_insert_failing_s", |c| {
                c.metrics.ready_insert_failing_s = 0
            }),
            ("metrics.backlog_poll_interval_s", |c| {
                c.metrics.backlog_poll_interval_s = 0
            }),
        ];
        for (field, mutate) in cases {
            let mut config = Config::default();
            mutate(&mut config);
            let fields = invalid_fields(&config);
            assert!(
                fields.iter().any(|f| f == field),
                "expected {field} to be rejected, got {fields:?}"
            );
        }
    }

    #[test]
    fn valid_edge_values_are_accepted() {
        let mut config = Config::default();
        config.stream.push(StreamConfig {
            max_age_s: 0,
            max_bytes: -1,
            max_msgs: -1,
            ..stream("MARKET_TRADES", "trade.>")
        });
        config.consumer[0].deliver_policy = DeliverPolicyKind::ByStartSequence;
        config.consumer[0].start_sequence = Some(1);
        config.consumer[0].max_deliver = CONSUMER_MAX_DELIVER_MIN;
        config.consumer[0].ack_policy = AckPolicyKind::All;
        config.nats.user = Some("u".into());
        config.nats.password = Some("p".into());
        config.nats.url = "nats://a:4222, tls://b:4222,127.0.0.1:4222".into();
        config.drain.passthrough.push(route("ticker", "tickers"));
        config
            .drain
            .tables
            .insert("tickers".into(), TableBatch::LOW_FREQUENCY);
        assert_eq!(invalid_fields(&config), Vec::<String>::new());
    }

    #[test]
    fn partial_table_limits_keep_that_tables_other_defaults() {
        let config =
            Config::parse_toml("[drain.tables.orderbooks]\nrows_max = 100\n").expect("parses");
        let books = config.drain.table_batch("orderbooks");
        assert_eq!(books.rows_max, 100);
        assert_eq!(books.bytes_max, TableBatch::ORDERBOOKS.bytes_max);
        assert_eq!(config.drain.table_batch("trades"), TableBatch::TRADES);
        assert_eq!(
            config.drain.table_batch("tickers"),
            TableBatch::LOW_FREQUENCY
        );
        assert_eq!(config.drain.tables.len(), TYPED_TABLES.len());
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let mut config = Config::default();
        config.consumer[0].fetch_batch = 0;
        config.shutdown.timeout_ms = 0;
        config.wal.segment_bytes_max = 0;
        let err = config.validate().expect_err("three problems");
        assert!(err.invalid_values().len() >= 3, "{err}");
    }

    #[test]
    fn redacted_config_hides_secrets() {
        let mut config = Config::default();
        config.nats.token = Some("tok".into());
        config.clickhouse.password = "pw".into();
        let shown = toml::to_string(&config.redacted()).expect("serializes");
        assert!(
            !shown.contains("tok\"") && !shown.contains("\"pw\""),
            "{shown}"
        );
    }

    #[test]
    fn debug_output_of_the_configuration_hides_passwords_tokens_and_url_credentials() {
        const SECRET: &str = "Zq7MarkerSecretXy";
        let mut config = Config::default();
        config.nats.url = format!("nats://alice:{SECRET}@127.0.0.1:4222");
        config.nats.user = Some("alice".into());
        config.nats.password = Some(SECRET.into());
        config.clickhouse.url = format!("http://default:{SECRET}@127.0.0.1:8123");
        config.clickhouse.password = SECRET.into();
        let shown = format!("{config:?} {:?} {:?}", config.nats, config.clickhouse);
        assert!(!shown.contains(SECRET), "{shown}");
        config.nats.user = None;
        config.nats.password = None;
        config.nats.token = Some(SECRET.into());
        let shown = format!("{config:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(
            shown.contains("127.0.0.1:4222"),
            "the rest stays visible: {shown}"
        );
    }

    #[test]
    fn validation_errors_about_urls_holding_a_password_do_not_show_the_password() {
        const SECRET: &str = "Zq7MarkerSecretXy";
        let mut config = Config::default();
        config.nats.url = format!("http://alice:{SECRET}@127.0.0.1:4222");
        config.clickhouse.url = format!("tcp://default:{SECRET}@127.0.0.1:9000");
        let err = config.validate().expect_err("both URLs are invalid");
        let text = err.to_string();
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            text.contains("nats.url") && text.contains("clickhouse.url"),
            "{text}"
        );
    }

    #[test]
    fn a_table_name_that_collides_with_the_unrouted_lane_or_a_data_table_is_rejected_by_name() {
        let mut config = Config::default();
        config.drain.passthrough.push(route("ticker", "_unrouted"));
        assert!(
            invalid_fields(&config).contains(&"drain.passthrough[0].table".to_owned()),
            "{:?}",
            invalid_fields(&config)
        );
        for table in ["_unrouted", "trades"] {
            let mut config = Config::default();
            config.drain.dead_letter_table = table.into();
            assert!(
                invalid_fields(&config).contains(&"drain.dead_letter_table".to_owned()),
                "{table}: {:?}",
                invalid_fields(&config)
            );
        }
    }

    fn stream(name: &str, subject: &str) -> StreamConfig {
        StreamConfig {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            ..StreamConfig::default()
        }
    }

    fn route(data_type: &str, table: &str) -> PassthroughRoute {
        PassthroughRoute {
            data_type: data_type.to_owned(),
            table: table.to_owned(),
        }
    }
}
