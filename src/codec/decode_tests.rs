//! Decoding tests: MarketPrism's documented examples and realistic variants, every column
//! asserted, and each malformed case checked for an error that names its field.

use super::*;
use crate::codec::{DecodeError, Identity, Row, Table};

const STREAM: &str = "MARKET_DATA";

fn ok(subject: &str, payload: &str) -> Row {
    match decode(subject, payload.as_bytes(), STREAM, 42) {
        Ok(row) => row,
        Err(e) => panic!("decode failed: {e}"),
    }
}

fn err(subject: &str, payload: &str) -> DecodeError {
    match decode(subject, payload.as_bytes(), STREAM, 42) {
        Ok(row) => panic!("decode succeeded: {row:?}"),
        Err(e) => e,
    }
}

fn s(text: &str) -> String {
    text.to_owned()
}

const TRADE_EXAMPLE: &str = r#"{"symbol":"BTC-USDT","price":"112345.67000000","quantity":"0.00120000","side":"buy","trade_id":"5321098765",
 "exchange":"binance","market_type":"spot","data_source":"marketprism","data_type":"trade",
 "ts_ms":1761714312456,"trade_ts_ms":1761714312345,"publisher":"unified-collector","collected_ts_ms":1761714312401}"#;

#[test]
fn marketprism_trade_example_decodes_into_every_column() {
    let row = ok("trade.binance.spot.BTC-USDT", TRADE_EXAMPLE);
    assert_eq!(
        row,
        Row::Trade(TradeRow {
            timestamp: 1_761_714_312_456,
            exchange: s("binance"),
            market_type: s("spot"),
            symbol: s("BTC-USDT"),
            trade_id: s("5321098765"),
            price: 11_234_567_000_000,
            quantity: 120_000,
            side: s("buy"),
            is_maker: false,
            trade_time: 1_761_714_312_345,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
    assert_eq!(row.table(), Table::Trades);
    assert_eq!(row.timestamp_ms(), 1_761_714_312_456);
}

#[test]
fn trade_without_routing_fields_takes_them_from_the_subject() {
    let row = ok(
        "trade.okx.perpetual.BTC-USDT-SWAP",
        r#"{"trade_id":"t1","price":112000,"quantity":"12","side":"sell","is_maker":true,"ts_ms":1000}"#,
    );
    assert_eq!(
        row,
        Row::Trade(TradeRow {
            timestamp: 1000,
            exchange: s("okx"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT-SWAP"),
            trade_id: s("t1"),
            price: 11_200_000_000_000,
            quantity: 1_200_000_000,
            side: s("sell"),
            is_maker: true,
            trade_time: 1000,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn payload_routing_fields_win_over_the_subject() {
    let row = ok(
        "trade.binance.spot.BTC-USDT",
        r#"{"exchange":"binance_spot","market_type":"spot","symbol":"ETH-USDT","trade_id":"1",
            "price":"1","quantity":"1","side":"buy","ts_ms":1,"data_source":"api","is_maker":null}"#,
    );
    let Row::Trade(trade) = row else {
        panic!("not a trade")
    };
    assert_eq!(
        (
            trade.exchange.as_str(),
            trade.symbol.as_str(),
            trade.data_source.as_str(),
            trade.is_maker
        ),
        ("binance_spot", "ETH-USDT", "api", false)
    );
}

const ORDERBOOK_EXAMPLE: &str = r#"{"exchange":"binance","market_type":"spot","symbol":"BTC-USDT","bids":[["112345.60000000","1.23400000"]],
 "asks":[["112345.70000000","0.80000000"]],"last_update_id":71234567890,"data_type":"orderbook",
 "ts_ms":1761714312456,"publisher":"unified-collector","collected_ts_ms":1761714312450}"#;

#[test]
fn marketprism_orderbook_example_decodes_into_every_column() {
    assert_eq!(
        ok("orderbook.binance.spot.BTC-USDT", ORDERBOOK_EXAMPLE),
        Row::Orderbook(OrderbookRow {
            timestamp: 1_761_714_312_456,
            exchange: s("binance"),
            market_type: s("spot"),
            symbol: s("BTC-USDT"),
            last_update_id: 71_234_567_890,
            bids_count: 1,
            asks_count: 1,
            best_bid_price: 11_234_560_000_000,
            best_ask_price: 11_234_570_000_000,
            best_bid_quantity: 123_400_000,
            best_ask_quantity: 80_000_000,
            bids: s(r#"[["112345.60000000","1.23400000"]]"#),
            asks: s(r#"[["112345.70000000","0.80000000"]]"#),
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn okx_orderbook_in_object_format_with_null_update_id_decodes() {
    let row = ok(
        "orderbook.okx.perpetual.BTC-USDT-SWAP",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT-SWAP","data_type":"orderbook",
            "bids":[{"price":"112000.1","quantity":"3"},{"price":112000,"quantity":5.5}],
            "asks":[{"price":"112000.2","quantity":"0.01"}],
            "last_update_id":null,"ts_ms":1761714312999}"#,
    );
    assert_eq!(
        row,
        Row::Orderbook(OrderbookRow {
            timestamp: 1_761_714_312_999,
            exchange: s("okx"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT-SWAP"),
            last_update_id: 0,
            bids_count: 2,
            asks_count: 1,
            best_bid_price: 11_200_010_000_000,
            best_ask_price: 11_200_020_000_000,
            best_bid_quantity: 300_000_000,
            best_ask_quantity: 1_000_000,
            bids: s(r#"[["112000.10000000","3.00000000"],["112000.00000000","5.50000000"]]"#),
            asks: s(r#"[["112000.20000000","0.01000000"]]"#),
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
    assert_eq!(
        row.identity().natural,
        "okx|perpetual|BTC-USDT-SWAP|0|1761714312999"
    );
}

#[test]
fn orderbook_with_an_empty_side_has_zero_best_values() {
    let row = ok(
        "orderbook.binance.spot.BTC-USDT",
        r#"{"bids":[],"asks":[["1","2"]],"ts_ms":5}"#,
    );
    let Row::Orderbook(book) = row else {
        panic!("not an orderbook")
    };
    assert_eq!(
        (
            book.bids.as_str(),
            book.bids_count,
            book.best_bid_price,
            book.best_bid_quantity
        ),
        ("[]", 0, 0, 0)
    );
    assert_eq!((book.asks_count, book.best_ask_price), (1, 100_000_000));
    assert_eq!(book.last_update_id, 0);
}

#[test]
fn orderbook_errors_name_the_side_and_level() {
    assert_eq!(
        err(
            "orderbook.binance.spot.BTC-USDT",
            r#"{"bids":[["1","1"]],"asks":[["1","1"],["2",true]],"ts_ms":5}"#
        )
        .to_string(),
        "field `asks[1].quantity`: expected a decimal string or number, found a boolean `true`"
    );
    assert_eq!(
        err(
            "orderbook.binance.spot.BTC-USDT",
            r#"{"bids":[],"ts_ms":5}"#
        ),
        DecodeError::MissingField { field: s("asks") }
    );
    assert!(matches!(
        err("orderbook.binance.spot.BTC-USDT", r#"{"bids":[],"asks":[],"ts_ms":5,"last_update_id":-3}"#),
        DecodeError::WrongType { ref field, .. } if field == "last_update_id"
    ));
}

const FUNDING_EXAMPLE: &str = r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","current_funding_rate":0.0001,
 "mark_price":112350.1,"index_price":112340.2,"data_type":"funding_rate","ts_ms":1761714300123,
 "next_funding_ts_ms":1761714300099,"publisher":"unified-collector","collected_ts_ms":1761714300100}"#;

#[test]
fn marketprism_funding_rate_example_decodes_into_every_column() {
    assert_eq!(
        ok("funding_rate.binance.perpetual.BTC-USDT", FUNDING_EXAMPLE),
        Row::FundingRate(FundingRateRow {
            timestamp: 1_761_714_300_123,
            exchange: s("binance"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT"),
            funding_rate: 10_000,
            mark_price: 11_235_010_000_000,
            index_price: 11_234_020_000_000,
            funding_time: 1_761_714_300_123,
            next_funding_time: 1_761_714_300_099,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn okx_funding_rate_with_many_digits_and_null_prices_decodes() {
    let row = ok(
        "funding_rate.okx.perpetual.BTC-USDT-SWAP",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT-SWAP","current_funding_rate":3.3218473e-05,
            "estimated_funding_rate":null,"mark_price":null,"premium_index":-0.0002,"funding_interval":"8h",
            "data_type":"funding_rate","ts_ms":1761714300500,"next_funding_ts_ms":1761724800000}"#,
    );
    assert_eq!(
        row,
        Row::FundingRate(FundingRateRow {
            timestamp: 1_761_714_300_500,
            exchange: s("okx"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT-SWAP"),
            funding_rate: 3_322,
            mark_price: 0,
            index_price: 0,
            funding_time: 1_761_714_300_500,
            next_funding_time: 1_761_724_800_000,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn open_interest_maps_value_and_usd_and_counts_one_observation() {
    let row = ok(
        "open_interest.binance.perpetual.BTC-USDT",
        r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","open_interest_value":85123.456,
            "open_interest_usd":9563234567.89,"open_interest_unit":"contracts","mark_price":112345.6,"index_price":null,
            "data_type":"open_interest","ts_ms":1761714300000,"data_source":"api"}"#,
    );
    assert_eq!(
        row,
        Row::OpenInterest(OpenInterestRow {
            timestamp: 1_761_714_300_000,
            exchange: s("binance"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT"),
            open_interest: 8_512_345_600_000,
            open_interest_value: 956_323_456_789_000_000,
            count: 1,
            data_source: s("api"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn open_interest_with_null_usd_stores_zero_and_keeps_a_payload_count() {
    let row = ok(
        "open_interest.okx.perpetual.BTC-USDT-SWAP",
        r#"{"open_interest_value":"123.5","open_interest_usd":null,"count":7,"ts_ms":9}"#,
    );
    let Row::OpenInterest(oi) = row else {
        panic!("not open interest")
    };
    assert_eq!(
        (oi.open_interest, oi.open_interest_value, oi.count),
        (12_350_000_000, 0, 7)
    );
    assert_eq!(
        err(
            "open_interest.okx.perpetual.BTC-USDT-SWAP",
            r#"{"open_interest_value":null,"ts_ms":9}"#
        ),
        DecodeError::MissingField {
            field: s("open_interest_value")
        }
    );
}

#[test]
fn liquidation_decodes_into_every_column() {
    let row = ok(
        "liquidation.okx.perpetual.BTC-USDT-SWAP",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT-SWAP","liquidation_id":"okx-liq-77",
            "side":"sell","status":"filled","price":111999.9,"quantity":0.25,"filled_quantity":0.25,
            "notional_value":27999.975,"liquidation_ts_ms":1761714311000,"data_type":"liquidation",
            "ts_ms":1761714311222,"publisher":"unified-collector","collected_ts_ms":1761714311200}"#,
    );
    assert_eq!(
        row,
        Row::Liquidation(LiquidationRow {
            timestamp: 1_761_714_311_222,
            exchange: s("okx"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT-SWAP"),
            side: s("sell"),
            price: 11_199_990_000_000,
            quantity: 25_000_000,
            liquidation_time: 1_761_714_311_000,
            liquidation_id: s("okx-liq-77"),
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
    assert_eq!(
        row.identity(),
        Identity {
            table: Table::Liquidations,
            natural: s("okx|perpetual|BTC-USDT-SWAP|1761714311222|okx-liq-77"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        }
    );
}

#[test]
fn liquidation_without_id_or_event_time_uses_empty_id_and_publish_time() {
    let Row::Liquidation(liq) = ok(
        "liquidation.binance.perpetual.ETH-USDT",
        r#"{"side":"buy","price":"3000","quantity":"1","ts_ms":77}"#,
    ) else {
        panic!("not a liquidation")
    };
    assert_eq!(
        (liq.liquidation_id.as_str(), liq.liquidation_time),
        ("", 77)
    );
}

#[test]
fn lsr_top_position_decodes_into_every_column() {
    let row = ok(
        "lsr_top_position.binance.perpetual.BTC-USDT",
        r#"{"exchange":"binance","market_type":"perpetual","symbol":"BTC-USDT","long_short_ratio":"1.8512",
            "long_position_ratio":"0.6493","short_position_ratio":"0.3507","period":"5m",
            "data_type":"lsr_top_position","ts_ms":1761714300000,"publisher":"unified-collector"}"#,
    );
    assert_eq!(
        row,
        Row::LsrTopPosition(LsrTopPositionRow {
            timestamp: 1_761_714_300_000,
            exchange: s("binance"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT"),
            long_position_ratio: 64_930_000,
            short_position_ratio: 35_070_000,
            period: s("5m"),
            long_short_ratio: 185_120_000,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
    assert_eq!(
        row.identity().natural,
        "binance|perpetual|BTC-USDT|1761714300000|5m"
    );
}

#[test]
fn lsr_all_account_decodes_into_every_column() {
    let row = ok(
        "lsr_all_account.okx.perpetual.BTC-USDT-SWAP",
        r#"{"exchange":"okx","market_type":"perpetual","symbol":"BTC-USDT-SWAP","long_short_ratio":"2.1",
            "long_account_ratio":"0.67741935","short_account_ratio":"0.32258065","period":"5m",
            "data_type":"lsr_all_account","ts_ms":1761714300001}"#,
    );
    assert_eq!(
        row,
        Row::LsrAllAccount(LsrAllAccountRow {
            timestamp: 1_761_714_300_001,
            exchange: s("okx"),
            market_type: s("perpetual"),
            symbol: s("BTC-USDT-SWAP"),
            long_account_ratio: 67_741_935,
            short_account_ratio: 32_258_065,
            period: s("5m"),
            long_short_ratio: 210_000_000,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn volatility_index_decodes_into_every_column() {
    let row = ok(
        "volatility_index.deribit.options.BTC",
        r#"{"exchange":"deribit","market_type":"options","symbol":"BTC","currency":"BTC","vol_index":"45.23",
            "data_type":"volatility_index","ts_ms":1761714300000,"publisher":"unified-collector"}"#,
    );
    assert_eq!(
        row,
        Row::VolatilityIndex(VolatilityIndexRow {
            timestamp: 1_761_714_300_000,
            exchange: s("deribit"),
            market_type: s("options"),
            symbol: s("BTC"),
            index_value: 4_523_000_000,
            underlying_asset: s("BTC"),
            maturity_date: 0,
            data_source: s("marketprism"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        })
    );
}

#[test]
fn volatility_index_accepts_the_long_field_name_and_an_explicit_maturity() {
    let Row::VolatilityIndex(vol) = ok(
        "volatility_index.deribit.options.ETH",
        r#"{"volatility_index":61.5,"maturity_date":"2025-12-26","ts_ms":1}"#,
    ) else {
        panic!("not a volatility index")
    };
    assert_eq!(
        (
            vol.index_value,
            vol.underlying_asset.as_str(),
            vol.maturity_date
        ),
        (6_150_000_000, "ETH", 20_448)
    );
    assert_eq!(
        err(
            "volatility_index.deribit.options.ETH",
            r#"{"currency":"ETH","ts_ms":1}"#
        )
        .to_string(),
        "field `vol_index (or volatility_index)` is missing or null"
    );
}

#[test]
fn unknown_extra_fields_of_any_shape_are_ignored() {
    let payload = TRADE_EXAMPLE.replacen(
        '{',
        r#"{"future_field":{"nested":[1,2,{"x":null}]},"another":[["a"]],"flag":true,"n":1e300,"#,
        1,
    );
    assert_eq!(
        ok("trade.binance.spot.BTC-USDT", &payload),
        ok("trade.binance.spot.BTC-USDT", TRADE_EXAMPLE)
    );
}

#[test]
fn a_payload_that_is_not_json_is_rejected_with_the_parser_reason() {
    let e = err("trade.binance.spot.BTC-USDT", "not json");
    assert!(matches!(e, DecodeError::Json { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("payload is not a valid JSON object: expected "),
        "{e}"
    );
    let e = err("trade.binance.spot.BTC-USDT", "[1,2]");
    assert!(matches!(e, DecodeError::Json { .. }), "{e:?}");
    let e = decode(
        "trade.binance.spot.BTC-USDT",
        b"{\"trade_id\":\"\xff\"}",
        STREAM,
        1,
    )
    .unwrap_err();
    assert!(matches!(e, DecodeError::Json { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "payload is not a valid JSON object: not UTF-8: invalid utf-8 sequence of 1 bytes from index 13"
    );
}

#[test]
fn a_missing_required_field_is_named() {
    let payload = TRADE_EXAMPLE.replace(r#""trade_id":"5321098765","#, "");
    assert_eq!(
        err("trade.binance.spot.BTC-USDT", &payload).to_string(),
        "field `trade_id` is missing or null"
    );
    let payload = TRADE_EXAMPLE.replace(r#""ts_ms":1761714312456,"#, "");
    assert_eq!(
        err("trade.binance.spot.BTC-USDT", &payload),
        DecodeError::MissingField { field: s("ts_ms") }
    );
}

#[test]
fn a_missing_symbol_with_a_short_subject_is_named() {
    assert_eq!(
        err(
            "trade.binance",
            r#"{"trade_id":"1","price":"1","quantity":"1","side":"buy","ts_ms":1}"#
        ),
        DecodeError::MissingField {
            field: s("market_type")
        }
    );
}

#[test]
fn a_bad_decimal_names_the_field_the_value_and_the_reason() {
    let payload = TRADE_EXAMPLE.replace("112345.67000000", "112,345.67");
    assert_eq!(
        err("trade.binance.spot.BTC-USDT", &payload).to_string(),
        "field `price`: `112,345.67` is not a valid Decimal64(8): not a decimal number"
    );
    let payload = TRADE_EXAMPLE.replace("0.00120000", "99999999999");
    assert_eq!(
        err("trade.binance.spot.BTC-USDT", &payload),
        DecodeError::BadDecimal {
            field: s("quantity"),
            value: s("99999999999"),
            reason: crate::codec::decimal::DecimalError::Overflow,
        }
    );
}

#[test]
fn a_wrong_json_type_names_the_field() {
    let payload = TRADE_EXAMPLE.replace("1761714312456,", "\"1761714312456\",");
    assert_eq!(
        err("trade.binance.spot.BTC-USDT", &payload).to_string(),
        "field `ts_ms`: expected an integer, found a string `\"1761714312456\"`"
    );
    let payload = TRADE_EXAMPLE.replace(r#""side":"buy""#, r#""side":["buy"]"#);
    assert_eq!(
        err("trade.binance.spot.BTC-USDT", &payload).to_string(),
        "field `side`: expected a string, found an array `[\"buy\"]`"
    );
    let payload = TRADE_EXAMPLE.replace(r#""symbol":"BTC-USDT""#, r#""symbol":7"#);
    assert!(err("trade.binance.spot.BTC-USDT", &payload)
        .to_string()
        .starts_with("field `symbol`"));
}

#[test]
fn an_unknown_data_type_in_the_subject_is_rejected() {
    assert_eq!(
        err("ticker.binance.spot.BTC-USDT", "{}"),
        DecodeError::UnknownDataType {
            subject: s("ticker.binance.spot.BTC-USDT"),
            data_type: s("ticker"),
        }
    );
}

#[test]
fn a_payload_data_type_that_disagrees_with_the_subject_is_rejected() {
    let e = err("funding_rate.binance.perpetual.BTC-USDT", TRADE_EXAMPLE);
    assert_eq!(
        e.to_string(),
        "field `data_type`: `trade` disagrees with subject `funding_rate.binance.perpetual.BTC-USDT` (data type `funding_rate`)"
    );
}

#[test]
fn identities_follow_the_table_keys() {
    let trade = ok("trade.binance.spot.BTC-USDT", TRADE_EXAMPLE);
    assert_eq!(
        trade.identity(),
        Identity {
            table: Table::Trades,
            natural: s("binance|spot|BTC-USDT|5321098765"),
            nats_stream: s(STREAM),
            nats_seq: 42,
        }
    );
    let book = ok("orderbook.binance.spot.BTC-USDT", ORDERBOOK_EXAMPLE);
    assert_eq!(
        book.identity().natural,
        "binance|spot|BTC-USDT|71234567890|1761714312456"
    );
    let funding = ok("funding_rate.binance.perpetual.BTC-USDT", FUNDING_EXAMPLE);
    assert_eq!(
        funding.identity().natural,
        "binance|perpetual|BTC-USDT|1761714300123"
    );
}

#[test]
fn spot_and_perpetual_trades_with_equal_ids_have_distinct_identities() {
    let spot = ok("trade.binance.spot.BTC-USDT", TRADE_EXAMPLE);
    let perp_payload =
        TRADE_EXAMPLE.replace(r#""market_type":"spot""#, r#""market_type":"perpetual""#);
    let perp = ok("trade.binance.perpetual.BTC-USDT", &perp_payload);
    assert_ne!(spot.identity().natural, perp.identity().natural);
}

#[test]
fn a_duplicated_field_is_rejected_naming_it() {
    let e = err(
        "trade.binance.spot.BTC-USDT",
        r#"{"trade_id":"1","price":"1","price":"2","quantity":"1","side":"buy","ts_ms":1}"#,
    );
    assert!(e.to_string().contains("duplicate field `price`"), "{e}");
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    const SUBJECTS: [&str; 9] = [
        "trade.binance.spot.BTC-USDT",
        "orderbook.okx.spot.BTC-USDT",
        "funding_rate.okx.perpetual.BTC-USDT-SWAP",
        "open_interest.binance.perpetual.BTC-USDT",
        "liquidation.okx.perpetual.BTC-USDT-SWAP",
        "lsr_top_position.binance.perpetual.BTC-USDT",
        "lsr_all_account.binance.perpetual.BTC-USDT",
        "volatility_index.deribit.options.BTC",
        "x",
    ];

    proptest! {
        #[test]
        fn decode_returns_for_arbitrary_bytes(subject in 0usize..9, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(SUBJECTS[subject], &bytes, STREAM, 1);
        }

        #[test]
        fn decode_returns_for_mutated_examples(
            subject in 0usize..9,
            example in 0usize..3,
            cut in any::<prop::sample::Index>(),
            insert in "[\\[\\]{}\",:0-9.eE+-]{0,4}",
        ) {
            let text = [TRADE_EXAMPLE, ORDERBOOK_EXAMPLE, FUNDING_EXAMPLE][example];
            let mut at = cut.index(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mutated = format!("{}{}{}", &text[..at], insert, &text[at..]);
            let _ = decode(SUBJECTS[subject], mutated.as_bytes(), STREAM, 1);
        }
    }
}
