//! Likes. A like is recorded per user on the user's shard (the primary key makes it idempotent and
//! decides races), and counted **in the same statement**: a like or unlike that changed a row adds
//! one to a tally row of the product on that shard (one of [`counter::STRIPES`], chosen at random,
//! so that likes of one hot product rarely queue for one row lock). The count can therefore never
//! drift from the rows, whatever clients, nodes or crashes do: both commit together or not at all.
//!
//! The count per product is a PN-counter (`keel-crdt`) whose components are those tally rows
//! (cumulative likes and unlikes, one per shard and stripe). Each node keeps a copy of every counter
//! in memory, merges what the shards changed every [`MERGE_INTERVAL`], and merges the component a
//! like of its own returned at once; so a read costs no query, the node that took a like counts it
//! immediately, and every other node within the interval (the budget is 2 s). Merging is a
//! maximum per component, so reading a row twice, or in any order, changes nothing.
//!
//! Under a connection budget (`keel up` with more than 8 shards, [`crate::db::budget`]), a node
//! merges each shard's tallies on the visit that reads the shard's revoked sessions instead, every
//! 1.25 s by default and at least every [`MERGE_INTERVAL_MANY_SHARDS`]: one visit of each shard,
//! on one connection, where every 250 ms 100 shards would take 400 visits a second.

pub mod counter;

use axum::extract::State;
use axum::http::StatusCode;

use crate::catalog::CatalogState;
use crate::db::Sql;
use crate::feed::{self, ObjectType, Verb};
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Path};
use crate::http::trace::TraceContext;
use crate::ids::{ProductId, UserId};
pub use counter::{LikeCounter, MERGE_INTERVAL, MERGE_INTERVAL_MANY_SHARDS};

/// Records that `user` likes (or no longer likes) the product, and counts the change if there was
/// one, in one statement; a change is also an activity their followers see in their feeds (posted or
/// withdrawn, [`crate::feed`]), in the same transaction. The product must exist; that is checked
/// against the product cache, not the database.
async fn set_like(
    state: &CatalogState,
    user: UserId,
    id: &str,
    like: bool,
    trace: &TraceContext,
) -> Result<StatusCode, ApiError> {
    let product = parse_id::<ProductId>("product", id)?;
    crate::catalog::cached_product(state, product).await?;
    let shard = &*state.db.shard_of(user);
    // The row changes (or not: a like that exists, an unlike of nothing) and, only if it did, the
    // tally with it.
    let (change, column) = if like {
        ("INSERT INTO likes (user_id, product_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING product_id", "likes")
    } else {
        ("DELETE FROM likes WHERE user_id = $1 AND product_id = $2 RETURNING product_id", "unlikes")
    };
    let stripe = (keel_random::u64() % counter::STRIPES as u64) as i16;
    let mut client = shard.client().await?;
    // The like, its count and its activity (with the activity's event) commit together.
    let tx = client.transaction().await?;
    let counted = tx
        .maybe_row(
            &format!(
                "WITH changed AS ({change})
                 INSERT INTO like_tallies (product_id, stripe, {column}) SELECT product_id, $3, 1 FROM changed
                 ON CONFLICT (product_id, stripe) DO UPDATE
                 SET {column} = like_tallies.{column} + 1, updated_at = now()
                 RETURNING likes, unlikes"
            ),
            &[&user, &product, &stripe],
        )
        .await?;
    if counted.is_some() {
        let traceparent = Some(trace.traceparent());
        match like {
            true => feed::post(&tx, user, Verb::Liked, ObjectType::Product, product.as_uuid(), traceparent).await?,
            false => feed::withdraw(&tx, user, Verb::Liked, product.as_uuid(), traceparent).await?,
        }
    }
    shard.commit_jobs(tx).await?;
    if let Some(row) = counted {
        let tally = counter::Tally { shard: shard.name().to_owned(), stripe, likes: row.get(0), unlikes: row.get(1) };
        state.likes.merge(product, &tally);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/products/{id}/like", tag = "likes", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 204, description = "Liked (again: no change)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn like(
    State(state): State<CatalogState>,
    AuthUser(user): AuthUser,
    trace: TraceContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_like(&state, user, &id, true, &trace).await
}

#[utoipa::path(delete, path = "/v1/products/{id}/like", tag = "likes", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 204, description = "Not liked (any more)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unlike(
    State(state): State<CatalogState>,
    AuthUser(user): AuthUser,
    trace: TraceContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_like(&state, user, &id, false, &trace).await
}
