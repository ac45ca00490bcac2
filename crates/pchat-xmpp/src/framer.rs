//! The sans-I/O XMPP stream framer: bytes in, stream header / stanzas / close out.
//!
//! A TCP stream is one never-ending XML document, so a plain XML parser cannot hand out stanzas
//! as they complete. The framer scans just enough syntax (tags, quotes, CDATA) to find where each
//! top-level child of `<stream:stream>` ends, enforces the limits before anything is allocated
//! for a stanza, and hands the complete bytes to [`Element::parse`]. It refuses what RFC 6120
//! §11.1 forbids (DTDs, entity declarations, comments, processing instructions) as soon as it
//! sees them, so an entity-expansion attack never reaches a parser.

use crate::element::{Element, ParseError};
use crate::error::StreamError;
use crate::ns;

/// Capacity an idle framer may keep after a large stanza.
const SPARE_BYTES_MAX: usize = 16 * 1024;

/// Bounds the framer enforces.
#[derive(Clone, Copy, Debug)]
pub struct FramerLimits {
    /// Largest stanza, in bytes, as it appears on the wire.
    pub stanza_bytes_max: usize,
    /// Largest stream header, in bytes.
    pub header_bytes_max: usize,
}

impl Default for FramerLimits {
    fn default() -> Self {
        FramerLimits {
            stanza_bytes_max: 256 * 1024,
            header_bytes_max: 4096,
        }
    }
}

/// What the framer found in the bytes fed so far.
#[derive(Debug, PartialEq, Eq)]
pub enum FramerEvent {
    /// `<stream:stream …>` with its attributes (qualified names as written).
    StreamOpen {
        /// Attributes other than namespace declarations.
        attrs: Vec<(String, String)>,
        /// The default namespace the header declared.
        default_ns: String,
    },
    /// One complete top-level element.
    Stanza(Element),
    /// `</stream:stream>`.
    StreamClose,
    /// The peer broke the rules; send this stream error and close.
    Error(StreamError, String),
}

/// Incremental stream framer. Feed it bytes with [`Framer::feed`], then drain events with
/// [`Framer::next_event`] until it returns `None`.
#[derive(Debug)]
pub struct Framer {
    limits: FramerLimits,
    buf: Vec<u8>,
    /// Where scanning resumes: always at a token boundary.
    pos: usize,
    /// 0 before the header, 1 inside the stream, 2+ inside a stanza.
    depth: usize,
    stanza_start: usize,
    default_ns: String,
    failed: bool,
}

impl Framer {
    /// A framer for a new stream.
    pub fn new(limits: FramerLimits) -> Self {
        Framer {
            limits,
            // Grows with the first bytes; idle connections keep nothing in advance.
            buf: Vec::new(),
            pos: 0,
            depth: 0,
            stanza_start: 0,
            default_ns: ns::CLIENT.to_owned(),
            failed: false,
        }
    }

    /// Forgets everything: used on stream restart (after STARTTLS and SASL success).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.depth = 0;
        self.stanza_start = 0;
        self.failed = false;
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn fail(&mut self, e: StreamError, text: impl Into<String>) -> Option<FramerEvent> {
        self.failed = true;
        Some(FramerEvent::Error(e, text.into()))
    }

    /// The next complete event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<FramerEvent> {
        if self.failed {
            return None;
        }
        if let Some(ev) = self.scan() {
            return Some(ev);
        }
        // Waiting for more bytes: bound what a peer can make us buffer, inside a stanza or
        // before a header, before any of it is parsed.
        if self.depth >= 2 && self.buf.len() - self.stanza_start > self.limits.stanza_bytes_max {
            return self.fail(StreamError::PolicyViolation, self.too_large());
        }
        if self.depth < 2
            && self.buf.len()
                > self
                    .limits
                    .header_bytes_max
                    .max(self.limits.stanza_bytes_max)
        {
            return self.fail(
                StreamError::PolicyViolation,
                "too many bytes without a complete element",
            );
        }
        None
    }

    fn too_large(&self) -> String {
        format!(
            "stanza larger than stanza_bytes_max ({} bytes)",
            self.limits.stanza_bytes_max
        )
    }

    fn scan(&mut self) -> Option<FramerEvent> {
        loop {
            let rest = &self.buf[self.pos..];
            let Some(lt) = rest.iter().position(|&b| b == b'<') else {
                if self.depth <= 1 && !rest.iter().all(u8::is_ascii_whitespace) {
                    return self.fail(StreamError::NotWellFormed, "text outside a stanza");
                }
                if self.depth <= 1 {
                    // Whitespace keepalives between stanzas: drop them.
                    self.buf.drain(..);
                    self.pos = 0;
                } else {
                    self.pos = self.buf.len();
                }
                return None;
            };
            if self.depth <= 1 && !rest[..lt].iter().all(u8::is_ascii_whitespace) {
                return self.fail(StreamError::NotWellFormed, "text outside a stanza");
            }
            let start = self.pos + lt;
            let Some(&next) = self.buf.get(start + 1) else {
                self.pos = start;
                return None;
            };
            match next {
                b'?' => {
                    let Some(end) = find(&self.buf[start..], b"?>") else {
                        self.pos = start;
                        return None;
                    };
                    let is_decl = self.depth == 0
                        && self.buf[start..].starts_with(b"<?xml")
                        && self.buf.get(start + 5).is_some_and(u8::is_ascii_whitespace);
                    if !is_decl {
                        return self.fail(
                            StreamError::RestrictedXml,
                            "processing instructions are not allowed",
                        );
                    }
                    self.pos = start + end + 2;
                }
                b'!' => {
                    const CDATA: &[u8] = b"<![CDATA[";
                    let have = &self.buf[start..];
                    if have.len() < CDATA.len() && CDATA.starts_with(have) {
                        self.pos = start;
                        return None;
                    }
                    if !have.starts_with(CDATA) {
                        return self.fail(
                            StreamError::RestrictedXml,
                            "comments, DTDs and entity declarations are not allowed",
                        );
                    }
                    if self.depth < 2 {
                        return self.fail(StreamError::NotWellFormed, "CDATA outside a stanza");
                    }
                    let Some(end) = find(&have[CDATA.len()..], b"]]>") else {
                        self.pos = start;
                        return None;
                    };
                    self.pos = start + CDATA.len() + end + 3;
                }
                b'/' => {
                    let Some(end) = tag_end(&self.buf[start..]) else {
                        self.pos = start;
                        return None;
                    };
                    let after = start + end + 1;
                    match self.depth {
                        0 => {
                            return self.fail(
                                StreamError::NotWellFormed,
                                "end tag before the stream header",
                            )
                        }
                        1 => {
                            self.depth = 0;
                            self.buf.drain(..after);
                            self.pos = 0;
                            return Some(FramerEvent::StreamClose);
                        }
                        2 => {
                            self.depth = 1;
                            return Some(self.take_stanza(after));
                        }
                        _ => {
                            self.depth -= 1;
                            self.pos = after;
                        }
                    }
                }
                _ => {
                    let Some(end) = tag_end(&self.buf[start..]) else {
                        self.pos = start;
                        return None;
                    };
                    let after = start + end + 1;
                    let empty = self.buf[start..after - 1].trim_ascii_end().ends_with(b"/");
                    match self.depth {
                        0 => return Some(self.take_header(start, after, empty)),
                        1 => {
                            self.stanza_start = start;
                            if empty {
                                return Some(self.take_stanza(after));
                            }
                            self.depth = 2;
                            self.pos = after;
                        }
                        d => {
                            if !empty {
                                if d >= crate::element::DEPTH_MAX {
                                    return self.fail(
                                        StreamError::PolicyViolation,
                                        "elements nested too deeply",
                                    );
                                }
                                self.depth += 1;
                            }
                            self.pos = after;
                        }
                    }
                }
            }
        }
    }

    fn take_header(&mut self, start: usize, after: usize, empty: bool) -> FramerEvent {
        if empty {
            self.failed = true;
            return FramerEvent::Error(StreamError::NotWellFormed, "empty stream header".into());
        }
        // Parse the header as an empty element to reuse attribute handling and its checks.
        let mut tag = self.buf[start..after - 1].to_vec();
        tag.extend_from_slice(b"/>");
        self.buf.drain(..after);
        self.pos = 0;
        let el = match parse_header(&tag) {
            Ok(el) => el,
            Err(ParseError::BadNamespacePrefix(p)) => {
                self.failed = true;
                return FramerEvent::Error(
                    StreamError::BadNamespacePrefix,
                    format!("undeclared prefix `{p}`"),
                );
            }
            Err(e) => {
                self.failed = true;
                return FramerEvent::Error(StreamError::NotWellFormed, e.to_string());
            }
        };
        if !el.is("stream", ns::STREAM) {
            self.failed = true;
            return FramerEvent::Error(
                StreamError::InvalidNamespace,
                "expected <stream:stream>".into(),
            );
        }
        self.depth = 1;
        FramerEvent::StreamOpen {
            attrs: el.attrs,
            default_ns: self.default_ns.clone(),
        }
    }

    fn take_stanza(&mut self, after: usize) -> FramerEvent {
        if after - self.stanza_start > self.limits.stanza_bytes_max {
            self.failed = true;
            return FramerEvent::Error(StreamError::PolicyViolation, self.too_large());
        }
        let res = Element::parse(&self.buf[self.stanza_start..after], &self.default_ns);
        self.buf.drain(..after);
        // One large stanza must not pin its buffer for the rest of the connection.
        if self.buf.is_empty() && self.buf.capacity() > SPARE_BYTES_MAX {
            self.buf = Vec::new();
        }
        self.pos = 0;
        self.stanza_start = 0;
        match res {
            Ok(el) => FramerEvent::Stanza(el),
            Err(e) => {
                self.failed = true;
                let cond = match e {
                    ParseError::Restricted(_) => StreamError::RestrictedXml,
                    ParseError::BadNamespacePrefix(_) => StreamError::BadNamespacePrefix,
                    ParseError::TooDeep(_) => StreamError::PolicyViolation,
                    ParseError::NotWellFormed(_) => StreamError::NotWellFormed,
                };
                FramerEvent::Error(cond, e.to_string())
            }
        }
    }
}

fn parse_header(tag: &[u8]) -> Result<Element, ParseError> {
    // The header's default namespace must be jabber:client; the stream prefix is the streams
    // namespace. Element::parse predeclares `stream`, so a header without xmlns:stream works too.
    let el = Element::parse(tag, ns::CLIENT)?;
    Ok(el)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Index of the `>` that closes the tag starting at `tag[0] == '<'`, skipping quoted values.
fn tag_end(tag: &[u8]) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in tag.iter().enumerate().skip(1) {
        match (quote, b) {
            (None, b'"' | b'\'') => quote = Some(b),
            (Some(q), _) if b == q => quote = None,
            (None, b'>') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    fn events(chunks: &[&str], limits: FramerLimits) -> Vec<FramerEvent> {
        let mut f = Framer::new(limits);
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c.as_bytes());
            while let Some(e) = f.next_event() {
                out.push(e);
            }
        }
        out
    }

    fn kinds(evs: &[FramerEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                FramerEvent::StreamOpen { .. } => "open".to_owned(),
                FramerEvent::Stanza(el) => format!("stanza:{}", el.name),
                FramerEvent::StreamClose => "close".to_owned(),
                FramerEvent::Error(c, _) => format!("error:{}", c.condition()),
            })
            .collect()
    }

    #[test]
    fn frames_split_anywhere() {
        let doc = format!(
            "{HEADER} <message to='r@c' a='x>y'><body>a &amp; b<![CDATA[<x>]]></body><x><y/></x></message>\n\
             <presence/><iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>"
        );
        let whole = kinds(&events(&[&doc], FramerLimits::default()));
        assert_eq!(
            whole,
            [
                "open",
                "stanza:message",
                "stanza:presence",
                "stanza:iq",
                "close"
            ]
        );
        // Every split point gives the same events.
        for i in 1..doc.len() {
            if !doc.is_char_boundary(i) {
                continue;
            }
            let (a, b) = doc.split_at(i);
            assert_eq!(
                kinds(&events(&[a, b], FramerLimits::default())),
                whole,
                "split at {i}"
            );
        }
        let evs = events(&[&doc], FramerLimits::default());
        let FramerEvent::Stanza(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(m.ns, ns::CLIENT);
        assert_eq!(m.get_attr("a"), Some("x>y"));
        assert_eq!(
            m.child_text("body", ns::CLIENT).as_deref(),
            Some("a & b<x>")
        );
    }

    #[test]
    fn refuses_bad_input() {
        let lim = FramerLimits {
            stanza_bytes_max: 100,
            header_bytes_max: 300,
        };
        let cases: &[(&str, &str)] = &[
            (
                "<!DOCTYPE stream [<!ENTITY x 'y'>]>",
                "error:restricted-xml",
            ),
            ("{H}<!DOCTYPE x>", "error:restricted-xml"),
            (
                "{H}<message><!ENTITY x 'lol'></message>",
                "error:restricted-xml",
            ),
            (
                "{H}<message><body>&lol;</body></message>",
                "error:restricted-xml",
            ),
            ("{H}<!-- hi -->", "error:restricted-xml"),
            ("{H}<?php x?>", "error:restricted-xml"),
            ("{H}hello", "error:not-well-formed"),
            (
                "{H}<message><body></message></stream:stream>",
                "error:not-well-formed",
            ),
            ("{H}<q:message/>", "error:bad-namespace-prefix"),
            ("<foo xmlns='jabber:client'>", "error:invalid-namespace"),
        ];
        for (input, expect) in cases {
            let input = input.replace("{H}", HEADER);
            let k = kinds(&events(&[&input], lim));
            assert_eq!(k.last().map(String::as_str), Some(*expect), "{input}");
        }
        let big = format!(
            "{HEADER}<message><body>{}</body></message>",
            "x".repeat(200)
        );
        assert_eq!(
            kinds(&events(&[&big], lim)),
            ["open", "error:policy-violation"]
        );
        // An unterminated huge stanza is refused before it completes.
        let half = format!("{HEADER}<message><body>{}", "x".repeat(200));
        assert_eq!(
            kinds(&events(&[&half], lim)),
            ["open", "error:policy-violation"]
        );
        let deep = format!("{HEADER}<a>{}", "<a>".repeat(100));
        let lim2 = FramerLimits {
            stanza_bytes_max: 100_000,
            header_bytes_max: 300,
        };
        assert_eq!(
            kinds(&events(&[&deep], lim2)),
            ["open", "error:policy-violation"]
        );
    }

    #[test]
    fn restart_resets() {
        let mut f = Framer::new(FramerLimits::default());
        f.feed(HEADER.as_bytes());
        assert!(matches!(
            f.next_event(),
            Some(FramerEvent::StreamOpen { .. })
        ));
        f.reset();
        f.feed(HEADER.as_bytes());
        assert!(matches!(
            f.next_event(),
            Some(FramerEvent::StreamOpen { .. })
        ));
        assert_eq!(f.next_event(), None);
    }
}
