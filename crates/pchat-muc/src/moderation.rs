//! Content control: what the archive keeps instead of a removed message, and what occupants
//! are told (XEP-0424 retraction, XEP-0425 moderation; Lync's Remove-CsPersistentChatMessage).
//! The compliance record of the message keeps the original; these only change what rooms
//! show from now on.

use pchat_xmpp::{ns, Element};

/// The archived stanza that replaces a removed message: from the same occupant JID
/// (`room/nick`), with a `<retracted/>` tombstone saying by whom, when and why (XEP-0425
/// §5); or, with `replacement`, a message with that body and the same tombstone, so clients
/// show the administrator's text and can tell it is not the author's.
pub fn tombstone(
    from: &str,
    by: &str,
    reason: Option<&str>,
    replacement: Option<&str>,
    stamp: &str,
) -> Element {
    let mut retracted = Element::new("retracted", ns::RETRACT)
        .attr("stamp", stamp)
        .child(Element::new("moderated", ns::MODERATE).attr("by", by));
    if let Some(r) = reason {
        retracted = retracted.child(Element::new("reason", ns::RETRACT).text(r));
    }
    let mut message = Element::new("message", ns::CLIENT)
        .attr("from", from)
        .attr("type", "groupchat");
    if let Some(text) = replacement {
        message = message.child(Element::new("body", ns::CLIENT).text(text));
    }
    message.child(retracted)
}

/// The message that tells an occupant (`to`, a session's full JID) that message `id` of
/// `room` was removed, by `by` (XEP-0425 §4: from the room, a `<retract/>` with
/// `<moderated/>`).
pub fn retraction_notice(room: &str, to: &str, id: i64, by: &str, reason: Option<&str>) -> Element {
    let mut retract = Element::new("retract", ns::RETRACT)
        .attr("id", id.to_string())
        .child(Element::new("moderated", ns::MODERATE).attr("by", by));
    if let Some(r) = reason {
        retract = retract.child(Element::new("reason", ns::RETRACT).text(r));
    }
    Element::new("message", ns::CLIENT)
        .attr("from", room)
        .attr("to", to)
        .attr("type", "groupchat")
        .attr("id", format!("retract-{id}"))
        .child(retract)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_keeps_the_sender_and_says_who_removed_what_and_why() {
        let t = tombstone(
            "r@muc.example/ann",
            "r@muc.example",
            Some("off topic"),
            None,
            "2026-12-03T10:00:00Z",
        );
        let xml = t.to_xml();
        assert!(xml.contains("from='r@muc.example/ann'"), "{xml}");
        assert!(!xml.contains("<body"), "{xml}");
        let r = t.get_child("retracted", ns::RETRACT).expect("retracted");
        assert_eq!(r.get_attr("stamp"), Some("2026-12-03T10:00:00Z"));
        assert!(
            xml.contains("off topic") && xml.contains(ns::MODERATE),
            "{xml}"
        );
        let replaced = tombstone("r@m/ann", "r@m", None, Some("[removed]"), "s").to_xml();
        assert!(replaced.contains("<body>[removed]</body>"), "{replaced}");
    }

    #[test]
    fn the_notice_names_the_stanza_id() {
        let n = retraction_notice("r@m", "u@d/x", 42, "r@m/mod", Some("spam")).to_xml();
        assert!(
            n.contains("id='42'") && n.contains("by='r@m/mod'") && n.contains("spam"),
            "{n}"
        );
    }
}
