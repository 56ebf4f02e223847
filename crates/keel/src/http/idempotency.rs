//! `Idempotency-Key` for writes a client may retry: the first request with a key stores its response
//! in the same transaction as its effect; a repeat replays that response and changes nothing.
//!
//! Races are settled by the primary key: a second request with the same key blocks on the first's
//! uncommitted insert, then finds its stored response (or, if the first rolled back, goes ahead).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::{Sql, Transaction};
use crate::http::error::ApiError;
use crate::ids::UserId;

pub const HEADER: &str = "idempotency-key";

/// The key a client sent: 1 to 255 printable ASCII characters.
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(HEADER)
            .ok_or_else(|| ApiError::BadRequest("this request needs an Idempotency-Key header".into()))?;
        match value.to_str() {
            Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(IdempotencyKey(key.to_owned()))
            }
            _ => Err(ApiError::BadRequest(
                "the Idempotency-Key header must be 1 to 255 printable ASCII characters".into(),
            )),
        }
    }
}

/// What a request with a key should do.
pub enum Claim {
    /// The key is new and now held by this transaction: do the work, then [`store`] the response.
    Fresh,
    /// The key was used before for the same request: answer exactly this.
    Replay { status: StatusCode, location: Option<String>, body: String },
}

/// A digest of what a key promises: the operation and its (re-serialised, so canonical) input.
pub fn request_hash(operation: &str, input: &impl Serialize) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(input).unwrap_or_default());
    hasher.finalize().to_vec()
}

/// Takes `key` for this transaction, or finds what it answered before.
pub async fn claim(tx: &Transaction<'_>, user: UserId, key: &str, hash: &[u8]) -> Result<Claim, ApiError> {
    let inserted = tx
        .maybe_row(
            "INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, response)
             VALUES ($1, $2, $3, 0, '') ON CONFLICT (user_id, key) DO NOTHING RETURNING 1",
            &[&user, &key, &hash],
        )
        .await?;
    if inserted.is_some() {
        return Ok(Claim::Fresh);
    }
    let row = tx
        .row(
            "SELECT request_hash, status_code, response, location FROM idempotency_keys WHERE user_id = $1 AND key = $2",
            &[&user, &key],
        )
        .await?;
    if row.get::<_, Vec<u8>>(0) != hash {
        return Err(ApiError::Unprocessable(
            "this Idempotency-Key was already used with a different request; use a new key".into(),
        ));
    }
    let status = StatusCode::from_u16(row.get::<_, i16>(1) as u16).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Claim::Replay { status, location: row.get(3), body: row.get(2) })
}

/// Records the response of a [`Claim::Fresh`] request, in its transaction, and returns it built
/// from the very bytes stored, so the first answer and every replay are identical.
pub async fn store(
    tx: &Transaction<'_>,
    user: UserId,
    key: &str,
    status: StatusCode,
    location: Option<String>,
    body: &impl Serialize,
) -> Result<Response, ApiError> {
    let body = serde_json::to_string(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    tx.exec(
        "UPDATE idempotency_keys SET status_code = $3, response = $4, location = $5 WHERE user_id = $1 AND key = $2",
        &[&user, &key, &(status.as_u16() as i16), &body, &location],
    )
    .await?;
    Ok(json_response(status, location, body))
}

/// A JSON response from an already-serialised body: the stored bytes are the response.
pub fn json_response(status: StatusCode, location: Option<String>, body: String) -> Response {
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(value) = location.and_then(|l| header::HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}
