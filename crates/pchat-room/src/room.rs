//! A room's live state (its durable record plus the occupants now present) and the state
//! transitions of XEP-0045: join, nick change, leave, roles, affiliations, subject, invitations,
//! configuration and destruction. Each transition checks its rule from [`crate::rules`] first
//! and changes nothing when refused, so a refused request never leaves half-applied state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::directory::Access;

use crate::rules::{
    affiliation_change_rule, invite_rule, join_rule, nick_rule, private_message_rule, removal_rule,
    role_after_change, role_change_rule, role_for, speak_rule, subject_rule, InviteGrant,
    JoinInput, JoinKind, NickHolder, Refusal, Removal,
};
use crate::types::{
    Affiliation, AffiliationEntry, Role, RoomConfig, RoomRecord, Subject, Timestamp,
};

/// Longest room name accepted, in characters (Lync's limit).
pub const NAME_CHARS_MAX: usize = 256;
/// Longest room description accepted, in characters.
pub const DESCRIPTION_CHARS_MAX: usize = 1024;
/// Longest room password accepted, in characters.
pub const PASSWORD_CHARS_MAX: usize = 256;
/// Longest language tag accepted (BCP 47 tags are at most 35 characters in practice).
pub const LANGUAGE_CHARS_MAX: usize = 35;
/// Highest `muc#maxhistoryfetch` accepted: history on join is a courtesy; MAM serves the rest.
pub const HISTORY_FETCH_STANZAS_LIMIT: u32 = 1000;
/// Highest default history on join (Lync DefaultChatHistory's range ends at 500).
pub const HISTORY_DEFAULT_STANZAS_LIMIT: u32 = 500;

/// Service-wide bounds a room applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Occupants per room when the room sets no lower limit; 0 = unlimited.
    pub occupants_max: u32,
    /// Longest nick, in characters (u32: the room task stays small, see pchat-server).
    pub nick_chars_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            occupants_max: 20_000,
            nick_chars_max: 64,
        }
    }
}

/// Someone in the room under one nick: one user, one or more sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupant {
    /// Nick (the resource of the occupant JID).
    pub nick: String,
    /// Real bare JID, lower-case.
    pub bare_jid: String,
    /// Real full JIDs of its sessions, the one that most recently updated its presence last.
    pub sessions: Vec<String>,
    /// Role.
    pub role: Role,
    /// Affiliation (mirrors the room's affiliation list).
    pub affiliation: Affiliation,
}

impl Occupant {
    /// The session whose presence represents the occupant: the latest one to update it.
    pub fn current_session(&self) -> &str {
        self.sessions.last().map(String::as_str).unwrap_or("")
    }
}

/// The bare JID of a JID, lower-cased: `User@Host/res` → `user@host`. Localparts and domains
/// compare case-insensitively in practice (nodeprep/nameprep), so the room keys on this.
pub fn bare_jid(jid: &str) -> String {
    let bare = jid.split_once('/').map_or(jid, |(b, _)| b);
    bare.to_lowercase()
}

/// A join request.
#[derive(Clone, Copy, Debug)]
pub struct JoinRequest<'a> {
    /// The session's real full JID.
    pub full_jid: &'a str,
    /// Requested nick.
    pub nick: &'a str,
    /// Password sent, if any.
    pub password: Option<&'a str>,
}

/// A permitted join.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    /// New occupant, or one more session of an occupant already present.
    pub kind: JoinKind,
    /// This join created the room (the creator's first presence: status 201).
    pub created: bool,
    /// The occupant's role.
    pub role: Role,
    /// The occupant's affiliation.
    pub affiliation: Affiliation,
}

/// A session left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Left {
    /// The occupant as it was before the session left.
    pub occupant: Occupant,
    /// The occupant has no session left and is gone from the room.
    pub gone: bool,
}

/// A role change that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleChanged {
    /// The occupant after the change (role `None` and out of the room when kicked).
    pub occupant: Occupant,
    /// Its role before.
    pub old_role: Role,
    /// The durable voice list changed (the record must be saved).
    pub voice_changed: bool,
}

/// An affiliation change that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffiliationChanged {
    /// Bare JID whose affiliation changed.
    pub jid: String,
    /// Before.
    pub old: Affiliation,
    /// After.
    pub new: Affiliation,
    /// The occupants with that bare JID, after the change; role `None` when they were removed
    /// (banned, or no longer a member of a members-only room).
    pub occupants: Vec<Occupant>,
}

/// A configuration change that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigChanged {
    /// Names of the [`RoomConfig`] fields that changed.
    pub changed: Vec<&'static str>,
    /// The room was locked and is now open (created).
    pub unlocked: bool,
    /// Occupants removed because the room became members-only (status 322).
    pub removed: Vec<Occupant>,
    /// Occupants who stay with another role: moderation or members' voice changed.
    pub roles_changed: Vec<Occupant>,
}

/// An occupant removed by a change it did not make itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    /// The occupant as it was, with role `None`.
    pub occupant: Occupant,
    /// Why it had to leave.
    pub why: Removal,
    /// The reason recorded with its new affiliation (a ban's reason), if any.
    pub reason: Option<String>,
}

/// What taking over a record saved by another server of the pool did to this server's
/// occupants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordAdopted {
    /// Names of the [`RoomConfig`] fields that changed.
    pub changed: Vec<&'static str>,
    /// The subject changed.
    pub subject_changed: bool,
    /// Occupants who may no longer stay (banned, no longer members, not members of a room
    /// that became members-only), now out of the room.
    pub removed: Vec<Removed>,
    /// Occupants who stay with another affiliation or role.
    pub occupants_changed: Vec<Occupant>,
}

/// An invitation that may be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invited {
    /// The invitee was made a member.
    pub became_member: bool,
}

/// Why a configuration is refused: the field and a sentence for the user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The [`RoomConfig`] field.
    pub field: &'static str,
    /// What is wrong and what is accepted.
    pub reason: String,
}

/// Checks a configuration against pchat's bounds.
pub fn validate_config(c: &RoomConfig, limits: &Limits) -> Result<(), ConfigError> {
    let err = |field, reason: String| Err(ConfigError { field, reason });
    if c.name.chars().count() > NAME_CHARS_MAX {
        return err("name", format!("at most {NAME_CHARS_MAX} characters"));
    }
    if c.description.chars().count() > DESCRIPTION_CHARS_MAX {
        return err(
            "description",
            format!("at most {DESCRIPTION_CHARS_MAX} characters"),
        );
    }
    if let Some(pw) = &c.password {
        if pw.is_empty() || pw.chars().count() > PASSWORD_CHARS_MAX {
            return err(
                "password",
                format!("a password needs 1 to {PASSWORD_CHARS_MAX} characters"),
            );
        }
    }
    if c.history_stanzas_max > HISTORY_FETCH_STANZAS_LIMIT {
        return err(
            "history_stanzas_max",
            format!("at most {HISTORY_FETCH_STANZAS_LIMIT}"),
        );
    }
    if c.history_stanzas_default > HISTORY_DEFAULT_STANZAS_LIMIT {
        return err(
            "history_stanzas_default",
            format!("at most {HISTORY_DEFAULT_STANZAS_LIMIT}"),
        );
    }
    if c.history_stanzas_default > c.history_stanzas_max {
        return err(
            "history_stanzas_default",
            "must not exceed the maximum history fetch".into(),
        );
    }
    if limits.occupants_max != 0 && c.occupants_max > limits.occupants_max {
        return err(
            "occupants_max",
            format!("at most {} (the service limit)", limits.occupants_max),
        );
    }
    if c.language.chars().count() > LANGUAGE_CHARS_MAX
        || !c
            .language
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
    {
        return err("language", "a language tag such as en or pt-BR".into());
    }
    Ok(())
}

/// Names of the fields that differ between two configurations, in declaration order.
pub fn config_diff(a: &RoomConfig, b: &RoomConfig) -> Vec<&'static str> {
    let mut d = Vec::new();
    let mut f = |name, changed: bool| {
        if changed {
            d.push(name);
        }
    };
    f("name", a.name != b.name);
    f("description", a.description != b.description);
    f("persistent", a.persistent != b.persistent);
    f("public", a.public != b.public);
    f("members_only", a.members_only != b.members_only);
    f("moderated", a.moderated != b.moderated);
    f("password", a.password != b.password);
    f("whois", a.whois != b.whois);
    f(
        "history_stanzas_max",
        a.history_stanzas_max != b.history_stanzas_max,
    );
    f(
        "history_stanzas_default",
        a.history_stanzas_default != b.history_stanzas_default,
    );
    f("occupants_max", a.occupants_max != b.occupants_max);
    f(
        "subject_changeable",
        a.subject_changeable != b.subject_changeable,
    );
    f(
        "members_may_invite",
        a.members_may_invite != b.members_may_invite,
    );
    f("allow_pm", a.allow_pm != b.allow_pm);
    f(
        "presence_broadcast_occupants_max",
        a.presence_broadcast_occupants_max != b.presence_broadcast_occupants_max,
    );
    f("language", a.language != b.language);
    f(
        "members_have_voice",
        a.members_have_voice != b.members_have_voice,
    );
    d
}

fn group_affiliations(
    affiliations: &BTreeMap<String, (Affiliation, Option<String>)>,
) -> Vec<(String, Affiliation)> {
    affiliations
        .iter()
        .filter_map(|(j, (a, _))| Some((crate::directory::group_entry(j)?.to_owned(), *a)))
        .filter(|(_, a)| *a != Affiliation::Outcast)
        .collect()
}

/// A room: durable record and live occupants.
#[derive(Clone, Debug)]
pub struct Room {
    jid: String,
    config: RoomConfig,
    /// Bare JID → (affiliation other than none, reason).
    affiliations: BTreeMap<String, (Affiliation, Option<String>)>,
    voice: BTreeSet<String>,
    subject: Option<Subject>,
    created_at: Timestamp,
    limits: Limits,
    /// Nick → occupant.
    occupants: BTreeMap<String, Occupant>,
    /// Session full JID → nick, so a stanza's sender is found without a scan.
    sessions: HashMap<String, String>,
    /// Bare JID → number of occupants (nicks) it holds, so visibility checks, asked for every
    /// room of a disco#items listing, do not scan the occupants.
    bare_occupants: HashMap<String, usize>,
    locked: bool,
    /// Created by `new_locked` and its creator has not entered yet (status 201 is still due).
    awaiting_creator: bool,
    destroyed: bool,
    /// The category (its wall) and whether the room is disabled: see [`Room::allowed`].
    category: String,
    disabled: bool,
    /// Invitations off for this room whatever its category says.
    invitations_off: bool,
    addin: Option<String>,
    /// The directory as compiled when it was last read: walls and groups.
    access: Arc<Access>,
    /// Affiliations given to groups (`group:NAME` entries), which a user holds through its
    /// groups when it has none of its own.
    group_affiliations: Vec<(String, Affiliation)>,
}

impl Room {
    /// A room from its durable record (loaded at start-up or on demand): open, no occupants.
    pub fn from_record(record: RoomRecord, limits: Limits) -> Self {
        let affiliations: BTreeMap<String, (Affiliation, Option<String>)> = record
            .affiliations
            .into_iter()
            .filter(|e| e.affiliation != Affiliation::None)
            .map(|e| (e.jid.to_lowercase(), (e.affiliation, e.reason)))
            .collect();
        Room {
            group_affiliations: group_affiliations(&affiliations),
            category: record.category,
            disabled: record.disabled,
            invitations_off: record.invitations_off,
            addin: record.addin,
            access: Access::open(),
            jid: record.jid.to_lowercase(),
            config: record.config,
            affiliations,
            voice: record.voice.into_iter().map(|j| j.to_lowercase()).collect(),
            subject: record.subject,
            created_at: record.created_at,
            limits,
            occupants: BTreeMap::new(),
            sessions: HashMap::new(),
            bare_occupants: HashMap::new(),
            locked: false,
            awaiting_creator: false,
            destroyed: false,
        }
    }

    /// A new room, locked until its owner configures it (XEP-0045 §10.1): `creator` is its
    /// first owner and the only one who may enter meanwhile.
    pub fn new_locked(
        jid: &str,
        creator: &str,
        config: RoomConfig,
        now: Timestamp,
        limits: Limits,
    ) -> Self {
        let record = RoomRecord {
            jid: jid.to_lowercase(),
            config,
            affiliations: vec![AffiliationEntry {
                jid: bare_jid(creator),
                affiliation: Affiliation::Owner,
                reason: None,
            }],
            voice: Vec::new(),
            subject: None,
            created_at: now,
            category: crate::directory::DEFAULT_CATEGORY.to_owned(),
            disabled: false,
            invitations_off: false,
            addin: None,
        };
        let mut room = Room::from_record(record, limits);
        room.locked = true;
        room.awaiting_creator = true;
        room
    }

    /// Takes over a newer durable record written by another server of the pool (subject,
    /// configuration, affiliations, voice list) and applies to this server's occupants what
    /// the server that made the change applied to its own: whoever may no longer stay is
    /// removed, and roles follow changed affiliations, moderation and voice list, by the same
    /// rules ([`removal_rule`], [`role_after_change`]) as a change made here.
    pub fn adopt_record(&mut self, record: RoomRecord) -> RecordAdopted {
        let Room {
            config,
            affiliations,
            voice,
            subject,
            category,
            disabled,
            invitations_off,
            addin,
            group_affiliations,
            ..
        } = Room::from_record(record, self.limits);
        self.addin = addin;
        self.invitations_off = invitations_off;
        let old_config = std::mem::replace(&mut self.config, config);
        let old_voice = std::mem::replace(&mut self.voice, voice);
        self.affiliations = affiliations;
        self.group_affiliations = group_affiliations;
        let walls_changed = self.category != category || self.disabled != disabled;
        self.category = category;
        self.disabled = disabled;
        let subject_changed = self.subject != subject;
        self.subject = subject;
        let (removed, occupants_changed) = self.reconcile_occupants(&old_config, &old_voice);
        let mut changed = config_diff(&old_config, &self.config);
        if walls_changed {
            changed.push("category");
        }
        RecordAdopted {
            changed,
            subject_changed,
            removed,
            occupants_changed,
        }
    }

    /// Brings the occupants in line with the record after it changed from `old_config` and
    /// `old_voice` (the affiliation an occupant carries is the one it had before): removes
    /// those who may no longer stay, and gives the others the affiliation and role they now
    /// have. Returns the removed and the changed occupants, in nick order.
    fn reconcile_occupants(
        &mut self,
        old_config: &RoomConfig,
        old_voice: &BTreeSet<String>,
    ) -> (Vec<Removed>, Vec<Occupant>) {
        let voice_rules_changed = old_config.moderated != self.config.moderated
            || old_config.members_have_voice != self.config.members_have_voice;
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        let nicks: Vec<String> = self.occupants.keys().cloned().collect();
        for nick in nicks {
            let Some(o) = self.occupants.get(&nick) else {
                continue;
            };
            let old_aff = o.affiliation;
            let reason = self
                .affiliations
                .get(&o.bare_jid)
                .and_then(|(_, r)| r.clone());
            let new_aff = self.affiliation(&o.bare_jid);
            // A category this directory does not know yet (the room was moved into one made
            // a moment ago, and the new directory is still being read) removes nobody: new
            // joins are refused meanwhile, and the new directory decides.
            let walled = if self.disabled {
                Some(Removal::Disabled)
            } else if self.access.has_category(&self.category)
                && !self.access.allows(&self.category, &o.bare_jid)
            {
                Some(Removal::Walled)
            } else {
                None
            };
            if let Some(why) =
                walled.or_else(|| removal_rule(old_aff, new_aff, self.config.members_only))
            {
                removed.extend(self.remove_occupant(&nick).map(|mut occupant| {
                    occupant.affiliation = new_aff;
                    Removed {
                        occupant,
                        why,
                        reason,
                    }
                }));
                continue;
            }
            let in_voice = self.has_voice(&o.bare_jid);
            // Voice by a group follows the group: in a moderated room, a visitor who is now
            // a presenter through it, or a participant who no longer is, has a role to change
            // (the rule below gives the same role back where nothing changed).
            let by_group = self.config.moderated
                && matches!(o.role, Role::Visitor | Role::Participant)
                && in_voice != (o.role == Role::Participant);
            let voice_changed = voice_rules_changed
                || by_group
                || self.voice.contains(&o.bare_jid) != old_voice.contains(&o.bare_jid);
            let role = role_after_change(
                o.role,
                new_aff,
                new_aff != old_aff,
                voice_changed,
                &self.config,
                in_voice,
            );
            if role == o.role && new_aff == old_aff {
                continue;
            }
            if let Some(o) = self.occupants.get_mut(&nick) {
                o.role = role;
                o.affiliation = new_aff;
                changed.push(o.clone());
            }
        }
        (removed, changed)
    }

    /// The durable record as it is now.
    pub fn record(&self) -> RoomRecord {
        RoomRecord {
            jid: self.jid.clone(),
            config: self.config.clone(),
            affiliations: self
                .affiliations
                .iter()
                .map(|(jid, (affiliation, reason))| AffiliationEntry {
                    jid: jid.clone(),
                    affiliation: *affiliation,
                    reason: reason.clone(),
                })
                .collect(),
            voice: self.voice.iter().cloned().collect(),
            subject: self.subject.clone(),
            created_at: self.created_at,
            category: self.category.clone(),
            disabled: self.disabled,
            invitations_off: self.invitations_off,
            addin: self.addin.clone(),
        }
    }

    /// The room's add-in and its URL, when the add-in exists.
    pub fn addin(&self) -> Option<(&str, &str)> {
        let name = self.addin.as_deref()?;
        Some((name, self.access.addin_url(name)?))
    }

    /// The category the room is in.
    pub fn category(&self) -> &str {
        &self.category
    }

    /// Disabled: nobody may find, join or read it.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The directory the room decides with.
    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    /// May `bare` be in this room at all: the room is enabled and its category's wall
    /// allows the user (allowed and not denied). Checked before any affiliation: a member
    /// the wall now excludes is no member.
    pub fn allowed(&self, bare: &str) -> bool {
        !self.disabled && self.access.allows(&self.category, &bare.to_lowercase())
    }

    /// Takes a newly compiled directory (walls or groups changed) and removes the occupants
    /// it no longer allows (or whose affiliation through a group no longer lets them stay),
    /// as a record change would; roles follow affiliations held through groups.
    pub fn set_access(&mut self, access: Arc<Access>) -> RecordAdopted {
        self.access = access;
        self.follow_service_settings();
        let (config, voice) = (self.config.clone(), self.voice.clone());
        let (removed, occupants_changed) = self.reconcile_occupants(&config, &voice);
        RecordAdopted {
            removed,
            occupants_changed,
            ..RecordAdopted::default()
        }
    }

    /// Bare room JID.
    pub fn jid(&self) -> &str {
        &self.jid
    }

    /// Configuration.
    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    /// When the room was created (a room destroyed and created again has a new time).
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// Current subject.
    pub fn subject(&self) -> Option<&Subject> {
        self.subject.as_ref()
    }

    /// Service bounds.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Awaiting its initial configuration.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Destroyed by its owner (or by cancelling its initial configuration).
    pub fn is_destroyed(&self) -> bool {
        self.destroyed
    }

    /// Effective occupant limit: the room's own, else the service's; 0 = unlimited.
    pub fn occupants_max(&self) -> u32 {
        match (self.config.occupants_max, self.limits.occupants_max) {
            (0, service) => service,
            (room, 0) => room,
            (room, service) => room.min(service),
        }
    }

    /// Affiliation of a bare JID (`none` when not listed): its own entry, else the highest
    /// affiliation a group it is in holds (an outcast entry of its own always wins; a group
    /// cannot ban, only the user's own entry can).
    pub fn affiliation(&self, bare: &str) -> Affiliation {
        let bare = bare.to_lowercase();
        if let Some((a, _)) = self.affiliations.get(&bare) {
            return *a;
        }
        if self.group_affiliations.is_empty() {
            return Affiliation::None;
        }
        self.group_affiliations
            .iter()
            .filter(|(g, _)| self.access.in_group(g, &bare))
            .map(|(_, a)| *a)
            .max()
            .unwrap_or(Affiliation::None)
    }

    /// Users with this affiliation, with the reason recorded, in JID order.
    pub fn affiliated(
        &self,
        affiliation: Affiliation,
    ) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.affiliations
            .iter()
            .filter(move |(_, (a, _))| *a == affiliation)
            .map(|(j, (_, r))| (j.as_str(), r.as_deref()))
    }

    /// Number of owners.
    pub fn owners_count(&self) -> usize {
        self.affiliated(Affiliation::Owner).count()
    }

    /// On the durable voice list.
    /// Presenters (the voice list) are users and groups (`group:X`, `ldap:X`, `ou:X`).
    pub fn has_voice(&self, bare: &str) -> bool {
        let bare = bare.to_lowercase();
        self.voice.contains(&bare)
            || self.voice.iter().any(|v| {
                crate::directory::group_entry(v).is_some_and(|g| self.access.in_group(g, &bare))
            })
    }

    /// Occupant by nick.
    pub fn occupant(&self, nick: &str) -> Option<&Occupant> {
        self.occupants.get(nick)
    }

    /// Occupant a session belongs to.
    pub fn occupant_by_session(&self, full_jid: &str) -> Option<&Occupant> {
        self.sessions
            .get(full_jid)
            .and_then(|nick| self.occupants.get(nick))
    }

    /// True when this bare JID is in the room under any nick.
    pub fn has_occupant_bare(&self, bare: &str) -> bool {
        self.bare_occupants.contains_key(&bare.to_lowercase())
    }

    fn count_bare(&mut self, bare: &str, added: bool) {
        if added {
            *self.bare_occupants.entry(bare.to_owned()).or_insert(0) += 1;
        } else if let Some(n) = self.bare_occupants.get_mut(bare) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.bare_occupants.remove(bare);
            }
        }
    }

    /// Occupants in nick order.
    pub fn occupants(&self) -> impl Iterator<Item = &Occupant> {
        self.occupants.values()
    }

    /// Number of occupants (nicks, not sessions).
    pub fn occupant_count(&self) -> usize {
        self.occupants.len()
    }

    /// May this bare JID learn that the room exists (disco#info, IQs, messages)? Locked rooms:
    /// their owner only. Hidden or members-only rooms: occupants and members and above only,
    /// so a secret room never leaks (I8). Others: everyone.
    pub fn may_discover(&self, bare: &str) -> bool {
        if self.destroyed || !self.allowed(bare) {
            return false;
        }
        let aff = self.affiliation(bare);
        if self.locked {
            return aff == Affiliation::Owner;
        }
        if self.config.public && !self.config.members_only {
            return true;
        }
        aff >= Affiliation::Member || self.has_occupant_bare(bare)
    }

    /// Listed in the service's disco#items for this bare JID: public rooms for everyone,
    /// hidden rooms for occupants and members and above, locked rooms for their owner.
    pub fn visible_to(&self, bare: &str) -> bool {
        if self.destroyed || !self.allowed(bare) {
            return false;
        }
        let aff = self.affiliation(bare);
        if self.locked {
            return aff == Affiliation::Owner;
        }
        self.config.public || aff >= Affiliation::Member || self.has_occupant_bare(bare)
    }

    /// May this bare JID read the archive: members-only rooms, members and above; other rooms,
    /// anyone not banned. A locked room has no archive anyone but its owner may ask about.
    pub fn can_read_archive(&self, bare: &str) -> bool {
        if self.destroyed || !self.allowed(bare) {
            return false;
        }
        let aff = self.affiliation(bare);
        if self.locked {
            return aff == Affiliation::Owner;
        }
        if self.config.members_only {
            aff >= Affiliation::Member
        } else {
            aff != Affiliation::Outcast
        }
    }

    /// True when the room should go: destroyed; or no occupant left and either temporary or
    /// still locked (a room never configured never existed for anyone else).
    pub fn should_delete(&self) -> bool {
        self.destroyed || (self.occupants.is_empty() && (!self.config.persistent || self.locked))
    }

    /// The role this bare JID gets on entering now.
    pub fn default_role(&self, bare: &str) -> Role {
        role_for(self.affiliation(bare), &self.config, self.has_voice(bare))
    }

    /// Takes the service's DefaultChatHistory and ParticipantUpdateLimit for the values the
    /// owner did not set (`pchat config`); a setting left to the configuration file changes
    /// nothing.
    fn follow_service_settings(&mut self) {
        let s = self.access.settings();
        if !self.config.history_is_own() {
            if let Some(h) = s.default_chat_history {
                self.config.history_stanzas_default = h.min(self.config.history_stanzas_max);
            }
        }
        if !self.config.presence_limit_is_own() {
            if let Some(p) = s.participant_update_limit {
                self.config.presence_broadcast_occupants_max = p;
            }
        }
    }

    /// Longest nick, in characters.
    pub fn nick_chars_max(&self) -> usize {
        self.limits.nick_chars_max as usize
    }

    fn nick_holder(&self, nick: &str, bare: &str) -> NickHolder {
        match self.occupants.get(nick) {
            Some(o) if o.bare_jid == bare => NickHolder::SameUser,
            Some(_) => NickHolder::OtherUser,
            // `Alice` is taken when `alice` is in (RFC 8266 compares without case).
            None if self
                .occupants
                .values()
                .any(|o| o.bare_jid != bare && crate::rules::same_nick(&o.nick, nick)) =>
            {
                NickHolder::OtherUser
            }
            None => NickHolder::Free,
        }
    }

    /// Checks a join without applying it.
    pub fn check_join(&self, req: &JoinRequest<'_>) -> Result<JoinKind, Refusal> {
        let bare = bare_jid(req.full_jid);
        if !self.allowed(&bare) {
            // Outside the wall (or disabled), the room does not exist (Lync: a user the
            // category does not allow cannot even find its rooms).
            return Err(Refusal::RoomHidden);
        }
        join_rule(&JoinInput {
            nick: req.nick,
            nick_chars_max: self.limits.nick_chars_max as usize,
            locked: self.locked,
            affiliation: self.affiliation(&bare),
            members_only: self.config.members_only,
            public: self.config.public,
            password: self.config.password.as_deref(),
            password_given: req.password,
            nick_holder: self.nick_holder(req.nick, &bare),
            occupant_count: self.occupants.len(),
            occupants_max: self.occupants_max(),
        })
    }

    /// Enters a session into the room. The caller has checked that the session is not
    /// already in (that is a presence update or a nick change, not a join).
    pub fn join(&mut self, req: &JoinRequest<'_>) -> Result<Joined, Refusal> {
        if self.destroyed {
            return Err(Refusal::RoomLocked);
        }
        let kind = self.check_join(req)?;
        let bare = bare_jid(req.full_jid);
        let affiliation = self.affiliation(&bare);
        let role = match kind {
            JoinKind::NewOccupant => {
                let role = self.default_role(&bare);
                self.count_bare(&bare, true);
                self.occupants.insert(
                    req.nick.to_owned(),
                    Occupant {
                        nick: req.nick.to_owned(),
                        bare_jid: bare,
                        sessions: vec![req.full_jid.to_owned()],
                        role,
                        affiliation,
                    },
                );
                role
            }
            JoinKind::AddSession => {
                let o = self
                    .occupants
                    .get_mut(req.nick)
                    .ok_or(Refusal::NoSuchOccupant)?;
                o.sessions.push(req.full_jid.to_owned());
                o.role
            }
        };
        self.sessions
            .insert(req.full_jid.to_owned(), req.nick.to_owned());
        let created = std::mem::take(&mut self.awaiting_creator);
        Ok(Joined {
            kind,
            created,
            role,
            affiliation,
        })
    }

    /// Marks `full_jid` as its occupant's latest session (it just updated its presence).
    pub fn touch_session(&mut self, full_jid: &str) {
        if let Some(o) = self
            .sessions
            .get(full_jid)
            .and_then(|n| self.occupants.get_mut(n))
        {
            if let Some(i) = o.sessions.iter().position(|s| s == full_jid) {
                let s = o.sessions.remove(i);
                o.sessions.push(s);
            }
        }
    }

    /// Changes the nick of the session's occupant (XEP-0045 §7.6). Returns the old nick.
    pub fn change_nick(&mut self, full_jid: &str, new_nick: &str) -> Result<String, Refusal> {
        let old = self
            .sessions
            .get(full_jid)
            .cloned()
            .ok_or(Refusal::NotOccupant)?;
        if old == new_nick {
            return Ok(old);
        }
        nick_rule(new_nick, self.limits.nick_chars_max as usize)?;
        if self.occupants.contains_key(new_nick)
            || self
                .occupants
                .values()
                .any(|o| o.nick != old && crate::rules::same_nick(&o.nick, new_nick))
        {
            return Err(Refusal::NickConflict);
        }
        let mut o = self.occupants.remove(&old).ok_or(Refusal::NotOccupant)?;
        if o.sessions.len() > 1 {
            self.occupants.insert(old, o);
            return Err(Refusal::MultiSessionNickChange);
        }
        o.nick = new_nick.to_owned();
        for s in &o.sessions {
            self.sessions.insert(s.clone(), new_nick.to_owned());
        }
        self.occupants.insert(new_nick.to_owned(), o);
        Ok(old)
    }

    /// Removes a session; the occupant goes when it was its last.
    pub fn leave(&mut self, full_jid: &str) -> Option<Left> {
        let nick = self.sessions.remove(full_jid)?;
        let o = self.occupants.get_mut(&nick)?;
        let before = o.clone();
        o.sessions.retain(|s| s != full_jid);
        let gone = o.sessions.is_empty();
        if gone {
            self.occupants.remove(&nick);
            self.count_bare(&before.bare_jid, false);
        }
        Some(Left {
            occupant: before,
            gone,
        })
    }

    fn remove_occupant(&mut self, nick: &str) -> Option<Occupant> {
        let mut o = self.occupants.remove(nick)?;
        self.count_bare(&o.bare_jid, false);
        for s in &o.sessions {
            self.sessions.remove(s);
        }
        o.role = Role::None;
        Some(o)
    }

    /// May this session send a groupchat message now?
    pub fn check_groupchat(&self, full_jid: &str) -> Result<&Occupant, Refusal> {
        let o = self
            .occupant_by_session(full_jid)
            .ok_or(Refusal::NotOccupant)?;
        speak_rule(o.role)?;
        Ok(o)
    }

    /// Changes the subject (XEP-0045 §8.1).
    pub fn set_subject(
        &mut self,
        full_jid: &str,
        text: &str,
        now: Timestamp,
    ) -> Result<Subject, Refusal> {
        let o = self
            .occupant_by_session(full_jid)
            .ok_or(Refusal::NotOccupant)?;
        subject_rule(o.role, self.config.subject_changeable)?;
        let subject = Subject {
            text: text.to_owned(),
            nick: o.nick.clone(),
            at: now,
        };
        self.subject = Some(subject.clone());
        Ok(subject)
    }

    /// May this session send a private message to `to_nick`? Returns (sender, recipient).
    pub fn check_private_message(
        &self,
        full_jid: &str,
        to_nick: &str,
    ) -> Result<(&Occupant, &Occupant), Refusal> {
        let from = self
            .occupant_by_session(full_jid)
            .ok_or(Refusal::NotOccupant)?;
        private_message_rule(from.role, self.config.allow_pm)?;
        let to = self.occupants.get(to_nick).ok_or(Refusal::NoSuchOccupant)?;
        Ok((from, to))
    }

    /// An invitation from `inviter_full` to `invitee` (any JID; its bare part matters).
    pub fn invite(&mut self, inviter_full: &str, invitee: &str) -> Result<Invited, Refusal> {
        let role = self
            .occupant_by_session(inviter_full)
            .map_or(Role::None, |o| o.role);
        let aff = self.affiliation(&bare_jid(inviter_full));
        let invitee_bare = bare_jid(invitee);
        if self.invitations_off || !self.access.flags(&self.category).invitations {
            return Err(Refusal::InvitationsOff);
        }
        if !self.allowed(&invitee_bare) {
            return Err(Refusal::InviteeWalled);
        }
        let InviteGrant { adds_member } = invite_rule(
            role,
            aff,
            self.config.members_only,
            self.config.members_may_invite,
            self.affiliation(&invitee_bare),
        )?;
        if adds_member {
            self.put_affiliation(&invitee_bare, Affiliation::Member, None);
        }
        Ok(Invited {
            became_member: adds_member,
        })
    }

    fn put_affiliation(&mut self, bare: &str, aff: Affiliation, reason: Option<String>) {
        if aff == Affiliation::None {
            self.affiliations.remove(bare);
        } else {
            self.affiliations.insert(bare.to_owned(), (aff, reason));
        }
        if crate::directory::group_entry(bare).is_some() {
            self.group_affiliations = group_affiliations(&self.affiliations);
        }
        for o in self.occupants.values_mut().filter(|o| o.bare_jid == bare) {
            o.affiliation = aff;
        }
    }

    /// Changes the role of the occupant `target_nick` (kick = role none, voice, moderator).
    pub fn set_role(
        &mut self,
        actor_full: &str,
        target_nick: &str,
        new: Role,
    ) -> Result<RoleChanged, Refusal> {
        let actor = self
            .occupant_by_session(actor_full)
            .ok_or(Refusal::NotPermitted)?;
        self.change_role((actor.role, actor.affiliation), target_nick, new)
    }

    /// Changes the role of the occupant `target_nick` on the authority of an actor with this
    /// role and affiliation: an occupant here ([`Room::set_role`]) or, in a pool, a moderator
    /// on another server whose decision reached this server, which holds the occupant. The
    /// rule is checked again here: the target may have changed since it was decided.
    pub fn change_role(
        &mut self,
        actor: (Role, Affiliation),
        target_nick: &str,
        new: Role,
    ) -> Result<RoleChanged, Refusal> {
        let target = self
            .occupants
            .get(target_nick)
            .ok_or(Refusal::NoSuchOccupant)?;
        let old_role = target.role;
        role_change_rule(actor, (target.role, target.affiliation), new)?;
        if new == Role::None {
            let occupant = self
                .remove_occupant(target_nick)
                .ok_or(Refusal::NoSuchOccupant)?;
            return Ok(RoleChanged {
                occupant,
                old_role,
                voice_changed: false,
            });
        }
        let bare = target.bare_jid.clone();
        let without_voice = role_for(target.affiliation, &self.config, false);
        // The voice list is the durable part of roles (Lync Presenters): it records who was
        // given voice beyond what the affiliation grants, and forgets whoever was silenced.
        let voice_changed = if new == Role::Visitor {
            self.voice.remove(&bare)
        } else if without_voice == Role::Visitor && new >= Role::Participant {
            self.voice.insert(bare)
        } else {
            false
        };
        let o = self
            .occupants
            .get_mut(target_nick)
            .ok_or(Refusal::NoSuchOccupant)?;
        o.role = new;
        Ok(RoleChanged {
            occupant: o.clone(),
            old_role,
            voice_changed,
        })
    }

    /// Changes the affiliation of a bare JID, in or out of the room.
    pub fn set_affiliation(
        &mut self,
        actor_bare: &str,
        target: &str,
        new: Affiliation,
        reason: Option<String>,
    ) -> Result<AffiliationChanged, Refusal> {
        let target = bare_jid(target);
        let old = self.affiliation(&target);
        affiliation_change_rule(self.affiliation(actor_bare), old, new, self.owners_count())?;
        if new >= Affiliation::Member && !self.access.allows(&self.category, &target) {
            // Lync: "users cannot be added as a member of a chat room if the parent category
            // prevents it". A ban is always possible.
            return Err(Refusal::TargetWalled);
        }
        self.put_affiliation(&target, new, reason);
        let removed = removal_rule(old, new, self.config.members_only).is_some();
        let nicks: Vec<String> = self
            .occupants
            .values()
            .filter(|o| o.bare_jid == target)
            .map(|o| o.nick.clone())
            .collect();
        let mut occupants = Vec::with_capacity(nicks.len());
        for nick in nicks {
            if removed {
                occupants.extend(self.remove_occupant(&nick));
            } else {
                let role = self.default_role(&target);
                if let Some(o) = self.occupants.get_mut(&nick) {
                    o.role = role;
                    occupants.push(o.clone());
                }
            }
        }
        Ok(AffiliationChanged {
            jid: target,
            old,
            new,
            occupants,
        })
    }

    /// Applies a submitted configuration (owners only). Unlocks a locked room; removes
    /// non-members when the room becomes members-only.
    pub fn set_config(
        &mut self,
        actor_bare: &str,
        config: RoomConfig,
    ) -> Result<ConfigChanged, Refusal> {
        if self.affiliation(actor_bare) != Affiliation::Owner {
            return Err(Refusal::NotPermitted);
        }
        let mut config = config;
        // A value the owner changes is the room's own from then on; one left as it was keeps
        // following the service's setting.
        config.history_default_own = Some(
            self.config.history_is_own()
                || config.history_stanzas_default != self.config.history_stanzas_default,
        );
        config.presence_limit_own = Some(
            self.config.presence_limit_is_own()
                || config.presence_broadcast_occupants_max
                    != self.config.presence_broadcast_occupants_max,
        );
        let changed = config_diff(&self.config, &config);
        let old_config = std::mem::replace(&mut self.config, config);
        let unlocked = std::mem::take(&mut self.locked);
        // The same reconciliation as for another server's change: non-members leave a room
        // that became members-only, and roles follow moderation.
        let voice = self.voice.clone();
        let (removed, roles_changed) = self.reconcile_occupants(&old_config, &voice);
        Ok(ConfigChanged {
            changed,
            unlocked,
            removed: removed.into_iter().map(|r| r.occupant).collect(),
            roles_changed,
        })
    }

    /// Destroys the room (owners only): every occupant is removed.
    pub fn destroy(&mut self, actor_bare: &str) -> Result<Vec<Occupant>, Refusal> {
        if self.affiliation(actor_bare) != Affiliation::Owner {
            return Err(Refusal::NotPermitted);
        }
        self.destroyed = true;
        Ok(self.clear_occupants())
    }

    /// The room was destroyed on another server of the pool: it is gone here too, and its
    /// occupants with it (returned, role `None`). Nothing is left to delete: the server that
    /// destroyed it did.
    pub fn destroyed_elsewhere(&mut self) -> Vec<Occupant> {
        self.destroyed = true;
        self.clear_occupants()
    }

    /// Removes every occupant (service shutdown, destruction), returning them.
    pub fn clear_occupants(&mut self) -> Vec<Occupant> {
        self.sessions.clear();
        self.bare_occupants.clear();
        std::mem::take(&mut self.occupants)
            .into_values()
            .map(|mut o| {
                o.role = Role::None;
                o
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AllowPm, Whois};
    use crate::Removal;

    const ROOM: &str = "room@conference.x";

    fn limits() -> Limits {
        Limits {
            occupants_max: 3,
            nick_chars_max: 16,
        }
    }

    fn room_with(config: RoomConfig, affs: &[(&str, Affiliation)]) -> Room {
        let record = RoomRecord {
            jid: ROOM.into(),
            config,
            affiliations: affs
                .iter()
                .map(|(j, a)| AffiliationEntry {
                    jid: (*j).into(),
                    affiliation: *a,
                    reason: None,
                })
                .collect(),
            voice: Vec::new(),
            subject: None,
            created_at: Timestamp(0),
            category: crate::directory::DEFAULT_CATEGORY.into(),
            disabled: false,
            invitations_off: false,
            addin: None,
        };
        Room::from_record(record, limits())
    }

    #[test]
    fn service_settings_reach_rooms_that_follow_them_and_spare_their_owners_values() {
        use crate::directory::{Directory, Settings};
        let access = |history: u32| {
            let d = Directory {
                settings: Settings {
                    default_chat_history: Some(history),
                    participant_update_limit: Some(20),
                    ..Settings::default()
                },
                ..Directory::default()
            };
            Arc::new(Access::compile(&d, 1))
        };
        // A new room follows.
        let mut r = room_with(RoomConfig::default(), &[("o@x", Affiliation::Owner)]);
        r.set_access(access(7));
        assert_eq!(r.config().history_stanzas_default, 7);
        assert_eq!(r.config().presence_broadcast_occupants_max, 20);
        // Records saved before the flags: a value the owner changed stays, the default follows.
        let legacy = |history: u32| -> RoomConfig {
            serde_json::from_value(serde_json::json!({
                "history_stanzas_default": history,
                "history_stanzas_max": 500,
            }))
            .unwrap()
        };
        assert_eq!(legacy(5).history_default_own, None);
        let mut custom = room_with(legacy(5), &[("o@x", Affiliation::Owner)]);
        custom.set_access(access(7));
        assert_eq!(custom.config().history_stanzas_default, 5);
        let mut plain = room_with(legacy(30), &[("o@x", Affiliation::Owner)]);
        plain.set_access(access(7));
        assert_eq!(plain.config().history_stanzas_default, 7);
        // An owner's form that changes the value makes it the room's from then on.
        let mut c = r.config().clone();
        c.history_stanzas_default = 12;
        r.set_config("o@x", c).unwrap();
        r.set_access(access(9));
        assert_eq!(r.config().history_stanzas_default, 12);
        assert_eq!(r.config().history_default_own, Some(true));
    }

    fn join(room: &mut Room, full: &str, nick: &str) -> Result<Joined, Refusal> {
        room.join(&JoinRequest {
            full_jid: full,
            nick,
            password: None,
        })
    }

    fn standard() -> Room {
        let mut r = room_with(
            RoomConfig::default(),
            &[
                ("owner@x", Affiliation::Owner),
                ("admin@x", Affiliation::Admin),
                ("member@x", Affiliation::Member),
            ],
        );
        for (full, nick) in [
            ("owner@x/a", "owner"),
            ("admin@x/a", "admin"),
            ("member@x/a", "member"),
        ] {
            join(&mut r, full, nick).unwrap();
        }
        r
    }

    /// A wall removes whoever it no longer allows, with [`Removal::Walled`], and a group's
    /// affiliation counts; a category the directory does not know yet removes nobody (the
    /// next directory decides) but lets nobody new in.
    #[test]
    fn walls_remove_occupants_and_an_unknown_category_waits() {
        use crate::directory::{Access, Category, Directory, Group, Principal};
        let p = |s: &str| Principal::parse(s).unwrap();
        let mut r = standard();
        let mut record = r.record();
        record.category = "fresh".into();
        let adopted = r.adopt_record(record);
        assert!(
            adopted.removed.is_empty(),
            "unknown category: nobody removed"
        );
        assert_eq!(join(&mut r, "new@x/a", "new"), Err(Refusal::RoomHidden));
        let mut d = Directory::default();
        d.groups.insert(
            "staff".into(),
            Group {
                members: [p("owner@x"), p("member@x")].into(),
                ..Group::default()
            },
        );
        d.categories.insert(
            "fresh".into(),
            Category {
                allowed: [p("group:staff")].into(),
                ..Category::default()
            },
        );
        let adopted = r.set_access(std::sync::Arc::new(Access::compile(&d, 2)));
        let gone: Vec<_> = adopted
            .removed
            .iter()
            .map(|x| (x.occupant.nick.as_str(), x.why))
            .collect();
        assert_eq!(gone, [("admin", Removal::Walled)]);
        assert!(r.allowed("member@x") && !r.allowed("admin@x"));
        r.check_invariants();
    }

    #[test]
    fn locked_room_lifecycle() {
        let mut r = Room::new_locked(
            ROOM,
            "Creator@X/res",
            RoomConfig::default(),
            Timestamp(5),
            limits(),
        );
        assert!(r.is_locked());
        assert!(r.should_delete(), "a locked empty room never existed");
        assert_eq!(join(&mut r, "other@x/r", "o"), Err(Refusal::RoomLocked));
        let j = join(&mut r, "creator@x/res", "c").unwrap();
        assert!(j.created);
        assert_eq!(j.role, Role::Moderator);
        assert!(!r.should_delete());
        // Only the first join is the creation.
        assert!(!join(&mut r, "creator@x/two", "c").unwrap().created);
        assert!(!r.visible_to("other@x") && r.visible_to("creator@x"));
        let changed = r
            .set_config(
                "creator@x",
                RoomConfig {
                    name: "N".into(),
                    ..RoomConfig::default()
                },
            )
            .unwrap();
        assert_eq!(
            changed,
            ConfigChanged {
                changed: vec!["name"],
                unlocked: true,
                removed: vec![],
                roles_changed: vec![],
            }
        );
        assert_eq!(
            join(&mut r, "other@x/r", "o").unwrap().role,
            Role::Participant
        );
    }

    #[test]
    fn multi_session_and_leave() {
        let mut r = standard();
        let j = join(&mut r, "member@x/b", "member").unwrap();
        assert_eq!(j.kind, JoinKind::AddSession);
        assert_eq!(
            r.occupant("member").unwrap().sessions,
            vec!["member@x/a", "member@x/b"]
        );
        assert_eq!(r.occupant_count(), 3);
        r.touch_session("member@x/a");
        assert_eq!(
            r.occupant("member").unwrap().current_session(),
            "member@x/a"
        );
        let l = r.leave("member@x/a").unwrap();
        assert!(!l.gone);
        let l = r.leave("member@x/b").unwrap();
        assert!(l.gone);
        assert!(r.occupant("member").is_none());
        assert!(r.leave("member@x/b").is_none());
        assert_eq!(
            join(&mut r, "stranger@x/a", "admin"),
            Err(Refusal::NickConflict)
        );
        r.check_invariants();
    }

    #[test]
    fn full_room() {
        let mut r = standard();
        assert_eq!(join(&mut r, "n@x/a", "n"), Err(Refusal::RoomFull));
        r.config.occupants_max = 0;
        r.limits.occupants_max = 0;
        assert!(join(&mut r, "n@x/a", "n").is_ok());
        r.check_invariants();
    }

    #[test]
    fn nick_changes() {
        let mut r = standard();
        #[rustfmt::skip]
        let cases = [
            ("member@x/a", "admin", Err(Refusal::NickConflict)),
            ("member@x/a", "", Err(Refusal::NickInvalid)),
            ("nobody@x/a", "z", Err(Refusal::NotOccupant)),
            ("member@x/a", "member", Ok("member".to_string())),
            ("member@x/a", "m2", Ok("member".to_string())),
        ];
        for (full, nick, expect) in cases {
            assert_eq!(r.change_nick(full, nick), expect, "{full} -> {nick}");
        }
        assert_eq!(r.occupant_by_session("member@x/a").unwrap().nick, "m2");
        join(&mut r, "member@x/b", "m2").unwrap();
        assert_eq!(
            r.change_nick("member@x/b", "m3"),
            Err(Refusal::MultiSessionNickChange)
        );
        assert_eq!(r.occupant("m2").unwrap().sessions.len(), 2);
        r.check_invariants();
    }

    #[test]
    fn kick_voice_and_voice_list() {
        let config = RoomConfig {
            moderated: true,
            ..RoomConfig::default()
        };
        let mut r = room_with(
            config,
            &[
                ("owner@x", Affiliation::Owner),
                ("member@x", Affiliation::Member),
            ],
        );
        join(&mut r, "owner@x/a", "owner").unwrap();
        assert_eq!(
            join(&mut r, "member@x/a", "member").unwrap().role,
            Role::Visitor
        );
        assert_eq!(
            r.check_groupchat("member@x/a").err(),
            Some(Refusal::NoVoice)
        );
        let c = r
            .set_role("owner@x/a", "member", Role::Participant)
            .unwrap();
        assert!(c.voice_changed);
        assert!(r.has_voice("member@x"));
        assert!(r.record().voice.contains(&"member@x".to_string()));
        assert!(r.check_groupchat("member@x/a").is_ok());
        // The voice list brings voice back on the next visit.
        r.leave("member@x/a");
        assert_eq!(
            join(&mut r, "member@x/a", "member").unwrap().role,
            Role::Participant
        );
        let c = r.set_role("owner@x/a", "member", Role::Visitor).unwrap();
        assert!(c.voice_changed && !r.has_voice("member@x"));
        assert_eq!(
            r.set_role("member@x/a", "owner", Role::None).err(),
            Some(Refusal::NotPermitted)
        );
        assert_eq!(
            r.set_role("owner@x/a", "ghost", Role::None).err(),
            Some(Refusal::NoSuchOccupant)
        );
        let k = r.set_role("owner@x/a", "member", Role::None).unwrap();
        assert_eq!(k.occupant.role, Role::None);
        assert!(r.occupant("member").is_none() && !r.is_occupant_session("member@x/a"));
        r.check_invariants();
    }

    #[test]
    fn affiliation_effects_on_occupants() {
        let mut r = standard();
        join(&mut r, "none@x/a", "none").unwrap_err(); // full (limit 3)
        r.limits.occupants_max = 10;
        join(&mut r, "none@x/a", "none").unwrap();
        let c = r
            .set_affiliation(
                "admin@x",
                "None@X/whatever",
                Affiliation::Member,
                Some("welcome".into()),
            )
            .unwrap();
        assert_eq!(
            (c.jid.as_str(), c.old, c.new),
            ("none@x", Affiliation::None, Affiliation::Member)
        );
        assert_eq!(c.occupants[0].affiliation, Affiliation::Member);
        let c = r
            .set_affiliation("admin@x", "none@x", Affiliation::Outcast, None)
            .unwrap();
        assert_eq!(c.occupants[0].role, Role::None);
        assert!(r.occupant("none").is_none());
        assert_eq!(join(&mut r, "none@x/a", "none"), Err(Refusal::Banned));
        // Promotion to admin makes a moderator.
        let c = r
            .set_affiliation("owner@x", "member@x", Affiliation::Admin, None)
            .unwrap();
        assert_eq!(c.occupants[0].role, Role::Moderator);
        assert_eq!(
            r.set_affiliation("owner@x", "owner@x", Affiliation::Admin, None)
                .err(),
            Some(Refusal::LastOwner)
        );
        assert_eq!(
            r.set_affiliation("nobody@x", "x@x", Affiliation::Member, None)
                .err(),
            Some(Refusal::NotPermitted)
        );
        // Setting none removes the entry from the record.
        r.set_affiliation("owner@x", "member@x", Affiliation::None, None)
            .unwrap();
        assert!(r.record().affiliations.iter().all(|e| e.jid != "member@x"));
        r.check_invariants();
    }

    /// Another server's record, taken over: who is removed and why, who changes and how.
    #[test]
    fn adopting_another_servers_record() {
        type Edit = fn(&mut RoomRecord);
        fn set(r: &mut RoomRecord, jid: &str, a: Affiliation, reason: Option<&str>) {
            r.affiliations.retain(|e| e.jid != jid);
            r.affiliations.push(AffiliationEntry {
                jid: jid.into(),
                affiliation: a,
                reason: reason.map(Into::into),
            });
        }
        use Affiliation as A;
        use Removal as W;
        use Role as Ro;
        let open = RoomConfig::default();
        let members_only = RoomConfig {
            members_only: true,
            ..RoomConfig::default()
        };
        let moderated_voice = RoomConfig {
            moderated: true,
            ..RoomConfig::default()
        };
        #[rustfmt::skip]
        /// (case, config, change, removed: (nick, why, reason), changed: (nick, role, affiliation))
        type Case<'a> = (
            &'a str,
            &'a RoomConfig,
            Edit,
            Vec<(&'a str, Removal, Option<&'a str>)>,
            Vec<(&'a str, Role, Affiliation)>,
        );
        let cases: Vec<Case<'_>> = vec![
            ("nothing changed", &open, |_| {}, vec![], vec![]),
            (
                "subject only",
                &open,
                |r| {
                    r.subject = Some(Subject {
                        text: "s".into(),
                        nick: "x".into(),
                        at: Timestamp(1),
                    })
                },
                vec![],
                vec![],
            ),
            (
                "ban with reason",
                &open,
                |r| set(r, "member@x", A::Outcast, Some("spam")),
                vec![("member", W::Banned, Some("spam"))],
                vec![],
            ),
            (
                "ban a non-member guest",
                &open,
                |r| set(r, "guest@x", A::Outcast, None),
                vec![("guest", W::Banned, None)],
                vec![],
            ),
            (
                "membership revoked, open room",
                &open,
                |r| r.affiliations.retain(|e| e.jid != "member@x"),
                vec![],
                vec![("member", Ro::Participant, A::None)],
            ),
            (
                "membership revoked, members-only",
                &members_only,
                |r| r.affiliations.retain(|e| e.jid != "member@x"),
                vec![("member", W::AffiliationChanged, None)],
                vec![],
            ),
            (
                "became members-only",
                &open,
                |r| r.config.members_only = true,
                vec![("guest", W::MembersOnly, None)],
                vec![],
            ),
            (
                "became moderated",
                &open,
                |r| r.config.moderated = true,
                vec![],
                vec![
                    ("guest", Ro::Visitor, A::None),
                    ("member", Ro::Visitor, A::Member),
                ],
            ),
            (
                "became moderated, member a presenter",
                &open,
                |r| {
                    r.config.moderated = true;
                    r.voice.push("member@x".into())
                },
                vec![],
                vec![("guest", Ro::Visitor, A::None)],
            ),
            (
                "voice list: guest removed elsewhere",
                &moderated_voice,
                |r| r.voice.clear(),
                vec![],
                vec![("guest", Ro::Visitor, A::None)],
            ),
            (
                "promoted to admin",
                &open,
                |r| set(r, "guest@x", A::Admin, None),
                vec![],
                vec![("guest", Ro::Moderator, A::Admin)],
            ),
            (
                "admin demoted",
                &open,
                |r| set(r, "admin@x", A::Member, None),
                vec![],
                vec![("admin", Ro::Participant, A::Member)],
            ),
        ];
        for (name, config, edit, removed, changed) in cases {
            let mut r = room_with(
                config.clone(),
                &[
                    ("owner@x", Affiliation::Owner),
                    ("admin@x", Affiliation::Admin),
                    ("member@x", Affiliation::Member),
                ],
            );
            r.limits.occupants_max = 10;
            if config.moderated {
                r.voice.insert("guest@x".into());
            }
            for (full, nick) in [
                ("owner@x/a", "owner"),
                ("admin@x/a", "admin"),
                ("member@x/a", "member"),
                ("guest@x/a", "guest"),
            ] {
                if !(config.members_only && nick == "guest") {
                    join(&mut r, full, nick).unwrap();
                }
            }
            let mut record = r.record();
            edit(&mut record);
            let adopted = r.adopt_record(record.clone());
            let got_removed: Vec<(&str, Removal, Option<&str>)> = adopted
                .removed
                .iter()
                .map(|x| (x.occupant.nick.as_str(), x.why, x.reason.as_deref()))
                .collect();
            assert_eq!(got_removed, removed, "{name}: removed");
            assert!(adopted.removed.iter().all(|x| x.occupant.role == Ro::None));
            let got_changed: Vec<(&str, Role, Affiliation)> = adopted
                .occupants_changed
                .iter()
                .map(|o| (o.nick.as_str(), o.role, o.affiliation))
                .collect();
            assert_eq!(got_changed, changed, "{name}: changed");
            for x in &adopted.removed {
                assert!(r.occupant(&x.occupant.nick).is_none(), "{name}: still in");
            }
            assert_eq!(
                r.record(),
                Room::from_record(record, limits()).record(),
                "{name}: the record is the one adopted"
            );
            r.check_invariants();
        }
    }

    #[test]
    fn moderation_switched_on_here_silences_as_elsewhere() {
        let mut r = standard();
        r.limits.occupants_max = 10;
        join(&mut r, "guest@x/a", "guest").unwrap();
        let c = r
            .set_config(
                "owner@x",
                RoomConfig {
                    moderated: true,
                    ..RoomConfig::default()
                },
            )
            .unwrap();
        let roles: Vec<(&str, Role)> = c
            .roles_changed
            .iter()
            .map(|o| (o.nick.as_str(), o.role))
            .collect();
        assert_eq!(roles, [("guest", Role::Visitor), ("member", Role::Visitor)]);
        assert_eq!(r.check_groupchat("guest@x/a").err(), Some(Refusal::NoVoice));
        // A new subject changes no role: a voice given by hand stays.
        r.set_role("owner@x/a", "guest", Role::Participant).unwrap();
        let mut record = r.record();
        record.subject = Some(Subject {
            text: "t".into(),
            nick: "owner".into(),
            at: Timestamp(2),
        });
        assert!(r.adopt_record(record).occupants_changed.is_empty());
        assert_eq!(r.occupant("guest").unwrap().role, Role::Participant);
        r.check_invariants();
    }

    #[test]
    fn roles_changed_on_another_servers_authority() {
        let mut r = standard();
        let owner = (Role::Moderator, Affiliation::Owner);
        let c = r.change_role(owner, "member", Role::Visitor).unwrap();
        assert_eq!(c.occupant.role, Role::Visitor);
        // The rule is checked again where the occupant is.
        assert_eq!(
            r.change_role((Role::Moderator, Affiliation::Admin), "owner", Role::None)
                .err(),
            Some(Refusal::TargetProtected)
        );
        assert_eq!(
            r.change_role(owner, "gone", Role::None).err(),
            Some(Refusal::NoSuchOccupant)
        );
        let k = r.change_role(owner, "member", Role::None).unwrap();
        assert_eq!(k.occupant.role, Role::None);
        assert!(r.occupant("member").is_none());
        let out = r.destroyed_elsewhere();
        assert_eq!(out.len(), 2);
        assert!(r.is_destroyed() && r.should_delete() && r.occupant_count() == 0);
        r.check_invariants();
    }

    #[test]
    fn members_only_switch_removes_non_members() {
        let mut r = standard();
        r.limits.occupants_max = 10;
        join(&mut r, "guest@x/a", "guest").unwrap();
        join(&mut r, "guest@x/b", "guest").unwrap();
        assert_eq!(
            r.set_config("admin@x", RoomConfig::default()).err(),
            Some(Refusal::NotPermitted)
        );
        let c = r
            .set_config(
                "owner@x",
                RoomConfig {
                    members_only: true,
                    ..RoomConfig::default()
                },
            )
            .unwrap();
        assert_eq!(c.changed, vec!["members_only"]);
        assert_eq!(c.removed.len(), 1);
        assert_eq!(c.removed[0].sessions.len(), 2);
        assert!(!r.is_occupant_session("guest@x/b"));
        // In a members-only room, losing membership removes the occupant (321).
        let c = r
            .set_affiliation("owner@x", "member@x", Affiliation::None, None)
            .unwrap();
        assert_eq!(c.occupants[0].role, Role::None);
        r.check_invariants();
    }

    #[test]
    fn subject_pm_invite() {
        let mut r = standard();
        assert_eq!(
            r.set_subject("member@x/a", "s", Timestamp(1)).err(),
            Some(Refusal::NotPermitted)
        );
        assert_eq!(
            r.set_subject("stranger@x/a", "s", Timestamp(1)).err(),
            Some(Refusal::NotOccupant)
        );
        assert_eq!(
            r.set_subject("admin@x/a", "s", Timestamp(1)).unwrap().nick,
            "admin"
        );
        assert_eq!(r.record().subject.unwrap().text, "s");
        assert_eq!(
            r.check_private_message("member@x/a", "ghost").err(),
            Some(Refusal::NoSuchOccupant)
        );
        assert!(r.check_private_message("member@x/a", "admin").is_ok());
        r.config.allow_pm = AllowPm::Moderators;
        assert_eq!(
            r.check_private_message("member@x/a", "admin").err(),
            Some(Refusal::NotPermitted)
        );
        r.config.members_only = true;
        assert_eq!(
            r.invite("member@x/a", "new@x").err(),
            Some(Refusal::NotPermitted)
        );
        assert_eq!(
            r.invite("admin@x/a", "new@x/r"),
            Ok(Invited {
                became_member: true
            })
        );
        assert_eq!(r.affiliation("new@x"), Affiliation::Member);
        r.check_invariants();
    }

    #[test]
    fn visibility() {
        // (public, members_only, who, visible_to, may_discover, can_read_archive)
        #[rustfmt::skip]
        let cases = [
            (true, false, "stranger@x", true, true, true),
            (true, false, "outcast@x", true, true, false),
            (false, false, "stranger@x", false, false, true),
            (false, false, "member@x", true, true, true),
            (false, false, "occupant@x", true, true, true),
            (true, true, "stranger@x", true, false, false),
            (true, true, "member@x", true, true, true),
            (false, true, "stranger@x", false, false, false),
            (false, true, "occupant@x", true, true, false),
            (false, true, "member@x", true, true, true),
            (false, true, "owner@x", true, true, true),
        ];
        for (public, members_only, who, visible, discover, archive) in cases {
            let config = RoomConfig {
                public,
                members_only,
                whois: Whois::Anyone,
                ..RoomConfig::default()
            };
            let mut r = room_with(
                config,
                &[
                    ("owner@x", Affiliation::Owner),
                    ("member@x", Affiliation::Member),
                    ("outcast@x", Affiliation::Outcast),
                ],
            );
            r.members_only_bypass_join("occupant@x/a", "occ");
            let name = format!("public={public} members_only={members_only} {who}");
            assert_eq!(r.visible_to(who), visible, "visible {name}");
            assert_eq!(r.may_discover(who), discover, "discover {name}");
            assert_eq!(r.can_read_archive(who), archive, "archive {name}");
        }
    }

    #[test]
    fn should_delete() {
        let mut r = standard();
        assert!(!r.should_delete());
        r.config.persistent = false;
        assert!(!r.should_delete());
        r.clear_occupants();
        assert!(r.should_delete());
        let mut r = standard();
        r.destroy("owner@x").unwrap();
        assert!(r.should_delete() && r.occupant_count() == 0 && !r.visible_to("owner@x"));
        r.check_invariants();
    }

    #[test]
    fn config_validation() {
        let l = Limits {
            occupants_max: 100,
            nick_chars_max: 10,
        };
        let d = RoomConfig::default;
        #[rustfmt::skip]
        let cases: Vec<(RoomConfig, Option<&str>)> = vec![
            (d(), None),
            (RoomConfig { name: "x".repeat(257), ..d() }, Some("name")),
            (RoomConfig { password: Some(String::new()), ..d() }, Some("password")),
            (RoomConfig { history_stanzas_max: 1001, ..d() }, Some("history_stanzas_max")),
            (RoomConfig { history_stanzas_default: 501, history_stanzas_max: 1000, ..d() }, Some("history_stanzas_default")),
            (RoomConfig { history_stanzas_default: 20, history_stanzas_max: 10, ..d() }, Some("history_stanzas_default")),
            (RoomConfig { occupants_max: 101, ..d() }, Some("occupants_max")),
            (RoomConfig { occupants_max: 100, ..d() }, None),
            (RoomConfig { language: "en us".into(), ..d() }, Some("language")),
            (RoomConfig { language: "pt-BR".into(), ..d() }, None),
        ];
        for (c, expect) in cases {
            assert_eq!(
                validate_config(&c, &l).err().map(|e| e.field),
                expect,
                "{c:?}"
            );
        }
    }

    impl Room {
        /// The indexes agree with the occupants.
        fn check_invariants(&self) {
            let mut counts: HashMap<String, usize> = HashMap::new();
            let mut sessions = HashMap::new();
            for o in self.occupants.values() {
                *counts.entry(o.bare_jid.clone()).or_insert(0) += 1;
                assert!(!o.sessions.is_empty(), "{} has no session", o.nick);
                for s in &o.sessions {
                    sessions.insert(s.clone(), o.nick.clone());
                }
            }
            assert_eq!(counts, self.bare_occupants);
            assert_eq!(sessions, self.sessions);
        }

        fn is_occupant_session(&self, full: &str) -> bool {
            self.sessions.contains_key(full)
        }
        /// Puts an occupant in regardless of the rules (to test visibility of occupants).
        fn members_only_bypass_join(&mut self, full: &str, nick: &str) {
            self.occupants.insert(
                nick.into(),
                Occupant {
                    nick: nick.into(),
                    bare_jid: bare_jid(full),
                    sessions: vec![full.into()],
                    role: Role::Participant,
                    affiliation: Affiliation::None,
                },
            );
            self.sessions.insert(full.into(), nick.into());
            self.count_bare(&bare_jid(full), true);
        }
    }
}
