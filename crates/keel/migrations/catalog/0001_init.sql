-- The catalogue database: everything not owned by one user, plus the directory of where users live.

-- Which shard holds each of the 1024 virtual buckets (see keel-shard). Seeded by `keel migrate`.
CREATE TABLE shard_map (
    bucket smallint PRIMARY KEY CHECK (bucket >= 0 AND bucket < 1024),
    shard  smallint NOT NULL CHECK (shard >= 0)
);

-- A lookup table that makes e-mail addresses unique across shards (a Vitess-style lookup vindex).
-- A claim is written before the user row on its shard; `claimed_at` lets a claim whose user never
-- appeared (a crash between the two writes) be taken over later.
CREATE TABLE user_emails (
    email      text PRIMARY KEY,
    user_id    uuid NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE products (
    id          uuid PRIMARY KEY,  -- UUIDv7: time-ordered, so keyset pages follow creation order
    sku         text NOT NULL UNIQUE,
    name        text NOT NULL,
    description text NOT NULL,
    price_cents bigint NOT NULL CHECK (price_cents >= 0),
    like_count  bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Stock lives apart from the product row: it is strongly consistent and hotly updated, while the
-- product text is cached and rarely written, and they should not contend for one row lock.
CREATE TABLE inventory (
    product_id uuid PRIMARY KEY REFERENCES products (id) ON DELETE CASCADE,
    stock      bigint NOT NULL CHECK (stock >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
