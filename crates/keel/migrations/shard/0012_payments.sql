-- Store credit from a payment provider (POST /v1/payments/events): each payment credits once,
-- whatever the provider's retries. A payment's row is written first, claiming its id (a second
-- delivery of the event waits on it, then finds it), and its deposit in the same transaction, on the
-- shard of the user credited: a payment id is either here with its deposit, or credited nowhere.
CREATE TABLE payments (
    payment_id   text PRIMARY KEY CHECK (length(payment_id) BETWEEN 1 AND 255),  -- the provider's id
    user_id      uuid NOT NULL REFERENCES users (id),
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    -- Written after the claim, in the same transaction: checked at commit.
    deposit_id   uuid NOT NULL UNIQUE REFERENCES wallet_deposits (id) DEFERRABLE INITIALLY DEFERRED,
    received_at  timestamptz NOT NULL DEFAULT now()
);
