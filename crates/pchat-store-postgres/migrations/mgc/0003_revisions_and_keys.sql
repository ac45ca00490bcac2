-- mgc, version 3: room record revisions and idempotency keys.

-- Rises by one with every save of the room's record (1 when created). The writer reads it
-- under the room's row lock and stores a message only under the revision its room accepted it
-- (NewMessage::record_revision): a server that has not yet heard of a ban made on another
-- server cannot store the banned user's message.
ALTER TABLE room ADD COLUMN revision bigint NOT NULL DEFAULT 1 CHECK (revision >= 1);

-- A key the server gives a message without an origin-id: a commit retried after an unknown
-- outcome (connection lost after COMMIT was sent) is deduplicated on it. Unique per room: the
-- writer looks first, under the room's row lock; the index makes the look-up fast and a
-- missed one a constraint error.
ALTER TABLE message ADD COLUMN idempotency_key text;
CREATE UNIQUE INDEX message_idempotency ON message (room_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
