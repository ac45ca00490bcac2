-- mgc, version 8: files posted through the HTTP upload service (XEP-0363), kept beside the
-- archive so that whatever carries the archive (mirroring, log shipping, backups, failover)
-- carries them too.
--
-- `file` holds one row per upload slot: unfinished while `sha256` is NULL (never served),
-- finished once it is set. `room` is the room's JID (NULL until the owner first posts the
-- file's URL in a room), not `room.id`: the file follows the room's name, and deleting or
-- clearing the room deletes its files in the writer's transaction. Times are microseconds.
-- The servers' role gets its rights from `install`, which grants every table.
CREATE TABLE file (
    id              text COLLATE "C" PRIMARY KEY,
    owner           text COLLATE "C" NOT NULL,
    room            text COLLATE "C",
    name            text NOT NULL,
    content_type    text NOT NULL,
    size            bigint NOT NULL CHECK (size >= 0),
    created_at      bigint NOT NULL,
    expires_at      bigint NOT NULL,
    sha256          text
);
-- The owner's quota and listings.
CREATE INDEX file_owner ON file (owner, created_at);
-- A room's bytes, listings, and the deletes of DeleteRoom and ClearHistory.
CREATE INDEX file_room ON file (room, created_at) WHERE room IS NOT NULL;
-- The purge of slots never finished, oldest first.
CREATE INDEX file_unfinished ON file (expires_at) WHERE sha256 IS NULL;

-- The bytes, in pieces of at most pchat_store::FILE_CHUNK_BYTES numbered 0, 1, 2…: an upload
-- writes and a download reads one piece at a time, so neither holds a whole file in memory.
-- Deleting a file deletes its pieces. EXTERNAL storage: the bytes are mostly compressed
-- already (images, archives), so PostgreSQL does not try again; they are stored out of line.
CREATE TABLE file_chunk (
    file_id     text COLLATE "C" NOT NULL REFERENCES file (id) ON DELETE CASCADE,
    idx         bigint NOT NULL CHECK (idx >= 0),
    data        bytea NOT NULL,
    PRIMARY KEY (file_id, idx)
);
ALTER TABLE file_chunk ALTER COLUMN data SET STORAGE EXTERNAL;
