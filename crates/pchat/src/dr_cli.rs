//! `pchat db log-shipping …`, `pchat pool failover` and `pchat pool failback`: the
//! command-line side of log shipping and of the disaster-recovery procedures. The work is in
//! `pchat_procedures::logship` and `pchat_procedures::dr`.

use anyhow::{bail, Context as _};
use pchat_procedures::dr::{self, FailbackOptions, FailoverOptions, Step};
use pchat_procedures::logship::{self, ConfigureOptions, Party, ShippingReport};

use crate::ha::Shell;
use crate::progress::Progress;

/// `pchat db log-shipping …`.
#[derive(clap::Args, Debug)]
pub struct LogShippingArgs {
    #[command(subcommand)]
    command: LogShippingCommand,
}

/// The log-shipping commands.
#[derive(clap::Subcommand, Debug)]
pub enum LogShippingCommand {
    /// Ship the primary's WAL to the backup site: preflight, archiving on the principal and
    /// its mirror, seed the backup database (full backup, restore WITH NORECOVERY), start the
    /// copy and restore jobs. Safe to re-run.
    ///
    /// Example: pchat --in-pool pc1 db log-shipping configure --backup-interval-s 5
    Configure {
        /// The shipping site (default: the authoritative one).
        #[arg(long)]
        from_site: Option<String>,
        /// The receiving site (default: the other one).
        #[arg(long)]
        to_site: Option<String>,
        /// Close and ship a segment at least this often while anything is written (the
        /// data-loss bound of a DR failover). 5 is recommended.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        backup_interval_s: u64,
        /// How often the copy job copies from the share.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        copy_interval_s: u64,
        /// Replay this far behind (a window to stop a mistake from reaching the backup).
        #[arg(long, default_value_t = 0)]
        restore_delay_s: u64,
        /// Alert when the backup is further behind (default 3 × backup interval + copy
        /// interval + delay).
        #[arg(long)]
        alert_lag_s: Option<u64>,
    },
    /// Last backup, copy and restore, segments pending, lag in seconds, bytes and messages,
    /// and alerts.
    ///
    /// Example: pchat --in-pool pc1 db log-shipping status
    Status,
    /// Stop shipping (the backup database stays a restoring standby).
    ///
    /// Example: pchat --in-pool pc1 db log-shipping remove
    Remove,
    /// Prove the agents' OS users can read the share and write the copy directory (the
    /// backup site) and write the share (the primary site); name what is missing.
    ///
    /// Example: pchat --in-pool pc1 db log-shipping preflight
    Preflight {
        /// The shipping site (default: the authoritative one).
        #[arg(long)]
        from_site: Option<String>,
        /// The receiving site (default: the other one).
        #[arg(long)]
        to_site: Option<String>,
    },
    /// Pause the copy job (the restore job applies what was copied).
    ///
    /// Example: pchat --in-pool pc1 db log-shipping pause
    Pause,
    /// Resume the copy job.
    ///
    /// Example: pchat --in-pool pc1 db log-shipping resume
    Resume,
    /// Run the copy job now (also when paused) and say what it copied.
    ///
    /// Example: pchat --in-pool pc1 db log-shipping copy-now
    CopyNow,
}

/// Runs `pchat db log-shipping …`.
pub async fn run_log_shipping(
    args: LogShippingArgs,
    shell: &Shell,
    json: bool,
) -> anyhow::Result<()> {
    let pool = shell.in_pool.as_deref().context(
        "log shipping is a pool feature: add --in-pool POOL (a standalone server has no backup site, as on Lync Standard Edition)",
    )?;
    let ctx = shell.ctx(pool)?;
    match args.command {
        LogShippingCommand::Configure {
            from_site,
            to_site,
            backup_interval_s,
            copy_interval_s,
            restore_delay_s,
            alert_lag_s,
        } => {
            let opts = ConfigureOptions {
                from_site,
                to_site,
                backup_interval_s,
                copy_interval_s,
                restore_delay_s,
                alert_lag_s,
                limits: Default::default(),
            };
            let mut p = Progress::new("log shipping");
            let r = logship::configure(&ctx, &opts, &mut |l| p.line(l)).await?;
            drop(p);
            print_shipping(&r, json)
        }
        LogShippingCommand::Status => {
            let r = logship::status(&ctx).await?;
            print_shipping(&r, json)
        }
        LogShippingCommand::Remove => {
            let mut p = Progress::new("log shipping");
            logship::remove(&ctx, &mut |l| p.line(l)).await?;
            drop(p);
            println!("log shipping removed; the backup database stays a restoring standby");
            Ok(())
        }
        LogShippingCommand::Preflight { from_site, to_site } => {
            let checks = logship::preflight(&ctx, from_site.as_deref(), to_site.as_deref()).await?;
            let bad = checks.iter().filter(|(_, c)| !c.ok).count();
            if json {
                let v: Vec<_> = checks
                    .iter()
                    .map(|(who, c)| serde_json::json!({"who": who, "what": c.what, "ok": c.ok, "fix": c.fix}))
                    .collect();
                println!("{}", serde_json::json!({ "checks": v, "failed": bad }));
            } else {
                for (who, c) in &checks {
                    println!(
                        "{} {who}: {}{}",
                        if c.ok { "ok  " } else { "FAIL" },
                        c.what,
                        c.fix
                            .as_deref()
                            .map(|f| format!(" — {f}"))
                            .unwrap_or_default()
                    );
                }
            }
            if bad > 0 {
                bail!("{bad} preflight check(s) failed; fix them and run the preflight again");
            }
            Ok(())
        }
        LogShippingCommand::Pause | LogShippingCommand::Resume => {
            let pause = matches!(args.command, LogShippingCommand::Pause);
            logship::pause_copy(&ctx, pause).await?;
            println!("copy job {}", if pause { "paused" } else { "resumed" });
            Ok(())
        }
        LogShippingCommand::CopyNow => {
            let (Some(r), _) = logship::read_record(&ctx).await? else {
                bail!("log shipping is not configured: run `pchat db log-shipping configure`");
            };
            let run = logship::secondary_client(&ctx, &r)
                .await?
                .copy_now()
                .await?;
            if json {
                println!("{}", serde_json::to_string(&run)?);
            } else {
                println!("copied {} file(s); {} pending", run.copied, run.pending);
            }
            if let Some(e) = run.error {
                bail!("the copy job stopped short: {e}");
            }
            Ok(())
        }
    }
}

fn party_line(label: &str, p: &Party) -> String {
    match &p.status {
        Some(s) => format!(
            "{label}{} ({:?}, timeline {}, {} messages){}",
            s.instance,
            s.role,
            s.timeline.map_or("-".into(), |t| t.to_string()),
            s.messages.map_or("-".into(), |m| m.to_string()),
            format_args!("  {}", p.agent)
        ),
        None => format!(
            "{label}{}  unreachable: {}",
            p.agent,
            p.error.as_deref().unwrap_or("?")
        ),
    }
}

fn print_shipping(r: &ShippingReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let Some(rec) = &r.record else {
        println!("log shipping: not configured");
        return Ok(());
    };
    println!(
        "log shipping {} → {} ({}), {}: segment switch every {} s, copy every {} s, restore delay {} s",
        rec.from_site,
        rec.to_site,
        rec.id,
        rec.state,
        rec.backup_interval_s,
        rec.copy_interval_s,
        rec.restore_delay_s
    );
    println!("  share {}  →  copy {}", rec.share_dir, rec.copy_dir);
    if let Some(p) = &r.source {
        println!("{}", party_line("  source    ", p));
        if let Some(b) = p
            .status
            .as_ref()
            .and_then(|s| s.log_shipping.as_ref())
            .and_then(|l| l.backup.as_ref())
        {
            println!(
                "  backup    last {} at {}  ({} failures)",
                b.last_archived.as_deref().unwrap_or("none"),
                b.last_archived_at.as_deref().unwrap_or("-"),
                b.failures
            );
        }
    }
    if let Some(p) = &r.secondary {
        println!("{}", party_line("  secondary ", p));
        if let Some(l) = p.status.as_ref().and_then(|s| s.log_shipping.as_ref()) {
            if let Some(c) = &l.copy {
                println!(
                    "  copy      last {} at {}  ({} pending{})",
                    c.last_copied.as_deref().unwrap_or("none"),
                    c.last_copy_at.as_deref().unwrap_or("-"),
                    c.pending,
                    if c.paused { ", PAUSED" } else { "" }
                );
            }
            if let Some(x) = &l.restore {
                println!(
                    "  restore   at {} ({}), last commit {}, last advanced {}  ({} pending)",
                    x.replay_lsn.as_deref().unwrap_or("-"),
                    x.segment.as_deref().unwrap_or("-"),
                    x.last_commit_at.as_deref().unwrap_or("-"),
                    x.last_restore_at.as_deref().unwrap_or("-"),
                    x.pending
                );
            }
        }
    }
    println!(
        "  lag       {:.1} s, {} bytes, {} messages",
        r.lag_seconds, r.lag_bytes, r.lag_messages
    );
    if r.alerts.is_empty() {
        println!("  alerts    none");
    }
    for a in &r.alerts {
        println!("  ALERT     {a}");
    }
    Ok(())
}

pub(crate) fn print_steps(steps: &[Step]) {
    for s in steps {
        println!(
            "  {}. [{}] {}{}\n       {}",
            s.number,
            if s.done { "x" } else { " " },
            if s.name.is_empty() {
                String::new()
            } else {
                format!("({}) ", s.name)
            },
            s.what,
            s.command
        );
        if let Some(n) = &s.note {
            println!("       note: {n}");
        }
        if let Some(b) = &s.blocked {
            println!("       WOULD FAIL: {b}");
        }
    }
}

/// A plan that would refuse is a failed check, for scripts too: the dry run exits non-zero
/// after printing it.
pub(crate) fn refuse_if_blocked(what: &str, steps: &[Step]) -> anyhow::Result<()> {
    let blocked: Vec<&Step> = steps.iter().filter(|s| s.blocked.is_some()).collect();
    match blocked.first() {
        Some(first) => anyhow::bail!(
            "the {what} would refuse: {} step(s) would fail, the first step {} ({}): {}",
            blocked.len(),
            first.number,
            first.name,
            first.blocked.as_deref().unwrap_or_default()
        ),
        None => Ok(()),
    }
}

/// `pchat pool failover POOL`.
pub async fn failover(
    shell: &Shell,
    pool: &str,
    opts: FailoverOptions,
    json: bool,
) -> anyhow::Result<()> {
    let ctx = shell.ctx(pool)?;
    let mut p = Progress::new("pool failover");
    let r = dr::failover(&ctx, &opts, &mut |l| p.line(l)).await?;
    drop(p);
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else if opts.dry_run {
        println!("pool {pool}: failover to site {} would run:", r.site);
        print_steps(&r.steps);
        print_loss(&r, "failing over now would lose");
    }
    if opts.dry_run {
        return refuse_if_blocked("failover", &r.steps);
    }
    if json {
        return Ok(());
    }
    println!(
        "pool {pool} failed over to site {} in {:.1} s: {} is the principal, active servers {}",
        r.site,
        r.total_ms as f64 / 1000.0,
        r.principal,
        r.active_servers.join(", ")
    );
    print_loss(&r, "lost");
    if let Some(e) = r.id_epoch {
        println!(
            "message ids continue in epoch {e} (from {}): no id of a lost message is handed out again",
            pchat_store::ids::epoch_base(e) + 1
        );
    }
    if let Some(e) = &r.shipping_error {
        println!("shipping stopped short: {e}");
    }
    if !r.mirror_attached {
        println!("the backup site runs without a mirror");
    }
    Ok(())
}

/// The loss bounds of a failover report, the same words for `--dry-run` and the failover.
fn print_loss(r: &dr::FailoverReport, verb: &str) {
    println!(
        "{verb}: at least {} and at most {} acknowledged message(s), window {:.1} s (what the servers acknowledged after the last segment the backup applied)",
        r.lost_messages_at_least,
        r.lost_messages_at_most
            .map_or("an unknown number of".into(), |m| m.to_string()),
        r.lost_window_s
    );
    for n in &r.loss.notes {
        println!("  {n}");
    }
}

/// `pchat pool failback POOL`.
pub async fn failback(
    shell: &Shell,
    pool: &str,
    opts: FailbackOptions,
    json: bool,
) -> anyhow::Result<()> {
    let ctx = shell.ctx(pool)?;
    let dry_run = opts.dry_run;
    let mut p = Progress::new("pool failback");
    let r = dr::failback(&ctx, &opts, &mut |l| p.line(l)).await?;
    drop(p);
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else if dry_run {
        println!(
            "pool {pool}: failback {}:",
            if r.resumed {
                "under way; a re-run resumes at the first unchecked step"
            } else {
                "would run"
            }
        );
        print_steps(&r.steps);
        println!("order: {}", r.order);
    }
    if dry_run {
        return refuse_if_blocked("failback", &r.steps);
    }
    if json {
        return Ok(());
    }
    println!(
        "pool {pool} failed back in {:.1} s (no service for {:.1} s); the primary holds {} messages",
        r.total_ms as f64 / 1000.0,
        r.no_service_ms as f64 / 1000.0,
        r.messages.map_or("?".into(), |m| m.to_string())
    );
    Ok(())
}
