//! The portable archive (Lync's Export-/Import-CsPersistentChatData): users, rooms with their
//! configuration and affiliations, and every room's history, as JSON lines that any backend
//! can read back. It moves a standalone SQLite deployment into a PostgreSQL pool and back.
//!
//! Format: a header line, then per user a `{"user":…}` line followed by, for each of its PEP
//! nodes (XEP-0163: bookmarks, vCard, private XML storage, avatar, nickname…), a
//! `{"pep_node":…}` line and its `{"pep_item":…}` lines in publication order; then per room a `{"room":…}` line followed
//! by its `{"message":…}` lines in sequence order and, for each file shared in it, a
//! `{"file":…}` line followed by its `{"file_piece":…}` lines (base64, in order), then an
//! `{"end":…}` line with the counts and the SHA-256 of every line before it. Files never
//! posted in a room (an upload nobody was shown) are not carried. Import checks the whole file before it writes
//! anything, and is resumable: a room already imported is skipped, a room cut short
//! continues after its last message. Imported messages keep their ids and times; like any
//! append, each gets a compliance record. A user's PEP items are published again with their
//! ids, payloads and times (an item the target has with the same id is replaced; items only
//! the target has stay, within the node's `max_items`), so a re-run changes nothing.

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use base64::Engine as _;

use crate::{
    ids, ArchiveQuery, ArchivedMessage, FileFilter, FileRecord, NewMessage, PepAccess, PepItem,
    PepNode, Store, StoreError, UserRecord, Write, ARCHIVE_PAGE_MAX, FILE_CHUNK_BYTES,
    FILE_LIST_MAX, PEP_ITEMS_MAX,
};
use pchat_room::{RoomRecord, Timestamp};

/// Format version written in the header (2: files; 3: users' PEP nodes).
pub const FORMAT_VERSION: u32 = 3;
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
    PepNode(PepNodeLine),
    PepItem(PepItemLine),
    Room(RoomRecord),
    Message(ArchivedMessage),
    File(FileRecord),
    FilePiece(FilePiece),
    End(Totals),
}

/// One piece of a file's bytes.
#[derive(Serialize, Deserialize)]
struct FilePiece {
    id: String,
    index: u32,
    /// Standard base64.
    data: String,
}

/// One PEP node of a user, with its configuration.
#[derive(Serialize, Deserialize)]
struct PepNodeLine {
    owner: String,
    node: String,
    /// `pubsub#access_model` as stored (`whitelist` or `open`).
    access: String,
    max_items: u32,
}

/// One item of the PEP node before it.
#[derive(Serialize, Deserialize)]
struct PepItemLine {
    owner: String,
    node: String,
    id: String,
    /// The payload element, serialized.
    payload: String,
    at: Timestamp,
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
    /// Files shared in rooms (absent from format 1).
    #[serde(default)]
    pub files: u64,
    /// Users' PEP nodes (absent before format 3).
    #[serde(default)]
    pub pep_nodes: u64,
    /// Items in those nodes (absent before format 3).
    #[serde(default)]
    pub pep_items: u64,
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
            for node in store.pep_nodes(&jid).await? {
                let Some(config) = store.pep_node(&jid, &node).await? else {
                    continue; // deleted meanwhile
                };
                let items = store.pep_items(&jid, &node).await?;
                if items.is_empty() {
                    // A node is made by its first publication; one without items carries
                    // nothing a client would miss.
                    continue;
                }
                w.line(&Line::PepNode(PepNodeLine {
                    owner: jid.clone(),
                    node: node.clone(),
                    access: config.access.as_str().to_owned(),
                    max_items: config.max_items,
                }))?;
                totals.pep_nodes += 1;
                for item in items {
                    w.line(&Line::PepItem(PepItemLine {
                        owner: jid.clone(),
                        node: node.clone(),
                        id: item.id,
                        payload: item.payload,
                        at: item.at,
                    }))?;
                    totals.pep_items += 1;
                }
            }
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
        let files = store
            .file_list(&FileFilter {
                owner: None,
                room: Some(jid.clone()),
                limit: FILE_LIST_MAX,
            })
            .await?;
        if files.len() >= FILE_LIST_MAX as usize {
            return Err(PortableError::Invalid(format!(
                "room {jid} holds {FILE_LIST_MAX} files or more, more than one export carries: remove old ones (pchat file list/remove)"
            )));
        }
        for f in files.into_iter().filter(|f| f.sha256.is_some()) {
            let (id, pieces) = (f.id.clone(), f.size.div_ceil(FILE_CHUNK_BYTES as u64));
            w.line(&Line::File(f))?;
            for index in 0..u32::try_from(pieces).unwrap_or(u32::MAX) {
                let data = store.file_chunk_get(&id, index).await?.ok_or_else(|| {
                    PortableError::Invalid(format!("file {id} lacks its piece {index}"))
                })?;
                w.line(&Line::FilePiece(FilePiece {
                    id: id.clone(),
                    index,
                    data: base64::engine::general_purpose::STANDARD.encode(&data),
                }))?;
            }
            totals.files += 1;
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
    // The file being read: its id, room, size, the next piece and the bytes so far.
    let mut file: Option<(String, u64, u32, u64)> = None;
    let mut end = None;
    // The user whose PEP nodes may follow, and the node whose items may.
    let mut user: Option<String> = None;
    let mut node: Option<(String, String, u32, u32)> = None;
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
            Line::User(u) => {
                if room.is_some() {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: a user after the rooms began"
                    )));
                }
                seen.users += 1;
                user = Some(u.jid.clone());
                node = None;
            }
            Line::PepNode(p) => {
                if user.as_deref() != Some(p.owner.as_str()) {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: PEP node {} of {} does not follow its user",
                        p.node, p.owner
                    )));
                }
                if PepAccess::parse(&p.access).is_none()
                    || p.max_items == 0
                    || p.max_items > PEP_ITEMS_MAX
                {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: PEP node {} of {}: access model {:?} with max_items {} (whitelist or open, 1 to {PEP_ITEMS_MAX})",
                        p.node, p.owner, p.access, p.max_items
                    )));
                }
                seen.pep_nodes += 1;
                node = Some((p.owner.clone(), p.node.clone(), 0, p.max_items));
            }
            Line::PepItem(p) => {
                let Some((owner, name, items, max_items)) = node.as_mut() else {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: a PEP item before any PEP node"
                    )));
                };
                if p.owner != *owner || p.node != *name {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: PEP item {} of node {} of {} does not follow its node",
                        p.id, p.node, p.owner
                    )));
                }
                *items += 1;
                if *items > *max_items {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: node {name} of {owner} holds more than its {max_items} items"
                    )));
                }
                seen.pep_items += 1;
            }
            Line::Room(r) => {
                file_complete(file.take(), n)?;
                user = None;
                node = None;
                seen.rooms += 1;
                room = Some((r.jid.clone(), 0));
            }
            Line::File(f) => {
                file_complete(file.take(), n)?;
                let in_room = room.as_ref().map(|(jid, _)| jid.as_str());
                if f.room.as_deref() != in_room || in_room.is_none() || f.sha256.is_none() {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: file {} is not a finished file of the room before it",
                        f.id
                    )));
                }
                file = Some((f.id.clone(), f.size, 0, 0));
                seen.files += 1;
            }
            Line::FilePiece(p) => {
                let Some((id, _, next, bytes)) = file.as_mut() else {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: a file piece before any file"
                    )));
                };
                let len = base64::engine::general_purpose::STANDARD
                    .decode(&p.data)
                    .map_err(|e| PortableError::Invalid(format!("line {n}: {e}")))?
                    .len();
                if p.id != *id || p.index != *next || len > FILE_CHUNK_BYTES {
                    return Err(PortableError::Invalid(format!(
                        "line {n}: piece {} of file {} out of order (expected piece {next} of {id})",
                        p.index, p.id
                    )));
                }
                *next += 1;
                *bytes += len as u64;
            }
            Line::Message(m) => {
                file_complete(file.take(), n)?;
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
                file_complete(file.take(), n)?;
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

/// A file whose pieces ended at line `n` holds exactly its size.
fn file_complete(file: Option<(String, u64, u32, u64)>, n: usize) -> Result<(), PortableError> {
    match file {
        Some((id, size, _, bytes)) if size != bytes => Err(PortableError::Invalid(format!(
            "line {n}: file {id} holds {bytes} bytes, not its {size}"
        ))),
        _ => Ok(()),
    }
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
    // The file being imported and its hash (`None` while skipping one imported before).
    let mut file: Option<(FileRecord, Sha256)> = None;
    // The PEP node whose items are being published again.
    let mut node: Option<(String, String, PepNode)> = None;
    for line in input.lines() {
        let parsed: Line =
            serde_json::from_str(&line?).map_err(|e| PortableError::Invalid(e.to_string()))?;
        match parsed {
            Line::Header { id_epoch, .. } => epoch = epoch.max(id_epoch),
            Line::End(_) => finish_file(store, file.take()).await?,
            Line::File(f) => {
                flush(store, &mut batch, &mut want, room.as_ref()).await?;
                finish_file(store, file.take()).await?;
                done.files += 1;
                file = start_file(store, f).await?;
            }
            Line::FilePiece(p) => {
                if let Some((f, hash)) = &mut file {
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(&p.data)
                        .map_err(|e| PortableError::Invalid(e.to_string()))?;
                    hash.update(&data);
                    store.file_chunk_put(&f.id, p.index, data).await?;
                }
            }
            Line::User(u) => {
                store.user_put(u).await?;
                done.users += 1;
            }
            Line::PepNode(p) => {
                let access = PepAccess::parse(&p.access).ok_or_else(|| {
                    PortableError::Invalid(format!("access model {:?}", p.access))
                })?;
                let config = PepNode {
                    access,
                    max_items: p.max_items,
                };
                node = Some((p.owner, p.node, config));
                done.pep_nodes += 1;
            }
            Line::PepItem(p) => {
                let Some((owner, name, config)) = node.as_ref() else {
                    continue;
                };
                let item = PepItem {
                    id: p.id,
                    payload: p.payload,
                    at: p.at,
                };
                store.pep_publish(owner, name, *config, item).await?;
                done.pep_items += 1;
            }
            Line::Room(r) => {
                flush(store, &mut batch, &mut want, room.as_ref()).await?;
                finish_file(store, file.take()).await?;
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

/// Begins importing a file: `None` when the target has it finished already (an earlier,
/// interrupted run); an unfinished one of that run is started again.
async fn start_file(
    store: &dyn Store,
    f: FileRecord,
) -> Result<Option<(FileRecord, Sha256)>, PortableError> {
    match store.file_get(&f.id).await? {
        Some(have) if have.sha256.is_some() => return Ok(None),
        Some(_) => {
            store.file_remove(&f.id).await?;
        }
        None => {}
    }
    // A slot that lives long enough for the import (an expired one would be purged), with
    // no quota: the source already held these bytes.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let slot = FileRecord {
        room: None,
        sha256: None,
        expires_at: pchat_room::Timestamp(now.saturating_add(3_600_000_000)),
        ..f.clone()
    };
    store.file_create(&slot, u64::MAX).await?;
    Ok(Some((f, Sha256::new())))
}

/// Finishes an imported file with its recorded hash and binds it to its room.
async fn finish_file(
    store: &dyn Store,
    f: Option<(FileRecord, Sha256)>,
) -> Result<(), PortableError> {
    let Some((f, hash)) = f else {
        return Ok(());
    };
    let sha = hex(&hash.finalize());
    if f.sha256.as_deref() != Some(sha.as_str()) {
        return Err(PortableError::Invalid(format!(
            "file {} ({}) does not hash to its recorded SHA-256",
            f.id, f.name
        )));
    }
    store.file_finish(&f.id, &sha).await?;
    if let Some(room) = &f.room {
        store.file_bind(&f.id, &f.owner, room).await?;
    }
    Ok(())
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
