//! A connector for the ClickHouse client whose connections refuse endless answers.
//!
//! The `clickhouse` crate reads a response body whole into memory, error bodies included, with no
//! limit of its own. A broken or hostile server (or something in between) that answers with an
//! endless body would grow the relay's memory until the request timeout fires. The relay's requests
//! have small answers (an insert's is empty, a column list is a few kilobytes), so every connection
//! counts the bytes read since the last byte written and fails the read once an answer passes
//! [`ANSWER_BYTES_MAX`]. The HTTP/1 client never pipelines, so the bytes read between two writes
//! belong to one answer. The failed request is a connection error for the sink, which classifies it
//! as retryable: the batch is retried as the same batch, nothing is dead-lettered for it.
//!
//! For an `https://` URL the connection speaks TLS inside the bounded stream ([`super::tls`]), so
//! the bound and the byte counts of [`super::wire`] see the HTTP bytes, not the encrypted ones.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tls::Transport;
use super::wire::{RequestScanner, WireBytes};
use std::sync::Arc;

/// Largest answer the relay reads from ClickHouse, in bytes. Its own answers are kilobytes at
/// most; 16 MiB leaves room for a long exception text or a wide column list while bounding the
/// memory one request can take.
pub const ANSWER_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// An [`HttpConnector`] whose connections bound each answer to `answer_bytes_max` bytes.
#[derive(Debug, Clone)]
pub struct BoundedConnector {
    /// The plain TCP connector (connect timeout, keepalive, nodelay are set on it).
    inner: HttpConnector,
    /// Bytes one answer may take.
    answer_bytes_max: u64,
    /// Bytes written by every connection of this connector (see [`super::wire`]).
    wire: Arc<WireBytes>,
    /// The TLS client for `https://` URIs; `None` refuses them.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl BoundedConnector {
    /// Wraps `inner`, bounding every answer to `answer_bytes_max` bytes.
    pub fn new(inner: HttpConnector, answer_bytes_max: u64) -> BoundedConnector {
        BoundedConnector {
            inner,
            answer_bytes_max,
            wire: Arc::default(),
            tls: None,
        }
    }

    /// Speaks TLS with `config` to `https://` URIs (the inner connector must not enforce the
    /// `http` scheme).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> BoundedConnector {
        self.tls = Some(config);
        self
    }

    /// The byte totals of this connector's connections.
    pub fn wire_bytes(&self) -> Arc<WireBytes> {
        self.wire.clone()
    }
}

/// The future of one connection attempt.
type Connecting = Pin<
    Box<
        dyn Future<
                Output = Result<TokioIo<BoundedStream>, Box<dyn std::error::Error + Send + Sync>>,
            > + Send,
    >,
>;

impl tower_service::Service<hyper::Uri> for BoundedConnector {
    type Response = TokioIo<BoundedStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().to_owned();
        let tls = self.tls.clone();
        let connecting = self.inner.call(uri);
        let answer_bytes_max = self.answer_bytes_max;
        let wire = self.wire.clone();
        Box::pin(async move {
            let io = connecting.await?;
            let inner = match (https, tls) {
                (false, _) => Transport::Plain(io.into_inner()),
                (true, Some(config)) => {
                    Transport::handshake(io.into_inner(), &host, config).await?
                }
                (true, None) => {
                    return Err("an https:// URL needs the sink's TLS configuration".into())
                }
            };
            Ok(TokioIo::new(BoundedStream {
                inner,
                read_since_write: 0,
                answer_bytes_max,
                wire,
                scanner: RequestScanner::default(),
            }))
        })
    }
}

/// A TCP (or TLS) stream that fails a read once more than `answer_bytes_max` bytes arrived since
/// the last write.
#[derive(Debug)]
pub struct BoundedStream {
    /// The connection.
    inner: Transport,
    /// Bytes read since the last successful write: the answer read so far.
    read_since_write: u64,
    /// Bytes one answer may take.
    answer_bytes_max: u64,
    /// Where written bytes are counted.
    wire: Arc<WireBytes>,
    /// Follows the requests written, for the uncompressed count.
    scanner: RequestScanner,
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = (buf.filled().len() - before) as u64;
            this.read_since_write = this.read_since_write.saturating_add(read);
            if this.read_since_write > this.answer_bytes_max {
                return Poll::Ready(Err(io::Error::other(format!(
                    "ClickHouse answer exceeds {} bytes; connection dropped",
                    this.answer_bytes_max
                ))));
            }
        }
        polled
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            if written > 0 {
                // A new request: what is read from now on is its answer.
                this.read_since_write = 0;
                this.scanner.written(&buf[..written], &this.wire);
            }
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = polled {
            if written > 0 {
                this.read_since_write = 0;
                // The bytes written are a prefix of the slices, in order.
                let mut left = written;
                for slice in bufs {
                    let take = left.min(slice.len());
                    this.scanner.written(&slice[..take], &this.wire);
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connection for BoundedStream {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}
