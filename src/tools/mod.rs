//! Operator tools: `loadgen` (publishes realistic MarketPrism traffic into JetStream) and
//! `verify` (compares what a JetStream range holds with what ClickHouse stored).
//!
//! These tools are clients of NATS and ClickHouse that stand outside the relay pipeline,
//! so, unlike the relay's own modules (where only `source`/`ingest` know NATS and only `sink`
//! knows ClickHouse), they talk to `async-nats` and the `clickhouse` crate directly.
//! They share nothing with the pipeline but the MarketPrism conventions spelled out here:
//! subjects `{data_type}.{exchange}.{market_type}.{symbol}`, the eight data types, and the
//! table each data type lands in.
//!
//! The binary wires them as the `loadgen` and `verify` subcommands: each has a
//! `clap::Args` option struct and an `async fn run`.

pub mod gen;
pub mod loadgen;
pub mod prng;
pub mod rate;
pub mod verify;

use std::fmt;
use std::str::FromStr;

/// Errors of the operator tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The options do not make sense together.
    #[error("invalid options: {0}")]
    Options(String),
    /// Connecting to the NATS server failed.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream API call (stream info, create stream, consumer) failed.
    #[error("JetStream {op} failed: {message}")]
    JetStream { op: &'static str, message: String },
    /// A ClickHouse query failed.
    #[error("ClickHouse query on {table} failed: {source}")]
    ClickHouse {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
    /// A table that must be checked does not exist in the database.
    #[error(
        "table {database}.{table} does not exist, but {published} published messages route to it"
    )]
    MissingTable {
        database: String,
        table: String,
        published: u64,
    },
    /// The stream named in the options does not exist.
    #[error("stream {0} does not exist")]
    StreamNotFound(String),
}

impl ToolError {
    pub(crate) fn js(op: &'static str, err: impl fmt::Display) -> Self {
        ToolError::JetStream {
            op,
            message: err.to_string(),
        }
    }
}

/// The eight MarketPrism data types, in the order reports list them.
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
    /// Every data type, in report order.
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

    /// The name used as the first subject token and in the `data_type` field.
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

    /// The ClickHouse table rows of this data type land in.
    pub const fn table(self) -> &'static str {
        match self {
            DataType::Trade => "trades",
            DataType::Orderbook => "orderbooks",
            DataType::FundingRate => "funding_rates",
            DataType::OpenInterest => "open_interests",
            DataType::Liquidation => "liquidations",
            DataType::LsrTopPosition => "lsr_top_positions",
            DataType::LsrAllAccount => "lsr_all_accounts",
            DataType::VolatilityIndex => "volatility_indices",
        }
    }

    /// Position in [`DataType::ALL`], for per-type arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The data type a subject routes to: its first token, if that is one of the eight names.
    pub fn from_subject(subject: &str) -> Option<DataType> {
        let first = subject.split('.').next().unwrap_or(subject);
        first.parse().ok()
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DataType::ALL
            .into_iter()
            .find(|dt| dt.name() == s)
            .ok_or_else(|| format!("unknown data type {s:?}"))
    }
}

/// Connects to NATS with a name that shows up in the server's connection list.
pub(crate) async fn connect_nats(url: &str, name: &str) -> Result<async_nats::Client, ToolError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connect(url)
        .await
        .map_err(|source| ToolError::Connect {
            url: url.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_type_names_round_trip_and_route_subjects_by_first_token() {
        for dt in DataType::ALL {
            assert_eq!(dt.name().parse::<DataType>(), Ok(dt));
            assert_eq!(DataType::ALL[dt.index()], dt);
            let subject = format!("{}.binance.spot.BTC-USDT", dt.name());
            assert_eq!(DataType::from_subject(&subject), Some(dt));
        }
        assert_eq!(DataType::from_subject("ticker.binance.spot.BTC-USDT"), None);
        assert_eq!(DataType::from_subject("trades.binance.spot.BTC-USDT"), None);
        assert_eq!(DataType::from_subject("trade"), Some(DataType::Trade));
    }
}
