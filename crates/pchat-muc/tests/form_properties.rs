//! Property tests (fuzzing on stable Rust) for the `muc#roomconfig` data form, which a room
//! owner's client controls: any submitted form is either refused with a stanza error or gives
//! a configuration within the room bounds, never a panic; and a room's own form, filled in
//! and sent back over the wire, gives back the same configuration.
//!
//! CI runs few cases; `PROPTEST_CASES=100000 cargo test --release -p pchat-muc --test
//! form_properties` runs longer. Failures are kept in `proptest-regressions/`.

use pchat_muc::form::{config_form, parse_submit, var, Submitted};
use pchat_room::room::{
    DESCRIPTION_CHARS_MAX, HISTORY_DEFAULT_STANZAS_LIMIT, HISTORY_FETCH_STANZAS_LIMIT,
    LANGUAGE_CHARS_MAX, NAME_CHARS_MAX, PASSWORD_CHARS_MAX,
};
use pchat_room::{validate_config, AllowPm, Limits, RoomConfig, Whois};
use pchat_xmpp::{ns, Element, StanzaError};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c
}

/// Field names the form knows, and some it does not.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(var::FORM_TYPE),
        Just(var::NAME),
        Just(var::DESCRIPTION),
        Just(var::LANG),
        Just(var::PERSISTENT),
        Just(var::PUBLIC),
        Just(var::MEMBERS_ONLY),
        Just(var::MODERATED),
        Just(var::MEMBERS_HAVE_VOICE),
        Just(var::PASSWORD_PROTECTED),
        Just(var::SECRET),
        Just(var::WHOIS),
        Just(var::MAX_HISTORY),
        Just(var::HISTORY_DEFAULT),
        Just(var::MAX_USERS),
        Just(var::CHANGE_SUBJECT),
        Just(var::ALLOW_INVITES),
        Just(var::ALLOW_PM),
        Just(var::PRESENCE_BROADCAST_MAX),
        Just("muc#roomconfig_unknown"),
    ]
    .prop_map(str::to_owned)
}

/// Values that hit the parsers' edges: booleans, numbers (huge, negative, padded), the list
/// choices, the form type, and any text.
fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1".to_owned()),
        Just("0".to_owned()),
        Just("true".to_owned()),
        Just("none".to_owned()),
        Just("anyone".to_owned()),
        Just("moderators".to_owned()),
        Just("participants".to_owned()),
        Just(ns::MUC_ROOMCONFIG.to_owned()),
        any::<u32>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[ 0-9]{0,12}",
        ".{0,40}",
        ".{1000,1100}",
    ]
}

/// A submitted form: a type, and fields with zero or more values (or none at all).
fn submitted_form() -> impl Strategy<Value = Element> {
    let field = (
        proptest::option::of(field_name()),
        proptest::collection::vec(field_value(), 0..3),
    );
    (
        prop_oneof![
            Just(Some("submit")),
            Just(Some("cancel")),
            Just(Some("form")),
            Just(None)
        ],
        proptest::collection::vec(field, 0..12),
    )
        .prop_map(|(ty, fields)| {
            let mut x = Element::new("x", ns::DATA_FORMS).attr_opt("type", ty);
            for (name, values) in fields {
                let mut f = Element::new("field", ns::DATA_FORMS).attr_opt("var", name);
                for v in values {
                    f = f.child(Element::new("value", ns::DATA_FORMS).text(v));
                }
                x = x.child(f);
            }
            x
        })
}

/// Text a client may put in a field: any XML character.
fn xml_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            any::<char>().prop_filter("XML character", |c| matches!(
                c,
                '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..
            )),
            Just('&'),
            Just('<'),
        ],
        0..max,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// A configuration within the room bounds.
fn valid_config() -> impl Strategy<Value = RoomConfig> {
    (
        (
            xml_text(NAME_CHARS_MAX.min(40)),
            xml_text(DESCRIPTION_CHARS_MAX.min(60)),
            "[a-zA-Z0-9-]{0,8}",
            proptest::option::of(
                xml_text(PASSWORD_CHARS_MAX.min(20)).prop_filter("non-empty", |p| !p.is_empty()),
            ),
            any::<[bool; 7]>(),
        ),
        (
            0..=HISTORY_FETCH_STANZAS_LIMIT,
            0..=HISTORY_DEFAULT_STANZAS_LIMIT,
            0u32..=20_000,
            any::<u32>(),
            prop_oneof![Just(Whois::Moderators), Just(Whois::Anyone)],
            prop_oneof![
                Just(AllowPm::Anyone),
                Just(AllowPm::Participants),
                Just(AllowPm::Moderators),
                Just(AllowPm::None)
            ],
        ),
    )
        .prop_map(
            |(
                (name, description, language, password, b),
                (hmax, hdef, occ, pres, whois, allow_pm),
            )| {
                assert!(language.len() <= LANGUAGE_CHARS_MAX);
                RoomConfig {
                    name,
                    description,
                    language,
                    password,
                    persistent: b[0],
                    public: b[1],
                    members_only: b[2],
                    moderated: b[3],
                    subject_changeable: b[4],
                    members_may_invite: b[5],
                    members_have_voice: b[6],
                    history_stanzas_max: hmax,
                    history_stanzas_default: hdef.min(hmax),
                    occupants_max: occ,
                    presence_broadcast_occupants_max: pres,
                    whois,
                    allow_pm,
                    // Kept by the room, not in the form.
                    history_default_own: Some(false),
                    presence_limit_own: Some(false),
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Any form: a stanza error (bad-request or not-acceptable) with a sentence, or a
    /// configuration that passes the room bounds; never a panic.
    #[test]
    fn any_submitted_form_is_refused_or_within_bounds(x in submitted_form()) {
        let current = RoomConfig::default();
        let limits = Limits::default();
        match parse_submit(&x, &current, &limits) {
            Ok(Submitted::Config(c)) => prop_assert!(validate_config(&c, &limits).is_ok(), "{c:?}"),
            Ok(Submitted::Cancel) => prop_assert_eq!(x.get_attr("type"), Some("cancel")),
            Err(e) => {
                prop_assert!(matches!(e.condition, StanzaError::BadRequest | StanzaError::NotAcceptable));
                prop_assert!(!e.text.is_empty());
            }
        }
    }

    /// A room's configuration form, serialized, parsed as a client would send it back (type
    /// submit), gives back the same configuration.
    #[test]
    fn the_rooms_own_form_round_trips(c in valid_config()) {
        prop_assert!(validate_config(&c, &Limits::default()).is_ok());
        let form = config_form("room@conference.localhost", &c);
        let wire = form.to_xml_in(ns::CLIENT);
        let mut back = Element::parse(wire.as_bytes(), ns::CLIENT).unwrap();
        back.set_attr("type", "submit");
        let parsed = parse_submit(&back, &RoomConfig::default(), &Limits::default());
        prop_assert_eq!(parsed, Ok(Submitted::Config(Box::new(c))));
    }
}
