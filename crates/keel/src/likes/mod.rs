//! Likes. A like is recorded per user on the user's shard (the primary key makes it idempotent and
//! decides races); the count per product is a PN-counter (`keel-crdt`): each node counts the likes
//! and unlikes it accepted in memory and flushes its own component to the catalogue at most
//! [`FLUSH_INTERVAL`] later (write-back). Every [`MERGE_INTERVAL`] each node reads the components
//! the others flushed since it last looked and merges them into its own copy of every counter, so a
//! read costs no query: it is the merged copy plus this node's own component ([`counter`]). No node
//! ever waits for another to count a like, and a like is counted everywhere within
//! `FLUSH_INTERVAL + MERGE_INTERVAL` (the budget is 2 s). The price, declared: a node killed without
//! warning loses the counts it had not flushed, at most one interval's worth; a graceful stop
//! flushes first.

pub mod counter;

use axum::extract::State;
use axum::http::StatusCode;

use crate::catalog::CatalogState;
use crate::db::Sql;
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Path};
use crate::ids::{ProductId, UserId};
pub use counter::{LikeCounter, FLUSH_INTERVAL, MERGE_INTERVAL};

/// Records that `user` likes (or no longer likes) the product, and counts the change if there was
/// one. The product must exist; that is checked against the product cache, not the database.
async fn set_like(state: &CatalogState, user: UserId, id: &str, like: bool) -> Result<StatusCode, ApiError> {
    let product = parse_id::<ProductId>("product", id)?;
    crate::catalog::cached_product(state, product).await?;
    let client = state.db.shard_of(user).client().await?;
    let sql = if like {
        "INSERT INTO likes (user_id, product_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM likes WHERE user_id = $1 AND product_id = $2"
    };
    if client.exec(sql, &[&user, &product]).await? == 1 {
        state.likes.record(product, like);
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
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_like(&state, user, &id, true).await
}

#[utoipa::path(delete, path = "/v1/products/{id}/like", tag = "likes", params(("id" = String, Path)),
    security(("bearer" = [])),
    responses((status = 204, description = "Not liked (any more)"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn unlike(
    State(state): State<CatalogState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_like(&state, user, &id, false).await
}
