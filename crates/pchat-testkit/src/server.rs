//! A harness that runs the real `pchat` binary in a temporary data directory.
//!
//! The harness talks to the server only as an operator would: command-line arguments, the
//! `ready` line on stdout, TCP ports and signals. Logs go to files in the data directory, and
//! their tails are printed when startup fails or when a test panics with the server running,
//! because a failed end-to-end test is hard to read without the server's side of the story.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use crate::client::{Client, ConnectOptions, Transport};
use crate::sasl::Mechanism;

/// Why the harness could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Spawning, file or socket I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server did not print `ready` (or stopped) in time; carries the log tails.
    #[error("server did not become ready: {reason}\n{logs}")]
    NotReady {
        /// Timeout, exit status or unreachable port.
        reason: String,
        /// Tails of stdout and stderr.
        logs: String,
    },
    /// A CLI command exited unsuccessfully.
    #[error("`{command}` failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stdout.
        stdout: String,
        /// Its stderr.
        stderr: String,
    },
    /// Signalling the server failed.
    #[error("signal {signal} to pid {pid}: {source}")]
    Signal {
        /// The signal.
        signal: String,
        /// The target.
        pid: u32,
        /// The errno.
        source: nix::Error,
    },
    /// The XMPP client failed against the server.
    #[error(transparent)]
    Client(#[from] crate::client::Error),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// Options for [`TestServer::start`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Appended after the standard `serve` arguments.
    pub extra_args: Vec<String>,
    /// Extra environment variables for the server process (the test's own are inherited).
    pub env: Vec<(String, String)>,
    /// The XMPP domain (`--domain`).
    pub domain: String,
    /// How long to wait for the `ready` line and the c2s port.
    pub ready_timeout: Duration,
    /// How long `stop()` waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Use this directory instead of a fresh temporary one (it is not deleted afterwards).
    pub data_dir: Option<PathBuf>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            extra_args: Vec::new(),
            env: Vec::new(),
            domain: "localhost".to_string(),
            ready_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            data_dir: None,
        }
    }
}

/// The three listening ports given to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// `--c2s-port` (STARTTLS).
    pub c2s: u16,
    /// `--c2s-tls-port` (XEP-0368 direct TLS).
    pub c2s_tls: u16,
    /// `--http-port` (WebSocket at `/xmpp-websocket`, over TLS by default).
    pub http: u16,
    /// `--metrics-addr` on loopback (`/metrics`, plain HTTP).
    pub metrics: u16,
}

/// A running `pchat serve`. Dropping it kills the process (SIGKILL) and removes the temporary
/// data directory, unless `PCHAT_TEST_KEEP_DATA=1` is set.
pub struct TestServer {
    bin: PathBuf,
    opts: ServerOptions,
    // Kept for its Drop, which deletes the directory; `None` when the caller supplied one.
    temp_dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    ports: Ports,
    child: Option<Child>,
}

const STDOUT_LOG: &str = "pchat-test-stdout.log";
const STDERR_LOG: &str = "pchat-test-stderr.log";
/// How much of each log to show on failure: enough for a backtrace, short enough to read.
const LOG_TAIL_BYTES: usize = 8 * 1024;

impl TestServer {
    /// The `pchat` binary to test: `$PCHAT_BIN`, else `target/{debug,release}/pchat` under
    /// `$CARGO_TARGET_DIR` or the workspace. Fails with the command that builds it.
    pub fn locate_binary() -> Result<PathBuf, HarnessError> {
        if let Some(bin) = std::env::var_os("PCHAT_BIN") {
            return Ok(PathBuf::from(bin));
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        for profile in ["debug", "release"] {
            let candidate = target.join(profile).join("pchat");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        Err(HarnessError::Io {
            context: format!(
                "no pchat binary under {}; build it with `cargo build -p pchat` or set PCHAT_BIN",
                target.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }

    /// Starts `bin serve` on fresh loopback ports in a fresh data directory and waits until it
    /// prints a line starting with `ready` and accepts on the c2s port.
    pub async fn start(bin: &Path, opts: ServerOptions) -> Result<TestServer, HarnessError> {
        let (temp_dir, data_dir) = match &opts.data_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("pchat-test-")
                    .tempdir()
                    .map_err(io_error("creating the temporary data directory"))?;
                let path = dir.path().to_path_buf();
                (Some(dir), path)
            }
        };
        let ports = free_ports()?;
        let mut server = TestServer {
            bin: bin.to_path_buf(),
            opts,
            temp_dir,
            data_dir,
            ports,
            child: None,
        };
        // A port picked free can be taken by another process before the server binds it
        // (other tests, PostgreSQL instances of a lab): then fresh ports, a few times.
        let mut attempts = 0;
        loop {
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e)
                    if attempts < 3
                        && read_from(&server.data_dir.join(STDERR_LOG), 0)
                            .contains("Address already in use") =>
                {
                    attempts += 1;
                    let _ = std::fs::remove_file(server.data_dir.join(STDERR_LOG));
                    server.ports = free_ports()?;
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let stdout_path = self.data_dir.join(STDOUT_LOG);
        // Logs are appended across restarts; only output after this offset counts as ready.
        let stdout_start = std::fs::metadata(&stdout_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let stdout = append(&stdout_path)?;
        let stderr = append(&self.data_dir.join(STDERR_LOG))?;
        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--domain", &self.opts.domain, "--bind-addr", "127.0.0.1"])
            .args(["--c2s-port", &self.ports.c2s.to_string()])
            .args(["--c2s-tls-port", &self.ports.c2s_tls.to_string()])
            .args(["--http-port", &self.ports.http.to_string()])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.ports.metrics),
            ])
            .args(&self.opts.extra_args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = command
            .spawn()
            .map_err(io_error(format!("spawning {}", self.bin.display())))?;
        self.child = Some(child);

        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(self.not_ready(format!("the server exited with {status}")));
            }
            let printed = read_from(&stdout_path, stdout_start);
            if printed.lines().any(|l| l.starts_with("ready")) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "no line starting with `ready` on stdout within {:?}",
                    self.opts.ready_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // "ready" should already mean listening; checking the port catches a server that
        // prints it too early, which would make tests flaky rather than fail clearly.
        loop {
            if tokio::net::TcpStream::connect(self.c2s_addr())
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "printed ready but {} does not accept connections",
                    self.c2s_addr()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn not_ready(&mut self, reason: String) -> HarnessError {
        self.kill_now();
        HarnessError::NotReady {
            reason,
            logs: self.log_tails(),
        }
    }

    fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        match &mut self.child {
            Some(child) => child.try_wait().map_err(io_error("waiting for the server")),
            None => Ok(None),
        }
    }

    /// The tails of the server's stdout and stderr logs.
    pub fn log_tails(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read(self.data_dir.join(name)).unwrap_or_default();
            let start = text.len().saturating_sub(LOG_TAIL_BYTES);
            String::from_utf8_lossy(&text[start..]).into_owned()
        };
        format!(
            "--- {STDOUT_LOG} (tail) ---\n{}\n--- {STDERR_LOG} (tail) ---\n{}",
            tail(STDOUT_LOG),
            tail(STDERR_LOG)
        )
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: Signal) -> Result<(), HarnessError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let raw = i32::try_from(pid).map_err(|_| HarnessError::Io {
            context: format!("pid {pid} out of range"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        kill(Pid::from_raw(raw), signal).map_err(|source| HarnessError::Signal {
            signal: signal.to_string(),
            pid,
            source,
        })
    }

    /// SIGTERM, then up to `stop_timeout` for a graceful exit, then SIGKILL. Returns the exit
    /// status so tests can check that a graceful shutdown exited 0.
    pub async fn stop(&mut self) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        if self.child.is_none() {
            return Ok(None);
        }
        self.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + self.opts.stop_timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "pchat-testkit: server ignored SIGTERM for {:?}; sending SIGKILL",
            self.opts.stop_timeout
        );
        Ok(self.kill_now())
    }

    /// SIGKILL without warning (crash simulation); waits for the process to be gone.
    pub fn kill9(&mut self) -> Option<std::process::ExitStatus> {
        self.kill_now()
    }

    fn kill_now(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGSTOP: the process freezes with its sockets open (a hung server).
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`TestServer::pause`].
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal(Signal::SIGCONT)
    }

    /// Stops the server if it runs, then starts it again on the same data dir and ports.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop().await?;
        self.spawn_and_wait().await
    }

    /// Starts the server again after [`TestServer::stop`] or [`TestServer::kill9`].
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        // Its ports were free while it was down: one may be briefly in use by some other
        // socket. Tried again for up to 20 s (the tests reconnect clients to these ports,
        // so fresh ones would not do).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.data_dir.join(STDERR_LOG);
            let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            match self.spawn_and_wait().await {
                Err(_)
                    if Instant::now() < deadline
                        && read_from(&log, from).contains("Address already in use") =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                r => return r,
            }
        }
    }

    /// Runs `BIN --data-dir DIR ARGS…` to completion and returns its output, successful or not.
    pub async fn run_cli<I, S>(&self, args: I) -> Result<Output, HarnessError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        tokio::process::Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_error(format!("running {} {args:?}", self.bin.display())))
    }

    /// Like [`TestServer::run_cli`], but a non-zero exit is [`HarnessError::Command`].
    pub async fn run_cli_ok<I, S>(&self, args: I) -> Result<Output, HarnessError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let output = self.run_cli(args.clone()).await?;
        if !output.status.success() {
            return Err(HarnessError::Command {
                command: format!(
                    "{} --data-dir {} {args:?}",
                    self.bin.display(),
                    self.data_dir.display()
                ),
                status: output.status.to_string(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(output)
    }

    /// `BIN --data-dir DIR user add JID --password PW`, which must succeed.
    pub async fn add_user(&self, jid: &str, password: &str) -> Result<(), HarnessError> {
        self.run_cli_ok(["user", "add", jid, "--password", password])
            .await
            .map(|_| ())
    }

    /// The STARTTLS c2s address.
    pub fn c2s_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.c2s))
    }

    /// The direct-TLS c2s address.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.c2s_tls))
    }

    /// The WebSocket endpoint: `wss://`, pchat's default (`http_tls = true`). A server
    /// configured with `http_tls = false` serves the same path as `ws://`.
    pub fn ws_url(&self) -> String {
        format!("wss://127.0.0.1:{}/xmpp-websocket", self.ports.http)
    }

    /// All three ports.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The XMPP domain.
    pub fn domain(&self) -> &str {
        &self.opts.domain
    }

    /// The data directory (also holds the stdout/stderr logs).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Connect options for `jid` over STARTTLS with SCRAM-SHA-256, to adjust before connecting.
    pub fn connect_options(&self, jid: &str, password: &str) -> ConnectOptions {
        ConnectOptions::new(
            Transport::StartTls {
                addr: self.c2s_addr(),
            },
            jid,
            password,
        )
    }

    /// A bound client: STARTTLS, SCRAM-SHA-256, server-generated resource.
    pub async fn client(&self, jid: &str, password: &str) -> Result<Client, HarnessError> {
        Ok(Client::connect(self.connect_options(jid, password)).await?)
    }

    /// A bound client over the given transport and mechanism.
    pub async fn client_with(
        &self,
        transport: Transport,
        mechanism: Mechanism,
        jid: &str,
        password: &str,
    ) -> Result<Client, HarnessError> {
        let opts = ConnectOptions {
            mechanism,
            ..ConnectOptions::new(transport, jid, password)
        };
        Ok(Client::connect(opts).await?)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.kill_now();
        if std::thread::panicking() {
            eprintln!(
                "pchat-testkit: test panicked; server data dir {}\n{}",
                self.data_dir.display(),
                self.log_tails()
            );
        }
        let keep = std::env::var("PCHAT_TEST_KEEP_DATA").is_ok_and(|v| v == "1");
        if keep || (std::thread::panicking() && was_running) {
            if let Some(dir) = self.temp_dir.take() {
                // Keeping the directory lets someone read the full logs and database later.
                let path = dir.keep();
                eprintln!("pchat-testkit: kept {}", path.display());
            }
        }
    }
}

/// Picks four distinct free loopback ports by binding them all at once, then releasing them.
/// They come from below the kernel's ephemeral range when there is room there: a port the
/// kernel hands out (`bind` to port 0, every outgoing connection) can be in use as the local
/// port of some other test's connection just when a stopped server starts again on its old
/// ports — seen in CI as `Address already in use` on a restart. Another test picking the
/// same port in between stays possible (it shows up as a clear bind error in the server log,
/// and [`TestServer::start`] tries fresh ports).
fn free_ports() -> Result<Ports, HarnessError> {
    let bind = || crate::ports::loopback_listener().map_err(io_error("binding a free port"));
    let listeners = [bind()?, bind()?, bind()?, bind()?];
    let port = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(io_error("reading a bound port"))
    };
    Ok(Ports {
        c2s: port(&listeners[0])?,
        c2s_tls: port(&listeners[1])?,
        http: port(&listeners[2])?,
        metrics: port(&listeners[3])?,
    })
}

fn append(path: &Path) -> Result<File, HarnessError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(format!("opening {}", path.display())))
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
