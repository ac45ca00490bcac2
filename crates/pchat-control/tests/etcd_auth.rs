//! The control plane trusts only its members (issue 11 §3), against a real 3-member etcd with
//! TLS, client certificates and the users and roles of `pchat control auth setup`: who can
//! connect at all, who can read, and that each endpoint writes only its own keys.

mod common;

use std::sync::Arc;

use pchat_control::etcd::Credentials;
use pchat_control::{keys, pool, Etcd, EtcdError, OwnIdentity, Who};

fn topology_text(etcd: &[String], servers: &[(&str, &str)]) -> String {
    let etcd: Vec<String> = etcd.iter().map(|e| format!("\"{e}\"")).collect();
    let mut t = format!(
        r#"share = "/tmp/share"
etcd = [{}]
[pool]
name = "pc1"
domain = "localhost"
[[sites]]
name = "A"
role = "primary"
database = {{ name = "a_db", address = "127.0.0.1:5432", agent = "https://127.0.0.1:7070" }}
mirror = {{ name = "a_mirror", address = "127.0.0.1:5433", agent = "https://127.0.0.1:7071" }}
[[sites]]
name = "B"
role = "backup"
database = {{ name = "b_db", address = "127.0.0.1:5434", agent = "https://127.0.0.1:7072" }}
"#,
        etcd.join(", ")
    );
    for (name, site) in servers {
        t.push_str(&format!(
            "[[servers]]\nname = \"{name}\"\nsite = \"{site}\"\naddress = \"127.0.0.1:5222\"\n"
        ));
    }
    t
}

fn denied<T: std::fmt::Debug>(r: Result<T, EtcdError>, what: &str) {
    match r {
        Err(EtcdError::PermissionDenied { .. }) => {}
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

fn server(s: &str) -> Who {
    Who::Server(s.into())
}

fn agent(i: &str) -> Who {
    Who::Instance(i.into())
}

#[tokio::test]
async fn each_identity_reads_and_writes_only_what_its_role_allows() -> anyhow::Result<()> {
    let mut secure = common::SecureEtcd::start("pc1", 3).await?;
    let eps = secure.endpoints();
    let servers = [("s1", "A"), ("s2", "A"), ("b1", "B")];
    let t = secure.issue(&topology_text(&eps, &servers), &["admin"])?;
    let done = secure.setup(&t, "admin").await?;
    assert!(
        done.iter().any(|l| l == "enabled authentication"),
        "{done:?}"
    );
    assert!(done.iter().any(|l| l.starts_with("created user server-s1")));
    // Idempotent: a second run changes nothing (it only sets the same passwords again).
    let again = secure.setup(&t, "admin").await?;
    assert!(again.is_empty(), "{again:?}");

    let op = secure.client(&Who::Operator("admin".into()))?;
    pool::publish_topology(&op, &t).await?;
    op.put(&keys::postgres_password("pc1", "server"), b"s3cret")
        .await?;
    op.put(&keys::postgres_password("pc1", "replication"), b"r3pl")
        .await?;

    // No client certificate: the TLS handshake fails, nothing is read.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        r.add(first_cert(&secure.pki().join("ca.crt")))?;
        r
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let nobody = Etcd::with_tls(&eps, &anonymous, None)?;
    match nobody.get(&keys::state("pc1")).await {
        Err(EtcdError::Unreachable { last, .. }) => {
            assert!(last.to_lowercase().contains("certificate"), "{last}")
        }
        other => panic!("a client without a certificate got {other:?}"),
    }
    // A certificate from another CA: refused the same way.
    let stranger_dir = tempfile::tempdir()?;
    let stranger_ca = pchat_tls::pki::init(stranger_dir.path(), "pc1")?;
    let spec = t.identity_spec(&Who::Operator("admin".into())).unwrap();
    stranger_ca.issue(&spec, false)?;
    std::fs::copy(
        secure.pki().join("ca.crt"),
        stranger_ca.dir_of(&spec).join("ca.crt"),
    )?;
    let stranger = OwnIdentity::load(&stranger_ca.dir_of(&spec))?;
    assert!(matches!(
        stranger.etcd_as(&eps, None)?.get(&keys::state("pc1")).await,
        Err(EtcdError::Unreachable { .. })
    ));

    // A pool certificate without etcd credentials, or with a wrong password: nothing read.
    let s1_id = OwnIdentity::load(&secure.dir_of(&server("s1")))?;
    let err = s1_id
        .etcd_as(&eps, None)?
        .get(&keys::state("pc1"))
        .await
        .expect_err("no user");
    assert!(matches!(err, EtcdError::Unauthenticated { .. }), "{err:?}");
    let wrong = s1_id.etcd_as(
        &eps,
        Some(Credentials {
            user: "server-s1".into(),
            password: "guess".into(),
        }),
    )?;
    let err = wrong.get(&keys::state("pc1")).await.expect_err("wrong pw");
    assert!(matches!(err, EtcdError::Unauthenticated { .. }), "{err:?}");

    // Server s1: reads the pool and its secret, writes only its own keys.
    let s1 = secure.client(&server("s1"))?;
    assert_eq!(s1.user(), Some("server-s1"));
    assert!(pool::get(&s1, "pc1").await.is_ok());
    assert_eq!(
        s1.get(&keys::postgres_password("pc1", "server"))
            .await?
            .map(|kv| kv.value),
        Some(b"s3cret".to_vec())
    );
    denied(
        s1.get(&keys::postgres_password("pc1", "replication")).await,
        "server reads the replication password",
    );
    denied(
        s1.put(&keys::postgres_password("pc1", "server"), b"mine")
            .await,
        "server changes its PostgreSQL password",
    );
    denied(
        s1.put(&keys::state("pc1"), b"{}").await,
        "server writes the pool state",
    );
    denied(
        s1.put(&keys::server_alive("pc1", "s2"), b"1").await,
        "server s1 writes s2's alive key",
    );
    denied(
        s1.put(&keys::topology("pc1"), b"{}").await,
        "server writes the topology",
    );
    denied(
        s1.put(&keys::fence("pc1", "a_db"), b"null").await,
        "server fences an instance",
    );
    let lease = s1.lease_grant(5).await?;
    s1.put_with_lease(&keys::server_alive("pc1", "s1"), b"1", lease)
        .await?;
    assert!(s1.lease_keepalive(lease).await?.is_some());
    s1.lease_revoke(lease).await?;
    assert!(s1.get(&keys::server_alive("pc1", "s1")).await?.is_none());

    // Agent a_db (site A): its site's instances and keys, nothing of site B or the pool's.
    let a_db = secure.client(&agent("a_db"))?;
    a_db.put(&keys::status("pc1", "a_db"), b"{}").await?;
    a_db.put(&keys::fence("pc1", "a_mirror"), b"null").await?;
    a_db.put(&keys::mirroring("pc1", "A"), b"{}").await?;
    let lease = a_db.lease_grant(5).await?;
    assert!(a_db
        .put_if_absent(&keys::leader("pc1", "A"), b"a_db", Some(lease))
        .await?
        .is_some());
    a_db.lease_revoke(lease).await?;
    assert!(a_db
        .get(&keys::postgres_password("pc1", "replication"))
        .await?
        .is_some());
    denied(
        a_db.get(&keys::postgres_password("pc1", "server")).await,
        "agent reads the servers' password",
    );
    denied(
        a_db.put(&keys::postgres_password("pc1", "replication"), b"mine")
            .await,
        "agent changes the replication password",
    );
    denied(
        a_db.put(&keys::status("pc1", "b_db"), b"{}").await,
        "agent of site A writes site B's instance",
    );
    denied(
        a_db.put(&keys::fence("pc1", "b_db"), b"null").await,
        "agent of site A fences site B's instance",
    );
    denied(
        a_db.put(&keys::leader("pc1", "B"), b"a_db").await,
        "agent of site A takes site B's leader key",
    );
    denied(
        a_db.put(&keys::mirroring("pc1", "B"), b"{}").await,
        "agent of site A writes site B's mirroring",
    );
    denied(
        a_db.put(&keys::state("pc1"), b"{}").await,
        "agent writes the pool state",
    );
    denied(
        a_db.put(&keys::server_alive("pc1", "s1"), b"1").await,
        "agent writes a server's key",
    );
    denied(
        a_db.put(&keys::log_shipping("pc1"), b"{}").await,
        "agent writes the log-shipping configuration",
    );
    let b_db = secure.client(&agent("b_db"))?;
    b_db.put(&keys::mirroring("pc1", "B"), b"{}").await?;
    denied(
        b_db.put(&keys::mirroring("pc1", "A"), b"{}").await,
        "agent of site B writes site A's mirroring",
    );
    // Outside every pool: nobody but the operators.
    denied(
        s1.get("/pchat/pools/other/state").await,
        "server reads another pool",
    );

    // The operator: everything of the pool, and its secrets.
    op.put(&keys::state("pc1"), b"{}").await?;
    op.put(&keys::server_alive("pc1", "s2"), b"1").await?;
    op.put(&keys::fence("pc1", "b_db"), b"null").await?;
    pool::publish_topology(&op, &t).await?;

    // The topology changes: s2 leaves, s3 joins. The setup removes s2's user, adds s3's;
    // clients logged in before it keep working (they log in again once).
    let servers = [("s1", "A"), ("s3", "A"), ("b1", "B")];
    let t2 = secure.issue(&topology_text(&eps, &servers), &["admin"])?;
    let s2 = secure.client(&server("s2"))?;
    assert!(s2.get(&keys::state("pc1")).await.is_ok());
    let done = secure.setup(&t2, "admin").await?;
    assert!(
        done.contains(&"removed user server-s2".to_owned()),
        "{done:?}"
    );
    assert!(
        done.contains(&"removed role pchat-server-s2".to_owned()),
        "{done:?}"
    );
    assert!(done.iter().any(|l| l.starts_with("created user server-s3")));
    let err = s2.get(&keys::state("pc1")).await.expect_err("s2 is gone");
    assert!(matches!(err, EtcdError::Unauthenticated { .. }), "{err:?}");
    assert!(s1.get(&keys::state("pc1")).await.is_ok());
    let s3 = secure.client(&server("s3"))?;
    s3.put(&keys::server_alive("pc1", "s3"), b"1").await?;

    // Every member restarted: the tokens they held in memory are gone; clients log in again.
    for i in 0..3 {
        secure.cluster.restart(i).await?;
    }
    assert!(s1.get(&keys::state("pc1")).await.is_ok());
    a_db.put(&keys::status("pc1", "a_db"), b"{}").await?;
    Ok(())
}

/// The setup runs only with an operator's identity; the root password is the operator's.
#[tokio::test]
async fn setup_needs_the_operator_who_enabled_it() -> anyhow::Result<()> {
    let secure = common::SecureEtcd::start("pc1", 1).await?;
    let eps = secure.endpoints();
    let t = secure.issue(&topology_text(&eps, &[("s1", "A")]), &["admin", "night"])?;
    let err = pchat_control::auth::root_client(&eps, &secure.dir_of(&server("s1")))
        .expect_err("a server is not an operator");
    assert!(err.to_string().contains("operator"), "{err}");
    secure.setup(&t, "admin").await?;
    // Both operators have users; only admin's password is root's.
    let night = secure.client(&Who::Operator("night".into()))?;
    night.put(&keys::state("pc1"), b"{}").await?;
    let err = secure
        .setup(&t, "night")
        .await
        .expect_err("night is not root");
    assert!(err.to_string().contains("root"), "{err}");
    // An identity without TLS endpoints, or no identity for TLS endpoints: a clear refusal.
    let plain = pchat_control::EtcdAccess {
        endpoints: eps.clone(),
        tls_dir: None,
        hint: "--tls-dir DIR",
    }
    .connect(Some("pc1"))
    .expect_err("https needs an identity");
    assert!(plain.to_string().contains("--tls-dir DIR"), "{plain}");
    let other_pool = pchat_control::EtcdAccess {
        endpoints: eps,
        tls_dir: Some(secure.dir_of(&server("s1"))),
        hint: "--tls-dir DIR",
    }
    .connect(Some("pc2"))
    .expect_err("identity of another pool");
    assert!(
        other_pool.to_string().contains("not of pool pc2"),
        "{other_pool}"
    );
    Ok(())
}

/// The first certificate of a PEM file.
fn first_cert(path: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_file(path).expect("a PEM certificate")
}

/// Whether `password` logs in as etcd's `root` over the operator's TLS identity.
async fn root_accepts(
    secure: &common::SecureEtcd,
    operator: &std::path::Path,
    password: &str,
) -> bool {
    let me = OwnIdentity::load(operator).expect("operator identity");
    let root = me
        .etcd_as(
            &secure.endpoints(),
            Some(Credentials {
                user: "root".into(),
                password: password.into(),
            }),
        )
        .expect("client");
    match root.get("/pchat/probe").await {
        Ok(_) => true,
        Err(EtcdError::Unauthenticated { .. }) => false,
        Err(e) => panic!("{e}"),
    }
}

/// Root's password rotates (`pchat control auth rotate-root`): the old one stops working,
/// the operator's file holds the new one, the operator and the setup go on working with it,
/// and a rotation cut short after etcd changed is finished by running it again.
#[tokio::test]
async fn roots_password_rotates() -> anyhow::Result<()> {
    let secure = common::SecureEtcd::start("pc1", 1).await?;
    let eps = secure.endpoints();
    let t = secure.issue(&topology_text(&eps, &[("s1", "A")]), &["admin"])?;
    secure.setup(&t, "admin").await?;
    let admin = secure.dir_of(&Who::Operator("admin".into()));
    let file = admin.join("etcd.password");
    let old = std::fs::read_to_string(&file)?.trim().to_owned();
    assert!(root_accepts(&secure, &admin, &old).await);

    let done = pchat_control::auth::rotate_root(&eps, &admin).await?;
    assert_eq!(done.len(), 3, "{done:?}");
    let new = std::fs::read_to_string(&file)?.trim().to_owned();
    assert_ne!(new, old);
    assert!(!admin.join("etcd.password.next").exists());
    assert!(
        !root_accepts(&secure, &admin, &old).await,
        "the old password"
    );
    assert!(
        root_accepts(&secure, &admin, &new).await,
        "the new password"
    );
    // The operator's own user follows, and so does the setup.
    let etcd = secure.client(&Who::Operator("admin".into()))?;
    etcd.put(&keys::state("pc1"), b"{}").await?;
    secure.setup(&t, "admin").await?;

    // Interrupted: etcd has the next password, the file does not yet.
    let next = "the-next-password-0123456789abcdef";
    pchat_tls::fs::write_private(&admin.join("etcd.password.next"), next.as_bytes())?;
    let me = OwnIdentity::load(&admin)?;
    let root = me.etcd_as(
        &eps,
        Some(Credentials {
            user: "root".into(),
            password: new.clone(),
        }),
    )?;
    root.get("/pchat/probe").await?;
    // What the first step of an earlier run did, with etcd's own API.
    let changed = pchat_control::auth::change_password(&root, "root", next).await;
    assert!(changed.is_ok(), "{changed:?}");
    assert!(root_accepts(&secure, &admin, next).await);
    let done = pchat_control::auth::rotate_root(&eps, &admin).await?;
    assert!(done[0].contains("interrupted"), "{done:?}");
    assert_eq!(std::fs::read_to_string(&file)?.trim(), next);
    secure.setup(&t, "admin").await?;
    Ok(())
}
