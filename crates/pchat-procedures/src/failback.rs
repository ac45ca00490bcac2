//! `pchat pool failback`: the pool comes home to the primary site, offline (the seed's
//! steps: a full backup of the backup site restored over the rebuilt primary) or `--online`
//! (the primary seeded as a streaming standby of the backup while the pool serves), as a
//! list of steps on the runner ([`crate::steps`]): every precondition is checked before the
//! first step (a run bound to fail never stops service), each step's postcondition lets a
//! resumed run skip it, and the time without service counts from the step that stopped it,
//! across resumes.
//!
//! Its progress is kept in etcd (`/pchat/pools/P/procedures/failback`, [`FailbackRecord`]).
//!
//! The order of the offline steps: by default service resumes in the primary site as soon
//! as it holds the backup's data, and log shipping to the backup site is re-seeded after,
//! while the pool serves (as `--online` does): the re-seed is most of an offline failback's
//! time and nothing in it needs the pool stopped. `--reseed-first` keeps the seed's order
//! (log shipping before service resumes), for an operator who will not serve a single
//! message the backup site does not protect: with the default order, what is acknowledged
//! while the backup site is re-seeded is lost if the primary site is lost in those
//! seconds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use pchat_agent_api::salvage::SalvageRequest;
use pchat_agent_api::shipping::ShippingRole;
use pchat_agent_api::{
    self as api, parse_lsn, AgentClient, BackupRequest, CloneRequest, Fence, JobState,
    RestoreRequest, Role, Status,
};
use pchat_control::keys;
use pchat_control::mirroring::{self, Safety};
use pchat_control::pool::{self, PoolError, PoolStateKind};
use pchat_control::topology::{Database, Site, SiteRole};

use crate::backup;
use crate::dr::{
    client, set_state_and_servers, site_by_role, site_servers, DrError, FailoverRecord,
};
use crate::ids;
use crate::logship::{self, ConfigureOptions};
use crate::mirror::{self, Ctx};
use crate::steps::{self, Check, Limits, RunRecord, Service, Step, StepDef};

/// Options of `pchat pool failback`.
#[derive(Clone, Debug, Default)]
pub struct FailbackOptions {
    /// Print the plan (with what is already done and what would fail) only.
    pub dry_run: bool,
    /// The full backup's name (default `failback-<time>`; kept across a resume).
    pub backup_name: Option<String>,
    /// Active servers in the primary site (default: its servers up to the maximum).
    pub servers: Option<Vec<String>>,
    /// The bounds of the waits.
    pub limits: Limits,
    /// Log shipping primary → backup: segment switch interval (default: as before the
    /// failover, else 60).
    pub backup_interval_s: Option<u64>,
    /// Log shipping: copy interval (default: as before the failover, else 5).
    pub copy_interval_s: Option<u64>,
    /// Before the primary's old database is replaced, read the messages it has that the
    /// backup lacks (its unshipped tail) into this file (JSON lines). Never merged.
    pub salvage: Option<PathBuf>,
    /// Seed the primary as a streaming standby of the backup while the pool keeps serving,
    /// then switch over with seconds of no service.
    pub online: bool,
    /// Offline: configure log shipping to the backup site before service resumes (the
    /// seed's order) instead of after.
    pub reseed_first: bool,
}

/// `/pchat/pools/P/procedures/failback`: a failback's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackRecord {
    /// RFC 3339.
    pub started_at: String,
    /// The full backup's name.
    pub backup_name: String,
    /// An `--online` failback (its own steps).
    #[serde(default)]
    pub online: bool,
    /// An offline failback in the seed's order (`--reseed-first`).
    #[serde(default)]
    pub reseed_first: bool,
    /// The runner's progress: steps done, their times, the no-service window.
    #[serde(flatten)]
    pub run: RunRecord,
}

/// What `pchat pool failback` did (or, with `--dry-run`, will do).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailbackReport {
    /// The steps (with `--dry-run`: each failing precondition on its step).
    pub steps: Vec<Step>,
    /// Whether this run resumed an interrupted one.
    pub resumed: bool,
    /// From the first step that stopped service until servers were active again, across
    /// resumes (0 when service has not resumed yet).
    pub no_service_ms: u64,
    /// Wall time of this run.
    pub total_ms: u64,
    /// Messages in the primary's database at the end.
    pub messages: Option<u64>,
    /// The order of the steps, and why.
    #[serde(default)]
    pub order: String,
}

/// The failback's steps (one procedure, two lists: offline and online).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Salvage,
    RemoveBackupMirroring,
    Seed,
    CatchUp,
    Drain,
    Backup,
    Restore,
    IdEpoch,
    StopBackup,
    Switchover,
    ResumeService,
    LogShipping,
    PrimaryMirror,
}

fn order(online: bool, reseed_first: bool) -> &'static str {
    if online {
        "online: the primary is seeded while the pool serves; only the switchover is without service; log shipping is re-seeded after service resumes"
    } else if reseed_first {
        "--reseed-first (the seed's order): log shipping to the backup site is re-seeded before service resumes, so nothing is acknowledged that the backup site does not protect; the re-seed adds its time to the time without service"
    } else {
        "service first: service resumes as soon as the primary holds the backup's data; log shipping to the backup site is re-seeded after, while the pool serves (it needs no stop, and it is most of the time); until it is done the backup site protects nothing (--reseed-first keeps the seed's order)"
    }
}

fn kinds(online: bool, reseed_first: bool, salvage: bool, primary_mirror: bool) -> Vec<Kind> {
    use Kind::*;
    let mut v = Vec::new();
    // The salvage reads the old primary while the pool still serves: it needs nothing
    // stopped, and the restore (or seed) replaces what it reads.
    if salvage {
        v.push(Salvage);
    }
    if online {
        v.extend([
            RemoveBackupMirroring,
            Seed,
            CatchUp,
            Drain,
            Switchover,
            ResumeService,
            LogShipping,
        ]);
    } else {
        v.extend([
            Drain,
            RemoveBackupMirroring,
            Backup,
            Restore,
            IdEpoch,
            StopBackup,
        ]);
        if reseed_first {
            v.extend([LogShipping, ResumeService]);
        } else {
            v.extend([ResumeService, LogShipping]);
        }
    }
    if primary_mirror {
        v.push(PrimaryMirror);
    }
    v
}

struct Failback<'a> {
    ctx: &'a Ctx,
    opts: &'a FailbackOptions,
    limits: Limits,
    rec: FailbackRecord,
    kinds: Vec<Kind>,
    plan: Vec<StepDef>,
    a: Site,
    b: Site,
    /// Site B's database the pool serves from (its pair's principal when the run began).
    bdb: Database,
    bc: AgentClient,
    adb: Database,
    ac: AgentClient,
    servers: Vec<String>,
    share: String,
}

impl Failback<'_> {
    fn def(&self, k: Kind) -> StepDef {
        let pool = &self.ctx.pool;
        let (a, b) = (&self.a.name, &self.b.name);
        let backup = &self.rec.backup_name;
        let share = &self.share;
        let d = |name, what: String, command: String, service, observable| StepDef {
            name,
            what,
            command,
            service,
            observable,
        };
        match k {
            Kind::Salvage => d(
                "salvage",
                format!(
                    "read the messages the old primary database of site {a} has and the backup lacks into {} (while the pool serves)",
                    self.opts.salvage.as_deref().map_or("?".into(), |p| p.display().to_string())
                ),
                "(part of pchat pool failback --salvage FILE)".into(),
                Service::Keeps,
                false,
            ),
            Kind::RemoveBackupMirroring => d(
                "remove-backup-mirroring",
                format!("remove mirroring on the backup site {b} (mgc and mgccomp)"),
                format!("pchat --in-pool {pool} db mirror remove --site {b}"),
                Service::Keeps,
                true,
            ),
            Kind::Seed => d(
                "seed",
                format!("seed the primary database of site {a} as a streaming standby of the backup, while the pool serves"),
                "(part of pchat pool failback --online)".into(),
                Service::Keeps,
                true,
            ),
            Kind::CatchUp => d(
                "catch-up",
                format!("wait until site {a} has caught up"),
                "pchat agent status --url <primary agent>".into(),
                Service::Keeps,
                true,
            ),
            Kind::Drain => d(
                "drain",
                "no service begins: clear the active servers; wait until no server holds an mgc/mgccomp connection".into(),
                format!("pchat pool set-active-servers {pool} --none"),
                Service::Stops,
                true,
            ),
            Kind::Backup => d(
                "backup",
                format!("full backup of the backup database to the share as {backup}"),
                format!("pchat --in-pool {pool} db backup --full --site {b} --to {share} --name {backup}"),
                Service::Keeps,
                true,
            ),
            Kind::Restore => d(
                "restore",
                format!("restore it over the rebuilt primary database of site {a}, overwrite, ready to use"),
                format!("pchat --in-pool {pool} db restore --site {a} --from {share}/{backup} --overwrite --recovery"),
                Service::Keeps,
                true,
            ),
            Kind::IdEpoch => d(
                "id-epoch",
                format!("the restored database's message ids continue in a new epoch; site {a}'s pair starts afresh"),
                "(part of pchat db restore)".into(),
                Service::Keeps,
                false,
            ),
            Kind::StopBackup => d(
                "stop-backup",
                format!("fence and stop the backup database of site {b}: never two writable principals"),
                "pchat agent stop --url <backup agent>".into(),
                Service::Keeps,
                true,
            ),
            Kind::Switchover => d(
                "switchover",
                format!("stop the backup cleanly (it sends site {a} its last WAL), fence it, promote site {a}"),
                "(part of pchat pool failback --online)".into(),
                Service::Keeps,
                true,
            ),
            Kind::ResumeService => d(
                "resume-service",
                format!("set the active servers in site {a} and the pool state Normal (one compare-and-swap): service resumes"),
                format!("pchat pool set-active-servers {pool} … --allow-remote-site; pchat pool set-state {pool} normal"),
                Service::Resumes,
                true,
            ),
            Kind::LogShipping => d(
                "log-shipping",
                format!("configure log shipping {a} → {b} (re-seeds the backup site)"),
                format!("pchat --in-pool {pool} db log-shipping configure --from-site {a} --to-site {b}"),
                Service::Keeps,
                false,
            ),
            Kind::PrimaryMirror => d(
                "primary-mirror",
                format!("re-attach the mirror of site {a}"),
                format!("pchat --in-pool {pool} db mirror add --site {a}"),
                Service::Keeps,
                false,
            ),
        }
    }

    async fn save_record(&self) -> Result<(), DrError> {
        let j = serde_json::to_vec(&self.rec).map_err(|e| PoolError::Corrupt(e.to_string()))?;
        self.ctx
            .etcd
            .put(&keys::failback(&self.ctx.pool), &j)
            .await?;
        Ok(())
    }

    /// Site A's database as its agent reports it, or why it cannot be asked.
    async fn primary(&self) -> Result<Status, String> {
        self.ac.status().await.map_err(|e| {
            format!(
                "the agent of site {}'s database {} does not answer ({e}): start it (`pchat agent run` on the rebuilt host) and run the command again",
                self.a.name, self.adb.address
            )
        })
    }

    /// Site B's database, which must be the running principal the pool serves from.
    async fn backup_principal(&self, why: &str) -> Check {
        match self.bc.status().await {
            Ok(s) if s.role == Role::Principal => Check::Holds,
            Ok(s) => Check::Fails(format!(
                "the backup database {} is {:?}, not the running principal {why}",
                s.instance, s.role
            )),
            Err(e) => Check::Fails(format!(
                "the agent of the backup database {} does not answer ({e})",
                self.bdb.address
            )),
        }
    }

    /// What a salvage of site A's database would find (`None`: something to read).
    fn nothing_to_salvage(s: &Status) -> Option<String> {
        if !s.initialized {
            return Some(format!(
                "{} holds no database (a rebuilt site): nothing to salvage; the file will be empty",
                s.instance
            ));
        }
        if s.role == Role::Principal && s.messages.unwrap_or(0) == 0 {
            return Some(format!(
                "{} runs as a principal holding no message (rebuilt and `db install`ed): nothing to salvage; the file will be empty",
                s.instance
            ));
        }
        None
    }

    async fn salvage_check(&self) -> Check {
        let s = match self.primary().await {
            Ok(s) => s,
            Err(e) => return Check::Fails(e),
        };
        if let Some(note) = Self::nothing_to_salvage(&s) {
            return Check::Note(note);
        }
        if s.role == Role::Principal {
            // A principal holding messages that no failover stopped: whose they are is for
            // a person to decide, not for a failback to overwrite while it serves.
            return Check::Fails(format!(
                "{} runs as a principal holding {} message(s): a salvage reads a stopped old principal; stop it first (`pchat agent stop --url {}`)",
                s.instance,
                s.messages.unwrap_or(0),
                self.adb.agent
            ));
        }
        if let Some(file) = &self.opts.salvage {
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.is_dir() {
                    return Check::Fails(format!(
                        "the salvage file's directory {} does not exist",
                        dir.display()
                    ));
                }
            }
        }
        Check::Holds
    }

    async fn run_salvage(
        &mut self,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), DrError> {
        let Some(file) = self.opts.salvage.clone() else {
            return Ok(());
        };
        let s = self.ac.status().await?;
        if let Some(note) = Self::nothing_to_salvage(&s) {
            write_salvage(&file, &[])?;
            progress(&format!("  salvage: {note} ({})", file.display()));
            return Ok(());
        }
        // Nothing it replays may be archived into the share of a live configuration.
        self.ac.set_log_shipping(&ShippingRole::None).await?;
        salvage_into(self.ctx, &self.ac, &self.bdb, &file, progress).await
    }

    fn backup_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.share, self.rec.backup_name))
    }

    async fn run_backup(&mut self, progress: &mut (dyn FnMut(&str) + Send)) -> Result<(), DrError> {
        let poll = self.limits.poll();
        let running = |s: &Status| {
            s.job
                .as_ref()
                .is_some_and(|j| j.kind == "backup" && j.state == JobState::Running)
        };
        if running(&self.bc.status().await?) {
            // A killed run's backup job may still finish the set.
            progress("  an earlier run's backup is still running on the agent; waiting for it");
            let bc = &self.bc;
            steps::poll_until(
                Duration::from_millis(self.limits.earlier_backup_timeout_ms),
                poll,
                || async move { Ok::<_, DrError>((!running(&bc.status().await?)).then_some(())) },
            )
            .await?;
            if backup::read_manifest(&self.backup_dir()).is_ok() {
                return Ok(());
            }
        }
        let dir = self.backup_dir();
        if dir.exists() {
            // A set without a readable manifest is not a backup: taken again.
            std::fs::remove_dir_all(&dir).map_err(|e| {
                DrError::Refused(format!(
                    "cannot remove the unfinished backup {}: {e}",
                    dir.display()
                ))
            })?;
        }
        self.bc
            .backup(
                &BackupRequest {
                    to: self.share.clone(),
                    name: self.rec.backup_name.clone(),
                    description: Some(format!("failback of pool {}", self.ctx.pool)),
                },
                &mut logship::job_lines(progress),
            )
            .await?;
        Ok(())
    }

    /// The restore's outcome: site A is a running, unfenced principal holding exactly the
    /// backup's data (same system identifier, same message count; the pool is drained, so
    /// the backup does not move meanwhile). `Some(why)` when it is not.
    async fn not_restored(&self) -> Result<Option<String>, DrError> {
        let a = match self.ac.status().await {
            Ok(a) => a,
            Err(e) => return Ok(Some(format!("site A's agent: {e}"))),
        };
        let b = self.bc.status().await?;
        Ok(if a.role != Role::Principal {
            Some(format!(
                "{} is {:?}, not a running principal",
                a.instance, a.role
            ))
        } else if let Some(f) = &a.fenced {
            Some(format!(
                "{} is fenced (by {} at {})",
                a.instance, f.by, f.at
            ))
        } else if a.system_identifier.is_none() || a.system_identifier != b.system_identifier {
            Some(format!(
                "{} is cluster {:?}, the backup {:?}: not its copy",
                a.instance, a.system_identifier, b.system_identifier
            ))
        } else if a.messages != b.messages {
            Some(format!(
                "{} has {:?} messages, the backup database {:?}",
                a.instance, a.messages, b.messages
            ))
        } else {
            None
        })
    }

    async fn run_switchover(
        &mut self,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), DrError> {
        let ctx = self.ctx;
        let before = self.ac.status().await?;
        if before.role != Role::Principal {
            let bs = self.bc.status().await?;
            let view = pool::get(&ctx.etcd, &ctx.pool).await?;
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
            progress(&format!(
                "  stopping {} cleanly, promoting {}",
                self.bdb.address, self.adb.address
            ));
            self.bc.stop(false).await?;
            let last = self
                .bc
                .status()
                .await?
                .checkpoint_lsn
                .as_deref()
                .and_then(parse_lsn);
            let ac = &self.ac;
            let got = steps::poll_until(
                Duration::from_millis(self.limits.last_wal_timeout_ms),
                self.limits.poll(),
                || async move {
                    let s = ac.status().await?;
                    let got = s.wal_lsn.as_deref().and_then(parse_lsn);
                    Ok::<_, DrError>(
                        matches!((last, got), (Some(l), Some(g)) if g > l).then_some(()),
                    )
                },
            )
            .await?;
            if got.is_none() {
                // Undo: B serves again as it was.
                ctx.etcd
                    .put(&keys::fence(&ctx.pool, &bs.instance), b"null")
                    .await?;
                self.bc.start().await?;
                return Err(DrError::Timeout(format!(
                    "{} did not receive the backup's last WAL within {} ms; the backup was started again — set the active servers back with `pchat pool set-active-servers` and retry",
                    before.instance, self.limits.last_wal_timeout_ms
                )));
            }
            // Its fence (from the failover) goes before the promotion: its agent stops
            // a fenced instance that runs as a principal.
            ctx.etcd
                .put(&keys::fence(&ctx.pool, &before.instance), b"null")
                .await?;
            self.ac.promote().await?;
        }
        ctx.etcd
            .put(&keys::fence(&ctx.pool, &before.instance), b"null")
            .await?;
        ctx.etcd
            .delete(&keys::mirroring(&ctx.pool, &self.a.name))
            .await?;
        Ok(())
    }
}

impl steps::Procedure for Failback<'_> {
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
        Ok(match self.kinds[step] {
            Kind::Salvage => self.salvage_check().await,
            Kind::Drain => self.backup_principal("the pool serves from").await,
            Kind::Backup => {
                if !Path::new(&self.share).is_dir() {
                    Check::Fails(format!(
                        "the share {} is not a directory on this host: the failback reads the backup's manifest there",
                        self.share
                    ))
                } else {
                    self.backup_principal("to back up").await
                }
            }
            Kind::Seed => match self.primary().await {
                Err(e) => Check::Fails(e),
                Ok(_) => self.backup_principal("to seed from").await,
            },
            Kind::Restore | Kind::CatchUp | Kind::Switchover => match self.primary().await {
                Err(e) => Check::Fails(e),
                Ok(_) => Check::Holds,
            },
            Kind::ResumeService => {
                // The servers chosen must be valid for state Normal, checked now rather
                // than with the pool stopped.
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                let mut probe = view.clone();
                probe.state.state = PoolStateKind::Normal;
                match pool::plan_active(
                    &probe,
                    &pool::ActiveChange::Set(self.servers.clone()),
                    false,
                ) {
                    Ok(_) if self.servers.is_empty() => {
                        Check::Fails(format!("site {} has no server to make active", self.a.name))
                    }
                    Ok(_) => Check::Holds,
                    Err(e) => Check::Fails(e.to_string()),
                }
            }
            // The configuration runs its own preflight (the share, the OS users) and
            // changes nothing when it fails; it cannot run here, before the steps that
            // reset site A's pair, since it looks the primary up through that pair. What
            // it needs from the start is the backup site's agent, which it re-seeds.
            Kind::LogShipping => match self.bc.status().await {
                Ok(_) => Check::Holds,
                Err(e) => Check::Fails(format!(
                    "the agent of the backup database {} does not answer ({e}): log shipping re-seeds it",
                    self.bdb.address
                )),
            },
            Kind::PrimaryMirror => match &self.a.mirror {
                Some(m) => match client(ctx, m).status().await {
                    Ok(_) => Check::Holds,
                    Err(e) => Check::Fails(format!(
                        "the agent of site {}'s mirror {} does not answer ({e}): start it",
                        self.a.name, m.address
                    )),
                },
                None => Check::Holds,
            },
            Kind::RemoveBackupMirroring | Kind::IdEpoch | Kind::StopBackup => Check::Holds,
        })
    }

    async fn done(&mut self, step: usize) -> Result<bool, DrError> {
        let ctx = self.ctx;
        Ok(match self.kinds[step] {
            Kind::RemoveBackupMirroring => {
                let (r, _) = mirroring::read_record(&ctx.etcd, &ctx.pool, &self.b.name).await?;
                r.is_none_or(|r| r.safety == Safety::Off)
            }
            Kind::Seed => {
                let (a, b) = (self.ac.status().await?, self.bc.status().await?);
                a.role == Role::Mirror
                    && a.system_identifier.is_some()
                    && a.system_identifier == b.system_identifier
            }
            Kind::CatchUp => {
                let s = self.ac.status().await?;
                s.role == Role::Mirror
                    && s.mirroring.detail.as_deref() == Some("streaming")
                    && s.mirroring.lag_bytes < self.limits.catch_up_lag_bytes_max
            }
            Kind::Drain => {
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                let s = self.bc.status().await?;
                view.state.active_servers.is_empty()
                    // A stopped database holds no session either.
                    && (s.client_connections == Some(0) || s.role != Role::Principal)
            }
            Kind::Backup => backup::read_manifest(&self.backup_dir()).is_ok(),
            Kind::Restore => self.not_restored().await?.is_none(),
            Kind::StopBackup => {
                let s = self.bc.status().await?;
                s.role != Role::Principal && s.fenced.is_some()
            }
            Kind::Switchover => {
                let (a, b) = (self.ac.status().await?, self.bc.status().await);
                a.role == Role::Principal
                    && a.fenced.is_none()
                    && b.is_ok_and(|b| b.role != Role::Principal)
            }
            Kind::ResumeService => {
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                view.state.state == PoolStateKind::Normal && !view.state.active_servers.is_empty()
            }
            Kind::Salvage | Kind::IdEpoch | Kind::LogShipping | Kind::PrimaryMirror => false,
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
            Kind::Salvage => self.run_salvage(&mut sub).await?,
            Kind::RemoveBackupMirroring => {
                mirror::remove(ctx, Some(&self.b.name), &mut sub).await?;
            }
            Kind::Seed => {
                self.ac.set_log_shipping(&ShippingRole::None).await?;
                let an = self.ac.status().await?.instance;
                self.bc.slot(&an, false).await?;
                let (host, port) = mirror::host_port(&self.bdb.address)?;
                self.ac
                    .clone_from(
                        &CloneRequest {
                            host,
                            port,
                            instance: Some(self.bdb.name.clone()),
                            slot: Some(an),
                            overwrite: true,
                        },
                        &mut logship::job_lines(&mut sub),
                    )
                    .await?;
            }
            Kind::CatchUp => {
                let timeout = Duration::from_millis(self.limits.catch_up_timeout_ms);
                let poll = self.limits.poll();
                let max = self.limits.catch_up_lag_bytes_max;
                let ac = &self.ac;
                let caught = steps::poll_until(timeout, poll, || async move {
                    let s = ac.status().await?;
                    Ok::<_, DrError>(
                        (s.role == Role::Mirror
                            && s.mirroring.detail.as_deref() == Some("streaming")
                            && s.mirroring.lag_bytes < max)
                            .then_some(()),
                    )
                })
                .await?;
                if caught.is_none() {
                    let s = self.ac.status().await?;
                    return Err(DrError::Timeout(format!(
                        "{} has not caught up with the backup after {} ms (role {:?}, {} bytes behind); the pool still serves from the backup — run the command again",
                        s.instance, self.limits.catch_up_timeout_ms, s.role, s.mirroring.lag_bytes
                    )));
                }
            }
            Kind::Drain => clear_servers_and_wait(ctx, &self.bc, &self.limits).await?,
            Kind::Backup => self.run_backup(&mut sub).await?,
            Kind::Restore => {
                self.ac.set_log_shipping(&ShippingRole::None).await?;
                self.ac
                    .restore(
                        &RestoreRequest {
                            from: self.backup_dir().display().to_string(),
                            overwrite: true,
                            recovery: true,
                        },
                        &mut logship::job_lines(&mut sub),
                    )
                    .await?;
                if let Some(why) = self.not_restored().await? {
                    return Err(DrError::Refused(format!(
                        "after the restore {why}: stopping here (the pool stays without service); run `pchat pool failback` again"
                    )));
                }
            }
            Kind::IdEpoch => {
                // A restore: the restored database's ids continue in a new epoch, before
                // any server writes (a re-run draws another, harmlessly).
                ids::advance(ctx, &self.ac, "pool failback", &mut sub).await?;
                // Site A's pair starts afresh from the topology: the restored database
                // is its principal, its mirror is re-seeded in the last step.
                ctx.etcd
                    .delete(&keys::mirroring(&ctx.pool, &self.a.name))
                    .await?;
            }
            Kind::StopBackup => {
                let bs = self.bc.status().await?;
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                let fence = Fence {
                    by: self.ac.status().await?.instance,
                    epoch: view.state.epoch + 1,
                    at: api::now_rfc3339(),
                };
                ctx.etcd
                    .put(
                        &keys::fence(&ctx.pool, &bs.instance),
                        &serde_json::to_vec(&fence).unwrap_or_default(),
                    )
                    .await?;
                if bs.role == Role::Principal {
                    self.bc.stop(false).await?;
                }
            }
            Kind::Switchover => self.run_switchover(&mut sub).await?,
            Kind::ResumeService => {
                let view = pool::get(&ctx.etcd, &ctx.pool).await?;
                sub(&format!("active servers {}", self.servers.join(", ")));
                set_state_and_servers(ctx, &view, PoolStateKind::Normal, self.servers.clone())
                    .await?;
            }
            Kind::LogShipping => {
                let shipping = shipping_options(ctx, self.opts, &self.a, &self.b).await?;
                logship::configure(ctx, &shipping, &mut sub).await?;
            }
            Kind::PrimaryMirror => {
                mirror::add(ctx, Some(&self.a.name), true, &mut sub).await?;
                add_mirror_as_source(ctx, &self.a).await?;
            }
        }
        Ok(())
    }
}

/// `pchat pool failback`: the pool comes home to the primary site.
pub async fn failback(
    ctx: &Ctx,
    opts: &FailbackOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailbackReport, DrError> {
    let started = std::time::Instant::now();
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
    let rec = saved.unwrap_or_else(|| FailbackRecord {
        started_at: api::now_rfc3339(),
        backup_name: opts.backup_name.clone().unwrap_or_else(|| {
            format!(
                "failback-{}",
                time::OffsetDateTime::now_utc().unix_timestamp()
            )
        }),
        online: opts.online,
        reseed_first: opts.reseed_first && !opts.online,
        run: RunRecord::default(),
    });
    if rec.online != opts.online || (!rec.online && rec.reseed_first != opts.reseed_first) {
        let flags = if rec.online {
            " --online"
        } else if rec.reseed_first {
            " --reseed-first"
        } else {
            ""
        };
        return Err(DrError::Refused(format!(
            "a failback started at {} is under way with other steps: run `pchat pool failback {}{flags}` to resume it",
            rec.started_at, ctx.pool
        )));
    }
    let bdb = mirror::current_principal(ctx, Some(&b.name)).await?;
    let adb = a.database.clone();
    let mut fb = Failback {
        ctx,
        opts,
        limits: opts.limits.clone(),
        kinds: kinds(
            rec.online,
            rec.reseed_first,
            opts.salvage.is_some(),
            a.mirror.is_some(),
        ),
        plan: Vec::new(),
        bc: client(ctx, &bdb),
        ac: client(ctx, &adb),
        bdb,
        adb,
        servers: site_servers(&t, &a.name, opts.servers.as_ref()),
        share: t.share.trim_end_matches('/').to_owned(),
        rec,
        a,
        b,
    };
    fb.plan = fb.kinds.iter().map(|k| fb.def(*k)).collect();
    let order = order(fb.rec.online, fb.rec.reseed_first).to_owned();
    if opts.dry_run {
        let out = steps::plan(&mut fb).await?;
        return Ok(FailbackReport {
            steps: out.steps,
            resumed,
            no_service_ms: out.no_service_ms.unwrap_or(0),
            total_ms: 0,
            messages: None,
            order,
        });
    }
    if resumed {
        progress(&format!(
            "resuming the failback started at {} (backup {})",
            fb.rec.started_at, fb.rec.backup_name
        ));
    }
    progress(&format!("order: {order}"));
    let out = steps::run(&mut fb, progress).await?;
    ctx.etcd.delete(&keys::failback(&ctx.pool)).await?;
    // The failover is over too (its record served the salvage and a failover's resume).
    ctx.etcd.delete(&keys::failover(&ctx.pool)).await?;
    let messages = fb.ac.status().await.ok().and_then(|s| s.messages);
    progress("failback complete: the pool is Normal and serves from the primary site");
    let report = FailbackReport {
        steps: out.steps,
        resumed,
        no_service_ms: out.no_service_ms.unwrap_or(0),
        total_ms: started.elapsed().as_millis() as u64,
        messages,
        order,
    };
    crate::overview::record_finished(&ctx.etcd, &ctx.pool, "failback", &report, progress).await;
    Ok(report)
}

/// Writes salvaged messages to `file`, one JSON object a line: mode 0600 whatever the umask
/// (they are users' messages), under a fresh name first and never through a link, so a file
/// with the final name is complete.
pub fn write_salvage(
    file: &Path,
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
    file: &Path,
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
        "salvage: reading the old primary's messages that {} lacks",
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
        "salvage: {} message(s) only the old primary had (of {} compared) saved to {}{}",
        r.messages.len(),
        r.compared,
        file.display(),
        r.note.map(|n| format!(" ({n})")).unwrap_or_default()
    ));
    Ok(())
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
/// (the seed's condition for everything after it).
async fn clear_servers_and_wait(
    ctx: &Ctx,
    bc: &AgentClient,
    limits: &Limits,
) -> Result<(), DrError> {
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    if !view.state.active_servers.is_empty() {
        let next = pool::plan_active(&view, &pool::ActiveChange::None, true)?;
        pool::commit(&ctx.etcd, &view, &next).await?;
    }
    let drained = steps::poll_until(
        Duration::from_millis(limits.drain_timeout_ms),
        limits.poll(),
        || async move {
            let s = bc.status().await?;
            Ok::<_, DrError>(
                (s.client_connections == Some(0) || s.role != Role::Principal).then_some(()),
            )
        },
    )
    .await?;
    if drained.is_none() {
        let s = bc.status().await?;
        return Err(DrError::Timeout(format!(
            "servers still hold {} connection(s) to {} after {} ms: a server that is not in the pool's topology, or one that does not follow the pool state? \
             Stop it and run `pchat pool failback` again",
            s.client_connections.map_or("?".into(), |n| n.to_string()),
            s.instance,
            limits.drain_timeout_ms,
        )));
    }
    Ok(())
}
