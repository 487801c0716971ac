//! From one message to one row: payload structs per data type and the column mapping.
//!
//! Each payload struct names only the fields its row uses, each captured as borrowed raw JSON
//! text ([`Field`]); serde skips every other field without building it. The conversion into
//! column types happens afterwards, field by field, so each error names its field.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::field::{self, Field};
use super::levels::{Asks, Bids, Levels};
use super::rows::*;
use super::{first_token, DataType, DecodeError, Row};

/// `data_source` when the payload does not say.
const DATA_SOURCE_DEFAULT: &str = "marketprism";

/// Declares a payload struct with the fields every MarketPrism message shares, then its own.
macro_rules! payload {
    ($name:ident { $($field:ident),* $(,)? }) => {
        #[derive(Deserialize)]
        struct $name<'a> {
            #[serde(borrow)]
            exchange: Field<'a>,
            #[serde(borrow)]
            market_type: Field<'a>,
            #[serde(borrow)]
            symbol: Field<'a>,
            #[serde(borrow)]
            data_type: Field<'a>,
            #[serde(borrow)]
            ts_ms: Field<'a>,
            #[serde(borrow)]
            data_source: Field<'a>,
            $(
                #[serde(borrow)]
                $field: Field<'a>,
            )*
        }
    };
}

payload!(TradePayload {
    trade_id,
    price,
    quantity,
    side,
    is_maker,
    trade_ts_ms
});
payload!(FundingRatePayload {
    current_funding_rate,
    mark_price,
    index_price,
    next_funding_ts_ms
});
payload!(OpenInterestPayload {
    open_interest_value,
    open_interest_usd,
    count
});
payload!(LiquidationPayload {
    side,
    price,
    quantity,
    liquidation_ts_ms,
    liquidation_id
});
payload!(LsrTopPositionPayload {
    long_short_ratio,
    long_position_ratio,
    short_position_ratio,
    period
});
payload!(LsrAllAccountPayload {
    long_short_ratio,
    long_account_ratio,
    short_account_ratio,
    period
});
payload!(VolatilityIndexPayload {
    vol_index,
    volatility_index,
    currency,
    maturity_date
});

/// The orderbook payload: levels are reduced while being read (see `codec::levels`).
#[derive(Deserialize)]
struct OrderbookPayload<'a> {
    #[serde(borrow)]
    exchange: Field<'a>,
    #[serde(borrow)]
    market_type: Field<'a>,
    #[serde(borrow)]
    symbol: Field<'a>,
    #[serde(borrow)]
    data_type: Field<'a>,
    #[serde(borrow)]
    ts_ms: Field<'a>,
    #[serde(borrow)]
    data_source: Field<'a>,
    #[serde(borrow)]
    last_update_id: Field<'a>,
    bids: Option<Levels<Bids>>,
    asks: Option<Levels<Asks>>,
}

/// The columns every row starts and ends with.
struct Common {
    timestamp: i64,
    exchange: String,
    market_type: String,
    symbol: String,
    data_source: String,
    nats_stream: String,
    nats_seq: u64,
}

/// What [`common`] needs from a payload struct.
struct CommonFields<'a> {
    exchange: Field<'a>,
    market_type: Field<'a>,
    symbol: Field<'a>,
    data_type: Field<'a>,
    ts_ms: Field<'a>,
    data_source: Field<'a>,
}

macro_rules! common_fields {
    ($p:expr) => {
        CommonFields {
            exchange: $p.exchange,
            market_type: $p.market_type,
            symbol: $p.symbol,
            data_type: $p.data_type,
            ts_ms: $p.ts_ms,
            data_source: $p.data_source,
        }
    };
}

/// The message being decoded: where it came from.
struct Message<'s> {
    subject: &'s str,
    data_type: DataType,
    nats_stream: &'s str,
    nats_seq: u64,
}

impl Message<'_> {
    /// Token `index` of `{data_type}.{exchange}.{market_type}.{symbol}`; the symbol is the rest
    /// of the subject, so a symbol with a dot would survive.
    fn subject_token(&self, index: usize) -> Option<&str> {
        self.subject
            .splitn(4, '.')
            .nth(index)
            .filter(|t| !t.is_empty())
    }

    /// A payload string that falls back to a subject token when absent.
    fn string_or_subject(
        &self,
        name: &str,
        raw: Field<'_>,
        token: usize,
    ) -> Result<String, DecodeError> {
        match raw {
            Some(raw) => Ok(field::string(name, raw)?.into_owned()),
            None => self.subject_token(token).map(str::to_owned).ok_or_else(|| {
                DecodeError::MissingField {
                    field: name.to_owned(),
                }
            }),
        }
    }

    fn common(&self, f: CommonFields<'_>) -> Result<Common, DecodeError> {
        if let Some(raw) = f.data_type {
            let named = field::string("data_type", raw)?;
            if named != self.data_type.name() {
                return Err(DecodeError::DataTypeMismatch {
                    subject: self.subject.to_owned(),
                    subject_type: self.data_type,
                    payload: field::excerpt(&named),
                });
            }
        }
        let timestamp = field::req_int("ts_ms", f.ts_ms)?;
        let exchange = self.string_or_subject("exchange", f.exchange, 1)?;
        let market_type = self.string_or_subject("market_type", f.market_type, 2)?;
        let symbol = self.string_or_subject("symbol", f.symbol, 3)?;
        let data_source = match f.data_source {
            Some(raw) => field::string("data_source", raw)?.into_owned(),
            None => DATA_SOURCE_DEFAULT.to_owned(),
        };
        Ok(Common {
            timestamp,
            exchange,
            market_type,
            symbol,
            data_source,
            nats_stream: self.nats_stream.to_owned(),
            nats_seq: self.nats_seq,
        })
    }
}

/// One UTF-8 check of the whole payload, then serde_json's `str` reader, which trusts it: the
/// byte-slice reader checks every string and every raw field again, a few short checks per
/// field (7 % of the relay's CPU while it drained order books).
fn parse<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|e| DecodeError::Json {
        reason: format!("not UTF-8: {e}"),
    })?;
    serde_json::from_str(text).map_err(|e| DecodeError::Json {
        reason: e.to_string(),
    })
}

fn owned(text: Cow<'_, str>) -> String {
    text.into_owned()
}

/// Decodes one MarketPrism message into the row of its table.
///
/// `subject` picks the data type (its first token); `payload` is the JSON message;
/// `nats_stream` and `nats_seq` are the JetStream stream and stream sequence stored in the row
/// as its message identity. The mapping of each column is documented on the row structs.
pub fn decode(
    subject: &str,
    payload: &[u8],
    nats_stream: &str,
    nats_seq: u64,
) -> Result<Row, DecodeError> {
    let token = first_token(subject);
    let Some(data_type) = DataType::from_name(token) else {
        return Err(DecodeError::UnknownDataType {
            subject: field::excerpt(subject),
            data_type: field::excerpt(token),
        });
    };
    let msg = Message {
        subject,
        data_type,
        nats_stream,
        nats_seq,
    };
    match data_type {
        DataType::Trade => trade(&msg, parse(payload)?).map(Row::Trade),
        DataType::Orderbook => orderbook(&msg, parse(payload)?).map(Row::Orderbook),
        DataType::FundingRate => funding_rate(&msg, parse(payload)?).map(Row::FundingRate),
        DataType::OpenInterest => open_interest(&msg, parse(payload)?).map(Row::OpenInterest),
        DataType::Liquidation => liquidation(&msg, parse(payload)?).map(Row::Liquidation),
        DataType::LsrTopPosition => {
            lsr_top_position(&msg, parse(payload)?).map(Row::LsrTopPosition)
        }
        DataType::LsrAllAccount => lsr_all_account(&msg, parse(payload)?).map(Row::LsrAllAccount),
        DataType::VolatilityIndex => {
            volatility_index(&msg, parse(payload)?).map(Row::VolatilityIndex)
        }
    }
}

fn trade(msg: &Message<'_>, p: TradePayload<'_>) -> Result<TradeRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    Ok(TradeRow {
        trade_id: owned(field::req_string("trade_id", p.trade_id)?),
        price: field::req_decimal("price", p.price)?,
        quantity: field::req_decimal("quantity", p.quantity)?,
        side: owned(field::req_string("side", p.side)?),
        is_maker: p
            .is_maker
            .map_or(Ok(false), |raw| field::boolean("is_maker", raw))?,
        trade_time: p
            .trade_ts_ms
            .map_or(Ok(c.timestamp), |raw| field::int("trade_ts_ms", raw))?,
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

fn orderbook(msg: &Message<'_>, p: OrderbookPayload<'_>) -> Result<OrderbookRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    let last_update_id = p
        .last_update_id
        .map_or(Ok(0), |raw| field::uint("last_update_id", raw))?;
    let bids = p.bids.ok_or_else(|| DecodeError::MissingField {
        field: "bids".to_owned(),
    })?;
    if let Some(error) = bids.error {
        return Err(error);
    }
    let asks = p.asks.ok_or_else(|| DecodeError::MissingField {
        field: "asks".to_owned(),
    })?;
    if let Some(error) = asks.error {
        return Err(error);
    }
    let (best_bid_price, best_bid_quantity) = bids.best.unwrap_or((0, 0));
    let (best_ask_price, best_ask_quantity) = asks.best.unwrap_or((0, 0));
    Ok(OrderbookRow {
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        last_update_id,
        bids_count: bids.count,
        asks_count: asks.count,
        best_bid_price,
        best_ask_price,
        best_bid_quantity,
        best_ask_quantity,
        bids: bids.json,
        asks: asks.json,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

fn funding_rate(
    msg: &Message<'_>,
    p: FundingRatePayload<'_>,
) -> Result<FundingRateRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    Ok(FundingRateRow {
        funding_rate: field::req_decimal("current_funding_rate", p.current_funding_rate)?,
        mark_price: field::decimal_or_zero("mark_price", p.mark_price)?,
        index_price: field::decimal_or_zero("index_price", p.index_price)?,
        funding_time: c.timestamp,
        next_funding_time: p
            .next_funding_ts_ms
            .map_or(Ok(0), |raw| field::int("next_funding_ts_ms", raw))?,
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

fn open_interest(
    msg: &Message<'_>,
    p: OpenInterestPayload<'_>,
) -> Result<OpenInterestRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    Ok(OpenInterestRow {
        open_interest: field::req_decimal("open_interest_value", p.open_interest_value)?,
        open_interest_value: field::decimal_or_zero("open_interest_usd", p.open_interest_usd)?,
        count: count(p.count),
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

/// The `count` column: the payload's non-negative integer `count`, else one observation.
/// A malformed `count` is not worth a dead letter for a column that is only a tally.
fn count(raw: Option<&RawValue>) -> u64 {
    raw.and_then(|raw| raw.get().parse::<u64>().ok())
        .unwrap_or(1)
}

fn liquidation(
    msg: &Message<'_>,
    p: LiquidationPayload<'_>,
) -> Result<LiquidationRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    Ok(LiquidationRow {
        side: owned(field::req_string("side", p.side)?),
        price: field::req_decimal("price", p.price)?,
        quantity: field::req_decimal("quantity", p.quantity)?,
        liquidation_time: p
            .liquidation_ts_ms
            .map_or(Ok(c.timestamp), |raw| field::int("liquidation_ts_ms", raw))?,
        liquidation_id: p.liquidation_id.map_or(Ok(String::new()), |raw| {
            field::string("liquidation_id", raw).map(owned)
        })?,
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

fn lsr_top_position(
    msg: &Message<'_>,
    p: LsrTopPositionPayload<'_>,
) -> Result<LsrTopPositionRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    Ok(LsrTopPositionRow {
        long_position_ratio: field::req_decimal("long_position_ratio", p.long_position_ratio)?,
        short_position_ratio: field::req_decimal("short_position_ratio", p.short_position_ratio)?,
        period: owned(field::req_string("period", p.period)?),
        long_short_ratio: field::req_decimal("long_short_ratio", p.long_short_ratio)?,
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

fn lsr_all_account(
    msg: &Message<'_>,
    p: LsrAllAccountPayload<'_>,
) -> Result<LsrAllAccountRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    Ok(LsrAllAccountRow {
        long_account_ratio: field::req_decimal("long_account_ratio", p.long_account_ratio)?,
        short_account_ratio: field::req_decimal("short_account_ratio", p.short_account_ratio)?,
        period: owned(field::req_string("period", p.period)?),
        long_short_ratio: field::req_decimal("long_short_ratio", p.long_short_ratio)?,
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

fn volatility_index(
    msg: &Message<'_>,
    p: VolatilityIndexPayload<'_>,
) -> Result<VolatilityIndexRow, DecodeError> {
    let c = msg.common(common_fields!(p))?;
    let index_value = match (p.vol_index, p.volatility_index) {
        (Some(raw), _) => field::decimal("vol_index", raw)?,
        (None, Some(raw)) => field::decimal("volatility_index", raw)?,
        (None, None) => {
            return Err(DecodeError::MissingField {
                field: "vol_index (or volatility_index)".to_owned(),
            })
        }
    };
    let underlying_asset = match p.currency {
        Some(raw) => owned(field::string("currency", raw)?),
        None => c.symbol.clone(),
    };
    let maturity_date = p
        .maturity_date
        .map_or(Ok(0), |raw| field::date("maturity_date", raw))?;
    Ok(VolatilityIndexRow {
        index_value,
        underlying_asset,
        maturity_date,
        timestamp: c.timestamp,
        exchange: c.exchange,
        market_type: c.market_type,
        symbol: c.symbol,
        data_source: c.data_source,
        nats_stream: c.nats_stream,
        nats_seq: c.nats_seq,
    })
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
