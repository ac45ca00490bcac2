//! Namespaces used by pchat, one constant per XMPP namespace.
#![allow(missing_docs)]

pub const CLIENT: &str = "jabber:client";
pub const STREAM: &str = "http://etherx.jabber.org/streams";
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const STREAMS_ERR: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const ROSTER: &str = "jabber:iq:roster";
pub const PING: &str = "urn:xmpp:ping";
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const MUC: &str = "http://jabber.org/protocol/muc";
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
pub const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
pub const MUC_ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
pub const MUC_ROOMINFO: &str = "http://jabber.org/protocol/muc#roominfo";
pub const MUC_REQUEST: &str = "http://jabber.org/protocol/muc#request";
pub const DATA_FORMS: &str = "jabber:x:data";
pub const MAM: &str = "urn:xmpp:mam:2";
pub const RSM: &str = "http://jabber.org/protocol/rsm";
pub const FORWARD: &str = "urn:xmpp:forward:0";
pub const DELAY: &str = "urn:xmpp:delay";
pub const SID: &str = "urn:xmpp:sid:0";
pub const FULLTEXT: &str = "urn:xmpp:fulltext:0";
pub const CONFERENCE: &str = "jabber:x:conference";
pub const VERSION: &str = "jabber:iq:version";
/// XEP-0424 message retraction.
pub const RETRACT: &str = "urn:xmpp:message-retract:1";
/// XEP-0421 occupant identifiers.
pub const OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
/// XEP-0425 moderated message retraction.
pub const MODERATE: &str = "urn:xmpp:message-moderate:1";
/// XEP-0280 message carbons.
pub const CARBONS: &str = "urn:xmpp:carbons:2";
/// XEP-0352 client state indication.
pub const CSI: &str = "urn:xmpp:csi:0";
/// XEP-0334 message processing hints.
pub const HINTS: &str = "urn:xmpp:hints";
/// XEP-0198 stream management.
pub const SM: &str = "urn:xmpp:sm:3";
/// XEP-0363 HTTP File Upload.
pub const HTTP_UPLOAD: &str = "urn:xmpp:http:upload:0";
/// XEP-0066 out-of-band data (the URL of a file a message shares).
pub const OOB: &str = "jabber:x:oob";
