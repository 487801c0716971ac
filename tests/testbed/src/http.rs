//! A tiny blocking HTTP/1.1 client over `std::net::TcpStream`, enough for readiness
//! probes and ClickHouse queries: one request per connection (`Connection: close`),
//! a body with `Content-Length`, and responses framed by length, chunks or EOF.
//! The whole exchange is bounded by one deadline, so a paused server cannot hang a test.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::TestbedError;

/// Largest response accepted; test-bed answers are small, and a bound keeps a
/// misbehaving server from eating the test's memory.
pub(crate) const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Size of one read from the socket.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// A parsed response.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    /// ClickHouse's `X-ClickHouse-Exception-Code` header, when the answer has one.
    pub(crate) exception_code: Option<String>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs `sql` on the ClickHouse HTTP interface at `127.0.0.1:port` within `timeout` and returns
/// the response body; an answer other than 200 is a [`TestbedError::Query`] carrying the
/// exception text. Shared by the 18.16 server and the modern engine's stand-in.
pub(crate) fn query(port: u16, sql: &str, timeout: Duration) -> Result<String, TestbedError> {
    let response = request(port, "POST", "/", sql.as_bytes(), timeout)?;
    if response.status == 200 {
        Ok(response.body_text())
    } else {
        Err(TestbedError::Query {
            status: response.status,
            exception: response.body_text().trim().to_owned(),
        })
    }
}

/// Sends one request to `127.0.0.1:port` and reads the whole response, all within `timeout`.
pub(crate) fn request(
    port: u16,
    method: &'static str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Response, TestbedError> {
    let http_err = |source: io::Error| TestbedError::Http {
        method,
        port,
        path: path.to_owned(),
        source,
    };
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(http_err)?;
    stream.set_nodelay(true).map_err(http_err)?;

    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Content-Type: text/plain; charset=UTF-8\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    stream
        .set_write_timeout(Some(remaining(deadline).map_err(http_err)?))
        .map_err(http_err)?;
    stream.write_all(&out).map_err(http_err)?;

    let mut raw = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline).map_err(http_err)?))
            .map_err(http_err)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&chunk[..n]);
                if raw.len() > RESPONSE_BYTES_MAX {
                    return Err(TestbedError::MalformedResponse {
                        port,
                        reason: format!("response exceeds {RESPONSE_BYTES_MAX} bytes"),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(http_err(e)),
        }
    }
    parse_response(&raw).map_err(|reason| TestbedError::MalformedResponse { port, reason })
}

/// Time left until `deadline`, or a `TimedOut` error once it has passed
/// (a zero socket timeout would mean "block forever").
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok(left)
    }
}

/// Parses a complete response read until EOF.
pub(crate) fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;

    let mut chunked = false;
    let mut content_length = None;
    let mut exception_code = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("x-clickhouse-exception-code") {
            exception_code = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        }
    }

    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len)
            .ok_or_else(|| format!("body has {} of {len} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        exception_code,
        body,
    })
}

/// Decodes a chunked body (chunk extensions and trailers are ignored).
fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("chunk size line is cut off")?;
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "chunk size is not UTF-8")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let data = rest
            .get(..size)
            .ok_or_else(|| format!("chunk has {} of {size} bytes", rest.len()))?;
        body.extend_from_slice(data);
        rest = rest
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or("chunk is not followed by CRLF")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body_is_reassembled_and_extensions_are_ignored() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"abcde");
    }

    #[test]
    fn content_length_limits_the_body() {
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nOk.trailing";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.body, b"Ok.");
    }

    #[test]
    fn body_without_framing_runs_to_the_end_of_the_stream() {
        let response = parse_response(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nall of it").unwrap();
        assert_eq!(response.body, b"all of it");
    }

    #[test]
    fn truncated_chunk_is_reported_not_returned() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        assert!(parse_response(raw).is_err());
    }

    #[test]
    fn garbage_is_not_a_response() {
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
