//! The writer task of one store and its group commit.
//!
//! Every [`Store::commit`](pchat_store::Store::commit) of a store instance goes through one
//! tokio task that owns one session to each database. It takes the queued batches (up to
//! `group_commit_max_writes` writes) and makes them durable together:
//!
//! 1. `BEGIN` in mgc; lock the rows of every room the group names, in JID order (so two
//!    servers locking overlapping rooms cannot deadlock), with their `last_seq`; read the id
//!    epoch and the archived copies of the group's origin-ids and idempotency keys (one
//!    look-up each for the whole group, after the locks, which keep the answer true);
//!    meanwhile draw a batch id in mgccomp (a sequence, outside any transaction);
//! 2. for each batch in order: check that every append finds its room (a refused batch is
//!    answered alone and leaves no trace), then apply its writes: room upserts and deletes
//!    at once (each save raises the record's revision), appends deduplicated against the
//!    archive and against the group itself, refused as stale when the room's record
//!    revision (read under the lock) is no longer the one they were accepted under, and
//!    numbered from the locked `last_seq`;
//! 3. insert the group's messages (one statement), advance the rooms' `last_seq` and lock
//!    the batch id in mgc (see `compliance_after` in `read.rs`);
//! 4. in mgccomp, beside step 3: take the compliance-order lock and insert the compliance
//!    records; then, once step 3 holds the batch lock, COMMIT in mgccomp;
//! 5. in mgc: record the batch id in `applied_batch`, `NOTIFY pchat_room` (announcements,
//!    then appended rooms, then changed or deleted records), COMMIT;
//! 6. answer every caller.
//!
//! Round trips: the statements of a step are sent together ([`PgConn::pipeline`]:
//! PostgreSQL runs them in order, the answers come back together), and each step in mgc
//! goes beside its part in mgccomp. A group of messages to existing rooms costs four round
//! trips (1; 3 with 4's first part; the compliance COMMIT; 5), where one statement at a
//! time cost thirteen: what a server far from its database waits for per group (the chaos
//! suite's finding 13). Room record changes (step 2) still go one statement at a time:
//! they are rare.
//!
//! Nothing is visible before step 5's COMMIT, which follows the compliance COMMIT: no change
//! is ever seen without its compliance record. The room locks are held from step 1 to step
//! 5, so no other server can number messages of those rooms meanwhile: sequence numbers come
//! from the database alone (no in-memory cursor), gapless and unique across the pool.
//!
//! Failures: a group that fails on a broken connection, a deadlock or a serialization
//! failure before its mgc COMMIT was sent is retried once on fresh sessions (nothing of it
//! is visible; compliance records of the failed try stay, reported uncommitted). A group
//! that fails on one batch's data is retried batch by batch, so only the bad one fails.
//! When the connection breaks during the mgc COMMIT itself, the outcome is unknown and the
//! callers get `Unavailable` saying so; the group is never redone here. A caller that commits
//! the same messages again (same origin-id or idempotency key) finds them stored, once.
//!
//! Deadlines, measured here: an attempt that gets no answer from the database for
//! `commit_timeout` is given up, and a group gets [`SLOW_GROUP_ALLOWANCE`] times
//! `commit_timeout` for all its attempts. A server that stops answering (frozen, its disk or
//! host hung) would otherwise hold the writer — and with it every room of this server — for
//! as long as it hangs: PostgreSQL's `statement_timeout` is disarmed for the COMMIT and cannot
//! fire on a frozen server anyway. A slow one (a long link: a group is four round trips, ten
//! or more on new sessions) answers every statement late but answers: measuring silence rather than
//! the whole group lets its commits through slowly instead of abandoning every one (the chaos
//! suite's finding 13: from ~350 ms of round trip the server acknowledged nothing). When a
//! deadline passes the attempt is dropped with its sessions and the callers get
//! `Unavailable` (outcome unknown when COMMIT had been sent). Callers that stopped waiting
//! are dropped from a group before it starts: nobody would be answered.
//!
//! Why a resent message found stored may be acknowledged: with a synchronous mirror, a
//! COMMIT whose answer never came may have committed locally without the mirror having it
//! (PostgreSQL lets other sessions see it once the waiting session is gone). The resend
//! finds it under the room's row lock — `FOR UPDATE` gives the resend's transaction an id,
//! so its own COMMIT writes WAL after the earlier commit's and waits for the mirror to
//! flush it. Its answer, and so the acknowledgment, therefore comes only once the mirror
//! has both.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pchat_store::{ComplianceKind, NewMessage, StoreError, StoreResult, Write, WriteOutcome};
use tokio::sync::{mpsc, oneshot};

use crate::error::{copy_error, get, Error, Result};
use crate::pool::{Answered, PgConn, Session, Step};
use tokio_postgres::types::ToSql;

/// A group may take this many `commit_timeout`s in all while the database keeps answering
/// (see the module docs): with the 5 s default, 30 s — a group on new sessions (TLS, login,
/// every statement prepared again: ~20 round trips) over a link of ~1.5 s a round trip.
pub(crate) const SLOW_GROUP_ALLOWANCE: u32 = 6;

/// Advisory-lock class (first key of the two-int form, in mgccomp) held by the writer that
/// inserts compliance records, so that record ids commit in increasing order across every
/// server of the pool and a consumer paging by id never skips a late-committing lower id.
pub(crate) const COMPLIANCE_ORDER_LOCK_CLASS: i32 = 0x7063_636f; // "pcco"
/// Advisory-lock class (in mgc) of an in-flight batch: held from before its compliance
/// COMMIT until its mgc transaction ends, so a reader can wait for the batch's fate.
pub(crate) const BATCH_LOCK_CLASS: i32 = 0x7063_6262; // "pcbb"

/// The second key of a batch's advisory lock. Batch ids past 2^31 wrap around: two batches
/// sharing a key only make a reader wait for the other one too.
pub(crate) fn batch_lock_key(batch_id: i64) -> i32 {
    (batch_id & 0x7fff_ffff) as i32
}

/// The channel notified after each mgc commit that appended messages; the payload is
/// `<room jid>:<last seq>` (a bare JID has no `:`, so the last one splits it).
pub const NOTIFY_CHANNEL: &str = "pchat_room";

/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; longer JIDs (never produced by
/// the XMPP layer, which caps them at 3071 bytes) are simply not announced.
const NOTIFY_PAYLOAD_MAX: usize = 7_900;

/// Where the writer sends one caller's answer.
pub(crate) type Reply<T> = oneshot::Sender<StoreResult<T>>;

/// One request to the writer task.
pub(crate) enum Request {
    /// A batch for [`pchat_store::Store::commit`].
    Commit {
        writes: Vec<Write>,
        reply: Reply<Vec<WriteOutcome>>,
    },
    /// Test hook: the next group with compliance records fails right after its compliance
    /// COMMIT, as if the process died there.
    #[cfg(test)]
    FailAfterComplianceCommit,
    /// Test hook: the next group that appends a message loses its reply after its mgc
    /// COMMIT (see [`FAULT_LOSE_FIRST_COMMIT_REPLY`]).
    #[cfg(test)]
    LoseNextCommitReply,
}

/// The environment variable that selects a fault to inject (tests only; the SQLite store
/// reads the same one).
pub const FAULT_ENV: &str = "PCHAT_FAULT";
/// [`FAULT_ENV`] value: the first group that appends a message commits in mgc, then its
/// sessions are dropped and its callers told the outcome is unknown, as when the connection
/// is lost after COMMIT was sent. What a retry must survive without storing anything twice.
pub const FAULT_LOSE_FIRST_COMMIT_REPLY: &str = "lose-first-commit-reply";

/// A queued batch and its caller.
struct Pending {
    writes: Vec<Write>,
    reply: Reply<Vec<WriteOutcome>>,
}

/// A group that failed as a whole.
struct Failure {
    error: Error,
    /// The mgc COMMIT was sent: the group may have committed, so it must not be redone.
    mgc_commit_sent: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure {
            error,
            mgc_commit_sent: false,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Error::Store(e).into()
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Error::Pg(e).into()
    }
}

/// A room as locked and changed by the group so far.
#[derive(Clone, Copy, Debug)]
struct RoomRow {
    id: i64,
    /// The record's revision (raised by the group's saves).
    revision: i64,
    last_seq: i64,
    /// `last_seq` as stored: the row is updated at the end only when they differ.
    stored_last_seq: i64,
    /// Messages the group numbered in this room (its `message_count` rises by as many).
    added: i64,
    /// Every earlier origin-id of this room is in the group's `origins` map (looked up at
    /// lock time, or the room is empty): no per-append look-up is needed.
    origins_loaded: bool,
}

/// What makes two appends to one room the same message: the client's origin-id (per sender)
/// or the idempotency key the server gave it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Dedupe {
    Origin { sender: String, origin: String },
    Key(String),
}

/// The dedupe keys of a message, origin-id first.
fn dedupe_keys(m: &NewMessage) -> Vec<Dedupe> {
    let origin = m.origin_id.as_ref().map(|o| Dedupe::Origin {
        sender: m.sender.clone(),
        origin: o.clone(),
    });
    let key = m.idempotency_key.clone().map(Dedupe::Key);
    origin.into_iter().chain(key).collect()
}

/// A message to insert.
struct MessageRow<'a> {
    room_id: i64,
    seq: i64,
    message: &'a NewMessage,
}

/// A compliance record to insert.
struct RecordRow<'a> {
    kind: &'static str,
    at: i64,
    room: &'a str,
    actor: &'a str,
    nick: Option<&'a str>,
    detail: &'a str,
    message_seq: Option<i64>,
}

/// What the group has planned and written so far inside its mgc transaction.
#[derive(Default)]
struct GroupState<'a> {
    /// Every room the group names: `None` when it does not exist (now).
    rooms: HashMap<&'a str, Option<RoomRow>>,
    /// (room id, dedupe key) → seq, of archived and planned messages.
    origins: HashMap<(i64, Dedupe), i64>,
    messages: Vec<MessageRow<'a>>,
    records: Vec<RecordRow<'a>>,
    /// Room ids that got messages, for NOTIFY.
    appended: HashSet<i64>,
    /// The id epoch in force ([`pchat_store::ids`]), read after the room locks.
    id_epoch: u64,
}

/// A group's whole allowance, in milliseconds, for messages.
fn deadline_ms(commit_timeout: Duration) -> u128 {
    (commit_timeout * SLOW_GROUP_ALLOWANCE).as_millis()
}

/// The writer task's state: the lanes a group can commit on, and what the next group takes.
pub(crate) struct Writer {
    group_commit_max_writes: usize,
    /// See [`crate::PostgresOptions::group_commit_delay_us`].
    group_commit_delay: Duration,
    /// Callers the previous group served: more than one means concurrent load.
    last_group_batches: usize,
    /// Lanes with no group in flight.
    idle: Vec<Lane>,
    /// Shared with every lane (see [`Lane::lose_first_commit_reply`]).
    #[cfg_attr(not(test), allow(dead_code))]
    lose_first_commit_reply: std::sync::Arc<std::sync::atomic::AtomicBool>,
    #[cfg(test)]
    fail_after_compliance_commit: bool,
}

/// One group in flight at a time, on a session to each database of its own. A writer has
/// several (`writer_lanes`), so a group need not wait for the one before it to finish: far
/// from its database, one group is four round trips, and a message that came just after a
/// group started waited for all of them before its own began (the chaos suite's finding
/// 13). Groups on different lanes meet only in the database, as groups of different
/// servers always did: the room locks (taken in JID order) order them, and a resend finds
/// its first copy under its room's lock.
pub(crate) struct Lane {
    mgc_session: Session,
    comp_session: Session,
    mgc: Option<PgConn>,
    comp: Option<PgConn>,
    /// Longest an attempt may go without an answer from the database; a group gets
    /// [`SLOW_GROUP_ALLOWANCE`] times it for all its attempts (see the module docs).
    commit_timeout: Duration,
    /// When the lane's sessions last got an answer.
    answered: Answered,
    /// The attempt under way has sent its mgc COMMIT: read when a timeout cut it short, to
    /// tell its callers whether the outcome is unknown.
    commit_sent: bool,
    /// [`FAULT_LOSE_FIRST_COMMIT_REPLY`] is armed (shared by the writer's lanes: the first
    /// group that appends takes it).
    lose_first_commit_reply: std::sync::Arc<std::sync::atomic::AtomicBool>,
    #[cfg(test)]
    fail_after_compliance_commit: bool,
}

impl Writer {
    pub(crate) fn new(
        mgc_session: Session,
        comp_session: Session,
        group_commit_max_writes: usize,
        group_commit_delay: Duration,
        commit_timeout: Duration,
        lanes: usize,
    ) -> Writer {
        let lose_first_commit_reply = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
            std::env::var(FAULT_ENV).as_deref() == Ok(FAULT_LOSE_FIRST_COMMIT_REPLY),
        ));
        Writer {
            group_commit_max_writes: group_commit_max_writes.max(1),
            group_commit_delay,
            last_group_batches: 0,
            idle: (0..lanes.max(1))
                .map(|_| Lane {
                    mgc_session: mgc_session.clone(),
                    comp_session: comp_session.clone(),
                    mgc: None,
                    comp: None,
                    commit_timeout,
                    answered: Answered::new(),
                    commit_sent: false,
                    lose_first_commit_reply: lose_first_commit_reply.clone(),
                    #[cfg(test)]
                    fail_after_compliance_commit: false,
                })
                .collect(),
            lose_first_commit_reply,
            #[cfg(test)]
            fail_after_compliance_commit: false,
        }
    }

    /// Serves requests until every sender is gone and every group in flight is answered,
    /// then returns (closing the sessions). A group starts as soon as a lane is free, with
    /// whatever is queued by then: while every lane is busy, the queue grows into bigger
    /// groups.
    pub(crate) async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        use futures_util::StreamExt as _;
        let mut busy = futures_util::stream::FuturesUnordered::new();
        let mut carried: Option<Request> = None;
        loop {
            if self.idle.is_empty() {
                match busy.next().await {
                    Some(lane) => self.idle.push(lane),
                    None => unreachable!("a writer always has a lane"),
                }
            }
            let request = match carried.take() {
                Some(request) => request,
                None => tokio::select! {
                    request = requests.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                    Some(lane) = busy.next(), if !busy.is_empty() => {
                        self.idle.push(lane);
                        continue;
                    }
                },
            };
            match request {
                Request::Commit { writes, reply } => {
                    // Take whatever else is already queued: one durable commit serves them all.
                    let mut group = vec![Pending { writes, reply }];
                    let total = self.gather(&mut requests, &mut group, &mut carried);
                    // Under concurrent load, give the group a moment to grow: its round
                    // trips, statements and commits cost about the same whatever its size.
                    if carried.is_none()
                        && self.last_group_batches > 1
                        && !self.group_commit_delay.is_zero()
                        && total < self.group_commit_max_writes
                    {
                        // Keep driving the groups in flight meanwhile: they progress only
                        // when this task polls them.
                        let wait = tokio::time::sleep(self.group_commit_delay);
                        tokio::pin!(wait);
                        loop {
                            tokio::select! {
                                _ = &mut wait => break,
                                Some(lane) = busy.next(), if !busy.is_empty() => {
                                    self.idle.push(lane);
                                }
                            }
                        }
                        self.gather(&mut requests, &mut group, &mut carried);
                    }
                    self.last_group_batches = group.len();
                    let Some(mut lane) = self.idle.pop() else {
                        unreachable!("a lane was made idle above")
                    };
                    #[cfg(test)]
                    {
                        lane.fail_after_compliance_commit =
                            std::mem::take(&mut self.fail_after_compliance_commit);
                    }
                    busy.push(async move {
                        lane.commit_group(group).await;
                        lane
                    });
                }
                #[cfg(test)]
                Request::FailAfterComplianceCommit => self.fail_after_compliance_commit = true,
                #[cfg(test)]
                Request::LoseNextCommitReply => self
                    .lose_first_commit_reply
                    .store(true, std::sync::atomic::Ordering::Relaxed),
            }
        }
        while busy.next().await.is_some() {}
        tracing::debug!("PostgreSQL store writer stopped: every handle closed");
    }

    /// Adds the queued commit batches to `group` while it stays within
    /// `group_commit_max_writes`, and returns the group's number of writes; the first request
    /// that does not fit (or, in tests, is not a commit) is left in `carried` for the next
    /// turn.
    fn gather(
        &self,
        requests: &mut mpsc::Receiver<Request>,
        group: &mut Vec<Pending>,
        carried: &mut Option<Request>,
    ) -> usize {
        let mut total: usize = group.iter().map(|p| p.writes.len()).sum();
        while total < self.group_commit_max_writes {
            match requests.try_recv() {
                Ok(Request::Commit { writes, reply }) => {
                    if total + writes.len() > self.group_commit_max_writes {
                        *carried = Some(Request::Commit { writes, reply });
                        return total;
                    }
                    total += writes.len();
                    group.push(Pending { writes, reply });
                }
                #[cfg(test)]
                Ok(other) => {
                    *carried = Some(other);
                    return total;
                }
                Err(_) => return total,
            }
        }
        total
    }
}

impl Lane {
    /// Commits one group and answers its callers.
    async fn commit_group(&mut self, mut group: Vec<Pending>) {
        // A caller that stopped waiting (its store was switched to a new principal, its
        // room ended) was told nothing was done, or that the outcome is unknown and it
        // should resend: committing its writes now, on a server it has left, would only
        // make a copy nobody asked for.
        group.retain(|p| !p.reply.is_closed());
        if group.is_empty() {
            return;
        }
        let deadline = Instant::now() + self.commit_timeout * SLOW_GROUP_ALLOWANCE;
        let started = Instant::now();
        match self.attempt_with_retry(&group, deadline).await {
            Ok(results) => {
                tracing::debug!(
                    batches = group.len(),
                    writes = group.iter().map(|p| p.writes.len()).sum::<usize>(),
                    ms = started.elapsed().as_millis() as u64,
                    "group committed"
                );
                for (pending, result) in group.into_iter().zip(results) {
                    let _ = pending.reply.send(result);
                }
            }
            Err(e) if group.len() > 1 && e.is_batch_specific() => {
                // Nothing of the group is in mgc. Redo each batch alone, numbered afresh, so
                // that one bad batch fails alone and the others keep gapless numbers.
                tracing::warn!(error = %e, batches = group.len(), "group commit failed; retrying its batches one by one");
                for pending in group {
                    let result = match self
                        .attempt_with_retry(std::slice::from_ref(&pending), deadline)
                        .await
                    {
                        Ok(results) => results.into_iter().next().unwrap_or_else(|| {
                            Err(StoreError::Unavailable("no outcome for a batch".into()))
                        }),
                        Err(e) => Err(e.into()),
                    };
                    let _ = pending.reply.send(result);
                }
            }
            Err(e) => {
                let e = StoreError::from(e);
                for pending in group {
                    let _ = pending.reply.send(Err(copy_error(&e)));
                }
            }
        }
    }

    /// One attempt, and a second on fresh sessions when the first broke down before its
    /// mgc COMMIT for a reason a new session may not have (see the module docs).
    async fn attempt_with_retry(
        &mut self,
        group: &[Pending],
        deadline: Instant,
    ) -> std::result::Result<Vec<StoreResult<Vec<WriteOutcome>>>, Error> {
        let failure = match self.attempt_until(group, deadline).await {
            Ok(results) => return Ok(results),
            Err(failure) => failure,
        };
        // A failed group leaves a transaction open, maybe aborted: drop both sessions, which
        // makes the server roll back and release the room locks.
        self.disconnect();
        if failure.mgc_commit_sent || !failure.error.is_transient() {
            return Err(unknown_outcome(failure));
        }
        tracing::info!(error = %failure.error, "group commit failed on its session; retrying once on a new one");
        match self.attempt_until(group, deadline).await {
            Ok(results) => Ok(results),
            Err(failure) => {
                self.disconnect();
                Err(unknown_outcome(failure))
            }
        }
    }

    /// [`Writer::attempt`], cut short when the database has answered nothing for
    /// `commit_timeout`, or at `deadline`. A frozen server never answers, and the wait for
    /// the answer to COMMIT has no deadline of PostgreSQL's own: the future is dropped
    /// instead, its sessions with it (the caller disconnects), and the outcome is unknown if
    /// COMMIT had been sent. Never retried: the time is spent.
    async fn attempt_until(
        &mut self,
        group: &[Pending],
        deadline: Instant,
    ) -> std::result::Result<Vec<StoreResult<Vec<WriteOutcome>>>, Failure> {
        self.commit_sent = false;
        let answered = self.answered.clone();
        let silence = self.commit_timeout;
        // The attempt starts the clock of silence (its connect, if any, is bounded by the
        // query timeout within it).
        answered.mark();
        let why = {
            let mut attempt = Box::pin(self.attempt(group));
            loop {
                let quiet_until = answered.last() + silence;
                match tokio::time::timeout_at(quiet_until.min(deadline).into(), &mut attempt).await
                {
                    Ok(result) => return result,
                    Err(_) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break format!(
                                "the group commit took longer than {} ms (PostgreSQL answers, but slowly)",
                                deadline_ms(silence)
                            );
                        }
                        if answered.last() + silence <= now {
                            break format!(
                                "no answer from PostgreSQL for the commit timeout ({} ms)",
                                silence.as_millis()
                            );
                        }
                        // It answered meanwhile: slow, not hung.
                    }
                }
            }
        };
        Err(Failure {
            error: StoreError::Unavailable(why).into(),
            mgc_commit_sent: self.commit_sent,
        })
    }

    fn disconnect(&mut self) {
        self.mgc = None;
        self.comp = None;
    }

    async fn connect(&mut self) -> Result<()> {
        if self.mgc.as_ref().is_none_or(PgConn::is_closed) {
            let conn = PgConn::connect(&self.mgc_session).await?;
            self.mgc = Some(conn.watched(self.answered.clone()));
        }
        if self.comp.as_ref().is_none_or(PgConn::is_closed) {
            let conn = PgConn::connect(&self.comp_session).await?;
            self.comp = Some(conn.watched(self.answered.clone()));
        }
        Ok(())
    }

    /// Runs the whole protocol of the module docs once for a group.
    async fn attempt(
        &mut self,
        group: &[Pending],
    ) -> std::result::Result<Vec<StoreResult<Vec<WriteOutcome>>>, Failure> {
        // Refuse bad data before touching the database: such a batch fails alone.
        let prepared: Vec<StoreResult<Vec<Option<String>>>> =
            group.iter().map(|p| prepare(&p.writes)).collect();
        let mut results: Vec<StoreResult<Vec<WriteOutcome>>> = prepared
            .iter()
            .map(|p| match p {
                Ok(_) => Ok(Vec::new()),
                Err(e) => Err(copy_error(e)),
            })
            .collect();
        if prepared.iter().all(|p| p.is_err()) {
            return Ok(results);
        }

        self.connect().await?;
        #[cfg(test)]
        let fail_after_compliance_commit = std::mem::take(&mut self.fail_after_compliance_commit);
        #[cfg(not(test))]
        let fail_after_compliance_commit = false;
        let (Some(mgc), Some(comp)) = (self.mgc.as_mut(), self.comp.as_mut()) else {
            return Err(StoreError::Unavailable("no database session".into()).into());
        };

        // Step 1, one round trip. READ COMMITTED explicitly: a lock wait must end with the
        // newest version of the row (PostgreSQL re-reads it), which stricter levels would
        // turn into errors. The look-ups of earlier copies run after the lock statement (a
        // pipeline runs in order), so the locks keep their answers true until COMMIT.
        let mut state = GroupState::default();
        let mut jids: Vec<&str> = group
            .iter()
            .zip(&prepared)
            .filter(|(_, p)| p.is_ok())
            .flat_map(|(pending, _)| pending.writes.iter().filter_map(room_of))
            .collect();
        jids.sort_unstable();
        jids.dedup();
        state.rooms.extend(jids.iter().map(|jid| (*jid, None)));
        let keys = DedupeColumns::of(group, &prepared);
        let (origin_params, key_params) = keys.params();
        let mut steps = vec![Step::Simple("BEGIN ISOLATION LEVEL READ COMMITTED")];
        let lock_params: [&(dyn ToSql + Sync); 1] = [&jids];
        if !jids.is_empty() {
            steps.push(Step::Query(
                "SELECT id, jid, last_seq, revision FROM room WHERE jid = ANY($1) \
                 ORDER BY jid FOR UPDATE OF room",
                &lock_params,
            ));
        }
        // After the locks: the epoch in force when the rooms were ours.
        steps.push(Step::Query("SELECT epoch FROM id_epoch WHERE id = 1", &[]));
        if !jids.is_empty() {
            // Each key looked up on its own (LATERAL ... LIMIT 1 cannot be flattened into a
            // join), so even a plan made while the tables were empty - PostgreSQL may keep a
            // generic plan from a fresh pool's first minute until autovacuum's first ANALYZE -
            // probes the unique indexes instead of hashing the whole message table (which it
            // did: 2,278 sequential scans, 60 million rows read, in a 2-minute benchmark).
            if !keys.origins.is_empty() {
                steps.push(Step::Query(
                    "SELECT r.id, k.sender, k.origin_id, m.seq \
                     FROM unnest($1::text[], $2::text[], $3::text[]) AS k(jid, sender, origin_id) \
                     CROSS JOIN LATERAL (SELECT id FROM room WHERE jid = k.jid LIMIT 1) r \
                     CROSS JOIN LATERAL (SELECT seq FROM message WHERE room_id = r.id \
                     AND sender = k.sender AND origin_id = k.origin_id LIMIT 1) m",
                    &origin_params,
                ));
            }
            if !keys.keys.is_empty() {
                steps.push(Step::Query(
                    "SELECT r.id, k.idempotency_key, m.seq \
                     FROM unnest($1::text[], $2::text[]) AS k(jid, idempotency_key) \
                     CROSS JOIN LATERAL (SELECT id FROM room WHERE jid = k.jid LIMIT 1) r \
                     CROSS JOIN LATERAL (SELECT seq FROM message WHERE room_id = r.id \
                     AND idempotency_key = k.idempotency_key LIMIT 1) m",
                    &key_params,
                ));
            }
        }
        // Beside it in mgccomp, when the group may record anything: the batch id, drawn
        // outside any transaction (a sequence; an id drawn for a group that ends up with no
        // record is simply never used), so that step 3 can take the batch's lock in mgc.
        let may_record = group.iter().zip(&prepared).any(|(pending, p)| {
            p.is_ok()
                && pending
                    .writes
                    .iter()
                    .any(|w| matches!(w, Write::AppendMessage(_) | Write::Compliance(_)))
        });
        let draw = if may_record {
            vec![Step::Query("SELECT nextval('compliance_batch_id')", &[])]
        } else {
            Vec::new()
        };
        let (answers, drawn) = tokio::join!(mgc.pipeline(&steps), comp.pipeline(&draw));
        let drawn: Option<i64> = match drawn?.first().and_then(|rows| rows.first()) {
            Some(row) => Some(get(row, 0)?),
            None => None,
        };
        let mut answers = answers?.into_iter().skip(1);
        let locked = if jids.is_empty() {
            Vec::new()
        } else {
            answers.next().unwrap_or_default()
        };
        let epoch: i64 = match answers.next().unwrap_or_default().first() {
            Some(row) => get(row, 0)?,
            None => return Err(StoreError::Corrupt("the id epoch row is missing".into()).into()),
        };
        state.id_epoch = epoch_from(epoch)?;
        if !jids.is_empty() {
            for row in locked {
                let jid: &str = get(&row, 1)?;
                let Ok(i) = jids.binary_search(&jid) else {
                    continue;
                };
                let last_seq: i64 = get(&row, 2)?;
                state.rooms.insert(
                    jids[i],
                    Some(RoomRow {
                        id: get(&row, 0)?,
                        revision: get(&row, 3)?,
                        last_seq,
                        stored_last_seq: last_seq,
                        added: 0,
                        origins_loaded: true,
                    }),
                );
            }
            if !keys.origins.is_empty() {
                for row in answers.next().unwrap_or_default() {
                    let dedupe = Dedupe::Origin {
                        sender: get(&row, 1)?,
                        origin: get(&row, 2)?,
                    };
                    state.origins.insert((get(&row, 0)?, dedupe), get(&row, 3)?);
                }
            }
            if !keys.keys.is_empty() {
                for row in answers.next().unwrap_or_default() {
                    state
                        .origins
                        .insert((get(&row, 0)?, Dedupe::Key(get(&row, 1)?)), get(&row, 2)?);
                }
            }
        }

        // Step 2.
        for ((pending, prepared), result) in group.iter().zip(&prepared).zip(&mut results) {
            let Ok(room_json) = prepared else { continue };
            if let Err(e) = check_rooms(&state.rooms, &pending.writes) {
                *result = Err(e);
                continue;
            }
            *result = Ok(apply_batch(mgc, &mut state, &pending.writes, room_json).await?);
        }

        // Step 3 in mgc and the start of step 4 in mgccomp, side by side: one round trip.
        // The batch's lock in mgc is taken there too, before the compliance COMMIT: a
        // reader that meets the records can wait on it for the batch's fate.
        let batch_id = match (state.records.is_empty(), drawn) {
            (true, _) => None,
            (false, Some(id)) => Some(id),
            (false, None) => {
                return Err(StoreError::Unavailable("no compliance batch id drawn".into()).into())
            }
        };
        let messages = MessageColumns::of(&state.messages);
        let message_params = messages.params();
        let mut counters = (Vec::new(), Vec::new(), Vec::new());
        for r in state.rooms.values().flatten() {
            if r.last_seq != r.stored_last_seq {
                counters.0.push(r.id);
                counters.1.push(r.last_seq);
                counters.2.push(r.added);
            }
        }
        let counter_params: [&(dyn ToSql + Sync); 3] = [&counters.0, &counters.1, &counters.2];
        let batch_key = batch_id.map(batch_lock_key);
        let batch_params: [&(dyn ToSql + Sync); 2] = [&BATCH_LOCK_CLASS, &batch_key];
        let mut mgc_steps = Vec::new();
        if !state.messages.is_empty() {
            mgc_steps.push(Step::Query(
                "INSERT INTO message (room_id, seq, at, sender, nick, origin_id, idempotency_key, body, stanza) \
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::text[])",
                &message_params,
            ));
        }
        if !counters.0.is_empty() {
            mgc_steps.push(Step::Query(
                "UPDATE room SET last_seq = u.last_seq, message_count = message_count + u.added \
                 FROM unnest($1::int8[], $2::int8[], $3::int8[]) AS u(id, last_seq, added) \
                 WHERE room.id = u.id",
                &counter_params,
            ));
        }
        if batch_id.is_some() {
            mgc_steps.push(Step::Query(
                "SELECT pg_advisory_xact_lock($1::int4, $2::int4)",
                &batch_params,
            ));
        }
        let records = RecordColumns::of(&state.records);
        let record_params = records.params(&batch_id);
        let order_params: [&(dyn ToSql + Sync); 1] = [&COMPLIANCE_ORDER_LOCK_CLASS];
        let comp_steps = if batch_id.is_none() {
            Vec::new()
        } else {
            vec![
                Step::Simple("BEGIN ISOLATION LEVEL READ COMMITTED"),
                Step::Query("SELECT pg_advisory_xact_lock($1::int4, 0)", &order_params),
                Step::Query(
                    "INSERT INTO compliance (batch_id, kind, at, room, actor, nick, detail, message_seq) \
                     SELECT $1, u.kind, u.at, u.room, u.actor, u.nick, u.detail, u.message_seq \
                     FROM unnest($2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::int8[]) WITH ORDINALITY AS u(kind, at, room, actor, nick, \
                     detail, message_seq, n) ORDER BY u.n",
                    &record_params,
                ),
            ]
        };
        let (mgc_answers, comp_answers) =
            tokio::join!(mgc.pipeline(&mgc_steps), comp.pipeline(&comp_steps));
        mgc_answers?;
        comp_answers?;

        // Steps 4 and 5.
        let mut tail = Vec::new();
        let applied_params: [&(dyn ToSql + Sync); 1] = [&batch_id];
        if batch_id.is_some() {
            comp.batch("COMMIT").await?;
            if fail_after_compliance_commit {
                return Err(Failure {
                    error: StoreError::Unavailable(
                        "injected failure after the compliance commit".into(),
                    )
                    .into(),
                    mgc_commit_sent: true,
                });
            }
            tail.push(Step::Query(
                "INSERT INTO applied_batch (batch_id) VALUES ($1)",
                &applied_params,
            ));
        }
        let committed = group
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .flat_map(|(pending, _)| pending.writes.iter());
        // Announcements first: a destruction's reason must reach the other servers before
        // the record tick that would make them find the room gone without it.
        let notices: Vec<String> = committed
            .clone()
            .filter_map(|w| match w {
                Write::Announce { room, event } => event_payload(room, event),
                _ => None,
            })
            .chain(state.rooms.iter().filter_map(|(jid, row)| {
                row.filter(|r| state.appended.contains(&r.id))
                    .map(|r| format!("{jid}:{}", r.last_seq))
            }))
            // Rooms whose record changed (subject, configuration, affiliations) or went:
            // `jid:r`, so the other servers refresh their copy.
            .chain(
                committed
                    .filter_map(|w| match w {
                        Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                            Some(format!("{}:r", record.jid))
                        }
                        Write::DeleteRoom { room } => Some(format!("{room}:r")),
                        _ => None,
                    })
                    .collect::<std::collections::BTreeSet<_>>(),
            )
            .filter(|payload| payload.len() <= NOTIFY_PAYLOAD_MAX)
            .collect();
        let notify_params: [&(dyn ToSql + Sync); 2] = [&NOTIFY_CHANNEL, &notices];
        if !notices.is_empty() {
            // Queued in the transaction, delivered to listeners only if it commits.
            tail.push(Step::Query(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                &notify_params,
            ));
        }
        // The last round trip: the batch record, the notifications and COMMIT together.
        tail.push(Step::Simple("COMMIT"));
        self.commit_sent = true;
        let answers = mgc.pipeline_each(&tail).await.map_err(|error| Failure {
            error,
            mgc_commit_sent: true,
        })?;
        let last = answers.len() - 1;
        if let Some((at, Err(error))) = answers.into_iter().enumerate().find(|(_, a)| a.is_err()) {
            // The database refusing a step before COMMIT aborted the transaction: COMMIT
            // then rolls back, and nothing of the group is in mgc. Any other failure (the
            // connection lost) leaves the outcome unknown.
            let refused = at < last && matches!(&error, Error::Pg(e) if e.as_db_error().is_some());
            return Err(Failure {
                error,
                mgc_commit_sent: !refused,
            });
        }
        if !state.messages.is_empty()
            && self
                .lose_first_commit_reply
                .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!("{FAULT_ENV}={FAULT_LOSE_FIRST_COMMIT_REPLY}: committed, reporting a lost connection");
            return Err(Failure {
                error: StoreError::Unavailable(
                    "injected: the connection was lost after COMMIT was sent".into(),
                )
                .into(),
                mgc_commit_sent: true,
            });
        }
        Ok(results)
    }
}

/// `room:e` and the event as JSON on the next line; `None` when it cannot be written.
fn event_payload(room: &str, event: &pchat_room::RoomEvent) -> Option<String> {
    if room.contains('\n') {
        return None;
    }
    let json = serde_json::to_string(event).ok()?;
    Some(format!("{room}:e\n{json}"))
}

/// The store error of a failed group, saying when the outcome is unknown.
fn unknown_outcome(failure: Failure) -> Error {
    if !failure.mgc_commit_sent {
        return failure.error;
    }
    match StoreError::from(failure.error) {
        StoreError::Unavailable(m) => Error::Store(StoreError::Unavailable(format!(
            "{m}; the commit may or may not have happened (resend with the same origin-id: \
             it is deduplicated)"
        ))),
        other => Error::Store(other),
    }
}

/// The room a write names, if any (and so locks: an announcement needs no lock).
fn room_of(write: &Write) -> Option<&str> {
    match write {
        Write::PutRoom(record) | Write::PutRoomIf { record, .. } => Some(&record.jid),
        Write::DeleteRoom { room }
        | Write::RemoveMessage { room, .. }
        | Write::ClearHistory { room, .. } => Some(room),
        Write::AppendMessage(m) => Some(&m.room),
        Write::Compliance(_) | Write::Announce { .. } => None,
    }
}

/// Checks a batch's data before any SQL, and serializes its room records (one entry per
/// write, `Some` for [`Write::PutRoom`] and [`Write::PutRoomIf`]).
fn prepare(writes: &[Write]) -> StoreResult<Vec<Option<String>>> {
    // Characters XML forbids, NUL among them (which PostgreSQL text cannot hold): refusing
    // them here, before any SQL, makes the batch fail alone rather than its whole group.
    pchat_store::check_storable(writes)?;
    let mut json = Vec::with_capacity(writes.len());
    for write in writes {
        match write {
            Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                if record.jid.is_empty() {
                    return Err(StoreError::Invalid("a room needs a JID".into()));
                }
                let serialized = serde_json::to_string(record).map_err(|e| {
                    StoreError::Invalid(format!(
                        "room record of {} cannot be serialized: {e}",
                        record.jid
                    ))
                })?;
                json.push(Some(serialized));
            }
            // Announcements are sent as a notification: any text goes (JSON escapes it).
            Write::DeleteRoom { .. }
            | Write::AppendMessage(_)
            | Write::RemoveMessage { .. }
            | Write::ClearHistory { .. }
            | Write::Compliance(_)
            | Write::Announce { .. } => json.push(None),
        }
    }
    Ok(json)
}

/// Refuses a batch that appends to a room that will not exist when the append is reached.
fn check_rooms(rooms: &HashMap<&str, Option<RoomRow>>, writes: &[Write]) -> StoreResult<()> {
    let mut planned: HashMap<&str, bool> = HashMap::new();
    for write in writes {
        match write {
            Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                planned.insert(&record.jid, true);
            }
            Write::DeleteRoom { room } => {
                planned.insert(room, false);
            }
            Write::AppendMessage(m) => {
                let exists = planned
                    .get(m.room.as_str())
                    .copied()
                    .unwrap_or_else(|| matches!(rooms.get(m.room.as_str()), Some(Some(_))));
                if !exists {
                    return Err(StoreError::Invalid(format!(
                        "cannot append to room {}: it does not exist",
                        m.room
                    )));
                }
            }
            Write::RemoveMessage { .. }
            | Write::ClearHistory { .. }
            | Write::Compliance(_)
            | Write::Announce { .. } => {}
        }
    }
    Ok(())
}

/// Applies one checked batch inside the group's mgc transaction.
async fn apply_batch<'a>(
    mgc: &mut PgConn,
    state: &mut GroupState<'a>,
    writes: &'a [Write],
    room_json: &[Option<String>],
) -> Result<Vec<WriteOutcome>> {
    let mut outcomes = Vec::with_capacity(writes.len());
    // Each room's record revision before this batch touched it: what its appends are checked
    // against (the batch's own saves were decided together with its messages).
    let mut revision_before: HashMap<&str, i64> = HashMap::new();
    for (write, json) in writes.iter().zip(room_json) {
        if let Some(room) = room_of(write) {
            let current = state.rooms.get(room).copied().flatten();
            revision_before
                .entry(room)
                .or_insert_with(|| current.map_or(0, |r| r.revision));
        }
        match write {
            Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                let json = json.as_deref().unwrap_or_default();
                let current = state.rooms.get(record.jid.as_str()).copied().flatten();
                if let Write::PutRoomIf { revision, .. } = write {
                    // Under the room's row lock: nobody saves it between this look and the
                    // COMMIT. (A room created by another server since the lock query is
                    // caught by the insert below, which then meets its row.)
                    let now = current.map_or(0, |r| r.revision);
                    if now != *revision {
                        return Err(StoreError::Conflict(format!(
                            "room {}: its record is at revision {now}, not {revision}",
                            record.jid
                        ))
                        .into());
                    }
                }
                let revision = match current {
                    Some(mut room) => {
                        let row = mgc
                            .query_one(
                                "UPDATE room SET record = $2, created_at = $3, revision = revision + 1 \
                                 WHERE id = $1 RETURNING revision",
                                &[&room.id, &json, &record.created_at.0],
                            )
                            .await?;
                        room.revision = get(&row, 0)?;
                        state.rooms.insert(&record.jid, Some(room));
                        room.revision
                    }
                    None => {
                        // ON CONFLICT: another server may have created it since our lock
                        // query; its row is then locked and updated, its counter kept.
                        let row = mgc
                            .query_one(
                                "INSERT INTO room (jid, record, created_at) VALUES ($1, $2, $3) \
                                 ON CONFLICT (jid) DO UPDATE \
                                 SET record = EXCLUDED.record, created_at = EXCLUDED.created_at, \
                                 revision = room.revision + 1 \
                                 RETURNING id, last_seq, revision",
                                &[&record.jid, &json, &record.created_at.0],
                            )
                            .await?;
                        let last_seq: i64 = get(&row, 1)?;
                        let revision: i64 = get(&row, 2)?;
                        if matches!(write, Write::PutRoomIf { .. }) && revision != 1 {
                            // Created by another server since the lock query: its record
                            // was not seen here (the failed group is rolled back).
                            return Err(StoreError::Conflict(format!(
                                "room {} was created meanwhile by another writer",
                                record.jid
                            ))
                            .into());
                        }
                        state.rooms.insert(
                            &record.jid,
                            Some(RoomRow {
                                id: get(&row, 0)?,
                                revision,
                                last_seq,
                                stored_last_seq: last_seq,
                                added: 0,
                                origins_loaded: last_seq == 0,
                            }),
                        );
                        revision
                    }
                };
                outcomes.push(WriteOutcome::Saved { revision });
            }
            Write::RemoveMessage {
                room,
                seq,
                stanza,
                body,
            } => {
                let messages = match state.rooms.get(room.as_str()).copied().flatten() {
                    // The search vector is generated from the body: it follows.
                    Some(current) => mgc
                        .execute(
                            "UPDATE message SET body = $3, stanza = $4 WHERE room_id = $1 AND seq = $2",
                            &[&current.id, seq, body, stanza],
                        )
                        .await?,
                    None => 0,
                };
                outcomes.push(WriteOutcome::Removed { messages });
            }
            Write::ClearHistory { room, before } => {
                // The files posted in it before then go too (their pieces follow them), by
                // JID whether or not the record exists: a file is bound to a room's name.
                mgc.execute(
                    "DELETE FROM file WHERE room = $1 AND created_at < $2",
                    &[room, &before.0],
                )
                .await?;
                // The room's counter (`last_seq`) is not touched: no id is handed out again.
                let messages = match state.rooms.get(room.as_str()).copied().flatten() {
                    Some(current) => {
                        mgc.execute(
                            "DELETE FROM message WHERE room_id = $1 AND at < $2",
                            &[&current.id, &before.0],
                        )
                        .await?
                    }
                    None => 0,
                };
                outcomes.push(WriteOutcome::Removed { messages });
            }
            Write::DeleteRoom { room } => {
                // Its files (and their pieces) go with it, by JID whether or not the record
                // exists: a file is bound to a room's name.
                mgc.execute("DELETE FROM file WHERE room = $1", &[room])
                    .await?;
                if let Some(current) = state.rooms.get(room.as_str()).copied().flatten() {
                    // Messages planned earlier in the group die with the room, as if
                    // inserted and deleted; their compliance records stay.
                    state.messages.retain(|m| m.room_id != current.id);
                    mgc.execute("DELETE FROM room WHERE id = $1", &[&current.id])
                        .await?;
                }
                state.rooms.insert(room, None);
                outcomes.push(WriteOutcome::Done);
            }
            Write::AppendMessage(m) => {
                let Some(mut room) = state.rooms.get(m.room.as_str()).copied().flatten() else {
                    // check_rooms let it through, so this is our own bug: refuse, don't panic.
                    return Err(StoreError::Invalid(format!(
                        "cannot append to room {}: it does not exist",
                        m.room
                    ))
                    .into());
                };
                let keys = dedupe_keys(m);
                let mut seen = None;
                for dedupe in &keys {
                    seen = state.origins.get(&(room.id, dedupe.clone())).copied();
                    if seen.is_none() && !room.origins_loaded {
                        seen = archived_seq(mgc, room.id, dedupe).await?;
                    }
                    if seen.is_some() {
                        break;
                    }
                }
                if let Some(seq) = seen {
                    outcomes.push(WriteOutcome::Appended {
                        seq,
                        duplicate: true,
                    });
                    continue;
                }
                if let Some(expected) = m.record_revision {
                    if revision_before.get(m.room.as_str()) != Some(&expected) {
                        outcomes.push(WriteOutcome::Stale);
                        continue;
                    }
                }
                // The epoch in force, or the one an imported message was numbered in.
                let epoch = state.id_epoch.max(m.id_epoch.unwrap_or(0));
                pchat_store::ids::check_epoch(epoch)?;
                let Some(seq) = pchat_store::ids::next_id(room.last_seq, epoch) else {
                    return Err(StoreError::Invalid(format!(
                        "the archive of room {} has used every id of its id epoch {}: a new \
                         epoch (a failover or restore) gives it more",
                        m.room,
                        pchat_store::ids::epoch_of(room.last_seq)
                    ))
                    .into());
                };
                for dedupe in keys {
                    state.origins.insert((room.id, dedupe), seq);
                }
                room.last_seq = seq;
                room.added += 1;
                state.rooms.insert(&m.room, Some(room));
                state.appended.insert(room.id);
                state.messages.push(MessageRow {
                    room_id: room.id,
                    seq,
                    message: m,
                });
                state.records.push(RecordRow {
                    kind: ComplianceKind::Message.as_str(),
                    at: m.at.0,
                    room: &m.room,
                    actor: &m.sender,
                    nick: Some(&m.nick),
                    detail: m.body.as_deref().unwrap_or(""),
                    message_seq: Some(seq),
                });
                outcomes.push(WriteOutcome::Appended {
                    seq,
                    duplicate: false,
                });
            }
            Write::Compliance(e) => {
                state.records.push(RecordRow {
                    kind: e.kind.as_str(),
                    at: e.at.0,
                    room: &e.room,
                    actor: &e.actor,
                    nick: e.nick.as_deref(),
                    detail: &e.detail,
                    message_seq: None,
                });
                outcomes.push(WriteOutcome::Done);
            }
            // Sent with the notifications, after the group's writes.
            Write::Announce { .. } => outcomes.push(WriteOutcome::Done),
        }
    }
    Ok(outcomes)
}

/// The id epoch as stored; a negative one is not ours.
fn epoch_from(epoch: i64) -> Result<u64> {
    u64::try_from(epoch).map_err(|_| StoreError::Corrupt(format!("id epoch {epoch}")).into())
}

/// The seq of an archived message of the room with this dedupe key (a room created in this
/// group, whose earlier keys were not loaded with the others).
async fn archived_seq(mgc: &mut PgConn, room_id: i64, dedupe: &Dedupe) -> Result<Option<i64>> {
    let row = match dedupe {
        Dedupe::Origin { sender, origin } => {
            mgc.query_opt(
                "SELECT seq FROM message WHERE room_id = $1 AND sender = $2 AND origin_id = $3",
                &[&room_id, sender, origin],
            )
            .await?
        }
        Dedupe::Key(key) => {
            mgc.query_opt(
                "SELECT seq FROM message WHERE room_id = $1 AND idempotency_key = $2",
                &[&room_id, key],
            )
            .await?
        }
    };
    row.map(|row| get(&row, 0)).transpose()
}

/// The dedupe keys of a group's appends, by room JID, as columns for the look-ups of step 1.
#[derive(Default)]
struct DedupeColumns<'a> {
    /// Room, sender and origin-id of each append that carries an origin-id.
    origin_rooms: Vec<&'a str>,
    senders: Vec<&'a str>,
    origins: Vec<&'a str>,
    /// Room and idempotency key of each append that carries one.
    key_rooms: Vec<&'a str>,
    keys: Vec<&'a str>,
}

impl<'a> DedupeColumns<'a> {
    fn of(group: &'a [Pending], prepared: &[StoreResult<Vec<Option<String>>>]) -> Self {
        let mut d = DedupeColumns::default();
        for (pending, _) in group.iter().zip(prepared).filter(|(_, p)| p.is_ok()) {
            for write in &pending.writes {
                let Write::AppendMessage(m) = write else {
                    continue;
                };
                if let Some(origin) = &m.origin_id {
                    d.origin_rooms.push(&m.room);
                    d.senders.push(&m.sender);
                    d.origins.push(origin);
                }
                if let Some(key) = &m.idempotency_key {
                    d.key_rooms.push(&m.room);
                    d.keys.push(key);
                }
            }
        }
        d
    }

    fn params(&self) -> ([&(dyn ToSql + Sync); 3], [&(dyn ToSql + Sync); 2]) {
        (
            [&self.origin_rooms, &self.senders, &self.origins],
            [&self.key_rooms, &self.keys],
        )
    }
}

/// The group's messages as the columns of one INSERT.
struct MessageColumns<'a> {
    room_ids: Vec<i64>,
    seqs: Vec<i64>,
    ats: Vec<i64>,
    senders: Vec<&'a str>,
    nicks: Vec<&'a str>,
    origins: Vec<Option<&'a str>>,
    keys: Vec<Option<&'a str>>,
    bodies: Vec<Option<&'a str>>,
    stanzas: Vec<&'a str>,
}

impl<'a> MessageColumns<'a> {
    fn of(messages: &[MessageRow<'a>]) -> Self {
        MessageColumns {
            room_ids: messages.iter().map(|m| m.room_id).collect(),
            seqs: messages.iter().map(|m| m.seq).collect(),
            ats: messages.iter().map(|m| m.message.at.0).collect(),
            senders: messages.iter().map(|m| m.message.sender.as_str()).collect(),
            nicks: messages.iter().map(|m| m.message.nick.as_str()).collect(),
            origins: messages
                .iter()
                .map(|m| m.message.origin_id.as_deref())
                .collect(),
            keys: messages
                .iter()
                .map(|m| m.message.idempotency_key.as_deref())
                .collect(),
            bodies: messages.iter().map(|m| m.message.body.as_deref()).collect(),
            stanzas: messages.iter().map(|m| m.message.stanza.as_str()).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.room_ids,
            &self.seqs,
            &self.ats,
            &self.senders,
            &self.nicks,
            &self.origins,
            &self.keys,
            &self.bodies,
            &self.stanzas,
        ]
    }
}

/// The group's compliance records as the columns of one INSERT, ids following their order.
struct RecordColumns<'a> {
    kinds: Vec<&'a str>,
    ats: Vec<i64>,
    rooms: Vec<&'a str>,
    actors: Vec<&'a str>,
    nicks: Vec<Option<&'a str>>,
    details: Vec<&'a str>,
    seqs: Vec<Option<i64>>,
}

impl<'a> RecordColumns<'a> {
    fn of(records: &[RecordRow<'a>]) -> Self {
        RecordColumns {
            kinds: records.iter().map(|r| r.kind).collect(),
            ats: records.iter().map(|r| r.at).collect(),
            rooms: records.iter().map(|r| r.room).collect(),
            actors: records.iter().map(|r| r.actor).collect(),
            nicks: records.iter().map(|r| r.nick).collect(),
            details: records.iter().map(|r| r.detail).collect(),
            seqs: records.iter().map(|r| r.message_seq).collect(),
        }
    }

    /// The INSERT's parameters, the batch id first.
    fn params<'p>(&'p self, batch_id: &'p Option<i64>) -> [&'p (dyn ToSql + Sync); 8] {
        [
            batch_id,
            &self.kinds,
            &self.ats,
            &self.rooms,
            &self.actors,
            &self.nicks,
            &self.details,
            &self.seqs,
        ]
    }
}
