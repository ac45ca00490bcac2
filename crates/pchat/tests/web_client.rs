//! The web client on the HTTP port: the page is configured for this server and serves only
//! its own files; two users in a real browser (chromium, driven by Playwright for Python)
//! chat, read history (scrolling up a long one, page by page from the archive) and find
//! their room again on a fresh browser, with screenshots kept in
//! `target/tmp/web-client/`. The test command installs chromium and Playwright and fetches
//! Converse.js (`scripts/fetch-converse`); when one is missing these tests fail with the
//! command that installs it, never skip.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::http::{csrf_token, get, https_request, post, session_cookie};
use pchat_testkit::{https_get, ns, Element, ServerOptions, TestServer};

type R = anyhow::Result<()>;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn converse_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../web/converse")
}

fn need_converse() {
    assert!(
        converse_dir().join("converse.min.js").is_file(),
        "Converse.js is missing: run `scripts/fetch-converse` (scripts/test does)"
    );
}

fn http_addr(s: &TestServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], s.ports().http))
}

#[tokio::test]
async fn the_page_is_configured_for_this_server_and_serves_only_its_files() -> R {
    need_converse();
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    let page = https_get(http_addr(&s), "localhost", "/").await?.response;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for expected in [
        "\"locked_domain\":\"localhost\"",
        "\"muc_domain\":\"conference.localhost\"",
        "\"muc_search_service\":\"conference.localhost\"",
        "\"allow_bookmarks\":true",
        "\"enable_smacks\":true",
        "/xmpp-websocket",
        "/converse/converse.min.js",
    ] {
        assert!(
            page.contains(expected),
            "{expected} missing from the page:\n{page}"
        );
    }
    let lower = page.to_ascii_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'self'"),
        "{page}"
    );
    let js = https_get(http_addr(&s), "localhost", "/converse/converse.min.js")
        .await?
        .response;
    assert!(
        js.starts_with("HTTP/1.1 200"),
        "{}",
        &js[..200.min(js.len())]
    );
    assert!(js
        .to_ascii_lowercase()
        .contains("content-type: text/javascript"));
    for bad in [
        "/converse/../Cargo.toml",
        "/converse/%2e%2e/Cargo.toml",
        "/converse/.VERSION",
        "/converse/images/../../Cargo.toml",
        "/converse/nothing-here.js",
    ] {
        let reply = https_get(http_addr(&s), "localhost", bad).await?.response;
        assert!(
            reply.starts_with("HTTP/1.1 404") || reply.starts_with("HTTP/1.1 400"),
            "{bad}: {}",
            reply.lines().next().unwrap_or_default()
        );
    }
    drop(s);

    // Without the files, the page says how to get them.
    let dir = tempfile::tempdir()?;
    let empty = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("pchat.toml"),
        format!("web_dir = \"{}\"\n", empty.path().display()),
    )?;
    let opts = ServerOptions {
        data_dir: Some(dir.path().to_owned()),
        ..ServerOptions::default()
    };
    let s = TestServer::start(&bin(), opts).await?;
    let page = https_get(http_addr(&s), "localhost", "/").await?.response;
    assert!(page.starts_with("HTTP/1.1 503"), "{page}");
    assert!(page.contains("scripts/fetch-converse"), "{page}");
    Ok(())
}

#[tokio::test]
async fn two_browser_users_chat_and_find_their_room_again() -> R {
    need_converse();
    assert!(
        common::scenario::python_has("playwright"),
        "Playwright is missing: run `python3 -m pip install -r tests/web/requirements.txt` (scripts/test does)"
    );
    assert!(
        PathBuf::from("/usr/bin/chromium").is_file(),
        "chromium is missing: run `apt-get install -y chromium` (scripts/test does)"
    );
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    s.add_user("alice@localhost", "alice-pw").await?;
    s.add_user("bob@localhost", "bob-pw").await?;
    let room = "lobby@conference.localhost";
    // A room with a long history, written before: three of Converse.js's MAM pages (50).
    let deep = "archive@conference.localhost";
    let deep_count = 150;
    s.add_user("carol@localhost", "carol-pw").await?;
    let mut carol = s.client("carol@localhost", "carol-pw").await?;
    carol.join_room(deep, "carol", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", deep)
        .with_child(
            Element::new("query", ns::MUC_OWNER).with_child(
                Element::new("x", ns::DATA_FORMS)
                    .with_attr("type", "submit")
                    .with_child(
                        Element::new("field", ns::DATA_FORMS)
                            .with_attr("var", "muc#roomconfig_roomname")
                            .with_child(
                                Element::new("value", ns::DATA_FORMS)
                                    .with_text("Archive of decisions"),
                            ),
                    ),
            ),
        );
    carol.iq_result(submit, Duration::from_secs(10)).await?;
    for i in 0..deep_count {
        carol
            .send_groupchat(deep, &format!("deep {i:03}"), None)
            .await?;
    }
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-client");
    let _ = std::fs::remove_dir_all(&shots);
    let url = format!("https://127.0.0.1:{}/", s.ports().http);
    let args = vec![
        "--url".into(),
        url,
        "--room".into(),
        room.into(),
        "--shots".into(),
        shots.display().to_string(),
        "--deep-room".into(),
        deep.into(),
        "--deep-count".into(),
        deep_count.to_string(),
    ];
    let v = common::scenario::run("tests/web/web_scenario.py", args).await?;
    assert_eq!(v["history_seen_by_bob"], serde_json::json!(true));
    assert_eq!(v["reply_seen_by_alice"], serde_json::json!(true));
    assert_eq!(v["room_back_after_reload"], serde_json::json!(true));
    assert_eq!(
        v["messages_after_reload"],
        serde_json::json!(["first from alice", "reply from bob"])
    );
    // Scrolling up brought the whole history, page by page from the archive, in order.
    assert_eq!(v["deep"]["first_seen"], serde_json::json!(true), "{v}");
    assert_eq!(v["deep"]["in_order"], serde_json::json!(true), "{v}");
    assert_eq!(
        v["deep"]["distinct_seen"],
        serde_json::json!(deep_count),
        "{v}"
    );
    assert!(v["deep"]["scrolls"].as_u64() >= Some(2), "{v}");
    // Found by searching "ARCH" (room search on the MUC service): the room's name and address.
    assert_eq!(
        v["deep"]["found_by_search"],
        serde_json::json!(format!("Archive of decisions ({deep})")),
        "{v}"
    );
    let kept = std::fs::read_dir(&shots)?.count();
    assert!(kept >= 4, "{kept} screenshots in {}", shots.display());

    // The room came back from a server-side bookmark (XEP-0402), with autojoin.
    let mut alice = s.client("alice@localhost", "alice-pw").await?;
    let items = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_child(
            Element::new("pubsub", "http://jabber.org/protocol/pubsub").with_child(
                Element::new("items", "http://jabber.org/protocol/pubsub")
                    .with_attr("node", "urn:xmpp:bookmarks:1"),
            ),
        );
    let reply = alice.iq_result(items, Duration::from_secs(10)).await?;
    let item = reply
        .child("pubsub", "http://jabber.org/protocol/pubsub")
        .and_then(|p| p.child("items", "http://jabber.org/protocol/pubsub"))
        .and_then(|i| i.child("item", "http://jabber.org/protocol/pubsub"))
        .expect("a bookmark");
    assert_eq!(item.attr("id"), Some(room));
    let conference = item
        .child("conference", "urn:xmpp:bookmarks:1")
        .expect("conference");
    assert_eq!(conference.attr("autojoin"), Some("true"));
    Ok(())
}

#[tokio::test]
async fn the_room_management_page_works_in_a_browser_and_refuses_forged_requests() -> R {
    assert!(
        common::scenario::python_has("playwright"),
        "Playwright is missing: run `python3 -m pip install -r tests/web/requirements.txt` (scripts/test does)"
    );
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    s.add_user("alice@localhost", "alice-pw").await?;
    s.add_user("bob@localhost", "bob-pw").await?;
    // A members-only room of alice's with a history to search, bob not a member.
    let decisions = "decisions@conference.localhost";
    {
        let mut alice = s.client("alice@localhost", "alice-pw").await?;
        alice.join_room(decisions, "alice", None).await?;
        let form = |fields: &[(&str, &str)]| {
            let mut x = Element::new("x", ns::DATA_FORMS).with_attr("type", "submit");
            for (var, value) in fields {
                x.push_child(
                    Element::new("field", ns::DATA_FORMS)
                        .with_attr("var", *var)
                        .with_child(Element::new("value", ns::DATA_FORMS).with_text(*value)),
                );
            }
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_attr("to", decisions)
                .with_child(Element::new("query", ns::MUC_OWNER).with_child(x))
        };
        alice
            .iq_result(
                form(&[
                    ("FORM_TYPE", "http://jabber.org/protocol/muc#roomconfig"),
                    ("muc#roomconfig_membersonly", "1"),
                ]),
                Duration::from_secs(10),
            )
            .await?;
        for body in [
            "the quarterly budget is approved",
            "lunch at noon on Friday",
            "budget review moved to Monday",
        ] {
            alice.send_groupchat(decisions, body, None).await?;
        }
    }
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rooms-page");
    let _ = std::fs::remove_dir_all(&shots);
    let url = format!("https://127.0.0.1:{}", s.ports().http);
    let args = vec![
        "--url".into(),
        url,
        "--shots".into(),
        shots.display().to_string(),
        "--search-room".into(),
        decisions.into(),
    ];
    let v = common::scenario::run("tests/web/rooms_scenario.py", args).await?;
    let room = "planning@conference.localhost";
    assert_eq!(v["created"], serde_json::json!(room));
    // The history search: both budget messages, oldest first; nothing for a word no
    // message has; bob, not a member, refused by the room's own rule.
    assert_eq!(
        v["search_hits"],
        serde_json::json!([
            "the quarterly budget is approved",
            "budget review moved to Monday"
        ]),
        "{v}"
    );
    for key in [
        "wrong_password_refused",
        "renamed",
        "members_only",
        "bob_member",
        "bob_refused",
        "search_nothing",
        "bob_search_refused",
    ] {
        assert_eq!(v[key], serde_json::json!(true), "{key}: {v}");
    }

    // What the page did is what an XMPP client sees: the room's name, members only, bob a
    // member.
    let mut alice = s.client("alice@localhost", "alice-pw").await?;
    let info = alice.disco_info(room).await?;
    assert!(info.has_feature("muc_membersonly"), "{info:?}");
    let members = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_ADMIN)
                .with_child(Element::new("item", ns::MUC_ADMIN).with_attr("affiliation", "member")),
        );
    let list = alice.iq_result(members, Duration::from_secs(10)).await?;
    let jids: Vec<&str> = list
        .child("query", ns::MUC_ADMIN)
        .map(|q| {
            q.children_named("item", ns::MUC_ADMIN)
                .filter_map(|i| i.attr("jid"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(jids, ["bob@localhost"]);

    // Forged requests: a logged-in cookie without the form's token, and with it from another
    // site, change nothing.
    let addr = http_addr(&s);
    let login = https_request(
        addr,
        post("/rooms/login", "", "", "user=alice&password=alice-pw"),
    )
    .await?;
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = session_cookie(&login);
    let lower = login.to_ascii_lowercase();
    for attr in ["secure", "httponly", "samesite=strict", "path=/rooms"] {
        assert!(lower.contains(attr), "cookie without {attr}: {login}");
    }
    let home = https_request(addr, get("/rooms", &cookie)).await?;
    let csrf = csrf_token(&home);
    let body = format!("room={room}&jid=mallory%40localhost&affiliation=owner");
    let no_token = https_request(addr, post("/rooms/affiliation", &cookie, "", &body)).await?;
    assert!(no_token.starts_with("HTTP/1.1 403"), "{no_token}");
    let foreign = https_request(
        addr,
        post(
            "/rooms/affiliation",
            &cookie,
            "Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\n",
            &format!("csrf={csrf}&{body}"),
        ),
    )
    .await?;
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    let owners = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_ADMIN)
                .with_child(Element::new("item", ns::MUC_ADMIN).with_attr("affiliation", "owner")),
        );
    let list = alice.iq_result(owners, Duration::from_secs(10)).await?;
    let text = format!("{list:?}");
    assert!(
        !text.contains("mallory"),
        "a forged request changed the room: {text}"
    );
    Ok(())
}
