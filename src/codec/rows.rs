//! The typed rows written to ClickHouse, one struct per table, plus the dead-letter row.
//!
//! Field order is column order: the `clickhouse` crate names the columns of its `INSERT` from
//! these fields, and `schema::expected_columns` lists the same names in the same order (a unit
//! test holds the two together). `created_at` is absent on purpose: the server fills it by
//! `DEFAULT`, so it records when a row reached ClickHouse, not when it was published.
//!
//! RowBinary encodings, identical for both schema profiles:
//! - `DateTime64(3,'UTC')` (legacy `Int64`): `i64` epoch milliseconds;
//! - `Decimal64(8)`: `i64` scaled by 10^8 (see `codec::decimal`);
//! - `Bool` (legacy `UInt8`): `bool`, one byte 0 or 1;
//! - `Date`: `u16` days since 1970-01-01;
//! - `LowCardinality(String)` (legacy `String`): `String`.
//!
//! Mapping rules shared by every data row (details per struct):
//! - `timestamp` is the payload's `ts_ms` (required integer), the collector's publish time;
//! - `exchange`, `market_type`, `symbol` come from the payload and fall back to the subject's
//!   tokens (`{data_type}.{exchange}.{market_type}.{symbol}`) when absent; values are stored as
//!   sent (no renaming of `binance_derivatives` and the like);
//! - `data_source` is the payload's `data_source`, `"marketprism"` when absent or null;
//! - `nats_stream`, `nats_seq` are the JetStream stream and stream sequence of the message,
//!   which redeliveries and WAL replays keep: the message identity.

use serde::{Deserialize, Serialize};

/// A row of `trades`. Natural identity: (exchange, market_type, symbol, trade_id).
///
/// - `trade_id`: payload `trade_id`, required string;
/// - `price`, `quantity`: payload decimal strings (numbers accepted), exact, required;
///   OKX perpetual quantities are in contracts, stored as sent;
/// - `side`: payload `side` (`buy`/`sell`), required, stored as sent;
/// - `is_maker`: payload `is_maker` when present, `false` when absent or null;
/// - `trade_time`: payload `trade_ts_ms` (exchange trade time), `ts_ms` when absent or null.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TradeRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub trade_id: String,
    pub price: i64,
    pub quantity: i64,
    pub side: String,
    pub is_maker: bool,
    pub trade_time: i64,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `orderbooks`. Natural identity: (exchange, market_type, symbol, last_update_id,
/// timestamp); OKX sends no update id, so its snapshots are told apart by timestamp alone.
///
/// - `last_update_id`: payload `last_update_id`, non-negative integer; `null` (OKX) or absent -> 0;
/// - `bids`, `asks`: required arrays of levels in either format, `[[price, quantity], ...]` or
///   `[{"price": .., "quantity": ..}, ...]`, values as decimal strings or numbers; stored as
///   normalized JSON text `[["112345.60000000","1.23400000"],...]` (eight fractional digits,
///   payload order kept);
/// - `bids_count`, `asks_count`: number of levels;
/// - `best_bid_*`: the highest bid price and its quantity, `best_ask_*`: the lowest ask price and
///   its quantity (ties keep the first); both 0 when the side is empty.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OrderbookRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub last_update_id: u64,
    pub bids_count: u32,
    pub asks_count: u32,
    pub best_bid_price: i64,
    pub best_ask_price: i64,
    pub best_bid_quantity: i64,
    pub best_ask_quantity: i64,
    pub bids: String,
    pub asks: String,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `funding_rates`. Natural identity: (exchange, market_type, symbol, timestamp).
///
/// - `funding_rate`: payload `current_funding_rate` (JSON float or decimal string), required;
///   rounded half to even at eight fractional digits (see `codec::decimal`);
/// - `mark_price`, `index_price`: payload fields of the same names, 0 when absent or null;
/// - `funding_time`: `ts_ms`, the time the rate was observed;
/// - `next_funding_time`: payload `next_funding_ts_ms` (for Binance a placeholder equal to the
///   publish time), 0 when absent or null.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FundingRateRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub funding_rate: i64,
    pub mark_price: i64,
    pub index_price: i64,
    pub funding_time: i64,
    pub next_funding_time: i64,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `open_interests`. Natural identity: (exchange, market_type, symbol, timestamp).
///
/// - `open_interest`: payload `open_interest_value` (the open interest in the venue's unit,
///   usually contracts), required;
/// - `open_interest_value`: payload `open_interest_usd` (its value in USD), 0 when absent or
///   null, because some venues do not report it;
/// - `count`: payload `count` when it is a non-negative integer, else 1: the number of
///   observations the row stands for, so `sum(count)` counts samples after any roll-up.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OpenInterestRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub open_interest: i64,
    pub open_interest_value: i64,
    pub count: u64,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `liquidations`. Natural identity: (exchange, market_type, symbol, timestamp,
/// liquidation_id).
///
/// - `side`: payload `side`, required;
/// - `price`, `quantity`: payload floats or decimal strings, required;
/// - `liquidation_time`: payload `liquidation_ts_ms`, `ts_ms` when absent or null;
/// - `liquidation_id`: payload `liquidation_id`, `""` when absent or null. A column MarketPrism's
///   table lacks: liquidations are event driven and several can share one publish millisecond
///   on one symbol during a cascade, so the id keeps them from collapsing into one row.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LiquidationRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub side: String,
    pub price: i64,
    pub quantity: i64,
    pub liquidation_time: i64,
    pub liquidation_id: String,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `lsr_top_positions`. Natural identity: (exchange, market_type, symbol, timestamp,
/// period).
///
/// - `long_position_ratio`, `short_position_ratio`: payload decimal strings, required;
/// - `period`: payload `period` (`"5m"`), required;
/// - `long_short_ratio`: payload decimal string, required. A column MarketPrism's table lacks:
///   it is the headline value of the message and is not derivable exactly from the two shares.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LsrTopPositionRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub long_position_ratio: i64,
    pub short_position_ratio: i64,
    pub period: String,
    pub long_short_ratio: i64,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `lsr_all_accounts`. Natural identity: (exchange, market_type, symbol, timestamp,
/// period).
///
/// - `long_account_ratio`, `short_account_ratio`: payload decimal strings, required;
/// - `period`: payload `period`, required;
/// - `long_short_ratio`: payload decimal string, required (an added column, as in
///   [`LsrTopPositionRow`]).
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LsrAllAccountRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub long_account_ratio: i64,
    pub short_account_ratio: i64,
    pub period: String,
    pub long_short_ratio: i64,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

/// A row of `volatility_indices`. Natural identity: (exchange, market_type, symbol, timestamp).
///
/// - `index_value`: payload `vol_index`, or `volatility_index` when `vol_index` is absent or
///   null; decimal string or number; one of them is required;
/// - `underlying_asset`: payload `currency`, the symbol when absent or null;
/// - `maturity_date`: payload `maturity_date` (`"YYYY-MM-DD"`) when present; otherwise
///   1970-01-01 (day 0). MarketPrism's volatility indices (Deribit DVOL) are perpetual,
///   30-day-constant-maturity indices with no expiry, and `Date` is not nullable, so day 0 is
///   the documented "no maturity" value.
#[derive(clickhouse::Row, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VolatilityIndexRow {
    pub timestamp: i64,
    pub exchange: String,
    pub market_type: String,
    pub symbol: String,
    pub index_value: i64,
    pub underlying_asset: String,
    pub maturity_date: u16,
    pub data_source: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}
