-- mgc, version 9: PEP nodes of users' accounts (XEP-0163): a user's bookmarks (XEP-0402),
-- avatar and nickname. Kept per owner whatever authenticates it (local or LDAP accounts),
-- removed with a local account. Items are ordered by publication (seq, per node).
CREATE TABLE pep_node (
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    access      TEXT NOT NULL,
    max_items   INTEGER NOT NULL,
    PRIMARY KEY (owner, node)
);
CREATE TABLE pep_item (
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    item        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    at          INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (owner, node, item)
);
CREATE INDEX pep_item_order ON pep_item (owner, node, seq);
