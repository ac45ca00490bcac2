-- mgc, version 7: invitations kept for users who were not online (XEP-0045 mediated
-- invitations, and Lync's notice to users made members of a room with invitations on),
-- delivered and forgotten at the user's next login, on whichever server. A few per user.
CREATE TABLE invitation (
    id          bigserial PRIMARY KEY,
    invitee     text NOT NULL,
    stanza      text NOT NULL,
    at          bigint NOT NULL
);
CREATE INDEX invitation_invitee ON invitation (invitee, id);
