-- mgc, version 7: invitations kept for users who were not online (XEP-0045 mediated
-- invitations, and Lync's notice to users made members of a room with invitations on),
-- delivered and forgotten at the user's next login. A few per user at most.
CREATE TABLE invitation (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    invitee     TEXT NOT NULL,
    stanza      TEXT NOT NULL,
    at          INTEGER NOT NULL
);
CREATE INDEX invitation_invitee ON invitation (invitee, id);
