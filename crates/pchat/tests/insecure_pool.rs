//! The one insecure pool of the test suite (`insecure = true`: a throw-away lab): etcd over
//! plain HTTP without users, the agent's API over plain HTTP with the pool's shared token
//! (from a 0600 file), PostgreSQL without TLS but with passwords, and no process with an
//! identity. It works — the shell installs the databases through the agent, a server serves a
//! client from them — and every process says at every start that the pool is insecure: the
//! shell at each command, the server once when it first reads the pool, the agent each time
//! it starts.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{AgentIdentity, AgentProcess};
use pchat_agent_api::AgentAccess;
use pchat_testkit::etcd::EtcdCluster;
use pchat_testkit::{ns, stanza_id, Element, ServerOptions, TestServer};

const WARNING: &str = "WARNING: pool pc1 is insecure";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// `pchat ARGS` as the shell of an insecure pool (no identity); its stderr.
fn pchat(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = Command::new(bin())
        .args(args)
        .env_remove("PCHAT_TLS_DIR")
        .env_remove("PCHAT_AGENT_TOKEN")
        .env_remove("PCHAT_AGENT_TOKEN_FILE")
        .envs(env.iter().copied())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "pchat {args:?}: {stderr}");
    Ok(stderr)
}

fn count(log: &str) -> usize {
    log.matches(WARNING).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_pool_works_and_says_so_at_every_start() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("pchat-insecure-")
        .tempdir()?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let etcd = EtcdCluster::start(1).await?;
    let etcd_url = etcd.endpoints().join(",");
    assert!(etcd_url.starts_with("http://"), "{etcd_url}");
    let token_file = dir.path().join("agent.token");
    pchat(&["agent", "token", &token_file.to_string_lossy()], &[])?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();

    let mut agent = AgentProcess::start_as(
        dir.path(),
        "a_db",
        "pc1",
        &etcd.endpoints(),
        AgentIdentity::Insecure {
            token_file: &token_file,
        },
    )?;
    assert!(
        agent.agent_url.starts_with("http://"),
        "{}",
        agent.agent_url
    );
    let access = AgentAccess::new("pc1", None, Some(token.clone()));
    agent.wait_up_as(&access).await?;

    let server = TestServer::start(
        &bin(),
        ServerOptions {
            extra_args: [
                "--topology-from-etcd",
                &etcd_url,
                "--pool",
                "pc1",
                "--server",
                "s1",
                "--pool-poll-ms",
                "100",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..ServerOptions::default()
        },
    )
    .await?;
    let topology = dir.path().join("topology.toml");
    std::fs::write(
        &topology,
        format!(
            "insecure = true\nshare = \"/tmp/share\"\netcd = [\"{etcd_url}\"]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
             [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ name = \"a_db\", address = \"{}\", agent = \"{}\" }}\n\
             [[servers]]\nname = \"s1\"\nsite = \"A\"\naddress = \"{}\"\n",
            agent.address(),
            agent.agent_url,
            server.c2s_addr()
        ),
    )?;
    let token_path = token_file.to_string_lossy().into_owned();
    let shell = [
        ("PCHAT_ETCD", etcd_url.as_str()),
        ("PCHAT_AGENT_TOKEN_FILE", token_path.as_str()),
    ];
    // The shell: it works, and warns at each command.
    for args in [
        &["topology", "publish", &topology.to_string_lossy()][..],
        &["--in-pool", "pc1", "db", "install"],
        &[
            "--in-pool",
            "pc1",
            "user",
            "add",
            "alice@localhost",
            "--password",
            "pw",
        ],
        &["pool", "set-active-servers", "pc1", "s1"],
    ] {
        let stderr = pchat(args, &shell)?;
        assert!(count(&stderr) >= 1, "{args:?}: {stderr}");
    }
    // The token from the environment works as well; without one the shell sends nothing.
    let status = [
        "agent",
        "status",
        "--url",
        &agent.agent_url,
        "--in-pool",
        "pc1",
    ];
    pchat(
        &status,
        &[
            ("PCHAT_ETCD", etcd_url.as_str()),
            ("PCHAT_AGENT_TOKEN", &token),
        ],
    )?;
    let err = pchat(&status, &[("PCHAT_ETCD", etcd_url.as_str())]).unwrap_err();
    assert!(err.to_string().contains("--agent-token-file"), "{err}");
    let wrong = AgentAccess::new("pc1", None, Some("wrong-token-0123456789abcdef".into()));
    let r = wrong.named("a_db", &agent.agent_url).status().await;
    assert!(
        matches!(r, Err(pchat_agent_api::ClientError::Unauthorized { .. })),
        "{r:?}"
    );

    // The server serves: a message through it is stored in the (plaintext) pool.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut alice = loop {
        match server.client("alice@localhost", "pw").await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let room = "lab@conference.localhost";
    alice.join_room(room, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;
    let ack = alice.send_groupchat(room, "in the clear", None).await?;
    assert!(stanza_id(&ack, room).is_some(), "acknowledged");
    let stored = agent.psql(
        "mgc",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE datname = 'mgc' AND NOT ssl AND usename = 'pchat_server'",
    )?;
    assert_ne!(stored, "0", "the server's sessions are plaintext, as said");

    // The server warned once, at its first read of the pool (it polls every 100 ms).
    let server_log = std::fs::read_to_string(server.data_dir().join("pchat-test-stderr.log"))?;
    assert_eq!(count(&server_log), 1, "{server_log}");
    // The agent warned when it started, and warns again at its next start.
    let before = count(&agent.log());
    assert!(before >= 1, "{}", agent.log());
    agent.restart()?;
    agent.wait_up_as(&access).await?;
    wait_for(
        || count(&agent.log()) > before,
        "the agent's warning at its restart",
    )
    .await;
    Ok(())
}

async fn wait_for(check: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
