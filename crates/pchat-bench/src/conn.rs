//! One client connection: TCP from a chosen loopback source address, STARTTLS, SASL, resource
//! binding; then split into a [`Reader`] and a [`Writer`] so that a scenario can receive and
//! send from separate tasks (a blocked write must never stop us reading, or client and server
//! could wait on each other's full socket buffers).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::sasl::{self, Mech};
use crate::xml::{self, Ev, Framer};

/// Which SASL mechanism to use: `Auto` picks the strongest one offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MechChoice {
    /// SCRAM-SHA-256, else SCRAM-SHA-1, else PLAIN.
    Auto,
    /// SCRAM-SHA-256 only.
    ScramSha256,
    /// SCRAM-SHA-1 only.
    ScramSha1,
    /// PLAIN (inside TLS) only.
    Plain,
}

/// Where and how to log in; shared by every connection of a run.
#[derive(Clone, Debug)]
pub struct Target {
    /// Server address (loopback).
    pub addr: SocketAddr,
    /// XMPP domain, also the TLS server name.
    pub domain: String,
    /// The shared password of every bench account.
    pub password: String,
    /// SASL choice.
    pub mech: MechChoice,
    /// How many loopback source addresses to spread connections over (127.0.x.y).
    pub source_addrs: u32,
    /// Time allowed for one complete login.
    pub login_timeout: Duration,
}

impl Target {
    /// The loopback source address for connection number `i`: 127.0.x.y with y in 1..=250,
    /// so that each address keeps its own ephemeral port range (~28k ports each).
    pub fn source_for(&self, i: usize) -> Ipv4Addr {
        let k = (i as u32) % self.source_addrs.max(1);
        Ipv4Addr::new(127, 0, (1 + k / 250) as u8, (1 + k % 250) as u8)
    }
}

/// Accepts every certificate (the servers use throw-away self-signed ones) but still checks
/// handshake signatures, so the session is really encrypted and costs what TLS costs.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
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

/// One connector for the whole process: building a rustls config per connection would cost
/// more than the handshake itself, and sharing it also shares the session-resumption cache.
fn connector() -> anyhow::Result<TlsConnector> {
    static CONNECTOR: OnceLock<TlsConnector> = OnceLock::new();
    if let Some(c) = CONNECTOR.get() {
        return Ok(c.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Ok(CONNECTOR
        .get_or_init(|| TlsConnector::from(Arc::new(config)))
        .clone())
}

/// An owned framing event, for the (cold) negotiation path.
enum Owned {
    Open,
    Elem(Vec<u8>),
    Close,
}

async fn read_owned<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    framer: &mut Framer,
    deadline: Instant,
) -> anyhow::Result<Owned> {
    loop {
        if let Some(ev) = framer.next_event()? {
            return Ok(match ev {
                Ev::Open => Owned::Open,
                Ev::Elem => Owned::Elem(framer.last().to_vec()),
                Ev::Close => Owned::Close,
            });
        }
        let buf = framer.read_target()?;
        let n = timeout_at(deadline, io.read_buf(buf))
            .await
            .map_err(|_| anyhow!("timed out waiting for the server"))??;
        if n == 0 {
            bail!("server closed the connection");
        }
    }
}

async fn read_elem<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    framer: &mut Framer,
    deadline: Instant,
) -> anyhow::Result<Vec<u8>> {
    loop {
        match read_owned(io, framer, deadline).await? {
            Owned::Open => continue,
            Owned::Elem(e) => {
                if xml::name(&e) == b"stream:error" {
                    bail!("stream error: {}", xml::show(&e));
                }
                return Ok(e);
            }
            Owned::Close => bail!("server closed the stream"),
        }
    }
}

fn stream_header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xml:lang='en' \
         xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}

/// Opens TCP from `source` and negotiates STARTTLS. Returns the TLS stream and the features
/// the server offered on the encrypted stream.
async fn tcp_starttls(
    target: &Target,
    source: Ipv4Addr,
    deadline: Instant,
) -> anyhow::Result<(TlsStream<TcpStream>, Framer, Vec<u8>)> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
        .with_context(|| format!("bind {source}"))?;
    let mut tcp = timeout_at(deadline, socket.connect(target.addr))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
        .with_context(|| format!("connect {} from {source}", target.addr))?;
    tcp.set_nodelay(true)?;
    let mut framer = Framer::default();
    tcp.write_all(stream_header(&target.domain).as_bytes())
        .await?;
    let features = read_elem(&mut tcp, &mut framer, deadline).await?;
    if !xml::contains(&features, b"<starttls") {
        bail!("server offers no STARTTLS: {}", xml::show(&features));
    }
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await?;
    let proceed = read_elem(&mut tcp, &mut framer, deadline).await?;
    if xml::name(&proceed) != b"proceed" {
        bail!("STARTTLS refused: {}", xml::show(&proceed));
    }
    if framer.unscanned() != 0 {
        bail!("server sent plaintext after <proceed/>");
    }
    let name = ServerName::try_from(target.domain.clone())?;
    let mut tls = timeout_at(deadline, connector()?.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))??;
    let mut framer = Framer::default();
    tls.write_all(stream_header(&target.domain).as_bytes())
        .await?;
    tls.flush().await?;
    let features = read_elem(&mut tls, &mut framer, deadline).await?;
    Ok((tls, framer, features))
}

fn pick_mech(choice: MechChoice, features: &[u8]) -> anyhow::Result<Mech> {
    let offered = |m: Mech| {
        xml::contains(
            features,
            format!("<mechanism>{}</mechanism>", m.name()).as_bytes(),
        )
    };
    let wanted: &[Mech] = match choice {
        MechChoice::Auto => &[Mech::ScramSha256, Mech::ScramSha1, Mech::Plain],
        MechChoice::ScramSha256 => &[Mech::ScramSha256],
        MechChoice::ScramSha1 => &[Mech::ScramSha1],
        MechChoice::Plain => &[Mech::Plain],
    };
    wanted
        .iter()
        .copied()
        .find(|&m| offered(m))
        .ok_or_else(|| anyhow!("no usable SASL mechanism in {}", xml::show(features)))
}

/// A logged-in, bound session before it is split.
pub struct Session {
    tls: TlsStream<TcpStream>,
    framer: Framer,
}

impl Session {
    /// Logs `user` in with a fresh connection from the source address for `index`.
    pub async fn login(target: &Target, user: &str, index: usize) -> anyhow::Result<Session> {
        let deadline = Instant::now() + target.login_timeout;
        let (mut tls, mut framer, features) =
            tcp_starttls(target, target.source_for(index), deadline).await?;
        let mech = pick_mech(target.mech, &features)?;
        let mut scram = None;
        let initial = match mech {
            Mech::Plain => sasl::plain_initial(user, &target.password),
            m => {
                let s = sasl::Scram::new(m, user, &target.password);
                let first = s.client_first();
                scram = Some(s);
                first
            }
        };
        tls.write_all(
            format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{}'>{initial}</auth>",
                mech.name()
            )
            .as_bytes(),
        )
        .await?;
        tls.flush().await?;
        loop {
            let el = read_elem(&mut tls, &mut framer, deadline).await?;
            match xml::name(&el) {
                b"challenge" => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("challenge during PLAIN"))?;
                    let text = xml::child_text_self(&el);
                    let reply = s.client_final(std::str::from_utf8(text)?)?;
                    tls.write_all(
                        format!(
                            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{reply}</response>"
                        )
                        .as_bytes(),
                    )
                    .await?;
                    tls.flush().await?;
                }
                b"success" => {
                    if let Some(s) = &scram {
                        s.verify(std::str::from_utf8(xml::child_text_self(&el))?)?;
                    }
                    break;
                }
                _ => bail!("authentication of {user} failed: {}", xml::show(&el)),
            }
        }
        framer.restart();
        tls.write_all(stream_header(&target.domain).as_bytes())
            .await?;
        tls.flush().await?;
        let features = read_elem(&mut tls, &mut framer, deadline).await?;
        let resource = format!("b{index}");
        tls.write_all(
            format!(
                "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                 <resource>{resource}</resource></bind></iq>"
            )
            .as_bytes(),
        )
        .await?;
        tls.flush().await?;
        let jid = loop {
            let el = read_elem(&mut tls, &mut framer, deadline).await?;
            if xml::name(&el) == b"iq" && xml::attr(&el, "id") == Some(b"bind1") {
                if xml::attr(&el, "type") != Some(b"result") {
                    bail!("bind failed: {}", xml::show(&el));
                }
                let jid = xml::child_text(&el, "jid").unwrap_or_default();
                break String::from_utf8_lossy(jid).into_owned();
            }
        };
        // The nick and every `from` we match on assume the account we asked for.
        if !jid.starts_with(&format!("{user}@{}/", target.domain)) {
            bail!("bound unexpected JID {jid:?} for {user}");
        }
        // RFC 3921 sessions are obsolete, but a server that still requires one gets it.
        if xml::contains(&features, b"<session") && !xml::contains(&features, b"<optional") {
            tls.write_all(
                b"<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
            )
            .await?;
            tls.flush().await?;
            loop {
                let el = read_elem(&mut tls, &mut framer, deadline).await?;
                if xml::name(&el) == b"iq" && xml::attr(&el, "id") == Some(b"sess1") {
                    break;
                }
            }
        }
        Ok(Session { tls, framer })
    }

    /// Splits into independent read and write halves.
    pub fn split(self) -> (Reader, Writer) {
        let (r, w) = tokio::io::split(self.tls);
        (
            Reader {
                io: r,
                framer: self.framer,
            },
            Writer { io: w },
        )
    }
}

/// In-band registration (XEP-0077) of `user` over a fresh STARTTLS stream, for peers whose
/// command-line registration costs a VM start per account. `Ok(false)` = already existed.
pub async fn register(target: &Target, user: &str, index: usize) -> anyhow::Result<bool> {
    let deadline = Instant::now() + target.login_timeout;
    let (mut tls, mut framer, _features) =
        tcp_starttls(target, target.source_for(index), deadline).await?;
    tls.write_all(
        format!(
            "<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>{}</username>\
             <password>{}</password></query></iq>",
            xml::escape(user),
            xml::escape(&target.password)
        )
        .as_bytes(),
    )
    .await?;
    tls.flush().await?;
    let created = loop {
        let el = read_elem(&mut tls, &mut framer, deadline).await?;
        if xml::name(&el) == b"iq" && xml::attr(&el, "id") == Some(b"reg1") {
            match xml::attr(&el, "type") {
                Some(b"result") => break true,
                _ if xml::contains(&el, b"<conflict") => break false,
                _ => bail!("registration of {user} refused: {}", xml::show(&el)),
            }
        }
    };
    let _ = tls.write_all(b"</stream:stream>").await;
    let _ = tls.shutdown().await;
    Ok(created)
}

/// The receiving half: yields top-level elements without copying them.
pub struct Reader {
    io: ReadHalf<TlsStream<TcpStream>>,
    framer: Framer,
}

/// What [`Reader::next`] produced.
pub enum Next<'a> {
    /// A stanza or other top-level element.
    Elem(&'a [u8]),
    /// The server closed the stream or the connection.
    Closed,
}

impl Reader {
    /// The next top-level element, waiting until `deadline` at most (`Ok(None)` = timed out).
    pub async fn next(&mut self, deadline: Instant) -> anyhow::Result<Option<Next<'_>>> {
        loop {
            match self.framer.next_event()? {
                Some(Ev::Elem) => return Ok(Some(Next::Elem(self.framer.last()))),
                Some(Ev::Close) => return Ok(Some(Next::Closed)),
                Some(Ev::Open) | None => {}
            }
            let buf = self.framer.read_target()?;
            match timeout_at(deadline, self.io.read_buf(buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Ok(Some(Next::Closed)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
}

/// The sending half.
pub struct Writer {
    io: WriteHalf<TlsStream<TcpStream>>,
}

impl Writer {
    /// Writes one or more stanzas and flushes them to the socket.
    pub async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.io.write_all(text.as_bytes()).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Closes the stream politely; errors are irrelevant at that point.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.io.write_all(b"</stream:stream>").await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}
