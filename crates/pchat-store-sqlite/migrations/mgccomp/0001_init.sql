-- mgccomp, version 1: compliance events.

CREATE TABLE compliance (
    -- AUTOINCREMENT: ids are never reused, even after the exporter purges old records,
    -- because consumers page by id.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The writer's batch that recorded it; compared with mgc's writer_state on open.
    batch_id    INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    at          INTEGER NOT NULL,
    room        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    nick        TEXT,
    detail      TEXT NOT NULL,
    message_seq INTEGER,
    -- 0 when the mgc change of its batch never committed.
    committed   INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX compliance_batch ON compliance (batch_id);
