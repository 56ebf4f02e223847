-- A user-shard database: everything owned by one user lives on that user's shard.

CREATE TABLE users (
    id         uuid PRIMARY KEY,
    bucket     smallint NOT NULL,  -- kept so a bucket's users can be found and moved to another shard
    name       text NOT NULL,
    email      text NOT NULL,
    bio        text NOT NULL DEFAULT '',
    token_hash bytea NOT NULL,     -- SHA-256 of the token's secret; the token itself is never stored
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_bucket_idx ON users (bucket);

CREATE TABLE wallets (
    user_id       uuid PRIMARY KEY REFERENCES users (id),
    balance_cents bigint NOT NULL DEFAULT 0 CHECK (balance_cents >= 0)
);

-- The ledger of money in: the balance is always the sum of these (less what later issues debit).
CREATE TABLE wallet_deposits (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wallet_deposits_user_idx ON wallet_deposits (user_id, created_at);

CREATE TABLE cart_items (
    user_id    uuid NOT NULL REFERENCES users (id),
    product_id uuid NOT NULL,  -- lives in the catalogue database: no foreign key across databases
    quantity   integer NOT NULL CHECK (quantity > 0),
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, product_id)
);

-- Idempotency-Key records: the first request with a key stores its response; repeats replay it.
CREATE TABLE idempotency_keys (
    user_id      uuid NOT NULL,
    key          text NOT NULL,
    request_hash bytea NOT NULL,   -- SHA-256 of operation and body: the same key with another body is refused
    status_code  smallint NOT NULL,
    response     text NOT NULL,    -- the body as sent, byte for byte: a replay must be identical
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
