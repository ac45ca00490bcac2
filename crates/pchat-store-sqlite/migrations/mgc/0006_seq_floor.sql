-- mgc, version 6: a room's ids never go back. The next id was derived from the newest archived
-- message; once history can be cleared (Lync's Clear-CsPersistentChatRoom deletes the oldest
-- messages, up to all of them), the highest id ever deleted is kept here, and the next id is
-- above both.
ALTER TABLE room ADD COLUMN seq_floor INTEGER NOT NULL DEFAULT 0 CHECK (seq_floor >= 0);
