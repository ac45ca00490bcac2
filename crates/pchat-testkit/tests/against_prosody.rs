//! Validates the test kit's client against Prosody, an independent and widely deployed XMPP
//! server, so that we know the client speaks correct XMPP before it is used to judge pchat.
//!
//! Never skipped: a missing Prosody (or slixmpp, for the interop test) fails the test with the
//! command that installs it (`scripts/test` installs both):
//!
//! ```sh
//! apt-get update && apt-get install -y prosody        # Debian 12: Prosody 0.12
//! pip install -r tests/interop/requirements.txt       # slixmpp, for the interop script
//! cargo test -p pchat-testkit --test against_prosody
//! ```
//!
//! Each test starts its own Prosody on free loopback ports with a config, a self-signed
//! certificate and a data directory in a temporary directory, so tests can run in parallel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pchat_testkit::{
    ns, stanza_id, status_codes, Client, ConnectOptions, Element, Error, History, Mechanism, Rsm,
    Stage, Transport,
};

const PASSWORD: &str = "s3cret pass";
const MUC: &str = "conference.localhost";

/// A Prosody process that is killed when dropped.
struct Prosody {
    child: Child,
    dir: tempfile::TempDir,
    c2s: u16,
    c2s_tls: u16,
    /// HTTPS port: WebSocket over TLS (`wss://`), as pchat serves it by default.
    https: u16,
}

impl Prosody {
    /// Starts Prosody with passwords stored for SCRAM-SHA-256, so that is what it offers
    /// (with PLAIN). Prosody 0.12 offers exactly one SCRAM variant: the one its stored hashes
    /// are for; [`Prosody::start`] takes "SHA-1" or "SHA-256".
    fn start_sha256() -> Prosody {
        Prosody::start("SHA-256")
    }

    fn start(password_hash: &str) -> Prosody {
        for tool in ["prosody", "prosodyctl"] {
            assert!(
                find_in_path(tool).is_some(),
                "`{tool}` is not installed; install it with \
                 `apt-get update && apt-get install -y prosody`"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("pchat-prosody-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        std::fs::create_dir(root.join("data")).expect("data dir");

        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), MUC.into()])
            .expect("self-signed certificate");
        std::fs::write(root.join("localhost.crt"), cert.cert.pem()).expect("write cert");
        std::fs::write(root.join("localhost.key"), cert.key_pair.serialize_pem())
            .expect("write key");

        let [c2s, c2s_tls, https] = free_ports();
        // When run as root (CI, containers) Prosody must be told that this is intended, and
        // prosodyctl must not switch to the `prosody` user, which cannot write our temp dir.
        let user = command_output("id", &["-un"]);
        let group = command_output("id", &["-gn"]);
        let config = format!(
            r#"
run_as_root = true
prosody_user = "{user}"
prosody_group = "{group}"
data_path = "{root}/data"
certificates = "{root}"
log = {{ debug = "{root}/prosody-debug.log"; info = "*console" }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "websocket"; "mam" }}
modules_disabled = {{ "s2s" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
c2s_direct_tls_ports = {{ {c2s_tls} }}
http_ports = {{}}
https_ports = {{ {https} }}
https_interfaces = {{ "127.0.0.1" }}
https_ssl = {{ certificate = "{root}/localhost.crt"; key = "{root}/localhost.key" }}
s2s_ports = {{}}
c2s_require_encryption = true
authentication = "internal_hashed"
password_hash = "{password_hash}"

VirtualHost "localhost"
  ssl = {{ certificate = "{root}/localhost.crt"; key = "{root}/localhost.key" }}

Component "{MUC}" "muc"
  modules_enabled = {{ "muc_mam" }}
  muc_room_locking = false
  muc_room_default_persistent = true
  muc_log_by_default = true
  muc_log_all_rooms = true
"#,
            root = root.display()
        );
        let config_path = root.join("prosody.cfg.lua");
        std::fs::write(&config_path, config).expect("write config");

        for user in ["alice", "bob", "carol", "slix"] {
            let out = Command::new("prosodyctl")
                .arg("--config")
                .arg(&config_path)
                .args(["register", user, "localhost", PASSWORD])
                .output()
                .expect("run prosodyctl");
            assert!(
                out.status.success(),
                "prosodyctl register {user} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let log = std::fs::File::create(root.join("prosody.log")).expect("log file");
        let child = Command::new("prosody")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn prosody");
        let mut prosody = Prosody {
            child,
            dir,
            c2s,
            c2s_tls,
            https,
        };
        prosody.wait_ready();
        prosody
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [self.c2s, self.c2s_tls, self.https] {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("prosody exited with {status}:\n{}", self.log());
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "prosody not listening on {port}:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }

    fn c2s_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.c2s))
    }

    fn options(&self, user: &str, password: &str) -> ConnectOptions {
        ConnectOptions::new(
            Transport::StartTls {
                addr: self.c2s_addr(),
            },
            &format!("{user}@localhost"),
            password,
        )
    }

    async fn client(&self, user: &str) -> Client {
        match Client::connect(self.options(user, PASSWORD)).await {
            Ok(client) => client,
            Err(e) => panic!("{user} could not connect: {e}\n{}", self.log()),
        }
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prosody log ---\n{}", self.log());
        }
    }
}

fn free_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    [0, 1, 2].map(|i| listeners[i].local_addr().expect("addr").port())
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn command_output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn starttls_scram_login_bind_ping_disco_and_close() {
    let prosody = Prosody::start_sha256();
    let sha1_prosody = Prosody::start("SHA-1");
    for (prosody, mechanism, resource) in [
        (&prosody, Mechanism::ScramSha256, None),
        (&sha1_prosody, Mechanism::ScramSha1, Some("laptop")),
        (&prosody, Mechanism::Plain, None),
    ] {
        let opts = ConnectOptions {
            mechanism,
            resource: resource.map(str::to_string),
            ..prosody.options("alice", PASSWORD)
        };
        let mut client = Client::connect(opts)
            .await
            .unwrap_or_else(|e| panic!("{mechanism:?}: {e}"));
        assert!(
            client.jid().starts_with("alice@localhost/"),
            "{}",
            client.jid()
        );
        if let Some(resource) = resource {
            assert_eq!(client.jid(), format!("alice@localhost/{resource}"));
        }
        client.ping("localhost").await.expect("ping");
        let info = client.disco_info("localhost").await.expect("disco#info");
        assert!(info.has_feature(ns::PING), "{:?}", info.features);
        let items = client.disco_items("localhost").await.expect("disco#items");
        assert!(items.iter().any(|i| i.jid == MUC), "{items:?}");
        let muc = client.disco_info(MUC).await.expect("disco#info muc");
        assert!(muc
            .identities
            .iter()
            .any(|i| i.category == "conference" && i.kind == "text"));
        client.close().await.expect("clean close");
    }
}

#[tokio::test]
async fn direct_tls_and_websocket_login() {
    let prosody = Prosody::start_sha256();
    for transport in [
        Transport::DirectTls {
            addr: SocketAddr::from(([127, 0, 0, 1], prosody.c2s_tls)),
        },
        Transport::WebSocket {
            url: format!("wss://127.0.0.1:{}/xmpp-websocket", prosody.https),
        },
    ] {
        let opts = ConnectOptions::new(transport.clone(), "bob@localhost", PASSWORD);
        let mut client = Client::connect(opts)
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: {e}\n{}", prosody.log()));
        assert!(client.jid().starts_with("bob@localhost/"));
        client.ping("localhost").await.expect("ping");
        // A message to ourselves round-trips through the server over this transport.
        let jid = client.jid().to_string();
        client
            .send(
                &Element::new("message", ns::CLIENT)
                    .with_attr("to", jid.clone())
                    .with_attr("type", "chat")
                    .with_child(Element::new("body", ns::CLIENT).with_text("to me <&>")),
            )
            .await
            .expect("send");
        let echo = client
            .recv_until(T, |s| s.is("message", ns::CLIENT))
            .await
            .expect("self message");
        assert_eq!(echo.body().as_deref(), Some("to me <&>"));
        assert_eq!(echo.attr("from"), Some(jid.as_str()));
        client.close().await.expect("clean close");
    }
}

#[tokio::test]
async fn wrong_password_and_plaintext_are_refused() {
    let prosody = Prosody::start_sha256();
    let sha1_prosody = Prosody::start("SHA-1");
    for (prosody, mechanism) in [
        (&prosody, Mechanism::ScramSha256),
        (&sha1_prosody, Mechanism::ScramSha1),
        (&prosody, Mechanism::Plain),
    ] {
        let opts = ConnectOptions {
            mechanism,
            ..prosody.options("alice", "wrong")
        };
        match Client::connect(opts).await {
            Err(Error::Sasl { condition, .. }) => assert_eq!(condition, "not-authorized"),
            Err(other) => panic!("{mechanism:?}: expected SASL not-authorized, got {other}"),
            Ok(_) => panic!("{mechanism:?}: wrong password accepted"),
        }
    }

    // Without TLS Prosody (c2s_require_encryption) offers no mechanism at all.
    let plain = ConnectOptions::new(
        Transport::PlainTcp {
            addr: prosody.c2s_addr(),
        },
        "alice@localhost",
        PASSWORD,
    );
    match Client::connect(plain.clone()).await {
        Err(Error::MechanismNotOffered { offered, .. }) => assert!(offered.is_empty()),
        Err(other) => panic!("expected no mechanisms in the clear, got {other}"),
        Ok(_) => panic!("authenticated without TLS"),
    }
    // Stopping at the features shows what was offered, and raw bad input gets a stream error.
    let mut early = Client::connect(ConnectOptions {
        stop_after: Stage::Features,
        ..plain
    })
    .await
    .expect("stream open");
    let starttls = early
        .features()
        .child("starttls", ns::TLS)
        .expect("starttls offered");
    assert!(starttls.has_child("required", ns::TLS));
    early
        .send_raw(b"<message><unclosed></message>")
        .await
        .expect("send raw");
    match early.recv(T).await {
        Err(Error::Stream { condition, .. }) => assert_eq!(condition, "not-well-formed"),
        other => panic!("expected a not-well-formed stream error, got {other:?}"),
    }
    // The stream is over; the same error keeps being reported.
    assert!(matches!(early.recv(T).await, Err(Error::Stream { .. })));
}

#[tokio::test]
async fn muc_join_groupchat_reflection_history_and_mam() {
    let prosody = Prosody::start_sha256();
    let room = format!("lobby@{MUC}");
    let mut alice = prosody.client("alice").await;
    let mut bob = prosody.client("bob").await;

    let joined = alice
        .join_room(&room, "alice", None)
        .await
        .expect("alice joins");
    assert!(joined.self_status_codes().contains(&110));
    assert_eq!(
        joined.self_presence.attr("from"),
        Some(format!("{room}/alice").as_str())
    );
    let joined = bob.join_room(&room, "bob", None).await.expect("bob joins");
    assert_eq!(
        joined.presences.len(),
        2,
        "alice's presence, then bob's own"
    );
    // Alice sees bob arrive.
    let arrival = alice
        .recv_until(T, |s| {
            s.attr("from") == Some(format!("{room}/bob").as_str())
        })
        .await
        .expect("bob's presence");
    assert!(arrival.is("presence", ns::CLIENT));

    // Alice's messages: the reflection is her ack and carries the room's stanza-id; bob
    // receives the same stanza-id.
    let mut acked = Vec::new();
    for body in ["first", "second & <third>", "third"] {
        let ack = alice
            .send_groupchat(&room, body, None)
            .await
            .expect("reflection");
        assert_eq!(ack.body().as_deref(), Some(body));
        assert_eq!(ack.attr("from"), Some(format!("{room}/alice").as_str()));
        let id = stanza_id(&ack, &room).expect("stanza-id by the room");
        let seen = bob
            .recv_until(T, |s| s.body().as_deref() == Some(body))
            .await
            .expect("bob receives");
        assert_eq!(stanza_id(&seen, &room).as_deref(), Some(id.as_str()));
        acked.push((body.to_string(), id));
    }

    // A late joiner gets the history with delay stamps, then the subject.
    let mut carol = prosody.client("carol").await;
    let joined = carol
        .join_room(
            &room,
            "carol",
            Some(History {
                max_stanzas: Some(2),
                ..History::default()
            }),
        )
        .await
        .expect("carol joins");
    assert_eq!(joined.history_bodies(), ["second & <third>", "third"]);
    assert!(joined
        .history
        .iter()
        .all(|m| pchat_testkit::delay_stamp(m).is_some()));
    assert!(joined.subject.has_child("subject", ns::CLIENT));

    // The whole archive, then paged backwards two at a time.
    let page = carol.mam_query(&room, &[], None).await.expect("MAM");
    assert!(page.complete());
    let bodies: Vec<String> = acked.iter().map(|(b, _)| b.clone()).collect();
    let ids: Vec<String> = acked.iter().map(|(_, i)| i.clone()).collect();
    assert_eq!(page.bodies(), bodies);
    assert_eq!(page.ids(), ids);
    assert!(page
        .results
        .iter()
        .all(|r| pchat_testkit::delay_stamp(r).is_some()));

    let last = carol
        .mam_query(
            &room,
            &[],
            Some(Rsm {
                max: Some(2),
                before: Some(String::new()),
                after: None,
            }),
        )
        .await
        .expect("last page");
    assert_eq!(last.ids(), ids[1..]);
    assert!(!last.complete());
    let earlier = carol
        .mam_query(
            &room,
            &[],
            Some(Rsm {
                max: Some(2),
                before: last.first(),
                after: None,
            }),
        )
        .await
        .expect("earlier page");
    assert_eq!(earlier.ids(), ids[..1]);
    assert!(earlier.complete());

    // Querying a room that does not exist is a stanza error, delivered as a typed error.
    match carol.mam_query(&format!("nowhere@{MUC}"), &[], None).await {
        Err(Error::Stanza { error, .. }) => assert_eq!(error.condition, "item-not-found"),
        other => panic!("expected item-not-found, got {other:?}"),
    }

    // Leaving produces our unavailable self-presence with status 110.
    let left = bob.leave_room(&room, "bob").await.expect("leave");
    assert!(status_codes(&left).contains(&110));
    for client in [alice, bob, carol] {
        client.close().await.expect("close");
    }
}

#[tokio::test]
async fn websocket_muc_round_trip() {
    let prosody = Prosody::start_sha256();
    let room = format!("ws@{MUC}");
    let opts = ConnectOptions::new(
        Transport::WebSocket {
            url: format!("wss://127.0.0.1:{}/xmpp-websocket", prosody.https),
        },
        "alice@localhost",
        PASSWORD,
    );
    let mut alice = Client::connect(opts).await.expect("ws login");
    alice.join_room(&room, "alice", None).await.expect("join");
    let ack = alice
        .send_groupchat(&room, "over websocket", Some("origin-1"))
        .await
        .expect("reflection");
    assert_eq!(pchat_testkit::origin_id(&ack).as_deref(), Some("origin-1"));
    let page = alice
        .mam_query(&room, &[], None)
        .await
        .expect("MAM over ws");
    assert_eq!(page.bodies(), ["over websocket"]);
    alice.close().await.expect("ws close");
}

#[tokio::test]
async fn slixmpp_interop_scenario() {
    let prosody = Prosody::start_sha256();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/muc_scenario.py");
    let has_slixmpp = Command::new("python3")
        .args(["-c", "import slixmpp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_slixmpp,
        "slixmpp is missing; install it with \
         `pip install -r tests/interop/requirements.txt`"
    );
    let room = format!("interop@{MUC}");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--jid", "slix@localhost", "--password", PASSWORD])
        .args(["--host", "127.0.0.1", "--port", &prosody.c2s.to_string()])
        .args(["--room", &room, "--nick", "slix", "--messages", "a,b,c"])
        .output()
        .await
        .expect("run the interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "interop script failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Parse the JSON line with our own client's view as the cross-check: both clients must
    // see the same archive ids.
    let line = stdout.lines().last().unwrap_or_default();
    let mut alice = prosody.client("alice").await;
    let page = alice.mam_query(&room, &[], None).await.expect("MAM");
    assert_eq!(page.bodies(), ["a", "b", "c"]);
    let ids = page.ids();
    let expected = format!(
        r#"{{"reflected": ["a", "b", "c"], "mam": ["a", "b", "c"], "stanza_ids": ["{0}", "{1}", "{2}"], "mam_ids": ["{0}", "{1}", "{2}"]}}"#,
        ids[0], ids[1], ids[2]
    );
    assert_eq!(line, expected);
}
