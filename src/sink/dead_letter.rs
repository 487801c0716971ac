//! The dead-letter row: a message or row that could not be stored, with the reason.
//!
//! The drain writes one of these for every record it cannot decode and every row ClickHouse
//! rejects for its content (invariant 8), so nothing leaves the pipeline silently. The payload is
//! kept byte for byte (it may not even be UTF-8, which is often why it failed), so a dead letter
//! can be inspected and replayed by hand.

use serde::{Deserialize, Serialize};

/// One row of the `dead_letters` table. Field order is the column order of its DDL:
/// `failed_at DateTime64(3)`, `published_at DateTime64(3)` (Int64 milliseconds on the legacy
/// profile, the same RowBinary bytes), `table String, subject String, nats_stream String,
/// nats_seq UInt64, error String, payload String, wal_lsn UInt64`.
///
/// Everything but `failed_at` derives from the record, so a dead letter written again (a batch
/// retried or re-cut after a crash) is the same row: the table is partitioned by `published_at`,
/// not by `failed_at`, so both copies land in the same partition and collapse under `FINAL`, and
/// a retried batch of them splits into the same parts.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When the failure was recorded, unix milliseconds UTC.
    pub failed_at: i64,
    /// JetStream publish time of the message, unix milliseconds UTC; the partition key.
    pub published_at: i64,
    /// The table the message was meant for (empty when it could not even be routed).
    pub table: String,
    /// The NATS subject the message arrived on.
    pub subject: String,
    /// The JetStream stream of the message; with `nats_seq` the message identity.
    pub nats_stream: String,
    /// JetStream stream sequence of the message.
    pub nats_seq: u64,
    /// Why it could not be stored (decoder error or ClickHouse's exception text).
    pub error: String,
    /// The original payload, exactly as received.
    #[serde(with = "raw_bytes")]
    pub payload: Vec<u8>,
    /// The WAL LSN of the record the dead letter comes from, so that the range of a batch of
    /// dead letters can be replayed in one command (`prism-relay replay --from-lsn --to-lsn`)
    /// once their cause is fixed. A dead letter written again derives it from the same record.
    pub wal_lsn: u64,
}

/// A ClickHouse `String` is any byte sequence and RowBinary encodes it like a byte slice
/// (length, bytes), so the payload is serialized as bytes: no lossy UTF-8 conversion.
mod raw_bytes {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Raw;
        impl Visitor<'_> for Raw {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: Error>(self, value: &[u8]) -> Result<Vec<u8>, E> {
                Ok(value.to_owned())
            }

            fn visit_byte_buf<E: Error>(self, value: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(value)
            }

            fn visit_str<E: Error>(self, value: &str) -> Result<Vec<u8>, E> {
                Ok(value.as_bytes().to_owned())
            }
        }
        deserializer.deserialize_byte_buf(Raw)
    }
}
