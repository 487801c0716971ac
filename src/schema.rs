//! ClickHouse DDL for the relay's tables, and the start-up check that they can take its rows.
//!
//! Two profiles render the same columns (see `codec::rows` for their RowBinary encodings):
//! Which server versions each profile supports is stated once, in [`SERVER_VERSIONS`] (and in
//! docs/OPERATIONS.md, "Supported ClickHouse versions"):
//! - [`Profile::Modern`] (ClickHouse 22.2 and newer): `DateTime64(3,'UTC')`,
//!   `LowCardinality(String)`, `Decimal64(8)`, `Bool`, column codecs, an optional TTL,
//!   `ReplacingMergeTree` with `non_replicated_deduplication_window` so retried batches carrying
//!   the same `insert_deduplication_token` are dropped by the server;
//! - [`Profile::Legacy`] (ClickHouse 18.16 and newer, what Debian ships): `Int64` milliseconds for
//!   `DateTime64`, `String` for `LowCardinality(String)`, `UInt8` for `Bool`, no codecs, no TTL,
//!   no deduplication window; `ReplacingMergeTree()` with the custom-partitioning syntax.
//!
//! Every data table is `ReplacingMergeTree`, `PARTITION BY` the month of `timestamp`, `ORDER BY`
//! its natural identity with `market_type` (MarketPrism's own keys lack it, so spot and
//! perpetual rows of one symbol would collapse). The `dead_letters` table keeps what could not
//! be stored, keyed by message identity. `created_at` is filled by the server (`DEFAULT`);
//! the relay never writes it.
//!
//! Columns beyond MarketPrism's own tables: `nats_stream` and `nats_seq` on every table (the
//! message identity), `long_short_ratio` on both `lsr_*` tables, and `liquidation_id` on
//! `liquidations` (part of its key); `codec::rows` says why for each.
//!
//! Passthrough tables (`[[drain.passthrough]]`) get [`passthrough_ddl`]: the identity, the publish
//! time and the payload as a string, keyed by the identity, so their rows are as idempotent as
//! typed ones; [`check_passthrough_columns`] requires the identity on an existing one.
//!
//! The cluster layout ([`Cluster`], `[clickhouse] cluster`) renders either profile for a ClickHouse
//! cluster of replicated tables coordinated by ZooKeeper: every statement runs `ON CLUSTER`, each
//! table `<table>` is a `ReplicatedReplacingMergeTree` under [`Cluster::zookeeper_path`] with the
//! `{replica}` macro, with the same columns, partitioning and `ORDER BY` (no version column, as
//! in the single-server tables), and `<table>_all` ([`DISTRIBUTED_SUFFIX`]) is a `Distributed`
//! table over it for reads. The relay inserts into the local replicated table `<table>`: the
//! names it writes stay the same in both layouts, and a replicated table deduplicates a
//! re-sent batch by itself (by its token on modern servers; on 18.16 by the stored block's hash,
//! which holds the server-filled `created_at`, so only a copy sent within the same second),
//! which an insert through a `Distributed` table (re-batched and forwarded asynchronously) would
//! not guarantee.
//!
//! [`check_columns`] compares a table's columns (from `system.columns`) with what the relay
//! inserts and accepts any type with the same RowBinary encoding, so tables created by either
//! profile, or by MarketPrism's own scripts with compatible types, pass.

use std::fmt::Write as _;

use crate::codec::Table;

/// The name of the dead-letter table.
pub const DEAD_LETTERS_TABLE: &str = "dead_letters";

/// The default database, MarketPrism's hot store.
pub const DATABASE_DEFAULT: &str = "marketprism_hot";

/// Blocks of recent inserts each table remembers for deduplication (modern profile). A retried
/// batch is recognised while fewer than this many other inserts have reached the table since.
pub const DEDUPLICATION_WINDOW_BLOCKS: u32 = 1000;

/// The oldest server the modern profile targets, as (major, minor): `DateTime64` exists since
/// 20.1, async inserts since 21.11, `Bool` since 21.12, and `insert_deduplication_token` (with
/// `non_replicated_deduplication_window` the relay's retries depend on) since 22.2. Older servers
/// get the legacy profile, whose DDL they all accept.
pub const MODERN_SERVER_VERSION_MIN: (u32, u32) = (22, 2);

/// The oldest server the legacy profile is tested on, as (major, minor): the server Debian
/// installs. Its DDL (`ReplacingMergeTree()` with custom partitioning) is accepted by every later
/// server too.
pub const LEGACY_SERVER_VERSION_MIN: (u32, u32) = (18, 16);

/// The oldest server with asynchronous inserts (`async_insert`, `wait_for_async_insert`), as
/// (major, minor); older than [`MODERN_SERVER_VERSION_MIN`], so every modern server has them.
pub const ASYNC_INSERT_SERVER_VERSION_MIN: (u32, u32) = (21, 11);

/// The supported ClickHouse versions, stated once: per profile, the oldest server it supports
/// and what it needs from the server (the version that brought each need, where it sets the
/// floor). `docs/OPERATIONS.md` repeats this table; `check` and `run` report a server older
/// than the chosen profile's floor ([`check_server_version`]).
pub const SERVER_VERSIONS: [(Profile, (u32, u32), &str); 2] = [
    (
        Profile::Legacy,
        LEGACY_SERVER_VERSION_MIN,
        "ReplacingMergeTree with PARTITION BY; Int64 milliseconds, UInt8 booleans; no settings \
         beyond input_format_skip_unknown_fields",
    ),
    (
        Profile::Modern,
        MODERN_SERVER_VERSION_MIN,
        "DateTime64(3, 'UTC') (20.1), Bool (21.12), insert_deduplication_token (22.2), the \
         MergeTree setting non_replicated_deduplication_window, RowBinaryWithNamesAndTypes for \
         row validation; async_insert with wait_for_async_insert (21.11) when \
         [clickhouse] async_insert = true",
    ),
];

/// What a server's version says it lacks for `profile` (and for `async_insert`): empty when it
/// has everything. A version that does not parse is taken at its word (no finding): `auto`
/// already gave it the legacy profile.
pub fn check_server_version(
    version: &str,
    profile: Profile,
    async_insert: bool,
) -> Vec<SchemaError> {
    let mut findings = Vec::new();
    let parsed = parse_version(version);
    for (p, min, needs) in SERVER_VERSIONS {
        if p == profile && parsed.is_some_and(|v| v < min) {
            findings.push(SchemaError::ServerTooOld {
                version: version.trim().to_owned(),
                profile: profile.name().to_owned(),
                min: format!("{}.{}", min.0, min.1),
                needs: needs.to_owned(),
            });
        }
    }
    if async_insert && profile == Profile::Legacy {
        findings.push(SchemaError::AsyncInsertNeedsModern {
            version: version.trim().to_owned(),
        });
    }
    findings
}

/// (major, minor) of a `SELECT version()` answer such as `23.8.16.40`.
fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    }
}

/// The supported ClickHouse versions in one line, used by `--version`, the help of `--profile`
/// and the messages that name a version; [`SERVER_VERSIONS`] holds the details and
/// docs/OPERATIONS.md ("Supported ClickHouse versions") says the same in more words (a test keeps
/// the floors in it).
pub const SERVER_VERSIONS_SUMMARY: &str =
    "modern: ClickHouse 22.2 and newer (MarketPrism runs 23.8+); \
     legacy: ClickHouse 18.16 and newer";

/// The suffix of each table's `Distributed` table in the cluster layout: `trades_all` reads
/// `trades` on every shard of the cluster.
pub const DISTRIBUTED_SUFFIX: &str = "_all";

/// The default ZooKeeper path of a replicated table. `{database}` and `{table}` are replaced by
/// the relay when it renders the DDL (ClickHouse 18.16 does not expand them itself); `{shard}`
/// and every other macro are the server's (`<macros>` in its configuration), so the replicas of
/// one shard share the path and the shards of a cluster do not.
pub const ZOOKEEPER_PATH_DEFAULT: &str = "/clickhouse/tables/{shard}/{database}/{table}";

/// The replica name of every replicated table: the server's `{replica}` macro, so one DDL text
/// fits every replica.
pub const REPLICA_NAME_MACRO: &str = "{replica}";

/// A ClickHouse cluster the schema is created on (`[clickhouse] cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The cluster's name in the servers' `<remote_servers>`.
    pub name: String,
    /// The ZooKeeper path of each replicated table, with `{database}` and `{table}` replaced
    /// by the relay and the server's macros (`{shard}`) left to the server.
    pub zookeeper_path: String,
}

impl Cluster {
    /// The ZooKeeper path of `table` in `database`.
    pub fn table_path(&self, database: &str, table: &str) -> String {
        self.zookeeper_path
            .replace("{database}", database)
            .replace("{table}", table)
    }
}

/// The name of `table`'s `Distributed` table in the cluster layout.
pub fn distributed_name(table: &str) -> String {
    format!("{table}{DISTRIBUTED_SUFFIX}")
}

/// Which DDL dialect and column types to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// ClickHouse [`MODERN_SERVER_VERSION_MIN`] and newer.
    Modern,
    /// ClickHouse [`LEGACY_SERVER_VERSION_MIN`] and newer (`auto` picks it below
    /// [`MODERN_SERVER_VERSION_MIN`]).
    Legacy,
}

/// The profile as configured: fixed, or picked from the server's `SELECT version()`.
/// Spelled `modern`, `legacy` or `auto` in config files and on the command line.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ProfileChoice {
    Modern,
    Legacy,
    #[default]
    Auto,
}

/// A profile name that is not `modern`, `legacy` or `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown schema profile `{0}` (expected modern, legacy or auto)")]
pub struct UnknownProfile(pub String);

impl std::str::FromStr for ProfileChoice {
    type Err = UnknownProfile;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "modern" => Ok(ProfileChoice::Modern),
            "legacy" => Ok(ProfileChoice::Legacy),
            "auto" => Ok(ProfileChoice::Auto),
            other => Err(UnknownProfile(other.to_owned())),
        }
    }
}

impl std::fmt::Display for ProfileChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProfileChoice::Modern => "modern",
            ProfileChoice::Legacy => "legacy",
            ProfileChoice::Auto => "auto",
        })
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl ProfileChoice {
    /// The profile to use, given the server version when one is known. `Auto` without a version
    /// is legacy, whose DDL every server accepts.
    pub fn resolve(self, server_version: Option<&str>) -> Profile {
        match self {
            ProfileChoice::Modern => Profile::Modern,
            ProfileChoice::Legacy => Profile::Legacy,
            ProfileChoice::Auto => {
                server_version.map_or(Profile::Legacy, Profile::for_server_version)
            }
        }
    }
}

impl Profile {
    /// The profile for a `SELECT version()` answer such as `23.8.16.40` or `18.16.1`.
    /// A version that does not parse gets [`Profile::Legacy`].
    pub fn for_server_version(version: &str) -> Profile {
        match parse_version(version) {
            Some(v) if v >= MODERN_SERVER_VERSION_MIN => Profile::Modern,
            _ => Profile::Legacy,
        }
    }

    /// The name used in config and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Profile::Modern => "modern",
            Profile::Legacy => "legacy",
        }
    }
}

/// The type of a column as the relay writes it; each profile spells it in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// Epoch milliseconds: `DateTime64(3,'UTC')`, legacy `Int64`. RowBinary `i64`.
    DateTime64Ms,
    /// `LowCardinality(String)`, legacy `String`.
    LowCardinalityString,
    /// `String`.
    String,
    /// `Decimal64(8)`: RowBinary `i64` scaled by 10^8.
    Decimal64,
    /// `Bool`, legacy `UInt8`.
    Bool,
    /// `Date`: RowBinary `u16` days since 1970-01-01.
    Date,
    /// `UInt32`.
    UInt32,
    /// `UInt64`.
    UInt64,
    /// `Int64` in both profiles (milliseconds where it holds a time; see [`PASSTHROUGH_COLUMNS`]).
    Int64,
}

impl ColumnType {
    /// The SQL type in `profile`.
    pub const fn sql(self, profile: Profile) -> &'static str {
        match (self, profile) {
            (ColumnType::DateTime64Ms, Profile::Modern) => "DateTime64(3, 'UTC')",
            (ColumnType::DateTime64Ms, Profile::Legacy) => "Int64",
            (ColumnType::LowCardinalityString, Profile::Modern) => "LowCardinality(String)",
            (ColumnType::LowCardinalityString, Profile::Legacy) => "String",
            (ColumnType::String, _) => "String",
            (ColumnType::Decimal64, _) => "Decimal64(8)",
            (ColumnType::Bool, Profile::Modern) => "Bool",
            (ColumnType::Bool, Profile::Legacy) => "UInt8",
            (ColumnType::Date, _) => "Date",
            (ColumnType::UInt32, _) => "UInt32",
            (ColumnType::UInt64, _) => "UInt64",
            (ColumnType::Int64, _) => "Int64",
        }
    }

    /// The column codec in the modern profile: delta coding for the time columns, whose values
    /// are close within a part, ZSTD for wide values; none where LowCardinality already
    /// compresses or the value is one byte.
    const fn codec(self) -> Option<&'static str> {
        match self {
            ColumnType::DateTime64Ms => Some("CODEC(Delta, ZSTD)"),
            ColumnType::String | ColumnType::Decimal64 | ColumnType::UInt64 => Some("CODEC(ZSTD)"),
            ColumnType::Int64 => Some("CODEC(Delta, ZSTD)"),
            ColumnType::LowCardinalityString
            | ColumnType::Bool
            | ColumnType::Date
            | ColumnType::UInt32 => None,
        }
    }

    /// True when a column of type `actual` (as `system.columns` spells it) takes this type's
    /// RowBinary encoding. Spaces are ignored; `Nullable` never matches (it adds a null byte).
    pub fn accepts(self, actual: &str) -> bool {
        let actual: std::string::String = actual.chars().filter(|c| !c.is_whitespace()).collect();
        match self {
            ColumnType::DateTime64Ms => actual == "Int64" || actual.starts_with("DateTime64(3"),
            ColumnType::LowCardinalityString | ColumnType::String => {
                actual == "String" || actual == "LowCardinality(String)"
            }
            ColumnType::Decimal64 => {
                actual == "Decimal64(8)"
                    || actual
                        .strip_prefix("Decimal(")
                        .and_then(|rest| rest.strip_suffix(",8)"))
                        .and_then(|precision| precision.parse::<u32>().ok())
                        // Precisions 10 to 18 are all stored in 8 bytes.
                        .is_some_and(|precision| (10..=18).contains(&precision))
            }
            ColumnType::Bool => actual == "Bool" || actual == "UInt8",
            ColumnType::Date => actual == "Date",
            ColumnType::UInt32 => actual == "UInt32",
            ColumnType::UInt64 => actual == "UInt64",
            ColumnType::Int64 => actual == "Int64",
        }
    }
}

/// A table of the relay's schema: one of the eight data tables, or the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaTable {
    Data(Table),
    DeadLetters,
}

impl From<Table> for SchemaTable {
    fn from(table: Table) -> Self {
        SchemaTable::Data(table)
    }
}

impl SchemaTable {
    /// Every table of the schema, data tables first.
    pub const ALL: [SchemaTable; 9] = [
        SchemaTable::Data(Table::Trades),
        SchemaTable::Data(Table::Orderbooks),
        SchemaTable::Data(Table::FundingRates),
        SchemaTable::Data(Table::OpenInterests),
        SchemaTable::Data(Table::Liquidations),
        SchemaTable::Data(Table::LsrTopPositions),
        SchemaTable::Data(Table::LsrAllAccounts),
        SchemaTable::Data(Table::VolatilityIndices),
        SchemaTable::DeadLetters,
    ];

    /// The ClickHouse table name.
    pub const fn name(self) -> &'static str {
        match self {
            SchemaTable::Data(table) => table.name(),
            SchemaTable::DeadLetters => DEAD_LETTERS_TABLE,
        }
    }

    /// The `ORDER BY` columns: the identity rows collapse on.
    pub const fn order_by(self) -> &'static [&'static str] {
        match self {
            SchemaTable::Data(Table::Trades) => &["exchange", "market_type", "symbol", "trade_id"],
            SchemaTable::Data(Table::Orderbooks) => &[
                "exchange",
                "market_type",
                "symbol",
                "last_update_id",
                "timestamp",
            ],
            SchemaTable::Data(Table::FundingRates)
            | SchemaTable::Data(Table::OpenInterests)
            | SchemaTable::Data(Table::VolatilityIndices) => {
                &["exchange", "market_type", "symbol", "timestamp"]
            }
            SchemaTable::Data(Table::Liquidations) => &[
                "exchange",
                "market_type",
                "symbol",
                "timestamp",
                "liquidation_id",
            ],
            SchemaTable::Data(Table::LsrTopPositions)
            | SchemaTable::Data(Table::LsrAllAccounts) => {
                &["exchange", "market_type", "symbol", "timestamp", "period"]
            }
            SchemaTable::DeadLetters => &["nats_stream", "nats_seq", "table"],
        }
    }

    /// The column the table is partitioned by month of. Dead letters use the message's publish
    /// time, not `failed_at`: a dead letter written again must land in the same partition to
    /// collapse with the first copy.
    const fn time_column(self) -> &'static str {
        match self {
            SchemaTable::Data(_) => "timestamp",
            SchemaTable::DeadLetters => "published_at",
        }
    }
}

use ColumnType::{
    Bool, Date, DateTime64Ms as Ms, Decimal64 as Dec, LowCardinalityString as Lc, String as Str,
    UInt32, UInt64,
};

const TRADES: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("trade_id", Str),
    ("price", Dec),
    ("quantity", Dec),
    ("side", Lc),
    ("is_maker", Bool),
    ("trade_time", Ms),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const ORDERBOOKS: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("last_update_id", UInt64),
    ("bids_count", UInt32),
    ("asks_count", UInt32),
    ("best_bid_price", Dec),
    ("best_ask_price", Dec),
    ("best_bid_quantity", Dec),
    ("best_ask_quantity", Dec),
    ("bids", Str),
    ("asks", Str),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const FUNDING_RATES: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("funding_rate", Dec),
    ("mark_price", Dec),
    ("index_price", Dec),
    ("funding_time", Ms),
    ("next_funding_time", Ms),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const OPEN_INTERESTS: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("open_interest", Dec),
    ("open_interest_value", Dec),
    ("count", UInt64),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const LIQUIDATIONS: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("side", Lc),
    ("price", Dec),
    ("quantity", Dec),
    ("liquidation_time", Ms),
    ("liquidation_id", Str),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const LSR_TOP_POSITIONS: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("long_position_ratio", Dec),
    ("short_position_ratio", Dec),
    ("period", Lc),
    ("long_short_ratio", Dec),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const LSR_ALL_ACCOUNTS: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("long_account_ratio", Dec),
    ("short_account_ratio", Dec),
    ("period", Lc),
    ("long_short_ratio", Dec),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const VOLATILITY_INDICES: &[(&str, ColumnType)] = &[
    ("timestamp", Ms),
    ("exchange", Lc),
    ("market_type", Lc),
    ("symbol", Lc),
    ("index_value", Dec),
    ("underlying_asset", Lc),
    ("maturity_date", Date),
    ("data_source", Lc),
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
];

const DEAD_LETTERS: &[(&str, ColumnType)] = &[
    ("failed_at", Ms),
    ("published_at", Ms),
    ("table", Str),
    ("subject", Str),
    ("nats_stream", Str),
    ("nats_seq", UInt64),
    ("error", Str),
    ("payload", Str),
    // Last, so that `ALTER TABLE ... ADD COLUMN` on a table of an older relay gives the same
    // column order as a new table (the relay names its columns on insert either way).
    ("wal_lsn", UInt64),
];

/// The columns of a passthrough table the relay creates, in the order of the fields it writes
/// first on every JSON row (`drain::PASSTHROUGH_RELAY_FIELDS`); the payload's own fields follow
/// on the row and land in columns of the same name, if the operator adds any.
///
/// The publish time is `Int64` milliseconds in both profiles: JSONEachRow spells a
/// `DateTime64(3)` as text, which an `Int64` column of the legacy profile does not parse, and
/// the relay writes one row text for both.
pub const PASSTHROUGH_COLUMNS: &[(&str, ColumnType)] = &[
    ("nats_stream", Lc),
    ("nats_seq", UInt64),
    ("published_ms", ColumnType::Int64),
    ("payload", Str),
];

/// The identity columns every passthrough table must have, by which a redelivered or retried row
/// collapses; the table's `ORDER BY` must be these for that to happen.
pub const PASSTHROUGH_IDENTITY: [&str; 2] = ["nats_stream", "nats_seq"];

/// `CREATE TABLE IF NOT EXISTS` for the passthrough table `table`: a ReplacingMergeTree keyed by
/// the message identity, partitioned by the month of the publish time, with the payload kept.
/// `ttl_days` adds a TTL on the publish time in the modern profile, as for the data tables.
pub fn passthrough_ddl(
    profile: Profile,
    database: &str,
    table: &str,
    ttl_days: Option<u32>,
) -> String {
    passthrough_ddl_on(profile, database, table, ttl_days, None)
}

/// [`passthrough_ddl`] in the cluster layout: the replicated table, then its `Distributed`
/// table.
pub fn cluster_passthrough_ddl(
    profile: Profile,
    database: &str,
    table: &str,
    ttl_days: Option<u32>,
    cluster: &Cluster,
) -> [String; 2] {
    let order_by: Vec<String> = PASSTHROUGH_IDENTITY.iter().map(|c| identifier(c)).collect();
    [
        passthrough_ddl_on(profile, database, table, ttl_days, Some(cluster)),
        distributed_ddl(database, table, &order_by.join(", "), cluster),
    ]
}

fn passthrough_ddl_on(
    profile: Profile,
    database: &str,
    table: &str,
    ttl_days: Option<u32>,
    cluster: Option<&Cluster>,
) -> String {
    let mut out = String::with_capacity(1024);
    push_create_table(&mut out, database, table, cluster);
    out.push_str("\n(\n    ");
    let mut definitions: Vec<String> = PASSTHROUGH_COLUMNS
        .iter()
        .map(|&(name, column_type)| column_definition(profile, name, column_type))
        .collect();
    definitions.push(created_at_definition(profile).to_owned());
    out.push_str(&definitions.join(",\n    "));
    out.push_str("\n)\n");
    let order_by: Vec<String> = PASSTHROUGH_IDENTITY.iter().map(|c| identifier(c)).collect();
    let order_by = order_by.join(", ");
    let time = "toDateTime(intDiv(published_ms, 1000), 'UTC')";
    let engine = Engine::new(cluster, database, table);
    push_engine(
        &mut out,
        profile,
        &engine,
        time,
        &order_by,
        ttl_days.map(|days| (time, days)),
    );
    out
}

/// Checks that an existing passthrough table has the identity columns with compatible types.
/// Other columns are the operator's: the relay's JSON rows fill the ones whose names they carry.
pub fn check_passthrough_columns(
    table: &str,
    actual: &[(String, String)],
    profile: Profile,
) -> Result<(), SchemaError> {
    if actual.is_empty() {
        return Err(SchemaError::MissingTable {
            table: table.to_owned(),
        });
    }
    for &(name, column_type) in PASSTHROUGH_COLUMNS {
        if !PASSTHROUGH_IDENTITY.contains(&name) {
            continue;
        }
        let expected = column_type.sql(profile).to_owned();
        match actual.iter().find(|(actual_name, _)| actual_name == name) {
            None => {
                return Err(SchemaError::PassthroughIdentity {
                    table: table.to_owned(),
                    column: name.to_owned(),
                    expected,
                })
            }
            Some((_, actual_type)) if !column_type.accepts(actual_type) => {
                return Err(SchemaError::ColumnType {
                    table: table.to_owned(),
                    column: name.to_owned(),
                    expected,
                    actual: actual_type.clone(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The columns the relay writes to `table`, in the row struct's field order (insert order).
/// `created_at` is not among them: the server fills it.
pub fn expected_columns(table: impl Into<SchemaTable>) -> &'static [(&'static str, ColumnType)] {
    match table.into() {
        SchemaTable::Data(Table::Trades) => TRADES,
        SchemaTable::Data(Table::Orderbooks) => ORDERBOOKS,
        SchemaTable::Data(Table::FundingRates) => FUNDING_RATES,
        SchemaTable::Data(Table::OpenInterests) => OPEN_INTERESTS,
        SchemaTable::Data(Table::Liquidations) => LIQUIDATIONS,
        SchemaTable::Data(Table::LsrTopPositions) => LSR_TOP_POSITIONS,
        SchemaTable::Data(Table::LsrAllAccounts) => LSR_ALL_ACCOUNTS,
        SchemaTable::Data(Table::VolatilityIndices) => VOLATILITY_INDICES,
        SchemaTable::DeadLetters => DEAD_LETTERS,
    }
}

/// Appends `name` as a backquoted ClickHouse identifier.
fn push_identifier(out: &mut String, name: &str) {
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
}

fn identifier(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    push_identifier(&mut out, name);
    out
}

/// Appends `text` as a single-quoted ClickHouse string literal.
fn push_string_literal(out: &mut String, text: &str) {
    out.push('\'');
    for c in text.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

fn string_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_string_literal(&mut out, text);
    out
}

/// Appends `CREATE TABLE IF NOT EXISTS db.table`, with `ON CLUSTER` in the cluster layout.
fn push_create_table(out: &mut String, database: &str, table: &str, cluster: Option<&Cluster>) {
    out.push_str("CREATE TABLE IF NOT EXISTS ");
    push_identifier(out, database);
    out.push('.');
    push_identifier(out, table);
    if let Some(cluster) = cluster {
        out.push_str(" ON CLUSTER ");
        push_identifier(out, &cluster.name);
    }
}

/// `CREATE DATABASE IF NOT EXISTS` for `database` (the same in both profiles).
pub fn database_ddl(database: &str) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {}", identifier(database))
}

/// [`database_ddl`] on every server of `cluster`.
pub fn cluster_database_ddl(database: &str, cluster: &Cluster) -> String {
    format!(
        "{} ON CLUSTER {}",
        database_ddl(database),
        identifier(&cluster.name)
    )
}

/// The `Distributed` table `<table>_all` over the replicated `table` on every server of
/// `cluster`, with the columns of `table` (`AS`: distributed DDL runs in order on each server,
/// so the local table exists when this runs there). Rows are spread over shards by a hash of
/// `identity` (the table's `ORDER BY`), so an insert through it would send every copy of a row
/// to the same shard, where the copies collapse.
fn distributed_ddl(database: &str, table: &str, identity: &str, cluster: &Cluster) -> String {
    let mut out = String::with_capacity(256);
    push_create_table(&mut out, database, &distributed_name(table), Some(cluster));
    out.push_str(" AS ");
    push_identifier(&mut out, database);
    out.push('.');
    push_identifier(&mut out, table);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "\nENGINE = Distributed({}, {}, {}, cityHash64({identity}))",
        string_literal(&cluster.name),
        string_literal(database),
        string_literal(table),
    );
    out
}

/// The definition of one column, as in `CREATE TABLE` and `ALTER TABLE ADD COLUMN`.
fn column_definition(profile: Profile, name: &str, column_type: ColumnType) -> String {
    let mut out = identifier(name);
    out.push(' ');
    out.push_str(column_type.sql(profile));
    if name == "data_source" {
        out.push_str(" DEFAULT 'marketprism'");
    }
    if profile == Profile::Modern {
        if let Some(codec) = column_type.codec() {
            out.push(' ');
            out.push_str(codec);
        }
    }
    out
}

/// The `created_at` column: when the row reached the server, in milliseconds.
fn created_at_definition(profile: Profile) -> &'static str {
    match profile {
        Profile::Modern => "`created_at` DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD)",
        // 18.16 has no now64: whole seconds scaled to milliseconds keep the column's unit.
        Profile::Legacy => "`created_at` Int64 DEFAULT toInt64(toUInt32(now())) * 1000",
    }
}

/// `CREATE TABLE IF NOT EXISTS` for one table in `profile`.
///
/// `ttl_days` adds `TTL` on `timestamp` to the data tables in the modern profile (MarketPrism
/// keeps 3 days on hot). Dead letters never expire by TTL: they wait for an operator. The legacy
/// profile has no TTL and ignores it.
pub fn ddl(
    profile: Profile,
    database: &str,
    table: impl Into<SchemaTable>,
    ttl_days: Option<u32>,
) -> String {
    let table = table.into();
    ddl_named(profile, database, table, table.name(), ttl_days)
}

/// [`ddl`] of `table` created under the name `name` (the dead-letter table's name is configured
/// by `[drain] dead_letter_table`).
pub fn ddl_named(
    profile: Profile,
    database: &str,
    table: SchemaTable,
    name: &str,
    ttl_days: Option<u32>,
) -> String {
    ddl_on(profile, database, table, name, ttl_days, None)
}

/// [`ddl_named`] in the cluster layout: the replicated table `name` on every server of
/// `cluster`, then its `Distributed` table `<name>_all`.
pub fn cluster_ddl_named(
    profile: Profile,
    database: &str,
    table: SchemaTable,
    name: &str,
    ttl_days: Option<u32>,
    cluster: &Cluster,
) -> [String; 2] {
    let order_by: Vec<String> = table.order_by().iter().map(|c| identifier(c)).collect();
    [
        ddl_on(profile, database, table, name, ttl_days, Some(cluster)),
        distributed_ddl(database, name, &order_by.join(", "), cluster),
    ]
}

fn ddl_on(
    profile: Profile,
    database: &str,
    table: SchemaTable,
    name: &str,
    ttl_days: Option<u32>,
    cluster: Option<&Cluster>,
) -> String {
    let mut out = String::with_capacity(2048);
    push_create_table(&mut out, database, name, cluster);
    out.push_str("\n(\n");
    let mut definitions: Vec<String> = Vec::new();
    for &(name, column_type) in expected_columns(table) {
        definitions.push(column_definition(profile, name, column_type));
        if name == "data_source" {
            definitions.push(created_at_definition(profile).to_owned());
        }
    }
    if table == SchemaTable::DeadLetters {
        definitions.push(created_at_definition(profile).to_owned());
    }
    out.push_str("    ");
    out.push_str(&definitions.join(",\n    "));
    out.push_str("\n)\n");

    let time = table.time_column();
    let order_by: Vec<String> = table.order_by().iter().map(|c| identifier(c)).collect();
    let order_by = order_by.join(", ");
    // Time columns are DateTime64 in the modern profile and Int64 milliseconds in the legacy one.
    let month_of = match profile {
        Profile::Modern => time.to_owned(),
        Profile::Legacy => format!("toDateTime(intDiv({time}, 1000), 'UTC')"),
    };
    let ttl_time = format!("toDateTime({time})");
    let ttl = match (ttl_days, table) {
        (Some(days), SchemaTable::Data(_)) => Some((ttl_time.as_str(), days)),
        _ => None,
    };
    let engine = Engine::new(cluster, database, name);
    push_engine(&mut out, profile, &engine, &month_of, &order_by, ttl);
    out
}

/// The table engine: a ReplacingMergeTree on one server, or a ReplicatedReplacingMergeTree
/// at a ZooKeeper path in the cluster layout.
enum Engine {
    Single,
    Replicated { zookeeper_path: String },
}

impl Engine {
    fn new(cluster: Option<&Cluster>, database: &str, table: &str) -> Engine {
        match cluster {
            None => Engine::Single,
            Some(cluster) => Engine::Replicated {
                zookeeper_path: cluster.table_path(database, table),
            },
        }
    }
}

/// The engine clause of every table the relay creates: a ReplacingMergeTree ordered by
/// `order_by` (the row's identity) and partitioned by the month of `month_of` (a DateTime
/// expression). The modern profile adds the TTL (`ttl`: a DateTime expression and days, where
/// the table has one) and the deduplication window of insert tokens; 18.16 has neither.
///
/// A replicated table (the cluster layout) deduplicates inserted blocks in both profiles
/// (`replicated_deduplication_window`, which 18.16 has too). Modern servers match the insert
/// token. 18.16 matches the checksum of the block as stored, which holds `created_at` (the
/// insert's second, filled by the server): a re-cut batch is byte-identical as sent, so only a
/// copy sent within the same second matches, and later copies collapse under FINAL.
fn push_engine(
    out: &mut String,
    profile: Profile,
    engine: &Engine,
    month_of: &str,
    order_by: &str,
    ttl: Option<(&str, u32)>,
) {
    let (name, window_setting) = match engine {
        Engine::Single => (
            match profile {
                Profile::Modern => "ReplacingMergeTree".to_owned(),
                Profile::Legacy => "ReplacingMergeTree()".to_owned(),
            },
            (profile == Profile::Modern).then_some("non_replicated_deduplication_window"),
        ),
        Engine::Replicated { zookeeper_path } => (
            format!(
                "ReplicatedReplacingMergeTree({}, {})",
                string_literal(zookeeper_path),
                string_literal(REPLICA_NAME_MACRO)
            ),
            Some("replicated_deduplication_window"),
        ),
    };
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "ENGINE = {name}\nPARTITION BY toYYYYMM({month_of})\nORDER BY ({order_by})"
    );
    if profile == Profile::Modern {
        if let Some((time, days)) = ttl {
            let _ = write!(out, "\nTTL {time} + INTERVAL {days} DAY");
        }
    }
    if let Some(setting) = window_setting {
        let _ = write!(out, "\nSETTINGS {setting} = {DEDUPLICATION_WINDOW_BLOCKS}");
    }
}

/// Every statement that creates the schema: the database, the eight tables, the dead letters.
pub fn all_ddl(profile: Profile, database: &str, ttl_days: Option<u32>) -> Vec<String> {
    all_ddl_with_dead_letters(profile, database, ttl_days, DEAD_LETTERS_TABLE)
}

/// [`all_ddl`] with the dead-letter table created as `dead_letter_table`.
pub fn all_ddl_with_dead_letters(
    profile: Profile,
    database: &str,
    ttl_days: Option<u32>,
    dead_letter_table: &str,
) -> Vec<String> {
    let mut statements = vec![database_ddl(database)];
    statements.extend(SchemaTable::ALL.into_iter().map(|table| {
        let name = match table {
            SchemaTable::DeadLetters => dead_letter_table,
            SchemaTable::Data(t) => t.name(),
        };
        ddl_named(profile, database, table, name, ttl_days)
    }));
    statements
}

/// [`all_ddl_with_dead_letters`] in the cluster layout: the database and, for each table, the
/// replicated table and its `Distributed` table, all `ON CLUSTER`.
pub fn all_cluster_ddl(
    profile: Profile,
    database: &str,
    ttl_days: Option<u32>,
    dead_letter_table: &str,
    cluster: &Cluster,
) -> Vec<String> {
    let mut statements = vec![cluster_database_ddl(database, cluster)];
    for table in SchemaTable::ALL {
        let name = match table {
            SchemaTable::DeadLetters => dead_letter_table,
            SchemaTable::Data(t) => t.name(),
        };
        statements.extend(cluster_ddl_named(
            profile, database, table, name, ttl_days, cluster,
        ));
    }
    statements
}

/// `ALTER TABLE .. ADD COLUMN` statements for the columns the relay writes that `actual`
/// (name, type from `system.columns`) lacks. An existing table is never dropped or retyped;
/// this is what `schema apply` can do safely to a table created by an older relay.
pub fn add_missing_columns_ddl(
    profile: Profile,
    database: &str,
    table: impl Into<SchemaTable>,
    actual: &[(String, String)],
) -> Vec<String> {
    let table = table.into();
    add_missing_columns_ddl_named(profile, database, table, table.name(), actual, None)
}

/// [`add_missing_columns_ddl`] for a table stored under `table_name` (the dead-letter table's
/// name is configurable, and in the cluster layout its `<table>_all` takes the same columns), on
/// every server of `cluster` when one is given (for a replicated table; ClickHouse refuses an
/// `ON CLUSTER` alter of a `Distributed` table over replicated shards, so that one is altered
/// on each server without a cluster).
pub fn add_missing_columns_ddl_named(
    profile: Profile,
    database: &str,
    table: SchemaTable,
    table_name: &str,
    actual: &[(String, String)],
    cluster: Option<&Cluster>,
) -> Vec<String> {
    expected_columns(table)
        .iter()
        .filter(|(name, _)| !actual.iter().any(|(actual_name, _)| actual_name == name))
        .map(|&(name, column_type)| {
            let mut statement = String::from("ALTER TABLE ");
            push_identifier(&mut statement, database);
            statement.push('.');
            push_identifier(&mut statement, table_name);
            if let Some(cluster) = cluster {
                statement.push_str(" ON CLUSTER ");
                push_identifier(&mut statement, &cluster.name);
            }
            statement.push_str(" ADD COLUMN ");
            statement.push_str(&column_definition(profile, name, column_type));
            statement
        })
        .collect()
}

/// Why a table cannot take the relay's rows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// In the cluster layout, a table the relay inserts into is not replicated, so its rows
    /// stay on one server and re-cut batches are not deduplicated across replicas.
    #[error("table `{table}` is {engine}, not a Replicated table, although [clickhouse] cluster is set: create it with `prism-relay schema apply --profile cluster` (move its rows first), or remove cluster")]
    NotReplicated { table: String, engine: String },
    /// In the cluster layout, a table's `<table>_all` is missing or not `Distributed`.
    #[error("table `{table}` is {engine}, not a Distributed table over the cluster: run `prism-relay schema apply --profile cluster` to create it")]
    NotDistributed { table: String, engine: String },
    /// The table does not exist (no columns at all).
    #[error("table `{table}` does not exist: run `prism-relay schema apply` to create it")]
    MissingTable { table: String },
    /// A column the relay writes is absent.
    #[error("table `{table}` has no column `{column}` ({expected}): run `prism-relay schema apply` to add it")]
    MissingColumn {
        table: String,
        column: String,
        expected: String,
    },
    /// A passthrough table lacks an identity column, so redeliveries and retries of its rows
    /// would not collapse.
    #[error("passthrough table `{table}` has no column `{column}` ({expected}), so its rows do not collapse by message identity: add it with `ALTER TABLE {table} ADD COLUMN {column} {expected}` and key the table by (nats_stream, nats_seq), or move the data to a table created by `prism-relay schema apply` (`prism-relay schema print` shows the DDL)")]
    PassthroughIdentity {
        table: String,
        column: String,
        expected: String,
    },
    /// The server is older than the chosen profile supports.
    #[error("ClickHouse {version} is older than the {profile} profile needs ({min} or newer: {needs}): upgrade the server, or set [clickhouse] profile = \"auto\" to get the profile it supports")]
    ServerTooOld {
        version: String,
        profile: String,
        min: String,
        needs: String,
    },
    /// `[clickhouse] async_insert` is set but the server gets the legacy profile.
    #[error("[clickhouse] async_insert = true needs the modern profile, but ClickHouse {version} runs the legacy one: set async_insert = false, or use a server of 22.2 or newer")]
    AsyncInsertNeedsModern { version: String },
    /// A column has a type whose RowBinary encoding differs from what the relay writes.
    #[error("table `{table}` column `{column}` is {actual}, but the relay writes {expected}: change it with `ALTER TABLE {table} MODIFY COLUMN {column} {expected}` or recreate the table (`prism-relay schema print` shows the DDL)")]
    ColumnType {
        table: String,
        column: String,
        expected: String,
        actual: String,
    },
}

impl SchemaError {
    /// The same problem found on the table `name` (a `<table>_all` checked with its local
    /// table's columns), so the message names the table that has it.
    pub fn on_table(mut self, name: &str) -> SchemaError {
        match &mut self {
            SchemaError::NotReplicated { table, .. }
            | SchemaError::NotDistributed { table, .. }
            | SchemaError::MissingTable { table }
            | SchemaError::MissingColumn { table, .. }
            | SchemaError::PassthroughIdentity { table, .. }
            | SchemaError::ColumnType { table, .. } => *table = name.to_owned(),
            // About the server, not a table.
            SchemaError::ServerTooOld { .. } | SchemaError::AsyncInsertNeedsModern { .. } => {}
        }
        self
    }
}

/// Checks the engines of a table of the cluster layout (`local`: the table the relay inserts
/// into; `distributed`: its `<table>_all`), as `system.tables` names them (`None`: no table).
/// A missing local table is [`check_columns`]'s to report.
pub fn check_cluster_engines(
    table: &str,
    local: Option<&str>,
    distributed: Option<&str>,
) -> Vec<SchemaError> {
    let mut problems = Vec::new();
    if let Some(engine) = local.filter(|engine| !engine.starts_with("Replicated")) {
        problems.push(SchemaError::NotReplicated {
            table: table.to_owned(),
            engine: engine.to_owned(),
        });
    }
    if distributed != Some("Distributed") {
        problems.push(SchemaError::NotDistributed {
            table: distributed_name(table),
            engine: distributed.unwrap_or("missing").to_owned(),
        });
    }
    problems
}

/// Checks that `actual` (name, type pairs from `system.columns` for this table) has every
/// column the relay writes with a compatible type. Extra columns are fine as long as they have
/// defaults, which the server enforces at insert time.
pub fn check_columns(
    table: impl Into<SchemaTable>,
    actual: &[(String, String)],
    profile: Profile,
) -> Result<(), SchemaError> {
    let table = table.into();
    if actual.is_empty() {
        return Err(SchemaError::MissingTable {
            table: table.name().to_owned(),
        });
    }
    for &(name, column_type) in expected_columns(table) {
        let expected = column_type.sql(profile).to_owned();
        match actual.iter().find(|(actual_name, _)| actual_name == name) {
            None => {
                return Err(SchemaError::MissingColumn {
                    table: table.name().to_owned(),
                    column: name.to_owned(),
                    expected,
                })
            }
            Some((_, actual_type)) if !column_type.accepts(actual_type) => {
                return Err(SchemaError::ColumnType {
                    table: table.name().to_owned(),
                    column: name.to_owned(),
                    expected,
                    actual: actual_type.clone(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_server_older_than_the_chosen_profile_is_reported_with_its_version_and_the_need() {
        let findings = check_server_version("21.8.15.7", Profile::Modern, false);
        assert_eq!(findings.len(), 1, "{findings:?}");
        let text = findings[0].to_string();
        for fragment in [
            "ClickHouse 21.8.15.7",
            "modern profile",
            "22.2 or newer",
            "insert_deduplication_token (22.2)",
        ] {
            assert!(text.contains(fragment), "{fragment:?} not in {text}");
        }
        assert!(check_server_version("22.2.1", Profile::Modern, true).is_empty());
        assert!(check_server_version("23.8.16.40", Profile::Modern, true).is_empty());
        assert!(check_server_version("18.16.1", Profile::Legacy, false).is_empty());
        assert_eq!(
            check_server_version("1.1.54380", Profile::Legacy, false).len(),
            1
        );
        // A version that does not parse is not judged.
        assert!(check_server_version("custom-build", Profile::Modern, false).is_empty());
    }

    #[test]
    fn async_inserts_on_the_legacy_profile_are_reported_naming_the_setting_and_the_fix() {
        let findings = check_server_version("18.16.1", Profile::Legacy, true);
        assert_eq!(findings.len(), 1, "{findings:?}");
        let text = findings[0].to_string();
        assert!(text.contains("async_insert = true"), "{text}");
        assert!(text.contains("set async_insert = false"), "{text}");
    }
    use super::*;
    use crate::sink::DeadLetter;

    #[test]
    fn expected_columns_follow_the_row_structs_field_order() {
        for table in Table::ALL {
            let names: Vec<&str> = expected_columns(table).iter().map(|(n, _)| *n).collect();
            assert_eq!(names, table.column_names(), "{table}");
        }
        let names: Vec<&str> = expected_columns(SchemaTable::DeadLetters)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(names, <DeadLetter as clickhouse::Row>::COLUMN_NAMES);
    }

    #[test]
    fn every_order_by_column_is_a_written_column() {
        for table in SchemaTable::ALL {
            for key in table.order_by() {
                assert!(
                    expected_columns(table).iter().any(|(n, _)| n == key),
                    "{}: {key}",
                    table.name()
                );
            }
        }
    }

    #[test]
    fn modern_ddl_orders_trades_by_identity_with_market_type() {
        let sql = ddl(Profile::Modern, "marketprism_hot", Table::Trades, None);
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS `marketprism_hot`.`trades`"));
        assert!(
            sql.contains("ORDER BY (`exchange`, `market_type`, `symbol`, `trade_id`)"),
            "{sql}"
        );
        assert!(sql.contains("ENGINE = ReplacingMergeTree\n"));
        assert!(sql.contains("PARTITION BY toYYYYMM(timestamp)"));
        assert!(sql.contains("`timestamp` DateTime64(3, 'UTC') CODEC(Delta, ZSTD)"));
        assert!(sql.contains("`price` Decimal64(8) CODEC(ZSTD)"));
        assert!(sql.contains("`is_maker` Bool"));
        assert!(sql.contains("`exchange` LowCardinality(String)"));
        assert!(sql.contains("`data_source` LowCardinality(String) DEFAULT 'marketprism'"));
        assert!(sql.contains("`created_at` DateTime64(3, 'UTC') DEFAULT now64(3)"));
        assert!(sql.contains("SETTINGS non_replicated_deduplication_window = 1000"));
        assert!(!sql.contains("TTL"));
    }

    #[test]
    fn every_table_keys_on_market_type_in_both_profiles() {
        for profile in [Profile::Modern, Profile::Legacy] {
            for table in Table::ALL {
                let sql = ddl(profile, "db", table, None);
                let order_by = sql
                    .lines()
                    .find(|l| l.starts_with("ORDER BY"))
                    .expect("every table has ORDER BY");
                assert!(
                    order_by.starts_with("ORDER BY (`exchange`, `market_type`, `symbol`"),
                    "{order_by}"
                );
            }
        }
    }

    #[test]
    fn natural_identities_match_marketprism() {
        let order_by = |t: Table| SchemaTable::from(t).order_by().join(",");
        assert_eq!(
            order_by(Table::Orderbooks),
            "exchange,market_type,symbol,last_update_id,timestamp"
        );
        assert_eq!(
            order_by(Table::FundingRates),
            "exchange,market_type,symbol,timestamp"
        );
        assert_eq!(
            order_by(Table::LsrTopPositions),
            "exchange,market_type,symbol,timestamp,period"
        );
        assert_eq!(
            order_by(Table::LsrAllAccounts),
            "exchange,market_type,symbol,timestamp,period"
        );
        assert_eq!(
            order_by(Table::Liquidations),
            "exchange,market_type,symbol,timestamp,liquidation_id"
        );
    }

    #[test]
    fn ttl_is_modern_only() {
        let modern = ddl(Profile::Modern, "db", Table::Orderbooks, Some(3));
        assert!(
            modern.contains("TTL toDateTime(timestamp) + INTERVAL 3 DAY\nSETTINGS"),
            "{modern}"
        );
        let legacy = ddl(Profile::Legacy, "db", Table::Orderbooks, Some(3));
        assert!(!legacy.contains("TTL"));
        let letters = ddl(Profile::Modern, "db", SchemaTable::DeadLetters, Some(3));
        assert!(!letters.contains("TTL"), "{letters}");
    }

    #[test]
    fn legacy_ddl_uses_only_what_clickhouse_18_16_has() {
        for sql in all_ddl(Profile::Legacy, "marketprism_hot", Some(3)) {
            for absent in [
                "DateTime64",
                "LowCardinality",
                "Bool",
                "CODEC",
                "TTL",
                "SETTINGS",
                "now64",
            ] {
                assert!(!sql.contains(absent), "{absent} in {sql}");
            }
        }
        let sql = ddl(Profile::Legacy, "marketprism_hot", Table::Trades, None);
        assert!(sql.contains("`timestamp` Int64,"));
        assert!(sql.contains("`is_maker` UInt8,"));
        assert!(sql.contains("ENGINE = ReplacingMergeTree()\nPARTITION BY toYYYYMM(toDateTime(intDiv(timestamp, 1000), 'UTC'))"));
    }

    #[test]
    fn dead_letters_are_keyed_by_message_identity() {
        let sql = ddl(Profile::Modern, "db", SchemaTable::DeadLetters, None);
        assert!(
            sql.contains("ORDER BY (`nats_stream`, `nats_seq`, `table`)"),
            "{sql}"
        );
        assert!(sql.contains("PARTITION BY toYYYYMM(published_at)"), "{sql}");
        assert!(sql.contains("`payload` String"));
    }

    #[test]
    fn a_dead_letter_table_created_before_published_at_existed_is_repaired_by_adding_it() {
        let old: Vec<(String, String)> = [
            "failed_at",
            "table",
            "subject",
            "nats_stream",
            "nats_seq",
            "error",
            "payload",
        ]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                if *n == "nats_seq" { "UInt64" } else { "String" }.to_string(),
            )
        })
        .map(|(n, t)| {
            if n == "failed_at" {
                (n, "Int64".to_string())
            } else {
                (n, t)
            }
        })
        .collect();
        let err = check_columns(SchemaTable::DeadLetters, &old, Profile::Legacy).unwrap_err();
        assert!(
            matches!(err, SchemaError::MissingColumn { ref column, .. } if column == "published_at")
        );
        assert_eq!(
            add_missing_columns_ddl(Profile::Legacy, "db", SchemaTable::DeadLetters, &old),
            [
                "ALTER TABLE `db`.`dead_letters` ADD COLUMN `published_at` Int64",
                "ALTER TABLE `db`.`dead_letters` ADD COLUMN `wal_lsn` UInt64"
            ]
        );
    }

    #[test]
    fn a_dead_letter_table_without_the_wal_lsn_column_is_drift_named_with_its_add_column_fix() {
        for profile in [Profile::Legacy, Profile::Modern] {
            // The table as the previous relay created it: every column but `wal_lsn`.
            let old: Vec<(String, String)> = expected_columns(SchemaTable::DeadLetters)
                .iter()
                .filter(|(name, _)| *name != "wal_lsn")
                .map(|&(name, column_type)| {
                    (name.to_string(), column_type.sql(profile).to_string())
                })
                .collect();
            assert_eq!(
                old.len() + 1,
                expected_columns(SchemaTable::DeadLetters).len()
            );
            let err = check_columns(SchemaTable::DeadLetters, &old, profile).unwrap_err();
            assert_eq!(
                err.to_string(),
                "table `dead_letters` has no column `wal_lsn` (UInt64): run `prism-relay schema apply` to add it"
            );
            let wal_lsn = column_definition(profile, "wal_lsn", UInt64);
            assert!(wal_lsn.starts_with("`wal_lsn` UInt64"), "{wal_lsn}");
            assert_eq!(
                add_missing_columns_ddl(profile, "db", SchemaTable::DeadLetters, &old),
                [format!(
                    "ALTER TABLE `db`.`dead_letters` ADD COLUMN {wal_lsn}"
                )]
            );
            // A new table has it, after the payload.
            let payload = column_definition(profile, "payload", Str);
            let ddl = ddl(profile, "db", SchemaTable::DeadLetters, None);
            assert!(ddl.contains(&format!("{payload},\n    {wal_lsn}")), "{ddl}");
        }
    }

    #[test]
    fn passthrough_tables_are_keyed_by_identity_in_both_profiles_and_checked_for_it() {
        let legacy = passthrough_ddl(Profile::Legacy, "db", "tickers", Some(3));
        assert!(
            legacy.starts_with("CREATE TABLE IF NOT EXISTS `db`.`tickers`"),
            "{legacy}"
        );
        assert!(
            legacy.contains("ORDER BY (`nats_stream`, `nats_seq`)"),
            "{legacy}"
        );
        assert!(legacy.contains("`payload` String,"), "{legacy}");
        assert!(
            legacy.contains("PARTITION BY toYYYYMM(toDateTime(intDiv(published_ms, 1000), 'UTC'))")
        );
        for absent in ["LowCardinality", "CODEC", "TTL", "SETTINGS", "now64"] {
            assert!(!legacy.contains(absent), "{absent} in {legacy}");
        }
        let modern = passthrough_ddl(Profile::Modern, "db", "tickers", Some(3));
        assert!(
            modern.contains("ORDER BY (`nats_stream`, `nats_seq`)\nTTL"),
            "{modern}"
        );
        assert!(
            modern.contains("SETTINGS non_replicated_deduplication_window"),
            "{modern}"
        );

        let created: Vec<(String, String)> = PASSTHROUGH_COLUMNS
            .iter()
            .map(|(n, t)| (n.to_string(), t.sql(Profile::Modern).to_string()))
            .collect();
        assert_eq!(
            check_passthrough_columns("tickers", &created, Profile::Legacy),
            Ok(())
        );
        let operators = vec![
            ("symbol".to_string(), "String".to_string()),
            ("nats_stream".to_string(), "String".to_string()),
        ];
        let err = check_passthrough_columns("tickers", &operators, Profile::Legacy).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "passthrough table `tickers` has no column `nats_seq` (UInt64), so its rows do not collapse"
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("ALTER TABLE tickers ADD COLUMN nats_seq UInt64"));
    }

    #[test]
    fn passthrough_columns_are_the_fields_the_drain_writes() {
        let names: Vec<&str> = PASSTHROUGH_COLUMNS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, crate::drain::PASSTHROUGH_RELAY_FIELDS);
    }

    #[test]
    fn all_ddl_creates_the_database_then_nine_tables() {
        let statements = all_ddl(Profile::Modern, "marketprism_hot", None);
        assert_eq!(statements.len(), 10);
        assert_eq!(
            statements[0],
            "CREATE DATABASE IF NOT EXISTS `marketprism_hot`"
        );
        assert!(statements[9].contains("`dead_letters`"));
    }

    fn test_cluster() -> Cluster {
        Cluster {
            name: "prism".into(),
            zookeeper_path: ZOOKEEPER_PATH_DEFAULT.into(),
        }
    }

    #[test]
    fn cluster_ddl_replicates_each_table_with_the_single_server_keys_and_adds_a_distributed_table()
    {
        let cluster = test_cluster();
        for profile in [Profile::Legacy, Profile::Modern] {
            for table in SchemaTable::ALL {
                let single = ddl(profile, "marketprism_hot", table, None);
                let [local, distributed] = cluster_ddl_named(
                    profile,
                    "marketprism_hot",
                    table,
                    table.name(),
                    None,
                    &cluster,
                );
                let name = table.name();
                assert!(
                    local.starts_with(&format!(
                        "CREATE TABLE IF NOT EXISTS `marketprism_hot`.`{name}` ON CLUSTER `prism`\n("
                    )),
                    "{local}"
                );
                assert!(
                    local.contains(&format!(
                        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/marketprism_hot/{name}', '{{replica}}')\n"
                    )),
                    "{local}"
                );
                assert!(
                    local.ends_with("\nSETTINGS replicated_deduplication_window = 1000"),
                    "{local}"
                );
                // Columns, partitioning and ordering are the single-server table's.
                let body = |sql: &str| -> String {
                    sql.lines()
                        .skip(1)
                        .filter(|l| !l.starts_with("ENGINE") && !l.starts_with("SETTINGS"))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                assert_eq!(body(&local), body(&single), "{name} ({profile})");
                let order_by = table
                    .order_by()
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                assert_eq!(
                    distributed,
                    format!(
                        "CREATE TABLE IF NOT EXISTS `marketprism_hot`.`{name}_all` ON CLUSTER `prism` AS `marketprism_hot`.`{name}`\n\
                         ENGINE = Distributed('prism', 'marketprism_hot', '{name}', cityHash64({order_by}))"
                    )
                );
            }
        }
    }

    #[test]
    fn legacy_cluster_ddl_uses_only_what_clickhouse_18_16_has() {
        let statements = all_cluster_ddl(
            Profile::Legacy,
            "marketprism_hot",
            Some(3),
            "dead_letters",
            &test_cluster(),
        );
        assert_eq!(statements.len(), 1 + 2 * SchemaTable::ALL.len());
        assert_eq!(
            statements[0],
            "CREATE DATABASE IF NOT EXISTS `marketprism_hot` ON CLUSTER `prism`"
        );
        for sql in &statements {
            assert!(sql.contains(" ON CLUSTER `prism`"), "{sql}");
            for absent in [
                "DateTime64",
                "LowCardinality",
                "Bool",
                "CODEC",
                "TTL",
                "now64",
            ] {
                assert!(!sql.contains(absent), "{absent} in {sql}");
            }
        }
        let trades = &statements[1];
        assert!(trades.contains("`timestamp` Int64,"), "{trades}");
        assert!(
            trades.contains("PARTITION BY toYYYYMM(toDateTime(intDiv(timestamp, 1000), 'UTC'))"),
            "{trades}"
        );
    }

    #[test]
    fn modern_cluster_ddl_keeps_the_ttl_and_replaces_the_non_replicated_window() {
        let [local, _] = cluster_ddl_named(
            Profile::Modern,
            "db",
            SchemaTable::Data(Table::Orderbooks),
            "orderbooks",
            Some(3),
            &test_cluster(),
        );
        assert!(
            local.contains("TTL toDateTime(timestamp) + INTERVAL 3 DAY\nSETTINGS replicated_deduplication_window = 1000"),
            "{local}"
        );
        assert!(!local.contains("non_replicated"), "{local}");
        assert!(local.contains("DateTime64(3, 'UTC')"), "{local}");
    }

    #[test]
    fn the_zookeeper_path_gets_database_and_table_and_leaves_server_macros() {
        let cluster = Cluster {
            name: "c".into(),
            zookeeper_path: "/ch/{shard}/{database}.{table}/x".into(),
        };
        assert_eq!(
            cluster.table_path("db", "trades"),
            "/ch/{shard}/db.trades/x"
        );
        let [local, distributed] =
            cluster_passthrough_ddl(Profile::Legacy, "db", "tickers", None, &cluster);
        assert!(
            local.contains("ReplicatedReplacingMergeTree('/ch/{shard}/db.tickers/x', '{replica}')"),
            "{local}"
        );
        assert!(
            local.contains("ORDER BY (`nats_stream`, `nats_seq`)"),
            "{local}"
        );
        assert!(
            distributed.ends_with(
                "Distributed('c', 'db', 'tickers', cityHash64(`nats_stream`, `nats_seq`))"
            ),
            "{distributed}"
        );
        // A quote in a configured path cannot end the string literal.
        let odd = Cluster {
            name: "c".into(),
            zookeeper_path: "/a'b/{table}".into(),
        };
        let [local, _] = cluster_passthrough_ddl(Profile::Legacy, "db", "t", None, &odd);
        assert!(local.contains("('/a\\'b/t', '{replica}')"), "{local}");
    }

    #[test]
    fn the_cluster_check_wants_replicated_tables_and_distributed_ones_beside_them() {
        assert_eq!(
            check_cluster_engines(
                "trades",
                Some("ReplicatedReplacingMergeTree"),
                Some("Distributed")
            ),
            []
        );
        let problems = check_cluster_engines("trades", Some("ReplacingMergeTree"), None);
        assert_eq!(
            problems,
            [
                SchemaError::NotReplicated {
                    table: "trades".into(),
                    engine: "ReplacingMergeTree".into()
                },
                SchemaError::NotDistributed {
                    table: "trades_all".into(),
                    engine: "missing".into()
                }
            ]
        );
        assert!(problems[0]
            .to_string()
            .contains("prism-relay schema apply --profile cluster"));
        let mut actual = columns(Table::Trades, Profile::Legacy);
        actual.retain(|(n, _)| n != "nats_seq");
        let err = check_columns(Table::Trades, &actual, Profile::Legacy)
            .unwrap_err()
            .on_table("trades_all");
        assert!(
            err.to_string()
                .starts_with("table `trades_all` has no column `nats_seq`"),
            "{err}"
        );
    }

    #[test]
    fn server_versions_pick_the_profile() {
        assert_eq!(Profile::for_server_version("18.16.1"), Profile::Legacy);
        assert_eq!(Profile::for_server_version("20.1.2.4"), Profile::Legacy);
        assert_eq!(Profile::for_server_version("22.1.3"), Profile::Legacy);
        assert_eq!(Profile::for_server_version("22.2.1"), Profile::Modern);
        assert_eq!(Profile::for_server_version("22.1.9"), Profile::Legacy);
        assert_eq!(Profile::for_server_version("23.8.16.40"), Profile::Modern);
        assert_eq!(Profile::for_server_version("26.9.1.1"), Profile::Modern);
        assert_eq!(Profile::for_server_version(" 24.3.1\n"), Profile::Modern);
        assert_eq!(Profile::for_server_version("garbage"), Profile::Legacy);
        assert_eq!(ProfileChoice::Auto.resolve(Some("23.8.1")), Profile::Modern);
        assert_eq!(ProfileChoice::Auto.resolve(None), Profile::Legacy);
        assert_eq!(
            ProfileChoice::Legacy.resolve(Some("23.8.1")),
            Profile::Legacy
        );
    }

    #[test]
    fn the_supported_versions_are_stated_once_and_the_same_in_code_docs_and_example() {
        let modern = format!(
            "{}.{}",
            MODERN_SERVER_VERSION_MIN.0, MODERN_SERVER_VERSION_MIN.1
        );
        let legacy = format!(
            "{}.{}",
            LEGACY_SERVER_VERSION_MIN.0, LEGACY_SERVER_VERSION_MIN.1
        );
        assert!(SERVER_VERSIONS_SUMMARY.contains(&format!("modern: ClickHouse {modern} and newer")));
        assert!(SERVER_VERSIONS_SUMMARY.contains(&format!("legacy: ClickHouse {legacy} and newer")));
        let operations = include_str!("../docs/OPERATIONS.md");
        let section = operations
            .split("## Supported ClickHouse versions")
            .nth(1)
            .expect("docs/OPERATIONS.md has a section Supported ClickHouse versions");
        assert!(
            section.contains(&format!("ClickHouse {modern} and newer")),
            "{section}"
        );
        assert!(
            section.contains(&format!("ClickHouse {legacy} and newer")),
            "{section}"
        );
        // 23.8 is what MarketPrism runs, never the floor of a profile: every mention of it says so.
        for (name, text) in [
            ("relay.example.toml", include_str!("../relay.example.toml")),
            ("docs/OPERATIONS.md", operations),
            ("README.md", include_str!("../README.md")),
            ("ARCHITECTURE.md", include_str!("../ARCHITECTURE.md")),
            (
                "src/schema.rs",
                include_str!("schema.rs")
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap_or_default(),
            ),
        ] {
            for line in text
                .lines()
                .filter(|l| l.contains("23.8+") || l.contains("23.8 and"))
            {
                assert!(line.contains("MarketPrism"), "{name}: {line}");
            }
        }
        let example = include_str!("../relay.example.toml");
        let profile_doc = example
            .lines()
            .find(|l| l.starts_with("# modern"))
            .expect("relay.example.toml documents profile");
        assert!(
            profile_doc.contains(&format!("ClickHouse {modern}+")),
            "{profile_doc}"
        );
        assert!(profile_doc.contains("docs/OPERATIONS.md"), "{profile_doc}");
    }

    fn columns(table: impl Into<SchemaTable>, profile: Profile) -> Vec<(String, String)> {
        expected_columns(table)
            .iter()
            .map(|(n, t)| (n.to_string(), t.sql(profile).to_string()))
            .collect()
    }

    /// How `system.columns` spells the modern types.
    fn as_server_spells(t: &str) -> String {
        t.replace("Decimal64(8)", "Decimal(18, 8)")
    }

    #[test]
    fn tables_created_by_either_profile_pass_the_check_in_either_profile() {
        for table in SchemaTable::ALL {
            for created in [Profile::Modern, Profile::Legacy] {
                let mut actual = columns(table, created);
                for (_, t) in &mut actual {
                    *t = as_server_spells(t);
                }
                actual.push(("created_at".into(), "DateTime64(3, 'UTC')".into()));
                for running in [Profile::Modern, Profile::Legacy] {
                    assert_eq!(
                        check_columns(table, &actual, running),
                        Ok(()),
                        "{}",
                        table.name()
                    );
                }
            }
        }
    }

    #[test]
    fn check_columns_names_the_missing_column_and_the_fix() {
        let mut actual = columns(Table::LsrTopPositions, Profile::Modern);
        actual.retain(|(n, _)| n != "long_short_ratio");
        let err = check_columns(Table::LsrTopPositions, &actual, Profile::Modern).unwrap_err();
        assert_eq!(
            err.to_string(),
            "table `lsr_top_positions` has no column `long_short_ratio` (Decimal64(8)): run `prism-relay schema apply` to add it"
        );
        let alters =
            add_missing_columns_ddl(Profile::Modern, "db", Table::LsrTopPositions, &actual);
        assert_eq!(
            alters,
            ["ALTER TABLE `db`.`lsr_top_positions` ADD COLUMN `long_short_ratio` Decimal64(8) CODEC(ZSTD)"]
        );
    }

    #[test]
    fn check_columns_rejects_types_with_another_encoding() {
        let mut actual = columns(Table::Trades, Profile::Modern);
        for (n, t) in &mut actual {
            if n == "price" {
                *t = "Float64".into();
            }
        }
        let err = check_columns(Table::Trades, &actual, Profile::Modern).unwrap_err();
        assert!(matches!(err, SchemaError::ColumnType { ref column, .. } if column == "price"));
        assert!(
            err.to_string()
                .contains("is Float64, but the relay writes Decimal64(8)"),
            "{err}"
        );
        assert_eq!(
            check_columns(Table::Trades, &[], Profile::Legacy),
            Err(SchemaError::MissingTable {
                table: "trades".into()
            })
        );
    }

    #[test]
    fn compatible_spellings_are_accepted_and_nullable_is_not() {
        assert!(ColumnType::DateTime64Ms.accepts("DateTime64(3)"));
        assert!(ColumnType::DateTime64Ms.accepts("DateTime64(3, 'Asia/Shanghai')"));
        assert!(!ColumnType::DateTime64Ms.accepts("DateTime64(6, 'UTC')"));
        assert!(!ColumnType::DateTime64Ms.accepts("DateTime"));
        assert!(ColumnType::Decimal64.accepts("Decimal(18, 8)"));
        assert!(ColumnType::Decimal64.accepts("Decimal(12, 8)"));
        assert!(!ColumnType::Decimal64.accepts("Decimal(38, 8)"));
        assert!(!ColumnType::Decimal64.accepts("Decimal(18, 6)"));
        assert!(ColumnType::LowCardinalityString.accepts("String"));
        assert!(!ColumnType::String.accepts("Nullable(String)"));
        assert!(ColumnType::Bool.accepts("UInt8"));
    }
}
