//! The two-site disaster-recovery lab for pool `pc1`, on loopback, with real processes only,
//! and the client [`Ledger`] the drills check their invariants with.
//!
//! [`TwoSite::start`] brings up:
//! - the pool's PKI and a 3-member etcd cluster with TLS, client certificates and
//!   authentication (`common::secure`): every agent, server and shell command below runs with
//!   its own identity and etcd user;
//! - four `pchat agent run` processes, each owning one PostgreSQL instance in its own
//!   directory under the lab root: `a_db`, `a_mirror` (site A, primary) and `b_db`,
//!   `b_mirror` (site B, backup), `start_on_boot = false`, `publish_interval_ms = 200`;
//! - the log-shipping share and site B's copy directory, owned by `postgres`, mode 0750;
//! - four pool servers, `a1`, `a2` (site A) and `b1`, `b2` (site B);
//! - the topology (site B with `copy_dir`; a secure pool: etcd's and the agents' URLs are
//!   https://, and the agents take only callers with a certificate of the pool), checked
//!   against the certificates, etcd's users and roles set up, the topology published; then
//!   site A: `a_db` initialised and started, `mgc` and `mgccomp` created and installed by its
//!   agent, users `alice` and `bob` (password [`PASSWORD`]), the mirror `a_mirror` added,
//!   servers `a1`, `a2` active.
//!
//! PostgreSQL runs as in a production pool: every instance with its identity from the lab's
//! PKI ([`SecureEtcd`], which etcd uses too), TCP only over TLS with the roles' passwords, the
//! superuser only on the unix socket; the servers and the shell connect with their own
//! identities (`--tls-dir`, `PCHAT_TLS_DIR`).
//!
//! Site B's instances are left uninitialised: log shipping seeds them.
//!
//! Every wait is bounded; dropping the lab kills every process it started (agents, the
//! PostgreSQL instances they started, servers, etcd) and removes its directories, unless
//! `PCHAT_TEST_KEEP_DATA=1`. When a test panics, the tails of the agents' and PostgreSQL's
//! logs are printed.
//!
//! The [`Ledger`] is an independent client that writes numbered messages, each with an
//! origin-id, resends the same origin-id until the room acknowledges it (reflection with a
//! stanza-id), follows `see-other-host` and moves between servers when one refuses or dies,
//! and records what was acknowledged, under which archive id and when. [`Archive::read`]
//! reads a room's whole archive through whichever server is active; the `check_*` methods
//! then check I1–I4 from the client's side.

use pchat_testkit::postgres::process_tree;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use pchat_testkit::etcd::EtcdCluster;

use super::secure::SecureEtcd;
use pchat_testkit::{
    forwarded_message, ns, origin_id, stanza_id, Client, ConnectOptions, Element,
    Error as XmppError, History, Rsm, ServerOptions, TestServer, Transport,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The pool's name.
pub const POOL: &str = "pc1";
/// The XMPP domain; rooms live on `conference.localhost`.
pub const DOMAIN: &str = "localhost";
/// PostgreSQL's binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The password of every lab user.
pub const PASSWORD: &str = "pw";
/// The lab's users (`NAME@localhost`).
pub const USERS: [&str; 2] = ["alice", "bob"];
/// Instances, in order: site A's principal and mirror, site B's backup and its mirror.
pub const INSTANCES: [&str; 4] = ["a_db", "a_mirror", "b_db", "b_mirror"];
/// Servers, in order: site A's, then site B's.
pub const SERVERS: [&str; 4] = ["a1", "a2", "b1", "b2"];

/// Bound on any one `pchat` command run by the fixture.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on an agent answering `agent status` after it was spawned.
const AGENT_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// The `pchat` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(pchat_testkit::free_port()?)
}

/// A site (data center) of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// The primary site: `a_db` (principal), `a_mirror`, servers `a1`, `a2`.
    A,
    /// The backup site: `b_db` (log-shipping target), `b_mirror`, servers `b1`, `b2`.
    B,
}

impl Site {
    /// `"A"` or `"B"`, as in the topology.
    pub fn name(self) -> &'static str {
        match self {
            Site::A => "A",
            Site::B => "B",
        }
    }

    /// The site's database instance (principal or backup).
    pub fn database(self) -> &'static str {
        match self {
            Site::A => "a_db",
            Site::B => "b_db",
        }
    }

    /// The site's mirror instance.
    pub fn mirror(self) -> &'static str {
        match self {
            Site::A => "a_mirror",
            Site::B => "b_mirror",
        }
    }

    /// The site's two servers.
    pub fn servers(self) -> [&'static str; 2] {
        match self {
            Site::A => ["a1", "a2"],
            Site::B => ["b1", "b2"],
        }
    }

    fn of_instance(name: &str) -> Site {
        if name.starts_with('a') {
            Site::A
        } else {
            Site::B
        }
    }
}

/// One PostgreSQL instance and its agent. Its directory holds `agent.toml`, `agent.log`,
/// `data/` (PGDATA), `data.log` (PostgreSQL's log) and `sock/`.
pub struct Instance {
    /// `a_db`, `a_mirror`, `b_db` or `b_mirror`.
    pub name: &'static str,
    /// Its site.
    pub site: Site,
    /// Its directory.
    pub dir: PathBuf,
    /// Its agent's configuration file.
    pub config: PathBuf,
    /// PostgreSQL's port on 127.0.0.1.
    pub pg_port: u16,
    /// The agent's port on 127.0.0.1.
    pub agent_port: u16,
    agent: Option<Child>,
}

impl Instance {
    /// `https://127.0.0.1:PORT` of the agent.
    pub fn agent_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent_port)
    }

    /// `127.0.0.1:PORT` of PostgreSQL, as in the topology.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    /// PGDATA.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// PostgreSQL's server log (the agent's default, PGDATA + `.log`).
    pub fn pg_log(&self) -> PathBuf {
        self.dir.join("data.log")
    }

    /// The agent's log (stderr).
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The pid of the running postmaster, from `postmaster.pid`; `None` when there is none
    /// or it is not alive.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// The agent process's pid while the fixture's child runs.
    pub fn agent_pid(&mut self) -> Option<u32> {
        let child = self.agent.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    fn spawn_agent(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())?;
        let child = Command::new(bin())
            .args(["agent", "run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning the agent of {}", self.name))?;
        self.agent = Some(child);
        Ok(())
    }

    /// SIGKILL to the agent (no goodbye: it cannot stop or fence anything).
    fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the agent, up to 10 s for it to exit, then SIGKILL.
    async fn stop_agent(&mut self) {
        let Some(mut c) = self.agent.take() else {
            return;
        };
        signal("TERM", &[c.id() as i32]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// True while `pid` exists and is not a zombie (PID 1 here may not reap).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `kill -SIG PIDS…` (the `pchat` crate has no signal library among its dependencies).
fn signal(sig: &str, pids: &[i32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(i32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// The `postgres` user's uid and gid.
pub fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        ensure!(
            out.status.success(),
            "no `postgres` user: apt-get install -y postgresql"
        );
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// What [`TwoSite::try_commit`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitProbe {
    /// The commit was acknowledged: the instance is a writable principal.
    Committed,
    /// Refused (not running, shutting down, in recovery…), with psql's words.
    Refused(String),
    /// Nothing within the time given (a synchronous commit waiting for a mirror that no
    /// longer streams from it, or a frozen server): not acknowledged.
    NoAnswer,
}

/// A pool server of the lab.
pub struct PoolServer {
    /// `a1`, `a2`, `b1` or `b2`.
    pub name: &'static str,
    /// Its site.
    pub site: Site,
    /// The running `pchat serve`.
    pub server: TestServer,
}

/// The two-site lab; see the module documentation.
pub struct TwoSite {
    secure: SecureEtcd,
    etcd: String,
    instances: Vec<Instance>,
    servers: Vec<PoolServer>,
    root: PathBuf,
    share: PathBuf,
    copy_dir: PathBuf,
    topology: PathBuf,
    // Last, so everything else is gone before the directory is removed.
    dir: Option<tempfile::TempDir>,
}

impl TwoSite {
    /// Starts the whole lab and brings site A up (see the module documentation).
    pub async fn start() -> anyhow::Result<TwoSite> {
        ensure!(
            Path::new(PG_BIN).join("initdb").exists(),
            "PostgreSQL 15 is not installed: apt-get install -y postgresql (scripts/test does)"
        );
        let (uid, gid) = postgres_ids()?;
        let dir = tempfile::Builder::new()
            .prefix("pchat-twosite-")
            .tempdir()?;
        let root = dir.path().to_path_buf();
        // PostgreSQL runs as `postgres`: it must reach its directories under the root.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        let share = root.join("share");
        let copy_dir = root.join("b_copy");
        for d in [&share, &copy_dir] {
            std::fs::create_dir(d)?;
            std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))?;
        }

        let secure = SecureEtcd::start(&root, POOL, 3, &INSTANCES, &SERVERS).await?;
        let endpoints = secure.endpoints();
        let etcd = endpoints.join(",");
        let mut lab = TwoSite {
            secure,
            etcd,
            instances: Vec::new(),
            servers: Vec::new(),
            root: root.clone(),
            share,
            copy_dir,
            topology: root.join("topology.toml"),
            dir: Some(dir),
        };

        // Agents first: they take a moment to listen, while the servers start.
        let eps = endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        for name in INSTANCES {
            let dir = root.join(name);
            std::fs::create_dir(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            let (pg_port, agent_port) = (free_port()?, free_port()?);
            let config = dir.join("agent.toml");
            std::fs::write(
                &config,
                format!(
                    "listen = \"127.0.0.1:{agent_port}\"\ntls_dir = \"{tls}\"\n\
                     pg_bin_dir = \"{PG_BIN}\"\ndata_dir = \"{d}/data\"\n\
                     socket_dir = \"{d}/sock\"\nport = {pg_port}\netcd = [{eps}]\n\
                     pool = \"{POOL}\"\ninstance = \"{name}\"\nstart_on_boot = false\n\
                     publish_interval_ms = 200\n",
                    d = dir.display(),
                    tls = lab.secure.instance_dir(name).display(),
                ),
            )?;
            let mut instance = Instance {
                name,
                site: Site::of_instance(name),
                dir,
                config,
                pg_port,
                agent_port,
                agent: None,
            };
            instance.spawn_agent()?;
            lab.instances.push(instance);
        }

        let (a1, a2, b1, b2) = tokio::try_join!(
            pool_server(&lab.secure, "a1"),
            pool_server(&lab.secure, "a2"),
            pool_server(&lab.secure, "b1"),
            pool_server(&lab.secure, "b2"),
        )?;
        for (name, server) in [("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2)] {
            lab.servers.push(PoolServer {
                name,
                site: if name.starts_with('a') {
                    Site::A
                } else {
                    Site::B
                },
                server,
            });
        }
        // Written now: the agents are found by their URLs in it.
        std::fs::write(&lab.topology, lab.topology_toml())?;
        for name in INSTANCES {
            lab.wait_agent(name).await?;
        }
        lab.secure.setup(&bin(), &lab.topology).await?;
        let topology = lab.topology.to_string_lossy().into_owned();
        lab.pchat(&["topology", "publish", &topology]).await?;

        let a_db = lab.instance("a_db").agent_url();
        lab.pchat(&["agent", "init", "--url", &a_db]).await?;
        lab.pchat(&["agent", "start", "--url", &a_db]).await?;
        lab.pchat(&["--in-pool", POOL, "db", "install", "--site", "A"])
            .await?;
        for user in USERS {
            let jid = format!("{user}@{DOMAIN}");
            lab.pchat(&[
                "--in-pool",
                POOL,
                "user",
                "add",
                &jid,
                "--password",
                PASSWORD,
            ])
            .await?;
        }
        lab.pchat(&["--in-pool", POOL, "db", "mirror", "add", "--site", "A"])
            .await?;
        lab.pchat(&["pool", "set-active-servers", POOL, "a1", "a2"])
            .await?;
        for name in Site::A.servers() {
            lab.wait_serving(name, Duration::from_secs(30)).await?;
        }
        Ok(lab)
    }

    /// The topology the lab publishes (site B with `copy_dir`).
    pub fn topology_toml(&self) -> String {
        let eps = self.secure.endpoints_toml();
        let mut t = format!(
            "share = \"{}\"\netcd = [{eps}]\n\n[pool]\nname = \"{POOL}\"\ndomain = \"{DOMAIN}\"\n",
            self.share.display()
        );
        for site in [Site::A, Site::B] {
            let db = self.instance(site.database());
            let mirror = self.instance(site.mirror());
            t.push_str(&format!(
                "\n[[sites]]\nname = \"{}\"\nrole = \"{}\"\n\
                 database = {{ name = \"{}\", address = \"{}\", agent = \"{}\" }}\n\
                 mirror = {{ name = \"{}\", address = \"{}\", agent = \"{}\" }}\n",
                site.name(),
                if site == Site::A { "primary" } else { "backup" },
                db.name,
                db.address(),
                db.agent_url(),
                mirror.name,
                mirror.address(),
                mirror.agent_url(),
            ));
            if site == Site::B {
                t.push_str(&format!("copy_dir = \"{}\"\n", self.copy_dir.display()));
            }
        }
        for s in &self.servers {
            t.push_str(&format!(
                "\n[[servers]]\nname = \"{}\"\nsite = \"{}\"\naddress = \"{}\"\n",
                s.name,
                s.site.name(),
                s.server.c2s_addr()
            ));
        }
        t
    }

    /// Runs `pchat ARGS…` as the operator (`common::secure`'s environment; bounded by 180 s);
    /// stdout on success, otherwise an error carrying stderr and stdout.
    pub async fn pchat(&self, args: &[&str]) -> anyhow::Result<String> {
        self.pchat_timeout(args, COMMAND_TIMEOUT).await
    }

    /// [`TwoSite::pchat`] with its own bound.
    pub async fn pchat_timeout(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let run = tokio::process::Command::new(bin())
            .args(args)
            .envs(self.secure.env())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| anyhow!("pchat {args:?} did not finish within {timeout:?}"))??;
        ensure!(
            out.status.success(),
            "pchat {args:?} failed with {}\nstderr:\n{}\nstdout:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs `pchat` like [`TwoSite::pchat`] but returns its exit status with stdout and
    /// stderr whatever the status (for commands expected to refuse).
    pub async fn pchat_outcome(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let run = tokio::process::Command::new(bin())
            .args(args)
            .envs(self.secure.env())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COMMAND_TIMEOUT, run)
            .await
            .map_err(|_| anyhow!("pchat {args:?} did not finish within {COMMAND_TIMEOUT:?}"))??;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    }

    /// Runs `pchat` and kills it (SIGKILL) as soon as a line of its progress (stderr)
    /// contains `marker`: an operator's shell or host lost in the middle of a procedure.
    /// Returns the progress seen; fails if the command ends before the marker.
    pub async fn pchat_killed_at(&self, args: &[&str], marker: &str) -> anyhow::Result<String> {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(bin())
            .args(args)
            .envs(self.secure.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr to read"))?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut seen = String::new();
        let found = tokio::time::timeout(COMMAND_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(marker) {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await
        .map_err(|_| {
            anyhow!("pchat {args:?} did not print {marker:?} within {COMMAND_TIMEOUT:?}")
        })??;
        child.start_kill()?;
        child.wait().await?;
        ensure!(
            found,
            "pchat {args:?} ended before printing {marker:?}:\n{seen}"
        );
        Ok(seen)
    }

    async fn wait_agent(&self, name: &str) -> anyhow::Result<()> {
        let url = self.instance(name).agent_url();
        let topology = self.topology.to_string_lossy().into_owned();
        let deadline = Instant::now() + AGENT_UP_TIMEOUT;
        loop {
            match self
                .pchat_timeout(
                    &["agent", "status", "--url", &url, "--topology", &topology],
                    Duration::from_secs(10),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "the agent of {name} did not answer within {AGENT_UP_TIMEOUT:?}: {e:#}\n\
                         agent log:\n{}",
                        tail(&self.instance(name).agent_log(), 4096)
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until server `name` accepts a login (it polls the pool state), bounded.
    pub async fn wait_serving(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let addr = self.server(name).c2s_addr();
        let deadline = Instant::now() + timeout;
        loop {
            let mut opts = ConnectOptions::new(
                Transport::StartTls { addr },
                &format!("{}@{DOMAIN}", USERS[0]),
                PASSWORD,
            );
            opts.connect_timeout = Duration::from_secs(5);
            match Client::connect(opts).await {
                Ok(c) => {
                    let _ = c.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!("server {name} did not serve within {timeout:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The loss of a data center: every process of `site` dies at once with SIGKILL — its
    /// agents first (so none can stop, fence or restart anything), then its PostgreSQL
    /// instances (each postmaster found through `postmaster.pid`, with all its children),
    /// then its servers. Returns once all of them are gone.
    pub async fn kill_site(&mut self, site: Site) -> anyhow::Result<()> {
        for name in [site.database(), site.mirror()] {
            self.instance_mut(name).kill_agent();
        }
        let mut pids = Vec::new();
        for name in [site.database(), site.mirror()] {
            if let Some(pm) = self.instance(name).postmaster_pid() {
                pids.extend(process_tree(pm));
            }
        }
        signal("KILL", &pids);
        for s in self.servers.iter_mut().filter(|s| s.site == site) {
            s.server.kill9();
        }
        wait_gone(&pids, Duration::from_secs(10)).await
    }

    /// The loss of one database host: its agent and its PostgreSQL die with SIGKILL.
    pub async fn kill_instance(&mut self, name: &str) -> anyhow::Result<()> {
        self.instance_mut(name).kill_agent();
        self.kill_postgres(name).await
    }

    /// SIGKILL to `name`'s postmaster and all its children; its agent stays up.
    pub async fn kill_postgres(&mut self, name: &str) -> anyhow::Result<()> {
        let pids = self
            .instance(name)
            .postmaster_pid()
            .map(process_tree)
            .unwrap_or_default();
        ensure!(!pids.is_empty(), "{name} has no running postmaster");
        signal("KILL", &pids);
        wait_gone(&pids, Duration::from_secs(10)).await
    }

    /// A gray failure: SIGSTOP to `name`'s postmaster and every process under it (its
    /// backends, walsenders, checkpointer…), as a frozen VM or a storage stall leaves them:
    /// connections stay open, nothing answers. Its agent stays up. Returns the frozen pids
    /// for [`TwoSite::thaw`].
    pub fn freeze_postgres(&self, name: &str) -> anyhow::Result<Vec<i32>> {
        let pids = self
            .instance(name)
            .postmaster_pid()
            .map(process_tree)
            .unwrap_or_default();
        ensure!(!pids.is_empty(), "{name} has no running postmaster");
        signal("STOP", &pids);
        Ok(pids)
    }

    /// SIGSTOP to `name`'s agent (a hung agent: its API accepts connections and answers
    /// nothing). Returns its pid for [`TwoSite::thaw`].
    pub fn freeze_agent(&mut self, name: &str) -> anyhow::Result<Vec<i32>> {
        let pid = self
            .instance_mut(name)
            .agent_pid()
            .ok_or_else(|| anyhow!("{name}'s agent is not running"))?;
        let pids = vec![pid as i32];
        signal("STOP", &pids);
        Ok(pids)
    }

    /// SIGCONT to processes frozen by [`TwoSite::freeze_postgres`] or
    /// [`TwoSite::freeze_agent`].
    pub fn thaw(&self, pids: &[i32]) {
        signal("CONT", pids);
    }

    /// Tries to make a transaction durable on `name` directly, as its superuser over the
    /// unix socket: a transactional `pg_logical_emit_message` writes a WAL record under a
    /// transaction id, so its commit is flushed and, on a principal with a synchronous
    /// mirror, waits for that mirror, as a pchat server's insert does. (`SELECT
    /// txid_current()` would not do: a transaction that takes an id but writes no WAL of
    /// its own commits asynchronously and waits for no standby, even under
    /// `synchronous_standby_names`.) An outside view of I5: a fenced or superseded principal
    /// must never answer `Committed`.
    pub async fn try_commit(&self, name: &str, timeout: Duration) -> CommitProbe {
        let i = self.instance(name);
        let run = tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("psql"))
            .arg("-h")
            .arg(i.dir.join("sock"))
            .args(["-p", &i.pg_port.to_string(), "-d", "postgres"])
            .args([
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "SELECT pg_logical_emit_message(true, 'pchat-probe', '')",
            ])
            .env("PGCONNECT_TIMEOUT", "2")
            .current_dir("/")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(timeout, run).await {
            Err(_) => CommitProbe::NoAnswer,
            Ok(Err(e)) => CommitProbe::Refused(format!("psql did not run: {e}")),
            Ok(Ok(out)) if out.status.success() => CommitProbe::Committed,
            Ok(Ok(out)) => CommitProbe::Refused(String::from_utf8_lossy(&out.stderr).trim().into()),
        }
    }

    /// SIGKILL to `name`'s agent only.
    pub fn kill_agent(&mut self, name: &str) {
        self.instance_mut(name).kill_agent();
    }

    /// Stops `name`'s agent (SIGTERM, then SIGKILL after 10 s) if it runs, starts it again
    /// with the same configuration and waits until it answers.
    pub async fn restart_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let instance = self.instance_mut(name);
        instance.stop_agent().await;
        instance.spawn_agent()?;
        self.wait_agent(name).await
    }

    /// Appends `lines` to `name`'s agent configuration (e.g. `auto_failover = false\n`) and
    /// restarts the agent with it.
    pub async fn configure_agent(&mut self, name: &str, lines: &str) -> anyhow::Result<()> {
        let config = self.instance(name).config.clone();
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(lines);
        std::fs::write(&config, text)?;
        self.restart_agent(name).await
    }

    /// Brings a lost site back: its agents and servers start again (PostgreSQL stays
    /// stopped, `start_on_boot = false`). With `wipe`, its instances' data directories are
    /// removed first, as on rebuilt hosts; without, the old data stays (the old primary with
    /// whatever it never shipped). Refused while one of its PostgreSQL instances runs.
    pub async fn restart_site(&mut self, site: Site, wipe: bool) -> anyhow::Result<()> {
        for name in [site.database(), site.mirror()] {
            if let Some(pid) = self.instance(name).postmaster_pid() {
                bail!("{name}'s PostgreSQL still runs (pid {pid}): kill the site first");
            }
        }
        for name in [site.database(), site.mirror()] {
            let instance = self.instance_mut(name);
            instance.stop_agent().await;
            if wipe {
                for d in [instance.data_dir(), instance.dir.join("sock")] {
                    if d.exists() {
                        std::fs::remove_dir_all(&d)
                            .with_context(|| format!("removing {}", d.display()))?;
                    }
                }
            }
            instance.spawn_agent()?;
        }
        for name in site.servers() {
            self.restart_server(name).await?;
        }
        for name in [site.database(), site.mirror()] {
            self.wait_agent(name).await?;
        }
        Ok(())
    }

    /// Starts a killed or stopped server again on its data directory and ports.
    pub async fn restart_server(&mut self, name: &str) -> anyhow::Result<()> {
        self.server_mut(name).start_again().await?;
        Ok(())
    }

    /// An instance by name (panics on an unknown name: a bug in the test).
    pub fn instance(&self, name: &str) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no instance {name}; instances: {INSTANCES:?}"))
    }

    /// An instance by name, mutable.
    pub fn instance_mut(&mut self, name: &str) -> &mut Instance {
        self.instances
            .iter_mut()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no instance {name}; instances: {INSTANCES:?}"))
    }

    /// A server by name (panics on an unknown name).
    pub fn server(&self, name: &str) -> &TestServer {
        &self
            .servers
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}; servers: {SERVERS:?}"))
            .server
    }

    /// A server by name, mutable (kill9, stop, start_again…).
    pub fn server_mut(&mut self, name: &str) -> &mut TestServer {
        &mut self
            .servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}; servers: {SERVERS:?}"))
            .server
    }

    /// Client addresses of all servers, in [`SERVERS`] order.
    pub fn server_addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.server.c2s_addr()).collect()
    }

    /// Client addresses of one site's servers.
    pub fn site_server_addrs(&self, site: Site) -> Vec<SocketAddr> {
        self.servers
            .iter()
            .filter(|s| s.site == site)
            .map(|s| s.server.c2s_addr())
            .collect()
    }

    /// The etcd endpoints, comma-separated (`PCHAT_ETCD`).
    pub fn etcd(&self) -> &str {
        &self.etcd
    }

    /// The etcd cluster, to kill or pause members.
    pub fn etcd_cluster_mut(&mut self) -> &mut EtcdCluster {
        &mut self.secure.cluster
    }

    /// The pool's PKI and the identities of the lab's processes.
    pub fn secure(&self) -> &SecureEtcd {
        &self.secure
    }

    /// The lab's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The log-shipping share.
    pub fn share_dir(&self) -> &Path {
        &self.share
    }

    /// Site B's copy directory (the topology's `copy_dir`).
    pub fn copy_dir(&self) -> &Path {
        &self.copy_dir
    }

    /// The published topology file.
    pub fn topology_path(&self) -> &Path {
        &self.topology
    }

    /// A ledger configuration for `user` in `room`, trying every server of the lab.
    pub fn ledger_config(&self, user: &str, room: &str, prefix: &str) -> LedgerConfig {
        let mut cfg = LedgerConfig::new(
            self.server_addrs(),
            &format!("{user}@{DOMAIN}"),
            PASSWORD,
            room,
            prefix,
        );
        cfg.names = self
            .servers
            .iter()
            .map(|s| (s.server.c2s_addr(), s.name.to_string()))
            .collect();
        cfg
    }

    /// `room`'s whole archive, read as `user` through whichever server is active.
    pub async fn read_archive(&self, user: &str, room: &str) -> anyhow::Result<Archive> {
        Archive::read(
            &self.server_addrs(),
            &format!("{user}@{DOMAIN}"),
            PASSWORD,
            room,
            Duration::from_secs(60),
        )
        .await
    }
}

async fn pool_server(secure: &SecureEtcd, name: &str) -> anyhow::Result<TestServer> {
    let etcd = secure.endpoints_csv();
    let mut extra_args: Vec<String> = [
        "--topology-from-etcd",
        &etcd,
        "--pool",
        POOL,
        "--server",
        name,
        "--pool-poll-ms",
        "100",
        "--drain-timeout-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    extra_args.extend(secure.server_args(name));
    TestServer::start(
        &bin(),
        ServerOptions {
            extra_args,
            ..ServerOptions::default()
        },
    )
    .await
    .with_context(|| format!("starting server {name}"))
}

async fn wait_gone(pids: &[i32], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "processes {left:?} still alive {timeout:?} after SIGKILL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TwoSite {
    fn drop(&mut self) {
        let mut postmasters = Vec::new();
        for i in &mut self.instances {
            i.kill_agent();
            if let Some(pm) = i.postmaster_pid() {
                postmasters.push(pm);
            }
        }
        // Immediate shutdown (SIGQUIT) lets PostgreSQL remove its shared memory; whatever
        // is left after 3 s is killed.
        let trees: Vec<i32> = postmasters.iter().flat_map(|p| process_tree(*p)).collect();
        // A drill may have left some frozen (SIGSTOP): a stopped process ignores SIGQUIT.
        signal("CONT", &trees);
        signal("QUIT", &postmasters);
        let deadline = Instant::now() + Duration::from_secs(3);
        while postmasters.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left: Vec<i32> = trees.into_iter().filter(|p| alive(*p)).collect();
        signal("KILL", &left);
        if std::thread::panicking() {
            for i in &self.instances {
                eprintln!(
                    "--- {} agent log (tail) ---\n{}\n--- {} PostgreSQL log (tail) ---\n{}",
                    i.name,
                    tail(&i.agent_log(), 3000),
                    i.name,
                    tail(&i.pg_log(), 2000)
                );
            }
        }
        if std::env::var("PCHAT_TEST_KEEP_DATA").is_ok_and(|v| v == "1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("twosite: kept {}", dir.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The ledger
// ---------------------------------------------------------------------------------------

/// What a [`Ledger`] writes and how patiently.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// Servers' client (STARTTLS) addresses, tried in this order when no redirect names one.
    pub servers: Vec<SocketAddr>,
    /// Bare JID.
    pub jid: String,
    /// Password.
    pub password: String,
    /// Room JID.
    pub room: String,
    /// Nick in the room.
    pub nick: String,
    /// Message `n` has origin-id `PREFIX-n` and body `PREFIX n`.
    pub prefix: String,
    /// Pause after each acknowledged message.
    pub interval: Duration,
    /// How long one attempt waits for the reflection before resending.
    pub ack_timeout: Duration,
    /// How long one message may stay unacknowledged (across resends and reconnects) before
    /// the writer gives up with an error.
    pub stall_timeout: Duration,
    /// Names of servers, for the event log (e.g. `a1`); unnamed ones show as addresses.
    pub names: Vec<(SocketAddr, String)>,
}

impl LedgerConfig {
    /// Defaults: nick = the JID's localpart, 20 ms between messages, 3 s per attempt, give
    /// up after 120 s without an acknowledgment.
    pub fn new(
        servers: Vec<SocketAddr>,
        jid: &str,
        password: &str,
        room: &str,
        prefix: &str,
    ) -> LedgerConfig {
        LedgerConfig {
            servers,
            jid: jid.to_string(),
            password: password.to_string(),
            room: room.to_string(),
            nick: jid.split('@').next().unwrap_or("writer").to_string(),
            prefix: prefix.to_string(),
            interval: Duration::from_millis(20),
            ack_timeout: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(120),
            names: Vec::new(),
        }
    }
}

/// One message the ledger sent.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its number, from 1.
    pub n: u64,
    /// Its origin-id (`PREFIX-n`).
    pub origin_id: String,
    /// Its body (`PREFIX n`).
    pub body: String,
    /// When it was first sent.
    pub first_sent: Instant,
    /// How many times it was sent.
    pub attempts: u32,
    /// Its acknowledgment, if one came.
    pub ack: Option<Ack>,
}

/// The room's acknowledgment of a message: its reflection with a stanza-id.
#[derive(Clone, Debug)]
pub struct Ack {
    /// The stanza-id, which is the MAM archive id.
    pub id: i64,
    /// When the reflection arrived.
    pub at: Instant,
    /// The server whose session carried it.
    pub server: SocketAddr,
}

/// Something that happened to the writer (reconnects, errors, redirects).
#[derive(Clone, Debug)]
pub struct Event {
    /// When (first occurrence).
    pub at: Instant,
    /// What.
    pub what: String,
    /// How many more times the same thing happened soon after (folded).
    pub repeats: u32,
    /// When it last happened.
    pub last: Instant,
}

enum Attempt {
    Acked(Ack),
    /// Resend on the same session.
    Retry,
    /// The session is unusable: reconnect (to the redirect target first, if any).
    Reconnect(Option<SocketAddr>),
}

/// The client-side record of a writer; see the module documentation.
pub struct Ledger {
    cfg: LedgerConfig,
    entries: Vec<Entry>,
    events: Vec<Event>,
    session: Option<(Client, SocketAddr)>,
    redirect: Option<SocketAddr>,
    stop: Option<watch::Receiver<bool>>,
    progress: Option<watch::Sender<Progress>>,
    acked: usize,
    nick_suffix: u32,
}

/// A running writer's progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Messages acknowledged so far.
    pub acked: usize,
    /// The server that carried the last acknowledgment.
    pub server: Option<SocketAddr>,
}

impl Ledger {
    /// A ledger that has sent nothing yet (it connects on the first write).
    pub fn new(cfg: LedgerConfig) -> Ledger {
        Ledger {
            cfg,
            entries: Vec::new(),
            events: Vec::new(),
            session: None,
            redirect: None,
            stop: None,
            progress: None,
            acked: 0,
            nick_suffix: 0,
        }
    }

    /// A ledger holding `entries` as if it had written them (to test the checks themselves).
    pub fn with_entries(cfg: LedgerConfig, entries: Vec<Entry>) -> Ledger {
        let mut ledger = Ledger::new(cfg);
        ledger.acked = entries.iter().filter(|e| e.ack.is_some()).count();
        ledger.entries = entries;
        ledger
    }

    /// The configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.cfg
    }

    /// Every message sent, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The acknowledged messages, in order (which is acknowledgment order).
    pub fn acked(&self) -> impl Iterator<Item = (&Entry, &Ack)> {
        self.entries
            .iter()
            .filter_map(|e| e.ack.as_ref().map(|a| (e, a)))
    }

    /// What happened along the way.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The events as text, with times relative to the first message.
    pub fn events_text(&self) -> String {
        let t0 = self.entries.first().map(|e| e.first_sent);
        let mut out = String::new();
        for e in &self.events {
            let at = t0
                .map(|t| format!("{:>8.3}s", e.at.saturating_duration_since(t).as_secs_f64()))
                .unwrap_or_default();
            let rep = if e.repeats > 0 {
                format!(
                    " (×{} in {:.1} s)",
                    e.repeats + 1,
                    e.last.duration_since(e.at).as_secs_f64()
                )
            } else {
                String::new()
            };
            out.push_str(&format!("{at} {}{rep}\n", e.what));
        }
        out
    }

    /// The longest time between two consecutive acknowledgments and when it ended: the
    /// writer's view of an outage.
    pub fn longest_gap(&self) -> Option<(Duration, Instant)> {
        let acks: Vec<Instant> = self.acked().map(|(_, a)| a.at).collect();
        acks.windows(2)
            .map(|w| (w[1].duration_since(w[0]), w[1]))
            .max_by_key(|(d, _)| *d)
    }

    /// The first acknowledgment at or after `t`, e.g. to measure an RTO from a fault.
    pub fn first_ack_after(&self, t: Instant) -> Option<&Ack> {
        self.acked().map(|(_, a)| a).find(|a| a.at >= t)
    }

    fn note(&mut self, what: String) {
        // A retry loop cycles through a few servers: fold a repeat of any recent event.
        let now = Instant::now();
        let recent = self.events.len().saturating_sub(8);
        if let Some(e) = self.events[recent..]
            .iter_mut()
            .find(|e| e.what == what && now.duration_since(e.last) < Duration::from_secs(2))
        {
            e.repeats += 1;
            e.last = now;
            return;
        }
        self.events.push(Event {
            at: now,
            what,
            repeats: 0,
            last: now,
        });
    }

    /// A server's name from the configuration, else its address.
    fn label(&self, addr: SocketAddr) -> String {
        self.cfg
            .names
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| addr.to_string())
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| *s.borrow())
    }

    /// Logs in to an active server (following redirects) and joins the room, configuring it
    /// when this creates it. Bounded by the stall timeout.
    pub async fn connect(&mut self) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + self.cfg.stall_timeout;
        self.reconnect(deadline)
            .await?
            .ok_or_else(|| anyhow!("stopped while connecting"))
    }

    /// `Ok(None)` when told to stop before a session was found.
    async fn reconnect(&mut self, deadline: Instant) -> anyhow::Result<Option<SocketAddr>> {
        if let Some((old, _)) = self.session.take() {
            drop(old);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let first = self.redirect.take();
            let mut queue: VecDeque<SocketAddr> = first
                .into_iter()
                .chain(self.cfg.servers.iter().copied())
                .collect();
            let mut tried = HashSet::new();
            while let Some(addr) = queue.pop_front() {
                if !tried.insert(addr) {
                    continue;
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let name = self.label(addr);
                match self.open_session(addr, remaining).await {
                    Ok(client) => {
                        self.note(format!("joined {} through {name}", self.cfg.room));
                        self.session = Some((client, addr));
                        return Ok(Some(addr));
                    }
                    Err(SessionError::Redirect(to)) => {
                        let to_name = self.label(to);
                        self.note(format!("{name}: see-other-host {to_name}"));
                        queue.push_front(to);
                    }
                    Err(SessionError::Other(e)) => self.note(format!("{name}: {e}")),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "no server took the session within the stall timeout ({:?}); events:\n{}",
                    self.cfg.stall_timeout,
                    self.events_text()
                );
            }
            if self.stopping() {
                return Ok(None);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(400));
        }
    }

    async fn open_session(
        &mut self,
        addr: SocketAddr,
        remaining: Duration,
    ) -> Result<Client, SessionError> {
        let mut client = login(addr, &self.cfg.jid, &self.cfg.password, remaining).await?;
        client.set_reply_timeout(self.cfg.ack_timeout.max(Duration::from_secs(5)));
        let history = History {
            max_stanzas: Some(0),
            ..History::default()
        };
        let nick = match self.nick_suffix {
            0 => self.cfg.nick.clone(),
            k => format!("{}-{k}", self.cfg.nick),
        };
        let joined = match client.join_room(&self.cfg.room, &nick, Some(history)).await {
            Ok(j) => j,
            Err(XmppError::Stanza { error, .. }) if error.condition == "conflict" => {
                // The nick is still held, e.g. by the presence a killed server left behind.
                self.nick_suffix += 1;
                return Err(SessionError::Other(format!(
                    "nick {nick} in use; next join as {}-{}",
                    self.cfg.nick, self.nick_suffix
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if joined.self_status_codes().contains(&201) {
            // A new room stays locked until its owner accepts a configuration.
            let submit = Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_attr("to", self.cfg.room.as_str())
                .with_child(
                    Element::new("query", ns::MUC_OWNER)
                        .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
                );
            client
                .iq_result(submit, Duration::from_secs(10))
                .await
                .map_err(SessionError::from)?;
            self.note(format!("created and configured {}", self.cfg.room));
        }
        client.set_reply_timeout(self.cfg.ack_timeout);
        Ok(client)
    }

    /// Sends the next message, resending it (same origin-id) until it is acknowledged.
    /// `Ok(None)` when the writer was told to stop first (the message stays unacknowledged).
    pub async fn write_next(&mut self) -> anyhow::Result<Option<&Entry>> {
        if self.stopping() {
            return Ok(None);
        }
        let n = self.entries.len() as u64 + 1;
        let prefix = &self.cfg.prefix;
        self.entries.push(Entry {
            n,
            origin_id: format!("{prefix}-{n}"),
            body: format!("{prefix} {n}"),
            first_sent: Instant::now(),
            attempts: 0,
            ack: None,
        });
        let idx = self.entries.len() - 1;
        let deadline = Instant::now() + self.cfg.stall_timeout;
        loop {
            if self.session.is_none()
                && (self.stopping() || self.reconnect(deadline).await?.is_none())
            {
                return Ok(None);
            }
            ensure!(
                Instant::now() < deadline,
                "message {n} unacknowledged after {:?}; events:\n{}",
                self.cfg.stall_timeout,
                self.events_text()
            );
            self.entries[idx].attempts += 1;
            match self.attempt(idx).await {
                Attempt::Acked(ack) => {
                    let server = ack.server;
                    self.entries[idx].ack = Some(ack);
                    self.acked += 1;
                    if let Some(p) = &self.progress {
                        let _ = p.send(Progress {
                            acked: self.acked,
                            server: Some(server),
                        });
                    }
                    return Ok(Some(&self.entries[idx]));
                }
                Attempt::Retry => {
                    if self.stopping() {
                        return Ok(None);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Attempt::Reconnect(to) => {
                    self.session = None;
                    self.redirect = to;
                    if self.stopping() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn attempt(&mut self, idx: usize) -> Attempt {
        let (room, body, origin) = (
            self.cfg.room.clone(),
            self.entries[idx].body.clone(),
            self.entries[idx].origin_id.clone(),
        );
        let Some(addr) = self.session.as_ref().map(|(_, a)| *a) else {
            return Attempt::Reconnect(None);
        };
        let name = self.label(addr);
        let Some((client, _)) = self.session.as_mut() else {
            return Attempt::Reconnect(None);
        };
        let result = client.send_groupchat(&room, &body, Some(&origin)).await;
        match result {
            Ok(reflection) => {
                // Drop whatever else is buffered (late reflections of earlier attempts,
                // other occupants' messages), so the buffer stays small.
                let _ = client.collect_for(Duration::ZERO).await;
                match stanza_id(&reflection, &room).and_then(|s| s.parse::<i64>().ok()) {
                    Some(id) => Attempt::Acked(Ack {
                        id,
                        at: Instant::now(),
                        server: addr,
                    }),
                    None => {
                        self.note(format!(
                            "{name}: reflection of {origin} without a numeric stanza-id: {reflection}"
                        ));
                        Attempt::Retry
                    }
                }
            }
            Err(XmppError::Stanza { error, .. }) if error.error_type == "wait" => {
                self.note(format!(
                    "{name}: {origin}: wait <{}/>{}",
                    error.condition,
                    error.text.map(|t| format!(": {t}")).unwrap_or_default()
                ));
                Attempt::Retry
            }
            Err(XmppError::Stanza { error, .. }) => {
                // Not an occupant any more, room gone or locked: join again.
                self.note(format!(
                    "{name}: {origin}: {} <{}/>; rejoining",
                    error.error_type, error.condition
                ));
                Attempt::Reconnect(None)
            }
            Err(XmppError::Timeout { .. }) => {
                self.note(format!(
                    "{name}: {origin}: no reflection in time; resending"
                ));
                // Two silent attempts in a row on one session: try another session.
                if self.entries[idx].attempts.is_multiple_of(2) {
                    Attempt::Reconnect(None)
                } else {
                    Attempt::Retry
                }
            }
            Err(e) => {
                let to = redirect_target(&e);
                self.note(format!("{name}: session ended: {e}"));
                Attempt::Reconnect(to)
            }
        }
    }

    /// Writes `count` more messages, each until acknowledged.
    pub async fn write(&mut self, count: usize) -> anyhow::Result<()> {
        for _ in 0..count {
            if self.write_next().await?.is_none() {
                break;
            }
            tokio::time::sleep(self.cfg.interval).await;
        }
        Ok(())
    }

    /// Runs the writer as a background task until [`LedgerTask::stop`].
    pub fn spawn(mut self) -> LedgerTask {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (progress_tx, progress_rx) = watch::channel(Progress {
            acked: self.acked,
            server: self.acked().last().map(|(_, a)| a.server),
        });
        self.stop = Some(stop_rx);
        self.progress = Some(progress_tx);
        let handle = tokio::spawn(async move {
            let result = loop {
                match self.write_next().await {
                    Ok(Some(_)) => tokio::time::sleep(self.cfg.interval).await,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            self.stop = None;
            self.progress = None;
            if let Some((client, _)) = self.session.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
            }
            (self, result)
        });
        LedgerTask {
            stop: stop_tx,
            progress: progress_rx,
            handle,
        }
    }

    /// Closes the session, if any, cleanly (bounded).
    pub async fn close(&mut self) {
        if let Some((client, _)) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
        }
    }

    /// The ledger's entries matched against the archive (I3 and I4 checked first).
    fn matched<'a>(&'a self, archive: &'a Archive) -> anyhow::Result<Vec<Match<'a>>> {
        archive.check_order()?;
        archive.check_unique()?;
        let by_origin: HashMap<&str, &Archived> = archive
            .messages
            .iter()
            .filter_map(|m| m.origin_id.as_deref().map(|o| (o, m)))
            .collect();
        let by_body: HashMap<&str, &Archived> = archive
            .messages
            .iter()
            .filter_map(|m| m.body.as_deref().map(|b| (b, m)))
            .collect();
        let mut out = Vec::new();
        for e in &self.entries {
            let stored = by_origin
                .get(e.origin_id.as_str())
                .or_else(|| by_body.get(e.body.as_str()))
                .copied();
            if let (Some(s), Some(a)) = (stored, &e.ack) {
                ensure!(
                    s.id == a.id,
                    "I1: message {} was acknowledged as id {} but is archived as id {}",
                    e.origin_id,
                    a.id,
                    s.id
                );
            }
            if let Some(s) = stored {
                ensure!(
                    s.body.as_deref() == Some(e.body.as_str()),
                    "message {} is archived with body {:?}, sent {:?}",
                    e.origin_id,
                    s.body,
                    e.body
                );
            }
            out.push(Match { entry: e, stored });
        }
        Ok(out)
    }

    fn summary(&self, archive: &Archive, matched: &[Match<'_>]) -> Summary {
        let unacked: Vec<&Match<'_>> = matched.iter().filter(|m| m.entry.ack.is_none()).collect();
        Summary {
            sent: self.entries.len(),
            acked: self.acked().count(),
            unacked_stored: unacked.iter().filter(|m| m.stored.is_some()).count(),
            unacked_missing: unacked.iter().filter(|m| m.stored.is_none()).count(),
            archived: archive.messages.len(),
            longest_gap: self.longest_gap().map(|(d, _)| d).unwrap_or_default(),
        }
    }

    /// XEP-0359: no two acknowledged messages got the same id, whatever was lost in between
    /// (a DR failover must not hand a lost message's id to a new one).
    pub fn check_ids_unique(&self) -> anyhow::Result<()> {
        let mut seen: HashMap<i64, &str> = HashMap::new();
        for (e, a) in self.acked() {
            if let Some(first) = seen.insert(a.id, e.origin_id.as_str()) {
                bail!(
                    "XEP-0359: id {} was acknowledged for {first} and again for {}",
                    a.id,
                    e.origin_id
                );
            }
        }
        Ok(())
    }

    /// Messages first sent before `t` and acknowledged after it: in flight at `t` (a
    /// server may have acknowledged one on the lost site, its reflection lost with it, and
    /// the writer's resend stored it again on the backup).
    pub fn in_flight_at(&self, t: Instant) -> usize {
        self.acked()
            .filter(|(e, a)| e.first_sent < t && a.at > t)
            .count()
    }

    /// I1, I3, I4: every acknowledged message is archived under its acknowledged id, the
    /// archive's ids are 1, 2, 3…, the writer's messages are archived in the order it sent
    /// them, and no message is stored twice.
    pub fn check_no_loss(&self, archive: &Archive) -> anyhow::Result<Summary> {
        self.check_ids_unique()?;
        let matched = self.matched(archive)?;
        let mut last: Option<(&str, i64)> = None;
        for m in &matched {
            if let Some(s) = m.stored {
                if let Some((prev, id)) = last {
                    ensure!(
                        s.id > id,
                        "I3: {} was sent after {prev} but archived before it (ids {} < {id})",
                        m.entry.origin_id,
                        s.id
                    );
                }
                last = Some((m.entry.origin_id.as_str(), s.id));
            }
        }
        let lost: Vec<&str> = matched
            .iter()
            .filter(|m| m.entry.ack.is_some() && m.stored.is_none())
            .map(|m| m.entry.origin_id.as_str())
            .collect();
        ensure!(
            lost.is_empty(),
            "I1: {} acknowledged message(s) missing from the archive: {:?}{}",
            lost.len(),
            &lost[..lost.len().min(20)],
            if lost.len() > 20 { " …" } else { "" }
        );
        Ok(self.summary(archive, &matched))
    }

    /// I2 (with I3, I4 and unique ids) for a disaster-recovery failover at `disaster` (the instant the old
    /// site was gone; `None`: the ledger covers only the time before it): the acknowledged
    /// messages missing from the archive must form one tail of what was acknowledged before
    /// the disaster — each acknowledged after every message that was kept from that time —
    /// and everything acknowledged after `disaster` must be kept. Returns how many were
    /// lost and their acknowledgment window.
    pub fn check_tail_loss(
        &self,
        archive: &Archive,
        disaster: Option<Instant>,
    ) -> anyhow::Result<TailLoss> {
        self.check_ids_unique()?;
        let matched = self.matched(archive)?;
        let acked: Vec<(&Entry, &Ack, bool)> = matched
            .iter()
            .filter_map(|m| {
                m.entry
                    .ack
                    .as_ref()
                    .map(|a| (m.entry, a, m.stored.is_some()))
            })
            .collect();
        let before = |a: &Ack| disaster.is_none_or(|d| a.at < d);
        let lost: Vec<(&Entry, &Ack)> = acked
            .iter()
            .filter(|(_, _, kept)| !kept)
            .map(|(e, a, _)| (*e, *a))
            .collect();
        if let Some((e, a)) = lost.iter().find(|(_, a)| !before(a)) {
            bail!(
                "I1: {} was acknowledged (id {}) after the disaster and is not archived",
                e.origin_id,
                a.id
            );
        }
        let first_lost = lost.first().map(|(e, _)| e.n);
        if let Some(first) = first_lost {
            if let Some((e, a, _)) = acked
                .iter()
                .find(|(e, a, kept)| *kept && e.n > first && before(a))
            {
                bail!(
                    "I2: the loss is not a tail: {} (id {}) was kept although it was \
                     acknowledged after the lost {}-{first}",
                    e.origin_id,
                    a.id,
                    self.cfg.prefix
                );
            }
        }
        Ok(TailLoss {
            summary: self.summary(archive, &matched),
            lost: lost.len(),
            lost_origin_ids: lost.iter().map(|(e, _)| e.origin_id.clone()).collect(),
            window: lost
                .first()
                .zip(lost.last())
                .map(|((_, first), (_, last))| (first.at, last.at)),
        })
    }
}

struct Match<'a> {
    entry: &'a Entry,
    stored: Option<&'a Archived>,
}

/// Counts from a check.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Messages sent (each possibly several times).
    pub sent: usize,
    /// Messages acknowledged.
    pub acked: usize,
    /// Unacknowledged messages found in the archive (their commit happened, the
    /// acknowledgment was lost; allowed).
    pub unacked_stored: usize,
    /// Unacknowledged messages not in the archive (allowed).
    pub unacked_missing: usize,
    /// Messages in the archive.
    pub archived: usize,
    /// Longest time between two consecutive acknowledgments.
    pub longest_gap: Duration,
}

/// The result of [`Ledger::check_tail_loss`].
#[derive(Clone, Debug)]
pub struct TailLoss {
    /// The counts.
    pub summary: Summary,
    /// Acknowledged messages lost.
    pub lost: usize,
    /// Their origin-ids, in order.
    pub lost_origin_ids: Vec<String>,
    /// When the first and the last lost message were acknowledged.
    pub window: Option<(Instant, Instant)>,
}

impl TailLoss {
    /// How long before `disaster` the first lost message was acknowledged: the data-loss
    /// window in time (compare with `backup_interval_s`).
    pub fn window_before(&self, disaster: Instant) -> Duration {
        self.window
            .map(|(first, _)| disaster.saturating_duration_since(first))
            .unwrap_or_default()
    }
}

/// A handle on a writer running in the background.
pub struct LedgerTask {
    stop: watch::Sender<bool>,
    progress: watch::Receiver<Progress>,
    handle: JoinHandle<(Ledger, anyhow::Result<()>)>,
}

impl LedgerTask {
    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        self.progress.borrow().acked
    }

    /// The server that carried the last acknowledgment.
    pub fn current_server(&self) -> Option<SocketAddr> {
        self.progress.borrow().server
    }

    /// Waits until at least `n` messages are acknowledged in all; fails when the writer
    /// ended (it gave up) or after `timeout`.
    pub async fn wait_acked(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let outcome = tokio::time::timeout(timeout, self.progress.wait_for(|p| p.acked >= n))
            .await
            .map(|r| r.map(drop));
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!("the writer ended before {n} acknowledgments"),
            Err(_) => bail!(
                "only {} of {n} messages acknowledged after {timeout:?}",
                self.acked()
            ),
        }
    }

    /// Waits for `more` acknowledgments beyond the current count.
    pub async fn wait_more(&mut self, more: usize, timeout: Duration) -> anyhow::Result<()> {
        let n = self.acked() + more;
        self.wait_acked(n, timeout).await
    }

    /// True once the writer has ended (it stops only when told to, or when it gave up).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Tells the writer to stop after the message in hand (or between its resends) and
    /// returns its ledger; an error when the writer had given up (with its events).
    pub async fn stop(self) -> anyhow::Result<Ledger> {
        let _ = self.stop.send(true);
        let (ledger, result) = self
            .handle
            .await
            .map_err(|e| anyhow!("the writer task failed: {e}"))?;
        result.with_context(|| {
            format!(
                "the writer gave up after {} acknowledged messages",
                ledger.acked
            )
        })?;
        Ok(ledger)
    }
}

enum SessionError {
    Redirect(SocketAddr),
    Other(String),
}

impl From<XmppError> for SessionError {
    fn from(e: XmppError) -> SessionError {
        match redirect_target(&e) {
            Some(to) => SessionError::Redirect(to),
            None => SessionError::Other(e.to_string()),
        }
    }
}

/// The server a `see-other-host` stream error names. The test kit keeps only the error's
/// `<text/>`, which pchat writes as "… the pool is served by HOST:PORT".
fn redirect_target(e: &XmppError) -> Option<SocketAddr> {
    match e {
        XmppError::Stream {
            condition,
            text: Some(text),
        } if condition == "see-other-host" => text
            .split_whitespace()
            .last()
            .map(|t| t.trim_end_matches(['.', ',', ';']))
            .and_then(|t| t.parse().ok()),
        _ => None,
    }
}

async fn login(
    addr: SocketAddr,
    jid: &str,
    password: &str,
    remaining: Duration,
) -> Result<Client, SessionError> {
    let mut opts = ConnectOptions::new(Transport::StartTls { addr }, jid, password);
    opts.connect_timeout = remaining.min(Duration::from_secs(5));
    Client::connect(opts).await.map_err(SessionError::from)
}

/// Logs in to whichever of `servers` serves (following `see-other-host`), within `timeout`.
pub async fn login_active(
    servers: &[SocketAddr],
    jid: &str,
    password: &str,
    timeout: Duration,
) -> anyhow::Result<(Client, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let mut redirect = None;
    loop {
        let mut queue: VecDeque<SocketAddr> = redirect
            .take()
            .into_iter()
            .chain(servers.iter().copied())
            .collect();
        let mut tried = HashSet::new();
        while let Some(addr) = queue.pop_front() {
            if !tried.insert(addr) {
                continue;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match login(addr, jid, password, remaining).await {
                Ok(c) => return Ok((c, addr)),
                Err(SessionError::Redirect(to)) => queue.push_front(to),
                Err(SessionError::Other(e)) => last = format!("{addr}: {e}"),
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no server of {servers:?} took a session within {timeout:?}; last error: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One archived message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archived {
    /// The MAM id (-1 when it is not a number).
    pub id: i64,
    /// Its origin-id, if it has one.
    pub origin_id: Option<String>,
    /// Its body.
    pub body: Option<String>,
}

/// A room's archive as a client reads it with MAM.
#[derive(Clone, Debug)]
pub struct Archive {
    /// The room.
    pub room: String,
    /// Every message, in archive order.
    pub messages: Vec<Archived>,
}

impl Archive {
    /// Reads the whole archive of `room`, page by page, through whichever server is active.
    pub async fn read(
        servers: &[SocketAddr],
        jid: &str,
        password: &str,
        room: &str,
        timeout: Duration,
    ) -> anyhow::Result<Archive> {
        let deadline = Instant::now() + timeout;
        let (mut client, addr) = login_active(servers, jid, password, timeout).await?;
        client.set_reply_timeout(Duration::from_secs(20));
        let mut messages = Vec::new();
        let mut after = None;
        for _ in 0..100_000 {
            ensure!(
                Instant::now() < deadline,
                "reading the archive of {room} took over {timeout:?}"
            );
            let rsm = Rsm {
                max: Some(500),
                before: None,
                after: after.clone(),
            };
            let page = client
                .mam_query(room, &[], Some(rsm))
                .await
                .with_context(|| format!("MAM query of {room} through {addr}"))?;
            for r in &page.results {
                let m = forwarded_message(r);
                messages.push(Archived {
                    id: r.attr("id").and_then(|i| i.parse().ok()).unwrap_or(-1),
                    origin_id: m.and_then(origin_id),
                    body: m.and_then(Element::body),
                });
            }
            if page.complete() || page.results.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
                return Ok(Archive {
                    room: room.to_string(),
                    messages,
                });
            }
            after = page.last();
        }
        bail!("the archive of {room} did not end after 100,000 pages")
    }

    /// The archive ids in order.
    pub fn ids(&self) -> Vec<i64> {
        self.messages.iter().map(|m| m.id).collect()
    }

    /// I3: the ids are 1, 2, 3, … — strictly increasing, without holes — but where a
    /// failover or restore started a new id epoch (`pchat_store::ids`): there the next id is
    /// the first of a later epoch (`E000000001`), and the count goes on from it.
    pub fn check_order(&self) -> anyhow::Result<()> {
        use pchat_store::ids::{epoch_base, epoch_of};
        let mut last = 0;
        for (i, m) in self.messages.iter().enumerate() {
            let jump =
                epoch_of(m.id) > epoch_of(last + 1) && m.id == epoch_base(epoch_of(m.id)) + 1;
            ensure!(
                m.id == last + 1 || jump,
                "I3: archive of {} has id {} after {last} at position {} (ids around it: {:?})",
                self.room,
                m.id,
                i + 1,
                &self.ids()[i.saturating_sub(3)..(i + 3).min(self.messages.len())]
            );
            last = m.id;
        }
        Ok(())
    }

    /// I4: no origin-id and no body is stored twice.
    pub fn check_unique(&self) -> anyhow::Result<()> {
        let mut origins = HashMap::new();
        let mut bodies = HashMap::new();
        for m in &self.messages {
            if let Some(o) = &m.origin_id {
                if let Some(first) = origins.insert(o.as_str(), m.id) {
                    bail!(
                        "I4: origin-id {o} stored twice, as ids {first} and {}",
                        m.id
                    );
                }
            }
            if let Some(b) = &m.body {
                if let Some(first) = bodies.insert(b.as_str(), m.id) {
                    bail!("I4: body {b:?} stored twice, as ids {first} and {}", m.id);
                }
            }
        }
        Ok(())
    }
}
