-- mgc, version 9: PEP nodes of users' accounts (XEP-0163): a user's bookmarks (XEP-0402),
-- avatar and nickname, in the mirrored database so they follow a failover. Kept per owner
-- whatever authenticates it (local or LDAP accounts), removed with a local account. Items
-- are ordered by publication (seq).
CREATE TABLE pep_node (
    owner       text COLLATE "C" NOT NULL,
    node        text COLLATE "C" NOT NULL,
    access      text NOT NULL,
    max_items   integer NOT NULL,
    PRIMARY KEY (owner, node)
);
CREATE SEQUENCE pep_item_seq;
CREATE TABLE pep_item (
    owner       text COLLATE "C" NOT NULL,
    node        text COLLATE "C" NOT NULL,
    item        text COLLATE "C" NOT NULL,
    payload     text NOT NULL,
    at          bigint NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (owner, node, item),
    FOREIGN KEY (owner, node) REFERENCES pep_node (owner, node) ON DELETE CASCADE
);
CREATE INDEX pep_item_order ON pep_item (owner, node, seq);
