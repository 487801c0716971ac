//! ClickHouse through `ClickHouse`: the `clickhouse` crate's RowBinary round trip,
//! SIGKILL and restart, SIGSTOP and SIGCONT, and query errors.

use std::time::{Duration, Instant};

use clickhouse::Row;
use prism_testbed::{ClickHouse, TestbedError};
use serde::{Deserialize, Serialize};

use crate::TestResult;

/// Bound on a query sent to a paused server; short, since it is meant to run out.
const PAUSED_QUERY_TIMEOUT_MS: u64 = 300;

#[derive(Debug, PartialEq, Row, Serialize, Deserialize)]
struct Trade {
    trade_id: String,
    price: f64,
    timestamp_ms: i64,
    nats_seq: u64,
}

/// A client for the legacy server: 18.16 lacks `RowBinaryWithNamesAndTypes`,
/// which the crate's schema validation uses.
fn client(clickhouse: &ClickHouse) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(clickhouse.http_url())
        .with_validation(false)
}

#[tokio::test]
async fn rows_inserted_as_lz4_rowbinary_by_the_clickhouse_crate_are_selected_back() -> TestResult {
    let clickhouse = ClickHouse::start()?;
    clickhouse.query(
        "CREATE TABLE trades (trade_id String, price Float64, timestamp_ms Int64, nats_seq UInt64) \
         ENGINE = ReplacingMergeTree ORDER BY (trade_id, nats_seq)",
    )?;
    let client = client(&clickhouse);
    let rows: Vec<Trade> = (1..=3)
        .map(|i| Trade {
            trade_id: format!("t{i}"),
            price: 100.5 * i as f64,
            timestamp_ms: 1_764_000_000_000 + i,
            nats_seq: i as u64,
        })
        .collect();

    let mut insert = client.insert::<Trade>("trades").await?;
    for row in &rows {
        insert.write(row).await?;
    }
    insert.end().await?;

    let selected = client
        .query("SELECT ?fields FROM trades ORDER BY nats_seq")
        .fetch_all::<Trade>()
        .await?;
    assert_eq!(selected, rows);
    let count: u64 = client
        .query("SELECT count() FROM trades")
        .fetch_one()
        .await?;
    assert_eq!(count, 3);
    Ok(())
}

#[test]
fn rows_survive_sigkill_and_restart_on_the_same_data_dir() -> TestResult {
    let mut clickhouse = ClickHouse::start()?;
    let (http_port, tcp_port) = (clickhouse.http_port(), clickhouse.tcp_port());
    clickhouse.query("CREATE TABLE kept (id UInt64) ENGINE = MergeTree ORDER BY id")?;
    clickhouse.query("INSERT INTO kept SELECT number FROM system.numbers LIMIT 1000")?;

    clickhouse.kill9()?;
    let refused = clickhouse.query("SELECT 1").unwrap_err();
    assert!(matches!(refused, TestbedError::Http { .. }), "{refused}");
    clickhouse.restart()?;

    assert_eq!(
        (clickhouse.http_port(), clickhouse.tcp_port()),
        (http_port, tcp_port)
    );
    assert_eq!(
        clickhouse.query("SELECT count(), sum(id) FROM kept")?,
        "1000\t499500\n"
    );
    Ok(())
}

#[test]
fn paused_server_lets_queries_time_out_and_answers_after_resume() -> TestResult {
    let clickhouse = ClickHouse::start()?;
    clickhouse.pause()?;

    let started = Instant::now();
    let err = clickhouse
        .query_with_timeout("SELECT 1", Duration::from_millis(PAUSED_QUERY_TIMEOUT_MS))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(PAUSED_QUERY_TIMEOUT_MS));

    clickhouse.resume()?;
    assert_eq!(clickhouse.query("SELECT 1")?, "1\n");
    Ok(())
}

#[test]
fn rejected_query_carries_the_servers_exception_text() -> TestResult {
    let clickhouse = ClickHouse::start()?;
    match clickhouse.query("SELECT * FROM missing_table") {
        Err(TestbedError::Query { status, exception }) => {
            assert_eq!(status, 404);
            assert!(exception.contains("missing_table"), "{exception}");
            assert!(exception.contains("doesn't exist"), "{exception}");
        }
        other => panic!("expected a rejected query, got {other:?}"),
    }
    Ok(())
}
