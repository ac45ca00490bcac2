//! The fixture shared by the integration tests: a lab in a temporary directory with etcd
//! (optional), one agent per instance (in this process, on loopback) and PostgreSQL run by
//! the agents as the `postgres` user, plus small helpers (connections, polling, topology).
//!
//! The pool is a secure one ([`Pki`]): etcd runs with TLS and client certificates, and once a
//! topology is published, etcd users and roles (`pchat control auth setup`'s); each agent
//! has its own instance identity (`tls_dir`): its writes to etcd are checked against its
//! role, and its API is HTTPS with client certificates. The test itself acts as the operator
//! (its identity reaches both). [`Lab::insecure`] makes the one exception: agents of an
//! insecure pool, plain HTTP with the shared token [`TOKEN`].
//! PostgreSQL runs as in a pool: each instance has its identity from the lab's own CA
//! (`ROOT/pki`, `pchat pki issue`'s layout), TCP only over TLS with passwords, the superuser
//! only on the unix socket — which is how the tests read and write directly ([`Node::conn`],
//! as root, whom `pg_ident.conf` maps to `postgres`).
//!
//! Each test file compiles this module on its own, so items one of them does not use are
//! marked `#[allow(dead_code)]`.

use pchat_testkit::postgres::process_tree;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pchat_agent::{AgentConfig, AgentHandle};
use pchat_agent_api::{AgentAccess, AgentClient, MirroringState};
use pchat_control::identities::{etcd_member_spec, issue_one, EtcdAccess};
use pchat_control::{auth, identities, pool, topology, Etcd, Topology, Who};
use pchat_procedures::mirror::{self, Ctx};
use pchat_testkit::etcd::{EtcdCluster, EtcdTls};
use pchat_tls::pki::Ca;

#[allow(dead_code)]
pub const TOKEN: &str = "test-token-0123456789abcdef";
#[allow(dead_code)]
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Commits wait for a lost mirror however long it takes: the tests that pin that rule.
const STRICT: &str = "mirror_loss_timeout_s = 0\n";

#[allow(dead_code)]
pub fn free_port() -> u16 {
    pchat_testkit::free_port().expect("a free port")
}

#[allow(dead_code)]
pub fn require_postgres() {
    assert!(
        Path::new(PG_BIN).join("initdb").is_file(),
        "PostgreSQL 15 is missing: apt-get install -y postgresql"
    );
}

/// etcd endpoints as the items of a TOML array: `"http://a", "http://b"`.
pub fn toml_list(endpoints: &[String]) -> String {
    endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The start of a topology for pool `pc1` (domain `localhost`): share, etcd and `[pool]`.
pub fn topology_header(share: &str, etcd: &[String]) -> String {
    format!(
        r#"share = "{share}"
etcd = [{etcd}]
[pool]
name = "pc1"
domain = "localhost"
"#,
        etcd = toml_list(etcd),
    )
}

/// The operator identity the tests act as.
pub const OPERATOR: &str = "admin";

/// The pool's PKI (`pchat pki init|issue`) in `ROOT/pki`.
pub struct Pki {
    pub dir: PathBuf,
    ca: Ca,
}

#[allow(dead_code)]
impl Pki {
    /// The CA and the operator's identity.
    pub fn new(root: &Path) -> Pki {
        let dir = root.join("pki");
        let ca = pchat_tls::pki::init(&dir, "pc1").expect("pki init");
        let pki = Pki { dir, ca };
        pki.issue(Who::Operator(OPERATOR.into()), &[]);
        pki
    }

    pub fn issue(&self, who: Who, hosts: &[&str]) -> PathBuf {
        let spec = who.identity_spec("pc1", hosts);
        issue_one(&self.ca, who, spec, false).expect("issue").dir
    }

    /// Instance `name`'s identity directory (its agent's `tls_dir`), issued if new.
    pub fn instance(&self, name: &str) -> PathBuf {
        self.issue(Who::Instance(name.into()), &["127.0.0.1"])
    }

    /// `n` etcd members with TLS and client certificates required.
    pub async fn etcd(&self, n: usize) -> EtcdCluster {
        let members = (1..=n)
            .map(|k| {
                let spec = etcd_member_spec("pc1", k, "127.0.0.1");
                self.ca.issue(&spec, false).expect("issue member");
                let d = self.ca.dir_of(&spec);
                (d.join("cert.pem"), d.join("key.pem"))
            })
            .collect();
        EtcdCluster::start_tls(
            n,
            EtcdTls {
                ca: self.dir.join("ca.crt"),
                members,
            },
        )
        .await
        .expect("etcd")
    }

    /// The operator's identity directory.
    pub fn operator_dir(&self) -> PathBuf {
        self.dir.join(Who::Operator(OPERATOR.into()).path())
    }

    /// Access to the agents with the identity in `dir`.
    pub fn agents_as(&self, dir: &Path) -> AgentAccess {
        let id = pchat_tls::Identity::load(dir).expect("identity");
        AgentAccess::new("pc1", Some(std::sync::Arc::new(id)), None)
    }

    /// Access to the agents as the operator.
    pub fn agents(&self) -> AgentAccess {
        self.agents_as(&self.operator_dir())
    }

    /// The operator's client (TLS, its etcd user once authentication is on).
    pub fn operator(&self, endpoints: &[String]) -> Etcd {
        EtcdAccess {
            endpoints: endpoints.to_vec(),
            tls_dir: Some(self.dir.join(Who::Operator(OPERATOR.into()).path())),
            hint: "test",
        }
        .connect(Some("pc1"))
        .expect("operator client")
    }

    /// `pchat pki issue` and `pchat control auth setup` for `t`, then the topology
    /// published as the operator; returns the operator's client.
    pub async fn setup_and_publish(&self, t: &Topology) -> Etcd {
        identities::issue(&self.ca, t, &[OPERATOR.to_owned()], false).expect("pki issue");
        let operator_dir = self.dir.join(Who::Operator(OPERATOR.into()).path());
        let (root, pw) = auth::root_client(&t.etcd, &operator_dir).expect("root client");
        auth::setup(&root, &pw, t, &self.dir)
            .await
            .expect("auth setup");
        let etcd = self.operator(&t.etcd);
        pool::publish_topology(&etcd, t).await.expect("publish");
        etcd
    }
}

#[allow(dead_code)]
pub struct Node {
    pub cfg: AgentConfig,
    /// The agent's URL, kept after the agent is gone.
    pub url: String,
    /// `None` once the host is lost.
    pub handle: Option<AgentHandle>,
    pub client: AgentClient,
    /// `connect_timeout` of [`Node::conn`], in seconds.
    connect_timeout_s: u32,
}

#[allow(dead_code)]
impl Node {
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.cfg.port)
    }

    /// The superuser's connection string: the unix socket (the only way in as `postgres`).
    pub fn conn(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout={}",
            self.cfg.socket_dir.display(),
            self.cfg.port,
            self.connect_timeout_s
        )
    }

    /// The instance's name in the lab's PKI (`NAME.pc1.pchat`).
    pub fn tls_name(&self) -> String {
        format!("{}.pc1.pchat", self.cfg.instance)
    }

    /// SIGKILL to the postmaster's process group, as a machine crash would.
    pub fn kill9(&self) {
        let text = std::fs::read_to_string(self.cfg.data_dir.join("postmaster.pid"))
            .expect("postmaster.pid");
        let pid: i32 = text.lines().next().unwrap().trim().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(-pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// The host is lost: the agent stops at once (its lease is not revoked, as after a
    /// `kill -9`) and the postmaster's process group gets SIGKILL.
    pub async fn lose_host(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
        self.kill9();
    }

    /// SIGSTOP (`freeze`) or SIGCONT to the postmaster and every process under it (each
    /// backend leads a process group of its own, so the tree is walked): a hung server,
    /// connections open and nothing answering, with the agent alive.
    pub fn freeze(&self, freeze: bool) {
        let text = std::fs::read_to_string(self.cfg.data_dir.join("postmaster.pid"))
            .expect("postmaster.pid");
        let pid: i32 = text.lines().next().unwrap().trim().parse().unwrap();
        let signal = if freeze {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        for p in process_tree(pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), signal);
        }
    }

    pub fn postmaster_alive(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.cfg.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let pid = text.lines().next().unwrap_or("").trim();
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
    }
}

/// Stops every instance when the test ends, however it ends.
#[allow(dead_code)]
pub struct Lab {
    pub root: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub etcd: Option<EtcdCluster>,
    pub pki: Pki,
    /// How the test reaches the agents: as the operator, or with an insecure pool's token.
    pub access: AgentAccess,
    /// Instance directories that are ext4 volumes of their own (loop mounts), unmounted
    /// when the lab ends.
    pub mounts: Vec<PathBuf>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A frozen filesystem (a test that failed mid-way) would hang the stops below.
        for at in &self.mounts {
            let _ = sh(&["fsfreeze", "--unfreeze", &at.display().to_string()]);
        }
        for n in &self.nodes {
            // A frozen server (a test that failed mid-way) would ignore the stop.
            if n.postmaster_alive() {
                n.freeze(false);
            }
            let _ = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(Path::new(PG_BIN).join("pg_ctl"))
                .arg("-D")
                .arg(&n.cfg.data_dir)
                .args(["stop", "-m", "immediate", "-s"])
                .current_dir("/")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        for at in &self.mounts {
            let _ = sh(&["umount", "--lazy", &at.display().to_string()]);
        }
    }
}

/// Runs a system command, failing with its stderr.
fn sh(argv: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[allow(dead_code)]
impl Lab {
    /// Agents for `instances` (automatic failover left to the default), with or without etcd.
    pub async fn new(instances: &[&str], with_etcd: bool) -> Lab {
        let instances: Vec<(&str, Option<bool>)> = instances.iter().map(|n| (*n, None)).collect();
        Lab::start("pchat-agent-", &instances, with_etcd, 5, STRICT, false).await
    }

    /// Agents of an insecure pool (`insecure = true`, the shared token in a file), without
    /// etcd: plain HTTP.
    pub async fn insecure(instances: &[&str]) -> Lab {
        let instances: Vec<(&str, Option<bool>)> = instances.iter().map(|n| (*n, None)).collect();
        Lab::start("pchat-agent-", &instances, false, 5, STRICT, true).await
    }

    /// Agents for `(instance, auto_failover)` with etcd; the first is the principal.
    pub async fn with_auto_failover(instances: &[(&str, bool)]) -> Lab {
        let instances: Vec<(&str, Option<bool>)> =
            instances.iter().map(|(n, a)| (*n, Some(*a))).collect();
        Lab::start("pchat-autofo-", &instances, true, 2, STRICT, false).await
    }

    /// As [`Lab::with_auto_failover`], with each instance's directory (data directory
    /// included) on an ext4 volume of its own, a loop mount, so that a test can stall its
    /// storage ([`Lab::stall_storage`]). Needs root, `mkfs.ext4` and `fsfreeze`.
    pub async fn with_auto_failover_on_volumes(instances: &[(&str, bool)]) -> Lab {
        let instances: Vec<(&str, Option<bool>)> =
            instances.iter().map(|(n, a)| (*n, Some(*a))).collect();
        Lab::start_on("pchat-stall-", &instances, true, 2, STRICT, false, true).await
    }

    /// Freezes (`true`) or thaws the filesystem of node `i`'s volume (`fsfreeze`): every
    /// write to it waits, reads go on: a stalled disk, as a hung SAN or a snapshot would
    /// make it.
    pub fn stall_storage(&self, i: usize, stall: bool) {
        let dir = self.nodes[i].cfg.data_dir.parent().unwrap().to_path_buf();
        assert!(
            self.mounts.contains(&dir),
            "{} is not a volume",
            dir.display()
        );
        let flag = if stall { "--freeze" } else { "--unfreeze" };
        sh(&["fsfreeze", flag, &dir.display().to_string()]).unwrap();
    }

    /// Fills (`true`) node `i`'s volume to its last block with a ballast file, or removes
    /// it: a full disk, as a runaway log or a WAL archive that stopped would make it.
    pub fn fill_storage(&self, i: usize, full: bool) {
        let dir = self.nodes[i].cfg.data_dir.parent().unwrap().to_path_buf();
        assert!(
            self.mounts.contains(&dir),
            "{} is not a volume",
            dir.display()
        );
        let ballast = dir.join("ballast");
        if !full {
            std::fs::remove_file(&ballast).unwrap();
            return;
        }
        let df = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&dir)
            .output()
            .expect("df");
        let avail: u64 = String::from_utf8_lossy(&df.stdout)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .expect("df's available bytes");
        let path = ballast.display().to_string();
        if sh(&["fallocate", "-l", &avail.to_string(), &path]).is_err() {
            // fallocate may refuse the very last blocks: take what it can, then write.
            let _ = std::process::Command::new("dd")
                .args(["if=/dev/zero", "bs=64k", "status=none", "oflag=append"])
                .args(["conv=notrunc", &format!("of={path}")])
                .output();
        }
    }

    /// Agents for `(instance, auto_failover)` with etcd and extra configuration lines.
    pub async fn with_config(instances: &[(&str, bool)], extra: &str) -> Lab {
        let instances: Vec<(&str, Option<bool>)> =
            instances.iter().map(|(n, a)| (*n, Some(*a))).collect();
        Lab::start("pchat-agent-", &instances, true, 2, extra, false).await
    }

    async fn start(
        prefix: &str,
        instances: &[(&str, Option<bool>)],
        with_etcd: bool,
        connect_timeout_s: u32,
        extra: &str,
        insecure: bool,
    ) -> Lab {
        Lab::start_on(
            prefix,
            instances,
            with_etcd,
            connect_timeout_s,
            extra,
            insecure,
            false,
        )
        .await
    }

    async fn start_on(
        prefix: &str,
        instances: &[(&str, Option<bool>)],
        with_etcd: bool,
        connect_timeout_s: u32,
        extra: &str,
        insecure: bool,
        volumes: bool,
    ) -> Lab {
        require_postgres();
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir");
        // The postgres user must be able to reach the data directories inside.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let pki = Pki::new(root.path());
        let etcd = if with_etcd {
            Some(pki.etcd(1).await)
        } else {
            None
        };
        let endpoints = etcd.as_ref().map(|e| e.endpoints()).unwrap_or_default();
        let access = if insecure {
            AgentAccess::new("pc1", None, Some(TOKEN.into()))
        } else {
            pki.agents()
        };
        let token_file = root.path().join("agent.token");
        pchat_tls::fs::write_private(&token_file, TOKEN.as_bytes()).unwrap();
        let mut lab = Lab {
            root,
            nodes: Vec::new(),
            etcd,
            pki,
            access,
            mounts: Vec::new(),
        };
        for (name, auto) in instances {
            let dir = lab.root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            if volumes {
                let image = lab.root.path().join(format!("{name}.img"));
                std::fs::File::create(&image)
                    .and_then(|f| f.set_len(512 * 1024 * 1024))
                    .unwrap();
                let (img, at) = (image.display().to_string(), dir.display().to_string());
                sh(&["mkfs.ext4", "-q", "-F", "-m", "0", &img]).expect("mkfs.ext4 (e2fsprogs)");
                sh(&["mount", "-o", "loop", &img, &at]).expect("a loop mount (run as root)");
                lab.mounts.push(dir.clone());
                let _ = std::fs::remove_dir(dir.join("lost+found"));
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let identity = if insecure {
                format!("insecure = true\ntoken_file = \"{}\"", token_file.display())
            } else {
                format!("tls_dir = \"{}\"", lab.pki.instance(name).display())
            };
            let mut text = format!(
                r#"listen = "127.0.0.1:0"
{identity}
pg_bin_dir = "{PG_BIN}"
data_dir = "{d}/data"
socket_dir = "{d}/sock"
port = {port}
etcd = [{etcd}]
pool = "pc1"
instance = "{name}"
start_on_boot = false
publish_interval_ms = 200
metrics_listen = "127.0.0.1:{metrics}"
"#,
                d = dir.display(),
                port = free_port(),
                metrics = free_port(),
                etcd = toml_list(&endpoints),
            );
            if let Some(auto) = auto {
                text.push_str(&format!("auto_failover = {auto}\n"));
            }
            text.push_str(extra);
            let cfg = AgentConfig::parse(&text).expect("agent config");
            if auto.is_some() {
                assert_eq!(cfg.leader_ttl_s, 5, "the default TTL is what is measured");
            }
            let handle = pchat_agent::serve(cfg.clone()).await.expect("agent");
            let url = handle.url();
            let client = lab.access.named(name, &url);
            lab.nodes.push(Node {
                cfg,
                url,
                handle: Some(handle),
                client,
                connect_timeout_s,
            });
        }
        lab
    }

    pub fn etcd(&self) -> &EtcdCluster {
        self.etcd.as_ref().expect("etcd")
    }

    pub fn etcd_mut(&mut self) -> &mut EtcdCluster {
        self.etcd.as_mut().expect("etcd")
    }

    pub fn share(&self) -> PathBuf {
        let p = self.root.path().join("share");
        if !p.exists() {
            std::fs::create_dir(&p).unwrap();
        }
        p
    }

    /// Publishes a topology whose site A has nodes[0] as database and nodes[1] as mirror.
    pub async fn publish(&self) -> Ctx {
        let endpoints = self.etcd().endpoints();
        let text = format!(
            r#"{header}[[sites]]
name = "A"
role = "primary"
database = {{ name = "{an}", address = "{a}", agent = "{aa}" }}
mirror = {{ name = "{mn}", address = "{m}", agent = "{ma}" }}
[[servers]]
name = "a1"
site = "A"
address = "127.0.0.1:5222"
"#,
            header = topology_header(&self.share().display().to_string(), &endpoints),
            an = self.nodes[0].cfg.instance,
            a = self.nodes[0].address(),
            aa = self.nodes[0].url,
            mn = self.nodes[1].cfg.instance,
            m = self.nodes[1].address(),
            ma = self.nodes[1].url,
        );
        let t = topology::parse(&text).expect("topology");
        Ctx {
            etcd: self.pki.setup_and_publish(&t).await,
            pool: "pc1".into(),
            agents: self.access.clone(),
        }
    }

    /// Publishes site A (nodes[0] database, nodes[1] mirror), initialises the principal and
    /// establishes mirroring.
    pub async fn mirrored(&self) -> Ctx {
        let ctx = self.publish().await;
        init_principal(&self.nodes[0]).await;
        let r = mirror::add(&ctx, None, false, &mut |_| {})
            .await
            .expect("mirror add");
        assert_eq!(r.state, MirroringState::Synchronized);
        ctx
    }
}

#[allow(dead_code)]
pub async fn connect(conn: &str) -> tokio_postgres::Client {
    try_connect(conn)
        .await
        .unwrap_or_else(|e| panic!("connect {conn}: {e}"))
}

#[allow(dead_code)]
pub async fn try_connect(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[allow(dead_code)]
pub async fn count(conn: &str) -> i64 {
    connect(conn)
        .await
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .expect("count")
        .get(0)
}

/// Waits until `check` holds, or fails the test naming `what`.
#[allow(dead_code)]
pub async fn until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Initialises and starts the instance, and creates the `ledger` table.
#[allow(dead_code)]
pub async fn init_principal(node: &Node) {
    assert!(node.client.init(&mut |_| {}).await.expect("init"));
    node.client.start().await.expect("start");
    let c = connect(&node.conn()).await;
    c.batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY, body text NOT NULL)")
        .await
        .unwrap();
}

#[allow(dead_code)]
pub fn progress_to_stderr() -> impl FnMut(&str) + Send {
    |line: &str| eprintln!("  {line}")
}
