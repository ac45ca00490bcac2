//! TLS for the pool's own connections — servers and the shell to PostgreSQL, replication,
//! everything to the agents and to etcd — and the small PKI that makes their certificates.
//!
//! - [`pki`]: `pchat pki init|issue`: a CA for the pool and one *identity* per endpoint the
//!   topology names, each a directory holding `ca.crt`, `cert.pem` and `key.pem` (0600).
//! - [`identity`]: an identity loaded from its directory, and the rustls settings built from
//!   it: a client that verifies its peer against the pool's CA — by the name of the host it
//!   dialled, or by a *pinned* name the topology gives, whatever address it dialled — and
//!   presents its own certificate; a server that demands a certificate from the pool's CA.
//! - [`postgres`]: the same client for `tokio-postgres` (`sslmode=verify-full`, with
//!   `tls-server-end-point` channel binding for SCRAM).
//! - [`fs`]: private files (keys, passwords) written 0600 under a fresh name, never through
//!   a link.
//! - [`dir`]: work inside a directory a less trusted user owns (root's agent in `postgres`'s
//!   directories) through a descriptor opened without following links.
//!
//! Only the pool's CA is trusted on these paths: the operating system's roots are not, so a
//! certificate bought for the right host name elsewhere does not open them.
#![warn(missing_docs)]

pub mod dir;
pub mod fs;
pub mod identity;
pub mod pki;
pub mod postgres;

pub use identity::{ClientAuth, Identity, PeerName};

/// Why TLS material could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file exists but does not hold what it should.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, and how to fix it.
        problem: String,
    },
    /// The CA already exists; `pki init` never replaces it.
    #[error("{0}: a CA already exists here; keep it (every certificate of the pool depends on it) or remove the directory to start over")]
    CaExists(String),
    /// An issued certificate is not usable for what its identity needs.
    #[error("{path}: {problem}")]
    Unusable {
        /// The identity's directory.
        path: String,
        /// Why a peer would refuse it.
        problem: String,
    },
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate could not be generated.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl TlsError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
        move |source| TlsError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn invalid(path: &std::path::Path, problem: impl Into<String>) -> TlsError {
        TlsError::Invalid {
            path: path.display().to_string(),
            problem: problem.into(),
        }
    }
}

/// The crypto provider of every pool connection (the same as the client ports').
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
