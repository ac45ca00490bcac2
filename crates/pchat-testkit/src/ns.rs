//! Namespace URIs used by the client, spelled out once so a typo cannot make a check vacuous.

/// RFC 6120 client stanzas.
pub const CLIENT: &str = "jabber:client";
/// RFC 6120 stream elements (`stream:stream`, `stream:features`, `stream:error`).
pub const STREAMS: &str = "http://etherx.jabber.org/streams";
/// RFC 6120 stream error conditions.
pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// RFC 6120 stanza error conditions.
pub const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// RFC 6120 STARTTLS.
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// RFC 6120 SASL.
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// RFC 6120 resource binding.
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// RFC 3921 legacy session establishment.
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// RFC 7395 WebSocket framing (`<open/>`, `<close/>`).
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// XEP-0045 Multi-User Chat (join).
pub const MUC: &str = "http://jabber.org/protocol/muc";
/// XEP-0045 Multi-User Chat (user namespace: status codes, items).
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// XEP-0045 admin queries.
pub const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
/// XEP-0045 owner queries.
pub const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
/// XEP-0313 Message Archive Management, version 2.
pub const MAM: &str = "urn:xmpp:mam:2";
/// XEP-0059 Result Set Management.
pub const RSM: &str = "http://jabber.org/protocol/rsm";
/// XEP-0004 Data Forms.
pub const DATA_FORMS: &str = "jabber:x:data";
/// XEP-0297 Stanza Forwarding.
pub const FORWARD: &str = "urn:xmpp:forward:0";
/// XEP-0203 Delayed Delivery.
pub const DELAY: &str = "urn:xmpp:delay";
/// XEP-0359 Unique and Stable Stanza IDs (`stanza-id`, `origin-id`).
pub const SID: &str = "urn:xmpp:sid:0";
/// XEP-0030 Service Discovery, info.
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0030 Service Discovery, items.
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// XEP-0199 XMPP Ping.
pub const PING: &str = "urn:xmpp:ping";
