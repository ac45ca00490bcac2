//! One client connection: TCP from a chosen loopback source address, then either STARTTLS or
//! an RFC 7395 WebSocket (`wss://`, or plain `ws://`: see `Transport`), SASL, resource binding;
//! then split into a [`Reader`] and a [`Writer`] so that a scenario can receive and send from
//! separate tasks (a blocked write must never stop us reading, or client and server could wait
//! on each other's full socket buffers).
//!
//! Over WebSocket every message carries exactly one element (`<open/>`, a stanza, `<close/>`).
//! The reader feeds message payloads into the same framer as TCP, behind a synthetic stream
//! header, so the scenarios see one element stream whatever the transport.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

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

/// How a client reaches the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP with STARTTLS (RFC 6120), the default.
    Starttls,
    /// RFC 7395 WebSocket to `addr` with this request path: over TLS (`wss://`, any
    /// certificate accepted, as for STARTTLS) or plain (`ws://`).
    WebSocket {
        /// Request path, e.g. `/xmpp-websocket`.
        path: String,
        /// `wss://`: TLS before the HTTP upgrade.
        tls: bool,
    },
}

impl Transport {
    /// The WebSocket URL for `addr`, `None` for STARTTLS.
    pub fn ws_url(&self, addr: SocketAddr) -> Option<String> {
        match self {
            Transport::Starttls => None,
            Transport::WebSocket { path, tls } => {
                let scheme = if *tls { "wss" } else { "ws" };
                Some(format!("{scheme}://{addr}{path}"))
            }
        }
    }

    /// Parses `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH` into the `HOST:PORT` to
    /// resolve and the transport.
    pub fn parse_ws_url(url: &str) -> anyhow::Result<(&str, Transport)> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("wss://") {
            (rest, true)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            (rest, false)
        } else {
            bail!("--ws-url must start with wss:// or ws:// (got {url})");
        };
        let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        Ok((
            hostport,
            Transport::WebSocket {
                path: path.into(),
                tls,
            },
        ))
    }
}

/// Where and how to log in; shared by every connection of a run.
#[derive(Clone, Debug)]
pub struct Target {
    /// Server address (loopback): the STARTTLS port, or the WebSocket listener.
    pub addr: SocketAddr,
    /// STARTTLS or WebSocket.
    pub transport: Transport,
    /// XMPP domain, also the TLS server name.
    pub domain: String,
    /// The shared password of every bench account.
    pub password: String,
    /// SASL choice.
    pub mech: MechChoice,
    /// How many loopback source addresses to spread connections over (127.0.x.y).
    pub source_addrs: u32,
    /// Index of the first source address, so that worker processes use disjoint addresses.
    pub source_first: u32,
    /// Time allowed for one complete login.
    pub login_timeout: Duration,
}

impl Target {
    /// The loopback source address for connection number `i`: 127.0.x.y with y in 1..=250,
    /// so that each address keeps its own ephemeral port range (~28k ports each).
    pub fn source_for(&self, i: usize) -> Ipv4Addr {
        // 250 × 255 addresses fit in 127.0.1.1–127.0.255.250; wrap rather than overflow.
        let k = (self.source_first + (i as u32) % self.source_addrs.max(1)) % (250 * 255);
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

/// The byte stream under a WebSocket: TLS for `wss://`, plain TCP for `ws://`.
enum WsIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WsIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            WsIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            WsIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WsIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WsIo::Plain(s) => Pin::new(s).poll_flush(cx),
            WsIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            WsIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WsIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Ws = WebSocketStream<WsIo>;

/// A whole (not yet split) connection.
enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<Ws>),
}

/// The WebSocket framing namespace (RFC 7395).
const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";

impl Io {
    /// Sends one or more elements. Over WebSocket each element goes in its own message, as
    /// RFC 7395 §3.3.3 requires.
    async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        match self {
            Io::Tls(t) => {
                t.write_all(text.as_bytes()).await?;
                t.flush().await?;
            }
            Io::Ws(w) => {
                for el in xml::split_elements(text)? {
                    w.feed(Message::text(xml::qualify_client(el))).await?;
                }
                w.flush().await?;
            }
        }
        Ok(())
    }

    /// Reads more input into `framer`; 0 means the connection closed.
    async fn fill(&mut self, framer: &mut Framer) -> anyhow::Result<usize> {
        match self {
            Io::Tls(t) => Ok(t.read_buf(framer.read_target()?).await?),
            Io::Ws(w) => ws_fill(w.as_mut(), framer).await,
        }
    }

    fn is_ws(&self) -> bool {
        matches!(self, Io::Ws(_))
    }

    /// The stream header (TCP) or `<open/>` (WebSocket).
    fn header(&self, domain: &str) -> String {
        if self.is_ws() {
            format!("<open xmlns='{FRAMING_NS}' to='{domain}' version='1.0'/>")
        } else {
            stream_header(domain)
        }
    }
}

/// Appends the payload of the next data message to the framer; 0 = closed.
async fn ws_fill<S>(ws: &mut S, framer: &mut Framer) -> anyhow::Result<usize>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let Some(msg) = ws.next().await else {
            return Ok(0);
        };
        let msg = msg?;
        let bytes: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(_) => return Ok(0),
            _ => continue,
        };
        let buf = framer.read_target()?;
        buf.extend_from_slice(bytes);
        return Ok(bytes.len().max(1));
    }
}

/// An owned framing event, for the (cold) negotiation path.
enum Owned {
    Open,
    Elem(Vec<u8>),
    Close,
}

async fn read_owned(io: &mut Io, framer: &mut Framer, deadline: Instant) -> anyhow::Result<Owned> {
    loop {
        if let Some(ev) = framer.next_event()? {
            return Ok(match ev {
                Ev::Open => Owned::Open,
                Ev::Elem => Owned::Elem(framer.last().to_vec()),
                Ev::Close => Owned::Close,
            });
        }
        let n = timeout_at(deadline, io.fill(framer))
            .await
            .map_err(|_| anyhow!("timed out waiting for the server"))??;
        if n == 0 {
            bail!("server closed the connection");
        }
    }
}

async fn read_elem(io: &mut Io, framer: &mut Framer, deadline: Instant) -> anyhow::Result<Vec<u8>> {
    loop {
        match read_owned(io, framer, deadline).await? {
            Owned::Open => continue,
            Owned::Elem(e) => {
                if xml::name(&e) == b"stream:error" {
                    bail!("stream error: {}", xml::show(&e));
                }
                if io.is_ws() {
                    match xml::name(&e) {
                        b"open" => continue,
                        b"close" => bail!("server closed the stream: {}", xml::show(&e)),
                        _ => {}
                    }
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

async fn tcp_from(
    target: &Target,
    source: Ipv4Addr,
    deadline: Instant,
) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
        .with_context(|| format!("bind {source}"))?;
    let tcp = timeout_at(deadline, socket.connect(target.addr))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
        .with_context(|| format!("connect {} from {source}", target.addr))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Opens a connection from `source` up to the point where SASL can start: STARTTLS done, or
/// the WebSocket open. Returns the connection, its framer and the offered features.
async fn open_stream(
    target: &Target,
    source: Ipv4Addr,
    deadline: Instant,
) -> anyhow::Result<(Io, Framer, Vec<u8>)> {
    let mut tcp = tcp_from(target, source, deadline).await?;
    if let Transport::WebSocket { tls, .. } = target.transport {
        let url = target.transport.ws_url(target.addr).unwrap_or_default();
        let io = if tls {
            let name = ServerName::try_from(target.domain.clone())?;
            let tls = timeout_at(deadline, connector()?.connect(name, tcp))
                .await
                .map_err(|_| anyhow!("TLS handshake timed out"))?
                .with_context(|| format!("TLS handshake with {url}"))?;
            WsIo::Tls(Box::new(tls))
        } else {
            WsIo::Plain(tcp)
        };
        let mut request = url.as_str().into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
        let (ws, _response) = timeout_at(deadline, tokio_tungstenite::client_async(request, io))
            .await
            .map_err(|_| anyhow!("WebSocket handshake timed out"))?
            .with_context(|| format!("WebSocket handshake with {url}"))?;
        let mut io = Io::Ws(Box::new(ws));
        let mut framer = Framer::default();
        framer.assume_open();
        io.send(&io.header(&target.domain)).await?;
        let features = read_elem(&mut io, &mut framer, deadline).await?;
        return Ok((io, framer, features));
    }
    let mut framer = Framer::default();
    tcp.write_all(stream_header(&target.domain).as_bytes())
        .await?;
    let features = read_plain(&mut tcp, &mut framer, deadline).await?;
    if !xml::contains(&features, b"<starttls") {
        bail!("server offers no STARTTLS: {}", xml::show(&features));
    }
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await?;
    let proceed = read_plain(&mut tcp, &mut framer, deadline).await?;
    if xml::name(&proceed) != b"proceed" {
        bail!("STARTTLS refused: {}", xml::show(&proceed));
    }
    if framer.unscanned() != 0 {
        bail!("server sent plaintext after <proceed/>");
    }
    let name = ServerName::try_from(target.domain.clone())?;
    let tls = timeout_at(deadline, connector()?.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))??;
    let mut io = Io::Tls(Box::new(tls));
    let mut framer = Framer::default();
    io.send(&stream_header(&target.domain)).await?;
    let features = read_elem(&mut io, &mut framer, deadline).await?;
    Ok((io, framer, features))
}

/// Reads one element of the plaintext (pre-TLS) stream.
async fn read_plain(
    tcp: &mut TcpStream,
    framer: &mut Framer,
    deadline: Instant,
) -> anyhow::Result<Vec<u8>> {
    loop {
        match framer.next_event()? {
            Some(Ev::Elem) => {
                let e = framer.last().to_vec();
                if xml::name(&e) == b"stream:error" {
                    bail!("stream error: {}", xml::show(&e));
                }
                return Ok(e);
            }
            Some(Ev::Open) => continue,
            Some(Ev::Close) => bail!("server closed the stream"),
            None => {}
        }
        let n = timeout_at(deadline, tcp.read_buf(framer.read_target()?))
            .await
            .map_err(|_| anyhow!("timed out waiting for the server"))??;
        if n == 0 {
            bail!("server closed the connection");
        }
    }
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
    io: Io,
    framer: Framer,
}

impl Session {
    /// Logs `user` in with a fresh connection from the source address for `index`.
    pub async fn login(target: &Target, user: &str, index: usize) -> anyhow::Result<Session> {
        let deadline = Instant::now() + target.login_timeout;
        let (mut io, mut framer, features) =
            open_stream(target, target.source_for(index), deadline).await?;
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
        io.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{}'>{initial}</auth>",
            mech.name()
        ))
        .await?;
        loop {
            let el = read_elem(&mut io, &mut framer, deadline).await?;
            match xml::name(&el) {
                b"challenge" => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("challenge during PLAIN"))?;
                    let text = xml::child_text_self(&el);
                    let reply = s.client_final(std::str::from_utf8(text)?)?;
                    io.send(&format!(
                        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{reply}</response>"
                    ))
                    .await?;
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
        if io.is_ws() {
            framer.assume_open();
        }
        io.send(&io.header(&target.domain)).await?;
        let features = read_elem(&mut io, &mut framer, deadline).await?;
        let resource = format!("b{index}");
        io.send(&format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>{resource}</resource></bind></iq>"
        ))
        .await?;
        let jid = loop {
            let el = read_elem(&mut io, &mut framer, deadline).await?;
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
            io.send(
                "<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
            )
            .await?;
            loop {
                let el = read_elem(&mut io, &mut framer, deadline).await?;
                if xml::name(&el) == b"iq" && xml::attr(&el, "id") == Some(b"sess1") {
                    break;
                }
            }
        }
        Ok(Session { io, framer })
    }

    /// Splits into independent read and write halves.
    pub fn split(self) -> (Reader, Writer) {
        match self.io {
            Io::Tls(t) => {
                let (r, w) = tokio::io::split(*t);
                let w = Arc::new(tokio::sync::Mutex::new(WriteIo::Tls(w)));
                (
                    Reader {
                        io: ReadIo::Tls(r),
                        framer: self.framer,
                        pong: w.clone(),
                    },
                    Writer { io: w },
                )
            }
            Io::Ws(ws) => {
                let (w, r) = (*ws).split();
                let w = Arc::new(tokio::sync::Mutex::new(WriteIo::Ws(w)));
                (
                    Reader {
                        io: ReadIo::Ws(r),
                        framer: self.framer,
                        pong: w.clone(),
                    },
                    Writer { io: w },
                )
            }
        }
    }
}

/// In-band registration (XEP-0077) of `user` over a fresh stream, for peers whose
/// command-line registration costs a VM start per account. `Ok(false)` = already existed.
pub async fn register(target: &Target, user: &str, index: usize) -> anyhow::Result<bool> {
    let deadline = Instant::now() + target.login_timeout;
    let (mut io, mut framer, _features) =
        open_stream(target, target.source_for(index), deadline).await?;
    io.send(&format!(
        "<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>{}</username>\
         <password>{}</password></query></iq>",
        xml::escape(user),
        xml::escape(&target.password)
    ))
    .await?;
    let created = loop {
        let el = read_elem(&mut io, &mut framer, deadline).await?;
        if xml::name(&el) == b"iq" && xml::attr(&el, "id") == Some(b"reg1") {
            match xml::attr(&el, "type") {
                Some(b"result") => break true,
                _ if xml::contains(&el, b"<conflict") => break false,
                _ => bail!("registration of {user} refused: {}", xml::show(&el)),
            }
        }
    };
    let _ = io.send(&close_text(io.is_ws())).await;
    if let Io::Tls(mut t) = io {
        let _ = t.shutdown().await;
    }
    Ok(created)
}

fn close_text(ws: bool) -> String {
    if ws {
        format!("<close xmlns='{FRAMING_NS}'/>")
    } else {
        "</stream:stream>".into()
    }
}

enum ReadIo {
    Tls(ReadHalf<TlsStream<TcpStream>>),
    Ws(SplitStream<Ws>),
}

/// The receiving half: yields top-level elements without copying them. It answers the
/// server's XEP-0199 pings itself (as RFC 6120 §8.2.3 requires of every client), through the
/// writing half, so a quiet benchmark client is not taken for a dead one.
pub struct Reader {
    io: ReadIo,
    framer: Framer,
    pong: Arc<tokio::sync::Mutex<WriteIo>>,
}

/// The answer to `el` when it is a server's ping (`<iq type='get'><ping xmlns='urn:xmpp:ping'/>`).
fn pong_for(el: &[u8]) -> Option<String> {
    if xml::name(el) != b"iq"
        || xml::attr(el, "type") != Some(b"get")
        || !xml::contains(el, b"urn:xmpp:ping")
    {
        return None;
    }
    // The values are raw, entities and all; quoted with what they do not contain.
    let quoted = |raw: &[u8]| {
        let v = String::from_utf8_lossy(raw);
        if v.contains('\'') {
            format!("\"{v}\"")
        } else {
            format!("'{v}'")
        }
    };
    let mut pong = String::from("<iq type='result'");
    if let Some(id) = xml::attr(el, "id") {
        pong.push_str(&format!(" id={}", quoted(id)));
    }
    if let Some(from) = xml::attr(el, "from") {
        pong.push_str(&format!(" to={}", quoted(from)));
    }
    pong.push_str("/>");
    Some(pong)
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
    /// Cancel-safe: bytes read are kept in the framer.
    pub async fn next(&mut self, deadline: Instant) -> anyhow::Result<Option<Next<'_>>> {
        loop {
            match self.framer.next_event()? {
                Some(Ev::Elem) => {
                    if let ReadIo::Ws(_) = self.io {
                        match xml::name(self.framer.last()) {
                            b"open" => continue,
                            b"close" => return Ok(Some(Next::Closed)),
                            _ => {}
                        }
                    }
                    if let Some(pong) = pong_for(self.framer.last()) {
                        // In a task of its own: `next` stays cancel-safe, and the lock keeps
                        // the pong out of the middle of the writer's stanzas.
                        let w = self.pong.clone();
                        tokio::spawn(async move {
                            let _ = w.lock().await.send(&pong).await;
                        });
                        continue;
                    }
                    return Ok(Some(Next::Elem(self.framer.last())));
                }
                Some(Ev::Close) => return Ok(Some(Next::Closed)),
                Some(Ev::Open) | None => {}
            }
            let read = match &mut self.io {
                ReadIo::Tls(r) => {
                    let buf = self.framer.read_target()?;
                    timeout_at(deadline, async { Ok(r.read_buf(buf).await?) }).await
                }
                ReadIo::Ws(r) => timeout_at(deadline, ws_fill(r, &mut self.framer)).await,
            };
            match read {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Ok(Some(Next::Closed)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}

enum WriteIo {
    Tls(WriteHalf<TlsStream<TcpStream>>),
    Ws(SplitSink<Ws, Message>),
}

/// The sending half (shared with the reading half, which answers pings through it).
pub struct Writer {
    io: Arc<tokio::sync::Mutex<WriteIo>>,
}

impl Writer {
    /// Writes one or more stanzas and flushes them (over WebSocket, one message each).
    pub async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.io.lock().await.send(text).await
    }

    /// Closes the stream politely; errors are irrelevant at that point.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            match &mut *self.io.lock().await {
                WriteIo::Tls(w) => {
                    let _ = w.write_all(b"</stream:stream>").await;
                    let _ = w.shutdown().await;
                }
                WriteIo::Ws(w) => {
                    let _ = w.send(Message::text(close_text(true))).await;
                    let _ = w.close().await;
                }
            }
        })
        .await;
    }
}

impl WriteIo {
    async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        match self {
            WriteIo::Tls(w) => {
                w.write_all(text.as_bytes()).await?;
                w.flush().await?;
            }
            WriteIo::Ws(w) => {
                for el in xml::split_elements(text)? {
                    w.feed(Message::text(xml::qualify_client(el))).await?;
                }
                w.flush().await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pongs() {
        assert_eq!(
            pong_for(b"<iq type='get' id='pchat-ping' from='localhost' to='u@localhost/r'><ping xmlns='urn:xmpp:ping'/></iq>")
                .as_deref(),
            Some("<iq type='result' id='pchat-ping' to='localhost'/>")
        );
        assert_eq!(
            pong_for(b"<iq type=\"get\" id=\"a'b\"><ping xmlns='urn:xmpp:ping'/></iq>").as_deref(),
            Some("<iq type='result' id=\"a'b\"/>")
        );
        assert!(pong_for(b"<iq type='result' id='x'/>").is_none());
        assert!(pong_for(b"<message><body>urn:xmpp:ping</body></message>").is_none());
    }

    #[test]
    fn ws_urls_parse_and_print_back() {
        let check = |url: &str, hostport: &str, path: &str, tls: bool, back: &str| {
            let (h, t) = Transport::parse_ws_url(url).unwrap();
            assert_eq!(h, hostport, "{url}");
            assert_eq!(
                t,
                Transport::WebSocket {
                    path: path.into(),
                    tls
                },
                "{url}"
            );
            let addr: SocketAddr = "127.0.0.1:5280".parse().unwrap();
            assert_eq!(t.ws_url(addr).as_deref(), Some(back), "{url}");
        };
        check(
            "wss://127.0.0.1:5280/xmpp-websocket",
            "127.0.0.1:5280",
            "/xmpp-websocket",
            true,
            "wss://127.0.0.1:5280/xmpp-websocket",
        );
        check(
            "ws://localhost:5280/websocket",
            "localhost:5280",
            "/websocket",
            false,
            "ws://127.0.0.1:5280/websocket",
        );
        check(
            "wss://127.0.0.1:5280",
            "127.0.0.1:5280",
            "/",
            true,
            "wss://127.0.0.1:5280/",
        );
        assert!(Transport::parse_ws_url("https://127.0.0.1:5280/").is_err());
        assert_eq!(
            Transport::Starttls.ws_url("127.0.0.1:1".parse().unwrap()),
            None
        );
    }
}
