-- mgc, version 4: the id epoch (pchat_store::ids). A room's next message id is above the
-- base of the epoch in force, so that a database restored to an earlier point, once raised
-- to a new epoch, never hands out an id the lost one may have handed out. One row; raised
-- (never lowered) by a restore through the writer.
CREATE TABLE id_epoch (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    epoch   INTEGER NOT NULL CHECK (epoch >= 0)
);
INSERT INTO id_epoch (id, epoch) VALUES (1, 0);
