-- Stock taken by orders, per order and product: the checkout saga reserves all of an order's items
-- in one transaction (or none), and releases them if the order then fails. The primary key makes a
-- retried reservation a no-op.
CREATE TABLE stock_reservations (
    order_id   uuid NOT NULL,
    product_id uuid NOT NULL REFERENCES products (id),
    quantity   integer NOT NULL CHECK (quantity > 0),
    released   boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, product_id)
);
