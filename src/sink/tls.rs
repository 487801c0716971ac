//! TLS to ClickHouse: the connector that speaks TLS over the sink's bounded connections.
//!
//! An `https://` URL gets a rustls client ([`crate::tls::client_config`]: ring provider, TLS 1.2
//! and 1.3) that verifies the server's certificate against the CA certificates of
//! `tls_ca_file`, or the system's roots when none is given, and presents a client certificate
//! when `tls_cert_file` and `tls_key_file` are set. The TLS layer runs inside [`BoundedConnector`]'s connections, so the answer bound holds
//! for HTTPS too (it counts the encrypted bytes, a few percent more than the answer).
//!
//! A handshake that rustls refuses (a certificate the configured CA does not sign, a name that
//! does not match, a server that speaks plain HTTP on the port) is not cured by waiting: the
//! connector turns it into a [`HandshakeError`], which [`is_handshake_failure`] finds in any error
//! chain, so the sink's classification can tell it from a refused or reset connection.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use super::bounded::{BoundedConnector, BoundedStream};

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

/// A boxed connector error, as hyper-util's client takes them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The sink's connector for `https://` (and plain `http://`) URLs: rustls over the bounded
/// connections, with refused handshakes turned into [`HandshakeError`].
#[derive(Clone)]
pub struct TlsConnector {
    inner: HttpsConnector<BoundedConnector>,
}

impl TlsConnector {
    /// Wraps `bounded` (which must not enforce the `http` scheme) with TLS per `config`.
    pub fn new(bounded: BoundedConnector, config: ClientConfig) -> TlsConnector {
        let inner = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(bounded);
        TlsConnector { inner }
    }
}

/// The future of one connection attempt.
type Connecting = Pin<
    Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<BoundedStream>>, BoxError>> + Send>,
>;

impl tower_service::Service<hyper::Uri> for TlsConnector {
    type Response = MaybeHttpsStream<TokioIo<BoundedStream>>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().to_owned();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            connecting
                .await
                .map_err(|error| match rustls_reason(&*error) {
                    Some(detail) => Box::new(HandshakeError { host, detail }) as BoxError,
                    None => error,
                })
        })
    }
}

/// rustls' refusal inside a connector error, if that is what it is. hyper-rustls wraps the
/// handshake's `io::Error` (which carries the `rustls::Error`) in another `io::Error`, and an
/// `io::Error`'s `source` skips the error it wraps, so the wrapped errors are opened by hand.
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
