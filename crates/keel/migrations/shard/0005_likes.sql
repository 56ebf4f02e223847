-- A user's likes, on the user's shard: the primary key makes a like idempotent per user and product,
-- and decides, under concurrency, which of two likes (or a like and an unlike) changed anything.
CREATE TABLE likes (
    user_id    uuid NOT NULL REFERENCES users (id),
    product_id uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, product_id)
);
