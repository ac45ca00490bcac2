//! The web client on the HTTP port: the page is configured for this server and serves only
//! its own files; two users in a real browser (chromium, driven by Playwright for Python)
//! chat, read history and find their room again on a fresh browser, with screenshots kept in
//! `target/tmp/web-client/`. The test command installs chromium and Playwright and fetches
//! Converse.js (`scripts/fetch-converse`); when one is missing these tests fail with the
//! command that installs it, never skip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

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
    let have = Command::new("python3")
        .args(["-c", "import playwright"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        have,
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
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-client");
    let _ = std::fs::remove_dir_all(&shots);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/web/web_scenario.py");
    let url = format!("https://127.0.0.1:{}/", s.ports().http);
    let shots_arg = shots.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--url", &url, "--room", room])
            .arg("--shots")
            .arg(&shots_arg)
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(line)?;
    assert_eq!(v["history_seen_by_bob"], serde_json::json!(true));
    assert_eq!(v["reply_seen_by_alice"], serde_json::json!(true));
    assert_eq!(v["room_back_after_reload"], serde_json::json!(true));
    assert_eq!(
        v["messages_after_reload"],
        serde_json::json!(["first from alice", "reply from bob"])
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
