//! TLS for client ports (STARTTLS, direct TLS, and the HTTP/WebSocket port): loads
//! `tls/cert.pem` and `tls/key.pem` from the data directory, or makes a self-signed
//! certificate for the domain on first start so a fresh server is never plaintext.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing the PEM files failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The PEM files do not hold a usable certificate and key.
    #[error("{0}")]
    Invalid(String),
}

/// Loads the certificate, generating a self-signed one for `names` when none exists.
/// Returns the config and whether a certificate was generated.
pub fn load_or_generate(
    dir: &Path,
    names: &[String],
) -> Result<(Arc<ServerConfig>, bool), TlsError> {
    let tls_dir = dir.join("tls");
    let cert_path = tls_dir.join("cert.pem");
    let key_path = tls_dir.join("key.pem");
    let mut generated = false;
    if !cert_path.exists() {
        crate::private::create_dir(&tls_dir)
            .map_err(|e| TlsError::Io(tls_dir.display().to_string(), e))?;
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| TlsError::Invalid(format!("cannot generate a certificate: {e}")))?;
        write_private(&key_path, ck.key_pair.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, ck.cert.pem())
            .map_err(|e| TlsError::Io(cert_path.display().to_string(), e))?;
        generated = true;
    }
    let cert_pem =
        std::fs::read(&cert_path).map_err(|e| TlsError::Io(cert_path.display().to_string(), e))?;
    // A key put there by hand, or by an older pchat, is made private too.
    crate::private::restrict_file(&key_path)
        .map_err(|e| TlsError::Io(key_path.display().to_string(), e))?;
    let key_pem =
        std::fs::read(&key_path).map_err(|e| TlsError::Io(key_path.display().to_string(), e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(&cert_pem[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: no certificate in the file",
            cert_path.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(&key_pem[..]))
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", key_path.display())))?
        .ok_or_else(|| {
            TlsError::Invalid(format!(
                "{}: no private key in the file",
                key_path.display()
            ))
        })?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))?;
    Ok((Arc::new(config), generated))
}

/// The client ports' TLS settings for the HTTP listener: the same certificate and key, with
/// ALPN `http/1.1`. That listener speaks HTTP/1.1 only (an RFC 7395 WebSocket starts with
/// HTTP/1.1's `Upgrade`), so a browser must not be told it may use HTTP/2. Built once at
/// start-up: the clone shares the certificate, key and session cache.
pub fn for_http(c2s: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = c2s.clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write as _;
    // The key is readable by the server's user only.
    let mut f = crate::private::create_file(path)
        .map_err(|e| TlsError::Io(path.display().to_string(), e))?;
    f.write_all(bytes)
        .map_err(|e| TlsError::Io(path.display().to_string(), e))
}
