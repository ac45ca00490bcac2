//! PEP on users' accounts (XEP-0163) and bookmarks (XEP-0402, with XEP-0048's two older
//! forms as views of the same list), against the real binary from the test kit's client:
//! what one client bookmarks, the user's other clients are told and every generation of
//! client reads; nobody else reads or writes it; it survives a restart; bounds and bad
//! input get errors and change nothing.

use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{ns, Client, Element, ServerOptions, TestServer};

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(10);
const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const EVENT: &str = "http://jabber.org/protocol/pubsub#event";
const BM: &str = "urn:xmpp:bookmarks:1";
const LEGACY: &str = "storage:bookmarks";
const PRIVATE: &str = "jabber:iq:private";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

async fn start(dir: &std::path::Path) -> anyhow::Result<TestServer> {
    let opts = ServerOptions {
        data_dir: Some(dir.to_owned()),
        ..ServerOptions::default()
    };
    Ok(TestServer::start(&bin(), opts).await?)
}

async fn login(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    Ok(
        s.client(&format!("{user}@localhost"), &format!("{user}-pw"))
            .await?,
    )
}

fn iq(ty: &str, to: Option<&str>, child: Element) -> Element {
    let mut e = Element::new("iq", ns::CLIENT).with_attr("type", ty);
    if let Some(to) = to {
        e = e.with_attr("to", to);
    }
    e.with_child(child)
}

fn field(var: &str, value: &str) -> Element {
    Element::new("field", ns::DATA_FORMS)
        .with_attr("var", var)
        .with_child(Element::new("value", ns::DATA_FORMS).with_text(value))
}

/// XEP-0402 §3.2's publication: one conference, with the publish-options it asks for.
fn publish_bookmark(room: &str, name: &str, autojoin: bool, nick: &str) -> Element {
    let conference = Element::new("conference", BM)
        .with_attr("name", name)
        .with_attr("autojoin", if autojoin { "true" } else { "false" })
        .with_child(Element::new("nick", BM).with_text(nick));
    let options = Element::new("x", ns::DATA_FORMS)
        .with_attr("type", "submit")
        .with_child(
            Element::new("field", ns::DATA_FORMS)
                .with_attr("var", "FORM_TYPE")
                .with_attr("type", "hidden")
                .with_child(
                    Element::new("value", ns::DATA_FORMS)
                        .with_text("http://jabber.org/protocol/pubsub#publish-options"),
                ),
        )
        .with_child(field("pubsub#persist_items", "true"))
        .with_child(field("pubsub#max_items", "max"))
        .with_child(field("pubsub#send_last_published_item", "never"))
        .with_child(field("pubsub#access_model", "whitelist"));
    iq(
        "set",
        None,
        Element::new("pubsub", PUBSUB)
            .with_child(
                Element::new("publish", PUBSUB)
                    .with_attr("node", BM)
                    .with_child(
                        Element::new("item", PUBSUB)
                            .with_attr("id", room)
                            .with_child(conference),
                    ),
            )
            .with_child(Element::new("publish-options", PUBSUB).with_child(options)),
    )
}

fn get_items(node: &str, to: Option<&str>) -> Element {
    iq(
        "get",
        to,
        Element::new("pubsub", PUBSUB)
            .with_child(Element::new("items", PUBSUB).with_attr("node", node)),
    )
}

/// (item id, payload) of an items result.
fn items_of(result: &Element) -> Vec<(String, Element)> {
    result
        .child("pubsub", PUBSUB)
        .and_then(|p| p.child("items", PUBSUB))
        .map(|items| {
            items
                .children_named("item", PUBSUB)
                .map(|i| {
                    (
                        i.attr("id").unwrap_or_default().to_owned(),
                        i.children()
                            .next()
                            .cloned()
                            .unwrap_or_else(|| Element::new("none", "")),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn error_condition(c: &mut Client, request: Element) -> anyhow::Result<String> {
    let reply = c.iq(request, T).await?;
    anyhow::ensure!(
        reply.attr("type") == Some("error"),
        "expected an error: {reply:?}"
    );
    let error = reply.child("error", ns::CLIENT).expect("an <error/>");
    let condition = error
        .children()
        .find(|e| e.ns() == ns::STANZA_ERRORS && e.name() != "text")
        .map(|e| e.name().to_owned())
        .unwrap_or_default();
    Ok(condition)
}

#[tokio::test]
async fn bookmarks_reach_the_users_other_clients_and_every_generation_of_client() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path()).await?;
    for u in ["alice", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    let mut phone = login(&s, "alice").await?;
    let mut desktop = login(&s, "alice").await?;

    // The account says what it supports.
    let info = phone
        .iq_result(
            iq(
                "get",
                Some("alice@localhost"),
                Element::new("query", ns::DISCO_INFO),
            ),
            T,
        )
        .await?;
    let features: Vec<String> = info
        .child("query", ns::DISCO_INFO)
        .map(|q| {
            q.children_named("feature", ns::DISCO_INFO)
                .filter_map(|f| f.attr("var").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for f in [
        "http://jabber.org/protocol/pubsub#publish-options",
        "urn:xmpp:bookmarks:1#compat",
        "urn:xmpp:bookmarks:1#compat-pep",
        PRIVATE,
    ] {
        assert!(
            features.iter().any(|x| x == f),
            "{f} missing from {features:?}"
        );
    }

    let lobby = "lobby@conference.localhost";
    phone
        .iq_result(publish_bookmark(lobby, "Lobby", true, "al"), T)
        .await?;
    // The desktop is told.
    let event = desktop
        .recv_until(T, |m| {
            m.name() == "message" && m.child("event", EVENT).is_some()
        })
        .await?;
    assert_eq!(event.attr("from"), Some("alice@localhost"));
    let items = event
        .child("event", EVENT)
        .and_then(|e| e.child("items", EVENT));
    assert_eq!(items.and_then(|i| i.attr("node")), Some(BM));
    let item = items.and_then(|i| i.child("item", EVENT)).expect("an item");
    assert_eq!(item.attr("id"), Some(lobby));
    assert_eq!(
        item.child("conference", BM).and_then(|c| c.attr("name")),
        Some("Lobby")
    );

    // XEP-0402 read.
    let got = desktop.iq_result(get_items(BM, None), T).await?;
    let list = items_of(&got);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0, lobby);
    assert_eq!(list[0].1.attr("autojoin"), Some("true"));
    // XEP-0048 over PEP and over private XML: the same list.
    let legacy = desktop.iq_result(get_items(LEGACY, None), T).await?;
    let storage = &items_of(&legacy)[0].1;
    let conference = storage.child("conference", LEGACY).expect("a conference");
    assert_eq!(conference.attr("jid"), Some(lobby));
    assert_eq!(
        conference
            .child("nick", LEGACY)
            .map(|n| n.text())
            .as_deref(),
        Some("al")
    );
    let private = desktop
        .iq_result(
            iq(
                "get",
                None,
                Element::new("query", PRIVATE).with_child(Element::new("storage", LEGACY)),
            ),
            T,
        )
        .await?;
    let storage = private
        .child("query", PRIVATE)
        .and_then(|q| q.child("storage", LEGACY))
        .expect("storage");
    assert_eq!(storage.children_named("conference", LEGACY).count(), 1);

    // An old client writes the whole list through private XML: lobby goes, two rooms come.
    let new_storage = Element::new("storage", LEGACY)
        .with_child(
            Element::new("conference", LEGACY)
                .with_attr("jid", "dev@conference.localhost")
                .with_attr("autojoin", "true")
                .with_attr("name", "Dev"),
        )
        .with_child(
            Element::new("conference", LEGACY)
                .with_attr("jid", "ops@conference.localhost")
                .with_attr("name", "Ops"),
        );
    desktop
        .iq_result(
            iq(
                "set",
                None,
                Element::new("query", PRIVATE).with_child(new_storage),
            ),
            T,
        )
        .await?;
    let got = phone.iq_result(get_items(BM, None), T).await?;
    let mut ids: Vec<String> = items_of(&got).into_iter().map(|(id, _)| id).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["dev@conference.localhost", "ops@conference.localhost"]
    );
    // The phone was told of the retraction too.
    phone
        .recv_until(T, |m| {
            m.child("event", EVENT)
                .and_then(|e| e.child("items", EVENT))
                .and_then(|i| i.child("retract", EVENT))
                .and_then(|r| r.attr("id"))
                == Some(lobby)
        })
        .await?;

    // Nobody else reads or writes alice's bookmarks.
    let mut bob = login(&s, "bob").await?;
    assert_eq!(
        error_condition(&mut bob, get_items(BM, Some("alice@localhost"))).await?,
        "not-allowed"
    );
    let mut foreign = publish_bookmark("x@conference.localhost", "X", true, "bob");
    foreign.set_attr("to", "alice@localhost");
    assert_eq!(error_condition(&mut bob, foreign).await?, "forbidden");
    let bob_own = bob.iq_result(get_items(BM, None), T).await;
    assert!(bob_own.is_err(), "bob has no bookmarks node: {bob_own:?}");

    // A retraction, then a restart: what is stored stays.
    phone
        .iq_result(
            iq(
                "set",
                None,
                Element::new("pubsub", PUBSUB).with_child(
                    Element::new("retract", PUBSUB)
                        .with_attr("node", BM)
                        .with_attr("notify", "true")
                        .with_child(
                            Element::new("item", PUBSUB)
                                .with_attr("id", "ops@conference.localhost"),
                        ),
                ),
            ),
            T,
        )
        .await?;
    drop((phone, desktop, bob));
    s.stop().await?;
    let s = start(dir.path()).await?;
    let mut again = login(&s, "alice").await?;
    let got = again.iq_result(get_items(BM, None), T).await?;
    let list = items_of(&got);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0, "dev@conference.localhost");
    assert_eq!(list[0].1.attr("name"), Some("Dev"));
    Ok(())
}

#[tokio::test]
async fn open_nodes_are_read_by_other_users_and_bad_publications_change_nothing() -> R {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await?;
    for u in ["alice", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    let publish = |node: &str, id: &str, payload: Element| {
        iq(
            "set",
            None,
            Element::new("pubsub", PUBSUB).with_child(
                Element::new("publish", PUBSUB)
                    .with_attr("node", node)
                    .with_child(
                        Element::new("item", PUBSUB)
                            .with_attr("id", id)
                            .with_child(payload),
                    ),
            ),
        )
    };
    // An avatar's metadata (XEP-0084): open by default, the last item kept.
    let meta = "urn:xmpp:avatar:metadata";
    let info = |id: &str| {
        Element::new("metadata", meta).with_child(
            Element::new("info", meta)
                .with_attr("id", id)
                .with_attr("bytes", "100")
                .with_attr("type", "image/png"),
        )
    };
    alice.iq_result(publish(meta, "h1", info("h1")), T).await?;
    alice.iq_result(publish(meta, "h2", info("h2")), T).await?;
    let seen = bob
        .iq_result(get_items(meta, Some("alice@localhost")), T)
        .await?;
    let list = items_of(&seen);
    assert_eq!(list.len(), 1, "the last item only");
    assert_eq!(list[0].0, "h2");
    let nodes = bob
        .iq_result(
            iq(
                "get",
                Some("alice@localhost"),
                Element::new("query", ns::DISCO_ITEMS),
            ),
            T,
        )
        .await?;
    let listed: Vec<&str> = nodes
        .child("query", ns::DISCO_ITEMS)
        .map(|q| {
            q.children_named("item", ns::DISCO_ITEMS)
                .filter_map(|i| i.attr("node"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(listed, [meta]);

    // Bad publications: errors, nothing stored.
    let no_node = iq(
        "set",
        None,
        Element::new("pubsub", PUBSUB).with_child(
            Element::new("publish", PUBSUB)
                .with_child(Element::new("item", PUBSUB).with_child(Element::new("x", "urn:x"))),
        ),
    );
    assert_eq!(error_condition(&mut alice, no_node).await?, "bad-request");
    let big = Element::new("data", "urn:xmpp:avatar:data").with_text("A".repeat(200 * 1024));
    assert_eq!(
        error_condition(&mut alice, publish("urn:xmpp:avatar:data", "h3", big)).await?,
        "not-acceptable"
    );
    let not_a_bookmark = publish(BM, "room@conference.localhost", Element::new("x", "urn:x"));
    assert_eq!(
        error_condition(&mut alice, not_a_bookmark).await?,
        "bad-request"
    );
    let private_jabber = iq(
        "set",
        None,
        Element::new("query", PRIVATE).with_child(Element::new("query", "jabber:iq:roster")),
    );
    assert_eq!(
        error_condition(&mut alice, private_jabber).await?,
        "not-acceptable"
    );
    for i in 0..20 {
        let r = alice
            .iq(
                publish(
                    &format!("urn:example:n{i}"),
                    "1",
                    Element::new("x", "urn:x"),
                ),
                T,
            )
            .await?;
        if r.attr("type") == Some("error") {
            let err = r.child("error", ns::CLIENT).expect("error");
            assert!(
                err.child("resource-constraint", ns::STANZA_ERRORS)
                    .is_some(),
                "{r:?}"
            );
            // 16 nodes: the avatar metadata and 15 of these.
            assert_eq!(i, 15, "refused at the bound");
            break;
        }
        assert!(i < 15, "publication {i} was accepted past the node bound");
    }
    let nodes = alice
        .iq_result(iq("get", None, Element::new("query", ns::DISCO_ITEMS)), T)
        .await;
    // Without `to`, disco goes to the server; the account's own list is at its bare JID.
    assert!(nodes.is_ok());
    let own = alice
        .iq_result(
            iq(
                "get",
                Some("alice@localhost"),
                Element::new("query", ns::DISCO_ITEMS),
            ),
            T,
        )
        .await?;
    let count = own
        .child("query", ns::DISCO_ITEMS)
        .map(|q| q.children_named("item", ns::DISCO_ITEMS).count())
        .unwrap_or_default();
    assert_eq!(count, 16);
    // Deleting a node frees its place.
    alice
        .iq_result(
            iq(
                "set",
                None,
                Element::new("pubsub", PUBSUB_OWNER).with_child(
                    Element::new("delete", PUBSUB_OWNER).with_attr("node", "urn:example:n0"),
                ),
            ),
            T,
        )
        .await?;
    alice
        .iq_result(
            publish("urn:example:last", "1", Element::new("x", "urn:x")),
            T,
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn unread_counts_follow_the_bookmarks_and_the_read_positions() -> R {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await?;
    for u in ["alice", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    let (r1, r2) = ("one@conference.localhost", "two@conference.localhost");
    for room in [r1, r2] {
        alice.join_room(room, "alice", None).await?;
        let submit = iq(
            "set",
            Some(room),
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
        alice.iq_result(submit, T).await?;
        bob.join_room(room, "bob", None).await?;
    }
    let mut first_in_r1 = None;
    for i in 0..3 {
        let echo = bob.send_groupchat(r1, &format!("r1 {i}"), None).await?;
        if i == 0 {
            first_in_r1 = pchat_testkit::stanza_id(&echo, r1);
        }
    }
    for i in 0..2 {
        bob.send_groupchat(r2, &format!("r2 {i}"), None).await?;
    }
    for room in [r1, r2, "gone@conference.localhost"] {
        alice
            .iq_result(publish_bookmark(room, room, true, "alice"), T)
            .await?;
    }
    // alice read r1 up to its first message (XEP-0490).
    let displayed = Element::new("displayed", "urn:xmpp:mds:displayed:0").with_child(
        Element::new("stanza-id", "urn:xmpp:sid:0")
            .with_attr("by", r1)
            .with_attr("id", first_in_r1.clone().expect("a stanza-id")),
    );
    let publish = iq(
        "set",
        None,
        Element::new("pubsub", PUBSUB).with_child(
            Element::new("publish", PUBSUB)
                .with_attr("node", "urn:xmpp:mds:displayed:0")
                .with_child(
                    Element::new("item", PUBSUB)
                        .with_attr("id", r1)
                        .with_child(displayed),
                ),
        ),
    );
    alice.iq_result(publish, T).await?;
    let ask = iq(
        "get",
        Some("conference.localhost"),
        Element::new("unread", "urn:pchat:unread:0"),
    );
    let answer = alice.iq_result(ask, T).await?;
    let rooms: Vec<(String, String, Option<String>)> = answer
        .child("unread", "urn:pchat:unread:0")
        .map(|u| {
            u.children_named("room", "urn:pchat:unread:0")
                .map(|r| {
                    (
                        r.attr("jid").unwrap_or_default().to_owned(),
                        r.attr("count").unwrap_or_default().to_owned(),
                        r.attr("after").map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        rooms,
        [
            (r1.to_owned(), "2".to_owned(), first_in_r1),
            (r2.to_owned(), "2".to_owned(), None),
        ],
        "a room that does not exist is left out"
    );
    // bob bookmarked nothing: an empty answer.
    let ask = iq(
        "get",
        Some("conference.localhost"),
        Element::new("unread", "urn:pchat:unread:0"),
    );
    let empty = bob.iq_result(ask, T).await?;
    let n = empty
        .child("unread", "urn:pchat:unread:0")
        .map(|u| u.children().count());
    assert_eq!(n, Some(0));
    Ok(())
}

#[tokio::test]
async fn a_vcard_is_set_by_its_owner_and_read_by_other_users() -> R {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await?;
    for u in ["alice", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    let mut alice = login(&s, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    let vcard = |c: Option<Element>| {
        let mut v = Element::new("vCard", "vcard-temp");
        if let Some(c) = c {
            v = v.with_child(c);
        }
        v
    };
    // None set yet: an empty vCard.
    let empty = bob
        .iq_result(iq("get", Some("alice@localhost"), vcard(None)), T)
        .await?;
    assert_eq!(
        empty
            .child("vCard", "vcard-temp")
            .map(|v| v.children().count()),
        Some(0)
    );
    let photo = Element::new("PHOTO", "vcard-temp")
        .with_child(Element::new("TYPE", "vcard-temp").with_text("image/png"))
        .with_child(Element::new("BINVAL", "vcard-temp").with_text("iVBORw0KGgo="));
    alice
        .iq_result(
            iq(
                "set",
                None,
                vcard(Some(Element::new("FN", "vcard-temp").with_text("Alice A.")))
                    .with_child(photo),
            ),
            T,
        )
        .await?;
    let got = bob
        .iq_result(iq("get", Some("alice@localhost"), vcard(None)), T)
        .await?;
    let card = got.child("vCard", "vcard-temp").expect("a vCard");
    assert_eq!(
        card.child("FN", "vcard-temp").map(|f| f.text()).as_deref(),
        Some("Alice A.")
    );
    assert!(card.child("PHOTO", "vcard-temp").is_some());
    // Only the owner sets it; an oversized one is refused and changes nothing.
    let mut forged = iq("set", None, vcard(None));
    forged.set_attr("to", "alice@localhost");
    assert_eq!(error_condition(&mut bob, forged).await?, "forbidden");
    let huge = vcard(Some(
        Element::new("NOTE", "vcard-temp").with_text("x".repeat(200 * 1024)),
    ));
    assert_eq!(
        error_condition(&mut alice, iq("set", None, huge)).await?,
        "not-acceptable"
    );
    let again = bob
        .iq_result(iq("get", Some("alice@localhost"), vcard(None)), T)
        .await?;
    assert_eq!(
        again
            .child("vCard", "vcard-temp")
            .and_then(|v| v.child("FN", "vcard-temp"))
            .map(|f| f.text())
            .as_deref(),
        Some("Alice A.")
    );
    Ok(())
}
