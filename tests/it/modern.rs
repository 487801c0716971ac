//! The `modern` schema profile (ClickHouse 22.2 and newer; MarketPrism runs 23.8) against a
//! modern ClickHouse engine: the one the PyPI package `chdb-core` embeds, driven through
//! `python3` and `tests/testbed/chdb_session.py` (one process per call, one persistent session per
//! test in a temporary directory). The only server these machines can run is 18.16, so the
//! relay's rows are produced against it (legacy profile, the drain's own batch and sink path),
//! exported as RowBinary, and loaded into the modern tables, where the values must read back
//! equal: the two profiles promise the same RowBinary encoding.
//!
//! The relay's own modern sink runs too: the test bed's `Chdb` serves a chdb session over the
//! part of ClickHouse's HTTP interface the relay uses, so start-up (version,
//! DDL, column check), row validation against the modern types, LZ4 bodies and deduplication
//! tokens are exercised as against a 23.8 server. The engine is real; only the HTTP layer is a
//! stand-in, and it checks no more than a server would.
//!
//! A missing chdb fails the tests with the fix: `scripts/test` installs `chdb-core`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use prism_relay::codec::decimal;
use prism_relay::codec::{Table, TimeWindow};
use prism_relay::drain::{Batch, RowsKind, FAILPOINT_AFTER_INSERT_BEFORE_CURSOR, FAILPOINT_ENV};
use prism_relay::schema::{
    self, all_ddl, check_columns, expected_columns, ColumnType, Profile, ProfileChoice,
    SchemaError, SchemaTable,
};
use prism_relay::sink::{Sink, SinkOptions};
use prism_testbed::ClickHouse;
use prism_wal::{Envelope, Lsn, StreamSeq};
use tempfile::TempDir;

use crate::harness::{
    assert_stored_once, relay_command, Bed, Leg, Load, RelayProc, DRAIN_TIMEOUT, READY_TIMEOUT,
};

/// The helper script that runs statements in a chdb session.
const SESSION_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testbed/chdb_session.py");

/// The scripts' exit status when chdb cannot be imported.
const EXIT_CHDB_MISSING: i32 = 3;

/// The version `scripts/lib/prereqs.sh` installs; named in the failure message.
const CHDB_PYPI: &str = "chdb-core==26.9.0";

/// The database the tests create, in chdb and in 18.16 alike.
const DATABASE: &str = "marketprism_hot";

/// A chdb session in a temporary directory; every [`Chdb::run`] call is one `python3` process
/// that reopens the same session, so tables persist across calls.
struct Chdb {
    dir: TempDir,
}

impl Chdb {
    fn new() -> Chdb {
        let dir = tempfile::Builder::new()
            .prefix("prism-chdb-")
            .tempdir()
            .expect("temporary directory");
        Chdb { dir }
    }

    /// A path inside the session's directory, for files that statements read.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `statements` in order in the session; one result per statement, the answer text or
    /// chdb's error. Panics when chdb cannot run at all, saying how to install it.
    fn run(&self, statements: &[String]) -> Vec<Result<String, String>> {
        let input = serde_json::to_vec(statements).expect("strings serialize");
        let mut child = match Command::new("python3")
            .arg(SESSION_SCRIPT)
            .arg(self.dir.path().join("session"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot run python3 ({e}): the modern-profile tests need python3 with {CHDB_PYPI}; \
                 run scripts/test, which installs it"
            ),
        };
        // The script reads all of stdin before it writes anything, so writing first cannot
        // deadlock on a full stdout pipe.
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .expect("write statements to python3");
        }
        let output = child.wait_with_output().expect("wait for python3");
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() == Some(EXIT_CHDB_MISSING) {
            chdb_missing(&stderr);
        }
        assert!(
            output.status.success(),
            "{SESSION_SCRIPT} failed ({}): {stderr}",
            output.status
        );
        let answers: Vec<BTreeMap<String, String>> = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("unreadable answer from {SESSION_SCRIPT}: {e}"));
        assert_eq!(answers.len(), statements.len(), "one answer per statement");
        answers
            .into_iter()
            .map(|mut answer| match answer.remove("ok") {
                Some(text) => Ok(text),
                None => Err(answer.remove("error").unwrap_or_default()),
            })
            .collect()
    }

    /// Runs `statements` and panics naming the first that failed; returns the answers.
    fn run_ok(&self, statements: &[String]) -> Vec<String> {
        self.run(statements)
            .into_iter()
            .zip(statements)
            .map(|(result, sql)| result.unwrap_or_else(|e| panic!("chdb rejected {sql}: {e}")))
            .collect()
    }
}

/// The failure for a script that could not import chdb, saying how to install it.
fn chdb_missing(stderr: &str) -> ! {
    panic!(
        "chdb is missing: {}; run scripts/test, which installs {CHDB_PYPI} \
         (or `python3 -m pip install {CHDB_PYPI}`)",
        stderr.trim()
    )
}

/// The test bed's modern server ([`prism_testbed::Chdb`]: a chdb session behind a stand-in for
/// ClickHouse's HTTP interface), so the relay's own modern sink runs against a modern engine:
/// row validation on, deduplication tokens sent, RowBinary bodies compressed with LZ4.
/// The server dies with this handle.
pub(crate) struct ChdbServer {
    server: prism_testbed::Chdb,
}

impl ChdbServer {
    pub(crate) fn start() -> ChdbServer {
        match prism_testbed::Chdb::start() {
            Ok(server) => ChdbServer { server },
            Err(e) => panic!("the modern server did not start: {e}"),
        }
    }

    pub(crate) fn url(&self) -> String {
        self.server.http_url()
    }

    /// The test bed's handle on the server (for its test hooks).
    pub(crate) fn engine(&self) -> &prism_testbed::Chdb {
        &self.server
    }

    /// Sink options for `database` on this server, as the relay builds them for a modern one.
    pub(crate) fn sink_options(&self, database: &str) -> SinkOptions {
        SinkOptions {
            url: self.url(),
            database: database.to_owned(),
            insert_timeout_ms: 10_000,
            connect_timeout_ms: 2_000,
            modern: true,
            ..SinkOptions::default()
        }
    }

    /// Runs a query and returns its answer in `format`.
    pub(crate) async fn query(&self, sql: &str, format: &str) -> String {
        let bytes = clickhouse::Client::default()
            .with_url(self.url())
            .query(sql)
            .fetch_bytes(format)
            .expect("query starts")
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `(table, name, type)` of every column of `database`, in declaration order.
fn columns_query(database: &str) -> String {
    format!(
        "SELECT table, name, type FROM system.columns WHERE database = '{database}' \
         ORDER BY table, position FORMAT JSONEachRow"
    )
}

/// The columns of each table from a [`columns_query`] answer, keyed by table name.
fn parse_columns(answer: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut tables: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for row in json_lines(answer) {
        let field = |name: &str| row[name].as_str().expect("string field").to_owned();
        tables
            .entry(field("table"))
            .or_default()
            .push((field("name"), field("type")));
    }
    tables
}

fn json_lines(answer: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    answer
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn modern_ddl_is_accepted_idempotent_and_passes_the_column_check_until_a_column_is_dropped() {
    let chdb = Chdb::new();
    let hot = "marketprism_hot";
    let cold = "marketprism_cold";
    let mut ddl = all_ddl(Profile::Modern, hot, Some(3));
    ddl.extend(all_ddl(Profile::Modern, cold, None));
    let snapshot = format!(
        "SELECT database, name, uuid, metadata_modification_time, engine_full, create_table_query \
         FROM system.tables WHERE database IN ('{hot}', '{cold}') ORDER BY database, name FORMAT JSONEachRow"
    );

    // One column per table to drop afterwards: one that is neither in the key nor the
    // partition expression, which the server would refuse to drop.
    let dropped: Vec<(SchemaTable, &str)> = SchemaTable::ALL
        .into_iter()
        .map(|table| {
            let (name, _) = expected_columns(table)
                .iter()
                .rev()
                .find(|(name, _)| {
                    !table.order_by().contains(name) && !["timestamp", "failed_at"].contains(name)
                })
                .expect("every table has a column outside its key");
            (table, *name)
        })
        .collect();

    let mut statements = ddl.clone();
    statements.push(snapshot.clone());
    statements.extend(ddl.iter().cloned());
    statements.push(snapshot);
    statements.push(columns_query(hot));
    statements.push(columns_query(cold));
    statements.extend(dropped.iter().map(|(table, column)| {
        format!("ALTER TABLE {cold}.{} DROP COLUMN {column}", table.name())
    }));
    statements.push(columns_query(cold));
    let answers = chdb.run_ok(&statements);
    let n = ddl.len();
    let (after_first, after_second) = (&answers[n], &answers[2 * n + 1]);
    let (hot_columns, cold_columns, cold_after_drop) = (
        parse_columns(&answers[2 * n + 2]),
        parse_columns(&answers[2 * n + 3]),
        parse_columns(answers.last().expect("answers")),
    );

    // Both schemas exist in full, and applying them again changed nothing: the same tables
    // (a dropped and recreated table would have a new uuid), never altered.
    let tables = json_lines(after_first);
    assert_eq!(tables.len(), 2 * SchemaTable::ALL.len(), "{after_first}");
    assert_eq!(after_first, after_second, "a second apply must be a no-op");

    // Engine settings as the profile promises: the deduplication window everywhere, the TTL
    // only on the data tables of the schema created with one.
    for table in &tables {
        let (database, name, engine) = (
            table["database"].as_str().expect("database"),
            table["name"].as_str().expect("name"),
            table["engine_full"].as_str().expect("engine_full"),
        );
        assert!(
            engine.starts_with("ReplacingMergeTree"),
            "{database}.{name}: {engine}"
        );
        assert!(
            engine.contains(&format!(
                "non_replicated_deduplication_window = {}",
                schema::DEDUPLICATION_WINDOW_BLOCKS
            )),
            "{database}.{name}: {engine}"
        );
        let ttl_expected = database == hot && name != schema::DEAD_LETTERS_TABLE;
        assert_eq!(
            engine.contains("TTL "),
            ttl_expected,
            "{database}.{name}: {engine}"
        );
    }

    // The start-up check passes on what the server reports, in either running profile.
    for columns in [&hot_columns, &cold_columns] {
        for table in SchemaTable::ALL {
            let actual = columns.get(table.name()).cloned().unwrap_or_default();
            for running in [Profile::Modern, Profile::Legacy] {
                assert_eq!(
                    check_columns(table, &actual, running),
                    Ok(()),
                    "{}: {actual:?}",
                    table.name()
                );
            }
        }
    }
    // The server spells the modern types as the profile intends (not merely compatibly).
    let trades = &hot_columns["trades"];
    let type_of = |name: &str| {
        trades
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("trades has no {name}"))
    };
    assert_eq!(type_of("timestamp"), "DateTime64(3, 'UTC')");
    assert_eq!(type_of("exchange"), "LowCardinality(String)");
    assert_eq!(type_of("price"), "Decimal(18, 8)");
    assert_eq!(type_of("is_maker"), "Bool");
    assert_eq!(type_of("created_at"), "DateTime64(3, 'UTC')");
    assert_eq!(
        hot_columns["volatility_indices"]
            .iter()
            .find(|(n, _)| n == "maturity_date")
            .map(|(_, t)| t.as_str()),
        Some("Date")
    );

    // Without the dropped column each table fails the check, naming table and column; the
    // repair `schema apply` offers (ADD COLUMN of what is missing) makes it pass again.
    let mut repairs = Vec::new();
    for (table, column) in dropped {
        let actual = cold_after_drop
            .get(table.name())
            .cloned()
            .unwrap_or_default();
        match check_columns(table, &actual, Profile::Modern) {
            Err(SchemaError::MissingColumn {
                table: t,
                column: c,
                ..
            }) => assert_eq!((t.as_str(), c.as_str()), (table.name(), column)),
            other => panic!("{} without {column}: {other:?}", table.name()),
        }
        let alters = schema::add_missing_columns_ddl(Profile::Modern, cold, table, &actual);
        assert_eq!(alters.len(), 1, "{alters:?}");
        repairs.extend(alters);
    }
    repairs.push(columns_query(cold));
    let repaired = parse_columns(chdb.run_ok(&repairs).last().expect("answers"));
    for table in SchemaTable::ALL {
        let actual = repaired.get(table.name()).cloned().unwrap_or_default();
        assert_eq!(
            check_columns(table, &actual, Profile::Modern),
            Ok(()),
            "{} after the repair: {actual:?}",
            table.name()
        );
    }
}

#[test]
fn the_auto_profile_picks_modern_for_the_chdb_engine_version() {
    let chdb = Chdb::new();
    let answers = chdb.run_ok(&["SELECT version()".to_owned()]);
    let version = answers[0].trim();
    assert!(version.starts_with("26."), "{version}");
    assert_eq!(Profile::for_server_version(version), Profile::Modern);
    assert_eq!(ProfileChoice::Auto.resolve(Some(version)), Profile::Modern);
}

/// One message of each data type, with values that exercise every column type: a maker trade,
/// a negative funding rate, a maturity date, a data source other than the default.
pub(crate) const MESSAGES: [(&str, &str, &str); 8] = [
    (
        "MARKET_TRADES",
        "trade.binance.spot.BTC-USDT",
        r#"{"symbol":"BTC-USDT","price":"112345.67000000","quantity":"0.00120000","side":"buy","is_maker":true,"trade_id":"5321098765","exchange":"binance","market_type":"spot","data_source":"marketprism","data_type":"trade","ts_ms":1761714312456,"trade_ts_ms":1761714312345,"publisher":"unified-collector","collected_ts_ms":1761714312401}"#,
    ),
    (
        "MARKET_BOOKS",
        "orderbook.binance.perpetual.ETH-USDT",
        r#"{"exchange":"binance","market_type":"perpetual","symbol":"ETH-USDT","bids":[["4012.35000000","1.23400000"],["4012.30000000","5.00000000"]],"asks":[["4012.40000000","0.80000000"]],"last_update_id":18446744073709551615,"data_type":"orderbook","ts_ms":1761714312457,"publisher":"unified-collector","collected_ts_ms":1761714312450}"#,
    ),
    (
        "MARKET_DATA",
        "funding_rate.okx.perpetual.BTC-USDT",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT","current_funding_rate":-0.00012345,"mark_price":112350.1,"index_price":"112340.20000000","data_type":"funding_rate","ts_ms":1761714300123,"next_funding_ts_ms":1761724800000,"publisher":"unified-collector","collected_ts_ms":1761714300100,"data_source":"api"}"#,
    ),
    (
        "MARKET_DATA",
        "open_interest.binance.perpetual.BTC-USDT",
        r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","open_interest_value":"81234.567","open_interest_usd":9123456789.12345678,"open_interest_unit":"contracts","data_type":"open_interest","ts_ms":1761714300000,"publisher":"unified-collector","collected_ts_ms":1761714299990}"#,
    ),
    (
        "MARKET_DATA",
        "liquidation.okx.perpetual.ETH-USDT",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"ETH-USDT","liquidation_id":"liq-77","side":"sell","status":"filled","price":4011.5,"quantity":"12.5","filled_quantity":12.5,"notional_value":50143.75,"liquidation_ts_ms":1761714311999,"data_type":"liquidation","ts_ms":1761714312001,"publisher":"unified-collector","collected_ts_ms":1761714312000}"#,
    ),
    (
        "MARKET_DATA",
        "lsr_top_position.binance.perpetual.BTC-USDT",
        r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","long_short_ratio":"1.83150000","long_position_ratio":"0.64680000","short_position_ratio":"0.35320000","period":"5m","data_type":"lsr_top_position","ts_ms":1761714300500,"publisher":"unified-collector","collected_ts_ms":1761714300400}"#,
    ),
    (
        "MARKET_DATA",
        "lsr_all_account.okx.perpetual.BTC-USDT",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT","long_short_ratio":"2.5","long_account_ratio":"0.71428571","short_account_ratio":"0.28571429","period":"5m","data_type":"lsr_all_account","ts_ms":1761714300600,"publisher":"unified-collector","collected_ts_ms":1761714300550}"#,
    ),
    (
        "MARKET_DATA",
        "volatility_index.deribit.options.BTC",
        r#"{"exchange":"deribit","market_type":"options","symbol":"BTC","vol_index":"52.17000000","currency":"BTC","maturity_date":"2026-12-25","data_type":"volatility_index","ts_ms":1761714360000,"publisher":"unified-collector","collected_ts_ms":1761714359990}"#,
    ),
];

/// The WAL position of the first test message; batches carry realistic, non-trivial LSNs.
const LSN_FIRST: u64 = 4_200;

fn envelope<'a>(stream: &'a str, seq: u64, subject: &'a str, payload: &'a [u8]) -> Envelope<'a> {
    Envelope {
        stream: Cow::Borrowed(stream),
        stream_seq: StreamSeq(seq),
        subject: Cow::Borrowed(subject),
        headers: Vec::new(),
        published_ns: 1_761_714_312_500_000_000,
        payload: Cow::Borrowed(payload),
    }
}

/// A ClickHouse 18.16 with the legacy schema, and a legacy sink into it.
async fn legacy_server() -> (ClickHouse, Sink) {
    let server = ClickHouse::start().expect("clickhouse-server starts");
    let options = |database: &str| SinkOptions {
        url: server.http_url(),
        database: database.to_owned(),
        insert_timeout_ms: 10_000,
        connect_timeout_ms: 2_000,
        modern: false,
        ..SinkOptions::default()
    };
    // As the relay applies its schema: through a client bound to `system`, because one bound
    // to a database that does not exist yet fails every request.
    let probe = Sink::new(options("system")).expect("valid sink options");
    for sql in all_ddl(Profile::Legacy, DATABASE, None) {
        probe
            .execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let sink = Sink::new(options(DATABASE)).expect("valid sink options");
    (server, sink)
}

/// Cuts one batch of `messages` (all of one table) at consecutive LSNs, as a lane does, and
/// inserts it through the sink the way the drain does. Returns the batch's token.
async fn insert_batch(sink: &Sink, table: Table, first: u64, messages: &[Envelope<'_>]) -> String {
    let mut batch = Batch::new(table.name(), RowsKind::Typed, TimeWindow::default());
    for (i, message) in messages.iter().enumerate() {
        batch.push(Lsn(first + i as u64), message, 1_761_714_400_000);
    }
    assert!(batch.dead.is_empty(), "{table}: {:?}", batch.dead);
    let token = batch.token();
    let outcome = batch
        .rows
        .insert(sink, table.name(), &token)
        .await
        .unwrap_or_else(|e| panic!("insert into {table}: {e}"));
    assert!(outcome.poison.is_empty(), "{table}: {:?}", outcome.poison);
    assert_eq!(outcome.rows_inserted, messages.len(), "{table}");
    token
}

/// The columns the relay writes to `table`, comma separated, in insert order.
fn column_list(table: SchemaTable) -> String {
    let names: Vec<&str> = expected_columns(table).iter().map(|(n, _)| *n).collect();
    names.join(", ")
}

/// `SELECT <the relay's columns> FROM table` from 18.16 as RowBinary bytes, written to `path`.
async fn export_row_binary(server: &ClickHouse, table: SchemaTable, path: &Path) {
    let client = clickhouse::Client::default()
        .with_url(server.http_url())
        .with_validation(false);
    let sql = format!(
        "SELECT {} FROM {DATABASE}.{} ORDER BY nats_seq",
        column_list(table),
        table.name()
    );
    let bytes = client
        .query(&sql)
        .fetch_bytes("RowBinary")
        .expect("query starts")
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert!(!bytes.is_empty(), "{} exported no rows", table.name());
    std::fs::write(path, &bytes).expect("write RowBinary export");
}

/// `INSERT` of a RowBinary file into `table`'s relay columns, parsed by the table's own types as
/// the relay's RowBinary body is; `settings` as the sink sends them (may be empty).
fn load_row_binary(table: SchemaTable, path: &Path, settings: &str) -> String {
    let settings = if settings.is_empty() {
        String::new()
    } else {
        format!(" SETTINGS {settings}")
    };
    format!(
        "INSERT INTO {DATABASE}.{} ({}) FROM INFILE '{}'{settings} FORMAT RowBinary",
        table.name(),
        column_list(table),
        path.display()
    )
}

/// A query reading `table`'s relay columns as text the two server generations print alike:
/// timestamps as epoch milliseconds, booleans as 0/1, strings as the hex of their bytes (so
/// bytes that are not UTF-8 compare exactly), decimals as text (compared as numbers, since 18.16
/// prints their trailing zeros).
fn comparable_select(profile: Profile, table: SchemaTable) -> String {
    let exprs: Vec<String> = expected_columns(table)
        .iter()
        .enumerate()
        .map(|(i, (name, column_type))| {
            let expr = match (column_type, profile) {
                (ColumnType::DateTime64Ms, Profile::Modern) => {
                    format!("toString(toUnixTimestamp64Milli({name}))")
                }
                (ColumnType::Bool, _) => format!("toString(toUInt8({name}))"),
                (ColumnType::String | ColumnType::LowCardinalityString, _) => {
                    format!("hex({name})")
                }
                _ => format!("toString({name})"),
            };
            format!("{expr} AS c{i}")
        })
        .collect();
    format!(
        "SELECT {} FROM {DATABASE}.{} ORDER BY nats_seq FORMAT JSONEachRow",
        exprs.join(", "),
        table.name()
    )
}

/// The rows of a [`comparable_select`] answer as (column, value) maps; decimals become their
/// scaled integers so that `1.50000000` and `1.5` compare equal.
fn comparable_rows(table: SchemaTable, answer: &str) -> Vec<BTreeMap<&'static str, String>> {
    json_lines(answer)
        .into_iter()
        .map(|row| {
            expected_columns(table)
                .iter()
                .enumerate()
                .map(|(i, (name, column_type))| {
                    let text = row[&format!("c{i}")].as_str().expect("text").to_owned();
                    let value = match column_type {
                        ColumnType::Decimal64 => decimal::parse(&text)
                            .unwrap_or_else(|e| panic!("{}.{name} = {text}: {e}", table.name()))
                            .to_string(),
                        _ => text,
                    };
                    (*name, value)
                })
                .collect()
        })
        .collect()
}

/// A row struct (as JSON, see [`row_json`]) as (column, value) maps in the [`comparable_rows`] form.
fn expected_row(table: SchemaTable, row: serde_json::Value) -> BTreeMap<&'static str, String> {
    expected_columns(table)
        .iter()
        .map(|(name, column_type)| {
            let value = &row[*name];
            let text = match (column_type, value) {
                (ColumnType::Bool, serde_json::Value::Bool(b)) => u8::from(*b).to_string(),
                (ColumnType::Date, v) => {
                    date_text(i64::from(v.as_u64().expect("days") as u16) * 86_400_000)
                }
                (_, serde_json::Value::String(s)) => hex(s.as_bytes()),
                // Raw bytes (the dead letter's payload) serialize as an array of numbers.
                (_, serde_json::Value::Array(bytes)) => {
                    let bytes: Vec<u8> = bytes
                        .iter()
                        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()).expect("byte"))
                        .collect();
                    hex(&bytes)
                }
                (_, v) => v.to_string(),
            };
            (*name, text)
        })
        .collect()
}

/// Upper-case hex of `bytes`, as ClickHouse's `hex` prints it.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// `YYYY-MM-DD` of epoch milliseconds, UTC (proleptic Gregorian).
fn date_text(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD hh:mm:ss.mmm` of epoch milliseconds, UTC: how `DateTime64(3, 'UTC')` prints.
fn datetime_text(ms: i64) -> String {
    let of_day = ms.rem_euclid(86_400_000);
    format!(
        "{} {:02}:{:02}:{:02}.{:03}",
        date_text(ms),
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1_000 % 60,
        of_day % 1_000
    )
}

/// Year, month, day of a count of days since 1970-01-01, by the era arithmetic of the
/// proleptic Gregorian calendar (400-year eras of 146,097 days, years starting in March).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The row struct of a decoded message as JSON (field names are column names).
fn decoded_json(row: prism_relay::codec::Row) -> serde_json::Value {
    use prism_relay::codec::Row;
    let value = match row {
        Row::Trade(r) => serde_json::to_value(r),
        Row::Orderbook(r) => serde_json::to_value(r),
        Row::FundingRate(r) => serde_json::to_value(r),
        Row::OpenInterest(r) => serde_json::to_value(r),
        Row::Liquidation(r) => serde_json::to_value(r),
        Row::LsrTopPosition(r) => serde_json::to_value(r),
        Row::LsrAllAccount(r) => serde_json::to_value(r),
        Row::VolatilityIndex(r) => serde_json::to_value(r),
    };
    value.expect("rows serialize")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_by_the_relay_read_back_equal_in_the_modern_tables() {
    let (server, sink) = legacy_server().await;
    let chdb = Chdb::new();

    // One row of each table (in `SchemaTable::ALL` order), as the decoder made it.
    let mut expected = Vec::new();
    for (i, (stream, subject, payload)) in MESSAGES.into_iter().enumerate() {
        let seq = 1_000 + i as u64;
        let table = Table::ALL[i];
        let row = prism_relay::codec::decode(subject, payload.as_bytes(), stream, seq)
            .unwrap_or_else(|e| panic!("{subject}: {e}"));
        assert_eq!(row.table(), table, "MESSAGES follow Table::ALL");
        expected.push(expected_row(table.into(), decoded_json(row)));
        let message = envelope(stream, seq, subject, payload.as_bytes());
        insert_batch(&sink, table, LSN_FIRST + i as u64, &[message]).await;
    }
    // And a dead letter, whose payload is not even UTF-8: `String` columns carry bytes.
    let mut batch = Batch::new(Table::Trades.name(), RowsKind::Typed, TimeWindow::default());
    let garbage = b"\xff\xfe{\"ts_ms\": not json";
    let message = envelope(
        "MARKET_TRADES",
        2_000,
        "trade.binance.spot.BTC-USDT",
        garbage,
    );
    batch.push(Lsn(LSN_FIRST + 100), &message, 1_761_714_400_123);
    assert_eq!(batch.dead.len(), 1);
    sink.insert_dead_letters(
        schema::DEAD_LETTERS_TABLE,
        &batch.dead,
        Some(&batch.token()),
    )
    .await
    .expect("dead letter inserted");
    expected.push(expected_row(
        SchemaTable::DeadLetters,
        serde_json::to_value(&batch.dead[0]).expect("dead letters serialize"),
    ));

    // Export from 18.16, load into the modern tables, read both back comparably.
    let mut statements = all_ddl(Profile::Modern, DATABASE, None);
    let mut legacy_answers = Vec::new();
    for table in SchemaTable::ALL {
        let path = chdb.path(&format!("{}.rowbinary", table.name()));
        export_row_binary(&server, table, &path).await;
        statements.push(load_row_binary(table, &path, ""));
        let sql = comparable_select(Profile::Legacy, table);
        legacy_answers.push(
            server
                .query(&sql)
                .unwrap_or_else(|e| panic!("18.16: {sql}: {e}")),
        );
    }
    let read_from = statements.len();
    statements.extend(
        SchemaTable::ALL
            .into_iter()
            .map(|table| comparable_select(Profile::Modern, table)),
    );
    // What only the modern types show: the UTC timestamp text, `true`, the server-filled
    // `created_at` (from `DEFAULT now64(3)`).
    let natives_from = statements.len();
    statements.extend(Table::ALL.into_iter().map(|table| {
        format!(
            "SELECT toString(timestamp) AS ts, toString(created_at > now64(3) - INTERVAL 1 HOUR) AS fresh \
             FROM {DATABASE}.{table} FORMAT JSONEachRow"
        )
    }));
    statements.push(format!(
        "SELECT toString(is_maker) AS maker, toTypeName(is_maker) AS type FROM {DATABASE}.trades FORMAT JSONEachRow"
    ));
    statements.push(format!(
        "SELECT toString(failed_at) AS failed_at, payload = unhex('{}') AS same FROM {DATABASE}.{} FORMAT JSONEachRow",
        hex(garbage),
        schema::DEAD_LETTERS_TABLE
    ));
    let answers = chdb.run_ok(&statements);

    for (i, table) in SchemaTable::ALL.into_iter().enumerate() {
        let name = table.name();
        let in_legacy = comparable_rows(table, &legacy_answers[i]);
        let in_modern = comparable_rows(table, &answers[read_from + i]);
        assert_eq!(in_legacy.len(), 1, "{name}: {}", legacy_answers[i]);
        assert_eq!(in_modern, in_legacy, "{name}: modern differs from 18.16");
        assert_eq!(
            in_modern[0], expected[i],
            "{name}: stored differs from written"
        );
    }
    for (i, table) in Table::ALL.into_iter().enumerate() {
        let natives = json_lines(&answers[natives_from + i]);
        assert_eq!(natives.len(), 1, "{table}");
        assert_eq!(
            natives[0]["ts"],
            datetime_text(expected[i]["timestamp"].parse().expect("ms")).as_str(),
            "{table}"
        );
        assert_eq!(natives[0]["fresh"], "1", "{table}: created_at");
    }
    let maker = json_lines(&answers[answers.len() - 2]);
    assert_eq!(maker[0]["maker"], "true");
    assert_eq!(maker[0]["type"], "Bool");
    let letter = json_lines(&answers[answers.len() - 1]);
    assert_eq!(letter[0]["failed_at"], "2025-10-29 05:06:40.123");
    assert_eq!(letter[0]["same"], 1);
    // The spot checks that make the comparison meaningful: values that are easy to mangle.
    assert_eq!(expected[0]["price"], "11234567000000");
    assert_eq!(expected[1]["last_update_id"], u64::MAX.to_string());
    assert_eq!(expected[2]["funding_rate"], "-12345");
    assert_eq!(expected[7]["maturity_date"], "2026-12-25");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_inserted_twice_with_its_token_is_stored_once_and_final_collapses_other_tokens() {
    let (server, sink) = legacy_server().await;
    let chdb = Chdb::new();

    // A lane's batch of three trades, cut and inserted as the drain does. The last one was
    // published a millisecond before the month turned, so the batch spans two partitions and
    // the server splits the insert into two blocks, each of which must be deduplicated.
    let (stream, _, template) = MESSAGES[0];
    let payloads: Vec<String> = (0..3)
        .map(|i| {
            let payload = template.replace("5321098765", &format!("53210987{i:02}"));
            if i == 2 {
                payload.replace("\"ts_ms\":1761714312456", "\"ts_ms\":1759276799999")
            } else {
                payload
            }
        })
        .collect();
    assert!(payloads[2].contains("1759276799999"));
    let messages: Vec<Envelope<'_>> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            envelope(
                stream,
                7_001 + i as u64,
                "trade.binance.spot.BTC-USDT",
                p.as_bytes(),
            )
        })
        .collect();
    let token = insert_batch(&sink, Table::Trades, LSN_FIRST, &messages).await;
    let prefix = format!("trades:{LSN_FIRST}-{}:3:", LSN_FIRST + 2);
    let fingerprint = token
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{token}"));
    assert!(
        fingerprint.len() == 16 && fingerprint.chars().all(|c| c.is_ascii_hexdigit()),
        "{token}"
    );
    let path = chdb.path("trades.rowbinary");
    export_row_binary(&server, Table::Trades.into(), &path).await;

    // As the sink sends them to modern servers.
    let with_token = |token: &str| {
        load_row_binary(
            Table::Trades.into(),
            &path,
            &format!("insert_deduplicate = 1, insert_deduplication_token = '{token}'"),
        )
    };
    let count = format!("SELECT count() FROM {DATABASE}.trades");
    let count_final = format!("SELECT count() FROM {DATABASE}.trades FINAL");
    let partitions = format!("SELECT uniqExact(_partition_id) FROM {DATABASE}.trades");
    let mut statements = all_ddl(Profile::Modern, DATABASE, None);
    // Without merges, only the server's deduplication can keep a copy out; a background merge
    // would otherwise collapse copies as ReplacingMergeTree does.
    statements.push(format!("SYSTEM STOP MERGES {DATABASE}.trades"));
    let checks_from = statements.len();
    statements.extend([
        with_token(&token),
        count.clone(),
        with_token(&token),
        count.clone(),
        // A replay re-cuts the same messages at other LSNs: another token, another copy.
        with_token(&format!("trades:9200-9202:3:{fingerprint}")),
        count,
        count_final,
        partitions,
    ]);
    let answers = chdb.run_ok(&statements);
    let counts: Vec<&str> = answers[checks_from..]
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(
        counts,
        ["3", "3", "6", "3", "2"],
        "after the first insert, the retry with the same token, another token; under FINAL; partitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_modern_sink_writes_every_table_and_a_retried_batch_is_stored_once() {
    let server = ChdbServer::start();

    // Start-up as the relay does it: the version picks the profile, the DDL goes through a
    // client bound to `system`, the column check reads `system.columns` through the sink.
    let probe = Sink::new(server.sink_options("system")).expect("valid sink options");
    let version = probe.server_version().await.expect("server version");
    assert_eq!(
        Profile::for_server_version(&version),
        Profile::Modern,
        "{version}"
    );
    // No TTL: the test's rows are from 2025, and a 3-day TTL would drop them at the first
    // merge (the retried insert triggers one).
    for sql in all_ddl(Profile::Modern, DATABASE, None) {
        probe
            .execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // Without merges, only the server's deduplication can keep a retried batch out (a merge
    // would collapse the copies as ReplacingMergeTree does).
    for table in SchemaTable::ALL {
        let sql = format!("SYSTEM STOP MERGES {DATABASE}.{}", table.name());
        probe
            .execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let sink = Sink::new(server.sink_options(DATABASE)).expect("valid sink options");
    let columns = sink.table_columns(DATABASE).await.expect("columns");
    for table in SchemaTable::ALL {
        let actual = columns.get(table.name()).cloned().unwrap_or_default();
        assert_eq!(
            check_columns(table, &actual, Profile::Modern),
            Ok(()),
            "{}",
            table.name()
        );
    }

    // Each table's batch inserted, then retried as the drain retries after a lost answer: the
    // same rows with the same token. The RowBinary rows pass the client's validation against
    // the modern column types, and the retry is dropped by the server.
    let mut expected = Vec::new();
    for (i, (stream, subject, payload)) in MESSAGES.into_iter().enumerate() {
        let seq = 3_000 + i as u64;
        let table = Table::ALL[i];
        let row = prism_relay::codec::decode(subject, payload.as_bytes(), stream, seq)
            .unwrap_or_else(|e| panic!("{subject}: {e}"));
        expected.push(expected_row(table.into(), decoded_json(row)));
        let message = envelope(stream, seq, subject, payload.as_bytes());
        let lsn = LSN_FIRST + i as u64;
        let token = insert_batch(&sink, table, lsn, std::slice::from_ref(&message)).await;
        let retried = insert_batch(&sink, table, lsn, &[message]).await;
        assert_eq!(retried, token, "a re-cut batch carries the same token");
    }
    let mut batch = Batch::new(Table::Trades.name(), RowsKind::Typed, TimeWindow::default());
    let garbage = b"\xff\xfe{\"ts_ms\": not json";
    let message = envelope(
        "MARKET_TRADES",
        4_000,
        "trade.binance.spot.BTC-USDT",
        garbage,
    );
    batch.push(Lsn(LSN_FIRST + 100), &message, 1_761_714_400_123);
    for _ in 0..2 {
        sink.insert_dead_letters(
            schema::DEAD_LETTERS_TABLE,
            &batch.dead,
            Some(&batch.token()),
        )
        .await
        .expect("dead letter inserted");
    }
    expected.push(expected_row(
        SchemaTable::DeadLetters,
        serde_json::to_value(&batch.dead[0]).expect("dead letters serialize"),
    ));

    for (i, table) in SchemaTable::ALL.into_iter().enumerate() {
        let name = table.name();
        let answer = server
            .query(&comparable_select(Profile::Modern, table), "JSONEachRow")
            .await;
        let stored = comparable_rows(table, &answer);
        assert_eq!(
            stored.len(),
            1,
            "{name}: the retry was stored again: {answer}"
        );
        assert_eq!(
            stored[0], expected[i],
            "{name}: stored differs from written"
        );
    }

    // The control: the same message cut into a batch at other LSNs (a replay) has another
    // token, so the server stores it again, and FINAL collapses the copies by identity.
    let (stream, subject, payload) = MESSAGES[0];
    let message = envelope(stream, 3_000, subject, payload.as_bytes());
    insert_batch(&sink, Table::Trades, LSN_FIRST + 5_000, &[message]).await;
    let counts = server
        .query(
            &format!(
                "SELECT (SELECT count() FROM {DATABASE}.trades), \
                 (SELECT count() FROM {DATABASE}.trades FINAL)"
            ),
            "TabSeparated",
        )
        .await;
    assert_eq!(
        counts.trim(),
        "2\t1",
        "plain and FINAL counts after a replay"
    );
}

/// The relay aborted by its failpoint between a batch's insert and the ledger's cursor move,
/// then restarted without it. Returns (published, rows without FINAL, rows under FINAL) of
/// `trades` once verify accounts for every message.
async fn relay_aborted_between_insert_and_cursor(bed: &Bed) -> (u64, u64, u64) {
    use std::os::unix::process::ExitStatusExt as _;
    // Before the relay creates them, the tables count as empty on either leg.
    assert_eq!(bed.count_final("trades"), 0);
    assert_eq!(bed.count_dead_letters(), 0);
    let config = bed.config();
    let mut relay = RelayProc::spawn_with_env(
        bed,
        "relay",
        &config,
        &[(FAILPOINT_ENV, FAILPOINT_AFTER_INSERT_BEFORE_CURSOR)],
    );
    relay.wait_ready().await;
    let published = 300;
    bed.publish(Load::new("failpoint", published).mix("trade=1"))
        .await;
    let status = relay
        .wait_exit(DRAIN_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("the failpoint never fired; log:\n{}", relay.log()));
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "{status}; log:\n{}",
        relay.log()
    );
    assert!(relay.log().contains("failpoint reached"), "{}", relay.log());
    let plain = |bed: &Bed| -> u64 {
        bed.sql(&format!("SELECT count() FROM {DATABASE}.trades"))
            .trim()
            .parse()
            .expect("count")
    };
    let before_restart = plain(bed);
    assert!(
        before_restart > 0,
        "the batch was inserted before the abort"
    );
    // Without merges, nothing but the server's deduplication can keep the re-cut batch out (a
    // merge would collapse copies as ReplacingMergeTree does).
    bed.sql(&format!("SYSTEM STOP MERGES {DATABASE}.trades"));

    relay.env.clear();
    relay.restart();
    relay.wait_ready().await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_stored_once(&report, published);
    assert!(relay.terminate().await.success(), "{}", relay.log());
    (published, plain(bed), bed.count_final("trades"))
}

/// SIGABRT, what `std::process::abort` ends the process with.
const SIGABRT: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_an_insert_and_its_cursor_move_leaves_every_row_once_without_final_on_a_modern_server(
) {
    let bed = Bed::start_on(Leg::Modern);
    let (published, plain, under_final) = relay_aborted_between_insert_and_cursor(&bed).await;
    assert_eq!(plain, published, "rows without FINAL");
    assert_eq!(under_final, published, "rows under FINAL");
    // The re-cut batch went out again with the token of the insert before the abort, and the
    // server dropped it: some token was sent twice.
    let server = bed.ch.modern().expect("the modern leg");
    let tokens: Vec<String> = server
        .insert_settings()
        .expect("insert log")
        .into_iter()
        .filter_map(|settings| {
            settings
                .into_iter()
                .find(|(name, _)| name == "insert_deduplication_token")
                .map(|(_, token)| token)
        })
        .filter(|token| token.starts_with("trades:"))
        .collect();
    let repeated = tokens
        .iter()
        .enumerate()
        .any(|(i, token)| tokens[..i].contains(token));
    assert!(repeated, "no batch token was sent twice: {tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_server_drops_as_a_duplicate_of_an_insert_it_never_stored_are_inserted_again() {
    let bed = Bed::start_on(Leg::Modern);
    let server = bed.ch.modern().expect("the modern leg");
    // The relay's first insert into trades leaves the server as one killed between recording
    // the insert's token and committing its part: the token is known, the rows are not stored,
    // no answer comes back. The relay's retry carries the same token, and the server answers
    // it as a duplicate without storing anything.
    server
        .lose_next_insert("trades")
        .expect("arming the stand-in");
    let config = bed.config();
    let mut relay = RelayProc::spawn(&bed, "relay", &config);
    relay.wait_ready().await;
    let published = 300;
    bed.publish(Load::new("dropped-retry", published).mix("trade=1"))
        .await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert!(
        !server.losing_next_insert(),
        "the stand-in never lost an insert; log:\n{}",
        relay.log()
    );
    assert_stored_once(&report, published);
    assert!(
        relay
            .log()
            .contains("inserting them again under a new token"),
        "{}",
        relay.log()
    );
    let reinserted = relay
        .metric_sum("prism_relay_rows_reinserted_total", &[("table", "trades")])
        .await;
    assert!(reinserted >= 1.0, "rows reinserted: {reinserted}");
    // Every row once, even without FINAL: only the dropped rows went in again.
    assert_eq!(
        bed.sql(&format!("SELECT count() FROM {DATABASE}.trades"))
            .trim(),
        published.to_string()
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_crash_on_18_16_leaves_copies_that_only_final_collapses() {
    // The control: without tokens the re-cut batch is stored again, so the modern test above
    // could not pass by accident of the failpoint missing its moment.
    let bed = Bed::start_on(Leg::Legacy);
    let (published, plain, under_final) = relay_aborted_between_insert_and_cursor(&bed).await;
    assert!(
        plain > published,
        "{plain} rows without FINAL for {published}"
    );
    assert_eq!(under_final, published, "rows under FINAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_insert_every_insert_asks_the_server_to_wait_and_dedupe_and_a_crash_retry_is_stored_once(
) {
    let bed = Bed::start_on(Leg::Modern);
    let mut config = bed.config();
    config.clickhouse_extra = "async_insert = true\n".to_owned();
    // The same crash as above, with asynchronous inserts: the retried batch must be dropped.
    let mut relay = RelayProc::spawn_with_env(
        &bed,
        "relay",
        &config,
        &[(FAILPOINT_ENV, FAILPOINT_AFTER_INSERT_BEFORE_CURSOR)],
    );
    relay.wait_ready().await;
    let published = 300;
    bed.publish(Load::new("async", published).mix("trade=1,funding_rate=1"))
        .await;
    relay
        .wait_exit(DRAIN_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("the failpoint never fired; log:\n{}", relay.log()));
    for table in ["trades", "funding_rates"] {
        bed.sql(&format!("SYSTEM STOP MERGES {DATABASE}.{table}"));
    }
    relay.env.clear();
    relay.restart();
    relay.wait_ready().await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_stored_once(&report, published);
    let plain: u64 = ["trades", "funding_rates"]
        .iter()
        .map(|table| {
            bed.sql(&format!("SELECT count() FROM {DATABASE}.{table}"))
                .trim()
                .parse::<u64>()
                .expect("count")
        })
        .sum();
    assert_eq!(plain, published, "rows without FINAL");

    // Every insert of typed rows carried the asynchronous settings and a token.
    let server = bed.ch.modern().expect("the modern leg");
    let inserts = server.insert_settings().expect("insert log");
    assert!(!inserts.is_empty());
    for settings in &inserts {
        let has = |name: &str, value: Option<&str>| {
            settings
                .iter()
                .any(|(n, v)| n == name && value.is_none_or(|value| v == value))
        };
        assert!(has("async_insert", Some("1")), "{settings:?}");
        assert!(has("wait_for_async_insert", Some("1")), "{settings:?}");
        assert!(has("async_insert_deduplicate", Some("1")), "{settings:?}");
        assert!(has("insert_deduplication_token", None), "{settings:?}");
    }
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_report_a_server_older_than_the_forced_modern_profile_needs() {
    let bed = Bed::start_on(Leg::Legacy);
    let mut config = bed.config();
    config.profile = "modern".to_owned();
    // `run` stops at start-up naming the server's version and the need, before any DDL (it
    // creates the streams, which `check` then finds).
    let version = bed.sql("SELECT version()").trim().to_owned();
    let mut relay = RelayProc::spawn(&bed, "relay", &config);
    let status = relay
        .wait_exit(READY_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("run went on with an 18.16 server; log:\n{}", relay.log()));
    assert!(!status.success());
    assert!(
        relay.log().contains(&format!(
            "ClickHouse {version} is older than the modern profile needs"
        )),
        "{}",
        relay.log()
    );
    assert!(
        bed.try_sql(&format!("SELECT count() FROM {DATABASE}.trades"))
            .is_err(),
        "run created tables on a server too old for them"
    );

    // `check` reports the same.
    let path = config.write(&bed.path("modern-on-18.toml"));
    let (status, out) = relay_command(&["check", "--config", path.to_str().expect("utf-8")]).await;
    assert!(!status.success(), "check passed: {out}");
    assert!(
        out.contains(&format!(
            "ClickHouse {version} is older than the modern profile needs (22.2 or newer"
        )),
        "{out}"
    );
    assert!(out.contains("insert_deduplication_token (22.2)"), "{out}");

    // async_insert with `auto` on 18.16 (legacy) is reported too.
    config.profile = "auto".to_owned();
    config.clickhouse_extra = "async_insert = true\n".to_owned();
    let path = config.write(&bed.path("async-on-18.toml"));
    let (status, out) = relay_command(&["check", "--config", path.to_str().expect("utf-8")]).await;
    assert!(!status.success(), "check passed: {out}");
    assert!(
        out.contains("async_insert = true needs the modern profile"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_modern_servers_failures_reach_the_sink_classified_as_a_real_servers_would() {
    use prism_relay::sink::{ErrorClass, SinkError};
    let server = ChdbServer::start();
    let probe = Sink::new(server.sink_options("system")).expect("valid sink options");
    probe
        .execute("CREATE DATABASE IF NOT EXISTS classify")
        .await
        .expect("database");
    probe
        .execute("CREATE TABLE classify.numbers (n UInt8) ENGINE = MergeTree ORDER BY n")
        .await
        .expect("table");
    let sink = Sink::new(server.sink_options("classify")).expect("valid sink options");

    // A missing table or database: the target is wrong, not the rows (code 60 and 81, 404).
    let missing = sink
        .insert_json_each_row("missing", b"{\"n\":1}\n", None)
        .await
        .expect_err("no such table");
    assert_eq!(
        (missing.class, missing.code),
        (ErrorClass::Schema, Some(60)),
        "{missing}"
    );
    match probe.execute("SELECT * FROM nowhere.numbers").await {
        Err(SinkError::Query { source, .. }) => assert_eq!(
            (source.class, source.code),
            (ErrorClass::Schema, Some(81)),
            "{source}"
        ),
        other => panic!("expected a failed query, got {other:?}"),
    }
    // A value the column cannot take: the row is poison.
    let poison = sink
        .insert_json_each_row("numbers", b"{\"n\":\"not a number\"}\n", None)
        .await
        .expect_err("not a number");
    assert_eq!(poison.class, ErrorClass::Poison, "{poison}");
    assert!(
        poison.message.starts_with(&format!(
            "Code: {}. DB::Exception: ",
            poison.code.expect("a code")
        )),
        "{poison}"
    );
    // The good row goes in.
    sink.insert_json_each_row("numbers", b"{\"n\":7}\n", None)
        .await
        .expect("a good row");
    assert_eq!(
        server
            .query("SELECT n FROM classify.numbers", "TabSeparated")
            .await
            .trim(),
        "7"
    );
}
