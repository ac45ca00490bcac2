//! The MUC service: the room registry and one actor task per loaded room.
//!
//! A room actor takes a batch of inputs from its mailbox, runs them through the room domain,
//! makes every durable effect of the batch (archive appends, compliance records, room saves)
//! durable in ONE store commit, and only then delivers what the batch produced, in order. So
//! nothing is ever seen before it is durable, and many messages share one fsync.
//!
//! A commit is retried only when the store was unavailable, and then with the very same
//! writes: every message carries its origin-id or an idempotency key given here, so a commit
//! whose outcome was unknown (it may have happened) never stores a message twice. A refused
//! write (`Invalid`) is answered, not retried.
//!
//! In a pool, the rules of a room hold on every server: each message is stored only under the
//! record revision the room accepted it under (a ban made on another server meanwhile makes it
//! stale: the room takes the new record over and decides again), record changes and another
//! server's decisions (`RoomTick` kinds `Record` and `Event`) are taken over by the pure room,
//! which tells this server's occupants what the deciding server told its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pchat_muc::{Effect, HistoryRequest, MucRoom, Publish, ServiceConfig};
use pchat_room::directory::{Access, DEFAULT_CATEGORY};
use pchat_room::rules::sees_presence;
use pchat_room::{RoomEvent, RoomRecord};
use pchat_store::{
    ArchiveQuery, NewMessage, PresenceKey, PresenceNow, Store, StoreError, Write, WriteOutcome,
};
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
    /// Another server of the pool announced something about the room.
    Event(Box<RoomEvent>),
    /// The directory changed (a wall, a group): the room takes the new one at its next
    /// batch, which this wakes it up for.
    Directory,
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
    /// Pool mode: a record tick found the mailbox full and was dropped, so the room must
    /// re-read its record (a ban made elsewhere must not wait for the next save).
    record_lost: Arc<AtomicBool>,
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
    /// The directory (walls, groups) as compiled when last read; `None` until the first
    /// read, when nothing is decided (a wall fails closed, it never starts open).
    directory: tokio::sync::watch::Sender<Option<Arc<Access>>>,
    /// The external directory's groups (`[directory]`), when one is configured: nothing is
    /// installed before its first reading.
    external: Option<crate::ldap::Feed>,
    /// The pool's settings as last read from etcd (pool mode): `Some` replaces the ones in
    /// the directory document; `None` (the key does not exist) leaves those.
    pool_settings: Option<SettingsFeed>,
    /// The key of XEP-0421 occupant ids, derived from the store's server secret (so the same
    /// on every server of a pool), read once.
    occupant_id_key: tokio::sync::OnceCell<Arc<[u8; 32]>>,
}

/// The pool's service settings as its etcd key last read (`None`: no key).
pub type SettingsFeed = tokio::sync::watch::Receiver<Option<pchat_room::directory::Settings>>;

/// What a service follows besides its store: the external directory's groups and the pool's
/// settings.
#[derive(Clone, Default)]
pub struct Feeds {
    /// The external directory's groups (`[directory]`), when one is configured.
    pub external: Option<crate::ldap::Feed>,
    /// The pool's settings from etcd (pool mode).
    pub settings: Option<SettingsFeed>,
}

/// Longest a room decision waits for the first read of the directory.
const DIRECTORY_WAIT_MS: u64 = 5_000;

/// Times a commit is tried before the room gives up on a batch (only while the store is
/// unavailable: a refused batch is not tried again).
const COMMIT_ATTEMPTS_MAX: u32 = 3;
/// Times a message is decided again because another server changed the room's record
/// meanwhile, before its sender is asked to send it again.
const STALE_ROUNDS_MAX: u32 = 3;
/// Longest an announcement from another server waits for room in a busy room's mailbox: unlike
/// ticks, it carries a decision that a re-read cannot recover (a kick).
const EVENT_DELIVERY_TIMEOUT_MS: u64 = 1_000;
/// FORM_TYPE of the service's settings in its disco#info.
pub const SERVICE_INFO_FORM: &str = "urn:xmpp:pchat:service:0";
/// Rooms listed in one disco#items answer.
const DISCO_ITEMS_MAX: usize = 1000;

impl MucService {
    /// A service for `config`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        router: Arc<Router>,
        pool_server: Option<String>,
        feeds: Feeds,
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
            directory: tokio::sync::watch::Sender::new(None),
            external: feeds.external,
            pool_settings: feeds.settings,
            occupant_id_key: tokio::sync::OnceCell::new(),
        })
    }

    /// The directory rooms decide with (for those outside a room: file downloads).
    pub(crate) async fn access_now(&self) -> Option<Arc<Access>> {
        self.access().await
    }

    /// The directory rooms decide with; waits (a bounded time) for its first read.
    async fn access(&self) -> Option<Arc<Access>> {
        let mut rx = self.directory.subscribe();
        let wait = std::time::Duration::from_millis(DIRECTORY_WAIT_MS);
        let found = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(a)) => a.clone(),
            _ => None,
        };
        found
    }

    /// The directory now, if it is not the one `current` (what a room decides with).
    fn newer_access(&self, current: &Arc<Access>) -> Option<Arc<Access>> {
        let now = self.directory.borrow();
        match &*now {
            Some(a) if !Arc::ptr_eq(a, current) => Some(a.clone()),
            _ => None,
        }
    }

    /// Installs a newly read directory and wakes every loaded room to apply it: whoever a
    /// wall no longer allows leaves at once, wherever the change was made.
    pub fn install_directory(&self, access: Arc<Access>) {
        self.directory.send_replace(Some(access));
        let handles: Vec<RoomHandle> = self
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for h in handles {
            // A full mailbox is busy: it applies the directory at its next batch anyway.
            let _ = h.tx.try_send(RoomInput::Directory);
        }
    }

    /// Reads the directory and installs it if it is not the one in force.
    pub async fn reload_directory(&self) -> Result<(), StoreError> {
        let external = match &self.external {
            None => None,
            Some(feed) => match feed.borrow().clone() {
                Some(x) => Some(x),
                // The directory's groups are not read yet: a wall naming them must not be
                // decided without them.
                None => return Ok(()),
            },
        };
        let stored = self.store.directory_get().await?;
        let stamp = external.as_ref().map_or(0, |(_, s)| *s);
        let mut directory = stored.directory;
        // In a pool the settings are etcd's once `pchat config set` wrote them there.
        if let Some(Some(s)) = self.pool_settings.as_ref().map(|f| f.borrow().clone()) {
            directory.settings = s;
        }
        // A setting left to pchat.toml is pchat.toml's: rooms that follow the service take it
        // back when `pchat config set … default` clears the stored one.
        let d = &self.service.room_defaults;
        let s = &mut directory.settings;
        s.default_chat_history
            .get_or_insert(d.history_stanzas_default);
        s.participant_update_limit
            .get_or_insert(d.presence_broadcast_occupants_max);
        let installed = self.directory.borrow().as_ref().map(|a| {
            (
                a.revision(),
                a.external_stamp(),
                a.settings() == &directory.settings,
            )
        });
        if installed != Some((stored.revision, stamp, true)) {
            let access = match &external {
                Some((groups, stamp)) => {
                    Access::compile_with(&directory, stored.revision, groups, *stamp)
                }
                None => Access::compile(&directory, stored.revision),
            };
            self.install_directory(Arc::new(access));
            tracing::info!(
                revision = stored.revision,
                external = stamp,
                "directory read"
            );
        }
        Ok(())
    }

    /// Delivers an invitation to its invitee's sessions, or keeps it for the invitee's next
    /// login when none is connected here (a local user only: a JID of another domain is
    /// not ours to keep for).
    pub async fn deliver_or_keep(&self, el: Element) {
        let Some(to) = el.get_attr("to").map(pchat_room::bare_jid) else {
            return;
        };
        let local = to
            .split_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&self.config.domain));
        let stanza = if local { Some(el.to_xml()) } else { None };
        if self.router.deliver(el) == Delivery::NoSession {
            if let Some(stanza) = stanza {
                if let Err(e) = self.store.invitation_keep(&to, &stanza).await {
                    warn!(error = %e, "cannot keep an invitation for a user who is not online");
                }
            }
        }
    }

    /// Tells a loaded room what the shell decided (a removed message): it shows its
    /// occupants as it would another server's announcement.
    pub async fn deliver_event(&self, room_jid: &str, event: RoomEvent) {
        let handle = self.loaded(room_jid);
        if let Some(h) = handle {
            let wait = std::time::Duration::from_millis(EVENT_DELIVERY_TIMEOUT_MS);
            if tokio::time::timeout(wait, h.tx.send(RoomInput::Event(Box::new(event))))
                .await
                .is_err()
            {
                warn!(room = room_jid, "a room too busy for {EVENT_DELIVERY_TIMEOUT_MS} ms missed the shell's announcement");
            }
        }
    }

    /// A room's record was changed by the shell (through this server's store): the loaded
    /// room takes it over now, as it would another server's change.
    pub async fn record_changed(&self, room_jid: &str) {
        let handle = self.loaded(room_jid);
        if let Some(h) = handle {
            if h.tx.try_send(RoomInput::RecordTick).is_err() {
                // Busy: it re-reads its record after its current batch.
                h.record_lost.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Reads the directory when its revision changed (and at once the first time), every
    /// `every`, until the serving period drains or the service is gone. A read that fails
    /// keeps the directory in force and is tried again.
    pub async fn follow_directory(
        svc: std::sync::Weak<MucService>,
        mut drain: tokio::sync::broadcast::Receiver<crate::state::Drain>,
        every: std::time::Duration,
    ) {
        let mut failing = false;
        let mut feed = svc.upgrade().and_then(|me| me.external.clone());
        let mut settings = svc.upgrade().and_then(|me| me.pool_settings.clone());
        // Set when the pool's settings changed: the directory is read again even if its
        // revision did not move.
        let mut settings_changed = false;
        loop {
            let Some(me) = svc.upgrade() else { return };
            let force = std::mem::take(&mut settings_changed);
            let read = async {
                let revision = me.store.directory_revision().await?;
                let stamp = me
                    .external
                    .as_ref()
                    .map(|f| f.borrow().as_ref().map_or(0, |(_, s)| *s))
                    .unwrap_or(0);
                let installed = me
                    .directory
                    .borrow()
                    .as_ref()
                    .map(|a| (a.revision(), a.external_stamp()));
                if force || installed != Some((revision, stamp)) {
                    me.reload_directory().await?;
                }
                Ok::<_, StoreError>(())
            };
            match read.await {
                Ok(()) => failing = false,
                Err(e) => {
                    settings_changed |= force;
                    if !failing {
                        warn!(error = %e, "cannot read the directory (walls and groups); keeping the one in force");
                    }
                    failing = true;
                }
            }
            drop(me);
            // A new reading of the external directory applies at once, not at the next tick.
            let external_changed = async {
                match feed.as_mut() {
                    Some(f) => {
                        if f.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let pool_settings_changed = async {
                match settings.as_mut() {
                    Some(f) => {
                        if f.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = external_changed => {}
                _ = pool_settings_changed => settings_changed = true,
                _ = drain.recv() => return,
            }
        }
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

    /// Routes a stanza again from a task of its own, delivering the reply, if any, to its
    /// sender: for stanzas left in the mailbox of a room that went away. (Boxed: a room's
    /// task must not contain the future of the routing that may start a room's task.)
    fn reroute(self: Arc<Self>, el: Element, from: String) {
        let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move {
                if let Some(reply) = self.route(el, &from).await {
                    self.router.deliver(reply);
                }
            });
        tokio::spawn(task);
    }

    /// A client session ended or left without unavailable presence.
    pub async fn occupant_gone(&self, room_jid: &str, full: &str) {
        let handle = self.loaded(room_jid);
        if let Some(h) = handle {
            // Sent with backpressure: a departure must not be dropped or the occupant lingers.
            let _ = h.tx.send(RoomInput::Gone(full.to_owned())).await;
        }
    }

    /// The server dropped a client session (it stopped reading or answering pings, or its
    /// connection died): it leaves, and the room tells the others with status 333.
    pub async fn occupant_dropped(&self, room_jid: &str, full: &str) {
        let handle = self.loaded(room_jid);
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
            if tick.kind == pchat_store::TickKind::Directory {
                // Read off the ticks' task: the rooms' ticks must not wait for it.
                tokio::spawn(async move {
                    if let Err(e) = svc.reload_directory().await {
                        warn!(error = %e, "cannot read the changed directory; the next look will");
                    }
                });
                continue;
            }
            if tick.kind == pchat_store::TickKind::Pep {
                // A user's node, not a room: the owner's sessions here are told, off this task.
                if let Some(change) = tick.pep {
                    tokio::spawn(async move {
                        crate::pep::tell_remote_change(
                            svc.store.as_ref(),
                            &svc.router,
                            svc.pool_server.as_deref(),
                            change,
                        )
                        .await;
                    });
                }
                continue;
            }
            let input = |seq: i64| match tick.kind {
                pchat_store::TickKind::Messages => Some(RoomInput::Tick(seq)),
                pchat_store::TickKind::Presence => Some(RoomInput::PresenceTick(
                    tick.presence_of
                        .clone()
                        .map(|k| Box::new((k, tick.presence_now.clone()))),
                )),
                pchat_store::TickKind::Record => Some(RoomInput::RecordTick),
                pchat_store::TickKind::Event => {
                    tick.event.clone().map(|e| RoomInput::Event(Box::new(e)))
                }
                pchat_store::TickKind::Directory | pchat_store::TickKind::Pep => None,
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
                let Some(input) = input(seq) else { continue };
                // A full mailbox drops the tick: the room is busy and will catch up with the
                // next local message or tick; for presence and records, it is told to read
                // everything. An announcement waits a little instead: nothing re-reads it.
                match h.tx.try_send(input) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(RoomInput::Event(e))) => {
                        let tx = h.tx.clone();
                        let wait = std::time::Duration::from_millis(EVENT_DELIVERY_TIMEOUT_MS);
                        tokio::spawn(async move {
                            if tokio::time::timeout(wait, tx.send(RoomInput::Event(e)))
                                .await
                                .is_err()
                            {
                                warn!("a room too busy for {EVENT_DELIVERY_TIMEOUT_MS} ms missed another server's announcement");
                            }
                        });
                    }
                    Err(_) => match tick.kind {
                        pchat_store::TickKind::Presence => {
                            h.presence_lost.store(true, Ordering::Relaxed)
                        }
                        pchat_store::TickKind::Record => {
                            h.record_lost.store(true, Ordering::Relaxed)
                        }
                        _ => {}
                    },
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

    /// How many rooms are loaded now.
    pub fn loaded_count(&self) -> usize {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The handle of a loaded room, if it is loaded.
    fn loaded(&self, room_jid: &str) -> Option<RoomHandle> {
        self.rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room_jid)
            .cloned()
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
        let record = self.store.room_load(room_jid).await.map_err(|e| {
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
        let revision = record.as_ref().map_or(0, |r| r.revision);
        let Some(access) = self.access().await else {
            return Err(error_unless_reply(
                el,
                StanzaError::InternalServerError,
                "the server has not read its directory yet; retry shortly",
            ));
        };
        let mut room = match record {
            Some(r) => MucRoom::from_record(r.record, &self.service),
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
                if !access.may_create(DEFAULT_CATEGORY, &pchat_room::bare_jid(bare)) {
                    return Err(error_unless_reply(
                        el,
                        StanzaError::NotAllowed,
                        "you may not create rooms here (you are not a creator of the default category)",
                    ));
                }
                MucRoom::create(room_jid, from, datetime::now(), &self.service)
            }
        };
        let key = self
            .occupant_id_key
            .get_or_try_init(|| async {
                use hmac::Mac as _;
                let secret = self.store.server_secret().await?;
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                mac.update(b"pchat XEP-0421 occupant-id key v1");
                Ok::<Arc<[u8; 32]>, StoreError>(Arc::new(mac.finalize().into_bytes().into()))
            })
            .await;
        match key {
            Ok(k) => room.set_occupant_id_key(k.clone()),
            Err(e) => {
                return Err(error_unless_reply(
                    el,
                    StanzaError::InternalServerError,
                    &format!("the room cannot be loaded now ({e}); retry shortly"),
                ))
            }
        }
        // No occupant yet: nothing to tell anyone.
        let _ = room.set_access(access);
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = rooms.get(room_jid) {
            // Another task loaded it meanwhile; theirs wins.
            return Ok(h.clone());
        }
        let (tx, rx) = mpsc::channel(self.config.limits.room_mailbox_stanzas_max);
        let handle = RoomHandle {
            tx,
            presence_lost: Arc::default(),
            record_lost: Arc::default(),
        };
        rooms.insert(room_jid.to_owned(), handle.clone());
        let actor = RoomActor {
            svc: self.clone(),
            room,
            revision,
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

    /// The service's settings clients may use (XEP-0128 extended disco#info): where users
    /// manage rooms (Lync RoomManagementUrl) and the largest file they may share.
    fn settings_form(&self) -> Option<Element> {
        let access = self.directory.borrow().clone()?;
        let s = access.settings();
        let mut fields = Vec::new();
        if let Some(u) = &s.room_management_url {
            fields.push(("pchat#room_management_url", "Room management", u.clone()));
        }
        if let Some(k) = s.max_file_size_kb {
            fields.push((
                "pchat#max_file_size_kb",
                "Largest file (KiB)",
                k.to_string(),
            ));
        }
        if fields.is_empty() {
            return None;
        }
        let mut form = Element::new("x", ns::DATA_FORMS)
            .attr("type", "result")
            .child(
                Element::new("field", ns::DATA_FORMS)
                    .attr("var", "FORM_TYPE")
                    .attr("type", "hidden")
                    .child(Element::new("value", ns::DATA_FORMS).text(SERVICE_INFO_FORM)),
            );
        for (var, label, value) in fields {
            form = form.child(
                Element::new("field", ns::DATA_FORMS)
                    .attr("var", var)
                    .attr("label", label)
                    .child(Element::new("value", ns::DATA_FORMS).text(value)),
            );
        }
        Some(form)
    }

    /// Stanzas to the service JID itself: disco, ping.
    async fn answer_service(&self, el: &Element, from: &str) -> Option<Element> {
        if el.name != "iq" || !matches!(el.get_attr("type"), Some("get" | "set")) {
            return None;
        }
        let payload = el.elements().next()?;
        if payload.is("query", ns::MAM) {
            // Search across rooms (XEP-0313 to the service, XEP-0431 full text).
            return match el.get_attr("type") {
                Some("set") => self.search_rooms(el, from).await,
                _ => {
                    let mut form = mam::form_reply(el);
                    form.set_attr("from", self.jid.as_str());
                    form.set_attr("to", from);
                    Some(form)
                }
            };
        }
        if find::is_search(payload) {
            // Finding rooms (XEP-0433; Converse.js asks with type get and a submitted form).
            return Some(self.find_rooms(el, payload, from).await);
        }
        if payload.is(unread::UNREAD_ELEMENT, unread::UNREAD) && el.get_attr("type") == Some("get")
        {
            return Some(self.unread(el, from).await);
        }
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
                (Some("get"), "query", ns::DISCO_INFO) => {
                    let mut q = Element::new("query", ns::DISCO_INFO)
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
                        .child(feature(ns::FULLTEXT))
                        .child(feature(find::CHANNEL_SEARCH))
                        .child(feature(find::MUCLUMBUS))
                        .child(feature(unread::UNREAD));
                    if let Some(form) = self.settings_form() {
                        q = q.child(form);
                    }
                    result.child(q)
                }
                (Some("get"), "query", ns::DISCO_ITEMS) => {
                    let bare = pchat_room::bare_jid(from);
                    let Some(access) = self.access().await else {
                        return Some(StanzaError::InternalServerError.reply_to(
                            el,
                            Some("the server has not read its directory yet; retry shortly"),
                        ));
                    };
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
                        .filter(|r| listed_for(r, &bare, &access))
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

/// A mediated invitation (XEP-0045 §7.8.2) or a direct one (XEP-0249) from a room.
fn is_invitation(el: &Element) -> bool {
    el.name == "message"
        && (el
            .get_child("x", ns::MUC_USER)
            .is_some_and(|x| x.get_child("invite", ns::MUC_USER).is_some())
            || el.get_child("x", ns::CONFERENCE).is_some())
}

/// The id an XEP-0424 retraction (a groupchat message to the room) names.
fn retraction_of(el: &Element) -> Option<i64> {
    if el.name != "message"
        || el.get_attr("type") != Some("groupchat")
        || el.get_attr("to").is_some_and(|t| t.contains('/'))
    {
        return None;
    }
    el.get_child("retract", ns::RETRACT)?
        .get_attr("id")?
        .parse()
        .ok()
}

/// An XEP-0425 moderation request to the room.
fn is_moderation(el: &Element) -> bool {
    el.name == "iq"
        && el.get_attr("type") == Some("set")
        && el.get_attr("to").is_some_and(|t| !t.contains('/'))
        && el.get_child("moderate", ns::MODERATE).is_some()
}

/// Whether a stored room appears in the room list for `bare`: nobody sees a disabled room
/// or one behind a wall (its category does not allow the user); otherwise public rooms for
/// everyone, hidden rooms only for their members, admins and owners (directly or through a
/// group), so secret rooms never leak.
pub fn listed_for(record: &RoomRecord, bare: &str, access: &Access) -> bool {
    if record.disabled || !access.allows(&record.category, bare) {
        return false;
    }
    let aff = effective_affiliation(record, bare, access);
    if aff == Some(pchat_room::Affiliation::Outcast) {
        return false;
    }
    record.config.public || aff.is_some_and(|a| a >= pchat_room::Affiliation::Member)
}

/// A user's affiliation with a room from its record: their own entry, else the highest of
/// the groups they are in (a ban by group is not applied here: outcast groups are skipped,
/// as the room does).
pub(crate) fn effective_affiliation(
    record: &RoomRecord,
    bare: &str,
    access: &Access,
) -> Option<pchat_room::Affiliation> {
    let own = record
        .affiliations
        .iter()
        .find(|a| a.jid == bare)
        .map(|a| a.affiliation);
    let aff = own.or_else(|| {
        record
            .affiliations
            .iter()
            .filter(|a| {
                a.affiliation != pchat_room::Affiliation::Outcast
                    && pchat_room::directory::group_entry(&a.jid)
                        .is_some_and(|g| access.in_group(g, bare))
            })
            .map(|a| a.affiliation)
            .max()
    });
    aff
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
    /// The revision of the stored record `room` was built from, or saved by it; 0 before its
    /// first save. Messages are stored only under it.
    revision: i64,
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
            let mut moderations = Vec::new();
            // A changed wall applies before anything of this batch is decided.
            if let Some(access) = self.svc.newer_access(self.room.room().access()) {
                effects.extend(self.room.set_access(access));
            }
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
                        } else if is_moderation(&el) {
                            moderations.push((el, from));
                        } else if let Some(id) = retraction_of(&el) {
                            // Boxed: the archive read's state must not stay in the room task.
                            let decided = Box::pin(self.retraction(&from, id, now)).await;
                            match decided {
                                Ok(removal) => {
                                    effects.extend(removal);
                                    // The retraction itself is a message (with its fallback
                                    // body): archived and shown like any other.
                                    effects.extend(self.room.handle(&el, &from, now));
                                }
                                Err((e, text)) => {
                                    effects.push(Effect::Send(e.reply_to(&el, Some(&text))))
                                }
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
                    RoomInput::Event(event) => {
                        // Standalone, only the shell announces (a removed message); a
                        // decision naming a server names none here.
                        let me = self.svc.pool_server.as_deref().unwrap_or("");
                        effects.extend(self.room.adopt_event(&event, me));
                    }
                    RoomInput::Directory => {}
                }
            }
            let effects = Box::pin(self.attach_files(effects)).await;
            // Boxed: its state would otherwise stay in every loaded room's task.
            Box::pin(self.commit_and_deliver(effects)).await;
            if tick > self.delivered {
                self.catch_up(tick).await;
            }
            if record_tick || self.handle.record_lost.swap(false, Ordering::Relaxed) {
                self.adopt_stored_record().await;
            }
            if self.handle.presence_lost.swap(false, Ordering::Relaxed) {
                presence_changed = None;
            }
            if presence_changed.as_ref().is_none_or(|k| !k.is_empty()) {
                self.sync_remote_presence(presence_changed).await;
            }
            self.publish_presence().await;
            for (el, from) in moderations {
                // Boxed, as the commit: its state would otherwise stay in every room's task.
                Box::pin(self.moderate(&el, &from)).await;
            }
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
        // Stanzas that reached the mailbox after the room's last batch (it was destroyed,
        // here or on another server): the room is gone, so the service answers them as for
        // any missing room, or, for a join, creates a new one. Dropping them would leave
        // their senders waiting for an answer that never comes.
        rx.close();
        while let Ok(input) = rx.try_recv() {
            if let RoomInput::Stanza(stanza) = input {
                let (el, from) = *stanza;
                self.svc.clone().reroute(el, from);
            }
        }
    }

    /// XEP-0424: an occupant retracts one of its own archived messages. Returns the tombstone
    /// and the compliance record to commit with the retraction message itself.
    async fn retraction(
        &self,
        from: &str,
        id: i64,
        now: pchat_room::Timestamp,
    ) -> Result<Vec<Effect>, (StanzaError, String)> {
        let room_jid = self.room.jid();
        let Some(author) = self.room.room().occupant_by_session(from) else {
            return Err((
                StanzaError::NotAcceptable,
                "only occupants may do this".into(),
            ));
        };
        let original = match self.svc.store.archive_get(room_jid, id).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err((
                    StanzaError::ItemNotFound,
                    format!("no message {id} in this room"),
                ))
            }
            Err(e) => {
                warn!(error = %e, "cannot read a message to retract");
                return Err((
                    StanzaError::InternalServerError,
                    "the archive is unavailable; retry shortly".into(),
                ));
            }
        };
        if original.sender != author.bare_jid {
            return Err((
                StanzaError::Forbidden,
                "you may retract only your own messages (moderators: XEP-0425)".into(),
            ));
        }
        let mut tomb = Element::new("message", ns::CLIENT)
            .attr("from", format!("{room_jid}/{}", original.nick))
            .attr("type", "groupchat");
        tomb =
            tomb.child(Element::new("retracted", ns::RETRACT).attr("stamp", datetime::format(now)));
        Ok(vec![
            Effect::RemoveMessage {
                seq: id,
                stanza: tomb.to_xml(),
            },
            Effect::Compliance(pchat_store::NewComplianceEvent {
                kind: pchat_store::ComplianceKind::MessageRemoved,
                at: now,
                room: room_jid.to_owned(),
                actor: author.bare_jid.clone(),
                nick: Some(author.nick.clone()),
                detail: format!("message {id} retracted by its author"),
            }),
        ])
    }

    /// XEP-0425: a moderator removes an archived message. The archive keeps a tombstone, the
    /// compliance record keeps the original and names the moderator, every occupant (on every
    /// server of a pool) is told.
    async fn moderate(&mut self, el: &Element, from: &str) {
        let refuse = |e: StanzaError, text: &str| e.reply_to(el, Some(text));
        let reply = match self.try_moderate(el, from).await {
            Ok(()) => Element::new("iq", ns::CLIENT)
                .attr("type", "result")
                .attr_opt("id", el.get_attr("id"))
                .attr("from", self.room.jid())
                .attr("to", from),
            Err((e, text)) => refuse(e, &text),
        };
        self.svc.router.deliver(reply);
    }

    async fn try_moderate(
        &mut self,
        el: &Element,
        from: &str,
    ) -> Result<(), (StanzaError, String)> {
        let room_jid = self.room.jid().to_owned();
        let Some(moderator) = self
            .room
            .room()
            .occupant_by_session(from)
            .filter(|o| o.role == pchat_room::Role::Moderator)
            .cloned()
        else {
            return Err((
                StanzaError::Forbidden,
                "only moderators may remove messages".into(),
            ));
        };
        let request = el.get_child("moderate", ns::MODERATE);
        let id = request
            .and_then(|m| m.get_attr("id"))
            .and_then(|id| id.parse::<i64>().ok());
        let (Some(request), Some(id)) = (request, id) else {
            return Err((
                StanzaError::BadRequest,
                "name the message by its stanza-id".into(),
            ));
        };
        if request.get_child("retract", ns::RETRACT).is_none() {
            return Err((
                StanzaError::FeatureNotImplemented,
                "only retraction is supported".into(),
            ));
        }
        let reason = request
            .get_child("reason", ns::MODERATE)
            .or_else(|| request.get_child("reason", ns::RETRACT))
            .map(|r| r.text_content())
            .filter(|r| !r.is_empty());
        let unavailable = |e: StoreError| {
            warn!(error = %e, "cannot remove a message");
            (
                StanzaError::InternalServerError,
                "the archive is unavailable; retry shortly".to_owned(),
            )
        };
        let Some(original) = self
            .svc
            .store
            .archive_get(&room_jid, id)
            .await
            .map_err(unavailable)?
        else {
            return Err((
                StanzaError::ItemNotFound,
                format!("no message {id} in this room"),
            ));
        };
        let now = datetime::now();
        let by = format!("{room_jid}/{}", moderator.nick);
        let tomb = pchat_muc::moderation::tombstone(
            &format!("{room_jid}/{}", original.nick),
            &by,
            reason.as_deref(),
            None,
            &datetime::format(now),
        );
        let event = RoomEvent::Retracted {
            id,
            by,
            reason: reason.clone(),
        };
        // The files the message shared go with it (recorded in this commit, deleted after).
        let (files, file_records) = Box::pin(crate::upload::files_of_removed_message(
            &*self.svc.store,
            &room_jid,
            id,
            &moderator.bare_jid,
        ))
        .await;
        let mut writes = vec![
            Write::RemoveMessage {
                room: room_jid.clone(),
                seq: id,
                stanza: tomb.to_xml(),
                body: None,
            },
            Write::Compliance(pchat_store::NewComplianceEvent {
                kind: pchat_store::ComplianceKind::MessageRemoved,
                at: now,
                room: room_jid.clone(),
                actor: moderator.bare_jid.clone(),
                nick: Some(moderator.nick.clone()),
                detail: format!(
                    "message {id} of {} ({}) removed by a moderator{}",
                    original.nick,
                    original.sender,
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            }),
            Write::Announce {
                room: room_jid.clone(),
                event: event.clone(),
            },
        ];
        writes.extend(file_records.into_iter().map(Write::Compliance));
        self.svc.store.commit(writes).await.map_err(unavailable)?;
        for f in &files {
            if let Err(e) = self.svc.store.file_remove(f).await {
                warn!(error = %e, file = f, "a removed message's file is left: remove it with `pchat file remove`");
            }
        }
        if self.svc.pool_server.is_none() {
            // In a pool, the announcement comes back to every server, this one included.
            let effects = self.room.adopt_event(&event, "");
            Box::pin(self.commit_and_deliver(effects)).await;
        }
        Ok(())
    }

    /// Messages that link to shared files (XEP-0363): refused in a category without file
    /// upload; otherwise the sender's new files are bound to this room and their uploads go
    /// on record with the message (see [`crate::upload::attach_files`]).
    async fn attach_files(&self, effects: Vec<Effect>) -> Vec<Effect> {
        let links = |p: &Publish| {
            p.body.as_deref().is_some_and(|b| b.contains("/files/"))
                || p.message.get_child("x", ns::OOB).is_some()
        };
        if !effects
            .iter()
            .any(|e| matches!(e, Effect::Publish(p) if links(p)))
        {
            return effects;
        }
        let allowed = {
            let room = self.room.room();
            room.access().flags(room.category()).file_upload
        };
        let mut out = Vec::with_capacity(effects.len());
        for e in effects {
            match e {
                Effect::Publish(p) if links(&p) => {
                    let decided = crate::upload::attach_files(
                        &*self.svc.store,
                        &self.svc.config,
                        self.room.jid(),
                        allowed,
                        &p,
                    )
                    .await;
                    match decided {
                        crate::upload::Attach::Send(records) => {
                            out.extend(records.into_iter().map(Effect::Compliance));
                            out.push(Effect::Publish(p));
                        }
                        crate::upload::Attach::Refuse(text) => self.refuse_publish(
                            &p,
                            StanzaError::NotAllowed,
                            StanzaErrorType::Cancel,
                            text,
                        ),
                    }
                }
                e => out.push(e),
            }
        }
        out
    }

    /// Executes a batch's effects. Messages that another server's change of the room's
    /// record made stale are decided again under the new record, a bounded number of times;
    /// a batch that could not be committed makes the room start again from the store.
    async fn commit_and_deliver(&mut self, mut effects: Vec<Effect>) {
        for round in 1..=STALE_ROUNDS_MAX {
            let Executed { in_step, stale } = self.execute(effects).await;
            if !in_step {
                self.reload().await;
                return;
            }
            if stale.is_empty() {
                return;
            }
            // Another server changed the record since these messages were accepted (a ban, a
            // room made moderated…): take it over (its removals and role changes included),
            // then ask the room again whether each sender may still speak.
            self.adopt_stored_record().await;
            effects = Vec::new();
            for mut p in stale {
                match self.room.room().check_groupchat(&p.sender_full) {
                    Ok(_) if round < STALE_ROUNDS_MAX => {
                        p.recipients = self
                            .room
                            .room()
                            .occupants()
                            .flat_map(|o| o.sessions.iter().cloned())
                            .collect();
                        effects.push(Effect::Publish(p));
                    }
                    Ok(_) => self.refuse_publish(
                        &p,
                        StanzaError::ResourceConstraint,
                        StanzaErrorType::Wait,
                        "the room changed while the message was stored; send it again",
                    ),
                    Err(r) => {
                        let (e, ty) = pchat_muc::refusal_error(r);
                        self.refuse_publish(&p, e, ty, &r.to_string());
                    }
                }
            }
            if effects.is_empty() {
                return;
            }
        }
    }

    /// Commits the durable effects, then delivers. Returns the messages refused as stale, and
    /// whether the room's memory is still what the store holds (false when a commit that was
    /// more than messages failed for good).
    async fn execute(&mut self, effects: Vec<Effect>) -> Executed {
        let room_jid = self.room.jid().to_owned();
        let mut writes = Vec::new();
        // Lync's ChatHistory off (the room's category): messages go to compliance only.
        let history_kept = {
            let room = self.room.room();
            room.access().flags(room.category()).chat_history
        };
        // Each save replaces the record this room last read or saved: one made meanwhile on
        // another server (a ban) is never overwritten unseen; the batch fails instead.
        let mut base_revision = self.revision;
        // History for joins, read before the commit so that its BACKCHAT record commits with
        // the join (by index of its effect); a join after a change to the archive in this
        // batch (a message, a removal) reads after the commit, so that it shows the change.
        let mut histories: HashMap<usize, Option<HistoryRead>> = HashMap::new();
        let mut archive_changed = false;
        let mut files_removed: Vec<String> = Vec::new();
        for (i, e) in effects.iter().enumerate() {
            match e {
                Effect::History(h) if !archive_changed => {
                    let read = self.read_history(h).await;
                    if let Some(record) = read.as_ref().and_then(|r| self.backchat(&h.to, r)) {
                        writes.push(Write::Compliance(record));
                    }
                    histories.insert(i, read);
                }
                Effect::Save(r) => {
                    writes.push(Write::PutRoomIf {
                        record: r.clone(),
                        revision: base_revision,
                    });
                    base_revision += 1;
                }
                Effect::Delete => {
                    writes.push(Write::DeleteRoom {
                        room: room_jid.clone(),
                    });
                    base_revision = 0;
                }
                Effect::Compliance(c) => writes.push(Write::Compliance(c.clone())),
                Effect::RemoveMessage { seq, stanza } => {
                    archive_changed = true;
                    // The files the message shared go with it (recorded in this commit,
                    // deleted after it).
                    let actor = effects
                        .iter()
                        .find_map(|e| match e {
                            Effect::Compliance(c)
                                if c.kind == pchat_store::ComplianceKind::MessageRemoved =>
                            {
                                Some(c.actor.clone())
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    let (ids, records) = Box::pin(crate::upload::files_of_removed_message(
                        &*self.svc.store,
                        &room_jid,
                        *seq,
                        &actor,
                    ))
                    .await;
                    files_removed.extend(ids);
                    writes.extend(records.into_iter().map(Write::Compliance));
                    writes.push(Write::RemoveMessage {
                        room: room_jid.clone(),
                        seq: *seq,
                        stanza: stanza.clone(),
                        body: None,
                    })
                }
                Effect::Announce(event) => {
                    let Some(me) = &self.svc.pool_server else {
                        // Nobody else to tell: nothing to commit.
                        continue;
                    };
                    let mut event = event.clone();
                    if let RoomEvent::Relayed { server, .. } = &mut event {
                        server.clone_from(me);
                    }
                    writes.push(Write::Announce {
                        room: room_jid.clone(),
                        event,
                    })
                }
                Effect::Publish(p) if !history_kept => {
                    archive_changed = true;
                    writes.push(Write::Compliance(pchat_store::NewComplianceEvent {
                        kind: pchat_store::ComplianceKind::Message,
                        at: datetime::now(),
                        room: room_jid.clone(),
                        actor: p.sender_bare.clone(),
                        nick: Some(p.nick.clone()),
                        detail: p.body.clone().unwrap_or_default(),
                    }));
                    // Nothing in the archive for the other servers to catch up from.
                    if let Some(me) = &self.svc.pool_server {
                        writes.push(Write::Announce {
                            room: room_jid.clone(),
                            event: RoomEvent::Relayed {
                                server: me.clone(),
                                stanza: p.message.to_xml_in(ns::CLIENT),
                            },
                        });
                    }
                }
                Effect::Publish(p) => {
                    archive_changed = true;
                    writes.push(Write::AppendMessage(NewMessage {
                        room: room_jid.clone(),
                        at: datetime::now(),
                        sender: p.sender_bare.clone(),
                        nick: p.nick.clone(),
                        origin_id: p.origin_id.clone(),
                        // Given once, before the first try: every retry carries the same key.
                        idempotency_key: p.origin_id.is_none().then(idempotency_key),
                        record_revision: Some(self.revision),
                        id_epoch: None,
                        body: p.body.clone(),
                        stanza: p.message.to_xml_in(ns::CLIENT),
                    }))
                }
                Effect::Send(_) | Effect::History(_) => {}
            }
        }
        let mut outcomes = Vec::new();
        if !writes.is_empty() {
            let mut attempt = 0;
            loop {
                let began = std::time::Instant::now();
                let committed = self.svc.store.commit(writes.clone()).await;
                crate::metrics::commit(began.elapsed(), committed.is_ok());
                match committed {
                    Ok(o) => {
                        outcomes = o;
                        for id in &files_removed {
                            if let Err(e) = self.svc.store.file_remove(id).await {
                                warn!(error = %e, file = id, "a removed message's file is left: remove it with `pchat file remove`");
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        warn!(error = %e, attempt, "room commit failed");
                        // Only an unavailable store may work on another try; the same writes
                        // are sent again, so what an unknown outcome stored is found, not
                        // stored twice. Anything else would fail the same way again.
                        let retry = matches!(e, StoreError::Unavailable(_));
                        if !retry || attempt >= COMMIT_ATTEMPTS_MAX {
                            self.refuse_publishes(&effects, &e);
                            // Messages change nothing in the room's memory, so a batch of
                            // only messages leaves the room as it was; anything else (a join,
                            // a configuration change) made memory run ahead of the store.
                            let diverged = effects.iter().any(|e| {
                                matches!(
                                    e,
                                    Effect::Save(_) | Effect::Delete | Effect::Compliance(_)
                                )
                            });
                            return Executed {
                                in_step: !diverged,
                                stale: Vec::new(),
                            };
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                    }
                }
            }
        }
        let mut outcomes = outcomes.into_iter();
        let mut stale = Vec::new();
        for (i, e) in effects.into_iter().enumerate() {
            match e {
                Effect::Send(el) => {
                    if self.svc.pool_server.is_some() && el.name == "presence" {
                        self.note_self_presence(&el);
                    }
                    if is_invitation(&el) {
                        // An invitee who is not online gets it at its next login.
                        Box::pin(self.svc.deliver_or_keep(el)).await;
                    } else {
                        self.svc.router.deliver(el);
                    }
                }
                Effect::Publish(p) if !history_kept => {
                    outcomes.next();
                    if self.svc.pool_server.is_some() {
                        outcomes.next();
                    }
                    // No archive, so no stanza-id: it cannot be asked for later.
                    deliver_to_all(&self.svc.router, &p.message, &p.recipients);
                }
                Effect::Publish(p) => match outcomes.next() {
                    Some(WriteOutcome::Appended { seq, duplicate }) => {
                        self.publish(p, seq, duplicate).await
                    }
                    Some(WriteOutcome::Stale) => stale.push(p),
                    _ => {}
                },
                Effect::Save(_) => {
                    if let Some(WriteOutcome::Saved { revision }) = outcomes.next() {
                        self.revision = revision;
                    }
                }
                Effect::Announce(_) if self.svc.pool_server.is_none() => {}
                Effect::Delete
                | Effect::Compliance(_)
                | Effect::Announce(_)
                | Effect::RemoveMessage { .. } => {
                    outcomes.next();
                }
                Effect::History(h) => {
                    let read = histories.remove(&i);
                    self.send_history(h, read).await
                }
            }
        }
        Executed {
            in_step: true,
            stale,
        }
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
        let unavailable = el.get_attr("type") == Some("unavailable");
        if unavailable {
            self.roster_sent.remove(to);
            if self.room.room().occupant(nick).is_some() {
                // One of several sessions left: the occupant stays as the others see it.
                return;
            }
            // The occupant is gone: how it went (a ban's 301 and reason, a kick's 307, a
            // nick change's 303) is published with its withdrawal, for the other servers'
            // occupants to see as this server's saw it.
        } else if self.roster_sent.insert(to.to_owned())
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
        let asked = el.get_attr("to")?.split_once('/')?.1;
        // As the room will see it (RFC 8266), compared without case.
        let nick =
            pchat_room::rules::enforce_nick(asked, self.room.room().nick_chars_max()).ok()?;
        let nick = nick.as_str();
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
            .keys()
            .any(|(n, _)| pchat_room::rules::same_nick(n, nick));
        if !held_elsewhere {
            return None;
        }
        // The session stamped `from`, so the reply goes back to the joiner.
        Some(StanzaError::Conflict.reply_to(el, Some("that nick is in use in this room")))
    }

    /// Pool mode: publishes this server's occupants' presence changes and withdraws those who
    /// left (with the presence that showed them leaving, when there was one), so the other
    /// servers can show them.
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
        let mut last_words = BTreeMap::new();
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
            } else {
                last_words.insert(nick, stanza);
            }
        }
        let gone: Vec<String> = self
            .published
            .iter()
            .filter(|n| !local.contains(*n))
            .cloned()
            .collect();
        for nick in gone {
            let withdrawn = match last_words.get(&nick) {
                Some(last) => self.svc.store.presence_leave(&room, &me, &nick, last).await,
                None => self.svc.store.presence_put(&room, &me, &nick, None).await,
            };
            if let Err(e) = withdrawn {
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
        // How those who left were shown leaving on their server, when the tick said.
        let mut last_words: BTreeMap<(String, String), String> = BTreeMap::new();
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
                let mut considered = BTreeMap::new();
                for (k, now) in who {
                    let key = (k.nick, k.server);
                    let stanza = match now {
                        PresenceNow::Shown(st) => Some(st),
                        PresenceNow::Gone => None,
                        PresenceNow::Left(last) => {
                            last_words.insert(key.clone(), last);
                            None
                        }
                        PresenceNow::Unknown => read.remove(&key),
                    };
                    considered.insert(key, stanza);
                }
                considered
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
            // The room learns who is where, with which role and affiliation, so that it
            // counts them and its moderators may change their roles.
            let parsed = new
                .as_deref()
                .and_then(|st| Element::parse(st.as_bytes(), ns::CLIENT).ok());
            self.room
                .note_remote_presence(&key.1, &key.0, parsed.as_ref());
            match new {
                Some(stanza) => self.remote.insert(key.clone(), stanza),
                None => self.remote.remove(&key),
            };
            changed.push(key);
        }
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
                None => last_words
                    .remove(&key)
                    .and_then(|last| Element::parse(last.as_bytes(), ns::CLIENT).ok())
                    .unwrap_or_else(|| unavailable(room, &key.0)),
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

    /// Takes over the room record another server (or this one) saved, and tells this
    /// server's occupants what it changed for them; a record gone means the room was
    /// destroyed elsewhere.
    async fn adopt_stored_record(&mut self) {
        let effects = match self.svc.store.room_load(self.room.jid()).await {
            Ok(Some(stored)) => {
                if stored.revision == self.revision
                    && stored.record.created_at == self.room.room().created_at()
                {
                    // This server's own save, or nothing new. (Revisions start again at 1
                    // in a room destroyed and created again, whose creation time differs.)
                    return;
                }
                self.revision = stored.revision;
                if !self
                    .room
                    .room()
                    .access()
                    .has_category(&stored.record.category)
                {
                    // Moved into a category made since the directory was read: read it now.
                    let svc = self.svc.clone();
                    tokio::spawn(async move {
                        if let Err(e) = svc.reload_directory().await {
                            warn!(error = %e, "cannot read the directory");
                        }
                    });
                }
                self.room.adopt_record(stored.record)
            }
            Ok(None) => self.room.adopt_deleted(),
            Err(e) => {
                warn!(error = %e, "cannot reload the room record");
                // Try again after the next batch rather than keep a record that may no
                // longer hold.
                self.handle.record_lost.store(true, Ordering::Relaxed);
                return;
            }
        };
        // Only presence and messages: delivered (and, for presence, published to the pool)
        // as any batch's.
        Box::pin(self.execute(effects)).await;
    }

    async fn publish(&mut self, p: Publish, seq: i64, duplicate: bool) {
        if duplicate && seq > self.delivered {
            // Stored by an earlier try whose outcome was unknown (or by another server, for a
            // client's resend), and never delivered here: everyone gets it now, in order.
            self.catch_up(seq).await;
            return;
        }
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

    /// Reads what a joiner is shown as history (the newest messages that fit its queue and
    /// its `maxchars`). `None`: the archive could not be read (the joiner gets none).
    async fn read_history(&self, h: &HistoryRequest) -> Option<HistoryRead> {
        if h.max_stanzas == 0 {
            return Some(HistoryRead::default());
        }
        let q = ArchiveQuery {
            start: h.since,
            limit: h.max_stanzas,
            from_end: true,
            ..ArchiveQuery::default()
        };
        let page = match self.svc.store.archive_page(self.room.jid(), &q).await {
            Ok(page) => page,
            Err(e) => {
                warn!(error = %e, "cannot read history for a join");
                return None;
            }
        };
        let mut msgs: Vec<_> = page.messages.iter().map(mam::history_shared).collect();
        let mut seqs: Vec<i64> = page.messages.iter().map(|m| m.seq).collect();
        // History on join goes into the joiner's queue at once, without waiting for the
        // client to read: only the newest messages that fit in half of it are sent (the rest
        // is in the archive, for MAM), or a long history of long messages would get a client
        // dropped as too slow on joining.
        let budget = self.svc.config.limits.session_queue_bytes_max / 2;
        let mut total = 0usize;
        let mut keep = msgs.len();
        for (i, m) in msgs.iter().enumerate().rev() {
            total += m.wire_bytes(&h.to);
            if total > budget {
                break;
            }
            keep = i;
        }
        msgs.drain(..keep);
        seqs.drain(..keep);
        if let Some(max_chars) = h.max_chars {
            // Keep the newest messages that fit in max_chars (XEP-0045 §7.2.15), counted as
            // sent (with `to`).
            let mut total = 0usize;
            let mut keep = msgs.len();
            for (i, m) in msgs.iter().enumerate().rev() {
                total += m.xml().chars().count() + h.to.chars().count() + 6;
                if total > max_chars as usize {
                    break;
                }
                keep = i;
            }
            msgs.drain(..keep);
            seqs.drain(..keep);
        }
        Some(HistoryRead { msgs, seqs })
    }

    /// Lync's BACKCHAT record of history shown to `to` (`None` when nothing was shown).
    fn backchat(&self, to: &str, read: &HistoryRead) -> Option<pchat_store::NewComplianceEvent> {
        let (first, last) = (*read.seqs.first()?, *read.seqs.last()?);
        let nick = self
            .room
            .room()
            .occupant_by_session(to)
            .map(|o| o.nick.clone());
        Some(pchat_store::NewComplianceEvent {
            kind: pchat_store::ComplianceKind::Backchat,
            at: datetime::now(),
            room: self.room.jid().to_owned(),
            actor: pchat_room::bare_jid(to).to_owned(),
            nick,
            detail: format!(
                "history on join: {} messages, ids {first}-{last}",
                read.seqs.len()
            ),
        })
    }

    /// Sends a joiner its history (read before the batch committed, with its BACKCHAT record
    /// in the batch), or reads it now and records it in a commit of its own first (a join in
    /// a batch after a message of the same batch: that message is in the history only once
    /// committed). Then the subject, which ends the join.
    async fn send_history(&self, h: HistoryRequest, read: Option<Option<HistoryRead>>) {
        let read = match read {
            Some(r) => r,
            None => match self.read_history(&h).await {
                Some(r) => match self.backchat(&h.to, &r) {
                    None => Some(r),
                    Some(record) => {
                        match self.svc.store.commit(vec![Write::Compliance(record)]).await {
                            Ok(_) => Some(r),
                            Err(e) => {
                                warn!(error = %e, "cannot record history shown on join; none is shown");
                                None
                            }
                        }
                    }
                },
                None => None,
            },
        };
        for m in read.iter().flat_map(|r| r.msgs.iter()) {
            self.svc.router.deliver_shared(&h.to, m);
        }
        self.svc.router.deliver(h.subject);
    }

    /// Tells the senders of a batch's messages that they were not stored, in the words the
    /// store's error calls for: send again later (unavailable), or not at all (refused).
    fn refuse_publishes(&self, effects: &[Effect], error: &StoreError) {
        let (e, ty, text) = match error {
            StoreError::Unavailable(_) => (
                StanzaError::ResourceConstraint,
                StanzaErrorType::Wait,
                "the archive is unavailable; the message may not have been stored, send it again",
            ),
            StoreError::Invalid(_) => (
                StanzaError::NotAcceptable,
                StanzaErrorType::Modify,
                "the archive cannot store this message; sending it again will not help",
            ),
            StoreError::Conflict(_) => (
                StanzaError::ResourceConstraint,
                StanzaErrorType::Wait,
                "the room changed on another server meanwhile; send it again",
            ),
            StoreError::Corrupt(_) => (
                StanzaError::InternalServerError,
                StanzaErrorType::Cancel,
                "the archive failed to store this message",
            ),
        };
        for effect in effects {
            if let Effect::Publish(p) = effect {
                self.refuse_publish(p, e, ty, text);
            }
        }
    }

    /// An error reply to the sender of a message the room did not store.
    fn refuse_publish(&self, p: &Publish, e: StanzaError, ty: StanzaErrorType, text: &str) {
        let mut probe = p.message.clone();
        probe.set_attr("from", p.sender_full.as_str());
        probe.set_attr("to", self.room.jid());
        let mut err = e.reply_to_typed(&probe, ty, Some(text));
        err.set_attr("from", self.room.jid());
        if let Some(id) = p.message.get_attr("id") {
            err.set_attr("id", id);
        }
        self.svc.router.deliver(err);
    }

    /// After a failed commit the in-memory room may be ahead of the store: occupants are told
    /// the room restarted (status 332) and the room is rebuilt from what is durable.
    async fn reload(&mut self) {
        for e in self.room.shutdown() {
            if let Effect::Send(el) = e {
                self.svc.router.deliver(el);
            }
        }
        if let Ok(Some(r)) = self.svc.store.room_load(self.room.jid()).await {
            self.room = MucRoom::from_record(r.record, &self.svc.service);
            self.revision = r.revision;
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

/// History read for a joiner: the stanzas to send and their archive ids.
#[derive(Default)]
struct HistoryRead {
    msgs: Vec<std::sync::Arc<crate::router::SharedStanza>>,
    seqs: Vec<i64>,
}

/// What executing a batch left to do.
struct Executed {
    /// The room's memory is what the store holds (false: a commit failed for good after the
    /// room had changed; it must start again from the store).
    in_step: bool,
    /// Messages refused because the room's record changed meanwhile.
    stale: Vec<Publish>,
}

/// A fresh idempotency key for a message without origin-id: 128 random bits, so that no two
/// messages ever share one.
fn idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Records (Lync's BACKCHAT) that `reader` is about to be shown `messages` of the archive by
/// a query (`what`), one record per room, before any of them is shown. `Err(())`: the
/// record could not be made, so nothing may be shown.
pub(crate) async fn record_reads(
    store: &dyn Store,
    reader: &str,
    what: &str,
    messages: &[&pchat_store::ArchivedMessage],
) -> Result<(), ()> {
    let mut by_room: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
    for m in messages {
        by_room.entry(m.room.as_str()).or_default().push(m.seq);
    }
    if by_room.is_empty() {
        return Ok(());
    }
    let at = datetime::now();
    let writes = by_room
        .into_iter()
        .map(|(room, mut seqs)| {
            seqs.sort_unstable();
            let ids = if seqs.len() <= 20 {
                seqs.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                format!("{}-{}", seqs[0], seqs[seqs.len() - 1])
            };
            Write::Compliance(pchat_store::NewComplianceEvent {
                kind: pchat_store::ComplianceKind::Backchat,
                at,
                room: room.to_owned(),
                actor: pchat_room::bare_jid(reader).to_owned(),
                nick: None,
                detail: format!("{what}: {} messages, ids {ids}", seqs.len()),
            })
        })
        .collect();
    store.commit(writes).await.map(drop).map_err(|e| {
        warn!(error = %e, "cannot record an archive read for compliance; nothing is shown");
    })
}

/// How a MAM query reads, for its BACKCHAT record.
fn query_words(q: &ArchiveQuery) -> String {
    let mut w = String::from("archive query");
    if let Some(t) = &q.fulltext {
        let t: String = t.chars().take(200).collect();
        let _ = std::fmt::Write::write_fmt(&mut w, format_args!(" for \"{t}\""));
    }
    if let Some(n) = &q.with_nick {
        let _ = std::fmt::Write::write_fmt(&mut w, format_args!(" from {n}"));
    }
    w
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
            Ok(q) => match check_anchors(&*store, &room, &iq, &q).await {
                Err(reply) => reply,
                Ok(()) => match store.archive_page(&room, &q.query).await {
                    Err(_) => StanzaError::InternalServerError
                        .reply_to(&iq, Some("the archive is unavailable; retry shortly")),
                    Ok(page) => {
                        let first = page.messages.first().map(|m| m.seq);
                        let last = page.messages.last().map(|m| m.seq);
                        let mut msgs: Vec<&pchat_store::ArchivedMessage> =
                            page.messages.iter().collect();
                        if record_reads(&*store, &to, &query_words(&q.query), &msgs)
                            .await
                            .is_err()
                        {
                            router.deliver(StanzaError::InternalServerError.reply_to(
                                &iq,
                                Some("the compliance record is unavailable; retry shortly"),
                            ));
                            return;
                        }
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
        },
        _ => return,
    };
    router.deliver_waiting(reply, wait_max).await;
}

/// `Err(reply)` when the query pages from an id the archive does not hold (see
/// [`mam::MamQuery::anchors`]). An id is only ever looked up, never trusted: one index probe
/// per anchor.
async fn check_anchors(
    store: &dyn Store,
    room: &str,
    iq: &Element,
    q: &mam::MamQuery,
) -> Result<(), Element> {
    for id in q.anchors() {
        match store.archive_get(room, id).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(mam::unknown_anchor(iq, id)),
            Err(_) => {
                return Err(StanzaError::InternalServerError
                    .reply_to(iq, Some("the archive is unavailable; retry shortly")))
            }
        }
    }
    Ok(())
}

mod find;
pub(crate) mod search;
mod unread;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use pchat_store::{
        ArchivePage, ArchivedMessage, ComplianceRecord, RoomStats, StoreResult, StoredRoom,
        UserRecord,
    };

    use crate::router::{Outbound, SessionHandle};

    /// What the next commit does instead of simply committing.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fault {
        /// Commit, then answer as if the connection was lost after COMMIT was sent.
        LoseReply,
        /// Refuse the batch as invalid, committing nothing.
        Refuse,
    }

    /// A real SQLite store whose next commits misbehave as told, counting commit calls.
    struct Faulty {
        inner: pchat_store_sqlite::SqliteStore,
        faults: Mutex<Vec<Fault>>,
        commits: AtomicUsize,
    }

    #[async_trait]
    impl Store for Faulty {
        async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
            self.commits.fetch_add(1, Ordering::Relaxed);
            let fault = self.faults.lock().unwrap().pop();
            match fault {
                None => self.inner.commit(writes).await,
                Some(Fault::LoseReply) => {
                    self.inner.commit(writes).await?;
                    Err(StoreError::Unavailable(
                        "connection lost after COMMIT was sent".into(),
                    ))
                }
                Some(Fault::Refuse) => Err(StoreError::Invalid("refused".into())),
            }
        }
        async fn user_put(&self, user: UserRecord) -> StoreResult<()> {
            self.inner.user_put(user).await
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
        async fn web_session_touch(
            &self,
            id: &str,
            seen_at: pchat_room::Timestamp,
        ) -> StoreResult<()> {
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
        async fn pep_node(
            &self,
            owner: &str,
            node: &str,
        ) -> StoreResult<Option<pchat_store::PepNode>> {
            self.inner.pep_node(owner, node).await
        }
        async fn pep_nodes(&self, owner: &str) -> StoreResult<Vec<String>> {
            self.inner.pep_nodes(owner).await
        }
        async fn pep_items(
            &self,
            owner: &str,
            node: &str,
        ) -> StoreResult<Vec<pchat_store::PepItem>> {
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
        async fn archive_page(&self, room: &str, q: &ArchiveQuery) -> StoreResult<ArchivePage> {
            self.inner.archive_page(room, q).await
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
            after: i64,
            limit: u32,
        ) -> StoreResult<Vec<ComplianceRecord>> {
            self.inner.compliance_after(after, limit).await
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
        async fn server_secret(&self) -> StoreResult<Vec<u8>> {
            self.inner.server_secret().await
        }
    }

    const ROOM: &str = "r@conference.localhost";
    const ALICE: &str = "alice@localhost/a";

    /// A MUC service over a faulty store, with alice's session bound and the room created by
    /// her; returns the service, the store and her outbound queue.
    async fn room_with_alice(
        dir: &std::path::Path,
    ) -> (Arc<MucService>, Arc<Faulty>, mpsc::Receiver<Outbound>) {
        let store = Arc::new(Faulty {
            inner: pchat_store_sqlite::SqliteStore::open(dir, Default::default()).unwrap(),
            faults: Mutex::new(Vec::new()),
            commits: AtomicUsize::new(0),
        });
        let router = Arc::new(Router::default());
        let (tx, mut rx) = mpsc::channel(64);
        let handle = SessionHandle {
            id: router.next_id(),
            tx,
            shared: crate::router::SessionShared::new(1 << 20),
        };
        assert!(router.bind("alice@localhost", "a", handle, 10).is_some());
        let svc = MucService::new(
            &Config::default(),
            store.clone(),
            router,
            None,
            Feeds::default(),
        );
        svc.install_directory(pchat_room::directory::Access::open());
        let send = |xml: String| Element::parse(xml.as_bytes(), ns::CLIENT).unwrap();
        svc.route(
            send(format!(
                "<presence to='{ROOM}/alice'><x xmlns='{}'/></presence>",
                ns::MUC
            )),
            ALICE,
        )
        .await;
        svc.route(
            send(format!(
                "<iq id='c' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='{}' type='submit'/></query></iq>",
                ns::MUC_OWNER,
                ns::DATA_FORMS
            )),
            ALICE,
        )
        .await;
        next_where(&mut rx, |e| e.name == "iq" && e.get_attr("id") == Some("c")).await;
        (svc, store, rx)
    }

    async fn say(svc: &Arc<MucService>, id: &str, body: &str) {
        let m = Element::parse(
            format!(
                "<message id='{id}' to='{ROOM}' type='groupchat'><body>{body}</body></message>"
            )
            .as_bytes(),
            ns::CLIENT,
        )
        .unwrap();
        assert!(svc.route(m, ALICE).await.is_none());
    }

    /// The next stanza in the queue that satisfies `f`, within a second.
    async fn next_where(
        rx: &mut mpsc::Receiver<Outbound>,
        f: impl Fn(&Element) -> bool,
    ) -> Element {
        loop {
            let out = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
                .await
                .expect("a stanza within 2 s")
                .expect("queue open");
            let e = match out {
                Outbound::Stanza(e) => *e,
                // A room's fan-out: parse back what the session would write.
                Outbound::Shared(shared) => {
                    let mut xml = String::new();
                    shared.write_to(ALICE, false, &mut xml);
                    Element::parse(xml.as_bytes(), ns::CLIENT).expect("shared stanza parses")
                }
                Outbound::Close(_) => continue,
            };
            if f(&e) {
                return e;
            }
        }
    }

    async fn archived(store: &Faulty) -> Vec<(i64, Option<String>)> {
        let q = ArchiveQuery {
            limit: 100,
            ..ArchiveQuery::default()
        };
        store
            .archive_page(ROOM, &q)
            .await
            .unwrap()
            .messages
            .into_iter()
            .map(|m| (m.seq, m.body))
            .collect()
    }

    /// A commit whose outcome is unknown (it did commit, the reply was lost) is tried again
    /// with the same writes: the message, which has no origin-id, is found by the idempotency
    /// key the room gave it, stored once, and reflected once with its one id.
    #[tokio::test]
    async fn a_commit_whose_reply_is_lost_is_retried_without_storing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, store, mut rx) = room_with_alice(dir.path()).await;
        store.faults.lock().unwrap().push(Fault::LoseReply);
        say(&svc, "m1", "once").await;
        let reflected = next_where(&mut rx, |e| {
            e.name == "message" && e.get_attr("id") == Some("m1")
        })
        .await;
        assert_eq!(
            reflected.get_attr("type"),
            Some("groupchat"),
            "{}",
            reflected.to_xml()
        );
        let sid = reflected
            .get_child("stanza-id", ns::SID)
            .and_then(|s| s.get_attr("id"));
        assert_eq!(sid, Some("1"));
        assert_eq!(archived(&store).await, [(1, Some("once".to_string()))]);
        say(&svc, "m2", "next").await;
        let next = next_where(&mut rx, |e| {
            e.name == "message" && e.get_attr("id") == Some("m2")
        })
        .await;
        let sid = next
            .get_child("stanza-id", ns::SID)
            .and_then(|s| s.get_attr("id"));
        assert_eq!(
            sid,
            Some("2"),
            "no second copy of the first message: {}",
            next.to_xml()
        );
    }

    /// A record tick that finds the room's mailbox full is not lost: the room is told to
    /// re-read its record, and does so after its next batch, removing whoever the record no
    /// longer lets stay (here a ban saved behind the room's back, as another server would).
    #[tokio::test]
    async fn a_dropped_record_tick_makes_the_room_read_its_record_again() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, store, mut rx) = room_with_alice(dir.path()).await;
        // The ticks task drops a record tick for a room whose mailbox is full.
        let (full_tx, _full_rx) = mpsc::channel(1);
        full_tx.try_send(RoomInput::RecordTick).unwrap();
        let full = RoomHandle {
            tx: full_tx,
            presence_lost: Arc::default(),
            record_lost: Arc::default(),
        };
        let busy = "busy@conference.localhost";
        svc.rooms.lock().unwrap().insert(busy.into(), full.clone());
        let (ticks_tx, ticks_rx) = mpsc::channel(4);
        let (_drain_tx, drain_rx) = tokio::sync::broadcast::channel(1);
        let ticks = tokio::spawn(MucService::run_ticks(
            Arc::downgrade(&svc),
            ticks_rx,
            drain_rx,
        ));
        let tick = |room: &str| pchat_store::RoomTick {
            room: room.into(),
            kind: pchat_store::TickKind::Record,
            last_seq: 0,
            presence_of: None,
            presence_now: PresenceNow::Unknown,
            event: None,
            pep: None,
        };
        ticks_tx.send(tick(busy)).await.unwrap();
        drop(ticks_tx);
        ticks.await.unwrap();
        assert!(full.record_lost.load(Ordering::Relaxed), "told to re-read");

        // A real room told so re-reads at its next batch: alice, banned in the store
        // meanwhile, is removed with 301.
        let handle = svc.rooms.lock().unwrap().get(ROOM).cloned().unwrap();
        let mut record = store.room_get(ROOM).await.unwrap().unwrap();
        record.affiliations.retain(|a| a.jid != "alice@localhost");
        record.affiliations.push(pchat_room::AffiliationEntry {
            jid: "alice@localhost".into(),
            affiliation: pchat_room::Affiliation::Outcast,
            reason: Some("elsewhere".into()),
        });
        store
            .commit(vec![Write::PutRoom(record.clone())])
            .await
            .unwrap();
        handle.record_lost.store(true, Ordering::Relaxed);
        let ping = Element::parse(
            format!(
                "<iq id='p' type='get' to='{ROOM}'><ping xmlns='{}'/></iq>",
                ns::PING
            )
            .as_bytes(),
            ns::CLIENT,
        )
        .unwrap();
        svc.route(ping, ALICE).await;
        let gone = next_where(&mut rx, |e| {
            e.name == "presence" && e.get_attr("type") == Some("unavailable")
        })
        .await;
        let xml = gone.to_xml();
        assert!(
            xml.contains("code='301'") && xml.contains("elsewhere"),
            "{xml}"
        );
    }

    /// A batch the store refuses as invalid is not tried again: the sender hears at once that
    /// sending it again will not help, and nothing is stored.
    #[tokio::test]
    async fn a_refused_commit_is_answered_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, store, mut rx) = room_with_alice(dir.path()).await;
        let before = store.commits.load(Ordering::Relaxed);
        store.faults.lock().unwrap().push(Fault::Refuse);
        say(&svc, "bad", "refused").await;
        let err = next_where(&mut rx, |e| e.get_attr("id") == Some("bad")).await;
        assert_eq!(err.get_attr("type"), Some("error"), "{}", err.to_xml());
        let xml = err.to_xml();
        assert!(
            xml.contains("not-acceptable") && xml.contains("type='modify'"),
            "{xml}"
        );
        assert_eq!(
            store.commits.load(Ordering::Relaxed) - before,
            1,
            "one try only"
        );
        assert!(archived(&store).await.is_empty());
    }

    /// A loaded room costs its task's future for as long as it is loaded, and a pool loads
    /// every room on every server: the future must stay small.
    #[tokio::test]
    async fn a_room_task_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = pchat_store_sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap();
        let config = Config::default();
        let svc = MucService::new(
            &config,
            Arc::new(store),
            Arc::new(Router::default()),
            None,
            Feeds::default(),
        );
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
                record_lost: Arc::default(),
            },
            revision: 0,
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
