-- Retention (src/jobs/maintenance.rs): old records are deleted in small batches, each found through
-- an index on its age rather than by scanning the whole table every ten minutes.
CREATE INDEX keel_jobs_dead_finished_idx ON keel_jobs (finished_at) WHERE state = 'dead';
CREATE INDEX keel_processed_events_processed_at_idx ON keel_processed_events (processed_at);
CREATE INDEX email_deliveries_sent_at_idx ON email_deliveries (sent_at) WHERE sent_at IS NOT NULL;
