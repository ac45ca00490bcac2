//! Room archives over XEP-0313 (`urn:xmpp:mam:2`) with RSM paging (XEP-0059) and full-text
//! search (XEP-0431), and the archive-backed history sent on join. Queries become
//! [`ArchiveQuery`] values; pages become stanzas.

use pchat_store::{ArchiveQuery, ArchivedMessage, ARCHIVE_PAGE_MAX};
use pchat_xmpp::{ns, Element, StanzaError};

use crate::datetime;

/// Page size when the client names none.
pub const PAGE_DEFAULT: u32 = 50;

/// A parsed MAM query.
#[derive(Debug, PartialEq, Eq)]
pub struct MamQuery {
    /// Client's query id, echoed in results.
    pub query_id: Option<String>,
    /// The store query.
    pub query: ArchiveQuery,
    /// XEP-0313 `<flip-page/>`: the page's messages in reverse order.
    pub flip: bool,
}

/// True for an iq carrying a MAM query or a MAM form request.
pub fn is_mam_iq(iq: &Element) -> bool {
    iq.name == "iq" && iq.has_child("query", ns::MAM)
}

/// The form a client fetches to learn the filter fields (XEP-0313 §4.1.1, XEP-0431).
pub fn form_reply(iq: &Element) -> Element {
    let field = |var: &str, ty: &str| {
        Element::new("field", ns::DATA_FORMS)
            .attr("var", var)
            .attr("type", ty)
    };
    let form = Element::new("x", ns::DATA_FORMS)
        .attr("type", "form")
        .child(
            field("FORM_TYPE", "hidden").child(Element::new("value", ns::DATA_FORMS).text(ns::MAM)),
        )
        .child(field("with", "jid-single"))
        .child(field("start", "text-single"))
        .child(field("end", "text-single"))
        .child(field("{urn:xmpp:fulltext:0}fulltext", "text-single"));
    reply_result(iq).child(Element::new("query", ns::MAM).child(form))
}

fn reply_result(iq: &Element) -> Element {
    Element::new("iq", ns::CLIENT)
        .attr("type", "result")
        .attr_opt("id", iq.get_attr("id"))
        .attr_opt("from", iq.get_attr("to"))
        .attr_opt("to", iq.get_attr("from"))
}

/// Parses a MAM query iq (`type='set'`). Errors are ready-made error replies.
pub fn parse_query(iq: &Element) -> Result<MamQuery, Element> {
    let bad = |text: &str| StanzaError::BadRequest.reply_to(iq, Some(text));
    let q = iq
        .get_child("query", ns::MAM)
        .ok_or_else(|| bad("no MAM query"))?;
    let mut query = ArchiveQuery {
        limit: PAGE_DEFAULT,
        ..ArchiveQuery::default()
    };
    if let Some(form) = q.get_child("x", ns::DATA_FORMS) {
        for field in form.elements().filter(|e| e.is("field", ns::DATA_FORMS)) {
            let var = field.get_attr("var").unwrap_or_default();
            let value = field
                .child_text("value", ns::DATA_FORMS)
                .unwrap_or_default();
            match var {
                "FORM_TYPE" => {
                    if value != ns::MAM {
                        return Err(bad("FORM_TYPE must be urn:xmpp:mam:2"));
                    }
                }
                "with" => {
                    // In a room archive, `with` names an occupant: room@service/nick.
                    let nick = value.split_once('/').map(|(_, n)| n).unwrap_or(&value);
                    if !nick.is_empty() {
                        query.with_nick = Some(nick.to_owned());
                    }
                }
                "start" => {
                    query.start = Some(
                        datetime::parse(&value)
                            .ok_or_else(|| bad("start is not an XEP-0082 date-time"))?,
                    )
                }
                "end" => {
                    query.end = Some(
                        datetime::parse(&value)
                            .ok_or_else(|| bad("end is not an XEP-0082 date-time"))?,
                    )
                }
                "{urn:xmpp:fulltext:0}fulltext" | "withtext" => {
                    if !value.trim().is_empty() {
                        query.fulltext = Some(value);
                    }
                }
                other => {
                    return Err(StanzaError::FeatureNotImplemented
                        .reply_to(iq, Some(&format!("unknown MAM filter field `{other}`"))))
                }
            }
        }
    }
    if let Some(set) = q.get_child("set", ns::RSM) {
        if let Some(max) = set.child_text("max", ns::RSM) {
            let max: u32 = max
                .trim()
                .parse()
                .map_err(|_| bad("RSM max must be a whole number"))?;
            query.limit = max.min(ARCHIVE_PAGE_MAX);
        }
        let parse_id = |s: &str| -> Result<i64, Element> {
            s.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    StanzaError::ItemNotFound.reply_to(iq, Some("no archived message has that id"))
                })
        };
        if let Some(after) = set.child_text("after", ns::RSM) {
            query.after_seq = Some(parse_id(&after)?);
        }
        if let Some(before) = set.get_child("before", ns::RSM) {
            query.from_end = true;
            let text = before.text_content();
            if !text.trim().is_empty() {
                query.before_seq = Some(parse_id(&text)?);
            }
        }
    }
    Ok(MamQuery {
        query_id: q.get_attr("queryid").map(str::to_owned),
        query,
        flip: q.has_child("flip-page", ns::MAM),
    })
}

impl MamQuery {
    /// The archive ids the query pages from (RSM `after`, `before`): each must name a message
    /// the archive holds, or the answer is `item-not-found` (XEP-0313 §4.3.1, XEP-0059 §2.6).
    /// Paging on from an id the archive does not hold would silently skip whatever the
    /// archive holds after it under lower ids: after a DR failover lost the messages a client
    /// saw last, their ids are gone, and the client must resynchronise (e.g. by date).
    pub fn anchors(&self) -> impl Iterator<Item = i64> {
        self.query
            .after_seq
            .into_iter()
            .chain(self.query.before_seq)
    }
}

/// The error reply to a query that pages from an id the archive does not hold.
pub fn unknown_anchor(iq: &Element, id: i64) -> Element {
    StanzaError::ItemNotFound.reply_to(
        iq,
        Some(&format!(
            "the archive holds no message with id {id} (lost in a failover, or never there): \
             resynchronise, e.g. from a date"
        )),
    )
}

/// An archived message wrapped as a MAM result for `to`.
pub fn result_message(m: &ArchivedMessage, to: &str, query_id: Option<&str>) -> Element {
    let inner = stored_stanza(m);
    Element::new("message", ns::CLIENT)
        .attr("to", to)
        .attr("from", m.room.as_str())
        .child(
            Element::new("result", ns::MAM)
                .attr_opt("queryid", query_id)
                .attr("id", m.seq.to_string())
                .child(
                    Element::new("forwarded", ns::FORWARD)
                        .child(
                            Element::new("delay", ns::DELAY).attr("stamp", datetime::format(m.at)),
                        )
                        .child(inner),
                ),
        )
}

/// The closing iq of a MAM query.
pub fn fin(
    iq: &Element,
    first: Option<i64>,
    last: Option<i64>,
    count: u64,
    complete: bool,
) -> Element {
    let mut set = Element::new("set", ns::RSM);
    if let (Some(f), Some(l)) = (first, last) {
        set = set
            .child(Element::new("first", ns::RSM).text(f.to_string()))
            .child(Element::new("last", ns::RSM).text(l.to_string()));
    }
    set = set.child(Element::new("count", ns::RSM).text(count.to_string()));
    let mut fin = Element::new("fin", ns::MAM).child(set);
    if complete {
        fin.set_attr("complete", "true");
    }
    reply_result(iq).child(fin)
}

/// The archived stanza with its stanza-id, as stored (no `to`).
pub fn stored_stanza(m: &ArchivedMessage) -> Element {
    let mut el = Element::parse(m.stanza.as_bytes(), ns::CLIENT).unwrap_or_else(|_| {
        // A stored stanza that no longer parses is reported rather than dropped, so the
        // archive never silently shrinks.
        Element::new("message", ns::CLIENT)
            .attr("type", "groupchat")
            .attr("from", format!("{}/{}", m.room, m.nick))
            .child(Element::new("body", ns::CLIENT).text(m.body.clone().unwrap_or_default()))
    });
    el.remove_children("stanza-id", ns::SID);
    el.children
        .push(pchat_xmpp::Node::Element(stanza_id(&m.room, m.seq)));
    el
}

/// `<stanza-id xmlns='urn:xmpp:sid:0' by=ROOM id=SEQ/>`.
pub fn stanza_id(room: &str, seq: i64) -> Element {
    Element::new("stanza-id", ns::SID)
        .attr("by", room)
        .attr("id", seq.to_string())
}

/// An archived message as join history for `to` (XEP-0045 §7.2.15, with XEP-0203 delay).
pub fn history_message(m: &ArchivedMessage, to: &str) -> Element {
    let mut el = stored_stanza(m);
    el.set_attr("to", to);
    el.children.push(pchat_xmpp::Node::Element(
        Element::new("delay", ns::DELAY)
            .attr("stamp", datetime::format(m.at))
            .attr("from", m.room.as_str()),
    ));
    el
}

/// An archived message as join history, serialized once without `to` (for
/// [`crate::router::Router::deliver_shared`]). The stored XML is what the room serialized
/// (`<message …>…</message>` without `to` or a stanza-id): the stanza-id and the delay are
/// appended to it as text, so a join does not parse and write again every message of its
/// history. Anything of another shape goes through the parser ([`history_message`]).
pub fn history_shared(m: &ArchivedMessage) -> std::sync::Arc<crate::router::SharedStanza> {
    const HEAD: &str = "<message";
    const TAIL: &str = "</message>";
    let x = m.stanza.as_str();
    let start_tag = x.find('>').map_or("", |i| &x[..i]);
    let plain = x.starts_with(HEAD)
        && matches!(x.as_bytes().get(HEAD.len()), Some(b' ' | b'>'))
        && x.ends_with(TAIL)
        && !start_tag.contains("xmlns")
        && !start_tag.contains(" to=")
        && !x.contains("<stanza-id");
    if plain {
        let mut xml = String::with_capacity(x.len() + 160);
        xml.push_str(&x[..x.len() - TAIL.len()]);
        xml.push_str(&stanza_id(&m.room, m.seq).to_xml_in(ns::CLIENT));
        xml.push_str(
            &Element::new("delay", ns::DELAY)
                .attr("stamp", datetime::format(m.at))
                .attr("from", m.room.as_str())
                .to_xml_in(ns::CLIENT),
        );
        xml.push_str(TAIL);
        return crate::router::SharedStanza::from_serialized(xml, HEAD.len());
    }
    let mut el = history_message(m, "");
    el.remove_attr("to");
    crate::router::SharedStanza::new(&el).unwrap_or_else(|| {
        crate::router::SharedStanza::from_serialized(el.to_xml_in(ns::CLIENT), HEAD.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archived(stanza: &str) -> ArchivedMessage {
        ArchivedMessage {
            room: "desk@conference.l".into(),
            seq: 42,
            at: pchat_room::Timestamp(1_700_000_000_000_000),
            sender: "ann@l".into(),
            nick: "ann".into(),
            origin_id: None,
            body: Some("b".into()),
            stanza: stanza.into(),
        }
    }

    #[test]
    fn history_without_parsing_is_what_the_parser_would_send() {
        let mut live = Element::new("message", ns::CLIENT)
            .attr("from", "desk@conference.l/ann")
            .attr("type", "groupchat")
            .attr("id", "x'1&<")
            .child(Element::new("body", ns::CLIENT).text("a < b & 'c' > d"))
            .child(Element::new("origin-id", ns::SID).attr("id", "o1"))
            .child(Element::new("occupant-id", ns::OCCUPANT_ID).attr("id", "q"));
        live.remove_attr("to");
        let stored = live.to_xml_in(ns::CLIENT);
        let m = archived(&stored);
        let fast = history_shared(&m);
        let mut slow = history_message(&m, "");
        slow.remove_attr("to");
        let slow = crate::router::SharedStanza::new(&slow).unwrap();
        for ws in [false, true] {
            let (mut a, mut b) = (String::new(), String::new());
            fast.write_to("bob@l/r", ws, &mut a);
            slow.write_to("bob@l/r", ws, &mut b);
            assert_eq!(a, b);
        }
        // Another shape (a stored stanza-id, a namespace on the root) takes the parser.
        for odd in [
            "<message from='r/n' type='groupchat'><body>x</body><stanza-id xmlns='urn:xmpp:sid:0' by='r' id='1'/></message>",
            "<message xmlns='jabber:client' from='r/n'><body>x</body></message>",
            "not xml at all",
        ] {
            let m = archived(odd);
            let mut a = String::new();
            history_shared(&m).write_to("bob@l/r", false, &mut a);
            assert!(a.contains("id='42'") && a.matches("<stanza-id").count() == 1, "{a}");
        }
    }

    fn iq(inner: &str) -> Element {
        Element::parse(
            format!("<iq type='set' id='q1' from='a@l/r' to='room@conference.l'><query xmlns='urn:xmpp:mam:2' queryid='f'>{inner}</query></iq>").as_bytes(),
            ns::CLIENT,
        )
        .unwrap()
    }

    #[test]
    fn parses_filters_and_paging() {
        let q = parse_query(&iq("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:xmpp:mam:2</value></field>\
            <field var='with'><value>room@conference.l/bob</value></field>\
            <field var='start'><value>2025-11-26T09:41:33Z</value></field>\
            <field var='{urn:xmpp:fulltext:0}fulltext'><value>disk full</value></field></x>\
            <set xmlns='http://jabber.org/protocol/rsm'><max>5000</max><before/></set>")).unwrap();
        assert_eq!(q.query_id.as_deref(), Some("f"));
        assert_eq!(q.query.with_nick.as_deref(), Some("bob"));
        assert_eq!(q.query.fulltext.as_deref(), Some("disk full"));
        assert_eq!(q.query.limit, ARCHIVE_PAGE_MAX);
        assert!(q.query.from_end && q.query.before_seq.is_none());
        let q = parse_query(&iq(
            "<set xmlns='http://jabber.org/protocol/rsm'><max>10</max><after>42</after></set>",
        ))
        .unwrap();
        assert_eq!(
            (q.query.limit, q.query.after_seq, q.query.from_end),
            (10, Some(42), false)
        );
    }

    #[test]
    fn refuses_bad_queries() {
        let cases = [
            ("<set xmlns='http://jabber.org/protocol/rsm'><max>x</max></set>", "bad-request"),
            ("<set xmlns='http://jabber.org/protocol/rsm'><after>abc</after></set>", "item-not-found"),
            ("<x xmlns='jabber:x:data' type='submit'><field var='start'><value>soon</value></field></x>", "bad-request"),
            ("<x xmlns='jabber:x:data' type='submit'><field var='colour'><value>red</value></field></x>", "feature-not-implemented"),
        ];
        for (inner, cond) in cases {
            let err = parse_query(&iq(inner)).unwrap_err();
            let e = err.get_child("error", ns::CLIENT).unwrap();
            assert!(e.has_child(cond, ns::STANZAS), "{inner}: {}", err.to_xml());
        }
    }
}
