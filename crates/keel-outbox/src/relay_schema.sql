-- An event relayed to a broker (NATS JetStream) is not finished when the broker has it, only when a
-- handler has run it: until then its row stays `relayed`, so that if the broker loses its store the
-- event can be relayed again, and nothing accepted is lost. The consumer that ran it marks it `done`.
ALTER TABLE keel_jobs DROP CONSTRAINT keel_jobs_state_check;
ALTER TABLE keel_jobs ADD CONSTRAINT keel_jobs_state_check
    CHECK (state IN ('pending', 'running', 'relayed', 'done', 'dead'));
-- Relaying again after a loss finds the rows relayed before the broker's stream was (re)made.
CREATE INDEX keel_jobs_relayed_idx ON keel_jobs (started_at) WHERE state = 'relayed';

-- How many times a dead job was put back (`replay`): part of a relayed event's message id, so that
-- the broker drops a second copy of one relay but not a replay (see stream.rs, `message_id`).
ALTER TABLE keel_jobs ADD COLUMN replays integer NOT NULL DEFAULT 0;
