//! Helpers for the extensions pchat serves: MUC (XEP-0045), MAM (XEP-0313) with RSM
//! (XEP-0059), disco (XEP-0030), ping (XEP-0199) and stanza ids (XEP-0359).
//!
//! Each helper builds the request by the XEP's own example, waits for the documented answer
//! and returns raw elements as well as parsed fields, so tests can assert on either.

use std::time::Duration;

use tokio::time::Instant;

use crate::client::{stanza_error, Client, Error, Result};
use crate::element::Element;
use crate::ns;

/// XEP-0045 §7.2.15 history request; `None` fields are not sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// `maxstanzas`.
    pub max_stanzas: Option<u32>,
    /// `maxchars`.
    pub max_chars: Option<u32>,
    /// `seconds`.
    pub seconds: Option<u32>,
    /// `since` (XEP-0082 date-time).
    pub since: Option<String>,
}

/// What arrived while joining a room, in the order XEP-0045 §7.2 prescribes.
#[derive(Clone, Debug)]
pub struct Joined {
    /// Every presence from the room, the self-presence last.
    pub presences: Vec<Element>,
    /// Our own presence (status code 110).
    pub self_presence: Element,
    /// Groupchat messages with a body that came before the subject: the discussion history.
    pub history: Vec<Element>,
    /// The subject message (`<subject/>` and no body; possibly empty).
    pub subject: Element,
    /// Other messages from the room during the join (e.g. status-code notices).
    pub other: Vec<Element>,
}

impl Joined {
    /// The status codes in the self-presence, e.g. `[110, 201]`.
    pub fn self_status_codes(&self) -> Vec<u16> {
        status_codes(&self.self_presence)
    }

    /// The history bodies, oldest first.
    pub fn history_bodies(&self) -> Vec<String> {
        self.history.iter().filter_map(Element::body).collect()
    }
}

/// XEP-0059 paging for a MAM query; `None` fields are not sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rsm {
    /// `<max/>`: page size.
    pub max: Option<u32>,
    /// `<before/>`: `Some("")` asks for the last page.
    pub before: Option<String>,
    /// `<after/>`.
    pub after: Option<String>,
}

/// One MAM result page.
#[derive(Clone, Debug)]
pub struct MamPage {
    /// The `<result xmlns='urn:xmpp:mam:2'/>` elements in arrival order.
    pub results: Vec<Element>,
    /// The `<fin/>` from the iq result.
    pub fin: Element,
}

impl MamPage {
    /// `fin/@complete` is `true`.
    pub fn complete(&self) -> bool {
        self.fin.attr("complete") == Some("true")
    }

    /// The RSM `<first/>` id of the page.
    pub fn first(&self) -> Option<String> {
        self.fin
            .child("set", ns::RSM)
            .and_then(|s| s.child_text("first", ns::RSM))
    }

    /// The RSM `<last/>` id of the page.
    pub fn last(&self) -> Option<String> {
        self.fin
            .child("set", ns::RSM)
            .and_then(|s| s.child_text("last", ns::RSM))
    }

    /// The archived messages (inside `<forwarded/>`), in page order.
    pub fn messages(&self) -> Vec<&Element> {
        self.results.iter().filter_map(forwarded_message).collect()
    }

    /// Their bodies.
    pub fn bodies(&self) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter_map(Element::body)
            .collect()
    }

    /// The archive ids (`result/@id`), which are the messages' stanza-ids.
    pub fn ids(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|r| r.attr("id").map(str::to_string))
            .collect()
    }
}

/// The message inside a MAM `<result/>` (via `<forwarded/>`).
pub fn forwarded_message(result: &Element) -> Option<&Element> {
    result
        .child("forwarded", ns::FORWARD)?
        .child("message", ns::CLIENT)
}

/// The XEP-0203 delay stamp inside a MAM `<result/>` or on a history message.
pub fn delay_stamp(element: &Element) -> Option<String> {
    let delay = element.child("delay", ns::DELAY).or_else(|| {
        element
            .child("forwarded", ns::FORWARD)
            .and_then(|f| f.child("delay", ns::DELAY))
    })?;
    delay.attr("stamp").map(str::to_string)
}

/// The XEP-0359 `<stanza-id/>` assigned by `by` (e.g. the room JID).
pub fn stanza_id(message: &Element, by: &str) -> Option<String> {
    message
        .children_named("stanza-id", ns::SID)
        .find(|s| s.attr("by").is_some_and(|b| b.eq_ignore_ascii_case(by)))
        .and_then(|s| s.attr("id").map(str::to_string))
}

/// The XEP-0359 `<origin-id/>` of a message.
pub fn origin_id(message: &Element) -> Option<String> {
    message
        .child("origin-id", ns::SID)
        .and_then(|o| o.attr("id").map(str::to_string))
}

/// The MUC status codes (`x[muc#user]/status/@code`) of a presence or message.
pub fn status_codes(stanza: &Element) -> Vec<u16> {
    stanza
        .children_named("x", ns::MUC_USER)
        .flat_map(|x| x.children_named("status", ns::MUC_USER))
        .filter_map(|s| s.attr("code")?.parse().ok())
        .collect()
}

/// The bare part of a JID.
pub fn bare(jid: &str) -> &str {
    jid.split('/').next().unwrap_or_default()
}

/// XEP-0030 identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `category`, e.g. `conference`.
    pub category: String,
    /// `type`, e.g. `text`.
    pub kind: String,
    /// Optional `name`.
    pub name: Option<String>,
}

/// XEP-0030 disco#info answer.
#[derive(Clone, Debug)]
pub struct DiscoInfo {
    /// The identities.
    pub identities: Vec<Identity>,
    /// The `var`s of the features.
    pub features: Vec<String>,
    /// XEP-0128 extension forms.
    pub extensions: Vec<Element>,
}

impl DiscoInfo {
    /// True when `feature` is advertised.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// XEP-0030 disco#items entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoItem {
    /// The item's JID.
    pub jid: String,
    /// Optional node.
    pub node: Option<String>,
    /// Optional name.
    pub name: Option<String>,
}

impl Client {
    /// Sends initial presence (RFC 6121 §4.2), so the server treats the session as available.
    pub async fn send_initial_presence(&mut self) -> Result<()> {
        self.send(&Element::new("presence", ns::CLIENT)).await
    }

    /// Joins `room` as `nick` and collects what arrives until both our self-presence
    /// (status 110) and the subject message have come. A presence error is returned as
    /// [`Error::Stanza`].
    pub async fn join_room(
        &mut self,
        room: &str,
        nick: &str,
        history: Option<History>,
    ) -> Result<Joined> {
        let mut x = Element::new("x", ns::MUC);
        if let Some(h) = history {
            let mut el = Element::new("history", ns::MUC);
            for (name, value) in [
                ("maxstanzas", h.max_stanzas.map(|v| v.to_string())),
                ("maxchars", h.max_chars.map(|v| v.to_string())),
                ("seconds", h.seconds.map(|v| v.to_string())),
                ("since", h.since),
            ] {
                if let Some(value) = value {
                    el.set_attr(name, value);
                }
            }
            x.push_child(el);
        }
        let occupant_jid = format!("{room}/{nick}");
        self.send(
            &Element::new("presence", ns::CLIENT)
                .with_attr("to", occupant_jid.clone())
                .with_child(x),
        )
        .await?;

        let timeout = self.reply_timeout();
        let deadline = Instant::now() + timeout;
        let mut presences = Vec::new();
        let mut history = Vec::new();
        let mut other = Vec::new();
        let mut self_presence = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let stanza = self
                .recv_until(remaining, |s| {
                    s.attr("from")
                        .is_some_and(|f| bare(f).eq_ignore_ascii_case(room))
                        && (s.is("presence", ns::CLIENT) || s.is("message", ns::CLIENT))
                })
                .await
                .map_err(|e| with_context(e, &format!("joining {occupant_jid}")))?;
            if stanza.attr("type") == Some("error") {
                return Err(stanza_error(stanza));
            }
            if stanza.is("presence", ns::CLIENT) {
                if status_codes(&stanza).contains(&110) {
                    self_presence = Some(stanza.clone());
                }
                presences.push(stanza);
                continue;
            }
            let is_subject = stanza.attr("type") == Some("groupchat")
                && stanza.has_child("subject", ns::CLIENT)
                && !stanza.has_child("body", ns::CLIENT);
            if is_subject {
                let Some(self_presence) = self_presence else {
                    return Err(Error::Protocol(format!(
                        "subject arrived before the self-presence while joining {occupant_jid}"
                    )));
                };
                return Ok(Joined {
                    presences,
                    self_presence,
                    history,
                    subject: stanza,
                    other,
                });
            }
            if stanza.attr("type") == Some("groupchat") && stanza.has_child("body", ns::CLIENT) {
                history.push(stanza);
            } else {
                other.push(stanza);
            }
        }
    }

    /// Leaves a room and waits for our unavailable self-presence.
    pub async fn leave_room(&mut self, room: &str, nick: &str) -> Result<Element> {
        self.send(
            &Element::new("presence", ns::CLIENT)
                .with_attr("to", format!("{room}/{nick}"))
                .with_attr("type", "unavailable"),
        )
        .await?;
        let timeout = self.reply_timeout();
        self.recv_until(timeout, |s| {
            s.is("presence", ns::CLIENT)
                && s.attr("type") == Some("unavailable")
                && s.attr("from")
                    .is_some_and(|f| bare(f).eq_ignore_ascii_case(room))
                && status_codes(s).contains(&110)
        })
        .await
    }

    /// Sends a groupchat message with an XEP-0359 origin-id (generated when `None`, and used
    /// as the message id too) and returns the room's reflection of it, which is the
    /// acknowledgement that the room accepted it. An error reply is [`Error::Stanza`].
    pub async fn send_groupchat(
        &mut self,
        room: &str,
        body: &str,
        origin_id: Option<&str>,
    ) -> Result<Element> {
        let id = match origin_id {
            Some(id) => id.to_string(),
            None => self.fresh_id(),
        };
        let message = Element::new("message", ns::CLIENT)
            .with_attr("to", room)
            .with_attr("type", "groupchat")
            .with_attr("id", id.clone())
            .with_child(Element::new("body", ns::CLIENT).with_text(body))
            .with_child(Element::new("origin-id", ns::SID).with_attr("id", id.clone()));
        self.send(&message).await?;
        let timeout = self.reply_timeout();
        let reply = self
            .recv_until(timeout, |s| {
                s.is("message", ns::CLIENT)
                    && s.attr("from")
                        .is_some_and(|f| bare(f).eq_ignore_ascii_case(room))
                    && (crate::xep::origin_id(s).as_deref() == Some(id.as_str())
                        || s.attr("id") == Some(id.as_str()))
                    && matches!(s.attr("type"), Some("groupchat") | Some("error"))
            })
            .await
            .map_err(|e| with_context(e, &format!("reflection of message {id} in {room}")))?;
        if reply.attr("type") == Some("error") {
            return Err(stanza_error(reply));
        }
        Ok(reply)
    }

    /// Every archive id of `archive`, oldest first, read page by page (500 at a time) until
    /// the server says the result is complete. Ids that are not numbers become -1, so a test
    /// comparing against a gapless sequence notices them.
    pub async fn mam_all_ids(&mut self, archive: &str) -> Result<Vec<i64>> {
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let rsm = Rsm {
                max: Some(500),
                before: None,
                after: after.clone(),
            };
            let page = self.mam_query(archive, &[], Some(rsm)).await?;
            ids.extend(page.ids().iter().map(|i| i.parse::<i64>().unwrap_or(-1)));
            if page.complete() || page.ids().is_empty() {
                return Ok(ids);
            }
            after = page.last();
        }
    }

    /// Queries the MAM archive at `archive` (a room JID, or our bare JID for our own
    /// archive) with extra form fields (`var`, value) and RSM paging, and collects the results
    /// until the iq result with `<fin/>` arrives. Results must come from the archive's JID.
    pub async fn mam_query(
        &mut self,
        archive: &str,
        fields: &[(&str, &str)],
        rsm: Option<Rsm>,
    ) -> Result<MamPage> {
        let query_id = self.fresh_id();
        let mut form = Element::new("x", ns::DATA_FORMS)
            .with_attr("type", "submit")
            .with_child(
                Element::new("field", ns::DATA_FORMS)
                    .with_attr("var", "FORM_TYPE")
                    .with_attr("type", "hidden")
                    .with_child(Element::new("value", ns::DATA_FORMS).with_text(ns::MAM)),
            );
        for (var, value) in fields {
            form.push_child(
                Element::new("field", ns::DATA_FORMS)
                    .with_attr("var", *var)
                    .with_child(Element::new("value", ns::DATA_FORMS).with_text(*value)),
            );
        }
        let mut query = Element::new("query", ns::MAM)
            .with_attr("queryid", query_id.clone())
            .with_child(form);
        if let Some(rsm) = rsm {
            let mut set = Element::new("set", ns::RSM);
            if let Some(max) = rsm.max {
                set.push_child(Element::new("max", ns::RSM).with_text(max.to_string()));
            }
            if let Some(before) = rsm.before {
                set.push_child(Element::new("before", ns::RSM).with_text(before));
            }
            if let Some(after) = rsm.after {
                set.push_child(Element::new("after", ns::RSM).with_text(after));
            }
            query.push_child(set);
        }
        let iq_id = self.fresh_id();
        let mut request = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", iq_id.clone())
            .with_child(query);
        let own_archive = archive.eq_ignore_ascii_case(self.bare_jid());
        if !own_archive {
            request.set_attr("to", archive);
        }
        self.send(&request).await?;

        let timeout = self.reply_timeout();
        let deadline = Instant::now() + timeout;
        let mut results = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let stanza = self
                .recv_until(remaining, |s| {
                    (s.is("iq", ns::CLIENT) && s.attr("id") == Some(iq_id.as_str()))
                        || (s.is("message", ns::CLIENT)
                            && s.child("result", ns::MAM)
                                .is_some_and(|r| r.attr("queryid") == Some(query_id.as_str())))
                })
                .await
                .map_err(|e| with_context(e, &format!("MAM query {query_id} at {archive}")))?;
            let from = stanza.attr("from");
            let from_archive = match from {
                Some(f) => f.eq_ignore_ascii_case(archive),
                None => own_archive,
            };
            if !from_archive {
                return Err(Error::Protocol(format!(
                    "MAM answer from {from:?}, expected the archive {archive}: {stanza}"
                )));
            }
            if stanza.is("message", ns::CLIENT) {
                if let Some(result) = stanza.child("result", ns::MAM) {
                    results.push(result.clone());
                }
                continue;
            }
            match stanza.attr("type") {
                Some("result") => {
                    let fin = stanza.child("fin", ns::MAM).cloned().ok_or_else(|| {
                        Error::Protocol(format!("MAM iq result without <fin/>: {stanza}"))
                    })?;
                    return Ok(MamPage { results, fin });
                }
                Some("error") => return Err(stanza_error(stanza)),
                other => {
                    return Err(Error::Protocol(format!(
                        "MAM answer iq of type {other:?}: {stanza}"
                    )))
                }
            }
        }
    }

    /// XEP-0030 disco#info on `jid`.
    pub async fn disco_info(&mut self, jid: &str) -> Result<DiscoInfo> {
        let request = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", jid)
            .with_child(Element::new("query", ns::DISCO_INFO));
        let timeout = self.reply_timeout();
        let reply = self.iq_result(request, timeout).await?;
        let query = reply
            .child("query", ns::DISCO_INFO)
            .ok_or_else(|| Error::Protocol(format!("disco#info result without query: {reply}")))?;
        Ok(DiscoInfo {
            identities: query
                .children_named("identity", ns::DISCO_INFO)
                .map(|i| Identity {
                    category: i.attr("category").unwrap_or_default().to_string(),
                    kind: i.attr("type").unwrap_or_default().to_string(),
                    name: i.attr("name").map(str::to_string),
                })
                .collect(),
            features: query
                .children_named("feature", ns::DISCO_INFO)
                .filter_map(|f| f.attr("var").map(str::to_string))
                .collect(),
            extensions: query.children_named("x", ns::DATA_FORMS).cloned().collect(),
        })
    }

    /// XEP-0030 disco#items on `jid`.
    pub async fn disco_items(&mut self, jid: &str) -> Result<Vec<DiscoItem>> {
        let request = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", jid)
            .with_child(Element::new("query", ns::DISCO_ITEMS));
        let timeout = self.reply_timeout();
        let reply = self.iq_result(request, timeout).await?;
        let query = reply
            .child("query", ns::DISCO_ITEMS)
            .ok_or_else(|| Error::Protocol(format!("disco#items result without query: {reply}")))?;
        Ok(query
            .children_named("item", ns::DISCO_ITEMS)
            .map(|i| DiscoItem {
                jid: i.attr("jid").unwrap_or_default().to_string(),
                node: i.attr("node").map(str::to_string),
                name: i.attr("name").map(str::to_string),
            })
            .collect())
    }

    /// XEP-0199 ping; returns the round-trip time.
    pub async fn ping(&mut self, to: &str) -> Result<Duration> {
        let request = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", to)
            .with_child(Element::new("ping", ns::PING));
        let started = Instant::now();
        let timeout = self.reply_timeout();
        self.iq_result(request, timeout).await?;
        Ok(started.elapsed())
    }
}

/// Prefixes a timeout's description with what the helper was doing.
fn with_context(error: Error, context: &str) -> Error {
    match error {
        Error::Timeout { waiting_for, after } => Error::Timeout {
            waiting_for: format!("{context}: {waiting_for}"),
            after,
        },
        other => other,
    }
}
