-- mgc, version 3: the server secret (Store::server_secret), one row, made by `pchat db install`
-- with random bytes from the operating system and never changed: every server of the pool
-- reads the same one. It keys the made-up SCRAM salts of unknown users, so they cannot be
-- computed from a user name, nor told apart by asking two servers.
CREATE TABLE server_secret (
    id      integer PRIMARY KEY CHECK (id = 1),
    secret  bytea NOT NULL
);
