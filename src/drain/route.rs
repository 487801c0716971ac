//! Routing: which drain lane owns a WAL record, decided from its subject, unless the record is a
//! dead-letter record.
//!
//! The first subject token names the MarketPrism data type (`trade.binance.spot.BTC-USDT`).
//! A typed codec owns the eight known types; `[[drain.passthrough]]` routes send other
//! first tokens to a table as JSONEachRow; anything else is unrouted and goes to dead letters,
//! so a new collector type never blocks the pipeline and is never dropped silently.
//!
//! A *dead-letter record* is one the ingest side wrote in place of a message the WAL cannot take
//! (larger than its record limit) or of a delivery the NATS client cannot read (a subject or
//! headers that are not UTF-8, captured by `source::rescue`): it carries the header [`DEAD_LETTER_HEADER`], whose value is
//! the reason. Whatever its subject, it goes to the unrouted lane, which dead-letters every
//! record, with that reason verbatim ([`Router::route_envelope`], [`dead_letter_reason`]).

use std::collections::BTreeMap;

use prism_wal::{Envelope, RecordRef, WalError};

use crate::codec::{DataType, Table};

/// Name of the lane that collects records no route claims (its rows are dead letters).
pub const UNROUTED_LANE: &str = "_unrouted";

/// Header of a dead-letter record; its value is the reason the message became a dead letter.
/// Ingest and the source's rescue pulls set it; the drain routes on it. Defined here, by the
/// side that interprets it, so the source and the drain share one name.
pub const DEAD_LETTER_HEADER: &str = "Prism-Dead-Letter";

/// The reason a dead-letter record carries, or `None` for an ordinary record.
pub fn dead_letter_reason<'e>(envelope: &'e Envelope<'_>) -> Option<&'e str> {
    envelope.header(DEAD_LETTER_HEADER)
}

/// Where one record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'r> {
    /// A typed MarketPrism table, encoded as RowBinary by its codec.
    Typed(Table),
    /// A passthrough table, inserted as JSONEachRow.
    Passthrough(&'r str),
    /// No route: the record becomes a dead letter.
    Unrouted,
}

impl Route<'_> {
    /// The lane (and ledger cursor) name of this route.
    pub fn lane(&self) -> &str {
        match self {
            Route::Typed(table) => table.name(),
            Route::Passthrough(table) => table,
            Route::Unrouted => UNROUTED_LANE,
        }
    }
}

/// Maps subjects to routes.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// First subject token -> passthrough table.
    passthrough: BTreeMap<String, String>,
}

impl Router {
    /// A router with the typed codecs and the given passthrough routes (first token -> table).
    pub fn new(passthrough: impl IntoIterator<Item = (String, String)>) -> Router {
        Router {
            passthrough: passthrough.into_iter().collect(),
        }
    }

    /// The route of one subject. Typed codecs win over passthrough routes for the same token.
    pub fn route(&self, subject: &str) -> Route<'_> {
        if let Some(data_type) = DataType::from_subject(subject) {
            return Route::Typed(data_type.table());
        }
        let first = subject.split('.').next().unwrap_or(subject);
        match self.passthrough.get(first) {
            Some(table) => Route::Passthrough(table),
            None => Route::Unrouted,
        }
    }

    /// The route of one WAL record: a dead-letter record is unrouted whatever its subject (the
    /// unrouted lane dead-letters everything); any other record is routed by its subject.
    pub fn route_envelope(&self, envelope: &Envelope<'_>) -> Route<'_> {
        self.route_marked(&envelope.subject, dead_letter_reason(envelope).is_some())
    }

    /// [`Router::route_envelope`] of a record, read from its body without decoding the rest
    /// ([`RecordRef::subject_and_header`]): for readers that pass over the records of other lanes.
    pub fn route_record(&self, record: &RecordRef<'_>) -> Result<Route<'_>, WalError> {
        let (subject, dead_letter) = record.subject_and_header(DEAD_LETTER_HEADER)?;
        Ok(self.route_marked(subject, dead_letter.is_some()))
    }

    /// The route of a record with `subject`, marked as a dead letter or not.
    fn route_marked(&self, subject: &str, dead_letter: bool) -> Route<'_> {
        if dead_letter {
            Route::Unrouted
        } else {
            self.route(subject)
        }
    }

    /// Every lane this router can produce, typed tables first.
    pub fn lanes(&self) -> Vec<String> {
        let mut lanes: Vec<String> = Table::ALL.iter().map(|t| t.name().to_string()).collect();
        for table in self.passthrough.values() {
            if !lanes.contains(table) {
                lanes.push(table.clone());
            }
        }
        lanes.push(UNROUTED_LANE.to_string());
        lanes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_data_types_route_to_their_typed_table() {
        let router = Router::default();
        assert_eq!(
            router.route("trade.binance.spot.BTC-USDT"),
            Route::Typed(Table::Trades)
        );
        assert_eq!(
            router.route("volatility_index.deribit.options.BTC").lane(),
            "volatility_indices"
        );
    }

    #[test]
    fn a_dead_letter_record_is_unrouted_whatever_its_subject_and_keeps_its_reason() {
        let router = Router::default();
        let mut envelope = Envelope {
            stream: "MARKET_TRADES".into(),
            stream_seq: prism_wal::StreamSeq(7),
            subject: "trade.binance.spot.BTC-USDT".into(),
            headers: Vec::new(),
            published_ns: 0,
            payload: b"{}".as_slice().into(),
        };
        assert_eq!(
            router.route_envelope(&envelope),
            Route::Typed(Table::Trades)
        );
        assert_eq!(dead_letter_reason(&envelope), None);
        envelope
            .headers
            .push((DEAD_LETTER_HEADER.into(), "too large".into()));
        assert_eq!(router.route_envelope(&envelope), Route::Unrouted);
        assert_eq!(dead_letter_reason(&envelope), Some("too large"));
    }

    #[test]
    fn passthrough_routes_claim_unknown_first_tokens_only() {
        let router = Router::new([("ticker".to_string(), "tickers".to_string())]);
        assert_eq!(
            router.route("ticker.okx.spot.BTC-USDT"),
            Route::Passthrough("tickers")
        );
        assert_eq!(router.route("candles.okx.spot.BTC-USDT"), Route::Unrouted);
        assert!(router.lanes().contains(&"tickers".to_string()));
        assert_eq!(
            router.lanes().last().map(String::as_str),
            Some(UNROUTED_LANE)
        );
    }
}
