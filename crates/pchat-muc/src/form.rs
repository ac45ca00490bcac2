//! The `muc#roomconfig` data form (XEP-0045 §15.5.3, XEP-0004): building it from a
//! [`RoomConfig`] and reading a submitted one back, with every value checked.
//!
//! pchat adds three fields in its own `pchat#` prefix for Lync settings XEP-0045 has no name
//! for: the default history on join (DefaultChatHistory), the presence broadcast limit
//! (ParticipantUpdateLimit) and whether members have voice in moderated rooms.

use pchat_room::{validate_config, AllowPm, Limits, RoomConfig, Whois};
use pchat_xmpp::{ns, Element, StanzaError};

/// Form field names.
pub mod var {
    #![allow(missing_docs)]
    pub const FORM_TYPE: &str = "FORM_TYPE";
    pub const NAME: &str = "muc#roomconfig_roomname";
    pub const DESCRIPTION: &str = "muc#roomconfig_roomdesc";
    pub const LANG: &str = "muc#roomconfig_lang";
    pub const PERSISTENT: &str = "muc#roomconfig_persistentroom";
    pub const PUBLIC: &str = "muc#roomconfig_publicroom";
    pub const MEMBERS_ONLY: &str = "muc#roomconfig_membersonly";
    pub const MODERATED: &str = "muc#roomconfig_moderatedroom";
    pub const MEMBERS_HAVE_VOICE: &str = "pchat#members_have_voice";
    pub const PASSWORD_PROTECTED: &str = "muc#roomconfig_passwordprotectedroom";
    pub const SECRET: &str = "muc#roomconfig_roomsecret";
    pub const WHOIS: &str = "muc#roomconfig_whois";
    pub const MAX_HISTORY: &str = "muc#maxhistoryfetch";
    pub const HISTORY_DEFAULT: &str = "pchat#history_default";
    pub const MAX_USERS: &str = "muc#roomconfig_maxusers";
    pub const CHANGE_SUBJECT: &str = "muc#roomconfig_changesubject";
    pub const ALLOW_INVITES: &str = "muc#roomconfig_allowinvites";
    pub const ALLOW_PM: &str = "muc#roomconfig_allowpm";
    pub const PRESENCE_BROADCAST_MAX: &str = "pchat#presence_broadcast_max";
}

/// Why a submitted form is refused: the stanza error and a sentence naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormError {
    /// `bad-request` for a malformed form, `not-acceptable` for a bad value.
    pub condition: StanzaError,
    /// What is wrong.
    pub text: String,
}

fn bad_value(var: &str, expected: &str) -> FormError {
    FormError {
        condition: StanzaError::NotAcceptable,
        text: format!("{var}: expected {expected}"),
    }
}

fn field(var: &str, ty: &str, label: &str, values: &[&str]) -> Element {
    let mut f = Element::new("field", ns::DATA_FORMS)
        .attr("var", var)
        .attr("type", ty);
    if !label.is_empty() {
        f.set_attr("label", label);
    }
    for v in values {
        f = f.child(Element::new("value", ns::DATA_FORMS).text(*v));
    }
    f
}

fn boolean(var: &str, label: &str, v: bool) -> Element {
    field(var, "boolean", label, &[if v { "1" } else { "0" }])
}

fn list_single(var: &str, label: &str, value: &str, options: &[(&str, &str)]) -> Element {
    let mut f = field(var, "list-single", label, &[value]);
    for (v, l) in options {
        f = f.child(
            Element::new("option", ns::DATA_FORMS)
                .attr("label", *l)
                .child(Element::new("value", ns::DATA_FORMS).text(*v)),
        );
    }
    f
}

fn whois_str(w: Whois) -> &'static str {
    match w {
        Whois::Moderators => "moderators",
        Whois::Anyone => "anyone",
    }
}

fn allow_pm_str(a: AllowPm) -> &'static str {
    match a {
        AllowPm::Anyone => "anyone",
        AllowPm::Participants => "participants",
        AllowPm::Moderators => "moderators",
        AllowPm::None => "none",
    }
}

/// The configuration form of a room, filled with its current values.
pub fn config_form(room_jid: &str, c: &RoomConfig) -> Element {
    Element::new("x", ns::DATA_FORMS)
        .attr("type", "form")
        .child(Element::new("title", ns::DATA_FORMS).text(format!("Configuration of {room_jid}")))
        .child(field(var::FORM_TYPE, "hidden", "", &[ns::MUC_ROOMCONFIG]))
        .child(field(var::NAME, "text-single", "Room name", &[&c.name]))
        .child(field(
            var::DESCRIPTION,
            "text-single",
            "Description",
            &[&c.description],
        ))
        .child(field(var::LANG, "text-single", "Language", &[&c.language]))
        .child(boolean(
            var::PERSISTENT,
            "Keep the room when the last occupant leaves",
            c.persistent,
        ))
        .child(boolean(
            var::PUBLIC,
            "List the room in the directory",
            c.public,
        ))
        .child(boolean(var::MEMBERS_ONLY, "Members only", c.members_only))
        .child(boolean(
            var::MODERATED,
            "Moderated (only occupants with voice may speak)",
            c.moderated,
        ))
        .child(boolean(
            var::MEMBERS_HAVE_VOICE,
            "Members have voice in a moderated room",
            c.members_have_voice,
        ))
        .child(boolean(
            var::PASSWORD_PROTECTED,
            "Password protected",
            c.password.is_some(),
        ))
        .child(field(
            var::SECRET,
            "text-private",
            "Password",
            &[c.password.as_deref().unwrap_or("")],
        ))
        .child(list_single(
            var::WHOIS,
            "Who may see real JIDs",
            whois_str(c.whois),
            &[("moderators", "Moderators only"), ("anyone", "Anyone")],
        ))
        .child(field(
            var::MAX_HISTORY,
            "text-single",
            "Most history messages a client may fetch on join",
            &[&c.history_stanzas_max.to_string()],
        ))
        .child(field(
            var::HISTORY_DEFAULT,
            "text-single",
            "History messages sent on join by default",
            &[&c.history_stanzas_default.to_string()],
        ))
        .child(field(
            var::MAX_USERS,
            "text-single",
            "Most occupants (0 = service limit)",
            &[&c.occupants_max.to_string()],
        ))
        .child(boolean(
            var::CHANGE_SUBJECT,
            "Participants may change the subject",
            c.subject_changeable,
        ))
        .child(boolean(
            var::ALLOW_INVITES,
            "Members may invite others",
            c.members_may_invite,
        ))
        .child(list_single(
            var::ALLOW_PM,
            "Who may send private messages",
            allow_pm_str(c.allow_pm),
            &[
                ("anyone", "Anyone"),
                ("participants", "Participants"),
                ("moderators", "Moderators"),
                ("none", "Nobody"),
            ],
        ))
        .child(field(
            var::PRESENCE_BROADCAST_MAX,
            "text-single",
            "Broadcast presence while at most this many occupants (0 = always)",
            &[&c.presence_broadcast_occupants_max.to_string()],
        ))
}

/// What an owner submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// A new configuration (an empty form keeps the current one: the instant room).
    Config(Box<RoomConfig>),
    /// The owner cancelled.
    Cancel,
}

fn parse_bool(var: &str, v: &str) -> Result<bool, FormError> {
    match v {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(bad_value(var, "a boolean (1 or 0)")),
    }
}

fn parse_u32(var: &str, v: &str) -> Result<u32, FormError> {
    v.trim()
        .parse()
        .map_err(|_| bad_value(var, "a whole number"))
}

/// Reads a submitted form over the `current` configuration: fields absent keep their value,
/// unknown fields are ignored (XEP-0004 lets forms grow), every present value is checked and
/// the result is validated against the room bounds.
pub fn parse_submit(
    x: &Element,
    current: &RoomConfig,
    limits: &Limits,
) -> Result<Submitted, FormError> {
    match x.get_attr("type") {
        Some("submit") => {}
        Some("cancel") => return Ok(Submitted::Cancel),
        _ => {
            return Err(FormError {
                condition: StanzaError::BadRequest,
                text: "send a data form of type submit or cancel".into(),
            })
        }
    }
    let mut c = current.clone();
    let mut protected: Option<bool> = None;
    let mut secret: Option<String> = None;
    for f in x.elements().filter(|e| e.is("field", ns::DATA_FORMS)) {
        let Some(name) = f.get_attr("var") else {
            continue;
        };
        let value = f.child_text("value", ns::DATA_FORMS).unwrap_or_default();
        let v = value.as_str();
        match name {
            var::FORM_TYPE if v != ns::MUC_ROOMCONFIG => {
                return Err(FormError {
                    condition: StanzaError::BadRequest,
                    text: format!("FORM_TYPE must be {}", ns::MUC_ROOMCONFIG),
                });
            }
            var::NAME => c.name = value.clone(),
            var::DESCRIPTION => c.description = value.clone(),
            var::LANG => c.language = value.clone(),
            var::PERSISTENT => c.persistent = parse_bool(name, v)?,
            var::PUBLIC => c.public = parse_bool(name, v)?,
            var::MEMBERS_ONLY => c.members_only = parse_bool(name, v)?,
            var::MODERATED => c.moderated = parse_bool(name, v)?,
            var::MEMBERS_HAVE_VOICE => c.members_have_voice = parse_bool(name, v)?,
            var::PASSWORD_PROTECTED => protected = Some(parse_bool(name, v)?),
            var::SECRET => secret = Some(value.clone()),
            var::WHOIS => {
                c.whois = match v {
                    "moderators" => Whois::Moderators,
                    "anyone" => Whois::Anyone,
                    _ => return Err(bad_value(name, "moderators or anyone")),
                }
            }
            var::MAX_HISTORY => c.history_stanzas_max = parse_u32(name, v)?,
            var::HISTORY_DEFAULT => c.history_stanzas_default = parse_u32(name, v)?,
            var::MAX_USERS => {
                c.occupants_max = if v == "none" || v.is_empty() {
                    0
                } else {
                    parse_u32(name, v)?
                }
            }
            var::CHANGE_SUBJECT => c.subject_changeable = parse_bool(name, v)?,
            var::ALLOW_INVITES => c.members_may_invite = parse_bool(name, v)?,
            var::ALLOW_PM => {
                c.allow_pm = match v {
                    "anyone" => AllowPm::Anyone,
                    "participants" => AllowPm::Participants,
                    "moderators" => AllowPm::Moderators,
                    "none" => AllowPm::None,
                    _ => return Err(bad_value(name, "anyone, participants, moderators or none")),
                }
            }
            var::PRESENCE_BROADCAST_MAX => c.presence_broadcast_occupants_max = parse_u32(name, v)?,
            _ => {}
        }
    }
    // The password fields come as a pair: "protected" without a secret keeps the current
    // secret (clients resubmit the form without re-typing it), and fails when there is none.
    c.password = match (protected, secret) {
        (Some(false), _) => None,
        (_, Some(s)) if !s.is_empty() => Some(s),
        (Some(true), _) => match &current.password {
            Some(p) => Some(p.clone()),
            None => {
                return Err(bad_value(
                    var::SECRET,
                    "a password for a password-protected room",
                ))
            }
        },
        (None, Some(_)) => None,
        (None, None) => current.password.clone(),
    };
    validate_config(&c, limits).map_err(|e| FormError {
        condition: StanzaError::NotAcceptable,
        text: e.to_string(),
    })?;
    Ok(Submitted::Config(Box::new(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(fields: &[(&str, &str)]) -> Element {
        let mut x = Element::new("x", ns::DATA_FORMS).attr("type", "submit");
        for (k, v) in fields {
            x = x.child(
                Element::new("field", ns::DATA_FORMS)
                    .attr("var", *k)
                    .child(Element::new("value", ns::DATA_FORMS).text(*v)),
            );
        }
        x
    }

    #[test]
    fn form_round_trip() {
        let c = RoomConfig {
            name: "Desk".into(),
            description: "FX desk".into(),
            persistent: false,
            public: false,
            members_only: true,
            moderated: true,
            members_have_voice: true,
            password: Some("pw".into()),
            whois: Whois::Moderators,
            history_stanzas_max: 200,
            history_stanzas_default: 10,
            occupants_max: 50,
            subject_changeable: true,
            members_may_invite: true,
            allow_pm: AllowPm::Participants,
            presence_broadcast_occupants_max: 0,
            language: "de".into(),
            history_default_own: Some(false),
            presence_limit_own: Some(false),
        };
        let mut form = config_form("r@c", &c);
        form.set_attr("type", "submit");
        let back = parse_submit(&form, &RoomConfig::default(), &Limits::default()).unwrap();
        assert_eq!(back, Submitted::Config(Box::new(c)));
    }

    #[test]
    fn submits() {
        let cur = RoomConfig {
            password: Some("old".into()),
            ..RoomConfig::default()
        };
        let l = Limits::default();
        let ok = |f: &[(&str, &str)]| match parse_submit(&submit(f), &cur, &l) {
            Ok(Submitted::Config(c)) => *c,
            other => panic!("{f:?}: {other:?}"),
        };
        assert_eq!(ok(&[]), cur, "instant room keeps everything");
        assert_eq!(ok(&[(var::PASSWORD_PROTECTED, "0")]).password, None);
        assert_eq!(
            ok(&[(var::PASSWORD_PROTECTED, "1")]).password.as_deref(),
            Some("old")
        );
        assert_eq!(ok(&[(var::SECRET, "new")]).password.as_deref(), Some("new"));
        assert_eq!(ok(&[(var::SECRET, "")]).password, None);
        assert_eq!(ok(&[(var::MAX_USERS, "none")]).occupants_max, 0);
        assert_eq!(ok(&[("x-unknown", "whatever")]), cur);
        #[rustfmt::skip]
        let bad: &[(&[(&str, &str)], StanzaError)] = &[
            (&[(var::FORM_TYPE, "urn:other")], StanzaError::BadRequest),
            (&[(var::PERSISTENT, "yes")], StanzaError::NotAcceptable),
            (&[(var::MAX_HISTORY, "-1")], StanzaError::NotAcceptable),
            (&[(var::MAX_HISTORY, "5000")], StanzaError::NotAcceptable),
            (&[(var::WHOIS, "none")], StanzaError::NotAcceptable),
            (&[(var::ALLOW_PM, "all")], StanzaError::NotAcceptable),
            (&[(var::MAX_USERS, "30000")], StanzaError::NotAcceptable),
            (&[(var::LANG, "not a tag")], StanzaError::NotAcceptable),
        ];
        for (fields, cond) in bad {
            assert_eq!(
                parse_submit(&submit(fields), &cur, &l)
                    .unwrap_err()
                    .condition,
                *cond,
                "{fields:?}"
            );
        }
        let none = RoomConfig::default();
        let e = parse_submit(&submit(&[(var::PASSWORD_PROTECTED, "1")]), &none, &l).unwrap_err();
        assert_eq!(e.condition, StanzaError::NotAcceptable);
        let cancel = Element::new("x", ns::DATA_FORMS).attr("type", "cancel");
        assert_eq!(parse_submit(&cancel, &cur, &l), Ok(Submitted::Cancel));
        let form = Element::new("x", ns::DATA_FORMS).attr("type", "form");
        assert_eq!(
            parse_submit(&form, &cur, &l).unwrap_err().condition,
            StanzaError::BadRequest
        );
    }
}
