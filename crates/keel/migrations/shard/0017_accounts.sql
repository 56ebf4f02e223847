-- Accounts: passwords, sessions with rotating refresh tokens, one-time codes, locks.

-- `token_hash` belonged to the bearer tokens of before sessions; no token is checked against it now.
ALTER TABLE users
    ALTER COLUMN token_hash DROP NOT NULL,
    -- Argon2id, as a PHC string (its parameters inside, so they can be raised and the hash redone at
    -- the next sign-in). Null: the user signs in with e-mailed codes only.
    ADD COLUMN password_hash text,
    ADD COLUMN email_verified_at timestamptz,
    -- Set by an administrator: no sign-in, no refresh, and every session revoked.
    ADD COLUMN locked_at timestamptz;

-- A signed-in device. Its refresh token is not stored: it is derived from the session's id and
-- generation with the signing key (see `accounts::tokens`), so a lost answer can be given again.
CREATE TABLE sessions (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    bucket       smallint NOT NULL,
    -- Of the refresh token: each refresh answers the next one and supersedes the one presented.
    generation   integer NOT NULL DEFAULT 0,
    -- When the current generation was issued (its access token's issue time, so it can be re-made).
    rotated_at   timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    -- The refresh token's end: moved on by each refresh.
    expires_at   timestamptz NOT NULL,
    user_agent   text NOT NULL DEFAULT '',
    revoked_at   timestamptz,
    revoked_why  text
);
CREATE INDEX sessions_user_idx ON sessions (user_id) WHERE revoked_at IS NULL;
-- Every node reads the recent revocations of every shard every couple of seconds.
CREATE INDEX sessions_revoked_idx ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX sessions_bucket_idx ON sessions (bucket);

-- Codes and tokens sent by e-mail: one live per user and purpose (a new one replaces it). The secret
-- is not stored: it is made from the nonce with the signing key named (see `accounts::codes`), when
-- the e-mail is written and when it is checked.
CREATE TABLE one_time_codes (
    user_id       uuid NOT NULL REFERENCES users (id),
    purpose       text NOT NULL CHECK (purpose IN ('sign_in', 'verify_email', 'password_reset')),
    nonce         bytea NOT NULL,
    key_id        text NOT NULL,
    -- The address it was sent to (an e-mail change is verified at the new address).
    email         text NOT NULL,
    expires_at    timestamptz NOT NULL,
    attempts_left smallint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, purpose)
);
