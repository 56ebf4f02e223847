//! Likes. A like is recorded per user on the user's shard (the primary key makes it idempotent and
//! decides races); the count per product is a PN-counter (`keel-crdt`): each node counts the likes
//! and unlikes it accepted in memory and flushes its own component to the catalogue at most
//! [`FLUSH_INTERVAL`] later (write-back), and a read merges every node's component. No node ever
//! waits for another to count a like. The price, declared: a node killed without warning loses the
//! counts it had not flushed, at most one interval's worth; a graceful stop flushes first.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use keel_cache::WriteBack;
use keel_crdt::PnCounter;
use uuid::Uuid;

use crate::db::{Db, DbError, Sql};
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Path};
use crate::startup::AppState;

/// How long a counted like may wait in memory: the loss window of a crash.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// This node's component of every product's like counter, written back to `like_counts`.
pub struct LikeCounter {
    /// A fresh name per process: a component only ever grows, so a restarted node must not reuse
    /// its old name and start again from zero.
    node: String,
    /// Per product, a PN-counter holding this node's component: the likes and unlikes it accepted.
    counts: WriteBack<Uuid, PnCounter<String>>,
}

impl Default for LikeCounter {
    fn default() -> Self {
        LikeCounter::new()
    }
}

impl LikeCounter {
    pub fn new() -> LikeCounter {
        LikeCounter { node: Uuid::now_v7().to_string(), counts: WriteBack::new("like_count", FLUSH_INTERVAL) }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// How much a crash of this node can lose.
    pub fn loss_window(&self) -> Duration {
        self.counts.loss_window()
    }

    fn count(&self, product: Uuid, like: bool) {
        self.counts.update(product, |counter| {
            if like {
                counter.increment(&self.node, 1);
            } else {
                counter.decrement(&self.node, 1);
            }
        });
    }

    /// This node's net contribution to `product`'s count, flushed or not.
    pub fn local_net(&self, product: Uuid) -> i64 {
        self.counts.read(&product, |counter| counter.map_or(0, PnCounter::value))
    }

    /// Writes the changed components. Components are cumulative, so a write is idempotent and an
    /// older one never lowers a newer (`greatest`): the merge of a G-counter, in SQL.
    async fn write(&self, catalog: &Db, batch: Vec<(Uuid, PnCounter<String>)>) -> Result<(), DbError> {
        let mut columns: (Vec<Uuid>, Vec<i64>, Vec<i64>) = Default::default();
        for (product, counter) in batch {
            let (likes, unlikes) = counter.component(&self.node);
            columns.0.push(product);
            columns.1.push(likes as i64);
            columns.2.push(unlikes as i64);
        }
        catalog
            .client()
            .await?
            .exec(
                "INSERT INTO like_counts (product_id, node, likes, unlikes)
                 SELECT p, $2, l, u FROM unnest($1::uuid[], $3::bigint[], $4::bigint[]) AS c(p, l, u)
                 ON CONFLICT (product_id, node) DO UPDATE
                 SET likes = greatest(like_counts.likes, EXCLUDED.likes),
                     unlikes = greatest(like_counts.unlikes, EXCLUDED.unlikes), updated_at = now()",
                &[&columns.0, &self.node, &columns.1, &columns.2],
            )
            .await?;
        Ok(())
    }

    /// Flushes every interval until `stop` completes, then once more.
    pub async fn run_flusher(self: Arc<Self>, catalog: Db, stop: impl Future<Output = ()> + Send) {
        self.counts.run(|batch| self.write(&catalog, batch), stop).await;
    }
}

/// SQL for the other nodes' share of `products.id`'s count; `$node` is this node's parameter.
pub fn others_sql(node_param: usize) -> String {
    format!(
        "(SELECT coalesce(sum(c.likes - c.unlikes), 0)::bigint FROM like_counts c
          WHERE c.product_id = products.id AND c.node <> ${node_param}) AS others_likes"
    )
}

/// A product's like count as this node sees it: the other nodes' flushed components (cached for a
/// moment) merged with its own.
pub async fn count(state: &AppState, product: Uuid) -> Result<i64, ApiError> {
    let (others, _) = state
        .caches
        .likes_of_others
        .get_or_load(&product, || async {
            let client = state.db.catalog.client().await?;
            let row = client
                .row(
                    "SELECT coalesce(sum(likes - unlikes), 0)::bigint FROM like_counts
                     WHERE product_id = $1 AND node <> $2",
                    &[&product, &state.likes.node()],
                )
                .await?;
            Ok::<i64, ApiError>(row.get(0))
        })
        .await?;
    Ok(others + state.likes.local_net(product))
}

/// Records that `user` likes (or no longer likes) the product, and counts the change if there was
/// one. The product must exist; that is checked against the product cache, not the database.
async fn set_like(state: &AppState, user: Uuid, id: &str, like: bool) -> Result<StatusCode, ApiError> {
    let product = parse_id("product", id)?;
    crate::catalog::cached_product(state, product).await?;
    let client = state.db.shard_of(user).client().await?;
    let sql = if like {
        "INSERT INTO likes (user_id, product_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM likes WHERE user_id = $1 AND product_id = $2"
    };
    if client.exec(sql, &[&user, &product]).await? == 1 {
        state.likes.count(product, like);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/products/{id}/like", tag = "likes", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 204, description = "Liked (again: no change)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn like(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_like(&state, user, &id, true).await
}

#[utoipa::path(delete, path = "/v1/products/{id}/like", tag = "likes", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 204, description = "Not liked (any more)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unlike(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_like(&state, user, &id, false).await
}
