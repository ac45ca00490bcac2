//! Log shipping between the sites, driven through the agents (`pchat db log-shipping
//! configure|remove|status|preflight|pause|resume`). The jobs themselves run in the agents
//! (`pchat-agent`'s `shipping`); this module decides who plays which role, seeds the secondary
//! and reports.
//!
//! The configuration is one etcd key, `/pchat/pools/P/log-shipping` ([`ShippingRecord`]).
//! Each configuration ships into its own directory of the share, `SHARE/wal/ID`, so the WAL
//! of an older configuration (another timeline, before a failback) can never be mistaken
//! for this one's.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use pchat_agent_api::shipping::{Check, PreflightRequest, ShippingRole, ShippingStatus};
use pchat_agent_api::{
    self as api, parse_lsn, AgentClient, BackupRequest, ClientError, RestoreRequest, Role, Status,
};
use pchat_control::mirroring::{self, Safety};
use pchat_control::postgres::PgRole;
use pchat_control::topology::{Database, SiteRole, Topology};
use pchat_control::{keys, pool, EtcdError, PoolError};

use crate::mirror::{self, Ctx, MirrorError};
use crate::steps::{self, Limits, RunRecord, Service, StepDef};

/// Why a log-shipping procedure stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShippingError {
    /// The pool could not be read or changed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// An agent failed or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Mirroring information could not be read.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// Not possible as things are; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// The step runner refused (a precondition, such as the preflight: nothing was
    /// changed) or stopped (a postcondition).
    #[error(transparent)]
    Run(#[from] crate::steps::RunError),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
}

/// `/pchat/pools/P/log-shipping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingRecord {
    /// Names the configuration and its directory in the share.
    pub id: String,
    /// The site whose principal (and mirror) ship.
    pub from_site: String,
    /// The site whose database copies and restores.
    pub to_site: String,
    /// The source instances (agent URLs), principal first.
    pub sources: Vec<String>,
    /// Their instance names (a DR failover fences them).
    #[serde(default)]
    pub source_instances: Vec<String>,
    /// The secondary's agent URL.
    pub secondary: String,
    /// `SHARE/wal/ID`.
    pub share_dir: String,
    /// The secondary's copy directory.
    pub copy_dir: String,
    /// Segment switch at least this often.
    pub backup_interval_s: u64,
    /// The copy job's period.
    pub copy_interval_s: u64,
    /// Restore delay.
    pub restore_delay_s: u64,
    /// `status` alerts when the secondary is further behind than this.
    pub alert_lag_s: u64,
    /// `configuring` until the secondary has replayed shipped WAL, then `active`.
    pub state: String,
    /// RFC 3339.
    pub configured_at: String,
}

/// What `configure` takes.
#[derive(Clone, Debug)]
pub struct ConfigureOptions {
    /// The shipping site (default: the authoritative one).
    pub from_site: Option<String>,
    /// The receiving site (default: the other one).
    pub to_site: Option<String>,
    /// Default 60.
    pub backup_interval_s: u64,
    /// Default 5.
    pub copy_interval_s: u64,
    /// Default 0.
    pub restore_delay_s: u64,
    /// Default: 3 × backup interval + copy interval + delay.
    pub alert_lag_s: Option<u64>,
    /// The bounds of the waits.
    pub limits: Limits,
}

impl Default for ConfigureOptions {
    fn default() -> Self {
        ConfigureOptions {
            from_site: None,
            to_site: None,
            backup_interval_s: 60,
            copy_interval_s: 5,
            restore_delay_s: 0,
            alert_lag_s: None,
            limits: Limits::default(),
        }
    }
}

/// One side in a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Party {
    /// The agent.
    pub agent: String,
    /// Its status, when it answered.
    pub status: Option<Status>,
    /// Why not.
    pub error: Option<String>,
}

/// `pchat db log-shipping status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShippingReport {
    /// The configuration (`None`: not configured).
    pub record: Option<ShippingRecord>,
    /// The shipping principal.
    pub source: Option<Party>,
    /// The secondary.
    pub secondary: Option<Party>,
    /// WAL written on the source and not replayed on the secondary.
    pub lag_bytes: u64,
    /// Messages the source has and the secondary has not replayed.
    pub lag_messages: u64,
    /// How old the secondary's data is when it is behind (0 when it is current).
    pub lag_seconds: f64,
    /// Every alert, the agents' included.
    pub alerts: Vec<String>,
}

/// The configuration and its etcd revision (0: none).
pub async fn read_record(ctx: &Ctx) -> Result<(Option<ShippingRecord>, i64), ShippingError> {
    match ctx.etcd.get(&keys::log_shipping(&ctx.pool)).await? {
        Some(kv) => Ok((
            Some(
                serde_json::from_slice(&kv.value)
                    .map_err(|e| PoolError::Corrupt(format!("log-shipping record: {e}")))?,
            ),
            kv.mod_revision,
        )),
        None => Ok((None, 0)),
    }
}

async fn write_record(ctx: &Ctx, rev: i64, r: &ShippingRecord) -> Result<(), ShippingError> {
    let json = serde_json::to_vec(r).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    match ctx.etcd.compare_and_put(&keys::log_shipping(&ctx.pool), rev, &json).await? {
        Some(_) => Ok(()),
        None => Err(ShippingError::Refused(
            "the log-shipping configuration changed while this command ran (another administrator?); run it again".into(),
        )),
    }
}

/// Shows an agent job's steps as indented progress lines.
pub(crate) fn job_lines<'a>(
    progress: &'a mut (dyn FnMut(&str) + Send),
) -> impl FnMut(&api::Job) + Send + 'a {
    move |j: &api::Job| {
        progress(&match j.percent {
            Some(p) => format!("  {}: {} ({p}%)", j.kind, j.step),
            None => format!("  {}: {}", j.kind, j.step),
        })
    }
}

/// The agent of `db`, an instance of the topology.
fn client(ctx: &Ctx, db: &Database) -> AgentClient {
    ctx.agents.instance(db)
}

/// The agent at `url`, read from the log-shipping record in etcd: asked only if the topology
/// `t` names it (a URL planted there gets nothing).
fn client_at(ctx: &Ctx, t: &Topology, url: &str) -> AgentClient {
    ctx.agents.by_url(t, url)
}

/// The sites of a configuration: `from` defaults to the authoritative site, `to` to the other.
fn sites(
    t: &Topology,
    state: pool::PoolStateKind,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(String, String), ShippingError> {
    let known = || {
        t.sites
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let from = match from {
        Some(f) => f.to_owned(),
        None => t
            .authoritative_site(state)
            .map(|s| s.name.clone())
            .ok_or_else(|| ShippingError::Refused("the pool has no authoritative site".into()))?,
    };
    let to = match to {
        Some(x) => x.to_owned(),
        None => t
            .sites
            .iter()
            .find(|s| s.name != from)
            .map(|s| s.name.clone())
            .ok_or_else(|| {
                ShippingError::Refused(format!(
                    "log shipping needs a second site; the topology has only {}",
                    known()
                ))
            })?,
    };
    for s in [&from, &to] {
        if !t.sites.iter().any(|x| &x.name == s) {
            return Err(ShippingError::Refused(format!(
                "pool has no site `{s}` (sites: {})",
                known()
            )));
        }
    }
    if from == to {
        return Err(ShippingError::Refused(format!(
            "log shipping from site {from} to itself: give two different sites"
        )));
    }
    Ok((from, to))
}

/// The instances that ship from `site` (principal first, then its mirror if any), and the
/// database that receives in `to` (its current principal).
async fn parties(
    ctx: &Ctx,
    t: &Topology,
    from: &str,
    to: &str,
) -> Result<(Vec<Database>, Database, String), ShippingError> {
    let principal = mirror::current_principal(ctx, Some(from)).await?;
    let mut sources = vec![principal.clone()];
    let (record, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, from).await?;
    let site = t
        .site(from)
        .ok_or_else(|| ShippingError::Refused(format!("the topology has no site `{from}`")))?;
    let mirror_db = match record {
        Some(r) if r.safety != Safety::Off => r
            .mirror
            .map(|m| mirroring::site_instance(site, &m).cloned())
            .transpose()?,
        Some(_) => None,
        None => site.mirror.clone(),
    };
    if let Some(m) = mirror_db.filter(|m| m.agent != principal.agent) {
        sources.push(m);
    }
    let secondary = mirror::current_principal(ctx, Some(to)).await?;
    let copy_dir = t
        .sites
        .iter()
        .find(|s| s.name == to)
        .and_then(|s| s.copy_dir.clone())
        .ok_or_else(|| {
            ShippingError::Refused(format!(
                "site {to} has no copy_dir in the topology: add `copy_dir = \"/var/lib/pchat/logship-copy\"` (a local directory on {}'s host) to its [[sites]] entry and publish it",
                secondary.address
            ))
        })?;
    Ok((sources, secondary, copy_dir))
}

fn render_checks(checks: &[(String, Check)]) -> Option<String> {
    let bad: Vec<String> = checks
        .iter()
        .filter(|(_, c)| !c.ok)
        .map(|(who, c)| {
            format!(
                "  {who}: {} — NO: {}",
                c.what,
                c.fix.as_deref().unwrap_or("grant it")
            )
        })
        .collect();
    (!bad.is_empty()).then(|| bad.join("\n"))
}

/// The preflight of a configuration: the secondary's OS user can read the share and write
/// its copy directory; the sources' can write the share. Returns every check.
pub async fn preflight(
    ctx: &Ctx,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<Vec<(String, Check)>, ShippingError> {
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let t = &view.topology;
    let (from, to) = sites(t, view.state.state, from, to)?;
    let (sources, secondary, copy_dir) = parties(ctx, t, &from, &to).await?;
    let mut out = Vec::new();
    let wal = format!("{}/wal", t.share.trim_end_matches('/'));
    let sc = client(ctx, &secondary);
    for c in sc
        .preflight(&PreflightRequest {
            read: vec![t.share.clone()],
            write: vec![copy_dir.clone()],
        })
        .await?
    {
        out.push((format!("secondary {} (site {to})", secondary.address), c));
    }
    for (i, s) in sources.iter().enumerate() {
        let who = format!(
            "{} {} (site {from})",
            if i == 0 { "principal" } else { "mirror" },
            s.address
        );
        match client(ctx, s)
            .preflight(&PreflightRequest {
                read: vec![],
                write: vec![wal.clone()],
            })
            .await
        {
            Ok(cs) => out.extend(cs.into_iter().map(|c| (who.clone(), c))),
            // A mirror that is down is not needed to ship; the principal is.
            Err(e) if i > 0 => out.push((
                who,
                Check {
                    what: "agent reachable".into(),
                    ok: true,
                    fix: Some(format!("not reachable now ({e}); it ships once it is back")),
                },
            )),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The steps of `db log-shipping configure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConfigureStep {
    Record,
    Sources,
    Seed,
    FirstShipment,
    Activate,
}

/// `db log-shipping configure` as a procedure on the step runner. It keeps no record of
/// its own: the configuration record is its progress, and every step is harmless to
/// repeat (a re-run finishes an interrupted one), so the runner's record stays in memory.
struct Configure<'a> {
    ctx: &'a Ctx,
    opts: &'a ConfigureOptions,
    run: RunRecord,
    kinds: Vec<ConfigureStep>,
    plan: Vec<StepDef>,
    from: String,
    to: String,
    share: String,
    sources: Vec<Database>,
    secondary: Database,
    copy_dir: String,
    share_dir: String,
    record: ShippingRecord,
    rev: i64,
    pc: AgentClient,
    sc: AgentClient,
    start_lsn: Option<String>,
}

impl Configure<'_> {
    fn def(&self, k: ConfigureStep) -> StepDef {
        let d = |name, what: String| StepDef {
            name,
            what,
            command: "(part of pchat db log-shipping configure)".into(),
            service: Service::Keeps,
            observable: false,
        };
        let (from, to) = (&self.from, &self.to);
        match k {
            ConfigureStep::Record => d(
                "record",
                format!("write the configuration {from} → {to} (`/pchat/pools/P/log-shipping`)"),
            ),
            ConfigureStep::Sources => d(
                "sources",
                format!(
                    "backup job: site {from}'s principal and mirror archive their WAL into {} (segment switch at least every {} s)",
                    self.share_dir, self.opts.backup_interval_s
                ),
            ),
            ConfigureStep::Seed => d(
                "seed",
                format!(
                    "seed the secondary {}: a full backup of the principal restored WITH NORECOVERY; copy and restore jobs",
                    self.secondary.address
                ),
            ),
            ConfigureStep::FirstShipment => d(
                "first-shipment",
                "close the principal's current segment; wait until the secondary has replayed shipped WAL".into(),
            ),
            ConfigureStep::Activate => d("activate", "the configuration is active".into()),
        }
    }

    async fn write(&mut self) -> Result<(), ShippingError> {
        write_record(self.ctx, self.rev, &self.record).await?;
        self.rev = read_record(self.ctx).await?.1;
        Ok(())
    }
}

impl steps::Procedure for Configure<'_> {
    type Error = ShippingError;

    fn plan(&self) -> &[StepDef] {
        &self.plan
    }

    fn record(&mut self) -> &mut RunRecord {
        &mut self.run
    }

    async fn save(&mut self) -> Result<(), ShippingError> {
        Ok(())
    }

    async fn precondition(&mut self, step: usize) -> Result<steps::Check, ShippingError> {
        let ctx = self.ctx;
        Ok(match self.kinds[step] {
            ConfigureStep::Record => {
                let checks = preflight(ctx, Some(&self.from), Some(&self.to)).await?;
                match render_checks(&checks) {
                    Some(bad) => steps::Check::Fails(format!("preflight failed:\n{bad}")),
                    None => steps::Check::Holds,
                }
            }
            ConfigureStep::Sources => match self.pc.status().await {
                Ok(ps) if ps.role == Role::Principal => steps::Check::Holds,
                Ok(ps) => steps::Check::Fails(format!(
                    "{} in site {} is {:?}, not a running principal: nothing ships from it",
                    ps.instance, self.from, ps.role
                )),
                Err(e) => steps::Check::Fails(format!(
                    "the agent of site {}'s principal does not answer ({e})",
                    self.from
                )),
            },
            ConfigureStep::Seed => {
                let (ps, ss) = match (self.pc.status().await, self.sc.status().await) {
                    (Ok(p), Ok(s)) => (p, s),
                    (_, Err(e)) | (Err(e), _) => {
                        return Ok(steps::Check::Fails(format!(
                            "an agent does not answer ({e})"
                        )))
                    }
                };
                match ss.messages.zip(ps.messages).filter(|(s, p)| s > p) {
                    Some(m)
                        if ss.role == Role::Principal
                            && ss.system_identifier == ps.system_identifier =>
                    {
                        steps::Check::Fails(format!(
                            "{} in site {} is a running principal with {} messages, more than {}'s {}: making it a log-shipping secondary would discard them. \
                             Fail back first (`pchat pool failback`), or stop it if that is intended",
                            ss.instance, self.to, m.0, ps.instance, m.1
                        ))
                    }
                    _ => steps::Check::Holds,
                }
            }
            ConfigureStep::FirstShipment | ConfigureStep::Activate => steps::Check::Holds,
        })
    }

    async fn done(&mut self, _: usize) -> Result<bool, ShippingError> {
        Ok(false)
    }

    async fn run(
        &mut self,
        step: usize,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), ShippingError> {
        let ctx = self.ctx;
        let opts = self.opts;
        match self.kinds[step] {
            ConfigureStep::Record => self.write().await?,
            ConfigureStep::Sources => {
                // The backup site's instances come from this principal's data: its
                // replication role goes with it, so that the backup site's mirror can be
                // attached after a failover.
                let (password, _) = pchat_control::postgres::ensure_password(
                    &ctx.etcd,
                    &ctx.pool,
                    PgRole::Replication,
                )
                .await?;
                self.pc
                    .set_role_password(PgRole::Replication, &password)
                    .await?;
                // The share directory of this configuration, created as the source's OS user.
                self.pc
                    .preflight(&PreflightRequest {
                        read: vec![],
                        write: vec![self.share_dir.clone()],
                    })
                    .await?;
                let source_role = ShippingRole::Source {
                    share_dir: self.share_dir.clone(),
                    backup_interval_s: opts.backup_interval_s,
                    retention_h: 72,
                };
                let mut names = Vec::new();
                for s in &self.sources {
                    if let Ok(st) = client(ctx, s).status().await {
                        names.push(st.instance);
                    }
                }
                if names != self.record.source_instances {
                    self.record.source_instances = names;
                    self.write().await?;
                }
                for (i, s) in self.sources.iter().enumerate() {
                    progress(&format!("  {} archives into {}", s.address, self.share_dir));
                    match client(ctx, s).set_log_shipping(&source_role).await {
                        Ok(()) => {}
                        Err(e) if i > 0 => progress(&format!(
                            "  mirror {} not reachable ({e}); it will archive once configured again",
                            s.address
                        )),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            ConfigureStep::Seed => {
                let ps = self.pc.status().await?;
                let ss = self.sc.status().await?;
                let already = self.record.state == "active"
                    && ss.role == Role::Standby
                    && ss.system_identifier == ps.system_identifier;
                let secondary_role = |start_lsn: Option<String>| ShippingRole::Secondary {
                    share_dir: self.share_dir.clone(),
                    copy_dir: self.copy_dir.clone(),
                    copy_interval_s: opts.copy_interval_s,
                    restore_delay_s: opts.restore_delay_s,
                    start_lsn,
                    copy_paused: false,
                };
                if already {
                    progress(&format!(
                        "  {} is already this configuration's secondary: roles re-applied",
                        ss.instance
                    ));
                    if let Some(ShippingRole::Secondary { start_lsn: s, .. }) =
                        ss.log_shipping.as_ref().map(|l| l.role.clone())
                    {
                        self.start_lsn = s;
                    }
                    self.sc
                        .set_log_shipping(&secondary_role(self.start_lsn.clone()))
                        .await?;
                } else {
                    let name = format!(
                        "logship-{}-{}",
                        self.record.id,
                        time::OffsetDateTime::now_utc().unix_timestamp()
                    );
                    progress(&format!(
                        "  full backup of {} to {}/{name}",
                        ps.instance, self.share
                    ));
                    let mut lines = |l: &str| progress(&format!("  {l}"));
                    let manifest = self
                        .pc
                        .backup(
                            &BackupRequest {
                                to: self.share.clone(),
                                name: name.clone(),
                                description: Some(format!(
                                    "seed of log shipping {}",
                                    self.record.id
                                )),
                            },
                            &mut job_lines(&mut lines),
                        )
                        .await?;
                    self.start_lsn = manifest.start_lsn.clone();
                    progress(&format!(
                        "  copy and restore jobs on {}: {} → {} every {} s, restore delay {} s",
                        self.secondary.address,
                        self.share_dir,
                        self.copy_dir,
                        opts.copy_interval_s,
                        opts.restore_delay_s
                    ));
                    self.sc
                        .set_log_shipping(&secondary_role(self.start_lsn.clone()))
                        .await?;
                    progress(&format!(
                        "  restoring {name} over {} WITH NORECOVERY",
                        ss.instance
                    ));
                    let mut lines = |l: &str| progress(&format!("  {l}"));
                    self.sc
                        .restore(
                            &RestoreRequest {
                                from: format!("{}/{name}", self.share.trim_end_matches('/')),
                                overwrite: true,
                                recovery: false,
                            },
                            &mut job_lines(&mut lines),
                        )
                        .await?;
                }
            }
            ConfigureStep::FirstShipment => {
                self.pc.switch_wal().await?;
                let start = self.start_lsn.as_deref().and_then(parse_lsn).unwrap_or(0);
                let timeout = Duration::from_millis(opts.limits.first_replay_timeout_ms);
                let deadline = Instant::now() + timeout;
                loop {
                    let s = self.sc.status().await?;
                    let replayed = s.replay_lsn.as_deref().and_then(parse_lsn).unwrap_or(0);
                    let copied = s
                        .log_shipping
                        .as_ref()
                        .and_then(|l| l.copy.as_ref())
                        .is_some_and(|c| c.last_copied.is_some());
                    if s.role == Role::Standby && replayed > start && copied {
                        break;
                    }
                    if Instant::now() > deadline {
                        let alerts = s.log_shipping.map(|l| l.alerts).unwrap_or_default();
                        return Err(ShippingError::Timeout(format!(
                            "the secondary {} has not replayed shipped WAL after {timeout:?} (role {:?}, replay {}){}; see `pchat db log-shipping status`",
                            s.instance,
                            s.role,
                            s.replay_lsn.as_deref().unwrap_or("none"),
                            if alerts.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", alerts.join("; "))
                            }
                        )));
                    }
                    tokio::time::sleep(opts.limits.poll()).await;
                }
            }
            ConfigureStep::Activate => {
                if self.record.state != "active" {
                    self.record.state = "active".into();
                    self.write().await?;
                }
            }
        }
        Ok(())
    }
}

/// Sets up log shipping `from` → `to`: preflight, archiving on the source principal and its
/// mirror, a full backup of the principal restored over the secondary WITH NORECOVERY, the
/// copy and restore jobs; returns when the secondary has replayed shipped WAL. Every step's
/// precondition (the preflight, a running source principal, a secondary that holds nothing
/// the source lacks) is checked before the first step changes anything. Re-running it
/// finishes an interrupted run; on an active configuration between the same sites it
/// re-applies the roles and changes nothing else.
pub async fn configure(
    ctx: &Ctx,
    opts: &ConfigureOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<ShippingReport, ShippingError> {
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let t = view.topology.clone();
    let (from, to) = sites(
        &t,
        view.state.state,
        opts.from_site.as_deref(),
        opts.to_site.as_deref(),
    )?;
    let (sources, secondary, copy_dir) = parties(ctx, &t, &from, &to).await?;
    let (existing, rev) = read_record(ctx).await?;
    let reuse = existing
        .as_ref()
        .filter(|r| r.from_site == from && r.to_site == to && r.secondary == secondary.agent);
    progress(&format!(
        "preflight: the OS users of {} and {} and their access to {}",
        sources[0].address, secondary.address, t.share
    ));
    let id = match reuse {
        Some(r) => r.id.clone(),
        None => format!(
            "{}-{}-to-{}",
            time::OffsetDateTime::now_utc().unix_timestamp(),
            from.to_ascii_lowercase(),
            to.to_ascii_lowercase()
        ),
    };
    let share_dir = format!("{}/wal/{id}", t.share.trim_end_matches('/'));
    let alert_lag_s = opts
        .alert_lag_s
        .unwrap_or(3 * opts.backup_interval_s + opts.copy_interval_s + opts.restore_delay_s);
    let record = ShippingRecord {
        id: id.clone(),
        from_site: from.clone(),
        to_site: to.clone(),
        sources: sources.iter().map(|s| s.agent.clone()).collect(),
        source_instances: Vec::new(),
        secondary: secondary.agent.clone(),
        share_dir: share_dir.clone(),
        copy_dir: copy_dir.clone(),
        backup_interval_s: opts.backup_interval_s,
        copy_interval_s: opts.copy_interval_s,
        restore_delay_s: opts.restore_delay_s,
        alert_lag_s,
        state: reuse.map_or("configuring".into(), |r| r.state.clone()),
        configured_at: api::now_rfc3339(),
    };
    let mut c = Configure {
        ctx,
        opts,
        run: RunRecord::default(),
        kinds: vec![
            ConfigureStep::Record,
            ConfigureStep::Sources,
            ConfigureStep::Seed,
            ConfigureStep::FirstShipment,
            ConfigureStep::Activate,
        ],
        plan: Vec::new(),
        from,
        to,
        share: t.share.clone(),
        pc: client(ctx, &sources[0]),
        sc: client(ctx, &secondary),
        sources,
        secondary,
        copy_dir,
        share_dir,
        record,
        rev,
        start_lsn: None,
    };
    c.plan = c.kinds.iter().map(|k| c.def(*k)).collect();
    steps::run(&mut c, progress).await?;
    progress("log shipping active");
    status(ctx).await
}

async fn party(ctx: &Ctx, t: &Topology, agent: &str) -> Party {
    match client_at(ctx, t, agent).status().await {
        Ok(s) => Party {
            agent: agent.to_owned(),
            status: Some(s),
            error: None,
        },
        Err(e) => Party {
            agent: agent.to_owned(),
            status: None,
            error: Some(e.to_string()),
        },
    }
}

fn age_s(rfc3339: Option<&str>) -> Option<f64> {
    let t = time::OffsetDateTime::parse(rfc3339?, &time::format_description::well_known::Rfc3339)
        .ok()?;
    Some(
        (time::OffsetDateTime::now_utc() - t)
            .as_seconds_f64()
            .max(0.0),
    )
}

/// Both sides' jobs, the lag, and every alert.
pub async fn status(ctx: &Ctx) -> Result<ShippingReport, ShippingError> {
    let (record, _) = read_record(ctx).await?;
    let Some(r) = record else {
        return Ok(ShippingReport {
            record: None,
            source: None,
            secondary: None,
            lag_bytes: 0,
            lag_messages: 0,
            lag_seconds: 0.0,
            alerts: vec![],
        });
    };
    let t = pool::get(&ctx.etcd, &ctx.pool).await?.topology;
    // The shipping principal is whichever source runs as principal now.
    let mut source = None;
    for a in &r.sources {
        let p = party(ctx, &t, a).await;
        let is_principal = p.status.as_ref().is_some_and(|s| s.role == Role::Principal);
        if is_principal || source.is_none() {
            source = Some(p);
        }
        if is_principal {
            break;
        }
    }
    let secondary = party(ctx, &t, &r.secondary).await;
    let mut alerts = Vec::new();
    for p in source.iter().chain(std::iter::once(&secondary)) {
        if let Some(e) = &p.error {
            alerts.push(format!("agent {} does not answer: {e}", p.agent));
        }
        if let Some(l) = p.status.as_ref().and_then(|s| s.log_shipping.as_ref()) {
            alerts.extend(l.alerts.iter().map(|a| format!("{}: {a}", p.agent)));
        }
    }
    let ps = source.as_ref().and_then(|p| p.status.as_ref());
    let ss = secondary.status.as_ref();
    let lag_bytes = match (
        ps.and_then(|s| s.wal_lsn.as_deref()).and_then(parse_lsn),
        ss.and_then(|s| s.replay_lsn.as_deref()).and_then(parse_lsn),
    ) {
        (Some(a), Some(b)) => a.saturating_sub(b),
        _ => 0,
    };
    let lag_messages = match (ps.and_then(|s| s.messages), ss.and_then(|s| s.messages)) {
        (Some(a), Some(b)) => a.saturating_sub(b),
        _ => 0,
    };
    let restore = ss
        .and_then(|s| s.log_shipping.as_ref())
        .and_then(|l| l.restore.as_ref());
    let lag_seconds = if lag_messages > 0 {
        age_s(restore.and_then(|r| r.last_commit_at.as_deref())).unwrap_or(0.0)
    } else {
        0.0
    };
    if lag_seconds > r.alert_lag_s as f64 {
        alerts.push(format!(
            "the secondary is {lag_seconds:.0} s ({lag_messages} messages) behind, over the alert threshold of {} s: check the backup and copy jobs above",
            r.alert_lag_s
        ));
    }
    if ss.is_some_and(|s| s.role != Role::Standby) && r.state == "active" {
        alerts.push(format!(
            "the secondary {} is {:?}, not a restoring standby",
            r.secondary,
            ss.map(|s| s.role)
        ));
    }
    Ok(ShippingReport {
        record: Some(r),
        source,
        secondary: Some(secondary),
        lag_bytes,
        lag_messages,
        lag_seconds,
        alerts,
    })
}

/// Stops log shipping: sources stop archiving, the secondary stops copying and restoring
/// (it stays a standby, SQL Server's RESTORING database) and the record is removed.
pub async fn remove(
    ctx: &Ctx,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), ShippingError> {
    let (record, rev) = read_record(ctx).await?;
    let Some(r) = record else {
        progress("log shipping is not configured: nothing to remove");
        return Ok(());
    };
    let t = pool::get(&ctx.etcd, &ctx.pool).await?.topology;
    for a in r.sources.iter().chain(std::iter::once(&r.secondary)) {
        progress(&format!("{a}: log-shipping role removed"));
        if let Err(e) = client_at(ctx, &t, a)
            .set_log_shipping(&ShippingRole::None)
            .await
        {
            progress(&format!(
                "{a}: not reachable ({e}); its role is cleared when it is configured again"
            ));
        }
    }
    let _ = rev;
    ctx.etcd.delete(&keys::log_shipping(&ctx.pool)).await?;
    Ok(())
}

/// The agent of the record's secondary, checked against the topology.
pub async fn secondary_client(ctx: &Ctx, r: &ShippingRecord) -> Result<AgentClient, ShippingError> {
    let t = pool::get(&ctx.etcd, &ctx.pool).await?.topology;
    Ok(client_at(ctx, &t, &r.secondary))
}

/// Pauses or resumes the copy job (the restore job replays what was copied either way).
pub async fn pause_copy(ctx: &Ctx, paused: bool) -> Result<(), ShippingError> {
    let (Some(r), _) = read_record(ctx).await? else {
        return Err(ShippingError::Refused(
            "log shipping is not configured".into(),
        ));
    };
    let sc = secondary_client(ctx, &r).await?;
    let st: ShippingStatus = sc.log_shipping().await?;
    match st.role {
        ShippingRole::Secondary {
            share_dir,
            copy_dir,
            copy_interval_s,
            restore_delay_s,
            start_lsn,
            ..
        } => sc
            .set_log_shipping(&ShippingRole::Secondary {
                share_dir,
                copy_dir,
                copy_interval_s,
                restore_delay_s,
                start_lsn,
                copy_paused: paused,
            })
            .await
            .map_err(Into::into),
        other => Err(ShippingError::Refused(format!(
            "{} is not a log-shipping secondary (role {other:?})",
            r.secondary
        ))),
    }
}

/// Whether `site` is the topology's backup site.
pub fn is_backup_site(t: &Topology, site: &str) -> bool {
    t.sites
        .iter()
        .any(|s| s.name == site && s.role == SiteRole::Backup)
}
