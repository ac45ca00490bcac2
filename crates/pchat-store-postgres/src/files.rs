//! Files posted through the HTTP upload service (XEP-0363): their records in `file` and their
//! bytes in `file_chunk` (`bytea`), pieces of at most [`FILE_CHUNK_BYTES`].
//!
//! Every operation runs on a pooled session outside the writer task, as the other
//! non-commit writes do; those that check before they write are one transaction:
//!
//! - [`create`] takes a transaction-scoped advisory lock on the owner (class
//!   [`FILE_OWNER_LOCK_CLASS`], key `hashtext(owner)`) before it sums the owner's bytes, so two
//!   servers of a pool creating slots for the same owner at once are serialized and cannot
//!   both pass the quota. A row lock would not do: a first upload has no row to lock, and
//!   SERIALIZABLE would turn every such race into an error to retry. Two owners whose hashes
//!   collide only wait for each other.
//! - [`chunk_put`] and [`finish`] lock the file's row (`FOR UPDATE`) first, so pieces written
//!   at once for one file (a client's parallel retries) are checked against each other.
//!
//! Deleting a room, or clearing its history, deletes its files in the writer's group
//! transaction (`writer.rs`); the pieces follow their file (`ON DELETE CASCADE`).

use pchat_room::Timestamp;
use pchat_store::{
    FileCreated, FileFilter, FileRecord, StoreError, FILE_CHUNK_BYTES, FILE_LIST_MAX,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::{corrupt, get, Error, Result};
use crate::pool::PgConn;

/// Advisory-lock class (first key of the two-int form, in mgc) that serializes the slots one
/// owner creates, so the quota check and the insert are one step across the pool.
pub(crate) const FILE_OWNER_LOCK_CLASS: i32 = 0x7063_6671; // "pcfq"

/// Runs `$body` (an expression ending in the value, `?` allowed) in one READ COMMITTED
/// transaction on `$conn`: COMMIT when it succeeds, ROLLBACK when it fails.
macro_rules! transaction {
    ($conn:ident, $body:expr) => {{
        $conn.batch("BEGIN ISOLATION LEVEL READ COMMITTED").await?;
        let done = async { Ok::<_, Error>($body) }.await;
        match done {
            Ok(value) => {
                $conn.batch("COMMIT").await?;
                Ok(value)
            }
            Err(e) => {
                // Best effort: a session that cannot roll back is broken and gets dropped.
                let _ = $conn.batch("ROLLBACK").await;
                Err(e)
            }
        }
    }};
}

fn invalid(what: String) -> Error {
    Error::Store(StoreError::Invalid(what))
}

/// Refuses a record [`create`] must not store, and returns its size as stored. Checked
/// before any SQL, with the same answers as the SQLite backend's.
fn check_new(file: &FileRecord) -> Result<i64> {
    if file.sha256.is_some() {
        return Err(invalid(format!(
            "file {}: a new file is unfinished (no sha256); file_finish records the hash",
            file.id
        )));
    }
    if file.room.is_some() {
        return Err(invalid(format!(
            "file {}: a new file is bound to no room; file_bind binds it once it is posted",
            file.id
        )));
    }
    for (what, text) in [
        ("id", &file.id),
        ("owner", &file.owner),
        ("name", &file.name),
        ("content type", &file.content_type),
    ] {
        // PostgreSQL text cannot hold NUL: refused here as Invalid rather than by the server.
        if text.is_empty() || text.contains('\0') {
            return Err(invalid(format!(
                "file {:?}: its {what} is empty or holds NUL",
                file.id
            )));
        }
    }
    i64::try_from(file.size)
        .map_err(|_| invalid(format!("file {}: size {} is too large", file.id, file.size)))
}

/// A hex SHA-256: 64 hex digits.
fn check_sha256(id: &str, sha256: &str) -> Result<()> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(invalid(format!(
            "file {id}: {sha256:?} is not a hex SHA-256 (64 hex digits)"
        )))
    }
}

/// Ids and owners never hold NUL (see [`check_new`]): looking one up is simply not finding it.
fn storable(text: &str) -> bool {
    !text.contains('\0')
}

pub(crate) async fn create(
    conn: &mut PgConn,
    file: &FileRecord,
    owner_quota_bytes: u64,
) -> Result<FileCreated> {
    let size = check_new(file)?;
    transaction!(conn, {
        conn.execute(
            "SELECT pg_advisory_xact_lock($1::int4, hashtext($2))",
            &[&FILE_OWNER_LOCK_CLASS, &file.owner],
        )
        .await?;
        let exists = conn
            .query_opt("SELECT 1 FROM file WHERE id = $1", &[&file.id])
            .await?
            .is_some();
        if exists {
            return Err(Error::Store(StoreError::Conflict(format!(
                "file {} exists already",
                file.id
            ))));
        }
        let row = conn
            .query_one(
                "SELECT coalesce(sum(size), 0)::bigint FROM file \
                 WHERE owner = $1 AND (sha256 IS NOT NULL OR expires_at > $2)",
                &[&file.owner, &file.created_at.0],
            )
            .await?;
        let used: i64 = get(&row, 0)?;
        let used = u64::try_from(used)
            .map_err(|_| corrupt(format!("the files of {} hold {used} bytes", file.owner)))?;
        if used.saturating_add(file.size) > owner_quota_bytes {
            FileCreated::OverQuota { used }
        } else {
            // A slot made meanwhile under the same id by another owner (not under our lock)
            // meets the primary key: Conflict, as above.
            conn.execute(
                "INSERT INTO file (id, owner, room, name, content_type, size, created_at, \
                 expires_at, sha256) VALUES ($1, $2, NULL, $3, $4, $5, $6, $7, NULL)",
                &[
                    &file.id,
                    &file.owner,
                    &file.name,
                    &file.content_type,
                    &size,
                    &file.created_at.0,
                    &file.expires_at.0,
                ],
            )
            .await?;
            FileCreated::Created
        }
    })
}

/// Locks a file's row; its declared size and hash, `None` when there is no such file.
async fn lock_file(conn: &mut PgConn, id: &str) -> Result<Option<(i64, Option<String>)>> {
    let row = conn
        .query_opt(
            "SELECT size, sha256 FROM file WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    row.map(|r| Ok((get(&r, 0)?, get(&r, 1)?))).transpose()
}

pub(crate) async fn chunk_put(conn: &mut PgConn, id: &str, index: u32, data: &[u8]) -> Result<()> {
    if data.len() > FILE_CHUNK_BYTES {
        return Err(invalid(format!(
            "file {id}: piece {index} holds {} bytes, more than {FILE_CHUNK_BYTES}",
            data.len()
        )));
    }
    if !storable(id) {
        return Err(invalid(format!("file {id:?}: no such file")));
    }
    let index = i64::from(index);
    transaction!(conn, {
        let size = match lock_file(conn, id).await? {
            None => return Err(invalid(format!("file {id}: no such file"))),
            Some((_, Some(_))) => {
                return Err(invalid(format!(
                    "file {id}: finished, its pieces no longer change"
                )))
            }
            Some((size, None)) => size,
        };
        let row = conn
            .query_one(
                "SELECT coalesce(sum(length(data)), 0)::bigint FROM file_chunk \
                 WHERE file_id = $1 AND idx <> $2",
                &[&id, &index],
            )
            .await?;
        let others: i64 = get(&row, 0)?;
        // Both sides are at most size + FILE_CHUNK_BYTES, far from overflowing.
        if others.saturating_add(data.len() as i64) > size {
            return Err(invalid(format!(
                "file {id}: piece {index} would make its pieces hold more than its {size} bytes"
            )));
        }
        conn.execute(
            "INSERT INTO file_chunk (file_id, idx, data) VALUES ($1, $2, $3) \
             ON CONFLICT (file_id, idx) DO UPDATE SET data = EXCLUDED.data",
            &[&id, &index, &data],
        )
        .await?;
    })
}

pub(crate) async fn finish(conn: &mut PgConn, id: &str, sha256: &str) -> Result<()> {
    check_sha256(id, sha256)?;
    if !storable(id) {
        return Err(invalid(format!("file {id:?}: no such file")));
    }
    transaction!(conn, {
        let size = match lock_file(conn, id).await? {
            None => return Err(invalid(format!("file {id}: no such file"))),
            Some((_, Some(done))) if done == sha256 => return Ok(()),
            Some((_, Some(done))) => {
                return Err(Error::Store(StoreError::Conflict(format!(
                    "file {id}: finished already with SHA-256 {done}, not {sha256}"
                ))))
            }
            Some((size, None)) => size,
        };
        let row = conn
            .query_one(
                "SELECT count(*), coalesce(sum(length(data)), 0)::bigint, max(idx) \
                 FROM file_chunk WHERE file_id = $1",
                &[&id],
            )
            .await?;
        let (pieces, bytes, last): (i64, i64, Option<i64>) =
            (get(&row, 0)?, get(&row, 1)?, get(&row, 2)?);
        // Indexes are unique and not negative: n of them up to n - 1 are exactly 0..n.
        let contiguous = last.map_or(0, |l| l + 1) == pieces;
        if !contiguous || bytes != size {
            return Err(invalid(format!(
                "file {id}: its {pieces} pieces (indexes 0..={}) hold {bytes} bytes, not \
                 pieces 0..n holding its {size} bytes",
                last.unwrap_or(-1)
            )));
        }
        conn.execute("UPDATE file SET sha256 = $2 WHERE id = $1", &[&id, &sha256])
            .await?;
    })
}

pub(crate) async fn bind(conn: &mut PgConn, id: &str, owner: &str, room: &str) -> Result<bool> {
    if room.is_empty() || !storable(room) {
        return Err(invalid(format!(
            "file {id}: {room:?} is not a room JID a file can be bound to"
        )));
    }
    if !storable(id) || !storable(owner) {
        return Ok(false);
    }
    let bound = conn
        .execute(
            "UPDATE file SET room = $3 \
             WHERE id = $1 AND owner = $2 AND room IS NULL AND sha256 IS NOT NULL",
            &[&id, &owner, &room],
        )
        .await?;
    Ok(bound == 1)
}

/// One statement: the pieces go with their file (`ON DELETE CASCADE`).
pub(crate) async fn remove(conn: &mut PgConn, id: &str) -> Result<bool> {
    if !storable(id) {
        return Ok(false);
    }
    Ok(conn
        .execute("DELETE FROM file WHERE id = $1", &[&id])
        .await?
        > 0)
}

/// One statement; rows another session holds (a piece being written to a slot that expired
/// meanwhile) are skipped until the next round rather than waited for.
pub(crate) async fn purge_unfinished(
    conn: &mut PgConn,
    before: Timestamp,
    limit: u32,
) -> Result<u64> {
    conn.execute(
        "DELETE FROM file WHERE id IN (SELECT id FROM file \
         WHERE sha256 IS NULL AND expires_at < $1 ORDER BY expires_at, id LIMIT $2 \
         FOR UPDATE SKIP LOCKED)",
        &[&before.0, &i64::from(limit)],
    )
    .await
}

const FILE_COLUMNS: &str =
    "id, owner, room, name, content_type, size, created_at, expires_at, sha256";

fn file_from_row(row: &Row) -> Result<FileRecord> {
    let size: i64 = get(row, 5)?;
    Ok(FileRecord {
        id: get(row, 0)?,
        owner: get(row, 1)?,
        room: get(row, 2)?,
        name: get(row, 3)?,
        content_type: get(row, 4)?,
        size: u64::try_from(size).map_err(|_| corrupt(format!("file size {size}")))?,
        created_at: Timestamp(get(row, 6)?),
        expires_at: Timestamp(get(row, 7)?),
        sha256: get(row, 8)?,
    })
}

pub(crate) async fn get_file(conn: &mut PgConn, id: &str) -> Result<Option<FileRecord>> {
    if !storable(id) {
        return Ok(None);
    }
    let row = conn
        .query_opt(
            &format!("SELECT {FILE_COLUMNS} FROM file WHERE id = $1"),
            &[&id],
        )
        .await?;
    row.as_ref().map(file_from_row).transpose()
}

pub(crate) async fn chunk_get(conn: &mut PgConn, id: &str, index: u32) -> Result<Option<Vec<u8>>> {
    if !storable(id) {
        return Ok(None);
    }
    let row = conn
        .query_opt(
            "SELECT data FROM file_chunk WHERE file_id = $1 AND idx = $2",
            &[&id, &i64::from(index)],
        )
        .await?;
    row.map(|r| get(&r, 0)).transpose()
}

pub(crate) async fn room_bytes(conn: &mut PgConn, room: &str) -> Result<u64> {
    if !storable(room) {
        return Ok(0);
    }
    let row = conn
        .query_one(
            "SELECT coalesce(sum(size), 0)::bigint FROM file \
             WHERE room = $1 AND sha256 IS NOT NULL",
            &[&room],
        )
        .await?;
    let bytes: i64 = get(&row, 0)?;
    u64::try_from(bytes)
        .map_err(|_| corrupt(format!("the files of room {room} hold {bytes} bytes")))
}

pub(crate) async fn list(conn: &mut PgConn, filter: &FileFilter) -> Result<Vec<FileRecord>> {
    let limit = i64::from(match filter.limit {
        0 => FILE_LIST_MAX,
        n => n.min(FILE_LIST_MAX),
    });
    let (owner, room) = (filter.owner.as_deref(), filter.room.as_deref());
    if !owner.is_none_or(storable) || !room.is_none_or(storable) {
        return Ok(Vec::new());
    }
    // One statement per filter shape (four), each planned with the index it needs.
    let mut sql = format!("SELECT {FILE_COLUMNS} FROM file WHERE true");
    let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(owner) = &filter.owner {
        args.push(owner);
        sql.push_str(&format!(" AND owner = ${}", args.len()));
    }
    if let Some(room) = &filter.room {
        args.push(room);
        sql.push_str(&format!(" AND room = ${}", args.len()));
    }
    args.push(&limit);
    sql.push_str(&format!(" ORDER BY created_at, id LIMIT ${}", args.len()));
    conn.query(&sql, &args)
        .await?
        .iter()
        .map(file_from_row)
        .collect()
}
