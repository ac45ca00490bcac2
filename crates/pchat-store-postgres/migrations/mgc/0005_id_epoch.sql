-- mgc, version 5: the id epoch (pchat_store::ids) and the rooms' message counts.

-- One row. A room's next message id is above the base of the epoch in force (the writer
-- reads it under the rooms' row locks), so that a database made writable again from an
-- earlier point — a DR failover, a forced mirror failover, a restore — and raised to an epoch
-- no database of the pool has used never hands out an id the lost one may have handed out.
-- Raised, never lowered, by the procedures (through the agent) before any server writes.
CREATE TABLE id_epoch (
    id      integer PRIMARY KEY CHECK (id = 1),
    epoch   bigint NOT NULL CHECK (epoch >= 0)
);
INSERT INTO id_epoch (id, epoch) VALUES (1, 0);

-- Messages ever numbered in the room. Until now `last_seq` was that count; once an epoch
-- jump skips ids it no longer is, and the agent's status (the archive's message count,
-- compared across instances for log shipping's lag and a failover's loss) needs the count.
ALTER TABLE room ADD COLUMN message_count bigint NOT NULL DEFAULT 0 CHECK (message_count >= 0);
UPDATE room SET message_count = last_seq;
