//! Incremental XMPP framing without a DOM, plus byte-level accessors for the few fields the
//! load generator reads.
//!
//! The framer only tracks tag nesting (quotes, self-closing tags, end tags, processing
//! instructions), so it finds top-level stanza boundaries in one pass over each byte and
//! never rescans: the state survives across reads, which matters when a large MAM page or a
//! burst of fan-out arrives split over many TLS records. It does not validate XML; the servers
//! under test are trusted to send well-formed streams, and anything malformed shows up as a
//! missing reply, which the scenarios count as an error.
//!
//! Limitations, deliberately accepted: CDATA sections and comments are skipped up to the next
//! `>`, which is wrong if they contain `>`; none of the three servers sends either in stanzas.

use anyhow::bail;

/// Largest top-level element we buffer; beyond it the connection is treated as broken.
const ELEMENT_BYTES_MAX: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Text,
    Lt,
    Start { slash: bool },
    Quoted(u8),
    End,
    Pi,
    Bang,
}

/// One framing event. The bytes of `Open` and `Elem` are available from [`Framer::last`]
/// until the next call; returning them by index rather than by borrow keeps callers free to
/// loop on the framer (a conditional borrow return would not pass the borrow checker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ev {
    /// The stream header `<stream:stream ...>`.
    Open,
    /// A complete top-level element (stanza, features, SASL, TLS, stream error).
    Elem,
    /// `</stream:stream>`.
    Close,
}

/// Splits a byte stream into stream header, top-level elements and stream close.
pub struct Framer {
    buf: Vec<u8>,
    scan: usize,
    st: St,
    depth: u32,
    tag_start: usize,
    elem_start: usize,
    last: (usize, usize),
}

impl Default for Framer {
    fn default() -> Self {
        Framer {
            buf: Vec::with_capacity(16 * 1024),
            scan: 0,
            st: St::Text,
            depth: 0,
            tag_start: 0,
            elem_start: 0,
            last: (0, 0),
        }
    }
}

impl Framer {
    /// Forgets the current stream (after STARTTLS `<proceed/>` or SASL `<success/>`): the
    /// server starts a new document, so nesting restarts at zero. Buffered bytes are kept.
    pub fn restart(&mut self) {
        self.buf.drain(..self.scan);
        self.scan = 0;
        self.st = St::Text;
        self.depth = 0;
    }

    /// Behaves as if a stream header had been read: over WebSocket (RFC 7395) there is none,
    /// every message is a complete element, and this makes them all top-level elements.
    pub fn assume_open(&mut self) {
        self.depth = 1;
    }

    /// The bytes of the last `Open` or `Elem` event.
    pub fn last(&self) -> &[u8] {
        &self.buf[self.last.0..self.last.1]
    }

    /// Bytes received but not yet scanned (should be empty at a STARTTLS boundary).
    pub fn unscanned(&self) -> usize {
        self.buf.len() - self.scan
    }

    /// The buffer to read more bytes into, after dropping what was already consumed.
    pub fn read_target(&mut self) -> anyhow::Result<&mut Vec<u8>> {
        let keep_from = if self.depth >= 2 {
            self.elem_start
        } else if self.st != St::Text {
            self.tag_start
        } else {
            self.scan
        };
        if keep_from > 0 {
            self.buf.drain(..keep_from);
            self.scan -= keep_from;
            self.tag_start = self.tag_start.saturating_sub(keep_from);
            self.elem_start = self.elem_start.saturating_sub(keep_from);
        }
        if self.buf.len() > ELEMENT_BYTES_MAX {
            bail!("element larger than {ELEMENT_BYTES_MAX} bytes");
        }
        if self.buf.capacity() - self.buf.len() < 8 * 1024 {
            self.buf.reserve(16 * 1024);
        }
        Ok(&mut self.buf)
    }

    /// The next complete event in the buffer, if any.
    pub fn next_event(&mut self) -> anyhow::Result<Option<Ev>> {
        while self.scan < self.buf.len() {
            let i = self.scan;
            let b = self.buf[i];
            self.scan += 1;
            match self.st {
                St::Text => {
                    if b == b'<' {
                        self.st = St::Lt;
                        self.tag_start = i;
                    }
                }
                St::Lt => {
                    self.st = match b {
                        b'/' => St::End,
                        b'?' => St::Pi,
                        b'!' => St::Bang,
                        _ => St::Start { slash: false },
                    }
                }
                St::Start { slash } => match b {
                    b'"' | b'\'' => self.st = St::Quoted(b),
                    b'/' => self.st = St::Start { slash: true },
                    b'>' => {
                        self.st = St::Text;
                        if slash {
                            if self.depth <= 1 {
                                self.last = (self.tag_start, i + 1);
                                return Ok(Some(Ev::Elem));
                            }
                        } else {
                            self.depth += 1;
                            if self.depth == 1 {
                                self.last = (self.tag_start, i + 1);
                                return Ok(Some(Ev::Open));
                            }
                            if self.depth == 2 {
                                self.elem_start = self.tag_start;
                            }
                        }
                    }
                    _ => self.st = St::Start { slash: false },
                },
                St::Quoted(q) => {
                    if b == q {
                        self.st = St::Start { slash: false };
                    }
                }
                St::End => {
                    if b == b'>' {
                        self.st = St::Text;
                        match self.depth {
                            0 => bail!("end tag with no open element"),
                            1 => {
                                self.depth = 0;
                                return Ok(Some(Ev::Close));
                            }
                            2 => {
                                self.depth = 1;
                                self.last = (self.elem_start, i + 1);
                                return Ok(Some(Ev::Elem));
                            }
                            _ => self.depth -= 1,
                        }
                    }
                }
                St::Pi | St::Bang => {
                    if b == b'>' {
                        self.st = St::Text;
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Splits a run of complete top-level elements (as a scenario writes them, possibly several
/// stanzas in one call) into the elements, for transports that frame each one separately.
pub fn split_elements(text: &str) -> anyhow::Result<Vec<String>> {
    let mut f = Framer::default();
    f.assume_open();
    f.read_target()?.extend_from_slice(text.as_bytes());
    let mut out = Vec::new();
    while let Some(ev) = f.next_event()? {
        if ev == Ev::Elem {
            out.push(String::from_utf8_lossy(f.last()).into_owned());
        }
    }
    if f.unscanned() != 0 || f.depth != 1 || f.st != St::Text {
        bail!("incomplete element in {text:?}");
    }
    Ok(out)
}

/// Over WebSocket every frame is a document of its own, so a stanza must declare
/// `jabber:client` itself (RFC 7395 §3.3.3); over TCP it inherits it from the stream header.
/// Adds the declaration to an element that has none.
pub fn qualify_client(el: String) -> String {
    let head_end = el.find(['>', '/']).unwrap_or(el.len());
    if el[..head_end].contains("xmlns=") {
        return el;
    }
    let name_end = el[1..]
        .find(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/')
        .map_or(el.len(), |i| i + 1);
    format!(
        "{} xmlns='jabber:client'{}",
        &el[..name_end],
        &el[name_end..]
    )
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        // Skip quickly to the next candidate first byte.
        match hay[i..=last].iter().position(|&c| c == first) {
            None => return None,
            Some(off) => i += off,
        }
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// True when `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// The qualified name of an element (`message`, `stream:features`).
pub fn name(el: &[u8]) -> &[u8] {
    let rest = el.strip_prefix(b"<").unwrap_or(el);
    let end = rest
        .iter()
        .position(|&c| {
            c == b' ' || c == b'/' || c == b'>' || c == b'\t' || c == b'\n' || c == b'\r'
        })
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The end of the first start tag (index of its `>`), honouring quotes.
fn start_tag_end(el: &[u8]) -> usize {
    let mut q = 0u8;
    for (i, &c) in el.iter().enumerate() {
        if q != 0 {
            if c == q {
                q = 0;
            }
        } else if c == b'\'' || c == b'"' {
            q = c;
        } else if c == b'>' {
            return i;
        }
    }
    el.len()
}

/// An attribute of the outermost start tag, raw (entities not decoded).
pub fn attr<'a>(el: &'a [u8], name: &str) -> Option<&'a [u8]> {
    attr_in(&el[..start_tag_end(el)], name)
}

/// An attribute of the first start tag in `tag` (which may be a slice starting at any `<`).
fn attr_in<'a>(tag: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let n = name.as_bytes();
    let mut from = 0;
    while let Some(off) = find(&tag[from..], n) {
        let at = from + off;
        let before_ok = at > 0 && matches!(tag[at - 1], b' ' | b'\t' | b'\n' | b'\r');
        let mut j = at + n.len();
        while j < tag.len() && matches!(tag[j], b' ' | b'\t' | b'\n' | b'\r') {
            j += 1;
        }
        if before_ok && j < tag.len() && tag[j] == b'=' {
            j += 1;
            while j < tag.len() && matches!(tag[j], b' ' | b'\t' | b'\n' | b'\r') {
                j += 1;
            }
            if j < tag.len() && (tag[j] == b'\'' || tag[j] == b'"') {
                let q = tag[j];
                let v0 = j + 1;
                let len = tag[v0..].iter().position(|&c| c == q)?;
                return Some(&tag[v0..v0 + len]);
            }
            return None;
        }
        from = at + n.len();
    }
    None
}

/// An attribute of the first descendant start tag named `child` (e.g. `status`, `fin`).
pub fn child_attr<'a>(el: &'a [u8], child: &str, name: &str) -> Option<&'a [u8]> {
    let open = format!("<{child}");
    let mut from = 0;
    while let Some(off) = find(&el[from..], open.as_bytes()) {
        let at = from + off;
        let after = el.get(at + open.len()).copied().unwrap_or(b'>');
        if matches!(after, b' ' | b'/' | b'>' | b'\t' | b'\n' | b'\r') {
            let rest = &el[at..];
            return attr_in(&rest[..start_tag_end(rest)], name);
        }
        from = at + open.len();
    }
    None
}

/// The text content of the first descendant element named `child` (raw, not unescaped).
pub fn child_text<'a>(el: &'a [u8], child: &str) -> Option<&'a [u8]> {
    let open = format!("<{child}");
    let close = format!("</{child}>");
    let mut from = 0;
    while let Some(off) = find(&el[from..], open.as_bytes()) {
        let at = from + off;
        let after = el.get(at + open.len()).copied().unwrap_or(b'>');
        if matches!(after, b' ' | b'/' | b'>' | b'\t' | b'\n' | b'\r') {
            let rest = &el[at..];
            let gt = start_tag_end(rest);
            if gt == 0 || gt >= rest.len() || rest[gt - 1] == b'/' {
                return Some(&[]);
            }
            let body = &rest[gt + 1..];
            let end = find(body, close.as_bytes())?;
            return Some(&body[..end]);
        }
        from = at + open.len();
    }
    None
}

/// The text content of the element itself (`<success xmlns='…'>dGV4dA==</success>`).
pub fn child_text_self(el: &[u8]) -> &[u8] {
    let gt = start_tag_end(el);
    if gt == 0 || gt >= el.len() || el[gt - 1] == b'/' {
        return &[];
    }
    let body = &el[gt + 1..];
    match body.iter().rposition(|&c| c == b'<') {
        Some(end) => &body[..end],
        None => body,
    }
}

/// True when the element carries a MUC status code (`<status code='110'/>`).
pub fn has_status(el: &[u8], code: &str) -> bool {
    let mut from = 0;
    while let Some(off) = find(&el[from..], b"<status") {
        let at = from + off;
        let rest = &el[at..];
        if attr_in(&rest[..start_tag_end(rest)], "code") == Some(code.as_bytes()) {
            return true;
        }
        from = at + 7;
    }
    false
}

/// Escapes text for element content or a quoted attribute.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// Lossy UTF-8 view for error messages, bounded so a huge stanza cannot flood the log.
pub fn show(el: &[u8]) -> String {
    let cut = &el[..el.len().min(400)];
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifies_stanzas_for_websocket() {
        assert_eq!(
            qualify_client("<presence/>".into()),
            "<presence xmlns='jabber:client'/>"
        );
        assert_eq!(
            qualify_client("<message to='r@c/n'><body>x</body></message>".into()),
            "<message xmlns='jabber:client' to='r@c/n'><body>x</body></message>"
        );
        let auth = "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>x</auth>";
        assert_eq!(qualify_client(auth.into()), auth);
    }

    #[test]
    fn splits_concatenated_stanzas() {
        let parts = split_elements("<presence/><message to='r'><body>a</body></message>").unwrap();
        assert_eq!(
            parts,
            vec!["<presence/>", "<message to='r'><body>a</body></message>"]
        );
        assert!(split_elements("<message><body>a</body>").is_err());
    }

    fn feed(f: &mut Framer, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            f.read_target().unwrap().push(b);
            while let Some(ev) = f.next_event().unwrap() {
                out.push(match ev {
                    Ev::Open => format!("open:{}", String::from_utf8_lossy(f.last())),
                    Ev::Elem => String::from_utf8_lossy(f.last()).into_owned(),
                    Ev::Close => "close".into(),
                });
            }
        }
        out
    }

    #[test]
    fn frames_byte_by_byte() {
        let mut f = Framer::default();
        let s = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' a=\"x>y\">\
            <a/> <message to='r'><body>1 &lt; 2</body><x a='/>'/></message>\
            <iq/></stream:stream>";
        let got = feed(&mut f, s);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[0].starts_with("open:<stream:stream"));
        assert_eq!(got[1], "<a/>");
        assert_eq!(
            got[2],
            "<message to='r'><body>1 &lt; 2</body><x a='/>'/></message>"
        );
        assert_eq!(got[3], "<iq/>");
        assert_eq!(got[4], "close");
    }

    #[test]
    fn restart_after_success() {
        let mut f = Framer::default();
        let got = feed(&mut f, b"<stream:stream><success xmlns='s'/>");
        assert_eq!(got.len(), 2);
        f.restart();
        let got = feed(&mut f, b"<stream:stream><features/>");
        assert_eq!(got[1], "<features/>");
    }

    #[test]
    fn accessors() {
        let el = b"<presence from='r@c/n' id=\"7\" xid='no'><x><status code='201'/><status code=\"110\"/></x><body>hi</body><empty/></presence>";
        assert_eq!(name(el), b"presence");
        assert_eq!(attr(el, "from"), Some(&b"r@c/n"[..]));
        assert_eq!(attr(el, "id"), Some(&b"7"[..]));
        assert_eq!(attr(el, "xid"), Some(&b"no"[..]));
        assert_eq!(attr(el, "code"), None);
        assert!(has_status(el, "110"));
        assert!(has_status(el, "201"));
        assert!(!has_status(el, "100"));
        assert_eq!(child_text(el, "body"), Some(&b"hi"[..]));
        assert_eq!(child_text(el, "empty"), Some(&b""[..]));
        assert_eq!(child_attr(el, "status", "code"), Some(&b"201"[..]));
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
    }
}
