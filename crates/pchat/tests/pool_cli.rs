//! The pool commands of the management shell against a real 3-member etcd with TLS and
//! authentication, as an operator; and what the shell and a server do without the right
//! identity.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::secure::SecureEtcd;
use pchat_testkit::etcd::EtcdCluster;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// `pchat ARGS` with the environment `env` (and nothing of the test's own pchat settings).
fn pchat_env(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env_remove("PCHAT_TLS_DIR")
        .env_remove("PCHAT_ETCD")
        .envs(env.iter().cloned())
        .output()
        .expect("run pchat")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn topology(eps: &[String]) -> String {
    let eps = eps
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "share = \"/tmp/share\"\netcd = [{eps}]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\nactive_servers_max = 2\n\
         [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ name = \"a_db\", address = \"127.0.0.1:5432\", agent = \"https://127.0.0.1:7070\" }}\n\
         [[sites]]\nname = \"B\"\nrole = \"backup\"\ndatabase = {{ name = \"b_db\", address = \"127.0.0.1:5433\", agent = \"https://127.0.0.1:7071\" }}\n\
         [[servers]]\nname = \"a1\"\nsite = \"A\"\naddress = \"127.0.0.1:5222\"\n\
         [[servers]]\nname = \"a2\"\nsite = \"A\"\naddress = \"127.0.0.1:5322\"\n\
         [[servers]]\nname = \"a3\"\nsite = \"A\"\naddress = \"127.0.0.1:5522\"\n\
         [[servers]]\nname = \"b1\"\nsite = \"B\"\naddress = \"127.0.0.1:5422\"\n"
    )
}

#[tokio::test]
async fn topology_and_pool_commands() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secure = SecureEtcd::start(
        dir.path(),
        "pc1",
        3,
        &["a_db", "b_db"],
        &["a1", "a2", "a3", "b1"],
    )
    .await?;
    let eps = secure.endpoints();
    let env = secure.env();
    let pchat = |args: &[&str]| pchat_env(args, &env);
    let file = dir.path().join("topology.toml");

    // A bad file: every problem with its line, nothing published.
    std::fs::write(
        &file,
        topology(&eps).replace("site = \"B\"", "site = \"Z\""),
    )?;
    let out = pchat(&["topology", "validate", file.to_str().unwrap_or_default()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("line 29") && err.contains("unknown site `Z`"),
        "{err}"
    );
    let out = pchat(&["pool", "get", "pc1"]);
    assert!(
        String::from_utf8(out.stderr)?.contains("topology publish"),
        "unpublished pool says how to fix"
    );

    std::fs::write(&file, topology(&eps))?;
    let out = pchat(&["topology", "validate", file.to_str().unwrap_or_default()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The shell without an identity cannot even reach etcd, and says how to fix it.
    let plain_env = vec![("PCHAT_ETCD".to_owned(), secure.endpoints_csv())];
    let out = pchat_env(&["pool", "get", "pc1"], &plain_env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--tls-dir") && stderr(&out).contains("pki issue"),
        "{}",
        stderr(&out)
    );
    // The roles the setup will make, without etcd.
    let pki = secure.pki().display().to_string();
    let f = file.to_str().unwrap_or_default();
    let out = pchat(&[
        "control",
        "auth",
        "setup",
        "--topology",
        f,
        "--pki",
        &pki,
        "--dry-run",
    ]);
    let plan = String::from_utf8(out.stdout)?;
    assert!(
        plan.contains("role pchat-server-a1:\n  read /pchat/pools/pc1/*\n  read /pchat/secrets/pc1/postgres/server\n  readwrite /pchat/pools/pc1/compliance/*\n  readwrite /pchat/pools/pc1/servers/a1/*"),
        "{plan}"
    );
    assert!(plan.contains("user operator-admin (operator admin): role pchat-operator"));
    secure.setup(&bin(), &file).await?;
    // A server's identity is not an operator's: it may not change the pool.
    let as_server = vec![
        ("PCHAT_ETCD".to_owned(), secure.endpoints_csv()),
        (
            "PCHAT_TLS_DIR".to_owned(),
            secure.server_dir("a1").display().to_string(),
        ),
    ];
    let out = pchat_env(&["topology", "publish", f], &as_server);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("server-a1") && stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    assert!(
        pchat(&["topology", "publish", file.to_str().unwrap_or_default()])
            .status
            .success()
    );

    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let v = json(pchat(&[
        "--json",
        "pool",
        "set-active-servers",
        "pc1",
        "a1",
        "a2",
    ]));
    assert_eq!(v["active_servers"], serde_json::json!(["a1", "a2"]));
    // The seed's IMPORTANT note: servers outside the authoritative site are refused.
    let out = pchat(&["pool", "set-active-servers", "pc1", "a1", "b1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)?.contains("--allow-remote-site"));
    // More than active_servers_max is refused.
    let out = pchat(&["pool", "set-active-servers", "pc1", "a1", "a2", "a3"]);
    assert!(String::from_utf8(out.stderr)?.contains("at most 2"));
    let v = json(pchat(&[
        "--json",
        "pool",
        "set-active-servers",
        "pc1",
        "--remove",
        "a2",
    ]));
    assert_eq!(v["active_servers"], serde_json::json!(["a1"]));
    let v = json(pchat(&[
        "--json",
        "pool",
        "set-active-servers",
        "pc1",
        "--none",
    ]));
    assert_eq!(v["active_servers"], serde_json::json!([]));
    let v = json(pchat(&[
        "--json",
        "pool",
        "set-state",
        "pc1",
        "failed-over",
    ]));
    assert_eq!(v["state"], "FailedOver");
    let v = json(pchat(&[
        "--json",
        "pool",
        "set-active-servers",
        "pc1",
        "b1",
    ]));
    assert_eq!(v["active_servers"], serde_json::json!(["b1"]));
    let out = pchat(&["pool", "set-state", "pc1", "sideways"]);
    assert!(String::from_utf8(out.stderr)?.contains("normal"));
    let v = json(pchat(&["--json", "pool", "get", "pc1"]));
    assert_eq!(v["epoch"], 6);
    // Bad usage is exit code 2.
    assert_eq!(
        pchat(&["pool", "set-active-servers", "pc1", "a1", "--none"])
            .status
            .code(),
        Some(2)
    );
    Ok(())
}

/// A server without an identity refuses a pool whose topology is not insecure: it stops with
/// the fix in its message instead of following the pool in plaintext.
#[tokio::test]
async fn a_server_without_an_identity_refuses_a_secure_pool() -> anyhow::Result<()> {
    // A plaintext etcd holding a secure topology (the shell refuses to publish one in
    // plaintext, so the test writes it with the library).
    let cluster = EtcdCluster::start(1).await?;
    let secure_text = topology(&["https://127.0.0.1:2379".to_owned()]);
    let t = pchat_control::topology::parse(&secure_text)?;
    let plain = pchat_control::Etcd::new(&cluster.endpoints());
    pchat_control::pool::publish_topology(&plain, &t).await?;
    let out = pchat_env(
        &["pool", "get", "pc1"],
        &[("PCHAT_ETCD".to_owned(), cluster.endpoints().join(","))],
    );
    assert!(stderr(&out).contains("is not insecure"), "{}", stderr(&out));

    let data = tempfile::tempdir()?;
    let port = || -> anyhow::Result<String> { Ok(pchat_testkit::free_port()?.to_string()) };
    let run = tokio::process::Command::new(bin())
        .env_remove("PCHAT_TLS_DIR")
        .arg("--data-dir")
        .arg(data.path())
        .args(["serve", "--bind-addr", "127.0.0.1", "--c2s-port", &port()?])
        .args(["--c2s-tls-port", &port()?, "--http-port", &port()?])
        .args(["--topology-from-etcd", &cluster.endpoints().join(",")])
        .args(["--pool", "pc1", "--server", "a1", "--pool-poll-ms", "100"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // It stops by itself: no signal is sent.
    let out = tokio::time::timeout(Duration::from_secs(20), run).await??;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("pchat: pool pc1 is not insecure") && err.contains("pchat serve --tls-dir"),
        "{err}"
    );
    Ok(())
}

/// No secret on a command line: `--agent-token` is gone (every user's `ps` shows
/// arguments); `pchat agent token FILE` writes a new token into a file only its owner may
/// read, whatever the umask, and never over an existing one unless told.
#[test]
fn the_agent_token_lives_in_files_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for args in [
        &[
            "db",
            "mirror",
            "status",
            "--agent-token",
            "secret-0123456789abcdef",
        ][..],
        &[
            "pool",
            "failover",
            "pc1",
            "--agent-token",
            "secret-0123456789abcdef",
        ],
        &[
            "agent",
            "status",
            "--url",
            "https://127.0.0.1:1",
            "--agent-token",
            "x",
        ],
    ] {
        let out = pchat_env(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("unexpected argument '--agent-token'"),
            "{}",
            stderr(&out)
        );
    }
    // Under umask 000 (a wrapper sets it), the token file is still 0600.
    let wrapper = dir.path().join("pchat-umask-000");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\numask 000\nexec '{}' \"$@\"\n", bin().display()),
    )?;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let file = dir.path().join("agent.token");
    let run = |force: bool| {
        let mut c = Command::new(&wrapper);
        c.args(["agent", "token"]).arg(&file);
        if force {
            c.arg("--force");
        }
        c.output().expect("run pchat")
    };
    let out = run(false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&std::fs::read_to_string(&file)?),
        "the token itself is never printed"
    );
    assert_eq!(std::fs::metadata(&file)?.mode() & 0o777, 0o600);
    let first = std::fs::read_to_string(&file)?;
    assert!(first.trim().len() >= 32, "{first}");
    let out = run(false);
    assert_eq!(out.status.code(), Some(1), "an existing token is kept");
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&file)?, first);
    assert!(run(true).status.success());
    assert_ne!(std::fs::read_to_string(&file)?, first);
    assert_eq!(std::fs::metadata(&file)?.mode() & 0o777, 0o600);
    Ok(())
}

/// `pchat agent … --url URL` reaches only an agent of the topology: any other URL is refused
/// before a connection is even tried (a listener there sees nothing).
#[test]
fn the_shell_dials_only_agents_of_the_topology() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("topology.toml");
    let secure = topology(&["https://127.0.0.1:2379".to_owned()]);
    std::fs::write(&file, secure)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let planted = format!("https://{}", listener.local_addr()?);
    let out = pchat_env(
        &[
            "agent",
            "status",
            "--url",
            &planted,
            "--topology",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not the agent of any instance in pool pc1's topology"),
        "{}",
        stderr(&out)
    );
    // An agent of the topology, but no identity: refused too, before dialling.
    let out = pchat_env(
        &[
            "agent",
            "status",
            "--url",
            "https://127.0.0.1:7070",
            "--topology",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--tls-dir"), "{}", stderr(&out));
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the planted URL was dialled"
    );
    Ok(())
}
