//! Log shipping, DR failover and failback with real PostgreSQL instances, agents and etcd:
//! site A (a_db principal + a_mirror), site B (b_db log-shipping secondary + b_mirror), the
//! share and B's copy directory in a temporary lab.
//!
//! One test walks the whole life: shipping verified segment by segment (a corrupt and a
//! missing segment stop the restore at the last good one, nothing bad is applied, repair
//! resumes it), the loss of site A with `pool failover` (what B has is a gapless prefix of
//! what A committed), then `pool failback` interrupted after its backup step and resumed, and
//! shipping A → B again afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use pchat_agent_api::{MirroringState, Role};
use pchat_control::{pool, topology, PoolStateKind};
use pchat_procedures::dr::{self, FailbackOptions, FailoverOptions};
use pchat_procedures::logship::{self, ConfigureOptions};
use pchat_procedures::mirror::{self, Ctx};

async fn publish_two_sites(lab: &Lab, copy_dir: &Path) -> Ctx {
    let endpoints = lab.etcd().endpoints();
    let n = &lab.nodes;
    let text = format!(
        r#"{header}[[sites]]
name = "A"
role = "primary"
database = {{ name = "{an}", address = "{a}", agent = "{aa}" }}
mirror = {{ name = "{amn}", address = "{am}", agent = "{ama}" }}
[[sites]]
name = "B"
role = "backup"
database = {{ name = "{bn}", address = "{b}", agent = "{ba}" }}
mirror = {{ name = "{bmn}", address = "{bm}", agent = "{bma}" }}
copy_dir = "{copy}"
[[servers]]
name = "a1"
site = "A"
address = "127.0.0.1:5222"
[[servers]]
name = "b1"
site = "B"
address = "127.0.0.1:6222"
"#,
        header = topology_header(&lab.share().display().to_string(), &endpoints),
        an = n[0].cfg.instance,
        amn = n[1].cfg.instance,
        bn = n[2].cfg.instance,
        bmn = n[3].cfg.instance,
        a = n[0].address(),
        aa = n[0].url,
        am = n[1].address(),
        ama = n[1].url,
        b = n[2].address(),
        ba = n[2].url,
        bm = n[3].address(),
        bma = n[3].url,
        copy = copy_dir.display(),
    );
    let t = topology::parse(&text).expect("topology");
    Ctx {
        etcd: lab.pki.setup_and_publish(&t).await,
        pool: "pc1".into(),
        agents: lab.access.clone(),
    }
}

fn chown_postgres(p: &Path) {
    let ok = std::process::Command::new("chown")
        .arg("postgres")
        .arg(p)
        .status()
        .expect("chown")
        .success();
    assert!(ok, "chown postgres {}", p.display());
}

async fn insert(conn: &str, from: i64, to: i64) {
    let c = connect(conn).await;
    for i in from..=to {
        c.execute("INSERT INTO ledger (id, body) VALUES ($1, 'row')", &[&i])
            .await
            .expect("insert");
    }
}

async fn ids(conn: &str) -> Vec<i64> {
    connect(conn)
        .await
        .query("SELECT id FROM ledger ORDER BY id", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn is_prefix(ids: &[i64]) -> bool {
    ids.iter().enumerate().all(|(i, id)| *id == i as i64 + 1)
}

async fn share_dir(ctx: &Ctx) -> PathBuf {
    PathBuf::from(
        logship::read_record(ctx)
            .await
            .expect("record")
            .0
            .expect("configured")
            .share_dir,
    )
}

/// Writes rows `from..=to` on the principal and closes the segment, so they are shipped;
/// returns the segment that holds them.
async fn write_and_ship(lab: &Lab, conn: &str, share: &Path, from: i64, to: i64) -> String {
    insert(conn, from, to).await;
    let seg = lab.nodes[0].client.switch_wal().await.expect("switch");
    until(Duration::from_secs(20), "segment archived", || {
        let p = share.join(format!("{seg}.sha256"));
        async move { p.exists() }
    })
    .await;
    seg
}

#[tokio::test]
async fn log_shipping_failover_and_failback() {
    let lab = Lab::new(&["a_db", "a_mirror", "b_db", "b_mirror"], true).await;
    let copy_dir = lab.root.path().join("copy");
    std::fs::create_dir(&copy_dir).unwrap();
    chown_postgres(&copy_dir);
    chown_postgres(&lab.share());
    let ctx = publish_two_sites(&lab, &copy_dir).await;
    init_principal(&lab.nodes[0]).await;
    mirror::add(&ctx, Some("A"), false, &mut progress_to_stderr())
        .await
        .expect("mirror add A");
    // The backup database runs with a database of its own (log shipping replaces it); its
    // mirror is empty until the failover seeds it.
    assert!(lab.nodes[2].client.init(&mut |_| {}).await.expect("init"));
    lab.nodes[2].client.start().await.expect("start");

    // No failover to a backup database that log shipping never seeded.
    let refused = dr::failover(&ctx, &FailoverOptions::default(), &mut |_| {})
        .await
        .expect_err("nothing to fail over to");
    assert!(
        refused.to_string().contains("not a log-shipping standby"),
        "{refused}"
    );
    assert_eq!(
        pool::get(&ctx.etcd, "pc1").await.unwrap().state.state,
        PoolStateKind::Normal
    );

    // Preflight names what the OS user lacks and changes nothing.
    let locked = lab.root.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let checks = lab.nodes[2]
        .client
        .preflight(&pchat_agent_api::shipping::PreflightRequest {
            read: vec![locked.display().to_string()],
            write: vec![locked.join("copy").display().to_string()],
        })
        .await
        .expect("preflight");
    assert!(checks.iter().all(|c| !c.ok), "{checks:?}");
    assert!(
        checks[0].fix.as_deref().unwrap_or("").contains("setfacl"),
        "{checks:?}"
    );
    let good = logship::preflight(&ctx, None, None)
        .await
        .expect("preflight");
    assert!(good.iter().all(|(_, c)| c.ok), "{good:?}");

    // Configure: B is seeded from a backup of A and replays shipped WAL.
    let a = lab.nodes[0].conn();
    let b = lab.nodes[2].conn();
    insert(&a, 1, 100).await;
    let r = logship::configure(
        &ctx,
        &ConfigureOptions {
            backup_interval_s: 2,
            copy_interval_s: 1,
            ..ConfigureOptions::default()
        },
        &mut progress_to_stderr(),
    )
    .await
    .expect("configure");
    assert_eq!(
        r.secondary.as_ref().unwrap().status.as_ref().unwrap().role,
        Role::Standby
    );
    let share = share_dir(&ctx).await;
    write_and_ship(&lab, &a, &share, 101, 150).await;
    until(Duration::from_secs(30), "B replays rows 1..150", || async {
        ids(&b).await.len() == 150
    })
    .await;
    let st = logship::status(&ctx).await.expect("status");
    assert!(st.alerts.is_empty(), "{:?}", st.alerts);

    // A corrupt segment stops the copy job before it; nothing after it is applied.
    logship::pause_copy(&ctx, true).await.expect("pause");
    let seg = write_and_ship(&lab, &a, &share, 151, 200).await;
    let later = write_and_ship(&lab, &a, &share, 201, 220).await;
    assert_ne!(seg, later);
    let path = share.join(&seg);
    let original = std::fs::read(&path).unwrap();
    let mut bad = original.clone();
    bad[original.len() / 2] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    let sc = &lab.nodes[2].client;
    let run = sc.copy_now().await.expect("copy");
    let err = run.error.expect("the corrupt segment is refused");
    assert!(err.contains(&seg) && err.contains("checksum"), "{err}");
    assert!(
        !copy_dir.join(&later).exists(),
        "nothing after a bad segment is copied"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // (A segment switch by archive_timeout may have put some of rows 151.. in an earlier,
    // good segment; rows 201.. are only in segments after the bad one.)
    let got = ids(&b).await;
    assert!(
        got.len() <= 200 && is_prefix(&got),
        "nothing past the last good segment is applied: B has {} rows",
        got.len()
    );
    let st = logship::status(&ctx).await.expect("status");
    assert!(
        st.alerts.iter().any(|a| a.contains(&seg)),
        "{:?}",
        st.alerts
    );
    // Repaired, it goes on.
    std::fs::write(&path, &original).unwrap();
    logship::pause_copy(&ctx, false).await.expect("resume");
    until(Duration::from_secs(30), "B replays rows 1..220", || async {
        ids(&b).await.len() == 220
    })
    .await;

    // A missing segment: the job stops below the hole and says which one.
    logship::pause_copy(&ctx, true).await.expect("pause");
    let gone = write_and_ship(&lab, &a, &share, 221, 240).await;
    write_and_ship(&lab, &a, &share, 241, 260).await;
    let keep = lab.root.path().join("kept-segment");
    std::fs::rename(share.join(&gone), &keep).unwrap();
    let run = sc.copy_now().await.expect("copy");
    let err = run.error.expect("the hole is reported");
    assert!(err.contains("missing") && err.contains(&gone[8..]), "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = ids(&b).await;
    assert!(
        got.len() <= 240 && is_prefix(&got),
        "nothing past the hole is applied: B has {} rows",
        got.len()
    );
    std::fs::rename(&keep, share.join(&gone)).unwrap();
    logship::pause_copy(&ctx, false).await.expect("resume");
    until(Duration::from_secs(30), "B replays rows 1..260", || async {
        ids(&b).await.len() == 260
    })
    .await;

    // Site A is lost with unshipped writes: `pool failover`.
    insert(&a, 261, 280).await;
    let mut lab = lab;
    lab.nodes[0].lose_host().await;
    lab.nodes[1].lose_host().await;
    let fo = dr::failover(&ctx, &FailoverOptions::default(), &mut progress_to_stderr())
        .await
        .expect("failover");
    eprintln!(
        "DR failover took {} ms; lost at least {} messages",
        fo.total_ms, fo.lost_messages_at_least
    );
    assert!(fo.mirror_attached);
    assert_eq!(fo.active_servers, vec!["b1".to_owned()]);
    let view = pool::get(&ctx.etcd, "pc1").await.unwrap();
    assert_eq!(view.state.state, PoolStateKind::FailedOver);
    let kept = ids(&b).await;
    assert!(
        kept.len() >= 260,
        "everything shipped survives: {}",
        kept.len()
    );
    assert!(
        kept.iter().enumerate().all(|(i, id)| *id == i as i64 + 1),
        "B holds a gapless prefix of A's rows"
    );
    let m = mirror::status(&ctx, Some("B")).await.unwrap();
    assert_eq!(m.state, MirroringState::Synchronized);
    // B serves writes now.
    let next = kept.len() as i64 + 1;
    insert(&b, next, next + 49).await;
    // A re-run changes nothing.
    dr::failover(&ctx, &FailoverOptions::default(), &mut progress_to_stderr())
        .await
        .expect("failover re-run");

    // Site A is rebuilt: agents back, the old data still there (discarded by the restore).
    for i in [0, 1] {
        let handle = pchat_agent::serve(lab.nodes[i].cfg.clone())
            .await
            .expect("agent back");
        lab.nodes[i].client = lab.access.named(&lab.nodes[i].cfg.instance, &handle.url());
        lab.nodes[i].url = handle.url();
        lab.nodes[i].handle = Some(handle);
    }
    // The agents listen on new ports: republish A's agent URLs.
    let ctx = publish_two_sites(&lab, &copy_dir).await;
    let a_status = lab.nodes[0].client.status().await.unwrap();
    assert!(a_status.fenced.is_some(), "the old principal is fenced");
    assert!(
        lab.nodes[0].client.start().await.is_err(),
        "a fenced principal does not start"
    );

    // Failback, killed once in every step (each time right after the step before it was
    // recorded done, so in the middle of the next one), resumed each time.
    let opts = FailbackOptions {
        drain_wait: Duration::from_secs(10),
        backup_interval_s: Some(2),
        copy_interval_s: Some(1),
        ..FailbackOptions::default()
    };
    let dry = FailbackOptions {
        dry_run: true,
        ..opts.clone()
    };
    let plan = dr::failback(&ctx, &dry, &mut |_| {})
        .await
        .expect("dry run");
    assert_eq!(plan.steps.len(), 7);
    assert!(plan.steps.iter().all(|s| !s.done) && !plan.resumed);
    for k in 1..=6usize {
        let ctx2 = ctx.clone();
        let opts2 = opts.clone();
        let run =
            tokio::spawn(
                async move { dr::failback(&ctx2, &opts2, &mut progress_to_stderr()).await },
            );
        until(
            Duration::from_secs(180),
            &format!("failback completes step {k}"),
            || async {
                dr::failback(&ctx, &dry, &mut |_| {})
                    .await
                    .is_ok_and(|p| p.steps[k - 1].done)
            },
        )
        .await;
        run.abort();
        match run.await {
            Err(e) if e.is_cancelled() => {}
            other => panic!("the failback ended by itself after step {k}: {other:?}"),
        }
        let plan = dr::failback(&ctx, &dry, &mut |_| {})
            .await
            .expect("dry run");
        assert!(plan.resumed, "{:?}", plan.steps);
        eprintln!("  -- failback killed after step {k}");
    }
    let fb = dr::failback(&ctx, &opts, &mut progress_to_stderr())
        .await
        .expect("failback resumed");
    assert!(fb.resumed);
    eprintln!("failback took {} ms after the resume", fb.total_ms);
    let view = pool::get(&ctx.etcd, "pc1").await.unwrap();
    assert_eq!(view.state.state, PoolStateKind::Normal);
    assert_eq!(view.state.active_servers, vec!["a1".to_owned()]);
    // A holds exactly what B had: nothing of A's unshipped tail was merged.
    let a = lab.nodes[0].conn();
    let back = ids(&a).await;
    assert_eq!(back.len(), kept.len() + 50);
    assert!(back.iter().enumerate().all(|(i, id)| *id == i as i64 + 1));
    let m = mirror::status(&ctx, Some("A")).await.unwrap();
    assert_eq!(m.state, MirroringState::Synchronized);
    // And ships to B again.
    let share = share_dir(&ctx).await;
    let n = back.len() as i64;
    write_and_ship(&lab, &a, &share, n + 1, n + 10).await;
    until(
        Duration::from_secs(30),
        "B replays A's new rows",
        || async { ids(&b).await.len() as i64 == n + 10 },
    )
    .await;
    let st = logship::status(&ctx).await.expect("status");
    assert_eq!(st.secondary.unwrap().status.unwrap().role, Role::Standby);
}

/// Shipping goes on from whichever instance is principal: after a mirror failover in site A
/// the new principal (which archived what it received as the mirror, `archive_mode=always`)
/// ships its new timeline and the backup follows it.
#[tokio::test]
async fn shipping_goes_on_after_a_mirror_failover() {
    let lab = Lab::new(&["a_db", "a_mirror", "b_db", "b_mirror"], true).await;
    let copy_dir = lab.root.path().join("copy");
    std::fs::create_dir(&copy_dir).unwrap();
    chown_postgres(&copy_dir);
    chown_postgres(&lab.share());
    let ctx = publish_two_sites(&lab, &copy_dir).await;
    init_principal(&lab.nodes[0]).await;
    mirror::add(&ctx, Some("A"), false, &mut |_| {})
        .await
        .expect("mirror add A");
    let a = lab.nodes[0].conn();
    let b = lab.nodes[2].conn();
    insert(&a, 1, 50).await;
    logship::configure(
        &ctx,
        &ConfigureOptions {
            backup_interval_s: 2,
            copy_interval_s: 1,
            ..ConfigureOptions::default()
        },
        &mut |_| {},
    )
    .await
    .expect("configure");
    let share = share_dir(&ctx).await;
    write_and_ship(&lab, &a, &share, 51, 60).await;
    until(Duration::from_secs(30), "B replays rows 1..60", || async {
        ids(&b).await.len() == 60
    })
    .await;
    // Planned mirror failover: a_mirror is the principal on timeline 2.
    mirror::failover(&ctx, Some("A"), false, &mut |_| {})
        .await
        .expect("mirror failover");
    let m = lab.nodes[1].conn();
    insert(&m, 61, 100).await;
    let seg = lab.nodes[1].client.switch_wal().await.expect("switch");
    assert!(seg.starts_with("00000002"), "{seg}");
    until(
        Duration::from_secs(60),
        "B follows the new principal's timeline",
        || async { ids(&b).await.len() == 100 },
    )
    .await;
    let got = ids(&b).await;
    assert!(is_prefix(&got));
    let st = logship::status(&ctx).await.expect("status");
    assert_eq!(
        st.source.and_then(|p| p.status).map(|s| s.instance),
        Some("a_mirror".to_owned())
    );
}
