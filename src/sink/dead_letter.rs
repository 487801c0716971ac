//! The dead-letter row: a message or row that could not be stored, with the reason.
//!
//! The drain writes one of these for every record it cannot decode and every row ClickHouse
//! rejects for its content (invariant 8), so nothing leaves the pipeline silently. The payload is
//! the original message text, so a dead letter can be inspected and replayed by hand.

use serde::{Deserialize, Serialize};

/// One row of the `dead_letters` table. Field order is the column order of its DDL:
/// `failed_at DateTime64(3)` (Int64 milliseconds on the legacy profile, the same RowBinary bytes),
/// `table String, subject String, nats_stream String, nats_seq UInt64, error String, payload String`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When the failure was recorded, unix milliseconds UTC.
    pub failed_at: i64,
    /// The table the message was meant for (empty when it could not even be routed).
    pub table: String,
    /// The NATS subject the message arrived on.
    pub subject: String,
    /// The JetStream stream and sequence: the message identity, kept for replays and audits.
    pub nats_stream: String,
    /// JetStream stream sequence of the message.
    pub nats_seq: u64,
    /// Why it could not be stored (decoder error or ClickHouse's exception text).
    pub error: String,
    /// The original payload, lossily converted to UTF-8 if it was not text.
    pub payload: String,
}
