//! The on-disk format, pinned byte for byte.

use prism_wal::segment::{SEGMENT_HEADER_BYTES, SEGMENT_MAGIC};
use prism_wal::{Envelope, Lsn, StreamSeq, Wal, WalOptions};
use std::borrow::Cow;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn golden_bytes_of_a_segment_header_and_one_record_never_change() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let e = Envelope {
        stream: Cow::Borrowed("MD"),
        stream_seq: StreamSeq(7),
        subject: Cow::Borrowed("t.x"),
        headers: vec![(Cow::Borrowed("Nats-Msg-Id"), Cow::Borrowed("m1"))],
        published_ns: 1_000,
        payload: Cow::Borrowed(b"{}"),
    };
    let r = wal.append(std::slice::from_ref(&e)).await.unwrap();
    assert_eq!((r.first, r.last), (Lsn(1), Lsn(1)));
    wal.close().await.unwrap();
    let bytes = std::fs::read(dir.path().join("00000000000000000001.wal")).unwrap();
    // New with the durable mark, which is not part of the segment format (no version bump):
    // the file `durable` holds magic, the durable LSN and a CRC32 of the LSN.
    let mark = std::fs::read(dir.path().join(prism_wal::DURABLE_MARK_FILE)).unwrap();
    let crc = crc32fast::hash(&1u64.to_le_bytes()).to_le_bytes();
    assert_eq!(
        hex(&mark),
        format!("5052534d44555200{}{}", "0100000000000000", hex(&crc))
    );

    // Header: magic, version 1, header CRC, first LSN 1.
    assert_eq!(&bytes[0..8], &SEGMENT_MAGIC);
    assert_eq!(&bytes[0..8], b"PRSMWAL\0");
    assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
    assert_eq!(&bytes[16..24], &1u64.to_le_bytes());
    // Body: bincode 1.3.3 default options (u64 lengths, little-endian fixed-width integers).
    let mut body = Vec::new();
    body.extend_from_slice(&2u64.to_le_bytes());
    body.extend_from_slice(b"MD");
    body.extend_from_slice(&7u64.to_le_bytes());
    body.extend_from_slice(&3u64.to_le_bytes());
    body.extend_from_slice(b"t.x");
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&11u64.to_le_bytes());
    body.extend_from_slice(b"Nats-Msg-Id");
    body.extend_from_slice(&2u64.to_le_bytes());
    body.extend_from_slice(b"m1");
    body.extend_from_slice(&1000i64.to_le_bytes());
    body.extend_from_slice(&2u64.to_le_bytes());
    body.extend_from_slice(b"{}");
    let rec = &bytes[SEGMENT_HEADER_BYTES..];
    assert_eq!(&rec[0..4], &(body.len() as u32).to_le_bytes());
    assert_eq!(&rec[8..16], &1u64.to_le_bytes());
    assert_eq!(&rec[16..], &body[..]);
    // CRC32 (IEEE) over length, LSN and body.
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[0..4]);
    h.update(&rec[8..16]);
    h.update(&body);
    assert_eq!(&rec[4..8], &h.finalize().to_le_bytes());

    // And the exact bytes, so that no change of any dependency goes unnoticed.
    assert_eq!(
        hex(&bytes),
        GOLDEN,
        "segment bytes changed: the on-disk format is frozen"
    );
}

const GOLDEN: &str = "5052534d57414c000100000038cca6bb0100000000000000540000001981cc75010000000000000002000000000000004d4407000000000000000300000000000000742e7801000000000000000b000000000000004e6174732d4d73672d496402000000000000006d31e80300000000000002000000000000007b7d";

mod subject_and_header {
    use super::*;
    use prism_wal::RecordRef;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = (String, String)> {
        (
            prop_oneof![
                Just("Nats-Msg-Id".to_owned()),
                Just("Prism-Dead-Letter".to_owned()),
                "\\PC{0,12}"
            ],
            "\\PC{0,24}",
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// On every body the full decode accepts, the cheap read finds the same subject and the
        /// same first value of the header asked for.
        #[test]
        fn agrees_with_the_full_decode(
            stream in "\\PC{0,16}",
            seq in any::<u64>(),
            subject in "\\PC{0,48}",
            headers in proptest::collection::vec(header(), 0..4),
            published_ns in any::<i64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            name in prop_oneof![Just("Nats-Msg-Id"), Just("Prism-Dead-Letter"), Just("absent")],
        ) {
            let envelope = Envelope {
                stream: Cow::Owned(stream),
                stream_seq: StreamSeq(seq),
                subject: Cow::Owned(subject),
                headers: headers.into_iter().map(|(k, v)| (Cow::Owned(k), Cow::Owned(v))).collect(),
                published_ns,
                payload: Cow::Owned(payload),
            };
            let body = bincode::serialize(&envelope).unwrap();
            let record = RecordRef { lsn: Lsn(1), body: &body };
            let decoded = record.envelope().unwrap();
            prop_assert_eq!(
                record.subject_and_header(name).unwrap(),
                (decoded.subject.as_ref(), decoded.header(name))
            );
        }

        /// A body cut anywhere before the end of its headers is an error, not a panic or a
        /// read past the body; arbitrary bytes never panic.
        #[test]
        fn a_cut_or_garbled_body_is_an_error_not_a_panic(
            subject in "\\PC{0,48}",
            cut in any::<prop::sample::Index>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let envelope = Envelope {
                stream: Cow::Borrowed("MARKET_TRADES"),
                stream_seq: StreamSeq(9),
                subject: Cow::Owned(subject),
                headers: vec![(Cow::Borrowed("Nats-Msg-Id"), Cow::Borrowed("id-1"))],
                published_ns: 5,
                payload: Cow::Borrowed(b"{}"),
            };
            let body = bincode::serialize(&envelope).unwrap();
            // Everything up to the end of the headers: published_ns (8) and the payload
            // (8 + 2) follow them.
            let headers_end = body.len() - 18;
            let at = cut.index(headers_end);
            let record = RecordRef { lsn: Lsn(3), body: &body[..at] };
            prop_assert!(record.subject_and_header("Nats-Msg-Id").is_err());
            let record = RecordRef { lsn: Lsn(4), body: &garbage };
            let _ = record.subject_and_header("Nats-Msg-Id");
        }
    }
}
