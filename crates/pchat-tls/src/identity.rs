//! An identity: the directory `pchat pki issue` writes for one endpoint of the pool, and the
//! rustls settings made from it.
//!
//! ```text
//! DIR/ca.crt     the pool's CA: the only root trusted on pool connections
//! DIR/cert.pem   this endpoint's certificate (its names are DNS subject alternative names)
//! DIR/key.pem    its private key, mode 0600
//! ```
//!
//! A client built here verifies its peer's chain against `ca.crt` and then the peer's name:
//! either the host it dialled ([`PeerName::Dialled`], standard TLS) or a name *pinned* by the
//! topology ([`PeerName::Pinned`]) whatever address was dialled, so an address read from etcd
//! or DNS cannot steer a connection to another endpoint of the same CA. It presents its own
//! certificate when the peer asks (mutual TLS). A server built here can demand a client
//! certificate from the same CA ([`ClientAuth::Required`]) and learn the client's names with
//! [`peer_names`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::{fs, provider, TlsError};

/// The CA's certificate in an identity directory (and in the PKI directory).
pub const CA_FILE: &str = "ca.crt";
/// The identity's certificate.
pub const CERT_FILE: &str = "cert.pem";
/// The identity's private key.
pub const KEY_FILE: &str = "key.pem";

/// Which name the peer's certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerName {
    /// The host name (or IP address) the connection dialled: standard TLS.
    Dialled,
    /// This name, whatever was dialled: the topology's name for the endpoint.
    Pinned(String),
}

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate asked for (the client authenticates otherwise).
    None,
    /// A certificate issued by the pool's CA, or no connection.
    Required,
}

/// One endpoint's certificate, key and the pool's CA.
pub struct Identity {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    names: Vec<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let (pem, _) = fs::read_nofollow(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::invalid(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::invalid(path, "holds no certificate"));
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read_private(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsError::invalid(path, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| TlsError::invalid(path, "holds no private key"))
}

/// The DNS names of an end-entity certificate (its subject alternative names).
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.valid_dns_names().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// The DNS names of the certificate a peer presented (the first of `certs`), already verified
/// against the pool's CA by the handshake. Empty when it presented none.
pub fn peer_names(certs: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    certs
        .and_then(|c| c.first())
        .map(cert_names)
        .unwrap_or_default()
}

impl Identity {
    /// Loads the identity in `dir`, with a clear error naming the file that is missing,
    /// unreadable, a link, too open (the key) or not what it should be.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let ca_path = dir.join(CA_FILE);
        let ca = read_certs(&ca_path)?.remove(0);
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::invalid(&ca_path, format!("not a usable CA: {e}")))?;
        let cert_path = dir.join(CERT_FILE);
        let chain = read_certs(&cert_path)?;
        let key = read_key(&dir.join(KEY_FILE))?;
        let signer = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::invalid(&dir.join(KEY_FILE), e.to_string()))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signer)
            .keys_match()
            .map_err(|_| {
                TlsError::invalid(&cert_path, "the key in key.pem does not belong to this certificate: issue the identity again (`pchat pki issue --renew`)")
            })?;
        let names = cert_names(&chain[0]);
        Ok(Identity {
            dir: dir.to_owned(),
            roots: Arc::new(roots),
            ca,
            chain,
            key,
            names,
        })
    }

    /// The identity's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the pool's CA certificate (libpq's `sslrootcert`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// Path of the certificate (libpq's `sslcert`, PostgreSQL's `ssl_cert_file`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// Path of the private key (libpq's `sslkey`, PostgreSQL's `ssl_key_file`).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The pool's CA certificate.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The DNS names this identity's certificate carries.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// A client: verifies the peer against the pool's CA and `peer`, and presents this
    /// identity's certificate when asked.
    pub fn client_config(&self, peer: PeerName) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_with(peer, rustls::DEFAULT_VERSIONS)
    }

    /// [`Identity::client_config`] limited to TLS 1.3, where the client's certificate travels
    /// encrypted and only after the server has proved its own (its `Finished` checked): a
    /// peer that is not the pinned one never even learns who was calling. (In TLS 1.2 the
    /// client's certificate crosses the wire in the clear.)
    pub fn client_config_tls13(&self, peer: PeerName) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_with(peer, &[&rustls::version::TLS13])
    }

    fn client_config_with(
        &self,
        peer: PeerName,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::invalid(&self.ca_path(), e.to_string()))?;
        let builder =
            ClientConfig::builder_with_provider(provider).with_protocol_versions(versions)?;
        let builder = match peer {
            PeerName::Dialled => builder.with_webpki_verifier(webpki),
            PeerName::Pinned(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|_| {
                    TlsError::invalid(&self.dir, format!("`{name}` is not a valid DNS name"))
                })?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Pinned { webpki, name }))
            }
        };
        let config = builder.with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// A server presenting this identity's certificate; with [`ClientAuth::Required`] it
    /// accepts only clients with a certificate from the pool's CA.
    pub fn server_config(&self, clients: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(clients, rustls::DEFAULT_VERSIONS)
    }

    /// [`Identity::server_config`] limited to TLS 1.3 (see
    /// [`Identity::client_config_tls13`]).
    pub fn server_config_tls13(&self, clients: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(clients, &[&rustls::version::TLS13])
    }

    fn server_config_with(
        &self,
        clients: ClientAuth,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let builder = match clients {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider)
                    .build()
                    .map_err(|e| TlsError::invalid(&self.ca_path(), e.to_string()))?,
            ),
        };
        Ok(Arc::new(builder.with_single_cert(
            self.chain.clone(),
            self.key.clone_key(),
        )?))
    }
}

/// Verifies the chain as the web PKI verifier does, against a name fixed in advance instead
/// of the one the connection dialled.
#[derive(Debug)]
struct Pinned {
    webpki: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
