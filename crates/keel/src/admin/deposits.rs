//! Store credit from the shop: the admin credits a user's wallet.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use uuid::Uuid;

use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::http::idempotency::{self, Claim, IdempotencyKey};
use crate::ids::UserId;
use crate::state::AppState;
use crate::wallet::{self, Deposit, DepositMade};

/// The admin's keys live beside the user's own (keys are stored per user, on the user's shard), in
/// a space of their own: a client's key is printable ASCII without spaces, so none can start with
/// this, and the admin's key for a user cannot collide with one the user sent for a checkout.
fn admin_key(key: &str) -> String {
    format!("admin {key}")
}

#[utoipa::path(post, path = "/v1/admin/users/{id}/deposits", tag = "admin", request_body = Deposit,
    params(("id" = String, Path, description = "The user to credit"),
        ("Idempotency-Key" = String, Header, description = "Retries with the same key (for this user) credit once")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Credited (or the replay of the first request with this key)", body = DepositMade),
        (status = 400, description = "No or a malformed Idempotency-Key, or a body that is not JSON", body = Problem),
        (status = 401, body = Problem),
        (status = 403, description = "Not the admin token", body = Problem),
        (status = 404, description = "No such user", body = Problem),
        (status = 422, description = "A bad amount, or the key was used with another request", body = Problem),
    ))]
pub async fn deposit_for_user(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    Json(input): Json<Deposit>,
) -> Result<Response, ApiError> {
    let user = parse_id::<UserId>("user", &id)?;
    let amount = input.amount("amount_cents")?;
    let key = admin_key(&key);
    let hash = idempotency::request_hash("admin.deposit", &input);
    let mut client = state.db.shard_of(user).client().await?;
    let tx = client.transaction().await?;
    if let Claim::Replay { status, location, body } = idempotency::claim(&tx, user, &key, &hash).await? {
        return Ok(idempotency::json_response(status, location, body));
    }
    // Dropped without a commit on every early return: the key is released with the rest.
    let credited = wallet::credit(&tx, user, Uuid::now_v7(), amount)
        .await?
        .ok_or_else(|| ApiError::not_found("user", &user.to_string()))?;
    let made = DepositMade { deposit_id: credited.deposit_id.to_string(), balance_cents: credited.balance.0 };
    let response = idempotency::store(&tx, user, &key, StatusCode::CREATED, None, &made).await?;
    tx.commit().await?;
    tracing::info!(%user, deposit = %credited.deposit_id, amount_cents = amount.0, "admin credited a wallet");
    Ok(response)
}
