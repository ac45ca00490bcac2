//! XEP-0045 Multi-User Chat for pchat: the mapping between XMPP stanzas and the room domain of
//! `pchat-room`. A [`MucRoom`] takes one stanza (with its authenticated sender and `now`) and
//! returns the [`Effect`]s the server must carry out, in order: durable writes (Save, Delete,
//! Compliance, Publish) and stanzas to deliver. Nothing here does I/O or reads a clock.
//!
//! - `presence`: join, presence updates, nick changes, leaves (§7.1–§7.6, §7.14).
//! - `message`: groupchat, subject, private messages, invitations, voice requests (§7.4–§7.8,
//!   §7.13, §8.1).
//! - `iq`: disco, ping, `muc#admin` (§8, §9) and `muc#owner` (§10).
//! - [`form`]: the `muc#roomconfig` data form.
//! - [`datetime`]: XEP-0082 date-times for history requests.
//!
//! Where XEP-0045 leaves a choice, pchat follows ejabberd or Prosody and says which, next to the
//! code. Room secrecy (brief invariant I8) wins over helpful errors: a room someone may not learn
//! of answers `item-not-found`, exactly as if it did not exist.
#![warn(missing_docs)]

pub mod datetime;
pub mod form;
mod iq;
mod message;
pub mod moderation;
mod presence;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use pchat_room::rules::presence_suppressed;
use pchat_room::{
    bare_jid, Affiliation, ComplianceKind, Limits, NewComplianceEvent, Refusal, Removal, Role,
    Room, RoomConfig, RoomEvent, RoomRecord, Timestamp,
};
use pchat_xmpp::{ns, Element, Node, StanzaError, StanzaErrorType};

/// XEP-0045 status codes pchat sends (§15.6.2 registry).
pub mod status {
    #![allow(missing_docs)]
    pub const NON_ANONYMOUS: u16 = 100;
    pub const CONFIG_CHANGED: u16 = 104;
    pub const SELF: u16 = 110;
    pub const LOGGED: u16 = 170;
    pub const NOW_NON_ANONYMOUS: u16 = 172;
    pub const NOW_SEMI_ANONYMOUS: u16 = 173;
    pub const CREATED: u16 = 201;
    pub const NICK_MODIFIED: u16 = 210;
    pub const BANNED: u16 = 301;
    pub const NICK_CHANGED: u16 = 303;
    pub const KICKED: u16 = 307;
    pub const AFFILIATION_REMOVED: u16 = 321;
    pub const MEMBERS_ONLY_REMOVED: u16 = 322;
    pub const SHUTDOWN: u16 = 332;
    pub const TECHNICAL_REMOVAL: u16 = 333;
}

/// The MUC service's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The service's domain, e.g. `conference.localhost`.
    pub service_jid: String,
    /// Configuration of new rooms.
    pub room_defaults: RoomConfig,
    /// Occupants per room at most (a room may set a lower limit); 0 = unlimited.
    pub occupants_max: u32,
    /// Longest nick, in characters.
    pub nick_chars_max: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            service_jid: "conference.localhost".into(),
            room_defaults: RoomConfig::default(),
            occupants_max: 20_000,
            nick_chars_max: 64,
        }
    }
}

impl ServiceConfig {
    fn limits(&self) -> Limits {
        Limits {
            occupants_max: self.occupants_max,
            nick_chars_max: u32::try_from(self.nick_chars_max).unwrap_or(u32::MAX),
        }
    }
}

/// Something the server must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Deliver this stanza now; it is fully addressed (`from` = room or room/nick, `to` = a
    /// real JID: a session's full JID, or whatever JID an invitation or decline names).
    Send(Element),
    /// A groupchat message accepted from an occupant: archive durably, then deliver a copy to
    /// each recipient with `to` set and a `<stanza-id by='ROOMJID' id='SEQ'/>` added.
    Publish(Publish),
    /// Send the join history to `to` (read from the archive), then the `subject` message.
    History(HistoryRequest),
    /// Persist this snapshot of the room record before any later Send is delivered.
    Save(RoomRecord),
    /// Delete the room and its archive (destroyed, or non-persistent and empty).
    Delete,
    /// Record this compliance event durably before any later Send is delivered.
    Compliance(NewComplianceEvent),
    /// Pool mode: tell the other servers of the pool, if and only if this batch commits
    /// (a decision about an occupant connected elsewhere, the room's destruction).
    Announce(RoomEvent),
    /// Replace archived message `seq` with `stanza` (a tombstone): its author retracted it
    /// (XEP-0424). Committed with the batch, before any later `Send`.
    RemoveMessage {
        /// The message's id.
        seq: i64,
        /// The tombstone (serialized XML).
        stanza: String,
    },
}

/// The status code and reason an occupant removed by a change it did not make is told.
pub(crate) fn removal_status(r: &pchat_room::Removed) -> (u16, Option<&str>) {
    match r.why {
        Removal::Banned => (status::BANNED, r.reason.as_deref()),
        Removal::AffiliationChanged => (status::AFFILIATION_REMOVED, r.reason.as_deref()),
        Removal::MembersOnly => (status::MEMBERS_ONLY_REMOVED, r.reason.as_deref()),
        Removal::Walled => (
            status::AFFILIATION_REMOVED,
            Some("you are no longer allowed in this room's category"),
        ),
        Removal::Disabled => (status::AFFILIATION_REMOVED, Some("the room was disabled")),
    }
}

/// Longest reason, in characters, that a [`RoomEvent`] carries to the other servers: an
/// event travels in one PostgreSQL notification (under 8,000 bytes with the rest of it).
pub const EVENT_REASON_CHARS_MAX: usize = 512;
/// Longest alternate venue, in characters, that a destruction event carries (a room JID is
/// far shorter; a longer one is left out rather than the event).
pub const EVENT_ALTERNATE_CHARS_MAX: usize = 1024;

/// A reason cut to what an event carries.
pub(crate) fn event_reason(reason: Option<&str>) -> Option<String> {
    reason.map(|r| r.chars().take(EVENT_REASON_CHARS_MAX).collect())
}

/// What the room knows of an occupant connected to another server of the pool, from the
/// presence that server published for it: enough to decide a role change (its role and
/// affiliation) and, where the room shows real JIDs, an affiliation change by nick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RemoteOccupant {
    pub role: Role,
    pub affiliation: Affiliation,
    /// Its real JID, when the published presence shows it (non-anonymous rooms).
    pub jid: Option<String>,
}

/// A groupchat message to archive and fan out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// The message: `from` = room/nick, `type='groupchat'`, no `to`, client stanza-ids removed.
    pub message: Element,
    /// Sender's real bare JID.
    pub sender_bare: String,
    /// Sender's real full JID.
    pub sender_full: String,
    /// Sender's nick.
    pub nick: String,
    /// XEP-0359 origin-id, for dedupe of retries (invariant I4).
    pub origin_id: Option<String>,
    /// Body text, if any (chat states have none).
    pub body: Option<String>,
    /// Real full JIDs of every occupant's sessions now, the sender's included.
    pub recipients: Vec<String>,
}

/// History to send on join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRequest {
    /// The joining session.
    pub to: String,
    /// At most this many messages (0 = none).
    pub max_stanzas: u32,
    /// At most this many characters, when the client asked.
    pub max_chars: Option<u32>,
    /// Only messages at or after this time.
    pub since: Option<Timestamp>,
    /// Fully addressed subject message (empty `<subject/>` when none), sent after the history.
    pub subject: Element,
}

/// A room of the MUC service: the domain room plus what XMPP needs on top (presence payloads).
#[derive(Clone, Debug)]
pub struct MucRoom {
    room: Room,
    /// Latest presence payload (show, status, caps…) per session, as the client sent it minus
    /// MUC elements, so it can be replayed to joiners and rebroadcast with new roles.
    presences: HashMap<String, Vec<Node>>,
    /// Pool mode: occupants connected to the other servers of the pool, by (nick, server).
    /// They count towards the room's size (presence broadcast limit, disco#info), not towards
    /// its local state, and a moderator here may change their roles.
    elsewhere: BTreeMap<(String, String), RemoteOccupant>,
    /// The service's key for XEP-0421 occupant ids (the same on every server of a pool);
    /// `None`: the room gives none.
    occupant_id_key: Option<Arc<[u8; 32]>>,
}

/// Splits `room@service/nick` into the bare part and the nick (resource), if any.
pub(crate) fn split_jid(jid: &str) -> (&str, Option<&str>) {
    match jid.split_once('/') {
        Some((bare, res)) => (bare, Some(res)),
        None => (jid, None),
    }
}

/// The stanza error and its type for a domain refusal: the one place this mapping lives.
pub fn refusal_error(r: Refusal) -> (StanzaError, StanzaErrorType) {
    use StanzaErrorType as T;
    let e = match r {
        Refusal::NickInvalid => StanzaError::JidMalformed,
        Refusal::RoomLocked | Refusal::RoomHidden | Refusal::NoSuchOccupant => {
            StanzaError::ItemNotFound
        }
        Refusal::Banned | Refusal::NotPermitted | Refusal::NoVoice => StanzaError::Forbidden,
        Refusal::MembersOnly => StanzaError::RegistrationRequired,
        Refusal::PasswordRequired => StanzaError::NotAuthorized,
        Refusal::NickConflict | Refusal::LastOwner => StanzaError::Conflict,
        // XEP-0045 §7.2.10: a full room is a temporary condition, so the type is wait.
        Refusal::RoomFull => return (StanzaError::ServiceUnavailable, T::Wait),
        Refusal::NotOccupant | Refusal::MultiSessionNickChange => StanzaError::NotAcceptable,
        Refusal::TargetProtected
        | Refusal::InviteeWalled
        | Refusal::TargetWalled
        | Refusal::InvitationsOff => StanzaError::NotAllowed,
    };
    (e, e.default_type())
}

impl MucRoom {
    /// Gives the room the service's key for occupant ids (XEP-0421): from then on every
    /// presence and message from an occupant carries `<occupant-id/>`.
    pub fn set_occupant_id_key(&mut self, key: Arc<[u8; 32]>) {
        self.occupant_id_key = Some(key);
    }

    /// An occupant's id in this room: stable for their bare JID (across nicks, sessions and
    /// servers of a pool), different in every room, and not their JID (an HMAC under the
    /// service's key, so nobody can test a guess).
    pub fn occupant_id(&self, bare_jid: &str) -> Option<String> {
        use base64::Engine as _;
        use hmac::Mac as _;
        let key = self.occupant_id_key.as_ref()?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_slice()).ok()?;
        mac.update(self.room.jid().as_bytes());
        mac.update(&[0]);
        mac.update(bare_jid.as_bytes());
        let digest = mac.finalize().into_bytes();
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18]))
    }

    /// `<occupant-id/>` for an occupant, or nothing when the room has no key.
    pub(crate) fn occupant_id_element(&self, bare_jid: &str) -> Option<Element> {
        self.occupant_id(bare_jid)
            .map(|id| Element::new("occupant-id", ns::OCCUPANT_ID).attr("id", id))
    }

    /// A room loaded from the store at startup or on demand (no occupants).
    pub fn from_record(record: RoomRecord, service: &ServiceConfig) -> Self {
        MucRoom {
            room: Room::from_record(record, service.limits()),
            presences: HashMap::new(),
            elsewhere: BTreeMap::new(),
            occupant_id_key: None,
        }
    }

    /// A room that does not exist yet, about to be created by the presence `creator_full`
    /// sends. It stays locked until the owner submits the configuration form or an empty
    /// instant-room form (XEP-0045 §10.1); nothing is saved before that.
    pub fn create(
        room_jid: &str,
        creator_full: &str,
        now: Timestamp,
        service: &ServiceConfig,
    ) -> Self {
        MucRoom {
            room: Room::new_locked(
                room_jid,
                creator_full,
                service.room_defaults.clone(),
                now,
                service.limits(),
            ),
            presences: HashMap::new(),
            elsewhere: BTreeMap::new(),
            occupant_id_key: None,
        }
    }

    /// Takes over a newer record written by another server of the pool and tells this
    /// server's occupants what the other server told its own: who was removed and why (301
    /// banned, 321 no longer a member, 322 the room became members-only, with the reason
    /// recorded), whose affiliation or role changed (moderation, voice list, affiliations), that
    /// the configuration changed (104), and the new subject. Nothing is saved or recorded for
    /// compliance: the server that made the change did both.
    pub fn adopt_record(&mut self, record: RoomRecord) -> Vec<Effect> {
        if self.room.is_locked() || self.room.is_destroyed() {
            // Not created yet here, or gone: there is nothing to take over.
            return Vec::new();
        }
        let old_whois = self.room.config().whois;
        let adopted = self.room.adopt_record(record);
        let mut out = Vec::new();
        for r in &adopted.removed {
            let (code, reason) = removal_status(r);
            self.announce_removal(&r.occupant, code, None, reason, &mut out);
        }
        for o in &adopted.occupants_changed {
            self.announce_change(o, None, None, &mut out);
        }
        if !adopted.changed.is_empty() {
            self.config_notice(old_whois, &mut out);
        }
        if adopted.subject_changed {
            let sessions: Vec<String> = self
                .room
                .occupants()
                .flat_map(|o| o.sessions.iter().cloned())
                .collect();
            out.extend(
                sessions
                    .iter()
                    .map(|s| Effect::Send(self.subject_message(s))),
            );
        }
        out
    }

    /// Takes a newly compiled directory (a wall, a group or the room's category changed)
    /// and tells this server's occupants what it changed for them: whoever the wall no longer
    /// allows is removed (321, with the reason), whoever holds another affiliation through a
    /// group gets it. Nothing is saved: the directory is not the room's record; whoever
    /// changed the directory also purged the records.
    pub fn set_access(
        &mut self,
        access: std::sync::Arc<pchat_room::directory::Access>,
    ) -> Vec<Effect> {
        let adopted = self.room.set_access(access);
        let mut out = Vec::new();
        if self.room.is_destroyed() {
            return out;
        }
        for r in &adopted.removed {
            let (code, reason) = removal_status(r);
            self.announce_removal(&r.occupant, code, None, reason, &mut out);
        }
        for o in &adopted.occupants_changed {
            self.announce_change(o, None, None, &mut out);
        }
        out
    }

    /// The room's record is gone from the store while this server has it loaded: another
    /// server destroyed it, and its event did not arrive. Same as [`MucRoom::adopt_event`]
    /// with a destruction, without reason or alternate venue. A room still locked here was
    /// never saved, so its missing record means nothing.
    pub fn adopt_deleted(&mut self) -> Vec<Effect> {
        if self.room.is_locked() || self.room.is_destroyed() {
            return Vec::new();
        }
        self.destroyed_elsewhere(None, None)
    }

    /// Applies what another server of the pool decided (see [`RoomEvent`]); this server is
    /// `this_server`. A role change is applied when the occupant is connected here, with the
    /// rule checked again (the occupant may have changed meanwhile; then nothing happens),
    /// and shown as the deciding server would show it (307 for a kick, with the actor's nick
    /// and the reason). A destruction removes everyone here with the reason and alternate
    /// venue. No compliance record: the deciding server wrote it.
    pub fn adopt_event(&mut self, event: &RoomEvent, this_server: &str) -> Vec<Effect> {
        match event {
            RoomEvent::Role {
                server,
                nick,
                role,
                actor_role,
                actor_affiliation,
                actor_nick,
                reason,
            } => {
                if server != this_server {
                    return Vec::new();
                }
                let Ok(changed) =
                    self.room
                        .change_role((*actor_role, *actor_affiliation), nick, *role)
                else {
                    return Vec::new();
                };
                let mut out = Vec::new();
                if changed.voice_changed {
                    out.push(self.save());
                }
                let (actor, reason) = (actor_nick.as_deref(), reason.as_deref());
                if changed.occupant.role == Role::None {
                    self.announce_removal(
                        &changed.occupant,
                        status::KICKED,
                        actor,
                        reason,
                        &mut out,
                    );
                    self.delete_if_due(&mut out);
                } else {
                    self.announce_change(&changed.occupant, actor, reason, &mut out);
                }
                out
            }
            RoomEvent::Retracted { id, by, reason } => self
                .room
                .occupants()
                .flat_map(|o| o.sessions.iter())
                .map(|s| {
                    Effect::Send(moderation::retraction_notice(
                        self.room.jid(),
                        s,
                        *id,
                        by,
                        reason.as_deref(),
                    ))
                })
                .collect(),
            RoomEvent::Relayed { server, stanza } => {
                if server == this_server {
                    return Vec::new();
                }
                let Ok(message) = Element::parse(stanza.as_bytes(), ns::CLIENT) else {
                    return Vec::new();
                };
                self.room
                    .occupants()
                    .flat_map(|o| o.sessions.iter())
                    .map(|s| {
                        let mut copy = message.clone();
                        copy.set_attr("to", s.as_str());
                        Effect::Send(copy)
                    })
                    .collect()
            }
            RoomEvent::Destroyed { reason, alternate } => {
                if self.room.is_destroyed() {
                    return Vec::new();
                }
                self.destroyed_elsewhere(reason.as_deref(), alternate.as_deref())
            }
        }
    }

    fn destroyed_elsewhere(
        &mut self,
        reason: Option<&str>,
        alternate: Option<&str>,
    ) -> Vec<Effect> {
        let occupants = self.room.destroyed_elsewhere();
        let out = self.destroy_notices(&occupants, reason, alternate);
        self.presences.clear();
        out
    }

    /// Bare room JID.
    pub fn jid(&self) -> &str {
        self.room.jid()
    }

    /// The durable record as it is now.
    pub fn record(&self) -> RoomRecord {
        self.room.record()
    }

    /// The domain room (read-only), for callers that need more than this API offers.
    pub fn room(&self) -> &Room {
        &self.room
    }

    /// Awaiting its initial configuration.
    pub fn is_locked(&self) -> bool {
        self.room.is_locked()
    }

    /// Handles one stanza whose `to` is the room JID or an occupant JID. `from` is the sender's
    /// authenticated full JID; the stanza's own `from` attribute is ignored.
    pub fn handle(&mut self, stanza: &Element, from: &str, now: Timestamp) -> Vec<Effect> {
        // The stanza's `from` is whatever the client wrote; every reply and check uses the
        // authenticated sender instead.
        let mut stanza = stanza.clone();
        stanza.set_attr("from", from);
        if stanza.get_attr("to").is_none() {
            stanza.set_attr("to", self.room.jid().to_owned());
        }
        match stanza.name.as_str() {
            "presence" => self.handle_presence(&stanza, from, now),
            "message" => self.handle_message(&stanza, from, now),
            "iq" => self.handle_iq(&stanza, from, now),
            _ => Vec::new(),
        }
    }

    /// The client session `full_jid` ended without sending unavailable: it leaves.
    pub fn occupant_gone(&mut self, full_jid: &str, now: Timestamp) -> Vec<Effect> {
        let mut out = Vec::new();
        self.leave(full_jid, &[], None, false, now, &mut out);
        out
    }

    /// The server dropped the client session `full_jid` (it stopped reading, stopped
    /// answering pings, or its connection died): it leaves, and the others see status 333,
    /// "removed due to a technical problem" (XEP-0045 §7.14). The session itself is gone, so
    /// nothing is sent to it.
    pub fn occupant_dropped(&mut self, full_jid: &str, now: Timestamp) -> Vec<Effect> {
        let mut out = Vec::new();
        self.leave(
            full_jid,
            &[],
            Some(status::TECHNICAL_REMOVAL),
            false,
            now,
            &mut out,
        );
        out
    }

    /// Server shutdown: every session gets its own unavailable presence with status 332, and
    /// the room empties. No compliance event: without a `now` there is no honest timestamp,
    /// and the server records its own shutdown.
    pub fn shutdown(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        for o in self.room.clear_occupants() {
            for s in &o.sessions {
                let item = presence::Item::new(o.affiliation, Role::None);
                out.push(Effect::Send(self.presence_stanza(
                    &o.nick,
                    &o.bare_jid,
                    s,
                    true,
                    &[],
                    &item,
                    &[status::SELF, status::SHUTDOWN],
                    None,
                )));
            }
        }
        self.presences.clear();
        out
    }

    /// Occupants (nicks) now, on this server and (pool mode) on the others.
    pub fn occupant_count(&self) -> usize {
        self.room.occupant_count() + self.elsewhere.len()
    }

    /// Pool mode: the presence another server published for its occupant `nick` (`None`: it
    /// left). The room learns its role, affiliation and, when shown, real JID from the
    /// presence's `muc#user` item, so its moderators may change the roles of occupants
    /// connected elsewhere and the room counts them.
    pub fn note_remote_presence(&mut self, server: &str, nick: &str, presence: Option<&Element>) {
        let key = (nick.to_owned(), server.to_owned());
        let item = presence
            .filter(|p| p.get_attr("type") != Some("unavailable"))
            .and_then(|p| p.get_child("x", ns::MUC_USER))
            .and_then(|x| x.get_child("item", ns::MUC_USER));
        let Some(item) = item else {
            self.elsewhere.remove(&key);
            return;
        };
        let remote = RemoteOccupant {
            role: item
                .get_attr("role")
                .and_then(Role::parse)
                .unwrap_or(Role::Participant),
            affiliation: item
                .get_attr("affiliation")
                .and_then(Affiliation::parse)
                .unwrap_or(Affiliation::None),
            jid: item.get_attr("jid").map(str::to_owned),
        };
        self.elsewhere.insert(key, remote);
    }

    /// Pool mode: the server and what is known of an occupant connected to another server.
    pub(crate) fn remote_occupant(&self, nick: &str) -> Option<(&str, &RemoteOccupant)> {
        self.elsewhere
            .range((nick.to_owned(), String::new())..)
            .next()
            .filter(|((n, _), _)| n == nick)
            .map(|((_, server), r)| (server.as_str(), r))
    }

    /// True when the room is too crowded for presence to be broadcast to everybody (Lync's
    /// ParticipantUpdateLimit), counting the occupants on every server of a pool.
    pub fn presence_suppressed(&self) -> bool {
        presence_suppressed(
            self.occupant_count(),
            self.room.config().presence_broadcast_occupants_max,
        )
    }

    /// True when this session is in the room.
    pub fn is_occupant(&self, full_jid: &str) -> bool {
        self.room.occupant_by_session(full_jid).is_some()
    }

    /// Listed in the service's disco#items for this bare JID: public rooms to everyone; hidden
    /// rooms to occupants and members and above; locked rooms to their owner only.
    pub fn visible_to(&self, bare_jid: &str) -> bool {
        self.room.visible_to(&pchat_room::bare_jid(bare_jid))
    }

    /// May this bare JID read the archive (MAM): members-only rooms, members and above; other
    /// rooms, anyone not banned.
    pub fn can_read_archive(&self, bare_jid: &str) -> bool {
        self.room.can_read_archive(&pchat_room::bare_jid(bare_jid))
    }

    /// True when the room should be deleted now: destroyed, or empty and either temporary or
    /// never configured.
    pub fn should_delete(&self) -> bool {
        self.room.should_delete()
    }

    // ---- helpers shared by the stanza modules ----

    pub(crate) fn occupant_jid(&self, nick: &str) -> String {
        format!("{}/{}", self.room.jid(), nick)
    }

    /// An error reply to `stanza` (whose `from` is already the authenticated sender).
    pub(crate) fn error(
        stanza: &Element,
        e: StanzaError,
        ty: StanzaErrorType,
        text: &str,
    ) -> Effect {
        let text = (!text.is_empty()).then_some(text);
        Effect::Send(e.reply_to_typed(stanza, ty, text))
    }

    /// An error reply for a domain refusal.
    pub(crate) fn refuse(stanza: &Element, r: Refusal) -> Effect {
        let (e, ty) = refusal_error(r);
        Self::error(stanza, e, ty, &r.to_string())
    }

    pub(crate) fn compliance(
        &self,
        kind: ComplianceKind,
        at: Timestamp,
        actor_full: &str,
        nick: Option<&str>,
        detail: String,
    ) -> Effect {
        Effect::Compliance(NewComplianceEvent {
            kind,
            at,
            room: self.room.jid().to_owned(),
            actor: bare_jid(actor_full),
            nick: nick.map(str::to_owned),
            detail,
        })
    }

    pub(crate) fn save(&self) -> Effect {
        Effect::Save(self.room.record())
    }

    /// Forgets the presence payloads of sessions that left.
    pub(crate) fn forget_sessions(&mut self, sessions: &[String]) {
        for s in sessions {
            self.presences.remove(s);
        }
    }

    /// True when the sender may learn the room exists: an occupant, or allowed by the domain.
    pub(crate) fn sender_may_discover(&self, from: &str) -> bool {
        self.is_occupant(from) || self.room.may_discover(&bare_jid(from))
    }

    /// The Delete effect when the room should go now. A temporary room that is empty here
    /// but has occupants on another server of the pool stays: it is not empty.
    pub(crate) fn delete_if_due(&self, out: &mut Vec<Effect>) {
        if self.room.should_delete() && (self.room.is_destroyed() || self.elsewhere.is_empty()) {
            out.push(Effect::Delete);
        }
    }

    pub(crate) fn affiliation_of(&self, full: &str) -> Affiliation {
        self.room.affiliation(&bare_jid(full))
    }
}

/// `<status code='N'/>` in `muc#user`.
pub(crate) fn status_element(code: u16) -> Element {
    Element::new("status", ns::MUC_USER).attr("code", code.to_string())
}
