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

/// The eight MarketPrism data types, shared with the relay's codec so the tools route subjects
/// exactly as the relay does.
pub use crate::codec::DataType;

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
