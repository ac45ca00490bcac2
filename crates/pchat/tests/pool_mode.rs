//! Pool mode with real components: a PostgreSQL instance owned by its `pchat agent`, an etcd
//! cluster and several `pchat serve` processes. Checks I6 (idle servers take no session and
//! hold no database connection) from the clients' side and from `pg_stat_activity`, that the
//! pool's data is shared, that one room has one order across servers, that faults lose
//! nothing acknowledged, that rules made on one server hold on the others, and the
//! database's security from the servers' side: TLS to the instance the topology names (and
//! no other), the servers' role with a password that can be rotated while the pool serves,
//! and a user's bookmark events reaching its sessions on every server.
//! etcd runs with TLS and authentication: every server and shell command uses its own
//! identity (`common::secure`).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::http_fetch;
use common::pg::AgentProcess;
use common::secure::SecureEtcd;
use pchat_testkit::{ns, stanza_id, Client, Element, Error, ServerOptions, TestServer};

const ROOM: &str = "shared@conference.localhost";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// A pool `pc1` with one site: PostgreSQL (with TLS and passwords, owned by its agent), etcd
/// (TLS, users and roles) and servers `s1`…`sN`, all idle at first. The PKI also holds an
/// identity for a second instance, `b_db`, which a test may start.
struct Lab {
    // Servers first: they stop before the database does.
    servers: Vec<TestServer>,
    pg: AgentProcess,
    secure: SecureEtcd,
    topology: PathBuf,
    dir: tempfile::TempDir,
}

impl Lab {
    async fn start(
        servers: usize,
        etcd_members: usize,
        drain_timeout_ms: u64,
    ) -> anyhow::Result<Lab> {
        Lab::start_with_env(servers, etcd_members, drain_timeout_ms, |_| Vec::new()).await
    }

    /// Like [`Lab::start`], with extra environment variables for server `i` (0-based).
    async fn start_with_env(
        servers: usize,
        etcd_members: usize,
        drain_timeout_ms: u64,
        env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> anyhow::Result<Lab> {
        Lab::start_full(servers, etcd_members, drain_timeout_ms, env, None).await
    }

    /// Like [`Lab::start`], every server with this `pchat.toml` in its data directory.
    async fn start_with_toml(servers: usize, toml: &str) -> anyhow::Result<Lab> {
        Lab::start_full(servers, 1, 3000, |_| Vec::new(), Some(toml)).await
    }

    async fn start_full(
        servers: usize,
        etcd_members: usize,
        drain_timeout_ms: u64,
        env: impl Fn(usize) -> Vec<(String, String)>,
        toml: Option<&str>,
    ) -> anyhow::Result<Lab> {
        let dir = tempfile::Builder::new().prefix("pchat-pool-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let names: Vec<String> = (1..=servers).map(|i| format!("s{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let secure =
            SecureEtcd::start(dir.path(), "pc1", etcd_members, &["a_db", "b_db"], &names).await?;
        let etcd = secure.endpoints_csv();
        let pg = AgentProcess::start(
            dir.path(),
            "a_db",
            "pc1",
            &secure.endpoints(),
            &secure.instance_dir("a_db"),
        )?;
        let mut started = Vec::new();
        for i in 1..=servers {
            let mut extra_args: Vec<String> = [
                "--topology-from-etcd",
                &etcd,
                "--pool",
                "pc1",
                "--server",
                &format!("s{i}"),
                "--pool-poll-ms",
                "100",
                "--drain-timeout-ms",
                &drain_timeout_ms.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            extra_args.extend(secure.server_args(&format!("s{i}")));
            let data_dir = match toml {
                Some(text) => {
                    let d = dir.path().join(format!("data-s{i}"));
                    std::fs::create_dir(&d)?;
                    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
                    std::fs::write(d.join("pchat.toml"), text)?;
                    Some(d)
                }
                None => None,
            };
            started.push(
                TestServer::start(
                    &bin(),
                    ServerOptions {
                        extra_args,
                        env: env(i - 1),
                        data_dir,
                        ..ServerOptions::default()
                    },
                )
                .await?,
            );
        }
        pg.wait_up(&secure.operator_dir()).await?;
        let eps = secure.endpoints_toml();
        let mut topo = format!(
            "share = \"/tmp/pchat-share\"\netcd = [{eps}]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
             [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ name = \"a_db\", address = \"{}\", agent = \"{}\" }}\n",
            pg.address(),
            pg.agent_url
        );
        for (i, s) in started.iter().enumerate() {
            topo.push_str(&format!(
                "[[servers]]\nname = \"s{}\"\nsite = \"A\"\naddress = \"{}\"\n",
                i + 1,
                s.c2s_addr()
            ));
        }
        let file = dir.path().join("topology.toml");
        std::fs::write(&file, topo)?;
        secure.setup(&bin(), &file).await?;
        let lab = Lab {
            pg,
            secure,
            servers: started,
            topology: file.clone(),
            dir,
        };
        lab.pchat(&["topology", "publish", &file.to_string_lossy()])?;
        lab.pchat(&["--in-pool", "pc1", "db", "install"])?;
        Ok(lab)
    }

    fn pchat(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin())
            .args(args)
            .envs(self.secure.env())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pchat {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    fn add_user(&self, user: &str) -> anyhow::Result<()> {
        self.pchat(&[
            "--in-pool",
            "pc1",
            "user",
            "add",
            &format!("{user}@localhost"),
            "--password",
            "pw",
        ])?;
        Ok(())
    }

    fn activate(&self, servers: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["pool", "set-active-servers", "pc1"];
        args.extend_from_slice(servers);
        self.pchat(&args)?;
        Ok(())
    }

    /// Connections from anyone to mgc and mgccomp.
    fn db_connections(&self) -> anyhow::Result<u32> {
        let out = self.pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('mgc', 'mgccomp') \
             AND application_name <> 'pchat-agent'",
        )?;
        Ok(out
            .lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or(u32::MAX))
    }
}

/// Logs `user` in on server `i` (0-based), retrying while it is still idle (it polls the pool
/// state).
async fn login_when_active(lab: &Lab, i: usize, user: &str) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match lab.servers[i]
            .client(&format!("{user}@localhost"), "pw")
            .await
        {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Joins `ROOM` and, for its creator, submits the instant-room form.
async fn join(c: &mut Client, nick: &str, create: bool) -> anyhow::Result<()> {
    c.join_room(ROOM, nick, None).await?;
    if create {
        let submit = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", ROOM)
            .with_child(
                Element::new("query", ns::MUC_OWNER)
                    .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
            );
        c.iq_result(submit, Duration::from_secs(10)).await?;
    }
    Ok(())
}

#[tokio::test]
async fn idle_servers_hold_nothing_and_the_pool_shares_its_data() -> anyhow::Result<()> {
    let lab = Lab::start(2, 3, 3000).await?;
    lab.add_user("alice")?;

    // Nobody active: both servers refuse sessions and hold no database connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = lab.servers[0]
        .client("alice@localhost", "pw")
        .await
        .expect_err("idle");
    assert!(format!("{err:?}").contains("system-shutdown"), "{err:?}");
    assert_eq!(
        lab.db_connections()?,
        0,
        "idle servers hold no connection to mgc/mgccomp"
    );
    // A secure pool: no server warns (the insecure pool's warnings: tests/insecure_pool.rs).
    for s in &lab.servers {
        let log = std::fs::read_to_string(s.data_dir().join("pchat-test-stderr.log"))?;
        assert!(!log.contains("WARNING"), "{log}");
    }

    // s1 active: it serves from PostgreSQL; s2 sends clients to s1.
    lab.activate(&["s1"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    let err = lab.servers[1]
        .client("alice@localhost", "pw")
        .await
        .expect_err("s2 is idle");
    assert!(format!("{err:?}").contains("see-other-host"), "{err:?}");
    join(&mut alice, "alice", true).await?;
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = alice
            .send_groupchat(ROOM, &format!("pooled {i}"), None)
            .await?;
        acked.push(stanza_id(&ack, ROOM).unwrap_or_default());
    }
    assert!(lab.db_connections()? > 0);

    // --none: s1 drains (the client is told to leave) and closes every connection.
    let t0 = Instant::now();
    lab.pchat(&["pool", "set-active-servers", "pc1", "--none"])?;
    match alice.recv(Duration::from_secs(10)).await {
        Err(Error::Stream { condition, .. }) => assert_eq!(condition, "system-shutdown"),
        other => panic!("expected the drain to end the stream, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.db_connections()? > 0 {
        assert!(
            Instant::now() < deadline,
            "connections left 10 s after --none"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "set-active-servers --none to zero mgc/mgccomp connections: {:?}",
        t0.elapsed()
    );

    // s2 active: the same rooms and archive, served by the other server.
    lab.activate(&["s2"])?;
    let mut alice = login_when_active(&lab, 1, "alice").await?;
    let page = alice
        .mam_query(
            ROOM,
            &[],
            Some(pchat_testkit::Rsm {
                max: Some(100),
                ..Default::default()
            }),
        )
        .await?;
    assert_eq!(
        page.ids(),
        acked,
        "every acknowledged message is in the shared archive, in order"
    );
    let joined = alice.join_room(ROOM, "alice", None).await?;
    assert_eq!(joined.history.len(), 20);
    let ack = alice.send_groupchat(ROOM, "from s2", None).await?;
    assert_eq!(
        stanza_id(&ack, ROOM).as_deref(),
        Some("21"),
        "one sequence across servers"
    );

    // Swap: s1 active again, s2 idle and pointing at s1.
    lab.pchat(&["pool", "swap", "pc1"])?;
    match alice.recv_until(Duration::from_secs(10), |_| false).await {
        Err(Error::Stream { condition, text }) => {
            assert_eq!(condition, "see-other-host", "{text:?}")
        }
        other => panic!("expected see-other-host, got {other:?}"),
    }
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    let joined = alice.join_room(ROOM, "alice", None).await?;
    assert_eq!(
        joined.history_bodies().last().map(String::as_str),
        Some("from s2")
    );
    Ok(())
}

/// A server that loses its database keeps its sessions, answers writes with a retryable
/// error (never a false acknowledgment), and serves again when the database returns.
#[tokio::test]
async fn database_outage_is_retryable_and_never_acknowledged() -> anyhow::Result<()> {
    let lab = Lab::start(1, 1, 30_000).await?;
    lab.add_user("alice")?;
    lab.activate(&["s1"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    join(&mut alice, "alice", true).await?;
    alice.send_groupchat(ROOM, "before", Some("o-1")).await?;

    lab.pchat(&["agent", "stop", "--url", &lab.pg.agent_url])?;
    alice.set_reply_timeout(Duration::from_secs(60));
    let err = alice
        .send_groupchat(ROOM, "during", Some("o-2"))
        .await
        .expect_err("no acknowledgment without the database");
    match &err {
        Error::Stanza { error, .. } => assert_eq!(error.error_type, "wait", "retryable: {err:?}"),
        other => panic!("expected a wait error, got {other:?}"),
    }
    lab.pchat(&["agent", "start", "--url", &lab.pg.agent_url])?;
    // The session survived; the same message, resent, is stored once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ack = loop {
        match alice.send_groupchat(ROOM, "during", Some("o-2")).await {
            Ok(a) => break a,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(stanza_id(&ack, ROOM).as_deref(), Some("2"));
    let page = alice.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.bodies(), ["before", "during"]);
    Ok(())
}

/// Two active servers, one room: Alice on s1 and Bob on s2 write at the same time; both see
/// every message once, in one order, the archive's (I3, I4), woken by NOTIFY and caught up
/// by sequence.
#[tokio::test]
async fn one_room_across_two_servers_has_one_order() -> anyhow::Result<()> {
    const EACH: usize = 500;
    let lab = Lab::start(2, 1, 30_000).await?;
    lab.add_user("alice")?;
    lab.add_user("bob")?;
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    join(&mut alice, "alice", true).await?;
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    join(&mut bob, "bob", false).await?;

    let t0 = Instant::now();
    let run = |mut c: Client, who: &'static str| async move {
        for i in 0..EACH {
            let m = Element::new("message", ns::CLIENT)
                .with_attr("to", ROOM)
                .with_attr("type", "groupchat")
                .with_attr("id", format!("{who}-{i}"))
                .with_child(Element::new("body", ns::CLIENT).with_text(format!("{who} {i}")));
            c.send(&m).await?;
        }
        // Everything this client saw, in arrival order.
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while ids.len() < 2 * EACH && Instant::now() < deadline {
            let s = c.recv(Duration::from_secs(30)).await?;
            if s.is("message", ns::CLIENT)
                && s.attr("type") == Some("groupchat")
                && s.body().is_some()
            {
                ids.push(
                    stanza_id(&s, ROOM)
                        .and_then(|x| x.parse::<i64>().ok())
                        .unwrap_or(-1),
                );
            }
        }
        anyhow::Ok((c, ids))
    };
    let (a, b) = tokio::join!(run(alice, "alice"), run(bob, "bob"));
    let (mut alice, alice_ids) = a?;
    let (_bob, bob_ids) = b?;
    let elapsed = t0.elapsed();
    let expect: Vec<i64> = (1..=(2 * EACH) as i64).collect();
    assert_eq!(
        alice_ids, expect,
        "alice (s1) saw every message once, in order"
    );
    assert_eq!(bob_ids, expect, "bob (s2) saw every message once, in order");
    assert_eq!(alice.mam_all_ids(ROOM).await?, expect);
    eprintln!(
        "one room over 2 servers: {} messages in {:?} = {:.0} messages/s ({:.0} deliveries/s)",
        2 * EACH,
        elapsed,
        (2 * EACH) as f64 / elapsed.as_secs_f64(),
        (4 * EACH) as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// Three active servers; one is killed with SIGKILL while clients write through all three.
/// Every acknowledged message (from any server, the dead one included) is in the archive
/// afterwards, once, and the survivors' clients kept writing (I1, I4).
#[tokio::test]
async fn kill9_of_one_server_loses_no_acknowledged_message() -> anyhow::Result<()> {
    let mut lab = Lab::start(3, 1, 30_000).await?;
    for u in ["u1", "u2", "u3"] {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2", "s3"])?;
    let mut clients = Vec::new();
    for i in 0..3 {
        let user = format!("u{}", i + 1);
        let mut c = login_when_active(&lab, i, &user).await?;
        join(&mut c, &user, i == 0).await?;
        clients.push(c);
    }
    // Each writer sends until its server dies or it has sent 400 messages; it records the
    // stanza-ids of acknowledged messages only.
    let mut writers = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..400 {
                match c
                    .send_groupchat(ROOM, &format!("w{i} {n}"), Some(&format!("w{i}-{n}")))
                    .await
                {
                    Ok(ack) => acked.push(
                        stanza_id(&ack, ROOM)
                            .and_then(|x| x.parse::<i64>().ok())
                            .unwrap_or(-1),
                    ),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.servers[0].kill9();
    let mut acked = Vec::new();
    for (i, w) in writers.into_iter().enumerate() {
        let a = tokio::time::timeout(Duration::from_secs(120), w).await??;
        if i > 0 {
            assert_eq!(a.len(), 400, "writer {i} on a surviving server kept going");
        }
        acked.extend(a);
    }
    let mut reader = lab.servers[1].client("u2@localhost", "pw").await?;
    let ids = reader.mam_all_ids(ROOM).await?;
    let expect: Vec<i64> = (1..=ids.len() as i64).collect();
    assert_eq!(ids, expect, "the archive is gapless");
    let mut sorted = acked.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        acked.len(),
        "no two acknowledgments share an id"
    );
    for a in &acked {
        assert!(ids.contains(a), "acknowledged message {a} lost");
    }
    // The dead server's occupants are withdrawn once its `alive` key expires: u1 rejoins
    // with its nick through s2 instead of meeting a ghost of itself (`conflict`).
    let killed = std::time::Instant::now();
    let mut u1 = lab.servers[1].client("u1@localhost", "pw").await?;
    let rejoined = loop {
        match u1.join_room(ROOM, "u1", None).await {
            Ok(_) => break killed.elapsed(),
            Err(e) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "u1 cannot take its nick back after its server died: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    eprintln!("u1 rejoined with its nick {rejoined:?} after the check began");
    Ok(())
}

/// Presence and subject cross servers: Bob joining on s2 sees Alice (on s1) before his own
/// presence; Alice sees Bob arrive and leave; a subject set on s1 reaches Bob on s2.
#[tokio::test]
async fn presence_and_subject_cross_servers() -> anyhow::Result<()> {
    let lab = Lab::start(2, 1, 30_000).await?;
    lab.add_user("alice")?;
    lab.add_user("bob")?;
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    let alice_self = alice.join_room(ROOM, "alice", None).await?.self_presence;
    let instant = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(instant, Duration::from_secs(10)).await?;
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    let joined = bob.join_room(ROOM, "bob", None).await?;
    let alice_jid = format!("{ROOM}/alice");
    let alice_seen = joined
        .presences
        .iter()
        .find(|p| p.attr("from") == Some(alice_jid.as_str()));
    assert!(
        alice_seen.is_some(),
        "bob sees alice, who is on the other server: {:?}",
        joined
            .presences
            .iter()
            .map(|p| p.attr("from"))
            .collect::<Vec<_>>()
    );
    // XEP-0421: both servers give alice the same occupant id (the key comes from the
    // shared database).
    let occupant_id = |p: &Element| {
        p.child("occupant-id", "urn:xmpp:occupant-id:0")
            .and_then(|o| o.attr("id"))
            .map(str::to_owned)
    };
    assert!(occupant_id(&alice_self).is_some(), "{alice_self}");
    assert_eq!(
        alice_seen.and_then(occupant_id),
        occupant_id(&alice_self),
        "the same occupant id on both servers"
    );
    let seen = alice
        .recv_until(Duration::from_secs(10), |p| {
            p.is("presence", ns::CLIENT)
                && p.attr("from") == Some(&*format!("{ROOM}/bob"))
                && p.attr("type").is_none()
        })
        .await?;
    assert!(
        !pchat_testkit::status_codes(&seen).contains(&110),
        "alice gets bob's presence as others see it"
    );

    let subject = Element::new("message", ns::CLIENT)
        .with_attr("to", ROOM)
        .with_attr("type", "groupchat")
        .with_child(Element::new("subject", ns::CLIENT).with_text("Cross-site drill"));
    alice.send(&subject).await?;
    bob.recv_until(Duration::from_secs(10), |m| {
        m.child_text("subject", ns::CLIENT).as_deref() == Some("Cross-site drill")
    })
    .await?;

    // The nick alice holds on s1 cannot be taken on s2.
    lab.add_user("carol")?;
    let mut carol = login_when_active(&lab, 1, "carol").await?;
    let err = carol
        .join_room(ROOM, "alice", None)
        .await
        .expect_err("nick in use on the other server");
    assert!(format!("{err:?}").contains("conflict"), "{err:?}");

    bob.leave_room(ROOM, "bob").await?;
    alice
        .recv_until(Duration::from_secs(10), |p| {
            p.is("presence", ns::CLIENT)
                && p.attr("from") == Some(&*format!("{ROOM}/bob"))
                && p.attr("type") == Some("unavailable")
        })
        .await?;
    Ok(())
}

/// A user's bookmarks (PEP, XEP-0402) changed from a client on s1 reach the same user's
/// client on s2 as events, as they reach its other clients on s1: a publication (with its
/// payload), a retraction, and the node's deletion.
#[tokio::test]
async fn bookmark_events_reach_the_users_sessions_on_every_server() -> anyhow::Result<()> {
    const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
    const PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
    const EVENT: &str = "http://jabber.org/protocol/pubsub#event";
    const BM: &str = "urn:xmpp:bookmarks:1";
    let lab = Lab::start(2, 1, 30_000).await?;
    lab.add_user("alice")?;
    lab.activate(&["s1", "s2"])?;
    let mut phone = login_when_active(&lab, 0, "alice").await?;
    let mut laptop = login_when_active(&lab, 1, "alice").await?;
    let mut tablet = login_when_active(&lab, 1, "alice").await?;
    let iq = |ty: &str, child: Element| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", ty)
            .with_child(child)
    };
    let publish = iq(
        "set",
        Element::new("pubsub", PUBSUB).with_child(
            Element::new("publish", PUBSUB)
                .with_attr("node", BM)
                .with_child(
                    Element::new("item", PUBSUB)
                        .with_attr("id", ROOM)
                        .with_child(
                            Element::new("conference", BM)
                                .with_attr("name", "Shared")
                                .with_attr("autojoin", "true"),
                        ),
                ),
        ),
    );
    phone.iq_result(publish, Duration::from_secs(10)).await?;
    // `<event><items node=BM>` holding `what`, from alice's account.
    let items_event = |what: &'static str| {
        move |m: &Element| {
            m.is("message", ns::CLIENT)
                && m.attr("from") == Some("alice@localhost")
                && m.child("event", EVENT)
                    .and_then(|e| e.child("items", EVENT))
                    .filter(|i| i.attr("node") == Some(BM))
                    .and_then(|i| i.child(what, EVENT))
                    .is_some_and(|x| x.attr("id") == Some(ROOM))
        }
    };
    for c in [&mut laptop, &mut tablet] {
        let got = c
            .recv_until(Duration::from_secs(10), items_event("item"))
            .await?;
        let conference = got
            .child("event", EVENT)
            .and_then(|e| e.child("items", EVENT))
            .and_then(|i| i.child("item", EVENT))
            .and_then(|i| i.child("conference", BM))
            .cloned();
        assert_eq!(
            conference.as_ref().and_then(|c| c.attr("name")),
            Some("Shared"),
            "the payload comes with the event: {got}"
        );
    }
    let retract = iq(
        "set",
        Element::new("pubsub", PUBSUB).with_child(
            Element::new("retract", PUBSUB)
                .with_attr("node", BM)
                .with_attr("notify", "true")
                .with_child(Element::new("item", PUBSUB).with_attr("id", ROOM)),
        ),
    );
    phone.iq_result(retract, Duration::from_secs(10)).await?;
    laptop
        .recv_until(Duration::from_secs(10), items_event("retract"))
        .await?;
    // Made from s2 this time, seen on s1.
    let again = iq(
        "set",
        Element::new("pubsub", PUBSUB).with_child(
            Element::new("publish", PUBSUB)
                .with_attr("node", BM)
                .with_child(
                    Element::new("item", PUBSUB)
                        .with_attr("id", ROOM)
                        .with_child(Element::new("conference", BM).with_attr("name", "Again")),
                ),
        ),
    );
    laptop.iq_result(again, Duration::from_secs(10)).await?;
    phone
        .recv_until(Duration::from_secs(10), items_event("item"))
        .await?;
    let delete = iq(
        "set",
        Element::new("pubsub", PUBSUB_OWNER)
            .with_child(Element::new("delete", PUBSUB_OWNER).with_attr("node", BM)),
    );
    phone.iq_result(delete, Duration::from_secs(10)).await?;
    laptop
        .recv_until(Duration::from_secs(10), |m| {
            m.child("event", EVENT)
                .and_then(|e| e.child("delete", EVENT))
                .is_some_and(|d| d.attr("node") == Some(BM))
        })
        .await?;
    Ok(())
}

/// The room management page's sessions are the pool's, not one server's: a login on s1 is
/// served by s2 (a load balancer need not be sticky), and a logout on s2 ends it on s1.
#[tokio::test]
async fn a_rooms_page_session_made_on_one_server_is_served_and_ended_by_the_other(
) -> anyhow::Result<()> {
    use common::http::{csrf_token, get, https_request, post, session_cookie};
    let lab = Lab::start(2, 1, 30_000).await?;
    lab.add_user("alice")?;
    lab.activate(&["s1", "s2"])?;
    // Both serving (a client gets in on each).
    login_when_active(&lab, 0, "alice").await?;
    login_when_active(&lab, 1, "alice").await?;
    let http = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], lab.servers[i].ports().http));
    let login = https_request(
        http(0),
        post("/rooms/login", "", "", "user=alice&password=pw"),
    )
    .await?;
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = session_cookie(&login);
    let home = https_request(http(1), get("/rooms", &cookie)).await?;
    assert!(home.starts_with("HTTP/1.1 200"), "{home}");
    assert!(home.contains("alice@localhost"), "logged in on s2: {home}");
    let csrf = csrf_token(&home);
    let out = https_request(
        http(1),
        post("/rooms/logout", &cookie, "", &format!("csrf={csrf}")),
    )
    .await?;
    assert!(out.starts_with("HTTP/1.1 303"), "{out}");
    let after = https_request(http(0), get("/rooms", &cookie)).await?;
    assert!(
        after.contains("name='password'") && !after.contains("name='csrf'"),
        "logged out on s1 too: {after}"
    );
    Ok(())
}

/// Presence ticks name one occupant each and carry its presence (one too large for a
/// notification is read from the database): after a burst of joins and leaves on s2, a
/// joiner on s1 sees exactly who stayed, no ghost and nobody missing. And the room's presence
/// broadcast limit (Lync's ParticipantUpdateLimit) counts the occupants of every server:
/// above it, a participant on s1 is not shown an arrival on s2, while the owner is, and
/// disco#info counts everybody.
#[tokio::test]
async fn remote_presence_is_exact_and_the_broadcast_limit_counts_every_server() -> anyhow::Result<()>
{
    let lab = Lab::start(2, 1, 30_000).await?;
    let burst: Vec<String> = (0..=10).map(|i| format!("b{i}")).collect();
    for u in ["alice", "zed"]
        .iter()
        .copied()
        .chain(burst.iter().map(|s| s.as_str()))
    {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    join(&mut alice, "alice", true).await?;

    // The burst on s2: b0…b9 join, b0…b4 leave at once.
    let mut others = Vec::new();
    for nick in &burst[..10] {
        let mut c = login_when_active(&lab, 1, nick).await?;
        if nick == "b9" {
            // Too large a presence for a notification: s1 reads it from the database.
            let own = format!("{ROOM}/b9");
            c.send(
                &Element::new("presence", ns::CLIENT)
                    .with_attr("to", own.clone())
                    .with_child(Element::new("x", ns::MUC))
                    .with_child(Element::new("status", ns::CLIENT).with_text("z".repeat(8_100))),
            )
            .await?;
            c.recv_until(Duration::from_secs(10), |p| {
                p.attr("from") == Some(own.as_str())
                    && pchat_testkit::status_codes(p).contains(&110)
            })
            .await?;
        } else {
            c.join_room(ROOM, nick, None).await?;
        }
        others.push(c);
    }
    for (c, nick) in others.iter_mut().zip(&burst).take(5) {
        c.leave_room(ROOM, nick).await?;
    }
    // Alice, on s1, is shown all of it.
    let mut arrived = std::collections::BTreeSet::new();
    let mut left = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrived.len() < 10 || left.len() < 5 {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let p = alice
            .recv_until(remaining, |p| p.is("presence", ns::CLIENT))
            .await
            .map_err(|e| anyhow::anyhow!("alice saw {arrived:?} arrive, {left:?} leave: {e:?}"))?;
        let Some(nick) = p.attr("from").and_then(|f| f.split_once('/')).map(|f| f.1) else {
            continue;
        };
        if p.attr("type") == Some("unavailable") {
            left.insert(nick.to_owned());
        } else {
            if nick == "b9" {
                let status = p.child_text("status", ns::CLIENT).unwrap_or_default();
                assert_eq!(status.len(), 8_100, "b9's presence arrives whole");
            }
            arrived.insert(nick.to_owned());
        }
    }
    let mut zed = login_when_active(&lab, 0, "zed").await?;
    let joined = zed.join_room(ROOM, "zed", None).await?;
    let roster: std::collections::BTreeSet<String> = joined
        .presences
        .iter()
        .filter_map(|p| p.attr("from")?.split_once('/').map(|f| f.1.to_owned()))
        .filter(|n| n != "zed")
        .collect();
    let expected: std::collections::BTreeSet<String> = ["alice", "b5", "b6", "b7", "b8", "b9"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(roster, expected, "zed's roster after the burst");

    // Seven occupants (two on s1, five on s2); the owner sets the limit to three.
    let field = |var: &str, value: &str| {
        Element::new("field", ns::DATA_FORMS)
            .with_attr("var", var)
            .with_child(Element::new("value", ns::DATA_FORMS).with_text(value))
    };
    let limit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER).with_child(
                Element::new("x", ns::DATA_FORMS)
                    .with_attr("type", "submit")
                    .with_child(field(
                        "FORM_TYPE",
                        "http://jabber.org/protocol/muc#roomconfig",
                    ))
                    .with_child(field("pchat#presence_broadcast_max", "3")),
            ),
        );
    alice.iq_result(limit, Duration::from_secs(10)).await?;
    let b10 = format!("{ROOM}/b10");
    let mut late = login_when_active(&lab, 1, "b10").await?;
    late.join_room(ROOM, "b10", None).await?;
    alice
        .recv_until(Duration::from_secs(10), |p| {
            p.is("presence", ns::CLIENT) && p.attr("from") == Some(b10.as_str())
        })
        .await
        .map_err(|e| anyhow::anyhow!("the owner is shown b10's arrival: {e:?}"))?;
    let seen = zed.collect_for(Duration::from_secs(1)).await?;
    assert!(
        !seen.iter().any(|p| p.attr("from") == Some(b10.as_str())),
        "above the limit, a participant on s1 is not shown an arrival on s2: {seen:?}"
    );
    let info = zed
        .iq_result(
            Element::new("iq", ns::CLIENT)
                .with_attr("type", "get")
                .with_attr("to", ROOM)
                .with_child(Element::new("query", ns::DISCO_INFO)),
            Duration::from_secs(10),
        )
        .await?;
    let occupants = info
        .child("query", ns::DISCO_INFO)
        .and_then(|q| q.child("x", ns::DATA_FORMS))
        .and_then(|x| {
            x.children_named("field", ns::DATA_FORMS)
                .find(|f| f.attr("var") == Some("muc#roominfo_occupants"))
                .and_then(|f| f.child_text("value", ns::DATA_FORMS))
        });
    assert_eq!(
        occupants.as_deref(),
        Some("8"),
        "disco#info counts every server"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rules hold on every server (issue 11 §5): the owner on s1, the victims on s2.

/// The time on the wall, as XEP-0082 stamps with microseconds (`2026-11-26T09:41:33.123456Z`):
/// fixed width, so they compare as strings.
fn stamp(t: std::time::SystemTime) -> String {
    let micros = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let (secs, frac) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn field(var: &str, value: &str) -> Element {
    Element::new("field", ns::DATA_FORMS)
        .with_attr("var", var)
        .with_child(Element::new("value", ns::DATA_FORMS).with_text(value))
}

/// The owner's configuration form with these fields.
fn room_config(room: &str, fields: &[(&str, &str)]) -> Element {
    let mut x = Element::new("x", ns::DATA_FORMS)
        .with_attr("type", "submit")
        .with_child(field(
            "FORM_TYPE",
            "http://jabber.org/protocol/muc#roomconfig",
        ));
    for (var, value) in fields {
        x = x.with_child(field(var, value));
    }
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(Element::new("query", ns::MUC_OWNER).with_child(x))
}

/// A `muc#admin` set with one item.
fn admin_item(room: &str, item: Element) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(Element::new("query", ns::MUC_ADMIN).with_child(item))
}

/// Creates `room` with `owner` in it, configured with `fields`.
async fn create_room(
    owner: &mut Client,
    room: &str,
    fields: &[(&str, &str)],
) -> anyhow::Result<()> {
    owner.join_room(room, "alice", None).await?;
    owner
        .iq_result(room_config(room, fields), Duration::from_secs(10))
        .await?;
    Ok(())
}

/// Sends `iq` and returns when the result arrived: the acknowledgment of the change.
async fn acked(c: &mut Client, iq: Element) -> anyhow::Result<Instant> {
    c.iq_result(iq, Duration::from_secs(10)).await?;
    Ok(Instant::now())
}

/// Waits for `nick`'s presence in `room` that `want` accepts; returns it and how long after
/// `since` it arrived.
async fn presence_of(
    c: &mut Client,
    room: &str,
    nick: &str,
    since: Instant,
    want: impl Fn(&Element) -> bool,
) -> anyhow::Result<(Element, Duration)> {
    let from = format!("{room}/{nick}");
    let p = c
        .recv_until(Duration::from_secs(10), |p| {
            p.is("presence", ns::CLIENT) && p.attr("from") == Some(from.as_str()) && want(p)
        })
        .await?;
    Ok((p, since.elapsed()))
}

fn unavailable_with(code: u16) -> impl Fn(&Element) -> bool {
    move |p| p.attr("type") == Some("unavailable") && pchat_testkit::status_codes(p).contains(&code)
}

/// The condition of the error a message to the room gets.
async fn message_refused(c: &mut Client, room: &str) -> anyhow::Result<String> {
    match c.send_groupchat(room, "still here?", None).await {
        Err(Error::Stanza { error, .. }) => Ok(error.condition),
        other => anyhow::bail!("expected the message to be refused, got {other:?}"),
    }
}

async fn join_refused(c: &mut Client, room: &str, nick: &str) -> anyhow::Result<String> {
    match c.join_room(room, nick, None).await {
        Err(Error::Stanza { error, .. }) => Ok(error.condition),
        other => anyhow::bail!("expected the join to be refused, got {other:?}"),
    }
}

async fn mam_refused(c: &mut Client, room: &str) -> anyhow::Result<String> {
    match c.mam_query(room, &[], None).await {
        Err(Error::Stanza { error, .. }) => Ok(error.condition),
        other => anyhow::bail!("expected the archive query to be refused, got {other:?}"),
    }
}

/// A ban made on s1 holds on s2 within a second: the victim, flooding the room through s2,
/// is removed with 301 and the reason, cannot write, rejoin or read the archive, and the
/// archive holds no message of hers accepted after the ban was acknowledged. A kick and a
/// voice revocation of occupants of s2, decided on s1, reach them with 307 (actor, reason)
/// and as visitors; making the room moderated silences s2's participants.
#[tokio::test]
async fn a_ban_kick_and_silence_made_on_one_server_hold_on_the_other() -> anyhow::Result<()> {
    const ROOM: &str = "rules@conference.localhost";
    /// Messages the victim sends in one write.
    const FLOOD_BURST: usize = 100;
    /// Messages she sends at most before the test gives up on the ban.
    const FLOOD_MAX: usize = 50_000;
    let lab = Lab::start(2, 1, 30_000).await?;
    for u in ["alice", "mallory", "bob", "carol", "dave"] {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    create_room(&mut alice, ROOM, &[]).await?;
    let mut dave = login_when_active(&lab, 0, "dave").await?;
    dave.join_room(ROOM, "dave", None).await?;
    let mut mallory = login_when_active(&lab, 1, "mallory").await?;
    mallory.join_room(ROOM, "mallory", None).await?;
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    let mut carol = login_when_active(&lab, 1, "carol").await?;
    carol.join_room(ROOM, "carol", None).await?;
    let mallory_jid = format!("{ROOM}/mallory");

    // Mallory floods the room through s2 (bursts of messages, without waiting for their
    // reflections) until she is removed, while alice, once she sees the flood arrive on s1,
    // bans her by JID.
    let flood = async {
        let (mut sent, mut refused) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut burst = String::new();
            for _ in 0..FLOOD_BURST {
                burst.push_str(&format!(
                    "<message to='{ROOM}' type='groupchat' id='flood-{sent}'><body>flood {sent}</body></message>"
                ));
                sent += 1;
            }
            mallory.send_raw(burst.as_bytes()).await?;
            for s in mallory.collect_for(Duration::from_millis(5)).await? {
                if s.attr("type") == Some("error") {
                    // Messages still queued when she was removed are refused one by one.
                    let e = pchat_testkit::StanzaError::from_stanza(&s).expect("an error");
                    assert_eq!(e.condition, "not-acceptable", "{s}");
                    refused += 1;
                } else if s.is("presence", ns::CLIENT)
                    && s.attr("from") == Some(mallory_jid.as_str())
                    && unavailable_with(301)(&s)
                {
                    return anyhow::Ok((sent, refused, s, Instant::now()));
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline && sent < FLOOD_MAX,
                "mallory was not removed after {sent} messages"
            );
        }
    };
    let ban = async {
        let mut seen = 0;
        while seen < 50 {
            alice
                .recv_until(Duration::from_secs(20), |m| {
                    m.is("message", ns::CLIENT) && m.attr("from") == Some(mallory_jid.as_str())
                })
                .await?;
            seen += 1;
        }
        let item = Element::new("item", ns::MUC_ADMIN)
            .with_attr("jid", "mallory@localhost")
            .with_attr("affiliation", "outcast")
            .with_child(Element::new("reason", ns::MUC_ADMIN).with_text("flooding"));
        let at = acked(&mut alice, admin_item(ROOM, item)).await?;
        anyhow::Ok((at, std::time::SystemTime::now()))
    };
    let (flooded, banned) = tokio::join!(flood, ban);
    let (sent, mut refused, p, removed_at) = flooded?;
    let (ban_acked, ban_acked_wall) = banned?;
    let took = removed_at.saturating_duration_since(ban_acked);
    eprintln!("ban on s1 to the victim's 301 on s2, while she floods: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "the ban took {took:?} to reach s2"
    );
    assert_eq!(pchat_testkit::status_codes(&p), [110, 301]);
    assert!(
        p.to_string().contains("flooding"),
        "the reason is shown: {p}"
    );
    let (_, took) = presence_of(
        &mut carol,
        ROOM,
        "mallory",
        ban_acked,
        unavailable_with(301),
    )
    .await?;
    eprintln!("ban on s1 to an observer's 301 on s2: {took:?}");
    // On s1, where the ban was made but mallory was not, she is seen leaving as on s2.
    let (p, took) =
        presence_of(&mut dave, ROOM, "mallory", ban_acked, unavailable_with(301)).await?;
    eprintln!("ban on s1 to mallory's 301 for an observer on s1: {took:?}");
    assert!(
        p.to_string().contains("flooding"),
        "the reason is shown: {p}"
    );
    for s in mallory.collect_for(Duration::from_millis(500)).await? {
        if s.attr("type") == Some("error") {
            refused += 1;
        }
    }
    eprintln!("{refused} of her {sent} messages, still queued at the ban, were refused");
    assert_eq!(message_refused(&mut mallory, ROOM).await?, "not-acceptable");
    assert_eq!(
        join_refused(&mut mallory, ROOM, "mallory").await?,
        "forbidden"
    );
    assert_eq!(mam_refused(&mut mallory, ROOM).await?, "forbidden");

    // Nothing of hers was stored after the ban was acknowledged.
    let acked_stamp = stamp(ban_acked_wall);
    let mut after = None;
    let (mut stored, mut late) = (0, Vec::new());
    loop {
        let page = alice
            .mam_query(
                ROOM,
                &[],
                Some(pchat_testkit::Rsm {
                    max: Some(500),
                    before: None,
                    after: after.clone(),
                }),
            )
            .await?;
        for r in &page.results {
            let m = pchat_testkit::forwarded_message(r).expect("forwarded");
            if m.attr("from") == Some(mallory_jid.as_str()) {
                stored += 1;
                let at = pchat_testkit::delay_stamp(r).unwrap_or_default();
                if at >= acked_stamp {
                    late.push(at);
                }
            }
        }
        if page.complete() || page.ids().is_empty() {
            break;
        }
        after = page.last();
    }
    eprintln!(
        "{stored} of mallory's {sent} messages stored, {} of them after the ban's acknowledgment at {acked_stamp}",
        late.len()
    );
    assert!(
        late.is_empty(),
        "stored after the ban's acknowledgment: {} messages, from {:?} to {:?}",
        late.len(),
        late.first(),
        late.last()
    );
    assert!(stored > 0, "the ban must land mid-flood");

    // A kick of bob (on s2) by alice (on s1): 307 with the actor and the reason.
    let item = Element::new("item", ns::MUC_ADMIN)
        .with_attr("nick", "bob")
        .with_attr("role", "none")
        .with_child(Element::new("reason", ns::MUC_ADMIN).with_text("take a break"));
    let kicked = acked(&mut alice, admin_item(ROOM, item)).await?;
    let (p, took) = presence_of(&mut bob, ROOM, "bob", kicked, unavailable_with(307)).await?;
    eprintln!("kick on s1 to the victim's 307 on s2: {took:?}");
    assert!(took < Duration::from_secs(1), "the kick took {took:?}");
    assert_eq!(pchat_testkit::status_codes(&p), [110, 307]);
    let shown = p.to_string();
    assert!(
        shown.contains("nick='alice'") || shown.contains("nick=\"alice\""),
        "actor: {shown}"
    );
    assert!(shown.contains("take a break"), "reason: {shown}");
    presence_of(&mut carol, ROOM, "bob", kicked, unavailable_with(307)).await?;
    presence_of(&mut dave, ROOM, "bob", kicked, unavailable_with(307)).await?;
    assert_eq!(message_refused(&mut bob, ROOM).await?, "not-acceptable");
    // A kick is no ban.
    bob.join_room(ROOM, "bob", None).await?;

    // Carol's voice revoked from s1: she is a visitor on s2 and may no longer speak.
    let item = Element::new("item", ns::MUC_ADMIN)
        .with_attr("nick", "carol")
        .with_attr("role", "visitor");
    let silenced = acked(&mut alice, admin_item(ROOM, item)).await?;
    let (_, took) = presence_of(&mut carol, ROOM, "carol", silenced, |p| {
        p.to_string().contains("role='visitor'") || p.to_string().contains("role=\"visitor\"")
    })
    .await?;
    eprintln!("voice revoked on s1 to the visitor's presence on s2: {took:?}");
    assert!(took < Duration::from_secs(1));
    assert_eq!(message_refused(&mut carol, ROOM).await?, "forbidden");

    // The room made moderated on s1: bob, a participant without affiliation on s2, loses
    // his voice there too.
    let moderated = acked(
        &mut alice,
        room_config(ROOM, &[("muc#roomconfig_moderatedroom", "1")]),
    )
    .await?;
    let (_, took) = presence_of(&mut bob, ROOM, "bob", moderated, |p| {
        p.to_string().contains("role='visitor'") || p.to_string().contains("role=\"visitor\"")
    })
    .await?;
    eprintln!("room made moderated on s1 to the visitor's presence on s2: {took:?}");
    assert!(took < Duration::from_secs(1));
    bob.recv_until(Duration::from_secs(5), |m| {
        m.is("message", ns::CLIENT) && pchat_testkit::status_codes(m).contains(&104)
    })
    .await?;
    assert_eq!(message_refused(&mut bob, ROOM).await?, "forbidden");
    Ok(())
}

/// Members-only rules made on s1 hold on s2: a member whose membership is revoked is removed
/// with 321 and may neither rejoin nor read the archive; a non-member is removed with 322 when
/// the room becomes members-only. A room destroyed on s1 removes everyone on s2 with the
/// reason and alternate venue, and s2 serves the old room no more.
#[tokio::test]
async fn members_only_and_destruction_made_on_one_server_hold_on_the_other() -> anyhow::Result<()> {
    const CLOSED: &str = "closed@conference.localhost";
    const OPEN: &str = "open@conference.localhost";
    let lab = Lab::start(2, 1, 30_000).await?;
    for u in ["alice", "bob", "carol", "erin"] {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    create_room(&mut alice, CLOSED, &[("muc#roomconfig_membersonly", "1")]).await?;
    for member in ["bob@localhost", "carol@localhost"] {
        let item = Element::new("item", ns::MUC_ADMIN)
            .with_attr("jid", member)
            .with_attr("affiliation", "member");
        acked(&mut alice, admin_item(CLOSED, item)).await?;
    }
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    bob.join_room(CLOSED, "bob", None).await?;
    let mut carol = login_when_active(&lab, 1, "carol").await?;
    carol.join_room(CLOSED, "carol", None).await?;
    alice.send_groupchat(CLOSED, "members only", None).await?;
    carol
        .recv_until(Duration::from_secs(10), |m| {
            m.body().as_deref() == Some("members only")
        })
        .await?;

    let item = Element::new("item", ns::MUC_ADMIN)
        .with_attr("jid", "bob@localhost")
        .with_attr("affiliation", "none");
    let revoked = acked(&mut alice, admin_item(CLOSED, item)).await?;
    let (p, took) = presence_of(&mut bob, CLOSED, "bob", revoked, unavailable_with(321)).await?;
    eprintln!("membership revoked on s1 to the victim's 321 on s2: {took:?}");
    assert!(took < Duration::from_secs(1));
    assert_eq!(pchat_testkit::status_codes(&p), [110, 321]);
    presence_of(&mut carol, CLOSED, "bob", revoked, unavailable_with(321)).await?;
    presence_of(&mut alice, CLOSED, "bob", revoked, unavailable_with(321)).await?;
    // A members-only room does not talk to outsiders (it answers as if it did not exist).
    assert_eq!(message_refused(&mut bob, CLOSED).await?, "item-not-found");
    assert_eq!(
        join_refused(&mut bob, CLOSED, "bob").await?,
        "registration-required"
    );
    assert_eq!(mam_refused(&mut bob, CLOSED).await?, "forbidden");
    // Carol, still a member, still reads it.
    assert_eq!(
        carol.mam_query(CLOSED, &[], None).await?.bodies(),
        ["members only"]
    );

    // An open room made members-only on s1: erin, no member, leaves s2 with 322.
    create_room(&mut alice, OPEN, &[]).await?;
    let mut erin = login_when_active(&lab, 1, "erin").await?;
    erin.join_room(OPEN, "erin", None).await?;
    let closed = acked(
        &mut alice,
        room_config(OPEN, &[("muc#roomconfig_membersonly", "1")]),
    )
    .await?;
    let (p, took) = presence_of(&mut erin, OPEN, "erin", closed, unavailable_with(322)).await?;
    eprintln!("room made members-only on s1 to the non-member's 322 on s2: {took:?}");
    assert!(took < Duration::from_secs(1));
    assert_eq!(pchat_testkit::status_codes(&p), [110, 322]);
    assert_eq!(
        join_refused(&mut erin, OPEN, "erin").await?,
        "registration-required"
    );

    // Destroyed on s1 with a reason and an alternate venue.
    let destroy = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", CLOSED)
        .with_child(
            Element::new("query", ns::MUC_OWNER).with_child(
                Element::new("destroy", ns::MUC_OWNER)
                    .with_attr("jid", "next@conference.localhost")
                    .with_child(Element::new("reason", ns::MUC_OWNER).with_text("moved on")),
            ),
        );
    let destroyed = acked(&mut alice, destroy).await?;
    let (p, took) = presence_of(&mut carol, CLOSED, "carol", destroyed, |p| {
        p.attr("type") == Some("unavailable")
    })
    .await?;
    eprintln!("room destroyed on s1 to the occupant's unavailable on s2: {took:?}");
    assert!(took < Duration::from_secs(1));
    let d = p
        .child("x", ns::MUC_USER)
        .and_then(|x| x.child("destroy", ns::MUC_USER))
        .unwrap_or_else(|| panic!("no <destroy/> in {p}"));
    assert_eq!(d.attr("jid"), Some("next@conference.localhost"));
    assert_eq!(
        d.child_text("reason", ns::MUC_USER).as_deref(),
        Some("moved on")
    );
    // s2 does not serve the old room: a message finds no room, and whoever enters creates a
    // new one (locked, 201), not the old one with its members and archive.
    assert_eq!(message_refused(&mut carol, CLOSED).await?, "item-not-found");
    let joined = carol.join_room(CLOSED, "carol", None).await?;
    assert!(joined.self_status_codes().contains(&201), "a new room");
    assert!(joined.history.is_empty());
    Ok(())
}

/// A commit on s1 whose connection is lost after COMMIT was sent (`PCHAT_FAULT`): the room
/// tries again with the same writes and the message, sent without origin-id, is stored once
/// with one id, reflected once, and reaches the occupant on s2 once.
#[tokio::test]
async fn a_commit_with_an_unknown_outcome_stores_the_message_once() -> anyhow::Result<()> {
    const ROOM: &str = "once@conference.localhost";
    let lab = Lab::start_with_env(2, 1, 30_000, |i| {
        if i == 0 {
            vec![("PCHAT_FAULT".into(), "lose-first-commit-reply".into())]
        } else {
            Vec::new()
        }
    })
    .await?;
    lab.add_user("alice")?;
    lab.add_user("bob")?;
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    create_room(&mut alice, ROOM, &[]).await?;
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    bob.join_room(ROOM, "bob", None).await?;
    // No origin-id: only the server's idempotency key can tell the retry from a new message.
    let m = Element::new("message", ns::CLIENT)
        .with_attr("to", ROOM)
        .with_attr("type", "groupchat")
        .with_attr("id", "lost-reply")
        .with_child(Element::new("body", ns::CLIENT).with_text("only once"));
    alice.send(&m).await?;
    let reflected = alice
        .recv_until(Duration::from_secs(10), |s| {
            s.attr("id") == Some("lost-reply")
        })
        .await?;
    assert_eq!(reflected.attr("type"), Some("groupchat"), "{reflected}");
    assert_eq!(stanza_id(&reflected, ROOM).as_deref(), Some("1"));
    let ack = alice.send_groupchat(ROOM, "next", None).await?;
    assert_eq!(
        stanza_id(&ack, ROOM).as_deref(),
        Some("2"),
        "no second copy"
    );
    assert_eq!(
        alice.mam_query(ROOM, &[], None).await?.bodies(),
        ["only once", "next"]
    );
    let seen = bob.collect_for(Duration::from_millis(500)).await?;
    let copies = seen
        .iter()
        .filter(|s| s.body().as_deref() == Some("only once"))
        .count();
    assert_eq!(copies, 1, "bob on s2 got it once: {seen:?}");
    let other = alice.collect_for(Duration::from_millis(200)).await?;
    assert!(
        !other
            .iter()
            .any(|s| s.body().as_deref() == Some("only once")),
        "alice got no second reflection: {other:?}"
    );
    Ok(())
}

/// psql as `pchat_server` over TLS verified against `name` (the pool's CA from the lab's
/// PKI), dialling `port` on 127.0.0.1; whether it logged in.
fn server_role_login(lab: &Lab, name: &str, port: u16, password: &str) -> bool {
    Command::new(std::path::Path::new(common::pg::PG_BIN).join("psql"))
        .args(["-X", "-A", "-t", "-w", "-c", "SELECT 1"])
        .arg(format!(
            "host={name} hostaddr=127.0.0.1 port={port} user=pchat_server dbname=mgc \
             sslmode=verify-full sslrootcert={}",
            lab.secure.pki().join("ca.crt").display()
        ))
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn server_password(lab: &Lab) -> anyhow::Result<String> {
    // As the operator: the secret is readable by servers and operators only.
    let etcd = pchat_control::EtcdAccess {
        endpoints: lab.secure.endpoints(),
        tls_dir: Some(lab.secure.operator_dir()),
        hint: "the tests' operator",
    }
    .connect(Some("pc1"))?;
    let rt = tokio::runtime::Handle::current();
    let pw = tokio::task::block_in_place(|| {
        rt.block_on(pchat_control::postgres::read_password(
            &etcd,
            "pc1",
            pchat_control::postgres::PgRole::Server,
        ))
    })?;
    pw.ok_or_else(|| anyhow::anyhow!("no server password in etcd"))
}

/// The servers' role's password is rotated while a server serves: the client's session goes
/// on, sessions PostgreSQL ends afterwards are opened again with the new password (read from
/// etcd), and the old password no longer logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_password_rotates_while_the_pool_serves() -> anyhow::Result<()> {
    let lab = Lab::start(1, 1, 30_000).await?;
    lab.add_user("alice")?;
    lab.activate(&["s1"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    join(&mut alice, "alice", true).await?;
    alice.send_groupchat(ROOM, "before", Some("r-1")).await?;
    let old = server_password(&lab)?;
    assert!(server_role_login(
        &lab,
        "a_db.pc1.pchat",
        lab.pg.pg_port,
        &old
    ));

    lab.pchat(&[
        "--in-pool",
        "pc1",
        "db",
        "rotate-password",
        "--role",
        "server",
    ])?;
    let new = server_password(&lab)?;
    assert_ne!(old, new, "a new password in etcd");
    assert!(!server_role_login(
        &lab,
        "a_db.pc1.pchat",
        lab.pg.pg_port,
        &old
    ));
    assert!(server_role_login(
        &lab,
        "a_db.pc1.pchat",
        lab.pg.pg_port,
        &new
    ));
    // Open sessions are not affected.
    alice.send_groupchat(ROOM, "during", Some("r-2")).await?;

    // Every server session ends (a PostgreSQL restart, a network cut): the store opens new
    // ones, which must use the new password.
    lab.pg.psql(
        "postgres",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'pchat_server'",
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ack = loop {
        match alice.send_groupchat(ROOM, "after", Some("r-3")).await {
            Ok(a) => break a,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(stanza_id(&ack, ROOM).as_deref(), Some("3"));
    let logins = lab.pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pchat_server' AND datname = 'mgc'",
    )?;
    assert_ne!(logins, "0", "the server is connected again");
    let page = alice.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.bodies(), ["before", "during", "after"]);
    Ok(())
}

/// etcd points the pool's servers at another instance's address (a rogue topology: site A's
/// database `a_db` at `b_db`'s port). `b_db` is a real instance of the pool, with the
/// servers' role and password, so only the name pinned for `a_db` can stop the server — and
/// it does: the server never logs in there (its password never reaches it) and serves no
/// one until the topology is right again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refuses_an_instance_that_is_not_the_one_named() -> anyhow::Result<()> {
    let lab = Lab::start(1, 1, 30_000).await?;
    lab.add_user("alice")?;
    let b = AgentProcess::start(
        lab.dir.path(),
        "b_db",
        "pc1",
        &lab.secure.endpoints(),
        &lab.secure.instance_dir("b_db"),
    )?;
    b.wait_up(&lab.secure.operator_dir()).await?;
    let good = std::fs::read_to_string(&lab.topology)?;
    // Each topology also gets its etcd users (the instance it names must reach etcd).
    let publish = |text: String| async {
        let f = lab.dir.path().join("topology-now.toml");
        std::fs::write(&f, text)?;
        lab.secure.setup(&bin(), &f).await?;
        lab.pchat(&["topology", "publish", &f.to_string_lossy()])?;
        anyhow::Ok(())
    };
    // b_db made an instance of the pool like a_db: the servers' role, the same password.
    publish(
        good.replace("\"a_db\"", "\"b_db\"")
            .replace(&lab.pg.address(), &b.address())
            .replace(&lab.pg.agent_url, &b.agent_url),
    )
    .await?;
    lab.pchat(&["--in-pool", "pc1", "db", "install"])?;
    let password = server_password(&lab)?;
    assert!(
        server_role_login(&lab, "b_db.pc1.pchat", b.pg_port, &password),
        "b_db would let the server in"
    );
    // The rogue topology: a_db's name, b_db's address.
    publish(good.replace(&lab.pg.address(), &b.address())).await?;
    lab.activate(&["s1"])?;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert!(
            lab.servers[0]
                .client("alice@localhost", "pw")
                .await
                .is_err(),
            "the server served from an instance that is not a_db"
        );
        let there = b.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pchat_server'",
        )?;
        assert_eq!(there, "0", "the server logged in to b_db");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let logs = lab.servers[0].log_tails();
    assert!(
        logs.contains("not valid for name"),
        "the server says why (the certificate is b_db's): {logs}"
    );
    // Back to the truth: it serves.
    publish(good.clone()).await?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    join(&mut alice, "alice", true).await?;
    Ok(())
}

/// A wall made from the shell holds on every server of the pool: a user the trading category
/// denies finds no room there on either server, an occupant on the other server whose group
/// is walled off leaves at once, a message removed from the shell is retracted on both
/// servers, and a room disabled from the shell empties on both servers.
#[tokio::test]
async fn a_wall_made_from_the_shell_holds_on_every_server() -> anyhow::Result<()> {
    let lab = Lab::start(2, 1, 3000).await?;
    for u in ["ann", "tom", "ana", "bob"] {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2"])?;
    let pool = |args: &[&str]| {
        let mut all = vec!["--in-pool", "pc1"];
        all.extend_from_slice(args);
        lab.pchat(&all)
    };
    pool(&["group", "new", "analysts", "--member", "ana@localhost"])?;
    pool(&[
        "category",
        "new",
        "trading",
        "--add-allowed",
        "@localhost",
        "--add-denied",
        "group:analysts",
    ])?;
    pool(&[
        "room",
        "new",
        "desk",
        "--category",
        "trading",
        "--privacy",
        "open",
        "--manager",
        "ann@localhost",
    ])?;
    let desk = "desk@conference.localhost";
    let mut ann = login_when_active(&lab, 0, "ann").await?;
    ann.join_room(desk, "ann", None).await?;
    let mut tom = login_when_active(&lab, 1, "tom").await?;
    tom.join_room(desk, "tom", None).await?;
    for i in [0, 1] {
        let mut ana = login_when_active(&lab, i, "ana").await?;
        let e = ana.join_room(desk, "ana", None).await.unwrap_err();
        assert!(format!("{e}").contains("item-not-found"), "s{}: {e}", i + 1);
        ana.close().await?;
    }

    let t0 = Instant::now();
    pool(&["group", "add", "analysts", "tom@localhost"])?;
    let codes = removed(&mut tom).await?;
    let took = t0.elapsed();
    eprintln!("wall change in the shell to the occupant's 321 on s2: {took:?}");
    assert!(codes.contains(&321), "{codes:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A message removed from the shell: occupants on both servers are told (XEP-0425), and
    // the archive keeps only the tombstone.
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    bob.join_room(desk, "bob", None).await?;
    // A chat state (no body) crosses to the other server, unarchived.
    ann.send(
        &Element::new("message", ns::CLIENT)
            .with_attr("to", desk)
            .with_attr("type", "groupchat")
            .with_child(Element::new(
                "composing",
                "http://jabber.org/protocol/chatstates",
            )),
    )
    .await?;
    let state = bob
        .recv_until(Duration::from_secs(10), |s| {
            s.child("composing", "http://jabber.org/protocol/chatstates")
                .is_some()
        })
        .await?;
    assert_eq!(state.attr("from"), Some("desk@conference.localhost/ann"));
    let ack = ann.send_groupchat(desk, "sell everything", None).await?;
    let id = stanza_id(&ack, desk).expect("a stanza-id");
    pool(&["message", "remove", "desk", &id, "--reason", "not advice"])?;
    for c in [&mut ann, &mut bob] {
        c.recv_until(Duration::from_secs(10), |s| {
            s.child("retract", "urn:xmpp:message-retract:1")
                .is_some_and(|r| r.attr("id") == Some(id.as_str()))
        })
        .await?;
    }
    let page = bob.mam_query(desk, &[], None).await?;
    assert!(page.bodies().is_empty(), "{:?}", page.bodies());

    // A service setting from the shell reaches both servers without a restart: the next
    // join on s2 gets DefaultChatHistory messages.
    for i in 0..4 {
        ann.send_groupchat(desk, &format!("h{i}"), None).await?;
    }
    pool(&["config", "set", "DefaultChatHistory", "2"])?;
    let t0 = Instant::now();
    loop {
        bob.leave_room(desk, "bob").await?;
        let n = bob.join_room(desk, "bob", None).await?.history.len();
        if n == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "history {n} after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "DefaultChatHistory from the shell to a join on s2: {:?}",
        t0.elapsed()
    );
    // In a pool the setting lives in etcd (the issue's rule), where the shell shows it from.
    let shown = pool(&["--json", "config", "get"])?;
    assert!(
        shown.contains("\"value\":\"2\"") && shown.contains("pchat config (etcd)"),
        "{shown}"
    );
    let etcd = pchat_control::EtcdAccess {
        endpoints: lab.secure.endpoints(),
        tls_dir: Some(lab.secure.operator_dir()),
        hint: "the tests' operator",
    }
    .connect(Some("pc1"))?;
    let kv = etcd
        .get(&pchat_control::keys::settings("pc1"))
        .await?
        .expect("the settings key");
    let stored: serde_json::Value = serde_json::from_slice(&kv.value)?;
    assert_eq!(stored["default_chat_history"], 2, "{stored}");

    // The compliance adapter over the pool's PostgreSQL, under the pool's etcd lease: Lync's
    // XML, valid against its schema, with the messages and the removal recorded.
    let out = tempfile::tempdir()?;
    let report: serde_json::Value = serde_json::from_str(&pool(&[
        "--json",
        "compliance",
        "export",
        "--to",
        out.path().to_str().unwrap(),
        "--once",
    ])?)?;
    let file = report["files"][0].as_str().expect("a file").to_owned();
    let lint = Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations/compliance.xsd"))
        .arg(&file)
        .output()?;
    assert!(lint.status.success(), "{lint:?}");
    let text = std::fs::read_to_string(&file)?;
    for want in [
        "type=\"CHAT\" content=\"sell everything\"",
        "type=\"CHATDELETION\"",
        "type=\"JOIN\"",
    ] {
        assert!(text.contains(want), "{want} not in the export");
    }
    let again = pool(&[
        "compliance",
        "export",
        "--to",
        out.path().to_str().unwrap(),
        "--once",
    ])?;
    assert!(again.contains("records"), "the run's own record: {again}");
    // After a DR failover the database's watermark is behind the one the pool published:
    // the run resumes from the database's (no gap) and names the window it may export twice.
    etcd.put(
        &pchat_control::keys::compliance_exported("pc1"),
        br#"{"watermark":1000000,"at":"before the failover"}"#,
    )
    .await?;
    ann.send_groupchat(desk, "after the failover", None).await?;
    let report: serde_json::Value = serde_json::from_str(&pool(&[
        "--json",
        "compliance",
        "export",
        "--to",
        out.path().to_str().unwrap(),
        "--once",
    ])?)?;
    assert_eq!(report["reexport_window"][1], 1000000, "{report}");
    assert!(
        report["reexport_window"][0].as_i64().unwrap() < report["from"].as_i64().unwrap(),
        "{report}"
    );

    // The pool's own export job, set once in etcd (no pchat.toml touched, no restart): one
    // server of the pool exports, every run_interval_s.
    let job_out = tempfile::tempdir()?;
    let job_dir = job_out.path().to_str().unwrap().to_owned();
    pool(&[
        "compliance",
        "configure",
        "--export-dir",
        &job_dir,
        "--run-interval-s",
        "1",
        "--format",
        "jsonl",
    ])?;
    let shown: serde_json::Value =
        serde_json::from_str(&pool(&["--json", "compliance", "configure"])?)?;
    assert_eq!(shown["settings"]["format"], "jsonl", "{shown}");
    ann.send_groupchat(desk, "for the pool's job", None).await?;
    let deadline = Instant::now() + Duration::from_secs(40);
    // The message, then the server's own run record (in its next run's file).
    loop {
        let mut all = String::new();
        for entry in std::fs::read_dir(job_out.path())? {
            all.push_str(&std::fs::read_to_string(entry?.path())?);
        }
        if all.contains("for the pool's job") && all.contains("\"server s") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no server exported within 40 s of `compliance configure`: {all}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let bad = Command::new(bin())
        .args([
            "--in-pool",
            "pc1",
            "compliance",
            "configure",
            "--export-dir",
            "relative/dir",
        ])
        .envs(lab.secure.env())
        .output()?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("absolute"),
        "{bad:?}"
    );
    pool(&["compliance", "configure", "--off"])?;

    pool(&["room", "disable", "desk"])?;
    let codes = removed(&mut ann).await?;
    assert!(codes.contains(&321), "{codes:?}");
    let mut ann2 = login_when_active(&lab, 1, "ann").await?;
    let e = ann2.join_room(desk, "ann", None).await.unwrap_err();
    assert!(format!("{e}").contains("item-not-found"), "{e}");
    Ok(())
}

/// Waits for this client's own unavailable presence (status 110) and returns its codes.
async fn removed(c: &mut Client) -> anyhow::Result<Vec<u16>> {
    let p = c
        .recv_until(Duration::from_secs(10), |s| {
            s.is("presence", ns::CLIENT)
                && s.attr("type") == Some("unavailable")
                && pchat_testkit::status_codes(s).contains(&110)
        })
        .await?;
    Ok(pchat_testkit::status_codes(&p))
}

/// The LDAP directory in a pool: each server reads it; a wall naming a directory group holds
/// on both, and a user taken out of the group in LDAP is removed on the server he is on
/// within one refresh.
#[tokio::test]
async fn a_directory_group_wall_holds_on_every_server_and_follows_ldap() -> anyhow::Result<()> {
    use pchat_testkit::ldap::{Group, Slapd, Tree, User, BASE, SERVICE_DN, SERVICE_PASSWORD};
    let user = |uid: &str| User {
        uid: uid.into(),
        password: "x".into(),
        ous: Vec::new(),
    };
    let ldap = Slapd::start(Tree {
        users: vec![user("ann"), user("tom"), user("ana")],
        groups: vec![Group {
            cn: "traders".into(),
            members: vec!["user:ann".into(), "user:tom".into()],
        }],
    })?;
    let pw_dir = tempfile::tempdir()?;
    let pw = pw_dir.path().join("bind.pw");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&pw)?
            .write_all(SERVICE_PASSWORD.as_bytes())?;
    }
    let toml = format!(
        "[directory]\nurl = \"{}\"\nca_file = \"{}\"\nbind_dn = \"{SERVICE_DN}\"\n\
         bind_password_file = \"{}\"\nbase_dn = \"{BASE}\"\nrefresh_s = 5\n",
        ldap.ldaps_url(),
        ldap.ca_file().display(),
        pw.display()
    );
    let lab = Lab::start_with_toml(2, &toml).await?;
    for u in ["ann", "tom", "ana"] {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2"])?;
    let pool = |args: &[&str]| {
        let mut all = vec!["--in-pool", "pc1"];
        all.extend_from_slice(args);
        lab.pchat(&all)
    };
    pool(&[
        "category",
        "new",
        "trading",
        "--add-allowed",
        "ldap:traders",
    ])?;
    pool(&[
        "room",
        "new",
        "desk",
        "--category",
        "trading",
        "--privacy",
        "open",
    ])?;
    let desk = "desk@conference.localhost";
    // Joins wait for each server's first reading of the directory.
    async fn join_when_read(c: &mut Client, room: &str, nick: &str) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            match c.join_room(room, nick, None).await {
                Err(e)
                    if e.to_string().contains("internal-server-error")
                        && Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                r => return r.map(|_| ()).map_err(Into::into),
            }
        }
    }
    let mut ann = login_when_active(&lab, 0, "ann").await?;
    join_when_read(&mut ann, desk, "ann").await?;
    let mut tom = login_when_active(&lab, 1, "tom").await?;
    join_when_read(&mut tom, desk, "tom").await?;
    for i in [0, 1] {
        let mut ana = login_when_active(&lab, i, "ana").await?;
        let e = join_when_read(&mut ana, desk, "ana").await.unwrap_err();
        assert!(e.to_string().contains("item-not-found"), "s{}: {e}", i + 1);
    }
    let t0 = Instant::now();
    ldap.remove_member("traders", "user:tom")?;
    let codes = removed(&mut tom)
        .await
        .map_err(|e| anyhow::anyhow!("{e} after {:?}", t0.elapsed()))?;
    assert!(codes.contains(&321), "{codes:?}");
    eprintln!("LDAP change to the 321 on s2: {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    // ann, on s1, stays.
    ann.send_groupchat(desk, "still in", None).await?;
    Ok(())
}

/// A file shared on one server is served by the other to the room's members only, and a
/// membership revoked on the first holds for downloads on the second at once.
#[tokio::test]
async fn a_file_shared_on_one_server_follows_the_rooms_rules_on_the_other() -> anyhow::Result<()> {
    const CLOSED: &str = "files@conference.localhost";
    const HTTP_UPLOAD: &str = "urn:xmpp:http:upload:0";
    let lab = Lab::start(2, 1, 30_000).await?;
    for u in ["alice", "bob", "erin"] {
        lab.add_user(u)?;
    }
    lab.activate(&["s1", "s2"])?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    create_room(&mut alice, CLOSED, &[("muc#roomconfig_membersonly", "1")]).await?;
    let member = Element::new("item", ns::MUC_ADMIN)
        .with_attr("jid", "bob@localhost")
        .with_attr("affiliation", "member");
    acked(&mut alice, admin_item(CLOSED, member)).await?;

    // Alice uploads through s1 and posts the link.
    let request = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", "upload.localhost")
        .with_child(
            Element::new("request", HTTP_UPLOAD)
                .with_attr("filename", "plan.txt")
                .with_attr("size", "12")
                .with_attr("content-type", "text/plain"),
        );
    let slot = alice.iq_result(request, Duration::from_secs(10)).await?;
    let url = |n: &str| {
        slot.child("slot", HTTP_UPLOAD)
            .and_then(|s| s.child(n, HTTP_UPLOAD))
            .and_then(|e| e.attr("url"))
            .unwrap_or_default()
            .to_owned()
    };
    let (put, get) = (url("put"), url("get"));
    let body = lab.dir.path().join("plan.txt");
    std::fs::write(&body, b"the plan v1\n")?;
    let ca1 = lab.servers[0].data_dir().join("tls/cert.pem");
    let ca2 = lab.servers[1].data_dir().join("tls/cert.pem");
    let r = http_fetch(
        &ca1,
        &put,
        None,
        &[
            "--method",
            "PUT",
            "--body-file",
            body.to_str().unwrap_or_default(),
            "--content-type",
            "text/plain",
        ],
    )?;
    assert_eq!(r["status"], 201, "{r}");
    alice.send_groupchat(CLOSED, &get, None).await?;

    // The same link on s2's HTTP port.
    let s1_port = format!(":{}/", lab.servers[0].ports().http);
    let s2_port = format!(":{}/", lab.servers[1].ports().http);
    let on_s2 = get.replacen(&s1_port, &s2_port, 1);
    assert_ne!(on_s2, get, "{get}");
    let r = http_fetch(&ca2, &on_s2, Some(("bob@localhost", "pw")), &[])?;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["text"], "the plan v1\n");
    let r = http_fetch(&ca2, &on_s2, Some(("erin@localhost", "pw")), &[])?;
    assert_eq!(r["status"], 403, "{r}");
    let r = http_fetch(&ca2, &on_s2, None, &[])?;
    assert_eq!(r["status"], 401, "{r}");

    // Bob's membership revoked on s1: s2 refuses him the file from then on.
    let revoke = Element::new("item", ns::MUC_ADMIN)
        .with_attr("jid", "bob@localhost")
        .with_attr("affiliation", "none");
    acked(&mut alice, admin_item(CLOSED, revoke)).await?;
    let r = http_fetch(&ca2, &on_s2, Some(("bob@localhost", "pw")), &[])?;
    assert_eq!(r["status"], 403, "{r}");
    Ok(())
}
