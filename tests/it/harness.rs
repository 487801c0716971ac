//! The end-to-end test bed: real NATS and ClickHouse servers, a relay configuration written
//! for them, the relay binary (or the library in process), publishers, verification and
//! polling helpers. Everything a test starts dies with the test (handles kill on drop).
//!
//! Tests using it should run on tokio's multi-thread runtime: the servers' query helpers
//! block for short, bounded times.

#![allow(dead_code)] // Not every test module uses every helper.

use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use prism_relay::config::Config;
use prism_relay::run::RunError;
use prism_relay::tools::loadgen::{self, LoadgenOptions, LoadgenSummary};
use prism_relay::tools::verify::{self, VerifyOptions, VerifyReport};
use prism_testbed::{Chdb, ClickHouse, Nats, TestbedError};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The ClickHouse database every bed's relay writes into.
pub const DATABASE: &str = "marketprism_hot";

/// How long a relay may take from spawn to `/ready` (schema creation on 18.16 included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a drain of a few thousand messages may take on a loaded 2-core machine.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The MarketPrism stream layout the relay creates (and loadgen's default layout).
pub const STREAMS: [(&str, &[&str]); 3] = [
    ("MARKET_TRADES", &["trade.>"]),
    ("MARKET_BOOKS", &["orderbook.>"]),
    (
        "MARKET_DATA",
        &[
            "funding_rate.>",
            "open_interest.>",
            "liquidation.>",
            "volatility_index.>",
            "lsr_top_position.>",
            "lsr_all_account.>",
        ],
    ),
];

/// The eight typed tables, as the relay names them.
pub const TABLES: [&str; 8] = prism_relay::config::TYPED_TABLES;

/// Which ClickHouse a bed runs: the two server generations the relay's schema profiles serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// clickhouse-server 18.16, the `legacy` profile: no tokens, duplicates collapse under FINAL.
    Legacy,
    /// A modern engine (chdb-core's ClickHouse 26.9 behind the test bed's HTTP stand-in), the
    /// `modern` profile: row validation, deduplication tokens, DateTime64 and Bool columns.
    Modern,
}

impl Leg {
    /// The `[clickhouse] profile` the relay is configured with on this leg.
    pub fn profile(self) -> &'static str {
        match self {
            Leg::Legacy => "legacy",
            Leg::Modern => "modern",
        }
    }
}

/// The ClickHouse of a bed, either leg, with the lifecycle and queries the tests use.
pub enum ChServer {
    Legacy(ClickHouse),
    Modern(Chdb),
}

impl ChServer {
    /// Starts the server of `leg` (ready when this returns).
    pub fn start(leg: Leg) -> ChServer {
        match leg {
            Leg::Legacy => ChServer::Legacy(ClickHouse::start().expect("start clickhouse-server")),
            // A missing chdb fails here with the fix the test bed names (never a skip).
            Leg::Modern => ChServer::Modern(Chdb::start().expect("start the modern ClickHouse")),
        }
    }

    pub fn leg(&self) -> Leg {
        match self {
            ChServer::Legacy(_) => Leg::Legacy,
            ChServer::Modern(_) => Leg::Modern,
        }
    }

    /// The 18.16 server of a legacy-leg bed (the cluster and security tests start their own).
    pub fn legacy(&self) -> &ClickHouse {
        match self {
            ChServer::Legacy(s) => s,
            ChServer::Modern(_) => panic!("this bed runs the modern leg, not clickhouse-server"),
        }
    }

    /// The HTTPS endpoint of an 18.16 server started with one; `None` otherwise.
    pub fn https_url(&self) -> Option<String> {
        match self {
            ChServer::Legacy(s) => s.https_url(),
            ChServer::Modern(_) => None,
        }
    }

    pub fn http_url(&self) -> String {
        match self {
            ChServer::Legacy(s) => s.http_url(),
            ChServer::Modern(s) => s.http_url(),
        }
    }

    pub fn query(&self, sql: &str) -> Result<String, TestbedError> {
        match self {
            ChServer::Legacy(s) => s.query(sql),
            ChServer::Modern(s) => s.query(sql),
        }
    }

    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(s) => s.kill9(),
            ChServer::Modern(s) => s.kill9(),
        }
    }

    pub fn restart(&mut self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(s) => s.restart(),
            ChServer::Modern(s) => s.restart(),
        }
    }

    pub fn pause(&self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(s) => s.pause(),
            ChServer::Modern(s) => s.pause(),
        }
    }

    pub fn resume(&self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(s) => s.resume(),
            ChServer::Modern(s) => s.resume(),
        }
    }

    /// The modern server, for what only it has (the settings its inserts carried).
    pub fn modern(&self) -> Option<&Chdb> {
        match self {
            ChServer::Legacy(_) => None,
            ChServer::Modern(s) => Some(s),
        }
    }
}

/// Generates one `#[tokio::test]` per leg, `<name>_legacy` and `<name>_modern`, each calling
/// the async fn `name(leg: Leg)`: the same test body runs against both server generations.
#[macro_export]
macro_rules! on_both_legs {
    ($($name:ident),+ $(,)?) => {
        /// The tests against clickhouse-server 18.16 and the legacy profile.
        mod legacy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Leg::Legacy).await
                }
            )+
        }
        /// The tests against the modern engine and the modern profile.
        mod modern {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Leg::Modern).await
                }
            )+
        }
    };
}

/// A NATS server, a ClickHouse server and a temporary directory for configs, WALs and logs.
pub struct Bed {
    pub nats: Nats,
    pub ch: ChServer,
    pub dir: TempDir,
}

impl Bed {
    /// Starts both servers (each ready when this returns), ClickHouse 18.16.
    pub fn start() -> Bed {
        Bed::start_on(Leg::Legacy)
    }

    /// Starts NATS and the ClickHouse of `leg`.
    pub fn start_on(leg: Leg) -> Bed {
        let nats = Nats::start().expect("start nats-server");
        let ch = ChServer::start(leg);
        let dir = tempfile::Builder::new()
            .prefix("prism-e2e-")
            .tempdir()
            .expect("temporary directory");
        Bed { nats, ch, dir }
    }

    /// Like [`Bed::start`], with `nats_config` in the NATS server's configuration file
    /// (e.g. `max_payload: 20971520`).
    pub fn start_with_nats_config(nats_config: &str) -> Bed {
        let nats = Nats::start_with_config(nats_config).expect("start nats-server");
        let ch = ChServer::start(Leg::Legacy);
        let dir = tempfile::Builder::new()
            .prefix("prism-e2e-")
            .tempdir()
            .expect("temporary directory");
        Bed { nats, ch, dir }
    }

    pub fn leg(&self) -> Leg {
        self.ch.leg()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A relay configuration for this bed: MarketPrism's three streams, a consumer each,
    /// WAL under the bed's directory, schema created, a free metrics port, fast flushes.
    pub fn config(&self) -> RelayConfig {
        RelayConfig::new(self)
    }

    pub async fn nats_client(&self) -> async_nats::Client {
        async_nats::connect(self.nats.url())
            .await
            .expect("connect to nats")
    }

    pub async fn js(&self) -> jetstream::Context {
        jetstream::new(self.nats_client().await)
    }

    /// Runs `sql`, panicking with the statement and ClickHouse's error if it fails.
    pub fn sql(&self, sql: &str) -> String {
        match self.ch.query(sql) {
            Ok(body) => body,
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    /// Runs `sql`, returning ClickHouse's error instead of panicking.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        self.ch.query(sql).map_err(|e| e.to_string())
    }

    /// Rows of a query in TabSeparated form, unescaped, one `Vec` of columns per row.
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        parse_tsv(&self.sql(&format!("{sql} FORMAT TabSeparated")))
    }

    /// `count()` of `table` in the bed's database under FINAL (0 when the table is missing).
    pub fn count_final(&self, table: &str) -> u64 {
        self.count_where(table, "1")
    }

    /// `count()` of `table` FINAL with a WHERE condition (0 when the table is missing).
    pub fn count_where(&self, table: &str, condition: &str) -> u64 {
        match self.ch.query(&format!(
            "SELECT count() FROM {DATABASE}.{table} FINAL WHERE {condition}"
        )) {
            Ok(body) => body.trim().parse().expect("count is a number"),
            Err(e) if is_missing_table(&e) => 0,
            Err(e) => panic!("count {table}: {e}"),
        }
    }

    /// Rows stored in all eight typed tables (FINAL).
    pub fn count_all_tables(&self) -> u64 {
        TABLES.iter().map(|t| self.count_final(t)).sum()
    }

    /// Rows of the dead-letter table (it has no replacing key: a plain count).
    pub fn count_dead_letters(&self) -> u64 {
        match self
            .ch
            .query(&format!("SELECT count() FROM {DATABASE}.dead_letters"))
        {
            Ok(body) => body.trim().parse().expect("count is a number"),
            Err(e) if is_missing_table(&e) => 0,
            Err(e) => panic!("count dead_letters: {e}"),
        }
    }

    /// Publishes loadgen traffic into the relay's streams (which the relay created).
    pub async fn publish(&self, load: Load) -> LoadgenSummary {
        let opts = LoadgenOptions {
            nats_url: self.nats.url(),
            create_streams: false,
            mix: load.mix.parse().expect("mix"),
            count: Some(load.count),
            rate_per_s: load.rate_per_s,
            run_id: Some(load.run_id.clone()),
            exchanges: load.exchanges.clone(),
            seed: load.seed,
            ts_start_ms: load.ts_start_ms,
            orderbook_depth: load.orderbook_depth,
            progress: false,
            ..LoadgenOptions::default()
        };
        let summary = loadgen::run(&opts).await.expect("loadgen runs");
        assert!(summary.ok(), "loadgen failed: {summary}");
        assert_eq!(summary.published_total(), load.count, "{summary}");
        summary
    }

    /// Publishes one raw message with a JetStream ack; returns (stream, sequence).
    pub async fn publish_raw(&self, subject: &str, payload: impl Into<Vec<u8>>) -> (String, u64) {
        publish_raw(&self.js().await, subject, payload).await
    }

    /// Verifies every MarketPrism stream against the tables.
    pub async fn verify(&self) -> VerifyReport {
        verify::run(&self.verify_options())
            .await
            .expect("verify runs")
    }

    pub fn verify_options(&self) -> VerifyOptions {
        VerifyOptions {
            nats_url: self.nats.url(),
            clickhouse_url: self.ch.http_url(),
            database: DATABASE.into(),
            ..VerifyOptions::default()
        }
    }

    /// Polls verify until every published identity is stored or dead-lettered (unrouted
    /// subjects included), then
    /// returns that report (which may still show duplicates: the caller asserts).
    pub async fn wait_accounted(&self, timeout: Duration) -> VerifyReport {
        wait_accounted_by(&self.verify_options(), timeout).await
    }

    /// Messages stored in `stream` on subjects matching `filter`.
    pub async fn subject_count(&self, stream: &str, filter: &str) -> u64 {
        use futures_util::TryStreamExt as _;
        let js = self.js().await;
        let stream = js.get_stream(stream).await.expect("stream exists");
        let mut subjects = stream
            .info_with_subjects(filter)
            .await
            .expect("stream info with subjects");
        let mut total = 0;
        while let Some((_, count)) = subjects.try_next().await.expect("subject counts") {
            total += count as u64;
        }
        total
    }

    /// JetStream's view of a durable consumer.
    pub async fn consumer_info(&self, stream: &str, durable: &str) -> jetstream::consumer::Info {
        let js = self.js().await;
        let stream = js.get_stream(stream).await.expect("stream exists");
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(durable).await.expect("consumer exists");
        consumer.info().await.expect("consumer info").clone()
    }
}

/// Asserts verify's totals: `published` messages in the streams and `stored` rows, none lost
/// and none stored twice.
#[track_caller]
pub fn assert_totals(report: &VerifyReport, published: u64, stored: u64) {
    let totals = report.totals();
    assert_eq!(
        (
            totals.published,
            totals.stored,
            totals.lost,
            totals.duplicated
        ),
        (published, stored, 0, 0),
        "{report}"
    );
}

/// Asserts that the report accounts for `published` messages, each stored once.
#[track_caller]
pub fn assert_stored_once(report: &VerifyReport, published: u64) {
    assert_totals(report, published, published);
}

/// [`Bed::wait_accounted`] for any servers: polls verify with `options` until every published
/// identity is stored or dead-lettered, then returns that report.
pub async fn wait_accounted_by(options: &VerifyOptions, timeout: Duration) -> VerifyReport {
    let deadline = Instant::now() + timeout;
    loop {
        // Until the relay has created its tables, verify fails: keep polling.
        let last = match verify::run(options).await {
            Ok(report) => {
                let unrouted = &report.unrouted;
                if report.totals().lost == 0 && unrouted.dead_lettered >= unrouted.published {
                    return report;
                }
                report.to_string()
            }
            Err(error) => format!("verify failed: {error}"),
        };
        if Instant::now() >= deadline {
            panic!("not everything stored after {timeout:?}:\n{last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a query failed because its table or database does not exist, on either leg: both
/// answer 404 (18.16 says "doesn't exist", modern servers name UNKNOWN_TABLE or UNKNOWN_DATABASE).
fn is_missing_table(error: &TestbedError) -> bool {
    matches!(error, TestbedError::Query { status: 404, .. })
        || error.to_string().contains("doesn't exist")
}

/// Publishes one message and waits for its ack; returns (stream, sequence).
pub async fn publish_raw(
    js: &jetstream::Context,
    subject: &str,
    payload: impl Into<Vec<u8>>,
) -> (String, u64) {
    let payload: Vec<u8> = payload.into();
    let ack = js
        .publish(subject.to_string(), payload.into())
        .await
        .unwrap_or_else(|e| panic!("publish {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("ack of {subject}: {e}"));
    (ack.stream.to_string(), ack.sequence)
}

/// What [`Bed::publish`] sends.
#[derive(Debug, Clone)]
pub struct Load {
    pub count: u64,
    /// `type=weight,...` (see `tools::gen::Mix`).
    pub mix: String,
    /// Messages per second; 0 = as fast as acks allow.
    pub rate_per_s: u64,
    pub run_id: String,
    pub exchanges: Vec<String>,
    pub seed: u64,
    pub ts_start_ms: Option<i64>,
    /// Levels per side of each order book (loadgen's default 20; MarketPrism sends 100).
    pub orderbook_depth: u16,
}

impl Load {
    /// `count` messages of every type, uniformly, as fast as possible.
    pub fn new(run_id: &str, count: u64) -> Load {
        Load {
            count,
            mix: "trade=1,orderbook=1,funding_rate=1,open_interest=1,liquidation=1,\
                  lsr_top_position=1,lsr_all_account=1,volatility_index=1"
                .into(),
            rate_per_s: 0,
            run_id: run_id.into(),
            exchanges: vec!["binance".into(), "okx".into(), "deribit".into()],
            seed: 1,
            ts_start_ms: None,
            orderbook_depth: 20,
        }
    }

    /// Order books of `levels` levels per side (100: MarketPrism's 4-7 KB snapshots).
    pub fn orderbook_depth(mut self, levels: u16) -> Load {
        self.orderbook_depth = levels;
        self
    }

    pub fn mix(mut self, mix: &str) -> Load {
        self.mix = mix.into();
        self
    }

    pub fn rate(mut self, rate_per_s: u64) -> Load {
        self.rate_per_s = rate_per_s;
        self
    }

    /// Starts the generated `ts_ms` at `ts_ms` (past an earlier run's last, so timestamp
    /// identities of the two runs cannot collide).
    pub fn ts_start(mut self, ts_ms: i64) -> Load {
        self.ts_start_ms = Some(ts_ms);
        self
    }

    pub fn exchanges(mut self, exchanges: &[&str]) -> Load {
        self.exchanges = exchanges.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// A `[[stream]]` entry.
#[derive(Debug, Clone)]
pub struct StreamDef {
    pub name: String,
    pub subjects: Vec<String>,
}

/// A `[[consumer]]` entry; `extra` is raw TOML appended to the entry.
#[derive(Debug, Clone)]
pub struct ConsumerDef {
    pub stream: String,
    pub durable: String,
    pub filter_subjects: Vec<String>,
    pub ack_wait_ms: u64,
    pub max_ack_pending: u64,
    pub fetch_batch: u64,
    pub fetch_expires_ms: u64,
    pub extra: String,
}

impl ConsumerDef {
    pub fn new(stream: &str, durable: &str) -> ConsumerDef {
        ConsumerDef {
            stream: stream.into(),
            durable: durable.into(),
            filter_subjects: Vec::new(),
            ack_wait_ms: 30_000,
            max_ack_pending: 20_000,
            fetch_batch: 500,
            fetch_expires_ms: 250,
            extra: String::new(),
        }
    }

    pub fn filter(mut self, subjects: &[&str]) -> ConsumerDef {
        self.filter_subjects = subjects.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// A relay configuration for a [`Bed`], rendered as TOML. Every piece is a public field.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub nats_url: String,
    pub clickhouse_url: String,
    /// `[clickhouse] profile`; `auto`, which picks the leg's profile from the server version.
    pub profile: String,
    /// Raw TOML lines appended to the `[clickhouse]` table (e.g. `async_insert = true`, or
    /// `user` and `password_file`).
    pub clickhouse_extra: String,
    pub streams: Vec<StreamDef>,
    pub consumers: Vec<ConsumerDef>,
    pub wal_dir: PathBuf,
    pub segment_bytes_max: u64,
    pub budget_bytes_max: u64,
    pub retention_bytes_max: u64,
    pub retention_segments_max: u64,
    pub create_schema: bool,
    pub insert_timeout_ms: u64,
    /// Applied to every typed table's `[drain.tables.*]`.
    pub rows_max: u64,
    pub table_flush_interval_ms: u64,
    pub flush_interval_ms: u64,
    pub retry_backoff_initial_ms: u64,
    pub retry_backoff_max_ms: u64,
    pub metrics_port: u16,
    /// `[metrics] ready_insert_failing_s`, when not the default.
    pub ready_insert_failing_s: Option<u64>,
    /// `[metrics] backlog_poll_interval_s`, when not the default.
    pub backlog_poll_interval_s: Option<u64>,
    pub shutdown_timeout_ms: u64,
    /// Raw TOML appended at the end (e.g. `[[drain.passthrough]]` entries).
    pub extra: String,
    /// Raw TOML lines added to `[nats]` (e.g. `user` and `password_file`).
    pub nats_extra: String,
}

impl RelayConfig {
    fn new(bed: &Bed) -> RelayConfig {
        RelayConfig::for_servers(bed.nats.url(), bed.ch.http_url(), bed.path("wal"))
    }

    /// The configuration [`Bed::config`] writes, for servers outside a [`Bed`] (a NATS
    /// cluster): `nats_url` may list several servers, comma separated.
    pub fn for_servers(nats_url: String, clickhouse_url: String, wal_dir: PathBuf) -> RelayConfig {
        RelayConfig {
            nats_url,
            clickhouse_url,
            profile: "auto".to_owned(),
            clickhouse_extra: String::new(),
            streams: STREAMS
                .iter()
                .map(|(name, subjects)| StreamDef {
                    name: name.to_string(),
                    subjects: subjects.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            consumers: vec![
                ConsumerDef::new("MARKET_TRADES", "prism-relay-trades"),
                ConsumerDef::new("MARKET_BOOKS", "prism-relay-books"),
                ConsumerDef::new("MARKET_DATA", "prism-relay-data"),
            ],
            wal_dir,
            segment_bytes_max: 4 * 1024 * 1024,
            budget_bytes_max: 256 * 1024 * 1024,
            retention_bytes_max: 64 * 1024 * 1024,
            retention_segments_max: 16,
            create_schema: true,
            insert_timeout_ms: 5_000,
            rows_max: 10_000,
            table_flush_interval_ms: 100,
            flush_interval_ms: 50,
            retry_backoff_initial_ms: 50,
            retry_backoff_max_ms: 500,
            metrics_port: free_port(),
            ready_insert_failing_s: None,
            backlog_poll_interval_s: None,
            shutdown_timeout_ms: 10_000,
            extra: String::new(),
            nats_extra: String::new(),
        }
    }

    /// The metrics/health listen address.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml_string(s);
        let list = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| q(s)).collect();
            format!("[{}]", items.join(", "))
        };
        let mut t = String::new();
        let _ = writeln!(
            t,
            "[nats]\nurl = {}\n{}",
            q(&self.nats_url),
            self.nats_extra
        );
        for s in &self.streams {
            let _ = writeln!(
                t,
                "[[stream]]\nname = {}\nsubjects = {}\n",
                q(&s.name),
                list(&s.subjects)
            );
        }
        for c in &self.consumers {
            let _ = writeln!(
                t,
                "[[consumer]]\nstream = {}\ndurable = {}\nfilter_subjects = {}\n\
                 ack_wait_ms = {}\nmax_ack_pending = {}\nfetch_batch = {}\nfetch_expires_ms = {}\n{}\n",
                q(&c.stream),
                q(&c.durable),
                list(&c.filter_subjects),
                c.ack_wait_ms,
                c.max_ack_pending,
                c.fetch_batch,
                c.fetch_expires_ms,
                c.extra
            );
        }
        let _ = writeln!(
            t,
            "[wal]\ndir = {}\nsegment_bytes_max = {}\ngroup_bytes_max = {}\nbudget_bytes_max = {}\n\
             retention_bytes_max = {}\nretention_segments_max = {}\n",
            q(&self.wal_dir.display().to_string()),
            self.segment_bytes_max,
            self.segment_bytes_max.min(4 * 1024 * 1024),
            self.budget_bytes_max,
            self.retention_bytes_max.min(self.budget_bytes_max),
            self.retention_segments_max,
        );
        let _ = writeln!(
            t,
            "[clickhouse]\nurl = {}\ndatabase = {}\nprofile = {}\ncreate_schema = {}\n\
             insert_timeout_ms = {}\nconnect_timeout_ms = 1000\n{}\n",
            q(&self.clickhouse_url),
            q(DATABASE),
            q(&self.profile),
            self.create_schema,
            self.insert_timeout_ms,
            self.clickhouse_extra
        );
        let _ = writeln!(
            t,
            "[drain]\nflush_interval_ms = {}\nretry_backoff_initial_ms = {}\nretry_backoff_max_ms = {}\n",
            self.flush_interval_ms, self.retry_backoff_initial_ms, self.retry_backoff_max_ms
        );
        for table in TABLES {
            let _ = writeln!(
                t,
                "[drain.tables.{table}]\nrows_max = {}\nflush_interval_ms = {}\n",
                self.rows_max, self.table_flush_interval_ms
            );
        }
        let _ = writeln!(
            t,
            "[metrics]\nlisten = {}",
            q(&self.metrics_addr().to_string())
        );
        if let Some(s) = self.ready_insert_failing_s {
            let _ = writeln!(t, "ready_insert_failing_s = {s}");
        }
        if let Some(s) = self.backlog_poll_interval_s {
            let _ = writeln!(t, "backlog_poll_interval_s = {s}");
        }
        let _ = writeln!(
            t,
            "\n[shutdown]\ntimeout_ms = {}\n",
            self.shutdown_timeout_ms
        );
        t.push_str(&self.extra);
        t
    }

    /// Writes the TOML to `path` and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        fs::write(path, self.to_toml()).expect("write relay config");
        path.to_path_buf()
    }

    /// The parsed and validated configuration, for the in-process relay.
    pub fn parse(&self) -> Config {
        let config = Config::parse_toml(&self.to_toml()).expect("config parses");
        config.validate().expect("config is valid");
        config
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A free TCP port on 127.0.0.1 (bound and released; the relay binds it again), picked the
/// way the test bed picks its servers' ports: at random below the kernel's ephemeral range
/// when there is room, so neither outgoing connections nor other tests' ephemeral picks are
/// likely to take it before the relay does.
pub fn free_port() -> u16 {
    let [port] = prism_testbed::free_ports::<1>().expect("free port");
    port
}

/// The relay binary, spawned with a config file; stdout and stderr go to a log file.
/// Killed (SIGKILL) on drop. The process itself is the test bed's [`prism_testbed::Relay`],
/// which the chaos runner drives too.
pub struct RelayProc {
    process: prism_testbed::Relay,
    /// Extra environment of the next start (e.g. a failpoint); clear it before a restart
    /// that must run without.
    pub env: Vec<(String, String)>,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub metrics_addr: SocketAddr,
}

impl RelayProc {
    /// Writes `config` into the bed's directory (as `<name>.toml`) and spawns
    /// `prism-relay run` on it, logging to `<name>.log`.
    pub fn spawn(bed: &Bed, name: &str, config: &RelayConfig) -> RelayProc {
        let config_path = config.write(&bed.path(&format!("{name}.toml")));
        RelayProc::spawn_with_env_at(config_path, bed, name, config, &[])
    }

    /// [`RelayProc::spawn`] with `env` in the relay's environment.
    pub fn spawn_with_env(
        bed: &Bed,
        name: &str,
        config: &RelayConfig,
        env: &[(&str, &str)],
    ) -> RelayProc {
        let config_path = config.write(&bed.path(&format!("{name}.toml")));
        RelayProc::spawn_with_env_at(config_path, bed, name, config, env)
    }

    /// [`RelayProc::spawn`] for servers outside a [`Bed`]: the configuration and the log go
    /// into `dir`.
    pub fn spawn_in(dir: &Path, name: &str, config: &RelayConfig) -> RelayProc {
        let config_path = config.write(&dir.join(format!("{name}.toml")));
        RelayProc::spawn_in_dir(config_path, dir, name, config, &[])
    }

    fn spawn_with_env_at(
        config_path: PathBuf,
        bed: &Bed,
        name: &str,
        config: &RelayConfig,
        env: &[(&str, &str)],
    ) -> RelayProc {
        RelayProc::spawn_in_dir(config_path, bed.dir.path(), name, config, env)
    }

    fn spawn_in_dir(
        config_path: PathBuf,
        dir: &Path,
        name: &str,
        config: &RelayConfig,
        env: &[(&str, &str)],
    ) -> RelayProc {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let log_path = dir.join(format!("{name}.log"));
        let metrics_addr = config.metrics_addr();
        let process = prism_testbed::Relay::spawn_with_env(
            Path::new(relay_bin()),
            &config_path,
            &log_path,
            metrics_addr.port(),
            env.clone(),
        )
        .expect("spawn prism-relay");
        RelayProc {
            process,
            env,
            config_path,
            log_path,
            metrics_addr,
        }
    }

    fn start(&mut self) {
        self.process.set_env(self.env.clone());
        self.process.start().expect("spawn prism-relay");
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// [`RelayProc::spawn`], then waits until the relay reports ready.
    pub async fn spawn_ready(bed: &Bed, name: &str, config: &RelayConfig) -> RelayProc {
        let mut relay = RelayProc::spawn(bed, name, config);
        relay.wait_ready().await;
        relay
    }

    /// Polls `/ready` until it answers 200; panics with the log if the relay exits or
    /// the timeout passes.
    pub async fn wait_ready(&mut self) {
        self.wait_ready_within(READY_TIMEOUT).await
    }

    pub async fn wait_ready_within(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "relay exited with {status} before ready; log:\n{}",
                    self.log()
                );
            }
            if let Ok((200, _)) = http_get(self.metrics_addr, "/ready").await {
                return;
            }
            if Instant::now() >= deadline {
                panic!("relay not ready after {timeout:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status if the process has exited since the last look (it is then reaped).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.process.try_exit().expect("try_wait on relay")
    }

    /// Waits for the process to exit by itself within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP: the relay keeps its connections and does nothing until [`Self::resume`].
    pub fn pause(&self) {
        self.process.pause().expect("SIGSTOP the relay");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.process.resume().expect("SIGCONT the relay");
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.process.kill9();
    }

    /// SIGTERM, then waits for the exit (panics after `bound`, killing the process).
    pub async fn terminate_within(&mut self, bound: Duration) -> ExitStatus {
        let pid = self.pid().expect("relay is running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        match self.wait_exit(bound).await {
            Some(status) => status,
            None => {
                self.kill9();
                panic!(
                    "relay did not exit within {bound:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGTERM with a 20 s bound.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(20)).await
    }

    /// Starts the relay again on the same config and WAL (kill it or terminate it first).
    pub fn restart(&mut self) {
        let running = self.process.is_running().expect("poll the relay");
        assert!(!running, "stop the relay before restarting it");
        self.start();
    }

    /// Everything the relay logged so far (all runs).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.metrics_addr, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }

    /// The lowest drain cursor of any lane and the WAL's durable LSN, from `/metrics`.
    pub async fn cursor_and_durable(&self) -> (f64, f64) {
        let text = self.metrics().await;
        let value = |line: &str| {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let cursor = text
            .lines()
            .filter(|l| l.starts_with("prism_relay_drain_cursor_lsn{"))
            .map(value)
            .fold(f64::INFINITY, f64::min);
        let durable = text
            .lines()
            .find(|l| l.starts_with("prism_relay_wal_durable_lsn"))
            .map(value)
            .unwrap_or(f64::NAN);
        (cursor, durable)
    }

    /// Sum of every sample of `name` (with any labels) whose labels contain all of
    /// `labels` (`key="value"` pairs).
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Path of the relay binary built for these tests.
pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_prism-relay")
}

/// Runs a `prism-relay` subcommand to completion (bounded by 30 s); returns its status
/// and its stdout + stderr.
pub async fn relay_command(args: &[&str]) -> (ExitStatus, String) {
    let out = tempfile::NamedTempFile::new().expect("temporary output file");
    let file = out.reopen().expect("reopen output file");
    let err = file.try_clone().expect("clone output handle");
    let mut child = Command::new(relay_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("PRISM_RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("spawn prism-relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("prism-relay {args:?} did not finish in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = fs::read_to_string(out.path()).unwrap_or_default();
    (status, text)
}

/// The relay library in a tokio task, stopped through a oneshot.
pub struct InProcRelay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
    pub metrics_addr: SocketAddr,
}

impl InProcRelay {
    pub fn spawn(config: &RelayConfig) -> InProcRelay {
        let parsed = config.parse();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(prism_relay::run::run(parsed, async move {
            let _ = rx.await;
        }));
        InProcRelay {
            stop: Some(tx),
            task,
            metrics_addr: config.metrics_addr(),
        }
    }

    pub async fn wait_ready(&self) {
        let addr = self.metrics_addr;
        wait_until("in-process relay ready", READY_TIMEOUT, || async move {
            matches!(http_get(addr, "/ready").await, Ok((200, _)))
        })
        .await;
    }

    /// Requests shutdown and returns `run`'s result.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("relay task panicked")
    }

    /// Waits for `run` to return by itself (a fatal error) within `timeout`.
    pub async fn join(mut self, timeout: Duration) -> Result<(), RunError> {
        tokio::time::timeout(timeout, &mut self.task)
            .await
            .expect("relay did not stop in time")
            .expect("relay task panicked")
    }
}

impl Drop for InProcRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal HTTP/1.0 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status"))?;
    Ok((status, body.to_string()))
}

/// Sum of the samples of `name` in Prometheus text whose labels include all `labels` (the test
/// bed's, which the chaos runner reads the relay's metrics with too).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    prism_testbed::metric_sum(text, name, labels)
}

/// Polls `condition` every 100 ms until it is true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` every 100 ms until it yields a value; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls a blocking condition (e.g. a SQL count) every 100 ms until it is true.
pub async fn wait_until_sync(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    wait_until(what, timeout, || std::future::ready(condition())).await
}

/// Total size of the files in a directory (a WAL's segments plus its small ledger), leaving
/// out the WAL's fixed-size reserve file, which holds room for the ledger, not data.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != prism_wal::RESERVE_FILE)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Parses TabSeparated output, undoing its escapes.
pub fn parse_tsv(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| line.split('\t').map(unescape_tsv).collect())
        .collect()
}

fn unescape_tsv(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}
