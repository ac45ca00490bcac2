//! Data types shared by the room domain, the store and the server.

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch, UTC. The domain never reads a clock: callers pass `now`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Seconds since the epoch (floor).
    pub fn as_secs(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }
    /// From whole seconds.
    pub fn from_secs(s: i64) -> Self {
        Timestamp(s.saturating_mul(1_000_000))
    }
    /// This time plus `micros` microseconds.
    pub fn plus_micros(self, micros: i64) -> Self {
        Timestamp(self.0.saturating_add(micros))
    }
}

/// A user's long-lived relation to a room (XEP-0045 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affiliation {
    /// Banned (Lync: denied).
    Outcast,
    /// No affiliation.
    None,
    /// Member (Lync: Members).
    Member,
    /// Admin (Lync: Managers).
    Admin,
    /// Owner (Lync: Managers, creator).
    Owner,
}

impl Affiliation {
    /// The XEP-0045 attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }
    /// Parses the XEP-0045 attribute value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "outcast" => Affiliation::Outcast,
            "none" => Affiliation::None,
            "member" => Affiliation::Member,
            "admin" => Affiliation::Admin,
            "owner" => Affiliation::Owner,
            _ => return None,
        })
    }
}

/// An occupant's role for the length of its visit (XEP-0045 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not in the room.
    None,
    /// May read, may not speak in moderated rooms.
    Visitor,
    /// May speak.
    Participant,
    /// May kick, grant and revoke voice.
    Moderator,
}

impl Role {
    /// The XEP-0045 attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Visitor => "visitor",
            Role::Participant => "participant",
            Role::Moderator => "moderator",
        }
    }
    /// Parses the XEP-0045 attribute value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Role::None,
            "visitor" => Role::Visitor,
            "participant" => Role::Participant,
            "moderator" => Role::Moderator,
            _ => return None,
        })
    }
}

/// Who may see occupants' real JIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Whois {
    /// Semi-anonymous: moderators only.
    Moderators,
    /// Non-anonymous: every occupant.
    Anyone,
}

/// Who may send private messages to occupants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowPm {
    /// Any occupant.
    Anyone,
    /// Participants and moderators.
    Participants,
    /// Moderators only.
    Moderators,
    /// Nobody.
    None,
}

/// A room's configuration (the muc#roomconfig form). These defaults are a room created by
/// joining (XEP-0045): open (not members-only, unless `[rooms] members_only_default`),
/// persistent, non-anonymous, history 30 messages on join. A room made with `pchat room new`
/// is Closed (members-only) by default, as Lync's New-CsPersistentChatRoom made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    /// Human-readable room name (`muc#roomconfig_roomname`).
    pub name: String,
    /// Description (`muc#roomconfig_roomdesc`).
    pub description: String,
    /// Survives the last occupant leaving and server restarts.
    pub persistent: bool,
    /// Listed in disco#items for everyone (false = hidden; Lync "Secret" is hidden + members-only).
    pub public: bool,
    /// Only members and above may join (Lync "Closed").
    pub members_only: bool,
    /// Only occupants with voice may speak (Lync "Auditorium").
    pub moderated: bool,
    /// Password required to join, when set (`muc#roomconfig_roomsecret`).
    pub password: Option<String>,
    /// Who sees real JIDs.
    pub whois: Whois,
    /// Upper bound on history messages a client may fetch on join (`muc#maxhistoryfetch`).
    pub history_stanzas_max: u32,
    /// Messages sent on join when the client does not ask (Lync DefaultChatHistory, 1–500).
    pub history_stanzas_default: u32,
    /// Occupant limit; 0 means the service default.
    pub occupants_max: u32,
    /// Participants (not only moderators) may change the subject.
    pub subject_changeable: bool,
    /// Members may invite others (otherwise only admins/owners in members-only rooms).
    pub members_may_invite: bool,
    /// Who may send private messages.
    pub allow_pm: AllowPm,
    /// Presence is broadcast only while the room has at most this many occupants
    /// (Lync ParticipantUpdateLimit).
    pub presence_broadcast_occupants_max: u32,
    /// Language of the room (`muc#roomconfig_lang`).
    pub language: String,
    /// In moderated rooms, members join with voice (XEP-0045 §5.1.2's default) when true. When
    /// false, as in a Lync Auditorium room, only the voice list (Presenters), admins and owners
    /// may speak: a members-only auditorium would otherwise give everybody voice.
    pub members_have_voice: bool,
    /// The owner set `history_stanzas_default` for this room; otherwise it follows the
    /// service's DefaultChatHistory (`pchat config`). `None`: a record from before the flag,
    /// whose value is its own when it differs from the default (see
    /// [`RoomConfig::history_is_own`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_default_own: Option<bool>,
    /// The owner set `presence_broadcast_occupants_max`; otherwise it follows the service's
    /// ParticipantUpdateLimit. `None` as above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_limit_own: Option<bool>,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            name: String::new(),
            description: String::new(),
            persistent: true,
            public: true,
            members_only: false,
            moderated: false,
            password: None,
            whois: Whois::Anyone,
            history_stanzas_max: 500,
            history_stanzas_default: 30,
            occupants_max: 0,
            subject_changeable: false,
            members_may_invite: false,
            allow_pm: AllowPm::Anyone,
            presence_broadcast_occupants_max: 75,
            language: "en".into(),
            members_have_voice: false,
            history_default_own: Some(false),
            presence_limit_own: Some(false),
        }
    }
}

impl RoomConfig {
    /// Whether `history_stanzas_default` is the room's own (not the service's to change). A
    /// room saved before the flag existed keeps a value that differs from the default: an
    /// owner set it, and an upgrade must not undo that.
    pub fn history_is_own(&self) -> bool {
        self.history_default_own.unwrap_or(
            self.history_stanzas_default != RoomConfig::default().history_stanzas_default,
        )
    }

    /// The same for `presence_broadcast_occupants_max`.
    pub fn presence_limit_is_own(&self) -> bool {
        self.presence_limit_own.unwrap_or(
            self.presence_broadcast_occupants_max
                != RoomConfig::default().presence_broadcast_occupants_max,
        )
    }
}

/// The current subject of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// Subject text (empty = cleared).
    pub text: String,
    /// Nick of whoever set it.
    pub nick: String,
    /// When it was set.
    pub at: Timestamp,
}

/// One affiliation entry of a room: a bare JID and its affiliation, with an optional reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffiliationEntry {
    /// Bare JID (`user@domain`), normalized lower-case.
    pub jid: String,
    /// The affiliation; `None` entries are never stored.
    pub affiliation: Affiliation,
    /// Reason given when it was set.
    pub reason: Option<String>,
}

/// Everything durable about a room except its archive: what `pchat-store` saves and loads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    /// Bare room JID (`name@conference.domain`), normalized lower-case.
    pub jid: String,
    /// Configuration.
    pub config: RoomConfig,
    /// Affiliations other than `none`.
    pub affiliations: Vec<AffiliationEntry>,
    /// Voice list for moderated rooms (Lync Presenters): bare JIDs that join as participants.
    pub voice: Vec<String>,
    /// Subject, if ever set.
    pub subject: Option<Subject>,
    /// Creation time.
    pub created_at: Timestamp,
    /// The category the room is in ([`crate::directory`]): its wall decides who may be in
    /// the room. Records written before categories existed are in the default one.
    #[serde(default = "default_category")]
    pub category: String,
    /// Disabled (Lync `-Disabled`): nobody may find, join or read it; its settings,
    /// membership and history are kept for when it is enabled again.
    #[serde(default)]
    pub disabled: bool,
    /// Invitations turned off for this room (Lync's room Invitations `False`); otherwise the
    /// category's flag decides (`Inherit`).
    #[serde(default)]
    pub invitations_off: bool,
    /// The add-in shown with the room ([`crate::directory::Addin`]), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addin: Option<String>,
}

fn default_category() -> String {
    crate::directory::DEFAULT_CATEGORY.to_owned()
}

/// Kinds of compliance events (Lync's compliance service recorded the same set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComplianceKind {
    /// A groupchat message (written by the store itself for every appended message).
    Message,
    /// An occupant joined.
    Join,
    /// An occupant left.
    Leave,
    /// The subject changed.
    Subject,
    /// The room was created.
    RoomCreated,
    /// The configuration changed.
    ConfigChange,
    /// An affiliation changed.
    AffiliationChange,
    /// A role changed (kick, voice).
    RoleChange,
    /// The room was destroyed.
    RoomDestroyed,
    /// A private message between occupants.
    PrivateMessage,
    /// A mediated invitation.
    Invitation,
    /// An archived message was removed or replaced by an administrator or a moderator (the
    /// compliance record of the message keeps the original).
    MessageRemoved,
    /// A room's history was cleared up to a date.
    HistoryCleared,
    /// A compliance export run finished (`pchat compliance export`): which records it wrote,
    /// to which files. Its room is empty; it is always committed.
    ExportRun,
    /// Someone read a room's history (Lync's BACKCHAT): on join, or by an archive query or
    /// a search; the detail says which messages.
    Backchat,
    /// A file was posted in a room (Lync's FILEUPLOAD): its owner's message named the URL
    /// of its upload (XEP-0363); the detail names the file (id, name, size, type, SHA-256).
    FileUpload,
    /// A file posted in a room was downloaded (Lync's FILEDOWNLOAD); the actor is the user
    /// who proved who they are, or the client's address when the room asked for no proof.
    FileDownload,
    /// A file was removed (`pchat file remove`, or with the message that posted it).
    FileRemoved,
}

impl ComplianceKind {
    /// Stable lower-case name used in storage and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            ComplianceKind::Message => "message",
            ComplianceKind::Join => "join",
            ComplianceKind::Leave => "leave",
            ComplianceKind::Subject => "subject",
            ComplianceKind::RoomCreated => "room_created",
            ComplianceKind::ConfigChange => "config_change",
            ComplianceKind::AffiliationChange => "affiliation_change",
            ComplianceKind::RoleChange => "role_change",
            ComplianceKind::RoomDestroyed => "room_destroyed",
            ComplianceKind::PrivateMessage => "private_message",
            ComplianceKind::Invitation => "invitation",
            ComplianceKind::MessageRemoved => "message_removed",
            ComplianceKind::HistoryCleared => "history_cleared",
            ComplianceKind::ExportRun => "export_run",
            ComplianceKind::Backchat => "backchat",
            ComplianceKind::FileUpload => "file_upload",
            ComplianceKind::FileDownload => "file_download",
            ComplianceKind::FileRemoved => "file_removed",
        }
    }
    /// Parses [`ComplianceKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        use ComplianceKind::*;
        [
            Message,
            Join,
            Leave,
            Subject,
            RoomCreated,
            ConfigChange,
            AffiliationChange,
            RoleChange,
            RoomDestroyed,
            PrivateMessage,
            Invitation,
            MessageRemoved,
            HistoryCleared,
            ExportRun,
            Backchat,
            FileUpload,
            FileDownload,
            FileRemoved,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A compliance event to record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewComplianceEvent {
    /// What happened.
    pub kind: ComplianceKind,
    /// When.
    pub at: Timestamp,
    /// Bare room JID.
    pub room: String,
    /// Real bare JID of who did it.
    pub actor: String,
    /// Nick of who did it, if in the room.
    pub nick: Option<String>,
    /// Free detail: message body, new subject, changed fields, target JID and new affiliation…
    pub detail: String,
}

/// What one server of a pool tells the others about a room beyond its record (which they
/// re-read when it changes): a decision about an occupant connected to another server, or the
/// room's end. Carried by the store between servers (PostgreSQL: a notification sent in the
/// transaction of the decision), so it is heard only if the decision was committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A moderator changed the role of the occupant `nick` connected to `server` (a kick
    /// when `role` is `none`); that server applies it to its occupant.
    Role {
        /// The server the occupant is connected to.
        server: String,
        /// The occupant's nick.
        nick: String,
        /// The new role.
        role: Role,
        /// The actor's role, so the server holding the occupant can check the rule again.
        actor_role: Role,
        /// The actor's affiliation, for the same check.
        actor_affiliation: Affiliation,
        /// The actor's nick, shown to the occupant (`<actor nick=…/>`).
        actor_nick: Option<String>,
        /// The reason given.
        reason: Option<String>,
    },
    /// An archived message was removed (XEP-0425 moderation, or an administrator from the
    /// shell): every server tells its occupants, whose clients hide it.
    Retracted {
        /// Its stanza-id.
        id: i64,
        /// Who removed it, as occupants are shown it: the moderator's occupant JID, or the
        /// room's JID for an administrator.
        by: String,
        /// The reason given.
        reason: Option<String>,
    },
    /// A groupchat message without a body (a chat state, a receipt), relayed to the
    /// occupants and never archived: the other servers of a pool show it to theirs.
    Relayed {
        /// The server whose occupant sent it (it showed its own occupants already); set by
        /// that server when it announces.
        server: String,
        /// The message as the room shows it (`from` = room/nick, no `to`).
        stanza: String,
    },
    /// The room was destroyed (XEP-0045 §10.9).
    Destroyed {
        /// The reason given.
        reason: Option<String>,
        /// The alternate venue, a room JID.
        alternate: Option<String>,
    },
}
