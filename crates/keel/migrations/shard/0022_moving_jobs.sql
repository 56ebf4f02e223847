-- A bucket move takes a user's e-mail records and jobs along with the user (docs/SHARDING.md).

-- The e-mail records carry the recipient's bucket, and move with the other user tables by logical
-- replication: a record left behind would let the new shard send an e-mail the old one had sent.
-- Records whose job is gone keep no bucket; they are finished, and stay where they are.
ALTER TABLE email_deliveries ADD COLUMN bucket smallint;
UPDATE email_deliveries d SET bucket = keel_bucket((j.payload->>'user_id')::uuid)
FROM keel_jobs j WHERE j.id = d.event_id AND j.payload ? 'user_id';
ALTER TABLE email_deliveries REPLICA IDENTITY FULL;
CREATE TRIGGER keel_b_guard BEFORE INSERT OR UPDATE OR DELETE ON email_deliveries
    FOR EACH ROW EXECUTE FUNCTION keel_guard_bucket();

-- A job about a user (its payload names `user_id`: every shard event but the ping) carries the
-- user's bucket. Jobs are not replicated: the old shard's workers would run them while the new
-- shard's ran the copies. After the switch, the mover hands them over (src/db/moves.rs).
ALTER TABLE keel_jobs ADD COLUMN bucket smallint;
UPDATE keel_jobs SET bucket = keel_bucket((payload->>'user_id')::uuid) WHERE payload ? 'user_id';
CREATE FUNCTION keel_set_bucket_of_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.bucket IS NULL AND NEW.payload ? 'user_id' THEN
        NEW.bucket := keel_bucket((NEW.payload->>'user_id')::uuid);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER keel_a_bucket BEFORE INSERT ON keel_jobs FOR EACH ROW EXECUTE FUNCTION keel_set_bucket_of_job();

-- Jobs being handed over to a new shard: taken out of the old shard's queue (running, with a lease
-- that never lapses) and remembered here with the state they had, until the new shard has them and
-- the old rows are deleted. A mover that dies in between finds them here.
CREATE TABLE keel_moving_jobs (
    id      uuid PRIMARY KEY,
    move_id uuid NOT NULL,
    state   text NOT NULL
);
CREATE INDEX keel_moving_jobs_move_idx ON keel_moving_jobs (move_id);
