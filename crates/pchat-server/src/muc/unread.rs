//! Unread counts of a user's followed rooms (Lync's "followed rooms"), in one request at
//! login: `<iq type='get' to='conference.DOMAIN'><unread xmlns='urn:pchat:unread:0'/></iq>`.
//! The rooms are the user's bookmarks (XEP-0402), the read positions what the user's clients
//! published with XEP-0490 (message displayed synchronization: PEP node
//! `urn:xmpp:mds:displayed:0`, one item per room holding the stanza-id last displayed). The
//! answer has one `<room jid count/>` per bookmarked room the user may read (a room behind a
//! wall, disabled or gone is left out, as everywhere), counting the archived messages after
//! the read position (all of them when there is none), at most [`COUNT_MAX`] (`more='true'`
//! beyond). Documented in docs/clients.md.

use std::collections::HashMap;

use pchat_store::ArchiveQuery;
use pchat_xmpp::{ns, Element, StanzaError};

use super::search::may_read;
use super::MucService;

/// The extension's namespace.
pub const UNREAD: &str = "urn:pchat:unread:0";
/// The request's and the answer's element.
pub const UNREAD_ELEMENT: &str = "unread";
/// Messages counted per room at most.
pub const COUNT_MAX: u32 = 100;

impl MucService {
    /// The unread counts of `from`'s bookmarked rooms.
    pub(super) async fn unread(&self, el: &Element, from: &str) -> Element {
        let bare = pchat_room::bare_jid(from);
        let failed = |text: &str| StanzaError::InternalServerError.reply_to(el, Some(text));
        let Some(access) = self.access().await else {
            return failed("the server has not read its directory yet; retry shortly");
        };
        let (bookmarks, displayed) = match tokio::try_join!(
            self.store.pep_items(&bare, crate::pep::BOOKMARKS),
            self.store.pep_items(&bare, crate::pep::DISPLAYED)
        ) {
            Ok(both) => both,
            Err(_) => return failed("the store is unavailable"),
        };
        let positions: HashMap<String, i64> = displayed
            .iter()
            .filter_map(|item| {
                let payload = Element::parse(item.payload.as_bytes(), "").ok()?;
                let id = payload
                    .elements()
                    .find(|e| e.is("stanza-id", ns::SID) && e.get_attr("by") == Some(&item.id))?
                    .get_attr("id")?
                    .parse()
                    .ok()?;
                Some((item.id.to_lowercase(), id))
            })
            .collect();
        let mut answer = Element::new(UNREAD_ELEMENT, UNREAD);
        for bookmark in bookmarks {
            let room = bookmark.id.to_lowercase();
            let record = match self.store.room_get(&room).await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(_) => return failed("the store is unavailable"),
            };
            if !may_read(&record, &bare, &access) {
                continue;
            }
            let after = positions.get(&room).copied();
            let query = ArchiveQuery {
                after_seq: after,
                limit: COUNT_MAX,
                ..ArchiveQuery::default()
            };
            let page = match self.store.archive_page(&room, &query).await {
                Ok(p) => p,
                Err(_) => return failed("the archive is unavailable"),
            };
            let mut item = Element::new("room", UNREAD)
                .attr("jid", room.as_str())
                .attr("count", page.messages.len().to_string());
            if let Some(after) = after {
                item = item.attr("after", after.to_string());
            }
            if let Some(last) = page.messages.last() {
                item = item.attr("last", last.seq.to_string());
            }
            if !page.complete {
                item = item.attr("more", "true");
            }
            answer = answer.child(item);
        }
        Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", el.get_attr("id"))
            .attr("from", self.jid.as_str())
            .attr("to", from)
            .child(answer)
    }
}
