//! A mirror failover under a chatting client: two `pchat agent` processes own a principal and
//! its synchronous mirror, a pool server serves from the principal, then
//! `pchat db mirror failover` promotes the mirror. The server follows the new principal
//! without dropping the client's session, and nothing acknowledged is lost (RPO 0). etcd runs
//! with TLS and authentication; agents, the server and the shell use their own identities.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::secure::SecureEtcd;
use pchat_testkit::{ns, stanza_id, Element, ServerOptions, TestServer};

const ROOM: &str = "drill@conference.localhost";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn free_port() -> u16 {
    pchat_testkit::free_port().unwrap_or(0)
}

/// Agent processes, killed on drop.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Instance {
    name: &'static str,
    pg_port: u16,
    agent_url: String,
    config: PathBuf,
    dir: PathBuf,
}

fn pchat(args: &[&str], env: &[(String, String)]) -> anyhow::Result<String> {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().cloned())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pchat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `pchat [--json] --in-pool pc1 db mirror failover --site A EXTRA…`.
fn mirror_failover(json: bool, extra: &[&str], env: &[(String, String)]) -> anyhow::Result<String> {
    let mut args = vec![
        "--in-pool",
        "pc1",
        "db",
        "mirror",
        "failover",
        "--site",
        "A",
    ];
    if json {
        args.insert(0, "--json");
    }
    args.extend_from_slice(extra);
    pchat(&args, env)
}

fn instance(root: &Path, name: &'static str, secure: &SecureEtcd) -> anyhow::Result<Instance> {
    let etcd = secure.endpoints();
    let dir = root.join(name);
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let (pg_port, agent_port) = (free_port(), free_port());
    let eps = etcd
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{agent_port}\"\ntls_dir = \"{tls}\"\npg_bin_dir = \"{PG_BIN}\"\n\
             data_dir = \"{d}/data\"\nsocket_dir = \"{d}/sock\"\nport = {pg_port}\netcd = [{eps}]\n\
             pool = \"pc1\"\ninstance = \"{name}\"\nstart_on_boot = false\npublish_interval_ms = 200\n",
            d = dir.display(),
            tls = secure.instance_dir(name).display(),
        ),
    )?;
    Ok(Instance {
        name,
        pg_port,
        agent_url: format!("https://127.0.0.1:{agent_port}"),
        config,
        dir,
    })
}

/// A mirrored site A with a pool server `s1` active on it and Alice in a fresh room.
struct Drill {
    _root: tempfile::TempDir,
    _secure: SecureEtcd,
    env: Vec<(String, String)>,
    agents: Agents,
    principal: Instance,
    server: TestServer,
}

impl Drill {
    async fn start() -> anyhow::Result<(Drill, pchat_testkit::Client)> {
        let root = tempfile::Builder::new().prefix("pchat-mirror-").tempdir()?;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
        let secure =
            SecureEtcd::start(root.path(), "pc1", 1, &["a_db", "a_mirror"], &["s1"]).await?;
        let etcd = secure.endpoints_csv();
        let env = secure.env();
        let principal = instance(root.path(), "a_db", &secure)?;
        let mirror = instance(root.path(), "a_mirror", &secure)?;
        let mut agents = Agents(Vec::new());
        for i in [&principal, &mirror] {
            let log = std::fs::File::create(i.dir.join("agent.log"))?;
            agents.0.push(
                Command::new(bin())
                    .args(["agent", "run", "--config"])
                    .arg(&i.config)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
        }
        let mut args: Vec<String> = [
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
        args.extend(secure.server_args("s1"));
        let server = TestServer::start(
            &bin(),
            ServerOptions {
                extra_args: args,
                ..ServerOptions::default()
            },
        )
        .await?;
        let topology = root.path().join("topology.toml");
        std::fs::write(
            &topology,
            format!(
                "share = \"{share}\"\netcd = [\"{etcd}\"]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\n\
                 [[sites]]\nname = \"A\"\nrole = \"primary\"\n\
                 database = {{ name = \"{pn}\", address = \"127.0.0.1:{p}\", agent = \"{pa}\" }}\n\
                 mirror = {{ name = \"{mn}\", address = \"127.0.0.1:{m}\", agent = \"{ma}\" }}\n\
                 [[servers]]\nname = \"s1\"\nsite = \"A\"\naddress = \"{addr}\"\n",
                share = root.path().join("share").display(),
                pn = principal.name,
                p = principal.pg_port,
                pa = principal.agent_url,
                mn = mirror.name,
                m = mirror.pg_port,
                ma = mirror.agent_url,
                addr = server.c2s_addr()
            ),
        )?;
        // The agents are found by their URLs in the topology.
        let topology_file = topology.to_string_lossy().into_owned();
        for i in [&principal, &mirror] {
            let deadline = Instant::now() + Duration::from_secs(20);
            while pchat(
                &[
                    "agent",
                    "status",
                    "--url",
                    &i.agent_url,
                    "--topology",
                    &topology_file,
                ],
                &env,
            )
            .is_err()
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "agent {} did not come up",
                    i.name
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        secure.setup(&bin(), &topology).await?;
        pchat(&["topology", "publish", &topology.to_string_lossy()], &env)?;
        pchat(&["agent", "init", "--url", &principal.agent_url], &env)?;
        pchat(&["agent", "start", "--url", &principal.agent_url], &env)?;
        pchat(&["--in-pool", "pc1", "db", "install", "--site", "A"], &env)?;
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
            &env,
        )?;
        pchat(
            &["--in-pool", "pc1", "db", "mirror", "add", "--site", "A"],
            &env,
        )?;
        pchat(&["pool", "set-active-servers", "pc1", "s1"], &env)?;

        let deadline = Instant::now() + Duration::from_secs(15);
        let mut alice = loop {
            match server.client("alice@localhost", "pw").await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        };
        alice.join_room(ROOM, "alice", None).await?;
        let submit = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", ROOM)
            .with_child(
                Element::new("query", ns::MUC_OWNER)
                    .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
            );
        alice.iq_result(submit, Duration::from_secs(10)).await?;
        let drill = Drill {
            _root: root,
            _secure: secure,
            env,
            agents,
            principal,
            server,
        };
        Ok((drill, alice))
    }
}

/// Sends `count` messages, each retried (same origin-id) until acknowledged; returns the ids.
async fn send_retrying(
    c: &mut pchat_testkit::Client,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    c.set_reply_timeout(Duration::from_secs(5));
    let mut ids = Vec::new();
    for i in 0..count {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ack = loop {
            match c
                .send_groupchat(
                    ROOM,
                    &format!("{prefix} {i}"),
                    Some(&format!("{prefix}-{i}")),
                )
                .await
            {
                Ok(a) => break a,
                Err(pchat_testkit::Error::Stanza { .. } | pchat_testkit::Error::Timeout { .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "the session did not survive the failover: {e:?}"
                    ))
                }
            }
        };
        ids.push(stanza_id(&ack, ROOM).unwrap_or_default());
    }
    Ok(ids)
}

#[tokio::test]
async fn chat_survives_a_mirror_failover_without_losing_a_message() -> anyhow::Result<()> {
    let (drill, mut alice) = Drill::start().await?;
    let mut acked = send_retrying(&mut alice, "before", 10).await?;
    // The dry run judges the pair and lists the steps; it changes nothing.
    let plan: serde_json::Value =
        serde_json::from_str(&mirror_failover(true, &["--dry-run"], &drill.env)?)?;
    assert_eq!(plan["planned"], true, "{plan}");
    assert_eq!(plan["state_before"], "SYNCHRONIZED", "{plan}");
    assert_eq!(plan["possible_loss_bytes"], 0, "{plan}");
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        names(&plan),
        ["fence", "stop-principal", "promote", "record"],
        "{plan}"
    );
    assert!(
        plan["steps"].as_array().is_some_and(|a| a
            .iter()
            .all(|s| s["done"] == false && s.get("blocked").is_none())),
        "{plan}"
    );
    acked.extend(send_retrying(&mut alice, "after the dry run", 1).await?);
    let t0 = Instant::now();
    let report: serde_json::Value = serde_json::from_str(&mirror_failover(true, &[], &drill.env)?)?;
    assert_eq!(names(&report), names(&plan), "{report}");
    assert!(
        report["steps"]
            .as_array()
            .is_some_and(|a| a.iter().all(|s| s["done"] == true)),
        "{report}"
    );
    // Again, back to the fenced old principal: the site runs SUSPENDED until it is
    // re-seeded, so the dry run names the step that would refuse, and why.
    let again = mirror_failover(false, &["--dry-run"], &drill.env)
        .expect_err("the old principal is not a synchronized mirror");
    let again = again.to_string();
    assert!(
        again.contains("step 1 (fence)") && again.contains("not SYNCHRONIZED"),
        "{again}"
    );
    // The same session keeps chatting once the server has switched to the new principal.
    let first = send_retrying(&mut alice, "after", 1).await?;
    eprintln!(
        "manual mirror failover to the first acknowledged message: {:?}",
        t0.elapsed()
    );
    acked.extend(first);
    acked.extend(send_retrying(&mut alice, "later", 8).await?);
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
    let expect: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
    assert_eq!(page.ids(), expect, "nothing lost, nothing twice, one order");
    assert_eq!(acked, expect);
    let _ = &drill.server;
    Ok(())
}

/// The principal's host is lost (its agent and its PostgreSQL killed with SIGKILL): the
/// mirror's agent promotes itself when the leader lease expires, the server follows, and the
/// client's session goes on with every acknowledged message kept (RPO 0, I1).
#[tokio::test]
async fn chat_survives_the_loss_of_the_principal_host() -> anyhow::Result<()> {
    let (mut drill, mut alice) = Drill::start().await?;
    let mut acked = send_retrying(&mut alice, "before", 10).await?;
    let pid_file = std::fs::read_to_string(drill.principal.dir.join("data/postmaster.pid"))?;
    let postmaster: i32 = pid_file.lines().next().unwrap_or_default().trim().parse()?;
    let t0 = Instant::now();
    // The agent first, so it cannot fence or restart anything: the host is simply gone.
    let _ = drill.agents.0[0].kill();
    let _ = drill.agents.0[0].wait();
    let _ = Command::new("kill")
        .args(["-9", &postmaster.to_string()])
        .status();
    let first = send_retrying(&mut alice, "after", 1).await?;
    eprintln!(
        "principal host lost to the first acknowledged message: {:?}",
        t0.elapsed()
    );
    acked.extend(first);
    acked.extend(send_retrying(&mut alice, "later", 9).await?);
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
    let expect: Vec<String> = (1..=20).map(|i| i.to_string()).collect();
    assert_eq!(
        page.ids(),
        expect,
        "nothing acknowledged was lost, nothing twice"
    );
    assert_eq!(acked, expect);
    Ok(())
}
