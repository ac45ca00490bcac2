-- mgc, version 1: users, rooms, the archive and its full-text index, the writer's checkpoint.

-- Local accounts: SCRAM credentials only, never passwords.
CREATE TABLE user (
    jid                 TEXT PRIMARY KEY,
    sha1_salt           BLOB NOT NULL,
    sha1_iterations     INTEGER NOT NULL,
    sha1_stored_key     BLOB NOT NULL,
    sha1_server_key     BLOB NOT NULL,
    sha256_salt         BLOB NOT NULL,
    sha256_iterations   INTEGER NOT NULL,
    sha256_stored_key   BLOB NOT NULL,
    sha256_server_key   BLOB NOT NULL,
    created_at          INTEGER NOT NULL  -- microseconds since the epoch
);

-- Rooms. `id` is a small integer so that archive keys stay short (see message.id); the
-- record is the domain's RoomRecord as JSON, because only the domain interprets it.
CREATE TABLE room (
    id          INTEGER PRIMARY KEY,
    jid         TEXT NOT NULL UNIQUE,
    record      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- The archive. Its primary key is (room, seq), packed into the rowid as
-- (room_id << 40) | seq: one room's messages are one contiguous rowid range (fast pages,
-- fast max(seq)), and the full-text index can point at messages by rowid.
CREATE TABLE message (
    id          INTEGER PRIMARY KEY,
    room_id     INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    sender      TEXT NOT NULL,
    nick        TEXT NOT NULL,
    origin_id   TEXT,
    body        TEXT,
    stanza      TEXT NOT NULL,
    CHECK (seq >= 1 AND id = (room_id << 40) | seq)
);
CREATE INDEX message_room_at ON message (room_id, at);
CREATE INDEX message_room_nick ON message (room_id, nick);
-- Dedupe of client resends (XEP-0359 origin-id); the writer checks it before inserting, this
-- index makes the check fast and a missed check a constraint error instead of a duplicate.
CREATE UNIQUE INDEX message_origin ON message (room_id, sender, origin_id)
    WHERE origin_id IS NOT NULL;

-- Full-text index over bodies. Contentless: the text already lives in `message`; rows are
-- deleted with the 'delete' command and the original body.
CREATE VIRTUAL TABLE message_fts USING fts5 (
    body,
    content = '',
    tokenize = 'unicode61 remove_diacritics 2'
);

-- The highest batch id whose mgc transaction committed. Compliance records of later batches
-- describe changes that never happened (a crash hit between the two commits).
CREATE TABLE writer_state (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    last_batch_id   INTEGER NOT NULL
);
INSERT INTO writer_state (id, last_batch_id) VALUES (1, 0);
