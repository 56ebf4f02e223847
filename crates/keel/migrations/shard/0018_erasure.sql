-- Erasure (right to erasure, src/accounts/erasure.rs): a user's account can be deleted. Their personal
-- data goes; their orders and ledger rows stay for the accounts, re-pointed to a pseudonym that
-- nothing in Keel links back to them.

-- `erasure_requested_at`: the owner asked; the account is locked until the erasure job removes the
-- row. `erased_as`: the pseudonym the kept rows are re-pointed to, chosen once when asked so that a
-- repeated run re-points to the same one.
ALTER TABLE users
    ADD COLUMN erasure_requested_at timestamptz,
    ADD COLUMN erased_as uuid;

-- The kept rows outlive their user row: they can no longer reference it.
ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey;
ALTER TABLE wallets DROP CONSTRAINT wallets_user_id_fkey;
ALTER TABLE wallet_deposits DROP CONSTRAINT wallet_deposits_user_id_fkey;
ALTER TABLE wallet_debits DROP CONSTRAINT wallet_debits_user_id_fkey;
ALTER TABLE payments DROP CONSTRAINT payments_user_id_fkey;
