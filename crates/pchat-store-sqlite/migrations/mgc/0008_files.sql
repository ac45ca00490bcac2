-- mgc, version 8: files posted through the HTTP upload service (XEP-0363), kept beside the
-- archive so that whatever carries the archive (backups, restores) carries them too.
--
-- `file` holds one row per upload slot: unfinished while `sha256` is NULL (never served),
-- finished once it is set. `room` is the room's JID (NULL until the owner first posts the
-- file's URL in a room), not `room.id`: the file follows the room's name, and deleting or
-- clearing the room deletes its files in the writer's transaction. Times are microseconds.
CREATE TABLE file (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    room            TEXT,
    name            TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    sha256          TEXT
);
-- The owner's quota and listings.
CREATE INDEX file_owner ON file (owner, created_at);
-- A room's bytes, listings, and the deletes of DeleteRoom and ClearHistory.
CREATE INDEX file_room ON file (room, created_at) WHERE room IS NOT NULL;
-- The purge of slots never finished, oldest first.
CREATE INDEX file_unfinished ON file (expires_at) WHERE sha256 IS NULL;

-- The bytes, in pieces of at most pchat_store::FILE_CHUNK_BYTES numbered 0, 1, 2…: an upload
-- writes and a download reads one piece at a time, so neither holds a whole file in memory.
-- Deleted explicitly with their file (these connections do not enforce foreign keys). A rowid
-- table: SQLite advises against WITHOUT ROWID for rows this large.
CREATE TABLE file_chunk (
    file_id     TEXT NOT NULL,
    idx         INTEGER NOT NULL CHECK (idx >= 0),
    data        BLOB NOT NULL,
    PRIMARY KEY (file_id, idx)
);
