-- mgccomp, version 1: compliance events.

-- One id per writer group (several per pool server), unique across every server.
CREATE SEQUENCE compliance_batch_id;

CREATE TABLE compliance (
    -- Consumers page by id, so ids must be committed in increasing order: writers take a
    -- transaction-level advisory lock before inserting (see the crate docs). Identity values
    -- are never reused, even after the exporter purges old records.
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writer group that recorded it; committed iff present in mgc's applied_batch.
    batch_id    bigint NOT NULL,
    kind        text NOT NULL,
    at          bigint NOT NULL,
    room        text NOT NULL,
    actor       text NOT NULL,
    nick        text,
    detail      text NOT NULL,
    message_seq bigint
);
CREATE INDEX compliance_batch ON compliance (batch_id);
