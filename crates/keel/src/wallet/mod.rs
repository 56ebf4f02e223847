//! The wallet: a balance on the owner's shard, never cached, never below zero, and a ledger of
//! deposits.
//!
//! Money comes in only from the shop or from a payment, never from the wallet's owner: the admin
//! credits a user (`POST /v1/admin/users/{id}/deposits`, in [`crate::admin::deposits`]), and a
//! payment provider credits through its signed events ([`payments`]). Both write through [`credit`].

pub mod payments;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::consistency::DataKind;
use crate::db::{Sql, Transaction};
use crate::http::auth::{AuthUser, Caller};
use crate::http::error::{ApiError, Problem};
use crate::http::extract::Json;
use crate::ids::UserId;
use crate::money::Cents;
use crate::state::AppState;

/// The largest single deposit: 100 million in currency units.
pub const MAX_DEPOSIT_CENTS: i64 = 10_000_000_000;

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

impl Deposit {
    /// The amount, checked against the range a deposit may have (422 otherwise).
    pub fn amount(&self, field: &str) -> Result<Cents, ApiError> {
        crate::http::number(field, self.amount_cents, 1, MAX_DEPOSIT_CENTS).map(Cents)
    }
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
    let client = state.db.shard_of(user).primary_for(DataKind::Wallet).await?;
    let row = client
        .maybe_row("SELECT balance_cents FROM wallets WHERE user_id = $1", &[&user])
        .await?
        .ok_or_else(|| ApiError::not_found("wallet", &user.to_string()))?;
    Ok(Json(Wallet { balance_cents: row.get(0) }))
}

/// Kept as a route, refusing everyone, so that a client built against the old API is told where
/// money comes from now rather than "no such route".
#[utoipa::path(post, path = "/v1/wallet/deposits", tag = "wallet", security(("bearer" = [])),
    description = "Refused: a wallet's owner cannot credit it. Store credit comes from a payment \
        (`POST /v1/payments/events`, sent by the payment provider) or from the shop \
        (`POST /v1/admin/users/{id}/deposits`, with the admin token).",
    responses(
        (status = 401, description = "No token, or a token that is not valid", body = Problem),
        (status = 403, description = "Any valid token: users cannot deposit into their wallets", body = Problem),
    ))]
pub async fn deposit(caller: Caller) -> ApiError {
    match caller {
        Caller::Anonymous => ApiError::Unauthorized("this needs a bearer token".into()),
        Caller::User(_) => ApiError::Forbidden(
            "a wallet cannot be credited by its owner: store credit comes from a payment or from the shop".into(),
        ),
        Caller::Admin => ApiError::Forbidden("the admin credits a user with POST /v1/admin/users/{id}/deposits".into()),
    }
}

/// A deposit written to the ledger, and the balance after it.
pub struct Credited {
    pub deposit_id: Uuid,
    pub balance: Cents,
}

/// Credits `amount` to `user`'s wallet in `tx`: the ledger row and the new balance in one statement,
/// so the wallet always equals its ledger. `None` if the user has no wallet (no such user): nothing
/// was written.
pub(crate) async fn credit(
    tx: &Transaction<'_>,
    user: UserId,
    deposit_id: Uuid,
    amount: Cents,
) -> Result<Option<Credited>, ApiError> {
    // The ledger row is written only if the wallet was updated: an unknown user is a `None`, not a
    // foreign-key violation.
    let row = tx
        .maybe_row(
            "WITH credited AS (
                 UPDATE wallets SET balance_cents = balance_cents + $3 WHERE user_id = $2 RETURNING balance_cents
             ), entry AS (
                 INSERT INTO wallet_deposits (id, user_id, amount_cents) SELECT $1, $2, $3 FROM credited
             )
             SELECT balance_cents FROM credited",
            &[&deposit_id, &user, &amount.0],
        )
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                ApiError::invalid("amount_cents", "the balance would exceed the largest a wallet can hold")
            }
            _ => e.into(),
        })?;
    Ok(row.map(|row| Credited { deposit_id, balance: Cents(row.get(0)) }))
}
