//! XEP-0198 stream management against the real binary, from the test kit's independent
//! client: acknowledgments both ways, a session resumed on a new connection with what the
//! client missed (nothing lost, nothing twice, in order), a resumption refused to another
//! account and after the window, a connection that is still open replaced, and the bound on
//! what a client leaves unacknowledged.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pchat_testkit::{
    ns, stanza_id, status_codes, Client, ConnectOptions, Element, ServerOptions, Stage, TestServer,
    Transport,
};

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(10);
const SM: &str = "urn:xmpp:sm:3";
const ROOM: &str = "sm@conference.localhost";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// The server with `toml` as its `pchat.toml`, users alice, bob and carol.
async fn start_with(toml: &str) -> anyhow::Result<(TestServer, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pchat.toml"), toml)?;
    let opts = ServerOptions {
        data_dir: Some(dir.path().to_owned()),
        ..ServerOptions::default()
    };
    let s = TestServer::start(&bin(), opts).await?;
    for u in ["alice", "bob", "carol"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    Ok((s, dir))
}

async fn login(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    Ok(
        s.client(&format!("{user}@localhost"), &format!("{user}-pw"))
            .await?,
    )
}

/// Authenticated, not bound: ready to `<resume/>`.
async fn authenticated(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    let opts = ConnectOptions {
        stop_after: Stage::Authenticated,
        ..s.connect_options(&format!("{user}@localhost"), &format!("{user}-pw"))
    };
    Ok(Client::connect(opts).await?)
}

/// alice makes the instant room and bob joins it.
async fn room_with(alice: &mut Client, bob: &mut Client) -> R {
    alice.join_room(ROOM, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, T).await?;
    bob.join_room(ROOM, "bob", None).await?;
    // alice sees bob arrive; read it now so that it is not counted later.
    alice
        .recv_until(T, |el| {
            el.name() == "presence" && el.attr("from") == Some(&format!("{ROOM}/bob"))
        })
        .await?;
    Ok(())
}

/// Sends `<enable/>` and returns the `<enabled/>` answer.
async fn enable(c: &mut Client, resume: bool) -> anyhow::Result<Element> {
    let mut e = Element::new("enable", SM);
    if resume {
        e = e.with_attr("resume", "true");
    }
    c.send(&e).await?;
    let answer = c.recv_until(T, |el| el.ns() == SM).await?;
    anyhow::ensure!(
        answer.name() == "enabled",
        "expected <enabled/>, got {answer:?}"
    );
    Ok(answer)
}

fn is_stanza(el: &Element) -> bool {
    el.ns() == ns::CLIENT && matches!(el.name(), "message" | "presence" | "iq")
}

fn body(el: &Element) -> Option<String> {
    el.child("body", ns::CLIENT).map(|b| b.text())
}

/// The next groupchat message from the room (stream management elements skipped).
async fn next_groupchat(c: &mut Client) -> anyhow::Result<Element> {
    Ok(c.recv_until(T, |el| {
        el.name() == "message" && el.attr("type") == Some("groupchat")
    })
    .await?)
}

/// The `h` of the next `<a/>` (other elements skipped).
async fn next_answer(c: &mut Client) -> anyhow::Result<u32> {
    let a = c.recv_until(T, |el| el.is("a", SM)).await?;
    Ok(a.attr("h").unwrap_or_default().parse()?)
}

#[tokio::test]
async fn acknowledgments_count_stanzas_both_ways_and_an_ack_beyond_them_ends_the_stream() -> R {
    let (s, _dir) = start_with("").await?;
    let mut alice = login(&s, "alice").await?;
    assert!(
        alice.features().child("sm", SM).is_some(),
        "stream management is not offered: {:?}",
        alice.features()
    );
    let enabled = enable(&mut alice, false).await?;
    assert_eq!(enabled.attr("id"), None, "no resumption was asked for");
    // Three requests; their three results are the server's first three stanzas.
    for i in 0..3 {
        let ping = Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", format!("p{i}"))
            .with_child(Element::new("ping", ns::PING));
        alice.send(&ping).await?;
    }
    let mut results = 0;
    let mut requests = 0;
    let deadline = Instant::now() + T;
    while results < 3 && Instant::now() < deadline {
        let el = alice.recv(T).await?;
        if is_stanza(&el) {
            results += 1;
        } else if el.is("r", SM) {
            requests += 1;
        }
    }
    assert_eq!(results, 3);
    alice.send(&Element::new("r", SM)).await?;
    assert_eq!(next_answer(&mut alice).await?, 3, "three stanzas handled");
    // The server asked for an acknowledgment (one request out at a time).
    let more = alice.collect_for(Duration::from_millis(300)).await?;
    requests += more.iter().filter(|el| el.is("r", SM)).count();
    assert!(requests >= 1, "the server never sent <r/>");
    alice
        .send(&Element::new("a", SM).with_attr("h", "3"))
        .await?;
    alice
        .send(&Element::new("a", SM).with_attr("h", "4"))
        .await?;
    let err = alice
        .recv_until(T, |_| false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("undefined-condition") && err.contains("handled-count-too-high"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_session_is_resumed_with_everything_the_client_missed_in_order() -> R {
    let (s, _dir) = start_with("").await?;
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    room_with(&mut alice, &mut bob).await?;
    let full_before = alice.jid().to_owned();
    let enabled = enable(&mut alice, true).await?;
    assert_eq!(enabled.attr("resume"), Some("true"));
    assert_eq!(enabled.attr("max"), Some("300"), "the default window");
    let id = enabled.attr("id").expect("a resumption id").to_owned();

    // "one" is handled and acknowledged; "two" arrives but the client never says so.
    bob.send_groupchat(ROOM, "one", None).await?;
    assert_eq!(
        body(&next_groupchat(&mut alice).await?).as_deref(),
        Some("one")
    );
    alice
        .send(&Element::new("a", SM).with_attr("h", "1"))
        .await?;
    bob.send_groupchat(ROOM, "two", None).await?;
    assert_eq!(
        body(&next_groupchat(&mut alice).await?).as_deref(),
        Some("two")
    );
    // The connection breaks (no stream close).
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.send_groupchat(ROOM, "three", None).await?;
    // alice is still in the room for everyone else.
    let seen = bob.collect_for(Duration::from_millis(800)).await?;
    assert!(
        !seen
            .iter()
            .any(|el| el.name() == "presence" && el.attr("type") == Some("unavailable")),
        "a session waiting to be resumed left the room: {seen:?}"
    );

    let mut again = authenticated(&s, "alice").await?;
    again
        .send(
            &Element::new("resume", SM)
                .with_attr("previd", id.as_str())
                .with_attr("h", "1"),
        )
        .await?;
    let resumed = again.recv_until(T, |el| el.ns() == SM).await?;
    assert_eq!(resumed.name(), "resumed", "{resumed:?}");
    assert_eq!(resumed.attr("previd"), Some(id.as_str()));
    assert_eq!(
        resumed.attr("h"),
        Some("0"),
        "alice sent no stanza since <enable/>"
    );
    // "two" again (never acknowledged), then "three" (queued while away): once each, in
    // order, with their archive ids.
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = next_groupchat(&mut again).await?;
        assert_eq!(m.attr("to"), Some(full_before.as_str()));
        assert!(stanza_id(&m, ROOM).is_some());
        got.push(body(&m).unwrap_or_default());
    }
    assert_eq!(got, ["two", "three"]);
    let extra = again.collect_for(Duration::from_millis(300)).await?;
    assert!(
        !extra.iter().any(|el| el.name() == "message"),
        "a message came twice: {extra:?}"
    );

    // The same session goes on: the same nick in the same room, counters continued.
    let msg = Element::new("message", ns::CLIENT)
        .with_attr("type", "groupchat")
        .with_attr("to", ROOM)
        .with_child(Element::new("body", ns::CLIENT).with_text("back"));
    again.send(&msg).await?;
    let reflected = next_groupchat(&mut again).await?;
    assert_eq!(body(&reflected).as_deref(), Some("back"));
    let at_bob = bob
        .recv_until(T, |el| {
            el.name() == "message" && body(el).as_deref() == Some("back")
        })
        .await?;
    assert_eq!(at_bob.attr("from"), Some(&*format!("{ROOM}/alice")));
    again.send(&Element::new("r", SM)).await?;
    assert_eq!(
        next_answer(&mut again).await?,
        1,
        "one stanza since <enable/>"
    );
    Ok(())
}

#[tokio::test]
async fn resumption_is_refused_to_another_account_and_after_the_window() -> R {
    let (s, _dir) = start_with("[limits]\nresume_timeout_s = 2\n").await?;
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    room_with(&mut alice, &mut bob).await?;
    let enabled = enable(&mut alice, true).await?;
    assert_eq!(enabled.attr("max"), Some("2"));
    let id = enabled.attr("id").unwrap_or_default().to_owned();
    drop(alice);
    let lost_at = Instant::now();

    // carol guesses alice's id: told it does not exist, and may still bind a session.
    let mut carol = authenticated(&s, "carol").await?;
    carol
        .send(
            &Element::new("resume", SM)
                .with_attr("previd", id.as_str())
                .with_attr("h", "0"),
        )
        .await?;
    let failed = carol.recv_until(T, |el| el.ns() == SM).await?;
    assert_eq!(failed.name(), "failed");
    assert!(
        failed.child("item-not-found", ns::STANZA_ERRORS).is_some(),
        "{failed:?}"
    );
    let bind = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "b1")
        .with_child(Element::new("bind", ns::BIND));
    carol.send(&bind).await?;
    let bound = carol
        .recv_until(T, |el| el.attr("id") == Some("b1"))
        .await?;
    assert_eq!(bound.attr("type"), Some("result"), "{bound:?}");

    // After the window alice leaves the room as one lost (status 333)...
    let left = bob
        .recv_until(Duration::from_secs(10), |el| {
            el.name() == "presence"
                && el.attr("type") == Some("unavailable")
                && el.attr("from") == Some(&*format!("{ROOM}/alice"))
        })
        .await?;
    let waited = lost_at.elapsed();
    assert!(status_codes(&left).contains(&333), "{left:?}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "alice left after {waited:?} (window 2 s)"
    );
    // ...and her id is no longer known.
    let mut late = authenticated(&s, "alice").await?;
    late.send(
        &Element::new("resume", SM)
            .with_attr("previd", id.as_str())
            .with_attr("h", "0"),
    )
    .await?;
    let failed = late.recv_until(T, |el| el.ns() == SM).await?;
    assert_eq!(failed.name(), "failed");
    assert!(failed.child("item-not-found", ns::STANZA_ERRORS).is_some());
    Ok(())
}

#[tokio::test]
async fn a_resumption_replaces_a_connection_that_is_still_open() -> R {
    let (s, _dir) = start_with("").await?;
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    room_with(&mut alice, &mut bob).await?;
    let enabled = enable(&mut alice, true).await?;
    let id = enabled.attr("id").unwrap_or_default().to_owned();
    // The client thinks its connection is dead; the server does not know yet.
    let mut again = authenticated(&s, "alice").await?;
    again
        .send(
            &Element::new("resume", SM)
                .with_attr("previd", id.as_str())
                .with_attr("h", "0"),
        )
        .await?;
    let resumed = again.recv_until(T, |el| el.ns() == SM).await?;
    assert_eq!(resumed.name(), "resumed", "{resumed:?}");
    // The old connection is closed; the new one gets the room's messages.
    let old = alice.recv_until(T, |_| false).await.unwrap_err();
    assert!(
        !old.to_string().contains("timed out"),
        "old connection still open: {old}"
    );
    bob.send_groupchat(ROOM, "to the new connection", None)
        .await?;
    let m = next_groupchat(&mut again).await?;
    assert_eq!(body(&m).as_deref(), Some("to the new connection"));
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_acknowledges_is_dropped_at_the_queue_bound() -> R {
    let (s, _dir) = start_with("[limits]\nsession_queue_stanzas_max = 20\n").await?;
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    room_with(&mut alice, &mut bob).await?;
    enable(&mut alice, true).await?;
    for i in 0..25 {
        bob.send_groupchat(ROOM, &format!("m{i}"), None).await?;
    }
    // alice reads everything but acknowledges nothing.
    let err = loop {
        match alice.recv(T).await {
            Ok(_) => continue,
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains("resource-constraint") && err.contains("not acknowledged"),
        "{err}"
    );
    // Not resumable: the rooms see alice gone as one lost.
    let left = bob
        .recv_until(T, |el| {
            el.name() == "presence" && el.attr("from") == Some(&*format!("{ROOM}/alice"))
        })
        .await?;
    assert!(status_codes(&left).contains(&333), "{left:?}");
    Ok(())
}

#[tokio::test]
async fn a_websocket_session_is_resumed_over_websocket_only() -> R {
    let (s, _dir) = start_with("").await?;
    let ws = |user: &str, stage: Stage| ConnectOptions {
        stop_after: stage,
        ..ConnectOptions::new(
            Transport::WebSocket { url: s.ws_url() },
            &format!("{user}@localhost"),
            &format!("{user}-pw"),
        )
    };
    let mut alice = Client::connect(ws("alice", Stage::Bound)).await?;
    let mut bob = login(&s, "bob").await?;
    room_with(&mut alice, &mut bob).await?;
    let enabled = enable(&mut alice, true).await?;
    let id = enabled.attr("id").unwrap_or_default().to_owned();
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.send_groupchat(ROOM, "while away", None).await?;
    let resume = Element::new("resume", SM)
        .with_attr("previd", id.as_str())
        .with_attr("h", "0");
    // Over TCP the WebSocket session's frames would not fit: refused, the session waits on.
    let mut tcp = authenticated(&s, "alice").await?;
    tcp.send(&resume).await?;
    let failed = tcp.recv_until(T, |el| el.ns() == SM).await?;
    assert_eq!(failed.name(), "failed", "{failed:?}");
    let mut again = Client::connect(ws("alice", Stage::Authenticated)).await?;
    again.send(&resume).await?;
    let resumed = again.recv_until(T, |el| el.ns() == SM).await?;
    assert_eq!(resumed.name(), "resumed", "{resumed:?}");
    let m = next_groupchat(&mut again).await?;
    assert_eq!(body(&m).as_deref(), Some("while away"));
    Ok(())
}
