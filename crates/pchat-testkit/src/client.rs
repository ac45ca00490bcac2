//! The XMPP client: transports, stream negotiation (STARTTLS, SASL, bind) and the stanza API.
//!
//! The client is deliberately strict about the server's side of negotiation (stream header
//! attributes, the SCRAM server signature, iq response addresses) because its purpose is to
//! find the server's protocol bugs, not to interoperate with every server in the wild.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::element::{escape, Element};
use crate::framing::{self, Incoming, TcpReadSide};
use crate::ns;
use crate::sasl::{self, Mechanism, ScramClient, ScramError, ScramHash};
use crate::tls;

/// Any byte stream the client can run XMPP over (TCP or TLS over TCP).
pub(crate) trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncIo for T {}
/// A boxed [`AsyncIo`], so STARTTLS can swap TCP for TLS under the same reader and writer types.
pub(crate) type BoxedIo = Box<dyn AsyncIo>;

/// How to reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// RFC 6120 TCP stream; the server must offer `<starttls/>` and the client upgrades.
    StartTls {
        /// The c2s address.
        addr: SocketAddr,
    },
    /// XEP-0368 direct TLS: the TLS handshake (ALPN `xmpp-client`) comes before the stream.
    DirectTls {
        /// The direct-TLS c2s address.
        addr: SocketAddr,
    },
    /// RFC 7395 XMPP over WebSocket (`ws://` or `wss://`), subprotocol `xmpp`.
    WebSocket {
        /// For example `wss://127.0.0.1:5280/xmpp-websocket` (any certificate is accepted, as
        /// with the TLS transports).
        url: String,
    },
    /// TCP without TLS, for checking that the server refuses to authenticate in the clear.
    PlainTcp {
        /// The c2s address.
        addr: SocketAddr,
    },
}

/// Where [`Client::connect`] stops; later stages are for tests of the earlier ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Stream open (after TLS where the transport has it), features received, before SASL.
    Features,
    /// SASL succeeded and the stream restarted, before resource binding.
    Authenticated,
    /// Resource bound (and legacy session established if required): ready for stanzas.
    Bound,
}

/// Everything [`Client::connect`] needs.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Transport and address.
    pub transport: Transport,
    /// Bare JID `localpart@domain`: the localpart is the SASL username, the domain is the
    /// stream `to` and the TLS SNI name.
    pub jid: String,
    /// The password for SASL.
    pub password: String,
    /// SASL mechanism; it must be offered by the server.
    pub mechanism: Mechanism,
    /// Resource to request at bind; `None` lets the server generate one.
    pub resource: Option<String>,
    /// How far to negotiate.
    pub stop_after: Stage,
    /// Bound on the whole of connection and negotiation.
    pub connect_timeout: Duration,
    /// Default bound for the helpers that wait for a reply (`join_room`, `iq`-based helpers).
    pub reply_timeout: Duration,
    /// With STARTTLS, insist that the feature carries `<required/>` (RFC 6120 lets servers
    /// make it optional; pchat must not).
    pub starttls_must_be_required: bool,
    /// Largest incoming top-level element accepted, so a runaway server cannot eat memory.
    pub stanza_bytes_max: usize,
}

impl ConnectOptions {
    /// SCRAM-SHA-256, server-generated resource, full negotiation, 10 s timeouts.
    pub fn new(transport: Transport, jid: &str, password: &str) -> ConnectOptions {
        ConnectOptions {
            transport,
            jid: jid.to_string(),
            password: password.to_string(),
            mechanism: Mechanism::ScramSha256,
            resource: None,
            stop_after: Stage::Bound,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            starttls_must_be_required: true,
            stanza_bytes_max: 16 << 20,
        }
    }
}

/// A stanza-level error (`<error type=..><condition/><text/></error>`) as reported by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StanzaError {
    /// The `type` attribute: `cancel`, `modify`, `auth`, `wait` or `continue`.
    pub error_type: String,
    /// The defined condition, e.g. `item-not-found`.
    pub condition: String,
    /// The optional human-readable `<text/>`.
    pub text: Option<String>,
}

impl StanzaError {
    /// Extracts the error from a stanza of `type='error'`; `None` when it has no `<error/>`.
    pub fn from_stanza(stanza: &Element) -> Option<StanzaError> {
        let error = stanza.child("error", ns::CLIENT)?;
        Some(StanzaError {
            error_type: error.attr("type").unwrap_or_default().to_string(),
            condition: first_condition(error, ns::STANZA_ERRORS),
            text: error.child_text("text", ns::STANZA_ERRORS),
        })
    }
}

/// Everything that can go wrong; the variants a test asserts on carry the XMPP condition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket-level failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS handshake or configuration failure.
    #[error("TLS error: {0}")]
    Tls(String),
    /// WebSocket handshake or framing failure.
    #[error("WebSocket error: {0}")]
    WebSocket(String),
    /// Nothing suitable arrived in time.
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What was awaited, plus a summary of what arrived instead.
        waiting_for: String,
        /// The bound that expired.
        after: Duration,
    },
    /// The server sent `<stream:error/>`.
    #[error("stream error <{condition}/>{}", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    Stream {
        /// The defined condition, e.g. `not-well-formed` or `policy-violation`.
        condition: String,
        /// The optional `<text/>`.
        text: Option<String>,
    },
    /// The server closed the XML stream (`</stream:stream>` or `<close/>`).
    #[error("the server closed the stream")]
    StreamClosed,
    /// The connection ended without the server closing the stream first.
    #[error("the connection ended without a stream close")]
    ConnectionClosed,
    /// SASL `<failure/>`.
    #[error("SASL failure <{condition}/>{}", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    Sasl {
        /// The defined condition, e.g. `not-authorized`.
        condition: String,
        /// The optional `<text/>`.
        text: Option<String>,
    },
    /// The SCRAM exchange failed on our side, e.g. a wrong server signature.
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    /// The wanted SASL mechanism is not among those offered.
    #[error("SASL mechanism {wanted} not offered; offered: {offered:?}")]
    MechanismNotOffered {
        /// The mechanism asked for.
        wanted: &'static str,
        /// The mechanisms in the features.
        offered: Vec<String>,
    },
    /// STARTTLS was missing, optional when it must be required, or refused.
    #[error("STARTTLS: {0}")]
    StartTls(String),
    /// A request was answered with a stanza error.
    #[error("stanza error <{}/> ({}){}", error.condition, error.error_type, error.text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    Stanza {
        /// The parsed error.
        error: StanzaError,
        /// The whole error stanza.
        stanza: Box<Element>,
    },
    /// The server broke the protocol (bad XML, wrong element, wrong attributes).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The caller passed something unusable (e.g. a JID without localpart).
    #[error("invalid argument: {0}")]
    Usage(String),
}

/// A crate-wide result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the stream ended, remembered so every later `recv` reports the same cause.
#[derive(Clone, Debug)]
enum Ended {
    Stream {
        condition: String,
        text: Option<String>,
    },
    Closed,
    ConnectionClosed,
    Failed(String),
}

impl Ended {
    fn to_error(&self) -> Error {
        match self {
            Ended::Stream { condition, text } => Error::Stream {
                condition: condition.clone(),
                text: text.clone(),
            },
            Ended::Closed => Error::StreamClosed,
            Ended::ConnectionClosed => Error::ConnectionClosed,
            Ended::Failed(m) => Error::Protocol(m.clone()),
        }
    }
}

type WsStream = WebSocketStream<BoxedIo>;

enum Writer {
    Tcp(WriteHalf<BoxedIo>),
    Ws(SplitSink<WsStream, Message>),
    /// Transiently empty while STARTTLS swaps the connection.
    Gone,
}

/// A connected XMPP client. Dropping it aborts the connection without closing the stream
/// (useful to simulate a vanished client); call [`Client::close`] for a clean close.
pub struct Client {
    writer: Writer,
    events: mpsc::Receiver<Incoming>,
    reader: Option<JoinHandle<Option<TcpReadSide>>>,
    pending: VecDeque<Element>,
    ended: Option<Ended>,
    jid: String,
    bare_jid: String,
    domain: String,
    stream_attrs: Vec<(String, String)>,
    features: Element,
    next_id: u64,
    id_prefix: String,
    reply_timeout: Duration,
    stanza_bytes_max: usize,
    answer_pings: bool,
}

impl Drop for Client {
    fn drop(&mut self) {
        // The reader task owns the read half; without aborting it the socket would stay open.
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// Channel depth between the reader task and the client; the reader waits when it is full,
/// which pushes back on the server through TCP instead of buffering without bound.
const EVENTS_QUEUE_MAX: usize = 1024;

impl Client {
    /// Connects and negotiates up to `opts.stop_after`, bounded by `opts.connect_timeout`.
    pub async fn connect(opts: ConnectOptions) -> Result<Client> {
        let after = opts.connect_timeout;
        match tokio::time::timeout(after, Client::connect_unbounded(opts)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                waiting_for: "connection and stream negotiation".into(),
                after,
            }),
        }
    }

    async fn connect_unbounded(opts: ConnectOptions) -> Result<Client> {
        let (localpart, domain) = split_bare_jid(&opts.jid)?;
        let mut client = match &opts.transport {
            Transport::StartTls { addr } | Transport::PlainTcp { addr } => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Client::over_tcp(Box::new(tcp), &opts)
            }
            Transport::DirectTls { addr } => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = tls::handshake(Box::new(tcp), domain, Some(b"xmpp-client")).await?;
                Client::over_tcp(Box::new(tls), &opts)
            }
            Transport::WebSocket { url } => Client::over_websocket(url, &opts, domain).await?,
        };
        client.open_stream().await?;

        if let Transport::StartTls { .. } = opts.transport {
            client.starttls(opts.starttls_must_be_required).await?;
            client.open_stream().await?;
        }
        if opts.stop_after == Stage::Features {
            return Ok(client);
        }

        client
            .authenticate(opts.mechanism, localpart, &opts.password)
            .await?;
        client.restart_after_sasl().await?;
        client.open_stream().await?;
        if opts.stop_after == Stage::Authenticated {
            return Ok(client);
        }

        client.bind(opts.resource.as_deref()).await?;
        Ok(client)
    }

    fn new(writer: Writer, events: mpsc::Receiver<Incoming>, opts: &ConnectOptions) -> Client {
        let (localpart, domain) = split_bare_jid(&opts.jid).unwrap_or_default();
        Client {
            writer,
            events,
            reader: None,
            pending: VecDeque::new(),
            ended: None,
            jid: String::new(),
            bare_jid: format!("{localpart}@{domain}"),
            domain: domain.to_string(),
            stream_attrs: Vec::new(),
            features: Element::new("features", ns::STREAMS),
            next_id: 0,
            id_prefix: format!("{:08x}", rand::random::<u32>()),
            reply_timeout: opts.reply_timeout,
            stanza_bytes_max: opts.stanza_bytes_max,
            answer_pings: true,
        }
    }

    fn over_tcp(io: BoxedIo, opts: &ConnectOptions) -> Client {
        let (read, write) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel(EVENTS_QUEUE_MAX);
        let mut client = Client::new(Writer::Tcp(write), rx, opts);
        client.reader = Some(tokio::spawn(framing::read_tcp_stream(
            BufReader::new(read),
            tx,
            opts.stanza_bytes_max,
        )));
        client
    }

    async fn over_websocket(url: &str, opts: &ConnectOptions, domain: &str) -> Result<Client> {
        let ws_err = |e: tokio_tungstenite::tungstenite::Error| Error::WebSocket(e.to_string());
        let mut request = url.into_client_request().map_err(ws_err)?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
        let uri = request.uri().clone();
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            other => return Err(Error::Usage(format!("unsupported URL scheme {other:?}"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| Error::Usage(format!("no host in {url}")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        // TLS is done here rather than by tungstenite so the same test-only verifier is used.
        let io: BoxedIo = if secure {
            Box::new(tls::handshake(Box::new(tcp), domain, None).await?)
        } else {
            Box::new(tcp)
        };
        let (ws, response) = tokio_tungstenite::client_async(request, io)
            .await
            .map_err(ws_err)?;
        let protocol = response.headers().get("Sec-WebSocket-Protocol");
        if protocol.map(|p| p.as_bytes()) != Some(b"xmpp") {
            return Err(Error::Protocol(format!(
                "RFC 7395 requires the server to select subprotocol xmpp, got {protocol:?}"
            )));
        }
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::channel(EVENTS_QUEUE_MAX);
        let mut client = Client::new(Writer::Ws(sink), rx, opts);
        client.reader = Some(tokio::spawn(read_websocket(stream, tx)));
        Ok(client)
    }

    // ----- negotiation -----

    /// Sends a stream header and reads the server's header and features.
    async fn open_stream(&mut self) -> Result<()> {
        let header = match self.writer {
            Writer::Ws(_) => format!(
                "<open xmlns='{}' to='{}' version='1.0' xml:lang='en'/>",
                ns::FRAMING,
                escape(&self.domain)
            ),
            _ => format!(
                "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' to='{}' \
                 version='1.0' xml:lang='en'>",
                ns::CLIENT,
                ns::STREAMS,
                escape(&self.domain)
            ),
        };
        self.write_text(header).await?;
        let attrs = match self.next_event().await? {
            Incoming::Open(attrs) => attrs,
            other => return Err(unexpected(other, "a stream header")),
        };
        let get = |name: &str| {
            attrs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        // RFC 6120 §4.7: a response header carries from=our 'to', an id and version 1.0.
        if get("version") != Some("1.0") {
            return Err(Error::Protocol(format!(
                "stream header version {:?}, expected 1.0",
                get("version")
            )));
        }
        if !get("from").is_some_and(|f| f.eq_ignore_ascii_case(&self.domain)) {
            return Err(Error::Protocol(format!(
                "stream header from={:?}, expected {:?}",
                get("from"),
                self.domain
            )));
        }
        if get("id").is_none_or(str::is_empty) {
            return Err(Error::Protocol("stream header without id".into()));
        }
        if matches!(self.writer, Writer::Tcp(_)) && get("xmlns") != Some(ns::CLIENT) {
            return Err(Error::Protocol(format!(
                "stream default namespace {:?}, expected {}",
                get("xmlns"),
                ns::CLIENT
            )));
        }
        self.stream_attrs = attrs;
        let features = self.next_element().await?;
        if !features.is("features", ns::STREAMS) {
            return Err(Error::Protocol(format!(
                "expected <stream:features/>, got {features}"
            )));
        }
        self.features = features;
        Ok(())
    }

    async fn starttls(&mut self, must_be_required: bool) -> Result<()> {
        let Some(starttls) = self.features.child("starttls", ns::TLS) else {
            return Err(Error::StartTls(format!("not offered in {}", self.features)));
        };
        if must_be_required && !starttls.has_child("required", ns::TLS) {
            return Err(Error::StartTls(
                "offered without <required/>, so a client could stay in the clear".into(),
            ));
        }
        self.send(&Element::new("starttls", ns::TLS)).await?;
        let reply = self.next_element().await?;
        if reply.is("failure", ns::TLS) {
            return Err(Error::StartTls("server answered <failure/>".into()));
        }
        if !reply.is("proceed", ns::TLS) {
            return Err(Error::Protocol(format!("expected <proceed/>, got {reply}")));
        }
        let read_side = self.take_tcp_read_side().await?;
        if !read_side.buffer().is_empty() {
            // Anything after <proceed/> before our ClientHello would be a plaintext injection.
            return Err(Error::Protocol("data after <proceed/> before TLS".into()));
        }
        let Writer::Tcp(write) = std::mem::replace(&mut self.writer, Writer::Gone) else {
            return Err(Error::Usage("STARTTLS needs a TCP transport".into()));
        };
        let io = read_side.into_inner().unsplit(write);
        let tls = tls::handshake(io, &self.domain, None).await?;
        let (read, write) = tokio::io::split(Box::new(tls) as BoxedIo);
        self.writer = Writer::Tcp(write);
        self.spawn_tcp_reader(BufReader::new(read));
        Ok(())
    }

    /// Waits for the TCP reader task to hand back the read side after a stream reset.
    async fn take_tcp_read_side(&mut self) -> Result<TcpReadSide> {
        let task = self
            .reader
            .take()
            .ok_or_else(|| Error::Usage("no reader task".into()))?;
        match task.await {
            Ok(Some(read_side)) => Ok(read_side),
            Ok(None) => Err(Error::Protocol(
                "the stream ended instead of resetting".into(),
            )),
            Err(e) => Err(Error::Protocol(format!("reader task failed: {e}"))),
        }
    }

    fn spawn_tcp_reader(&mut self, read_side: TcpReadSide) {
        let (tx, rx) = mpsc::channel(EVENTS_QUEUE_MAX);
        self.events = rx;
        self.reader = Some(tokio::spawn(framing::read_tcp_stream(
            read_side,
            tx,
            self.stanza_bytes_max,
        )));
    }

    async fn restart_after_sasl(&mut self) -> Result<()> {
        // On TCP the parser of the old stream stopped at <success/>; a new document starts on
        // the same bytes. WebSocket frames are independent documents, so nothing to do there.
        if matches!(self.writer, Writer::Tcp(_)) {
            let read_side = self.take_tcp_read_side().await?;
            self.spawn_tcp_reader(read_side);
        }
        Ok(())
    }

    async fn authenticate(
        &mut self,
        mechanism: Mechanism,
        username: &str,
        password: &str,
    ) -> Result<()> {
        let offered: Vec<String> = self
            .features
            .child("mechanisms", ns::SASL)
            .map(|m| {
                m.children_named("mechanism", ns::SASL)
                    .map(|e| e.text().trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if !offered.iter().any(|m| m == mechanism.name()) {
            return Err(Error::MechanismNotOffered {
                wanted: mechanism.name(),
                offered,
            });
        }
        let mut scram = match mechanism {
            Mechanism::ScramSha256 => Some(ScramClient::new(ScramHash::Sha256, username, password)),
            Mechanism::ScramSha1 => Some(ScramClient::new(ScramHash::Sha1, username, password)),
            Mechanism::Plain => None,
        };
        let initial = match &scram {
            Some(s) => s.client_first().into_bytes(),
            None => sasl::plain_initial(username, password),
        };
        self.send(
            &Element::new("auth", ns::SASL)
                .with_attr("mechanism", mechanism.name())
                .with_text(BASE64.encode(initial)),
        )
        .await?;

        // SCRAM has two server messages: server-first in a challenge, server-final either in
        // a second challenge or as additional data in <success/> (RFC 6120 §6.3.10).
        let mut sent_final = false;
        let mut verified = false;
        loop {
            let reply = self.next_element().await?;
            if reply.is("challenge", ns::SASL) {
                let data = decode_sasl(&reply)?;
                let scram = scram.as_mut().ok_or_else(|| {
                    Error::Protocol("challenge during PLAIN authentication".into())
                })?;
                let response = if !sent_final {
                    sent_final = true;
                    scram.client_final(&data)?
                } else if !verified {
                    scram.verify_server_final(&data)?;
                    verified = true;
                    String::new()
                } else {
                    return Err(Error::Protocol("a third SCRAM challenge".into()));
                };
                let text = if response.is_empty() {
                    "=".to_string()
                } else {
                    BASE64.encode(response)
                };
                self.send(&Element::new("response", ns::SASL).with_text(text))
                    .await?;
            } else if reply.is("success", ns::SASL) {
                let data = decode_sasl(&reply)?;
                if let Some(scram) = &scram {
                    if !data.is_empty() {
                        scram.verify_server_final(&data)?;
                        verified = true;
                    }
                    if !verified {
                        return Err(Error::Protocol(
                            "SCRAM success without a server signature to verify".into(),
                        ));
                    }
                }
                return Ok(());
            } else if reply.is("failure", ns::SASL) {
                return Err(Error::Sasl {
                    condition: first_condition(&reply, ns::SASL),
                    text: reply.child_text("text", ns::SASL),
                });
            } else {
                return Err(Error::Protocol(format!("unexpected during SASL: {reply}")));
            }
        }
    }

    async fn bind(&mut self, resource: Option<&str>) -> Result<()> {
        if !self.features.has_child("bind", ns::BIND) {
            return Err(Error::Protocol(format!(
                "no <bind/> in features after SASL: {}",
                self.features
            )));
        }
        let mut bind = Element::new("bind", ns::BIND);
        if let Some(resource) = resource {
            bind.push_child(Element::new("resource", ns::BIND).with_text(resource));
        }
        let request = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_child(bind);
        let reply = self.iq_result(request, self.reply_timeout).await?;
        let jid = reply
            .child("bind", ns::BIND)
            .and_then(|b| b.child_text("jid", ns::BIND))
            .ok_or_else(|| Error::Protocol(format!("bind result without <jid/>: {reply}")))?;
        let bare = jid.split('/').next().unwrap_or_default();
        if !bare.eq_ignore_ascii_case(&self.bare_jid) || !jid.contains('/') {
            return Err(Error::Protocol(format!(
                "bound JID {jid:?} is not a full JID of {:?}",
                self.bare_jid
            )));
        }
        // RFC 6120 §7.7.2.2 lets the server override a requested resource, so a different
        // one is not an error here; tests that care compare `jid()` themselves.
        self.jid = jid;

        // RFC 3921 sessions are obsolete (RFC 6121 dropped them), but a server that still
        // advertises them without <optional/> requires the client to establish one.
        if let Some(session) = self.features.child("session", ns::SESSION) {
            if !session.has_child("optional", ns::SESSION) {
                let request = Element::new("iq", ns::CLIENT)
                    .with_attr("type", "set")
                    .with_attr("to", self.domain.clone())
                    .with_child(Element::new("session", ns::SESSION));
                self.iq_result(request, self.reply_timeout).await?;
            }
        }
        Ok(())
    }

    /// The next raw event; during negotiation there is no buffering.
    async fn next_event(&mut self) -> Result<Incoming> {
        if let Some(ended) = &self.ended {
            return Err(ended.to_error());
        }
        Ok(self.events.recv().await.unwrap_or(Incoming::Eof))
    }

    /// The next top-level element during negotiation; anything else becomes an error.
    async fn next_element(&mut self) -> Result<Element> {
        match self.next_event().await? {
            Incoming::Element(el) if el.is("error", ns::STREAMS) => {
                let error = stream_error(&el);
                self.ended = Some(error.clone());
                Err(error.to_error())
            }
            Incoming::Element(el) => Ok(el),
            other => Err(unexpected(other, "an element")),
        }
    }

    // ----- stanza API -----

    /// The full JID bound for this session (empty before [`Stage::Bound`]).
    pub fn jid(&self) -> &str {
        &self.jid
    }

    /// The bare JID the client authenticated as.
    pub fn bare_jid(&self) -> &str {
        &self.bare_jid
    }

    /// The server domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The most recent `<stream:features/>`.
    pub fn features(&self) -> &Element {
        &self.features
    }

    /// Raw attributes of the most recent stream header from the server (including `xmlns`
    /// declarations on TCP).
    pub fn stream_attrs(&self) -> &[(String, String)] {
        &self.stream_attrs
    }

    /// The default bound used by helpers that wait for a reply.
    pub fn reply_timeout(&self) -> Duration {
        self.reply_timeout
    }

    /// Changes the default reply bound.
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    /// Whether the client answers the server's XEP-0199 pings by itself (the default, as
    /// RFC 6120 §8.2.3 requires an answer to every iq get): a ping from the server is then
    /// answered while the test waits for stanzas, and never handed to it. Off, pings arrive
    /// like any stanza, for tests of what the server does with a client that ignores them.
    pub fn set_answer_pings(&mut self, on: bool) {
        self.answer_pings = on;
    }

    /// A fresh stanza id, unique per client.
    pub fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("tk-{}-{}", self.id_prefix, self.next_id)
    }

    /// Serializes and sends one element (on WebSocket: one text frame).
    pub async fn send(&mut self, element: &Element) -> Result<()> {
        self.write_text(element.to_xml()).await
    }

    /// Sends bytes exactly as given, for malformed-input tests. On WebSocket they form one
    /// frame: a text frame when they are UTF-8, otherwise a binary frame.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.writer {
            Writer::Tcp(w) => {
                w.write_all(bytes).await?;
                w.flush().await?;
                Ok(())
            }
            Writer::Ws(sink) => {
                let message = match std::str::from_utf8(bytes) {
                    Ok(text) => Message::text(text),
                    Err(_) => Message::binary(bytes.to_vec()),
                };
                sink.send(message)
                    .await
                    .map_err(|e| Error::WebSocket(e.to_string()))
            }
            Writer::Gone => Err(Error::ConnectionClosed),
        }
    }

    async fn write_text(&mut self, text: String) -> Result<()> {
        match &mut self.writer {
            Writer::Tcp(w) => {
                w.write_all(text.as_bytes()).await?;
                w.flush().await?;
                Ok(())
            }
            Writer::Ws(sink) => sink
                .send(Message::text(text))
                .await
                .map_err(|e| Error::WebSocket(e.to_string())),
            Writer::Gone => Err(Error::ConnectionClosed),
        }
    }

    /// The next stanza: buffered ones first. A stream error, stream close or lost connection
    /// becomes the matching [`Error`], and stays the answer for every later call.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Element> {
        if let Some(stanza) = self.pending.pop_front() {
            return Ok(stanza);
        }
        self.next_stanza(Instant::now() + timeout, timeout, "a stanza")
            .await
    }

    /// Like [`Client::recv`], but `Ok(None)` on timeout, for tests that expect silence.
    pub async fn recv_opt(&mut self, timeout: Duration) -> Result<Option<Element>> {
        match self.recv(timeout).await {
            Ok(stanza) => Ok(Some(stanza)),
            Err(Error::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Everything that arrives within `duration` (buffered stanzas included).
    pub async fn collect_for(&mut self, duration: Duration) -> Result<Vec<Element>> {
        let deadline = Instant::now() + duration;
        let mut out: Vec<Element> = self.pending.drain(..).collect();
        loop {
            match self.next_stanza(deadline, duration, "nothing").await {
                Ok(stanza) => out.push(stanza),
                Err(Error::Timeout { .. }) => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }

    /// The first stanza matching `predicate` (buffered ones first); stanzas that do not match
    /// are kept, in order, for later `recv` calls.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut predicate: impl FnMut(&Element) -> bool,
    ) -> Result<Element> {
        if let Some(index) = self.pending.iter().position(&mut predicate) {
            return Ok(self.pending.remove(index).unwrap_or_else(|| unreachable!()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let stanza = self
                .next_stanza(deadline, timeout, "a matching stanza")
                .await?;
            if predicate(&stanza) {
                return Ok(stanza);
            }
            self.pending.push_back(stanza);
        }
    }

    async fn next_stanza(
        &mut self,
        deadline: Instant,
        after: Duration,
        waiting_for: &str,
    ) -> Result<Element> {
        if let Some(ended) = &self.ended {
            return Err(ended.to_error());
        }
        let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Ok(event) => event.unwrap_or(Incoming::Eof),
            Err(_) => {
                return Err(Error::Timeout {
                    waiting_for: format!("{waiting_for}{}", self.pending_summary()),
                    after,
                })
            }
        };
        let ended = match event {
            Incoming::Element(el) if el.is("error", ns::STREAMS) => stream_error(&el),
            Incoming::Element(el) if self.answer_pings && self.is_server_ping(&el) => {
                let pong = Element::new("iq", ns::CLIENT)
                    .with_attr("type", "result")
                    .with_attr("id", el.attr("id").unwrap_or_default())
                    .with_attr("to", el.attr("from").unwrap_or_default());
                self.send(&pong).await?;
                return Box::pin(self.next_stanza(deadline, after, waiting_for)).await;
            }
            Incoming::Element(el) => return Ok(el),
            Incoming::Open(_) => Ended::Failed("unexpected stream header mid-stream".into()),
            Incoming::Closed => Ended::Closed,
            Incoming::Eof => Ended::ConnectionClosed,
            Incoming::Failed(message) => Ended::Failed(message),
        };
        let error = ended.to_error();
        self.ended = Some(ended);
        Err(error)
    }

    /// An XEP-0199 ping from our server (not from a room or another user).
    fn is_server_ping(&self, el: &Element) -> bool {
        el.is("iq", ns::CLIENT)
            && el.attr("type") == Some("get")
            && el.has_child("ping", ns::PING)
            && el
                .attr("from")
                .is_none_or(|f| f.eq_ignore_ascii_case(&self.domain))
    }

    fn pending_summary(&self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        let mut out = format!("; {} other stanza(s) buffered:", self.pending.len());
        for stanza in self.pending.iter().take(3) {
            let mut xml = stanza.to_xml();
            if xml.len() > 300 {
                let mut cut = 300;
                while !xml.is_char_boundary(cut) {
                    cut -= 1;
                }
                xml.truncate(cut);
                xml.push('…');
            }
            out.push(' ');
            out.push_str(&xml);
        }
        out
    }

    /// Stanzas received but not yet returned (by `recv_until` skipping them).
    pub fn pending(&self) -> impl Iterator<Item = &Element> {
        self.pending.iter()
    }

    /// Sends an iq with a fresh id and returns the `result` or `error` iq answering it.
    /// The reply's `from` must be the request's `to` (or, for requests to our own account,
    /// absent or our bare JID), as RFC 6120 §8.1.2.1 requires.
    pub async fn iq(&mut self, mut request: Element, timeout: Duration) -> Result<Element> {
        let id = self.fresh_id();
        request.set_attr("id", id.clone());
        self.send(&request).await?;
        let reply = self
            .recv_until(timeout, |s| {
                s.is("iq", ns::CLIENT)
                    && s.attr("id") == Some(id.as_str())
                    && matches!(s.attr("type"), Some("result") | Some("error"))
            })
            .await
            .map_err(|e| match e {
                Error::Timeout { waiting_for, after } => Error::Timeout {
                    waiting_for: format!("reply to iq {id} ({waiting_for})"),
                    after,
                },
                other => other,
            })?;
        let from = reply.attr("from");
        let ok = match request.attr("to") {
            Some(to) if !to.eq_ignore_ascii_case(&self.bare_jid) => {
                from.is_some_and(|f| f.eq_ignore_ascii_case(to))
            }
            _ => from.is_none_or(|f| {
                f.eq_ignore_ascii_case(&self.bare_jid)
                    || f.eq_ignore_ascii_case(&self.jid)
                    || (self.jid.is_empty() && f.eq_ignore_ascii_case(&self.domain))
            }),
        };
        if !ok {
            return Err(Error::Protocol(format!(
                "iq reply from {from:?} to a request to {:?}: {reply}",
                request.attr("to")
            )));
        }
        Ok(reply)
    }

    /// Like [`Client::iq`], but a `type='error'` reply becomes [`Error::Stanza`].
    pub async fn iq_result(&mut self, request: Element, timeout: Duration) -> Result<Element> {
        let reply = self.iq(request, timeout).await?;
        if reply.attr("type") == Some("error") {
            return Err(stanza_error(reply));
        }
        Ok(reply)
    }

    /// Closes the stream cleanly: sends the close, waits (reply timeout) for the server to
    /// close its side, then shuts the transport down. The server not answering with its own
    /// close is an error, since RFC 6120 §4.4 and RFC 7395 §3.6 require it.
    pub async fn close(mut self) -> Result<()> {
        let close = match self.writer {
            Writer::Ws(_) => format!("<close xmlns='{}'/>", ns::FRAMING),
            _ => "</stream:stream>".to_string(),
        };
        let already_closed = matches!(self.ended, Some(Ended::Closed));
        let sent = self.write_text(close).await;
        if !already_closed {
            sent?;
            let timeout = self.reply_timeout;
            let deadline = Instant::now() + timeout;
            loop {
                match self
                    .next_stanza(deadline, timeout, "the server's stream close")
                    .await
                {
                    Ok(_) => continue,
                    Err(Error::StreamClosed) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        match &mut self.writer {
            Writer::Tcp(w) => {
                let _ = w.shutdown().await;
            }
            Writer::Ws(sink) => {
                // RFC 7395 §3.6: after the <close/> exchange the WebSocket itself is closed.
                let _ = sink.send(Message::Close(None)).await;
                let _ = sink.close().await;
            }
            Writer::Gone => {}
        }
        Ok(())
    }
}

/// Reads RFC 7395 frames until the WebSocket ends; never hands anything back.
async fn read_websocket(
    mut stream: SplitStream<WsStream>,
    events: mpsc::Sender<Incoming>,
) -> Option<TcpReadSide> {
    while let Some(message) = stream.next().await {
        let event = match message {
            Ok(Message::Text(text)) => framing::classify_ws_frame(text.as_str()),
            Ok(Message::Binary(_)) => Some(Incoming::Failed(
                "binary WebSocket frame; RFC 7395 requires text frames".into(),
            )),
            Ok(Message::Close(_)) => Some(Incoming::Eof),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => None,
            Err(e) => Some(Incoming::Failed(format!("WebSocket: {e}"))),
        };
        if let Some(event) = event {
            let last = matches!(event, Incoming::Eof | Incoming::Failed(_));
            if events.send(event).await.is_err() || last {
                return None;
            }
        }
    }
    let _ = events.send(Incoming::Eof).await;
    None
}

/// Splits `local@domain` (an optional `/resource` is ignored).
fn split_bare_jid(jid: &str) -> Result<(&str, &str)> {
    let bare = jid.split('/').next().unwrap_or_default();
    match bare.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => Ok((local, domain)),
        _ => Err(Error::Usage(format!(
            "{jid:?} is not a JID of the form localpart@domain"
        ))),
    }
}

fn decode_sasl(element: &Element) -> Result<String> {
    let text = element.text();
    let text = text.trim();
    // RFC 6120 §6.4.2: "=" stands for empty data, no content for no data.
    if text.is_empty() || text == "=" {
        return Ok(String::new());
    }
    let bytes = BASE64
        .decode(text)
        .map_err(|e| Error::Protocol(format!("SASL data is not base64: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::Protocol(format!("SASL data is not UTF-8: {e}")))
}

/// The name of the first child in `namespace` other than `<text/>`: the defined condition.
fn first_condition(element: &Element, namespace: &str) -> String {
    element
        .children()
        .find(|c| c.ns() == namespace && c.name() != "text")
        .map(|c| c.name().to_string())
        .unwrap_or_default()
}

fn stream_error(element: &Element) -> Ended {
    Ended::Stream {
        condition: first_condition(element, ns::STREAM_ERRORS),
        text: element.child_text("text", ns::STREAM_ERRORS),
    }
}

/// Turns an error stanza into [`Error::Stanza`].
pub(crate) fn stanza_error(stanza: Element) -> Error {
    let error = StanzaError::from_stanza(&stanza).unwrap_or(StanzaError {
        error_type: String::new(),
        condition: String::new(),
        text: None,
    });
    Error::Stanza {
        error,
        stanza: Box::new(stanza),
    }
}

fn unexpected(event: Incoming, wanted: &str) -> Error {
    match event {
        Incoming::Element(el) if el.is("error", ns::STREAMS) => stream_error(&el).to_error(),
        Incoming::Element(el) => Error::Protocol(format!("expected {wanted}, got {el}")),
        Incoming::Open(_) => Error::Protocol(format!("expected {wanted}, got a stream header")),
        Incoming::Closed => Error::StreamClosed,
        Incoming::Eof => Error::ConnectionClosed,
        Incoming::Failed(message) => Error::Protocol(message),
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("jid", &self.jid())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server for the SASL step: it answers SCRAM with a server-final message
    /// of our choosing, so the client's verification of `v=` is tested end to end.
    async fn scram_against(success_data: Option<&'static str>) -> Error {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let io: BoxedIo = Box::new(socket);
            let (read, mut write) = tokio::io::split(io);
            let (tx, mut rx) = mpsc::channel(16);
            tokio::spawn(framing::read_tcp_stream(BufReader::new(read), tx, 1 << 16));
            assert!(matches!(rx.recv().await, Some(Incoming::Open(_))));
            let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
                xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='x' \
                version='1.0'><stream:features><mechanisms \
                xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism>\
                </mechanisms></stream:features>";
            write.write_all(header.as_bytes()).await.unwrap();
            let Some(Incoming::Element(auth)) = rx.recv().await else {
                panic!("no auth")
            };
            let first = String::from_utf8(BASE64.decode(auth.text()).unwrap()).unwrap();
            let nonce = first.rsplit("r=").next().unwrap().to_string();
            let server_first = format!("r={nonce}server,s={},i=4096", BASE64.encode("salt"));
            let challenge = format!(
                "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</challenge>",
                BASE64.encode(server_first)
            );
            write.write_all(challenge.as_bytes()).await.unwrap();
            let Some(Incoming::Element(_response)) = rx.recv().await else {
                panic!("no response")
            };
            let success = match success_data {
                Some(data) => format!(
                    "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</success>",
                    BASE64.encode(data)
                ),
                None => "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".to_string(),
            };
            write.write_all(success.as_bytes()).await.unwrap();
            // Keep the connection open until the client gives up.
            let _ = rx.recv().await;
        });
        let opts = ConnectOptions {
            stop_after: Stage::Authenticated,
            ..ConnectOptions::new(Transport::PlainTcp { addr }, "user@localhost", "pencil")
        };
        match Client::connect(opts).await {
            Ok(_) => panic!("authentication succeeded against a server that proved nothing"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn rejects_wrong_or_missing_server_signature() {
        let err = scram_against(Some("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")).await;
        assert!(
            matches!(err, Error::Scram(ScramError::BadServerSignature)),
            "{err}"
        );
        let err = scram_against(None).await;
        assert!(
            matches!(&err, Error::Protocol(m) if m.contains("without a server signature")),
            "{err}"
        );
    }

    #[test]
    fn splits_jids() {
        assert_eq!(split_bare_jid("a@b").unwrap(), ("a", "b"));
        assert_eq!(split_bare_jid("a@b/c@d").unwrap(), ("a", "b"));
        assert!(split_bare_jid("b").is_err());
        assert!(split_bare_jid("@b").is_err());
    }

    #[test]
    fn parses_stanza_errors() {
        let e = Element::parse_stanza(
            "<iq type='error' id='1'><error type='cancel'>\
             <item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>gone</text></error></iq>",
        )
        .unwrap();
        assert_eq!(
            StanzaError::from_stanza(&e),
            Some(StanzaError {
                error_type: "cancel".into(),
                condition: "item-not-found".into(),
                text: Some("gone".into()),
            })
        );
    }
}
