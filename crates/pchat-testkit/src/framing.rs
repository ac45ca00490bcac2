//! Incoming side of a connection: turns bytes (TCP) or text frames (WebSocket) into a sequence
//! of [`Incoming`] events on a channel.
//!
//! Reading runs in its own task so that [`crate::Client::recv`] can time out by dropping a
//! channel receive, which is cancel-safe, instead of dropping a half-finished XML parse. On TCP
//! the parser is incremental: quick-xml pulls from a buffered reader, so a stanza split across
//! any number of TCP segments is assembled before it is delivered.

use quick_xml::events::Event;
use quick_xml::NsReader;
use tokio::io::{BufReader, ReadHalf};
use tokio::sync::mpsc;

use crate::client::BoxedIo;
use crate::element::{self, Element, TreeBuilder};
use crate::ns;

/// One thing that arrived from the server.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A stream header (`<stream:stream>` or WebSocket `<open/>`) with its raw attributes,
    /// namespace declarations included.
    Open(Vec<(String, String)>),
    /// A complete top-level element: a stanza, features, a SASL or TLS element, a stream error.
    Element(Element),
    /// The server closed the XML stream (`</stream:stream>` or `<close/>`).
    Closed,
    /// The transport ended without the stream being closed first.
    Eof,
    /// The transport failed or the server sent bytes that are not valid XMPP XML.
    Failed(String),
}

/// The buffered read side of a TCP or TLS connection, handed back when a stream ends in a reset.
pub(crate) type TcpReadSide = BufReader<ReadHalf<BoxedIo>>;

/// True for the two elements after which RFC 6120 restarts the stream on the same connection:
/// STARTTLS `<proceed/>` and SASL `<success/>`. The parser for the old stream must stop there,
/// because the bytes that follow belong to a new document (or to TLS).
fn ends_stream_epoch(e: &Element) -> bool {
    e.is("proceed", ns::TLS) || e.is("success", ns::SASL)
}

/// Reads one XML stream from `source` until it ends. Returns the reader when the stream ended
/// in a reset (proceed/success) so that the caller can start a new stream or TLS on it.
pub(crate) async fn read_tcp_stream(
    source: TcpReadSide,
    events: mpsc::Sender<Incoming>,
    stanza_bytes_max: usize,
) -> Option<TcpReadSide> {
    let mut reader = NsReader::from_reader(source);
    let mut buf = Vec::new();
    let mut tree = TreeBuilder::default();
    let mut opened = false;
    // Bytes read since the current top-level element started; bounds memory per stanza.
    let mut stanza_start = 0u64;
    loop {
        buf.clear();
        let (resolved, event) = match reader.read_resolved_event_into_async(&mut buf).await {
            Ok(pair) => pair,
            Err(e) => {
                let _ = events
                    .send(Incoming::Failed(format!("XML error: {e}")))
                    .await;
                return None;
            }
        };
        // Resolve now: the resolution borrows the reader, which we need again below.
        let resolved = element::namespace_string(resolved);
        let result: Result<Option<Incoming>, String> = match event {
            Event::Decl(_) if !opened => Ok(None),
            Event::Start(start) if !opened => match resolved {
                Ok(uri) if uri == ns::STREAMS && start.local_name().as_ref() == b"stream" => {
                    opened = true;
                    element::raw_attrs(&start)
                        .map(|a| Some(Incoming::Open(a)))
                        .map_err(|e| e.to_string())
                }
                Ok(uri) => Err(format!(
                    "expected <stream:stream>, got <{}> in namespace {uri:?}",
                    String::from_utf8_lossy(start.local_name().as_ref())
                )),
                Err(e) => Err(e.to_string()),
            },
            Event::Start(start) => {
                if tree.depth() == 0 {
                    stanza_start = reader.buffer_position();
                }
                element::element_from_start(resolved, &start)
                    .map(|el| {
                        tree.start(el);
                        None
                    })
                    .map_err(|e| e.to_string())
            }
            Event::Empty(_) if !opened => Err("the stream header must not be empty".into()),
            Event::Empty(start) => element::element_from_start(resolved, &start)
                .map(|el| tree.empty(el).map(Incoming::Element))
                .map_err(|e| e.to_string()),
            Event::End(_) if tree.depth() == 0 => {
                // The reader has checked that this end tag matches the open stream header.
                let _ = events.send(Incoming::Closed).await;
                return None;
            }
            Event::End(_) => Ok(tree.end().map(Incoming::Element)),
            Event::Text(text) => match text.unescape() {
                Ok(text) if tree.depth() > 0 => {
                    tree.text(&text);
                    Ok(None)
                }
                // Whitespace between stanzas is a legal keepalive (RFC 6120 §4.6.1).
                Ok(text) if text.trim().is_empty() => Ok(None),
                Ok(text) => Err(format!("text {text:?} outside any stanza")),
                Err(e) => Err(format!("bad character data: {e}")),
            },
            Event::CData(data) if tree.depth() > 0 => match std::str::from_utf8(&data) {
                Ok(data) => {
                    tree.text(data);
                    Ok(None)
                }
                Err(e) => Err(format!("CDATA is not UTF-8: {e}")),
            },
            Event::CData(_) => Err("CDATA outside any stanza".into()),
            // RFC 6120 §11.1 forbids these in XMPP streams; a client must not accept them.
            Event::Comment(_) => Err("restricted XML: comment".into()),
            Event::PI(_) => Err("restricted XML: processing instruction".into()),
            Event::DocType(_) => Err("restricted XML: DTD".into()),
            Event::Decl(_) => Err("restricted XML: XML declaration inside the stream".into()),
            Event::Eof => {
                let _ = events.send(Incoming::Eof).await;
                return None;
            }
        };
        match result {
            Ok(None) => {
                if tree.depth() > 0
                    && reader.buffer_position() - stanza_start > stanza_bytes_max as u64
                {
                    let _ = events
                        .send(Incoming::Failed(format!(
                            "a stanza exceeded {stanza_bytes_max} bytes"
                        )))
                        .await;
                    return None;
                }
            }
            Ok(Some(Incoming::Element(el))) => {
                let reset = ends_stream_epoch(&el);
                if events.send(Incoming::Element(el)).await.is_err() {
                    return None;
                }
                if reset {
                    return Some(reader.into_inner());
                }
            }
            Ok(Some(other)) => {
                if events.send(other).await.is_err() {
                    return None;
                }
            }
            Err(message) => {
                let _ = events.send(Incoming::Failed(message)).await;
                return None;
            }
        }
    }
}

/// Classifies one RFC 7395 text frame. Each frame must be one complete element with all its
/// namespaces declared, because WebSocket framing has no enclosing stream element.
pub(crate) fn classify_ws_frame(text: &str) -> Option<Incoming> {
    if text.trim().is_empty() {
        return None;
    }
    let el = match Element::parse(text) {
        Ok(el) => el,
        Err(e) => {
            return Some(Incoming::Failed(format!(
                "bad WebSocket frame {text:?}: {e}"
            )))
        }
    };
    if el.is("open", ns::FRAMING) {
        let attrs = el
            .attrs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Incoming::Open(attrs))
    } else if el.is("close", ns::FRAMING) {
        Some(Incoming::Closed)
    } else {
        Some(Incoming::Element(el))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Feeds `chunks` with pauses between them and collects what the reader reports.
    async fn read_chunks(chunks: &[&str]) -> Vec<String> {
        let (client, mut server) = tokio::io::duplex(64);
        let io: BoxedIo = Box::new(client);
        let (read, _write) = tokio::io::split(io);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(read_tcp_stream(BufReader::new(read), tx, 1 << 20));
        for chunk in chunks {
            server.write_all(chunk.as_bytes()).await.unwrap();
            tokio::task::yield_now().await;
        }
        drop(server);
        let mut out = Vec::new();
        while let Some(ev) = rx.recv().await {
            out.push(match ev {
                Incoming::Open(a) => format!("open {}", a.len()),
                Incoming::Element(e) => e.to_xml(),
                Incoming::Closed => "closed".into(),
                Incoming::Eof => "eof".into(),
                Incoming::Failed(m) => format!("failed: {m}"),
            });
        }
        let _ = task.await;
        out
    }

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='localhost' version='1.0'>";

    #[tokio::test]
    async fn assembles_stanzas_split_across_reads() {
        let got = read_chunks(&[
            &HEADER[..20],
            &HEADER[20..],
            " <message to='a'><bo",
            "dy>h&amp;",
            "i</body></message>\n<presence/></stream:stream>",
        ])
        .await;
        assert_eq!(
            got,
            [
                "open 5",
                "<message xmlns='jabber:client' to='a'><body>h&amp;i</body></message>",
                "<presence xmlns='jabber:client'/>",
                "closed"
            ]
        );
    }

    #[tokio::test]
    async fn reports_eof_and_restricted_xml() {
        assert_eq!(read_chunks(&[HEADER]).await, ["open 5", "eof"]);
        let got = read_chunks(&[HEADER, "<!-- hi -->"]).await;
        assert_eq!(got[1], "failed: restricted XML: comment");
        let got = read_chunks(&[HEADER, "<a></b>"]).await;
        assert!(got[1].starts_with("failed: XML error"), "{got:?}");
    }

    #[tokio::test]
    async fn stops_after_sasl_success() {
        let got = read_chunks(&[
            HEADER,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/><stream:stream>",
        ])
        .await;
        assert_eq!(got.len(), 2, "{got:?}");
    }
}
