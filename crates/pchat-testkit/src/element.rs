//! A small, owned XML element tree for stanzas.
//!
//! The test kit keeps its own tree instead of sharing the server's so that a bug in one
//! parser or serializer cannot hide on both ends of a test. Every element carries its resolved
//! namespace; namespace declarations are not kept as attributes, and serialization re-declares
//! the default namespace wherever it changes. Prefixed attributes other than `xml:` are kept by
//! their qualified name only, which is enough for XMPP, where `xml:lang` is the one in use.

use std::fmt;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use crate::ns;

/// A child of an [`Element`]: another element or character data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data, already unescaped.
    Text(String),
}

/// An XML element with its resolved namespace, attributes in document order, and children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    name: String,
    ns: String,
    attrs: Vec<(String, String)>,
    children: Vec<Node>,
}

/// Why a piece of XML could not be turned into an [`Element`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid XML: {0}")]
pub struct ParseError(pub String);

impl Element {
    /// An empty element `name` in namespace `ns` (use `""` for no namespace).
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Element {
        Element {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder form of [`Element::set_attr`].
    pub fn with_attr(mut self, name: impl Into<String>, value: impl Into<String>) -> Element {
        self.set_attr(name, value);
        self
    }

    /// Builder form of [`Element::push_child`].
    pub fn with_child(mut self, child: Element) -> Element {
        self.push_child(child);
        self
    }

    /// Builder form of [`Element::push_text`].
    pub fn with_text(mut self, text: impl Into<String>) -> Element {
        self.push_text(text);
        self
    }

    /// Sets an attribute, replacing an existing one of the same name in place.
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.attrs.push((name, value)),
        }
    }

    /// Removes an attribute and returns its value.
    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let index = self.attrs.iter().position(|(k, _)| k == name)?;
        Some(self.attrs.remove(index).1)
    }

    /// Appends a child element.
    pub fn push_child(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// Appends character data (escaped on serialization).
    pub fn push_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        // Adjacent text nodes are merged so that `text()` and equality do not depend on how
        // the parser happened to split character data (entities, CDATA sections).
        if let Some(Node::Text(last)) = self.children.last_mut() {
            last.push_str(&text);
        } else {
            self.children.push(Node::Text(text));
        }
    }

    /// The local name, without any prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The resolved namespace URI (`""` when unqualified).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// True when this element has the given local name and namespace.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The value of an attribute by its (qualified) name, e.g. `"to"` or `"xml:lang"`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All attributes in document order.
    pub fn attrs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attrs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// All child nodes, elements and text, in document order.
    pub fn nodes(&self) -> &[Node] {
        &self.children
    }

    /// Child elements in document order.
    pub fn children(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// Mutable child elements in document order.
    pub fn children_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element with the given name and namespace.
    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.children().find(|c| c.is(name, ns))
    }

    /// All child elements with the given name and namespace.
    pub fn children_named<'a>(
        &'a self,
        name: &'a str,
        ns: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children().filter(move |c| c.is(name, ns))
    }

    /// True when a child element with the given name and namespace exists.
    pub fn has_child(&self, name: &str, ns: &str) -> bool {
        self.child(name, ns).is_some()
    }

    /// Removes and returns the first child element with the given name and namespace.
    pub fn remove_child(&mut self, name: &str, ns: &str) -> Option<Element> {
        let index = self
            .children
            .iter()
            .position(|n| matches!(n, Node::Element(e) if e.is(name, ns)))?;
        match self.children.remove(index) {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        }
    }

    /// The concatenated direct character data of this element (not of descendants).
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect()
    }

    /// The text of the first child with the given name and namespace.
    pub fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        self.child(name, ns).map(Element::text)
    }

    /// For stanzas: the `<body/>` text, if any.
    pub fn body(&self) -> Option<String> {
        self.child_text("body", ns::CLIENT)
    }

    /// Parses one complete element; unprefixed names without `xmlns` get no namespace.
    pub fn parse(xml: &str) -> Result<Element, ParseError> {
        parse_single(xml)
    }

    /// Parses one stanza as if it were written inside a client stream, so that unqualified
    /// names default to `jabber:client` exactly as they would on the wire.
    pub fn parse_stanza(xml: &str) -> Result<Element, ParseError> {
        // Wrapping supplies the stream's default namespace without a text-level rewrite that
        // could mis-handle CDATA or attribute values containing markup.
        let wrapped = format!("<wrapper xmlns='{}'>{xml}</wrapper>", ns::CLIENT);
        let outer = parse_single(&wrapped)?;
        let mut found = None;
        for node in outer.children {
            match node {
                Node::Element(e) if found.is_none() => found = Some(e),
                Node::Text(t) if t.trim().is_empty() => {}
                _ => return Err(ParseError("expected exactly one element".into())),
            }
        }
        found.ok_or_else(|| ParseError("expected exactly one element".into()))
    }

    /// Serializes to XML, declaring `xmlns` on this element and wherever a child's namespace
    /// differs from its parent's.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write_xml(&mut out, None);
        out
    }

    fn write_xml(&self, out: &mut String, parent_ns: Option<&str>) {
        out.push('<');
        out.push_str(&self.name);
        if parent_ns != Some(self.ns.as_str()) && !(parent_ns.is_none() && self.ns.is_empty()) {
            out.push_str(" xmlns='");
            out.push_str(&escape(&self.ns));
            out.push('\'');
        }
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("='");
            out.push_str(&escape(v));
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for child in &self.children {
            match child {
                Node::Element(e) => e.write_xml(out, Some(&self.ns)),
                Node::Text(t) => out.push_str(&escape(t)),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_xml())
    }
}

impl std::str::FromStr for Element {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Element, ParseError> {
        Element::parse(s)
    }
}

/// Escapes the five XML special characters; used for attribute values and text alike.
pub(crate) fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// Converts a start tag into an element, given the namespace the reader resolved for it.
/// Namespace declarations are dropped because the resolved namespace replaces them.
pub(crate) fn element_from_start(
    ns: Result<String, ParseError>,
    start: &BytesStart<'_>,
) -> Result<Element, ParseError> {
    let ns = ns?;
    let name = std::str::from_utf8(start.local_name().into_inner())
        .map_err(|e| ParseError(format!("element name is not UTF-8: {e}")))?
        .to_string();
    let mut element = Element::new(name, ns);
    for attr in start.attributes() {
        let attr = attr.map_err(|e| ParseError(format!("bad attribute: {e}")))?;
        let key = std::str::from_utf8(attr.key.into_inner())
            .map_err(|e| ParseError(format!("attribute name is not UTF-8: {e}")))?;
        if key == "xmlns" || key.starts_with("xmlns:") {
            continue;
        }
        let value = attr
            .unescape_value()
            .map_err(|e| ParseError(format!("bad value of attribute {key}: {e}")))?;
        element.attrs.push((key.to_string(), value.into_owned()));
    }
    Ok(element)
}

/// All attributes of a start tag, namespace declarations included, as raw strings. Used for
/// stream headers, where tests may want to see exactly what was declared.
pub(crate) fn raw_attrs(start: &BytesStart<'_>) -> Result<Vec<(String, String)>, ParseError> {
    let mut out = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| ParseError(format!("bad attribute: {e}")))?;
        let key = String::from_utf8_lossy(attr.key.into_inner()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| ParseError(format!("bad value of attribute {key}: {e}")))?;
        out.push((key, value.into_owned()));
    }
    Ok(out)
}

/// The namespace URI behind a resolution result; an unknown prefix is an error because a
/// well-formed XMPP stream never uses an undeclared prefix.
pub(crate) fn namespace_string(resolved: ResolveResult<'_>) -> Result<String, ParseError> {
    match resolved {
        ResolveResult::Bound(ns) => String::from_utf8(ns.into_inner().to_vec())
            .map_err(|e| ParseError(format!("namespace is not UTF-8: {e}"))),
        ResolveResult::Unbound => Ok(String::new()),
        ResolveResult::Unknown(prefix) => Err(ParseError(format!(
            "undeclared namespace prefix {:?}",
            String::from_utf8_lossy(&prefix)
        ))),
    }
}

/// Assembles elements from start/end/text events and hands back each completed root.
#[derive(Debug, Default)]
pub(crate) struct TreeBuilder {
    stack: Vec<Element>,
}

impl TreeBuilder {
    /// How many elements are open.
    pub(crate) fn depth(&self) -> usize {
        self.stack.len()
    }

    pub(crate) fn start(&mut self, element: Element) {
        self.stack.push(element);
    }

    /// Adds a childless element; returns it when it is itself a root.
    pub(crate) fn empty(&mut self, element: Element) -> Option<Element> {
        match self.stack.last_mut() {
            Some(parent) => {
                parent.push_child(element);
                None
            }
            None => Some(element),
        }
    }

    /// Closes the innermost element; returns it when it was a root. The caller must only call
    /// this while `depth() > 0` (the XML reader checks that end tags match).
    pub(crate) fn end(&mut self) -> Option<Element> {
        let done = self.stack.pop()?;
        self.empty(done)
    }

    pub(crate) fn text(&mut self, text: &str) {
        if let Some(top) = self.stack.last_mut() {
            top.push_text(text);
        }
    }
}

/// Parses a complete document consisting of exactly one element.
fn parse_single(xml: &str) -> Result<Element, ParseError> {
    let mut reader = NsReader::from_str(xml);
    let mut tree = TreeBuilder::default();
    let mut root: Option<Element> = None;
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|e| ParseError(e.to_string()))?;
        let resolved = namespace_string(resolved);
        match event {
            Event::Start(start) => {
                let el = element_from_start(resolved, &start)?;
                if root.is_some() {
                    return Err(ParseError("more than one root element".into()));
                }
                tree.start(el);
            }
            Event::Empty(start) => {
                let el = element_from_start(resolved, &start)?;
                if root.is_some() {
                    return Err(ParseError("more than one root element".into()));
                }
                if let Some(done) = tree.empty(el) {
                    root = Some(done);
                }
            }
            Event::End(_) => {
                if let Some(done) = tree.end() {
                    root = Some(done);
                }
            }
            Event::Text(text) => {
                let text = text.unescape().map_err(|e| ParseError(e.to_string()))?;
                if tree.depth() == 0 {
                    if !text.trim().is_empty() {
                        return Err(ParseError("text outside the root element".into()));
                    }
                } else {
                    tree.text(&text);
                }
            }
            Event::CData(data) => {
                let data = std::str::from_utf8(&data)
                    .map_err(|e| ParseError(format!("CDATA is not UTF-8: {e}")))?;
                if tree.depth() == 0 {
                    return Err(ParseError("CDATA outside the root element".into()));
                }
                tree.text(data);
            }
            Event::Decl(_) if tree.depth() == 0 && root.is_none() => {}
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
                return Err(ParseError(
                    "comments, processing instructions and DTDs are not allowed in XMPP".into(),
                ));
            }
            Event::Eof => {
                if tree.depth() != 0 {
                    return Err(ParseError("unexpected end of input".into()));
                }
                return root.ok_or_else(|| ParseError("no element".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_round_trip(input: &str, expect: &str) {
        let parsed = Element::parse(input).unwrap();
        assert_eq!(parsed.to_xml(), expect, "input: {input}");
        assert_eq!(Element::parse(&parsed.to_xml()).unwrap(), parsed);
    }

    #[test]
    fn round_trips() {
        check_round_trip("<a/>", "<a/>");
        check_round_trip("<a xmlns='x'><b/></a>", "<a xmlns='x'><b/></a>");
        check_round_trip(
            "<a xmlns='x'><b xmlns='y'><c/></b></a>",
            "<a xmlns='x'><b xmlns='y'><c/></b></a>",
        );
        check_round_trip(
            r#"<p:a xmlns:p="x" k="1 &amp; 2"><p:b>t&lt;</p:b></p:a>"#,
            "<a xmlns='x' k='1 &amp; 2'><b>t&lt;</b></a>",
        );
        check_round_trip(
            "<a xmlns='x'><![CDATA[<hi>]]> &amp; more</a>",
            "<a xmlns='x'>&lt;hi&gt; &amp; more</a>",
        );
        check_round_trip(
            "<a xmlns='x' xml:lang='en'>&#x1F600;</a>",
            "<a xmlns='x' xml:lang='en'>\u{1F600}</a>",
        );
    }

    #[test]
    fn rejects_restricted_xml() {
        for bad in [
            "<a><!-- c --></a>",
            "<a><?pi x?></a>",
            "<a>",
            "<a/><b/>",
            "<p:a/>",
            "text",
        ] {
            assert!(Element::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn parse_stanza_defaults_to_jabber_client() {
        let m = Element::parse_stanza("<message to='r@x'><body>hi</body></message>").unwrap();
        assert!(m.is("message", ns::CLIENT));
        assert_eq!(m.body().as_deref(), Some("hi"));
        assert_eq!(m.attr("to"), Some("r@x"));
        assert!(Element::parse_stanza("<a/><b/>").is_err());
        assert!(Element::parse_stanza("x<a/>").is_err());
        assert!(Element::parse_stanza("").is_err());
    }

    #[test]
    fn builder_and_accessors() {
        let e = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("type", "set")
            .with_child(Element::new("ping", ns::PING));
        assert_eq!(e.attr("type"), Some("set"));
        assert!(e.has_child("ping", ns::PING));
        assert_eq!(
            e.to_xml(),
            "<iq xmlns='jabber:client' type='set'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
    }
}
