//! Opening the two database files: pragmas, the data-directory lock, migrations and the
//! reconcile of compliance records after a crash.

use std::path::Path;
use std::time::Duration;

use pchat_store::StoreError;
use rand::RngCore as _;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::error::Result;

/// One schema step: SQL that takes a database from `version - 1` to `version`.
struct Migration {
    version: i64,
    sql: &'static str,
}

/// The `mgc` schema history, oldest first. Never edit a released step: add a new one.
const MGC_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/mgc/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/mgc/0002_revisions_and_keys.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/mgc/0003_server_secret.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/mgc/0004_id_epoch.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/mgc/0005_directory.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../migrations/mgc/0006_seq_floor.sql"),
    },
    Migration {
        version: 7,
        sql: include_str!("../migrations/mgc/0007_invitations.sql"),
    },
    Migration {
        version: 8,
        sql: include_str!("../migrations/mgc/0008_files.sql"),
    },
    Migration {
        version: 9,
        sql: include_str!("../migrations/mgc/0009_pep.sql"),
    },
    Migration {
        version: 10,
        sql: include_str!("../migrations/mgc/0010_web_sessions.sql"),
    },
];

/// The `mgccomp` schema history, oldest first.
const MGCCOMP_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/mgccomp/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/mgccomp/0002_export.sql"),
    },
];

/// Which database a connection is for; decides its migrations and its name in messages.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Database {
    /// Users, rooms, archive.
    Mgc,
    /// Compliance events.
    MgcComp,
}

impl Database {
    fn migrations(self) -> &'static [Migration] {
        match self {
            Database::Mgc => MGC_MIGRATIONS,
            Database::MgcComp => MGCCOMP_MIGRATIONS,
        }
    }
}

/// Makes the database files (and the lock) before SQLite does, with mode 0600 whatever the
/// umask, and tightens those an older pchat left wider. SQLite gives a database's `-wal` and
/// `-shm` files the mode of the database file, so they follow.
pub(crate) fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
    for name in ["mgc.db", "mgccomp.db", "pchat.lock"] {
        let path = dir.join(name);
        // An empty file is an empty database to SQLite.
        drop(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)?,
        );
    }
    for name in [
        "mgc.db",
        "mgccomp.db",
        "pchat.lock",
        "mgc.db-wal",
        "mgc.db-shm",
        "mgccomp.db-wal",
        "mgccomp.db-shm",
        "pchat.lock-journal",
    ] {
        let path = dir.join(name);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.mode() & 0o077 != 0 => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens a read-write connection in WAL mode with durable commits.
pub(crate) fn open_write(path: &Path, busy_timeout_ms: u64) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))?;
    // WAL lets readers run while the writer commits; the mode is stored in the file.
    // Switching a fresh file to WAL needs an exclusive lock, and SQLite does not always wait
    // for it through the busy handler (it refuses at once when waiting could deadlock), so
    // concurrent first opens retry here within the same bound.
    let deadline = std::time::Instant::now() + Duration::from_millis(busy_timeout_ms);
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "{} cannot use WAL journal mode (got {mode}); put the data directory on a local disk",
            path.display()
        ))
        .into());
    }
    // FULL: a commit is on disk (WAL fsynced) before it returns, so an acknowledged message
    // survives power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// Opens a read-only connection for the read pool.
pub(crate) fn open_read(path: &Path, busy_timeout_ms: u64) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))?;
    Ok(conn)
}

/// Brings a database to the newest schema this build knows, one transaction per step.
/// Refuses a database written by a newer pchat rather than guess at its meaning.
pub(crate) fn migrate(conn: &mut Connection, db: Database, file: &Path) -> Result<()> {
    let migrations = db.migrations();
    let latest = migrations.last().map_or(0, |m| m.version);
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    if current > latest {
        return Err(StoreError::Corrupt(format!(
            "{} has schema version {current}, newer than the newest this pchat knows ({latest}): \
             run the pchat version that wrote it (or newer), or restore a backup made by this version",
            file.display()
        ))
        .into());
    }
    for step in migrations.iter().filter(|m| m.version > current) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process (a second `pchat user add` on a fresh directory) may have applied
        // the step since the version was read: look again under the write lock.
        let now: i64 = tx.query_row(
            "SELECT coalesce(max(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )?;
        if now >= step.version {
            continue;
        }
        tx.execute_batch(step.sql)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [step.version],
        )?;
        tx.commit()?;
        tracing::info!(file = %file.display(), version = step.version, "migrated schema");
    }
    Ok(())
}

/// Makes the server secret unless the database has one: random bytes from the operating
/// system's generator. `INSERT OR IGNORE` keeps the first one when two processes open a fresh
/// directory at once (a server and a `pchat user add`).
pub(crate) fn ensure_server_secret(mgc: &Connection) -> Result<()> {
    let mut secret = [0u8; pchat_store::SERVER_SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    mgc.execute(
        "INSERT OR IGNORE INTO server_secret (id, secret) VALUES (1, ?1)",
        [&secret[..]],
    )?;
    Ok(())
}

/// Marks the compliance records of batches whose mgc transaction never committed, and
/// returns the next batch id to use.
///
/// The writer commits a batch's compliance records (mgccomp) before its changes (mgc), and
/// the mgc transaction records the highest batch id it applied. A record with a higher batch
/// id therefore describes a change a crash kept from happening: it stays (compliance keeps
/// everything that was recorded) but says `committed = 0`.
pub(crate) fn reconcile(mgc: &Connection, comp: &Connection) -> Result<i64> {
    let last_applied: i64 = mgc.query_row(
        "SELECT last_batch_id FROM writer_state WHERE id = 1",
        [],
        |r| r.get(0),
    )?;
    let marked = comp.execute(
        "UPDATE compliance SET committed = 0 WHERE batch_id > ?1 AND committed = 1",
        [last_applied],
    )?;
    if marked > 0 {
        tracing::warn!(
            records = marked,
            last_applied,
            "compliance records of batches that never committed in mgc marked uncommitted"
        );
    }
    let last_recorded: i64 = comp.query_row(
        "SELECT coalesce(max(batch_id), 0) FROM compliance",
        [],
        |r| r.get(0),
    )?;
    Ok(last_applied.max(last_recorded) + 1)
}

/// The id epoch in force ([`pchat_store::ids`]).
pub(crate) fn id_epoch(mgc: &Connection) -> Result<u64> {
    let epoch: i64 = mgc.query_row("SELECT epoch FROM id_epoch WHERE id = 1", [], |r| r.get(0))?;
    u64::try_from(epoch)
        .map_err(|_| StoreError::Corrupt(format!("id epoch {epoch} is negative")).into())
}

/// Raises the id epoch to `epoch` (never lowers it); returns the epoch now in force.
pub(crate) fn raise_id_epoch(mgc: &Connection, epoch: u64) -> Result<u64> {
    pchat_store::ids::check_epoch(epoch)?;
    let wanted = i64::try_from(epoch)
        .map_err(|_| StoreError::Invalid(format!("id epoch {epoch} is too large")))?;
    mgc.execute(
        "UPDATE id_epoch SET epoch = max(epoch, ?1) WHERE id = 1",
        [wanted],
    )?;
    id_epoch(mgc)
}
