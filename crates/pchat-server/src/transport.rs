//! Transports a client session runs over: a TCP stream (plain until STARTTLS, or TLS from the
//! first byte) framed by [`Framer`], or a WebSocket carrying one element per text frame
//! (RFC 7395). The session logic above sees the same events for both.

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures_util::SinkExt as _;
use pchat_xmpp::{ns, Element, Framer, FramerEvent, FramerLimits, StreamError};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::lean_tls::{self, LeanTls};

/// What arrived from the client.
#[derive(Debug)]
pub enum Incoming {
    /// Stream header (`<stream:stream>` or `<open/>`) with its attributes.
    Open(Vec<(String, String)>),
    /// A complete stanza or nonza.
    Stanza(Element),
    /// The client closed the stream.
    Close,
    /// The client broke the rules: send this error and close.
    Error(StreamError, String),
    /// The connection is gone.
    Eof,
    /// The connection died without a close: TCP keepalive probes went unanswered.
    Vanished,
}

/// A byte stream, plain or TLS.
pub enum ByteStream {
    /// Before STARTTLS.
    Plain(TcpStream),
    /// After STARTTLS or on the direct-TLS port: rustls with buffers we own, which hold
    /// nothing while the client is idle (see [`crate::lean_tls`]).
    Tls(Box<LeanTls>),
}

/// The connection under a session.
pub enum Transport {
    /// TCP, XML stream framing.
    Stream {
        /// The socket.
        io: ByteStream,
        /// Stanza framer.
        framer: Framer,
    },
    /// Gone: used while the socket is being upgraded, and after a failed upgrade.
    Closed,
    /// WebSocket, one element per frame.
    Ws {
        /// The socket.
        ws: Box<WebSocket>,
        /// Bound on one frame.
        stanza_bytes_max: usize,
        /// Over TLS (`wss://`): the HTTP listener's default.
        secure: bool,
    },
}

/// Bytes read per call: one TLS record's worth of plaintext.
const READ_CHUNK_BYTES: usize = lean_tls::READ_BYTES;

thread_local! {
    /// The read buffer, one per runtime thread rather than one per connection: memory per
    /// connection is what bounds how many clients one server holds, and an idle connection
    /// would otherwise keep a buffer it almost never uses. A read fills it and hands the bytes
    /// to the connection's framer in the same poll, so nothing stays in it across an await.
    /// TLS reads put the connection's partial record in front of the bytes read, and decrypt
    /// in place, hence the room for one more record.
    static READ_SCRATCH: RefCell<Vec<u8>> =
        RefCell::new(vec![0; READ_CHUNK_BYTES + lean_tls::MAX_RECORD_BYTES]);
}

/// Runs `f` with this thread's read buffer (see `READ_SCRATCH`): nothing may stay in it after.
pub(crate) fn with_read_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    READ_SCRATCH.with_borrow_mut(f)
}

/// Reads once from `io` into the thread's scratch buffer and feeds what arrived (decrypted,
/// for TLS) to `framer`. Returns the bytes taken in, 0 at the end of the stream. Cancel-safe:
/// bytes are in the framer before the future completes, and a pending poll has consumed
/// nothing.
async fn read_into(io: &mut ByteStream, framer: &mut Framer) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        READ_SCRATCH.with_borrow_mut(|scratch| match io {
            ByteStream::Plain(s) => {
                let mut rb = ReadBuf::new(&mut scratch[..READ_CHUNK_BYTES]);
                match Pin::new(s).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n > 0 {
                            framer.feed(rb.filled());
                        }
                        Poll::Ready(Ok(n))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
            ByteStream::Tls(s) => s.poll_read(cx, scratch, &mut |plain| framer.feed(plain)),
        })
    })
    .await
}

impl Transport {
    /// A TCP transport.
    pub fn stream(io: ByteStream, limits: FramerLimits) -> Self {
        Transport::Stream {
            io,
            framer: Framer::new(limits),
        }
    }

    /// True when the bytes are encrypted (TLS on this hop).
    pub fn is_secure(&self) -> bool {
        matches!(
            self,
            Transport::Stream {
                io: ByteStream::Tls(_),
                ..
            } | Transport::Ws { secure: true, .. }
        )
    }

    /// True for WebSocket framing.
    pub fn is_websocket(&self) -> bool {
        matches!(self, Transport::Ws { .. })
    }

    /// Upgrades a plain TCP stream to TLS (STARTTLS). False when the handshake failed; the
    /// transport is then closed. The caller bounds the time it takes.
    pub async fn starttls(
        &mut self,
        config: &Arc<rustls::ServerConfig>,
        limits: FramerLimits,
    ) -> bool {
        let Transport::Stream {
            io: ByteStream::Plain(tcp),
            ..
        } = std::mem::replace(self, Transport::Closed)
        else {
            return false;
        };
        // Boxed: the handshake's state is needed once, not for the connection's life.
        match Box::pin(lean_tls::accept(tcp, config.clone())).await {
            Ok(tls) => {
                *self = Transport::stream(ByteStream::Tls(Box::new(tls)), limits);
                true
            }
            Err(_) => false,
        }
    }

    /// Next event from the client. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn next(&mut self) -> Incoming {
        match self {
            Transport::Closed => Incoming::Eof,
            Transport::Stream { io, framer } => loop {
                if let Some(ev) = framer.next_event() {
                    return match ev {
                        FramerEvent::StreamOpen { attrs, .. } => Incoming::Open(attrs),
                        FramerEvent::Stanza(el) => Incoming::Stanza(el),
                        FramerEvent::StreamClose => Incoming::Close,
                        FramerEvent::Error(e, t) => Incoming::Error(e, t),
                    };
                }
                match read_into(io, framer).await {
                    Ok(0) => return Incoming::Eof,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Incoming::Vanished
                    }
                    Err(_) => return Incoming::Eof,
                    Ok(_) => {}
                }
            },
            Transport::Ws {
                ws,
                stanza_bytes_max,
                ..
            } => loop {
                let msg = match ws.recv().await {
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => return ws_error(e, *stanza_bytes_max),
                    None => return Incoming::Eof,
                };
                let text = match msg {
                    WsMessage::Text(t) => t,
                    WsMessage::Close(_) => return Incoming::Eof,
                    WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                    WsMessage::Binary(_) => {
                        return Incoming::Error(
                            StreamError::BadFormat,
                            "RFC 7395 frames are text".into(),
                        )
                    }
                };
                if text.len() > *stanza_bytes_max {
                    return Incoming::Error(
                        StreamError::PolicyViolation,
                        format!("stanza larger than stanza_bytes_max ({stanza_bytes_max} bytes)"),
                    );
                }
                tracing::trace!(frame = %text.as_str(), "ws frame");
                return match Element::parse(text.as_bytes(), ns::CLIENT) {
                    Ok(el) if el.is("open", ns::FRAMING) => Incoming::Open(el.attrs),
                    Ok(el) if el.is("close", ns::FRAMING) => Incoming::Close,
                    Ok(el) => Incoming::Stanza(el),
                    Err(pchat_xmpp::element::ParseError::Restricted(what)) => Incoming::Error(
                        StreamError::RestrictedXml,
                        format!("{what} are not allowed"),
                    ),
                    Err(e) => Incoming::Error(StreamError::NotWellFormed, e.to_string()),
                };
            },
        }
    }

    /// Writes serialized output. For WebSocket, `frames` are sent one per frame; for TCP they
    /// are written back to back in one write.
    pub async fn send(&mut self, frames: &[String]) -> std::io::Result<()> {
        match self {
            Transport::Closed => Err(std::io::ErrorKind::NotConnected.into()),
            Transport::Stream { io, framer } => {
                if frames.len() == 1 {
                    write_all(io, framer, frames[0].as_bytes()).await
                } else {
                    let joined = frames.concat();
                    write_all(io, framer, joined.as_bytes()).await
                }
            }
            Transport::Ws { ws, .. } => {
                // Queue every frame, then flush once: one write (one TLS record, one segment)
                // per batch instead of one per frame.
                let broken = |e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e);
                for f in frames {
                    ws.feed(WsMessage::Text(f.clone().into()))
                        .await
                        .map_err(broken)?;
                }
                ws.flush().await.map_err(broken)
            }
        }
    }

    /// Resets the framer for a stream restart (after STARTTLS and after SASL success).
    pub fn restart(&mut self) {
        if let Transport::Stream { framer, .. } = self {
            framer.reset();
        }
    }

    /// Closes the connection after output is flushed.
    pub async fn shutdown(&mut self) {
        match self {
            Transport::Closed => {}
            Transport::Stream {
                io: ByteStream::Plain(s),
                ..
            } => {
                let _ = s.shutdown().await;
            }
            Transport::Stream {
                io: ByteStream::Tls(s),
                ..
            } => {
                let _ = s.shutdown().await;
            }
            Transport::Ws { ws, .. } => {
                let _ = ws.send(WsMessage::Close(None)).await;
            }
        }
    }
}

/// What a failed WebSocket read means for the session. tungstenite refuses a frame or
/// message larger than `max_frame_size`/`max_message_size` (both the stanza limit) as soon as
/// its header announces it, before buffering it: that is the client breaking the stanza limit.
fn ws_error(e: axum::Error, stanza_bytes_max: usize) -> Incoming {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => Incoming::Error(
                StreamError::PolicyViolation,
                format!("stanza larger than stanza_bytes_max ({stanza_bytes_max} bytes)"),
            ),
            tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                Incoming::Vanished
            }
            _ => Incoming::Eof,
        },
        Err(_) => Incoming::Eof,
    }
}

async fn write_all(io: &mut ByteStream, framer: &mut Framer, bytes: &[u8]) -> std::io::Result<()> {
    match io {
        ByteStream::Plain(s) => s.write_all(bytes).await,
        // Data rustls decrypted but did not deliver yet (only before the first read) goes to
        // the framer, in order, as a read would have put it.
        ByteStream::Tls(s) => {
            s.encrypt(bytes, &mut |plain| framer.feed(plain))?;
            s.flush().await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt as _;

    use super::*;
    use crate::lean_tls::testing::{configs, tcp_pair, TestClient};

    const T: Duration = Duration::from_secs(10);
    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>";

    async fn next(t: &mut Transport) -> Incoming {
        tokio::time::timeout(T, t.next())
            .await
            .expect("no event in time")
    }

    /// A STARTTLS upgrade where the client's stream header travels in the same write as its
    /// Finished (as clients do), then the session's first read.
    async fn upgraded(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Transport, TestClient) {
        let (server_cfg, client_cfg) = configs(versions);
        let (s, c) = tcp_pair().await;
        let mut t = Transport::stream(ByteStream::Plain(s), FramerLimits::default());
        let mut client = TestClient::new(c, client_cfg);
        let (ok, ()) = tokio::join!(t.starttls(&server_cfg, FramerLimits::default()), async {
            client.handshake_until_finished().await;
            client.queue(HEADER.as_bytes());
            client.flush().await;
        });
        assert!(ok);
        assert!(t.is_secure());
        match next(&mut t).await {
            Incoming::Open(attrs) => {
                assert!(attrs.iter().any(|(k, v)| k == "to" && v == "example.org"));
            }
            other => panic!("expected the stream header, got {other:?}"),
        }
        (t, client)
    }

    #[tokio::test]
    async fn header_sent_with_the_finished_opens_the_stream() {
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            upgraded(versions).await;
        }
    }

    #[tokio::test]
    async fn stanza_split_across_records_and_reads_arrives_whole() {
        let (mut t, mut client) = upgraded(&[&rustls::version::TLS13]).await;
        client.queue(b"<message to='r@x'><bo");
        client.queue(b"dy>split ");
        client.queue(b"across records</body></message>");
        let wire = client.take_tls();
        for piece in [
            &wire[..2],
            &wire[2..41],
            &wire[41..wire.len() - 9],
            &wire[wire.len() - 9..],
        ] {
            client.tcp.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match next(&mut t).await {
            Incoming::Stanza(el) => {
                assert_eq!(
                    el.child_text("body", ns::CLIENT).as_deref(),
                    Some("split across records")
                );
            }
            other => panic!("expected a stanza, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn large_stanzas_both_ways() {
        let (mut t, mut client) = upgraded(&[&rustls::version::TLS13]).await;
        let body: String = (0..100 * 1024)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        let stanza = format!("<message><body>{body}</body></message>");
        client.conn.set_buffer_limit(None);
        client.queue(stanza.as_bytes());
        let (inc, ()) = tokio::join!(next(&mut t), client.flush());
        match inc {
            Incoming::Stanza(el) => {
                assert_eq!(el.child_text("body", ns::CLIENT), Some(body.clone()))
            }
            other => panic!("expected a stanza, got {other:?}"),
        }
        let frames = vec![stanza.clone(), "<r/>".to_owned()];
        t.send(&frames).await.unwrap();
        let want = stanza.len() + 4;
        tokio::time::timeout(T, client.read_until(want))
            .await
            .unwrap();
        assert_eq!(client.received, format!("{stanza}<r/>").as_bytes());
    }

    #[tokio::test]
    async fn close_notify_is_the_end_of_the_stream() {
        let (mut t, mut client) = upgraded(&[&rustls::version::TLS13]).await;
        client.queue(b"<presence/>");
        client.conn.send_close_notify();
        client.flush().await;
        assert!(matches!(next(&mut t).await, Incoming::Stanza(_)));
        assert!(matches!(next(&mut t).await, Incoming::Eof));
        t.shutdown().await;
    }
}
