//! Finding rooms by name, description or address (Lync's "find a room"): XEP-0433 channel
//! search (`urn:xmpp:channel-search:0:search`) and its predecessor, the muclumbus search
//! Converse.js asks in its "add groupchat" box, answered by the MUC service itself.
//!
//! A request is `<search/>` in that namespace with a submitted form — `q` (words looked for,
//! case-insensitive, as one piece of text), `sinname`, `sindescription`, `sinaddr` (where to
//! look; all three when none is given) — and RSM's `<max/>` (default [`PAGE_DEFAULT`], at most
//! [`PAGE_MAX`]) and `<after/>` (a room address). A `<search/>` without a form gets the form.
//! The rooms are those the asker's disco#items lists ([`super::listed_for`]: walls, bans,
//! public or member), ordered by address. Each item has the room's address, name,
//! description, language, service type and whether it is open (not members-only).
//!
//! pchat does not report occupant counts (`nusers`): a persistent room is found whether or
//! not anybody is in it, and in a pool its occupants are spread over the servers. So
//! `min_users` and `key=nusers` are accepted and have no effect (Converse.js sends
//! `min_users=1` with every search). Documented in docs/clients.md.

use pchat_room::RoomRecord;
use pchat_xmpp::{ns, Element, StanzaError};

use super::{listed_for, MucService};

/// XEP-0433's namespace.
pub const CHANNEL_SEARCH: &str = "urn:xmpp:channel-search:0:search";
/// XEP-0433's form type for the search parameters.
const CHANNEL_SEARCH_PARAMS: &str = "urn:xmpp:channel-search:0:search-params";
/// The muclumbus namespace XEP-0433 grew from (what Converse.js 14 sends).
pub const MUCLUMBUS: &str = "https://xmlns.zombofant.net/muclumbus/search/1.0";
/// Its form type.
const MUCLUMBUS_PARAMS: &str = "https://xmlns.zombofant.net/muclumbus/search/1.0#params";
/// Rooms in a page when the asker names no `<max/>`.
pub const PAGE_DEFAULT: usize = 20;
/// Rooms in a page at most.
pub const PAGE_MAX: usize = 100;
/// Bytes of `q` at most.
pub const QUERY_BYTES_MAX: usize = 256;

/// Is this element a room search request?
pub fn is_search(payload: &Element) -> bool {
    payload.is("search", CHANNEL_SEARCH) || payload.is("search", MUCLUMBUS)
}

/// What to look for.
#[derive(Debug, PartialEq, Eq)]
struct Params {
    /// Lower-cased; empty: every room.
    words: String,
    in_name: bool,
    in_description: bool,
    in_address: bool,
    max: usize,
    after: Option<String>,
}

/// The search's parameters, or the text of a `bad-request`. `None` when the request carries
/// no submitted form (it asks for the form).
fn parse(search: &Element) -> Result<Option<Params>, String> {
    let Some(form) = search
        .get_child("x", ns::DATA_FORMS)
        .filter(|x| x.get_attr("type") == Some("submit"))
    else {
        return Ok(None);
    };
    let value = |var: &str| {
        form.elements()
            .find(|f| f.is("field", ns::DATA_FORMS) && f.get_attr("var") == Some(var))
            .map(|f| f.child_text("value", ns::DATA_FORMS).unwrap_or_default())
    };
    let flag = |var: &str| -> Result<Option<bool>, String> {
        match value(var).as_deref().map(str::trim) {
            None => Ok(None),
            Some("1" | "true") => Ok(Some(true)),
            Some("0" | "false" | "") => Ok(Some(false)),
            Some(other) => Err(format!("{var} must be true or false, not {other:?}")),
        }
    };
    let words = value("q").unwrap_or_default();
    if words.len() > QUERY_BYTES_MAX {
        return Err(format!("q holds at most {QUERY_BYTES_MAX} bytes"));
    }
    let (name, description, address) =
        (flag("sinname")?, flag("sindescription")?, flag("sinaddr")?);
    // Nothing said about where to look: everywhere.
    let everywhere = name.is_none() && description.is_none() && address.is_none();
    let mut max = PAGE_DEFAULT;
    let mut after = None;
    if let Some(set) = search.get_child("set", ns::RSM) {
        if let Some(m) = set.child_text("max", ns::RSM) {
            max = m
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("<max/> must be a number, not {m:?}"))?
                .min(PAGE_MAX);
        }
        after = set
            .child_text("after", ns::RSM)
            .map(|a| a.trim().to_owned());
    }
    Ok(Some(Params {
        words: words.trim().to_lowercase(),
        in_name: everywhere || name == Some(true),
        in_description: everywhere || description == Some(true),
        in_address: everywhere || address == Some(true),
        max,
        after,
    }))
}

fn matches(r: &RoomRecord, p: &Params) -> bool {
    if p.words.is_empty() {
        return true;
    }
    (p.in_name && r.config.name.to_lowercase().contains(&p.words))
        || (p.in_description && r.config.description.to_lowercase().contains(&p.words))
        || (p.in_address && r.jid.to_lowercase().contains(&p.words))
}

/// The form a client fills (XEP-0433 §4.1), in the namespace it asked in.
fn form(namespace: &str) -> Element {
    let params = if namespace == MUCLUMBUS {
        MUCLUMBUS_PARAMS
    } else {
        CHANNEL_SEARCH_PARAMS
    };
    let field = |var: &str, ty: &str, label: &str| {
        Element::new("field", ns::DATA_FORMS)
            .attr("var", var)
            .attr("type", ty)
            .attr("label", label)
    };
    let yes = || Element::new("value", ns::DATA_FORMS).text("true");
    Element::new("x", ns::DATA_FORMS)
        .attr("type", "form")
        .child(
            Element::new("field", ns::DATA_FORMS)
                .attr("var", "FORM_TYPE")
                .attr("type", "hidden")
                .child(Element::new("value", ns::DATA_FORMS).text(params)),
        )
        .child(field("q", "text-single", "Search for"))
        .child(field("sinname", "boolean", "Search in name").child(yes()))
        .child(field("sindescription", "boolean", "Search in description").child(yes()))
        .child(field("sinaddr", "boolean", "Search in address").child(yes()))
        .child(field(
            "min_users",
            "text-single",
            "Minimum number of users (not counted)",
        ))
        .child(
            field("key", "list-single", "Sort results by")
                .child(Element::new("value", ns::DATA_FORMS).text("address"))
                .child(
                    Element::new("option", ns::DATA_FORMS)
                        .child(Element::new("value", ns::DATA_FORMS).text("address")),
                ),
        )
}

fn item(r: &RoomRecord, namespace: &str) -> Element {
    let text = |name: &str, value: &str| Element::new(name, namespace).text(value);
    let name = if r.config.name.is_empty() {
        r.jid.split('@').next().unwrap_or_default()
    } else {
        &r.config.name
    };
    let mut item = Element::new("item", namespace)
        .attr("address", r.jid.as_str())
        .child(text("name", name));
    if !r.config.description.is_empty() {
        item = item.child(text("description", &r.config.description));
    }
    if !r.config.language.is_empty() {
        item = item.child(text("language", &r.config.language));
    }
    item = item.child(text("service-type", "xep-0045"));
    if !r.config.members_only {
        item = item.child(Element::new("is-open", namespace));
    }
    let anonymity = match r.config.whois {
        pchat_room::Whois::Anyone => "none",
        pchat_room::Whois::Moderators => "semi",
    };
    item.child(text("anonymity-mode", anonymity))
}

impl MucService {
    /// Answers a room search (see the module docs) from `from`.
    pub(super) async fn find_rooms(&self, el: &Element, search: &Element, from: &str) -> Element {
        let namespace = search.ns.as_str();
        let result = Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", el.get_attr("id"))
            .attr("from", self.jid.as_str())
            .attr("to", from);
        let params = match parse(search) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return result.child(Element::new("search", namespace).child(form(namespace)))
            }
            Err(text) => return StanzaError::BadRequest.reply_to(el, Some(&text)),
        };
        let Some(access) = self.access().await else {
            return StanzaError::InternalServerError.reply_to(
                el,
                Some("the server has not read its directory yet; retry shortly"),
            );
        };
        let records = match self.store.room_list().await {
            Ok(r) => r,
            Err(_) => {
                return StanzaError::InternalServerError
                    .reply_to(el, Some("the room store is unavailable"))
            }
        };
        let bare = pchat_room::bare_jid(from);
        // room_list is sorted by address: the order pages follow.
        let found: Vec<&RoomRecord> = records
            .iter()
            .filter(|r| listed_for(r, &bare, &access) && matches(r, &params))
            .collect();
        let start = match &params.after {
            Some(after) => found.partition_point(|r| r.jid.as_str() <= after.as_str()),
            None => 0,
        };
        let page = &found[start..(start + params.max).min(found.len())];
        let mut answer = Element::new("result", namespace);
        for r in page {
            answer = answer.child(item(r, namespace));
        }
        let mut set = Element::new("set", ns::RSM);
        if let (Some(first), Some(last)) = (page.first(), page.last()) {
            set = set
                .child(
                    Element::new("first", ns::RSM)
                        .attr("index", start.to_string())
                        .text(first.jid.as_str()),
                )
                .child(Element::new("last", ns::RSM).text(last.jid.as_str()));
        }
        set = set.child(Element::new("count", ns::RSM).text(found.len().to_string()));
        result.child(answer.child(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(fields: &[(&str, &str)], max: Option<&str>) -> Element {
        let mut form = Element::new("x", ns::DATA_FORMS).attr("type", "submit");
        for (var, value) in fields {
            form = form.child(
                Element::new("field", ns::DATA_FORMS)
                    .attr("var", *var)
                    .child(Element::new("value", ns::DATA_FORMS).text(*value)),
            );
        }
        let mut s = Element::new("search", MUCLUMBUS).child(form);
        if let Some(m) = max {
            s = s.child(Element::new("set", ns::RSM).child(Element::new("max", ns::RSM).text(m)));
        }
        s
    }

    #[test]
    fn parameters_default_to_everywhere_and_are_bounded() {
        let p = parse(&search(&[("q", " Arch ")], None)).unwrap().unwrap();
        assert_eq!(p.words, "arch");
        assert!(p.in_name && p.in_description && p.in_address);
        assert_eq!(p.max, PAGE_DEFAULT);
        let p = parse(&search(
            &[("q", "x"), ("sinname", "true"), ("sindescription", "false")],
            Some("1000"),
        ))
        .unwrap()
        .unwrap();
        assert!(p.in_name && !p.in_description && !p.in_address);
        assert_eq!(p.max, PAGE_MAX);
        assert!(parse(&search(&[("sinname", "maybe")], None)).is_err());
        assert!(parse(&search(&[("q", &"q".repeat(300))], None)).is_err());
        assert!(parse(&search(&[], Some("ten"))).is_err());
        assert_eq!(parse(&Element::new("search", CHANNEL_SEARCH)), Ok(None));
    }
}
