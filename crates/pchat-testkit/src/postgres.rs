//! A real PostgreSQL 15 cluster in a temporary directory, for storage and pool tests.
//!
//! PostgreSQL refuses to run as root and tests run as root, so every server-side binary
//! (`initdb`, `pg_ctl`, hence `postgres`) runs as the `postgres` system user through
//! `runuser`, on a directory that user owns. The binaries are taken from
//! `/usr/lib/postgresql/15/bin` (Debian keeps them off PATH), or from `$PCHAT_PG_BIN`.
//!
//! The cluster listens on `127.0.0.1` only, on a free port, with its unix socket inside the
//! temporary directory, so that several clusters (one per test, tests run in parallel
//! threads) never meet. Authentication is as in a pool (no `trust` anywhere): the unix
//! socket admits the superuser `postgres` by `peer` (the OS users `postgres` and root, which
//! the tests run as), TCP admits every role by `scram-sha-256` password — over TLS only
//! (`hostssl`) when the cluster is given a certificate ([`PgOptions::tls`]). Login roles with
//! passwords are created at start ([`PgOptions::roles`]) or later ([`PgCluster::create_role`]).
//! `fsync` stays on, because the crash tests must see what a real crash leaves; only
//! `initdb` skips its syncs, since a crash during setup just fails the test.
//!
//! Cleanup: dropping a [`PgCluster`] stops it (`pg_ctl stop -m immediate`) and removes the
//! directory. A cluster kept in a `static` is never dropped, so each cluster also has a
//! watchdog process (`sh`, in its own process group so that a Ctrl-C to the test run does not
//! kill it first) that does the same once the test process has exited.
//!
//! ```no_run
//! use pchat_testkit::postgres::PgCluster;
//! let cluster = PgCluster::start()?;
//! cluster.create_database("mgc")?;
//! let one = cluster.psql("mgc", "SELECT 1")?;
//! assert_eq!(one.trim(), "1");
//! cluster.create_role("app", "a password")?;
//! let tcp = cluster.conn_string_as("mgc", "app"); // and the password, given separately
//! # Ok::<(), pchat_testkit::postgres::PgClusterError>(())
//! ```

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where Debian installs PostgreSQL 15's binaries.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// Environment variable that overrides [`PG_BIN_DIR`].
pub const PG_BIN_ENV: &str = "PCHAT_PG_BIN";
/// The system user the server runs as, and the cluster's superuser name.
pub const PG_USER: &str = "postgres";

/// How long `pg_ctl` may take to start or stop the server. Generous because crash recovery
/// after [`PgCluster::kill9`] replays WAL, and CI machines are slow.
const PG_CTL_TIMEOUT_S: u32 = 60;
/// How many fresh ports to try when the chosen one is taken between choosing and binding.
const PORT_ATTEMPTS: usize = 5;
/// How long [`PgCluster::start_again`] waits for processes of a killed server to be gone:
/// the init process here reaps orphans only every second or so, and a zombie postmaster
/// still holds the lock file's pid.
const REAP_WAIT: Duration = Duration::from_secs(15);
/// Enough of the server log to explain a failure, short enough to read.
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// Why the cluster could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PgClusterError {
    /// PostgreSQL 15 (or `runuser`, or the `postgres` user) is missing; says how to install it.
    #[error("{0}")]
    NotInstalled(String),
    /// File or process I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What the kit was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}\n{log}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stdout.
        stdout: String,
        /// Its stderr.
        stderr: String,
        /// The tail of the server log, when the server was involved.
        log: String,
    },
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// The caller asked for something the kit refuses (e.g. a database name needing quotes).
    #[error("invalid request: {0}")]
    Invalid(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgClusterError {
    let context = context.into();
    move |source| PgClusterError::Io { context, source }
}

/// The server's TLS material, as files the test made; the kit copies them into the
/// cluster's directory (owned by `postgres`, the key 0600, as PostgreSQL demands).
#[derive(Clone, Debug)]
pub struct PgTls {
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that clients' certificates (when they present one) must come from.
    pub ca: PathBuf,
}

/// How [`PgCluster::start_with`] sets a cluster up.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// TLS on, and TCP connections only over TLS (`hostssl`). `None`: TCP without TLS
    /// (still with passwords).
    pub tls: Option<PgTls>,
    /// Login roles created at start: `(name, password)`.
    pub roles: Vec<(String, String)>,
}

/// A running (or stopped) PostgreSQL cluster owned by the test. See the module docs.
pub struct PgCluster {
    bin: PathBuf,
    tls: bool,
    /// The temporary directory: `data/` (PGDATA), `sock/` (unix socket), `postgres.log`.
    /// `None` once removed by Drop.
    root: Option<tempfile::TempDir>,
    port: u16,
    watchdog: Option<Child>,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("root", &self.root_path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl PgCluster {
    /// Creates a cluster in a fresh temporary directory (`initdb` as `postgres`, UTF-8,
    /// locale `C.UTF-8`: Unicode-aware case folding for full-text search, code-point order
    /// for text) and starts it on a free loopback port. Fails with the install command when
    /// PostgreSQL 15 is missing.
    pub fn start() -> Result<PgCluster, PgClusterError> {
        PgCluster::start_with(PgOptions::default())
    }

    /// [`PgCluster::start`] with TLS and roles as `options` say.
    pub fn start_with(options: PgOptions) -> Result<PgCluster, PgClusterError> {
        let bin = std::env::var_os(PG_BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PG_BIN_DIR));
        check_installed(&bin)?;

        let root = tempfile::Builder::new()
            .prefix("pchat-pg-")
            .tempdir()
            .map_err(io_error("creating the cluster's temporary directory"))?;
        let mut cluster = PgCluster {
            bin,
            tls: options.tls.is_some(),
            root: Some(root),
            port: 0,
            watchdog: None,
        };
        std::fs::create_dir(cluster.socket_dir())
            .map_err(io_error("creating the socket directory"))?;
        run(Command::new("chown")
            .args(["-R", &format!("{PG_USER}:{PG_USER}")])
            .arg(cluster.root_path()))?;

        let initdb = cluster.bin.join("initdb");
        run(cluster
            .as_postgres(&initdb)
            .arg("-D")
            .arg(cluster.data_dir())
            .args([
                "-U",
                PG_USER,
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ]))?;
        cluster.append_config(&format!(
            "\n# pchat-testkit\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = on\nsynchronous_commit = on\nmax_connections = 200\nshared_buffers = 32MB\n\
             logging_collector = off\npassword_encryption = 'scram-sha-256'\n",
            cluster.socket_dir().display()
        ))?;
        cluster.write_auth(options.tls.is_some())?;
        if let Some(tls) = &options.tls {
            cluster.install_tls(tls)?;
        }
        cluster.start_watchdog()?;

        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            cluster.append_config(&format!("port = {}\n", cluster.port))?;
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    for (name, password) in &options.roles {
                        cluster.create_role(name, password)?;
                    }
                    return Ok(cluster);
                }
                // Another process took the port between our probe and the server's bind.
                Err(e) if cluster.log_tail().contains("could not bind") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| PgClusterError::Timeout("no free port for the cluster".into())))
    }

    /// The TCP port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host to connect to: always `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Whether TCP connections must use TLS (the cluster was started with a certificate).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// A libpq-style connection string (also accepted by `tokio-postgres`) for database `db`
    /// as the superuser `postgres`, over the unix socket (`peer`: the test runs as root or
    /// `postgres`). The only way in as the superuser.
    pub fn socket_conn_string(&self, db: &str) -> String {
        format!(
            "host={} port={} user={PG_USER} dbname={db} connect_timeout=10",
            self.socket_dir().display(),
            self.port
        )
    }

    /// A connection string for database `db` as `user` over loopback TCP (its password is
    /// given separately). With TLS, dial `hostaddr=127.0.0.1` and verify the certificate
    /// against `host=`[`PgCluster::tls_host`].
    pub fn conn_string_as(&self, db: &str, user: &str) -> String {
        format!(
            "host={} hostaddr={} port={} user={user} dbname={db} connect_timeout=10",
            if self.tls {
                PgCluster::tls_host()
            } else {
                self.host()
            },
            self.host(),
            self.port
        )
    }

    /// The name a test's certificate for a TLS cluster carries, as `host` of
    /// [`PgCluster::conn_string_as`].
    pub fn tls_host() -> &'static str {
        "localhost"
    }

    /// Creates a login role with a password (scram-sha-256), or gives an existing one this
    /// password. The SQL goes to psql on standard input, never on its command line.
    pub fn create_role(&self, name: &str, password: &str) -> Result<(), PgClusterError> {
        if !plain_name(name) {
            return Err(PgClusterError::Invalid(format!(
                "role name {name:?}: use lower-case letters, digits and `_`"
            )));
        }
        let quoted = password.replace('\'', "''");
        self.psql_stdin(
            "postgres",
            &format!(
                "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN \
                 CREATE ROLE {name} LOGIN; END IF; END$$;\n\
                 ALTER ROLE {name} LOGIN PASSWORD '{quoted}';\n"
            ),
        )
        .map(drop)
    }

    /// The temporary directory holding everything of the cluster.
    pub fn root_path(&self) -> &Path {
        match &self.root {
            Some(root) => root.path(),
            None => Path::new("/nonexistent"),
        }
    }

    /// PGDATA.
    pub fn data_dir(&self) -> PathBuf {
        self.root_path().join("data")
    }

    /// The directory of the server's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root_path().join("sock")
    }

    fn log_path(&self) -> PathBuf {
        self.root_path().join("postgres.log")
    }

    /// The last few KiB of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let start = text.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// Creates a database (names limited to `[a-z0-9_]`, so they never need quoting).
    pub fn create_database(&self, name: &str) -> Result<(), PgClusterError> {
        if !plain_name(name) {
            return Err(PgClusterError::Invalid(format!(
                "database name {name:?}: use lower-case letters, digits and `_`"
            )));
        }
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .map(drop)
    }

    /// Runs SQL with `psql` in database `db` as the superuser over the unix socket (stops at
    /// the first error) and returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, PgClusterError> {
        let output = run(self.psql_command(db).args(["-c", sql])).map_err(|e| self.with_log(e))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn psql_command(&self, db: &str) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-U", PG_USER, "-d", db])
            .env("PGCONNECT_TIMEOUT", "10");
        c
    }

    /// [`PgCluster::psql`] with the SQL on standard input (for secrets).
    fn psql_stdin(&self, db: &str, sql: &str) -> Result<String, PgClusterError> {
        let mut command = self.psql_command(db);
        command.args(["-f", "-"]);
        let line = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error(format!("running {line}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(io_error("writing to psql"))?;
        }
        let output = child
            .wait_with_output()
            .map_err(io_error(format!("waiting for {line}")))?;
        if !output.status.success() {
            return Err(self.with_log(PgClusterError::Command {
                command: line,
                status: output.status.to_string(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                log: String::new(),
            }));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`), waiting until it is down.
    pub fn stop(&self) -> Result<(), PgClusterError> {
        self.pg_ctl(&["stop", "-m", "fast"]).map(drop)
    }

    /// Kills the postmaster and every backend with SIGKILL at once (the whole process group,
    /// which `pg_ctl` made the postmaster lead), as a machine crash would. Returns once the
    /// signal is delivered; [`PgCluster::start_again`] then runs crash recovery.
    pub fn kill9(&self) -> Result<(), PgClusterError> {
        let pid = self.postmaster_pid()?;
        match kill(Pid::from_raw(-pid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(PgClusterError::Io {
                context: format!("SIGKILL to the server's process group {pid}"),
                source: std::io::Error::from(e),
            }),
        }
    }

    /// Freezes the postmaster and every process under it with SIGSTOP, as a hung VM or
    /// disk leaves a server: connections stay open, nothing answers. (Each backend runs in
    /// a process group of its own, so the tree is walked.) [`PgCluster::thaw`] resumes it.
    pub fn freeze(&self) -> Result<(), PgClusterError> {
        self.signal_tree(Signal::SIGSTOP)
    }

    /// Resumes a server frozen by [`PgCluster::freeze`].
    pub fn thaw(&self) -> Result<(), PgClusterError> {
        self.signal_tree(Signal::SIGCONT)
    }

    fn signal_tree(&self, signal: Signal) -> Result<(), PgClusterError> {
        let pid = self.postmaster_pid()?;
        for p in process_tree(pid) {
            match kill(Pid::from_raw(p), signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(PgClusterError::Io {
                        context: format!("{signal} to the server's process {p}"),
                        source: std::io::Error::from(e),
                    })
                }
            }
        }
        Ok(())
    }

    /// Starts the server again on the same port, after [`PgCluster::stop`] or
    /// [`PgCluster::kill9`] (waiting first for a killed server's processes to be gone).
    pub fn start_again(&self) -> Result<(), PgClusterError> {
        if let Ok(pid) = self.postmaster_pid() {
            let deadline = Instant::now() + REAP_WAIT;
            // kill(-pgid, 0) succeeds while any process of the old group, zombies included,
            // exists; the new postmaster would refuse the lock file until then.
            while kill(Pid::from_raw(-pid), None).is_ok() {
                if Instant::now() >= deadline {
                    return Err(PgClusterError::Timeout(format!(
                        "processes of the old server (group {pid}) still exist after {REAP_WAIT:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.pg_ctl_start()
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Result<i32, PgClusterError> {
        let path = self.data_dir().join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .map_err(io_error(format!("reading {}", path.display())))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .filter(|pid| *pid > 0)
            .ok_or_else(|| PgClusterError::Invalid(format!("{} holds no pid", path.display())))
    }

    fn pg_ctl_start(&self) -> Result<(), PgClusterError> {
        let log = self.log_path().display().to_string();
        self.pg_ctl(&["start", "-l", &log]).map(drop)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output, PgClusterError> {
        let pg_ctl = self.bin.join("pg_ctl");
        run(self
            .as_postgres(&pg_ctl)
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", &PG_CTL_TIMEOUT_S.to_string(), "-s"])
            .args(args))
        .map_err(|e| self.with_log(e))
    }

    /// A command running `program` as the `postgres` user, in the cluster's directory (the
    /// test's own working directory may not be readable by that user).
    fn as_postgres(&self, program: &Path) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", PG_USER, "--"])
            .arg(program)
            .current_dir(self.root_path())
            .stdin(Stdio::null());
        command
    }

    /// `pg_hba.conf` and `pg_ident.conf`: the superuser by `peer` on the socket (OS users
    /// `postgres` and root), every role by scram password over loopback TCP (TLS only with
    /// `tls`); nothing by `trust`.
    fn write_auth(&self, tls: bool) -> Result<(), PgClusterError> {
        let host = if tls { "hostssl" } else { "host   " };
        let hba = format!(
            "# pchat-testkit: no trust anywhere.\n\
             local   all          {PG_USER}  peer map=kit\n\
             local   replication  {PG_USER}  peer map=kit\n\
             {host} all          all       127.0.0.1/32  scram-sha-256\n\
             {host} replication  all       127.0.0.1/32  scram-sha-256\n"
        );
        let ident = format!("kit  {PG_USER}  {PG_USER}\nkit  root  {PG_USER}\n");
        for (name, text) in [("pg_hba.conf", hba), ("pg_ident.conf", ident)] {
            let path = self.data_dir().join(name);
            std::fs::write(&path, text).map_err(io_error(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    /// Copies the certificate, key and CA into `ROOT/tls` (owned by `postgres`, key 0600)
    /// and turns TLS on.
    fn install_tls(&self, tls: &PgTls) -> Result<(), PgClusterError> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.root_path().join("tls");
        std::fs::create_dir(&dir).map_err(io_error("creating the TLS directory"))?;
        for (from, name, mode) in [
            (&tls.cert, "server.crt", 0o644),
            (&tls.key, "server.key", 0o600),
            (&tls.ca, "ca.crt", 0o644),
        ] {
            let to = dir.join(name);
            std::fs::copy(from, &to).map_err(io_error(format!(
                "copying {} to {}",
                from.display(),
                to.display()
            )))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .map_err(io_error(format!("setting the mode of {}", to.display())))?;
        }
        run(Command::new("chown")
            .args(["-R", &format!("{PG_USER}:{PG_USER}")])
            .arg(&dir))?;
        self.append_config(&format!(
            "ssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
             ssl_ca_file = '{d}/ca.crt'\nssl_min_protocol_version = 'TLSv1.2'\n",
            d = dir.display()
        ))
    }

    fn append_config(&self, text: &str) -> Result<(), PgClusterError> {
        let path = self.data_dir().join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(io_error(format!("appending to {}", path.display())))
    }

    /// Starts the process that stops the server and removes the directory once this test
    /// process is gone (see the module docs).
    fn start_watchdog(&mut self) -> Result<(), PgClusterError> {
        let script = "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; \
                      runuser -u postgres -- \"$2\" -D \"$3\" stop -m immediate -s >/dev/null 2>&1; \
                      rm -rf \"$4\"";
        let child = Command::new("sh")
            .args(["-c", script, "pchat-pg-watchdog"])
            .arg(std::process::id().to_string())
            .arg(self.bin.join("pg_ctl"))
            .arg(self.data_dir())
            .arg(self.root_path())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io_error("starting the cluster watchdog"))?;
        self.watchdog = Some(child);
        Ok(())
    }

    fn with_log(&self, e: PgClusterError) -> PgClusterError {
        match e {
            PgClusterError::Command {
                command,
                status,
                stdout,
                stderr,
                ..
            } => PgClusterError::Command {
                command,
                status,
                stdout,
                stderr,
                log: format!("--- postgres.log (tail) ---\n{}", self.log_tail()),
            },
            other => other,
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.root.is_none() {
            return;
        }
        // Immediate: the data is thrown away anyway, and it is the quickest way down.
        if self.data_dir().join("postmaster.pid").exists() {
            // A frozen server (a test that failed mid-way) would ignore the stop.
            let _ = self.thaw();
            if let Err(e) = self.pg_ctl(&["stop", "-m", "immediate"]) {
                eprintln!("pchat-testkit: stopping the PostgreSQL cluster failed: {e}");
                let _ = self.kill9();
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(root) = self.root.take() {
            if let Err(e) = root.close() {
                eprintln!("pchat-testkit: removing the cluster directory failed: {e}");
            }
        }
    }
}

/// `pid` and every process under it, parents first (read from `/proc`). The test fixtures
/// and the chaos harness use it to signal or wait for a whole PostgreSQL or agent.
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            // "pid (comm) state ppid …": comm may hold spaces and parentheses.
            let ppid = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .and_then(|s| s.parse::<i32>().ok())
                });
            if let Some(ppid) = ppid {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 10_000 {
        let parent = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// Names that never need quoting in SQL.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn check_installed(bin: &Path) -> Result<(), PgClusterError> {
    const FIX: &str = "install it with `apt-get update && apt-get install -y postgresql` \
                       (Debian's PostgreSQL 15), or point PCHAT_PG_BIN at its bin directory";
    for tool in ["initdb", "pg_ctl", "postgres", "psql"] {
        if !bin.join(tool).is_file() {
            return Err(PgClusterError::NotInstalled(format!(
                "PostgreSQL 15 is not installed: {} is missing; {FIX}",
                bin.join(tool).display()
            )));
        }
    }
    let user = Command::new("id")
        .args(["-u", PG_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(user, Ok(s) if s.success()) {
        return Err(PgClusterError::NotInstalled(format!(
            "the `{PG_USER}` system user does not exist (the postgresql package creates it); {FIX}"
        )));
    }
    if Command::new("runuser")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(PgClusterError::NotInstalled(
            "`runuser` is missing: install it with `apt-get install -y util-linux`".into(),
        ));
    }
    Ok(())
}

/// Runs a command to completion; a non-zero exit is an error carrying its output.
fn run(command: &mut Command) -> Result<Output, PgClusterError> {
    let line = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_error(format!("running {line}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(PgClusterError::Command {
            command: line,
            status: output.status.to_string(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            log: String::new(),
        })
    }
}

/// A port the kernel just had free on loopback. Another process may take it before the
/// server binds; [`PgCluster::start`] retries with another then.
fn free_port() -> Result<u16, PgClusterError> {
    crate::ports::free_port().map_err(io_error("probing for a free port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_lifecycle() {
        let started = Instant::now();
        let cluster = PgCluster::start().expect("start a cluster");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "start took {took:?}");
        cluster.create_database("kit_test").unwrap();
        cluster
            .psql(
                "kit_test",
                "CREATE TABLE t (x int); INSERT INTO t VALUES (41)",
            )
            .unwrap();
        assert_eq!(
            cluster
                .psql("kit_test", "SELECT x + 1 FROM t")
                .unwrap()
                .trim(),
            "42"
        );
        assert_eq!(cluster.psql("kit_test", "SHOW fsync").unwrap().trim(), "on");
        assert!(cluster.create_database("Bad-Name").is_err());

        cluster.kill9().unwrap();
        assert!(cluster.psql("kit_test", "SELECT 1").is_err(), "killed");
        cluster.start_again().unwrap();
        assert_eq!(
            cluster.psql("kit_test", "SELECT x FROM t").unwrap().trim(),
            "41",
            "committed data survives kill -9"
        );
        cluster.stop().unwrap();
        assert!(cluster.psql("kit_test", "SELECT 1").is_err(), "stopped");
        cluster.start_again().unwrap();
        assert_eq!(cluster.psql("kit_test", "SELECT 1").unwrap().trim(), "1");
        let root = cluster.root_path().to_path_buf();
        drop(cluster);
        assert!(!root.exists(), "Drop removes the directory");
    }

    /// psql over loopback TCP as `user` with `password`, in `sslmode`.
    fn tcp_psql(
        c: &PgCluster,
        user: &str,
        password: &str,
        sslmode: &str,
    ) -> Result<String, PgClusterError> {
        let out = run(Command::new(c.bin.join("psql"))
            .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
            .arg(format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres sslmode={sslmode} connect_timeout=5",
                c.port()
            ))
            .env("PGPASSWORD", password))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    #[test]
    fn no_trust_and_tls_only_when_given_a_certificate() {
        // Plain cluster: passwords over TCP, the superuser only on the socket.
        let c = PgCluster::start_with(PgOptions {
            roles: vec![("app".into(), "secret one".into())],
            ..PgOptions::default()
        })
        .unwrap();
        assert_eq!(tcp_psql(&c, "app", "secret one", "disable").unwrap(), "app");
        assert!(tcp_psql(&c, "app", "wrong", "disable").is_err());
        assert!(
            tcp_psql(&c, PG_USER, "", "disable").is_err(),
            "no superuser over TCP"
        );
        assert_eq!(
            c.psql("postgres", "SELECT current_user").unwrap().trim(),
            PG_USER
        );

        // TLS cluster: plaintext TCP is refused, TLS with the password works.
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![PgCluster::tls_host().to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let files = PgTls {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, ca.pem()).unwrap();
        let c = PgCluster::start_with(PgOptions {
            tls: Some(files),
            roles: vec![("app".into(), "pw".into())],
        })
        .unwrap();
        assert!(c.tls());
        assert!(
            tcp_psql(&c, "app", "pw", "disable").is_err(),
            "plaintext refused"
        );
        assert_eq!(tcp_psql(&c, "app", "pw", "require").unwrap(), "app");
        assert!(c
            .conn_string_as("mgc", "app")
            .contains("host=localhost hostaddr=127.0.0.1"));
    }

    #[test]
    fn clusters_in_parallel() {
        let handles: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(|| PgCluster::start().expect("start")))
            .collect();
        let clusters: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for c in &clusters {
            assert_eq!(c.psql("postgres", "SELECT 1").unwrap().trim(), "1");
        }
    }
}
