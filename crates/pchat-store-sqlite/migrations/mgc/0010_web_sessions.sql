-- mgc, version 10: logged-in sessions of the room management page (/rooms), by the SHA-256
-- of the cookie's token (the token itself is never stored), so that every server of a pool
-- serves them and a logout holds everywhere.
CREATE TABLE web_session (
    id          TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX web_session_user ON web_session (username, created_at);
CREATE INDEX web_session_seen ON web_session (seen_at);
