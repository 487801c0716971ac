//! Bytes sent to ClickHouse, compressed and uncompressed, counted on the connection.
//!
//! The `clickhouse` crate builds and compresses each request body itself and says nothing of its
//! size, so the sink's connections count what they write ([`WireBytes`]): every byte on the wire
//! is a *compressed* byte (request heads and HTTP framing included, which is what the network
//! carries), and a [`RequestScanner`] follows the HTTP/1 requests in the written stream to learn
//! the *uncompressed* size of their bodies. An insert's body (`decompress=1` in the request
//! line) is a sequence of ClickHouse compressed blocks, each with a 25-byte header that states
//! its uncompressed size:
//!
//! ```text
//! | checksum 16 B | method 1 B | compressed size u32 LE (header 9 B + data) | uncompressed size u32 LE | data |
//! ```
//!
//! Any other body (a query's text) counts as it is. Bodies are framed by `Content-Length` or
//! chunked transfer encoding. A request the scanner cannot follow (a head longer than
//! [`HEAD_BYTES_MAX`], a malformed chunk size) stops the uncompressed count on that connection
//! only; the compressed count is never affected.

use std::sync::atomic::{AtomicU64, Ordering};

/// Longest request head the scanner keeps to parse (bytes). The sink's heads are a request line
/// with the query settings and a handful of headers: well under 8 KiB.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;

/// Longest chunk-size line (bytes): a hex length with optional extensions.
const CHUNK_LINE_BYTES_MAX: usize = 1024;

/// Header of a ClickHouse compressed block: checksum, method, compressed and uncompressed size.
const BLOCK_HEADER_BYTES: usize = 25;
/// The part of a block's compressed size that is its header without the checksum.
const BLOCK_SIZE_HEADER_BYTES: u64 = 9;

/// Totals of one sink's connections; shared by them.
#[derive(Debug, Default)]
pub struct WireBytes {
    /// Bytes written to ClickHouse connections.
    compressed: AtomicU64,
    /// Request body bytes before compression.
    uncompressed: AtomicU64,
}

impl WireBytes {
    /// Bytes written to the wire so far.
    pub fn compressed(&self) -> u64 {
        self.compressed.load(Ordering::Relaxed)
    }

    /// Request body bytes before compression so far.
    pub fn uncompressed(&self) -> u64 {
        self.uncompressed.load(Ordering::Relaxed)
    }
}

/// Where the scanner is in the written stream.
#[derive(Debug)]
enum State {
    /// Reading a request head (bytes so far).
    Head(Vec<u8>),
    /// Reading a chunk-size line (bytes so far).
    ChunkSize(Vec<u8>),
    /// Inside a chunk's data: this many bytes left.
    ChunkData(u64),
    /// The CR LF after a chunk's data: this many bytes left.
    ChunkEnd(u8),
    /// After the last chunk: trailer lines until an empty one (the current line so far).
    Trailer(Vec<u8>),
    /// Inside a `Content-Length` body: this many bytes left.
    Body(u64),
    /// The stream could not be followed; nothing more is counted as uncompressed.
    Lost,
}

/// The compressed-block reader of an insert body.
#[derive(Debug, Default)]
struct Blocks {
    /// Bytes of the current block header read so far.
    header: Vec<u8>,
    /// Data bytes of the current block still to skip.
    skip: u64,
}

/// Follows the requests written on one connection (see the module documentation).
#[derive(Debug)]
pub struct RequestScanner {
    state: State,
    /// The current body is ClickHouse-compressed.
    compressed_body: bool,
    blocks: Blocks,
}

impl Default for RequestScanner {
    fn default() -> Self {
        RequestScanner {
            state: State::Head(Vec::new()),
            compressed_body: false,
            blocks: Blocks::default(),
        }
    }
}

impl RequestScanner {
    /// Accounts for `bytes`, just written, in `totals`.
    pub fn written(&mut self, bytes: &[u8], totals: &WireBytes) {
        totals
            .compressed
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let uncompressed = self.scan(bytes);
        if uncompressed > 0 {
            totals
                .uncompressed
                .fetch_add(uncompressed, Ordering::Relaxed);
        }
    }

    /// Advances over `bytes`; returns the uncompressed body bytes they completed.
    fn scan(&mut self, mut bytes: &[u8]) -> u64 {
        let mut uncompressed = 0;
        while !bytes.is_empty() {
            match &mut self.state {
                State::Lost => return uncompressed,
                State::Head(head) => {
                    let Some(pos) = line_end(head, bytes, b"\r\n\r\n") else {
                        head.extend_from_slice(bytes);
                        if head.len() > HEAD_BYTES_MAX {
                            self.state = State::Lost;
                        }
                        return uncompressed;
                    };
                    head.extend_from_slice(&bytes[..pos]);
                    bytes = &bytes[pos..];
                    let head = std::mem::take(head);
                    self.state = self.body_state(&head);
                }
                State::ChunkSize(line) => {
                    let Some(pos) = line_end(line, bytes, b"\r\n") else {
                        line.extend_from_slice(bytes);
                        if line.len() > CHUNK_LINE_BYTES_MAX {
                            self.state = State::Lost;
                        }
                        return uncompressed;
                    };
                    line.extend_from_slice(&bytes[..pos]);
                    bytes = &bytes[pos..];
                    let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
                    let hex = text.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(hex, 16) {
                        Ok(0) => State::Trailer(Vec::new()),
                        Ok(size) => State::ChunkData(size),
                        Err(_) => State::Lost,
                    };
                }
                State::ChunkData(left) => {
                    let take = (*left).min(bytes.len() as u64) as usize;
                    *left -= take as u64;
                    let done = *left == 0;
                    uncompressed += self.body(&bytes[..take]);
                    bytes = &bytes[take..];
                    if done {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    let take = usize::from(*left).min(bytes.len());
                    *left -= take as u8;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailer(line) => {
                    let Some(pos) = line_end(line, bytes, b"\r\n") else {
                        line.extend_from_slice(bytes);
                        if line.len() > HEAD_BYTES_MAX {
                            self.state = State::Lost;
                        }
                        return uncompressed;
                    };
                    let empty = line.len() + pos == 2;
                    line.extend_from_slice(&bytes[..pos]);
                    bytes = &bytes[pos..];
                    self.state = if empty {
                        self.end_of_body();
                        State::Head(Vec::new())
                    } else {
                        State::Trailer(Vec::new())
                    };
                }
                State::Body(left) => {
                    let take = (*left).min(bytes.len() as u64) as usize;
                    *left -= take as u64;
                    let done = *left == 0;
                    uncompressed += self.body(&bytes[..take]);
                    bytes = &bytes[take..];
                    if done {
                        self.end_of_body();
                        self.state = State::Head(Vec::new());
                    }
                }
            }
        }
        uncompressed
    }

    /// The state after a request head: its body's framing.
    fn body_state(&mut self, head: &[u8]) -> State {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        self.compressed_body = request_line.contains("decompress=1");
        self.blocks = Blocks::default();
        let mut chunked = false;
        let mut length = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
                chunked = true;
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<u64>().ok();
            }
        }
        match (chunked, length) {
            (true, _) => State::ChunkSize(Vec::new()),
            (false, Some(0)) | (false, None) => State::Head(Vec::new()),
            (false, Some(n)) => State::Body(n),
        }
    }

    /// Body bytes: their uncompressed size.
    fn body(&mut self, mut data: &[u8]) -> u64 {
        if !self.compressed_body {
            return data.len() as u64;
        }
        let mut uncompressed = 0;
        while !data.is_empty() {
            if self.blocks.skip > 0 {
                let take = self.blocks.skip.min(data.len() as u64);
                self.blocks.skip -= take;
                data = &data[take as usize..];
                continue;
            }
            let need = BLOCK_HEADER_BYTES - self.blocks.header.len();
            let take = need.min(data.len());
            self.blocks.header.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.blocks.header.len() == BLOCK_HEADER_BYTES {
                let h = &self.blocks.header;
                let compressed = u32::from_le_bytes([h[17], h[18], h[19], h[20]]);
                let original = u32::from_le_bytes([h[21], h[22], h[23], h[24]]);
                uncompressed += u64::from(original);
                self.blocks.skip = u64::from(compressed).saturating_sub(BLOCK_SIZE_HEADER_BYTES);
                self.blocks.header.clear();
            }
        }
        uncompressed
    }

    fn end_of_body(&mut self) {
        self.compressed_body = false;
        self.blocks = Blocks::default();
    }
}

/// The position in `bytes` just past the first `end` in `held + bytes`, if one ends in `bytes`.
fn line_end(held: &[u8], bytes: &[u8], end: &[u8]) -> Option<usize> {
    // The terminator may straddle what was held and what just arrived: look at the held tail too.
    let tail_start = held.len().saturating_sub(end.len() - 1);
    let mut joined = held[tail_start..].to_vec();
    joined.extend_from_slice(bytes);
    let found = joined.windows(end.len()).position(|w| w == end)?;
    let end_in_joined = found + end.len();
    let held_tail = held.len() - tail_start;
    end_in_joined.checked_sub(held_tail).filter(|&p| p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressed block whose header states `original` uncompressed bytes and carries `data`.
    fn block(original: u32, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b.push(0x82);
        b.extend_from_slice(&((data.len() as u32) + 9).to_le_bytes());
        b.extend_from_slice(&original.to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in body.chunks(chunk) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn chunked_compressed_inserts_and_plain_queries_count_their_uncompressed_bodies_whatever_the_write_sizes(
    ) {
        let mut body = block(1_000, &[7u8; 40]);
        body.extend(block(234, &[9u8; 13]));
        let mut stream = b"POST /?database=d&decompress=1&query=INSERT HTTP/1.1\r\nhost: ch\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        stream.extend(chunked(&body, 17));
        stream.extend_from_slice(
            b"POST /?database=d HTTP/1.1\r\ncontent-length: 11\r\n\r\nSELECT 1+1\n",
        );
        for write in [1, 2, 3, 7, 25, 64, stream.len()] {
            let totals = WireBytes::default();
            let mut scanner = RequestScanner::default();
            for piece in stream.chunks(write) {
                scanner.written(piece, &totals);
            }
            assert_eq!(
                totals.compressed(),
                stream.len() as u64,
                "writes of {write}"
            );
            assert_eq!(totals.uncompressed(), 1_000 + 234 + 11, "writes of {write}");
        }
    }

    #[test]
    fn a_request_head_past_the_bound_stops_only_the_uncompressed_count() {
        let totals = WireBytes::default();
        let mut scanner = RequestScanner::default();
        let junk = vec![b'x'; HEAD_BYTES_MAX + 10];
        scanner.written(&junk, &totals);
        scanner.written(b"\r\n\r\nabc", &totals);
        assert_eq!(totals.compressed(), junk.len() as u64 + 7);
        assert_eq!(totals.uncompressed(), 0);
    }
}
