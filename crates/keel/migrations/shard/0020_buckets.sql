-- Buckets on the rows, for moving them between shards (see docs/SHARDING.md).
--
-- Every table keyed by a user carries the user's bucket (0–1023, `keel-shard`'s hash), set on
-- insert by a trigger, so that a move can name exactly the rows of its buckets: a publication's row
-- filter (`WHERE bucket IN (…)`) for logical replication, and the deletes after the move.

-- The bucket of a user id, as keel-shard computes it: SHA-256 of the id's canonical text, the first
-- eight bytes as a big-endian integer, modulo 1024. 1024 divides 2^64, so that is the low ten bits
-- of the eighth byte pair: hex digits 13–16 of the digest. The Rust reference vectors are checked
-- against this function in the tests.
CREATE FUNCTION keel_bucket(id uuid) RETURNS smallint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (('x' || substr(encode(sha256(convert_to(id::text, 'UTF8')), 'hex'), 13, 4))::bit(16)::int & 1023)::smallint;

-- Fill NEW.bucket from the row's user: `user_id`, `id` on users, the order on order_items. One
-- function each: PL/pgSQL resolves every field an expression names, even in a branch not taken.
CREATE FUNCTION keel_set_bucket_of_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.bucket IS NULL THEN
        NEW.bucket := keel_bucket(NEW.id);
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION keel_set_bucket_of_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.bucket IS NULL THEN
        NEW.bucket := (SELECT bucket FROM orders WHERE id = NEW.order_id);
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION keel_set_bucket_of_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.bucket IS NULL THEN
        NEW.bucket := keel_bucket(NEW.user_id);
    END IF;
    RETURN NEW;
END $$;

-- One row per bucket: `moved_to` is set on the shard a bucket left, so that a write of a process
-- still routing by the old map is refused (SQLSTATE KB001) rather than written where nobody reads
-- it. Every write to a user's row takes a KEY SHARE lock on its bucket's row; a move's cutover holds
-- the rows of its buckets FOR UPDATE for a moment, so writes to those buckets, and only those, wait.
CREATE TABLE keel_buckets (
    bucket   smallint PRIMARY KEY CHECK (bucket >= 0 AND bucket < 1024),
    moved_to smallint
);
INSERT INTO keel_buckets (bucket) SELECT generate_series(0, 1023);

CREATE FUNCTION keel_guard_bucket() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    b smallint := CASE TG_OP WHEN 'DELETE' THEN OLD.bucket ELSE NEW.bucket END;
    moved smallint;
BEGIN
    -- The move's own copy and deletes of a bucket's rows.
    IF current_setting('keel.moving_buckets', true) = 'on' THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    SELECT moved_to INTO moved FROM keel_buckets WHERE bucket = b FOR KEY SHARE;
    IF moved IS NOT NULL THEN
        RAISE EXCEPTION 'bucket % has moved to shard %', b, moved USING ERRCODE = 'KB001';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END $$;

DO $$
DECLARE
    t record;
BEGIN
    -- (table, what its bucket comes from)
    FOR t IN SELECT * FROM (VALUES
        ('users', 'id'),
        ('wallets', 'user_id'),
        ('wallet_deposits', 'user_id'),
        ('wallet_debits', 'user_id'),
        ('cart_items', 'user_id'),
        ('idempotency_keys', 'user_id'),
        ('orders', 'user_id'),
        ('order_items', 'order'),
        ('likes', 'user_id'),
        ('payments', 'user_id'),
        ('sessions', 'user_id'),
        ('one_time_codes', 'user_id')
    ) AS v(name, source)
    LOOP
        -- users has had its bucket from the start (the application sets it).
        EXECUTE format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS bucket smallint', t.name);
        IF t.source = 'user_id' THEN
            EXECUTE format('UPDATE %I SET bucket = keel_bucket(user_id)', t.name);
            EXECUTE format('CREATE TRIGGER keel_a_bucket BEFORE INSERT ON %I FOR EACH ROW EXECUTE FUNCTION keel_set_bucket_of_user()', t.name);
        ELSIF t.source = 'id' THEN
            EXECUTE format('UPDATE %I SET bucket = keel_bucket(id)', t.name);
            EXECUTE format('CREATE TRIGGER keel_a_bucket BEFORE INSERT ON %I FOR EACH ROW EXECUTE FUNCTION keel_set_bucket_of_id()', t.name);
        ELSE
            EXECUTE format('UPDATE %I i SET bucket = o.bucket FROM orders o WHERE o.id = i.order_id', t.name);
            EXECUTE format('CREATE TRIGGER keel_a_bucket BEFORE INSERT ON %I FOR EACH ROW EXECUTE FUNCTION keel_set_bucket_of_order()', t.name);
        END IF;
        EXECUTE format('ALTER TABLE %I ALTER COLUMN bucket SET NOT NULL', t.name);
        -- Logical replication filters UPDATEs and DELETEs on the replica identity's columns only, so
        -- the identity must cover `bucket`: FULL (the old row in the WAL of an UPDATE or DELETE while
        -- wal_level is logical). Not a unique index on (key, bucket): a unique index that is not an
        -- upsert's arbiter turns a concurrent ON CONFLICT DO NOTHING/UPDATE into a unique
        -- violation (it did, for payments and one-time codes). The subscriber finds rows by its
        -- primary key all the same.
        EXECUTE format('ALTER TABLE %I REPLICA IDENTITY FULL', t.name);
        EXECUTE format('CREATE TRIGGER keel_b_guard BEFORE INSERT OR UPDATE OR DELETE ON %I FOR EACH ROW EXECUTE FUNCTION keel_guard_bucket()', t.name);
    END LOOP;
END $$;

-- A move's marker, written on the shard it moves from once the moving buckets are fenced and
-- replicated with them: when the new shard has it, it has every write committed before the fence.
-- Each cutover attempt writes a new nonce: a retried cutover must not take the marker of an earlier
-- attempt for its own.
CREATE TABLE keel_move_markers (
    move_id uuid NOT NULL,
    source  smallint NOT NULL,
    nonce   uuid NOT NULL,
    PRIMARY KEY (move_id, source)
);
