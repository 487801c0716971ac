//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their corpus:
//! both run exactly this code. Not part of the supported API.

use crate::fault::FaultyFs;
use crate::segment::{decode_header, decode_record, SEGMENT_HEADER_BYTES};
use crate::types::Lsn;
use crate::{Envelope, Wal, WalOptions};
use std::path::Path;
use std::sync::Arc;

/// Arbitrary bytes through the segment header check, the record framing and envelope decoding:
/// must never panic; every record accepted must re-encode to the same framing.
pub fn record_decode(data: &[u8]) {
    let _ = decode_header(data);
    let mut rest = data;
    let mut expected = None;
    while let Ok(f) = decode_record(rest, expected) {
        assert!(f.bytes <= rest.len() && f.body.len() <= crate::RECORD_BYTES_MAX);
        if let Ok(env) = bincode::deserialize::<Envelope<'_>>(f.body) {
            // A body that decodes re-encodes to a valid record of the same LSN.
            let mut again = Vec::new();
            if crate::segment::encode_record(&mut again, f.lsn, &env).is_ok() {
                let g = decode_record(&again, Some(f.lsn)).map_err(|e| format!("{e:?}"));
                assert!(g.is_ok(), "re-encoded record does not decode: {g:?}");
            }
        }
        rest = &rest[f.bytes..];
        expected = Some(f.lsn.next());
    }
    // Envelopes straight from the bytes, too.
    check_subject_and_header(crate::RecordRef {
        lsn: Lsn(1),
        body: data,
    });
}

/// Whatever a body holds, the cheap read of a router never panics, and where the full decode
/// succeeds, both find the same subject and header value.
fn check_subject_and_header(record: crate::RecordRef<'_>) {
    let cheap = record.subject_and_header("Nats-Msg-Id");
    if let Ok(envelope) = record.envelope() {
        assert_eq!(
            cheap.ok(),
            Some((envelope.subject.as_ref(), envelope.header("Nats-Msg-Id"))),
            "the subject and header read disagree with the decoded envelope"
        );
    }
}

/// Arbitrary bytes as the only segment of a WAL directory on the in-memory disk: opening
/// (recovery), reading everything, verifying and dumping must never panic, and every record
/// handed out must be one whose framing and CRC check in the original bytes.
pub fn recovery(data: &[u8]) {
    let dir = Path::new("/fuzz");
    // Name the segment after the first LSN its header claims, so the fuzzer gets past the
    // name check; fall back to 1.
    let first = decode_header(data)
        .ok()
        .filter(|l| l.0 > 0)
        .unwrap_or(Lsn(1));
    let fs = FaultyFs::new();
    let path = dir.join(crate::segment::segment_file_name(crate::SegmentId(first.0)));
    {
        use crate::fs::FileSystem;
        if fs.create_dir_all(dir).is_err() || fs.create(&path).is_err() {
            return;
        }
    }
    if fs.corrupt(&path, 0, data).is_err() {
        return;
    }
    // What a correct reader may hand out: the valid records of the bytes, in order.
    let mut valid = Vec::new();
    if data.len() >= SEGMENT_HEADER_BYTES && decode_header(data) == Ok(first) {
        let mut rest = &data[SEGMENT_HEADER_BYTES..];
        let mut expected = first;
        while let Ok(f) = decode_record(rest, Some(expected)) {
            valid.push((f.lsn, f.body.to_vec()));
            expected = f.lsn.next();
            rest = &rest[f.bytes..];
        }
    }
    let _ = crate::verify_with_fs(&fs, dir);
    let _ = crate::list_segments_with_fs(&fs, dir);
    if let Ok(mut r) = crate::read_dir_with_fs(Arc::new(fs.clone()), dir, Lsn(0)) {
        check_reader(&mut r, &valid);
    }
    let opts = WalOptions {
        segment_bytes_max: 4096,
        group_bytes_max: 4096,
        ..WalOptions::default()
    };
    if let Ok((wal, _)) = Wal::open_with_fs(dir, opts, Arc::new(fs.clone())) {
        if let Ok(mut r) = wal.reader(Lsn(0)) {
            check_reader(&mut r, &valid);
        }
    }
}

fn check_reader(r: &mut crate::Reader, valid: &[(Lsn, Vec<u8>)]) {
    let mut i = 0;
    while let Ok(Some(rec)) = r.next() {
        let Some((lsn, body)) = valid.get(i) else {
            panic!("record {} handed out beyond the valid records", rec.lsn);
        };
        assert_eq!(
            (rec.lsn, rec.body),
            (*lsn, &body[..]),
            "handed out a record that does not check"
        );
        check_subject_and_header(rec);
        i += 1;
    }
}
