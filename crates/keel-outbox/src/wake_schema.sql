-- Runners are woken after the enqueuing transaction commits, by a `Waker` (see wake.rs), not by a
-- `NOTIFY` inside it: a notifying transaction holds a cluster-wide lock through its commit's flush,
-- so every transaction that enqueued a job committed one at a time.
DROP TRIGGER keel_jobs_notify ON keel_jobs;
DROP FUNCTION keel_jobs_notify();
