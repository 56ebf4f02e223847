-- Versions that only grow, bumped by every write of the row: a counter, not a timestamp, because
-- `now()` is a transaction's start and overlapping transactions commit out of that order. A cache
-- installs a product only over an older version, in memory and in Redis.
ALTER TABLE products ADD COLUMN version bigint NOT NULL DEFAULT 1;
ALTER TABLE inventory ADD COLUMN version bigint NOT NULL DEFAULT 1;

-- A search document's version is its product's plus its stock's (each grows, so their sum does):
-- a document is replaced only by one built from newer rows. The documents of before were versioned
-- by time and may hold a superseded value: they are rebuilt here.
ALTER TABLE product_search ALTER COLUMN version TYPE bigint USING 0;
UPDATE product_search s
SET name = p.name, description = p.description, price_cents = p.price_cents, in_stock = i.stock > 0,
    document = setweight(to_tsvector('english', p.name), 'A') || setweight(to_tsvector('english', p.description), 'B'),
    version = p.version + i.version, indexed_at = now()
FROM products p JOIN inventory i ON i.product_id = p.id
WHERE s.product_id = p.id;

-- Like counts are now tallied on the shards, in the statement that changes the like (the shard
-- migration of the same number); the per-node components flushed here are no longer read.
DROP TABLE like_counts;
