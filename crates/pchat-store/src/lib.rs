//! Storage for pchat in domain words. Two databases, as in Lync: `mgc` (users, rooms, archive)
//! and `mgccomp` (compliance events). Backends (`pchat-store-sqlite`, `pchat-store-postgres`)
//! own their SQL and migrations and must pass the conformance suite in [`testing`].
//!
//! The one durable write path is [`Store::commit`]: a batch of [`Write`]s that the backend makes
//! durable (group commit across concurrent callers) before it returns. For every batch the
//! compliance records are made durable in `mgccomp` *before* the `mgc` changes, so that no
//! event can ever be visible (which happens only after `commit` returns) without its compliance
//! record, whatever instant a crash hits.
#![warn(missing_docs)]

use async_trait::async_trait;
use pchat_room::directory::Directory;
use pchat_room::{RoomEvent, RoomRecord, Timestamp};
use serde::{Deserialize, Serialize};

/// The compliance events the store records are the room domain's (the pure MUC mapping names
/// them in its effects without depending on storage); they are part of this API too.
pub use pchat_room::{ComplianceKind, NewComplianceEvent};

pub mod ids;
pub mod portable;

#[cfg(feature = "testing")]
pub mod testing;

/// What went wrong in the store, in terms of what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now; retry later or elsewhere. Nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The write conflicts with the current state (e.g. the room already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The data on disk is inconsistent or unreadable: stop and alert an operator.
    #[error("store corrupt: {0}")]
    Corrupt(String),
    /// The request itself is invalid (e.g. a limit out of range).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Invitations kept per user for its next login at most (the oldest go first).
pub const INVITATIONS_KEPT_MAX: i64 = 50;

/// Most items one PEP node keeps ([`PepNode::max_items`] is capped here): a user's bookmarks
/// (XEP-0402, one item per room) are the largest node clients make.
pub const PEP_ITEMS_MAX: u32 = 1000;

/// Who may read a PEP node (XEP-0060 `pubsub#access_model`, as far as a server without
/// rosters can honour it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PepAccess {
    /// `whitelist`: the owner only (bookmarks, private data).
    Owner,
    /// `open`, `presence`, `roster`: every user of this server (avatars, nicknames). pchat
    /// keeps no rosters, so presence subscribers are everyone who can see the user in a room.
    Users,
}

impl PepAccess {
    /// The `pubsub#access_model` value it is stored and reported as.
    pub fn as_str(self) -> &'static str {
        match self {
            PepAccess::Owner => "whitelist",
            PepAccess::Users => "open",
        }
    }

    /// From a `pubsub#access_model` value; `authorize` (and unknown models) is refused.
    pub fn parse(model: &str) -> Option<PepAccess> {
        match model {
            "whitelist" => Some(PepAccess::Owner),
            "open" | "presence" | "roster" => Some(PepAccess::Users),
            _ => None,
        }
    }
}

/// A PEP node's configuration (XEP-0163 on the user's account).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PepNode {
    /// Who may read its items.
    pub access: PepAccess,
    /// Items kept; the oldest go first (at most [`PEP_ITEMS_MAX`]).
    pub max_items: u32,
}

/// One item of a PEP node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PepItem {
    /// The item id (XEP-0402: the room's JID).
    pub id: String,
    /// The payload element, serialized.
    pub payload: String,
    /// When it was last published.
    pub at: Timestamp,
}

/// Length of [`Store::server_secret`]: the output size of HMAC-SHA-256, which it keys.
pub const SERVER_SECRET_BYTES: usize = 32;

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// SCRAM credentials for one hash function (RFC 5802): never the password itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    /// Random salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// H(ClientKey).
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

/// A logged-in session of the room management page (`/rooms`). Kept in `mgc` so that every
/// server of a pool serves its requests (no sticky load balancer needed) and a logout holds
/// on all of them. Stored under the SHA-256 of the cookie's token, never the token itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebSession {
    /// The user's bare JID.
    pub user: String,
    /// When it was made (login).
    pub created_at: Timestamp,
    /// When it was last used (updated at most once a minute).
    pub seen_at: Timestamp,
}

/// Sessions one user keeps at most; a new login beyond it ends the oldest.
pub const WEB_SESSIONS_PER_USER_MAX: u32 = 20;

/// A local user account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Bare JID, normalized lower-case (`alice@localhost`).
    pub jid: String,
    /// SCRAM-SHA-1 credentials.
    pub scram_sha1: ScramCredential,
    /// SCRAM-SHA-256 credentials.
    pub scram_sha256: ScramCredential,
    /// Creation time.
    pub created_at: Timestamp,
}

/// A groupchat message to be archived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    /// Bare room JID.
    pub room: String,
    /// Time the room accepted it.
    pub at: Timestamp,
    /// Sender's real bare JID.
    pub sender: String,
    /// Sender's nick in the room.
    pub nick: String,
    /// XEP-0359 origin-id chosen by the client, used to drop resends.
    pub origin_id: Option<String>,
    /// A key the server gave the message when it entered the room, for messages without an
    /// origin-id: a commit retried after its outcome was unknown (the connection was lost
    /// after COMMIT was sent) finds the message stored and stores nothing twice. Unique per
    /// room, whoever the sender; not part of the archived message.
    pub idempotency_key: Option<String>,
    /// The revision of the room record ([`StoredRoom::revision`]) under which the room
    /// accepted the message. When the stored record has changed since (another server of a
    /// pool banned the sender, made the room moderated…), nothing is written and the outcome
    /// is [`WriteOutcome::Stale`]: no message is ever stored on the authority of a record
    /// that no longer holds. The batch's own room saves do not count (the room decided them
    /// together). `None`: not checked (imports, tools).
    pub record_revision: Option<i64>,
    /// The id epoch ([`ids`]) the message was numbered in where it comes from (`pchat data
    /// import`): when it is above the database's, the room's ids jump to that epoch's base
    /// as if the database had been raised to it, so an imported archive keeps its ids.
    /// `None`: the database's epoch (every message a room accepts).
    pub id_epoch: Option<u64>,
    /// Plain body text, for full-text search; `None` for body-less messages.
    pub body: Option<String>,
    /// The message as reflected to occupants (serialized XML, `from` = room/nick, no `to`,
    /// no stanza-id: those are added on delivery).
    pub stanza: String,
}

/// A message in the archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedMessage {
    /// Bare room JID.
    pub room: String,
    /// Per-room sequence number: the XEP-0359 stanza-id and MAM id. Increasing, from 1 and
    /// without holes within one id epoch; a failover or restore starts the room's next ids
    /// above the new epoch's base ([`ids`]), so an id is never handed out twice.
    pub seq: i64,
    /// Time the room accepted it.
    pub at: Timestamp,
    /// Sender's real bare JID.
    pub sender: String,
    /// Sender's nick.
    pub nick: String,
    /// Client origin-id, if any.
    pub origin_id: Option<String>,
    /// Plain body text.
    pub body: Option<String>,
    /// Serialized message as reflected.
    pub stanza: String,
}

/// A recorded compliance event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplianceRecord {
    /// Increasing id in `mgccomp`.
    pub id: i64,
    /// The event.
    pub event: NewComplianceEvent,
    /// For messages: the archive sequence number it was given.
    pub message_seq: Option<i64>,
    /// False when the event was recorded but the `mgc` change never committed (a crash hit
    /// between the two commits); such an event was never visible to anyone.
    pub committed: bool,
}

/// Where the compliance export stands (Lync's `tblComplianceState`), kept in `mgccomp`: one
/// row, changed only by [`Store::compliance_export_step`] (a compare-and-set), so two
/// exporters can never both advance it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportState {
    /// Every record with an id up to this one was exported (0: none yet).
    pub watermark: i64,
    /// A run that began and did not finish exports exactly the records after `watermark` up
    /// to this id: whoever runs next writes the same files again, so a crash at any step
    /// leaves neither a gap nor a duplicate.
    pub pending_to: Option<i64>,
    /// Runs finished.
    pub runs: i64,
    /// When the last run finished.
    pub finished_at: Option<Timestamp>,
}

/// Bytes in one stored piece of a file ([`Store::file_chunk_put`]): what an upload buffers
/// before it writes, and what one download read returns at most.
pub const FILE_CHUNK_BYTES: usize = 256 * 1024;

/// Most files one [`Store::file_list`] call returns.
pub const FILE_LIST_MAX: u32 = 10_000;

/// A file posted through the HTTP upload service (XEP-0363), kept in `mgc` beside the archive
/// so that everything that carries the archive (mirroring, log shipping, backups, failover)
/// carries the files with it. Its bytes are stored in pieces of at most [`FILE_CHUNK_BYTES`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// 32 lowercase hex characters (128 random bits): the secret part of its URLs.
    pub id: String,
    /// Bare JID of the user who asked for the upload slot.
    pub owner: String,
    /// The room it was posted in: `None` until its owner first posts a message naming its URL
    /// in a room ([`Store::file_bind`]); downloads follow that room's rules from then on.
    pub room: Option<String>,
    /// The file's name as its owner gave it.
    pub name: String,
    /// Its media type as its owner declared it.
    pub content_type: String,
    /// Its size in bytes, as declared for the slot; a finished file holds exactly this many.
    pub size: u64,
    /// When the slot was given.
    pub created_at: Timestamp,
    /// The upload must be finished before this time; an unfinished file older than it is
    /// purged ([`Store::file_purge_unfinished`]).
    pub expires_at: Timestamp,
    /// Hex SHA-256 of the content once the upload is finished ([`Store::file_finish`]);
    /// `None` while it is being uploaded (such a file is never served).
    pub sha256: Option<String>,
}

/// What [`Store::file_create`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileCreated {
    /// The slot exists.
    Created,
    /// The owner's files (finished ones and slots not yet expired) would exceed its quota:
    /// it holds `used` bytes. Nothing was written.
    OverQuota {
        /// Bytes the owner holds now.
        used: u64,
    },
}

/// Which files [`Store::file_list`] returns; every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileFilter {
    /// Only this owner's files.
    pub owner: Option<String>,
    /// Only the files posted in this room.
    pub room: Option<String>,
    /// At most this many (capped at [`FILE_LIST_MAX`]; 0 means the cap), oldest first.
    pub limit: u32,
}

/// The directory (groups and categories: [`pchat_room::directory`]) as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredDirectory {
    /// The document; [`Directory::default`] when none was ever saved.
    pub directory: Directory,
    /// Rises by one with every save; 0 when none was ever saved.
    pub revision: i64,
}

/// A room's record as stored, with its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRoom {
    /// The record.
    pub record: RoomRecord,
    /// Rises by one with every save of the room's record ([`Write::PutRoom`],
    /// [`Write::PutRoomIf`]; 1 when created; a room
    /// deleted and created again starts again at 1). What [`NewMessage::record_revision`]
    /// is checked against.
    pub revision: i64,
}

/// One durable change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Create or replace a room's record (config, affiliations, voice list, subject); the
    /// outcome is [`WriteOutcome::Saved`] with the record's new revision.
    PutRoom(RoomRecord),
    /// The same, only if the stored record is still at `revision` (0: only if the room does
    /// not exist), counting the batch's earlier saves. Otherwise the whole batch fails with
    /// [`StoreError::Conflict`] and changes nothing: a server of a pool never overwrites a
    /// change it has not seen (a ban made on another server a moment ago).
    PutRoomIf {
        /// The new record.
        record: RoomRecord,
        /// The revision it replaces.
        revision: i64,
    },
    /// Delete a room's record, its archive and the files posted in it from `mgc` (compliance
    /// keeps its events).
    /// Deleting a room that does not exist changes nothing and is not an error, so that a
    /// retried delete succeeds.
    DeleteRoom {
        /// Bare room JID.
        room: String,
    },
    /// Append a message to its room's archive. The store assigns the next sequence number,
    /// and records a `Message` compliance event for it. When an archived message of the same
    /// room has the same `(sender, origin_id)`, or the same idempotency key, nothing is
    /// written and the outcome names it. When its record revision no longer holds, nothing
    /// is written and the outcome is [`WriteOutcome::Stale`].
    /// The room must exist when the write is reached (a save earlier in the same batch
    /// counts); otherwise the whole batch fails with [`StoreError::Invalid`] and changes nothing.
    AppendMessage(NewMessage),
    /// Replace an archived message (content control: Lync's Remove-CsPersistentChatMessage,
    /// XEP-0425 moderation): its stanza and body become `stanza` and `body` (a tombstone, or
    /// an administrator's replacement text); its id, time, sender and nick stay, and full-text
    /// search no longer finds the old body. The compliance record of the message keeps the
    /// original. Outcome: [`WriteOutcome::Removed`] with 1, or 0 when the room holds no
    /// message with that id (nothing is written).
    RemoveMessage {
        /// Bare room JID.
        room: String,
        /// The message's id.
        seq: i64,
        /// What the archive shows instead (serialized XML, as [`NewMessage::stanza`]).
        stanza: String,
        /// Its body text, for search; `None` for a tombstone.
        body: Option<String>,
    },
    /// Delete a room's archived messages, and the files posted in it, from before `before`
    /// (Lync's Clear-CsPersistentChatRoom); their ids are never handed out again, and
    /// compliance keeps their records. Outcome: [`WriteOutcome::Removed`] with the number deleted.
    ClearHistory {
        /// Bare room JID.
        room: String,
        /// Messages accepted before this time go.
        before: Timestamp,
    },
    /// Record a compliance event.
    Compliance(NewComplianceEvent),
    /// Tell the other servers of a pool about a room, if and only if the batch commits
    /// ([`TickKind::Event`]). Nothing is stored; single-server backends ignore it.
    Announce {
        /// Bare room JID.
        room: String,
        /// What happened.
        event: RoomEvent,
    },
}

/// Refuses a batch that would store a character XML 1.0 forbids (NUL, other control
/// characters but tab, line feed and carriage return, U+FFFE, U+FFFF) in any of its text:
/// archived stanzas, bodies, nicks, JIDs, compliance details and every string of a room
/// record. Such a character makes every XML parser that receives it drop its stream, so a
/// stored one would break every client that joins the room; and PostgreSQL cannot store NUL
/// at all. Both backends call this before anything else, so such a batch fails alone with
/// [`StoreError::Invalid`] and the other batches of its group commit are untouched. The
/// stream framer refuses these characters already; this guards the other ways in (`pchat data
/// import`, the shell).
pub fn check_storable(writes: &[Write]) -> StoreResult<()> {
    fn text(what: &str, room: &str, value: &str) -> StoreResult<()> {
        match value.chars().find(|&c| !is_xml_char(c)) {
            None => Ok(()),
            Some(c) => Err(StoreError::Invalid(format!(
                "{what} of a write to {} contains U+{:04X}{}, a character XML does not allow: \
                 it cannot be stored",
                room.escape_debug(),
                u32::from(c),
                if c == '\0' { " (NUL)" } else { "" }
            ))),
        }
    }
    fn json(room: &str, value: &serde_json::Value) -> StoreResult<()> {
        match value {
            serde_json::Value::String(s) => text("the room record", room, s),
            serde_json::Value::Array(items) => items.iter().try_for_each(|v| json(room, v)),
            serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                text("the room record", room, k)?;
                json(room, v)
            }),
            _ => Ok(()),
        }
    }
    for write in writes {
        match write {
            Write::PutRoom(record) | Write::PutRoomIf { record, .. } => {
                text("the room JID", &record.jid, &record.jid)?;
                let value = serde_json::to_value(record).map_err(|e| {
                    StoreError::Invalid(format!("room record of {}: {e}", record.jid))
                })?;
                json(&record.jid, &value)?;
            }
            Write::DeleteRoom { room } | Write::ClearHistory { room, .. } => {
                text("the room JID", room, room)?
            }
            Write::RemoveMessage {
                room, stanza, body, ..
            } => {
                text("the room JID", room, room)?;
                text("the stanza", room, stanza)?;
                text("the body", room, body.as_deref().unwrap_or(""))?;
            }
            Write::AppendMessage(m) => {
                text("the room JID", &m.room, &m.room)?;
                text("the sender", &m.room, &m.sender)?;
                text("the nick", &m.room, &m.nick)?;
                text(
                    "the origin-id",
                    &m.room,
                    m.origin_id.as_deref().unwrap_or(""),
                )?;
                text(
                    "the idempotency key",
                    &m.room,
                    m.idempotency_key.as_deref().unwrap_or(""),
                )?;
                text("the body", &m.room, m.body.as_deref().unwrap_or(""))?;
                text("the stanza", &m.room, &m.stanza)?;
            }
            Write::Compliance(e) => {
                text("the room JID", &e.room, &e.room)?;
                text("the actor", &e.room, &e.actor)?;
                text("the nick", &e.room, e.nick.as_deref().unwrap_or(""))?;
                text("the detail", &e.room, &e.detail)?;
            }
            // Carried as a notification, where JSON escapes any character; a server that
            // relays the event to clients writes XML, which replaces what XML forbids.
            Write::Announce { .. } => {}
        }
    }
    Ok(())
}

/// True for a character in XML 1.0's `Char` production (a `char` is never a surrogate).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{fffd}' | '\u{10000}'..)
}

/// What a [`Write`] did, in the same position as the write in its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The change is durable.
    Done,
    /// The message is durable under `seq`; `duplicate` when it was already archived and this
    /// write changed nothing (`seq` is then the original's).
    Appended {
        /// Archive sequence number.
        seq: i64,
        /// The origin-id or idempotency key was seen before.
        duplicate: bool,
    },
    /// The room's record is durable with this revision.
    Saved {
        /// The record's new [`StoredRoom::revision`].
        revision: i64,
    },
    /// The message was not written: the room's record changed after the revision the room
    /// accepted it under. Read the record again and decide again.
    Stale,
    /// Archived messages removed or replaced ([`Write::RemoveMessage`],
    /// [`Write::ClearHistory`]).
    Removed {
        /// How many.
        messages: u64,
    },
}

/// A page request on a room's archive (MAM, history on join, CLI).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveQuery {
    /// Only messages at or after this time.
    pub start: Option<Timestamp>,
    /// Only messages at or before this time.
    pub end: Option<Timestamp>,
    /// Only messages from this nick.
    pub with_nick: Option<String>,
    /// Only messages whose sequence number is greater than this (RSM `after`).
    pub after_seq: Option<i64>,
    /// Only messages whose sequence number is less than this (RSM `before`).
    pub before_seq: Option<i64>,
    /// Full-text search terms (XEP-0431); words are ANDed, matched case-insensitively against
    /// whole words of message bodies. The text is plain words, never a query language: quotes,
    /// `*`, `AND`, `NEAR(` and the like are searched for as words or ignored as punctuation.
    /// Text without any letter or digit matches nothing.
    pub fulltext: Option<String>,
    /// Page size; the backend caps it at [`ARCHIVE_PAGE_MAX`].
    pub limit: u32,
    /// Take the page from the newest end (RSM `<before/>` with no id, or `before_seq`).
    /// Messages in the page are always returned oldest first.
    pub from_end: bool,
}

/// Largest page any archive query returns.
pub const ARCHIVE_PAGE_MAX: u32 = 1000;

/// Most compliance records one [`Store::compliance_after`] call returns, whatever its `limit`:
/// a consumer pages on until it gets an empty answer.
pub const COMPLIANCE_PAGE_MAX: u32 = 10_000;

/// One page of the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchivePage {
    /// Messages, oldest first.
    pub messages: Vec<ArchivedMessage>,
    /// True when no more messages match beyond this page in the direction of travel (towards
    /// older messages for `from_end` pages, newer ones otherwise), within the `after_seq` /
    /// `before_seq` window.
    pub complete: bool,
    /// Total number of messages matching the filters (ignoring after/before and limit).
    pub count: u64,
}

/// Per-room archive statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomStats {
    /// Number of archived messages.
    pub messages: u64,
    /// Highest sequence number (0 when empty).
    pub last_seq: i64,
    /// Time of the newest message.
    pub last_at: Option<Timestamp>,
}

/// The storage interface every backend implements.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Makes a batch of writes durable, compliance first, and returns one outcome per write.
    /// Concurrent calls are grouped into shared transactions by the backend. The batch is
    /// atomic within each database.
    async fn commit(&self, writes: Vec<Write>) -> StoreResult<Vec<WriteOutcome>>;

    /// The server secret: [`SERVER_SECRET_BYTES`] random bytes made once per `mgc` database
    /// (when it is installed or first opened) and then never changed, so every server of a
    /// pool reads the same one and a restart keeps it. It keys what must look the same from
    /// every server yet cannot be computed from outside, such as the made-up SCRAM salt of a
    /// user name that has no account.
    async fn server_secret(&self) -> StoreResult<Vec<u8>>;

    /// Creates or replaces a user.
    async fn user_put(&self, user: UserRecord) -> StoreResult<()>;
    /// Looks a user up by bare JID.
    async fn user_get(&self, jid: &str) -> StoreResult<Option<UserRecord>>;
    /// Removes a user; false when there was none.
    async fn user_remove(&self, jid: &str) -> StoreResult<bool>;
    /// Every user's bare JID, sorted.
    async fn user_list(&self) -> StoreResult<Vec<String>>;

    /// Every room record, sorted by JID.
    async fn room_list(&self) -> StoreResult<Vec<RoomRecord>>;
    /// One room record.
    async fn room_get(&self, room: &str) -> StoreResult<Option<RoomRecord>>;
    /// One room record with its revision.
    async fn room_load(&self, room: &str) -> StoreResult<Option<StoredRoom>>;
    /// Archive statistics of a room.
    async fn room_stats(&self, room: &str) -> StoreResult<RoomStats>;

    /// A page of a room's archive.
    async fn archive_page(&self, room: &str, query: &ArchiveQuery) -> StoreResult<ArchivePage>;
    /// One archived message by sequence number.
    async fn archive_get(&self, room: &str, seq: i64) -> StoreResult<Option<ArchivedMessage>>;

    /// The database's id epoch ([`ids`]): every room's next id is above
    /// [`ids::epoch_base`] of it. 0 for a database that was never raised.
    async fn id_epoch(&self) -> StoreResult<u64>;
    /// Raises the id epoch to `epoch`, never lowering it, and returns the epoch now in force.
    /// Whoever makes a database writable again from an earlier point (a DR failover, a
    /// forced mirror failover, a restore) raises it to an epoch no database has used, before
    /// any server writes to it. Refuses an epoch beyond [`ids::EPOCH_MAX`] (`Invalid`).
    async fn raise_id_epoch(&self, epoch: u64) -> StoreResult<u64>;

    /// The directory: groups and categories, with its revision.
    async fn directory_get(&self) -> StoreResult<StoredDirectory>;
    /// Only the directory's revision: what every server reads often to learn of a change.
    async fn directory_revision(&self) -> StoreResult<i64>;
    /// Saves the directory if the stored one is still at `revision` (0: never saved) and
    /// returns the new revision. A directory that does not validate is `Invalid`; one changed
    /// meanwhile (another administrator's command) is `Conflict` and nothing is written.
    async fn directory_put(&self, directory: &Directory, revision: i64) -> StoreResult<i64>;

    /// Keeps an invitation (a message stanza, `to` the invitee) for a user who is not
    /// online, to deliver at its next login; at most [`INVITATIONS_KEPT_MAX`] per user (the
    /// oldest go).
    async fn invitation_keep(&self, invitee: &str, stanza: &str) -> StoreResult<()>;
    /// Takes the invitations kept for a user, oldest first, and forgets them.
    async fn invitations_take(&self, invitee: &str) -> StoreResult<Vec<String>>;

    /// Keeps a new `/rooms` session under `id` (the hex SHA-256 of its token), ending the
    /// user's oldest sessions beyond [`WEB_SESSIONS_PER_USER_MAX`]. An `id` kept already is
    /// left as it is (a retried write; ids are hashes of 256 random bits).
    async fn web_session_put(&self, id: &str, session: &WebSession) -> StoreResult<()>;
    /// The session kept under `id`, whatever its age (the caller decides what is expired).
    async fn web_session_get(&self, id: &str) -> StoreResult<Option<WebSession>>;
    /// Records that the session was used at `seen_at` (never moved back).
    async fn web_session_touch(&self, id: &str, seen_at: Timestamp) -> StoreResult<()>;
    /// Ends a session (logout); false when there was none.
    async fn web_session_remove(&self, id: &str) -> StoreResult<bool>;
    /// Ends every session last used before `seen_before` or made before `created_before`
    /// and returns how many.
    async fn web_session_purge(
        &self,
        seen_before: Timestamp,
        created_before: Timestamp,
    ) -> StoreResult<u64>;

    /// Publishes `item` to the node `node` of `owner`'s account: created with `config` when
    /// it does not exist (an existing node keeps its configuration unless `config` differs,
    /// then it is replaced by `config`), an item with the same id replaced, and the oldest
    /// items beyond the node's `max_items` removed, in one transaction.
    async fn pep_publish(
        &self,
        owner: &str,
        node: &str,
        config: PepNode,
        item: PepItem,
    ) -> StoreResult<()>;
    /// A node's configuration, or `None` when `owner` has no such node.
    async fn pep_node(&self, owner: &str, node: &str) -> StoreResult<Option<PepNode>>;
    /// The names of `owner`'s nodes, sorted.
    async fn pep_nodes(&self, owner: &str) -> StoreResult<Vec<String>>;
    /// A node's items, oldest publication first.
    async fn pep_items(&self, owner: &str, node: &str) -> StoreResult<Vec<PepItem>>;
    /// Removes one item; false when there was no such item.
    async fn pep_retract(&self, owner: &str, node: &str, id: &str) -> StoreResult<bool>;
    /// Removes a node and its items; false when there was no such node.
    async fn pep_delete(&self, owner: &str, node: &str) -> StoreResult<bool>;

    /// Compliance records with id greater than `after_id`, oldest first, at most `limit`
    /// (itself capped at [`COMPLIANCE_PAGE_MAX`]).
    async fn compliance_after(
        &self,
        after_id: i64,
        limit: u32,
    ) -> StoreResult<Vec<ComplianceRecord>>;

    /// Where the compliance export stands ([`ExportState::default`] before the first run).
    async fn compliance_export_state(&self) -> StoreResult<ExportState>;
    /// Replaces the export state `from` with `to` in one `mgccomp` transaction, recording
    /// `run` (an [`ComplianceKind::ExportRun`] event, always committed) in it when given.
    /// `Conflict` and nothing written when the stored state is no longer `from` (another
    /// exporter moved it).
    async fn compliance_export_step(
        &self,
        from: &ExportState,
        to: &ExportState,
        run: Option<NewComplianceEvent>,
    ) -> StoreResult<()>;
    /// Deletes at most `limit` exported records (id up to the export watermark) recorded
    /// before `before`, oldest first, and returns how many went. Callers loop in small
    /// batches so that message commits are never held up for long.
    async fn compliance_purge(&self, before: Timestamp, limit: u32) -> StoreResult<u64>;

    /// Creates an unfinished file (an upload slot), unless its owner's bytes — every file it
    /// owns that is finished or whose slot has not expired at `file.created_at`, plus this
    /// one — would exceed `owner_quota_bytes` (checked in the same transaction as the insert).
    /// `Conflict` when the id exists; `Invalid` when `sha256` is set or a text is empty.
    async fn file_create(
        &self,
        file: &FileRecord,
        owner_quota_bytes: u64,
    ) -> StoreResult<FileCreated>;
    /// Stores piece `index` (0, 1, 2… in order) of an unfinished file, at most
    /// [`FILE_CHUNK_BYTES`]; storing a piece again replaces it (a retried write). `Invalid`
    /// when there is no such unfinished file, the piece is too big, or the pieces would hold
    /// more than the declared size.
    async fn file_chunk_put(&self, id: &str, index: u32, data: Vec<u8>) -> StoreResult<()>;
    /// Finishes an upload: checks that the pieces `0..n` hold exactly the declared size and
    /// records `sha256`. `Invalid` (and the file stays unfinished) when they do not or there is
    /// no such file; finishing a finished file with the same hash again is `Ok`.
    async fn file_finish(&self, id: &str, sha256: &str) -> StoreResult<()>;
    /// One file's record.
    async fn file_get(&self, id: &str) -> StoreResult<Option<FileRecord>>;
    /// Piece `index` of a file (finished or not); `None` past its last piece.
    async fn file_chunk_get(&self, id: &str, index: u32) -> StoreResult<Option<Vec<u8>>>;
    /// Binds a finished file owned by `owner` to `room` when it is bound to none yet, and
    /// says whether it did (false: no such finished file of that owner, or already bound).
    async fn file_bind(&self, id: &str, owner: &str, room: &str) -> StoreResult<bool>;
    /// The bytes of the finished files bound to `room`.
    async fn file_room_bytes(&self, room: &str) -> StoreResult<u64>;
    /// Files, oldest first, that match the filter.
    async fn file_list(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>>;
    /// Removes a file and its pieces; false when there was none.
    async fn file_remove(&self, id: &str) -> StoreResult<bool>;
    /// Removes at most `limit` unfinished files whose slot expired before `before` (with
    /// their pieces) and returns how many went.
    async fn file_purge_unfinished(&self, before: Timestamp, limit: u32) -> StoreResult<u64>;

    /// Wake-ups when other writers (other servers of a pool) commit messages: one
    /// [`RoomTick`] per room and commit, carrying the room's newest sequence number. They are
    /// hints, not data: a receiver catches up by reading the archive after the last sequence
    /// it delivered, so a lost or late tick delays delivery but never loses or reorders it.
    /// `None` for backends with a single writer (SQLite), where there is nobody to hear from.
    async fn subscribe_rooms(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<RoomTick>>> {
        Ok(None)
    }

    /// Publishes the presence of an occupant connected to `server` to the other servers of a
    /// pool (`None`: it left), and wakes them with a [`TickKind::Presence`] tick. Single-server
    /// backends have nobody to tell and keep nothing.
    async fn presence_put(
        &self,
        _room: &str,
        _server: &str,
        _nick: &str,
        _stanza: Option<&str>,
    ) -> StoreResult<()> {
        Ok(())
    }

    /// Tells the other servers of a pool that a user's PEP node changed (after the change
    /// committed), waking them with a [`TickKind::Pep`] tick so the owner's sessions there get
    /// the event. Like every tick it is a hint: a receiver that misses it shows the change
    /// at the owner's next read of the node. Single-server backends have nobody to tell.
    /// (No default: a wrapping store that forgot to pass it on would lose every event.)
    async fn pep_announce(&self, event: &PepEvent) -> StoreResult<()>;

    /// Withdraws the presence of an occupant that left, as `presence_put` with `None` does,
    /// and tells the other servers how it left: `last` is the unavailable presence its room
    /// showed the occupants here (a ban's 301 and reason, a kick's 307, a nick change's
    /// 303…), which they show theirs ([`PresenceNow::Left`]).
    async fn presence_leave(
        &self,
        room: &str,
        server: &str,
        nick: &str,
        _last: &str,
    ) -> StoreResult<()> {
        self.presence_put(room, server, nick, None).await
    }

    /// Every published occupant presence of a room.
    async fn presence_list(&self, _room: &str) -> StoreResult<Vec<SharedPresence>> {
        Ok(Vec::new())
    }

    /// The published presences of a room among `who` (server, nick); those absent are not
    /// (or no longer) published. What a room reads after presence ticks that name occupants,
    /// instead of its whole list.
    async fn presence_get(
        &self,
        _room: &str,
        _who: &[PresenceKey],
    ) -> StoreResult<Vec<SharedPresence>> {
        Ok(Vec::new())
    }

    /// Forgets every presence published by `server` (it restarted, crashed or went idle) and
    /// wakes the rooms concerned.
    async fn presence_forget_server(&self, _server: &str) -> StoreResult<()> {
        Ok(())
    }
}

/// An occupant's presence as one server of a pool published it for the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPresence {
    /// The occupant's nick.
    pub nick: String,
    /// The server the occupant is connected to.
    pub server: String,
    /// The presence as the room broadcasts it (`from` = room/nick, no `to`).
    pub stanza: String,
}

/// Names one published presence: the server it is connected to and its nick.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PresenceKey {
    /// The server the occupant is connected to.
    pub server: String,
    /// The occupant's nick.
    pub nick: String,
}

/// What changed in a room, as far as other servers are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TickKind {
    /// The archive grew to `last_seq`.
    Messages,
    /// Occupant presence published by some server changed.
    Presence,
    /// The room record (subject, configuration, affiliations) changed, or the room is gone.
    Record,
    /// Another server announced something ([`Write::Announce`]): `event`.
    Event,
    /// The directory (walls, groups) changed: read it again. Sent for every room (`*`).
    Directory,
    /// A user's PEP node changed on another server ([`Store::pep_announce`]): `pep`. The
    /// tick's `room` is the owner's bare JID.
    Pep,
}

/// A change to a user's PEP node (bookmarks, avatar, nickname…), told to the other servers
/// of a pool so that the owner's sessions there get the event its sessions on `server` got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepEvent {
    /// The server whose client made the change (it told its own sessions already).
    pub server: String,
    /// The account, bare JID.
    pub owner: String,
    /// The node.
    pub node: String,
    /// What happened to it.
    pub change: PepChange,
}

/// What happened to a PEP node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PepChange {
    /// An item was published (receivers read it from the store: a payload can be larger than
    /// a notification).
    Published {
        /// The item's id.
        item: String,
    },
    /// An item was removed.
    Retracted {
        /// The item's id.
        item: String,
    },
    /// The node was deleted.
    Deleted,
}

/// A wake-up for a room (or, with `room == "*"`, for every room: sent after a reconnect,
/// when ticks may have been missed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomTick {
    /// Bare room JID, or `*`.
    pub room: String,
    /// What changed.
    pub kind: TickKind,
    /// For [`TickKind::Messages`]: newest sequence number known to the sender.
    pub last_seq: i64,
    /// For [`TickKind::Presence`]: the one occupant whose presence changed; `None` when the
    /// receiver must re-read the room's whole list (a server left, or ticks were lost).
    pub presence_of: Option<PresenceKey>,
    /// For a tick that names an occupant: its presence after the change, when the tick
    /// carries it. Ticks arrive in the order the changes committed, so the last one wins.
    pub presence_now: PresenceNow,
    /// For [`TickKind::Event`]: what was announced.
    pub event: Option<RoomEvent>,
    /// For [`TickKind::Pep`]: the change to a user's node.
    pub pep: Option<PepEvent>,
}

/// An occupant's presence after a change, as a presence tick tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PresenceNow {
    /// Not told (it was too large for a tick): read it with [`Store::presence_get`].
    #[default]
    Unknown,
    /// Published: the stanza as the room broadcasts it.
    Shown(String),
    /// Withdrawn: the occupant left.
    Gone,
    /// Withdrawn, with the presence that showed it leaving ([`Store::presence_leave`]).
    Left(String),
}

/// The directory as the backends store it: JSON, checked before it is written.
pub fn directory_document(directory: &Directory) -> StoreResult<String> {
    directory.validate().map_err(|e| StoreError::Invalid(e.0))?;
    serde_json::to_string(directory)
        .map_err(|e| StoreError::Invalid(format!("the directory cannot be serialized: {e}")))
}

/// The directory from its stored JSON.
pub fn parse_directory(text: &str) -> StoreResult<Directory> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("the stored directory cannot be read: {e}")))
}
