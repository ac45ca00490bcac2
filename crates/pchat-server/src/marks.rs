//! Pool mode: what this server acknowledged, published to etcd
//! (`/pchat/pools/P/servers/S/marks`, [`pchat_control::marks`]) so that `pchat pool
//! failover` can bound what a lost site took with it (`pchat_procedures::loss`).
//!
//! - [`Book`] is the pure bookkeeping: per room the highest id acknowledged here, the
//!   *allowance* (messages this server may acknowledge beyond its last visible publication)
//!   and the *guard* that covers the rooms it stopped listing. Time comes in as milliseconds.
//! - [`MarkedStore`] wraps the store: after a commit, the messages it numbered are
//!   acknowledged (their reflections delivered) only once the book took them within the
//!   allowance; otherwise the commit waits for the next publication, which renews it.
//! - [`run_publisher`] publishes, cheaply: only when something changed, at most every
//!   `publish_interval_ms` (sooner when an acknowledgment waits), one key per server, listing
//!   only the rooms acknowledged in within `window_s`. With tens of thousands of rooms, the
//!   few that changed are what the key holds.
//!
//! Why the upper bound holds: every acknowledged message the backup lacks was either at or
//! below a listed mark when its server last published (counted from the marks), or
//! acknowledged afterwards within the allowance that publication declared (counted as the
//! allowance), or in a room no longer listed — and those were all acknowledged before the
//! guard message was committed *by this server*, so a backup holding the guard holds them.
//! "Before" needs an order between an acknowledgment here and a later commit's place in
//! the WAL: the guard is a commit *asked for* at least [`GUARD_MARGIN_MS`] after the last
//! acknowledgment it covers ([`Ack::asked_ms`]), so its group began after the covered ones
//! had committed — however many groups the store has in flight at once (the PostgreSQL
//! store has several lanes).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pchat_control::marks::{MessageRef, ServerMarks};
use pchat_control::{keys, Etcd};
use pchat_room::RoomRecord;
use pchat_store::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceRecord, RoomStats, Store, StoreError,
    StoreResult, StoredRoom, UserRecord, Write, WriteOutcome,
};
use tokio::sync::{watch, Notify};
use tracing::warn;

use crate::config::MarksConfig;

/// How much later than the acknowledgments it covers a guard's commit must have returned:
/// far more than the time between one group's answer reaching its room task and the next
/// group's start, so that the guard's commit is later in the WAL than all of them.
pub const GUARD_MARGIN_MS: u64 = 2_000;
/// The largest allowance one publication declares, however fast the server acknowledges:
/// it is what the upper bound may exceed the truth by.
pub const ALLOWANCE_MAX: u64 = 1 << 16;
/// The most bytes of room listings one publication holds: well below etcd's request limit
/// (1.5 MiB by default), whatever names clients give their rooms.
pub const MARKS_BYTES_MAX: usize = 1 << 20;
/// What one listed room costs in the value beside its JID (quotes, colon, id, comma).
const ROOM_OVERHEAD_BYTES: usize = 24;
/// How long one publication may take before it counts as failed.
const PUT_TIMEOUT: Duration = Duration::from_secs(3);

/// One acknowledgment: a message of a room, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The room's JID.
    pub room: String,
    /// The id.
    pub id: i64,
    /// An earlier commit numbered it (a resend): it is no commit of this server's to guard
    /// with.
    pub duplicate: bool,
    /// When the commit that numbered it was asked for, in milliseconds on the book's clock
    /// (`None`: when it is acknowledged). What a guard is timed by: a commit asked for after
    /// an acknowledgment began after that acknowledgment's commit ended, however many
    /// groups the store has in flight at once.
    pub asked_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Listed {
    id: i64,
    at_ms: u64,
}

#[derive(Clone, Debug)]
struct Candidate {
    message: MessageRef,
    at_ms: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Budget {
    allowance: u64,
    used: u64,
}

impl Budget {
    fn room_for(&self, n: u64) -> bool {
        self.used + n <= self.allowance
    }
}

/// The bookkeeping behind this server's marks; see the module documentation.
#[derive(Debug)]
pub struct Book {
    cfg: MarksConfig,
    rooms: HashMap<String, Listed>,
    /// Commits of this server (not resends) that may become the guard, at most one per
    /// half margin, oldest first.
    candidates: VecDeque<Candidate>,
    guard: Option<Candidate>,
    /// The newest acknowledgment that left the listing without a guard covering it: the
    /// listing is incomplete until a guard of a later commit covers it too.
    uncovered_ms: Option<u64>,
    /// The allowance of the last publication known to be in etcd.
    visible: Option<Budget>,
    /// The publication being written, with what it already counts.
    pending: Option<(u64, Budget)>,
    serial: u64,
    dirty: bool,
    /// Acknowledgments waiting for a publication since the last one was taken.
    demand: u64,
    /// Acknowledgments since the last publication was taken.
    recent: u64,
}

impl Book {
    /// An empty book: nothing may be acknowledged before its first publication is visible.
    pub fn new(cfg: MarksConfig) -> Book {
        Book {
            cfg,
            rooms: HashMap::new(),
            candidates: VecDeque::new(),
            guard: None,
            uncovered_ms: None,
            visible: None,
            pending: None,
            serial: 0,
            dirty: true,
            demand: 0,
            recent: 0,
        }
    }

    /// Takes over what this server published in an earlier life (before a crash or a
    /// restart): those acknowledgments stay claimed until a guard of this life covers them.
    pub fn merge(&mut self, old: ServerMarks, now_ms: u64) {
        for (room, id) in old.rooms {
            let e = self
                .rooms
                .entry(room)
                .or_insert(Listed { id, at_ms: now_ms });
            e.id = e.id.max(id);
        }
        if self.guard.is_none() {
            // Earlier in the WAL than anything of this life: any guard of this life covers it.
            self.guard = old.guard.map(|message| Candidate { message, at_ms: 0 });
        }
        if old.incomplete {
            self.uncovered_ms = Some(now_ms);
        }
        self.dirty = true;
    }

    /// Records `acks` if the allowance of the visible publication, and of one being written,
    /// has room for them; `false`: they must wait for the next publication (asked for).
    pub fn try_ack(&mut self, acks: &[Ack], now_ms: u64) -> bool {
        let n = acks.len() as u64;
        let fits = self.visible.is_some_and(|b| b.room_for(n))
            && self.pending.as_ref().is_none_or(|(_, b)| b.room_for(n));
        if !fits {
            self.demand += n;
            return false;
        }
        if let Some(b) = self.visible.as_mut() {
            b.used += n;
        }
        if let Some((_, b)) = self.pending.as_mut() {
            b.used += n;
        }
        for a in acks {
            let e = self.rooms.entry(a.room.clone()).or_insert(Listed {
                id: a.id,
                at_ms: now_ms,
            });
            e.id = e.id.max(a.id);
            e.at_ms = now_ms;
            let spaced = self
                .candidates
                .back()
                .is_none_or(|c| now_ms >= c.at_ms + GUARD_MARGIN_MS / 2);
            if !a.duplicate && spaced {
                self.candidates.push_back(Candidate {
                    message: MessageRef {
                        room: a.room.clone(),
                        id: a.id,
                    },
                    at_ms: a.asked_ms.map_or(now_ms, |t| t.min(now_ms)),
                });
            }
        }
        self.recent += n;
        self.dirty = true;
        true
    }

    /// Whether a publication should be taken now: something changed, an acknowledgment
    /// waits, or none is visible yet; never while one is being written.
    pub fn due(&self) -> bool {
        self.pending.is_none() && (self.dirty || self.demand > 0 || self.visible.is_none())
    }

    /// Takes a publication (`serving`: the allowance to declare; a server that stops
    /// serving declares none). Rooms acknowledged in longer ago than the window leave the
    /// listing when a guard can cover them; beyond `rooms_max` the oldest leave anyway and
    /// the listing is marked incomplete.
    pub fn snapshot(&mut self, now_ms: u64, serving: bool) -> Option<ServerMarks> {
        if self.pending.is_some() {
            return None;
        }
        let window_ms = self.cfg.window_s.saturating_mul(1000);
        let old_before = now_ms.saturating_sub(window_ms);
        self.evict(|l| l.at_ms < old_before, false);
        if let Some(cut) = self.over_limits() {
            // The oldest first, down to the limits: with a guard when one can cover them…
            self.evict(|l| l.at_ms <= cut, false);
            if let Some(cut) = self.over_limits() {
                // …and without one when none can (thousands of rooms within the margin).
                self.evict(|l| l.at_ms <= cut, true);
            }
        }
        // Rooms left out uncovered: the first commit late enough covers them after all.
        if let Some(u) = self.uncovered_ms.filter(|_| self.incomplete()) {
            if let Some(c) = self
                .candidates
                .iter()
                .find(|c| c.at_ms >= u + GUARD_MARGIN_MS)
            {
                self.guard = Some(c.clone());
            }
        }
        // A candidate too early to cover the oldest listed room (or what is uncovered) can
        // never become the guard.
        let oldest = self
            .rooms
            .values()
            .map(|l| l.at_ms)
            .chain(self.uncovered_ms)
            .min()
            .unwrap_or(now_ms);
        while self
            .candidates
            .front()
            .is_some_and(|c| c.at_ms < oldest + GUARD_MARGIN_MS && self.candidates.len() > 1)
        {
            self.candidates.pop_front();
        }
        let allowance = if serving {
            self.cfg
                .allowance_messages_min
                .max(self.demand)
                .max(self.recent.saturating_mul(2))
                .min(ALLOWANCE_MAX)
        } else {
            0
        };
        self.serial += 1;
        self.pending = Some((self.serial, Budget { allowance, used: 0 }));
        self.dirty = false;
        self.demand = 0;
        self.recent = 0;
        Some(ServerMarks {
            serial: self.serial,
            at: String::new(),
            rooms: self.rooms.iter().map(|(r, l)| (r.clone(), l.id)).collect(),
            allowance,
            guard: self.guard.as_ref().map(|g| g.message.clone()),
            incomplete: self.incomplete(),
        })
    }

    /// When the listing holds more rooms than `rooms_max`, or more bytes than
    /// [`MARKS_BYTES_MAX`] (room JIDs are client-chosen, up to 3 KB each): the last
    /// acknowledgment time at or before which rooms must leave it.
    fn over_limits(&self) -> Option<u64> {
        let mut rooms: Vec<(u64, usize)> = self
            .rooms
            .iter()
            .map(|(r, l)| (l.at_ms, r.len() + ROOM_OVERHEAD_BYTES))
            .collect();
        // Newest first: the newest rooms stay.
        rooms.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
        let mut bytes = 0;
        for (i, (at, size)) in rooms.iter().enumerate() {
            bytes += size;
            if i >= self.cfg.rooms_max || bytes > MARKS_BYTES_MAX {
                return Some(*at);
            }
        }
        None
    }

    /// Rooms left the listing that no guard covers.
    fn incomplete(&self) -> bool {
        self.uncovered_ms.is_some_and(|u| {
            self.guard
                .as_ref()
                .is_none_or(|g| g.at_ms < u + GUARD_MARGIN_MS)
        })
    }

    /// Drops the rooms `old` selects from the listing, setting the guard that covers them;
    /// without a candidate late enough, only those it can cover go (or, with `forced`, all
    /// of them, and the listing is incomplete).
    fn evict(&mut self, old: impl Fn(&Listed) -> bool, forced: bool) {
        let latest = self.candidates.back().map(|c| c.at_ms);
        let coverable = |l: &Listed| latest.is_some_and(|t| l.at_ms + GUARD_MARGIN_MS <= t);
        let gone: Vec<(String, Listed)> = self
            .rooms
            .iter()
            .filter(|(_, l)| old(l) && (forced || coverable(l)))
            .map(|(r, l)| (r.clone(), *l))
            .collect();
        let Some(newest) = gone.iter().map(|(_, l)| l.at_ms).max() else {
            return;
        };
        for (r, _) in &gone {
            self.rooms.remove(r);
        }
        // The earliest commit that returned late enough after every acknowledgment left out
        // (later ones cover all earlier evictions too).
        match self
            .candidates
            .iter()
            .find(|c| c.at_ms >= newest + GUARD_MARGIN_MS)
        {
            Some(c) => {
                if self.guard.as_ref().is_none_or(|g| g.at_ms < c.at_ms) {
                    self.guard = Some(c.clone());
                }
            }
            None => self.uncovered_ms = Some(self.uncovered_ms.unwrap_or(0).max(newest)),
        }
    }

    /// The publication `serial` is in etcd: its allowance is the one that counts now.
    pub fn published(&mut self, serial: u64) {
        if let Some((s, b)) = self.pending {
            if s == serial {
                self.visible = Some(b);
                self.pending = None;
            }
        }
    }

    /// The publication `serial` could not be written: the visible one still counts.
    pub fn failed(&mut self, serial: u64) {
        if self.pending.is_some_and(|(s, _)| s == serial) {
            self.pending = None;
            self.dirty = true;
        }
    }
}

/// The book shared by the store wrapper and the publisher.
pub struct Marks {
    book: Mutex<Book>,
    /// The serial of the last visible publication.
    visible: watch::Sender<u64>,
    wake: Notify,
    cfg: MarksConfig,
    epoch: Instant,
}

impl Marks {
    /// A fresh book.
    pub fn new(cfg: MarksConfig) -> Arc<Marks> {
        Arc::new(Marks {
            book: Mutex::new(Book::new(cfg.clone())),
            visible: watch::channel(0).0,
            wake: Notify::new(),
            cfg,
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `acks` fit an allowance (bounded by `ack_wait_ms`); `Unavailable`
    /// otherwise: the room retries the same commit, which finds its messages stored.
    pub async fn acknowledge(&self, acks: &[Ack]) -> StoreResult<()> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.ack_wait_ms);
        loop {
            let mut visible = self.visible.subscribe();
            if self.book().try_ack(acks, self.now_ms()) {
                return Ok(());
            }
            self.wake.notify_one();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, visible.changed()).await.is_err() {
                return Err(StoreError::Unavailable(format!(
                    "this server cannot publish its acknowledgments to etcd (none visible within {} ms); \
                     the messages are stored and will be acknowledged once it can",
                    self.cfg.ack_wait_ms
                )));
            }
        }
    }

    /// Reads what this server published in an earlier life and takes it over (once, before
    /// its first publication).
    pub async fn recover(&self, etcd: &Etcd, pool: &str, server: &str) {
        match etcd.get(&keys::server_marks(pool, server)).await {
            Ok(Some(kv)) => match ServerMarks::decode(&kv.value) {
                Ok(old) => {
                    let now = self.now_ms();
                    self.book().merge(old, now);
                }
                Err(e) => {
                    warn!(error = %e, "this server's earlier marks are unreadable; starting afresh (the next failover has no upper loss bound)")
                }
            },
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read this server's earlier marks"),
        }
    }

    /// Takes and writes one publication if one is due; returns whether one became visible.
    async fn publish_once(&self, etcd: &Etcd, key: &str, serving: bool) -> bool {
        let taken = {
            let mut book = self.book();
            if serving && !book.due() {
                return false;
            }
            book.snapshot(self.now_ms(), serving)
        };
        let Some(mut marks) = taken else {
            return false;
        };
        marks.at = crate::datetime::format(crate::datetime::now());
        let serial = marks.serial;
        let written = tokio::time::timeout(PUT_TIMEOUT, etcd.put(key, &marks.encode()))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(_) => {
                self.book().published(serial);
                self.visible.send_replace(serial);
                true
            }
            Err(e) => {
                self.book().failed(serial);
                warn!(error = %e, "cannot publish this server's acknowledgment marks");
                false
            }
        }
    }
}

/// Publishes this server's marks while it serves: at once, then whenever something changed
/// (at most every `publish_interval_ms`) or an acknowledgment waits; when `stop` fires, a
/// last publication with no allowance (nothing more will be acknowledged).
pub async fn run_publisher(
    marks: Arc<Marks>,
    etcd: Etcd,
    pool: String,
    server: String,
    mut stop: watch::Receiver<bool>,
) {
    let key = keys::server_marks(&pool, &server);
    let interval = Duration::from_millis(marks.cfg.publish_interval_ms.max(1));
    loop {
        marks.publish_once(&etcd, &key, true).await;
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = marks.wake.notified() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
    }
    // Bounded: a server leaving the pool does not wait long on an unreachable etcd.
    for _ in 0..3 {
        if marks.publish_once(&etcd, &key, false).await {
            break;
        }
    }
}

/// The store the rooms use in pool mode: the real one, whose appended messages are
/// acknowledged only within this server's published allowance.
pub struct MarkedStore {
    inner: Arc<dyn Store>,
    marks: Arc<Marks>,
}

impl MarkedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, marks: Arc<Marks>) -> Arc<MarkedStore> {
        Arc::new(MarkedStore { inner, marks })
    }
}

#[async_trait]
impl Store for MarkedStore {
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        let rooms: Vec<Option<String>> = writes
            .iter()
            .map(|w| match w {
                Write::AppendMessage(m) => Some(m.room.clone()),
                _ => None,
            })
            .collect();
        let asked_ms = self.marks.now_ms();
        let outcomes = self.inner.commit(writes).await?;
        let acks: Vec<Ack> = rooms
            .into_iter()
            .zip(&outcomes)
            .filter_map(|(room, o)| match (room, o) {
                (Some(room), WriteOutcome::Appended { seq, duplicate }) => Some(Ack {
                    room,
                    id: *seq,
                    duplicate: *duplicate,
                    asked_ms: Some(asked_ms),
                }),
                _ => None,
            })
            .collect();
        if !acks.is_empty() {
            self.marks.acknowledge(&acks).await?;
        }
        Ok(outcomes)
    }
    async fn server_secret(&self) -> StoreResult<Vec<u8>> {
        self.inner.server_secret().await
    }
    async fn directory_get(&self) -> StoreResult<pchat_store::StoredDirectory> {
        self.inner.directory_get().await
    }
    async fn directory_revision(&self) -> StoreResult<i64> {
        self.inner.directory_revision().await
    }
    async fn invitation_keep(&self, invitee: &str, stanza: &str) -> StoreResult<()> {
        self.inner.invitation_keep(invitee, stanza).await
    }
    async fn invitations_take(&self, invitee: &str) -> StoreResult<Vec<String>> {
        self.inner.invitations_take(invitee).await
    }
    async fn pep_publish(
        &self,
        owner: &str,
        node: &str,
        config: pchat_store::PepNode,
        item: pchat_store::PepItem,
    ) -> StoreResult<()> {
        self.inner.pep_publish(owner, node, config, item).await
    }
    async fn pep_node(&self, owner: &str, node: &str) -> StoreResult<Option<pchat_store::PepNode>> {
        self.inner.pep_node(owner, node).await
    }
    async fn pep_nodes(&self, owner: &str) -> StoreResult<Vec<String>> {
        self.inner.pep_nodes(owner).await
    }
    async fn pep_items(&self, owner: &str, node: &str) -> StoreResult<Vec<pchat_store::PepItem>> {
        self.inner.pep_items(owner, node).await
    }
    async fn pep_retract(&self, owner: &str, node: &str, id: &str) -> StoreResult<bool> {
        self.inner.pep_retract(owner, node, id).await
    }
    async fn pep_delete(&self, owner: &str, node: &str) -> StoreResult<bool> {
        self.inner.pep_delete(owner, node).await
    }
    async fn directory_put(
        &self,
        directory: &pchat_room::directory::Directory,
        revision: i64,
    ) -> StoreResult<i64> {
        self.inner.directory_put(directory, revision).await
    }
    async fn user_put(&self, user: UserRecord) -> StoreResult<()> {
        self.inner.user_put(user).await
    }
    async fn user_get(&self, jid: &str) -> StoreResult<Option<UserRecord>> {
        self.inner.user_get(jid).await
    }
    async fn user_remove(&self, jid: &str) -> StoreResult<bool> {
        self.inner.user_remove(jid).await
    }
    async fn user_list(&self) -> StoreResult<Vec<String>> {
        self.inner.user_list().await
    }
    async fn room_list(&self) -> StoreResult<Vec<RoomRecord>> {
        self.inner.room_list().await
    }
    async fn room_get(&self, room: &str) -> StoreResult<Option<RoomRecord>> {
        self.inner.room_get(room).await
    }
    async fn room_load(&self, room: &str) -> StoreResult<Option<StoredRoom>> {
        self.inner.room_load(room).await
    }
    async fn room_stats(&self, room: &str) -> StoreResult<RoomStats> {
        self.inner.room_stats(room).await
    }
    async fn archive_page(&self, room: &str, query: &ArchiveQuery) -> StoreResult<ArchivePage> {
        self.inner.archive_page(room, query).await
    }
    async fn archive_get(&self, room: &str, seq: i64) -> StoreResult<Option<ArchivedMessage>> {
        self.inner.archive_get(room, seq).await
    }
    async fn id_epoch(&self) -> StoreResult<u64> {
        self.inner.id_epoch().await
    }
    async fn raise_id_epoch(&self, epoch: u64) -> StoreResult<u64> {
        self.inner.raise_id_epoch(epoch).await
    }
    async fn compliance_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> StoreResult<Vec<ComplianceRecord>> {
        self.inner.compliance_after(after_id, limit).await
    }
    async fn compliance_export_state(&self) -> StoreResult<pchat_store::ExportState> {
        self.inner.compliance_export_state().await
    }
    async fn compliance_export_step(
        &self,
        from: &pchat_store::ExportState,
        to: &pchat_store::ExportState,
        run: Option<pchat_store::NewComplianceEvent>,
    ) -> StoreResult<()> {
        self.inner.compliance_export_step(from, to, run).await
    }
    async fn compliance_purge(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        self.inner.compliance_purge(before, limit).await
    }
    async fn file_create(
        &self,
        file: &pchat_store::FileRecord,
        owner_quota_bytes: u64,
    ) -> StoreResult<pchat_store::FileCreated> {
        self.inner.file_create(file, owner_quota_bytes).await
    }
    async fn file_chunk_put(&self, id: &str, index: u32, data: Vec<u8>) -> StoreResult<()> {
        self.inner.file_chunk_put(id, index, data).await
    }
    async fn file_finish(&self, id: &str, sha256: &str) -> StoreResult<()> {
        self.inner.file_finish(id, sha256).await
    }
    async fn file_get(&self, id: &str) -> StoreResult<Option<pchat_store::FileRecord>> {
        self.inner.file_get(id).await
    }
    async fn file_chunk_get(&self, id: &str, index: u32) -> StoreResult<Option<Vec<u8>>> {
        self.inner.file_chunk_get(id, index).await
    }
    async fn file_bind(&self, id: &str, owner: &str, room: &str) -> StoreResult<bool> {
        self.inner.file_bind(id, owner, room).await
    }
    async fn file_room_bytes(&self, room: &str) -> StoreResult<u64> {
        self.inner.file_room_bytes(room).await
    }
    async fn file_list(
        &self,
        filter: &pchat_store::FileFilter,
    ) -> StoreResult<Vec<pchat_store::FileRecord>> {
        self.inner.file_list(filter).await
    }
    async fn file_remove(&self, id: &str) -> StoreResult<bool> {
        self.inner.file_remove(id).await
    }
    async fn file_purge_unfinished(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        self.inner.file_purge_unfinished(before, limit).await
    }
    async fn subscribe_rooms(
        &self,
    ) -> StoreResult<Option<tokio::sync::mpsc::Receiver<pchat_store::RoomTick>>> {
        self.inner.subscribe_rooms().await
    }
    async fn presence_put(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        stanza: Option<&str>,
    ) -> StoreResult<()> {
        self.inner.presence_put(room, server, nick, stanza).await
    }
    async fn presence_leave(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        last: &str,
    ) -> StoreResult<()> {
        self.inner.presence_leave(room, server, nick, last).await
    }
    async fn presence_list(&self, room: &str) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        self.inner.presence_list(room).await
    }
    async fn presence_get(
        &self,
        room: &str,
        who: &[pchat_store::PresenceKey],
    ) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        self.inner.presence_get(room, who).await
    }
    async fn presence_forget_server(&self, server: &str) -> StoreResult<()> {
        self.inner.presence_forget_server(server).await
    }
    async fn pep_announce(&self, event: &pchat_store::PepEvent) -> StoreResult<()> {
        self.inner.pep_announce(event).await
    }
    async fn web_session_put(
        &self,
        id: &str,
        session: &pchat_store::WebSession,
    ) -> StoreResult<()> {
        self.inner.web_session_put(id, session).await
    }
    async fn web_session_get(&self, id: &str) -> StoreResult<Option<pchat_store::WebSession>> {
        self.inner.web_session_get(id).await
    }
    async fn web_session_touch(&self, id: &str, seen_at: pchat_room::Timestamp) -> StoreResult<()> {
        self.inner.web_session_touch(id, seen_at).await
    }
    async fn web_session_remove(&self, id: &str) -> StoreResult<bool> {
        self.inner.web_session_remove(id).await
    }
    async fn web_session_purge(
        &self,
        seen_before: pchat_room::Timestamp,
        created_before: pchat_room::Timestamp,
    ) -> StoreResult<u64> {
        self.inner
            .web_session_purge(seen_before, created_before)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MarksConfig {
        MarksConfig {
            publish_interval_ms: 1000,
            window_s: 60,
            rooms_max: 3,
            allowance_messages_min: 4,
            ack_wait_ms: 1000,
        }
    }

    fn ack(room: &str, id: i64) -> Ack {
        Ack {
            room: room.into(),
            id,
            duplicate: false,
            asked_ms: None,
        }
    }

    fn publish(book: &mut Book, now: u64) -> ServerMarks {
        let m = book.snapshot(now, true).expect("no publication pending");
        book.published(m.serial);
        m
    }

    #[test]
    fn nothing_is_acknowledged_beyond_the_visible_allowance() {
        let mut book = Book::new(cfg());
        assert!(!book.try_ack(&[ack("a", 1)], 0), "nothing visible yet");
        assert!(book.due());
        let m = publish(&mut book, 0);
        assert_eq!(m.allowance, 4, "the minimum (the demand was 1)");
        for id in 1..=4 {
            assert!(book.try_ack(&[ack("a", id)], 10));
        }
        assert!(
            !book.try_ack(&[ack("a", 5)], 10),
            "the allowance is used up"
        );
        // While the next publication is being written, both allowances count.
        let m = book.snapshot(20, true).unwrap();
        assert_eq!(
            m.rooms.get("a"),
            Some(&4),
            "what was acknowledged is listed"
        );
        assert!(m.allowance >= 8, "twice the recent rate: {}", m.allowance);
        assert!(
            !book.try_ack(&[ack("a", 5)], 20),
            "the visible one has no room left"
        );
        assert!(book.snapshot(20, true).is_none(), "one at a time");
        book.published(m.serial);
        assert!(book.try_ack(&[ack("a", 5)], 30));
        // A failed publication leaves the visible one in force.
        let n = book.snapshot(40, true).unwrap();
        book.failed(n.serial);
        assert!(book.due());
        // A server that stops serving declares no allowance.
        let last = book.snapshot(50, false).unwrap();
        book.published(last.serial);
        assert_eq!(last.allowance, 0);
        assert!(!book.try_ack(&[ack("a", 6)], 60));
    }

    #[test]
    fn old_rooms_leave_the_listing_under_a_guard_committed_after_them() {
        let mut book = Book::new(cfg());
        publish(&mut book, 0);
        assert!(book.try_ack(&[ack("old", 7)], 1_000));
        // A resend's id is no guard (its commit may be old).
        assert!(book.try_ack(
            &[Ack {
                room: "x".into(),
                id: 3,
                duplicate: true,
                asked_ms: None,
            }],
            2_000
        ));
        publish(&mut book, 2_500);
        assert!(book.try_ack(&[ack("new", 40)], 4_000));
        let m = publish(&mut book, 70_000);
        assert!(!m.rooms.contains_key("old"), "older than the window: {m:?}");
        assert!(!m.rooms.contains_key("x"));
        assert_eq!(
            m.guard,
            Some(MessageRef {
                room: "new".into(),
                id: 40
            }),
            "the first commit at least the margin after the last one left out"
        );
        assert!(m.rooms.contains_key("new"));
        assert!(!m.incomplete);
    }

    /// With several groups in flight, a commit that returns long after an acknowledgment
    /// may have begun before it: it is timed by when it was asked for, so it guards only
    /// what was acknowledged at least the margin before that.
    #[test]
    fn a_guard_is_timed_by_when_its_commit_was_asked_for() {
        let mut book = Book::new(cfg());
        publish(&mut book, 0);
        assert!(book.try_ack(&[ack("old", 7)], 1_000));
        // Asked for at 900, before "old" was acknowledged; returned at 4,000 (a slow group).
        let slow = Ack {
            asked_ms: Some(900),
            ..ack("slow", 1)
        };
        assert!(book.try_ack(&[slow], 4_000));
        let m = publish(&mut book, 70_000);
        assert_ne!(
            m.guard.as_ref().map(|g| g.room.as_str()),
            Some("slow"),
            "a commit that began before an acknowledgment cannot guard it: {m:?}"
        );
        assert!(m.rooms.contains_key("old") || m.incomplete, "{m:?}");
        // One asked for after the margin guards it.
        let later = Ack {
            asked_ms: Some(3_500),
            ..ack("later", 2)
        };
        assert!(book.try_ack(&[later], 75_000));
        let m = publish(&mut book, 76_000);
        assert_eq!(m.guard.map(|g| g.room), Some("later".into()));
        assert!(!m.rooms.contains_key("old"));
        assert!(!m.incomplete);
    }

    #[test]
    fn without_a_later_commit_rooms_stay_listed_and_beyond_the_maximum_the_listing_is_incomplete() {
        let mut book = Book::new(cfg());
        publish(&mut book, 0);
        assert!(book.try_ack(&[ack("a", 1)], 1_000));
        let m = publish(&mut book, 100_000);
        assert!(m.rooms.contains_key("a"), "no guard can cover it yet");
        // Four rooms within the margin, three may be listed: one leaves uncovered.
        let mut book = Book::new(cfg());
        publish(&mut book, 100_000);
        for (i, r) in ["a", "b", "c", "d"].into_iter().enumerate() {
            assert!(book.try_ack(&[ack(r, 1)], 100_100 + i as u64));
        }
        let m = publish(&mut book, 100_200);
        assert_eq!(m.rooms.len(), 3);
        assert!(m.incomplete, "{m:?}");
        // A commit well after it: the guard covers what left uncovered.
        assert!(book.try_ack(&[ack("e", 9)], 110_000));
        let m = publish(&mut book, 110_100);
        assert!(!m.incomplete, "{m:?}");
        assert_eq!(m.guard.map(|g| g.room), Some("e".into()));
    }

    #[test]
    fn long_room_names_cannot_grow_the_value_beyond_its_byte_limit() {
        let mut book = Book::new(MarksConfig {
            rooms_max: 100_000,
            ..cfg()
        });
        publish(&mut book, 0);
        let long = "r".repeat(3000);
        let n = MARKS_BYTES_MAX / 3000 + 50;
        for i in 0..n {
            book.visible = Some(Budget {
                allowance: u64::MAX,
                used: 0,
            });
            assert!(book.try_ack(&[ack(&format!("{long}{i}"), 1)], 10 + i as u64));
        }
        let m = publish(&mut book, 100_000);
        let bytes = m.encode().len();
        assert!(bytes <= MARKS_BYTES_MAX + 4096, "{bytes} bytes");
        assert!(m.rooms.len() < n, "the oldest left");
        assert!(m.incomplete, "left without a guard that covers them");
    }

    #[test]
    fn an_earlier_life_stays_claimed() {
        let mut book = Book::new(cfg());
        book.merge(
            ServerMarks {
                serial: 9,
                at: String::new(),
                rooms: [("a".to_string(), 12)].into_iter().collect(),
                allowance: 50,
                guard: Some(MessageRef {
                    room: "g".into(),
                    id: 3,
                }),
                incomplete: false,
            },
            5_000,
        );
        let m = publish(&mut book, 5_000);
        assert_eq!(m.rooms.get("a"), Some(&12));
        assert_eq!(m.guard.map(|g| g.room), Some("g".into()));
        assert!(book.try_ack(&[ack("a", 13)], 6_000));
        assert!(book.try_ack(&[ack("b", 1)], 8_000));
        let m = publish(&mut book, 70_000);
        assert!(!m.rooms.contains_key("a"), "covered by this life's guard");
        assert_eq!(m.guard.map(|g| g.room), Some("b".into()));
    }
}
