//! TLS on a client socket with buffers we own (rustls's unbuffered API).
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB receive buffer per connection after every
//! read, plus outgoing buffers; for an idle XMPP client that is most of what the connection
//! costs. Here the connection keeps only what must survive between reads:
//!
//! - `pending_in`: the bytes of a TLS record that has not fully arrived (unallocated when
//!   there is none, which is the idle case);
//! - `pending_out`: TLS bytes that could not be written yet (usually unallocated).
//!
//! A read copies `pending_in` to the front of a per-thread scratch buffer, reads from the
//! socket after it, and decrypts every complete record in place in that same poll, handing the
//! plaintext to a sink (the stream framer). Nothing is held across an await, so a pending poll
//! consumes nothing and a ready one has finished its work: reads are cancel-safe.
//!
//! Records that need an answer outside a write (alerts, rustls's own post-handshake messages)
//! are encoded into `pending_out` and written without blocking when possible; the rest goes out
//! before the next write. A KeyUpdate from the client is answered by rustls in front of the
//! next records we encrypt.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead as _, AsyncReadExt as _, AsyncWrite as _, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire: 2^14 bytes of plaintext plus the 2,048 bytes of
/// expansion TLS allows, plus the 5-byte header (rustls refuses anything larger).
pub const MAX_RECORD_BYTES: usize = 16 * 1024 + 2048 + 5;

/// Bytes read from the socket per poll.
pub const READ_BYTES: usize = 16 * 1024;

/// The largest handshake message rustls accepts is 64 KiB; with record headers and one
/// record that is still arriving, this bounds what a handshake or a fragmented post-handshake
/// message can make us hold. A client that sends more is dropped.
const HANDSHAKE_BYTES_MAX: usize = 0xffff + 2 * MAX_RECORD_BYTES;

/// The first read of a handshake.
const HANDSHAKE_READ_BYTES: usize = 4096;

/// A TLS connection over a TCP socket whose buffers are ours.
pub struct LeanTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received bytes not yet consumed by rustls: a partial record between reads (and, right
    /// after the handshake, whatever the client sent together with its Finished).
    pending_in: Vec<u8>,
    /// TLS bytes produced but not yet written.
    pending_out: Vec<u8>,
    /// `pending_in` (or rustls) may hold complete records not yet processed: true only after
    /// the handshake, so the first read looks there before waiting on the socket.
    unprocessed: bool,
    /// The client sent close_notify: reads report the end of the stream.
    peer_closed: bool,
}

/// Where decrypted application data goes (the stream framer).
pub type Sink<'a> = dyn FnMut(&[u8]) + 'a;

/// What runs in the `WriteTraffic` state: encrypts into the vector (the bytes to send).
type WriteFn<'a> =
    dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<()> + 'a;

/// Why [`pump`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The handshake is done and no complete record is left, or (in handshake mode)
    /// application data is ready; a write callback, if any, has run.
    Traffic,
    /// The handshake needs more bytes from the client.
    Blocked,
    /// The connection is closed both ways.
    Closed,
}

/// What one [`pump`] did.
struct Pumped {
    /// Bytes to remove from the front of the buffer passed in.
    consumed: usize,
    stop: Stop,
    /// The client's close_notify arrived.
    peer_closed: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs `encode` into the end of `out`, growing it to the size the API asks for.
fn encode_grow<E>(
    out: &mut Vec<u8>,
    estimate: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> io::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let start = out.len();
    out.resize(start + estimate, 0);
    let n = match encode(&mut out[start..]) {
        Ok(n) => n,
        Err(e) => match required(&e) {
            Some(size) => {
                out.resize(start + size, 0);
                encode(&mut out[start..]).map_err(io::Error::other)?
            }
            None => {
                out.truncate(start);
                return Err(io::Error::other(e));
            }
        },
    };
    out.truncate(start + n);
    Ok(())
}

/// Encrypts `plain` at the end of `out`.
fn encrypt_into(
    w: &mut WriteTraffic<'_, ServerConnectionData>,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    // One record per 16 KiB (rustls fragments), each with a header, an explicit nonce (TLS
    // 1.2), a content type (TLS 1.3) and a tag; plus room for a queued KeyUpdate answer. When
    // the estimate is short the API says how much it needs.
    let records = plain.len() / (16 * 1024) + 1;
    let estimate = plain.len() + records * 64 + 128;
    encode_grow(
        out,
        estimate,
        |buf| w.encrypt(plain, buf),
        |e| match e {
            EncryptError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        },
    )
}

/// Processes the complete records in `buf` until rustls needs more input (or, with
/// `on_data = None`, until application data is ready: the handshake stops there and leaves it
/// to the first read). Decrypted application data goes to `on_data`; TLS bytes to send are
/// appended to `out` (the caller writes them). When the connection is ready for traffic,
/// `on_write` (if any) runs once with the `WriteTraffic` state. No I/O here.
fn pump(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    mut on_data: Option<&mut Sink<'_>>,
    mut on_write: Option<&mut WriteFn<'_>>,
) -> io::Result<Pumped> {
    let mut consumed = 0;
    let mut peer_closed = false;
    loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut buf[consumed..]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                // rustls queues an alert for most errors; it comes out of the next call,
                // made (as the API requires) on the buffer without the discarded bytes.
                consumed += discard;
                if let Ok(ConnectionState::EncodeTlsData(mut enc)) =
                    conn.process_tls_records(&mut buf[consumed..]).state
                {
                    let _ = encode_grow(out, 64, |b| enc.encode(b), required_encode);
                }
                return Err(tls_error(e));
            }
        };
        let stop = match state {
            ConnectionState::ReadTraffic(mut records) => match on_data.as_mut() {
                None => Some(Stop::Traffic),
                Some(sink) => {
                    while let Some(record) = records.next_record() {
                        let AppDataRecord {
                            discard: more,
                            payload,
                            ..
                        } = record.map_err(tls_error)?;
                        discard += more;
                        sink(payload);
                    }
                    None
                }
            },
            ConnectionState::EncodeTlsData(mut enc) => {
                encode_grow(out, 1024, |b| enc.encode(b), required_encode)?;
                None
            }
            ConnectionState::TransmitTlsData(t) => {
                // The bytes are in `out`; the caller writes them, in order, before anything
                // encoded later.
                t.done();
                None
            }
            ConnectionState::PeerClosed => {
                peer_closed = true;
                None
            }
            ConnectionState::Closed => Some(Stop::Closed),
            ConnectionState::BlockedHandshake => Some(Stop::Blocked),
            ConnectionState::WriteTraffic(mut w) => {
                if let Some(f) = on_write.take() {
                    f(&mut w, out)?;
                }
                Some(Stop::Traffic)
            }
            // Early data is not enabled (`max_early_data_size` is 0), so rustls never
            // yields it; anything else is a state this code does not know.
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected TLS connection state",
                ))
            }
        };
        consumed += discard;
        if let Some(stop) = stop {
            return Ok(Pumped {
                consumed,
                stop,
                peer_closed,
            });
        }
    }
}

fn required_encode(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// Runs the server side of a TLS handshake on `tcp`. The caller bounds it in time. Records
/// the client sent after its Finished are kept for the first read.
pub async fn accept(mut tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<LeanTls> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut peer_closed = false;
    loop {
        let pumped = match pump(&mut conn, &mut buf, &mut out, None, None) {
            Ok(p) => p,
            Err(e) => {
                // Best effort: tell the client why (the alert rustls queued).
                let _ = tcp.write_all(&out).await;
                return Err(e);
            }
        };
        buf.drain(..pumped.consumed);
        peer_closed |= pumped.peer_closed;
        if !out.is_empty() {
            tcp.write_all(&out).await?;
            out.clear();
        }
        match pumped.stop {
            Stop::Traffic => break,
            Stop::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
            Stop::Blocked => {
                let start = buf.len();
                if start >= HANDSHAKE_BYTES_MAX {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS handshake larger than 64 KiB",
                    ));
                }
                // 4 KiB first (a ClientHello is rarely more than 2 KiB), then doubling: a
                // client that stalls mid-handshake holds little.
                let room = start.max(HANDSHAKE_READ_BYTES);
                buf.resize(HANDSHAKE_BYTES_MAX.min(start + room), 0);
                let n = tcp.read(&mut buf[start..]).await?;
                buf.truncate(start + n);
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
    let pending_in = if buf.is_empty() {
        Vec::new()
    } else {
        buf.shrink_to_fit();
        buf
    };
    Ok(LeanTls {
        tcp,
        conn,
        pending_in,
        pending_out: Vec::new(),
        unprocessed: true,
        peer_closed,
    })
}

impl LeanTls {
    /// Reads once and hands the decrypted bytes to `sink`. `scratch` is a buffer shared by
    /// the connections of one thread; nothing stays in it after the poll. Returns 0 at the
    /// end of the stream (close_notify or TCP end), otherwise the bytes taken in (which may
    /// have produced no plaintext yet: a partial record, or a TLS message of its own).
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.unprocessed {
            // Right after the handshake: what came with the client's Finished.
            self.unprocessed = false;
            let mut buf = std::mem::take(&mut self.pending_in);
            let mut fed = 0;
            let pumped = pump(
                &mut self.conn,
                &mut buf,
                &mut self.pending_out,
                Some(&mut |p: &[u8]| {
                    fed += p.len();
                    sink(p);
                }),
                None,
            );
            let pumped = match pumped {
                Ok(p) => p,
                Err(e) => {
                    self.try_flush();
                    return Poll::Ready(Err(e));
                }
            };
            buf.drain(..pumped.consumed);
            self.pending_in = keep(buf);
            self.peer_closed |= pumped.peer_closed;
            self.try_flush();
            if fed > 0 {
                return Poll::Ready(Ok(fed));
            }
        }
        if self.peer_closed {
            return Poll::Ready(Ok(0));
        }
        let held = self.pending_in.len();
        if held > HANDSHAKE_BYTES_MAX {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message too large",
            )));
        }
        if scratch.len() < held + READ_BYTES {
            scratch.resize(held + READ_BYTES, 0);
        }
        scratch[..held].copy_from_slice(&self.pending_in);
        let mut rb = ReadBuf::new(&mut scratch[held..held + READ_BYTES]);
        match std::pin::Pin::new(&mut self.tcp).poll_read(cx, &mut rb) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let n = rb.filled().len();
        if n == 0 {
            // TCP end without close_notify: the stream is over either way.
            return Poll::Ready(Ok(0));
        }
        let filled = &mut scratch[..held + n];
        let pumped = pump(
            &mut self.conn,
            filled,
            &mut self.pending_out,
            Some(sink),
            None,
        );
        let pumped = match pumped {
            Ok(p) => p,
            Err(e) => {
                self.try_flush();
                return Poll::Ready(Err(e));
            }
        };
        let rest = &filled[pumped.consumed..];
        self.pending_in = if rest.is_empty() {
            Vec::new()
        } else {
            rest.to_vec()
        };
        self.peer_closed |= pumped.peer_closed;
        self.try_flush();
        Poll::Ready(Ok(n))
    }

    /// Encrypts `plain` into the output, behind anything still pending; [`LeanTls::flush`]
    /// writes it. `sink` receives application data that rustls had already decrypted but not
    /// delivered (only possible before the first read).
    pub fn encrypt(&mut self, plain: &[u8], sink: &mut Sink<'_>) -> io::Result<()> {
        if plain.is_empty() {
            return Ok(());
        }
        self.with_traffic(Some(sink), &mut |w, out| encrypt_into(w, plain, out))
    }

    /// Sends close_notify, then shuts the socket down for writing.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        let sent = self.queue_close_notify();
        let flushed = self.flush().await;
        let closed = self.tcp.shutdown().await;
        sent.and(flushed).and(closed)
    }

    /// Encrypts close_notify into the output.
    fn queue_close_notify(&mut self) -> io::Result<()> {
        self.with_traffic(None, &mut |w, out| {
            encode_grow(
                out,
                64,
                |b| w.queue_close_notify(b),
                |e| match e {
                    EncryptError::InsufficientSize(s) => Some(s.required_size),
                    _ => None,
                },
            )
        })
    }

    /// Brings rustls to its `WriteTraffic` state (processing what `pending_in` holds) and
    /// runs `f` there, appending to `pending_out`.
    fn with_traffic(&mut self, sink: Option<&mut Sink<'_>>, f: &mut WriteFn<'_>) -> io::Result<()> {
        let mut discard_sink = |_: &[u8]| {};
        let sink: &mut Sink<'_> = match sink {
            Some(s) => s,
            None => &mut discard_sink,
        };
        let mut buf = std::mem::take(&mut self.pending_in);
        let mut ran = false;
        let pumped = pump(
            &mut self.conn,
            &mut buf,
            &mut self.pending_out,
            Some(sink),
            Some(
                &mut |w: &mut WriteTraffic<'_, ServerConnectionData>, out: &mut Vec<u8>| {
                    ran = true;
                    f(w, out)
                },
            ),
        );
        let pumped = match pumped {
            Ok(p) => p,
            Err(e) => {
                self.pending_in = buf;
                return Err(e);
            }
        };
        buf.drain(..pumped.consumed);
        self.pending_in = keep(buf);
        self.peer_closed |= pumped.peer_closed;
        // Every complete record has been processed.
        self.unprocessed = false;
        if ran {
            Ok(())
        } else {
            Err(io::ErrorKind::NotConnected.into())
        }
    }

    /// Writes `pending_out` without waiting; what the socket does not take stays.
    fn try_flush(&mut self) {
        let mut written = 0;
        while written < self.pending_out.len() {
            match self.tcp.try_write(&self.pending_out[written..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
        }
        self.pending_out.drain(..written);
        if self.pending_out.is_empty() {
            self.pending_out = Vec::new();
        }
    }

    /// Writes all of the output. Cancel-safe: bytes leave the output only once written.
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Writes all of the output, or as much as the socket takes before it would block.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending_out.is_empty() {
            let n = match std::pin::Pin::new(&mut self.tcp).poll_write(cx, &self.pending_out) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_out.drain(..n);
        }
        self.pending_out = Vec::new();
        Poll::Ready(Ok(()))
    }
}

/// Output held before a write waits for the socket: a writer that outpaces its peer is slowed
/// down instead of growing the buffer.
const PENDING_OUT_HIGH: usize = 64 * 1024;

/// A [`LeanTls`] as a byte stream (`AsyncRead` + `AsyncWrite`), for the HTTP port, where
/// hyper and the WebSocket layer own the framing. Reads decrypt into the caller's buffer
/// through the thread's read buffer; only plaintext that did not fit (a record larger than
/// the caller's buffer) is kept, until the next read. Writes are encrypted at once and sent
/// without waiting when the socket takes them.
pub struct LeanIo {
    tls: LeanTls,
    /// Decrypted bytes the caller has not taken yet (usually unallocated).
    plain: Vec<u8>,
    /// close_notify was queued.
    closing: bool,
}

impl LeanIo {
    /// Wraps a connection through its handshake.
    pub fn new(tls: LeanTls) -> Self {
        LeanIo {
            tls,
            plain: Vec::new(),
            closing: false,
        }
    }

    /// Moves what `plain` holds into `buf`.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.plain.len().min(buf.remaining());
        buf.put_slice(&self.plain[..n]);
        self.plain.drain(..n);
        if self.plain.is_empty() {
            self.plain = Vec::new();
        }
    }
}

impl tokio::io::AsyncRead for LeanIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.plain.is_empty() || buf.remaining() == 0 {
            this.take_plain(buf);
            return Poll::Ready(Ok(()));
        }
        loop {
            let LeanIo { tls, plain, .. } = &mut *this;
            let start = buf.filled().len();
            let read = crate::transport::with_read_scratch(|scratch| {
                tls.poll_read(cx, scratch, &mut |p: &[u8]| {
                    let fits = p.len().min(buf.remaining());
                    buf.put_slice(&p[..fits]);
                    plain.extend_from_slice(&p[fits..]);
                })
            });
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The end of the stream: nothing filled.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                // A partial record, or a TLS message of its own: read on.
                Poll::Ready(Ok(_)) if buf.filled().len() == start => continue,
                Poll::Ready(Ok(_)) => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl tokio::io::AsyncWrite for LeanIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tls.pending_out.len() >= PENDING_OUT_HIGH {
            match this.tls.poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map_ok(|()| 0),
            }
        }
        let LeanIo { tls, plain, .. } = &mut *this;
        tls.encrypt(data, &mut |p: &[u8]| plain.extend_from_slice(p))?;
        // Out now if the socket takes it; otherwise on the next write or flush.
        let _ = tls.poll_flush(cx);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tls.poll_flush(cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            // Without traffic keys (the peer already closed) there is nothing to tell it.
            let _ = this.tls.queue_close_notify();
        }
        match this.tls.poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        std::pin::Pin::new(&mut this.tls.tcp).poll_shutdown(cx)
    }
}

/// `buf` as the bytes to keep between reads: no allocation when empty, no spare capacity.
fn keep(mut buf: Vec<u8>) -> Vec<u8> {
    if buf.is_empty() {
        Vec::new()
    } else {
        buf.shrink_to_fit();
        buf
    }
}

/// A real rustls client over loopback TCP, driven by hand so tests can choose exactly which
/// bytes go out in which write.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    /// A server config with a fresh self-signed certificate for `localhost`, and a client
    /// config that trusts it and speaks only `versions`.
    pub(crate) fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A connected loopback pair: (server side, client side).
    pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    pub(crate) struct TestClient {
        pub(crate) tcp: TcpStream,
        pub(crate) conn: ClientConnection,
        /// Plaintext received from the server so far.
        pub(crate) received: Vec<u8>,
    }

    impl TestClient {
        pub(crate) fn new(tcp: TcpStream, config: Arc<ClientConfig>) -> Self {
            let name = ServerName::try_from("localhost").unwrap();
            TestClient {
                tcp,
                conn: ClientConnection::new(config, name).unwrap(),
                received: Vec::new(),
            }
        }

        /// The TLS bytes rustls wants to send, taken out of it.
        pub(crate) fn take_tls(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut out).unwrap();
            }
            out
        }

        /// Writes what rustls wants to send, in one write.
        pub(crate) async fn flush(&mut self) {
            let out = self.take_tls();
            self.tcp.write_all(&out).await.unwrap();
        }

        /// Queues plaintext (one or more records; nothing is written yet).
        pub(crate) fn queue(&mut self, plain: &[u8]) {
            self.conn.writer().write_all(plain).unwrap();
        }

        /// Reads once from the socket into rustls. False at the end of the stream.
        pub(crate) async fn read_once(&mut self) -> bool {
            let mut buf = vec![0; 64 * 1024];
            let n = self.tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                return false;
            }
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                self.conn.read_tls(&mut rd).unwrap();
                self.conn.process_new_packets().unwrap();
                let mut chunk = [0u8; 4096];
                loop {
                    match self.conn.reader().read(&mut chunk) {
                        Ok(0) => break,
                        Ok(k) => self.received.extend_from_slice(&chunk[..k]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("client read: {e}"),
                    }
                }
            }
            true
        }

        /// Runs the handshake until rustls considers it done, leaving the client's last
        /// flight (its Finished) unsent, so a test can append data to the same write.
        pub(crate) async fn handshake_until_finished(&mut self) {
            while self.conn.is_handshaking() {
                self.flush().await;
                if !self.conn.is_handshaking() {
                    break;
                }
                assert!(self.read_once().await, "server closed during the handshake");
            }
        }

        /// The whole handshake, Finished sent.
        pub(crate) async fn handshake(&mut self) {
            self.handshake_until_finished().await;
            self.flush().await;
        }

        /// Reads until `n` bytes of plaintext have arrived.
        pub(crate) async fn read_until(&mut self, n: usize) {
            while self.received.len() < n {
                assert!(self.read_once().await, "server closed early");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::testing::{configs, tcp_pair, TestClient};
    use super::*;

    const T: Duration = Duration::from_secs(10);

    async fn read_some(tls: &mut LeanTls, scratch: &mut Vec<u8>, got: &mut Vec<u8>) -> usize {
        let n = std::future::poll_fn(|cx| {
            tls.poll_read(cx, scratch, &mut |p: &[u8]| got.extend_from_slice(p))
        });
        tokio::time::timeout(T, n)
            .await
            .expect("read timed out")
            .unwrap()
    }

    async fn read_until(tls: &mut LeanTls, got: &mut Vec<u8>, n: usize) {
        let mut scratch = Vec::new();
        while got.len() < n {
            assert_ne!(read_some(tls, &mut scratch, got).await, 0, "early end");
        }
    }

    /// Server and client connected and through the handshake.
    async fn connected(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (LeanTls, TestClient) {
        let (server_cfg, client_cfg) = configs(versions);
        let (s, c) = tcp_pair().await;
        let mut client = TestClient::new(c, client_cfg);
        let (tls, ()) = tokio::join!(accept(s, server_cfg), client.handshake());
        (tls.unwrap(), client)
    }

    async fn send(tls: &mut LeanTls, plain: &[u8]) {
        tls.encrypt(plain, &mut |_| panic!("no data expected"))
            .unwrap();
        tls.flush().await.unwrap();
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| b'a' + (i % 26) as u8).collect()
    }

    /// `LeanIo` is a byte stream to a standard client (tokio-rustls): 100 KiB each way, read
    /// by the server through a buffer smaller than a record, then close_notify and the end of
    /// the stream both ways.
    #[tokio::test]
    async fn lean_io_is_a_byte_stream_for_a_standard_client() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (server_cfg, client_cfg) = configs(&[version]);
            let (s, c) = tcp_pair().await;
            let connector = tokio_rustls::TlsConnector::from(client_cfg);
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let (server, client) = tokio::join!(accept(s, server_cfg), connector.connect(name, c));
            let mut server = LeanIo::new(server.unwrap());
            let mut client = client.unwrap();
            let up = pattern(100 * 1024);
            let down: Vec<u8> = pattern(100 * 1024 + 7).into_iter().rev().collect();
            let (up2, down2) = (up.clone(), down.clone());
            let peer = tokio::spawn(async move {
                client.write_all(&up2).await.unwrap();
                client.flush().await.unwrap();
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                assert!(
                    got == down2,
                    "the client got {} bytes, not the server's",
                    got.len()
                );
                client.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            let mut buf = [0u8; 300];
            while got.len() < up.len() {
                let n = tokio::time::timeout(T, server.read(&mut buf))
                    .await
                    .expect("read timed out")
                    .unwrap();
                assert_ne!(n, 0, "early end after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == up, "the server got the client's bytes");
            server.write_all(&down).await.unwrap();
            server.shutdown().await.unwrap();
            tokio::time::timeout(T, peer).await.unwrap().unwrap();
            let n = tokio::time::timeout(T, server.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 0, "the client's close_notify ends the stream");
            assert!(server.plain.capacity() == 0, "nothing kept once read");
        }
    }

    #[tokio::test]
    async fn data_in_the_same_write_as_the_finished_is_not_lost() {
        for size in [40, 40 * 1024] {
            let (server_cfg, client_cfg) = configs(&[&rustls::version::TLS13]);
            let (s, c) = tcp_pair().await;
            let mut client = TestClient::new(c, client_cfg);
            let data = pattern(size);
            let server = tokio::spawn(async move {
                let mut tls = accept(s, server_cfg).await.unwrap();
                let mut got = Vec::new();
                read_until(&mut tls, &mut got, size).await;
                got
            });
            client.handshake_until_finished().await;
            // Finished and the data, in one write; then nothing more (the socket stays open),
            // so the data can only come from what the handshake read.
            client.queue(&data);
            client.flush().await;
            let got = tokio::time::timeout(T, server).await.unwrap().unwrap();
            assert_eq!(got, data, "size {size}");
        }
    }

    #[tokio::test]
    async fn records_split_across_reads_arrive_whole() {
        let (mut tls, mut client) = connected(&[&rustls::version::TLS13]).await;
        client.queue(b"<message>hel");
        client.queue(b"lo wor");
        client.queue(b"ld</message>");
        let wire = client.take_tls();
        // Cut inside the first record's header, inside a payload, and across the boundary
        // of the second and third records; each piece is a separate read on the server.
        let cuts = [3, 30, wire.len() - 40, wire.len()];
        let mut got = Vec::new();
        let mut scratch = Vec::new();
        let mut from = 0;
        for to in cuts {
            client.tcp.write_all(&wire[from..to]).await.unwrap();
            from = to;
            read_some(&mut tls, &mut scratch, &mut got).await;
        }
        assert_eq!(got, b"<message>hello world</message>");
        // Nothing is kept once every record is complete.
        assert_eq!(tls.pending_in.capacity(), 0);
        assert_eq!(tls.pending_out.capacity(), 0);
    }

    #[tokio::test]
    async fn large_payloads_both_ways() {
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let (mut tls, mut client) = connected(versions).await;
            let up = pattern(100 * 1024 + 7);
            client.conn.set_buffer_limit(None);
            client.queue(&up);
            let mut got = Vec::new();
            tokio::join!(client.flush(), read_until(&mut tls, &mut got, up.len()));
            assert_eq!(got, up);

            let down: Vec<u8> = pattern(100 * 1024 + 13).into_iter().rev().collect();
            send(&mut tls, &down).await;
            tokio::time::timeout(T, client.read_until(down.len()))
                .await
                .unwrap();
            assert_eq!(client.received, down);
            assert_eq!(tls.pending_in.capacity(), 0);
            assert_eq!(tls.pending_out.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_after_the_data_before_it() {
        let (mut tls, mut client) = connected(&[&rustls::version::TLS13]).await;
        client.queue(b"</stream:stream>");
        client.conn.send_close_notify();
        client.flush().await;
        // The client keeps its socket open: the end must come from close_notify.
        let mut got = Vec::new();
        let mut scratch = Vec::new();
        while got.len() < 16 {
            assert_ne!(read_some(&mut tls, &mut scratch, &mut got).await, 0);
        }
        assert_eq!(got, b"</stream:stream>");
        assert_eq!(read_some(&mut tls, &mut scratch, &mut got).await, 0);
        // We can still say goodbye.
        tls.shutdown().await.unwrap();
        tokio::time::timeout(T, async { while client.read_once().await {} })
            .await
            .unwrap();
        assert!(client.conn.process_new_packets().unwrap().peer_has_closed());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_dropped() {
        let oversized_record = [0x16, 0x03, 0x01, 0xff, 0xff, 0x01];
        let cases: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &oversized_record,
            &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00],
        ];
        for bytes in cases {
            let (server_cfg, _) = configs(&[&rustls::version::TLS13]);
            let (s, mut c) = tcp_pair().await;
            c.write_all(bytes).await.unwrap();
            let r = tokio::time::timeout(T, accept(s, server_cfg))
                .await
                .unwrap();
            assert!(r.is_err(), "accepted {bytes:?}");
            // The server side is gone: the client reads an alert and/or the end.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(T, c.read_to_end(&mut rest))
                .await
                .unwrap();
            if !rest.is_empty() {
                assert_eq!(rest[0], 0x15, "an alert record");
            }
        }
        // A client that goes away mid-handshake.
        let (server_cfg, _) = configs(&[&rustls::version::TLS13]);
        let (s, mut c) = tcp_pair().await;
        c.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x01])
            .await
            .unwrap();
        drop(c);
        let r = tokio::time::timeout(T, accept(s, server_cfg))
            .await
            .unwrap();
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn fragmented_handshake_dribbled_in_small_reads() {
        // Every handshake message split over 64-byte records, and the bytes delivered a few
        // at a time: rustls reassembles handshake messages inside our buffer, so what it has
        // not discarded must survive from one read to the next.
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let (server_cfg, client_cfg) = configs(versions);
            let mut client_cfg = (*client_cfg).clone();
            client_cfg.max_fragment_size = Some(64);
            let (s, c) = tcp_pair().await;
            let mut client = TestClient::new(c, Arc::new(client_cfg));
            let server = tokio::spawn(async move {
                let mut tls = accept(s, server_cfg).await.unwrap();
                let mut got = Vec::new();
                read_until(&mut tls, &mut got, 300).await;
                send(&mut tls, &got).await;
                (tls, got)
            });
            async fn dribble(client: &mut TestClient) {
                for piece in client.take_tls().chunks(7) {
                    client.tcp.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            while client.conn.is_handshaking() {
                dribble(&mut client).await;
                if client.conn.is_handshaking() {
                    assert!(client.read_once().await);
                }
            }
            let data = pattern(300);
            client.queue(&data);
            dribble(&mut client).await;
            let (tls, got) = tokio::time::timeout(T, server).await.unwrap().unwrap();
            assert_eq!(got, data);
            tokio::time::timeout(T, client.read_until(300))
                .await
                .unwrap();
            assert_eq!(client.received, data);
            assert_eq!(tls.pending_in.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn client_key_update_is_answered_and_traffic_continues() {
        let (mut tls, mut client) = connected(&[&rustls::version::TLS13]).await;
        let mut got = Vec::new();
        for round in 0..3u8 {
            client.conn.refresh_traffic_keys().unwrap();
            let up = format!("<up n='{round}'/>");
            client.queue(up.as_bytes());
            client.flush().await;
            got.clear();
            read_until(&mut tls, &mut got, up.len()).await;
            assert_eq!(got, up.as_bytes());
            // Our answer (a KeyUpdate under the old key) must precede these records, or the
            // client could not decrypt them.
            let down = format!("<down n='{round}'/>");
            client.received.clear();
            send(&mut tls, down.as_bytes()).await;
            tokio::time::timeout(T, client.read_until(down.len()))
                .await
                .unwrap();
            assert_eq!(client.received, down.as_bytes());
        }
    }

    #[tokio::test]
    async fn shutdown_sends_close_notify() {
        let (mut tls, mut client) = connected(&[&rustls::version::TLS12]).await;
        send(&mut tls, b"bye").await;
        tls.shutdown().await.unwrap();
        tokio::time::timeout(T, async { while client.read_once().await {} })
            .await
            .unwrap();
        assert_eq!(client.received, b"bye");
        assert!(client.conn.process_new_packets().unwrap().peer_has_closed());
    }

    #[tokio::test]
    async fn a_pending_read_consumes_nothing() {
        let (mut tls, mut client) = connected(&[&rustls::version::TLS13]).await;
        client.queue(b"<a/>");
        let wire = client.take_tls();
        // Half a record: the read takes it into `pending_in`.
        client.tcp.write_all(&wire[..10]).await.unwrap();
        let mut got = Vec::new();
        let mut scratch = Vec::new();
        read_some(&mut tls, &mut scratch, &mut got).await;
        assert_eq!(tls.pending_in, wire[..10]);
        // A read that is dropped while waiting changes nothing.
        let waiting = std::future::poll_fn(|cx| {
            tls.poll_read(cx, &mut scratch, &mut |p: &[u8]| got.extend_from_slice(p))
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting)
            .await
            .is_err());
        assert_eq!(tls.pending_in, wire[..10]);
        client.tcp.write_all(&wire[10..]).await.unwrap();
        read_until(&mut tls, &mut got, 4).await;
        assert_eq!(got, b"<a/>");
        assert_eq!(tls.pending_in.capacity(), 0);
    }
}
