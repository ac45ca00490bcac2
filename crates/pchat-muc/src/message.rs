//! Messages to a room (XEP-0045 §7.4–§7.8, §7.13, §8.1): groupchat messages become Publish
//! effects, subject changes are saved and broadcast, private messages go to every session of
//! the recipient, invitations and declines are relayed, voice requests reach the moderators.

use pchat_room::ComplianceKind;
use pchat_room::{bare_jid, Affiliation, Role, RoomEvent, Timestamp};
use pchat_xmpp::{ns, Element, Jid, StanzaError};

use crate::{split_jid, Effect, MucRoom, Publish};

/// `muc#request`, the voice request form (XEP-0045 §7.13).
const MUC_REQUEST_FORM: &str = ns::MUC_REQUEST;

fn form_value(x: &Element, var: &str) -> Option<String> {
    x.elements()
        .find(|f| f.is("field", ns::DATA_FORMS) && f.get_attr("var") == Some(var))
        .and_then(|f| f.child_text("value", ns::DATA_FORMS))
}

fn is_request_form(x: &Element) -> bool {
    form_value(x, "FORM_TYPE").as_deref() == Some(MUC_REQUEST_FORM)
}

fn valid_jid(s: &str) -> bool {
    !s.is_empty() && s.parse::<Jid>().is_ok()
}

impl MucRoom {
    pub(crate) fn handle_message(
        &mut self,
        m: &Element,
        from: &str,
        now: Timestamp,
    ) -> Vec<Effect> {
        let ty = m.get_attr("type").unwrap_or("normal").to_owned();
        // Bounces are never answered: answering an error with an error can loop.
        if ty == "error" {
            return Vec::new();
        }
        if !self.sender_may_discover(from) {
            return vec![Self::refuse(m, pchat_room::Refusal::RoomHidden)];
        }
        let to = m.get_attr("to").unwrap_or_default().to_owned();
        if let (_, Some(nick)) = split_jid(&to) {
            if ty == "groupchat" {
                return vec![Self::error(
                    m,
                    StanzaError::BadRequest,
                    StanzaError::BadRequest.default_type(),
                    "groupchat messages go to the room JID; private messages are of type chat",
                )];
            }
            return self.private_message(m, from, nick, now);
        }
        if let Some(x) = m.get_child("x", ns::MUC_USER) {
            if x.has_child("invite", ns::MUC_USER) || x.has_child("decline", ns::MUC_USER) {
                return self.invitations(m, &x.clone(), from, now);
            }
        }
        if ty == "groupchat" {
            return self.groupchat(m, from, now);
        }
        if let Some(form) = m
            .get_child("x", ns::DATA_FORMS)
            .filter(|x| is_request_form(x))
        {
            return self.voice_request(m, &form.clone(), from, now);
        }
        if m.has_child("body", &m.ns) {
            return vec![Self::error(
                m,
                StanzaError::BadRequest,
                StanzaError::BadRequest.default_type(),
                "messages to the room must be of type groupchat",
            )];
        }
        Vec::new()
    }

    fn groupchat(&mut self, m: &Element, from: &str, now: Timestamp) -> Vec<Effect> {
        let body = m.child_text("body", &m.ns);
        // A subject without a body changes the subject (§8.1); with a body it is a message.
        if body.is_none() {
            if let Some(subject) = m.get_child("subject", &m.ns) {
                let text = subject.text_content();
                return self.change_subject(m, &text, from, now);
            }
        }
        let o = match self.room.check_groupchat(from) {
            Ok(o) => o.clone(),
            Err(r) => return vec![Self::refuse(m, r)],
        };
        // A creator who talks before configuring accepts the defaults: an instant room
        // (XEP-0045 §10.1.2), for clients that never send the form (plain slixmpp,
        // libstrophe). One that asks for the form first (a reserved room) still configures
        // it before anyone else may enter.
        let mut out = Vec::new();
        if self.room.is_locked() {
            let config = self.room.config().clone();
            if let Ok(changed) = self.room.set_config(&o.bare_jid, config) {
                if changed.unlocked {
                    out.push(self.save());
                    out.push(self.compliance(
                        ComplianceKind::RoomCreated,
                        now,
                        from,
                        Some(&o.nick),
                        "instant room (its creator spoke before configuring it)".into(),
                    ));
                }
            }
        }
        let mut message = m.clone();
        message.set_attr("from", self.occupant_jid(&o.nick));
        message.remove_attr("to");
        message.set_attr("type", "groupchat");
        // Only the room assigns stanza-ids (XEP-0359 §6) and occupant ids (XEP-0421 §4): a
        // client-sent one is a spoof.
        message.remove_children("stanza-id", ns::SID);
        message.remove_children("occupant-id", ns::OCCUPANT_ID);
        if let Some(id) = self.occupant_id_element(&o.bare_jid) {
            message = message.child(id);
        }
        let origin_id = m
            .get_child("origin-id", ns::SID)
            .and_then(|e| e.get_attr("id"))
            .map(str::to_owned);
        let recipients: Vec<String> = self
            .room
            .occupants()
            .flat_map(|o| o.sessions.iter().cloned())
            .collect();
        if body.is_none() {
            // Chat states, receipts, markers: relayed, never archived (nothing to read
            // later, and history on join must not count them), so no stanza-id either. The
            // announcement carries it to the other servers of a pool (standalone: dropped).
            let stanza = message.to_xml();
            return out
                .into_iter()
                .chain(
                    recipients
                        .into_iter()
                        .map(|to| {
                            let mut copy = message.clone();
                            copy.set_attr("to", to);
                            Effect::Send(copy)
                        })
                        .chain([Effect::Announce(RoomEvent::Relayed {
                            server: String::new(),
                            stanza,
                        })]),
                )
                .collect();
        }
        out.push(Effect::Publish(Publish {
            message,
            sender_bare: o.bare_jid.clone(),
            sender_full: from.to_owned(),
            nick: o.nick,
            origin_id,
            body,
            recipients,
        }));
        out
    }

    fn change_subject(
        &mut self,
        m: &Element,
        text: &str,
        from: &str,
        now: Timestamp,
    ) -> Vec<Effect> {
        let subject = match self.room.set_subject(from, text, now) {
            Ok(s) => s,
            Err(r) => return vec![Self::refuse(m, r)],
        };
        let mut out = vec![
            self.save(),
            self.compliance(
                ComplianceKind::Subject,
                now,
                from,
                Some(&subject.nick),
                text.to_owned(),
            ),
        ];
        let mut message = m.clone();
        message.set_attr("from", self.occupant_jid(&subject.nick));
        message.set_attr("type", "groupchat");
        message.remove_children("stanza-id", ns::SID);
        message.remove_children("occupant-id", ns::OCCUPANT_ID);
        if let Some(id) = self.occupant_id_element(&pchat_room::bare_jid(from)) {
            message = message.child(id);
        }
        for s in self.room.occupants().flat_map(|o| o.sessions.iter()) {
            let mut copy = message.clone();
            copy.set_attr("to", s.clone());
            out.push(Effect::Send(copy));
        }
        out
    }

    fn private_message(
        &mut self,
        m: &Element,
        from: &str,
        to_nick: &str,
        now: Timestamp,
    ) -> Vec<Effect> {
        let (sender, target) = match self.room.check_private_message(from, to_nick) {
            Ok((s, t)) => (s.clone(), t.clone()),
            Err(r) => return vec![Self::refuse(m, r)],
        };
        let mut out = Vec::new();
        // Chat states and receipts carry no body and nothing to record.
        if let Some(body) = m.child_text("body", &m.ns) {
            out.push(self.compliance(
                ComplianceKind::PrivateMessage,
                now,
                from,
                Some(&sender.nick),
                format!("to {to_nick} ({}): {body}", target.bare_jid),
            ));
        }
        let mut message = m.clone();
        message.set_attr("from", self.occupant_jid(&sender.nick));
        message.remove_children("stanza-id", ns::SID);
        message.remove_children("occupant-id", ns::OCCUPANT_ID);
        if let Some(id) = self.occupant_id_element(&sender.bare_jid) {
            message = message.child(id);
        }
        // XEP-0045 §7.5: marks the message as a MUC private message for carbons and archives.
        if !message.has_child("x", ns::MUC_USER) {
            message = message.child(Element::new("x", ns::MUC_USER));
        }
        for s in &target.sessions {
            let mut copy = message.clone();
            copy.set_attr("to", s.clone());
            out.push(Effect::Send(copy));
        }
        out
    }

    /// Mediated invitations and declines (§7.8.2, §7.8.3), all in one message.
    fn invitations(&mut self, m: &Element, x: &Element, from: &str, now: Timestamp) -> Vec<Effect> {
        let jid_malformed = || {
            vec![Self::error(
                m,
                StanzaError::JidMalformed,
                StanzaError::JidMalformed.default_type(),
                "an invitation or decline needs a valid 'to' JID",
            )]
        };
        let addressed: Vec<&Element> = x
            .elements()
            .filter(|e| e.is("invite", ns::MUC_USER) || e.is("decline", ns::MUC_USER))
            .collect();
        if addressed
            .iter()
            .any(|e| !e.get_attr("to").is_some_and(valid_jid))
        {
            return jid_malformed();
        }
        let mut durable = Vec::new();
        let mut sends = Vec::new();
        let nick = self.room.occupant_by_session(from).map(|o| o.nick.clone());
        for e in addressed {
            let to = e.get_attr("to").unwrap_or_default();
            let reason = e
                .child_text("reason", ns::MUC_USER)
                .filter(|r| !r.is_empty());
            if e.name == "invite" {
                let invited = match self.room.invite(from, to) {
                    Ok(i) => i,
                    Err(r) => return vec![Self::refuse(m, r)],
                };
                if invited.became_member {
                    durable.push(self.compliance(
                        ComplianceKind::AffiliationChange,
                        now,
                        from,
                        nick.as_deref(),
                        format!("{}: none -> member (invitation)", bare_jid(to)),
                    ));
                }
                durable.push(self.compliance(
                    ComplianceKind::Invitation,
                    now,
                    from,
                    nick.as_deref(),
                    format!(
                            "invited {to}{}",
                            reason
                                .as_deref()
                                .map(|r| format!(": {r}"))
                                .unwrap_or_default()
                        ),
                ));
                sends.push(Effect::Send(self.invitation(from, to, reason.as_deref())));
            } else {
                // Forward declines only to someone who could have invited: an occupant or an
                // affiliated user. Otherwise the room would relay messages to anyone.
                let to_bare = bare_jid(to);
                if !(self.room.has_occupant_bare(&to_bare)
                    || self.room.affiliation(&to_bare) >= Affiliation::Member)
                {
                    continue;
                }
                let mut decline = Element::new("decline", ns::MUC_USER).attr("from", from);
                if let Some(r) = &reason {
                    decline = decline.child(Element::new("reason", ns::MUC_USER).text(r.clone()));
                }
                sends.push(Effect::Send(
                    Element::new("message", ns::CLIENT)
                        .attr("from", self.room.jid().to_owned())
                        .attr("to", to)
                        .child(Element::new("x", ns::MUC_USER).child(decline)),
                ));
            }
        }
        if durable.iter().any(
            |e| matches!(e, Effect::Compliance(c) if c.kind == ComplianceKind::AffiliationChange),
        ) {
            durable.insert(0, self.save());
        }
        durable.extend(sends);
        durable
    }

    fn invitation(&self, from: &str, to: &str, reason: Option<&str>) -> Element {
        let mut invite = Element::new("invite", ns::MUC_USER).attr("from", from);
        if let Some(r) = reason {
            invite = invite.child(Element::new("reason", ns::MUC_USER).text(r));
        }
        let mut x = Element::new("x", ns::MUC_USER).child(invite);
        if let Some(pw) = &self.room.config().password {
            x = x.child(Element::new("password", ns::MUC_USER).text(pw.clone()));
        }
        // A body lets clients without MUC invitation support show something useful.
        let body = format!(
            "{} invites you to the room {}{}",
            bare_jid(from),
            self.room.jid(),
            reason.map(|r| format!(": {r}")).unwrap_or_default()
        );
        Element::new("message", ns::CLIENT)
            .attr("from", self.room.jid().to_owned())
            .attr("to", to)
            .child(x)
            .child(Element::new("body", ns::CLIENT).text(body))
    }

    /// A visitor asks for voice (the form goes to every moderator), or a moderator answers one
    /// (an approval grants voice like a `muc#admin` role change).
    fn voice_request(
        &mut self,
        m: &Element,
        form: &Element,
        from: &str,
        now: Timestamp,
    ) -> Vec<Effect> {
        let Some(me) = self.room.occupant_by_session(from).cloned() else {
            return vec![Self::refuse(m, pchat_room::Refusal::NotOccupant)];
        };
        if let Some(nick) = form_value(form, "muc#roomnick").filter(|_| me.role == Role::Moderator)
        {
            let allow = matches!(
                form_value(form, "muc#request_allow").as_deref(),
                Some("1" | "true")
            );
            if !allow {
                return Vec::new();
            }
            return match self.apply_roles(from, &[(nick, Role::Participant, None)], now) {
                Ok(effects) => effects,
                Err(r) => vec![Self::refuse(m, r)],
            };
        }
        // Only visitors need voice; a request from anyone else is noise.
        if me.role != Role::Visitor {
            return Vec::new();
        }
        let whois = self.room.config().whois;
        let mut out = Vec::new();
        for moderator in self.room.occupants().filter(|o| o.role == Role::Moderator) {
            let mut x =
                Element::new("x", ns::DATA_FORMS)
                    .attr("type", "form")
                    .child(Element::new("title", ns::DATA_FORMS).text("Voice request"))
                    .child(Element::new("instructions", ns::DATA_FORMS).text(
                        "To approve this request for voice, check the box and submit the form.",
                    ))
                    .child(data_field("FORM_TYPE", "hidden", None, MUC_REQUEST_FORM))
                    .child(data_field(
                        "muc#role",
                        "text-single",
                        Some("Requested role"),
                        "participant",
                    ));
            if pchat_room::rules::sees_real_jid(whois, moderator.role) {
                x = x.child(data_field("muc#jid", "jid-single", Some("User ID"), from));
            }
            x = x
                .child(data_field(
                    "muc#roomnick",
                    "text-single",
                    Some("Room Nickname"),
                    &me.nick,
                ))
                .child(data_field(
                    "muc#request_allow",
                    "boolean",
                    Some("Grant voice to this person?"),
                    "false",
                ));
            for s in &moderator.sessions {
                out.push(Effect::Send(
                    Element::new("message", ns::CLIENT)
                        .attr("from", self.room.jid().to_owned())
                        .attr("to", s.clone())
                        .child(x.clone()),
                ));
            }
        }
        out
    }
}

fn data_field(var: &str, ty: &str, label: Option<&str>, value: &str) -> Element {
    Element::new("field", ns::DATA_FORMS)
        .attr("var", var)
        .attr("type", ty)
        .attr_opt("label", label)
        .child(Element::new("value", ns::DATA_FORMS).text(value))
}
