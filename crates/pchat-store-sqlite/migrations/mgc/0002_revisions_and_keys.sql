-- mgc, version 2: room record revisions and idempotency keys.

-- Rises by one with every save of the room's record (1 when created). A message is stored
-- only under the revision the room accepted it (see NewMessage::record_revision), so that no
-- message is stored on the authority of a record that has changed since.
ALTER TABLE room ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;

-- A key the server gives a message without an origin-id: a commit retried after an unknown
-- outcome is deduplicated on it. Unique per room; the writer looks first, this index makes the
-- look-up fast and a missed one a constraint error instead of a duplicate.
ALTER TABLE message ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX message_idempotency ON message (room_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
