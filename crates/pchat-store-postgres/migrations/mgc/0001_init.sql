-- mgc, version 1: users, rooms, the archive with its full-text index, applied batches.
--
-- Times are microseconds since the epoch in bigint columns, as in the SQLite backend: exact
-- round-trips of the domain's Timestamp, and `pchat data export|import` moves them as is.
-- JIDs are compared and sorted byte-wise (COLLATE "C"), whatever the database's locale.

-- Local accounts: SCRAM credentials only, never passwords. ("user" is reserved in SQL.)
CREATE TABLE user_account (
    jid                 text COLLATE "C" PRIMARY KEY,
    sha1_salt           bytea NOT NULL,
    sha1_iterations     bigint NOT NULL,
    sha1_stored_key     bytea NOT NULL,
    sha1_server_key     bytea NOT NULL,
    sha256_salt         bytea NOT NULL,
    sha256_iterations   bigint NOT NULL,
    sha256_stored_key   bytea NOT NULL,
    sha256_server_key   bytea NOT NULL,
    created_at          bigint NOT NULL
);

-- Rooms. `last_seq` is the room's sequence counter: writers of every pool server lock the
-- row (SELECT ... FOR UPDATE) and advance it in the transaction that inserts the messages,
-- so numbers are gapless and unique across servers. A re-created room gets a new `id`, which
-- is how its archive and origin-ids start afresh. The record is the domain's RoomRecord as
-- JSON text, because only the domain interprets it.
CREATE TABLE room (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    jid         text COLLATE "C" NOT NULL UNIQUE,
    record      text NOT NULL,
    created_at  bigint NOT NULL,
    last_seq    bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);

-- The archive, keyed by (room, seq). Deleting a room deletes its archive with it.
CREATE TABLE message (
    room_id     bigint NOT NULL REFERENCES room (id) ON DELETE CASCADE,
    seq         bigint NOT NULL CHECK (seq >= 1),
    at          bigint NOT NULL,
    sender      text NOT NULL,
    nick        text NOT NULL,
    origin_id   text,
    body        text,
    stanza      text NOT NULL,
    -- 'simple': lower-cased whole words, no stemming and no stop words, so that every word
    -- of a body can be found, in any language.
    body_tsv    tsvector GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, coalesce(body, ''))) STORED,
    PRIMARY KEY (room_id, seq)
);
CREATE INDEX message_room_at ON message (room_id, at);
CREATE INDEX message_room_nick ON message (room_id, nick);
CREATE INDEX message_body_tsv ON message USING gin (body_tsv);
-- Dedupe of client resends (XEP-0359 origin-id): the writer looks first, under the room's
-- row lock; the index makes the look-up fast and a missed one a constraint error.
CREATE UNIQUE INDEX message_origin ON message (room_id, sender, origin_id)
    WHERE origin_id IS NOT NULL;

-- Batch ids (from mgccomp) whose mgc transaction committed: a compliance record is
-- committed exactly when its batch id is here. Written in the same transaction as the
-- batch's changes, so no reconcile step is ever needed.
CREATE TABLE applied_batch (
    batch_id    bigint PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
