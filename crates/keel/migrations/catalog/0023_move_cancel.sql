-- A move can be cancelled until its map switches (docs/SHARDING.md): the worker carrying it out then
-- undoes what it made (replication, copied rows) and records it `failed`.
ALTER TABLE shard_moves ADD COLUMN cancelled_at timestamptz;
