//! Stream errors (RFC 6120 §4.9) and stanza errors (RFC 6120 §8.3): the one place where a
//! domain refusal becomes XMPP on the wire.

use crate::element::Element;
use crate::ns;

/// Stream-level error conditions pchat sends before closing a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum StreamError {
    BadFormat,
    BadNamespacePrefix,
    Conflict,
    ConnectionTimeout,
    HostUnknown,
    InternalServerError,
    InvalidNamespace,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    ResourceConstraint,
    RestrictedXml,
    SeeOtherHost,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamError {
    /// The condition's element name.
    pub fn condition(self) -> &'static str {
        use StreamError::*;
        match self {
            BadFormat => "bad-format",
            BadNamespacePrefix => "bad-namespace-prefix",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostUnknown => "host-unknown",
            InternalServerError => "internal-server-error",
            InvalidNamespace => "invalid-namespace",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SeeOtherHost => "see-other-host",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }

    /// `<stream:error>` with this condition and a human-readable text.
    pub fn to_element(self, text: &str) -> Element {
        let mut e = Element::new("error", ns::STREAM)
            .child(Element::new(self.condition(), ns::STREAMS_ERR));
        if !text.is_empty() {
            e = e.child(
                Element::new("text", ns::STREAMS_ERR)
                    .attr("xml:lang", "en")
                    .text(text),
            );
        }
        e
    }
}

/// The `type` attribute of a stanza error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum StanzaErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl StanzaErrorType {
    fn as_str(self) -> &'static str {
        match self {
            StanzaErrorType::Auth => "auth",
            StanzaErrorType::Cancel => "cancel",
            StanzaErrorType::Continue => "continue",
            StanzaErrorType::Modify => "modify",
            StanzaErrorType::Wait => "wait",
        }
    }
}

/// Stanza error conditions (RFC 6120 §8.3.3), each with its conventional type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum StanzaError {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    Gone,
    InternalServerError,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RecipientUnavailable,
    RegistrationRequired,
    RemoteServerNotFound,
    ResourceConstraint,
    ServiceUnavailable,
    UndefinedCondition,
    UnexpectedRequest,
}

impl StanzaError {
    /// The condition's element name.
    pub fn condition(self) -> &'static str {
        use StanzaError::*;
        match self {
            BadRequest => "bad-request",
            Conflict => "conflict",
            FeatureNotImplemented => "feature-not-implemented",
            Forbidden => "forbidden",
            Gone => "gone",
            InternalServerError => "internal-server-error",
            ItemNotFound => "item-not-found",
            JidMalformed => "jid-malformed",
            NotAcceptable => "not-acceptable",
            NotAllowed => "not-allowed",
            NotAuthorized => "not-authorized",
            PolicyViolation => "policy-violation",
            RecipientUnavailable => "recipient-unavailable",
            RegistrationRequired => "registration-required",
            RemoteServerNotFound => "remote-server-not-found",
            ResourceConstraint => "resource-constraint",
            ServiceUnavailable => "service-unavailable",
            UndefinedCondition => "undefined-condition",
            UnexpectedRequest => "unexpected-request",
        }
    }

    /// The error type RFC 6120 and XEP-0045 pair with the condition.
    pub fn default_type(self) -> StanzaErrorType {
        use StanzaError::*;
        use StanzaErrorType as T;
        match self {
            BadRequest | JidMalformed | NotAcceptable | PolicyViolation => T::Modify,
            NotAuthorized | Forbidden | RegistrationRequired => T::Auth,
            InternalServerError | ResourceConstraint | RecipientUnavailable | UnexpectedRequest => {
                T::Wait
            }
            _ => T::Cancel,
        }
    }

    /// The `<error/>` child element, with optional human-readable text.
    pub fn to_error_element(self, ty: StanzaErrorType, text: Option<&str>) -> Element {
        let mut e = Element::new("error", ns::CLIENT)
            .attr("type", ty.as_str())
            .child(Element::new(self.condition(), ns::STANZAS));
        if let Some(t) = text {
            e = e.child(
                Element::new("text", ns::STANZAS)
                    .attr("xml:lang", "en")
                    .text(t),
            );
        }
        e
    }

    /// Turns a received stanza into its error reply: swaps `from`/`to`, sets `type='error'` and
    /// appends the `<error/>` child. The original payload is kept, as RFC 6120 allows.
    pub fn reply_to(self, stanza: &Element, text: Option<&str>) -> Element {
        self.reply_to_typed(stanza, self.default_type(), text)
    }

    /// As [`StanzaError::reply_to`] with an explicit error type.
    pub fn reply_to_typed(
        self,
        stanza: &Element,
        ty: StanzaErrorType,
        text: Option<&str>,
    ) -> Element {
        let mut reply = Element::new(stanza.name.clone(), stanza.ns.clone());
        if let Some(id) = stanza.get_attr("id") {
            reply.set_attr("id", id);
        }
        if let Some(from) = stanza.get_attr("from") {
            reply.set_attr("to", from);
        }
        if let Some(to) = stanza.get_attr("to") {
            reply.set_attr("from", to);
        }
        reply.set_attr("type", "error");
        // Only the payload of requests is echoed; echoing message bodies back is noise.
        if stanza.name == "iq" {
            reply.children = stanza.children.clone();
        }
        reply.child(self.to_error_element(ty, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_swaps_addresses() {
        let iq = Element::new("iq", ns::CLIENT)
            .attr("id", "7")
            .attr("from", "a@x/r")
            .attr("to", "room@muc.x")
            .attr("type", "get");
        let r = StanzaError::Forbidden.reply_to(&iq, Some("no"));
        assert_eq!(
            r.to_xml_in(ns::CLIENT),
            "<iq id='7' to='a@x/r' from='room@muc.x' type='error'><error type='auth'>\
             <forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>no</text></error></iq>"
        );
    }
}
