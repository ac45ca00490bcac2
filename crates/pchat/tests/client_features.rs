//! Features mobile and multi-device clients rely on, against the real binary from the test
//! kit's client: message carbons (XEP-0280), client state indication (XEP-0352) and finding
//! rooms (XEP-0433 channel search).

use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{ns, Client, Element, ServerOptions, TestServer};

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(10);
const CARBONS: &str = "urn:xmpp:carbons:2";
const FORWARD: &str = "urn:xmpp:forward:0";
const CSI: &str = "urn:xmpp:csi:0";

async fn start() -> anyhow::Result<TestServer> {
    let s = TestServer::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_pchat")),
        ServerOptions::default(),
    )
    .await?;
    for u in ["alice", "bob", "carol"] {
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

fn chat(to: &str, body: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .with_attr("type", "chat")
        .with_attr("to", to)
        .with_child(Element::new("body", ns::CLIENT).with_text(body))
}

fn body(el: &Element) -> Option<String> {
    el.child("body", ns::CLIENT).map(|b| b.text())
}

/// The forwarded message of a carbon (`sent` or `received`).
fn carbon<'a>(el: &'a Element, how: &str) -> Option<&'a Element> {
    el.child(how, CARBONS)?
        .child("forwarded", FORWARD)?
        .child("message", ns::CLIENT)
}

async fn carbons(c: &mut Client, on: bool) -> R {
    let request = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_child(Element::new(if on { "enable" } else { "disable" }, CARBONS));
    c.iq_result(request, T).await?;
    Ok(())
}

#[tokio::test]
async fn carbons_copy_one_to_one_messages_to_the_accounts_other_clients() -> R {
    let s = start().await?;
    let mut phone = login(&s, "alice").await?;
    let mut desktop = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    let info = desktop.disco_info("localhost").await?;
    assert!(
        info.has_feature(CARBONS),
        "the server does not announce carbons"
    );
    carbons(&mut desktop, true).await?;

    // What the phone sends, the desktop sees as sent.
    phone.send(&chat("bob@localhost", "from the phone")).await?;
    let at_bob = bob
        .recv_until(T, |m| body(m).as_deref() == Some("from the phone"))
        .await?;
    assert_eq!(at_bob.attr("from"), Some(phone.jid()));
    let copy = desktop
        .recv_until(T, |m| carbon(m, "sent").is_some())
        .await?;
    assert_eq!(copy.attr("from"), Some("alice@localhost"));
    let sent = carbon(&copy, "sent").expect("sent");
    assert_eq!(sent.attr("to"), Some("bob@localhost"));
    assert_eq!(sent.attr("from"), Some(phone.jid()));
    assert_eq!(body(sent).as_deref(), Some("from the phone"));

    // What bob sends to the phone alone, the desktop sees as received.
    let phone_jid = phone.jid().to_owned();
    bob.send(&chat(&phone_jid, "to the phone")).await?;
    phone
        .recv_until(T, |m| body(m).as_deref() == Some("to the phone"))
        .await?;
    let copy = desktop
        .recv_until(T, |m| carbon(m, "received").is_some())
        .await?;
    let received = carbon(&copy, "received").expect("received");
    assert_eq!(received.attr("to"), Some(phone_jid.as_str()));
    assert_eq!(body(received).as_deref(), Some("to the phone"));

    // Marked private: no copy. The phone, which did not enable carbons, gets none of the
    // desktop's. After disable, the desktop gets none either.
    let private = chat("bob@localhost", "private one").with_child(Element::new("private", CARBONS));
    phone.send(&private).await?;
    desktop
        .send(&chat("bob@localhost", "from the desktop"))
        .await?;
    bob.recv_until(T, |m| body(m).as_deref() == Some("from the desktop"))
        .await?;
    carbons(&mut desktop, false).await?;
    phone.send(&chat("bob@localhost", "after disable")).await?;
    bob.recv_until(T, |m| body(m).as_deref() == Some("after disable"))
        .await?;
    let late = desktop.collect_for(Duration::from_millis(500)).await?;
    assert!(
        !late.iter().any(|m| m.child("sent", CARBONS).is_some()),
        "a private message or one after disable was copied: {late:?}"
    );
    let at_phone = phone.collect_for(Duration::from_millis(300)).await?;
    assert!(
        !at_phone.iter().any(|m| m.child("sent", CARBONS).is_some()),
        "the phone never enabled carbons: {at_phone:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_inactive_client_gets_presence_only_with_what_matters_in_order() -> R {
    let s = start().await?;
    let room = "csi@conference.localhost";
    let mut alice = login(&s, "alice").await?;
    assert!(
        alice.features().child("csi", CSI).is_some(),
        "client state indication is not offered"
    );
    alice.join_room(room, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, T).await?;
    alice.send(&Element::new("inactive", CSI)).await?;

    let mut bob = login(&s, "bob").await?;
    bob.join_room(room, "bob", None).await?;
    let mut carol = login(&s, "carol").await?;
    carol.join_room(room, "carol", None).await?;
    carol.leave_room(room, "carol").await?;
    let quiet = alice.collect_for(Duration::from_millis(500)).await?;
    assert!(
        quiet.is_empty(),
        "an inactive client was sent presence: {quiet:?}"
    );
    // A message matters: the held presence comes first, in order, then the message.
    bob.send_groupchat(room, "wake up", None).await?;
    let mut order = Vec::new();
    while !order.iter().any(|s: &String| s == "message") {
        let el = alice.recv(T).await?;
        order.push(match el.name() {
            "presence" => format!(
                "{} {}",
                el.attr("from")
                    .unwrap_or_default()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default(),
                el.attr("type").unwrap_or("available")
            ),
            other => other.to_owned(),
        });
    }
    assert_eq!(
        order,
        [
            "bob available",
            "carol available",
            "carol unavailable",
            "message"
        ]
    );
    // Held again, then released by <active/>.
    carol.join_room(room, "carol", None).await?;
    assert!(alice
        .collect_for(Duration::from_millis(400))
        .await?
        .is_empty());
    alice.send(&Element::new("active", CSI)).await?;
    let back = alice.recv(T).await?;
    assert_eq!(back.name(), "presence");
    assert_eq!(back.attr("from"), Some(&*format!("{room}/carol")));
    // Active: presence flows at once.
    bob.leave_room(room, "bob").await?;
    let left = alice.recv(T).await?;
    assert_eq!(left.attr("type"), Some("unavailable"));
    Ok(())
}

/// Submits a room's configuration form (creating the room for its first occupant).
async fn configure(c: &mut Client, room: &str, fields: &[(&str, &str)]) -> R {
    let mut form = Element::new("x", ns::DATA_FORMS).with_attr("type", "submit");
    for (var, value) in fields {
        form = form.with_child(
            Element::new("field", ns::DATA_FORMS)
                .with_attr("var", *var)
                .with_child(Element::new("value", ns::DATA_FORMS).with_text(*value)),
        );
    }
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(Element::new("query", ns::MUC_OWNER).with_child(form));
    c.iq_result(iq, T).await?;
    Ok(())
}

/// A room search (XEP-0433, or the muclumbus form Converse.js sends) for `q`; the addresses
/// found and the RSM count.
async fn find_rooms(
    c: &mut Client,
    namespace: &str,
    q: &str,
    max: Option<usize>,
    after: Option<&str>,
) -> anyhow::Result<(Vec<String>, String)> {
    let mut set = Element::new("set", ns::RSM);
    if let Some(m) = max {
        set = set.with_child(Element::new("max", ns::RSM).with_text(m.to_string()));
    }
    if let Some(a) = after {
        set = set.with_child(Element::new("after", ns::RSM).with_text(a));
    }
    let form = Element::new("x", ns::DATA_FORMS)
        .with_attr("type", "submit")
        .with_child(
            Element::new("field", ns::DATA_FORMS)
                .with_attr("var", "q")
                .with_child(Element::new("value", ns::DATA_FORMS).with_text(q)),
        )
        .with_child(
            Element::new("field", ns::DATA_FORMS)
                .with_attr("var", "min_users")
                .with_child(Element::new("value", ns::DATA_FORMS).with_text("1")),
        );
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", "conference.localhost")
        .with_child(
            Element::new("search", namespace)
                .with_child(set)
                .with_child(form),
        );
    let reply = c.iq_result(iq, T).await?;
    let result = reply.child("result", namespace).expect("a result");
    let found = result
        .children_named("item", namespace)
        .map(|i| i.attr("address").unwrap_or_default().to_owned())
        .collect();
    let count = result
        .child("set", ns::RSM)
        .and_then(|s| s.child_text("count", ns::RSM))
        .unwrap_or_default();
    Ok((found, count))
}

/// Finding rooms (Lync's room search; XEP-0433 and Converse.js's muclumbus form) by name,
/// description or address: only rooms the asker may see listed (public, or its own), in
/// address order, paged; empty rooms are found (no occupant count filters them out); a bad
/// request gets `bad-request`.
#[tokio::test]
async fn rooms_are_found_by_name_description_or_address() -> R {
    const XEP_0433: &str = "urn:xmpp:channel-search:0:search";
    const MUCLUMBUS: &str = "https://xmlns.zombofant.net/muclumbus/search/1.0";
    let s = start().await?;
    let mut alice = login(&s, "alice").await?;
    let rooms = [
        (
            "design@conference.localhost",
            "Architecture board",
            "Decisions",
            "1",
            "0",
        ),
        (
            "ops@conference.localhost",
            "Operations",
            "Runbooks and architecture",
            "1",
            "0",
        ),
        ("archive-tools@conference.localhost", "Tools", "", "1", "0"),
        (
            "hidden@conference.localhost",
            "Architecture (secret)",
            "",
            "0",
            "1",
        ),
    ];
    for (room, name, desc, public, members_only) in rooms {
        alice.join_room(room, "alice", None).await?;
        configure(
            &mut alice,
            room,
            &[
                ("muc#roomconfig_roomname", name),
                ("muc#roomconfig_roomdesc", desc),
                ("muc#roomconfig_publicroom", public),
                ("muc#roomconfig_membersonly", members_only),
                ("muc#roomconfig_persistentroom", "1"),
            ],
        )
        .await?;
        alice.leave_room(room, "alice").await?;
    }
    let mut bob = login(&s, "bob").await?;
    // Name, description and address; nobody is in any room; the hidden room is not shown.
    let (found, count) = find_rooms(&mut bob, MUCLUMBUS, "ARCH", None, None).await?;
    assert_eq!(
        found,
        [
            "archive-tools@conference.localhost",
            "design@conference.localhost",
            "ops@conference.localhost"
        ]
    );
    assert_eq!(count, "3");
    // Its owner finds it.
    let (found, _) = find_rooms(&mut alice, XEP_0433, "secret", None, None).await?;
    assert_eq!(found, ["hidden@conference.localhost"]);
    // Paged by address.
    let (page, count) = find_rooms(&mut bob, XEP_0433, "arch", Some(2), None).await?;
    assert_eq!(page.len(), 2);
    assert_eq!(count, "3");
    let (rest, _) = find_rooms(&mut bob, XEP_0433, "arch", Some(2), Some(&page[1])).await?;
    assert_eq!(rest, ["ops@conference.localhost"]);
    let (none, count) = find_rooms(&mut bob, XEP_0433, "nothing like it", None, None).await?;
    assert!(none.is_empty());
    assert_eq!(count, "0");
    // The form, and a refusal of nonsense.
    let ask = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", "conference.localhost")
        .with_child(Element::new("search", XEP_0433));
    let form = bob.iq_result(ask, T).await?;
    assert!(
        form.child("search", XEP_0433)
            .and_then(|s| s.child("x", ns::DATA_FORMS))
            .is_some(),
        "{form}"
    );
    let bad = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", "conference.localhost")
        .with_child(
            Element::new("search", XEP_0433).with_child(
                Element::new("x", ns::DATA_FORMS)
                    .with_attr("type", "submit")
                    .with_child(
                        Element::new("field", ns::DATA_FORMS)
                            .with_attr("var", "sinname")
                            .with_child(Element::new("value", ns::DATA_FORMS).with_text("maybe")),
                    ),
            ),
        );
    let refused = bob.iq(bad, T).await?;
    assert_eq!(refused.attr("type"), Some("error"), "{refused}");
    assert!(
        refused
            .child("error", ns::CLIENT)
            .and_then(|e| e.child("bad-request", ns::STANZA_ERRORS))
            .is_some(),
        "{refused}"
    );
    Ok(())
}
