-- Follows and the feed (src/feed/, docs/FEED.md). Every table is keyed by a user and lives on that
-- user's shard, with the bucket column, trigger and replica identity that bucket moves need
-- (migration `buckets`).

-- Counted in the same transaction as the edge they count: exact, whatever retries happen.
ALTER TABLE users
    ADD COLUMN followers_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN following_count bigint NOT NULL DEFAULT 0;
-- Nodes ask every shard for the accounts over the fan-out limit (`feed::LargeAccounts`).
CREATE INDEX users_followers_count_idx ON users (followers_count);

-- The follower's side, written by the follow request: `user_id` follows `followee_id`. An unfollow
-- keeps the row, inactive: `version` grows with every change, so the other side, written later by
-- a job, can apply changes in any order and end where this row is.
CREATE TABLE follows (
    user_id       uuid NOT NULL REFERENCES users (id),
    followee_id   uuid NOT NULL,
    -- The followee's name when followed: lists and feeds show names without a query per user.
    followee_name text NOT NULL,
    active        boolean NOT NULL,
    version       bigint NOT NULL,
    changed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, followee_id)
);
CREATE INDEX follows_list_idx ON follows (user_id, changed_at DESC, followee_id DESC) WHERE active;

-- The followed user's side, written by the job of a follow's event: `follower_id` follows `user_id`.
CREATE TABLE followers (
    user_id       uuid NOT NULL,
    follower_id   uuid NOT NULL,
    follower_name text NOT NULL,
    active        boolean NOT NULL,
    version       bigint NOT NULL,
    changed_at    timestamptz NOT NULL,
    PRIMARY KEY (user_id, follower_id)
);
CREATE INDEX followers_list_idx ON followers (user_id, changed_at DESC, follower_id DESC) WHERE active;

-- What a user did that their followers see: one row per live activity (a like, a follow); withdrawn
-- (unliked, unfollowed) by deleting it.
CREATE TABLE activities (
    id          uuid NOT NULL UNIQUE,
    user_id     uuid NOT NULL REFERENCES users (id),
    actor_name  text NOT NULL,
    verb        text NOT NULL CHECK (verb IN ('liked', 'followed')),
    object_type text NOT NULL CHECK (object_type IN ('product', 'user')),
    object_id   uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, verb, object_id)
);
CREATE INDEX activities_recent_idx ON activities (user_id, created_at DESC, id DESC);

-- A reader's stored feed: activities of those they follow, copied here by the fan-out job. Bounded
-- by housekeeping to the newest `KEEL_FEED_LENGTH` per reader.
CREATE TABLE feed_items (
    user_id     uuid NOT NULL,
    activity_id uuid NOT NULL,
    actor_id    uuid NOT NULL,
    actor_name  text NOT NULL,
    verb        text NOT NULL,
    object_type text NOT NULL,
    object_id   uuid NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, activity_id)
);
CREATE INDEX feed_items_page_idx ON feed_items (user_id, created_at DESC, activity_id DESC);
-- A withdrawn activity is deleted from every feed that has it.
CREATE INDEX feed_items_activity_idx ON feed_items (activity_id);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['follows', 'followers', 'activities', 'feed_items'] LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN bucket smallint NOT NULL', t);
        EXECUTE format('CREATE TRIGGER keel_a_bucket BEFORE INSERT ON %I FOR EACH ROW EXECUTE FUNCTION keel_set_bucket_of_user()', t);
        EXECUTE format('ALTER TABLE %I REPLICA IDENTITY FULL', t);
        EXECUTE format('CREATE TRIGGER keel_b_guard BEFORE INSERT OR UPDATE OR DELETE ON %I FOR EACH ROW EXECUTE FUNCTION keel_guard_bucket()', t);
    END LOOP;
END $$;
