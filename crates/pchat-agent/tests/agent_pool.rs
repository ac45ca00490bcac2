//! The agent and the pool-mode procedures against real PostgreSQL 15 instances and a real
//! etcd: authentication, mirroring (add, status, mirror loss, remove), manual failover
//! (planned and unplanned, fencing, `--force`), and full backup/restore through the agent.
//!
//! Each test builds its own lab in a temporary directory: etcd, one agent per instance
//! (in this process, on loopback), PostgreSQL run by the agents as the `postgres` user.
//! Figures (failover time, backup and restore time) are printed: run with `--nocapture`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{connect, count, init_principal, progress_to_stderr, until, Lab, Pki, TOKEN};
use futures_util::StreamExt as _;
use pchat_agent::AgentConfig;
use pchat_agent_api::{
    AgentAccess, BackupRequest, ClientError, MirroringState, RestoreRequest, Role, Status,
};
use pchat_control::mirroring::{self, Safety};
use pchat_control::{keys, pool};
use pchat_procedures::mirror::{self, MirrorError};

/// An insecure pool's agent (`insecure = true`): plain HTTP, and every request must carry
/// the pool's token, checked before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_agent_refuses_requests_without_the_token() {
    let lab = Lab::insecure(&["solo"]).await;
    let node = &lab.nodes[0];
    assert!(node.url.starts_with("http://"), "{}", node.url);
    let http = reqwest::Client::new();
    let url = node.url.clone();
    for (path, auth) in [
        ("/v1/init", None),
        ("/v1/init", Some("Bearer wrong-token-0123456789")),
        ("/v1/init", Some(TOKEN)), // no "Bearer " scheme
        ("/v1/status", None),
        ("/v1/no-such-endpoint", None),
    ] {
        let mut req = if path == "/v1/status" {
            http.get(format!("{url}{path}"))
        } else {
            http.post(format!("{url}{path}"))
                .json(&serde_json::json!({}))
        };
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} {auth:?}");
        assert_eq!(
            r.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer")
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
    }
    // Nothing was done: the data directory was never created.
    assert!(
        !node.cfg.data_dir.exists(),
        "a refused init must not touch the disk"
    );
    let wrong = AgentAccess::new("pc1", None, Some("wrong-token-0123456789".into()));
    assert!(matches!(
        wrong.named("solo", &url).status().await,
        Err(ClientError::Unauthorized { .. })
    ));
    // No token at all: the client refuses without sending anything.
    assert!(matches!(
        AgentAccess::new("pc1", None, None)
            .named("solo", &url)
            .status()
            .await,
        Err(ClientError::Access { .. })
    ));
    // With the token: works, and a second init is a no-op.
    assert!(node.client.init(&mut |_| {}).await.unwrap());
    assert!(!node.client.init(&mut |_| {}).await.unwrap());
    let s = node.client.status().await.unwrap();
    assert_eq!((s.role, s.initialized), (Role::Stopped, true));
    // A bad body is a clear 400, not a crash; a body over the limit is refused before it is
    // read in full.
    let r = http
        .post(format!("{url}/v1/clone-from"))
        .bearer_auth(TOKEN)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http
        .post(format!("{url}/v1/clone-from"))
        .bearer_auth(TOKEN)
        .body(vec![b' '; 1 << 20])
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // No identity and no token file: the agent does not start.
    let err = AgentConfig::parse(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"/tmp/x\"\npool = \"p\"\ninstance = \"i\"\ninsecure = true\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("token_file"), "{err}");
}

/// An agent starts only with its own instance's identity, and without one only when its
/// configuration says `insecure = true`, which reaches etcd only in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_starts_only_with_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let token_file = dir.path().join("agent.token");
    pchat_tls::fs::write_private(&token_file, TOKEN.as_bytes()).unwrap();
    let config = |identity: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{d}/data\"\n\
             etcd = [\"https://127.0.0.1:9\"]\npool = \"pc1\"\ninstance = \"solo\"\n{identity}\n",
            d = dir.path().display()
        )
    };
    let start = |text: String| async move {
        let cfg = AgentConfig::parse(&text).expect("config");
        pchat_agent::serve(cfg).await.map(|h| h.url())
    };
    // Another instance's identity: refused at start, naming both.
    let other = pki.instance("other");
    let err = start(config(&format!("tls_dir = \"{}\"", other.display())))
        .await
        .expect_err("another instance's identity");
    assert!(
        err.to_string().contains("instance other") && err.to_string().contains("instance solo"),
        "{err}"
    );
    // No identity, insecure: refused for an https:// etcd (it would need the identity).
    let err = start(config(&format!(
        "insecure = true\ntoken_file = \"{}\"",
        token_file.display()
    )))
    .await
    .expect_err("https etcd without an identity");
    assert!(err.to_string().contains("tls_dir"), "{err}");
    // Its own identity: starts (etcd is not needed to start), and serves HTTPS.
    let mine = pki.instance("solo");
    let handle = start(config(&format!("tls_dir = \"{}\"", mine.display())))
        .await
        .expect("its own identity");
    assert!(handle.starts_with("https://127.0.0.1:"), "{handle}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_add_synchronizes_and_a_lost_mirror_blocks_commits() {
    let lab = Lab::new(&["a_db", "a_mirror"], true).await;
    let (p, m) = (&lab.nodes[0], &lab.nodes[1]);
    init_principal(p).await;
    let ctx = lab.publish().await;
    let pc = connect(&p.conn()).await;
    pc.execute("INSERT INTO ledger VALUES (1, 'before mirroring')", &[])
        .await
        .unwrap();

    let t = Instant::now();
    let report = mirror::add(&ctx, None, false, &mut progress_to_stderr())
        .await
        .expect("mirror add");
    eprintln!("mirror add (clone + catch-up): {:?}", t.elapsed());
    assert_eq!(report.state, MirroringState::Synchronized, "{report:#?}");
    assert_eq!(report.safety, Safety::Full);
    let ps = report.principal.status.as_ref().unwrap();
    let ms = report.mirror.as_ref().unwrap().status.as_ref().unwrap();
    assert_eq!((ps.role, ms.role), (Role::Principal, Role::Mirror));
    assert_eq!(ps.mirroring.partner.as_deref(), Some("a_mirror"));
    assert_eq!(ps.system_identifier, ms.system_identifier);
    assert!(ps.wal_lsn.is_some() && ps.timeline == Some(1));
    // Running it again changes nothing.
    let again = mirror::add(&ctx, None, false, &mut |_| {}).await.unwrap();
    assert_eq!(again.state, MirroringState::Synchronized);

    // A committed row is on the mirror (commit waited for its flush; replay follows).
    pc.execute("INSERT INTO ledger VALUES (2, 'mirrored')", &[])
        .await
        .unwrap();
    let mconn = m.conn();
    until(
        Duration::from_secs(10),
        "row 2 replayed on the mirror",
        || {
            let c = mconn.clone();
            async move { count(&c).await == 2 }
        },
    )
    .await;

    // kill -9 the mirror: the principal sees DISCONNECTED, and commits wait.
    m.kill9();
    until(
        Duration::from_secs(15),
        "principal reports DISCONNECTED",
        || async {
            p.client
                .status()
                .await
                .is_ok_and(|s| s.mirroring.state == MirroringState::Disconnected)
        },
    )
    .await;
    let site = mirror::status(&ctx, None).await.unwrap();
    assert_eq!(site.state, MirroringState::Disconnected);

    // No write is acknowledged without the mirror: this commit does not return.
    let blocked = connect(&p.conn()).await;
    let insert = blocked.execute(
        "INSERT INTO ledger VALUES (3, 'while the mirror is down')",
        &[],
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), insert)
            .await
            .is_err(),
        "a commit was acknowledged while the synchronous mirror was down"
    );

    // PostgreSQL's rules, pinned here because the store must follow them:
    // (1) statement_timeout does not bound the wait (PostgreSQL disarms it before the
    //     commit), so the commit just waits;
    // (2) a *cancel* of the waiting backend makes the commit return success, with a WARNING
    //     that it "might not have been replicated". So a store must never cancel a commit
    //     (close the connection instead, outcome unknown, retry with origin-id dedupe) and
    //     must treat that warning as not acknowledged.
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    let (c2, mut conn2) = tokio_postgres::connect(&p.conn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn2.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = msg {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    let pid: i32 = c2
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    c2.batch_execute("SET statement_timeout = 300")
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        c2.execute("INSERT INTO ledger VALUES (4, 'cancelled wait')", &[])
            .await
            .map_err(|e| e.to_string())
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !waiting.is_finished(),
        "statement_timeout ended a commit's wait for the mirror"
    );
    pc.execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a cancel ends the wait")
        .unwrap();
    let warning = tokio::time::timeout(Duration::from_secs(2), notices.recv())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    eprintln!("cancelled commit while the mirror is down: {outcome:?}, notice: {warning:?}");
    assert_eq!(
        outcome,
        Ok(1),
        "PostgreSQL reports a cancelled sync wait as a commit"
    );
    assert!(warning.contains("synchronous replication"), "{warning}");

    // The mirror comes back (its agent restarts it), resynchronizes, and the blocked commit
    // completes.
    m.client.start().await.expect("restart the mirror");
    until(Duration::from_secs(30), "SYNCHRONIZED again", || async {
        mirror::status(&ctx, None)
            .await
            .is_ok_and(|r| r.state == MirroringState::Synchronized)
    })
    .await;
    until(
        Duration::from_secs(10),
        "rows 3 and 4 on the mirror",
        || {
            let c = mconn.clone();
            async move { count(&c).await == 4 }
        },
    )
    .await;

    // Remove: commits no longer wait, the mirror is stopped.
    let removed = mirror::remove(&ctx, None, &mut progress_to_stderr())
        .await
        .expect("remove");
    assert_eq!(removed.state, MirroringState::None, "{removed:#?}");
    assert_eq!(removed.mirror.unwrap().status.unwrap().role, Role::Stopped);
    tokio::time::timeout(
        Duration::from_secs(5),
        pc.execute("INSERT INTO ledger VALUES (5, 'no mirror')", &[]),
    )
    .await
    .expect("commits no longer wait after remove")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_planned_and_unplanned_fence_the_old_principal() {
    let lab = Lab::new(&["a_db", "a_mirror"], true).await;
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    init_principal(a).await;
    let ctx = lab.publish().await;
    mirror::add(&ctx, None, false, &mut |_| {})
        .await
        .expect("add");
    let ac = connect(&a.conn()).await;
    for i in 1..=50i64 {
        ac.execute("INSERT INTO ledger VALUES ($1, 'before failover')", &[&i])
            .await
            .unwrap();
    }

    // Planned failover: a is stopped cleanly, b promoted, nothing lost.
    let r = mirror::failover(&ctx, None, false, &mut progress_to_stderr())
        .await
        .expect("planned failover");
    eprintln!(
        "planned failover: no principal for {} ms, command {} ms",
        r.no_principal_ms, r.total_ms
    );
    assert!(r.planned && !r.forced, "{r:#?}");
    assert_eq!(
        (r.new_principal.as_str(), r.old_principal.as_str()),
        ("a_mirror", "a_db")
    );
    assert_eq!(r.possible_loss_bytes, 0);
    assert_eq!(r.timeline, Some(2), "promotion starts a new timeline");
    assert_eq!(count(&b.conn()).await, 50);
    let bc = connect(&b.conn()).await;
    bc.execute(
        "INSERT INTO ledger VALUES (51, 'on the new principal')",
        &[],
    )
    .await
    .expect("the promoted mirror is writable");
    let site = mirror::status(&ctx, None).await.unwrap();
    assert_eq!(site.state, MirroringState::Suspended, "{site:#?}");
    // Servers that follow the site's principal now find b.
    let view = pool::get(&ctx.etcd, "pc1").await.unwrap();
    let now = mirroring::principal_of(&ctx.etcd, "pc1", &view.topology.sites[0])
        .await
        .unwrap();
    assert_eq!(now.address, b.address());

    // The old principal is fenced: its agent will not start it as a principal.
    let err = a.client.start().await.unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(a.client.status().await.unwrap().fenced.is_some());

    // Not SYNCHRONIZED (the site runs without a mirror): refused without --force.
    let err = mirror::failover(&ctx, None, false, &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MirrorError::NotSynchronized(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        b.client.status().await.unwrap().role,
        Role::Principal,
        "nothing changed"
    );

    // Re-seed the old principal as the mirror: roles swapped, SYNCHRONIZED.
    let t = Instant::now();
    let report = mirror::add(&ctx, None, false, &mut progress_to_stderr())
        .await
        .expect("re-add");
    eprintln!("re-seeding the old principal as mirror: {:?}", t.elapsed());
    assert_eq!(report.state, MirroringState::Synchronized);
    assert_eq!(report.principal.status.unwrap().instance, "a_mirror");
    assert!(a.client.status().await.unwrap().fenced.is_none());
    for i in 52..=100i64 {
        bc.execute("INSERT INTO ledger VALUES ($1, 'mirrored to a')", &[&i])
            .await
            .unwrap();
    }

    // Unplanned: the principal (b) dies; its last published state was SYNCHRONIZED.
    // What a failover will judge b by: its agent's last published principal status.
    until(
        Duration::from_secs(10),
        "b's published status is SYNCHRONIZED",
        || async {
            let kv = ctx
                .etcd
                .get(&keys::principal_status("pc1", "a_mirror"))
                .await
                .unwrap();
            kv.and_then(|kv| serde_json::from_slice::<Status>(&kv.value).ok())
                .is_some_and(|s| {
                    s.mirroring.state == MirroringState::Synchronized
                        && s.mirroring.partner.as_deref() == Some("a_db")
                })
        },
    )
    .await;
    b.kill9();
    let r = mirror::failover(&ctx, None, false, &mut progress_to_stderr())
        .await
        .expect("unplanned failover");
    eprintln!(
        "unplanned failover (principal killed): promoted in {} ms",
        r.total_ms
    );
    assert!(!r.planned && !r.forced, "{r:#?}");
    assert_eq!(r.state_before, MirroringState::Synchronized);
    assert_eq!(r.new_principal, "a_db");
    assert_eq!(r.timeline, Some(3));
    assert_eq!(
        count(&a.conn()).await,
        100,
        "every acknowledged row survived"
    );
    connect(&a.conn())
        .await
        .execute(
            "INSERT INTO ledger VALUES (101, 'after the second failover')",
            &[],
        )
        .await
        .expect("writable");
    // The dead principal's agent will not bring it back as a principal.
    let err = b.client.start().await.unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_backup_and_restore_round_trip() {
    let lab = Lab::new(&["a_db"], false).await;
    let n = &lab.nodes[0];
    init_principal(n).await;
    let c = connect(&n.conn()).await;
    for i in 1..=200i64 {
        c.execute("INSERT INTO ledger VALUES ($1, repeat('x', 100))", &[&i])
            .await
            .unwrap();
    }
    let share = lab.share();
    // A half-done earlier run is no obstacle.
    std::fs::create_dir_all(share.join("full1.partial/junk")).unwrap();
    let t = Instant::now();
    let mut lines = 0;
    let m = n
        .client
        .backup(
            &BackupRequest {
                to: share.display().to_string(),
                name: "full1".into(),
                description: Some("before the test rows".into()),
            },
            &mut |_| lines += 1,
        )
        .await
        .expect("backup");
    eprintln!(
        "pool backup: {} files, {} bytes in {:?} ({lines} progress updates)",
        m.files.len(),
        m.total_bytes,
        t.elapsed()
    );
    assert!(!share.join("full1.partial").exists());
    assert_eq!(m.name, "full1");
    assert_eq!(m.description, "before the test rows");
    assert!(
        m.lsn.is_some() && m.start_lsn.is_some() && m.timeline == Some(1),
        "{m:?}"
    );
    assert!(m
        .files
        .iter()
        .any(|f| f.path == "data/PG_VERSION" && f.sha256.len() == 64));
    assert!(m.source.contains("a_db"));
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(share.join("full1/manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk["name"], "full1");
    // The same name again is refused: backups are never overwritten.
    let again = n
        .client
        .backup(
            &BackupRequest {
                to: share.display().to_string(),
                name: "full1".into(),
                description: None,
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");

    c.execute("INSERT INTO ledger VALUES (1000, 'after the backup')", &[])
        .await
        .unwrap();
    let from = share.join("full1").display().to_string();

    // Without --overwrite: refused, the database untouched and still running.
    let err = n
        .client
        .restore(
            &RestoreRequest {
                from: from.clone(),
                overwrite: false,
                recovery: true,
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert_eq!(count(&n.conn()).await, 201);

    // A damaged copy of the backup: detected before anything is stopped or replaced.
    let bad = share.join("damaged");
    copy_tree(&share.join("full1"), &bad);
    let victim = bad.join("data/global/pg_control");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let err = n
        .client
        .restore(
            &RestoreRequest {
                from: bad.display().to_string(),
                overwrite: true,
                recovery: true,
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("damaged") && err.to_string().contains("global/pg_control"),
        "{err}"
    );
    assert_eq!(n.client.status().await.unwrap().role, Role::Principal);
    assert_eq!(count(&n.conn()).await, 201, "nothing was replaced");

    // --overwrite --recovery: the backup's content, ready to use.
    let t = Instant::now();
    n.client
        .restore(
            &RestoreRequest {
                from: from.clone(),
                overwrite: true,
                recovery: true,
            },
            &mut |_| {},
        )
        .await
        .expect("restore");
    eprintln!("pool restore --recovery: {:?}", t.elapsed());
    assert_eq!(
        count(&n.conn()).await,
        200,
        "the row written after the backup is gone"
    );
    connect(&n.conn())
        .await
        .execute("INSERT INTO ledger VALUES (2000, 'writable')", &[])
        .await
        .expect("ready to use");

    // --norecovery: a standby waiting for log shipping (read-only).
    n.client
        .restore(
            &RestoreRequest {
                from,
                overwrite: true,
                recovery: false,
            },
            &mut |_| {},
        )
        .await
        .expect("restore --norecovery");
    let s = n.client.status().await.unwrap();
    assert_eq!(s.role, Role::Standby, "{s:#?}");
    assert!(n.cfg.data_dir.join("standby.signal").exists());
    let write = connect(&n.conn())
        .await
        .execute("INSERT INTO ledger VALUES (3000, 'x')", &[])
        .await;
    assert!(
        write.is_err(),
        "a NORECOVERY restore must not accept writes"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
