-- The outbox is the queue: a job is a row written in the same transaction as the change that causes
-- it, so it exists exactly when that change committed.
CREATE TABLE keel_jobs (
    id           uuid PRIMARY KEY,             -- the event id (UUIDv7): handlers deduplicate on it
    kind         text NOT NULL,
    aggregate_id text NOT NULL,                -- what the event is about, e.g. an order id
    payload      jsonb NOT NULL,
    traceparent  text,                         -- W3C trace context of the request that caused it
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,                  -- a running job whose lease lapsed is claimed again
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz
);
-- Claiming reads only ready rows of one kind in run order; the partial indexes stay small because
-- finished jobs leave them.
CREATE INDEX keel_jobs_pending_idx ON keel_jobs (kind, run_at) WHERE state = 'pending';
CREATE INDEX keel_jobs_running_idx ON keel_jobs (kind, locked_until) WHERE state = 'running';
CREATE INDEX keel_jobs_done_idx ON keel_jobs (finished_at) WHERE state = 'done';
CREATE INDEX keel_jobs_dead_idx ON keel_jobs (kind) WHERE state = 'dead';

-- Wakes idle runners at once; polling remains the fallback. One notification per inserting
-- statement, and PostgreSQL folds identical ones within a transaction.
CREATE FUNCTION keel_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keel_jobs', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER keel_jobs_notify AFTER INSERT ON keel_jobs FOR EACH STATEMENT EXECUTE FUNCTION keel_jobs_notify();

-- Handlers that touch the database record the events they applied, in their own transaction, so a
-- redelivered event changes nothing.
CREATE TABLE keel_processed_events (
    event_id     uuid NOT NULL,
    handler      text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, handler)
);
