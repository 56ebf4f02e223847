//! Storage, for the capacity plan: bytes per user on a shard. Read from every shard database of the
//! run's main `keel up` once the scenarios have written to it: users, rows of each user table and of
//! the queue, `pg_total_relation_size` of each (table, indexes and TOAST), and `pg_database_size`.
//! An empty shard has a size of its own (PostgreSQL's catalog, the empty tables' indexes, the bucket
//! table): it is measured once on a shard database made and migrated for it by `keel migrate`, and
//! subtracted from each shard's before dividing by its users.

use std::path::Path;

use serde::Serialize;

use crate::scenarios::connect;
use crate::setup::Keel;

/// The user tables: every table that holds a user's rows, the set a bucket move copies. A copy of
/// `keel::db::moves::TABLES` (crates/keel/src/db/moves.rs; keel-bench does not depend on keel):
/// keep the two the same.
pub const USER_TABLES: &[&str] = &[
    "users",
    "wallets",
    "wallet_deposits",
    "wallet_debits",
    "cart_items",
    "idempotency_keys",
    "orders",
    "order_items",
    "likes",
    "payments",
    "sessions",
    "one_time_codes",
    "email_deliveries",
];

/// The queue: the outbox's jobs (finished ones are kept for `KEEL_JOB_RETENTION`, a day by default)
/// and the handlers' record of the events they processed (crates/keel-outbox/src/schema.sql).
pub const QUEUE_TABLES: &[&str] = &["keel_jobs", "keel_processed_events"];

/// S4's no-op jobs, inserted on shard 0: none of them is a user's.
const BENCH_JOB_KIND: &str = "keel.ping";

/// The databases made for the empty shard in the main `keel up`'s cluster (not named `keel_shard_<i>`:
/// those are keel up's shards).
const EMPTY_CATALOG_DB: &str = "bench_storage_catalog";
const EMPTY_SHARD_DB: &str = "bench_storage_shard";

/// One table of one database.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Table {
    pub table: String,
    pub rows: i64,
    /// `pg_total_relation_size`: the table, its indexes and its TOAST.
    pub bytes: i64,
}

/// What one database holds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Database {
    pub database: String,
    pub users: i64,
    /// [`USER_TABLES`], then [`QUEUE_TABLES`].
    pub tables: Vec<Table>,
    /// `pg_database_size`.
    pub bytes: i64,
    /// keel_jobs rows of kind keel.ping: S4's no-op jobs.
    pub bench_jobs: i64,
}

impl Database {
    fn bytes_of(&self, names: &[&str]) -> i64 {
        self.tables.iter().filter(|t| names.contains(&t.table.as_str())).map(|t| t.bytes).sum()
    }

    pub fn user_tables_bytes(&self) -> i64 {
        self.bytes_of(USER_TABLES)
    }

    pub fn queue_bytes(&self) -> i64 {
        self.bytes_of(QUEUE_TABLES)
    }
}

/// Bytes per user of some shards (one, or all of them), less the empty shard's sizes for each.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerUser {
    /// A database's name, or "all shards".
    pub scope: String,
    pub users: i64,
    pub user_tables_bytes: f64,
    pub queue_bytes: f64,
    pub database_bytes: f64,
    pub bench_jobs: i64,
}

/// One table over all the shards.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TablePerUser {
    pub table: String,
    pub rows: i64,
    pub rows_per_user: f64,
    /// Its bytes less the empty shard's (for each shard), per user.
    pub bytes_per_user: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Storage {
    /// Every shard database of the main `keel up`, as measured.
    pub shards: Vec<Database>,
    /// A freshly migrated shard without a row; None if none could be made (then nothing is
    /// subtracted, and the report says so).
    pub empty: Option<Database>,
    /// Why there is no empty shard.
    pub empty_error: Option<String>,
    /// Each shard, then all of them.
    pub per_user: Vec<PerUser>,
    /// Each table over all the shards: [`USER_TABLES`], then [`QUEUE_TABLES`].
    pub tables: Vec<TablePerUser>,
    pub commands: Vec<String>,
}

fn per_user(value: i64, users: i64) -> f64 {
    if users > 0 {
        value as f64 / users as f64
    } else {
        0.0
    }
}

impl Storage {
    /// The figures from what was measured.
    pub fn new(shards: Vec<Database>, empty: Option<Database>, empty_error: Option<String>) -> Storage {
        let zero = Database::default();
        let base = empty.as_ref().unwrap_or(&zero);
        let figures = |scope: String, of: &[&Database]| {
            let n = of.len() as i64;
            let users = of.iter().map(|d| d.users).sum();
            let net = |bytes: &dyn Fn(&Database) -> i64| {
                per_user(of.iter().map(|d| bytes(d)).sum::<i64>() - n * bytes(base), users)
            };
            PerUser {
                scope,
                users,
                user_tables_bytes: net(&Database::user_tables_bytes),
                queue_bytes: net(&Database::queue_bytes),
                database_bytes: net(&|d| d.bytes),
                bench_jobs: of.iter().map(|d| d.bench_jobs).sum(),
            }
        };
        let all: Vec<&Database> = shards.iter().collect();
        let mut per_users: Vec<PerUser> = shards.iter().map(|d| figures(d.database.clone(), &[d])).collect();
        let total = figures("all shards".into(), &all);
        let tables = USER_TABLES
            .iter()
            .chain(QUEUE_TABLES)
            .map(|name| {
                let of = |d: &Database| d.tables.iter().find(|t| t.table == *name).cloned().unwrap_or_default();
                let rows = shards.iter().map(|d| of(d).rows).sum();
                let bytes = shards.iter().map(|d| of(d).bytes).sum::<i64>() - shards.len() as i64 * of(base).bytes;
                TablePerUser {
                    table: (*name).to_owned(),
                    rows,
                    rows_per_user: per_user(rows, total.users),
                    bytes_per_user: per_user(bytes, total.users),
                }
            })
            .collect();
        per_users.push(total);
        Storage { shards, empty, empty_error, per_user: per_users, tables, commands: Vec::new() }
    }

    /// The figures over all the shards; None if nothing was measured.
    pub fn total(&self) -> Option<&PerUser> {
        self.per_user.last().filter(|_| !self.shards.is_empty())
    }
}

/// One database's users, tables and size. A table of the lists that the database does not have
/// (keel-bench's copy of the list is out of date) counts as empty, and is named in `missing`.
async fn database(keel: &Keel, name: &str, missing: &mut Vec<String>) -> Result<Database, String> {
    let client = connect(&keel.db_url(name)).await;
    let fail = |e: tokio_postgres::Error| format!("{name}: {e}");
    let mut tables = Vec::new();
    let mut has_jobs = false;
    for table in USER_TABLES.iter().chain(QUEUE_TABLES) {
        let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[table]).await.map_err(fail)?.get(0);
        has_jobs |= exists && *table == "keel_jobs";
        if !exists {
            missing.push(format!("{name}.{table}"));
            tables.push(Table { table: (*table).to_owned(), rows: 0, bytes: 0 });
            continue;
        }
        let row = client
            .query_one(&format!("SELECT (SELECT count(*) FROM {table}), pg_total_relation_size('{table}')"), &[])
            .await
            .map_err(fail)?;
        tables.push(Table { table: (*table).to_owned(), rows: row.get(0), bytes: row.get(1) });
    }
    let users = tables.iter().find(|t| t.table == "users").map_or(0, |t| t.rows);
    let bench_jobs = if has_jobs {
        client
            .query_one("SELECT count(*) FROM keel_jobs WHERE kind = $1", &[&BENCH_JOB_KIND])
            .await
            .map_err(fail)?
            .get(0)
    } else {
        0
    };
    let bytes = client.query_one("SELECT pg_database_size(current_database())", &[]).await.map_err(fail)?.get(0);
    Ok(Database { database: name.to_owned(), users, tables, bytes, bench_jobs })
}

/// keel up's shard databases: `keel_shard_<i>`, in shard order.
async fn shard_databases(keel: &Keel) -> Vec<String> {
    let cluster = connect(&keel.db_url("postgres")).await;
    let rows = cluster
        .query("SELECT datname::text FROM pg_database WHERE datname LIKE 'keel\\_shard\\_%'", &[])
        .await
        .expect("listing keel up's shard databases");
    let mut shards: Vec<usize> = rows
        .iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            let i: usize = name.strip_prefix("keel_shard_")?.parse().ok()?;
            (format!("keel_shard_{i}") == name).then_some(i)
        })
        .collect();
    shards.sort_unstable();
    shards.into_iter().map(|i| format!("keel_shard_{i}")).collect()
}

/// A shard database made and migrated by `keel migrate` (with a catalog of its own, which it needs),
/// measured, then dropped.
async fn empty_shard(keel: &Keel, keel_binary: &Path) -> Result<Database, String> {
    let cluster = connect(&keel.db_url("postgres")).await;
    let drop_both = || async {
        for db in [EMPTY_SHARD_DB, EMPTY_CATALOG_DB] {
            cluster.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    drop_both().await.map_err(|e| format!("dropping an earlier empty shard: {e}"))?;
    for db in [EMPTY_CATALOG_DB, EMPTY_SHARD_DB] {
        cluster
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .map_err(|e| format!("CREATE DATABASE {db}: {e}"))?;
    }
    let migrated = tokio::process::Command::new(keel_binary)
        .arg("migrate")
        .env("KEEL_CATALOG_URL", keel.db_url(EMPTY_CATALOG_DB))
        .env("KEEL_SHARD_URLS", keel.db_url(EMPTY_SHARD_DB))
        .env("KEEL_LOG", "warn")
        .output()
        .await;
    let measured = match migrated {
        Ok(out) if out.status.success() => database(keel, EMPTY_SHARD_DB, &mut Vec::new()).await,
        Ok(out) => Err(format!("keel migrate: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(format!("keel migrate: {e}")),
    };
    drop_both().await.map_err(|e| format!("dropping the empty shard: {e}"))?;
    measured
}

pub async fn measure(keel: &Keel, keel_binary: &Path) -> Storage {
    let mut missing = Vec::new();
    let mut shards = Vec::new();
    for name in shard_databases(keel).await {
        shards.push(database(keel, &name, &mut missing).await.unwrap_or_else(|e| panic!("storage: {e}")));
    }
    let (empty, empty_error) = match empty_shard(keel, keel_binary).await {
        Ok(empty) => (Some(empty), None),
        Err(e) => (None, Some(e)),
    };
    let mut storage = Storage::new(shards, empty, empty_error);
    storage.commands.push(format!(
        "on each shard database of the main keel up: SELECT count(*) FROM each table; \
         pg_total_relation_size(table) (the table, its indexes and TOAST) summed over the user tables ({}) and over \
         the queue ({}); pg_database_size(current_database())",
        USER_TABLES.join(", "),
        QUEUE_TABLES.join(" + ")
    ));
    storage.commands.push(match &storage.empty {
        Some(empty) => format!(
            "the empty shard: CREATE DATABASE {EMPTY_SHARD_DB} (and {EMPTY_CATALOG_DB}) in the same cluster, `keel migrate` \
             with KEEL_SHARD_URLS and KEEL_CATALOG_URL naming them, measured the same way, then dropped: {} bytes in all, \
             {} in the user tables, {} in the queue; subtracted from each shard's figures before dividing by its users",
            empty.bytes,
            empty.user_tables_bytes(),
            empty.queue_bytes()
        ),
        None => format!(
            "no empty shard could be made ({}): nothing is subtracted, so each figure includes an empty shard's \
             fixed size (PostgreSQL's catalog, the empty tables' indexes) divided by the users",
            storage.empty_error.as_deref().unwrap_or("?")
        ),
    });
    if !missing.is_empty() {
        storage.commands.push(format!(
            "tables keel-bench's list names that were not found, counted as empty: {} (update storage.rs's lists from crates/keel/src/db/moves.rs)",
            missing.join(", ")
        ));
    }
    storage
}

/// The console line.
pub fn console_line(storage: &Storage) -> String {
    let Some(all) = storage.total() else {
        return "storage: not measured".to_owned();
    };
    let rows: Vec<String> =
        storage.tables.iter().filter(|t| t.rows > 0).map(|t| format!("{} {:.2}", t.table, t.rows_per_user)).collect();
    format!(
        "storage: {} users on {} shards; bytes per user: user tables {:.0}, queue {:.0} ({} keel.ping jobs of S4's in it), database {:.0} ({}); rows per user: {}",
        all.users,
        storage.shards.len(),
        all.user_tables_bytes,
        all.queue_bytes,
        all.bench_jobs,
        all.database_bytes,
        storage
            .empty
            .as_ref()
            .map_or("no empty shard subtracted".to_owned(), |e| format!("less an empty shard's {} bytes each", e.bytes)),
        rows.join(", ")
    )
}

/// Two shards and an empty one, for the tests here and of the report: every table of shard 0 holds
/// 1,000 bytes more than the empty shard's, of shard 1 6,000; the databases 20 times that.
#[cfg(test)]
pub fn example(with_empty: bool) -> Storage {
    const EMPTY_TABLE: i64 = 16_384;
    const EMPTY_DATABASE: i64 = 7_500_000;
    let database = |name: &str, users: i64, extra: i64, bench_jobs: i64| Database {
        database: name.to_owned(),
        users,
        tables: USER_TABLES
            .iter()
            .chain(QUEUE_TABLES)
            .map(|t| Table { table: (*t).to_owned(), rows: users, bytes: EMPTY_TABLE + extra })
            .collect(),
        bytes: EMPTY_DATABASE + 20 * extra,
        bench_jobs,
    };
    let shards = vec![database("keel_shard_0", 10, 1_000, 500), database("keel_shard_1", 30, 6_000, 0)];
    if with_empty {
        Storage::new(shards, Some(database("bench_storage_shard", 0, 0, 0)), None)
    } else {
        Storage::new(shards, None, Some("keel migrate: exit status: 1".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_user_are_each_shards_bytes_less_an_empty_shards_over_its_users() {
        let storage = example(true);
        let scopes: Vec<&str> = storage.per_user.iter().map(|p| p.scope.as_str()).collect();
        assert_eq!(scopes, ["keel_shard_0", "keel_shard_1", "all shards"]);
        let user_tables = USER_TABLES.len() as f64;
        let [shard0, shard1, all] = &storage.per_user[..] else { panic!("{:?}", storage.per_user) };
        assert_eq!((shard0.users, shard0.bench_jobs), (10, 500));
        assert_eq!(shard0.user_tables_bytes, user_tables * 1_000.0 / 10.0);
        assert_eq!(shard0.queue_bytes, 2.0 * 1_000.0 / 10.0);
        assert_eq!(shard0.database_bytes, 20.0 * 1_000.0 / 10.0);
        assert_eq!(shard1.user_tables_bytes, user_tables * 6_000.0 / 30.0);
        // All shards: bytes over users, not the mean of the shards' figures.
        assert_eq!((all.users, all.bench_jobs), (40, 500));
        assert_eq!(all.user_tables_bytes, user_tables * 7_000.0 / 40.0);
        assert_eq!(all.queue_bytes, 2.0 * 7_000.0 / 40.0);
        assert_eq!(all.database_bytes, 20.0 * 7_000.0 / 40.0);
        assert_eq!(storage.total(), Some(all));
        // Every table, the queue's last; rows and bytes per user over all the shards, which add up.
        assert_eq!(storage.tables.len(), USER_TABLES.len() + QUEUE_TABLES.len());
        assert_eq!(
            storage.tables.iter().map(|t| t.bytes_per_user).sum::<f64>(),
            all.user_tables_bytes + all.queue_bytes
        );
        let orders = storage.tables.iter().find(|t| t.table == "orders").unwrap();
        assert_eq!(
            *orders,
            TablePerUser { table: "orders".into(), rows: 40, rows_per_user: 1.0, bytes_per_user: 175.0 }
        );
        assert_eq!(storage.tables.last().unwrap().table, "keel_processed_events");
    }

    #[test]
    fn without_an_empty_shard_nothing_is_subtracted() {
        let storage = example(false);
        let all = storage.total().unwrap();
        assert_eq!(all.user_tables_bytes, USER_TABLES.len() as f64 * (2.0 * 16_384.0 + 7_000.0) / 40.0);
        assert_eq!(all.database_bytes, (2.0 * 7_500_000.0 + 20.0 * 7_000.0) / 40.0);
        assert!(console_line(&storage).contains("no empty shard subtracted"), "{}", console_line(&storage));
    }

    #[test]
    fn the_console_line_gives_all_shards_figures_and_rows_per_user() {
        assert_eq!(console_line(&Storage::default()), "storage: not measured");
        assert_eq!(Storage::default().total(), None);
        let line = console_line(&example(true));
        assert!(line.starts_with("storage: 40 users on 2 shards; bytes per user: user tables 2275, queue 350 (500 keel.ping jobs of S4's in it), database 3500 (less an empty shard's 7500000 bytes each); rows per user: users 1.00, wallets 1.00, "), "{line}");
        assert!(line.ends_with("keel_processed_events 1.00"), "{line}");
    }
}
