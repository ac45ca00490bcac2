//! Pool mode: the server follows its pool's state in etcd. While it is on the active-server
//! list it serves from the databases the pool state makes authoritative; while it is not, it
//! is idle: it takes no session and holds no database connection (invariant I6).
//!
//! The loop polls the pool's state key every `poll` (etcd's JSON gateway has no cheap watch
//! from a plain HTTP client; a poll of one small key is cheap and bounds the reaction time).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pchat_control::{keys, mirroring, pool, Etcd};
use pchat_room::RoomRecord;
use pchat_store::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceRecord, RoomStats, Store, StoreError,
    StoreResult, StoredRoom, UserRecord, Write, WriteOutcome,
};
use tracing::{error, info, warn};

use crate::state::{Drain, Serving, State};

/// How the server finds and joins its pool.
#[derive(Clone, Debug)]
pub struct PoolMember {
    /// etcd endpoints and the server's identity (`--tls-dir`, `pchat pki issue`:
    /// `servers/NAME`): TLS, and the server's own etcd user, which may write only its own
    /// keys; PostgreSQL is reached over TLS verified against the pool's CA and the
    /// instance's pinned name. No identity: only in an insecure pool, without TLS.
    pub etcd: pchat_control::EtcdAccess,
    /// Pool name.
    pub pool: String,
    /// This server's name in the topology.
    pub server: String,
    /// How often the pool state is read.
    pub poll: Duration,
    /// How long sessions get to leave before the store is closed anyway.
    pub drain_timeout: Duration,
}

/// A store that can be closed while others still hold it: closing drops the real store (and
/// with it every database connection) even if a stuck session still has a reference.
///
/// It is also where a server switches databases under its running rooms (a new principal
/// after a mirror failover). A call still waiting on the old store when it is replaced or
/// closed is abandoned at once as [`StoreError::Unavailable`]: the old principal may hang
/// for ever (frozen, cut off), and its answer, if one ever comes, is no longer wanted. The
/// room actor then sends the very same writes again, to the new principal: a commit that
/// did happen on the old one reached the synchronous mirror that is now the principal, and
/// is found there by its origin-id or idempotency key rather than stored twice.
pub struct Gate {
    inner: RwLock<Option<Arc<dyn Store>>>,
    /// Raised (under the write lock) each time the store is replaced or closed; each call
    /// watches it from the moment it took its store.
    switches: tokio::sync::watch::Sender<u64>,
}

/// What an abandoned call answers.
const SWITCHED: &str = "this server switched databases (or stopped serving) while the call \
                        waited: its outcome on the old database is unknown; send it again";

impl Gate {
    /// Wraps `store`.
    pub fn new(store: Arc<dyn Store>) -> Arc<Gate> {
        Arc::new(Gate {
            inner: RwLock::new(Some(store)),
            switches: tokio::sync::watch::channel(0).0,
        })
    }

    /// Puts `store` in place of the current one (a new principal); returns the old one.
    /// Calls still running on the old one are abandoned (see the type's docs).
    pub fn replace(&self, store: Arc<dyn Store>) -> Option<Arc<dyn Store>> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let old = inner.replace(store);
        self.switches.send_modify(|n| *n += 1);
        old
    }

    /// Drops the real store; later calls fail as unavailable, running ones are abandoned.
    pub fn close(&self) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.take();
        self.switches.send_modify(|n| *n += 1);
    }

    /// The current store, and a watch that fires when it is no longer current. Both are
    /// taken under the same lock, so a call never starts on a store already replaced and
    /// is never abandoned for a switch that happened before it began.
    fn get(&self) -> StoreResult<(Arc<dyn Store>, tokio::sync::watch::Receiver<u64>)> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let switches = self.switches.subscribe();
        inner
            .clone()
            .map(|store| (store, switches))
            .ok_or_else(|| StoreError::Unavailable("this server is no longer active".into()))
    }
}

/// Runs `call` until it answers or its store is switched away (whichever comes first; an
/// answer that is there already wins).
async fn guarded<T>(
    mut switches: tokio::sync::watch::Receiver<u64>,
    call: impl std::future::Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    tokio::select! {
        biased;
        r = call => r,
        _ = switches.changed() => Err(StoreError::Unavailable(SWITCHED.into())),
    }
}

#[async_trait]
impl Store for Gate {
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.commit(writes)).await
    }
    async fn server_secret(&self) -> StoreResult<Vec<u8>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.server_secret()).await
    }
    async fn user_put(&self, user: UserRecord) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.user_put(user)).await
    }
    async fn user_get(&self, jid: &str) -> StoreResult<Option<UserRecord>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.user_get(jid)).await
    }
    async fn user_remove(&self, jid: &str) -> StoreResult<bool> {
        let (store, switched) = self.get()?;
        guarded(switched, store.user_remove(jid)).await
    }
    async fn user_list(&self) -> StoreResult<Vec<String>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.user_list()).await
    }
    async fn room_list(&self) -> StoreResult<Vec<RoomRecord>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.room_list()).await
    }
    async fn room_get(&self, room: &str) -> StoreResult<Option<RoomRecord>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.room_get(room)).await
    }
    async fn room_load(&self, room: &str) -> StoreResult<Option<StoredRoom>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.room_load(room)).await
    }
    async fn room_stats(&self, room: &str) -> StoreResult<RoomStats> {
        let (store, switched) = self.get()?;
        guarded(switched, store.room_stats(room)).await
    }
    async fn archive_page(&self, room: &str, query: &ArchiveQuery) -> StoreResult<ArchivePage> {
        let (store, switched) = self.get()?;
        guarded(switched, store.archive_page(room, query)).await
    }
    async fn archive_get(&self, room: &str, seq: i64) -> StoreResult<Option<ArchivedMessage>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.archive_get(room, seq)).await
    }
    async fn id_epoch(&self) -> StoreResult<u64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.id_epoch()).await
    }
    async fn raise_id_epoch(&self, epoch: u64) -> StoreResult<u64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.raise_id_epoch(epoch)).await
    }
    async fn directory_get(&self) -> StoreResult<pchat_store::StoredDirectory> {
        let (store, switched) = self.get()?;
        guarded(switched, store.directory_get()).await
    }
    async fn directory_revision(&self) -> StoreResult<i64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.directory_revision()).await
    }
    async fn invitation_keep(&self, invitee: &str, stanza: &str) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.invitation_keep(invitee, stanza)).await
    }
    async fn invitations_take(&self, invitee: &str) -> StoreResult<Vec<String>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.invitations_take(invitee)).await
    }
    async fn pep_publish(
        &self,
        owner: &str,
        node: &str,
        config: pchat_store::PepNode,
        item: pchat_store::PepItem,
    ) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_publish(owner, node, config, item)).await
    }
    async fn pep_node(&self, owner: &str, node: &str) -> StoreResult<Option<pchat_store::PepNode>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_node(owner, node)).await
    }
    async fn pep_nodes(&self, owner: &str) -> StoreResult<Vec<String>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_nodes(owner)).await
    }
    async fn pep_items(&self, owner: &str, node: &str) -> StoreResult<Vec<pchat_store::PepItem>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_items(owner, node)).await
    }
    async fn pep_retract(&self, owner: &str, node: &str, id: &str) -> StoreResult<bool> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_retract(owner, node, id)).await
    }
    async fn pep_delete(&self, owner: &str, node: &str) -> StoreResult<bool> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_delete(owner, node)).await
    }
    async fn directory_put(
        &self,
        directory: &pchat_room::directory::Directory,
        revision: i64,
    ) -> StoreResult<i64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.directory_put(directory, revision)).await
    }
    async fn compliance_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> StoreResult<Vec<ComplianceRecord>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.compliance_after(after_id, limit)).await
    }
    async fn compliance_export_state(&self) -> StoreResult<pchat_store::ExportState> {
        let (store, switched) = self.get()?;
        guarded(switched, store.compliance_export_state()).await
    }
    async fn compliance_export_step(
        &self,
        from: &pchat_store::ExportState,
        to: &pchat_store::ExportState,
        run: Option<pchat_store::NewComplianceEvent>,
    ) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.compliance_export_step(from, to, run)).await
    }
    async fn compliance_purge(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.compliance_purge(before, limit)).await
    }
    async fn file_create(
        &self,
        file: &pchat_store::FileRecord,
        owner_quota_bytes: u64,
    ) -> StoreResult<pchat_store::FileCreated> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_create(file, owner_quota_bytes)).await
    }
    async fn file_chunk_put(&self, id: &str, index: u32, data: Vec<u8>) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_chunk_put(id, index, data)).await
    }
    async fn file_finish(&self, id: &str, sha256: &str) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_finish(id, sha256)).await
    }
    async fn file_get(&self, id: &str) -> StoreResult<Option<pchat_store::FileRecord>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_get(id)).await
    }
    async fn file_chunk_get(&self, id: &str, index: u32) -> StoreResult<Option<Vec<u8>>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_chunk_get(id, index)).await
    }
    async fn file_bind(&self, id: &str, owner: &str, room: &str) -> StoreResult<bool> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_bind(id, owner, room)).await
    }
    async fn file_room_bytes(&self, room: &str) -> StoreResult<u64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_room_bytes(room)).await
    }
    async fn file_list(
        &self,
        filter: &pchat_store::FileFilter,
    ) -> StoreResult<Vec<pchat_store::FileRecord>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_list(filter)).await
    }
    async fn file_remove(&self, id: &str) -> StoreResult<bool> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_remove(id)).await
    }
    async fn file_purge_unfinished(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        let (store, switched) = self.get()?;
        guarded(switched, store.file_purge_unfinished(before, limit)).await
    }
    async fn subscribe_rooms(
        &self,
    ) -> StoreResult<Option<tokio::sync::mpsc::Receiver<pchat_store::RoomTick>>> {
        // Only starts a task: nothing to wait for. (A switch aborts the relay instead.)
        let (store, _) = self.get()?;
        store.subscribe_rooms().await
    }
    async fn presence_put(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        stanza: Option<&str>,
    ) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.presence_put(room, server, nick, stanza)).await
    }
    async fn presence_leave(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        last: &str,
    ) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.presence_leave(room, server, nick, last)).await
    }
    async fn presence_list(&self, room: &str) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.presence_list(room)).await
    }
    async fn presence_get(
        &self,
        room: &str,
        who: &[pchat_store::PresenceKey],
    ) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.presence_get(room, who)).await
    }
    async fn presence_forget_server(&self, server: &str) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.presence_forget_server(server)).await
    }
    async fn pep_announce(&self, event: &pchat_store::PepEvent) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.pep_announce(event)).await
    }
    async fn web_session_put(
        &self,
        id: &str,
        session: &pchat_store::WebSession,
    ) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.web_session_put(id, session)).await
    }
    async fn web_session_get(&self, id: &str) -> StoreResult<Option<pchat_store::WebSession>> {
        let (store, switched) = self.get()?;
        guarded(switched, store.web_session_get(id)).await
    }
    async fn web_session_touch(&self, id: &str, seen_at: pchat_room::Timestamp) -> StoreResult<()> {
        let (store, switched) = self.get()?;
        guarded(switched, store.web_session_touch(id, seen_at)).await
    }
    async fn web_session_remove(&self, id: &str) -> StoreResult<bool> {
        let (store, switched) = self.get()?;
        guarded(switched, store.web_session_remove(id)).await
    }
    async fn web_session_purge(
        &self,
        seen_before: pchat_room::Timestamp,
        created_before: pchat_room::Timestamp,
    ) -> StoreResult<u64> {
        let (store, switched) = self.get()?;
        guarded(
            switched,
            store.web_session_purge(seen_before, created_before),
        )
        .await
    }
}

/// How this process reaches the pool's PostgreSQL: TLS or not, and where the servers'
/// role's password comes from.
#[derive(Clone)]
pub struct PgAccess {
    /// TLS verified against the pool's CA and the instance's name (`None`: insecure pool).
    pub tls: Option<pchat_tls::postgres::MakeRustlsConnect>,
    /// The password of `pchat_server`.
    pub password: pchat_store_postgres::Password,
    /// [`pchat_store_postgres::PostgresOptions::query_timeout_ms`].
    pub query_timeout_ms: u64,
    /// [`pchat_store_postgres::PostgresOptions::commit_timeout_ms`].
    pub commit_timeout_ms: u64,
    /// [`pchat_store_postgres::PostgresOptions::writer_lanes`].
    pub writer_lanes: usize,
    /// [`pchat_store_postgres::PostgresOptions::group_commit_delay_us`].
    pub group_commit_delay_us: u64,
}

impl PgAccess {
    /// TLS from the identity in `tls_dir` (or none, refused unless the pool is insecure),
    /// and the servers' password read from etcd at every new connection (a rotated password
    /// is used from the next connection on).
    pub fn new(
        tls_dir: Option<&std::path::Path>,
        insecure: bool,
        pool: &str,
        etcd: &Etcd,
    ) -> Result<PgAccess, String> {
        let tls = match tls_dir {
            Some(dir) => {
                let id = pchat_tls::Identity::load(dir)
                    .map_err(|e| format!("identity {}: {e}", dir.display()))?;
                let config = id
                    .client_config(pchat_tls::PeerName::Dialled)
                    .map_err(|e| format!("identity {}: {e}", dir.display()))?;
                Some(pchat_tls::postgres::MakeRustlsConnect::new(config))
            }
            None if insecure => None,
            None => {
                return Err(format!(
                    "pool {pool} is not insecure: its PostgreSQL is reached only over TLS; give this process its identity \
                     (`--tls-dir DIR` or PCHAT_TLS_DIR, made by `pchat pki issue`)"
                ))
            }
        };
        let (etcd, pool) = (etcd.clone(), pool.to_owned());
        let fetch: Arc<pchat_store_postgres::PasswordFn> = Arc::new(move || {
            let (etcd, pool) = (etcd.clone(), pool.clone());
            Box::pin(async move {
                pchat_control::postgres::read_password(
                    &etcd,
                    &pool,
                    pchat_control::postgres::PgRole::Server,
                )
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!("etcd holds no password for pchat_server of pool {pool}: run `pchat --in-pool {pool} db install`")
                })
            })
        });
        let defaults = pchat_store_postgres::PostgresOptions::new("", "");
        Ok(PgAccess {
            tls,
            password: pchat_store_postgres::Password::Fetch(fetch),
            query_timeout_ms: defaults.query_timeout_ms,
            commit_timeout_ms: defaults.commit_timeout_ms,
            writer_lanes: defaults.writer_lanes,
            group_commit_delay_us: defaults.group_commit_delay_us,
        })
    }

    /// The store's deadlines and writer lanes from the server's configuration (`[store]`).
    pub fn with_timeouts(self, store: &crate::config::StoreConfig) -> PgAccess {
        PgAccess {
            query_timeout_ms: store.pool_query_timeout_ms,
            commit_timeout_ms: store.pool_commit_timeout_ms,
            writer_lanes: store.pool_writer_lanes,
            group_commit_delay_us: store.group_commit_delay_us,
            ..self
        }
    }

    /// Connection options for the `mgc`/`mgccomp` databases of instance `db` of `pool`, as
    /// `pchat_server`: dial the topology's address, verify the instance's pinned name.
    pub fn options(
        &self,
        pool: &str,
        db: &pchat_control::topology::Database,
    ) -> Result<pchat_store_postgres::PostgresOptions, String> {
        let e = pchat_control::postgres::endpoint(pool, db)?;
        let words = e.conn_words(self.tls.is_some());
        let user = pchat_control::postgres::PgRole::Server.name();
        let conn = |dbname: &str| format!("{words} user={user} dbname={dbname} connect_timeout=5");
        Ok(pchat_store_postgres::PostgresOptions {
            tls: self.tls.clone(),
            password: self.password.clone(),
            query_timeout_ms: self.query_timeout_ms,
            commit_timeout_ms: self.commit_timeout_ms,
            writer_lanes: self.writer_lanes,
            group_commit_delay_us: self.group_commit_delay_us,
            ..pchat_store_postgres::PostgresOptions::new(conn("mgc"), conn("mgccomp"))
        })
    }
}

/// How long a server's `alive` key outlives its last renewal: a server that crashed is
/// known to be gone this long after (its clients' presence is withdrawn, idle servers stop
/// sending clients to it).
const ALIVE_TTL_S: u64 = 5;

/// This server's `alive` key under an etcd lease, renewed every third of its TTL.
struct Alive {
    lease: Option<i64>,
    renew_at: std::time::Instant,
}

impl Alive {
    async fn keep(&mut self, etcd: &Etcd, member: &PoolMember) {
        let now = std::time::Instant::now();
        if now < self.renew_at {
            return;
        }
        self.renew_at = now + Duration::from_secs(ALIVE_TTL_S) / 3;
        if let Some(lease) = self.lease {
            match etcd.lease_keepalive(lease).await {
                Ok(Some(_)) => return,
                Ok(None) => self.lease = None,
                // etcd unreachable: try again next time; the key may expire meanwhile.
                Err(_) => return,
            }
        }
        if let Ok(lease) = etcd.lease_grant(ALIVE_TTL_S).await {
            let key = keys::server_alive(&member.pool, &member.server);
            if etcd.put_with_lease(&key, b"1", lease).await.is_ok() {
                self.lease = Some(lease);
            } else {
                let _ = etcd.lease_revoke(lease).await;
            }
        }
    }
}

/// Follows the pool until the process shuts down. `Err`: the server must stop (it has no
/// identity and the pool is not insecure), with the reason.
pub async fn run(state: Arc<State>, member: PoolMember, etcd: Etcd) -> Result<(), String> {
    let mut fatal = None;
    // Made at the first read of the topology (it says whether the pool is insecure); why it
    // could not be, said once rather than at every poll.
    let mut access: Option<PgAccess> = None;
    let mut access_error: Option<String> = None;
    let mut shutdown = state.shutdown.subscribe();
    // The database this server currently serves from, with the store gate to close.
    let mut current: Option<Active> = None;
    let mut last_active: Vec<String> = Vec::new();
    let mut alive = Alive {
        lease: None,
        renew_at: std::time::Instant::now(),
    };
    // Active servers found dead (their `alive` key gone) whose presence was withdrawn.
    let mut dead: std::collections::HashSet<String> = Default::default();
    // What this server acknowledged, published for a DR failover's loss bounds; taken over
    // from an earlier life at the first serving period.
    let marks = crate::marks::Marks::new(state.config.marks.clone());
    let mut marks_recovered = false;
    // The pool's settings (`pchat config set`), read at every poll for every serving
    // period's rooms.
    let settings = tokio::sync::watch::Sender::new(None);
    let mut settings_error: Option<String> = None;
    loop {
        alive.keep(&etcd, &member).await;
        match read_settings(&etcd, &member.pool).await {
            Ok(s) => {
                settings_error = None;
                settings.send_if_modified(|now| {
                    let changed = *now != s;
                    *now = s;
                    changed
                });
            }
            Err(e) => {
                if settings_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "cannot read the pool's settings; keeping the ones in force");
                    settings_error = Some(e);
                }
            }
        }
        let view = match pool::get(&etcd, &member.pool).await {
            Ok(v) => Some(v),
            Err(e @ pool::PoolError::NeedsIdentity(_)) => {
                error!(error = %e, "refusing to serve the pool");
                fatal = Some(e.to_string());
                break;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the pool state");
                None
            }
        };
        if let Some(view) = view {
            if access.is_none() {
                match PgAccess::new(
                    member.etcd.tls_dir.as_deref(),
                    view.topology.insecure,
                    &member.pool,
                    &etcd,
                ) {
                    Ok(a) => access = Some(a.with_timeouts(&state.config.store)),
                    Err(e) => {
                        if access_error.as_deref() != Some(e.as_str()) {
                            warn!(error = %e, "cannot reach the pool's PostgreSQL");
                            access_error = Some(e);
                        }
                    }
                }
            }
            let active = view.state.active_servers.contains(&member.server);
            // Which of the other active servers are alive (`None`: etcd could not say).
            let mut others: Vec<(String, Option<bool>)> = Vec::new();
            for s in view
                .state
                .active_servers
                .iter()
                .filter(|s| **s != member.server)
            {
                let up = etcd
                    .get(&keys::server_alive(&member.pool, s))
                    .await
                    .ok()
                    .map(|kv| kv.is_some());
                others.push((s.clone(), up));
            }
            // Send clients to a live active server; to any active one if none is known alive.
            let redirect = others
                .iter()
                .filter(|(_, up)| *up == Some(true))
                .chain(others.iter())
                .find_map(|(s, _)| view.topology.server(s))
                .map(|s| s.address.clone());
            state.set_idle_redirect(redirect.clone());
            if let Some(Active { gate, .. }) = &current {
                for (s, up) in &others {
                    match up {
                        Some(false) if !dead.contains(s) => {
                            // Crashed (or cut off from etcd for longer than the TTL): its
                            // occupants are gone; their nicks are free again.
                            match gate.presence_forget_server(s).await {
                                Ok(()) => {
                                    info!(server = %s, "an active server is not alive: its occupants' presence is withdrawn");
                                    dead.insert(s.clone());
                                }
                                Err(e) => {
                                    warn!(error = %e, server = %s, "cannot clear a dead server's presence")
                                }
                            }
                        }
                        Some(true) => {
                            dead.remove(s);
                        }
                        _ => {}
                    }
                }
            }
            if view.state.active_servers != last_active {
                // A server that left the active list (or crashed and was removed) no longer
                // has occupants: stop showing the ones it published.
                if let Some(Active { gate, .. }) = &current {
                    for gone in last_active
                        .iter()
                        .filter(|s| !view.state.active_servers.contains(s))
                    {
                        if let Err(e) = gate.presence_forget_server(gone).await {
                            warn!(error = %e, server = %gone, "cannot clear a departed server's presence");
                        }
                    }
                }
                last_active = view.state.active_servers.clone();
            }
            // The authoritative site's current principal: after a mirror failover that is the
            // former mirror, as recorded in etcd by `pchat db mirror failover`.
            let site = view.topology.authoritative_site(view.state.state).cloned();
            let target = match (active, site) {
                (true, Some(site)) => {
                    match mirroring::principal_of(&etcd, &member.pool, &site).await {
                        Ok(db) => Some(db),
                        Err(e) => {
                            warn!(error = %e, "cannot read the site's principal; keeping the current one");
                            current.as_ref().map(|c| c.db.clone())
                        }
                    }
                }
                _ => None,
            };
            match (current.as_mut(), target) {
                (Some(cur), Some(db)) if cur.db != db => {
                    // Same pool role, new principal (a mirror failover): swap the store under
                    // the running rooms and sessions instead of draining them. The data is the
                    // same (the mirror was synchronous). Calls still waiting on the old
                    // principal are abandoned by the gate at once (it may hang for ever), and
                    // the rooms send the same writes again, here.
                    match connect(access.as_ref(), &member.pool, &db).await {
                        Ok(store) => {
                            let old = cur.gate.replace(store);
                            drop(old);
                            if let Some(t) = cur.ticks.take() {
                                t.abort();
                            }
                            if let Some(serving) = state.serving() {
                                cur.ticks = follow_ticks(&cur.gate, &serving).await;
                            }
                            info!(from = %cur.db.address, to = %db.address, "the site's principal changed: switched databases");
                            cur.db = db;
                        }
                        Err(e) => {
                            warn!(database = %db.address, error = %e, "the site's new principal is unreachable; retrying")
                        }
                    }
                }
                (Some(_), Some(_)) => {}
                (Some(_), None) => {
                    if let Some(cur) = current.take() {
                        info!(database = %cur.db.address, epoch = view.state.epoch, "leaving the active servers: draining");
                        if let Some(t) = cur.ticks {
                            t.abort();
                        }
                        drain(
                            &state,
                            &cur.gate,
                            Some(&member.server),
                            redirect,
                            member.drain_timeout,
                        )
                        .await;
                        cur.publisher.finish().await;
                    }
                }
                (None, Some(db)) => match connect(access.as_ref(), &member.pool, &db).await {
                    Ok(store) => {
                        let gate = Gate::new(store);
                        // Whatever this server published in an earlier life is stale, and so
                        // is what servers that are not active now left behind (a database
                        // restored or failed over from another site carries their rows).
                        let stale = std::iter::once(&member.server).chain(
                            view.topology
                                .servers
                                .iter()
                                .map(|s| &s.name)
                                .filter(|n| !view.state.active_servers.contains(n)),
                        );
                        for s in stale {
                            if let Err(e) = gate.presence_forget_server(s).await {
                                warn!(error = %e, server = %s, "cannot clear stale presence");
                            }
                        }
                        if !marks_recovered {
                            marks.recover(&etcd, &member.pool, &member.server).await;
                            marks_recovered = true;
                        }
                        let publisher = Publisher::start(&marks, &etcd, &member);
                        let serving = Serving::new(
                            &state.config,
                            crate::marks::MarkedStore::new(gate.clone(), marks.clone()),
                            state.router.clone(),
                            Some(member.server.clone()),
                            crate::muc::Feeds {
                                external: state.directory_feed.clone(),
                                settings: Some(settings.subscribe()),
                            },
                        );
                        let ticks = follow_ticks(&gate, &serving).await;
                        state.set_serving(Some(serving));
                        info!(database = %db.address, epoch = view.state.epoch, "active: serving");
                        current = Some(Active {
                            db,
                            gate,
                            ticks,
                            publisher,
                        });
                    }
                    Err(e) => {
                        warn!(database = %db.address, error = %e, "active, but the database is unreachable; retrying")
                    }
                },
                (None, None) => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(member.poll) => {}
            _ = shutdown.recv() => break,
        }
    }
    if let Some(cur) = current {
        if let Some(t) = cur.ticks {
            t.abort();
        }
        drain(
            &state,
            &cur.gate,
            Some(&member.server),
            state.idle_redirect(),
            member.drain_timeout,
        )
        .await;
        cur.publisher.finish().await;
    }
    // A clean exit: the others know at once.
    if let Some(lease) = alive.lease {
        let _ = etcd.lease_revoke(lease).await;
    }
    fatal.map_or(Ok(()), Err)
}

/// The pool's settings in etcd (`None`: the key does not exist).
async fn read_settings(
    etcd: &Etcd,
    pool: &str,
) -> Result<Option<pchat_room::directory::Settings>, String> {
    let Some(kv) = etcd
        .get(&keys::settings(pool))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let s: pchat_room::directory::Settings = serde_json::from_slice(&kv.value)
        .map_err(|e| format!("{}: not pchat settings: {e}", keys::settings(pool)))?;
    s.validate()
        .map_err(|e| format!("{}: {e}", keys::settings(pool)))?;
    Ok(Some(s))
}

/// What an active server serves from.
struct Active {
    /// The principal (its name is what its certificate must prove).
    db: pchat_control::topology::Database,
    /// The store, behind the gate everyone holds.
    gate: Arc<Gate>,
    /// The task relaying room ticks from this store to the rooms.
    ticks: Option<tokio::task::JoinHandle<()>>,
    /// The task publishing this server's acknowledgment marks.
    publisher: Publisher,
}

/// The marks publisher of one serving period.
struct Publisher {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(marks: &Arc<crate::marks::Marks>, etcd: &Etcd, member: &PoolMember) -> Publisher {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(crate::marks::run_publisher(
            marks.clone(),
            etcd.clone(),
            member.pool.clone(),
            member.server.clone(),
            stopped,
        ));
        Publisher { stop, task }
    }

    /// After the drain: a last publication without allowance (bounded), then the task ends.
    async fn finish(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .is_err()
        {
            warn!("the marks publisher did not finish in time");
        }
    }
}

async fn connect(
    access: Option<&PgAccess>,
    pool: &str,
    db: &pchat_control::topology::Database,
) -> StoreResult<Arc<dyn Store>> {
    let access = access.ok_or_else(|| {
        StoreError::Unavailable("no way to reach PostgreSQL (see the error above)".into())
    })?;
    let options = access.options(pool, db).map_err(StoreError::Unavailable)?;
    let store = pchat_store_postgres::PostgresStore::connect(options).await?;
    Ok(Arc::new(store))
}

/// Other servers' commits wake this server's rooms up. Aborting the task drops the
/// subscription, which closes its database session.
async fn follow_ticks(gate: &Gate, serving: &Serving) -> Option<tokio::task::JoinHandle<()>> {
    match gate.subscribe_rooms().await {
        Ok(Some(ticks)) => Some(tokio::spawn(crate::muc::MucService::run_ticks(
            Arc::downgrade(&serving.muc),
            ticks,
            serving.drain.subscribe(),
        ))),
        _ => None,
    }
}

/// Ends the serving period: no new sessions, current ones sent elsewhere, rooms shut down,
/// then the store closed, so no database connection is left.
async fn drain(
    state: &State,
    gate: &Gate,
    server: Option<&String>,
    redirect: Option<String>,
    timeout: Duration,
) {
    let Some(serving) = state.set_serving(None) else {
        gate.close();
        return;
    };
    let deadline = Instant::now() + timeout;
    // Sessions hold the serving period until they have left. The notice is repeated: a session
    // that took this serving period just before it ended subscribes to the notice only once it
    // has bound (after TLS and SASL), and would otherwise miss it.
    while Arc::strong_count(&serving) > 1 && Instant::now() < deadline {
        let _ = serving.drain.send(Drain {
            redirect: redirect.clone(),
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = Arc::strong_count(&serving) - 1;
    if left > 0 {
        warn!(
            sessions = left,
            "drain timeout: closing the store under the remaining sessions"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), serving.muc.shutdown()).await;
    if let Some(me) = &server {
        // Nobody is here any more: the other servers stop showing this server's occupants.
        let _ = gate.presence_forget_server(me).await;
    }
    gate.close();
    if left > 0 {
        // Whoever is still bound to the closed period keeps being told to go (bounded).
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(600);
            while Arc::strong_count(&serving) > 1 && Instant::now() < until {
                let _ = serving.drain.send(Drain {
                    redirect: redirect.clone(),
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod switch {
        //! A room whose commit hangs on the old principal goes on as soon as the gate
        //! switches databases: the commit is abandoned, the same writes go to the new
        //! store, and the message is stored once whether or not the hung commit had
        //! happened.

        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        use pchat_xmpp::{ns, Element};
        use tokio::sync::mpsc;

        use super::*;
        use crate::config::Config;
        use crate::muc::MucService;
        use crate::router::{Outbound, Router, SessionHandle};

        const ROOM: &str = "r@conference.localhost";
        const ALICE: &str = "alice@localhost/a";

        /// The "old principal": a real SQLite store whose commits, once `hang` is set,
        /// never answer — after committing (`commit_first`: the outcome-unknown case) or
        /// without committing.
        struct Hung {
            inner: Arc<pchat_store_sqlite::SqliteStore>,
            hang: AtomicBool,
            commit_first: bool,
        }

        #[async_trait]
        impl Store for Hung {
            async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
                if !self.hang.load(Ordering::Relaxed) {
                    return self.inner.commit(writes).await;
                }
                if self.commit_first {
                    self.inner.commit(writes).await?;
                }
                std::future::pending().await
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
            async fn web_session_get(
                &self,
                id: &str,
            ) -> StoreResult<Option<pchat_store::WebSession>> {
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
            async fn archive_get(
                &self,
                room: &str,
                seq: i64,
            ) -> StoreResult<Option<ArchivedMessage>> {
                self.inner.archive_get(room, seq).await
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
            async fn id_epoch(&self) -> StoreResult<u64> {
                self.inner.id_epoch().await
            }
            async fn raise_id_epoch(&self, epoch: u64) -> StoreResult<u64> {
                self.inner.raise_id_epoch(epoch).await
            }
        }

        async fn next_where(
            rx: &mut mpsc::Receiver<Outbound>,
            within: Duration,
            f: impl Fn(&Element) -> bool,
        ) -> Option<Element> {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                let out = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
                let e = match out {
                    Outbound::Stanza(e) => *e,
                    Outbound::Shared(shared) => {
                        let mut xml = String::new();
                        shared.write_to(ALICE, false, &mut xml);
                        Element::parse(xml.as_bytes(), ns::CLIENT).ok()?
                    }
                    Outbound::Close(_) => continue,
                };
                if f(&e) {
                    return Some(e);
                }
            }
        }

        fn stanza(xml: String) -> Element {
            Element::parse(xml.as_bytes(), ns::CLIENT).expect("test stanza")
        }

        fn stanza_id(e: &Element) -> Option<String> {
            e.elements()
                .find(|c| c.is("stanza-id", ns::SID))
                .and_then(|c| c.get_attr("id"))
                .map(str::to_owned)
        }

        async fn check(commit_first: bool) {
            let dir = tempfile::tempdir().unwrap();
            let shared = Arc::new(
                pchat_store_sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap(),
            );
            let old = Arc::new(Hung {
                inner: shared.clone(),
                hang: AtomicBool::new(false),
                commit_first,
            });
            let gate = Gate::new(old.clone());
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
                gate.clone(),
                router,
                None,
                crate::muc::Feeds::default(),
            );
            svc.install_directory(pchat_room::directory::Access::open());
            svc.route(
                stanza(format!(
                    "<presence to='{ROOM}/alice'><x xmlns='{}'/></presence>",
                    ns::MUC
                )),
                ALICE,
            )
            .await;
            svc.route(
                stanza(format!(
                    "<iq id='c' type='set' to='{ROOM}'><query xmlns='{}'><x xmlns='{}' type='submit'/></query></iq>",
                    ns::MUC_OWNER,
                    ns::DATA_FORMS
                )),
                ALICE,
            )
            .await;
            next_where(&mut rx, Duration::from_secs(2), |e| {
                e.name == "iq" && e.get_attr("id") == Some("c")
            })
            .await
            .expect("the room is configured");

            old.hang.store(true, Ordering::Relaxed);
            let message = stanza(format!(
                "<message to='{ROOM}' type='groupchat'><body>hello</body><origin-id xmlns='{}' id='o1'/></message>",
                ns::SID
            ));
            svc.route(message, ALICE).await;
            let is_reflection =
                |e: &Element| e.name == "message" && e.get_attr("type") == Some("groupchat");
            assert!(
                next_where(&mut rx, Duration::from_millis(500), is_reflection)
                    .await
                    .is_none(),
                "nothing is acknowledged while the commit hangs"
            );
            // The new principal: the same data (a synchronous mirror had it all).
            let started = tokio::time::Instant::now();
            drop(gate.replace(shared.clone()));
            let reflection = next_where(&mut rx, Duration::from_secs(3), is_reflection)
                .await
                .expect("the message is acknowledged after the switch");
            let took = started.elapsed();
            assert!(took < Duration::from_secs(1), "{took:?}");
            assert_eq!(stanza_id(&reflection).as_deref(), Some("1"));
            let page = shared
                .archive_page(
                    ROOM,
                    &ArchiveQuery {
                        limit: 10,
                        ..ArchiveQuery::default()
                    },
                )
                .await
                .unwrap();
            let stored: Vec<(i64, Option<String>)> = page
                .messages
                .into_iter()
                .map(|m| (m.seq, m.origin_id))
                .collect();
            assert_eq!(stored, [(1, Some("o1".to_owned()))], "stored once");
        }

        #[tokio::test]
        async fn a_commit_hung_before_it_happened_is_sent_again_to_the_new_store() {
            check(false).await;
        }

        #[tokio::test]
        async fn a_commit_hung_after_it_happened_is_found_on_the_new_store_not_stored_twice() {
            check(true).await;
        }
    }

    #[test]
    fn only_an_insecure_pool_is_reached_without_an_identity() {
        let etcd = Etcd::new(&["http://127.0.0.1:1".to_owned()]);
        let err = PgAccess::new(None, false, "pc1", &etcd)
            .err()
            .expect("a secure pool needs an identity");
        assert!(err.contains("--tls-dir"), "{err}");
        let a = PgAccess::new(None, true, "pc1", &etcd).expect("insecure");
        assert!(a.tls.is_none());
        let db = pchat_control::topology::Database {
            name: "a_db".into(),
            address: "127.0.0.1:5433".into(),
            agent: "http://127.0.0.1:7070".into(),
        };
        let o = a.options("pc1", &db).unwrap();
        assert_eq!(
            o.mgc,
            "host=127.0.0.1 port=5433 user=pchat_server dbname=mgc connect_timeout=5"
        );
        let err = PgAccess::new(
            Some(std::path::Path::new("/nonexistent")),
            true,
            "pc1",
            &etcd,
        )
        .err()
        .expect("a missing identity");
        assert!(err.contains("/nonexistent"), "{err}");
    }
}
