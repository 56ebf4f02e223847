-- Product search: a document per product, derived asynchronously from product events by a worker.
-- Search reads only this table, so a burst of searches never touches the products' hot rows, and the
-- index may lag the catalogue by its budget (the consistency table: eventual, target under 2 s).
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE product_search (
    product_id  uuid PRIMARY KEY REFERENCES products (id) ON DELETE CASCADE,
    name        text NOT NULL,
    description text NOT NULL,
    price_cents bigint NOT NULL,
    in_stock    boolean NOT NULL,
    -- The name weighs more than the description in the ranking.
    document    tsvector NOT NULL,
    -- The newest product or stock change this document reflects: an event handled late never
    -- replaces a newer document.
    version     timestamptz NOT NULL,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX product_search_document_idx ON product_search USING gin (document);
-- Typo tolerance: trigram word similarity of the query to the name.
CREATE INDEX product_search_name_trgm_idx ON product_search USING gin (name gin_trgm_ops);

-- Webhook subscriptions of integrators, and one delivery per (subscription, event).
CREATE TABLE webhook_subscriptions (
    id              uuid PRIMARY KEY,
    url             text NOT NULL,
    events          text[] NOT NULL,
    secret          text NOT NULL,            -- whsec_<base64>: the receivers verify signatures with it
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- Fan-out finds the enabled subscriptions to an event type.
CREATE INDEX webhook_subscriptions_events_idx ON webhook_subscriptions USING gin (events) WHERE enabled;

CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,        -- also the id of the delivery's job
    subscription_id  uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    event_id         uuid NOT NULL,           -- the webhook-id header: the same on every attempt
    event_type       text NOT NULL,
    body             text NOT NULL,           -- fixed at fan-out, so every attempt sends the same bytes
    trace_id         text,                    -- of the request that caused the event
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'retrying', 'succeeded', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    last_status_code integer,
    last_error       text,
    next_attempt_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- A redelivered event fans out to nothing new.
    UNIQUE (subscription_id, event_id)
);
-- A subscription's deliveries, newest first (ids are UUIDv7).
CREATE INDEX webhook_deliveries_subscription_idx ON webhook_deliveries (subscription_id, id DESC);
