//! Locking an account: the admin stops a user from using it (sign-in and refresh refuse a locked
//! user, in [`crate::accounts::sessions`]) and ends every session, so that the user's tokens are
//! refused on every node within the `session` budget. Unlocking lets them sign in again; the
//! sessions ended by the lock stay ended.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::accounts::{sessions, AccountsState};
use crate::db::Sql;
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::http::timestamp;
use crate::ids::UserId;

#[derive(Debug, Serialize, ToSchema)]
pub struct Locked {
    #[schema(value_type = String)]
    pub user_id: UserId,
    /// When the account was locked (by the first lock: locking again changes nothing).
    pub locked_at: String,
    /// The sessions this lock ended.
    pub sessions_ended: usize,
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/lock", tag = "admin",
    params(("id" = String, Path, description = "The user to lock")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Locked: no sign-in or refresh, and every session ended (its tokens are \
            refused on every node within the session budget)", body = Locked),
        (status = 401, body = Problem),
        (status = 403, description = "Not the admin token", body = Problem),
        (status = 404, description = "No such user", body = Problem),
    ))]
pub async fn lock_user(
    State(state): State<AccountsState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Locked>, ApiError> {
    let user = parse_id::<UserId>("user", &id)?;
    let mut client = state.db.shard_of(user).client().await?;
    let tx = client.transaction().await?;
    let row = tx
        .maybe_row(
            "UPDATE users SET locked_at = coalesce(locked_at, now()) WHERE id = $1 RETURNING locked_at",
            &[&user],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id))?;
    // In the lock's transaction: a session opened by a sign-in that read the row before the lock
    // is ended with the others (the sign-in waits for this row, or is seen here).
    let revoked = sessions::revoke(&tx, user, None, "account locked").await?;
    tx.commit().await?;
    state.auth.revocations.revoked(&revoked).await;
    tracing::info!(%user, sessions = revoked.len(), "account locked by the admin");
    Ok(Json(Locked { user_id: user, locked_at: timestamp(row.get(0)), sessions_ended: revoked.len() }))
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/unlock", tag = "admin",
    params(("id" = String, Path, description = "The user to unlock")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Unlocked (or was not locked): the user may sign in again"),
        (status = 401, body = Problem),
        (status = 403, description = "Not the admin token", body = Problem),
        (status = 404, description = "No such user", body = Problem),
        (status = 409, description = "The account is being deleted at its owner's request", body = Problem),
    ))]
pub async fn unlock_user(
    State(state): State<AccountsState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user = parse_id::<UserId>("user", &id)?;
    let client = state.db.shard_of(user).client().await?;
    let row = client
        .maybe_row(
            "WITH found AS (SELECT id, erasure_requested_at IS NOT NULL AS erasing FROM users WHERE id = $1 FOR UPDATE),
             unlocked AS (UPDATE users u SET locked_at = NULL FROM found WHERE u.id = found.id AND NOT found.erasing)
             SELECT erasing FROM found",
            &[&user],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id))?;
    if row.get::<_, bool>(0) {
        // The erasure's lock: lifting it would let the owner sign in to an account being erased.
        return Err(ApiError::Conflict("this account is being deleted at its owner's request".into()));
    }
    tracing::info!(%user, "account unlocked by the admin");
    Ok(StatusCode::NO_CONTENT)
}
