//! Search across rooms: a MAM query (XEP-0313) to the MUC service JID itself, usually with
//! XEP-0431 full-text search, answered from every room the user may read — the same rule as
//! a room's own MAM (the category's wall, the policy, bans, members-only), decided from the
//! room records and the compiled directory without loading any room.
//!
//! Results are ordered by (time, room, id) and paged with RSM like a room archive; a result's
//! id is `SEQ.ROOM` (the message's id in its room, then the room's JID) and its
//! `<forwarded/>` message comes from the room, with its stanza-id, so a client can open the
//! room at that message. `with` names a room (`room@service`) or an occupant of one
//! (`room@service/nick`). Each room is asked with the page size plus one, a few rooms at a
//! time; at most [`ROOMS_MAX`] rooms are searched (the most recently created first), and
//! the `<fin/>` says `complete='false'` when more were skipped.

use std::cmp::Ordering as CmpOrdering;

use futures_util::StreamExt as _;
use pchat_room::directory::Access;
use pchat_room::RoomRecord;
use pchat_store::{ArchiveQuery, ArchivedMessage, StoreError};
use pchat_xmpp::{ns, Element, StanzaError};

use super::{effective_affiliation, MucService};
use crate::mam;

/// Rooms one search reads at most.
pub const ROOMS_MAX: usize = 2000;
/// Rooms asked at once.
const PARALLEL: usize = 8;

/// A result id: the message's id in its room and the room.
fn result_id(m: &ArchivedMessage) -> String {
    format!("{}.{}", m.seq, m.room)
}

fn parse_result_id(id: &str) -> Option<(i64, &str)> {
    let (seq, room) = id.trim().split_once('.')?;
    let seq = seq.parse::<i64>().ok().filter(|s| *s > 0)?;
    (!room.is_empty()).then_some((seq, room))
}

fn order(a: &ArchivedMessage, b: &ArchivedMessage) -> CmpOrdering {
    (a.at, &a.room, a.seq).cmp(&(b.at, &b.room, b.seq))
}

impl MucService {
    /// Answers a MAM query addressed to the service: results and `<fin/>` are delivered to
    /// the asker's session; a refusal is returned.
    pub(super) async fn search_rooms(&self, el: &Element, from: &str) -> Option<Element> {
        let bare = pchat_room::bare_jid(from);
        let bad = |c: StanzaError, t: &str| Some(c.reply_to(el, Some(t)));
        // `with` names a room here, not a nick: taken out before the room-archive parser.
        let mut with_room: Option<(String, Option<String>)> = None;
        let mut iq = el.clone();
        if let Some(form) = iq
            .get_child_mut("query", ns::MAM)
            .and_then(|q| q.get_child_mut("x", ns::DATA_FORMS))
        {
            if let Some(v) = form
                .elements()
                .find(|f| f.is("field", ns::DATA_FORMS) && f.get_attr("var") == Some("with"))
                .and_then(|f| f.child_text("value", ns::DATA_FORMS))
            {
                let (room, nick) = match v.trim().split_once('/') {
                    Some((r, n)) => (r.to_lowercase(), Some(n.to_owned())),
                    None => (v.trim().to_lowercase(), None),
                };
                with_room = Some((room, nick));
            }
            form.children.retain(|n| match n {
                pchat_xmpp::Node::Element(f) => {
                    !(f.is("field", ns::DATA_FORMS) && f.get_attr("var") == Some("with"))
                }
                _ => true,
            });
        }
        // The paging ids are this archive's (SEQ.ROOM), not a room's: taken out too.
        let (mut after, mut before) = (None, None);
        if let Some(set) = iq
            .get_child_mut("query", ns::MAM)
            .and_then(|q| q.get_child_mut("set", ns::RSM))
        {
            after = set.child_text("after", ns::RSM);
            before = set
                .get_child("before", ns::RSM)
                .map(|b| b.text_content())
                .map(|t| t.trim().to_owned());
            set.children.retain(|n| match n {
                pchat_xmpp::Node::Element(e) => !(e.name == "after" || e.name == "before"),
                _ => true,
            });
        }
        let parsed = match mam::parse_query(&iq) {
            Ok(q) => q,
            Err(reply) => return Some(reply),
        };
        let mut base = parsed.query;
        base.with_nick = with_room.as_ref().and_then(|(_, n)| n.clone());
        let limit = base.limit as usize;
        let Some(access) = self.access().await else {
            return bad(
                StanzaError::InternalServerError,
                "the server has not read its directory yet; retry shortly",
            );
        };
        let records = match self.store.room_list().await {
            Ok(r) => r,
            Err(_) => {
                return bad(
                    StanzaError::InternalServerError,
                    "the room store is unavailable",
                )
            }
        };
        let mut readable: Vec<_> = records
            .into_iter()
            .filter(|r| {
                with_room
                    .as_ref()
                    .is_none_or(|(room, _)| r.jid.eq_ignore_ascii_case(room))
            })
            .filter(|r| may_read(r, &bare, &access))
            .collect();
        readable.sort_by_key(|r| std::cmp::Reverse(r.created_at));
        let skipped = readable.len().saturating_sub(ROOMS_MAX);
        readable.truncate(ROOMS_MAX);

        // The anchor of a page: a message this archive holds, or item-not-found.
        let anchor_of = |id: &str| parse_result_id(id).map(|(s, r)| (s, r.to_owned()));
        let anchor = match (after.as_deref(), before.as_deref()) {
            (Some(a), _) => Some((a.to_owned(), true)),
            (None, Some(b)) if !b.is_empty() => Some((b.to_owned(), false)),
            _ => None,
        };
        let from_end = base.from_end || before.is_some();
        let mut anchor_msg: Option<(ArchivedMessage, bool)> = None;
        if let Some((id, is_after)) = anchor {
            let found = match anchor_of(&id) {
                Some((seq, room)) if readable.iter().any(|r| r.jid == room) => {
                    self.store.archive_get(&room, seq).await.ok().flatten()
                }
                _ => None,
            };
            match found {
                Some(m) => anchor_msg = Some((m, is_after)),
                None => {
                    return bad(
                        StanzaError::ItemNotFound,
                        &format!(
                        "no message this search can reach has the id {id}: start again from a date"
                    ),
                    )
                }
            }
        }

        // Each room: its own page in the same window, one more than asked.
        let queries: Vec<(String, ArchiveQuery)> = readable
            .iter()
            .map(|r| {
                let mut q = ArchiveQuery {
                    limit: (limit as u32).saturating_add(1),
                    from_end,
                    after_seq: None,
                    before_seq: None,
                    ..base.clone()
                };
                if let Some((m, is_after)) = &anchor_msg {
                    if *is_after {
                        q.start = Some(q.start.map_or(m.at, |s| s.max(m.at)));
                        if r.jid == m.room {
                            q.after_seq = Some(m.seq);
                        }
                    } else {
                        q.end = Some(q.end.map_or(m.at, |e| e.min(m.at)));
                        if r.jid == m.room {
                            q.before_seq = Some(m.seq);
                        }
                    }
                }
                (r.jid.clone(), q)
            })
            .collect();
        let store = self.store.clone();
        let pages: Vec<Result<pchat_store::ArchivePage, StoreError>> =
            futures_util::stream::iter(queries)
                .map(move |(room, q)| {
                    let store = store.clone();
                    async move { store.archive_page(&room, &q).await }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
        let mut found: Vec<ArchivedMessage> = Vec::new();
        let mut count: u64 = 0;
        for p in pages {
            match p {
                Ok(page) => {
                    count += page.count;
                    found.extend(page.messages);
                }
                Err(_) => {
                    return bad(
                        StanzaError::InternalServerError,
                        "the archive is unavailable; retry shortly",
                    )
                }
            }
        }
        // Strictly beyond the anchor in (time, room, id) order.
        if let Some((m, is_after)) = &anchor_msg {
            found.retain(|x| {
                let o = order(x, m);
                if *is_after {
                    o == CmpOrdering::Greater
                } else {
                    o == CmpOrdering::Less
                }
            });
        }
        found.sort_by(order);
        let more = found.len() > limit;
        let page: Vec<ArchivedMessage> = if from_end {
            let cut = found.len().saturating_sub(limit);
            found.split_off(cut)
        } else {
            found.truncate(limit);
            found
        };
        let query_id = parsed.query_id.as_deref();
        let mut shown: Vec<&ArchivedMessage> = page.iter().collect();
        let what = format!("search across rooms ({})", super::query_words(&base));
        if super::record_reads(&*self.store, from, &what, &shown)
            .await
            .is_err()
        {
            return bad(
                StanzaError::InternalServerError,
                "the compliance record is unavailable; retry shortly",
            );
        }
        if parsed.flip {
            shown.reverse();
        }
        for m in &shown {
            let mut r = mam::result_message(m, from, query_id);
            r.set_attr("from", self.jid.as_str());
            if let Some(res) = r.get_child_mut("result", ns::MAM) {
                res.set_attr("id", result_id(m));
            }
            self.router.deliver(r);
        }
        let mut set = Element::new("set", ns::RSM);
        if let (Some(f), Some(l)) = (page.first(), page.last()) {
            set = set
                .child(Element::new("first", ns::RSM).text(result_id(f)))
                .child(Element::new("last", ns::RSM).text(result_id(l)));
        }
        if anchor_msg.is_none() {
            set = set.child(Element::new("count", ns::RSM).text(count.to_string()));
        }
        let mut fin = Element::new("fin", ns::MAM).child(set);
        if !more && skipped == 0 {
            fin.set_attr("complete", "true");
        }
        let reply = Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", el.get_attr("id"))
            .attr("from", self.jid.as_str())
            .attr("to", from)
            .child(fin);
        // After the results, through the same queue, so it cannot overtake them.
        self.router.deliver(reply);
        None
    }
}

/// Whether `bare` may read the history of `room`: the room is enabled, the
/// category's policy and walls let the user in, the user is not an outcast,
/// and a members-only room counts the user among its members. Cross-room
/// search and file downloads ask the same question.
pub(crate) fn may_read(room: &RoomRecord, bare: &str, access: &Access) -> bool {
    !room.disabled
        && access.allows(&room.category, bare)
        && match effective_affiliation(room, bare, access) {
            Some(pchat_room::Affiliation::Outcast) => false,
            a if room.config.members_only => {
                a.is_some_and(|a| a >= pchat_room::Affiliation::Member)
            }
            _ => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_ids_name_the_room_and_the_message() {
        assert_eq!(
            parse_result_id("42.desk@conference.example"),
            Some((42, "desk@conference.example"))
        );
        for bad in ["", "42", "x.desk@c", "0.desk@c", "-1.desk@c", "42."] {
            assert_eq!(parse_result_id(bad), None, "{bad}");
        }
    }
}
