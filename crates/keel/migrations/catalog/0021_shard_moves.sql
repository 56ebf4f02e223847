-- Bucket moves between shards (docs/SHARDING.md): one row each, its state advanced by whichever
-- worker process holds the movers' advisory lock, and resumed from it after a crash.
CREATE TABLE shard_moves (
    id            uuid PRIMARY KEY,
    buckets       smallint[] NOT NULL,
    -- The shard each bucket was on when the move was asked for, in the order of `buckets`.
    sources       smallint[] NOT NULL,
    to_shard      smallint NOT NULL,
    state         text NOT NULL CHECK (state IN ('copying', 'catching_up', 'cutover', 'cleanup', 'done', 'failed')),
    rows_copied   bigint NOT NULL DEFAULT 0,
    rows_total    bigint NOT NULL DEFAULT 0,
    error         text,
    -- How long the moving buckets' writes were fenced at the cutover that switched the map (from
    -- the fences' first lock to their commit); null if the worker died before it could record it.
    pause_ms      double precision,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX shard_moves_unfinished_idx ON shard_moves (created_at) WHERE state NOT IN ('done', 'failed');
