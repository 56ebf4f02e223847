//! The API suite: every endpoint against real PostgreSQL (see `helpers`), plus `keel` itself run as
//! a process. One binary, so the test cluster is started once.

mod accounts_by_email;
mod authorization;
mod carts;
mod catalog;
mod checkout;
mod consistency;
mod email;
mod erasure;
mod errors;
mod half_open;
mod hardening;
mod helpers;
mod likes;
mod limits;
mod nats_faults;
mod ops;
mod peers;
mod processes;
mod promises;
mod queue;
mod replica_reads;
mod replicated;
mod saga;
mod search;
mod sessions;
mod shard_map;
mod shard_moves;
mod shard_stats;
mod shards_up;
mod starvation;
mod tls;
mod two_nodes;
mod users;
mod wallet;
mod webhooks;
