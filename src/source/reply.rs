//! Parsing of the JetStream ack reply subject, which carries a delivered message's metadata.
//!
//! JetStream delivers each message with a reply subject (ADR-15):
//!
//! ```text
//! v1: $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp ns>.<pending>
//! v2: $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp ns>.<pending>[.<token>...]
//! ```
//!
//! The timestamp is the stream's receive time of the message, in unix nanoseconds. Parsing it
//! here keeps the relay independent of the client's choice of date-time crate, and borrows the
//! stream name from the subject instead of copying it.

const PREFIX: &str = "$JS.ACK.";
/// Tokens after the prefix in the v1 format.
const V1_TOKENS: usize = 7;
/// Minimum tokens after the prefix in the v2 format.
const V2_TOKENS_MIN: usize = 9;

/// A delivered message's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckMeta<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    /// Delivery attempt, starting at 1.
    pub delivered: u64,
    pub stream_seq: u64,
    pub consumer_seq: u64,
    /// Stream receive time, unix nanoseconds.
    pub published_ns: i64,
    /// Messages left for the consumer after this one, as the server saw it.
    pub pending: u64,
}

/// Parses a reply subject; `None` when it is not a JetStream ack subject.
pub(crate) fn parse(reply: &str) -> Option<AckMeta<'_>> {
    let rest = reply.strip_prefix(PREFIX)?;
    let tokens: Vec<&str> = rest.split('.').collect();
    let t = match tokens.len() {
        V1_TOKENS => &tokens[..],
        n if n >= V2_TOKENS_MIN => &tokens[2..],
        _ => return None,
    };
    if t[0].is_empty() || t[1].is_empty() {
        return None;
    }
    Some(AckMeta {
        stream: t[0],
        consumer: t[1],
        delivered: t[2].parse().ok()?,
        stream_seq: t[3].parse().ok()?,
        consumer_seq: t[4].parse().ok()?,
        published_ns: t[5].parse().ok()?,
        pending: t[6].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_subject_yields_every_field() {
        let meta = parse("$JS.ACK.MARKET_DATA.prism-relay.2.1234.77.1761714300123000000.9")
            .expect("v1 parses");
        assert_eq!(
            meta,
            AckMeta {
                stream: "MARKET_DATA",
                consumer: "prism-relay",
                delivered: 2,
                stream_seq: 1234,
                consumer_seq: 77,
                published_ns: 1_761_714_300_123_000_000,
                pending: 9,
            }
        );
    }

    #[test]
    fn v2_subject_with_domain_hash_and_trailing_token_yields_the_same_fields() {
        let meta =
            parse("$JS.ACK.hub.AbC123.MARKET_DATA.prism-relay.1.5.6.1761714300123000000.0.xyz")
                .expect("v2 parses");
        assert_eq!(meta.stream, "MARKET_DATA");
        assert_eq!(meta.consumer, "prism-relay");
        assert_eq!(meta.delivered, 1);
        assert_eq!(meta.stream_seq, 5);
        assert_eq!(meta.consumer_seq, 6);
        assert_eq!(meta.pending, 0);
        let meta = parse("$JS.ACK._.AbC123.S.c.1.5.6.7.0").expect("v2 without token");
        assert_eq!((meta.stream, meta.published_ns), ("S", 7));
    }

    #[test]
    fn subjects_that_are_not_ack_subjects_are_rejected() {
        for reply in [
            "",
            "_INBOX.abc",
            "$JS.ACK.S.c.1.2.3",
            "$JS.ACK.S.c.x.2.3.4.5",
            "$JS.ACK.S.c.1.2.3.4.5.6",
            "$JS.ACK..c.1.2.3.4.5",
            "$JS.ACK.S.c.1.-2.3.4.5",
        ] {
            assert_eq!(parse(reply), None, "{reply}");
        }
    }
}
