//! `pchat`: `pchat serve` runs a server; every other subcommand is the management shell
//! (Lync's Management Shell cmdlets as commands). Exit codes: 0 success, 1 the operation
//! failed, 2 the command line was wrong.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};

mod compliance_cli;
mod control_cli;
mod dr_cli;
mod ha;
mod pki_cli;
mod probe;
mod progress;
mod rooms_cli;
use clap::{Parser, Subcommand};
use pchat_server::server::{load_config, open_store, prepare_data_dir, Overrides};
use pchat_store::{ArchiveQuery, Store};

#[derive(Parser)]
#[command(
    name = "pchat",
    version,
    about = "Persistent group chat over XMPP, with permanent searchable room history"
)]
struct Cli {
    /// Data directory: pchat.toml, mgc.db, mgccomp.db, tls/.
    #[arg(
        long,
        global = true,
        default_value = "pchat-data",
        env = "PCHAT_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Log lines as `text` (colours only on a terminal) or `json` (one object per line, for
    /// a log collector).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "PCHAT_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// etcd endpoints of the control plane, comma-separated.
    #[arg(
        long,
        global = true,
        env = "PCHAT_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// This process's identity in its pool (`pchat pki issue`: the shell's is
    /// PKI/operators/NAME, a server's PKI/servers/NAME): TLS and the etcd user on the pool's
    /// connections (etcd, PostgreSQL). Without one, only a pool whose topology says
    /// `insecure = true`.
    #[arg(long, global = true, env = "PCHAT_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// An insecure pool only (`insecure = true`): the file holding its agents' shared token
    /// (mode 0600; `pchat agent token FILE` writes one). Without it, `PCHAT_AGENT_TOKEN`.
    /// Never a token on the command line, where every user's `ps` shows it.
    #[arg(
        long,
        global = true,
        env = "PCHAT_AGENT_TOKEN_FILE",
        value_name = "FILE"
    )]
    agent_token_file: Option<PathBuf>,
    /// Act on this pool's authoritative PostgreSQL databases instead of the data directory
    /// (user, room, compliance and db commands).
    #[arg(long, global = true, value_name = "POOL")]
    in_pool: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (standalone: SQLite in the data directory).
    ///
    /// Example: pchat serve --domain chat.example.org
    Serve {
        /// XMPP domain (overrides `domain` in pchat.toml).
        #[arg(long)]
        domain: Option<String>,
        /// Address to listen on (overrides `bind_addr`).
        #[arg(long)]
        bind_addr: Option<String>,
        /// STARTTLS client port (overrides `c2s_port`).
        #[arg(long)]
        c2s_port: Option<u16>,
        /// Direct-TLS client port (overrides `c2s_tls_port`).
        #[arg(long)]
        c2s_tls_port: Option<u16>,
        /// HTTP/WebSocket port (overrides `http_port`).
        #[arg(long)]
        http_port: Option<u16>,
        /// Address of /metrics, e.g. 127.0.0.1:9281, or "" for none (overrides
        /// `metrics_addr`).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// The configuration file, instead of pchat.toml in the data directory (the
        /// package's unit uses /etc/pchat/pchat.toml).
        #[arg(long, value_name = "FILE", env = "PCHAT_CONFIG")]
        config: Option<PathBuf>,
        /// Pool mode: etcd endpoints (comma-separated) holding the published topology.
        #[arg(long, value_delimiter = ',', requires_all = ["pool", "server"])]
        topology_from_etcd: Vec<String>,
        /// Pool mode: the pool's name.
        #[arg(long, requires = "topology_from_etcd")]
        pool: Option<String>,
        /// Pool mode: this server's name in the topology.
        #[arg(long, requires = "topology_from_etcd")]
        server: Option<String>,
        /// Pool mode: how often the pool state is read, in milliseconds.
        #[arg(long, default_value_t = 250)]
        pool_poll_ms: u64,
        /// Pool mode: how long sessions get to move to another server when this one goes idle.
        #[arg(long, default_value_t = 30_000)]
        drain_timeout_ms: u64,
    },
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Rooms: create, change, disable, remove, inspect, read their history.
    #[command(subcommand)]
    Room(RoomCommand),
    /// Local groups of users, domains and other groups (principals for walls and rooms).
    #[command(subcommand)]
    Group(rooms_cli::GroupCommand),
    /// Categories of rooms and their walls (who may be in their rooms, who may create them).
    #[command(subcommand)]
    Category(rooms_cli::CategoryCommand),
    /// Content control: remove or replace archived messages.
    #[command(subcommand)]
    Message(rooms_cli::MessageCommand),
    /// Who may use persistent chat at all (globally, per user, group or domain).
    #[command(subcommand)]
    Policy(rooms_cli::PolicyCommand),
    /// Add-ins: pages clients may show beside a room.
    #[command(subcommand)]
    Addin(rooms_cli::AddinCommand),
    /// The service's settings: DefaultChatHistory, ParticipantUpdateLimit, MaxFileSizeKB,
    /// RoomManagementUrl (Lync's Get/Set-CsPersistentChatConfiguration).
    #[command(subcommand)]
    Config(rooms_cli::ConfigCommand),
    /// Synthetic transactions for monitoring (Test-CsPersistentChatMessage).
    #[command(subcommand)]
    Test(TestCommand),
    /// Validate and publish a pool topology (Topology Builder).
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// The pool's certificate authority and the certificates of its endpoints.
    #[command(subcommand)]
    Pki(pki_cli::PkiCommand),
    /// The control plane's own security: etcd's users and roles.
    #[command(subcommand)]
    Control(control_cli::ControlCommand),
    /// Pool state and active servers (Set-CsPersistentChatActiveServer, Set-CsPersistentChatState).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Move rooms, users and history between deployments (Export/Import-CsPersistentChatData).
    #[command(subcommand)]
    Data(DataCommand),
    /// Databases: install, mirroring, full backup and restore.
    #[command(subcommand)]
    Db(DbCommand),
    /// The agent beside each PostgreSQL instance (Lync's SQL Server Agent).
    #[command(subcommand)]
    Agent(ha::AgentCommand),
    /// Read the compliance record (mgccomp).
    #[command(subcommand)]
    Compliance(ComplianceCommand),
    /// Files shared in rooms (XEP-0363 uploads): list them, remove one.
    #[command(subcommand)]
    File(FileCommand),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: pchat completions bash > /etc/bash_completion.d/pchat
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (pchat.1 and one per command, pchat-serve.1 …) into DIR.
    ///
    /// Example: pchat manpages --out /usr/share/man/man1
    Manpages {
        /// The directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum FileCommand {
    /// List shared files, oldest first: id, size, owner, room (none until posted), whether
    /// the upload finished, name.
    ///
    /// Example: pchat file list --room ops@conference.example.com --json
    List {
        /// Only this user's files.
        #[arg(long, value_name = "JID")]
        owner: Option<String>,
        /// Only the files posted in this room.
        #[arg(long, value_name = "ROOM_JID")]
        room: Option<String>,
        /// How many at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Remove a file: its bytes and record go, its links answer 404 from then on, and the
    /// removal is on the compliance record (FILEDELETION).
    ///
    /// Example: pchat file remove 3f2a9c0d41b7e8f6a5d4c3b2a1908f7e
    Remove {
        /// The file's id (the 32 hex characters after /files/ in its link).
        id: String,
    },
}

#[derive(Subcommand)]
enum TestCommand {
    /// Two users log in (direct TLS), join a test room, exchange a message, find it in the
    /// archive and by full-text search, and leave; prints each step's time and exits
    /// non-zero, naming the step, when one fails. Usable as a monitoring probe.
    ///
    /// Example: pchat test message --user1 probe1@example.com --password1-file p1 --user2 probe2@example.com --password2-file p2
    Message {
        /// The server's direct-TLS client port, `host:port` (default: this data directory's
        /// server: 127.0.0.1 and its `c2s_tls_port`).
        #[arg(long)]
        server: Option<String>,
        /// The first test user (bare JID).
        #[arg(long)]
        user1: String,
        /// A file whose first line is user1's password.
        #[arg(long, value_name = "FILE")]
        password1_file: PathBuf,
        /// The second test user (bare JID).
        #[arg(long)]
        user2: String,
        /// A file whose first line is user2's password.
        #[arg(long, value_name = "FILE")]
        password2_file: PathBuf,
        /// The test room (default: pchat-probe@conference.DOMAIN of user1).
        #[arg(long)]
        room: Option<String>,
        /// Trust certificates issued by this CA (PEM) for the users' domain. Without it, the
        /// data directory's own certificate (`tls/cert.pem`) is pinned.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Longest one step may take, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        step_timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Check a topology file; every problem is reported with its line.
    ///
    /// Example: pchat topology validate topology.toml --pki /etc/pchat/pki
    Validate {
        /// The topology file.
        file: PathBuf,
        /// Also check that every endpoint has a good certificate in this PKI directory
        /// (`pchat pki issue`): from the pool's CA, with its names, valid for 30 more days.
        #[arg(long, value_name = "DIR")]
        pki: Option<PathBuf>,
    },
    /// Validate, then publish to the etcd endpoints the file names.
    ///
    /// Example: pchat topology publish topology.toml
    Publish {
        /// The topology file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Show a pool's state, active servers and epoch.
    ///
    /// Example: pchat pool get pc1 --etcd http://10.0.0.5:2379
    Get {
        /// Pool name.
        pool: String,
    },
    /// Set which servers may serve.
    ///
    /// Example: pchat pool set-active-servers pc1 a1 a2    (or --add a3, --remove a1, --none)
    SetActiveServers {
        /// Pool name.
        pool: String,
        /// The new active list.
        #[arg(conflicts_with_all = ["add", "remove", "none"])]
        servers: Vec<String>,
        /// Add one server to the list.
        #[arg(long, conflicts_with_all = ["remove", "none"])]
        add: Option<String>,
        /// Remove one server from the list.
        #[arg(long, conflicts_with = "none")]
        remove: Option<String>,
        /// Clear the list: no server serves (failback step 1).
        #[arg(long)]
        none: bool,
        /// Allow servers outside the site whose databases are authoritative.
        #[arg(long)]
        allow_remote_site: bool,
    },
    /// Make the idle servers active and the active ones idle.
    ///
    /// Example: pchat pool swap pc1
    Swap {
        /// Pool name.
        pool: String,
        /// Allow servers outside the authoritative site.
        #[arg(long)]
        allow_remote_site: bool,
    },
    /// DR failover (Lync's procedure): the backup site takes over after the primary site is
    /// lost. Copies and applies every shipped segment, fences the primary, promotes the
    /// backup, attaches its mirror, state FailedOver, active servers in the backup site.
    /// Reports the data-loss window. Safe to re-run.
    ///
    /// Example: pchat pool failover pc1    (--dry-run prints the plan)
    Failover {
        /// Pool name.
        pool: String,
        /// Print the steps only.
        #[arg(long)]
        dry_run: bool,
        /// Active servers to set (default: the backup site's servers).
        #[arg(long, value_delimiter = ',')]
        servers: Option<Vec<String>>,
        /// Do not attach the backup site's mirror.
        #[arg(long)]
        no_mirror: bool,
    },
    /// Failback (the seed's procedure): clear active servers, remove the backup's mirroring,
    /// full backup of the backup, restore it over the rebuilt primary, fence and stop the
    /// backup, servers in the primary site + state Normal, then log shipping primary →
    /// backup (before service resumes with --reseed-first) and the primary's mirror.
    /// Every step's precondition is checked before the first step (a run bound to fail
    /// stops nothing); each step checks its postcondition; an interrupted run resumes where
    /// it stopped. What the old primary held that was never shipped is discarded (see
    /// --salvage).
    ///
    /// Example: pchat pool failback pc1    (--dry-run prints the plan, what is done and what would fail)
    Failback {
        /// Pool name.
        pool: String,
        /// Print the steps (which are done, which would fail and why) only; exits non-zero
        /// when a precondition fails.
        #[arg(long)]
        dry_run: bool,
        /// The full backup's name in the share (default failback-<unix time>).
        #[arg(long)]
        backup_name: Option<String>,
        /// Active servers to set (default: the primary site's servers).
        #[arg(long, value_delimiter = ',')]
        servers: Option<Vec<String>>,
        /// How long the drain step waits for servers to let go of the database.
        #[arg(long, default_value_t = 120)]
        drain_wait_s: u64,
        /// Log shipping primary → backup: segment switch interval (default: as before the
        /// failover, else 60).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        backup_interval_s: Option<u64>,
        /// Before the old primary's database is replaced, save the messages it has that the
        /// backup lacks (its unshipped tail) to FILE as JSON lines. They are never merged.
        #[arg(long, value_name = "FILE")]
        salvage: Option<PathBuf>,
        /// Seed the primary as a standby of the backup while the pool keeps serving, then
        /// switch over with only seconds of no service.
        #[arg(long)]
        online: bool,
        /// Offline: re-seed log shipping to the backup site before service resumes (the
        /// seed's order: nothing is acknowledged that the backup site does not protect,
        /// at the cost of the re-seed's time without service). By default service resumes
        /// first and log shipping is re-seeded after, while the pool serves.
        #[arg(long, conflicts_with = "online")]
        reseed_first: bool,
    },
    /// Set the pool state: which site's databases are authoritative.
    ///
    /// Example: pchat pool set-state pc1 failed-over
    SetState {
        /// Pool name.
        pool: String,
        /// `normal` or `failed-over`.
        state: String,
        /// Keep active servers that are outside the new authoritative site.
        #[arg(long)]
        allow_remote_site: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write users, rooms and all history to a portable archive (JSON lines with a checksum).
    ///
    /// Example: pchat data export backup.pchat    (or: pchat --in-pool pc1 data export pool.pchat)
    Export {
        /// The archive to write.
        file: PathBuf,
    },
    /// Check an archive, then import it. Re-running resumes where an interrupted run stopped.
    ///
    /// Example: pchat --in-pool pc1 data import backup.pchat
    Import {
        /// The archive to read.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create the mgc and mgccomp databases and their schema, or bring it up to date. Safe to
    /// re-run. In a pool the site's principal's agent does it, as the superuser over the unix
    /// socket (initialising and starting the instance first if needed: Topology Builder's
    /// rebuild of a site), and creates the servers' role `pchat_server` with a password made
    /// now and kept in etcd.
    ///
    /// Example: pchat --in-pool pc1 db install --site A      (standalone: pchat db install)
    Install {
        /// Pool mode: the site whose databases to install (default: the authoritative one).
        #[arg(long)]
        site: Option<String>,
    },
    #[command(flatten)]
    Ha(ha::DbHaCommand),
}

#[derive(Subcommand)]
enum ComplianceCommand {
    /// Export the compliance records not exported yet to files (Lync's compliance adapter),
    /// exactly once: every RUN_INTERVAL seconds, or one run with --once. Exported records
    /// older than --retention-h are purged. One exporter runs at a time (a lock in the data
    /// directory, or in a pool an etcd lease): a second one waits.
    ///
    /// Example: pchat compliance export --to /srv/compliance --format lync-xml --once
    Export {
        /// The directory files go to (must exist and be writable).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// `lync-xml` (Lync's XmlAdapter shape, docs/operations/compliance.xsd) or `jsonl`.
        #[arg(long, default_value = "lync-xml", value_parser = ["lync-xml", "jsonl"])]
        format: String,
        /// One run, then exit (exit status 0 also when there was nothing new).
        #[arg(long)]
        once: bool,
        /// One file per room and run (Lync's OneChatRoomPerOutputFile).
        #[arg(long)]
        per_room: bool,
        /// Seconds between runs without --once (Lync's RunInterval).
        #[arg(long, default_value_t = 900, value_name = "RUN_INTERVAL")]
        interval_s: u64,
        /// Hours exported records stay before they are purged; without it nothing is purged.
        #[arg(long)]
        retention_h: Option<u64>,
        /// Records one run exports at most.
        #[arg(long, default_value_t = pchat_server::compliance::RECORDS_PER_RUN_DEFAULT)]
        records_max: u32,
    },
    /// Where the export stands: the watermark, an interrupted run, runs done.
    ///
    /// Example: pchat compliance status --json
    Status,
    /// A pool's export job settings (Lync's Set-CsPersistentChatComplianceConfiguration):
    /// kept in etcd, followed by every server of the pool within seconds, in place of each
    /// server's `[compliance]` section. Without options it shows them. Standalone, the job is
    /// set in pchat.toml's `[compliance]`.
    ///
    /// Example: pchat --in-pool pc1 compliance configure --export-dir /srv/compliance --run-interval-s 900
    Configure(compliance_cli::ConfigureArgs),
    /// List compliance events after an id, oldest first.
    ///
    /// Example: pchat compliance list --after 0 --limit 100 --json
    List {
        /// Only events with a larger id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// How many events at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create (or replace) an account.
    ///
    /// Example: pchat user add alice@localhost --password-stdin < secret.txt
    Add {
        /// Bare JID, user@domain.
        jid: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Change an account's password.
    ///
    /// Example: pchat user passwd alice@localhost --password 'n3w secret'
    Passwd {
        /// Bare JID.
        jid: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Remove an account.
    ///
    /// Example: pchat user remove alice@localhost
    Remove {
        /// Bare JID.
        jid: String,
    },
    /// List accounts.
    ///
    /// Example: pchat user list --json
    List,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct PasswordArgs {
    /// The password (visible in the process list: prefer --password-stdin).
    #[arg(long)]
    password: Option<String>,
    /// Read the password from standard input (first line).
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Subcommand)]
enum RoomCommand {
    /// List rooms with their kind and message count.
    ///
    /// Example: pchat room list --json
    List,
    /// Show one room: category, privacy, type, managers, members, presenters, subject.
    ///
    /// Example: pchat room get ops@conference.localhost
    #[command(alias = "show")]
    Get {
        /// Room JID (or just its name).
        room: String,
    },
    /// Create a room (Closed by default, as in Lync) in a category.
    ///
    /// Example: pchat room new ops --category trading --manager alice@example.com --member group:traders
    New(rooms_cli::RoomNew),
    /// Change a room: name, description, privacy, type, category, managers, members, presenters.
    ///
    /// Example: pchat room set ops --privacy secret --add-member bob@example.com
    Set(rooms_cli::RoomSet),
    /// Disable a room: its occupants leave, nobody may find or join it; history and settings stay.
    ///
    /// Example: pchat room disable ops
    Disable {
        /// Room JID (or just its name).
        room: String,
    },
    /// Enable a disabled room again.
    ///
    /// Example: pchat room enable ops
    Enable {
        /// Room JID (or just its name).
        room: String,
    },
    /// Delete a room's history up to a date (compliance keeps it).
    ///
    /// Example: pchat room clear ops --before 2026-01-01 --yes
    Clear {
        /// Room JID (or just its name).
        room: String,
        /// Messages before this date go: 2026-01-01 (midnight UTC) or 2026-01-01T09:30:00Z.
        #[arg(long)]
        before: String,
        /// Yes, delete them.
        #[arg(long)]
        yes: bool,
    },
    /// Remove a room and its history for good (compliance keeps its record).
    ///
    /// Example: pchat room remove ops --yes
    Remove {
        /// Room JID (or just its name).
        room: String,
        /// Yes, delete its history.
        #[arg(long)]
        yes: bool,
    },
    /// Print a room's newest messages, oldest first.
    ///
    /// Example: pchat room history ops@conference.localhost --limit 50
    History {
        /// Room JID (or just its name).
        room: String,
        /// How many messages.
        #[arg(long, default_value_t = 30)]
        limit: u32,
    },
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// For people: colours on a terminal, none otherwise.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // A server logs what it does; a management command only what went wrong.
    let default_level = match &cli.command {
        Command::Serve { .. } | Command::Agent(ha::AgentCommand::Run { .. }) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PCHAT_LOG")
        .unwrap_or_else(|_| default_level.into());
    match cli.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Text => {
            use std::io::IsTerminal as _;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pchat: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pchat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `cmd`'s manual page, and its subcommands' (`pchat-db-mirror-add.1` …), into `dir`.
fn write_manpages(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<usize> {
    let cmd = cmd.clone().name(name.to_owned());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written += write_manpages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(written)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "pchat", &mut script);
            // A reader that stops early (`| head`) is not an error.
            use std::io::Write as _;
            return match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            };
        }
        Command::Config(rooms_cli::ConfigCommand::Example) => {
            print!("{}", pchat_server::config::default_file());
            return Ok(());
        }
        Command::Manpages { out } => {
            std::fs::create_dir_all(out)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            let n = write_manpages(&cmd, "pchat", out)?;
            println!("{n} manual pages in {}", out.display());
            return Ok(());
        }
        _ => {}
    }
    let etcd = pchat_control::EtcdAccess {
        endpoints: cli.etcd.clone(),
        tls_dir: cli.tls_dir.clone(),
        hint: SHELL_IDENTITY,
    };
    let target = Target {
        data_dir: cli.data_dir.clone(),
        in_pool: cli.in_pool.clone(),
        etcd: etcd.clone(),
    };
    let shell = ha::Shell {
        etcd: etcd.clone(),
        in_pool: cli.in_pool.clone(),
        tls_dir: cli.tls_dir.clone(),
        agent_token_file: cli.agent_token_file.clone(),
    };
    match cli.command {
        // Answered above, before anything is opened.
        Command::Completions { .. } | Command::Manpages { .. } => Ok(()),
        Command::Serve {
            domain,
            bind_addr,
            c2s_port,
            c2s_tls_port,
            http_port,
            metrics_addr,
            config,
            topology_from_etcd,
            pool,
            server,
            pool_poll_ms,
            drain_timeout_ms,
        } => {
            let o = Overrides {
                domain,
                bind_addr,
                c2s_port,
                c2s_tls_port,
                http_port,
                metrics_addr,
                config,
            };
            let mode = match (pool, server) {
                (Some(pool), Some(server)) => {
                    pchat_server::Mode::Pool(pchat_server::pool_mode::PoolMember {
                        etcd: pchat_control::EtcdAccess {
                            endpoints: topology_from_etcd,
                            tls_dir: cli.tls_dir.clone(),
                            hint: SERVER_IDENTITY,
                        },
                        pool,
                        server,
                        poll: std::time::Duration::from_millis(pool_poll_ms.max(10)),
                        drain_timeout: std::time::Duration::from_millis(drain_timeout_ms),
                    })
                }
                _ => pchat_server::Mode::Standalone,
            };
            pchat_server::serve(&cli.data_dir, &o, mode).await?;
            Ok(())
        }
        Command::User(cmd) => user(&target, cli.json, cmd).await,
        Command::Room(cmd) => room(&target, cli.json, cmd).await,
        Command::Group(cmd) => rooms_cli::group(&target, cli.json, cmd).await,
        Command::Category(cmd) => rooms_cli::category(&target, cli.json, cmd).await,
        Command::Message(cmd) => rooms_cli::message(&target, cli.json, cmd).await,
        Command::Policy(cmd) => rooms_cli::policy(&target, cli.json, cmd).await,
        Command::Addin(cmd) => rooms_cli::addin(&target, cli.json, cmd).await,
        Command::Config(cmd) => rooms_cli::config(&target, cli.json, cmd).await,
        Command::Test(TestCommand::Message {
            server,
            user1,
            password1_file,
            user2,
            password2_file,
            room,
            ca,
            step_timeout_ms,
        }) => {
            let dir = &cli.data_dir;
            let server = match server {
                Some(s) => s,
                None => {
                    let config = load_config(dir, &Overrides::default())?;
                    format!("127.0.0.1:{}", config.c2s_tls_port)
                }
            };
            let domain = user1.split_once('@').map(|(_, d)| d).unwrap_or("localhost");
            let p = probe::Probe {
                server,
                room: room.unwrap_or_else(|| format!("pchat-probe@conference.{domain}")),
                users: [(user1.clone(), password1_file), (user2, password2_file)],
                trust: match ca {
                    Some(f) => probe::Trust::Ca(f),
                    None => probe::Trust::Pinned(dir.join("tls").join("cert.pem")),
                },
                step_timeout: std::time::Duration::from_millis(step_timeout_ms),
            };
            let t0 = std::time::Instant::now();
            let json = cli.json;
            let steps = probe::run(&p, |s| {
                if !json {
                    println!("  {:<20} {:>9.1} ms", s.name, s.ms);
                }
            })
            .await?;
            let total = t0.elapsed().as_secs_f64() * 1000.0;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "room": p.room, "steps": steps, "total_ms": total})
                );
            } else {
                println!("ok: {} steps in {total:.1} ms ({})", steps.len(), p.room);
            }
            Ok(())
        }
        Command::Db(DbCommand::Ha(cmd)) => ha::run_db(cmd, &cli.data_dir, &shell, cli.json).await,
        Command::Db(DbCommand::Install { site }) => db_install(&target, &shell, site).await,
        Command::Agent(cmd) => ha::run_agent(cmd, cli.json, &shell).await,
        Command::Data(cmd) => data(&target, cli.json, cmd).await,
        Command::Topology(cmd) => topology_cmd(cmd, cli.tls_dir.as_deref()).await,
        Command::Pki(cmd) => pki_cli::run(cmd, cli.json, read_topology),
        Command::Control(cmd) => {
            control_cli::run(cmd, cli.json, cli.tls_dir.as_deref(), read_topology).await
        }
        Command::Pool(cmd) => pool_cmd(cli.json, &shell, cmd).await,
        Command::Compliance(ComplianceCommand::Export {
            to,
            format,
            once,
            per_room,
            interval_s,
            retention_h,
            records_max,
        }) => {
            compliance_cli::export(
                &target,
                cli.json,
                compliance_cli::ExportArgs {
                    to,
                    format,
                    once,
                    per_room,
                    interval_s,
                    retention_h,
                    records_max,
                },
            )
            .await
        }
        Command::File(FileCommand::List { owner, room, limit }) => {
            let (_, store) = open(&target).await?;
            let files = store
                .file_list(&pchat_store::FileFilter {
                    owner: owner.map(|o| o.to_lowercase()),
                    room: room.map(|r| r.to_lowercase()),
                    limit,
                })
                .await?;
            if cli.json {
                let rows: Vec<_> = files
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                            "id": f.id,
                            "owner": f.owner,
                            "room": f.room,
                            "name": f.name,
                            "content_type": f.content_type,
                            "size": f.size,
                            "created_at": pchat_server::datetime::format(f.created_at),
                            "finished": f.sha256.is_some(),
                            "sha256": f.sha256,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&rows)?);
            } else if files.is_empty() {
                println!("no files");
            } else {
                for f in &files {
                    println!(
                        "{} {:>12} {:<28} {:<36} {:<10} {}",
                        f.id,
                        f.size,
                        f.owner,
                        f.room.as_deref().unwrap_or("-"),
                        if f.sha256.is_some() {
                            "stored"
                        } else {
                            "uploading"
                        },
                        f.name
                    );
                }
            }
            Ok(())
        }
        Command::File(FileCommand::Remove { id }) => {
            // Beside a running standalone server, its compliance record goes through it.
            let admin = rooms_cli::Admin::open(&target).await?;
            let Some(file) = admin.store.file_get(&id).await? else {
                anyhow::bail!("no file has the id {id}: see `pchat file list`");
            };
            // On the record before it goes (a file never posted in a room was never shared:
            // nothing to record).
            if let Some(room) = &file.room {
                let event = pchat_store::NewComplianceEvent {
                    kind: pchat_store::ComplianceKind::FileRemoved,
                    at: pchat_server::datetime::now(),
                    room: room.clone(),
                    actor: "pchat file remove".into(),
                    nick: None,
                    detail: serde_json::json!({
                        "id": file.id,
                        "name": file.name,
                        "size": file.size,
                        "owner": file.owner,
                        "sha256": file.sha256,
                    })
                    .to_string(),
                };
                admin
                    .commit(vec![pchat_server::admin::AdminWrite::Compliance(event)])
                    .await?;
            }
            admin.store.file_remove(&id).await?;
            if cli.json {
                println!("{}", serde_json::json!({"removed": id}));
            } else {
                println!("removed {id} ({}, {} bytes)", file.name, file.size);
            }
            Ok(())
        }
        Command::Compliance(ComplianceCommand::Configure(args)) => {
            compliance_cli::configure(&target, cli.json, args).await
        }
        Command::Compliance(ComplianceCommand::Status) => {
            compliance_cli::status(&target, cli.json).await
        }
        Command::Compliance(ComplianceCommand::List { after, limit }) => {
            let (_, store) = open(&target).await?;
            let events = store.compliance_after(after, limit).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&events)?);
            } else {
                for e in &events {
                    let ev = &e.event;
                    println!(
                        "{:>8} {} {:<18} {:<40} {:<24} {}{}",
                        e.id,
                        pchat_server::datetime::format(ev.at),
                        ev.kind.as_str(),
                        ev.room,
                        ev.actor,
                        ev.detail,
                        if e.committed {
                            ""
                        } else {
                            "  [never committed: a crash hit before the change was stored]"
                        }
                    );
                }
            }
            Ok(())
        }
    }
}

fn read_password(p: &PasswordArgs) -> anyhow::Result<String> {
    let pw = if let Some(pw) = &p.password {
        pw.clone()
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the password from standard input")?;
        s.lines().next().unwrap_or_default().to_owned()
    };
    if pw.is_empty() {
        bail!("the password is empty: give one with --password or on standard input");
    }
    Ok(pw)
}

/// How the shell is given its identity (said when a pool needs one).
const SHELL_IDENTITY: &str =
    "--tls-dir DIR or PCHAT_TLS_DIR=DIR, an operator's identity: PKI/operators/NAME";
/// How a server is given its identity.
const SERVER_IDENTITY: &str = "pchat serve --tls-dir DIR, the server's identity PKI/servers/NAME";

/// Where management commands act: the data directory (standalone) or a pool's databases.
struct Target {
    data_dir: PathBuf,
    in_pool: Option<String>,
    etcd: pchat_control::EtcdAccess,
}

/// The pool's authoritative site and the PostgreSQL options of its database.
async fn pool_database(
    t: &Target,
    pool: &str,
    site: Option<&str>,
) -> anyhow::Result<(
    pchat_control::PoolView,
    pchat_store_postgres::PostgresOptions,
)> {
    let etcd = t.etcd.connect(Some(pool))?;
    let view = pchat_control::pool::get(&etcd, pool).await?;
    let site = match site {
        Some(name) => view
            .topology
            .sites
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!("pool {pool} has no site `{name}` (see `pchat pool get {pool}`)")
            })?,
        None => view
            .topology
            .authoritative_site(view.state.state)
            .ok_or_else(|| anyhow::anyhow!("pool {pool} has no authoritative site"))?,
    };
    // After a mirror failover the site's principal is the former mirror (recorded in etcd).
    let principal = pchat_control::mirroring::principal_of(&etcd, pool, site).await?;
    // As the servers connect: `pchat_server` with its password from etcd, TLS verified
    // against the principal's name (the shell's identity from --tls-dir).
    let access = pchat_server::pool_mode::PgAccess::new(
        t.etcd.tls_dir.as_deref(),
        view.topology.insecure,
        pool,
        &etcd,
    )
    .map_err(anyhow::Error::msg)?;
    let opts = access
        .options(pool, &principal)
        .map_err(anyhow::Error::msg)?;
    Ok((view, opts))
}

async fn open(t: &Target) -> anyhow::Result<(pchat_server::Config, Box<dyn Store>)> {
    if let Some(pool) = &t.in_pool {
        let (view, opts) = pool_database(t, pool, None).await?;
        let config = pchat_server::Config {
            domain: view.topology.pool.domain.clone(),
            ..Default::default()
        };
        let store = pchat_store_postgres::PostgresStore::connect(opts)
            .await
            .with_context(|| format!("connecting to pool {pool}'s databases (did `pchat --in-pool {pool} db install` run?)"))?;
        return Ok((config, Box::new(store)));
    }
    let dir = &t.data_dir;
    prepare_data_dir(dir)?;
    let config = load_config(dir, &Overrides::default())?;
    let store = open_store(dir, &config, true)?;
    Ok((config, Box::new(store)))
}

async fn user(target: &Target, json: bool, cmd: UserCommand) -> anyhow::Result<()> {
    let (config, store) = open(target).await?;
    let now = pchat_server::datetime::now();
    match cmd {
        UserCommand::Add { jid, password } => {
            let bare = pchat_server::auth::normalize_account(&jid, &config.domain)
                .map_err(anyhow::Error::msg)?;
            let pw = read_password(&password)?;
            store
                .user_put(pchat_server::auth::user_record(&bare, &pw, now))
                .await?;
            println!("added {bare}");
        }
        UserCommand::Passwd { jid, password } => {
            let bare = pchat_server::auth::normalize_account(&jid, &config.domain)
                .map_err(anyhow::Error::msg)?;
            let Some(old) = store.user_get(&bare).await? else {
                bail!("no user {bare}: create it with `pchat user add {bare} --password-stdin`");
            };
            let pw = read_password(&password)?;
            let mut rec = pchat_server::auth::user_record(&bare, &pw, now);
            rec.created_at = old.created_at;
            store.user_put(rec).await?;
            println!("password changed for {bare}");
        }
        UserCommand::Remove { jid } => {
            let bare = pchat_server::auth::normalize_account(&jid, &config.domain)
                .map_err(anyhow::Error::msg)?;
            if !store.user_remove(&bare).await? {
                bail!("no user {bare} (see `pchat user list`)");
            }
            println!("removed {bare}");
        }
        UserCommand::List => {
            let users = store.user_list().await?;
            if json {
                println!("{}", serde_json::to_string(&users)?);
            } else {
                for u in users {
                    println!("{u}");
                }
            }
        }
    }
    Ok(())
}

fn room_jid(config: &pchat_server::Config, room: &str) -> String {
    if room.contains('@') {
        room.to_lowercase()
    } else {
        format!("{}@{}", room.to_lowercase(), config.muc_jid())
    }
}

fn kind(c: &pchat_room::RoomConfig) -> &'static str {
    match (c.public, c.members_only) {
        (false, true) => "secret",
        (_, true) => "closed",
        (false, false) => "hidden",
        (true, false) => "open",
    }
}

async fn room(target: &Target, json: bool, cmd: RoomCommand) -> anyhow::Result<()> {
    match cmd {
        RoomCommand::Get { room } => return rooms_cli::room_get(target, json, &room).await,
        RoomCommand::New(a) => return rooms_cli::room_new(target, json, a).await,
        RoomCommand::Set(a) => return rooms_cli::room_set(target, json, a).await,
        RoomCommand::Disable { room } => return rooms_cli::room_enable(target, &room, false).await,
        RoomCommand::Enable { room } => return rooms_cli::room_enable(target, &room, true).await,
        RoomCommand::Remove { room, yes } => {
            return rooms_cli::room_remove(target, &room, yes).await
        }
        RoomCommand::Clear { room, before, yes } => {
            return rooms_cli::room_clear(target, json, &room, &before, yes).await
        }
        RoomCommand::List => room_list(target, json).await,
        RoomCommand::History { room, limit } => room_history(target, json, &room, limit).await,
    }
}

async fn room_list(target: &Target, json: bool) -> anyhow::Result<()> {
    let (_, store) = open(target).await?;
    let rooms = store.room_list().await?;
    let mut rows = Vec::new();
    for r in &rooms {
        let stats = store.room_stats(&r.jid).await?;
        rows.push(serde_json::json!({
            "jid": r.jid, "name": r.config.name, "kind": kind(&r.config),
            "category": r.category, "disabled": r.disabled,
            "persistent": r.config.persistent, "moderated": r.config.moderated,
            "messages": stats.messages,
        }));
        if !json {
            println!(
                "{:<40} {:<7} {:<16} {:>8} msgs  {}{}",
                r.jid,
                kind(&r.config),
                r.category,
                stats.messages,
                r.config.name,
                if r.disabled { "  [disabled]" } else { "" }
            );
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else if rooms.is_empty() {
        println!("no rooms yet: create one with `pchat room new NAME --manager USER`, or join one from a client");
    }
    Ok(())
}

async fn room_history(target: &Target, json: bool, room: &str, limit: u32) -> anyhow::Result<()> {
    let (config, store) = open(target).await?;
    let jid = room_jid(&config, room);
    if store.room_get(&jid).await?.is_none() {
        bail!("no room {jid} (see `pchat room list`)");
    }
    let page = store
        .archive_page(
            &jid,
            &ArchiveQuery {
                limit,
                from_end: true,
                ..ArchiveQuery::default()
            },
        )
        .await?;
    if json {
        let rows: Vec<_> = page.messages.iter().map(|m| serde_json::json!({
            "id": m.seq, "at": pchat_server::datetime::format(m.at), "nick": m.nick, "sender": m.sender, "body": m.body,
        })).collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        for m in &page.messages {
            println!(
                "#{} {} <{}> {}",
                m.seq,
                pchat_server::datetime::format(m.at),
                m.nick,
                m.body.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn read_topology(file: &Path) -> anyhow::Result<pchat_control::Topology> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let t = pchat_control::topology::parse(&text)
        .map_err(|p| anyhow::anyhow!("{} is not valid:\n{p}", file.display()))?;
    pchat_control::topology::warn_if_insecure(&t);
    Ok(t)
}

async fn topology_cmd(cmd: TopologyCommand, tls_dir: Option<&Path>) -> anyhow::Result<()> {
    match cmd {
        TopologyCommand::Validate { file, pki } => {
            let t = read_topology(&file)?;
            if let Some(dir) = pki {
                let problems = pki_cli::check(&t, &dir)?;
                if !problems.is_empty() {
                    anyhow::bail!(
                        "{} names endpoints without a good certificate in {} (run `pchat pki issue --dir {} --topology {}`):\n{}",
                        file.display(),
                        dir.display(),
                        dir.display(),
                        file.display(),
                        problems.join("\n")
                    );
                }
            } else if !t.insecure {
                eprintln!(
                    "note: certificates not checked; add --pki DIR to check every endpoint's"
                );
            }
            println!(
                "{} is valid: pool {} ({} sites, {} servers)",
                file.display(),
                t.pool.name,
                t.sites.len(),
                t.servers.len()
            );
        }
        TopologyCommand::Publish { file } => {
            let t = read_topology(&file)?;
            let etcd = pchat_control::EtcdAccess {
                endpoints: t.etcd.clone(),
                tls_dir: tls_dir.map(Path::to_path_buf),
                hint: SHELL_IDENTITY,
            }
            .connect(Some(&t.pool.name))?;
            if !t.insecure && !etcd.is_secure() {
                anyhow::bail!(
                    "{}",
                    pchat_control::PoolError::NeedsIdentity(t.pool.name.clone())
                );
            }
            pchat_control::pool::publish_topology(&etcd, &t).await?;
            println!("published pool {} to {}", t.pool.name, t.etcd.join(","));
        }
    }
    Ok(())
}

fn print_view(json: bool, v: &pchat_control::PoolView) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "pool": v.topology.pool.name, "state": v.state.state, "active_servers": v.state.active_servers,
                "epoch": v.state.epoch, "revision": v.revision,
            })
        );
    } else {
        let site = v
            .topology
            .authoritative_site(v.state.state)
            .map(|s| s.name.as_str())
            .unwrap_or("?");
        println!("pool            {}", v.topology.pool.name);
        println!(
            "state           {:?} (databases of site {site})",
            v.state.state
        );
        let active = if v.state.active_servers.is_empty() {
            "none".to_owned()
        } else {
            v.state.active_servers.join(", ")
        };
        println!("active servers  {active}");
        let idle: Vec<&str> = v
            .topology
            .servers
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !v.state.active_servers.iter().any(|a| a == n))
            .collect();
        println!(
            "idle servers    {}",
            if idle.is_empty() {
                "none".to_owned()
            } else {
                idle.join(", ")
            }
        );
        println!("epoch           {}", v.state.epoch);
    }
    Ok(())
}

async fn pool_cmd(json: bool, shell: &ha::Shell, cmd: PoolCommand) -> anyhow::Result<()> {
    let access = &shell.etcd;
    use pchat_control::pool::{self, ActiveChange};
    match cmd {
        PoolCommand::Get { pool: name } => {
            let v = pool::get(&access.connect(Some(&name))?, &name).await?;
            print_view(json, &v)
        }
        PoolCommand::SetActiveServers {
            pool: name,
            servers,
            add,
            remove,
            none,
            allow_remote_site,
        } => {
            let change = match (add, remove, none) {
                (Some(s), _, _) => ActiveChange::Add(s),
                (_, Some(s), _) => ActiveChange::Remove(s),
                (_, _, true) => ActiveChange::None,
                _ if servers.is_empty() => {
                    bail!("name the active servers, or use --add S, --remove S or --none")
                }
                _ => ActiveChange::Set(servers),
            };
            let etcd = access.connect(Some(&name))?;
            let v = pool::get(&etcd, &name).await?;
            let next = pool::plan_active(&v, &change, allow_remote_site)?;
            let v = pool::commit(&etcd, &v, &next).await?;
            print_view(json, &v)
        }
        PoolCommand::Swap {
            pool: name,
            allow_remote_site,
        } => {
            let etcd = access.connect(Some(&name))?;
            let v = pool::get(&etcd, &name).await?;
            let next = pool::plan_active(&v, &ActiveChange::Swap, allow_remote_site)?;
            let v = pool::commit(&etcd, &v, &next).await?;
            print_view(json, &v)
        }
        PoolCommand::Failover {
            pool: name,
            dry_run,
            servers,
            no_mirror,
        } => {
            let opts = pchat_procedures::dr::FailoverOptions {
                dry_run,
                servers,
                no_mirror,
                limits: Default::default(),
            };
            dr_cli::failover(shell, &name, opts, json).await
        }
        PoolCommand::Failback {
            pool: name,
            dry_run,
            backup_name,
            servers,
            drain_wait_s,
            backup_interval_s,
            salvage,
            online,
            reseed_first,
        } => {
            let opts = pchat_procedures::dr::FailbackOptions {
                dry_run,
                backup_name,
                servers,
                limits: pchat_procedures::steps::Limits {
                    drain_timeout_ms: drain_wait_s.saturating_mul(1000),
                    ..Default::default()
                },
                backup_interval_s,
                copy_interval_s: None,
                salvage,
                online,
                reseed_first,
            };
            dr_cli::failback(shell, &name, opts, json).await
        }
        PoolCommand::SetState {
            pool: name,
            state,
            allow_remote_site,
        } => {
            let Some(kind) = pchat_control::PoolStateKind::parse(&state) else {
                bail!("unknown pool state `{state}`: use `normal` or `failed-over`");
            };
            let etcd = access.connect(Some(&name))?;
            let v = pool::get(&etcd, &name).await?;
            let next = pool::plan_state(&v, kind, allow_remote_site)?;
            let v = pool::commit(&etcd, &v, &next).await?;
            print_view(json, &v)
        }
    }
}

async fn db_install(
    target: &Target,
    shell: &ha::Shell,
    site: Option<String>,
) -> anyhow::Result<()> {
    match &target.in_pool {
        Some(pool) => {
            let agent = prepare_instance(shell, pool, site.as_deref()).await?;
            // The servers' password: made once, kept in etcd, given to the principal's agent,
            // which sets it on the role as a SCRAM verifier. Re-running keeps it.
            let etcd = target.etcd.connect(Some(pool))?;
            let (password, made) = pchat_control::postgres::ensure_password(
                &etcd,
                pool,
                pchat_control::postgres::PgRole::Server,
            )
            .await?;
            if made {
                eprintln!("made the password of pchat_server (kept in etcd)");
            }
            agent.install(&password, &mut |_| {}).await?;
            println!("installed mgc and mgccomp for pool {pool}");
        }
        None => {
            if site.is_some() {
                bail!("--site needs --in-pool POOL: a standalone server has no sites");
            }
            let (_, store) = open(target).await?;
            drop(store);
            println!("installed mgc and mgccomp in {}", target.data_dir.display());
        }
    }
    Ok(())
}

/// `db install` in a pool: the site's principal instance initialised and running; its agent.
async fn prepare_instance(
    shell: &ha::Shell,
    pool: &str,
    site: Option<&str>,
) -> anyhow::Result<pchat_agent_api::AgentClient> {
    use pchat_agent_api::Role;
    let etcd = shell.etcd.connect(Some(pool))?;
    let view = pchat_control::pool::get(&etcd, pool).await?;
    let s = match site {
        Some(name) => view.topology.sites.iter().find(|s| s.name == name),
        None => view.topology.authoritative_site(view.state.state),
    }
    .ok_or_else(|| anyhow::anyhow!("pool {pool} has no site `{}`", site.unwrap_or("?")))?;
    let db = pchat_control::mirroring::principal_of(&etcd, pool, s).await?;
    let agent = shell.agents(pool)?.instance(&db);
    let st = agent.status().await?;
    if st.fenced.is_some() && st.initialized {
        bail!(
            "{} ({}) holds the database of a principal that was failed over from (fenced):              `pchat pool failback {pool}` replaces it with the backup's data (add --salvage FILE to keep              the messages it never shipped); nothing was installed",
            st.instance,
            db.address
        );
    }
    if !st.initialized {
        eprintln!("{}: creating the cluster (initdb)", st.instance);
        agent.init(&mut |_| {}).await?;
    }
    if agent.status().await?.role == Role::Stopped {
        eprintln!("{}: starting", st.instance);
        agent.start().await?;
    }
    Ok(agent)
}

async fn data(target: &Target, json: bool, cmd: DataCommand) -> anyhow::Result<()> {
    use pchat_store::portable;
    let totals = match cmd {
        DataCommand::Export { file } => {
            let (_, store) = open(target).await?;
            let tmp = file.with_extension("partial");
            // 0600: the export holds every message and account of the deployment.
            let out = std::io::BufWriter::new(
                pchat_server::private::create_file(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?,
            );
            let mut exported = progress::Progress::new("exported");
            let totals =
                portable::export(store.as_ref(), out, &mut |d, t| exported.count(d, t)).await?;
            drop(exported);
            // Written under a temporary name first, so a file with the final name is complete.
            std::fs::rename(&tmp, &file)
                .with_context(|| format!("renaming to {}", file.display()))?;
            totals
        }
        DataCommand::Import { file } => {
            let reader = || -> anyhow::Result<std::io::BufReader<std::fs::File>> {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?;
                Ok(std::io::BufReader::new(f))
            };
            let expected = portable::verify(reader()?)?;
            let store: Box<dyn Store> = match &target.in_pool {
                Some(_) => open(target).await?.1,
                None => {
                    // Importing writes rooms: it needs the data directory to itself.
                    prepare_data_dir(&target.data_dir)?;
                    let config = load_config(&target.data_dir, &Overrides::default())?;
                    Box::new(
                        open_store(&target.data_dir, &config, false)
                            .context("stop the server before importing into its data directory")?,
                    )
                }
            };
            let mut imported = progress::Progress::new("imported");
            let totals =
                portable::import(store.as_ref(), reader()?, expected.messages, &mut |d, t| {
                    imported.count(d, t)
                })
                .await?;
            drop(imported);
            anyhow::ensure!(
                (
                    totals.users,
                    totals.rooms,
                    totals.messages,
                    totals.files,
                    totals.pep_items
                ) == (
                    expected.users,
                    expected.rooms,
                    expected.messages,
                    expected.files,
                    expected.pep_items
                ),
                "imported {totals:?} but the archive holds {expected:?}"
            );
            expected
        }
    };
    if json {
        println!("{}", serde_json::to_string(&totals)?);
    } else {
        println!(
            "{} users ({} PEP items: bookmarks, vCards, private data), {} rooms, {} messages, {} files (sha256 {})",
            totals.users,
            totals.pep_items,
            totals.rooms,
            totals.messages,
            totals.files,
            totals.sha256
        );
    }
    Ok(())
}
