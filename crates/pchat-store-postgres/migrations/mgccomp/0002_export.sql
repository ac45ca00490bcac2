-- mgccomp, version 2: where the compliance export stands (one row; Lync's tblComplianceState).

CREATE TABLE export_state (
    id          int PRIMARY KEY CHECK (id = 1),
    -- Every record with an id up to this one was exported.
    watermark   bigint NOT NULL,
    -- A run that began and did not finish exports exactly (watermark, pending_to].
    pending_to  bigint,
    runs        bigint NOT NULL,
    finished_at bigint
);
INSERT INTO export_state (id, watermark, pending_to, runs, finished_at) VALUES (1, 0, NULL, 0, NULL);
