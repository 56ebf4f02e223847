-- Like counts as PN-counters (keel-crdt): one component per product and node, written only by that
-- node (cumulative likes and unlikes it accepted), flushed from memory at most a second after the
-- change. A product's count is the merge of its components: the sum of likes − unlikes.
CREATE TABLE like_counts (
    product_id uuid NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    node       text NOT NULL,
    likes      bigint NOT NULL CHECK (likes >= 0),
    unlikes    bigint NOT NULL CHECK (unlikes >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, node)
);

-- The counter replaces the column the first schema reserved for it.
ALTER TABLE products DROP COLUMN like_count;
