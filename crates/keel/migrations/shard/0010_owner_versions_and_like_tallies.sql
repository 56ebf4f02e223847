-- How many writes of the data its owner reads back through a cache (today: the cart) have committed
-- for this user, bumped in the same transaction as each. The token check reads it with the user's
-- row, and a cached cart older than it is not served to the owner: read-your-writes that holds with
-- Redis slow, paused, restarted or lost, and after a crash between a commit and a cache write.
ALTER TABLE users ADD COLUMN owner_version bigint NOT NULL DEFAULT 0;

-- Like counts, tallied in the statement that adds or removes the like, so a count can never drift
-- from the rows. A product has up to 16 stripes per shard (a like picks one at random, so likes of
-- one hot product rarely queue for one row lock); each stripe is a component of the product's
-- PN-counter, which every node merges into memory (src/likes/counter.rs).
CREATE TABLE like_tallies (
    product_id uuid NOT NULL,
    stripe     smallint NOT NULL CHECK (stripe >= 0),
    likes      bigint NOT NULL DEFAULT 0 CHECK (likes >= 0),
    unlikes    bigint NOT NULL DEFAULT 0 CHECK (unlikes >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, stripe)
);
-- Nodes read the rows changed since they last looked: a range scan.
CREATE INDEX like_tallies_by_update ON like_tallies (updated_at);
-- The likes of before are counted from the rows themselves: whatever the old per-node counts had
-- drifted to, the tallies start exact.
INSERT INTO like_tallies (product_id, stripe, likes) SELECT product_id, 0, count(*) FROM likes GROUP BY product_id;
