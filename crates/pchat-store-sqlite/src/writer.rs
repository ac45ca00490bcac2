//! The single writer thread and its group commit.
//!
//! Every change goes through one thread that owns the read-write connections. It drains the
//! queued batches (up to `group_commit_max_writes` writes) and makes them durable together:
//!
//! 1. plan: resolve duplicates (origin-ids, idempotency keys), refuse appends whose record
//!    revision no longer holds, and assign sequence numbers and record revisions, reading
//!    `mgc` (stable, since this thread is its only writer) and per-room cursors kept in memory;
//! 2. one `mgccomp` transaction with every compliance record of the group, committed;
//! 3. one `mgc` transaction with every room change and message, committed;
//! 4. a reply to every caller.
//!
//! Compliance goes first so that nothing is ever visible without its compliance record. A
//! crash between 2 and 3 leaves records of changes that never happened; `mgc` remembers the
//! last batch id it applied, which lets [`crate::schema::reconcile`] mark those records
//! uncommitted on the next open. When a group fails, its batches are retried one by one, so
//! that only the offending batch gets the error.

use std::collections::{HashMap, HashSet};

use pchat_room::Timestamp;
use pchat_store::{
    ExportState, NewComplianceEvent, NewMessage, StoreError, StoreResult, UserRecord, Write,
    WriteOutcome,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::data_dir::DataDirLock;
use crate::error::{classify, Result};
use crate::files::FileWrite;

/// Bits of an archive key that hold the sequence number; the room id takes the rest.
pub(crate) const SEQ_BITS: u32 = 40;
/// Highest sequence number a room can reach (about 10^12).
pub(crate) const SEQ_MAX: i64 = (1 << SEQ_BITS) - 1;
/// Highest room id the key layout allows (about 8 million rooms alive at once).
pub(crate) const ROOM_ID_MAX: i64 = (1 << (63 - SEQ_BITS)) - 1;

/// The archive key of one message: its rowid in `message` and in `message_fts`.
pub(crate) fn message_key(room_id: i64, seq: i64) -> i64 {
    (room_id << SEQ_BITS) | seq
}

/// The environment variable that selects a fault to inject (tests only).
pub const FAULT_ENV: &str = "PCHAT_FAULT";
/// [`FAULT_ENV`] value: abort the process right after a group's compliance commit, before
/// its `mgc` commit.
pub const FAULT_ABORT_AFTER_COMPLIANCE_COMMIT: &str = "abort-after-compliance-commit";

/// Where the writer sends one caller's answer.
pub(crate) type Reply<T> = oneshot::Sender<StoreResult<T>>;

/// One request to the writer thread.
pub(crate) enum Request {
    /// A batch for [`pchat_store::Store::commit`].
    Commit {
        writes: Vec<Write>,
        reply: Reply<Vec<WriteOutcome>>,
    },
    /// Create or replace a user.
    UserPut { user: UserRecord, reply: Reply<()> },
    /// Remove a user.
    UserRemove { jid: String, reply: Reply<bool> },
    /// Raise the id epoch (never lowering it); answers the epoch in force.
    RaiseIdEpoch { epoch: u64, reply: Reply<u64> },
    /// Keep an invitation for a user's next login.
    InvitationKeep {
        invitee: String,
        stanza: String,
        reply: Reply<()>,
    },
    /// Take a user's kept invitations.
    InvitationsTake {
        invitee: String,
        reply: Reply<Vec<String>>,
    },
    /// Publish a PEP item.
    PepPublish {
        owner: String,
        node: String,
        config: pchat_store::PepNode,
        item: pchat_store::PepItem,
        reply: Reply<()>,
    },
    /// Retract a PEP item (`item: Some`) or delete a node (`None`).
    PepRemove {
        owner: String,
        node: String,
        item: Option<String>,
        reply: Reply<bool>,
    },
    /// Save the directory if it is still at `revision`; answers the new revision.
    DirectoryPut {
        document: String,
        revision: i64,
        reply: Reply<i64>,
    },
    /// Move the compliance export state (a compare-and-set), recording the run.
    ExportStep {
        from: ExportState,
        to: ExportState,
        run: Option<NewComplianceEvent>,
        reply: Reply<()>,
    },
    /// Delete exported compliance records from before a time, a bounded batch.
    CompliancePurge {
        before: Timestamp,
        limit: u32,
        reply: Reply<u64>,
    },
    /// Change the uploaded files (each its own transaction; nothing kept here).
    File(FileWrite),
    /// Change the `/rooms` sessions (likewise).
    WebSession(crate::web_sessions::WebSessionWrite),
}

/// A queued batch and its caller.
struct Pending {
    writes: Vec<Write>,
    reply: Reply<Vec<WriteOutcome>>,
}

/// What the plan decided for one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Planned {
    /// Nothing to number (a delete, a compliance record, an announcement).
    Done,
    /// A room record saved with this revision.
    Saved(i64),
    /// A message numbered `seq`; `duplicate` when it is already archived (or planned).
    Appended { seq: i64, duplicate: bool },
    /// A message refused: the room's record changed after the revision it was accepted under.
    Stale,
    /// Archived messages to remove or replace (as many as were committed when planned).
    Removed(u64),
}

/// A batch's plan: one entry per write.
type Plan = Vec<Planned>;

/// A committed room's id, next sequence number and record revision.
#[derive(Clone, Copy, Debug)]
struct RoomCursor {
    id: i64,
    next_seq: i64,
    revision: i64,
}

/// A room as planned so far.
#[derive(Clone, Copy, Debug)]
struct RoomPlan {
    exists: bool,
    next_seq: i64,
    revision: i64,
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

/// Planned changes not yet committed: one for the group, one for the batch being planned
/// (merged into the group's only when the whole batch is valid, so that a refused batch
/// leaves no trace).
#[derive(Default)]
struct Layer {
    rooms: HashMap<String, RoomPlan>,
    /// Rooms whose archive this layer deletes: older layers' dedupe keys no longer count.
    cleared: HashSet<String>,
    /// (room, dedupe key) → seq, for messages this layer appends.
    origins: HashMap<(String, Dedupe), i64>,
}

impl Layer {
    fn absorb(&mut self, newer: Layer) {
        for room in newer.cleared {
            self.origins.retain(|key, _| key.0 != room);
            self.cleared.insert(room);
        }
        self.origins.extend(newer.origins);
        self.rooms.extend(newer.rooms);
    }
}

/// The writer thread's state.
pub(crate) struct Writer {
    mgc: Connection,
    comp: Connection,
    /// The data directory lock; declared last so it is released after the data connections.
    _lock: Option<DataDirLock>,
    /// Committed rooms' cursors, loaded lazily; bounded by the number of rooms.
    rooms: HashMap<String, RoomCursor>,
    next_batch_id: i64,
    /// Batch-id ranges whose compliance records must still be marked uncommitted (the marking
    /// failed, e.g. disk full). Writes are refused until it succeeds, so that `mgc`'s last
    /// applied batch id never passes them and a reopen marks them anyway.
    unmark_pending: Vec<(i64, i64)>,
    abort_after_compliance_commit: bool,
    group_commit_max_writes: usize,
    /// See [`crate::SqliteOptions::group_commit_delay_us`].
    group_commit_delay: std::time::Duration,
    /// Callers the previous group served: more than one means concurrent load.
    last_group_batches: usize,
    /// The id epoch in force ([`pchat_store::ids`]); this thread is the only one that
    /// raises it, so the copy here is always the stored one.
    id_epoch: u64,
}

impl Writer {
    pub(crate) fn new(
        mgc: Connection,
        comp: Connection,
        lock: Option<DataDirLock>,
        next_batch_id: i64,
        group_commit_max_writes: usize,
        group_commit_delay: std::time::Duration,
        id_epoch: u64,
    ) -> Writer {
        mgc.set_prepared_statement_cache_capacity(32);
        comp.set_prepared_statement_cache_capacity(8);
        let fault = std::env::var(FAULT_ENV).ok();
        let abort_after_compliance_commit =
            fault.as_deref() == Some(FAULT_ABORT_AFTER_COMPLIANCE_COMMIT);
        if abort_after_compliance_commit {
            tracing::warn!("{FAULT_ENV}={FAULT_ABORT_AFTER_COMPLIANCE_COMMIT}: the writer will abort the process");
        }
        Writer {
            mgc,
            comp,
            _lock: lock,
            rooms: HashMap::new(),
            next_batch_id,
            unmark_pending: Vec::new(),
            abort_after_compliance_commit,
            group_commit_max_writes: group_commit_max_writes.max(1),
            group_commit_delay,
            last_group_batches: 0,
            id_epoch,
        }
    }

    /// Serves requests until every sender is gone, then returns (closing the connections).
    pub(crate) fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut carried: Option<Request> = None;
        loop {
            let request = match carried.take() {
                Some(request) => request,
                None => match requests.blocking_recv() {
                    Some(request) => request,
                    None => break,
                },
            };
            match request {
                Request::Commit { writes, reply } => {
                    // Take whatever else is already queued: one durable commit serves them all.
                    let mut group = vec![Pending { writes, reply }];
                    let total = self.gather(&mut requests, &mut group, &mut carried);
                    // Under concurrent load, give the group a moment to grow: its cost is
                    // mostly per commit (two fsyncs, every touched page rewritten), not per
                    // message.
                    if carried.is_none()
                        && self.last_group_batches > 1
                        && !self.group_commit_delay.is_zero()
                        && total < self.group_commit_max_writes
                    {
                        std::thread::sleep(self.group_commit_delay);
                        self.gather(&mut requests, &mut group, &mut carried);
                    }
                    self.last_group_batches = group.len();
                    self.commit_group(group);
                }
                Request::UserPut { user, reply } => {
                    let _ = reply.send(self.user_put(&user).map_err(StoreError::from));
                }
                Request::UserRemove { jid, reply } => {
                    let _ = reply.send(self.user_remove(&jid).map_err(StoreError::from));
                }
                Request::InvitationKeep {
                    invitee,
                    stanza,
                    reply,
                } => {
                    let _ = reply.send(
                        self.invitation_keep(&invitee, &stanza)
                            .map_err(StoreError::from),
                    );
                }
                Request::InvitationsTake { invitee, reply } => {
                    let _ = reply.send(self.invitations_take(&invitee).map_err(StoreError::from));
                }
                Request::PepPublish {
                    owner,
                    node,
                    config,
                    item,
                    reply,
                } => {
                    let _ = reply.send(
                        self.pep_publish(&owner, &node, config, &item)
                            .map_err(StoreError::from),
                    );
                }
                Request::PepRemove {
                    owner,
                    node,
                    item,
                    reply,
                } => {
                    let _ = reply.send(
                        self.pep_remove(&owner, &node, item.as_deref())
                            .map_err(StoreError::from),
                    );
                }
                Request::DirectoryPut {
                    document,
                    revision,
                    reply,
                } => {
                    let _ = reply.send(
                        self.directory_put(&document, revision)
                            .map_err(StoreError::from),
                    );
                }
                Request::ExportStep {
                    from,
                    to,
                    run,
                    reply,
                } => {
                    let _ = reply.send(
                        self.export_step(&from, &to, run.as_ref())
                            .map_err(StoreError::from),
                    );
                }
                Request::CompliancePurge {
                    before,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(
                        self.compliance_purge(before, limit)
                            .map_err(StoreError::from),
                    );
                }
                Request::File(write) => write.serve(&mut self.mgc),
                Request::WebSession(write) => write.serve(&mut self.mgc),
                Request::RaiseIdEpoch { epoch, reply } => {
                    let raised =
                        crate::schema::raise_id_epoch(&self.mgc, epoch).map_err(StoreError::from);
                    if let Ok(e) = raised {
                        self.id_epoch = e;
                    }
                    let _ = reply.send(raised);
                }
            }
        }
        tracing::debug!("store writer stopped: every handle closed");
    }

    /// Adds the queued commit batches to `group` while it stays within
    /// `group_commit_max_writes`, and returns the group's number of writes; the first request
    /// that does not fit (or is not a commit) is left in `carried` for the next turn.
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
                Ok(other) => {
                    *carried = Some(other);
                    return total;
                }
                Err(_) => return total,
            }
        }
        total
    }

    /// Plans, commits and answers one group of batches.
    fn commit_group(&mut self, group: Vec<Pending>) {
        if let Err(e) = self.flush_unmark() {
            for pending in group {
                let _ = pending.reply.send(Err(copy_error(&e)));
            }
            return;
        }
        let mut planned_layer = Layer::default();
        let mut planned = Vec::with_capacity(group.len());
        for pending in group {
            match self.plan_batch(&mut planned_layer, &pending.writes) {
                Ok(plan) => planned.push((pending, plan)),
                // A refused batch is answered now and leaves the group's plan untouched.
                Err(e) => {
                    let _ = pending.reply.send(Err(e.into()));
                }
            }
        }
        if planned.is_empty() {
            return;
        }
        match self.execute(&planned) {
            Ok(room_ids) => {
                self.remember(planned_layer, &room_ids);
                for (pending, plan) in planned {
                    let _ = pending.reply.send(Ok(outcomes(&plan)));
                }
            }
            Err(e) if planned.len() == 1 => {
                for (pending, _) in planned {
                    let _ = pending.reply.send(Err(copy_error(&e)));
                }
            }
            Err(e) => {
                // Nothing of the group is in mgc. Redo each batch alone, planned afresh, so
                // that one bad batch fails alone and the others keep gapless numbers.
                tracing::warn!(error = %e, batches = planned.len(), "group commit failed; retrying its batches one by one");
                for (pending, _) in planned {
                    self.commit_group(vec![pending]);
                }
            }
        }
    }

    /// Steps 2 and 3: the compliance commit, then the mgc commit. Returns the room ids the
    /// mgc transaction resolved.
    fn execute(&mut self, planned: &[(Pending, Plan)]) -> StoreResult<HashMap<String, i64>> {
        // Batch ids are never reused, even by failed attempts: compliance records of a failed
        // attempt stay (marked uncommitted) beside those of its retry.
        let first = self.next_batch_id;
        let last = first + planned.len() as i64 - 1;
        self.next_batch_id = last + 1;

        self.write_compliance(planned, first)?;
        // Only groups that append a message: the fault is about a message whose compliance
        // record is durable while the message itself is not.
        let appends = planned.iter().any(|(_, plan)| {
            plan.iter().any(|p| {
                matches!(
                    p,
                    Planned::Appended {
                        duplicate: false,
                        ..
                    }
                )
            })
        });
        if self.abort_after_compliance_commit && appends {
            tracing::error!(
                "{FAULT_ENV}: aborting after the compliance commit of batches {first}..={last}"
            );
            std::process::abort();
        }
        match self.write_mgc(planned, last) {
            Ok(ids) => Ok(ids),
            Err(e) => {
                self.unmark_pending.push((first, last));
                if let Err(unmark) = self.flush_unmark() {
                    tracing::error!(error = %unmark, "cannot mark compliance records of failed batches");
                }
                Err(e.into())
            }
        }
    }

    /// Step 2: one transaction in mgccomp with every compliance record of the group.
    fn write_compliance(&mut self, planned: &[(Pending, Plan)], first_batch_id: i64) -> Result<()> {
        let records = planned
            .iter()
            .flat_map(|(pending, plan)| pending.writes.iter().zip(plan))
            .filter(|(write, plan)| {
                matches!(
                    (write, plan),
                    (Write::Compliance(_), _)
                        | (
                            Write::AppendMessage(_),
                            Planned::Appended {
                                duplicate: false,
                                ..
                            }
                        )
                )
            })
            .count();
        if records == 0 {
            return Ok(());
        }
        let tx = self
            .comp
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO compliance (batch_id, kind, at, room, actor, nick, detail, message_seq, committed) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1)",
            )?;
            for (batch_id, (pending, plan)) in (first_batch_id..).zip(planned) {
                for (write, planned) in pending.writes.iter().zip(plan) {
                    match (write, planned) {
                        (
                            Write::AppendMessage(m),
                            Planned::Appended {
                                seq,
                                duplicate: false,
                            },
                        ) => {
                            insert.execute(params![
                                batch_id,
                                pchat_store::ComplianceKind::Message.as_str(),
                                m.at.0,
                                m.room,
                                m.sender,
                                m.nick,
                                m.body.as_deref().unwrap_or(""),
                                seq
                            ])?;
                        }
                        (Write::Compliance(e), _) => {
                            insert.execute(params![
                                batch_id,
                                e.kind.as_str(),
                                e.at.0,
                                e.room,
                                e.actor,
                                e.nick,
                                e.detail,
                                None::<i64>
                            ])?;
                        }
                        _ => {}
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Step 3: one transaction in mgc with every room change and message of the group.
    fn write_mgc(
        &mut self,
        planned: &[(Pending, Plan)],
        last_batch_id: i64,
    ) -> Result<HashMap<String, i64>> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut ids: HashMap<String, i64> = HashMap::new();
        for (pending, plan) in planned {
            for (write, planned) in pending.writes.iter().zip(plan) {
                match write {
                    Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                        let json = serde_json::to_string(record).map_err(|e| {
                            StoreError::Invalid(format!(
                                "room record of {} cannot be serialized: {e}",
                                record.jid
                            ))
                        })?;
                        let Planned::Saved(revision) = *planned else {
                            return Err(StoreError::Invalid(format!(
                                "room {}: no revision planned for its record",
                                record.jid
                            ))
                            .into());
                        };
                        let id: i64 = tx
                            .prepare_cached(
                                "INSERT INTO room (jid, record, created_at, revision) VALUES (?1, ?2, ?3, ?4) \
                                 ON CONFLICT (jid) DO UPDATE SET record = excluded.record, created_at = excluded.created_at, \
                                 revision = excluded.revision \
                                 RETURNING id",
                            )?
                            .query_row(params![record.jid, json, record.created_at.0, revision], |r| r.get(0))?;
                        if id > ROOM_ID_MAX {
                            return Err(StoreError::Invalid(format!(
                                "cannot create room {}: room id {id} exceeds the archive key layout ({ROOM_ID_MAX})",
                                record.jid
                            ))
                            .into());
                        }
                        ids.insert(record.jid.clone(), id);
                    }
                    Write::DeleteRoom { room } => {
                        // By JID, whether or not the record is still there: a file is bound
                        // to a room's name.
                        crate::files::delete_bound(&tx, room, None)?;
                        if let Some(id) = room_id(&tx, &mut ids, room)? {
                            let (lo, hi) = (message_key(id, 1), message_key(id, SEQ_MAX));
                            // Contentless FTS5 deletes need the indexed text back.
                            tx.prepare_cached(
                                "INSERT INTO message_fts (message_fts, rowid, body) \
                                 SELECT 'delete', id, body FROM message WHERE id BETWEEN ?1 AND ?2 AND body IS NOT NULL",
                            )?
                            .execute([lo, hi])?;
                            tx.prepare_cached("DELETE FROM message WHERE id BETWEEN ?1 AND ?2")?
                                .execute([lo, hi])?;
                            tx.prepare_cached("DELETE FROM room WHERE id = ?1")?
                                .execute([id])?;
                        }
                        ids.remove(room);
                    }
                    Write::AppendMessage(m) => {
                        let Planned::Appended {
                            seq,
                            duplicate: false,
                        } = *planned
                        else {
                            continue;
                        };
                        let Some(id) = room_id(&tx, &mut ids, &m.room)? else {
                            return Err(StoreError::Invalid(format!(
                                "cannot append to room {}: it does not exist",
                                m.room
                            ))
                            .into());
                        };
                        let key = message_key(id, seq);
                        tx.prepare_cached(
                            "INSERT INTO message (id, room_id, seq, at, sender, nick, origin_id, idempotency_key, body, stanza) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                        )?
                        .execute(params![
                            key,
                            id,
                            seq,
                            m.at.0,
                            m.sender,
                            m.nick,
                            m.origin_id,
                            m.idempotency_key,
                            m.body,
                            m.stanza
                        ])?;
                        if let Some(body) = &m.body {
                            tx.prepare_cached(
                                "INSERT INTO message_fts (rowid, body) VALUES (?1, ?2)",
                            )?
                            .execute(params![key, body])?;
                        }
                    }
                    Write::RemoveMessage {
                        room,
                        seq,
                        stanza,
                        body,
                    } => {
                        if *planned == Planned::Removed(0) {
                            continue;
                        }
                        let Some(id) = room_id(&tx, &mut ids, room)? else {
                            continue;
                        };
                        let key = message_key(id, *seq);
                        let old: Option<Option<String>> = tx
                            .prepare_cached("SELECT body FROM message WHERE id = ?1")?
                            .query_row([key], |r| r.get(0))
                            .optional()?;
                        if let Some(Some(old)) = &old {
                            tx.prepare_cached(
                                "INSERT INTO message_fts (message_fts, rowid, body) VALUES ('delete', ?1, ?2)",
                            )?
                            .execute(params![key, old])?;
                        }
                        tx.prepare_cached(
                            "UPDATE message SET body = ?2, stanza = ?3 WHERE id = ?1",
                        )?
                        .execute(params![key, body, stanza])?;
                        if let (Some(_), Some(new)) = (&old, body) {
                            tx.prepare_cached(
                                "INSERT INTO message_fts (rowid, body) VALUES (?1, ?2)",
                            )?
                            .execute(params![key, new])?;
                        }
                    }
                    Write::ClearHistory { room, before } => {
                        crate::files::delete_bound(&tx, room, Some(*before))?;
                        let Some(id) = room_id(&tx, &mut ids, room)? else {
                            continue;
                        };
                        let (lo, hi) = (message_key(id, 1), message_key(id, SEQ_MAX));
                        // The highest id that goes is never handed out again.
                        tx.prepare_cached(
                            "UPDATE room SET seq_floor = max(seq_floor, coalesce(\
                             (SELECT max(seq) FROM message WHERE id BETWEEN ?2 AND ?3 AND at < ?4), 0)) \
                             WHERE id = ?1",
                        )?
                        .execute(params![id, lo, hi, before.0])?;
                        tx.prepare_cached(
                            "INSERT INTO message_fts (message_fts, rowid, body) \
                             SELECT 'delete', id, body FROM message \
                             WHERE id BETWEEN ?1 AND ?2 AND at < ?3 AND body IS NOT NULL",
                        )?
                        .execute(params![lo, hi, before.0])?;
                        tx.prepare_cached(
                            "DELETE FROM message WHERE id BETWEEN ?1 AND ?2 AND at < ?3",
                        )?
                        .execute(params![lo, hi, before.0])?;
                    }
                    Write::Compliance(_) | Write::Announce { .. } => {}
                }
            }
        }
        tx.prepare_cached("UPDATE writer_state SET last_batch_id = ?1 WHERE id = 1")?
            .execute([last_batch_id])?;
        tx.commit()?;
        Ok(ids)
    }

    /// Step 1 for one batch: checks it against the group's plan so far and assigns numbers.
    /// On error nothing of the batch enters the group's plan.
    fn plan_batch(&mut self, group: &mut Layer, writes: &[Write]) -> Result<Plan> {
        // Characters XML forbids: refused before planning, so the batch fails alone.
        pchat_store::check_storable(writes)?;
        let mut batch = Layer::default();
        let mut plan = Vec::with_capacity(writes.len());
        for write in writes {
            match write {
                Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                    if record.jid.is_empty() {
                        return Err(StoreError::Invalid("a room needs a JID".into()).into());
                    }
                    let mut state = self.room_plan(group, &batch, &record.jid)?;
                    if let Write::PutRoomIf { revision, .. } = write {
                        let current = if state.exists { state.revision } else { 0 };
                        if current != *revision {
                            return Err(StoreError::Conflict(format!(
                                "room {}: its record is at revision {current}, not {revision}",
                                record.jid
                            ))
                            .into());
                        }
                    }
                    state.revision = if state.exists { state.revision + 1 } else { 1 };
                    state.exists = true;
                    batch.rooms.insert(record.jid.clone(), state);
                    plan.push(Planned::Saved(state.revision));
                }
                Write::DeleteRoom { room } => {
                    if self.room_plan(group, &batch, room)?.exists {
                        batch.rooms.insert(
                            room.clone(),
                            RoomPlan {
                                exists: false,
                                next_seq: 1,
                                revision: 0,
                            },
                        );
                        batch.origins.retain(|key, _| key.0 != *room);
                        batch.cleared.insert(room.clone());
                    }
                    plan.push(Planned::Done);
                }
                Write::AppendMessage(m) => {
                    let mut state = self.room_plan(group, &batch, &m.room)?;
                    if !state.exists {
                        return Err(StoreError::Invalid(format!(
                            "cannot append to room {}: it does not exist",
                            m.room
                        ))
                        .into());
                    }
                    let keys = dedupe_keys(m);
                    let mut seen = None;
                    for key in &keys {
                        seen = self.find_origin(group, &batch, &m.room, key)?;
                        if seen.is_some() {
                            break;
                        }
                    }
                    if let Some(seq) = seen {
                        plan.push(Planned::Appended {
                            seq,
                            duplicate: true,
                        });
                        continue;
                    }
                    // The revision as it was before this batch: the batch's own saves were
                    // decided together with its messages.
                    if let Some(expected) = m.record_revision {
                        let before = self.room_plan(group, &Layer::default(), &m.room)?;
                        if before.revision != expected {
                            plan.push(Planned::Stale);
                            continue;
                        }
                    }
                    // The epoch in force, or the one an imported message was numbered in.
                    let epoch = self.id_epoch.max(m.id_epoch.unwrap_or(0));
                    pchat_store::ids::check_epoch(epoch)?;
                    let seq = match pchat_store::ids::next_id(state.next_seq - 1, epoch) {
                        Some(seq) if seq <= SEQ_MAX => seq,
                        _ => {
                            return Err(StoreError::Invalid(format!(
                                "the archive of room {} has used every id of its id epoch {}: \
                                 a new epoch (a restore) gives it more",
                                m.room,
                                pchat_store::ids::epoch_of(state.next_seq)
                            ))
                            .into())
                        }
                    };
                    state.next_seq = seq + 1;
                    batch.rooms.insert(m.room.clone(), state);
                    for key in keys {
                        batch.origins.insert((m.room.clone(), key), seq);
                    }
                    plan.push(Planned::Appended {
                        seq,
                        duplicate: false,
                    });
                }
                Write::RemoveMessage { room, seq, .. } => {
                    let found = match self.committed_room(room)? {
                        Some(cursor) if (1..=SEQ_MAX).contains(seq) => self
                            .mgc
                            .prepare_cached("SELECT count(*) FROM message WHERE id = ?1")?
                            .query_row([message_key(cursor.id, *seq)], |r| r.get::<_, i64>(0))?,
                        _ => 0,
                    };
                    plan.push(Planned::Removed(u64::try_from(found).unwrap_or(0)));
                }
                Write::ClearHistory { room, before } => {
                    let found = match self.committed_room(room)? {
                        Some(cursor) => self
                            .mgc
                            .prepare_cached(
                                "SELECT count(*) FROM message WHERE id BETWEEN ?1 AND ?2 AND at < ?3",
                            )?
                            .query_row(
                                params![
                                    message_key(cursor.id, 1),
                                    message_key(cursor.id, SEQ_MAX),
                                    before.0
                                ],
                                |r| r.get::<_, i64>(0),
                            )?,
                        None => 0,
                    };
                    plan.push(Planned::Removed(u64::try_from(found).unwrap_or(0)));
                }
                Write::Compliance(_) | Write::Announce { .. } => plan.push(Planned::Done),
            }
        }
        group.absorb(batch);
        Ok(plan)
    }

    /// A room's planned state: the batch's plan, else the group's, else what is committed.
    fn room_plan(&mut self, group: &Layer, batch: &Layer, room: &str) -> Result<RoomPlan> {
        if let Some(state) = batch.rooms.get(room).or_else(|| group.rooms.get(room)) {
            return Ok(*state);
        }
        Ok(match self.committed_room(room)? {
            Some(cursor) => RoomPlan {
                exists: true,
                next_seq: cursor.next_seq,
                revision: cursor.revision,
            },
            None => RoomPlan {
                exists: false,
                next_seq: 1,
                revision: 0,
            },
        })
    }

    /// The seq of an earlier message of this room with this dedupe key, planned or committed.
    fn find_origin(
        &mut self,
        group: &Layer,
        batch: &Layer,
        room: &str,
        dedupe: &Dedupe,
    ) -> Result<Option<i64>> {
        let key = (room.to_string(), dedupe.clone());
        if let Some(seq) = batch.origins.get(&key) {
            return Ok(Some(*seq));
        }
        if batch.cleared.contains(room) {
            return Ok(None);
        }
        if let Some(seq) = group.origins.get(&key) {
            return Ok(Some(*seq));
        }
        if group.cleared.contains(room) {
            return Ok(None);
        }
        let Some(cursor) = self.committed_room(room)? else {
            return Ok(None);
        };
        Ok(match dedupe {
            Dedupe::Origin { sender, origin } => self
                .mgc
                .prepare_cached(
                    "SELECT seq FROM message WHERE room_id = ?1 AND sender = ?2 AND origin_id = ?3",
                )?
                .query_row(params![cursor.id, sender, origin], |r| r.get(0))
                .optional()?,
            Dedupe::Key(key) => self
                .mgc
                .prepare_cached(
                    "SELECT seq FROM message WHERE room_id = ?1 AND idempotency_key = ?2",
                )?
                .query_row(params![cursor.id, key], |r| r.get(0))
                .optional()?,
        })
    }

    /// A committed room's cursor, from memory or loaded from mgc.
    fn committed_room(&mut self, room: &str) -> Result<Option<RoomCursor>> {
        if let Some(cursor) = self.rooms.get(room) {
            return Ok(Some(*cursor));
        }
        let row: Option<(i64, i64, i64)> = self
            .mgc
            .prepare_cached("SELECT id, revision, seq_floor FROM room WHERE jid = ?1")?
            .query_row([room], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((id, revision, seq_floor)) = row else {
            return Ok(None);
        };
        let last: Option<i64> = self
            .mgc
            .prepare_cached("SELECT max(id) FROM message WHERE id BETWEEN ?1 AND ?2")?
            .query_row([message_key(id, 1), message_key(id, SEQ_MAX)], |r| r.get(0))?;
        let cursor = RoomCursor {
            id,
            next_seq: last.map_or(0, |key| key & SEQ_MAX).max(seq_floor) + 1,
            revision,
        };
        self.rooms.insert(room.to_string(), cursor);
        Ok(Some(cursor))
    }

    /// After a successful group: its plan becomes the committed cursors.
    fn remember(&mut self, group: Layer, ids: &HashMap<String, i64>) {
        for (room, state) in group.rooms {
            if !state.exists {
                self.rooms.remove(&room);
            } else if let Some(&id) = ids.get(&room) {
                self.rooms.insert(
                    room,
                    RoomCursor {
                        id,
                        next_seq: state.next_seq,
                        revision: state.revision,
                    },
                );
            } else if let Some(cursor) = self.rooms.get_mut(&room) {
                // Only duplicates were appended: the id was not needed, the cursor is current.
                cursor.next_seq = state.next_seq;
                cursor.revision = state.revision;
            }
        }
    }

    /// Marks compliance records of failed batches uncommitted; see `unmark_pending`.
    fn flush_unmark(&mut self) -> StoreResult<()> {
        while let Some(&(lo, hi)) = self.unmark_pending.last() {
            self.comp
                .prepare_cached("UPDATE compliance SET committed = 0 WHERE batch_id BETWEEN ?1 AND ?2")
                .and_then(|mut update| update.execute([lo, hi]))
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot mark the compliance records of failed batches {lo}..={hi} uncommitted, \
                         so writes are refused until it works: {}",
                        classify(&e)
                    ))
                })?;
            self.unmark_pending.pop();
        }
        Ok(())
    }

    fn user_put(&mut self, user: &UserRecord) -> Result<()> {
        if user.jid.is_empty() {
            return Err(StoreError::Invalid("a user needs a JID".into()).into());
        }
        let (a, b) = (&user.scram_sha1, &user.scram_sha256);
        self.mgc
            .prepare_cached(
                "INSERT OR REPLACE INTO user (jid, sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, \
                 sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                user.jid,
                a.salt,
                a.iterations,
                a.stored_key,
                a.server_key,
                b.salt,
                b.iterations,
                b.stored_key,
                b.server_key,
                user.created_at.0
            ])?;
        Ok(())
    }

    fn invitation_keep(&mut self, invitee: &str, stanza: &str) -> Result<()> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        tx.prepare_cached("INSERT INTO invitation (invitee, stanza, at) VALUES (?1, ?2, ?3)")?
            .execute(params![invitee, stanza, now])?;
        tx.prepare_cached(
            "DELETE FROM invitation WHERE invitee = ?1 AND id NOT IN \
             (SELECT id FROM invitation WHERE invitee = ?1 ORDER BY id DESC LIMIT ?2)",
        )?
        .execute(params![invitee, pchat_store::INVITATIONS_KEPT_MAX])?;
        tx.commit()?;
        Ok(())
    }

    fn invitations_take(&mut self, invitee: &str) -> Result<Vec<String>> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let kept = tx
            .prepare_cached("SELECT stanza FROM invitation WHERE invitee = ?1 ORDER BY id")?
            .query_map([invitee], |r| r.get(0))?
            .collect::<std::result::Result<Vec<String>, _>>()?;
        if !kept.is_empty() {
            tx.prepare_cached("DELETE FROM invitation WHERE invitee = ?1")?
                .execute([invitee])?;
        }
        tx.commit()?;
        Ok(kept)
    }

    /// Compare-and-set of the directory document in one immediate transaction, so that two
    /// processes (a server and the shell beside it) never both win.
    fn directory_put(&mut self, document: &str, revision: i64) -> Result<i64> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx
            .prepare_cached("SELECT coalesce(max(revision), 0) FROM directory")?
            .query_row([], |r| r.get(0))?;
        if current != revision {
            return Err(StoreError::Conflict(format!(
                "the directory is at revision {current}, not {revision}: it changed meanwhile; \
                 read it again and retry"
            ))
            .into());
        }
        let next = current + 1;
        tx.prepare_cached(
            "INSERT INTO directory (id, revision, document) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, document = excluded.document",
        )?
        .execute(params![next, document])?;
        tx.commit()?;
        Ok(next)
    }

    fn export_step(
        &mut self,
        from: &ExportState,
        to: &ExportState,
        run: Option<&NewComplianceEvent>,
    ) -> Result<()> {
        let tx = self
            .comp
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = crate::read::export_state(&tx)?;
        if now != *from {
            return Err(StoreError::Conflict(format!(
                "the compliance export moved meanwhile (watermark {}, not {}): another \
                 exporter runs; read it again",
                now.watermark, from.watermark
            ))
            .into());
        }
        tx.prepare_cached(
            "UPDATE export_state SET watermark = ?1, pending_to = ?2, runs = ?3, finished_at = ?4 \
             WHERE id = 1",
        )?
        .execute(params![
            to.watermark,
            to.pending_to,
            to.runs,
            to.finished_at.map(|t| t.0)
        ])?;
        if let Some(e) = run {
            // Batch 0: below every applied batch, so always settled and committed.
            tx.prepare_cached(
                "INSERT INTO compliance (batch_id, kind, at, room, actor, nick, detail, message_seq) \
                 VALUES (0, ?1, ?2, ?3, ?4, ?5, ?6, NULL)",
            )?
            .execute(params![
                e.kind.as_str(),
                e.at.0,
                e.room,
                e.actor,
                e.nick,
                e.detail
            ])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn compliance_purge(&mut self, before: Timestamp, limit: u32) -> Result<u64> {
        let n = self
            .comp
            .prepare_cached(
                "DELETE FROM compliance WHERE id IN (SELECT id FROM compliance \
                 WHERE id <= (SELECT watermark FROM export_state WHERE id = 1) AND at < ?1 \
                 ORDER BY id LIMIT ?2)",
            )?
            .execute(params![before.0, limit])?;
        Ok(n as u64)
    }

    fn user_remove(&mut self, jid: &str) -> Result<bool> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = tx
            .prepare_cached("DELETE FROM user WHERE jid = ?1")?
            .execute([jid])?
            > 0;
        tx.prepare_cached("DELETE FROM pep_item WHERE owner = ?1")?
            .execute([jid])?;
        tx.prepare_cached("DELETE FROM pep_node WHERE owner = ?1")?
            .execute([jid])?;
        tx.commit()?;
        Ok(removed)
    }

    /// One transaction: the node made or reconfigured, the item put as the newest, the
    /// oldest beyond `max_items` removed.
    fn pep_publish(
        &mut self,
        owner: &str,
        node: &str,
        config: pchat_store::PepNode,
        item: &pchat_store::PepItem,
    ) -> Result<()> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO pep_node (owner, node, access, max_items) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (owner, node) DO UPDATE SET access = excluded.access, \
             max_items = excluded.max_items",
        )?
        .execute(params![
            owner,
            node,
            config.access.as_str(),
            config.max_items
        ])?;
        tx.prepare_cached(
            "INSERT INTO pep_item (owner, node, item, payload, at, seq) VALUES (?1, ?2, ?3, ?4, ?5, \
             (SELECT COALESCE(MAX(seq), 0) + 1 FROM pep_item WHERE owner = ?1 AND node = ?2)) \
             ON CONFLICT (owner, node, item) DO UPDATE SET payload = excluded.payload, \
             at = excluded.at, seq = excluded.seq",
        )?
        .execute(params![owner, node, item.id, item.payload, item.at.0])?;
        tx.prepare_cached(
            "DELETE FROM pep_item WHERE owner = ?1 AND node = ?2 AND seq NOT IN \
             (SELECT seq FROM pep_item WHERE owner = ?1 AND node = ?2 ORDER BY seq DESC LIMIT ?3)",
        )?
        .execute(params![owner, node, config.max_items])?;
        tx.commit()?;
        Ok(())
    }

    /// Removes one item (`Some`) or the node with its items (`None`).
    fn pep_remove(&mut self, owner: &str, node: &str, item: Option<&str>) -> Result<bool> {
        let tx = self
            .mgc
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = match item {
            Some(item) => {
                tx.prepare_cached(
                    "DELETE FROM pep_item WHERE owner = ?1 AND node = ?2 AND item = ?3",
                )?
                .execute([owner, node, item])?
                    > 0
            }
            None => {
                tx.prepare_cached("DELETE FROM pep_item WHERE owner = ?1 AND node = ?2")?
                    .execute([owner, node])?;
                tx.prepare_cached("DELETE FROM pep_node WHERE owner = ?1 AND node = ?2")?
                    .execute([owner, node])?
                    > 0
            }
        };
        tx.commit()?;
        Ok(removed)
    }
}

/// A room's id inside the mgc transaction: resolved earlier in it, or looked up.
fn room_id(conn: &Connection, ids: &mut HashMap<String, i64>, room: &str) -> Result<Option<i64>> {
    if let Some(id) = ids.get(room) {
        return Ok(Some(*id));
    }
    let id: Option<i64> = conn
        .prepare_cached("SELECT id FROM room WHERE jid = ?1")?
        .query_row([room], |r| r.get(0))
        .optional()?;
    if let Some(id) = id {
        ids.insert(room.to_string(), id);
    }
    Ok(id)
}

fn outcomes(plan: &Plan) -> Vec<WriteOutcome> {
    plan.iter()
        .map(|p| match *p {
            Planned::Appended { seq, duplicate } => WriteOutcome::Appended { seq, duplicate },
            Planned::Saved(revision) => WriteOutcome::Saved { revision },
            Planned::Stale => WriteOutcome::Stale,
            Planned::Done => WriteOutcome::Done,
            Planned::Removed(messages) => WriteOutcome::Removed { messages },
        })
        .collect()
}

/// The same error again, for each caller of a refused group (`StoreError` is not `Clone`).
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
        StoreError::Corrupt(s) => StoreError::Corrupt(s.clone()),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
    }
}
