//! Pool mode with real components: a PostgreSQL cluster, a 3-member etcd and two `pchat serve`
//! processes. Checks I6 (idle servers take no session and hold no database connection) from
//! the clients' side and from `pg_stat_activity`, and that the pool's data is shared.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pchat_testkit::etcd::EtcdCluster;
use pchat_testkit::postgres::PgCluster;
use pchat_testkit::{ns, stanza_id, Client, Element, Error, ServerOptions, TestServer};

const ROOM: &str = "shared@conference.localhost";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn pchat(args: &[&str], etcd: &str) -> anyhow::Result<String> {
    let out = Command::new(bin())
        .args(args)
        .env("PCHAT_ETCD", etcd)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pchat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn topology(etcd: &[String], pg_port: u16, s1: &TestServer, s2: &TestServer) -> String {
    let eps = etcd
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "share = \"/tmp/pchat-share\"\netcd = [{eps}]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
         [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ address = \"127.0.0.1:{pg_port}\", agent = \"http://127.0.0.1:1\" }}\n\
         [[servers]]\nname = \"s1\"\nsite = \"A\"\naddress = \"{}\"\n\
         [[servers]]\nname = \"s2\"\nsite = \"A\"\naddress = \"{}\"\n",
        s1.c2s_addr(),
        s2.c2s_addr()
    )
}

/// Connections from anyone to mgc and mgccomp.
fn db_connections(pg: &PgCluster) -> anyhow::Result<u32> {
    let out = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('mgc', 'mgccomp')",
    )?;
    Ok(out
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or(u32::MAX))
}

/// Logs in, retrying while the server is still idle (it polls the pool state).
async fn login_when_active(s: &TestServer) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match s.client("alice@localhost", "pw").await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn refusal(err: &pchat_testkit::HarnessError) -> String {
    format!("{err:?}")
}

#[tokio::test]
async fn idle_servers_hold_nothing_and_the_pool_shares_its_data() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    pg.create_database("mgc")?;
    pg.create_database("mgccomp")?;
    let cluster = EtcdCluster::start(3).await?;
    let etcd = cluster.endpoints().join(",");
    let pool_args = |name: &str| -> Vec<String> {
        [
            "--topology-from-etcd",
            &etcd,
            "--pool",
            "pc1",
            "--server",
            name,
            "--pool-poll-ms",
            "100",
            "--drain-timeout-ms",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let opts = |name: &str| ServerOptions {
        extra_args: pool_args(name),
        ..ServerOptions::default()
    };
    let s1 = TestServer::start(&bin(), opts("s1")).await?;
    let s2 = TestServer::start(&bin(), opts("s2")).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, topology(&cluster.endpoints(), pg.port(), &s1, &s2))?;
    let file = file.to_string_lossy().to_string();
    pchat(&["topology", "publish", &file], &etcd)?;
    pchat(&["--in-pool", "pc1", "db", "install"], &etcd)?;
    pchat(
        &[
            "--in-pool",
            "pc1",
            "user",
            "add",
            "alice@localhost",
            "--password",
            "pw",
        ],
        &etcd,
    )?;

    // Nobody active: both servers refuse sessions and hold no database connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = s1.client("alice@localhost", "pw").await.expect_err("idle");
    assert!(refusal(&err).contains("system-shutdown"), "{err:?}");
    assert_eq!(
        db_connections(&pg)?,
        0,
        "idle servers hold no connection to mgc/mgccomp"
    );

    // s1 active: it serves from PostgreSQL; s2 sends clients to s1.
    pchat(&["pool", "set-active-servers", "pc1", "s1"], &etcd)?;
    let mut alice = login_when_active(&s1).await?;
    let err = s2
        .client("alice@localhost", "pw")
        .await
        .expect_err("s2 is idle");
    assert!(refusal(&err).contains("see-other-host"), "{err:?}");
    alice.join_room(ROOM, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = alice
            .send_groupchat(ROOM, &format!("pooled {i}"), None)
            .await?;
        acked.push(stanza_id(&ack, ROOM).unwrap_or_default());
    }
    assert!(db_connections(&pg)? > 0);

    // --none: s1 drains (the client is told to leave) and closes every connection.
    let t0 = Instant::now();
    pchat(&["pool", "set-active-servers", "pc1", "--none"], &etcd)?;
    match alice.recv(Duration::from_secs(10)).await {
        Err(Error::Stream { condition, .. }) => assert_eq!(condition, "system-shutdown"),
        other => panic!("expected the drain to end the stream, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while db_connections(&pg)? > 0 {
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
    pchat(&["pool", "set-active-servers", "pc1", "s2"], &etcd)?;
    let mut alice = login_when_active(&s2).await?;
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
    pchat(&["pool", "swap", "pc1"], &etcd)?;
    match alice.recv_until(Duration::from_secs(10), |_| false).await {
        Err(Error::Stream { condition, text }) => {
            assert_eq!(condition, "see-other-host", "{text:?}");
        }
        other => panic!("expected see-other-host, got {other:?}"),
    }
    let mut alice = login_when_active(&s1).await?;
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
    let pg = PgCluster::start()?;
    pg.create_database("mgc")?;
    pg.create_database("mgccomp")?;
    let cluster = EtcdCluster::start(1).await?;
    let etcd = cluster.endpoints().join(",");
    let args: Vec<String> = [
        "--topology-from-etcd",
        &etcd,
        "--pool",
        "pc1",
        "--server",
        "s1",
        "--pool-poll-ms",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let s1 = TestServer::start(
        &bin(),
        ServerOptions {
            extra_args: args.clone(),
            ..ServerOptions::default()
        },
    )
    .await?;
    let s2 = TestServer::start(
        &bin(),
        ServerOptions {
            extra_args: args,
            ..ServerOptions::default()
        },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, topology(&cluster.endpoints(), pg.port(), &s1, &s2))?;
    pchat(&["topology", "publish", &file.to_string_lossy()], &etcd)?;
    pchat(&["--in-pool", "pc1", "db", "install"], &etcd)?;
    pchat(
        &[
            "--in-pool",
            "pc1",
            "user",
            "add",
            "alice@localhost",
            "--password",
            "pw",
        ],
        &etcd,
    )?;
    pchat(&["pool", "set-active-servers", "pc1", "s1"], &etcd)?;
    let mut alice = login_when_active(&s1).await?;
    alice.join_room(ROOM, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;
    alice.send_groupchat(ROOM, "before", Some("o-1")).await?;

    pg.stop()?;
    alice.set_reply_timeout(Duration::from_secs(60));
    let err = alice
        .send_groupchat(ROOM, "during", Some("o-2"))
        .await
        .expect_err("no acknowledgment without the database");
    match &err {
        Error::Stanza { error, .. } => assert_eq!(error.error_type, "wait", "retryable: {err:?}"),
        other => panic!("expected a wait error, got {other:?}"),
    }
    pg.start_again()?;
    // The session survived; the same message, resent, is stored once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ack = loop {
        match alice.send_groupchat(ROOM, "during", Some("o-2")).await {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
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
    let pg = PgCluster::start()?;
    pg.create_database("mgc")?;
    pg.create_database("mgccomp")?;
    let cluster = EtcdCluster::start(1).await?;
    let etcd = cluster.endpoints().join(",");
    let args = |name: &str| -> Vec<String> {
        [
            "--topology-from-etcd",
            &etcd,
            "--pool",
            "pc1",
            "--server",
            name,
            "--pool-poll-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let s1 = TestServer::start(
        &bin(),
        ServerOptions {
            extra_args: args("s1"),
            ..ServerOptions::default()
        },
    )
    .await?;
    let s2 = TestServer::start(
        &bin(),
        ServerOptions {
            extra_args: args("s2"),
            ..ServerOptions::default()
        },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, topology(&cluster.endpoints(), pg.port(), &s1, &s2))?;
    pchat(&["topology", "publish", &file.to_string_lossy()], &etcd)?;
    pchat(&["--in-pool", "pc1", "db", "install"], &etcd)?;
    pchat(
        &[
            "--in-pool",
            "pc1",
            "user",
            "add",
            "alice@localhost",
            "--password",
            "pw",
        ],
        &etcd,
    )?;
    pchat(
        &[
            "--in-pool",
            "pc1",
            "user",
            "add",
            "bob@localhost",
            "--password",
            "pw",
        ],
        &etcd,
    )?;
    pchat(&["pool", "set-active-servers", "pc1", "s1", "s2"], &etcd)?;
    let mut alice = login_when_active(&s1).await?;
    alice.join_room(ROOM, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut bob = loop {
        match s2.client("bob@localhost", "pw").await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    bob.join_room(ROOM, "bob", None).await?;

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
    let page = alice
        .mam_query(
            ROOM,
            &[],
            Some(pchat_testkit::Rsm {
                max: Some(1000),
                ..Default::default()
            }),
        )
        .await?;
    assert_eq!(page.ids().len(), 2 * EACH);
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
    let pg = PgCluster::start()?;
    pg.create_database("mgc")?;
    pg.create_database("mgccomp")?;
    let cluster = EtcdCluster::start(1).await?;
    let etcd = cluster.endpoints().join(",");
    let args = |name: &str| -> Vec<String> {
        [
            "--topology-from-etcd",
            &etcd,
            "--pool",
            "pc1",
            "--server",
            name,
            "--pool-poll-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut servers = Vec::new();
    for name in ["s1", "s2", "s3"] {
        servers.push(
            TestServer::start(
                &bin(),
                ServerOptions {
                    extra_args: args(name),
                    ..ServerOptions::default()
                },
            )
            .await?,
        );
    }
    let eps = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut topo = format!(
        "share = \"/tmp/pchat-share\"\netcd = [{eps}]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
         [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ address = \"127.0.0.1:{}\", agent = \"http://127.0.0.1:1\" }}\n",
        pg.port()
    );
    for (i, s) in servers.iter().enumerate() {
        topo.push_str(&format!(
            "[[servers]]\nname = \"s{}\"\nsite = \"A\"\naddress = \"{}\"\n",
            i + 1,
            s.c2s_addr()
        ));
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("topology.toml");
    std::fs::write(&file, topo)?;
    pchat(&["topology", "publish", &file.to_string_lossy()], &etcd)?;
    pchat(&["--in-pool", "pc1", "db", "install"], &etcd)?;
    for u in ["u1", "u2", "u3"] {
        pchat(
            &[
                "--in-pool",
                "pc1",
                "user",
                "add",
                &format!("{u}@localhost"),
                "--password",
                "pw",
            ],
            &etcd,
        )?;
    }
    pchat(
        &["pool", "set-active-servers", "pc1", "s1", "s2", "s3"],
        &etcd,
    )?;
    let mut clients = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut c = loop {
            match s.client(&format!("u{}@localhost", i + 1), "pw").await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        };
        c.join_room(ROOM, &format!("u{}", i + 1), None).await?;
        if i == 0 {
            let submit = Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_attr("to", ROOM)
                .with_child(
                    Element::new("query", ns::MUC_OWNER)
                        .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
                );
            c.iq_result(submit, Duration::from_secs(10)).await?;
        }
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
    servers[0].kill9();
    let mut acked = Vec::new();
    for (i, w) in writers.into_iter().enumerate() {
        let a = tokio::time::timeout(Duration::from_secs(120), w).await??;
        if i > 0 {
            assert_eq!(a.len(), 400, "writer {i} on a surviving server kept going");
        }
        acked.extend(a);
    }
    let mut reader = servers[1].client("u2@localhost", "pw").await?;
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = reader
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
        ids.extend(page.ids().iter().map(|i| i.parse::<i64>().unwrap_or(-1)));
        if page.complete() || page.ids().is_empty() {
            break;
        }
        after = page.last();
    }
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
    Ok(())
}
