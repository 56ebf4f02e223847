-- Each node merges the other nodes' like-count components by reading the rows changed since it last
-- looked (see src/likes.rs): an index on the time of change keeps that a range scan.
CREATE INDEX like_counts_by_update ON like_counts (updated_at);
