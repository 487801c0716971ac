//! [`Envelope`]: the body of every WAL record, a JetStream message, encoded with bincode 1.3.3
//! (default options of `bincode::serialize`: little-endian, fixed-width integers, u64 lengths).
//!
//! Decoding borrows strings and the payload from the record buffer (`Cow::Borrowed`), so the
//! drain reads records without copying payloads. The byte format is pinned by a golden test.

use crate::types::StreamSeq;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// One JetStream message as stored in the WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// JetStream stream name.
    #[serde(borrow)]
    pub stream: Cow<'a, str>,
    /// JetStream stream sequence.
    pub stream_seq: StreamSeq,
    /// NATS subject.
    #[serde(borrow)]
    pub subject: Cow<'a, str>,
    /// Selected headers only (e.g. `Nats-Msg-Id`).
    #[serde(borrow, deserialize_with = "de_headers")]
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// JetStream publish time, unix nanoseconds.
    pub published_ns: i64,
    /// Raw message bytes.
    #[serde(borrow, serialize_with = "ser_bytes", deserialize_with = "de_bytes")]
    pub payload: Cow<'a, [u8]>,
}

impl Envelope<'_> {
    /// The value of the first header named `name`, if there is one (see also
    /// [`crate::RecordRef::subject_and_header`], which reads it without decoding the record).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_ref())
    }

    /// Copies every borrowed field so the envelope outlives its record buffer.
    pub fn into_owned(self) -> Envelope<'static> {
        Envelope {
            stream: Cow::Owned(self.stream.into_owned()),
            stream_seq: self.stream_seq,
            subject: Cow::Owned(self.subject.into_owned()),
            headers: self
                .headers
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), Cow::Owned(v.into_owned())))
                .collect(),
            published_ns: self.published_ns,
            payload: Cow::Owned(self.payload.into_owned()),
        }
    }
}

/// bincode writes `serialize_bytes` exactly like a `[u8]` sequence (u64 length, then the
/// bytes), but in one call instead of one per byte.
#[allow(clippy::ptr_arg)] // serde's serialize_with passes a reference to the field type
fn ser_bytes<S: Serializer>(bytes: &Cow<'_, [u8]>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

fn de_bytes<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Cow<'a, [u8]>, D::Error> {
    struct BytesVisitor;
    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Cow<'de, [u8]>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }
        fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_vec()))
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // Other formats (e.g. JSON) write bytes as a sequence of numbers.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(Cow::Owned(out))
        }
    }
    d.deserialize_bytes(BytesVisitor)
}

/// A header pair whose strings borrow from the input; serde's `borrow` only reaches `Cow`s that
/// are direct fields, not those nested in a `Vec` of tuples. A tuple struct has the same bincode
/// encoding as a tuple.
#[derive(Deserialize)]
struct HeaderDe<'a>(#[serde(borrow)] Cow<'a, str>, #[serde(borrow)] Cow<'a, str>);

#[allow(clippy::type_complexity)] // the field type is fixed by the public API
fn de_headers<'de: 'a, 'a, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<(Cow<'a, str>, Cow<'a, str>)>, D::Error> {
    let pairs: Vec<HeaderDe<'a>> = Vec::deserialize(d)?;
    Ok(pairs.into_iter().map(|HeaderDe(k, v)| (k, v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope<'static> {
        Envelope {
            stream: "MARKET_DATA".into(),
            stream_seq: StreamSeq(42),
            subject: "trade.binance_spot.spot.BTCUSDT".into(),
            headers: vec![("Nats-Msg-Id".into(), "abc".into())],
            published_ns: 1_700_000_000_000_000_000,
            payload: Cow::Borrowed(b"{\"p\":\"1.5\"}"),
        }
    }

    #[test]
    fn decoding_borrows_strings_headers_and_payload_from_the_buffer() {
        let bytes = bincode::serialize(&sample()).unwrap();
        let env: Envelope<'_> = bincode::deserialize(&bytes).unwrap();
        assert_eq!(env, sample());
        assert!(matches!(env.stream, Cow::Borrowed(_)));
        assert!(matches!(env.subject, Cow::Borrowed(_)));
        assert!(matches!(env.headers[0].0, Cow::Borrowed(_)));
        assert!(matches!(env.headers[0].1, Cow::Borrowed(_)));
        assert!(matches!(env.payload, Cow::Borrowed(_)));
    }

    #[test]
    fn payload_bytes_encode_like_a_plain_byte_vector() {
        let env = sample();
        let as_bytes = bincode::serialize(&env).unwrap();
        let as_vec = bincode::serialize(&(
            &*env.stream,
            env.stream_seq.0,
            &*env.subject,
            vec![("Nats-Msg-Id", "abc")],
            env.published_ns,
            env.payload.to_vec(),
        ))
        .unwrap();
        assert_eq!(as_bytes, as_vec);
    }

    #[test]
    fn into_owned_keeps_every_field() {
        let bytes = bincode::serialize(&sample()).unwrap();
        let env: Envelope<'_> = bincode::deserialize(&bytes).unwrap();
        let owned = env.into_owned();
        drop(bytes);
        assert_eq!(owned, sample());
    }
}
