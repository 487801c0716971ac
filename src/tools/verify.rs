//! `verify`: the no-loss check. Compares the message identities a JetStream range holds
//! with the rows ClickHouse stored and the dead letters it recorded.
//!
//! Every row the relay writes carries the identity of the message that produced it
//! (`nats_stream`, `nats_seq`). `verify` reads the subject and sequence of every message in
//! each stream range with an ordered, headers-only consumer (no payloads cross the wire),
//! routes each by its first subject token to its table, then asks ClickHouse per table
//! `SELECT nats_seq, count() ... FINAL` for the same stream and range, and asks the
//! dead-letter table which sequences it holds. [`tally_table`] does the accounting as a pure
//! function: each published identity is stored, dead-lettered or lost; identities with more
//! than one row are duplicated; rows whose identity was not published to that table are
//! unexpected. Ranges are processed in chunks of `chunk_seqs` sequences, so memory stays
//! bounded whatever the range.
//!
//! [`run`] checks the streams and range of the options (by default every stream whose
//! subjects carry MarketPrism data types, each whole); [`run_ranges`] checks a range of
//! its own per stream, such as the sequences a `loadgen` run reported.
//!
//! The queries are plain enough for ClickHouse 18.16 (`FINAL` on ReplacingMergeTree,
//! RowBinary output), where the `clickhouse` crate must run without schema validation.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use clickhouse::sql::Identifier;
use futures_util::StreamExt as _;
use serde::Deserialize;

use super::{connect_nats, refuse_secret_in_flag, DataType, ToolError};
use crate::config::NatsConfig;
use crate::redact::{redact, REDACTED};

/// Lost and duplicated identities kept per table for the report, as examples to look up.
pub const SAMPLE_MAX: usize = 10;

/// Default sequences per chunk: bounds memory (about 16 bytes per identity) while keeping
/// the number of ClickHouse round trips small.
pub const CHUNK_SEQS_DEFAULT: u64 = 1_000_000;

/// Bound on one connection attempt to ClickHouse, in milliseconds: the relay's default
/// `connect_timeout_ms`, so an unreachable server fails the check instead of hanging.
const VERIFY_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Options of `verify`; also its command-line flags. `Debug` is written out so that it never
/// shows the password or a URL's credentials.
#[derive(Clone, PartialEq, clap::Args)]
pub struct VerifyOptions {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Streams to check (comma separated or repeated); default every stream whose subjects
    /// carry MarketPrism data types.
    #[arg(long = "stream", value_name = "NAME", value_delimiter = ',')]
    pub streams: Vec<String>,
    /// First stream sequence to check (default the stream's first).
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last stream sequence to check (default the stream's last at start).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// ClickHouse HTTP URL.
    #[arg(long, default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// CA file and client certificate for an `https://` ClickHouse URL, from `--config`.
    #[arg(skip)]
    pub clickhouse_tls: crate::tls::TlsFiles,
    /// ClickHouse user.
    #[arg(long, default_value = "default")]
    pub clickhouse_user: String,
    /// ClickHouse password (empty: none). Not a flag, which would show it in `ps`: the binary
    /// takes it from the relay's configuration (`--config`).
    #[arg(skip)]
    pub clickhouse_password: String,
    /// NATS authentication (the relay's `[nats]` section), from `--config`; none by default.
    #[arg(skip)]
    pub nats: Option<NatsConfig>,
    /// Database holding the MarketPrism tables.
    #[arg(long, default_value = "marketprism_hot")]
    pub database: String,
    /// Dead-letter table (in the same database).
    #[arg(long, default_value = "dead_letters")]
    pub dead_letter_table: String,
    /// Let the ClickHouse client check result types against the rows it decodes (it asks
    /// for RowBinaryWithNamesAndTypes, which ClickHouse 18.16 lacks; leave off there).
    #[arg(long)]
    pub clickhouse_validation: bool,
    /// Sequences checked per round (bounds memory).
    #[arg(long, default_value_t = CHUNK_SEQS_DEFAULT)]
    pub chunk_seqs: u64,
    /// Fail when the stream sends nothing for this long while messages are still expected.
    #[arg(long, default_value_t = 5_000)]
    pub idle_timeout_ms: u64,
}

impl fmt::Debug for VerifyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.clickhouse_password.is_empty() {
            ""
        } else {
            REDACTED
        };
        f.debug_struct("VerifyOptions")
            .field("nats_url", &redact(&self.nats_url))
            .field("streams", &self.streams)
            .field("from_seq", &self.from_seq)
            .field("to_seq", &self.to_seq)
            .field("clickhouse_url", &redact(&self.clickhouse_url))
            .field("clickhouse_tls", &self.clickhouse_tls)
            .field("clickhouse_user", &self.clickhouse_user)
            .field("clickhouse_password", &password)
            .field("nats", &self.nats)
            .field("database", &self.database)
            .field("dead_letter_table", &self.dead_letter_table)
            .field("clickhouse_validation", &self.clickhouse_validation)
            .field("chunk_seqs", &self.chunk_seqs)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .finish()
    }
}

impl VerifyOptions {
    /// Refuses URL flags that carry credentials (see [`refuse_secret_in_flag`]); run before the
    /// configuration replaces the flags.
    pub fn refuse_secrets_in_flags(&self) -> Result<(), ToolError> {
        refuse_secret_in_flag("--nats-url", "NATS", &self.nats_url)?;
        refuse_secret_in_flag("--clickhouse-url", "CLICKHOUSE", &self.clickhouse_url)
    }
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            nats_url: "nats://127.0.0.1:4222".into(),
            streams: Vec::new(),
            from_seq: None,
            to_seq: None,
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_tls: crate::tls::TlsFiles::default(),
            clickhouse_user: "default".into(),
            clickhouse_password: String::new(),
            nats: None,
            database: "marketprism_hot".into(),
            dead_letter_table: "dead_letters".into(),
            clickhouse_validation: false,
            chunk_seqs: CHUNK_SEQS_DEFAULT,
            idle_timeout_ms: 5_000,
        }
    }
}

/// A message identity: the stream and the stream sequence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub stream: String,
    pub seq: u64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.stream, self.seq)
    }
}

/// The accounting of one table (or of all, in [`VerifyReport::totals`]).
///
/// `published == stored + dead_lettered + lost` always holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableTally {
    /// Identities published to this table's subjects in the checked ranges.
    pub published: u64,
    /// Published identities with at least one row.
    pub stored: u64,
    /// Published identities with no row but a dead letter.
    pub dead_lettered: u64,
    /// Published identities with neither a row nor a dead letter.
    pub lost: u64,
    /// Identities with more than one row under FINAL.
    pub duplicated: u64,
    /// Identities with rows in this table that were not published to it in the range.
    pub unexpected: u64,
    /// A few lost identities, to look up.
    pub lost_sample: Vec<Identity>,
    /// A few duplicated identities, to look up.
    pub duplicated_sample: Vec<Identity>,
}

impl TableTally {
    fn add(&mut self, other: &TableTally) {
        self.published += other.published;
        self.stored += other.stored;
        self.dead_lettered += other.dead_lettered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.unexpected += other.unexpected;
        for (dst, src) in [
            (&mut self.lost_sample, &other.lost_sample),
            (&mut self.duplicated_sample, &other.duplicated_sample),
        ] {
            let room = SAMPLE_MAX.saturating_sub(dst.len());
            dst.extend(src.iter().take(room).cloned());
        }
    }
}

/// The accounting of one table for one stream range, as a pure function.
///
/// `published`: the sequences published to the table's subjects (each once);
/// `stored`: `(nats_seq, rows)` as ClickHouse reported them under FINAL for that stream and
/// range; `dead_lettered`: the sequences of that stream and range in the dead-letter table.
pub fn tally_table(
    stream: &str,
    published: &[u64],
    stored: &[(u64, u64)],
    dead_lettered: &HashSet<u64>,
) -> TableTally {
    let rows: HashMap<u64, u64> = stored.iter().copied().collect();
    let published_set: HashSet<u64> = published.iter().copied().collect();
    debug_assert_eq!(published_set.len(), published.len(), "sequences repeat");
    let mut t = TableTally {
        published: published.len() as u64,
        ..TableTally::default()
    };
    let identity = |seq| Identity {
        stream: stream.to_string(),
        seq,
    };
    for &seq in published {
        match rows.get(&seq).copied().unwrap_or(0) {
            0 if dead_lettered.contains(&seq) => t.dead_lettered += 1,
            0 => {
                t.lost += 1;
                if t.lost_sample.len() < SAMPLE_MAX {
                    t.lost_sample.push(identity(seq));
                }
            }
            n => {
                t.stored += 1;
                if n > 1 {
                    t.duplicated += 1;
                    if t.duplicated_sample.len() < SAMPLE_MAX {
                        t.duplicated_sample.push(identity(seq));
                    }
                }
            }
        }
    }
    t.unexpected = rows
        .iter()
        .filter(|(seq, &n)| n > 0 && !published_set.contains(seq))
        .count() as u64;
    debug_assert_eq!(t.published, t.stored + t.dead_lettered + t.lost);
    t
}

/// The range of one stream that was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRange {
    pub stream: String,
    /// Inclusive bounds; `None` when the stream (or the requested part) held nothing.
    pub seqs: Option<(u64, u64)>,
    /// Messages read in the range.
    pub messages: u64,
}

/// Messages whose first subject token is not one of the eight data types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnroutedTally {
    pub published: u64,
    pub dead_lettered: u64,
    /// A few of their subjects.
    pub subjects_sample: Vec<String>,
}

/// The result of a check.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub database: String,
    pub streams: Vec<StreamRange>,
    /// Per table, indexed by [`DataType::index`].
    pub tables: [TableTally; 8],
    pub unrouted: UnroutedTally,
    /// Dead letters whose identity was not published in the checked ranges.
    pub unexpected_dead_letters: u64,
    /// The dead-letter table does not exist (nothing counted as dead-lettered).
    pub dead_letter_table_missing: bool,
    pub elapsed: Duration,
}

impl VerifyReport {
    fn new(database: &str) -> Self {
        VerifyReport {
            database: database.to_string(),
            streams: Vec::new(),
            tables: Default::default(),
            unrouted: UnroutedTally::default(),
            unexpected_dead_letters: 0,
            dead_letter_table_missing: false,
            elapsed: Duration::ZERO,
        }
    }

    /// True iff nothing published was lost and nothing was stored twice.
    pub fn ok(&self) -> bool {
        let t = self.totals();
        t.lost == 0 && t.duplicated == 0
    }

    pub fn table(&self, dt: DataType) -> &TableTally {
        &self.tables[dt.index()]
    }

    /// The sum over all tables.
    pub fn totals(&self) -> TableTally {
        let mut total = TableTally::default();
        for t in &self.tables {
            total.add(t);
        }
        total
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.streams {
            match s.seqs {
                Some((a, b)) => writeln!(
                    f,
                    "stream {} seqs {a}..={b}: {} messages",
                    s.stream, s.messages
                )?,
                None => writeln!(f, "stream {}: empty", s.stream)?,
            }
        }
        let header = [
            "published",
            "stored",
            "dead_lettered",
            "lost",
            "duplicated",
            "unexpected",
        ];
        write!(f, "{:<20}", "table")?;
        for h in header {
            write!(f, " {h:>13}")?;
        }
        writeln!(f)?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, t: &TableTally| {
            write!(f, "{name:<20}")?;
            for v in [
                t.published,
                t.stored,
                t.dead_lettered,
                t.lost,
                t.duplicated,
                t.unexpected,
            ] {
                write!(f, " {v:>13}")?;
            }
            writeln!(f)
        };
        for dt in DataType::ALL {
            row(f, dt.table().name(), self.table(dt))?;
        }
        let totals = self.totals();
        row(f, "total", &totals)?;
        if self.unrouted.published > 0 {
            writeln!(
                f,
                "unrouted: {} published ({} dead-lettered), e.g. {}",
                self.unrouted.published,
                self.unrouted.dead_lettered,
                self.unrouted.subjects_sample.join(", ")
            )?;
        }
        if self.unexpected_dead_letters > 0 {
            writeln!(
                f,
                "dead letters not published in the ranges: {}",
                self.unexpected_dead_letters
            )?;
        }
        if self.dead_letter_table_missing {
            writeln!(
                f,
                "dead-letter table missing: nothing counted as dead-lettered"
            )?;
        }
        for dt in DataType::ALL {
            let t = self.table(dt);
            for (what, sample) in [
                ("lost", &t.lost_sample),
                ("duplicated", &t.duplicated_sample),
            ] {
                if !sample.is_empty() {
                    let ids: Vec<String> = sample.iter().map(ToString::to_string).collect();
                    writeln!(f, "{} {what}, e.g. {}", dt.table().name(), ids.join(" "))?;
                }
            }
        }
        write!(
            f,
            "{} in {:.3} s: lost {}, duplicated {}",
            if self.ok() { "OK" } else { "FAILED" },
            self.elapsed.as_secs_f64(),
            totals.lost,
            totals.duplicated
        )
    }
}

/// Where a published message should have gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Table(DataType),
    Unrouted,
}

/// Whether a stream subject can carry MarketPrism data types (first token one of the
/// eight names, or a wildcard).
fn carries_marketprism(subject: &str) -> bool {
    let first = subject.split('.').next().unwrap_or(subject);
    first == "*" || first == ">" || first.parse::<DataType>().is_ok()
}

/// Streams whose subjects carry MarketPrism data types, by name.
async fn marketprism_streams(js: &jetstream::Context) -> Result<Vec<String>, ToolError> {
    let mut names = Vec::new();
    let mut streams = js.streams();
    while let Some(info) = streams.next().await {
        let info = info.map_err(|e| ToolError::js("list streams", e))?;
        if info.config.subjects.iter().any(|s| carries_marketprism(s)) {
            names.push(info.config.name);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads `(seq, subject route)` of every message of `stream` in `from..=to`.
async fn read_identities(
    js: &jetstream::Context,
    stream: &str,
    from: u64,
    to: u64,
    idle: Duration,
    unrouted_sample: &mut Vec<String>,
) -> Result<Vec<(u64, Route)>, ToolError> {
    let handle = js
        .get_stream(stream)
        .await
        .map_err(|e| ToolError::js("stream info", e))?;
    let consumer = handle
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| ToolError::js("create ordered consumer", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ToolError::js("consume", e))?;
    let mut out = Vec::with_capacity((to - from + 1).min(CHUNK_SEQS_DEFAULT) as usize);
    loop {
        let next = match tokio::time::timeout(idle, messages.next()).await {
            Ok(next) => next,
            Err(_) => {
                return Err(ToolError::JetStream {
                    op: "read stream range",
                    message: format!(
                        "stream {stream} sent nothing for {} ms while reading {from}..={to} (read {} so far)",
                        idle.as_millis(),
                        out.len()
                    ),
                })
            }
        };
        let Some(message) = next else { break };
        let message = message.map_err(|e| ToolError::js("read stream range", e))?;
        let info = message
            .info()
            .map_err(|e| ToolError::js("message info", e))?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        if seq > to {
            break;
        }
        let route = match DataType::from_subject(&message.subject) {
            Some(dt) => Route::Table(dt),
            None => {
                if unrouted_sample.len() < SAMPLE_MAX {
                    unrouted_sample.push(message.subject.to_string());
                }
                Route::Unrouted
            }
        };
        out.push((seq, route));
        if seq >= to || pending == 0 {
            break;
        }
    }
    Ok(out)
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct SeqRows {
    nats_seq: u64,
    rows: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Seq {
    nats_seq: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Name {
    name: String,
}

struct Store {
    client: clickhouse::Client,
    database: String,
    dead_letter_table: String,
    tables: HashSet<String>,
}

impl Store {
    async fn connect(opts: &VerifyOptions) -> Result<Store, ToolError> {
        // The sink's connector: the same TLS and the same bounds as the relay's own requests.
        let mut client = crate::sink::http_client(
            &opts.clickhouse_url,
            &opts.clickhouse_tls,
            VERIFY_CONNECT_TIMEOUT_MS,
        )
        .map_err(|source| ToolError::Options(source.to_string()))?
        .with_user(&opts.clickhouse_user)
        .with_validation(opts.clickhouse_validation);
        if !opts.clickhouse_password.is_empty() {
            client = client.with_password(&opts.clickhouse_password);
        }
        let tables = client
            .query("SELECT name FROM system.tables WHERE database = ?")
            .bind(&opts.database)
            .fetch_all::<Name>()
            .await
            .map_err(|source| ToolError::ClickHouse {
                table: "system.tables".into(),
                source,
            })?
            .into_iter()
            .map(|n| n.name)
            .collect();
        Ok(Store {
            client,
            database: opts.database.clone(),
            dead_letter_table: opts.dead_letter_table.clone(),
            tables,
        })
    }

    fn error(&self, table: &str) -> impl FnOnce(clickhouse::error::Error) -> ToolError {
        let table = format!("{}.{table}", self.database);
        move |source| ToolError::ClickHouse { table, source }
    }

    /// `(nats_seq, rows under FINAL)` of `table` for one stream range.
    async fn stored(
        &self,
        table: &str,
        stream: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>, ToolError> {
        let rows = self
            .client
            .query(
                "SELECT nats_seq, count() FROM ?.? FINAL \
                 WHERE nats_stream = ? AND nats_seq BETWEEN ? AND ? GROUP BY nats_seq",
            )
            .bind(Identifier(&self.database))
            .bind(Identifier(table))
            .bind(stream)
            .bind(from)
            .bind(to)
            .fetch_all::<SeqRows>()
            .await
            .map_err(self.error(table))?;
        Ok(rows.into_iter().map(|r| (r.nats_seq, r.rows)).collect())
    }

    /// Sequences of one stream range in the dead-letter table.
    async fn dead_lettered(
        &self,
        stream: &str,
        from: u64,
        to: u64,
    ) -> Result<HashSet<u64>, ToolError> {
        let table = &self.dead_letter_table;
        let rows = self
            .client
            .query(
                "SELECT nats_seq FROM ?.? \
                 WHERE nats_stream = ? AND nats_seq BETWEEN ? AND ? GROUP BY nats_seq",
            )
            .bind(Identifier(&self.database))
            .bind(Identifier(table))
            .bind(stream)
            .bind(from)
            .bind(to)
            .fetch_all::<Seq>()
            .await
            .map_err(self.error(table))?;
        Ok(rows.into_iter().map(|r| r.nats_seq).collect())
    }
}

/// A stream range to check, inclusive; `None` bounds mean the stream's first or last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    pub stream: String,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
}

/// Runs the check on the streams and range of the options; see the module documentation.
pub async fn run(opts: &VerifyOptions) -> Result<VerifyReport, ToolError> {
    let client = connect_nats(&opts.nats_url, opts.nats.as_ref(), "prism-relay verify").await?;
    let js = jetstream::new(client);
    let names = if opts.streams.is_empty() {
        marketprism_streams(&js).await?
    } else {
        opts.streams.clone()
    };
    let ranges: Vec<RangeSpec> = names
        .into_iter()
        .map(|stream| RangeSpec {
            stream,
            from_seq: opts.from_seq,
            to_seq: opts.to_seq,
        })
        .collect();
    check_ranges(&js, opts, &ranges).await
}

/// Runs the check on ranges of their own per stream (for example the sequences a
/// `loadgen` run reported, see `LoadgenSummary::ranges`); the options' `streams`,
/// `from_seq` and `to_seq` are not used.
pub async fn run_ranges(
    opts: &VerifyOptions,
    ranges: &[RangeSpec],
) -> Result<VerifyReport, ToolError> {
    let client = connect_nats(&opts.nats_url, opts.nats.as_ref(), "prism-relay verify").await?;
    check_ranges(&jetstream::new(client), opts, ranges).await
}

async fn check_ranges(
    js: &jetstream::Context,
    opts: &VerifyOptions,
    ranges: &[RangeSpec],
) -> Result<VerifyReport, ToolError> {
    if opts.chunk_seqs == 0 {
        return Err(ToolError::Options("chunk_seqs must be at least 1".into()));
    }
    let started = Instant::now();
    let store = Store::connect(opts).await?;
    let idle = Duration::from_millis(opts.idle_timeout_ms);
    let mut report = VerifyReport::new(&opts.database);
    report.dead_letter_table_missing = !store.tables.contains(&opts.dead_letter_table);

    for range in ranges {
        let name = range.stream.clone();
        let handle = js.get_stream(&name).await.map_err(|e| match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(inner) if inner.code() == 404 => {
                ToolError::StreamNotFound(name.clone())
            }
            _ => ToolError::js("stream info", e),
        })?;
        // Only what the stream still holds can be read: clamp to its first and last.
        let state = &handle.cached_info().state;
        let from = range.from_seq.unwrap_or(0).max(state.first_sequence).max(1);
        let to = range
            .to_seq
            .unwrap_or(state.last_sequence)
            .min(state.last_sequence);
        if state.messages == 0 || from > to {
            report.streams.push(StreamRange {
                stream: name,
                seqs: None,
                messages: 0,
            });
            continue;
        }
        let mut messages = 0u64;
        let mut chunk_from = from;
        while chunk_from <= to {
            let chunk_to = chunk_from.saturating_add(opts.chunk_seqs - 1).min(to);
            let ids = read_identities(
                js,
                &name,
                chunk_from,
                chunk_to,
                idle,
                &mut report.unrouted.subjects_sample,
            )
            .await?;
            messages += ids.len() as u64;
            check_chunk(&store, &name, chunk_from, chunk_to, &ids, &mut report).await?;
            chunk_from = match chunk_to.checked_add(1) {
                Some(next) => next,
                None => break,
            };
        }
        report.streams.push(StreamRange {
            stream: name,
            seqs: Some((from, to)),
            messages,
        });
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Accounts one chunk of one stream into the report.
async fn check_chunk(
    store: &Store,
    stream: &str,
    from: u64,
    to: u64,
    ids: &[(u64, Route)],
    report: &mut VerifyReport,
) -> Result<(), ToolError> {
    let mut by_table: [Vec<u64>; 8] = Default::default();
    let mut unrouted = Vec::new();
    for &(seq, route) in ids {
        match route {
            Route::Table(dt) => by_table[dt.index()].push(seq),
            Route::Unrouted => unrouted.push(seq),
        }
    }
    let dead = if report.dead_letter_table_missing {
        HashSet::new()
    } else {
        store.dead_lettered(stream, from, to).await?
    };
    for dt in DataType::ALL {
        let published = &by_table[dt.index()];
        let stored = if store.tables.contains(dt.table().name()) {
            store.stored(dt.table().name(), stream, from, to).await?
        } else if published.is_empty() {
            Vec::new()
        } else {
            return Err(ToolError::MissingTable {
                database: store.database.clone(),
                table: dt.table().name().to_string(),
                published: published.len() as u64,
            });
        };
        let t = tally_table(stream, published, &stored, &dead);
        report.tables[dt.index()].add(&t);
    }
    report.unrouted.published += unrouted.len() as u64;
    report.unrouted.dead_lettered += unrouted.iter().filter(|s| dead.contains(s)).count() as u64;
    let published: HashSet<u64> = ids.iter().map(|&(seq, _)| seq).collect();
    report.unexpected_dead_letters += dead.iter().filter(|s| !published.contains(s)).count() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn set(xs: &[u64]) -> HashSet<u64> {
        xs.iter().copied().collect()
    }

    #[test]
    fn every_published_identity_stored_once_is_clean() {
        let t = tally_table("S", &[1, 2, 3], &[(1, 1), (2, 1), (3, 1)], &set(&[]));
        assert_eq!(
            (t.published, t.stored, t.lost, t.duplicated, t.unexpected),
            (3, 3, 0, 0, 0)
        );
        assert_eq!(t.dead_lettered, 0);
    }

    #[test]
    fn missing_rows_are_lost_unless_dead_lettered() {
        let t = tally_table("S", &[1, 2, 3, 4], &[(1, 1)], &set(&[3]));
        assert_eq!(t.stored, 1);
        assert_eq!(t.dead_lettered, 1);
        assert_eq!(t.lost, 2);
        let lost: Vec<u64> = t.lost_sample.iter().map(|i| i.seq).collect();
        assert_eq!(lost, vec![2, 4]);
        assert_eq!(t.lost_sample[0].to_string(), "S#2");
    }

    #[test]
    fn identities_with_several_rows_are_duplicated_and_still_stored() {
        let t = tally_table("S", &[1, 2, 3], &[(1, 2), (2, 1), (3, 5)], &set(&[]));
        assert_eq!(t.stored, 3);
        assert_eq!(t.duplicated, 2);
        assert_eq!(t.lost, 0);
        let dup: Vec<u64> = t.duplicated_sample.iter().map(|i| i.seq).collect();
        assert_eq!(dup, vec![1, 3]);
    }

    #[test]
    fn rows_of_identities_not_published_to_the_table_are_unexpected() {
        // Seq 9 was published to another table (or not at all): its row here is unexpected.
        let t = tally_table("S", &[1], &[(1, 1), (9, 1), (10, 3)], &set(&[]));
        assert_eq!(t.unexpected, 2);
        assert_eq!(t.duplicated, 0);
        assert_eq!(t.stored, 1);
    }

    #[test]
    fn a_stored_identity_that_also_has_a_dead_letter_counts_as_stored() {
        let t = tally_table("S", &[1, 2], &[(1, 1)], &set(&[1, 2]));
        assert_eq!((t.stored, t.dead_lettered, t.lost), (1, 1, 0));
    }

    #[test]
    fn samples_are_bounded_and_totals_add_up() {
        let published: Vec<u64> = (1..=100).collect();
        let stored: Vec<(u64, u64)> = (1..=50)
            .map(|s| (s, if s % 10 == 0 { 2 } else { 1 }))
            .collect();
        let t = tally_table("S", &published, &stored, &set(&[60, 61]));
        assert_eq!(t.published, t.stored + t.dead_lettered + t.lost);
        assert_eq!(
            (t.stored, t.dead_lettered, t.lost, t.duplicated),
            (50, 2, 48, 5)
        );
        assert_eq!(t.lost_sample.len(), SAMPLE_MAX);

        let mut report = VerifyReport::new("db");
        report.tables[DataType::Trade.index()].add(&t);
        report.tables[DataType::Orderbook.index()].add(&t);
        let totals = report.totals();
        assert_eq!(totals.published, 200);
        assert_eq!(totals.lost, 96);
        assert_eq!(totals.lost_sample.len(), SAMPLE_MAX);
        assert!(!report.ok());
    }

    #[test]
    fn report_is_ok_iff_nothing_is_lost_or_duplicated() {
        let mut report = VerifyReport::new("db");
        assert!(report.ok());
        // Dead letters and unexpected rows do not fail the check on their own.
        report.tables[0] = tally_table("S", &[1, 2], &[(1, 1), (7, 1)], &set(&[2]));
        assert!(report.ok());
        report.tables[1] = tally_table("S", &[3], &[(3, 2)], &set(&[]));
        assert!(!report.ok());
        report.tables[1] = tally_table("S", &[3], &[], &set(&[]));
        assert!(!report.ok());
        let text = report.to_string();
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("orderbooks lost, e.g. S#3"), "{text}");
    }

    #[test]
    fn report_display_is_an_aligned_table_with_totals() {
        let mut report = VerifyReport::new("db");
        report.streams.push(StreamRange {
            stream: "MARKET_TRADES".into(),
            seqs: Some((1, 3)),
            messages: 3,
        });
        report.tables[0] = tally_table(
            "MARKET_TRADES",
            &[1, 2, 3],
            &[(1, 1), (2, 1), (3, 1)],
            &set(&[]),
        );
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("stream MARKET_TRADES seqs 1..=3"));
        let header = lines.iter().find(|l| l.contains("published")).unwrap();
        let trades = lines.iter().find(|l| l.starts_with("trades ")).unwrap();
        let total = lines.iter().find(|l| l.starts_with("total")).unwrap();
        assert_eq!(header.len(), trades.len());
        assert_eq!(trades.len(), total.len());
        assert!(lines.last().unwrap().starts_with("OK"));
    }

    #[test]
    fn stream_subjects_are_recognised_as_marketprism_by_first_token() {
        assert!(carries_marketprism("trade.>"));
        assert!(carries_marketprism("funding_rate.binance.>"));
        assert!(carries_marketprism(">"));
        assert!(carries_marketprism("*.binance.spot.*"));
        assert!(!carries_marketprism("orders.>"));
        assert!(!carries_marketprism("$KV.x.>"));
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: VerifyOptions,
    }

    #[test]
    fn debug_output_of_the_options_hides_the_password_and_url_credentials() {
        const SECRET: &str = "Zq7MarkerSecretXy";
        let opts = VerifyOptions {
            nats_url: format!("nats://alice:{SECRET}@127.0.0.1:4222"),
            clickhouse_url: format!("http://default:{SECRET}@127.0.0.1:8123"),
            clickhouse_password: SECRET.into(),
            ..VerifyOptions::default()
        };
        let shown = format!("{opts:?} {opts:#?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(
            shown.contains("127.0.0.1:8123") && shown.contains("marketprism_hot"),
            "{shown}"
        );
    }

    #[test]
    fn url_flags_with_credentials_are_refused() {
        let parsed = Cli::try_parse_from(["verify", "--clickhouse-url", "http://u:pw@ch:8123"])
            .unwrap()
            .opts;
        assert!(matches!(
            parsed.refuse_secrets_in_flags(),
            Err(ToolError::SecretInFlag {
                flag: "--clickhouse-url",
                ..
            })
        ));
        let parsed = Cli::try_parse_from(["verify", "--nats-url", "nats://tok@h:4222"])
            .unwrap()
            .opts;
        assert!(matches!(
            parsed.refuse_secrets_in_flags(),
            Err(ToolError::SecretInFlag {
                flag: "--nats-url",
                ..
            })
        ));
        let parsed = Cli::try_parse_from(["verify"]).unwrap().opts;
        parsed
            .refuse_secrets_in_flags()
            .expect("the defaults hold no secret");
    }

    #[test]
    fn command_line_defaults_equal_the_library_defaults() {
        let parsed = Cli::try_parse_from(["verify"]).unwrap().opts;
        assert_eq!(parsed, VerifyOptions::default());
        // No flag takes a password: it would show in `ps`.
        assert!(Cli::try_parse_from(["verify", "--clickhouse-password", "x"]).is_err());
        let o = Cli::try_parse_from([
            "verify",
            "--stream",
            "A,B",
            "--from-seq",
            "5",
            "--to-seq",
            "9",
        ])
        .unwrap()
        .opts;
        assert_eq!(o.streams, vec!["A", "B"]);
        assert_eq!((o.from_seq, o.to_seq), (Some(5), Some(9)));
    }
}
