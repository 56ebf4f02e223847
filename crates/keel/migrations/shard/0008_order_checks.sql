-- An order's failure reason is one the code knows (`FailureReason` in src/events.rs), and an order
-- has one exactly when it failed. Its status is checked since 0003 (`orders_status_check`).
ALTER TABLE orders
    ADD CONSTRAINT orders_failure_reason_check
        CHECK (failure_reason IN ('out_of_stock', 'insufficient_funds')),
    ADD CONSTRAINT orders_failure_reason_iff_failed
        CHECK ((status = 'failed') = (failure_reason IS NOT NULL));
