-- mgc, version 5: the directory (pchat_room::directory: local groups and the categories whose
-- allowed and denied lists are Lync's ethical walls) as one JSON document with a revision.
-- One row once saved; none means the default directory (one open category). Written with a
-- compare-and-set on the revision; the servers read the revision often to learn of changes.
CREATE TABLE directory (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    revision    INTEGER NOT NULL CHECK (revision >= 1),
    document    TEXT NOT NULL
);
