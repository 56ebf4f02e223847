-- Every shard of the deployment, and the shard map's version.
--
-- A shard listed in the configuration (KEEL_SHARD_URLS, in order) has no URL here: each process
-- takes it from its own configuration, with its own credentials. A shard added while running
-- (POST /v1/admin/shards) is stored with the URL it was added with, so that every process finds it.
CREATE TABLE shards (
    shard smallint PRIMARY KEY CHECK (shard >= 0),
    url text,
    added_at timestamptz NOT NULL DEFAULT now()
);

-- The shards the map already names (a deployment made before this table).
INSERT INTO shards (shard) SELECT DISTINCT shard FROM shard_map ON CONFLICT DO NOTHING;

-- Raised by every change to `shards` or `shard_map`, in the same transaction, and announced with
-- NOTIFY keel_shard_map: a process routes by the version it loaded and loads again when it moves.
CREATE TABLE shard_map_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version bigint NOT NULL
);
INSERT INTO shard_map_version (version) VALUES (1);
