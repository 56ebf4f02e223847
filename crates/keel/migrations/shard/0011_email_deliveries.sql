-- One row per e-mail Keel means to send (an event that causes one), on the recipient's shard: the
-- claim a handler takes before it talks to the mail server, and the record that the server accepted
-- the message. Claiming is one atomic statement, so two handlers given the same event at once (a
-- broker's redelivery, a lease that lapsed) can never both send it; a claim lapses, so a handler
-- that died holding it does not lose the e-mail. See src/email/mod.rs.
CREATE TABLE email_deliveries (
    event_id      uuid PRIMARY KEY,
    claimed_until timestamptz NOT NULL,
    attempts      integer NOT NULL DEFAULT 1,
    sent_at       timestamptz
);

-- E-mails recorded as sent before this table existed stay sent.
INSERT INTO email_deliveries (event_id, claimed_until, sent_at)
SELECT event_id, processed_at, processed_at FROM keel_processed_events WHERE handler = 'mail';
DELETE FROM keel_processed_events WHERE handler = 'mail';
