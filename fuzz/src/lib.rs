//! The checks the fuzz targets of the relay crate run, kept in a library so the plain test
//! `tests/corpus.rs` replays the committed corpus through exactly the same code without
//! cargo-fuzz (the WAL targets' checks live in `prism_wal::fuzzing` for the same reason).
//!
//! `codec_decode` feeds untrusted bytes, as a NATS message would bring them, to
//! `prism_relay::codec::decode`. Input layout, chosen so libFuzzer mutates subjects and payloads
//! independently and so seed files stay readable JSON after one selector byte:
//!
//! ```text
//! byte 0 (selector) % 24:
//!   0..=7    subject `{data type}.binance.spot.BTC-USDT` (the eight types, in table order);
//!            payload = bytes 1..
//!   8..=15   subject `{data type}` alone, so exchange, market type and symbol have no
//!            subject tokens to fall back on; payload = bytes 1..
//!   16..=23  subject = the next `byte 1` bytes (lossy UTF-8), payload = the rest
//! ```
//!
//! ASCII `'0'..='7'` (0x30..=0x37) select the eight full subjects, which the seed files use.

use prism_relay::codec::decimal::{self, SCALED_ABS_MAX};
use prism_relay::codec::{decode, DataType, Row};

/// Selector values (byte 0 modulo this) are split in three bands of eight: full subjects,
/// bare data-type subjects, arbitrary subjects.
const SELECTOR_MODULUS: u8 = 24;

/// The stream and sequence given to every decode; the row must carry them back.
const NATS_STREAM: &str = "MARKET_DATA";
const NATS_SEQ: u64 = 4_242;

/// The subject and payload an input stands for (see the module doc).
pub fn split_input(data: &[u8]) -> Option<(String, &[u8])> {
    let (&selector, rest) = data.split_first()?;
    let selector = selector % SELECTOR_MODULUS;
    let data_types = DataType::ALL;
    match usize::from(selector) {
        band @ 0..=7 => Some((
            format!("{}.binance.spot.BTC-USDT", data_types[band].name()),
            rest,
        )),
        band @ 8..=15 => Some((data_types[band - 8].name().to_owned(), rest)),
        _ => {
            let (&len, rest) = rest.split_first()?;
            let len = usize::from(len).min(rest.len());
            let (subject, payload) = rest.split_at(len);
            Some((String::from_utf8_lossy(subject).into_owned(), payload))
        }
    }
}

/// Decodes the message an input stands for; panics (the fuzzer's failure signal) when decoding
/// panics or when an accepted row breaks an invariant of the codec:
/// - the row belongs to the table the subject's data type names, with the stream and sequence
///   it was given;
/// - every `Decimal64(8)` value is within the column's precision and survives
///   `parse(format(v)) == v`;
/// - an orderbook's `bids`/`asks` JSON text holds canonical decimal strings (`format(parse(s))
///   == s`), as many levels as its counts, and the best levels the row names.
pub fn codec_decode(data: &[u8]) {
    let Some((subject, payload)) = split_input(data) else {
        return;
    };
    let Ok(row) = decode(&subject, payload, NATS_STREAM, NATS_SEQ) else {
        return;
    };
    let data_type = DataType::from_subject(&subject);
    assert_eq!(
        data_type.map(DataType::table),
        Some(row.table()),
        "subject {subject:?} decoded into another table"
    );
    let identity = row.identity();
    assert_eq!(identity.nats_stream, NATS_STREAM);
    assert_eq!(identity.nats_seq, NATS_SEQ);
    let _ = row.timestamp_ms();
    for (column, value) in decimals(&row) {
        check_decimal(column, value);
    }
    if let Row::Orderbook(book) = &row {
        check_levels(
            "bids",
            &book.bids,
            book.bids_count,
            (book.best_bid_price, book.best_bid_quantity),
            |candidate, best| candidate > best,
        );
        check_levels(
            "asks",
            &book.asks,
            book.asks_count,
            (book.best_ask_price, book.best_ask_quantity),
            |candidate, best| candidate < best,
        );
    }
}

/// Every `Decimal64(8)` column of a row, by name.
fn decimals(row: &Row) -> Vec<(&'static str, i64)> {
    match row {
        Row::Trade(r) => vec![("price", r.price), ("quantity", r.quantity)],
        Row::Orderbook(r) => vec![
            ("best_bid_price", r.best_bid_price),
            ("best_ask_price", r.best_ask_price),
            ("best_bid_quantity", r.best_bid_quantity),
            ("best_ask_quantity", r.best_ask_quantity),
        ],
        Row::FundingRate(r) => vec![
            ("funding_rate", r.funding_rate),
            ("mark_price", r.mark_price),
            ("index_price", r.index_price),
        ],
        Row::OpenInterest(r) => vec![
            ("open_interest", r.open_interest),
            ("open_interest_value", r.open_interest_value),
        ],
        Row::Liquidation(r) => vec![("price", r.price), ("quantity", r.quantity)],
        Row::LsrTopPosition(r) => vec![
            ("long_position_ratio", r.long_position_ratio),
            ("short_position_ratio", r.short_position_ratio),
            ("long_short_ratio", r.long_short_ratio),
        ],
        Row::LsrAllAccount(r) => vec![
            ("long_account_ratio", r.long_account_ratio),
            ("short_account_ratio", r.short_account_ratio),
            ("long_short_ratio", r.long_short_ratio),
        ],
        Row::VolatilityIndex(r) => vec![("index_value", r.index_value)],
    }
}

fn check_decimal(column: &str, value: i64) {
    assert!(
        value.unsigned_abs() <= SCALED_ABS_MAX,
        "{column}: {value} is past Decimal64(8)'s 18 digits"
    );
    let text = decimal::format(value);
    assert_eq!(
        decimal::parse(&text),
        Ok(value),
        "{column}: {value} formats as {text:?}, which does not parse back"
    );
}

/// Checks one side's normalized JSON text against its count and best level; `better` is the
/// side's order (higher bids, lower asks), the first of equal prices being the best.
fn check_levels(
    side: &str,
    json: &str,
    count: u32,
    best: (i64, i64),
    better: fn(i64, i64) -> bool,
) {
    let levels: Vec<(String, String)> = match serde_json::from_str(json) {
        Ok(levels) => levels,
        Err(e) => panic!("{side}: normalized text {json:?} is not [[price, quantity], ..]: {e}"),
    };
    assert_eq!(
        u32::try_from(levels.len()).ok(),
        Some(count),
        "{side}: count"
    );
    let mut expected: Option<(i64, i64)> = None;
    for (price_text, quantity_text) in &levels {
        let price = canonical(side, price_text);
        let quantity = canonical(side, quantity_text);
        match expected {
            Some((best_price, _)) if !better(price, best_price) => {}
            _ => expected = Some((price, quantity)),
        }
    }
    assert_eq!(expected.unwrap_or((0, 0)), best, "{side}: best level");
}

/// The value of a level's decimal text, which must be the canonical text of that value.
fn canonical(side: &str, text: &str) -> i64 {
    let value = match decimal::parse(text) {
        Ok(value) => value,
        Err(e) => panic!("{side}: level value {text:?} does not parse: {e}"),
    };
    check_decimal(side, value);
    assert_eq!(decimal::format(value), text, "{side}: not canonical");
    value
}
