//! The relay end to end: the binary between real NATS and ClickHouse servers, with exact
//! accounting of what was published and what was stored. The tests every user depends on run
//! on both legs (see the `on_both_legs!` list at the end): `relay::legacy::*` against
//! clickhouse-server 18.16, `relay::modern::*` against the test bed's modern engine.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prism_relay::ingest::DEAD_LETTER_PAYLOAD_BYTES_MAX;
use prism_relay::run::RunError;
use prism_relay::tools::DataType;

use crate::harness::{
    assert_totals, dir_bytes, free_port, http_get, metric_sum, relay_command, wait_for, wait_until,
    wait_until_sync, Bed, ConsumerDef, InProcRelay, Leg, Load, RelayConfig, RelayProc, DATABASE,
    DRAIN_TIMEOUT, READY_TIMEOUT,
};

/// Every column of `table` in the bed's database, in table order.
fn columns_of(bed: &Bed, table: &str) -> Vec<String> {
    bed.rows(&format!("DESCRIBE TABLE {DATABASE}.{table}"))
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One hand-written message and the row it must become: (column, value as ClickHouse prints it).
struct Case {
    subject: &'static str,
    payload: &'static str,
    table: &'static str,
    row: Vec<(&'static str, &'static str)>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            subject: "trade.binance.spot.BTC-USDT",
            payload: r#"{"symbol":"BTC-USDT","price":"112345.67000000","quantity":"0.00120000","side":"buy","trade_id":"5321098765","exchange":"binance","market_type":"spot","data_source":"marketprism","data_type":"trade","ts_ms":1761714312456,"trade_ts_ms":1761714312345,"publisher":"unified-collector","collected_ts_ms":1761714312401}"#,
            table: "trades",
            row: vec![
                ("timestamp", "1761714312456"),
                ("exchange", "binance"),
                ("market_type", "spot"),
                ("symbol", "BTC-USDT"),
                ("trade_id", "5321098765"),
                ("price", "112345.67000000"),
                ("quantity", "0.00120000"),
                ("side", "buy"),
                ("is_maker", "0"),
                ("trade_time", "1761714312345"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_TRADES"),
                ("nats_seq", "1"),
            ],
        },
        Case {
            subject: "orderbook.binance.spot.BTC-USDT",
            payload: r#"{"exchange":"binance","market_type":"spot","symbol":"BTC-USDT","bids":[["112345.60000000","1.23400000"],["112345.5","0.5"],["112340","2"]],"asks":[["112345.70000000","0.80000000"],["112346.01","3.25"]],"last_update_id":71234567890,"data_type":"orderbook","ts_ms":1761714312456,"publisher":"unified-collector","collected_ts_ms":1761714312450}"#,
            table: "orderbooks",
            row: vec![
                ("timestamp", "1761714312456"),
                ("exchange", "binance"),
                ("market_type", "spot"),
                ("symbol", "BTC-USDT"),
                ("last_update_id", "71234567890"),
                ("bids_count", "3"),
                ("asks_count", "2"),
                ("best_bid_price", "112345.60000000"),
                ("best_ask_price", "112345.70000000"),
                ("best_bid_quantity", "1.23400000"),
                ("best_ask_quantity", "0.80000000"),
                (
                    "bids",
                    r#"[["112345.60000000","1.23400000"],["112345.50000000","0.50000000"],["112340.00000000","2.00000000"]]"#,
                ),
                (
                    "asks",
                    r#"[["112345.70000000","0.80000000"],["112346.01000000","3.25000000"]]"#,
                ),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_BOOKS"),
                ("nats_seq", "1"),
            ],
        },
        Case {
            // OKX: no update id, and the older object format of levels.
            subject: "orderbook.okx.perpetual.ETH-USDT",
            payload: r#"{"exchange":"okx","market_type":"perpetual","symbol":"ETH-USDT","bids":[{"price":"4012.35","quantity":"12.5"},{"price":"4012.4","quantity":"0.001"}],"asks":[{"price":"4012.50","quantity":"7"}],"last_update_id":null,"data_type":"orderbook","ts_ms":1761714312999,"publisher":"unified-collector","collected_ts_ms":1761714312990,"data_source":"marketprism"}"#,
            table: "orderbooks",
            row: vec![
                ("timestamp", "1761714312999"),
                ("exchange", "okx"),
                ("market_type", "perpetual"),
                ("symbol", "ETH-USDT"),
                ("last_update_id", "0"),
                ("bids_count", "2"),
                ("asks_count", "1"),
                ("best_bid_price", "4012.40000000"),
                ("best_ask_price", "4012.50000000"),
                ("best_bid_quantity", "0.00100000"),
                ("best_ask_quantity", "7.00000000"),
                (
                    "bids",
                    r#"[["4012.35000000","12.50000000"],["4012.40000000","0.00100000"]]"#,
                ),
                ("asks", r#"[["4012.50000000","7.00000000"]]"#),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_BOOKS"),
                ("nats_seq", "2"),
            ],
        },
        Case {
            subject: "funding_rate.binance.perpetual.BTC-USDT",
            payload: r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","current_funding_rate":0.0001,"estimated_funding_rate":0.00012,"premium_index":-0.00003,"funding_interval":"8h","mark_price":112350.1,"index_price":112340.2,"data_type":"funding_rate","ts_ms":1761714300123,"next_funding_ts_ms":1761714300099,"publisher":"unified-collector","collected_ts_ms":1761714300100}"#,
            table: "funding_rates",
            row: vec![
                ("timestamp", "1761714300123"),
                ("exchange", "binance"),
                ("market_type", "perpetual"),
                ("symbol", "BTC-USDT"),
                ("funding_rate", "0.00010000"),
                ("mark_price", "112350.10000000"),
                ("index_price", "112340.20000000"),
                ("funding_time", "1761714300123"),
                ("next_funding_time", "1761714300099"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "1"),
            ],
        },
        Case {
            subject: "open_interest.okx.perpetual.BTC-USDT",
            payload: r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT","open_interest_value":2856123.5,"open_interest_usd":3208512345.25,"open_interest_unit":"contracts","mark_price":112340.5,"index_price":null,"data_type":"open_interest","ts_ms":1761714600000,"publisher":"unified-collector","collected_ts_ms":1761714599990,"data_source":"api"}"#,
            table: "open_interests",
            row: vec![
                ("timestamp", "1761714600000"),
                ("exchange", "okx"),
                ("market_type", "perpetual"),
                ("symbol", "BTC-USDT"),
                ("open_interest", "2856123.50000000"),
                ("open_interest_value", "3208512345.25000000"),
                ("count", "1"),
                ("data_source", "api"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "2"),
            ],
        },
        Case {
            subject: "liquidation.binance.perpetual.ETH-USDT",
            payload: r#"{"exchange":"binance","market_type":"perpetual","symbol":"ETH-USDT","liquidation_id":"ETHUSDT-1761714400777-17","side":"sell","status":"FILLED","price":4012.35,"quantity":1.25,"filled_quantity":1.25,"notional_value":5015.4375,"liquidation_ts_ms":1761714400777,"data_type":"liquidation","ts_ms":1761714400812,"publisher":"unified-collector","collected_ts_ms":1761714400801,"data_source":"marketprism"}"#,
            table: "liquidations",
            row: vec![
                ("timestamp", "1761714400812"),
                ("exchange", "binance"),
                ("market_type", "perpetual"),
                ("symbol", "ETH-USDT"),
                ("side", "sell"),
                ("price", "4012.35000000"),
                ("quantity", "1.25000000"),
                ("liquidation_time", "1761714400777"),
                ("liquidation_id", "ETHUSDT-1761714400777-17"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "3"),
            ],
        },
        Case {
            subject: "lsr_top_position.binance.perpetual.BTC-USDT",
            payload: r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","long_short_ratio":"1.8523","long_position_ratio":"0.6494","short_position_ratio":"0.3506","period":"5m","data_type":"lsr_top_position","ts_ms":1761714500000,"publisher":"unified-collector","collected_ts_ms":1761714499870}"#,
            table: "lsr_top_positions",
            row: vec![
                ("timestamp", "1761714500000"),
                ("exchange", "binance"),
                ("market_type", "perpetual"),
                ("symbol", "BTC-USDT"),
                ("long_position_ratio", "0.64940000"),
                ("short_position_ratio", "0.35060000"),
                ("period", "5m"),
                ("long_short_ratio", "1.85230000"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "4"),
            ],
        },
        Case {
            subject: "lsr_all_account.okx.perpetual.ETH-USDT",
            payload: r#"{"exchange":"okx","market_type":"perpetual","symbol":"ETH-USDT","long_short_ratio":"1.33209877","long_account_ratio":"0.5712","short_account_ratio":"0.4288","period":"5m","data_type":"lsr_all_account","ts_ms":1761714510000,"publisher":"unified-collector","collected_ts_ms":1761714509950,"data_source":"marketprism"}"#,
            table: "lsr_all_accounts",
            row: vec![
                ("timestamp", "1761714510000"),
                ("exchange", "okx"),
                ("market_type", "perpetual"),
                ("symbol", "ETH-USDT"),
                ("long_account_ratio", "0.57120000"),
                ("short_account_ratio", "0.42880000"),
                ("period", "5m"),
                ("long_short_ratio", "1.33209877"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "5"),
            ],
        },
        Case {
            subject: "volatility_index.deribit.options.BTC",
            payload: r#"{"exchange":"deribit","market_type":"options","symbol":"BTC","vol_index":"52.37","currency":"BTC","data_type":"volatility_index","ts_ms":1761714360000,"publisher":"unified-collector","collected_ts_ms":1761714359987,"data_source":"marketprism"}"#,
            table: "volatility_indices",
            row: vec![
                ("timestamp", "1761714360000"),
                ("exchange", "deribit"),
                ("market_type", "options"),
                ("symbol", "BTC"),
                ("index_value", "52.37000000"),
                ("underlying_asset", "BTC"),
                // Day 0, "no maturity" (18.16 prints it as 0000-00-00: compared as a day number).
                ("maturity_date", "0"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "6"),
            ],
        },
        Case {
            // The index under its other name, a maturity, and no currency (the symbol stands in).
            subject: "volatility_index.deribit.options.ETH",
            payload: r#"{"exchange":"deribit","market_type":"options","symbol":"ETH","volatility_index":61.2,"maturity_date":"2026-12-25","data_type":"volatility_index","ts_ms":1761714360001,"publisher":"unified-collector","collected_ts_ms":1761714359990}"#,
            table: "volatility_indices",
            row: vec![
                ("timestamp", "1761714360001"),
                ("exchange", "deribit"),
                ("market_type", "options"),
                ("symbol", "ETH"),
                ("index_value", "61.20000000"),
                ("underlying_asset", "ETH"),
                ("maturity_date", "20812"),
                ("data_source", "marketprism"),
                ("nats_stream", "MARKET_DATA"),
                ("nats_seq", "7"),
            ],
        },
    ]
}

/// The SELECT expression of a column: dates as day numbers, the rest as they are.
/// `column` as the expression that prints it the way [`cases`] spells values on either leg:
/// times as milliseconds since the epoch, booleans as 0 or 1, dates as days since the epoch
/// (18.16 stores times as `UInt64` ms and booleans as `UInt8`; the modern profile uses
/// `DateTime64(3, 'UTC')` and `Bool`).
fn select_expr(column: &str, column_type: &str) -> String {
    if column_type.starts_with("DateTime64") {
        format!("toUnixTimestamp64Milli({column})")
    } else if column_type == "Bool" {
        format!("toUInt8({column})")
    } else if column_type == "Date" {
        format!("toUInt16({column})")
    } else {
        column.to_string()
    }
}

/// `(name, type)` of every column of `table` in the bed's database.
fn column_types(bed: &Bed, table: &str) -> Vec<(String, String)> {
    bed.rows(&format!("DESCRIBE TABLE {DATABASE}.{table}"))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

async fn every_marketprism_data_type_is_stored_with_every_column_exact(leg: Leg) {
    let bed = Bed::start_on(leg);
    let mut relay = RelayProc::spawn(&bed, "relay", &bed.config());
    relay.wait_ready().await;
    let started_ms = now_ms();
    let cases = cases();
    for case in &cases {
        let (stream, seq) = bed.publish_raw(case.subject, case.payload).await;
        let expected = |col: &str| case.row.iter().find(|(c, _)| *c == col).unwrap().1;
        assert_eq!(stream, expected("nats_stream"), "{}", case.subject);
        assert_eq!(seq.to_string(), expected("nats_seq"), "{}", case.subject);
    }
    wait_until_sync("one row per message in every table", DRAIN_TIMEOUT, || {
        bed.count_all_tables() == cases.len() as u64
    })
    .await;
    let finished_ms = now_ms();

    for case in &cases {
        // The row holds exactly the relay's columns plus the server-filled `created_at`.
        let mut names: Vec<&str> = case.row.iter().map(|(c, _)| *c).collect();
        names.push("created_at");
        let mut actual = columns_of(&bed, case.table);
        actual.sort();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(actual, sorted, "{}", case.table);

        let types = column_types(&bed, case.table);
        let seq = case.row.iter().find(|(c, _)| *c == "nats_seq").unwrap().1;
        let stream = case
            .row
            .iter()
            .find(|(c, _)| *c == "nats_stream")
            .unwrap()
            .1;
        let rows = bed.rows(&format!(
            "SELECT {} FROM {DATABASE}.{} FINAL WHERE nats_stream = '{stream}' AND nats_seq = {seq}{}",
            names
                .iter()
                .map(|c| {
                    let column_type = types
                        .iter()
                        .find(|(name, _)| name == c)
                        .map(|(_, t)| t.as_str())
                        .unwrap_or_default();
                    select_expr(c, column_type)
                })
                .collect::<Vec<_>>()
                .join(", "),
            case.table,
            // Servers since 21.x print decimals without trailing zeros unless asked; 18.16
            // knows no such setting and always prints them.
            match leg {
                Leg::Legacy => "",
                Leg::Modern => " SETTINGS output_format_decimal_trailing_zeros = 1",
            }
        ));
        assert_eq!(rows.len(), 1, "{}: {rows:?}", case.subject);
        let row = &rows[0];
        for (i, (column, value)) in case.row.iter().enumerate() {
            assert_eq!(
                row[i], *value,
                "{} column {column} of {}",
                case.table, case.subject
            );
        }
        // created_at: the server's clock when the row arrived, in ms (legacy: whole seconds).
        let created_at: i64 = row[case.row.len()].parse().unwrap();
        assert!(
            created_at >= started_ms / 1000 * 1000 && created_at <= finished_ms + 1000,
            "{} created_at {created_at} outside [{started_ms}, {finished_ms}]",
            case.table
        );
    }
    assert_eq!(bed.count_dead_letters(), 0);
    assert_totals(&bed.verify().await, cases.len() as u64, cases.len() as u64);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

async fn loadgen_traffic_is_stored_exactly_once(leg: Leg) {
    let bed = Bed::start_on(leg);
    let mut relay = RelayProc::spawn(&bed, "relay", &bed.config());
    relay.wait_ready().await;
    let summary = bed.publish(Load::new("smoke", 800)).await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    let totals = report.totals();
    assert_eq!(totals.published, summary.published_total(), "{report}");
    assert_eq!(totals.stored, 800, "{report}");
    assert_eq!(
        (totals.lost, totals.duplicated, totals.dead_lettered),
        (0, 0, 0),
        "{report}"
    );
    assert_eq!(bed.count_all_tables(), 800);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

/// A poison message and what its dead letter must say.
struct Poison {
    subject: &'static str,
    payload: &'static str,
    table: &'static str,
    /// Fragments the reason must contain.
    reason: &'static [&'static str],
}

const POISONS: [Poison; 5] = [
    Poison {
        subject: "trade.binance.spot.BTC-USDT",
        payload: "not json {",
        table: "trades",
        reason: &["payload is not a valid JSON object"],
    },
    Poison {
        subject: "trade.okx.spot.ETH-USDT",
        payload: r#"{"exchange":"okx","market_type":"spot","symbol":"ETH-USDT","quantity":"1.5","side":"sell","trade_id":"okx-77","data_type":"trade","ts_ms":1761714312456,"publisher":"unified-collector","collected_ts_ms":1761714312401}"#,
        table: "trades",
        reason: &["field `price` is missing or null"],
    },
    Poison {
        subject: "trade.binance.perpetual.BTC-USDT",
        payload: r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","price":"112,345.6","quantity":"0.5","side":"buy","trade_id":"bad-decimal-1","data_type":"trade","ts_ms":1761714312457,"publisher":"unified-collector","collected_ts_ms":1761714312401}"#,
        table: "trades",
        reason: &["field `price`", "`112,345.6`", "not a valid Decimal64(8)"],
    },
    Poison {
        // Beyond Decimal64(8)'s range (about 9.2e10).
        subject: "lsr_top_position.binance.perpetual.BTC-USDT",
        payload: r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","long_short_ratio":"1.5","long_position_ratio":"123456789012.5","short_position_ratio":"0.4","period":"5m","data_type":"lsr_top_position","ts_ms":1761714500000,"publisher":"unified-collector","collected_ts_ms":1761714499870}"#,
        table: "lsr_top_positions",
        reason: &[
            "field `long_position_ratio`",
            "`123456789012.5`",
            "not a valid Decimal64(8)",
        ],
    },
    Poison {
        subject: "ticker.binance.spot.BTC-USDT",
        payload: r#"{"exchange":"binance","market_type":"spot","symbol":"BTC-USDT","last":"112345.6","data_type":"ticker","ts_ms":1761714312456}"#,
        // Meant for no table: no route claims the subject.
        table: "",
        reason: &[
            "no route for subject \"ticker.binance.spot.BTC-USDT\"",
            "no typed codec and no [[drain.passthrough]] entry",
        ],
    },
];

async fn poison_messages_are_dead_lettered_with_their_reason_while_good_ones_around_them_are_stored(
    leg: Leg,
) {
    let bed = Bed::start_on(leg);
    let mut config = bed.config();
    // A subject no table is named for, captured by the data stream.
    config.streams[2].subjects.push("ticker.>".into());
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let before = bed.publish(Load::new("poison-before", 300)).await;
    let good = cases();
    let mut poisoned = Vec::new();
    for (i, poison) in POISONS.iter().enumerate() {
        // Good messages interleaved with the poison ones, in the same streams.
        bed.publish_raw(good[i].subject, good[i].payload).await;
        let (stream, seq) = bed.publish_raw(poison.subject, poison.payload).await;
        poisoned.push((stream, seq));
    }
    bed.publish(Load::new("poison-after", 300).ts_start(before.ts_last_ms + 1_000))
        .await;

    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    let totals = report.totals();
    // 600 from loadgen, one good message before each poison one, and the poison ones; the
    // ticker belongs to no typed table: verify counts it apart as unrouted.
    let good_published = 600 + POISONS.len() as u64;
    assert_eq!(
        totals.published,
        good_published + POISONS.len() as u64 - 1,
        "{report}"
    );
    assert_eq!(totals.stored, good_published, "{report}");
    assert_eq!(totals.dead_lettered, POISONS.len() as u64 - 1, "{report}");
    assert_eq!((totals.lost, totals.duplicated), (0, 0), "{report}");
    assert_eq!(report.table(DataType::Trade).dead_lettered, 3, "{report}");
    assert_eq!(
        report.table(DataType::LsrTopPosition).dead_lettered,
        1,
        "{report}"
    );
    assert_eq!(
        (report.unrouted.published, report.unrouted.dead_lettered),
        (1, 1),
        "{report}"
    );
    assert_eq!(report.unexpected_dead_letters, 0, "{report}");

    let letters = bed.rows(&format!(
        "SELECT table, subject, nats_stream, nats_seq, error, payload \
         FROM {DATABASE}.dead_letters FINAL ORDER BY nats_stream, nats_seq"
    ));
    assert_eq!(letters.len(), POISONS.len(), "{letters:?}");
    for (poison, (stream, seq)) in POISONS.iter().zip(&poisoned) {
        let letter = letters
            .iter()
            .find(|l| l[2] == *stream && l[3] == seq.to_string())
            .unwrap_or_else(|| panic!("no dead letter for {stream}#{seq}: {letters:?}"));
        assert_eq!(letter[0], poison.table, "{letter:?}");
        assert_eq!(letter[1], poison.subject, "{letter:?}");
        for fragment in poison.reason {
            assert!(
                letter[4].contains(fragment),
                "reason {:?} lacks {fragment:?}",
                letter[4]
            );
        }
        assert_eq!(letter[5], poison.payload, "the original payload");
    }
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

async fn two_consumers_sharding_one_stream_by_exchange_each_take_their_share_and_store_all_once(
    leg: Leg,
) {
    let bed = Bed::start_on(leg);
    let mut config = bed.config();
    config.streams.truncate(1); // MARKET_TRADES
    let mut binance =
        ConsumerDef::new("MARKET_TRADES", "trades-binance").filter(&["trade.binance.>"]);
    binance.fetch_batch = 64;
    let mut okx = ConsumerDef::new("MARKET_TRADES", "trades-okx").filter(&["trade.okx.>"]);
    okx.fetch_batch = 200;
    config.consumers = vec![binance, okx];
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let count = 1_000;
    bed.publish(
        Load::new("shard", count)
            .mix("trade=1")
            .exchanges(&["binance", "okx"]),
    )
    .await;
    let per_exchange = [
        (
            "binance",
            "trades-binance",
            bed.subject_count("MARKET_TRADES", "trade.binance.>").await,
        ),
        (
            "okx",
            "trades-okx",
            bed.subject_count("MARKET_TRADES", "trade.okx.>").await,
        ),
    ];
    assert_eq!(per_exchange[0].2 + per_exchange[1].2, count);
    assert!(
        per_exchange.iter().all(|(_, _, n)| *n > 0),
        "{per_exchange:?}"
    );

    assert_totals(&bed.wait_accounted(DRAIN_TIMEOUT).await, count, count);
    assert_eq!(bed.count_final("trades"), count);
    for (exchange, durable, published) in per_exchange {
        assert_eq!(
            bed.count_where("trades", &format!("exchange = '{exchange}'")),
            published,
            "{exchange}"
        );
        // The consumer was delivered its own subjects only, each once, and acked them all.
        let info = wait_for(
            &format!("{durable} acked everything"),
            DRAIN_TIMEOUT,
            || async {
                let info = bed.consumer_info("MARKET_TRADES", durable).await;
                (info.ack_floor.consumer_sequence == published).then_some(info)
            },
        )
        .await;
        assert_eq!(info.delivered.consumer_sequence, published, "{durable}");
        assert_eq!(
            (info.num_pending, info.num_ack_pending, info.num_redelivered),
            (0, 0, 0),
            "{durable}"
        );
        assert_eq!(
            relay
                .metric_sum(
                    "marketprism_storage_messages_processed_total",
                    &[("exchange", exchange)]
                )
                .await,
            published as f64,
            "{exchange}"
        );
    }
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_whose_ack_wait_drifted_is_reported_by_check_and_run_and_kept_with_its_backlog() {
    let bed = Bed::start();
    let config = bed.config();
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let first = bed
        .publish(Load::new("drift-1", 200).mix("funding_rate=1,open_interest=1"))
        .await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert!(relay.terminate().await.success(), "{}", relay.log());

    // A backlog builds up while the relay is down.
    bed.publish(
        Load::new("drift-2", 150)
            .mix("funding_rate=1,open_interest=1")
            .ts_start(first.ts_last_ms + 1_000),
    )
    .await;
    let (stream, durable) = ("MARKET_DATA", "prism-relay-data");
    let before = bed.consumer_info(stream, durable).await;
    assert_eq!(before.config.ack_wait, Duration::from_secs(30));
    assert_eq!(before.num_pending, 150);
    assert_eq!(before.ack_floor.stream_sequence, 200);

    // The operator's file now says 45 s.
    let mut drifted = config.clone();
    drifted.consumers[2].ack_wait_ms = 45_000;
    let path = drifted.write(&bed.path("drifted.toml"));
    let (status, out) = relay_command(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(
        status.code(),
        Some(1),
        "drift is a finding: {status}\n{out}"
    );
    assert!(
        out.contains(
            "consumer MARKET_DATA/prism-relay-data: drift: ack_wait_ms: configured 45000, server has 30000"
        ),
        "{out}"
    );
    assert!(
        out.contains("consumer MARKET_TRADES/prism-relay-trades: ok"),
        "{out}"
    );
    let after_check = bed.consumer_info(stream, durable).await;
    assert_eq!(
        after_check.created, before.created,
        "check recreated the durable"
    );
    assert_eq!(after_check.config.ack_wait, Duration::from_secs(30));
    assert_eq!(
        after_check.num_pending, 150,
        "check consumed or dropped the backlog"
    );
    assert_eq!(
        after_check.delivered.stream_sequence,
        before.delivered.stream_sequence
    );
    assert_eq!(after_check.ack_floor.stream_sequence, 200);

    // `run` with the drifted file warns, keeps the durable and drains the backlog from it.
    let mut relay = RelayProc::spawn_ready(&bed, "drifted", &drifted).await;
    assert_totals(&bed.wait_accounted(DRAIN_TIMEOUT).await, 350, 350);
    let log = relay.log();
    let warning = log
        .lines()
        .find(|l| l.contains("consumer differs from its configuration"))
        .unwrap_or_else(|| panic!("no drift warning in the log:\n{log}"));
    for fragment in [
        "WARN",
        "durable=prism-relay-data",
        "field=\"ack_wait_ms\"",
        "configured=45000",
        "server=30000",
    ] {
        assert!(
            warning.contains(fragment),
            "{fragment:?} not in {warning:?}"
        );
    }
    let after_run = wait_for("the backlog acked", DRAIN_TIMEOUT, || async {
        let info = bed.consumer_info(stream, durable).await;
        (info.ack_floor.stream_sequence == 350).then_some(info)
    })
    .await;
    assert_eq!(
        after_run.created, before.created,
        "run recreated the durable"
    );
    assert_eq!(after_run.config.ack_wait, Duration::from_secs(30));
    // Only the backlog was delivered again after the restart: nothing from the start.
    assert_eq!(after_run.delivered.consumer_sequence, 350);
    assert_eq!((after_run.num_pending, after_run.num_redelivered), (0, 0));
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

/// Segment size of the budget tests' WAL.
const SEGMENT: u64 = 64 * 1024;
/// WAL budget of the budget tests: the smallest the config allows.
const BUDGET: u64 = 1024 * 1024;

/// A config with a 1 MiB WAL budget, 64 KiB segments, no retention, short insert timeouts and
/// batches of at most 50 messages (50 x 1.3 KB order books: the WAL may pass its budget by
/// about one batch per consumer, appends that passed the budget check when it filled).
fn budget_config(bed: &Bed) -> RelayConfig {
    let mut config = bed.config();
    config.segment_bytes_max = SEGMENT;
    config.budget_bytes_max = BUDGET;
    config.retention_bytes_max = 0;
    config.retention_segments_max = 0;
    config.insert_timeout_ms = 1_000;
    for consumer in &mut config.consumers {
        consumer.fetch_batch = 50;
    }
    config
}

/// Waits until ingest has stopped on the WAL budget: the WAL at its budget and the received
/// and acked counts equal and still between two polls. Returns the received count.
async fn wait_budget_full(relay: &RelayProc) -> f64 {
    let last = std::cell::Cell::new(-1.0);
    wait_for(
        "ingest stopped on the WAL budget",
        DRAIN_TIMEOUT,
        || async {
            let metrics = relay.metrics().await;
            let received = metric_sum(&metrics, "marketprism_storage_messages_received_total", &[]);
            let settled = metric_sum(&metrics, "prism_relay_wal_bytes", &[]) >= BUDGET as f64
                && metric_sum(&metrics, "prism_relay_acks_total", &[]) == received
                && last.replace(received) == received;
            settled.then_some(received)
        },
    )
    .await
}

/// Sum over the bed's three MarketPrism consumers of a figure of their JetStream info.
async fn consumers_sum(
    bed: &Bed,
    figure: impl Fn(&async_nats::jetstream::consumer::Info) -> u64,
) -> u64 {
    let mut sum = 0;
    for (stream, durable) in [
        ("MARKET_TRADES", "prism-relay-trades"),
        ("MARKET_BOOKS", "prism-relay-books"),
        ("MARKET_DATA", "prism-relay-data"),
    ] {
        sum += figure(&bed.consumer_info(stream, durable).await);
    }
    sum
}

async fn a_full_wal_budget_stops_fetching_until_clickhouse_returns_then_everything_is_stored_once(
    leg: Leg,
) {
    let bed = Bed::start_on(leg);
    let config = budget_config(&bed);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    // About 3 MB of order books and trades while ClickHouse is frozen.
    bed.ch.pause().expect("SIGSTOP clickhouse");
    let count = 3_000;
    bed.publish(Load::new("budget", count).mix("trade=1,orderbook=3"))
        .await;
    let received = wait_budget_full(&relay).await;
    assert_eq!(
        relay.metric_sum("prism_relay_ingest_paused", &[]).await,
        1.0
    );
    // Held for a while: nothing more is fetched into the WAL, nothing more is acked. (A
    // window in which nothing may happen: there is no condition to await instead.)
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let metrics = relay.metrics().await;
    let received_later = metric_sum(&metrics, "marketprism_storage_messages_received_total", &[]);
    assert_eq!(received_later, received, "ingest went on past the budget");
    assert!(
        received > 0.0 && received < count as f64,
        "received {received}"
    );
    assert_eq!(
        metric_sum(&metrics, "prism_relay_acks_total", &[]),
        received
    );
    let wal_bytes = dir_bytes(&config.wal_dir);
    assert!(
        (BUDGET..=BUDGET + 2 * SEGMENT).contains(&wal_bytes),
        "WAL holds {wal_bytes} bytes for a budget of {BUDGET}"
    );
    assert_eq!(
        consumers_sum(&bed, |i| i.ack_floor.consumer_sequence).await as f64,
        received,
        "JetStream saw acks beyond what the WAL holds"
    );
    let pending = consumers_sum(&bed, |i| i.num_pending).await;
    assert!(pending > 0, "JetStream keeps the rest");

    bed.ch.resume().expect("SIGCONT clickhouse");
    assert_totals(&bed.wait_accounted(DRAIN_TIMEOUT).await, count, count);
    // The drain released and deleted the segments; fetching resumed and acked everything.
    wait_until_sync("released segments deleted", DRAIN_TIMEOUT, || {
        dir_bytes(&config.wal_dir) < BUDGET / 2
    })
    .await;
    wait_until("everything acked", DRAIN_TIMEOUT, || async {
        consumers_sum(&bed, |i| i.ack_floor.consumer_sequence).await == count
            && consumers_sum(&bed, |i| i.num_pending).await == 0
    })
    .await;
    assert_eq!(
        relay.metric_sum("prism_relay_ingest_paused", &[]).await,
        0.0
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

async fn sigterm_during_a_load_exits_zero_within_the_bound_and_a_restart_stores_everything_once(
    leg: Leg,
) {
    const SHUTDOWN_BOUND: Duration = Duration::from_millis(5_000);
    let bed = Bed::start_on(leg);
    let mut config = bed.config();
    config.shutdown_timeout_ms = SHUTDOWN_BOUND.as_millis() as u64;
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let count = 3_000;
    let load = {
        let opts = Load::new("sigterm", count).rate(1_500);
        let bed = &bed;
        async move { bed.publish(opts).await }
    };
    let stop = async {
        wait_until_sync("some rows stored mid-load", DRAIN_TIMEOUT, || {
            bed.count_all_tables() >= 300
        })
        .await;
        let started = Instant::now();
        let status = relay
            .terminate_within(SHUTDOWN_BOUND + Duration::from_secs(2))
            .await;
        (status, started.elapsed())
    };
    let (summary, (status, took)) = tokio::join!(load, stop);
    assert!(status.success(), "exit {status}; log:\n{}", relay.log());
    assert!(
        took <= SHUTDOWN_BOUND + Duration::from_secs(1),
        "shutdown took {took:?}"
    );
    let stored_at_stop = bed.count_all_tables();
    assert!(
        stored_at_stop < count,
        "the load ended before the stop ({stored_at_stop} stored): nothing was interrupted"
    );
    assert!(
        relay.log().contains("shutdown requested"),
        "{}",
        relay.log()
    );
    // Every message delivered before the stop was appended and acked: nothing waits for
    // ack_wait (30 s) to be redelivered after the restart.
    wait_until(
        "no delivered message left unacked",
        Duration::from_secs(2),
        || async { consumers_sum(&bed, |i| i.num_ack_pending as u64).await == 0 },
    )
    .await;

    relay.restart();
    relay.wait_ready().await;
    assert_totals(
        &bed.wait_accounted(DRAIN_TIMEOUT).await,
        summary.published_total(),
        count,
    );
    assert_eq!(bed.count_all_tables(), count);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_missing_a_column_the_relay_writes_stops_run_with_a_message_naming_both() {
    let bed = Bed::start();
    let config = bed.config();
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
    bed.sql(&format!(
        "ALTER TABLE {DATABASE}.lsr_top_positions DROP COLUMN long_short_ratio"
    ));

    let expected = "table `lsr_top_positions` has no column `long_short_ratio` (Decimal64(8)): \
                    run `prism-relay schema apply` to add it";
    let (status, out) =
        relay_command(&["check", "--config", relay.config_path.to_str().unwrap()]).await;
    assert!(!status.success(), "check passed:\n{out}");
    assert!(out.contains(&format!("schema: {expected}")), "{out}");

    // `create_schema = true` creates missing tables only; it does not repair this one.
    let mut relay = RelayProc::spawn(&bed, "mismatch", &config);
    let status = relay
        .wait_exit(DRAIN_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("run kept going; log:\n{}", relay.log()));
    let log = relay.log();
    assert!(!status.success(), "run exited 0; log:\n{log}");
    assert!(log.contains(expected), "{log}");
    assert!(!log.contains("schema checked; draining"), "{log}");
    // The library returns the same error as a value.
    let mut config = config.clone();
    config.metrics_port = free_port();
    let error = InProcRelay::spawn(&config)
        .join(DRAIN_TIMEOUT)
        .await
        .expect_err("run must fail");
    assert!(matches!(error, RunError::Schema(_)), "{error:?}");
    assert_eq!(error.to_string(), expected);
    // The table was left as it was.
    assert_eq!(
        bed.sql(&format!(
            "SELECT count() FROM system.columns WHERE database = '{DATABASE}' \
             AND table = 'lsr_top_positions' AND name = 'long_short_ratio'"
        ))
        .trim(),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_rows_stored_under_marketprism_names() {
    let bed = Bed::start();
    let mut relay = RelayProc::spawn(&bed, "relay", &bed.config());
    relay.wait_ready().await;
    let count = 800;
    bed.publish(Load::new("metrics", count)).await;
    // Two dead letters.
    bed.publish_raw(POISONS[0].subject, POISONS[0].payload)
        .await;
    bed.publish_raw(POISONS[3].subject, POISONS[3].payload)
        .await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_eq!(report.totals().stored, count, "{report}");
    assert_eq!(report.totals().dead_lettered, 2, "{report}");

    let processed = "marketprism_storage_messages_processed_total";
    // Counters move right after ClickHouse answers (and acks after the fsync): poll them.
    let metrics = wait_for("counters caught up", DRAIN_TIMEOUT, || async {
        let metrics = relay.metrics().await;
        let settled = metric_sum(&metrics, processed, &[]) == count as f64
            && metric_sum(&metrics, "marketprism_storage_messages_failed_total", &[]) == 2.0
            && metric_sum(&metrics, "prism_relay_acks_total", &[]) == (count + 2) as f64;
        settled.then_some(metrics)
    })
    .await;
    // Per data type, exchange and market type, exactly the rows of each table.
    for dt in DataType::ALL {
        let groups = bed.rows(&format!(
            "SELECT exchange, market_type, count() FROM {DATABASE}.{} FINAL \
             GROUP BY exchange, market_type",
            dt.table()
        ));
        assert!(!groups.is_empty(), "no {} rows", dt.table());
        let mut table_total = 0;
        for group in &groups {
            let rows: u64 = group[2].parse().unwrap();
            table_total += rows;
            let labels = [
                ("data_type", dt.name()),
                ("exchange", group[0].as_str()),
                ("market_type", group[1].as_str()),
            ];
            assert_eq!(
                metric_sum(&metrics, processed, &labels),
                rows as f64,
                "{labels:?}"
            );
        }
        assert_eq!(
            metric_sum(&metrics, processed, &[("data_type", dt.name())]),
            table_total as f64,
            "{}",
            dt.name()
        );
    }
    let total = |name: &str| metric_sum(&metrics, name, &[]);
    assert_eq!(
        total("marketprism_storage_messages_received_total"),
        (count + 2) as f64
    );
    assert_eq!(total("marketprism_storage_messages_failed_total"), 2.0);
    assert_eq!(total("marketprism_storage_batch_size_total"), count as f64);
    assert!(total("marketprism_storage_batch_inserts_total") >= 8.0);
    assert_eq!(
        total("marketprism_storage_clickhouse_insert_errors_total"),
        0.0
    );
    let rate = total("marketprism_storage_error_rate_percent");
    assert!(
        (rate - 200.0 / (count + 2) as f64).abs() < 1e-9,
        "error rate {rate}"
    );
    assert!(total("marketprism_storage_last_message_timestamp_seconds") > 1.7e9);
    assert_eq!(total("prism_relay_acks_total"), (count + 2) as f64);
    assert_eq!(total("prism_relay_ready"), 1.0);
    assert_eq!(total("prism_relay_ingest_paused"), 0.0);
    // Names MarketPrism's dashboards and alerts use are all there.
    for name in [
        "marketprism_storage_messages_received_total",
        "marketprism_storage_messages_processed_total",
        "marketprism_storage_messages_failed_total",
        "marketprism_storage_batch_inserts_total",
        "marketprism_storage_batch_size_total",
        "marketprism_storage_clickhouse_insert_errors_total",
        "marketprism_storage_batch_queue_size",
        "marketprism_storage_error_rate_percent",
        "marketprism_storage_last_message_timestamp_seconds",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{metrics}"
        );
    }
    let (status, body) = http_get(relay.metrics_addr, "/health").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_run_stores_everything_and_returns_ok_when_its_shutdown_future_resolves() {
    let bed = Bed::start();
    let relay = InProcRelay::spawn(&bed.config());
    relay.wait_ready().await;
    let summary = bed.publish(Load::new("inproc", 400)).await;
    assert_totals(
        &bed.wait_accounted(DRAIN_TIMEOUT).await,
        summary.published_total(),
        400,
    );
    tokio::time::timeout(Duration::from_secs(15), relay.stop())
        .await
        .expect("run returns within its shutdown bound")
        .expect("run returns Ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_schema_check_passes_ingest_fills_the_wal_up_to_its_budget_only_then_drains_all()
{
    let bed = Bed::start();
    let config = budget_config(&bed);
    // ClickHouse is frozen before the relay starts: the schema check cannot finish.
    bed.ch.pause().expect("SIGSTOP clickhouse");
    let relay = RelayProc::spawn(&bed, "relay", &config);
    let count = 3_000;
    let js = bed.js().await;
    // The relay creates the streams; publish once they exist.
    wait_until("streams created", READY_TIMEOUT, || async {
        js.get_stream("MARKET_DATA").await.is_ok()
    })
    .await;
    bed.publish(Load::new("early", count).mix("trade=1,orderbook=3"))
        .await;
    let received = wait_budget_full(&relay).await;
    assert!(
        received > 0.0 && received < count as f64,
        "received {received}"
    );
    let (status, _) = http_get(relay.metrics_addr, "/ready").await.unwrap();
    assert_eq!(status, 503, "ready before the schema check");
    assert!(dir_bytes(&config.wal_dir) <= BUDGET + 2 * SEGMENT);
    assert!(consumers_sum(&bed, |i| i.num_pending).await > 0);

    bed.ch.resume().expect("SIGCONT clickhouse");
    assert_totals(&bed.wait_accounted(DRAIN_TIMEOUT).await, count, count);
    let (status, _) = http_get(relay.metrics_addr, "/ready").await.unwrap();
    assert_eq!(status, 200);
}

async fn sigterm_with_clickhouse_frozen_and_the_wal_full_exits_zero_within_the_bound_and_loses_nothing(
    leg: Leg,
) {
    const SHUTDOWN_BOUND: Duration = Duration::from_millis(3_000);
    let bed = Bed::start_on(leg);
    let mut config = budget_config(&bed);
    config.shutdown_timeout_ms = SHUTDOWN_BOUND.as_millis() as u64;
    // A batch fetched while the WAL is full waits in the append; the stop leaves it unacked,
    // and JetStream redelivers it after ack_wait: keep that short so the test stays short.
    for consumer in &mut config.consumers {
        consumer.ack_wait_ms = 2_000;
    }
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    bed.ch.pause().expect("SIGSTOP clickhouse");
    let count = 3_000;
    bed.publish(Load::new("frozen-stop", count).mix("trade=1,orderbook=3"))
        .await;
    wait_budget_full(&relay).await;

    let started = Instant::now();
    let status = relay
        .terminate_within(SHUTDOWN_BOUND + Duration::from_secs(3))
        .await;
    let took = started.elapsed();
    assert!(status.success(), "exit {status}; log:\n{}", relay.log());
    assert!(
        took <= SHUTDOWN_BOUND + Duration::from_secs(2),
        "shutdown took {took:?}"
    );

    bed.ch.resume().expect("SIGCONT clickhouse");
    relay.restart();
    relay.wait_ready().await;
    assert_totals(&bed.wait_accounted(DRAIN_TIMEOUT).await, count, count);
    // Batches are cut by their limits after the re-cut of the batch left in flight, not one
    // record each (about ten inserts here; thousands when each record was its own batch).
    let inserts = relay
        .metric_sum("marketprism_storage_batch_inserts_total", &[])
        .await;
    assert!(inserts <= 100.0, "{inserts} inserts for {count} messages");
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

/// The NATS server's `max_payload` in the oversized-message test: above the WAL record limit,
/// so the server accepts a message the WAL cannot take.
const LARGE_MAX_PAYLOAD_BYTES: usize = 20 * 1024 * 1024;

/// Payload of the oversized message: one MiB above the WAL record limit.
const OVERSIZED_PAYLOAD_BYTES: usize = prism_wal::RECORD_BYTES_MAX + 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_wal_record_limit_becomes_one_dead_letter_and_the_trades_around_it_are_stored_once(
) {
    let bed = Bed::start_with_nats_config(&format!("max_payload: {LARGE_MAX_PAYLOAD_BYTES}\n"));
    // fetch_bytes_max stays at its default, the WAL record limit: the oversized message is
    // also larger than a pull may carry.
    let config = bed.config();
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let before = bed
        .publish(Load::new("oversized-before", 200).mix("trade=1"))
        .await;
    let subject = "trade.binance.spot.BTC-USDT";
    let payload: Vec<u8> = (0..OVERSIZED_PAYLOAD_BYTES)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let (stream, seq) = bed.publish_raw(subject, payload.clone()).await;
    bed.publish(
        Load::new("oversized-after", 200)
            .mix("trade=1")
            .ts_start(before.ts_last_ms + 1_000),
    )
    .await;

    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_totals(&report, 401, 400);
    assert_eq!(report.totals().dead_lettered, 1, "{report}");
    assert_eq!(report.unexpected_dead_letters, 0, "{report}");
    assert!(
        relay.try_wait().is_none(),
        "the relay exited:\n{}",
        relay.log()
    );

    let kept = DEAD_LETTER_PAYLOAD_BYTES_MAX;
    let letters = bed.rows(&format!(
        "SELECT nats_stream, nats_seq, subject, length(payload), error, \
         substring(payload, 1, 64), substring(payload, {}, 64) FROM {DATABASE}.dead_letters",
        kept - 63
    ));
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter[0], stream, "{letter:?}");
    assert_eq!(letter[1], seq.to_string(), "{letter:?}");
    assert_eq!(letter[2], subject, "{letter:?}");
    assert_eq!(
        letter[3],
        DEAD_LETTER_PAYLOAD_BYTES_MAX.to_string(),
        "{letter:?}"
    );
    assert!(
        letter[4].contains(&format!(
            "WAL record limit of {} bytes",
            prism_wal::RECORD_BYTES_MAX
        )),
        "{letter:?}"
    );
    // The kept payload is the message's first bytes, unchanged.
    let text =
        |range: std::ops::Range<usize>| String::from_utf8_lossy(&payload[range]).into_owned();
    assert_eq!(letter[5], text(0..64), "{letter:?}");
    assert_eq!(letter[6], text(kept - 64..kept), "{letter:?}");

    wait_until(
        "the trades consumer has nothing pending",
        DRAIN_TIMEOUT,
        || async {
            let info = bed
                .consumer_info("MARKET_TRADES", "prism-relay-trades")
                .await;
            info.num_ack_pending == 0 && info.num_pending == 0
        },
    )
    .await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_apply_adds_the_dead_letter_publish_time_to_a_table_an_older_relay_created() {
    let bed = Bed::start();
    let config = bed.config();
    let path = config.write(&bed.path("relay.toml"));
    let path = path.to_str().expect("UTF-8 path");
    // The dead-letter table as the legacy profile created it before `published_at` existed.
    bed.sql(&format!("CREATE DATABASE {DATABASE}"));
    bed.sql(&format!(
        "CREATE TABLE {DATABASE}.dead_letters (failed_at Int64, table String, subject String, \
         nats_stream String, nats_seq UInt64, error String, payload String, \
         created_at Int64 DEFAULT toInt64(toUInt32(now())) * 1000) \
         ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(toDateTime(intDiv(failed_at, 1000), 'UTC')) \
         ORDER BY (nats_stream, nats_seq, table)"
    ));
    bed.sql(&format!(
        "INSERT INTO {DATABASE}.dead_letters (failed_at, table, subject, nats_stream, nats_seq, error, payload) \
         VALUES (1761714312456, 'trades', 'trade.x', 'MARKET_TRADES', 1, 'bad', '{{}}')"
    ));

    // `schema apply` checks the tables after applying and fails on any mismatch left.
    let (status, out) = relay_command(&["schema", "apply", "--config", path]).await;
    assert!(status.success(), "schema apply failed:\n{out}");
    assert!(out.contains("legacy profile applied"), "{out}");
    assert!(columns_of(&bed, "dead_letters").contains(&"published_at".to_string()));
    // The old row is kept.
    assert_eq!(bed.count_dead_letters(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_passthrough_route_no_longer_holds_a_cursor_in_the_ledger_after_the_next_start() {
    let bed = Bed::start();
    let mut config = bed.config();
    config.streams[2].subjects.push("ticker.>".into());
    let route = "[[drain.passthrough]]\ndata_type = \"ticker\"\ntable = \"tickers\"\n";
    config.extra = route.into();
    let ticker = r#"{"exchange":"okx","symbol":"BTC-USDT","last":"1.5"}"#;

    let relay = InProcRelay::spawn(&config);
    relay.wait_ready().await;
    bed.publish_raw("ticker.okx.spot.BTC-USDT", ticker).await;
    wait_until_sync("the ticker is stored", DRAIN_TIMEOUT, || {
        bed.count_final("tickers") == 1
    })
    .await;
    relay.stop().await.expect("clean stop");
    let ledger = prism_wal::load_ledger(&config.wal_dir).expect("ledger");
    assert!(ledger.cursors.contains_key("tickers"), "{ledger:?}");

    // The route is removed: its records now go to the dead letters as unrouted.
    config.extra.clear();
    config.metrics_port = free_port();
    let relay = InProcRelay::spawn(&config);
    relay.wait_ready().await;
    bed.publish_raw("ticker.okx.spot.BTC-USDT", ticker).await;
    wait_until_sync(
        "the unrouted ticker is dead-lettered",
        DRAIN_TIMEOUT,
        || bed.count_dead_letters() == 1,
    )
    .await;
    relay.stop().await.expect("clean stop");
    let ledger = prism_wal::load_ledger(&config.wal_dir).expect("ledger");
    assert!(!ledger.cursors.contains_key("tickers"), "{ledger:?}");
    assert!(!ledger.inflight.contains_key("tickers"), "{ledger:?}");
    assert!(ledger.cursors.contains_key("trades"), "{ledger:?}");
}

/// Trades of the time-window test dated before the window, each in a month of its own from
/// January 1970 on: more partitions than one insert may touch on ClickHouse (100 by default).
const ANCIENT_TRADES: i64 = 120;

/// Good trades of the time-window test.
const CURRENT_TRADES: i64 = 50;

fn trade_payload(trade_id: &str, ts_ms: i64) -> String {
    format!(
        r#"{{"symbol":"BTC-USDT","price":"100.5","quantity":"1","side":"buy","trade_id":"{trade_id}","exchange":"binance","market_type":"spot","data_type":"trade","ts_ms":{ts_ms},"trade_ts_ms":{ts_ms},"publisher":"unified-collector","collected_ts_ms":{ts_ms}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trades_dated_outside_the_plausible_window_are_dead_lettered_and_never_stored() {
    let bed = Bed::start();
    let config = bed.config();
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    // 31 days apart: every one of them falls in another month of the 1970s.
    const MONTH_STEP_MS: i64 = 31 * 86_400_000;
    for i in 0..ANCIENT_TRADES {
        bed.publish_raw(
            "trade.binance.spot.BTC-USDT",
            trade_payload(&format!("ancient-{i}"), i * MONTH_STEP_MS),
        )
        .await;
    }
    // Ten days ahead of its publish time.
    bed.publish_raw(
        "trade.binance.spot.BTC-USDT",
        trade_payload("future", now_ms() + 10 * 86_400_000),
    )
    .await;
    let now = now_ms();
    for i in 0..CURRENT_TRADES {
        bed.publish_raw(
            "trade.binance.spot.BTC-USDT",
            trade_payload(&format!("current-{i}"), now + i),
        )
        .await;
    }

    let expected_dead = ANCIENT_TRADES as u64 + 1;
    wait_until(
        "every trade stored or dead-lettered",
        DRAIN_TIMEOUT,
        || async {
            bed.count_final("trades") + bed.count_dead_letters()
                >= CURRENT_TRADES as u64 + expected_dead
        },
    )
    .await;
    assert_eq!(bed.count_final("trades"), CURRENT_TRADES as u64);
    assert_eq!(
        bed.count_where("trades", "timestamp < 1230768000000"),
        0,
        "a row dated before 2009 reached the table (it would expire at once under a TTL)"
    );
    assert_eq!(bed.count_where("trades", "trade_id = 'future'"), 0);
    let letters = bed.rows(&format!(
        "SELECT error FROM {DATABASE}.dead_letters FINAL WHERE table = 'trades'"
    ));
    assert_eq!(letters.len() as u64, expected_dead, "{letters:?}");
    for letter in &letters {
        assert!(
            letter[0].contains("outside the accepted window"),
            "reason {:?}",
            letter[0]
        );
    }
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

// The end-to-end tests that must hold on both server generations run once per leg:
// `relay::legacy::<name>` against clickhouse-server 18.16, `relay::modern::<name>` against
// the modern engine.
crate::on_both_legs!(
    every_marketprism_data_type_is_stored_with_every_column_exact,
    loadgen_traffic_is_stored_exactly_once,
    poison_messages_are_dead_lettered_with_their_reason_while_good_ones_around_them_are_stored,
    two_consumers_sharding_one_stream_by_exchange_each_take_their_share_and_store_all_once,
    a_full_wal_budget_stops_fetching_until_clickhouse_returns_then_everything_is_stored_once,
    sigterm_during_a_load_exits_zero_within_the_bound_and_a_restart_stores_everything_once,
    sigterm_with_clickhouse_frozen_and_the_wal_full_exits_zero_within_the_bound_and_loses_nothing,
);

/// A lane held back far behind the others (its table is gone for a while) falls out of the
/// chunks of the WAL the lanes share, reads the WAL on its own, rejoins them once it caught up,
/// and stores every record once; the other lanes did not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_held_back_past_the_shared_tail_reads_the_wal_itself_and_stores_every_row_once() {
    let bed = Bed::start();
    // The lanes say at debug level when they leave and rejoin the shared tail.
    let mut relay = RelayProc::spawn_with_env(
        &bed,
        "relay",
        &bed.config(),
        &[("RUST_LOG", "info,prism_relay::drain=debug")],
    );
    relay.wait_ready().await;
    bed.sql(&format!(
        "RENAME TABLE {DATABASE}.trades TO {DATABASE}.trades_away"
    ));
    // The trades come first in the WAL, so their lane stops there, retrying its insert.
    let trades = 500;
    bed.publish(Load::new("held_trades", trades).mix("trade=1"))
        .await;
    wait_until(
        "the trades lane fails its insert",
        DRAIN_TIMEOUT,
        || async {
            relay
                .metric_sum("prism_relay_insert_errors_total", &[("table", "trades")])
                .await
                > 0.0
        },
    )
    .await;
    // Order books of 4-7 KB: 8,000 of them are past what the lanes' shared tail keeps (32 MiB),
    // and they are stored while the trades lane is held.
    let orderbooks = 8_000;
    bed.publish(
        Load::new("held_books", orderbooks)
            .mix("orderbook=1")
            .orderbook_depth(100),
    )
    .await;
    wait_until_sync("every order book stored", DRAIN_TIMEOUT, || {
        bed.count_final("orderbooks") == orderbooks
    })
    .await;
    assert_eq!(
        bed.sql(&format!("SELECT count() FROM {DATABASE}.trades_away"))
            .trim(),
        "0"
    );

    bed.sql(&format!(
        "RENAME TABLE {DATABASE}.trades_away TO {DATABASE}.trades"
    ));
    assert_totals(
        &bed.wait_accounted(DRAIN_TIMEOUT).await,
        trades + orderbooks,
        trades + orderbooks,
    );
    let log = relay.log();
    let alone = log
        .lines()
        .filter(|l| l.contains("it reads the WAL on its own") && l.contains("trades"))
        .count();
    assert!(
        alone >= 1,
        "the trades lane read the WAL on its own:\n{log}"
    );
    // Caught up, it reads through the tail again (it looks at the tail at least once a second).
    wait_until_sync("the trades lane rejoined the others", DRAIN_TIMEOUT, || {
        relay.log().lines().any(|l| {
            l.contains("reads through the shared tail of the WAL again") && l.contains("trades")
        })
    })
    .await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_stored_to_its_last_row_once_read_not_at_the_last_batchs_age() {
    /// The tables' age limit: ten minutes, far past the wait below, so rows that waited for
    /// their batch's age would not be stored in time.
    const AGE_MS: u64 = 600_000;
    /// Every table gets more rows than one batch holds: full batches, then a partial last one.
    const ROWS_MAX: u64 = 100;
    const BACKLOG: u64 = 1_200;
    let bed = Bed::start();
    let mut config = bed.config();
    config.rows_max = ROWS_MAX;
    config.table_flush_interval_ms = AGE_MS;
    // A first run creates the streams and durables, then the backlog builds up while the relay
    // is down.
    let mut relay = RelayProc::spawn_ready(&bed, "relay-1", &config).await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
    let summary = bed.publish(Load::new("backlog", BACKLOG)).await;

    let mut relay = RelayProc::spawn_ready(&bed, "relay-2", &config).await;
    // Ingest ends with the backlog and the WAL stops growing: each lane inserts its partial
    // last batch then, not ten minutes later.
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_totals(&report, summary.published_total(), BACKLOG);
    assert_eq!(bed.count_all_tables(), BACKLOG);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
