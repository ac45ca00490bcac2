//! Lync's room model from a client's side, on one standalone server: categories whose walls
//! keep users out of every way into a room (join, history, MAM, disco, invitations), local
//! groups (nested) as principals, rooms made and changed from the shell while the server
//! runs (Closed by default), disabled rooms, and room creation limited to a category's
//! creators. Every change is made with the real `pchat` shell commands.

use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{
    ns, stanza_id, status_codes, Client, Element, Error, ServerOptions, TestServer,
};

type R = anyhow::Result<()>;

const ROOMS: &str = "conference.localhost";
const T: Duration = Duration::from_secs(10);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn room(name: &str) -> String {
    format!("{name}@{ROOMS}")
}

async fn server(users: &[&str]) -> anyhow::Result<TestServer> {
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    for u in users {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    Ok(s)
}

async fn login(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    Ok(
        s.client(&format!("{user}@localhost"), &format!("{user}-pw"))
            .await?,
    )
}

/// Runs a shell command that must succeed; returns its standard output.
async fn shell(s: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let out = s.run_cli_ok(args.iter().copied()).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a shell command that must fail; returns its standard error.
async fn shell_fails(s: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let out = s.run_cli(args.iter().copied()).await?;
    assert!(
        !out.status.success(),
        "{args:?} must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn condition(e: &Error) -> Option<&str> {
    match e {
        Error::Stanza { error, .. } => Some(error.condition.as_str()),
        _ => None,
    }
}

/// Waits for this client's own unavailable presence from `room` and returns its status codes
/// and reason.
async fn removed_from(c: &mut Client, room: &str) -> anyhow::Result<(Vec<u16>, String)> {
    let p = c
        .recv_until(T, |s| {
            s.is("presence", ns::CLIENT)
                && s.attr("type") == Some("unavailable")
                && s.attr("from").is_some_and(|f| f.starts_with(room))
                && status_codes(s).contains(&110)
        })
        .await?;
    let reason = p
        .child("x", ns::MUC_USER)
        .and_then(|x| x.child("item", ns::MUC_USER))
        .and_then(|i| i.child("reason", ns::MUC_USER))
        .map(|r| r.text())
        .unwrap_or_default();
    Ok((status_codes(&p), reason))
}

/// The traders-and-analysts wall of the reference: everyone of the domain is allowed in the
/// trading category except the analysts group (nested: ana is in it through a sub-group).
async fn trading_wall(s: &TestServer) -> R {
    shell(s, &["group", "new", "desk1", "--member", "ann@localhost"]).await?;
    shell(
        s,
        &[
            "group",
            "new",
            "traders",
            "--member",
            "group:desk1",
            "--member",
            "tom@localhost",
        ],
    )
    .await?;
    shell(
        s,
        &["group", "new", "research", "--member", "ana@localhost"],
    )
    .await?;
    shell(
        s,
        &["group", "new", "analysts", "--member", "group:research"],
    )
    .await?;
    shell(
        s,
        &[
            "category",
            "new",
            "trading",
            "--add-allowed",
            "@localhost",
            "--add-denied",
            "group:analysts",
            "--add-creator",
            "group:traders",
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_wall_keeps_a_user_out_of_every_way_into_a_room() -> R {
    let s = server(&["ann", "tom", "ana"]).await?;
    trading_wall(&s).await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "desk",
            "--category",
            "trading",
            "--privacy",
            "open",
            "--manager",
            "ann@localhost",
        ],
    )
    .await?;
    let desk = room("desk");

    let mut ann = login(&s, "ann").await?;
    ann.join_room(&desk, "ann", None).await?;
    ann.send_groupchat(&desk, "buy at 42", None).await?;

    let mut ana = login(&s, "ana").await?;
    // Join: the room does not exist for her.
    let e = ana.join_room(&desk, "ana", None).await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    // The room list does not show it; disco#info and MAM do not answer about it.
    let items = ana.disco_items(ROOMS).await?;
    assert!(items.iter().all(|i| i.jid != desk), "{items:?}");
    let e = ana.disco_info(&desk).await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    let e = ana.mam_query(&desk, &[], None).await.unwrap_err();
    assert!(
        matches!(condition(&e), Some("forbidden" | "item-not-found")),
        "{e}"
    );
    // Tom, a trader, sees it listed.
    let mut tom = login(&s, "tom").await?;
    let items = tom.disco_items(ROOMS).await?;
    assert!(items.iter().any(|i| i.jid == desk), "{items:?}");

    // An invitation to her is refused, and she gets nothing.
    ann.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", desk.clone())
            .with_attr("id", "inv1")
            .with_child(
                Element::new("x", ns::MUC_USER).with_child(
                    Element::new("invite", ns::MUC_USER).with_attr("to", "ana@localhost"),
                ),
            ),
    )
    .await?;
    let refused = ann
        .recv_until(T, |s| {
            s.is("message", ns::CLIENT)
                && s.attr("type") == Some("error")
                && s.attr("id") == Some("inv1")
        })
        .await?;
    assert!(refused.to_string().contains("not-allowed"), "{refused}");
    assert!(
        ana.collect_for(Duration::from_millis(500))
            .await?
            .iter()
            .all(|st| !st.to_string().contains("invite")),
        "no invitation reaches her"
    );

    // The shell refuses to make her a member.
    let err = shell_fails(
        &s,
        &["room", "set", "desk", "--add-member", "ana@localhost"],
    )
    .await?;
    assert!(err.contains("does not allow ana@localhost"), "{err}");

    // Tom joins, then his group is walled off: he leaves at once with 321 and cannot
    // come back; his messages never reach the room after that.
    tom.join_room(&desk, "tom", None).await?;
    shell(&s, &["group", "add", "research", "tom@localhost"]).await?;
    let (codes, reason) = removed_from(&mut tom, &desk).await?;
    assert!(codes.contains(&321), "{codes:?}");
    assert!(reason.contains("category"), "{reason}");
    let e = tom.join_room(&desk, "tom", None).await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");

    // Taking him out of the group lets him in again, history intact.
    shell(&s, &["group", "remove", "research", "tom@localhost"]).await?;
    let joined = tom.join_room(&desk, "tom", None).await?;
    assert_eq!(joined.history_bodies(), ["buy at 42"]);

    // Everything the shell did is in the compliance record.
    let log = shell(&s, &["compliance", "list", "--limit", "1000"]).await?;
    assert!(
        log.contains("room_created") && log.contains("pchat-shell"),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn shell_rooms_are_closed_by_default_and_changes_reach_a_running_room() -> R {
    let mut s = server(&["ann", "bob", "tom"]).await?;
    // Made while no server runs: straight into the data directory.
    s.stop().await?;
    shell(&s, &["group", "new", "ops", "--member", "tom@localhost"]).await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "ops",
            "--name",
            "Operations",
            "--manager",
            "ann@localhost",
            "--member",
            "group:ops",
        ],
    )
    .await?;
    s.start_again().await?;
    let ops = room("ops");
    let got = shell(&s, &["room", "get", "ops"]).await?;
    assert!(
        got.contains("closed") && got.contains("Operations") && got.contains("group:ops"),
        "{got}"
    );

    // Closed: bob is no member; tom is one through his group; ann manages it.
    let mut bob = login(&s, "bob").await?;
    let e = bob.join_room(&ops, "bob", None).await.unwrap_err();
    assert_eq!(condition(&e), Some("registration-required"), "{e}");
    let mut tom = login(&s, "tom").await?;
    tom.join_room(&ops, "tom", None).await?;
    let mut ann = login(&s, "ann").await?;
    let joined = ann.join_room(&ops, "ann", None).await?;
    assert!(
        joined
            .self_presence
            .to_string()
            .contains("affiliation=\"owner\"")
            || joined
                .self_presence
                .to_string()
                .contains("affiliation='owner'"),
        "{}",
        joined.self_presence
    );

    // Added while the server runs: bob may enter at once.
    shell(&s, &["room", "set", "ops", "--add-member", "bob@localhost"]).await?;
    bob.join_room(&ops, "bob", None).await?;
    // Removed while in the room: he leaves at once (321).
    shell(
        &s,
        &["room", "set", "ops", "--remove-member", "bob@localhost"],
    )
    .await?;
    let (codes, _) = removed_from(&mut bob, &ops).await?;
    assert!(codes.contains(&321), "{codes:?}");

    // Disabled: everyone leaves, nobody enters, nobody finds it; enabled: all is back.
    tom.send_groupchat(&ops, "before the pause", None).await?;
    shell(&s, &["room", "disable", "ops"]).await?;
    let (codes, reason) = removed_from(&mut tom, &ops).await?;
    assert!(
        codes.contains(&321) && reason.contains("disabled"),
        "{codes:?} {reason}"
    );
    removed_from(&mut ann, &ops).await?;
    let e = ann.join_room(&ops, "ann", None).await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    assert!(ann.disco_items(ROOMS).await?.iter().all(|i| i.jid != ops));
    shell(&s, &["room", "enable", "ops"]).await?;
    let joined = tom.join_room(&ops, "tom", None).await?;
    assert_eq!(joined.history_bodies(), ["before the pause"]);

    // Removing needs --yes and says what it deletes.
    let err = shell_fails(&s, &["room", "remove", "ops"]).await?;
    assert!(err.contains("--yes") && err.contains("1 message"), "{err}");
    shell(&s, &["room", "remove", "ops", "--yes"]).await?;
    // Told the room is gone (XEP-0045 §10.9: unavailable with <destroy/>).
    tom.recv_until(T, |st| {
        st.is("presence", ns::CLIENT)
            && st.attr("type") == Some("unavailable")
            && st
                .child("x", ns::MUC_USER)
                .is_some_and(|x| x.child("destroy", ns::MUC_USER).is_some())
    })
    .await?;
    let listed = shell(&s, &["room", "list"]).await?;
    assert!(!listed.contains(&ops), "{listed}");
    Ok(())
}

#[tokio::test]
async fn only_a_categorys_creators_create_rooms_and_bad_input_changes_nothing() -> R {
    let s = server(&["ann", "eve"]).await?;
    shell(
        &s,
        &["group", "new", "creators", "--member", "ann@localhost"],
    )
    .await?;
    shell(
        &s,
        &[
            "category",
            "set",
            "default",
            "--remove-creator",
            "*",
            "--add-creator",
            "group:creators",
        ],
    )
    .await?;
    let mut eve = login(&s, "eve").await?;
    let e = eve
        .join_room(&room("evesroom"), "eve", None)
        .await
        .unwrap_err();
    assert_eq!(condition(&e), Some("not-allowed"), "{e}");
    let mut ann = login(&s, "ann").await?;
    let joined = ann.join_room(&room("annsroom"), "ann", None).await?;
    assert!(joined.self_status_codes().contains(&201));

    // Bad input: a clear message, nothing changed.
    let before = shell(&s, &["--json", "category", "get"]).await?;
    for (args, says) in [
        (
            vec![
                "category",
                "set",
                "default",
                "--add-allowed",
                "not a principal",
            ],
            "is not a principal",
        ),
        (
            vec!["category", "set", "default", "--add-denied", "group:nosuch"],
            "pchat group new nosuch",
        ),
        (vec!["category", "remove", "default"], "cannot be removed"),
        (
            vec!["group", "delete", "creators"],
            "still named by category default",
        ),
        (
            vec!["room", "new", "x", "--category", "nosuch"],
            "no category nosuch",
        ),
        (
            vec!["room", "new", "x", "--member", "*"],
            "cannot be a room's",
        ),
        (vec!["group", "new", "bad name"], "not a valid group name"),
    ] {
        let err = shell_fails(&s, &args).await?;
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(shell(&s, &["--json", "category", "get"]).await?, before);
    Ok(())
}

/// Add-ins shown in a room's information, a category without history (compliance only), and
/// the policy that decides who may use persistent chat at all.
#[tokio::test]
async fn add_ins_history_off_and_the_policy() -> R {
    let s = server(&["ann", "bob", "eve"]).await?;
    shell(
        &s,
        &[
            "addin",
            "new",
            "stocks",
            "--url",
            "https://stocks.example/pane",
        ],
    )
    .await?;
    shell(
        &s,
        &[
            "category",
            "new",
            "adhoc",
            "--add-allowed",
            "*",
            "--chat-history",
            "off",
        ],
    )
    .await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "desk",
            "--privacy",
            "open",
            "--addin",
            "stocks",
        ],
    )
    .await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "chat",
            "--privacy",
            "open",
            "--category",
            "adhoc",
        ],
    )
    .await?;

    // The add-in is in the room's disco#info form; it cannot go while a room shows it.
    let mut ann = login(&s, "ann").await?;
    let info = ann.disco_info(&room("desk")).await?;
    let form: String = info.extensions.iter().map(|x| x.to_string()).collect();
    assert!(
        form.contains("pchat#addin_url") && form.contains("https://stocks.example/pane"),
        "{form}"
    );
    let err = shell_fails(&s, &["addin", "remove", "stocks"]).await?;
    assert!(err.contains("desk@conference.localhost"), "{err}");
    let err = shell_fails(&s, &["addin", "new", "bad", "--url", "ftp://x"]).await?;
    assert!(err.contains("not an add-in URL"), "{err}");

    // History off: the message reaches the room without an archive id; MAM has nothing;
    // compliance has it.
    let chat = room("chat");
    ann.join_room(&chat, "ann", None).await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(&chat, "bob", None).await?;
    let ack = ann.send_groupchat(&chat, "off the record", None).await?;
    assert!(stanza_id(&ack, &chat).is_none(), "{ack}");
    let got = bob
        .recv_until(T, |st| st.body().as_deref() == Some("off the record"))
        .await?;
    assert!(stanza_id(&got, &chat).is_none(), "{got}");
    assert!(bob.mam_query(&chat, &[], None).await?.messages().is_empty());
    let log = shell(&s, &["compliance", "list"]).await?;
    assert!(log.contains("off the record"), "{log}");

    // The policy: off globally, on for ann only. Bob leaves at once; eve finds nothing; ann
    // stays; turning bob back on lets him in again (his memberships were kept).
    shell(
        &s,
        &[
            "policy",
            "set",
            "--global",
            "off",
            "--allow",
            "ann@localhost",
        ],
    )
    .await?;
    let (codes, _) = removed_from(&mut bob, &chat).await?;
    assert!(codes.contains(&321), "{codes:?}");
    let mut eve = login(&s, "eve").await?;
    let e = eve.join_room(&room("desk"), "eve", None).await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    ann.join_room(&room("desk"), "ann", None).await?;
    let policy = shell(&s, &["policy", "get"]).await?;
    assert!(
        policy.contains("off") && policy.contains("ann@localhost"),
        "{policy}"
    );
    shell(&s, &["policy", "set", "--allow", "bob@localhost"]).await?;
    bob.join_room(&chat, "bob", None).await?;
    Ok(())
}

/// Invitations: members added from the shell to a room with invitations on are told (at
/// once when online, at their next login otherwise), and an occupant's invitation to a user
/// who is offline is kept for that user's next login.
#[tokio::test]
async fn invitations_reach_users_now_or_at_their_next_login() -> R {
    let s = server(&["ann", "bob", "cat"]).await?;
    let mut ann = login(&s, "ann").await?;
    ann.send_initial_presence().await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "ops",
            "--name",
            "Operations",
            "--member",
            "bob@localhost",
        ],
    )
    .await?;
    shell(&s, &["room", "set", "ops", "--add-member", "ann@localhost"]).await?;
    let invite = |st: &Element| {
        st.is("message", ns::CLIENT)
            && st
                .child("x", ns::MUC_USER)
                .is_some_and(|x| x.child("invite", ns::MUC_USER).is_some())
    };
    let got = ann.recv_until(T, invite).await?;
    assert_eq!(got.attr("from"), Some(room("ops").as_str()), "{got}");
    assert!(got.to_string().contains("Operations"), "{got}");
    // Bob was offline: he gets it when he comes online.
    let mut bob = login(&s, "bob").await?;
    bob.send_initial_presence().await?;
    bob.recv_until(T, invite).await?;
    // Adding a member never demotes a manager; removing a manager leaves a member.
    shell(
        &s,
        &["room", "set", "ops", "--add-manager", "ann@localhost"],
    )
    .await?;
    let err = shell_fails(
        &s,
        &["room", "set", "ops", "--remove-member", "ann@localhost"],
    )
    .await?;
    assert!(err.contains("--remove-manager"), "{err}");
    // An occupant's invitation to cat, offline, waits for her.
    ann.join_room(&room("ops"), "ann", None).await?;
    ann.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", room("ops"))
            .with_child(
                Element::new("x", ns::MUC_USER).with_child(
                    Element::new("invite", ns::MUC_USER).with_attr("to", "cat@localhost"),
                ),
            ),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cat = login(&s, "cat").await?;
    cat.send_initial_presence().await?;
    let got = cat.recv_until(T, invite).await?;
    assert!(got.to_string().contains("ann@localhost"), "{got}");
    // Delivered once: a second presence finds nothing more.
    cat.send_initial_presence().await?;
    assert!(
        cat.collect_for(Duration::from_millis(400))
            .await?
            .iter()
            .all(|st| !invite(st)),
        "an invitation delivered twice"
    );
    // Invitations off for this room alone (Lync's room Invitations False): an occupant's is
    // refused, a member added from the shell is not told; back to the category's, they flow.
    let shown = shell(&s, &["room", "set", "ops", "--invitations", "off"]).await?;
    assert!(shown.contains("invitations off"), "{shown}");
    assert!(shell(&s, &["room", "get", "ops"])
        .await?
        .contains("invitations  off"));
    ann.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", room("ops"))
            .with_attr("id", "inv-off")
            .with_child(
                Element::new("x", ns::MUC_USER).with_child(
                    Element::new("invite", ns::MUC_USER).with_attr("to", "cat@localhost"),
                ),
            ),
    )
    .await?;
    let refused = ann
        .recv_until(T, |st| {
            st.attr("id") == Some("inv-off") && st.attr("type") == Some("error")
        })
        .await?;
    assert!(refused.to_string().contains("not-allowed"), "{refused}");
    // (cat became a member by ann's first invitation: taken off, then added again.)
    shell(
        &s,
        &["room", "set", "ops", "--remove-member", "cat@localhost"],
    )
    .await?;
    shell(&s, &["room", "set", "ops", "--add-member", "cat@localhost"]).await?;
    assert!(
        cat.collect_for(Duration::from_millis(400))
            .await?
            .iter()
            .all(|st| !invite(st)),
        "told of a room with invitations off"
    );
    shell(&s, &["room", "set", "ops", "--invitations", "inherit"]).await?;
    let _ = ann.collect_for(Duration::from_millis(200)).await?;
    ann.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", room("ops"))
            .with_child(
                Element::new("x", ns::MUC_USER).with_child(
                    Element::new("invite", ns::MUC_USER).with_attr("to", "cat@localhost"),
                ),
            ),
    )
    .await?;
    cat.recv_until(T, invite).await?;
    Ok(())
}

/// Search across rooms (a MAM query with full text to the service itself) reaches every room
/// the user may read and nothing behind a wall or a members-only door; it pages, and an id
/// it does not know is refused.
#[tokio::test]
async fn a_search_across_rooms_reaches_only_the_rooms_a_user_may_read() -> R {
    use pchat_testkit::Rsm;
    let s = server(&["ann", "tom", "ana"]).await?;
    trading_wall(&s).await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "desk",
            "--category",
            "trading",
            "--privacy",
            "open",
        ],
    )
    .await?;
    shell(&s, &["room", "new", "lobby", "--privacy", "open"]).await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "board",
            "--privacy",
            "closed",
            "--member",
            "tom@localhost",
        ],
    )
    .await?;
    let mut tom = login(&s, "tom").await?;
    for (r, text) in [
        ("desk", "the merger closes friday"),
        ("lobby", "lunch then the merger call"),
        ("board", "merger terms attached"),
        ("lobby", "nothing to see"),
        ("desk", "merger: buy side ready"),
    ] {
        tom.join_room(&room(r), "tom", None).await?;
        tom.send_groupchat(&room(r), text, None).await?;
    }
    let words = [("{urn:xmpp:fulltext:0}fulltext", "merger")];

    // The service says it searches; tom finds the four in desk, lobby and board, oldest first.
    let info = tom.disco_info(ROOMS).await?;
    assert!(info.features.iter().any(|f| f == "urn:xmpp:mam:2"));
    let all = tom.mam_query(ROOMS, &words, None).await?;
    assert_eq!(
        all.bodies(),
        [
            "the merger closes friday",
            "lunch then the merger call",
            "merger terms attached",
            "merger: buy side ready"
        ],
        "{:?}",
        all.results
    );
    assert!(all.complete());
    assert!(
        all.ids()
            .iter()
            .all(|id| id.contains('.') && id.contains('@')),
        "{:?}",
        all.ids()
    );

    // Paging: two at a time, then on from the last id.
    let first = tom
        .mam_query(
            ROOMS,
            &words,
            Some(Rsm {
                max: Some(2),
                before: None,
                after: None,
            }),
        )
        .await?;
    assert_eq!(first.ids(), all.ids()[..2].to_vec());
    assert!(!first.complete());
    let second = tom
        .mam_query(
            ROOMS,
            &words,
            Some(Rsm {
                max: Some(2),
                before: None,
                after: first.last(),
            }),
        )
        .await?;
    assert_eq!(second.ids(), all.ids()[2..].to_vec());
    assert!(second.complete());
    let last = tom
        .mam_query(
            ROOMS,
            &words,
            Some(Rsm {
                max: Some(1),
                before: Some(String::new()),
                after: None,
            }),
        )
        .await?;
    assert_eq!(last.ids(), all.ids()[3..].to_vec());
    // `with` names one room.
    let lobby = tom
        .mam_query(ROOMS, &[words[0], ("with", &room("lobby"))], None)
        .await?;
    assert_eq!(lobby.results.len(), 1);
    // An id it never gave is refused (resynchronise), not silently skipped past.
    let e = tom
        .mam_query(
            ROOMS,
            &words,
            Some(Rsm {
                max: Some(2),
                before: None,
                after: Some("999.desk@conference.localhost".into()),
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");

    // ana: the trading wall hides desk, board is closed to her: only lobby.
    let mut ana = login(&s, "ana").await?;
    let hers = ana.mam_query(ROOMS, &words, None).await?;
    assert_eq!(hers.results.len(), 1, "{:?}", hers.results);
    assert_eq!(hers.bodies(), ["lunch then the merger call"]);
    // Paging from an id in a room she cannot read is refused like an unknown id.
    let e = ana
        .mam_query(
            ROOMS,
            &words,
            Some(Rsm {
                max: Some(2),
                before: None,
                after: Some(all.ids()[0].clone()),
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    Ok(())
}

/// `pchat config` (Lync's Set-CsPersistentChatConfiguration): DefaultChatHistory applies at
/// once to every room whose owner did not set its own, RoomManagementUrl and MaxFileSizeKB
/// show in the service's disco#info, and bad values change nothing.
#[tokio::test]
async fn service_settings_apply_at_once_without_a_restart() -> R {
    let s = server(&["ann", "tom"]).await?;
    let shown = shell(&s, &["config", "get"]).await?;
    assert!(
        shown.contains("DefaultChatHistory")
            && shown.contains("30")
            && shown.contains("pchat.toml"),
        "{shown}"
    );
    let mut tom = login(&s, "tom").await?;
    // A room following the service, and one whose owner set its own default (5).
    tom.join_room(&room("follows"), "tom", None).await?;
    tom.iq_result(
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", room("follows"))
            .with_child(
                Element::new("query", ns::MUC_OWNER)
                    .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
            ),
        T,
    )
    .await?;
    tom.join_room(&room("own"), "tom", None).await?;
    let field = |var: &str, v: &str| {
        Element::new("field", ns::DATA_FORMS)
            .with_attr("var", var)
            .with_child(Element::new("value", ns::DATA_FORMS).with_text(v))
    };
    tom.iq_result(
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", room("own"))
            .with_child(
                Element::new("query", ns::MUC_OWNER).with_child(
                    Element::new("x", ns::DATA_FORMS)
                        .with_attr("type", "submit")
                        .with_child(field(
                            "FORM_TYPE",
                            "http://jabber.org/protocol/muc#roomconfig",
                        ))
                        .with_child(field("pchat#history_default", "5")),
                ),
            ),
        T,
    )
    .await?;
    for i in 0..12 {
        tom.send_groupchat(&room("follows"), &format!("f{i}"), None)
            .await?;
        tom.send_groupchat(&room("own"), &format!("o{i}"), None)
            .await?;
    }
    let mut ann = login(&s, "ann").await?;
    assert_eq!(
        ann.join_room(&room("follows"), "ann", None)
            .await?
            .history
            .len(),
        12
    );
    ann.leave_room(&room("follows"), "ann").await?;

    shell(&s, &["config", "set", "DefaultChatHistory", "3"]).await?;
    shell(
        &s,
        &[
            "config",
            "set",
            "room-management-url",
            "https://rooms.example/manage",
        ],
    )
    .await?;
    shell(&s, &["config", "set", "MaxFileSizeKB", "20000"]).await?;
    // No restart: the next joins get 3 in the room that follows, 5 in the other.
    assert_eq!(
        ann.join_room(&room("follows"), "ann", None)
            .await?
            .history
            .len(),
        3
    );
    assert_eq!(
        ann.join_room(&room("own"), "ann", None)
            .await?
            .history
            .len(),
        5
    );
    let info = ann.disco_info(ROOMS).await?;
    let text = info
        .extensions
        .iter()
        .map(|e| e.to_xml())
        .collect::<String>();
    assert!(
        text.contains("https://rooms.example/manage") && text.contains("20000"),
        "{text}"
    );
    let json = shell(&s, &["--json", "config", "get"]).await?;
    assert!(json.contains("\"pchat config\""), "{json}");

    // Bad input: a clear error, nothing changed.
    for (args, says) in [
        (["config", "set", "DefaultChatHistory", "0"], "1 to 500"),
        (
            ["config", "set", "DefaultChatHistory", "many"],
            "whole number",
        ),
        (["config", "set", "RoomManagementUrl", "ftp://x"], "http"),
        (["config", "set", "Colour", "red"], "no setting"),
    ] {
        let err = shell_fails(&s, &args).await?;
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(shell(&s, &["config", "get"]).await?.contains("3 "));
    // Back to pchat.toml's value.
    shell(&s, &["config", "set", "DefaultChatHistory", "default"]).await?;
    ann.leave_room(&room("follows"), "ann").await?;
    assert_eq!(
        ann.join_room(&room("follows"), "ann", None)
            .await?
            .history
            .len(),
        12,
        "pchat.toml's 30 again (12 messages there)"
    );
    Ok(())
}

/// An auditorium's presenters may be a group: its members speak, others listen; a user added
/// to the group gets voice at once (the room recomputes roles on the directory change).
#[tokio::test]
async fn presenters_may_be_a_group_and_follow_it() -> R {
    let s = server(&["ann", "tom", "bob"]).await?;
    shell(
        &s,
        &["group", "new", "speakers", "--member", "ann@localhost"],
    )
    .await?;
    let out = shell(
        &s,
        &[
            "room",
            "new",
            "townhall",
            "--privacy",
            "open",
            "--type",
            "auditorium",
            "--presenter",
            "group:speakers",
        ],
    )
    .await?;
    assert!(out.contains("created"), "{out}");
    let hall = room("townhall");
    let mut ann = login(&s, "ann").await?;
    ann.join_room(&hall, "ann", None).await?;
    ann.send_groupchat(&hall, "welcome", None).await?;
    let mut tom = login(&s, "tom").await?;
    tom.join_room(&hall, "tom", None).await?;
    let e = tom.send_groupchat(&hall, "can I?", None).await.unwrap_err();
    assert_eq!(condition(&e), Some("forbidden"), "{e}");
    shell(&s, &["group", "add", "speakers", "tom@localhost"]).await?;
    // His role changes to participant (a presence from the room), then he may speak.
    tom.recv_until(T, |p| {
        p.is("presence", ns::CLIENT)
            && p.attr("from") == Some(&format!("{hall}/tom")[..])
            && p.child("x", ns::MUC_USER)
                .and_then(|x| x.child("item", ns::MUC_USER))
                .and_then(|i| i.attr("role"))
                == Some("participant")
    })
    .await?;
    tom.send_groupchat(&hall, "now I can", None).await?;
    Ok(())
}
