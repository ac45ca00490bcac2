//! IQs to a room: service discovery (XEP-0030), ping and self-ping (XEP-0199, XEP-0410),
//! `muc#admin` lists and changes (XEP-0045 §8–§9) and `muc#owner` configuration and
//! destruction (§10).
//!
//! A `muc#admin` set with several items is all or nothing: the items are applied to a copy of
//! the room, and the copy replaces the room only when every item passed (as ejabberd does).

use pchat_room::rules::{list_rule, role_change_rule, sees_real_jid};
use pchat_room::ComplianceKind;
use pchat_room::{
    bare_jid, Affiliation, AffiliationChanged, ListKind, Occupant, Refusal, Role, RoleChanged,
    RoomEvent, Timestamp, Whois,
};
use pchat_xmpp::{ns, Element, StanzaError, StanzaErrorType};

use crate::form::{config_form, parse_submit, Submitted};
use crate::presence::Item;
use crate::{event_reason, split_jid, status, status_element, Effect, MucRoom};

/// One item of a `muc#admin` set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AdminItem {
    /// Change the role of the occupant with this nick.
    Role {
        nick: String,
        role: Role,
        reason: Option<String>,
    },
    /// Change the affiliation of this bare JID (or of the occupant with this nick).
    Affiliation {
        target: Target,
        affiliation: Affiliation,
        reason: Option<String>,
    },
}

/// Whose affiliation changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Jid(String),
    Nick(String),
}

enum Change {
    Role(RoleChanged, Option<String>),
    Affiliation(AffiliationChanged, Option<String>),
    /// Pool mode: the role of an occupant connected to another server, decided here and
    /// applied by that server.
    Elsewhere {
        server: String,
        nick: String,
        jid: Option<String>,
        old_role: Role,
        role: Role,
        actor: (Role, Affiliation),
        reason: Option<String>,
    },
}

const FEATURES_FIXED: &[&str] = &[
    ns::DISCO_INFO,
    ns::MUC,
    "http://jabber.org/protocol/muc#stable_id",
    "http://jabber.org/protocol/muc#self-ping-optimization",
    ns::MAM,
    ns::FULLTEXT,
    ns::SID,
    ns::MODERATE,
    ns::RETRACT,
];

fn with_reason(reason: &Option<String>) -> String {
    reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

/// Reads the items of a `muc#admin` set; `Err` names what is malformed (`bad-request`).
fn parse_admin_items(q: &Element) -> Result<Vec<AdminItem>, &'static str> {
    let mut items = Vec::new();
    for item in q.elements().filter(|e| e.is("item", ns::MUC_ADMIN)) {
        let reason = item
            .child_text("reason", ns::MUC_ADMIN)
            .filter(|r| !r.is_empty());
        let nick = item.get_attr("nick").filter(|n| !n.is_empty());
        let jid = item.get_attr("jid").filter(|j| !j.is_empty());
        if let Some(a) = item.get_attr("affiliation") {
            let affiliation = Affiliation::parse(a).ok_or("unknown affiliation")?;
            let target = match (jid, nick) {
                (Some(j), _) => Target::Jid(bare_jid(j)),
                (None, Some(n)) => Target::Nick(n.to_owned()),
                (None, None) => return Err("an affiliation item needs a jid or a nick"),
            };
            items.push(AdminItem::Affiliation {
                target,
                affiliation,
                reason,
            });
        } else if let Some(r) = item.get_attr("role") {
            let role = Role::parse(r).ok_or("unknown role")?;
            let nick = nick.ok_or("a role item needs a nick")?;
            items.push(AdminItem::Role {
                nick: nick.to_owned(),
                role,
                reason,
            });
        } else {
            return Err("an item needs an affiliation or a role");
        }
    }
    if items.is_empty() {
        return Err("the query has no item");
    }
    Ok(items)
}

impl MucRoom {
    fn result(iq: &Element, child: Option<Element>) -> Effect {
        let mut r = Element::new("iq", ns::CLIENT).attr("type", "result");
        if let Some(id) = iq.get_attr("id") {
            r.set_attr("id", id);
        }
        r.set_attr("from", iq.get_attr("to").unwrap_or_default());
        r.set_attr("to", iq.get_attr("from").unwrap_or_default());
        if let Some(c) = child {
            r = r.child(c);
        }
        Effect::Send(r)
    }

    fn bad_request(iq: &Element, text: &str) -> Effect {
        Self::error(
            iq,
            StanzaError::BadRequest,
            StanzaError::BadRequest.default_type(),
            text,
        )
    }

    fn service_unavailable(iq: &Element) -> Effect {
        Self::error(
            iq,
            StanzaError::ServiceUnavailable,
            StanzaErrorType::Cancel,
            "",
        )
    }

    pub(crate) fn handle_iq(&mut self, iq: &Element, from: &str, now: Timestamp) -> Vec<Effect> {
        let ty = iq.get_attr("type").unwrap_or_default().to_owned();
        // Results and errors are answers; answering them could loop. One to an occupant JID
        // answers an IQ this room forwarded: it goes back the same way.
        if ty != "get" && ty != "set" {
            let to = iq.get_attr("to").unwrap_or_default();
            return match split_jid(to) {
                (_, Some(nick)) if matches!(ty.as_str(), "result" | "error") => {
                    self.forward_iq(iq, from, nick).into_iter().collect()
                }
                _ => Vec::new(),
            };
        }
        let Some(payload) = iq.elements().next().cloned() else {
            return vec![Self::bad_request(iq, "an IQ needs a payload")];
        };
        if !self.sender_may_discover(from) {
            return vec![Self::refuse(iq, Refusal::RoomHidden)];
        }
        let to = iq.get_attr("to").unwrap_or_default().to_owned();
        if let (_, Some(nick)) = split_jid(&to) {
            return vec![self.occupant_iq(iq, &payload, &ty, from, nick)];
        }
        match (payload.ns.as_str(), payload.name.as_str(), ty.as_str()) {
            (ns::DISCO_INFO, "query", "get") => vec![self.disco_info(iq, &payload)],
            (ns::DISCO_ITEMS, "query", "get") => vec![self.disco_items(iq, from)],
            (ns::PING, "ping", "get") => vec![Self::result(iq, None)],
            (ns::MUC_ADMIN, "query", "get") => vec![self.admin_get(iq, &payload, from)],
            (ns::MUC_ADMIN, "query", "set") => self.admin_set(iq, &payload, from, now),
            (ns::MUC_OWNER, "query", "get") => self.owner_get(iq, from),
            (ns::MUC_OWNER, "query", "set") => self.owner_set(iq, &payload, from, now),
            _ => vec![Self::service_unavailable(iq)],
        }
    }

    /// Forwards an IQ from the occupant session `from` to the occupant `nick` (XEP-0045
    /// §7.2.x: vCard, version, ping, anything): to its current session, from the sender's
    /// occupant JID, so no real JID is shown. `None` when the sender is no occupant or the
    /// target is not here.
    fn forward_iq(&self, iq: &Element, from: &str, nick: &str) -> Option<Effect> {
        let sender = self.room.occupant_by_session(from)?;
        let target = self.room.occupant(nick)?;
        let mut copy = iq.clone();
        copy.set_attr("from", self.occupant_jid(&sender.nick));
        copy.set_attr("to", target.current_session());
        Some(Effect::Send(copy))
    }

    /// IQs to an occupant JID: XEP-0410 self-ping is answered by the room; anything else is
    /// forwarded to the occupant's current session (an occupant of another server of a pool
    /// cannot be reached this way: `service-unavailable`).
    fn occupant_iq(
        &self,
        iq: &Element,
        payload: &Element,
        ty: &str,
        from: &str,
        nick: &str,
    ) -> Effect {
        if ty == "get" && payload.is("ping", ns::PING) {
            return match self.room.occupant_by_session(from) {
                Some(o) if o.nick == nick => Self::result(iq, None),
                Some(_) => Self::service_unavailable(iq),
                None => Self::error(
                    iq,
                    StanzaError::NotAcceptable,
                    StanzaErrorType::Cancel,
                    "you are not in this room",
                ),
            };
        }
        if self.room.occupant_by_session(from).is_none() {
            return Self::error(
                iq,
                StanzaError::NotAcceptable,
                StanzaErrorType::Cancel,
                "only occupants may send IQs to occupants",
            );
        }
        if self.room.occupant(nick).is_none() {
            return Self::error(
                iq,
                StanzaError::ItemNotFound,
                StanzaErrorType::Cancel,
                "no occupant has this nickname here",
            );
        }
        self.forward_iq(iq, from, nick)
            .unwrap_or_else(|| Self::service_unavailable(iq))
    }

    fn disco_info(&self, iq: &Element, q: &Element) -> Effect {
        if q.get_attr("node").is_some() {
            return Self::error(
                iq,
                StanzaError::ItemNotFound,
                StanzaErrorType::Cancel,
                "no such node",
            );
        }
        let c = self.room.config();
        let local = self.room.jid().split('@').next().unwrap_or_default();
        let name = if c.name.is_empty() {
            local
        } else {
            c.name.as_str()
        };
        let mut query = Element::new("query", ns::DISCO_INFO).child(
            Element::new("identity", ns::DISCO_INFO)
                .attr("category", "conference")
                .attr("type", "text")
                .attr("name", name),
        );
        let pick = |cond: bool, yes: &'static str, no: &'static str| if cond { yes } else { no };
        let features = FEATURES_FIXED.iter().copied().chain([
            pick(c.public, "muc_public", "muc_hidden"),
            pick(c.members_only, "muc_membersonly", "muc_open"),
            pick(c.moderated, "muc_moderated", "muc_unmoderated"),
            pick(c.persistent, "muc_persistent", "muc_temporary"),
            pick(
                c.password.is_some(),
                "muc_passwordprotected",
                "muc_unsecured",
            ),
            pick(
                c.whois == Whois::Anyone,
                "muc_nonanonymous",
                "muc_semianonymous",
            ),
        ]);
        let occupant_id = self.occupant_id_key.is_some().then_some(ns::OCCUPANT_ID);
        for f in features.chain(occupant_id) {
            query = query.child(Element::new("feature", ns::DISCO_INFO).attr("var", f));
        }
        let field = |var: &str, label: &str, value: String| {
            Element::new("field", ns::DATA_FORMS)
                .attr("var", var)
                .attr("label", label)
                .child(Element::new("value", ns::DATA_FORMS).text(value))
        };
        let subject = self
            .room
            .subject()
            .map(|s| s.text.clone())
            .unwrap_or_default();
        let form = Element::new("x", ns::DATA_FORMS)
            .attr("type", "result")
            .child(
                Element::new("field", ns::DATA_FORMS)
                    .attr("var", "FORM_TYPE")
                    .attr("type", "hidden")
                    .child(Element::new("value", ns::DATA_FORMS).text(ns::MUC_ROOMINFO)),
            )
            .child(field(
                "muc#roominfo_description",
                "Description",
                c.description.clone(),
            ))
            .child(field(
                "muc#roominfo_occupants",
                "Number of occupants",
                self.occupant_count().to_string(),
            ))
            .child(field("muc#roominfo_subject", "Subject", subject))
            .child(field("muc#roominfo_lang", "Language", c.language.clone()))
            .child(field(
                "muc#maxhistoryfetch",
                "Most history messages fetched on join",
                c.history_stanzas_max.to_string(),
            ));
        // Lync's add-in, for clients that show a page beside the room.
        let form = match self.room.addin() {
            Some((name, url)) => form
                .child(field("pchat#addin_name", "Add-in", name.to_owned()))
                .child(field("pchat#addin_url", "Add-in URL", url.to_owned())),
            None => form,
        };
        Self::result(iq, Some(query.child(form)))
    }

    /// Occupants to occupants only: outsiders learn nobody's presence from the room.
    fn disco_items(&self, iq: &Element, from: &str) -> Effect {
        let mut query = Element::new("query", ns::DISCO_ITEMS);
        if self.is_occupant(from) {
            for o in self.room.occupants() {
                query = query.child(
                    Element::new("item", ns::DISCO_ITEMS)
                        .attr("jid", self.occupant_jid(&o.nick))
                        .attr("name", &*o.nick),
                );
            }
        }
        Self::result(iq, Some(query))
    }

    fn actor_standing(&self, from: &str) -> (Affiliation, Role) {
        (
            self.affiliation_of(from),
            self.room
                .occupant_by_session(from)
                .map_or(Role::None, |o| o.role),
        )
    }

    fn admin_get(&self, iq: &Element, q: &Element, from: &str) -> Effect {
        let Some(item) = q.get_child("item", ns::MUC_ADMIN) else {
            return Self::bad_request(
                iq,
                "ask for a list with <item affiliation='…'/> or <item role='…'/>",
            );
        };
        let kind = match (
            item.get_attr("affiliation").map(Affiliation::parse),
            item.get_attr("role").map(Role::parse),
        ) {
            (Some(Some(a)), _) if a != Affiliation::None => ListKind::Affiliation(a),
            (None, Some(Some(r))) if r != Role::None => ListKind::Role(r),
            _ => return Self::bad_request(iq, "unknown or unlistable affiliation or role"),
        };
        let (aff, role) = self.actor_standing(from);
        if let Err(r) = list_rule(aff, role, kind, self.room.config().members_only) {
            return Self::refuse(iq, r);
        }
        let mut query = Element::new("query", ns::MUC_ADMIN);
        match kind {
            ListKind::Affiliation(a) => {
                for (jid, reason) in self.room.affiliated(a) {
                    let mut e = Element::new("item", ns::MUC_ADMIN)
                        .attr("affiliation", a.as_str())
                        .attr("jid", jid);
                    if let Some(r) = reason {
                        e = e.child(Element::new("reason", ns::MUC_ADMIN).text(r));
                    }
                    query = query.child(e);
                }
            }
            ListKind::Role(want) => {
                let sees_jid = sees_real_jid(self.room.config().whois, role);
                for o in self.room.occupants().filter(|o| o.role == want) {
                    query = query.child(
                        Element::new("item", ns::MUC_ADMIN)
                            .attr("affiliation", o.affiliation.as_str())
                            .attr("role", o.role.as_str())
                            .attr("nick", &*o.nick)
                            .attr_opt("jid", sees_jid.then(|| o.current_session())),
                    );
                }
            }
        }
        Self::result(iq, Some(query))
    }

    fn admin_set(&mut self, iq: &Element, q: &Element, from: &str, now: Timestamp) -> Vec<Effect> {
        let items = match parse_admin_items(q) {
            Ok(items) => items,
            Err(text) => return vec![Self::bad_request(iq, text)],
        };
        match self.apply_admin(from, items, now) {
            Ok(mut out) => {
                out.push(Self::result(iq, None));
                out
            }
            Err(r) => vec![Self::refuse(iq, r)],
        }
    }

    /// Role changes by nick (used by voice request approvals).
    pub(crate) fn apply_roles(
        &mut self,
        actor_full: &str,
        roles: &[(String, Role, Option<String>)],
        now: Timestamp,
    ) -> Result<Vec<Effect>, Refusal> {
        let items = roles
            .iter()
            .map(|(nick, role, reason)| AdminItem::Role {
                nick: nick.clone(),
                role: *role,
                reason: reason.clone(),
            })
            .collect();
        self.apply_admin(actor_full, items, now)
    }

    /// Applies all items or none; returns Save (when durable state changed), one compliance
    /// event per change, then the presence every occupant must see.
    pub(crate) fn apply_admin(
        &mut self,
        actor_full: &str,
        items: Vec<AdminItem>,
        now: Timestamp,
    ) -> Result<Vec<Effect>, Refusal> {
        let actor_bare = bare_jid(actor_full);
        let actor_nick = self
            .room
            .occupant_by_session(actor_full)
            .map(|o| o.nick.clone());
        let mut trial = self.room.clone();
        let mut changes = Vec::with_capacity(items.len());
        for item in items {
            match item {
                AdminItem::Role { nick, role, reason } => {
                    if trial.occupant(&nick).is_none() {
                        if let Some((server, remote)) = self.remote_occupant(&nick) {
                            // Decided here with what the occupant's server published of it;
                            // that server applies it (and checks the rule again).
                            let actor = trial
                                .occupant_by_session(actor_full)
                                .map(|o| (o.role, o.affiliation))
                                .ok_or(Refusal::NotPermitted)?;
                            role_change_rule(actor, (remote.role, remote.affiliation), role)?;
                            changes.push(Change::Elsewhere {
                                server: server.to_owned(),
                                nick,
                                jid: remote.jid.as_deref().map(bare_jid),
                                old_role: remote.role,
                                role,
                                actor,
                                reason,
                            });
                            continue;
                        }
                    }
                    changes.push(Change::Role(
                        trial.set_role(actor_full, &nick, role)?,
                        reason,
                    ));
                }
                AdminItem::Affiliation {
                    target,
                    affiliation,
                    reason,
                } => {
                    let jid = match target {
                        Target::Jid(j) => j,
                        // An occupant of another server is found by the real JID its
                        // presence shows (non-anonymous rooms); otherwise, use its JID.
                        Target::Nick(n) => trial
                            .occupant(&n)
                            .map(|o| o.bare_jid.clone())
                            .or_else(|| {
                                self.remote_occupant(&n)
                                    .and_then(|(_, r)| r.jid.as_deref())
                                    .map(bare_jid)
                            })
                            .ok_or(Refusal::NoSuchOccupant)?,
                    };
                    let c =
                        trial.set_affiliation(&actor_bare, &jid, affiliation, reason.clone())?;
                    changes.push(Change::Affiliation(c, reason));
                }
            }
        }
        self.room = trial;
        let durable_changed = changes.iter().any(|c| match c {
            Change::Role(r, _) => r.voice_changed,
            Change::Affiliation(..) => true,
            Change::Elsewhere { .. } => false,
        });
        let mut out = Vec::new();
        if durable_changed {
            out.push(self.save());
        }
        let nick = actor_nick.as_deref();
        for c in &changes {
            let detail = match c {
                Change::Role(r, reason) => format!(
                    "{} ({}): {} -> {}{}",
                    r.occupant.nick,
                    r.occupant.bare_jid,
                    r.old_role.as_str(),
                    r.occupant.role.as_str(),
                    with_reason(reason)
                ),
                Change::Affiliation(a, reason) => {
                    format!(
                        "{}: {} -> {}{}",
                        a.jid,
                        a.old.as_str(),
                        a.new.as_str(),
                        with_reason(reason)
                    )
                }
                Change::Elsewhere {
                    server,
                    nick,
                    jid,
                    old_role,
                    role,
                    reason,
                    ..
                } => format!(
                    "{nick} ({}, on server {server}): {} -> {}{}",
                    jid.as_deref().unwrap_or("real JID not shown"),
                    old_role.as_str(),
                    role.as_str(),
                    with_reason(reason)
                ),
            };
            let kind = match c {
                Change::Role(..) | Change::Elsewhere { .. } => ComplianceKind::RoleChange,
                Change::Affiliation(..) => ComplianceKind::AffiliationChange,
            };
            out.push(self.compliance(kind, now, actor_full, nick, detail));
        }
        for c in &changes {
            match c {
                Change::Role(r, reason) if r.occupant.role == Role::None => {
                    self.announce_removal(
                        &r.occupant,
                        status::KICKED,
                        nick,
                        reason.as_deref(),
                        &mut out,
                    );
                }
                Change::Role(r, reason) => {
                    self.announce_change(&r.occupant, nick, reason.as_deref(), &mut out)
                }
                Change::Elsewhere {
                    server,
                    nick: target,
                    role,
                    actor,
                    reason,
                    ..
                } => out.push(Effect::Announce(RoomEvent::Role {
                    server: server.clone(),
                    nick: target.clone(),
                    role: *role,
                    actor_role: actor.0,
                    actor_affiliation: actor.1,
                    actor_nick: nick.map(str::to_owned),
                    reason: event_reason(reason.as_deref()),
                })),
                Change::Affiliation(a, reason) => {
                    for o in &a.occupants {
                        if o.role == Role::None {
                            let code = if a.new == Affiliation::Outcast {
                                status::BANNED
                            } else {
                                status::AFFILIATION_REMOVED
                            };
                            self.announce_removal(o, code, nick, reason.as_deref(), &mut out);
                        } else {
                            self.announce_change(o, nick, reason.as_deref(), &mut out);
                        }
                    }
                }
            }
        }
        self.delete_if_due(&mut out);
        Ok(out)
    }

    fn owner_get(&self, iq: &Element, from: &str) -> Vec<Effect> {
        if self.affiliation_of(from) != Affiliation::Owner {
            return vec![Self::refuse(iq, Refusal::NotPermitted)];
        }
        let form = config_form(self.room.jid(), self.room.config());
        vec![Self::result(
            iq,
            Some(Element::new("query", ns::MUC_OWNER).child(form)),
        )]
    }

    fn owner_set(&mut self, iq: &Element, q: &Element, from: &str, now: Timestamp) -> Vec<Effect> {
        if self.affiliation_of(from) != Affiliation::Owner {
            return vec![Self::refuse(iq, Refusal::NotPermitted)];
        }
        if let Some(d) = q.get_child("destroy", ns::MUC_OWNER) {
            return self.destroy_room(iq, from, Some(&d.clone()), now);
        }
        let Some(x) = q.get_child("x", ns::DATA_FORMS) else {
            return vec![Self::bad_request(
                iq,
                "send a muc#roomconfig form or a destroy request",
            )];
        };
        let submitted = match parse_submit(x, self.room.config(), self.room.limits()) {
            Ok(s) => s,
            Err(e) => {
                return vec![Self::error(
                    iq,
                    e.condition,
                    e.condition.default_type(),
                    &e.text,
                )]
            }
        };
        match submitted {
            // XEP-0045 §10.1.3: cancelling the initial configuration destroys the new room;
            // cancelling a later one changes nothing.
            Submitted::Cancel if self.room.is_locked() => self.destroy_room(iq, from, None, now),
            Submitted::Cancel => vec![Self::result(iq, None)],
            Submitted::Config(c) => self.apply_config(iq, from, *c, now),
        }
    }

    fn apply_config(
        &mut self,
        iq: &Element,
        from: &str,
        config: pchat_room::RoomConfig,
        now: Timestamp,
    ) -> Vec<Effect> {
        let old_whois = self.room.config().whois;
        let changed = match self.room.set_config(&bare_jid(from), config) {
            Ok(c) => c,
            Err(r) => return vec![Self::refuse(iq, r)],
        };
        let nick = self.room.occupant_by_session(from).map(|o| o.nick.clone());
        let mut out = Vec::new();
        let fields = changed.changed.join(",");
        if changed.unlocked {
            out.push(self.save());
            let detail = if fields.is_empty() {
                "instant room".to_owned()
            } else {
                format!("configured: {fields}")
            };
            out.push(self.compliance(
                ComplianceKind::RoomCreated,
                now,
                from,
                nick.as_deref(),
                detail,
            ));
        } else if !changed.changed.is_empty() {
            out.push(self.save());
            out.push(self.compliance(
                ComplianceKind::ConfigChange,
                now,
                from,
                nick.as_deref(),
                fields,
            ));
        }
        for o in &changed.removed {
            out.push(self.compliance(
                ComplianceKind::RoleChange,
                now,
                from,
                nick.as_deref(),
                format!(
                    "{} ({}): {} -> none (room became members-only)",
                    o.nick, o.bare_jid, "participant"
                ),
            ));
        }
        out.push(Self::result(iq, None));
        for o in &changed.removed {
            self.announce_removal(o, status::MEMBERS_ONLY_REMOVED, None, None, &mut out);
        }
        for o in &changed.roles_changed {
            self.announce_change(o, None, None, &mut out);
        }
        if !changed.unlocked && !changed.changed.is_empty() {
            self.config_notice(old_whois, &mut out);
        }
        self.delete_if_due(&mut out);
        out
    }

    /// XEP-0045 §10.2.1: every occupant hears that the configuration changed (104), and
    /// whether the room became non-anonymous (172) or semi-anonymous (173).
    pub(crate) fn config_notice(&self, old_whois: Whois, out: &mut Vec<Effect>) {
        let mut codes = vec![status::CONFIG_CHANGED];
        match (old_whois, self.room.config().whois) {
            (Whois::Moderators, Whois::Anyone) => codes.push(status::NOW_NON_ANONYMOUS),
            (Whois::Anyone, Whois::Moderators) => codes.push(status::NOW_SEMI_ANONYMOUS),
            _ => {}
        }
        let mut x = Element::new("x", ns::MUC_USER);
        for c in codes {
            x = x.child(status_element(c));
        }
        for s in self.room.occupants().flat_map(|o| o.sessions.iter()) {
            out.push(Effect::Send(
                Element::new("message", ns::CLIENT)
                    .attr("type", "groupchat")
                    .attr("from", self.room.jid().to_owned())
                    .attr("to", s.clone())
                    .child(x.clone()),
            ));
        }
    }

    /// XEP-0045 §10.9: every occupant hears the room go, with the alternate venue and reason
    /// when given.
    fn destroy_room(
        &mut self,
        iq: &Element,
        from: &str,
        d: Option<&Element>,
        now: Timestamp,
    ) -> Vec<Effect> {
        let nick = self.room.occupant_by_session(from).map(|o| o.nick.clone());
        // A room still locked was never saved: no other server has it.
        let announce = !self.room.is_locked();
        let occupants = match self.room.destroy(&bare_jid(from)) {
            Ok(o) => o,
            Err(r) => return vec![Self::refuse(iq, r)],
        };
        let reason = d
            .and_then(|d| d.child_text("reason", ns::MUC_OWNER))
            .filter(|r| !r.is_empty());
        let alternate = d.and_then(|d| d.get_attr("jid")).filter(|j| !j.is_empty());
        let mut detail = if d.is_some() {
            "destroyed".to_owned()
        } else {
            "initial configuration cancelled".to_owned()
        };
        if let Some(a) = alternate {
            detail.push_str(&format!("; alternate venue {a}"));
        }
        if let Some(r) = &reason {
            detail.push_str(&format!(": {r}"));
        }
        let mut out = vec![
            self.compliance(
                ComplianceKind::RoomDestroyed,
                now,
                from,
                nick.as_deref(),
                detail,
            ),
            Effect::Delete,
        ];
        if announce {
            // The other servers of a pool remove their occupants with the same words.
            out.push(Effect::Announce(RoomEvent::Destroyed {
                reason: event_reason(reason.as_deref()),
                alternate: alternate
                    .filter(|a| a.chars().count() <= crate::EVENT_ALTERNATE_CHARS_MAX)
                    .map(str::to_owned),
            }));
        }
        out.extend(self.destroy_notices(&occupants, reason.as_deref(), alternate));
        self.presences.clear();
        out.push(Self::result(iq, None));
        out
    }

    /// The unavailable presence every session of a destroyed room gets, with the reason and
    /// the alternate venue when given.
    pub(crate) fn destroy_notices(
        &self,
        occupants: &[Occupant],
        reason: Option<&str>,
        alternate: Option<&str>,
    ) -> Vec<Effect> {
        let mut destroy = Element::new("destroy", ns::MUC_USER).attr_opt("jid", alternate);
        if let Some(r) = reason {
            destroy = destroy.child(Element::new("reason", ns::MUC_USER).text(r));
        }
        let item = Item::new(Affiliation::None, Role::None);
        let mut out = Vec::new();
        for o in occupants {
            for s in &o.sessions {
                out.push(Effect::Send(self.presence_stanza(
                    &o.nick,
                    &o.bare_jid,
                    s,
                    true,
                    &[],
                    &item,
                    &[],
                    Some(destroy.clone()),
                )));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(xml: &str) -> Element {
        Element::parse(xml.as_bytes(), ns::MUC_ADMIN).unwrap()
    }

    #[test]
    fn admin_items() {
        let role = |nick: &str, role, reason: Option<&str>| AdminItem::Role {
            nick: nick.into(),
            role,
            reason: reason.map(Into::into),
        };
        let aff = |t: Target, affiliation| AdminItem::Affiliation {
            target: t,
            affiliation,
            reason: None,
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Result<Vec<AdminItem>, &str>)> = vec![
            ("<query><item nick='a' role='none'><reason>bye</reason></item></query>", Ok(vec![role("a", Role::None, Some("bye"))])),
            ("<query><item jid='A@X/r' affiliation='outcast'/></query>", Ok(vec![aff(Target::Jid("a@x".into()), Affiliation::Outcast)])),
            ("<query><item nick='a' affiliation='member'/></query>", Ok(vec![aff(Target::Nick("a".into()), Affiliation::Member)])),
            ("<query><item nick='a' role='participant'/><item jid='b@x' affiliation='none'/></query>",
                Ok(vec![role("a", Role::Participant, None), aff(Target::Jid("b@x".into()), Affiliation::None)])),
            ("<query/>", Err("the query has no item")),
            ("<query><item nick='a'/></query>", Err("an item needs an affiliation or a role")),
            ("<query><item nick='a' role='king'/></query>", Err("unknown role")),
            ("<query><item jid='a@x' affiliation='king'/></query>", Err("unknown affiliation")),
            ("<query><item role='none'/></query>", Err("a role item needs a nick")),
            ("<query><item affiliation='member'/></query>", Err("an affiliation item needs a jid or a nick")),
        ];
        for (xml, expect) in cases {
            assert_eq!(parse_admin_items(&q(xml)), expect, "{xml}");
        }
    }
}
