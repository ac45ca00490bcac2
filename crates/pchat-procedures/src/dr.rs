//! Disaster recovery between the sites: `pchat pool failover` (Lync's failover procedure)
//! and `pchat pool failback` (the seed, step by step). Each step is also a command of its
//! own (named in [`Step::command`]); these functions sequence them, check each step's
//! postcondition before and after it, and print progress.
//!
//! A failback keeps its progress in etcd (`/pchat/pools/P/procedures/failback`): a re-run
//! after an interruption resumes at the first unfinished step, and every step checks its
//! postcondition first, so a step that was done but not recorded is not done twice.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use pchat_agent_api::salvage::SalvageRequest;
use pchat_agent_api::shipping::ShippingRole;
use pchat_agent_api::{
    self as api, parse_lsn, AgentClient, BackupRequest, ClientError, CloneRequest, Fence, JobState,
    RestoreRequest, Role, Status,
};
use pchat_control::mirroring::{self, Safety};
use pchat_control::pool::{self, PoolError, PoolState, PoolStateKind, PoolView};
use pchat_control::topology::{Database, Site, SiteRole, Topology};
use pchat_control::{keys, EtcdError};

use crate::backup;
use crate::logship::{self, ConfigureOptions, ShippingError};
use crate::mirror::{self, Ctx, MirrorError};

const POLL: Duration = Duration::from_millis(200);

/// Why a procedure stopped. The message says what state things were left in.
#[derive(Debug, thiserror::Error)]
pub enum DrError {
    /// The pool could not be read or changed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// An agent failed or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Mirroring failed.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// Log shipping failed.
    #[error(transparent)]
    Shipping(#[from] ShippingError),
    /// Not possible as things are.
    #[error("{0}")]
    Refused(String),
    /// A step's postcondition did not come true in time.
    #[error("{0}")]
    Timeout(String),
}

/// One step of a procedure, for `--dry-run` and progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// 1-based.
    pub number: u8,
    /// What it does.
    pub what: String,
    /// The command that does this step alone.
    pub command: String,
    /// Whether its postcondition already holds (for a plan) or it was done (for a report).
    pub done: bool,
    /// How long it took in this run (0 when it was done before).
    #[serde(default)]
    pub ms: u64,
}

/// What `pchat pool failover` did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The steps.
    pub steps: Vec<Step>,
    /// The backup site, now authoritative.
    pub site: String,
    /// The promoted database.
    pub principal: String,
    /// Messages the primary had (by its last report) that the backup never received:
    /// the data-loss window in messages (a lower bound: writes after that report are unknown).
    pub lost_messages_at_least: u64,
    /// The window in time: from the last message the backup replayed to the primary's last
    /// report.
    pub lost_window_s: f64,
    /// What the copy job could not copy (a hole, a corrupt segment), if anything.
    pub shipping_error: Option<String>,
    /// Whether the backup site's mirror was attached.
    pub mirror_attached: bool,
    /// The active servers now.
    pub active_servers: Vec<String>,
    /// Wall time of the whole procedure.
    pub total_ms: u64,
}

/// `/pchat/pools/P/procedures/failover`: when the last DR failover happened and what the
/// backup had replayed then (a failback's salvage compares from there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// RFC 3339.
    pub at: String,
    /// The last commit the backup replayed before its promotion (µs since the epoch).
    pub backup_last_commit_us: Option<i64>,
    /// The log-shipping intervals in force before (a failback ships with them again).
    #[serde(default)]
    pub backup_interval_s: Option<u64>,
    /// The copy interval in force before.
    #[serde(default)]
    pub copy_interval_s: Option<u64>,
}

/// Options of `pchat pool failover`.
#[derive(Clone, Debug, Default)]
pub struct FailoverOptions {
    /// Print the plan only.
    pub dry_run: bool,
    /// Active servers to set (default: the backup site's servers, up to the pool's maximum).
    pub servers: Option<Vec<String>>,
    /// Do not attach the backup site's mirror.
    pub no_mirror: bool,
}

fn site_by_role(t: &Topology, role: SiteRole) -> Result<&Site, DrError> {
    t.sites.iter().find(|s| s.role == role).ok_or_else(|| {
        DrError::Refused(format!(
            "the topology has no {} site",
            match role {
                SiteRole::Primary => "primary",
                SiteRole::Backup => "backup",
            }
        ))
    })
}

fn site_servers(t: &Topology, site: &str, chosen: Option<&Vec<String>>) -> Vec<String> {
    match chosen {
        Some(list) => list.clone(),
        None => t
            .servers
            .iter()
            .filter(|s| s.site == site)
            .map(|s| s.name.clone())
            .take(t.pool.active_servers_max)
            .collect(),
    }
}

/// Sets state and active servers in one compare-and-swap (servers must sit beside the
/// state's databases, so neither can change first without a moment of the wrong pairing).
async fn set_state_and_servers(
    ctx: &Ctx,
    view: &PoolView,
    state: PoolStateKind,
    servers: Vec<String>,
) -> Result<PoolView, DrError> {
    let mut probe = view.clone();
    probe.state.state = state;
    // Validates names, maximum and site.
    let planned = pool::plan_active(&probe, &pool::ActiveChange::Set(servers), false)?;
    let next = PoolState {
        state,
        active_servers: planned.active_servers,
        epoch: view.state.epoch + 1,
    };
    Ok(pool::commit(&ctx.etcd, view, &next).await?)
}

fn client(ctx: &Ctx, db: &Database) -> AgentClient {
    ctx.agents.instance(db)
}

async fn last_principal_status(ctx: &Ctx, instance: &str) -> Option<Status> {
    let kv = ctx
        .etcd
        .get(&keys::principal_status(&ctx.pool, instance))
        .await
        .ok()??;
    serde_json::from_slice(&kv.value).ok()
}

fn rfc3339_s(t: Option<&str>) -> Option<f64> {
    let t = time::OffsetDateTime::parse(t?, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// The failover plan for `--dry-run` and the report.
fn failover_steps(b: &str, pool: &str, servers: &[String], no_mirror: bool) -> Vec<Step> {
    let mut v = vec![
        (
            "stop log shipping on the backup: copy every shipped segment still in the share (verified)",
            "pchat db log-shipping copy-now".to_owned(),
        ),
        (
            "apply every copied segment on the backup database",
            "pchat db log-shipping status".to_owned(),
        ),
        (
            "fence the primary site's databases (they may never again act as principal)",
            "(part of pchat pool failover)".to_owned(),
        ),
        (
            "bring the backup database online (promote it)",
            format!("pchat agent promote --url <{b} agent>"),
        ),
        (
            "pool state FailedOver, active servers in the backup site",
            format!(
                "pchat pool set-state {pool} failed-over; pchat pool set-active-servers {pool} {}",
                servers.join(" ")
            ),
        ),
    ];
    if !no_mirror {
        v.insert(
            4,
            (
                "attach the backup site's mirror",
                format!("pchat --in-pool {pool} db mirror add --site {b}"),
            ),
        );
    }
    v.into_iter()
        .enumerate()
        .map(|(i, (what, command))| Step {
            number: i as u8 + 1,
            what: what.to_owned(),
            command,
            done: false,
            ms: 0,
        })
        .collect()
}

/// `pchat pool failover`: the backup site takes over after the primary site is lost.
pub async fn failover(
    ctx: &Ctx,
    opts: &FailoverOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailoverReport, DrError> {
    let started = Instant::now();
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let t = view.topology.clone();
    let primary = site_by_role(&t, SiteRole::Primary)?.clone();
    let backup_site = site_by_role(&t, SiteRole::Backup)?.clone();
    let servers = site_servers(&t, &backup_site.name, opts.servers.as_ref());
    let mut steps = failover_steps(&backup_site.name, &ctx.pool, &servers, opts.no_mirror);
    if opts.dry_run {
        return Ok(FailoverReport {
            steps,
            site: backup_site.name.clone(),
            principal: backup_site.database.address.clone(),
            lost_messages_at_least: 0,
            lost_window_s: 0.0,
            shipping_error: None,
            mirror_attached: false,
            active_servers: servers,
            total_ms: 0,
        });
    }
    let bdb = mirror::current_principal(ctx, Some(&backup_site.name)).await?;
    let bc = client(ctx, &bdb);
    let bs = bc.status().await?;
    let (record, _) = logship::read_record(ctx).await?;
    let already = view.state.state == PoolStateKind::FailedOver;
    // A run that stopped after promoting the backup (its record written before the promotion
    // and the log-shipping record removed after it) resumes from there.
    let promoted_by_us = bs.role == Role::Principal
        && ctx
            .etcd
            .get(&keys::failover(&ctx.pool))
            .await?
            .and_then(|kv| serde_json::from_slice::<FailoverRecord>(&kv.value).ok())
            .is_some();
    if !already && !promoted_by_us {
        if bs.role != Role::Standby {
            return Err(DrError::Refused(format!(
                "the backup database {} is {:?}, not a log-shipping standby: there is nothing to fail over to \
                 (configure log shipping with `pchat db log-shipping configure` while the primary site runs)",
                bs.instance, bs.role
            )));
        }
        if record
            .as_ref()
            .is_none_or(|r| r.to_site != backup_site.name)
        {
            return Err(DrError::Refused(format!(
                "log shipping to site {} is not configured: the backup database may be far behind; nothing was changed",
                backup_site.name
            )));
        }
    }
    let mut shipping_error = None;
    let mut lost = 0;
    let mut window = 0.0;
    let mark = |steps: &mut Vec<Step>, n: usize, progress: &mut (dyn FnMut(&str) + Send)| {
        steps[n].done = true;
        progress(&format!(
            "step {}: {} — done",
            steps[n].number, steps[n].what
        ));
    };
    if bs.role == Role::Standby {
        // 1. The last copy run: everything verified that reached the share.
        progress("step 1: copying every shipped segment still in the share");
        let run = bc.copy_now().await?;
        progress(&format!("  copied {} file(s)", run.copied));
        if let Some(e) = &run.error {
            progress(&format!("  the copy job stopped short: {e}"));
            shipping_error = Some(e.clone());
        }
        mark(&mut steps, 0, progress);
        // 2. Replay all of it.
        progress("step 2: applying every copied segment");
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = (None, Instant::now());
        loop {
            let s = bc.status().await?;
            let pending = s
                .log_shipping
                .as_ref()
                .and_then(|l| l.restore.as_ref())
                .map_or(0, |r| r.pending);
            if last.0 != s.replay_lsn {
                last = (s.replay_lsn.clone(), Instant::now());
            }
            // Replay has used every copied segment and stood still through two of
            // PostgreSQL's retries of the next one (wal_retrieve_retry_interval = 1 s).
            if pending == 0 && last.1.elapsed() > Duration::from_millis(2500) {
                break;
            }
            if Instant::now() > deadline {
                return Err(DrError::Timeout(format!(
                    "the backup database did not finish applying the copied WAL within 120 s ({pending} segment(s) pending, replay at {}); nothing else was changed — run `pchat pool failover` again",
                    s.replay_lsn.as_deref().unwrap_or("?")
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        mark(&mut steps, 1, progress);
        let replayed_at = bc
            .status()
            .await?
            .log_shipping
            .and_then(|l| l.restore)
            .and_then(|r| rfc3339_s(r.last_commit_at.as_deref()));
        let rec = FailoverRecord {
            at: api::now_rfc3339(),
            backup_last_commit_us: replayed_at.map(|s| (s * 1e6) as i64),
            backup_interval_s: record.as_ref().map(|r| r.backup_interval_s),
            copy_interval_s: record.as_ref().map(|r| r.copy_interval_s),
        };
        ctx.etcd
            .put(
                &keys::failover(&ctx.pool),
                &serde_json::to_vec(&rec).unwrap_or_default(),
            )
            .await?;
        // The data-loss window: what the primary last reported against what was replayed.
        let after = bc.status().await?;
        let backup_messages = after.messages.unwrap_or(0);
        let mut primary_last: Option<Status> = None;
        for db in std::iter::once(&primary.database).chain(primary.mirror.iter()) {
            if let Ok(s) = client(ctx, db).status().await {
                if s.role == Role::Principal {
                    primary_last = Some(s);
                    break;
                }
            }
        }
        if primary_last.is_none() {
            // The site is gone: what its principal's agent last published.
            if let (Some(r), _) =
                mirroring::read_record(&ctx.etcd, &ctx.pool, &primary.name).await?
            {
                primary_last = last_principal_status(ctx, &r.principal.instance).await;
            }
        }
        if primary_last.is_none() {
            if let Some(r) = &record {
                for a in &r.sources {
                    // URLs from etcd: only an agent the topology names is asked.
                    if let Ok(s) = ctx.agents.by_url(&t, a).status().await {
                        if s.role == Role::Principal {
                            primary_last = Some(s);
                        }
                    }
                }
            }
        }
        if let Some(p) = &primary_last {
            lost = p.messages.unwrap_or(0).saturating_sub(backup_messages);
            let last_replayed = after
                .log_shipping
                .as_ref()
                .and_then(|l| l.restore.as_ref())
                .and_then(|r| rfc3339_s(r.last_commit_at.as_deref()));
            if let (Some(a), Some(b)) = (rfc3339_s(Some(&p.at)), last_replayed) {
                window = if lost > 0 { (a - b).max(0.0) } else { 0.0 };
            }
        }
        progress(&format!(
            "  the backup has {backup_messages} messages; the primary last reported {} — at least {lost} message(s) were not shipped (window {window:.1} s)",
            primary_last
                .as_ref()
                .and_then(|p| p.messages)
                .map_or("nothing".into(), |m| m.to_string())
        ));
        // 3. Fence the primary site: its databases never act as principal again.
        let epoch = view.state.epoch + 1;
        let fence = Fence {
            by: bs.instance.clone(),
            epoch,
            at: api::now_rfc3339(),
        };
        let json = serde_json::to_vec(&fence).unwrap_or_default();
        let mut names: Vec<String> = Vec::new();
        if let Some(r) = &record {
            names.extend(r.source_instances.iter().cloned());
        }
        if let (Some(r), _) = mirroring::read_record(&ctx.etcd, &ctx.pool, &primary.name).await? {
            names.push(r.principal.instance.clone());
            if let Some(m) = &r.mirror {
                names.push(m.instance.clone());
            }
            // No automatic failover inside a site that has been failed over from.
            let (rec, rev) = mirroring::read_record(&ctx.etcd, &ctx.pool, &primary.name).await?;
            if let Some(mut rec) = rec {
                rec.safety = Safety::Off;
                rec.epoch += 1;
                rec.changed_at = api::now_rfc3339();
                rec.note = format!("site failed over to {}", backup_site.name);
                let j = serde_json::to_vec(&rec).unwrap_or_default();
                let _ = ctx
                    .etcd
                    .compare_and_put(&keys::mirroring(&ctx.pool, &primary.name), rev, &j)
                    .await?;
            }
        }
        for db in std::iter::once(&primary.database).chain(primary.mirror.iter()) {
            if let Ok(s) = client(ctx, db).status().await {
                names.push(s.instance.clone());
                // A primary database still running (a partition, not a loss) stops now.
                if s.role == Role::Principal {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), client(ctx, db).stop(true))
                            .await;
                }
            }
        }
        names.sort();
        names.dedup();
        for n in &names {
            ctx.etcd.put(&keys::fence(&ctx.pool, n), &json).await?;
        }
        progress(&format!("  fenced: {}", names.join(", ")));
        mark(&mut steps, 2, progress);
        // 4. Promote.
        progress(&format!("step 4: promoting {}", bs.instance));
        bc.set_log_shipping(&ShippingRole::None).await?;
        bc.promote().await?;
        ctx.etcd
            .put(&keys::fence(&ctx.pool, &bs.instance), b"null")
            .await?;
        mark(&mut steps, 3, progress);
        if record.is_some() {
            // Shipping from the lost site is over; failback configures it anew.
            ctx.etcd.delete(&keys::log_shipping(&ctx.pool)).await?;
        }
    } else if bs.role == Role::Principal {
        // Only a database this procedure promoted is taken as done: a backup database that
        // is a principal for another reason (never seeded, restored by hand) may be empty.
        if !already && !promoted_by_us {
            return Err(DrError::Refused(format!(
                "the backup database {} is a running principal that no `pool failover` promoted (never seeded by log shipping?):                  refusing to make it authoritative; nothing was changed",
                bs.instance
            )));
        }
        for s in steps.iter_mut().take(4) {
            s.done = true;
        }
        progress(&format!(
            "{} is already the principal: resuming after its promotion",
            bs.instance
        ));
    } else {
        return Err(DrError::Refused(format!(
            "the backup database {} is {:?}: start it (as it was) and run the command again",
            bs.instance, bs.role
        )));
    }
    // 5. The backup site's mirror.
    let mut mirror_attached = false;
    if !opts.no_mirror && backup_site.mirror.is_some() {
        progress(&format!(
            "step 5: attaching the mirror of site {}",
            backup_site.name
        ));
        let mut p = |l: &str| progress(&format!("  {l}"));
        // Whatever the backup site's mirror holds is older than the promoted database: it is
        // re-seeded from it.
        match mirror::add(ctx, Some(&backup_site.name), true, &mut p).await {
            Ok(_) => {
                mirror_attached = true;
                mark(&mut steps, 4, progress);
            }
            Err(e) => progress(&format!(
                "  the mirror could not be attached ({e}); serving without it — run `pchat --in-pool {} db mirror add --site {}` later",
                ctx.pool, backup_site.name
            )),
        }
    }
    // 6. State and servers.
    let last = steps.len() - 1;
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    progress(&format!(
        "step {}: pool state FailedOver, active servers {}",
        steps[last].number,
        servers.join(", ")
    ));
    let view = set_state_and_servers(ctx, &view, PoolStateKind::FailedOver, servers).await?;
    mark(&mut steps, last, progress);
    Ok(FailoverReport {
        steps,
        site: backup_site.name.clone(),
        principal: bs.instance.clone(),
        lost_messages_at_least: lost,
        lost_window_s: window,
        shipping_error,
        mirror_attached,
        active_servers: view.state.active_servers,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

/// Options of `pchat pool failback`.
#[derive(Clone, Debug, Default)]
pub struct FailbackOptions {
    /// Print the plan (with what is already done) only.
    pub dry_run: bool,
    /// The full backup's name (default `failback-<time>`; kept across a resume).
    pub backup_name: Option<String>,
    /// Active servers in the primary site (default: its servers up to the maximum).
    pub servers: Option<Vec<String>>,
    /// How long step 1 waits for the servers to let go of the database.
    pub drain_wait: Duration,
    /// Log shipping primary → backup: segment switch interval (default: as before the
    /// failover, else 60).
    pub backup_interval_s: Option<u64>,
    /// Log shipping: copy interval (default: as before the failover, else 5).
    pub copy_interval_s: Option<u64>,
    /// Before the primary's old database is replaced, read the messages it has that the
    /// backup lacks (its unshipped tail) into this file (JSON lines). Never merged.
    pub salvage: Option<std::path::PathBuf>,
    /// Seed the primary as a streaming standby of the backup while the pool keeps serving,
    /// then switch over with seconds of no service.
    pub online: bool,
}

/// `/pchat/pools/P/procedures/failback`: a failback's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackRecord {
    /// RFC 3339.
    pub started_at: String,
    /// The full backup's name.
    pub backup_name: String,
    /// Steps done (their numbers).
    pub done: Vec<u8>,
    /// An `--online` failback (its own steps).
    #[serde(default)]
    pub online: bool,
}

/// What `pchat pool failback` did (or, with `--dry-run`, will do).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailbackReport {
    /// The steps.
    pub steps: Vec<Step>,
    /// Whether this run resumed an interrupted one.
    pub resumed: bool,
    /// From step 1 until servers were active again.
    pub no_service_ms: u64,
    /// Wall time of this run.
    pub total_ms: u64,
    /// Messages in the primary's database at the end.
    pub messages: Option<u64>,
}

fn failback_steps(pool: &str, a: &str, b: &str, backup: &str, share: &str) -> Vec<Step> {
    [
        (
            "clear the active servers; wait until no server holds an mgc/mgccomp connection".to_owned(),
            format!("pchat pool set-active-servers {pool} --none"),
        ),
        (
            format!("remove mirroring on the backup site {b} (mgc and mgccomp)"),
            format!("pchat --in-pool {pool} db mirror remove --site {b}"),
        ),
        (
            format!("full backup of the backup database to the share as {backup}"),
            format!("pchat --in-pool {pool} db backup --full --site {b} --to {share} --name {backup}"),
        ),
        (
            format!("restore it over the rebuilt primary database of site {a}, overwrite, ready to use"),
            format!("pchat --in-pool {pool} db restore --site {a} --from {share}/{backup} --overwrite --recovery"),
        ),
        (
            format!("configure log shipping {a} → {b}"),
            format!("pchat --in-pool {pool} db log-shipping configure --from-site {a} --to-site {b}"),
        ),
        (
            format!("set the active servers in site {a} and the pool state Normal (one compare-and-swap)"),
            format!("pchat pool set-active-servers {pool} … --allow-remote-site; pchat pool set-state {pool} normal"),
        ),
        (
            format!("re-attach the mirror of site {a}"),
            format!("pchat --in-pool {pool} db mirror add --site {a}"),
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (what, command))| Step {
        number: i as u8 + 1,
        what: what.to_string(),
        command,
        done: false,
        ms: 0,
    })
    .collect()
}

async fn save_failback(ctx: &Ctx, r: &FailbackRecord) -> Result<(), DrError> {
    let j = serde_json::to_vec(r).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    ctx.etcd.put(&keys::failback(&ctx.pool), &j).await?;
    Ok(())
}

/// `pchat pool failback`: the pool comes home to the primary site (the seed's procedure).
pub async fn failback(
    ctx: &Ctx,
    opts: &FailbackOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailbackReport, DrError> {
    let started = Instant::now();
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let t = view.topology.clone();
    let a = site_by_role(&t, SiteRole::Primary)?.clone();
    let b = site_by_role(&t, SiteRole::Backup)?.clone();
    let saved: Option<FailbackRecord> = ctx
        .etcd
        .get(&keys::failback(&ctx.pool))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    if view.state.state == PoolStateKind::Normal && saved.is_none() {
        return Err(DrError::Refused(format!(
            "pool {} is in state Normal with no failback under way: there is nothing to fail back",
            ctx.pool
        )));
    }
    let resumed = saved.is_some();
    let mut rec = saved.unwrap_or_else(|| FailbackRecord {
        started_at: api::now_rfc3339(),
        backup_name: opts.backup_name.clone().unwrap_or_else(|| {
            format!(
                "failback-{}",
                time::OffsetDateTime::now_utc().unix_timestamp()
            )
        }),
        done: vec![],
        online: opts.online,
    });
    if rec.online != opts.online {
        return Err(DrError::Refused(format!(
            "an {} failback started at {} is under way: run `pchat pool failback {}{}` to resume it",
            if rec.online { "online" } else { "offline" },
            rec.started_at,
            ctx.pool,
            if rec.online { " --online" } else { "" }
        )));
    }
    if opts.online {
        return failback_online(ctx, opts, rec, resumed, progress).await;
    }
    let share = t.share.trim_end_matches('/').to_owned();
    let mut steps = failback_steps(&ctx.pool, &a.name, &b.name, &rec.backup_name, &share);
    for s in &mut steps {
        s.done = rec.done.contains(&s.number);
    }
    if opts.dry_run {
        return Ok(FailbackReport {
            steps,
            resumed,
            no_service_ms: 0,
            total_ms: 0,
            messages: None,
        });
    }
    if resumed {
        let first = steps.iter().find(|s| !s.done).map_or(8, |s| s.number);
        progress(&format!(
            "resuming the failback started at {} at step {first} (backup {})",
            rec.started_at, rec.backup_name
        ));
    }
    save_failback(ctx, &rec).await?;
    let servers = site_servers(&t, &a.name, opts.servers.as_ref());
    let bdb = mirror::current_principal(ctx, Some(&b.name)).await?;
    let bc = client(ctx, &bdb);
    let adb = a.database.clone();
    let ac = client(ctx, &adb);
    let mut no_service_from: Option<Instant> = None;
    let mut no_service_ms = 0;

    let mut step_start = Instant::now();
    macro_rules! finish_step {
        ($n:expr) => {{
            let n: u8 = $n;
            if !rec.done.contains(&n) {
                rec.done.push(n);
            }
            save_failback(ctx, &rec).await?;
            let ms = step_start.elapsed().as_millis() as u64;
            step_start = Instant::now();
            steps[usize::from(n) - 1].done = true;
            steps[usize::from(n) - 1].ms = ms;
            progress(&format!(
                "step {n}: {} — done in {:.1} s",
                steps[usize::from(n) - 1].what,
                ms as f64 / 1000.0
            ));
        }};
    }

    // 1. Clear active servers; wait for them to let go.
    if !rec.done.contains(&1) {
        progress("step 1: clearing the active servers");
        no_service_from = Some(Instant::now());
        clear_servers_and_wait(ctx, &bc, opts.drain_wait).await?;
        finish_step!(1);
    }
    // 2. Remove mirroring on the backup.
    if !rec.done.contains(&2) {
        let (r, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, &b.name).await?;
        if r.as_ref().is_some_and(|r| r.safety != Safety::Off) {
            progress(&format!("step 2: removing mirroring in site {}", b.name));
            let mut p = |l: &str| progress(&format!("  {l}"));
            mirror::remove(ctx, Some(&b.name), &mut p).await?;
        }
        finish_step!(2);
    }
    // 3. Full backup of the backup database.
    let backup_dir = std::path::PathBuf::from(format!("{share}/{}", rec.backup_name));
    if !rec.done.contains(&3) {
        // Postcondition: the set exists with its manifest (a killed run's backup job may
        // have finished it meanwhile; the agent waits for a running job before a new one).
        let bs = bc.status().await?;
        if bs
            .job
            .as_ref()
            .is_some_and(|j| j.kind == "backup" && j.state == JobState::Running)
        {
            progress(
                "step 3: an earlier run's backup is still running on the agent; waiting for it",
            );
            let deadline = Instant::now() + Duration::from_secs(3600);
            while bc
                .status()
                .await?
                .job
                .is_some_and(|j| j.kind == "backup" && j.state == JobState::Running)
                && Instant::now() < deadline
            {
                tokio::time::sleep(POLL).await;
            }
        }
        if backup::read_manifest(&backup_dir).is_err() {
            if bs.role != Role::Principal {
                return Err(DrError::Refused(format!(
                    "the backup database {} is {:?}, not the running principal the failback backs up",
                    bs.instance, bs.role
                )));
            }
            progress(&format!(
                "step 3: full backup of {} to {}",
                bs.instance,
                backup_dir.display()
            ));
            if backup_dir.exists() {
                // A set without a readable manifest is not a backup: taken again.
                std::fs::remove_dir_all(&backup_dir).map_err(|e| {
                    DrError::Refused(format!(
                        "cannot remove the unfinished backup {}: {e}",
                        backup_dir.display()
                    ))
                })?;
            }
            bc.backup(
                &BackupRequest {
                    to: share.clone(),
                    name: rec.backup_name.clone(),
                    description: Some(format!("failback of pool {}", ctx.pool)),
                },
                &mut logship::job_lines(progress),
            )
            .await?;
        }
        finish_step!(3);
    }
    // 4. Restore over the primary.
    let bstat = bc.status().await?;
    let backup_messages = bstat.messages;
    if !rec.done.contains(&4) {
        let s = ac.status().await;
        let done_already = s.as_ref().is_ok_and(|s| {
            s.role == Role::Principal
                && s.system_identifier == bstat.system_identifier
                && s.messages == backup_messages
                && s.fenced.is_none()
        });
        if !done_already {
            progress(&format!(
                "step 4: restoring {} over {} (site {}), overwrite, ready to use; what it held before is discarded",
                rec.backup_name, adb.address, a.name
            ));
            ac.set_log_shipping(&ShippingRole::None).await?;
            if let Some(file) = &opts.salvage {
                salvage_into(ctx, &ac, &bdb, file, progress).await?;
            }
            ac.restore(
                &RestoreRequest {
                    from: backup_dir.display().to_string(),
                    overwrite: true,
                    recovery: true,
                },
                &mut logship::job_lines(progress),
            )
            .await?;
        }
        let s = ac.status().await?;
        if s.messages != backup_messages {
            return Err(DrError::Refused(format!(
                "after the restore {} has {:?} messages, the backup database {:?}: stopping here; run `pchat pool failback` again",
                s.instance, s.messages, backup_messages
            )));
        }
        // Site A's pair starts afresh from the topology: the restored database is its
        // principal, its mirror is re-seeded in the last step.
        ctx.etcd
            .delete(&keys::mirroring(&ctx.pool, &a.name))
            .await?;
        finish_step!(4);
    }
    // 5. Log shipping primary → backup.
    if !rec.done.contains(&5) {
        progress(&format!(
            "step 5: configuring log shipping {} → {}",
            a.name, b.name
        ));
        let mut p = |l: &str| progress(&format!("  {l}"));
        let shipping = shipping_options(ctx, opts, &a, &b).await?;
        logship::configure(ctx, &shipping, &mut p).await?;
        finish_step!(5);
    }
    // 6 + 7. Servers in A and state Normal, at once.
    if !rec.done.contains(&6) {
        let view = pool::get(&ctx.etcd, &ctx.pool).await?;
        progress(&format!(
            "step 6: pool state Normal, active servers {}",
            servers.join(", ")
        ));
        set_state_and_servers(ctx, &view, PoolStateKind::Normal, servers.clone()).await?;
        if let Some(f) = no_service_from {
            no_service_ms = f.elapsed().as_millis() as u64;
        }
        finish_step!(6);
    }
    // 8. The primary's mirror.
    if !rec.done.contains(&7) {
        if a.mirror.is_some() {
            progress(&format!(
                "step 7: re-attaching the mirror of site {}",
                a.name
            ));
            let mut p = |l: &str| progress(&format!("  {l}"));
            mirror::add(ctx, Some(&a.name), true, &mut p).await?;
            add_mirror_as_source(ctx, &a).await?;
        }
        finish_step!(7);
    }
    let _ = step_start;
    ctx.etcd.delete(&keys::failback(&ctx.pool)).await?;
    // The failover is over too (its record served the salvage and a failover's resume).
    ctx.etcd.delete(&keys::failover(&ctx.pool)).await?;
    let messages = ac.status().await.ok().and_then(|s| s.messages);
    progress("failback complete: the pool is Normal and serves from the primary site");
    Ok(FailbackReport {
        steps,
        resumed,
        no_service_ms,
        total_ms: started.elapsed().as_millis() as u64,
        messages,
    })
}

/// Writes salvaged messages to `file`, one JSON object a line: mode 0600 whatever the umask
/// (they are users' messages), under a fresh name first and never through a link, so a file
/// with the final name is complete.
pub fn write_salvage(
    file: &std::path::Path,
    messages: &[pchat_agent_api::salvage::SalvagedMessage],
) -> Result<(), DrError> {
    let mut lines = Vec::new();
    for m in messages {
        serde_json::to_writer(&mut lines, m)
            .map_err(|e| DrError::Refused(format!("salvaged message: {e}")))?;
        lines.push(b'\n');
    }
    pchat_tls::fs::write_private(file, &lines)
        .map_err(|e| DrError::Refused(format!("writing the salvage file: {e}")))
}

/// Reads the old primary's unshipped messages into `file` (JSON lines), before the restore
/// replaces them.
async fn salvage_into(
    ctx: &Ctx,
    old: &AgentClient,
    now: &Database,
    file: &std::path::Path,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), DrError> {
    let rec: Option<FailoverRecord> = ctx
        .etcd
        .get(&keys::failover(&ctx.pool))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    // A minute before the last replayed commit: everything older was shipped.
    let since_us = rec
        .and_then(|r| r.backup_last_commit_us)
        .map_or(0, |t| t - 60_000_000);
    let (host, port) = mirror::host_port(&now.address)?;
    progress(&format!(
        "  salvage: reading the old primary's messages that {} lacks",
        now.address
    ));
    // The comparison reads the authoritative `mgc` with the servers' rights.
    let password = pchat_control::postgres::read_password(
        &ctx.etcd,
        &ctx.pool,
        pchat_control::postgres::PgRole::Server,
    )
    .await?;
    let r = old
        .salvage(&SalvageRequest {
            compare_host: host,
            compare_port: port,
            since_us,
            compare_instance: Some(now.name.clone()),
            compare_password: password,
        })
        .await?;
    write_salvage(file, &r.messages)?;
    progress(&format!(
        "  salvage: {} message(s) only the old primary had (of {} compared) saved to {}{}",
        r.messages.len(),
        r.compared,
        file.display(),
        r.note.map(|n| format!(" ({n})")).unwrap_or_default()
    ));
    Ok(())
}

fn online_steps(pool: &str, a: &str, b: &str) -> Vec<Step> {
    [
        (
            format!("remove mirroring on the backup site {b} (commits stop waiting for its mirror)"),
            format!("pchat --in-pool {pool} db mirror remove --site {b}"),
        ),
        (
            format!("seed the primary database of site {a} as a streaming standby of the backup, while the pool serves"),
            "(part of pchat pool failback --online)".to_owned(),
        ),
        (
            format!("wait until site {a} has caught up"),
            "pchat agent status --url <primary agent>".to_owned(),
        ),
        (
            "no service begins: clear the active servers; wait until none holds a connection".to_owned(),
            format!("pchat pool set-active-servers {pool} --none"),
        ),
        (
            format!("stop the backup cleanly (it sends site {a} its last WAL), fence it, promote site {a}"),
            "(part of pchat pool failback --online)".to_owned(),
        ),
        (
            format!("set the active servers in site {a} and the pool state Normal: service resumes"),
            format!("pchat pool set-active-servers {pool} … --allow-remote-site; pchat pool set-state {pool} normal"),
        ),
        (
            format!("configure log shipping {a} → {b}"),
            format!("pchat --in-pool {pool} db log-shipping configure --from-site {a} --to-site {b}"),
        ),
        (
            format!("re-attach the mirror of site {a}"),
            format!("pchat --in-pool {pool} db mirror add --site {a}"),
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (what, command))| Step {
        number: i as u8 + 1,
        what,
        command,
        done: false,
        ms: 0,
    })
    .collect()
}

/// `pchat pool failback --online`: the primary is seeded as a standby of the backup while
/// the pool serves; the no-service window is only the switchover (drain, clean stop,
/// promotion, one compare-and-swap).
async fn failback_online(
    ctx: &Ctx,
    opts: &FailbackOptions,
    mut rec: FailbackRecord,
    resumed: bool,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailbackReport, DrError> {
    let started = Instant::now();
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let t = view.topology.clone();
    let a = site_by_role(&t, SiteRole::Primary)?.clone();
    let b = site_by_role(&t, SiteRole::Backup)?.clone();
    let mut steps = online_steps(&ctx.pool, &a.name, &b.name);
    for s in &mut steps {
        s.done = rec.done.contains(&s.number);
    }
    if opts.dry_run {
        return Ok(FailbackReport {
            steps,
            resumed,
            no_service_ms: 0,
            total_ms: 0,
            messages: None,
        });
    }
    save_failback(ctx, &rec).await?;
    let servers = site_servers(&t, &a.name, opts.servers.as_ref());
    let bdb = mirror::current_principal(ctx, Some(&b.name)).await?;
    let bc = client(ctx, &bdb);
    let adb = a.database.clone();
    let ac = client(ctx, &adb);
    let mut no_service_from: Option<Instant> = None;
    let mut no_service_ms = 0;

    let mut step_start = Instant::now();
    macro_rules! finish_step {
        ($n:expr) => {{
            let n: u8 = $n;
            if !rec.done.contains(&n) {
                rec.done.push(n);
            }
            save_failback(ctx, &rec).await?;
            let ms = step_start.elapsed().as_millis() as u64;
            step_start = Instant::now();
            steps[usize::from(n) - 1].done = true;
            steps[usize::from(n) - 1].ms = ms;
            progress(&format!(
                "step {n}: {} — done in {:.1} s",
                steps[usize::from(n) - 1].what,
                ms as f64 / 1000.0
            ));
        }};
    }

    // 1. No automatic failover in B while its principal is stopped for the switchover.
    if !rec.done.contains(&1) {
        let (r, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, &b.name).await?;
        if r.as_ref().is_some_and(|r| r.safety != Safety::Off) {
            progress(&format!("step 1: removing mirroring in site {}", b.name));
            let mut p = |l: &str| progress(&format!("  {l}"));
            mirror::remove(ctx, Some(&b.name), &mut p).await?;
        }
        finish_step!(1);
    }
    let bs = bc.status().await?;
    // 2. Seed A from B while B serves.
    if !rec.done.contains(&2) {
        if bs.role != Role::Principal {
            return Err(DrError::Refused(format!(
                "the backup database {} is {:?}, not the running principal to seed from",
                bs.instance, bs.role
            )));
        }
        ac.set_log_shipping(&ShippingRole::None).await?;
        if let Some(file) = &opts.salvage {
            salvage_into(ctx, &ac, &bdb, file, progress).await?;
        }
        let an = ac.status().await?.instance;
        progress(&format!(
            "step 2: seeding {} from {} (the pool keeps serving)",
            adb.address, bdb.address
        ));
        bc.slot(&an, false).await?;
        let (host, port) = mirror::host_port(&bdb.address)?;
        ac.clone_from(
            &CloneRequest {
                host,
                port,
                instance: Some(bdb.name.clone()),
                slot: Some(an),
                overwrite: true,
            },
            &mut logship::job_lines(progress),
        )
        .await?;
        finish_step!(2);
    }
    // 3. Caught up.
    if !rec.done.contains(&3) {
        progress(&format!("step 3: waiting for {} to catch up", adb.address));
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let s = ac.status().await?;
            if s.role == Role::Mirror
                && s.mirroring.detail.as_deref() == Some("streaming")
                && s.mirroring.lag_bytes < 1024 * 1024
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(DrError::Timeout(format!(
                    "{} has not caught up with the backup after 600 s (role {:?}, {} bytes behind); the pool still serves from the backup — run the command again",
                    s.instance, s.role, s.mirroring.lag_bytes
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        finish_step!(3);
    }
    // 4. No service from here: clear the servers, wait for them to let go.
    if !rec.done.contains(&4) {
        progress("step 4: clearing the active servers");
        no_service_from = Some(Instant::now());
        clear_servers_and_wait(ctx, &bc, opts.drain_wait).await?;
        finish_step!(4);
    }
    // 5. Clean stop of B (its last WAL reaches A), fence it, promote A.
    if !rec.done.contains(&5) {
        let before = ac.status().await?;
        if before.role != Role::Principal {
            progress(&format!(
                "step 5: stopping {} cleanly, promoting {}",
                bdb.address, adb.address
            ));
            let fence = Fence {
                by: before.instance.clone(),
                epoch: view.state.epoch + 1,
                at: api::now_rfc3339(),
            };
            ctx.etcd
                .put(
                    &keys::fence(&ctx.pool, &bs.instance),
                    &serde_json::to_vec(&fence).unwrap_or_default(),
                )
                .await?;
            bc.stop(false).await?;
            let last = bc
                .status()
                .await?
                .checkpoint_lsn
                .as_deref()
                .and_then(parse_lsn);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let s = ac.status().await?;
                let got = s.wal_lsn.as_deref().and_then(parse_lsn);
                if matches!((last, got), (Some(l), Some(g)) if g > l) {
                    break;
                }
                if Instant::now() > deadline {
                    // Undo: B serves again as it was.
                    ctx.etcd
                        .put(&keys::fence(&ctx.pool, &bs.instance), b"null")
                        .await?;
                    bc.start().await?;
                    return Err(DrError::Timeout(format!(
                        "{} did not receive the backup's last WAL within 30 s; the backup was started again — set the active servers back with `pchat pool set-active-servers` and retry",
                        s.instance
                    )));
                }
                tokio::time::sleep(POLL).await;
            }
            ac.promote().await?;
        }
        ctx.etcd
            .put(&keys::fence(&ctx.pool, &before.instance), b"null")
            .await?;
        ctx.etcd
            .delete(&keys::mirroring(&ctx.pool, &a.name))
            .await?;
        finish_step!(5);
    }
    // 6. Service resumes in site A.
    if !rec.done.contains(&6) {
        let view = pool::get(&ctx.etcd, &ctx.pool).await?;
        progress(&format!(
            "step 6: pool state Normal, active servers {}",
            servers.join(", ")
        ));
        set_state_and_servers(ctx, &view, PoolStateKind::Normal, servers.clone()).await?;
        if let Some(f) = no_service_from {
            no_service_ms = f.elapsed().as_millis() as u64;
        }
        finish_step!(6);
    }
    // 7. Log shipping A → B (re-seeds B), 8. A's mirror: the pool serves meanwhile.
    if !rec.done.contains(&7) {
        progress(&format!(
            "step 7: configuring log shipping {} → {}",
            a.name, b.name
        ));
        let mut p = |l: &str| progress(&format!("  {l}"));
        let shipping = shipping_options(ctx, opts, &a, &b).await?;
        logship::configure(ctx, &shipping, &mut p).await?;
        finish_step!(7);
    }
    if !rec.done.contains(&8) {
        if a.mirror.is_some() {
            progress(&format!(
                "step 8: re-attaching the mirror of site {}",
                a.name
            ));
            let mut p = |l: &str| progress(&format!("  {l}"));
            mirror::add(ctx, Some(&a.name), true, &mut p).await?;
            add_mirror_as_source(ctx, &a).await?;
        }
        finish_step!(8);
    }
    let _ = step_start;
    ctx.etcd.delete(&keys::failback(&ctx.pool)).await?;
    // The failover is over too (its record served the salvage and a failover's resume).
    ctx.etcd.delete(&keys::failover(&ctx.pool)).await?;
    let messages = ac.status().await.ok().and_then(|s| s.messages);
    progress("failback complete: the pool is Normal and serves from the primary site");
    Ok(FailbackReport {
        steps,
        resumed,
        no_service_ms,
        total_ms: started.elapsed().as_millis() as u64,
        messages,
    })
}

/// After the primary's mirror is re-attached, it archives into the share too.
async fn add_mirror_as_source(ctx: &Ctx, a: &Site) -> Result<(), DrError> {
    let (r, rev) = logship::read_record(ctx).await?;
    let (Some(mut r), Some(m)) = (r, a.mirror.as_ref()) else {
        return Ok(());
    };
    let role = ShippingRole::Source {
        share_dir: r.share_dir.clone(),
        backup_interval_s: r.backup_interval_s,
        retention_h: 72,
    };
    client(ctx, m).set_log_shipping(&role).await?;
    if !r.sources.contains(&m.agent) {
        r.sources.push(m.agent.clone());
        if let Ok(s) = client(ctx, m).status().await {
            r.source_instances.push(s.instance);
        }
        let j = serde_json::to_vec(&r).unwrap_or_default();
        let _ = ctx
            .etcd
            .compare_and_put(&keys::log_shipping(&ctx.pool), rev, &j)
            .await?;
    }
    Ok(())
}

/// Log shipping primary → backup with the intervals given, else those in force before the
/// failover, else the defaults.
async fn shipping_options(
    ctx: &Ctx,
    opts: &FailbackOptions,
    a: &Site,
    b: &Site,
) -> Result<ConfigureOptions, DrError> {
    let before: Option<FailoverRecord> = ctx
        .etcd
        .get(&keys::failover(&ctx.pool))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let d = ConfigureOptions::default();
    Ok(ConfigureOptions {
        from_site: Some(a.name.clone()),
        to_site: Some(b.name.clone()),
        backup_interval_s: opts
            .backup_interval_s
            .or(before.as_ref().and_then(|r| r.backup_interval_s))
            .unwrap_or(d.backup_interval_s),
        copy_interval_s: opts
            .copy_interval_s
            .or(before.as_ref().and_then(|r| r.copy_interval_s))
            .unwrap_or(d.copy_interval_s),
        ..d
    })
}

/// Clears the active servers and waits until none holds a session on the backup database
/// (the failback's first step, the seed's condition for everything after it).
async fn clear_servers_and_wait(
    ctx: &Ctx,
    bc: &AgentClient,
    drain_wait: Duration,
) -> Result<(), DrError> {
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    if !view.state.active_servers.is_empty() {
        let next = pool::plan_active(&view, &pool::ActiveChange::None, true)?;
        pool::commit(&ctx.etcd, &view, &next).await?;
    }
    let deadline = Instant::now() + drain_wait;
    loop {
        let s = bc.status().await?;
        match s.client_connections {
            Some(0) => return Ok(()),
            // A stopped database holds no session either.
            _ if s.role != Role::Principal => return Ok(()),
            n if Instant::now() > deadline => {
                return Err(DrError::Timeout(format!(
                    "servers still hold {} connection(s) to {} after {drain_wait:?}: a server that is not in the pool's topology, or one that does not follow the pool state? \
                     Stop it and run `pchat pool failback` again",
                    n.map_or("?".into(), |n| n.to_string()),
                    s.instance,
                )));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}
