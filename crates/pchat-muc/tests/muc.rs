//! Drives `MucRoom` with real stanzas parsed from XML and checks the exact effects: order,
//! addresses, status codes and error conditions.

use pchat_muc::{Effect, MucRoom, ServiceConfig};
use pchat_room::{
    Affiliation, AffiliationEntry, AllowPm, RoomConfig, RoomRecord, Timestamp, Whois,
};
use pchat_xmpp::{ns, Element};

const ROOM: &str = "room@conference.x";
const NOW: Timestamp = Timestamp(1_000_000_000);
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

fn service() -> ServiceConfig {
    ServiceConfig {
        service_jid: "conference.x".into(),
        ..ServiceConfig::default()
    }
}

fn room(config: RoomConfig, affs: &[(&str, Affiliation)]) -> MucRoom {
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
        category: pchat_room::directory::DEFAULT_CATEGORY.into(),
        disabled: false,
        invitations_off: false,
        addin: None,
    };
    MucRoom::from_record(record, &service())
}

/// Owner `owner@x/a` (nick owner), admin `admin@x/a` (admin), member `member@x/a` (member)
/// and, unless the room is members-only, `guest@x/a` (guest), all joined.
fn standard(config: RoomConfig) -> MucRoom {
    let password = config.password.clone().unwrap_or_default();
    let members_only = config.members_only;
    let mut r = room(
        config,
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
        ("guest@x/a", "guest"),
    ] {
        if members_only && nick == "guest" {
            continue;
        }
        let e = send(&mut r, full, &format!(
            "<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'><password>{password}</password></x></presence>"
        ));
        assert!(
            matches!(e.last(), Some(Effect::History(_))),
            "{full} could not join: {:?}",
            show(&e)
        );
    }
    r
}

fn parse(xml: &str) -> Element {
    Element::parse(xml.as_bytes(), ns::CLIENT).unwrap()
}

fn send(r: &mut MucRoom, from: &str, xml: &str) -> Vec<Effect> {
    r.handle(&parse(xml), from, NOW)
}

fn join(r: &mut MucRoom, full: &str, nick: &str) -> Vec<Effect> {
    send(
        r,
        full,
        &format!(
            "<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ),
    )
}

fn show(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Send(el) => el.to_xml_in(ns::CLIENT),
            Effect::Publish(p) => format!(
                "publish {} sender={} nick={} origin={:?} body={:?} to={}",
                p.message.to_xml_in(ns::CLIENT),
                p.sender_full,
                p.nick,
                p.origin_id,
                p.body,
                p.recipients.join(",")
            ),
            Effect::History(h) => format!(
                "history to={} max={} chars={:?} since={:?} then {}",
                h.to,
                h.max_stanzas,
                h.max_chars,
                h.since.map(|t| t.0),
                h.subject.to_xml_in(ns::CLIENT)
            ),
            Effect::Save(_) => "save".into(),
            Effect::Delete => "delete".into(),
            Effect::RemoveMessage { seq, .. } => format!("remove {seq}"),
            Effect::Compliance(c) => {
                format!(
                    "compliance {} {} {} {}",
                    c.kind.as_str(),
                    c.actor,
                    c.nick.as_deref().unwrap_or("-"),
                    c.detail
                )
            }
            Effect::Announce(ev) => format!("announce {ev:?}"),
        })
        .collect()
}

/// Expected presence from `ROOM/nick` to `to` with a `muc#user` item and status codes.
fn pres(nick: &str, to: &str, unavailable: bool, item: &str, codes: &[u16]) -> String {
    let ty = if unavailable {
        " type='unavailable'"
    } else {
        ""
    };
    let codes: String = codes
        .iter()
        .map(|c| format!("<status code='{c}'/>"))
        .collect();
    format!("<presence from='{ROOM}/{nick}' to='{to}'{ty}><x xmlns='{MUC_USER}'><item {item}/>{codes}</x></presence>")
}

/// (error type, condition) of the only effect, which must be an error reply.
fn error_of(effects: &[Effect]) -> (String, String) {
    assert_eq!(effects.len(), 1, "{:?}", show(effects));
    let Effect::Send(e) = &effects[0] else {
        panic!("not a send: {:?}", show(effects))
    };
    assert_eq!(e.get_attr("type"), Some("error"), "{}", e.to_xml());
    let err = e.get_child("error", ns::CLIENT).expect("error child");
    let cond = err
        .elements()
        .find(|c| c.ns == ns::STANZAS && c.name != "text")
        .expect("condition");
    (
        err.get_attr("type").unwrap_or_default().to_owned(),
        cond.name.clone(),
    )
}

fn err(ty: &str, cond: &str) -> (String, String) {
    (ty.to_owned(), cond.to_owned())
}

fn sends_to<'a>(effects: &'a [Effect], to: &str) -> Vec<&'a Element> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(el) if el.get_attr("to") == Some(to) => Some(el),
            _ => None,
        })
        .collect()
}

fn statuses(e: &Element) -> Vec<String> {
    e.get_child("x", MUC_USER)
        .map(|x| {
            x.elements()
                .filter(|s| s.name == "status")
                .filter_map(|s| s.get_attr("code"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn saved(effects: &[Effect]) -> Option<&RoomRecord> {
    effects.iter().find_map(|e| match e {
        Effect::Save(r) => Some(r),
        _ => None,
    })
}

mod creation {
    use super::*;

    #[test]
    fn instant_room() {
        let mut r = MucRoom::create("Room@Conference.X", "owner@x/a", NOW, &service());
        assert_eq!(r.jid(), ROOM);
        assert!(r.should_delete(), "nothing exists before the creator is in");
        assert!(!r.visible_to("owner@x") || r.is_locked());
        let e = join(&mut r, "owner@x/a", "owner");
        assert_eq!(show(&e), vec![
            "compliance join owner@x owner owner@x/a joined as moderator (owner)".to_string(),
            pres("owner", "owner@x/a", false, "affiliation='owner' role='moderator' jid='owner@x/a'", &[100, 110, 170, 201]),
            format!("history to=owner@x/a max=30 chars=None since=None then <message type='groupchat' from='{ROOM}' to='owner@x/a'><subject/></message>"),
        ]);
        assert!(r.is_locked() && !r.should_delete());
        assert!(
            r.visible_to("owner@x") && !r.visible_to("other@x") && !r.can_read_archive("other@x")
        );
        // Others cannot enter, or even see, a locked room.
        assert_eq!(
            error_of(&join(&mut r, "other@x/a", "other")),
            err("cancel", "item-not-found")
        );
        let info = send(
            &mut r,
            "other@x/a",
            &format!(
                "<iq id='i' type='get' to='{ROOM}'><query xmlns='{}'/></iq>",
                ns::DISCO_INFO
            ),
        );
        assert_eq!(error_of(&info), err("cancel", "item-not-found"));
        // The instant room: an empty submit.
        let e = send(&mut r, "owner@x/a", &format!(
            "<iq id='c1' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='jabber:x:data' type='submit'/></query></iq>",
            ns::MUC_OWNER
        ));
        assert_eq!(
            show(&e),
            vec![
                "save".to_string(),
                "compliance room_created owner@x owner instant room".into(),
                format!("<iq type='result' id='c1' from='{ROOM}' to='owner@x/a'/>"),
            ]
        );
        assert_eq!(saved(&e).unwrap().affiliations[0].jid, "owner@x");
        assert!(!r.is_locked());
        assert!(!join(&mut r, "other@x/a", "other").is_empty());
        assert!(r.is_occupant("other@x/a"));
    }

    #[test]
    fn reserved_room_config_round_trip() {
        let mut r = MucRoom::create(ROOM, "owner@x/a", NOW, &service());
        join(&mut r, "owner@x/a", "owner");
        let e = send(
            &mut r,
            "owner@x/a",
            &format!(
                "<iq id='g' type='get' to='{ROOM}'><query xmlns='{}'/></iq>",
                ns::MUC_OWNER
            ),
        );
        let Effect::Send(reply) = &e[0] else { panic!() };
        let form = reply
            .get_child("query", ns::MUC_OWNER)
            .and_then(|q| q.get_child("x", ns::DATA_FORMS))
            .unwrap();
        let vars: Vec<&str> = form.elements().filter_map(|f| f.get_attr("var")).collect();
        for v in [
            "FORM_TYPE",
            "muc#roomconfig_roomname",
            "muc#roomconfig_roomdesc",
            "muc#roomconfig_persistentroom",
            "muc#roomconfig_publicroom",
            "muc#roomconfig_membersonly",
            "muc#roomconfig_moderatedroom",
            "muc#roomconfig_passwordprotectedroom",
            "muc#roomconfig_roomsecret",
            "muc#roomconfig_whois",
            "muc#maxhistoryfetch",
            "muc#roomconfig_maxusers",
            "muc#roomconfig_changesubject",
            "muc#roomconfig_allowinvites",
            "muc#roomconfig_allowpm",
            "muc#roomconfig_lang",
            "pchat#history_default",
        ] {
            assert!(vars.contains(&v), "form lacks {v}");
        }
        let submit = format!(
            "<iq id='s' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
             <field var='muc#roomconfig_roomname'><value>FX desk</value></field>\
             <field var='muc#roomconfig_membersonly'><value>1</value></field>\
             <field var='muc#roomconfig_publicroom'><value>0</value></field>\
             <field var='muc#roomconfig_whois'><value>moderators</value></field>\
             <field var='muc#roomconfig_passwordprotectedroom'><value>1</value></field>\
             <field var='muc#roomconfig_roomsecret'><value>s3cret</value></field>\
             <field var='muc#roomconfig_allowpm'><value>moderators</value></field>\
             <field var='pchat#history_default'><value>12</value></field>\
             </x></query></iq>",
            ns::MUC_OWNER
        );
        let e = send(&mut r, "owner@x/a", &submit);
        assert_eq!(show(&e)[1], "compliance room_created owner@x owner configured: name,public,members_only,password,whois,history_stanzas_default,allow_pm");
        let c = &saved(&e).unwrap().config;
        assert_eq!(
            (
                c.name.as_str(),
                c.members_only,
                c.public,
                c.whois,
                c.password.as_deref(),
                c.allow_pm,
                c.history_stanzas_default
            ),
            (
                "FX desk",
                true,
                false,
                Whois::Moderators,
                Some("s3cret"),
                AllowPm::Moderators,
                12
            )
        );
        assert_eq!(&r.record().config, c);
        // The form now shows the new values.
        let e = send(
            &mut r,
            "owner@x/a",
            &format!(
                "<iq id='g' type='get' to='{ROOM}'><query xmlns='{}'/></iq>",
                ns::MUC_OWNER
            ),
        );
        let Effect::Send(reply) = &e[0] else { panic!() };
        let xml = reply.to_xml();
        assert!(xml.contains("<field var='muc#roomconfig_roomname' type='text-single' label='Room name'><value>FX desk</value></field>"), "{xml}");
        // A bad value changes nothing.
        let bad = format!(
            "<iq id='b' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='muc#roomconfig_maxusers'><value>lots</value></field></x></query></iq>",
            ns::MUC_OWNER
        );
        assert_eq!(
            error_of(&send(&mut r, "owner@x/a", &bad)),
            err("modify", "not-acceptable")
        );
        assert_eq!(&r.record().config, c);
    }

    #[test]
    fn cancel_destroys_new_room() {
        let mut r = MucRoom::create(ROOM, "owner@x/a", NOW, &service());
        join(&mut r, "owner@x/a", "owner");
        let e = send(&mut r, "owner@x/a", &format!(
            "<iq id='c' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='jabber:x:data' type='cancel'/></query></iq>",
            ns::MUC_OWNER
        ));
        assert_eq!(show(&e), vec![
            "compliance room_destroyed owner@x owner initial configuration cancelled".to_string(),
            "delete".into(),
            format!("<presence from='{ROOM}/owner' to='owner@x/a' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/><destroy/></x></presence>"),
            format!("<iq type='result' id='c' from='{ROOM}' to='owner@x/a'/>"),
        ]);
        assert!(r.should_delete() && r.occupant_count() == 0);
    }

    #[test]
    fn creator_leaving_a_locked_room_deletes_it() {
        let mut r = MucRoom::create(ROOM, "owner@x/a", NOW, &service());
        join(&mut r, "owner@x/a", "owner");
        let e = r.occupant_gone("owner@x/a", NOW);
        assert_eq!(show(&e).last().map(String::as_str), Some("delete"));
        assert!(r.should_delete());
    }
}

mod joining {
    use super::*;

    #[test]
    fn join_sequence_order() {
        let mut r = room(RoomConfig::default(), &[("alice@x", Affiliation::Owner)]);
        join(&mut r, "alice@x/a", "alice");
        join(&mut r, "bob@x/b", "bob");
        let e = send(
            &mut r,
            "carol@x/c",
            &format!("<presence to='{ROOM}/carol' from='spoof@evil/x'><show>away</show><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='5'/></x></presence>"),
        );
        let show_away = "<show>away</show>";
        assert_eq!(show(&e), vec![
            "compliance join carol@x carol carol@x/c joined as participant (none)".to_string(),
            pres("alice", "carol@x/c", false, "affiliation='owner' role='moderator' jid='alice@x/a'", &[]),
            pres("bob", "carol@x/c", false, "affiliation='none' role='participant' jid='bob@x/b'", &[]),
            pres("carol", "alice@x/a", false, "affiliation='none' role='participant' jid='carol@x/c'", &[]).replace("'><x", &format!("'>{show_away}<x")),
            pres("carol", "bob@x/b", false, "affiliation='none' role='participant' jid='carol@x/c'", &[]).replace("'><x", &format!("'>{show_away}<x")),
            pres("carol", "carol@x/c", false, "affiliation='none' role='participant' jid='carol@x/c'", &[100, 110, 170]).replace("'><x", &format!("'>{show_away}<x")),
            format!("history to=carol@x/c max=5 chars=None since=None then <message type='groupchat' from='{ROOM}' to='carol@x/c'><subject/></message>"),
        ]);
    }

    #[test]
    fn join_without_muc_element_and_history_clamping() {
        let config = RoomConfig {
            history_stanzas_max: 50,
            history_stanzas_default: 20,
            ..RoomConfig::default()
        };
        let mut r = room(config, &[]);
        let e = send(&mut r, "a@x/a", &format!("<presence to='{ROOM}/a'/>"));
        assert!(show(&e)
            .last()
            .unwrap()
            .starts_with("history to=a@x/a max=20 chars=None since=None"));
        let e = send(
            &mut r,
            "b@x/b",
            &format!("<presence to='{ROOM}/b'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='900' maxchars='0' seconds='10' since='1970-01-01T00:16:00Z'/></x></presence>"),
        );
        // maxchars 0 means none; seconds=10 before NOW (1000 s) is 990 s, later than since (960 s).
        assert!(
            show(&e)
                .last()
                .unwrap()
                .starts_with("history to=b@x/b max=0 chars=Some(0) since=Some(990000000)"),
            "{:?}",
            show(&e)
        );
    }

    #[test]
    fn refusals() {
        let config = RoomConfig {
            occupants_max: 2,
            ..RoomConfig::default()
        };
        let mut full = room(config, &[("admin@x", Affiliation::Admin)]);
        join(&mut full, "a@x/a", "a");
        join(&mut full, "b@x/b", "b");
        assert_eq!(
            error_of(&join(&mut full, "c@x/c", "c")),
            err("wait", "service-unavailable")
        );
        assert!(!join(&mut full, "admin@x/a", "admin").is_empty() && full.is_occupant("admin@x/a"));

        let mut r = room(RoomConfig::default(), &[("banned@x", Affiliation::Outcast)]);
        join(&mut r, "alice@x/a", "alice");
        assert_eq!(
            error_of(&join(&mut r, "bob@x/b", "alice")),
            err("cancel", "conflict")
        );
        assert_eq!(
            error_of(&join(&mut r, "banned@x/b", "b")),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&join(&mut r, "bob@x/b", "")),
            err("modify", "jid-malformed")
        );
        assert_eq!(
            error_of(&join(&mut r, "bob@x/b", &"n".repeat(65))),
            err("modify", "jid-malformed")
        );
        assert_eq!(
            error_of(&send(
                &mut r,
                "bob@x/b",
                &format!("<presence to='{ROOM}'/>")
            )),
            err("modify", "jid-malformed")
        );
        // The error comes from the occupant JID that was asked for.
        let e = join(&mut r, "bob@x/b", "alice");
        let Effect::Send(el) = &e[0] else { panic!() };
        assert_eq!(
            (el.get_attr("from"), el.get_attr("to")),
            (Some(&*format!("{ROOM}/alice")), Some("bob@x/b"))
        );

        let mut r = room(
            RoomConfig {
                members_only: true,
                ..RoomConfig::default()
            },
            &[("m@x", Affiliation::Member)],
        );
        assert_eq!(
            error_of(&join(&mut r, "bob@x/b", "bob")),
            err("auth", "registration-required")
        );
        assert!(!join(&mut r, "m@x/b", "m").is_empty() && r.is_occupant("m@x/b"));

        let secret = RoomConfig {
            members_only: true,
            public: false,
            ..RoomConfig::default()
        };
        let mut r = room(secret, &[]);
        assert_eq!(
            error_of(&join(&mut r, "bob@x/b", "bob")),
            err("cancel", "item-not-found")
        );

        let mut r = room(
            RoomConfig {
                password: Some("pw".into()),
                ..RoomConfig::default()
            },
            &[("o@x", Affiliation::Owner)],
        );
        assert_eq!(
            error_of(&join(&mut r, "bob@x/b", "bob")),
            err("auth", "not-authorized")
        );
        let wrong = format!("<presence to='{ROOM}/bob'><x xmlns='http://jabber.org/protocol/muc'><password>no</password></x></presence>");
        assert_eq!(
            error_of(&send(&mut r, "bob@x/b", &wrong)),
            err("auth", "not-authorized")
        );
        let right = wrong.replace(">no<", ">pw<");
        send(&mut r, "bob@x/b", &right);
        assert!(r.is_occupant("bob@x/b"));
        join(&mut r, "o@x/o", "o");
        assert!(r.is_occupant("o@x/o"), "owners need no password");
    }

    #[test]
    fn multi_session() {
        let mut r = standard(RoomConfig::default());
        let e = join(&mut r, "member@x/phone", "member");
        // Nobody else hears about the second session; it gets the roster and self-presence.
        assert!(sends_to(&e, "owner@x/a").is_empty() && sends_to(&e, "member@x/a").is_empty());
        let to_phone = sends_to(&e, "member@x/phone");
        assert_eq!(to_phone.len(), 4);
        assert_eq!(statuses(to_phone[3]), vec!["100", "110", "170"]);
        assert_eq!(r.occupant_count(), 4);
        // Both sessions receive groupchat messages.
        let e = send(
            &mut r,
            "guest@x/a",
            &format!("<message type='groupchat' to='{ROOM}'><body>hi</body></message>"),
        );
        let Effect::Publish(p) = &e[0] else { panic!() };
        assert_eq!(
            p.recipients,
            vec![
                "admin@x/a",
                "guest@x/a",
                "member@x/a",
                "member@x/phone",
                "owner@x/a"
            ]
        );
        // One session leaving: only it hears.
        let e = send(
            &mut r,
            "member@x/a",
            &format!("<presence type='unavailable' to='{ROOM}/member'/>"),
        );
        assert_eq!(
            show(&e)[1..],
            [pres(
                "member",
                "member@x/a",
                true,
                "affiliation='member' role='none'",
                &[110]
            )]
        );
        assert!(r.is_occupant("member@x/phone") && !r.is_occupant("member@x/a"));
        // The last session's end is a leave for everyone.
        let e = r.occupant_gone("member@x/phone", NOW);
        assert_eq!(
            show(&e),
            vec![
                "compliance leave member@x member member@x/phone left".to_string(),
                pres(
                    "member",
                    "admin@x/a",
                    true,
                    "affiliation='member' role='none' jid='member@x/phone'",
                    &[]
                ),
                pres(
                    "member",
                    "guest@x/a",
                    true,
                    "affiliation='member' role='none' jid='member@x/phone'",
                    &[]
                ),
                pres(
                    "member",
                    "owner@x/a",
                    true,
                    "affiliation='member' role='none' jid='member@x/phone'",
                    &[]
                ),
            ]
        );
        assert_eq!(r.occupant_count(), 3);
    }

    #[test]
    fn presence_update_and_rejoin() {
        let mut r = standard(RoomConfig::default());
        let e = send(
            &mut r,
            "guest@x/a",
            &format!("<presence to='{ROOM}/guest'><show>dnd</show></presence>"),
        );
        assert_eq!(e.len(), 4);
        let self_p = sends_to(&e, "guest@x/a");
        assert_eq!(statuses(self_p[0]), vec!["110"]);
        assert!(self_p[0].to_xml().contains("<show>dnd</show>"));
        // A join element from a session already in replays the join for it only.
        let e = join(&mut r, "guest@x/a", "guest");
        let to_guest = sends_to(&e, "guest@x/a");
        assert_eq!(to_guest.len(), 4, "{:?}", show(&e));
        assert_eq!(statuses(to_guest[3]), vec!["100", "110", "170"]);
        assert!(matches!(e.last(), Some(Effect::History(h)) if h.to == "guest@x/a"));
    }

    #[test]
    fn nick_change() {
        let mut r = standard(RoomConfig::default());
        let e = send(
            &mut r,
            "guest@x/a",
            &format!("<presence to='{ROOM}/visitor2'/>"),
        );
        let guest_item = "affiliation='none' role='participant' jid='guest@x/a'";
        assert_eq!(
            show(
                &sends_to(&e, "guest@x/a")
                    .into_iter()
                    .cloned()
                    .map(Effect::Send)
                    .collect::<Vec<_>>()
            ),
            vec![
                pres(
                    "guest",
                    "guest@x/a",
                    true,
                    &format!("{guest_item} nick='visitor2'"),
                    &[110, 303]
                ),
                pres("visitor2", "guest@x/a", false, guest_item, &[110]),
            ]
        );
        assert_eq!(
            show(
                &sends_to(&e, "owner@x/a")
                    .into_iter()
                    .cloned()
                    .map(Effect::Send)
                    .collect::<Vec<_>>()
            ),
            vec![
                pres(
                    "guest",
                    "owner@x/a",
                    true,
                    &format!("{guest_item} nick='visitor2'"),
                    &[303]
                ),
                pres("visitor2", "owner@x/a", false, guest_item, &[]),
            ]
        );
        assert_eq!(e.len(), 8);
        // Taken nick: conflict, from the occupant JID asked for.
        let e = send(
            &mut r,
            "guest@x/a",
            &format!("<presence to='{ROOM}/owner'/>"),
        );
        assert_eq!(error_of(&e), err("cancel", "conflict"));
        let Effect::Send(el) = &e[0] else { panic!() };
        assert_eq!(el.get_attr("from"), Some(&*format!("{ROOM}/owner")));
    }

    #[test]
    fn leave_and_temporary_room() {
        let mut r = room(
            RoomConfig {
                persistent: false,
                ..RoomConfig::default()
            },
            &[],
        );
        join(&mut r, "a@x/a", "a");
        join(&mut r, "b@x/b", "b");
        let e = send(
            &mut r,
            "a@x/a",
            &format!("<presence type='unavailable' to='{ROOM}/a'><status>bye</status></presence>"),
        );
        assert_eq!(
            show(&e),
            vec![
                "compliance leave a@x a a@x/a left: bye".to_string(),
                pres(
                    "a",
                    "b@x/b",
                    true,
                    "affiliation='none' role='none' jid='a@x/a'",
                    &[]
                )
                .replace("'><x", "'><status>bye</status><x"),
                pres(
                    "a",
                    "a@x/a",
                    true,
                    "affiliation='none' role='none' jid='a@x/a'",
                    &[110]
                )
                .replace("'><x", "'><status>bye</status><x"),
            ]
        );
        assert!(!r.should_delete());
        let e = send(
            &mut r,
            "b@x/b",
            &format!("<presence type='unavailable' to='{ROOM}/b'/>"),
        );
        assert_eq!(show(&e).last().map(String::as_str), Some("delete"));
        assert!(r.should_delete());
        // Leaving twice is harmless.
        assert!(send(
            &mut r,
            "b@x/b",
            &format!("<presence type='unavailable' to='{ROOM}/b'/>")
        )
        .is_empty());
    }

    #[test]
    fn presence_error_removes_with_333() {
        let mut r = standard(RoomConfig::default());
        let e = send(
            &mut r,
            "guest@x/a",
            &format!("<presence type='error' to='{ROOM}/guest'/>"),
        );
        assert!(sends_to(&e, "guest@x/a").is_empty());
        assert_eq!(statuses(sends_to(&e, "owner@x/a")[0]), vec!["333"]);
        assert!(!r.is_occupant("guest@x/a"));
    }

    /// A session the server dropped (too slow, silent to pings, vanished) leaves with 333
    /// for the others and nothing to itself; a session that just ended leaves without it.
    #[test]
    fn dropped_occupant_leaves_with_333() {
        let mut r = standard(RoomConfig::default());
        let e = r.occupant_dropped("guest@x/a", NOW);
        assert!(sends_to(&e, "guest@x/a").is_empty());
        assert_eq!(statuses(sends_to(&e, "owner@x/a")[0]), vec!["333"]);
        assert!(!r.is_occupant("guest@x/a"));
        let e = r.occupant_gone("member@x/a", NOW);
        assert!(statuses(sends_to(&e, "owner@x/a")[0]).is_empty());
        assert!(r.occupant_dropped("nobody@x/a", NOW).is_empty());
    }

    #[test]
    fn semi_anonymous_shows_real_jids_to_moderators_only() {
        let mut r = standard(RoomConfig {
            whois: Whois::Moderators,
            ..RoomConfig::default()
        });
        let e = join(&mut r, "new@x/n", "new");
        let to_owner = sends_to(&e, "owner@x/a")[0].to_xml();
        let to_member = sends_to(&e, "member@x/a")[0].to_xml();
        assert!(to_owner.contains("jid='new@x/n'"), "{to_owner}");
        assert!(!to_member.contains("jid="), "{to_member}");
        // The joiner sees nobody's real JID, and no status 100.
        let to_new = sends_to(&e, "new@x/n");
        assert!(to_new.iter().all(|p| !p.to_xml().contains("jid=")));
        assert_eq!(statuses(to_new.last().unwrap()), vec!["110", "170"]);
    }

    #[test]
    fn presence_broadcast_suppressed_above_limit() {
        let mut r = standard(RoomConfig {
            presence_broadcast_occupants_max: 4,
            ..RoomConfig::default()
        });
        let e = join(&mut r, "fifth@x/f", "fifth");
        // Five occupants > 4: moderators hear the join, participants don't; the joiner, no
        // moderator, gets only its self-presence.
        assert_eq!(sends_to(&e, "owner@x/a").len(), 1);
        assert_eq!(sends_to(&e, "admin@x/a").len(), 1);
        assert!(sends_to(&e, "member@x/a").is_empty() && sends_to(&e, "guest@x/a").is_empty());
        assert_eq!(sends_to(&e, "fifth@x/f").len(), 1);
    }

    #[test]
    fn shutdown() {
        let mut r = standard(RoomConfig::default());
        let e = r.shutdown();
        assert_eq!(e.len(), 4);
        assert_eq!(
            show(&e)[0],
            pres(
                "admin",
                "admin@x/a",
                true,
                "affiliation='admin' role='none'",
                &[110, 332]
            )
        );
        assert_eq!(r.occupant_count(), 0);
        assert!(!r.should_delete(), "persistent rooms survive a restart");
    }
}

mod messages {
    use super::*;

    #[test]
    fn groupchat_publish_strips_stanza_ids() {
        let mut r = standard(RoomConfig::default());
        let e = send(&mut r, "guest@x/a", &format!(
            "<message id='m1' type='groupchat' to='{ROOM}' from='forged@x/y'><body>hello</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='999'/><origin-id xmlns='urn:xmpp:sid:0' id='o-1'/>\
             <active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        ));
        assert_eq!(show(&e), vec![format!(
            "publish <message id='m1' type='groupchat' from='{ROOM}/guest'><body>hello</body>\
             <origin-id xmlns='urn:xmpp:sid:0' id='o-1'/><active xmlns='http://jabber.org/protocol/chatstates'/></message> \
             sender=guest@x/a nick=guest origin=Some(\"o-1\") body=Some(\"hello\") to=admin@x/a,guest@x/a,member@x/a,owner@x/a"
        )]);
        // Chat states without a body are relayed to every occupant, never archived.
        let e = send(&mut r, "guest@x/a", &format!("<message type='groupchat' to='{ROOM}'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"));
        // (and announced, for the other servers of a pool).
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(e[..4].iter().all(|e| matches!(e, Effect::Send(m)
            if m.get_attr("from") == Some(&format!("{ROOM}/guest")[..])
                && m.get_child("stanza-id", "urn:xmpp:sid:0").is_none())));
        assert!(
            matches!(&e[4], Effect::Announce(pchat_room::RoomEvent::Relayed { stanza, .. })
            if stanza.contains("composing"))
        );
    }

    #[test]
    fn groupchat_refusals() {
        let mut r = standard(RoomConfig::default());
        let m = format!("<message type='groupchat' to='{ROOM}'><body>x</body></message>");
        assert_eq!(
            error_of(&send(&mut r, "outsider@x/a", &m)),
            err("modify", "not-acceptable")
        );
        let to_nick =
            format!("<message type='groupchat' to='{ROOM}/owner'><body>x</body></message>");
        assert_eq!(
            error_of(&send(&mut r, "guest@x/a", &to_nick)),
            err("modify", "bad-request")
        );
        // Errors are never answered.
        assert!(send(
            &mut r,
            "outsider@x/a",
            &format!("<message type='error' to='{ROOM}'/>")
        )
        .is_empty());
    }

    #[test]
    fn moderated_room_visitors_and_voice() {
        let mut r = standard(RoomConfig {
            moderated: true,
            ..RoomConfig::default()
        });
        let m = format!("<message type='groupchat' to='{ROOM}'><body>x</body></message>");
        assert_eq!(
            error_of(&send(&mut r, "guest@x/a", &m)),
            err("auth", "forbidden")
        );
        // Lync Auditorium: members have no voice either unless configured.
        assert_eq!(
            error_of(&send(&mut r, "member@x/a", &m)),
            err("auth", "forbidden")
        );
        assert!(matches!(
            send(&mut r, "admin@x/a", &m)[0],
            Effect::Publish(_)
        ));
        // Voice grant by a moderator: Save (voice list), compliance, presence to all.
        let e = send(&mut r, "admin@x/a", &format!(
            "<iq id='v' type='set' to='{ROOM}'><query xmlns='{}'><item nick='guest' role='participant'/></query></iq>",
            ns::MUC_ADMIN
        ));
        assert_eq!(saved(&e).unwrap().voice, vec!["guest@x".to_string()]);
        assert_eq!(
            show(&e)[1],
            "compliance role_change admin@x admin guest (guest@x): visitor -> participant"
        );
        assert_eq!(
            show(
                &sends_to(&e, "guest@x/a")
                    .into_iter()
                    .cloned()
                    .map(Effect::Send)
                    .collect::<Vec<_>>()
            ),
            vec![pres(
                "guest",
                "guest@x/a",
                false,
                "affiliation='none' role='participant' jid='guest@x/a'",
                &[110]
            )
            .replace(
                "role='participant' jid='guest@x/a'/>",
                "role='participant' jid='guest@x/a'><actor nick='admin'/></item>"
            )]
        );
        assert!(matches!(
            send(&mut r, "guest@x/a", &m)[0],
            Effect::Publish(_)
        ));
        // Revoke: back to visitor, off the voice list.
        let e = send(&mut r, "owner@x/a", &format!(
            "<iq id='v' type='set' to='{ROOM}'><query xmlns='{}'><item nick='guest' role='visitor'/></query></iq>",
            ns::MUC_ADMIN
        ));
        assert!(saved(&e).unwrap().voice.is_empty());
        assert_eq!(
            error_of(&send(&mut r, "guest@x/a", &m)),
            err("auth", "forbidden")
        );
    }

    #[test]
    fn voice_request_reaches_moderators_and_approval_grants_voice() {
        let mut r = standard(RoomConfig {
            moderated: true,
            ..RoomConfig::default()
        });
        let request = format!(
            "<message to='{ROOM}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>\
             <field var='muc#role'><value>participant</value></field></x></message>"
        );
        let e = send(&mut r, "guest@x/a", &request);
        assert_eq!(e.len(), 2, "{:?}", show(&e));
        assert!(sends_to(&e, "owner@x/a")[0]
            .to_xml()
            .contains("<value>guest</value>"));
        let approve = format!(
            "<message to='{ROOM}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>\
             <field var='muc#roomnick'><value>guest</value></field>\
             <field var='muc#request_allow'><value>true</value></field></x></message>"
        );
        let e = send(&mut r, "owner@x/a", &approve);
        assert_eq!(saved(&e).unwrap().voice, vec!["guest@x".to_string()]);
    }

    #[test]
    fn subject_rights() {
        let mut r = standard(RoomConfig::default());
        let subject = |t: &str| {
            format!("<message type='groupchat' to='{ROOM}'><subject>{t}</subject></message>")
        };
        assert_eq!(
            error_of(&send(&mut r, "guest@x/a", &subject("mine"))),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&send(&mut r, "outsider@x/a", &subject("mine"))),
            err("modify", "not-acceptable")
        );
        let e = send(&mut r, "admin@x/a", &subject("Release day"));
        assert_eq!(show(&e)[..3], [
            "save".to_string(),
            "compliance subject admin@x admin Release day".into(),
            format!("<message type='groupchat' to='admin@x/a' from='{ROOM}/admin'><subject>Release day</subject></message>"),
        ]);
        assert_eq!(e.len(), 6);
        assert_eq!(
            saved(&e).unwrap().subject.as_ref().unwrap().text,
            "Release day"
        );
        // A joiner gets it after the history.
        let e = join(&mut r, "late@x/l", "late");
        let Some(Effect::History(h)) = e.last() else {
            panic!()
        };
        assert_eq!(h.subject.to_xml_in(ns::CLIENT), format!("<message type='groupchat' from='{ROOM}/admin' to='late@x/l'><subject>Release day</subject></message>"));
        // With subject_changeable, participants may; visitors never.
        let mut r = standard(RoomConfig {
            subject_changeable: true,
            ..RoomConfig::default()
        });
        assert_eq!(
            saved(&send(&mut r, "guest@x/a", &subject("ours")))
                .unwrap()
                .subject
                .as_ref()
                .unwrap()
                .nick,
            "guest"
        );
        // A message with both subject and body is a message.
        let both = format!(
            "<message type='groupchat' to='{ROOM}'><subject>s</subject><body>b</body></message>"
        );
        assert!(matches!(
            send(&mut r, "guest@x/a", &both)[0],
            Effect::Publish(_)
        ));
    }

    #[test]
    fn private_messages() {
        let mut r = standard(RoomConfig::default());
        join(&mut r, "member@x/b", "member");
        let pm = |to: &str| {
            format!("<message type='chat' id='p' to='{ROOM}/{to}'><body>psst</body></message>")
        };
        let e = send(&mut r, "guest@x/a", &pm("member"));
        assert_eq!(show(&e), vec![
            "compliance private_message guest@x guest to member (member@x): psst".to_string(),
            format!("<message type='chat' id='p' to='member@x/a' from='{ROOM}/guest'><body>psst</body><x xmlns='{MUC_USER}'/></message>"),
            format!("<message type='chat' id='p' to='member@x/b' from='{ROOM}/guest'><body>psst</body><x xmlns='{MUC_USER}'/></message>"),
        ]);
        assert_eq!(
            error_of(&send(&mut r, "guest@x/a", &pm("ghost"))),
            err("cancel", "item-not-found")
        );
        assert_eq!(
            error_of(&send(&mut r, "outsider@x/a", &pm("member"))),
            err("modify", "not-acceptable")
        );
        #[rustfmt::skip]
        let table = [
            (AllowPm::Anyone, "guest@x/a", true),
            (AllowPm::Participants, "guest@x/a", true),
            (AllowPm::Moderators, "guest@x/a", false),
            (AllowPm::Moderators, "admin@x/a", true),
            (AllowPm::None, "owner@x/a", false),
        ];
        for (allow, from, ok) in table {
            let mut r = standard(RoomConfig {
                allow_pm: allow,
                ..RoomConfig::default()
            });
            let e = send(&mut r, from, &pm("member"));
            if ok {
                assert_eq!(e.len(), 2, "{allow:?} {from}");
            } else {
                assert_eq!(error_of(&e), err("auth", "forbidden"), "{allow:?} {from}");
            }
        }
    }

    #[test]
    fn invitations() {
        let config = RoomConfig {
            members_only: true,
            password: Some("pw".into()),
            ..RoomConfig::default()
        };
        let mut r = standard(config);
        let invite = |to: &str| {
            format!("<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='{to}'><reason>join us</reason></invite></x></message>")
        };
        // A member may not invite in a members-only room unless the room allows it.
        assert_eq!(
            error_of(&send(&mut r, "member@x/a", &invite("new@x"))),
            err("auth", "forbidden")
        );
        let e = send(&mut r, "admin@x/a", &invite("new@x"));
        assert_eq!(show(&e), vec![
            "save".to_string(),
            "compliance affiliation_change admin@x admin new@x: none -> member (invitation)".into(),
            "compliance invitation admin@x admin invited new@x: join us".into(),
            format!("<message from='{ROOM}' to='new@x'><x xmlns='{MUC_USER}'><invite from='admin@x/a'><reason>join us</reason></invite>\
                     <password>pw</password></x><body>admin@x invites you to the room {ROOM}: join us</body></message>"),
        ]);
        assert!(saved(&e)
            .unwrap()
            .affiliations
            .iter()
            .any(|a| a.jid == "new@x" && a.affiliation == Affiliation::Member));
        let with_pw = format!("<presence to='{ROOM}/new'><x xmlns='http://jabber.org/protocol/muc'><password>pw</password></x></presence>");
        assert!(!send(&mut r, "new@x/n", &with_pw).is_empty() && r.is_occupant("new@x/n"));
        assert_eq!(
            error_of(&send(&mut r, "admin@x/a", &invite(""))),
            err("modify", "jid-malformed")
        );
        // Declines go back to the inviter.
        let decline = format!("<message to='{ROOM}'><x xmlns='{MUC_USER}'><decline to='admin@x'><reason>busy</reason></decline></x></message>");
        let e = send(&mut r, "new@x/n", &decline);
        assert_eq!(show(&e), vec![format!(
            "<message from='{ROOM}' to='admin@x'><x xmlns='{MUC_USER}'><decline from='new@x/n'><reason>busy</reason></decline></x></message>"
        )]);
        // …but the room relays nothing to strangers.
        let spam = decline.replace("admin@x", "stranger@y");
        assert!(send(&mut r, "new@x/n", &spam).is_empty());
        // Open rooms: any occupant invites, nobody becomes a member.
        let mut open = standard(RoomConfig::default());
        let e = send(&mut open, "guest@x/a", &invite("friend@x"));
        assert_eq!(e.len(), 2);
        assert!(saved(&e).is_none());
    }
}

mod admin {
    use super::*;

    /// (error type, condition), or `None` for success.
    type ExpectedError = Option<(&'static str, &'static str)>;

    fn admin_set(r: &mut MucRoom, from: &str, items: &str) -> Vec<Effect> {
        send(
            r,
            from,
            &format!(
                "<iq id='a' type='set' to='{ROOM}'><query xmlns='{}'>{items}</query></iq>",
                ns::MUC_ADMIN
            ),
        )
    }

    #[test]
    fn kick() {
        let mut r = standard(RoomConfig::default());
        let e = admin_set(
            &mut r,
            "admin@x/a",
            "<item nick='guest' role='none'><reason>spam</reason></item>",
        );
        let kicked = "affiliation='none' role='none' jid='guest@x/a'><actor nick='admin'/><reason>spam</reason></item";
        assert_eq!(
            show(&e),
            vec![
                "compliance role_change admin@x admin guest (guest@x): participant -> none: spam"
                    .to_string(),
                pres("guest", "admin@x/a", true, kicked, &[307]).replace("</item/>", "</item>"),
                pres("guest", "member@x/a", true, kicked, &[307]).replace("</item/>", "</item>"),
                pres("guest", "owner@x/a", true, kicked, &[307]).replace("</item/>", "</item>"),
                pres("guest", "guest@x/a", true, kicked, &[110, 307])
                    .replace("</item/>", "</item>"),
                format!("<iq type='result' id='a' from='{ROOM}' to='admin@x/a'/>"),
            ]
        );
        assert!(!r.is_occupant("guest@x/a"));
        // Kicked is not banned.
        assert!(!join(&mut r, "guest@x/a", "guest").is_empty() && r.is_occupant("guest@x/a"));
    }

    #[test]
    fn role_change_refusals() {
        let mut r = standard(RoomConfig::default());
        #[rustfmt::skip]
        let cases = [
            ("guest@x/a", "<item nick='member' role='none'/>", err("auth", "forbidden")),
            ("outsider@x/a", "<item nick='member' role='none'/>", err("auth", "forbidden")),
            ("admin@x/a", "<item nick='owner' role='none'/>", err("cancel", "not-allowed")),
            ("owner@x/a", "<item nick='admin' role='visitor'/>", err("cancel", "not-allowed")),
            ("admin@x/a", "<item nick='ghost' role='none'/>", err("cancel", "item-not-found")),
            ("admin@x/a", "<item nick='guest' role='emperor'/>", err("modify", "bad-request")),
            ("admin@x/a", "", err("modify", "bad-request")),
        ];
        for (from, items, expect) in cases {
            assert_eq!(
                error_of(&admin_set(&mut r, from, items)),
                expect,
                "{from} {items}"
            );
        }
        assert_eq!(r.occupant_count(), 4);
    }

    #[test]
    fn ban_and_atomicity() {
        let mut r = standard(RoomConfig::default());
        // The second item fails, so the first (a ban) must not happen.
        let e = admin_set(
            &mut r,
            "admin@x/a",
            "<item jid='guest@x' affiliation='outcast'/><item jid='owner@x' affiliation='none'/>",
        );
        assert_eq!(error_of(&e), err("cancel", "not-allowed"));
        assert!(r.is_occupant("guest@x/a"));
        assert!(r.record().affiliations.iter().all(|a| a.jid != "guest@x"));
        let e = admin_set(
            &mut r,
            "admin@x/a",
            "<item jid='Guest@X' affiliation='outcast'><reason>rude</reason></item>",
        );
        assert_eq!(
            show(&e)[..2],
            [
                "save".to_string(),
                "compliance affiliation_change admin@x admin guest@x: none -> outcast: rude".into()
            ]
        );
        let to_guest = sends_to(&e, "guest@x/a");
        assert_eq!(statuses(to_guest[0]), vec!["110", "301"]);
        assert!(to_guest[0]
            .to_xml()
            .contains("affiliation='outcast' role='none'"));
        assert_eq!(statuses(sends_to(&e, "owner@x/a")[0]), vec!["301"]);
        assert_eq!(
            error_of(&join(&mut r, "guest@x/other", "g")),
            err("auth", "forbidden")
        );
        // Banning someone not in the room works by JID.
        let e = admin_set(
            &mut r,
            "admin@x/a",
            "<item jid='absent@x' affiliation='outcast'/>",
        );
        assert_eq!(show(&e).len(), 3);
        assert!(r
            .record()
            .affiliations
            .iter()
            .any(|a| a.jid == "absent@x" && a.affiliation == Affiliation::Outcast));
    }

    #[test]
    fn affiliation_rights_table() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, ExpectedError)] = &[
            ("owner@x/a", "<item jid='guest@x' affiliation='owner'/>", None),
            ("owner@x/a", "<item jid='member@x' affiliation='admin'/>", None),
            ("owner@x/a", "<item jid='admin@x' affiliation='none'/>", None),
            ("owner@x/a", "<item jid='owner@x' affiliation='admin'/>", Some(("cancel", "conflict"))),
            ("admin@x/a", "<item jid='guest@x' affiliation='member'/>", None),
            ("admin@x/a", "<item jid='member@x' affiliation='none'/>", None),
            ("admin@x/a", "<item nick='guest' affiliation='member'/>", None),
            ("admin@x/a", "<item jid='guest@x' affiliation='admin'/>", Some(("auth", "forbidden"))),
            ("admin@x/a", "<item jid='owner@x' affiliation='outcast'/>", Some(("cancel", "not-allowed"))),
            ("admin@x/a", "<item jid='admin@x' affiliation='member'/>", Some(("cancel", "not-allowed"))),
            ("member@x/a", "<item jid='guest@x' affiliation='member'/>", Some(("auth", "forbidden"))),
            ("guest@x/a", "<item jid='guest@x' affiliation='member'/>", Some(("auth", "forbidden"))),
            ("admin@x/a", "<item nick='ghost' affiliation='member'/>", Some(("cancel", "item-not-found"))),
        ];
        for (from, items, expect) in cases {
            let mut r = standard(RoomConfig::default());
            let e = admin_set(&mut r, from, items);
            match expect {
                None => assert!(saved(&e).is_some(), "{from} {items}: {:?}", show(&e)),
                Some((ty, cond)) => assert_eq!(error_of(&e), err(ty, cond), "{from} {items}"),
            }
        }
    }

    #[test]
    fn affiliation_change_updates_occupant_presence() {
        let mut r = standard(RoomConfig::default());
        let e = admin_set(
            &mut r,
            "owner@x/a",
            "<item jid='guest@x' affiliation='admin'/>",
        );
        let p = sends_to(&e, "member@x/a")[0].to_xml();
        assert!(p.contains("affiliation='admin' role='moderator'"), "{p}");
        // Losing membership in a members-only room removes the occupant with 321.
        let mut r = standard(RoomConfig {
            members_only: true,
            ..RoomConfig::default()
        });
        let e = admin_set(
            &mut r,
            "owner@x/a",
            "<item jid='member@x' affiliation='none'/>",
        );
        assert_eq!(statuses(sends_to(&e, "member@x/a")[0]), vec!["110", "321"]);
        assert!(!r.is_occupant("member@x/a"));
    }

    #[test]
    fn lists() {
        let mut r = standard(RoomConfig::default());
        let get = |r: &mut MucRoom, from: &str, item: &str| {
            send(r, from, &format!("<iq id='l' type='get' to='{ROOM}'><query xmlns='{}'><item {item}/></query></iq>", ns::MUC_ADMIN))
        };
        let e = get(&mut r, "owner@x/a", "affiliation='member'");
        assert_eq!(show(&e), vec![format!(
            "<iq type='result' id='l' from='{ROOM}' to='owner@x/a'><query xmlns='{}'><item affiliation='member' jid='member@x'/></query></iq>",
            ns::MUC_ADMIN
        )]);
        assert!(show(&get(&mut r, "admin@x/a", "affiliation='owner'"))[0].contains("jid='owner@x'"));
        assert_eq!(
            error_of(&get(&mut r, "member@x/a", "affiliation='member'")),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&get(&mut r, "member@x/a", "affiliation='outcast'")),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&get(&mut r, "guest@x/a", "role='participant'")),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&get(&mut r, "owner@x/a", "affiliation='none'")),
            err("modify", "bad-request")
        );
        let e = get(&mut r, "admin@x/a", "role='moderator'");
        let xml = show(&e)[0].clone();
        assert!(
            xml.contains("nick='admin'")
                && xml.contains("nick='owner'")
                && !xml.contains("nick='guest'"),
            "{xml}"
        );
        // In a members-only room members may read the member list.
        let mut r = standard(RoomConfig {
            members_only: true,
            ..RoomConfig::default()
        });
        assert!(
            show(&get(&mut r, "member@x/a", "affiliation='member'"))[0].contains("type='result'")
        );
    }
}

mod owner {
    use super::*;

    fn submit(fields: &str) -> String {
        format!(
            "<iq id='c' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='jabber:x:data' type='submit'>{fields}</x></query></iq>",
            ns::MUC_OWNER
        )
    }

    fn field(var: &str, value: &str) -> String {
        format!("<field var='{var}'><value>{value}</value></field>")
    }

    #[test]
    fn only_owners() {
        let mut r = standard(RoomConfig::default());
        let get = format!(
            "<iq id='g' type='get' to='{ROOM}'><query xmlns='{}'/></iq>",
            ns::MUC_OWNER
        );
        assert_eq!(
            error_of(&send(&mut r, "admin@x/a", &get)),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&send(&mut r, "admin@x/a", &submit(""))),
            err("auth", "forbidden")
        );
        let destroy = format!(
            "<iq id='d' type='set' to='{ROOM}'><query xmlns='{}'><destroy/></query></iq>",
            ns::MUC_OWNER
        );
        assert_eq!(
            error_of(&send(&mut r, "member@x/a", &destroy)),
            err("auth", "forbidden")
        );
        let empty = format!(
            "<iq id='d' type='set' to='{ROOM}'><query xmlns='{}'/></iq>",
            ns::MUC_OWNER
        );
        assert_eq!(
            error_of(&send(&mut r, "owner@x/a", &empty)),
            err("modify", "bad-request")
        );
    }

    #[test]
    fn config_change_notifies_occupants() {
        let mut r = standard(RoomConfig::default());
        let e = send(
            &mut r,
            "owner@x/a",
            &submit(
                &(field("muc#roomconfig_roomname", "New")
                    + &field("muc#roomconfig_whois", "moderators")),
            ),
        );
        assert_eq!(
            show(&e)[..3],
            [
                "save".to_string(),
                "compliance config_change owner@x owner name,whois".into(),
                format!("<iq type='result' id='c' from='{ROOM}' to='owner@x/a'/>"),
            ]
        );
        assert_eq!(show(&sends_to(&e, "guest@x/a").into_iter().cloned().map(Effect::Send).collect::<Vec<_>>()), vec![format!(
            "<message type='groupchat' from='{ROOM}' to='guest@x/a'><x xmlns='{MUC_USER}'><status code='104'/><status code='173'/></x></message>"
        )]);
        let e = send(
            &mut r,
            "owner@x/a",
            &submit(&field("muc#roomconfig_whois", "anyone")),
        );
        assert_eq!(statuses(sends_to(&e, "guest@x/a")[0]), vec!["104", "172"]);
        // Nothing changed: only the result.
        let e = send(
            &mut r,
            "owner@x/a",
            &submit(&field("muc#roomconfig_whois", "anyone")),
        );
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn members_only_switch_removes_non_members() {
        let mut r = standard(RoomConfig::default());
        let e = send(
            &mut r,
            "owner@x/a",
            &submit(&field("muc#roomconfig_membersonly", "1")),
        );
        assert_eq!(show(&e)[..3], [
            "save".to_string(),
            "compliance config_change owner@x owner members_only".into(),
            "compliance role_change owner@x owner guest (guest@x): participant -> none (room became members-only)".into(),
        ]);
        let to_guest = sends_to(&e, "guest@x/a");
        assert_eq!(to_guest.len(), 1);
        assert_eq!(statuses(to_guest[0]), vec!["110", "322"]);
        assert_eq!(statuses(sends_to(&e, "member@x/a")[0]), vec!["322"]);
        assert_eq!(statuses(sends_to(&e, "member@x/a")[1]), vec!["104"]);
        assert!(!r.is_occupant("guest@x/a") && r.is_occupant("member@x/a"));
        assert_eq!(r.occupant_count(), 3);
    }

    #[test]
    fn destroy() {
        let mut r = standard(RoomConfig::default());
        let e = send(&mut r, "owner@x/a", &format!(
            "<iq id='d' type='set' to='{ROOM}'><query xmlns='{}'><destroy jid='other@conference.x'><reason>moved</reason></destroy></query></iq>",
            ns::MUC_OWNER
        ));
        assert_eq!(show(&e)[..4], [
            "compliance room_destroyed owner@x owner destroyed; alternate venue other@conference.x: moved".to_string(),
            "delete".into(),
            "announce Destroyed { reason: Some(\"moved\"), alternate: Some(\"other@conference.x\") }".into(),
            format!("<presence from='{ROOM}/admin' to='admin@x/a' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/>\
                     <destroy jid='other@conference.x'><reason>moved</reason></destroy></x></presence>"),
        ]);
        assert_eq!(e.len(), 8);
        assert_eq!(
            show(&e)[7],
            format!("<iq type='result' id='d' from='{ROOM}' to='owner@x/a'/>")
        );
        assert!(r.should_delete() && r.occupant_count() == 0 && !r.visible_to("owner@x"));
    }
}

mod discovery {
    use super::*;

    fn info(r: &mut MucRoom, from: &str) -> Vec<Effect> {
        send(
            r,
            from,
            &format!(
                "<iq id='i' type='get' to='{ROOM}'><query xmlns='{}'/></iq>",
                ns::DISCO_INFO
            ),
        )
    }

    #[test]
    fn disco_info_features_and_roominfo() {
        let mut r = standard(RoomConfig {
            name: "Desk".into(),
            description: "FX".into(),
            ..RoomConfig::default()
        });
        let e = info(&mut r, "anyone@y/a");
        let xml = show(&e)[0].clone();
        assert!(
            xml.contains("<identity category='conference' type='text' name='Desk'/>"),
            "{xml}"
        );
        for f in [
            "http://jabber.org/protocol/muc",
            "muc_public",
            "muc_open",
            "muc_unmoderated",
            "muc_persistent",
            "muc_unsecured",
            "muc_nonanonymous",
            "urn:xmpp:mam:2",
            "urn:xmpp:fulltext:0",
            "urn:xmpp:sid:0",
            "http://jabber.org/protocol/muc#stable_id",
        ] {
            assert!(
                xml.contains(&format!("<feature var='{f}'/>")),
                "{f} missing: {xml}"
            );
        }
        assert!(xml.contains("<field var='muc#roominfo_occupants' label='Number of occupants'><value>4</value></field>"), "{xml}");
        assert!(xml.contains("<field var='muc#roominfo_description' label='Description'><value>FX</value></field>"), "{xml}");
        let mut r = standard(RoomConfig {
            public: false,
            members_only: true,
            moderated: true,
            persistent: false,
            whois: Whois::Moderators,
            password: Some("p".into()),
            ..RoomConfig::default()
        });
        let xml = show(&info(&mut r, "member@x/a"))[0].clone();
        for f in [
            "muc_hidden",
            "muc_membersonly",
            "muc_moderated",
            "muc_temporary",
            "muc_passwordprotected",
            "muc_semianonymous",
        ] {
            assert!(
                xml.contains(&format!("<feature var='{f}'/>")),
                "{f} missing: {xml}"
            );
        }
    }

    #[test]
    fn secret_rooms_do_not_leak() {
        let secret = RoomConfig {
            public: false,
            members_only: true,
            ..RoomConfig::default()
        };
        let mut r = room(
            secret.clone(),
            &[
                ("member@x", Affiliation::Member),
                ("owner@x", Affiliation::Owner),
            ],
        );
        join(&mut r, "member@x/a", "member");
        #[rustfmt::skip]
        let probes = [
            format!("<iq id='i' type='get' to='{ROOM}'><query xmlns='{}'/></iq>", ns::DISCO_INFO),
            format!("<iq id='i' type='get' to='{ROOM}'><query xmlns='{}'/></iq>", ns::DISCO_ITEMS),
            format!("<iq id='i' type='get' to='{ROOM}'><ping xmlns='urn:xmpp:ping'/></iq>"),
            format!("<iq id='i' type='get' to='{ROOM}/member'><ping xmlns='urn:xmpp:ping'/></iq>"),
            format!("<iq id='i' type='get' to='{ROOM}'><query xmlns='{}'><item affiliation='member'/></query></iq>", ns::MUC_ADMIN),
            format!("<message type='groupchat' to='{ROOM}'><body>x</body></message>"),
            format!("<message type='chat' to='{ROOM}/member'><body>x</body></message>"),
            format!("<presence to='{ROOM}/spy'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        ];
        for p in &probes {
            assert_eq!(
                error_of(&send(&mut r, "stranger@y/a", p)),
                err("cancel", "item-not-found"),
                "{p}"
            );
        }
        assert!(!r.visible_to("stranger@y") && !r.can_read_archive("stranger@y"));
        // The owner, not in the room, still sees it.
        assert!(show(&info(&mut r, "owner@x/z"))[0].contains("type='result'"));
        // A hidden but open room: anyone may join, only occupants and members discover it.
        let mut hidden = room(
            RoomConfig {
                public: false,
                ..RoomConfig::default()
            },
            &[],
        );
        assert_eq!(
            error_of(&info(&mut hidden, "a@y/a")),
            err("cancel", "item-not-found")
        );
        join(&mut hidden, "a@y/a", "a");
        assert!(show(&info(&mut hidden, "a@y/a"))[0].contains("type='result'"));
        assert!(
            hidden.visible_to("a@y") && !hidden.visible_to("b@y") && hidden.can_read_archive("b@y")
        );
    }

    #[test]
    fn visibility_and_archive_access() {
        #[rustfmt::skip]
        let cases = [
            // (public, members_only, who, visible_to, can_read_archive)
            (true, false, "stranger@y", true, true),
            (true, false, "outcast@x", true, false),
            (false, false, "stranger@y", false, true),
            (false, false, "member@x", true, true),
            (true, true, "stranger@y", true, false),
            (true, true, "member@x", true, true),
            (false, true, "stranger@y", false, false),
            (false, true, "member@x", true, true),
            (false, true, "admin@x", true, true),
            (false, true, "Member@X", true, true),
        ];
        for (public, members_only, who, visible, archive) in cases {
            let r = room(
                RoomConfig {
                    public,
                    members_only,
                    ..RoomConfig::default()
                },
                &[
                    ("member@x", Affiliation::Member),
                    ("admin@x", Affiliation::Admin),
                    ("outcast@x", Affiliation::Outcast),
                ],
            );
            assert_eq!(
                r.visible_to(who),
                visible,
                "visible public={public} members_only={members_only} {who}"
            );
            assert_eq!(
                r.can_read_archive(who),
                archive,
                "archive public={public} members_only={members_only} {who}"
            );
        }
    }

    #[test]
    fn disco_items_only_for_occupants() {
        let mut r = standard(RoomConfig::default());
        let items = format!(
            "<iq id='i' type='get' to='{ROOM}'><query xmlns='{}'/></iq>",
            ns::DISCO_ITEMS
        );
        assert_eq!(
            show(&send(&mut r, "outsider@y/a", &items)),
            vec![format!(
                "<iq type='result' id='i' from='{ROOM}' to='outsider@y/a'><query xmlns='{}'/></iq>",
                ns::DISCO_ITEMS
            )]
        );
        let xml = show(&send(&mut r, "guest@x/a", &items))[0].clone();
        assert!(
            xml.contains(&format!("<item jid='{ROOM}/admin' name='admin'/>")),
            "{xml}"
        );
        assert_eq!(xml.matches("<item ").count(), 4);
    }

    #[test]
    fn pings_and_unknown_iqs() {
        let mut r = standard(RoomConfig::default());
        let ping = |to: &str| {
            format!("<iq id='p' type='get' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>")
        };
        assert_eq!(
            show(&send(&mut r, "outsider@y/a", &ping(ROOM))),
            vec![format!(
                "<iq type='result' id='p' from='{ROOM}' to='outsider@y/a'/>"
            )]
        );
        // XEP-0410 self-ping.
        let own = format!("{ROOM}/guest");
        assert_eq!(
            show(&send(&mut r, "guest@x/a", &ping(&own))),
            vec![format!(
                "<iq type='result' id='p' from='{own}' to='guest@x/a'/>"
            )]
        );
        assert_eq!(
            error_of(&send(&mut r, "outsider@y/a", &ping(&own))),
            err("cancel", "not-acceptable")
        );
        assert_eq!(
            error_of(&send(&mut r, "member@x/a", &ping(&own))),
            err("cancel", "service-unavailable")
        );
        let vcard = format!("<iq id='v' type='get' to='{ROOM}'><vCard xmlns='vcard-temp'/></iq>");
        let e = send(&mut r, "guest@x/a", &vcard);
        assert_eq!(error_of(&e), err("cancel", "service-unavailable"));
        let Effect::Send(el) = &e[0] else { panic!() };
        assert_eq!(
            (el.get_attr("from"), el.get_attr("to"), el.get_attr("id")),
            (Some(ROOM), Some("guest@x/a"), Some("v"))
        );
        assert!(send(
            &mut r,
            "guest@x/a",
            &format!("<iq id='r' type='result' to='{ROOM}'/>")
        )
        .is_empty());
        assert_eq!(
            error_of(&send(
                &mut r,
                "guest@x/a",
                &format!("<iq id='r' type='get' to='{ROOM}'/>")
            )),
            err("modify", "bad-request")
        );
    }
}

mod robustness {
    use super::*;

    /// Bad input changes nothing durable and never panics (brief invariant I7).
    #[test]
    fn odd_stanzas_change_nothing() {
        #[rustfmt::skip]
        let odd = [
            "<presence/>".to_string(),
            format!("<presence type='subscribe' to='{ROOM}/x'/>"),
            format!("<presence type='probe' to='{ROOM}'/>"),
            format!("<presence type='unavailable' to='{ROOM}/nobody'/>"),
            format!("<presence to='{ROOM}/n'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='-4' seconds='99999999999' since='yesterday'/></x></presence>"),
            format!("<message to='{ROOM}'/>"),
            format!("<message type='headline' to='{ROOM}'><body>x</body></message>"),
            format!("<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite/></x></message>"),
            format!("<message to='{ROOM}'><x xmlns='{MUC_USER}'><decline to='not a jid@@'/></x></message>"),
            format!("<message type='chat' to='{ROOM}/'><body>x</body></message>"),
            format!("<iq to='{ROOM}'><query xmlns='{}'/></iq>", ns::DISCO_INFO),
            format!("<iq type='set' to='{ROOM}'><query xmlns='{}'><item affiliation='owner'/></query></iq>", ns::MUC_ADMIN),
            format!("<iq type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='jabber:x:data'/></query></iq>", ns::MUC_OWNER),
            format!("<iq type='get' to='{ROOM}'><query xmlns='{}' node='x'/></iq>", ns::DISCO_INFO),
            format!("<iq type='get' to='{ROOM}/owner'><query xmlns='{}'/></iq>", ns::DISCO_INFO),
            format!("<foo to='{ROOM}'/>"),
        ];
        for from in ["guest@x/a", "owner@x/a", "stranger@y/z"] {
            let mut r = standard(RoomConfig::default());
            let before = r.record();
            for xml in &odd {
                let e = send(&mut r, from, xml);
                assert!(
                    saved(&e).is_none() && !e.contains(&Effect::Delete),
                    "{from} {xml}: {:?}",
                    show(&e)
                );
            }
            assert_eq!(r.record(), before);
        }
    }
}

/// Pool mode: what a room does with another server's decisions, and what it decides about
/// occupants connected to another server.
mod pool {
    use super::*;
    use pchat_room::{Role, RoomEvent};

    fn admin_set(r: &mut MucRoom, from: &str, items: &str) -> Vec<Effect> {
        send(
            r,
            from,
            &format!(
                "<iq id='a' type='set' to='{ROOM}'><query xmlns='{}'>{items}</query></iq>",
                ns::MUC_ADMIN
            ),
        )
    }

    /// The presence server `s2` publishes for its occupant `nick`.
    fn published(nick: &str, affiliation: &str, role: &str, jid: Option<&str>) -> Element {
        let jid = jid.map(|j| format!(" jid='{j}'")).unwrap_or_default();
        parse(&format!(
            "<presence from='{ROOM}/{nick}'><x xmlns='{MUC_USER}'><item affiliation='{affiliation}' role='{role}'{jid}/></x></presence>"
        ))
    }

    /// Every session's status codes for presence from `ROOM/nick`, in order of the effects.
    fn codes_from(effects: &[Effect], nick: &str) -> Vec<(String, Vec<String>)> {
        let from = format!("{ROOM}/{nick}");
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(p) if p.name == "presence" && p.get_attr("from") == Some(&from) => {
                    Some((p.get_attr("to").unwrap_or_default().to_owned(), statuses(p)))
                }
                _ => None,
            })
            .collect()
    }

    /// A record saved by another server, taken over here: each case names what the other
    /// server changed and what this server's occupants must be told (the victim with 110).
    #[test]
    fn adopting_a_record_removes_and_tells_why() {
        type Edit = fn(&mut RoomRecord);
        fn set(r: &mut RoomRecord, jid: &str, a: Affiliation, reason: Option<&str>) {
            r.affiliations.retain(|e| e.jid != jid);
            r.affiliations.push(AffiliationEntry {
                jid: jid.into(),
                affiliation: a,
                reason: reason.map(Into::into),
            });
        }
        let open = RoomConfig::default();
        let closed = RoomConfig {
            members_only: true,
            ..RoomConfig::default()
        };
        #[rustfmt::skip]
        /// (case, config, change, victim, victim's codes, item the others see)
        type Case<'a> = (&'a str, &'a RoomConfig, Edit, &'a str, &'a [&'a str], &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                "ban",
                &open,
                |r| set(r, "guest@x", Affiliation::Outcast, Some("spam")),
                "guest",
                &["110", "301"],
                "affiliation='outcast' role='none'",
            ),
            (
                "membership revoked",
                &closed,
                |r| r.affiliations.retain(|e| e.jid != "member@x"),
                "member",
                &["110", "321"],
                "affiliation='none' role='none'",
            ),
            (
                "became members-only",
                &open,
                |r| r.config.members_only = true,
                "guest",
                &["110", "322"],
                "affiliation='none' role='none'",
            ),
            (
                "became moderated",
                &open,
                |r| r.config.moderated = true,
                "guest",
                &["110"],
                "affiliation='none' role='visitor'",
            ),
        ];
        for (name, config, edit, victim, victim_codes, item) in cases {
            let mut r = standard(config.clone());
            let mut record = r.record();
            edit(&mut record);
            let e = r.adopt_record(record);
            assert!(
                !e.iter().any(|e| matches!(
                    e,
                    Effect::Save(_) | Effect::Compliance(_) | Effect::Delete | Effect::Announce(_)
                )),
                "{name}: the deciding server saved and recorded it: {:?}",
                show(&e)
            );
            let full = format!("{victim}@x/a");
            let to_victim = sends_to(&e, &full);
            assert_eq!(
                statuses(to_victim[0]),
                *victim_codes,
                "{name}: {:?}",
                show(&e)
            );
            let to_owner = sends_to(&e, "owner@x/a");
            let shown = to_owner[0].to_xml();
            assert!(shown.contains(item), "{name}: the owner sees {shown}");
            if name == "ban" {
                assert!(shown.contains("<reason>spam</reason>"), "{shown}");
            }
            let removed = victim_codes.len() > 1;
            assert_eq!(r.is_occupant(&full), !removed, "{name}");
            // Configuration changes are announced with 104 (here: after the presence).
            let notice = to_owner
                .iter()
                .any(|m| m.name == "message" && statuses(m) == ["104"]);
            assert_eq!(notice, name.starts_with("became"), "{name}: {:?}", show(&e));
        }
        // Taking over the same record again changes nothing.
        let mut r = standard(open.clone());
        let record = r.record();
        assert!(r.adopt_record(record).is_empty());
    }

    #[test]
    fn a_moderated_room_silences_whoever_another_server_no_longer_lets_speak() {
        let mut r = standard(RoomConfig::default());
        let mut record = r.record();
        record.config.moderated = true;
        r.adopt_record(record);
        let m = format!("<message to='{ROOM}' type='groupchat'><body>hi</body></message>");
        assert_eq!(
            error_of(&send(&mut r, "guest@x/a", &m)),
            err("auth", "forbidden")
        );
        assert_eq!(
            error_of(&send(&mut r, "member@x/a", &m)),
            err("auth", "forbidden")
        );
        assert!(matches!(
            send(&mut r, "admin@x/a", &m)[..],
            [Effect::Publish(_)]
        ));
    }

    #[test]
    fn a_kick_of_an_occupant_elsewhere_is_decided_here_and_applied_there() {
        // s1: the owner is here, bob is on s2.
        let mut s1 = standard(RoomConfig::default());
        s1.note_remote_presence(
            "s2",
            "bob",
            Some(&published("bob", "none", "participant", Some("bob@x/r"))),
        );
        s1.note_remote_presence(
            "s2",
            "boss",
            Some(&published("boss", "owner", "moderator", None)),
        );
        assert_eq!(s1.occupant_count(), 6);
        let e = admin_set(
            &mut s1,
            "admin@x/a",
            "<item nick='bob' role='none'><reason>spam</reason></item>",
        );
        assert_eq!(show(&e), vec![
            "compliance role_change admin@x admin bob (bob@x, on server s2): participant -> none: spam".to_string(),
            "announce Role { server: \"s2\", nick: \"bob\", role: None, actor_role: Moderator, actor_affiliation: Admin, actor_nick: Some(\"admin\"), reason: Some(\"spam\") }".into(),
            format!("<iq type='result' id='a' from='{ROOM}' to='admin@x/a'/>"),
        ]);
        // The same rules as for an occupant here.
        #[rustfmt::skip]
        let refusals = [
            ("guest@x/a", "<item nick='bob' role='none'/>", err("auth", "forbidden")),
            ("admin@x/a", "<item nick='boss' role='none'/>", err("cancel", "not-allowed")),
            ("admin@x/a", "<item nick='nobody' role='none'/>", err("cancel", "item-not-found")),
        ];
        for (from, items, expect) in refusals {
            assert_eq!(
                error_of(&admin_set(&mut s1, from, items)),
                expect,
                "{from} {items}"
            );
        }
        // A ban by nick finds the occupant elsewhere by the JID its presence shows.
        let e = admin_set(
            &mut s1,
            "owner@x/a",
            "<item nick='bob' affiliation='outcast'/>",
        );
        assert!(saved(&e)
            .unwrap()
            .affiliations
            .iter()
            .any(|a| a.jid == "bob@x" && a.affiliation == Affiliation::Outcast));
        assert_eq!(
            error_of(&admin_set(
                &mut s1,
                "owner@x/a",
                "<item nick='boss' affiliation='none'/>"
            )),
            err("cancel", "item-not-found"),
            "no JID shown, no change by nick"
        );
        s1.note_remote_presence("s2", "bob", None);
        assert_eq!(s1.occupant_count(), 5);

        // s2: bob is here; the event names this server.
        let mut s2 = standard(RoomConfig::default());
        join(&mut s2, "bob@x/r", "bob");
        let role_event = |nick: &str, role, actor_affiliation| RoomEvent::Role {
            server: "s2".into(),
            nick: nick.into(),
            role,
            actor_role: Role::Moderator,
            actor_affiliation,
            actor_nick: Some("admin".into()),
            reason: Some("spam".into()),
        };
        let event = role_event("bob", Role::None, Affiliation::Admin);
        assert!(
            s2.adopt_event(&event, "s3").is_empty(),
            "another server's occupant"
        );
        let e = s2.adopt_event(&event, "s2");
        let kicked = "affiliation='none' role='none' jid='bob@x/r'><actor nick='admin'/><reason>spam</reason></item";
        assert_eq!(
            sends_to(&e, "bob@x/r")
                .iter()
                .map(|p| p.to_xml_in(ns::CLIENT))
                .collect::<Vec<_>>(),
            vec![pres("bob", "bob@x/r", true, kicked, &[110, 307]).replace("</item/>", "</item>")]
        );
        assert_eq!(
            codes_from(&e, "bob").len(),
            5,
            "every occupant here is told"
        );
        assert!(!s2.is_occupant("bob@x/r"));
        assert!(s2.adopt_event(&event, "s2").is_empty(), "applied once");
        // Voice revoked elsewhere: the visitor may no longer speak.
        let silence = role_event("guest", Role::Visitor, Affiliation::Admin);
        let e = s2.adopt_event(&silence, "s2");
        assert!(sends_to(&e, "guest@x/a")[0]
            .to_xml()
            .contains("role='visitor'"));
        let m = format!("<message to='{ROOM}' type='groupchat'><body>hi</body></message>");
        assert_eq!(
            error_of(&send(&mut s2, "guest@x/a", &m)),
            err("auth", "forbidden")
        );
        // The rule is checked again where the occupant is: a member made moderator on s1
        // cannot kick an admin on s2.
        let protected = role_event("admin", Role::None, Affiliation::Member);
        assert!(s2.adopt_event(&protected, "s2").is_empty());
        assert!(s2.is_occupant("admin@x/a"));
    }

    #[test]
    fn a_room_destroyed_elsewhere_is_gone_here_with_its_reason() {
        let mut r = standard(RoomConfig::default());
        let e = r.adopt_event(
            &RoomEvent::Destroyed {
                reason: Some("moved".into()),
                alternate: Some("other@conference.x".into()),
            },
            "s2",
        );
        assert_eq!(show(&e)[0], format!(
            "<presence from='{ROOM}/admin' to='admin@x/a' type='unavailable'><x xmlns='{MUC_USER}'><item affiliation='none' role='none'/>\
             <destroy jid='other@conference.x'><reason>moved</reason></destroy></x></presence>"
        ));
        assert_eq!(
            e.len(),
            4,
            "one per session, nothing to delete or record: {:?}",
            show(&e)
        );
        assert!(r.should_delete() && r.occupant_count() == 0 && !r.can_read_archive("owner@x"));
        assert!(r.adopt_deleted().is_empty(), "gone once");
        // Its record gone without a word (the event was lost): gone all the same.
        let mut r = standard(RoomConfig::default());
        let e = r.adopt_deleted();
        assert_eq!(e.len(), 4);
        assert!(show(&e)[0].contains("<destroy/>"), "{:?}", show(&e));
        // A room still being created here has no record yet: nothing happens.
        let mut r = MucRoom::create(ROOM, "owner@x/a", NOW, &service());
        join(&mut r, "owner@x/a", "owner");
        assert!(r.adopt_deleted().is_empty() && r.is_occupant("owner@x/a"));
    }

    #[test]
    fn a_temporary_room_empty_here_but_not_elsewhere_stays() {
        let mut r = room(
            RoomConfig {
                persistent: false,
                ..RoomConfig::default()
            },
            &[("owner@x", Affiliation::Owner)],
        );
        join(&mut r, "owner@x/a", "owner");
        r.note_remote_presence(
            "s2",
            "bob",
            Some(&published("bob", "none", "participant", None)),
        );
        let e = send(
            &mut r,
            "owner@x/a",
            &format!("<presence to='{ROOM}/owner' type='unavailable'/>"),
        );
        assert!(
            !e.iter().any(|e| matches!(e, Effect::Delete)),
            "{:?}",
            show(&e)
        );
        join(&mut r, "owner@x/a", "owner");
        r.note_remote_presence("s2", "bob", None);
        let e = send(
            &mut r,
            "owner@x/a",
            &format!("<presence to='{ROOM}/owner' type='unavailable'/>"),
        );
        assert!(
            e.iter().any(|e| matches!(e, Effect::Delete)),
            "{:?}",
            show(&e)
        );
    }
}
