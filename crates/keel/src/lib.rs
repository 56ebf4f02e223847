//! Keel, the service. Mechanisms with no knowledge of the shop live in their own crates: `keel-pg`
//! (private PostgreSQL clusters), `keel-shard` (buckets and the shard map), `keel-outbox` (the
//! outbox, job queue and JetStream transport), `keel-cache` (the two-tier cache and write-back),
//! `keel-crdt` (convergent counters) and `keel-random` (jitter and ids). This crate is the shop, in
//! layers with no import cycle among them; a layer uses the ones below it (the capabilities that
//! need the whole application state take `state::AppState`, which names only the capabilities that
//! own a part of it):
//!
//! - **foundations**: [`config`], [`consistency`] (the table of staleness budgets), [`db`],
//!   [`events`], [`ids`] (user, product and order ids), [`money`], [`telemetry`], [`shutdown`];
//! - **[`http`]**: the HTTP toolkit (errors, extractors, auth, trace, middleware, idempotency keys,
//!   cache headers, pagination), which knows no domain;
//! - **capabilities**, one home each: [`accounts`] (sessions, credentials), [`users`], [`catalog`], [`carts`], [`wallet`], [`orders`]
//!   (with the checkout saga), [`likes`], [`search`], [`webhooks`], [`email`], and [`admin`];
//! - **assembly**: [`state`] (what handlers reach), [`app`] (the route list, the OpenAPI document,
//!   serving and draining), [`jobs`] (which handler runs which job kind, and the worker runtime),
//!   [`embedded`] (`keel up`) and [`cli`].

/// An error that stops a process (at start-up, or while serving): shown to the operator and logged,
/// never to an API client. Any error converts into it with `?`; a context that helps the operator
/// (which setting, which step) is added where the error is met.
pub type Fatal = Box<dyn std::error::Error + Send + Sync>;

pub mod accounts;
pub mod admin;
pub mod app;
pub mod carts;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod consistency;
pub mod db;
pub mod email;
pub mod embedded;
pub mod events;
pub mod feed;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod likes;
pub mod money;
pub mod orders;
pub mod search;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod text_enum;
pub mod users;
pub mod wallet;
pub mod webhooks;
