//! A small namespace-aware element tree: what a stanza is once parsed, and how it is written.
//!
//! Every element carries its resolved namespace; prefixes from the wire are not kept, so two
//! stanzas that mean the same thing compare equal. Serialization declares a namespace only where
//! it differs from the parent's, which keeps reflected stanzas as small as the client sent them.
//!
//! Parsing refuses every character XML 1.0 forbids, raw or as a character reference
//! (`&#x1;`, `&#xFFFE;`, `&#xD800;`), so no parsed element can hold one; serialization replaces
//! any that code put into an element with U+FFFD, so pchat never sends a character that makes
//! an XML parser at the other end drop its stream.

use std::fmt::Write as _;

use quick_xml::events::Event;

use crate::ns;

/// One XML element with its resolved namespace, attributes in document order and children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// Local name, without prefix.
    pub name: String,
    /// Resolved namespace URI.
    pub ns: String,
    /// Attributes (qualified name as written, unescaped value); `xmlns` declarations are not kept.
    pub attrs: Vec<(String, String)>,
    /// Child nodes in document order.
    pub children: Vec<Node>,
}

/// A child of an element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A nested element.
    Element(Element),
    /// Character data (already unescaped).
    Text(String),
}

/// Why bytes could not be turned into an element.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The bytes are not well-formed XML.
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// The XML uses a feature RFC 6120 forbids (DTD, entity, comment, processing instruction).
    #[error("restricted XML: {0}")]
    Restricted(&'static str),
    /// An element prefix has no namespace declaration in scope.
    #[error("undeclared namespace prefix `{0}`")]
    BadNamespacePrefix(String),
    /// More nesting than allowed.
    #[error("elements nested deeper than {0}")]
    TooDeep(usize),
}

/// Nesting bound for parsed elements; deeper stanzas are refused rather than recursed into.
pub const DEPTH_MAX: usize = 64;

impl Element {
    /// A new empty element.
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder: sets an attribute.
    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    /// Builder: sets an attribute when `value` is `Some`.
    pub fn attr_opt(mut self, name: &str, value: Option<impl Into<String>>) -> Self {
        if let Some(v) = value {
            self.set_attr(name, v);
        }
        self
    }

    /// Builder: appends a child element.
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder: appends text.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.children.push(Node::Text(text.into()));
        self
    }

    /// Sets or replaces an attribute.
    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        if let Some(slot) = self.attrs.iter_mut().find(|(k, _)| k == name) {
            slot.1 = value;
        } else {
            self.attrs.push((name.to_owned(), value));
        }
    }

    /// Removes an attribute if present.
    pub fn remove_attr(&mut self, name: &str) {
        self.attrs.retain(|(k, _)| k != name);
    }

    /// Value of an attribute.
    pub fn get_attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the element has this name and namespace.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// Mutable child elements.
    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// First child with this name and namespace.
    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// First child with this name and namespace, mutable.
    pub fn get_child_mut(&mut self, name: &str, ns: &str) -> Option<&mut Element> {
        self.elements_mut().find(|e| e.is(name, ns))
    }

    /// True when a child with this name and namespace exists.
    pub fn has_child(&self, name: &str, ns: &str) -> bool {
        self.get_child(name, ns).is_some()
    }

    /// Removes every child with this name and namespace.
    pub fn remove_children(&mut self, name: &str, ns: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Element(e) if e.is(name, ns)));
    }

    /// Concatenated direct text content.
    pub fn text_content(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }

    /// Text of the first child with this name and namespace.
    pub fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        self.get_child(name, ns).map(Element::text_content)
    }

    /// Serializes this element as the top of a stream whose default namespace is `parent_ns`.
    pub fn to_xml_in(&self, parent_ns: &str) -> String {
        let mut out = String::with_capacity(256);
        self.write_xml(&mut out, parent_ns);
        out
    }

    /// Serializes this element with its namespace declared (a standalone document).
    pub fn to_xml(&self) -> String {
        self.to_xml_in("")
    }

    /// Appends the serialization to `out`, declaring `xmlns` where it differs from `parent_ns`.
    pub fn write_xml(&self, out: &mut String, parent_ns: &str) {
        // Stream-level elements keep their conventional prefix: some clients match on the
        // literal `stream:features` / `stream:error` tag names.
        let stream = self.ns == ns::STREAM;
        out.push('<');
        if stream {
            out.push_str("stream:");
        }
        out.push_str(&self.name);
        if stream {
            let _ = write!(out, " xmlns:stream='{}'", ns::STREAM);
        } else if self.ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(out, &self.ns, true);
            out.push('\'');
        }
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("='");
            escape_into(out, v, true);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        let inner_ns = if stream { parent_ns } else { self.ns.as_str() };
        for c in &self.children {
            match c {
                Node::Element(e) => e.write_xml(out, inner_ns),
                Node::Text(t) => escape_into(out, t, false),
            }
        }
        out.push_str("</");
        if stream {
            out.push_str("stream:");
        }
        out.push_str(&self.name);
        out.push('>');
    }

    /// Parses one complete element from `bytes`. Unprefixed names default to `default_ns`;
    /// the `stream` prefix is predeclared, as it is inside an XMPP stream.
    pub fn parse(bytes: &[u8], default_ns: &str) -> Result<Element, ParseError> {
        check_chars(bytes)?;
        parse_checked(bytes, default_ns)
    }
}

/// True for a code point in XML 1.0's `Char` production: #x9 | #xA | #xD | [#x20-#xD7FF] |
/// [#xE000-#xFFFD] | [#x10000-#x10FFFF].
pub(crate) fn is_xml_char_code(cp: u32) -> bool {
    matches!(cp, 0x9 | 0xa | 0xd | 0x20..=0xd7ff | 0xe000..=0xfffd | 0x1_0000..=0x10_ffff)
}

/// True for a character XML 1.0 allows in a document (its `Char` production).
pub fn is_xml_char(c: char) -> bool {
    is_xml_char_code(u32::from(c))
}

/// The first character of `s` that XML 1.0 forbids, if any.
pub fn forbidden_char(s: &str) -> Option<char> {
    s.chars().find(|&c| !is_xml_char(c))
}

fn check_chars(bytes: &[u8]) -> Result<(), ParseError> {
    let s = std::str::from_utf8(bytes)
        .map_err(|_| ParseError::NotWellFormed("invalid UTF-8".into()))?;
    check_str(s)
}

fn check_str(s: &str) -> Result<(), ParseError> {
    match forbidden_char(s) {
        None => Ok(()),
        Some(c) => Err(ParseError::NotWellFormed(format!(
            "character U+{:04X} is not allowed in XML",
            u32::from(c)
        ))),
    }
}

/// Escapes XML special characters into `out`; `attr` also escapes quotes. A character XML
/// forbids (which no parsed element holds, but a stored one from before pchat refused them,
/// or one built from other input, might) becomes U+FFFD: one bad character must not make
/// every client that receives it drop its stream.
pub fn escape_into(out: &mut String, s: &str, attr: bool) {
    let bytes = s.as_bytes();
    let mut last = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let (rep, len) = match b {
            b'&' => ("&amp;", 1),
            b'<' => ("&lt;", 1),
            b'>' => ("&gt;", 1),
            b'\'' if attr => ("&apos;", 1),
            b'"' if attr => ("&quot;", 1),
            b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            0..=0x1f => ("\u{fffd}", 1),
            // U+FFFE and U+FFFF are EF BF BE and EF BF BF: the only forbidden characters a
            // `str` can hold above the ASCII controls (it cannot hold surrogates).
            0xef if matches!(bytes.get(i + 1..i + 3), Some([0xbf, 0xbe | 0xbf])) => ("\u{fffd}", 3),
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[last..i]);
        out.push_str(rep);
        i += len;
        last = i;
    }
    out.push_str(&s[last..]);
}

struct Scope {
    default_ns: String,
    prefixes: Vec<(String, String)>,
}

fn resolve<'a>(scopes: &'a [Scope], prefix: &str) -> Option<&'a str> {
    if prefix == "stream" {
        // Predeclared by the stream header; a redeclaration in scope still wins below.
        for s in scopes.iter().rev() {
            if let Some((_, u)) = s.prefixes.iter().find(|(p, _)| p == prefix) {
                return Some(u);
            }
        }
        return Some(ns::STREAM);
    }
    for s in scopes.iter().rev() {
        if let Some((_, u)) = s.prefixes.iter().find(|(p, _)| p == prefix) {
            return Some(u);
        }
    }
    None
}

fn open_element(
    e: &quick_xml::events::BytesStart<'_>,
    scopes: &mut Vec<Scope>,
) -> Result<Element, ParseError> {
    let parent_default = scopes
        .last()
        .map(|s| s.default_ns.clone())
        .unwrap_or_default();
    let mut scope = Scope {
        default_ns: parent_default,
        prefixes: Vec::new(),
    };
    let mut attrs = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|e| ParseError::NotWellFormed(e.to_string()))?;
        let key = std::str::from_utf8(a.key.as_ref())
            .map_err(|_| ParseError::NotWellFormed("attribute name is not UTF-8".into()))?
            .to_owned();
        let value = a
            .unescape_value()
            .map_err(|e| restricted_or_malformed(&e))?;
        if let std::borrow::Cow::Owned(expanded) = &value {
            // References expanded: they may name a character XML forbids (the raw bytes
            // were checked before parsing).
            check_str(expanded)?;
        }
        let value = value.into_owned();
        if key == "xmlns" {
            scope.default_ns = value;
        } else if let Some(p) = key.strip_prefix("xmlns:") {
            scope.prefixes.push((p.to_owned(), value));
        } else {
            if attrs.iter().any(|(k, _): &(String, String)| *k == key) {
                return Err(ParseError::NotWellFormed(format!(
                    "duplicate attribute `{key}`"
                )));
            }
            attrs.push((key, value));
        }
    }
    let qname = std::str::from_utf8(e.name().as_ref())
        .map_err(|_| ParseError::NotWellFormed("element name is not UTF-8".into()))?
        .to_owned();
    scopes.push(scope);
    let (name, ns) = match qname.split_once(':') {
        Some((prefix, local)) => {
            let uri = resolve(scopes, prefix)
                .ok_or_else(|| ParseError::BadNamespacePrefix(prefix.to_owned()))?;
            (local.to_owned(), uri.to_owned())
        }
        None => (
            qname,
            scopes
                .last()
                .map(|s| s.default_ns.clone())
                .unwrap_or_default(),
        ),
    };
    Ok(Element {
        name,
        ns,
        attrs,
        children: Vec::new(),
    })
}

fn restricted_or_malformed(e: &quick_xml::Error) -> ParseError {
    use quick_xml::escape::EscapeError;
    match e {
        quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(..)) => {
            ParseError::Restricted("entity references other than the predefined ones")
        }
        other => ParseError::NotWellFormed(other.to_string()),
    }
}

/// Parses bytes whose characters are already known to be allowed (the framer checks them as
/// it scans); character references are still checked here.
pub(crate) fn parse_checked(bytes: &[u8], default_ns: &str) -> Result<Element, ParseError> {
    let mut reader = quick_xml::Reader::from_reader(bytes);
    reader.config_mut().check_end_names = true;
    let mut scopes = vec![Scope {
        default_ns: default_ns.to_owned(),
        prefixes: Vec::new(),
    }];
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| restricted_or_malformed(&e))?;
        match ev {
            Event::Start(e) => {
                if root.is_some() {
                    return Err(ParseError::NotWellFormed(
                        "content after the root element".into(),
                    ));
                }
                if stack.len() >= DEPTH_MAX {
                    return Err(ParseError::TooDeep(DEPTH_MAX));
                }
                stack.push(open_element(&e, &mut scopes)?);
            }
            Event::Empty(e) => {
                if root.is_some() {
                    return Err(ParseError::NotWellFormed(
                        "content after the root element".into(),
                    ));
                }
                let el = open_element(&e, &mut scopes)?;
                scopes.pop();
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(el)),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                scopes.pop();
                let el = stack
                    .pop()
                    .ok_or_else(|| ParseError::NotWellFormed("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(el)),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let text = t.unescape().map_err(|e| restricted_or_malformed(&e))?;
                if let std::borrow::Cow::Owned(expanded) = &text {
                    check_str(expanded)?;
                }
                match stack.last_mut() {
                    Some(parent) => push_text(parent, &text),
                    None if text.trim().is_empty() => {}
                    None => {
                        return Err(ParseError::NotWellFormed("text outside an element".into()))
                    }
                }
            }
            Event::CData(t) => {
                let text = std::str::from_utf8(&t)
                    .map_err(|_| ParseError::NotWellFormed("CDATA is not UTF-8".into()))?;
                match stack.last_mut() {
                    Some(parent) => push_text(parent, text),
                    None => {
                        return Err(ParseError::NotWellFormed("CDATA outside an element".into()))
                    }
                }
            }
            Event::Comment(_) => return Err(ParseError::Restricted("comments")),
            Event::PI(_) => return Err(ParseError::Restricted("processing instructions")),
            Event::DocType(_) => return Err(ParseError::Restricted("document type declarations")),
            Event::Decl(_) => {
                if root.is_some() || !stack.is_empty() {
                    return Err(ParseError::NotWellFormed(
                        "misplaced XML declaration".into(),
                    ));
                }
            }
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(ParseError::NotWellFormed("unclosed element".into()));
    }
    root.ok_or_else(|| ParseError::NotWellFormed("no element".into()))
}

fn push_text(parent: &mut Element, text: &str) {
    if let Some(Node::Text(prev)) = parent.children.last_mut() {
        prev.push_str(text);
    } else {
        parent.children.push(Node::Text(text.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_roundtrip(xml: &str, expect: &str) {
        let el = Element::parse(xml.as_bytes(), ns::CLIENT).unwrap();
        assert_eq!(el.to_xml_in(ns::CLIENT), expect);
        // Serializing and parsing again yields the same tree.
        let again = Element::parse(el.to_xml().as_bytes(), "").unwrap();
        assert_eq!(again, el);
    }

    #[test]
    fn roundtrips() {
        check_roundtrip(
            "<message to='a@b' type='groupchat'><body>hi &amp; &lt;you&gt;</body></message>",
            "<message to='a@b' type='groupchat'><body>hi &amp; &lt;you&gt;</body></message>",
        );
        check_roundtrip(
            "<iq type='get' id='1'><query xmlns='urn:xmpp:ping'/></iq>",
            "<iq type='get' id='1'><query xmlns='urn:xmpp:ping'/></iq>",
        );
        check_roundtrip(
            "<p:x xmlns:p='urn:a'><p:y/><z/></p:x>",
            "<x xmlns='urn:a'><y/><z xmlns='jabber:client'/></x>",
        );
        check_roundtrip(
            "<m a=\"it's\"><![CDATA[<raw>]]></m>",
            "<m a='it&apos;s'>&lt;raw&gt;</m>",
        );
    }

    /// Characters XML forbids never come out of a parse (raw or referenced), and never go out
    /// on the wire: serialization replaces them, so what it writes always parses again.
    #[test]
    fn forbidden_characters_neither_parse_nor_serialize() {
        for xml in [
            "<m>\u{1}</m>",
            "<m a='\u{0}'/>",
            "<m>\u{fffe}</m>",
            "<m>&#x1;</m>",
            "<m>&#xFFFF;</m>",
            "<m a='&#x1f;'/>",
            "<m a='&#55296;'/>",
        ] {
            assert!(
                matches!(
                    Element::parse(xml.as_bytes(), ns::CLIENT),
                    Err(ParseError::NotWellFormed(_))
                ),
                "{xml:?}"
            );
        }
        assert!(Element::parse(b"<m>\xff</m>", ns::CLIENT).is_err());
        let el = Element::new("m", ns::CLIENT)
            .attr("a", "x\u{1}y\u{ffff}")
            .text("nul\u{0} esc\u{1b} fffe\u{fffe} ok\t\n\u{fffd}\u{10ffff}");
        let xml = el.to_xml_in(ns::CLIENT);
        assert_eq!(
            xml,
            "<m a='x\u{fffd}y\u{fffd}'>nul\u{fffd} esc\u{fffd} fffe\u{fffd} ok\t\n\u{fffd}\u{10ffff}</m>"
        );
        assert!(Element::parse(xml.as_bytes(), ns::CLIENT).is_ok());
    }

    #[test]
    fn stream_prefix_is_predeclared_and_kept() {
        let el = Element::parse(
            b"<stream:error><x xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
            ns::CLIENT,
        )
        .unwrap();
        assert_eq!(el.ns, ns::STREAM);
        assert!(el
            .to_xml_in(ns::CLIENT)
            .starts_with("<stream:error xmlns:stream="));
    }

    #[test]
    fn refuses_restricted_and_malformed() {
        type Check = fn(&ParseError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>", |e| {
                matches!(e, ParseError::Restricted(_))
            }),
            ("<x>&a;</x>", |e| matches!(e, ParseError::Restricted(_))),
            ("<x><!-- c --></x>", |e| {
                matches!(e, ParseError::Restricted(_))
            }),
            ("<x><?pi x?></x>", |e| {
                matches!(e, ParseError::Restricted(_))
            }),
            ("<x><y></x>", |e| matches!(e, ParseError::NotWellFormed(_))),
            ("<q:x/>", |e| matches!(e, ParseError::BadNamespacePrefix(_))),
            ("<x a='1' a='2'/>", |e| {
                matches!(e, ParseError::NotWellFormed(_))
            }),
        ];
        for (xml, ok) in cases {
            let err = Element::parse(xml.as_bytes(), ns::CLIENT).unwrap_err();
            assert!(ok(&err), "{xml}: {err:?}");
        }
        let deep = "<a>".repeat(DEPTH_MAX + 1) + &"</a>".repeat(DEPTH_MAX + 1);
        assert_eq!(
            Element::parse(deep.as_bytes(), "").unwrap_err(),
            ParseError::TooDeep(DEPTH_MAX)
        );
    }
}
