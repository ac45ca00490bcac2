//! `pchat data export` / `import`: a standalone SQLite deployment moves into a PostgreSQL
//! pool and back, byte for byte (counts and checksum), with the users' bookmarks and vCards
//! (PEP), which clients read back from a server on the imported data; damaged archives
//! change nothing.
//! The pool's etcd runs with TLS and authentication, its PostgreSQL with TLS and passwords
//! (owned by an agent); the shell uses an operator's identity.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::pg::AgentProcess;
use common::secure::SecureEtcd;
use pchat_testkit::{ns, Client, Element, ServerOptions, TestServer};

const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const BM: &str = "urn:xmpp:bookmarks:1";
const VCARD: &str = "vcard-temp";
const T: Duration = Duration::from_secs(10);

/// Alice's bookmark of `small@…` (XEP-0402) and her vCard (XEP-0054).
async fn set_bookmark_and_vcard(alice: &mut Client) -> anyhow::Result<()> {
    let conference = Element::new("conference", BM)
        .with_attr("name", "Small & quiet")
        .with_attr("autojoin", "true")
        .with_child(Element::new("nick", BM).with_text("ally"));
    let publish = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_child(
            Element::new("pubsub", PUBSUB).with_child(
                Element::new("publish", PUBSUB)
                    .with_attr("node", BM)
                    .with_child(
                        Element::new("item", PUBSUB)
                            .with_attr("id", "small@conference.localhost")
                            .with_child(conference),
                    ),
            ),
        );
    alice.iq_result(publish, T).await?;
    let card = Element::new("vCard", VCARD)
        .with_child(Element::new("FN", VCARD).with_text("Alice \u{e9}l\u{e8}ve"));
    let set = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_child(card);
    alice.iq_result(set, T).await?;
    Ok(())
}

/// What a server on imported data tells clients: alice's bookmarks (to her) and her vCard
/// (to bob).
async fn check_bookmark_and_vcard(server: &TestServer) -> anyhow::Result<()> {
    let mut alice = server.client("alice@localhost", "pw").await?;
    let get = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_child(
            Element::new("pubsub", PUBSUB)
                .with_child(Element::new("items", PUBSUB).with_attr("node", BM)),
        );
    let got = alice.iq_result(get, T).await?;
    let items: Vec<_> = got
        .child("pubsub", PUBSUB)
        .and_then(|p| p.child("items", PUBSUB))
        .map(|i| i.children_named("item", PUBSUB).cloned().collect())
        .unwrap_or_default();
    assert_eq!(items.len(), 1, "{got:?}");
    assert_eq!(items[0].attr("id"), Some("small@conference.localhost"));
    let conference = items[0].child("conference", BM).expect("a conference");
    assert_eq!(conference.attr("name"), Some("Small & quiet"));
    assert_eq!(
        conference.child("nick", BM).map(|n| n.text()).as_deref(),
        Some("ally")
    );
    let mut bob = server.client("bob@localhost", "pw2").await?;
    let get = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", "alice@localhost")
        .with_child(Element::new("vCard", VCARD));
    let got = bob.iq_result(get, T).await?;
    assert_eq!(
        got.child("vCard", VCARD)
            .and_then(|v| v.child("FN", VCARD))
            .map(|f| f.text())
            .as_deref(),
        Some("Alice \u{e9}l\u{e8}ve")
    );
    Ok(())
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn pchat(args: &[&str], env: &[(String, String)]) -> anyhow::Result<String> {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().cloned())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pchat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn standalone_to_pool_and_back_is_lossless() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let mut server = TestServer::start(&bin(), ServerOptions::default()).await?;
    server.add_user("alice@localhost", "pw").await?;
    server.add_user("bob@localhost", "pw2").await?;
    let mut alice = server.client("alice@localhost", "pw").await?;
    for (room, n) in [
        ("big@conference.localhost", 1200),
        ("small@conference.localhost", 3),
    ] {
        alice.join_room(room, "alice", None).await?;
        let form = Element::new("x", ns::DATA_FORMS).with_attr("type", "submit");
        let iq = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", room)
            .with_child(Element::new("query", ns::MUC_OWNER).with_child(form));
        alice.iq_result(iq, Duration::from_secs(10)).await?;
        for i in 0..n {
            alice
                .send_groupchat(
                    room,
                    &format!("{room} message {i} with \"quotes\" & <angles>"),
                    None,
                )
                .await?;
        }
    }
    let grant = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", "small@conference.localhost")
        .with_child(
            Element::new("query", ns::MUC_ADMIN).with_child(
                Element::new("item", ns::MUC_ADMIN)
                    .with_attr("jid", "bob@localhost")
                    .with_attr("affiliation", "member"),
            ),
        );
    alice.iq_result(grant, Duration::from_secs(10)).await?;
    set_bookmark_and_vcard(&mut alice).await?;
    drop(alice);
    server.stop().await?;
    let dir = s(server.data_dir());

    let f1 = work.path().join("standalone.pchat");
    let out = pchat(
        &["--json", "--data-dir", &dir, "data", "export", &s(&f1)],
        &[],
    )?;
    let totals: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        (
            totals["users"].as_u64(),
            totals["rooms"].as_u64(),
            totals["messages"].as_u64(),
            totals["pep_items"].as_u64()
        ),
        (Some(2), Some(2), Some(1203), Some(2))
    );

    // Into a pool (PostgreSQL with TLS and passwords, owned by its agent).
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    let secure = SecureEtcd::start(work.path(), "pc1", 1, &["a_db"], &["s1"]).await?;
    let etcd = secure.endpoints_csv();
    let env = secure.env();
    let pg = AgentProcess::start(
        work.path(),
        "a_db",
        "pc1",
        &secure.endpoints(),
        &secure.instance_dir("a_db"),
    )?;
    pg.wait_up(&secure.operator_dir()).await?;
    let topo = work.path().join("topology.toml");
    std::fs::write(
        &topo,
        format!(
            "share = \"/tmp/share\"\netcd = [\"{etcd}\"]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
             [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ name = \"a_db\", address = \"{}\", agent = \"{}\" }}\n\
             [[servers]]\nname = \"s1\"\nsite = \"A\"\naddress = \"127.0.0.1:5222\"\n",
            pg.address(),
            pg.agent_url
        ),
    )?;
    secure.setup(&bin(), &topo).await?;
    pchat(&["topology", "publish", &s(&topo)], &env)?;
    pchat(&["--in-pool", "pc1", "db", "install"], &env)?;
    pchat(&["--in-pool", "pc1", "data", "import", &s(&f1)], &env)?;
    // Importing again changes nothing (resumable, idempotent).
    pchat(&["--in-pool", "pc1", "data", "import", &s(&f1)], &env)?;
    let f2 = work.path().join("pool.pchat");
    pchat(&["--in-pool", "pc1", "data", "export", &s(&f2)], &env)?;
    assert!(
        std::fs::read(&f1)? == std::fs::read(&f2)?,
        "the pool holds exactly what the standalone server held"
    );

    // And back into a fresh standalone data directory.
    let back = work.path().join("back");
    pchat(&["--data-dir", &s(&back), "data", "import", &s(&f2)], &[])?;
    let f3 = work.path().join("back.pchat");
    pchat(&["--data-dir", &s(&back), "data", "export", &s(&f3)], &[])?;
    assert!(std::fs::read(&f1)? == std::fs::read(&f3)?);
    let options = ServerOptions {
        data_dir: Some(back.clone()),
        ..ServerOptions::default()
    };
    let mut server = TestServer::start(&bin(), options).await?;
    check_bookmark_and_vcard(&server).await?;
    server.stop().await?;

    // A damaged archive is refused before anything is written.
    let text = std::fs::read_to_string(&f1)?;
    let damaged = work.path().join("damaged.pchat");
    std::fs::write(&damaged, text.replacen("message 7 ", "message 8 ", 1))?;
    let fresh = work.path().join("fresh");
    let out = Command::new(bin())
        .args(["--data-dir", &s(&fresh), "data", "import", &s(&damaged)])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)?.contains("damaged"));
    let truncated = work.path().join("truncated.pchat");
    std::fs::write(&truncated, &text[..text.len() / 2])?;
    let out = Command::new(bin())
        .args(["--data-dir", &s(&fresh), "data", "import", &s(&truncated)])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let listed = pchat(&["--json", "--data-dir", &s(&fresh), "room", "list"], &[])?;
    assert_eq!(
        listed.trim(),
        "[]",
        "nothing was imported from bad archives"
    );
    Ok(())
}

/// A long shell command shows an indicatif bar on a terminal (here a pseudo-terminal made
/// by util-linux's `script`) and plain lines, without a terminal escape, otherwise.
#[test]
fn import_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let (src, file) = (work.path().join("src"), work.path().join("e.jsonl"));
    let add = Command::new(bin())
        .args(["--data-dir", &s(&src), "user", "add", "alice@localhost"])
        .arg("--password-stdin")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().expect("stdin").write_all(b"alice-pw\n")?;
            c.wait()
        })?;
    anyhow::ensure!(add.success(), "user add failed");
    pchat(&["--data-dir", &s(&src), "data", "export", &s(&file)], &[])?;

    let plain = Command::new(bin())
        .args([
            "--data-dir",
            &s(&work.path().join("plain")),
            "data",
            "import",
        ])
        .arg(&file)
        .output()?;
    let err = String::from_utf8_lossy(&plain.stderr);
    anyhow::ensure!(plain.status.success(), "{err}");
    assert!(err.contains("imported 0 messages"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "a terminal escape off a terminal: {err:?}"
    );

    let command = format!(
        "{} --data-dir {} data import {}",
        bin().display(),
        work.path().join("tty").display(),
        file.display()
    );
    let tty = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()?;
    let out = String::from_utf8_lossy(&tty.stdout);
    anyhow::ensure!(tty.status.success(), "{out}");
    // indicatif's drawing: the line cleared and redrawn, the message inside the bar.
    assert!(
        out.contains("\u{1b}[2K"),
        "no bar drawn on a terminal: {out:?}"
    );
    assert!(out.contains("imported 0 messages"), "{out:?}");
    assert!(
        out.contains("1 users (0 PEP items: bookmarks, vCards, private data), 0 rooms"),
        "{out:?}"
    );
    Ok(())
}
