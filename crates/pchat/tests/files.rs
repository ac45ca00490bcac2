//! File sharing (XEP-0363 HTTP File Upload) on a real server, from a client's point of view:
//! slixmpp (an independent client) uploads a 20 MB file and posts its link in a members-only
//! room; a member downloads it with HTTP Basic, others are refused; what must be refused (too
//! large, not in a room, bad name, wrong token or length, a category without files, a full
//! quota) is refused with a clear error and changes nothing; every step is on the compliance
//! record; `pchat file remove` takes the file away.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pchat_testkit::{ns, Client, Element, ServerOptions, TestServer};
use sha2::Digest as _;

type R = anyhow::Result<()>;

const ROOMS: &str = "conference.localhost";
const UPLOAD: &str = "upload.localhost";
const HTTP_UPLOAD: &str = "urn:xmpp:http:upload:0";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/interop/{name}"))
}

fn have_python_clients() {
    let have = Command::new("python3")
        .args(["-c", "import slixmpp, aiohttp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(have, "slixmpp or aiohttp is missing: run `python3 -m pip install -r tests/interop/requirements.txt` (scripts/test does)");
}

async fn server_with(
    config: Option<&str>,
) -> anyhow::Result<(TestServer, Option<tempfile::TempDir>)> {
    let (dir, data_dir) = match config {
        Some(text) => {
            let dir = tempfile::tempdir()?;
            std::fs::write(dir.path().join("pchat.toml"), text)?;
            let path = dir.path().to_owned();
            (Some(dir), Some(path))
        }
        None => (None, None),
    };
    let s = TestServer::start(
        &bin(),
        ServerOptions {
            data_dir,
            ..ServerOptions::default()
        },
    )
    .await?;
    for u in ["alice", "bob", "eve", "sli"] {
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

fn room(name: &str) -> String {
    format!("{name}@{ROOMS}")
}

/// An instant room owned by `c`, with these configuration fields.
async fn create_room(c: &mut Client, name: &str, fields: &[(&str, &str)]) -> R {
    c.join_room(&room(name), "owner", None).await?;
    let mut x = Element::new("x", ns::DATA_FORMS)
        .with_attr("type", "submit")
        .with_child(
            Element::new("field", ns::DATA_FORMS)
                .with_attr("var", "FORM_TYPE")
                .with_child(
                    Element::new("value", ns::DATA_FORMS)
                        .with_text("http://jabber.org/protocol/muc#roomconfig"),
                ),
        );
    for (var, value) in fields {
        x.push_child(
            Element::new("field", ns::DATA_FORMS)
                .with_attr("var", *var)
                .with_child(Element::new("value", ns::DATA_FORMS).with_text(*value)),
        );
    }
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room(name))
        .with_child(Element::new("query", ns::MUC_OWNER).with_child(x));
    c.iq_result(submit, Duration::from_secs(10)).await?;
    Ok(())
}

async fn make_member(c: &mut Client, name: &str, jid: &str) -> R {
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room(name))
        .with_child(
            Element::new("query", ns::MUC_ADMIN).with_child(
                Element::new("item", ns::MUC_ADMIN)
                    .with_attr("jid", jid)
                    .with_attr("affiliation", "member"),
            ),
        );
    c.iq_result(iq, Duration::from_secs(10)).await?;
    Ok(())
}

/// Asks the upload service for a slot; the whole reply (result or error).
async fn request_slot(
    c: &mut Client,
    name: &str,
    size: u64,
    content_type: &str,
) -> anyhow::Result<Element> {
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", UPLOAD)
        .with_child(
            Element::new("request", HTTP_UPLOAD)
                .with_attr("filename", name)
                .with_attr("size", size.to_string())
                .with_attr("content-type", content_type),
        );
    Ok(c.iq(iq, Duration::from_secs(10)).await?)
}

fn slot_urls(reply: &Element) -> (String, String) {
    let slot = reply
        .child("slot", HTTP_UPLOAD)
        .unwrap_or_else(|| panic!("no slot: {reply}"));
    let url = |n: &str| {
        slot.child(n, HTTP_UPLOAD)
            .and_then(|e| e.attr("url"))
            .unwrap_or_default()
            .to_owned()
    };
    (url("put"), url("get"))
}

fn error_condition(reply: &Element) -> String {
    reply
        .child("error", ns::CLIENT)
        .and_then(|e| {
            e.children()
                .find(|c| c.ns() == ns::STANZA_ERRORS && c.name() != "text")
        })
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|| format!("no error in {reply}"))
}

/// One HTTPS request to `s` (see [`common::http::http_fetch`]).
fn fetch(
    s: &TestServer,
    url: &str,
    credentials: Option<(&str, &str)>,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    common::http::http_fetch(&s.data_dir().join("tls/cert.pem"), url, credentials, extra)
}

/// A PUT of `body` (a file's path) with these extra http_fetch.py arguments.
fn put_body(
    s: &TestServer,
    url: &str,
    body: &str,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec!["--method", "PUT", "--body-file", body];
    args.extend_from_slice(extra);
    fetch(s, url, None, &args)
}

/// Asks `c`'s slot for `name` and PUTs `body` there (which must answer 201); returns the
/// file's GET link.
async fn uploaded(
    s: &TestServer,
    c: &mut Client,
    name: &str,
    size: u64,
    content_type: &str,
    body: &str,
) -> anyhow::Result<String> {
    let reply = request_slot(c, name, size, content_type).await?;
    let (put, get) = slot_urls(&reply);
    let r = put_body(s, &put, body, &["--content-type", content_type])?;
    assert_eq!(status(&r), 201, "{r}");
    Ok(get)
}

fn status(v: &serde_json::Value) -> u64 {
    v["status"].as_u64().unwrap_or_default()
}

async fn compliance_kinds(s: &TestServer) -> anyhow::Result<Vec<(String, String, String)>> {
    let out = s
        .run_cli_ok(["--json", "compliance", "list", "--limit", "1000"])
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let ev = &e["event"];
            (
                ev["kind"].as_str().unwrap_or_default().to_owned(),
                ev["actor"].as_str().unwrap_or_default().to_owned(),
                ev["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The server's peak resident memory (VmHWM), KiB.
fn peak_rss_kib(s: &TestServer) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid().unwrap_or(0)))
        .unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn write_random_file(path: &Path, bytes: usize) -> anyhow::Result<String> {
    let mut data = vec![0u8; bytes];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, &data)?;
    Ok(format!("{:x}", sha2::Sha256::digest(&data)))
}

#[tokio::test]
async fn slixmpp_shares_a_20_mb_file_that_only_members_download() -> R {
    have_python_clients();
    let (s, _dir) = server_with(None).await?;
    let mut alice = login(&s, "alice").await?;
    create_room(&mut alice, "deals", &[("muc#roomconfig_membersonly", "1")]).await?;
    make_member(&mut alice, "deals", "sli@localhost").await?;

    // The domain lists the upload service; it says how large a file may be (Lync's default
    // MaxFileSizeKB, 20000 KiB).
    let items = alice.disco_items("localhost").await?;
    assert!(items.iter().any(|i| i.jid == UPLOAD), "{items:?}");

    let work = tempfile::tempdir()?;
    let file = work.path().join("quarterly report.bin");
    let size = 20_000_000;
    let sha = write_random_file(&file, size)?;
    let addr = s.c2s_addr();
    let ca = s.data_dir().join("tls/cert.pem");
    let peak_before = peak_rss_kib(&s);
    let out = {
        let (file, ca) = (file.clone(), ca.clone());
        tokio::task::spawn_blocking(move || {
            Command::new("python3")
                .arg(script("upload_scenario.py"))
                .args(["--jid", "sli@localhost", "--password", "sli-pw"])
                .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
                .args(["--room", &room("deals"), "--nick", "sli"])
                .arg("--file")
                .arg(&file)
                .arg("--ca")
                .arg(&ca)
                .output()
        })
        .await??
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "slixmpp upload failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_tails()
    );
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
    let url = v["url"].as_str().unwrap_or_default().to_owned();
    assert_eq!(v["max_file_size"], serde_json::json!(20_000 * 1024));
    assert!(url.ends_with("/quarterly%20report.bin"), "{url}");
    println!("20 MB upload through slixmpp: {:.3} s", v["upload_s"]);

    // Alice, a member, sees the link and downloads the same bytes.
    let posted = alice
        .recv_until(Duration::from_secs(10), |m| {
            m.body().is_some_and(|b| b == url)
        })
        .await?;
    assert!(posted.to_xml().contains("jabber:x:oob"), "{posted}");
    let got = fetch(&s, &url, Some(("alice@localhost", "alice-pw")), &[])?;
    assert_eq!(status(&got), 200, "{got}");
    assert_eq!(got["length"], serde_json::json!(size));
    assert_eq!(got["sha256"].as_str(), Some(sha.as_str()));
    assert_eq!(got["headers"]["content-type"], "application/octet-stream");
    assert_eq!(got["headers"]["x-content-type-options"], "nosniff");
    assert!(got["headers"]["content-disposition"]
        .as_str()
        .is_some_and(|d| d.starts_with("attachment;")));
    println!("20 MB download (alice, Basic): {:.3} s", got["seconds"]);
    // Streamed both ways: the server's peak memory grows by far less than the file.
    let grown = peak_rss_kib(&s).saturating_sub(peak_before);
    println!("server peak RSS grew by {grown} KiB over the 20 MB upload and download");
    assert!(
        grown < 16 * 1024,
        "peak RSS grew by {grown} KiB (a 20 MB file held whole would be more)"
    );

    // Nobody else: no credentials (401 with a challenge), a wrong password, a user who is
    // not a member (403). Each is refused before any byte of the file.
    let anonymous = fetch(&s, &url, None, &[])?;
    assert_eq!(status(&anonymous), 401, "{anonymous}");
    assert!(anonymous["headers"]["www-authenticate"]
        .as_str()
        .is_some_and(|h| h.starts_with("Basic")));
    let wrong = fetch(&s, &url, Some(("alice@localhost", "nope")), &[])?;
    assert_eq!(status(&wrong), 401, "{wrong}");
    let eve = fetch(&s, &url, Some(("eve@localhost", "eve-pw")), &[])?;
    assert_eq!(status(&eve), 403, "{eve}");
    assert_eq!(
        eve["length"].as_u64(),
        eve["text"].as_str().map(|t| t.len() as u64)
    );

    // On the compliance record: the upload by sli (with the hash) and alice's download only.
    let kinds = compliance_kinds(&s).await?;
    let uploads: Vec<_> = kinds.iter().filter(|k| k.0 == "file_upload").collect();
    assert_eq!(uploads.len(), 1, "{kinds:?}");
    assert_eq!(uploads[0].1, "sli@localhost");
    assert!(uploads[0].2.contains(&sha), "{}", uploads[0].2);
    let downloads: Vec<_> = kinds.iter().filter(|k| k.0 == "file_download").collect();
    assert_eq!(downloads.len(), 1, "{kinds:?}");
    assert_eq!(downloads[0].1, "alice@localhost");

    // The shell lists it in the room and removes it; its link is gone.
    let out = s
        .run_cli_ok(["--json", "file", "list", "--room", &room("deals")])
        .await?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["owner"], "sli@localhost");
    assert_eq!(listed[0]["size"], serde_json::json!(size));
    let id = listed[0]["id"].as_str().unwrap_or_default().to_owned();
    s.run_cli_ok(["file", "remove", &id]).await?;
    let gone = fetch(&s, &url, Some(("alice@localhost", "alice-pw")), &[])?;
    assert_eq!(status(&gone), 404, "{gone}");
    assert!(compliance_kinds(&s)
        .await?
        .iter()
        .any(|k| k.0 == "file_removed" && k.2.contains(&id)));
    let out = s.run_cli(["file", "remove", &id]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pchat file list"));
    Ok(())
}

#[tokio::test]
async fn what_must_be_refused_is_refused_and_changes_nothing() -> R {
    have_python_clients();
    // A 1 MiB quota per user, to reach it with small files.
    let (s, _dir) = server_with(Some("[upload]\nuser_quota_mb = 1\n")).await?;
    let mut bob = login(&s, "bob").await?;

    // Not in any room yet: files are for rooms.
    let reply = request_slot(&mut bob, "a.txt", 10, "text/plain").await?;
    assert_eq!(error_condition(&reply), "not-allowed", "{reply}");

    create_room(&mut bob, "open", &[]).await?;
    // Too large: the limit in the form XEP-0363 gives.
    let reply = request_slot(&mut bob, "big.iso", 30_000_000, "application/octet-stream").await?;
    assert_eq!(error_condition(&reply), "not-acceptable", "{reply}");
    let max = reply
        .child("error", ns::CLIENT)
        .and_then(|e| e.child("file-too-large", HTTP_UPLOAD))
        .and_then(|f| f.child_text("max-file-size", HTTP_UPLOAD));
    assert_eq!(max.as_deref(), Some("20480000"), "{reply}");
    // No name, no size, a bad type: bad-request, with what to fix.
    for (name, size, ty) in [
        ("", 10, "text/plain"),
        ("x", 0, "text/plain"),
        ("x", 10, "text/html; x=1"),
    ] {
        let reply = request_slot(&mut bob, name, size, ty).await?;
        assert_eq!(error_condition(&reply), "bad-request", "{reply}");
    }

    // A good slot, and the PUTs that must fail on it before the one that works.
    let work = tempfile::tempdir()?;
    let body = work.path().join("notes.txt");
    std::fs::write(&body, b"minutes of the meeting\n")?;
    let reply = request_slot(&mut bob, "../../notes.txt", 23, "text/plain").await?;
    let (put, get) = slot_urls(&reply);
    assert!(
        get.ends_with("/notes.txt"),
        "the name is its last component: {get}"
    );
    let body_arg = body.to_str().unwrap_or_default();
    let forged_token = {
        // The token is the segment before the name.
        let parts: Vec<&str> = put.rsplitn(3, '/').collect();
        put.replace(parts[1], &"0".repeat(64))
    };
    let r = put_body(
        &s,
        &forged_token,
        body_arg,
        &["--content-type", "text/plain"],
    )?;
    assert_eq!(status(&r), 403, "{r}");
    let r = put_body(
        &s,
        &put,
        body_arg,
        &["--length", "22", "--content-type", "text/plain"],
    )?;
    assert_eq!(status(&r), 400, "{r}");
    let r = put_body(&s, &put, body_arg, &["--content-type", "image/png"])?;
    assert_eq!(status(&r), 400, "{r}");
    // Not uploaded yet: nothing to download.
    assert_eq!(status(&fetch(&s, &get, None, &[])?), 404);
    let r = put_body(&s, &put, body_arg, &["--content-type", "text/plain"])?;
    assert_eq!(status(&r), 201, "{r}");
    let r = put_body(&s, &put, body_arg, &["--content-type", "text/plain"])?;
    assert_eq!(status(&r), 409, "uploaded once only: {r}");
    // Not posted in a room yet: whoever holds the link (a capability URL).
    let r = fetch(&s, &get, None, &[])?;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(r["text"], "minutes of the meeting\n");
    assert_eq!(r["headers"]["content-type"], "text/plain");
    assert!(r["headers"]["content-security-policy"]
        .as_str()
        .is_some_and(|c| c.contains("sandbox")));
    // Posted in an open room of an open category: still served to whoever holds the link,
    // and the upload is on record.
    let posted = bob
        .send_groupchat(&room("open"), &format!("see {get}"), None)
        .await?;
    assert_eq!(status(&fetch(&s, &get, None, &[])?), 200);
    let kinds = compliance_kinds(&s).await?;
    assert_eq!(
        kinds.iter().filter(|k| k.0 == "file_upload").count(),
        1,
        "{kinds:?}"
    );
    // Removing the message removes its file (on record with the removal).
    let seq = pchat_testkit::stanza_id(&posted, &room("open")).unwrap_or_default();
    s.run_cli_ok(["message", "remove", "open", &seq]).await?;
    assert_eq!(status(&fetch(&s, &get, None, &[])?), 404);
    let kinds = compliance_kinds(&s).await?;
    assert!(
        kinds
            .iter()
            .any(|k| k.0 == "file_removed" && k.2.contains(&format!("with message {seq}"))),
        "{kinds:?}"
    );

    // A moderator's removal (XEP-0425) takes the file too.
    let get2 = uploaded(&s, &mut bob, "agenda.txt", 23, "text/plain", body_arg).await?;
    let posted = bob
        .send_groupchat(&room("open"), &format!("agenda: {get2}"), None)
        .await?;
    let seq = pchat_testkit::stanza_id(&posted, &room("open")).unwrap_or_default();
    let moderate = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room("open"))
        .with_child(
            Element::new("moderate", "urn:xmpp:message-moderate:1")
                .with_attr("id", seq.as_str())
                .with_child(Element::new("retract", "urn:xmpp:message-retract:1")),
        );
    bob.iq_result(moderate, Duration::from_secs(10)).await?;
    assert_eq!(status(&fetch(&s, &get2, None, &[])?), 404);

    // The quota: 1 MiB per user, counting granted slots.
    let reply = request_slot(&mut bob, "half.bin", 600_000, "application/octet-stream").await?;
    assert!(reply.child("slot", HTTP_UPLOAD).is_some(), "{reply}");
    let reply = request_slot(&mut bob, "more.bin", 600_000, "application/octet-stream").await?;
    assert_eq!(error_condition(&reply), "resource-constraint", "{reply}");

    // A category without files: its rooms refuse a message linking to one.
    s.run_cli_ok([
        "category",
        "new",
        "nofiles",
        "--add-allowed",
        "*",
        "--add-creator",
        "*",
    ])
    .await?;
    s.run_cli_ok(["category", "set", "nofiles", "--file-upload", "off"])
        .await?;
    s.run_cli_ok([
        "room",
        "new",
        "plain",
        "--category",
        "nofiles",
        "--manager",
        "bob@localhost",
    ])
    .await?;
    bob.join_room(&room("plain"), "bob", None).await?;
    let get3 = uploaded(&s, &mut bob, "memo.txt", 23, "text/plain", body_arg).await?;
    let refused = bob
        .send_groupchat(&room("plain"), &format!("here: {get3}"), None)
        .await
        .expect_err("a link to a file in a room without files");
    assert!(refused.to_string().contains("not-allowed"), "{refused}");
    // A link of the same shape that names no file here (removed, or another server's) is
    // only text, as is an ordinary message.
    bob.send_groupchat(&room("plain"), &format!("was: {get}"), None)
        .await?;
    bob.send_groupchat(&room("plain"), "no files here", None)
        .await?;
    Ok(())
}

/// Links expire into a sign-in: after `link_ttl_s`, an open room's file needs a user who may
/// read the room, and a file never posted needs its owner.
#[tokio::test]
async fn links_alone_expire_and_then_ask_for_a_sign_in() -> R {
    have_python_clients();
    let (s, _dir) = server_with(Some("[upload]\nlink_ttl_s = 3\n")).await?;
    let mut bob = login(&s, "bob").await?;
    create_room(&mut bob, "lobby", &[]).await?;
    let work = tempfile::tempdir()?;
    let body = work.path().join("note.txt");
    std::fs::write(&body, b"a note\n")?;
    let body_arg = body.to_str().unwrap_or_default();
    let mut urls = Vec::new();
    for name in ["posted.txt", "kept.txt"] {
        urls.push(uploaded(&s, &mut bob, name, 7, "text/plain", body_arg).await?);
    }
    let (posted, kept) = (urls[0].clone(), urls[1].clone());
    bob.send_groupchat(&room("lobby"), &posted, None).await?;
    // Young links work alone.
    assert_eq!(status(&fetch(&s, &posted, None, &[])?), 200);
    assert_eq!(status(&fetch(&s, &kept, None, &[])?), 200);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Old ones ask who reads: anyone who may read the open room; the owner for the other.
    assert_eq!(status(&fetch(&s, &posted, None, &[])?), 401);
    let eve = fetch(&s, &posted, Some(("eve@localhost", "eve-pw")), &[])?;
    assert_eq!(status(&eve), 200, "{eve}");
    assert_eq!(status(&fetch(&s, &kept, None, &[])?), 401);
    let eve = fetch(&s, &kept, Some(("eve", "eve-pw")), &[])?;
    assert_eq!(status(&eve), 403, "{eve}");
    let bob_get = fetch(&s, &kept, Some(("bob", "bob-pw")), &[])?;
    assert_eq!(
        status(&bob_get),
        200,
        "a user name without its domain: {bob_get}"
    );
    Ok(())
}

/// A room's files are bounded (`room_quota_mb`): a message whose file would pass the room's
/// quota is refused, and the file stays unposted.
#[tokio::test]
async fn a_room_full_of_files_refuses_another() -> R {
    have_python_clients();
    let (s, _dir) = server_with(Some("[upload]\nroom_quota_mb = 1\n")).await?;
    let mut bob = login(&s, "bob").await?;
    create_room(&mut bob, "busy", &[]).await?;
    let mut alice = login(&s, "alice").await?;
    alice.join_room(&room("busy"), "alice", None).await?;
    let work = tempfile::tempdir()?;
    let body = work.path().join("big.bin");
    std::fs::write(&body, vec![7u8; 600_000])?;
    let body_arg = body.to_str().unwrap_or_default();
    let mut links = Vec::new();
    for c in [&mut bob, &mut alice] {
        let octets = "application/octet-stream";
        links.push(uploaded(&s, c, "big.bin", 600_000, octets, body_arg).await?);
    }
    bob.send_groupchat(&room("busy"), &links[0], None).await?;
    let refused = alice
        .send_groupchat(&room("busy"), &links[1], None)
        .await
        .expect_err("a second 600 kB file in a room of 1 MiB");
    assert!(refused.to_string().contains("quota"), "{refused}");
    let out = s
        .run_cli_ok(["--json", "file", "list", "--room", &room("busy")])
        .await?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    Ok(())
}
