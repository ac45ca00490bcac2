//! PostgreSQL as a pool runs it, for the tests that need one: a small PKI for the lab
//! ([`LabPki`]: `pchat pki`'s layout, made with the same library) and `pchat agent run`
//! processes that own their instances ([`AgentProcess`]), with TLS, passwords and no `trust`
//! (or, for the one test of an insecure pool, without TLS: [`AgentIdentity::Insecure`]).
//! The shell reaches the databases as an operator and the servers as themselves
//! (`PCHAT_TLS_DIR` / `--tls-dir`); the tests read the databases directly as the superuser
//! over the unix socket ([`AgentProcess::psql`]).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};

/// PostgreSQL's binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The lab's CA and the identities issued from it (`DIR/instances/I`, `DIR/servers/S`,
/// `DIR/operators/O`), for pool `pool`.
pub struct LabPki {
    ca: pchat_tls::pki::Ca,
    pool: String,
    /// One issue at a time: a second one of the same identity then finds it and keeps it,
    /// instead of replacing files a running process may be reading.
    issuing: std::sync::Mutex<()>,
}

impl LabPki {
    /// A new CA in `dir` for `pool`.
    pub fn new(dir: &Path, pool: &str) -> anyhow::Result<LabPki> {
        Ok(LabPki {
            ca: pchat_tls::pki::init(dir, pool)?,
            pool: pool.to_owned(),
            issuing: std::sync::Mutex::new(()),
        })
    }

    fn issue(&self, path: String, names: Vec<String>, server: bool) -> anyhow::Result<PathBuf> {
        let spec = pchat_tls::pki::IdentitySpec {
            path,
            names,
            server,
            client: true,
        };
        let _one = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        self.ca.issue(&spec, false)?;
        Ok(self.ca.root().join(&spec.path))
    }

    /// One PKI for every test of this test binary (pool `pc1`), made afresh in the target's
    /// temporary directory by the first test that asks. Identities carry no port, so tests
    /// running side by side share them; the shell's operator identity among them lets a
    /// plain function run `pchat` for any of those tests.
    pub fn shared() -> &'static LabPki {
        static SHARED: std::sync::OnceLock<LabPki> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let exe = std::env::current_exe().unwrap_or_default();
            let name = exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "tests".into());
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pki-{name}"));
            let _ = std::fs::remove_dir_all(&dir);
            LabPki::new(&dir, "pc1").unwrap_or_else(|e| panic!("the tests' PKI: {e}"))
        })
    }

    /// The CA's certificate (libpq's `sslrootcert`).
    pub fn ca_file(&self) -> PathBuf {
        self.ca.root().join("ca.crt")
    }

    /// Instance `name` (PostgreSQL and its agent on 127.0.0.1).
    pub fn instance(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.issue(
            format!("instances/{name}"),
            vec![format!("{name}.{}.pchat", self.pool), "127.0.0.1".into()],
            true,
        )
    }

    /// Pool server `name`.
    pub fn server(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.issue(
            format!("servers/{name}"),
            vec![format!("{name}.servers.{}.pchat", self.pool)],
            false,
        )
    }

    /// Operator `name` (the shell).
    pub fn operator(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.issue(
            format!("operators/{name}"),
            vec![format!("{name}.operators.{}.pchat", self.pool)],
            false,
        )
    }
}

/// A free port on 127.0.0.1 (another process may take it first; the tests live with that).
pub fn free_port() -> u16 {
    pchat_testkit::free_port().unwrap_or(0)
}

/// How an agent is configured to authenticate.
pub enum AgentIdentity<'a> {
    /// Its instance identity (`tls_dir`): HTTPS, TLS to etcd and PostgreSQL.
    Tls(&'a Path),
    /// `insecure = true` with the pool's shared token in `token_file`.
    Insecure {
        /// The token's file (0600).
        token_file: &'a Path,
    },
}

/// One `pchat agent run` process and its PostgreSQL instance, in `ROOT/NAME` (`agent.toml`,
/// `agent.log`, `data/`, `sock/`). Dropping it kills the agent and stops PostgreSQL.
pub struct AgentProcess {
    /// The instance's name.
    pub name: String,
    pool: String,
    /// PostgreSQL's port on 127.0.0.1.
    pub pg_port: u16,
    /// The agent's URL.
    pub agent_url: String,
    /// Its directory.
    pub dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl AgentProcess {
    /// Writes the configuration of instance `name` of pool `pool` (with its identity
    /// `tls_dir`) and starts its agent.
    pub fn start(
        root: &Path,
        name: &str,
        pool: &str,
        etcd: &[String],
        tls_dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_as(root, name, pool, etcd, AgentIdentity::Tls(tls_dir))
    }

    /// [`AgentProcess::start`] with the identity (or the insecure token) given.
    pub fn start_as(
        root: &Path,
        name: &str,
        pool: &str,
        etcd: &[String],
        identity: AgentIdentity<'_>,
    ) -> anyhow::Result<AgentProcess> {
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
        let (identity, scheme) = match identity {
            AgentIdentity::Tls(dir) => (format!("tls_dir = \"{}\"", dir.display()), "https"),
            AgentIdentity::Insecure { token_file } => (
                format!("insecure = true\ntoken_file = \"{}\"", token_file.display()),
                "http",
            ),
        };
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{agent_port}\"\npg_bin_dir = \"{PG_BIN}\"\n\
                 data_dir = \"{d}/data\"\nsocket_dir = \"{d}/sock\"\nport = {pg_port}\netcd = [{eps}]\n\
                 {identity}\npool = \"{pool}\"\ninstance = \"{name}\"\nstart_on_boot = false\n\
                 publish_interval_ms = 200\n",
                d = dir.display(),
            ),
        )?;
        let mut a = AgentProcess {
            name: name.to_owned(),
            pool: pool.to_owned(),
            pg_port,
            agent_url: format!("{scheme}://127.0.0.1:{agent_port}"),
            dir,
            config,
            child: None,
        };
        a.spawn()?;
        Ok(a)
    }

    /// Stops the agent (PostgreSQL keeps running) and starts it again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn()
    }

    /// What the agent wrote to standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_pchat"))
                .args(["agent", "run", "--config"])
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning the agent of {}", self.name))?,
        );
        Ok(())
    }

    /// Waits (bounded) until the agent answers its status to `access` (an operator's
    /// identity, or an insecure pool's token).
    pub async fn wait_up_as(&self, access: &pchat_agent_api::AgentAccess) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = access.named(&self.name, &self.agent_url);
        loop {
            if client.status().await.is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the agent of {} did not answer within 20 s: {}",
                self.name,
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until the agent answers the operator whose identity is in
    /// `operator_dir`.
    pub async fn wait_up(&self, operator_dir: &Path) -> anyhow::Result<()> {
        let identity = pchat_tls::Identity::load(operator_dir)?;
        let access = pchat_agent_api::AgentAccess::new(
            &self.pool,
            Some(std::sync::Arc::new(identity)),
            None,
        );
        self.wait_up_as(&access).await
    }

    /// `127.0.0.1:PORT` of PostgreSQL, as in the topology.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    /// PGDATA.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs SQL in `db` as the superuser over the unix socket (psql, as root, whom the
    /// agent's `pg_ident.conf` maps to `postgres`); unaligned tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.join("sock"))
            .args(["-p", &self.pg_port.to_string(), "-U", "postgres", "-d", db])
            .args(["-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "psql on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["stop", "-m", "immediate", "-s"])
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
