//! Files posted through the HTTP upload service (XEP-0363): their records in `file` and their
//! bytes in `file_chunk`, pieces of at most [`FILE_CHUNK_BYTES`].
//!
//! Every change here is one IMMEDIATE transaction on the writer thread's `mgc` connection and
//! the writer keeps nothing about files in memory, so these operations work the same when the
//! store is opened shared beside a running server (the shell): SQLite's write lock orders them
//! with the server's commits. Reads run on the read pool, one statement each.
//!
//! Deleting a room, or clearing its history, deletes its files in the group commit's own
//! transaction ([`delete_bound`], called by the writer).

use pchat_room::Timestamp;
use pchat_store::{
    FileCreated, FileFilter, FileRecord, StoreError, FILE_CHUNK_BYTES, FILE_LIST_MAX,
};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::Result;
use crate::writer::Reply;

/// A change to the files, served by the writer thread.
pub(crate) enum FileWrite {
    /// [`pchat_store::Store::file_create`].
    Create {
        file: FileRecord,
        owner_quota_bytes: u64,
        reply: Reply<FileCreated>,
    },
    /// [`pchat_store::Store::file_chunk_put`].
    ChunkPut {
        id: String,
        index: u32,
        data: Vec<u8>,
        reply: Reply<()>,
    },
    /// [`pchat_store::Store::file_finish`].
    Finish {
        id: String,
        sha256: String,
        reply: Reply<()>,
    },
    /// [`pchat_store::Store::file_bind`].
    Bind {
        id: String,
        owner: String,
        room: String,
        reply: Reply<bool>,
    },
    /// [`pchat_store::Store::file_remove`].
    Remove { id: String, reply: Reply<bool> },
    /// [`pchat_store::Store::file_purge_unfinished`].
    PurgeUnfinished {
        before: Timestamp,
        limit: u32,
        reply: Reply<u64>,
    },
}

impl FileWrite {
    /// Runs the change on the writer's `mgc` connection and answers its caller.
    pub(crate) fn serve(self, mgc: &mut Connection) {
        match self {
            FileWrite::Create {
                file,
                owner_quota_bytes,
                reply,
            } => {
                let _ = reply.send(create(mgc, &file, owner_quota_bytes).map_err(Into::into));
            }
            FileWrite::ChunkPut {
                id,
                index,
                data,
                reply,
            } => {
                let _ = reply.send(chunk_put(mgc, &id, index, &data).map_err(Into::into));
            }
            FileWrite::Finish { id, sha256, reply } => {
                let _ = reply.send(finish(mgc, &id, &sha256).map_err(Into::into));
            }
            FileWrite::Bind {
                id,
                owner,
                room,
                reply,
            } => {
                let _ = reply.send(bind(mgc, &id, &owner, &room).map_err(Into::into));
            }
            FileWrite::Remove { id, reply } => {
                let _ = reply.send(remove(mgc, &id).map_err(Into::into));
            }
            FileWrite::PurgeUnfinished {
                before,
                limit,
                reply,
            } => {
                let _ = reply.send(purge_unfinished(mgc, before, limit).map_err(Into::into));
            }
        }
    }
}

/// Refuses a record [`create`] must not store, and returns its size as stored. Checked before
/// any SQL: PostgreSQL cannot hold NUL in text, so neither does this backend, and both answer
/// the same.
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

fn invalid(what: String) -> crate::error::Error {
    StoreError::Invalid(what).into()
}

/// Checks the owner's quota and inserts the slot in one immediate transaction: no other
/// writer (another process on the same data directory) can insert between the two.
fn create(mgc: &mut Connection, file: &FileRecord, owner_quota_bytes: u64) -> Result<FileCreated> {
    let size = check_new(file)?;
    let tx = mgc.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let exists: bool = tx
        .prepare_cached("SELECT count(*) > 0 FROM file WHERE id = ?1")?
        .query_row([&file.id], |r| r.get(0))?;
    if exists {
        return Err(StoreError::Conflict(format!("file {} exists already", file.id)).into());
    }
    let used: i64 = tx
        .prepare_cached(
            "SELECT coalesce(sum(size), 0) FROM file \
             WHERE owner = ?1 AND (sha256 IS NOT NULL OR expires_at > ?2)",
        )?
        .query_row(params![file.owner, file.created_at.0], |r| r.get(0))?;
    let used = u64::try_from(used).map_err(|_| {
        StoreError::Corrupt(format!("the files of {} hold {used} bytes", file.owner))
    })?;
    if used.saturating_add(file.size) > owner_quota_bytes {
        return Ok(FileCreated::OverQuota { used });
    }
    tx.prepare_cached(
        "INSERT INTO file (id, owner, room, name, content_type, size, created_at, expires_at, sha256) \
         VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6, ?7, NULL)",
    )?
    .execute(params![
        file.id,
        file.owner,
        file.name,
        file.content_type,
        size,
        file.created_at.0,
        file.expires_at.0
    ])?;
    tx.commit()?;
    Ok(FileCreated::Created)
}

/// Whether a file exists and is finished, with its declared size.
fn state(conn: &Connection, id: &str) -> Result<Option<(i64, Option<String>)>> {
    Ok(conn
        .prepare_cached("SELECT size, sha256 FROM file WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

fn chunk_put(mgc: &mut Connection, id: &str, index: u32, data: &[u8]) -> Result<()> {
    if data.len() > FILE_CHUNK_BYTES {
        return Err(invalid(format!(
            "file {id}: piece {index} holds {} bytes, more than {FILE_CHUNK_BYTES}",
            data.len()
        )));
    }
    let tx = mgc.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let size = match state(&tx, id)? {
        None => return Err(invalid(format!("file {id}: no such file"))),
        Some((_, Some(_))) => {
            return Err(invalid(format!(
                "file {id}: finished, its pieces no longer change"
            )))
        }
        Some((size, None)) => size,
    };
    let others: i64 = tx
        .prepare_cached(
            "SELECT coalesce(sum(length(data)), 0) FROM file_chunk WHERE file_id = ?1 AND idx <> ?2",
        )?
        .query_row(params![id, index], |r| r.get(0))?;
    // Both sides are at most size + FILE_CHUNK_BYTES, far from overflowing.
    if others.saturating_add(data.len() as i64) > size {
        return Err(invalid(format!(
            "file {id}: piece {index} would make its pieces hold more than its {size} bytes"
        )));
    }
    tx.prepare_cached(
        "INSERT INTO file_chunk (file_id, idx, data) VALUES (?1, ?2, ?3) \
         ON CONFLICT (file_id, idx) DO UPDATE SET data = excluded.data",
    )?
    .execute(params![id, index, data])?;
    tx.commit()?;
    Ok(())
}

fn finish(mgc: &mut Connection, id: &str, sha256: &str) -> Result<()> {
    check_sha256(id, sha256)?;
    let tx = mgc.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let size = match state(&tx, id)? {
        None => return Err(invalid(format!("file {id}: no such file"))),
        Some((_, Some(done))) if done == sha256 => return Ok(()),
        Some((_, Some(done))) => {
            return Err(StoreError::Conflict(format!(
                "file {id}: finished already with SHA-256 {done}, not {sha256}"
            ))
            .into())
        }
        Some((size, None)) => size,
    };
    let (pieces, bytes, last): (i64, i64, Option<i64>) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(length(data)), 0), max(idx) FROM file_chunk \
             WHERE file_id = ?1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    // Indexes are unique and not negative: n of them up to n - 1 are exactly 0..n.
    let contiguous = last.map_or(0, |l| l + 1) == pieces;
    if !contiguous || bytes != size {
        return Err(invalid(format!(
            "file {id}: its {pieces} pieces (indexes 0..={}) hold {bytes} bytes, not pieces \
             0..n holding its {size} bytes",
            last.unwrap_or(-1)
        )));
    }
    tx.prepare_cached("UPDATE file SET sha256 = ?2 WHERE id = ?1")?
        .execute(params![id, sha256])?;
    tx.commit()?;
    Ok(())
}

fn bind(mgc: &mut Connection, id: &str, owner: &str, room: &str) -> Result<bool> {
    if room.is_empty() {
        return Err(invalid(format!("file {id}: a file is bound to a room JID")));
    }
    let bound = mgc
        .prepare_cached(
            "UPDATE file SET room = ?3 \
             WHERE id = ?1 AND owner = ?2 AND room IS NULL AND sha256 IS NOT NULL",
        )?
        .execute(params![id, owner, room])?;
    Ok(bound == 1)
}

fn remove(mgc: &mut Connection, id: &str) -> Result<bool> {
    let tx = mgc.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached("DELETE FROM file_chunk WHERE file_id = ?1")?
        .execute([id])?;
    let removed = tx
        .prepare_cached("DELETE FROM file WHERE id = ?1")?
        .execute([id])?;
    tx.commit()?;
    Ok(removed > 0)
}

fn purge_unfinished(mgc: &mut Connection, before: Timestamp, limit: u32) -> Result<u64> {
    let tx = mgc.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let ids = tx
        .prepare_cached(
            "SELECT id FROM file WHERE sha256 IS NULL AND expires_at < ?1 \
             ORDER BY expires_at, id LIMIT ?2",
        )?
        .query_map(params![before.0, limit], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    for id in &ids {
        tx.prepare_cached("DELETE FROM file_chunk WHERE file_id = ?1")?
            .execute([id])?;
        tx.prepare_cached("DELETE FROM file WHERE id = ?1")?
            .execute([id])?;
    }
    tx.commit()?;
    Ok(ids.len() as u64)
}

/// Inside the writer's `mgc` transaction: deletes the files bound to `room` (all of them, or
/// those created before `before`) with their pieces.
pub(crate) fn delete_bound(tx: &Connection, room: &str, before: Option<Timestamp>) -> Result<()> {
    match before {
        None => {
            tx.prepare_cached(
                "DELETE FROM file_chunk WHERE file_id IN (SELECT id FROM file WHERE room = ?1)",
            )?
            .execute([room])?;
            tx.prepare_cached("DELETE FROM file WHERE room = ?1")?
                .execute([room])?;
        }
        Some(before) => {
            tx.prepare_cached(
                "DELETE FROM file_chunk WHERE file_id IN \
                 (SELECT id FROM file WHERE room = ?1 AND created_at < ?2)",
            )?
            .execute(params![room, before.0])?;
            tx.prepare_cached("DELETE FROM file WHERE room = ?1 AND created_at < ?2")?
                .execute(params![room, before.0])?;
        }
    }
    Ok(())
}

const FILE_COLUMNS: &str =
    "id, owner, room, name, content_type, size, created_at, expires_at, sha256";

fn file_from_row(r: &Row<'_>) -> rusqlite::Result<FileRecord> {
    let size: i64 = r.get(5)?;
    Ok(FileRecord {
        id: r.get(0)?,
        owner: r.get(1)?,
        room: r.get(2)?,
        name: r.get(3)?,
        content_type: r.get(4)?,
        size: u64::try_from(size).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(5, size))?,
        created_at: Timestamp(r.get(6)?),
        expires_at: Timestamp(r.get(7)?),
        sha256: r.get(8)?,
    })
}

pub(crate) fn get(mgc: &Connection, id: &str) -> Result<Option<FileRecord>> {
    Ok(mgc
        .prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM file WHERE id = ?1"))?
        .query_row([id], file_from_row)
        .optional()?)
}

pub(crate) fn chunk_get(mgc: &Connection, id: &str, index: u32) -> Result<Option<Vec<u8>>> {
    Ok(mgc
        .prepare_cached("SELECT data FROM file_chunk WHERE file_id = ?1 AND idx = ?2")?
        .query_row(params![id, index], |r| r.get(0))
        .optional()?)
}

pub(crate) fn room_bytes(mgc: &Connection, room: &str) -> Result<u64> {
    let bytes: i64 = mgc
        .prepare_cached(
            "SELECT coalesce(sum(size), 0) FROM file WHERE room = ?1 AND sha256 IS NOT NULL",
        )?
        .query_row([room], |r| r.get(0))?;
    u64::try_from(bytes).map_err(|_| {
        StoreError::Corrupt(format!("the files of room {room} hold {bytes} bytes")).into()
    })
}

pub(crate) fn list(mgc: &Connection, filter: &FileFilter) -> Result<Vec<FileRecord>> {
    let limit = match filter.limit {
        0 => FILE_LIST_MAX,
        n => n.min(FILE_LIST_MAX),
    };
    let mut sql = format!("SELECT {FILE_COLUMNS} FROM file WHERE 1");
    let mut args: Vec<Value> = Vec::new();
    if let Some(owner) = &filter.owner {
        args.push(Value::Text(owner.clone()));
        sql.push_str(&format!(" AND owner = ?{}", args.len()));
    }
    if let Some(room) = &filter.room {
        args.push(Value::Text(room.clone()));
        sql.push_str(&format!(" AND room = ?{}", args.len()));
    }
    args.push(Value::Integer(i64::from(limit)));
    sql.push_str(&format!(" ORDER BY created_at, id LIMIT ?{}", args.len()));
    let files = mgc
        .prepare_cached(&sql)?
        .query_map(params_from_iter(args), file_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(files)
}
