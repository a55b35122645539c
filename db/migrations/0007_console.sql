-- The operations console (monitoring/console, docs/console.md).

-- "First failure" of a dead letter: set once; failed_at is the last (a replayed job that fails
-- again updates failed_at and keeps this).
ALTER TABLE dead_letters ADD COLUMN first_failed_at timestamptz DEFAULT now();

-- Jobs search by job name, newest first (keyset: id < last id seen).
CREATE INDEX job_outbox_job_idx ON job_outbox (job, id);

-- Done rows by time: the console's done-per-minute chart and housekeeping's prune of done rows.
CREATE INDEX job_outbox_done_idx ON job_outbox (done_at) WHERE done_at IS NOT NULL;
