//! Content control from a client's side (Lync's Remove-CsPersistentChatMessage and
//! Clear-CsPersistentChatRoom, shown to XMPP clients as XEP-0425 moderation): a removed
//! message is gone from MAM, search and history on join, occupants are told, the compliance
//! record keeps the original; a cleared history never hands its ids out again.

use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{ns, stanza_id, Client, ServerOptions, TestServer};

type R = anyhow::Result<()>;

const ROOM: &str = "talk@conference.localhost";
const T: Duration = Duration::from_secs(10);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

async fn shell(s: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let out = s.run_cli_ok(args.iter().copied()).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn shell_fails(s: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let out = s.run_cli(args.iter().copied()).await?;
    assert!(!out.status.success(), "{args:?} must fail");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn login(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    Ok(
        s.client(&format!("{user}@localhost"), &format!("{user}-pw"))
            .await?,
    )
}

/// The retraction notice for message `id`, with its reason.
async fn retraction(c: &mut Client, id: &str) -> anyhow::Result<String> {
    let m = c
        .recv_until(T, |s| {
            s.is("message", ns::CLIENT)
                && s.child("retract", "urn:xmpp:message-retract:1")
                    .is_some_and(|r| r.attr("id") == Some(id))
        })
        .await?;
    let r = m.child("retract", "urn:xmpp:message-retract:1").unwrap();
    assert!(
        r.child("moderated", "urn:xmpp:message-moderate:1")
            .is_some(),
        "{m}"
    );
    Ok(r.child("reason", "urn:xmpp:message-retract:1")
        .map(|e| e.text())
        .unwrap_or_default())
}

#[tokio::test]
async fn an_administrator_removes_a_message_and_clears_a_history() -> R {
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in ["ann", "bob", "cat"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    shell(
        &s,
        &[
            "room",
            "new",
            "talk",
            "--privacy",
            "open",
            "--manager",
            "ann@localhost",
        ],
    )
    .await?;
    let mut ann = login(&s, "ann").await?;
    ann.join_room(ROOM, "ann", None).await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    let mut ids = Vec::new();
    for body in ["one", "secret two", "three"] {
        let ack = ann.send_groupchat(ROOM, body, None).await?;
        ids.push(stanza_id(&ack, ROOM).expect("a stanza-id"));
    }

    // Removed: both occupants are told, with the reason.
    shell(
        &s,
        &[
            "message",
            "remove",
            "talk",
            &ids[1],
            "--reason",
            "customer data",
        ],
    )
    .await?;
    for c in [&mut ann, &mut bob] {
        assert_eq!(retraction(c, &ids[1]).await?, "customer data");
    }
    // MAM keeps the id with a tombstone and no text; search no longer finds it.
    let page = bob.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.ids(), ids, "every id stays");
    assert_eq!(
        page.bodies(),
        ["one", "three"],
        "no text of the removed one"
    );
    let tomb = page.messages()[1].to_string();
    assert!(
        tomb.contains("retracted") && !tomb.contains("secret"),
        "{tomb}"
    );
    let found = bob
        .mam_query(ROOM, &[("{urn:xmpp:fulltext:0}fulltext", "secret")], None)
        .await?;
    assert!(found.messages().is_empty(), "search still finds it");
    // A newcomer's history on join does not show it.
    let mut cat = login(&s, "cat").await?;
    let joined = cat.join_room(ROOM, "cat", None).await?;
    assert_eq!(joined.history_bodies(), ["one", "three"]);

    // Replaced: the administrator's text instead.
    shell(
        &s,
        &[
            "message",
            "remove",
            "talk",
            &ids[0],
            "--replace",
            "[removed by the desk]",
        ],
    )
    .await?;
    retraction(&mut bob, &ids[0]).await?;
    let page = bob.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.bodies(), ["[removed by the desk]", "three"]);
    let err = shell_fails(&s, &["message", "remove", "talk", "999"]).await?;
    assert!(err.contains("no message 999"), "{err}");

    // The compliance record keeps the original and says who removed it.
    let log = shell(&s, &["compliance", "list", "--limit", "1000"]).await?;
    assert!(log.contains("secret two"), "{log}");
    assert!(
        log.contains("message_removed") && log.contains("customer data"),
        "{log}"
    );

    // Clearing needs --yes and says how much it deletes; afterwards MAM is empty and the
    // next message gets an id above every earlier one.
    let err = shell_fails(&s, &["room", "clear", "talk", "--before", "2099-01-01"]).await?;
    assert!(
        err.contains("3 message(s)") && err.contains("--yes"),
        "{err}"
    );
    let out = shell(
        &s,
        &["room", "clear", "talk", "--before", "2099-01-01", "--yes"],
    )
    .await?;
    assert!(out.contains("3 message(s)"), "{out}");
    assert!(bob.mam_query(ROOM, &[], None).await?.messages().is_empty());
    let ack = ann.send_groupchat(ROOM, "four", None).await?;
    let next: i64 = stanza_id(&ack, ROOM).unwrap().parse()?;
    let last: i64 = ids[2].parse()?;
    assert!(next > last, "id {next} after {last}: an id is never reused");
    let err = shell_fails(&s, &["room", "clear", "talk", "--before", "yesterday"]).await?;
    assert!(err.contains("is not a date"), "{err}");
    Ok(())
}

/// XEP-0425: a moderator removes a message from the client; a participant may not.
#[tokio::test]
async fn a_moderator_removes_a_message_and_a_participant_may_not() -> R {
    use pchat_testkit::Element;
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in ["ann", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    shell(
        &s,
        &[
            "room",
            "new",
            "talk",
            "--privacy",
            "open",
            "--manager",
            "ann@localhost",
        ],
    )
    .await?;
    let mut ann = login(&s, "ann").await?;
    ann.join_room(ROOM, "ann", None).await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    let info = bob.disco_info(ROOM).await?;
    assert!(
        info.features
            .iter()
            .any(|f| f == "urn:xmpp:message-moderate:1"),
        "{:?}",
        info.features
    );
    let ack = bob.send_groupchat(ROOM, "buy my course", None).await?;
    let id = stanza_id(&ack, ROOM).expect("a stanza-id");
    let moderate = |id: &str| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", ROOM)
            .with_child(
                Element::new("moderate", "urn:xmpp:message-moderate:1")
                    .with_attr("id", id)
                    .with_child(Element::new("retract", "urn:xmpp:message-retract:1"))
                    .with_child(
                        Element::new("reason", "urn:xmpp:message-moderate:1").with_text("spam"),
                    ),
            )
    };
    let e = bob.iq_result(moderate(&id), T).await.unwrap_err();
    assert!(format!("{e}").contains("forbidden"), "{e}");
    let e = ann.iq_result(moderate("424242"), T).await.unwrap_err();
    assert!(format!("{e}").contains("item-not-found"), "{e}");
    ann.iq_result(moderate(&id), T).await?;
    for c in [&mut ann, &mut bob] {
        assert_eq!(retraction(c, &id).await?, "spam");
    }
    let page = ann.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.ids(), std::slice::from_ref(&id));
    assert!(page.bodies().is_empty(), "{:?}", page.bodies());
    let tomb = page.messages()[0].to_string();
    assert!(
        tomb.contains("talk@conference.localhost/ann"),
        "by the moderator: {tomb}"
    );
    let log = shell(&s, &["compliance", "list", "--limit", "100"]).await?;
    assert!(
        log.contains("message_removed") && log.contains("buy my course"),
        "{log}"
    );
    Ok(())
}

/// A chat state (no body) reaches the other occupants but is not archived: MAM and history
/// on join hold only messages with text.
#[tokio::test]
async fn messages_without_a_body_are_relayed_not_archived() -> R {
    use pchat_testkit::Element;
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in ["ann", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    shell(&s, &["room", "new", "talk", "--privacy", "open"]).await?;
    let mut ann = login(&s, "ann").await?;
    ann.join_room(ROOM, "ann", None).await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    ann.send_groupchat(ROOM, "hello", None).await?;
    bob.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", ROOM)
            .with_attr("type", "groupchat")
            .with_child(Element::new(
                "composing",
                "http://jabber.org/protocol/chatstates",
            )),
    )
    .await?;
    let state = ann
        .recv_until(T, |st| {
            st.child("composing", "http://jabber.org/protocol/chatstates")
                .is_some()
        })
        .await?;
    assert_eq!(state.attr("from"), Some("talk@conference.localhost/bob"));
    assert!(stanza_id(&state, ROOM).is_none(), "not archived: {state}");
    let page = ann.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.bodies(), ["hello"]);
    assert_eq!(page.messages().len(), 1);
    Ok(())
}

/// XEP-0424: an occupant retracts its own message (the archive keeps a tombstone, the
/// retraction is a message everyone sees); retracting someone else's is refused.
#[tokio::test]
async fn an_author_retracts_its_own_message_and_no_one_elses() -> R {
    use pchat_testkit::Element;
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in ["ann", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    shell(&s, &["room", "new", "talk", "--privacy", "open"]).await?;
    let mut ann = login(&s, "ann").await?;
    ann.join_room(ROOM, "ann", None).await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    let ack = bob.send_groupchat(ROOM, "oops, wrong room", None).await?;
    let id = stanza_id(&ack, ROOM).expect("a stanza-id");
    let retract = |id: &str, mid: &str| {
        Element::new("message", ns::CLIENT)
            .with_attr("to", ROOM)
            .with_attr("type", "groupchat")
            .with_attr("id", mid)
            .with_child(Element::new("retract", "urn:xmpp:message-retract:1").with_attr("id", id))
            .with_child(
                Element::new("fallback", "urn:xmpp:fallback:0")
                    .with_attr("for", "urn:xmpp:message-retract:1"),
            )
            .with_child(Element::new("body", ns::CLIENT).with_text(
                "/me retracted a previous message, but it's unsupported by your client.",
            ))
    };
    // Ann may not retract bob's message.
    ann.send(&retract(&id, "r1")).await?;
    let refused = ann
        .recv_until(T, |st| {
            st.attr("id") == Some("r1") && st.attr("type") == Some("error")
        })
        .await?;
    assert!(refused.to_string().contains("forbidden"), "{refused}");
    // Bob may: everyone sees the retraction, the archive keeps a tombstone.
    bob.send(&retract(&id, "r2")).await?;
    let seen = ann
        .recv_until(T, |st| {
            st.child("retract", "urn:xmpp:message-retract:1")
                .is_some_and(|r| r.attr("id") == Some(id.as_str()))
        })
        .await?;
    assert_eq!(seen.attr("from"), Some("talk@conference.localhost/bob"));
    let page = ann.mam_query(ROOM, &[], None).await?;
    let bodies = page.bodies();
    assert!(!bodies.iter().any(|b| b.contains("oops")), "{bodies:?}");
    assert!(
        page.messages()[0].to_string().contains("retracted"),
        "the tombstone"
    );
    Ok(())
}

/// Lync's Remove-CsPersistentChatMessage with filters: by sender, words and dates; without
/// --yes the matches are only counted.
#[tokio::test]
async fn an_administrator_removes_every_match_of_a_filter() -> R {
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in ["ann", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    shell(&s, &["room", "new", "talk", "--privacy", "open"]).await?;
    let mut ann = login(&s, "ann").await?;
    ann.join_room(ROOM, "ann", None).await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    ann.send_groupchat(ROOM, "card 1234", None).await?;
    bob.send_groupchat(ROOM, "card 5678", None).await?;
    ann.send_groupchat(ROOM, "hello", None).await?;
    let out = shell(&s, &["message", "remove", "talk", "--words", "card"]).await?;
    assert!(out.contains("2 message(s) match"), "{out}");
    assert_eq!(
        ann.mam_query(ROOM, &[], None).await?.bodies().len(),
        3,
        "counted only"
    );
    let out = shell(
        &s,
        &[
            "message",
            "remove",
            "talk",
            "--user",
            "bob@localhost",
            "--words",
            "card",
            "--yes",
        ],
    )
    .await?;
    assert!(out.contains("1 message(s) removed"), "{out}");
    assert_eq!(
        ann.mam_query(ROOM, &[], None).await?.bodies(),
        ["card 1234", "hello"]
    );
    let out = shell(
        &s,
        &[
            "message",
            "remove",
            "talk",
            "--from",
            "2000-01-01",
            "--to",
            "2099-01-01",
            "--replace",
            "[removed]",
            "--yes",
        ],
    )
    .await?;
    assert!(out.contains("2 message(s) replaced"), "{out}");
    assert_eq!(
        ann.mam_query(ROOM, &[], None).await?.bodies(),
        ["[removed]", "[removed]"]
    );
    let err = shell_fails(&s, &["message", "remove", "talk"]).await?;
    assert!(err.contains("filter with"), "{err}");
    Ok(())
}

/// The `<occupant-id/>` of a stanza (XEP-0421), if any.
fn occupant_id(s: &pchat_testkit::Element) -> Option<String> {
    s.child("occupant-id", "urn:xmpp:occupant-id:0")
        .and_then(|o| o.attr("id"))
        .map(str::to_owned)
}

#[tokio::test]
async fn occupants_carry_a_stable_id_the_room_gives_and_clients_cannot_forge() -> R {
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in ["ann", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    let mut ann = login(&s, "ann").await?;
    let joined = ann.join_room(ROOM, "ann", None).await?;
    let ann_id = occupant_id(&joined.self_presence).expect("self-presence has an occupant-id");
    let info = ann.disco_info(ROOM).await?;
    assert!(
        info.features.iter().any(|f| f == "urn:xmpp:occupant-id:0"),
        "{:?}",
        info.features
    );
    // A message carries the same id; one the client put there is replaced, not kept.
    let forged = pchat_testkit::Element::new("message", ns::CLIENT)
        .with_attr("to", ROOM)
        .with_attr("type", "groupchat")
        .with_attr("id", "f1")
        .with_child(pchat_testkit::Element::new("body", ns::CLIENT).with_text("hello"))
        .with_child(pchat_testkit::Element::new("origin-id", ns::SID).with_attr("id", "f1"))
        .with_child(
            pchat_testkit::Element::new("occupant-id", "urn:xmpp:occupant-id:0")
                .with_attr("id", "bob-really"),
        );
    ann.send(&forged).await?;
    let echo = ann
        .recv_until(T, |m| {
            m.is("message", ns::CLIENT) && pchat_testkit::origin_id(m).as_deref() == Some("f1")
        })
        .await?;
    let ids: Vec<_> = echo
        .children()
        .filter(|c| c.is("occupant-id", "urn:xmpp:occupant-id:0"))
        .collect();
    assert_eq!(ids.len(), 1, "{echo}");
    assert_eq!(occupant_id(&echo).as_deref(), Some(ann_id.as_str()));

    // bob sees ann by the same id, has his own, and ann keeps hers across a nick change.
    let mut bob = login(&s, "bob").await?;
    let bj = bob.join_room(ROOM, "bob", None).await?;
    let bob_id = occupant_id(&bj.self_presence).expect("bob's id");
    assert_ne!(bob_id, ann_id);
    let ann_seen = bj
        .presences
        .iter()
        .find(|p| p.attr("from") == Some(&format!("{ROOM}/ann")[..]))
        .expect("ann's presence");
    assert_eq!(occupant_id(ann_seen).as_deref(), Some(ann_id.as_str()));
    let history = bj.history.first().expect("history on join");
    assert_eq!(occupant_id(history).as_deref(), Some(ann_id.as_str()));
    ann.send(
        &pchat_testkit::Element::new("presence", ns::CLIENT)
            .with_attr("to", format!("{ROOM}/anne")),
    )
    .await?;
    let renamed = bob
        .recv_until(T, |p| {
            p.is("presence", ns::CLIENT) && p.attr("from") == Some(&format!("{ROOM}/anne")[..])
        })
        .await?;
    assert_eq!(occupant_id(&renamed).as_deref(), Some(ann_id.as_str()));
    // The archive keeps it; another room gives ann another id.
    let page = bob.mam_query(ROOM, &[], None).await?;
    let archived = page.results.first().expect("an archived message");
    assert!(
        archived.to_xml().contains(&ann_id),
        "MAM keeps the occupant-id: {archived}"
    );
    let other = ann
        .join_room("other@conference.localhost", "ann", None)
        .await?;
    assert_ne!(occupant_id(&other.self_presence), Some(ann_id.clone()));
    // The id survives a restart of the server (it is derived from the store's secret).
    drop((ann, bob));
    let mut s = s;
    s.restart().await?;
    let mut ann = login(&s, "ann").await?;
    let again = ann.join_room(ROOM, "ann", None).await?;
    assert_eq!(occupant_id(&again.self_presence), Some(ann_id));
    Ok(())
}
