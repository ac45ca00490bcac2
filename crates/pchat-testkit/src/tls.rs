//! TLS for tests: a full handshake with SNI, but any server certificate is accepted.
//!
//! Test servers use throw-away self-signed certificates, so chain validation would only fail.
//! The handshake signatures are still verified against the presented certificate, so the
//! connection is genuinely encrypted and a broken TLS stack on the server still fails the test.
//! Never use this verifier outside tests.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::client::{BoxedIo, Error};

/// Accepts every certificate but checks handshake signatures with the ring provider.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds a connector; `alpn` is offered in the handshake (XEP-0368 asks for `xmpp-client`).
fn connector(alpn: Option<&[u8]>) -> Result<TlsConnector, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Runs a client handshake over `io` with SNI set to `domain`.
pub(crate) async fn handshake(
    io: BoxedIo,
    domain: &str,
    alpn: Option<&[u8]>,
) -> Result<TlsStream<BoxedIo>, Error> {
    let name = ServerName::try_from(domain.to_string())
        .map_err(|e| Error::Tls(format!("{domain:?} is not a valid TLS server name: {e}")))?;
    connector(alpn)?
        .connect(name, io)
        .await
        .map_err(|e| Error::Tls(e.to_string()))
}

/// What [`https_get`] got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsReply {
    /// The ALPN protocol the server chose, if any (`http/1.1` was offered).
    pub alpn: Option<Vec<u8>>,
    /// The whole response, status line, headers and body, as text.
    pub response: String,
}

/// `GET path` over TLS to `addr` with SNI `server_name` and ALPN `http/1.1`, any certificate
/// accepted (as by the XMPP transports); reads until the server closes (`Connection: close`).
/// For checking an HTTPS listener without an HTTP client that would hide its TLS settings.
pub async fn https_get(
    addr: std::net::SocketAddr,
    server_name: &str,
    path: &str,
) -> Result<HttpsReply, Error> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = handshake(Box::new(tcp), server_name, Some(b"http/1.1")).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut bytes = Vec::new();
    tls.read_to_end(&mut bytes).await?;
    Ok(HttpsReply {
        alpn,
        response: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// A TLS connection to `addr` (SNI `server_name`, optional ALPN, any certificate accepted),
/// with nothing sent after the handshake: for tests of what a server does with a client that
/// completed TLS and then stays silent, or speaks some protocol by hand.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    alpn: Option<&[u8]>,
) -> Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send, Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    handshake(Box::new(tcp), server_name, alpn).await
}
