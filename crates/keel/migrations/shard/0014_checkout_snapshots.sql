-- A checkout charges a snapshot of the cart: the owner's version when it read the cart
-- (`users.owner_version`, bumped by every cart write). Each cart item carries the version of the write
-- that last set it, so a confirmed order removes from the cart only the items it bought as they were
-- then, never one added or changed after the checkout; and another checkout (another
-- Idempotency-Key) leaves out the items a pending order holds that way, and is refused when nothing
-- else is in the cart.
ALTER TABLE orders ADD COLUMN cart_version bigint;
ALTER TABLE cart_items ADD COLUMN revision bigint NOT NULL DEFAULT 0;

-- A checkout looks for its user's pending orders; the reconciler for the oldest pending orders. Few
-- orders are pending at any time: the index stays small.
CREATE INDEX orders_pending_idx ON orders (user_id, created_at) WHERE status = 'pending';
