-- One table for every kind: the object as JSON plus the few columns the control plane queries
-- by (phase, owner, region, lease deadline). The same SQL runs on SQLite and PostgreSQL.
CREATE TABLE objects (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    resource_version BIGINT NOT NULL,
    phase TEXT,
    owner TEXT,
    region TEXT,
    deadline_ms BIGINT,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX objects_by_phase ON objects (kind, phase, region, name);
CREATE INDEX objects_by_owner ON objects (kind, owner, name);

-- Change history for watches, compacted to the newest entries.
CREATE TABLE changes (
    resource_version BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    event_type TEXT NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('resourceVersion', 0);
INSERT INTO counters (name, value) VALUES ('compactedVersion', 0);

-- A task's result, written once: the primary key makes a second write a no-op.
CREATE TABLE task_results (
    task TEXT PRIMARY KEY,
    application TEXT NOT NULL,
    task_index BIGINT NOT NULL,
    worker TEXT NOT NULL,
    body TEXT NOT NULL,
    written_at TEXT NOT NULL
);
CREATE INDEX task_results_by_application ON task_results (application, task_index);
