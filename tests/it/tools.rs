//! The operator tools against real servers: `loadgen` into a real JetStream, `verify`
//! against a real ClickHouse 18.16 whose tables the tests create themselves (a minimal
//! legacy-compatible table per data type: the identity columns and ReplacingMergeTree).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt as _;
use prism_relay::tools::gen::Mix;
use prism_relay::tools::loadgen::{self, LoadgenOptions};
use prism_relay::tools::verify::{self, VerifyOptions};
use prism_relay::tools::DataType;
use prism_testbed::{ClickHouse, Nats};

/// One message read back from a stream.
struct Stored {
    seq: u64,
    subject: String,
    msg_id: Option<String>,
    payload: serde_json::Value,
}

/// Reads every message of `stream` (payloads included) with an ordered consumer.
async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    let handle = js.get_stream(stream).await.unwrap();
    let last = handle.cached_info().state.last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return out;
    }
    let consumer = handle
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("stream stalled")
    {
        let m = m.unwrap();
        let seq = m.info().unwrap().stream_sequence;
        out.push(Stored {
            seq,
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string()),
            payload: serde_json::from_slice(&m.payload).unwrap(),
        });
        if seq >= last {
            break;
        }
    }
    out
}

fn loadgen_options(nats_url: &str, run_id: &str, count: u64) -> LoadgenOptions {
    LoadgenOptions {
        nats_url: nats_url.to_string(),
        create_streams: true,
        mix: Mix::uniform(),
        count: Some(count),
        run_id: Some(run_id.to_string()),
        progress: false,
        ..LoadgenOptions::default()
    }
}

#[tokio::test]
async fn loadgen_publishes_every_type_with_subjects_headers_and_contiguous_sequences() {
    let nats = Nats::start().unwrap();
    let count = 800;
    let summary = loadgen::run(&loadgen_options(&nats.url(), "itlg", count))
        .await
        .unwrap();
    assert!(summary.ok(), "{summary}");
    assert_eq!(summary.published_total(), count);
    assert!(summary.published.iter().all(|&n| n > 0), "{summary}");
    assert_eq!(
        summary.streams_created,
        vec!["MARKET_TRADES", "MARKET_BOOKS", "MARKET_DATA"]
    );

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut per_type = [0u64; 8];
    let mut ids = HashSet::new();
    for (stream, types) in [
        ("MARKET_TRADES", &DataType::ALL[..1]),
        ("MARKET_BOOKS", &DataType::ALL[1..2]),
        ("MARKET_DATA", &DataType::ALL[2..]),
    ] {
        let range = summary.streams[stream];
        let messages = read_stream(&js, stream).await;
        assert_eq!(messages.len() as u64, range.published, "{stream}");
        assert_eq!((range.first_seq, range.last_seq), (1, range.published));
        for (i, m) in messages.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "{stream} sequences are contiguous");
            let dt = DataType::from_subject(&m.subject).unwrap();
            assert!(types.contains(&dt), "{} in {stream}", m.subject);
            per_type[dt.index()] += 1;
            let tokens: Vec<&str> = m.subject.split('.').collect();
            assert_eq!(m.payload["data_type"], tokens[0]);
            assert_eq!(m.payload["exchange"], tokens[1]);
            assert_eq!(m.payload["market_type"], tokens[2]);
            assert_eq!(m.payload["symbol"], tokens[3]);
            let id = m.msg_id.clone().expect("every message has a Nats-Msg-Id");
            let prefix = format!("{}:{}:{}:itlg:", tokens[0], tokens[1], tokens[3]);
            assert!(id.starts_with(&prefix), "{id}");
            assert!(ids.insert(id));
        }
    }
    assert_eq!(per_type, summary.published);

    // A second run with another run id appends after the first and collides with nothing.
    let again = loadgen::run(&loadgen_options(&nats.url(), "itlg2", 100))
        .await
        .unwrap();
    assert!(again.ok(), "{again}");
    assert!(again.streams_created.is_empty());
    assert_eq!(
        again.streams["MARKET_TRADES"].first_seq,
        summary.streams["MARKET_TRADES"].last_seq + 1
    );
}

#[tokio::test]
async fn loadgen_paces_a_limited_rate_by_elapsed_time() {
    let nats = Nats::start().unwrap();
    let opts = LoadgenOptions {
        single_stream: Some("PACED".into()),
        rate_per_s: 400,
        ..loadgen_options(&nats.url(), "itrate", 200)
    };
    let summary = loadgen::run(&opts).await.unwrap();
    assert!(summary.ok(), "{summary}");
    assert_eq!(summary.streams["PACED"].published, 200);
    // 200 messages at 400/s: the last is due at 497.5 ms.
    let elapsed = summary.elapsed.as_secs_f64();
    assert!((0.45..3.0).contains(&elapsed), "elapsed {elapsed}");
}

#[tokio::test]
async fn loadgen_counts_publish_errors_when_no_stream_covers_the_subjects() {
    let nats = Nats::start().unwrap();
    let opts = LoadgenOptions {
        create_streams: false,
        // No stream will ever appear: a failed publish is an error at once, not re-sent for a
        // minute as while a stream elects a leader.
        publish_retry_ms: 0,
        ..loadgen_options(&nats.url(), "itnostream", 50)
    };
    let summary = loadgen::run(&opts).await.unwrap();
    assert_eq!(summary.published_total(), 0, "{summary}");
    assert_eq!(summary.publish_errors, 50, "{summary}");
    assert!(summary.first_error.is_some());
    assert!(!summary.ok());

    // With one publish in flight, the run stops once the error budget is spent.
    let summary = loadgen::run(&LoadgenOptions {
        inflight_max: 1,
        publish_errors_max: 5,
        ..opts
    })
    .await
    .unwrap();
    assert_eq!(summary.publish_errors, 5, "{summary}");
    assert!(summary.aborted.is_some(), "{summary}");
}

const TABLE_DDL: &str = "(nats_stream String, nats_seq UInt64, row_key UInt64) \
     ENGINE = ReplacingMergeTree() ORDER BY (nats_stream, nats_seq, row_key)";

/// Runs `sql` on the test server, naming the statement when it fails.
fn exec(ch: &ClickHouse, sql: &str) {
    if let Err(e) = ch.query(sql) {
        panic!("{sql}: {e}");
    }
}

#[tokio::test]
async fn verify_counts_lost_duplicated_dead_lettered_and_unexpected_exactly() {
    let nats = Nats::start().unwrap();
    let ch = ClickHouse::start().unwrap();
    let run_id = "itverify";
    // Trades and order books only, in streams named for this test.
    let layout = ["V_TRADES=trade.>,ticker.>", "V_BOOKS=orderbook.>"];
    let summary = loadgen::run(&LoadgenOptions {
        streams: layout.iter().map(|s| s.parse().unwrap()).collect(),
        mix: "trade=1,orderbook=1".parse().unwrap(),
        exchanges: vec!["binance".into()],
        ..loadgen_options(&nats.url(), run_id, 300)
    })
    .await
    .unwrap();
    assert!(summary.ok(), "{summary}");
    let trades = summary.streams["V_TRADES"];
    let books = summary.streams["V_BOOKS"];
    // A subject no table is named for, and a message removed from the stream (seq 10).
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let ack = js
        .publish("ticker.binance.spot.BTC-USDT", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, trades.last_seq + 1);
    let stream = js.get_stream("V_TRADES").await.unwrap();
    assert!(stream.delete_message(10).await.unwrap());

    let db = "verify_it";
    exec(&ch, &format!("DROP DATABASE IF EXISTS {db}"));
    exec(&ch, &format!("CREATE DATABASE {db}"));
    for dt in DataType::ALL {
        exec(
            &ch,
            &format!("CREATE TABLE {db}.{} {TABLE_DDL}", dt.table().name()),
        );
    }
    exec(
        &ch,
        &format!(
            "CREATE TABLE {db}.dead_letters (failed_at Int64, table String, subject String, \
             nats_stream String, nats_seq UInt64, error String, payload String) \
             ENGINE = MergeTree() ORDER BY (nats_stream, nats_seq)"
        ),
    );

    // Trades: 1..=N stored except seq 2 (lost), 3 (dead-lettered) and 4 (lost);
    // seq 5 inserted twice with the same key in separate parts (FINAL collapses it);
    // seq 6 stored under two keys (a real duplicate); the order book V_BOOKS#1 stored as a
    // trade and the row of the removed seq 10 (both unexpected). Dead letters for seq 3, for
    // the ticker message, and for the removed seq 10 (not published in the range).
    let insert_rows = |table: &str, stream: &str, rows: Vec<(u64, u64)>| {
        let values: Vec<String> = rows
            .iter()
            .map(|(seq, key)| format!("('{stream}', {seq}, {key})"))
            .collect();
        format!(
            "INSERT INTO {db}.{table} (nats_stream, nats_seq, row_key) VALUES {}",
            values.join(",")
        )
    };
    let trade_rows: Vec<(u64, u64)> = (trades.first_seq..=trades.last_seq)
        .filter(|s| ![2, 3, 4].contains(s))
        .map(|s| (s, 0))
        .collect();
    exec(&ch, &insert_rows("trades", "V_TRADES", trade_rows));
    exec(
        &ch,
        &insert_rows("trades", "V_TRADES", vec![(5, 0), (6, 1)]),
    );
    exec(&ch, &insert_rows("trades", "V_BOOKS", vec![(1, 0)]));
    exec(
        &ch,
        &format!(
            "INSERT INTO {db}.dead_letters VALUES \
             (0, 'trades', 'trade.binance.spot.BTC-USDT', 'V_TRADES', 3, 'bad price', '{{}}'), \
             (0, '', 'ticker.binance.spot.BTC-USDT', 'V_TRADES', {}, 'no route', '{{}}'), \
             (0, 'trades', 'trade.binance.spot.BTC-USDT', 'V_TRADES', 10, 'bad price', '{{}}')",
            ack.sequence
        ),
    );
    // Order books: all stored; the last one also under a second key (duplicate).
    let mut book_rows: Vec<(u64, u64)> =
        (books.first_seq..=books.last_seq).map(|s| (s, 0)).collect();
    book_rows.push((books.last_seq, 7));
    exec(&ch, &insert_rows("orderbooks", "V_BOOKS", book_rows));
    // Rows of another stream with the same sequences must not count.
    exec(
        &ch,
        &insert_rows("orderbooks", "OTHER", vec![(1, 0), (1, 1)]),
    );

    let opts = VerifyOptions {
        nats_url: nats.url(),
        streams: vec!["V_TRADES".into(), "V_BOOKS".into()],
        clickhouse_url: ch.http_url(),
        database: db.into(),
        ..VerifyOptions::default()
    };
    let report = verify::run(&opts).await.unwrap();
    let text = report.to_string();
    let t = report.table(DataType::Trade);
    assert_eq!(t.published, trades.published - 1, "{text}");
    assert_eq!(t.stored, trades.published - 4, "{text}");
    assert_eq!(t.dead_lettered, 1, "{text}");
    assert_eq!(t.lost, 2, "{text}");
    assert_eq!(t.duplicated, 1, "{text}");
    assert_eq!(t.unexpected, 2, "{text}");
    let lost: Vec<u64> = t.lost_sample.iter().map(|i| i.seq).collect();
    assert_eq!(lost, vec![2, 4]);
    assert_eq!(t.duplicated_sample[0].seq, 6);
    let b = report.table(DataType::Orderbook);
    assert_eq!(
        (b.published, b.stored, b.lost),
        (books.published, books.published, 0),
        "{text}"
    );
    assert_eq!((b.duplicated, b.unexpected), (1, 0), "{text}");
    for dt in &DataType::ALL[2..] {
        assert_eq!(report.table(*dt).published, 0, "{text}");
    }
    assert_eq!(report.unexpected_dead_letters, 1, "{text}");
    assert_eq!(report.unrouted.published, 1, "{text}");
    assert_eq!(report.unrouted.dead_lettered, 1, "{text}");
    assert_eq!(
        report.unrouted.subjects_sample,
        vec!["ticker.binance.spot.BTC-USDT"]
    );
    assert!(!report.dead_letter_table_missing);
    assert!(!report.ok());
    assert!(text.contains("FAILED"), "{text}");

    // A sub-range sees only its own sequences: 1..=3 has one lost and one dead letter.
    let ranged = verify::run(&VerifyOptions {
        streams: vec!["V_TRADES".into()],
        from_seq: Some(1),
        to_seq: Some(3),
        ..opts.clone()
    })
    .await
    .unwrap();
    let t = ranged.table(DataType::Trade);
    assert_eq!(
        (t.published, t.stored, t.dead_lettered, t.lost),
        (3, 1, 1, 1)
    );
    assert_eq!(t.unexpected, 0);

    // The ranges a loadgen run reports check exactly its own messages.
    let own = verify::run_ranges(&opts, &summary.ranges()).await.unwrap();
    let t = own.table(DataType::Trade);
    assert_eq!((t.published, t.lost), (trades.published - 1, 2));
    assert_eq!(own.unrouted.published, 0, "the ticker came after the run");

    // Small chunks give the same accounting as one big chunk.
    let chunked = verify::run(&VerifyOptions {
        chunk_seqs: 7,
        ..opts.clone()
    })
    .await
    .unwrap();
    assert_eq!(chunked.totals().published, report.totals().published);
    assert_eq!(chunked.totals().lost, report.totals().lost);
    assert_eq!(chunked.totals().duplicated, report.totals().duplicated);
    assert_eq!(chunked.totals().unexpected, report.totals().unexpected);

    // Repair: store the lost ones, remove the duplicates; the check passes.
    exec(
        &ch,
        &insert_rows("trades", "V_TRADES", vec![(2, 0), (4, 0)]),
    );
    exec(
        &ch,
        &format!("ALTER TABLE {db}.trades DELETE WHERE nats_seq = 6 AND row_key = 1"),
    );
    exec(
        &ch,
        &format!("ALTER TABLE {db}.orderbooks DELETE WHERE row_key = 7"),
    );
    let repaired = poll_until(|| async {
        let r = verify::run(&opts).await.unwrap();
        r.ok().then_some(r)
    })
    .await;
    assert_eq!(repaired.totals().lost, 0);
    let by_stream: BTreeMap<&str, u64> = repaired
        .streams
        .iter()
        .map(|s| (s.stream.as_str(), s.messages))
        .collect();
    assert_eq!(by_stream["V_TRADES"], trades.published);
    assert_eq!(by_stream["V_BOOKS"], books.published);
}

/// Polls `f` until it yields a value (mutations apply asynchronously on ClickHouse).
async fn poll_until<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn verify_finds_marketprism_streams_by_itself_and_reports_missing_tables() {
    let nats = Nats::start().unwrap();
    let ch = ClickHouse::start().unwrap();
    let summary = loadgen::run(&LoadgenOptions {
        single_stream: Some("V_AUTO".into()),
        ..loadgen_options(&nats.url(), "itauto", 40)
    })
    .await
    .unwrap();
    assert!(summary.ok(), "{summary}");
    // A stream of other subjects that verify must leave alone.
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("orders.new", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let db = "verify_auto";
    exec(&ch, &format!("CREATE DATABASE {db}"));
    exec(&ch, &format!("CREATE TABLE {db}.trades {TABLE_DDL}"));
    let opts = VerifyOptions {
        nats_url: nats.url(),
        clickhouse_url: ch.http_url(),
        database: db.into(),
        ..VerifyOptions::default()
    };
    let err = verify::run(&opts).await.unwrap_err();
    assert!(
        matches!(err, prism_relay::tools::ToolError::MissingTable { .. }),
        "{err}"
    );

    // With every table present (and no dead-letter table), nothing stored means all lost.
    for dt in &DataType::ALL[1..] {
        exec(
            &ch,
            &format!("CREATE TABLE {db}.{} {TABLE_DDL}", dt.table().name()),
        );
    }
    let report = verify::run(&opts).await.unwrap();
    let streams: Vec<&str> = report.streams.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(streams, vec!["V_AUTO"]);
    assert!(report.dead_letter_table_missing);
    let totals = report.totals();
    assert_eq!((totals.published, totals.lost), (40, 40), "{report}");
    for dt in DataType::ALL {
        assert_eq!(report.table(dt).published, summary.published[dt.index()]);
    }
    assert!(!report.ok());
}
