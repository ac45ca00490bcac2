//! The portable archive (Lync's Export-/Import-CsPersistentChatData): users, rooms with their
//! configuration and affiliations, and every room's history, as JSON lines that any backend
//! can read back. It moves a standalone SQLite deployment into a PostgreSQL pool and back.
//!
//! Format: a header line, then `{"user":…}` lines, then per room a `{"room":…}` line followed
//! by its `{"message":…}` lines in sequence order, then an `{"end":…}` line with the counts
//! and the SHA-256 of every line before it. Import checks the whole file before it writes
//! anything, and is resumable: a room already imported is skipped, a room cut short
//! continues after its last message. Imported messages keep their ids and times; like any
//! append, each gets a compliance record.

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    ids, ArchiveQuery, ArchivedMessage, NewMessage, Store, StoreError, UserRecord, Write,
    ARCHIVE_PAGE_MAX,
};
use pchat_room::RoomRecord;

/// Format version written in the header.
pub const FORMAT_VERSION: u32 = 1;
/// Messages appended per commit during import.
const IMPORT_BATCH_MESSAGES: usize = 500;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Header {
        pchat_export: u32,
        /// The source's id epoch ([`crate::ids`]); an import raises the target to it, so ids
        /// the target hands out afterwards stay above every id the source handed out.
        #[serde(default)]
        id_epoch: u64,
    },
    User(UserRecord),
    Room(RoomRecord),
    Message(ArchivedMessage),
    End(Totals),
}

/// What an archive holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// User accounts.
    pub users: u64,
    /// Rooms.
    pub rooms: u64,
    /// Messages.
    pub messages: u64,
    /// Hex SHA-256 of every line before the end line (each with its newline).
    pub sha256: String,
}

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum PortableError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is not a complete, intact pchat archive.
    #[error("not a valid pchat archive: {0}")]
    Invalid(String),
    /// The target already holds different data for a room.
    #[error("{0}")]
    Conflict(String),
}

/// Progress callback: (messages done, messages total or 0 when unknown).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

struct Hashing<W: std::io::Write> {
    out: W,
    hash: Sha256,
}

impl<W: std::io::Write> Hashing<W> {
    fn line(&mut self, line: &Line) -> Result<(), PortableError> {
        let mut bytes =
            serde_json::to_vec(line).map_err(|e| PortableError::Invalid(e.to_string()))?;
        bytes.push(b'\n');
        self.hash.update(&bytes);
        self.out.write_all(&bytes)?;
        Ok(())
    }
}

/// Writes the whole store to `out`.
pub async fn export<W: std::io::Write>(
    store: &dyn Store,
    out: W,
    progress: Progress<'_>,
) -> Result<Totals, PortableError> {
    let mut w = Hashing {
        out,
        hash: Sha256::new(),
    };
    let mut totals = Totals::default();
    w.line(&Line::Header {
        pchat_export: FORMAT_VERSION,
        id_epoch: store.id_epoch().await?,
    })?;
    for jid in store.user_list().await? {
        if let Some(u) = store.user_get(&jid).await? {
            w.line(&Line::User(u))?;
            totals.users += 1;
        }
    }
    let rooms = store.room_list().await?;
    let mut total_messages = 0;
    for r in &rooms {
        total_messages += store.room_stats(&r.jid).await?.messages;
    }
    for r in rooms {
        let jid = r.jid.clone();
        w.line(&Line::Room(r))?;
        totals.rooms += 1;
        let mut after = None;
        loop {
            let q = ArchiveQuery {
                after_seq: after,
                limit: ARCHIVE_PAGE_MAX,
                ..ArchiveQuery::default()
            };
            let page = store.archive_page(&jid, &q).await?;
            let Some(last) = page.messages.last().map(|m| m.seq) else {
                break;
            };
            for m in page.messages {
                w.line(&Line::Message(m))?;
                totals.messages += 1;
            }
            progress(totals.messages, total_messages);
            after = Some(last);
        }
    }
    totals.sha256 = hex(&w.hash.clone().finalize());
    w.line(&Line::End(totals.clone()))?;
    w.out.flush()?;
    Ok(totals)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a whole archive without writing anything: format, order, counts and checksum.
pub fn verify<R: BufRead>(input: R) -> Result<Totals, PortableError> {
    let mut hash = Sha256::new();
    let mut seen = Totals::default();
    let mut room: Option<(String, i64)> = None;
    let mut end = None;
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let n = i + 1;
        if end.is_some() {
            return Err(PortableError::Invalid(format!(
                "line {n}: data after the end line"
            )));
        }
        let parsed: Line = serde_json::from_str(&line)
            .map_err(|e| PortableError::Invalid(format!("line {n}: {e}")))?;
        match &parsed {
            Line::Header { pchat_export, .. } if n == 1 => {
                if *pchat_export > FORMAT_VERSION {
                    return Err(PortableError::Invalid(format!(
                        "format version {pchat_export} is newer than this pchat reads ({FORMAT_VERSION}): upgrade pchat"
                    )));
                }
            }
            _ if n == 1 => {
                return Err(PortableError::Invalid(
                    "line 1: no pchat export header".into(),
                ))
            }
            Line::Header { .. } => {
                return Err(PortableError::Invalid(format!("line {n}: a second header")))
            }
            Line::User(_) => seen.users += 1,
            Line::Room(r) => {
                seen.rooms += 1;
                room = Some((r.jid.clone(), 0));
            }
            Line::Message(m) => {
                let Some((jid, last)) = room.as_mut() else {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: a message before any room"
                    )));
                };
                // Ids count up by one, but for the jump of an id epoch the source entered,
                // which lands on the first id of that epoch.
                let next = *last + 1;
                let jump = ids::epoch_of(m.seq) > ids::epoch_of(next)
                    && m.seq == ids::epoch_base(ids::epoch_of(m.seq)) + 1;
                if m.room != *jid || (m.seq != next && !jump) {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: message {} of {} out of order (expected {next} of {jid}, or the first id of a later id epoch)",
                        m.seq,
                        m.room,
                    )));
                }
                *last = m.seq;
                seen.messages += 1;
            }
            Line::End(t) => {
                end = Some(t.clone());
                continue;
            }
        }
        hash.update(line.as_bytes());
        hash.update(b"\n");
    }
    let end =
        end.ok_or_else(|| PortableError::Invalid("no end line: the file is truncated".into()))?;
    seen.sha256 = hex(&hash.finalize());
    if seen != end {
        return Err(PortableError::Invalid(format!(
            "contents do not match the end line (read {seen:?}, recorded {end:?}): the file is damaged"
        )));
    }
    Ok(end)
}

/// Imports a verified archive (call [`verify`] first on the same file).
pub async fn import<R: BufRead>(
    store: &dyn Store,
    input: R,
    total: u64,
    progress: Progress<'_>,
) -> Result<Totals, PortableError> {
    let mut done = Totals::default();
    // The room being imported and how far the target already has it.
    let mut room: Option<(String, i64)> = None;
    // The batch and the id each of its messages had in the source.
    let mut batch: Vec<Write> = Vec::new();
    let mut want: Vec<i64> = Vec::new();
    // The newest id epoch of the source: its own, or that of its newest ids.
    let mut epoch = 0;
    for line in input.lines() {
        let parsed: Line =
            serde_json::from_str(&line?).map_err(|e| PortableError::Invalid(e.to_string()))?;
        match parsed {
            Line::Header { id_epoch, .. } => epoch = epoch.max(id_epoch),
            Line::End(_) => {}
            Line::User(u) => {
                store.user_put(u).await?;
                done.users += 1;
            }
            Line::Room(r) => {
                flush(store, &mut batch, &mut want, room.as_ref()).await?;
                let have = store.room_stats(&r.jid).await?.last_seq;
                if store.room_get(&r.jid).await?.is_none() {
                    store.commit(vec![Write::PutRoom(r.clone())]).await?;
                }
                room = Some((r.jid, have));
                done.rooms += 1;
            }
            Line::Message(m) => {
                done.messages += 1;
                let Some((_, have)) = room.as_ref() else {
                    continue;
                };
                if m.seq <= *have {
                    // Already imported by an earlier, interrupted run.
                    continue;
                }
                let id_epoch = ids::epoch_of(m.seq);
                epoch = epoch.max(id_epoch);
                want.push(m.seq);
                batch.push(Write::AppendMessage(NewMessage {
                    room: m.room,
                    at: m.at,
                    sender: m.sender,
                    nick: m.nick,
                    origin_id: m.origin_id,
                    // Exported messages are numbered: a resumed import skips by number.
                    idempotency_key: None,
                    record_revision: None,
                    // Numbered in the epoch it had: the archive keeps its ids across jumps.
                    id_epoch: Some(id_epoch),
                    body: m.body,
                    stanza: m.stanza,
                }));
                if batch.len() >= IMPORT_BATCH_MESSAGES {
                    flush(store, &mut batch, &mut want, room.as_ref()).await?;
                    progress(done.messages, total);
                }
            }
        }
    }
    flush(store, &mut batch, &mut want, room.as_ref()).await?;
    // New ids of the target stay above every id the source handed out.
    store.raise_id_epoch(epoch).await?;
    progress(done.messages, total);
    Ok(done)
}

/// Commits a batch of imported messages and checks that each got the id it had.
async fn flush(
    store: &dyn Store,
    batch: &mut Vec<Write>,
    want: &mut Vec<i64>,
    room: Option<&(String, i64)>,
) -> Result<(), PortableError> {
    if batch.is_empty() {
        return Ok(());
    }
    let writes = std::mem::take(batch);
    let want = std::mem::take(want);
    let outcomes = store.commit(writes).await?;
    for (o, expected) in outcomes.iter().zip(&want) {
        if let crate::WriteOutcome::Appended { seq, duplicate } = o {
            if *duplicate || seq != expected {
                let jid = room.map(|r| r.0.as_str()).unwrap_or_default();
                return Err(PortableError::Conflict(format!(
                    "room {jid} in the target already holds different history (message {seq}); import into empty databases"
                )));
            }
        }
    }
    Ok(())
}
