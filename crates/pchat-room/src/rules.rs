//! Permission rules of XEP-0045 as pure functions: small inputs in, `Ok` or a [`Refusal`] out.
//!
//! Each rule is free of room state so it can be tested from a table; [`crate::Room`] gathers the
//! inputs from its state and applies the outcome. Where XEP-0045 leaves a choice, the choice and
//! its reason are written next to the rule.

use crate::types::{Affiliation, AllowPm, Role, RoomConfig, Timestamp, Whois};

/// Why the room refused an action. `pchat-muc` maps each variant to exactly one stanza error
/// (named on each variant), so the mapping lives in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The nick is empty, too long or contains control characters (`jid-malformed`).
    #[error("the nickname is empty, too long or contains control characters")]
    NickInvalid,
    /// The room is locked until its owner configures it (`item-not-found`).
    #[error("the room does not exist")]
    RoomLocked,
    /// A secret room (hidden and members-only) seen by someone who may not learn it exists
    /// (`item-not-found`): answering `registration-required` would confirm the room.
    #[error("the room does not exist")]
    RoomHidden,
    /// The user is an outcast (`forbidden`).
    #[error("you are banned from this room")]
    Banned,
    /// Members-only room and the user is not a member (`registration-required`).
    #[error("this room is members-only")]
    MembersOnly,
    /// Wrong or missing password (`not-authorized`).
    #[error("a password is required to enter this room")]
    PasswordRequired,
    /// Another user holds this nick (`conflict`).
    #[error("this nickname is in use by another occupant")]
    NickConflict,
    /// The room holds its maximum number of occupants (`service-unavailable`, type wait).
    #[error("the room is full")]
    RoomFull,
    /// The sender is not an occupant (`not-acceptable`).
    #[error("only occupants may do this")]
    NotOccupant,
    /// No occupant has that nick (`item-not-found`).
    #[error("no occupant has this nickname")]
    NoSuchOccupant,
    /// The actor's role or affiliation lacks the right (`forbidden`).
    #[error("you are not allowed to do this")]
    NotPermitted,
    /// The target's affiliation protects it from this actor (`not-allowed`).
    #[error("the target's affiliation does not allow this change")]
    TargetProtected,
    /// The room would be left without an owner (`conflict`).
    #[error("a room must keep at least one owner")]
    LastOwner,
    /// A visitor tried to speak (`forbidden`).
    #[error("visitors may not speak in this room")]
    NoVoice,
    /// An invitation to a user the room's category does not allow (`not-allowed`).
    #[error("the invitee is not allowed in this room's category")]
    InviteeWalled,
    /// A member, admin or owner the room's category does not allow (`not-allowed`).
    #[error("this user is not allowed in this room's category")]
    TargetWalled,
    /// The room's category does not allow invitations (`not-allowed`).
    #[error("this room's category does not allow invitations")]
    InvitationsOff,
    /// A nick change from an occupant with several sessions (`not-acceptable`): the other
    /// sessions did not ask for it, so pchat refuses rather than rename them behind their back.
    #[error("change your nickname from a single session")]
    MultiSessionNickChange,
}

/// Who currently holds the nick a user asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NickHolder {
    /// Nobody.
    Free,
    /// The same bare JID (another session of the same user): multi-session, allowed.
    SameUser,
    /// Someone else.
    OtherUser,
}

/// Everything the join rule looks at.
#[derive(Clone, Copy, Debug)]
pub struct JoinInput<'a> {
    /// Requested nick.
    pub nick: &'a str,
    /// Longest nick accepted, in characters.
    pub nick_chars_max: usize,
    /// The room awaits its initial configuration.
    pub locked: bool,
    /// The joining user's affiliation.
    pub affiliation: Affiliation,
    /// Room is members-only.
    pub members_only: bool,
    /// Room is listed publicly.
    pub public: bool,
    /// The room's password, if any.
    pub password: Option<&'a str>,
    /// The password the user sent, if any.
    pub password_given: Option<&'a str>,
    /// Who holds the nick.
    pub nick_holder: NickHolder,
    /// Occupants now.
    pub occupant_count: usize,
    /// Effective occupant limit; 0 = unlimited.
    pub occupants_max: u32,
}

/// How a permitted join enters the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    /// A new occupant.
    NewOccupant,
    /// One more session of an occupant already present under this nick.
    AddSession,
}

/// A nick as the room uses it: RFC 8266's enforcement (the PRECIS nickname profile: spaces
/// of any kind become one ASCII space, leading and trailing ones go, NFKC; control and
/// unassigned characters are refused), then [`nick_rule`]. Case is kept; [`same_nick`]
/// compares without it.
pub fn enforce_nick(nick: &str, chars_max: usize) -> Result<String, Refusal> {
    use precis_core::profile::Profile as _;
    let enforced = precis_profiles::Nickname::new()
        .enforce(nick)
        .map_err(|_| Refusal::NickInvalid)?;
    nick_rule(&enforced, chars_max)?;
    Ok(enforced.into_owned())
}

/// Whether two enforced nicks are the same nick (RFC 8266 comparison: without case), without
/// allocating.
pub fn same_nick(a: &str, b: &str) -> bool {
    a == b
        || a.chars()
            .flat_map(char::to_lowercase)
            .eq(b.chars().flat_map(char::to_lowercase))
}

/// Checks a nick: non-empty, not only spaces, at most `chars_max` characters, no control
/// characters (they break clients' rendering and logs).
pub fn nick_rule(nick: &str, chars_max: usize) -> Result<(), Refusal> {
    if nick.trim().is_empty()
        || nick.chars().count() > chars_max
        || nick.chars().any(char::is_control)
    {
        return Err(Refusal::NickInvalid);
    }
    Ok(())
}

/// May this user enter? The order of the checks matters: nothing about a locked or secret room
/// leaks before the user is known to be allowed to learn of it, and a wrong password is refused
/// before the user could learn which nicks are present.
pub fn join_rule(i: &JoinInput<'_>) -> Result<JoinKind, Refusal> {
    nick_rule(i.nick, i.nick_chars_max)?;
    if i.locked && i.affiliation != Affiliation::Owner {
        return Err(Refusal::RoomLocked);
    }
    if i.affiliation == Affiliation::Outcast {
        return Err(Refusal::Banned);
    }
    if i.members_only && i.affiliation < Affiliation::Member {
        return Err(if i.public {
            Refusal::MembersOnly
        } else {
            Refusal::RoomHidden
        });
    }
    // Owners may always enter their own room (as ejabberd does), so a forgotten password
    // cannot lock them out of changing it.
    if let Some(pw) = i.password {
        if i.affiliation != Affiliation::Owner && i.password_given != Some(pw) {
            return Err(Refusal::PasswordRequired);
        }
    }
    match i.nick_holder {
        NickHolder::OtherUser => Err(Refusal::NickConflict),
        NickHolder::SameUser => Ok(JoinKind::AddSession),
        NickHolder::Free => {
            // Admins and owners may enter a full room (XEP-0045 §7.2.10) so they can manage it.
            let full = i.occupants_max != 0 && i.occupant_count >= i.occupants_max as usize;
            if full && i.affiliation < Affiliation::Admin {
                Err(Refusal::RoomFull)
            } else {
                Ok(JoinKind::NewOccupant)
            }
        }
    }
}

/// The role an occupant gets from its affiliation (XEP-0045 §5.1.2), the room's moderation
/// and the voice list (Lync Presenters).
pub fn role_for(affiliation: Affiliation, config: &RoomConfig, in_voice_list: bool) -> Role {
    match affiliation {
        Affiliation::Owner | Affiliation::Admin => Role::Moderator,
        Affiliation::Outcast => Role::None,
        Affiliation::Member if !config.moderated || config.members_have_voice || in_voice_list => {
            Role::Participant
        }
        Affiliation::None if !config.moderated || in_voice_list => Role::Participant,
        Affiliation::Member | Affiliation::None => Role::Visitor,
    }
}

/// Why an occupant has to leave because of a change to the room that it did not make itself:
/// an affiliation change or the room becoming members-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Its affiliation is now outcast (XEP-0045 status 301).
    Banned,
    /// It lost the affiliation a members-only room requires (status 321).
    AffiliationChanged,
    /// The room is members-only and it is no member (status 322).
    MembersOnly,
    /// The room's category no longer allows it (a wall changed, the room moved to another
    /// category or the user left an allowed group): status 321, it is no member any more.
    Walled,
    /// The room was disabled (status 321 too, with the reason).
    Disabled,
}

/// Must an occupant leave now that its affiliation is `new` (it was `old`) and the room is
/// `members_only`? One rule for a change made on this server and for one taken over from
/// another server of a pool, so that an occupant is removed, and told why, wherever it is
/// connected. An occupant whose affiliation did not change in a members-only room is no member
/// because the room just became members-only (or its server joined it to a stale record).
pub fn removal_rule(old: Affiliation, new: Affiliation, members_only: bool) -> Option<Removal> {
    if new == Affiliation::Outcast {
        return Some(Removal::Banned);
    }
    if members_only && new < Affiliation::Member {
        return Some(if old != new {
            Removal::AffiliationChanged
        } else {
            Removal::MembersOnly
        });
    }
    None
}

/// The role of an occupant who stays after the room's record changed under it, on this server
/// or on another server of a pool.
///
/// - A changed affiliation gives the role that affiliation gives (XEP-0045 §9, §10).
/// - When what decides voice changed (moderation switched on or off, members' voice, the user
///   added to or removed from the voice list), visitors and participants get the role the room
///   now gives them: a room that becomes a Lync auditorium silences everyone but its
///   presenters, and a presenter removed elsewhere loses voice here too. A moderator role
///   granted by hand stays: an admin or owner decided it, and moderation does not undo it.
/// - Anything else keeps the role: a voice granted or revoked by hand in an unmoderated room
///   lives only in the role, and a new subject must not undo it.
pub fn role_after_change(
    current: Role,
    affiliation: Affiliation,
    affiliation_changed: bool,
    voice_changed: bool,
    config: &RoomConfig,
    in_voice_list: bool,
) -> Role {
    if affiliation_changed {
        return role_for(affiliation, config, in_voice_list);
    }
    if !voice_changed || current == Role::Moderator {
        return current;
    }
    role_for(affiliation, config, in_voice_list)
}

/// May `actor` change `target`'s role to `new` (XEP-0045 §8.2–§8.5, §9.6–§9.7)?
///
/// - Only moderators change roles; granting or revoking moderator needs admin or owner.
/// - Admins' and owners' roles follow their affiliation: nobody kicks, silences or demotes them.
/// - A moderator cannot kick or silence someone whose affiliation is at or above its own
///   (§8.4), e.g. a member granted moderator cannot silence another member.
pub fn role_change_rule(
    actor: (Role, Affiliation),
    target: (Role, Affiliation),
    new: Role,
) -> Result<(), Refusal> {
    let (actor_role, actor_aff) = actor;
    let (target_role, target_aff) = target;
    if actor_role != Role::Moderator {
        return Err(Refusal::NotPermitted);
    }
    let touches_moderator = new == Role::Moderator || target_role == Role::Moderator;
    if touches_moderator && actor_aff < Affiliation::Admin {
        return Err(Refusal::NotPermitted);
    }
    if new == target_role {
        return Ok(());
    }
    if target_aff >= Affiliation::Admin && new < Role::Moderator {
        return Err(Refusal::TargetProtected);
    }
    let lowers = new < target_role;
    if lowers && target_aff > Affiliation::None && target_aff >= actor_aff {
        return Err(Refusal::TargetProtected);
    }
    Ok(())
}

/// May `actor` change `target`'s affiliation to `new` (XEP-0045 §9.1–§9.4, §10.3–§10.7)?
/// `owners` is how many owners the room has now.
///
/// - Owners may set any affiliation on anyone, but the last owner cannot be demoted (§10.6
///   answers `conflict`).
/// - Admins may set member, none and outcast on users below admin; promoting to admin or owner
///   is an owner's right (`forbidden`), touching an admin or owner is `not-allowed`.
/// - Everybody else: `forbidden`.
pub fn affiliation_change_rule(
    actor: Affiliation,
    target: Affiliation,
    new: Affiliation,
    owners: usize,
) -> Result<(), Refusal> {
    match actor {
        Affiliation::Owner => {
            if target == Affiliation::Owner && new != Affiliation::Owner && owners <= 1 {
                Err(Refusal::LastOwner)
            } else {
                Ok(())
            }
        }
        Affiliation::Admin => {
            if new >= Affiliation::Admin {
                Err(Refusal::NotPermitted)
            } else if target >= Affiliation::Admin {
                Err(Refusal::TargetProtected)
            } else {
                Ok(())
            }
        }
        _ => Err(Refusal::NotPermitted),
    }
}

/// Which list a `muc#admin` get asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// Users with this affiliation.
    Affiliation(Affiliation),
    /// Occupants with this role.
    Role(Role),
}

/// May someone with this affiliation and role read a list?
///
/// - Owner and admin lists: admins and owners. XEP-0045 §10.5 reserves them to owners; pchat
///   shows them read-only to admins too, as ejabberd does, so admins know who manages the room.
/// - Member list: admins and owners, and members of members-only rooms (§9.5 allows it; in a
///   Lync closed room the members know each other anyway).
/// - Outcast list: admins and owners.
/// - Role lists (moderators, participants, visitors): moderators.
pub fn list_rule(
    actor_aff: Affiliation,
    actor_role: Role,
    kind: ListKind,
    members_only: bool,
) -> Result<(), Refusal> {
    let ok = match kind {
        ListKind::Affiliation(Affiliation::Member) => {
            actor_aff >= Affiliation::Admin || (members_only && actor_aff == Affiliation::Member)
        }
        ListKind::Affiliation(_) => actor_aff >= Affiliation::Admin,
        ListKind::Role(_) => actor_role == Role::Moderator,
    };
    if ok {
        Ok(())
    } else {
        Err(Refusal::NotPermitted)
    }
}

/// May an occupant with this role send a groupchat message? Visitors may not (XEP-0045 §7.4),
/// whether or not the room is moderated: voice was revoked for a reason.
pub fn speak_rule(role: Role) -> Result<(), Refusal> {
    match role {
        Role::None => Err(Refusal::NotOccupant),
        Role::Visitor => Err(Refusal::NoVoice),
        Role::Participant | Role::Moderator => Ok(()),
    }
}

/// May an occupant with this role change the subject (XEP-0045 §8.1)? Moderators always;
/// participants when the room allows it; visitors never.
pub fn subject_rule(role: Role, subject_changeable: bool) -> Result<(), Refusal> {
    match role {
        Role::None => Err(Refusal::NotOccupant),
        Role::Moderator => Ok(()),
        Role::Participant if subject_changeable => Ok(()),
        Role::Participant | Role::Visitor => Err(Refusal::NotPermitted),
    }
}

/// May an occupant with this role send private messages (`muc#roomconfig_allowpm`)?
pub fn private_message_rule(role: Role, allow: AllowPm) -> Result<(), Refusal> {
    if role == Role::None {
        return Err(Refusal::NotOccupant);
    }
    let min = match allow {
        AllowPm::Anyone => Role::Visitor,
        AllowPm::Participants => Role::Participant,
        AllowPm::Moderators => Role::Moderator,
        AllowPm::None => return Err(Refusal::NotPermitted),
    };
    if role >= min {
        Ok(())
    } else {
        Err(Refusal::NotPermitted)
    }
}

/// What a permitted invitation does besides the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InviteGrant {
    /// The invitee becomes a member (members-only room, invitation by an admin or owner).
    pub adds_member: bool,
}

/// May this user invite others (XEP-0045 §7.8)? `role` is `None` when the inviter is not an
/// occupant.
///
/// - Open rooms: any occupant (an invitation grants nothing there).
/// - Members-only rooms: admins and owners, occupants or not (Lync managers invite from
///   outside); members when `members_may_invite`, and only from inside the room. Only an
///   admin's or owner's invitation adds the invitee to the member list (as ejabberd does),
///   because a member cannot grant membership otherwise either.
pub fn invite_rule(
    role: Role,
    affiliation: Affiliation,
    members_only: bool,
    members_may_invite: bool,
    invitee: Affiliation,
) -> Result<InviteGrant, Refusal> {
    if !members_only {
        return if role == Role::None {
            Err(Refusal::NotOccupant)
        } else {
            Ok(InviteGrant { adds_member: false })
        };
    }
    if affiliation >= Affiliation::Admin {
        // An outcast stays banned: lifting a ban is an explicit affiliation change.
        return Ok(InviteGrant {
            adds_member: invitee == Affiliation::None,
        });
    }
    if affiliation == Affiliation::Member && members_may_invite {
        return if role == Role::None {
            Err(Refusal::NotOccupant)
        } else {
            Ok(InviteGrant { adds_member: false })
        };
    }
    Err(Refusal::NotPermitted)
}

/// May an observer with this role see occupants' real JIDs?
pub fn sees_real_jid(whois: Whois, observer: Role) -> bool {
    match whois {
        Whois::Anyone => true,
        Whois::Moderators => observer == Role::Moderator,
    }
}

/// True when the room is too crowded to broadcast presence to everybody (Lync
/// ParticipantUpdateLimit); `max` 0 means never suppressed.
pub fn presence_suppressed(occupant_count: usize, max: u32) -> bool {
    max != 0 && occupant_count > max as usize
}

/// Does an observer receive a presence change of some occupant? Always its own (its client
/// needs self-presence to know it is in the room); above the broadcast limit only moderators
/// receive the others', so they can still moderate while everyone else's traffic stays bounded.
pub fn sees_presence(suppressed: bool, is_self: bool, observer: Role) -> bool {
    !suppressed || is_self || observer == Role::Moderator
}

/// The history a joining client asked for (`<history/>` of XEP-0045 §7.2.15); all optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryAsk {
    /// `maxstanzas`.
    pub max_stanzas: Option<u32>,
    /// `maxchars`.
    pub max_chars: Option<u32>,
    /// `seconds`.
    pub seconds: Option<u32>,
    /// `since`.
    pub since: Option<Timestamp>,
}

/// The history the room will send: the request clamped to the room's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// At most this many messages.
    pub max_stanzas: u32,
    /// At most this many characters of XML, when asked.
    pub max_chars: Option<u32>,
    /// Only messages at or after this time.
    pub since: Option<Timestamp>,
}

/// Clamps a history request: the default is `history_stanzas_default`, and nothing exceeds
/// `history_stanzas_max`; `maxchars='0'` means no history (XEP-0045 §7.2.15); `seconds` and
/// `since` together mean the later of both bounds.
pub fn history_limits(ask: HistoryAsk, config: &RoomConfig, now: Timestamp) -> HistoryLimits {
    let cap = config.history_stanzas_max;
    let mut max_stanzas = ask
        .max_stanzas
        .unwrap_or(config.history_stanzas_default)
        .min(cap);
    if ask.max_chars == Some(0) {
        max_stanzas = 0;
    }
    let from_seconds = ask
        .seconds
        .map(|s| now.plus_micros(-(i64::from(s) * 1_000_000)));
    let since = match (from_seconds, ask.since) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    HistoryLimits {
        max_stanzas,
        max_chars: ask.max_chars,
        since,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nicks_are_enforced_as_rfc8266_nicknames() {
        assert_eq!(
            enforce_nick("  Guybrush   Threepwood ", 64).as_deref(),
            Ok("Guybrush Threepwood")
        );
        assert_eq!(
            enforce_nick("\u{FF21}\u{FF42}c", 64).as_deref(),
            Ok("Abc"),
            "NFKC"
        );
        assert_eq!(
            enforce_nick("\u{00A0}x\u{2003}y", 64).as_deref(),
            Ok("x y"),
            "any space"
        );
        assert_eq!(enforce_nick("Zoë", 64).as_deref(), Ok("Zoë"));
        for bad in ["", "   ", "a\u{85}b", "x\u{378}", "a\u{7}b"] {
            assert_eq!(enforce_nick(bad, 64), Err(Refusal::NickInvalid), "{bad:?}");
        }
        assert_eq!(enforce_nick("abcdefghi", 8), Err(Refusal::NickInvalid));
        assert!(same_nick("Bob Smith", "bob smith"));
        assert!(same_nick("ÉLAN", "élan"));
        assert!(!same_nick("bob", "bobby"));
    }

    use super::*;
    use Affiliation as A;
    use Refusal as R;
    use Role as Ro;

    fn base_join() -> JoinInput<'static> {
        JoinInput {
            nick: "alice",
            nick_chars_max: 8,
            locked: false,
            affiliation: A::None,
            members_only: false,
            public: true,
            password: None,
            password_given: None,
            nick_holder: NickHolder::Free,
            occupant_count: 0,
            occupants_max: 2,
        }
    }

    #[test]
    fn join() {
        let b = base_join();
        #[rustfmt::skip]
        let cases: Vec<(&str, JoinInput<'_>, Result<JoinKind, Refusal>)> = vec![
            ("plain", b, Ok(JoinKind::NewOccupant)),
            ("empty nick", JoinInput { nick: "", ..b }, Err(R::NickInvalid)),
            ("blank nick", JoinInput { nick: "  ", ..b }, Err(R::NickInvalid)),
            ("long nick", JoinInput { nick: "123456789", ..b }, Err(R::NickInvalid)),
            ("8 chars multibyte ok", JoinInput { nick: "éééééééé", ..b }, Ok(JoinKind::NewOccupant)),
            ("control char", JoinInput { nick: "a\u{7}", ..b }, Err(R::NickInvalid)),
            ("locked non-owner", JoinInput { locked: true, affiliation: A::Admin, ..b }, Err(R::RoomLocked)),
            ("locked owner", JoinInput { locked: true, affiliation: A::Owner, ..b }, Ok(JoinKind::NewOccupant)),
            ("outcast", JoinInput { affiliation: A::Outcast, ..b }, Err(R::Banned)),
            ("outcast members-only", JoinInput { affiliation: A::Outcast, members_only: true, ..b }, Err(R::Banned)),
            ("members-only none", JoinInput { members_only: true, ..b }, Err(R::MembersOnly)),
            ("secret none", JoinInput { members_only: true, public: false, ..b }, Err(R::RoomHidden)),
            ("members-only member", JoinInput { members_only: true, affiliation: A::Member, ..b }, Ok(JoinKind::NewOccupant)),
            ("password missing", JoinInput { password: Some("pw"), ..b }, Err(R::PasswordRequired)),
            ("password wrong", JoinInput { password: Some("pw"), password_given: Some("x"), ..b }, Err(R::PasswordRequired)),
            ("password right", JoinInput { password: Some("pw"), password_given: Some("pw"), ..b }, Ok(JoinKind::NewOccupant)),
            ("password owner bypass", JoinInput { password: Some("pw"), affiliation: A::Owner, ..b }, Ok(JoinKind::NewOccupant)),
            ("password before conflict", JoinInput { password: Some("pw"), nick_holder: NickHolder::OtherUser, ..b }, Err(R::PasswordRequired)),
            ("conflict", JoinInput { nick_holder: NickHolder::OtherUser, ..b }, Err(R::NickConflict)),
            ("multi-session", JoinInput { nick_holder: NickHolder::SameUser, occupant_count: 2, ..b }, Ok(JoinKind::AddSession)),
            ("full", JoinInput { occupant_count: 2, ..b }, Err(R::RoomFull)),
            ("full member", JoinInput { occupant_count: 2, affiliation: A::Member, ..b }, Err(R::RoomFull)),
            ("full admin", JoinInput { occupant_count: 2, affiliation: A::Admin, ..b }, Ok(JoinKind::NewOccupant)),
            ("unlimited", JoinInput { occupant_count: 2000, occupants_max: 0, ..b }, Ok(JoinKind::NewOccupant)),
        ];
        for (name, input, expect) in cases {
            assert_eq!(join_rule(&input), expect, "{name}");
        }
    }

    #[test]
    fn roles_from_affiliation() {
        let open = RoomConfig::default();
        let moderated = RoomConfig {
            moderated: true,
            ..RoomConfig::default()
        };
        let members_voice = RoomConfig {
            moderated: true,
            members_have_voice: true,
            ..RoomConfig::default()
        };
        #[rustfmt::skip]
        let cases = [
            (A::Owner, &open, false, Ro::Moderator),
            (A::Admin, &open, false, Ro::Moderator),
            (A::Member, &open, false, Ro::Participant),
            (A::None, &open, false, Ro::Participant),
            (A::Outcast, &open, false, Ro::None),
            (A::Owner, &moderated, false, Ro::Moderator),
            (A::Member, &moderated, false, Ro::Visitor),
            (A::Member, &moderated, true, Ro::Participant),
            (A::None, &moderated, false, Ro::Visitor),
            (A::None, &moderated, true, Ro::Participant),
            (A::Member, &members_voice, false, Ro::Participant),
            (A::None, &members_voice, false, Ro::Visitor),
        ];
        for (aff, config, voice, expect) in cases {
            assert_eq!(
                role_for(aff, config, voice),
                expect,
                "{aff:?} moderated={} voice={voice}",
                config.moderated
            );
        }
    }

    #[test]
    fn removals() {
        use Removal::*;
        #[rustfmt::skip]
        let cases = [
            // (old, new, members_only, expect)
            (A::Member, A::Outcast, false, Some(Banned)),
            (A::None, A::Outcast, true, Some(Banned)),
            (A::Admin, A::Outcast, false, Some(Banned)),
            (A::Member, A::None, true, Some(AffiliationChanged)),
            (A::Admin, A::None, true, Some(AffiliationChanged)),
            (A::None, A::None, true, Some(MembersOnly)),
            (A::Member, A::None, false, None),
            (A::None, A::None, false, None),
            (A::None, A::Member, true, None),
            (A::Member, A::Admin, true, None),
            (A::Owner, A::Owner, true, None),
        ];
        for (old, new, members_only, expect) in cases {
            assert_eq!(
                removal_rule(old, new, members_only),
                expect,
                "{old:?} -> {new:?} members_only={members_only}"
            );
        }
    }

    #[test]
    fn roles_after_a_change() {
        let open = RoomConfig::default();
        let moderated = RoomConfig {
            moderated: true,
            ..RoomConfig::default()
        };
        #[rustfmt::skip]
        let cases = [
            // (current, affiliation, affiliation changed, voice changed, config, in voice list, expect)
            // Nothing that decides roles changed: kept, even a voice set by hand.
            (Ro::Visitor, A::None, false, false, &open, false, Ro::Visitor),
            (Ro::Participant, A::None, false, false, &moderated, false, Ro::Participant),
            // The room became moderated: the silent majority, presenters keep voice.
            (Ro::Participant, A::None, false, true, &moderated, false, Ro::Visitor),
            (Ro::Participant, A::Member, false, true, &moderated, false, Ro::Visitor),
            (Ro::Participant, A::Member, false, true, &moderated, true, Ro::Participant),
            (Ro::Moderator, A::Admin, false, true, &moderated, false, Ro::Moderator),
            // A moderator granted by hand stays one.
            (Ro::Moderator, A::None, false, true, &moderated, false, Ro::Moderator),
            // Moderation off: visitors get voice back.
            (Ro::Visitor, A::None, false, true, &open, false, Ro::Participant),
            // Removed from the voice list elsewhere.
            (Ro::Participant, A::None, false, true, &moderated, false, Ro::Visitor),
            // Affiliation changes decide, whatever the role was.
            (Ro::Moderator, A::Member, true, false, &open, false, Ro::Participant),
            (Ro::Participant, A::Admin, true, false, &moderated, false, Ro::Moderator),
            (Ro::Participant, A::Member, true, false, &moderated, false, Ro::Visitor),
        ];
        for (current, aff, aff_changed, voice_changed, config, voice, expect) in cases {
            assert_eq!(
                role_after_change(current, aff, aff_changed, voice_changed, config, voice),
                expect,
                "{current:?} {aff:?} aff_changed={aff_changed} voice_changed={voice_changed} moderated={} voice={voice}",
                config.moderated
            );
        }
    }

    #[test]
    fn role_changes() {
        #[rustfmt::skip]
        let cases = [
            // (actor, target, new, expect)
            ((Ro::Moderator, A::Admin), (Ro::Participant, A::None), Ro::None, Ok(())),
            ((Ro::Moderator, A::Admin), (Ro::Participant, A::None), Ro::Visitor, Ok(())),
            ((Ro::Moderator, A::Admin), (Ro::Visitor, A::None), Ro::Participant, Ok(())),
            ((Ro::Moderator, A::Admin), (Ro::Participant, A::Member), Ro::None, Ok(())),
            ((Ro::Moderator, A::Admin), (Ro::Participant, A::None), Ro::Moderator, Ok(())),
            ((Ro::Moderator, A::Owner), (Ro::Moderator, A::None), Ro::Participant, Ok(())),
            ((Ro::Participant, A::Member), (Ro::Participant, A::None), Ro::None, Err(R::NotPermitted)),
            ((Ro::Visitor, A::Owner), (Ro::Participant, A::None), Ro::None, Err(R::NotPermitted)),
            ((Ro::Moderator, A::Admin), (Ro::Moderator, A::Admin), Ro::None, Err(R::TargetProtected)),
            ((Ro::Moderator, A::Owner), (Ro::Moderator, A::Admin), Ro::None, Err(R::TargetProtected)),
            ((Ro::Moderator, A::Owner), (Ro::Moderator, A::Owner), Ro::Participant, Err(R::TargetProtected)),
            ((Ro::Moderator, A::Admin), (Ro::Moderator, A::Owner), Ro::Visitor, Err(R::TargetProtected)),
            // A member granted moderator: may kick/silence non-members, not members, and may
            // not grant or revoke moderator.
            ((Ro::Moderator, A::Member), (Ro::Participant, A::None), Ro::None, Ok(())),
            ((Ro::Moderator, A::Member), (Ro::Participant, A::Member), Ro::Visitor, Err(R::TargetProtected)),
            ((Ro::Moderator, A::Member), (Ro::Visitor, A::Member), Ro::Participant, Ok(())),
            ((Ro::Moderator, A::Member), (Ro::Participant, A::None), Ro::Moderator, Err(R::NotPermitted)),
            ((Ro::Moderator, A::None), (Ro::Moderator, A::None), Ro::Participant, Err(R::NotPermitted)),
            // No change is fine for anyone allowed to change roles at all.
            ((Ro::Moderator, A::Admin), (Ro::Moderator, A::Owner), Ro::Moderator, Ok(())),
        ];
        for (actor, target, new, expect) in cases {
            assert_eq!(
                role_change_rule(actor, target, new),
                expect,
                "{actor:?} {target:?} -> {new:?}"
            );
        }
    }

    #[test]
    fn affiliation_changes() {
        #[rustfmt::skip]
        let cases = [
            // (actor, target, new, owners, expect)
            (A::Owner, A::None, A::Owner, 1, Ok(())),
            (A::Owner, A::None, A::Admin, 1, Ok(())),
            (A::Owner, A::Admin, A::Outcast, 1, Ok(())),
            (A::Owner, A::Owner, A::Admin, 2, Ok(())),
            (A::Owner, A::Owner, A::None, 1, Err(R::LastOwner)),
            (A::Owner, A::Owner, A::Outcast, 1, Err(R::LastOwner)),
            (A::Owner, A::Owner, A::Owner, 1, Ok(())),
            (A::Admin, A::None, A::Member, 1, Ok(())),
            (A::Admin, A::Member, A::Outcast, 1, Ok(())),
            (A::Admin, A::Outcast, A::None, 1, Ok(())),
            (A::Admin, A::None, A::Admin, 1, Err(R::NotPermitted)),
            (A::Admin, A::None, A::Owner, 1, Err(R::NotPermitted)),
            (A::Admin, A::Admin, A::Member, 1, Err(R::TargetProtected)),
            (A::Admin, A::Owner, A::Outcast, 1, Err(R::TargetProtected)),
            (A::Member, A::None, A::Member, 1, Err(R::NotPermitted)),
            (A::None, A::None, A::Outcast, 1, Err(R::NotPermitted)),
            (A::Outcast, A::Outcast, A::None, 1, Err(R::NotPermitted)),
        ];
        for (actor, target, new, owners, expect) in cases {
            assert_eq!(
                affiliation_change_rule(actor, target, new, owners),
                expect,
                "{actor:?} {target:?} -> {new:?}"
            );
        }
    }

    #[test]
    fn lists() {
        use ListKind::{Affiliation as LA, Role as LR};
        #[rustfmt::skip]
        let cases = [
            (A::Owner, Ro::Moderator, LA(A::Owner), false, Ok(())),
            (A::Admin, Ro::Moderator, LA(A::Owner), false, Ok(())),
            (A::Admin, Ro::None, LA(A::Outcast), false, Ok(())),
            (A::Member, Ro::Participant, LA(A::Admin), true, Err(R::NotPermitted)),
            (A::Member, Ro::Participant, LA(A::Member), true, Ok(())),
            (A::Member, Ro::Participant, LA(A::Member), false, Err(R::NotPermitted)),
            (A::Member, Ro::Participant, LA(A::Outcast), true, Err(R::NotPermitted)),
            (A::None, Ro::Participant, LA(A::Member), false, Err(R::NotPermitted)),
            (A::None, Ro::Moderator, LR(Ro::Participant), false, Ok(())),
            (A::Admin, Ro::None, LR(Ro::Moderator), false, Err(R::NotPermitted)),
            (A::Member, Ro::Participant, LR(Ro::Visitor), false, Err(R::NotPermitted)),
        ];
        for (aff, role, kind, mo, expect) in cases {
            assert_eq!(
                list_rule(aff, role, kind, mo),
                expect,
                "{aff:?} {role:?} {kind:?} members_only={mo}"
            );
        }
    }

    #[test]
    fn speak_subject_pm() {
        #[rustfmt::skip]
        let speak = [
            (Ro::Moderator, Ok(())), (Ro::Participant, Ok(())),
            (Ro::Visitor, Err(R::NoVoice)), (Ro::None, Err(R::NotOccupant)),
        ];
        for (role, expect) in speak {
            assert_eq!(speak_rule(role), expect, "speak {role:?}");
        }
        #[rustfmt::skip]
        let subject = [
            (Ro::Moderator, false, Ok(())), (Ro::Participant, true, Ok(())),
            (Ro::Participant, false, Err(R::NotPermitted)), (Ro::Visitor, true, Err(R::NotPermitted)),
            (Ro::None, true, Err(R::NotOccupant)),
        ];
        for (role, changeable, expect) in subject {
            assert_eq!(
                subject_rule(role, changeable),
                expect,
                "subject {role:?} {changeable}"
            );
        }
        #[rustfmt::skip]
        let pm = [
            (Ro::Visitor, AllowPm::Anyone, Ok(())),
            (Ro::Visitor, AllowPm::Participants, Err(R::NotPermitted)),
            (Ro::Participant, AllowPm::Participants, Ok(())),
            (Ro::Participant, AllowPm::Moderators, Err(R::NotPermitted)),
            (Ro::Moderator, AllowPm::Moderators, Ok(())),
            (Ro::Moderator, AllowPm::None, Err(R::NotPermitted)),
            (Ro::None, AllowPm::Anyone, Err(R::NotOccupant)),
        ];
        for (role, allow, expect) in pm {
            assert_eq!(
                private_message_rule(role, allow),
                expect,
                "pm {role:?} {allow:?}"
            );
        }
    }

    #[test]
    fn invitations() {
        let yes = Ok(InviteGrant { adds_member: false });
        let adds = Ok(InviteGrant { adds_member: true });
        #[rustfmt::skip]
        let cases = [
            // (role, affiliation, members_only, members_may_invite, invitee, expect)
            (Ro::Participant, A::None, false, false, A::None, yes),
            (Ro::Visitor, A::None, false, false, A::None, yes),
            (Ro::None, A::None, false, false, A::None, Err(R::NotOccupant)),
            (Ro::None, A::Owner, false, false, A::None, Err(R::NotOccupant)),
            (Ro::Participant, A::Member, true, false, A::None, Err(R::NotPermitted)),
            (Ro::Participant, A::Member, true, true, A::None, yes),
            (Ro::None, A::Member, true, true, A::None, Err(R::NotOccupant)),
            (Ro::Moderator, A::Admin, true, false, A::None, adds),
            (Ro::None, A::Owner, true, false, A::None, adds),
            (Ro::Moderator, A::Owner, true, false, A::Member, yes),
            (Ro::Moderator, A::Owner, true, false, A::Outcast, yes),
            (Ro::Participant, A::None, true, true, A::None, Err(R::NotPermitted)),
        ];
        for (role, aff, mo, mmi, invitee, expect) in cases {
            assert_eq!(
                invite_rule(role, aff, mo, mmi, invitee),
                expect,
                "{role:?} {aff:?} mo={mo} mmi={mmi} {invitee:?}"
            );
        }
    }

    #[test]
    fn whois_and_presence_suppression() {
        #[rustfmt::skip]
        let whois = [
            (Whois::Anyone, Ro::Visitor, true), (Whois::Anyone, Ro::Participant, true),
            (Whois::Moderators, Ro::Participant, false), (Whois::Moderators, Ro::Moderator, true),
        ];
        for (w, role, expect) in whois {
            assert_eq!(sees_real_jid(w, role), expect, "{w:?} {role:?}");
        }
        #[rustfmt::skip]
        let suppressed = [(75, 75, false), (76, 75, true), (1_000_000, 0, false), (1, 0, false)];
        for (count, max, expect) in suppressed {
            assert_eq!(presence_suppressed(count, max), expect, "{count} {max}");
        }
        #[rustfmt::skip]
        let sees = [
            (false, false, Ro::Participant, true), (true, false, Ro::Participant, false),
            (true, true, Ro::Visitor, true), (true, false, Ro::Moderator, true),
        ];
        for (suppressed, is_self, role, expect) in sees {
            assert_eq!(
                sees_presence(suppressed, is_self, role),
                expect,
                "{suppressed} {is_self} {role:?}"
            );
        }
    }

    #[test]
    fn history() {
        let config = RoomConfig {
            history_stanzas_default: 30,
            history_stanzas_max: 100,
            ..RoomConfig::default()
        };
        let now = Timestamp::from_secs(1_000);
        let ask = HistoryAsk::default();
        let lim = |max_stanzas, max_chars, since| HistoryLimits {
            max_stanzas,
            max_chars,
            since,
        };
        #[rustfmt::skip]
        let cases = [
            ("default", ask, lim(30, None, None)),
            ("asked fewer", HistoryAsk { max_stanzas: Some(5), ..ask }, lim(5, None, None)),
            ("asked zero", HistoryAsk { max_stanzas: Some(0), ..ask }, lim(0, None, None)),
            ("capped", HistoryAsk { max_stanzas: Some(1000), ..ask }, lim(100, None, None)),
            ("maxchars 0 = none", HistoryAsk { max_chars: Some(0), ..ask }, lim(0, Some(0), None)),
            ("maxchars kept", HistoryAsk { max_chars: Some(500), ..ask }, lim(30, Some(500), None)),
            ("seconds", HistoryAsk { seconds: Some(10), ..ask }, lim(30, None, Some(Timestamp::from_secs(990)))),
            ("since", HistoryAsk { since: Some(Timestamp::from_secs(5)), ..ask }, lim(30, None, Some(Timestamp::from_secs(5)))),
            ("later of both", HistoryAsk { seconds: Some(10), since: Some(Timestamp::from_secs(995)), ..ask }, lim(30, None, Some(Timestamp::from_secs(995)))),
            ("later of both 2", HistoryAsk { seconds: Some(10), since: Some(Timestamp::from_secs(5)), ..ask }, lim(30, None, Some(Timestamp::from_secs(990)))),
        ];
        for (name, ask, expect) in cases {
            assert_eq!(history_limits(ask, &config, now), expect, "{name}");
        }
        // A default above the cap is clamped too.
        let odd = RoomConfig {
            history_stanzas_default: 50,
            history_stanzas_max: 10,
            ..RoomConfig::default()
        };
        assert_eq!(history_limits(ask, &odd, now).max_stanzas, 10);
    }
}
