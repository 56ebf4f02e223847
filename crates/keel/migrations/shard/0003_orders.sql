-- Orders and the checkout saga's records on the user's shard.

CREATE TABLE orders (
    id             uuid PRIMARY KEY,   -- UUIDv7: newest first is id order
    user_id        uuid NOT NULL REFERENCES users (id),
    status         text NOT NULL CHECK (status IN ('pending', 'confirmed', 'failed')),
    total_cents    bigint NOT NULL CHECK (total_cents >= 0),
    failure_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_user_idx ON orders (user_id, id DESC);

CREATE TABLE order_items (
    order_id    uuid NOT NULL REFERENCES orders (id),
    product_id  uuid NOT NULL,
    quantity    integer NOT NULL CHECK (quantity > 0),
    price_cents bigint NOT NULL,       -- the price when the order was placed
    PRIMARY KEY (order_id, product_id)
);

-- Money out: one debit per order at most, so a retried saga step can never charge twice.
CREATE TABLE wallet_debits (
    order_id     uuid PRIMARY KEY REFERENCES orders (id),
    user_id      uuid NOT NULL REFERENCES users (id),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wallet_debits_user_idx ON wallet_debits (user_id);

-- A replayed 202 must carry the same Location as the first answer.
ALTER TABLE idempotency_keys ADD COLUMN location text;
