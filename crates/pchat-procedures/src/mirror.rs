//! Database mirroring in a site (SQL Server database mirroring, high-safety mode): the
//! principal and a synchronous standby, driven through their agents.
//!
//! - [`add`]: clone the principal into the mirror instance, start it streaming, then make
//!   every commit on the principal wait until the mirror has flushed it
//!   (`synchronous_standby_names`). From then on an acknowledged commit is on both disks.
//! - [`status`]: both sides' states and lags, and the site's state in SQL Server's words.
//! - [`remove`]: commits stop waiting; the mirror is stopped and its slot dropped.
//! - [`failover`]: manual failover — the mirror becomes the principal. Planned (principal
//!   running): it is stopped first, which sends the mirror its last WAL, so nothing is lost.
//!   Unplanned (principal gone): allowed when the principal's last published state was
//!   SYNCHRONIZED, since then it could not acknowledge a commit the mirror lacks; otherwise
//!   only with `force`, stating how much may be lost. Either way the old principal is fenced
//!   in etcd: its agent will not start it as a principal again; `add` re-seeds it as mirror.
//!   A principal that is hung rather than gone (its agent silent, or reporting a PostgreSQL
//!   that answers nothing) is treated as gone: every call to it is bounded, the fence goes
//!   through etcd only, and the report lists what could not be reached; one that hangs in a
//!   planned stop is judged by what it last published, as if unplanned. The pair is judged
//!   once, then the steps (fence, stop-principal when planned, promote, record) run on the
//!   step runner with that judgment as their preconditions ([`failover_plan`] for
//!   `--dry-run`).
//!
//! Who is principal in a site is the site's [`MirroringRecord`] in etcd once mirroring was
//! set up (the topology's `database` before that; `pchat_control::mirroring`): a failover
//! swaps the roles there.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use pchat_agent_api::{
    self as api, parse_lsn, AgentAccess, AgentClient, ClientError, CloneRequest, Fence,
    MirroringState, Role, Status,
};
use pchat_control::mirroring::{self, Member, MirroringRecord, Safety};
use pchat_control::postgres::PgRole;
use pchat_control::topology::Database;
use pchat_control::{keys, pool, Etcd, EtcdError, PoolError};

use crate::steps::{self, Check, RunRecord, Service, StepDef};

/// How long `add` waits for a fresh mirror to catch up (after the copy itself).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a planned failover waits for the mirror to receive the principal's last WAL.
const LAST_WAL_TIMEOUT: Duration = Duration::from_secs(15);
/// How often states are polled while waiting.
const POLL: Duration = Duration::from_millis(100);
/// Bound on one call to an agent whose instance may be hung or unreachable: the old
/// principal's during a failover, either side's for `status`. An agent answers its status
/// within about a second whatever its PostgreSQL does; one that says nothing in this long
/// (its host frozen, packets dropped) is taken as unreachable, and the procedure goes on
/// without it where it safely can.
const PARTNER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a mirroring procedure stopped. Each message says what state things were left in.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The pool could not be read.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// An agent failed or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The topology or the instances do not allow it.
    #[error("{0}")]
    Refused(String),
    /// A failover would lose data and `force` was not given.
    #[error("{0}")]
    NotSynchronized(String),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// Somebody else changed the site's mirroring record meanwhile.
    #[error("the mirroring record of site {0} changed while this command ran (another administrator?); check `pchat db mirror status` and run the command again")]
    Conflict(String),
    /// A new id epoch could not be drawn or set.
    #[error(transparent)]
    Ids(#[from] crate::ids::IdsError),
    /// The step runner stopped the procedure.
    #[error(transparent)]
    Run(#[from] crate::steps::RunError),
}

/// Where the procedures act.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// The control plane.
    pub etcd: Etcd,
    /// The pool.
    pub pool: String,
    /// How the agents are reached (the caller's identity, or an insecure pool's token).
    pub agents: AgentAccess,
}

/// One side as seen now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// PostgreSQL's `host:port`.
    pub address: String,
    /// The agent's URL.
    pub agent: String,
    /// Its status, when its agent answered.
    pub status: Option<Status>,
    /// Why there is no status.
    pub error: Option<String>,
}

/// `pchat db mirror status` (also the result of `add` and `remove`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MirrorReport {
    /// The site.
    pub site: String,
    /// The site's mirroring state.
    pub state: MirroringState,
    /// From the mirroring record (`off` when there is none).
    pub safety: Safety,
    /// The record's epoch (0 when there is none).
    pub epoch: u64,
    /// The principal.
    pub principal: Side,
    /// The mirror, if the topology has one.
    pub mirror: Option<Side>,
}

/// `pchat db mirror failover`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The site.
    pub site: String,
    /// The instance now principal.
    pub new_principal: String,
    /// The instance failed over from (fenced).
    pub old_principal: String,
    /// The principal was running and was stopped cleanly first.
    pub planned: bool,
    /// `force` was needed.
    pub forced: bool,
    /// The state that decided.
    pub state_before: MirroringState,
    /// WAL the old principal had that the mirror may lack (0 when nothing can be lost).
    pub possible_loss_bytes: u64,
    /// From the moment the old principal stopped serving (or the command started, when it
    /// was already gone) to the new one being writable.
    pub no_principal_ms: u64,
    /// The whole command.
    pub total_ms: u64,
    /// The new principal's timeline.
    pub timeline: Option<u32>,
    /// The mirroring record's new epoch.
    pub epoch: u64,
    /// What the failover could not reach or use, and why (the old principal's agent that
    /// did not answer, its PostgreSQL that answers nothing…): the fence in etcd and the
    /// promotion did not need them.
    #[serde(default)]
    pub unreachable: Vec<String>,
    /// The steps as they ran, each with its time.
    #[serde(default)]
    pub steps: Vec<steps::Step>,
}

struct Pair {
    site: String,
    principal: Database,
    mirror: Option<Database>,
    record: Option<MirroringRecord>,
    revision: i64,
}

async fn pair(ctx: &Ctx, site: Option<&str>) -> Result<Pair, MirrorError> {
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    let s = match site {
        Some(name) => view
            .topology
            .sites
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = view
                    .topology
                    .sites
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                MirrorError::Refused(format!(
                    "pool {} has no site `{name}` (sites: {})",
                    ctx.pool,
                    known.join(", ")
                ))
            })?,
        None => view
            .topology
            .authoritative_site(view.state.state)
            .ok_or_else(|| {
                MirrorError::Refused(format!("pool {} has no authoritative site", ctx.pool))
            })?,
    };
    let (record, revision) = mirroring::read_record(&ctx.etcd, &ctx.pool, &s.name).await?;
    let (principal, mirror) = match &record {
        Some(r) => (
            mirroring::site_instance(s, &r.principal)?.clone(),
            r.mirror
                .as_ref()
                .map(|m| mirroring::site_instance(s, m).cloned())
                .transpose()?,
        ),
        None => (s.database.clone(), s.mirror.clone()),
    };
    Ok(Pair {
        site: s.name.clone(),
        principal,
        mirror,
        record,
        revision,
    })
}

async fn write_record(
    ctx: &Ctx,
    site: &str,
    revision: i64,
    record: &MirroringRecord,
) -> Result<(), MirrorError> {
    if mirroring::write_record(&ctx.etcd, &ctx.pool, site, revision, record).await? {
        Ok(())
    } else {
        Err(MirrorError::Conflict(site.to_owned()))
    }
}

/// The database the pool's servers should use in `site`: the current principal.
pub async fn current_principal(ctx: &Ctx, site: Option<&str>) -> Result<Database, MirrorError> {
    Ok(pair(ctx, site).await?.principal)
}

/// The agent of `db`, an instance of the topology (read from etcd and checked against it):
/// reached as that instance, by its pinned name.
fn client(ctx: &Ctx, db: &Database) -> AgentClient {
    ctx.agents.instance(db)
}

/// A client for the agent of the topology's instance `db`.
pub fn agent_client(ctx: &Ctx, db: &Database) -> AgentClient {
    client(ctx, db)
}

async fn side(ctx: &Ctx, db: &Database) -> Side {
    let answer = tokio::time::timeout(PARTNER_TIMEOUT, client(ctx, db).status())
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Unreachable {
                agent: db.agent.clone(),
                detail: format!("no answer within {PARTNER_TIMEOUT:?}"),
            })
        });
    match answer {
        Ok(s) => Side {
            address: db.address.clone(),
            agent: db.agent.clone(),
            status: Some(s),
            error: None,
        },
        Err(e) => Side {
            address: db.address.clone(),
            agent: db.agent.clone(),
            status: None,
            error: Some(e.to_string()),
        },
    }
}

/// The site's state from both sides: the principal's view when it runs as principal (the
/// side whose commits are at stake), the mirror's otherwise.
pub fn site_state(
    safety: Safety,
    principal: Option<&Status>,
    mirror: Option<&Status>,
) -> MirroringState {
    match principal {
        Some(p) if p.role == Role::Principal => match (p.mirroring.state, safety) {
            (MirroringState::None, Safety::Full | Safety::Suspended) => MirroringState::Suspended,
            (s, _) => s,
        },
        _ => match (mirror, safety) {
            (_, Safety::Off) => MirroringState::None,
            (Some(m), _) if m.role == Role::Mirror => match m.mirroring.state {
                // A mirror that still believes it is caught up has lost its principal.
                MirroringState::Synchronized => MirroringState::Disconnected,
                s => s,
            },
            (_, Safety::Suspended) => MirroringState::Suspended,
            _ => MirroringState::Disconnected,
        },
    }
}

/// Both sides' states and lags.
pub async fn status(ctx: &Ctx, site: Option<&str>) -> Result<MirrorReport, MirrorError> {
    let pair = pair(ctx, site).await?;
    // Both at once, each bounded: a hung side costs its bound once, not the sum.
    let (principal, mirror) = tokio::join!(side(ctx, &pair.principal), async {
        match &pair.mirror {
            Some(m) => Some(side(ctx, m).await),
            None => None,
        }
    });
    let safety = pair.record.as_ref().map_or(Safety::Off, |r| r.safety);
    let state = site_state(
        safety,
        principal.status.as_ref(),
        mirror.as_ref().and_then(|m| m.status.as_ref()),
    );
    Ok(MirrorReport {
        site: pair.site,
        state,
        safety,
        epoch: pair.record.as_ref().map_or(0, |r| r.epoch),
        principal,
        mirror,
    })
}

/// Splits a `host:port` address.
pub(crate) fn host_port(address: &str) -> Result<(String, u16), MirrorError> {
    address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
        .ok_or_else(|| MirrorError::Refused(format!("address `{address}` is not host:port")))
}

fn job_line(who: &str) -> impl FnMut(&api::Job) -> String + '_ {
    move |j: &api::Job| match j.percent {
        Some(p) => format!("{who}: {} ({p}%)", j.step),
        None => format!("{who}: {}", j.step),
    }
}

/// Sets up mirroring in `site`: clones the principal into the mirror instance, waits until
/// it has caught up, then makes every commit wait for it. Re-running it finishes what an
/// interrupted run left; on an established pair it changes nothing.
///
/// The mirror's data directory is replaced when it is empty, holds an older copy of the same
/// database (same system identifier: a mirror that fell behind, or the old principal after a
/// failover, whose unsynchronized tail is discarded), or when `overwrite` is given.
pub async fn add(
    ctx: &Ctx,
    site: Option<&str>,
    overwrite: bool,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<MirrorReport, MirrorError> {
    let pair = pair(ctx, site).await?;
    let Some(mirror_db) = pair.mirror.clone() else {
        return Err(MirrorError::Refused(format!(
            "site {} has no mirror in the topology: add `mirror = {{ address = \"host:port\", agent = \"http://host:port\" }}` to its [[sites]] entry and publish it",
            pair.site
        )));
    };
    let pc = client(ctx, &pair.principal);
    let mc = client(ctx, &mirror_db);
    let ps = pc.status().await?;
    if ps.role != Role::Principal {
        return Err(MirrorError::Refused(format!(
            "the principal {} ({}) is {:?}, not a running principal: start it (or fail over) first",
            ps.instance, pair.principal.address, ps.role
        )));
    }
    let ms = mc.status().await?;
    if ms.instance == ps.instance {
        return Err(MirrorError::Refused(format!(
            "the principal and the mirror of site {} are the same instance ({}): check the topology's agent URLs",
            pair.site, ps.instance
        )));
    }
    let slot = ms.instance.clone();
    progress(&format!(
        "principal {}: replication slot {slot} keeps WAL for the mirror",
        ps.instance
    ));
    pc.slot(&slot, false).await?;

    let same_database =
        ms.system_identifier.is_some() && ms.system_identifier == ps.system_identifier;
    if ms.initialized && same_database && ms.role != Role::Mirror {
        progress(&format!(
            "mirror {}: holds an older copy of this database{}; it is replaced",
            ms.instance,
            if ms.fenced.is_some() {
                " (the old principal: what it never sent is discarded)"
            } else {
                ""
            }
        ));
    }
    // The mirror copies and streams as `pchat_replication`, with the password its agent
    // reads from etcd: made now if this pool has none, and set on the principal (the
    // mirror's copy of the principal's roles carries it from then on).
    let (password, made) =
        pchat_control::postgres::ensure_password(&ctx.etcd, &ctx.pool, PgRole::Replication).await?;
    progress(&format!(
        "principal {}: replication role pchat_replication{}",
        ps.instance,
        if made { " (new password)" } else { "" }
    ));
    pc.set_role_password(PgRole::Replication, &password).await?;
    let (host, port) = host_port(&pair.principal.address)?;
    let req = CloneRequest {
        host,
        port,
        instance: Some(pair.principal.name.clone()),
        slot: Some(slot),
        overwrite: overwrite || same_database,
    };
    let mut line = job_line(&ms.instance);
    let outcome = mc.clone_from(&req, &mut |j| progress(&line(j))).await?;
    progress(&format!("mirror {}: {outcome}", ms.instance));
    // A mirror is not a stale principal, whatever it was before.
    ctx.etcd
        .put(&keys::fence(&ctx.pool, &ms.instance), b"null")
        .await?;

    progress(&format!(
        "mirror {}: connecting to the principal",
        ms.instance
    ));
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let s = mc.status().await?;
        if s.role == Role::Mirror && s.mirroring.detail.as_deref() == Some("streaming") {
            break;
        }
        if Instant::now() > deadline {
            return Err(MirrorError::Timeout(format!(
                "mirror {} is not streaming from the principal after {CATCH_UP_TIMEOUT:?} (role {:?}, state {}); commits do not wait for it yet — check its PostgreSQL log and run `pchat db mirror add` again",
                s.instance, s.role, s.mirroring.state
            )));
        }
        tokio::time::sleep(POLL).await;
    }

    // Commits wait for the mirror from here on, also while it catches up (SQL Server's
    // SYNCHRONIZING with safety FULL): the principal's view decides when it has.
    progress(&format!(
        "principal {}: every commit now waits for {}",
        ps.instance, ms.instance
    ));
    pc.set_sync_standby(Some(&ms.instance)).await?;
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let s = pc.status().await?;
        if s.mirroring.state == MirroringState::Synchronized {
            break;
        }
        if Instant::now() > deadline {
            return Err(MirrorError::Timeout(format!(
                "the principal does not see {} as its synchronous mirror after {CATCH_UP_TIMEOUT:?} (state {}); commits may be blocked: run `pchat db mirror status`, then `add` again or `remove`",
                ms.instance, s.mirroring.state
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    let record = MirroringRecord {
        principal: Member {
            instance: ps.instance.clone(),
            address: pair.principal.address.clone(),
            agent: pair.principal.agent.clone(),
        },
        mirror: Some(Member {
            instance: ms.instance.clone(),
            address: mirror_db.address.clone(),
            agent: mirror_db.agent.clone(),
        }),
        safety: Safety::Full,
        epoch: pair.record.as_ref().map_or(0, |r| r.epoch) + 1,
        changed_at: api::now_rfc3339(),
        note: format!("mirroring added: {} → {}", ps.instance, ms.instance),
    };
    write_record(ctx, &pair.site, pair.revision, &record).await?;
    progress("mirroring established: SYNCHRONIZED");
    status(ctx, Some(&pair.site)).await
}

/// Removes mirroring in `site`: commits stop waiting for the mirror, the mirror is stopped
/// and its replication slot dropped.
pub async fn remove(
    ctx: &Ctx,
    site: Option<&str>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<MirrorReport, MirrorError> {
    let pair = pair(ctx, site).await?;
    // The record first: a failover that starts now must not trust the mirror any more.
    if let Some(mut r) = pair.record.clone() {
        r.safety = Safety::Off;
        r.epoch += 1;
        r.changed_at = api::now_rfc3339();
        r.note = "mirroring removed".into();
        write_record(ctx, &pair.site, pair.revision, &r).await?;
    }
    let pc = client(ctx, &pair.principal);
    let ps = pc.status().await?;
    progress(&format!(
        "principal {}: commits no longer wait for a mirror",
        ps.instance
    ));
    pc.set_sync_standby(None).await?;
    if let Some(m) = &pair.mirror {
        let mc = client(ctx, m);
        let ms = mc.status().await?;
        progress(&format!("mirror {}: stopping", ms.instance));
        mc.stop(false).await?;
        progress(&format!(
            "principal {}: dropping replication slot {}",
            ps.instance, ms.instance
        ));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match pc.slot(&ms.instance, true).await {
                Ok(()) => break,
                // The walsender of the stopped mirror may take a moment to exit.
                Err(ClientError::JobFailed { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    status(ctx, Some(&pair.site)).await
}

/// How far an instance's WAL goes: what it wrote or received, or, stopped, its last checkpoint.
fn position(s: &Status) -> Option<&str> {
    s.wal_lsn.as_deref().or(s.checkpoint_lsn.as_deref())
}

fn lsn_gap(ahead: Option<&str>, behind: Option<&str>) -> u64 {
    match (ahead.and_then(parse_lsn), behind.and_then(parse_lsn)) {
        (Some(a), Some(b)) => a.saturating_sub(b),
        (Some(_), None) => u64::MAX,
        _ => 0,
    }
}

/// Manual failover in `site`: the mirror becomes the principal (see the module docs for
/// when `force` is needed). The old principal is fenced and becomes the pair's mirror-to-be;
/// the site runs SUSPENDED (without a mirror) until `add` re-seeds it.
pub async fn failover(
    ctx: &Ctx,
    site: Option<&str>,
    force: bool,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailoverReport, MirrorError> {
    failover_at(ctx, site, force, None, progress).await
}

/// [`failover`] as the mirror's agent runs it automatically (`pchat-agent`'s `leader`):
/// never forced, and only if the site's mirroring record is still at etcd revision
/// `record_revision` (what the decision was based on). The record is then replaced by a
/// compare-and-swap on that same revision, so of several concurrent attempts one wins.
pub async fn automatic_failover(
    ctx: &Ctx,
    site: &str,
    record_revision: i64,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailoverReport, MirrorError> {
    failover_at(ctx, Some(site), false, Some(record_revision), progress).await
}

/// After a clean stop of the principal (its status `after`): waits until the mirror has
/// received its last WAL, and returns the WAL that may be lost (0 once it has). When it
/// does not in time: with `force`, goes on; otherwise undoes the fence, starts the
/// principal again and refuses.
async fn wait_last_wal(
    ctx: &Ctx,
    pc: &AgentClient,
    mc: &AgentClient,
    ms: &Status,
    old_name: Option<&str>,
    after: &Status,
    force: bool,
) -> Result<u64, MirrorError> {
    let last = after.checkpoint_lsn.as_deref().and_then(parse_lsn);
    let deadline = Instant::now() + LAST_WAL_TIMEOUT;
    loop {
        let s = mc.status().await?;
        let received = s.wal_lsn.as_deref().and_then(parse_lsn);
        match (last, received) {
            (Some(l), Some(r)) if r > l => return Ok(0),
            _ if Instant::now() > deadline => {
                if force {
                    return Ok(lsn_gap(
                        after.checkpoint_lsn.as_deref(),
                        s.wal_lsn.as_deref(),
                    ));
                }
                // Undo: the principal comes back as it was.
                if let Some(old) = old_name {
                    ctx.etcd.put(&keys::fence(&ctx.pool, old), b"null").await?;
                }
                pc.start().await?;
                return Err(MirrorError::NotSynchronized(format!(
                    "mirror {} did not receive the principal's last WAL ({}) within {LAST_WAL_TIMEOUT:?} (it has {}); \
                     the principal was started again and nothing changed. Repeat with --force to promote anyway",
                    ms.instance,
                    after.checkpoint_lsn.as_deref().unwrap_or("?"),
                    s.wal_lsn.as_deref().unwrap_or("none")
                )));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// The site's state and the WAL that may be lost, judged by what the old principal's agent
/// last published while principal (it is gone, hung or unreachable now).
async fn published_judgment(
    ctx: &Ctx,
    old_name: Option<&str>,
    safety: Safety,
    ms: &Status,
) -> Result<(MirroringState, u64), MirrorError> {
    let last: Option<Status> = match old_name {
        Some(n) => ctx
            .etcd
            .get(&keys::principal_status(&ctx.pool, n))
            .await?
            .and_then(|kv| serde_json::from_slice(&kv.value).ok()),
        None => None,
    };
    Ok(match last {
        Some(l)
            if safety == Safety::Full
                && l.mirroring.partner.as_deref() == Some(ms.instance.as_str()) =>
        {
            let gap = lsn_gap(l.wal_lsn.as_deref(), position(ms));
            // Synchronous commit: nothing acknowledged can be missing on the mirror.
            let loss = if l.mirroring.state == MirroringState::Synchronized {
                0
            } else {
                gap
            };
            (l.mirroring.state, loss)
        }
        Some(l) => (
            MirroringState::Suspended,
            lsn_gap(l.wal_lsn.as_deref(), position(ms)),
        ),
        None => (MirroringState::Disconnected, u64::MAX),
    })
}

/// The steps of `db mirror failover`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailoverStep {
    Fence,
    StopPrincipal,
    Promote,
    Record,
}

/// `db mirror failover` (manual or automatic) as a procedure on the step runner
/// ([`crate::steps`]). Everything the steps depend on is judged first, once, from the
/// pair's record and both agents (the old principal's bounded by [`PARTNER_TIMEOUT`]):
/// planned or not, the state that decides, what may be lost. It keeps no run record of its
/// own: the fence and the mirroring record are its progress, and a re-run of an interrupted
/// failover judges again and finishes it (the fence and the promotion are harmless to
/// repeat; the record is replaced by compare-and-swap).
struct Failover<'a> {
    ctx: &'a Ctx,
    force: bool,
    automatic: bool,
    started: Instant,
    pair: Pair,
    mirror_db: Database,
    pc: AgentClient,
    mc: AgentClient,
    /// The mirror's status when judged.
    ms: Status,
    old_name: Option<String>,
    safety: Safety,
    planned: bool,
    state_before: MirroringState,
    possible_loss: u64,
    unreachable: Vec<String>,
    /// The record's next epoch (the fence's too).
    epoch: u64,
    /// Why the judgment refuses (not SYNCHRONIZED and no `force`).
    refusal: Option<String>,
    /// Since when no principal serves.
    outage_from: Instant,
    /// The new principal's status after the promotion.
    promoted: Option<Status>,
    run: RunRecord,
    kinds: Vec<FailoverStep>,
    plan: Vec<StepDef>,
}

/// `pchat db mirror failover --dry-run`: what a failover would find and do now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverPlan {
    /// The site.
    pub site: String,
    /// The mirror that would be promoted.
    pub new_principal: String,
    /// The principal that would be fenced.
    pub old_principal: String,
    /// The principal runs and would be stopped cleanly first.
    pub planned: bool,
    /// The state that decides.
    pub state_before: MirroringState,
    /// WAL the principal has that the mirror may lack (`u64::MAX`: unknown).
    pub possible_loss_bytes: u64,
    /// What could not be reached, and why.
    pub unreachable: Vec<String>,
    /// The steps; a step that would fail says why (`blocked`).
    pub steps: Vec<steps::Step>,
}

impl<'a> Failover<'a> {
    /// Reads the pair and judges it. Refuses (as an error) what no flag can change: no
    /// mirror, a mirror that is already a principal or holds nothing, a record that changed
    /// since the automatic decision.
    async fn judge(
        ctx: &'a Ctx,
        site: Option<&str>,
        force: bool,
        expect_revision: Option<i64>,
    ) -> Result<Failover<'a>, MirrorError> {
        let started = Instant::now();
        let pair = pair(ctx, site).await?;
        if expect_revision.is_some_and(|r| r != pair.revision) {
            return Err(MirrorError::Conflict(pair.site));
        }
        let Some(mirror_db) = pair.mirror.clone() else {
            return Err(MirrorError::Refused(format!(
                "site {} has no mirror to fail over to",
                pair.site
            )));
        };
        let pc = client(ctx, &pair.principal);
        let mc = client(ctx, &mirror_db);
        let ms = mc.status().await?;
        if ms.role == Role::Principal {
            return Err(MirrorError::Refused(format!(
                "{} is already a principal: nothing to fail over (see `pchat db mirror status`)",
                ms.instance
            )));
        }
        if !ms.initialized {
            return Err(MirrorError::Refused(format!(
                "{} holds no database: there is no mirror to promote",
                ms.instance
            )));
        }
        // The old principal's agent, bounded: hung or cut off, it must not hold the failover.
        let mut unreachable = Vec::new();
        let ps = match tokio::time::timeout(PARTNER_TIMEOUT, pc.status()).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                unreachable.push(e.to_string());
                None
            }
            Err(_) => {
                unreachable.push(format!(
                    "agent {} of the principal {}: no answer within {PARTNER_TIMEOUT:?}",
                    pair.principal.agent, pair.principal.name
                ));
                None
            }
        };
        if let Some(ms) = ps.as_ref().and_then(|s| s.unresponsive_ms) {
            unreachable.push(format!(
                "PostgreSQL of the principal {}: answers nothing for {ms} ms (hung)",
                pair.principal.name
            ));
        }
        let record = pair.record.clone();
        let old_name = ps
            .as_ref()
            .map(|s| s.instance.clone())
            .or_else(|| record.as_ref().map(|r| r.principal.instance.clone()));
        let safety = record.as_ref().map_or(Safety::Off, |r| r.safety);
        // A principal whose PostgreSQL is hung reports itself stopped, so it is not planned:
        // a clean stop would wait for it.
        let planned = ps
            .as_ref()
            .is_some_and(|s| s.role == Role::Principal && s.unresponsive_ms.is_none());
        let (state_before, possible_loss) = if let Some(p) = ps.as_ref().filter(|_| planned) {
            let state = if p.mirroring.partner.as_deref() == Some(ms.instance.as_str()) {
                site_state(safety, Some(p), Some(&ms))
            } else if safety == Safety::Off {
                MirroringState::None
            } else {
                MirroringState::Suspended
            };
            // Synchronous commit: nothing acknowledged can be missing on the mirror. A gap
            // there is WAL without a commit anyone waited for (PostgreSQL's running-xacts
            // and checkpoint records), and the clean stop sends it before the promotion —
            // the same rule as for a principal that is gone (`published_judgment`).
            let gap = lsn_gap(p.wal_lsn.as_deref(), position(&ms));
            let loss = if state == MirroringState::Synchronized {
                0
            } else {
                gap
            };
            (state, loss)
        } else {
            // The principal is gone: judge by what its agent last published while principal.
            published_judgment(ctx, old_name.as_deref(), safety, &ms).await?
        };
        let refusal = (state_before != MirroringState::Synchronized && !force).then(|| {
            let loss = if possible_loss == u64::MAX {
                "an unknown amount of".to_owned()
            } else {
                format!("up to {possible_loss} bytes of")
            };
            format!(
                "mirroring in site {} is {state_before}, not SYNCHRONIZED: promoting {} now may lose {loss} WAL the principal {} wrote \
                 (transactions committed there after the mirror's last received position {}). Nothing was changed. \
                 Bring the principal back, or repeat with --force to accept that loss",
                pair.site,
                ms.instance,
                old_name.as_deref().unwrap_or("(unknown)"),
                position(&ms).unwrap_or("(none)")
            )
        });
        let mut kinds = vec![FailoverStep::Fence];
        if planned {
            kinds.push(FailoverStep::StopPrincipal);
        }
        kinds.extend([FailoverStep::Promote, FailoverStep::Record]);
        let epoch = record.as_ref().map_or(0, |r| r.epoch) + 1;
        let mut f = Failover {
            ctx,
            force,
            automatic: expect_revision.is_some(),
            started,
            pair,
            mirror_db,
            pc,
            mc,
            ms,
            old_name,
            safety,
            planned,
            state_before,
            possible_loss,
            unreachable,
            epoch,
            refusal,
            outage_from: started,
            promoted: None,
            run: RunRecord::default(),
            kinds,
            plan: Vec::new(),
        };
        f.plan = f.kinds.iter().map(|k| f.def(*k)).collect();
        Ok(f)
    }

    fn old(&self) -> &str {
        self.old_name.as_deref().unwrap_or("the old principal")
    }

    fn synchronized(&self) -> bool {
        self.state_before == MirroringState::Synchronized
    }

    fn def(&self, k: FailoverStep) -> StepDef {
        let d = |name, what: String, service| StepDef {
            name,
            what,
            command: "(part of pchat db mirror failover)".into(),
            service,
            observable: false,
        };
        let (old, new) = (self.old(), self.ms.instance.as_str());
        match k {
            FailoverStep::Fence => d(
                "fence",
                format!(
                    "fence {old} in etcd (epoch {}): its agent will not run it as a principal again",
                    self.epoch
                ),
                Service::Keeps,
            ),
            FailoverStep::StopPrincipal => d(
                "stop-principal",
                format!(
                    "stop {old} cleanly (it sends {new} its last WAL) and wait until {new} has it"
                ),
                Service::Stops,
            ),
            FailoverStep::Promote => d(
                "promote",
                format!("promote {new} (started first if it is stopped)"),
                Service::Keeps,
            ),
            FailoverStep::Record => d(
                "record",
                format!(
                    "record {new} as the principal of site {} (SUSPENDED until {old} is re-seeded): the servers follow",
                    self.pair.site
                ),
                Service::Resumes,
            ),
        }
    }

    /// The planned stop: the old principal stopped cleanly, the mirror waited for. One that
    /// hangs in its stop makes the failover unplanned after all, judged by what it last
    /// published.
    async fn stop_principal(
        &mut self,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), MirrorError> {
        progress(&format!(
            "principal {}: stopping (a clean stop sends the mirror everything first)",
            self.old()
        ));
        self.outage_from = Instant::now();
        let stopped = tokio::time::timeout(LAST_WAL_TIMEOUT, async {
            self.pc.stop(false).await?;
            self.pc.status().await
        })
        .await;
        let after = match stopped {
            Ok(Ok(after)) => Some(after),
            Ok(Err(e)) => {
                self.unreachable
                    .push(format!("stopping the principal: {e}"));
                None
            }
            Err(_) => {
                self.unreachable.push(format!(
                    "stopping the principal: not stopped within {LAST_WAL_TIMEOUT:?} (hung?)"
                ));
                None
            }
        };
        if let Some(after) = after {
            self.possible_loss = wait_last_wal(
                self.ctx,
                &self.pc,
                &self.mc,
                &self.ms,
                self.old_name.as_deref(),
                &after,
                self.force,
            )
            .await?;
            return Ok(());
        }
        // Promoting a mirror it last reported SYNCHRONIZED with is safe even if it still
        // runs: its commits wait for that mirror, which no longer streams from it.
        self.planned = false;
        let (state, loss) =
            published_judgment(self.ctx, self.old_name.as_deref(), self.safety, &self.ms).await?;
        self.state_before = state;
        self.possible_loss = loss;
        if state != MirroringState::Synchronized && !self.force {
            return Err(MirrorError::NotSynchronized(format!(
                "the principal {} did not stop ({}) and last reported {state}, not SYNCHRONIZED: promoting {} could lose commits. \
                 It is fenced in etcd; repeat with --force to promote anyway",
                self.old(),
                self.unreachable.join("; "),
                self.ms.instance
            )));
        }
        Ok(())
    }

    async fn promote(
        &mut self,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), MirrorError> {
        let ctx = self.ctx;
        if self.ms.role == Role::Stopped {
            progress(&format!("mirror {}: starting", self.ms.instance));
            self.mc.start().await?;
        }
        // Last look before the step that cannot be undone: somebody else (an automatic
        // failover, the principal going exposed) may have changed the record meanwhile.
        if mirroring::read_record(&ctx.etcd, &ctx.pool, &self.pair.site)
            .await?
            .1
            != self.pair.revision
        {
            return Err(MirrorError::Conflict(self.pair.site.clone()));
        }
        // The new principal was perhaps fenced by an earlier failover the other way. Cleared
        // before the promotion: its agent stops a fenced instance that runs as a principal.
        ctx.etcd
            .put(&keys::fence(&ctx.pool, &self.ms.instance), b"null")
            .await?;
        self.mc.promote().await?;
        if self.force && !self.synchronized() && self.possible_loss > 0 {
            // Acknowledged ids may be missing here: new ones continue in a new epoch, before
            // the servers follow the record to this database.
            crate::ids::advance(ctx, &self.mc, "forced db mirror failover", progress).await?;
        }
        self.promoted = Some(self.mc.status().await?);
        Ok(())
    }

    async fn record_new_principal(
        &mut self,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), MirrorError> {
        let new_record = MirroringRecord {
            principal: Member {
                instance: self.ms.instance.clone(),
                address: self.mirror_db.address.clone(),
                agent: self.mirror_db.agent.clone(),
            },
            mirror: Some(Member {
                instance: self.old_name.clone().unwrap_or_default(),
                address: self.pair.principal.address.clone(),
                agent: self.pair.principal.agent.clone(),
            }),
            safety: Safety::Suspended,
            epoch: self.epoch,
            changed_at: api::now_rfc3339(),
            note: format!(
                "{}{} failover from {} to {}{}",
                if self.automatic { "automatic " } else { "" },
                if self.planned { "planned" } else { "unplanned" },
                self.old_name.as_deref().unwrap_or("?"),
                self.ms.instance,
                if self.force && !self.synchronized() {
                    " (forced)"
                } else {
                    ""
                }
            ),
        };
        write_record(self.ctx, &self.pair.site, self.pair.revision, &new_record).await?;
        progress(&format!(
            "{} is the principal (timeline {}); the site runs SUSPENDED until `pchat db mirror add` re-seeds {}",
            self.ms.instance,
            self.promoted
                .as_ref()
                .and_then(|s| s.timeline)
                .map_or("?".into(), |t| t.to_string()),
            self.old()
        ));
        Ok(())
    }
}

impl steps::Procedure for Failover<'_> {
    type Error = MirrorError;

    fn plan(&self) -> &[StepDef] {
        &self.plan
    }

    fn record(&mut self) -> &mut RunRecord {
        &mut self.run
    }

    async fn save(&mut self) -> Result<(), MirrorError> {
        Ok(())
    }

    /// From the judgment only (no call to anyone): an automatic failover decides within a
    /// tick, and its precondition is the judgment.
    async fn precondition(&mut self, step: usize) -> Result<Check, MirrorError> {
        Ok(match self.kinds[step] {
            FailoverStep::Fence => match (&self.refusal, &self.old_name) {
                (Some(why), _) => Check::Fails(why.clone()),
                (None, None) => {
                    Check::Note("no principal is named anywhere: nothing to fence".into())
                }
                (None, Some(_)) if self.force && !self.synchronized() => Check::Note(format!(
                    "FORCED: {} may be lost; new message ids continue in a new epoch",
                    if self.possible_loss == u64::MAX {
                        "an unknown amount of WAL".to_owned()
                    } else {
                        format!("up to {} bytes of WAL", self.possible_loss)
                    }
                )),
                (None, Some(_)) => Check::Holds,
            },
            FailoverStep::StopPrincipal => Check::Holds,
            FailoverStep::Promote if self.ms.role == Role::Stopped => Check::Note(format!(
                "{} is stopped: it is started first",
                self.ms.instance
            )),
            FailoverStep::Promote | FailoverStep::Record => Check::Holds,
        })
    }

    async fn done(&mut self, _: usize) -> Result<bool, MirrorError> {
        Ok(false)
    }

    async fn run(
        &mut self,
        step: usize,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), MirrorError> {
        match self.kinds[step] {
            FailoverStep::Fence => {
                // Fence first: whatever happens next, the old principal's agent will not
                // bring it back as a principal (a second writer on the old timeline).
                if let Some(old) = &self.old_name {
                    let fence = Fence {
                        by: self.ms.instance.clone(),
                        epoch: self.epoch,
                        at: api::now_rfc3339(),
                    };
                    let json = serde_json::to_vec(&fence).unwrap_or_default();
                    self.ctx
                        .etcd
                        .put(&keys::fence(&self.ctx.pool, old), &json)
                        .await?;
                }
            }
            FailoverStep::StopPrincipal => self.stop_principal(progress).await?,
            FailoverStep::Promote => self.promote(progress).await?,
            FailoverStep::Record => self.record_new_principal(progress).await?,
        }
        Ok(())
    }
}

/// What `db mirror failover` would find and do now (`--dry-run`): the judgment and every
/// step, a step that would fail saying why. Changes nothing.
pub async fn failover_plan(
    ctx: &Ctx,
    site: Option<&str>,
    force: bool,
) -> Result<FailoverPlan, MirrorError> {
    let mut f = Failover::judge(ctx, site, force, None).await?;
    let outcome = steps::plan(&mut f).await?;
    Ok(FailoverPlan {
        site: f.pair.site.clone(),
        new_principal: f.ms.instance.clone(),
        old_principal: f.old_name.clone().unwrap_or_default(),
        planned: f.planned,
        state_before: f.state_before,
        possible_loss_bytes: f.possible_loss,
        unreachable: f.unreachable.clone(),
        steps: outcome.steps,
    })
}

async fn failover_at(
    ctx: &Ctx,
    site: Option<&str>,
    force: bool,
    expect_revision: Option<i64>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<FailoverReport, MirrorError> {
    let mut f = Failover::judge(ctx, site, force, expect_revision).await?;
    if let Some(why) = f.refusal.take() {
        return Err(MirrorError::NotSynchronized(why));
    }
    let outcome = steps::run(&mut f, progress).await?;
    let synchronized = f.synchronized();
    Ok(FailoverReport {
        site: f.pair.site,
        new_principal: f.ms.instance,
        old_principal: f.old_name.unwrap_or_default(),
        planned: f.planned,
        forced: force && !synchronized,
        state_before: f.state_before,
        possible_loss_bytes: if f.possible_loss == u64::MAX {
            0
        } else {
            f.possible_loss
        },
        no_principal_ms: f.outage_from.elapsed().as_millis() as u64,
        total_ms: f.started.elapsed().as_millis() as u64,
        timeline: f.promoted.and_then(|s| s.timeline),
        epoch: f.epoch,
        unreachable: f.unreachable,
        steps: outcome.steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pchat_agent_api::Mirroring;

    fn st(role: Role, state: MirroringState) -> Status {
        Status {
            instance: "x".into(),
            pool: "p".into(),
            role,
            initialized: true,
            data_dir: String::new(),
            port: 0,
            system_identifier: None,
            timeline: None,
            wal_lsn: None,
            replay_lsn: None,
            checkpoint_lsn: None,
            cluster_state: None,
            mirroring: Mirroring {
                state,
                ..Mirroring::none()
            },
            fenced: None,
            messages: None,
            client_connections: None,
            id_epoch: None,
            log_shipping: None,
            job: None,
            at: String::new(),
            unresponsive_ms: None,
        }
    }

    #[test]
    fn site_states() {
        use MirroringState as M;
        use Role as R;
        let p = |s| Some(st(R::Principal, s));
        let m = |s| Some(st(R::Mirror, s));
        let table = [
            (
                Safety::Full,
                p(M::Synchronized),
                m(M::Synchronized),
                M::Synchronized,
            ),
            (Safety::Full, p(M::Disconnected), None, M::Disconnected),
            (Safety::Full, p(M::None), m(M::Synchronized), M::Suspended),
            (Safety::Off, p(M::None), None, M::None),
            (Safety::Full, None, m(M::Synchronized), M::Disconnected),
            (
                Safety::Full,
                Some(st(R::Stopped, M::None)),
                m(M::Disconnected),
                M::Disconnected,
            ),
            (
                Safety::Suspended,
                p(M::None),
                Some(st(R::Stopped, M::None)),
                M::Suspended,
            ),
            (Safety::Off, None, m(M::Synchronizing), M::None),
        ];
        for (safety, pr, mi, want) in table {
            assert_eq!(
                site_state(safety, pr.as_ref(), mi.as_ref()),
                want,
                "{safety:?} {:?} {:?}",
                pr.map(|s| (s.role, s.mirroring.state)),
                mi.map(|s| (s.role, s.mirroring.state))
            );
        }
    }

    #[test]
    fn gaps() {
        assert_eq!(lsn_gap(Some("0/3000100"), Some("0/3000000")), 0x100);
        assert_eq!(lsn_gap(Some("0/3000000"), Some("0/3000100")), 0);
        assert_eq!(lsn_gap(Some("0/1"), None), u64::MAX);
    }
}
