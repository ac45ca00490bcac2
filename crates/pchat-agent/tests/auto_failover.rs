//! Automatic mirror failover against real PostgreSQL 15 instances run by real agents and a
//! real etcd: the etcd lease primitives, the principal's leader lease, promotion of a
//! synchronized mirror when the principal's host is lost (with the measured time to a
//! writable principal), no promotion of a mirror that was not synchronized, one winner among
//! racing watchers, and a principal fencing itself when it loses etcd.
//!
//! Figures are printed: run with `--nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{connect, count, try_connect, until, Lab, Pki};
use pchat_agent::leader::{self, Attempt};
use pchat_agent_api::{MirroringState, Role, Status};
use pchat_control::keys;
use pchat_control::mirroring::{self, Safety};
use pchat_procedures::mirror::{self, Ctx, MirrorError};

async fn leader_of(ctx: &Ctx) -> Option<String> {
    ctx.etcd
        .get(&keys::leader("pc1", "A"))
        .await
        .unwrap()
        .map(|kv| String::from_utf8(kv.value).unwrap())
}

async fn last_principal_state(ctx: &Ctx, instance: &str) -> Option<MirroringState> {
    ctx.etcd
        .get(&keys::principal_status("pc1", instance))
        .await
        .unwrap()
        .and_then(|kv| serde_json::from_slice::<Status>(&kv.value).ok())
        .map(|s| s.mirroring.state)
}

/// How long after `since` the instance at `conn` took `insert`; fails with `what` after
/// `within`.
async fn writable_again(
    conn: &str,
    insert: &str,
    since: Instant,
    within: Duration,
    what: &str,
) -> Duration {
    loop {
        assert!(since.elapsed() < within, "{what}");
        if let Ok(c) = try_connect(conn).await {
            if c.execute(insert, &[]).await.is_ok() {
                return since.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The principal holds the leader lease and last reported SYNCHRONIZED.
async fn wait_armed(ctx: &Ctx) {
    until(
        Duration::from_secs(15),
        "a_db holds the leader lease",
        || async { leader_of(ctx).await.as_deref() == Some("a_db") },
    )
    .await;
    until(
        Duration::from_secs(10),
        "a_db's published status is SYNCHRONIZED",
        || async { last_principal_state(ctx, "a_db").await == Some(MirroringState::Synchronized) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leases_guard_and_expire_keys() {
    // Over TLS with the operator's identity (authentication is not enabled in this cluster:
    // the lease primitives are what is checked).
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path());
    let etcd_cluster = pki.etcd(1).await;
    let etcd = pki.operator(&etcd_cluster.endpoints());
    assert!(etcd.is_secure());
    let lease = etcd.lease_grant(2).await.expect("grant");
    assert!(etcd
        .put_if_absent("/t/k", b"one", Some(lease))
        .await
        .unwrap()
        .is_some());
    assert!(
        etcd.put_if_absent("/t/k", b"two", None)
            .await
            .unwrap()
            .is_none(),
        "an existing key is not replaced"
    );
    assert!(etcd
        .put_if_value("/t/k", b"two", b"x", None)
        .await
        .unwrap()
        .is_none());
    assert_eq!(etcd.get("/t/k").await.unwrap().unwrap().value, b"one");
    assert!(etcd
        .lease_keepalive(lease)
        .await
        .unwrap()
        .is_some_and(|t| t > 0));
    // Kept alive past its TTL, the key stays.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(etcd.lease_keepalive(lease).await.unwrap().is_some());
    }
    assert!(etcd.get("/t/k").await.unwrap().is_some());
    // Revoked: gone at once, and the keep-alive says so.
    etcd.lease_revoke(lease).await.unwrap();
    assert!(etcd.get("/t/k").await.unwrap().is_none());
    assert_eq!(etcd.lease_keepalive(lease).await.unwrap(), None);
    etcd.lease_revoke(lease)
        .await
        .expect("revoking twice is fine");
    // Not kept alive: the key expires with the lease.
    let lease = etcd.lease_grant(2).await.unwrap();
    etcd.put_with_lease("/t/e", b"v", lease).await.unwrap();
    assert!(etcd
        .put_if_value("/t/e", b"v", b"w", Some(lease))
        .await
        .unwrap()
        .is_some());
    let t = Instant::now();
    while etcd.get("/t/e").await.unwrap().is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "the leased key never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("a 2 s lease expired after {:?}", t.elapsed());
    assert_eq!(etcd.lease_keepalive(lease).await.unwrap(), None);
    etcd.delete("/t/k").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_failover_promotes_a_synchronized_mirror_when_the_principal_host_is_lost() {
    let mut lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    let (_, before) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let epoch = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap()
        .0
        .unwrap()
        .epoch;
    let ac = connect(&lab.nodes[0].conn()).await;
    for i in 1..=200i64 {
        ac.execute("INSERT INTO ledger VALUES ($1, 'before the crash')", &[&i])
            .await
            .unwrap();
    }
    wait_armed(&ctx).await;
    // Still armed a few renewals later: the lease is kept alive, nothing fails over.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(leader_of(&ctx).await.as_deref(), Some("a_db"));
    assert_eq!(
        mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
            .await
            .unwrap()
            .1,
        before
    );

    let killed = Instant::now();
    lab.nodes[0].lose_host().await;
    let b = &lab.nodes[1];
    let mut writable = None;
    while writable.is_none() {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the mirror was not promoted automatically"
        );
        if let Ok(c) = try_connect(&b.conn()).await {
            if c.execute("INSERT INTO ledger VALUES (201, 'after the crash')", &[])
                .await
                .is_ok()
            {
                writable = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rto = writable.unwrap();
    eprintln!(
        "automatic failover: principal host lost → mirror writable in {rto:?} (leader_ttl_s = 5)"
    );
    assert!(rto < Duration::from_secs(15), "{rto:?}");
    assert_eq!(
        count(&b.conn()).await,
        201,
        "every acknowledged row survived"
    );
    // The record is replaced right after the promotion.
    until(
        Duration::from_secs(10),
        "the record names the new principal",
        || async {
            mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
                .await
                .unwrap()
                .1
                != before
        },
    )
    .await;
    eprintln!("  … record updated {:?} after the kill", killed.elapsed());
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let record = record.unwrap();
    assert_eq!(record.principal.instance, "a_mirror");
    assert_eq!(record.epoch, epoch + 1);
    assert_eq!(record.safety, Safety::Suspended);
    assert!(
        record.note.starts_with("automatic unplanned failover"),
        "{}",
        record.note
    );
    let fence = ctx
        .etcd
        .get(&keys::fence("pc1", "a_db"))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(fence.value, b"null", "the old principal is fenced");
    let s = b.client.status().await.unwrap();
    assert_eq!((s.role, s.timeline), (Role::Principal, Some(2)));
    // SUSPENDED: no mirror to hand over to, so the new principal holds no lease.
    until(
        Duration::from_secs(5),
        "the leader key is released",
        || async { leader_of(&ctx).await.is_none() },
    )
    .await;
}

/// etcd before 3.4.28 revokes every lease when a paused etcd leader resumes (etcd issue
/// 12528; the chaos suite's `freeze etcd-leader`). Revoking the leader key's lease here:
/// the live principal takes its key back within the mirror's grace, nothing fails over,
/// and the principal keeps taking writes. Its agent giving the key up on purpose (its
/// PostgreSQL killed) still fails over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_of_a_live_principal_is_taken_back_without_failover() {
    let lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let before = record.unwrap().epoch;
    wait_armed(&ctx).await;
    for round in 0..3i64 {
        // Only the leader key's lease (the resumed etcd leader revokes them all, the
        // principal's published status with them, which would stop the mirror for another
        // reason: not known to be SYNCHRONIZED).
        let kv = ctx
            .etcd
            .get(&keys::leader("pc1", "A"))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(kv.lease, 0);
        ctx.etcd.lease_revoke(kv.lease).await.unwrap();
        let revoked = Instant::now();
        // Watched closely through the grace and a few watcher ticks past it: the key goes
        // back to a_db and never to the mirror.
        let mut back = None;
        while revoked.elapsed() < Duration::from_secs(4) {
            match leader_of(&ctx).await.as_deref() {
                Some("a_db") => {
                    back.get_or_insert(revoked.elapsed());
                }
                Some(other) => panic!("round {round}: {other} took the leader key"),
                None => assert!(back.is_none(), "round {round}: the key was lost again"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let back = back.expect("a_db holds the leader key again");
        eprintln!("round {round}: a_db took its revoked key back after {back:?}");
        let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
            .await
            .unwrap();
        let record = record.unwrap();
        assert_eq!(
            (record.principal.instance.as_str(), record.epoch),
            ("a_db", before)
        );
        assert_eq!(leader_of(&ctx).await.as_deref(), Some("a_db"));
        let ac = connect(&lab.nodes[0].conn()).await;
        ac.execute(
            "INSERT INTO ledger VALUES ($1, 'after a revocation')",
            &[&(700 + round)],
        )
        .await
        .expect("the principal still takes writes");
    }
    // A release on purpose is not waited for.
    let killed = Instant::now();
    lab.nodes[0].kill9();
    let took = writable_again(
        &lab.nodes[1].conn(),
        "INSERT INTO ledger VALUES (800, 'after the kill')",
        killed,
        Duration::from_secs(20),
        "the mirror was not promoted after the principal's PostgreSQL died",
    )
    .await;
    eprintln!("principal's PostgreSQL killed → mirror writable in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_failover_never_promotes_a_mirror_that_was_not_synchronized() {
    let mut lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    // The mirror goes away first; the principal reports it DISCONNECTED (and keeps its lease).
    lab.nodes[1].client.stop(false).await.expect("stop mirror");
    until(
        Duration::from_secs(10),
        "a_db's published status is no longer SYNCHRONIZED",
        || async {
            matches!(
                last_principal_state(&ctx, "a_db").await,
                Some(s) if s != MirroringState::Synchronized
            )
        },
    )
    .await;
    let (_, revision) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    lab.nodes[0].lose_host().await;
    lab.nodes[1].client.start().await.expect("mirror back");
    until(
        Duration::from_secs(10),
        "the leader lease expires",
        || async { leader_of(&ctx).await.is_none() },
    )
    .await;
    // Several TTLs later: still a mirror, the record unchanged.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = lab.nodes[1].client.status().await.unwrap();
    assert_eq!(
        s.role,
        Role::Mirror,
        "an unsynchronized mirror was promoted"
    );
    let (record, rev) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    assert_eq!(rev, revision);
    assert_eq!(record.unwrap().principal.instance, "a_db");
    // The watcher's own verdict says why.
    match leader::try_automatic_failover(&ctx, "A", "a_mirror", 3)
        .await
        .unwrap()
    {
        Attempt::Refused(why) => {
            assert!(
                why.contains("not SYNCHRONIZED") && why.contains("--force"),
                "{why}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // An operator can still accept the loss.
    let r = mirror::failover(&ctx, None, true, &mut |_| {})
        .await
        .expect("forced failover");
    assert!(r.forced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_watchers_promote_exactly_once() {
    // The mirror's own agent does not watch: the two racers below are the only ones.
    let mut lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", false)]).await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    let (record, revision) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let epoch = record.unwrap().epoch;
    lab.nodes[0].lose_host().await;
    until(
        Duration::from_secs(10),
        "the leader lease expires",
        || async { leader_of(&ctx).await.is_none() },
    )
    .await;
    let ctx2 = ctx.clone();
    let (x, y) = tokio::join!(
        leader::try_automatic_failover(&ctx, "A", "a_mirror", 3),
        leader::try_automatic_failover(&ctx2, "A", "a_mirror", 3),
    );
    let (x, y) = (x.expect("watcher 1"), y.expect("watcher 2"));
    eprintln!("watcher 1: {x:?}\nwatcher 2: {y:?}");
    let promoted = [&x, &y]
        .iter()
        .filter(|a| matches!(a, Attempt::Promoted { .. }))
        .count();
    assert_eq!(promoted, 1, "exactly one promotion");
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let record = record.unwrap();
    assert_eq!(
        (record.principal.instance.as_str(), record.epoch),
        ("a_mirror", epoch + 1)
    );
    // A decision based on the old record loses the compare-and-swap.
    let err = mirror::automatic_failover(&ctx, "A", revision, &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, MirrorError::Conflict(_)), "{err}");
    assert_eq!(
        lab.nodes[1].client.status().await.unwrap().role,
        Role::Principal
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_that_loses_etcd_fences_itself() {
    let mut lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    assert!(lab.nodes[0].postmaster_alive());
    let lost = Instant::now();
    lab.etcd_mut().kill(0);
    let a = &lab.nodes[0];
    until(
        Duration::from_secs(10),
        "the principal stops itself",
        || async { !a.postmaster_alive() },
    )
    .await;
    let fenced = lost.elapsed();
    eprintln!("principal without etcd: stopped itself after {fenced:?} (leader_ttl_s = 5)");
    assert!(
        fenced < Duration::from_secs(5),
        "it must stop before its lease can expire: {fenced:?}"
    );
    assert!(
        try_connect(&a.conn()).await.is_err(),
        "nothing acknowledges any more"
    );
}

#[tokio::test]
async fn auto_failover_when_postgres_dies_under_a_live_agent() {
    let lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    let ac = connect(&lab.nodes[0].conn()).await;
    for i in 1..=100i64 {
        ac.execute("INSERT INTO ledger VALUES ($1, 'before the crash')", &[&i])
            .await
            .unwrap();
    }
    wait_armed(&ctx).await;
    // Only PostgreSQL dies (its process group, SIGKILL); the principal's agent lives on.
    let killed = Instant::now();
    lab.nodes[0].kill9();
    let b = &lab.nodes[1];
    let rto = writable_again(
        &b.conn(),
        "INSERT INTO ledger VALUES (101, 'after the crash')",
        killed,
        Duration::from_secs(30),
        "the mirror was not promoted after the principal's PostgreSQL died",
    )
    .await;
    eprintln!("automatic failover: principal PostgreSQL killed under a live agent → mirror writable in {rto:?}");
    assert_eq!(
        count(&b.conn()).await,
        101,
        "every acknowledged row survived"
    );
    until(
        Duration::from_secs(10),
        "the record names the new principal",
        || async {
            mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
                .await
                .unwrap()
                .0
                .is_some_and(|r| r.principal.instance == "a_mirror")
        },
    )
    .await;
    // The old principal's agent does not bring it back as a principal.
    assert!(lab.nodes[0].client.start().await.is_err(), "fenced");
}

#[tokio::test]
async fn a_lost_mirror_stops_blocking_after_the_partner_timeout_and_resyncs_on_return() {
    let lab = Lab::with_config(
        &[("a_db", true), ("a_mirror", true)],
        "mirror_loss_timeout_s = 2\n",
    )
    .await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    let (p, m) = (&lab.nodes[0], &lab.nodes[1]);
    m.kill9();
    let lost = Instant::now();
    // The commit waits for the mirror until the partner timeout, then goes through exposed.
    let c = connect(&p.conn()).await;
    tokio::time::timeout(
        Duration::from_secs(20),
        c.execute(
            "INSERT INTO ledger VALUES (1, 'while the mirror is gone')",
            &[],
        ),
    )
    .await
    .expect("the principal keeps serving once the mirror is declared lost")
    .unwrap();
    let waited = lost.elapsed();
    eprintln!("a commit waited {waited:?} for the lost mirror (partner timeout 2 s)");
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    let (r, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let r = r.unwrap();
    assert_eq!(r.safety, Safety::Suspended, "{}", r.note);
    assert_eq!(
        mirror::status(&ctx, Some("A")).await.unwrap().state,
        MirroringState::Suspended
    );
    // No automatic failover to a mirror that misses commits: the leader key is gone, and
    // the mirror's agent must not promote it when it comes back.
    for i in 2..=50i64 {
        c.execute("INSERT INTO ledger VALUES ($1, 'exposed')", &[&i])
            .await
            .unwrap();
    }
    m.client
        .start()
        .await
        .expect("the mirror's PostgreSQL comes back");
    until(Duration::from_secs(30), "resynchronized", || async {
        mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
            .await
            .unwrap()
            .0
            .is_some_and(|r| r.safety == Safety::Full)
    })
    .await;
    assert_eq!(
        mirror::status(&ctx, Some("A")).await.unwrap().state,
        MirroringState::Synchronized
    );
    assert_eq!(m.client.status().await.unwrap().role, Role::Mirror);
    assert_eq!(count(&m.conn()).await, 50, "the mirror caught up");
}

/// The principal's PostgreSQL hangs (SIGSTOP of every process) under a live agent: the
/// agent keeps answering its API within its own deadline and says PostgreSQL answers
/// nothing; it gives up the leader lease after `postgres_hung_timeout_ms`, so the
/// synchronized mirror is promoted within about a second of that; a manual status of the
/// site is quick throughout; and the old principal, resumed, stops at once (fenced) without
/// acknowledging the commit that was waiting on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_principal_gives_up_its_lease_and_the_mirror_takes_over() {
    let lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    let ac = connect(&lab.nodes[0].conn()).await;
    for i in 1..=100i64 {
        ac.execute("INSERT INTO ledger VALUES ($1, 'before the freeze')", &[&i])
            .await
            .unwrap();
    }
    wait_armed(&ctx).await;
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    a.freeze(true);
    let frozen = Instant::now();
    // A commit in flight on the frozen principal: it must never be acknowledged.
    let in_flight = tokio::spawn(async move {
        ac.execute("INSERT INTO ledger VALUES (1000, 'in flight')", &[])
            .await
            .map(drop)
    });

    // Its agent answers, and says its PostgreSQL is hung.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let t = Instant::now();
    let s = a.client.status().await.expect("the agent answers");
    let took = t.elapsed();
    assert!(took < Duration::from_millis(2_000), "status took {took:?}");
    assert!(s.unresponsive_ms.is_some(), "{s:?}");
    assert_eq!(s.role, Role::Stopped);
    let t = Instant::now();
    mirror::status(&ctx, Some("A")).await.expect("site status");
    let site_took = t.elapsed();
    assert!(site_took < Duration::from_secs(3), "{site_took:?}");

    let mut writable = None;
    while writable.is_none() {
        assert!(
            frozen.elapsed() < Duration::from_secs(20),
            "the mirror was not promoted while the principal hung"
        );
        if let Ok(c) = try_connect(&b.conn()).await {
            if c.execute("INSERT INTO ledger VALUES (101, 'after the freeze')", &[])
                .await
                .is_ok()
            {
                writable = Some(frozen.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rto = writable.unwrap();
    eprintln!(
        "principal PostgreSQL frozen → mirror writable in {rto:?} (postgres_hung_timeout_ms = 2000); \
         agent status {took:?}, site status {site_took:?} during the freeze"
    );
    assert!(rto < Duration::from_secs(5), "{rto:?}");
    until(
        Duration::from_secs(10),
        "the record names the new principal",
        || async {
            mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
                .await
                .unwrap()
                .0
                .is_some_and(|r| r.principal.instance == "a_mirror")
        },
    )
    .await;
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    let record = record.unwrap();
    assert_eq!(record.principal.instance, "a_mirror");
    assert!(
        record.note.starts_with("automatic unplanned"),
        "{}",
        record.note
    );

    // Resumed, the old principal carries out its fence: it stops, acknowledging nothing.
    a.freeze(false);
    until(
        Duration::from_secs(10),
        "the old principal stops",
        || async { !a.postmaster_alive() },
    )
    .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight commit ended")
        .expect("task");
    assert!(outcome.is_err(), "the commit in flight was acknowledged");
    assert_eq!(count(&b.conn()).await, 101, "every acknowledged row, once");
    assert!(a.client.start().await.is_err(), "fenced");
}

/// The principal's storage stalls (its volume frozen with `fsfreeze`: writes wait, reads
/// go on) under a live agent and a live PostgreSQL that still answers `SELECT 1` from
/// memory: a commit waits on its WAL write and the WAL flush position stands still, so the
/// agent takes it for hung, says so in its status, and gives up the leader lease; the
/// synchronized mirror is promoted and writable within seconds; the commit that was waiting
/// is never acknowledged; thawed, the old principal carries out its fence and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_whose_storage_stalls_gives_up_its_lease_and_the_mirror_takes_over() {
    let lab = Lab::with_auto_failover_on_volumes(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    let ac = connect(&lab.nodes[0].conn()).await;
    for i in 1..=100i64 {
        ac.execute("INSERT INTO ledger VALUES ($1, 'before the stall')", &[&i])
            .await
            .unwrap();
    }
    wait_armed(&ctx).await;
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    // Writes flowing on a healthy disk are no stall.
    let s = a.client.status().await.expect("status");
    assert_eq!(s.unresponsive_ms, None, "{s:?}");
    assert_eq!(s.role, Role::Principal);

    lab.stall_storage(0, true);
    let stalled = Instant::now();
    // A commit in flight on the stalled principal: it must never be acknowledged.
    let in_flight = tokio::spawn(async move {
        ac.execute("INSERT INTO ledger VALUES (1000, 'in flight')", &[])
            .await
            .map(drop)
    });
    // PostgreSQL still answers a read: this is not a frozen process.
    let reader = connect(&a.conn()).await;
    let t = Instant::now();
    reader.simple_query("SELECT 1").await.expect("reads go on");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // Its agent answers, and says its PostgreSQL does not serve.
    tokio::time::sleep(Duration::from_millis(1_750)).await;
    let t = Instant::now();
    let s = a.client.status().await.expect("the agent answers");
    let took = t.elapsed();
    assert!(took < Duration::from_millis(2_000), "status took {took:?}");
    assert!(
        s.unresponsive_ms.is_some(),
        "the stall is not reported: {s:?}"
    );
    assert_eq!(s.role, Role::Stopped);

    let rto = writable_again(
        &b.conn(),
        "INSERT INTO ledger VALUES (101, 'after the stall')",
        stalled,
        Duration::from_secs(20),
        "the mirror was not promoted while the principal's storage stalled",
    )
    .await;
    eprintln!(
        "principal storage stalled (fsfreeze) → mirror writable in {rto:?} \
         (postgres_hung_timeout_ms = 2000); agent status {took:?} during the stall"
    );
    assert!(rto < Duration::from_secs(6), "{rto:?}");
    until(
        Duration::from_secs(10),
        "the record names the new principal",
        || async {
            mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
                .await
                .unwrap()
                .0
                .is_some_and(|r| r.principal.instance == "a_mirror")
        },
    )
    .await;

    // Thawed, the old principal carries out its fence: it stops, acknowledging nothing.
    lab.stall_storage(0, false);
    until(
        Duration::from_secs(15),
        "the old principal stops",
        || async { !a.postmaster_alive() },
    )
    .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight commit ended")
        .expect("task");
    assert!(outcome.is_err(), "the commit in flight was acknowledged");
    assert_eq!(count(&b.conn()).await, 101, "every acknowledged row, once");
    assert!(a.client.start().await.is_err(), "fenced");
}

/// The principal's disk fills up (a ballast file takes its last block): PostgreSQL keeps
/// running and answering, but fails every commit that needs a new page, and stops only when
/// its WAL cannot grow — which recycled segments put off. Its agent sees the disk full, gives
/// up the lease after `postgres_hung_timeout_ms`, the synchronized mirror (its own disk)
/// takes over, and the old principal is stopped; every acknowledged row is on the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_whose_disk_is_full_gives_up_its_lease_and_the_mirror_takes_over() {
    let lab = Lab::with_auto_failover_on_volumes(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    let ac = connect(&lab.nodes[0].conn()).await;
    for i in 1..=100i64 {
        ac.execute(
            "INSERT INTO ledger VALUES ($1, 'before the disk filled')",
            &[&i],
        )
        .await
        .unwrap();
    }
    wait_armed(&ctx).await;
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);

    lab.fill_storage(0, true);
    let filled = Instant::now();
    // The premise: writes fail with "disk full" (53100) while PostgreSQL answers. Rows of
    // 1 KiB fill the table's last page within a few inserts, then it needs a new one.
    let mut acked = 100i64;
    let refused = loop {
        let id = acked + 1;
        match ac
            .execute("INSERT INTO ledger VALUES ($1, repeat('x', 1024))", &[&id])
            .await
        {
            Ok(_) => acked = id,
            Err(e) => break e,
        }
        assert!(acked < 1_000, "the full disk took {acked} rows");
    };
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::DISK_FULL),
        "{refused:?}"
    );
    let reader = connect(&a.conn()).await;
    reader.simple_query("SELECT 1").await.expect("reads go on");

    let rto = writable_again(
        &b.conn(),
        "INSERT INTO ledger VALUES (100000, 'after the disk filled')",
        filled,
        Duration::from_secs(20),
        "the mirror was not promoted while the principal's disk was full",
    )
    .await;
    eprintln!(
        "principal's disk full → mirror writable in {rto:?} (postgres_hung_timeout_ms = 2000); \
         {} rows acknowledged before the first refusal",
        acked - 100
    );
    assert!(rto < Duration::from_secs(6), "{rto:?}");
    until(
        Duration::from_secs(15),
        "the old principal stops",
        || async { !a.postmaster_alive() },
    )
    .await;
    assert_eq!(
        count(&b.conn()).await,
        acked + 1,
        "every acknowledged row, once"
    );
    lab.fill_storage(0, false);
    assert!(a.client.start().await.is_err(), "fenced");
}

/// The principal's disk fills while its mirror is down (not SYNCHRONIZED: nobody can take
/// over). Its agent keeps the lease — giving it up would only delay the site once room is
/// made (the chaos suite's seed 74: 32 s without service for a 23.5 s full disk) — and the
/// site serves again as soon as there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_with_no_synchronized_mirror_keeps_the_lease() {
    let lab = Lab::with_auto_failover_on_volumes(&[("a_db", true), ("a_mirror", true)]).await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    let a = &lab.nodes[0];
    lab.nodes[1].client.stop(false).await.expect("stop mirror");
    until(
        Duration::from_secs(10),
        "the principal sees its mirror gone",
        || async { last_principal_state(&ctx, "a_db").await != Some(MirroringState::Synchronized) },
    )
    .await;

    lab.fill_storage(0, true);
    // Twice the hung timeout: long enough for a synchronized pair to have failed over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        leader_of(&ctx).await.as_deref(),
        Some("a_db"),
        "the principal gave up its lease though nobody could take over"
    );
    assert!(
        a.postmaster_alive(),
        "the principal was stopped for a full disk"
    );
    // What an operator's alert reads meanwhile: the agent's own /metrics.
    let full = scrape(a).await;
    assert!(
        full.contains("pchat_agent_role{role=\"principal\"} 1"),
        "{full}"
    );
    assert!(
        metric(&full, "pchat_agent_disk_full_seconds") >= 2.0,
        "{full}"
    );
    assert!(
        metric(&full, "pchat_agent_data_available_bytes") < 1024.0 * 1024.0,
        "{full}"
    );
    lab.fill_storage(0, false);
    let c = connect(&a.conn()).await;
    c.simple_query("SELECT 1").await.expect("it answers");
    assert_eq!(leader_of(&ctx).await.as_deref(), Some("a_db"));
    until(
        Duration::from_secs(10),
        "the agent sees room again",
        || async { metric(&scrape(a).await, "pchat_agent_disk_full_seconds") == 0.0 },
    )
    .await;
}

/// The agent's `/metrics` (plain HTTP on `metrics_listen`).
async fn scrape(node: &common::Node) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let at = node.cfg.metrics_listen.expect("metrics_listen");
    let mut s = tokio::net::TcpStream::connect(at)
        .await
        .expect("the metrics port");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text
}

/// The value of an unlabelled series in a scrape; NaN when it is missing.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// The principal's PostgreSQL stalls past `postgres_hung_timeout_ms` while nobody can take
/// over (the mirror's automatic failover is off): its agent gives up the lease, but once
/// PostgreSQL answers again the site goes on as it was — the agent takes the lease back,
/// the commit that waited through the stall is acknowledged (the mirror has it), and the
/// principal is not stopped for a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_principal_nobody_replaced_keeps_serving_when_it_answers_again() {
    let lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", false)]).await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    let a = &lab.nodes[0];
    let ac = connect(&a.conn()).await;
    a.freeze(true);
    let in_flight = tokio::spawn(async move {
        ac.execute("INSERT INTO ledger VALUES (1, 'through the stall')", &[])
            .await
            .map(drop)
    });
    until(
        Duration::from_secs(10),
        "a_db gives up the leader lease while it answers nothing",
        || async { leader_of(&ctx).await.is_none() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    a.freeze(false);

    tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the commit that waited through the stall ended")
        .expect("task")
        .expect("it is acknowledged: nobody took over, the mirror has it");
    until(
        Duration::from_secs(10),
        "a_db holds the leader lease again",
        || async { leader_of(&ctx).await.as_deref() == Some("a_db") },
    )
    .await;
    assert!(
        a.postmaster_alive(),
        "the principal was stopped for a stall"
    );
    let c = connect(&a.conn()).await;
    c.execute("INSERT INTO ledger VALUES (2, 'after the stall')", &[])
        .await
        .expect("the principal serves");
    assert_eq!(count(&lab.nodes[1].conn()).await, 2, "the mirror has both");
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    assert_eq!(record.unwrap().principal.instance, "a_db");
}

/// The principal's PostgreSQL dies under a live agent (kill -9 of the postmaster) and nobody
/// takes over (the mirror's automatic failover is off): the agent starts it again on its own
/// once the mirror had its chance (two TTLs), the site serves again with every acknowledged
/// row, and it holds the lease again. A PostgreSQL stopped on purpose (the API's stop) is
/// not started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_that_died_and_was_not_replaced_is_started_again() {
    let lab = Lab::with_auto_failover(&[("a_db", true), ("a_mirror", false)]).await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    let a = &lab.nodes[0];
    let ac = connect(&a.conn()).await;
    for i in 1..=20i64 {
        ac.execute("INSERT INTO ledger VALUES ($1, 'before the crash')", &[&i])
            .await
            .unwrap();
    }
    drop(ac);
    let killed = Instant::now();
    a.kill9();
    let took = writable_again(
        &a.conn(),
        "INSERT INTO ledger VALUES (21, 'after the crash')",
        killed,
        Duration::from_secs(40),
        "the principal's agent did not start its PostgreSQL again",
    )
    .await;
    eprintln!("principal PostgreSQL killed, nobody took over → serving again in {took:?}");
    assert!(
        took >= Duration::from_secs(5),
        "the synchronized mirror gets two TTLs to take over first: {took:?}"
    );
    assert_eq!(count(&a.conn()).await, 21, "every acknowledged row");
    assert_eq!(count(&lab.nodes[1].conn()).await, 21, "the mirror has them");
    until(
        Duration::from_secs(15),
        "a_db holds the leader lease again",
        || async { leader_of(&ctx).await.as_deref() == Some("a_db") },
    )
    .await;
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, "A")
        .await
        .unwrap();
    assert_eq!(record.unwrap().principal.instance, "a_db");

    // Stopped on purpose (immediate: its control file says "in production", as after a
    // crash): it stays stopped.
    a.client.stop(true).await.expect("the API's immediate stop");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !a.postmaster_alive(),
        "a PostgreSQL stopped through the API was started again"
    );
}

/// The mirror's PostgreSQL hangs (SIGSTOP of every process: a frozen host, a black hole),
/// its connection staying open: the principal lets it go after `wal_sender_timeout` (5 s,
/// the agent's setting; PostgreSQL's default of 60 s held commits for ~70 s), and after the
/// partner timeout (10 s) it runs exposed, so a commit waits ~15 s, not a minute. Resumed,
/// the mirror catches up and the pair is SYNCHRONIZED again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_mirror_stops_blocking_commits_after_the_sender_and_partner_timeouts() {
    let lab = Lab::with_config(
        &[("a_db", true), ("a_mirror", true)],
        "mirror_loss_timeout_s = 10\n",
    )
    .await;
    let ctx = lab.mirrored().await;
    wait_armed(&ctx).await;
    let (p, m) = (&lab.nodes[0], &lab.nodes[1]);
    let c = connect(&p.conn()).await;
    m.freeze(true);
    let frozen = Instant::now();
    let done = tokio::time::timeout(
        Duration::from_secs(40),
        c.execute(
            "INSERT INTO ledger VALUES (1, 'while the mirror hangs')",
            &[],
        ),
    )
    .await;
    let waited = frozen.elapsed();
    m.freeze(false);
    done.expect("the commit still waits 40 s after the mirror froze")
        .unwrap();
    eprintln!("a commit waited {waited:?} for a frozen mirror (sender timeout 5 s + partner timeout 10 s)");
    assert!(
        waited >= Duration::from_secs(9),
        "the partner timeout was not kept: {waited:?}"
    );
    assert!(waited <= Duration::from_secs(25), "{waited:?}");
    until(Duration::from_secs(40), "SYNCHRONIZED again", || async {
        mirror::status(&ctx, Some("A"))
            .await
            .is_ok_and(|s| s.state == MirroringState::Synchronized)
    })
    .await;
    assert_eq!(count(&m.conn()).await, 1, "the mirror caught up");
}
