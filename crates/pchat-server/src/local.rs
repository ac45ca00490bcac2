//! What the server answers itself: roster, ping, service discovery and version for the
//! domain and the user's own account.

use pchat_xmpp::{ns, Element, StanzaError};

use crate::state::State;

/// The reply to an iq addressed to the server or to the sender's own bare JID; `None` for
/// results and errors, which need no answer.
pub fn answer_iq(state: &State, iq: &Element, _bare: &str) -> Option<Element> {
    let ty = iq.get_attr("type")?;
    if ty == "result" || ty == "error" {
        return None;
    }
    let payload = iq.elements().next()?;
    let result = || {
        Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", iq.get_attr("id"))
            .attr_opt("from", iq.get_attr("to"))
            .attr_opt("to", iq.get_attr("from"))
    };
    Some(match (ty, payload.name.as_str(), payload.ns.as_str()) {
        ("get", "query", ns::ROSTER) => result().child(Element::new("query", ns::ROSTER)),
        ("set", "query", ns::ROSTER) => StanzaError::NotAllowed.reply_to(
            iq,
            Some("this server keeps no rosters; rooms are the point"),
        ),
        ("get", "ping", ns::PING) => result(),
        ("set", "session", ns::SESSION) => result(),
        ("get", "query", ns::DISCO_INFO) => result().child(
            Element::new("query", ns::DISCO_INFO)
                .child(
                    Element::new("identity", ns::DISCO_INFO)
                        .attr("category", "server")
                        .attr("type", "im")
                        .attr("name", "pchat"),
                )
                .child(feature(ns::DISCO_INFO))
                .child(feature(ns::DISCO_ITEMS))
                .child(feature(ns::PING))
                .child(feature(ns::VERSION))
                .child(feature(ns::CARBONS)),
        ),
        ("get", "query", ns::DISCO_ITEMS) => {
            let mut items = Element::new("query", ns::DISCO_ITEMS).child(
                Element::new("item", ns::DISCO_ITEMS)
                    .attr("jid", state.muc_jid.as_str())
                    .attr("name", "Chatrooms"),
            );
            if state.config.upload.enabled {
                items = items.child(
                    Element::new("item", ns::DISCO_ITEMS)
                        .attr("jid", state.config.upload_jid())
                        .attr("name", "File sharing"),
                );
            }
            result().child(items)
        }
        ("get", "query", ns::VERSION) => result().child(
            Element::new("query", ns::VERSION)
                .child(Element::new("name", ns::VERSION).text("pchat"))
                .child(Element::new("version", ns::VERSION).text(env!("CARGO_PKG_VERSION"))),
        ),
        _ => StanzaError::ServiceUnavailable.reply_to(iq, None),
    })
}

/// A disco#info `<feature/>`.
pub fn feature(var: &str) -> Element {
    Element::new("feature", ns::DISCO_INFO).attr("var", var)
}
