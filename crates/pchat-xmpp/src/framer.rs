//! The sans-I/O XMPP stream framer: bytes in, stream header / stanzas / close out.
//!
//! A TCP stream is one never-ending XML document, so a plain XML parser cannot hand out stanzas
//! as they complete. The framer scans just enough syntax (tags, quotes, CDATA) to find where each
//! top-level child of `<stream:stream>` ends, enforces the limits before anything is allocated
//! for a stanza, and hands the complete bytes to the element parser. It refuses what RFC 6120
//! §11.1 forbids (DTDs, entity declarations, comments, processing instructions) as soon as it
//! sees them, so an entity-expansion attack never reaches a parser.
//!
//! It is a byte-at-a-time state machine: every byte is looked at once, whatever the sizes of
//! the reads, so a stanza trickled in one byte per read costs what it costs in one read (no
//! rescan of an unfinished tag). Because the state after a byte depends only on the bytes
//! before it, every way of splitting the input yields the same events. While scanning it also
//! checks what a conforming XML parser at the other end would refuse, so that pchat never
//! relays it:
//! - every byte is well-formed UTF-8 and every character is one XML 1.0 allows (its `Char`
//!   production: no control characters but tab, line feed and carriage return, no surrogates,
//!   no U+FFFE/U+FFFF); character *references* are checked by the element parser;
//! - every end tag names the element it closes (a mismatch is refused when it arrives, rather
//!   than leaving the stream waiting for an end that never comes).
//!
//! Both are stream errors (`not-well-formed`, RFC 6120 §4.9.3.13), not stanza errors: such
//! bytes make the rest of the stream unparseable for an XML parser, so there is no stanza
//! boundary left to trust.

use crate::element::{self, Element, ParseError};
use crate::error::StreamError;
use crate::ns;

/// Capacity an idle framer may keep after a large stanza.
const SPARE_BYTES_MAX: usize = 16 * 1024;

/// How much of a name an error text quotes: enough to recognise it, never a whole stanza.
const QUOTED_NAME_BYTES_MAX: usize = 64;

/// Bounds the framer enforces.
#[derive(Clone, Copy, Debug)]
pub struct FramerLimits {
    /// Largest stanza, in bytes, as it appears on the wire.
    pub stanza_bytes_max: usize,
    /// Largest stream header (and XML declaration before it), in bytes.
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

/// Where the scanner is, lexically. Positions are offsets into the framer's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    /// Character data (inside a stanza) or whitespace (between stanzas).
    Text,
    /// Just after `<`.
    Open,
    /// In the name of a start tag, which began at `tag_start + 1`.
    StartName,
    /// In a start tag after its name: attributes. `quote` is the open quote, if any; `slash`
    /// is set after a `/` outside quotes, which must be followed by `>`.
    StartTag { quote: Option<u8>, slash: bool },
    /// In the name of an end tag, which began at `tag_start + 2`.
    EndName,
    /// After an end tag's name: only whitespace may come before `>`.
    EndTail,
    /// In `<?…`: `matched` bytes of `<?xml` seen so far, saturating (an XML declaration is
    /// the only processing instruction allowed, and only before the header).
    Pi { matched: u8, question: bool },
    /// In `<!…`: `matched` bytes of `<![CDATA[` seen so far.
    Bang { matched: u8 },
    /// In a CDATA section; `brackets` counts the `]` just before (up to 2).
    CData { brackets: u8 },
}

/// Incremental UTF-8 decoding, so that characters split across reads are checked whole.
#[derive(Clone, Copy, Debug, Default)]
struct Utf8 {
    /// Continuation bytes still expected.
    need: u8,
    /// The code point decoded so far.
    cp: u32,
    /// The smallest code point this sequence length may encode (longer is overlong).
    min: u32,
}

impl Utf8 {
    /// Takes one byte; an error names what is wrong.
    fn push(&mut self, b: u8) -> Result<(), String> {
        if self.need == 0 {
            let (need, cp, min) = match b {
                0x00..=0x7f => {
                    return if b >= 0x20 || matches!(b, b'\t' | b'\n' | b'\r') {
                        Ok(())
                    } else {
                        Err(forbidden(u32::from(b)))
                    }
                }
                0xc2..=0xdf => (1, b & 0x1f, 0x80),
                0xe0..=0xef => (2, b & 0x0f, 0x800),
                0xf0..=0xf4 => (3, b & 0x07, 0x1_0000),
                _ => return Err("invalid UTF-8".into()),
            };
            *self = Utf8 {
                need,
                cp: u32::from(cp),
                min,
            };
            return Ok(());
        }
        if b & 0xc0 != 0x80 {
            return Err("invalid UTF-8".into());
        }
        self.cp = (self.cp << 6) | u32::from(b & 0x3f);
        self.need -= 1;
        if self.need > 0 {
            return Ok(());
        }
        if self.cp < self.min || self.cp > 0x10_ffff {
            return Err("invalid UTF-8".into());
        }
        if !element::is_xml_char_code(self.cp) {
            return Err(forbidden(self.cp));
        }
        Ok(())
    }
}

fn forbidden(cp: u32) -> String {
    format!("character U+{cp:04X} is not allowed in XML")
}

/// Incremental stream framer. Feed it bytes with [`Framer::feed`], then drain events with
/// [`Framer::next_event`] until it returns `None`.
#[derive(Debug)]
pub struct Framer {
    limits: FramerLimits,
    /// Bytes of the unfinished element (or tag) and bytes not yet scanned.
    buf: Vec<u8>,
    /// Bytes before `pos` have been scanned.
    pos: usize,
    lex: Lex,
    utf8: Utf8,
    /// Where the tag being scanned starts (its `<`).
    tag_start: usize,
    /// Where the name of the tag being scanned ends (start tags).
    name_end: usize,
    /// Where the current top-level stanza starts (its `<`), when one is open.
    stanza_start: usize,
    /// 0 before the header, 1 inside the stream, 2+ inside a stanza.
    depth: usize,
    /// Qualified names of the open elements, the stream header first, each followed by its
    /// length (4 bytes, little-endian) so the innermost is found from the end. Bounded by the
    /// header and stanza limits: the names are part of the bytes they count.
    open: Vec<u8>,
    failed: bool,
    /// Bytes looked at so far: scanned, moved by compaction, or handed to the parser. Kept so
    /// a test can show the work is linear in the input however it is split.
    #[cfg(test)]
    work: u64,
}

/// The default namespace of a client stream's stanzas.
const DEFAULT_NS: &str = ns::CLIENT;

/// Bytes after each name in [`Framer::open`] that hold its length.
const NAME_LEN_BYTES: usize = 4;

impl Framer {
    /// A framer for a new stream.
    pub fn new(limits: FramerLimits) -> Self {
        Framer {
            limits,
            // Grows with the first bytes; idle connections keep nothing in advance.
            buf: Vec::new(),
            pos: 0,
            lex: Lex::Text,
            utf8: Utf8::default(),
            tag_start: 0,
            name_end: 0,
            stanza_start: 0,
            depth: 0,
            open: Vec::new(),
            failed: false,
            #[cfg(test)]
            work: 0,
        }
    }

    /// Counts `n` units of work (tests only).
    #[inline]
    fn count(&mut self, n: usize) {
        #[cfg(test)]
        {
            self.work += n as u64;
        }
        #[cfg(not(test))]
        let _ = n;
    }

    /// Forgets everything: used on stream restart (after STARTTLS and SASL success).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.lex = Lex::Text;
        self.utf8 = Utf8::default();
        self.tag_start = 0;
        self.name_end = 0;
        self.stanza_start = 0;
        self.depth = 0;
        self.open.clear();
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
        let ev = self.scan();
        if ev.is_none() {
            self.compact();
        }
        ev
    }

    /// Drops the bytes no unfinished token needs any more. Called only when every byte has
    /// been scanned, so what is kept is the unfinished stanza or tag alone and each byte moves
    /// at most once: the framer stays linear even when many stanzas arrive in one read.
    fn compact(&mut self) {
        let keep = if self.depth >= 2 {
            self.stanza_start
        } else if self.lex != Lex::Text {
            self.tag_start
        } else {
            self.pos
        };
        if keep > 0 {
            self.count(self.buf.len() - keep);
            self.buf.drain(..keep);
            self.pos -= keep;
            self.tag_start = self.tag_start.saturating_sub(keep);
            self.name_end = self.name_end.saturating_sub(keep);
            self.stanza_start = self.stanza_start.saturating_sub(keep);
        }
        // One large stanza must not pin its buffer for the rest of the connection.
        if self.buf.is_empty() && self.buf.capacity() > SPARE_BYTES_MAX {
            self.buf = Vec::new();
        }
    }

    fn too_large(&self) -> String {
        format!(
            "stanza larger than stanza_bytes_max ({} bytes)",
            self.limits.stanza_bytes_max
        )
    }

    /// The bound on the bytes from `start` up to and including the byte at `pos`, and what
    /// to say when they pass it; `None` where nothing is being accumulated.
    fn over_limit(&self) -> Option<String> {
        if self.depth >= 2 || (self.depth == 1 && self.lex != Lex::Text) {
            let start = if self.depth >= 2 {
                self.stanza_start
            } else {
                self.tag_start
            };
            if self.pos + 1 - start > self.limits.stanza_bytes_max {
                return Some(self.too_large());
            }
        } else if self.depth == 0
            && self.lex != Lex::Text
            && self.pos + 1 - self.tag_start > self.limits.header_bytes_max
        {
            return Some(format!(
                "stream header larger than {} bytes",
                self.limits.header_bytes_max
            ));
        }
        None
    }

    /// Fast path for the bulk of a stanza (text, attribute values): skips printable ASCII that
    /// means nothing in the current state, up to where a limit would be passed. Each skipped
    /// byte is one the slow path would have accepted without a state change.
    fn skip_plain_run(&mut self) {
        if self.utf8.need != 0 {
            return;
        }
        let quote = match self.lex {
            Lex::Text if self.depth >= 2 => None,
            Lex::StartTag { quote: Some(q), .. } => Some(q),
            _ => return,
        };
        let start = if self.depth >= 2 {
            self.stanza_start
        } else {
            self.tag_start
        };
        let bound = if self.depth == 0 {
            self.limits.header_bytes_max
        } else {
            self.limits.stanza_bytes_max
        };
        let end = self.buf.len().min(start.saturating_add(bound));
        if end <= self.pos {
            return;
        }
        let run = self.buf[self.pos..end]
            .iter()
            .position(|&b| !(0x20..0x80).contains(&b) || b == b'<' || Some(b) == quote)
            .unwrap_or(end - self.pos);
        self.pos += run;
        self.count(run);
    }

    fn scan(&mut self) -> Option<FramerEvent> {
        while self.pos < self.buf.len() {
            self.skip_plain_run();
            let Some(&b) = self.buf.get(self.pos) else {
                break;
            };
            self.count(1);
            if let Err(e) = self.utf8.push(b) {
                return self.fail(StreamError::NotWellFormed, e);
            }
            if let Some(e) = self.over_limit() {
                return self.fail(StreamError::PolicyViolation, e);
            }
            // Every byte that matters to the syntax is ASCII; bytes of multi-byte characters
            // are ordinary content wherever they appear.
            match self.lex {
                Lex::Text => {
                    if b == b'<' {
                        self.tag_start = self.pos;
                        if self.depth == 1 {
                            self.stanza_start = self.pos;
                        }
                        self.lex = Lex::Open;
                    } else if self.depth <= 1 && !b.is_ascii_whitespace() {
                        return self.fail(StreamError::NotWellFormed, "text outside a stanza");
                    }
                }
                Lex::Open => match b {
                    b'?' => {
                        if self.depth > 0 {
                            return self.fail(
                                StreamError::RestrictedXml,
                                "processing instructions are not allowed",
                            );
                        }
                        self.lex = Lex::Pi {
                            matched: 2,
                            question: false,
                        };
                    }
                    b'!' => self.lex = Lex::Bang { matched: 2 },
                    b'/' => self.lex = Lex::EndName,
                    b'>' | b'<' | b'=' | b'"' | b'\'' => {
                        return self.fail(StreamError::NotWellFormed, "a tag without a name")
                    }
                    _ if b.is_ascii_whitespace() => {
                        return self.fail(StreamError::NotWellFormed, "a tag without a name")
                    }
                    _ => self.lex = Lex::StartName,
                },
                Lex::StartName => match b {
                    b'>' => {
                        self.name_end = self.pos;
                        if let Some(ev) = self.start_tag_end(false) {
                            return Some(ev);
                        }
                        continue;
                    }
                    b'/' => {
                        self.name_end = self.pos;
                        self.lex = Lex::StartTag {
                            quote: None,
                            slash: true,
                        };
                    }
                    b'<' | b'=' | b'"' | b'\'' => {
                        return self.fail(StreamError::NotWellFormed, "malformed element name")
                    }
                    _ if b.is_ascii_whitespace() => {
                        self.name_end = self.pos;
                        self.lex = Lex::StartTag {
                            quote: None,
                            slash: false,
                        };
                    }
                    _ => {}
                },
                Lex::StartTag {
                    quote: Some(q),
                    slash,
                } => {
                    if b == q {
                        self.lex = Lex::StartTag { quote: None, slash };
                    } else if b == b'<' {
                        return self.fail(StreamError::NotWellFormed, "`<` in an attribute value");
                    }
                }
                Lex::StartTag { quote: None, slash } => {
                    if slash && b != b'>' {
                        return self.fail(StreamError::NotWellFormed, "`/` inside a tag");
                    }
                    match b {
                        b'>' => {
                            if let Some(ev) = self.start_tag_end(slash) {
                                return Some(ev);
                            }
                            continue;
                        }
                        b'/' => {
                            self.lex = Lex::StartTag {
                                quote: None,
                                slash: true,
                            }
                        }
                        b'"' | b'\'' => {
                            self.lex = Lex::StartTag {
                                quote: Some(b),
                                slash: false,
                            }
                        }
                        b'<' => return self.fail(StreamError::NotWellFormed, "`<` inside a tag"),
                        _ => {}
                    }
                }
                Lex::EndName => {
                    if b == b'>' || b.is_ascii_whitespace() {
                        if self.pos == self.tag_start + 2 {
                            return self
                                .fail(StreamError::NotWellFormed, "an end tag without a name");
                        }
                        if let Some(ev) = self.check_end_name() {
                            return Some(ev);
                        }
                        if b == b'>' {
                            if let Some(ev) = self.end_tag_end() {
                                return Some(ev);
                            }
                            continue;
                        }
                        self.lex = Lex::EndTail;
                    } else if matches!(b, b'<' | b'/' | b'=' | b'"' | b'\'') {
                        return self.fail(StreamError::NotWellFormed, "malformed end tag");
                    }
                }
                Lex::EndTail => {
                    if b == b'>' {
                        if let Some(ev) = self.end_tag_end() {
                            return Some(ev);
                        }
                        continue;
                    }
                    if !b.is_ascii_whitespace() {
                        return self.fail(StreamError::NotWellFormed, "malformed end tag");
                    }
                }
                Lex::Pi { matched, question } => {
                    const DECL: &[u8] = b"<?xml";
                    let matched = usize::from(matched);
                    if matched < DECL.len() {
                        if b != DECL[matched] {
                            return self.fail(
                                StreamError::RestrictedXml,
                                "processing instructions are not allowed",
                            );
                        }
                    } else if matched == DECL.len() && !b.is_ascii_whitespace() {
                        return self.fail(
                            StreamError::RestrictedXml,
                            "processing instructions are not allowed",
                        );
                    } else if question && b == b'>' {
                        // The declaration's content is not looked at: pchat speaks UTF-8
                        // XML 1.0 whatever it says (RFC 6120 §11.5, §11.6).
                        self.lex = Lex::Text;
                        self.pos += 1;
                        continue;
                    }
                    self.lex = Lex::Pi {
                        matched: u8::try_from(matched + 1).unwrap_or(u8::MAX),
                        question: b == b'?',
                    };
                }
                Lex::Bang { matched } => {
                    const CDATA: &[u8] = b"<![CDATA[";
                    let matched = usize::from(matched);
                    if b != CDATA[matched] {
                        return self.fail(
                            StreamError::RestrictedXml,
                            "comments, DTDs and entity declarations are not allowed",
                        );
                    }
                    if matched + 1 < CDATA.len() {
                        self.lex = Lex::Bang {
                            // Below CDATA.len(), so it fits.
                            matched: (matched + 1) as u8,
                        };
                    } else if self.depth < 2 {
                        return self.fail(StreamError::NotWellFormed, "CDATA outside a stanza");
                    } else {
                        self.lex = Lex::CData { brackets: 0 };
                    }
                }
                Lex::CData { brackets } => {
                    self.lex = match b {
                        b'>' if brackets >= 2 => Lex::Text,
                        b']' => Lex::CData {
                            brackets: (brackets + 1).min(2),
                        },
                        _ => Lex::CData { brackets: 0 },
                    };
                }
            }
            self.pos += 1;
        }
        None
    }

    /// A start tag ended at `pos` (its `>`); `empty` for `<…/>`. Consumes the `>`.
    fn start_tag_end(&mut self, empty: bool) -> Option<FramerEvent> {
        let after = self.pos + 1;
        self.lex = Lex::Text;
        match self.depth {
            0 => {
                self.pos = after;
                Some(self.take_header(after, empty))
            }
            1 => {
                self.pos = after;
                if empty {
                    return Some(self.take_stanza(after));
                }
                self.push_open_name();
                self.depth = 2;
                None
            }
            d => {
                if !empty {
                    if d >= element::DEPTH_MAX {
                        return self
                            .fail(StreamError::PolicyViolation, "elements nested too deeply");
                    }
                    self.push_open_name();
                    self.depth += 1;
                }
                self.pos = after;
                None
            }
        }
    }

    fn push_open_name(&mut self) {
        let name = &self.buf[self.tag_start + 1..self.name_end];
        // A name is shorter than the stanza limit, far below 4 GiB.
        let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
        self.open.extend_from_slice(name);
        self.open.extend_from_slice(&len.to_le_bytes());
    }

    /// Where the innermost open name starts and ends in `open`.
    fn innermost(&self) -> Option<(usize, usize)> {
        let end = self.open.len().checked_sub(NAME_LEN_BYTES)?;
        let len: [u8; NAME_LEN_BYTES] = self.open[end..].try_into().ok()?;
        let start = end.checked_sub(u32::from_le_bytes(len) as usize)?;
        Some((start, end))
    }

    /// Checks the end tag's name (ending at `pos`) against the innermost open element.
    fn check_end_name(&mut self) -> Option<FramerEvent> {
        let name = &self.buf[self.tag_start + 2..self.pos];
        let Some((start, end)) = self.innermost() else {
            return self.fail(
                StreamError::NotWellFormed,
                "end tag before the stream header",
            );
        };
        let open = &self.open[start..end];
        if name != open {
            let text = format!(
                "end tag </{}> does not match <{}>",
                quoted(name),
                quoted(open)
            );
            return self.fail(StreamError::NotWellFormed, text);
        }
        None
    }

    /// An end tag whose name matched ended at `pos` (its `>`). Consumes it.
    fn end_tag_end(&mut self) -> Option<FramerEvent> {
        let after = self.pos + 1;
        self.pos = after;
        self.lex = Lex::Text;
        let start = self.innermost().map_or(0, |(start, _)| start);
        self.open.truncate(start);
        self.depth -= 1;
        match self.depth {
            0 => Some(FramerEvent::StreamClose),
            1 => Some(self.take_stanza(after)),
            _ => None,
        }
    }

    fn take_header(&mut self, after: usize, empty: bool) -> FramerEvent {
        if empty {
            self.failed = true;
            return FramerEvent::Error(StreamError::NotWellFormed, "empty stream header".into());
        }
        // Parse the header as an empty element to reuse attribute handling and its checks.
        let mut tag = self.buf[self.tag_start..after - 1].to_vec();
        tag.extend_from_slice(b"/>");
        let el = match element::parse_checked(&tag, ns::CLIENT) {
            Ok(el) => el,
            Err(e) => {
                self.failed = true;
                return FramerEvent::Error(parse_error_condition(&e), e.to_string());
            }
        };
        if !el.is("stream", ns::STREAM) {
            self.failed = true;
            return FramerEvent::Error(
                StreamError::InvalidNamespace,
                "expected <stream:stream>".into(),
            );
        }
        self.push_open_name();
        self.depth = 1;
        FramerEvent::StreamOpen {
            attrs: el.attrs,
            default_ns: DEFAULT_NS.to_owned(),
        }
    }

    fn take_stanza(&mut self, after: usize) -> FramerEvent {
        // The scan has checked the characters; the parser checks the rest (attributes,
        // namespaces, references).
        self.count(after - self.stanza_start);
        match element::parse_checked(&self.buf[self.stanza_start..after], DEFAULT_NS) {
            Ok(el) => FramerEvent::Stanza(el),
            Err(e) => {
                self.failed = true;
                FramerEvent::Error(parse_error_condition(&e), e.to_string())
            }
        }
    }
}

/// The stream error for a stanza the parser refused.
fn parse_error_condition(e: &ParseError) -> StreamError {
    match e {
        ParseError::Restricted(_) => StreamError::RestrictedXml,
        ParseError::BadNamespacePrefix(_) => StreamError::BadNamespacePrefix,
        ParseError::TooDeep(_) => StreamError::PolicyViolation,
        ParseError::NotWellFormed(_) => StreamError::NotWellFormed,
    }
}

/// A name for an error text: at most [`QUOTED_NAME_BYTES_MAX`] bytes of it. The scan has
/// checked that it is UTF-8, but the cut may fall inside a character.
fn quoted(name: &[u8]) -> String {
    let cut = &name[..name.len().min(QUOTED_NAME_BYTES_MAX)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < name.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    fn events(chunks: &[&str], limits: FramerLimits) -> Vec<FramerEvent> {
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        byte_events(&chunks, limits)
    }

    fn byte_events(chunks: &[&[u8]], limits: FramerLimits) -> Vec<FramerEvent> {
        let mut f = Framer::new(limits);
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c);
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
            let (a, b) = doc.as_bytes().split_at(i);
            assert_eq!(
                kinds(&byte_events(&[a, b], FramerLimits::default())),
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

    /// Every split into two reads of each input yields the events of the whole, errors
    /// included; splits fall inside multi-byte characters too.
    #[test]
    fn errors_are_split_invariant() {
        let docs: Vec<Vec<u8>> = vec![
            format!("{HEADER}<message><body>hi</mesage>").into_bytes(),
            format!("{HEADER}<message><body>caf\u{e9} \u{1f389}</body></message>").into_bytes(),
            [HEADER.as_bytes(), b"<message><body>a\x01b</body></message>"].concat(),
            [
                HEADER.as_bytes(),
                b"<message><body>\xef\xbf\xbe</body></message>",
            ]
            .concat(),
            [
                HEADER.as_bytes(),
                b"<message><body>\xed\xa0\x80</body></message>",
            ]
            .concat(),
            format!("{HEADER}<message a='&#xFFFE;'/>").into_bytes(),
            format!("{HEADER}<message><body>x</body ></message ><presence/>").into_bytes(),
            format!("{HEADER}<message><![CDATA[a]]]></message>").into_bytes(),
        ];
        for doc in docs {
            let whole = kinds(&byte_events(&[&doc], FramerLimits::default()));
            for i in 1..doc.len() {
                let (a, b) = doc.split_at(i);
                assert_eq!(
                    kinds(&byte_events(&[a, b], FramerLimits::default())),
                    whole,
                    "{} split at {i}",
                    String::from_utf8_lossy(&doc)
                );
            }
            let singles: Vec<&[u8]> = doc.chunks(1).collect();
            assert_eq!(
                kinds(&byte_events(&singles, FramerLimits::default())),
                whole
            );
        }
    }

    /// A mismatched end tag is refused when it arrives: the stream does not wait for more.
    #[test]
    fn mismatched_end_tag_is_refused_at_once() {
        let cases: &[(&str, &str)] = &[
            (
                "<message><body>hi</mesage>",
                "</mesage> does not match <body>",
            ),
            (
                "<message><body>hi</body></messages>",
                "</messages> does not match <message>",
            ),
            (
                "<message><body></message>",
                "</message> does not match <body>",
            ),
            ("<a:x xmlns:a='urn:a'></x>", "</x> does not match <a:x>"),
            (
                "<message/></stream>",
                "</stream> does not match <stream:stream>",
            ),
            ("<message></ message>", "an end tag without a name"),
            ("<message></message x>", "malformed end tag"),
        ];
        for (input, why) in cases {
            let evs = events(&[HEADER, input], FramerLimits::default());
            let Some(FramerEvent::Error(StreamError::NotWellFormed, text)) = evs.last() else {
                panic!("{input}: {evs:?}");
            };
            assert!(text.contains(why), "{input}: {text}");
        }
        // The same names close in order, prefixes and all.
        let ok = events(
            &[
                HEADER,
                "<a:x xmlns:a='urn:a'><y></y ></a:x><p/></stream:stream>",
            ],
            FramerLimits::default(),
        );
        assert_eq!(kinds(&ok), ["open", "stanza:x", "stanza:p", "close"]);
    }

    /// Characters XML 1.0 forbids, raw or as references, in text, attributes or the header,
    /// end the stream with `not-well-formed`; what it allows passes.
    #[test]
    fn forbidden_characters_are_refused() {
        let bad: &[&[u8]] = &[
            b"<message><body>\x01</body></message>",
            b"<message><body>\x00</body></message>",
            b"<message><body>\x0b\x0c\x1f</body></message>",
            b"<message><body>\x7f\xef\xbf\xbe</body></message>",
            b"<message><body>\xef\xbf\xbf</body></message>",
            b"<message a='\x02'/>",
            b"<mess\x03age/>",
            b"<message><body>&#x1;</body></message>",
            b"<message><body>&#1;</body></message>",
            b"<message><body>&#0;</body></message>",
            b"<message><body>&#xFFFE;</body></message>",
            b"<message><body>&#xFFFF;</body></message>",
            b"<message><body>&#xD800;</body></message>",
            b"<message><body>&#x110000;</body></message>",
            b"<message a='&#x1b;'/>",
            b"<message><body><![CDATA[\x08]]></body></message>",
            // Invalid UTF-8: a lone continuation, an overlong '/', a surrogate, a bad lead.
            b"<message><body>\x80</body></message>",
            b"<message><body>\xc0\xaf</body></message>",
            b"<message><body>\xed\xa0\x80</body></message>",
            b"<message><body>\xff</body></message>",
            b"<message><body>\xe2\x82</body></message>",
        ];
        for input in bad {
            let evs = byte_events(&[HEADER.as_bytes(), input], FramerLimits::default());
            assert_eq!(
                kinds(&evs),
                ["open", "error:not-well-formed"],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        // A raw one is refused as soon as it arrives, before the stanza ends.
        let evs = byte_events(
            &[HEADER.as_bytes(), b"<message><body>x\x01"],
            FramerLimits::default(),
        );
        assert_eq!(kinds(&evs), ["open", "error:not-well-formed"]);
        // In the header too.
        let header = HEADER.replace("to='localhost'", "to='local\u{1}host'");
        assert_eq!(
            kinds(&events(&[&header], FramerLimits::default())),
            ["error:not-well-formed"]
        );
        let header = HEADER.replace("to='localhost'", "to='local&#xFFFF;host'");
        assert_eq!(
            kinds(&events(&[&header], FramerLimits::default())),
            ["error:not-well-formed"]
        );

        let good = "<message a='&#x9;&#xA;&#xD;&#xFFFD;&#x10FFFF;'><body>tab\tcr\r\
                    lf\n\u{fffd}\u{d7ff}\u{e000}\u{10ffff}&#x20;&#xE000;</body></message>";
        let evs = events(&[HEADER, good], FramerLimits::default());
        assert_eq!(kinds(&evs), ["open", "stanza:message"]);
        let FramerEvent::Stanza(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(
            m.get_attr("a"),
            Some("\t\n\r\u{fffd}\u{10ffff}"),
            "character references expand"
        );
    }

    /// A stanza of 256 KiB fed one byte per read costs a small constant per byte, as in one
    /// read: nothing is rescanned (the old framer looked at an unfinished tag again on every
    /// read, and at everything after `<` up to the next `>`, so this was quadratic).
    #[test]
    fn work_is_linear_in_the_input() {
        const STANZA_BYTES: usize = 256 * 1024;
        let limits = FramerLimits {
            stanza_bytes_max: STANZA_BYTES + 1024,
            ..FramerLimits::default()
        };
        // The worst shapes for a rescan: one huge start tag, and one huge text node.
        let attr = format!("<message a='{}'/>", "x".repeat(STANZA_BYTES - 16));
        let body = format!(
            "<message><body>{}</body></message>",
            "y".repeat(STANZA_BYTES - 40)
        );
        for stanza in [attr, body] {
            let mut f = Framer::new(limits);
            f.feed(HEADER.as_bytes());
            assert!(matches!(
                f.next_event(),
                Some(FramerEvent::StreamOpen { .. })
            ));
            let before = f.work;
            let mut got = None;
            for b in stanza.as_bytes() {
                f.feed(std::slice::from_ref(b));
                while let Some(ev) = f.next_event() {
                    got = Some(ev);
                }
            }
            assert!(matches!(got, Some(FramerEvent::Stanza(_))), "{got:?}");
            let work = f.work - before;
            // Each byte is scanned once and parsed once; nothing else.
            assert!(
                work <= 2 * stanza.len() as u64 + 64,
                "{work} units of work for {} bytes",
                stanza.len()
            );
            assert_eq!(f.buffered(), 0, "nothing is kept after the stanza");
        }
        // Many stanzas in one read: each byte is scanned once, parsed once, moved at most once.
        let many = "<presence/>".repeat(20_000);
        let mut f = Framer::new(FramerLimits::default());
        f.feed(HEADER.as_bytes());
        f.feed(many.as_bytes());
        f.feed(b"<message><body>unfinished");
        let mut n = 0;
        while let Some(ev) = f.next_event() {
            if matches!(ev, FramerEvent::Stanza(_)) {
                n += 1;
            }
        }
        assert_eq!(n, 20_000);
        let total = (HEADER.len() + many.len() + 25) as u64;
        assert!(
            f.work <= 3 * total,
            "{} units of work for {total} bytes",
            f.work
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
