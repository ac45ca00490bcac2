//! The external directory (`[directory]`) against a real OpenLDAP (`slapd`, started by the
//! test kit in a temporary directory, TLS only): directory groups (nested) and OUs as
//! principals of a category's wall, logins with the directory's passwords (`auth = "ldap"`,
//! PLAIN over TLS only), a user removed from a group in LDAP removed from the room within one
//! refresh, an LDAP outage that keeps the last reading in force, and configurations that
//! cannot work refused at start with the fix.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pchat_testkit::ldap::{Group, Slapd, Tree, User, BASE, SERVICE_DN, SERVICE_PASSWORD};
use pchat_testkit::{ns, status_codes, Client, Error, Mechanism, ServerOptions, TestServer};

type R = anyhow::Result<()>;

const ROOMS: &str = "conference.localhost";
const T: Duration = Duration::from_secs(10);
/// `[directory] refresh_s` in these tests.
const REFRESH_S: u64 = 5;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn user(uid: &str, ous: &[&str]) -> User {
    User {
        uid: uid.into(),
        password: format!("{uid}-ldap-pw"),
        ous: ous.iter().map(|s| s.to_string()).collect(),
    }
}

fn group(cn: &str, members: &[&str]) -> Group {
    Group {
        cn: cn.into(),
        members: members.iter().map(|s| s.to_string()).collect(),
    }
}

/// alice is in Legal (an OU) and in fx, which is nested in traders; bob is a trader; carol
/// is a trader and in compliance (denied); dave is in nothing.
fn tree() -> Tree {
    Tree {
        users: vec![
            user("alice", &["legal"]),
            user("bob", &[]),
            user("carol", &[]),
            user("dave", &[]),
        ],
        groups: vec![
            group("traders", &["group:fx", "user:bob", "user:carol"]),
            group("fx", &["user:alice"]),
            group("compliance", &["user:carol"]),
        ],
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// A data directory whose `pchat.toml` names the directory at `url`.
fn data_dir(ldap: &Slapd, url: &str, auth: &str) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("pchat-ldap-").tempdir()?;
    let pw = dir.path().join("ldap-bind.pw");
    write_private(&pw, SERVICE_PASSWORD)?;
    let toml = format!(
        "[directory]\nurl = \"{url}\"\nca_file = \"{ca}\"\nbind_dn = \"{SERVICE_DN}\"\n\
         bind_password_file = \"{pw}\"\nbase_dn = \"{BASE}\"\nrefresh_s = {REFRESH_S}\n\
         timeout_ms = 3000\nauth = \"{auth}\"\n",
        ca = ldap.ca_file().display(),
        pw = pw.display(),
    );
    std::fs::write(dir.path().join("pchat.toml"), toml)?;
    Ok(dir)
}

async fn start(dir: &Path) -> anyhow::Result<TestServer> {
    Ok(TestServer::start(
        &bin(),
        ServerOptions {
            data_dir: Some(dir.to_owned()),
            ..ServerOptions::default()
        },
    )
    .await?)
}

async fn login(s: &TestServer, uid: &str, password: &str) -> Result<Client, Error> {
    let mut o = s.connect_options(&format!("{uid}@localhost"), password);
    o.mechanism = Mechanism::Plain;
    Client::connect(o).await
}

async fn shell(s: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let out = s.run_cli_ok(args.iter().copied()).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn condition(e: &Error) -> Option<&str> {
    match e {
        Error::Stanza { error, .. } => Some(error.condition.as_str()),
        Error::Sasl { condition, .. } => Some(condition.as_str()),
        _ => None,
    }
}

/// Joins, retrying while the server has not read the directory yet (its first reading runs
/// in the background after the start).
async fn join(c: &mut Client, room: &str, nick: &str) -> Result<(), Error> {
    let until = Instant::now() + T;
    loop {
        match c.join_room(room, nick, None).await {
            Err(e) if condition(&e) == Some("internal-server-error") && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r.map(|_| ()),
        }
    }
}

#[tokio::test]
async fn directory_groups_and_ous_make_a_wall_and_ldap_changes_apply_within_a_refresh() -> R {
    let mut ldap = Slapd::start(tree())?;
    let dir = data_dir(&ldap, &ldap.ldaps_url(), "ldap")?;
    let s = start(dir.path()).await?;
    shell(
        &s,
        &[
            "category",
            "new",
            "trading",
            "--add-allowed",
            "ldap:Traders",
            "--add-allowed",
            "ou:legal",
            "--add-denied",
            "ldap:compliance",
        ],
    )
    .await?;
    let shown = shell(&s, &["category", "get", "trading", "--json"]).await?;
    assert!(
        shown.contains("ldap:traders") && shown.contains("ou:legal"),
        "{shown}"
    );
    shell(
        &s,
        &[
            "room",
            "new",
            "desk",
            "--category",
            "trading",
            "--privacy",
            "open",
        ],
    )
    .await?;
    let desk = format!("desk@{ROOMS}");

    // Logins: the directory's passwords, PLAIN only (SCRAM is not offered), wrong or empty
    // passwords and unknown users refused.
    let mut alice = login(&s, "alice", "alice-ldap-pw").await?;
    for (uid, pw) in [
        ("alice", "wrong"),
        ("alice", ""),
        ("nobody", "x"),
        ("alice*", "alice-ldap-pw"),
    ] {
        let e = login(&s, uid, pw).await.unwrap_err();
        assert_eq!(condition(&e), Some("not-authorized"), "{uid}/{pw}: {e}");
    }
    let mut scram = s.connect_options("bob@localhost", "bob-ldap-pw");
    scram.mechanism = Mechanism::ScramSha256;
    let e = Client::connect(scram).await.unwrap_err();
    assert!(
        e.to_string().contains("SCRAM") || e.to_string().contains("mechanism"),
        "{e}"
    );

    // The wall: alice through fx ⊂ traders and through ou:legal, bob through traders; carol is
    // a trader but in compliance (denied wins); dave is in nothing.
    join(&mut alice, &desk, "alice").await?;
    let mut bob = login(&s, "bob", "bob-ldap-pw").await?;
    join(&mut bob, &desk, "bob").await?;
    for uid in ["carol", "dave"] {
        let mut c = login(&s, uid, &format!("{uid}-ldap-pw")).await?;
        let e = join(&mut c, &desk, uid).await.unwrap_err();
        assert_eq!(condition(&e), Some("item-not-found"), "{uid}: {e}");
    }

    // bob leaves traders in LDAP: within one refresh he is removed from the room (321).
    let t0 = Instant::now();
    ldap.remove_member("traders", "user:bob")?;
    let p = bob
        .recv_until(Duration::from_secs(REFRESH_S * 3), |st| {
            st.is("presence", ns::CLIENT)
                && st.attr("type") == Some("unavailable")
                && status_codes(st).contains(&110)
        })
        .await?;
    let took = t0.elapsed();
    assert!(status_codes(&p).contains(&321), "{p}");
    assert!(
        took <= Duration::from_secs(REFRESH_S + 3),
        "removed after {took:?}"
    );
    eprintln!("LDAP group change to status 321: {took:?} (refresh_s = {REFRESH_S})");
    let e = join(&mut bob, &desk, "bob").await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");

    // The directory goes down: the last reading stays in force (alice stays and may come
    // back; bob stays out), and logins say the directory cannot be reached.
    ldap.stop();
    tokio::time::sleep(Duration::from_secs(REFRESH_S + 1)).await;
    alice.send_groupchat(&desk, "still here", None).await?;
    let e = join(&mut bob, &desk, "bob").await.unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    let e = login(&s, "dave", "dave-ldap-pw").await.unwrap_err();
    assert_eq!(condition(&e), Some("temporary-auth-failure"), "{e}");

    // Back, with bob in traders again: he may join within a refresh.
    ldap.restart()?;
    ldap.add_member("traders", "user:bob")?;
    let until = Instant::now() + Duration::from_secs(REFRESH_S * 3);
    loop {
        match join(&mut bob, &desk, "bob").await {
            Ok(()) => break,
            Err(e) if Instant::now() < until => {
                assert_eq!(condition(&e), Some("item-not-found"), "{e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[tokio::test]
async fn starttls_works_and_configurations_that_cannot_work_are_refused_at_start() -> R {
    let ldap = Slapd::start(tree())?;
    // ldap:// means StartTLS; local passwords with directory groups.
    let dir = data_dir(&ldap, &ldap.ldap_url(), "local")?;
    let s = start(dir.path()).await?;
    s.add_user("dave@localhost", "dave-local-pw").await?;
    shell(
        &s,
        &["category", "new", "legal", "--add-allowed", "ou:legal"],
    )
    .await?;
    shell(
        &s,
        &[
            "room",
            "new",
            "counsel",
            "--category",
            "legal",
            "--privacy",
            "open",
        ],
    )
    .await?;
    s.add_user("alice@localhost", "alice-local-pw").await?;
    let mut alice = s.client("alice@localhost", "alice-local-pw").await?;
    join(&mut alice, &format!("counsel@{ROOMS}"), "alice").await?;
    let mut dave = s.client("dave@localhost", "dave-local-pw").await?;
    let e = join(&mut dave, &format!("counsel@{ROOMS}"), "dave")
        .await
        .unwrap_err();
    assert_eq!(condition(&e), Some("item-not-found"), "{e}");
    drop(s);

    // Each of these stops the start with a message that names the fix.
    let pw_file = dir.path().join("ldap-bind.pw");
    let cases: Vec<(String, &str)> = vec![
        (
            "[directory]\nurl = \"http://127.0.0.1\"\n".to_owned(),
            "ldaps://",
        ),
        (
            format!(
                "[directory]\nurl = \"{}\"\nca_file = \"{}\"\nbind_dn = \"x\"\nbind_password_file = \"{}\"\nbase_dn = \"{BASE}\"\n",
                ldap.ldaps_url(),
                ldap.ca_file().display(),
                pw_file.display()
            ),
            "chmod 600",
        ),
        (
            "[directory]\nauth = \"ldap\"\n".to_owned(),
            "directory.url",
        ),
        (
            format!(
                "[directory]\nurl = \"{}\"\nca_file = \"/nonexistent/ca.pem\"\nbind_dn = \"x\"\nbind_password_file = \"/x\"\nbase_dn = \"{BASE}\"\n",
                ldap.ldaps_url()
            ),
            "ca_file",
        ),
    ];
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o644))?;
    for (toml, fix) in cases {
        let d = tempfile::Builder::new()
            .prefix("pchat-ldap-bad-")
            .tempdir()?;
        std::fs::write(d.path().join("pchat.toml"), &toml)?;
        let out = std::process::Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(d.path())
            .args(["--domain", "localhost", "--bind-addr", "127.0.0.1"])
            .args(["--c2s-port", "0", "--c2s-tls-port", "0", "--http-port", "0"])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml} must not start");
        assert!(err.contains(fix), "{toml}: {err}");
    }
    Ok(())
}
