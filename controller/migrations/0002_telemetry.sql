-- One finished task's telemetry sample (what it was, where it ran, how long it took), the
-- predictor's training data. Written once, in the transaction that marks the task `Done`; keyed
-- by the task's uid (names repeat when an application is re-created) and kept after its
-- application is deleted, so a restarted controller retrains from every sample. The same SQL
-- runs on SQLite and PostgreSQL.
CREATE TABLE telemetry (
    task_uid TEXT PRIMARY KEY,
    resource_version BIGINT NOT NULL,
    region TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX telemetry_by_version ON telemetry (resource_version);
