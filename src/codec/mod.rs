//! MarketPrism message codecs: JSON payloads in, typed ClickHouse rows out.
//!
//! The drain reads a WAL record (subject, payload, JetStream stream and sequence) and calls
//! [`decode`], which picks the [`DataType`] from the subject's first token and returns a [`Row`]
//! for the matching [`Table`]. A message that cannot be decoded gets a [`DecodeError`] whose
//! `Display` names the field, the value and the reason; it becomes the dead-letter reason, so it
//! is meant for an operator's eyes.
//!
//! Design constraints:
//! - hot path: one pass over the payload per message, no intermediate `serde_json::Value`;
//!   payload fields are captured as borrowed raw JSON text and converted once;
//! - decimals are exact: prices and quantities never go through `f64` ([`decimal`]);
//! - unknown payload fields are ignored, so collectors can add fields without breaking the relay;
//! - the subject decides the data type. A payload `data_type` may be omitted; when present it
//!   must equal the subject's, otherwise the message is rejected ([`DecodeError::DataTypeMismatch`])
//!   rather than written into a table it may not belong to.
//!
//! The row structs ([`rows`]) document, field by field, where each column comes from.

pub mod decimal;
mod decode;
mod field;
mod levels;
pub mod rows;

use std::fmt;

pub use decode::decode;
pub(crate) use field::days_from_civil;
pub use rows::{
    FundingRateRow, LiquidationRow, LsrAllAccountRow, LsrTopPositionRow, OpenInterestRow,
    OrderbookRow, TradeRow, VolatilityIndexRow,
};

/// The eight MarketPrism data types, named by the first token of a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    Trade,
    Orderbook,
    FundingRate,
    OpenInterest,
    Liquidation,
    LsrTopPosition,
    LsrAllAccount,
    VolatilityIndex,
}

impl DataType {
    /// Every data type, in table order.
    pub const ALL: [DataType; 8] = [
        DataType::Trade,
        DataType::Orderbook,
        DataType::FundingRate,
        DataType::OpenInterest,
        DataType::Liquidation,
        DataType::LsrTopPosition,
        DataType::LsrAllAccount,
        DataType::VolatilityIndex,
    ];

    /// The name used in subjects and in the payload's `data_type` field.
    pub const fn name(self) -> &'static str {
        match self {
            DataType::Trade => "trade",
            DataType::Orderbook => "orderbook",
            DataType::FundingRate => "funding_rate",
            DataType::OpenInterest => "open_interest",
            DataType::Liquidation => "liquidation",
            DataType::LsrTopPosition => "lsr_top_position",
            DataType::LsrAllAccount => "lsr_all_account",
            DataType::VolatilityIndex => "volatility_index",
        }
    }

    /// The data type of a name, exactly as MarketPrism spells it.
    pub fn from_name(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The data type named by the first token of `{data_type}.{exchange}.{market_type}.{symbol}`.
    pub fn from_subject(subject: &str) -> Option<DataType> {
        DataType::from_name(first_token(subject))
    }

    /// Position in [`DataType::ALL`], for per-type arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The table rows of this type go to.
    pub const fn table(self) -> Table {
        match self {
            DataType::Trade => Table::Trades,
            DataType::Orderbook => Table::Orderbooks,
            DataType::FundingRate => Table::FundingRates,
            DataType::OpenInterest => Table::OpenInterests,
            DataType::Liquidation => Table::Liquidations,
            DataType::LsrTopPosition => Table::LsrTopPositions,
            DataType::LsrAllAccount => Table::LsrAllAccounts,
            DataType::VolatilityIndex => Table::VolatilityIndices,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DataType::from_name(s).ok_or_else(|| format!("unknown data type {s:?}"))
    }
}

/// The first token of a subject (the whole subject when it has no dot).
pub(crate) fn first_token(subject: &str) -> &str {
    subject.split('.').next().unwrap_or(subject)
}

/// The eight MarketPrism tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Trades,
    Orderbooks,
    FundingRates,
    OpenInterests,
    Liquidations,
    LsrTopPositions,
    LsrAllAccounts,
    VolatilityIndices,
}

impl Table {
    /// Every table, in a fixed order (the order of DDL output).
    pub const ALL: [Table; 8] = [
        Table::Trades,
        Table::Orderbooks,
        Table::FundingRates,
        Table::OpenInterests,
        Table::Liquidations,
        Table::LsrTopPositions,
        Table::LsrAllAccounts,
        Table::VolatilityIndices,
    ];

    /// The ClickHouse table name.
    pub const fn name(self) -> &'static str {
        match self {
            Table::Trades => "trades",
            Table::Orderbooks => "orderbooks",
            Table::FundingRates => "funding_rates",
            Table::OpenInterests => "open_interests",
            Table::Liquidations => "liquidations",
            Table::LsrTopPositions => "lsr_top_positions",
            Table::LsrAllAccounts => "lsr_all_accounts",
            Table::VolatilityIndices => "volatility_indices",
        }
    }

    /// The table of a ClickHouse table name.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The data type whose messages fill this table.
    pub const fn data_type(self) -> DataType {
        match self {
            Table::Trades => DataType::Trade,
            Table::Orderbooks => DataType::Orderbook,
            Table::FundingRates => DataType::FundingRate,
            Table::OpenInterests => DataType::OpenInterest,
            Table::Liquidations => DataType::Liquidation,
            Table::LsrTopPositions => DataType::LsrTopPosition,
            Table::LsrAllAccounts => DataType::LsrAllAccount,
            Table::VolatilityIndices => DataType::VolatilityIndex,
        }
    }

    /// The columns the relay inserts, in insert order (the row struct's fields).
    pub fn column_names(self) -> &'static [&'static str] {
        use clickhouse::Row as _;
        match self {
            Table::Trades => TradeRow::COLUMN_NAMES,
            Table::Orderbooks => OrderbookRow::COLUMN_NAMES,
            Table::FundingRates => FundingRateRow::COLUMN_NAMES,
            Table::OpenInterests => OpenInterestRow::COLUMN_NAMES,
            Table::Liquidations => LiquidationRow::COLUMN_NAMES,
            Table::LsrTopPositions => LsrTopPositionRow::COLUMN_NAMES,
            Table::LsrAllAccounts => LsrAllAccountRow::COLUMN_NAMES,
            Table::VolatilityIndices => VolatilityIndexRow::COLUMN_NAMES,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a message could not become a row. `Display` is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The subject's first token is not one of the eight data types.
    #[error("subject `{subject}`: unknown data type `{data_type}` (expected one of trade, orderbook, funding_rate, open_interest, liquidation, lsr_top_position, lsr_all_account, volatility_index)")]
    UnknownDataType { subject: String, data_type: String },
    /// The payload's `data_type` disagrees with the subject's.
    #[error("field `data_type`: `{payload}` disagrees with subject `{subject}` (data type `{subject_type}`)")]
    DataTypeMismatch {
        subject: String,
        subject_type: DataType,
        payload: String,
    },
    /// The payload is not a JSON object, or not well-formed JSON.
    #[error("payload is not a valid JSON object: {reason}")]
    Json { reason: String },
    /// A required field is absent or `null`.
    #[error("field `{field}` is missing or null")]
    MissingField { field: String },
    /// A field holds a value of the wrong JSON type.
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: String,
    },
    /// A decimal field does not parse or does not fit `Decimal64(8)`.
    #[error("field `{field}`: `{value}` is not a valid Decimal64(8): {reason}")]
    BadDecimal {
        field: String,
        value: String,
        reason: decimal::DecimalError,
    },
    /// A field has the right type but an unusable value.
    #[error("field `{field}`: `{value}` is invalid: {reason}")]
    InvalidValue {
        field: String,
        value: String,
        reason: &'static str,
    },
    /// The row's time lies outside the [`TimeWindow`] of plausible times.
    #[error("field `ts_ms`: {timestamp_ms} is outside the accepted window [{min_ms}, {max_ms}] (not before [drain] timestamp_min_ms, not later than the message's publish time plus [drain] timestamp_future_max_ms)")]
    TimestampOutOfWindow {
        /// The row's `timestamp` in epoch milliseconds.
        timestamp_ms: i64,
        /// Earliest accepted time.
        min_ms: i64,
        /// Latest accepted time for this message.
        max_ms: i64,
    },
}

/// 2009-01-01T00:00:00Z in epoch milliseconds: no market data the relay carries is older.
pub const TIMESTAMP_MIN_MS_DEFAULT: i64 = 1_230_768_000_000;

/// One day, in milliseconds: how far past its JetStream publish time a row's time may lie by
/// default (collectors' clocks drift by seconds, not days).
pub const TIMESTAMP_FUTURE_MAX_MS_DEFAULT: i64 = 86_400_000;

/// The window of plausible row times. A row outside it is a dead letter at decode: its
/// `timestamp` is the tables' partition key, so rows spread over years would make one insert
/// touch a partition per month (which ClickHouse refuses as too many partitions), and a row
/// dated 1970 would expire at once under a TTL.
///
/// The upper bound is relative to the message's JetStream publish time, not to the clock: the
/// decision must be the same when a batch is re-cut after a crash or replayed a month later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Earliest accepted `timestamp`, epoch milliseconds.
    pub min_ms: i64,
    /// How far past the publish time a `timestamp` may lie, milliseconds.
    pub future_max_ms: i64,
}

impl Default for TimeWindow {
    fn default() -> Self {
        TimeWindow {
            min_ms: TIMESTAMP_MIN_MS_DEFAULT,
            future_max_ms: TIMESTAMP_FUTURE_MAX_MS_DEFAULT,
        }
    }
}

impl TimeWindow {
    /// Accepts `row` if its `timestamp` lies in the window for a message published at
    /// `published_ns` (JetStream's publish time, epoch nanoseconds).
    pub fn check(&self, row: &Row, published_ns: i64) -> Result<(), DecodeError> {
        let timestamp_ms = row.timestamp_ms();
        let max_ms = (published_ns / 1_000_000).saturating_add(self.future_max_ms);
        if timestamp_ms < self.min_ms || timestamp_ms > max_ms {
            return Err(DecodeError::TimestampOutOfWindow {
                timestamp_ms,
                min_ms: self.min_ms,
                max_ms,
            });
        }
        Ok(())
    }
}

/// The partition of a row dated `timestamp_ms` (epoch milliseconds) in every typed table: its
/// UTC month as `YYYYMM`, what `toYYYYMM` of the `timestamp` column gives in both profiles (see
/// `schema`). The sink splits a batch by it when ClickHouse refuses one insert spanning too many
/// partitions.
pub fn month_utc(timestamp_ms: i64) -> u32 {
    const DAY_MS: i64 = 86_400_000;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = timestamp_ms.div_euclid(DAY_MS) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Years of the window of plausible times fit; a year outside `u32` clamps, still one key.
    u32::try_from(year * 100 + month).unwrap_or(0)
}

/// A decoded row of one of the eight tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    Trade(TradeRow),
    Orderbook(OrderbookRow),
    FundingRate(FundingRateRow),
    OpenInterest(OpenInterestRow),
    Liquidation(LiquidationRow),
    LsrTopPosition(LsrTopPositionRow),
    LsrAllAccount(LsrAllAccountRow),
    VolatilityIndex(VolatilityIndexRow),
}

/// The identities of a row: its natural key (what ReplacingMergeTree collapses on) and its
/// message identity (JetStream stream and sequence).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub table: Table,
    /// The `ORDER BY` columns of the table, rendered and joined with `|`, in key order,
    /// e.g. `binance|spot|BTC-USDT|5321098765`.
    pub natural: String,
    pub nats_stream: String,
    pub nats_seq: u64,
}

impl Row {
    /// The table this row belongs to.
    pub fn table(&self) -> Table {
        match self {
            Row::Trade(_) => Table::Trades,
            Row::Orderbook(_) => Table::Orderbooks,
            Row::FundingRate(_) => Table::FundingRates,
            Row::OpenInterest(_) => Table::OpenInterests,
            Row::Liquidation(_) => Table::Liquidations,
            Row::LsrTopPosition(_) => Table::LsrTopPositions,
            Row::LsrAllAccount(_) => Table::LsrAllAccounts,
            Row::VolatilityIndex(_) => Table::VolatilityIndices,
        }
    }

    /// The natural and message identities of this row (see [`Identity`]).
    pub fn identity(&self) -> Identity {
        let key = |parts: &[&dyn fmt::Display]| {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    out.push('|');
                }
                out.push_str(&part.to_string());
            }
            out
        };
        let (natural, stream, seq) = match self {
            Row::Trade(r) => (
                key(&[&r.exchange, &r.market_type, &r.symbol, &r.trade_id]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::Orderbook(r) => (
                key(&[
                    &r.exchange,
                    &r.market_type,
                    &r.symbol,
                    &r.last_update_id,
                    &r.timestamp,
                ]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::FundingRate(r) => (
                key(&[&r.exchange, &r.market_type, &r.symbol, &r.timestamp]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::OpenInterest(r) => (
                key(&[&r.exchange, &r.market_type, &r.symbol, &r.timestamp]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::Liquidation(r) => (
                key(&[
                    &r.exchange,
                    &r.market_type,
                    &r.symbol,
                    &r.timestamp,
                    &r.liquidation_id,
                ]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::LsrTopPosition(r) => (
                key(&[
                    &r.exchange,
                    &r.market_type,
                    &r.symbol,
                    &r.timestamp,
                    &r.period,
                ]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::LsrAllAccount(r) => (
                key(&[
                    &r.exchange,
                    &r.market_type,
                    &r.symbol,
                    &r.timestamp,
                    &r.period,
                ]),
                &r.nats_stream,
                r.nats_seq,
            ),
            Row::VolatilityIndex(r) => (
                key(&[&r.exchange, &r.market_type, &r.symbol, &r.timestamp]),
                &r.nats_stream,
                r.nats_seq,
            ),
        };
        Identity {
            table: self.table(),
            natural,
            nats_stream: stream.clone(),
            nats_seq: seq,
        }
    }

    /// The row's `timestamp` column (epoch milliseconds): the collector's publish time.
    pub fn timestamp_ms(&self) -> i64 {
        match self {
            Row::Trade(r) => r.timestamp,
            Row::Orderbook(r) => r.timestamp,
            Row::FundingRate(r) => r.timestamp,
            Row::OpenInterest(r) => r.timestamp,
            Row::Liquidation(r) => r.timestamp,
            Row::LsrTopPosition(r) => r.timestamp,
            Row::LsrAllAccount(r) => r.timestamp,
            Row::VolatilityIndex(r) => r.timestamp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_utc_is_the_utc_month_of_the_row_time() {
        // 2025-10-29T05:05:12.456Z, the first and last milliseconds of a month, a leap day.
        assert_eq!(month_utc(1_761_714_312_456), 202_510);
        assert_eq!(month_utc(1_230_768_000_000), 200_901);
        assert_eq!(month_utc(1_230_768_000_000 - 1), 200_812);
        assert_eq!(month_utc(1_709_251_199_999), 202_402);
        assert_eq!(month_utc(1_709_251_200_000), 202_403);
        assert_eq!(month_utc(0), 197_001);
    }

    fn trade_at(timestamp_ms: i64) -> Row {
        let payload = format!(
            r#"{{"trade_id":"1","price":"1.5","quantity":"2","side":"buy","ts_ms":{timestamp_ms}}}"#
        );
        decode("trade.binance.spot.BTC-USDT", payload.as_bytes(), "S", 1).expect("a valid trade")
    }

    #[test]
    fn rows_outside_the_time_window_are_refused_relative_to_their_publish_time() {
        let window = TimeWindow::default();
        let published_ms = 1_761_714_312_456_i64;
        let published_ns = published_ms * 1_000_000;
        let ok = |ts: i64| window.check(&trade_at(ts), published_ns);
        assert_eq!(ok(published_ms), Ok(()));
        assert_eq!(ok(TIMESTAMP_MIN_MS_DEFAULT), Ok(()));
        assert_eq!(ok(published_ms + TIMESTAMP_FUTURE_MAX_MS_DEFAULT), Ok(()));
        for bad in [
            0,
            1_000,
            TIMESTAMP_MIN_MS_DEFAULT - 1,
            published_ms + TIMESTAMP_FUTURE_MAX_MS_DEFAULT + 1,
            i64::MAX,
        ] {
            let error = ok(bad).expect_err("outside the window");
            assert!(
                error.to_string().contains(&bad.to_string()),
                "the reason names the value: {error}"
            );
        }
        // The same row is judged the same whatever the wall clock says: only the publish time counts.
        let far_future = TIMESTAMP_MIN_MS_DEFAULT * 3;
        assert!(ok(far_future).is_err());
        assert_eq!(
            window.check(&trade_at(far_future), far_future * 1_000_000),
            Ok(())
        );
    }

    #[test]
    fn every_data_type_names_its_table_and_back() {
        for data_type in DataType::ALL {
            assert_eq!(data_type.table().data_type(), data_type);
            assert_eq!(DataType::from_name(data_type.name()), Some(data_type));
        }
        for table in Table::ALL {
            assert_eq!(Table::from_name(table.name()), Some(table));
        }
    }

    #[test]
    fn the_first_subject_token_picks_the_data_type() {
        assert_eq!(
            DataType::from_subject("trade.binance.spot.BTC-USDT"),
            Some(DataType::Trade)
        );
        assert_eq!(
            DataType::from_subject("volatility_index.deribit.options.BTC"),
            Some(DataType::VolatilityIndex)
        );
        assert_eq!(
            DataType::from_subject("lsr_all_account.okx.perpetual.BTC-USDT-SWAP"),
            Some(DataType::LsrAllAccount)
        );
        assert_eq!(DataType::from_subject("trades.binance.spot.BTC-USDT"), None);
        assert_eq!(DataType::from_subject("trade"), Some(DataType::Trade));
        assert_eq!(DataType::from_subject(""), None);
    }
}
