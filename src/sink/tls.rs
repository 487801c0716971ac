//! TLS to ClickHouse: the transport of the sink's bounded connections for `https://` URLs.
//!
//! An `https://` URL gets a rustls client ([`crate::tls::client_config`]: ring provider, TLS 1.2
//! and 1.3) that verifies the server's certificate against the CA certificates of
//! `tls_ca_file`, or the system's roots when none is given, and presents a client certificate
//! when `tls_cert_file` and `tls_key_file` are set. [`super::bounded::BoundedConnector`] runs
//! the handshake right after the TCP connect and wraps the resulting [`Transport`], so the answer
//! bound and the byte counts of [`super::wire`] see the HTTP bytes inside the TLS, and the TCP
//! connect timeout holds for HTTPS as for HTTP.
//!
//! A handshake that rustls refuses (a certificate the configured CA does not sign, a name that
//! does not match, a server that speaks plain HTTP on the port) is not cured by waiting:
//! [`Transport::handshake`] turns it into a [`HandshakeError`], which [`is_handshake_failure`] finds in any error
//! chain, so the sink's classification can tell it from a refused or reset connection.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub use crate::tls::{client_config, TlsError, TlsFiles};

/// rustls refused the TLS handshake with the server: its certificate is not signed by a trusted
/// CA, names another host, has expired, or the server does not speak TLS on that port. Waiting
/// does not cure it; the configuration or the server's certificate must change.
#[derive(Debug)]
pub struct HandshakeError {
    /// The host the connection was for.
    pub host: String,
    /// rustls' reason.
    pub detail: String,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLS handshake with {} failed: {}; check clickhouse.tls_ca_file against the server's certificate and that the port serves HTTPS",
            self.host, self.detail
        )
    }
}

impl std::error::Error for HandshakeError {}

/// True when `error` or one of its sources is a [`HandshakeError`].
pub fn is_handshake_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(cause) = current {
        if cause.is::<HandshakeError>() {
            return true;
        }
        current = cause.source();
    }
    false
}

/// The transport under a bounded connection: plain TCP for `http://`, TLS over TCP for
/// `https://`.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    /// Runs the TLS handshake with `host` over `tcp`. A refusal by rustls becomes a
    /// [`HandshakeError`]; an I/O failure during the handshake stays an I/O error (retryable).
    pub async fn handshake(
        tcp: TcpStream,
        host: &str,
        config: Arc<ClientConfig>,
    ) -> Result<Transport, Box<dyn std::error::Error + Send + Sync>> {
        // hyper's URI keeps the brackets of an IPv6 literal; a server name has none.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned()).map_err(|error| HandshakeError {
            host: host.to_owned(),
            detail: format!("not a TLS server name: {error}"),
        })?;
        match tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
        {
            Ok(stream) => Ok(Transport::Tls(Box::new(stream))),
            Err(error) => Err(match rustls_reason(&error) {
                Some(detail) => Box::new(HandshakeError {
                    host: host.to_owned(),
                    detail,
                }),
                None => Box::new(error),
            }),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(tcp) => tcp.is_write_vectored(),
            Transport::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for Transport {
    fn connected(&self) -> Connected {
        match self {
            Transport::Plain(tcp) => tcp.connected(),
            Transport::Tls(tls) => tls.get_ref().0.connected(),
        }
    }
}

/// rustls' refusal inside a handshake error, if that is what it is. tokio-rustls reports it as an
/// `io::Error` carrying the `rustls::Error` (possibly wrapped once more), and an `io::Error`'s
/// `source` skips the error it wraps, so the wrapped errors are opened by hand.
fn rustls_reason(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    // Bounded: the nesting is two io::Errors deep; a longer chain is not a handshake refusal.
    for _ in 0..4 {
        let cause = current?;
        if let Some(refused) = cause.downcast_ref::<rustls::Error>() {
            return Some(refused.to_string());
        }
        current = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_failure_is_found_through_error_sources() {
        #[derive(Debug)]
        struct Outer(HandshakeError);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "network error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let outer = Outer(HandshakeError {
            host: "ch".into(),
            detail: "invalid peer certificate: UnknownIssuer".into(),
        });
        assert!(is_handshake_failure(&outer));
        let plain = std::io::Error::other("connection refused");
        assert!(!is_handshake_failure(&plain));
    }

    #[test]
    fn rustls_refusals_wrapped_in_io_errors_are_recognised() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            refused,
        ));
        let reason = rustls_reason(&wrapped).unwrap_or_default();
        assert!(reason.contains("UnknownIssuer"), "{reason}");
        assert_eq!(rustls_reason(&std::io::Error::other("reset")), None);
    }
}
