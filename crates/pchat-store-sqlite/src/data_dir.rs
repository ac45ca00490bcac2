//! What other processes may do to a data directory, with this crate's protocols: take its
//! lock (the server holds it while it runs; a standalone restore holds it while it replaces
//! the files), and copy a live database file (a standalone backup while the server writes).
//! Exported so that nobody re-implements them beside the store.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pchat_store::StoreError;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::error::classify;

/// The lock file inside a data directory.
pub const LOCK_FILE: &str = "pchat.lock";

/// Mode of a directory made to hold databases.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a database file (SQLite gives its `-wal`, `-shm` and `-journal` files the same).
const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `path` empty with mode 0600 (an empty file is an empty database to SQLite), or,
/// unless `new`, leaves an existing one as it is apart from tightening its mode.
fn create_private(path: &Path, new: bool) -> std::io::Result<()> {
    let mut open = OpenOptions::new();
    open.append(true).mode(PRIVATE_FILE_MODE);
    if new {
        open.create_new(true);
    } else {
        open.create(true);
    }
    let f = open.open(path)?;
    if f.metadata()?.mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    }
    Ok(())
}

/// How long an online copy waits for a writer's lock before giving up.
const COPY_BUSY_WAIT: Duration = Duration::from_secs(30);

/// A data directory's lock, held until dropped (or until the process dies: the OS releases
/// it).
#[derive(Debug)]
pub struct DataDirLock {
    _conn: Connection,
}

/// Why [`lock_data_dir`] did not take the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it: a server runs on the directory (or a restore does).
    #[error(
        "data directory {} is in use by another pchat store (lock {} is held); stop the other \
         process or use another directory",
        dir.display(),
        lock.display()
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// The directory or the lock file could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<LockError> for StoreError {
    fn from(e: LockError) -> StoreError {
        match e {
            held @ LockError::Held { .. } => StoreError::Unavailable(held.to_string()),
            LockError::Store(e) => e,
        }
    }
}

/// Takes the data directory's lock (creating the directory when missing): one process at a
/// time, because the writer keeps sequence numbers in memory and would hand out the same one
/// twice otherwise, and a restore must not swap files under a running server.
///
/// The lock is an SQLite exclusive lock on a small [`LOCK_FILE`] database, held for as long
/// as the returned value lives and released by the OS if the process dies.
///
/// A directory made here is 0700 and the lock file 0600, whatever the umask: the directory
/// is about to hold every message (a restore fills it).
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, LockError> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
    let path = dir.join(LOCK_FILE);
    create_private(&path, false)
        .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", path.display())))?;
    let sql = |e: rusqlite::Error| LockError::Store(classify(&e));
    let conn = Connection::open(&path).map_err(sql)?;
    // Fail at once: waiting would only hide a second server started by mistake.
    conn.busy_timeout(Duration::ZERO).map_err(sql)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(sql)?;
    // A write takes the exclusive lock; in exclusive locking mode it is kept after commit.
    let taken = conn.execute_batch(
        "BEGIN EXCLUSIVE; CREATE TABLE IF NOT EXISTS lock (pid INTEGER); DELETE FROM lock; \
         INSERT INTO lock (pid) VALUES (0); COMMIT;",
    );
    match taken {
        Ok(()) => {}
        Err(rusqlite::Error::SqliteFailure(f, _))
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                lock: path,
            });
        }
        Err(e) => return Err(sql(e)),
    }
    conn.execute("UPDATE lock SET pid = ?1", [i64::from(std::process::id())])
        .map_err(sql)?;
    Ok(DataDirLock { _conn: conn })
}

/// Copies one live database file to `dst` (created, fsynced) with SQLite's online backup
/// API, while a server may keep writing it. All pages are copied in one step, that is inside
/// one read transaction: in WAL mode it does not block the server's writer, and it gives one
/// consistent snapshot, where a page-by-page copy would restart each time the server commits
/// and might never finish on a busy server.
///
/// `dst` must not exist: it is created 0600 whatever the umask (SQLite would make it 0644),
/// since it holds every message of the database.
pub fn copy_online(src: &Path, dst: &Path) -> Result<(), StoreError> {
    let sql = |e: rusqlite::Error| classify(&e);
    create_private(dst, true)
        .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dst.display())))?;
    let from = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    from.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    let mut to = Connection::open(dst).map_err(sql)?;
    {
        let b = Backup::new(&from, &mut to).map_err(sql)?;
        let deadline = Instant::now() + COPY_BUSY_WAIT;
        loop {
            match b.step(-1).map_err(sql)? {
                StepResult::Done => break,
                StepResult::More => {}
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    return Err(StoreError::Unavailable(format!(
                        "{} stayed locked for {COPY_BUSY_WAIT:?}",
                        src.display()
                    )))
                }
            }
        }
    }
    to.close().map_err(|(_, e)| sql(e))?;
    File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Unavailable(format!("syncing {}: {e}", dst.display())))
}
