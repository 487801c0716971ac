//! The ClickHouse sink against a real clickhouse-server (18.16, the legacy profile): inserts and
//! read-back, poison isolation, classification of a dead, paused or mismatched server, the JSON
//! passthrough and dead letters.

use std::time::{Duration, Instant};

use prism_relay::sink::{DeadLetter, ErrorClass, Sink, SinkError, SinkOptions};
use prism_testbed::ClickHouse;
use serde::{Deserialize, Serialize};

/// Database the tests write into (created by `setup`).
const DATABASE: &str = "sink_it";

/// A small typed row standing in for the codec's rows.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
struct Quote {
    id: u64,
    symbol: String,
    price: i64,
}

fn quotes(n: u64) -> Vec<Quote> {
    (0..n)
        .map(|id| Quote {
            id,
            symbol: format!("SYM-{}", id % 7),
            price: id as i64 * 100,
        })
        .collect()
}

fn options(server: &ClickHouse) -> SinkOptions {
    SinkOptions {
        url: server.http_url(),
        database: DATABASE.to_owned(),
        insert_timeout_ms: 5_000,
        connect_timeout_ms: 1_000,
        modern: false,
        ..SinkOptions::default()
    }
}

/// Starts a server with the test database and the `quotes` table.
fn setup() -> (ClickHouse, Sink) {
    let server = ClickHouse::start().expect("clickhouse-server starts");
    server
        .query(&format!("CREATE DATABASE {DATABASE}"))
        .expect("database created");
    server
        .query(&format!(
            "CREATE TABLE {DATABASE}.quotes (id UInt64, symbol String, price Int64) \
             ENGINE = ReplacingMergeTree ORDER BY id"
        ))
        .expect("table created");
    let sink = Sink::new(options(&server)).expect("valid options");
    (server, sink)
}

fn query(server: &ClickHouse, sql: &str) -> String {
    server
        .query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn uncompressed_and_lz4_inserts_store_the_same_rows_and_only_lz4_shrinks_the_bytes_sent() {
    let (server, lz4) = setup();
    let plain = Sink::new(SinkOptions {
        compress: false,
        ..options(&server)
    })
    .expect("valid options");
    let rows = quotes(20_000);
    lz4.insert("quotes", &rows[..10_000], None)
        .await
        .expect("lz4 insert");
    plain
        .insert("quotes", &rows[10_000..], None)
        .await
        .expect("uncompressed insert");
    assert_eq!(
        query(
            &server,
            "SELECT count(), sum(id), sum(price), uniqExact(symbol) FROM sink_it.quotes"
        ),
        format!(
            "20000\t{}\t{}\t7",
            (0..20_000u64).sum::<u64>(),
            (0..20_000i64).map(|i| i * 100).sum::<i64>()
        )
    );
    // The same rows' bodies: on the wire LZ4 takes a fraction of them, no compression all of
    // them plus the HTTP heads.
    let (lz4, plain) = (lz4.wire_bytes(), plain.wire_bytes());
    assert!(
        plain.uncompressed() > 100_000,
        "body of 10,000 rows: {}",
        plain.uncompressed()
    );
    assert!(
        plain.compressed() >= plain.uncompressed(),
        "uncompressed sink: wire {} < body {}",
        plain.compressed(),
        plain.uncompressed()
    );
    assert!(
        lz4.compressed() * 2 < lz4.uncompressed(),
        "lz4 sink: wire {} of body {}",
        lz4.compressed(),
        lz4.uncompressed()
    );
}

#[tokio::test]
async fn rows_inserted_in_one_call_are_read_back_exactly() {
    let (server, sink) = setup();
    let version = sink.server_version().await.expect("version");
    assert!(version.starts_with("18.16"), "{version}");

    let rows = quotes(10_000);
    sink.insert("quotes", &rows, Some("batch-1"))
        .await
        .expect("insert");
    assert_eq!(
        query(
            &server,
            "SELECT count(), sum(id), sum(price), uniqExact(symbol) FROM sink_it.quotes"
        ),
        "10000\t49995000\t4999500000\t7"
    );
    assert_eq!(
        query(
            &server,
            "SELECT id, symbol, price FROM sink_it.quotes WHERE id = 4321"
        ),
        "4321\tSYM-2\t432100"
    );
    // An empty batch sends nothing and succeeds.
    sink.insert::<Quote>("quotes", &[], None)
        .await
        .expect("empty insert");
}

#[tokio::test]
async fn table_columns_lists_each_table_in_declaration_order() {
    let (_server, sink) = setup();
    sink.execute(&format!(
        "CREATE TABLE {DATABASE}.zeta (b String, a UInt8, c Decimal64(8)) ENGINE = MergeTree ORDER BY a"
    ))
    .await
    .expect("DDL through execute");
    let tables = sink.table_columns(DATABASE).await.expect("columns");
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    };
    assert_eq!(
        tables.get("quotes"),
        Some(&pairs(&[
            ("id", "UInt64"),
            ("symbol", "String"),
            ("price", "Int64")
        ]))
    );
    assert_eq!(
        tables.get("zeta"),
        Some(&pairs(&[
            ("b", "String"),
            ("a", "UInt8"),
            ("c", "Decimal(18, 8)")
        ]))
    );
    assert_eq!(tables.len(), 2);
    assert!(sink
        .table_columns("no_such_db")
        .await
        .expect("columns")
        .is_empty());
}

/// 18.16 does not check Enum8 values in RowBinary, so the poison here comes from a value an
/// expression rejects: the MATERIALIZED column parses `code` as a number.
#[tokio::test]
async fn a_poison_row_is_isolated_and_every_good_row_is_stored() {
    let (server, sink) = setup();
    server
        .query(&format!(
            "CREATE TABLE {DATABASE}.codes (id UInt64, code String, n UInt32 MATERIALIZED toUInt32(code)) \
             ENGINE = ReplacingMergeTree ORDER BY id"
        ))
        .expect("table created");

    #[derive(Debug, clickhouse::Row, Serialize)]
    struct Code {
        id: u64,
        code: String,
    }
    let rows: Vec<Code> = (0..50)
        .map(|id| Code {
            id,
            code: if id == 37 {
                "not a number".into()
            } else {
                id.to_string()
            },
        })
        .collect();

    let whole = sink
        .insert("codes", &rows, Some("b"))
        .await
        .expect_err("poison");
    assert_eq!(whole.class, ErrorClass::Poison, "{whole}");
    assert_eq!(whole.code, Some(6));

    let outcome = sink
        .insert_isolating("codes", &rows, Some("b"))
        .await
        .expect("isolated");
    let indices: Vec<usize> = outcome.poison.iter().map(|p| p.index).collect();
    assert_eq!(indices, [37]);
    assert!(outcome.poison[0].error.message.contains("not a number"));
    assert_eq!(outcome.rows_inserted, 49);
    assert!(outcome.inserts <= 2 * 6 + 1, "{} inserts", outcome.inserts);
    assert_eq!(
        query(
            &server,
            "SELECT count(), sum(n), countIf(id = 37) FROM sink_it.codes"
        ),
        format!("49\t{}\t0", (0..50).sum::<u32>() - 37)
    );

    // A bisection run again (the drain retrying after a crash) sends the same inserts and reaches
    // the same verdict; the rows it stores twice collapse by identity.
    let again = sink
        .insert_isolating("codes", &rows, Some("b"))
        .await
        .expect("isolated again");
    assert_eq!(again, outcome);
    assert_eq!(
        query(&server, "SELECT count(), sum(n) FROM sink_it.codes FINAL"),
        format!("49\t{}", (0..50).sum::<u32>() - 37)
    );
}

#[tokio::test]
async fn connection_refused_after_kill_is_retryable_and_inserts_resume_after_restart() {
    let (mut server, sink) = setup();
    sink.insert("quotes", &quotes(10), None)
        .await
        .expect("insert");
    server.kill9().expect("kill -9");

    let error = sink
        .insert("quotes", &quotes(10), None)
        .await
        .expect_err("server is down");
    assert_eq!(error.class, ErrorClass::Retryable, "{error}");
    assert_eq!(error.code, None);
    let isolating = sink
        .insert_isolating("quotes", &quotes(10), Some("t"))
        .await
        .expect_err("server is down");
    assert_eq!(isolating.class, ErrorClass::Retryable);
    let version = sink.server_version().await.expect_err("server is down");
    assert_eq!(version.class(), Some(ErrorClass::Retryable));

    server.restart().expect("restart");
    sink.insert("quotes", &quotes(20), None)
        .await
        .expect("insert after restart");
    assert_eq!(
        query(&server, "SELECT count() FROM sink_it.quotes FINAL"),
        "20"
    );
}

#[tokio::test]
async fn a_paused_server_fails_the_insert_as_retryable_within_the_timeout() {
    let (server, _) = setup();
    let sink = Sink::new(SinkOptions {
        insert_timeout_ms: 500,
        ..options(&server)
    })
    .expect("valid options");
    server.pause().expect("SIGSTOP");

    let started = Instant::now();
    let error = sink
        .insert("quotes", &quotes(100), Some("t"))
        .await
        .expect_err("paused");
    let elapsed = started.elapsed();
    server.resume().expect("SIGCONT");
    assert_eq!(error.class, ErrorClass::Retryable, "{error}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");

    // Once resumed, the same batch goes in (duplicates of a request the server finished late
    // would collapse in the ReplacingMergeTree).
    sink.insert("quotes", &quotes(100), Some("t"))
        .await
        .expect("insert after resume");
    assert_eq!(
        query(&server, "SELECT count() FROM sink_it.quotes FINAL"),
        "100"
    );
}

#[tokio::test]
async fn a_missing_table_or_database_is_a_schema_error_and_is_not_bisected() {
    let (server, sink) = setup();
    let error = sink
        .insert("no_such_table", &quotes(4), None)
        .await
        .expect_err("no table");
    assert_eq!(
        (error.class, error.code),
        (ErrorClass::Schema, Some(60)),
        "{error}"
    );

    let isolating = sink
        .insert_isolating("no_such_table", &quotes(4), Some("t"))
        .await
        .expect_err("no table");
    assert_eq!(isolating.class, ErrorClass::Schema);

    let no_db = Sink::new(SinkOptions {
        database: "no_such_db".into(),
        ..options(&server)
    })
    .expect("valid options");
    let error = no_db
        .insert("quotes", &quotes(4), None)
        .await
        .expect_err("no database");
    assert_eq!(
        (error.class, error.code),
        (ErrorClass::Schema, Some(81)),
        "{error}"
    );
}

#[tokio::test]
async fn a_row_type_that_does_not_match_the_table_is_a_schema_error() {
    let (_server, sink) = setup();
    // `id` is UInt64 in the table; four bytes per row leave the server short of data.
    #[derive(Debug, clickhouse::Row, Serialize)]
    struct Narrow {
        id: u32,
    }
    let error = sink
        .insert("quotes", &[Narrow { id: 1 }], None)
        .await
        .expect_err("mismatch");
    assert_eq!(
        (error.class, error.code),
        (ErrorClass::Schema, Some(33)),
        "{error}"
    );

    #[derive(Debug, clickhouse::Row, Serialize)]
    struct Extra {
        id: u64,
        colour: String,
    }
    let missing_column = sink
        .insert(
            "quotes",
            &[Extra {
                id: 1,
                colour: "red".into(),
            }],
            None,
        )
        .await
        .expect_err("no such column");
    assert_eq!(missing_column.class, ErrorClass::Schema, "{missing_column}");
}

#[tokio::test]
async fn json_each_row_passthrough_inserts_and_isolates_a_bad_line() {
    let (server, sink) = setup();
    server
        .query(&format!(
            "CREATE TABLE {DATABASE}.events (id UInt64, side Enum8('buy' = 1, 'sell' = 2), note String) \
             ENGINE = MergeTree ORDER BY id"
        ))
        .expect("table created");

    // Fields the table lacks are ignored; the whole body is one insert.
    let body = b"{\"id\":1,\"side\":\"buy\",\"note\":\"a\",\"extra\":true}\n{\"id\":2,\"side\":\"sell\",\"note\":\"b\"}\n";
    sink.insert_json_each_row("events", body, Some("j1"))
        .await
        .expect("insert");
    assert_eq!(query(&server, "SELECT count() FROM sink_it.events"), "2");

    let bad_enum = sink
        .insert_json_each_row("events", b"{\"id\":3,\"side\":\"bogus\"}\n", None)
        .await
        .expect_err("bad enum");
    assert_eq!(bad_enum.class, ErrorClass::Poison, "{bad_enum}");

    let rows: Vec<String> = (10..30)
        .map(|id| match id {
            14 => format!("{{\"id\":{id},\"side\":\"bogus\",\"note\":\"x\"}}"),
            21 => "{\"id\": 21, \"side\": ".to_owned(),
            25 => String::new(),
            _ => format!("{{\"id\":{id},\"side\":\"sell\",\"note\":\"n{id}\"}}"),
        })
        .collect();
    // The drain may hold the rows as one body; its lines are the rows.
    let body = rows.join("\n");
    let lines = prism_relay::sink::json::split_lines(body.as_bytes());
    assert_eq!(lines.len(), rows.len());
    let outcome = sink
        .insert_json_isolating("events", &lines, Some("j2"))
        .await
        .expect("isolated");
    let indices: Vec<usize> = outcome.poison.iter().map(|p| p.index).collect();
    assert_eq!(indices, [4, 11, 15]);
    assert!(
        outcome.poison[0].error.message.contains("bogus"),
        "{:?}",
        outcome.poison[0]
    );
    assert!(outcome
        .poison
        .iter()
        .all(|p| p.error.class == ErrorClass::Poison));
    assert_eq!(outcome.rows_inserted, 17);
    assert_eq!(
        query(
            &server,
            "SELECT count(), countIf(id IN (14, 21, 25)) FROM sink_it.events WHERE id >= 10"
        ),
        "17\t0"
    );
}

/// A parse error on the first line makes the server answer before the client has sent the rest
/// of a large body; the answer must still be read as poison, not as a broken connection.
#[tokio::test]
async fn a_bad_first_line_of_a_large_json_body_is_poison_not_a_transport_error() {
    let (server, _) = setup();
    // The answer is what is tested, not its speed: a loaded machine may take longer than the
    // other tests' bound to parse and answer while the client is still sending 16 MB.
    let sink = Sink::new(SinkOptions {
        insert_timeout_ms: 60_000,
        ..options(&server)
    })
    .expect("valid options");
    server
        .query(&format!(
            "CREATE TABLE {DATABASE}.wide (id UInt64, note String) ENGINE = MergeTree ORDER BY id"
        ))
        .expect("table created");
    // About 16 MB of notes that LZ4 cannot shrink much (a xorshift sequence), so the body
    // outlasts the socket buffers.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut body = b"{\"id\":\"not a number\"}\n".to_vec();
    for id in 0..100_000 {
        let mut note = String::with_capacity(160);
        for _ in 0..10 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            note.push_str(&format!("{state:016x}"));
        }
        body.extend_from_slice(format!("{{\"id\":{id},\"note\":\"{note}\"}}\n").as_bytes());
    }
    let error = sink
        .insert_json_each_row("wide", &body, None)
        .await
        .expect_err("bad first line");
    assert_eq!(error.class, ErrorClass::Poison, "{error}");
    assert_eq!(query(&server, "SELECT count() FROM sink_it.wide"), "0");
}

#[tokio::test]
async fn dead_letters_are_inserted_and_read_back() {
    let (server, sink) = setup();
    // The legacy profile's dead-letter table: DateTime64(3) becomes Int64 milliseconds.
    server
        .query(&format!(
            "CREATE TABLE {DATABASE}.dead_letters (failed_at Int64, published_at Int64, table String, \
             subject String, nats_stream String, nats_seq UInt64, error String, payload String, \
             wal_lsn UInt64) ENGINE = MergeTree ORDER BY (nats_stream, nats_seq)"
        ))
        .expect("table created");
    let letters = [
        DeadLetter {
            failed_at: 1_761_714_312_456,
            published_at: 1_761_714_312_000,
            table: "trades".into(),
            subject: "trade.binance.spot.BTC-USDT".into(),
            nats_stream: "MARKET_DATA".into(),
            nats_seq: 42,
            error: "Code: 6, Cannot parse string".into(),
            payload: b"{\"price\":\"x\"}".to_vec(),
            wal_lsn: 7,
        },
        DeadLetter {
            failed_at: 1_761_714_312_999,
            published_at: 1_761_714_311_000,
            table: String::new(),
            subject: "weird.subject".into(),
            nats_stream: "MARKET_DATA".into(),
            nats_seq: 43,
            error: "no route".into(),
            // Not UTF-8: stored byte for byte.
            payload: b"not json \xff\xfe".to_vec(),
            wal_lsn: 8,
        },
    ];
    sink.insert_dead_letters("dead_letters", &letters, Some("dl-1"))
        .await
        .expect("insert");
    assert_eq!(
        query(
            &server,
            "SELECT failed_at, table, subject, nats_stream, nats_seq, error, payload, wal_lsn \
             FROM sink_it.dead_letters ORDER BY nats_seq FORMAT TSV"
        ),
        "1761714312456\ttrades\ttrade.binance.spot.BTC-USDT\tMARKET_DATA\t42\tCode: 6, Cannot parse string\t{\"price\":\"x\"}\t7\n\
         1761714312999\t\tweird.subject\tMARKET_DATA\t43\tno route\tnot json \u{fffd}\u{fffd}\t8"
    );
    assert_eq!(
        query(
            &server,
            "SELECT hex(payload) FROM sink_it.dead_letters WHERE nats_seq = 43"
        ),
        "6E6F74206A736F6E20FFFE"
    );
}

#[tokio::test]
async fn a_failing_statement_reports_its_class() {
    let (_server, sink) = setup();
    let error = sink
        .execute("SELECT * FROM sink_it.no_such_table")
        .await
        .expect_err("no table");
    assert!(matches!(&error, SinkError::Query { .. }), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Schema));
}

/// ClickHouse 23.8 cannot run on these machines, so what a modern server receives is checked with
/// a minimal HTTP listener that records the request line and accepts the insert.
#[tokio::test]
async fn a_modern_server_receives_the_deduplication_token_with_each_insert() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let recorder = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // The body is chunked; the request is complete at the empty last chunk.
        while !request.ends_with(b"\r\n0\r\n\r\n") {
            let n = stream.read(&mut buf).expect("read request");
            assert!(n > 0, "client closed before the end of the body");
            request.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .expect("respond");
        let head = String::from_utf8_lossy(&request);
        head.lines().next().unwrap_or_default().to_owned()
    });

    let sink = Sink::new(SinkOptions {
        url,
        database: DATABASE.to_owned(),
        modern: true,
        ..SinkOptions::default()
    })
    .expect("valid options");
    sink.insert_json_each_row("events", b"{\"id\":1}\n", Some("stream-a:17-42"))
        .await
        .expect("accepted");
    let request_line = recorder.join().expect("recorder thread");
    assert!(
        request_line.contains("insert_deduplication_token=stream-a%3A17-42"),
        "{request_line}"
    );
    assert!(
        request_line.contains("insert_deduplicate=1"),
        "{request_line}"
    );
    assert!(
        request_line.contains("input_format_skip_unknown_fields=1"),
        "{request_line}"
    );
}

/// The `auto` profile asks the version before it knows the server generation, so reading it must
/// not depend on the modern-only validation; a modern sink pointed at 18.16 by mistake fails its
/// inserts as a schema (configuration) error, not as poison.
#[tokio::test]
async fn the_version_is_readable_whatever_the_profile_and_a_wrong_profile_is_a_schema_error() {
    let (server, _) = setup();
    let modern = Sink::new(SinkOptions {
        modern: true,
        ..options(&server)
    })
    .expect("valid options");
    let version = modern.server_version().await.expect("version");
    assert!(version.starts_with("18.16"), "{version}");
    let error = modern
        .insert("quotes", &quotes(3), Some("t"))
        .await
        .expect_err("18.16 lacks what a modern insert uses");
    assert_eq!(error.class, ErrorClass::Schema, "{error}");
}

#[tokio::test]
async fn a_dead_letter_written_again_in_another_month_lands_in_the_same_partition_and_merges_with_the_first(
) {
    use prism_relay::schema::{self, Profile, SchemaTable};
    use prism_wal::{Envelope, StreamSeq};
    use std::borrow::Cow;

    let (server, sink) = setup();
    query(
        &server,
        &schema::ddl(Profile::Legacy, DATABASE, SchemaTable::DeadLetters, None),
    );
    let envelope = Envelope {
        stream: Cow::Borrowed("MARKET_DATA"),
        stream_seq: StreamSeq(7),
        subject: Cow::Borrowed("trade.binance.spot.BTC-USDT"),
        headers: Vec::new(),
        published_ns: 1_761_714_312_456_000_000,
        payload: Cow::Borrowed(br#"{"price":"x"}"#),
    };
    // The batch failed on the last day of a month and was re-cut after a restart the next day.
    let jan_31_ms = 1_769_860_800_000;
    let feb_1_ms = 1_769_947_200_000;
    for now_ms in [jan_31_ms, feb_1_ms] {
        let letter = prism_relay::drain::dead_letter(
            "trades",
            &envelope,
            prism_wal::Lsn(5),
            "bad price".into(),
            now_ms,
        );
        sink.insert_dead_letters("dead_letters", &[letter], None)
            .await
            .expect("insert");
    }
    // Both copies must land in one partition: ClickHouse merges (and so collapses) rows only
    // within a partition, and a retried insert splits into parts by partition.
    query(&server, "OPTIMIZE TABLE sink_it.dead_letters FINAL");
    assert_eq!(
        query(
            &server,
            "SELECT count(), uniqExact(_partition_id) FROM sink_it.dead_letters WHERE nats_seq = 7 FORMAT TSV"
        ),
        "1\t1"
    );
}

/// Bytes the endless stand-in below sends at most before it gives up on its client: far past the
/// sink's answer bound, so a client that reads without a bound reads all of it.
const ENDLESS_ANSWER_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// A stand-in for a broken ClickHouse: reads a request head, answers `500` with a chunked body
/// that never ends (1 MiB chunks of `x`) until the client hangs up or `ENDLESS_ANSWER_BYTES_MAX`
/// is sent. Returns the address and a handle that yields the bytes of body sent.
async fn endless_answer_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<u64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let handle = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("one connection");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let response_head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
        if conn.write_all(response_head).await.is_err() {
            return 0;
        }
        let chunk = vec![b'x'; 1024 * 1024];
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        let mut sent = 0u64;
        while sent < ENDLESS_ANSWER_BYTES_MAX {
            if conn.write_all(&framed).await.is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        sent
    });
    (addr, handle)
}

#[tokio::test]
async fn an_endless_answer_fails_the_request_as_retryable_after_a_bounded_read() {
    let (addr, server) = endless_answer_server().await;
    let sink = Sink::new(SinkOptions {
        url: format!("http://{addr}"),
        database: DATABASE.to_owned(),
        // Long enough that only the answer bound, not the timeout, can end the request.
        insert_timeout_ms: 120_000,
        connect_timeout_ms: 1_000,
        modern: false,
        ..SinkOptions::default()
    })
    .expect("valid options");
    let error = sink
        .insert("quotes", &quotes(3), None)
        .await
        .expect_err("an endless answer is an error");
    assert_eq!(
        error.class,
        ErrorClass::Retryable,
        "a broken answer is the server's fault, never the rows': {error}"
    );
    let sent = server.await.expect("stand-in finished");
    let bound = prism_relay::sink::bounded::ANSWER_BYTES_MAX;
    assert!(
        sent <= bound + 32 * 1024 * 1024,
        "the client read {sent} bytes of an endless answer; it must hang up soon after {bound}"
    );
}

/// Epoch milliseconds of noon UTC on the 15th of the month `months` after January 2010.
fn mid_month_ms(months: i64) -> i64 {
    let (year, month) = (2010 + months / 12, months % 12 + 1);
    // Days from 1970-01-01 to the 15th of that month (proleptic Gregorian calendar).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + 14;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400_000 + 12 * 3_600_000
}

/// Months a batch spreads its rows over: more than the 100 partitions ClickHouse accepts in one
/// INSERT block by default (`max_partitions_per_insert_block`).
const SPREAD_MONTHS: i64 = 150;

/// Trades of one market, `per_month` in each of [`SPREAD_MONTHS`] months from January 2010,
/// interleaved (month `i % SPREAD_MONTHS` for row `i`) as a replay of old data arrives. The row
/// whose index is `poison` carries a trade id the test table's CHECK constraint rejects.
fn spread_trades(per_month: i64, poison: Option<usize>) -> Vec<(String, Vec<u8>)> {
    (0..SPREAD_MONTHS * per_month)
        .map(|i| {
            let ts_ms = mid_month_ms(i % SPREAD_MONTHS) + i;
            let trade_id = if poison == Some(i as usize) {
                "not-a-number".to_owned()
            } else {
                i.to_string()
            };
            let payload = format!(
                r#"{{"symbol":"BTC-USDT","price":"100.5","quantity":"0.25","side":"buy","is_maker":true,"trade_id":"{trade_id}","exchange":"binance","market_type":"spot","data_source":"marketprism","data_type":"trade","ts_ms":{ts_ms},"trade_ts_ms":{ts_ms},"publisher":"unified-collector","collected_ts_ms":{ts_ms}}}"#
            );
            ("trade.binance.spot.BTC-USDT".to_owned(), payload.into_bytes())
        })
        .collect()
}

/// A modern engine (ClickHouse 18.16 has no limit on the partitions of one INSERT block; modern
/// servers refuse more than `max_partitions_per_insert_block`, 100 by default) with the relay's
/// modern `trades` table in [`DATABASE`], and a modern sink into it. A CHECK constraint rejects
/// the trade id `not-a-number`, so a row can be made poison.
async fn trades_server() -> (crate::modern::ChdbServer, Sink) {
    use prism_relay::codec::Table;
    use prism_relay::schema::{ddl, Profile};
    let server = crate::modern::ChdbServer::start();
    let probe = Sink::new(server.sink_options("system")).expect("valid sink options");
    for sql in [
        format!("CREATE DATABASE IF NOT EXISTS {DATABASE}"),
        ddl(Profile::Modern, DATABASE, Table::Trades, None),
        format!("ALTER TABLE {DATABASE}.trades ADD CONSTRAINT numeric_trade_id CHECK trade_id != 'not-a-number'"),
    ] {
        probe
            .execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let sink = Sink::new(server.sink_options(DATABASE)).expect("valid sink options");
    (server, sink)
}

/// Cuts one batch of `messages` the way a lane does and inserts it through the sink.
async fn insert_trades_batch(
    sink: &Sink,
    messages: &[(String, Vec<u8>)],
) -> prism_relay::sink::IsolateOutcome {
    use prism_relay::codec::{Table, TimeWindow};
    use prism_relay::drain::{Batch, RowsKind};
    use prism_wal::{Envelope, Lsn, StreamSeq};
    use std::borrow::Cow;
    let mut batch = Batch::new(Table::Trades.name(), RowsKind::Typed, TimeWindow::default());
    // Published now: every row time lies inside the window of plausible times.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    for (i, (subject, payload)) in messages.iter().enumerate() {
        let envelope = Envelope {
            stream: Cow::Borrowed("MARKET_DATA"),
            stream_seq: StreamSeq(i as u64 + 1),
            subject: Cow::Borrowed(subject),
            headers: Vec::new(),
            published_ns: now_ms * 1_000_000,
            payload: Cow::Borrowed(payload),
        };
        batch.push(Lsn(i as u64 + 1), &envelope, now_ms);
    }
    assert!(batch.dead.is_empty(), "{:?}", batch.dead);
    let token = batch.token();
    batch
        .rows
        .insert(sink, Table::Trades.name(), &token)
        .await
        .expect("the batch is stored")
}

/// Rows spread over more months than one INSERT block may hold are split by month, one insert
/// per month after the first attempt, instead of being bisected into many small inserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spread_over_more_months_than_one_insert_may_hold_is_stored_with_one_insert_per_month(
) {
    let (server, sink) = trades_server().await;
    let messages = spread_trades(4, None);
    let outcome = insert_trades_batch(&sink, &messages).await;
    assert!(outcome.poison.is_empty(), "{:?}", outcome.poison);
    assert_eq!(outcome.rows_inserted, messages.len());
    assert_eq!(
        outcome.inserts,
        1 + SPREAD_MONTHS as u32,
        "the whole batch once, then each month once"
    );
    assert_eq!(
        server
            .query(
                "SELECT count(), uniqExact(toYYYYMM(timestamp)) FROM sink_it.trades",
                "TabSeparated"
            )
            .await
            .trim(),
        format!("{}\t{SPREAD_MONTHS}", messages.len())
    );
}

/// A poison row in a batch spread over many months is isolated alone: every other row, of every
/// month, is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_in_a_batch_spread_over_many_months_is_the_only_row_rejected() {
    let (server, sink) = trades_server().await;
    let poison = 333;
    let messages = spread_trades(4, Some(poison));
    let outcome = insert_trades_batch(&sink, &messages).await;
    let indices: Vec<usize> = outcome.poison.iter().map(|p| p.index).collect();
    assert_eq!(indices, [poison]);
    assert!(
        outcome.poison[0].error.message.contains("not-a-number"),
        "{}",
        outcome.poison[0].error
    );
    assert_eq!(outcome.rows_inserted, messages.len() - 1);
    assert_eq!(
        server
            .query(
                "SELECT count(), countIf(trade_id = 'not-a-number') FROM sink_it.trades",
                "TabSeparated"
            )
            .await
            .trim(),
        format!("{}\t0", messages.len() - 1)
    );
}
