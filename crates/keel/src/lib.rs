//! Keel, the service: configuration, the databases, the HTTP API and the domain behind it.
//! Mechanisms with no knowledge of the shop live in their own crates (`keel-shard`, `keel-pg`).

pub mod admin;
pub mod carts;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod consistency;
pub mod db;
pub mod embedded;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod jobs;
pub mod likes;
pub mod mail;
pub mod orders;
pub mod search;
pub mod startup;
pub mod telemetry;
pub mod users;
pub mod wallet;
pub mod webhooks;
