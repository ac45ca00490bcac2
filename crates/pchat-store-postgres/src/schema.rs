//! Schema installation (`pchat db install`) and the version check on connect.

use pchat_store::StoreError;
use rand::RngCore as _;

use crate::error::{get, Result};
use crate::pool::{PgConn, Session};

/// One schema step: SQL that takes a database from `version - 1` to `version`.
struct Migration {
    version: i32,
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
        sql: include_str!("../migrations/mgc/0002_presence.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/mgc/0003_revisions_and_keys.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/mgc/0004_server_secret.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/mgc/0005_id_epoch.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../migrations/mgc/0006_directory.sql"),
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

/// Advisory-lock class (first key of the two-int form) that serializes installers, so that
/// two `pchat db install` run at once do not both create the tables.
const INSTALL_LOCK_CLASS: i32 = 0x7063_6869; // "pchi"

/// Which database; decides its migrations and its name in messages.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Database {
    /// Users, rooms, archive, applied batches.
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

    fn latest(self) -> i32 {
        self.migrations().last().map_or(0, |m| m.version)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Database::Mgc => "mgc",
            Database::MgcComp => "mgccomp",
        }
    }
}

fn newer(db: Database, current: i32) -> StoreError {
    StoreError::Corrupt(format!(
        "database {} has schema version {current}, newer than the newest this pchat knows ({}): \
         run the pchat version that installed it (or newer), or restore a backup made by this version",
        db.name(),
        db.latest()
    ))
}

/// Brings a database to the newest schema this build knows, in one transaction (DDL is
/// transactional in PostgreSQL: a failed install leaves nothing half-made). Idempotent.
pub(crate) async fn install(session: &Session, db: Database, grant_to: &str) -> Result<()> {
    let mut conn = PgConn::connect(session).await?;
    conn.batch("BEGIN").await?;
    let result = async {
        install_in_transaction(&mut conn, db).await?;
        grant(&conn, session, grant_to).await
    }
    .await;
    match result {
        Ok(()) => conn.batch("COMMIT").await,
        Err(e) => {
            // Best effort: dropping the session aborts the transaction anyway.
            let _ = conn.batch("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn install_in_transaction(conn: &mut PgConn, db: Database) -> Result<()> {
    conn.query(
        "SELECT pg_advisory_xact_lock($1::int4, 0)",
        &[&INSTALL_LOCK_CLASS],
    )
    .await?;
    conn.batch("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        .await?;
    let row = conn
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await?;
    let current: i32 = get(&row, 0)?;
    if current > db.latest() {
        return Err(newer(db, current).into());
    }
    for step in db.migrations().iter().filter(|m| m.version > current) {
        conn.batch(step.sql).await?;
        conn.execute("DELETE FROM schema_version", &[]).await?;
        conn.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&step.version],
        )
        .await?;
        tracing::info!(
            database = db.name(),
            version = step.version,
            "migrated schema"
        );
    }
    if matches!(db, Database::Mgc) {
        // Made once, kept by every later install (ON CONFLICT): servers only read it.
        let mut secret = [0u8; pchat_store::SERVER_SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        conn.execute(
            "INSERT INTO server_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            &[&&secret[..]],
        )
        .await?;
    }
    Ok(())
}

/// Names that go into SQL unquoted (roles, databases).
pub(crate) fn plain_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// What the servers' role may do in this database, and what nobody else may (see
/// [`crate::PostgresStore::install`]). Granted again at every install, so tables a newer
/// migration added are covered too.
async fn grant(conn: &PgConn, session: &Session, role: &str) -> Result<()> {
    let database = session.config.get_dbname().unwrap_or(session.name);
    if !plain_identifier(database) || !plain_identifier(role) {
        return Err(StoreError::Invalid(format!(
            "database `{database}` or role `{role}`: only lower-case letters, digits and _"
        ))
        .into());
    }
    conn.batch(&format!(
        "REVOKE ALL ON DATABASE {database} FROM PUBLIC; \
         GRANT CONNECT ON DATABASE {database} TO {role}; \
         REVOKE ALL ON SCHEMA public FROM PUBLIC; \
         GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
    ))
    .await
}

/// Checks that a database holds exactly the schema this build writes: missing or older asks
/// for `pchat db install`, newer is refused.
pub(crate) async fn check(conn: &mut PgConn, db: Database) -> Result<()> {
    let row = conn
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await?;
    let current: i32 = if get::<bool>(&row, 0)? {
        let row = conn
            .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
            .await?;
        get(&row, 0)?
    } else {
        0
    };
    if current == db.latest() {
        return Ok(());
    }
    if current > db.latest() {
        return Err(newer(db, current).into());
    }
    let what = if current == 0 {
        "has no pchat schema".to_string()
    } else {
        format!(
            "has schema version {current}, older than this pchat's ({})",
            db.latest()
        )
    };
    Err(StoreError::Unavailable(format!(
        "database {} {what}: run `pchat db install` first",
        db.name()
    ))
    .into())
}
