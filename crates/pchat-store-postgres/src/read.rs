//! Reads and the user-account writes, on pooled sessions outside the writer task.
//!
//! Each read that needs more than one fact (a page and its count, stats) is one SQL
//! statement, so it sees one snapshot without an explicit transaction.

use pchat_room::{RoomRecord, Timestamp};
use pchat_store::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceKind, ComplianceRecord, ExportState,
    NewComplianceEvent, RoomStats, ScramCredential, StoreError, UserRecord, ARCHIVE_PAGE_MAX,
    COMPLIANCE_PAGE_MAX,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::{corrupt, get, Result};
use crate::pool::PgConn;
use crate::writer::{batch_lock_key, BATCH_LOCK_CLASS, COMPLIANCE_ORDER_LOCK_CLASS};

fn iterations(row: &Row, index: usize) -> Result<u32> {
    let n: i64 = get(row, index)?;
    u32::try_from(n).map_err(|_| corrupt(format!("iteration count {n} out of range")))
}

pub(crate) async fn server_secret(conn: &mut PgConn) -> Result<Vec<u8>> {
    let row = conn
        .query_opt("SELECT secret FROM server_secret WHERE id = 1", &[])
        .await?;
    let secret: Option<Vec<u8>> = match row {
        Some(r) => Some(get(&r, 0)?),
        None => None,
    };
    match secret {
        Some(s) if s.len() == pchat_store::SERVER_SECRET_BYTES => Ok(s),
        // `pchat db install` makes it with the schema that holds it.
        _ => Err(corrupt(
            "database mgc has no valid server secret (table server_secret): run `pchat db install` \
             or restore a backup",
        )),
    }
}

pub(crate) async fn user_get(conn: &mut PgConn, jid: &str) -> Result<Option<UserRecord>> {
    let row = conn
        .query_opt(
            "SELECT jid, sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, \
             sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, created_at \
             FROM user_account WHERE jid = $1",
            &[&jid],
        )
        .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(UserRecord {
        jid: get(&r, 0)?,
        scram_sha1: ScramCredential {
            salt: get(&r, 1)?,
            iterations: iterations(&r, 2)?,
            stored_key: get(&r, 3)?,
            server_key: get(&r, 4)?,
        },
        scram_sha256: ScramCredential {
            salt: get(&r, 5)?,
            iterations: iterations(&r, 6)?,
            stored_key: get(&r, 7)?,
            server_key: get(&r, 8)?,
        },
        created_at: Timestamp(get(&r, 9)?),
    }))
}

/// The directory document and its revision (none saved: the default, revision 0).
pub(crate) async fn directory_get(conn: &mut PgConn) -> Result<pchat_store::StoredDirectory> {
    let row = conn
        .query_opt("SELECT revision, document FROM directory WHERE id = 1", &[])
        .await?;
    Ok(match row {
        None => pchat_store::StoredDirectory::default(),
        Some(row) => pchat_store::StoredDirectory {
            revision: get(&row, 0)?,
            directory: pchat_store::parse_directory(&get::<String>(&row, 1)?)?,
        },
    })
}

/// Keeps an invitation, and at most [`pchat_store::INVITATIONS_KEPT_MAX`] for the invitee.
pub(crate) async fn invitation_keep(conn: &mut PgConn, invitee: &str, stanza: &str) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    conn.execute(
        "INSERT INTO invitation (invitee, stanza, at) VALUES ($1, $2, $3)",
        &[&invitee, &stanza, &now],
    )
    .await?;
    conn.execute(
        "DELETE FROM invitation WHERE invitee = $1 AND id NOT IN \
         (SELECT id FROM invitation WHERE invitee = $1 ORDER BY id DESC LIMIT $2)",
        &[&invitee, &pchat_store::INVITATIONS_KEPT_MAX],
    )
    .await?;
    Ok(())
}

/// Keeps a `/rooms` session and at most [`pchat_store::WEB_SESSIONS_PER_USER_MAX`] of its
/// user's (the oldest go).
pub(crate) async fn web_session_put(
    conn: &mut PgConn,
    id: &str,
    s: &pchat_store::WebSession,
) -> Result<()> {
    conn.execute(
        "INSERT INTO web_session (id, username, created_at, seen_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO NOTHING",
        &[&id, &s.user, &s.created_at.0, &s.seen_at.0],
    )
    .await?;
    conn.execute(
        "DELETE FROM web_session WHERE username = $1 AND id NOT IN \
         (SELECT id FROM web_session WHERE username = $1 \
          ORDER BY created_at DESC, id LIMIT $2)",
        &[&s.user, &i64::from(pchat_store::WEB_SESSIONS_PER_USER_MAX)],
    )
    .await?;
    Ok(())
}

pub(crate) async fn web_session_get(
    conn: &mut PgConn,
    id: &str,
) -> Result<Option<pchat_store::WebSession>> {
    let row = conn
        .query_opt(
            "SELECT username, created_at, seen_at FROM web_session WHERE id = $1",
            &[&id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(pchat_store::WebSession {
        user: get(&row, 0)?,
        created_at: Timestamp(get(&row, 1)?),
        seen_at: Timestamp(get(&row, 2)?),
    }))
}

pub(crate) async fn web_session_touch(
    conn: &mut PgConn,
    id: &str,
    seen_at: Timestamp,
) -> Result<()> {
    conn.execute(
        "UPDATE web_session SET seen_at = greatest(seen_at, $2) WHERE id = $1",
        &[&id, &seen_at.0],
    )
    .await?;
    Ok(())
}

pub(crate) async fn web_session_remove(conn: &mut PgConn, id: &str) -> Result<bool> {
    Ok(conn
        .execute("DELETE FROM web_session WHERE id = $1", &[&id])
        .await?
        > 0)
}

pub(crate) async fn web_session_purge(
    conn: &mut PgConn,
    seen_before: Timestamp,
    created_before: Timestamp,
) -> Result<u64> {
    conn.execute(
        "DELETE FROM web_session WHERE seen_at < $1 OR created_at < $2",
        &[&seen_before.0, &created_before.0],
    )
    .await
}

/// Takes (deletes and returns) a user's kept invitations, oldest first: one statement, so a
/// login on another server at the same moment gets each invitation at most once.
pub(crate) async fn invitations_take(conn: &mut PgConn, invitee: &str) -> Result<Vec<String>> {
    let rows = conn
        .query(
            "DELETE FROM invitation WHERE invitee = $1 RETURNING id, stanza",
            &[&invitee],
        )
        .await?;
    let mut kept: Vec<(i64, String)> = rows
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
        .collect::<Result<_>>()?;
    kept.sort_by_key(|(id, _)| *id);
    Ok(kept.into_iter().map(|(_, s)| s).collect())
}

/// The directory's revision (0: none saved).
pub(crate) async fn directory_revision(conn: &mut PgConn) -> Result<i64> {
    let row = conn
        .query_one(
            "SELECT coalesce(max(revision), 0)::bigint FROM directory",
            &[],
        )
        .await?;
    get(&row, 0)
}

/// Compare-and-set of the directory in one statement: two administrators never both win.
/// The statement also tells every server (`*:d` on the rooms' channel) when it commits.
pub(crate) async fn directory_put(conn: &mut PgConn, document: &str, revision: i64) -> Result<i64> {
    let row = if revision == 0 {
        conn.query_opt(
            "WITH saved AS (INSERT INTO directory (id, revision, document) VALUES (1, 1, $1) \
             ON CONFLICT (id) DO NOTHING RETURNING revision) \
             SELECT revision, pg_notify($2, '*:d') FROM saved",
            &[&document, &crate::NOTIFY_CHANNEL],
        )
        .await?
    } else {
        conn.query_opt(
            "WITH saved AS (UPDATE directory SET revision = revision + 1, document = $1 \
             WHERE id = 1 AND revision = $2 RETURNING revision) \
             SELECT revision, pg_notify($3, '*:d') FROM saved",
            &[&document, &revision, &crate::NOTIFY_CHANNEL],
        )
        .await?
    };
    match row {
        Some(row) => get(&row, 0),
        None => {
            let current = directory_revision(conn).await?;
            Err(StoreError::Conflict(format!(
                "the directory is at revision {current}, not {revision}: it changed meanwhile; \
                 read it again and retry"
            ))
            .into())
        }
    }
}

pub(crate) async fn user_put(conn: &mut PgConn, user: &UserRecord) -> Result<()> {
    if user.jid.is_empty() {
        return Err(StoreError::Invalid("a user needs a JID".into()).into());
    }
    let (a, b) = (&user.scram_sha1, &user.scram_sha256);
    conn.execute(
        "INSERT INTO user_account (jid, sha1_salt, sha1_iterations, sha1_stored_key, \
         sha1_server_key, sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (jid) DO UPDATE SET sha1_salt = EXCLUDED.sha1_salt, \
         sha1_iterations = EXCLUDED.sha1_iterations, sha1_stored_key = EXCLUDED.sha1_stored_key, \
         sha1_server_key = EXCLUDED.sha1_server_key, sha256_salt = EXCLUDED.sha256_salt, \
         sha256_iterations = EXCLUDED.sha256_iterations, \
         sha256_stored_key = EXCLUDED.sha256_stored_key, \
         sha256_server_key = EXCLUDED.sha256_server_key, created_at = EXCLUDED.created_at",
        &[
            &user.jid,
            &a.salt,
            &i64::from(a.iterations),
            &a.stored_key,
            &a.server_key,
            &b.salt,
            &i64::from(b.iterations),
            &b.stored_key,
            &b.server_key,
            &user.created_at.0,
        ],
    )
    .await?;
    Ok(())
}

/// One statement: the account and its PEP nodes (their items go with them) together.
pub(crate) async fn user_remove(conn: &mut PgConn, jid: &str) -> Result<bool> {
    let row = conn
        .query_one(
            "WITH pep AS (DELETE FROM pep_node WHERE owner = $1), \
             gone AS (DELETE FROM user_account WHERE jid = $1 RETURNING 1) \
             SELECT count(*) FROM gone",
            &[&jid],
        )
        .await?;
    Ok(get::<i64>(&row, 0)? > 0)
}

/// One statement, so it is atomic without a transaction and safe to send again: the node
/// made or reconfigured (its row lock orders publications to one node across servers), the
/// item put as the newest, the oldest beyond `max_items` removed. (The statement's parts see
/// the table as it was before it, so the trim keeps `max_items - 1` of the other items.)
pub(crate) async fn pep_publish(
    conn: &mut PgConn,
    owner: &str,
    node: &str,
    config: pchat_store::PepNode,
    item: &pchat_store::PepItem,
) -> Result<()> {
    let max_items = i32::try_from(config.max_items).unwrap_or(i32::MAX);
    conn.execute(
        "WITH n AS (INSERT INTO pep_node (owner, node, access, max_items) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (owner, node) DO UPDATE SET access = EXCLUDED.access, \
         max_items = EXCLUDED.max_items RETURNING owner), \
         i AS (INSERT INTO pep_item (owner, node, item, payload, at, seq) \
         SELECT $1, $2, $5, $6, $7, nextval('pep_item_seq') FROM n \
         ON CONFLICT (owner, node, item) DO UPDATE SET payload = EXCLUDED.payload, \
         at = EXCLUDED.at, seq = EXCLUDED.seq RETURNING item) \
         DELETE FROM pep_item WHERE owner = $1 AND node = $2 AND item <> $5 AND seq NOT IN \
         (SELECT seq FROM pep_item WHERE owner = $1 AND node = $2 AND item <> $5 \
         ORDER BY seq DESC LIMIT $4 - 1)",
        &[
            &owner,
            &node,
            &config.access.as_str(),
            &max_items,
            &item.id,
            &item.payload,
            &item.at.0,
        ],
    )
    .await?;
    Ok(())
}

/// A PEP node's configuration.
pub(crate) async fn pep_node(
    conn: &mut PgConn,
    owner: &str,
    node: &str,
) -> Result<Option<pchat_store::PepNode>> {
    let row = conn
        .query_opt(
            "SELECT access, max_items FROM pep_node WHERE owner = $1 AND node = $2",
            &[&owner, &node],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let access: String = get(&row, 0)?;
    let max_items: i32 = get(&row, 1)?;
    let access = pchat_store::PepAccess::parse(&access)
        .ok_or_else(|| StoreError::Corrupt(format!("pep_node.access {access:?} is unknown")))?;
    let max_items = u32::try_from(max_items)
        .map_err(|_| StoreError::Corrupt(format!("pep_node.max_items {max_items} out of range")))?;
    Ok(Some(pchat_store::PepNode { access, max_items }))
}

/// The names of an owner's PEP nodes, sorted.
pub(crate) async fn pep_nodes(conn: &mut PgConn, owner: &str) -> Result<Vec<String>> {
    conn.query(
        "SELECT node FROM pep_node WHERE owner = $1 ORDER BY node",
        &[&owner],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect()
}

/// A PEP node's items, oldest publication first.
pub(crate) async fn pep_items(
    conn: &mut PgConn,
    owner: &str,
    node: &str,
) -> Result<Vec<pchat_store::PepItem>> {
    conn.query(
        "SELECT item, payload, at FROM pep_item WHERE owner = $1 AND node = $2 ORDER BY seq",
        &[&owner, &node],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(pchat_store::PepItem {
            id: get(r, 0)?,
            payload: get(r, 1)?,
            at: pchat_room::Timestamp(get(r, 2)?),
        })
    })
    .collect()
}

/// Removes one item (`Some`) or the node with its items (`None`).
pub(crate) async fn pep_remove(
    conn: &mut PgConn,
    owner: &str,
    node: &str,
    item: Option<&str>,
) -> Result<bool> {
    let n = match item {
        Some(item) => {
            conn.execute(
                "DELETE FROM pep_item WHERE owner = $1 AND node = $2 AND item = $3",
                &[&owner, &node, &item],
            )
            .await?
        }
        None => {
            conn.execute(
                "DELETE FROM pep_node WHERE owner = $1 AND node = $2",
                &[&owner, &node],
            )
            .await?
        }
    };
    Ok(n > 0)
}

pub(crate) async fn user_list(conn: &mut PgConn) -> Result<Vec<String>> {
    conn.query("SELECT jid FROM user_account ORDER BY jid", &[])
        .await?
        .iter()
        .map(|r| get(r, 0))
        .collect()
}

fn parse_room(jid: &str, json: &str) -> Result<RoomRecord> {
    serde_json::from_str(json).map_err(|e| corrupt(format!("room {jid}: unreadable record: {e}")))
}

pub(crate) async fn room_list(conn: &mut PgConn) -> Result<Vec<RoomRecord>> {
    conn.query("SELECT jid, record FROM room ORDER BY jid", &[])
        .await?
        .iter()
        .map(|r| parse_room(get(r, 0)?, get(r, 1)?))
        .collect()
}

pub(crate) async fn room_get(conn: &mut PgConn, jid: &str) -> Result<Option<RoomRecord>> {
    let row = conn
        .query_opt("SELECT record FROM room WHERE jid = $1", &[&jid])
        .await?;
    row.map(|r| parse_room(jid, get(&r, 0)?)).transpose()
}

pub(crate) async fn room_load(
    conn: &mut PgConn,
    jid: &str,
) -> Result<Option<pchat_store::StoredRoom>> {
    let row = conn
        .query_opt("SELECT record, revision FROM room WHERE jid = $1", &[&jid])
        .await?;
    row.map(|r| {
        Ok(pchat_store::StoredRoom {
            record: parse_room(jid, get(&r, 0)?)?,
            revision: get(&r, 1)?,
        })
    })
    .transpose()
}

pub(crate) async fn room_stats(conn: &mut PgConn, room: &str) -> Result<RoomStats> {
    // The room's own count rather than count(*): one row beats counting a million, and ids
    // are no count once an id epoch made them jump (pchat_store::ids).
    let row = conn
        .query_opt(
            "SELECT r.message_count, r.last_seq, \
             (SELECT m.at FROM message m WHERE m.room_id = r.id AND m.seq = r.last_seq) \
             FROM room r WHERE r.jid = $1",
            &[&room],
        )
        .await?;
    let Some(row) = row else {
        return Ok(RoomStats::default());
    };
    let (count, last, at): (i64, i64, Option<i64>) = (get(&row, 0)?, get(&row, 1)?, get(&row, 2)?);
    if count == 0 {
        return Ok(RoomStats::default());
    }
    Ok(RoomStats {
        messages: u64::try_from(count).map_err(|_| corrupt(format!("message count {count}")))?,
        last_seq: last,
        last_at: at.map(Timestamp),
    })
}

/// The id epoch in force ([`pchat_store::ids`]).
pub(crate) async fn id_epoch(conn: &mut PgConn) -> Result<u64> {
    let row = conn
        .query_one("SELECT epoch FROM id_epoch WHERE id = 1", &[])
        .await?;
    let epoch: i64 = get(&row, 0)?;
    u64::try_from(epoch).map_err(|_| corrupt(format!("id epoch {epoch}")))
}

/// Raises the id epoch (never lowers it); returns the epoch in force.
pub(crate) async fn raise_id_epoch(conn: &mut PgConn, epoch: u64) -> Result<u64> {
    pchat_store::ids::check_epoch(epoch)?;
    let wanted = i64::try_from(epoch).map_err(|_| corrupt(format!("id epoch {epoch}")))?;
    let row = conn
        .query_one(
            "UPDATE id_epoch SET epoch = greatest(epoch, $1) WHERE id = 1 RETURNING epoch",
            &[&wanted],
        )
        .await?;
    let now: i64 = get(&row, 0)?;
    u64::try_from(now).map_err(|_| corrupt(format!("id epoch {now}")))
}

const MESSAGE_COLUMNS: &str = "m.seq, m.at, m.sender, m.nick, m.origin_id, m.body, m.stanza";

/// An archived message from the 7 columns of [`MESSAGE_COLUMNS`] starting at `first`.
fn message_from_row(room: &str, row: &Row, first: usize) -> Result<ArchivedMessage> {
    Ok(ArchivedMessage {
        room: room.to_string(),
        seq: get(row, first)?,
        at: Timestamp(get(row, first + 1)?),
        sender: get(row, first + 2)?,
        nick: get(row, first + 3)?,
        origin_id: get(row, first + 4)?,
        body: get(row, first + 5)?,
        stanza: get(row, first + 6)?,
    })
}

pub(crate) async fn archive_get(
    conn: &mut PgConn,
    room: &str,
    seq: i64,
) -> Result<Option<ArchivedMessage>> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM message m JOIN room r ON r.id = m.room_id \
         WHERE r.jid = $1 AND m.seq = $2"
    );
    let row = conn.query_opt(&sql, &[&room, &seq]).await?;
    row.map(|r| message_from_row(room, &r, 0)).transpose()
}

/// Cleans user text for `plainto_tsquery`, which already treats every character as plain
/// text and ANDs the words: only NUL (which PostgreSQL text cannot hold) must go. `None`
/// when no letter or digit is left: such a query matches nothing.
pub(crate) fn fulltext_text(text: &str) -> Option<String> {
    let cleaned = text.replace('\0', " ");
    cleaned
        .chars()
        .any(char::is_alphanumeric)
        .then_some(cleaned)
}

/// An archive page and its count in one statement (one snapshot, one round trip):
///
/// ```sql
/// WITH r AS (SELECT id FROM room WHERE jid = $1)
/// SELECT c.n, p.* FROM (SELECT <count> AS n) c
/// LEFT JOIN LATERAL (SELECT ... ORDER BY seq LIMIT k + 1) p ON true
/// ```
///
/// The count row stands alone (page columns NULL) when the page is empty.
pub(crate) async fn archive_page(
    conn: &mut PgConn,
    room: &str,
    query: &ArchiveQuery,
) -> Result<ArchivePage> {
    let fulltext = match &query.fulltext {
        Some(text) => match fulltext_text(text) {
            Some(text) => Some(text),
            None => {
                return Ok(ArchivePage {
                    messages: Vec::new(),
                    complete: true,
                    count: 0,
                })
            }
        },
        None => None,
    };
    let limit = query.limit.min(ARCHIVE_PAGE_MAX);
    // One row more than the page tells whether the window holds more in this direction.
    let fetch = i64::from(limit) + 1;

    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&room];
    let mut filters = String::new();
    let start = query.start.map(|t| t.0);
    let end = query.end.map(|t| t.0);
    if let Some(start) = &start {
        params.push(start);
        filters.push_str(&format!(" AND m.at >= ${}", params.len()));
    }
    if let Some(end) = &end {
        params.push(end);
        filters.push_str(&format!(" AND m.at <= ${}", params.len()));
    }
    if let Some(nick) = &query.with_nick {
        params.push(nick);
        filters.push_str(&format!(" AND m.nick = ${}", params.len()));
    }
    if let Some(text) = &fulltext {
        params.push(text);
        filters.push_str(&format!(
            " AND m.body_tsv @@ plainto_tsquery('simple', ${})",
            params.len()
        ));
    }
    let count = if filters.is_empty() {
        // The room's own count: no need to count a million rows for the latest page.
        "SELECT coalesce((SELECT message_count FROM room WHERE id = (SELECT id FROM r)), 0)"
            .to_string()
    } else {
        format!("SELECT count(*) FROM message m WHERE m.room_id = (SELECT id FROM r){filters}")
    };
    let mut window = String::new();
    if let Some(after) = &query.after_seq {
        params.push(after);
        window.push_str(&format!(" AND m.seq > ${}", params.len()));
    }
    if let Some(before) = &query.before_seq {
        params.push(before);
        window.push_str(&format!(" AND m.seq < ${}", params.len()));
    }
    params.push(&fetch);
    let order = if query.from_end { "DESC" } else { "ASC" };
    let sql = format!(
        "WITH r AS (SELECT id FROM room WHERE jid = $1) \
         SELECT c.n, p.* FROM ({count}) AS c(n) \
         LEFT JOIN LATERAL (SELECT {MESSAGE_COLUMNS} FROM message m \
             WHERE m.room_id = (SELECT id FROM r){filters}{window} \
             ORDER BY m.seq {order} LIMIT ${}) AS p ON true",
        params.len()
    );
    let rows = conn.query(&sql, &params).await?;
    let count: i64 = match rows.first() {
        Some(row) => get(row, 0)?,
        None => 0,
    };
    let mut messages = Vec::with_capacity(rows.len());
    for row in &rows {
        if get::<Option<i64>>(row, 1)?.is_some() {
            messages.push(message_from_row(room, row, 1)?);
        }
    }
    let limit = limit as usize;
    let complete = messages.len() <= limit;
    messages.truncate(limit);
    if query.from_end {
        messages.reverse();
    }
    Ok(ArchivePage {
        messages,
        complete,
        count: u64::try_from(count).unwrap_or(0),
    })
}

/// A compliance page as stored in mgccomp, before `committed` is known.
pub(crate) struct StoredRecord {
    pub(crate) record: ComplianceRecord,
    pub(crate) batch_id: i64,
}

pub(crate) async fn compliance_page(
    comp: &mut PgConn,
    after_id: i64,
    limit: u32,
) -> Result<Vec<StoredRecord>> {
    let limit = i64::from(limit.min(COMPLIANCE_PAGE_MAX));
    let rows = comp
        .query(
            "SELECT id, batch_id, kind, at, room, actor, nick, detail, message_seq \
             FROM compliance WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after_id, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let id: i64 = get(r, 0)?;
            let kind: String = get(r, 2)?;
            let kind = ComplianceKind::parse(&kind)
                .ok_or_else(|| corrupt(format!("compliance record {id}: unknown kind {kind:?}")))?;
            Ok(StoredRecord {
                batch_id: get(r, 1)?,
                record: ComplianceRecord {
                    id,
                    event: NewComplianceEvent {
                        kind,
                        at: Timestamp(get(r, 3)?),
                        room: get(r, 4)?,
                        actor: get(r, 5)?,
                        nick: get(r, 6)?,
                        detail: get(r, 7)?,
                    },
                    message_seq: get(r, 8)?,
                    committed: false,
                },
            })
        })
        .collect()
}

/// Which of `batches` (sorted, distinct) committed in mgc: a compliance record is committed
/// exactly when its batch id is in `applied_batch`. A batch whose records are visible but
/// which is not applied yet may be in flight (its writer holds the batch's advisory lock
/// from before its compliance COMMIT to the end of its mgc transaction): wait for that
/// lock, then look again, so that an exporter never reports a record uncommitted a moment
/// before it commits. A batch whose writer died has no lock holder and stays uncommitted
/// for good. Returns the applied ones, sorted.
pub(crate) async fn applied(mgc: &mut PgConn, batches: &[i64]) -> Result<Vec<i64>> {
    let mut applied = applied_batches(mgc, batches).await?;
    let pending: Vec<i64> = batches
        .iter()
        .copied()
        .filter(|b| applied.binary_search(b).is_err())
        .collect();
    if !pending.is_empty() {
        let keys: Vec<i32> = pending.iter().map(|b| batch_lock_key(*b)).collect();
        // Each lock is released at the end of this statement (its own transaction); the
        // next statement then sees whatever the writers committed.
        mgc.execute(
            "SELECT pg_advisory_xact_lock_shared($1::int4, k) FROM unnest($2::int4[]) AS k",
            &[&BATCH_LOCK_CLASS, &keys],
        )
        .await?;
        applied.extend(applied_batches(mgc, &pending).await?);
        applied.sort_unstable();
    }
    Ok(applied)
}

async fn applied_batches(mgc: &mut PgConn, batches: &[i64]) -> Result<Vec<i64>> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    let mut applied = mgc
        .query(
            "SELECT batch_id FROM applied_batch WHERE batch_id = ANY($1)",
            &[&batches],
        )
        .await?
        .iter()
        .map(|r| get(r, 0))
        .collect::<Result<Vec<i64>>>()?;
    applied.sort_unstable();
    Ok(applied)
}

/// Publishes (or, with `None`, withdraws) an occupant's presence and wakes the other servers,
/// in one statement: the change and its notification commit together, so listeners hear of
/// changes in the order they were made.
///
/// The commit is asynchronous (`synchronous_commit = off` for this transaction alone):
/// presence is not data. Committing transactions that NOTIFY take one database-wide lock
/// in turn, and holding it through a WAL flush serialized every join of the pool behind the
/// disk. A database crash may forget the last few ms of presence changes: the other
/// servers then show those occupants as they were until they change presence again.
pub(crate) async fn presence_put(
    conn: &mut PgConn,
    room: &str,
    server: &str,
    nick: &str,
    stanza: Option<&str>,
) -> Result<()> {
    let payload = presence_payload(room, server, nick, stanza);
    presence_write(conn, room, server, nick, stanza, &payload).await
}

/// Withdraws an occupant's presence like [`presence_put`] with `None`, the notification
/// carrying the presence that showed it leaving (see [`leave_payload`]).
pub(crate) async fn presence_leave(
    conn: &mut PgConn,
    room: &str,
    server: &str,
    nick: &str,
    last: &str,
) -> Result<()> {
    let payload = leave_payload(room, server, nick, last);
    presence_write(conn, room, server, nick, None, &payload).await
}

async fn presence_write(
    conn: &mut PgConn,
    room: &str,
    server: &str,
    nick: &str,
    stanza: Option<&str>,
    payload: &str,
) -> Result<()> {
    match stanza {
        Some(stanza) => {
            conn.query(
                "WITH put AS (INSERT INTO occupant_presence (room, nick, server, stanza) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (room, nick, server) \
                 DO UPDATE SET stanza = EXCLUDED.stanza, updated_at = now()), \
                 lazy AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 SELECT pg_notify($5, $6) FROM lazy",
                &[
                    &room,
                    &nick,
                    &server,
                    &stanza,
                    &crate::NOTIFY_CHANNEL,
                    &payload,
                ],
            )
            .await?;
        }
        None => {
            conn.query(
                "WITH gone AS (DELETE FROM occupant_presence \
                 WHERE room = $1 AND nick = $2 AND server = $3), \
                 lazy AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 SELECT pg_notify($4, $5) FROM lazy",
                &[&room, &nick, &server, &crate::NOTIFY_CHANNEL, &payload],
            )
            .await?;
        }
    }
    Ok(())
}

/// PostgreSQL refuses notification payloads of 8,000 bytes or more.
const PAYLOAD_MAX: usize = 7_999;

/// The notification of a PEP change: `'<owner>:u'` and the change as JSON on a second line;
/// `None` when it would not fit a notification (names of thousands of bytes).
pub(crate) fn pep_payload(event: &pchat_store::PepEvent) -> Option<String> {
    let json = serde_json::to_string(event).ok()?;
    let payload = format!("{}:u\n{json}", event.owner);
    (payload.len() <= PAYLOAD_MAX).then_some(payload)
}

/// Sends a PEP change's notification ([`pep_payload`]); nothing when it would not fit (the
/// owner's other sessions then see the change at their next read of the node).
pub(crate) async fn pep_announce(conn: &mut PgConn, event: &pchat_store::PepEvent) -> Result<()> {
    let Some(payload) = pep_payload(event) else {
        tracing::warn!(owner = %event.owner, node = %event.node, "a PEP change too large to announce to the pool");
        return Ok(());
    };
    conn.execute(
        "SELECT pg_notify($1, $2)",
        &[&crate::NOTIFY_CHANNEL, &payload.as_str()],
    )
    .await?;
    Ok(())
}

/// `room:p`, then on lines of their own the server and the stanza's length in bytes (`-`
/// when withdrawn), then the stanza and the nick (neither a room JID nor a server name holds
/// a line break; the nick is whatever follows the stanza). Without the stanza (length `?`)
/// when it would not fit in a notification, and `room:p` alone, asking for a full re-read,
/// when not even the names would.
pub(crate) fn presence_payload(
    room: &str,
    server: &str,
    nick: &str,
    stanza: Option<&str>,
) -> String {
    if server.contains('\n') || room.contains('\n') {
        return format!("{room}:p");
    }
    let with_stanza = match stanza {
        Some(st) => format!("{room}:p\n{server}\n{}\n{st}{nick}", st.len()),
        None => format!("{room}:p\n{server}\n-\n{nick}"),
    };
    if with_stanza.len() <= PAYLOAD_MAX {
        return with_stanza;
    }
    let named = format!("{room}:p\n{server}\n?\n{nick}");
    if named.len() <= PAYLOAD_MAX {
        named
    } else {
        format!("{room}:p")
    }
}

/// A withdrawal with the presence that showed the occupant leaving: as [`presence_payload`]
/// with the length written `-N`; a plain withdrawal (`-`) when it would not fit.
pub(crate) fn leave_payload(room: &str, server: &str, nick: &str, last: &str) -> String {
    if server.contains('\n') || room.contains('\n') {
        return format!("{room}:p");
    }
    let with_last = format!("{room}:p\n{server}\n-{}\n{last}{nick}", last.len());
    if with_last.len() <= PAYLOAD_MAX {
        with_last
    } else {
        presence_payload(room, server, nick, None)
    }
}

/// Every published presence of a room, by nick.
pub(crate) async fn presence_list(
    conn: &mut PgConn,
    room: &str,
) -> Result<Vec<pchat_store::SharedPresence>> {
    let rows = conn
        .query(
            "SELECT nick, server, stanza FROM occupant_presence WHERE room = $1 ORDER BY nick, server",
            &[&room],
        )
        .await?;
    shared_presences(&rows)
}

/// The published presences of a room among `who`.
pub(crate) async fn presence_get(
    conn: &mut PgConn,
    room: &str,
    who: &[pchat_store::PresenceKey],
) -> Result<Vec<pchat_store::SharedPresence>> {
    let servers: Vec<&str> = who.iter().map(|k| k.server.as_str()).collect();
    let nicks: Vec<&str> = who.iter().map(|k| k.nick.as_str()).collect();
    let rows = conn
        .query(
            "SELECT p.nick, p.server, p.stanza FROM unnest($2::text[], $3::text[]) AS k(server, nick) \
             JOIN occupant_presence p ON p.room = $1 AND p.server = k.server AND p.nick = k.nick",
            &[&room, &servers, &nicks],
        )
        .await?;
    shared_presences(&rows)
}

fn shared_presences(rows: &[tokio_postgres::Row]) -> Result<Vec<pchat_store::SharedPresence>> {
    rows.iter()
        .map(|r| {
            Ok(pchat_store::SharedPresence {
                nick: get(r, 0)?,
                server: get(r, 1)?,
                stanza: get(r, 2)?,
            })
        })
        .collect()
}

/// Withdraws everything `server` published and wakes the rooms concerned.
pub(crate) async fn presence_forget_server(conn: &mut PgConn, server: &str) -> Result<()> {
    let rows = conn
        .query(
            "DELETE FROM occupant_presence WHERE server = $1 RETURNING room",
            &[&server],
        )
        .await?;
    let mut rooms: Vec<String> = rows.iter().map(|r| get(r, 0)).collect::<Result<_>>()?;
    rooms.sort();
    rooms.dedup();
    let payloads: Vec<String> = rooms.iter().map(|r| format!("{r}:p")).collect();
    if !payloads.is_empty() {
        conn.query(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
            &[&crate::NOTIFY_CHANNEL, &payloads],
        )
        .await?;
    }
    Ok(())
}

fn export_state_of(row: &Row) -> Result<ExportState> {
    Ok(ExportState {
        watermark: get(row, 0)?,
        pending_to: get(row, 1)?,
        runs: get(row, 2)?,
        finished_at: get::<Option<i64>>(row, 3)?.map(Timestamp),
    })
}

pub(crate) async fn export_state(comp: &mut PgConn) -> Result<ExportState> {
    let row = comp
        .query_opt(
            "SELECT watermark, pending_to, runs, finished_at FROM export_state WHERE id = 1",
            &[],
        )
        .await?;
    match row {
        Some(r) => export_state_of(&r),
        None => Ok(ExportState::default()),
    }
}

/// Moves the export state from `from` to `to` in one transaction, recording the run. The
/// run's record takes the compliance order lock like every writer, so ids still commit in
/// increasing order; its batch id is 0, which no writer uses.
pub(crate) async fn export_step(
    comp: &mut PgConn,
    from: &ExportState,
    to: &ExportState,
    run: Option<&NewComplianceEvent>,
) -> Result<()> {
    comp.batch("BEGIN ISOLATION LEVEL READ COMMITTED").await?;
    let done = async {
        let moved = comp
            .execute(
                "UPDATE export_state SET watermark = $1, pending_to = $2, runs = $3, \
                 finished_at = $4 WHERE id = 1 AND watermark = $5 \
                 AND pending_to IS NOT DISTINCT FROM $6 AND runs = $7",
                &[
                    &to.watermark,
                    &to.pending_to,
                    &to.runs,
                    &to.finished_at.map(|t| t.0),
                    &from.watermark,
                    &from.pending_to,
                    &from.runs,
                ],
            )
            .await?;
        if moved != 1 {
            let now = export_state(comp).await?;
            return Err(StoreError::Conflict(format!(
                "the compliance export moved meanwhile (watermark {}, not {}): another \
                 exporter runs; read it again",
                now.watermark, from.watermark
            ))
            .into());
        }
        if let Some(e) = run {
            comp.execute(
                "SELECT pg_advisory_xact_lock($1::int4, 0)",
                &[&COMPLIANCE_ORDER_LOCK_CLASS],
            )
            .await?;
            comp.execute(
                "INSERT INTO compliance (batch_id, kind, at, room, actor, nick, detail, message_seq) \
                 VALUES (0, $1, $2, $3, $4, $5, $6, NULL)",
                &[&e.kind.as_str(), &e.at.0, &e.room, &e.actor, &e.nick, &e.detail],
            )
            .await?;
        }
        Ok::<_, crate::error::Error>(())
    }
    .await;
    match done {
        Ok(()) => {
            comp.batch("COMMIT").await?;
            Ok(())
        }
        Err(e) => {
            let _ = comp.batch("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Deletes at most `limit` exported records recorded before `before`, oldest first.
pub(crate) async fn compliance_purge(
    comp: &mut PgConn,
    before: Timestamp,
    limit: u32,
) -> Result<u64> {
    comp.execute(
        "DELETE FROM compliance WHERE id IN (SELECT id FROM compliance \
         WHERE id <= (SELECT watermark FROM export_state WHERE id = 1) AND at < $1 \
         ORDER BY id LIMIT $2)",
        &[&before.0, &i64::from(limit)],
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::fulltext_text;

    #[test]
    fn fulltext_text_is_plain() {
        let check = |text: &str, want: Option<&str>| {
            assert_eq!(fulltext_text(text).as_deref(), want, "{text:?}")
        };
        check("fox", Some("fox"));
        check("a\0b", Some("a b"));
        check("NEAR(a b)", Some("NEAR(a b)"));
        check("% _ * \" 🎉", None);
        check("", None);
        check("\0", None);
    }
}
