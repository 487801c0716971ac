//! The rustls client configuration of a TLS connection (to ClickHouse over HTTPS, and the
//! rescue's raw NATS connection): trusted roots from a CA file or the system, an optional client
//! certificate, the ring provider (the one async-nats uses; aws-lc-rs stays out of the tree).
//!
//! The files are PEM; every error names the option (`tls_ca_file`, ...) and the path, never a
//! file's content.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Largest PEM file the relay reads as a CA bundle, certificate or key, in bytes. A system CA
/// bundle is about 200 KiB; 4 MiB bounds what a wrong path (a log, a device) can make it read.
const PEM_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Where the TLS material of one connection comes from. All paths are optional; without a CA
/// file the system's roots are trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the CA certificates that sign the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM file with the client certificate (and its chain) to present.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// Why the TLS configuration cannot be built. `file` names the option (`tls_ca_file`, ...).
/// No message shows a file's content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("{file} {path}: cannot read it: {source}")]
    Read {
        file: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any PEM file the relay expects.
    #[error("{file} {path}: larger than {PEM_FILE_BYTES_MAX} bytes; name a PEM file")]
    TooLarge { file: &'static str, path: PathBuf },
    /// The file holds no certificate, or one rustls does not accept.
    #[error("{file} {path}: {detail}; name a PEM file with BEGIN CERTIFICATE blocks")]
    Certificate {
        file: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// The key file holds no private key rustls can use.
    #[error(
        "tls_key_file {path}: {detail}; name a PEM file with a PKCS#8, PKCS#1 or SEC1 private key"
    )]
    Key { path: PathBuf, detail: String },
    /// Only one of the client certificate and its key is set.
    #[error("{set} is set without {missing}: a client certificate needs both")]
    Incomplete {
        set: &'static str,
        missing: &'static str,
    },
    /// No trusted root: no CA file and the system has none.
    #[error("no CA certificate to verify the server with: the system has none ({detail}); set tls_ca_file")]
    NoRoots { detail: String },
    /// rustls refused the combination (a key that does not match the certificate, ...).
    #[error("TLS client configuration refused: {detail}")]
    Config { detail: String },
}

/// The rustls client configuration for `files`.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in certificates("tls_ca_file", path)? {
                roots.add(cert).map_err(|error| TlsError::Certificate {
                    file: "tls_ca_file",
                    path: path.clone(),
                    detail: error.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            // Certificates the platform holds but rustls cannot parse are skipped, as browsers do.
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                let detail = match native.errors.first() {
                    Some(error) => error.to_string(),
                    None => "the system certificate store is empty".to_owned(),
                };
                return Err(TlsError::NoRoots { detail });
            }
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config {
            detail: error.to_string(),
        })?
        .with_root_certificates(roots);
    match (&files.cert_file, &files.key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(TlsError::Incomplete {
            set: "tls_cert_file",
            missing: "tls_key_file",
        }),
        (None, Some(_)) => Err(TlsError::Incomplete {
            set: "tls_key_file",
            missing: "tls_cert_file",
        }),
        (Some(cert), Some(key)) => {
            let chain = certificates("tls_cert_file", cert)?;
            let key = private_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| TlsError::Config {
                    detail: error.to_string(),
                })
        }
    }
}

/// Reads a PEM file whole, within [`PEM_FILE_BYTES_MAX`].
fn read_pem(file: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read_error = |source| TlsError::Read {
        file,
        path: path.to_owned(),
        source,
    };
    let opened = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    opened
        .take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsError::TooLarge {
            file,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// The certificates of a PEM file; at least one.
fn certificates(file: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(file, path)?;
    let invalid = |detail: String| TlsError::Certificate {
        file,
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(format!("not valid PEM ({error})")))?;
    if certs.is_empty() {
        return Err(invalid("holds no certificate".to_owned()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem("tls_key_file", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::Key {
        path: path.to_owned(),
        // The pem error names the section kind or the I/O failure, never the key's bytes.
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_without_its_key_is_refused_naming_both_options() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let cert = dir.path().join("client.crt");
        std::fs::write(&cert, "not used").expect("write");
        let error = client_config(&TlsFiles {
            ca_file: None,
            cert_file: Some(cert),
            key_file: None,
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            error.contains("tls_cert_file") && error.contains("tls_key_file"),
            "{error}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_option_and_path() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "hello\n").expect("write");
        let error = client_config(&TlsFiles {
            ca_file: Some(ca.clone()),
            ..TlsFiles::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(error.contains("tls_ca_file"), "{error}");
        assert!(error.contains(&ca.display().to_string()), "{error}");
        assert!(error.contains("no certificate"), "{error}");
    }

    #[test]
    fn a_missing_ca_file_is_refused_naming_the_option() {
        let error = client_config(&TlsFiles {
            ca_file: Some(PathBuf::from("/nonexistent/prism-ca.pem")),
            ..TlsFiles::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            error.contains("tls_ca_file /nonexistent/prism-ca.pem: cannot read it"),
            "{error}"
        );
    }
}
