//! `GET /v1/admin/stats`: the shop's figures (users, orders, money) summed over every shard.
//!
//! Scatter-gather: each shard answers one statement of plain aggregates, all shards at once (under a
//! connection budget, [`LANES_UNDER_BUDGET`] at a time), and the sums are added up here. A shard that
//! fails or does not answer within [`SHARD_TIMEOUT`] (from its turn) is left out and named
//! (`partial`, `missing_shards`) rather than failing the whole answer: the figures of the shards that
//! did answer are still worth having while one is down.
//!
//! Each shard's figures come from one statement, so they are consistent with each other on that
//! shard (one snapshot); the shards' snapshots are taken at about the same moment, not at one instant.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::{Client, Db, DbError, Sql};
use crate::http::auth::Admin;
use crate::http::error::Problem;
use crate::http::extract::Json;
use crate::state::AppState;

/// How long one shard may take (a connection and its statement) before it is left out. The same
/// 2 s after which the health watchdog calls a database down (`db::health::PROBE_TIMEOUT`) and
/// `GET /v1/admin/shards` reports a shard down; far within the request timeout (30 s by default),
/// so the page answers even while a shard hangs. The statement scans four whole tables: a shard
/// with tens of millions of orders may need longer, and would then show as missing.
const SHARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Under a connection budget (`keel up` with more than 8 shards, [`crate::db::budget`]), how many
/// shards are asked at once: the others wait their turn rather than each take one of the process's
/// connections at once, or wait for one with their 2 s running.
const LANES_UNDER_BUDGET: usize = 16;

/// One statement of plain aggregates per shard: no join, no lookup per user. No index can spare
/// reading rows, since every row counts: `EXPLAIN` shows four aggregates over one sequential scan of
/// each table (`users` may get an index-only scan instead), which PostgreSQL must do for a whole-table
/// sum anyway. `orders` is read in a single pass, each status and the revenue a `FILTER` of it. `sum(bigint)` is `numeric`: cast
/// back, so a shard's figures are read as `i64` (a sum past 2^63 cents fails the shard, it never wraps).
const SHARD_FIGURES: &str = "
    SELECT (SELECT count(*) FROM users) AS users,
           o.pending, o.confirmed, o.failed, o.revenue_cents,
           (SELECT coalesce(sum(balance_cents), 0)::bigint FROM wallets) AS wallet_balance_cents,
           (SELECT coalesce(sum(amount_cents), 0)::bigint FROM wallet_deposits) AS deposits_cents
    FROM (SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                 count(*) FILTER (WHERE status = 'confirmed') AS confirmed,
                 count(*) FILTER (WHERE status = 'failed') AS failed,
                 coalesce(sum(total_cents) FILTER (WHERE status = 'confirmed'), 0)::bigint AS revenue_cents
          FROM orders) o";

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ShopStats {
    /// Accounts: every row of `users`, locked ones and those awaiting erasure included (an erased
    /// account has no row any more).
    pub users: i64,
    /// Orders by status, whatever their age.
    pub orders: OrderCounts,
    /// The sum of the totals of confirmed orders: what customers paid from their wallets. Pending and
    /// failed orders charged nothing.
    pub revenue_cents: i64,
    /// The sum of every wallet's balance: credit users hold and have not spent (erased users' wallets
    /// included). With every shard answering, `deposits_cents - revenue_cents`.
    pub wallet_balance_cents: i64,
    /// The sum of every deposit ever credited to a wallet (the administrator's credits and payments
    /// received), before anything was spent.
    pub deposits_cents: i64,
    /// Whether some shard did not answer in time: the figures above then leave its data out.
    pub partial: bool,
    /// The shards left out, in ascending order; empty when `partial` is false.
    pub missing_shards: Vec<u16>,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct OrderCounts {
    /// Placed, not yet decided by the checkout saga.
    pub pending: i64,
    /// Charged and sold.
    pub confirmed: i64,
    /// Refused (out of stock, insufficient funds): nothing charged.
    pub failed: i64,
}

#[utoipa::path(get, path = "/v1/admin/stats", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Users, orders and money summed over the shards that answered within 2 s; \
        `partial` and `missing_shards` name those that did not", body = ShopStats),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn stats(State(state): State<AppState>, _: Admin) -> Json<ShopStats> {
    let set = state.db.shards();
    let answers: Vec<(u16, Result<Figures, ShardError>)> = if crate::db::budget::get().is_some() {
        // Many shards under a connection budget: a few at a time, each with its own 2 s from its turn.
        use futures_util::StreamExt;
        let shards: Vec<(u16, Arc<Db>)> = set.all().map(|(n, db)| (n, db.clone())).collect();
        let asks = shards.into_iter().map(|(n, db)| async move { (n, shard_figures(&db).await) });
        futures_util::stream::iter(asks).buffer_unordered(LANES_UNDER_BUDGET).collect().await
    } else {
        futures_util::future::join_all(set.all().map(|(n, db)| async move { (n, shard_figures(db).await) })).await
    };
    let mut stats = ShopStats::default();
    for (shard, answer) in answers {
        match answer {
            Ok(figures) => stats.add(&figures),
            Err(cause) => {
                tracing::warn!(shard, %cause, "a shard is left out of the stats");
                stats.missing_shards.push(shard);
            }
        }
    }
    stats.missing_shards.sort_unstable();
    stats.partial = !stats.missing_shards.is_empty();
    Json(stats)
}

/// One shard's answer to [`SHARD_FIGURES`].
struct Figures {
    users: i64,
    pending: i64,
    confirmed: i64,
    failed: i64,
    revenue_cents: i64,
    wallet_balance_cents: i64,
    deposits_cents: i64,
}

impl ShopStats {
    /// Adds a shard's figures. Saturating: a handler must not panic, and no real shop nears 2^63.
    fn add(&mut self, f: &Figures) {
        let sum = |total: &mut i64, n: i64| *total = total.saturating_add(n);
        sum(&mut self.users, f.users);
        sum(&mut self.orders.pending, f.pending);
        sum(&mut self.orders.confirmed, f.confirmed);
        sum(&mut self.orders.failed, f.failed);
        sum(&mut self.revenue_cents, f.revenue_cents);
        sum(&mut self.wallet_balance_cents, f.wallet_balance_cents);
        sum(&mut self.deposits_cents, f.deposits_cents);
    }
}

#[derive(Debug, thiserror::Error)]
enum ShardError {
    #[error("no answer within {SHARD_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A shard's figures, or why it has none, within [`SHARD_TIMEOUT`] from the call.
async fn shard_figures(db: &Db) -> Result<Figures, ShardError> {
    let deadline = tokio::time::Instant::now() + SHARD_TIMEOUT;
    let client = tokio::time::timeout_at(deadline, db.client()).await.map_err(|_| ShardError::Timeout)??;
    let answer = tokio::time::timeout_at(deadline, client.row(SHARD_FIGURES, &[])).await;
    let row = match answer {
        Ok(row) => row.map_err(DbError::from)?,
        Err(_) => {
            // The statement may still be running there (until `statement_timeout`): this connection
            // must not go back to the pool, where the next request would queue behind it.
            drop(Client::take(client));
            return Err(ShardError::Timeout);
        }
    };
    Ok(Figures {
        users: row.get("users"),
        pending: row.get("pending"),
        confirmed: row.get("confirmed"),
        failed: row.get("failed"),
        revenue_cents: row.get("revenue_cents"),
        wallet_balance_cents: row.get("wallet_balance_cents"),
        deposits_cents: row.get("deposits_cents"),
    })
}
