//! `pchat agent …` and `pchat db mirror|backup|restore …`: the command-line side of the agent,
//! of database mirroring and of full backup/restore (HA/DR, first slice). The work itself is
//! in `pchat_agent` (the daemon), `pchat_procedures::mirror` and `pchat_procedures::backup`;
//! this module parses, prints and maps errors to messages.
//!
//! Public API, for wiring into `main.rs`:
//!
//! ```text
//! #[derive(clap::Subcommand)] pub enum AgentCommand   // pchat agent run|check-config|token|status|init|start|stop
//! #[derive(clap::Subcommand)] pub enum DbHaCommand    // pchat db mirror …|backup|restore
//! pub async fn run_agent(cmd: AgentCommand, json: bool, shell: &Shell) -> anyhow::Result<()>
//! pub async fn run_db(cmd: DbHaCommand, data_dir: &Path, shell: &Shell, json: bool)
//! ```
//!
//! Pool mode is chosen by `--in-pool POOL`; without it, backup and restore act on
//! `--data-dir` (SQLite). The agents are reached with the shell's identity (`--tls-dir` /
//! `PCHAT_TLS_DIR`, an operator's), over HTTPS pinned to the instance the topology names; an
//! insecure pool's agents with its shared token from `--agent-token-file FILE` or
//! `PCHAT_AGENT_TOKEN` (never a token on the command line, where `ps` shows it).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use pchat_agent::AgentConfig;
use pchat_agent_api::backup::Manifest;
use pchat_agent_api::{AgentAccess, AgentClient, BackupRequest, Job, RestoreRequest, Status};
use pchat_control::topology::Topology;
use pchat_procedures::backup::{self, Progress};
use pchat_procedures::mirror::{self, Ctx, MirrorReport, Side};

use crate::progress::Progress as Printer;

/// `pchat agent …`: the daemon beside each PostgreSQL instance (Lync's SQL Server Agent).
#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// Run the agent for one PostgreSQL instance until SIGINT/SIGTERM.
    ///
    /// Example: pchat agent run --config /etc/pchat/agent.toml
    Run {
        /// The agent's TOML configuration (see docs/operations/mirroring.md).
        #[arg(long, env = "PCHAT_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and print the settings it resolves to (the token hidden).
    ///
    /// Example: pchat agent check-config --config /etc/pchat/agent.toml
    CheckConfig {
        /// The agent's TOML configuration.
        #[arg(long, env = "PCHAT_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Write a new random token for an insecure pool's agents (their `token_file`, the
    /// shell's --agent-token-file) into FILE, mode 0600. A pool with certificates needs none.
    ///
    /// Example: pchat agent token /etc/pchat/agent.token
    Token {
        /// The file to write (mode 0600; refused if it exists, unless --force).
        file: PathBuf,
        /// Replace an existing file (every agent and shell of the pool must then get the new
        /// token).
        #[arg(long)]
        force: bool,
    },
    /// Show one agent's view of its instance.
    ///
    /// Example: pchat agent status --url https://10.0.0.1:7070
    Status(AgentTarget),
    /// Create the instance's cluster (initdb) if its data directory is empty. Safe to re-run.
    ///
    /// Example: pchat agent init --url https://10.0.0.1:7070
    Init(AgentTarget),
    /// Start the instance (refused when a failover fenced it).
    ///
    /// Example: pchat agent start --url https://10.0.0.1:7070
    Start(AgentTarget),
    /// Stop the instance (a clean, fast shutdown; --immediate skips the checkpoint).
    ///
    /// Example: pchat agent stop --url https://10.0.0.1:7070
    Stop {
        #[command(flatten)]
        target: AgentTarget,
        /// `pg_ctl stop -m immediate`: crash recovery at the next start.
        #[arg(long)]
        immediate: bool,
    },
}

/// Which agent: its URL, which must be an instance's in the pool's topology.
#[derive(clap::Args, Debug)]
pub struct AgentTarget {
    /// The agent's URL, as the topology gives it.
    #[arg(long)]
    url: String,
    /// Find the URL in this topology file instead of the one published in etcd (before
    /// `pchat topology publish`).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
}

/// `pchat db mirror|backup|restore`.
#[derive(clap::Subcommand, Debug)]
pub enum DbHaCommand {
    /// Database mirroring in a site: a synchronous standby every commit waits for.
    Mirror(MirrorArgs),
    /// Full backup to a share (pool: through the agent; standalone: the SQLite files, online).
    ///
    /// Example: pchat --in-pool pc1 db backup --full --to /srv/share --name failback-1 --description "before failback"
    ///
    /// Example: pchat --data-dir /var/lib/pchat db backup --full --to /backups --name nightly
    Backup(BackupArgs),
    /// Restore a full backup (pool: over an instance, through its agent; standalone: into the
    /// stopped server's data directory).
    ///
    /// Example: pchat --in-pool pc1 db restore --from /srv/share/failback-1 --overwrite --recovery --site A
    ///
    /// Example: pchat --data-dir /var/lib/pchat db restore --from /backups/nightly --overwrite --recovery
    Restore(RestoreArgs),
    /// Log shipping to the backup site through the share (backup, copy and restore jobs).
    LogShipping(crate::dr_cli::LogShippingArgs),
    /// A new password for one of the pool's PostgreSQL roles: set on the principal (standbys
    /// follow by replication), stored in etcd; for `replication` every other instance's agent
    /// re-reads it. Open sessions keep working; new ones use the new password (servers read
    /// theirs from etcd at every connection).
    ///
    /// Example: pchat --in-pool pc1 db rotate-password --role server
    RotatePassword {
        /// `server` (pchat_server: servers and the shell) or `replication`
        /// (pchat_replication: mirrors and clones).
        #[arg(long)]
        role: String,
    },
}

/// `pchat db mirror …`.
#[derive(clap::Args, Debug)]
pub struct MirrorArgs {
    #[command(subcommand)]
    command: MirrorCommand,
    /// The site (default: the one the pool state makes authoritative).
    #[arg(long, global = true)]
    site: Option<String>,
}

/// The mirroring commands.
#[derive(clap::Subcommand, Debug)]
pub enum MirrorCommand {
    /// Clone the principal into the site's mirror instance and make every commit wait for it.
    /// Safe to re-run.
    ///
    /// Example: pchat --in-pool pc1 db mirror add --site A
    Add {
        /// Replace a mirror data directory that holds a different database.
        #[arg(long)]
        overwrite: bool,
    },
    /// Stop requiring the mirror for commits and stop the mirror.
    ///
    /// Example: pchat --in-pool pc1 db mirror remove --site A
    Remove,
    /// Both sides' roles, states (SYNCHRONIZED, SYNCHRONIZING, SUSPENDED, DISCONNECTED) and lag.
    ///
    /// Example: pchat --in-pool pc1 db mirror status
    Status,
    /// Manual failover: promote the mirror. A running principal is stopped cleanly first.
    ///
    /// Example: pchat --in-pool pc1 db mirror failover --site A
    Failover {
        /// Promote even though mirroring is not SYNCHRONIZED: what the principal committed
        /// after the mirror's last received position is lost (the refusal says how much).
        #[arg(long)]
        force: bool,
        /// Judge the pair and print the steps, each with what would stop it; change
        /// nothing (exits non-zero when the failover would refuse).
        #[arg(long)]
        dry_run: bool,
    },
}

/// `pchat db backup`.
#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// A full backup (the only kind; required so the command reads like SQL Server's).
    #[arg(long, required = true)]
    full: bool,
    /// The share (a directory; in pool mode, as the agent's host sees it).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// The backup set's name: the directory created in the share.
    #[arg(long)]
    name: String,
    /// Free text kept in the manifest (at most 255 characters).
    #[arg(long)]
    description: Option<String>,
    /// Pool: back up this site's principal (default: the authoritative site).
    #[arg(long)]
    site: Option<String>,
    /// Pool: back up the instance of this agent instead (a URL of the topology).
    #[arg(long, value_name = "URL")]
    agent: Option<String>,
}

/// `pchat db restore`.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("state").required(true).args(["recovery", "norecovery"]))]
pub struct RestoreArgs {
    /// The backup set (`SHARE/NAME`).
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Replace the existing database (required when there is one).
    #[arg(long)]
    overwrite: bool,
    /// Leave the database ready to use (RESTORE WITH RECOVERY).
    #[arg(long)]
    recovery: bool,
    /// Leave it a standby waiting for log shipping (RESTORE WITH NORECOVERY; pool only).
    #[arg(long)]
    norecovery: bool,
    /// Pool: restore over this site's principal (default: the authoritative site).
    #[arg(long)]
    site: Option<String>,
    /// Pool: restore over the instance of this agent instead (a URL of the topology).
    #[arg(long, value_name = "URL")]
    agent: Option<String>,
}

/// What the management shell holds to reach a pool: etcd, and the agents (its identity, or
/// an insecure pool's token).
#[derive(Clone, Debug)]
pub struct Shell {
    /// etcd, with the shell's identity.
    pub etcd: pchat_control::EtcdAccess,
    /// `--in-pool`.
    pub in_pool: Option<String>,
    /// The shell's identity (`--tls-dir` / `PCHAT_TLS_DIR`).
    pub tls_dir: Option<PathBuf>,
    /// `--agent-token-file`: an insecure pool's shared token.
    pub agent_token_file: Option<PathBuf>,
}

impl Shell {
    /// The insecure pool's token: from `--agent-token-file`, else `PCHAT_AGENT_TOKEN`.
    fn agent_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(f) = &self.agent_token_file {
            return Ok(Some(pchat_tls::fs::read_secret(f).with_context(|| {
                "--agent-token-file: the file of an insecure pool's agent token (`pchat agent token FILE` writes one)"
            })?));
        }
        Ok(std::env::var("PCHAT_AGENT_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()))
    }

    /// Access to pool `pool`'s agents: the shell's identity (checked to be of that pool),
    /// and the token of an insecure pool if one was given.
    pub fn agents(&self, pool: &str) -> anyhow::Result<AgentAccess> {
        let identity = match &self.tls_dir {
            Some(dir) => {
                let me = pchat_control::OwnIdentity::load(dir)?;
                if me.pool != pool {
                    bail!(
                        "identity {} is {} of pool {}, not of pool {pool}: give the shell an identity of pool {pool}",
                        dir.display(),
                        me.who,
                        me.pool
                    );
                }
                Some(std::sync::Arc::new(me.tls))
            }
            None => None,
        };
        Ok(AgentAccess::new(pool, identity, self.agent_token()?))
    }

    /// The procedures' context for pool `pool`.
    pub fn ctx(&self, pool: &str) -> anyhow::Result<Ctx> {
        Ok(Ctx {
            etcd: self.etcd.connect(Some(pool))?,
            pool: pool.to_owned(),
            agents: self.agents(pool)?,
        })
    }

    /// The pool a command acts on: `--in-pool`, else the one the shell's identity is of.
    fn pool(&self) -> anyhow::Result<String> {
        if let Some(p) = &self.in_pool {
            return Ok(p.clone());
        }
        if let Some(dir) = &self.tls_dir {
            return Ok(pchat_control::OwnIdentity::load(dir)?.pool);
        }
        bail!("which pool? give --in-pool POOL (or the shell's identity, --tls-dir)")
    }

    /// The client for the agent at `t.url`, found in the topology (the file given, else the
    /// one published in etcd); a URL the topology does not name is refused unreached.
    async fn agent_at(&self, t: &AgentTarget) -> anyhow::Result<AgentClient> {
        let topology: Topology = match &t.topology {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let topology = pchat_control::topology::parse(&text)
                    .map_err(|e| anyhow::anyhow!("{}:\n{e}", file.display()))?;
                pchat_control::topology::warn_if_insecure(&topology);
                topology
            }
            None => {
                let pool = self.pool()?;
                let etcd = self.etcd.connect(Some(&pool))?;
                pchat_control::pool::get(&etcd, &pool).await?.topology
            }
        };
        let access = self.agents(&topology.pool.name)?;
        Ok(access.by_url(&topology, &t.url))
    }
}

/// Runs `pchat agent …`.
pub async fn run_agent(cmd: AgentCommand, json: bool, shell: &Shell) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            if cfg.insecure {
                eprintln!(
                    "WARNING: pool {} is insecure: agent {} has no identity (`insecure = true`): its API is plain HTTP with the pool's shared token, and it reaches etcd and PostgreSQL without TLS; anyone on the network can read and change the pool. Use it for a throw-away lab only.",
                    cfg.pool, cfg.instance
                );
            }
            let handle = pchat_agent::serve(cfg.clone())
                .await
                .with_context(|| format!("starting the agent for instance {}", cfg.instance))?;
            eprintln!(
                "pchat agent: instance {} (PostgreSQL port {}, data {}) — API on {}",
                cfg.instance,
                cfg.port,
                cfg.data_dir.display(),
                handle.url()
            );
            wait_for_signal().await?;
            eprintln!("pchat agent: stopping (PostgreSQL keeps running)");
            handle.shutdown().await;
            Ok(())
        }
        AgentCommand::CheckConfig { config } => {
            let cfg = AgentConfig::load(&config)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "listen": cfg.listen.to_string(),
                        "pg_bin_dir": cfg.pg_bin_dir,
                        "data_dir": cfg.data_dir,
                        "port": cfg.port,
                        "listen_addresses": cfg.listen_addresses,
                        "socket_dir": cfg.socket_dir,
                        "log_file": cfg.log_file,
                        "os_user": cfg.os_user,
                        "trusted_networks": cfg.trusted_networks,
                        "tls_dir": cfg.tls_dir,
                        "insecure": cfg.insecure,
                        "etcd": cfg.etcd,
                        "pool": cfg.pool,
                        "instance": cfg.instance,
                        "start_on_boot": cfg.start_on_boot,
                        "metrics_listen": cfg.metrics_listen,
                    })
                );
            } else {
                println!("{} is valid: instance {} of pool {}, API on {}, PostgreSQL {} port {} as {}, etcd {}, identity {}",
                    config.display(), cfg.instance, cfg.pool, cfg.listen, cfg.data_dir.display(),
                    cfg.port, cfg.os_user,
                    if cfg.etcd.is_empty() { "none (no fencing)".to_owned() } else { cfg.etcd.join(",") },
                    cfg.tls_dir.as_ref().map_or("none (insecure = true: plaintext)".to_owned(), |d| d.display().to_string()));
            }
            Ok(())
        }
        AgentCommand::Token { file, force } => {
            if !force && std::fs::symlink_metadata(&file).is_ok() {
                bail!(
                    "{} exists: every agent and shell of the pool uses the token in it; give --force to replace it",
                    file.display()
                );
            }
            // Never on standard output or a command line: straight into a file only its
            // owner may read, whatever the umask.
            pchat_tls::fs::write_private(
                &file,
                format!("{}\n", pchat_tls::fs::random_secret()).as_bytes(),
            )?;
            println!(
                "wrote a new agent token to {} (mode 0600): the agents' token_file, the shell's --agent-token-file",
                file.display()
            );
            Ok(())
        }
        AgentCommand::Init(t) => {
            let mut p = Printer::new("init");
            let created = shell.agent_at(&t).await?.init(&mut |j| p.job(j)).await?;
            drop(p);
            println!(
                "{}",
                if created {
                    "created the cluster (initdb); start it with `pchat agent start`"
                } else {
                    "the data directory already holds a cluster: nothing done"
                }
            );
            Ok(())
        }
        AgentCommand::Start(t) => {
            shell.agent_at(&t).await?.start().await?;
            println!("started");
            Ok(())
        }
        AgentCommand::Stop { target, immediate } => {
            shell.agent_at(&target).await?.stop(immediate).await?;
            println!("stopped");
            Ok(())
        }
        AgentCommand::Status(t) => {
            let s = shell.agent_at(&t).await?.status().await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("{}", status_line("", &s));
                if let Some(j) = &s.job {
                    println!(
                        "  job {} {}: {:?} — {}{}",
                        j.id,
                        j.kind,
                        j.state,
                        j.step,
                        j.error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Runs `pchat db mirror|backup|restore`.
pub async fn run_db(
    cmd: DbHaCommand,
    data_dir: &Path,
    shell: &Shell,
    json: bool,
) -> anyhow::Result<()> {
    let in_pool = shell.in_pool.as_deref();
    match cmd {
        DbHaCommand::Mirror(args) => {
            let pool = in_pool.context(
                "mirroring is a pool feature: add --in-pool POOL (a standalone server has no mirror, as on Lync Standard Edition)",
            )?;
            let ctx = shell.ctx(pool)?;
            mirror_cmd(&ctx, args.site.as_deref(), args.command, json).await
        }
        DbHaCommand::Backup(args) => backup_cmd(args, data_dir, shell, json).await,
        DbHaCommand::Restore(args) => restore_cmd(args, data_dir, shell, json).await,
        DbHaCommand::LogShipping(args) => crate::dr_cli::run_log_shipping(args, shell, json).await,
        DbHaCommand::RotatePassword { role } => {
            let pool = in_pool.context("rotate-password acts on a pool: add --in-pool POOL")?;
            let Some(role) = pchat_control::postgres::PgRole::parse(&role) else {
                bail!("--role {role}: give `server` or `replication`");
            };
            let ctx = shell.ctx(pool)?;
            let r = pchat_procedures::credentials::rotate_password(&ctx, role, &mut |s| {
                eprintln!("rotate-password: {s}")
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: new password set on {} and stored in etcd{}",
                    r.role,
                    r.principal,
                    if r.unreachable.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; not reached (they read it when their agent next starts PostgreSQL): {}",
                            r.unreachable
                                .iter()
                                .map(|(i, _)| i.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
            }
            Ok(())
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn status_line(label: &str, s: &Status) -> String {
    let queue = match s.role {
        pchat_agent_api::Role::Principal => "send queue",
        _ => "redo queue",
    };
    format!(
        "{label}{:<12} {:<9} {:<14} timeline {}  lsn {}  {queue} {} ({:.1} s){}",
        s.instance,
        format!("{:?}", s.role).to_lowercase(),
        s.mirroring.state.as_str(),
        s.timeline.map_or("-".into(), |t| t.to_string()),
        s.wal_lsn
            .as_deref()
            .or(s.checkpoint_lsn.as_deref())
            .unwrap_or("-"),
        bytes(s.mirroring.lag_bytes),
        s.mirroring.lag_seconds,
        s.fenced
            .as_ref()
            .map(|f| format!("  FENCED (failed over to {} at {})", f.by, f.at))
            .unwrap_or_default()
    )
}

fn side_line(label: &str, side: &Side) -> String {
    match &side.status {
        Some(s) => format!("{}  {}", status_line(label, s), side.address),
        None => format!(
            "{label}{}  unreachable: {}",
            side.address,
            side.error.as_deref().unwrap_or("?")
        ),
    }
}

fn print_report(r: &MirrorReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "site {}: {} (safety {}, epoch {})",
        r.site,
        r.state,
        format!("{:?}", r.safety).to_lowercase(),
        r.epoch
    );
    println!("{}", side_line("  principal ", &r.principal));
    match &r.mirror {
        Some(m) => println!("{}", side_line("  mirror    ", m)),
        None => println!("  mirror    none in the topology"),
    }
    Ok(())
}

/// A job's progress, from the agent's job or the standalone backup's own steps.
trait ShowProgress {
    fn job(&mut self, j: &Job);
    fn progress(&mut self, p: &Progress);
}

impl ShowProgress for Printer {
    fn job(&mut self, j: &Job) {
        self.step(&j.step, j.percent);
    }

    fn progress(&mut self, p: &Progress) {
        self.step(&p.step, p.percent());
    }
}

async fn mirror_cmd(
    ctx: &Ctx,
    site: Option<&str>,
    cmd: MirrorCommand,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        MirrorCommand::Status => print_report(&mirror::status(ctx, site).await?, json),
        MirrorCommand::Add { overwrite } => {
            let mut p = Printer::new("mirror");
            let r = mirror::add(ctx, site, overwrite, &mut |s| p.line(s)).await?;
            drop(p);
            print_report(&r, json)
        }
        MirrorCommand::Remove => {
            let mut p = Printer::new("mirror");
            let r = mirror::remove(ctx, site, &mut |s| p.line(s)).await?;
            drop(p);
            print_report(&r, json)
        }
        MirrorCommand::Failover {
            force,
            dry_run: true,
        } => {
            let p = mirror::failover_plan(ctx, site, force).await?;
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                let loss = match p.possible_loss_bytes {
                    0 => "nothing can be lost".to_owned(),
                    u64::MAX => "an unknown amount of WAL may be lost".to_owned(),
                    b => format!("up to {} of WAL may be lost", bytes(b)),
                };
                println!(
                    "site {}: a {} failover from {} to {} would run ({}, {loss}):",
                    p.site,
                    if p.planned { "planned" } else { "unplanned" },
                    p.old_principal,
                    p.new_principal,
                    p.state_before
                );
                crate::dr_cli::print_steps(&p.steps);
                for what in &p.unreachable {
                    println!("not reached (the failover would do without it): {what}");
                }
            }
            crate::dr_cli::refuse_if_blocked("failover", &p.steps)
        }
        MirrorCommand::Failover {
            force,
            dry_run: false,
        } => {
            let mut p = Printer::new("mirror");
            let r = mirror::failover(ctx, site, force, &mut |s| p.line(s)).await?;
            drop(p);
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let loss = if r.possible_loss_bytes == 0 {
                    "no data lost".to_owned()
                } else {
                    format!(
                        "FORCED: up to {} of WAL written by {} after the mirror's last position may be lost",
                        bytes(r.possible_loss_bytes),
                        r.old_principal
                    )
                };
                println!(
                    "site {}: {} is the principal (timeline {}), {} — {} failover, {loss}; no principal for {} ms",
                    r.site,
                    r.new_principal,
                    r.timeline.map_or("?".into(), |t| t.to_string()),
                    format_args!("{} fenced", r.old_principal),
                    if r.planned { "planned" } else { "unplanned" },
                    r.no_principal_ms
                );
                for what in &r.unreachable {
                    println!("not reached (the failover did without it): {what}");
                }
                println!(
                    "the site runs SUSPENDED (without a mirror) until `pchat --in-pool {} db mirror add --site {}` re-seeds {}",
                    ctx.pool, r.site, r.old_principal
                );
            }
            Ok(())
        }
    }
}

/// The agent a pool-mode backup or restore talks to: the one named (a URL of the topology)
/// or the site's current principal's.
async fn pool_agent(
    shell: &Shell,
    pool: &str,
    site: Option<&str>,
    agent: Option<String>,
) -> anyhow::Result<AgentClient> {
    let ctx = shell.ctx(pool)?;
    Ok(match agent {
        Some(url) => {
            let t = pchat_control::pool::get(&ctx.etcd, pool).await?.topology;
            ctx.agents.by_url(&t, &url)
        }
        None => ctx
            .agents
            .instance(&mirror::current_principal(&ctx, site).await?),
    })
}

fn print_manifest(verb: &str, m: &Manifest, dir: &Path, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(m)?);
    } else {
        println!(
            "{verb} backup set {} ({}) — {} files, {}, taken {} from {}{}",
            m.name,
            dir.display(),
            m.files.len(),
            bytes(m.total_bytes),
            m.created_at,
            m.source,
            m.lsn
                .as_deref()
                .map(|l| format!(", consistent at LSN {l}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

async fn backup_cmd(
    a: BackupArgs,
    data_dir: &Path,
    shell: &Shell,
    json: bool,
) -> anyhow::Result<()> {
    let in_pool = shell.in_pool.as_deref();
    if !a.full {
        bail!("only full backups exist: add --full");
    }
    let target = a.to.join(&a.name);
    match in_pool {
        Some(pool) => {
            let client = pool_agent(shell, pool, a.site.as_deref(), a.agent).await?;
            let mut p = Printer::new("backup");
            let req = BackupRequest {
                to: a.to.display().to_string(),
                name: a.name,
                description: a.description,
            };
            let m = client.backup(&req, &mut |j| p.job(j)).await?;
            drop(p);
            print_manifest("wrote", &m, &target, json)
        }
        None => {
            if a.site.is_some() || a.agent.is_some() {
                bail!("--site and --agent need --in-pool POOL: a standalone server is backed up from --data-dir");
            }
            let dir = data_dir.to_path_buf();
            let m = tokio::task::spawn_blocking(move || {
                let mut p = Printer::new("backup");
                backup::backup_sqlite(&dir, &a.to, &a.name, a.description.as_deref(), &mut |x| {
                    p.progress(x)
                })
            })
            .await??;
            print_manifest("wrote", &m, &target, json)
        }
    }
}

async fn restore_cmd(
    a: RestoreArgs,
    data_dir: &Path,
    shell: &Shell,
    json: bool,
) -> anyhow::Result<()> {
    let in_pool = shell.in_pool.as_deref();
    let recovery = a.recovery && !a.norecovery;
    match in_pool {
        Some(pool) => {
            let client = pool_agent(shell, pool, a.site.as_deref(), a.agent).await?;
            let mut p = Printer::new("restore");
            let req = RestoreRequest {
                from: a.from.display().to_string(),
                overwrite: a.overwrite,
                recovery,
            };
            let m = client.restore(&req, &mut |j| p.job(j)).await?;
            drop(p);
            if recovery {
                // An earlier point, ready to use: its message ids continue in a new epoch
                // before any server writes (pchat_store::ids).
                let ctx = shell.ctx(pool)?;
                let mut say = |l: &str| {
                    if !json {
                        println!("{}", l.trim_start());
                    }
                };
                pchat_procedures::ids::advance(&ctx, &client, "db restore", &mut say).await?;
            }
            print_manifest("restored", &m, &a.from, json)?;
            if !json {
                println!(
                    "{}",
                    if recovery {
                        "the database is ready to use (WITH RECOVERY)"
                    } else {
                        "the database is a standby waiting for log shipping (WITH NORECOVERY)"
                    }
                );
            }
            Ok(())
        }
        None => {
            if a.site.is_some() || a.agent.is_some() {
                bail!("--site and --agent need --in-pool POOL: a standalone server is restored into --data-dir");
            }
            let dir = data_dir.to_path_buf();
            let from = a.from.clone();
            let m = tokio::task::spawn_blocking(move || {
                let mut p = Printer::new("restore");
                backup::restore_sqlite(&dir, &from, a.overwrite, recovery, &mut |x| p.progress(x))
            })
            .await??;
            print_manifest("restored", &m, &a.from, json)?;
            if !json {
                println!("{} is ready: start the server", data_dir.display());
            }
            Ok(())
        }
    }
}
