//! The modern engine through `Chdb`: the `clickhouse` crate's LZ4 RowBinary round trip with
//! schema validation and a deduplication token, settings as URL parameters, SIGKILL and
//! restart, SIGSTOP and SIGCONT, and failures answered as a real server answers them.

use std::time::Duration;

use clickhouse::Row;
use prism_testbed::{Chdb, ClickHouse, TestbedError};
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

const CREATE_TRADES: &str =
    "CREATE TABLE trades (trade_id String, price Float64, timestamp_ms Int64, nats_seq UInt64) \
     ENGINE = MergeTree ORDER BY (trade_id, nats_seq) \
     SETTINGS non_replicated_deduplication_window = 100";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validated_lz4_rowbinary_inserts_with_a_token_are_stored_once_and_carry_their_settings(
) -> TestResult {
    let chdb = tokio::task::block_in_place(Chdb::start)?;
    chdb.query(CREATE_TRADES)?;
    let client = clickhouse::Client::default()
        .with_url(chdb.http_url())
        .with_compression(clickhouse::Compression::Lz4)
        .with_validation(true);
    let rows: Vec<Trade> = (1..=3)
        .map(|i| Trade {
            trade_id: format!("t{i}"),
            price: 100.5 * i as f64,
            timestamp_ms: 1_764_000_000_000 + i,
            nats_seq: i as u64,
        })
        .collect();
    for _ in 0..2 {
        let mut insert = client
            .insert::<Trade>("trades")
            .await?
            .with_setting("insert_deduplication_token", "batch-1")
            .with_setting("async_insert", "1")
            .with_setting("wait_for_async_insert", "1");
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await?;
    }

    let selected = client
        .query("SELECT ?fields FROM trades ORDER BY nats_seq")
        .fetch_all::<Trade>()
        .await?;
    assert_eq!(selected, rows, "the retry with the same token is dropped");
    let settings = chdb.insert_settings()?;
    assert_eq!(settings.len(), 2, "{settings:?}");
    for sent in settings {
        for expected in [
            ("insert_deduplication_token", "batch-1"),
            ("async_insert", "1"),
            ("wait_for_async_insert", "1"),
        ] {
            assert!(
                sent.iter()
                    .any(|(k, v)| (k.as_str(), v.as_str()) == expected),
                "{expected:?} not in {sent:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn rows_survive_sigkill_and_restart_on_the_same_data_dir() -> TestResult {
    let mut chdb = Chdb::start()?;
    let port = chdb.http_port();
    chdb.query("CREATE TABLE kept (id UInt64) ENGINE = MergeTree ORDER BY id")?;
    chdb.query("INSERT INTO kept SELECT number FROM system.numbers LIMIT 1000")?;

    chdb.kill9()?;
    let refused = chdb.query("SELECT 1").unwrap_err();
    assert!(matches!(refused, TestbedError::Http { .. }), "{refused}");
    chdb.restart()?;

    assert_eq!(chdb.http_port(), port);
    assert_eq!(
        chdb.query("SELECT count(), sum(id) FROM kept")?,
        "1000\t499500\n"
    );
    Ok(())
}

#[test]
fn paused_server_lets_queries_time_out_and_answers_after_resume() -> TestResult {
    let chdb = Chdb::start()?;
    chdb.pause()?;
    let err = chdb
        .query_with_timeout("SELECT 1", Duration::from_millis(PAUSED_QUERY_TIMEOUT_MS))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    chdb.resume()?;
    assert_eq!(chdb.query("SELECT 1")?, "1\n");
    Ok(())
}

/// URL-encodes a statement for the `query` parameter.
fn encode(sql: &str) -> String {
    sql.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn failures_answer_with_the_status_header_and_exception_text_of_a_real_server() -> TestResult {
    let chdb = Chdb::start()?;
    let legacy = ClickHouse::start()?;
    // 18.16 knows no deduplication window.
    let create = CREATE_TRADES.replace(" SETTINGS non_replicated_deduplication_window = 100", "");
    chdb.query(&create)?;
    legacy.query(&create)?;
    // (statement in the parameter, body, HTTP status, exception code), the status as
    // ClickHouse's exceptionCodeToHTTPStatus maps the code.
    let cases: [(&str, &[u8], u16, &str); 5] = [
        ("SELECT * FROM missing_table", b"", 404, "60"),
        ("SELECT * FROM missing_db.trades", b"", 404, "81"),
        ("SELEC 1", b"", 400, "62"),
        (
            "INSERT INTO trades FORMAT TabSeparated",
            b"t1\tnot a price\t1\t1\n",
            400,
            "27",
        ),
        ("SELECT 1 SETTINGS no_such_setting = 1", b"", 404, "115"),
    ];
    for (sql, body, status, code) in cases {
        let answer = chdb.post(&format!("/?query={}", encode(sql)), body)?;
        assert_eq!(answer.status, status, "{sql}: {answer:?}");
        assert_eq!(
            answer.exception_code.as_deref(),
            Some(code),
            "{sql}: {answer:?}"
        );
        assert!(
            answer
                .body
                .starts_with(&format!("Code: {code}. DB::Exception: ")),
            "{sql}: {answer:?}"
        );
        assert!(answer.body.contains("(version 26."), "{sql}: {answer:?}");
        // 18.16 gives the same status and code for what it already mapped (it sends the
        // code in the body only; the header came later).
        if code == "60" || code == "62" {
            let old = legacy.post(&format!("/?query={}", encode(sql)), body)?;
            assert_eq!(old.status, status, "18.16 on {sql}: {old:?}");
            assert!(
                old.body.starts_with(&format!("Code: {code}, ")),
                "18.16 on {sql}: {old:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_python_without_chdb_fails_the_start_naming_the_package_and_how_to_install_it() -> TestResult {
    // The same interpreter without its site packages, where chdb lives.
    let dir = tempfile::tempdir()?;
    let python = dir.path().join("python3-without-site-packages");
    std::fs::write(&python, "#!/bin/sh\nexec python3 -S \"$@\"\n")?;
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    match Chdb::start_with_interpreter(python) {
        Err(error @ TestbedError::ExitedEarly { .. }) => {
            let text = error.to_string();
            assert!(text.contains("chdb-core==26.9.0"), "{text}");
            assert!(text.contains("run scripts/test"), "{text}");
            Ok(())
        }
        other => panic!("expected a failed start, got {other:?}"),
    }
}
