//! Automatic mirror failover: the site's leader lease and the mirror's watcher.
//!
//! - **Principal side.** While the agent's instance is the site's principal (per the
//!   [`MirroringRecord`]) and the pair runs with safety FULL, the agent holds
//!   `/pchat/pools/P/sites/S/leader` = its instance name under an etcd lease of
//!   `leader_ttl_s` (renewed every half second; a failed renewal is tried again every tick,
//!   each try bounded, on the next etcd member). If no renewal succeeds for three quarters
//!   of the TTL (etcd unreachable, lease gone), the agent fences its own instance with a *fast
//!   shutdown* before the lease can have expired in etcd: sessions are terminated, and a
//!   commit waiting for the mirror ends with an error instead of an acknowledgment. (Setting
//!   `default_transaction_read_only` and terminating sessions would not stop a commit already
//!   in flight; stopping does.) It stays stopped: an operator starts it again
//!   (`POST /v1/start`, which refuses while the instance is fenced); being stopped on
//!   purpose, it is not started again by the revival below.
//!   The agent gives the lease up itself, without waiting for it to run out, when
//!   PostgreSQL dies under it (not running for a second) or hangs: a health probe (`SELECT 1`
//!   every [`TICK`] on a session of its own, each bounded by `postgres_query_timeout_ms`)
//!   that has had no answer for `postgres_hung_timeout_ms` makes the agent revoke the lease,
//!   and the mirror takes over within a tick. Once the record names another principal, the
//!   hung server is fenced: a fast shutdown is requested without waiting for it, which a
//!   frozen server carries out the moment it runs again, before it can answer anyone. If
//!   nobody takes over (the mirror's `auto_failover` is off) and it answers again, the
//!   agent takes the lease back and the site goes on. Nothing in this loop waits on
//!   PostgreSQL without a deadline (the mirror-loss check reads the publisher's last
//!   status), so a hung server never makes the agent late with its lease.
//! - **Mirror side.** While the agent's instance is the site's mirror, safety is FULL and
//!   `auto_failover` is on, the agent polls the leader key every [`TICK`]. When the key is
//!   gone (after having been seen in this epoch, or absent for two TTLs), and the principal's
//!   last published principal-status says SYNCHRONIZED with this mirror, it takes the leader
//!   key itself (create-if-absent under its own lease: of several watchers one wins), then
//!   runs [`mirror::automatic_failover`] — the manual procedure's checks, fence and promotion,
//!   with the record replaced by compare-and-swap on the revision the decision was based on.
//!   A principal that last reported anything else is never promoted automatically: the agent
//!   logs why; an operator can still `pchat db mirror failover --force`.
//!
//! - **Principal that died on its own.** When the record's principal's PostgreSQL is down
//!   without having been stopped (its control file says it crashed) and nobody took over, the
//!   agent starts it again — after two TTLs when a synchronized mirror could take over
//!   first, after 2 s otherwise — and retries with a doubling wait while the
//!   start fails (up to 10 s), e.g. while its WAL disk is still full. A fence refuses it.
//! - **Fenced instance.** While it holds no lease, the agent looks for a fence of its own
//!   instance (set by a failover that promoted another one); when there is one and its
//!   PostgreSQL still runs as a principal — the failover could not stop it because this agent
//!   was down — it stops PostgreSQL (fast shutdown). Until then that old principal's commits
//!   wait for a synchronous mirror that has left it, so none is acknowledged.
//!
//! A full disk counts too: a principal with less than `DISK_FULL_BELOW` available under its
//! data directory fails every commit that needs a new page while it still answers, so the
//! lease is given up after `postgres_hung_timeout_ms` of it when the mirror is SYNCHRONIZED
//! (otherwise nobody could take over, and the lease is kept), and taken back if nobody took
//! over and room is made.
//!
//! A storage stall counts as a hang: the probe answers from memory then, but it also sees
//! client sessions waiting on WAL or data-file writes while the WAL flush position stands
//! still (`Instance::stalled_for`), and that, held for `postgres_hung_timeout_ms`, gives the
//! lease up the same way.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use pchat_agent_api::{now_rfc3339, AgentAccess, MirroringState, Role, Status};
use pchat_control::mirroring::{self, MirroringRecord, Safety};
use pchat_control::{keys, pool, Etcd};
use pchat_procedures::mirror::{self, Ctx, FailoverReport, MirrorError};

use crate::instance::Instance;

/// How often the agent looks at the lease, the record and the leader key.
pub const TICK: Duration = Duration::from_millis(250);

/// Bound on one keep-alive of the leader lease; a failed one is tried again every [`TICK`].
const RENEW_TRY: Duration = Duration::from_millis(500);

/// How long after the last renewal etcd answered (counted from when it was sent) a principal
/// fences itself: three quarters of the TTL, so it is stopped a quarter of the TTL before
/// etcd can expire the lease and the mirror take the key. Not earlier: an etcd leader
/// election (a frozen or cut-off leader) takes one to two election timeouts (1–2 s by
/// default), during which no member renews a lease, and etcd's new leader gives every lease
/// its whole TTL again; fencing then would fail over a healthy principal for nothing
/// (found by the chaos suite: seed 28, `freeze etcd-leader`).
fn fence_after(ttl: Duration) -> Duration {
    ttl * 3 / 4
}

/// How often the principal renews its lease: every half second (a third of the TTL if
/// shorter). A keep-alive is cheap for etcd (the leader's lessor answers it, no raft
/// write), and renewing often is how a principal learns within [`REVOKED_GRACE`] that etcd
/// revoked its lease under it.
fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).min(TICK * 2)
}

/// How long a principal's PostgreSQL may be not running before its agent gives the lease up:
/// a second (a third of the TTL if shorter) — long enough not to act on a restart's gap.
fn pg_down_after(ttl: Duration) -> Duration {
    (ttl / 3).min(Duration::from_secs(1))
}

/// How long the mirror leaves the leader key vacant, when the principal did not release it
/// on purpose, before taking it: long enough for a live principal whose lease etcd revoked
/// (see the re-take in the loop) to notice at its next renewal and take the key back; the
/// lease of a principal that is really gone has already run its whole TTL.
const REVOKED_GRACE: Duration = Duration::from_millis(1_500);

/// What one automatic-failover attempt did.
#[derive(Debug)]
pub enum Attempt {
    /// This mirror is now the principal; the leader key is held under `lease`.
    Promoted {
        /// The failover.
        report: Box<FailoverReport>,
        /// The lease the leader key is under (keep it alive or revoke it).
        lease: i64,
    },
    /// Nothing to do (the principal holds the lease, this instance is not the mirror, …).
    NotNeeded(String),
    /// A failover is needed but not safe without an operator.
    Refused(String),
    /// Another watcher took the leader key first.
    Lost,
}

/// The site where `instance` is principal or mirror, its record and the record's revision.
pub async fn locate(
    ctx: &Ctx,
    instance: &str,
) -> Result<Option<(String, MirroringRecord, i64)>, MirrorError> {
    let view = pool::get(&ctx.etcd, &ctx.pool).await?;
    for site in &view.topology.sites {
        if let (Some(r), rev) = mirroring::read_record(&ctx.etcd, &ctx.pool, &site.name).await? {
            let mine = r.principal.instance == instance
                || r.mirror.as_ref().is_some_and(|m| m.instance == instance);
            if mine {
                return Ok(Some((site.name.clone(), r, rev)));
            }
        }
    }
    Ok(None)
}

/// The principal's last published principal-status.
async fn last_principal_status(ctx: &Ctx, principal: &str) -> Result<Option<Status>, MirrorError> {
    Ok(ctx
        .etcd
        .get(&keys::principal_status(&ctx.pool, principal))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

/// One automatic-failover decision by the mirror `me` of `site`: checks the record, the
/// leader key and the principal's last status, takes the leader key (one watcher wins),
/// then promotes (see the module docs). Called by the agent's watcher; public for tests.
pub async fn try_automatic_failover(
    ctx: &Ctx,
    site: &str,
    me: &str,
    ttl_s: u64,
) -> Result<Attempt, MirrorError> {
    let (Some(record), revision) = mirroring::read_record(&ctx.etcd, &ctx.pool, site).await? else {
        return Ok(Attempt::NotNeeded(format!("site {site} has no mirroring")));
    };
    if record.mirror.as_ref().is_none_or(|m| m.instance != me) || record.principal.instance == me {
        return Ok(Attempt::NotNeeded(format!(
            "{me} is not the mirror of {site}"
        )));
    }
    if record.safety != Safety::Full {
        return Ok(Attempt::NotNeeded(format!(
            "mirroring in {site} is {:?}, not FULL",
            record.safety
        )));
    }
    let key = keys::leader(&ctx.pool, site);
    if let Some(kv) = ctx.etcd.get(&key).await? {
        return Ok(Attempt::NotNeeded(format!(
            "{} holds the leader lease",
            String::from_utf8_lossy(&kv.value)
        )));
    }
    let principal = &record.principal.instance;
    let last = last_principal_status(ctx, principal).await?;
    let synchronized = last.as_ref().is_some_and(|s| {
        s.mirroring.state == MirroringState::Synchronized
            && s.mirroring.partner.as_deref() == Some(me)
    });
    if !synchronized {
        let said = match &last {
            Some(s) => format!(
                "{} (partner {}, at {})",
                s.mirroring.state,
                s.mirroring.partner.as_deref().unwrap_or("none"),
                s.at
            ),
            None => "nothing".into(),
        };
        return Ok(Attempt::Refused(format!(
            "the principal {principal} of site {site} lost its leader lease, but it last reported {said}, not SYNCHRONIZED with {me}: \
             promoting {me} could lose acknowledged commits, so it is not promoted automatically. \
             Bring {principal} back, or run `pchat db mirror failover --force` to accept the loss"
        )));
    }
    let lease = ctx.etcd.lease_grant(ttl_s).await?;
    if ctx
        .etcd
        .put_if_absent(&key, me.as_bytes(), Some(lease))
        .await?
        .is_none()
    {
        let _ = ctx.etcd.lease_revoke(lease).await;
        return Ok(Attempt::Lost);
    }
    info!(site, principal = %principal, "principal lost its leader lease while SYNCHRONIZED: automatic failover");
    // Keep the leader key while promoting (a promotion can outlast the TTL).
    let renew = Duration::from_secs(ttl_s) / 3;
    let mut progress = |line: &str| info!(site, "automatic failover: {line}");
    let failover = mirror::automatic_failover(ctx, site, revision, &mut progress);
    tokio::pin!(failover);
    let result = loop {
        tokio::select! {
            r = &mut failover => break r,
            _ = tokio::time::sleep(renew) => {
                let _ = ctx.etcd.lease_keepalive(lease).await;
            }
        }
    };
    match result {
        Ok(report) => Ok(Attempt::Promoted {
            report: Box::new(report),
            lease,
        }),
        Err(e) => {
            let _ = ctx.etcd.lease_revoke(lease).await;
            match e {
                MirrorError::NotSynchronized(m) => Ok(Attempt::Refused(m)),
                MirrorError::Conflict(_) => Ok(Attempt::Lost),
                e => Err(e),
            }
        }
    }
}

struct Held {
    site: String,
    lease: i64,
    /// When the last grant or keep-alive that etcd answered was *sent*: etcd cannot expire
    /// the lease before this instant plus the TTL.
    renewed_at: Instant,
    next_renewal: Instant,
    /// Why the renewals since the last good one failed (the last error).
    failing: Option<String>,
    /// Stop the instance when the lease is lost (a principal with a mirror to take over).
    fence_on_loss: bool,
    /// [`keys::leader_released`] of the site, and this instance's name to put there.
    released_key: String,
    me: String,
}

#[derive(Default)]
struct Watch {
    epoch: u64,
    seen: bool,
    absent_since: Option<Instant>,
    told: Option<String>,
    retry_at: Option<Instant>,
}

/// Gives the leader key up on purpose: says so first (the mirror then need not wait for the
/// principal to take a revoked key back, see [`REVOKED_GRACE`]), then revokes the lease.
async fn release(etcd: &Etcd, held: &mut Option<Held>) {
    if let Some(h) = held.take() {
        // Bounded: an unreachable etcd must not stall the loop (the lease then just expires).
        let _ = tokio::time::timeout(TICK * 2, etcd.put(&h.released_key, h.me.as_bytes())).await;
        let _ = tokio::time::timeout(TICK * 2, etcd.lease_revoke(h.lease)).await;
    }
}

/// Takes the leader key of `site` for `me` (also over a key left by this agent's previous
/// run under a lease that has not expired yet).
async fn acquire(
    etcd: &Etcd,
    key: &str,
    released_key: &str,
    me: &str,
    ttl_s: u64,
) -> Result<Option<i64>, MirrorError> {
    let lease = etcd.lease_grant(ttl_s).await?;
    let took = match etcd.put_if_absent(key, me.as_bytes(), Some(lease)).await? {
        Some(_) => true,
        None => etcd
            .put_if_value(key, me.as_bytes(), me.as_bytes(), Some(lease))
            .await?
            .is_some(),
    };
    if took {
        // Held again: a later loss of the key is not a release.
        let _ = etcd.delete(released_key).await;
        Ok(Some(lease))
    } else {
        let _ = etcd.lease_revoke(lease).await;
        Ok(None)
    }
}

/// The agent's leader-lease and watcher loop (see the module docs), and beside it the
/// health probe of the local PostgreSQL; both end when `stop` is set, without revoking the
/// lease (a stopped agent is indistinguishable from a dead one).
pub(crate) async fn run(instance: &Instance, stop: tokio::sync::watch::Receiver<bool>) {
    tokio::join!(lead(instance, stop.clone()), probe(instance, stop));
}

/// Probes PostgreSQL every [`TICK`] on a session of its own, each probe bounded
/// (`Instance::probe`), so the leader loop learns of a hung server without ever waiting on
/// it.
async fn probe(instance: &Instance, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut conn = None;
    loop {
        instance.probe(&mut conn).await;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
    }
}

/// Fences this instance without waiting on it: a fast shutdown is requested, and a hung
/// server carries it out the moment it runs again (before it could answer anything).
async fn fence_now(instance: &Instance) {
    if let Err(e) = instance.stop_nowait().await {
        warn!(error = %e, "cannot request a fast shutdown; stopping immediately");
        if let Err(e) = instance.stop(true).await {
            warn!(error = %e, "the immediate shutdown failed too");
        }
    }
}

async fn lead(instance: &Instance, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = instance.config().clone();
    let Some(etcd) = instance.etcd().cloned() else {
        return;
    };
    // The agent reaches the other agents of its site (a failover stops the old principal)
    // with its own identity, as they reach it.
    let identity = match crate::server::own_identity(&cfg) {
        Ok(me) => me.map(|me| std::sync::Arc::new(me.tls)),
        Err(e) => {
            warn!(error = %e, "the instance's identity cannot be loaded: failovers cannot reach the other agents");
            None
        }
    };
    let ctx = Ctx {
        etcd: etcd.clone(),
        pool: cfg.pool.clone(),
        agents: AgentAccess::new(&cfg.pool, identity, cfg.token.clone()),
    };
    let me = cfg.instance.clone();
    let ttl = Duration::from_secs(cfg.leader_ttl_s);
    let hung_after = Duration::from_millis(cfg.postgres_hung_timeout_ms);
    let mut held: Option<Held> = None;
    let mut watch = Watch::default();
    let mut next_acquire = Instant::now();
    let mut locate_failing = false;
    let mut pg_down_since: Option<Instant> = None;
    let mut mirror_lost_since: Option<Instant> = None;
    // The lease was given up because PostgreSQL hung: fence it once a failover has
    // happened, take the lease again if it answers first.
    let mut gave_up_hung = false;
    // A full disk with no synchronized mirror to take over was reported (once per episode).
    let mut said_full_alone = false;
    let mut next_fence_check = Instant::now();
    let mut revival = Revival::default();
    loop {
        // 0a. A fenced instance never runs writable. A failover decided while this agent was
        // down (killed, frozen, cut off from the other agents) could not stop the old
        // principal's PostgreSQL, which then still runs as the principal it was; the agent
        // stops it as soon as it is back and sees the fence, as it refuses to start it.
        // (Found by the chaos suite: `kill agent:principal`, regression
        // crates/pchat-chaos/regressions/killed-agent-fenced-principal.sched.)
        if held.is_none() && Instant::now() >= next_fence_check {
            next_fence_check = Instant::now() + ttl / 3;
            fence_if_fenced(instance, ttl / 3).await;
        }
        // 0. A principal whose PostgreSQL died under a live agent (crash, kill -9, OOM
        // killer): the lease is given up so the synchronized mirror takes over, as SQL
        // Server's witness decides when the principal database is lost. Nothing restarts it
        // here: a failover fences it, and an administrator brings it back as the mirror.
        if held.as_ref().is_some_and(|h| h.fence_on_loss) {
            if instance.is_running().await {
                pg_down_since = None;
                // 0b. It runs but answers nothing (frozen, its disk stalled): every commit
                // of the pool waits on it. Give the lease up now rather than when etcd
                // notices the agent is late (a wait on it would make the agent late), so
                // the synchronized mirror takes over at once. It is fenced once the record
                // names another principal (step 2); if nobody takes over (the mirror's
                // automatic failover is off) and it answers again, it takes the lease
                // back and the site goes on, rather than stopping for a stall.
                if let Some(silent) = instance.silent_for().filter(|s| *s >= hung_after) {
                    if instance.stalled_for().is_some_and(|s| s >= silent) {
                        warn!(
                            stalled_ms = silent.as_millis() as u64,
                            "PostgreSQL's writes make no progress (storage stalled?): sessions wait on WAL or data-file writes and the WAL flush position has not moved; giving up the leader lease so the mirror takes over"
                        );
                    } else {
                        warn!(
                            silent_ms = silent.as_millis() as u64,
                            "PostgreSQL answers nothing (hung?): giving up the leader lease so the mirror takes over"
                        );
                    }
                    release(&etcd, &mut held).await;
                    gave_up_hung = true;
                } else if let Some((full, avail)) =
                    instance.disk_full_for().filter(|(f, _)| *f >= hung_after)
                {
                    // 0c. It answers, but its disk is full: every commit that needs a new
                    // page fails (PostgreSQL stops only when the WAL cannot grow, which
                    // recycled segments can put off for minutes). The synchronized mirror
                    // has its own disk; the same hand-over as a hang, and the lease comes
                    // back if nobody takes over and room is made. Without a synchronized
                    // mirror nobody can take over: giving the lease up would only delay
                    // the site once room is made (found by the chaos suite, seed 74).
                    let synchronized = instance
                        .cached_status()
                        .is_some_and(|s| s.mirroring.state == MirroringState::Synchronized);
                    if synchronized {
                        warn!(
                            full_ms = full.as_millis() as u64,
                            available_bytes = avail,
                            data_dir = %cfg.data_dir.display(),
                            "PostgreSQL's disk is full (commits fail: no space left on device): giving up the leader lease so the mirror takes over"
                        );
                        release(&etcd, &mut held).await;
                        gave_up_hung = true;
                        said_full_alone = false;
                    } else if !said_full_alone {
                        warn!(
                            full_ms = full.as_millis() as u64,
                            available_bytes = avail,
                            data_dir = %cfg.data_dir.display(),
                            "PostgreSQL's disk is full (commits fail: no space left on device) and no synchronized mirror could take over: keeping the leader lease; make room under the data directory"
                        );
                        said_full_alone = true;
                    }
                } else {
                    said_full_alone = false;
                }
            } else if pg_down_since.get_or_insert_with(Instant::now).elapsed() >= pg_down_after(ttl)
            {
                warn!("PostgreSQL is not running on this principal: giving up the leader lease so the mirror takes over");
                release(&etcd, &mut held).await;
                pg_down_since = None;
            }
        } else {
            pg_down_since = None;
        }
        // 1. Keep the lease, or fence when it is lost.
        if let Some(h) = held.as_mut() {
            let mut lost = false;
            if Instant::now() >= h.next_renewal {
                // Each try is short and failed tries are repeated every tick: a member that
                // hangs (frozen, cut off) is given up after RENEW_TRY and the client turns to
                // the next member, so an etcd leader election costs a few tries, not the lease.
                let sent = Instant::now();
                match tokio::time::timeout(RENEW_TRY, etcd.lease_keepalive(h.lease)).await {
                    Ok(Ok(Some(_))) => {
                        h.renewed_at = sent;
                        h.next_renewal = sent + renew_every(ttl);
                        h.failing = None;
                    }
                    Ok(Ok(None)) => lost = true,
                    Ok(Err(e)) => {
                        h.next_renewal = Instant::now() + TICK;
                        h.failing = Some(e.to_string());
                    }
                    Err(_) => {
                        h.next_renewal = Instant::now() + TICK;
                        h.failing = Some(format!("no answer within {RENEW_TRY:?}"));
                    }
                }
            }
            // Revoked, not expired: a renewal went through moments ago. etcd before 3.4.28
            // and 3.5.11 does that when a paused etcd leader resumes: its lessor, still
            // primary in its own view, revokes every lease whose TTL ran out while it was
            // paused, and the revocations go to the new leader (etcd issue 12528, fixed by
            // etcd pull request 16822; Debian 12 ships 3.4.23). Found by the chaos suite:
            // `freeze etcd-leader` then failed over a healthy pair. Taking the key back with
            // create-if-absent is as safe as holding it: if the mirror's agent took it first,
            // this fails and the principal is fenced below, as for any lost lease.
            if lost && h.fence_on_loss && h.renewed_at.elapsed() <= fence_after(ttl) {
                let key = keys::leader(&cfg.pool, &h.site);
                let asked = Instant::now();
                let again = tokio::time::timeout(
                    RENEW_TRY * 2,
                    acquire(&etcd, &key, &h.released_key, &me, cfg.leader_ttl_s),
                )
                .await;
                if let Ok(Ok(Some(lease))) = again {
                    warn!(
                        site = %h.site,
                        old = h.lease,
                        lease,
                        "etcd revoked the leader lease although it was renewed {:.1} s ago (an etcd before 3.4.28 does so when a paused etcd leader resumes: etcd issue 12528); nobody had taken the key: taken again under a new lease",
                        asked.duration_since(h.renewed_at).as_secs_f64()
                    );
                    h.lease = lease;
                    h.renewed_at = asked;
                    h.next_renewal = asked + renew_every(ttl);
                    h.failing = None;
                    lost = false;
                }
            }
            if lost || h.renewed_at.elapsed() > fence_after(ttl) {
                let fence = h.fence_on_loss;
                let why = if lost {
                    "etcd says the lease is gone".to_owned()
                } else {
                    format!(
                        "no renewal for {:.1} s; the last try: {}",
                        h.renewed_at.elapsed().as_secs_f64(),
                        h.failing.as_deref().unwrap_or("none")
                    )
                };
                warn!(site = %h.site, lease = h.lease, %why, "the leader lease is lost");
                held = None;
                if fence {
                    // Before etcd can have expired the lease: no acknowledgment under an old
                    // epoch. Not waited for: a hung server would hold the loop with it.
                    warn!("fencing this principal: fast shutdown of PostgreSQL; start it again once etcd is reachable");
                    fence_now(instance).await;
                }
            }
        }
        // 2. Where this instance stands. Bounded, so that a silent etcd (packets dropped, not
        // refused) cannot hold up step 1 past the fencing deadline.
        let located = match tokio::time::timeout(ttl / 3, locate(&ctx, &me)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("etcd did not answer within {:?}", ttl / 3)),
        };
        match located {
            Err(e) => {
                if !locate_failing {
                    warn!(error = %e, "cannot read the mirroring record");
                    locate_failing = true;
                }
            }
            Ok(None) => {
                locate_failing = false;
                release(&etcd, &mut held).await;
            }
            Ok(Some((site, record, rev))) => {
                locate_failing = false;
                if held.as_ref().is_some_and(|h| h.site != site) {
                    release(&etcd, &mut held).await;
                }
                let principal = record.principal.instance == me;
                if principal {
                    revive(instance, &mut revival, record.safety == Safety::Full, ttl).await;
                } else {
                    revival = Revival::default();
                }
                if gave_up_hung && !principal {
                    // Another instance took over while this one hung: request a fast
                    // shutdown without waiting; a frozen server carries it out the moment
                    // it runs again, before it can answer anyone (its commits could not be
                    // acknowledged anyway: the mirror they wait for no longer streams).
                    warn!("a failover happened while PostgreSQL hung: fencing it (fast shutdown)");
                    fence_now(instance).await;
                    gave_up_hung = false;
                }
                if principal && record.safety == Safety::Full {
                    if held.is_some() && cfg.mirror_loss_timeout_s > 0 {
                        // The last status the publisher took: a fresh one would make this
                        // loop wait on PostgreSQL while it holds the lease.
                        let lost = instance
                            .cached_status()
                            .is_some_and(|s| s.mirroring.state == MirroringState::Disconnected);
                        if !lost {
                            mirror_lost_since = None;
                        } else if mirror_lost_since.get_or_insert_with(Instant::now).elapsed()
                            >= Duration::from_secs(cfg.mirror_loss_timeout_s)
                        {
                            mirror_lost_since = None;
                            run_exposed(&ctx, instance, &site, &record, rev).await;
                        }
                    }
                    if let Some(h) = held.as_mut() {
                        h.fence_on_loss = true;
                    } else if Instant::now() >= next_acquire {
                        next_acquire = Instant::now() + ttl / 3;
                        // Never while it answers nothing: the lease would only be given up
                        // again, and the mirror would see it held and wait.
                        if instance.silent_for().is_none()
                            && instance.disk_full_for().is_none()
                            && instance.status().await.role == Role::Principal
                        {
                            let key = keys::leader(&cfg.pool, &site);
                            let released = keys::leader_released(&cfg.pool, &site);
                            let asked = Instant::now();
                            let took = tokio::time::timeout(
                                ttl / 3,
                                acquire(&etcd, &key, &released, &me, cfg.leader_ttl_s),
                            )
                            .await
                            .unwrap_or_else(|_| {
                                Err(MirrorError::Refused("etcd did not answer in time".into()))
                            });
                            match took {
                                Ok(Some(lease)) => {
                                    info!(%site, lease, "holding the site's leader lease");
                                    gave_up_hung = false;
                                    held = Some(Held {
                                        site: site.clone(),
                                        lease,
                                        renewed_at: asked,
                                        next_renewal: asked + renew_every(ttl),
                                        failing: None,
                                        fence_on_loss: true,
                                        released_key: keys::leader_released(&cfg.pool, &site),
                                        me: me.clone(),
                                    });
                                }
                                Ok(None) => {}
                                Err(e) => warn!(error = %e, "cannot take the leader lease"),
                            }
                        }
                    }
                } else if principal {
                    // No mirror to take over: the lease would only be a way to stop the site.
                    release(&etcd, &mut held).await;
                    mirror_lost_since = None;
                    if record.safety == Safety::Suspended && record.note.starts_with(EXPOSED) {
                        resync(&ctx, instance, &site, &record, rev).await;
                    }
                } else {
                    release(&etcd, &mut held).await;
                    if record.safety == Safety::Full && cfg.auto_failover {
                        watch_principal(&ctx, &site, &me, &record, &mut watch, &mut held, ttl)
                            .await;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
    }
}

/// A principal's PostgreSQL that died on its own, and the attempts to start it again.
#[derive(Default)]
struct Revival {
    down_since: Option<Instant>,
    next_try: Option<Instant>,
    backoff: Duration,
    attempts: u32,
}

/// The first start after a death when no mirror can take over, and the longest wait
/// between two failed starts (the wait doubles from the first).
const REVIVE_AFTER: Duration = Duration::from_secs(2);
const REVIVE_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a fenced principal is looked at again.
const REVIVE_FENCED_RETRY: Duration = Duration::from_secs(60);

/// The record's principal whose PostgreSQL died on its own — a crash, kill -9, the OOM
/// killer, a PANIC when its WAL disk filled — and that nobody replaced: the agent starts it
/// again, and retries with a growing wait while the start fails (the disk is still full),
/// so the site serves again as soon as the cause is gone, without an operator. A
/// synchronized mirror goes first: the lease was given up after a second and its automatic
/// failover promotes it within a tick, so the principal waits two TTLs; a failover fences
/// it, and [`Instance::start`] refuses to start a fenced instance. A PostgreSQL stopped
/// through the agent (an API stop, a fence) or shut down cleanly by hand is never started
/// here.
async fn revive(instance: &Instance, r: &mut Revival, mirror_may_take_over: bool, ttl: Duration) {
    if instance.is_running().await {
        if r.attempts > 0 {
            info!(
                attempts = r.attempts,
                down_ms = r.down_since.map_or(0, |t| t.elapsed().as_millis() as u64),
                "PostgreSQL runs again"
            );
        }
        *r = Revival::default();
        return;
    }
    let since = *r.down_since.get_or_insert_with(Instant::now);
    let grace = if mirror_may_take_over {
        ttl * 2
    } else {
        REVIVE_AFTER
    };
    if since.elapsed() < grace || r.next_try.is_some_and(|t| Instant::now() < t) {
        return;
    }
    let Some(state) = instance.died_on_its_own().await else {
        // Stopped on purpose, or shut down cleanly: not this loop's to start.
        r.next_try = Some(Instant::now() + REVIVE_BACKOFF_MAX);
        return;
    };
    r.attempts += 1;
    warn!(
        cluster_state = %state,
        attempt = r.attempts,
        down_ms = since.elapsed().as_millis() as u64,
        "PostgreSQL of this principal stopped on its own and nobody took over: starting it again"
    );
    match instance.start().await {
        Ok(()) => {
            info!(
                attempts = r.attempts,
                down_ms = since.elapsed().as_millis() as u64,
                "PostgreSQL runs again"
            );
            *r = Revival::default();
        }
        // A failover (a DR failover of this site, say) fenced it: said once, and looked at
        // again only now and then. (When etcd cannot say, the start is retried as usual.)
        Err(crate::AgentError::Fenced(why))
            if matches!(
                tokio::time::timeout(ttl / 3, instance.fence()).await,
                Ok(Ok(Some(_)))
            ) =>
        {
            if r.attempts == 1 {
                warn!(%why, "PostgreSQL of this principal stays down");
            }
            r.next_try = Some(Instant::now() + REVIVE_FENCED_RETRY);
        }
        Err(e) => {
            r.backoff = (r.backoff * 2).clamp(REVIVE_AFTER, REVIVE_BACKOFF_MAX);
            r.next_try = Some(Instant::now() + r.backoff);
            let why = e.to_string();
            warn!(
                error = %why.lines().take(3).collect::<Vec<_>>().join(" / "),
                retry_in_ms = r.backoff.as_millis() as u64,
                "PostgreSQL did not start; trying again"
            );
        }
    }
}

/// Stops this instance's PostgreSQL when it runs as a principal while etcd records a fence
/// for it (another instance was promoted in its place); bounded by `within`.
async fn fence_if_fenced(instance: &Instance, within: Duration) {
    let fence = match tokio::time::timeout(within, instance.fence()).await {
        Ok(Ok(Some(f))) => f,
        // Not fenced, or etcd cannot say: the lease logic decides then.
        _ => return,
    };
    let writable = tokio::time::timeout(within, instance.status())
        .await
        .is_ok_and(|s| s.role == Role::Principal);
    if writable {
        warn!(by = %fence.by, epoch = fence.epoch, at = %fence.at,
            "this instance was failed over but still runs as a principal: fast shutdown of PostgreSQL (it may come back only as a mirror)");
        if let Err(e) = instance.stop(false).await {
            warn!(error = %e, "fast shutdown failed; stopping immediately");
            let _ = instance.stop(true).await;
        }
    }
}

async fn watch_principal(
    ctx: &Ctx,
    site: &str,
    me: &str,
    record: &MirroringRecord,
    watch: &mut Watch,
    held: &mut Option<Held>,
    ttl: Duration,
) {
    if watch.epoch != record.epoch {
        *watch = Watch {
            epoch: record.epoch,
            ..Watch::default()
        };
    }
    match ctx.etcd.get(&keys::leader(&ctx.pool, site)).await {
        Err(_) => return,
        Ok(Some(_)) => {
            watch.seen = true;
            watch.absent_since = None;
            watch.told = None;
            return;
        }
        Ok(None) => {}
    }
    let since = *watch.absent_since.get_or_insert_with(Instant::now);
    // Right after `mirror add` the principal may not have taken the key yet.
    if !watch.seen && since.elapsed() < 2 * ttl {
        return;
    }
    // Gone without a release: expired (the principal's agent is dead or cut off) or revoked
    // under a live principal (an etcd leader that resumes after a pause revokes leases), which
    // takes it back at its next renewal. A short wait costs a dead principal little (its
    // lease already ran the whole TTL) and spares a live one a needless failover.
    if watch.seen && since.elapsed() < REVOKED_GRACE {
        let released = ctx
            .etcd
            .get(&keys::leader_released(&ctx.pool, site))
            .await
            .ok()
            .flatten()
            .is_some_and(|kv| kv.value == record.principal.instance.as_bytes());
        if !released {
            return;
        }
    }
    if watch.retry_at.is_some_and(|t| Instant::now() < t) {
        return;
    }
    match try_automatic_failover(ctx, site, me, ttl.as_secs()).await {
        Ok(Attempt::Promoted { report, lease }) => {
            info!(
                site,
                old_principal = %report.old_principal,
                epoch = report.epoch,
                no_principal_ms = report.no_principal_ms,
                "automatic failover done: this instance is the principal"
            );
            let now = Instant::now();
            *held = Some(Held {
                site: site.to_owned(),
                lease,
                renewed_at: now,
                next_renewal: now + renew_every(ttl),
                failing: None,
                fence_on_loss: false,
                released_key: keys::leader_released(&ctx.pool, site),
                me: me.to_owned(),
            });
        }
        Ok(Attempt::Refused(why)) => {
            if watch.told.as_deref() != Some(why.as_str()) {
                warn!(site, "{why}");
                watch.told = Some(why);
            }
        }
        Ok(Attempt::NotNeeded(_)) | Ok(Attempt::Lost) => {}
        Err(e) => {
            warn!(site, error = %e, "automatic failover failed; retrying in 2 s");
            watch.retry_at = Some(Instant::now() + Duration::from_secs(2));
        }
    }
}

/// How the record's note starts while a principal runs without its lost mirror.
const EXPOSED: &str = "mirror lost";

/// The mirror has been gone for the partner timeout: the record first (no automatic
/// failover may pick a mirror that stops receiving every commit), then commits stop waiting.
async fn run_exposed(
    ctx: &Ctx,
    instance: &Instance,
    site: &str,
    record: &MirroringRecord,
    rev: i64,
) {
    let mirror = record
        .mirror
        .as_ref()
        .map_or("the mirror".to_owned(), |m| m.instance.clone());
    let mut next = record.clone();
    next.safety = Safety::Suspended;
    next.epoch += 1;
    next.changed_at = now_rfc3339();
    next.note = format!(
        "{EXPOSED}: {} runs exposed, commits do not wait for {mirror} until it is back and caught up",
        record.principal.instance
    );
    let json = serde_json::to_vec(&next).unwrap_or_default();
    match ctx
        .etcd
        .compare_and_put(&keys::mirroring(&ctx.pool, site), rev, &json)
        .await
    {
        Ok(Some(_)) => {
            warn!(site, %mirror, "the mirror is gone: running exposed (SUSPENDED); commits no longer wait for it");
            if let Err(e) = instance.set_sync_standby(None).await {
                warn!(error = %e, "cannot stop waiting for the mirror");
            }
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cannot record the lost mirror"),
    }
}

/// The lost mirror is back and has caught up: commits wait for it again (SYNCHRONIZED).
async fn resync(ctx: &Ctx, instance: &Instance, site: &str, record: &MirroringRecord, rev: i64) {
    let Some(m) = &record.mirror else {
        return;
    };
    match instance.standby_link(&m.instance).await {
        Some((state, unflushed))
            if state == "streaming" && (0..=64 * 1024).contains(&unflushed) => {}
        _ => return,
    }
    if let Err(e) = instance.set_sync_standby(Some(&m.instance)).await {
        warn!(error = %e, "cannot make the returned mirror synchronous again");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while instance.status().await.mirroring.state != MirroringState::Synchronized {
        if Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut next = record.clone();
    next.safety = Safety::Full;
    next.epoch += 1;
    next.changed_at = now_rfc3339();
    next.note = format!("mirror {} back: SYNCHRONIZED", m.instance);
    let json = serde_json::to_vec(&next).unwrap_or_default();
    if let Ok(Some(_)) = ctx
        .etcd
        .compare_and_put(&keys::mirroring(&ctx.pool, site), rev, &json)
        .await
    {
        info!(site, mirror = %m.instance, "the mirror is back and synchronized: commits wait for it again");
    }
}
