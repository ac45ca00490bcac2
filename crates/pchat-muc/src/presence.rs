//! Presence in a room (XEP-0045 §7.1–§7.6, §7.14): join, presence updates, nick changes and
//! leaves, and the presence broadcast every role or affiliation change reuses.
//!
//! Multi-session (one bare JID, one nick, several resources, as Prosody allows): every
//! session gets self-presence; the occupant's presence as others see it is that of the session
//! that last updated it. A second session joining or one of several leaving changes nothing
//! for the others, so their rosters do not flap.

use pchat_room::rules::{enforce_nick, history_limits, sees_presence, sees_real_jid, HistoryAsk};
use pchat_room::ComplianceKind;
use pchat_room::{Affiliation, JoinKind, JoinRequest, Occupant, Role, Timestamp, Whois};
use pchat_xmpp::{ns, Element, Node, StanzaError};

use crate::{datetime, split_jid, status, status_element, Effect, HistoryRequest, MucRoom};

/// The `<item/>` of a `muc#user` presence.
#[derive(Clone, Debug)]
pub(crate) struct Item<'a> {
    pub affiliation: Affiliation,
    pub role: Role,
    /// Real full JID, when the observer may see it.
    pub jid: Option<&'a str>,
    /// New nick (status 303).
    pub nick: Option<&'a str>,
    /// Nick of the moderator or admin who caused the change.
    pub actor: Option<&'a str>,
    pub reason: Option<&'a str>,
}

impl<'a> Item<'a> {
    pub fn new(affiliation: Affiliation, role: Role) -> Self {
        Item {
            affiliation,
            role,
            jid: None,
            nick: None,
            actor: None,
            reason: None,
        }
    }

    fn element(&self) -> Element {
        let mut e = Element::new("item", ns::MUC_USER)
            .attr("affiliation", self.affiliation.as_str())
            .attr("role", self.role.as_str())
            .attr_opt("jid", self.jid)
            .attr_opt("nick", self.nick);
        if let Some(a) = self.actor {
            e = e.child(Element::new("actor", ns::MUC_USER).attr("nick", a));
        }
        if let Some(r) = self.reason {
            e = e.child(Element::new("reason", ns::MUC_USER).text(r));
        }
        e
    }
}

/// One presence change to show to the room: who, how, and which sessions get self-presence.
pub(crate) struct Broadcast<'a> {
    /// The occupant as it should be shown (role `None` when it left or was removed).
    pub subject: &'a Occupant,
    /// The nick the presence comes from (the old nick for the first half of a nick change).
    pub from_nick: &'a str,
    pub unavailable: bool,
    pub payload: &'a [Node],
    pub new_nick: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// Status codes for everyone; self-presence adds 110.
    pub statuses: &'a [u16],
    /// Sessions that receive self-presence.
    pub self_sessions: &'a [String],
}

/// The presence children worth replaying: everything but MUC elements (the join request, and
/// any `muc#user` a client might forge).
fn payload_of(p: &Element) -> Vec<Node> {
    p.children
        .iter()
        .filter(|n| match n {
            // An occupant-id is the room's to give (XEP-0421 §4): a client's is a spoof.
            Node::Element(e) => {
                !(e.is("x", ns::MUC)
                    || e.is("x", ns::MUC_USER)
                    || e.is("occupant-id", ns::OCCUPANT_ID))
            }
            Node::Text(_) => false,
        })
        .cloned()
        .collect()
}

fn history_ask(x: Option<&Element>) -> HistoryAsk {
    let Some(h) = x.and_then(|x| x.get_child("history", ns::MUC)) else {
        return HistoryAsk::default();
    };
    // Unparsable attributes are ignored rather than refused: history is a courtesy and the
    // join itself is valid.
    let num = |a: &str| h.get_attr(a).and_then(|v| v.trim().parse::<u32>().ok());
    HistoryAsk {
        max_stanzas: num("maxstanzas"),
        max_chars: num("maxchars"),
        seconds: num("seconds"),
        since: h.get_attr("since").and_then(datetime::parse),
    }
}

impl MucRoom {
    /// A presence from an occupant JID of this room to `to`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn presence_stanza(
        &self,
        from_nick: &str,
        from_bare: &str,
        to: &str,
        unavailable: bool,
        payload: &[Node],
        item: &Item<'_>,
        statuses: &[u16],
        destroy: Option<Element>,
    ) -> Element {
        let mut p = Element::new("presence", ns::CLIENT)
            .attr("from", self.occupant_jid(from_nick))
            .attr("to", to);
        if unavailable {
            p.set_attr("type", "unavailable");
        }
        p.children.extend(payload.iter().cloned());
        // XEP-0421: who this is, across nick changes, without saying their JID.
        if let Some(id) = self.occupant_id_element(from_bare) {
            p = p.child(id);
        }
        let mut x = Element::new("x", ns::MUC_USER).child(item.element());
        if let Some(d) = destroy {
            x = x.child(d);
        }
        let mut codes = statuses.to_vec();
        codes.sort_unstable();
        codes.dedup();
        for c in codes {
            x = x.child(status_element(c));
        }
        p.child(x)
    }

    /// Sends a presence change to every occupant allowed to see it, then self-presence.
    pub(crate) fn broadcast(&self, b: &Broadcast<'_>, out: &mut Vec<Effect>) {
        let config = self.room.config();
        let suppressed = self.presence_suppressed();
        let subject = b.subject;
        let item_for = |observer: Role| Item {
            affiliation: subject.affiliation,
            role: subject.role,
            jid: sees_real_jid(config.whois, observer).then(|| subject.current_session()),
            nick: b.new_nick,
            actor: b.actor,
            reason: b.reason,
        };
        for o in self.room.occupants() {
            if o.nick == subject.nick
                || o.nick == b.from_nick
                || !sees_presence(suppressed, false, o.role)
            {
                continue;
            }
            let item = item_for(o.role);
            for s in &o.sessions {
                out.push(Effect::Send(self.presence_stanza(
                    b.from_nick,
                    &subject.bare_jid,
                    s,
                    b.unavailable,
                    b.payload,
                    &item,
                    b.statuses,
                    None,
                )));
            }
        }
        if b.self_sessions.is_empty() {
            return;
        }
        let mut codes = b.statuses.to_vec();
        codes.push(status::SELF);
        let item = item_for(subject.role);
        for s in b.self_sessions {
            out.push(Effect::Send(self.presence_stanza(
                b.from_nick,
                &subject.bare_jid,
                s,
                b.unavailable,
                b.payload,
                &item,
                &codes,
                None,
            )));
        }
    }

    fn payload(&self, session: &str) -> &[Node] {
        self.presences.get(session).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn handle_presence(
        &mut self,
        p: &Element,
        from: &str,
        now: Timestamp,
    ) -> Vec<Effect> {
        let to = p.get_attr("to").unwrap_or_default().to_owned();
        let (_, nick) = split_jid(&to);
        let current = self.room.occupant_by_session(from).map(|o| o.nick.clone());
        match p.get_attr("type") {
            None => match (current, nick) {
                // RFC 8266: the nick as the room uses it; one the client cannot have is
                // refused, one the room changed is said with status 210 (XEP-0045 §7.2.9).
                (current, Some(asked)) => {
                    let nick = match enforce_nick(asked, self.room.nick_chars_max()) {
                        Ok(n) => n,
                        Err(r) => return vec![Self::refuse(p, r)],
                    };
                    match current {
                        None => self.join(p, from, &nick, nick != asked, now),
                        Some(cur) if cur == nick => {
                            // A join element from a session already in means the client
                            // believes it is out (a lost stream it did not notice): replay
                            // the join for it.
                            let rejoin = p.has_child("x", ns::MUC);
                            self.presence_update(p, from, &cur, rejoin, now)
                        }
                        Some(_) => self.nick_change(p, from, &nick),
                    }
                }
                // XEP-0045 §7.2.1: a join without a nick is malformed.
                (None, None) => vec![Self::error(
                    p,
                    StanzaError::JidMalformed,
                    StanzaError::JidMalformed.default_type(),
                    "join with a nickname: room@service/nick",
                )],
                (Some(cur), None) => self.presence_update(p, from, &cur, false, now),
            },
            Some("unavailable") => {
                let mut out = Vec::new();
                self.leave(from, &payload_of(p), None, true, now, &mut out);
                out
            }
            // A presence error from an occupant means its client is gone or broken (ejabberd
            // removes it too); the others see status 333.
            Some("error") => {
                let mut out = Vec::new();
                self.leave(
                    from,
                    &[],
                    Some(status::TECHNICAL_REMOVAL),
                    false,
                    now,
                    &mut out,
                );
                out
            }
            // Subscriptions and probes have no meaning for a room.
            Some(_) => Vec::new(),
        }
    }

    fn join(
        &mut self,
        p: &Element,
        from: &str,
        nick: &str,
        nick_modified: bool,
        now: Timestamp,
    ) -> Vec<Effect> {
        let x = p.get_child("x", ns::MUC);
        let password = x.and_then(|x| x.child_text("password", ns::MUC));
        let req = JoinRequest {
            full_jid: from,
            nick,
            password: password.as_deref(),
        };
        let joined = match self.room.join(&req) {
            Ok(j) => j,
            Err(r) => return vec![Self::refuse(p, r)],
        };
        self.presences.insert(from.to_owned(), payload_of(p));
        self.room.touch_session(from);
        let Some(occupant) = self.room.occupant(nick).cloned() else {
            return Vec::new();
        };
        let mut out = vec![self.compliance(
            ComplianceKind::Join,
            now,
            from,
            Some(nick),
            format!(
                "{from} joined as {} ({})",
                joined.role.as_str(),
                joined.affiliation.as_str()
            ),
        )];
        self.send_roster(from, &occupant, &mut out);
        if joined.kind == JoinKind::NewOccupant {
            let payload = self.payload(from).to_vec();
            self.broadcast(
                &Broadcast {
                    subject: &occupant,
                    from_nick: nick,
                    unavailable: false,
                    payload: &payload,
                    new_nick: None,
                    actor: None,
                    reason: None,
                    statuses: &[],
                    self_sessions: &[],
                },
                &mut out,
            );
        }
        let mut extra = Vec::new();
        if joined.created {
            extra.push(status::CREATED);
        }
        if nick_modified {
            extra.push(status::NICK_MODIFIED);
        }
        self.send_self_joined(from, &occupant, &extra, history_ask(x), now, &mut out);
        out
    }

    /// Every other occupant's presence to a joining session (XEP-0045 §7.2.3), unless the
    /// room is above its broadcast limit and the joiner is no moderator.
    fn send_roster(&self, session: &str, joiner: &Occupant, out: &mut Vec<Effect>) {
        let config = self.room.config();
        let suppressed = self.presence_suppressed();
        if !sees_presence(suppressed, false, joiner.role) {
            return;
        }
        let sees_jid = sees_real_jid(config.whois, joiner.role);
        for o in self.room.occupants().filter(|o| o.nick != joiner.nick) {
            let item = Item {
                jid: sees_jid.then(|| o.current_session()),
                ..Item::new(o.affiliation, o.role)
            };
            out.push(Effect::Send(self.presence_stanza(
                &o.nick,
                &o.bare_jid,
                session,
                false,
                self.payload(o.current_session()),
                &item,
                &[],
                None,
            )));
        }
    }

    /// Self-presence of a join with its status codes, then the history and subject.
    fn send_self_joined(
        &self,
        session: &str,
        o: &Occupant,
        extra_codes: &[u16],
        ask: HistoryAsk,
        now: Timestamp,
        out: &mut Vec<Effect>,
    ) {
        let config = self.room.config();
        let mut codes = vec![status::SELF, status::LOGGED];
        if config.whois == Whois::Anyone {
            codes.push(status::NON_ANONYMOUS);
        }
        codes.extend_from_slice(extra_codes);
        let item = Item {
            jid: sees_real_jid(config.whois, o.role).then_some(session),
            ..Item::new(o.affiliation, o.role)
        };
        out.push(Effect::Send(self.presence_stanza(
            &o.nick,
            &o.bare_jid,
            session,
            false,
            self.payload(session),
            &item,
            &codes,
            None,
        )));
        let limits = history_limits(ask, config, now);
        out.push(Effect::History(HistoryRequest {
            to: session.to_owned(),
            max_stanzas: limits.max_stanzas,
            max_chars: limits.max_chars,
            since: limits.since,
            subject: self.subject_message(session),
        }));
    }

    /// The subject message a joiner receives after the history (XEP-0045 §7.2.15): from the
    /// occupant JID of whoever set it, or an empty subject from the room when none was set.
    pub(crate) fn subject_message(&self, to: &str) -> Element {
        let m = Element::new("message", ns::CLIENT).attr("type", "groupchat");
        match self.room.subject() {
            Some(s) => m
                .attr("from", self.occupant_jid(&s.nick))
                .attr("to", to)
                .child(Element::new("subject", ns::CLIENT).text(s.text.clone())),
            None => m
                .attr("from", self.room.jid().to_owned())
                .attr("to", to)
                .child(Element::new("subject", ns::CLIENT)),
        }
    }

    fn presence_update(
        &mut self,
        p: &Element,
        from: &str,
        nick: &str,
        rejoin: bool,
        now: Timestamp,
    ) -> Vec<Effect> {
        self.presences.insert(from.to_owned(), payload_of(p));
        self.room.touch_session(from);
        let Some(o) = self.room.occupant(nick).cloned() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let payload = self.payload(from).to_vec();
        let self_sessions: Vec<String> = if rejoin {
            o.sessions.iter().filter(|s| *s != from).cloned().collect()
        } else {
            o.sessions.clone()
        };
        self.broadcast(
            &Broadcast {
                subject: &o,
                from_nick: nick,
                unavailable: false,
                payload: &payload,
                new_nick: None,
                actor: None,
                reason: None,
                statuses: &[],
                self_sessions: &self_sessions,
            },
            &mut out,
        );
        if rejoin {
            self.send_roster(from, &o, &mut out);
            let ask = history_ask(p.get_child("x", ns::MUC));
            self.send_self_joined(from, &o, &[], ask, now, &mut out);
        }
        out
    }

    /// XEP-0045 §7.6: unavailable from the old nick with 303 and the new nick, then available
    /// from the new nick, to everyone.
    fn nick_change(&mut self, p: &Element, from: &str, new_nick: &str) -> Vec<Effect> {
        let old = match self.room.change_nick(from, new_nick) {
            Ok(old) => old,
            Err(r) => return vec![Self::refuse(p, r)],
        };
        self.presences.insert(from.to_owned(), payload_of(p));
        let Some(o) = self.room.occupant(new_nick).cloned() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        self.broadcast(
            &Broadcast {
                subject: &o,
                from_nick: &old,
                unavailable: true,
                payload: &[],
                new_nick: Some(new_nick),
                actor: None,
                reason: None,
                statuses: &[status::NICK_CHANGED],
                self_sessions: &o.sessions,
            },
            &mut out,
        );
        let payload = self.payload(from).to_vec();
        self.broadcast(
            &Broadcast {
                subject: &o,
                from_nick: new_nick,
                unavailable: false,
                payload: &payload,
                new_nick: None,
                actor: None,
                reason: None,
                statuses: &[],
                self_sessions: &o.sessions,
            },
            &mut out,
        );
        out
    }

    /// A session leaves: compliance, unavailable presence to the others when the occupant is
    /// gone, self-presence to the session when it can still hear it, Delete when due.
    pub(crate) fn leave(
        &mut self,
        full: &str,
        payload: &[Node],
        status_to_all: Option<u16>,
        notify_self: bool,
        now: Timestamp,
        out: &mut Vec<Effect>,
    ) {
        let Some(left) = self.room.leave(full) else {
            return;
        };
        self.presences.remove(full);
        let status_text = payload
            .iter()
            .find_map(|n| match n {
                Node::Element(e) if e.name == "status" => Some(e.text_content()),
                _ => None,
            })
            .unwrap_or_default();
        out.push(self.compliance(
            ComplianceKind::Leave,
            now,
            full,
            Some(&left.occupant.nick),
            format!(
                "{full} left{}{status_text}",
                if status_text.is_empty() { "" } else { ": " }
            ),
        ));
        let mut shown = left.occupant.clone();
        shown.role = Role::None;
        shown.sessions = vec![full.to_owned()];
        let self_sessions = if notify_self {
            vec![full.to_owned()]
        } else {
            Vec::new()
        };
        let statuses: Vec<u16> = status_to_all.into_iter().collect();
        let b = Broadcast {
            subject: &shown,
            from_nick: &shown.nick,
            unavailable: true,
            payload,
            new_nick: None,
            actor: None,
            reason: None,
            statuses: &statuses,
            self_sessions: &self_sessions,
        };
        if left.gone {
            self.broadcast(&b, out);
        } else if notify_self {
            // Other sessions remain: only the leaving one hears that it is out.
            let item = Item::new(shown.affiliation, Role::None);
            out.push(Effect::Send(self.presence_stanza(
                &shown.nick,
                &shown.bare_jid,
                full,
                true,
                payload,
                &item,
                &[status::SELF],
                None,
            )));
        }
        self.delete_if_due(out);
    }

    /// Presence for occupants removed by someone else (kick, ban, affiliation change,
    /// members-only switch): every session of each hears it with 110, the others without.
    pub(crate) fn announce_removal(
        &mut self,
        removed: &Occupant,
        code: u16,
        actor: Option<&str>,
        reason: Option<&str>,
        out: &mut Vec<Effect>,
    ) {
        self.broadcast(
            &Broadcast {
                subject: removed,
                from_nick: &removed.nick,
                unavailable: true,
                payload: &[],
                new_nick: None,
                actor,
                reason,
                statuses: &[code],
                self_sessions: &removed.sessions,
            },
            out,
        );
        self.forget_sessions(&removed.sessions);
    }

    /// Presence of an occupant whose role or affiliation changed while it stays.
    pub(crate) fn announce_change(
        &self,
        o: &Occupant,
        actor: Option<&str>,
        reason: Option<&str>,
        out: &mut Vec<Effect>,
    ) {
        let payload = self.payload(o.current_session()).to_vec();
        self.broadcast(
            &Broadcast {
                subject: o,
                from_nick: &o.nick,
                unavailable: false,
                payload: &payload,
                new_nick: None,
                actor,
                reason,
                statuses: &[],
                self_sessions: &o.sessions,
            },
            out,
        );
    }
}
