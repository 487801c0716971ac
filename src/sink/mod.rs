//! ClickHouse sink: the only module that speaks to ClickHouse (invariant 9).
//!
//! The drain hands it batches of typed rows (or JSON objects for subjects without a codec) and a
//! deduplication token; the sink turns each call into exactly one `INSERT` over HTTP with a
//! RowBinary (or JSONEachRow) body compressed with LZ4, using the official `clickhouse` crate, and
//! turns every failure into a classified [`InsertError`] (see [`classify`]): retryable, poison or
//! schema. For poison batches, [`Sink::insert_isolating`] bisects down to the rejected rows (see
//! [`isolate`]) so the rest is stored and only the bad rows go to the dead letters;
//! [`Sink::insert_partitioned`] first splits a batch that spans too many partitions by
//! partition. Isolation inserts are paced per sink (a token bucket shared by the lanes).
//!
//! Main types:
//! - [`Sink`]: a cheap-to-clone handle (one HTTP connection pool) built from [`SinkOptions`].
//! - [`InsertError`] and [`ErrorClass`]: what went wrong and what to do about it.
//! - [`IsolateOutcome`]: rows stored and rows rejected by an isolating insert.
//! - [`DeadLetter`]: the row of the dead-letter table.
//! - [`Backoff`]: the capped exponential schedule for retries while ClickHouse is down.
//!
//! Server generations. With `modern` (ClickHouse 23.8 and newer), the client validates rows
//! against the table's columns (it reads them once per table with `RowBinaryWithNamesAndTypes`)
//! and each insert carries `insert_deduplication_token` with `insert_deduplicate=1`, so a retried
//! batch with the same token is dropped by the server (invariant 7). The legacy profile
//! (ClickHouse 18.16) knows neither the format nor the setting (it rejects unknown settings), so
//! validation is off and no token is sent; there the ReplacingMergeTree tables collapse the
//! duplicates that retries create (invariant 6).
//!
//! With `async_insert` (modern only, off by default), each insert also carries `async_insert=1`,
//! `wait_for_async_insert=1` (the answer comes after the server's flush, so the drain moves its
//! cursor only over stored rows) and `async_insert_deduplicate=1`, with the token as always.
//!
//! Every request is bounded by `insert_timeout_ms` (a paused server makes a request fail as
//! retryable instead of hanging) and every connection attempt by `connect_timeout_ms`.
//!
//! A server behaviour to keep in mind: ClickHouse 18.16 does not check `Enum8` values in RowBinary
//! bodies. An out-of-set value is stored, and every later read of the column fails. Typed rows
//! should carry such columns as strings (or check them before the insert); JSONEachRow bodies
//! are checked by the server and fail as poison.

mod backoff;
pub mod bounded;
pub mod classify;
mod dead_letter;
pub mod isolate;
pub mod json;
pub mod tls;
pub mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

pub use backoff::Backoff;
pub use classify::{BodyFormat, ErrorClass, InsertError};
pub use dead_letter::DeadLetter;
pub use isolate::{
    IsolateOutcome, PoisonRow, ISOLATE_INSERTS_MAX_DEFAULT, ISOLATE_INSERTS_PER_MINUTE_DEFAULT,
};

use bounded::{BoundedConnector, ANSWER_BYTES_MAX};
use classify::from_client_error;
use isolate::Pace;

use crate::redact::redact;

/// Idle pooled connections are closed after this long. It stays below ClickHouse's HTTP
/// keep-alive timeout (3 s in the packaged configs), so the client never reuses a connection the
/// server is closing, which would fail an insert for no reason.
const POOL_IDLE_TIMEOUT_MS: u64 = 2_000;

/// TCP keep-alive probes on pooled connections, to notice a peer that vanished without a reset.
const TCP_KEEPALIVE_MS: u64 = 60_000;

/// Setting names sent with inserts on modern servers.
const SETTING_DEDUP_TOKEN: &str = "insert_deduplication_token";
const SETTING_DEDUPLICATE: &str = "insert_deduplicate";
/// Asynchronous inserts (`[clickhouse] async_insert`, modern servers only): the server buffers
/// inserts from many clients into fewer parts; the relay waits for the flush, so its cursor moves
/// only after the rows are stored, and asks for deduplication, which servers turn off by default
/// for asynchronous inserts.
const SETTING_ASYNC_INSERT: &str = "async_insert";
const SETTING_WAIT_FOR_ASYNC_INSERT: &str = "wait_for_async_insert";
const SETTING_ASYNC_INSERT_DEDUPLICATE: &str = "async_insert_deduplicate";

/// MarketPrism payloads carry fields the passthrough tables do not have; they must be ignored,
/// not rejected (ClickHouse 18.16 knows this setting too).
const SETTING_SKIP_UNKNOWN_FIELDS: &str = "input_format_skip_unknown_fields";

/// How to reach ClickHouse. The relay's configuration is mapped into this.
#[derive(Clone, PartialEq, Eq)]
pub struct SinkOptions {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`, or `https://...` for TLS (see [`tls`]).
    pub url: String,
    /// CA file and client certificate for an `https://` URL; unused for `http://`.
    pub tls: tls::TlsFiles,
    /// User name; empty means the server's default user.
    pub user: String,
    /// Password; empty means none.
    pub password: String,
    /// Database that holds the tables; table names passed to inserts are relative to it.
    pub database: String,
    /// Upper bound on one request (insert or query), from connecting to the server's answer.
    pub insert_timeout_ms: u64,
    /// Upper bound on establishing one TCP connection.
    pub connect_timeout_ms: u64,
    /// Insert bodies are LZ4-compressed (ClickHouse's compressed blocks, `decompress=1`).
    pub compress: bool,
    /// True for ClickHouse 23.8 and newer: row validation and deduplication tokens are used.
    pub modern: bool,
    /// Inserts are asynchronous (`async_insert=1, wait_for_async_insert=1`, deduplication on);
    /// only with `modern`, since 18.16 rejects settings it does not know.
    pub async_insert: bool,
    /// Floor of the inserts one isolating insert may issue while bisecting a poison batch; a
    /// batch of `n` rows always gets at least `2n - 1`, so no good row is dead-lettered.
    pub isolate_inserts_max: u32,
    /// Isolation inserts (every insert of an isolating call after its first) this sink issues
    /// per minute, over all lanes; a batch that finds them spent waits and is retried.
    pub isolate_inserts_per_minute: u32,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            url: "http://127.0.0.1:8123".to_owned(),
            tls: tls::TlsFiles::default(),
            user: String::new(),
            password: String::new(),
            database: "marketprism_hot".to_owned(),
            insert_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            compress: true,
            modern: true,
            async_insert: false,
            isolate_inserts_max: ISOLATE_INSERTS_MAX_DEFAULT,
            isolate_inserts_per_minute: ISOLATE_INSERTS_PER_MINUTE_DEFAULT,
        }
    }
}

impl fmt::Debug for SinkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password stays out of logs.
        f.debug_struct("SinkOptions")
            .field("url", &redact(&self.url))
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("database", &self.database)
            .field("insert_timeout_ms", &self.insert_timeout_ms)
            .field("compress", &self.compress)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("modern", &self.modern)
            .field("async_insert", &self.async_insert)
            .field("isolate_inserts_max", &self.isolate_inserts_max)
            .field(
                "isolate_inserts_per_minute",
                &self.isolate_inserts_per_minute,
            )
            .finish()
    }
}

/// Failures of the sink's non-insert operations.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The options cannot work; nothing was sent.
    #[error("invalid ClickHouse sink options: {reason}")]
    InvalidOptions { reason: String },
    /// The TLS files of an `https://` URL cannot be used; nothing was sent.
    #[error("the ClickHouse TLS files cannot be used")]
    Tls {
        #[source]
        source: tls::TlsError,
    },
    /// A query or statement failed; `source.class` tells whether waiting can help.
    #[error("ClickHouse statement `{statement}` failed")]
    Query {
        statement: String,
        #[source]
        source: InsertError,
    },
}

impl SinkError {
    /// The failure as an insert's error, so that a query retried like an insert is classified
    /// like one.
    pub fn into_insert_error(self) -> InsertError {
        match self {
            SinkError::Query { source, .. } => source,
            other => InsertError::retryable(other.to_string()),
        }
    }

    /// The class of the underlying ClickHouse failure, if one was sent.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            SinkError::InvalidOptions { .. } | SinkError::Tls { .. } => None,
            SinkError::Query { source, .. } => Some(source.class),
        }
    }
}

/// How a table's `timestamp` column holds the row time ([`Sink::row_time_column`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowTime {
    /// `DateTime64(3)`: the modern profile.
    DateTime64,
    /// `Int64` epoch milliseconds: the legacy profile.
    EpochMs,
}

/// A handle on one ClickHouse server or cluster endpoint; clones share the connection pool.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<Inner>,
}

struct Inner {
    client: clickhouse::Client,
    /// Bytes this sink's connections wrote (see [`wire`]).
    wire: Arc<wire::WireBytes>,
    opts: SinkOptions,
    request_timeout: Duration,
    /// The rate of isolation inserts, shared by every clone (every lane) of this sink.
    pace: Pace,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink")
            .field("opts", &self.inner.opts)
            .finish()
    }
}

/// One row of the `system.columns` query.
#[derive(Debug, Deserialize)]
struct ColumnRow {
    table: String,
    name: String,
    r#type: String,
}

/// One row of the `system.tables` query of [`Sink::table_engines`].
#[derive(Debug, Deserialize)]
struct EngineRow {
    name: String,
    engine: String,
}

/// A `clickhouse` client for `url` on the sink's connector: connection attempts bounded by
/// `connect_timeout_ms`, every answer bounded by [`ANSWER_BYTES_MAX`], TLS per `tls` for an
/// `https://` URL. The sink and the operator tools (`verify`) use it, so both reach the same
/// servers the same way. User, password and database are the caller's to set.
pub fn http_client(
    url: &str,
    tls: &tls::TlsFiles,
    connect_timeout_ms: u64,
) -> Result<clickhouse::Client, SinkError> {
    Ok(client_on(connector(url, tls, connect_timeout_ms)?, url))
}

/// The sink's connector for `url`: TCP with the connect timeout, keepalive and nodelay, TLS for
/// `https://` inside the bounded (and counted) connection.
fn connector(
    url: &str,
    tls: &tls::TlsFiles,
    connect_timeout_ms: u64,
) -> Result<BoundedConnector, SinkError> {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_connect_timeout(Some(Duration::from_millis(connect_timeout_ms)));
    tcp.set_keepalive(Some(Duration::from_millis(TCP_KEEPALIVE_MS)));
    tcp.set_nodelay(true);
    if !url.starts_with("https://") {
        return Ok(BoundedConnector::new(tcp, ANSWER_BYTES_MAX));
    }
    // The TCP connector refuses https:// URIs unless told the TLS is done above it.
    tcp.enforce_http(false);
    let config = tls::client_config(tls).map_err(|source| SinkError::Tls { source })?;
    Ok(BoundedConnector::new(tcp, ANSWER_BYTES_MAX).with_tls(Arc::new(config)))
}

/// A `clickhouse` client for `url` on `connector`, with the sink's connection pool settings.
fn client_on(connector: BoundedConnector, url: &str) -> clickhouse::Client {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(POOL_IDLE_TIMEOUT_MS))
        .build(connector);
    clickhouse::Client::with_http_client(http).with_url(url)
}

impl Sink {
    /// Builds the client and its connection pool; no request is sent until the first call.
    pub fn new(opts: SinkOptions) -> Result<Sink, SinkError> {
        let invalid = |reason: &str| SinkError::InvalidOptions {
            reason: reason.to_owned(),
        };
        let host_at = if opts.url.starts_with("https://") {
            "https://".len()
        } else if opts.url.starts_with("http://") {
            "http://".len()
        } else {
            return Err(invalid("url must start with http:// or https://"));
        };
        if opts.url.len() <= host_at {
            return Err(invalid("url has no host"));
        }
        if opts.database.is_empty() {
            return Err(invalid("database must not be empty"));
        }
        if opts.insert_timeout_ms == 0 || opts.connect_timeout_ms == 0 {
            return Err(invalid(
                "insert_timeout_ms and connect_timeout_ms must be positive",
            ));
        }
        if opts.isolate_inserts_max == 0 {
            return Err(invalid("isolate_inserts_max must be positive"));
        }
        if opts.isolate_inserts_per_minute == 0 {
            return Err(invalid("isolate_inserts_per_minute must be positive"));
        }
        if opts.async_insert && !opts.modern {
            return Err(invalid(
                "async_insert needs a modern server (the legacy profile knows no such setting)",
            ));
        }

        let connector = connector(&opts.url, &opts.tls, opts.connect_timeout_ms)?;
        let wire = connector.wire_bytes();
        let mut client = client_on(connector, &opts.url)
            .with_database(&opts.database)
            .with_compression(if opts.compress {
                clickhouse::Compression::Lz4
            } else {
                clickhouse::Compression::None
            })
            // Validation reads the columns with RowBinaryWithNamesAndTypes, which 18.16 lacks.
            .with_validation(opts.modern);
        if !opts.user.is_empty() {
            client = client.with_user(&opts.user);
        }
        if !opts.password.is_empty() {
            client = client.with_password(&opts.password);
        }
        let request_timeout = Duration::from_millis(opts.insert_timeout_ms);
        Ok(Sink {
            inner: Arc::new(Inner {
                client,
                wire,
                pace: Pace::new(opts.isolate_inserts_per_minute, std::time::Instant::now()),
                opts,
                request_timeout,
            }),
        })
    }

    /// Bytes sent to ClickHouse by this sink and its clones: on the wire (compressed) and
    /// request bodies before compression (see [`wire`]).
    pub fn wire_bytes(&self) -> Arc<wire::WireBytes> {
        self.inner.wire.clone()
    }

    /// The options this sink was built with.
    pub fn options(&self) -> &SinkOptions {
        &self.inner.opts
    }

    /// The server's version string (`SELECT version()`), e.g. `18.16.1` or `23.8.16.16`.
    ///
    /// Read as JSONEachRow, which every server generation writes, so it works before the profile
    /// is known (the `auto` profile asks this first) and whatever `modern` says.
    pub async fn server_version(&self) -> Result<String, SinkError> {
        const SQL: &str = "SELECT version() AS version";
        #[derive(Deserialize)]
        struct Version {
            version: String,
        }
        let rows: Vec<Version> = self.fetch_json_rows(SQL, None).await?;
        match rows.into_iter().next() {
            Some(row) => Ok(row.version),
            None => Err(SinkError::Query {
                statement: SQL.to_owned(),
                source: InsertError::retryable("the server returned no row"),
            }),
        }
    }

    /// Runs one statement (DDL) as given; `?` is not treated as a placeholder.
    pub async fn execute(&self, sql: &str) -> Result<(), SinkError> {
        let query = self.inner.client.query_raw(sql).execute();
        self.bounded_query(sql, query).await
    }

    /// The columns of every table in `database` as `(name, type)` in declaration order, keyed by
    /// table name. ClickHouse lists a table's columns in declaration order; the rows are grouped
    /// here without re-sorting so that order is kept.
    pub async fn table_columns(
        &self,
        database: &str,
    ) -> Result<BTreeMap<String, Vec<(String, String)>>, SinkError> {
        const SQL: &str = "SELECT table, name, type FROM system.columns WHERE database = ?";
        let rows: Vec<ColumnRow> = self.fetch_json_rows(SQL, Some(database)).await?;
        let mut tables: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for row in rows {
            tables
                .entry(row.table)
                .or_default()
                .push((row.name, row.r#type));
        }
        Ok(tables)
    }

    /// The engine of each table in `database`, by table name, from `system.tables`.
    pub async fn table_engines(
        &self,
        database: &str,
    ) -> Result<BTreeMap<String, String>, SinkError> {
        const SQL: &str = "SELECT name, engine FROM system.tables WHERE database = ?";
        let rows: Vec<EngineRow> = self.fetch_json_rows(SQL, Some(database)).await?;
        Ok(rows.into_iter().map(|row| (row.name, row.engine)).collect())
    }

    /// Inserts `rows` into `table` (relative to the configured database) with ONE `INSERT`,
    /// RowBinary, LZ4. On modern servers a `dedup_token` is sent as `insert_deduplication_token`.
    /// An empty slice sends nothing.
    pub async fn insert<T>(
        &self,
        table: &str,
        rows: &[T],
        dedup_token: Option<&str>,
    ) -> Result<(), InsertError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Sync,
    {
        if rows.is_empty() {
            return Ok(());
        }
        self.insert_rows(table, rows.iter(), dedup_token).await
    }

    /// [`Sink::insert`] of the rows `rows` yields, in that order; the caller ensures there is one.
    async fn insert_rows<'r, T>(
        &self,
        table: &str,
        rows: impl Iterator<Item = &'r T> + Send,
        dedup_token: Option<&str>,
    ) -> Result<(), InsertError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Sync + 'r,
    {
        let client = &self.inner.client;
        let classify = |e: clickhouse::error::Error| from_client_error(&e, BodyFormat::RowBinary);
        let request = async {
            let mut insert = client.insert::<T>(table).await.map_err(classify)?;
            if let Some(token) = self.token_to_send(dedup_token) {
                insert = insert
                    .with_setting(SETTING_DEDUP_TOKEN, token)
                    .with_setting(SETTING_DEDUPLICATE, "1");
            }
            for &(name, value) in self.async_settings() {
                insert = insert.with_setting(name, value);
            }
            for row in rows {
                insert.write(row).await.map_err(classify)?;
            }
            insert.end().await.map_err(classify)
        };
        let result = self.bounded_insert(table, request).await;
        if let Err(error) = &result {
            if error.class == ErrorClass::Schema && self.inner.opts.modern {
                // The client caches each table's columns for validation; after a schema error the
                // operator may fix the table, and the retry must see the new columns.
                self.inner.client.clear_cached_metadata().await;
            }
        }
        result
    }

    /// Inserts `rows` like [`Sink::insert`]; if ClickHouse rejects them as poison, bisects until
    /// the rejected rows are isolated, storing the others (see [`isolate`] for the guarantees).
    /// A retryable or schema error on any sub-insert is returned and the caller retries the batch.
    /// The rows are taken to lie in one partition; [`Sink::insert_partitioned`] knows better.
    pub async fn insert_isolating<T>(
        &self,
        table: &str,
        rows: &[T],
        dedup_token: Option<&str>,
    ) -> Result<IsolateOutcome, InsertError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Sync,
    {
        self.insert_partitioned(table, rows, dedup_token, |_| ())
            .await
    }

    /// [`Sink::insert_isolating`] for rows whose partition in `table` is `partition_of(row)`: a
    /// batch refused for spanning too many partitions is split by partition, one insert per
    /// partition, before any bisection (see [`isolate`]).
    pub async fn insert_partitioned<T, K>(
        &self,
        table: &str,
        rows: &[T],
        dedup_token: Option<&str>,
        partition_of: impl Fn(&T) -> K,
    ) -> Result<IsolateOutcome, InsertError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Sync,
        K: Eq + std::hash::Hash,
    {
        let outcome = isolate::isolate(
            rows.len(),
            dedup_token,
            self.inner.opts.isolate_inserts_max,
            &self.inner.pace,
            |i| partition_of(&rows[i]),
            |selection, token| async move {
                let picked = selection.indices().map(|i| &rows[i]);
                self.insert_rows(table, picked, token.as_deref()).await
            },
        )
        .await?;
        log_isolation(table, rows.len(), &outcome);
        Ok(outcome)
    }

    /// Inserts dead letters into `table` (the dead-letter table's name) with one `INSERT`.
    /// Generic so that any row type with the dead-letter columns can be written ([`DeadLetter`]
    /// is the sink's own).
    pub async fn insert_dead_letters<T>(
        &self,
        table: &str,
        rows: &[T],
        dedup_token: Option<&str>,
    ) -> Result<(), InsertError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite + Sync,
    {
        self.insert(table, rows, dedup_token).await
    }

    /// Inserts a pre-formatted JSONEachRow body (newline-separated JSON objects) into `table` with
    /// one `INSERT`, LZ4-compressed. Fields the table lacks are ignored. An empty body sends nothing.
    pub async fn insert_json_each_row(
        &self,
        table: &str,
        body: &[u8],
        dedup_token: Option<&str>,
    ) -> Result<(), InsertError> {
        if body.trim_ascii().is_empty() {
            return Ok(());
        }
        let sql = format!("INSERT INTO {} FORMAT JSONEachRow", quote_identifier(table));
        let mut insert = self
            .inner
            .client
            .insert_formatted_with(sql)
            .with_setting(SETTING_SKIP_UNKNOWN_FIELDS, "1");
        if let Some(token) = self.token_to_send(dedup_token) {
            insert = insert
                .with_setting(SETTING_DEDUP_TOKEN, token)
                .with_setting(SETTING_DEDUPLICATE, "1");
        }
        for &(name, value) in self.async_settings() {
            insert = insert.with_setting(name, value);
        }
        let classify = |e: clickhouse::error::Error| from_client_error(&e, BodyFormat::Text);
        let body = Bytes::copy_from_slice(body);
        let request = async move {
            insert.send(body).await.map_err(classify)?;
            insert.end().await.map_err(classify)
        };
        self.bounded_insert(table, request).await
    }

    /// Inserts JSON objects (one per element, e.g. one per message) as JSONEachRow, isolating the
    /// rows ClickHouse rejects like [`Sink::insert_isolating`]. Rows that are not exactly one JSON
    /// object are reported as poison without being sent (see [`json`]); the remaining rows are
    /// bisected by position among themselves, which is deterministic for a given batch.
    /// For a newline-separated body, pass [`json::split_lines`] of it; indices are then line numbers.
    pub async fn insert_json_isolating<R>(
        &self,
        table: &str,
        rows: &[R],
        dedup_token: Option<&str>,
    ) -> Result<IsolateOutcome, InsertError>
    where
        R: AsRef<[u8]> + Sync,
    {
        let mut rejected = Vec::new();
        let mut valid: Vec<(usize, &[u8])> = Vec::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            match json::check_json_row(row.as_ref()) {
                Ok(()) => valid.push((index, row.as_ref())),
                Err(message) => rejected.push(PoisonRow {
                    index,
                    error: InsertError {
                        class: ErrorClass::Poison,
                        message,
                        code: None,
                    },
                }),
            }
        }
        let valid = &valid;
        // Passthrough rows are not parsed here, so their partition is unknown: one key for all.
        let mut outcome = isolate::isolate(
            valid.len(),
            dedup_token,
            self.inner.opts.isolate_inserts_max,
            &self.inner.pace,
            |_| (),
            |selection, token| async move {
                let lines: Vec<&[u8]> = selection.indices().map(|i| valid[i].1).collect();
                let body = json::json_each_row_body(&lines);
                self.insert_json_each_row(table, &body, token.as_deref())
                    .await
            },
        )
        .await?;
        // Indices from the bisection refer to positions among the valid rows.
        for poison in &mut outcome.poison {
            poison.index = valid[poison.index].0;
        }
        outcome.poison.extend(rejected);
        outcome.poison.sort_by_key(|p| p.index);
        log_isolation(table, rows.len(), &outcome);
        Ok(outcome)
    }

    /// Runs a `SELECT` as given (`?` is not a placeholder: the caller quotes its literals) and
    /// parses its JSONEachRow answer, whose size the connector bounds. The audit reads with it.
    pub async fn select_json_rows<R: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
    ) -> Result<Vec<R>, SinkError> {
        self.fetch_json_query(sql, self.inner.client.query_raw(sql))
            .await
    }

    /// Runs a query (with at most one bound string) and parses its JSONEachRow answer. Reads go
    /// through JSON rather than the crate's typed rows so they never depend on validation,
    /// whose RowBinaryWithNamesAndTypes format 18.16 lacks.
    async fn fetch_json_rows<R: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        bound: Option<&str>,
    ) -> Result<Vec<R>, SinkError> {
        let mut query = self.inner.client.query(sql);
        if let Some(value) = bound {
            query = query.bind(value);
        }
        self.fetch_json_query(sql, query).await
    }

    /// Fetches `query` (whose text is `sql`) as JSONEachRow and parses each line.
    async fn fetch_json_query<R: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        query: clickhouse::query::Query,
    ) -> Result<Vec<R>, SinkError> {
        let body = self.fetch_answer(sql, query, "JSONEachRow").await?;
        let mut rows = Vec::new();
        for line in json::split_lines(&body) {
            let row = serde_json::from_slice(line).map_err(|e| SinkError::Query {
                statement: sql.to_owned(),
                source: InsertError::retryable(format!("unreadable answer row: {e}")),
            })?;
            rows.push(row);
        }
        Ok(rows)
    }

    /// Whether inserts carry their deduplication token, so that the server may drop a retried
    /// insert as a duplicate (modern servers only).
    pub fn sends_tokens(&self) -> bool {
        self.token_to_send(Some("")).is_some()
    }

    /// How `table`'s `timestamp` column holds the row time: `DateTime64(3)` in tables of the
    /// modern profile, `Int64` milliseconds in tables the legacy profile created (which a server
    /// upgraded since still holds); none for any other type, or no such column.
    pub async fn row_time_column(&self, table: &str) -> Result<Option<RowTime>, InsertError> {
        const SQL: &str = "SELECT type FROM system.columns \
             WHERE database = currentDatabase() AND table = ? AND name = 'timestamp'";
        let query = self.inner.client.query(SQL).bind(table);
        let answer = self
            .fetch_answer(SQL, query, "TabSeparated")
            .await
            .map_err(SinkError::into_insert_error)?;
        let column_type = String::from_utf8_lossy(&answer);
        let column_type = column_type.trim();
        Ok(if column_type.starts_with("DateTime64(3") {
            Some(RowTime::DateTime64)
        } else if column_type == "Int64" {
            Some(RowTime::EpochMs)
        } else {
            None
        })
    }

    /// The distinct `nats_seq` of the rows of `table` from `stream` with a sequence in `seqs`,
    /// narrowed to rows whose `timestamp` (held as `time.0` says) lies within `time.1..=time.2`
    /// (epoch milliseconds) when given, so that only the parts of that time are read. The
    /// read-back that tells whether the rows of a batch are stored.
    pub async fn stored_seqs(
        &self,
        table: &str,
        stream: &str,
        seqs: std::ops::RangeInclusive<u64>,
        time: Option<(RowTime, i64, i64)>,
    ) -> Result<std::collections::HashSet<u64>, InsertError> {
        let mut sql = String::from(
            "SELECT DISTINCT nats_seq FROM ? WHERE nats_stream = ? AND nats_seq BETWEEN ? AND ?",
        );
        match time {
            Some((RowTime::DateTime64, ..)) => sql.push_str(
                " AND timestamp BETWEEN fromUnixTimestamp64Milli(toInt64(?), 'UTC') \
                 AND fromUnixTimestamp64Milli(toInt64(?), 'UTC')",
            ),
            Some((RowTime::EpochMs, ..)) => sql.push_str(" AND timestamp BETWEEN ? AND ?"),
            None => {}
        }
        let mut query = self
            .inner
            .client
            .query(&sql)
            .bind(clickhouse::sql::Identifier(table))
            .bind(stream)
            .bind(*seqs.start())
            .bind(*seqs.end());
        if let Some((_, lo, hi)) = time {
            query = query.bind(lo).bind(hi);
        }
        let body = self
            .fetch_answer(&sql, query, "TabSeparated")
            .await
            .map_err(SinkError::into_insert_error)?;
        let mut found = std::collections::HashSet::new();
        for line in json::split_lines(&body) {
            let seq = std::str::from_utf8(line)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    InsertError::retryable(format!(
                        "unreadable answer to `{sql}`: {:?}",
                        String::from_utf8_lossy(line)
                    ))
                })?;
            found.insert(seq);
        }
        Ok(found)
    }

    /// The answer to `query` (whose text is `sql`) in `format`, within the request timeout.
    async fn fetch_answer(
        &self,
        sql: &str,
        query: clickhouse::query::Query,
        format: &'static str,
    ) -> Result<Bytes, SinkError> {
        let fetch = async move {
            let mut cursor = query.fetch_bytes(format)?;
            cursor.collect().await
        };
        self.bounded_query(sql, fetch).await
    }

    /// The deduplication token to send: only modern servers know the setting.
    fn token_to_send<'a>(&self, token: Option<&'a str>) -> Option<&'a str> {
        token.filter(|_| self.inner.opts.modern)
    }

    /// The settings of an asynchronous insert, when configured (none otherwise).
    fn async_settings(&self) -> &'static [(&'static str, &'static str)] {
        const ASYNC: [(&str, &str); 3] = [
            (SETTING_ASYNC_INSERT, "1"),
            (SETTING_WAIT_FOR_ASYNC_INSERT, "1"),
            (SETTING_ASYNC_INSERT_DEDUPLICATE, "1"),
        ];
        let opts = &self.inner.opts;
        if opts.async_insert && opts.modern {
            &ASYNC
        } else {
            &[]
        }
    }

    /// Bounds an insert by the request timeout; a timeout is retryable.
    async fn bounded_insert(
        &self,
        table: &str,
        request: impl Future<Output = Result<(), InsertError>>,
    ) -> Result<(), InsertError> {
        match tokio::time::timeout(self.inner.request_timeout, request).await {
            // A client error may quote the URL, whose user info may hold a password.
            Ok(result) => result.map_err(|mut error| {
                error.message = redact(&error.message).into_owned();
                error
            }),
            // Dropping the request aborts it; the server may still finish it, which the
            // deduplication token (modern) or the ReplacingMergeTree (legacy) absorbs on retry.
            Err(_) => Err(InsertError::retryable(format!(
                "insert into {table} timed out after {} ms",
                self.inner.opts.insert_timeout_ms
            ))),
        }
    }

    /// Bounds a query by the request timeout and classifies its failure.
    async fn bounded_query<V>(
        &self,
        statement: &str,
        query: impl Future<Output = clickhouse::error::Result<V>>,
    ) -> Result<V, SinkError> {
        let failed = |mut source: InsertError| {
            // A client error may quote the URL, whose user info may hold a password.
            source.message = redact(&source.message).into_owned();
            SinkError::Query {
                statement: statement.to_owned(),
                source,
            }
        };
        match tokio::time::timeout(self.inner.request_timeout, query).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(failed(from_client_error(&e, BodyFormat::None))),
            Err(_) => Err(failed(InsertError::retryable(format!(
                "timed out after {} ms",
                self.inner.opts.insert_timeout_ms
            )))),
        }
    }
}

/// Logs the result of an isolation that found poison rows or split a batch by partition.
fn log_isolation(table: &str, rows: usize, outcome: &IsolateOutcome) {
    if outcome.poison.is_empty() && outcome.partition_groups > 0 {
        tracing::info!(
            table,
            rows,
            inserts = outcome.inserts,
            partition_groups = outcome.partition_groups,
            "a batch spanning too many partitions was inserted one partition at a time"
        );
    }
    if !outcome.poison.is_empty() {
        tracing::warn!(
            table,
            rows,
            poison_rows = outcome.poison.len(),
            inserts = outcome.inserts,
            partition_groups = outcome.partition_groups,
            first_error = %outcome.poison[0].error.message,
            "rows rejected by ClickHouse were isolated"
        );
    }
}

/// True when `url`'s host is `localhost` or a loopback address (127.0.0.0/8, `::1`): a
/// server on the same machine, where compressing request bodies saves no bandwidth. The host is
/// read as the connector reads it ([`hyper::Uri`]), so it is the host the relay connects to.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    // The URI keeps the brackets of an IPv6 literal.
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Quotes a table name for SQL: backquotes, with backslashes and backquotes escaped.
fn quote_identifier(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('`');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_from_remote_ones() {
        for url in [
            "http://127.0.0.1:8123",
            "http://127.3.2.1",
            "https://localhost:8443/",
            "http://LOCALHOST",
            "http://user:secret@127.0.0.1:8123/?database=x",
            "http://[::1]:8123",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:8123",
            "https://clickhouse.example.com",
            "http://localhost.example.com:8123",
            "http://[2001:db8::1]:8123",
            "http://127.0.0.1.example.com",
            "http://user@192.168.1.9",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn identifiers_are_backquoted_with_escapes() {
        assert_eq!(quote_identifier("trades"), "`trades`");
        assert_eq!(quote_identifier("a`b\\c"), "`a\\`b\\\\c`");
    }

    #[test]
    fn options_that_cannot_work_are_refused_before_any_request() {
        let bad = [
            SinkOptions {
                url: "ftp://example.com".into(),
                ..SinkOptions::default()
            },
            SinkOptions {
                url: "https://".into(),
                ..SinkOptions::default()
            },
            SinkOptions {
                url: "http://".into(),
                ..SinkOptions::default()
            },
            SinkOptions {
                insert_timeout_ms: 0,
                ..SinkOptions::default()
            },
            SinkOptions {
                database: String::new(),
                ..SinkOptions::default()
            },
            SinkOptions {
                modern: false,
                async_insert: true,
                ..SinkOptions::default()
            },
        ];
        for opts in bad {
            assert!(matches!(
                Sink::new(opts),
                Err(SinkError::InvalidOptions { .. })
            ));
        }
    }

    #[test]
    fn tokens_are_sent_only_to_modern_servers() {
        let modern = Sink::new(SinkOptions::default()).expect("valid options");
        assert_eq!(modern.token_to_send(Some("t")), Some("t"));
        let legacy = Sink::new(SinkOptions {
            modern: false,
            ..SinkOptions::default()
        })
        .expect("valid options");
        assert_eq!(legacy.token_to_send(Some("t")), None);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let opts = SinkOptions {
            password: "hunter2".into(),
            ..SinkOptions::default()
        };
        assert!(!format!("{opts:?}").contains("hunter2"));
    }

    #[derive(Debug, clickhouse::Row, serde::Serialize)]
    struct Probe {
        id: u64,
    }

    fn assert_send<F: Send>(_: &F) {}

    #[test]
    fn sink_and_its_futures_can_move_across_threads() {
        fn assert_handle<T: Send + Sync + Clone + 'static>() {}
        assert_handle::<Sink>();
        let sink = Sink::new(SinkOptions::default()).expect("valid options");
        let rows = [Probe { id: 1 }];
        let lines = [&b"{}"[..]];
        // The futures are only built, never polled: no server is contacted.
        assert_send(&sink.insert("t", &rows, Some("x")));
        assert_send(&sink.insert_isolating("t", &rows, Some("x")));
        assert_send(&sink.insert_partitioned("t", &rows, Some("x"), |r| r.id % 12));
        assert_send(&sink.insert_json_each_row("t", b"{}", None));
        assert_send(&sink.insert_json_isolating("t", &lines, None));
        assert_send(&sink.insert_dead_letters::<DeadLetter>("dead_letters", &[], None));
        assert_send(&sink.server_version());
        assert_send(&sink.table_columns("db"));
        assert_send(&sink.execute("SELECT 1"));
    }
}
