//! The configuration model: the sections and fields, their `Default`s (the documented defaults),
//! the enums the file spells in snake_case, the serde helpers of single fields, and the `Debug`
//! impls that keep secrets out of logs.
//!
//! It is separate from loading, environment overrides and validation so that the shape of the
//! file and its defaults read in one place; the other parts only read or set these values.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::limits::{GIB, MIB};
use crate::redact::{redact, REDACTED};

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
    /// Log output.
    pub log: LogConfig,
    /// The online audit of acknowledged messages.
    pub audit: AuditConfig,
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
            log: LogConfig::default(),
            audit: AuditConfig::default(),
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
    /// File holding an NKey user seed (`SU...`; exclusive with the other methods).
    pub nkey_file: Option<PathBuf>,
    /// The seed read from `nkey_file` at load; never in the file itself.
    #[serde(skip)]
    pub nkey_seed: Option<String>,
    /// Connect over TLS even with `nats://` URLs (a `tls://` URL or any `tls_*_file` implies it).
    pub tls_required: bool,
    /// PEM file with the CA certificates that sign the server's certificate (default: the
    /// system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file with a client certificate to present, with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the client certificate's private key, with `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl NatsConfig {
    /// Whether the connection must use TLS: asked for, or TLS files given (which would be
    /// ignored on a plain connection).
    pub fn tls_wanted(&self) -> bool {
        self.tls_required
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some()
    }
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
            .field("nkey_file", &self.nkey_file)
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| REDACTED))
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
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
            nkey_file: None,
            nkey_seed: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
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
    /// After a pull that came back with fewer than `fetch_batch` messages (the consumer caught
    /// up), wait until the next multiple of this, in milliseconds, on a clock the process's
    /// consumers share, before the next pull, so that it carries more messages per WAL fsync and
    /// ack round instead of one or two, and caught-up consumers pull together. 0 pulls again at
    /// once. Default 50.
    pub fetch_linger_ms: u64,
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
            fetch_linger_ms: 50,
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
    /// ClickHouse 22.2 and newer (`schema::SERVER_VERSIONS`): DateTime64, LowCardinality, codecs,
    /// deduplication tokens.
    Modern,
    /// ClickHouse 18.16 and newer: Int64 milliseconds, String, no codecs, no TTL.
    Legacy,
    /// Chosen at start-up from `SELECT version()` (default).
    Auto,
}

/// Whether insert bodies are LZ4-compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionKind {
    /// LZ4 unless the URL's host is a loopback address or `localhost` (default): on loopback
    /// compression saves no bandwidth and costs CPU on both ends.
    Auto,
    /// Always LZ4.
    Lz4,
    /// Never.
    None,
}

impl CompressionKind {
    /// Whether insert bodies sent to the ClickHouse at `url` are compressed.
    pub fn compresses(self, url: &str) -> bool {
        match self {
            CompressionKind::Auto => !crate::sink::is_loopback_url(url),
            CompressionKind::Lz4 => true,
            CompressionKind::None => false,
        }
    }
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
    /// LZ4 for insert bodies: auto (default), lz4 or none.
    pub compression: CompressionKind,
    /// Apply the DDL (CREATE ... IF NOT EXISTS) at start-up. Default false.
    pub create_schema: bool,
    /// Row TTL of created tables, in days; none by default. Modern profile only.
    pub ttl_days: Option<u32>,
    /// PEM file with the CA certificates that sign the server's certificate, for an `https://`
    /// URL (default: the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file with a client certificate to present, with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the client certificate's private key, with `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,

    /// Asynchronous inserts (`async_insert=1, wait_for_async_insert=1`), for fleets of many
    /// relays inserting into one cluster. Default false. Modern profile only.
    pub async_insert: bool,

    /// The ClickHouse cluster (a name in the servers' `<remote_servers>`) the schema is created
    /// on: replicated tables `ON CLUSTER`, read through `<table>_all`. None by default (one
    /// server); required by `schema print|apply --profile cluster`.
    pub cluster: Option<String>,
    /// ZooKeeper path of each replicated table (with `cluster`); `{database}` and `{table}` are
    /// replaced by the relay, `{shard}` and other macros by the server. Default
    /// `schema::ZOOKEEPER_PATH_DEFAULT`.
    pub zookeeper_path: String,
    /// HTTP(S) endpoints of the cluster's other replicas that `check` also verifies (with
    /// `cluster`); the relay itself inserts only into `url`. Empty by default.
    pub replica_urls: Vec<String>,
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
            compression: CompressionKind::Auto,
            create_schema: false,
            ttl_days: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,

            async_insert: false,

            cluster: None,
            zookeeper_path: crate::schema::ZOOKEEPER_PATH_DEFAULT.to_owned(),
            replica_urls: Vec::new(),
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
            .field("compression", &self.compression)
            .field("create_schema", &self.create_schema)
            .field("ttl_days", &self.ttl_days)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("async_insert", &self.async_insert)
            .field("cluster", &self.cluster)
            .field("zookeeper_path", &self.zookeeper_path)
            .field(
                "replica_urls",
                &self
                    .replica_urls
                    .iter()
                    .map(|url| redact(url))
                    .collect::<Vec<_>>(),
            )
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
    /// A batch is flushed at the latest this long after its first row, in milliseconds: at the
    /// last multiple of half of it, on a clock the lanes share, so between half of it and all of
    /// it after its first row (`drain::batch::flush_due`).
    pub flush_interval_ms: u64,
}

impl TableBatch {
    // In a backlog every cut is a part ClickHouse writes and merges again, so each typed table's
    // rows_max is about the most rows of its largest MarketPrism payload that its bytes_max holds
    // (a test checks that bytes_max is not reached first). bytes_max bounds a lane's memory and
    // is what sets the size; rows_max at 2,000 order books and 10,000 trades cost ClickHouse
    // 18.16 about twice the CPU per row in a backlog drain (docs/PERFORMANCE.md).

    /// Defaults of the trades table: the busiest small-row table.
    pub const TRADES: TableBatch = TableBatch {
        rows_max: 16_000,
        bytes_max: 8 * MIB,
        flush_interval_ms: 1_000,
    };
    /// Defaults of the orderbooks table: few, large rows.
    pub const ORDERBOOKS: TableBatch = TableBatch {
        rows_max: 4_500,
        bytes_max: 32 * MIB,
        flush_interval_ms: 1_000,
    };
    /// Defaults of the six low-frequency tables, and of passthrough tables. At their steady rates
    /// (a row per market every 10 s to 5 min) a batch goes for its age long before any limit; the
    /// limits count in a backlog, so they are as large as the trades': 500-row batches made a
    /// backlog of these tables cost ClickHouse 20 to 50 ms of CPU per 500 rows
    /// (docs/PERFORMANCE.md).
    pub const LOW_FREQUENCY: TableBatch = TableBatch {
        rows_max: 16_000,
        bytes_max: 8 * MIB,
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
    /// Seconds between two one-line status logs (rates in and out, backlog, WAL use) at info
    /// level; 0 turns them off. Default 60.
    pub status_interval_s: u64,
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
            status_interval_s: 60,
        }
    }
}

/// `[shutdown]`: graceful shutdown on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Stop fetching, fsync, ack and flush within this, in milliseconds; then exit. Default 10,000.
    pub timeout_ms: u64,
    /// Drain before exit: after fetching stopped, each lane keeps inserting until it reaches the
    /// WAL's durable end (or `timeout_ms` runs out), so a relay stopped for good leaves nothing
    /// in its WAL. Off by default: a restart or an upgrade stops quickly and the next start
    /// drains the WAL.
    pub drain: bool,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout_ms: 10_000,
            drain: false,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines when standard error is a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines (default: what operators and scripts of earlier versions read).
    Human,
    /// One JSON object per line, with the span fields (consumer, table) of each event.
    Json,
}

/// `[log]`: log output. The level comes from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// human (default), json or auto; the `--log-format` flag wins over it.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
        }
    }
}

/// `[audit]`: the online audit that samples acknowledged messages and confirms they reached
/// ClickHouse (see `crate::audit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Whether the audit runs. Default true.
    pub enabled: bool,
    /// One WAL record in this many is sampled. Default 1,000.
    pub sample_every_records: u64,
    /// How often due samples are looked up, in milliseconds. Default 10,000.
    pub interval_ms: u64,
    /// Samples waiting for their table's drain, at most. Default 10,000.
    pub pending_max: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            sample_every_records: crate::audit::SAMPLE_EVERY_RECORDS_DEFAULT,
            interval_ms: crate::audit::INTERVAL_MS_DEFAULT,
            pending_max: crate::audit::PENDING_MAX_DEFAULT as u64,
        }
    }
}
