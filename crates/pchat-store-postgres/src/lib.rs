//! pchat's pool storage: the PostgreSQL databases `mgc` and `mgccomp` (Lync's names),
//! written by every `pchat serve` of a pool at once.
//!
//! - `mgc`: users, rooms, the archive with its full-text index, uploaded files (XEP-0363, in
//!   pieces: `files.rs`), and `applied_batch`;
//! - `mgccomp`: compliance events.
//!
//! They may live in one cluster or two; each is reached through its own connection string
//! ([`PostgresOptions`]). [`PostgresStore::install`] creates or upgrades both schemas (each
//! database has a `schema_version` table; a newer one is refused) and
//! [`PostgresStore::connect`] refuses a database whose schema is missing or older.
//!
//! # Writes: group commit, compliance first, no in-memory state
//!
//! One writer task per store instance groups concurrent [`Store::commit`] calls into one
//! `mgc` and one `mgccomp` transaction (see `writer.rs` for the steps). Several servers
//! write the same databases, so nothing about the data is cached in memory: per-room
//! sequence numbers are taken from `room.last_seq` under the room's row lock
//! (`SELECT … FOR UPDATE`) inside the `mgc` transaction, gapless and unique across writers,
//! and origin-id dedupe is checked under that same lock (with a unique index behind it).
//!
//! The order is compliance first, as with SQLite: the `mgc` transaction locks the rooms and
//! assigns numbers without committing; the compliance records (with their `message_seq` and
//! the group's batch id, drawn from a sequence in `mgccomp`) are written and COMMITTED; then
//! `mgc` records the batch id in `applied_batch` and COMMITS. A record is `committed` exactly
//! when its batch id is in `applied_batch`, which [`Store::compliance_after`] asks `mgc` in a
//! second query (there is no cross-database join). A crash between the two commits therefore
//! leaves records that read `committed = false` for good, with no reconcile step that could
//! race the other live writers of the pool. Two advisory locks make this exact while writers
//! are live: compliance ids are committed in increasing order across servers (so a consumer
//! paging by id never skips one), and a reader that sees a record of a batch still in
//! flight waits for that batch to end before answering.
//!
//! # LISTEN/NOTIFY
//!
//! Every `mgc` commit that appended messages sends, inside its transaction (so only if it
//! commits), `NOTIFY pchat_room, '<room jid>:<last seq>'` for each such room
//! ([`NOTIFY_CHANNEL`]); one that saved or deleted a room's record sends `'<room jid>:r'`, and
//! one that carried an announcement (`Write::Announce`) `'<room jid>:e'` and the event as JSON
//! on a second line. A user's PEP change is told after it committed
//! (`Store::pep_announce`): `'<owner jid>:u'` and the change as JSON on a second line. It costs one statement per group and lets the other servers of the
//! pool wake up and fetch what they missed by sequence number; notifications are only a
//! wake-up (they are lost while a listener is disconnected), the sequence numbers are the
//! truth.
//!
//! # Full text
//!
//! PostgreSQL's own: a stored generated `tsvector` column (`to_tsvector('simple', body)`:
//! lower-cased whole words, no stemming, no stop words) with a GIN index, queried with
//! `plainto_tsquery('simple', …)`, which ANDs the words and takes any user text as plain text.
//! Case folding of non-ASCII letters follows the database's `LC_CTYPE`: create the databases
//! with a UTF-8 locale (`C.UTF-8` is fine) rather than `C`.
//!
//! # Connections
//!
//! Sessions use `tokio-postgres`, over TLS when [`PostgresOptions::tls`] is given
//! (`pchat_tls::postgres`: the server's certificate must come from the pool's CA and carry
//! the connection string's `host`, which the pool pins to the instance's name while
//! `hostaddr` says where to dial; never a fallback to plaintext) and with the password of
//! [`PostgresOptions::password`], asked for at every new session so a rotated password is
//! used from the next connection on. Without TLS only over a unix socket or in an insecure
//! pool. The writer owns one session per database; reads and user-account writes use a small
//! pool per database of our own (`pool.rs` says why not `deadpool-postgres`) of at most
//! [`PostgresOptions::pool_size`] sessions each. Every session runs with
//! `statement_timeout` and `idle_in_transaction_session_timeout` set to
//! [`PostgresOptions::statement_timeout_ms`], so a stuck peer cannot hold room locks forever.
//!
//! Those are the server's own limits, and a server that hangs (SIGSTOP, a frozen VM or disk,
//! a network black hole) enforces none of them. So every call also has a deadline measured
//! here: a read or a new connection [`PostgresOptions::query_timeout_ms`], a group commit
//! [`PostgresOptions::commit_timeout_ms`] without an answer from the database (and six
//! times that in all, so a slow link slows commits without stopping them); past it the call
//! fails as unavailable, the session
//! it used is dropped (never handed to the next caller with an answer still pending), and
//! TCP keepalive and `tcp_user_timeout` end connections to a peer that vanished.
//!
//! # Privileges
//!
//! [`PostgresStore::install`] runs as the tables' owner (in a pool: the agent, as the
//! superuser over the unix socket) and grants the servers' role exactly what the store
//! does: SELECT, INSERT, UPDATE, DELETE on the tables, USAGE on the sequences; no CREATE,
//! no TEMPORARY, nothing for PUBLIC. The store itself never needs more.
//!
//! # Errors
//!
//! Connection refused or broken, server shutdown, statement timeout, no answer within the
//! call's deadline, deadlock or serialization failure: [`StoreError::Unavailable`] (nothing acknowledged; the writer
//! itself retries a group once on fresh sessions when that is safe, and a read on a session
//! that died while idle is retried once). Constraint violations: `Conflict` (unique) or
//! `Invalid`; values PostgreSQL refuses (NUL in text): `Invalid`; a schema changed behind our
//! back or unreadable values: `Corrupt`. Nothing here panics on I/O.
#![warn(missing_docs)]

mod error;
mod files;
pub mod inspect;
mod listen;
mod pool;
mod read;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use pchat_room::RoomRecord;
use pchat_store::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceRecord, FileCreated, FileFilter,
    FileRecord, RoomStats, Store, StoreError, StoreResult, StoredRoom, UserRecord, Write,
    WriteOutcome,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::pool::{PgConn, Pool, Session};
use crate::schema::Database;
use crate::writer::{Request, Writer};
pub use crate::writer::{FAULT_ENV, FAULT_LOSE_FIRST_COMMIT_REPLY, NOTIFY_CHANNEL};

/// Where a session's password comes from. Asked at every new connection, so a password
/// rotated in the control plane is used from the next connection on, without a restart.
#[derive(Clone, Default)]
pub enum Password {
    /// None (a unix socket with `peer` authentication).
    #[default]
    None,
    /// This one.
    Fixed(String),
    /// Whatever this returns when a connection is made (the pool's servers read it from
    /// etcd); an error fails that connection as unavailable.
    Fetch(Arc<PasswordFn>),
}

/// A password source for [`Password::Fetch`].
pub type PasswordFn =
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<String, String>> + Send + Sync;

impl Password {
    pub(crate) async fn get(&self) -> Result<Option<String>, String> {
        match self {
            Password::None => Ok(None),
            Password::Fixed(p) => Ok(Some(p.clone())),
            Password::Fetch(f) => f().await.map(Some),
        }
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password itself: options are logged.
        f.write_str(match self {
            Password::None => "None",
            Password::Fixed(_) => "Fixed(…)",
            Password::Fetch(_) => "Fetch(…)",
        })
    }
}

/// Where the two databases are and how to use them.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Connection string of `mgc` (`host=… port=… user=… dbname=mgc`, or a `postgresql://`
    /// URL), without a password (see [`PostgresOptions::password`]). With TLS, `host` is the
    /// name the server's certificate must carry (the pool pins `I.POOL.pchat`) and
    /// `hostaddr` the address to dial.
    pub mgc: String,
    /// Connection string of `mgccomp`.
    pub mgccomp: String,
    /// Sessions per database in the read pool: at most this many reads of a database run
    /// at once. The writer has [`PostgresOptions::writer_lanes`] more to each.
    pub pool_size: usize,
    /// Group commits in flight at once, each on a session to each database of its own (see
    /// `writer.rs`): a message need not wait for the group before it to finish, which far
    /// from the database is several round trips.
    pub writer_lanes: usize,
    /// Most writes one group commit takes (a single larger batch still commits whole, alone).
    /// Also the bound of the writer's queue, in batches: callers wait when it is full.
    pub group_commit_max_writes: usize,
    /// Under concurrent load (the previous group served several callers), how long the writer
    /// waits after a group's first batch for more to join it, in microseconds (tokio's timer
    /// rounds it up to whole milliseconds); 0 never waits. A group's round trips, statements
    /// (each planned afresh) and commits cost about the same for 4 messages or 20; a lone
    /// caller never waits.
    pub group_commit_delay_us: u64,
    /// Longest a statement may run, or a transaction may sit idle, before PostgreSQL cancels
    /// it; the operation then fails as unavailable. Also the connect timeout (between 1 and
    /// 10 s) when the connection string sets none.
    pub statement_timeout_ms: u64,
    /// Longest one read (a history page, a login's account, a presence row), one new
    /// connection (TLS and login included) or [`PostgresStore::connect`] may take, measured
    /// here, whatever the server does: a frozen server (SIGSTOP, a hung VM or disk, a
    /// network black hole) never ends a statement itself. The call then fails as
    /// unavailable.
    pub query_timeout_ms: u64,
    /// Longest one group commit may wait for an answer from the database, measured here; the
    /// group may take six times it in all while the database keeps answering (a slow link:
    /// a group is four round trips, ~20 on new sessions). Past either the writer drops its sessions and its callers
    /// are told the outcome is unknown (unavailable): they resend the same writes, which are
    /// deduplicated, so nothing is stored twice and no room waits for ever on a hung server.
    pub commit_timeout_ms: u64,
    /// TLS (`sslmode=verify-full`: the server's certificate must come from the pool's CA and
    /// carry the connection's `host`; no fallback to plaintext). `None`: no TLS, for the unix
    /// socket and insecure pools only.
    pub tls: Option<pchat_tls::postgres::MakeRustlsConnect>,
    /// The password of the connection strings' user.
    pub password: Password,
}

impl PostgresOptions {
    /// Options for the two databases, with default tuning, no TLS and no password.
    pub fn new(mgc: impl Into<String>, mgccomp: impl Into<String>) -> PostgresOptions {
        PostgresOptions {
            mgc: mgc.into(),
            mgccomp: mgccomp.into(),
            pool_size: 4,
            writer_lanes: 3,
            group_commit_max_writes: 1024,
            group_commit_delay_us: 0,
            statement_timeout_ms: 5_000,
            query_timeout_ms: 5_000,
            commit_timeout_ms: 5_000,
            tls: None,
            password: Password::None,
        }
    }

    fn sessions(&self) -> StoreResult<(Session, Session)> {
        if self.pool_size == 0
            || self.writer_lanes == 0
            || self.group_commit_max_writes == 0
            || self.statement_timeout_ms == 0
            || self.query_timeout_ms == 0
            || self.commit_timeout_ms == 0
        {
            return Err(StoreError::Invalid(format!(
                "pool_size, writer_lanes, group_commit_max_writes, statement_timeout_ms, \
                 query_timeout_ms and commit_timeout_ms must be at least 1 (got {}, {}, {}, {}, \
                 {}, {})",
                self.pool_size,
                self.writer_lanes,
                self.group_commit_max_writes,
                self.statement_timeout_ms,
                self.query_timeout_ms,
                self.commit_timeout_ms
            )));
        }
        let session = |name, conn: &str| {
            Session::new(
                name,
                conn,
                self.statement_timeout_ms,
                self.query_timeout_ms,
                self.tls.clone(),
                self.password.clone(),
            )
        };
        Ok((
            session("mgc", &self.mgc)?,
            session("mgccomp", &self.mgccomp)?,
        ))
    }
}

/// The PostgreSQL backend of [`Store`]. Dropping it lets the writer task finish the queued
/// writes and stop; [`PostgresStore::close`] also waits for that.
pub struct PostgresStore {
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    mgc: Pool,
    comp: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

/// Runs a read on a pooled session; when it fails because a session taken from the idle
/// stack had died unnoticed (PostgreSQL restarted meanwhile), retries once on a new one.
/// Reads are idempotent, so the retry is safe. The whole of it — waiting for a session,
/// connecting, the retry — ends within the pool's query timeout: a session left in the
/// middle of its call is dropped, not handed to the next caller.
macro_rules! read_retry {
    ($pool:expr, |$conn:ident| $body:expr) => {{
        let limit = $pool.session().query_timeout;
        let read = async {
            let mut retried = false;
            loop {
                let mut $conn = $pool.get().await.map_err(StoreError::from)?;
                match $body.await {
                    Err(e) if !retried && $conn.reused() && e.is_transient() => {
                        $conn.discard();
                        retried = true;
                    }
                    other => {
                        $conn.finish();
                        break other.map_err(StoreError::from);
                    }
                }
            }
        };
        match tokio::time::timeout(limit, read).await {
            Ok(r) => r,
            Err(_) => Err(no_answer($pool.session().name, limit)),
        }
    }};
}

/// A call that got no answer within its limit.
fn no_answer(database: &str, limit: std::time::Duration) -> StoreError {
    StoreError::Unavailable(format!(
        "database {database}: no answer within {} ms (the server does not answer)",
        limit.as_millis()
    ))
}

impl PostgresStore {
    /// Creates or upgrades the schema of both databases (`pchat db install`): idempotent, safe
    /// to run from several hosts at once, and refuses a schema newer than this build's.
    /// The databases themselves must exist (`CREATE DATABASE` needs rights a server should
    /// not hold).
    ///
    /// Runs as the tables' owner (the pool's agent: the superuser, over the unix socket), and
    /// grants role `grant_to` (the servers' role, which must exist) exactly what the store
    /// needs and nothing more: CONNECT on the database, USAGE on its schema, SELECT, INSERT,
    /// UPDATE and DELETE on its tables and USAGE on its sequences. Everybody else (PUBLIC)
    /// loses CONNECT, TEMPORARY and CREATE on the database and every right on the schema, so
    /// the servers' role cannot create a table, a function or a temporary table there.
    pub async fn install(options: &PostgresOptions, grant_to: &str) -> Result<(), StoreError> {
        if !schema::plain_identifier(grant_to) {
            return Err(StoreError::Invalid(format!(
                "role `{grant_to}`: only lower-case letters, digits and _"
            )));
        }
        let (mgc, comp) = options.sessions()?;
        schema::install(&mgc, Database::Mgc, grant_to).await?;
        schema::install(&comp, Database::MgcComp, grant_to).await?;
        Ok(())
    }

    /// Creates the databases `mgc` and `mgccomp` where they are missing, through the
    /// `postgres` maintenance database of the same server (an administrator's step, as
    /// Topology Builder's; needs CREATEDB). Returns the names it created.
    pub async fn create_databases(options: &PostgresOptions) -> Result<Vec<String>, StoreError> {
        let (mgc, comp) = options.sessions()?;
        let mut created = Vec::new();
        for session in [&mgc, &comp] {
            let name = session
                .config
                .get_dbname()
                .unwrap_or(session.name)
                .to_owned();
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::Invalid(format!(
                    "database name `{name}`: only letters, digits and _"
                )));
            }
            let mut admin = session.clone();
            admin.config.dbname("postgres");
            let client = admin
                .client()
                .await
                .map_err(|e| match StoreError::from(e) {
                    StoreError::Unavailable(m) => {
                        StoreError::Unavailable(format!("connecting to database postgres: {m}"))
                    }
                    other => other,
                })?;
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .is_some();
            if !exists {
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("CREATE DATABASE {name}: {e}")))?;
                created.push(name);
            }
        }
        Ok(created)
    }

    /// Connects to both databases, checks their schema versions (missing or older: "run
    /// `pchat db install`"), and starts the writer task on the current tokio runtime.
    /// Bounded by the query timeout for each database: a server that does not answer
    /// fails it as unavailable.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let (mgc, comp) = options.sessions()?;
        for (session, db) in [(&mgc, Database::Mgc), (&comp, Database::MgcComp)] {
            let check = async {
                let mut conn =
                    PgConn::connect(session)
                        .await
                        .map_err(|e| match StoreError::from(e) {
                            StoreError::Unavailable(m) => StoreError::Unavailable(format!(
                                "cannot connect to database {}: {m}",
                                db.name()
                            )),
                            other => other,
                        })?;
                schema::check(&mut conn, db).await.map_err(StoreError::from)
            };
            tokio::time::timeout(session.query_timeout, check)
                .await
                .map_err(|_| no_answer(db.name(), session.query_timeout))??;
        }
        let (requests, queue) = mpsc::channel(options.group_commit_max_writes);
        let writer = Writer::new(
            mgc.clone(),
            comp.clone(),
            options.group_commit_max_writes,
            std::time::Duration::from_micros(options.group_commit_delay_us),
            std::time::Duration::from_millis(options.commit_timeout_ms),
            options.writer_lanes,
        );
        let writer = tokio::spawn(writer.run(queue));
        tracing::info!("PostgreSQL store connected");
        Ok(PostgresStore {
            requests: Some(requests),
            writer: Some(writer),
            mgc: Pool::new(mgc, options.pool_size),
            comp: Pool::new(comp, options.pool_size),
        })
    }

    /// Finishes the queued writes, stops the writer task and closes every session.
    pub async fn close(mut self) -> Result<(), StoreError> {
        self.mgc.close();
        self.comp.close();
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            writer.await.map_err(|e| {
                StoreError::Unavailable(format!("the store writer task failed: {e}"))
            })?;
        }
        Ok(())
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> Request,
    ) -> StoreResult<T> {
        let requests = self.requests.as_ref().ok_or_else(writer_gone)?;
        let (reply, answer) = oneshot::channel();
        requests
            .send(make(reply))
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Test hook: the next group with compliance records fails right after its compliance
    /// COMMIT, leaving what a crash there leaves.
    #[cfg(test)]
    pub(crate) async fn fail_after_next_compliance_commit(&self) {
        if let Some(requests) = &self.requests {
            let _ = requests.send(Request::FailAfterComplianceCommit).await;
        }
    }

    /// Test hook: the next group that appends a message commits, then its callers are told
    /// the connection was lost after COMMIT was sent (outcome unknown).
    #[cfg(test)]
    pub(crate) async fn lose_next_commit_reply(&self) {
        if let Some(requests) = &self.requests {
            let _ = requests.send(Request::LoseNextCommitReply).await;
        }
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the store writer has stopped; reconnect the store".into())
}

#[async_trait]
impl Store for PostgresStore {
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.request(|reply| Request::Commit { writes, reply })
            .await
    }

    async fn server_secret(&self) -> StoreResult<Vec<u8>> {
        read_retry!(self.mgc, |conn| read::server_secret(&mut conn))
    }

    async fn user_put(&self, user: UserRecord) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::user_put(&mut conn, &user))
    }

    async fn directory_get(&self) -> StoreResult<pchat_store::StoredDirectory> {
        read_retry!(self.mgc, |conn| read::directory_get(&mut conn))
    }

    async fn directory_revision(&self) -> StoreResult<i64> {
        read_retry!(self.mgc, |conn| read::directory_revision(&mut conn))
    }

    async fn invitation_keep(&self, invitee: &str, stanza: &str) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::invitation_keep(
            &mut conn, invitee, stanza
        ))
    }

    async fn web_session_put(
        &self,
        id: &str,
        session: &pchat_store::WebSession,
    ) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::web_session_put(
            &mut conn, id, session
        ))
    }

    async fn web_session_get(&self, id: &str) -> StoreResult<Option<pchat_store::WebSession>> {
        read_retry!(self.mgc, |conn| read::web_session_get(&mut conn, id))
    }

    async fn web_session_touch(&self, id: &str, seen_at: pchat_room::Timestamp) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::web_session_touch(
            &mut conn, id, seen_at
        ))
    }

    async fn web_session_remove(&self, id: &str) -> StoreResult<bool> {
        read_retry!(self.mgc, |conn| read::web_session_remove(&mut conn, id))
    }

    async fn web_session_purge(
        &self,
        seen_before: pchat_room::Timestamp,
        created_before: pchat_room::Timestamp,
    ) -> StoreResult<u64> {
        read_retry!(self.mgc, |conn| read::web_session_purge(
            &mut conn,
            seen_before,
            created_before
        ))
    }

    async fn invitations_take(&self, invitee: &str) -> StoreResult<Vec<String>> {
        read_retry!(self.mgc, |conn| read::invitations_take(&mut conn, invitee))
    }

    async fn directory_put(
        &self,
        directory: &pchat_room::directory::Directory,
        revision: i64,
    ) -> StoreResult<i64> {
        let document = pchat_store::directory_document(directory)?;
        read_retry!(self.mgc, |conn| read::directory_put(
            &mut conn, &document, revision
        ))
    }

    async fn user_get(&self, jid: &str) -> StoreResult<Option<UserRecord>> {
        read_retry!(self.mgc, |conn| read::user_get(&mut conn, jid))
    }

    async fn user_remove(&self, jid: &str) -> StoreResult<bool> {
        read_retry!(self.mgc, |conn| read::user_remove(&mut conn, jid))
    }

    async fn pep_publish(
        &self,
        owner: &str,
        node: &str,
        config: pchat_store::PepNode,
        item: pchat_store::PepItem,
    ) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::pep_publish(
            &mut conn, owner, node, config, &item
        ))
    }

    async fn pep_node(&self, owner: &str, node: &str) -> StoreResult<Option<pchat_store::PepNode>> {
        read_retry!(self.mgc, |conn| read::pep_node(&mut conn, owner, node))
    }

    async fn pep_nodes(&self, owner: &str) -> StoreResult<Vec<String>> {
        read_retry!(self.mgc, |conn| read::pep_nodes(&mut conn, owner))
    }

    async fn pep_items(&self, owner: &str, node: &str) -> StoreResult<Vec<pchat_store::PepItem>> {
        read_retry!(self.mgc, |conn| read::pep_items(&mut conn, owner, node))
    }

    async fn pep_retract(&self, owner: &str, node: &str, id: &str) -> StoreResult<bool> {
        read_retry!(self.mgc, |conn| read::pep_remove(
            &mut conn,
            owner,
            node,
            Some(id)
        ))
    }

    async fn pep_delete(&self, owner: &str, node: &str) -> StoreResult<bool> {
        read_retry!(self.mgc, |conn| read::pep_remove(
            &mut conn, owner, node, None
        ))
    }

    async fn pep_announce(&self, event: &pchat_store::PepEvent) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::pep_announce(&mut conn, event))
    }

    async fn user_list(&self) -> StoreResult<Vec<String>> {
        read_retry!(self.mgc, |conn| read::user_list(&mut conn))
    }

    async fn room_list(&self) -> StoreResult<Vec<RoomRecord>> {
        read_retry!(self.mgc, |conn| read::room_list(&mut conn))
    }

    async fn room_get(&self, room: &str) -> StoreResult<Option<RoomRecord>> {
        read_retry!(self.mgc, |conn| read::room_get(&mut conn, room))
    }

    async fn room_load(&self, room: &str) -> StoreResult<Option<StoredRoom>> {
        read_retry!(self.mgc, |conn| read::room_load(&mut conn, room))
    }

    async fn room_stats(&self, room: &str) -> StoreResult<RoomStats> {
        read_retry!(self.mgc, |conn| read::room_stats(&mut conn, room))
    }

    async fn archive_page(&self, room: &str, query: &ArchiveQuery) -> StoreResult<ArchivePage> {
        read_retry!(self.mgc, |conn| read::archive_page(&mut conn, room, query))
    }

    async fn archive_get(&self, room: &str, seq: i64) -> StoreResult<Option<ArchivedMessage>> {
        read_retry!(self.mgc, |conn| read::archive_get(&mut conn, room, seq))
    }

    async fn id_epoch(&self) -> StoreResult<u64> {
        read_retry!(self.mgc, |conn| read::id_epoch(&mut conn))
    }

    async fn raise_id_epoch(&self, epoch: u64) -> StoreResult<u64> {
        read_retry!(self.mgc, |conn| read::raise_id_epoch(&mut conn, epoch))
    }

    async fn compliance_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> StoreResult<Vec<ComplianceRecord>> {
        let page = read_retry!(self.comp, |conn| read::compliance_page(
            &mut conn, after_id, limit
        ))?;
        if page.is_empty() {
            return Ok(Vec::new());
        }
        let mut batches: Vec<i64> = page.iter().map(|r| r.batch_id).collect();
        batches.sort_unstable();
        batches.dedup();
        let applied = read_retry!(self.mgc, |conn| read::applied(&mut conn, &batches))?;
        Ok(page
            .into_iter()
            .map(|stored| ComplianceRecord {
                // An export run is recorded by the exporter's own transaction (batch 0).
                committed: stored.record.event.kind == pchat_store::ComplianceKind::ExportRun
                    || applied.binary_search(&stored.batch_id).is_ok(),
                ..stored.record
            })
            .collect())
    }

    async fn compliance_export_state(&self) -> StoreResult<pchat_store::ExportState> {
        read_retry!(self.comp, |conn| read::export_state(&mut conn))
    }

    async fn compliance_export_step(
        &self,
        from: &pchat_store::ExportState,
        to: &pchat_store::ExportState,
        run: Option<pchat_store::NewComplianceEvent>,
    ) -> StoreResult<()> {
        read_retry!(self.comp, |conn| read::export_step(
            &mut conn,
            from,
            to,
            run.as_ref()
        ))
    }

    async fn compliance_purge(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        read_retry!(self.comp, |conn| read::compliance_purge(
            &mut conn, before, limit
        ))
    }

    async fn file_create(
        &self,
        file: &FileRecord,
        owner_quota_bytes: u64,
    ) -> StoreResult<FileCreated> {
        read_retry!(self.mgc, |conn| files::create(
            &mut conn,
            file,
            owner_quota_bytes
        ))
    }

    async fn file_chunk_put(&self, id: &str, index: u32, data: Vec<u8>) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| files::chunk_put(
            &mut conn, id, index, &data
        ))
    }

    async fn file_finish(&self, id: &str, sha256: &str) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| files::finish(&mut conn, id, sha256))
    }

    async fn file_get(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        read_retry!(self.mgc, |conn| files::get_file(&mut conn, id))
    }

    async fn file_chunk_get(&self, id: &str, index: u32) -> StoreResult<Option<Vec<u8>>> {
        read_retry!(self.mgc, |conn| files::chunk_get(&mut conn, id, index))
    }

    async fn file_bind(&self, id: &str, owner: &str, room: &str) -> StoreResult<bool> {
        read_retry!(self.mgc, |conn| files::bind(&mut conn, id, owner, room))
    }

    async fn file_room_bytes(&self, room: &str) -> StoreResult<u64> {
        read_retry!(self.mgc, |conn| files::room_bytes(&mut conn, room))
    }

    async fn file_list(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>> {
        read_retry!(self.mgc, |conn| files::list(&mut conn, filter))
    }

    async fn file_remove(&self, id: &str) -> StoreResult<bool> {
        read_retry!(self.mgc, |conn| files::remove(&mut conn, id))
    }

    async fn file_purge_unfinished(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        read_retry!(self.mgc, |conn| files::purge_unfinished(
            &mut conn, before, limit
        ))
    }

    async fn subscribe_rooms(
        &self,
    ) -> StoreResult<Option<tokio::sync::mpsc::Receiver<pchat_store::RoomTick>>> {
        Ok(Some(listen::spawn(self.mgc.session().clone())))
    }

    async fn presence_put(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        stanza: Option<&str>,
    ) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::presence_put(
            &mut conn, room, server, nick, stanza
        ))
    }

    async fn presence_leave(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        last: &str,
    ) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::presence_leave(
            &mut conn, room, server, nick, last
        ))
    }

    async fn presence_list(&self, room: &str) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        read_retry!(self.mgc, |conn| read::presence_list(&mut conn, room))
    }

    async fn presence_get(
        &self,
        room: &str,
        who: &[pchat_store::PresenceKey],
    ) -> StoreResult<Vec<pchat_store::SharedPresence>> {
        read_retry!(self.mgc, |conn| read::presence_get(&mut conn, room, who))
    }

    async fn presence_forget_server(&self, server: &str) -> StoreResult<()> {
        read_retry!(self.mgc, |conn| read::presence_forget_server(
            &mut conn, server
        ))
    }
}
