//! Interoperability: slixmpp (an independent Python XMPP library, from PyPI) joins a room on
//! the real server, chats, and reads the archive. The test command installs slixmpp; when it
//! is missing this test fails with the command that installs it, never skips.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{ns, Element, ServerOptions, TestServer};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[tokio::test]
async fn slixmpp_joins_chats_and_reads_the_archive() -> anyhow::Result<()> {
    assert!(common::scenario::python_has("slixmpp"), "slixmpp is missing: run `python3 -m pip install -r tests/interop/requirements.txt` (scripts/test does)");
    let s = TestServer::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_pchat")),
        ServerOptions::default(),
    )
    .await?;
    s.add_user("alice@localhost", "alice-pw").await?;
    s.add_user("sli@localhost", "sli-pw").await?;
    let room = "interop@conference.localhost";
    // The room is made by the Rust client (instant room); slixmpp then uses it like any user.
    let mut alice = s.client("alice@localhost", "alice-pw").await?;
    alice.join_room(room, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;
    alice.send_groupchat(room, "before slixmpp", None).await?;

    let port = s.c2s_addr().port().to_string();
    let args = [
        "--jid",
        "sli@localhost",
        "--password",
        "sli-pw",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--room",
        room,
        "--nick",
        "sli",
        "--messages",
        "one,two,three",
    ];
    let v = common::scenario::run("tests/interop/muc_scenario.py", strings(&args)).await?;
    assert_eq!(v["reflected"], serde_json::json!(["one", "two", "three"]));
    assert_eq!(
        v["mam"],
        serde_json::json!(["before slixmpp", "one", "two", "three"])
    );
    // Alice saw slixmpp's messages in the same order.
    for body in ["one", "two", "three"] {
        alice
            .recv_until(Duration::from_secs(10), |m| {
                m.body().as_deref() == Some(body)
            })
            .await?;
    }
    Ok(())
}

/// XEP-0198 with slixmpp's own stream management plugin: it enables resumption, loses its
/// connection with a message in flight, resumes, and gets that message's reflection once.
#[tokio::test]
async fn slixmpp_resumes_its_session_and_gets_what_was_in_flight() -> anyhow::Result<()> {
    let s = TestServer::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_pchat")),
        ServerOptions::default(),
    )
    .await?;
    s.add_user("alice@localhost", "alice-pw").await?;
    s.add_user("sli@localhost", "sli-pw").await?;
    let room = "resume@conference.localhost";
    let mut alice = s.client("alice@localhost", "alice-pw").await?;
    alice.join_room(room, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;

    let port = s.c2s_addr().port().to_string();
    let args = [
        "--jid",
        "sli@localhost",
        "--password",
        "sli-pw",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--room",
        room,
        "--nick",
        "sli",
    ];
    let v = common::scenario::run("tests/interop/sm_scenario.py", strings(&args)).await?;
    assert_eq!(v["resumed"], serde_json::json!(true));
    assert_eq!(v["starts"], serde_json::json!(1), "one session, resumed");
    assert_eq!(
        v["in_flight"],
        serde_json::json!(["in flight"]),
        "once, not lost, not twice"
    );
    assert_eq!(v["after"], serde_json::json!(["after"]));
    // The room saw the same three messages, once each, and slixmpp did not leave in between
    // (it leaves when the script ends, after "after").
    let mut seen = Vec::new();
    let mut left_between = Vec::new();
    while !seen.iter().any(|b| b == "after") {
        let el = alice.recv(Duration::from_secs(10)).await?;
        match el.body() {
            Some(b) => seen.push(b),
            None if el.attr("type") == Some("unavailable") => left_between.push(el),
            None => {}
        }
    }
    assert_eq!(seen, ["settled", "in flight", "after"]);
    assert!(
        left_between.is_empty(),
        "slixmpp left the room: {left_between:?}"
    );
    Ok(())
}

/// Bookmarks with slixmpp's own plugins: XEP-0402 published with its publish-options, read
/// back as XEP-0402, as XEP-0048 in private XML and as XEP-0048 over PEP; a XEP-0048 list
/// written over PEP becomes the XEP-0402 items.
#[tokio::test]
async fn slixmpp_sees_one_bookmark_list_in_every_form() -> anyhow::Result<()> {
    let s = TestServer::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_pchat")),
        ServerOptions::default(),
    )
    .await?;
    s.add_user("sli@localhost", "sli-pw").await?;
    let port = s.c2s_addr().port().to_string();
    let args = [
        "--jid",
        "sli@localhost",
        "--password",
        "sli-pw",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
    ];
    let v = common::scenario::run("tests/interop/bookmarks_scenario.py", strings(&args)).await?;
    let lobby = serde_json::json!(["lobby@conference.localhost"]);
    assert_eq!(v["modern"], lobby);
    assert_eq!(v["private"], lobby);
    assert_eq!(v["pep"], lobby);
    assert_eq!(
        v["after_legacy_write"],
        serde_json::json!(["dev@conference.localhost", "ops@conference.localhost"])
    );
    Ok(())
}
