//! Reads: a small pool of read-only connections used from `spawn_blocking`, and the queries.
//!
//! WAL mode lets these readers run while the writer commits; each read that takes more than
//! one statement runs in one read transaction, so it sees one snapshot.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use pchat_room::{RoomRecord, Timestamp};
use pchat_store::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceKind, ComplianceRecord, ExportState,
    NewComplianceEvent, RoomStats, ScramCredential, StoreError, StoreResult, StoredRoom,
    UserRecord, ARCHIVE_PAGE_MAX, COMPLIANCE_PAGE_MAX,
};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use tokio::sync::Semaphore;

use crate::error::Result;
use crate::schema::open_read;
use crate::writer::{message_key, SEQ_MAX};

/// One reader: a read-only connection to each database.
pub(crate) struct ReadConn {
    /// `mgc.db`, read only (the file queries in `files.rs` use it too).
    pub(crate) mgc: Connection,
    comp: Connection,
}

impl ReadConn {
    pub(crate) fn open(mgc: &Path, comp: &Path, busy_timeout_ms: u64) -> Result<ReadConn> {
        Ok(ReadConn {
            mgc: open_read(mgc, busy_timeout_ms)?,
            comp: open_read(comp, busy_timeout_ms)?,
        })
    }
}

/// A bounded pool of readers: at most `read_connections` reads run at once.
pub(crate) struct ReadPool {
    idle: Mutex<Vec<ReadConn>>,
    permits: Arc<Semaphore>,
    paths: (std::path::PathBuf, std::path::PathBuf),
    busy_timeout_ms: u64,
}

impl ReadPool {
    pub(crate) fn new(
        conns: Vec<ReadConn>,
        mgc: &Path,
        comp: &Path,
        busy_timeout_ms: u64,
    ) -> ReadPool {
        ReadPool {
            permits: Arc::new(Semaphore::new(conns.len())),
            idle: Mutex::new(conns),
            paths: (mgc.to_path_buf(), comp.to_path_buf()),
            busy_timeout_ms,
        }
    }

    /// Closes the idle connections (used on close, so the writer's are the last ones).
    pub(crate) fn clear(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Runs `f` on a reader in the blocking thread pool, never on the async runtime.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut ReadConn) -> Result<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        let pool = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let taken = pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            // A reader lost to a panic is replaced here, so the pool never shrinks.
            let mut conn = match taken {
                Some(conn) => conn,
                None => ReadConn::open(&pool.paths.0, &pool.paths.1, pool.busy_timeout_ms)?,
            };
            let result = f(&mut conn);
            pool.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
            result
        })
        .await;
        match joined {
            Ok(result) => result.map_err(StoreError::from),
            Err(e) => Err(StoreError::Unavailable(format!("a store read failed: {e}"))),
        }
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn server_secret(conn: &mut ReadConn) -> Result<Vec<u8>> {
    let secret: Option<Vec<u8>> = conn
        .mgc
        .prepare_cached("SELECT secret FROM server_secret WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    match secret {
        Some(s) if s.len() == pchat_store::SERVER_SECRET_BYTES => Ok(s),
        // Made at every open: missing or cut short, the file was changed behind our back.
        _ => Err(StoreError::Corrupt(
            "mgc.db has no valid server secret (table server_secret); restore a backup".into(),
        )
        .into()),
    }
}

pub(crate) fn user_get(conn: &mut ReadConn, jid: &str) -> Result<Option<UserRecord>> {
    let user = conn
        .mgc
        .prepare_cached(
            "SELECT jid, sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, \
             sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, created_at \
             FROM user WHERE jid = ?1",
        )?
        .query_row([jid], |r| {
            Ok(UserRecord {
                jid: r.get(0)?,
                scram_sha1: ScramCredential {
                    salt: r.get(1)?,
                    iterations: r.get(2)?,
                    stored_key: r.get(3)?,
                    server_key: r.get(4)?,
                },
                scram_sha256: ScramCredential {
                    salt: r.get(5)?,
                    iterations: r.get(6)?,
                    stored_key: r.get(7)?,
                    server_key: r.get(8)?,
                },
                created_at: Timestamp(r.get(9)?),
            })
        })
        .optional()?;
    Ok(user)
}

pub(crate) fn user_list(conn: &mut ReadConn) -> Result<Vec<String>> {
    let mut stmt = conn
        .mgc
        .prepare_cached("SELECT jid FROM user ORDER BY jid")?;
    let jids = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(jids)
}

fn parse_room(jid: &str, json: &str) -> Result<RoomRecord> {
    serde_json::from_str(json)
        .map_err(|e| corrupt(format!("room {jid}: unreadable record: {e}")).into())
}

pub(crate) fn room_list(conn: &mut ReadConn) -> Result<Vec<RoomRecord>> {
    let mut stmt = conn
        .mgc
        .prepare_cached("SELECT jid, record FROM room ORDER BY jid")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.iter()
        .map(|(jid, json)| parse_room(jid, json))
        .collect()
}

pub(crate) fn room_get(conn: &mut ReadConn, jid: &str) -> Result<Option<RoomRecord>> {
    let json: Option<String> = conn
        .mgc
        .prepare_cached("SELECT record FROM room WHERE jid = ?1")?
        .query_row([jid], |r| r.get(0))
        .optional()?;
    json.map(|json| parse_room(jid, &json)).transpose()
}

pub(crate) fn room_load(conn: &mut ReadConn, jid: &str) -> Result<Option<StoredRoom>> {
    let row: Option<(String, i64)> = conn
        .mgc
        .prepare_cached("SELECT record, revision FROM room WHERE jid = ?1")?
        .query_row([jid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(json, revision)| {
        Ok(StoredRoom {
            record: parse_room(jid, &json)?,
            revision,
        })
    })
    .transpose()
}

fn room_id(mgc: &Connection, room: &str) -> Result<Option<i64>> {
    Ok(mgc
        .prepare_cached("SELECT id FROM room WHERE jid = ?1")?
        .query_row([room], |r| r.get(0))
        .optional()?)
}

/// The directory document and its revision (none saved: the default, revision 0).
pub(crate) fn directory_get(conn: &mut ReadConn) -> Result<pchat_store::StoredDirectory> {
    let row: Option<(i64, String)> = conn
        .mgc
        .prepare_cached("SELECT revision, document FROM directory WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match row {
        None => pchat_store::StoredDirectory::default(),
        Some((revision, text)) => pchat_store::StoredDirectory {
            directory: pchat_store::parse_directory(&text)?,
            revision,
        },
    })
}

/// The directory's revision (0: none saved).
pub(crate) fn directory_revision(conn: &mut ReadConn) -> Result<i64> {
    Ok(conn
        .mgc
        .prepare_cached("SELECT coalesce(max(revision), 0) FROM directory")?
        .query_row([], |r| r.get(0))?)
}

/// The id epoch in force.
pub(crate) fn id_epoch(conn: &mut ReadConn) -> Result<u64> {
    crate::schema::id_epoch(&conn.mgc)
}

/// Messages and the last id of a room's archive, `None` when empty. Within an id epoch
/// the archive has no holes (I3: rooms are only ever deleted whole), so the first and last
/// id of each epoch the room has ids in give its count: two index probes per such epoch (a
/// handful), never a walk over the messages.
fn message_count(mgc: &Connection, room_id: i64) -> Result<Option<(u64, i64)>> {
    use pchat_store::ids::{epoch_base, epoch_of, EPOCH_MAX, IDS_PER_EPOCH};
    let mut count = 0;
    let mut from = 1;
    let mut last = None;
    // One round per epoch the room holds ids of: bounded by the number of epochs.
    for _ in 0..=EPOCH_MAX {
        let Some((first, _)) = seq_bounds_in(mgc, room_id, from, SEQ_MAX)? else {
            break;
        };
        let end = (epoch_base(epoch_of(first)) + IDS_PER_EPOCH - 1).min(SEQ_MAX);
        let Some((first, hi)) = seq_bounds_in(mgc, room_id, first, end)? else {
            break;
        };
        count += (hi - first + 1) as u64;
        last = Some(hi);
        if end >= SEQ_MAX {
            break;
        }
        from = end + 1;
    }
    Ok(last.map(|l| (count, l)))
}

/// First and last sequence number of a room's archive, `None` when empty.
fn seq_bounds(mgc: &Connection, room_id: i64) -> Result<Option<(i64, i64)>> {
    seq_bounds_in(mgc, room_id, 1, SEQ_MAX)
}

/// First and last id of a room's messages within `from..=to`, `None` when there are none.
fn seq_bounds_in(mgc: &Connection, room_id: i64, from: i64, to: i64) -> Result<Option<(i64, i64)>> {
    let (lo, hi) = (message_key(room_id, from), message_key(room_id, to));
    let bounds: (Option<i64>, Option<i64>) = mgc
        // Two index probes. `SELECT min(id), max(id)` in one statement is not optimized by
        // SQLite and walked the room's whole key range (248 ms at 10^6 messages).
        .prepare_cached(
            "SELECT (SELECT id FROM message WHERE id BETWEEN ?1 AND ?2 ORDER BY id ASC LIMIT 1), \
                    (SELECT id FROM message WHERE id BETWEEN ?1 AND ?2 ORDER BY id DESC LIMIT 1)",
        )?
        .query_row([lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(match bounds {
        (Some(first), Some(last)) => Some((first & SEQ_MAX, last & SEQ_MAX)),
        _ => None,
    })
}

pub(crate) fn room_stats(conn: &mut ReadConn, room: &str) -> Result<RoomStats> {
    let tx = conn.mgc.transaction()?;
    let Some(id) = room_id(&tx, room)? else {
        return Ok(RoomStats::default());
    };
    let Some((messages, last)) = message_count(&tx, id)? else {
        return Ok(RoomStats::default());
    };
    let last_at: i64 = tx
        .prepare_cached("SELECT at FROM message WHERE id = ?1")?
        .query_row([message_key(id, last)], |r| r.get(0))?;
    Ok(RoomStats {
        messages,
        last_seq: last,
        last_at: Some(Timestamp(last_at)),
    })
}

const MESSAGE_COLUMNS: &str = "m.seq, m.at, m.sender, m.nick, m.origin_id, m.body, m.stanza";

fn message_from_row(room: &str, r: &Row<'_>) -> rusqlite::Result<ArchivedMessage> {
    Ok(ArchivedMessage {
        room: room.to_string(),
        seq: r.get(0)?,
        at: Timestamp(r.get(1)?),
        sender: r.get(2)?,
        nick: r.get(3)?,
        origin_id: r.get(4)?,
        body: r.get(5)?,
        stanza: r.get(6)?,
    })
}

pub(crate) fn archive_get(
    conn: &mut ReadConn,
    room: &str,
    seq: i64,
) -> Result<Option<ArchivedMessage>> {
    if !(1..=SEQ_MAX).contains(&seq) {
        return Ok(None);
    }
    let tx = conn.mgc.transaction()?;
    let Some(id) = room_id(&tx, room)? else {
        return Ok(None);
    };
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.id = ?1");
    let message = tx
        .prepare_cached(&sql)?
        .query_row([message_key(id, seq)], |r| message_from_row(room, r))
        .optional()?;
    Ok(message)
}

/// Turns user text into a safe FTS5 query: each whitespace-separated word becomes a quoted
/// string (internal quotes doubled), so no operator, column filter or prefix syntax can
/// come through; words are ANDed. Words without a letter or digit would tokenize to nothing
/// and are dropped. `None` when no word is left: such a query matches nothing.
pub(crate) fn fts_query(text: &str) -> Option<String> {
    let words: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '\0')
        .filter(|word| word.chars().any(char::is_alphanumeric))
        .map(|word| format!("\"{}\"", word.replace('"', "\"\"")))
        .collect();
    (!words.is_empty()).then(|| words.join(" AND "))
}

/// The SQL pieces of an archive query's filters, shared by its count and its page.
struct Filters {
    from: &'static str,
    /// What the count reads: the full-text index alone when nothing else filters, so that
    /// counting 10,000 matches does not fetch 10,000 messages.
    count_from: &'static str,
    key: &'static str,
    conditions: Vec<&'static str>,
    params: Vec<Value>,
}

impl Filters {
    fn new(room_id: i64, query: &ArchiveQuery, fts: Option<String>) -> Filters {
        let mut filters = match fts {
            // CROSS JOIN: drive from the full-text index (limited to the room's key range),
            // then fetch each matching message by key.
            Some(fts) => Filters {
                from: "message_fts CROSS JOIN message m ON m.id = message_fts.rowid",
                count_from: "message_fts",
                key: "message_fts.rowid",
                conditions: vec!["message_fts MATCH ?"],
                params: vec![Value::Text(fts)],
            },
            // No `room_id = ?` here: the key range alone selects the room, and lets SQLite
            // walk the rowid b-tree in order instead of sorting an index's rows.
            None => Filters {
                from: "message m",
                count_from: "message m",
                key: "m.id",
                conditions: Vec::new(),
                params: Vec::new(),
            },
        };
        let by_index = query.start.is_some() || query.end.is_some() || query.with_nick.is_some();
        if by_index {
            filters.count_from = filters.from;
            // Lets SQLite pick the (room_id, at) or (room_id, nick) index.
            filters.conditions.push("m.room_id = ?");
            filters.params.push(Value::Integer(room_id));
        }
        if let Some(start) = query.start {
            filters.conditions.push("m.at >= ?");
            filters.params.push(Value::Integer(start.0));
        }
        if let Some(end) = query.end {
            filters.conditions.push("m.at <= ?");
            filters.params.push(Value::Integer(end.0));
        }
        if let Some(nick) = &query.with_nick {
            filters.conditions.push("m.nick = ?");
            filters.params.push(Value::Text(nick.clone()));
        }
        filters
    }

    /// The WHERE clause and its parameters for a key range (archive keys of one room, in seq
    /// order).
    fn with_keys(&self, lo: i64, hi: i64) -> (String, Vec<Value>) {
        let mut params = self.params.clone();
        params.push(Value::Integer(lo));
        params.push(Value::Integer(hi));
        let mut conditions = self.conditions.join(" AND ");
        if !conditions.is_empty() {
            conditions.push_str(" AND ");
        }
        conditions.push_str(self.key);
        conditions.push_str(" BETWEEN ? AND ?");
        (conditions, params)
    }
}

pub(crate) fn archive_page(
    conn: &mut ReadConn,
    room: &str,
    query: &ArchiveQuery,
) -> Result<ArchivePage> {
    let empty = ArchivePage {
        messages: Vec::new(),
        complete: true,
        count: 0,
    };
    let fts = match &query.fulltext {
        Some(text) => match fts_query(text) {
            Some(fts) => Some(fts),
            None => return Ok(empty),
        },
        None => None,
    };
    let tx = conn.mgc.transaction()?;
    let Some(id) = room_id(&tx, room)? else {
        return Ok(empty);
    };
    let Some((first, last)) = seq_bounds(&tx, id)? else {
        return Ok(empty);
    };
    let filters = Filters::new(id, query, fts);
    let filtered = query.start.is_some()
        || query.end.is_some()
        || query.with_nick.is_some()
        || query.fulltext.is_some();

    let count = if filtered {
        let (conditions, params) = filters.with_keys(message_key(id, first), message_key(id, last));
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {conditions}",
            filters.count_from
        );
        let n: i64 = tx
            .prepare_cached(&sql)?
            .query_row(params_from_iter(params), |r| r.get(0))?;
        n as u64
    } else if pchat_store::ids::epoch_of(first) == pchat_store::ids::epoch_of(last) {
        // Gapless within an id epoch: no need to count a million rows for the latest page.
        (last - first + 1) as u64
    } else {
        message_count(&tx, id)?.map_or(0, |(n, _)| n)
    };

    // The RSM window: after_seq < seq < before_seq, clamped to the archive.
    let lo = query
        .after_seq
        .map_or(first, |after| after.saturating_add(1).max(first));
    let hi = query
        .before_seq
        .map_or(last, |before| before.saturating_sub(1).min(last));
    if lo > hi {
        return Ok(ArchivePage {
            messages: Vec::new(),
            complete: true,
            count,
        });
    }
    let limit = query.limit.min(ARCHIVE_PAGE_MAX) as usize;
    let (conditions, params) = filters.with_keys(message_key(id, lo), message_key(id, hi));
    let order = if query.from_end { "DESC" } else { "ASC" };
    // One row more than the page tells whether the window holds more in this direction.
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM {} WHERE {conditions} ORDER BY {} {order} LIMIT {}",
        filters.from,
        filters.key,
        limit + 1
    );
    let mut stmt = tx.prepare_cached(&sql)?;
    let mut messages = stmt
        .query_map(params_from_iter(params), |r| message_from_row(room, r))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let complete = messages.len() <= limit;
    messages.truncate(limit);
    if query.from_end {
        messages.reverse();
    }
    Ok(ArchivePage {
        messages,
        complete,
        count,
    })
}

/// The compliance export's state (read by the writer inside its transaction too).
pub(crate) fn export_state(comp: &Connection) -> Result<ExportState> {
    Ok(comp
        .prepare_cached(
            "SELECT watermark, pending_to, runs, finished_at FROM export_state WHERE id = 1",
        )?
        .query_row([], |r| {
            Ok(ExportState {
                watermark: r.get(0)?,
                pending_to: r.get(1)?,
                runs: r.get(2)?,
                finished_at: r.get::<_, Option<i64>>(3)?.map(Timestamp),
            })
        })
        .optional()?
        .unwrap_or_default())
}

/// [`export_state`] on a reader.
pub(crate) fn compliance_export_state(conn: &mut ReadConn) -> Result<ExportState> {
    export_state(&conn.comp)
}

/// Records after `after_id`, up to the first whose batch is not settled: settled means its
/// `mgc` transaction committed (`mgc`'s `writer_state`, read first) or it was marked
/// uncommitted (a failed batch, or one a crash cut off, found at open). A record of a batch
/// still in flight is not returned yet, nor anything after it, so an exporter never reports
/// a change as committed that a crash then undoes, nor pages past one that is late.
pub(crate) fn compliance_after(
    conn: &mut ReadConn,
    after_id: i64,
    limit: u32,
) -> Result<Vec<ComplianceRecord>> {
    let limit = limit.min(COMPLIANCE_PAGE_MAX);
    let settled: i64 = conn
        .mgc
        .prepare_cached("SELECT last_batch_id FROM writer_state WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    let mut stmt = conn.comp.prepare_cached(
        "SELECT id, kind, at, room, actor, nick, detail, message_seq, committed \
         FROM compliance WHERE id > ?1 AND id < coalesce((SELECT min(id) FROM compliance \
         WHERE id > ?1 AND batch_id > ?3 AND committed = 1), 9223372036854775807) \
         ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![after_id, limit, settled], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                NewComplianceEvent {
                    kind: ComplianceKind::Message, // replaced below, once the name is checked
                    at: Timestamp(r.get(2)?),
                    room: r.get(3)?,
                    actor: r.get(4)?,
                    nick: r.get(5)?,
                    detail: r.get(6)?,
                },
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, bool>(8)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(id, kind, mut event, message_seq, committed)| {
            event.kind = ComplianceKind::parse(&kind)
                .ok_or_else(|| corrupt(format!("compliance record {id}: unknown kind {kind:?}")))?;
            Ok(ComplianceRecord {
                id,
                event,
                message_seq,
                committed,
            })
        })
        .collect()
}

/// A PEP node's configuration.
pub(crate) fn pep_node(
    conn: &mut ReadConn,
    owner: &str,
    node: &str,
) -> Result<Option<pchat_store::PepNode>> {
    let row: Option<(String, i64)> = conn
        .mgc
        .prepare_cached("SELECT access, max_items FROM pep_node WHERE owner = ?1 AND node = ?2")?
        .query_row([owner, node], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(access, max)| pep_config(&access, max))
        .transpose()
}

/// What `pep_node` stores back into its type; an unknown value is corruption.
pub(crate) fn pep_config(access: &str, max_items: i64) -> Result<pchat_store::PepNode> {
    let access = pchat_store::PepAccess::parse(access).ok_or_else(|| {
        pchat_store::StoreError::Corrupt(format!("pep_node.access {access:?} is unknown"))
    })?;
    let max_items = u32::try_from(max_items).map_err(|_| {
        pchat_store::StoreError::Corrupt(format!("pep_node.max_items {max_items} out of range"))
    })?;
    Ok(pchat_store::PepNode { access, max_items })
}

/// The names of an owner's PEP nodes, sorted.
pub(crate) fn pep_nodes(conn: &mut ReadConn, owner: &str) -> Result<Vec<String>> {
    let names = conn
        .mgc
        .prepare_cached("SELECT node FROM pep_node WHERE owner = ?1 ORDER BY node")?
        .query_map([owner], |r| r.get(0))?
        .collect::<std::result::Result<Vec<String>, _>>()?;
    Ok(names)
}

/// A PEP node's items, oldest publication first.
pub(crate) fn pep_items(
    conn: &mut ReadConn,
    owner: &str,
    node: &str,
) -> Result<Vec<pchat_store::PepItem>> {
    let items = conn
        .mgc
        .prepare_cached(
            "SELECT item, payload, at FROM pep_item WHERE owner = ?1 AND node = ?2 ORDER BY seq",
        )?
        .query_map([owner, node], |r| {
            Ok(pchat_store::PepItem {
                id: r.get(0)?,
                payload: r.get(1)?,
                at: Timestamp(r.get(2)?),
            })
        })?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::fts_query;

    #[test]
    fn fulltext_queries_are_quoted_words() {
        let check = |text: &str, want: Option<&str>| {
            assert_eq!(fts_query(text).as_deref(), want, "{text:?}")
        };
        check("fox", Some("\"fox\""));
        check("  quick   fox ", Some("\"quick\" AND \"fox\""));
        check("say \"hi\"", Some("\"say\" AND \"\"\"hi\"\"\""));
        check("NEAR(a b)", Some("\"NEAR(a\" AND \"b)\""));
        check("star*", Some("\"star*\""));
        check("a\0b", Some("\"a\" AND \"b\""));
        check("% _ * \" 🎉", None);
        check("", None);
    }
}
