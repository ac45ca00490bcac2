-- mgc, version 6: the directory (pchat_room::directory: local groups and the categories whose
-- allowed and denied lists are Lync's ethical walls) as one JSON document with a revision.
-- One row once saved; none means the default directory (one open category). Written with a
-- compare-and-set on the revision; every server reads the revision often to learn of changes.
CREATE TABLE directory (
    id          integer PRIMARY KEY CHECK (id = 1),
    revision    bigint NOT NULL CHECK (revision >= 1),
    document    text NOT NULL
);
