-- mgc, version 2: the server secret (Store::server_secret), one row, made at open by the
-- store with random bytes from the operating system and never changed. It keys the made-up
-- SCRAM salts of unknown users, so they cannot be computed from a user name.
CREATE TABLE server_secret (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    secret  BLOB NOT NULL
);
