//! The control plane against a real 3-member etcd with TLS and authentication, as an
//! operator: publish, read, every active-server change, concurrent administrators (one wins,
//! the other gets a conflict), and a lost member. A plaintext client refuses a pool that is
//! not insecure.

mod common;

use pchat_control::pool::{self, ActiveChange, PoolError, PoolStateKind};
use pchat_control::{topology, Etcd, Who};
use pchat_testkit::etcd::EtcdCluster;

fn topology_text(etcd: &[String]) -> String {
    let etcd: Vec<String> = etcd.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"share = "/tmp/share"
etcd = [{etcd}]
[pool]
name = "pc1"
domain = "localhost"
[[sites]]
name = "A"
role = "primary"
database = {{ name = "a_db", address = "127.0.0.1:5432", agent = "https://127.0.0.1:7070" }}
[[sites]]
name = "B"
role = "backup"
database = {{ name = "b_db", address = "127.0.0.1:5433", agent = "https://127.0.0.1:7071" }}
[[servers]]
name = "a1"
site = "A"
address = "127.0.0.1:5222"
[[servers]]
name = "a2"
site = "A"
address = "127.0.0.1:5322"
[[servers]]
name = "b1"
site = "B"
address = "127.0.0.1:5422"
"#,
        etcd = etcd.join(", "),
    )
}

#[tokio::test]
async fn pool_state_lives_in_etcd_with_compare_and_swap() -> anyhow::Result<()> {
    let mut secure = common::SecureEtcd::start("pc1", 3).await?;
    let t = secure.issue(&topology_text(&secure.endpoints()), &["admin"])?;
    secure.setup(&t, "admin").await?;
    let etcd = secure.client(&Who::Operator("admin".into()))?;
    assert_eq!(etcd.user(), Some("operator-admin"));
    assert!(matches!(
        pool::get(&etcd, "pc1").await,
        Err(PoolError::UnknownPool(_))
    ));
    pool::publish_topology(&etcd, &t).await?;
    let v = pool::get(&etcd, "pc1").await?;
    assert_eq!(
        (v.state.state, v.state.active_servers.len()),
        (PoolStateKind::Normal, 0)
    );

    let next = pool::plan_active(
        &v,
        &ActiveChange::Set(vec!["a1".into(), "a2".into()]),
        false,
    )?;
    let v = pool::commit(&etcd, &v, &next).await?;
    assert_eq!(v.state.active_servers, ["a1", "a2"]);
    assert_eq!(
        pool::get(&etcd, "pc1").await?.state.active_servers,
        ["a1", "a2"]
    );

    // Republishing the topology does not reset the live state.
    pool::publish_topology(&etcd, &t).await?;
    assert_eq!(
        pool::get(&etcd, "pc1").await?.state.active_servers,
        ["a1", "a2"]
    );

    // Two administrators read the same state; the second write loses and says so.
    let admin1 = pool::get(&etcd, "pc1").await?;
    let admin2 = admin1.clone();
    pool::commit(
        &etcd,
        &admin1,
        &pool::plan_active(&admin1, &ActiveChange::None, false)?,
    )
    .await?;
    let err = pool::commit(
        &etcd,
        &admin2,
        &pool::plan_active(&admin2, &ActiveChange::Remove("a1".into()), false)?,
    )
    .await;
    assert!(matches!(err, Err(PoolError::Conflict(_))), "{err:?}");
    assert!(
        pool::get(&etcd, "pc1")
            .await?
            .state
            .active_servers
            .is_empty(),
        "the winner's change stands"
    );

    // Failover state: only site B servers may be active.
    let v = pool::get(&etcd, "pc1").await?;
    let v = pool::commit(
        &etcd,
        &v,
        &pool::plan_state(&v, PoolStateKind::FailedOver, false)?,
    )
    .await?;
    assert!(pool::plan_active(&v, &ActiveChange::Add("a1".into()), false).is_err());
    let v = pool::commit(
        &etcd,
        &v,
        &pool::plan_active(&v, &ActiveChange::Add("b1".into()), false)?,
    )
    .await?;
    assert_eq!(
        v.state.epoch, 5,
        "each of the four changes raised the epoch"
    );
    drop(v);

    // One member lost: the other two still hold quorum and serve.
    secure.cluster.kill(0);
    let v = pool::get(&etcd, "pc1").await?;
    assert_eq!(v.state.active_servers, ["b1"]);
    // b1 (site B) is active: back to Normal is refused until the list suits site A.
    assert!(pool::plan_state(&v, PoolStateKind::Normal, false).is_err());
    pool::commit(
        &etcd,
        &v,
        &pool::plan_state(&v, PoolStateKind::Normal, true)?,
    )
    .await?;
    Ok(())
}

/// A process without an identity follows only a pool whose topology says it is insecure.
#[tokio::test]
async fn a_plaintext_client_refuses_a_secure_pool() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let plain = Etcd::new(&cluster.endpoints());
    let secure_text = topology_text(&["https://127.0.0.1:2379".to_owned()]);
    pool::publish_topology(&plain, &topology::parse(&secure_text)?).await?;
    let err = pool::get(&plain, "pc1").await.expect_err("refused");
    assert!(matches!(err, PoolError::NeedsIdentity(_)), "{err:?}");
    assert!(err.to_string().contains("--tls-dir"), "{err}");
    // Insecure: followed (with the warning on standard error).
    let insecure = format!(
        "insecure = true\n{}",
        topology_text(&cluster.endpoints()).replace("https://", "http://")
    );
    pool::publish_topology(&plain, &topology::parse(&insecure)?).await?;
    assert!(pool::get(&plain, "pc1").await?.topology.insecure);
    Ok(())
}

#[tokio::test]
async fn unreachable_etcd_is_a_clear_error() {
    let etcd = Etcd::new(&["http://127.0.0.1:9".to_owned()]);
    let err = pool::get(&etcd, "pc1")
        .await
        .expect_err("nothing listens there");
    assert!(err.to_string().contains("etcd unreachable"), "{err}");
}

/// A member that takes connections and never answers (frozen, or cut off behind a proxy):
/// the kernel completes the handshake, nothing comes back.
fn hung_member() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten().take(64) {
            held.push(conn);
        }
    });
    Ok(format!("http://{addr}"))
}

/// A hung member costs the first call that meets it, not every call: the client turns to
/// the member that answered and asks it first from then on — also when the caller, not the
/// client, gave up on the hung one (the agent bounds each lease renewal to 0.5 s).
#[tokio::test]
async fn a_hung_member_is_passed_over_after_the_first_call() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(1).await?;
    let endpoints = vec![hung_member()?, cluster.endpoints()[0].clone()];
    let etcd = Etcd::new(&endpoints);
    let t = std::time::Instant::now();
    etcd.put("/chaos/k", b"v").await?;
    let first = t.elapsed();
    assert!(
        first >= std::time::Duration::from_millis(1_500),
        "the first call waited for the hung member: {first:?}"
    );
    for _ in 0..5 {
        let t = std::time::Instant::now();
        assert_eq!(
            etcd.get("/chaos/k").await?.map(|kv| kv.value),
            Some(b"v".to_vec())
        );
        assert!(
            t.elapsed() < std::time::Duration::from_millis(1_000),
            "{:?}",
            t.elapsed()
        );
    }
    // A fresh client whose caller stops waiting: the next call goes to the other member.
    let etcd = Etcd::new(&endpoints);
    let gave_up =
        tokio::time::timeout(std::time::Duration::from_millis(300), etcd.get("/chaos/k")).await;
    assert!(gave_up.is_err(), "the hung member answered");
    let t = std::time::Instant::now();
    assert!(etcd.get("/chaos/k").await?.is_some());
    assert!(
        t.elapsed() < std::time::Duration::from_millis(1_000),
        "{:?}",
        t.elapsed()
    );
    Ok(())
}
