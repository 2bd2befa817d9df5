//! TLS for NBD over TCP (rustls, X.509 certificates): a server built with [`Tls`] requires
//! every client to upgrade with `NBD_OPT_STARTTLS` before negotiating anything else; a
//! client built with [`ClientTls`] upgrades its connections and checks the server's
//! certificate against the authorities it was given.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot load {what} from {path}: {message}")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("invalid TLS certificate or key: {0}")]
    Config(#[from] rustls::Error),
}

/// Server-side TLS settings.
#[derive(Clone)]
pub struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// From a PEM certificate chain (server certificate first) and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_error = |what, path: &Path, message: String| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_error("certificates", cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_error("certificates", cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_error(
                "certificates",
                cert,
                "no certificate found".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| pem_error("the private key", key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// From a directory laid out as qemu-nbd and nbdkit expect (`--tls-certificates`):
    /// `server-cert.pem` and `server-key.pem`.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        Self::from_pem_files(&dir.join("server-cert.pem"), &dir.join("server-key.pem"))
    }
}

/// Client-side TLS settings: the certificate authorities a server's certificate must chain
/// to, and optionally a client certificate.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// From a directory laid out as qemu and nbdkit expect of a client
    /// (`--tls-certificates`): `ca-cert.pem` (the authorities to trust), and, if both
    /// exist, `client-cert.pem` and `client-key.pem` (presented to servers that ask).
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let ca = dir.join("ca-cert.pem");
        let pem_error = |what, path: &Path, message: String| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        let authorities: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
            .map_err(|e| pem_error("certificate authorities", &ca, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_error("certificate authorities", &ca, e.to_string()))?;
        for authority in authorities {
            roots.add(authority)?;
        }
        if roots.is_empty() {
            return Err(pem_error(
                "certificate authorities",
                &ca,
                "no certificate found".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let cert = dir.join("client-cert.pem");
        let key = dir.join("client-key.pem");
        let config = if cert.exists() && key.exists() {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                .map_err(|e| pem_error("certificates", &cert, e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| pem_error("certificates", &cert, e.to_string()))?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| pem_error("the private key", &key, e.to_string()))?;
            builder.with_client_auth_cert(chain, key)?
        } else {
            builder.with_no_client_auth()
        };
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}
