-- Occupant presence shared between the servers of a pool: each server publishes its own
-- occupants' presence here so the others can show them (one row per room, nick and server).
CREATE TABLE occupant_presence (
    room text NOT NULL,
    nick text NOT NULL,
    server text NOT NULL,
    stanza text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room, nick, server)
);
CREATE INDEX occupant_presence_server ON occupant_presence (server);
