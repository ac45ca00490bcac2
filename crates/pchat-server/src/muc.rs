//! The MUC service: the room registry and one actor task per loaded room.
//!
//! A room actor takes a batch of inputs from its mailbox, runs them through the room domain,
//! makes every durable effect of the batch (archive appends, compliance records, room saves)
//! durable in ONE store commit, and only then delivers what the batch produced, in order. So
//! nothing is ever seen before it is durable, and many messages share one fsync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pchat_muc::{Effect, HistoryRequest, MucRoom, Publish, ServiceConfig};
use pchat_room::rules::sees_presence;
use pchat_room::RoomRecord;
use pchat_store::{ArchiveQuery, NewMessage, PresenceKey, PresenceNow, Store, Write, WriteOutcome};
use pchat_xmpp::{ns, Element, StanzaError, StanzaErrorType};
use tokio::sync::{mpsc, oneshot};
use tracing::{info_span, warn, Instrument as _};

use crate::config::{Config, RoomCreation};
use crate::datetime;
use crate::local::feature;
use crate::mam;
use crate::router::{Delivery, Router};

/// An input to a room actor. Kept small (32 bytes): tokio's bounded channel allocates its
/// first block of 32 slots when a room loads, and a loaded room keeps it, as it keeps its
/// input batch; with a stanza inline that was ~6 KiB per loaded room.
enum RoomInput {
    /// A stanza to the room or an occupant, and its sender's full JID.
    Stanza(Box<(Element, String)>),
    Gone(String),
    /// The server dropped this session (too slow, silent, vanished): the others see 333.
    Dropped(String),
    Shutdown(oneshot::Sender<()>),
    /// Another server of the pool committed messages up to this sequence number.
    Tick(i64),
    /// Occupant presence published by some server of the pool changed: this occupant's (and
    /// perhaps what it is now), or (`None`) anybody's.
    PresenceTick(Option<Box<(PresenceKey, PresenceNow)>>),
    /// The room's record changed (perhaps on another server).
    RecordTick,
}

const _: () = assert!(
    std::mem::size_of::<RoomInput>() <= 32,
    "RoomInput must stay small"
);

#[derive(Clone)]
struct RoomHandle {
    tx: mpsc::Sender<RoomInput>,
    /// Pool mode: a presence tick found the mailbox full and was dropped, so the room must
    /// re-read its whole presence list (a tick names one occupant; the next one names
    /// another).
    presence_lost: Arc<AtomicBool>,
}

/// Presence ticks in one batch beyond which a room re-reads its whole list instead of the
/// occupants they name.
const PRESENCE_KEYS_READ_MAX: usize = 64;

/// The MUC service.
pub struct MucService {
    jid: String,
    service: ServiceConfig,
    config: Config,
    store: Arc<dyn Store>,
    router: Arc<Router>,
    rooms: Mutex<HashMap<String, RoomHandle>>,
    /// This server's name in its pool; `None` standalone. Rooms publish their occupants'
    /// presence under it for the other servers.
    pool_server: Option<String>,
}

/// Times a commit is retried before the room gives up on a batch.
const COMMIT_ATTEMPTS_MAX: u32 = 3;
/// Rooms listed in one disco#items answer.
const DISCO_ITEMS_MAX: usize = 1000;

impl MucService {
    /// A service for `config`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        router: Arc<Router>,
        pool_server: Option<String>,
    ) -> Arc<Self> {
        let jid = config.muc_jid();
        let mut room_defaults = pchat_room::RoomConfig {
            history_stanzas_default: config.rooms.history_stanzas_default,
            history_stanzas_max: config.rooms.history_stanzas_max,
            members_only: config.rooms.members_only_default,
            public: config.rooms.public_default,
            ..pchat_room::RoomConfig::default()
        };
        room_defaults.occupants_max = 0;
        let service = ServiceConfig {
            service_jid: jid.clone(),
            room_defaults,
            occupants_max: config.rooms.occupants_max,
            ..ServiceConfig::default()
        };
        Arc::new(MucService {
            jid,
            service,
            config: config.clone(),
            store,
            router,
            rooms: Mutex::new(HashMap::new()),
            pool_server,
        })
    }

    /// Routes a stanza addressed to the service or one of its rooms. Returns an immediate
    /// reply for the sender when the stanza cannot reach a room.
    pub async fn route(self: &Arc<Self>, el: Element, from: &str) -> Option<Element> {
        let to = el.get_attr("to").unwrap_or_default().to_owned();
        let (bare, _nick) = match to.split_once('/') {
            Some((b, n)) => (b, Some(n)),
            None => (to.as_str(), None),
        };
        let Some((local, _)) = bare.split_once('@') else {
            return self.answer_service(&el, from).await;
        };
        let room_jid = format!("{}@{}", local.to_lowercase(), self.jid);
        if local.is_empty()
            || local.len() > 256
            || local
                .chars()
                .any(|c| c.is_whitespace() || "\"&'/:<>@".contains(c))
        {
            return error_unless_reply(&el, StanzaError::JidMalformed, "invalid room name");
        }
        for _ in 0..2 {
            let handle = match self.get_or_load(&room_jid, &el, from).await {
                Ok(h) => h,
                Err(reply) => return reply,
            };
            match handle
                .tx
                .try_send(RoomInput::Stanza(Box::new((el.clone(), from.to_owned()))))
            {
                Ok(()) => return None,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return error_unless_reply(
                        &el,
                        StanzaError::ResourceConstraint,
                        "the room is busy; retry shortly",
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The room was just deleted; forget its handle and look again.
                    self.forget(&room_jid, &handle);
                }
            }
        }
        error_unless_reply(&el, StanzaError::ItemNotFound, "the room is gone")
    }

    /// A client session ended or left without unavailable presence.
    pub async fn occupant_gone(&self, room_jid: &str, full: &str) {
        let handle = self
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room_jid)
            .cloned();
        if let Some(h) = handle {
            // Sent with backpressure: a departure must not be dropped or the occupant lingers.
            let _ = h.tx.send(RoomInput::Gone(full.to_owned())).await;
        }
    }

    /// The server dropped a client session (it stopped reading or answering pings, or its
    /// connection died): it leaves, and the room tells the others with status 333.
    pub async fn occupant_dropped(&self, room_jid: &str, full: &str) {
        let handle = self
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room_jid)
            .cloned();
        if let Some(h) = handle {
            // Sent with backpressure, as a departure must be.
            let _ = h.tx.send(RoomInput::Dropped(full.to_owned())).await;
        }
    }

    /// Forwards room ticks from the store (other servers' commits) to the loaded rooms, until
    /// the ticks end or the serving period drains.
    pub async fn run_ticks(
        svc: std::sync::Weak<MucService>,
        mut ticks: mpsc::Receiver<pchat_store::RoomTick>,
        mut drain: tokio::sync::broadcast::Receiver<crate::state::Drain>,
    ) {
        loop {
            let tick = tokio::select! {
                t = ticks.recv() => match t {
                    Some(t) => t,
                    None => return,
                },
                _ = drain.recv() => return,
            };
            let Some(svc) = svc.upgrade() else { return };
            let input = |seq: i64| match tick.kind {
                pchat_store::TickKind::Messages => RoomInput::Tick(seq),
                pchat_store::TickKind::Presence => RoomInput::PresenceTick(
                    tick.presence_of
                        .clone()
                        .map(|k| Box::new((k, tick.presence_now.clone()))),
                ),
                pchat_store::TickKind::Record => RoomInput::RecordTick,
            };
            let handles: Vec<(RoomHandle, i64)> = {
                let rooms = svc.rooms.lock().unwrap_or_else(|p| p.into_inner());
                if tick.room == "*" {
                    // After a reconnect: every room checks what it missed.
                    rooms.values().map(|h| (h.clone(), i64::MAX)).collect()
                } else {
                    rooms
                        .get(&tick.room)
                        .map(|h| (h.clone(), tick.last_seq))
                        .into_iter()
                        .collect()
                }
            };
            for (h, seq) in handles {
                // A full mailbox drops the tick: the room is busy and will catch up with the
                // next local message or tick; for presence, it is told to read everything.
                if h.tx.try_send(input(seq)).is_err()
                    && tick.kind == pchat_store::TickKind::Presence
                {
                    h.presence_lost.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Tells every loaded room to say goodbye (status 332) and waits for them.
    pub async fn shutdown(&self) {
        let handles: Vec<RoomHandle> = self
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut waits = Vec::new();
        for h in handles {
            let (tx, rx) = oneshot::channel();
            if h.tx.send(RoomInput::Shutdown(tx)).await.is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            let _ = w.await;
        }
    }

    fn forget(&self, room_jid: &str, handle: &RoomHandle) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if rooms
            .get(room_jid)
            .is_some_and(|h| h.tx.same_channel(&handle.tx))
        {
            rooms.remove(room_jid);
        }
    }

    async fn get_or_load(
        self: &Arc<Self>,
        room_jid: &str,
        el: &Element,
        from: &str,
    ) -> Result<RoomHandle, Option<Element>> {
        if let Some(h) = self
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room_jid)
        {
            return Ok(h.clone());
        }
        let record = self.store.room_get(room_jid).await.map_err(|e| {
            warn!(room = room_jid, error = %e, "cannot load room");
            error_unless_reply(
                el,
                StanzaError::InternalServerError,
                "the room store is unavailable; retry shortly",
            )
        })?;
        // Messages already archived are history, not news: start delivering after them.
        let delivered = match &record {
            Some(_) => self
                .store
                .room_stats(room_jid)
                .await
                .map(|s| s.last_seq)
                .unwrap_or(0),
            None => 0,
        };
        let room = match record {
            Some(r) => MucRoom::from_record(r, &self.service),
            None => {
                let is_join = el.name == "presence" && el.get_attr("type").is_none();
                if !is_join {
                    return Err(error_unless_reply(
                        el,
                        StanzaError::ItemNotFound,
                        "no such room",
                    ));
                }
                let bare = from.split('/').next().unwrap_or_default();
                if self.config.rooms.creation == RoomCreation::Admins
                    && !self.config.rooms.admins.iter().any(|a| a == bare)
                {
                    return Err(error_unless_reply(
                        el,
                        StanzaError::NotAllowed,
                        "only service admins may create rooms",
                    ));
                }
                MucRoom::create(room_jid, from, datetime::now(), &self.service)
            }
        };
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = rooms.get(room_jid) {
            // Another task loaded it meanwhile; theirs wins.
            return Ok(h.clone());
        }
        let (tx, rx) = mpsc::channel(self.config.limits.room_mailbox_stanzas_max);
        let handle = RoomHandle {
            tx,
            presence_lost: Arc::default(),
        };
        rooms.insert(room_jid.to_owned(), handle.clone());
        let actor = RoomActor {
            svc: self.clone(),
            room,
            handle: handle.clone(),
            delivered,
            remote: Default::default(),
            published: Default::default(),
            to_publish: Default::default(),
            roster_sent: Default::default(),
        };
        let span = info_span!("room", room = room_jid);
        tokio::spawn(actor.run(rx).instrument(span));
        Ok(handle)
    }

    /// Stanzas to the service JID itself: disco, ping.
    async fn answer_service(&self, el: &Element, from: &str) -> Option<Element> {
        if el.name != "iq" || !matches!(el.get_attr("type"), Some("get" | "set")) {
            return None;
        }
        let payload = el.elements().next()?;
        let result = Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", el.get_attr("id"))
            .attr("from", self.jid.as_str())
            .attr("to", from);
        Some(
            match (
                el.get_attr("type"),
                payload.name.as_str(),
                payload.ns.as_str(),
            ) {
                (Some("get"), "query", ns::DISCO_INFO) => result.child(
                    Element::new("query", ns::DISCO_INFO)
                        .child(
                            Element::new("identity", ns::DISCO_INFO)
                                .attr("category", "conference")
                                .attr("type", "text")
                                .attr("name", "Chatrooms"),
                        )
                        .child(feature(ns::MUC))
                        .child(feature(ns::DISCO_INFO))
                        .child(feature(ns::DISCO_ITEMS))
                        .child(feature(ns::PING))
                        .child(feature(ns::MAM))
                        .child(feature(ns::SID))
                        .child(feature(ns::FULLTEXT)),
                ),
                (Some("get"), "query", ns::DISCO_ITEMS) => {
                    let bare = from.split('/').next().unwrap_or_default();
                    let records = match self.store.room_list().await {
                        Ok(r) => r,
                        Err(_) => {
                            return Some(
                                StanzaError::InternalServerError
                                    .reply_to(el, Some("the room store is unavailable")),
                            )
                        }
                    };
                    let mut q = Element::new("query", ns::DISCO_ITEMS);
                    for r in records
                        .iter()
                        .filter(|r| listed_for(r, bare))
                        .take(DISCO_ITEMS_MAX)
                    {
                        let name = if r.config.name.is_empty() {
                            r.jid.split('@').next().unwrap_or_default()
                        } else {
                            &r.config.name
                        };
                        q = q.child(
                            Element::new("item", ns::DISCO_ITEMS)
                                .attr("jid", r.jid.as_str())
                                .attr("name", name),
                        );
                    }
                    result.child(q)
                }
                (Some("get"), "ping", ns::PING) => result,
                _ => StanzaError::ServiceUnavailable.reply_to(el, None),
            },
        )
    }
}

/// Whether a stored room appears in the room list for `bare`: public rooms for everyone,
/// hidden rooms only for their members, admins and owners, so secret rooms never leak.
pub fn listed_for(record: &RoomRecord, bare: &str) -> bool {
    let aff = record
        .affiliations
        .iter()
        .find(|a| a.jid == bare)
        .map(|a| a.affiliation);
    if aff == Some(pchat_room::Affiliation::Outcast) {
        return false;
    }
    record.config.public || aff.is_some_and(|a| a >= pchat_room::Affiliation::Member)
}

/// The presence that shows an occupant of another server leaving.
fn unavailable(room: &str, nick: &str) -> Element {
    Element::new("presence", ns::CLIENT)
        .attr("from", format!("{room}/{nick}"))
        .attr("type", "unavailable")
        .child(
            Element::new("x", ns::MUC_USER).child(
                Element::new("item", ns::MUC_USER)
                    .attr("affiliation", "none")
                    .attr("role", "none"),
            ),
        )
}

fn error_unless_reply(el: &Element, e: StanzaError, text: &str) -> Option<Element> {
    if matches!(el.get_attr("type"), Some("error" | "result")) {
        return None;
    }
    Some(e.reply_to(el, Some(text)))
}

struct RoomActor {
    svc: Arc<MucService>,
    room: MucRoom,
    handle: RoomHandle,
    /// Highest sequence number delivered to this server's occupants. Messages are delivered
    /// strictly in sequence order, whichever server committed them (I3).
    delivered: i64,
    /// Pool mode: presence of occupants on other servers, by (nick, server), as last known
    /// to this server's occupants.
    remote: BTreeMap<(String, String), String>,
    /// Pool mode: nicks of this server's occupants whose presence is published.
    published: BTreeSet<String>,
    /// Pool mode: presences seen in this batch, to publish after it (nick → stanza).
    to_publish: BTreeMap<String, String>,
    /// Pool mode: local sessions that were shown the other servers' occupants.
    roster_sent: std::collections::HashSet<String>,
}

/// Inputs a room keeps room for between bursts.
const ROOM_BATCH_KEPT: usize = 16;

impl RoomActor {
    async fn run(mut self, mut rx: mpsc::Receiver<RoomInput>) {
        // Learn who is in the room on the other servers before anyone joins here.
        self.sync_remote_presence(None).await;
        let batch_max = self.svc.config.limits.room_batch_stanzas_max;
        // Small: a loaded room that is mostly quiet must not keep a full batch's worth of
        // memory (it was ~30 KiB per room at 256); a burst grows it for that batch only.
        let mut batch = Vec::with_capacity(ROOM_BATCH_KEPT);
        loop {
            if rx.recv_many(&mut batch, batch_max).await == 0 {
                break;
            }
            // The batch (grown by a burst) goes with its inputs; a small one waits for the next.
            let inputs = std::mem::replace(&mut batch, Vec::with_capacity(ROOM_BATCH_KEPT));
            let now = datetime::now();
            let mut effects = Vec::new();
            let mut shutdown_acks = Vec::new();
            let mut tick = 0;
            // Pool mode: whose presence changed elsewhere (`None`: maybe anybody's).
            let mut presence_changed: Option<BTreeMap<PresenceKey, PresenceNow>> =
                Some(BTreeMap::new());
            let mut record_tick = false;
            let mut mam_queries = Vec::new();
            for input in inputs {
                match input {
                    RoomInput::Stanza(stanza) => {
                        let (el, from) = *stanza;
                        if mam::is_mam_iq(&el)
                            && el.get_attr("to").is_some_and(|t| !t.contains('/'))
                        {
                            let bare = from.split('/').next().unwrap_or_default();
                            if self.room.can_read_archive(bare) {
                                mam_queries.push(el);
                            } else {
                                effects.push(Effect::Send(StanzaError::Forbidden.reply_to(
                                    &el,
                                    Some("only members may read this room's archive"),
                                )));
                            }
                        } else if let Some(refusal) = self.remote_nick_conflict(&el, &from) {
                            effects.push(Effect::Send(refusal));
                        } else {
                            effects.extend(self.room.handle(&el, &from, now));
                        }
                    }
                    RoomInput::Gone(full) => effects.extend(self.room.occupant_gone(&full, now)),
                    RoomInput::Dropped(full) => {
                        effects.extend(self.room.occupant_dropped(&full, now))
                    }
                    RoomInput::Shutdown(ack) => {
                        effects.extend(self.room.shutdown());
                        shutdown_acks.push(ack);
                    }
                    RoomInput::Tick(seq) => tick = tick.max(seq),
                    RoomInput::PresenceTick(who) => match (who, &mut presence_changed) {
                        // Ticks come in commit order: the last one about somebody wins.
                        (Some(who), Some(changed))
                            if changed.len() < PRESENCE_KEYS_READ_MAX
                                || changed.contains_key(&who.0) =>
                        {
                            let (k, now) = *who;
                            changed.insert(k, now);
                        }
                        _ => presence_changed = None,
                    },
                    RoomInput::RecordTick => record_tick = true,
                }
            }
            // Boxed: its state (~1.5 KiB) would otherwise stay in every loaded room's task.
            if !Box::pin(self.execute(effects)).await {
                self.reload().await;
            }
            if tick > self.delivered {
                self.catch_up(tick).await;
            }
            if record_tick {
                self.adopt_stored_record().await;
            }
            if self.handle.presence_lost.swap(false, Ordering::Relaxed) {
                presence_changed = None;
            }
            if presence_changed.as_ref().is_none_or(|k| !k.is_empty()) {
                self.sync_remote_presence(presence_changed).await;
            }
            self.publish_presence().await;
            for q in mam_queries {
                let store = self.svc.store.clone();
                let router = self.svc.router.clone();
                // Twice a write deadline: the client's session drops it before that unless it
                // reads.
                let wait_max = std::time::Duration::from_millis(
                    self.svc.config.limits.write_timeout_ms.saturating_mul(2),
                );
                tokio::spawn(async move { answer_mam(store, router, q, wait_max).await });
            }
            if !shutdown_acks.is_empty() {
                for a in shutdown_acks {
                    let _ = a.send(());
                }
                break;
            }
            if self.room.should_delete() {
                break;
            }
        }
        self.svc.forget(self.room.jid(), &self.handle);
    }

    /// Commits the durable effects, then delivers. False when the commit failed for good and
    /// the room's memory is no longer what the store holds.
    async fn execute(&mut self, effects: Vec<Effect>) -> bool {
        let room_jid = self.room.jid().to_owned();
        let mut writes = Vec::new();
        for e in &effects {
            match e {
                Effect::Save(r) => writes.push(Write::PutRoom(r.clone())),
                Effect::Delete => writes.push(Write::DeleteRoom {
                    room: room_jid.clone(),
                }),
                Effect::Compliance(c) => writes.push(Write::Compliance(c.clone())),
                Effect::Publish(p) => writes.push(Write::AppendMessage(NewMessage {
                    room: room_jid.clone(),
                    at: datetime::now(),
                    sender: p.sender_bare.clone(),
                    nick: p.nick.clone(),
                    origin_id: p.origin_id.clone(),
                    body: p.body.clone(),
                    stanza: p.message.to_xml_in(ns::CLIENT),
                })),
                Effect::Send(_) | Effect::History(_) => {}
            }
        }
        let mut outcomes = Vec::new();
        if !writes.is_empty() {
            let mut attempt = 0;
            loop {
                match self.svc.store.commit(writes.clone()).await {
                    Ok(o) => {
                        outcomes = o;
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        warn!(error = %e, attempt, "room commit failed");
                        if attempt >= COMMIT_ATTEMPTS_MAX {
                            self.refuse_publishes(&effects);
                            // Messages change nothing in the room's memory, so a batch of
                            // only messages leaves the room as it was; anything else (a join,
                            // a configuration change) made memory run ahead of the store.
                            let diverged = effects.iter().any(|e| {
                                matches!(
                                    e,
                                    Effect::Save(_) | Effect::Delete | Effect::Compliance(_)
                                )
                            });
                            return !diverged;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                    }
                }
            }
        }
        let mut outcomes = outcomes.into_iter();
        for e in effects {
            match e {
                Effect::Send(el) => {
                    if self.svc.pool_server.is_some() && el.name == "presence" {
                        self.note_self_presence(&el);
                    }
                    self.svc.router.deliver(el);
                }
                Effect::Publish(p) => {
                    let Some(WriteOutcome::Appended { seq, duplicate }) = outcomes.next() else {
                        continue;
                    };
                    self.publish(p, seq, duplicate).await;
                }
                Effect::Save(_) | Effect::Delete | Effect::Compliance(_) => {
                    outcomes.next();
                }
                Effect::History(h) => self.send_history(h).await,
            }
        }
        true
    }

    /// Pool mode: a presence the room sends an occupant about itself (status 110). A joiner
    /// first sees the occupants of the other servers; the presence, made fit for everyone
    /// (no self-only status codes, no real JID in semi-anonymous rooms), is published after
    /// the batch.
    fn note_self_presence(&mut self, el: &Element) {
        let Some(x) = el.get_child("x", ns::MUC_USER) else {
            return;
        };
        let is_self = x
            .elements()
            .any(|c| c.is("status", ns::MUC_USER) && c.get_attr("code") == Some("110"));
        let (Some(to), Some(from)) = (el.get_attr("to"), el.get_attr("from")) else {
            return;
        };
        if !is_self {
            return;
        }
        let Some((_, nick)) = from.split_once('/') else {
            return;
        };
        if el.get_attr("type") == Some("unavailable") {
            self.roster_sent.remove(to);
            return;
        }
        if self.roster_sent.insert(to.to_owned())
            && self.sees_presence(self.room.presence_suppressed(), to)
        {
            for stanza in self.remote.values() {
                if let Ok(mut p) = Element::parse(stanza.as_bytes(), ns::CLIENT) {
                    p.set_attr("to", to);
                    self.svc.router.deliver(p);
                }
            }
        }
        let mut shared = el.clone();
        shared.remove_attr("to");
        let semi_anonymous = self.room.room().config().whois == pchat_room::Whois::Moderators;
        if let Some(x) = shared.get_child_mut("x", ns::MUC_USER) {
            x.children.retain(|c| match c {
                pchat_xmpp::Node::Element(c) if c.is("status", ns::MUC_USER) => !matches!(
                    c.get_attr("code"),
                    Some("110" | "100" | "170" | "201" | "210")
                ),
                _ => true,
            });
            if semi_anonymous {
                for item in x.elements_mut().filter(|c| c.is("item", ns::MUC_USER)) {
                    item.remove_attr("jid");
                }
            }
        }
        self.to_publish.insert(nick.to_owned(), shared.to_xml());
    }

    /// Pool mode: a join (or nick change) to a nick that an occupant on another server holds
    /// is refused with `conflict`, as the room would refuse it for a local occupant. Best
    /// effort: two servers admitting the same nick at the same instant both succeed.
    fn remote_nick_conflict(&self, el: &Element, from: &str) -> Option<Element> {
        if self.remote.is_empty() || el.name != "presence" || el.get_attr("type").is_some() {
            return None;
        }
        let nick = el.get_attr("to")?.split_once('/')?.1;
        if self
            .room
            .room()
            .occupant(nick)
            .is_some_and(|o| o.sessions.iter().any(|s| s == from))
        {
            return None;
        }
        let held_elsewhere = self
            .remote
            .range((nick.to_owned(), String::new())..)
            .next()
            .is_some_and(|((n, _), _)| n == nick);
        if !held_elsewhere {
            return None;
        }
        // The session stamped `from`, so the reply goes back to the joiner.
        Some(StanzaError::Conflict.reply_to(el, Some("that nick is in use in this room")))
    }

    /// Pool mode: publishes this server's occupants' presence changes and withdraws those who
    /// left, so the other servers can show them.
    async fn publish_presence(&mut self) {
        let Some(me) = self.svc.pool_server.clone() else {
            return;
        };
        let local: std::collections::BTreeSet<String> = self
            .room
            .room()
            .occupants()
            .map(|o| o.nick.clone())
            .collect();
        let room = self.room.jid().to_owned();
        for (nick, stanza) in std::mem::take(&mut self.to_publish) {
            if local.contains(&nick) {
                if let Err(e) = self
                    .svc
                    .store
                    .presence_put(&room, &me, &nick, Some(&stanza))
                    .await
                {
                    warn!(error = %e, "cannot publish presence to the pool");
                }
                self.published.insert(nick);
            }
        }
        let gone: Vec<String> = self
            .published
            .iter()
            .filter(|n| !local.contains(*n))
            .cloned()
            .collect();
        for nick in gone {
            if let Err(e) = self.svc.store.presence_put(&room, &me, &nick, None).await {
                warn!(error = %e, "cannot withdraw presence from the pool");
            }
            self.published.remove(&nick);
        }
    }

    /// Pool mode: shows this server's occupants what changed among the other servers'
    /// occupants: those in `who` (reading those whose tick did not tell), or (`None`)
    /// anybody, reading the room's whole list.
    async fn sync_remote_presence(&mut self, who: Option<BTreeMap<PresenceKey, PresenceNow>>) {
        let Some(me) = self.svc.pool_server.clone() else {
            return;
        };
        // What is now known of whom, by (nick, server): the stanza, or `None` (gone).
        let considered: BTreeMap<(String, String), Option<String>> = match who {
            Some(who) => {
                let who: Vec<(PresenceKey, PresenceNow)> =
                    who.into_iter().filter(|(k, _)| k.server != me).collect();
                let untold: Vec<PresenceKey> = who
                    .iter()
                    .filter(|(_, now)| *now == PresenceNow::Unknown)
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut read = BTreeMap::new();
                if !untold.is_empty() {
                    match self.svc.store.presence_get(self.room.jid(), &untold).await {
                        Ok(rows) => {
                            read = rows
                                .into_iter()
                                .map(|p| ((p.nick, p.server), p.stanza))
                                .collect();
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot read the pool's presence");
                            return;
                        }
                    }
                }
                who.into_iter()
                    .map(|(k, now)| {
                        let key = (k.nick, k.server);
                        let stanza = match now {
                            PresenceNow::Shown(st) => Some(st),
                            PresenceNow::Gone => None,
                            PresenceNow::Unknown => read.remove(&key),
                        };
                        (key, stanza)
                    })
                    .collect()
            }
            None => {
                let rows = match self.svc.store.presence_list(self.room.jid()).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        warn!(error = %e, "cannot read the pool's presence");
                        return;
                    }
                };
                let mut all: BTreeMap<(String, String), Option<String>> =
                    self.remote.keys().map(|k| (k.clone(), None)).collect();
                all.extend(
                    rows.into_iter()
                        .filter(|p| p.server != me)
                        .map(|p| ((p.nick, p.server), Some(p.stanza))),
                );
                all
            }
        };
        let mut changed = Vec::new();
        for (key, new) in considered {
            if self.remote.get(&key) == new.as_ref() {
                continue;
            }
            match new {
                Some(stanza) => self.remote.insert(key.clone(), stanza),
                None => self.remote.remove(&key),
            };
            changed.push(key);
        }
        self.room.set_occupants_elsewhere(self.remote.len());
        // The room's presence broadcast limit holds for occupants everywhere: above it, only
        // moderators are shown the others' comings and goings.
        let suppressed = self.room.presence_suppressed();
        let sessions: Vec<String> = self
            .roster_sent
            .iter()
            .filter(|s| self.sees_presence(suppressed, s))
            .cloned()
            .collect();
        if sessions.is_empty() {
            return;
        }
        let room = self.room.jid();
        for key in changed {
            let p = match self.remote.get(&key) {
                Some(stanza) => match Element::parse(stanza.as_bytes(), ns::CLIENT) {
                    Ok(p) => p,
                    Err(_) => continue,
                },
                None => unavailable(room, &key.0),
            };
            for to in &sessions {
                let mut copy = p.clone();
                copy.set_attr("to", to.as_str());
                self.svc.router.deliver(copy);
            }
        }
    }

    /// Does this local session see other occupants' presence?
    fn sees_presence(&self, suppressed: bool, session: &str) -> bool {
        self.room
            .room()
            .occupant_by_session(session)
            .is_some_and(|o| sees_presence(suppressed, false, o.role))
    }

    /// Takes over the room record another server (or this one) saved.
    async fn adopt_stored_record(&mut self) {
        match self.svc.store.room_get(self.room.jid()).await {
            Ok(Some(record)) => {
                for e in self.room.adopt_record(record) {
                    if let Effect::Send(el) = e {
                        self.svc.router.deliver(el);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot reload the room record"),
        }
    }

    async fn publish(&mut self, p: Publish, seq: i64, duplicate: bool) {
        if !duplicate && seq > self.delivered + 1 {
            // Another server committed messages before this one: they come first.
            self.catch_up(seq - 1).await;
        }
        let room_jid = self.room.jid();
        let mut msg = p.message;
        msg.children
            .push(pchat_xmpp::Node::Element(mam::stanza_id(room_jid, seq)));
        if duplicate {
            // A resend of an archived message: only the sender learns (again) that it is
            // stored, under its original id; nobody sees it twice.
            if let Ok(Some(orig)) = self.svc.store.archive_get(room_jid, seq).await {
                let mut el = mam::stored_stanza(&orig);
                el.set_attr("to", p.sender_full.as_str());
                self.svc.router.deliver(el);
            }
            return;
        }
        deliver_to_all(&self.svc.router, &msg, &p.recipients);
        self.delivered = self.delivered.max(seq);
    }

    /// Delivers the archive's messages after `delivered` up to `upto` to this server's
    /// occupants, in order. Used when other servers of the pool wrote to the room.
    async fn catch_up(&mut self, upto: i64) {
        if upto <= self.delivered {
            return;
        }
        let sessions: Vec<String> = self
            .room
            .room()
            .occupants()
            .flat_map(|o| o.sessions.iter().cloned())
            .collect();
        if sessions.is_empty() {
            // Nobody here to tell; joiners get these messages as history.
            if upto == i64::MAX {
                if let Ok(stats) = self.svc.store.room_stats(self.room.jid()).await {
                    self.delivered = self.delivered.max(stats.last_seq);
                }
            } else {
                self.delivered = upto;
            }
            return;
        }
        while self.delivered < upto {
            let q = ArchiveQuery {
                after_seq: Some(self.delivered),
                limit: pchat_store::ARCHIVE_PAGE_MAX,
                ..ArchiveQuery::default()
            };
            let page = match self.svc.store.archive_page(self.room.jid(), &q).await {
                Ok(p) => p,
                Err(e) => {
                    // The next tick or local message retries from the same point.
                    warn!(error = %e, "cannot read the archive to catch up");
                    return;
                }
            };
            let Some(last) = page.messages.last().map(|m| m.seq) else {
                return;
            };
            for m in page.messages.iter().take_while(|m| m.seq <= upto) {
                deliver_to_all(&self.svc.router, &mam::stored_stanza(m), &sessions);
                self.delivered = m.seq;
            }
            if last >= upto {
                return;
            }
        }
    }

    async fn send_history(&self, h: HistoryRequest) {
        if h.max_stanzas > 0 {
            let q = ArchiveQuery {
                start: h.since,
                limit: h.max_stanzas,
                from_end: true,
                ..ArchiveQuery::default()
            };
            match self.svc.store.archive_page(self.room.jid(), &q).await {
                Ok(page) => {
                    let mut msgs: Vec<Element> = page
                        .messages
                        .iter()
                        .map(|m| mam::history_message(m, &h.to))
                        .collect();
                    // History on join goes into the joiner's queue at once, without waiting
                    // for the client to read: only the newest messages that fit in half of
                    // it are sent (the rest is in the archive, for MAM), or a long history of
                    // long messages would get a client dropped as too slow on joining.
                    let budget = self.svc.config.limits.session_queue_bytes_max / 2;
                    let mut total = 0usize;
                    let mut keep = msgs.len();
                    for (i, m) in msgs.iter().enumerate().rev() {
                        total += crate::router::estimate_bytes(m);
                        if total > budget {
                            break;
                        }
                        keep = i;
                    }
                    msgs.drain(..keep);
                    if let Some(max_chars) = h.max_chars {
                        // Keep the newest messages that fit in max_chars (XEP-0045 §7.2.15).
                        let mut total = 0usize;
                        let mut keep = msgs.len();
                        for (i, m) in msgs.iter().enumerate().rev() {
                            total += m.to_xml_in(ns::CLIENT).chars().count();
                            if total > max_chars as usize {
                                break;
                            }
                            keep = i;
                        }
                        msgs.drain(..keep);
                    }
                    for m in msgs {
                        self.svc.router.deliver(m);
                    }
                }
                Err(e) => warn!(error = %e, "cannot read history for a join"),
            }
        }
        self.svc.router.deliver(h.subject);
    }

    fn refuse_publishes(&self, effects: &[Effect]) {
        for e in effects {
            if let Effect::Publish(p) = e {
                let mut probe = p.message.clone();
                probe.set_attr("from", p.sender_full.as_str());
                probe.set_attr("to", self.room.jid());
                let mut err = StanzaError::ResourceConstraint.reply_to_typed(
                    &probe,
                    StanzaErrorType::Wait,
                    Some("the archive is unavailable; the message was not stored, send it again"),
                );
                err.set_attr("from", self.room.jid());
                if let Some(id) = p.message.get_attr("id") {
                    err.set_attr("id", id);
                }
                self.svc.router.deliver(err);
            }
        }
    }

    /// After a failed commit the in-memory room may be ahead of the store: occupants are told
    /// the room restarted (status 332) and the room is rebuilt from what is durable.
    async fn reload(&mut self) {
        for e in self.room.shutdown() {
            if let Effect::Send(el) = e {
                self.svc.router.deliver(el);
            }
        }
        if let Ok(Some(r)) = self.svc.store.room_get(self.room.jid()).await {
            self.room = MucRoom::from_record(r, &self.svc.service);
        }
    }
}

/// A room's fan-out of `stanza` to the sessions `to`: serialized once and shared, each
/// session writing its own JID as `to` (per recipient, a reference instead of a deep copy).
fn deliver_to_all(router: &Router, stanza: &Element, to: &[String]) {
    match crate::router::SharedStanza::new(stanza) {
        Some(shared) => {
            for t in to {
                router.deliver_shared(t, &shared);
            }
        }
        None => {
            for t in to {
                let mut copy = stanza.clone();
                copy.set_attr("to", t.as_str());
                router.deliver(copy);
            }
        }
    }
}

async fn answer_mam(
    store: Arc<dyn Store>,
    router: Arc<Router>,
    iq: Element,
    wait_max: std::time::Duration,
) {
    let to = iq.get_attr("from").unwrap_or_default().to_owned();
    let room = iq.get_attr("to").unwrap_or_default().to_lowercase();
    let reply = match iq.get_attr("type") {
        Some("get") => mam::form_reply(&iq),
        Some("set") => match mam::parse_query(&iq) {
            Err(reply) => reply,
            Ok(q) => match store.archive_page(&room, &q.query).await {
                Err(_) => StanzaError::InternalServerError
                    .reply_to(&iq, Some("the archive is unavailable; retry shortly")),
                Ok(page) => {
                    let first = page.messages.first().map(|m| m.seq);
                    let last = page.messages.last().map(|m| m.seq);
                    let mut msgs: Vec<&pchat_store::ArchivedMessage> =
                        page.messages.iter().collect();
                    if q.flip {
                        msgs.reverse();
                    }
                    // A page may be larger than the client's whole queue: each result waits
                    // for room, so a client that reads at its own pace gets all of it, and
                    // one that stops reading is dropped by its write deadline.
                    for m in msgs {
                        let result = mam::result_message(m, &to, q.query_id.as_deref());
                        if router.deliver_waiting(result, wait_max).await != Delivery::Queued {
                            return;
                        }
                    }
                    mam::fin(&iq, first, last, page.count, page.complete)
                }
            },
        },
        _ => return,
    };
    router.deliver_waiting(reply, wait_max).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loaded room costs its task's future for as long as it is loaded, and a pool loads
    /// every room on every server: the future must stay small.
    #[tokio::test]
    async fn a_room_task_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = pchat_store_sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap();
        let config = Config::default();
        let svc = MucService::new(&config, Arc::new(store), Arc::new(Router::default()), None);
        let room = MucRoom::create(
            "r@conference.localhost",
            "a@localhost/x",
            datetime::now(),
            &svc.service,
        );
        let (tx, rx) = mpsc::channel(4);
        let actor = RoomActor {
            svc: svc.clone(),
            room,
            handle: RoomHandle {
                tx,
                presence_lost: Arc::default(),
            },
            delivered: 0,
            remote: Default::default(),
            published: Default::default(),
            to_publish: Default::default(),
            roster_sent: Default::default(),
        };
        let run = actor.run(rx);
        let size = std::mem::size_of_val(&run);
        eprintln!("room task future: {size} bytes");
        assert!(size <= 2048, "a room task's future is {size} bytes");
    }
}
