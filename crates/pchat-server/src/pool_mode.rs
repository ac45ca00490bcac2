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
pub struct Gate {
    inner: RwLock<Option<Arc<dyn Store>>>,
}

impl Gate {
    /// Wraps `store`.
    pub fn new(store: Arc<dyn Store>) -> Arc<Gate> {
        Arc::new(Gate {
            inner: RwLock::new(Some(store)),
        })
    }

    /// Puts `store` in place of the current one (a new principal); returns the old one.
    pub fn replace(&self, store: Arc<dyn Store>) -> Option<Arc<dyn Store>> {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(store)
    }

    /// Drops the real store; later calls fail as unavailable.
    pub fn close(&self) {
        self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn get(&self) -> StoreResult<Arc<dyn Store>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("this server is no longer active".into()))
    }
}

#[async_trait]
impl Store for Gate {
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        self.get()?.commit(writes).await
    }
    async fn server_secret(&self) -> StoreResult<Vec<u8>> {
        self.get()?.server_secret().await
    }
    async fn user_put(&self, user: UserRecord) -> StoreResult<()> {
        self.get()?.user_put(user).await
    }
    async fn user_get(&self, jid: &str) -> StoreResult<Option<UserRecord>> {
        self.get()?.user_get(jid).await
    }
    async fn user_remove(&self, jid: &str) -> StoreResult<bool> {
        self.get()?.user_remove(jid).await
    }
    async fn user_list(&self) -> StoreResult<Vec<String>> {
        self.get()?.user_list().await
    }
    async fn room_list(&self) -> StoreResult<Vec<RoomRecord>> {
        self.get()?.room_list().await
    }
    async fn room_get(&self, room: &str) -> StoreResult<Option<RoomRecord>> {
        self.get()?.room_get(room).await
    }
    async fn room_load(&self, room: &str) -> StoreResult<Option<StoredRoom>> {
        self.get()?.room_load(room).await
    }
    async fn room_stats(&self, room: &str) -> StoreResult<RoomStats> {
        self.get()?.room_stats(room).await
    }
    async fn archive_page(&self, room: &str, query: &ArchiveQuery) -> StoreResult<ArchivePage> {
        self.get()?.archive_page(room, query).await
    }
    async fn archive_get(&self, room: &str, seq: i64) -> StoreResult<Option<ArchivedMessage>> {
        self.get()?.archive_get(room, seq).await
    }
    async fn compliance_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> StoreResult<Vec<ComplianceRecord>> {
        self.get()?.compliance_after(after_id, limit).await
    }
    async fn subscribe_rooms(
        &self,
    ) -> StoreResult<Option<tokio::sync::mpsc::Receiver<pchat_store::RoomTick>>> {
        self.get()?.subscribe_rooms().await
    }
    async fn presence_put(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        stanza: Option<&str>,
    ) -> StoreResult<()> {
        self.get()?.presence_put(room, server, nick, stanza).await
    }
    async fn presence_leave(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        last: &str,
    ) -> StoreResult<()> {
        self.get()?.presence_leave(room, server, nick, last).await
    }
    async fn presence_list(&self, room: &str) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        self.get()?.presence_list(room).await
    }
    async fn presence_get(
        &self,
        room: &str,
        who: &[pchat_store::PresenceKey],
    ) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        self.get()?.presence_get(room, who).await
    }
    async fn presence_forget_server(&self, server: &str) -> StoreResult<()> {
        self.get()?.presence_forget_server(server).await
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
        Ok(PgAccess {
            tls,
            password: pchat_store_postgres::Password::Fetch(fetch),
        })
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
    loop {
        alive.keep(&etcd, &member).await;
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
                    Ok(a) => access = Some(a),
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
                    // same (the mirror was synchronous); commits in flight on the old
                    // principal fail and their senders retry.
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
                        let serving = Serving::new(
                            &state.config,
                            gate.clone(),
                            state.router.clone(),
                            Some(member.server.clone()),
                        );
                        let ticks = follow_ticks(&gate, &serving).await;
                        state.set_serving(Some(serving));
                        info!(database = %db.address, epoch = view.state.epoch, "active: serving");
                        current = Some(Active { db, gate, ticks });
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
    }
    // A clean exit: the others know at once.
    if let Some(lease) = alive.lease {
        let _ = etcd.lease_revoke(lease).await;
    }
    fatal.map_or(Ok(()), Err)
}

/// What an active server serves from.
struct Active {
    /// The principal (its name is what its certificate must prove).
    db: pchat_control::topology::Database,
    /// The store, behind the gate everyone holds.
    gate: Arc<Gate>,
    /// The task relaying room ticks from this store to the rooms.
    ticks: Option<tokio::task::JoinHandle<()>>,
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
