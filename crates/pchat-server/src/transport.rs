//! Transports a client session runs over: a TCP stream (plain until STARTTLS, or TLS from the
//! first byte) framed by [`Framer`], or a WebSocket carrying one element per text frame
//! (RFC 7395). The session logic above sees the same events for both.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::Poll;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures_util::SinkExt as _;
use pchat_xmpp::{ns, Element, Framer, FramerEvent, FramerLimits, StreamError};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

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
}

/// A byte stream, plain or TLS.
pub enum ByteStream {
    /// Before STARTTLS.
    Plain(TcpStream),
    /// After STARTTLS or on the direct-TLS port.
    Tls(Box<TlsStream<TcpStream>>),
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
    },
}

/// Bytes read per call: one TLS record's worth of plaintext.
const READ_CHUNK_BYTES: usize = 16 * 1024;

thread_local! {
    /// The read buffer, one per runtime thread rather than one per connection: memory per
    /// connection is what bounds how many clients one server holds, and an idle connection
    /// would otherwise keep a buffer it almost never uses. A read fills it and hands the bytes
    /// to the connection's framer in the same poll, so nothing stays in it across an await.
    static READ_SCRATCH: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; READ_CHUNK_BYTES].into_boxed_slice());
}

/// Reads once from `io` into the thread's scratch buffer and feeds what arrived to `framer`.
/// Returns the byte count (0 = end of stream). Cancel-safe: bytes are in the framer before
/// the future completes, and a pending poll has consumed nothing.
async fn read_into(io: &mut ByteStream, framer: &mut Framer) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        READ_SCRATCH.with_borrow_mut(|scratch| {
            let mut rb = ReadBuf::new(scratch);
            let polled = match io {
                ByteStream::Plain(s) => Pin::new(s).poll_read(cx, &mut rb),
                ByteStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, &mut rb),
            };
            match polled {
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
            }
        )
    }

    /// True for WebSocket framing.
    pub fn is_websocket(&self) -> bool {
        matches!(self, Transport::Ws { .. })
    }

    /// Upgrades a plain TCP stream to TLS (STARTTLS). False when the handshake failed; the
    /// transport is then closed.
    pub async fn starttls(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        limits: FramerLimits,
    ) -> bool {
        let Transport::Stream {
            io: ByteStream::Plain(tcp),
            ..
        } = std::mem::replace(self, Transport::Closed)
        else {
            return false;
        };
        match acceptor.accept(tcp).await {
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
                    Ok(0) | Err(_) => return Incoming::Eof,
                    Ok(_) => {}
                }
            },
            Transport::Ws {
                ws,
                stanza_bytes_max,
            } => loop {
                let Some(Ok(msg)) = ws.recv().await else {
                    return Incoming::Eof;
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
            Transport::Stream { io, .. } => {
                if frames.len() == 1 {
                    write_all(io, frames[0].as_bytes()).await
                } else {
                    let joined = frames.concat();
                    write_all(io, joined.as_bytes()).await
                }
            }
            Transport::Ws { ws, .. } => {
                // Queue every frame, then flush once: one write per batch instead of one per
                // frame. The HTTP listener's sockets do not set TCP_NODELAY, and back-to-back
                // small writes then wait for the client's delayed ACK (~40 ms each).
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

async fn write_all(io: &mut ByteStream, bytes: &[u8]) -> std::io::Result<()> {
    match io {
        ByteStream::Plain(s) => s.write_all(bytes).await,
        ByteStream::Tls(s) => {
            s.write_all(bytes).await?;
            s.flush().await
        }
    }
}
