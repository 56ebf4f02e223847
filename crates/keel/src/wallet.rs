//! The wallet: a balance on the owner's shard, never cached, never below zero, and a ledger of deposits.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::db::Sql;
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::Json;
use crate::http::idempotency::{self, Claim, IdempotencyKey};
use crate::http::number;
use crate::state::AppState;

/// The largest single deposit: 100 million in currency units.
const MAX_DEPOSIT_CENTS: i64 = 10_000_000_000;

#[derive(Debug, Serialize, ToSchema)]
pub struct Wallet {
    pub balance_cents: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deposit {
    /// 1 to 10,000,000,000.
    pub amount_cents: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DepositMade {
    pub deposit_id: String,
    pub balance_cents: i64,
}

#[utoipa::path(get, path = "/v1/wallet", tag = "wallet", security(("bearer" = [])),
    responses((status = 200, description = "The balance, read from the primary", body = Wallet),
        (status = 401, body = Problem)))]
pub async fn get_wallet(State(state): State<AppState>, AuthUser(user): AuthUser) -> Result<Json<Wallet>, ApiError> {
    let client = state.db.shard_of(user).client().await?;
    let row = client
        .maybe_row("SELECT balance_cents FROM wallets WHERE user_id = $1", &[&user])
        .await?
        .ok_or_else(|| ApiError::not_found("wallet", &user.to_string()))?;
    Ok(Json(Wallet { balance_cents: row.get(0) }))
}

#[utoipa::path(post, path = "/v1/wallet/deposits", tag = "wallet", request_body = Deposit,
    params(("Idempotency-Key" = String, Header, description = "Retries with the same key deposit once")),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Deposited (or the replay of the first request with this key)", body = DepositMade),
        (status = 400, description = "No or a malformed Idempotency-Key", body = Problem),
        (status = 401, body = Problem),
        (status = 422, description = "A bad amount, or the key was used with another request", body = Problem),
    ))]
pub async fn deposit(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdempotencyKey(key): IdempotencyKey,
    Json(input): Json<Deposit>,
) -> Result<Response, ApiError> {
    let amount = number("amount_cents", input.amount_cents, 1, MAX_DEPOSIT_CENTS)?;
    let hash = idempotency::request_hash("wallet.deposit", &input);
    let mut client = state.db.shard_of(user).client().await?;
    let tx = client.transaction().await?;
    if let Claim::Replay { status, location, body } = idempotency::claim(&tx, user, &key, &hash).await? {
        return Ok(idempotency::json_response(status, location, body));
    }
    let deposit_id = Uuid::now_v7();
    let row = tx
        .row(
            "WITH entry AS (
                 INSERT INTO wallet_deposits (id, user_id, amount_cents) VALUES ($1, $2, $3)
             )
             UPDATE wallets SET balance_cents = balance_cents + $3 WHERE user_id = $2 RETURNING balance_cents",
            &[&deposit_id, &user, &amount],
        )
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                ApiError::invalid("amount_cents", "the balance would exceed the largest a wallet can hold")
            }
            _ => e.into(),
        })?;
    let made = DepositMade { deposit_id: deposit_id.to_string(), balance_cents: row.get(0) };
    let response = idempotency::store(&tx, user, &key, StatusCode::CREATED, None, &made).await?;
    tx.commit().await?;
    Ok(response)
}
