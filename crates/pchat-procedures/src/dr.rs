//! Disaster recovery between the sites: `pchat pool failover` (Lync's failover procedure);
//! `pchat pool failback` is in [`crate::failback`] (re-exported here). Each step is also a
//! command of its own (named in [`Step::command`]); the failover sequences them, checks each
//! step's postcondition before and after it, and prints progress.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use pchat_agent_api::shipping::ShippingRole;
use pchat_agent_api::{self as api, AgentClient, ClientError, Fence, Role, Status};
use pchat_control::mirroring::{self, Safety};
use pchat_control::pool::{self, PoolError, PoolState, PoolStateKind, PoolView};
use pchat_control::topology::{Database, Site, SiteRole, Topology};
use pchat_control::{keys, EtcdError};

use crate::ids::{self, IdsError};
use crate::logship::{self, ShippingError, ShippingRecord};
use crate::loss::{self, LossEstimate};
use crate::mirror::{self, Ctx, MirrorError};
use crate::steps::{self, Check, Limits, RunRecord, Service, StepDef};

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
    /// A new id epoch could not be drawn or set.
    #[error(transparent)]
    Ids(#[from] IdsError),
    /// Not possible as things are.
    #[error("{0}")]
    Refused(String),
    /// A step's postcondition did not come true in time.
    #[error("{0}")]
    Timeout(String),
    /// The step runner refused (a precondition) or stopped (a postcondition).
    #[error(transparent)]
    Run(#[from] crate::steps::RunError),
}

pub use crate::failback::{
    failback, write_salvage, FailbackOptions, FailbackRecord, FailbackReport,
};
pub use crate::steps::Step;

/// What `pchat pool failover` did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The steps.
    pub steps: Vec<Step>,
    /// The backup site, now authoritative.
    pub site: String,
    /// The promoted database.
    pub principal: String,
    /// Acknowledged messages the backup lacks, for certain: from the servers' published
    /// marks ([`crate::loss`]); without marks, what the primary's last status counted
    /// beyond the backup.
    pub lost_messages_at_least: u64,
    /// At most this many acknowledged messages are lost (`None`: no bound; `loss.notes`
    /// says why).
    #[serde(default)]
    pub lost_messages_at_most: Option<u64>,
    /// The estimate in detail.
    #[serde(default)]
    pub loss: LossEstimate,
    /// The id epoch the promoted database's message ids continue in.
    #[serde(default)]
    pub id_epoch: Option<u64>,
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
    /// The id epoch drawn for the promoted database (raised right after its promotion; a
    /// resumed run raises it if that did not happen).
    #[serde(default)]
    pub id_epoch: Option<u64>,
    /// The step runner's progress (a re-run resumes after the last step done).
    #[serde(flatten)]
    pub run: RunRecord,
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
    /// The bounds of the waits.
    pub limits: Limits,
}

pub(crate) fn site_by_role(t: &Topology, role: SiteRole) -> Result<&Site, DrError> {
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

pub(crate) fn site_servers(t: &Topology, site: &str, chosen: Option<&Vec<String>>) -> Vec<String> {
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
pub(crate) async fn set_state_and_servers(
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

pub(crate) fn client(ctx: &Ctx, db: &Database) -> AgentClient {
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

/// The failover's steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailoverStep {
    Copy,
    Replay,
    Fence,
    Promote,
    IdEpoch,
    BackupMirror,
    Activate,
}

/// `pchat pool failover` as a procedure on the step runner.
struct Failover<'a> {
    ctx: &'a Ctx,
    limits: Limits,
    kinds: Vec<FailoverStep>,
    plan: Vec<StepDef>,
    rec: FailoverRecord,
    view: PoolView,
    primary: Site,
    backup_site: Site,
    bc: AgentClient,
    servers: Vec<String>,
    /// The log-shipping configuration when the run began.
    shipping: Option<ShippingRecord>,
    /// The pool was FailedOver when the run began.
    already: bool,
    /// What the copy job could not copy.
    shipping_error: Option<String>,
    lost: LossNow,
    mirror_attached: bool,
}

impl Failover<'_> {
    fn def(&self, k: FailoverStep) -> StepDef {
        let pool = &self.ctx.pool;
        let b = &self.backup_site.name;
        let d = |name, what: &str, command: String, service| StepDef {
            name,
            what: what.to_owned(),
            command,
            service,
            // Promotion is seen in the backup's role, the last step in the pool state;
            // the others are recorded (and harmless to repeat: a copy, a wait, fences,
            // the raise to the recorded epoch, a mirror re-seeded).
            observable: matches!(k, FailoverStep::Promote | FailoverStep::Activate),
        };
        match k {
            FailoverStep::Copy => d(
                "copy",
                "stop log shipping on the backup: copy every shipped segment still in the share (verified)",
                "pchat db log-shipping copy-now".into(),
                Service::Keeps,
            ),
            FailoverStep::Replay => d(
                "replay",
                "apply every copied segment on the backup database; the loss bounds; draw the id epoch",
                "pchat db log-shipping status".into(),
                Service::Keeps,
            ),
            FailoverStep::Fence => d(
                "fence",
                "fence the primary site's databases (they may never again act as principal)",
                "(part of pchat pool failover)".into(),
                Service::Keeps,
            ),
            FailoverStep::Promote => d(
                "promote",
                "bring the backup database online (promote it)",
                format!("pchat agent promote --url <{b} agent>"),
                Service::Keeps,
            ),
            FailoverStep::IdEpoch => d(
                "id-epoch",
                "raise the promoted database to the failover's id epoch, before any server writes",
                "(part of pchat pool failover)".into(),
                Service::Keeps,
            ),
            FailoverStep::BackupMirror => d(
                "backup-mirror",
                "attach the backup site's mirror",
                format!("pchat --in-pool {pool} db mirror add --site {b}"),
                Service::Keeps,
            ),
            FailoverStep::Activate => d(
                "activate",
                "pool state FailedOver, active servers in the backup site",
                format!(
                    "pchat pool set-state {pool} failed-over; pchat pool set-active-servers {pool} {}",
                    self.servers.join(" ")
                ),
                Service::Resumes,
            ),
        }
    }

    /// Whether an earlier run of this procedure promoted the backup (its id epoch is drawn
    /// right before the fences and the promotion).
    fn promoted_by_us(&self) -> bool {
        self.rec.id_epoch.is_some()
    }

    async fn copy(&mut self, progress: &mut (dyn FnMut(&str) + Send)) -> Result<(), DrError> {
        if self.bc.status().await?.role != Role::Standby {
            return Ok(());
        }
        let run = self.bc.copy_now().await?;
        progress(&format!("copied {} file(s)", run.copied));
        if let Some(e) = &run.error {
            progress(&format!("the copy job stopped short: {e}"));
            self.shipping_error = Some(e.clone());
        }
        Ok(())
    }

    async fn replay(&mut self, progress: &mut (dyn FnMut(&str) + Send)) -> Result<(), DrError> {
        let ctx = self.ctx;
        if self.bc.status().await?.role != Role::Standby {
            return Ok(());
        }
        let quiet = Duration::from_millis(self.limits.replay_quiet_ms);
        let deadline = Instant::now() + Duration::from_millis(self.limits.replay_timeout_ms);
        let mut last = (None, Instant::now());
        loop {
            let s = self.bc.status().await?;
            let restore = s.log_shipping.as_ref().and_then(|l| l.restore.as_ref());
            let pending = restore.map_or(0, |r| r.pending);
            if let Some(why) = restore.and_then(|r| r.diverged.as_deref()) {
                return Err(DrError::Refused(format!(
                    "the backup database cannot become the principal: {why}. Nothing was changed"
                )));
            }
            if last.0 != s.replay_lsn {
                last = (s.replay_lsn.clone(), Instant::now());
            }
            // Replay has used every copied segment and stood still through two of
            // PostgreSQL's retries of the next one (wal_retrieve_retry_interval = 1 s).
            if pending == 0 && last.1.elapsed() > quiet {
                break;
            }
            if Instant::now() > deadline {
                return Err(DrError::Timeout(format!(
                    "the backup database did not finish applying the copied WAL within {} ms ({pending} segment(s) pending, replay at {}); nothing else was changed — run `pchat pool failover` again",
                    self.limits.replay_timeout_ms,
                    s.replay_lsn.as_deref().unwrap_or("?")
                )));
            }
            tokio::time::sleep(self.limits.poll()).await;
        }
        let replayed_at = self
            .bc
            .status()
            .await?
            .log_shipping
            .and_then(|l| l.restore)
            .and_then(|r| rfc3339_s(r.last_commit_at.as_deref()));
        // The epoch the backup's ids continue in, drawn before anything changes (kept in
        // the record, so a resumed run raises this one rather than draw another).
        let epoch = ids::draw(ctx, &self.bc, "pool failover").await?;
        self.rec.backup_last_commit_us = replayed_at.map(|s| (s * 1e6) as i64);
        self.rec.backup_interval_s = self.shipping.as_ref().map(|r| r.backup_interval_s);
        self.rec.copy_interval_s = self.shipping.as_ref().map(|r| r.copy_interval_s);
        self.rec.id_epoch = Some(epoch);
        self.save_record().await?;
        // The data-loss window: what the servers acknowledged against what was replayed.
        let t = self.view.topology.clone();
        self.lost = loss_now(ctx, &t, &self.primary, &self.bc, self.shipping.as_ref()).await?;
        progress(&format!(
            "lost: at least {} acknowledged message(s), at most {} (window {:.1} s){}",
            self.lost.at_least(),
            self.lost
                .estimate
                .at_most
                .map_or("unknown".into(), |m| m.to_string()),
            self.lost.window_s,
            if self.lost.estimate.notes.is_empty() {
                String::new()
            } else {
                format!("; {}", self.lost.estimate.notes.join("; "))
            }
        ));
        Ok(())
    }

    async fn fence(&mut self, progress: &mut (dyn FnMut(&str) + Send)) -> Result<(), DrError> {
        let ctx = self.ctx;
        let primary = &self.primary;
        let bs = self.bc.status().await?;
        let fence = Fence {
            by: bs.instance.clone(),
            epoch: self.view.state.epoch + 1,
            at: api::now_rfc3339(),
        };
        let json = serde_json::to_vec(&fence).unwrap_or_default();
        let mut names: Vec<String> = Vec::new();
        if let Some(r) = &self.shipping {
            names.extend(r.source_instances.iter().cloned());
        }
        let (rec, rev) = mirroring::read_record(&ctx.etcd, &ctx.pool, &primary.name).await?;
        if let Some(mut rec) = rec {
            names.push(rec.principal.instance.clone());
            if let Some(m) = &rec.mirror {
                names.push(m.instance.clone());
            }
            // No automatic failover inside a site that has been failed over from.
            rec.safety = Safety::Off;
            rec.epoch += 1;
            rec.changed_at = api::now_rfc3339();
            rec.note = format!("site failed over to {}", self.backup_site.name);
            let j = serde_json::to_vec(&rec).unwrap_or_default();
            let _ = ctx
                .etcd
                .compare_and_put(&keys::mirroring(&ctx.pool, &primary.name), rev, &j)
                .await?;
        }
        for db in std::iter::once(&primary.database).chain(primary.mirror.iter()) {
            if let Ok(s) = client(ctx, db).status().await {
                names.push(s.instance.clone());
                // A primary database still running (a partition, not a loss) stops now.
                if s.role == Role::Principal {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(self.limits.primary_stop_timeout_ms),
                        client(ctx, db).stop(true),
                    )
                    .await;
                }
            }
        }
        names.sort();
        names.dedup();
        // Never the backup itself (a resumed run after its promotion).
        names.retain(|n| *n != bs.instance);
        for n in &names {
            ctx.etcd.put(&keys::fence(&ctx.pool, n), &json).await?;
        }
        progress(&format!("fenced: {}", names.join(", ")));
        Ok(())
    }

    async fn promote(&mut self, _: &mut (dyn FnMut(&str) + Send)) -> Result<(), DrError> {
        let ctx = self.ctx;
        let bs = self.bc.status().await?;
        self.bc.set_log_shipping(&ShippingRole::None).await?;
        // Its own fence (from an earlier failback) goes first: an agent stops a fenced
        // instance it finds running as a principal, so clearing it after the promotion
        // would race the agent's check.
        ctx.etcd
            .put(&keys::fence(&ctx.pool, &bs.instance), b"null")
            .await?;
        self.bc.promote().await?;
        Ok(())
    }

    async fn save_record(&self) -> Result<(), DrError> {
        let j = serde_json::to_vec(&self.rec).map_err(|e| PoolError::Corrupt(e.to_string()))?;
        self.ctx
            .etcd
            .put(&keys::failover(&self.ctx.pool), &j)
            .await?;
        Ok(())
    }
}

impl steps::Procedure for Failover<'_> {
    type Error = DrError;

    fn plan(&self) -> &[StepDef] {
        &self.plan
    }

    fn record(&mut self) -> &mut RunRecord {
        &mut self.rec.run
    }

    async fn save(&mut self) -> Result<(), DrError> {
        self.save_record().await
    }

    async fn precondition(&mut self, step: usize) -> Result<Check, DrError> {
        let ctx = self.ctx;
        let promoted = self.already || self.promoted_by_us();
        Ok(match self.kinds[step] {
            FailoverStep::Promote => {
                let bs = match self.bc.status().await {
                    Ok(s) => s,
                    Err(e) => {
                        return Ok(Check::Fails(format!(
                            "the agent of the backup database does not answer ({e})"
                        )))
                    }
                };
                if promoted {
                    Check::Holds
                } else if bs.role != Role::Standby {
                    // Only a database this procedure promoted is taken as done: a backup
                    // database that is a principal for another reason (never seeded,
                    // restored by hand) may be empty.
                    Check::Fails(format!(
                        "the backup database {} is {:?}, not a log-shipping standby: there is nothing to fail over to \
                         (configure log shipping with `pchat db log-shipping configure` while the primary site runs)",
                        bs.instance, bs.role
                    ))
                } else if self
                    .shipping
                    .as_ref()
                    .is_none_or(|r| r.to_site != self.backup_site.name)
                {
                    Check::Fails(format!(
                        "log shipping to site {} is not configured: the backup database may be far behind",
                        self.backup_site.name
                    ))
                } else {
                    Check::Holds
                }
            }
            FailoverStep::IdEpoch if promoted => match self.bc.status().await {
                Ok(s) if s.role == Role::Principal => Check::Holds,
                Ok(s) => Check::Fails(format!(
                    "the backup database {} is {:?}: start it (as it was) and run the command again",
                    s.instance, s.role
                )),
                Err(e) => Check::Fails(format!(
                    "the agent of the backup database does not answer ({e})"
                )),
            },
            FailoverStep::Activate => {
                // The servers chosen must be valid for state FailedOver.
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                let mut probe = view.clone();
                probe.state.state = PoolStateKind::FailedOver;
                match pool::plan_active(
                    &probe,
                    &pool::ActiveChange::Set(self.servers.clone()),
                    false,
                ) {
                    Ok(_) => Check::Holds,
                    Err(e) => Check::Fails(e.to_string()),
                }
            }
            _ => Check::Holds,
        })
    }

    async fn done(&mut self, step: usize) -> Result<bool, DrError> {
        let ctx = self.ctx;
        Ok(match self.kinds[step] {
            FailoverStep::Promote => self.bc.status().await?.role == Role::Principal,
            FailoverStep::Activate => {
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                view.state.state == PoolStateKind::FailedOver
                    && !view.state.active_servers.is_empty()
            }
            _ => false,
        })
    }

    async fn run(
        &mut self,
        step: usize,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), DrError> {
        let ctx = self.ctx;
        let mut sub = |l: &str| progress(&format!("  {l}"));
        match self.kinds[step] {
            FailoverStep::Copy => self.copy(&mut sub).await?,
            FailoverStep::Replay => self.replay(&mut sub).await?,
            FailoverStep::Fence => self.fence(&mut sub).await?,
            FailoverStep::Promote => self.promote(&mut sub).await?,
            FailoverStep::IdEpoch => {
                // Before any server writes: ids above every id the lost site could have
                // handed out.
                let mut epoch = self.rec.id_epoch;
                raise_failover_epoch(ctx, &self.bc, &mut epoch, &mut sub).await?;
                if epoch != self.rec.id_epoch {
                    self.rec.id_epoch = epoch;
                    self.save_record().await?;
                }
                if self.shipping.is_some() {
                    // Shipping from the lost site is over; failback configures it anew.
                    ctx.etcd.delete(&keys::log_shipping(&ctx.pool)).await?;
                }
            }
            FailoverStep::BackupMirror => {
                // Whatever the backup site's mirror holds is older than the promoted
                // database: it is re-seeded from it.
                match mirror::add(ctx, Some(&self.backup_site.name), true, &mut sub).await {
                    Ok(_) => self.mirror_attached = true,
                    Err(e) => sub(&format!(
                        "the mirror could not be attached ({e}); serving without it — run `pchat --in-pool {} db mirror add --site {}` later",
                        ctx.pool, self.backup_site.name
                    )),
                }
            }
            FailoverStep::Activate => {
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                sub(&format!("active servers {}", self.servers.join(", ")));
                set_state_and_servers(ctx, &view, PoolStateKind::FailedOver, self.servers.clone())
                    .await?;
            }
        }
        Ok(())
    }
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
    let bdb = mirror::current_principal(ctx, Some(&backup_site.name)).await?;
    let bc = client(ctx, &bdb);
    let (shipping, _) = logship::read_record(ctx).await?;
    let saved: Option<FailoverRecord> = ctx
        .etcd
        .get(&keys::failover(&ctx.pool))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let already = view.state.state == PoolStateKind::FailedOver;
    let mut kinds = vec![
        FailoverStep::Copy,
        FailoverStep::Replay,
        FailoverStep::Fence,
        FailoverStep::Promote,
        FailoverStep::IdEpoch,
    ];
    if !opts.no_mirror && backup_site.mirror.is_some() {
        kinds.push(FailoverStep::BackupMirror);
    }
    kinds.push(FailoverStep::Activate);
    let mut fo = Failover {
        ctx,
        limits: opts.limits.clone(),
        kinds,
        plan: Vec::new(),
        rec: saved.unwrap_or_else(|| FailoverRecord {
            at: api::now_rfc3339(),
            backup_last_commit_us: None,
            backup_interval_s: None,
            copy_interval_s: None,
            id_epoch: None,
            run: RunRecord::default(),
        }),
        view,
        primary,
        backup_site,
        bc,
        servers,
        shipping,
        already,
        shipping_error: None,
        lost: LossNow::default(),
        mirror_attached: false,
    };
    fo.plan = fo.kinds.iter().map(|k| fo.def(*k)).collect();
    if opts.dry_run {
        let planned = steps::plan(&mut fo).await?;
        // The same estimate as the failover makes, on what the backup holds now (the
        // failover first applies what is still copied but not replayed: its figures can
        // only be lower).
        let t = fo.view.topology.clone();
        let mut now = loss_now(ctx, &t, &fo.primary, &fo.bc, fo.shipping.as_ref()).await?;
        if let Ok(s) = fo.bc.status().await {
            let l = s.log_shipping.as_ref();
            let copy = l.and_then(|l| l.copy.as_ref()).map_or(0, |c| c.pending);
            let replay = l.and_then(|l| l.restore.as_ref()).map_or(0, |r| r.pending);
            if copy + replay > 0 {
                now.estimate.notes.push(format!(
                    "{copy} shipped segment(s) not copied yet and {replay} copied but not applied: the failover applies them first, which can only lower these figures"
                ));
            }
        }
        return Ok(FailoverReport {
            steps: planned.steps,
            site: fo.backup_site.name.clone(),
            principal: fo.backup_site.database.address.clone(),
            lost_messages_at_least: now.at_least(),
            lost_messages_at_most: now.estimate.at_most,
            loss: now.estimate,
            id_epoch: None,
            lost_window_s: now.window_s,
            shipping_error: None,
            mirror_attached: false,
            active_servers: fo.servers.clone(),
            total_ms: 0,
        });
    }
    let out = steps::run(&mut fo, progress).await?;
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let principal = fo.bc.status().await.map(|s| s.instance).unwrap_or_default();
    let report = FailoverReport {
        steps: out.steps,
        site: fo.backup_site.name.clone(),
        principal,
        lost_messages_at_least: fo.lost.at_least(),
        lost_messages_at_most: fo.lost.estimate.at_most,
        loss: fo.lost.estimate,
        id_epoch: fo.rec.id_epoch,
        lost_window_s: fo.lost.window_s,
        shipping_error: fo.shipping_error,
        mirror_attached: fo.mirror_attached,
        active_servers: view.state.active_servers,
        total_ms: started.elapsed().as_millis() as u64,
    };
    crate::overview::record_finished(&ctx.etcd, &ctx.pool, "failover", &report, progress).await;
    Ok(report)
}

/// A failover's loss figures as things are now.
#[derive(Debug, Default)]
struct LossNow {
    /// From the servers' marks.
    estimate: LossEstimate,
    /// What the primary's agent last counted beyond the backup (committed messages, by its
    /// last status): the lower bound when no server published marks.
    counted: Option<u64>,
    /// From the last commit the backup replayed to the primary's last status.
    window_s: f64,
}

impl LossNow {
    fn at_least(&self) -> u64 {
        if self.estimate.servers.is_empty() {
            self.counted.unwrap_or(0)
        } else {
            self.estimate.at_least
        }
    }
}

/// The loss figures of failing over to the database behind `bc` now: the bounds from the
/// servers' marks, and the primary's last reported count and time against the backup's.
/// One function for `--dry-run` and the failover, so both say the same.
async fn loss_now(
    ctx: &Ctx,
    t: &Topology,
    primary: &Site,
    bc: &AgentClient,
    record: Option<&ShippingRecord>,
) -> Result<LossNow, DrError> {
    // A failover never fails for want of an estimate: it says why there is none.
    let estimate = match loss::estimate(ctx, t, bc).await {
        Ok(e) => e,
        Err(e) => LossEstimate {
            notes: vec![format!("no bounds: {e}")],
            ..LossEstimate::default()
        },
    };
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
        if let (Some(r), _) = mirroring::read_record(&ctx.etcd, &ctx.pool, &primary.name).await? {
            primary_last = last_principal_status(ctx, &r.principal.instance).await;
        }
    }
    if primary_last.is_none() {
        if let Some(r) = record {
            for a in &r.sources {
                // URLs from etcd: only an agent the topology names is asked.
                if let Ok(s) = ctx.agents.by_url(t, a).status().await {
                    if s.role == Role::Principal {
                        primary_last = Some(s);
                    }
                }
            }
        }
    }
    let mut now = LossNow {
        estimate,
        ..LossNow::default()
    };
    if let Some(p) = &primary_last {
        let counted = p.messages.unwrap_or(0).saturating_sub(backup_messages);
        now.counted = Some(counted);
        let last_replayed = after
            .log_shipping
            .as_ref()
            .and_then(|l| l.restore.as_ref())
            .and_then(|r| rfc3339_s(r.last_commit_at.as_deref()));
        if let (Some(a), Some(b)) = (rfc3339_s(Some(&p.at)), last_replayed) {
            let lost = counted > 0 || now.estimate.at_least > 0;
            now.window_s = if lost { (a - b).max(0.0) } else { 0.0 };
            if lost && a < b {
                // Commit times come from the principal's clock: one stepped forward then
                // back stamps commits in the future of its later reports.
                now.estimate.notes.push(format!(
                    "the loss window is unknown: the backup's last replayed commit is stamped {:.1} s after the primary's last report (a clock step on the primary's host?)",
                    b - a
                ));
            }
        }
    }
    Ok(now)
}

/// Raises the promoted backup to the failover's id epoch (drawing one if the record of an
/// older run has none).
async fn raise_failover_epoch(
    ctx: &Ctx,
    bc: &AgentClient,
    epoch: &mut Option<u64>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), DrError> {
    match *epoch {
        Some(e) => {
            let now = ids::raise(bc, e).await?;
            progress(&format!(
                "  message ids continue in epoch {now} (above {}): none the lost site handed out is used again",
                pchat_store::ids::epoch_base(now)
            ));
            *epoch = Some(now);
        }
        None => *epoch = Some(ids::advance(ctx, bc, "pool failover", progress).await?),
    }
    Ok(())
}
