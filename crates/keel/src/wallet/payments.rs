//! Store credit from a payment provider: `POST /v1/payments/events`, the provider's webhook.
//!
//! Events are Standard Webhooks messages, signed with the secret of `KEEL_PAYMENT_WEBHOOK_SECRET`
//! and verified with the code that signs Keel's own webhooks ([`crate::webhooks::signing`]). Nothing
//! about a request is trusted before its signature is: not the body, not who it names. A provider
//! retries an event until it gets a 2xx, so every answer about a signed, well-formed event is a 2xx
//! once it is applied, and a payment credits once however often it comes: its id is claimed on the
//! user's shard in the transaction of the credit (`payments`, migration `0012_payments.sql`).
//!
//! The claim is per shard: the same payment id sent for a user on another shard is not seen (a
//! provider's retries of an event carry the same user; only a provider that reused an id for
//! another user would be credited twice). Catching that too needs a claim in the catalogue before
//! the credit, as e-mail addresses are claimed at sign-up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{credit, MAX_DEPOSIT_CENTS};
use crate::db::Sql;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_json, Json};
use crate::ids::UserId;
use crate::money::Cents;
use crate::state::AppState;
use crate::webhooks::signing::Signed;

/// How far a message's `webhook-timestamp` may be from this server's clock, either way: a captured
/// message replayed later than this is refused, whatever its signature.
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// The event type that credits a wallet.
const PAYMENT_SUCCEEDED: &str = "payment.succeeded";

/// A Standard Webhooks payload: `type`, `timestamp` and `data`. Fields a provider adds are ignored,
/// so that a provider adding one does not have its events refused (and retried) forever.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PaymentEvent {
    /// `payment.succeeded` credits a wallet; other types are acknowledged (204) and do nothing.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the provider made the event (RFC 3339), as it sent it. Freshness is judged by the signed
    /// `webhook-timestamp` header, not by this.
    pub timestamp: String,
    pub data: PaymentSucceeded,
}

/// Only the type, read first: `data` is read as the type says.
#[derive(Deserialize)]
struct EventType {
    #[serde(rename = "type")]
    kind: String,
}

/// The `data` of a `payment.succeeded` event.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PaymentSucceeded {
    /// The provider's id of the payment: 1 to 255 characters, no control characters. A payment
    /// credits once, whatever the retries.
    pub payment_id: String,
    /// The user whose wallet the payment credits.
    pub user_id: String,
    /// 1 to 10,000,000,000.
    pub amount_cents: i64,
}

/// A payment's id at the provider, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentId(String);

impl PaymentId {
    pub fn parse(field: &str, raw: &str) -> Result<PaymentId, ApiError> {
        if raw.is_empty() || raw.chars().count() > 255 || raw.chars().any(char::is_control) {
            return Err(ApiError::invalid(field, "must be 1 to 255 characters with no control characters"));
        }
        Ok(PaymentId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a `payment.succeeded` event did.
#[derive(Debug, Serialize, ToSchema)]
pub struct PaymentCredited {
    pub payment_id: String,
    /// The deposit of this payment in the user's ledger (the same on every delivery of the event).
    pub deposit_id: String,
    /// True when the payment had been credited by an earlier delivery: nothing was credited now.
    pub duplicate: bool,
}

#[utoipa::path(post, path = "/v1/payments/events", tag = "wallet", request_body = PaymentEvent,
    description = "The payment provider's webhook (Standard Webhooks 1.0): `webhook-id`, `webhook-timestamp` \
        and `webhook-signature` headers, signed with `KEEL_PAYMENT_WEBHOOK_SECRET`. No bearer token.",
    params(
        ("webhook-id" = String, Header),
        ("webhook-timestamp" = String, Header,
            description = "Seconds since 1970; at most 5 minutes from the server's clock"),
        ("webhook-signature" = String, Header,
            description = "`v1,<base64 HMAC-SHA256>`, space-separated if several"),
    ),
    responses(
        (status = 200, body = PaymentCredited,
            description = "The payment is credited (now, or by an earlier delivery: `duplicate`)"),
        (status = 204, description = "A signed event of a type Keel does not act on: acknowledged, nothing done"),
        (status = 400, description = "A signed body that is not JSON", body = Problem),
        (status = 401, body = Problem,
            description = "No signature, a signature that does not verify, or a timestamp over 5 minutes off"),
        (status = 409, description = "This payment id was credited with another user or amount", body = Problem),
        (status = 413, description = "A body over 1 MiB", body = Problem),
        (status = 422, body = Problem,
            description = "A signed event that does not fit: a missing or bad field, an unknown user"),
        (status = 503, description = "Payments are not configured (no KEEL_PAYMENT_WEBHOOK_SECRET)", body = Problem),
    ))]
pub async fn receive_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(key) = &state.config.payment_webhook_secret else {
        return Err(ApiError::Unavailable(
            "payments are not configured: this server has no KEEL_PAYMENT_WEBHOOK_SECRET".into(),
        ));
    };
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge("the request body is larger than 1 MiB".into()),
        _ => ApiError::BadRequest(rejection.body_text()),
    })?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let unverified = |e: crate::webhooks::signing::Unverified| ApiError::Unauthorized(format!("{e}"));
    let message = Signed::from_headers(&headers).map_err(unverified)?;
    key.verify(&message, &body, now, TOLERANCE).map_err(unverified)?;

    // Signed: from here on, the body is the provider's.
    let EventType { kind } = parse_json(&body)?;
    if kind != PAYMENT_SUCCEEDED {
        tracing::info!(webhook_id = message.id, kind, "payment event of a type Keel does not act on");
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let event: PaymentEvent = parse_json(&body)?;
    let payment = PaymentId::parse("data.payment_id", &event.data.payment_id)?;
    let user: UserId =
        event.data.user_id.parse().map_err(|_| ApiError::invalid("data.user_id", "must be a user's id"))?;
    let amount = crate::http::number("data.amount_cents", event.data.amount_cents, 1, MAX_DEPOSIT_CENTS).map(Cents)?;
    let credited = apply(&state, &payment, user, amount).await?;
    Ok(Json(credited).into_response())
}

/// Credits a payment once: the payment's row is claimed first (a concurrent delivery of the same
/// payment waits on it, then finds it), then the wallet is credited, in one transaction.
async fn apply(
    state: &AppState,
    payment: &PaymentId,
    user: UserId,
    amount: Cents,
) -> Result<PaymentCredited, ApiError> {
    let mut client = state.db.shard_of(user).client().await?;
    let tx = client.transaction().await?;
    let deposit_id = Uuid::now_v7();
    let unknown_user = || ApiError::invalid("data.user_id", &format!("no user with id {user}"));
    let claimed = tx
        .maybe_row(
            "INSERT INTO payments (payment_id, user_id, amount_cents, deposit_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT (payment_id) DO NOTHING RETURNING 1",
            &[&payment.as_str(), &user, &amount.0, &deposit_id],
        )
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => unknown_user(),
            _ => e.into(),
        })?;
    if claimed.is_none() {
        // Credited before (by a retry of this event, or one racing it and committed first).
        let row = tx
            .row("SELECT user_id, amount_cents, deposit_id FROM payments WHERE payment_id = $1", &[&payment.as_str()])
            .await?;
        let (stored_user, stored_amount, stored_deposit): (UserId, i64, Uuid) = (row.get(0), row.get(1), row.get(2));
        if stored_user != user || stored_amount != amount.0 {
            return Err(ApiError::Conflict(format!(
                "payment {:?} was already credited with another user or amount; nothing was credited now",
                payment.as_str()
            )));
        }
        return Ok(PaymentCredited {
            payment_id: payment.as_str().to_owned(),
            deposit_id: stored_deposit.to_string(),
            duplicate: true,
        });
    }
    let credited = credit(&tx, user, deposit_id, amount).await?.ok_or_else(unknown_user)?;
    tx.commit().await?;
    tracing::info!(payment = payment.as_str(), %user, deposit = %deposit_id, amount_cents = amount.0, "credited");
    Ok(PaymentCredited {
        payment_id: payment.as_str().to_owned(),
        deposit_id: credited.deposit_id.to_string(),
        duplicate: false,
    })
}
