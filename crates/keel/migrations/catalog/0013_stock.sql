-- Stock as on-hand and reserved, so that what the admin sets and what checkouts hold never add up to
-- stock that was never there.
--
-- - `on_hand`: the units the shop holds and has not sold, those held by orders being decided
--   included. The admin sets it (PUT /v1/products/{id}/inventory); a sale takes from it.
-- - `reserved`: the units held by orders the checkout saga has not decided yet.
-- - `stock`: what a new order can take, on_hand − reserved (the API's `stock`, as before).
-- - `sold`: the units confirmed orders took, all told. Only the admin changes on_hand + sold.
--
-- Before, `stock` alone was decremented by a reservation and incremented by a release, and an admin's
-- absolute write in between was then raised by the release: units that were never there.
ALTER TABLE inventory
    ADD COLUMN on_hand bigint,
    ADD COLUMN reserved bigint NOT NULL DEFAULT 0,
    ADD COLUMN sold bigint NOT NULL DEFAULT 0 CHECK (sold >= 0);
-- What reservations of before took (sold, as below).
UPDATE inventory i SET on_hand = i.stock, sold = coalesce(
    (SELECT sum(quantity) FROM stock_reservations r WHERE r.product_id = i.product_id AND NOT r.released), 0);
ALTER TABLE inventory ALTER COLUMN on_hand SET NOT NULL;
ALTER TABLE inventory DROP COLUMN stock;
ALTER TABLE inventory
    ADD COLUMN stock bigint GENERATED ALWAYS AS (on_hand - reserved) STORED,
    ADD CONSTRAINT inventory_reserved_within_on_hand CHECK (reserved >= 0 AND reserved <= on_hand);

-- A reservation is `held` while its order is being decided, `sold` once the order is confirmed (its
-- units then leave on_hand and reserved together) and `released` once the order failed (its units
-- leave reserved only). `user_id` routes the reconciler to the order's shard.
--
-- The reservations of before took their units out of `stock` at once, sold or not, and a confirmed
-- order's stayed unreleased: they become `sold` (on_hand was set to that stock above). One whose
-- order is still pending and then fails gives its units back to on_hand, as before.
ALTER TABLE stock_reservations
    ADD COLUMN state text NOT NULL DEFAULT 'held' CHECK (state IN ('held', 'sold', 'released')),
    ADD COLUMN user_id uuid,
    ADD COLUMN decided_at timestamptz;
UPDATE stock_reservations SET state = CASE WHEN released THEN 'released' ELSE 'sold' END;
ALTER TABLE stock_reservations DROP COLUMN released;
-- Kept for the queries that read it.
ALTER TABLE stock_reservations ADD COLUMN released boolean GENERATED ALWAYS AS (state = 'released') STORED;
-- The reconciler looks for reservations held too long.
CREATE INDEX stock_reservations_held_idx ON stock_reservations (created_at) WHERE state = 'held';
