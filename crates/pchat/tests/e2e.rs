//! End-to-end tests: the real `pchat` binary on free loopback ports, driven by the testkit's
//! independent XMPP client over STARTTLS, direct TLS and WebSocket.

use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{
    ns, stanza_id, status_codes, Client, ConnectOptions, Element, Error, History, Mechanism, Rsm,
    ServerOptions, Stage, TestServer, Transport,
};

type R = anyhow::Result<()>;

const ROOMS: &str = "conference.localhost";
const T: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(400);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

async fn server() -> anyhow::Result<TestServer> {
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
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

fn room(name: &str) -> String {
    format!("{name}@{ROOMS}")
}

/// Creates an instant room owned by `c` (XEP-0045 §10.1.2).
async fn create_instant(c: &mut Client, name: &str, nick: &str) -> anyhow::Result<()> {
    let joined = c.join_room(&room(name), nick, None).await?;
    assert!(
        joined.self_status_codes().contains(&201),
        "new room says 201: {:?}",
        joined.self_status_codes()
    );
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room(name))
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    c.iq_result(submit, T).await?;
    Ok(())
}

/// Submits owner config fields for a room.
async fn configure(c: &mut Client, name: &str, fields: &[(&str, &str)]) -> anyhow::Result<()> {
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
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room(name))
        .with_child(Element::new("query", ns::MUC_OWNER).with_child(x));
    c.iq_result(iq, T).await?;
    Ok(())
}

fn stanza_condition(e: &Error) -> Option<&str> {
    match e {
        Error::Stanza { error, .. } => Some(error.condition.as_str()),
        _ => None,
    }
}

#[tokio::test]
async fn login_over_every_transport_and_mechanism() -> R {
    let s = server().await?;
    let cases = [
        (
            Transport::StartTls { addr: s.c2s_addr() },
            Mechanism::ScramSha256,
        ),
        (
            Transport::StartTls { addr: s.c2s_addr() },
            Mechanism::ScramSha1,
        ),
        (Transport::StartTls { addr: s.c2s_addr() }, Mechanism::Plain),
        (
            Transport::DirectTls { addr: s.tls_addr() },
            Mechanism::ScramSha256,
        ),
        (
            Transport::WebSocket { url: s.ws_url() },
            Mechanism::ScramSha256,
        ),
    ];
    for (transport, mech) in cases {
        let mut c = s
            .client_with(transport.clone(), mech, "alice@localhost", "alice-pw")
            .await?;
        assert!(
            c.jid().starts_with("alice@localhost/"),
            "{transport:?} {mech:?}: {}",
            c.jid()
        );
        c.ping("localhost").await?;
        let roster = c
            .iq_result(
                Element::new("iq", ns::CLIENT)
                    .with_attr("type", "get")
                    .with_child(Element::new("query", "jabber:iq:roster")),
                T,
            )
            .await?;
        assert!(roster.has_child("query", "jabber:iq:roster"));
        c.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn wrong_password_and_cleartext_are_refused() -> R {
    let s = server().await?;
    for mech in [
        Mechanism::ScramSha256,
        Mechanism::ScramSha1,
        Mechanism::Plain,
    ] {
        let err = s
            .client_with(
                Transport::StartTls { addr: s.c2s_addr() },
                mech,
                "alice@localhost",
                "wrong",
            )
            .await
            .expect_err("wrong password must fail");
        let text = format!("{err:?}");
        assert!(text.contains("not-authorized"), "{mech:?}: {text}");
    }
    // Unknown users fail exactly like wrong passwords.
    let err = s
        .client("mallory@localhost", "x")
        .await
        .expect_err("unknown user");
    assert!(format!("{err:?}").contains("not-authorized"));
    // Without TLS the server offers nothing but STARTTLS.
    let mut opts = ConnectOptions::new(
        Transport::PlainTcp { addr: s.c2s_addr() },
        "alice@localhost",
        "alice-pw",
    );
    opts.stop_after = Stage::Bound;
    let err = Client::connect(opts)
        .await
        .expect_err("no auth in the clear");
    assert!(
        matches!(
            err,
            Error::MechanismNotOffered { .. } | Error::StartTls(_) | Error::Stream { .. }
        ),
        "{err:?}"
    );
    // (PLAIN over cleartext WebSocket: `http_tls_false_serves_plain_websocket`.)
    // The right password still works afterwards.
    login(&s, "alice").await?;
    Ok(())
}

/// The salt and iteration count of the server's first SCRAM-SHA-256 challenge for `user`
/// (who need not exist), over STARTTLS.
async fn scram_salt(s: &TestServer, user: &str) -> anyhow::Result<(Vec<u8>, String)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut opts = s.connect_options(&format!("{user}@localhost"), "unused");
    opts.stop_after = Stage::Features;
    let mut c = Client::connect(opts).await?;
    let first = format!("n,,n={user},r=e2e-nonce");
    c.send(
        &Element::new("auth", ns::SASL)
            .with_attr("mechanism", "SCRAM-SHA-256")
            .with_text(b64.encode(first)),
    )
    .await?;
    let challenge = c.recv(T).await?;
    anyhow::ensure!(
        challenge.is("challenge", ns::SASL),
        "{}",
        challenge.to_xml()
    );
    let server_first = String::from_utf8(b64.decode(challenge.text().trim())?)?;
    let field = |k: &str| {
        server_first
            .split(',')
            .find_map(|p| p.strip_prefix(k))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no {k} in {server_first}"))
    };
    Ok((b64.decode(field("s=")?)?, field("i=")?))
}

/// Account enumeration: an unknown user's SCRAM salt is the same at every try and after a
/// restart (a changing salt would give it away), cannot be computed from the name (the old
/// SHA-256 of the name could, so anyone could tell unknown users apart), and has the
/// length and iteration count of a real user's. PLAIN costs an unknown user the same
/// PBKDF2 as a known one (counted in `pchat_xmpp::scram`'s tests; timed here for the record,
/// not asserted).
#[tokio::test]
async fn unknown_users_look_like_real_ones() -> R {
    use sha2::Digest as _;
    let mut s = server().await?;
    let (salt, iterations) = scram_salt(&s, "mallory").await?;
    assert_eq!(
        scram_salt(&s, "mallory").await?,
        (salt.clone(), iterations.clone()),
        "stable across connections"
    );
    assert_eq!(
        scram_salt(&s, "Mallory").await?.0,
        salt,
        "the same account name, the same salt, as for a real account"
    );
    assert_ne!(
        salt,
        sha2::Sha256::digest(b"mallory")[..16].to_vec(),
        "not the name's hash anyone can compute"
    );
    assert_ne!(scram_salt(&s, "trudy").await?.0, salt);
    let (real_salt, real_iterations) = scram_salt(&s, "alice").await?;
    assert_eq!(salt.len(), real_salt.len(), "salt length of a real user");
    assert_eq!(iterations, real_iterations, "iterations of a real user");
    s.restart().await?;
    assert_eq!(
        scram_salt(&s, "mallory").await?.0,
        salt,
        "the server secret survives a restart"
    );
    assert_eq!(scram_salt(&s, "alice").await?.0, real_salt);

    // PLAIN, timed: a known user with a wrong password against an unknown user. Few tries,
    // to stay under the login throttle (auth_failures_max per account and address).
    let mut timings = Vec::new();
    for user in ["alice", "mallory", "bob", "trudy"] {
        let started = std::time::Instant::now();
        let err = s
            .client_with(
                Transport::StartTls { addr: s.c2s_addr() },
                Mechanism::Plain,
                &format!("{user}@localhost"),
                "wrong",
            )
            .await
            .expect_err("wrong password or unknown user");
        assert!(
            format!("{err:?}").contains("not-authorized"),
            "{user}: {err:?}"
        );
        timings.push((user, started.elapsed()));
    }
    eprintln!("PLAIN login refused in: {timings:?}");
    Ok(())
}

/// The plain HTTP request a browser sends to open a WebSocket (RFC 6455 §1.3's sample key).
const WS_UPGRADE_REQUEST: &[u8] = b"GET /xmpp-websocket HTTP/1.1\r\nHost: localhost\r\n\
    Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n";

/// Sends [`WS_UPGRADE_REQUEST`] in the clear and returns what came back before the server
/// closed the connection (or after `QUIET`, when it keeps it open).
async fn plain_upgrade_reply(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.write_all(WS_UPGRADE_REQUEST).await?;
    let mut reply = Vec::new();
    // A reset instead of a clean close is also a refusal; what was read still counts.
    let _ = tokio::time::timeout(T, tcp.read_to_end(&mut reply)).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// The ready line's WebSocket endpoint, from the server's stdout.
fn ready_ws_endpoint(s: &TestServer) -> anyhow::Result<String> {
    let out = std::fs::read_to_string(s.data_dir().join("pchat-test-stdout.log"))?;
    let line = out
        .lines()
        .find(|l| l.contains("/xmpp-websocket"))
        .ok_or_else(|| anyhow::anyhow!("no WebSocket endpoint in the ready output:\n{out}"))?;
    let url = line
        .split_whitespace()
        .find(|w| w.ends_with("/xmpp-websocket"))
        .unwrap_or_default();
    Ok(url.to_string())
}

/// By default the WebSocket port is TLS only: a plain `ws://` upgrade gets no `101` (nor any
/// HTTP answer), `wss://` carries whole sessions (login, room, message; PLAIN is offered since
/// the hop is encrypted), `/health` answers over https with ALPN `http/1.1`, and a client
/// that connects and never starts its handshake does not hold up anyone else.
#[tokio::test]
async fn websocket_is_wss_by_default() -> R {
    let s = server().await?;
    let port = s.ports().http;
    let wss = format!("wss://127.0.0.1:{port}/xmpp-websocket");
    assert_eq!(s.ws_url(), wss);
    assert_eq!(ready_ws_endpoint(&s)?, wss, "the ready line names wss://");
    // Silent for the whole test: its handshake would wait for auth_timeout_s (30 s).
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;

    let reply = plain_upgrade_reply(port).await?;
    assert!(
        !reply.contains("HTTP/"),
        "a cleartext upgrade must get no HTTP answer, got {reply:?}"
    );
    let plain = ConnectOptions::new(
        Transport::WebSocket {
            url: format!("ws://127.0.0.1:{port}/xmpp-websocket"),
        },
        "alice@localhost",
        "alice-pw",
    );
    let err = Client::connect(plain)
        .await
        .expect_err("ws:// must not reach XMPP");
    assert!(matches!(err, Error::WebSocket(_) | Error::Io(_)), "{err:?}");

    let health = tokio::time::timeout(
        T,
        pchat_testkit::https_get(([127, 0, 0, 1], port).into(), "localhost", "/health"),
    )
    .await??;
    assert_eq!(health.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(
        health.response.starts_with("HTTP/1.1 200") && health.response.ends_with("\r\n\r\nok\n"),
        "{:?}",
        health.response
    );

    let ws = Transport::WebSocket { url: wss };
    let mut alice = s
        .client_with(
            ws.clone(),
            Mechanism::ScramSha256,
            "alice@localhost",
            "alice-pw",
        )
        .await?;
    create_instant(&mut alice, "sealed", "alice").await?;
    let mut bob = s
        .client_with(ws, Mechanism::Plain, "bob@localhost", "bob-pw")
        .await?;
    bob.join_room(&room("sealed"), "bob", None).await?;
    let ack = bob
        .send_groupchat(&room("sealed"), "over wss", None)
        .await?;
    let got = alice
        .recv_until(T, |st| st.body().as_deref() == Some("over wss"))
        .await?;
    assert_eq!(got.attr("from"), Some(&*format!("{}/bob", room("sealed"))));
    assert_eq!(
        stanza_id(&got, &room("sealed")),
        stanza_id(&ack, &room("sealed"))
    );
    alice.close().await?;
    bob.close().await?;
    Ok(())
}

/// `http_tls = false` (behind a TLS-terminating proxy) serves plain `ws://` and no TLS, and
/// treats the hop as cleartext: SCRAM works, PLAIN is not offered.
#[tokio::test]
async fn http_tls_false_serves_plain_websocket() -> R {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("pchat.toml"),
        "# A reverse proxy terminates TLS in front of the HTTP port.\nhttp_tls = false\n",
    )?;
    let opts = ServerOptions {
        data_dir: Some(dir.path().to_owned()),
        ..ServerOptions::default()
    };
    let s = TestServer::start(&bin(), opts).await?;
    for u in ["alice", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    let port = s.ports().http;
    let url = format!("ws://127.0.0.1:{port}/xmpp-websocket");
    assert_eq!(ready_ws_endpoint(&s)?, url, "the ready line names ws://");
    let reply = plain_upgrade_reply(port).await?;
    assert!(reply.starts_with("HTTP/1.1 101 "), "{reply:?}");

    let ws = Transport::WebSocket { url };
    let no_plain = ConnectOptions {
        mechanism: Mechanism::Plain,
        ..ConnectOptions::new(ws.clone(), "alice@localhost", "alice-pw")
    };
    assert!(matches!(
        Client::connect(no_plain).await,
        Err(Error::MechanismNotOffered { .. })
    ));
    let mut alice = s
        .client_with(
            ws.clone(),
            Mechanism::ScramSha256,
            "alice@localhost",
            "alice-pw",
        )
        .await?;
    create_instant(&mut alice, "proxied", "alice").await?;
    let mut bob = s
        .client_with(ws, Mechanism::ScramSha1, "bob@localhost", "bob-pw")
        .await?;
    bob.join_room(&room("proxied"), "bob", None).await?;
    bob.send_groupchat(&room("proxied"), "over ws", None)
        .await?;
    alice
        .recv_until(T, |st| st.body().as_deref() == Some("over ws"))
        .await?;

    let tls = ConnectOptions::new(
        Transport::WebSocket {
            url: format!("wss://127.0.0.1:{port}/xmpp-websocket"),
        },
        "alice@localhost",
        "alice-pw",
    );
    let err = Client::connect(tls).await.expect_err("no TLS on the port");
    assert!(matches!(err, Error::Tls(_) | Error::Io(_)), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn login_failures_are_rate_limited() -> R {
    let s = server().await?;
    let mut last = String::new();
    for _ in 0..7 {
        let err = s
            .client("bob@localhost", "guess")
            .await
            .expect_err("wrong password");
        last = format!("{err:?}");
    }
    assert!(
        last.contains("temporary-auth-failure"),
        "after many failures: {last}"
    );
    Ok(())
}

/// Alice over STARTTLS, Bob over WebSocket, Carol over direct TLS share one room.
#[tokio::test]
async fn room_create_join_message_history_leave() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "ops", "alice").await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let ack = alice
            .send_groupchat(&room("ops"), &format!("m{i}"), None)
            .await?;
        let id = stanza_id(&ack, &room("ops")).expect("reflection carries a stanza-id");
        ids.push(id.parse::<i64>()?);
    }
    assert_eq!(ids, [1, 2, 3, 4, 5], "stanza-ids increase per room from 1");

    let mut bob = login(&s, "bob").await?;
    let joined = bob
        .join_room(
            &room("ops"),
            "bob",
            Some(History {
                max_stanzas: Some(3),
                ..History::default()
            }),
        )
        .await?;
    assert_eq!(joined.history_bodies(), ["m2", "m3", "m4"]);
    assert!(joined
        .presences
        .iter()
        .any(|p| p.attr("from") == Some(&*format!("{}/alice", room("ops")))));
    // Alice sees Bob arrive.
    let p = alice
        .recv_until(T, |s| {
            s.is("presence", ns::CLIENT) && s.attr("from").is_some_and(|f| f.ends_with("/bob"))
        })
        .await?;
    assert_eq!(p.attr("type"), None);

    // Bob's message reaches Alice with the same stanza-id Bob got.
    let ack = bob
        .send_groupchat(&room("ops"), "hello alice", None)
        .await?;
    let got = alice
        .recv_until(T, |s| s.body().as_deref() == Some("hello alice"))
        .await?;
    assert_eq!(stanza_id(&got, &room("ops")), stanza_id(&ack, &room("ops")));
    assert_eq!(got.attr("from"), Some(&*format!("{}/bob", room("ops"))));

    // Default history on join is 30 messages, served from the archive.
    let tls = Transport::DirectTls { addr: s.tls_addr() };
    let mut carol = s
        .client_with(tls, Mechanism::ScramSha1, "carol@localhost", "carol-pw")
        .await?;
    let joined = carol.join_room(&room("ops"), "carol", None).await?;
    assert_eq!(joined.history.len(), 6);

    let left = bob.leave_room(&room("ops"), "bob").await?;
    assert!(status_codes(&left).contains(&110));
    let gone = alice
        .recv_until(T, |s| {
            s.is("presence", ns::CLIENT) && s.attr("type") == Some("unavailable")
        })
        .await?;
    assert!(gone.attr("from").is_some_and(|f| f.ends_with("/bob")));
    Ok(())
}

#[tokio::test]
async fn resent_origin_id_is_stored_once() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "dedupe", "alice").await?;
    let a = alice
        .send_groupchat(&room("dedupe"), "once", Some("retry-1"))
        .await?;
    let b = alice
        .send_groupchat(&room("dedupe"), "once", Some("retry-1"))
        .await?;
    assert_eq!(
        stanza_id(&a, &room("dedupe")),
        stanza_id(&b, &room("dedupe")),
        "the resend is answered with the original id"
    );
    let page = alice.mam_query(&room("dedupe"), &[], None).await?;
    assert_eq!(page.bodies(), ["once"]);
    Ok(())
}

#[tokio::test]
async fn rooms_and_history_survive_restart() -> R {
    let mut s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "keep", "alice").await?;
    configure(
        &mut alice,
        "keep",
        &[
            ("muc#roomconfig_roomname", "Kept room"),
            ("muc#roomconfig_membersonly", "1"),
        ],
    )
    .await?;
    for i in 0..3 {
        alice
            .send_groupchat(&room("keep"), &format!("before-{i}"), None)
            .await?;
    }
    drop(alice);
    s.restart().await?;
    let mut alice = login(&s, "alice").await?;
    let joined = alice.join_room(&room("keep"), "alice", None).await?;
    assert_eq!(
        joined.history_bodies(),
        ["before-0", "before-1", "before-2"]
    );
    assert!(
        !joined.self_status_codes().contains(&201),
        "the room exists: not created again"
    );
    let info = alice.disco_info(&room("keep")).await?;
    assert!(
        info.has_feature("muc_membersonly"),
        "configuration persisted"
    );
    let ack = alice.send_groupchat(&room("keep"), "after", None).await?;
    assert_eq!(
        stanza_id(&ack, &room("keep")).as_deref(),
        Some("4"),
        "sequence continues after restart"
    );
    // Members-only persisted too: bob (not a member) cannot join.
    let mut bob = login(&s, "bob").await?;
    let err = bob
        .join_room(&room("keep"), "bob", None)
        .await
        .expect_err("members-only");
    assert_eq!(stanza_condition(&err), Some("registration-required"));
    Ok(())
}

#[tokio::test]
async fn mam_paging_and_fulltext_search() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "archive", "alice").await?;
    for i in 1..=25 {
        let body = if i % 5 == 0 {
            format!("disk full on host{i}")
        } else {
            format!("routine message {i}")
        };
        alice.send_groupchat(&room("archive"), &body, None).await?;
    }
    // Latest page, then walk backwards to the start.
    let last = alice
        .mam_query(
            &room("archive"),
            &[],
            Some(Rsm {
                max: Some(10),
                before: Some(String::new()),
                after: None,
            }),
        )
        .await?;
    assert_eq!(
        last.ids(),
        (16..=25).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    assert!(!last.complete());
    let mid = alice
        .mam_query(
            &room("archive"),
            &[],
            Some(Rsm {
                max: Some(10),
                before: last.first(),
                after: None,
            }),
        )
        .await?;
    assert_eq!(
        mid.ids(),
        (6..=15).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    let first = alice
        .mam_query(
            &room("archive"),
            &[],
            Some(Rsm {
                max: Some(10),
                before: mid.first(),
                after: None,
            }),
        )
        .await?;
    assert_eq!(
        first.ids(),
        (1..=5).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    assert!(first.complete());
    // Forwards from the start.
    let fwd = alice
        .mam_query(
            &room("archive"),
            &[],
            Some(Rsm {
                max: Some(20),
                before: None,
                after: Some("20".into()),
            }),
        )
        .await?;
    assert_eq!(fwd.ids(), ["21", "22", "23", "24", "25"]);
    assert!(fwd.complete());
    // Paging from an id the archive does not hold is `item-not-found` (XEP-0313 §4.3.1),
    // never a silent page of whatever lies beyond it: the client must resynchronise.
    for (after, before) in [(Some("26"), None), (None, Some("99")), (Some("0"), None)] {
        let err = alice
            .mam_query(
                &room("archive"),
                &[],
                Some(Rsm {
                    max: Some(10),
                    before: before.map(str::to_string),
                    after: after.map(str::to_string),
                }),
            )
            .await
            .expect_err("an unknown id");
        assert_eq!(
            stanza_condition(&err),
            Some("item-not-found"),
            "after {after:?} before {before:?}: {err:?}"
        );
    }
    // Full-text search.
    let hits = alice
        .mam_query(
            &room("archive"),
            &[("{urn:xmpp:fulltext:0}fulltext", "disk full")],
            None,
        )
        .await?;
    assert_eq!(hits.bodies().len(), 5);
    assert!(hits.bodies().iter().all(|b| b.contains("disk full")));
    let none = alice
        .mam_query(
            &room("archive"),
            &[("{urn:xmpp:fulltext:0}fulltext", "nonexistentword")],
            None,
        )
        .await?;
    assert!(none.bodies().is_empty());
    // Archived messages carry their time.
    assert!(pchat_testkit::delay_stamp(&hits.results[0]).is_some());
    Ok(())
}

#[tokio::test]
async fn members_only_and_hidden_rooms_do_not_leak() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "secret", "alice").await?;
    configure(
        &mut alice,
        "secret",
        &[
            ("muc#roomconfig_publicroom", "0"),
            ("muc#roomconfig_membersonly", "1"),
        ],
    )
    .await?;
    alice
        .send_groupchat(&room("secret"), "the plan", None)
        .await?;
    create_instant(&mut alice, "lobby", "alice").await?;

    let mut bob = login(&s, "bob").await?;
    let items = bob.disco_items(ROOMS).await?;
    let jids: Vec<&str> = items.iter().map(|i| i.jid.as_str()).collect();
    assert!(
        jids.contains(&room("lobby").as_str()),
        "public rooms are listed: {jids:?}"
    );
    assert!(
        !jids.contains(&room("secret").as_str()),
        "secret rooms are not: {jids:?}"
    );
    // A secret room answers a stranger as if it did not exist.
    let err = bob
        .join_room(&room("secret"), "bob", None)
        .await
        .expect_err("not a member");
    assert_eq!(stanza_condition(&err), Some("item-not-found"));
    let err = bob
        .mam_query(&room("secret"), &[], None)
        .await
        .expect_err("history of a members-only room");
    assert!(
        matches!(stanza_condition(&err), Some("forbidden" | "item-not-found")),
        "{err:?}"
    );
    // The owner makes bob a member: now he sees it, joins, and reads the history.
    let grant = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room("secret"))
        .with_child(
            Element::new("query", ns::MUC_ADMIN).with_child(
                Element::new("item", ns::MUC_ADMIN)
                    .with_attr("jid", "bob@localhost")
                    .with_attr("affiliation", "member"),
            ),
        );
    alice.iq_result(grant, T).await?;
    let items = bob.disco_items(ROOMS).await?;
    assert!(items.iter().any(|i| i.jid == room("secret")));
    let joined = bob.join_room(&room("secret"), "bob", None).await?;
    assert_eq!(joined.history_bodies(), ["the plan"]);
    Ok(())
}

#[tokio::test]
async fn password_rooms_kick_and_ban() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "guarded", "alice").await?;
    configure(
        &mut alice,
        "guarded",
        &[
            ("muc#roomconfig_passwordprotectedroom", "1"),
            ("muc#roomconfig_roomsecret", "sesame"),
        ],
    )
    .await?;
    let mut bob = login(&s, "bob").await?;
    let err = bob
        .join_room(&room("guarded"), "bob", None)
        .await
        .expect_err("password required");
    assert_eq!(stanza_condition(&err), Some("not-authorized"));
    // Join with the password (raw presence, as the helper does not send one).
    let join = Element::new("presence", ns::CLIENT)
        .with_attr("to", format!("{}/bob", room("guarded")))
        .with_child(
            Element::new("x", ns::MUC)
                .with_child(Element::new("password", ns::MUC).with_text("sesame")),
        );
    bob.send(&join).await?;
    bob.recv_until(T, |p| {
        p.is("presence", ns::CLIENT) && status_codes(p).contains(&110)
    })
    .await?;
    // Kick: bob gets 307 and is out.
    let kick = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room("guarded"))
        .with_child(
            Element::new("query", ns::MUC_ADMIN).with_child(
                Element::new("item", ns::MUC_ADMIN)
                    .with_attr("nick", "bob")
                    .with_attr("role", "none"),
            ),
        );
    alice.iq_result(kick, T).await?;
    let out = bob
        .recv_until(T, |p| {
            p.is("presence", ns::CLIENT) && p.attr("type") == Some("unavailable")
        })
        .await?;
    assert!(
        status_codes(&out).contains(&307),
        "kicked: {:?}",
        out.to_xml()
    );
    // Ban: bob can no longer join even with the password.
    let ban = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room("guarded"))
        .with_child(
            Element::new("query", ns::MUC_ADMIN).with_child(
                Element::new("item", ns::MUC_ADMIN)
                    .with_attr("jid", "bob@localhost")
                    .with_attr("affiliation", "outcast"),
            ),
        );
    alice.iq_result(ban, T).await?;
    bob.send(&join).await?;
    let refused = bob
        .recv_until(T, |p| {
            p.is("presence", ns::CLIENT) && p.attr("type") == Some("error")
        })
        .await?;
    assert!(
        refused.to_xml().contains("forbidden"),
        "{}",
        refused.to_xml()
    );
    // A message to a room bob is not in is refused.
    bob.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", room("guarded"))
            .with_attr("type", "groupchat")
            .with_attr("id", "x1")
            .with_child(Element::new("body", ns::CLIENT).with_text("let me in")),
    )
    .await?;
    let e = bob
        .recv_until(T, |m| {
            m.is("message", ns::CLIENT) && m.attr("type") == Some("error")
        })
        .await?;
    assert!(e.to_xml().contains("not-acceptable"), "{}", e.to_xml());
    Ok(())
}

/// Each bad input ends only its own stream, with the right condition; other clients go on.
#[tokio::test]
async fn bad_input_closes_only_the_offending_stream() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "calm", "alice").await?;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"<message><body>unclosed</message>".to_vec(),
            "not-well-formed",
        ),
        (
            b"<!DOCTYPE lol [<!ENTITY lol 'lol'>]>".to_vec(),
            "restricted-xml",
        ),
        (
            b"<message to='calm@conference.localhost'><body>&lol;</body></message>".to_vec(),
            "restricted-xml",
        ),
        (b"<?php echo 1; ?>".to_vec(), "restricted-xml"),
        (b"<!-- hello -->".to_vec(), "restricted-xml"),
        (
            format!("<message><body>{}</body></message>", "x".repeat(300 * 1024)).into_bytes(),
            "policy-violation",
        ),
        (b"<foo:bar/>".to_vec(), "bad-namespace-prefix"),
        (
            b"<unknown xmlns='urn:example'/>".to_vec(),
            "unsupported-stanza-type",
        ),
    ];
    for (bytes, condition) in cases {
        eprintln!("case {condition}");
        let mut bob = login(&s, "bob").await?;
        // A mismatched end tag is refused when it arrives: nothing more is sent.
        bob.send_raw(&bytes).await?;
        let err = bob.recv(T).await.expect_err("the stream must end");
        match err {
            Error::Stream { condition: c, .. } => assert_eq!(
                c,
                condition,
                "{}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            ),
            other => panic!("{condition}: expected a stream error, got {other:?}"),
        }
    }
    // Over WebSocket too.
    let mut ws = s
        .client_with(
            Transport::WebSocket { url: s.ws_url() },
            Mechanism::ScramSha256,
            "bob@localhost",
            "bob-pw",
        )
        .await?;
    ws.send_raw(b"<message xmlns='jabber:client'><body>&xxe;</body></message>")
        .await?;
    assert!(
        matches!(ws.recv(T).await, Err(Error::Stream { condition, .. }) if condition == "restricted-xml")
    );
    // Alice was never disturbed.
    let ack = alice
        .send_groupchat(&room("calm"), "still here", None)
        .await?;
    assert!(stanza_id(&ack, &room("calm")).is_some());
    assert!(alice
        .recv_opt(QUIET)
        .await?
        .is_none_or(|s| !s.is("presence", ns::CLIENT) || s.attr("type") != Some("error")));
    Ok(())
}

/// Whether a stanza carries one of the bad payloads (their text starts with `bad`, right
/// after a tag or a quote: a random resource such as `pchat--1b54bad2` is not one).
fn leaked(xml: &str) -> bool {
    xml.contains(">bad") || xml.contains("'bad") || xml.contains("\"bad")
}

/// Characters XML 1.0 forbids (raw control bytes, `&#x1;`, `&#xFFFE;`, surrogates), in text or
/// in attributes, end the sender's stream with `not-well-formed`: nothing of the stanza is
/// stored or relayed, so the room's occupants, its history on join and its MAM archive stay
/// clean (an expat-based client would drop its own stream on such a character).
#[tokio::test]
async fn forbidden_characters_end_the_stream_and_store_nothing() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "clean", "alice").await?;
    alice.send_groupchat(&room("clean"), "before", None).await?;
    let to = room("clean");
    let cases: Vec<Vec<u8>> = vec![
        format!("<message to='{to}' type='groupchat'><body>bad &#x1; ref</body></message>")
            .into_bytes(),
        format!("<message to='{to}' type='groupchat'><body>bad &#xFFFE; ref</body></message>")
            .into_bytes(),
        format!("<message to='{to}' type='groupchat'><body>bad &#xD800; ref</body></message>")
            .into_bytes(),
        [
            format!("<message to='{to}' type='groupchat'><body>bad raw ").as_bytes(),
            b"\x01\x1b\x7f",
            b"</body></message>",
        ]
        .concat(),
        [
            format!("<message to='{to}' type='groupchat'><body>bad raw ").as_bytes(),
            "\u{ffff}".as_bytes(),
            b"</body></message>",
        ]
        .concat(),
        format!(
            "<message to='{to}' type='groupchat' id='bad&#x1b;attr'><body>bad attr</body></message>"
        )
        .into_bytes(),
        format!(
            "<message to='{to}' type='groupchat'><subject>bad &#x8; subject</subject></message>"
        )
        .into_bytes(),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let mut bob = login(&s, "bob").await?;
        bob.join_room(&to, "bob", None).await?;
        // Bob may set the subject: only the character must stop it.
        bob.send_raw(bytes).await?;
        match bob.recv_until(T, |_| false).await {
            Err(Error::Stream { condition, .. }) => assert_eq!(
                condition,
                "not-well-formed",
                "case {i}: {}",
                String::from_utf8_lossy(bytes)
            ),
            other => panic!(
                "case {i}: expected a stream error, got {other:?}: {}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }
    // Over WebSocket too.
    let mut ws = s
        .client_with(
            Transport::WebSocket { url: s.ws_url() },
            Mechanism::ScramSha256,
            "bob@localhost",
            "bob-pw",
        )
        .await?;
    ws.join_room(&to, "bob", None).await?;
    ws.send_raw(
        format!("<message xmlns='jabber:client' to='{to}' type='groupchat'><body>bad &#x2; ws</body></message>")
            .as_bytes(),
    )
    .await?;
    assert!(
        matches!(ws.recv_until(T, |_| false).await, Err(Error::Stream { condition, .. }) if condition == "not-well-formed")
    );
    alice.send_groupchat(&room("clean"), "after", None).await?;

    // Alice saw Bob come and go, and none of his bad stanzas.
    let seen = alice.collect_for(QUIET).await?;
    for stanza in alice.pending().chain(seen.iter()) {
        let xml = stanza.to_xml();
        assert!(!leaked(&xml), "relayed to an occupant: {xml}");
    }
    let page = alice.mam_query(&to, &[], None).await?;
    assert_eq!(page.bodies(), ["before", "after"], "the archive is clean");
    let mut carol = login(&s, "carol").await?;
    let joined = carol.join_room(&to, "carol", None).await?;
    assert_eq!(
        joined.history_bodies(),
        ["before", "after"],
        "history on join is clean"
    );
    for stanza in joined.history.iter().chain(joined.presences.iter()) {
        assert!(!leaked(&stanza.to_xml()), "{}", stanza.to_xml());
    }
    assert!(
        !leaked(&joined.subject.to_xml()),
        "the subject was not changed: {}",
        joined.subject.to_xml()
    );
    Ok(())
}

/// Data at rest, standalone: with umask 000 (the loosest), the data directory is 0700 (an
/// existing open one is tightened), and the databases with their WAL files and the server
/// secret inside, the lock, the TLS key and a `data export` are 0600.
#[tokio::test]
async fn data_at_rest_is_private_whatever_the_umask() -> R {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))?;
    // The server and every CLI run go through a wrapper that sets umask 000.
    let wrapper = tmp.path().join("pchat-umask-000");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\numask 000\nexec '{}' \"$@\"\n", bin().display()),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let s = TestServer::start(
        &wrapper,
        ServerOptions {
            data_dir: Some(data.clone()),
            ..ServerOptions::default()
        },
    )
    .await?;
    s.add_user("alice@localhost", "alice-pw").await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "private", "alice").await?;
    alice
        .send_groupchat(&room("private"), "at rest", None)
        .await?;
    let export = tmp.path().join("export.jsonl");
    s.run_cli_ok(["data", "export", &export.display().to_string()])
        .await?;

    let mode =
        |p: &std::path::Path| -> anyhow::Result<u32> { Ok(std::fs::metadata(p)?.mode() & 0o7777) };
    assert_eq!(mode(&data)?, 0o700, "data directory");
    assert_eq!(mode(&data.join("tls"))?, 0o700, "tls directory");
    for name in [
        "mgc.db",
        "mgccomp.db",
        "pchat.lock",
        "mgc.db-wal",
        "mgc.db-shm",
        "tls/key.pem",
    ] {
        assert_eq!(mode(&data.join(name))?, 0o600, "{name}");
    }
    assert_eq!(mode(&export)?, 0o600, "data export file");
    Ok(())
}

#[tokio::test]
async fn cli_manages_users_and_reads_rooms() -> R {
    let s = server().await?;
    let out = s.run_cli(["user", "list"]).await?;
    let listed = String::from_utf8(out.stdout)?;
    assert!(
        listed.contains("alice@localhost") && listed.contains("carol@localhost"),
        "{listed}"
    );
    s.run_cli_ok(["user", "passwd", "carol@localhost", "--password", "new-pw"])
        .await?;
    assert!(
        s.client("carol@localhost", "carol-pw").await.is_err(),
        "old password no longer works"
    );
    s.client("carol@localhost", "new-pw").await?;
    s.run_cli_ok(["user", "remove", "carol@localhost"]).await?;
    assert!(s.client("carol@localhost", "new-pw").await.is_err());

    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "cli", "alice").await?;
    alice
        .send_groupchat(&room("cli"), "visible from the shell", None)
        .await?;
    let out = s.run_cli_ok(["--json", "room", "list"]).await?;
    let rooms: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(rooms[0]["jid"], room("cli"));
    assert_eq!(rooms[0]["messages"], 1);
    let out = s.run_cli_ok(["room", "history", "cli"]).await?;
    assert!(String::from_utf8(out.stdout)?.contains("visible from the shell"));

    // Bad input on the command line: exit 2 for usage, 1 with a fix for the rest.
    let out = s.run_cli(["user", "add"]).await?;
    assert_eq!(out.status.code(), Some(2));
    let out = s
        .run_cli(["user", "add", "nodomain", "--password", "x"])
        .await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)?.contains("user@localhost"));
    let out = s.run_cli(["room", "show", "nosuchroom"]).await?;
    assert_eq!(out.status.code(), Some(1));
    Ok(())
}

#[tokio::test]
async fn unwritable_data_dir_is_explained() -> R {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"")?;
    let out = std::process::Command::new(bin())
        .args(["--data-dir"])
        .arg(file.join("sub"))
        .args(["user", "list"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("--data-dir"), "says how to fix: {err}");
    Ok(())
}

/// Discovery, subject, private messages, invitations, nick conflicts and destroy, end to end.
#[tokio::test]
async fn disco_subject_pm_invite_conflict_destroy() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    let info = alice.disco_info("localhost").await?;
    assert!(info.has_feature("urn:xmpp:ping"));
    let items = alice.disco_items("localhost").await?;
    assert!(
        items.iter().any(|i| i.jid == ROOMS),
        "the server lists its MUC service"
    );
    let info = alice.disco_info(ROOMS).await?;
    assert!(info.has_feature("http://jabber.org/protocol/muc"));

    create_instant(&mut alice, "topics", "alice").await?;
    let subject = Element::new("message", ns::CLIENT)
        .with_attr("to", room("topics"))
        .with_attr("type", "groupchat")
        .with_child(Element::new("subject", ns::CLIENT).with_text("Quarter close"));
    alice.send(&subject).await?;
    alice
        .recv_until(T, |m| {
            m.child_text("subject", ns::CLIENT).as_deref() == Some("Quarter close")
        })
        .await?;

    let mut bob = login(&s, "bob").await?;
    let joined = bob.join_room(&room("topics"), "bob", None).await?;
    assert_eq!(
        joined.subject.child_text("subject", ns::CLIENT).as_deref(),
        Some("Quarter close"),
        "subject on join"
    );
    // Nick conflict from another account.
    let mut carol = login(&s, "carol").await?;
    let err = carol
        .join_room(&room("topics"), "bob", None)
        .await
        .expect_err("nick taken");
    assert_eq!(stanza_condition(&err), Some("conflict"));

    // Private message through the room.
    let pm = Element::new("message", ns::CLIENT)
        .with_attr("to", format!("{}/alice", room("topics")))
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::CLIENT).with_text("psst"));
    bob.send(&pm).await?;
    let got = alice
        .recv_until(T, |m| m.body().as_deref() == Some("psst"))
        .await?;
    assert_eq!(got.attr("from"), Some(&*format!("{}/bob", room("topics"))));

    // Mediated invitation reaches carol's session.
    let invite = Element::new("message", ns::CLIENT)
        .with_attr("to", room("topics"))
        .with_child(
            Element::new("x", ns::MUC_USER).with_child(
                Element::new("invite", ns::MUC_USER)
                    .with_attr("to", "carol@localhost")
                    .with_child(Element::new("reason", ns::MUC_USER).with_text("join us")),
            ),
        );
    alice.send(&invite).await?;
    let inv = carol
        .recv_until(T, |m| {
            m.child("x", ns::MUC_USER)
                .is_some_and(|x| x.has_child("invite", ns::MUC_USER))
        })
        .await?;
    assert_eq!(inv.attr("from"), Some(room("topics").as_str()));

    // Destroy: occupants are told, the room and its archive are gone.
    let destroy = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room("topics"))
        .with_child(
            Element::new("query", ns::MUC_OWNER).with_child(
                Element::new("destroy", ns::MUC_OWNER)
                    .with_child(Element::new("reason", ns::MUC_OWNER).with_text("done")),
            ),
        );
    alice.iq_result(destroy, T).await?;
    let gone = bob
        .recv_until(T, |p| {
            p.is("presence", ns::CLIENT) && p.attr("type") == Some("unavailable")
        })
        .await?;
    assert!(
        gone.child("x", ns::MUC_USER)
            .is_some_and(|x| x.has_child("destroy", ns::MUC_USER)),
        "{}",
        gone.to_xml()
    );
    let out = s.run_cli(["room", "show", "topics"]).await?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "destroyed rooms are gone from the store"
    );
    Ok(())
}

/// XEP-0045 §10.1.2 for clients that never send the configuration form (plain slixmpp,
/// libstrophe): the creator's first message accepts the defaults, so the room is usable at
/// once; until then it stays locked (reserved-room flow unchanged).
#[tokio::test]
async fn a_creator_who_talks_first_makes_an_instant_room() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    let joined = alice.join_room(&room("quick"), "alice", None).await?;
    assert!(joined.self_status_codes().contains(&201));
    // Locked: nobody else may enter yet.
    let mut bob = login(&s, "bob").await?;
    let e = bob
        .join_room(&room("quick"), "bob", None)
        .await
        .unwrap_err();
    assert_eq!(stanza_condition(&e), Some("item-not-found"), "{e}");
    // The creator talks: the message is archived and the room is open to others.
    let ack = alice.send_groupchat(&room("quick"), "first!", None).await?;
    assert!(stanza_id(&ack, &room("quick")).is_some(), "{ack}");
    let joined = bob.join_room(&room("quick"), "bob", None).await?;
    assert_eq!(joined.history_bodies(), ["first!"]);
    Ok(())
}

/// `pchat test message` (Lync's Test-CsPersistentChatMessage): passes against a running
/// server, printing each step; a wrong password fails and names the step.
#[tokio::test]
async fn the_synthetic_transaction_passes_and_names_a_failing_step() -> R {
    let s = server().await?;
    let dir = tempfile::tempdir()?;
    let (p1, p2, bad) = (
        dir.path().join("p1"),
        dir.path().join("p2"),
        dir.path().join("bad"),
    );
    std::fs::write(&p1, "alice-pw\n")?;
    std::fs::write(&p2, "bob-pw\n")?;
    std::fs::write(&bad, "nope\n")?;
    let args = |pw2: &std::path::Path| -> Vec<String> {
        vec![
            "test".into(),
            "message".into(),
            "--server".into(),
            s.tls_addr().to_string(),
            "--user1".into(),
            "alice@localhost".into(),
            "--password1-file".into(),
            p1.display().to_string(),
            "--user2".into(),
            "bob@localhost".into(),
            "--password2-file".into(),
            pw2.display().to_string(),
        ]
    };
    let out = s.run_cli_ok(args(&p2)).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    for step in [
        "login user1",
        "join user2",
        "receive",
        "history (MAM)",
        "search (full text)",
        "leave",
    ] {
        assert!(text.contains(step), "{step}: {text}");
    }
    assert!(text.contains("ok: "), "{text}");
    // Again (the room exists now), as JSON.
    let mut json_args = vec!["--json".to_owned()];
    json_args.extend(args(&p2));
    let out = s.run_cli_ok(json_args).await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["ok"], true, "{v}");
    let out = s.run_cli(args(&bad)).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("login user2") && err.contains("authentication failed"),
        "{err}"
    );
    Ok(())
}

/// XEP-0045 §7.2.x: an IQ to an occupant JID reaches that occupant from the sender's
/// occupant JID (no real JID shown), and the answer comes back the same way.
#[tokio::test]
async fn iqs_to_an_occupant_are_forwarded_and_answered() -> R {
    let s = server().await?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "iqroom", "alice").await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(&room("iqroom"), "bob", None).await?;
    alice
        .send(
            &Element::new("iq", ns::CLIENT)
                .with_attr("type", "get")
                .with_attr("id", "v1")
                .with_attr("to", format!("{}/bob", room("iqroom")))
                .with_child(Element::new("query", "jabber:iq:version")),
        )
        .await?;
    let asked = bob
        .recv_until(T, |st| {
            st.is("iq", ns::CLIENT) && st.attr("id") == Some("v1")
        })
        .await?;
    assert_eq!(
        asked.attr("from"),
        Some(format!("{}/alice", room("iqroom")).as_str()),
        "{asked}"
    );
    bob.send(
        &Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", "v1")
            .with_attr("to", asked.attr("from").unwrap_or_default())
            .with_child(
                Element::new("query", "jabber:iq:version")
                    .with_child(Element::new("name", "jabber:iq:version").with_text("TestClient")),
            ),
    )
    .await?;
    let answer = alice
        .recv_until(T, |st| {
            st.is("iq", ns::CLIENT) && st.attr("id") == Some("v1")
        })
        .await?;
    assert_eq!(answer.attr("type"), Some("result"), "{answer}");
    assert_eq!(
        answer.attr("from"),
        Some(format!("{}/bob", room("iqroom")).as_str())
    );
    assert!(answer.to_string().contains("TestClient"), "{answer}");
    // No such occupant: item-not-found.
    let e = alice
        .iq_result(
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "get")
                .with_attr("to", format!("{}/nobody", room("iqroom")))
                .with_child(Element::new("query", "jabber:iq:version")),
            T,
        )
        .await
        .unwrap_err();
    assert_eq!(stanza_condition(&e), Some("item-not-found"), "{e}");
    Ok(())
}

/// RFC 8266 nicknames: the room keeps a nick's enforced form (spaces folded, NFKC) and says
/// so with status 210; nicks that differ only in case are the same nick; a nick made of
/// nothing or of control characters is refused.
#[tokio::test]
async fn nicks_are_precis_nicknames_with_status_210() -> R {
    let s = server().await?;
    let r = room("precis");
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, "precis", "owner").await?;
    let mut bob = login(&s, "bob").await?;
    // Full-width letters and runs of spaces: joined as "Bob Smith", with 210.
    bob.send(
        &Element::new("presence", ns::CLIENT)
            .with_attr("to", format!("{r}/  Ｂｏｂ   Smith "))
            .with_child(Element::new("x", ns::MUC)),
    )
    .await?;
    let me = bob
        .recv_until(T, |p| {
            p.is("presence", ns::CLIENT) && status_codes(p).contains(&110)
        })
        .await?;
    assert_eq!(me.attr("from"), Some(&format!("{r}/Bob Smith")[..]), "{me}");
    assert!(status_codes(&me).contains(&210), "{me}");
    // The owner sees the enforced nick.
    alice
        .recv_until(T, |p| p.attr("from") == Some(&format!("{r}/Bob Smith")[..]))
        .await?;
    // carol may not take it in another case, nor with other spaces.
    let mut carol = login(&s, "carol").await?;
    for taken in ["bob smith", "BOB  SMITH"] {
        let e = carol.join_room(&r, taken, None).await.unwrap_err();
        assert!(e.to_string().contains("conflict"), "{taken}: {e}");
    }
    // Nor change hers to it.
    carol.join_room(&r, "carol", None).await?;
    carol
        .send(&Element::new("presence", ns::CLIENT).with_attr("to", format!("{r}/BOB SMITH")))
        .await?;
    let refused = carol
        .recv_until(T, |p| p.attr("type") == Some("error"))
        .await?;
    assert!(refused.to_xml().contains("conflict"), "{refused}");
    // A nick of spaces only, or with a control character, is refused.
    let mut dave_like = login(&s, "carol").await?;
    for bad in ["   ", "a\u{85}b", "x\u{378}"] {
        dave_like
            .send(
                &Element::new("presence", ns::CLIENT)
                    .with_attr("to", format!("{r}/{bad}"))
                    .with_child(Element::new("x", ns::MUC)),
            )
            .await?;
        let e = dave_like
            .recv_until(T, |p| p.attr("type") == Some("error"))
            .await?;
        assert!(e.to_xml().contains("jid-malformed"), "{bad:?}: {e}");
    }
    Ok(())
}
