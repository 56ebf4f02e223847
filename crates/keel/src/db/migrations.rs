//! Schema migrations, embedded in the binary: one ordered list per kind of database. Applying them
//! is safe from many processes at once (an advisory lock serialises them) and applies each once.

use super::{Db, DbError, Sql};

/// The two kinds of database Keel owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    Catalog,
    Shard,
}

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const CATALOG: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../../migrations/catalog/0001_init.sql") },
    Migration { version: 2, name: "reservations", sql: include_str!("../../migrations/catalog/0002_reservations.sql") },
    // Product events (search index, webhook fan-out) and webhook deliveries run from here.
    Migration { version: 3, name: "jobs", sql: keel_outbox::SCHEMA },
    Migration {
        version: 4,
        name: "search and webhooks",
        sql: include_str!("../../migrations/catalog/0004_search_and_webhooks.sql"),
    },
    Migration { version: 5, name: "schedules", sql: keel_outbox::SCHEDULE_SCHEMA },
    Migration { version: 6, name: "like counts", sql: include_str!("../../migrations/catalog/0006_like_counts.sql") },
    Migration {
        version: 7,
        name: "like counts by update",
        sql: include_str!("../../migrations/catalog/0007_like_counts_by_update.sql"),
    },
    Migration { version: 8, name: "versions", sql: include_str!("../../migrations/catalog/0009_versions.sql") },
    // Events relayed to NATS stay `relayed` until a handler ran them (relayed again if NATS lost them).
    Migration { version: 9, name: "relayed jobs", sql: keel_outbox::RELAY_SCHEMA },
    // Stock as on-hand and reserved; reservations held, sold or released.
    Migration { version: 10, name: "stock", sql: include_str!("../../migrations/catalog/0013_stock.sql") },
    Migration { version: 11, name: "retention", sql: include_str!("../../migrations/catalog/0016_retention.sql") },
    Migration {
        version: 12,
        name: "shard registry",
        sql: include_str!("../../migrations/catalog/0019_shard_registry.sql"),
    },
    Migration { version: 13, name: "shard moves", sql: include_str!("../../migrations/catalog/0021_shard_moves.sql") },
    Migration { version: 14, name: "move cancel", sql: include_str!("../../migrations/catalog/0023_move_cancel.sql") },
    // Runners are woken after the enqueuing commit (`Db::commit_jobs`), not by a NOTIFY in it.
    Migration { version: 15, name: "wake after commit", sql: keel_outbox::WAKE_SCHEMA },
];

const SHARD: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../../migrations/shard/0001_init.sql") },
    // The outbox and job queue of keel-outbox: each shard's events live beside the rows they are about.
    Migration { version: 2, name: "jobs", sql: keel_outbox::SCHEMA },
    Migration { version: 3, name: "orders", sql: include_str!("../../migrations/shard/0003_orders.sql") },
    Migration { version: 4, name: "schedules", sql: keel_outbox::SCHEDULE_SCHEMA },
    Migration { version: 5, name: "likes", sql: include_str!("../../migrations/shard/0005_likes.sql") },
    // Versions count per database; the files of both folders are numbered in one sequence.
    Migration { version: 6, name: "order checks", sql: include_str!("../../migrations/shard/0008_order_checks.sql") },
    Migration {
        version: 7,
        name: "owner versions and like tallies",
        sql: include_str!("../../migrations/shard/0010_owner_versions_and_like_tallies.sql"),
    },
    Migration {
        version: 8,
        name: "e-mail deliveries",
        sql: include_str!("../../migrations/shard/0011_email_deliveries.sql"),
    },
    Migration { version: 9, name: "relayed jobs", sql: keel_outbox::RELAY_SCHEMA },
    // Payments credited from the provider's events, once per payment id.
    Migration { version: 10, name: "payments", sql: include_str!("../../migrations/shard/0012_payments.sql") },
    // Checkouts charge a snapshot of the cart; reconciling finds pending orders by age.
    Migration {
        version: 11,
        name: "checkout snapshots",
        sql: include_str!("../../migrations/shard/0014_checkout_snapshots.sql"),
    },
    Migration { version: 12, name: "retention", sql: include_str!("../../migrations/shard/0015_retention.sql") },
    // Accounts: passwords, sessions, one-time codes, locks.
    Migration { version: 13, name: "accounts", sql: include_str!("../../migrations/shard/0017_accounts.sql") },
    // Erasure: the users marked, the kept order and ledger rows freed from the user row.
    Migration { version: 14, name: "erasure", sql: include_str!("../../migrations/shard/0018_erasure.sql") },
    // Each user's rows carry the user's bucket, and each bucket a fence: what moving buckets needs.
    Migration { version: 15, name: "buckets", sql: include_str!("../../migrations/shard/0020_buckets.sql") },
    // E-mail records and jobs carry their user's bucket too: a move takes them along.
    Migration { version: 16, name: "moving jobs", sql: include_str!("../../migrations/shard/0022_moving_jobs.sql") },
    Migration { version: 17, name: "wake after commit", sql: keel_outbox::WAKE_SCHEMA },
    // Follows (both sides), activities and stored feeds, with their counts on the user row.
    Migration {
        version: 18,
        name: "follows and feed",
        sql: include_str!("../../migrations/shard/0024_follows_and_feed.sql"),
    },
];

/// An arbitrary constant that names Keel's migration lock among the database's advisory locks.
const MIGRATION_LOCK: i64 = 0x006b_6565_6c6d_6967; // "keelmig" in ASCII

impl Schema {
    fn migrations(self) -> &'static [Migration] {
        match self {
            Schema::Catalog => CATALOG,
            Schema::Shard => SHARD,
        }
    }

    /// The version this binary expects.
    pub fn latest(self) -> i32 {
        self.migrations().last().map_or(0, |m| m.version)
    }
}

/// Applies the pending migrations of `schema` to `db`; returns how many were applied.
pub async fn apply(db: &Db, schema: Schema) -> Result<usize, DbError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    tx.exec("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS keel_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let current: i32 = tx.row("SELECT coalesce(max(version), 0) FROM keel_migrations", &[]).await?.get(0);
    let pending: Vec<&Migration> = schema.migrations().iter().filter(|m| m.version > current).collect();
    for migration in &pending {
        tracing::info!(db = db.name(), version = migration.version, name = migration.name, "applying migration");
        tx.batch_execute(migration.sql).await?;
        tx.exec("INSERT INTO keel_migrations (version, name) VALUES ($1, $2)", &[&migration.version, &migration.name])
            .await?;
    }
    tx.commit().await?;
    Ok(pending.len())
}

/// The schema version a database is at (0 if never migrated).
pub async fn current_version(db: &Db) -> Result<i32, DbError> {
    let client = db.client().await?;
    let row = client
        .row(
            "SELECT CASE WHEN to_regclass('keel_migrations') IS NULL THEN 0
                    ELSE (SELECT coalesce(max(version), 0) FROM keel_migrations) END",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
