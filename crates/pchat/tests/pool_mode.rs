//! Pool mode with real components: a PostgreSQL instance owned by its `pchat agent`, an etcd
//! cluster and several `pchat serve` processes. Checks I6 (idle servers take no session and
//! hold no database connection) from the clients' side and from `pg_stat_activity`, that the
//! pool's data is shared, that one room has one order across servers, that faults lose
//! nothing acknowledged, and the database's security from the servers' side: TLS to the
//! instance the topology names (and no other), the servers' role with a password that can be
//! rotated while the pool serves.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{AgentProcess, LabPki};
use pchat_testkit::etcd::EtcdCluster;
use pchat_testkit::{ns, stanza_id, Client, Element, Error, ServerOptions, TestServer};

const ROOM: &str = "shared@conference.localhost";
const TOKEN: &str = "pool-mode-token-0123456789abcdef";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// A pool `pc1` with one site: PostgreSQL (with TLS and passwords, owned by its agent), etcd
/// and servers `s1`…`sN`, all idle at first.
struct Lab {
    // Servers first: they stop before the database does.
    servers: Vec<TestServer>,
    pg: AgentProcess,
    _etcd: EtcdCluster,
    etcd: String,
    operator: PathBuf,
    topology: PathBuf,
    pki: LabPki,
    dir: tempfile::TempDir,
}

impl Lab {
    async fn start(
        servers: usize,
        etcd_members: usize,
        drain_timeout_ms: u64,
    ) -> anyhow::Result<Lab> {
        let dir = tempfile::Builder::new().prefix("pchat-pool-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let pki = LabPki::new(&dir.path().join("pki"), "pc1")?;
        let cluster = EtcdCluster::start(etcd_members).await?;
        let etcd = cluster.endpoints().join(",");
        let pg = AgentProcess::start(
            dir.path(),
            "a_db",
            "pc1",
            &cluster.endpoints(),
            TOKEN,
            &pki.instance("a_db")?,
        )?;
        let mut started = Vec::new();
        for i in 1..=servers {
            let extra_args = [
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
            let tls_dir = pki.server(&format!("s{i}"))?;
            started.push(
                TestServer::start(
                    &bin(),
                    ServerOptions {
                        extra_args,
                        env: vec![("PCHAT_TLS_DIR".into(), tls_dir.display().to_string())],
                        ..ServerOptions::default()
                    },
                )
                .await?,
            );
        }
        pg.wait_up(TOKEN).await?;
        let eps = cluster
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut topo = format!(
            "insecure = true\nshare = \"/tmp/pchat-share\"\netcd = [{eps}]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
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
        let lab = Lab {
            operator: pki.operator("root")?,
            pg,
            _etcd: cluster,
            etcd,
            servers: started,
            topology: file.clone(),
            pki,
            dir,
        };
        lab.pchat(&["topology", "publish", &file.to_string_lossy()])?;
        lab.pchat(&["--in-pool", "pc1", "db", "install"])?;
        Ok(lab)
    }

    fn pchat(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin())
            .args(args)
            .env("PCHAT_ETCD", &self.etcd)
            .env("PCHAT_AGENT_TOKEN", TOKEN)
            .env("PCHAT_TLS_DIR", &self.operator)
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
    join(&mut alice, "alice", true).await?;
    let mut bob = login_when_active(&lab, 1, "bob").await?;
    let joined = bob.join_room(ROOM, "bob", None).await?;
    let alice_jid = format!("{ROOM}/alice");
    assert!(
        joined
            .presences
            .iter()
            .any(|p| p.attr("from") == Some(alice_jid.as_str())),
        "bob sees alice, who is on the other server: {:?}",
        joined
            .presences
            .iter()
            .map(|p| p.attr("from"))
            .collect::<Vec<_>>()
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

/// psql as `pchat_server` over TLS verified against `name` (the pool's CA from the lab's
/// PKI), dialling `port` on 127.0.0.1; whether it logged in.
fn server_role_login(lab: &Lab, name: &str, port: u16, password: &str) -> bool {
    Command::new(std::path::Path::new(common::pg::PG_BIN).join("psql"))
        .args(["-X", "-A", "-t", "-w", "-c", "SELECT 1"])
        .arg(format!(
            "host={name} hostaddr=127.0.0.1 port={port} user=pchat_server dbname=mgc \
             sslmode=verify-full sslrootcert={}",
            lab.dir.path().join("pki/ca.crt").display()
        ))
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn server_password(lab: &Lab) -> anyhow::Result<String> {
    let etcd = pchat_control::Etcd::new(std::slice::from_ref(&lab.etcd));
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
        std::slice::from_ref(&lab.etcd),
        TOKEN,
        &lab.pki.instance("b_db")?,
    )?;
    b.wait_up(TOKEN).await?;
    let good = std::fs::read_to_string(&lab.topology)?;
    let publish = |text: &str| -> anyhow::Result<()> {
        let f = lab.dir.path().join("topology-now.toml");
        std::fs::write(&f, text)?;
        lab.pchat(&["topology", "publish", &f.to_string_lossy()])?;
        Ok(())
    };
    // b_db made an instance of the pool like a_db: the servers' role, the same password.
    publish(
        &good
            .replace("\"a_db\"", "\"b_db\"")
            .replace(&lab.pg.address(), &b.address())
            .replace(&lab.pg.agent_url, &b.agent_url),
    )?;
    lab.pchat(&["--in-pool", "pc1", "db", "install"])?;
    let password = server_password(&lab)?;
    assert!(
        server_role_login(&lab, "b_db.pc1.pchat", b.pg_port, &password),
        "b_db would let the server in"
    );
    // The rogue topology: a_db's name, b_db's address.
    publish(&good.replace(&lab.pg.address(), &b.address()))?;
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
    publish(&good)?;
    let mut alice = login_when_active(&lab, 0, "alice").await?;
    join(&mut alice, "alice", true).await?;
    Ok(())
}
