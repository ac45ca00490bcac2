//! pchat's standalone storage: SQLite files in a data directory, as Lync Standard Edition
//! kept its databases in SQL Express.
//!
//! - `mgc.db`: users, rooms, the archive and its FTS5 full-text index, uploaded files (XEP-0363,
//!   in pieces: `files.rs`);
//! - `mgccomp.db`: compliance events.
//!
//! Both run in WAL mode with `synchronous=FULL`: a commit is on disk before
//! [`Store::commit`] returns. One writer thread owns the read-write connections and groups
//! concurrent batches into shared transactions (group commit, see [`SqliteOptions`]); for
//! each group the compliance transaction commits before the `mgc` one, so no change is ever
//! visible without its compliance record. Reads use a small pool of read-only connections on
//! tokio's blocking threads.
//!
//! The two files are two transactions, never one (WAL is not atomic across attached
//! databases). A crash between the two commits leaves compliance records of changes that never
//! happened: on [`SqliteStore::open`] they are marked `committed = false`, which
//! [`Store::compliance_after`] reports.
//!
//! Schema: each file has a `schema_version` table and the migrations in this crate's
//! `migrations/` directory; a file written by a newer pchat is refused.
//!
//! # Fault injection (tests only)
//!
//! When the environment variable `PCHAT_FAULT` is `abort-after-compliance-commit` at open
//! time, the writer calls `std::process::abort()` right after a group's compliance commit and
//! before its `mgc` commit: the crash test uses it to create the state a real crash there
//! leaves. Never set it in production.
//!
//! # Limits
//!
//! At most about 8 million rooms alive at once and 10^12 messages per room (the archive key
//! packs both into one integer, see `migrations/mgc/0001_init.sql`); a compliance page holds
//! at most [`pchat_store::COMPLIANCE_PAGE_MAX`] records; one process per data directory (a
//! lock on `pchat.lock`, [`lock_data_dir`], which a standalone restore takes too).
#![warn(missing_docs)]

mod data_dir;
mod error;
mod files;
mod read;
mod schema;
mod web_sessions;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use pchat_room::RoomRecord;
use pchat_store::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceRecord, FileCreated, FileFilter,
    FileRecord, RoomStats, Store, StoreError, StoreResult, StoredRoom, UserRecord, Write,
    WriteOutcome,
};
use tokio::sync::{mpsc, oneshot};

pub use crate::data_dir::{copy_online, lock_data_dir, DataDirLock, LockError, LOCK_FILE};
use crate::files::FileWrite;
use crate::read::{ReadConn, ReadPool};
use crate::schema::Database;
use crate::web_sessions::WebSessionWrite;
use crate::writer::{Request, Writer};
pub use crate::writer::{FAULT_ABORT_AFTER_COMPLIANCE_COMMIT, FAULT_ENV};

/// File name of the `mgc` database inside the data directory.
pub const MGC_FILE: &str = "mgc.db";
/// File name of the `mgccomp` database inside the data directory.
pub const MGCCOMP_FILE: &str = "mgccomp.db";

/// The two database files of a data directory: `[mgc, mgccomp]`. (SQLite keeps `-wal` and
/// `-shm` files beside each while it is open.)
pub fn data_files(dir: &Path) -> [PathBuf; 2] {
    [dir.join(MGC_FILE), dir.join(MGCCOMP_FILE)]
}

/// Tuning of an [`SqliteStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Most writes one group commit takes (a single larger batch still commits whole, alone).
    /// Also the bound of the writer's queue, in batches: callers wait when it is full.
    pub group_commit_max_writes: usize,
    /// Under concurrent load (the previous group served several callers), how long the writer
    /// waits after a group's first batch for more to join it, in microseconds; 0 never waits.
    /// A group costs two fsyncs and rewrites every page it touches whatever its size, so
    /// larger groups cost far less per message; one caller alone never waits.
    pub group_commit_delay_us: u64,
    /// Read-only connections in the read pool: at most this many reads run at once.
    pub read_connections: usize,
    /// How long a connection waits for a lock held by someone else (say, a backup) before
    /// the operation fails as unavailable.
    pub busy_timeout_ms: u64,
    /// Open beside a running server (the management shell): no data-directory lock, no crash
    /// reconcile, and [`Store::commit`] is refused, so only reads and what the server's writer
    /// keeps no state about (user accounts, the directory, invitations, uploaded files) can be
    /// changed.
    pub shared: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            group_commit_max_writes: 1024,
            group_commit_delay_us: 0,
            read_connections: 4,
            busy_timeout_ms: 5_000,
            shared: false,
        }
    }
}

/// The id epoch ([`pchat_store::ids`]) of the `mgc` database file at `mgc`, read without
/// opening a store (a standalone restore reads the database it replaces); `None` when the
/// file is missing or unreadable, 0 when it is older than id epochs.
pub fn file_id_epoch(mgc: &Path) -> Option<u64> {
    if !mgc.exists() {
        return None;
    }
    let conn = schema::open_read(mgc, 5000).ok()?;
    let has_table: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'id_epoch'",
            [],
            |r| r.get(0),
        )
        .ok()?;
    if !has_table {
        return Some(0);
    }
    schema::id_epoch(&conn).ok()
}

/// Brings the `mgc` database file at `mgc` to this build's schema and raises its id epoch
/// to `epoch` (never lowering it); returns the epoch now in force. For a standalone restore,
/// which holds the data directory's lock: no server has the file open.
pub fn raise_file_id_epoch(mgc: &Path, epoch: u64) -> Result<u64, StoreError> {
    let mut conn = schema::open_write(mgc, 5000).map_err(StoreError::from)?;
    schema::migrate(&mut conn, Database::Mgc, mgc).map_err(StoreError::from)?;
    schema::raise_id_epoch(&conn, epoch).map_err(StoreError::from)
}

/// The SQLite backend of [`Store`]. Dropping it (or [`SqliteStore::close`]) finishes the
/// queued writes and stops the writer thread.
pub struct SqliteStore {
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    readers: Arc<ReadPool>,
    dir: PathBuf,
    shared: bool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating when missing) the data directory `dir` and its two databases, runs the
    /// migrations, reconciles compliance records after a crash, and starts the writer thread.
    /// Blocking: call it before serving, or from `spawn_blocking`.
    pub fn open(dir: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        if options.read_connections == 0 || options.group_commit_max_writes == 0 {
            return Err(StoreError::Invalid(format!(
                "read_connections and group_commit_max_writes must be at least 1 (got {options:?})"
            )));
        }
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // 0700 when made here; the server tightens an existing one (see pchat-server).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot create data directory {}: {e}",
                        dir.display()
                    ))
                })?;
        }
        let [mgc_path, comp_path] = data_files(dir);
        schema::make_private(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot restrict the database files in {} to their owner: {e}",
                dir.display()
            ))
        })?;
        let in_file = |path: &Path| {
            let path = path.to_path_buf();
            move |e: error::Error| match StoreError::from(e) {
                StoreError::Unavailable(m) => {
                    StoreError::Unavailable(format!("{}: {m}", path.display()))
                }
                StoreError::Corrupt(m) => StoreError::Corrupt(format!("{}: {m}", path.display())),
                other => other,
            }
        };

        let lock = if options.shared {
            None
        } else {
            Some(lock_data_dir(dir).map_err(StoreError::from)?)
        };
        let mut mgc =
            schema::open_write(&mgc_path, options.busy_timeout_ms).map_err(in_file(&mgc_path))?;
        schema::migrate(&mut mgc, Database::Mgc, &mgc_path).map_err(StoreError::from)?;
        schema::ensure_server_secret(&mgc).map_err(in_file(&mgc_path))?;
        let id_epoch = schema::id_epoch(&mgc).map_err(in_file(&mgc_path))?;
        let mut comp =
            schema::open_write(&comp_path, options.busy_timeout_ms).map_err(in_file(&comp_path))?;
        schema::migrate(&mut comp, Database::MgcComp, &comp_path).map_err(StoreError::from)?;
        // A shared open must not reconcile: the running server's in-flight batches would look
        // like crashed ones. Its writer never commits batches, so its batch ids are unused.
        let next_batch_id = if options.shared {
            0
        } else {
            schema::reconcile(&mgc, &comp).map_err(StoreError::from)?
        };

        let readers = (0..options.read_connections)
            .map(|_| ReadConn::open(&mgc_path, &comp_path, options.busy_timeout_ms))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)?;
        let readers = Arc::new(ReadPool::new(
            readers,
            &mgc_path,
            &comp_path,
            options.busy_timeout_ms,
        ));

        let (requests, queue) = mpsc::channel(options.group_commit_max_writes);
        let writer = Writer::new(
            mgc,
            comp,
            lock,
            next_batch_id,
            options.group_commit_max_writes,
            std::time::Duration::from_micros(options.group_commit_delay_us),
            id_epoch,
        );
        let writer = std::thread::Builder::new()
            .name("pchat-sqlite-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the store writer thread: {e}"))
            })?;
        tracing::info!(dir = %dir.display(), "sqlite store open");
        Ok(SqliteStore {
            requests: Some(requests),
            writer: Some(writer),
            readers,
            dir: dir.to_path_buf(),
            shared: options.shared,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finishes the queued writes, stops the writer thread and closes the databases, without
    /// blocking the async runtime.
    pub async fn close(mut self) -> Result<(), StoreError> {
        self.readers.clear();
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            let joined = tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot join the store writer: {e}"))
                })?;
            joined
                .map_err(|_| StoreError::Unavailable("the store writer thread panicked".into()))?;
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
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the store writer has stopped; reopen the store".into())
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Readers first, so that the writer's connections are the last ones and SQLite
        // checkpoints the WAL into the database files as they close.
        self.readers.clear();
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            // Blocks for the queued writes only; the writer never waits on the runtime.
            if writer.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    /// One server: its own sessions were told already.
    async fn pep_announce(&self, _event: &pchat_store::PepEvent) -> StoreResult<()> {
        Ok(())
    }

    async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        if self.shared {
            return Err(StoreError::Invalid(
                "this store was opened shared (beside a running server) and cannot commit room changes".into(),
            ));
        }
        self.request(|reply| Request::Commit { writes, reply })
            .await
    }

    async fn server_secret(&self) -> StoreResult<Vec<u8>> {
        self.readers.run(read::server_secret).await
    }

    async fn id_epoch(&self) -> StoreResult<u64> {
        self.readers.run(read::id_epoch).await
    }

    async fn raise_id_epoch(&self, epoch: u64) -> StoreResult<u64> {
        if self.shared {
            return Err(StoreError::Invalid(
                "this store was opened shared (beside a running server) and cannot raise its id epoch".into(),
            ));
        }
        self.request(|reply| Request::RaiseIdEpoch { epoch, reply })
            .await
    }

    async fn user_put(&self, user: UserRecord) -> StoreResult<()> {
        self.request(|reply| Request::UserPut { user, reply }).await
    }

    async fn directory_get(&self) -> StoreResult<pchat_store::StoredDirectory> {
        self.readers.run(read::directory_get).await
    }

    /// Allowed beside a running server (shared): its writer keeps nothing of invitations.
    async fn invitation_keep(&self, invitee: &str, stanza: &str) -> StoreResult<()> {
        let (invitee, stanza) = (invitee.to_owned(), stanza.to_owned());
        self.request(|reply| Request::InvitationKeep {
            invitee,
            stanza,
            reply,
        })
        .await
    }

    async fn invitations_take(&self, invitee: &str) -> StoreResult<Vec<String>> {
        let invitee = invitee.to_owned();
        self.request(|reply| Request::InvitationsTake { invitee, reply })
            .await
    }

    /// Allowed beside a running server (shared): its writer keeps nothing of PEP nodes.
    async fn pep_publish(
        &self,
        owner: &str,
        node: &str,
        config: pchat_store::PepNode,
        item: pchat_store::PepItem,
    ) -> StoreResult<()> {
        let (owner, node) = (owner.to_owned(), node.to_owned());
        self.request(|reply| Request::PepPublish {
            owner,
            node,
            config,
            item,
            reply,
        })
        .await
    }

    async fn pep_node(&self, owner: &str, node: &str) -> StoreResult<Option<pchat_store::PepNode>> {
        let (owner, node) = (owner.to_owned(), node.to_owned());
        self.readers
            .run(move |conn| read::pep_node(conn, &owner, &node))
            .await
    }

    async fn pep_nodes(&self, owner: &str) -> StoreResult<Vec<String>> {
        let owner = owner.to_owned();
        self.readers
            .run(move |conn| read::pep_nodes(conn, &owner))
            .await
    }

    async fn pep_items(&self, owner: &str, node: &str) -> StoreResult<Vec<pchat_store::PepItem>> {
        let (owner, node) = (owner.to_owned(), node.to_owned());
        self.readers
            .run(move |conn| read::pep_items(conn, &owner, &node))
            .await
    }

    async fn pep_retract(&self, owner: &str, node: &str, id: &str) -> StoreResult<bool> {
        let (owner, node, item) = (owner.to_owned(), node.to_owned(), Some(id.to_owned()));
        self.request(|reply| Request::PepRemove {
            owner,
            node,
            item,
            reply,
        })
        .await
    }

    async fn pep_delete(&self, owner: &str, node: &str) -> StoreResult<bool> {
        let (owner, node) = (owner.to_owned(), node.to_owned());
        self.request(|reply| Request::PepRemove {
            owner,
            node,
            item: None,
            reply,
        })
        .await
    }

    async fn directory_revision(&self) -> StoreResult<i64> {
        self.readers.run(read::directory_revision).await
    }

    /// Allowed beside a running server (shared): its writer keeps nothing of the directory,
    /// and the compare-and-set runs in one immediate transaction either way.
    async fn directory_put(
        &self,
        directory: &pchat_room::directory::Directory,
        revision: i64,
    ) -> StoreResult<i64> {
        let document = pchat_store::directory_document(directory)?;
        self.request(|reply| Request::DirectoryPut {
            document,
            revision,
            reply,
        })
        .await
    }

    async fn user_get(&self, jid: &str) -> StoreResult<Option<UserRecord>> {
        let jid = jid.to_string();
        self.readers
            .run(move |conn| read::user_get(conn, &jid))
            .await
    }

    async fn user_remove(&self, jid: &str) -> StoreResult<bool> {
        let jid = jid.to_string();
        self.request(|reply| Request::UserRemove { jid, reply })
            .await
    }

    async fn user_list(&self) -> StoreResult<Vec<String>> {
        self.readers.run(read::user_list).await
    }

    async fn room_list(&self) -> StoreResult<Vec<RoomRecord>> {
        self.readers.run(read::room_list).await
    }

    async fn room_get(&self, room: &str) -> StoreResult<Option<RoomRecord>> {
        let room = room.to_string();
        self.readers
            .run(move |conn| read::room_get(conn, &room))
            .await
    }

    async fn room_load(&self, room: &str) -> StoreResult<Option<StoredRoom>> {
        let room = room.to_string();
        self.readers
            .run(move |conn| read::room_load(conn, &room))
            .await
    }

    async fn room_stats(&self, room: &str) -> StoreResult<RoomStats> {
        let room = room.to_string();
        self.readers
            .run(move |conn| read::room_stats(conn, &room))
            .await
    }

    async fn archive_page(&self, room: &str, query: &ArchiveQuery) -> StoreResult<ArchivePage> {
        let (room, query) = (room.to_string(), query.clone());
        self.readers
            .run(move |conn| read::archive_page(conn, &room, &query))
            .await
    }

    async fn archive_get(&self, room: &str, seq: i64) -> StoreResult<Option<ArchivedMessage>> {
        let room = room.to_string();
        self.readers
            .run(move |conn| read::archive_get(conn, &room, seq))
            .await
    }

    async fn compliance_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> StoreResult<Vec<ComplianceRecord>> {
        self.readers
            .run(move |conn| read::compliance_after(conn, after_id, limit))
            .await
    }

    async fn compliance_export_state(&self) -> StoreResult<pchat_store::ExportState> {
        self.readers.run(read::compliance_export_state).await
    }

    /// Allowed beside a running server (shared): the export state and its run record are
    /// `mgccomp`'s own transaction, which SQLite's locks order with the server's.
    async fn compliance_export_step(
        &self,
        from: &pchat_store::ExportState,
        to: &pchat_store::ExportState,
        run: Option<pchat_store::NewComplianceEvent>,
    ) -> StoreResult<()> {
        let (from, to) = (from.clone(), to.clone());
        self.request(|reply| Request::ExportStep {
            from,
            to,
            run,
            reply,
        })
        .await
    }

    async fn compliance_purge(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        self.request(|reply| Request::CompliancePurge {
            before,
            limit,
            reply,
        })
        .await
    }

    /// Allowed beside a running server (shared), as every file operation: each is its own
    /// immediate transaction and the server's writer keeps nothing of files.
    async fn file_create(
        &self,
        file: &FileRecord,
        owner_quota_bytes: u64,
    ) -> StoreResult<FileCreated> {
        let file = file.clone();
        self.request(|reply| {
            Request::File(FileWrite::Create {
                file,
                owner_quota_bytes,
                reply,
            })
        })
        .await
    }

    async fn file_chunk_put(&self, id: &str, index: u32, data: Vec<u8>) -> StoreResult<()> {
        let id = id.to_owned();
        self.request(|reply| {
            Request::File(FileWrite::ChunkPut {
                id,
                index,
                data,
                reply,
            })
        })
        .await
    }

    async fn file_finish(&self, id: &str, sha256: &str) -> StoreResult<()> {
        let (id, sha256) = (id.to_owned(), sha256.to_owned());
        self.request(|reply| Request::File(FileWrite::Finish { id, sha256, reply }))
            .await
    }

    async fn file_get(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| files::get(&conn.mgc, &id))
            .await
    }

    async fn file_chunk_get(&self, id: &str, index: u32) -> StoreResult<Option<Vec<u8>>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| files::chunk_get(&conn.mgc, &id, index))
            .await
    }

    async fn file_bind(&self, id: &str, owner: &str, room: &str) -> StoreResult<bool> {
        let (id, owner, room) = (id.to_owned(), owner.to_owned(), room.to_owned());
        self.request(|reply| {
            Request::File(FileWrite::Bind {
                id,
                owner,
                room,
                reply,
            })
        })
        .await
    }

    async fn file_room_bytes(&self, room: &str) -> StoreResult<u64> {
        let room = room.to_owned();
        self.readers
            .run(move |conn| files::room_bytes(&conn.mgc, &room))
            .await
    }

    async fn file_list(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>> {
        let filter = filter.clone();
        self.readers
            .run(move |conn| files::list(&conn.mgc, &filter))
            .await
    }

    async fn file_remove(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.request(|reply| Request::File(FileWrite::Remove { id, reply }))
            .await
    }

    async fn file_purge_unfinished(
        &self,
        before: pchat_room::Timestamp,
        limit: u32,
    ) -> StoreResult<u64> {
        self.request(|reply| {
            Request::File(FileWrite::PurgeUnfinished {
                before,
                limit,
                reply,
            })
        })
        .await
    }

    async fn web_session_put(
        &self,
        id: &str,
        session: &pchat_store::WebSession,
    ) -> StoreResult<()> {
        let (id, session) = (id.to_owned(), session.clone());
        self.request(|reply| Request::WebSession(WebSessionWrite::Put { id, session, reply }))
            .await
    }

    async fn web_session_get(&self, id: &str) -> StoreResult<Option<pchat_store::WebSession>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| web_sessions::get(&conn.mgc, &id))
            .await
    }

    async fn web_session_touch(&self, id: &str, seen_at: pchat_room::Timestamp) -> StoreResult<()> {
        let id = id.to_owned();
        self.request(|reply| Request::WebSession(WebSessionWrite::Touch { id, seen_at, reply }))
            .await
    }

    async fn web_session_remove(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.request(|reply| Request::WebSession(WebSessionWrite::Remove { id, reply }))
            .await
    }

    async fn web_session_purge(
        &self,
        seen_before: pchat_room::Timestamp,
        created_before: pchat_room::Timestamp,
    ) -> StoreResult<u64> {
        self.request(|reply| {
            Request::WebSession(WebSessionWrite::Purge {
                seen_before,
                created_before,
                reply,
            })
        })
        .await
    }
}
