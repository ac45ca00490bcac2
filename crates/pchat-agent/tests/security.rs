//! Who gets into an agent's PostgreSQL, and what root does in `postgres`'s directories
//! (issue 11 §1, §2): checked with real instances, a real local user and real links.
//!
//! - A local OS user who is neither `postgres` nor root cannot connect as the superuser,
//!   over the unix socket or over TCP (there is no `trust`, and no superuser line for TCP).
//! - The servers' role, made by the agent's install, can do the store's work and no
//!   administration: no `COPY … TO PROGRAM`, no functions, tables or settings of its own,
//!   no other database; without TLS it is not let in at all.
//! - Links planted by `postgres` where the agent writes are replaced, never followed, and a
//!   `postgresql.auto.conf` that is a link stops the start: their targets are unchanged.
//! - A mirror cloned from a principal keeps none of the principal's settings (an
//!   `archive_cleanup_command` set there would run on the mirror), and streams over TLS as
//!   the replication role.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{connect, init_principal, Lab, Node, PG_BIN};
use pchat_procedures::mirror;

/// A throw-away OS user, removed when dropped.
struct LocalUser(String);

impl LocalUser {
    fn create() -> LocalUser {
        let name = format!("pchat-t{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .output()
            .expect("useradd (the passwd package)");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LocalUser(name)
    }

    /// `psql` as this user; its output.
    fn psql(&self, conninfo: &str, password: Option<&str>) -> Output {
        let mut c = Command::new("runuser");
        c.args(["-u", &self.0, "--"])
            .arg(Path::new(PG_BIN).join("psql"))
            .args(["-X", "-A", "-t", "-w", "-c", "SELECT current_user"])
            .arg(conninfo)
            .current_dir("/")
            .stdin(Stdio::null());
        if let Some(pw) = password {
            c.env("PGPASSWORD", pw);
        }
        c.output().expect("runuser psql")
    }
}

impl Drop for LocalUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).output();
    }
}

/// What PostgreSQL said (tokio-postgres's own text is only "db error").
fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => format!("{e:?}"),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A TLS session to `node`'s `db` as `user`, verified against `node`'s pinned name.
async fn tls_session(
    lab: &Lab,
    node: &Node,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let id = pchat_tls::Identity::load(&lab.root.path().join("pki/instances/a_db")).unwrap();
    let tls = pchat_tls::postgres::MakeRustlsConnect::new(
        id.client_config(pchat_tls::PeerName::Dialled).unwrap(),
    );
    let mut config: tokio_postgres::Config = format!(
        "host={} hostaddr=127.0.0.1 port={} user={user} dbname={db} connect_timeout=5 sslmode=require",
        node.tls_name(),
        node.cfg.port
    )
    .parse()
    .unwrap();
    config.password(password);
    let (client, conn) = config.connect(tls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_but_postgres_and_root_is_the_superuser_and_the_server_role_is_small() {
    let lab = Lab::new(&["a_db"], false).await;
    let n = &lab.nodes[0];
    init_principal(n).await;
    // Let every local user reach the socket, so that only the authentication rules decide
    // (the agent makes the directory 0700 too, which alone would stop them).
    std::fs::set_permissions(&n.cfg.socket_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = LocalUser::create();

    let socket = format!(
        "host={} port={} user=postgres dbname=postgres",
        n.cfg.socket_dir.display(),
        n.cfg.port
    );
    let o = user.psql(&socket, None);
    assert!(
        !o.status.success(),
        "a local user became postgres over the socket"
    );
    assert!(
        stderr(&o).contains("Peer authentication failed"),
        "{}",
        stderr(&o)
    );
    for sslmode in ["require", "disable"] {
        let tcp = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode}",
            n.cfg.port
        );
        let o = user.psql(&tcp, Some(""));
        assert!(
            !o.status.success(),
            "a local user became postgres over TCP ({sslmode})"
        );
        assert!(
            stderr(&o).contains("no pg_hba.conf entry"),
            "{}",
            stderr(&o)
        );
    }
    // Root still is (the agent connects so).
    let root = connect(&n.conn()).await;
    let me: String = root
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(me, "postgres");

    // The install makes the servers' role; connected as a server connects, it works on the
    // pchat tables and can do nothing else.
    let password = pchat_tls::fs::random_secret();
    n.client
        .install(&password, &mut |_| {})
        .await
        .expect("install");
    let s = tls_session(&lab, n, "pchat_server", &password, "mgc")
        .await
        .expect("the servers' role over TLS");
    s.batch_execute("SELECT count(*) FROM room").await.unwrap();
    for sql in [
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TABLE mine (x int)",
        "CREATE TEMPORARY TABLE mine (x int)",
        "ALTER SYSTEM SET work_mem = '1GB'",
        "CREATE ROLE another LOGIN",
    ] {
        let e = s.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            e.code().map(|c| c.code()),
            Some("42501"),
            "{sql} must be refused for lack of privilege: {e}"
        );
    }
    // Only mgc and mgccomp, only with the right password, only over TLS.
    for (db, pw) in [
        ("postgres", password.as_str()),
        ("mgc", "wrong-password-0123456789"),
    ] {
        let e = match tls_session(&lab, n, "pchat_server", pw, db).await {
            Ok(_) => panic!("pchat_server got into {db}"),
            Err(e) => pg_text(&e),
        };
        assert!(
            e.contains("no pg_hba.conf entry") || e.contains("password authentication failed"),
            "{e}"
        );
    }
    let mut plain: tokio_postgres::Config = format!(
        "host=127.0.0.1 port={} user=pchat_server dbname=mgc connect_timeout=5 sslmode=disable",
        n.cfg.port
    )
    .parse()
    .unwrap();
    plain.password(password.as_str());
    let e = match plain.connect(tokio_postgres::NoTls).await {
        Ok(_) => panic!("a plaintext TCP connection was let in"),
        Err(e) => pg_text(&e),
    };
    assert!(e.contains("no encryption"), "{e}");
    // A rotated password works from the next session on, and the old one no longer does.
    let new = pchat_tls::fs::random_secret();
    n.client
        .set_role_password(pchat_control::postgres::PgRole::Server, &new)
        .await
        .unwrap();
    assert!(tls_session(&lab, n, "pchat_server", &password, "mgc")
        .await
        .is_err());
    tls_session(&lab, n, "pchat_server", &new, "mgc")
        .await
        .expect("the new password");
    // The session opened before the rotation still works.
    s.batch_execute("SELECT 1").await.unwrap();
}

/// Runs `ln -s TARGET LINK` as `postgres`, as a compromised database account would.
fn plant_link(target: &Path, link: &Path) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", "ln", "-sfn"])
        .arg(target)
        .arg(link)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_planted_by_postgres_are_replaced_or_refused_never_followed() {
    let lab = Lab::new(&["a_db"], false).await;
    let n = &lab.nodes[0];
    init_principal(n).await;
    n.client.stop(false).await.unwrap();
    // Files only root may write, which postgres would like root to write for it.
    let vault = lab.root.path().join("vault");
    std::fs::create_dir(&vault).unwrap();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o755)).unwrap();
    let targets: Vec<_> = (0..5)
        .map(|i| {
            let t = vault.join(format!("authorized_keys{i}"));
            std::fs::write(&t, format!("root's own {i}\n")).unwrap();
            t
        })
        .collect();
    let data = &n.cfg.data_dir;
    let private = {
        let mut p = data.clone().into_os_string();
        p.push(".private");
        std::path::PathBuf::from(p)
    };
    // Where the agent writes at every start: the access files (and the temporary name the
    // old agent used), the instance's key, its replication passfile.
    plant_link(&targets[0], &data.join("pg_hba.conf.pchat-tmp"));
    plant_link(&targets[1], &data.join("pg_hba.conf"));
    plant_link(&targets[2], &data.join("pg_ident.conf"));
    plant_link(&targets[3], &private.join("server.key"));
    plant_link(&targets[4], &data.join("postgresql.auto.conf.pchat-tmp"));
    n.client.start().await.expect("start replaces the links");
    for (i, t) in targets.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(t).unwrap(),
            format!("root's own {i}\n"),
            "{} was written through a link",
            t.display()
        );
        assert_eq!(
            std::fs::metadata(t).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
    for f in [
        data.join("pg_hba.conf"),
        data.join("pg_ident.conf"),
        private.join("server.key"),
    ] {
        let m = std::fs::symlink_metadata(&f).unwrap();
        assert!(m.file_type().is_file(), "{} is still a link", f.display());
    }
    // A postgresql.auto.conf that is a link is not read (it could hand root any file) and
    // stops the start with a clear error.
    n.client.stop(false).await.unwrap();
    let auto = data.join("postgresql.auto.conf");
    std::fs::copy(&auto, lab.root.path().join("auto.conf.saved")).unwrap();
    plant_link(&targets[0], &auto);
    let err = n
        .client
        .start()
        .await
        .expect_err("a linked auto.conf")
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&targets[0]).unwrap(),
        "root's own 0\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_keeps_none_of_the_sources_settings_and_streams_over_tls() {
    let lab = Lab::new(&["a_db", "a_mirror"], true).await;
    let (p, m) = (&lab.nodes[0], &lab.nodes[1]);
    init_principal(p).await;
    let ctx = lab.publish().await;
    // Settings another host set, which would run commands here or change what we are.
    let pc = connect(&p.conn()).await;
    let marker = lab.root.path().join("cleanup-ran");
    for setting in ["archive_cleanup_command", "recovery_end_command"] {
        pc.batch_execute(&format!(
            "ALTER SYSTEM SET {setting} = 'touch {}'",
            marker.display()
        ))
        .await
        .unwrap();
    }
    let conf = p.cfg.data_dir.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("cluster_name = 'planted'\n");
    std::fs::write(&conf, text).unwrap();
    pc.batch_execute("SELECT pg_reload_conf()").await.unwrap();

    mirror::add(&ctx, None, false, &mut |_| {})
        .await
        .expect("mirror add");
    let mc = connect(&m.conn()).await;
    for (setting, want) in [
        ("archive_cleanup_command", ""),
        ("recovery_end_command", ""),
        ("cluster_name", ""),
        ("primary_slot_name", "a_mirror"),
        ("ssl", "on"),
    ] {
        let got: String = mc
            .query_one(&format!("SELECT current_setting('{setting}')"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "the mirror's {setting}");
    }
    let auto = std::fs::read_to_string(m.cfg.data_dir.join("postgresql.auto.conf")).unwrap();
    assert!(!auto.contains("touch"), "{auto}");
    assert!(
        !auto.contains("password"),
        "no password in the data directory: {auto}"
    );
    assert!(!marker.exists());
    // The principal sees its mirror as the replication role, over TLS.
    let row = pc
        .query_one(
            "SELECT r.usename::text, s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await
        .unwrap();
    let (user, ssl): (String, bool) = (row.get(0), row.get(1));
    assert_eq!((user.as_str(), ssl), ("pchat_replication", true));
}

/// `db rotate-password --role replication` with a synchronous mirror: the principal takes the
/// new password, etcd holds it, the mirror's agent writes it into the passfile; the running
/// stream is not broken, and a mirror that restarts connects with the new password (the old
/// one no longer works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_password_rotates_under_a_synchronous_mirror() {
    let lab = Lab::new(&["a_db", "a_mirror"], true).await;
    let (p, m) = (&lab.nodes[0], &lab.nodes[1]);
    let ctx = lab.mirrored().await;
    // As the operator: etcd takes only clients with a certificate of the pool.
    let etcd = lab.pki.operator(&lab.etcd().endpoints());
    let role = pchat_control::postgres::PgRole::Replication;
    let old = pchat_control::postgres::read_password(&etcd, "pc1", role)
        .await
        .unwrap()
        .expect("mirror add made one");
    let r = pchat_procedures::credentials::rotate_password(&ctx, role, &mut |_| {})
        .await
        .expect("rotate");
    assert_eq!(
        (r.principal.as_str(), r.refreshed.as_slice()),
        ("a_db", &["a_mirror".to_owned()][..])
    );
    let new = pchat_control::postgres::read_password(&etcd, "pc1", role)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(old, new);
    let mut passfile = m.cfg.data_dir.clone().into_os_string();
    passfile.push(".private/replication.pgpass");
    let text = std::fs::read_to_string(&passfile).unwrap();
    assert!(
        text.ends_with(&format!(":{new}\n")),
        "the mirror's passfile has the new password"
    );
    let mode = std::fs::metadata(&passfile).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A replication connection (TLS, verify-full) takes the new password only.
    let replication_login = |pw: &str| {
        Command::new(Path::new(PG_BIN).join("psql"))
            .args(["-X", "-A", "-t", "-w", "-c", "IDENTIFY_SYSTEM"])
            .arg(format!(
                "host={} hostaddr=127.0.0.1 port={} user=pchat_replication replication=true \
                 sslmode=verify-full sslrootcert={}",
                p.tls_name(),
                p.cfg.port,
                lab.root.path().join("pki/ca.crt").display()
            ))
            .env("PGPASSWORD", pw)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(!replication_login(&old), "the old password still works");
    assert!(replication_login(&new), "the new password does not work");
    // Commits still wait for (and get) the mirror.
    let pc = connect(&p.conn()).await;
    pc.execute("INSERT INTO ledger VALUES (1, 'after the rotation')", &[])
        .await
        .unwrap();
    // The mirror restarts: it logs in with the new password and catches up.
    m.client.stop(false).await.unwrap();
    m.client.start().await.unwrap();
    common::until(
        std::time::Duration::from_secs(30),
        "the mirror streams again after its restart",
        || async {
            p.client
                .status()
                .await
                .is_ok_and(|s| s.mirroring.state == pchat_agent_api::MirroringState::Synchronized)
        },
    )
    .await;
    let row = pc
        .query_one("SELECT usename::text FROM pg_stat_replication", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pchat_replication");
}

/// An agent whose data directory sits in a directory `postgres` may write refuses to start:
/// it writes beside the data directory as root, and `postgres` could swap those names.
#[tokio::test]
async fn a_data_directory_in_a_postgres_owned_parent_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let parent = root.path().join("pg-owned");
    std::fs::create_dir(&parent).unwrap();
    let out = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&parent)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = root.path().join("agent.token");
    pchat_tls::fs::write_private(&token, common::TOKEN.as_bytes()).unwrap();
    let cfg = pchat_agent::AgentConfig::parse(&format!(
        "listen = \"127.0.0.1:0\"\ntoken_file = \"{}\"\ndata_dir = \"{}/data\"\npool = \"pc1\"\n\
         instance = \"a_db\"\ninsecure = true\n",
        token.display(),
        parent.display()
    ))
    .unwrap();
    let err = match pchat_agent::serve(cfg).await {
        Ok(_) => panic!("the agent started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("the data directory's parent"), "{err}");
}
