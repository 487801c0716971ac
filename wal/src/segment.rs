//! Segment files: naming, the header and the record framing, and a buffered scanner that
//! validates records one by one.
//!
//! A WAL directory holds segments named by the LSN of their first record, zero-padded to 20
//! digits so that name order is LSN order, plus the ledger:
//!
//! ```text
//! wal/
//!   00000000000000000001.wal   sealed segment, LSNs 1..=4711
//!   00000000000000004712.wal   active segment (the writer appends here)
//!   ledger                     cursors and in-flight batches (see the ledger module)
//!   durable                    the live writer's durable LSN, for offline readers (never synced)
//!   LOCK                       flock'ed by the writer; never written
//!   quarantine/                corrupt segments moved aside by an operator, and gap notes
//! ```
//!
//! Layout of one segment (all integers little-endian, fixed width):
//!
//! ```text
//! +--------------------------- header, 24 bytes ----------------------------+
//! | magic "PRSMWAL\0" (8) | version u32 | header crc u32 | first_lsn u64       |
//! +-------------------------------------------------------------------------+
//! | record: len u32 | crc u32 | lsn u64 | body (len bytes)                   |
//! | record: len u32 | crc u32 | lsn u64 | body                               |
//! | ...                                                                      |
//! +-------------------------------------------------------------------------+
//!
//! header crc = CRC32 (IEEE, crc32fast) of magic, version and first_lsn
//! record crc = CRC32 of len, lsn and body (everything of the record but the crc itself)
//! body       = bincode 1.3.3 of an Envelope, 1..=RECORD_BYTES_MAX bytes
//! ```
//!
//! LSNs inside a segment are consecutive from `first_lsn`. The log ends at the first record that
//! is short, has length zero, fails its CRC or carries an unexpected LSN. In the last segment
//! that end is a torn tail (a write the crash interrupted, never acknowledged) and recovery
//! truncates it, within the bound below; anywhere before the durable end it is corruption.
//!
//! A segment grows past `segment_bytes_max` by at most one group commit: the writer rolls to a
//! new segment before a group once the active one has reached the limit, so a group always
//! goes to one file. A group is written and synced in chunks of at most `group_bytes_max` bytes
//! (or one larger record), so a torn tail is never longer than that; a bad record followed by
//! more, or one the ledger has consumed, is corruption, reported and never truncated.

use crate::fs::{read_full_at, WalFile};
use crate::types::{Lsn, SegmentId};
use crate::RECORD_BYTES_MAX;
use std::io;

/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"PRSMWAL\0";
/// Version of the segment format.
pub const SEGMENT_VERSION: u32 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 24;
/// Size of a record header (length, CRC, LSN).
pub const RECORD_HEADER_BYTES: usize = 16;
/// File name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".wal";
/// Digits of the zero-padded first LSN in a segment name.
const SEGMENT_NAME_DIGITS: usize = 20;

const _: () = assert!(SEGMENT_HEADER_BYTES == 8 + 4 + 4 + 8);
const _: () = assert!(RECORD_HEADER_BYTES == 4 + 4 + 8);

/// The file name of a segment.
pub fn segment_file_name(id: SegmentId) -> String {
    format!("{:020}{SEGMENT_SUFFIX}", id.0)
}

/// Parses a segment file name; `None` for anything else.
pub fn parse_segment_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    (n > 0).then_some(SegmentId(n))
}

/// Encodes a segment header.
pub fn encode_header(first_lsn: Lsn) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_lsn.0.to_le_bytes());
    let crc = header_crc(&h);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn header_crc(h: &[u8; SEGMENT_HEADER_BYTES]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[0..12]);
    c.update(&h[16..24]);
    c.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The format version of a whole header whose magic and checksum hold, whatever the version;
/// `None` for a short or damaged header. A header of another version is then known to be written
/// on purpose by another build, not torn by a crash.
pub fn header_version(h: &[u8]) -> Option<u32> {
    let h = h.get(..SEGMENT_HEADER_BYTES)?;
    if h[0..8] != SEGMENT_MAGIC {
        return None;
    }
    let mut arr = [0u8; SEGMENT_HEADER_BYTES];
    arr.copy_from_slice(h);
    (u32_at(h, 12) == header_crc(&arr)).then(|| u32_at(h, 8))
}

/// Checks a segment header; returns its first LSN or what is wrong.
pub fn decode_header(h: &[u8]) -> Result<Lsn, String> {
    let Some(h) = h.get(..SEGMENT_HEADER_BYTES) else {
        return Err(format!(
            "header is {} bytes, expected {SEGMENT_HEADER_BYTES}",
            h.len()
        ));
    };
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad magic".to_string());
    }
    let version = u32_at(h, 8);
    if version != SEGMENT_VERSION {
        return Err(format!(
            "format version {version}, this build reads version {SEGMENT_VERSION}"
        ));
    }
    let mut arr = [0u8; SEGMENT_HEADER_BYTES];
    arr.copy_from_slice(h);
    if u32_at(h, 12) != header_crc(&arr) {
        return Err("header checksum mismatch".to_string());
    }
    Ok(Lsn(u64_at(h, 16)))
}

/// Appends one framed record to `buf`, encoding the envelope in place (no intermediate buffer).
/// On error `buf` is left as it was.
pub fn encode_record(
    buf: &mut Vec<u8>,
    lsn: Lsn,
    env: &crate::Envelope<'_>,
) -> Result<(), crate::WalError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    if let Err(e) = bincode::serialize_into(&mut *buf, env) {
        buf.truncate(start);
        return Err(crate::WalError::Encode {
            reason: e.to_string(),
        });
    }
    let body_len = buf.len() - start - RECORD_HEADER_BYTES;
    if body_len == 0 || body_len > RECORD_BYTES_MAX {
        buf.truncate(start);
        return Err(crate::WalError::RecordTooLarge {
            bytes: body_len,
            bytes_max: RECORD_BYTES_MAX,
        });
    }
    // Cannot truncate: checked against RECORD_BYTES_MAX, which fits in u32 (const assertion).
    let len = body_len as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&lsn.0.to_le_bytes());
    let crc = record_crc(
        &buf[start..start + 4],
        &buf[start + 8..start + 16],
        &buf[start + RECORD_HEADER_BYTES..],
    );
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn record_crc(len: &[u8], lsn: &[u8], body: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(len);
    c.update(lsn);
    c.update(body);
    c.finalize()
}

/// One framed record parsed from a byte slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    /// The record's LSN.
    pub lsn: Lsn,
    /// The record's body.
    pub body: &'a [u8],
    /// Bytes the record occupies (header and body).
    pub bytes: usize,
}

/// Why framing stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEnd {
    /// No bytes left.
    Clean,
    /// The bytes left do not form a valid record.
    Invalid(String),
}

/// Parses and checks the record at the start of `bytes`. `expected` is the LSN it must carry.
pub fn decode_record(bytes: &[u8], expected: Option<Lsn>) -> Result<Framed<'_>, FrameEnd> {
    if bytes.is_empty() {
        return Err(FrameEnd::Clean);
    }
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(FrameEnd::Invalid(format!(
            "short record header ({} bytes)",
            bytes.len()
        )));
    }
    let len = u32_at(bytes, 0) as usize;
    if len == 0 {
        return Err(FrameEnd::Invalid("zero record length".to_string()));
    }
    if len > RECORD_BYTES_MAX {
        return Err(FrameEnd::Invalid(format!(
            "record length {len} exceeds {RECORD_BYTES_MAX}"
        )));
    }
    let total = RECORD_HEADER_BYTES + len;
    if bytes.len() < total {
        return Err(FrameEnd::Invalid(format!(
            "short record: {} of {total} bytes",
            bytes.len()
        )));
    }
    let lsn = Lsn(u64_at(bytes, 8));
    let body = &bytes[RECORD_HEADER_BYTES..total];
    if u32_at(bytes, 4) != record_crc(&bytes[0..4], &bytes[8..16], body) {
        return Err(FrameEnd::Invalid("record checksum mismatch".to_string()));
    }
    if let Some(e) = expected {
        if lsn != e {
            return Err(FrameEnd::Invalid(format!(
                "lsn {lsn} where {e} was expected"
            )));
        }
    }
    Ok(Framed {
        lsn,
        body,
        bytes: total,
    })
}

/// One step of a [`SegmentScan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// A valid record: its LSN, its offset in the file, and where its body sits in the buffer.
    Record {
        lsn: Lsn,
        offset: u64,
        body_start: usize,
        body_len: usize,
    },
    /// The scan reached its byte limit exactly.
    End,
    /// The bytes at `offset` are not a valid record.
    Invalid { offset: u64, reason: String },
}

/// A forward scan over the records of one segment through a read buffer.
pub(crate) struct SegmentScan {
    pub(crate) id: SegmentId,
    file: std::sync::Arc<dyn WalFile>,
    /// Read buffer; only `buf[..valid]` holds file bytes. It keeps its length between reads so
    /// that a refill does not zero a megabyte before the read overwrites it.
    buf: Vec<u8>,
    /// Bytes of `buf` read from the file.
    valid: usize,
    /// File offset of `buf[0]`.
    buf_offset: u64,
    /// File offset of the next record.
    pub(crate) pos: u64,
    /// LSN the next record must carry.
    pub(crate) expected: Lsn,
}

impl SegmentScan {
    /// Reads and checks the header. `Err(reason)` when the header is bad or short.
    pub(crate) fn open(
        id: SegmentId,
        file: std::sync::Arc<dyn WalFile>,
    ) -> io::Result<Result<Self, String>> {
        let mut h = [0u8; SEGMENT_HEADER_BYTES];
        let n = read_full_at(&*file, &mut h, 0)?;
        match decode_header(&h[..n]) {
            Ok(first) if first.0 == id.0 => {}
            Ok(first) => {
                return Ok(Err(format!(
                    "header says first lsn {first}, name says {}",
                    id.0
                )))
            }
            Err(reason) => return Ok(Err(reason)),
        }
        Ok(Ok(SegmentScan {
            id,
            file,
            buf: Vec::new(),
            valid: 0,
            buf_offset: SEGMENT_HEADER_BYTES as u64,
            pos: SEGMENT_HEADER_BYTES as u64,
            expected: id.first_lsn(),
        }))
    }

    /// Makes `[pos, pos + n)` available in the buffer, reading at most up to `limit`. Returns
    /// how many bytes from `pos` are available (less than `n` at the limit or end of file).
    fn fill(&mut self, n: usize, limit: u64) -> io::Result<usize> {
        let have_end = self.buf_offset + self.valid as u64;
        if self.pos >= self.buf_offset && self.pos + n as u64 <= have_end {
            return Ok(n);
        }
        let want =
            (limit.saturating_sub(self.pos)).min(n.max(crate::READ_CHUNK_BYTES) as u64) as usize;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        // Until the read succeeds the buffer holds nothing valid.
        self.valid = 0;
        let got = read_full_at(&*self.file, &mut self.buf[..want], self.pos)?;
        self.valid = got;
        self.buf_offset = self.pos;
        Ok(got.min(n))
    }

    /// Reads the next record, considering only bytes before `limit`.
    pub(crate) fn step(&mut self, limit: u64) -> io::Result<Step> {
        if self.pos >= limit {
            return Ok(Step::End);
        }
        let offset = self.pos;
        let avail = self.fill(RECORD_HEADER_BYTES, limit)?;
        if avail < RECORD_HEADER_BYTES {
            return Ok(Step::Invalid {
                offset,
                reason: format!("short record header ({avail} bytes)"),
            });
        }
        let rel = (self.pos - self.buf_offset) as usize;
        let len = u32_at(&self.buf[..self.valid], rel) as usize;
        // Checked here, before sizing a read by it, so a garbled length costs no allocation.
        if len == 0 || len > RECORD_BYTES_MAX {
            return Ok(Step::Invalid {
                offset,
                reason: format!("bad record length {len}"),
            });
        }
        let total = RECORD_HEADER_BYTES + len;
        let avail = self.fill(total, limit)?;
        if avail < total {
            return Ok(Step::Invalid {
                offset,
                reason: format!("short record: {avail} of {total} bytes"),
            });
        }
        let rel = (self.pos - self.buf_offset) as usize;
        match decode_record(&self.buf[rel..rel + total], Some(self.expected)) {
            Ok(f) => {
                self.pos += total as u64;
                self.expected = f.lsn.next();
                Ok(Step::Record {
                    lsn: f.lsn,
                    offset,
                    body_start: rel + RECORD_HEADER_BYTES,
                    body_len: len,
                })
            }
            Err(FrameEnd::Invalid(reason)) => Ok(Step::Invalid { offset, reason }),
            Err(FrameEnd::Clean) => Ok(Step::End),
        }
    }

    /// Current length of the file.
    pub(crate) fn file_len(&self) -> io::Result<u64> {
        self.file.len()
    }

    /// The body of the record the last [`Step::Record`] described.
    pub(crate) fn body(&self, start: usize, len: usize) -> &[u8] {
        &self.buf[start..start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, StreamSeq};
    use std::borrow::Cow;

    #[test]
    fn segment_names_round_trip_and_sort_by_lsn() {
        let a = segment_file_name(SegmentId(1));
        assert_eq!(a, "00000000000000000001.wal");
        assert_eq!(parse_segment_name(&a), Some(SegmentId(1)));
        assert!(segment_file_name(SegmentId(9)) < segment_file_name(SegmentId(10)));
        assert_eq!(parse_segment_name("ledger"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.wal"), None);
        assert_eq!(parse_segment_name("00000000000000000000.wal"), None);
    }

    #[test]
    fn header_round_trips_and_rejects_a_flipped_bit() {
        let h = encode_header(Lsn(77));
        assert_eq!(decode_header(&h), Ok(Lsn(77)));
        let mut bad = h;
        bad[20] ^= 1;
        assert!(decode_header(&bad).is_err());
        assert!(decode_header(&h[..10]).is_err());
    }

    #[test]
    fn record_round_trips_and_every_single_bit_flip_is_detected() {
        let env = Envelope {
            stream: "S".into(),
            stream_seq: StreamSeq(1),
            subject: "a.b".into(),
            headers: vec![],
            published_ns: 5,
            payload: Cow::Borrowed(b"xyz"),
        };
        let mut buf = Vec::new();
        encode_record(&mut buf, Lsn(3), &env).unwrap();
        let f = decode_record(&buf, Some(Lsn(3))).unwrap();
        assert_eq!(f.bytes, buf.len());
        assert_eq!(bincode::deserialize::<Envelope<'_>>(f.body).unwrap(), env);
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                decode_record(&b, Some(Lsn(3))).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
        assert!(matches!(
            decode_record(&buf, Some(Lsn(4))),
            Err(FrameEnd::Invalid(_))
        ));
    }
}
