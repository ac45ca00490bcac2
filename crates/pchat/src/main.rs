//! `pchat`: `pchat serve` runs a server; every other subcommand is the management shell
//! (Lync's Management Shell cmdlets as commands). Exit codes: 0 success, 1 the operation
//! failed, 2 the command line was wrong.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
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
    },
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect rooms and their history.
    #[command(subcommand)]
    Room(RoomCommand),
    /// Read the compliance record (mgccomp).
    #[command(subcommand)]
    Compliance(ComplianceCommand),
}

#[derive(Subcommand)]
enum ComplianceCommand {
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
    /// Show one room's configuration, affiliations and subject.
    ///
    /// Example: pchat room show ops@conference.localhost
    Show {
        /// Room JID (or just its name).
        room: String,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PCHAT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            domain,
            bind_addr,
            c2s_port,
            c2s_tls_port,
            http_port,
        } => {
            let o = Overrides {
                domain,
                bind_addr,
                c2s_port,
                c2s_tls_port,
                http_port,
            };
            pchat_server::serve(&cli.data_dir, &o).await?;
            Ok(())
        }
        Command::User(cmd) => user(&cli.data_dir, cli.json, cmd).await,
        Command::Room(cmd) => room(&cli.data_dir, cli.json, cmd).await,
        Command::Compliance(ComplianceCommand::List { after, limit }) => {
            let (_, store) = open(&cli.data_dir).await?;
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

async fn open(dir: &Path) -> anyhow::Result<(pchat_server::Config, Box<dyn Store>)> {
    prepare_data_dir(dir)?;
    let config = load_config(dir, &Overrides::default())?;
    let store = open_store(dir, &config, true)?;
    Ok((config, Box::new(store)))
}

async fn user(dir: &Path, json: bool, cmd: UserCommand) -> anyhow::Result<()> {
    let (config, store) = open(dir).await?;
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

async fn room(dir: &Path, json: bool, cmd: RoomCommand) -> anyhow::Result<()> {
    let (config, store) = open(dir).await?;
    match cmd {
        RoomCommand::List => {
            let rooms = store.room_list().await?;
            let mut rows = Vec::new();
            for r in &rooms {
                let stats = store.room_stats(&r.jid).await?;
                rows.push(serde_json::json!({
                    "jid": r.jid, "name": r.config.name, "kind": kind(&r.config),
                    "persistent": r.config.persistent, "moderated": r.config.moderated,
                    "messages": stats.messages,
                }));
                if !json {
                    println!(
                        "{:<40} {:<7} {:>8} msgs  {}",
                        r.jid,
                        kind(&r.config),
                        stats.messages,
                        r.config.name
                    );
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else if rooms.is_empty() {
                println!("no rooms yet: a room is created when a user joins it");
            }
        }
        RoomCommand::Show { room } => {
            let jid = room_jid(&config, &room);
            let Some(r) = store.room_get(&jid).await? else {
                bail!("no room {jid} (see `pchat room list`)")
            };
            let stats = store.room_stats(&jid).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "room": r, "messages": stats.messages, "last_seq": stats.last_seq })
                );
            } else {
                println!("room         {}", r.jid);
                println!("name         {}", r.config.name);
                println!("description  {}", r.config.description);
                println!(
                    "kind         {} ({}moderated, {})",
                    kind(&r.config),
                    if r.config.moderated { "" } else { "un" },
                    if r.config.persistent {
                        "persistent"
                    } else {
                        "temporary"
                    }
                );
                println!(
                    "password     {}",
                    if r.config.password.is_some() {
                        "set"
                    } else {
                        "none"
                    }
                );
                println!(
                    "subject      {}",
                    r.subject.as_ref().map(|s| s.text.as_str()).unwrap_or("")
                );
                println!(
                    "messages     {} (last id {})",
                    stats.messages, stats.last_seq
                );
                for a in &r.affiliations {
                    println!("{:<12} {}", a.affiliation.as_str(), a.jid);
                }
            }
        }
        RoomCommand::History { room, limit } => {
            let jid = room_jid(&config, &room);
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
        }
    }
    Ok(())
}
