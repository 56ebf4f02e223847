-- Retention (src/jobs/maintenance.rs): old records are deleted in small batches, each found through
-- an index on its age rather than by scanning the whole table every ten minutes.
CREATE INDEX keel_jobs_dead_finished_idx ON keel_jobs (finished_at) WHERE state = 'dead';
CREATE INDEX keel_processed_events_processed_at_idx ON keel_processed_events (processed_at);
CREATE INDEX webhook_deliveries_finished_idx ON webhook_deliveries (updated_at)
    WHERE status IN ('succeeded', 'dead');
-- Released reservations (their order failed) are kept for the record retention, then deleted; sold
-- ones stay, the record of what was sold. Reservations made before `decided_at` existed count from
-- their creation.
CREATE INDEX stock_reservations_released_idx ON stock_reservations ((coalesce(decided_at, created_at)))
    WHERE state = 'released';
