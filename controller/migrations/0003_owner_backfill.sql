-- Tasks and events carry their owner (`metadata.owner`) since issue 16; those stored before
-- do not, and to a user they would be nobody's. The server gives each the owner of what it
-- follows once per store (`objects::backfill_owners`), then sets this to 1. The same SQL runs
-- on SQLite and PostgreSQL.
INSERT INTO counters (name, value) VALUES ('ownersBackfilled', 0);
